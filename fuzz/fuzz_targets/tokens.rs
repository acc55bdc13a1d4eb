//! The token parser: `TokenVerifier::verify_connect` / `verify_subscribe` with HMAC, RSA and
//! ECDSA keys and an audience and issuer configured, on arbitrary text. Must never panic and
//! never accept a token it cannot verify: every accepted token is checked again by an
//! independent oracle (the signature verified directly with the key of its algorithm).
#![no_main]

use std::sync::OnceLock;

use herald_core::auth::{TokenKeys, TokenVerifier, info_from_claims};
use libfuzzer_sys::fuzz_target;

fn verifiers() -> &'static (TokenVerifier, TokenVerifier) {
    static V: OnceLock<(TokenVerifier, TokenVerifier)> = OnceLock::new();
    V.get_or_init(|| {
        let keys = TokenKeys {
            hmac_secret: "fuzz-secret".into(),
            rsa_public_key_pem: include_bytes!("../keys/rsa.pub").to_vec(),
            ecdsa_public_key_pem: include_bytes!("../keys/ec.pub").to_vec(),
            ..Default::default()
        };
        let strict = TokenKeys {
            audience: "herald".into(),
            issuer: "fuzz".into(),
            ..keys.clone()
        };
        (
            TokenVerifier::with_keys(&keys).expect("fuzz keys load"),
            TokenVerifier::with_keys(&strict).expect("fuzz keys load"),
        )
    })
}

/// Whether the token's signature verifies with the key its header's algorithm names.
fn signature_verifies(token: &str) -> bool {
    use base64::Engine as _;
    use jsonwebtoken::{Algorithm, DecodingKey};
    let mut parts = token.rsplitn(2, '.');
    let (Some(signature), Some(message)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Some(header) = message.split('.').next() else {
        return false;
    };
    let Ok(header) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header) else {
        return false;
    };
    let Ok(header) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return false;
    };
    let alg: Algorithm = match header.get("alg").and_then(|a| a.as_str()).map(str::parse) {
        Some(Ok(a)) => a,
        _ => return false,
    };
    let key = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            DecodingKey::from_secret(b"fuzz-secret")
        }
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
            match DecodingKey::from_rsa_pem(include_bytes!("../keys/rsa.pub")) {
                Ok(k) => k,
                Err(_) => return false,
            }
        }
        Algorithm::ES256 | Algorithm::ES384 => {
            match DecodingKey::from_ec_pem(include_bytes!("../keys/ec.pub")) {
                Ok(k) => k,
                Err(_) => return false,
            }
        }
        _ => return false,
    };
    jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key, alg).unwrap_or(false)
}

fuzz_target!(|data: &[u8]| {
    let token = String::from_utf8_lossy(data);
    let (plain, strict) = verifiers();
    for v in [plain, strict] {
        if let Ok(c) = v.verify_connect(&token) {
            assert!(signature_verifies(&token), "accepted a connection token that does not verify");
            let _ = info_from_claims(c.info, c.b64info.as_deref());
        }
        if let Ok(c) = v.verify_subscribe(&token) {
            assert!(signature_verifies(&token), "accepted a subscription token that does not verify");
            let _ = info_from_claims(c.info, c.b64info.as_deref());
        }
    }
});
