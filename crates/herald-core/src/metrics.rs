//! Every metric Herald exports is named here, and only here; `docs/metrics.md` documents them.
//!
//! `Metrics` holds pre-registered handles, so recording is an atomic add on a handle the node
//! already has: no name lookup and no allocation on the hot path. Deliveries are counted once
//! per broadcast (by the number of local subscribers), bytes once per socket read or write.
//! Figures that are state rather than events (connected clients, channels, queued bytes,
//! process memory) are read at scrape time by `Metrics::refresh`.
//!
//! Labels have bounded values: transport names, command names, error and disconnect codes,
//! server API method names from a fixed list, engine operation names. Never a channel or user.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_protocol::api::NodeInfo;
use herald_protocol::client::{ClientInfo, Command, Publication};
use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, NoopRecorder, Recorder,
    SharedString, Unit,
};
use parking_lot::Mutex;

use crate::engine::{
    BoxFut, ControlCommand, Engine, EngineError, HistoryQuery, HistoryResult, PublishOptions,
    StreamPosition,
};

// ---- names ------------------------------------------------------------------------------

/// Gauge {transport}: open client transport connections (connected or not yet).
pub const CONNECTIONS: &str = "herald_connections";
/// Gauge: connected clients (connect command accepted).
pub const CLIENTS: &str = "herald_clients";
/// Gauge: distinct users among connected clients.
pub const USERS: &str = "herald_users";
/// Gauge: subscriptions on this node.
pub const SUBSCRIPTIONS: &str = "herald_subscriptions";
/// Gauge: channels with at least one subscriber on this node.
pub const CHANNELS: &str = "herald_channels";
/// Counter: accepted connect commands.
pub const CONNECTS: &str = "herald_client_connects_total";
/// Counter {code}: ended client connections by disconnect code (3000: closed by the client or
/// the network).
pub const DISCONNECTS: &str = "herald_client_disconnects_total";
/// Counter: connections closed because their queue passed `client.max_queue_bytes` (3008).
pub const SLOW_CONSUMERS: &str = "herald_slow_consumer_disconnects_total";
/// Counter {source}: publications accepted by this node (`api` or `client`).
pub const PUBLICATIONS: &str = "herald_publications_total";
/// Counter: publications queued to local subscribers (one per subscriber).
pub const DELIVERIES: &str = "herald_deliveries_total";
/// Counter {transport}: bytes read from clients.
pub const BYTES_RECEIVED: &str = "herald_transport_received_bytes_total";
/// Counter {transport}: bytes written to clients.
pub const BYTES_SENT: &str = "herald_transport_sent_bytes_total";
/// Gauge: bytes queued in connection writers, not yet written.
pub const QUEUE_BYTES: &str = "herald_writer_queue_bytes";
/// Counter {command}: client commands handled.
pub const COMMANDS: &str = "herald_commands_total";
/// Counter {command, code}: client commands answered with an error.
pub const COMMAND_ERRORS: &str = "herald_command_errors_total";
/// Counter {method, result}: server API calls (`result`: ok, error, unauthorized, not_found).
pub const API_CALLS: &str = "herald_api_calls_total";
/// Histogram: seconds from a publication reaching this node's hub to the end of the socket
/// write that carries it (once per write, for the oldest publication in it).
pub const DELIVERY_LATENCY: &str = "herald_delivery_latency_seconds";
/// Counter {op}: engine operations.
pub const ENGINE_OPS: &str = "herald_engine_operations_total";
/// Counter {op}: engine operations that failed.
pub const ENGINE_ERRORS: &str = "herald_engine_errors_total";
/// Gauge: 1 while the node drains (readiness fails), else 0.
pub const DRAINING: &str = "herald_draining";
/// Gauge: seconds since the node started.
pub const UPTIME: &str = "herald_uptime_seconds";
/// Gauge: resident memory of the process (from /proc/self/status).
pub const RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
/// Gauge: open file descriptors of the process (from /proc/self/fd).
pub const OPEN_FDS: &str = "process_open_fds";
/// Counter {reason}: connection attempts refused before any session began (`origin`: 403 for
/// an origin not in `client.allowed_origins`; `max_connections`: 503 at
/// `client.max_connections`).
pub const CONNECTIONS_REFUSED: &str = "herald_connections_refused_total";
/// Counter {proxy, result}: proxy requests to the backend (`result`: ok, error, disconnect,
/// unreachable, timeout, bad_status, bad_response).
pub const PROXY_REQUESTS: &str = "herald_proxy_requests_total";
/// Counter {transport, code}: connections the server closed for a protocol error (see
/// `Disconnect::is_protocol_error`: bad frames, refused tokens, floods, missing pongs).
pub const PROTOCOL_ERRORS: &str = "herald_protocol_error_disconnects_total";

