//! `GET /connection/uni_websocket`: the connect request comes as the first message (or in the
//! `cf_connect` query parameter), then the server sends bare pushes, one per text message.
//! Later client messages are read and ignored.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use herald_core::conn::{Codec, Mode};

use super::{Endpoint, Framing, WsUpgrade, serve_session};
use crate::http::Peer;
use crate::state::AppState;
use crate::transport::stream::ConnectQuery;

pub async fn handle(
    State(state): State<AppState>,
    peer: Peer,
    headers: axum::http::HeaderMap,
    Query(q): Query<ConnectQuery>,
    ws: WsUpgrade,
) -> Response {
    let early = match q.cf_connect() {
        Some(text) => {
            if herald_protocol::client::parse_uni_connect(text.as_bytes()).is_err() {
                return (StatusCode::BAD_REQUEST, "malformed connect request\n").into_response();
            }
            Some(Bytes::from(text.to_owned()))
        }
        None => None,
    };
    let endpoint = Endpoint {
        mode: Mode::Unidirectional,
        codec: Codec::Json,
        framing: Framing::PerMessage,
        transport: "uni_websocket",
        subprotocol: None,
        peer,
        headers: crate::transport::forwarded_headers(&state, &headers),
    };
    serve_session(state, ws, endpoint, early)
}
