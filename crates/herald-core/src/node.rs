//! A Herald node: configuration, hub, engine and token checks, plus the operations the server
//! API performs. Sessions hold an `Arc<Node>`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use herald_protocol::api::NodeInfo;
use herald_protocol::client::{ClientInfo, Publication};
use herald_protocol::json::Raw;
use herald_protocol::{Disconnect, ErrorCode, ProtocolError};

use crate::auth::TokenVerifier;
use crate::channel;

use crate::engine::{
    ControlCommand, Engine, HistoryQuery, HistoryResult, PublishOptions, StreamPosition,
};
use crate::hub::{BrokerHandler, Hub};
use crate::metrics::{InstrumentedEngine, Metrics};
use crate::options::{ClientOptions, NamespaceOptions};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The data of a publication: JSON, or (`binary`) a JSON string holding the base64 of bytes
/// that are not JSON, which Protobuf subscribers receive decoded.
#[derive(Debug, Clone)]
pub struct PublishData {
    pub data: Raw,
    pub binary: bool,
}

impl From<Raw> for PublishData {
    fn from(data: Raw) -> Self {
        Self {
            data,
            binary: false,
        }
    }
}

impl PublishData {
    /// Bytes as published: their JSON value when they are JSON, else binary data.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        match herald_protocol::json::from_bytes(bytes) {
            Some(data) => data.into(),
            None => Self {
                data: herald_protocol::json::base64_string(bytes),
                binary: true,
            },
        }
    }
}

