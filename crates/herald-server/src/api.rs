//! Server HTTP API: `POST /api/<method>` with a JSON body, key in `X-API-Key`.
//! Replies `{"result":{..}}` or `{"error":{"code","message"}}` with HTTP 200; 401 on a bad key.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use herald_core::engine::{ControlCommand, StreamPosition};
use herald_core::node::PublishData;
use herald_protocol::api::{self, ApiError};
use herald_protocol::json::Raw;
use herald_protocol::{Disconnect, ErrorCode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::state::AppState;

/// Compares in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let api = &state.config.api;
    if api.insecure {
        return true;
    }
    if api.key.is_empty() {
        return false;
    }
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("apikey ").map(|k| k.trim().to_string()))
        });
    given.is_some_and(|k| constant_time_eq(k.as_bytes(), api.key.as_bytes()))
}

pub async fn handle(
    State(state): State<AppState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let label = herald_core::metrics::api_method_label(&method);
    if !authorized(&state, &headers) {
        state.node.metrics.api_call(label, "unauthorized");
        return (
            StatusCode::UNAUTHORIZED,
            "{\"error\":{\"code\":101,\"message\":\"unauthorized\"}}",
        )
            .into_response();
    }
    if method == "batch" {
        // `batch` answers `{"replies":[..]}` at the top level, as Centrifugo does.
        let r = batch(&state, &body).await;
        state
            .node
            .metrics
            .api_call(label, if r.is_ok() { "ok" } else { "error" });
        return match r {
            Ok(v) => axum::Json(v).into_response(),
            Err(Failure::Api(e)) => axum::Json(json!({ "error": e })).into_response(),
            Err(Failure::NotFound) => StatusCode::NOT_FOUND.into_response(),
        };
    }
    let reply = match counted_call(&state, &method, &body).await {
        Ok(result) => json!({ "result": result }),
        Err(Failure::NotFound) => {
            return (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": ApiError::from(ErrorCode::METHOD_NOT_FOUND)})),
            )
                .into_response();
        }
        Err(Failure::Api(e)) => json!({ "error": e }),
    };
    axum::Json(reply).into_response()
}

