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
    pub admin: AdminConfig,
    pub shutdown: ShutdownConfig,
    /// `[channel.proxy]`: subscribe, publish and sub-refresh proxies.
    pub channel: ChannelConfig,
    /// `[rpc.proxy]`: where `rpc` commands go.
    pub rpc: RpcConfig,
    /// `[mqtt]`: the MQTT front end (off until `mqtt.listen` is set).
    pub mqtt: MqttConfig,
    pub namespaces: Vec<NamespaceOptions>,
}

/// `[channel]`: channel-wide settings (the proxies namespaces may enable).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelConfig {
    pub proxy: herald_core::proxy::ChannelProxies,
}

/// `[rpc]`: the RPC proxy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    pub proxy: herald_core::proxy::RpcProxy,
}

/// `[mqtt]`: MQTT 3.1.1 and 5.0 clients, over TCP and over WebSocket (`/mqtt`, subprotocol
/// `mqtt`, on `server.listen`). See docs/mqtt.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Address of the MQTT TCP listener, e.g. "0.0.0.0:1883"; "" turns MQTT off (TCP and
    /// WebSocket). Default: "".
    pub listen: String,
    /// Speak TLS on `listen` with `server.tls_cert` / `server.tls_key` (reloaded with
    /// them). Default: false.
    pub tls: bool,
    /// Serve MQTT over WebSocket at `/mqtt` on `server.listen` while MQTT is on.
    /// Default: true.
    pub websocket: bool,
    /// Largest packet a client may send, in bytes (larger: disconnect, MQTT 5 reason 0x95);
    /// announced in the MQTT 5 CONNACK. Default: 65536.
    pub max_packet_size: usize,
    /// QoS 1 deliveries a client may leave unacknowledged (MQTT 5 clients may ask for
    /// fewer with Receive Maximum); more wait on the node. Default: 64.
    pub max_inflight: u16,
    /// Longest a persistent session (`clean_session = 0`, MQTT 5 session expiry) is kept
    /// after its connection ends; 3.1.1 persistent sessions are kept this long.
    /// Default: "2h".
    #[serde(with = "herald_core::duration")]
    pub session_expiry: Duration,
    /// How often a connected device's persistent session is saved to a Redis or NATS
    /// engine (when it changed), so a device whose node dies resumes it on another node
    /// from at most this far back. Also saved when the device leaves. Default: "5s".
    #[serde(with = "herald_core::duration")]
    pub session_save_interval: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: String::new(),
            tls: false,
            websocket: true,
            max_packet_size: 65_536,
            max_inflight: 64,
            session_expiry: Duration::from_secs(2 * 3600),
            session_save_interval: Duration::from_secs(5),
        }
    }
}

/// `[admin]`: the admin page and where the operations endpoints listen.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address for `/metrics`, `/health`, `/ready` and `/admin/`; "" serves them on
    /// `server.listen` with the clients. Default: "".
    pub listen: String,
    /// Password of the admin page (`/admin/`); "" disables the page and its API.
    /// Default: "".
    pub password: String,
}

