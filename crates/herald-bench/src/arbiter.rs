//! Herald's arbiter as a reconnecting client uses it: `GET /connection/nodes` on a node
//! lists the live nodes' client URLs, least loaded first.

use std::net::SocketAddr;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::BenchError;

/// Largest arbiter answer read.
const MAX_ANSWER: u64 = 1 << 20;

#[derive(Deserialize)]
struct Nodes {
    nodes: Vec<NodeUrl>,
}

#[derive(Deserialize)]
struct NodeUrl {
    url: String,
}

/// The client URLs the node at `addr` lists, least loaded first (empty when it does not
/// answer with a list).
pub async fn nodes(addr: SocketAddr) -> Result<Vec<String>, BenchError> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET /connection/nodes HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut raw).await?;
    Ok(parse_answer(&raw))
}

/// The URLs of an HTTP/1.1 answer of `GET /connection/nodes`; empty for anything else (an
/// error status, a refusal by the rate limit, a body that is not the list).
fn parse_answer(raw: &[u8]) -> Vec<String> {
    let listed = || {
        let text = std::str::from_utf8(raw).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        if head.split_whitespace().nth(1) != Some("200") {
            return None;
        }
        let nodes: Nodes = serde_json::from_str(body.trim()).ok()?;
        Some(nodes.nodes.into_iter().map(|n| n.url).collect())
    };
    listed().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listed_nodes_are_read_in_order() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 90\r\n\r\n{\"nodes\":[{\"url\":\"ws://127.0.0.1:1/connection/websocket\",\"name\":\"a\",\"connections\":3},{\"url\":\"ws://x\"}]}";
        assert_eq!(
            parse_answer(ok),
            ["ws://127.0.0.1:1/connection/websocket", "ws://x"]
        );
        assert!(parse_answer(b"HTTP/1.1 429 Too Many Requests\r\n\r\n{}").is_empty());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\n{\"nodes\":[]}").is_empty());
        assert!(parse_answer(b"garbage").is_empty());
    }
}
