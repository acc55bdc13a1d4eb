//! Herald's NATS engine: history and presence in JetStream, node-to-node fan-out over NATS
//! subjects, so several nodes serve one channel space.
//!
//! Layout (P = `engine.nats.prefix`, T = the channel as a subject token, see [`wire::token`]):
//! - stream `P_history`, subjects `P.h.>`: one message per publication on `P.h.T`, headers
//!   carry its offset, epoch and expiry (see [`wire`]). A publish names the stream sequence
//!   of the channel's last message (`Nats-Expected-Last-Subject-Sequence`), so offsets are
//!   assigned without gaps or duplicates whichever node publishes. Idempotency keys are
//!   JetStream's `Nats-Msg-Id` within the stream's duplicate window.
//! - the stream republishes every stored message to `P.live.T` in stream order: that is the
//!   live feed a node subscribes to for the channels it has subscribers of. Publications
//!   without history and join/leave go to `P.live.T` directly.
//! - stream `P_presence`, subjects `P.p.T.<client>`: one message per present client, dropped
//!   by the stream after `presence_ttl` unless its node refreshes it.
//! - stream `P_state`, subjects `P.s.<key>`: the last value put under each key (MQTT
//!   persistent sessions); an empty message removes it. JetStream 2.9 has no per-message
//!   expiry, so the value carries its own and the stream drops entries after
//!   `stream_max_age`.
//! - subject `P.control`: node heartbeats, server API commands, channel surveys.
//! - subject `P.sync`: never answered; a request to it is a round trip that proves the
//!   server holds this node's subscriptions (see `Shared::sync`).

pub mod config;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream::LastRawMessageErrorKind};
use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use herald_core::engine::{
    BoxFut, ControlCommand, Engine, EngineError, HistoryQuery, HistoryResult, PublishOptions,
    StreamPosition, new_epoch,
};
use herald_core::hub::BrokerHandler;
use herald_protocol::api::NodeInfo;
use herald_protocol::client::{ClientInfo, Publication};
use parking_lot::Mutex;

pub use config::{ConfigError, NatsConfig};
use wire::ControlMessage;

/// How long an idempotency key is remembered (the history stream's duplicate window).
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);
/// Publishes racing on one channel retry this many times before giving up.
const MAX_PUBLISH_ATTEMPTS: usize = 64;
/// Channels whose last appended message this node remembers (beyond it the memory is
/// cleared and the next publish of each channel reads the position again).
const MAX_CACHED_POSITIONS: usize = 16_384;

fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

fn internal(e: impl std::fmt::Display) -> EngineError {
    EngineError::Internal(e.to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).map(|v| v.as_str())
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    header(headers, name)?.parse().ok()
}

/// What the history stream says about one message of a channel.
#[derive(Debug, Clone)]
struct Meta {
    seq: u64,
    offset: u64,
    epoch: String,
    prev: u64,
    expires: u64,
    meta_expires: u64,
    size: u64,
    published: u64,
    marker: bool,
}

impl Meta {
    fn parse(seq: u64, headers: Option<&HeaderMap>) -> Option<Self> {
        let h = headers?;
        Some(Self {
            seq,
            offset: header_u64(h, wire::OFFSET)?,
            epoch: header(h, wire::EPOCH)?.to_string(),
            prev: header_u64(h, wire::PREV).unwrap_or(0),
            expires: header_u64(h, wire::EXPIRES).unwrap_or(0),
            meta_expires: header_u64(h, wire::META_EXPIRES).unwrap_or(u64::MAX),
            size: header_u64(h, wire::SIZE).unwrap_or(0),
            published: header_u64(h, wire::PUBLISHED).unwrap_or(0),
            marker: header(h, wire::KIND) == Some("m"),
        })
    }
}

/// Answers to one `channels` survey, by request id.
type Surveys = Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Vec<(String, u32)>>>>;

enum Order {
    Next,
    Seen,
    /// Not the successor of the offset held (the payload; 0 when none was known).
    Gap(u64),
}

/// Where the live feed of a channel is, as seen by this node (for gap detection).
#[derive(Default)]
struct LiveState {
    epoch: String,
    offset: u64,
    /// The feed (re)started while the stream could not say where it stood (no stream
    /// leader): the next message may follow a hole this node cannot see.
    unknown: bool,
}

