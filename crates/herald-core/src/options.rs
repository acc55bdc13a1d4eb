//! Options that shape client sessions and channel namespaces. Loaded by the server's config;
//! every field has a documented default.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[client]`: connection-level behaviour.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientOptions {
    /// HMAC secret for HS256/384/512 connection and subscription tokens. Default: "" (no
    /// HMAC tokens accepted).
    pub token_hmac_secret: String,
    /// Accept connections without a token as anonymous users (user ""). Default: false.
    pub allow_anonymous: bool,
    /// How often the server pings (`{}`) each connection. Default: "25s".
    #[serde(with = "crate::duration")]
    pub ping_interval: Duration,
    /// How long a client has to answer a ping before it is disconnected with 3012.
    /// Default: "8s".
    #[serde(with = "crate::duration")]
    pub pong_timeout: Duration,
    /// How long a new connection may wait before sending its connect command. Default: "10s".
    #[serde(with = "crate::duration")]
    pub connect_timeout: Duration,
    /// Grace after a connection's token expired before it is closed with 3005, so a refresh
    /// sent exactly at `ttl` is never late. Default: "25s".
    #[serde(with = "crate::duration")]
    pub expired_close_delay: Duration,
    /// Bytes queued for one connection beyond which it is a slow consumer and is
    /// disconnected with 3008. Default: 1048576 (1 MiB).
    pub max_queue_bytes: usize,
    /// Largest accepted incoming message (WebSocket frame payload). Default: 65536.
    pub max_message_size: usize,
    /// Channels one connection may be subscribed to. Default: 128.
    pub max_channels: usize,
    /// Longest accepted channel name in bytes. Default: 255.
    pub channel_max_length: usize,
    /// Most publications one history call returns. Default: 300.
    pub history_max_publication_limit: usize,
    /// Most publications a recovery may return before it is refused. Default: 300.
    pub recovery_max_publication_limit: usize,
    /// RSA public key for RS256/384/512 tokens: the PEM text itself, or the path of a PEM
    /// file. Default: "" (no RSA tokens, unless from a JWKS endpoint).
    pub token_rsa_public_key: String,
    /// ECDSA public key for ES256 (P-256) or ES384 (P-384) tokens: PEM text or a PEM file
    /// path. Default: "".
    pub token_ecdsa_public_key: String,
    /// URL of a JWKS document (`http://` or `https://`); RS/ES tokens with a `kid` are checked
    /// with its key of that `kid`. Default: "".
    pub token_jwks_public_endpoint: String,
    /// How often the JWKS document is fetched again; a token with an unknown `kid` also
    /// triggers a fetch (at most one per 10s). Default: "5m".
    #[serde(with = "crate::duration")]
    pub token_jwks_refresh_interval: Duration,
    /// When set, connection and subscription tokens must carry this `aud`. Default: "".
    pub token_audience: String,
    /// When set, connection and subscription tokens must carry this `iss`. Default: "".
    pub token_issuer: String,
    /// Origins (glob patterns, `*` matches any run: `https://*.example.com`) whose browsers
    /// may open client connections; a request with another `Origin` gets 403. A request
    /// without `Origin` (not a browser) is always allowed. Default: [] (any origin).
    pub allowed_origins: Vec<String>,
    /// Connections one user may hold on this node; the next one is closed with 3504.
    /// Anonymous connections are not counted. Default: 0 (no limit).
    pub user_connection_limit: usize,
    /// Commands per second one connection may send (token bucket); beyond it the command
    /// gets error 111, and a connection that keeps going is closed with 3013.
    /// Default: 0 (no limit).
    pub command_rate: u32,
    /// Commands a connection may send in a burst above `command_rate`. Default: 0 (equal to
    /// `command_rate`).
    pub command_burst: u32,
    /// Client connections this node accepts at once; more are refused (HTTP 503).
    /// Default: 0 (no limit).
    pub max_connections: usize,
    /// `[client.subscribe_to_user_personal_channel]`: every authenticated connection is
    /// subscribed server-side to its user's own channel at connect.
    pub subscribe_to_user_personal_channel: PersonalChannel,
    /// `[client.proxy.connect]` and `[client.proxy.refresh]`: the backend authorises
    /// connections without a token and extends them (see `crate::proxy`).
    pub proxy: crate::proxy::ClientProxies,
}

