//! HTTP streaming and Server-Sent Events: the transports for clients that WebSocket cannot
//! reach (proxies that refuse upgrades, corporate middleboxes) and for clients without an SDK.
//!
//! Bidirectional emulation (`/connection/http_stream`, `/connection/sse`) carries the full
//! client protocol down a streaming response; the client's later commands arrive on
//! `POST /emulation` (see [`emulation`]). The HTTP stream speaks Protobuf when the connect
//! request is sent as `application/octet-stream` (length-prefixed commands in, length-prefixed
//! replies out, as centrifuge-js's Protobuf build does); SSE and the unidirectional
//! transports are JSON only. Unidirectional (`/connection/uni_http_stream`,
//! `/connection/uni_sse`) takes one connect request and streams bare pushes.
//!
//! A stream is a [`Wire`] like a WebSocket: the connection driver drains the outbox into the
//! response body. The body is fed through a one-slot channel, so a client that stops reading
//! stops the writes and its outbox fills up to `client.max_queue_bytes`, where it is closed
//! as slow (3008).

pub(crate) mod direct;
pub mod emulation;

use std::collections::VecDeque;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, PRAGMA};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use herald_core::conn::{Codec, Control, Mode};
use herald_protocol::Disconnect;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::driver::{self, Received, Wire};
use crate::http::Peer;
use crate::state::AppState;

/// How the messages are cut on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// One JSON message per line (`\n`-terminated).
    Lines,
    /// One `data:` event per message.
    Sse,
    /// Length-prefixed Protobuf messages, back to back.
    Binary,
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
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| BODY_TOO_LARGE)
}

/// A request body over `client.max_message_size`.
const BODY_TOO_LARGE: Refusal = Refusal(
    StatusCode::PAYLOAD_TOO_LARGE,
    "request body larger than client.max_message_size\n",
);

/// Whether the request body is Protobuf (`application/octet-stream`).
pub(crate) fn is_binary(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/octet-stream"))
}

/// Only JSON is spoken on the unidirectional transports.
fn check_json(headers: &HeaderMap) -> Result<(), Refusal> {
    if is_binary(headers) {
        return Err(Refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only the JSON protocol is supported\n",
        ));
    }
    Ok(())
}

/// A unidirectional connect request, checked before the stream starts (400 when malformed).
fn uni_connect(data: Bytes) -> Result<Bytes, Refusal> {
    herald_protocol::client::parse_uni_connect(&data)
        .map(|_| data)
        .map_err(|_| Refusal(StatusCode::BAD_REQUEST, "malformed connect request\n"))
}

/// `POST /connection/http_stream`: the body holds the connect command, JSON or (as
/// `application/octet-stream`) length-prefixed Protobuf.
pub async fn http_stream(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let data = match read_body(body, state.node.client.max_message_size).await {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    if is_binary(&headers) {
        if data.is_empty() {
            return plain(StatusCode::BAD_REQUEST, "no connect command\n");
        }
        return open(
            state,
            peer,
            &headers,
            Mode::Bidirectional,
            Framing::Binary,
            data,
        );
    }
    if data.iter().all(u8::is_ascii_whitespace) {
        return plain(StatusCode::BAD_REQUEST, "no connect command\n");
    }
    open(
        state,
        peer,
        &headers,
        Mode::Bidirectional,
        Framing::Lines,
        data,
    )
}

/// `GET /connection/sse?cf_connect=<connect command>`.
pub async fn sse(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    Query(q): Query<ConnectQuery>,
) -> Response {
    match q.cf_connect() {
        Some(c) => {
            if c.len() > state.node.client.max_message_size {
                return plain(StatusCode::PAYLOAD_TOO_LARGE, "connect command too large\n");
            }
            let data = Bytes::from(c.to_owned());
            open(
                state,
                peer,
                &headers,
                Mode::Bidirectional,
                Framing::Sse,
                data,
            )
        }
        None => plain(StatusCode::BAD_REQUEST, "no cf_connect parameter\n"),
    }
}

/// `GET /connection/uni_sse?cf_connect=<connect request>` (no parameter: an empty request).
pub async fn uni_sse_get(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    Query(q): Query<ConnectQuery>,
) -> Response {
    let text = q.cf_connect.unwrap_or_default();
    match uni_connect(Bytes::from(text)) {
        Ok(data) => open(
            state,
            peer,
            &headers,
            Mode::Unidirectional,
            Framing::Sse,
            data,
        ),
        Err(r) => r.into_response(),
    }
}

/// `POST /connection/uni_sse` with the connect request as the body.
pub async fn uni_sse_post(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    uni_post(state, peer, headers, body, Framing::Sse).await
}

/// `POST /connection/uni_http_stream` with the connect request as the body.
pub async fn uni_http_stream(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
) -> Response {
    uni_post(state, peer, headers, body, Framing::Lines).await
}

async fn uni_post(
    state: AppState,
    peer: Peer,
    headers: HeaderMap,
    body: Body,
    framing: Framing,
) -> Response {
    if let Err(r) = check_json(&headers) {
        return r.into_response();
    }
    let data = match read_body(body, state.node.client.max_message_size).await {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    match uni_connect(data) {
        Ok(data) => open(state, peer, &headers, Mode::Unidirectional, framing, data),
        Err(r) => r.into_response(),
    }
}

/// The transport's name in metrics and logs.
fn transport_name(mode: Mode, framing: Framing) -> &'static str {
    match (mode, framing) {
        (Mode::Bidirectional, Framing::Lines | Framing::Binary) => "http_stream",
        (Mode::Bidirectional, Framing::Sse) => "sse",
        (Mode::Unidirectional, Framing::Lines | Framing::Binary) => "uni_http_stream",
        (Mode::Unidirectional, Framing::Sse) => "uni_sse",
    }
}

/// Starts a stream's connection task: its session from the request's headers, and the wire
/// `wire` builds for it. Shared by the routed streams and the ones served on the socket.
fn launch<W: Wire + 'static>(
    state: &AppState,
    headers: &HeaderMap,
    mode: Mode,
    framing: Framing,
    first: Bytes,
    peer: Peer,
    wire: impl FnOnce(
        &std::sync::Arc<herald_core::conn::ConnHandle>,
        &mut herald_core::session::Session,
    ) -> W,
) {
    let codec = match framing {
        Framing::Binary => Codec::Protobuf,
        Framing::Lines | Framing::Sse => Codec::Json,
    };
    let name = transport_name(mode, framing);
    let forwarded = super::forwarded_headers(state, headers);
    // Counted from now, so a shutdown that starts before the task runs still waits for it.
    let guard = state.tracker.enter();
    let (conn, mut session) = super::connection(state, mode, codec, name, forwarded);
    let wire = wire(&conn, &mut session);
    let transport = state.node.metrics.transport(name);
    // Built here rather than inside the task: the task then holds only the driver's future,
    // not the state it was built from (idle memory per connection).
    let connection = driver::drive(
        conn,
        session,
        wire,
        Some(first),
        transport,
        state.node.clone(),
        peer,
    );
    // Spawned boxed, the driver's future boxed too: inline, it made the task's cell (aligned
    // to 128 bytes) 512 bytes, and the task held it twice (as captured and as awaited).
    let connection = Box::pin(connection);
    tokio::spawn(Box::pin(async move {
        let _guard = guard;
        connection.await;
    }));
}

