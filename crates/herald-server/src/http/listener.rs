//! Herald's own accept loop: TCP accept, an optional TLS handshake, then HTTP/1.1 with
//! upgrades (hyper) and the axum router as the service. A socket must finish its TLS
//! handshake and send complete request headers within `server.handshake_timeout`, or it is
//! closed: a peer that connects and dawdles holds nothing for long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::http::Peer;
use crate::http::tls::Tls;
use crate::state::AppState;
use crate::transport::stream::direct;

/// The router as this connection's service: each request carries the client's address.
fn with_peer(
    app: Router,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(Peer(Some(peer)));
        let mut app = app.clone();
        tower_service::Service::call(&mut app, req)
    })
}

/// How one listener speaks.
#[derive(Clone)]
pub struct ListenOptions {
    /// TLS on every accepted socket, when configured.
    pub tls: Option<Arc<Tls>>,
    /// Bound on the TLS handshake and on reading each request's headers.
    pub handshake_timeout: Duration,
    /// Where the HTTP streams are served on the socket (plain TCP, main listener only; see
    /// `transport::stream::direct`).
    pub streams: Option<AppState>,
}

impl ListenOptions {
    pub fn from_config(config: &crate::Config, tls: Option<Arc<Tls>>) -> Self {
        Self {
            tls,
            handshake_timeout: config.server.handshake_timeout,
            streams: None,
        }
    }
}

/// Serves `app` on `listener` until `stop` turns true; then stops accepting and asks each
/// open HTTP connection to finish its request in flight and close. Upgraded connections
/// (WebSocket) are not tracked here: they end with their sessions.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    opts: ListenOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = crate::stop::stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(connection(stream, peer, app.clone(), opts.clone(), stop.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    // Requests in flight get a bounded time to finish; a streaming response whose client
    // stopped reading would otherwise hold shutdown forever.
    let finished = tokio::time::timeout(HTTP_DRAIN, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            left = conns.len(),
            "HTTP connections still open at shutdown: closed"
        );
        conns.abort_all();
    }
}

/// How long open HTTP connections may take to finish once the node stops accepting.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    opts: ListenOptions,
    stop: watch::Receiver<bool>,
) {
    match &opts.tls {
        Some(tls) => {
            match tokio::time::timeout(opts.handshake_timeout, tls.acceptor().accept(stream)).await
            {
                Ok(Ok(s)) => http(s, peer, app, opts.handshake_timeout, stop).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
        None => {
            if let Some(state) = &opts.streams {
                // Peeked, not read: a request that is not a stream goes to hyper intact.
                let mut first = [0u8; direct::PEEK];
                match tokio::time::timeout(opts.handshake_timeout, stream.peek(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => {
                        if let Some(route) = direct::recognise(&first[..n]) {
                            let wait = opts.handshake_timeout;
                            return direct::serve(stream, peer, state.clone(), route, wait).await;
                        }
                    }
                    // Closed, failed, or silent past the handshake timeout.
                    _ => return,
                }
            }
            http(stream, peer, app, opts.handshake_timeout, stop).await
        }
    }
}

async fn http<IO>(
    io: IO,
    peer: SocketAddr,
    app: Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), with_peer(app, peer))
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        }
        _ = crate::stop::stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
