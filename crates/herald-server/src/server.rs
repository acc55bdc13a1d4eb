//! The listener: routes client transports, the server API and health on one address, and
//! stops gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use herald_core::Node;
use herald_core::engine::memory::MemoryEngine;
use herald_core::metrics::Metrics;
use tokio::sync::watch;

use crate::config::{Config, EngineKind};
use crate::state::{AppState, Tracker};

pub struct Server {
    pub addr: SocketAddr,
    /// The operations listener (`admin.listen`), when configured apart from `addr`.
    pub admin_addr: Option<SocketAddr>,
    /// The server API listener (`api.listen`), when configured apart from `addr`.
    pub api_addr: Option<SocketAddr>,
    /// The MQTT listener (`mqtt.listen`), when MQTT is on.
    pub mqtt_addr: Option<SocketAddr>,
    /// Whether the listeners speak TLS (`server.tls_cert`).
    pub tls: bool,
    pub node: Arc<Node>,
    ops: Arc<crate::ops::Ops>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Drains (readiness fails, no new connections, clients disconnected with 3001 over
    /// `shutdown.drain_duration`), waits for connections to close (bounded by
    /// `server.shutdown_timeout`), and stops listening.
    pub async fn shutdown(self) {
        self.ops.drain();
        let _ = self.task.await;
    }

    /// The drain switch (also flipped by `POST /api/drain` and the admin page).
    pub fn ops(&self) -> Arc<crate::ops::Ops> {
        self.ops.clone()
    }

    /// Resolves once the node has been asked to drain, by whatever means.
    pub async fn drain_requested(&self) {
        let mut phase = self.ops.watch();
        let _ = phase.wait_for(|p| *p >= crate::ops::Phase::Draining).await;
    }

    /// Waits until the node has drained and stopped.
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

pub async fn build_node(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Node>> {
    Ok(match config.engine.kind {
        EngineKind::Memory => Node::with_metrics(config.node_config(), metrics, |hub| {
            Arc::new(MemoryEngine::new(hub))
        }),
        EngineKind::Redis => {
            let hub = Arc::new(herald_core::hub::Hub::with_metrics(metrics.clone()));
            let id = herald_core::node::new_id();
            let engine = herald_redis::RedisEngine::connect(
                config.engine.redis.clone(),
                id.clone(),
                hub.clone(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("engine.redis.url {}: {e}", config.engine.redis.url))?;
            let node = Node::assemble(config.node_config(), id, hub, Arc::new(engine), metrics);
            spawn_heartbeat(
                node.clone(),
                herald_redis::heartbeat_interval(&config.engine.redis),
            );
            node
        }
        EngineKind::Nats => {
            let hub = Arc::new(herald_core::hub::Hub::with_metrics(metrics.clone()));
            let id = herald_core::node::new_id();
            let cfg = &config.engine.nats;
            let engine = herald_nats::NatsEngine::connect(cfg.clone(), id.clone(), hub.clone())
                .await
                .map_err(|e| anyhow::anyhow!("engine.nats.servers {:?}: {e}", cfg.servers))?;
            let node = Node::assemble(config.node_config(), id, hub, Arc::new(engine), metrics);
            spawn_heartbeat(node.clone(), herald_nats::heartbeat_interval(cfg));
            node
        }
    })
}

/// Announces this node to the cluster until it stops.
fn spawn_heartbeat(node: Arc<Node>, every: std::time::Duration) {
    let weak = Arc::downgrade(&node);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(node) = weak.upgrade() else { return };
            if let Err(e) = node.engine.heartbeat(node.info()).await {
                tracing::debug!(error = %e, "heartbeat failed");
            }
        }
    });
}

pub fn router(state: AppState) -> Router {
    // Health, readiness, metrics and the admin page: here unless `admin.listen` moves them.
    let ops = if state.config.admin.listen.is_empty() {
        crate::ops::routes(&state.config)
    } else {
        Router::new()
    };
    let mqtt = if !state.config.mqtt.listen.is_empty() && state.config.mqtt.websocket {
        Router::new().route("/mqtt", get(crate::mqtt::websocket))
    } else {
        Router::new()
    };
    Router::new()
        .route(
            "/connection/websocket",
            get(crate::transport::websocket::bidi::handle),
        )
        .route(
            "/connection/http_stream",
            post(crate::transport::stream::http_stream),
        )
        .route("/connection/sse", get(crate::transport::stream::sse))
        .route("/connection/nodes", get(crate::arbiter::nodes))
        .route(
            "/emulation",
            post(crate::transport::stream::emulation::handle),
        )
        .route(
            "/connection/uni_http_stream",
            post(crate::transport::stream::uni_http_stream),
        )
        .route(
            "/connection/uni_sse",
            get(crate::transport::stream::uni_sse_get).post(crate::transport::stream::uni_sse_post),
        )
        .route(
            "/connection/uni_websocket",
            get(crate::transport::websocket::uni::handle),
        )
        .route(
            "/connection/echo",
            get(crate::transport::websocket::echo::handle),
        )
        .route("/api/{method}", post(crate::api::handle))
        .merge(ops)
        .merge(mqtt)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::http::gate::gate,
        ))
        .with_state(state)
}

