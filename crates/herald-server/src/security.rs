//! The checks every request passes before a route sees it, and the config checks of the
//! security settings. See docs/security.md for the whole model.
//!
//! - A request to open a client connection (`/connection/…`) from a browser whose `Origin`
//!   is not in `client.allowed_origins` gets 403; one without `Origin` (not a browser) passes.
//! - At `client.max_connections` open client connections, a new one gets 503.
//! - With `api.listen` set, `/api/…` exists only on that listener.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::Config;
use crate::server::AppState;

/// Whether a request from `origin` may open a client connection. Patterns are globs (`*`
/// matches any run of characters), compared without regard to ASCII case. An empty list
/// allows every origin.
pub fn origin_allowed(patterns: &[String], origin: &str) -> bool {
    if patterns.is_empty() {
        return true;
    }
    let origin = origin.trim().to_ascii_lowercase();
    patterns
        .iter()
        .any(|p| herald_core::node::glob_match(&p.trim().to_ascii_lowercase(), &origin))
}

/// The `Origin` check on a request's headers: no header (not a browser) passes; a header
/// that is not text fails.
pub fn origin_ok(patterns: &[String], headers: &HeaderMap) -> bool {
    match headers.get(header::ORIGIN) {
        None => true,
        Some(v) => v.to_str().is_ok_and(|o| origin_allowed(patterns, o)),
    }
}

/// Axum middleware for the main listener: origin and connection-count checks on the client
/// transports, and `/api` hidden when it has a listener of its own.
pub async fn gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path.starts_with("/api/") && !state.config.api.listen.is_empty() {
        return StatusCode::NOT_FOUND.into_response();
    }
    if path.starts_with("/connection/") {
        let client = &state.node.client;
        if !origin_ok(&client.allowed_origins, req.headers()) {
            state.node.metrics.refused("origin");
            tracing::debug!(
                origin = ?req.headers().get(header::ORIGIN),
                "connection refused: origin not allowed"
            );
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
        if client.max_connections > 0 && state.tracker.live() >= client.max_connections {
            state.node.metrics.refused("max_connections");
            return (StatusCode::SERVICE_UNAVAILABLE, "connection limit reached").into_response();
        }
    }
    next.run(req).await
}

/// Checks the security settings; the message names the key at fault.
pub fn validate(config: &Config) -> Result<(), String> {
    crate::tls::check_files(&config.server.tls_cert, &config.server.tls_key)?;
    let c = &config.client;
    let keys = herald_core::auth::TokenKeys::from_options(c)?;
    herald_core::auth::TokenVerifier::with_keys(&keys)?;
    if !keys.jwks_url.is_empty() {
        crate::jwks::Endpoint::parse(&keys.jwks_url)
            .map_err(|e| format!("client.token_jwks_public_endpoint: {e}"))?;
        if c.token_jwks_refresh_interval.is_zero() {
            return Err("client.token_jwks_refresh_interval: must be above 0".into());
        }
    }
    for p in &c.allowed_origins {
        if p.trim().is_empty() {
            return Err("client.allowed_origins: an empty pattern matches nothing".into());
        }
    }
    if c.command_burst > 0 && c.command_rate == 0 {
        return Err("client.command_burst: needs client.command_rate".into());
    }
    if config.server.handshake_timeout.is_zero() {
        return Err("server.handshake_timeout: must be above 0".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let p = vec![
            "https://app.example.com".to_string(),
            "https://*.example.org".to_string(),
            "http://localhost:*".to_string(),
        ];
        assert!(origin_allowed(&p, "https://app.example.com"));
        assert!(origin_allowed(&p, "HTTPS://APP.EXAMPLE.COM"));
        assert!(origin_allowed(&p, "https://a.b.example.org"));
        assert!(origin_allowed(&p, "http://localhost:3000"));
        assert!(!origin_allowed(&p, "https://evil.com"));
        assert!(!origin_allowed(&p, "https://app.example.com.evil.com"));
        assert!(!origin_allowed(&p, "http://app.example.com"));
        assert!(!origin_allowed(&p, "null"));
        assert!(origin_allowed(&[], "https://anything"));
        assert!(origin_allowed(&["*".to_string()], "null"));
    }
}