/// What a node is built from.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    pub name: String,
    pub client: ClientOptions,
    pub namespaces: Vec<NamespaceOptions>,
    /// `[channel.proxy]`.
    pub channel_proxy: crate::proxy::ChannelProxies,
    /// `[rpc.proxy]`.
    pub rpc_proxy: crate::proxy::RpcProxy,
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
    /// Metric handles (see `crate::metrics`).
    pub metrics: Arc<Metrics>,
    /// Every connection's deadlines, in one structure (see `crate::timers`).
    pub timers: crate::timers::Timers,
    draining: AtomicBool,
    pub channel_proxy: crate::proxy::ChannelProxies,
    pub rpc_proxy: crate::proxy::RpcProxy,
    /// Carries proxy requests; installed by the server at start.
    proxy_client: std::sync::OnceLock<Arc<dyn crate::proxy::ProxyClient>>,
    /// The client URL this node advertises in its heartbeat (set once its listener is bound).
    advertise_url: std::sync::OnceLock<String>,
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
        Self::with_metrics(config, Arc::new(Metrics::noop()), engine)
    }

    /// Builds a node that records into `metrics` (see `crate::metrics`).
    pub fn with_metrics(
        config: NodeConfig,
        metrics: Arc<Metrics>,
        engine: impl FnOnce(Arc<dyn BrokerHandler>) -> Arc<dyn Engine>,
    ) -> Arc<Self> {
        let hub = Arc::new(Hub::with_metrics(metrics.clone()));
        let engine = engine(hub.clone());
        Self::assemble(config, new_id(), hub, engine, metrics)
    }

    /// Builds a node from parts made beforehand (engines that connect asynchronously need
    /// the node id and hub before the node exists).
    pub fn assemble(
        config: NodeConfig,
        id: String,
        hub: Arc<Hub>,
        engine: Arc<dyn Engine>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let engine: Arc<dyn Engine> = Arc::new(InstrumentedEngine::new(engine, metrics.clone()));
        let name = if config.name.is_empty() {
            format!("herald-{}", &id[..8.min(id.len())])
        } else {
            config.name
        };
        Arc::new(Self {
            id,
            name,
            started: Instant::now(),
            tokens: TokenVerifier::from_options(&config.client),
            client: config.client,
            namespaces: config
                .namespaces
                .into_iter()
                .map(|n| (n.name.clone(), n))
                .collect(),
            hub,
            engine,
            metrics,
            timers: crate::timers::Timers::new(),
            draining: AtomicBool::new(false),
            channel_proxy: config.channel_proxy,
            rpc_proxy: config.rpc_proxy,
            proxy_client: std::sync::OnceLock::new(),
            advertise_url: std::sync::OnceLock::new(),
        })
    }

    /// Sets the client URL devices are given for this node (once, at start).
    pub fn set_advertise_url(&self, url: String) {
        let _ = self.advertise_url.set(url);
    }

    /// Whether some enabled proxy forwards the client header `name` to the backend.
    pub fn forwards_header(&self, name: &str) -> bool {
        let c = &self.client.proxy;
        let ch = &self.channel_proxy;
        [
            &c.connect,
            &c.refresh,
            &ch.subscribe,
            &ch.publish,
            &ch.sub_refresh,
        ]
        .into_iter()
        .any(|o| o.enabled && o.forwards(name))
            || (self.rpc_proxy.enabled
                && self
                    .rpc_proxy
                    .http_headers
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(name)))
    }

    /// Sets what carries proxy requests (once, at start).
    pub fn set_proxy_client(&self, client: Arc<dyn crate::proxy::ProxyClient>) {
        let _ = self.proxy_client.set(client);
    }

    /// Sends one proxy request and reads the backend's answer. Failures are logged with the
    /// endpoint and counted; every outcome is counted by proxy and result.
    pub async fn proxy<T, B>(
        &self,
        kind: crate::proxy::ProxyKind,
        options: &crate::proxy::ProxyOptions,
        headers: &[(String, String)],
        body: &B,
    ) -> Result<T, crate::proxy::Outcome>
    where
        T: serde::de::DeserializeOwned + Default,
        B: serde::Serialize,
    {
        use crate::proxy::{Outcome, ProxyError};
        let outcome = async {
            let client = self
                .proxy_client
                .get()
                .ok_or(Outcome::Failed(ProxyError::NoClient))?;
            let body = serde_json::to_vec(body)
                .map_err(|e| Outcome::Failed(ProxyError::BadResponse(e.to_string())))?;
            let mut sent: Vec<(String, String)> = headers
                .iter()
                .filter(|(k, _)| options.forwards(k))
                .cloned()
                .collect();
            sent.extend(
                options
                    .static_http_headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            let answer = client
                .post(options, sent, body)
                .await
                .map_err(Outcome::Failed)?;
            crate::proxy::read_response::<T>(&answer)
        }
        .await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(o) => o.label(),
        };
        self.metrics.proxy(kind.name(), label);
        if let Err(crate::proxy::Outcome::Failed(e)) = &outcome {
            tracing::warn!(proxy = kind.name(), endpoint = %options.endpoint, error = %e, "proxy request failed");
        }
        outcome
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
        data: impl Into<PublishData>,
        info: Option<ClientInfo>,
        tags: BTreeMap<String, String>,
        skip_history: bool,
        idempotency_key: Option<String>,
    ) -> Result<StreamPosition, ProtocolError> {
        let ns = self.channel_options(ch)?;
        let PublishData { data, binary } = data.into();
        if herald_protocol::json::depth(data.get()) > herald_protocol::json::MAX_DEPTH {
            return Err(ErrorCode::BAD_REQUEST.error());
        }
        let data = herald_protocol::json::single_line(data);
        let mut opts = Self::publish_options(ns, skip_history);
        opts.idempotency_key = idempotency_key.filter(|k| !k.is_empty());
        let from_client = info.is_some();
        let publication = Publication {
            data,
            info,
            offset: 0,
            tags,
            time: now_ms(),
            binary,
            delta: false,
        };
        let position = self.engine.publish(ch, publication, &opts).await?;
        self.metrics.published(from_client);
        Ok(position)
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

    /// Channels with subscribers on any node, filtered by a glob-like pattern (`*` matches
    /// any run).
    pub async fn channels(&self, pattern: &str) -> Result<Vec<(String, u32)>, ProtocolError> {
        Ok(self
            .engine
            .channels()
            .await?
            .into_iter()
            .filter(|(c, _)| pattern.is_empty() || glob_match(pattern, c))
            .collect())
    }

    /// This node and every live peer.
    pub fn cluster_info(&self) -> Vec<NodeInfo> {
        let mut nodes = vec![self.info()];
        nodes.extend(self.engine.peers().into_iter().filter(|n| n.uid != self.id));
        nodes
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
            url: self.advertise_url.get().cloned().unwrap_or_default(),
            draining: self.is_draining(),
        }
    }

    /// Server API actions on a user's connections reach every node of the cluster.
    pub async fn control(&self, cmd: ControlCommand) -> Result<(), ProtocolError> {
        Ok(self.engine.publish_control(cmd).await?)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops taking connections (readiness fails, connect is answered 3001). True the first
    /// time.
    pub fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::Relaxed)
    }

    /// Drains: stops taking connections, then closes the connected clients with 3001 spread
    /// evenly over `over`, so they do not all reconnect elsewhere at the same instant. The
    /// first goes at once, the last at about `over`. Returns early when every client is gone.
    /// Cancel-safe: dropping it leaves the rest connected (`shutdown` closes them).
    pub async fn drain(&self, over: Duration) {
        self.start_draining();
        let conns = self.hub.all_conns();
        let n = conns.len();
        tracing::info!(clients = n, over = ?over, "draining: disconnecting clients (3001)");
        if n == 0 {
            return;
        }
        let start = tokio::time::Instant::now();
        // Wake at most every 10ms: with many clients each wake-up closes a batch.
        let tick = (over / n as u32).max(Duration::from_millis(10));
        let mut closed = 0;
        loop {
            let elapsed = start.elapsed();
            let due = if elapsed >= over {
                n
            } else {
                let share = (n as u128 * elapsed.as_nanos()) / over.as_nanos().max(1);
                (share as usize + 1).min(n)
            };
            for c in &conns[closed..due] {
                c.close(Disconnect::SHUTDOWN.into());
            }
            closed = due;
            if closed == n || self.hub.num_conns() == 0 {
                return;
            }
            tokio::time::sleep(tick).await;
        }
    }

    /// Stops taking connections and asks every client to reconnect elsewhere (3001) now.
    pub fn shutdown(&self) {
        self.start_draining();
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
