//! WebSocket: the wire every WebSocket endpoint shares (the upgrade, Herald's own framing
//! on the socket, one close path) and its three endpoints — the bidirectional client protocol
//! (`/connection/websocket`), unidirectional pushes (`/connection/uni_websocket`) and the
//! conformance echo (`/connection/echo`).

pub mod bidi;
pub mod codec;
pub mod echo;
pub mod socket;
pub mod uni;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::header::SEC_WEBSOCKET_EXTENSIONS;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use herald_core::conn::{Codec, Mode};
use herald_protocol::Disconnect;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use yawc::{CompressionLevel, Options};

use self::codec::{Deflate, Kind, WsError};
use self::socket::{Read, WsSocket};
use super::driver::{Received, Wire};
use crate::http::Peer;
use crate::state::AppState;

/// What the handshake offers: permessage-deflate when `server.websocket_compression` is on
/// and the client asks for it, with no context takeover in both directions (RFC 7692 lets
/// the server impose it), so an idle connection holds no compressor or decompressor. The
/// library only negotiates; the socket is Herald's ([`socket::WsSocket`]).
pub fn websocket_options(state: &AppState) -> Options {
    let opts = Options::default();
    if state.config.server.websocket_compression {
        opts.with_compression_level(CompressionLevel::fast())
            .server_no_context_takeover()
            .client_no_context_takeover()
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

/// A client WebSocket after the upgrade: Herald's framing on the upgraded socket (after TLS).
pub type Socket = WsSocket<TokioIo<Upgraded>>;

/// A WebSocket upgrade request, as every endpoint takes it: yawc checks the handshake headers
/// and writes the 101 response; Herald keeps a handle on hyper's upgrade (a clone of the one
/// yawc takes) to get the socket itself.
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
    let WsUpgrade { ws, on_upgrade } = ws;
    // yawc's own upgrade future is dropped unpolled: Herald's handle receives the socket.
    match ws.upgrade(websocket_options(state)) {
        Ok((response, _)) => {
            let extensions = response
                .headers()
                .get(SEC_WEBSOCKET_EXTENSIONS)
                .and_then(|v| v.to_str().ok())
                .map(agreed_extensions)
                .and_then(|v| Deflate::from_response(&v));
            // What is needed only until the socket exists, boxed: a task keeps what its
            // future captured for as long as it runs, so captured by value it would stay
            // part of every connection.
            let setup = Box::new((max_message, extensions, serve));
            // Spawned boxed: a task's cell is aligned to 128 bytes, so a future of a few
            // dozen bytes inline in it took a 256-byte cell, boxed it takes 128 (idle memory
            // per connection, docs/performance.md, "One timer per node").
            tokio::spawn(Box::pin(async move {
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
            }));
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

/// The WebSocket over an upgraded connection, with the largest message it takes and the
/// compression terms of the handshake, and its connection future, boxed.
///
/// Takes the setup boxed: unboxed at the call, it would be a temporary of the task's future
/// and take room there for the life of the connection (measured: 0.4 KiB).
#[allow(clippy::boxed_local)]
fn open_socket<F, Fut>(
    io: Upgraded,
    setup: Box<(usize, Option<Deflate>, F)>,
) -> Option<Pin<Box<Fut>>>
where
    F: FnOnce(Socket) -> Fut,
{
    let (max_message, deflate, serve) = *setup;
    Some(Box::pin(serve(WsSocket::new(
        TokioIo::new(io),
        max_message,
        deflate,
    ))))
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
                state.node.clone(),
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
    /// Boxed: only the conformance echo uses it, and every client connection's wire would
    /// otherwise carry its room.
    Echo(Box<VecDeque<Kind>>),
}

/// A WebSocket as the driver sees it.
pub struct WsWire {
    ws: Socket,
    framing: Framing,
    /// Why reading stopped, for the close handshake (None: the client closed). Boxed, as
    /// is the echo's queue: the wire then fits a 256-byte allocation class.
    ended: Option<Box<WsError>>,
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
        match self.ws.recv().await {
            Read::Message(kind, data) => {
                if let Framing::Echo(kinds) = &mut self.framing {
                    kinds.push_back(kind);
                }
                Received::Message(data)
            }
            Read::Closed => Received::Gone,
            Read::Refused(e) => {
                tracing::debug!(error = %e, "websocket read refused");
                self.ended = Some(Box::new(e));
                Received::Gone
            }
        }
    }

    async fn send(&mut self, mut batch: VecDeque<Bytes>) -> Result<usize, ()> {
        let n: usize = batch.iter().map(Bytes::len).sum();
        let sent = match &mut self.framing {
            Framing::Batched => match join_lines(batch) {
                Some(payload) => self.ws.send([(Kind::Text, payload)]).await,
                None => Ok(()),
            },
            Framing::Binary => match batch.len() {
                0 => Ok(()),
                1 => match batch.pop_front() {
                    Some(m) => self.ws.send([(Kind::Binary, m)]).await,
                    None => Ok(()),
                },
                _ => {
                    let frame = herald_protocol::proto::concat(batch);
                    self.ws.send([(Kind::Binary, frame)]).await
                }
            },
            Framing::PerMessage => {
                self.ws
                    .send(batch.into_iter().map(|m| (Kind::Text, m)))
                    .await
            }
            // Each answer in the kind of the message it answers.
            Framing::Echo(kinds) => {
                let frames: Vec<_> = batch
                    .into_iter()
                    .map(|m| (kinds.pop_front().unwrap_or(Kind::Text), m))
                    .collect();
                self.ws.send(frames).await
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
        self.ws.close(d.code, &d.reason).await;
    }

    /// A refused message gets its close frame (1007 invalid UTF-8, 1009 too big, 1002 any
    /// other protocol violation); a client's close frame its reply. The driver bounds it.
    async fn farewell(&mut self) {
        let ended = self.ended.take();
        self.ws.finish(ended.as_deref()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every WebSocket connection holds one boxed wire: kept within mimalloc's 256-byte
    /// class (it was in the 320-byte one), docs/performance.md.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_wire_fits_its_allocation_class() {
        let size = std::mem::size_of::<WsWire>();
        assert!(size <= 256, "WsWire grew to {size} bytes");
    }

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
