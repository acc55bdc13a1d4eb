//! One subscriber connection per task: set up (WebSocket handshake, protocol connect,
//! subscribe), then read deliveries until told to stop.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::{sleep_until, timeout};

use crate::cli::{Protocol, Target, Transport};
use crate::error::BenchError;
use crate::herald::{self, Line};
use crate::herald_proto;
use crate::mqtt::{self, Packet};
use crate::nats::{self, NatsEvent};
use crate::nchan;
use crate::net::Endpoint;
use crate::payload::{self, now_ns};
use crate::stats::{Recorder, SeqTracker};
use crate::ws::{Kind, Ws, ws_connect, ws_connect_url, ws_connect_with};

/// Largest protocol message accepted from a server.
pub const MAX_MESSAGE: usize = 16 << 20;
/// A reconnecting client waits between a third of and the whole backoff after a failed
/// attempt; the backoff doubles from the first to the second.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// MQTT keep-alive announced by subscribers; they ping at half of it.
const MQTT_KEEP_ALIVE_S: u16 = 60;

/// What every connection task of a process shares.
pub struct ConnCtx {
    pub target: Target,
    pub protocol: Protocol,
    /// The server's nodes; a connection uses `endpoints[index % len]`.
    pub endpoints: Vec<Endpoint>,
    pub recorder: Arc<Mutex<Recorder>>,
    pub connect_timeout: Duration,
    /// Herald (JSON) subscribers make a lost connection again, through the arbiter, and
    /// recover what they missed.
    pub reconnect: bool,
    /// Herald's WebSocket, or one of its unidirectional HTTP transports.
    pub transport: Transport,
    /// Set when the run stops; every connection of the process watches it.
    pub stop: Stop,
    /// Connection tasks still running.
    pub live: Live,
}

/// A run's stop signal, set once and awaited by every connection: its waiting future is
/// half the size of a watch channel's, which counts at a million connections.
#[derive(Default)]
pub struct Stop {
    set: AtomicBool,
    notify: Notify,
}

