//! Client transports: every one a thin [`driver::Wire`] over the one connection loop in
//! [`driver`], with the session (`herald_core::session`) as its handler.

pub mod driver;
pub mod stream;
pub mod websocket;

use std::sync::Arc;

use herald_core::conn::{Codec, ConnHandle, Mode};
use herald_core::session::Session;

use crate::state::AppState;

/// A new connection's outbox and session.
pub fn connection(state: &AppState, mode: Mode, codec: Codec) -> (Arc<ConnHandle>, Session) {
    let node = &state.node;
    let conn = Arc::new(
        ConnHandle::with_mode(
            Arc::from(herald_core::node::new_id()),
            node.client.max_queue_bytes,
            mode,
        )
        .with_codec(codec),
    );
    let session = Session::new(node.clone(), conn.clone(), std::time::Instant::now());
    (conn, session)
}
