//! The per-connection state machine: connect and auth, subscribe with recovery, publish,
//! presence, history, ping/pong, token refresh and limits. It does no socket I/O and reads no
//! clock: the connection driver hands it frames, controls and the time (`Now`), and drains
//! the connection's outbox, where the session queues frames already encoded for its client's
//! mode (full protocol or bare pushes).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use herald_protocol::client::{
    ClientInfo, Command, ConnectRequest, ConnectResult, HistoryResult, Push, RefreshResult, Reply,
    SubscribeResult, UnsubscribePush, encode_bare_push, encode_uni_connect, parse_uni_connect,
    split_commands,
};
use herald_protocol::json::Raw;
use herald_protocol::{Disconnect, ErrorCode, ProtocolError, codes};

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
    subs: HashMap<String, Sub>,
    next_ping: Instant,
    awaiting_pong: Option<Instant>,
    /// What the connect reply calls the session (the client id unless a transport routes
    /// later commands by another name, as HTTP-streaming and SSE emulation do).
    session_id: Option<String>,
    closed: bool,
    /// Command rate limit (`client.command_rate`); None when unlimited.
    rate: Option<crate::ratelimit::CommandBucket>,
    /// The transport's name and the client's request headers a proxy may forward.
    transport: &'static str,
    headers: Vec<(String, String)>,
    /// `meta` from the connect proxy, sent back with every later proxy request.
    meta: Option<Raw>,
    /// The connect proxy set `expire_at`: the refresh proxy extends it.
    proxy_expiry: bool,
    /// The transport checks the client is alive itself (MQTT keep-alive): no pong expected.
    transport_keepalive: bool,
}

