//! Who may do what, through a real client over a real socket: connection tokens (HMAC, RSA,
//! ECDSA, JWKS by `kid`, audience, issuer, not-before, forgeries), subscription tokens and
//! their expiry, connection expiry, user-limited channels, namespace permissions, the per-user
//! connection limit and the command rate limit. Each refusal gets the code docs/protocol.md
//! and docs/security.md document.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use herald_core::auth::unix_now;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// A generated key pair: the private key signs test tokens, the public PEM goes in the config.
struct KeyPair {
    private: EncodingKey,
    public_pem: String,
}

fn rsa() -> KeyPair {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    KeyPair {
        private: EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes()).unwrap(),
        public_pem: kp.public_key_pem(),
    }
}

fn ecdsa(alg: &'static rcgen::SignatureAlgorithm) -> KeyPair {
    let kp = rcgen::KeyPair::generate_for(alg).unwrap();
    KeyPair {
        private: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        public_pem: kp.public_key_pem(),
    }
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

async fn expect_close(s: &herald_server::Server, token: &str, code: u16) {
    match Client::try_connect(s, token).await {
        Err(got) => assert_eq!(got, code, "token {token}"),
        Ok((_, r)) => panic!("expected close {code}, got reply {r}"),
    }
}

async fn expect_error(s: &herald_server::Server, token: &str, code: u64) {
    match Client::try_connect(s, token).await {
        Ok((_, r)) => assert_eq!(r["error"]["code"], code, "reply {r}"),
        Err(got) => panic!("expected error {code}, got close {got}"),
    }
}

async fn expect_user(s: &herald_server::Server, token: &str, user: &str) {
    match Client::try_connect(s, token).await {
        Ok((_, r)) => assert!(r.get("connect").is_some(), "{user}: {r}"),
        Err(got) => panic!("{user}: refused with {got}"),
    }
}

#[tokio::test]
async fn rsa_and_ecdsa_connection_tokens() {
    let rsa = rsa();
    let ec = ecdsa(&rcgen::PKCS_ECDSA_P256_SHA256);
    // The RSA key as PEM text, the ECDSA key as a file path: both forms are accepted.
    let dir = std::env::temp_dir().join(format!("herald-ent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ec_path = dir.join("ec.pem");
    std::fs::write(&ec_path, &ec.public_pem).unwrap();
    let s = start(&format!(
        "token_rsa_public_key = {}\ntoken_ecdsa_public_key = {}",
        toml_str(&rsa.public_pem),
        toml_str(ec_path.to_str().unwrap())
    ))
    .await;
    let exp = unix_now() + 600;
    for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512] {
        expect_user(
            &s,
            &sign(alg, &rsa.private, None, json!({"sub": "r", "exp": exp})),
            "r",
        )
        .await;
    }
    expect_user(
        &s,
        &sign(Algorithm::ES256, &ec.private, None, json!({"sub": "e"})),
        "e",
    )
    .await;
    // HMAC tokens keep working next to them.
    expect_user(&s, &token("h", 60), "h").await;
    // Expired RS256: 109 (the SDK asks for a new token), not a disconnect.
    let t = sign(
        Algorithm::RS256,
        &rsa.private,
        None,
        json!({"sub": "r", "exp": unix_now() - 10}),
    );
    expect_error(&s, &t, 109).await;
    // Signed by another RSA key: 3500.
    let t = sign(
        Algorithm::RS256,
        &self::rsa().private,
        None,
        json!({"sub": "r"}),
    );
    expect_close(&s, &t, 3500).await;
    // ES384 with a P-384 key while a P-256 key is configured: 3500.
    let p384 = ecdsa(&rcgen::PKCS_ECDSA_P384_SHA384);
    let t = sign(Algorithm::ES384, &p384.private, None, json!({"sub": "e"}));
    expect_close(&s, &t, 3500).await;
    // PS256 is not an accepted algorithm, even with the right key.
    let t = sign(Algorithm::PS256, &rsa.private, None, json!({"sub": "r"}));
    expect_close(&s, &t, 3500).await;
    s.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn forged_tokens_are_refused_with_3500() {
    let rsa = rsa();
    let s = start(&format!(
        "token_rsa_public_key = {}",
        toml_str(&rsa.public_pem)
    ))
    .await;
    // alg "none": header {"alg":"none"}, no signature.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhZG1pbiJ9.";
    expect_close(&s, none, 3500).await;
    // Algorithm confusion: HS256 "signed" with the RSA public key as the HMAC secret.
    let forged = herald_core::auth::sign_hs256(&rsa.public_pem, &json!({"sub": "admin"})).unwrap();
    expect_close(&s, &forged, 3500).await;
    // Wrong HMAC secret, garbage, a tampered payload.
    let other = herald_core::auth::sign_hs256("not-the-secret", &json!({"sub": "admin"})).unwrap();
    expect_close(&s, &other, 3500).await;
    expect_close(&s, "not.a.jwt", 3500).await;
    let good = token("alice", 60);
    let mut parts: Vec<&str> = good.split('.').collect();
    let admin = "eyJzdWIiOiJhZG1pbiJ9"; // {"sub":"admin"}
    parts[1] = admin;
    expect_close(&s, &parts.join("."), 3500).await;
    // No token without anonymous access: 101.
    expect_error(&s, "", 101).await;
    s.shutdown().await;
}

#[tokio::test]
async fn audience_issuer_and_not_before() {
    let s = start("token_audience = \"herald\"\ntoken_issuer = \"https://auth.example.com\"").await;
    let ok = json!({"sub": "a", "aud": "herald", "iss": "https://auth.example.com"});
    expect_user(&s, &token_with(ok, 60), "a").await;
    for bad in [
        json!({"sub": "a", "aud": "other", "iss": "https://auth.example.com"}),
        json!({"sub": "a", "iss": "https://auth.example.com"}),
        json!({"sub": "a", "aud": "herald", "iss": "https://evil.example.com"}),
        json!({"sub": "a", "aud": "herald"}),
    ] {
        expect_close(&s, &token_with(bad, 60), 3500).await;
    }
    // Not valid yet: 109, as an expired token (Centrifugo answers the same).
    let t = token_with(
        json!({"sub": "a", "aud": "herald", "iss": "https://auth.example.com", "nbf": unix_now() + 600}),
        60,
    );
    expect_error(&s, &t, 109).await;
    s.shutdown().await;
}

/// A JWKS document served over HTTP on 127.0.0.1, counting fetches.
struct JwksServer {
    url: String,
    set: Arc<parking_lot::Mutex<JwkSet>>,
    hits: Arc<AtomicUsize>,
}

async fn jwks_server(keys: Vec<Jwk>) -> JwksServer {
    let set = Arc::new(parking_lot::Mutex::new(JwkSet { keys }));
    let hits = Arc::new(AtomicUsize::new(0));
    let (s2, h2) = (set.clone(), hits.clone());
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let (set, hits) = (s2.clone(), h2.clone());
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                axum::Json(serde_json::to_value(&*set.lock()).unwrap())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    JwksServer {
        url: format!("http://{addr}/.well-known/jwks.json"),
        set,
        hits,
    }
}

fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Jwk {
    let mut j = Jwk::from_encoding_key(key, alg).unwrap();
    j.common.key_id = Some(kid.to_string());
    j
}

#[tokio::test]
async fn jwks_keys_by_kid_refreshed_in_the_background() {
    let k1 = rsa();
    let k2 = rsa();
    let e1 = ecdsa(&rcgen::PKCS_ECDSA_P256_SHA256);
    let keys = jwks_server(vec![
        jwk(&k1.private, Algorithm::RS256, "k1"),
        jwk(&e1.private, Algorithm::ES256, "e1"),
    ])
    .await;
    let s = start(&format!(
        "token_jwks_public_endpoint = {}\ntoken_jwks_refresh_interval = \"1s\"",
        toml_str(&keys.url)
    ))
    .await;
    assert!(keys.hits.load(Ordering::SeqCst) >= 1, "fetched at start");
    let t = sign(
        Algorithm::RS256,
        &k1.private,
        Some("k1"),
        json!({"sub": "j1"}),
    );
    expect_user(&s, &t, "j1").await;
    let t = sign(
        Algorithm::ES256,
        &e1.private,
        Some("e1"),
        json!({"sub": "j2"}),
    );
    expect_user(&s, &t, "j2").await;
    // The right kid with another key, and an unknown kid: 3500.
    let t = sign(
        Algorithm::RS256,
        &k2.private,
        Some("k1"),
        json!({"sub": "x"}),
    );
    expect_close(&s, &t, 3500).await;
    let t = sign(
        Algorithm::RS256,
        &k2.private,
        Some("k2"),
        json!({"sub": "x"}),
    );
    expect_close(&s, &t, 3500).await;
    // Rotation: k2 is published; the background refresh picks it up.
    keys.set
        .lock()
        .keys
        .push(jwk(&k2.private, Algorithm::RS256, "k2"));
    let t = sign(
        Algorithm::RS256,
        &k2.private,
        Some("k2"),
        json!({"sub": "j3"}),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Client::try_connect(&s, &t).await {
            Ok((_, r)) if r.get("connect").is_some() => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "k2 never accepted: {:?}",
                    other.map(|x| x.1)
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    // Subscription tokens are checked with the same keys.
    let (mut c, _) = Client::try_connect(
        &s,
        &sign(
            Algorithm::RS256,
            &k1.private,
            Some("k1"),
            json!({"sub": "j4"}),
        ),
    )
    .await
    .unwrap();
    let st = sign(
        Algorithm::RS256,
        &k2.private,
        Some("k2"),
        json!({"sub": "j4", "channel": "$secret"}),
    );
    let r = c
        .call(2, "subscribe", json!({"channel": "$secret", "token": st}))
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some(), "{r}");
    s.shutdown().await;
}

#[tokio::test]
async fn private_channels_need_a_matching_subscription_token() {
    let s = start_with(&format!(
        "{}\n[[namespaces]]\nname = \"gated\"\nallow_subscribe_for_client = true\nrequire_subscription_token = true\n",
        config("")
    ))
    .await;
    let (mut c, _) = Client::connect(&s, "alice").await.unwrap();
    let sub_token =
        |user: &str, ch: &str, ttl: i64| token_with(json!({"sub": user, "channel": ch}), ttl);
    // No token: 103.
    let r = c
        .call(2, "subscribe", json!({"channel": "$room"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103);
    let r = c
        .call(3, "subscribe", json!({"channel": "gated:x"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103);
    // A valid token for this user and channel.
    let r = c
        .call(
            4,
            "subscribe",
            json!({"channel": "$room", "token": sub_token("alice", "$room", 60)}),
        )
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some(), "{r}");
    let r = c
        .call(
            5,
            "subscribe",
            json!({"channel": "gated:x", "token": sub_token("alice", "gated:x", 60)}),
        )
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some(), "{r}");
    // An expired subscription token: 109.
    let r = c
        .call(
            6,
            "subscribe",
            json!({"channel": "$other", "token": sub_token("alice", "$other", -10)}),
        )
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 109);
    // A forged or malformed subscription token refuses that subscription only: 103, and
    // the connection goes on.
    let forged =
        herald_core::auth::sign_hs256("wrong", &json!({"sub": "alice", "channel": "$room"}))
            .unwrap();
    for (id, bad) in [(7, forged.as_str()), (8, "not.a.jwt")] {
        let r = c
            .call(id, "subscribe", json!({"channel": "$forged", "token": bad}))
            .await
            .unwrap();
        assert_eq!(r["error"]["code"], 103, "{r}");
    }
    let r = c
        .call(9, "presence_stats", json!({"channel": "$room"}))
        .await
        .unwrap();
    assert!(
        r.get("presence_stats").is_some() || r.get("error").is_some(),
        "{r}"
    );
    // Someone else's token, or a token for another channel: 3500.
    let (mut b, _) = Client::connect(&s, "bob").await.unwrap();
    b.send(json!({"id": 2, "subscribe": {"channel": "$room", "token": sub_token("alice", "$room", 60)}}))
        .await
        .unwrap();
    assert_eq!(b.closed().await.unwrap().0, 3500);
    let (mut b, _) = Client::connect(&s, "bob").await.unwrap();
    b.send(json!({"id": 2, "subscribe": {"channel": "$room", "token": sub_token("bob", "$elsewhere", 60)}}))
        .await
        .unwrap();
    assert_eq!(b.closed().await.unwrap().0, 3500);
    s.shutdown().await;
}

#[tokio::test]
async fn subscription_expiry_and_sub_refresh() {
    let s = start("").await;
    let (mut c, _) = Client::connect(&s, "alice").await.unwrap();
    let now = unix_now();
    let short = |ch: &str, at: u64| {
        herald_core::auth::sign_hs256(SECRET, &json!({"sub": "alice", "channel": ch, "exp": at}))
            .unwrap()
    };
    for (id, ch) in [(2, "$keep"), (3, "$lapse")] {
        let r = c
            .call(
                id,
                "subscribe",
                json!({"channel": ch, "token": short(ch, now + 2)}),
            )
            .await
            .unwrap();
        assert_eq!(r["subscribe"]["expires"], true, "{r}");
        assert!(r["subscribe"]["ttl"].as_u64().unwrap() <= 2);
    }
    // Refresh one before it expires.
    let r = c
        .call(
            4,
            "sub_refresh",
            json!({"channel": "$keep", "token": short("$keep", now + 600)}),
        )
        .await
        .unwrap();
    assert_eq!(r["sub_refresh"]["expires"], true, "{r}");
    assert!(r["sub_refresh"]["ttl"].as_u64().unwrap() > 500);
    // The other is unsubscribed with 2501 (the SDK resubscribes with a fresh token).
    let push = loop {
        let v = c.next().await.unwrap();
        if v["push"].get("unsubscribe").is_some() {
            break v;
        }
    };
    assert_eq!(push["push"]["channel"], "$lapse");
    assert_eq!(push["push"]["unsubscribe"]["code"], 2501);
    // The refreshed one still delivers.
    publish(&s, "$keep", json!("kept")).await.unwrap();
    assert_eq!(c.publication("$keep").await.unwrap()["data"], "kept");
    // sub_refresh of a channel the client is not in: 103; a forged token: 103, connection stays.
    let r = c
        .call(
            5,
            "sub_refresh",
            json!({"channel": "$nope", "token": short("$nope", now + 60)}),
        )
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103);
    let r = c
        .call(
            6,
            "sub_refresh",
            json!({"channel": "$keep", "token": "forged"}),
        )
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103, "{r}");
    publish(&s, "$keep", json!("still")).await.unwrap();
    assert_eq!(c.publication("$keep").await.unwrap()["data"], "still");
    s.shutdown().await;
}

#[tokio::test]
async fn connection_expiry_refresh_and_3005() {
    let s = start("expired_close_delay = \"0s\"").await;
    // Expires in 2s and never refreshed: 3005.
    let (mut lapsing, r) = Client::try_connect(&s, &token("u", 2)).await.unwrap();
    assert_eq!(r["connect"]["expires"], true, "{r}");
    // Expires in 2s and refreshed in time: stays.
    let (mut kept, _) = Client::try_connect(&s, &token("u", 2)).await.unwrap();
    let r = kept
        .call(2, "refresh", json!({"token": token("u", 600)}))
        .await
        .unwrap();
    assert_eq!(r["refresh"]["expires"], true, "{r}");
    assert!(r["refresh"]["ttl"].as_u64().unwrap() > 500);
    assert_eq!(lapsing.closed().await.unwrap().0, 3005);
    kept.call(3, "subscribe", json!({"channel": "still"}))
        .await
        .unwrap();
    // Refresh with an expired token: 109; with another user's token: 3500.
    let r = kept
        .call(4, "refresh", json!({"token": token("u", -10)}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 109);
    kept.send(json!({"id": 5, "refresh": {"token": token("mallory", 600)}}))
        .await
        .unwrap();
    assert_eq!(kept.closed().await.unwrap().0, 3500);
    s.shutdown().await;
}

#[tokio::test]
async fn user_limited_and_personal_channels() {
    let s = start_with(&format!(
        "{}\n[[namespaces]]\nname = \"personal\"\nallow_subscribe_for_client = true\n",
        config("allow_anonymous = true")
    ))
    .await;
    let (mut a, _) = Client::connect(&s, "42").await.unwrap();
    let (mut b, _) = Client::connect(&s, "43").await.unwrap();
    let (mut m, _) = Client::connect(&s, "44").await.unwrap();
    for (c, ok) in [(&mut a, true), (&mut b, true), (&mut m, false)] {
        let r = c
            .call(2, "subscribe", json!({"channel": "dialog#42,43"}))
            .await
            .unwrap();
        if ok {
            assert!(r.get("subscribe").is_some(), "{r}");
        } else {
            assert_eq!(r["error"]["code"], 103, "{r}");
        }
    }
    let r = a
        .call(3, "subscribe", json!({"channel": "personal:#42"}))
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some(), "{r}");
    let r = b
        .call(3, "subscribe", json!({"channel": "personal:#42"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103);
    // Anonymous never matches a user list.
    let mut anon = Client::open(&s).await.unwrap();
    anon.send(json!({"id": 1, "connect": {}})).await.unwrap();
    assert!(anon.reply(1).await.unwrap().get("connect").is_some());
    let r = anon
        .call(2, "subscribe", json!({"channel": "personal:#42"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103);
    // What 42 and 43 say in their dialog reaches them, not 44.
    publish(&s, "dialog#42,43", json!("hi")).await.unwrap();
    assert_eq!(a.publication("dialog#42,43").await.unwrap()["data"], "hi");
    assert_eq!(b.publication("dialog#42,43").await.unwrap()["data"], "hi");
    s.shutdown().await;
}

/// The permission table of docs/security.md, one namespace per rule.
fn permissions_config() -> String {
    let mut t = String::from(
        r#"
[server]
listen = "127.0.0.1:0"
[client]
token_hmac_secret = "test-secret"
allow_anonymous = true
[api]
key = "test-api-key"
[shutdown]
drain_duration = "0s"
"#,
    );
    let ns = |name: &str, extra: &str| {
        format!(
            "[[namespaces]]\nname = \"{name}\"\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\nhistory_size = 10\nhistory_ttl = \"1m\"\npresence = true\n{extra}\n"
        )
    };
    t.push_str(&ns("", ""));
    t.push_str(&ns("sub", "allow_publish_for_subscriber = true\nallow_history_for_subscriber = true\nallow_presence_for_subscriber = true"));
    t.push_str(&ns("cli", "allow_publish_for_client = true\nallow_history_for_client = true\nallow_presence_for_client = true"));
    t.push_str(&ns("anon", "allow_publish_for_client = true\nallow_publish_for_anonymous = true\nallow_history_for_client = true\nallow_history_for_anonymous = true\nallow_presence_for_client = true\nallow_presence_for_anonymous = true"));
    t.push_str(&ns("subanon", "allow_publish_for_subscriber = true\nallow_publish_for_anonymous = true\nallow_history_for_subscriber = true\nallow_history_for_anonymous = true\nallow_presence_for_subscriber = true\nallow_presence_for_anonymous = true"));
    t.push_str("[[namespaces]]\nname = \"closed\"\nhistory_size = 10\nhistory_ttl = \"1m\"\npresence = true\n");
    t.push_str("[[namespaces]]\nname = \"bare\"\nallow_subscribe_for_client = true\nallow_history_for_client = true\nallow_presence_for_client = true\n");
    t
}

/// A namespace and the outcomes for: user not subscribed, user subscribed, anonymous not
/// subscribed, anonymous subscribed.
type Row = (&'static str, [u64; 3], [u64; 3], [u64; 3], [u64; 3]);

/// Calls publish, history and presence on `ch`; returns each outcome: 0 for success, else the
/// error code.
async fn outcomes(c: &mut Client, id: &mut u64, ch: &str) -> [u64; 3] {
    let mut out = [0; 3];
    let calls = [
        ("publish", json!({"channel": ch, "data": {"x": 1}})),
        ("history", json!({"channel": ch, "limit": 1})),
        ("presence", json!({"channel": ch})),
    ];
    for (i, (method, params)) in calls.into_iter().enumerate() {
        *id += 1;
        let r = c.call(*id, method, params).await.unwrap();
        out[i] = r["error"]["code"].as_u64().unwrap_or(0);
    }
    out
}

#[tokio::test]
async fn namespace_permissions_for_subscriber_client_and_anonymous() {
    let s = start_with(&permissions_config()).await;
    let (mut user, _) = Client::connect(&s, "u").await.unwrap();
    let mut anon = Client::open(&s).await.unwrap();
    anon.send(json!({"id": 1, "connect": {}})).await.unwrap();
    assert!(anon.reply(1).await.unwrap().get("connect").is_some());
    let mut id = 100;
    // (namespace, user not subscribed, user subscribed, anonymous not subscribed,
    //  anonymous subscribed); each [publish, history, presence].
    let table: [Row; 6] = [
        ("closed", [103; 3], [103; 3], [103; 3], [103; 3]),
        ("room", [103; 3], [103; 3], [103; 3], [103; 3]),
        ("sub", [103; 3], [0; 3], [103; 3], [103; 3]),
        ("cli", [0; 3], [0; 3], [103; 3], [103; 3]),
        ("anon", [0; 3], [0; 3], [0; 3], [0; 3]),
        ("subanon", [103; 3], [0; 3], [103; 3], [0; 3]),
    ];
    for (ns, user_out, user_sub, anon_out, anon_sub) in table {
        let ch = if ns == "room" {
            "room".to_string()
        } else {
            format!("{ns}:c")
        };
        assert_eq!(
            outcomes(&mut user, &mut id, &ch).await,
            user_out,
            "user, not subscribed, {ch}"
        );
        assert_eq!(
            outcomes(&mut anon, &mut id, &ch).await,
            anon_out,
            "anonymous, not subscribed, {ch}"
        );
        if ns == "closed" {
            // Nobody may subscribe to it.
            id += 1;
            let r = user
                .call(id, "subscribe", json!({"channel": ch}))
                .await
                .unwrap();
            assert_eq!(r["error"]["code"], 103);
            id += 1;
            let r = anon
                .call(id, "subscribe", json!({"channel": ch}))
                .await
                .unwrap();
            assert_eq!(r["error"]["code"], 103);
            continue;
        }
        for c in [&mut user, &mut anon] {
            id += 1;
            let r = c
                .call(id, "subscribe", json!({"channel": ch}))
                .await
                .unwrap();
            assert!(r.get("subscribe").is_some(), "{ch}: {r}");
        }
        assert_eq!(
            outcomes(&mut user, &mut id, &ch).await,
            user_sub,
            "user, subscribed, {ch}"
        );
        assert_eq!(
            outcomes(&mut anon, &mut id, &ch).await,
            anon_sub,
            "anonymous, subscribed, {ch}"
        );
    }
    // History and presence where the namespace keeps none: 108. Unknown namespace: 102.
    id += 1;
    let r = user
        .call(id, "history", json!({"channel": "bare:c"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 108);
    id += 1;
    let r = user
        .call(id, "presence", json!({"channel": "bare:c"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 108);
    id += 1;
    let r = user
        .call(id, "subscribe", json!({"channel": "nowhere:c"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 102);
    id += 1;
    let r = user
        .call(id, "publish", json!({"channel": "nowhere:c", "data": 1}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 102);
    s.shutdown().await;
}

#[tokio::test]
async fn anonymous_subscribe_needs_its_own_permission() {
    let s = start_with(&format!(
        "{}\n[[namespaces]]\nname = \"open\"\nallow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\n",
        config("allow_anonymous = true")
    ))
    .await;
    let mut anon = Client::open(&s).await.unwrap();
    anon.send(json!({"id": 1, "connect": {}})).await.unwrap();
    assert!(anon.reply(1).await.unwrap().get("connect").is_some());
    // "" allows clients only; "open" allows anonymous too.
    let r = anon
        .call(2, "subscribe", json!({"channel": "room"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103);
    let r = anon
        .call(3, "subscribe", json!({"channel": "open:x"}))
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some(), "{r}");
    // A token with an empty `sub` is anonymous and needs allow_anonymous.
    s.shutdown().await;
    let s = start("").await;
    let t = token_with(json!({"sub": ""}), 60);
    expect_close(&s, &t, 3500).await;
    s.shutdown().await;
}

#[tokio::test]
async fn user_connection_limit_is_3504() {
    let s = start("user_connection_limit = 2\nallow_anonymous = true").await;
    let (_a, _) = Client::connect(&s, "greedy").await.unwrap();
    let (_b, _) = Client::connect(&s, "greedy").await.unwrap();
    assert_eq!(
        Client::try_connect(&s, &token("greedy", 60)).await.err(),
        Some(3504)
    );
    // Other users, and anonymous connections, are not limited by greedy's count.
    let (_o, _) = Client::connect(&s, "other").await.unwrap();
    for _ in 0..3 {
        let mut anon = Client::open(&s).await.unwrap();
        anon.send(json!({"id": 1, "connect": {}})).await.unwrap();
        assert!(anon.reply(1).await.unwrap().get("connect").is_some());
    }
    // When one of greedy's connections goes, greedy may connect again.
    drop(_a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Client::try_connect(&s, &token("greedy", 60)).await {
            Ok(_) => break,
            Err(code) => {
                assert_eq!(code, 3504);
                assert!(tokio::time::Instant::now() < deadline, "slot never freed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn command_rate_limit_is_111_then_3013() {
    let s = start("command_rate = 5\ncommand_burst = 5").await;
    let (mut c, _) = Client::connect(&s, "chatty").await.unwrap();
    c.call(2, "subscribe", json!({"channel": "room"}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    // A client within the rate is never refused.
    for id in 3..6 {
        let r = c
            .call(id, "presence_stats", json!({"channel": "room"}))
            .await
            .unwrap();
        assert!(r.get("error").is_none(), "{r}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A burst far above it: some pass, then 111 (temporary), then the connection is closed.
    let frame: Vec<String> = (0..40)
        .map(|i| json!({"id": 100 + i, "presence_stats": {"channel": "room"}}).to_string())
        .collect();
    c.send_text(frame.join("\n")).await.unwrap();
    let (mut ok, mut limited) = (0, 0);
    let code = loop {
        match c.next().await {
            Ok(v) if v["error"]["code"] == 111 => {
                assert_eq!(v["error"]["temporary"], true, "{v}");
                limited += 1;
            }
            Ok(v) if v.get("presence_stats").is_some() => ok += 1,
            Ok(v) => panic!("unexpected {v}"),
            Err(_) => break c.close.clone().unwrap().0,
        }
    };
    assert_eq!(code, 3013);
    assert!(ok >= 1 && limited >= 1, "ok {ok}, limited {limited}");
    assert!(ok + limited < 40, "closed before the burst ended");
    // Other clients are not affected.
    let (mut d, _) = Client::connect(&s, "calm").await.unwrap();
    d.call(2, "subscribe", json!({"channel": "room"}))
        .await
        .unwrap();
    let r = d
        .call(3, "presence_stats", json!({"channel": "room"}))
        .await
        .unwrap();
    assert!(r.get("presence_stats").is_some(), "{r}");
    s.shutdown().await;
}