/// `[shutdown]`: how a stopping node lets its clients go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Connected clients are disconnected (3001) spread evenly over this time, so they do not
    /// all reconnect elsewhere at once. Default: "30s".
    #[serde(with = "herald_core::duration")]
    pub drain_duration: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_duration: Duration::from_secs(30),
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address for client transports, the server API and health. Default: "127.0.0.1:8000".
    pub listen: String,
    /// Node name shown by `info`. Default: "" (derived from the node id).
    pub name: String,
    /// After the drain (`shutdown.drain_duration`), how long a stopping node waits for its
    /// connections to finish closing (queued messages flushed). Default: "10s".
    #[serde(with = "herald_core::duration")]
    pub shutdown_timeout: Duration,
    /// PEM file with the TLS certificate chain (leaf first). With `tls_key`, every listener
    /// (clients, API, operations) speaks HTTPS/WSS only. Reloaded on SIGHUP and when the file
    /// changes. Default: "" (plain TCP).
    pub tls_cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`. Default: "".
    pub tls_key: String,
    /// Time a new socket has to finish its TLS handshake and send complete HTTP request
    /// headers; slower sockets are closed. Default: "10s".
    #[serde(with = "herald_core::duration")]
    pub handshake_timeout: Duration,
    /// Negotiate permessage-deflate with WebSocket clients that offer it. Default: true.
    pub websocket_compression: bool,
    /// Serve `/connection/echo`, a WebSocket endpoint on the same stack that echoes every
    /// message (for conformance suites). Never on in production. Default: false.
    pub websocket_echo: bool,
    /// The client URL this node advertises to devices through `GET /connection/nodes`
    /// (e.g. "wss://n1.example.com/connection/websocket"). Default: "" (the WebSocket URL of
    /// the address it listens on).
    pub advertise_url: String,
    /// `GET /connection/nodes` answers at most this many requests per second on this node
    /// (429 beyond); 0: no limit. Default: 200.
    pub nodes_rate_limit: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8000".into(),
            name: String::new(),
            shutdown_timeout: Duration::from_secs(10),
            tls_cert: String::new(),
            tls_key: String::new(),
            handshake_timeout: Duration::from_secs(10),
            websocket_compression: true,
            websocket_echo: false,
            advertise_url: String::new(),
            nodes_rate_limit: 200,
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
    /// Address of a separate listener for the API (e.g. a private interface); when set,
    /// `/api` is served there only and no longer on `server.listen`. Default: "".
    pub listen: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Embedded, single node; no external service.
    #[default]
    Memory,
    /// Redis: history, presence and node-to-node fan-out for a cluster of nodes.
    Redis,
    /// NATS with JetStream: replicated history and presence, fan-out over NATS subjects.
    Nats,
}

/// `[engine]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Which engine: "memory", "redis" or "nats". Default: "memory".
    #[serde(rename = "type")]
    pub kind: EngineKind,
    /// `[engine.redis]`, used with type = "redis".
    pub redis: herald_redis::RedisConfig,
    /// `[engine.nats]`, used with type = "nats".
    pub nats: herald_nats::NatsConfig,
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

    /// The separate operations listener, when `admin.listen` is set.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.admin.listen.is_empty() {
            return Ok(None);
        }
        self.admin.listen.parse().map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "admin.listen: {:?} is not an address like \"127.0.0.1:9000\"",
                self.admin.listen
            ))
        })
    }

    /// The separate server API listener, when `api.listen` is set.
    pub fn api_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.api.listen.is_empty() {
            return Ok(None);
        }
        self.api.listen.parse().map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "api.listen: {:?} is not an address like \"10.0.0.5:9001\"",
                self.api.listen
            ))
        })
    }

    /// The MQTT TCP listener, when `mqtt.listen` is set.
    pub fn mqtt_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.mqtt.listen.is_empty() {
            return Ok(None);
        }
        self.mqtt.listen.parse().map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "mqtt.listen: {:?} is not an address like \"0.0.0.0:1883\"",
                self.mqtt.listen
            ))
        })
    }

    fn validate_mqtt(&self) -> Result<(), ConfigError> {
        self.mqtt_addr()?;
        let m = &self.mqtt;
        if m.max_packet_size < 64 || m.max_packet_size > herald_protocol::mqtt::MAX_REMAINING {
            return Err(ConfigError::Invalid(format!(
                "mqtt.max_packet_size: must be between 64 and {}",
                herald_protocol::mqtt::MAX_REMAINING
            )));
        }
        if m.session_save_interval.is_zero() {
            return Err(ConfigError::Invalid(
                "mqtt.session_save_interval: must be greater than 0".into(),
            ));
        }
        if m.max_inflight == 0 {
            return Err(ConfigError::Invalid(
                "mqtt.max_inflight: must be greater than 0".into(),
            ));
        }
        if m.tls && self.server.tls_cert.is_empty() {
            return Err(ConfigError::Invalid(
                "mqtt.tls: needs server.tls_cert and server.tls_key".into(),
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.validate_mqtt()?;
        self.api_addr()?;
        validate_security(self).map_err(ConfigError::Invalid)?;
        self.admin_addr()?;
        let url = &self.server.advertise_url;
        if !(url.is_empty() || url.starts_with("ws://") || url.starts_with("wss://")) {
            return Err(ConfigError::Invalid(format!(
                "server.advertise_url: {url:?} is not a ws:// or wss:// URL"
            )));
        }
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
        if self.engine.kind == EngineKind::Redis {
            self.engine.redis.validate().map_err(ConfigError::Invalid)?;
        }
        if self.engine.kind == EngineKind::Nats {
            self.engine
                .nats
                .validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
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
        let personal = &self.client.subscribe_to_user_personal_channel;
        if personal.enabled
            && !self
                .namespaces
                .iter()
                .any(|ns| ns.name == personal.personal_channel_namespace)
        {
            return Err(ConfigError::Invalid(format!(
                "client.subscribe_to_user_personal_channel.personal_channel_namespace: \
                 namespace {:?} is not defined",
                personal.personal_channel_namespace
            )));
        }
        if personal.single_connection && !personal.enabled {
            return Err(ConfigError::Invalid(
                "client.subscribe_to_user_personal_channel.single_connection: needs enabled = true"
                    .into(),
            ));
        }
        self.validate_proxies().map_err(ConfigError::Invalid)?;
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
            channel_proxy: self.channel.proxy.clone(),
            rpc_proxy: self.rpc.proxy.clone(),
        }
    }

    /// Proxy endpoints parse, and namespaces enable only proxies that are configured.
    fn validate_proxies(&self) -> Result<(), String> {
        let c = &self.client.proxy;
        let ch = &self.channel.proxy;
        for (key, o) in [
            ("client.proxy.connect", &c.connect),
            ("client.proxy.refresh", &c.refresh),
            ("channel.proxy.subscribe", &ch.subscribe),
            ("channel.proxy.publish", &ch.publish),
            ("channel.proxy.sub_refresh", &ch.sub_refresh),
        ] {
            o.validate(key)?;
            if o.enabled {
                crate::jwks::Endpoint::parse(&o.endpoint)
                    .map_err(|e| format!("{key}.endpoint: {e}"))?;
            }
        }
        self.rpc.proxy.validate()?;
        if self.rpc.proxy.enabled {
            for url in
                std::iter::once(&self.rpc.proxy.endpoint).chain(self.rpc.proxy.routes.values())
            {
                crate::jwks::Endpoint::parse(url).map_err(|e| format!("rpc.proxy: {e}"))?;
            }
        }
        for ns in &self.namespaces {
            for (flag, on, proxy, key) in [
                (
                    "subscribe_proxy_enabled",
                    ns.subscribe_proxy_enabled,
                    &ch.subscribe,
                    "channel.proxy.subscribe",
                ),
                (
                    "publish_proxy_enabled",
                    ns.publish_proxy_enabled,
                    &ch.publish,
                    "channel.proxy.publish",
                ),
                (
                    "sub_refresh_proxy_enabled",
                    ns.sub_refresh_proxy_enabled,
                    &ch.sub_refresh,
                    "channel.proxy.sub_refresh",
                ),
            ] {
                if on && !proxy.enabled {
                    return Err(format!(
                        "namespaces[{:?}].{flag}: needs [{key}] with enabled = true",
                        ns.name
                    ));
                }
            }
        }
        Ok(())
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
# After the drain, how long a stopping node waits for its connections to finish closing.
shutdown_timeout = "10s"
# TLS for every listener (PEM files; reloaded on SIGHUP and when they change).
# tls_cert = "/etc/herald/cert.pem"
# tls_key = "/etc/herald/key.pem"
# permessage-deflate for WebSocket clients that offer it.
websocket_compression = true

[shutdown]
# On SIGTERM (or POST /api/drain) clients are disconnected (3001) spread over this time.
drain_duration = "30s"

[admin]
# Address for /metrics, /health, /ready and /admin/; "" serves them on server.listen.
listen = ""
# Password of the admin page /admin/; "" disables it.
password = ""

[client]
# Secret for HS256/384/512 connection and subscription tokens. Keep it private.
token_hmac_secret = "{secret}"
# Public keys for RS256/384/512 and ES256/384 tokens (PEM text or a file path), a JWKS URL,
# and the aud / iss every token must carry. See docs/security.md.
# token_rsa_public_key = "/etc/herald/jwt-rsa.pub.pem"
# token_ecdsa_public_key = "/etc/herald/jwt-ec.pub.pem"
# token_jwks_public_endpoint = "https://auth.example.com/.well-known/jwks.json"
# token_audience = "herald"
# token_issuer = "https://auth.example.com"
# Browser origins allowed to connect ([] = any); e.g. ["https://app.example.com"].
allowed_origins = []
# Limits: connections per user, commands per second (and burst), connections per node; 0 = off.
user_connection_limit = 0
command_rate = 0
command_burst = 0
max_connections = 0
# Accept connections without a token (user "").
allow_anonymous = false
# Server ping interval; clients answer within pong_timeout or are disconnected (3012).
ping_interval = "25s"
pong_timeout = "8s"
# A new connection must send its connect command within this time.
connect_timeout = "10s"
# Grace after a token expired before the connection is closed (3005).
expired_close_delay = "25s"
# Bytes queued for one slow client before it is disconnected (3008).
max_queue_bytes = 1048576
# Largest incoming message.
max_message_size = 65536
# Channels per connection, and channel name length.
max_channels = 128
channel_max_length = 255
history_max_publication_limit = 300
recovery_max_publication_limit = 300

# Subscribe every authenticated connection to its user's channel, #<user> (or
# <namespace>:#<user>), at connect; single_connection keeps one connection per user (3504).
[client.subscribe_to_user_personal_channel]
enabled = false
personal_channel_namespace = ""
single_connection = false

[api]
# Key for the server HTTP API: header "X-API-Key: <key>".
key = "{api_key}"
insecure = false

[engine]
# "memory": embedded single-node engine. "redis" / "nats": several nodes share one channel
# space through Redis or NATS JetStream (history, presence, fan-out); see docs/cluster.md.
type = "memory"

[engine.redis]
url = "redis://127.0.0.1:6379"
# Prefix of every key and pub/sub channel; lets several clusters share one Redis.
prefix = "herald"
pubsub_shards = 4
presence_ttl = "60s"
node_heartbeat = "2s"
node_eviction = "10s"
command_timeout = "3s"

[engine.nats]
servers = ["nats://127.0.0.1:4222"]
# Prefix of every subject and stream name; lets several clusters share one NATS.
prefix = "herald"
# JetStream copies of history and presence: 1, or 3 on a 3-server NATS cluster.
replicas = 1
connect_timeout = "3s"
request_timeout = "3s"
max_history_per_channel = 1000
stream_max_age = "720h"
presence_ttl = "60s"
node_heartbeat = "2s"
node_eviction = "10s"

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
# Subscribers may ask for Fossil deltas (delta: "fossil"): later publications as patches.
allowed_delta_types = ["fossil"]
"#
    )
}

/// Checks the security settings; the message names the key at fault.
fn validate_security(config: &Config) -> Result<(), String> {
    crate::http::tls::check_files(&config.server.tls_cert, &config.server.tls_key)?;
    let c = &config.client;
    let keys = herald_core::auth::TokenKeys::from_options(c)?;
    herald_core::auth::TokenVerifier::with_keys(&keys)?;
    if !keys.jwks_url.is_empty() {
        crate::jwks::Endpoint::parse(&keys.jwks_url)
            .map_err(|e| format!("client.token_jwks_public_endpoint: {e}"))?;
        if c.token_jwks_refresh_interval.is_zero() {
            return Err("client.token_jwks_refresh_interval: must be above 0".into());
        }
    }
    for p in &c.allowed_origins {
        if p.trim().is_empty() {
            return Err("client.allowed_origins: an empty pattern matches nothing".into());
        }
    }
    if c.command_burst > 0 && c.command_rate == 0 {
        return Err("client.command_burst: needs client.command_rate".into());
    }
    if config.server.handshake_timeout.is_zero() {
        return Err("server.handshake_timeout: must be above 0".into());
    }
    Ok(())
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
    fn admin_and_shutdown_sections() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.shutdown.drain_duration, Duration::from_secs(30));
        assert!(c.admin.password.is_empty());
        assert_eq!(c.admin_addr().unwrap(), None);
        let c = Config::from_toml(
            "[admin]\nlisten = \"127.0.0.1:0\"\npassword = \"p\"\n[shutdown]\ndrain_duration = \"2s\"\n",
        )
        .unwrap();
        assert!(c.admin_addr().unwrap().is_some());
        assert_eq!(c.shutdown.drain_duration, Duration::from_secs(2));
        let e = Config::from_toml("[admin]\nlisten = \"x\"\n").unwrap_err();
        assert!(e.to_string().contains("admin.listen"), "{e}");
        let e = Config::from_toml("[shutdown]\ndrain_duration = \"soon\"\n").unwrap_err();
        assert!(e.to_string().contains("drain_duration"), "{e}");
    }

    #[test]
    fn defaults_without_file() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8000");
        assert_eq!(c.client.max_queue_bytes, 1 << 20);
        assert!(c.namespaces.iter().any(|n| n.name.is_empty()));
    }
}