/// A bidirectional stream's route: it takes later commands on `/emulation`, routed by a
/// token that the connect reply names as the session.
fn route_to(
    node_id: &str,
    conn: &std::sync::Arc<herald_core::conn::ConnHandle>,
    session: &mut herald_core::session::Session,
) -> emulation::Registration {
    let r = emulation::register(node_id, conn);
    session.set_session_id(r.token().to_string());
    r
}

/// The response's `Content-Type` for a framing.
fn content_type(framing: Framing) -> &'static str {
    match framing {
        Framing::Sse => "text/event-stream; charset=utf-8",
        Framing::Lines => "application/x-ndjson",
        Framing::Binary => "application/octet-stream",
    }
}

/// The response's `Cache-Control`: a stream is never cached.
const NO_CACHE: &str = "private, no-cache, no-store, must-revalidate, max-age=0";

/// Starts the connection task and answers with the streaming body it feeds.
fn open(
    state: AppState,
    peer: Peer,
    headers: &HeaderMap,
    mode: Mode,
    framing: Framing,
    first: Bytes,
) -> Response {
    if state.node.is_draining() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let (tx, mut rx) = mpsc::channel::<Bytes>(1);
    let node_id = state.node.id.clone();
    launch(
        &state,
        headers,
        mode,
        framing,
        first,
        peer,
        |conn, session| StreamWire {
            tx,
            framing,
            route: (mode == Mode::Bidirectional).then(|| route_to(&node_id, conn, session)),
        },
    );
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|c| c.map(Ok::<Bytes, std::convert::Infallible>))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(content_type(framing)),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static(NO_CACHE));
    h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    // Buffering proxies (nginx) would hold messages back until their buffer fills.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
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
            Framing::Binary => out.extend_from_slice(&m),
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

/// A streaming response body as the driver sees it.
struct StreamWire {
    tx: mpsc::Sender<Bytes>,
    framing: Framing,
    /// The `/emulation` route to this session (bidirectional streams only).
    route: Option<emulation::Registration>,
}

impl Wire for StreamWire {
    const ABANDON_SAFE: bool = true;

    async fn recv(&mut self) -> Received {
        // The client cannot send on the stream itself: the only event is its going away
        // (the server dropped the response body).
        self.tx.closed().await;
        Received::Gone
    }

    async fn send(&mut self, batch: VecDeque<Bytes>) -> Result<usize, ()> {
        let Some(chunk) = frame_chunk(batch, self.framing) else {
            return Ok(0);
        };
        let n = chunk.len();
        self.tx.send(chunk).await.map(|()| n).map_err(|_| ())
    }

    async fn goodbye(&mut self, pending: VecDeque<Bytes>, push: Bytes, _d: &Disconnect) {
        self.route.take();
        if let Some(chunk) = frame_chunk(pending.into_iter().chain([push]), self.framing) {
            let _ = self.tx.send(chunk).await;
        }
        // Dropping the wire (and `tx`) ends the response body: the client sees it finish.
    }

    fn on_control(&mut self, c: &Control) {
        commands_handled(self.route.as_ref(), c);
    }
}

/// Tells a bidirectional stream's route that commands it brought are being handled (its
/// queue of `/emulation` bytes shrinks).
fn commands_handled(route: Option<&emulation::Registration>, c: &Control) {
    if let (Control::Commands(data), Some(route)) = (c, route) {
        route.handled(data.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
