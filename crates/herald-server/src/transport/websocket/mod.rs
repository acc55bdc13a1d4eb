//! WebSocket: the wire every WebSocket endpoint shares (one yawc stack, one set of options,
//! one close path) and its three endpoints — the bidirectional client protocol
//! (`/connection/websocket`), unidirectional pushes (`/connection/uni_websocket`) and the
//! conformance echo (`/connection/echo`).

pub mod bidi;
pub mod echo;
mod opcode_guard;
pub mod uni;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::header::SEC_WEBSOCKET_EXTENSIONS;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use herald_core::conn::{Codec, Mode};
use herald_protocol::Disconnect;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use yawc::close::CloseCode;
use yawc::{CompressionLevel, DeflatePool, Frame, OpCode, Options, Role, WebSocket};

use self::opcode_guard::OpcodeGuard;
use super::driver::{CLOSE_TIMEOUT, Received, Wire};
use crate::http::Peer;
use crate::state::AppState;

/// Messages smaller than this go out uncompressed: pings, replies and small pushes rarely
/// shrink, and a connection that only sends them never builds a compressor.
const COMPRESSION_THRESHOLD: usize = 128;

/// Deflate state shared by all connections of the process (no context takeover means no
/// state survives a message); sized for messages compressed at the same moment.
fn deflate_pool() -> DeflatePool {
    static POOL: OnceLock<DeflatePool> = OnceLock::new();
    POOL.get_or_init(|| DeflatePool::new(64)).clone()
}

/// Initial read and write buffer of a connection. Buffers grow for larger messages; keeping
/// the start small is what an idle connection costs: 4 KiB each measured 17.0 KiB RSS per
/// idle connection, 512 B measured 11.2 KiB (`herald-bench connect`, 5,000 connections).
const IDLE_BUFFER: usize = 512;

/// The yawc options of a client WebSocket: bounded incoming messages (`max_message` bytes:
/// larger closes with 1009), UTF-8 checked text, small buffers, and permessage-deflate when
/// `server.websocket_compression` is on and the client offers it.
///
/// Compression is negotiated with no context takeover in both directions (RFC 7692 lets the
/// server impose it) and pooled deflate state, so an idle connection holds no compressor
/// (about 2 KiB instead of about 370 KiB).
pub fn websocket_options(state: &AppState, max_message: usize) -> Options {
    let opts = Options::default()
        .with_max_payload_read(max_message)
        .with_max_read_buffer(max_message)
        .with_read_buffer_capacity(IDLE_BUFFER)
        .with_write_buffer_capacity(IDLE_BUFFER)
        .with_utf8()
        .with_no_delay();
    if state.config.server.websocket_compression {
        opts.with_compression_level(CompressionLevel::fast())
            .server_no_context_takeover()
            .client_no_context_takeover()
            .with_deflate_pool(deflate_pool())
            .with_compression_threshold(COMPRESSION_THRESHOLD)
    } else {
        opts.without_compression()
    }
}

/// Whether the upgrade request offers `name` among its subprotocols.
pub fn offers_subprotocol(headers: &axum::http::HeaderMap, name: &str) -> bool {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == name)
}

/// The WebSocket subprotocol of the Protobuf client protocol.
pub const PROTOBUF_SUBPROTOCOL: &str = "centrifuge-protobuf";

/// A client WebSocket after the upgrade: yawc over the upgraded socket (after TLS), with
/// [`OpcodeGuard`] in between so a reserved opcode closes with 1002.
pub type Socket = WebSocket<OpcodeGuard<TokioIo<Upgraded>>>;

/// A WebSocket upgrade request, as every endpoint takes it: yawc checks the handshake headers
/// and writes the 101 response; Herald keeps a handle on hyper's upgrade (a clone of the one
/// yawc takes) to get the socket itself and put [`OpcodeGuard`] in front of yawc.
pub struct WsUpgrade {
    ws: yawc::IncomingUpgrade,
    on_upgrade: OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, StatusCode> {
        let on_upgrade = parts.extensions.get::<OnUpgrade>().cloned();
        let ws = yawc::IncomingUpgrade::from_request_parts(parts, state).await?;
        // yawc refuses a request without one, so this is there when yawc accepted.
        let on_upgrade = on_upgrade.ok_or(StatusCode::BAD_REQUEST)?;
        Ok(Self { ws, on_upgrade })
    }
}

