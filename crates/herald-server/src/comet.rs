//! HTTP streaming and Server-Sent Events: the transports for clients that WebSocket cannot
//! reach (proxies that refuse upgrades, corporate middleboxes) and for clients without an SDK.
//!
//! Bidirectional emulation (`/connection/http_stream`, `/connection/sse`) carries the full
//! client protocol down a streaming response; the client's later commands arrive on
//! `POST /emulation` (see `emulation.rs`). Unidirectional (`/connection/uni_http_stream`,
//! `/connection/uni_sse`) takes one connect request and streams bare pushes.
//!
//! A stream is served exactly like a WebSocket (`ws.rs`): one task owns the session, drains
//! the connection's outbox into the response body, and runs the session's timers. The body is
//! fed through a one-slot channel, so a client that stops reading stops the task's writes and
//! its outbox fills up to `client.max_queue_bytes`, where it is closed as slow (3008).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use herald_core::conn::{ConnHandle, Control};
use herald_core::metrics::TransportMetrics;
use herald_core::session::Session;
use herald_protocol::Disconnect;
use herald_protocol::client::{Command, ConnectRequest, DisconnectPush, Push, Reply};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::emulation;
use crate::server::AppState;

/// How long the goodbye (pending messages and the disconnect push) may take on a client that
/// does not read; the same bound as the WebSocket close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How the messages are cut on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// One JSON message per line (`\n`-terminated).
    Lines,
    /// One `data:` event per message.
    Sse,
}

/// Which protocol the stream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The full client protocol; commands after connect come through `/emulation`.
    Emulation,
    /// Bare pushes, the first being `{"connect":{…}}`; the client cannot send anything.
    Uni,
}

/// What opens the session.
enum Start {
    /// Protocol commands (`\n`-separated), the first of which must be connect.
    Commands(Bytes),
    /// A unidirectional connect request.
    Connect(ConnectRequest),
}

/// The `cf_connect` URL parameter (GET requests cannot carry a body).
#[derive(Deserialize)]
pub struct ConnectQuery {
    cf_connect: Option<String>,
}

impl ConnectQuery {
    /// The connect request or command passed in the URL, if any.
    pub(crate) fn cf_connect(&self) -> Option<&str> {
        self.cf_connect.as_deref().filter(|c| !c.trim().is_empty())
    }
}

/// A request refused before any stream starts: an HTTP status and a one-line reason.
#[derive(Debug)]
pub(crate) struct Refusal(StatusCode, &'static str);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

fn plain(status: StatusCode, msg: &'static str) -> Response {
    Refusal(status, msg).into_response()
}

/// Reads a request body up to `limit` bytes; 413 above it.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Refusal> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        Refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body larger than client.max_message_size\n",
        )
    })
}

/// Only JSON is spoken on these transports.
fn check_json(headers: &HeaderMap) -> Result<(), Refusal> {
    let binary = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"));
    if binary {
        return Err(Refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only the JSON protocol is supported\n",
        ));
    }
    Ok(())
}

/// A unidirectional connect request: `{token, data, subs, name, version}`. An empty body or
/// `null` is an empty request (anonymous, when allowed).
pub(crate) fn parse_uni_connect(data: &[u8]) -> Result<ConnectRequest, Refusal> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return Ok(ConnectRequest::default());
    }
    serde_json::from_slice::<Option<ConnectRequest>>(data)
        .map(Option::unwrap_or_default)
        .map_err(|_| Refusal(StatusCode::BAD_REQUEST, "malformed connect request\n"))
}

/// The connect command a unidirectional transport feeds its session.
pub(crate) fn uni_connect_command(req: ConnectRequest) -> Command {
    Command {
        id: UNI_CONNECT_ID,
        connect: Some(req),
        ..Default::default()
    }
}

/// `POST /connection/http_stream`: the body holds the connect command.
pub async fn http_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(r) = check_json(&headers) {
        return r.into_response();
    }
    let data = match read_body(body, state.node.client.max_message_size).await {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    if data.iter().all(u8::is_ascii_whitespace) {
        return plain(StatusCode::BAD_REQUEST, "no connect command\n");
    }
    open(
        state,
        Mode::Emulation,
        Framing::Lines,
        Start::Commands(data),
    )
}

