//! Herald's Redis engine: history, offsets, presence and node-to-node fan-out in Redis, so
//! several nodes serve one channel space.
//!
//! Layout (P = `engine.redis.prefix`, C = channel, braces are Redis Cluster hash tags so a
//! channel's keys share a slot):
//! - `P.stream.{C}`: a Redis stream, entry id `0-<offset>`, field `d` = publication JSON;
//!   capped at `history_size`, expires `history_ttl` after the last publish.
//! - `P.meta.{C}`: hash `e` (epoch), `s` (last offset); expires `history_meta_ttl` after the
//!   last publish, so the position outlives the data.
//! - `P.presence.{C}` / `P.presence_exp.{C}`: hash client → info, zset client → expiry.
//! - `P.idem.{C}.<key>`: idempotency keys.
//! - `P.state.<key>`: state kept for a client's next connection on any node (MQTT
//!   persistent sessions), with its own expiry.
//! - pub/sub `P.pub.C` per channel (see [`wire`]) and `P.control` for the cluster.

pub mod config;
mod pubsub;
mod scripts;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::engine::{
    BoxFut, ControlCommand, Engine, EngineError, HistoryQuery, HistoryResult, PublishOptions,
    StreamPosition, new_epoch,
};
use herald_core::hub::BrokerHandler;
use herald_protocol::api::NodeInfo;
use herald_protocol::client::{ClientInfo, Publication};
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

pub use config::RedisConfig;
use wire::ControlMessage;

/// A connection for commands: one Redis, or a Redis Cluster (commands routed by key slot;
/// every key of a channel shares one slot through its hash tag).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How long an idempotency key is remembered.
const IDEMPOTENCY_TTL_MS: u64 = 300_000;

fn err(e: redis::RedisError) -> EngineError {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal() {
        EngineError::Unavailable(e.to_string())
    } else {
        EngineError::Internal(e.to_string())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Answers to one `channels` survey, by request id.
type Surveys = Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Vec<(String, u32)>>>>;

/// Where the live stream of a channel is, as seen by this node (for gap detection).
#[derive(Default)]
struct LiveState {
    epoch: String,
    offset: u64,
}

pub(crate) struct Shared {
    pub(crate) cfg: RedisConfig,
    pub(crate) handler: Arc<dyn BrokerHandler>,
    pub(crate) node_id: String,
    live: Mutex<HashMap<String, LiveState>>,
    peers: Mutex<HashMap<String, (Instant, NodeInfo)>>,
    pending_channels: Surveys,
}

impl Shared {
    pub(crate) fn pub_channel(&self, channel: &str) -> String {
        format!("{}.pub.{}", self.cfg.prefix, channel)
    }

    pub(crate) fn control_channel(&self) -> String {
        format!("{}.control", self.cfg.prefix)
    }

    /// A message from a channel's pub/sub: checked for continuity, then handed to the hub.
    pub(crate) fn on_channel_message(&self, channel: &str, payload: &[u8]) {
        match wire::decode(payload) {
            Some(wire::ChannelMessage::Publication {
                offset,
                epoch,
                publication,
            }) => {
                if offset > 0 && !self.in_order(channel, offset, &epoch) {
                    tracing::warn!(channel, offset, "live stream gap: subscribers resubscribe");
                    self.handler.on_insufficient_state(channel);
                }
                self.handler.on_publication(channel, publication);
            }
            Some(wire::ChannelMessage::JoinLeave { info, join }) => {
                self.handler.on_join_leave(channel, &info, join);
            }
            None => tracing::warn!(channel, "undecodable message in pub/sub"),
        }
    }

    /// True when `offset` follows the last one seen (or none was seen yet).
    fn in_order(&self, channel: &str, offset: u64, epoch: &str) -> bool {
        let mut live = self.live.lock();
        let st = live.entry(channel.to_string()).or_default();
        let ok = st.offset == 0 || st.epoch != epoch || offset == st.offset + 1;
        // A new epoch is a new stream: the next offsets count from here.
        st.epoch = epoch.to_string();
        st.offset = offset;
        ok
    }

    pub(crate) fn forget_live(&self, channel: &str) {
        self.live.lock().remove(channel);
    }

    /// After a pub/sub reconnect anything may have been missed: every local subscriber of
    /// these channels resubscribes and recovers from its own position.
    pub(crate) fn on_resubscribed(&self, channels: &[String]) {
        for ch in channels {
            self.forget_live(ch);
            self.handler.on_insufficient_state(ch);
        }
    }

    pub(crate) fn on_control_message(self: &Arc<Self>, payload: &[u8], conn: &Conn) {
        let msg: ControlMessage = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable control message");
                return;
            }
        };
        match msg {
            ControlMessage::Node { info } => {
                if info.uid != self.node_id {
                    self.peers
                        .lock()
                        .insert(info.uid.clone(), (Instant::now(), info));
                }
            }
            ControlMessage::Command { command } => self.handler.on_control(command),
            ControlMessage::ChannelsRequest { id, from } if from != self.node_id => {
                let reply = ControlMessage::Channels {
                    id,
                    to: from,
                    from: self.node_id.clone(),
                    channels: self.handler.local_channels(),
                };
                let me = self.clone();
                let mut conn = conn.clone();
                tokio::spawn(async move {
                    let _ = me.send_control(&mut conn, &reply).await;
                });
            }
            ControlMessage::ChannelsRequest { .. } => {}
            ControlMessage::Channels {
                id, to, channels, ..
            } => {
                if to == self.node_id
                    && let Some(tx) = self.pending_channels.lock().get(&id)
                {
                    let _ = tx.send(channels);
                }
            }
        }
    }

    async fn send_control(&self, conn: &mut Conn, msg: &ControlMessage) -> Result<(), EngineError> {
        let payload = serde_json::to_vec(msg).map_err(|e| EngineError::Internal(e.to_string()))?;
        redis::cmd("PUBLISH")
            .arg(self.control_channel())
            .arg(payload)
            .query_async::<()>(conn)
            .await
            .map_err(err)
    }

    fn live_peers(&self) -> Vec<NodeInfo> {
        let mut peers = self.peers.lock();
        let eviction = self.cfg.node_eviction;
        peers.retain(|_, (seen, _)| seen.elapsed() <= eviction);
        peers.values().map(|(_, info)| info.clone()).collect()
    }
}

