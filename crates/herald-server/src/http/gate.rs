//! The checks every request passes before a route sees it (the config checks of the security
//! settings are in `config`). See docs/security.md for the whole model.
//!
//! - A request to open a client connection (`/connection/…`) from a browser whose `Origin`
//!   is not in `client.allowed_origins` gets 403; one without `Origin` (not a browser) passes.
//! - At `client.max_connections` open client connections, a new one gets 503.
//! - With `api.listen` set, `/api/…` exists only on that listener.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

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

/// With cookie authentication (the connect proxy forwards `Cookie`) and no
/// `allowed_origins`, a browser may connect only from the server's own origin: any page
/// could otherwise open a connection that the browser authenticates with the user's cookie
/// (cross-site WebSocket hijacking). The `Origin`'s host must equal the `Host` header.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// Whether cookies authenticate connections (the connect proxy forwards `Cookie`).
pub fn cookie_auth(client: &herald_core::options::ClientOptions) -> bool {
    let c = &client.proxy.connect;
    c.enabled && c.forwards("cookie")
}

/// Picks, from a `Sec-WebSocket-Extensions` value, the first permessage-deflate offer this
/// server can honour, written in the one-offer form the WebSocket library parses; None when
/// no offer fits (compression is then declined, as RFC 7692 allows). An offer with an
/// unknown or repeated parameter, or a server window under 9 bits, does not fit.
pub fn pick_deflate_offer(header: &str) -> Option<String> {
    'offers: for offer in header.split(',') {
        let mut parts = offer.split(';').map(str::trim);
        if !parts
            .next()
            .is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate"))
        {
            continue;
        }
        let mut seen: Vec<&str> = Vec::new();
        let mut out = String::from("permessage-deflate");
        for param in parts {
            if param.is_empty() {
                continue 'offers;
            }
            let (key, value) = match param.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"'))),
                None => (param, None),
            };
            if seen.contains(&key) {
                continue 'offers;
            }
            seen.push(key);
            let bits = |v: Option<&str>| v.map(|v| v.parse::<u8>().ok());
            match (key, bits(value)) {
                ("server_no_context_takeover" | "client_no_context_takeover", None) => {
                    out.push_str("; ");
                    out.push_str(key);
                }
                ("server_max_window_bits", Some(Some(n))) if (9..=15).contains(&n) => {
                    out.push_str(&format!("; server_max_window_bits={n}"));
                }
                ("client_max_window_bits", None) => out.push_str("; client_max_window_bits"),
                ("client_max_window_bits", Some(Some(n))) if (8..=15).contains(&n) => {
                    out.push_str(&format!("; client_max_window_bits={n}"));
                }
                _ => continue 'offers,
            }
        }
        return Some(out);
    }
    None
}

/// Whether a request to open a client connection passes the origin check (counted and
/// logged when it does not).
pub fn connection_origin_ok(state: &AppState, headers: &HeaderMap) -> bool {
    let client = &state.node.client;
    let allowed = if client.allowed_origins.is_empty() && cookie_auth(client) {
        same_origin(headers)
    } else {
        origin_ok(&client.allowed_origins, headers)
    };
    if !allowed {
        state.node.metrics.refused("origin");
        tracing::debug!(
            origin = ?headers.get(header::ORIGIN),
            "connection refused: origin not allowed"
        );
    }
    allowed
}

/// Whether the node holds `client.max_connections` already (counted when it does).
pub fn at_capacity(state: &AppState) -> bool {
    let max = state.node.client.max_connections;
    let full = max > 0 && state.tracker.live() >= max;
    if full {
        state.node.metrics.refused("max_connections");
    }
    full
}

/// Axum middleware for the main listener: origin and connection-count checks on the client
/// transports, and `/api` hidden when it has a listener of its own. A WebSocket upgrade's
/// list of permessage-deflate offers is narrowed to the first one Herald can accept.
pub async fn gate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if let Some(v) = req.headers().get(header::SEC_WEBSOCKET_EXTENSIONS) {
        let picked = v.to_str().ok().and_then(pick_deflate_offer);
        let headers = req.headers_mut();
        match picked.and_then(|p| axum::http::HeaderValue::from_str(&p).ok()) {
            Some(p) => {
                headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, p);
            }
            None => {
                headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
            }
        }
    }
    let path = req.uri().path();
    if path.starts_with("/api/") && !state.config.api.listen.is_empty() {
        return StatusCode::NOT_FOUND.into_response();
    }
    // The node list is public and the way out of a full node: no origin or capacity check.
    if path.starts_with("/connection/") && path != "/connection/nodes" {
        if !connection_origin_ok(&state, req.headers()) {
            return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
        }
        if at_capacity(&state) {
            return (StatusCode::SERVICE_UNAVAILABLE, "connection limit reached").into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_compares_origin_host_with_host() {
        let h = |origin: Option<&str>, host: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::HOST, host.parse().unwrap());
            if let Some(o) = origin {
                m.insert(header::ORIGIN, o.parse().unwrap());
            }
            m
        };
        assert!(same_origin(&h(
            Some("http://app.test:8000"),
            "app.test:8000"
        )));
        assert!(same_origin(&h(Some("https://APP.test"), "app.test")));
        assert!(same_origin(&h(None, "app.test")));
        assert!(!same_origin(&h(
            Some("http://evil.test:8000"),
            "app.test:8000"
        )));
        assert!(!same_origin(&h(
            Some("http://app.test:9000"),
            "app.test:8000"
        )));
        assert!(!same_origin(&h(Some("null"), "app.test")));
    }

    #[test]
    fn deflate_offers() {
        let multi = "permessage-deflate; client_no_context_takeover; client_max_window_bits; \
                     server_no_context_takeover; server_max_window_bits=8, permessage-deflate; \
                     client_no_context_takeover; client_max_window_bits; server_no_context_takeover, \
                     permessage-deflate";
        assert_eq!(
            pick_deflate_offer(multi).as_deref(),
            Some(
                "permessage-deflate; client_no_context_takeover; client_max_window_bits; server_no_context_takeover"
            )
        );
        assert_eq!(
            pick_deflate_offer(
                "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=\"10\""
            )
            .as_deref(),
            Some("permessage-deflate; server_max_window_bits=10")
        );
        assert_eq!(
            pick_deflate_offer("permessage-deflate; unknown_param"),
            None
        );
        assert_eq!(
            pick_deflate_offer(
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
            ),
            None
        );
        assert_eq!(
            pick_deflate_offer("permessage-deflate; server_max_window_bits"),
            None
        );
        assert_eq!(pick_deflate_offer("foo"), None);
        assert_eq!(
            pick_deflate_offer("PerMessage-Deflate").as_deref(),
            Some("permessage-deflate")
        );
    }

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