impl LiveState {
    /// Where `offset` stands against the last one seen; it becomes the last one seen.
    fn next(&mut self, offset: u64, epoch: &str) -> Order {
        if self.unknown {
            self.unknown = false;
            self.epoch = epoch.to_string();
            self.offset = offset;
            return Order::Gap(0);
        }
        if self.offset == 0 || self.epoch != epoch {
            // First seen, or a new epoch (a new stream): the next offsets count from here.
            self.epoch = epoch.to_string();
            self.offset = offset;
            return Order::Next;
        }
        if offset <= self.offset {
            return Order::Seen;
        }
        let held = self.offset;
        self.offset = offset;
        if held.checked_add(1) == Some(offset) {
            Order::Next
        } else {
            Order::Gap(held)
        }
    }
}

struct Shared {
    cfg: NatsConfig,
    handler: Arc<dyn BrokerHandler>,
    node_id: String,
    client: async_nats::Client,
    /// The history stream, to learn a channel's position when its live feed (re)starts.
    history: jetstream::stream::Stream,
    live: Mutex<HashMap<String, LiveState>>,
    peers: Mutex<HashMap<String, (Instant, NodeInfo)>>,
    pending_channels: Surveys,
    /// Channels this node receives, with the task reading each feed.
    subscribed: tokio::sync::Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
}

impl Shared {
    fn history_subject(&self, channel: &str) -> String {
        format!("{}.h.{}", self.cfg.prefix, wire::token(channel))
    }

    /// Where `put_state` keeps the value of `key`.
    fn state_subject(&self, key: &str) -> String {
        format!("{}.s.{}", self.cfg.prefix, wire::token(key))
    }

    fn live_subject(&self, channel: &str) -> String {
        format!("{}.live.{}", self.cfg.prefix, wire::token(channel))
    }

    fn presence_subject(&self, channel: &str, client: &str) -> String {
        format!(
            "{}.p.{}.{}",
            self.cfg.prefix,
            wire::token(channel),
            wire::token(client)
        )
    }

    fn control_subject(&self) -> String {
        format!("{}.control", self.cfg.prefix)
    }

    /// Returns once the server has processed everything this node sent before, its
    /// subscriptions included. `flush` only empties the socket buffer: a subscription can
    /// still be on its way while another node's message, sent on another connection, is
    /// matched without it. A request nobody answers comes back as "no responders" from the
    /// server itself, after what preceded it on this connection.
    async fn sync(&self) -> Result<(), EngineError> {
        let probe = self
            .client
            .request(format!("{}.sync", self.cfg.prefix), Bytes::new());
        match tokio::time::timeout(self.cfg.request_timeout, probe).await {
            Err(_) => Err(unavailable("nats round trip timed out")),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => Ok(()),
            Ok(Err(e)) => Err(unavailable(e)),
        }
    }

    /// A message of a channel's live feed: checked for continuity, then handed to the hub.
    fn on_live_message(&self, channel: &str, msg: &async_nats::Message) {
        let headers = msg.headers.as_ref();
        let kind = headers.and_then(|h| header(h, wire::KIND));
        match kind {
            Some("m") => {}
            Some(k @ ("j" | "l")) => match serde_json::from_slice::<ClientInfo>(&msg.payload) {
                Ok(info) => self.handler.on_join_leave(channel, &info, k == "j"),
                Err(_) => tracing::warn!(channel, "undecodable join/leave"),
            },
            _ => {
                let Ok(mut publication) = serde_json::from_slice::<Publication>(&msg.payload)
                else {
                    tracing::warn!(channel, "undecodable publication");
                    return;
                };
                let offset = headers
                    .and_then(|h| header_u64(h, wire::OFFSET))
                    .unwrap_or(0);
                let epoch = headers.and_then(|h| header(h, wire::EPOCH)).unwrap_or("");
                publication.offset = offset;
                if offset > 0 {
                    match self.in_order(channel, offset, epoch) {
                        Order::Next => {}
                        // Already delivered here (a republish seen twice): drop it.
                        Order::Seen => return,
                        Order::Gap(after) => {
                            tracing::warn!(
                                channel,
                                offset,
                                after,
                                "live feed gap: subscribers resubscribe"
                            );
                            self.handler.on_insufficient_state(channel);
                        }
                    }
                }
                self.handler.on_publication(channel, publication);
            }
        }
    }

    /// Where `offset` stands against the last one seen on this node.
    fn in_order(&self, channel: &str, offset: u64, epoch: &str) -> Order {
        self.live
            .lock()
            .entry(channel.to_string())
            .or_default()
            .next(offset, epoch)
    }

    fn forget_live(&self, channel: &str) {
        self.live.lock().remove(channel);
    }

