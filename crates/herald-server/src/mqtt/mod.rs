//! The MQTT front end: MQTT 3.1.1 and 5.0 devices on the same channels as every other
//! client. A connection is an [`MqttWire`] (packets framed from TCP, TLS or WebSocket) and an
//! [`MqttHandler`] (packets turned into client-protocol commands) over the one connection
//! driver and a session like any other, so tokens, permissions, history, recovery, presence
//! and metrics are those of every transport. docs/mqtt.md has the mapping.

pub mod handler;
pub mod link;
pub mod sessions;
pub mod settings;
pub mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use herald_core::conn::{Codec, Mode};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub use self::settings::{Mqtt, Settings};

use self::handler::MqttHandler;
use self::link::Link;
use self::wire::{Carrier, MqttWire};
use crate::http::Peer;
use crate::http::tls::Tls;
use crate::state::AppState;
use crate::transport::websocket::WsUpgrade;
use herald_protocol::mqtt::Version;

/// The WebSocket subprotocol of MQTT (MQTT 5.0 §6).
pub const SUBPROTOCOL: &str = "mqtt";

/// The transport label of MQTT connections in metrics, logs and proxy requests.
pub const TRANSPORT: &str = "mqtt";

/// One MQTT connection over `io`, to its end.
pub fn serve<C: Carrier>(
    state: &AppState,
    io: C,
    peer: Peer,
) -> impl std::future::Future<Output = ()> + Send + use<C> {
    let (conn, mut session) = crate::transport::connection(
        state,
        Mode::Bidirectional,
        Codec::Protobuf,
        TRANSPORT,
        Vec::new(),
    );
    session.keepalive_by_transport();
    let mqtt = &state.mqtt;
    let link = Arc::new(Mutex::new(Link::new(
        Version::V311,
        mqtt.settings.max_inflight,
        state.node.client.max_queue_bytes,
    )));
    let handler = MqttHandler::new(
        session,
        state.node.clone(),
        link.clone(),
        mqtt.sessions.clone(),
        mqtt.settings.clone(),
        Instant::now(),
    );
    let wire = MqttWire::new(io, link, conn.clone(), mqtt.settings.max_packet_size);
    crate::transport::driver::drive(
        conn,
        handler,
        wire,
        None,
        state.node.metrics.transport(TRANSPORT),
        state.node.clone(),
        peer,
    )
}

/// Accepts MQTT clients on `listener` (TLS when `tls`) until `stop` turns true.
pub async fn listen(
    listener: TcpListener,
    state: AppState,
    tls: Option<Arc<Tls>>,
    mut stop: watch::Receiver<bool>,
) {
    let handshake_timeout = state.config.server.handshake_timeout;
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::stop::stopped(&mut stop) => return,
        };
        if state.node.is_draining() {
            continue;
        }
        let _ = stream.set_nodelay(true);
        let guard = state.tracker.enter();
        let state = state.clone();
        let tls = tls.clone();
        // The task and the connection each boxed, the TLS handshake in a box of its own:
        // inline, the handshake's state sized the task's cell for the connection's whole life
        // (2,944 bytes).
        tokio::spawn(Box::pin(async move {
            let _guard = guard;
            let peer = Peer(Some(addr));
            match tls {
                None => Box::pin(serve(&state, wire::Stream(stream), peer)).await,
                Some(tls) => {
                    let handshake = over_tls(&state, &tls, stream, handshake_timeout, peer);
                    if let Some(connection) = Box::pin(handshake).await {
                        connection.await;
                    }
                }
            }
        }));
    }
}

/// The TLS handshake of an MQTT client, bounded by `timeout`; then its connection's future,
/// boxed.
async fn over_tls(
    state: &AppState,
    tls: &Tls,
    stream: TcpStream,
    timeout: Duration,
    peer: Peer,
) -> Option<Pin<Box<impl Future<Output = ()> + Send + use<>>>> {
    match tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => Some(Box::pin(serve(state, wire::Stream(s), peer))),
        Ok(Err(e)) => {
            tracing::debug!(addr = %peer, error = %e, "MQTT TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(addr = %peer, "MQTT TLS handshake timed out");
            None
        }
    }
}

/// `GET /mqtt`: MQTT over WebSocket (subprotocol `mqtt`).
pub async fn websocket(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    ws: WsUpgrade,
) -> Response {
    let offered = crate::transport::websocket::offers_subprotocol(&headers, SUBPROTOCOL);
    let max = state.mqtt.settings.max_packet_size.saturating_add(8);
    crate::transport::websocket::upgrade(
        &state.clone(),
        ws,
        max,
        offered.then_some(SUBPROTOCOL),
        move |socket| serve(&state, wire::WebSocket(socket, None), peer),
    )
}
