//! `[engine.nats]` options.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An invalid `[engine.nats]` option, naming its key.
#[derive(Debug, thiserror::Error)]
#[error("engine.nats.{key}: {message}")]
pub struct ConfigError {
    pub key: &'static str,
    pub message: String,
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// NATS server addresses (`nats://` or `tls://`); the client fails over between them.
    /// Default: ["nats://127.0.0.1:4222"].
    pub servers: Vec<String>,
    /// Prefix of every subject, stream and consumer name, so several Herald clusters can share
    /// one NATS. Letters, digits, `_` and `-` only. Default: "herald".
    pub prefix: String,
    /// Copies of each JetStream stream: 1 (one server) or 3 (a publication is acknowledged
    /// once a quorum of a 3-server NATS cluster stored it). Default: 1.
    pub replicas: usize,
    /// Authentication token. Default: none.
    pub token: Option<String>,
    /// User name (with `password`). Default: none.
    pub user: Option<String>,
    /// Password (with `user`). Default: none.
    pub password: Option<String>,
    /// Path to a `.creds` file (JWT + NKey seed). Default: none.
    pub creds_file: Option<PathBuf>,
    /// PEM file of CA certificates to verify the servers with; turns TLS on. Default: none.
    pub tls_ca_file: Option<PathBuf>,
    /// Timeout of connecting to a server. Default: "3s".
    #[serde(with = "herald_core::duration")]
    pub connect_timeout: Duration,
    /// Timeout of one JetStream request or publish acknowledgement. Default: "3s".
    #[serde(with = "herald_core::duration")]
    pub request_timeout: Duration,
    /// Publications kept per channel at most in the history stream, whatever a namespace's
    /// `history_size` (storage bound). Default: 1000.
    pub max_history_per_channel: i64,
    /// Age after which the history stream drops a message whatever its namespace says
    /// (storage bound; "0s": never). Default: "720h".
    #[serde(with = "herald_core::duration")]
    pub stream_max_age: Duration,
    /// How long a presence entry lives unless its node refreshes it (a dead node's clients
    /// vanish after this). Default: "60s".
    #[serde(with = "herald_core::duration")]
    pub presence_ttl: Duration,
    /// How often a node announces itself. Default: "2s".
    #[serde(with = "herald_core::duration")]
    pub node_heartbeat: Duration,
    /// A node silent for longer than this is dropped from `info`. Default: "10s".
    #[serde(with = "herald_core::duration")]
    pub node_eviction: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            prefix: "herald".into(),
            replicas: 1,
            token: None,
            user: None,
            password: None,
            creds_file: None,
            tls_ca_file: None,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(3),
            max_history_per_channel: 1000,
            stream_max_age: Duration::from_secs(720 * 3600),
            presence_ttl: Duration::from_secs(60),
            node_heartbeat: Duration::from_secs(2),
            node_eviction: Duration::from_secs(10),
        }
    }
}

impl NatsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.servers.is_empty() {
            return Err(invalid("servers", "no address given"));
        }
        for s in &self.servers {
            if !(s.starts_with("nats://") || s.starts_with("tls://")) {
                return Err(invalid(
                    "servers",
                    format!("{s:?} must start with nats:// or tls://"),
                ));
            }
        }
        if self.prefix.is_empty()
            || !self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(invalid(
                "prefix",
                "must be non-empty: letters, digits, '_' and '-' only",
            ));
        }
        if self.replicas != 1 && self.replicas != 3 {
            return Err(invalid("replicas", "must be 1 or 3"));
        }
        if self.token.is_some() && (self.user.is_some() || self.creds_file.is_some()) {
            return Err(invalid(
                "token",
                "cannot be combined with user or creds_file",
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(invalid("user", "user and password go together"));
        }
        if self.user.is_some() && self.creds_file.is_some() {
            return Err(invalid("creds_file", "cannot be combined with user"));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid("connect_timeout", "must be positive"));
        }
        if self.request_timeout.is_zero() {
            return Err(invalid("request_timeout", "must be positive"));
        }
        if self.max_history_per_channel < 1 {
            return Err(invalid("max_history_per_channel", "must be at least 1"));
        }
        if self.node_eviction <= self.node_heartbeat {
            return Err(invalid(
                "node_eviction",
                "must be longer than node_heartbeat",
            ));
        }
        if self.presence_ttl < Duration::from_secs(1) {
            return Err(invalid("presence_ttl", "must be at least 1s"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_key() {
        assert!(NatsConfig::default().validate().is_ok());
        let bad = |f: fn(&mut NatsConfig)| {
            let mut c = NatsConfig::default();
            f(&mut c);
            c.validate().map_err(|e| e.to_string()).err()
        };
        let e = bad(|c| c.servers = vec!["redis://x".into()]).unwrap_or_default();
        assert!(e.starts_with("engine.nats.servers:"), "{e}");
        let e = bad(|c| c.replicas = 2).unwrap_or_default();
        assert!(e.starts_with("engine.nats.replicas:"), "{e}");
        let e = bad(|c| c.prefix = "a.b".into()).unwrap_or_default();
        assert!(e.starts_with("engine.nats.prefix:"), "{e}");
        let e = bad(|c| c.user = Some("u".into())).unwrap_or_default();
        assert!(e.starts_with("engine.nats.user:"), "{e}");
        assert!(bad(|c| c.servers.clear()).is_some());
        assert!(bad(|c| c.node_eviction = c.node_heartbeat).is_some());
    }
}