/// The client URL devices are given for this node: `server.advertise_url`, else the
/// WebSocket endpoint on the bound address.
fn advertised_url(config: &Config, addr: std::net::SocketAddr, tls: bool) -> String {
    if !config.server.advertise_url.is_empty() {
        return config.server.advertise_url.clone();
    }
    let scheme = if tls { "wss" } else { "ws" };
    format!("{scheme}://{addr}/connection/websocket")
}

/// The routes of the separate server API listener (`api.listen`).
pub fn api_router(state: AppState) -> Router {
    Router::new()
        .route("/api/{method}", post(crate::api::handle))
        .with_state(state)
}

/// Pending connections a listener lets the kernel queue before it is accepted (the kernel
/// caps it at `net.core.somaxconn`). Tokio's default, 1,024, overflowed when thousands of
/// devices connected in the same second: the kernel dropped their handshakes and each came
/// back only after a 1–3 s SYN retransmission (docs/performance.md, "Connect rate").
const LISTEN_BACKLOG: u32 = 65_535;

/// Binds a listener for `key` (the config key it comes from, named in the error).
fn bind(addr: std::net::SocketAddr, key: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    let listener = socket
        .and_then(|s| {
            // As the standard listener does: a restarted node can bind again at once.
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            s.listen(LISTEN_BACKLOG)
        })
        .map_err(|e| anyhow::anyhow!("{key} {addr}: {e}"))?;
    Ok(listener)
}

