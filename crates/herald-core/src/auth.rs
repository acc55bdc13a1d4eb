//! Connection and subscription tokens (JWT).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine as _;
use herald_protocol::json::Raw;
pub use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind,
};
use serde::{Deserialize, Serialize};

/// Why a token was refused. `Expired` maps to error 109 (the SDK fetches a new token);
/// `Invalid` to disconnect 3500 (connection and subscription tokens alike).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Claims of a connection token.
#[derive(Debug, Default, Deserialize, Serialize)]
pub struct ConnectClaims {
    /// The user id; "" is anonymous.
    #[serde(default)]
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Connection info shown to others in presence and publications.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Raw>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b64info: Option<String>,
    /// Channels subscribed server-side at connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<String>,
    /// Server-side subscriptions with options (only the keys are used for now).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: BTreeMap<String, serde_json::Value>,
    /// Overrides `exp` for the connection's life (the token itself may expire sooner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<u64>,
}

/// Claims of a subscription token.
#[derive(Debug, Default, Deserialize)]
pub struct SubscribeClaims {
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(default)]
    pub info: Option<Raw>,
    #[serde(default)]
    pub b64info: Option<String>,
    #[serde(default)]
    pub expire_at: Option<u64>,
}

/// Where the public keys of a JWKS endpoint come from: the server supplies an HTTP fetcher,
/// so this crate does no network I/O of its own.
pub trait JwksFetcher: Send + Sync {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<JwkSet, String>> + Send + '_>>;
}

/// The least time between two fetches caused by a token with an unknown `kid`, so forged
/// `kid`s cannot make Herald hammer the key server.
const MISS_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

struct JwksKey {
    key: DecodingKey,
    alg: Option<Algorithm>,
}

/// Public keys from a JWKS endpoint, by `kid`. Swapped whole on refresh (readers never wait).
pub struct Jwks {
    url: String,
    refresh_interval: Duration,
    keys: ArcSwap<HashMap<String, Arc<JwksKey>>>,
    fetcher: OnceLock<Arc<dyn JwksFetcher>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    fn new(url: String, refresh_interval: Duration) -> Self {
        Self {
            url,
            refresh_interval,
            keys: ArcSwap::from_pointee(HashMap::new()),
            fetcher: OnceLock::new(),
            last_fetch: tokio::sync::Mutex::new(None),
        }
    }

    /// The configured endpoint (`client.token_jwks_public_endpoint`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How often the keys are fetched again (`client.token_jwks_refresh_interval`).
    pub fn refresh_interval(&self) -> Duration {
        self.refresh_interval
    }

    /// Installs the fetcher; the first one wins.
    pub fn set_fetcher(&self, fetcher: Arc<dyn JwksFetcher>) {
        let _ = self.fetcher.set(fetcher);
    }

    /// Replaces the key set; returns how many keys are usable (RSA and EC keys with a `kid`).
    pub fn replace(&self, set: &JwkSet) -> usize {
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            // Symmetric keys never come from a public endpoint.
            if !matches!(key.family(), AlgorithmFamily::Rsa | AlgorithmFamily::Ec) {
                continue;
            }
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| Algorithm::from_str(&a.to_string()).ok());
            keys.insert(kid, Arc::new(JwksKey { key, alg }));
        }
        let n = keys.len();
        self.keys.store(Arc::new(keys));
        n
    }

    /// Number of keys held now.
    pub fn len(&self) -> usize {
        self.keys.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, kid: &str) -> Option<Arc<JwksKey>> {
        self.keys.load().get(kid).cloned()
    }

    /// Fetches the key set now and swaps it in; returns the number of usable keys. On failure
    /// the keys held so far stay.
    pub async fn refresh(&self) -> Result<usize, String> {
        let mut last = self.last_fetch.lock().await;
        self.refresh_locked(&mut last).await
    }

    async fn refresh_locked(&self, last: &mut Option<Instant>) -> Result<usize, String> {
        let fetcher = self
            .fetcher
            .get()
            .cloned()
            .ok_or_else(|| "no JWKS fetcher installed".to_string())?;
        *last = Some(Instant::now());
        let set = fetcher.fetch().await?;
        Ok(self.replace(&set))
    }

    /// A token named a `kid` this node does not know: the keys may have rotated. Fetches
    /// again unless that was done very recently (by anyone).
    async fn refresh_on_miss(&self) {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < MISS_REFRESH_INTERVAL) {
            return;
        }
        if let Err(e) = self.refresh_locked(&mut last).await {
            tracing::warn!(url = %self.url, error = %e, "JWKS refresh failed");
        }
    }
}