/// Upper bounds of the delivery latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Client commands, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandKind {
    Connect,
    Subscribe,
    Unsubscribe,
    Publish,
    Presence,
    PresenceStats,
    History,
    Refresh,
    SubRefresh,
    Rpc,
    Send,
    Pong,
    Unknown,
}

impl CommandKind {
    const ALL: [CommandKind; 13] = [
        Self::Connect,
        Self::Subscribe,
        Self::Unsubscribe,
        Self::Publish,
        Self::Presence,
        Self::PresenceStats,
        Self::History,
        Self::Refresh,
        Self::SubRefresh,
        Self::Rpc,
        Self::Send,
        Self::Pong,
        Self::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
            Self::Publish => "publish",
            Self::Presence => "presence",
            Self::PresenceStats => "presence_stats",
            Self::History => "history",
            Self::Refresh => "refresh",
            Self::SubRefresh => "sub_refresh",
            Self::Rpc => "rpc",
            Self::Send => "send",
            Self::Pong => "pong",
            Self::Unknown => "unknown",
        }
    }

    /// Which command this is, in the order the session dispatches them.
    pub fn of(cmd: &Command) -> Self {
        if cmd.is_pong() {
            Self::Pong
        } else if cmd.connect.is_some() {
            Self::Connect
        } else if cmd.subscribe.is_some() {
            Self::Subscribe
        } else if cmd.unsubscribe.is_some() {
            Self::Unsubscribe
        } else if cmd.publish.is_some() {
            Self::Publish
        } else if cmd.presence.is_some() {
            Self::Presence
        } else if cmd.presence_stats.is_some() {
            Self::PresenceStats
        } else if cmd.history.is_some() {
            Self::History
        } else if cmd.refresh.is_some() {
            Self::Refresh
        } else if cmd.sub_refresh.is_some() {
            Self::SubRefresh
        } else if cmd.rpc.is_some() {
            Self::Rpc
        } else if cmd.send.is_some() {
            Self::Send
        } else {
            Self::Unknown
        }
    }
}

/// Server API methods, as labelled; anything else is `unknown` (the label set stays bounded
/// whatever a caller puts in the URL).
pub const API_METHODS: &[&str] = &[
    "publish",
    "broadcast",
    "subscribe",
    "unsubscribe",
    "disconnect",
    "refresh",
    "presence",
    "presence_stats",
    "history",
    "history_remove",
    "channels",
    "info",
    "batch",
    "drain",
];

/// The label value for a server API method name.
pub fn api_method_label(method: &str) -> &'static str {
    API_METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("unknown")
}

/// Engine operations, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineOp {
    Publish,
    PublishJoinLeave,
    Subscribe,
    Unsubscribe,
    History,
    RemoveHistory,
    AddPresence,
    RemovePresence,
    Presence,
    PublishControl,
    Heartbeat,
    Channels,
    PutState,
    GetState,
}

