//! The listener: routes client transports, the server API and health on one address, and
//! stops gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herald_core::Node;
use herald_core::engine::memory::MemoryEngine;
use tokio::sync::{Notify, watch};

use crate::config::{Config, EngineKind};

/// Counts live connections so shutdown can wait for them.
#[derive(Default)]
pub struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

pub struct TrackGuard(Arc<Tracker>);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tracker {
    pub fn enter(self: &Arc<Self>) -> TrackGuard {
        self.live.fetch_add(1, Ordering::AcqRel);
        TrackGuard(self.clone())
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub config: Arc<Config>,
    pub tracker: Arc<Tracker>,
}

/// A running node (for the binary and for tests).
pub struct Server {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Stops accepting, disconnects every client with 3001, waits for them (bounded).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

pub fn build_node(config: &Config) -> Arc<Node> {
    match config.engine.kind {
        EngineKind::Memory => {
            Node::new(config.node_config(), |hub| Arc::new(MemoryEngine::new(hub)))
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/connection/websocket", get(websocket))
        .route("/api/{method}", post(crate::api::handle))
        .route("/health", get(health))
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Response {
    if state.node.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "{\"status\":\"draining\"}").into_response();
    }
    (StatusCode::OK, "{}").into_response()
}

async fn websocket(State(state): State<AppState>, ws: yawc::IncomingUpgrade) -> Response {
    if state.node.is_draining() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let opts = yawc::Options::default()
        .with_max_payload_read(state.node.client.max_message_size)
        .with_max_read_buffer(state.node.client.max_message_size)
        .with_read_buffer_capacity(4096)
        .with_write_buffer_capacity(4096)
        .with_utf8()
        .with_no_delay();
    match ws.upgrade(opts) {
        Ok((response, upgrade)) => {
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(socket) => crate::ws::serve(state, socket).await,
                    Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
                }
            });
            response.map(axum::body::Body::new)
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// Binds and serves. `listen` "host:0" picks a free port; see `Server::addr`.
pub async fn start(config: Config) -> anyhow::Result<Server> {
    let addr = config.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("server.listen {addr}: {e}"))?;
    let addr = listener.local_addr()?;
    let node = build_node(&config);
    let shutdown_timeout = config.server.shutdown_timeout;
    let state = AppState {
        node: node.clone(),
        config: Arc::new(config),
        tracker: Arc::new(Tracker::default()),
    };
    let tracker = state.tracker.clone();
    let app = router(state);
    let (stop, mut stopped) = watch::channel(false);
    let stop_node = node.clone();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
            stop_node.shutdown();
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "listener failed");
        }
        // Upgraded connections outlive the HTTP server: wait for them to close.
        if tokio::time::timeout(shutdown_timeout, tracker.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                left = tracker.live(),
                "shutdown timeout: connections left open"
            );
        }
    });
    Ok(Server {
        addr,
        node,
        stop,
        task,
    })
}

/// Waits for SIGTERM or SIGINT.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Kept for callers that want the default drain bound.
pub const DEFAULT_SHUTDOWN: Duration = Duration::from_secs(10);