/// Internal outcome of a key lookup: an unknown `kid` is retried after a JWKS refresh.
enum Failure {
    Token(TokenError),
    UnknownKid,
}

impl From<TokenError> for Failure {
    fn from(e: TokenError) -> Self {
        Failure::Token(e)
    }
}

/// What a [`TokenVerifier`] trusts.
#[derive(Debug, Clone, Default)]
pub struct TokenKeys {
    /// HS256/384/512 secret; "" accepts no HMAC token.
    pub hmac_secret: String,
    /// RSA public key, PEM (SubjectPublicKeyInfo or PKCS#1); empty accepts no RS token
    /// (unless from JWKS).
    pub rsa_public_key_pem: Vec<u8>,
    /// ECDSA public key, PEM (P-256 for ES256, P-384 for ES384).
    pub ecdsa_public_key_pem: Vec<u8>,
    /// JWKS endpoint; "" for none.
    pub jwks_url: String,
    /// How often the JWKS is fetched again.
    pub jwks_refresh_interval: Duration,
    /// Required `aud` when not empty.
    pub audience: String,
    /// Required `iss` when not empty.
    pub issuer: String,
}

impl TokenKeys {
    /// The keys `[client]` configures; PEM keys given as file paths are read here.
    pub fn from_options(o: &crate::options::ClientOptions) -> Result<Self, String> {
        Ok(Self {
            hmac_secret: o.token_hmac_secret.clone(),
            rsa_public_key_pem: pem_text_or_file(
                "client.token_rsa_public_key",
                &o.token_rsa_public_key,
            )?,
            ecdsa_public_key_pem: pem_text_or_file(
                "client.token_ecdsa_public_key",
                &o.token_ecdsa_public_key,
            )?,
            jwks_url: o.token_jwks_public_endpoint.trim().to_string(),
            jwks_refresh_interval: o.token_jwks_refresh_interval,
            audience: o.token_audience.clone(),
            issuer: o.token_issuer.clone(),
        })
    }
}

/// Checks tokens against the configured keys.
///
/// The key is chosen by the token's `alg`: HS* only ever against the HMAC secret, RS* against
/// the RSA key, ES256/ES384 against the ECDSA key (or, with a `kid` and a JWKS endpoint, the
/// endpoint's key of that `kid`). So a public key can never be used as an HMAC secret, and
/// `alg: none` or any other algorithm is refused.
pub struct TokenVerifier {
    hmac: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ecdsa: Option<DecodingKey>,
    jwks: Option<Arc<Jwks>>,
    validation: Validation,
}

/// Reads a PEM key given either as the PEM text itself or as the path of a file holding it.
pub fn pem_text_or_file(key: &str, value: &str) -> Result<Vec<u8>, String> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(Vec::new());
    }
    if v.starts_with("-----BEGIN") {
        return Ok(v.as_bytes().to_vec());
    }
    std::fs::read(v).map_err(|e| format!("{key}: cannot read PEM file {v:?}: {e}"))
}

impl TokenVerifier {
    /// A verifier that only knows an HMAC secret.
    pub fn new(hmac_secret: &str) -> Self {
        Self::with_keys(&TokenKeys {
            hmac_secret: hmac_secret.to_string(),
            ..Default::default()
        })
        .unwrap_or_else(|_| Self::base(hmac_secret))
    }