impl EngineOp {
    const ALL: [EngineOp; 14] = [
        Self::Publish,
        Self::PublishJoinLeave,
        Self::Subscribe,
        Self::Unsubscribe,
        Self::History,
        Self::RemoveHistory,
        Self::AddPresence,
        Self::RemovePresence,
        Self::Presence,
        Self::PublishControl,
        Self::Heartbeat,
        Self::Channels,
        Self::PutState,
        Self::GetState,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::PublishJoinLeave => "publish_join_leave",
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
            Self::History => "history",
            Self::RemoveHistory => "remove_history",
            Self::AddPresence => "add_presence",
            Self::RemovePresence => "remove_presence",
            Self::Presence => "presence",
            Self::PublishControl => "publish_control",
            Self::Heartbeat => "heartbeat",
            Self::Channels => "channels",
            Self::PutState => "put_state",
            Self::GetState => "get_state",
        }
    }
}

// ---- handles ----------------------------------------------------------------------------

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

type SharedRecorder = Arc<dyn Recorder + Send + Sync>;

/// One transport's handles (`websocket`, `sse`, `http_stream`, …).
pub struct TransportMetrics {
    /// The `transport` label.
    pub name: &'static str,
    connections: Gauge,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    recorder: SharedRecorder,
    protocol_errors: Mutex<HashMap<u16, Counter>>,
}

impl TransportMetrics {
    /// A connection of this transport was closed for a protocol error with `code`.
    pub fn protocol_error(&self, code: u16) {
        self.protocol_errors
            .lock()
            .entry(code)
            .or_insert_with(|| {
                labelled_counter(
                    &*self.recorder,
                    PROTOCOL_ERRORS,
                    vec![
                        Label::new("transport", self.name),
                        Label::new("code", code.to_string()),
                    ],
                )
            })
            .increment(1);
    }

    /// Counts an open connection until the returned guard is dropped.
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.increment(1.0);
        ConnectionGuard(self.clone())
    }
}

/// Keeps a connection counted in `herald_connections` while alive.
pub struct ConnectionGuard(Arc<TransportMetrics>);

impl ConnectionGuard {
    /// The transport's metrics the connection is counted in.
    pub fn transport(&self) -> &TransportMetrics {
        &self.0
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.decrement(1.0);
    }
}