/// The permessage-deflate terms of the 101 response as the socket is set up with them. yawc
/// writes a window size outside 9–15 (a client asked for 8) without its value, which would
/// read back as 15 bits: Herald's compressor keeps the 9 bits yawc clamps such a request to
/// (the smallest window it can use). A valueless client window needs nothing: decompressing
/// with the largest window reads whatever window the client uses.
fn agreed_extensions(response: &str) -> String {
    response
        .split(';')
        .map(|p| match p.trim() {
            "server_max_window_bits" => " server_max_window_bits=9",
            _ => p,
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// Completes a WebSocket upgrade and runs `serve` on the socket in a task of its own; the
/// same for every endpoint. `subprotocol` is echoed in the 101 response (the client offered
/// it). Refused while the node drains.
pub fn upgrade<F, Fut>(
    state: &AppState,
    ws: WsUpgrade,
    max_message: usize,
    subprotocol: Option<&'static str>,
    serve: F,
) -> Response
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    if state.node.is_draining() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    // Counted from now, so a shutdown that starts before the task runs still waits for it.
    let guard = state.tracker.enter();
    let options = websocket_options(state, max_message);
    let WsUpgrade { ws, on_upgrade } = ws;
    // yawc's own upgrade future is dropped unpolled: Herald's handle receives the socket.
    match ws.upgrade(options.clone()) {
        Ok((response, _)) => {
            let extensions = response
                .headers()
                .get(SEC_WEBSOCKET_EXTENSIONS)
                .and_then(|v| v.to_str().ok())
                .map(agreed_extensions);
            // What is needed only until the socket exists, boxed: a task keeps what its
            // future captured for as long as it runs, so captured by value it would stay
            // part of every connection.
            let setup = Box::new((options, extensions, serve));
            tokio::spawn(async move {
                let _guard = guard;
                let io = match on_upgrade.await {
                    Ok(io) => io,
                    Err(e) => {
                        tracing::debug!(error = %e, "websocket upgrade failed");
                        return;
                    }
                };
                // Built in a plain function: the socket, before it is boxed, is then not a
                // slot of this task (an `async` body keeps such locals beside the await).
                let Some(connection) = open_socket(io, setup) else {
                    return;
                };
                connection.await;
            });
            let mut response = response.map(axum::body::Body::new);
            if let Some(p) = subprotocol {
                response.headers_mut().insert(
                    axum::http::header::SEC_WEBSOCKET_PROTOCOL,
                    axum::http::HeaderValue::from_static(p),
                );
            }
            response
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// The WebSocket over an upgraded connection, with the same options and agreed terms
/// yawc's upgrade would have used, and its connection future, boxed.
///
/// Takes the setup boxed: unboxed at the call, it would be a temporary of the task's future
/// and take room there for the life of the connection (measured: 0.4 KiB).
#[allow(clippy::boxed_local)]
fn open_socket<F, Fut>(
    io: Upgraded,
    setup: Box<(Options, Option<String>, F)>,
) -> Option<Pin<Box<Fut>>>
where
    F: FnOnce(Socket) -> Fut,
{
    let (options, extensions, serve) = *setup;
    let io = OpcodeGuard::new(TokioIo::new(io));
    match WebSocket::from_stream_with_extensions(io, Role::Server, extensions.as_deref(), options) {
        Ok(socket) => Some(Box::pin(serve(socket))),
        Err(e) => {
            tracing::debug!(error = %e, "websocket setup failed");
            None
        }
    }
}

/// What a client WebSocket endpoint serves.
pub struct Endpoint {
    pub mode: Mode,
    pub codec: Codec,
    pub framing: Framing,
    /// The transport label of logs and metrics.
    pub transport: &'static str,
    /// The subprotocol to echo in the 101 response.
    pub subprotocol: Option<&'static str>,
    /// The client's address, for logs.
    pub peer: Peer,
    /// Request headers the proxies forward.
    pub headers: Vec<(String, String)>,
}

/// Serves one client WebSocket: a session of the endpoint's mode and codec on the driver,
/// after the upgrade. `first` is a connect request the URL already carried.
pub fn serve_session(
    state: AppState,
    ws: WsUpgrade,
    endpoint: Endpoint,
    first: Option<Bytes>,
) -> Response {
    let max = state.node.client.max_message_size;
    let Endpoint {
        mode,
        codec,
        framing,
        transport,
        subprotocol,
        peer,
        headers,
    } = endpoint;
    upgrade(
        &state.clone(),
        ws,
        max,
        subprotocol,
        // The driver's future itself, not an `async` block around it: the block would keep
        // what it captured (the state, the endpoint) for the life of the connection.
        move |socket| {
            let (conn, session) = super::connection(&state, mode, codec, transport, headers);
            super::driver::drive(
                conn,
                session,
                WsWire::new(socket, framing),
                first,
                state.node.metrics.transport(transport),
                state.node.metrics.clone(),
                peer,
            )
        },
    )
}

/// How messages become WebSocket frames.
pub enum Framing {
    /// All queued messages in one text frame, `\n`-separated (the bidirectional JSON
    /// protocol).
    Batched,
    /// All queued messages in one binary frame, one after the other (the bidirectional
    /// Protobuf protocol: each message carries its length prefix).
    Binary,
    /// One text frame per message (unidirectional clients read one JSON per message).
    PerMessage,
    /// One frame per message, of the kind of the message it answers (text or binary).
    Echo(VecDeque<OpCode>),
}

/// A WebSocket as the driver sees it.
pub struct WsWire {
    ws: Socket,
    framing: Framing,
    /// Why reading stopped, for the close handshake (None: the client sent a close frame).
    ended: Option<yawc::WebSocketError>,
}

impl WsWire {
    pub fn new(ws: Socket, framing: Framing) -> Self {
        Self {
            ws,
            framing,
            ended: None,
        }
    }
}

/// Joins messages into one payload, `\n`-separated (a single message is sent as is).
fn join_lines(mut batch: VecDeque<Bytes>) -> Option<Bytes> {
    match batch.len() {
        0 => None,
        1 => batch.pop_front(),
        _ => {
            let len: usize = batch.iter().map(|f| f.len() + 1).sum();
            let mut buf = BytesMut::with_capacity(len);
            for (i, f) in batch.into_iter().enumerate() {
                if i > 0 {
                    buf.extend_from_slice(b"\n");
                }
                buf.extend_from_slice(&f);
            }
            Some(buf.freeze())
        }
    }
}

impl Wire for WsWire {
    const ABANDON_SAFE: bool = false;

    async fn recv(&mut self) -> Received {
        loop {
            match self.ws.next_frame().await {
                Ok(f) => match f.opcode() {
                    OpCode::Text | OpCode::Binary => {
                        if let Framing::Echo(kinds) = &mut self.framing {
                            kinds.push_back(f.opcode());
                        }
                        return Received::Message(f.payload().clone());
                    }
                    OpCode::Close => {
                        self.ended = None;
                        return Received::Gone;
                    }
                    _ => {}
                },
                Err(e) => {
                    tracing::debug!(error = %e, "websocket read ended");
                    self.ended = Some(e);
                    return Received::Gone;
                }
            }
        }
    }

    async fn send(&mut self, mut batch: VecDeque<Bytes>) -> Result<usize, ()> {
        let n: usize = batch.iter().map(Bytes::len).sum();
        let sent = match &mut self.framing {
            Framing::Batched => match join_lines(batch) {
                Some(payload) => self.ws.send(Frame::text(payload)).await,
                None => Ok(()),
            },
            Framing::Binary => match batch.len() {
                0 => Ok(()),
                1 => match batch.pop_front() {
                    Some(m) => self.ws.send(Frame::binary(m)).await,
                    None => Ok(()),
                },
                _ => {
                    let frame = herald_protocol::proto::concat(batch);
                    self.ws.send(Frame::binary(frame)).await
                }
            },
            framing => {
                // One frame per message: text, or for the echo the kind of the message it
                // answers.
                let ws = &mut self.ws;
                async {
                    for m in batch {
                        let binary = match framing {
                            Framing::Echo(kinds) => kinds.pop_front() == Some(OpCode::Binary),
                            _ => false,
                        };
                        let frame = if binary {
                            Frame::binary(m)
                        } else {
                            Frame::text(m)
                        };
                        ws.feed(frame).await?;
                    }
                    ws.flush().await
                }
                .await
            }
        };
        sent.map(|()| n).map_err(|_| ())
    }

    async fn goodbye(&mut self, pending: VecDeque<Bytes>, push: Bytes, d: &Disconnect) {
        let mut pending = pending;
        // The bidirectional protocol tells why in the close frame alone; a unidirectional
        // client reads the disconnect push first.
        if matches!(self.framing, Framing::PerMessage) {
            pending.push_back(push);
        }
        if !pending.is_empty() && self.send(pending).await.is_err() {
            return;
        }
        let close = Frame::close(CloseCode::from(d.code), d.reason.as_bytes());
        if self.ws.send(close).await.is_ok() {
            let _ = self.ws.close().await;
        }
    }

    async fn farewell(&mut self) {
        finish(&mut self.ws, self.ended.take()).await;
    }
}

/// Ends a WebSocket after its read loop stopped: `error` is why the read failed (None when the
/// client sent its close frame, which the library already answered). A refused message gets
/// its close frame — 1007 invalid UTF-8, 1009 too big, 1002 any other protocol violation —
/// unless the library queued one already; then the queued frames are flushed and what the
/// client still sends is read up to its close frame, so the socket ends without a reset.
/// Bounded by [`CLOSE_TIMEOUT`] on a client that does not read.
async fn finish(socket: &mut Socket, error: Option<yawc::WebSocketError>) {
    use futures_util::FutureExt;
    use yawc::WebSocketError as E;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = socket.flush().await;
        let error = match error {
            None | Some(E::ConnectionClosed) => {
                // The read side is closed: this returns at once, after writing the close
                // frame the library queued in answer to the client's.
                let _ = socket.next_frame().await;
                return;
            }
            Some(e) => e,
        };
        // Errors found while reading a frame already queued their close frame and closed the
        // read side, which answers at once; errors found on a whole message (UTF-8, fragment
        // assembly) did not.
        let library_closed = matches!(
            socket.next_frame().now_or_never(),
            Some(Err(E::ConnectionClosed))
        );
        if !library_closed {
            let code = match error {
                E::InvalidUTF8 => CloseCode::Invalid,
                E::FrameTooLarge => CloseCode::Size,
                _ => CloseCode::Protocol,
            };
            if socket
                .send(Frame::close(code, error.to_string().as_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
        while let Ok(f) = socket.next_frame().await {
            if f.opcode() == OpCode::Close {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_with_newlines() {
        let q: VecDeque<Bytes> = ["{\"a\":1}", "{}", "{\"b\":2}"]
            .iter()
            .map(|s| Bytes::from_static(s.as_bytes()))
            .collect();
        assert_eq!(&join_lines(q).unwrap()[..], b"{\"a\":1}\n{}\n{\"b\":2}");
        assert!(join_lines(VecDeque::new()).is_none());
    }

    #[test]
    fn agreed_extensions_keep_the_window_yawc_chose() {
        for same in [
            "permessage-deflate",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_max_window_bits=12; client_max_window_bits=9",
            "permessage-deflate; client_max_window_bits",
        ] {
            assert_eq!(agreed_extensions(same), same);
        }
        assert_eq!(
            agreed_extensions(
                "permessage-deflate; server_max_window_bits; client_no_context_takeover"
            ),
            "permessage-deflate; server_max_window_bits=9; client_no_context_takeover"
        );
    }
}
