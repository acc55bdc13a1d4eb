//! A Herald node: configuration, hub, engine and token checks, plus the operations the server
//! API performs. Sessions hold an `Arc<Node>`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use herald_protocol::api::NodeInfo;
use herald_protocol::client::{ClientInfo, Publication};
use herald_protocol::json::Raw;
use herald_protocol::{Disconnect, ErrorCode, ProtocolError};

use crate::auth::TokenVerifier;
use crate::channel;
use crate::conn::Control;
use crate::engine::{
    Engine, EngineError, HistoryQuery, HistoryResult, PublishOptions, StreamPosition,
};
use crate::hub::{BrokerHandler, Hub};
use crate::options::{ClientOptions, NamespaceOptions};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a node is built from.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    pub name: String,
    pub client: ClientOptions,
    pub namespaces: Vec<NamespaceOptions>,
}

pub struct Node {
    pub id: String,
    pub name: String,
    pub started: Instant,
    pub client: ClientOptions,
    namespaces: HashMap<String, NamespaceOptions>,
    pub hub: Arc<Hub>,
    pub engine: Arc<dyn Engine>,
    pub tokens: TokenVerifier,
    draining: AtomicBool,
}

impl From<EngineError> for ProtocolError {
    fn from(e: EngineError) -> Self {
        tracing::warn!(error = %e, "engine operation failed");
        ErrorCode::INTERNAL.error()
    }
}

