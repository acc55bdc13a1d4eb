//! Unidirectional WebSocket (`GET /connection/uni_websocket`): the connect request comes as
//! the first message (or in the `cf_connect` query parameter), then the server sends bare
//! pushes, one per text message. Later client messages are read and ignored.
//!
//! Same loop as `ws.rs`; what differs is the protocol, shared with the other unidirectional
//! transports in `comet.rs`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::SinkExt;
use herald_core::conn::ConnHandle;
use herald_core::session::Session;
use herald_protocol::Disconnect;
use herald_protocol::client::ConnectRequest;
use yawc::close::CloseCode;
use yawc::{Frame, OpCode, WebSocket};

use crate::comet::{self, ConnectQuery, Mode};
use crate::echo::CLOSE_TIMEOUT;
use crate::server::AppState;

/// `GET /connection/uni_websocket`.
pub async fn handle(
    State(state): State<AppState>,
    Query(q): Query<ConnectQuery>,
    ws: yawc::IncomingUpgrade,
) -> Response {
    if state.node.is_draining() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let early = match q.cf_connect() {
        Some(text) => match comet::parse_uni_connect(text.as_bytes()) {
            Ok(req) => Some(req),
            Err(r) => return r.into_response(),
        },
        None => None,
    };
    // The same options as the bidirectional endpoint: small idle buffers, deflate when on.
    let opts = crate::echo::websocket_options(&state, state.node.client.max_message_size);
    match ws.upgrade(opts) {
        Ok((response, upgrade)) => {
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(socket) => serve(state, socket, early).await,
                    Err(e) => tracing::debug!(error = %e, "uni websocket upgrade failed"),
                }
            });
            response.map(axum::body::Body::new)
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// Sends each message as its own text frame (uni clients read one JSON per message), then
/// flushes once.
async fn write_all<S>(ws: &mut WebSocket<S>, messages: Vec<Bytes>) -> yawc::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if messages.is_empty() {
        return Ok(());
    }
    for m in messages {
        ws.feed(Frame::text(m)).await?;
    }
    ws.flush().await
}

/// Turns drained messages into unidirectional ones; a failed connect is a disconnect.
fn to_uni_all(
    frames: impl IntoIterator<Item = Bytes>,
) -> Result<Vec<Bytes>, (Vec<Bytes>, Disconnect)> {
    let mut out = Vec::new();
    for f in frames {
        match comet::to_uni(f) {
            Ok(Some(m)) => out.push(m),
            Ok(None) => {}
            Err(d) => return Err((out, d)),
        }
    }
    Ok(out)
}

async fn serve<S>(state: AppState, mut ws: WebSocket<S>, early: Option<ConnectRequest>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let _guard = state.tracker.enter();
    let node = state.node.clone();
    let conn = Arc::new(ConnHandle::new(
        Arc::from(herald_core::node::new_id()),
        node.client.max_queue_bytes,
    ));
    let mut session = Session::new(node.clone(), conn.clone());
    session.set_unidirectional();
    let transport = node.metrics.transport("uni_websocket");
    let _counted = transport.open();
    let mut deadline = match session.tick(Instant::now()).await {
        Ok(d) => d,
        Err(_) => return,
    };
    let mut connected = false;
    if let Some(req) = early {
        connected = true;
        if let Err(d) = session
            .handle_command(comet::uni_connect_command(req))
            .await
        {
            finish(&mut ws, &conn, &mut session, Some((Vec::new(), d))).await;
            return;
        }
        deadline = session.next_wakeup();
    }
    let mut leftover = Vec::new();
    let disconnect: Option<Disconnect> = 'conn: loop {
        tokio::select! {
            biased;
            _ = conn.wait() => {
                let drained = conn.drain();
                for c in drained.controls {
                    if let Err(d) = session.handle_control(c).await {
                        break 'conn Some(d);
                    }
                    deadline = session.next_wakeup();
                }
                let messages = match to_uni_all(drained.frames) {
                    Ok(m) => m,
                    Err((m, d)) => {
                        leftover = m;
                        break 'conn Some(d);
                    }
                };
                if let Some(d) = drained.closing {
                    if d.code != Disconnect::SLOW.code {
                        leftover = messages;
                    }
                    break 'conn Some(d);
                }
                let len: usize = messages.iter().map(Bytes::len).sum();
                let write = write_all(&mut ws, messages);
                tokio::pin!(write);
                let written = tokio::select! {
                    r = &mut write => r.is_ok(),
                    _ = conn.closing() => {
                        !conn.is_slow()
                            && matches!(tokio::time::timeout(CLOSE_TIMEOUT, write).await, Ok(Ok(())))
                    }
                };
                if !written {
                    break 'conn None;
                }
                transport.bytes_sent.increment(len as u64);
                if let Some(t) = drained.oldest_publication {
                    node.metrics.written(t);
                }
            }
            frame = ws.next_frame() => {
                match frame {
                    Ok(f) => match f.opcode() {
                        OpCode::Text | OpCode::Binary if !connected => {
                            connected = true;
                            let req = match comet::parse_uni_connect(f.payload()) {
                                Ok(r) => r,
                                Err(_) => break 'conn Some(Disconnect::BAD_REQUEST.into()),
                            };
                            if let Err(d) = session.handle_command(comet::uni_connect_command(req)).await {
                                break 'conn Some(d);
                            }
                            deadline = session.next_wakeup();
                        }
                        OpCode::Close => {
                            // Send the close frame the library queued in answer.
                            crate::echo::finish(&mut ws, None).await;
                            break 'conn None;
                        }
                        // The client has nothing to say after connect.
                        _ => {}
                    },
                    Err(e) => {
                        tracing::debug!(client = %conn.id, error = %e, "uni websocket read ended");
                        // Close with the matching code and read off what the client sent.
                        crate::echo::finish(&mut ws, Some(e)).await;
                        break 'conn None;
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                match session.tick(Instant::now()).await {
                    Ok(next) => deadline = next,
                    Err(d) => break 'conn Some(d),
                }
            }
        }
    };
    finish(
        &mut ws,
        &conn,
        &mut session,
        disconnect.map(|d| (leftover, d)),
    )
    .await;
}

/// Sends what is still queued, the disconnect push and the close frame; ends the session.
async fn finish<S>(
    ws: &mut WebSocket<S>,
    conn: &Arc<ConnHandle>,
    session: &mut Session,
    disconnect: Option<(Vec<Bytes>, Disconnect)>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    if let Some((mut pending, d)) = disconnect {
        // Recorded as the reason (metrics and logs read it in `Session::close`).
        conn.close(d.clone());
        if d.code == Disconnect::SLOW.code {
            pending.clear();
        } else {
            match to_uni_all(conn.drain().frames) {
                Ok(m) | Err((m, _)) => pending.extend(m),
            }
        }
        pending.push(comet::disconnect_message(&d, Mode::Uni));
        let goodbye = async {
            write_all(ws, pending).await?;
            ws.send(Frame::close(CloseCode::from(d.code), d.reason.as_bytes()))
                .await?;
            ws.close().await
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, goodbye).await;
    }
    conn.close(Disconnect::new(3000, "closed"));
    session.close().await;
}