/// The node's metric handles.
pub struct Metrics {
    recorder: SharedRecorder,
    connects: Counter,
    slow_consumers: Counter,
    publications_api: AtomicU64,
    publications_client: AtomicU64,
    deliveries: AtomicU64,
    publications_api_counter: Counter,
    publications_client_counter: Counter,
    deliveries_counter: Counter,
    delivery_latency: Histogram,
    commands: Vec<Counter>,
    engine_ops: Vec<Counter>,
    engine_errors: Vec<Counter>,
    clients: Gauge,
    users: Gauge,
    subscriptions: Gauge,
    channels: Gauge,
    queue_bytes: Gauge,
    draining: Gauge,
    uptime: Gauge,
    resident_memory: Gauge,
    open_fds: Gauge,
    transports: Mutex<HashMap<&'static str, Arc<TransportMetrics>>>,
    proxy_requests: Mutex<HashMap<(&'static str, &'static str), Counter>>,
    disconnects: Mutex<HashMap<u16, Counter>>,
    command_errors: Mutex<HashMap<(CommandKind, u32), Counter>>,
    api_calls: Mutex<HashMap<(&'static str, &'static str), Counter>>,
    refused: Mutex<HashMap<&'static str, Counter>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn describe(r: &dyn Recorder) {
    let c = |name: &'static str, unit: Option<Unit>, help: &'static str| {
        r.describe_counter(KeyName::from(name), unit, SharedString::from(help))
    };
    c(CONNECTS, None, "Accepted connect commands.");
    c(
        CONNECTIONS_REFUSED,
        None,
        "Connection attempts refused before a session began, by reason.",
    );
    c(
        PROXY_REQUESTS,
        None,
        "Proxy requests to the backend, by proxy and result.",
    );
    c(
        PROTOCOL_ERRORS,
        None,
        "Connections closed for a protocol error, by transport and disconnect code.",
    );
    c(
        DISCONNECTS,
        None,
        "Ended client connections by disconnect code (3000: closed by the client or network).",
    );
    c(
        SLOW_CONSUMERS,
        None,
        "Connections closed because their queue passed client.max_queue_bytes (3008).",
    );
    c(
        PUBLICATIONS,
        None,
        "Publications accepted by this node, by source (api, client).",
    );
    c(
        DELIVERIES,
        None,
        "Publications queued to local subscribers (one per subscriber).",
    );
    c(
        BYTES_RECEIVED,
        Some(Unit::Bytes),
        "Bytes read from clients, by transport.",
    );
    c(
        BYTES_SENT,
        Some(Unit::Bytes),
        "Bytes written to clients, by transport.",
    );
    c(COMMANDS, None, "Client commands handled, by command.");
    c(
        COMMAND_ERRORS,
        None,
        "Client commands answered with an error, by command and error code.",
    );
    c(
        API_CALLS,
        None,
        "Server API calls by method and result (ok, error, unauthorized, not_found).",
    );
    c(ENGINE_OPS, None, "Engine operations, by operation.");
    c(
        ENGINE_ERRORS,
        None,
        "Failed engine operations, by operation.",
    );
    let g = |name: &'static str, unit: Option<Unit>, help: &'static str| {
        r.describe_gauge(KeyName::from(name), unit, SharedString::from(help))
    };
    g(
        CONNECTIONS,
        None,
        "Open client transport connections, by transport.",
    );
    g(CLIENTS, None, "Connected clients.");
    g(USERS, None, "Distinct users among connected clients.");
    g(SUBSCRIPTIONS, None, "Subscriptions on this node.");
    g(CHANNELS, None, "Channels with subscribers on this node.");
    g(
        QUEUE_BYTES,
        Some(Unit::Bytes),
        "Bytes queued in connection writers, not yet written.",
    );
    g(DRAINING, None, "1 while the node drains, else 0.");
    g(
        UPTIME,
        Some(Unit::Seconds),
        "Seconds since the node started.",
    );
    g(
        RESIDENT_MEMORY,
        Some(Unit::Bytes),
        "Resident memory of the process.",
    );
    g(OPEN_FDS, None, "Open file descriptors of the process.");
    r.describe_histogram(
        KeyName::from(DELIVERY_LATENCY),
        Some(Unit::Seconds),
        SharedString::from(
            "From a publication reaching this node's hub to the end of the socket write \
             carrying it (once per write, oldest publication in it).",
        ),
    );
}

fn counter(r: &dyn Recorder, name: &'static str) -> Counter {
    r.register_counter(&Key::from_static_name(name), &METADATA)
}

fn gauge(r: &dyn Recorder, name: &'static str) -> Gauge {
    r.register_gauge(&Key::from_static_name(name), &METADATA)
}

fn labelled_counter(r: &dyn Recorder, name: &'static str, labels: Vec<Label>) -> Counter {
    r.register_counter(&Key::from_parts(name, labels), &METADATA)
}

