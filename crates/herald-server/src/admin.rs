//! The admin page: a small web page served by the node (`/admin/`, no build step, nothing
//! fetched from elsewhere) showing live figures, with forms to publish to a channel, read a
//! channel's history and drain the node.
//!
//! Off unless `admin.password` is set. Logging in (`POST /admin/api/login`) returns a session
//! token, also set as an `HttpOnly`, `SameSite=Strict` cookie; the JSON endpoints accept the
//! cookie or `Authorization: Bearer <token>`.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use herald_protocol::json::Raw;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::Config;
use crate::state::{AppState, SESSION_TTL};
pub use crate::state::{Sessions, constant_time_eq};

const PAGE: &str = include_str!("admin.html");
const COOKIE: &str = "herald_admin";
/// Channels listed under "top channels".
const TOP_CHANNELS: usize = 10;

/// The admin routes, or none when `admin.password` is empty.
pub fn routes(config: &Config) -> Router<AppState> {
    if config.admin.password.is_empty() {
        return Router::new();
    }
    Router::new()
        .route("/admin", get(|| async { Redirect::permanent("/admin/") }))
        .route("/admin/", get(page))
        .route("/admin/api/login", post(login))
        .route("/admin/api/logout", post(logout))
        .route("/admin/api/stats", get(stats))
        .route("/admin/api/publish", post(publish))
        .route("/admin/api/history", post(history))
        .route("/admin/api/drain", post(drain))
}

async fn page() -> Response {
    let mut r = PAGE.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

fn token_from(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// None when the request carries a valid session; else the 401 to answer.
fn refused(state: &AppState, headers: &HeaderMap) -> Option<Response> {
    match token_from(headers) {
        Some(t) if state.ops.admin.valid(&t) => None,
        _ => Some(error(StatusCode::UNAUTHORIZED, "log in first")),
    }
}

fn error(code: StatusCode, message: &str) -> Response {
    (code, axum::Json(json!({ "error": message }))).into_response()
}

#[derive(Deserialize)]
struct Login {
    password: String,
}

async fn login(State(state): State<AppState>, axum::Json(req): axum::Json<Login>) -> Response {
    let expected = state.config.admin.password.as_bytes();
    if !constant_time_eq(req.password.as_bytes(), expected) {
        // Slows guessing down a little; a wrong password is never logged.
        tokio::time::sleep(Duration::from_millis(250)).await;
        tracing::warn!("admin login refused: wrong password");
        return error(StatusCode::UNAUTHORIZED, "wrong password");
    }
    let token = state.ops.admin.create();
    tracing::info!("admin login");
    let cookie = format!(
        "{COOKIE}={token}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    let mut r = axum::Json(json!({ "token": token })).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(t) = token_from(&headers) {
        state.ops.admin.remove(&t);
    }
    let mut r = axum::Json(json!({})).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "herald_admin=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn stats(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = refused(&state, &headers) {
        return r;
    }
    let node = &state.node;
    let hub = node.hub.stats();
    let (mut channels, channels_error) = match node.channels("").await {
        Ok(c) => (c, None),
        Err(e) => (node.hub.channels(), Some(e.to_string())),
    };
    channels.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    channels.truncate(TOP_CHANNELS);
    let top: Vec<Value> = channels
        .into_iter()
        .map(|(c, n)| json!({ "channel": c, "subscribers": n }))
        .collect();
    let process = herald_core::metrics::process_stats();
    axum::Json(json!({
        "node": node.info(),
        "nodes": node.cluster_info(),
        "clients": hub.clients,
        "users": hub.users,
        "subscriptions": hub.subscriptions,
        "channels": hub.channels,
        "connections": state.tracker.live(),
        "totals": node.metrics.totals(),
        "time_ms": now_ms(),
        "top_channels": top,
        "channels_error": channels_error,
        "draining": node.is_draining(),
        "engine": { "name": node.engine.name(), "healthy": node.engine.healthy() },
        "process": { "resident_bytes": process.resident_bytes, "open_fds": process.open_fds },
    }))
    .into_response()
}

#[derive(Deserialize)]
struct PublishForm {
    channel: String,
    data: Raw,
}

async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Json(req): axum::Json<PublishForm>,
) -> Response {
    if let Some(r) = refused(&state, &headers) {
        return r;
    }
    match state
        .node
        .publish(
            &req.channel,
            req.data,
            None,
            Default::default(),
            false,
            None,
        )
        .await
    {
        Ok(p) => axum::Json(json!({ "result": { "offset": p.offset, "epoch": p.epoch } })),
        Err(e) => axum::Json(json!({ "error": e })),
    }
    .into_response()
}

#[derive(Deserialize)]
struct HistoryForm {
    channel: String,
    #[serde(default)]
    limit: i32,
}

async fn history(
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Json(req): axum::Json<HistoryForm>,
) -> Response {
    if let Some(r) = refused(&state, &headers) {
        return r;
    }
    // Newest first: an operator looks at what happened last.
    match state
        .node
        .history(&req.channel, req.limit, None, true)
        .await
    {
        Ok(h) => axum::Json(json!({ "result": {
            "publications": h.publications,
            "epoch": h.position.epoch,
            "offset": h.position.offset,
        }})),
        Err(e) => axum::Json(json!({ "error": e })),
    }
    .into_response()
}

async fn drain(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = refused(&state, &headers) {
        return r;
    }
    if state.ops.drain() {
        tracing::info!("drain requested from the admin page");
    }
    axum::Json(json!({ "draining": true })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn token_from_cookie_or_bearer() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; herald_admin=abc; b=2"),
        );
        assert_eq!(token_from(&h).as_deref(), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer xyz"),
        );
        assert_eq!(token_from(&h).as_deref(), Some("xyz"));
    }

    #[test]
    fn sessions_expire_and_log_out() {
        let s = Sessions::default();
        let t = s.create();
        assert!(s.valid(&t));
        assert!(!s.valid("nope"));
        s.remove(&t);
        assert!(!s.valid(&t));
    }
}
