//! Configuration: TOML file → `HERALD_SECTION__KEY` environment → command-line flags.
//! Unknown keys and bad values are refused at start, naming the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use herald_core::options::{ClientOptions, NamespaceOptions};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub client: ClientOptions,
    pub api: ApiConfig,
    pub engine: EngineConfig,
    pub log: LogConfig,
    pub namespaces: Vec<NamespaceOptions>,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address for client transports, the server API and health. Default: "127.0.0.1:8000".
    pub listen: String,
    /// Node name shown by `info`. Default: "" (derived from the node id).
    pub name: String,
    /// How long a stopping node waits for its connections to close. Default: "10s".
    #[serde(with = "herald_core::duration")]
    pub shutdown_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8000".into(),
            name: String::new(),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// `[api]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Key the server API requires in `X-API-Key` (or `Authorization: apikey <key>`).
    /// Default: "" (the API refuses every call unless `insecure`).
    pub key: String,
    /// Serve the API without a key. Only for local development. Default: false.
    pub insecure: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Embedded, single node; no external service.
    #[default]
    Memory,
}

/// `[engine]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Which engine: "memory". Default: "memory".
    #[serde(rename = "type")]
    pub kind: EngineKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Level or filter directive ("info", "debug", "herald_core=debug"). Default: "info".
    pub level: String,
    /// "text" or "json". Default: "text".
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0}: not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

/// Overrides given on the command line; they win over file and environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub name: Option<String>,
    pub log_level: Option<String>,
}

impl Config {
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::NotFound(path.display().to_string()));
            }
            fig = fig.merge(Toml::file(path));
        }
        // Only HERALD_SECTION__KEY variables are config; HERALD_X alone is not ours to read.
        fig = fig.merge(
            Env::prefixed("HERALD_")
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        if let Some(v) = &overrides.listen {
            fig = fig.merge(("server.listen", v));
        }
        if let Some(v) = &overrides.name {
            fig = fig.merge(("server.name", v));
        }
        if let Some(v) = &overrides.log_level {
            fig = fig.merge(("log.level", v));
        }
        let config: Config = fig
            .extract()
            .map_err(|e| ConfigError::Invalid(describe(e)))?;
        config.validate()?;
        Ok(config.with_default_namespace())
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Invalid(describe(e)))?;
        config.validate()?;
        Ok(config.with_default_namespace())
    }

    /// Channels without a namespace always have options; all permissions off unless set.
    fn with_default_namespace(mut self) -> Self {
        if !self.namespaces.iter().any(|n| n.name.is_empty()) {
            self.namespaces.push(NamespaceOptions::default());
        }
        self
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "server.listen: {:?} is not an address like \"127.0.0.1:8000\"",
                self.server.listen
            ))
        })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        let c = &self.client;
        let positive = [
            ("client.max_queue_bytes", c.max_queue_bytes),
            ("client.max_message_size", c.max_message_size),
            ("client.max_channels", c.max_channels),
            ("client.channel_max_length", c.channel_max_length),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid(format!(
                    "{key}: must be greater than 0"
                )));
            }
        }
        if c.ping_interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "client.ping_interval: must be at least 1s".into(),
            ));
        }
        if c.pong_timeout.is_zero() || c.pong_timeout >= c.ping_interval {
            return Err(ConfigError::Invalid(
                "client.pong_timeout: must be above 0 and below client.ping_interval".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for ns in &self.namespaces {
            ns.validate().map_err(ConfigError::Invalid)?;
            if !seen.insert(ns.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "namespaces.name: {:?} is defined twice",
                    ns.name
                )));
            }
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "log.level: {:?} is not a level or filter",
                self.log.level
            )));
        }
        Ok(())
    }

    pub fn node_config(&self) -> herald_core::node::NodeConfig {
        herald_core::node::NodeConfig {
            name: self.server.name.clone(),
            client: self.client.clone(),
            namespaces: self.namespaces.clone(),
        }
    }
}

fn describe(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let kind = e.kind.to_string();
            if key.is_empty() {
                kind
            } else {
                format!("{key}: {kind}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A commented configuration with fresh random secrets (`herald genconfig`).
pub fn generate(secret: &str, api_key: &str) -> String {
    format!(
        r#"# Herald configuration. Every key can also be set as HERALD_SECTION__KEY in the
# environment (e.g. HERALD_SERVER__LISTEN=0.0.0.0:8000) and some as command-line flags.
# Durations are written like "30s", "5m", "1h".

[server]
# Address for client transports (/connection/websocket), the server API (/api) and /health.
listen = "127.0.0.1:8000"
# Node name shown by the `info` API; "" derives one from the node id.
name = ""
# How long a stopping node waits for its clients to go.
shutdown_timeout = "10s"

[client]
# Secret for HS256/384/512 connection and subscription tokens. Keep it private.
token_hmac_secret = "{secret}"
# Accept connections without a token (user "").
allow_anonymous = false
# Server ping interval; clients answer within pong_timeout or are disconnected (3012).
ping_interval = "25s"
pong_timeout = "8s"
# A new connection must send its connect command within this time.
connect_timeout = "10s"
# Bytes queued for one slow client before it is disconnected (3008).
max_queue_bytes = 1048576
# Largest incoming message.
max_message_size = 65536
# Channels per connection, and channel name length.
max_channels = 128
channel_max_length = 255
history_max_publication_limit = 300
recovery_max_publication_limit = 300

[api]
# Key for the server HTTP API: header "X-API-Key: <key>".
key = "{api_key}"
insecure = false

[engine]
# "memory": embedded single-node engine.
type = "memory"

[log]
level = "info"
# "text" or "json"
format = "text"

# Channels without a namespace ("room", not "chat:room").
[[namespaces]]
name = ""
history_size = 100
history_ttl = "5m"
force_recovery = true
allow_subscribe_for_client = true
allow_publish_for_subscriber = false
allow_publish_for_client = false
allow_history_for_subscriber = true
allow_presence_for_subscriber = true
presence = true
join_leave = false

# Example of a namespace: channels "chat:<anything>".
[[namespaces]]
name = "chat"
history_size = 50
history_ttl = "10m"
force_recovery = true
allow_subscribe_for_client = true
allow_publish_for_subscriber = true
allow_history_for_subscriber = true
allow_presence_for_subscriber = true
presence = true
join_leave = true
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_config_is_valid() {
        let c = Config::from_toml(&generate("s", "k")).unwrap();
        assert_eq!(c.client.token_hmac_secret, "s");
        assert_eq!(c.namespaces.len(), 2);
        assert_eq!(c.client.ping_interval, Duration::from_secs(25));
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("[client]\ntoken_secret = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("token_secret"), "{e}");
        let e = Config::from_toml("[client]\nping_interval = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("ping_interval"), "{e}");
        let e = Config::from_toml("[server]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = Config::from_toml("[engine]\ntype = \"carrier-pigeon\"\n").unwrap_err();
        assert!(e.to_string().contains("type"), "{e}");
    }

    #[test]
    fn defaults_without_file() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8000");
        assert_eq!(c.client.max_queue_bytes, 1 << 20);
        assert!(c.namespaces.iter().any(|n| n.name.is_empty()));
    }
}