    /// Starts gap detection of a channel's live feed at the stream's current position.
    ///
    /// In a NATS cluster a new subscription reaches the other servers asynchronously: the
    /// stream leader may republish a message before it knows this node listens, and that
    /// message is lost on the way. Without a known position the next message that does
    /// arrive would be taken as the start of the feed and the loss would go unnoticed; with
    /// it, the next message shows the gap and subscribers recover. `reset` replaces what
    /// this node saw before (after a reconnect, when its subscribers recover from here on).
    async fn seed_live(&self, channel: &str, reset: bool) {
        if !reset && self.live.lock().contains_key(channel) {
            return;
        }
        let meta = match self.last(&self.history_subject(channel)).await {
            Ok(Some(meta)) if meta.offset > 0 => meta,
            Ok(_) => return,
            Err(e) => {
                // Keep what this node saw: a gap then shows at the next message instead. If
                // it saw nothing, the next message is not taken for the start of the feed
                // (messages before it may have been lost on the way to this node, and
                // subscribers may have read history before them): subscribers recover.
                tracing::debug!(channel, error = %e, "live position unknown");
                self.live
                    .lock()
                    .entry(channel.to_string())
                    .or_insert_with(|| LiveState {
                        unknown: true,
                        ..Default::default()
                    });
                return;
            }
        };
        let mut live = self.live.lock();
        let st = live.entry(channel.to_string()).or_default();
        tracing::debug!(
            channel,
            reset,
            seen = st.offset,
            stream = meta.offset,
            "live position seeded"
        );
        if reset || st.offset == 0 || st.epoch != meta.epoch {
            st.epoch = meta.epoch;
            st.offset = meta.offset;
        } else {
            // Messages up to `meta.offset` are in history, which the subscriber that
            // triggered this reads next; anything after it must arrive live.
            st.offset = st.offset.max(meta.offset);
        }
    }

