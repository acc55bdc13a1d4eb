//! The per-connection state machine: connect and auth, subscribe with recovery, publish,
//! presence, history, ping/pong, token refresh and limits. It does no socket I/O, reads no
//! clock and awaits nothing: the connection driver hands it frames, controls, the time
//! (`Now`) and the completions of the requests it asked for, and drains the connection's
//! outbox, where the session queues frames already encoded for its client's mode (full
//! protocol or bare pushes).
//!
//! Engine, proxy and token-key work is a [`Request`]: the session asks for it and waits for
//! its [`Completion`] while pongs, pings and deadlines go on being served. One request is in
//! flight at a time, so commands take effect in the order the client sent them.

mod channels;
mod work;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use herald_protocol::client::{
    ClientInfo, Command, ConnectRequest, ConnectResult, HistoryResult, Push, RefreshResult, Reply,
    SubscribeResult, UnsubscribePush, encode_bare_push, encode_uni_connect, parse_uni_connect,
    split_commands,
};
use herald_protocol::json::Raw;
use herald_protocol::{Disconnect, ErrorCode, codes};

use self::channels::SubsByChannel;
use crate::auth;
use crate::channel;
use crate::clock::Now;
use crate::conn::{Codec, ConnHandle, Control, Mode, PubMessage, Settled};
use crate::engine::StreamPosition;
use crate::failure::{self, Fail, TokenUse};
use crate::metrics::CommandKind;
use crate::node::{Node, VERSION};
use crate::options::NamespaceOptions;
use crate::proxy::{self, ProxyKind};
use crate::recovery;
use work::{ProxyCall, SubAuth, Who};

/// How long after a failed refresh or sub-refresh proxy request it is tried again.
const PROXY_RETRY_SECS: u64 = 10;

/// The id of the connect command a unidirectional client's connect request becomes.
const UNI_CONNECT_ID: u32 = 1;

struct Sub {
    presence: bool,
    join_leave: bool,
    chan_info: Option<Raw>,
    /// Unix seconds after which the subscription expires (subscription token `exp`).
    expire_at: Option<u64>,
    /// The subscribe proxy set `expire_at`: the sub-refresh proxy extends it.
    proxy_expiry: bool,
    /// Its expiry is queued or being dealt with (sub-refresh proxy, unsubscribe).
    expiring: bool,
}

/// What a subscription needs in order to start.
#[derive(Default)]
struct SubParams {
    recover: bool,
    /// An incomplete recovery is refused with 112 rather than answered `recovered: false`.
    reject_unrecovered: bool,
    epoch: String,
    offset: u64,
    recoverable: bool,
    positioned: bool,
    join_leave: bool,
    chan_info: Option<Raw>,
    data: Option<Raw>,
    expire_at: Option<u64>,
    /// Negotiated Fossil delta.
    delta: bool,
    /// Namespace options the subscribe proxy overrode for this subscription.
    ns_override: Option<proxy::SubscribeOverride>,
    proxy_expiry: bool,
}

/// A subscription joined to the hub and positioned, waiting for its reply to be queued.
struct Prepared {
    channel: String,
    result: SubscribeResult,
    history: Vec<herald_protocol::client::Publication>,
    recovering: bool,
    after: u64,
    sub: Sub,
}

/// Queued work beyond which the driver stops reading the client: while a request is in
/// flight commands wait, and past this many the socket pushes back instead of memory.
const INBOX_LIMIT: usize = 64;

/// Engine, proxy or token-key work the session asks for. The driver runs it beside the
/// connection's writes, reads and timers, under a timeout, and hands what it returns to
/// [`Session::complete`]. Dropping it abandons the work; [`Session::close`] then leaves
/// whatever it had joined.
pub struct Request(Pin<Box<dyn Future<Output = Completion> + Send>>);

impl Request {
    pub fn into_future(self) -> Pin<Box<dyn Future<Output = Completion> + Send>> {
        self.0
    }
}

/// What a [`Request`] came back with: the session's next input. Boxed, so that what holds
/// one for a moment (the driver's loop, whose state every idle connection keeps) stays small.
pub struct Completion(Box<Done>);

// One per request, moved a few times and gone: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
enum Done {
    /// A client command's work; the command finishes with it.
    Command {
        id: u32,
        kind: CommandKind,
        outcome: Result<Applied, Fail>,
    },
    /// A subscribe the server API asked for.
    ServerSubscribed {
        channel: String,
        outcome: Result<Prepared, Fail>,
    },
    /// A server-side unsubscribe is done; `push` tells the client.
    Left {
        channel: String,
        push: Option<(u32, String)>,
    },
    ProxyRefreshed(Result<proxy::RefreshResult, proxy::Outcome>),
    ProxySubRefreshed {
        channel: String,
        outcome: Result<proxy::RefreshResult, proxy::Outcome>,
    },
}

/// What a command's work found, for the session to take.
// One per request, moved a few times and gone: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
enum Applied {
    Reply(Option<Reply>),
    /// Connect: the client is who it says.
    Authorized(Box<Auth>),
    /// Connect: the server-side subscriptions are positioned.
    Connected {
        data: Option<Raw>,
        prepared: Vec<Prepared>,
    },
    Subscribed(Prepared),
    Refreshed(Option<u64>),
    SubRefreshed {
        channel: String,
        expire_at: Option<u64>,
    },
}

/// Who a connecting client is, from its token, the connect proxy, or nobody (anonymous).
struct Auth {
    user: String,
    conn_info: Option<Raw>,
    /// The connect proxy's `data` for the reply.
    data: Option<Raw>,
    meta: Option<Raw>,
    expire_at: Option<u64>,
    proxy_expiry: bool,
    /// Server-side subscriptions.
    channels: Vec<String>,
    server_subs: BTreeMap<String, proxy::SubOptions>,
    /// The positions the client sent back for them.
    req_subs: BTreeMap<String, herald_protocol::client::SubscribeRequest>,
}

/// What waits its turn behind the request in flight.
enum Work {
    /// Boxed: a command is large, and a queue keeps room for several.
    Command(Box<Command>),
    Unsubscribe {
        channel: String,
        code: u32,
        reason: String,
    },
    Subscribe {
        channel: String,
        info: Option<Raw>,
        data: Option<Raw>,
    },
    RefreshByProxy,
    SubExpired(String),
    /// A malformed command: the ones before it are served, then the connection closes.
    Fail(Disconnect),
}

/// Work waiting behind the request in flight: nothing allocated while there is none, which
/// is always for an idle connection.
// Boxed on purpose: one pointer in every session instead of a VecDeque's four words; the
// extra allocation is made only while work waits.
#[allow(clippy::box_collection)]
#[derive(Default)]
struct Inbox(Option<Box<VecDeque<Work>>>);

impl Inbox {
    fn push(&mut self, w: Work) {
        self.0.get_or_insert_with(Default::default).push_back(w);
    }

