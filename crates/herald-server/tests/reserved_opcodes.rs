//! Frames with a reserved opcode (non-control 0x3–0x7, control 0xB–0xF) close the WebSocket
//! with 1002 (protocol error, RFC 6455) on every WebSocket endpoint, before or after other
//! traffic and with permessage-deflate negotiated, while compressed messages still pass.
//! Raw sockets, so the frames are exactly the ones written here.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Echo and compression on, next to the client endpoints.
async fn server() -> herald_server::Server {
    let toml = config("").replacen(
        "[server]\n",
        "[server]\nwebsocket_echo = true\nwebsocket_compression = true\n",
        1,
    );
    start_with(&toml).await
}

/// The opcodes RFC 6455 reserves: non-control 0x3-0x7, control 0xB-0xF.
const RESERVED: [u8; 10] = [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF];

async fn upgrade(addr: SocketAddr, path: &str, extra: &str) -> (TcpStream, String) {
    raw_upgrade(addr, path, extra).await
}

/// The next server frame: its first byte and its payload (server frames are not masked).
async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let read = async {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await.unwrap();
        let len = match h[1] & 0x7f {
            126 => u64::from(s.read_u16().await.unwrap()),
            127 => s.read_u64().await.unwrap(),
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(len).unwrap()];
        s.read_exact(&mut payload).await.unwrap();
        (h[0], payload)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no frame from the server within 10s")
}

/// Reads server frames up to the close frame; returns its code.
async fn close_code(s: &mut TcpStream) -> u16 {
    loop {
        let (first, payload) = read_frame(s).await;
        if first & 0x0f == 0x8 {
            assert!(payload.len() >= 2, "close frame without a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[tokio::test]
async fn reserved_opcodes_close_with_1002_on_the_client_endpoint() {
    let server = server().await;
    // 0x3 and 0xB on connections of their own, as the first frame.
    for opcode in [0x3, 0xB] {
        let (mut s, _) = upgrade(server.addr, "/connection/websocket", "").await;
        s.write_all(&masked_frame(0x80 | opcode, b"??"))
            .await
            .unwrap();
        assert_eq!(close_code(&mut s).await, 1002, "opcode {opcode:#x}");
    }
    // Every reserved opcode, with FIN or without, after a connect and its reply.
    for opcode in RESERVED {
        for fin in [0x80, 0] {
            let (mut s, _) = upgrade(server.addr, "/connection/websocket", "").await;
            let connect = json!({"id": 1, "connect": {"token": token("u", 600)}}).to_string();
            s.write_all(&masked_frame(0x81, connect.as_bytes()))
                .await
                .unwrap();
            let (first, reply) = read_frame(&mut s).await;
            assert_eq!(first & 0x0f, 0x1, "{}", String::from_utf8_lossy(&reply));
            s.write_all(&masked_frame(fin | opcode, &[b'x'; 300]))
                .await
                .unwrap();
            assert_eq!(
                close_code(&mut s).await,
                1002,
                "opcode {opcode:#x} fin {fin:#x}"
            );
        }
    }
}

#[tokio::test]
async fn reserved_opcodes_close_with_1002_on_uni_and_echo() {
    let server = server().await;
    for path in ["/connection/uni_websocket", "/connection/echo"] {
        for opcode in RESERVED {
            let (mut s, _) = upgrade(server.addr, path, "").await;
            s.write_all(&masked_frame(0x80 | opcode, b""))
                .await
                .unwrap();
            assert_eq!(close_code(&mut s).await, 1002, "{path} opcode {opcode:#x}");
        }
    }
}

#[tokio::test]
async fn compression_still_works_and_reserved_opcodes_still_close_with_1002() {
    let server = server().await;
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    // "hello" deflated as a stored block, its trailing 00 00 ff ff left off (RFC 7692).
    let mut deflated = vec![0x00, 0x05, 0x00, 0xfa, 0xff];
    deflated.extend_from_slice(b"hello");
    let (mut s, head) = upgrade(server.addr, "/connection/echo", offer).await;
    assert!(head.contains("permessage-deflate"), "{head}");
    for _ in 0..3 {
        // RSV1: a compressed message. The reply is under the compression threshold.
        s.write_all(&masked_frame(0xC1, &deflated)).await.unwrap();
        assert_eq!(read_frame(&mut s).await, (0x81, b"hello".to_vec()));
        s.write_all(&masked_frame(0x81, b"plain")).await.unwrap();
        assert_eq!(read_frame(&mut s).await, (0x81, b"plain".to_vec()));
    }
    // A reserved opcode with RSV1 set: 1002 all the same.
    s.write_all(&masked_frame(0xC3, &deflated)).await.unwrap();
    assert_eq!(close_code(&mut s).await, 1002);
}

#[tokio::test]
async fn a_close_frame_in_the_refused_read_ends_the_socket_without_waiting() {
    let server = server().await;
    for path in ["/connection/websocket", "/connection/echo"] {
        let (mut s, _) = upgrade(server.addr, path, "").await;
        // The refused frame and the client's close in one write, so one read.
        let mut bytes = masked_frame(0x83, b"??");
        bytes.extend_from_slice(&masked_frame(0x88, &1000u16.to_be_bytes()));
        s.write_all(&bytes).await.unwrap();
        assert_eq!(close_code(&mut s).await, 1002, "{path}");
        // The server has the client's close already: it shuts the socket at once rather than
        // reading for another close until its 2 s close timeout.
        let mut rest = Vec::new();
        let eof = tokio::time::timeout(Duration::from_millis(1500), s.read_to_end(&mut rest));
        assert!(
            eof.await.is_ok(),
            "{path}: the server waited for a close frame it already had"
        );
    }
}