impl Stop {
    pub fn stop(&self) {
        self.set.store(true, SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.set.load(SeqCst)
    }

    /// Returns once the run stops.
    pub async fn wait(&self) {
        notified_when(&self.notify, || self.is_set()).await
    }
}

/// Returns once `done` holds, re-checking it each time `notify` wakes all its waiters.
async fn notified_when(notify: &Notify, done: impl Fn() -> bool) {
    loop {
        // Created before the check, so a notification between the two is not missed.
        let notified = notify.notified();
        if done() {
            return;
        }
        notified.await;
    }
}

/// Counts running connection tasks, so the worker can wait for them to end without a
/// handle per task.
#[derive(Default)]
pub struct Live {
    count: AtomicU64,
    ended: Notify,
}

impl Live {
    /// Waits until no connection task is left.
    pub async fn all_ended(&self) {
        notified_when(&self.ended, || self.count.load(SeqCst) == 0).await
    }
}

/// Held by a connection task: counted from spawn until it ends, however it ends.
struct Running(Arc<ConnCtx>);

impl Running {
    fn new(ctx: Arc<ConnCtx>) -> Self {
        ctx.live.count.fetch_add(1, SeqCst);
        Running(ctx)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let live = &self.0.live;
        if live.count.fetch_sub(1, SeqCst) == 1 {
            live.ended.notify_waiters();
        }
    }
}

/// What distinguishes one connection.
pub struct ConnSpec {
    /// Global connection index (unique across processes).
    pub index: u64,
    pub channel_idx: u32,
    pub channel: Arc<str>,
    pub token: Option<String>,
    pub src: Option<IpAddr>,
}

/// An established, subscribed connection.
enum Session {
    /// With what its connect and subscribe replies said (taken once served).
    Herald(Ws, Option<Box<Resubscribed>>),
    HeraldProtobuf(Ws),
    /// Partial NATS / MQTT messages carried over from the previous frame; empty (and
    /// unallocated) between messages so idle connections cost no buffer.
    Nats(Ws, Vec<u8>),
    Mqtt(Ws, Vec<u8>),
    /// One frame per message, nothing carried over.
    Nchan(Ws),
    /// A unidirectional HTTP stream (SSE or chunked): held and counted, not parsed.
    Uni(tokio::net::TcpStream),
}

/// Runs one connection to completion, recording into the shared recorder; counted in
/// `ctx.live` from this call until it ends.
pub fn run_connection(
    ctx: Arc<ConnCtx>,
    spec: ConnSpec,
) -> impl std::future::Future<Output = ()> + Send {
    // Lent, not moved, to the connection's future, so the task holds them once.
    let mut held = (Running::new(ctx), spec);
    async move {
        let (running, spec) = &mut held;
        connection(&running.0, spec).await
    }
}

async fn connection(ctx: &ConnCtx, spec: &mut ConnSpec) {
    // Set-up, reading and reconnects are futures of their own on the heap: the task then
    // holds little more than the connection's bookkeeping (generator memory per
    // connection, docs/performance.md).
    let Some(mut session) = Box::pin(first_connect(ctx, spec)).await else {
        return;
    };
    let mut d = Delivery {
        recorder: &ctx.recorder,
        channel_idx: spec.channel_idx,
        tracker: SeqTracker::default(),
        personal: SeqTracker::default(),
        position: None,
        server_subs: Vec::new(),
    };
    if let Session::Herald(_, r) = &mut *session
        && let Some(r) = r.take()
    {
        d.resumed(*r);
    }
    let reconnects = ctx.reconnect && matches!(ctx.target, Target::Herald);
    if !reconnects {
        // Only a reconnect needs the token again.
        spec.token = None;
    }
    loop {
        let e = match serve(ctx, *session, &mut d).await {
            Ok(()) => return,
            Err(e) => e,
        };
        if !reconnects || ctx.stop.is_set() {
            ctx.recorder.lock().disconnected(e.kind());
            return;
        }
        ctx.recorder.lock().dropped(now_ns(), e.kind());
        match Box::pin(reconnect(ctx, spec, &mut d)).await {
            Some(s) => session = s,
            None => return,
        }
    }
}

/// Connects and subscribes within the connect timeout, recording the outcome; None when
/// it failed or the run stopped first. With reconnects on (Herald), a failed attempt is
/// made again with backoff, as an SDK does, until it works or the run stops; each retry
/// is counted among the errors.
async fn first_connect(ctx: &ConnCtx, spec: &ConnSpec) -> Option<Box<Session>> {
    let started = Instant::now();
    ctx.recorder.lock().attempt(now_ns());
    let retries = ctx.reconnect && matches!(ctx.target, Target::Herald);
    let mut backoff = MIN_BACKOFF;
    let mut attempt = 0u64;
    let session = loop {
        let setup = tokio::select! {
            r = timeout(ctx.connect_timeout, establish(ctx, spec)) => r,
            _ = ctx.stop.wait() => {
                ctx.recorder.lock().failed("stopped while connecting".into());
                return None;
            }
        };
        let failure = match setup {
            Ok(Ok(s)) => break s,
            Ok(Err(e)) => e.kind(),
            Err(_) => "timeout connecting".to_string(),
        };
        if !retries {
            ctx.recorder.lock().failed(failure);
            return None;
        }
        ctx.recorder
            .lock()
            .error(format!("connect retried: {failure}"));
        tokio::select! {
            _ = tokio::time::sleep(jittered(backoff, spec.index, attempt)) => {}
            _ = ctx.stop.wait() => {
                ctx.recorder.lock().failed(failure);
                return None;
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        attempt += 1;
    };
    let latency_us = started.elapsed().as_micros() as u64;
    ctx.recorder
        .lock()
        .established(spec.channel_idx as usize, now_ns(), latency_us);
    Some(Box::new(session))
}

/// Makes a lost Herald connection again: asks the arbiter (`GET /connection/nodes` on any
/// node that answers) where to go, connects, and subscribes recovering from the last
/// publication received. Retries with backoff until it works or the run stops (None).
async fn reconnect(ctx: &ConnCtx, spec: &ConnSpec, d: &mut Delivery<'_>) -> Option<Box<Session>> {
    let lost = Instant::now();
    let mut backoff = MIN_BACKOFF;
    for attempt in 0u64.. {
        let again = async {
            let endpoint = arbiter_pick(ctx, spec.index, attempt).await;
            let deflate = ctx.transport == Transport::WebsocketDeflate;
            let mut ws = ws_connect_with(&endpoint, spec.src, None, deflate).await?;
            let r = herald_resubscribe(&mut ws, spec, d.position.as_ref(), &d.server_subs).await?;
            Ok::<_, BenchError>((ws, r))
        };
        let outcome = tokio::select! {
            r = timeout(ctx.connect_timeout, again) => r,
            _ = ctx.stop.wait() => return None,
        };
        match outcome {
            Ok(Ok((ws, r))) => {
                let complete = d.resumed(r);
                ctx.recorder.lock().reconnected(
                    now_ns(),
                    lost.elapsed().as_micros() as u64,
                    complete,
                );
                return Some(Box::new(Session::Herald(ws, None)));
            }
            Ok(Err(e)) => ctx
                .recorder
                .lock()
                .error(format!("reconnect: {}", e.kind())),
            Err(_) => ctx.recorder.lock().error("reconnect: timeout".into()),
        }
        tokio::select! {
            _ = tokio::time::sleep(jittered(backoff, spec.index, attempt)) => {}
            _ = ctx.stop.wait() => return None,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    None
}

/// Backoff with jitter, as the SDKs do, so the clients of a dead or overloaded node do not
/// retry in step (no RNG needed: the connection index and attempt scatter them).
fn jittered(backoff: Duration, index: u64, attempt: u64) -> Duration {
    let spread = index.wrapping_add(attempt).wrapping_mul(2_654_435_761) % 1000;
    backoff.mul_f64((500 + spread) as f64 / 1500.0)
}

/// Where the arbiter says to connect: the `attempt`-th node (wrapping) of the list
/// `GET /connection/nodes` gives, asked of the configured nodes in turn, so a retry moves
/// past a dead node the list still names (nodes leave it only after `node_eviction`).
/// Without an answer, the next configured node.
async fn arbiter_pick(ctx: &ConnCtx, index: u64, attempt: u64) -> Endpoint {
    let n = ctx.endpoints.len();
    let start = index.wrapping_add(attempt) as usize;
    for i in 0..n {
        let e = &ctx.endpoints[start.wrapping_add(i) % n];
        if let Ok(Ok(listed)) = timeout(Duration::from_secs(2), crate::arbiter::nodes(e.addr)).await
            && !listed.is_empty()
            && let Ok(picked) =
                crate::net::loopback_endpoint(&listed[attempt as usize % listed.len()], &["ws"])
        {
            return picked;
        }
    }
    ctx.endpoints[start.wrapping_add(1) % n].clone()
}

/// What a (re)connect's replies said: the subscribe's, and the server-side subscriptions'
/// by channel.
#[derive(Default)]
struct Resubscribed {
    subscribe: herald::SubscribeResult,
    server: Vec<(String, herald::SubscribeResult)>,
    /// Publications pushed while the replies were awaited (data, offset), before and after
    /// the subscribe reply: server-side subscriptions are live from the connect reply on.
    before_subscribe: Vec<(Vec<u8>, u64)>,
    after_subscribe: Vec<(Vec<u8>, u64)>,
    /// Whether the client asked to recover anything.
    asked: bool,
}

/// A connect and subscribe that recover from `from` and `server_subs` (where the
/// connection's streams were).
async fn herald_resubscribe(
    ws: &mut Ws,
    spec: &ConnSpec,
    from: Option<&herald::Position>,
    server_subs: &[(String, herald::Position)],
) -> Result<Resubscribed, BenchError> {
    let frame = herald::reconnect_frame(spec.token.as_deref(), &spec.channel, from, server_subs);
    herald_setup(ws, frame, from.is_some() || !server_subs.is_empty()).await
}

/// Sends `frame` (connect and subscribe, ids 1 and 2) and reads until both are answered,
/// answering pings; `asked`: the frame asks to recover.
async fn herald_setup(ws: &mut Ws, frame: String, asked: bool) -> Result<Resubscribed, BenchError> {
    ws.send_text(&frame).await?;
    let mut st = HeraldSetup::default();
    let mut out = Resubscribed {
        asked,
        ..Default::default()
    };
    while !st.done() {
        let msg = ws.next_data().await?;
        if msg.kind != Kind::Text {
            return Err(BenchError::Protocol(
                "herald sent a binary frame to a JSON client".into(),
            ));
        }
        st.ping = false;
        for line in msg.text()?.split('\n').filter(|l| !l.trim().is_empty()) {
            let parsed = herald::parse_line(line)?;
            match &parsed {
                Line::Reply { id: 1, error: None } => {
                    out.server = herald::connect_subs(line).unwrap_or_default();
                }
                Line::Reply { id: 2, error: None } => {
                    out.subscribe = herald::subscribe_result(line).unwrap_or_default();
                }
                Line::Publication { data, offset, .. } => {
                    let early = if st.subscribed {
                        &mut out.after_subscribe
                    } else {
                        &mut out.before_subscribe
                    };
                    early.push((data.to_vec(), *offset));
                }
                _ => {}
            }
            st.line(parsed)?;
        }
        if st.ping {
            ws.send_text("{}").await?;
        }
    }
    Ok(out)
}

async fn establish(ctx: &ConnCtx, spec: &ConnSpec) -> Result<Session, BenchError> {
    let endpoint = &ctx.endpoints[(spec.index % ctx.endpoints.len() as u64) as usize];
    let deflate = ctx.transport == Transport::WebsocketDeflate;
    match ctx.target {
        Target::Herald if ctx.transport.is_uni() => {
            let sse = ctx.transport == Transport::UniSse;
            let token = spec.token.as_deref();
            let tcp =
                crate::uni::connect(endpoint, spec.src, token, Some(&spec.channel), sse).await?;
            Ok(Session::Uni(tcp))
        }
        Target::Herald if ctx.protocol == Protocol::Protobuf => {
            let sub = Some(herald_proto::SUBPROTOCOL);
            let mut ws = ws_connect_with(endpoint, spec.src, sub, deflate).await?;
            herald_proto_setup(&mut ws, spec.token.as_deref(), &spec.channel).await?;
            Ok(Session::HeraldProtobuf(ws))
        }
        Target::Herald => {
            let mut ws = ws_connect_with(endpoint, spec.src, None, deflate).await?;
            let r = if ctx.reconnect {
                herald_resubscribe(&mut ws, spec, None, &[]).await?
            } else {
                let frame = herald::connect_frame(spec.token.as_deref(), &spec.channel);
                herald_setup(&mut ws, frame, false).await?
            };
            Ok(Session::Herald(ws, Some(Box::new(r))))
        }
        Target::Nats => {
            let mut ws = ws_connect(endpoint, spec.src, None).await?;
            let mut carry = Vec::new();
            nats_wait(&mut ws, &mut carry, |e| matches!(e, NatsEvent::Info(_))).await?;
            let mut out = Vec::with_capacity(256);
            nats::encode_connect(&mut out, &format!("hb-{}", spec.index));
            nats::encode_sub(&mut out, &spec.channel, 1);
            out.extend_from_slice(nats::PING);
            ws.send_binary(&out).await?;
            // The PONG proves the server processed CONNECT and SUB.
            nats_wait(&mut ws, &mut carry, |e| matches!(e, NatsEvent::Pong)).await?;
            Ok(Session::Nats(ws, carry))
        }
        Target::Mqtt => {
            let mut ws = ws_connect(endpoint, spec.src, Some("mqtt")).await?;
            let mut out = Vec::with_capacity(128);
            let client_id = format!("hb-{}-{}", std::process::id(), spec.index);
            mqtt::encode_connect(&mut out, &client_id, MQTT_KEEP_ALIVE_S);
            mqtt::encode_subscribe(&mut out, 1, &spec.channel, 0);
            ws.send_binary(&out).await?;
            let mut carry = Vec::new();
            mqtt_setup(&mut ws, &mut carry).await?;
            Ok(Session::Mqtt(ws, carry))
        }
        Target::Nchan => {
            // The URL lives only for the handshake; nchan subscribes the connection
            // before it answers 101.
            let url = nchan::subscriber_url(endpoint, &spec.channel)?;
            let ws = ws_connect_url(endpoint.addr, &url, spec.src, None).await?;
            Ok(Session::Nchan(ws))
        }
    }
}

/// Parses as many complete messages as `data` (after any carried-over prefix) holds,
/// keeping the incomplete tail in `carry`. `step` handles one message at the front of
/// its input and returns its length, or `None` when the message is incomplete.
pub(crate) fn feed<E>(
    carry: &mut Vec<u8>,
    data: &[u8],
    mut step: impl FnMut(&[u8]) -> Result<Option<usize>, E>,
) -> Result<(), E> {
    let mut run = |buf: &[u8]| -> Result<usize, E> {
        let mut off = 0;
        while off < buf.len() {
            match step(&buf[off..])? {
                Some(n) if n > 0 => off += n,
                _ => break,
            }
        }
        Ok(off)
    };
    if carry.is_empty() {
        let used = run(data)?;
        carry.extend_from_slice(&data[used..]);
    } else {
        carry.extend_from_slice(data);
        let used = run(carry)?;
        carry.drain(..used);
        if carry.is_empty() {
            // Give the memory back: most connections sit idle between messages.
            *carry = Vec::new();
        }
    }
    Ok(())
}

/// Progress of Herald's connect + subscribe exchange, whatever the wire format.
#[derive(Default)]
struct HeraldSetup {
    connected: bool,
    subscribed: bool,
    ping: bool,
}

impl HeraldSetup {
    fn done(&self) -> bool {
        self.connected && self.subscribed
    }

    fn line(&mut self, line: Line<'_>) -> Result<(), BenchError> {
        match line {
            Line::Ping => self.ping = true,
            Line::Reply { id, error: Some(e) } => {
                let what = if id == 1 { "connect" } else { "subscribe" };
                return Err(BenchError::Protocol(format!(
                    "herald {what} error {}: {}",
                    e.code, e.message
                )));
            }
            Line::Reply { id: 1, .. } => self.connected = true,
            Line::Reply { id: 2, .. } => self.subscribed = true,
            _ => {}
        }
        Ok(())
    }
}

async fn herald_proto_setup(
    ws: &mut Ws,
    token: Option<&str>,
    channel: &str,
) -> Result<(), BenchError> {
    ws.send_binary(&herald_proto::connect_frame(token, channel))
        .await?;
    let mut st = HeraldSetup::default();
    while !st.done() {
        let msg = ws.next_data().await?;
        if msg.kind != Kind::Binary {
            return Err(BenchError::Protocol(
                "herald sent a text frame to a Protobuf client".into(),
            ));
        }
        st.ping = false;
        for line in herald_proto::lines(&msg.data) {
            st.line(line?)?;
        }
        if st.ping {
            ws.send_binary(herald_proto::PONG).await?;
        }
    }
    Ok(())
}

/// Reads until an event matching `done` arrives, answering PINGs; `-ERR` fails.
pub(crate) async fn nats_wait(
    ws: &mut Ws,
    carry: &mut Vec<u8>,
    done: impl Fn(&NatsEvent<'_>) -> bool,
) -> Result<(), BenchError> {
    loop {
        let msg = ws.next_data().await?;
        let (mut found, mut pings) = (false, 0usize);
        let mut err = None;
        feed(carry, &msg.data, |buf| {
            let Some((ev, n)) = nats::parse(buf, MAX_MESSAGE)? else {
                return Ok::<_, BenchError>(None);
            };
            match &ev {
                NatsEvent::Ping => pings += 1,
                NatsEvent::Err(e) => err = Some(String::from_utf8_lossy(e).into_owned()),
                ev if done(ev) => found = true,
                _ => {}
            }
            Ok(Some(n))
        })?;
        if let Some(e) = err {
            return Err(BenchError::Protocol(format!("nats -ERR {e}")));
        }
        for _ in 0..pings {
            ws.send_binary(nats::PONG).await?;
        }
        if found {
            return Ok(());
        }
    }
}

async fn mqtt_setup(ws: &mut Ws, carry: &mut Vec<u8>) -> Result<(), BenchError> {
    let (mut connacked, mut subacked) = (false, false);
    while !(connacked && subacked) {
        let msg = ws.next_data().await?;
        let mut failure = None;
        feed(carry, &msg.data, |buf| {
            let Some((p, n)) = mqtt::decode(buf, MAX_MESSAGE)? else {
                return Ok::<_, BenchError>(None);
            };
            match p {
                Packet::Connack { code: 0, .. } => connacked = true,
                Packet::Connack { code, .. } => failure = Some(format!("mqtt CONNACK code {code}")),
                Packet::Suback { codes, .. } if codes.first().is_some_and(|c| *c >= 0x80) => {
                    failure = Some("mqtt SUBACK failure".into())
                }
                Packet::Suback { .. } => subacked = true,
                _ => {}
            }
            Ok(Some(n))
        })?;
        if let Some(f) = failure {
            return Err(BenchError::Protocol(f));
        }
    }
    Ok(())
}

/// Per-connection delivery bookkeeping.
pub(crate) struct Delivery<'a> {
    recorder: &'a Mutex<Recorder>,
    channel_idx: u32,
    tracker: SeqTracker,
    /// Pushes on the connection's personal channel: their own sequence.
    personal: SeqTracker,
    /// With reconnects: where the subscriber is in its shared channel's stream, and in
    /// those of its server-side subscriptions (the personal channel).
    position: Option<herald::Position>,
    server_subs: Vec<(String, herald::Position)>,
}

impl Delivery<'_> {
    /// Takes in what a (re)connect recovered, and where its streams are now (each reply's
    /// position is its stream's top, through which the recovered publications go).
    /// Whether every recovery asked for was complete.
    fn resumed(&mut self, r: Resubscribed) -> bool {
        let mut complete = true;
        let mut server_subs = Vec::new();
        for (channel, s) in r.server {
            for (data, offset) in &s.publications {
                self.payload(data, *offset);
            }
            complete &= s.recovered;
            if let Some(p) = s.position {
                server_subs.push((channel, p));
            }
        }
        self.server_subs = server_subs;
        for (data, offset) in &r.before_subscribe {
            self.payload(data, *offset);
        }
        if r.subscribe.position.is_some() {
            self.position = r.subscribe.position;
        }
        for (data, offset) in &r.subscribe.publications {
            self.payload(data, *offset);
        }
        complete &= r.subscribe.recovered;
        for (data, offset) in &r.after_subscribe {
            self.payload(data, *offset);
        }
        !r.asked || complete
    }

    /// Counts a received message's bytes.
    pub(crate) fn frame(&self, len: usize) {
        self.recorder.lock().bytes_received += len as u64;
    }

    /// Counts a publication's payload; `offset` is its place in the stream (0: unknown).
    fn payload(&mut self, data: &[u8], offset: u64) {
        let now = now_ns();
        let mut rec = self.recorder.lock();
        match payload::decode(data) {
            Some(st) if st.c == self.channel_idx => {
                if let Some(p) = self.position.as_mut()
                    && offset > 0
                {
                    p.offset = offset;
                }
                let outcome = self.tracker.observe(st.s);
                let latency_us = now.saturating_sub(st.t) / 1000;
                rec.delivery(self.channel_idx as usize, st.s, outcome, now, latency_us);
            }
            Some(st) if st.c >= payload::PERSONAL_C => {
                // One server-side subscription (the personal channel) is what carries these.
                if let [(_, p)] = self.server_subs.as_mut_slice()
                    && offset > 0
                {
                    p.offset = offset;
                }
                let outcome = self.personal.observe(st.s);
                rec.personal(outcome, now.saturating_sub(st.t) / 1000);
            }
            Some(_) => {
                rec.invalid += 1;
                rec.error("payload for another channel".into());
            }
            None => {
                rec.invalid += 1;
                rec.error("undecodable payload".into());
            }
        }
    }
}

/// Counts what one read of a Herald JSON connection brought; sets `ping` when the server
/// pinged.
fn herald_json(ctx: &ConnCtx, d: &mut Delivery<'_>, kind: Kind, data: &[u8], ping: &mut bool) {
    d.frame(data.len());
    let text = match (kind, std::str::from_utf8(data)) {
        (Kind::Text, Ok(t)) => t,
        _ => {
            let mut r = ctx.recorder.lock();
            r.invalid += 1;
            r.error("herald sent a binary or non-UTF-8 message".into());
            return;
        }
    };
    for line in text.split('\n').filter(|l| !l.trim().is_empty()) {
        match herald::fast_publication(line) {
            Some((data, offset)) => d.payload(data, offset),
            None => herald_message(ctx, d, herald::parse_line(line).ok(), ping),
        }
    }
}

/// Counts one Herald message of either wire format (None: unparsable).
fn herald_message(ctx: &ConnCtx, d: &mut Delivery<'_>, line: Option<Line<'_>>, ping: &mut bool) {
    match line {
        Some(Line::Publication { data, offset, .. }) => d.payload(data, offset),
        Some(Line::Ping) => *ping = true,
        Some(Line::OtherPush(kind)) => ctx.recorder.lock().error(format!("herald push {kind}")),
        Some(Line::Reply { .. }) => {}
        None => {
            let mut r = ctx.recorder.lock();
            r.invalid += 1;
            r.error("unparsable herald message".into());
        }
    }
}

/// As [`herald_json`], for a Protobuf connection.
fn herald_protobuf(ctx: &ConnCtx, d: &mut Delivery<'_>, kind: Kind, data: &[u8], ping: &mut bool) {
    d.frame(data.len());
    if kind != Kind::Binary {
        ctx.recorder
            .lock()
            .error("herald text frame on a Protobuf connection".into());
        return;
    }
    // After an unparsable message the rest of the frame cannot be located: it counts as
    // one invalid message.
    for line in herald_proto::lines(data) {
        herald_message(ctx, d, line.ok(), ping);
    }
}

/// Reads deliveries until the run stops (Ok) or the connection fails. Each read is
/// handled in place, from the reading thread's buffer, and each target's loop is a future
/// of its own on the heap: an idle connection's task holds only its target's waiting state
/// (one future covering every target, inline in the task, was 2.3 KiB per connection).
fn serve<'a>(
    ctx: &'a ConnCtx,
    session: Session,
    d: &'a mut Delivery<'_>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BenchError>> + Send + 'a>> {
    // The blocks own the socket and lend it: an `async fn` taking it by value would hold
    // it twice (as passed, and where its body keeps it).
    match session {
        Session::Herald(mut ws, _) => {
            Box::pin(async move { serve_herald(ctx, &mut ws, d, true).await })
        }
        Session::HeraldProtobuf(mut ws) => {
            Box::pin(async move { serve_herald(ctx, &mut ws, d, false).await })
        }
        Session::Nats(mut ws, mut carry) => {
            Box::pin(async move { serve_nats(ctx, &mut ws, &mut carry, d).await })
        }
        Session::Nchan(mut ws) => Box::pin(async move { serve_nchan(ctx, &mut ws, d).await }),
        Session::Uni(mut tcp) => Box::pin(async move { crate::uni::serve(ctx, &mut tcp, d).await }),
        Session::Mqtt(mut ws, mut carry) => {
            Box::pin(async move { serve_mqtt(ctx, &mut ws, &mut carry, d).await })
        }
    }
}

async fn serve_herald(
    ctx: &ConnCtx,
    ws: &mut Ws,
    d: &mut Delivery<'_>,
    json: bool,
) -> Result<(), BenchError> {
    loop {
        let mut ping = false;
        let read = tokio::select! {
            biased;
            _ = ctx.stop.wait() => None,
            r = ws.read(|kind, data| if json {
                herald_json(ctx, d, kind, data, &mut ping)
            } else {
                herald_protobuf(ctx, d, kind, data, &mut ping)
            }) => Some(r),
        };
        let Some(read) = read else {
            Box::pin(ws.close(None)).await;
            return Ok(());
        };
        read?;
        if ping {
            let pong: &[u8] = if json { b"{}" } else { herald_proto::PONG };
            Box::pin(ws.send(json, pong)).await?;
        }
    }
}

async fn serve_nats(
    ctx: &ConnCtx,
    ws: &mut Ws,
    carry: &mut Vec<u8>,
    d: &mut Delivery<'_>,
) -> Result<(), BenchError> {
    loop {
        let (mut pings, mut err, mut failed) = (0usize, None, None);
        let read = tokio::select! {
            biased;
            _ = ctx.stop.wait() => None,
            r = ws.read(|_, data| {
                d.frame(data.len());
                let fed = feed(carry, data, |buf| {
                    let Some((ev, n)) = nats::parse(buf, MAX_MESSAGE)? else {
                        return Ok::<_, BenchError>(None);
                    };
                    match ev {
                        NatsEvent::Msg { payload, .. } => d.payload(payload, 0),
                        NatsEvent::Ping => pings += 1,
                        NatsEvent::Err(e) => err = Some(String::from_utf8_lossy(e).into_owned()),
                        _ => {}
                    }
                    Ok(Some(n))
                });
                if let Err(e) = fed {
                    failed = Some(e);
                }
            }) => Some(r),
        };
        let Some(read) = read else {
            Box::pin(ws.close(None)).await;
            return Ok(());
        };
        read?;
        if let Some(e) = failed {
            return Err(e);
        }
        if let Some(e) = err {
            ctx.recorder.lock().error(format!("nats -ERR {e}"));
        }
        for _ in 0..pings {
            Box::pin(ws.send_binary(nats::PONG)).await?;
        }
    }
}

async fn serve_nchan(ctx: &ConnCtx, ws: &mut Ws, d: &mut Delivery<'_>) -> Result<(), BenchError> {
    loop {
        let read = tokio::select! {
            biased;
            _ = ctx.stop.wait() => None,
            r = ws.read(|_, data| {
                d.frame(data.len());
                d.payload(data, 0);
            }) => Some(r),
        };
        let Some(read) = read else {
            Box::pin(ws.close(None)).await;
            return Ok(());
        };
        read?;
    }
}

async fn serve_mqtt(
    ctx: &ConnCtx,
    ws: &mut Ws,
    carry: &mut Vec<u8>,
    d: &mut Delivery<'_>,
) -> Result<(), BenchError> {
    let period = Duration::from_secs(u64::from(MQTT_KEEP_ALIVE_S) / 2);
    let mut next_ping = tokio::time::Instant::now() + period;
    loop {
        let mut failed = None;
        let read = tokio::select! {
            biased;
            _ = ctx.stop.wait() => None,
            _ = sleep_until(next_ping) => Some(None),
            r = ws.read(|_, data| {
                d.frame(data.len());
                let fed = feed(carry, data, |buf| {
                    let Some((p, n)) = mqtt::decode(buf, MAX_MESSAGE)? else {
                        return Ok::<_, BenchError>(None);
                    };
                    if let Packet::Publish { payload, .. } = p {
                        d.payload(payload, 0);
                    }
                    Ok(Some(n))
                });
                if let Err(e) = fed {
                    failed = Some(e);
                }
            }) => Some(Some(r)),
        };
        match read {
            None => {
                let mut bye = Vec::new();
                mqtt::encode_disconnect(&mut bye);
                Box::pin(ws.close(Some(bye))).await;
                return Ok(());
            }
            Some(None) => {
                let mut ping = Vec::new();
                mqtt::encode_pingreq(&mut ping);
                Box::pin(ws.send_binary(&ping)).await?;
                next_ping += period;
            }
            Some(Some(r)) => {
                r?;
                if let Some(e) = failed {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Arc<ConnCtx> {
        Arc::new(ConnCtx {
            target: Target::Herald,
            protocol: Protocol::Json,
            endpoints: vec![crate::net::loopback_endpoint("ws://127.0.0.1:1/", &["ws"]).unwrap()],
            recorder: Arc::new(Mutex::new(Recorder::new(0, 1, 10))),
            connect_timeout: Duration::from_secs(5),
            reconnect: false,
            transport: Transport::Websocket,
            stop: Stop::default(),
            live: Live::default(),
        })
    }

    #[tokio::test]
    async fn stop_reaches_waiters_before_and_after_it_and_live_counts_tasks_out() {
        let ctx = ctx();
        let waiting = {
            let ctx = ctx.clone();
            tokio::spawn(async move { ctx.stop.wait().await })
        };
        let held: Vec<Running> = (0..3).map(|_| Running::new(ctx.clone())).collect();
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        ctx.stop.stop();
        timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a waiter from before the stop wakes")
            .unwrap();
        timeout(Duration::from_secs(5), ctx.stop.wait())
            .await
            .expect("a wait after the stop returns at once");

        let ended = {
            let ctx = ctx.clone();
            tokio::spawn(async move { ctx.live.all_ended().await })
        };
        tokio::task::yield_now().await;
        let mut held = held;
        held.pop();
        held.pop();
        tokio::task::yield_now().await;
        assert!(!ended.is_finished(), "one task is still running");
        drop(held);
        timeout(Duration::from_secs(5), ended)
            .await
            .expect("the last task's end is seen")
            .unwrap();
    }

    #[test]
    fn feed_carries_partial_messages_across_frames() {
        let mut stream = Vec::new();
        for i in 0..50u8 {
            crate::mqtt::encode_publish(&mut stream, "t", &vec![i; i as usize * 7]);
        }
        for chunk in [1usize, 3, 64, 1000, stream.len()] {
            let mut carry = Vec::new();
            let mut seen = Vec::new();
            for part in stream.chunks(chunk) {
                feed(&mut carry, part, |buf| {
                    Ok::<_, crate::mqtt::MqttError>(crate::mqtt::decode(buf, 1 << 20)?.map(
                        |(p, n)| {
                            if let Packet::Publish { payload, .. } = p {
                                seen.push(payload.len());
                            }
                            n
                        },
                    ))
                })
                .unwrap();
            }
            assert!(carry.is_empty());
            assert_eq!(carry.capacity(), 0, "idle connections keep no buffer");
            assert_eq!(
                seen,
                (0..50).map(|i| i * 7).collect::<Vec<_>>(),
                "chunk {chunk}"
            );
        }
    }
}