    /// The channel's last message in the history stream, from the stream leader.
    async fn last(&self, subject: &str) -> Result<Option<Meta>, EngineError> {
        match self.history.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Meta::parse(m.sequence, Some(&m.headers))
                .map(Some)
                .ok_or_else(|| internal("history message without Herald headers")),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// After a reconnect anything may have been missed: every local subscriber of the
    /// channels this node receives resubscribes and recovers from its own position.
    async fn on_reconnected(&self) {
        // The client resends its subscriptions on reconnect; the round trip makes sure the
        // server has them before subscribers read history.
        if let Err(e) = self.sync().await {
            tracing::warn!(error = %e, "nats round trip after reconnect failed");
        }
        let channels: Vec<String> = self.subscribed.lock().await.keys().cloned().collect();
        tracing::info!(channels = channels.len(), "nats reconnected");
        for ch in channels {
            // Seeded before subscribers are told, so every position they recover to is at
            // or after it and a message lost after it shows as a gap.
            self.seed_live(&ch, true).await;
            self.handler.on_insufficient_state(&ch);
        }
    }

    fn on_control_message(self: &Arc<Self>, payload: &[u8]) {
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
                tokio::spawn(async move {
                    let _ = me.send_control(&reply).await;
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

    /// Publishes on core NATS and waits until the server has it.
    async fn send_core(
        &self,
        subject: String,
        headers: Option<HeaderMap>,
        payload: Bytes,
    ) -> Result<(), EngineError> {
        match headers {
            Some(h) => self.client.publish_with_headers(subject, h, payload).await,
            None => self.client.publish(subject, payload).await,
        }
        .map_err(unavailable)?;
        tokio::time::timeout(self.cfg.request_timeout, self.client.flush())
            .await
            .map_err(|_| unavailable("nats flush timed out"))?
            .map_err(unavailable)
    }

    async fn send_control(&self, msg: &ControlMessage) -> Result<(), EngineError> {
        let payload = serde_json::to_vec(msg).map_err(internal)?;
        self.send_core(self.control_subject(), None, payload.into())
            .await
    }

    fn live_peers(&self) -> Vec<NodeInfo> {
        let mut peers = self.peers.lock();
        let eviction = self.cfg.node_eviction;
        peers.retain(|_, (seen, _)| seen.elapsed() <= eviction);
        peers.values().map(|(_, info)| info.clone()).collect()
    }
}

pub struct NatsEngine {
    shared: Arc<Shared>,
    js: jetstream::Context,
    history: jetstream::stream::Stream,
    presence: jetstream::stream::Stream,
    state: jetstream::stream::Stream,
    /// Whether JetStream took the last probe write: without a quorum it refuses every
    /// write while the connection itself stands.
    jetstream_ok: Arc<AtomicBool>,
    /// A probe is in flight (one at a time; it may take `request_timeout`).
    probing: Arc<AtomicBool>,
    /// Presence entries of this node's clients, refreshed before the stream drops them.
    local_presence: Arc<Mutex<HashMap<(String, String), ClientInfo>>>,
    /// The last message this node appended per channel. A publish appends right after it
    /// in one round trip; JetStream refuses the append when another message came in
    /// between (or the stream was lost), and only then is the position read again.
    appended: Mutex<HashMap<String, Meta>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for NatsEngine {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Ok(subs) = self.shared.subscribed.try_lock() {
            for t in subs.values() {
                t.abort();
            }
        }
    }
}

impl NatsEngine {
    /// Connects to NATS, creates the streams if needed and starts listening to the cluster.
    /// `node_id` identifies this node in the cluster.
    pub async fn connect(
        cfg: NatsConfig,
        node_id: String,
        handler: Arc<dyn BrokerHandler>,
    ) -> Result<Self, EngineError> {
        cfg.validate().map_err(internal)?;
        let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("herald {node_id}"))
            .connection_timeout(cfg.connect_timeout)
            .request_timeout(Some(cfg.request_timeout))
            .event_callback(move |event| {
                let tx = events_tx.clone();
                async move {
                    let _ = tx.send(event);
                }
            });
        if let Some(token) = &cfg.token {
            opts = opts.token(token.clone());
        }
        if let (Some(user), Some(password)) = (&cfg.user, &cfg.password) {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        if let Some(path) = &cfg.creds_file {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| internal(format!("engine.nats.creds_file: {e}")))?;
        }
        if let Some(path) = &cfg.tls_ca_file {
            opts = opts.add_root_certificates(path.clone()).require_tls(true);
        }
        let servers: Vec<async_nats::ServerAddr> = cfg
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| internal(format!("engine.nats.servers: {e}")))?;
        let client = opts.connect(servers).await.map_err(unavailable)?;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.request_timeout)
            .ack_timeout(cfg.request_timeout)
            .build(client.clone());

        let p = &cfg.prefix;
        let history = js
            .get_or_create_stream(jetstream::stream::Config {
                name: format!("{p}_history"),
                subjects: vec![format!("{p}.h.>")],
                max_messages_per_subject: cfg.max_history_per_channel,
                max_age: cfg.stream_max_age,
                duplicate_window: IDEMPOTENCY_WINDOW,
                num_replicas: cfg.replicas,
                storage: jetstream::stream::StorageType::File,
                // Stored messages only, in stream order: rejected or duplicate publishes
                // never reach subscribers.
                republish: Some(jetstream::stream::Republish {
                    source: format!("{p}.h.>"),
                    destination: format!("{p}.live.>"),
                    headers_only: false,
                }),
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let presence = js
            .get_or_create_stream(jetstream::stream::Config {
                name: format!("{p}_presence"),
                subjects: vec![format!("{p}.p.>")],
                max_messages_per_subject: 1,
                max_age: cfg.presence_ttl,
                num_replicas: cfg.replicas,
                storage: jetstream::stream::StorageType::Memory,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let state = js
            .get_or_create_stream(jetstream::stream::Config {
                name: format!("{p}_state"),
                subjects: vec![format!("{p}.s.>")],
                max_messages_per_subject: 1,
                max_age: cfg.stream_max_age,
                num_replicas: cfg.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;

        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            handler,
            node_id,
            client: client.clone(),
            history: history.clone(),
            live: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            pending_channels: Mutex::new(HashMap::new()),
            subscribed: tokio::sync::Mutex::new(HashMap::new()),
        });

        let mut control = client
            .subscribe(shared.control_subject())
            .await
            .map_err(unavailable)?;
        shared.sync().await?;
        let control_task = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Some(msg) = control.next().await {
                    shared.on_control_message(&msg.payload);
                }
            })
        };
        let events_task = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut lost = false;
                while let Some(event) = events_rx.recv().await {
                    match event {
                        async_nats::Event::Disconnected => {
                            tracing::warn!("nats connection lost; reconnecting");
                            lost = true;
                        }
                        async_nats::Event::Connected if lost => {
                            lost = false;
                            shared.on_reconnected().await;
                        }
                        other => tracing::debug!(event = %other, "nats event"),
                    }
                }
            })
        };
        let local_presence: Arc<Mutex<HashMap<(String, String), ClientInfo>>> = Default::default();
        let refresher = {
            let js = js.clone();
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
                        if let Err(e) = add_presence(&shared, &js, &ch, &id, &info).await {
                            tracing::warn!(error = %e, "presence refresh failed");
                            break;
                        }
                    }
                }
            })
        };
        Ok(Self {
            shared,
            js,
            history,
            presence,
            state,
            jetstream_ok: Arc::new(AtomicBool::new(true)),
            probing: Arc::new(AtomicBool::new(false)),
            local_presence,
            appended: Mutex::new(HashMap::new()),
            tasks: vec![control_task, events_task, refresher],
        })
    }

    async fn last(&self, subject: &str) -> Result<Option<Meta>, EngineError> {
        self.shared.last(subject).await
    }

    async fn message(&self, seq: u64) -> Result<Option<(Meta, Bytes)>, EngineError> {
        match self.history.get_raw_message(seq).await {
            Ok(m) => Ok(Meta::parse(m.sequence, Some(&m.headers)).map(|meta| (meta, m.payload))),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Appends to the channel's history stream right after `last` (the publish fails with
    /// `WrongLastSequence` when another message came in between).
    async fn append(
        &self,
        subject: &str,
        last: Option<&Meta>,
        headers: HeaderMap,
        payload: Bytes,
        msg_id: Option<String>,
    ) -> Result<Result<jetstream::publish::PublishAck, PublishErrorKind>, EngineError> {
        let mut msg = jetstream::message::PublishMessage::build()
            .payload(payload)
            .headers(headers)
            .expected_last_subject_sequence(last.map_or(0, |m| m.seq));
        if let Some(id) = msg_id {
            msg = msg.message_id(id);
        }
        let ack = match self.js.send_publish(subject.to_string(), msg).await {
            Ok(fut) => fut.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => Ok(Ok(ack)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Err(e.kind())),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The channel's live position: (last message, position), where the message is None
    /// when the channel has no stored position or its position expired.
    async fn position(&self, subject: &str) -> Result<(Option<Meta>, Option<Meta>), EngineError> {
        Ok(with_live(self.last(subject).await?))
    }
}

/// A channel's last message, and the same message as its live position unless the
/// position expired.
fn with_live(last: Option<Meta>) -> (Option<Meta>, Option<Meta>) {
    let live = last.clone().filter(|m| now_ms() < m.meta_expires);
    (last, live)
}

async fn add_presence(
    shared: &Shared,
    js: &jetstream::Context,
    channel: &str,
    client_id: &str,
    info: &ClientInfo,
) -> Result<(), EngineError> {
    let payload = serde_json::to_vec(info).map_err(internal)?;
    js.publish(shared.presence_subject(channel, client_id), payload.into())
        .await
        .map_err(unavailable)?
        .await
        .map_err(unavailable)?;
    Ok(())
}

impl Engine for NatsEngine {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        opts: &'a PublishOptions,
    ) -> BoxFut<'a, Result<StreamPosition, EngineError>> {
        Box::pin(async move {
            let json: Bytes = serde_json::to_vec(&publication).map_err(internal)?.into();
            if opts.history_size == 0 || opts.history_ttl.is_zero() {
                self.shared
                    .send_core(self.shared.live_subject(channel), None, json)
                    .await?;
                return Ok(StreamPosition::default());
            }
            let subject = self.shared.history_subject(channel);
            let msg_id = opts
                .idempotency_key
                .as_ref()
                .map(|k| format!("{}:{k}", wire::token(channel)));
            let mut cached = self.appended.lock().remove(channel);
            for _ in 0..MAX_PUBLISH_ATTEMPTS {
                let (last, live) = match cached.take() {
                    Some(m) => with_live(Some(m)),
                    None => self.position(&subject).await?,
                };
                let (offset, epoch) = match &live {
                    Some(m) => (
                        m.offset
                            .checked_add(1)
                            .ok_or_else(|| internal("channel offset overflow"))?,
                        m.epoch.clone(),
                    ),
                    None => (1, new_epoch()),
                };
                let now = now_ms();
                let mut h = HeaderMap::new();
                h.insert(wire::OFFSET, offset.to_string().as_str());
                h.insert(wire::EPOCH, epoch.as_str());
                let prev = live.as_ref().map_or(0, |m| m.seq);
                h.insert(wire::PREV, prev.to_string().as_str());
                let expires = now.saturating_add(ms(opts.history_ttl));
                h.insert(wire::EXPIRES, expires.to_string().as_str());
                let meta = now.saturating_add(ms(opts.history_meta_ttl).max(1));
                h.insert(wire::META_EXPIRES, meta.to_string().as_str());
                let size = u64::try_from(opts.history_size).unwrap_or(u64::MAX);
                h.insert(wire::SIZE, size.to_string().as_str());
                h.insert(wire::PUBLISHED, now.to_string().as_str());
                let appended = Meta {
                    seq: 0,
                    offset,
                    epoch: epoch.clone(),
                    prev,
                    expires,
                    meta_expires: meta,
                    size,
                    published: now,
                    marker: false,
                };
                match self
                    .append(&subject, last.as_ref(), h, json.clone(), msg_id.clone())
                    .await?
                {
                    Ok(ack) if ack.duplicate => {
                        // The first publish with this key: answer with its position.
                        let (meta, _) = self
                            .message(ack.sequence)
                            .await?
                            .ok_or_else(|| internal("duplicate's original is gone"))?;
                        return Ok(StreamPosition {
                            offset: meta.offset,
                            epoch: meta.epoch,
                        });
                    }
                    Ok(ack) => {
                        let mut positions = self.appended.lock();
                        if positions.len() >= MAX_CACHED_POSITIONS {
                            positions.clear();
                        }
                        positions.insert(
                            channel.to_string(),
                            Meta {
                                seq: ack.sequence,
                                ..appended
                            },
                        );
                        return Ok(StreamPosition { offset, epoch });
                    }
                    // Another publish took this offset: read the new last and retry.
                    Err(_) => tokio::task::yield_now().await,
                }
            }
            Err(unavailable("too many concurrent publishes on one channel"))
        })
    }

    fn publish_join_leave<'a>(
        &'a self,
        channel: &'a str,
        info: ClientInfo,
        join: bool,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let mut h = HeaderMap::new();
            h.insert(wire::KIND, if join { "j" } else { "l" });
            let payload = serde_json::to_vec(&info).map_err(internal)?;
            self.shared
                .send_core(self.shared.live_subject(channel), Some(h), payload.into())
                .await
        })
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            {
                let mut subs = self.shared.subscribed.lock().await;
                if !subs.contains_key(channel) {
                    let mut sub = self
                        .shared
                        .client
                        .subscribe(self.shared.live_subject(channel))
                        .await
                        .map_err(unavailable)?;
                    let shared = self.shared.clone();
                    let ch = channel.to_string();
                    tracing::debug!(channel, "live feed subscribed");
                    let task = tokio::spawn(async move {
                        while let Some(msg) = sub.next().await {
                            shared.on_live_message(&ch, &msg);
                        }
                        tracing::debug!(channel = ch, "live feed ended");
                    });
                    subs.insert(channel.to_string(), task);
                }
            }
            // Messages other nodes publish from here on reach this node.
            self.shared.sync().await?;
            self.shared.seed_live(channel, false).await;
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            // Aborting the reader drops its subscriber, which unsubscribes.
            if let Some(task) = self.shared.subscribed.lock().await.remove(channel) {
                task.abort();
            }
            self.shared.forget_live(channel);
            Ok(())
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFut<'a, Result<HistoryResult, EngineError>> {
        Box::pin(async move {
            let subject = self.shared.history_subject(channel);
            let mut attempts = 0;
            let top = loop {
                let (last, live) = self.position(&subject).await?;
                if let Some(m) = live {
                    break m;
                }
                // No position yet (or it expired): store one, so that every node answers
                // with the same epoch until the next publish.
                let mut h = HeaderMap::new();
                h.insert(wire::OFFSET, "0");
                let epoch = new_epoch();
                h.insert(wire::EPOCH, epoch.as_str());
                h.insert(wire::KIND, "m");
                let meta = now_ms().saturating_add(ms(query.meta_ttl).max(1));
                h.insert(wire::META_EXPIRES, meta.to_string().as_str());
                let seq = match self
                    .append(&subject, last.as_ref(), h, Bytes::new(), None)
                    .await?
                {
                    Ok(ack) => ack.sequence,
                    Err(_) => {
                        attempts += 1;
                        if attempts >= MAX_PUBLISH_ATTEMPTS {
                            return Err(unavailable("channel position keeps changing"));
                        }
                        continue;
                    }
                };
                break Meta {
                    seq,
                    offset: 0,
                    epoch,
                    prev: 0,
                    expires: 0,
                    meta_expires: meta,
                    size: 0,
                    published: 0,
                    marker: true,
                };
            };
            tracing::debug!(
                channel,
                top = top.offset,
                since = ?query.since.as_ref().map(|p| p.offset),
                "history position"
            );
            let position = StreamPosition {
                offset: top.offset,
                epoch: top.epoch.clone(),
            };
            let mut publications = Vec::new();
            // Offsets at or below this are not history (asked for, or beyond history_size).
            let since = query
                .since
                .as_ref()
                .map_or(0, |p| p.offset)
                .max(top.offset.saturating_sub(top.size));
            // A recovery that cannot be whole reads nothing: too many missed, or some of them
            // already beyond history_size.
            let asked = query.since.as_ref().map_or(0, |p| p.offset);
            let too_many = query
                .whole_within
                .is_some_and(|m| top.offset.saturating_sub(since) > m as u64 || asked < since);
            if query.limit != Some(0)
                && !too_many
                && !top.marker
                && now_ms() < top.expires
                && top.offset > since
            {
                // Walk back from the last message until `since` (or the start of the epoch,
                // or what the stream already dropped).
                let mut next = Some((top.clone(), None::<Bytes>));
                let mut successor_published = u64::MAX;
                while let Some((meta, payload)) = next.take() {
                    if meta.marker
                        || meta.epoch != top.epoch
                        || meta.offset <= since
                        || (successor_published != u64::MAX && meta.expires < successor_published)
                    {
                        break;
                    }
                    successor_published = meta.published;
                    let payload = match payload {
                        Some(p) => p,
                        None => match self.message(meta.seq).await? {
                            Some((_, p)) => p,
                            None => break,
                        },
                    };
                    if let Ok(mut p) = serde_json::from_slice::<Publication>(&payload) {
                        p.offset = meta.offset;
                        publications.push(p);
                    }
                    if query.reverse && query.limit.is_some_and(|l| publications.len() >= l) {
                        break;
                    }
                    if meta.prev == 0 {
                        break;
                    }
                    next = self.message(meta.prev).await?.map(|(m, p)| (m, Some(p)));
                }
                if !query.reverse {
                    publications.reverse();
                }
                if let Some(limit) = query.limit {
                    publications.truncate(limit);
                }
            }
            Ok(HistoryResult {
                publications,
                position,
            })
        })
    }

    fn remove_history<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let subject = self.shared.history_subject(channel);
            // A marker keeps the position (offset, epoch) while the publications go.
            for _ in 0..MAX_PUBLISH_ATTEMPTS {
                let Some(last) = self.last(&subject).await? else {
                    return Ok(());
                };
                let mut h = HeaderMap::new();
                h.insert(wire::OFFSET, last.offset.to_string().as_str());
                h.insert(wire::EPOCH, last.epoch.as_str());
                h.insert(wire::KIND, "m");
                h.insert(wire::META_EXPIRES, last.meta_expires.to_string().as_str());
                if self
                    .append(&subject, Some(&last), h, Bytes::new(), None)
                    .await?
                    .is_ok()
                {
                    self.history
                        .purge()
                        .filter(subject)
                        .keep(1)
                        .await
                        .map_err(unavailable)?;
                    return Ok(());
                }
            }
            Err(unavailable("channel position keeps changing"))
        })
    }

    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
        info: ClientInfo,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            add_presence(&self.shared, &self.js, channel, client_id, &info).await?;
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
            self.presence
                .purge()
                .filter(self.shared.presence_subject(channel, client_id))
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn presence<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFut<'a, Result<BTreeMap<String, ClientInfo>, EngineError>> {
        Box::pin(async move {
            use jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
            let filter = format!("{}.p.{}.*", self.shared.cfg.prefix, wire::token(channel));
            let consumer = self
                .presence
                .create_consumer(pull::Config {
                    filter_subject: filter,
                    deliver_policy: DeliverPolicy::LastPerSubject,
                    ack_policy: AckPolicy::None,
                    inactive_threshold: Duration::from_secs(30),
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?;
            let pending = consumer.cached_info().num_pending;
            let name = consumer.cached_info().name.clone();
            let mut out = BTreeMap::new();
            let result = async {
                if pending == 0 {
                    return Ok(());
                }
                let want = usize::try_from(pending).map_err(internal)?;
                let mut batch = consumer
                    .fetch()
                    .max_messages(want)
                    .expires(self.shared.cfg.request_timeout)
                    .messages()
                    .await
                    .map_err(unavailable)?;
                let mut got = 0;
                while got < want {
                    let Some(msg) = batch.next().await else { break };
                    let msg = msg.map_err(unavailable)?;
                    got += 1;
                    if let Ok(info) = serde_json::from_slice::<ClientInfo>(&msg.payload) {
                        out.insert(info.client.clone(), info);
                    }
                }
                Ok::<(), EngineError>(())
            }
            .await;
            // The consumer would go by itself after `inactive_threshold`; this is sooner.
            let stream = self.presence.clone();
            tokio::spawn(async move {
                let _ = stream.delete_consumer(&name).await;
            });
            result.map(|()| out)
        })
    }

    fn publish_control<'a>(&'a self, cmd: ControlCommand) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            self.shared
                .send_control(&ControlMessage::Command { command: cmd })
                .await
        })
    }

    fn heartbeat<'a>(&'a self, info: NodeInfo) -> BoxFut<'a, Result<(), EngineError>> {
        // With each heartbeat, a write JetStream must commit (an empty message on this
        // node's probe key of the state stream), beside the heartbeat so a slow answer
        // never delays it: readiness then turns red while JetStream cannot take writes (no
        // quorum, no leader), not only when the connection is down. A read would not do:
        // a leader that lost its quorum answers reads until it steps down.
        if !self.probing.swap(true, Ordering::AcqRel) {
            let (js, ok, probing) = (
                self.js.clone(),
                self.jetstream_ok.clone(),
                self.probing.clone(),
            );
            let subject = self
                .shared
                .state_subject(&format!("probe.{}", self.shared.node_id));
            tokio::spawn(async move {
                let now = match js.publish(subject, bytes::Bytes::new()).await {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if ok.swap(now, Ordering::AcqRel) != now {
                    if now {
                        tracing::info!("jetstream answers again");
                    } else {
                        tracing::warn!("jetstream does not answer (no stream leader or no quorum)");
                    }
                }
                probing.store(false, Ordering::Release);
            });
        }
        Box::pin(async move {
            self.shared
                .send_control(&ControlMessage::Node { info })
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
                let sent = self
                    .shared
                    .send_control(&ControlMessage::ChannelsRequest {
                        id: id.clone(),
                        from: self.shared.node_id.clone(),
                    })
                    .await;
                if sent.is_ok() {
                    let deadline = tokio::time::Instant::now() + self.shared.cfg.request_timeout;
                    let mut answered = 0;
                    while answered < expected {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(channels)) => {
                                answered += 1;
                                for (ch, n) in channels {
                                    let t = totals.entry(ch).or_default();
                                    *t = t.saturating_add(n);
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
        self.shared.client.connection_state() == async_nats::connection::State::Connected
            && self.jetstream_ok.load(Ordering::Acquire)
    }

    fn shares_state(&self) -> bool {
        true
    }

    fn put_state<'a>(
        &'a self,
        key: &'a str,
        value: Option<Vec<u8>>,
        _ttl: Duration,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let subject = self.shared.state_subject(key);
            self.js
                .publish(subject, value.unwrap_or_default().into())
                .await
                .map_err(unavailable)?
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn get_state<'a>(&'a self, key: &'a str) -> BoxFut<'a, Result<Option<Vec<u8>>, EngineError>> {
        Box::pin(async move {
            let subject = self.shared.state_subject(key);
            match self.state.get_last_raw_message_by_subject(&subject).await {
                Ok(m) if m.payload.is_empty() => Ok(None),
                Ok(m) => Ok(Some(m.payload.to_vec())),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(unavailable(e)),
            }
        })
    }
}

/// How often the node should call [`Engine::heartbeat`].
pub fn heartbeat_interval(cfg: &NatsConfig) -> Duration {
    cfg.node_heartbeat
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_started_without_a_known_position_does_not_trust_its_first_message() {
        // The stream had no leader when the feed (re)started: 1000..1007 may have been
        // republished before this node's subscription reached the new leader's server.
        let mut st = LiveState {
            unknown: true,
            ..Default::default()
        };
        assert!(matches!(st.next(1008, "e"), Order::Gap(0)));
        assert!(matches!(st.next(1009, "e"), Order::Next));
        assert!(matches!(st.next(1009, "e"), Order::Seen));
        assert!(matches!(st.next(1011, "e"), Order::Gap(1009)));
    }

    #[test]
    fn a_seeded_feed_continues_from_the_stream_position() {
        let mut st = LiveState {
            epoch: "e".into(),
            offset: 999,
            unknown: false,
        };
        assert!(matches!(st.next(999, "e"), Order::Seen));
        assert!(matches!(st.next(1000, "e"), Order::Next));
        assert!(matches!(st.next(1008, "e"), Order::Gap(1000)));
    }
}