pub struct RedisEngine {
    shared: Arc<Shared>,
    conn: Conn,
    pubsub: pubsub::PubSubPool,
    publish: Script,
    history: Script,
    presence: Script,
    /// Presence entries of this node's clients, refreshed before they expire in Redis.
    local_presence: Arc<Mutex<HashMap<(String, String), ClientInfo>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RedisEngine {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RedisEngine {
    /// Connects to Redis and starts the pub/sub shards. `node_id` identifies this node in
    /// the cluster.
    pub async fn connect(
        cfg: RedisConfig,
        node_id: String,
        handler: Arc<dyn BrokerHandler>,
    ) -> Result<Self, EngineError> {
        cfg.validate().map_err(EngineError::Internal)?;
        let urls = cfg.urls();
        // Pub/sub rides a plain connection to the first address: classic PUBLISH reaches
        // every node of a Redis Cluster.
        let client = redis::Client::open(urls[0].as_str()).map_err(err)?;
        let conn = if cfg.cluster {
            let cluster = redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(cfg.command_timeout)
                .response_timeout(cfg.command_timeout)
                .build()
                .map_err(err)?;
            Conn::Cluster(cluster.get_async_connection().await.map_err(err)?)
        } else {
            let mgr_cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(cfg.command_timeout))
                .set_response_timeout(Some(cfg.command_timeout))
                .set_number_of_retries(1);
            Conn::Single(
                client
                    .get_connection_manager_with_config(mgr_cfg)
                    .await
                    .map_err(err)?,
            )
        };
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            handler,
            node_id,
            live: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            pending_channels: Mutex::new(HashMap::new()),
        });
        let pubsub = pubsub::PubSubPool::start(client, shared.clone(), conn.clone());
        pubsub.wait_ready(cfg.command_timeout).await?;
        let local_presence: Arc<Mutex<HashMap<(String, String), ClientInfo>>> = Default::default();
        let refresher = {
            let conn = conn.clone();
            let shared = shared.clone();
            let local = local_presence.clone();
            tokio::spawn(async move {
                let period = shared.cfg.presence_ttl / 3;
                loop {
                    tokio::time::sleep(period).await;
                    let entries: Vec<_> = local
                        .lock()
                        .iter()
                        .map(|((c, id), info)| (c.clone(), id.clone(), info.clone()))
                        .collect();
                    for (ch, id, info) in entries {
                        let mut conn = conn.clone();
                        if let Err(e) = add_presence(&shared, &mut conn, &ch, &id, &info).await {
                            tracing::warn!(error = %e, "presence refresh failed");
                            break;
                        }
                    }
                }
            })
        };
        Ok(Self {
            shared,
            conn,
            pubsub,
            publish: Script::new(scripts::PUBLISH),
            history: Script::new(scripts::HISTORY),
            presence: Script::new(scripts::PRESENCE),
            local_presence,
            tasks: vec![refresher],
        })
    }

    fn key(&self, kind: &str, channel: &str) -> String {
        format!("{}.{}.{{{}}}", self.shared.cfg.prefix, kind, channel)
    }
}

