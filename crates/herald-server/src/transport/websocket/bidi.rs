//! `GET /connection/websocket`: the full client protocol, several messages per frame, in
//! JSON (text frames) or Protobuf (binary frames). A client asks for Protobuf with the
//! subprotocol `centrifuge-protobuf` (what the official SDKs do) or the query parameter
//! `cf_protocol=protobuf` (or `format=protobuf`).

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use herald_core::conn::{Codec, Mode};
use serde::Deserialize;

use super::{Endpoint, Framing, PROTOBUF_SUBPROTOCOL, WsUpgrade, serve_session};
use crate::http::Peer;
use crate::state::AppState;

#[derive(Debug, Default, Deserialize)]
pub struct ProtocolQuery {
    cf_protocol: Option<String>,
    format: Option<String>,
}

/// The codec the client asked for, and the subprotocol to echo (only one it offered).
pub fn negotiate(headers: &HeaderMap, q: &ProtocolQuery) -> (Codec, Option<&'static str>) {
    if super::offers_subprotocol(headers, PROTOBUF_SUBPROTOCOL) {
        return (Codec::Protobuf, Some(PROTOBUF_SUBPROTOCOL));
    }
    let asked = [&q.cf_protocol, &q.format]
        .into_iter()
        .flatten()
        .any(|p| p == "protobuf");
    if asked {
        (Codec::Protobuf, None)
    } else {
        (Codec::Json, None)
    }
}

pub async fn handle(
    State(state): State<AppState>,
    peer: Peer,
    Query(q): Query<ProtocolQuery>,
    headers: HeaderMap,
    ws: WsUpgrade,
) -> Response {
    let (codec, subprotocol) = negotiate(&headers, &q);
    let endpoint = Endpoint {
        mode: Mode::Bidirectional,
        codec,
        framing: match codec {
            Codec::Json => Framing::Batched,
            Codec::Protobuf => Framing::Binary,
        },
        transport: "websocket",
        subprotocol,
        peer,
        headers: crate::transport::forwarded_headers(&state, &headers),
    };
    serve_session(state, ws, endpoint, None)
}
