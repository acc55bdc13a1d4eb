//! `/connection/echo`: sends back every message it receives, for WebSocket conformance suites
//! (Autobahn). It runs on the same stack as the client endpoints — same listener, upgrade,
//! framing ([`WsWire`] on Herald's socket) and connection driver — with an echo in place of the session. It
//! exists only with `server.websocket_echo = true`; otherwise it answers 404.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use herald_core::clock::Now;
use herald_core::conn::{ConnHandle, Control};
use herald_protocol::Disconnect;

use super::{Framing, WsUpgrade, WsWire, upgrade};
use crate::state::AppState;
use crate::transport::driver::{self, Handler};

/// Largest message the echo endpoint takes: the conformance suite sends up to 16 MiB.
const ECHO_MAX_MESSAGE: usize = 32 << 20;

/// Echoes each message through the connection's outbox, like any reply.
struct Echo {
    conn: Arc<ConnHandle>,
}

impl Handler for Echo {
    async fn on_message(&mut self, data: Bytes, _now: Now) -> Result<(), Disconnect> {
        self.conn.send(data);
        Ok(())
    }
    async fn on_control(&mut self, _c: Control, _now: Now) -> Result<(), Disconnect> {
        Ok(())
    }
    async fn tick(&mut self, now: Now) -> Result<Instant, Disconnect> {
        Ok(self.next_wakeup(now))
    }
    fn next_wakeup(&self, now: Now) -> Instant {
        // No timers: far enough that it never fires during a test case.
        now.mono + std::time::Duration::from_secs(24 * 3600)
    }
    fn goodbye(&self, _d: &Disconnect) -> Bytes {
        Bytes::new()
    }
    async fn close(&mut self) {}
}

pub async fn handle(State(state): State<AppState>, ws: WsUpgrade) -> Response {
    if !state.config.server.websocket_echo {
        return StatusCode::NOT_FOUND.into_response();
    }
    let max = ECHO_MAX_MESSAGE.max(state.node.client.max_message_size);
    upgrade(&state.clone(), ws, max, None, move |socket| async move {
        let conn = Arc::new(ConnHandle::new(
            Arc::from(herald_core::node::new_id()),
            // Room for a few of the largest messages in flight.
            max.saturating_mul(4),
        ));
        let echo = Echo { conn: conn.clone() };
        driver::drive(
            conn,
            echo,
            WsWire::new(socket, Framing::Echo(Default::default())),
            None,
            state.node.metrics.transport("echo"),
            state.node.clone(),
            Default::default(),
        )
        .await;
    })
}