async fn add_presence(
    shared: &Shared,
    conn: &mut Conn,
    channel: &str,
    client_id: &str,
    info: &ClientInfo,
) -> Result<(), EngineError> {
    let p = &shared.cfg.prefix;
    let hash = format!("{p}.presence.{{{channel}}}");
    let zset = format!("{p}.presence_exp.{{{channel}}}");
    let ttl = shared.cfg.presence_ttl.as_millis() as u64;
    let json = serde_json::to_string(info).map_err(|e| EngineError::Internal(e.to_string()))?;
    Script::new(scripts::PRESENCE_ADD)
        .key(hash)
        .key(zset)
        .arg(client_id)
        .arg(json)
        .arg(now_ms() + ttl)
        .arg(ttl)
        .invoke_async::<()>(conn)
        .await
        .map_err(err)
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Parses `{offset, epoch, ...}` returned by the scripts.
fn position(v: &[Value]) -> Result<StreamPosition, EngineError> {
    let offset = v.first().and_then(as_u64);
    let epoch = v.get(1).and_then(as_string);
    match (offset, epoch) {
        (Some(offset), Some(epoch)) => Ok(StreamPosition { offset, epoch }),
        _ => Err(EngineError::Internal("unexpected script reply".into())),
    }
}

/// Stream entries `[[id, [field, value, ...]], ...]` → publications with their offsets.
fn entries(v: &Value) -> Vec<Publication> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(parts) = item else { continue };
        let (Some(id), Some(Value::Array(fields))) =
            (parts.first().and_then(as_string), parts.get(1))
        else {
            continue;
        };
        let Some(offset) = id.strip_prefix("0-").and_then(|o| o.parse::<u64>().ok()) else {
            continue;
        };
        let data = fields
            .chunks(2)
            .find(|kv| kv.first().and_then(as_string).as_deref() == Some("d"))
            .and_then(|kv| kv.get(1));
        let Some(Value::BulkString(json)) = data else {
            continue;
        };
        if let Ok(mut p) = serde_json::from_slice::<Publication>(json) {
            p.offset = offset;
            out.push(p);
        }
    }
    out
}