/// Binds and serves. `listen` "host:0" picks a free port; see `Server::addr`.
pub async fn start(config: Config) -> anyhow::Result<Server> {
    let addr = config.listen_addr()?;
    let listener = bind(addr, "server.listen")?;
    let addr = listener.local_addr()?;
    let admin_listener = match config.admin_addr()? {
        Some(a) => Some(bind(a, "admin.listen")?),
        None => None,
    };
    let admin_addr = match &admin_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let api_listener = match config.api_addr()? {
        Some(a) => Some(bind(a, "api.listen")?),
        None => None,
    };
    let api_addr = match &api_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let mqtt_listener = match config.mqtt_addr()? {
        Some(a) => Some(bind(a, "mqtt.listen")?),
        None => None,
    };
    let mqtt_addr = match &mqtt_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let tls = match (
        config.server.tls_cert.as_str(),
        config.server.tls_key.as_str(),
    ) {
        ("", "") => None,
        (cert, key) => Some(
            crate::http::tls::Tls::load(std::path::Path::new(cert), std::path::Path::new(key))
                .map_err(anyhow::Error::msg)?,
        ),
    };
    let listen = crate::http::listener::ListenOptions::from_config(&config, tls.clone());
    // Background work that lives as long as the listeners: certificate reload, JWKS refresh.
    let (stop_background, background) = watch::channel(false);
    let (metrics, prometheus) = crate::ops::new_metrics();
    let node = build_node(&config, metrics).await?;
    crate::transport::stream::emulation::install_sink(&node);
    node.set_proxy_client(crate::proxy::HttpProxyClient::new());
    if let Some(tls) = &tls {
        tls.spawn_reloader(background.clone());
    }
    if let Some(jwks) = node.tokens.jwks() {
        crate::jwks::start(jwks.clone(), background.clone())
            .await
            .map_err(|e| anyhow::anyhow!("client.token_jwks_public_endpoint: {e}"))?;
    }
    let ops = Arc::new(crate::ops::Ops::new(prometheus));
    let shutdown_timeout = config.server.shutdown_timeout;
    let drain_duration = config.shutdown.drain_duration;
    node.set_advertise_url(advertised_url(&config, addr, tls.is_some()));
    let state = AppState {
        mqtt: Arc::new(crate::mqtt::Mqtt::new(&config.mqtt)),
        nodes_limiter: Arc::new(crate::arbiter::Limiter::new(config.server.nodes_rate_limit)),
        node: node.clone(),
        config: Arc::new(config),
        tracker: Arc::new(Tracker::default()),
        ops: ops.clone(),
    };
    let tracker = state.tracker.clone();
    let admin_app = admin_listener.map(|l| {
        (
            l,
            crate::ops::routes(&state.config).with_state(state.clone()),
        )
    });
    let api_app = api_listener.map(|l| (l, api_router(state.clone())));
    let mqtt_app = mqtt_listener.map(|l| {
        let tls = if state.config.mqtt.tls {
            tls.clone()
        } else {
            None
        };
        (l, state.clone(), tls)
    });
    // Only the main listener serves the streams; the API and admin listeners do not.
    let main_listen = crate::http::listener::ListenOptions {
        streams: tls.is_none().then(|| state.clone()),
        ..listen.clone()
    };
    let app = router(state);
    let task_node = node.clone();
    let task_ops = ops.clone();
    let task = tokio::spawn(async move {
        let node = task_node;
        let (stop_listening, listening) = watch::channel(false);
        let mut listeners = vec![tokio::spawn(serve_http(
            listener,
            app,
            main_listen,
            listening.clone(),
        ))];
        if let Some((l, app)) = api_app {
            listeners.push(tokio::spawn(serve_http(
                l,
                app,
                listen.clone(),
                listening.clone(),
            )));
        }
        if let Some((l, state, tls)) = mqtt_app {
            listeners.push(tokio::spawn(crate::mqtt::listen(
                l,
                state,
                tls,
                listening.clone(),
            )));
        }
        if let Some((l, app)) = admin_app {
            listeners.push(tokio::spawn(serve_http(l, app, listen, listening)));
        }
        // Histograms keep their samples until drained; a node nobody scrapes must not grow.
        let upkeep_handle = task_ops.prometheus.clone();
        let upkeep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                upkeep_handle.run_upkeep();
            }
        });
        let mut phase = task_ops.watch();
        let _ = phase.wait_for(|p| *p >= crate::ops::Phase::Draining).await;
        // The listeners stay up while draining: /ready answers 503, the API still publishes
        // to the clients that remain.
        node.start_draining();
        tokio::select! {
            _ = node.drain(drain_duration) => {}
            _ = phase.wait_for(|p| *p >= crate::ops::Phase::Hurry) => {
                tracing::info!("drain cut short: disconnecting the remaining clients");
            }
        }
        // Whoever is left (connected during the drain, or cut short) goes now.
        node.shutdown();
        // Connections flush what is queued and close; wait for them, bounded.
        if tokio::time::timeout(shutdown_timeout, tracker.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                left = tracker.live(),
                "shutdown timeout: connections left open"
            );
        }
        let _ = stop_listening.send(true);
        for l in listeners {
            // Streaming responses have ended with their sessions; don't wait on stragglers.
            let abort = l.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), l)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        upkeep.abort();
        let _ = stop_background.send(true);
        tracing::info!("stopped");
    });
    Ok(Server {
        addr,
        admin_addr,
        api_addr,
        mqtt_addr,
        tls: tls.is_some(),
        node,
        ops,
        task,
    })
}

/// Serves HTTP (HTTPS with `server.tls_cert`) on `listener` until `stop` turns true.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: Router,
    opts: crate::http::listener::ListenOptions,
    stop: watch::Receiver<bool>,
) {
    crate::http::listener::serve(listener, app, opts, stop).await;
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
