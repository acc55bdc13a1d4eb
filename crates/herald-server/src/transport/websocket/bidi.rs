//! `GET /connection/websocket`: the full client protocol, several messages per frame.

use axum::extract::State;
use axum::response::Response;
use herald_core::conn::Mode;

use super::{Framing, WsWire, upgrade};
use crate::state::AppState;
use crate::transport::connection;

pub async fn handle(State(state): State<AppState>, ws: yawc::IncomingUpgrade) -> Response {
    let max = state.node.client.max_message_size;
    upgrade(&state.clone(), ws, max, move |socket| async move {
        let (conn, session) = connection(&state, Mode::Bidirectional);
        let transport = state.node.metrics.transport("websocket");
        crate::transport::driver::drive(
            conn,
            session,
            WsWire::new(socket, Framing::Batched),
            None,
            transport,
            state.node.metrics.clone(),
        )
        .await;
    })
}