/// Publication time in milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn new_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let a: u128 = rng.random();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Node {
    /// Builds a node; `engine` receives the hub it must deliver to.
    pub fn new(
        config: NodeConfig,
        engine: impl FnOnce(Arc<dyn BrokerHandler>) -> Arc<dyn Engine>,
    ) -> Arc<Self> {
        let hub = Arc::new(Hub::new());
        let engine = engine(hub.clone());
        let id = new_id();
        let name = if config.name.is_empty() {
            format!("herald-{}", &id[..8])
        } else {
            config.name
        };
        Arc::new(Self {
            id,
            name,
            started: Instant::now(),
            tokens: TokenVerifier::new(&config.client.token_hmac_secret),
            client: config.client,
            namespaces: config
                .namespaces
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect(),
            hub,
            engine,
            draining: AtomicBool::new(false),
        })
    }

    /// The options of a channel's namespace; None for an unknown namespace (error 102).
    pub fn namespace(&self, ch: &str) -> Option<&NamespaceOptions> {
        self.namespaces.get(channel::namespace(ch))
    }

    /// Checks a channel name used by the server API or a client.
    pub fn channel_options(&self, ch: &str) -> Result<&NamespaceOptions, ProtocolError> {
        if ch.is_empty() || ch.len() > self.client.channel_max_length {
            return Err(ErrorCode::BAD_REQUEST.error());
        }
        self.namespace(ch)
            .ok_or_else(|| ErrorCode::UNKNOWN_CHANNEL.error())
    }

    pub fn publish_options(ns: &NamespaceOptions, skip_history: bool) -> PublishOptions {
        let history = ns.history_enabled() && !skip_history;
        PublishOptions {
            history_size: if history { ns.history_size } else { 0 },
            history_ttl: if history {
                ns.history_ttl
            } else {
                Default::default()
            },
            history_meta_ttl: ns.history_meta_ttl,
            idempotency_key: None,
        }
    }

    pub fn history_query(ns: &NamespaceOptions) -> HistoryQuery {
        HistoryQuery {
            meta_ttl: ns.history_meta_ttl,
            ..Default::default()
        }
    }

    pub async fn publish(
        &self,
        ch: &str,
        data: Raw,
        info: Option<ClientInfo>,
        tags: BTreeMap<String, String>,
        skip_history: bool,
        idempotency_key: Option<String>,
    ) -> Result<StreamPosition, ProtocolError> {
        let ns = self.channel_options(ch)?;
        if herald_protocol::json::depth(data.get()) > herald_protocol::json::MAX_DEPTH {
            return Err(ErrorCode::BAD_REQUEST.error());
        }
        let mut opts = Self::publish_options(ns, skip_history);
        opts.idempotency_key = idempotency_key.filter(|k| !k.is_empty());
        let publication = Publication {
            data,
            info,
            offset: 0,
            tags,
            time: now_ms(),
        };
        Ok(self.engine.publish(ch, publication, &opts).await?)
    }

    /// Reads history. `limit`: 0 → position only, -1 → all (capped), n → at most n.
    pub async fn history(
        &self,
        ch: &str,
        limit: i32,
        since: Option<StreamPosition>,
        reverse: bool,
    ) -> Result<HistoryResult, ProtocolError> {
        let ns = self.channel_options(ch)?;
        if !ns.history_enabled() {
            return Err(ErrorCode::NOT_AVAILABLE.error());
        }
        let max = self.client.history_max_publication_limit;
        let limit = match limit {
            0 => 0,
            n if n < 0 => max,
            n => (n as usize).min(max),
        };
        let mut q = Self::history_query(ns);
        q.limit = Some(limit);
        q.reverse = reverse;
        q.since = since.clone();
        let res = self.engine.history(ch, q).await?;
        if let Some(s) = since
            && !s.epoch.is_empty()
            && s.epoch != res.position.epoch
        {
            return Err(ErrorCode::UNRECOVERABLE_POSITION.error());
        }
        Ok(res)
    }

    pub async fn remove_history(&self, ch: &str) -> Result<(), ProtocolError> {
        self.channel_options(ch)?;
        Ok(self.engine.remove_history(ch).await?)
    }

    pub async fn presence(&self, ch: &str) -> Result<BTreeMap<String, ClientInfo>, ProtocolError> {
        let ns = self.channel_options(ch)?;
        if !ns.presence {
            return Err(ErrorCode::NOT_AVAILABLE.error());
        }
        Ok(self.engine.presence(ch).await?)
    }

    pub async fn presence_stats(&self, ch: &str) -> Result<(u32, u32), ProtocolError> {
        let p = self.presence(ch).await?;
        let users: std::collections::HashSet<&str> = p.values().map(|i| i.user.as_str()).collect();
        Ok((p.len() as u32, users.len() as u32))
    }

    /// Channels with subscribers, filtered by a glob-like pattern (`*` matches any run).
    pub fn channels(&self, pattern: &str) -> Vec<(String, u32)> {
        self.hub
            .channels()
            .into_iter()
            .filter(|(c, _)| pattern.is_empty() || glob_match(pattern, c))
            .collect()
    }

    pub fn info(&self) -> NodeInfo {
        let s = self.hub.stats();
        NodeInfo {
            uid: self.id.clone(),
            name: self.name.clone(),
            version: VERSION.to_string(),
            num_clients: s.clients,
            num_users: s.users,
            num_channels: s.channels,
            num_subs: s.subscriptions,
            uptime: self.started.elapsed().as_secs(),
        }
    }

    /// The connections a server API call addresses: a user's, optionally one client of theirs.
    fn targets(
        &self,
        user: &str,
        client: &str,
        session: &str,
    ) -> Vec<Arc<crate::conn::ConnHandle>> {
        self.hub
            .user_conns(user)
            .into_iter()
            .filter(|c| client.is_empty() || &*c.id == client)
            .filter(|c| session.is_empty() || &*c.id == session)
            .collect()
    }

    pub fn disconnect_user(
        &self,
        user: &str,
        client: &str,
        session: &str,
        whitelist: &[String],
        d: Disconnect,
    ) {
        for c in self.targets(user, client, session) {
            if !whitelist.iter().any(|w| **w == *c.id) {
                c.close(d.clone());
            }
        }
    }

    pub fn unsubscribe_user(&self, user: &str, ch: &str, client: &str, session: &str) {
        for c in self.targets(user, client, session) {
            c.control(Control::Unsubscribe {
                channel: ch.to_string(),
                code: herald_protocol::codes::unsubscribe::SERVER.0,
                reason: herald_protocol::codes::unsubscribe::SERVER.1.to_string(),
            });
        }
    }

    pub fn subscribe_user(
        &self,
        user: &str,
        ch: &str,
        client: &str,
        session: &str,
        info: Option<Raw>,
        data: Option<Raw>,
    ) {
        for c in self.targets(user, client, session) {
            c.control(Control::Subscribe {
                channel: ch.to_string(),
                info: info.clone(),
                data: data.clone(),
            });
        }
    }

    pub fn refresh_user(
        &self,
        user: &str,
        client: &str,
        session: &str,
        expire_at: Option<u64>,
        expired: bool,
    ) {
        for c in self.targets(user, client, session) {
            c.control(Control::Refresh { expire_at, expired });
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops taking connections and asks every client to reconnect elsewhere (3001).
    pub fn shutdown(&self) {
        self.draining.store(true, Ordering::Relaxed);
        for c in self.hub.all_conns() {
            c.close(Disconnect::SHUTDOWN.into());
        }
    }
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    #[test]
    fn glob() {
        use super::glob_match as g;
        assert!(g("chat:*", "chat:room"));
        assert!(g("*", "x"));
        assert!(!g("chat:*", "news:x"));
        assert!(g("a*c", "abbbc"));
        assert!(!g("a*c", "abbb"));
    }
}