    fn pop(&mut self) -> Option<Work> {
        let q = self.0.as_mut()?;
        let w = q.pop_front();
        if q.is_empty() {
            self.0 = None;
        }
        w
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

/// Where a command stands after the session has handled it.
// Returned and matched at once: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
enum Step {
    /// Finished; the reply, if any, is queued.
    Done(Option<Reply>),
    /// Waiting on its request's completion.
    Waiting,
}

pub struct Session {
    node: Arc<Node>,
    conn: Arc<ConnHandle>,
    connected: bool,
    /// A unidirectional client's connect request has been read (later messages are ignored).
    connect_seen: bool,
    created: Instant,
    user: String,
    conn_info: Option<Raw>,
    expire_at: Option<u64>,
    subs: SubsByChannel<Sub>,
    next_ping: Instant,
    awaiting_pong: Option<Instant>,
    /// What the connect reply calls the session (the client id unless a transport routes
    /// later commands by another name, as HTTP-streaming and SSE emulation do). A boxed
    /// str, 8 bytes under a String: the session then fits a 256-byte allocation class.
    session_id: Option<Box<str>>,
    closed: bool,
    /// Command rate limit (`client.command_rate`); None when unlimited. Boxed: most nodes
    /// set none, and every idle connection would carry its room.
    rate: Option<Box<crate::ratelimit::CommandBucket>>,
    /// The transport's name and the client's request headers a proxy may forward.
    transport: &'static str,
    headers: Vec<(String, String)>,
    /// `meta` from the connect proxy, sent back with every later proxy request.
    meta: Option<Raw>,
    /// The connect proxy set `expire_at`: the refresh proxy extends it.
    proxy_expiry: bool,
    /// The transport checks the client is alive itself (MQTT keep-alive): no pong expected.
    transport_keepalive: bool,
    /// Work waiting behind the request in flight, in arrival order.
    inbox: Inbox,
    /// A request asked for and not yet taken by the driver.
    request: Option<Request>,
    /// A request taken and not yet completed.
    in_flight: bool,
    /// The refresh proxy is being asked about this connection's expiry.
    refreshing: bool,
}

impl Session {
    /// A session for `conn`, whose mode says what its client reads; `now` starts the connect
    /// timeout.
    pub fn new(node: Arc<Node>, conn: Arc<ConnHandle>, now: Instant) -> Self {
        let rate = crate::ratelimit::CommandBucket::starting(
            node.client.command_rate,
            node.client.command_burst,
            now,
        )
        .map(Box::new);
        Self {
            next_ping: now + node.client.ping_interval,
            node,
            conn,
            connected: false,
            connect_seen: false,
            created: now,
            user: String::new(),
            conn_info: None,
            expire_at: None,
            subs: SubsByChannel::default(),
            awaiting_pong: None,
            session_id: None,
            closed: false,
            rate,
            transport: "websocket",
            headers: Vec::new(),
            meta: None,
            proxy_expiry: false,
            transport_keepalive: false,
            inbox: Inbox::default(),
            request: None,
            in_flight: false,
            refreshing: false,
        }
    }

    /// Names the transport and gives the client's HTTP request headers that some proxy
    /// forwards (the transport keeps only those: `Node::forwards_header`); each proxy
    /// request then sends the ones its own `http_headers` lists.
    pub fn set_client_context(&mut self, transport: &'static str, headers: Vec<(String, String)>) {
        self.transport = transport;
        self.headers = headers;
    }

    /// What every proxy request says about this client.
    fn client_fields(&self) -> proxy::ClientFields<'_> {
        proxy::ClientFields {
            client: &self.conn.id,
            transport: self.transport,
            protocol: self.conn.codec.name(),
            encoding: match self.conn.codec {
                Codec::Json => "json",
                Codec::Protobuf => "binary",
            },
        }
    }

    /// Names the session in the connect reply (the token later commands are routed by).
    pub fn set_session_id(&mut self, id: String) {
        self.session_id = Some(id.into_boxed_str());
    }

    /// Unidirectional clients cannot answer pings: they still get them as keep-alives, but
    /// no pong is expected and the connect result says `pong: false`.
    fn expects_pong(&self) -> bool {
        self.conn.mode == Mode::Bidirectional && !self.transport_keepalive
    }

    /// The transport keeps the client alive its own way (MQTT's PINGREQ within 1.5 times the
    /// keep-alive): pings are still queued (the transport drops them) but no pong is awaited.
    pub fn keepalive_by_transport(&mut self) {
        self.transport_keepalive = true;
    }

    pub fn conn(&self) -> &Arc<ConnHandle> {
        &self.conn
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.subs.keys().map(|s| s.as_str())
    }

    /// Queues a reply to a command. Unidirectional clients read only the connect result
    /// (as `{"connect":…}`); they cannot have sent any other command.
    fn send(&self, reply: &Reply) {
        match self.conn.mode {
            Mode::Bidirectional => {
                self.conn.send(encode_reply(self.conn.codec, reply));
            }
            Mode::Unidirectional => {
                if let Some(result) = &reply.connect {
                    self.conn.send(encode_uni_connect(result));
                }
            }
        }
    }

    /// Queues a server push in the client's form.
    fn push(&self, push: Push) {
        self.conn.send(encode_push(&self.conn, push));
    }

    /// The disconnect push telling the client why it is being closed, in its form.
    pub fn goodbye(&self, d: &Disconnect) -> Bytes {
        let push = Push {
            disconnect: Some(herald_protocol::client::DisconnectPush {
                code: d.code,
                reason: d.reason.clone(),
                reconnect: d.reconnect(),
            }),
            ..Default::default()
        };
        encode_push(&self.conn, push)
    }

    fn client_info(&self, chan_info: Option<Raw>) -> ClientInfo {
        ClientInfo {
            user: self.user.clone(),
            client: self.conn.id.to_string(),
            conn_info: self.conn_info.clone(),
            chan_info,
        }
    }

    /// Who the connection is, owned, for the work behind a request.
    fn who(&self) -> Who {
        Who {
            node: self.node.clone(),
            conn: self.conn.clone(),
            user: self.user.clone(),
            conn_info: self.conn_info.clone(),
        }
    }

    /// A proxy request's body and the headers it forwards, serialised now.
    fn proxy_call<B: serde::Serialize>(&self, body: &B) -> Result<ProxyCall, Fail> {
        let body = serde_json::value::to_raw_value(body).map_err(|e| {
            tracing::error!(error = %e, "proxy request not serialisable");
            Fail::from(ErrorCode::INTERNAL)
        })?;
        Ok(ProxyCall {
            headers: self.headers.clone(),
            body,
        })
    }

    /// Whether the driver should read more from the client. While work waits behind a
    /// request, at most [`INBOX_LIMIT`] items queue; beyond that the socket pushes back.
    pub fn wants_input(&self) -> bool {
        self.inbox.len() < INBOX_LIMIT
    }

    /// The work the session waits on, if it asked for some: the driver runs it and hands
    /// its result to [`Session::complete`]. One is in flight at a time; commands behind it
    /// wait their turn, so they take effect in the order the client sent them.
    pub fn take_request(&mut self) -> Option<Request> {
        let r = self.request.take()?;
        self.in_flight = true;
        Some(r)
    }

    fn busy(&self) -> bool {
        self.in_flight || self.request.is_some()
    }

    fn begin(&mut self, work: impl Future<Output = Done> + Send + 'static) {
        debug_assert!(!self.busy(), "one request at a time");
        self.request = Some(Request(Box::pin(async move {
            Completion(Box::new(work.await))
        })));
    }

    /// Asks for a command's work; its completion finishes the command.
    fn wait_for(
        &mut self,
        id: u32,
        kind: CommandKind,
        work: impl Future<Output = Result<Applied, Fail>> + Send + 'static,
    ) -> Result<Step, Fail> {
        self.begin(async move {
            Done::Command {
                id,
                kind,
                outcome: work.await,
            }
        });
        Ok(Step::Waiting)
    }

    /// Takes the result of the request last taken; then starts what waited behind it.
    pub fn complete(&mut self, c: Completion, now: Now) -> Result<(), Disconnect> {
        self.in_flight = false;
        if self.closed {
            return Ok(());
        }
        match *c.0 {
            Done::Command { id, kind, outcome } => {
                let step = outcome.and_then(|a| self.apply(id, a, now));
                self.finish_command(id, kind, step)?;
            }
            Done::ServerSubscribed { channel, outcome } => match outcome {
                Ok(p) => {
                    let conn = self.conn.clone();
                    self.finish_subscription(p, move |result| {
                        let push = Push {
                            channel,
                            subscribe: Some(result),
                            ..Default::default()
                        };
                        Some(encode_push(&conn, push))
                    });
                }
                Err(Fail::Disconnect(d)) => return Err(d),
                Err(Fail::Error(e)) => {
                    tracing::warn!(channel = %channel, error = %e, "server subscribe failed");
                }
            },
            Done::Left { channel, push } => {
                if let Some((code, reason)) = push {
                    self.push(Push {
                        channel,
                        unsubscribe: Some(UnsubscribePush { code, reason }),
                        ..Default::default()
                    });
                }
            }
            Done::ProxyRefreshed(outcome) => self.proxy_refreshed(outcome, now)?,
            Done::ProxySubRefreshed { channel, outcome } => {
                self.proxy_sub_refreshed(channel, outcome, now)?;
            }
        }
        self.advance(now)
    }

    /// Runs each request the moment the session asks for it, in place: for hosts that step
    /// the session inline (MQTT's handler, unit tests, fuzzing) instead of beside a socket.
    pub async fn settle(&mut self, now: Now) -> Result<(), Disconnect> {
        while let Some(r) = self.take_request() {
            let c = r.into_future().await;
            self.complete(c, now)?;
        }
        Ok(())
    }

    /// Starts queued work while no request is in flight.
    fn advance(&mut self, now: Now) -> Result<(), Disconnect> {
        while !self.busy() && !self.closed {
            let Some(w) = self.inbox.pop() else {
                break;
            };
            match w {
                Work::Command(cmd) => self.start_command(*cmd, now)?,
                Work::Fail(d) => return Err(d),
                Work::Unsubscribe {
                    channel,
                    code,
                    reason,
                } => self.unsubscribe(&channel, Some((code, reason))),
                Work::Subscribe {
                    channel,
                    info,
                    data,
                } => self.start_server_subscribe(channel, info, data, now),
                Work::RefreshByProxy => self.start_refresh_by_proxy(now),
                Work::SubExpired(ch) => self.start_sub_expiry(ch, now),
            }
        }
        Ok(())
    }

    /// Handles one incoming frame. Bidirectional: one or more commands, `\n`-separated JSON
    /// or length-prefixed Protobuf; those before a malformed one are served, then the
    /// malformed one closes the connection.
    /// Unidirectional: the first message is the connect request, later ones are ignored.
    pub fn handle_frame(&mut self, data: &[u8], now: Now) -> Result<(), Disconnect> {
        if self.conn.mode == Mode::Unidirectional {
            if std::mem::replace(&mut self.connect_seen, true) {
                return Ok(());
            }
            let req =
                parse_uni_connect(data).map_err(|_| Disconnect::from(Disconnect::BAD_REQUEST))?;
            return self.accept(uni_connect_command(req), now);
        }
        match self.conn.codec {
            Codec::Json => {
                for line in split_commands(data) {
                    match serde_json::from_slice::<Command>(line) {
                        Ok(cmd) => self.accept(cmd, now)?,
                        Err(_) => return self.fail(Disconnect::BAD_REQUEST.into()),
                    }
                }
            }
            Codec::Protobuf => {
                for cmd in herald_protocol::proto::decode_commands(data) {
                    match cmd {
                        Ok(cmd) => self.accept(cmd.into(), now)?,
                        Err(e) => {
                            tracing::debug!(client = %self.conn.id, error = %e, "malformed protobuf frame");
                            return self.fail(Disconnect::BAD_REQUEST.into());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Handles one command (a transport that decodes its own frames, as MQTT's does).
    pub fn handle_command(&mut self, cmd: Command, now: Now) -> Result<(), Disconnect> {
        self.accept(cmd, now)
    }

    /// Starts a command, or queues it behind the request in flight. A pong is taken at
    /// once, whatever waits: it only says the client reads, and a command waiting on the
    /// engine must not make it late.
    fn accept(&mut self, cmd: Command, now: Now) -> Result<(), Disconnect> {
        if CommandKind::of(&cmd) == CommandKind::Pong {
            self.node.metrics.command(CommandKind::Pong, None);
            self.awaiting_pong = None;
            return Ok(());
        }
        if self.busy() || !self.inbox.is_empty() {
            self.inbox.push(Work::Command(Box::new(cmd)));
            return Ok(());
        }
        self.start_command(cmd, now)
    }

    /// A malformed command: the connection closes once the commands before it are served.
    fn fail(&mut self, d: Disconnect) -> Result<(), Disconnect> {
        if self.busy() || !self.inbox.is_empty() {
            self.inbox.push(Work::Fail(d));
            return Ok(());
        }
        Err(d)
    }

    fn start_command(&mut self, cmd: Command, now: Now) -> Result<(), Disconnect> {
        let kind = CommandKind::of(&cmd);
        let id = cmd.id;
        if id == 0 && cmd.send.is_none() {
            return Err(Disconnect::BAD_REQUEST.into());
        }
        if let Some(bucket) = self.rate.as_mut() {
            match bucket.take(now.mono) {
                crate::ratelimit::Verdict::Allow => {}
                crate::ratelimit::Verdict::Refuse => {
                    let e = ErrorCode::TOO_MANY_REQUESTS;
                    self.node.metrics.command(kind, Some(e.code));
                    if self.conn.mode == Mode::Unidirectional {
                        return Err(failure::unidirectional_connect(&e.error()));
                    }
                    if id != 0 {
                        self.send(&Reply::error(id, e.error()));
                    }
                    return Ok(());
                }
                crate::ratelimit::Verdict::Disconnect => {
                    return Err(Disconnect::TOO_MANY_REQUESTS.into());
                }
            }
        }
        let step = if !self.connected {
            match cmd.connect {
                Some(req) => self.cmd_connect(id, req, now),
                None => return Err(Disconnect::BAD_REQUEST.into()),
            }
        } else if cmd.connect.is_some() {
            return Err(Disconnect::BAD_REQUEST.into());
        } else if let Some(req) = cmd.subscribe {
            self.cmd_subscribe(id, req, now)
        } else if let Some(req) = cmd.unsubscribe {
            self.cmd_unsubscribe(id, &req.channel)
        } else if let Some(req) = cmd.publish {
            self.cmd_publish(id, req)
        } else if let Some(req) = cmd.presence {
            self.cmd_presence(id, kind, req.channel)
        } else if let Some(req) = cmd.presence_stats {
            self.cmd_presence(id, kind, req.channel)
        } else if let Some(req) = cmd.history {
            self.cmd_history(id, req)
        } else if let Some(req) = cmd.refresh {
            self.cmd_refresh(id, req.token, now)
        } else if let Some(req) = cmd.sub_refresh {
            self.cmd_sub_refresh(id, req.channel, req.token, now)
        } else if let Some(req) = cmd.rpc {
            self.cmd_rpc(id, req)
        } else if cmd.send.is_some() {
            // Asynchronous messages have no handler here and need no reply.
            Ok(Step::Done(None))
        } else {
            Err(ErrorCode::METHOD_NOT_FOUND.into())
        };
        self.finish_command(id, kind, step)
    }

    /// Records a command's outcome and queues its reply, unless it still waits on work.
    fn finish_command(
        &mut self,
        id: u32,
        kind: CommandKind,
        step: Result<Step, Fail>,
    ) -> Result<(), Disconnect> {
        let outcome = match step {
            Ok(Step::Waiting) => return Ok(()),
            Ok(Step::Done(reply)) => Ok(reply),
            Err(f) => Err(f),
        };
        let error = match &outcome {
            Err(Fail::Error(e)) => Some(e.code),
            _ => None,
        };
        self.node.metrics.command(kind, error);
        match outcome {
            Ok(Some(reply)) => self.send(&reply),
            Ok(None) => {}
            Err(Fail::Error(e)) if self.conn.mode == Mode::Unidirectional => {
                return Err(failure::unidirectional_connect(&e));
            }
            Err(Fail::Error(e)) => self.send(&Reply::error(id, e)),
            Err(Fail::Disconnect(d)) => return Err(d),
        }
        Ok(())
    }

    /// Takes what a command's work returned.
    fn apply(&mut self, id: u32, a: Applied, now: Now) -> Result<Step, Fail> {
        match a {
            Applied::Reply(reply) => Ok(Step::Done(reply)),
            Applied::Authorized(auth) => self.authorized(id, *auth, now),
            Applied::Connected { data, prepared } => {
                Ok(self.connected_reply(id, data, prepared, now))
            }
            Applied::Subscribed(prepared) => {
                let (mode, codec) = (self.conn.mode, self.conn.codec);
                self.finish_subscription(prepared, |result| {
                    (mode == Mode::Bidirectional).then(|| {
                        encode_reply(
                            codec,
                            &Reply {
                                id,
                                subscribe: Some(result),
                                ..Default::default()
                            },
                        )
                    })
                });
                Ok(Step::Done(None))
            }
            Applied::Refreshed(expire_at) => {
                self.expire_at = expire_at;
                let (expires, ttl) = Self::ttl_fields(self.expire_at, now);
                Ok(Step::Done(Some(Reply {
                    id,
                    refresh: Some(RefreshResult { expires, ttl }),
                    ..Default::default()
                })))
            }
            Applied::SubRefreshed { channel, expire_at } => {
                if let Some(sub) = self.subs.get_mut(&channel) {
                    sub.expire_at = expire_at;
                }
                let (expires, ttl) = Self::ttl_fields(expire_at, now);
                Ok(Step::Done(Some(Reply {
                    id,
                    sub_refresh: Some(RefreshResult { expires, ttl }),
                    ..Default::default()
                })))
            }
        }
    }

    /// `expires` and `ttl` of a result for an expiry at `expire_at` (Unix seconds).
    fn ttl_fields(expire_at: Option<u64>, now: Now) -> (bool, u32) {
        match expire_at {
            Some(at) => (
                true,
                at.saturating_sub(now.unix).min(u64::from(u32::MAX)) as u32,
            ),
            None => (false, 0),
        }
    }

    /// The expiry a token's claims give (`expire_at` wins over `exp`; 0 means none), clamped.
    fn token_expiry(expire_at: Option<u64>, exp: Option<u64>, now: Now) -> Option<u64> {
        let at = match expire_at {
            Some(0) => None,
            Some(at) => Some(at),
            None => exp,
        };
        now.clamp_expiry(at)
    }

    /// Connect, first half: who the client is (token, connect proxy or anonymous), checked
    /// by the work it asks for.
    fn cmd_connect(&mut self, id: u32, req: ConnectRequest, now: Now) -> Result<Step, Fail> {
        if self.node.is_draining() {
            return Err(Disconnect::SHUTDOWN.into());
        }
        let node = self.node.clone();
        let conn = self.conn.clone();
        let kind = CommandKind::Connect;
        let req_subs = req.subs;
        let anonymous = Auth {
            user: String::new(),
            conn_info: None,
            data: None,
            meta: None,
            expire_at: None,
            proxy_expiry: false,
            channels: Vec::new(),
            server_subs: BTreeMap::new(),
            req_subs,
        };
        if req.token.is_empty() && node.client.proxy.connect.enabled {
            // Headers a browser WebSocket cannot set come in the command (SDK emulation).
            self.headers
                .extend(req.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
            let call = self.proxy_call(&proxy::ConnectRequest {
                client: self.client_fields(),
                name: &req.name,
                version: &req.version,
                data: req.data.as_ref(),
            })?;
            self.wait_for(id, kind, async move {
                let r: proxy::ConnectResult = call
                    .send(&node, ProxyKind::Connect, &node.client.proxy.connect)
                    .await?;
                if r.user.is_empty() && !node.client.allow_anonymous {
                    return Err(ErrorCode::UNAUTHORIZED.into());
                }
                let mut a = Auth {
                    conn_info: proxy::raw_or_b64(r.info, r.b64info.as_deref())?,
                    data: proxy::raw_or_b64(r.data, r.b64data.as_deref())?,
                    user: r.user,
                    meta: r.meta,
                    ..anonymous
                };
                if r.expire_at > 0 {
                    if r.expire_at <= now.unix {
                        return Err(Disconnect::EXPIRED.into());
                    }
                    a.expire_at = now.clamp_expiry(Some(r.expire_at));
                    a.proxy_expiry = node.client.proxy.refresh.enabled;
                }
                a.channels.extend(r.channels);
                a.channels.extend(r.subs.keys().cloned());
                a.server_subs = r.subs;
                work::admit(&node, &conn, a).await
            })
        } else if req.token.is_empty() {
            if !node.client.allow_anonymous {
                return Err(ErrorCode::UNAUTHORIZED.into());
            }
            self.wait_for(id, kind, async move {
                work::admit(&node, &conn, anonymous).await
            })
        } else {
            let token = req.token;
            self.wait_for(id, kind, async move {
                let claims = node
                    .tokens
                    .check_connect(&token)
                    .await
                    .map_err(|e| failure::token(e, TokenUse::Connect))?;
                if claims.sub.is_empty() && !node.client.allow_anonymous {
                    return Err(Disconnect::INVALID_TOKEN.into());
                }
                let conn_info = auth::info_from_claims(claims.info, claims.b64info.as_deref())
                    .map_err(|_| Fail::from(Disconnect::INVALID_TOKEN))?;
                let expire_at = Self::token_expiry(claims.expire_at, claims.exp, now);
                if let Some(at) = expire_at
                    && at <= now.unix
                {
                    return Err(ErrorCode::TOKEN_EXPIRED.into());
                }
                let mut channels = claims.channels;
                channels.extend(claims.subs.into_keys());
                let a = Auth {
                    user: claims.sub,
                    conn_info,
                    expire_at,
                    channels,
                    ..anonymous
                };
                work::admit(&node, &conn, a).await
            })
        }
    }

    /// Connect, second half: the client is in; its server-side subscriptions (from the
    /// token, recovering from the positions the client sends back in `subs` on reconnect)
    /// are joined and positioned before the reply.
    fn authorized(&mut self, id: u32, a: Auth, now: Now) -> Result<Step, Fail> {
        self.user = a.user;
        self.conn_info = a.conn_info;
        self.meta = a.meta;
        self.expire_at = a.expire_at;
        self.proxy_expiry = a.proxy_expiry;
        self.conn.set_user(&self.user);
        self.connected = true;
        self.node.hub.add_conn(&self.conn);
        self.node.metrics.connected();
        tracing::debug!(client = %self.conn.id, user = %self.user, "client connected");

        let mut channels = a.channels;
        channels.sort();
        channels.dedup();
        let (mut req_subs, mut server_subs) = (a.req_subs, a.server_subs);
        let who = self.who();
        let mut joining = Vec::new();
        for ch in channels {
            if self.node.namespace(&ch).is_none() || self.subs.contains_key(&ch) {
                continue;
            }
            let r = req_subs.remove(&ch).unwrap_or_default();
            let given = server_subs.remove(&ch).unwrap_or_default();
            let params = SubParams {
                recover: r.recover,
                reject_unrecovered: false,
                epoch: r.epoch,
                offset: r.offset,
                chan_info: given.info.map(herald_protocol::json::single_line),
                data: given.data.map(herald_protocol::json::single_line),
                ..Default::default()
            };
            joining.push(work::join(&who, &ch, params)?);
        }
        let data = a.data;
        if joining.is_empty() {
            return Ok(self.connected_reply(id, data, Vec::new(), now));
        }
        self.wait_for(id, CommandKind::Connect, async move {
            let mut prepared = Vec::new();
            let mut joining = joining.into_iter();
            while let Some(j) = joining.next() {
                let ch = j.channel.clone();
                let fail = match work::position(&who, j, now).await {
                    Ok(p) => {
                        prepared.push(p);
                        continue;
                    }
                    Err(Fail::Disconnect(d)) => Fail::Disconnect(d),
                    Err(Fail::Error(e)) => {
                        // A connect without one of its server-side subscriptions would miss
                        // that channel's publications unnoticed: it fails instead, and the
                        // client reconnects (Centrifugo fails it too).
                        tracing::warn!(channel = %ch, error = %e, "server-side subscription failed; connect refused");
                        Disconnect::SERVER_ERROR.into()
                    }
                };
                for p in prepared {
                    work::abandon(&who, &p.channel, p.sub.presence).await;
                }
                for j in joining {
                    work::abandon(&who, &j.channel, j.presence()).await;
                }
                return Err(fail);
            }
            Ok(Applied::Connected { data, prepared })
        })
    }

    /// The connect reply, followed by what the server-side subscriptions received meanwhile.
    fn connected_reply(
        &mut self,
        id: u32,
        data: Option<Raw>,
        prepared: Vec<Prepared>,
        now: Now,
    ) -> Step {
        let (expires, ttl) = Self::ttl_fields(self.expire_at, now);
        let mut result = ConnectResult {
            client: self.conn.id.to_string(),
            version: VERSION.to_string(),
            // The refresh proxy renews a proxied connection: the client is not asked to.
            expires: expires && !self.proxy_expiry,
            ttl: if self.proxy_expiry { 0 } else { ttl },
            data,
            subs: BTreeMap::new(),
            ping: self.node.client.ping_interval.as_secs() as u32,
            pong: self.expects_pong(),
            session: self
                .session_id
                .as_deref()
                .unwrap_or(&self.conn.id)
                .to_string(),
            node: self.node.id.clone(),
        };
        self.next_ping = now.mono + self.node.client.ping_interval;
        let channels: Vec<String> = prepared.iter().map(|p| p.channel.clone()).collect();
        let refs: Vec<&str> = channels.iter().map(|s| s.as_str()).collect();
        let mut settled = Vec::new();
        let conn = self.conn.clone();
        self.conn.complete_buffering(&refs, |held| {
            let mut trailing = Vec::new();
            let mut through = Vec::new();
            for (mut p, live) in prepared.into_iter().zip(held) {
                let (frames, upto) = settle(&mut p, live, &conn);
                trailing.extend(frames);
                through.push(upto);
                result
                    .subs
                    .insert(p.channel.clone(), std::mem::take(&mut p.result));
                settled.push(p);
            }
            let mut frames = vec![match conn.mode {
                Mode::Bidirectional => encode_reply(
                    conn.codec,
                    &Reply {
                        id,
                        connect: Some(result),
                        ..Default::default()
                    },
                ),
                Mode::Unidirectional => encode_uni_connect(&result),
            }];
            frames.extend(trailing);
            (frames, through)
        });
        for p in settled {
            self.subs.insert(p.channel, p.sub);
        }
        Step::Done(None)
    }

    fn permitted(
        &self,
        for_client: bool,
        for_subscriber: bool,
        for_anonymous: bool,
        ch: &str,
    ) -> bool {
        if self.user.is_empty() && !for_anonymous {
            return false;
        }
        for_client || (for_subscriber && self.subs.contains_key(ch))
    }

    fn cmd_subscribe(
        &mut self,
        id: u32,
        req: herald_protocol::client::SubscribeRequest,
        now: Now,
    ) -> Result<Step, Fail> {
        let ch = req.channel;
        if ch.is_empty() || ch.len() > self.node.client.channel_max_length {
            return Err(ErrorCode::BAD_REQUEST.into());
        }
        if self.subs.contains_key(&ch) {
            return Err(ErrorCode::ALREADY_SUBSCRIBED.into());
        }
        if self.subs.len() >= self.node.client.max_channels {
            return Err(ErrorCode::LIMIT_EXCEEDED.into());
        }
        let node = self.node.clone();
        let ns = node.namespace(&ch).ok_or(ErrorCode::UNKNOWN_CHANNEL)?;
        // An unknown delta type is a client bug; a known one the namespace does not allow
        // is simply not negotiated (the reply says `delta: false`).
        let delta = match req.delta.as_str() {
            "" => false,
            crate::options::DELTA_FOSSIL => {
                ns.fossil_delta() && self.conn.mode == Mode::Bidirectional
            }
            _ => return Err(ErrorCode::BAD_REQUEST.into()),
        };
        let subscribe_proxy = &node.channel_proxy.subscribe;
        let how = if req.token.is_empty() && ns.subscribe_proxy_enabled && subscribe_proxy.enabled {
            // The backend decides instead of the namespace's permissions.
            let call = self.proxy_call(&proxy::SubscribeRequest {
                client: self.client_fields(),
                user: &self.user,
                channel: &ch,
                token: "",
                data: req.data.as_ref(),
                meta: self.meta.as_ref(),
            })?;
            SubAuth::Proxy {
                call,
                proxy_expiry: ns.sub_refresh_proxy_enabled
                    && node.channel_proxy.sub_refresh.enabled,
            }
        } else if channel::is_private(&ch) || ns.require_subscription_token || !req.token.is_empty()
        {
            if req.token.is_empty() {
                return Err(ErrorCode::PERMISSION_DENIED.into());
            }
            SubAuth::Token(req.token)
        } else if let Some(allowed) = channel::user_allowed(&ch, &self.user) {
            if !allowed {
                return Err(ErrorCode::PERMISSION_DENIED.into());
            }
            SubAuth::Allowed
        } else {
            let ok = if self.user.is_empty() {
                ns.allow_subscribe_for_anonymous
            } else {
                ns.allow_subscribe_for_client
            };
            if !ok {
                return Err(ErrorCode::PERMISSION_DENIED.into());
            }
            SubAuth::Allowed
        };
        let params = SubParams {
            recover: req.recover,
            reject_unrecovered: req.flag
                & herald_protocol::client::subscribe_flag::REJECT_UNRECOVERED
                != 0,
            epoch: req.epoch,
            offset: req.offset,
            recoverable: req.recoverable,
            positioned: req.positioned,
            join_leave: req.join_leave,
            delta,
            ..Default::default()
        };
        let who = self.who();
        self.wait_for(id, CommandKind::Subscribe, async move {
            let params = work::authorize_subscription(&who, &ch, how, params, now).await?;
            let joining = work::join(&who, &ch, params)?;
            Ok(Applied::Subscribed(
                work::position(&who, joining, now).await?,
            ))
        })
    }

    fn finish_subscription(
        &mut self,
        mut p: Prepared,
        reply: impl FnOnce(SubscribeResult) -> Option<Bytes>,
    ) {
        let ch = p.channel.clone();
        let conn = self.conn.clone();
        self.conn.complete_buffering(&[ch.as_str()], |mut held| {
            let live = held.pop().unwrap_or_default();
            let (trailing, settled) = settle(&mut p, live, &conn);
            let mut frames = Vec::with_capacity(trailing.len() + 1);
            frames.extend(reply(std::mem::take(&mut p.result)));
            frames.extend(trailing);
            (frames, vec![settled])
        });
        self.subs.insert(ch, p.sub);
    }

    /// Leaves a channel in the hub at once; returns the engine's side of leaving, or None
    /// when not subscribed.
    fn leave(&mut self, ch: &str) -> Option<impl Future<Output = ()> + Send + 'static> {
        let sub = self.subs.remove(ch)?;
        self.conn.end_delta(ch);
        let last = self.node.hub.remove_subscriber(ch, &self.conn.id);
        let who = self.who();
        let ch = ch.to_string();
        Some(async move { work::leave(&who, &ch, sub, last).await })
    }

    /// A server-side unsubscribe (the server API, an expiry); `push` tells the client.
    fn unsubscribe(&mut self, ch: &str, push: Option<(u32, String)>) {
        if let Some(leaving) = self.leave(ch) {
            let channel = ch.to_string();
            self.begin(async move {
                leaving.await;
                Done::Left { channel, push }
            });
        }
    }

    fn cmd_unsubscribe(&mut self, id: u32, ch: &str) -> Result<Step, Fail> {
        let reply = Reply {
            id,
            unsubscribe: Some(Default::default()),
            ..Default::default()
        };
        match self.leave(ch) {
            Some(leaving) => self.wait_for(id, CommandKind::Unsubscribe, async move {
                leaving.await;
                Ok(Applied::Reply(Some(reply)))
            }),
            None => Ok(Step::Done(Some(reply))),
        }
    }

    fn cmd_publish(
        &mut self,
        id: u32,
        req: herald_protocol::client::PublishRequest,
    ) -> Result<Step, Fail> {
        let ch = req.channel;
        let node = self.node.clone();
        let ns = node.channel_options(&ch)?;
        let data = crate::node::PublishData {
            data: req.data.ok_or(ErrorCode::BAD_REQUEST)?,
            binary: req.binary,
        };
        let info = self.client_info(self.subs.get(&ch).and_then(|s| s.chan_info.clone()));
        let reply = Reply {
            id,
            publish: Some(Default::default()),
            ..Default::default()
        };
        if ns.publish_proxy_enabled && node.channel_proxy.publish.enabled {
            // The backend decides instead of the namespace's permissions, and may rewrite.
            let b64data = data.binary.then(|| {
                use base64::Engine as _;
                let bytes = herald_protocol::json::base64_bytes(&data.data).unwrap_or_default();
                base64::engine::general_purpose::STANDARD.encode(bytes)
            });
            let call = self.proxy_call(&proxy::PublishRequest {
                client: self.client_fields(),
                user: &self.user,
                channel: &ch,
                data: (!data.binary).then_some(&data.data),
                b64data,
                meta: self.meta.as_ref(),
            })?;
            return self.wait_for(id, CommandKind::Publish, async move {
                let r: proxy::PublishResult = call
                    .send(&node, ProxyKind::Publish, &node.channel_proxy.publish)
                    .await?;
                let mut data = data;
                if let Some(raw) = r.data {
                    data = raw.into();
                } else if let Some(b64) = r.b64data.as_deref() {
                    use base64::Engine as _;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|_| Fail::from(ErrorCode::INTERNAL))?;
                    data = crate::node::PublishData::from_bytes(&bytes);
                }
                node.publish(&ch, data, Some(info), BTreeMap::new(), r.skip_history, None)
                    .await?;
                Ok(Applied::Reply(Some(reply)))
            });
        }
        if !self.permitted(
            ns.allow_publish_for_client,
            ns.allow_publish_for_subscriber,
            ns.allow_publish_for_anonymous,
            &ch,
        ) {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        self.wait_for(id, CommandKind::Publish, async move {
            node.publish(&ch, data, Some(info), BTreeMap::new(), false, None)
                .await?;
            Ok(Applied::Reply(Some(reply)))
        })
    }

    /// Without an RPC proxy: "not available" (108), as Centrifugo answers.
    fn cmd_rpc(&mut self, id: u32, req: herald_protocol::client::RpcRequest) -> Result<Step, Fail> {
        let node = self.node.clone();
        let options = node
            .rpc_proxy
            .route(&req.method)
            .ok_or(ErrorCode::NOT_AVAILABLE)?;
        let call = self.proxy_call(&proxy::RpcRequest {
            client: self.client_fields(),
            user: &self.user,
            method: &req.method,
            data: req.data.as_ref(),
            meta: self.meta.as_ref(),
        })?;
        self.wait_for(id, CommandKind::Rpc, async move {
            let r: proxy::RpcResult = call.send(&node, ProxyKind::Rpc, &options).await?;
            let data = proxy::raw_or_b64(r.data, r.b64data.as_deref())?;
            Ok(Applied::Reply(Some(Reply {
                id,
                rpc: Some(herald_protocol::client::RpcResult { data }),
                ..Default::default()
            })))
        })
    }

    /// Presence, or its counts (`kind` says which).
    fn cmd_presence(&mut self, id: u32, kind: CommandKind, ch: String) -> Result<Step, Fail> {
        self.check_presence(&ch)?;
        let node = self.node.clone();
        self.wait_for(id, kind, async move {
            let reply = if kind == CommandKind::PresenceStats {
                let (num_clients, num_users) = node.presence_stats(&ch).await?;
                Reply {
                    id,
                    presence_stats: Some(herald_protocol::client::PresenceStatsResult {
                        num_clients,
                        num_users,
                    }),
                    ..Default::default()
                }
            } else {
                let presence = node.presence(&ch).await?;
                Reply {
                    id,
                    presence: Some(herald_protocol::client::PresenceResult { presence }),
                    ..Default::default()
                }
            };
            Ok(Applied::Reply(Some(reply)))
        })
    }

    fn check_presence(&self, ch: &str) -> Result<(), Fail> {
        let ns = self.node.channel_options(ch)?;
        if !ns.presence {
            return Err(ErrorCode::NOT_AVAILABLE.into());
        }
        if !self.permitted(
            ns.allow_presence_for_client,
            ns.allow_presence_for_subscriber,
            ns.allow_presence_for_anonymous,
            ch,
        ) {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        Ok(())
    }

    fn cmd_history(
        &mut self,
        id: u32,
        req: herald_protocol::client::HistoryRequest,
    ) -> Result<Step, Fail> {
        let ch = req.channel;
        let ns = self.node.channel_options(&ch)?;
        if !ns.history_enabled() {
            return Err(ErrorCode::NOT_AVAILABLE.into());
        }
        if !self.permitted(
            ns.allow_history_for_client,
            ns.allow_history_for_subscriber,
            ns.allow_history_for_anonymous,
            &ch,
        ) {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        let since = req.since.map(|s| StreamPosition {
            offset: s.offset,
            epoch: s.epoch,
        });
        let (limit, reverse) = (req.limit, req.reverse);
        let node = self.node.clone();
        self.wait_for(id, CommandKind::History, async move {
            let h = node.history(&ch, limit, since, reverse).await?;
            Ok(Applied::Reply(Some(Reply {
                id,
                history: Some(HistoryResult {
                    publications: h.publications,
                    epoch: h.position.epoch,
                    offset: h.position.offset,
                }),
                ..Default::default()
            })))
        })
    }

    fn cmd_refresh(&mut self, id: u32, token: String, now: Now) -> Result<Step, Fail> {
        let node = self.node.clone();
        let user = self.user.clone();
        self.wait_for(id, CommandKind::Refresh, async move {
            let claims = node
                .tokens
                .check_connect(&token)
                .await
                .map_err(|e| failure::token(e, TokenUse::Refresh))?;
            if claims.sub != user {
                return Err(failure::token_mismatch());
            }
            Ok(Applied::Refreshed(Self::token_expiry(
                claims.expire_at,
                claims.exp,
                now,
            )))
        })
    }

    fn cmd_sub_refresh(
        &mut self,
        id: u32,
        channel: String,
        token: String,
        now: Now,
    ) -> Result<Step, Fail> {
        if !self.subs.contains_key(&channel) {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        let who = self.who();
        self.wait_for(id, CommandKind::SubRefresh, async move {
            let (_, expire_at) =
                work::check_sub_token(&who, &channel, &token, TokenUse::SubRefresh, now).await?;
            Ok(Applied::SubRefreshed { channel, expire_at })
        })
    }

    /// Carries out what the server API asked of this connection. Subscribes and
    /// unsubscribes take their turn after the client's commands already queued.
    pub fn handle_control(&mut self, c: Control, now: Now) -> Result<(), Disconnect> {
        match c {
            Control::Commands(data) => return self.handle_frame(&data, now),
            Control::Unsubscribe {
                channel,
                code,
                reason,
            } => self.inbox.push(Work::Unsubscribe {
                channel,
                code,
                reason,
            }),
            Control::Subscribe {
                channel,
                info,
                data,
            } => self.inbox.push(Work::Subscribe {
                channel,
                info,
                data,
            }),
            Control::Refresh { .. } if !self.connected => {}
            Control::Refresh { expire_at, expired } => {
                if expired {
                    return Err(Disconnect::EXPIRED.into());
                }
                self.expire_at = now.clamp_expiry(expire_at);
                self.refreshing = false;
                let (expires, ttl) = Self::ttl_fields(self.expire_at, now);
                self.push(Push {
                    refresh: Some(RefreshResult { expires, ttl }),
                    ..Default::default()
                });
            }
        }
        self.advance(now)
    }

    fn start_server_subscribe(
        &mut self,
        channel: String,
        info: Option<Raw>,
        data: Option<Raw>,
        now: Now,
    ) {
        if !self.connected
            || self.subs.contains_key(&channel)
            || self.node.namespace(&channel).is_none()
        {
            return;
        }
        let params = SubParams {
            chan_info: info.map(herald_protocol::json::single_line),
            data: data.map(herald_protocol::json::single_line),
            ..Default::default()
        };
        let who = self.who();
        match work::join(&who, &channel, params) {
            Ok(joining) => self.begin(async move {
                let outcome = work::position(&who, joining, now).await;
                Done::ServerSubscribed { channel, outcome }
            }),
            Err(e) => tracing::warn!(channel = %channel, error = ?e, "server subscribe failed"),
        }
    }

    /// Timer work: connect timeout, pings, missing pongs, expiry. Returns when to call again.
    /// Expiries that need the refresh proxy or an unsubscribe are queued as work.
    pub fn tick(&mut self, now: Now) -> Result<Instant, Disconnect> {
        let node = self.node.clone();
        let opts = &node.client;
        if !self.connected {
            // A connect being checked (a key fetch, the connect proxy) is not late: it came.
            let deadline = self.created + opts.connect_timeout;
            if now.mono >= deadline && !self.busy() {
                return Err(Disconnect::STALE.into());
            }
            return Ok(self.next_wakeup(now));
        }
        if let Some(sent) = self.awaiting_pong
            && now.mono >= sent + opts.pong_timeout
        {
            return Err(Disconnect::NO_PONG.into());
        }
        if self.proxy_expiry
            && !self.refreshing
            && let Some(at) = self.expire_at
            && now.unix >= at
        {
            self.refreshing = true;
            self.inbox.push(Work::RefreshByProxy);
        }
        let grace = opts.expired_close_delay.as_secs();
        if !self.proxy_expiry
            && let Some(at) = self.expire_at
            && now.unix >= at.saturating_add(grace)
        {
            return Err(Disconnect::EXPIRED.into());
        }
        for (ch, s) in self.subs.iter_mut() {
            if !s.expiring && s.expire_at.is_some_and(|at| now.unix >= at) {
                s.expiring = true;
                self.inbox.push(Work::SubExpired(ch.clone()));
            }
        }
        if now.mono >= self.next_ping {
            // The ping is an empty message; clients answer with an empty command.
            self.conn.send(match self.conn.codec {
                Codec::Json => Bytes::from_static(b"{}"),
                Codec::Protobuf => Bytes::from_static(herald_protocol::proto::PING),
            });
            if self.awaiting_pong.is_none() && self.expects_pong() {
                self.awaiting_pong = Some(now.mono);
            }
            self.next_ping = now.mono + opts.ping_interval;
        }
        self.advance(now)?;
        Ok(self.next_wakeup(now))
    }

    /// Asks the refresh proxy to extend this connection.
    fn start_refresh_by_proxy(&mut self, now: Now) {
        if !self.proxy_expiry || self.expire_at.is_none_or(|at| now.unix < at) {
            // Extended meanwhile (a refresh control).
            self.refreshing = false;
            return;
        }
        let call = self.proxy_call(&proxy::RefreshRequest {
            client: self.client_fields(),
            user: &self.user,
            meta: self.meta.as_ref(),
        });
        let Ok(call) = call else {
            self.proxy_refreshed(Err(proxy::Outcome::Error(ErrorCode::INTERNAL.error())), now)
                .unwrap_or(());
            return;
        };
        let node = self.node.clone();
        self.begin(async move {
            Done::ProxyRefreshed(
                call.send(&node, ProxyKind::Refresh, &node.client.proxy.refresh)
                    .await,
            )
        });
    }

    /// The refresh proxy's answer. The backend may let the connection expire (3005) or
    /// disconnect it; a backend that fails is asked again a little later.
    fn proxy_refreshed(
        &mut self,
        outcome: Result<proxy::RefreshResult, proxy::Outcome>,
        now: Now,
    ) -> Result<(), Disconnect> {
        self.refreshing = false;
        match outcome {
            Ok(r) if r.expired || (r.expire_at != 0 && r.expire_at <= now.unix) => {
                Err(Disconnect::EXPIRED.into())
            }
            Ok(r) => {
                if let Ok(Some(info)) = proxy::raw_or_b64(r.info, r.b64info.as_deref()) {
                    self.conn_info = Some(info);
                }
                self.expire_at = now.clamp_expiry(Some(r.expire_at));
                self.proxy_expiry = self.expire_at.is_some();
                Ok(())
            }
            Err(proxy::Outcome::Disconnect(d)) => Err(d),
            Err(_) => {
                self.expire_at = Some(now.unix.saturating_add(PROXY_RETRY_SECS));
                Ok(())
            }
        }
    }

    /// An expired subscription: the sub-refresh proxy may extend it; otherwise it ends
    /// with 2501.
    fn start_sub_expiry(&mut self, ch: String, now: Now) {
        let Some(sub) = self.subs.get_mut(&ch) else {
            return;
        };
        if sub.expire_at.is_none_or(|at| now.unix < at) {
            // Extended meanwhile (a sub-refresh command).
            sub.expiring = false;
            return;
        }
        if !sub.proxy_expiry {
            let (code, reason) = codes::unsubscribe::EXPIRED;
            self.unsubscribe(&ch, Some((code, reason.to_string())));
            return;
        }
        let call = self.proxy_call(&proxy::SubRefreshRequest {
            client: self.client_fields(),
            user: &self.user,
            channel: &ch,
            meta: self.meta.as_ref(),
        });
        let node = self.node.clone();
        self.begin(async move {
            let outcome = match call {
                Ok(call) => {
                    call.send(
                        &node,
                        ProxyKind::SubRefresh,
                        &node.channel_proxy.sub_refresh,
                    )
                    .await
                }
                Err(_) => Err(proxy::Outcome::Error(ErrorCode::INTERNAL.error())),
            };
            Done::ProxySubRefreshed {
                channel: ch,
                outcome,
            }
        });
    }

    /// The sub-refresh proxy's answer: extended, expired (unsubscribed with 2501), or asked
    /// again a little later when the backend failed.
    fn proxy_sub_refreshed(
        &mut self,
        ch: String,
        outcome: Result<proxy::RefreshResult, proxy::Outcome>,
        now: Now,
    ) -> Result<(), Disconnect> {
        let Some(sub) = self.subs.get_mut(&ch) else {
            return Ok(());
        };
        sub.expiring = false;
        match outcome {
            Ok(r) if r.expired || (r.expire_at != 0 && r.expire_at <= now.unix) => {
                let (code, reason) = codes::unsubscribe::EXPIRED;
                self.unsubscribe(&ch, Some((code, reason.to_string())));
            }
            Ok(r) => {
                if let Ok(Some(info)) = proxy::raw_or_b64(r.info, r.b64info.as_deref()) {
                    sub.chan_info = Some(info);
                }
                sub.expire_at = now.clamp_expiry(Some(r.expire_at));
                sub.proxy_expiry = sub.expire_at.is_some();
            }
            Err(proxy::Outcome::Disconnect(d)) => return Err(d),
            Err(_) => {
                sub.expire_at = Some(now.unix.saturating_add(PROXY_RETRY_SECS));
            }
        }
        Ok(())
    }

    /// When `tick` must run next: connect timeout, ping, pong deadline or an expiry not
    /// already being dealt with.
    pub fn next_wakeup(&self, now: Now) -> Instant {
        let opts = &self.node.client;
        if !self.connected {
            if self.busy() {
                return now.mono + opts.connect_timeout;
            }
            return self.created + opts.connect_timeout;
        }
        let mut next = self.next_ping;
        if let Some(sent) = self.awaiting_pong {
            next = next.min(sent + opts.pong_timeout);
        }
        // A proxied connection is renewed by the refresh proxy at its expiry, without grace.
        let grace = if self.proxy_expiry {
            0
        } else {
            opts.expired_close_delay.as_secs()
        };
        let own = self
            .expire_at
            .filter(|_| !self.refreshing)
            .map(|at| at.saturating_add(grace));
        let soonest_expiry = own
            .into_iter()
            .chain(
                self.subs
                    .values()
                    .filter(|s| !s.expiring)
                    .filter_map(|s| s.expire_at),
            )
            .min();
        if let Some(at) = soonest_expiry {
            next = next.min(now.mono_at(at));
        }
        next
    }

    /// Leaves every channel and the hub; returns the engine's side of it (presence, join
    /// and leave messages, engine unsubscribes), which the host runs to its end. Work still
    /// in flight is abandoned: channels it had joined are left here too.
    pub fn close(&mut self) -> impl Future<Output = ()> + Send + 'static {
        let first = !std::mem::replace(&mut self.closed, true);
        self.inbox.clear();
        self.request = None;
        let subs: Vec<(String, Sub)> = if first {
            self.subs.take_all()
        } else {
            Vec::new()
        };
        let who = self.who();
        let connected = self.connected;
        async move {
            if !first {
                return;
            }
            let (node, conn) = (&who.node, &who.conn);
            for (ch, sub) in subs {
                conn.end_delta(&ch);
                let last = node.hub.remove_subscriber(&ch, &conn.id);
                work::leave(&who, &ch, sub, last).await;
            }
            // A connection cut short in the middle of a subscribe (panic, timeout) is in the
            // hub for channels it has no subscription for yet.
            for ch in conn.buffering_channels() {
                conn.cancel_buffering(&ch);
                if node.hub.remove_subscriber(&ch, &conn.id) {
                    let _ = node.engine.unsubscribe(&ch).await;
                }
                let _ = node.engine.remove_presence(&ch, &conn.id).await;
            }
            // The transport records why the connection ended with `ConnHandle::close` before
            // calling this; no reason recorded means the client or the network closed it.
            let code = conn.close_reason().map_or(3000, |d| d.code);
            node.metrics.disconnected(code);
            if code == Disconnect::SLOW.code {
                tracing::warn!(client = %conn.id, user = %who.user, "slow consumer disconnected");
            }
            if connected {
                node.hub.remove_conn(conn);
                tracing::debug!(client = %conn.id, user = %who.user, code, "client disconnected");
            }
        }
    }
}

/// A namespace's options with what the subscribe proxy overrode for one subscription.
fn apply_override(mut ns: NamespaceOptions, o: proxy::SubscribeOverride) -> NamespaceOptions {
    if let Some(v) = o.presence {
        ns.presence = v.value;
    }
    if let Some(v) = o.join_leave {
        ns.join_leave = v.value;
    }
    if let Some(v) = o.force_push_join_leave {
        ns.force_push_join_leave = v.value;
    }
    // Recovery and positioning need history; without it the override cannot apply.
    if let Some(v) = o.force_recovery {
        ns.force_recovery = v.value && ns.history_enabled();
    }
    if let Some(v) = o.force_positioning {
        ns.force_positioning = v.value && ns.history_enabled();
    }
    ns
}

/// Finalises a subscription's result with what arrived live while it was being positioned;
/// returns the live frames that follow the reply, the offset through which the client then
/// has the stream (0 when the subscription is not positioned) and its delta state.
fn settle(
    p: &mut Prepared,
    live: Vec<Arc<PubMessage>>,
    conn: &ConnHandle,
) -> (Vec<Bytes>, Settled) {
    let s = settle_stream(p, live, conn);
    tracing::debug!(
        client = %conn.id,
        channel = %p.channel,
        offset = p.result.offset,
        recovering = p.recovering,
        recovered = p.result.recovered,
        publications = p.result.publications.len(),
        live = s.frames.len(),
        through = s.through,
        resubscribe = s.resubscribe,
        "subscribed"
    );
    let delta = p.result.delta;
    if delta && conn.codec == Codec::Json {
        // With delta, a JSON client reads every publication's data as a string.
        for publication in &mut p.result.publications {
            *publication = publication.delta_form(None);
        }
    }
    let settled = Settled {
        through: s.through,
        delta_last: delta.then_some(s.last),
        resubscribe: s.resubscribe,
    };
    (s.frames, settled)
}

/// How a subscription's stream continues after its reply.
#[derive(Debug, Default)]
struct Continuation {
    /// Live publications to queue after the reply.
    frames: Vec<Bytes>,
    /// The offset the client has reached with them (0: not positioned).
    through: u64,
    /// The id of the last publication queued (0: none).
    last: u64,
    /// A hole follows `through`: the client is told to resubscribe.
    resubscribe: bool,
}

/// How the stream continues after the reply. Runs while the connection's outbox is locked
/// ([`ConnHandle::complete_buffering`]), so it must not queue on `conn` itself.
fn settle_stream(p: &mut Prepared, live: Vec<Arc<PubMessage>>, conn: &ConnHandle) -> Continuation {
    let frames = |msgs: &[&Arc<PubMessage>]| -> (Vec<Bytes>, u64) {
        if p.result.delta {
            conn.delta_frames(msgs, 0)
        } else {
            let last = msgs.last().map_or(0, |m| m.id);
            (msgs.iter().map(|m| conn.frame_for(m)).collect(), last)
        }
    };
    if !p.result.positioned {
        let all: Vec<&Arc<PubMessage>> = live.iter().collect();
        let (frames, last) = frames(&all);
        return Continuation {
            frames,
            last,
            ..Default::default()
        };
    }
    let top = p.result.offset;
    if p.recovering {
        let history = std::mem::take(&mut p.history);
        let live_pubs: Vec<_> = live.iter().map(|m| m.publication.clone()).collect();
        let (mut merged, contiguous) = recovery::merge(history, live_pubs, p.after, |x| x.offset);
        if contiguous {
            p.result.offset = merged.last().map_or(top, |x| x.offset).max(top);
            p.result.recovered = true;
            p.result.publications = merged;
            // Publications in the reply are whole: the next live one is too.
            return Continuation {
                through: p.result.offset,
                ..Default::default()
            };
        }
        // How many of the merged publications follow the client's position without a hole.
        let whole = (p.after.saturating_add(1)..)
            .zip(&merged)
            .take_while(|(expected, x)| x.offset == *expected)
            .count();
        let whole_through = p.after.saturating_add(whole as u64);
        if whole_through >= top {
            // History is whole up to its top; the hole is in the live feed after it (a
            // message lost on its way to this node, e.g. while the broker moved). Nothing is
            // lost: the client gets the run up to the hole and is told to resubscribe,
            // recovering the rest from history.
            merged.truncate(whole);
            p.result.offset = whole_through;
            p.result.recovered = true;
            p.result.publications = merged;
            return Continuation {
                through: whole_through,
                resubscribe: true,
                ..Default::default()
            };
        }
        // History itself misses publications the client did not get: say so.
        p.result.recovered = false;
    }
    // Live publications follow the reply only up to a hole: one after it would move the
    // client's position past what it missed (history read behind the live feed).
    let mut expected = top.saturating_add(1);
    let mut resubscribe = false;
    let mut after: Vec<&Arc<PubMessage>> = Vec::new();
    for m in live.iter().filter(|m| m.publication.offset > top) {
        if m.publication.offset != expected {
            resubscribe = true;
            break;
        }
        after.push(m);
        expected = expected.saturating_add(1);
    }
    let through = after.last().map_or(top, |m| m.publication.offset);
    let (frames, last) = frames(&after);
    Continuation {
        frames,
        through,
        last,
        resubscribe,
    }
}

/// A reply in the codec of a bidirectional client.
fn encode_reply(codec: Codec, reply: &Reply) -> Bytes {
    match codec {
        Codec::Json => reply.encode(),
        Codec::Protobuf => herald_protocol::proto::encode_reply(&reply.into()),
    }
}

/// A server push as the connection's client reads it: a reply of its codec, or the bare
/// JSON push of a unidirectional client.
fn encode_push(conn: &ConnHandle, push: Push) -> Bytes {
    match conn.mode {
        Mode::Bidirectional => encode_reply(conn.codec, &Reply::push(push)),
        Mode::Unidirectional => encode_bare_push(&push),
    }
}

/// The connect command a unidirectional client's connect request stands for.
fn uni_connect_command(req: ConnectRequest) -> Command {
    Command {
        id: UNI_CONNECT_ID,
        connect: Some(req),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    //! The session stepped with a fake clock: no sockets, no sleeps.

    use std::time::Duration;

    use super::*;
    use crate::engine::memory::MemoryEngine;
    use crate::node::NodeConfig;
    use crate::options::ClientOptions;

    /// Every connection holds one boxed session: kept within mimalloc's 256-byte class (it
    /// was in the 320-byte one), docs/performance.md.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_session_fits_its_allocation_class() {
        let size = std::mem::size_of::<Session>();
        assert!(size <= 256, "Session grew to {size} bytes");
    }

    const SECRET: &str = "session-test-secret";

    fn node() -> Arc<Node> {
        let client = ClientOptions {
            token_hmac_secret: SECRET.into(),
            allow_anonymous: true,
            ..Default::default()
        };
        let ns = NamespaceOptions {
            allow_subscribe_for_client: true,
            allow_subscribe_for_anonymous: true,
            allow_presence_for_anonymous: true,
            allow_presence_for_client: true,
            presence: true,
            ..Default::default()
        };
        Node::new(
            NodeConfig {
                name: "test".into(),
                client,
                namespaces: vec![ns],
                ..Default::default()
            },
            |hub| Arc::new(MemoryEngine::new(hub)),
        )
    }

    fn session(node: &Arc<Node>, mode: Mode, now: Now) -> (Arc<ConnHandle>, Session) {
        let conn = Arc::new(ConnHandle::with_mode(Arc::from("c1"), 1 << 20, mode));
        (conn.clone(), Session::new(node.clone(), conn, now.mono))
    }

    /// A bidirectional session connected anonymously at `t0`.
    async fn connected(node: &Arc<Node>, t0: Now) -> (Arc<ConnHandle>, Session) {
        let (conn, mut s) = session(node, Mode::Bidirectional, t0);
        frame(&mut s, br#"{"id":1,"connect":{}}"#, t0)
            .await
            .unwrap();
        (conn, s)
    }

    /// A frame, and the requests it makes run to their end.
    async fn frame(s: &mut Session, data: &[u8], now: Now) -> Result<(), Disconnect> {
        s.handle_frame(data, now)?;
        s.settle(now).await
    }

    async fn control(s: &mut Session, c: Control, now: Now) -> Result<(), Disconnect> {
        s.handle_control(c, now)?;
        s.settle(now).await
    }

    fn frames(conn: &ConnHandle) -> Vec<String> {
        conn.drain()
            .frames
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    fn token(claims: serde_json::Value) -> String {
        auth::sign_hs256(SECRET, &claims).expect("signs")
    }

    #[tokio::test]
    async fn connect_timeout_closes_with_3502() {
        let node = node();
        let t0 = Now::system();
        let (_, mut s) = session(&node, Mode::Bidirectional, t0);
        let deadline = s.tick(t0).expect("not yet");
        assert_eq!(deadline, t0.mono + node.client.connect_timeout);
        let late = t0.after(node.client.connect_timeout);
        assert_eq!(s.tick(late).map_err(|d| d.code), Err(3502));
    }

    #[tokio::test]
    async fn ping_then_missing_pong_closes_with_3012() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = connected(&node, t0).await;
        assert!(frames(&conn)[0].contains("\"connect\""));
        let ping_at = t0.after(node.client.ping_interval);
        assert_eq!(s.next_wakeup(t0), ping_at.mono);
        s.tick(ping_at).unwrap();
        assert_eq!(frames(&conn), ["{}"]);
        // The pong deadline is next; one second before it nothing happens.
        let pong_deadline = ping_at.after(node.client.pong_timeout);
        assert_eq!(s.next_wakeup(ping_at), pong_deadline.mono);
        let almost = ping_at.after(node.client.pong_timeout - Duration::from_secs(1));
        s.tick(almost).unwrap();
        assert_eq!(s.tick(pong_deadline).map_err(|d| d.code), Err(3012));
    }

    #[tokio::test]
    async fn answered_ping_keeps_the_connection() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = connected(&node, t0).await;
        let ping_at = t0.after(node.client.ping_interval);
        s.tick(ping_at).unwrap();
        frame(&mut s, b"{}", ping_at).await.unwrap();
        let later = ping_at.after(node.client.pong_timeout + Duration::from_secs(1));
        s.tick(later).expect("pong answered");
        let _ = frames(&conn);
    }

    #[tokio::test]
    async fn token_expiry_closes_after_the_grace_delay() {
        let node = node();
        let t0 = Now::system();
        let (_, mut s) = session(&node, Mode::Bidirectional, t0);
        let exp = t0.unix + 60;
        let t = token(serde_json::json!({"sub": "alice", "exp": exp}));
        let cmd = format!(r#"{{"id":1,"connect":{{"token":"{t}"}}}}"#);
        frame(&mut s, cmd.as_bytes(), t0).await.unwrap();
        let grace = node.client.expired_close_delay.as_secs();
        let close_at = Now {
            mono: t0.mono + Duration::from_secs(60 + grace),
            unix: exp + grace,
        };
        // The wake-up is never later than the expiry plus grace.
        assert!(s.next_wakeup(t0) <= close_at.mono);
        let before = Now {
            mono: t0.mono + Duration::from_secs(30),
            unix: t0.unix + 30,
        };
        s.tick(before).expect("not expired yet");
        // The ping that tick sent is answered.
        frame(&mut s, b"{}", before).await.unwrap();
        assert_eq!(s.tick(close_at).map_err(|d| d.code), Err(3005));
    }

    #[tokio::test]
    async fn refresh_to_the_end_of_time_extends_instead_of_closing() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = session(&node, Mode::Bidirectional, t0);
        let t = token(serde_json::json!({"sub": "alice", "exp": t0.unix + 60}));
        let cmd = format!(r#"{{"id":1,"connect":{{"token":"{t}"}}}}"#);
        frame(&mut s, cmd.as_bytes(), t0).await.unwrap();
        let _ = frames(&conn);
        control(
            &mut s,
            Control::Refresh {
                expire_at: Some(u64::MAX),
                expired: false,
            },
            t0,
        )
        .await
        .unwrap();
        assert!(frames(&conn)[0].contains("\"refresh\""));
        let a_year = t0.after(Duration::from_secs(365 * 24 * 3600));
        let next = s.tick(a_year).expect("still valid a year later");
        assert!(next > a_year.mono);
    }

    #[tokio::test]
    async fn unidirectional_session_speaks_bare_pushes() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = session(&node, Mode::Unidirectional, t0);
        frame(&mut s, br#"{"subs":{}}"#, t0).await.unwrap();
        let out = frames(&conn);
        assert!(out[0].starts_with("{\"connect\":{"), "{out:?}");
        assert!(out[0].contains("\"pong\":false") || !out[0].contains("\"pong\":true"));
        // Later messages are ignored, not parsed.
        frame(&mut s, b"not json", t0).await.unwrap();
        // A server-side subscribe arrives as a bare push.
        control(
            &mut s,
            Control::Subscribe {
                channel: "news".into(),
                info: None,
                data: None,
            },
            t0,
        )
        .await
        .unwrap();
        let out = frames(&conn);
        assert!(
            out[0].starts_with("{\"channel\":\"news\",\"subscribe\""),
            "{out:?}"
        );
        // Expired tokens are a disconnect, not an error reply the client cannot read.
        let (_, mut s2) = session(&node, Mode::Unidirectional, t0);
        let t = token(serde_json::json!({"sub": "bob", "exp": t0.unix - 10}));
        let req = format!(r#"{{"token":"{t}"}}"#);
        assert_eq!(
            frame(&mut s2, req.as_bytes(), t0).await.map_err(|d| d.code),
            Err(3005)
        );
    }

    /// While a command waits on its request, pings go out, pongs are taken and later
    /// commands wait their turn; the completion then answers them in order.
    #[tokio::test]
    async fn a_command_waiting_on_the_engine_leaves_timers_and_pongs_served() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = connected(&node, t0).await;
        let _ = frames(&conn);
        s.handle_frame(br#"{"id":2,"subscribe":{"channel":"news"}}"#, t0)
            .unwrap();
        let subscribe = s.take_request().expect("the subscribe waits on the engine");
        // The engine is slow: a ping interval passes, the ping goes out and is answered.
        let ping_at = t0.after(node.client.ping_interval);
        s.tick(ping_at).expect("ping");
        assert_eq!(frames(&conn), ["{}"]);
        s.handle_frame(b"{}", ping_at).unwrap();
        let late = ping_at.after(node.client.pong_timeout + Duration::from_secs(1));
        s.tick(late)
            .expect("the pong was taken while the subscribe waited");
        // A later command waits behind the first.
        s.handle_frame(br#"{"id":3,"presence":{"channel":"news"}}"#, late)
            .unwrap();
        assert!(s.take_request().is_none(), "one request at a time");
        assert!(frames(&conn).is_empty());
        let done = subscribe.into_future().await;
        s.complete(done, late).unwrap();
        let out = frames(&conn);
        assert!(out[0].contains(r#""id":2,"subscribe""#), "{out:?}");
        let presence = s.take_request().expect("the next command starts");
        s.complete(presence.into_future().await, late).unwrap();
        let out = frames(&conn);
        assert!(out[0].contains(r#""id":3,"presence""#), "{out:?}");
        assert!(
            out[0].contains(r#""c1""#),
            "subscribed before presence was read: {out:?}"
        );
    }

    /// A completion is an input like any other: an engine failure is answered with the
    /// command's error and the connection stays.
    #[tokio::test]
    async fn an_engine_failure_completes_the_command_with_its_error() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = connected(&node, t0).await;
        let _ = frames(&conn);
        s.handle_frame(br#"{"id":4,"presence":{"channel":"news"}}"#, t0)
            .unwrap();
        drop(s.take_request().expect("presence waits on the engine"));
        let failed = Completion(Box::new(Done::Command {
            id: 4,
            kind: CommandKind::Presence,
            outcome: Err(ErrorCode::INTERNAL.into()),
        }));
        s.complete(failed, t0)
            .expect("an error reply, not a disconnect");
        let out = frames(&conn);
        assert!(out[0].contains(r#""id":4,"error":{"code":100"#), "{out:?}");
    }

    /// The connect timeout counts until the connect command comes, not while its token key
    /// or the connect proxy is being asked.
    #[tokio::test]
    async fn a_connect_being_checked_is_not_stale() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = session(&node, Mode::Bidirectional, t0);
        s.handle_frame(br#"{"id":1,"connect":{}}"#, t0).unwrap();
        let admitting = s.take_request().expect("connect waits on its checks");
        let late = t0.after(node.client.connect_timeout + Duration::from_secs(1));
        s.tick(late).expect("not stale while being checked");
        s.complete(admitting.into_future().await, late).unwrap();
        assert!(s.is_connected());
        assert!(frames(&conn)[0].contains(r#""connect""#));
    }

    #[tokio::test]
    async fn close_leaves_a_half_done_subscribe() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = connected(&node, t0).await;
        // As if the task died between joining the hub and queueing the reply.
        conn.start_buffering("ch");
        node.hub.add_subscriber("ch", &conn, false);
        node.engine
            .add_presence("ch", "c1", s.client_info(None))
            .await
            .unwrap();
        s.close().await;
        assert_eq!(node.hub.stats().subscriptions, 0);
        assert_eq!(node.hub.stats().clients, 0);
        assert!(node.engine.presence("ch").await.unwrap().is_empty());
    }

    use crate::conn::test_publication as publication;

    /// A recovery reading history through `top` while live delivery brought `live`.
    fn recovering(after: u64, top: u64, live: &[u64]) -> (Prepared, Vec<Arc<PubMessage>>) {
        let p = Prepared {
            channel: "ch".into(),
            result: SubscribeResult {
                offset: top,
                epoch: "e".into(),
                positioned: true,
                recoverable: true,
                was_recovering: true,
                ..Default::default()
            },
            history: (after + 1..=top).map(publication).collect(),
            recovering: true,
            after,
            sub: Sub {
                presence: false,
                join_leave: false,
                chan_info: None,
                expire_at: None,
                proxy_expiry: false,
                expiring: false,
            },
        };
        (p, live_msgs(live))
    }

    /// Settles `p` as a subscribe does: `live` arrives while it is buffered, and the reply is
    /// settled inside the connection's outbox lock. On a thread, so that settling which
    /// blocks on that lock fails the test instead of hanging it.
    fn settle_buffered(
        conn: &Arc<ConnHandle>,
        mut p: Prepared,
        live: Vec<Arc<PubMessage>>,
    ) -> Prepared {
        let conn = conn.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            conn.start_buffering("ch");
            for m in &live {
                conn.deliver("ch", m);
            }
            conn.complete_buffering(&["ch"], |mut held| {
                let (frames, settled) = settle(&mut p, held.pop().unwrap_or_default(), &conn);
                (frames, vec![settled])
            });
            let _ = tx.send(p);
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("settling a subscription blocked on its own connection")
    }

    /// Offsets of the publications queued on `conn`, and how many 2500 controls.
    fn queued(conn: &ConnHandle) -> (Vec<u64>, usize) {
        let d = conn.drain();
        let offsets = d
            .frames
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_slice(f).expect("JSON push");
                v["push"]["pub"]["offset"].as_u64().unwrap_or(0)
            })
            .collect();
        let resubscribes = d
            .controls
            .iter()
            .filter(|c| matches!(c, Control::Unsubscribe { code: 2500, .. }))
            .count();
        (offsets, resubscribes)
    }

    fn live_msgs(offsets: &[u64]) -> Vec<Arc<PubMessage>> {
        offsets
            .iter()
            .map(|&o| {
                Arc::new(PubMessage::new(
                    Arc::from("ch"),
                    publication(o),
                    Instant::now(),
                ))
            })
            .collect()
    }

    #[test]
    fn a_hole_in_the_live_feed_after_whole_history_is_recovered_not_reported_lost() {
        let conn = Arc::new(ConnHandle::new(Arc::from("c"), 1 << 20));
        // History has 6..=10; 11 never arrived live, 12 and 13 did.
        let (p, live) = recovering(5, 10, &[9, 10, 12, 13]);
        let p = settle_buffered(&conn, p, live);
        assert!(p.result.recovered, "nothing is lost: history is whole");
        let got: Vec<u64> = p.result.publications.iter().map(|x| x.offset).collect();
        assert_eq!(got, (6..=10).collect::<Vec<_>>());
        assert_eq!(p.result.offset, 10);
        // The client is told to resubscribe and recovers 11 onwards from history; nothing
        // after the hole reaches it meanwhile.
        assert_eq!(queued(&conn), (vec![], 1));
        conn.deliver("ch", &live_msgs(&[14])[0]);
        assert_eq!(queued(&conn), (vec![], 0));
    }

    #[test]
    fn a_hole_in_history_is_reported() {
        let conn = Arc::new(ConnHandle::new(Arc::from("c"), 1 << 20));
        let (mut p, live) = recovering(5, 10, &[11]);
        p.history.retain(|x| x.offset != 7);
        let p = settle_buffered(&conn, p, live);
        assert!(!p.result.recovered);
        assert_eq!(queued(&conn), (vec![11], 0));
    }

    #[test]
    fn live_after_the_reply_stops_at_a_hole() {
        let conn = Arc::new(ConnHandle::new(Arc::from("c"), 1 << 20));
        // A new subscription positioned at 10 (history read behind the live feed): 11 came
        // live, 12 did not, 13 did.
        let (mut p, _) = recovering(10, 10, &[]);
        p.recovering = false;
        let p = settle_buffered(&conn, p, live_msgs(&[9, 10, 11, 13]));
        assert_eq!(p.result.offset, 10);
        assert_eq!(queued(&conn), (vec![11], 1));
        conn.deliver("ch", &live_msgs(&[14])[0]);
        assert_eq!(queued(&conn), (vec![], 0));
    }
}