/// `GET /connection/sse?cf_connect=<connect command>`.
pub async fn sse(State(state): State<AppState>, Query(q): Query<ConnectQuery>) -> Response {
    match q.cf_connect {
        Some(c) if !c.trim().is_empty() => {
            if c.len() > state.node.client.max_message_size {
                return plain(StatusCode::PAYLOAD_TOO_LARGE, "connect command too large\n");
            }
            open(
                state,
                Mode::Emulation,
                Framing::Sse,
                Start::Commands(Bytes::from(c)),
            )
        }
        _ => plain(StatusCode::BAD_REQUEST, "no cf_connect parameter\n"),
    }
}

/// `GET /connection/uni_sse?cf_connect=<connect request>` (no parameter: an empty request).
pub async fn uni_sse_get(State(state): State<AppState>, Query(q): Query<ConnectQuery>) -> Response {
    let text = q.cf_connect.unwrap_or_default();
    match parse_uni_connect(text.as_bytes()) {
        Ok(req) => open(state, Mode::Uni, Framing::Sse, Start::Connect(req)),
        Err(r) => r.into_response(),
    }
}

/// `POST /connection/uni_sse` with the connect request as the body.
pub async fn uni_sse_post(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    uni_post(state, headers, body, Framing::Sse).await
}

/// `POST /connection/uni_http_stream` with the connect request as the body.
pub async fn uni_http_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    uni_post(state, headers, body, Framing::Lines).await
}

async fn uni_post(state: AppState, headers: HeaderMap, body: Body, framing: Framing) -> Response {
    if let Err(r) = check_json(&headers) {
        return r.into_response();
    }
    let data = match read_body(body, state.node.client.max_message_size).await {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    match parse_uni_connect(&data) {
        Ok(req) => open(state, Mode::Uni, framing, Start::Connect(req)),
        Err(r) => r.into_response(),
    }
}

/// Starts the connection task and answers with the streaming body it feeds.
fn open(state: AppState, mode: Mode, framing: Framing, start: Start) -> Response {
    if state.node.is_draining() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    // Counted from now, so a shutdown that starts before the task runs still waits for it.
    let guard = state.tracker.enter();
    let (tx, mut rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let _guard = guard;
        serve(state, mode, framing, start, tx).await;
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|c| c.map(Ok::<Bytes, std::convert::Infallible>))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(match framing {
            Framing::Sse => "text/event-stream; charset=utf-8",
            Framing::Lines => "application/x-ndjson",
        }),
    );
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache, no-store, must-revalidate, max-age=0"),
    );
    h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    // Buffering proxies (nginx) would hold messages back until their buffer fills.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The id of the connect command a unidirectional transport makes up for its client.
const UNI_CONNECT_ID: u32 = 1;

/// Turns the session's messages into what a unidirectional client reads: the connect reply
/// becomes `{"connect":{…}}`, a push loses its `{"push":…}` wrapper, a ping `{}` stays as is.
/// A failed connect ends the connection with the matching disconnect.
pub(crate) fn to_uni(frame: Bytes) -> Result<Option<Bytes>, Disconnect> {
    const PUSH: &[u8] = b"{\"push\":";
    const CONNECT: &[u8] = b"{\"id\":1,\"connect\":";
    const ERROR: &[u8] = b"{\"id\":1,\"error\":";
    if frame.starts_with(PUSH) && frame.ends_with(b"}") {
        // The push object as encoded once for every subscriber, without a copy.
        return Ok(Some(frame.slice(PUSH.len()..frame.len() - 1)));
    }
    if &frame[..] == b"{}" {
        return Ok(Some(frame));
    }
    if frame.starts_with(CONNECT) {
        let mut out = BytesMut::with_capacity(frame.len());
        out.extend_from_slice(b"{\"connect\":");
        out.extend_from_slice(&frame[CONNECT.len()..]);
        return Ok(Some(out.freeze()));
    }
    if frame.starts_with(ERROR) {
        #[derive(Deserialize)]
        struct ErrorReply {
            error: herald_protocol::ProtocolError,
        }
        let code = serde_json::from_slice::<ErrorReply>(&frame)
            .map(|r| r.error.code)
            .unwrap_or(0);
        return Err(uni_connect_disconnect(code));
    }
    // A reply to a command the client cannot have sent: nothing to deliver.
    Ok(None)
}

