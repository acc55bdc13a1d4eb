//! Herald's unidirectional HTTP transports for the `connect` scenario: `uni_sse` and
//! `uni_http_stream`. A connection is made with its token (whose `channels` claim subscribes
//! it), established once the connect push arrives, then held: what the server sends (pings,
//! publications) is counted, not parsed.

use std::net::IpAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::{ConnCtx, Delivery};
use crate::error::BenchError;
use crate::net::{Endpoint, connect_tcp};
use crate::ws::read_response_head;

/// Largest response head and connect push accepted.
const MAX_SETUP: usize = 16 << 10;

/// The transport's path beside `--url`'s `/connection/websocket`.
pub fn path(ws: &Endpoint, sse: bool) -> Result<String, BenchError> {
    let base = ws
        .path
        .strip_suffix("/connection/websocket")
        .ok_or_else(|| BenchError::BadUrl {
            url: ws.url.clone(),
            reason: "the unidirectional transports need a URL ending in /connection/websocket"
                .into(),
        })?;
    let name = if sse { "uni_sse" } else { "uni_http_stream" };
    Ok(format!("{base}/connection/{name}"))
}

/// Opens the stream (the connect request as a POST body) and reads until Herald's connect
/// push, which must show the connection subscribed to `channel`; a refusal (status, or a
/// disconnect push) is an error.
pub async fn connect(
    ep: &Endpoint,
    src: Option<IpAddr>,
    token: Option<&str>,
    channel: Option<&str>,
    sse: bool,
) -> Result<TcpStream, BenchError> {
    let path = path(ep, sse)?;
    let body = match token {
        Some(t) => serde_json::json!({ "token": t }).to_string(),
        None => "{}".to_string(),
    };
    let mut tcp = connect_tcp(ep.addr, src).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        ep.authority,
        body.len()
    );
    tcp.write_all(request.as_bytes()).await?;
    let (mut got, body_at) = read_response_head(&mut tcp, 200, |_| Ok(())).await?;
    loop {
        let seen = String::from_utf8_lossy(&got[body_at..]);
        if seen.contains("\"disconnect\"") {
            return Err(BenchError::Protocol(format!(
                "herald refused the stream: {}",
                seen.chars().take(120).collect::<String>()
            )));
        }
        // The first push is the connect result: `{"connect":{…,"subs":{<channel>:…}}}`,
        // one line (after `data: ` for SSE, after the chunk size for a chunked body).
        if let Some(start) = seen.find('{')
            && let Some(len) = seen[start..].find('\n')
        {
            let push: serde_json::Value = serde_json::from_str(&seen[start..start + len])
                .map_err(|_| BenchError::Protocol("unparsable connect push".into()))?;
            return match &push["connect"]["subs"] {
                _ if push.get("connect").is_none() => Err(BenchError::Protocol(format!(
                    "the first push is not the connect result: {}",
                    seen.chars().take(120).collect::<String>()
                ))),
                subs if channel.is_none_or(|c| subs.get(c).is_some()) => Ok(tcp),
                _ => Err(BenchError::Protocol(
                    "herald connected the stream without subscribing it".into(),
                )),
            };
        }
        if got.len() > MAX_SETUP {
            return Err(BenchError::Protocol(
                "no connect push in the first 16 KiB".into(),
            ));
        }
        let mut chunk = [0u8; 2048];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(BenchError::Closed("eof before the connect push".into()));
        }
        got.extend_from_slice(&chunk[..n]);
    }
}

/// Holds the stream until the run stops, counting what arrives.
pub(crate) async fn serve(
    ctx: &ConnCtx,
    tcp: &mut TcpStream,
    d: &mut Delivery<'_>,
) -> Result<(), BenchError> {
    loop {
        let ready = tokio::select! {
            biased;
            _ = ctx.stop.wait() => return Ok(()),
            r = tcp.readable() => r,
        };
        ready?;
        // Not held across an await: an idle connection keeps no buffer.
        let mut buf = [0u8; 4096];
        match tcp.try_read(&mut buf) {
            Ok(0) => return Err(BenchError::Closed("eof".into())),
            Ok(n) => d.frame(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::loopback_endpoint;

    #[test]
    fn paths_sit_beside_the_websocket_endpoint() {
        let ep = loopback_endpoint("ws://127.0.0.1:8000/connection/websocket", &["ws"]).unwrap();
        assert_eq!(path(&ep, true).unwrap(), "/connection/uni_sse");
        assert_eq!(path(&ep, false).unwrap(), "/connection/uni_http_stream");
        let pre =
            loopback_endpoint("ws://127.0.0.1:8000/herald/connection/websocket", &["ws"]).unwrap();
        assert_eq!(path(&pre, true).unwrap(), "/herald/connection/uni_sse");
        let other = loopback_endpoint("ws://127.0.0.1:8000/ws", &["ws"]).unwrap();
        assert!(path(&other, true).is_err());
    }
}
