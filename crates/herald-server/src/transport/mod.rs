//! Client transports: every one a thin [`driver::Wire`] over the one connection loop in
//! [`driver`], with the session (`herald_core::session`) as its handler.

pub mod driver;
pub mod stream;
pub mod websocket;

use std::sync::Arc;

use axum::http::HeaderMap;
use herald_core::conn::{Codec, ConnHandle, Mode};
use herald_core::session::Session;

use crate::state::AppState;

/// The request headers some proxy forwards to the backend (most connections keep none).
pub fn forwarded_headers(state: &AppState, headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| state.node.forwards_header(k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// A new connection's outbox and session. `transport` names it to proxies and metrics;
/// `headers` are the client's request headers that proxies forward.
pub fn connection(
    state: &AppState,
    mode: Mode,
    codec: Codec,
    transport: &'static str,
    headers: Vec<(String, String)>,
) -> (Arc<ConnHandle>, Session) {
    let node = &state.node;
    let conn = Arc::new(
        ConnHandle::with_mode(
            Arc::from(herald_core::node::new_id()),
            node.client.max_queue_bytes,
            mode,
        )
        .with_codec(codec),
    );
    let mut session = Session::new(node.clone(), conn.clone(), std::time::Instant::now());
    session.set_client_context(transport, headers);
    (conn, session)
}