/// The automatic personal channel (`#<user>`, or `<namespace>:#<user>`): the way to push to
/// every device of one user. It appears in the connect reply's `subs` and recovers like any
/// subscription.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersonalChannel {
    /// Subscribe each authenticated connection to its personal channel. Default: false.
    pub enabled: bool,
    /// Namespace of the personal channel; it must be defined. Default: "" (the channel is
    /// `#<user>`, in the namespace without a name).
    pub personal_channel_namespace: String,
    /// Keep one connection per user: a new connection closes the user's others, on every
    /// node, with 3504. Default: false.
    pub single_connection: bool,
}

impl PersonalChannel {
    /// The personal channel of `user`, when enabled and the user is not anonymous.
    pub fn channel(&self, user: &str) -> Option<String> {
        if !self.enabled || user.is_empty() {
            return None;
        }
        Some(if self.personal_channel_namespace.is_empty() {
            format!("#{user}")
        } else {
            format!("{}:#{user}", self.personal_channel_namespace)
        })
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token_hmac_secret: String::new(),
            allow_anonymous: false,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(8),
            connect_timeout: Duration::from_secs(10),
            expired_close_delay: Duration::from_secs(25),
            max_queue_bytes: 1 << 20,
            max_message_size: 65536,
            max_channels: 128,
            channel_max_length: 255,
            history_max_publication_limit: 300,
            recovery_max_publication_limit: 300,
            token_rsa_public_key: String::new(),
            token_ecdsa_public_key: String::new(),
            token_jwks_public_endpoint: String::new(),
            token_jwks_refresh_interval: Duration::from_secs(300),
            token_audience: String::new(),
            token_issuer: String::new(),
            allowed_origins: Vec::new(),
            user_connection_limit: 0,
            command_rate: 0,
            command_burst: 0,
            max_connections: 0,
            subscribe_to_user_personal_channel: PersonalChannel::default(),
            proxy: Default::default(),
        }
    }
}