impl Engine for RedisEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        opts: &'a PublishOptions,
    ) -> BoxFut<'a, Result<StreamPosition, EngineError>> {
        Box::pin(async move {
            let json = serde_json::to_vec(&publication)
                .map_err(|e| EngineError::Internal(e.to_string()))?;
            let mut conn = self.conn.clone();
            if opts.history_size == 0 || opts.history_ttl.is_zero() {
                let mut msg = b"p0::".to_vec();
                msg.extend_from_slice(&json);
                redis::cmd("PUBLISH")
                    .arg(self.shared.pub_channel(channel))
                    .arg(msg)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(err)?;
                return Ok(StreamPosition::default());
            }
            let idem = format!(
                "{}.{}",
                self.key("idem", channel),
                opts.idempotency_key.as_deref().unwrap_or("")
            );
            let reply: Vec<Value> = self
                .publish
                .key(self.key("stream", channel))
                .key(self.key("meta", channel))
                .key(idem)
                .arg(json)
                .arg(opts.history_size)
                .arg(opts.history_ttl.as_millis() as u64)
                .arg(opts.history_meta_ttl.as_millis().max(1) as u64)
                .arg(new_epoch())
                .arg(self.shared.pub_channel(channel))
                .arg(IDEMPOTENCY_TTL_MS)
                .arg(if opts.idempotency_key.is_some() {
                    "1"
                } else {
                    "0"
                })
                .invoke_async(&mut conn)
                .await
                .map_err(err)?;
            position(&reply)
        })
    }

    fn publish_join_leave<'a>(
        &'a self,
        channel: &'a str,
        info: ClientInfo,
        join: bool,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("PUBLISH")
                .arg(self.shared.pub_channel(channel))
                .arg(wire::encode_join_leave(&info, join))
                .query_async::<()>(&mut conn)
                .await
                .map_err(err)
        })
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(self.pubsub.subscribe(channel))
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            self.shared.forget_live(channel);
            self.pubsub.unsubscribe(channel).await
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFut<'a, Result<HistoryResult, EngineError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let start = match &query.since {
                Some(p) => format!("(0-{}", p.offset),
                None => "-".to_string(),
            };
            // With `whole_within`, one more than it is enough to know the run is too long.
            let limit = match (query.limit, query.whole_within) {
                (Some(l), Some(w)) => Some(l.min(w.saturating_add(1))),
                (l, w) => l.or(w.map(|w| w.saturating_add(1))),
            };
            let count: i64 = match limit {
                None => -1,
                Some(n) => n as i64,
            };
            let reply: Vec<Value> = self
                .history
                .key(self.key("stream", channel))
                .key(self.key("meta", channel))
                .arg(new_epoch())
                .arg(query.meta_ttl.as_millis().max(1) as u64)
                .arg(start)
                .arg(count)
                .arg(if query.reverse { "1" } else { "0" })
                .invoke_async(&mut conn)
                .await
                .map_err(err)?;
            let position = position(&reply)?;
            let mut publications = reply.get(2).map(entries).unwrap_or_default();
            if query.whole_within.is_some_and(|w| publications.len() > w) {
                publications.clear();
            }
            Ok(HistoryResult {
                publications,
                position,
            })
        })
    }

    fn remove_history<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("DEL")
                .arg(self.key("stream", channel))
                .query_async::<()>(&mut conn)
                .await
                .map_err(err)
        })
    }

    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
        info: ClientInfo,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            add_presence(&self.shared, &mut conn, channel, client_id, &info).await?;
            self.local_presence
                .lock()
                .insert((channel.to_string(), client_id.to_string()), info);
            Ok(())
        })
    }

    fn remove_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            self.local_presence
                .lock()
                .remove(&(channel.to_string(), client_id.to_string()));
            let mut conn = self.conn.clone();
            redis::pipe()
                .hdel(self.key("presence", channel), client_id)
                .ignore()
                .zrem(self.key("presence_exp", channel), client_id)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
                .map_err(err)
        })
    }

    fn presence<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFut<'a, Result<BTreeMap<String, ClientInfo>, EngineError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let flat: Vec<String> = self
                .presence
                .key(self.key("presence", channel))
                .key(self.key("presence_exp", channel))
                .arg(now_ms())
                .invoke_async(&mut conn)
                .await
                .map_err(err)?;
            let mut out = BTreeMap::new();
            for kv in flat.chunks(2) {
                if let [id, json] = kv
                    && let Ok(info) = serde_json::from_str::<ClientInfo>(json)
                {
                    out.insert(id.clone(), info);
                }
            }
            Ok(out)
        })
    }

    fn publish_control<'a>(&'a self, cmd: ControlCommand) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.shared
                .send_control(&mut conn, &ControlMessage::Command { command: cmd })
                .await
        })
    }

    fn heartbeat<'a>(&'a self, info: NodeInfo) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            self.shared
                .send_control(&mut conn, &ControlMessage::Node { info })
                .await
        })
    }

    fn peers(&self) -> Vec<NodeInfo> {
        self.shared.live_peers()
    }

    fn channels<'a>(&'a self) -> BoxFut<'a, Result<Vec<(String, u32)>, EngineError>> {
        Box::pin(async move {
            let mut totals: HashMap<String, u32> = HashMap::new();
            for (ch, n) in self.shared.handler.local_channels() {
                *totals.entry(ch).or_default() += n;
            }
            let expected = self.shared.live_peers().len();
            if expected > 0 {
                let id = herald_core::node::new_id();
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                self.shared.pending_channels.lock().insert(id.clone(), tx);
                let mut conn = self.conn.clone();
                let sent = self
                    .shared
                    .send_control(
                        &mut conn,
                        &ControlMessage::ChannelsRequest {
                            id: id.clone(),
                            from: self.shared.node_id.clone(),
                        },
                    )
                    .await;
                if sent.is_ok() {
                    let deadline = tokio::time::Instant::now() + self.shared.cfg.command_timeout;
                    let mut answered = 0;
                    // Our own request comes back too; only peers' answers count.
                    while answered < expected {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(channels)) => {
                                answered += 1;
                                for (ch, n) in channels {
                                    *totals.entry(ch).or_default() += n;
                                }
                            }
                            _ => break,
                        }
                    }
                }
                self.shared.pending_channels.lock().remove(&id);
                sent?;
            }
            Ok(totals.into_iter().collect())
        })
    }

    fn healthy(&self) -> bool {
        self.pubsub.connected()
    }

    fn shares_state(&self) -> bool {
        true
    }

    fn put_state<'a>(
        &'a self,
        key: &'a str,
        value: Option<Vec<u8>>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let k = format!("{}.state.{key}", self.shared.cfg.prefix);
            let cmd = match value {
                // At least a millisecond: Redis refuses PX 0.
                Some(v) => redis::cmd("SET")
                    .arg(k)
                    .arg(v)
                    .arg("PX")
                    .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
                    .to_owned(),
                None => redis::cmd("DEL").arg(k).to_owned(),
            };
            cmd.query_async::<()>(&mut conn).await.map_err(err)
        })
    }

    fn get_state<'a>(&'a self, key: &'a str) -> BoxFut<'a, Result<Option<Vec<u8>>, EngineError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("GET")
                .arg(format!("{}.state.{key}", self.shared.cfg.prefix))
                .query_async::<Option<Vec<u8>>>(&mut conn)
                .await
                .map_err(err)
        })
    }
}

/// How often the node should call [`Engine::heartbeat`].
pub fn heartbeat_interval(cfg: &RedisConfig) -> Duration {
    cfg.node_heartbeat
}