impl Session {
    /// A session for `conn`, whose mode says what its client reads; `now` starts the connect
    /// timeout.
    pub fn new(node: Arc<Node>, conn: Arc<ConnHandle>, now: Instant) -> Self {
        let rate = crate::ratelimit::CommandBucket::starting(
            node.client.command_rate,
            node.client.command_burst,
            now,
        );
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
            subs: HashMap::new(),
            awaiting_pong: None,
            session_id: None,
            closed: false,
            rate,
            transport: "websocket",
            headers: Vec::new(),
            meta: None,
            proxy_expiry: false,
            transport_keepalive: false,
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
        self.session_id = Some(id);
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

    /// Handles one incoming frame. Bidirectional: one or more commands, `\n`-separated JSON
    /// or length-prefixed Protobuf.
    /// Unidirectional: the first message is the connect request, later ones are ignored.
    pub async fn handle_frame(&mut self, data: &[u8], now: Now) -> Result<(), Disconnect> {
        if self.conn.mode == Mode::Unidirectional {
            if std::mem::replace(&mut self.connect_seen, true) {
                return Ok(());
            }
            let req =
                parse_uni_connect(data).map_err(|_| Disconnect::from(Disconnect::BAD_REQUEST))?;
            return self.handle_command(uni_connect_command(req), now).await;
        }
        match self.conn.codec {
            Codec::Json => {
                for line in split_commands(data) {
                    let cmd: Command = serde_json::from_slice(line)
                        .map_err(|_| Disconnect::from(Disconnect::BAD_REQUEST))?;
                    self.handle_command(cmd, now).await?;
                }
            }
            Codec::Protobuf => {
                // Commands before a malformed one are served; the malformed one closes.
                for cmd in herald_protocol::proto::decode_commands(data) {
                    let cmd = cmd.map_err(|e| {
                        tracing::debug!(client = %self.conn.id, error = %e, "malformed protobuf frame");
                        Disconnect::from(Disconnect::BAD_REQUEST)
                    })?;
                    self.handle_command(cmd.into(), now).await?;
                }
            }
        }
        Ok(())
    }

    pub async fn handle_command(&mut self, cmd: Command, now: Now) -> Result<(), Disconnect> {
        let kind = CommandKind::of(&cmd);
        if kind == CommandKind::Pong {
            self.node.metrics.command(kind, None);
            self.awaiting_pong = None;
            return Ok(());
        }
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
        let outcome = if !self.connected {
            match cmd.connect {
                Some(req) => self.cmd_connect(id, req, now).await,
                None => return Err(Disconnect::BAD_REQUEST.into()),
            }
        } else if cmd.connect.is_some() {
            return Err(Disconnect::BAD_REQUEST.into());
        } else if let Some(req) = cmd.subscribe {
            self.cmd_subscribe(id, req, now).await
        } else if let Some(req) = cmd.unsubscribe {
            self.unsubscribe(&req.channel, None).await;
            Ok(Some(Reply {
                id,
                unsubscribe: Some(Default::default()),
                ..Default::default()
            }))
        } else if let Some(req) = cmd.publish {
            self.cmd_publish(id, req).await
        } else if let Some(req) = cmd.presence {
            self.cmd_presence(id, &req.channel).await
        } else if let Some(req) = cmd.presence_stats {
            self.cmd_presence_stats(id, &req.channel).await
        } else if let Some(req) = cmd.history {
            self.cmd_history(id, req).await
        } else if let Some(req) = cmd.refresh {
            self.cmd_refresh(id, &req.token, now).await
        } else if let Some(req) = cmd.sub_refresh {
            self.cmd_sub_refresh(id, &req.channel, &req.token, now)
                .await
        } else if let Some(req) = cmd.rpc {
            self.cmd_rpc(id, req).await
        } else if cmd.send.is_some() {
            // Asynchronous messages have no handler here and need no reply.
            Ok(None)
        } else {
            Err(ErrorCode::METHOD_NOT_FOUND.into())
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

    async fn cmd_connect(
        &mut self,
        id: u32,
        req: ConnectRequest,
        now: Now,
    ) -> Result<Option<Reply>, Fail> {
        if self.node.is_draining() {
            return Err(Disconnect::SHUTDOWN.into());
        }
        let mut server_channels: Vec<String> = Vec::new();
        let mut connect_data = None;
        let mut server_subs: BTreeMap<String, proxy::SubOptions> = BTreeMap::new();
        let connect_proxy = &self.node.client.proxy.connect;
        if req.token.is_empty() && connect_proxy.enabled {
            // Headers a browser WebSocket cannot set come in the command (SDK emulation).
            self.headers
                .extend(req.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
            let node = self.node.clone();
            let body = proxy::ConnectRequest {
                client: self.client_fields(),
                name: &req.name,
                version: &req.version,
                data: req.data.as_ref(),
            };
            let r: proxy::ConnectResult = node
                .proxy(ProxyKind::Connect, connect_proxy, &self.headers, &body)
                .await?;
            if r.user.is_empty() && !self.node.client.allow_anonymous {
                return Err(ErrorCode::UNAUTHORIZED.into());
            }
            self.user = r.user;
            self.conn_info = proxy::raw_or_b64(r.info, r.b64info.as_deref())?;
            connect_data = proxy::raw_or_b64(r.data, r.b64data.as_deref())?;
            self.meta = r.meta;
            if r.expire_at > 0 {
                if r.expire_at <= now.unix {
                    return Err(Disconnect::EXPIRED.into());
                }
                self.expire_at = now.clamp_expiry(Some(r.expire_at));
                self.proxy_expiry = self.node.client.proxy.refresh.enabled;
            }
            server_channels.extend(r.channels);
            server_channels.extend(r.subs.keys().cloned());
            server_subs = r.subs;
        } else if req.token.is_empty() {
            if !self.node.client.allow_anonymous {
                return Err(ErrorCode::UNAUTHORIZED.into());
            }
        } else {
            let claims = self
                .node
                .tokens
                .check_connect(&req.token)
                .await
                .map_err(|e| failure::token(e, TokenUse::Connect))?;
            if claims.sub.is_empty() && !self.node.client.allow_anonymous {
                return Err(Disconnect::INVALID_TOKEN.into());
            }
            self.conn_info = auth::info_from_claims(claims.info, claims.b64info.as_deref())
                .map_err(|_| Fail::from(Disconnect::INVALID_TOKEN))?;
            self.user = claims.sub;
            self.expire_at = Self::token_expiry(claims.expire_at, claims.exp, now);
            if let Some(at) = self.expire_at
                && at <= now.unix
            {
                return Err(ErrorCode::TOKEN_EXPIRED.into());
            }
            server_channels.extend(claims.channels);
            server_channels.extend(claims.subs.into_keys());
        }
        let limit = self.node.client.user_connection_limit;
        if limit > 0 && !self.user.is_empty() && self.node.hub.user_conns(&self.user).len() >= limit
        {
            return Err(Disconnect::CONNECTION_LIMIT.into());
        }
        let personal = &self.node.client.subscribe_to_user_personal_channel;
        if let Some(ch) = personal.channel(&self.user) {
            server_channels.push(ch);
            if personal.single_connection {
                // The user's other connections, on every node, give way to this one.
                self.node
                    .control(crate::engine::ControlCommand::Disconnect {
                        user: self.user.clone(),
                        client: String::new(),
                        session: String::new(),
                        whitelist: vec![self.conn.id.to_string()],
                        code: Disconnect::CONNECTION_LIMIT.code,
                        reason: Disconnect::CONNECTION_LIMIT.reason.to_string(),
                    })
                    .await?;
            }
        }
        self.conn.set_user(&self.user);
        self.connected = true;
        self.node.hub.add_conn(&self.conn);
        self.node.metrics.connected();
        tracing::debug!(client = %self.conn.id, user = %self.user, "client connected");

        // Server-side subscriptions: from the token, recovering from the positions the
        // client sends back in `subs` on reconnect.
        server_channels.sort();
        server_channels.dedup();
        let mut req_subs = req.subs;
        let mut prepared = Vec::new();
        for ch in server_channels {
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
            match self.prepare_subscription(&ch, params, now).await {
                Ok(p) => prepared.push(p),
                Err(Fail::Disconnect(d)) => return Err(Fail::Disconnect(d)),
                Err(Fail::Error(e)) => {
                    tracing::warn!(channel = %ch, error = %e, "server-side subscription failed");
                }
            }
        }
        let (expires, ttl) = Self::ttl_fields(self.expire_at, now);
        let mut result = ConnectResult {
            client: self.conn.id.to_string(),
            version: VERSION.to_string(),
            // The refresh proxy renews a proxied connection: the client is not asked to.
            expires: expires && !self.proxy_expiry,
            ttl: if self.proxy_expiry { 0 } else { ttl },
            data: connect_data,
            subs: BTreeMap::new(),
            ping: self.node.client.ping_interval.as_secs() as u32,
            pong: self.expects_pong(),
            session: self
                .session_id
                .clone()
                .unwrap_or_else(|| self.conn.id.to_string()),
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
        Ok(None)
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

    /// Checks a subscription token; returns (chan_info, expire_at).
    async fn check_sub_token(
        &self,
        ch: &str,
        token: &str,
        usage: TokenUse,
        now: Now,
    ) -> Result<(Option<Raw>, Option<u64>), Fail> {
        let claims = self
            .node
            .tokens
            .check_subscribe(token)
            .await
            .map_err(|e| failure::token(e, usage))?;
        if claims.sub != self.user || claims.channel != ch {
            return Err(failure::token_mismatch());
        }
        let info = auth::info_from_claims(claims.info, claims.b64info.as_deref())
            .map_err(|_| Fail::from(Disconnect::INVALID_TOKEN))?;
        Ok((info, Self::token_expiry(claims.expire_at, claims.exp, now)))
    }

    async fn cmd_subscribe(
        &mut self,
        id: u32,
        req: herald_protocol::client::SubscribeRequest,
        now: Now,
    ) -> Result<Option<Reply>, Fail> {
        let ch = req.channel.as_str();
        if ch.is_empty() || ch.len() > self.node.client.channel_max_length {
            return Err(ErrorCode::BAD_REQUEST.into());
        }
        if self.subs.contains_key(ch) {
            return Err(ErrorCode::ALREADY_SUBSCRIBED.into());
        }
        if self.subs.len() >= self.node.client.max_channels {
            return Err(ErrorCode::LIMIT_EXCEEDED.into());
        }
        let node = self.node.clone();
        let ns = node.namespace(ch).ok_or(ErrorCode::UNKNOWN_CHANNEL)?;
        // An unknown delta type is a client bug; a known one the namespace does not allow
        // is simply not negotiated (the reply says `delta: false`).
        let delta = match req.delta.as_str() {
            "" => false,
            crate::options::DELTA_FOSSIL => {
                ns.fossil_delta() && self.conn.mode == Mode::Bidirectional
            }
            _ => return Err(ErrorCode::BAD_REQUEST.into()),
        };
        let mut chan_info = None;
        let mut expire_at = None;
        let mut sub_data = None;
        let mut ns_override = None;
        let mut proxy_expiry = false;
        let subscribe_proxy = &node.channel_proxy.subscribe;
        if req.token.is_empty() && ns.subscribe_proxy_enabled && subscribe_proxy.enabled {
            // The backend decides instead of the namespace's permissions.
            let body = proxy::SubscribeRequest {
                client: self.client_fields(),
                user: &self.user,
                channel: ch,
                token: "",
                data: req.data.as_ref(),
                meta: self.meta.as_ref(),
            };
            let r: proxy::SubscribeResult = node
                .proxy(ProxyKind::Subscribe, subscribe_proxy, &self.headers, &body)
                .await?;
            chan_info = proxy::raw_or_b64(r.info, r.b64info.as_deref())?;
            sub_data = proxy::raw_or_b64(r.data, r.b64data.as_deref())?;
            if r.expire_at > 0 {
                expire_at = now.clamp_expiry(Some(r.expire_at));
                proxy_expiry =
                    ns.sub_refresh_proxy_enabled && node.channel_proxy.sub_refresh.enabled;
            }
            ns_override = r.r#override;
        } else if channel::is_private(ch) || ns.require_subscription_token || !req.token.is_empty()
        {
            if req.token.is_empty() {
                return Err(ErrorCode::PERMISSION_DENIED.into());
            }
            (chan_info, expire_at) = self
                .check_sub_token(ch, &req.token, TokenUse::Subscribe, now)
                .await?;
        } else if let Some(allowed) = channel::user_allowed(ch, &self.user) {
            if !allowed {
                return Err(ErrorCode::PERMISSION_DENIED.into());
            }
        } else {
            let ok = if self.user.is_empty() {
                ns.allow_subscribe_for_anonymous
            } else {
                ns.allow_subscribe_for_client
            };
            if !ok {
                return Err(ErrorCode::PERMISSION_DENIED.into());
            }
        }
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
            chan_info,
            data: sub_data,
            expire_at,
            delta,
            ns_override,
            proxy_expiry,
        };
        let prepared = self.prepare_subscription(ch, params, now).await?;
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
        Ok(None)
    }

    /// Joins the hub first (buffering), then reads the stream position and, when recovering,
    /// the missed publications. The reply is queued by `finish_subscription`.
    async fn prepare_subscription(
        &mut self,
        ch: &str,
        p: SubParams,
        now: Now,
    ) -> Result<Prepared, Fail> {
        let node = self.node.clone();
        let base: &NamespaceOptions = node.namespace(ch).ok_or(ErrorCode::UNKNOWN_CHANNEL)?;
        let overridden;
        let ns = match p.ns_override {
            Some(o) => {
                overridden = apply_override(base.clone(), o);
                &overridden
            }
            None => base,
        };
        let push_join_leave = ns.join_leave && (p.join_leave || ns.force_push_join_leave);
        self.conn.start_buffering(ch);
        let first = node
            .hub
            .add_subscriber_with(ch, &self.conn, push_join_leave, p.delta);
        match self.position_subscription(ch, ns, first, &p, now).await {
            Ok((result, history, recovering, after)) => Ok(Prepared {
                channel: ch.to_string(),
                result: SubscribeResult {
                    data: p.data,
                    delta: p.delta,
                    ..result
                },
                history,
                recovering,
                after,
                sub: Sub {
                    presence: ns.presence,
                    join_leave: ns.join_leave,
                    chan_info: p.chan_info,
                    expire_at: p.expire_at,
                    proxy_expiry: p.proxy_expiry,
                },
            }),
            Err(e) => {
                self.conn.cancel_buffering(ch);
                if node.hub.remove_subscriber(ch, &self.conn.id) {
                    let _ = node.engine.unsubscribe(ch).await;
                }
                if ns.presence {
                    let _ = node.engine.remove_presence(ch, &self.conn.id).await;
                }
                Err(e)
            }
        }
    }

    async fn position_subscription(
        &self,
        ch: &str,
        ns: &NamespaceOptions,
        first: bool,
        p: &SubParams,
        now: Now,
    ) -> Result<
        (
            SubscribeResult,
            Vec<herald_protocol::client::Publication>,
            bool,
            u64,
        ),
        Fail,
    > {
        let engine = &self.node.engine;
        if first {
            engine.subscribe(ch).await.map_err(ProtocolError::from)?;
        }
        let info = self.client_info(p.chan_info.clone());
        if ns.presence {
            engine
                .add_presence(ch, &self.conn.id, info.clone())
                .await
                .map_err(ProtocolError::from)?;
        }
        if ns.join_leave {
            engine
                .publish_join_leave(ch, info, true)
                .await
                .map_err(ProtocolError::from)?;
        }
        let history = ns.history_enabled();
        let recoverable = history && (ns.force_recovery || p.recoverable);
        let positioned = history && (ns.force_positioning || p.positioned || recoverable);
        let (expires, ttl) = Self::ttl_fields(p.expire_at, now);
        let mut result = SubscribeResult {
            expires,
            ttl,
            recoverable,
            positioned,
            ..Default::default()
        };
        if !positioned {
            return Ok((result, Vec::new(), false, 0));
        }
        let recovering = recoverable && p.recover;
        let mut q = Node::history_query(ns);
        if recovering {
            q.since = Some(StreamPosition {
                offset: p.offset,
                epoch: p.epoch.clone(),
            });
            // A client further behind than a recovery may return costs the engine no reads
            // (NATS reads one message per request): it gets the position only.
            q.whole_within = Some(self.node.client.recovery_max_publication_limit);
        } else {
            q.limit = Some(0);
        }
        let h = engine.history(ch, q).await.map_err(ProtocolError::from)?;
        result.epoch = h.position.epoch.clone();
        result.offset = h.position.offset;
        if !recovering {
            return Ok((result, Vec::new(), false, h.position.offset));
        }
        result.was_recovering = true;
        let top = h.position.offset;
        let epoch_ok = p.epoch.is_empty() || p.epoch == h.position.epoch;
        let complete = epoch_ok
            && p.offset <= top
            && match h.publications.first() {
                Some(first) => first.offset == p.offset + 1,
                None => p.offset == top,
            }
            && h.publications.len() <= self.node.client.recovery_max_publication_limit;
        if complete {
            Ok((result, h.publications, true, p.offset))
        } else if p.reject_unrecovered {
            Err(ErrorCode::UNRECOVERABLE_POSITION.into())
        } else {
            // Not recoverable: the client is told so, and goes live from the current top.
            Ok((result, Vec::new(), false, top))
        }
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

    /// Leaves a channel; with `push`, tells the client (server-side unsubscribe).
    pub async fn unsubscribe(&mut self, ch: &str, push: Option<(u32, String)>) {
        let Some(sub) = self.subs.remove(ch) else {
            return;
        };
        self.conn.end_delta(ch);
        self.leave(ch, sub).await;
        if let Some((code, reason)) = push {
            self.push(Push {
                channel: ch.to_string(),
                unsubscribe: Some(UnsubscribePush { code, reason }),
                ..Default::default()
            });
        }
    }

    async fn leave(&self, ch: &str, sub: Sub) {
        let engine = &self.node.engine;
        if self.node.hub.remove_subscriber(ch, &self.conn.id)
            && let Err(e) = engine.unsubscribe(ch).await
        {
            tracing::warn!(channel = %ch, error = %e, "engine unsubscribe failed");
        }
        if sub.presence {
            let _ = engine.remove_presence(ch, &self.conn.id).await;
        }
        if sub.join_leave {
            let _ = engine
                .publish_join_leave(ch, self.client_info(sub.chan_info), false)
                .await;
        }
    }

    async fn cmd_publish(
        &mut self,
        id: u32,
        req: herald_protocol::client::PublishRequest,
    ) -> Result<Option<Reply>, Fail> {
        let ch = req.channel.as_str();
        let node = self.node.clone();
        let ns = node.channel_options(ch)?;
        let publish_proxy = &node.channel_proxy.publish;
        let mut data = crate::node::PublishData {
            data: req.data.ok_or(ErrorCode::BAD_REQUEST)?,
            binary: req.binary,
        };
        let mut skip_history = false;
        if ns.publish_proxy_enabled && publish_proxy.enabled {
            // The backend decides instead of the namespace's permissions, and may rewrite.
            let b64data = data.binary.then(|| {
                use base64::Engine as _;
                let bytes = herald_protocol::json::base64_bytes(&data.data).unwrap_or_default();
                base64::engine::general_purpose::STANDARD.encode(bytes)
            });
            let body = proxy::PublishRequest {
                client: self.client_fields(),
                user: &self.user,
                channel: ch,
                data: (!data.binary).then_some(&data.data),
                b64data,
                meta: self.meta.as_ref(),
            };
            let r: proxy::PublishResult = node
                .proxy(ProxyKind::Publish, publish_proxy, &self.headers, &body)
                .await?;
            if let Some(raw) = r.data {
                data = raw.into();
            } else if let Some(b64) = r.b64data.as_deref() {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|_| Fail::from(ErrorCode::INTERNAL))?;
                data = crate::node::PublishData::from_bytes(&bytes);
            }
            skip_history = r.skip_history;
        } else if !self.permitted(
            ns.allow_publish_for_client,
            ns.allow_publish_for_subscriber,
            ns.allow_publish_for_anonymous,
            ch,
        ) {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        let info = self.client_info(self.subs.get(ch).and_then(|s| s.chan_info.clone()));
        node.publish(ch, data, Some(info), BTreeMap::new(), skip_history, None)
            .await?;
        Ok(Some(Reply {
            id,
            publish: Some(Default::default()),
            ..Default::default()
        }))
    }

    /// Without an RPC proxy: "not available" (108), as Centrifugo answers.
    async fn cmd_rpc(
        &mut self,
        id: u32,
        req: herald_protocol::client::RpcRequest,
    ) -> Result<Option<Reply>, Fail> {
        let node = self.node.clone();
        let options = node
            .rpc_proxy
            .route(&req.method)
            .ok_or(ErrorCode::NOT_AVAILABLE)?;
        let body = proxy::RpcRequest {
            client: self.client_fields(),
            user: &self.user,
            method: &req.method,
            data: req.data.as_ref(),
            meta: self.meta.as_ref(),
        };
        let r: proxy::RpcResult = node
            .proxy(ProxyKind::Rpc, &options, &self.headers, &body)
            .await?;
        let data = proxy::raw_or_b64(r.data, r.b64data.as_deref())?;
        Ok(Some(Reply {
            id,
            rpc: Some(herald_protocol::client::RpcResult { data }),
            ..Default::default()
        }))
    }

    async fn cmd_presence(&mut self, id: u32, ch: &str) -> Result<Option<Reply>, Fail> {
        self.check_presence(ch)?;
        let presence = self.node.presence(ch).await?;
        Ok(Some(Reply {
            id,
            presence: Some(herald_protocol::client::PresenceResult { presence }),
            ..Default::default()
        }))
    }

    async fn cmd_presence_stats(&mut self, id: u32, ch: &str) -> Result<Option<Reply>, Fail> {
        self.check_presence(ch)?;
        let (num_clients, num_users) = self.node.presence_stats(ch).await?;
        Ok(Some(Reply {
            id,
            presence_stats: Some(herald_protocol::client::PresenceStatsResult {
                num_clients,
                num_users,
            }),
            ..Default::default()
        }))
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

    async fn cmd_history(
        &mut self,
        id: u32,
        req: herald_protocol::client::HistoryRequest,
    ) -> Result<Option<Reply>, Fail> {
        let ch = req.channel.as_str();
        let ns = self.node.channel_options(ch)?;
        if !ns.history_enabled() {
            return Err(ErrorCode::NOT_AVAILABLE.into());
        }
        if !self.permitted(
            ns.allow_history_for_client,
            ns.allow_history_for_subscriber,
            ns.allow_history_for_anonymous,
            ch,
        ) {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        let since = req.since.map(|s| StreamPosition {
            offset: s.offset,
            epoch: s.epoch,
        });
        let h = self.node.history(ch, req.limit, since, req.reverse).await?;
        Ok(Some(Reply {
            id,
            history: Some(HistoryResult {
                publications: h.publications,
                epoch: h.position.epoch,
                offset: h.position.offset,
            }),
            ..Default::default()
        }))
    }

    async fn cmd_refresh(&mut self, id: u32, token: &str, now: Now) -> Result<Option<Reply>, Fail> {
        let claims = self
            .node
            .tokens
            .check_connect(token)
            .await
            .map_err(|e| failure::token(e, TokenUse::Refresh))?;
        if claims.sub != self.user {
            return Err(failure::token_mismatch());
        }
        self.expire_at = Self::token_expiry(claims.expire_at, claims.exp, now);
        let (expires, ttl) = Self::ttl_fields(self.expire_at, now);
        Ok(Some(Reply {
            id,
            refresh: Some(RefreshResult { expires, ttl }),
            ..Default::default()
        }))
    }

    async fn cmd_sub_refresh(
        &mut self,
        id: u32,
        ch: &str,
        token: &str,
        now: Now,
    ) -> Result<Option<Reply>, Fail> {
        if !self.subs.contains_key(ch) {
            return Err(ErrorCode::PERMISSION_DENIED.into());
        }
        let (_, expire_at) = self
            .check_sub_token(ch, token, TokenUse::SubRefresh, now)
            .await?;
        if let Some(sub) = self.subs.get_mut(ch) {
            sub.expire_at = expire_at;
        }
        let (expires, ttl) = Self::ttl_fields(expire_at, now);
        Ok(Some(Reply {
            id,
            sub_refresh: Some(RefreshResult { expires, ttl }),
            ..Default::default()
        }))
    }

    /// Carries out what the server API asked of this connection.
    pub async fn handle_control(&mut self, c: Control, now: Now) -> Result<(), Disconnect> {
        if let Control::Commands(data) = c {
            return self.handle_frame(&data, now).await;
        }
        if !self.connected {
            return Ok(());
        }
        match c {
            Control::Commands(_) => {}
            Control::Unsubscribe {
                channel,
                code,
                reason,
            } => {
                self.unsubscribe(&channel, Some((code, reason))).await;
            }
            Control::Subscribe {
                channel,
                info,
                data,
            } => {
                if self.subs.contains_key(&channel) || self.node.namespace(&channel).is_none() {
                    return Ok(());
                }
                let params = SubParams {
                    chan_info: info.map(herald_protocol::json::single_line),
                    data: data.map(herald_protocol::json::single_line),
                    ..Default::default()
                };
                match self.prepare_subscription(&channel, params, now).await {
                    Ok(p) => {
                        let ch = channel.clone();
                        let conn = self.conn.clone();
                        self.finish_subscription(p, move |result| {
                            let push = Push {
                                channel: ch,
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
                }
            }
            Control::Refresh { expire_at, expired } => {
                if expired {
                    return Err(Disconnect::EXPIRED.into());
                }
                self.expire_at = now.clamp_expiry(expire_at);
                let (expires, ttl) = Self::ttl_fields(self.expire_at, now);
                self.push(Push {
                    refresh: Some(RefreshResult { expires, ttl }),
                    ..Default::default()
                });
            }
        }
        Ok(())
    }

    /// Timer work: connect timeout, pings, missing pongs, expiry. Returns when to call again.
    pub async fn tick(&mut self, now: Now) -> Result<Instant, Disconnect> {
        let node = self.node.clone();
        let opts = &node.client;
        if !self.connected {
            let deadline = self.created + opts.connect_timeout;
            if now.mono >= deadline {
                return Err(Disconnect::STALE.into());
            }
            return Ok(deadline);
        }
        if let Some(sent) = self.awaiting_pong
            && now.mono >= sent + opts.pong_timeout
        {
            return Err(Disconnect::NO_PONG.into());
        }
        if self.proxy_expiry
            && let Some(at) = self.expire_at
            && now.unix >= at
        {
            self.refresh_by_proxy(now).await?;
        }
        let grace = opts.expired_close_delay.as_secs();
        if !self.proxy_expiry
            && let Some(at) = self.expire_at
            && now.unix >= at.saturating_add(grace)
        {
            return Err(Disconnect::EXPIRED.into());
        }
        let expired: Vec<(String, bool)> = self
            .subs
            .iter()
            .filter(|(_, s)| s.expire_at.is_some_and(|at| now.unix >= at))
            .map(|(c, s)| (c.clone(), s.proxy_expiry))
            .collect();
        for (ch, proxied) in expired {
            if proxied && self.sub_refresh_by_proxy(&ch, now).await? {
                continue;
            }
            let (code, reason) = codes::unsubscribe::EXPIRED;
            self.unsubscribe(&ch, Some((code, reason.to_string())))
                .await;
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
        Ok(self.next_wakeup(now))
    }

    /// Asks the refresh proxy to extend this connection. The backend may let it expire
    /// (3005) or disconnect it; a backend that fails is asked again a little later.
    async fn refresh_by_proxy(&mut self, now: Now) -> Result<(), Disconnect> {
        let node = self.node.clone();
        let body = proxy::RefreshRequest {
            client: self.client_fields(),
            user: &self.user,
            meta: self.meta.as_ref(),
        };
        let options = &node.client.proxy.refresh;
        match node
            .proxy::<proxy::RefreshResult, _>(ProxyKind::Refresh, options, &self.headers, &body)
            .await
        {
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

    /// Asks the sub-refresh proxy to extend a subscription; false when it expired (the
    /// caller unsubscribes it with 2501).
    async fn sub_refresh_by_proxy(&mut self, ch: &str, now: Now) -> Result<bool, Disconnect> {
        let node = self.node.clone();
        let body = proxy::SubRefreshRequest {
            client: self.client_fields(),
            user: &self.user,
            channel: ch,
            meta: self.meta.as_ref(),
        };
        let options = &node.channel_proxy.sub_refresh;
        let outcome = node
            .proxy::<proxy::RefreshResult, _>(ProxyKind::SubRefresh, options, &self.headers, &body)
            .await;
        let Some(sub) = self.subs.get_mut(ch) else {
            return Ok(true);
        };
        match outcome {
            Ok(r) if r.expired || (r.expire_at != 0 && r.expire_at <= now.unix) => Ok(false),
            Ok(r) => {
                if let Ok(Some(info)) = proxy::raw_or_b64(r.info, r.b64info.as_deref()) {
                    sub.chan_info = Some(info);
                }
                sub.expire_at = now.clamp_expiry(Some(r.expire_at));
                sub.proxy_expiry = sub.expire_at.is_some();
                Ok(true)
            }
            Err(proxy::Outcome::Disconnect(d)) => Err(d),
            Err(_) => {
                sub.expire_at = Some(now.unix.saturating_add(PROXY_RETRY_SECS));
                Ok(true)
            }
        }
    }

    /// When `tick` must run next: connect timeout, ping, pong deadline or an expiry.
    pub fn next_wakeup(&self, now: Now) -> Instant {
        let opts = &self.node.client;
        if !self.connected {
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
        let soonest_expiry = self
            .expire_at
            .map(|at| at.saturating_add(grace))
            .into_iter()
            .chain(self.subs.values().filter_map(|s| s.expire_at))
            .min();
        if let Some(at) = soonest_expiry {
            next = next.min(now.mono_at(at));
        }
        next
    }

    /// Leaves every channel and the hub. Called once when the connection ends.
    pub async fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let subs: Vec<(String, Sub)> = self.subs.drain().collect();
        for (ch, sub) in subs {
            self.leave(&ch, sub).await;
        }
        // A connection cut short in the middle of a subscribe (panic, timeout) is in the hub
        // for channels it has no subscription for yet.
        for ch in self.conn.buffering_channels() {
            self.conn.cancel_buffering(&ch);
            if self.node.hub.remove_subscriber(&ch, &self.conn.id) {
                let _ = self.node.engine.unsubscribe(&ch).await;
            }
            let _ = self.node.engine.remove_presence(&ch, &self.conn.id).await;
        }
        // The transport records why the connection ended with `ConnHandle::close` before
        // calling this; no reason recorded means the client or the network closed it.
        let code = self.conn.close_reason().map_or(3000, |d| d.code);
        self.node.metrics.disconnected(code);
        if code == Disconnect::SLOW.code {
            tracing::warn!(client = %self.conn.id, user = %self.user, "slow consumer disconnected");
        }
        if self.connected {
            self.node.hub.remove_conn(&self.conn);
            tracing::debug!(client = %self.conn.id, user = %self.user, code, "client disconnected");
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
        s.handle_frame(br#"{"id":1,"connect":{}}"#, t0)
            .await
            .unwrap();
        (conn, s)
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
        let deadline = s.tick(t0).await.expect("not yet");
        assert_eq!(deadline, t0.mono + node.client.connect_timeout);
        let late = t0.after(node.client.connect_timeout);
        assert_eq!(s.tick(late).await.map_err(|d| d.code), Err(3502));
    }

    #[tokio::test]
    async fn ping_then_missing_pong_closes_with_3012() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = connected(&node, t0).await;
        assert!(frames(&conn)[0].contains("\"connect\""));
        let ping_at = t0.after(node.client.ping_interval);
        assert_eq!(s.next_wakeup(t0), ping_at.mono);
        s.tick(ping_at).await.unwrap();
        assert_eq!(frames(&conn), ["{}"]);
        // The pong deadline is next; one second before it nothing happens.
        let pong_deadline = ping_at.after(node.client.pong_timeout);
        assert_eq!(s.next_wakeup(ping_at), pong_deadline.mono);
        let almost = ping_at.after(node.client.pong_timeout - Duration::from_secs(1));
        s.tick(almost).await.unwrap();
        assert_eq!(s.tick(pong_deadline).await.map_err(|d| d.code), Err(3012));
    }

    #[tokio::test]
    async fn answered_ping_keeps_the_connection() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = connected(&node, t0).await;
        let ping_at = t0.after(node.client.ping_interval);
        s.tick(ping_at).await.unwrap();
        s.handle_frame(b"{}", ping_at).await.unwrap();
        let later = ping_at.after(node.client.pong_timeout + Duration::from_secs(1));
        s.tick(later).await.expect("pong answered");
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
        s.handle_frame(cmd.as_bytes(), t0).await.unwrap();
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
        s.tick(before).await.expect("not expired yet");
        // The ping that tick sent is answered.
        s.handle_frame(b"{}", before).await.unwrap();
        assert_eq!(s.tick(close_at).await.map_err(|d| d.code), Err(3005));
    }

    #[tokio::test]
    async fn refresh_to_the_end_of_time_extends_instead_of_closing() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = session(&node, Mode::Bidirectional, t0);
        let t = token(serde_json::json!({"sub": "alice", "exp": t0.unix + 60}));
        let cmd = format!(r#"{{"id":1,"connect":{{"token":"{t}"}}}}"#);
        s.handle_frame(cmd.as_bytes(), t0).await.unwrap();
        let _ = frames(&conn);
        s.handle_control(
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
        let next = s.tick(a_year).await.expect("still valid a year later");
        assert!(next > a_year.mono);
    }

    #[tokio::test]
    async fn unidirectional_session_speaks_bare_pushes() {
        let node = node();
        let t0 = Now::system();
        let (conn, mut s) = session(&node, Mode::Unidirectional, t0);
        s.handle_frame(br#"{"subs":{}}"#, t0).await.unwrap();
        let out = frames(&conn);
        assert!(out[0].starts_with("{\"connect\":{"), "{out:?}");
        assert!(out[0].contains("\"pong\":false") || !out[0].contains("\"pong\":true"));
        // Later messages are ignored, not parsed.
        s.handle_frame(b"not json", t0).await.unwrap();
        // A server-side subscribe arrives as a bare push.
        s.handle_control(
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
            s2.handle_frame(req.as_bytes(), t0)
                .await
                .map_err(|d| d.code),
            Err(3005)
        );
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