enum Failure {
    NotFound,
    Api(ApiError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}
impl From<herald_protocol::ProtocolError> for Failure {
    fn from(e: herald_protocol::ProtocolError) -> Self {
        Failure::Api(e.into())
    }
}
impl From<ErrorCode> for Failure {
    fn from(e: ErrorCode) -> Self {
        Failure::Api(e.into())
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    let body = if body.iter().all(|b| b.is_ascii_whitespace()) {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        Failure::Api(ApiError {
            code: ErrorCode::BAD_REQUEST.code,
            message: format!("bad request: {e}"),
        })
    })
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, Failure> {
    serde_json::to_value(v).map_err(|_| Failure::from(ErrorCode::INTERNAL))
}

/// Publication data from `data` (JSON) or `b64data` (base64 of any bytes: JSON text is
/// published as that JSON, other bytes as binary data, which Protobuf subscribers receive
/// unchanged and JSON subscribers as a base64 string flagged `binary`).
fn payload(data: Option<Raw>, b64: Option<String>) -> Result<PublishData, Failure> {
    if let Some(d) = data {
        return Ok(d.into());
    }
    let b64 = b64.ok_or(ErrorCode::BAD_REQUEST)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| ErrorCode::BAD_REQUEST)?;
    Ok(PublishData::from_bytes(&bytes))
}

fn position(p: Option<herald_protocol::client::StreamPositionWire>) -> Option<StreamPosition> {
    p.map(|s| StreamPosition {
        offset: s.offset,
        epoch: s.epoch,
    })
}

async fn publish(state: &AppState, req: api::PublishRequest) -> Result<Value, Failure> {
    let data = payload(req.data, req.b64data)?;
    let pos = state
        .node
        .publish(
            &req.channel,
            data,
            None,
            req.tags,
            req.skip_history,
            Some(req.idempotency_key),
        )
        .await?;
    to_value(api::PublishResult {
        offset: pos.offset,
        epoch: pos.epoch,
    })
}

/// `call`, counted in `herald_api_calls_total` by method and result.
async fn counted_call(state: &AppState, method: &str, body: &[u8]) -> Result<Value, Failure> {
    let r = call(state, method, body).await;
    let result = match &r {
        Ok(_) => "ok",
        Err(Failure::NotFound) => "not_found",
        Err(Failure::Api(_)) => "error",
    };
    let label = herald_core::metrics::api_method_label(method);
    state.node.metrics.api_call(label, result);
    r
}

async fn call(state: &AppState, method: &str, body: &[u8]) -> Result<Value, Failure> {
    {
        let node = &state.node;
        match method {
            "publish" => publish(state, parse(body)?).await,
            "broadcast" => {
                let req: api::BroadcastRequest = parse(body)?;
                let data = payload(req.data, req.b64data)?;
                let mut responses = Vec::with_capacity(req.channels.len());
                for ch in &req.channels {
                    let r = node
                        .publish(
                            ch,
                            data.clone(),
                            None,
                            req.tags.clone(),
                            req.skip_history,
                            Some(req.idempotency_key.clone()),
                        )
                        .await;
                    responses.push(match r {
                        Ok(p) => json!({"result": api::PublishResult { offset: p.offset, epoch: p.epoch }}),
                        Err(e) => json!({"error": ApiError::from(e)}),
                    });
                }
                Ok(json!({ "responses": responses }))
            }
            "subscribe" => {
                let req: api::SubscribeRequest = parse(body)?;
                node.channel_options(&req.channel)?;
                if req.user.is_empty() {
                    return Err(ErrorCode::BAD_REQUEST.into());
                }
                node.control(ControlCommand::Subscribe {
                    user: req.user,
                    channel: req.channel,
                    client: req.client,
                    session: req.session,
                    info: req.info,
                    data: req.data,
                })
                .await?;
                Ok(json!({}))
            }
            "unsubscribe" => {
                let req: api::UnsubscribeRequest = parse(body)?;
                if req.user.is_empty() || req.channel.is_empty() {
                    return Err(ErrorCode::BAD_REQUEST.into());
                }
                node.control(ControlCommand::Unsubscribe {
                    user: req.user,
                    channel: req.channel,
                    client: req.client,
                    session: req.session,
                })
                .await?;
                Ok(json!({}))
            }
            "disconnect" => {
                let req: api::DisconnectRequest = parse(body)?;
                if req.user.is_empty() {
                    return Err(ErrorCode::BAD_REQUEST.into());
                }
                let d = match req.disconnect {
                    Some(d) if d.code > 0 => Disconnect::new(d.code, d.reason),
                    _ => Disconnect::FORCE_NO_RECONNECT.into(),
                };
                node.control(ControlCommand::Disconnect {
                    user: req.user,
                    client: req.client,
                    session: req.session,
                    whitelist: req.whitelist,
                    code: d.code,
                    reason: d.reason,
                })
                .await?;
                Ok(json!({}))
            }
            "refresh" => {
                let req: api::RefreshRequest = parse(body)?;
                if req.user.is_empty() {
                    return Err(ErrorCode::BAD_REQUEST.into());
                }
                let at = (req.expire_at > 0).then_some(req.expire_at);
                node.control(ControlCommand::Refresh {
                    user: req.user,
                    client: req.client,
                    session: req.session,
                    expire_at: at,
                    expired: req.expired,
                })
                .await?;
                Ok(json!({}))
            }
            "presence" => {
                let req: api::ChannelRequest = parse(body)?;
                let presence = node.presence(&req.channel).await?;
                to_value(api::PresenceResult { presence })
            }
            "presence_stats" => {
                let req: api::ChannelRequest = parse(body)?;
                let (num_clients, num_users) = node.presence_stats(&req.channel).await?;
                Ok(json!({"num_clients": num_clients, "num_users": num_users}))
            }
            "history" => {
                let req: api::HistoryRequest = parse(body)?;
                let h = node
                    .history(&req.channel, req.limit, position(req.since), req.reverse)
                    .await?;
                to_value(api::HistoryResult {
                    publications: h.publications,
                    epoch: h.position.epoch,
                    offset: h.position.offset,
                })
            }
            "history_remove" => {
                let req: api::ChannelRequest = parse(body)?;
                node.remove_history(&req.channel).await?;
                Ok(json!({}))
            }
            "channels" => {
                let req: api::ChannelsRequest = parse(body)?;
                let mut res = api::ChannelsResult::default();
                for (ch, n) in node.channels(&req.pattern).await? {
                    res.channels.insert(ch, api::ChannelInfo { num_clients: n });
                }
                to_value(res)
            }
            "info" => to_value(api::InfoResult {
                nodes: node.cluster_info(),
            }),
            // Herald's own: drain this node and stop (as on SIGTERM).
            "drain" => {
                if state.ops.drain() {
                    tracing::info!("drain requested through the server API");
                }
                Ok(json!({}))
            }
            _ => Err(Failure::NotFound),
        }
    }
}

/// Runs each `{method: params}` command in order; each reply is `{method: result}` or
/// `{"error": ..}`.
async fn batch(state: &AppState, body: &[u8]) -> Result<Value, Failure> {
    let req: BatchRequest = parse(body)?;
    let mut replies = Vec::with_capacity(req.commands.len());
    for cmd in req.commands {
        let one = match cmd {
            Value::Object(map) if map.len() == 1 => map.into_iter().next(),
            _ => None,
        };
        let Some((m, params)) = one.filter(|(m, _)| m != "batch") else {
            replies.push(json!({"error": ApiError::from(ErrorCode::BAD_REQUEST)}));
            continue;
        };
        let body = serde_json::to_vec(&params).unwrap_or_default();
        replies.push(match counted_call(state, &m, &body).await {
            Ok(r) => json!({ m: r }),
            Err(Failure::NotFound) => json!({"error": ApiError::from(ErrorCode::METHOD_NOT_FOUND)}),
            Err(Failure::Api(e)) => json!({ "error": e }),
        });
    }
    Ok(json!({ "replies": replies }))
}

#[derive(serde::Deserialize)]
struct BatchRequest {
    #[serde(default)]
    commands: Vec<Value>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"ab"));
    }
}
