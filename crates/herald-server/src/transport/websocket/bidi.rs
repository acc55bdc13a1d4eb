//! `GET /connection/websocket`: the full client protocol, several messages per frame.

use axum::extract::State;
use axum::response::Response;
use herald_core::conn::Mode;

use super::{Framing, serve_session};
use crate::state::AppState;

pub async fn handle(State(state): State<AppState>, ws: yawc::IncomingUpgrade) -> Response {
    serve_session(
        state,
        ws,
        Mode::Bidirectional,
        Framing::Batched,
        "websocket",
        None,
    )
}
