//! Connection and subscription tokens (JWT).

use std::collections::BTreeMap;
use std::collections::HashSet;

use base64::Engine as _;
use herald_protocol::json::Raw;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

/// Why a token was refused. `Expired` maps to error 109 (the SDK fetches a new token);
/// `Invalid` to disconnect 3500 (connection) or error 103 (subscription).
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

/// Checks tokens against the configured keys.
pub struct TokenVerifier {
    hmac: Option<DecodingKey>,
    validation: Validation,
}

impl TokenVerifier {
    pub fn new(hmac_secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
        // Tokens without `exp` never expire, as in Centrifugo; `exp` is checked when present.
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = 0;
        Self {
            hmac: (!hmac_secret.is_empty())
                .then(|| DecodingKey::from_secret(hmac_secret.as_bytes())),
            validation,
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, TokenError> {
        let key = self
            .hmac
            .as_ref()
            .ok_or_else(|| TokenError::Invalid("no token key configured".into()))?;
        match jsonwebtoken::decode::<T>(token, key, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => match e.kind() {
                ErrorKind::ExpiredSignature => Err(TokenError::Expired),
                _ => Err(TokenError::Invalid(e.to_string())),
            },
        }
    }

    pub fn verify_connect(&self, token: &str) -> Result<ConnectClaims, TokenError> {
        self.decode(token)
    }

    pub fn verify_subscribe(&self, token: &str) -> Result<SubscribeClaims, TokenError> {
        self.decode(token)
    }
}

/// Decodes `b64info` into raw JSON info; `info` wins when both are set.
pub fn info_from_claims(
    info: Option<Raw>,
    b64info: Option<&str>,
) -> Result<Option<Raw>, TokenError> {
    if info.is_some() {
        return Ok(info);
    }
    let Some(b64) = b64info else { return Ok(None) };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| TokenError::Invalid("b64info is not base64".into()))?;
    let text =
        String::from_utf8(bytes).map_err(|_| TokenError::Invalid("b64info is not UTF-8".into()))?;
    herald_protocol::json::raw_from_str(&text)
        .map(Some)
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