/// A unidirectional client cannot read an error reply, so a refused connect is a disconnect:
/// an expired token asks it to come back (with a fresh one), a bad one not to.
fn uni_connect_disconnect(code: u32) -> Disconnect {
    use herald_protocol::ErrorCode as E;
    let known = match code {
        c if c == E::TOKEN_EXPIRED.code || c == E::EXPIRED.code => Disconnect::EXPIRED,
        c if c == E::TOO_MANY_REQUESTS.code => Disconnect::TOO_MANY_REQUESTS,
        c if c == E::PERMISSION_DENIED.code => Disconnect::PERMISSION_DENIED,
        c if c == E::UNAUTHORIZED.code => Disconnect::INVALID_TOKEN,
        c if c == E::BAD_REQUEST.code => Disconnect::BAD_REQUEST,
        _ => Disconnect::SERVER_ERROR,
    };
    known.into()
}

/// The disconnect push: `{"push":{"disconnect":{…}}}`, or the bare push for `Mode::Uni`.
pub(crate) fn disconnect_message(d: &Disconnect, mode: Mode) -> Bytes {
    let push = Push {
        disconnect: Some(DisconnectPush {
            code: d.code,
            reason: d.reason.clone(),
            reconnect: d.reconnect(),
        }),
        ..Default::default()
    };
    match mode {
        Mode::Emulation => Reply::push(push).encode(),
        Mode::Uni => serde_json::to_vec(&push)
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from_static(b"{}")),
    }
}

/// Frames messages for the wire, all of them in one chunk (one write).
fn frame_chunk(messages: impl IntoIterator<Item = Bytes>, framing: Framing) -> Option<Bytes> {
    let mut out = BytesMut::new();
    for m in messages {
        match framing {
            Framing::Lines => {
                out.extend_from_slice(&m);
                out.extend_from_slice(b"\n");
            }
            Framing::Sse => {
                // A line break in a message would end the `data:` field early; each line gets
                // its own `data:` field and the client joins them back with `\n`.
                for line in m.split(|b| *b == b'\n' || *b == b'\r') {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(line);
                    out.extend_from_slice(b"\n");
                }
                out.extend_from_slice(b"\n");
            }
        }
    }
    (!out.is_empty()).then(|| out.freeze())
}

/// One connection's task: its state and the sending end of the response body.
struct Stream {
    conn: Arc<ConnHandle>,
    session: Session,
    tx: mpsc::Sender<Bytes>,
    mode: Mode,
    framing: Framing,
    /// The `/emulation` route to this session (emulation mode only).
    route: Option<emulation::Registration>,
    /// The connect reply still has to get its `session` replaced (emulation mode only).
    connect_pending: bool,
    /// Messages drained together with the decision to close: they precede the goodbye.
    leftover: VecDeque<Bytes>,
    node: Arc<herald_core::Node>,
    metrics: Arc<TransportMetrics>,
}

/// The transport's name in metrics and logs.
fn transport_name(mode: Mode, framing: Framing) -> &'static str {
    match (mode, framing) {
        (Mode::Emulation, Framing::Lines) => "http_stream",
        (Mode::Emulation, Framing::Sse) => "sse",
        (Mode::Uni, Framing::Lines) => "uni_http_stream",
        (Mode::Uni, Framing::Sse) => "uni_sse",
    }
}

