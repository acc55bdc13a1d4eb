//! Operating a node: liveness (`/health`), readiness (`/ready`), Prometheus metrics
//! (`/metrics`), the drain switch, and the router serving them with the admin page — on the
//! client listener, or on `admin.listen` to keep them off the public port.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use herald_core::metrics::{self, Metrics};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::Config;
use crate::state::AppState;

pub use crate::state::{Ops, Phase};

/// A Prometheus recorder of its own for one node (several nodes in one process, as in tests,
/// never mix their figures) and the node's handles registered in it.
pub fn new_metrics() -> (Arc<Metrics>, PrometheusHandle) {
    let builder = PrometheusBuilder::new();
    let builder = match builder.set_buckets_for_metric(
        Matcher::Full(metrics::DELIVERY_LATENCY.to_string()),
        metrics::LATENCY_BUCKETS,
    ) {
        Ok(b) => b,
        // Only fails for an empty bucket list; the list is a non-empty constant.
        Err(_) => PrometheusBuilder::new(),
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    (Arc::new(Metrics::new(Arc::new(recorder))), handle)
}

/// `/health`, `/ready`, `/metrics` and, when `admin.password` is set, `/admin/`.
pub fn routes(config: &Config) -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .merge(crate::admin::routes(config))
}

/// Liveness: the process answers. Stays 200 while draining (restarting a draining node would
/// cut its drain short).
/// Liveness: 200 while the process serves; the body also tells whether the engine is up,
/// so an operator sees an engine outage here too (readiness is what turns 503).
async fn health(State(state): State<AppState>) -> Response {
    let engine = if state.node.engine.healthy() {
        "up"
    } else {
        "down"
    };
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "status": "ok", "engine": engine })),
    )
        .into_response()
}

/// Readiness: the engine can serve and the node is not draining; else 503.
async fn ready(State(state): State<AppState>) -> Response {
    if state.node.is_draining() {
        return json_status(StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
    if !state.node.engine.healthy() {
        return json_status(StatusCode::SERVICE_UNAVAILABLE, "engine unavailable");
    }
    json_status(StatusCode::OK, "ready")
}

fn json_status(code: StatusCode, status: &str) -> Response {
    (code, axum::Json(serde_json::json!({ "status": status }))).into_response()
}

/// Prometheus text format.
async fn render_metrics(State(state): State<AppState>) -> Response {
    state.node.metrics.refresh(&state.node);
    let body = state.ops.prometheus.render();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_starts_once_and_hurries() {
        let (_, handle) = new_metrics();
        let ops = Ops::new(handle);
        assert_eq!(ops.phase(), Phase::Serving);
        assert!(ops.drain());
        assert!(!ops.drain());
        assert_eq!(ops.phase(), Phase::Draining);
        ops.hurry();
        assert_eq!(ops.phase(), Phase::Hurry);
        assert!(!ops.drain());
    }

    #[test]
    fn registered_metrics_render() {
        let (m, handle) = new_metrics();
        m.connected();
        m.disconnected(3008);
        let text = handle.render();
        for name in [
            metrics::CONNECTS,
            metrics::DISCONNECTS,
            metrics::SLOW_CONSUMERS,
            metrics::COMMANDS,
            metrics::ENGINE_OPS,
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains("herald_client_disconnects_total{code=\"3008\"} 1"));
    }
}
