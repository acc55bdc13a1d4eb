//! The WebSocket settings every Herald WebSocket endpoint shares, and `/connection/echo`: an
//! endpoint on the same stack (same listener, same upgrade, same yawc options) that sends
//! back every message it receives, for WebSocket conformance suites (Autobahn). It exists only
//! with `server.websocket_echo = true`; otherwise it answers 404.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use yawc::close::CloseCode;
use yawc::{CompressionLevel, DeflatePool, Frame, OpCode, Options};

use crate::server::AppState;

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

/// How long the closing handshake may take.
pub(crate) const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Largest message the echo endpoint takes: the conformance suite sends up to 16 MiB.
const ECHO_MAX_MESSAGE: usize = 32 << 20;

/// `GET /connection/echo`.
pub async fn handle(State(state): State<AppState>, ws: yawc::IncomingUpgrade) -> Response {
    if !state.config.server.websocket_echo {
        return StatusCode::NOT_FOUND.into_response();
    }
    let opts = websocket_options(
        &state,
        ECHO_MAX_MESSAGE.max(state.node.client.max_message_size),
    );
    match ws.upgrade(opts) {
        Ok((response, upgrade)) => {
            let tracker = state.tracker.clone();
            tokio::spawn(async move {
                let _guard = tracker.enter();
                match upgrade.await {
                    Ok(mut socket) => {
                        let ended = loop {
                            let frame = match socket.next_frame().await {
                                Ok(f) => f,
                                Err(e) => break Some(e),
                            };
                            let echo = match frame.opcode() {
                                OpCode::Text => Frame::text(frame.payload().clone()),
                                OpCode::Binary => Frame::binary(frame.payload().clone()),
                                OpCode::Close => break None,
                                _ => continue,
                            };
                            if socket.send(echo).await.is_err() {
                                break None;
                            }
                        };
                        finish(&mut socket, ended).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "echo upgrade failed"),
                }
            });
            response.map(axum::body::Body::new)
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// Ends a WebSocket after its read loop stopped: `error` is why the read failed (None when the
/// client sent its close frame, which the library already answered). A refused message gets
/// its close frame — 1007 invalid UTF-8, 1009 too big, 1002 any other protocol violation —
/// unless the library queued one already; then the queued frames are flushed and what the
/// client still sends is read up to its close frame, so the socket ends without a reset.
/// Bounded by two seconds on a client that does not read.
pub async fn finish<S>(socket: &mut yawc::WebSocket<S>, error: Option<yawc::WebSocketError>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
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