async fn serve(
    state: AppState,
    mode: Mode,
    framing: Framing,
    start: Start,
    tx: mpsc::Sender<Bytes>,
) {
    let node = state.node.clone();
    let conn = Arc::new(ConnHandle::new(
        Arc::from(herald_core::node::new_id()),
        node.client.max_queue_bytes,
    ));
    let mut session = Session::new(node.clone(), conn.clone());
    let metrics = node.metrics.transport(transport_name(mode, framing));
    let _counted = metrics.open();
    let route = match mode {
        Mode::Emulation => Some(emulation::register(&node.id, &conn)),
        Mode::Uni => {
            session.set_unidirectional();
            None
        }
    };
    let mut s = Stream {
        conn,
        session,
        tx,
        mode,
        framing,
        connect_pending: route.is_some(),
        route,
        leftover: VecDeque::new(),
        node,
        metrics,
    };
    let disconnect = s.run(start).await;
    s.goodbye(disconnect).await;
}

impl Stream {
    /// Runs the connection until it ends; `Some` when the client must be told why.
    async fn run(&mut self, start: Start) -> Option<Disconnect> {
        let opened = match start {
            Start::Commands(data) => self.session.handle_frame(&data).await,
            Start::Connect(req) => self.session.handle_command(uni_connect_command(req)).await,
        };
        if let Err(d) = opened {
            return Some(d);
        }
        // Before a successful connect this is the connect timeout (a refused connect ends as
        // stale unless the client goes away first).
        let mut deadline = self.session.next_wakeup();
        loop {
            tokio::select! {
                biased;
                _ = self.conn.wait() => {
                    let drained = self.conn.drain();
                    for c in drained.controls {
                        if let (Control::Commands(data), Some(route)) = (&c, &self.route) {
                            route.handled(data.len());
                        }
                        if let Err(d) = self.session.handle_control(c).await {
                            return Some(d);
                        }
                        deadline = self.session.next_wakeup();
                    }
                    if let Some(d) = drained.closing {
                        // A slow consumer's queue was already dropped; others get what is queued.
                        if d.code != Disconnect::SLOW.code {
                            self.leftover = drained.frames;
                        }
                        return Some(d);
                    }
                    let chunk = match self.encode(drained.frames) {
                        Ok(Some(chunk)) => chunk,
                        Ok(None) => continue,
                        Err(d) => return Some(d),
                    };
                    // A send blocked on a client that stopped reading gives up as soon as the
                    // connection is declared slow (or closed for another reason).
                    let len = chunk.len();
                    let send = self.tx.send(chunk);
                    tokio::pin!(send);
                    let sent = tokio::select! {
                        r = &mut send => r.is_ok(),
                        _ = self.conn.closing() => {
                            !self.conn.is_slow()
                                && matches!(tokio::time::timeout(CLOSE_TIMEOUT, send).await, Ok(Ok(())))
                        }
                    };
                    if !sent {
                        // Closing (slow, say): still try to tell the client why.
                        return self.conn.close_reason();
                    }
                    self.metrics.bytes_sent.increment(len as u64);
                    if let Some(t) = drained.oldest_publication {
                        self.node.metrics.written(t);
                    }
                }
                // The client went away: the server dropped the response body.
                _ = self.tx.closed() => return None,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    match self.session.tick(Instant::now()).await {
                        Ok(next) => deadline = next,
                        Err(d) => return Some(d),
                    }
                }
            }
        }
    }

    /// Encodes drained messages for this stream's mode and framing.
    fn encode(&mut self, frames: VecDeque<Bytes>) -> Result<Option<Bytes>, Disconnect> {
        let mut out = Vec::with_capacity(frames.len());
        for f in frames {
            match self.mode {
                Mode::Emulation => match &self.route {
                    Some(route) if self.connect_pending => {
                        self.connect_pending = false;
                        out.push(route.rewrite_connect_reply(&self.conn.id, f));
                    }
                    _ => out.push(f),
                },
                Mode::Uni => {
                    if let Some(f) = to_uni(f)? {
                        out.push(f);
                    }
                }
            }
        }
        Ok(frame_chunk(out, self.framing))
    }

    /// Ends the session, then sends what is still queued and the disconnect push and ends
    /// the body. Cleaning up first means a client that sees the stream end can count on the
    /// server having let go of it, and a stalled one does not hold its channels meanwhile.
    async fn goodbye(mut self, disconnect: Option<Disconnect>) {
        let mut chunk = BytesMut::new();
        if let Some(d) = &disconnect {
            // Recorded as the reason (metrics and logs read it in `Session::close`).
            self.conn.close(d.clone());
            let mut pending = std::mem::take(&mut self.leftover);
            if d.code != Disconnect::SLOW.code {
                pending.extend(self.conn.drain().frames);
            }
            // A unidirectional connect that failed ends here too: its reason is the disconnect.
            if let Ok(Some(c)) = self.encode(pending) {
                chunk.extend_from_slice(&c);
            }
            if let Some(c) = frame_chunk([disconnect_message(d, self.mode)], self.framing) {
                chunk.extend_from_slice(&c);
            }
        }
        drop(self.route.take());
        self.conn.close(Disconnect::new(3000, "closed"));
        self.session.close().await;
        if !chunk.is_empty() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.tx.send(chunk.freeze())).await;
        }
        // Dropping `tx` ends the response body: the client sees the stream finish.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uni_strips_push_wrapper_without_copy() {
        let f = Bytes::from_static(br#"{"push":{"channel":"a","pub":{"data":1}}}"#);
        let out = to_uni(f.clone()).unwrap().unwrap();
        assert_eq!(&out[..], br#"{"channel":"a","pub":{"data":1}}"#);
        assert_eq!(out.as_ptr(), f[8..].as_ptr());
        assert_eq!(
            &to_uni(Bytes::from_static(br#"{"id":1,"connect":{"client":"c"}}"#))
                .unwrap()
                .unwrap()[..],
            br#"{"connect":{"client":"c"}}"#
        );
        assert_eq!(
            &to_uni(Bytes::from_static(b"{}")).unwrap().unwrap()[..],
            b"{}"
        );
        assert!(
            to_uni(Bytes::from_static(br#"{"id":7,"presence":{}}"#))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn uni_connect_error_is_a_disconnect() {
        let e = to_uni(Bytes::from_static(
            br#"{"id":1,"error":{"code":109,"message":"token expired"}}"#,
        ))
        .unwrap_err();
        assert_eq!(e.code, 3005);
        let e = to_uni(Bytes::from_static(
            br#"{"id":1,"error":{"code":101,"message":"unauthorized"}}"#,
        ))
        .unwrap_err();
        assert_eq!(e.code, 3500);
    }

    #[test]
    fn sse_framing_keeps_line_breaks_inside_data_fields() {
        let c = frame_chunk(
            [
                Bytes::from_static(b"{\"a\":\n1}"),
                Bytes::from_static(b"{}"),
            ],
            Framing::Sse,
        )
        .unwrap();
        assert_eq!(&c[..], b"data: {\"a\":\ndata: 1}\n\ndata: {}\n\n");
        let c = frame_chunk([Bytes::from_static(b"{}")], Framing::Lines).unwrap();
        assert_eq!(&c[..], b"{}\n");
        assert!(frame_chunk([], Framing::Lines).is_none());
    }

    #[test]
    fn disconnect_push_shapes() {
        let d = Disconnect::new(3008, "slow");
        assert_eq!(
            &disconnect_message(&d, Mode::Emulation)[..],
            br#"{"push":{"disconnect":{"code":3008,"reason":"slow","reconnect":true}}}"#
        );
        assert_eq!(
            &disconnect_message(&d, Mode::Uni)[..],
            br#"{"disconnect":{"code":3008,"reason":"slow","reconnect":true}}"#
        );
    }

    #[test]
    fn uni_connect_request_parsing() {
        assert!(parse_uni_connect(b"").unwrap().token.is_empty());
        assert!(parse_uni_connect(b"null").unwrap().token.is_empty());
        assert_eq!(parse_uni_connect(b"{\"token\":\"t\"}").unwrap().token, "t");
        assert!(parse_uni_connect(b"{\"token\":").is_err());
    }
}
