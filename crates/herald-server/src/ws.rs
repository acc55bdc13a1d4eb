//! WebSocket transport: owns the socket, feeds frames to the session and drains the
//! connection's outbox, several messages per WebSocket frame.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use herald_core::conn::ConnHandle;
use herald_core::session::Session;
use herald_protocol::Disconnect;
use yawc::close::CloseCode;
use yawc::{Frame, OpCode, WebSocket};

use crate::echo::CLOSE_TIMEOUT;
use crate::server::AppState;

/// Joins queued messages into one text frame, `\n`-separated (a single message is sent
/// as is, without copying).
fn batch(frames: &mut VecDeque<Bytes>) -> Option<Bytes> {
    match frames.len() {
        0 => None,
        1 => frames.pop_front(),
        _ => {
            let len: usize = frames.iter().map(|f| f.len() + 1).sum();
            let mut buf = BytesMut::with_capacity(len);
            for (i, f) in frames.drain(..).enumerate() {
                if i > 0 {
                    buf.extend_from_slice(b"\n");
                }
                buf.extend_from_slice(&f);
            }
            Some(buf.freeze())
        }
    }
}

/// Writes the frames as one message; returns the payload bytes written.
async fn write_all<S>(ws: &mut WebSocket<S>, mut frames: VecDeque<Bytes>) -> yawc::Result<usize>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match batch(&mut frames) {
        Some(payload) => {
            let n = payload.len();
            ws.send(Frame::text(payload)).await.map(|()| n)
        }
        None => Ok(0),
    }
}

/// Serves one upgraded WebSocket connection until it ends.
pub async fn serve<S>(state: AppState, mut ws: WebSocket<S>)
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
    let transport = node.metrics.transport("websocket");
    let _counted = transport.open();
    let mut deadline = match session.tick(Instant::now()).await {
        Ok(d) => d,
        Err(_) => return,
    };
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
                if let Some(d) = drained.closing {
                    // A slow consumer's queue was already dropped; others get what is queued.
                    if d.code != Disconnect::SLOW.code {
                        let _ = write_all(&mut ws, drained.frames).await;
                    }
                    break 'conn Some(d);
                }
                // A write blocked on a client that stopped reading gives up as soon as the
                // connection is declared slow (or closed for another reason).
                let write = write_all(&mut ws, drained.frames);
                tokio::pin!(write);
                let written = tokio::select! {
                    r = &mut write => r.ok(),
                    _ = conn.closing() => {
                        if conn.is_slow() {
                            // Mid-frame on a client that does not read: no clean close is
                            // possible, drop the socket.
                            None
                        } else {
                            tokio::time::timeout(CLOSE_TIMEOUT, write).await.ok().and_then(Result::ok)
                        }
                    }
                };
                let Some(n) = written else {
                    break 'conn None;
                };
                transport.bytes_sent.increment(n as u64);
                if let Some(t) = drained.oldest_publication {
                    node.metrics.written(t);
                }
            }
            frame = ws.next_frame() => {
                match frame {
                    Ok(f) => match f.opcode() {
                        OpCode::Text | OpCode::Binary => {
                            transport.bytes_received.increment(f.payload().len() as u64);
                            if let Err(d) = session.handle_frame(f.payload()).await {
                                break 'conn Some(d);
                            }
                            deadline = session.next_wakeup();
                        }
                        OpCode::Close => {
                            // Send the close frame the library queued in answer.
                            crate::echo::finish(&mut ws, None).await;
                            break 'conn None;
                        }
                        _ => {}
                    },
                    Err(e) => {
                        tracing::debug!(client = %conn.id, error = %e, "websocket read ended");
                        // Close with the matching code (1009 too big, 1007 invalid UTF-8, 1002
                        // a protocol error) and read off what the client already sent so
                        // closing does not reset the socket.
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
    if let Some(d) = disconnect {
        // Recorded as the reason (metrics and logs read it in `Session::close`).
        conn.close(d.clone());
        // Whatever was queued before the decision still goes out, then the close frame.
        let pending = conn.drain().frames;
        let goodbye = async {
            if d.code != Disconnect::SLOW.code {
                write_all(&mut ws, pending).await?;
            }
            ws.send(Frame::close(CloseCode::from(d.code), d.reason.as_bytes()))
                .await?;
            ws.close().await
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, goodbye).await;
    }
    conn.close(Disconnect::new(3000, "closed"));
    session.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_with_newlines() {
        let mut q: VecDeque<Bytes> = ["{\"a\":1}", "{}", "{\"b\":2}"]
            .iter()
            .map(|s| Bytes::from_static(s.as_bytes()))
            .collect();
        assert_eq!(&batch(&mut q).unwrap()[..], b"{\"a\":1}\n{}\n{\"b\":2}");
        assert!(batch(&mut q).is_none());
    }
}