impl Metrics {
    /// Handles registered in `recorder` (e.g. a Prometheus recorder owned by the server).
    pub fn new(recorder: SharedRecorder) -> Self {
        let r: &dyn Recorder = &*recorder;
        describe(r);
        let publications = |source: &'static str| {
            labelled_counter(r, PUBLICATIONS, vec![Label::new("source", source)])
        };
        let per_op = |name: &'static str| {
            EngineOp::ALL
                .iter()
                .map(|op| labelled_counter(r, name, vec![Label::new("op", op.name())]))
                .collect()
        };
        Self {
            connects: counter(r, CONNECTS),
            slow_consumers: counter(r, SLOW_CONSUMERS),
            publications_api: AtomicU64::new(0),
            publications_client: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            publications_api_counter: publications("api"),
            publications_client_counter: publications("client"),
            deliveries_counter: counter(r, DELIVERIES),
            delivery_latency: r
                .register_histogram(&Key::from_static_name(DELIVERY_LATENCY), &METADATA),
            commands: CommandKind::ALL
                .iter()
                .map(|k| labelled_counter(r, COMMANDS, vec![Label::new("command", k.name())]))
                .collect(),
            engine_ops: per_op(ENGINE_OPS),
            engine_errors: per_op(ENGINE_ERRORS),
            clients: gauge(r, CLIENTS),
            users: gauge(r, USERS),
            subscriptions: gauge(r, SUBSCRIPTIONS),
            channels: gauge(r, CHANNELS),
            queue_bytes: gauge(r, QUEUE_BYTES),
            draining: gauge(r, DRAINING),
            uptime: gauge(r, UPTIME),
            resident_memory: gauge(r, RESIDENT_MEMORY),
            open_fds: gauge(r, OPEN_FDS),
            transports: Mutex::new(HashMap::new()),
            proxy_requests: Mutex::new(HashMap::new()),
            disconnects: Mutex::new(HashMap::new()),
            command_errors: Mutex::new(HashMap::new()),
            api_calls: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            recorder,
        }
    }

    /// Handles that record nothing (a node built without an exporter, unit tests).
    pub fn noop() -> Self {
        Self::new(Arc::new(NoopRecorder))
    }

    /// The handles of one transport; fetch once per connection.
    pub fn transport(&self, name: &'static str) -> Arc<TransportMetrics> {
        let mut map = self.transports.lock();
        map.entry(name)
            .or_insert_with(|| {
                let r: &dyn Recorder = &*self.recorder;
                let l = || vec![Label::new("transport", name)];
                Arc::new(TransportMetrics {
                    name,
                    recorder: self.recorder.clone(),
                    protocol_errors: Mutex::new(HashMap::new()),
                    connections: r.register_gauge(&Key::from_parts(CONNECTIONS, l()), &METADATA),
                    bytes_received: labelled_counter(r, BYTES_RECEIVED, l()),
                    bytes_sent: labelled_counter(r, BYTES_SENT, l()),
                })
            })
            .clone()
    }

    pub fn connected(&self) {
        self.connects.increment(1);
    }

    /// A connection ended with `code` (3000 when the client or the network closed it).
    pub fn disconnected(&self, code: u16) {
        if code == herald_protocol::Disconnect::SLOW.code {
            self.slow_consumers.increment(1);
        }
        self.disconnects
            .lock()
            .entry(code)
            .or_insert_with(|| {
                labelled_counter(
                    &*self.recorder,
                    DISCONNECTS,
                    vec![Label::new("code", code.to_string())],
                )
            })
            .increment(1);
    }

    /// A client command was handled; `error` is the error code it was answered with.
    pub fn command(&self, kind: CommandKind, error: Option<u32>) {
        if let Some(c) = self.commands.get(kind as usize) {
            c.increment(1);
        }
        if let Some(code) = error {
            self.command_errors
                .lock()
                .entry((kind, code))
                .or_insert_with(|| {
                    labelled_counter(
                        &*self.recorder,
                        COMMAND_ERRORS,
                        vec![
                            Label::new("command", kind.name()),
                            Label::new("code", code.to_string()),
                        ],
                    )
                })
                .increment(1);
        }
    }

    /// A connection attempt was refused before any session began; `reason` is a fixed word
    /// (`origin`, `max_connections`).
    pub fn refused(&self, reason: &'static str) {
        self.refused
            .lock()
            .entry(reason)
            .or_insert_with(|| {
                labelled_counter(
                    &*self.recorder,
                    CONNECTIONS_REFUSED,
                    vec![Label::new("reason", reason)],
                )
            })
            .increment(1);
    }

    /// A proxy request ended with `result`.
    pub fn proxy(&self, proxy: &'static str, result: &'static str) {
        self.proxy_requests
            .lock()
            .entry((proxy, result))
            .or_insert_with(|| {
                labelled_counter(
                    &*self.recorder,
                    PROXY_REQUESTS,
                    vec![Label::new("proxy", proxy), Label::new("result", result)],
                )
            })
            .increment(1);
    }

    /// A server API call ended; `method` from `api_method_label`.
    pub fn api_call(&self, method: &'static str, result: &'static str) {
        self.api_calls
            .lock()
            .entry((method, result))
            .or_insert_with(|| {
                labelled_counter(
                    &*self.recorder,
                    API_CALLS,
                    vec![Label::new("method", method), Label::new("result", result)],
                )
            })
            .increment(1);
    }

    /// A publication was accepted; `from_client`: published by a client, else by the API.
    pub fn published(&self, from_client: bool) {
        if from_client {
            self.publications_client.fetch_add(1, Ordering::Relaxed);
        } else {
            self.publications_api.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One broadcast queued to `n` local subscribers.
    pub fn delivered(&self, n: usize) {
        self.deliveries.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A socket write carrying publications finished; `oldest` is when the oldest of them
    /// reached the hub.
    pub fn written(&self, oldest: Instant) {
        self.delivery_latency.record(oldest.elapsed().as_secs_f64());
    }

    fn engine(&self, op: EngineOp, failed: bool) {
        if let Some(c) = self.engine_ops.get(op as usize) {
            c.increment(1);
        }
        if failed && let Some(c) = self.engine_errors.get(op as usize) {
            c.increment(1);
        }
    }

    /// Publications accepted (api + client) and deliveries so far, for the admin page.
    pub fn totals(&self) -> Totals {
        let api = self.publications_api.load(Ordering::Relaxed);
        let client = self.publications_client.load(Ordering::Relaxed);
        Totals {
            publications: api + client,
            deliveries: self.deliveries.load(Ordering::Relaxed),
        }
    }

    /// Sets the scrape-time figures: hub counts, queued bytes, process memory and files.
    pub fn refresh(&self, node: &crate::Node) {
        let s = node.hub.stats();
        self.clients.set(s.clients as f64);
        self.users.set(s.users as f64);
        self.subscriptions.set(s.subscriptions as f64);
        self.channels.set(s.channels as f64);
        let queued: usize = node.hub.all_conns().iter().map(|c| c.queued_bytes()).sum();
        self.queue_bytes.set(queued as f64);
        self.draining
            .set(if node.is_draining() { 1.0 } else { 0.0 });
        self.uptime.set(node.started.elapsed().as_secs_f64());
        let p = process_stats();
        self.resident_memory.set(p.resident_bytes as f64);
        self.open_fds.set(p.open_fds as f64);
        self.publications_api_counter
            .absolute(self.publications_api.load(Ordering::Relaxed));
        self.publications_client_counter
            .absolute(self.publications_client.load(Ordering::Relaxed));
        self.deliveries_counter
            .absolute(self.deliveries.load(Ordering::Relaxed));
    }
}

/// Running totals for rates (messages/s in and out).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Totals {
    pub publications: u64,
    pub deliveries: u64,
}

/// What the process uses, from /proc/self (zeros where /proc is absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessStats {
    pub resident_bytes: u64,
    pub open_fds: u64,
}

