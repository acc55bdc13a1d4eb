//! `[engine.nats]` is read and validated at start: defaults, and errors naming the key.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use herald_server::config::{Config, EngineKind};

fn with_engine(engine: &str) -> String {
    common::config_on(&format!("{engine}\n"))
}

#[test]
fn defaults_and_values() {
    let c = Config::from_toml(&with_engine("[engine]\ntype = \"nats\"")).unwrap();
    assert_eq!(c.engine.kind, EngineKind::Nats);
    let n = &c.engine.nats;
    assert_eq!(n.servers, vec!["nats://127.0.0.1:4222".to_string()]);
    assert_eq!((n.prefix.as_str(), n.replicas), ("herald", 1));
    assert_eq!(n.request_timeout, std::time::Duration::from_secs(3));
    let c = Config::from_toml(&with_engine(
        "[engine]\ntype = \"nats\"\n[engine.nats]\nservers = [\"nats://a:4222\", \"tls://b:4222\"]\nreplicas = 3\nprefix = \"p-1\"\nuser = \"u\"\npassword = \"pw\"",
    ))
    .unwrap();
    assert_eq!(c.engine.nats.servers.len(), 2);
    assert_eq!(c.engine.nats.replicas, 3);
}

#[test]
fn invalid_values_name_the_key() {
    for (toml, key) in [
        ("replicas = 2", "engine.nats.replicas"),
        ("servers = []", "engine.nats.servers"),
        ("servers = [\"redis://x:1\"]", "engine.nats.servers"),
        ("prefix = \"a.b\"", "engine.nats.prefix"),
        ("user = \"u\"", "engine.nats.user"),
        (
            "token = \"t\"\nuser = \"u\"\npassword = \"p\"",
            "engine.nats.token",
        ),
        ("request_timeout = \"0s\"", "engine.nats.request_timeout"),
        ("node_eviction = \"1s\"", "engine.nats.node_eviction"),
    ] {
        let err = Config::from_toml(&with_engine(&format!(
            "[engine]\ntype = \"nats\"\n[engine.nats]\n{toml}"
        )))
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains(key), "{toml}: {err}");
    }
    // Not checked unless the engine is NATS.
    assert!(
        Config::from_toml(&with_engine("[engine.nats]\nreplicas = 2")).is_ok(),
        "memory engine with an unused nats table"
    );
}
