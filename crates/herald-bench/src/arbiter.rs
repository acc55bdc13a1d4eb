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

/// The first client URL the node at `addr` lists, if it answers with a list.
pub async fn first_node(addr: SocketAddr) -> Result<Option<String>, BenchError> {
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

/// The first URL of an HTTP/1.1 answer of `GET /connection/nodes`; None for anything else
/// (an error status, a refusal by the rate limit, a body that is not the list).
fn parse_answer(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if head.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    let nodes: Nodes = serde_json::from_str(body.trim()).ok()?;
    nodes.nodes.into_iter().next().map(|n| n.url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_listed_node_is_picked() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 90\r\n\r\n{\"nodes\":[{\"url\":\"ws://127.0.0.1:1/connection/websocket\",\"name\":\"a\",\"connections\":3},{\"url\":\"ws://x\"}]}";
        assert_eq!(
            parse_answer(ok).as_deref(),
            Some("ws://127.0.0.1:1/connection/websocket")
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 429 Too Many Requests\r\n\r\n{}"),
            None
        );
        assert_eq!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\n{\"nodes\":[]}"), None);
        assert_eq!(parse_answer(b"garbage"), None);
    }
}