pub fn process_stats() -> ProcessStats {
    let resident_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    ProcessStats {
        resident_bytes,
        open_fds,
    }
}

// ---- engine instrumentation -------------------------------------------------------------

/// Wraps the node's engine to count every operation and failure, and to log failures once,
/// naming the operation.
///
/// Every `Engine` method must be forwarded here, those with a default body included
/// (`peers`, `healthy`): a method left out would silently use the default instead of the
/// real engine's.
pub struct InstrumentedEngine {
    inner: Arc<dyn Engine>,
    metrics: Arc<Metrics>,
}

impl InstrumentedEngine {
    pub fn new(inner: Arc<dyn Engine>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn track<'a, T: Send + 'a>(
        &'a self,
        op: EngineOp,
        fut: BoxFut<'a, Result<T, EngineError>>,
    ) -> BoxFut<'a, Result<T, EngineError>> {
        Box::pin(async move {
            let r = fut.await;
            if let Err(e) = &r {
                tracing::warn!(op = op.name(), engine = self.inner.name(), error = %e, "engine operation failed");
            }
            self.metrics.engine(op, r.is_err());
            r
        })
    }
}

impl Engine for InstrumentedEngine {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        opts: &'a PublishOptions,
    ) -> BoxFut<'a, Result<StreamPosition, EngineError>> {
        self.track(
            EngineOp::Publish,
            self.inner.publish(channel, publication, opts),
        )
    }

    fn publish_join_leave<'a>(
        &'a self,
        channel: &'a str,
        info: ClientInfo,
        join: bool,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        self.track(
            EngineOp::PublishJoinLeave,
            self.inner.publish_join_leave(channel, info, join),
        )
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        self.track(EngineOp::Subscribe, self.inner.subscribe(channel))
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        self.track(EngineOp::Unsubscribe, self.inner.unsubscribe(channel))
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFut<'a, Result<HistoryResult, EngineError>> {
        self.track(EngineOp::History, self.inner.history(channel, query))
    }

    fn remove_history<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        self.track(EngineOp::RemoveHistory, self.inner.remove_history(channel))
    }

    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
        info: ClientInfo,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        self.track(
            EngineOp::AddPresence,
            self.inner.add_presence(channel, client_id, info),
        )
    }

    fn remove_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        self.track(
            EngineOp::RemovePresence,
            self.inner.remove_presence(channel, client_id),
        )
    }

    fn presence<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFut<'a, Result<std::collections::BTreeMap<String, ClientInfo>, EngineError>> {
        self.track(EngineOp::Presence, self.inner.presence(channel))
    }

    fn publish_control<'a>(&'a self, cmd: ControlCommand) -> BoxFut<'a, Result<(), EngineError>> {
        self.track(EngineOp::PublishControl, self.inner.publish_control(cmd))
    }

    fn heartbeat<'a>(&'a self, info: NodeInfo) -> BoxFut<'a, Result<(), EngineError>> {
        self.track(EngineOp::Heartbeat, self.inner.heartbeat(info))
    }

    fn peers(&self) -> Vec<NodeInfo> {
        self.inner.peers()
    }

    fn channels<'a>(&'a self) -> BoxFut<'a, Result<Vec<(String, u32)>, EngineError>> {
        self.track(EngineOp::Channels, self.inner.channels())
    }

    fn healthy(&self) -> bool {
        self.inner.healthy()
    }

    fn shares_state(&self) -> bool {
        self.inner.shares_state()
    }

    fn put_state<'a>(
        &'a self,
        key: &'a str,
        value: Option<Vec<u8>>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        self.track(EngineOp::PutState, self.inner.put_state(key, value, ttl))
    }

    fn get_state<'a>(&'a self, key: &'a str) -> BoxFut<'a, Result<Option<Vec<u8>>, EngineError>> {
        self.track(EngineOp::GetState, self.inner.get_state(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_kinds_index_their_counters() {
        for (i, k) in CommandKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{}", k.name());
        }
        for (i, op) in EngineOp::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i, "{}", op.name());
        }
    }

    #[test]
    fn api_method_labels_are_bounded() {
        assert_eq!(api_method_label("publish"), "publish");
        assert_eq!(api_method_label("../../etc/passwd"), "unknown");
    }

    #[test]
    fn totals_add_up() {
        let m = Metrics::noop();
        m.published(true);
        m.published(false);
        m.delivered(5);
        let t = m.totals();
        assert_eq!((t.publications, t.deliveries), (2, 5));
    }

    #[test]
    fn process_stats_read_proc() {
        if std::path::Path::new("/proc/self/status").exists() {
            let p = process_stats();
            assert!(p.resident_bytes > 0);
            assert!(p.open_fds > 0);
        }
    }
}
