//! WebSocket client set-up shared by every target.

use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::error::BenchError;
use crate::net::{Endpoint, connect_tcp};

pub type Ws = WebSocketStream<TcpStream>;

/// Small buffers: tungstenite's defaults (128 KiB read buffer per connection) would
/// make the generator, not the server, the memory bottleneck at 20k connections.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// TCP connect (from `src` when given) and WebSocket handshake.
pub async fn ws_connect(
    ep: &Endpoint,
    src: Option<IpAddr>,
    subprotocol: Option<&'static str>,
) -> Result<Ws, BenchError> {
    ws_connect_url(ep.addr, &ep.url, src, subprotocol).await
}

/// As [`ws_connect`], for a URL derived from an already checked endpoint (same
/// address, another path).
pub async fn ws_connect_url(
    addr: SocketAddr,
    url: &str,
    src: Option<IpAddr>,
    subprotocol: Option<&'static str>,
) -> Result<Ws, BenchError> {
    let tcp = connect_tcp(addr, src).await?;
    let mut req = url.into_client_request()?;
    if let Some(p) = subprotocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
    }
    let (ws, _resp) =
        tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_config())).await?;
    Ok(ws)
}
