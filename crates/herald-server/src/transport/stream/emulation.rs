//! `POST /emulation`: the client → server half of the HTTP-streaming and SSE transports.
//!
//! A body is `{"node", "session", "data"}`: `data` holds the client's commands (a JSON string
//! of `\n`-separated commands, as centrifuge-js sends it), `session` names the stream they
//! belong to and `node` the node that holds it. With `Content-Type: application/octet-stream`
//! the body is the Protobuf `EmulationRequest` of the same three fields, `data` holding
//! length-prefixed Protobuf commands (the Protobuf HTTP stream). The commands are handed to the stream's
//! session as `Control::Commands`, which handles them as if read from the connection; the
//! replies go down the stream.
//!
//! `session` is a random token given only to the stream's own client in its connect reply,
//! not the client id: client ids are visible to other users (presence, join/leave), and
//! knowing one must not let anybody send commands in that client's name.
//!
//! Answers: 204 delivered (or the session is gone: its stream has ended, and the client
//! reconnects from there), 400 malformed, 404 the session is on a node this one cannot reach,
//! 413 too large, 429 the session has too many commands waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use herald_core::conn::{ConnHandle, Control};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::state::AppState;

/// One stream reachable through `/emulation`.
struct Route {
    node: String,
    conn: Weak<ConnHandle>,
    /// Bytes of commands handed to the session and not yet handled by it.
    queued: AtomicUsize,
}

/// Session token → stream, for every node in the process. Tokens are random, so nodes that
/// share a process (tests) never see each other's entries.
static ROUTES: LazyLock<Mutex<HashMap<String, Arc<Route>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn routes() -> MutexGuard<'static, HashMap<String, Arc<Route>>> {
    // Nothing panics while holding the lock; recover the map if something ever did.
    ROUTES.lock().unwrap_or_else(|e| e.into_inner())
}

/// A stream's entry in the routing table; removed when dropped (the stream ended).
pub(crate) struct Registration {
    token: String,
    route: Arc<Route>,
}

/// Makes `conn` reachable through `/emulation` under a fresh random token.
pub(crate) fn register(node: &str, conn: &Arc<ConnHandle>) -> Registration {
    // Two ids' worth of randomness (256 bits), in the same alphabet as client ids.
    let token = format!(
        "{}{}",
        herald_core::node::new_id(),
        herald_core::node::new_id()
    )
    .replace('-', "");
    let route = Arc::new(Route {
        node: node.to_string(),
        conn: Arc::downgrade(conn),
        queued: AtomicUsize::new(0),
    });
    routes().insert(token.clone(), route.clone());
    Registration { token, route }
}

impl Registration {
    /// The session handled `n` bytes of commands that came through `/emulation`.
    pub(crate) fn handled(&self, n: usize) {
        let _ = self
            .route
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            });
    }

    /// Puts this stream's token in the connect reply's `session` field, where the session
    /// wrote the client id. Replies other than a successful connect pass unchanged.
    /// What the connect reply names as the session: the route's token.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        routes().remove(&self.token);
    }
}

#[derive(Deserialize)]
struct EmulationRequest {
    #[serde(default)]
    node: String,
    #[serde(default)]
    session: String,
    data: Box<RawValue>,
}

/// Why commands could not be delivered.
#[derive(Debug, PartialEq, Eq)]
pub enum EmulationError {
    /// The session lives on another node and this node cannot reach it.
    NodeUnreachable(String),
    /// The session already has `client.max_queue_bytes` of commands waiting.
    TooManyQueued,
}

impl IntoResponse for EmulationError {
    fn into_response(self) -> Response {
        match self {
            EmulationError::NodeUnreachable(node) => (
                StatusCode::NOT_FOUND,
                format!(
                    "session is on node {node:?}, which this node cannot reach: \
                     commands must be sent to the node that holds the stream\n"
                ),
            )
                .into_response(),
            EmulationError::TooManyQueued => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many commands waiting for this session\n",
            )
                .into_response(),
        }
    }
}

