//! The token parser: `TokenVerifier::verify_connect` / `verify_subscribe` with HMAC, RSA and
//! ECDSA keys and an audience and issuer configured, on arbitrary text. Must never panic and
//! never accept a token it cannot verify.
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

fuzz_target!(|data: &[u8]| {
    let token = String::from_utf8_lossy(data);
    let (plain, strict) = verifiers();
    for v in [plain, strict] {
        if let Ok(c) = v.verify_connect(&token) {
            let _ = info_from_claims(c.info, c.b64info.as_deref());
        }
        if let Ok(c) = v.verify_subscribe(&token) {
            let _ = info_from_claims(c.info, c.b64info.as_deref());
        }
    }
});