    fn base(hmac_secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Tokens without `exp` never expire, as in Centrifugo; `exp` is checked when present.
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = 0;
        Self {
            hmac: (!hmac_secret.is_empty())
                .then(|| DecodingKey::from_secret(hmac_secret.as_bytes())),
            rsa: None,
            ecdsa: None,
            jwks: None,
            validation,
        }
    }

    /// A verifier for every configured key; the message names the key that does not load.
    pub fn with_keys(keys: &TokenKeys) -> Result<Self, String> {
        let mut v = Self::base(&keys.hmac_secret);
        if !keys.rsa_public_key_pem.is_empty() {
            v.rsa = Some(
                DecodingKey::from_rsa_pem(&keys.rsa_public_key_pem).map_err(|e| {
                    format!("client.token_rsa_public_key: not an RSA public key: {e}")
                })?,
            );
        }
        if !keys.ecdsa_public_key_pem.is_empty() {
            v.ecdsa = Some(
                DecodingKey::from_ec_pem(&keys.ecdsa_public_key_pem).map_err(|e| {
                    format!("client.token_ecdsa_public_key: not an ECDSA public key: {e}")
                })?,
            );
        }
        if !keys.jwks_url.is_empty() {
            v.jwks = Some(Arc::new(Jwks::new(
                keys.jwks_url.clone(),
                keys.jwks_refresh_interval,
            )));
        }
        if !keys.audience.is_empty() {
            v.validation.set_audience(&[&keys.audience]);
            v.validation.validate_aud = true;
            v.validation.required_spec_claims.insert("aud".into());
        }
        if !keys.issuer.is_empty() {
            v.validation.set_issuer(&[&keys.issuer]);
            v.validation.required_spec_claims.insert("iss".into());
        }
        Ok(v)
    }

    /// The verifier `[client]` configures. Keys that do not load were refused by the config
    /// check before; here they are logged and left out (their tokens are refused).
    pub fn from_options(o: &crate::options::ClientOptions) -> Self {
        match TokenKeys::from_options(o).and_then(|k| Self::with_keys(&k)) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "token keys not loaded");
                Self::new(&o.token_hmac_secret)
            }
        }
    }

    /// The JWKS key cache, when an endpoint is configured.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, Failure> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Invalid(format!("bad header: {e}")))?;
        let alg = header.alg;
        let jwks_key;
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => self.hmac.as_ref(),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::ES256
            | Algorithm::ES384 => {
                let is_rsa = matches!(alg, Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512);
                match (&self.jwks, header.kid.as_deref()) {
                    (Some(jwks), Some(kid)) => {
                        jwks_key = jwks.get(kid).ok_or(Failure::UnknownKid)?;
                        if jwks_key.alg.is_some_and(|a| a != alg) {
                            return Err(TokenError::Invalid(format!(
                                "key {kid:?} is not for {alg:?}"
                            ))
                            .into());
                        }
                        Some(&jwks_key.key)
                    }
                    _ if is_rsa => self.rsa.as_ref(),
                    _ => self.ecdsa.as_ref(),
                }
            }
            other => {
                return Err(
                    TokenError::Invalid(format!("algorithm {other:?} is not accepted")).into(),
                );
            }
        };
        let key =
            key.ok_or_else(|| TokenError::Invalid(format!("no key configured for {alg:?}")))?;
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        match jsonwebtoken::decode::<T>(token, key, &validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => match e.kind() {
                // Not yet valid counts as expired, as in Centrifugo: the client gets 109 and
                // asks its backend for a token again.
                ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => {
                    Err(TokenError::Expired.into())
                }
                _ => Err(TokenError::Invalid(e.to_string()).into()),
            },
        }
    }

    fn finish<T>(r: Result<T, Failure>) -> Result<T, TokenError> {
        r.map_err(|f| match f {
            Failure::Token(e) => e,
            Failure::UnknownKid => TokenError::Invalid("unknown key id".into()),
        })
    }

    /// Like `decode`, but an unknown `kid` refreshes the JWKS once and tries again.
    async fn decode_fresh<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
    ) -> Result<T, TokenError> {
        match self.decode(token) {
            Err(Failure::UnknownKid) => {
                if let Some(jwks) = &self.jwks {
                    jwks.refresh_on_miss().await;
                }
                Self::finish(self.decode(token))
            }
            r => Self::finish(r),
        }
    }

    /// Checks a connection token with the keys held now (no JWKS fetch).
    pub fn verify_connect(&self, token: &str) -> Result<ConnectClaims, TokenError> {
        Self::finish(self.decode(token))
    }

    /// Checks a subscription token with the keys held now (no JWKS fetch).
    pub fn verify_subscribe(&self, token: &str) -> Result<SubscribeClaims, TokenError> {
        Self::finish(self.decode(token))
    }

    /// Checks a connection token; a `kid` unknown to the JWKS cache refreshes it first.
    pub async fn check_connect(&self, token: &str) -> Result<ConnectClaims, TokenError> {
        self.decode_fresh(token).await
    }

    /// Checks a subscription token; a `kid` unknown to the JWKS cache refreshes it first.
    pub async fn check_subscribe(&self, token: &str) -> Result<SubscribeClaims, TokenError> {
        self.decode_fresh(token).await
    }
}