/// `[[namespaces]]`: options of the channels whose name starts with `<name>:` (or of the
/// channels without a namespace, for `name = ""`). Every permission defaults to false.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceOptions {
    /// The namespace; "" for channels without one. Required.
    pub name: String,
    /// Publications kept per channel; 0 disables history. Default: 0.
    pub history_size: usize,
    /// How long publications stay in history; "0" disables history. Default: "0".
    #[serde(with = "crate::duration")]
    pub history_ttl: Duration,
    /// How long a stream's epoch and offset outlive its publications. Default: "24h".
    #[serde(with = "crate::duration")]
    pub history_meta_ttl: Duration,
    /// Every subscription is recoverable (offset + epoch, recovery on resubscribe).
    /// Default: false.
    pub force_recovery: bool,
    /// Every subscription is positioned (told its stream position). Default: false.
    pub force_positioning: bool,
    /// Any authenticated client may subscribe. Default: false.
    pub allow_subscribe_for_client: bool,
    /// Anonymous clients may subscribe too. Default: false.
    pub allow_subscribe_for_anonymous: bool,
    /// Subscribers may publish. Default: false.
    pub allow_publish_for_subscriber: bool,
    /// Any authenticated client may publish. Default: false.
    pub allow_publish_for_client: bool,
    /// Anonymous clients may publish too (with one of the two above). Default: false.
    pub allow_publish_for_anonymous: bool,
    /// Subscribers may read history. Default: false.
    pub allow_history_for_subscriber: bool,
    /// Any authenticated client may read history. Default: false.
    pub allow_history_for_client: bool,
    /// Anonymous clients may read history too. Default: false.
    pub allow_history_for_anonymous: bool,
    /// Subscribers may read presence. Default: false.
    pub allow_presence_for_subscriber: bool,
    /// Any authenticated client may read presence. Default: false.
    pub allow_presence_for_client: bool,
    /// Anonymous clients may read presence too. Default: false.
    pub allow_presence_for_anonymous: bool,
    /// Track who is subscribed (presence, presence_stats). Default: false.
    pub presence: bool,
    /// Send join/leave pushes to subscribers that ask for them. Default: false.
    pub join_leave: bool,
    /// Send join/leave pushes to every subscriber. Default: false.
    pub force_push_join_leave: bool,
    /// Channels of this namespace need a subscription token (as `$` channels do).
    /// Default: false.
    pub require_subscription_token: bool,
    /// Delta types subscribers may ask for (`delta` in subscribe); only `"fossil"` exists.
    /// Default: [] (subscribers get whole publications).
    pub allowed_delta_types: Vec<String>,
    /// Subscribes without a subscription token are decided by `[channel.proxy.subscribe]`
    /// instead of the permission options. Default: false.
    pub subscribe_proxy_enabled: bool,
    /// Client publications are decided (and may be rewritten) by `[channel.proxy.publish]`
    /// instead of the permission options. Default: false.
    pub publish_proxy_enabled: bool,
    /// Subscriptions whose expiry the subscribe proxy set are extended by
    /// `[channel.proxy.sub_refresh]`. Default: false.
    pub sub_refresh_proxy_enabled: bool,
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        Self {
            name: String::new(),
            history_size: 0,
            history_ttl: Duration::ZERO,
            history_meta_ttl: Duration::from_secs(24 * 3600),
            force_recovery: false,
            force_positioning: false,
            allow_subscribe_for_client: false,
            allow_subscribe_for_anonymous: false,
            allow_publish_for_subscriber: false,
            allow_publish_for_client: false,
            allow_publish_for_anonymous: false,
            allow_history_for_subscriber: false,
            allow_history_for_client: false,
            allow_history_for_anonymous: false,
            allow_presence_for_subscriber: false,
            allow_presence_for_client: false,
            allow_presence_for_anonymous: false,
            presence: false,
            join_leave: false,
            force_push_join_leave: false,
            require_subscription_token: false,
            allowed_delta_types: Vec::new(),
            subscribe_proxy_enabled: false,
            publish_proxy_enabled: false,
            sub_refresh_proxy_enabled: false,
        }
    }
}

impl NamespaceOptions {
    /// History is on when both a size and a ttl are set.
    pub fn history_enabled(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }

    /// Checks one namespace; the message names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        let n = &self.name;
        if n.contains(':') || n.starts_with('$') || n.contains('#') {
            return Err(format!(
                "namespaces.name {n:?}: must not contain ':' or '#' nor start with '$'"
            ));
        }
        if (self.history_size > 0) == self.history_ttl.is_zero() {
            return Err(format!(
                "namespaces[{n:?}].history_ttl: history_size and history_ttl must be set together"
            ));
        }
        if (self.force_recovery || self.force_positioning) && !self.history_enabled() {
            return Err(format!(
                "namespaces[{n:?}].force_recovery: recovery and positioning need history (history_size, history_ttl)"
            ));
        }
        if let Some(t) = self
            .allowed_delta_types
            .iter()
            .find(|t| t.as_str() != DELTA_FOSSIL)
        {
            return Err(format!(
                "namespaces[{n:?}].allowed_delta_types: unknown delta type {t:?} (known: \"fossil\")"
            ));
        }
        Ok(())
    }

    /// Whether subscribers may ask for Fossil deltas.
    pub fn fossil_delta(&self) -> bool {
        self.allowed_delta_types.iter().any(|t| t == DELTA_FOSSIL)
    }
}

/// The one delta type of the client protocol.
pub const DELTA_FOSSIL: &str = "fossil";