/// `POST /emulation`.
pub async fn handle(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let limit = state.node.client.max_message_size;
    // The commands arrive as an escaped JSON string: allow for the escaping.
    let body = match axum::body::to_bytes(body, limit.saturating_mul(2).saturating_add(1024)).await
    {
        Ok(b) => b,
        Err(_) => return StatusCode::PAYLOAD_TOO_LARGE.into_response(),
    };
    let binary = super::is_binary(&headers);
    let parsed = if binary {
        protobuf_request(&body)
    } else {
        json_request(&body)
    };
    let (node, session, data) = match parsed {
        Ok(r) => r,
        Err(what) => return (StatusCode::BAD_REQUEST, what).into_response(),
    };
    if data.len() > limit {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    let delivered = if node == state.node.id {
        deliver_local(
            &state.node.id,
            &session,
            data,
            state.node.client.max_queue_bytes,
        )
    } else {
        deliver_remote(&state, &node, &session, data, binary).await
    };
    match delivered {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

/// (node, session, commands) of a JSON request.
fn json_request(body: &[u8]) -> Result<(String, String, Bytes), &'static str> {
    let req: EmulationRequest =
        serde_json::from_slice(body).map_err(|_| "malformed emulation request\n")?;
    // centrifuge-js sends the commands as one JSON string; a raw JSON command is accepted too.
    let data = match req.data.get().as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(req.data.get())
            .map(Bytes::from)
            .map_err(|_| "malformed emulation data\n")?,
        _ => Bytes::copy_from_slice(req.data.get().as_bytes()),
    };
    Ok((req.node, req.session, data))
}

/// (node, session, commands) of a Protobuf request.
fn protobuf_request(body: &[u8]) -> Result<(String, String, Bytes), &'static str> {
    let req = herald_protocol::proto::decode_emulation_request(body)
        .map_err(|_| "malformed protobuf emulation request\n")?;
    Ok((req.node, req.session, Bytes::from(req.data)))
}

/// Hands commands to a session on this node. A session that is gone is not an error: its
/// stream has ended (or is ending) and the client learns it there.
pub fn deliver_local(
    node: &str,
    session: &str,
    data: Bytes,
    max_queued: usize,
) -> Result<(), EmulationError> {
    let route = routes().get(session).cloned();
    let Some(route) = route.filter(|r| r.node == node) else {
        return Ok(());
    };
    let Some(conn) = route.conn.upgrade() else {
        return Ok(());
    };
    let n = data.len();
    let queued = route.queued.fetch_add(n, Ordering::AcqRel) + n;
    if queued > max_queued {
        route.queued.fetch_sub(n, Ordering::AcqRel);
        return Err(EmulationError::TooManyQueued);
    }
    conn.control(Control::Commands(data));
    Ok(())
}

/// Delivers commands for a session held by another node of the cluster: through the
/// engine's control channel to `node`, whose sink (see `install_sink`) calls
/// `deliver_local`. A node that is not a live peer cannot be reached.
pub async fn deliver_remote(
    state: &AppState,
    node: &str,
    session: &str,
    data: Bytes,
    binary: bool,
) -> Result<(), EmulationError> {
    let unreachable = || EmulationError::NodeUnreachable(node.to_string());
    if !state.node.engine.peers().iter().any(|p| p.uid == node) {
        return Err(unreachable());
    }
    // The control channel carries text: Protobuf commands travel as base64.
    let data = if binary {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&data)
    } else {
        String::from_utf8(data.to_vec()).map_err(|_| unreachable())?
    };
    state
        .node
        .control(herald_core::engine::ControlCommand::Emulation {
            node: node.to_string(),
            session: session.to_string(),
            data,
            binary,
        })
        .await
        .map_err(|_| unreachable())
}

/// Makes this node take `/emulation` commands that other nodes route to it.
pub fn install_sink(node: &Arc<herald_core::Node>) {
    let own = node.id.clone();
    let max_queued = node.client.max_queue_bytes;
    node.hub
        .set_emulation_sink(Box::new(move |target, session, data| {
            // Every node hears the control channel; only the addressed one delivers.
            if target == own {
                let _ = deliver_local(&own, session, data, max_queued);
            }
        }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_delivery_by_token_only() {
        let conn = Arc::new(ConnHandle::new(Arc::from("c-2"), 1 << 20));
        let reg = register("n", &conn);
        // The client id is not a session token; neither is the right token on another node.
        deliver_local("n", "c-2", Bytes::from_static(b"{}"), 100).unwrap();
        deliver_local("m", &reg.token, Bytes::from_static(b"{}"), 100).unwrap();
        assert!(conn.drain().controls.is_empty());
        deliver_local("n", &reg.token, Bytes::from_static(b"{}"), 100).unwrap();
        assert_eq!(conn.drain().controls.len(), 1);
        // Bounded: commands not yet handled count against the limit.
        let big = Bytes::from(vec![b' '; 99]);
        assert_eq!(
            deliver_local("n", &reg.token, big.clone(), 100),
            Err(EmulationError::TooManyQueued)
        );
        reg.handled(2);
        deliver_local("n", &reg.token, big, 100).unwrap();
        let token = reg.token.clone();
        drop(reg);
        assert!(routes().get(&token).is_none());
    }
}