/// Decodes `b64info` into raw JSON info; `info` wins when both are set.
pub fn info_from_claims(
    info: Option<Raw>,
    b64info: Option<&str>,
) -> Result<Option<Raw>, TokenError> {
    if let Some(info) = info {
        return Ok(Some(herald_protocol::json::single_line(info)));
    }
    let Some(b64) = b64info else { return Ok(None) };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| TokenError::Invalid("b64info is not base64".into()))?;
    let text =
        String::from_utf8(bytes).map_err(|_| TokenError::Invalid("b64info is not UTF-8".into()))?;
    herald_protocol::json::raw_from_str(&text)
        .map(|r| Some(herald_protocol::json::single_line(r)))
        .map_err(|_| TokenError::Invalid("b64info is not JSON".into()))
}

/// Signs an HS256 token with the given claims (for `herald token` and tests).
pub fn sign_hs256<T: Serialize>(
    secret: &str,
    claims: &T,
) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_expired_and_forged() {
        let v = TokenVerifier::new("s3cret");
        let t = sign_hs256("s3cret", &json!({"sub":"42","exp": unix_now() + 60})).unwrap();
        assert_eq!(v.verify_connect(&t).unwrap().sub, "42");
        let t = sign_hs256("s3cret", &json!({"sub":"42","exp": unix_now() - 1})).unwrap();
        assert_eq!(v.verify_connect(&t).unwrap_err(), TokenError::Expired);
        let t = sign_hs256("other", &json!({"sub":"42"})).unwrap();
        assert!(matches!(v.verify_connect(&t), Err(TokenError::Invalid(_))));
        assert!(matches!(
            v.verify_connect("garbage"),
            Err(TokenError::Invalid(_))
        ));
        // No exp: never expires.
        let t = sign_hs256("s3cret", &json!({"sub":"7","channels":["a"]})).unwrap();
        assert_eq!(
            v.verify_connect(&t).unwrap().channels,
            vec!["a".to_string()]
        );
    }

    #[test]
    fn alg_none_refused() {
        let v = TokenVerifier::new("s3cret");
        // {"alg":"none","typ":"JWT"}.{"sub":"1"}.
        let t = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiIxIn0.";
        assert!(matches!(v.verify_connect(t), Err(TokenError::Invalid(_))));
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;
    use jsonwebtoken::jwk::Jwk;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Pair {
        private_pem: String,
        public_pem: String,
    }

    fn pair(alg: &'static rcgen::SignatureAlgorithm) -> Pair {
        let kp = rcgen::KeyPair::generate_for(alg).unwrap();
        Pair {
            private_pem: kp.serialize_pem(),
            public_pem: kp.public_key_pem(),
        }
    }

    fn rsa_key(p: &Pair) -> EncodingKey {
        EncodingKey::from_rsa_pem(p.private_pem.as_bytes()).unwrap()
    }

    fn ec_key(p: &Pair) -> EncodingKey {
        EncodingKey::from_ec_pem(p.private_pem.as_bytes()).unwrap()
    }

    fn sign(
        alg: Algorithm,
        key: &EncodingKey,
        kid: Option<&str>,
        claims: serde_json::Value,
    ) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, &claims, key).unwrap()
    }

    fn later() -> u64 {
        unix_now() + 600
    }

    #[test]
    fn rsa_and_ecdsa_tokens() {
        let rsa = pair(&rcgen::PKCS_RSA_SHA256);
        let p256 = pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        let v = TokenVerifier::with_keys(&TokenKeys {
            hmac_secret: "s3cret".into(),
            rsa_public_key_pem: rsa.public_pem.clone().into_bytes(),
            ecdsa_public_key_pem: p256.public_pem.clone().into_bytes(),
            ..Default::default()
        })
        .unwrap();
        for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512] {
            let t = sign(
                alg,
                &rsa_key(&rsa),
                None,
                json!({"sub": "r", "exp": later()}),
            );
            assert_eq!(v.verify_connect(&t).unwrap().sub, "r", "{alg:?}");
        }
        let t = sign(Algorithm::ES256, &ec_key(&p256), None, json!({"sub": "e"}));
        assert_eq!(v.verify_connect(&t).unwrap().sub, "e");
        // A P-256 key cannot check an ES384 signature.
        let p384 = pair(&rcgen::PKCS_ECDSA_P384_SHA384);
        let t = sign(Algorithm::ES384, &ec_key(&p384), None, json!({"sub": "e"}));
        assert!(matches!(v.verify_connect(&t), Err(TokenError::Invalid(_))));
        // Expired RSA token: 109, not 3500.
        let t = sign(
            Algorithm::RS256,
            &rsa_key(&rsa),
            None,
            json!({"sub": "r", "exp": unix_now() - 5}),
        );
        assert_eq!(v.verify_connect(&t).unwrap_err(), TokenError::Expired);
        // Another RSA key: invalid.
        let other = pair(&rcgen::PKCS_RSA_SHA256);
        let t = sign(
            Algorithm::RS256,
            &rsa_key(&other),
            None,
            json!({"sub": "r"}),
        );
        assert!(matches!(v.verify_connect(&t), Err(TokenError::Invalid(_))));
        // PS256 is not accepted, even with the right key.
        let t = sign(Algorithm::PS256, &rsa_key(&rsa), None, json!({"sub": "r"}));
        assert!(matches!(v.verify_connect(&t), Err(TokenError::Invalid(_))));
        // ES384 only with an ES384 key configured.
        let v384 = TokenVerifier::with_keys(&TokenKeys {
            ecdsa_public_key_pem: p384.public_pem.clone().into_bytes(),
            ..Default::default()
        })
        .unwrap();
        let t = sign(Algorithm::ES384, &ec_key(&p384), None, json!({"sub": "e4"}));
        assert_eq!(v384.verify_connect(&t).unwrap().sub, "e4");
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        let rsa = pair(&rcgen::PKCS_RSA_SHA256);
        // The attacker knows the public key and signs HS256 with it as the HMAC secret.
        let forged = sign_hs256(&rsa.public_pem, &json!({"sub": "admin"})).unwrap();
        let only_rsa = TokenVerifier::with_keys(&TokenKeys {
            rsa_public_key_pem: rsa.public_pem.clone().into_bytes(),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(
            only_rsa.verify_connect(&forged),
            Err(TokenError::Invalid(_))
        ));
        let both = TokenVerifier::with_keys(&TokenKeys {
            hmac_secret: "real-secret".into(),
            rsa_public_key_pem: rsa.public_pem.clone().into_bytes(),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(
            both.verify_connect(&forged),
            Err(TokenError::Invalid(_))
        ));
        // And an RS256 token is never checked against the HMAC secret.
        let hs_only = TokenVerifier::new("s3cret");
        let t = sign(Algorithm::RS256, &rsa_key(&rsa), None, json!({"sub": "x"}));
        assert!(matches!(
            hs_only.verify_connect(&t),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn audience_issuer_and_not_before() {
        let v = TokenVerifier::with_keys(&TokenKeys {
            hmac_secret: "s".into(),
            audience: "herald".into(),
            issuer: "https://auth.example.com".into(),
            ..Default::default()
        })
        .unwrap();
        let good = json!({"sub": "1", "aud": "herald", "iss": "https://auth.example.com"});
        assert!(v.verify_connect(&sign_hs256("s", &good).unwrap()).is_ok());
        let many = json!({"sub": "1", "aud": ["x", "herald"], "iss": "https://auth.example.com"});
        assert!(v.verify_connect(&sign_hs256("s", &many).unwrap()).is_ok());
        for bad in [
            json!({"sub": "1", "aud": "other", "iss": "https://auth.example.com"}),
            json!({"sub": "1", "iss": "https://auth.example.com"}),
            json!({"sub": "1", "aud": "herald", "iss": "https://evil.example.com"}),
            json!({"sub": "1", "aud": "herald"}),
        ] {
            let t = sign_hs256("s", &bad).unwrap();
            assert!(
                matches!(v.verify_connect(&t), Err(TokenError::Invalid(_))),
                "{bad}"
            );
        }
        // Without a configured audience, `aud` is not looked at.
        let plain = TokenVerifier::new("s");
        let t = sign_hs256("s", &json!({"sub": "1", "aud": "anything"})).unwrap();
        assert!(plain.verify_connect(&t).is_ok());
        // nbf in the future: expired (109), as Centrifugo answers.
        let t = sign_hs256("s", &json!({"sub": "1", "nbf": unix_now() + 300})).unwrap();
        assert_eq!(plain.verify_connect(&t).unwrap_err(), TokenError::Expired);
        let t = sign_hs256("s", &json!({"sub": "1", "nbf": unix_now() - 1})).unwrap();
        assert!(plain.verify_connect(&t).is_ok());
    }

    #[test]
    fn pem_from_text_or_file() {
        let rsa = pair(&rcgen::PKCS_RSA_SHA256);
        assert_eq!(
            pem_text_or_file("k", &rsa.public_pem).unwrap(),
            rsa.public_pem.trim().as_bytes()
        );
        let path = std::env::temp_dir().join(format!("herald-key-{}.pem", std::process::id()));
        std::fs::write(&path, &rsa.public_pem).unwrap();
        assert_eq!(
            pem_text_or_file("k", path.to_str().unwrap()).unwrap(),
            rsa.public_pem.as_bytes()
        );
        std::fs::remove_file(&path).unwrap();
        let e =
            pem_text_or_file("client.token_rsa_public_key", "/nonexistent/key.pem").unwrap_err();
        assert!(e.contains("client.token_rsa_public_key"), "{e}");
        let e = TokenVerifier::with_keys(&TokenKeys {
            rsa_public_key_pem: b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
                .to_vec(),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.contains("client.token_rsa_public_key"), "{e}");
    }

    struct FakeJwks {
        set: parking_lot::Mutex<JwkSet>,
        fetches: AtomicUsize,
    }

    impl JwksFetcher for FakeJwks {
        fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<JwkSet, String>> + Send + '_>> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let set = self.set.lock().clone();
            Box::pin(async move { Ok(set) })
        }
    }

    fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Jwk {
        let mut j = Jwk::from_encoding_key(key, alg).unwrap();
        j.common.key_id = Some(kid.to_string());
        j
    }

    #[tokio::test]
    async fn jwks_by_kid_with_refresh_on_unknown_kid() {
        let rsa1 = pair(&rcgen::PKCS_RSA_SHA256);
        let rsa2 = pair(&rcgen::PKCS_RSA_SHA256);
        let ec = pair(&rcgen::PKCS_ECDSA_P256_SHA256);
        let v = TokenVerifier::with_keys(&TokenKeys {
            jwks_url: "http://keys.test/jwks".into(),
            jwks_refresh_interval: Duration::from_secs(300),
            ..Default::default()
        })
        .unwrap();
        let fake = Arc::new(FakeJwks {
            set: parking_lot::Mutex::new(JwkSet {
                keys: vec![
                    jwk(&rsa_key(&rsa1), Algorithm::RS256, "k1"),
                    jwk(&ec_key(&ec), Algorithm::ES256, "e1"),
                ],
            }),
            fetches: AtomicUsize::new(0),
        });
        let jwks = v.jwks().unwrap().clone();
        jwks.set_fetcher(fake.clone());
        assert_eq!(jwks.refresh().await.unwrap(), 2);
        let t = sign(
            Algorithm::RS256,
            &rsa_key(&rsa1),
            Some("k1"),
            json!({"sub": "a"}),
        );
        assert_eq!(v.check_connect(&t).await.unwrap().sub, "a");
        let t = sign(
            Algorithm::ES256,
            &ec_key(&ec),
            Some("e1"),
            json!({"sub": "b"}),
        );
        assert_eq!(v.check_connect(&t).await.unwrap().sub, "b");
        // Right kid, wrong key: invalid.
        let t = sign(
            Algorithm::RS256,
            &rsa_key(&rsa2),
            Some("k1"),
            json!({"sub": "a"}),
        );
        assert!(matches!(
            v.check_connect(&t).await,
            Err(TokenError::Invalid(_))
        ));
        // The key is for RS256; an RS512 token with its kid is refused.
        let t = sign(
            Algorithm::RS512,
            &rsa_key(&rsa1),
            Some("k1"),
            json!({"sub": "a"}),
        );
        assert!(matches!(
            v.check_connect(&t).await,
            Err(TokenError::Invalid(_))
        ));
        // Rotation: k2 appears at the endpoint; a token with it refreshes the set once.
        fake.set
            .lock()
            .keys
            .push(jwk(&rsa_key(&rsa2), Algorithm::RS256, "k2"));
        let before = fake.fetches.load(Ordering::SeqCst);
        let t = sign(
            Algorithm::RS256,
            &rsa_key(&rsa2),
            Some("k2"),
            json!({"sub": "c"}),
        );
        // The last fetch was just now: a miss does not fetch again within 10s.
        assert!(matches!(
            v.check_connect(&t).await,
            Err(TokenError::Invalid(_))
        ));
        assert_eq!(fake.fetches.load(Ordering::SeqCst), before);
        *jwks.last_fetch.lock().await = Some(Instant::now() - MISS_REFRESH_INTERVAL);
        assert_eq!(v.check_connect(&t).await.unwrap().sub, "c");
        assert_eq!(fake.fetches.load(Ordering::SeqCst), before + 1);
        // Unknown kid, even after a refresh: invalid; sync checks never fetch.
        let t = sign(
            Algorithm::RS256,
            &rsa_key(&rsa2),
            Some("nope"),
            json!({"sub": "c"}),
        );
        assert!(matches!(v.verify_connect(&t), Err(TokenError::Invalid(_))));
        // A symmetric key published in the set is ignored.
        let mut oct =
            Jwk::from_encoding_key(&EncodingKey::from_secret(b"x"), Algorithm::HS256).unwrap();
        oct.common.key_id = Some("h".into());
        assert_eq!(jwks.replace(&JwkSet { keys: vec![oct] }), 0);
    }

    #[test]
    fn header_forgeries() {
        let v = TokenVerifier::new("s3cret");
        // alg "None" / "none" with and without a signature, and a header that is not JSON.
        for t in [
            "eyJhbGciOiJOb25lIn0.eyJzdWIiOiIxIn0.",
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.c2ln",
            "bm90IGpzb24.eyJzdWIiOiIxIn0.c2ln",
            "",
            "..",
            "a.b",
        ] {
            assert!(
                matches!(v.verify_connect(t), Err(TokenError::Invalid(_))),
                "{t}"
            );
        }
    }
}
