//! Garbage at every endpoint while a well-behaved client keeps receiving its publications:
//! random bytes on raw sockets, truncated and oversized WebSocket frames, invalid UTF-8,
//! control-frame abuse, 10k commands in one frame, deeply nested JSON, malformed HTTP on the
//! API and the streaming transports, and a flood of short-lived connections. The node stays
//! up, each refusal gets its documented code, and the calm client loses nothing.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use rand::RngCore;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client frame (masked, as clients must).
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    masked_frame((if fin { 0x80 } else { 0 }) | opcode, payload)
}

fn text(s: &str) -> Vec<u8> {
    frame(true, 0x1, s.as_bytes())
}

/// Opens a WebSocket by hand on `path`; returns the socket after the 101 response.
async fn upgrade(addr: SocketAddr, path: &str) -> TcpStream {
    raw_upgrade(addr, path, "").await.0
}

/// Reads server frames until a close frame (its code) or the end of the socket (None).
async fn close_code(s: &mut TcpStream) -> Option<u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Parse whatever complete frames are buffered.
        loop {
            if buf.len() < 2 {
                break;
            }
            let opcode = buf[0] & 0x0f;
            let (len, at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => {
                    let mut b8 = [0u8; 8];
                    b8.copy_from_slice(&buf[2..10]);
                    (u64::from_be_bytes(b8) as usize, 10)
                }
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < at + len {
                break;
            }
            if opcode == 0x8 {
                return (len >= 2).then(|| u16::from_be_bytes([buf[at], buf[at + 1]]));
            }
            buf.drain(..at + len);
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("server neither closed nor answered within 10s"),
        }
    }
}

/// Reads until the server ends the socket (any answer is fine); panics if it never does.
async fn until_closed(mut s: TcpStream) {
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("socket not closed within 10s"),
        }
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

async fn connect_frame(s: &mut TcpStream, user: &str) {
    let cmd = json!({"id": 1, "connect": {"token": token(user, 600)}}).to_string();
    s.write_all(&text(&cmd)).await.unwrap();
}

// ---- attacks ----------------------------------------------------------------------------------

async fn raw_tcp_garbage(addr: SocketAddr) {
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&random_bytes(64 * 1024)).await;
        until_closed(s).await;
    }
    // Random bytes after a good upgrade.
    for _ in 0..10 {
        let mut s = upgrade(addr, "/connection/websocket").await;
        let _ = s.write_all(&random_bytes(16 * 1024)).await;
        until_closed(s).await;
    }
}

async fn malformed_frames(addr: SocketAddr) {
    // A frame that announces 1000 bytes and delivers 10, then the client goes away.
    let mut s = upgrade(addr, "/connection/websocket").await;
    let mut f = frame(true, 0x1, &[b'x'; 1000]);
    f.truncate(2 + 2 + 4 + 10);
    s.write_all(&f).await.unwrap();
    drop(s);
    // A 2^63-byte length header: refused with 1009 at once, nothing allocated.
    let mut s = upgrade(addr, "/connection/websocket").await;
    let mut huge = vec![0x81, 0x80 | 127];
    huge.extend_from_slice(&0x7fff_ffff_ffff_ffffu64.to_be_bytes());
    huge.extend_from_slice(&MASK);
    s.write_all(&huge).await.unwrap();
    assert_eq!(close_code(&mut s).await, Some(1009));
    // Invalid UTF-8 in a text frame: 1007.
    let mut s = upgrade(addr, "/connection/websocket").await;
    s.write_all(&frame(true, 0x1, &[0xce, 0xba, 0xe1, 0xbd, 0xff, 0xfe]))
        .await
        .unwrap();
    assert_eq!(close_code(&mut s).await, Some(1007));
    // Reserved bits set, an unknown opcode, a ping over 125 bytes, a fragmented ping, a
    // continuation with nothing to continue: protocol errors.
    let mut rsv = text("{}");
    rsv[0] |= 0x40;
    for bad in [
        rsv,
        frame(true, 0x3, b"??"),
        frame(true, 0x9, &[b'p'; 200]),
        frame(false, 0x9, b"ping"),
        frame(true, 0x0, b"orphan"),
    ] {
        let mut s = upgrade(addr, "/connection/websocket").await;
        s.write_all(&bad).await.unwrap();
        let code = close_code(&mut s).await;
        assert!(
            matches!(code, Some(1002) | Some(1003) | None),
            "protocol violation answered with {code:?}"
        );
    }
    // A message over client.max_message_size: 1009.
    let mut s = upgrade(addr, "/connection/websocket").await;
    connect_frame(&mut s, "big").await;
    // Only the start of it: the declared length is refused at once, and a client still
    // writing megabytes would race the server's close (a reset instead of the close frame).
    let big = text(&"x".repeat(2 << 20));
    s.write_all(&big[..4096]).await.unwrap();
    assert_eq!(close_code(&mut s).await, Some(1009));
    // A fragmented message that grows past the limit, fragment by fragment: 1009.
    let mut s = upgrade(addr, "/connection/websocket").await;
    s.write_all(&frame(false, 0x1, &[b'a'; 600 * 1024]))
        .await
        .unwrap();
    let _ = s.write_all(&frame(false, 0x0, &[b'a'; 600 * 1024])).await;
    assert_eq!(close_code(&mut s).await, Some(1009));
}

async fn protocol_garbage(addr: SocketAddr) {
    // Binary garbage after connect, JSON that is not a command, a deeply nested command,
    // a command without an id, a huge id: each a bad request (3501).
    let deep = format!(
        "{{\"id\":2,\"subscribe\":{}{}}}",
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let cases: Vec<Vec<u8>> = vec![
        frame(true, 0x2, &random_bytes(4096)),
        text("[1,2,3]"),
        text("\"just a string\""),
        text(&deep),
        text("{\"subscribe\":{\"channel\":\"x\"}}"),
        text("{\"id\":99999999999999999999999,\"presence\":{\"channel\":\"x\"}}"),
        text("{\"id\":2,\"publish\":{\"channel\":\"calm\",\"data\":"),
        text("{\"id\":2,\"subscribe\":{\"channel\":{\"nested\":true}}}"),
    ];
    for c in cases {
        let mut s = upgrade(addr, "/connection/websocket").await;
        connect_frame(&mut s, "garbage").await;
        s.write_all(&c).await.unwrap();
        assert_eq!(close_code(&mut s).await, Some(3501));
    }
    // 10k commands in one frame: all answered, nobody else slowed.
    let mut s = upgrade(addr, "/connection/websocket").await;
    let mut cmds = vec![json!({"id": 1, "connect": {"token": token("flood", 600)}}).to_string()];
    cmds.extend(
        (0..10_000).map(|i| json!({"id": i + 2, "history": {"channel": "elsewhere"}}).to_string()),
    );
    s.write_all(&text(&cmds.join("\n"))).await.unwrap();
    // Read until the last reply shows up.
    let mut seen = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let needle = b"\"id\":10001";
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before answering everything");
        seen.extend_from_slice(&chunk[..n]);
        if seen.windows(needle.len()).any(|w| w == needle) {
            break;
        }
        // Keep only a tail that could hold the start of the needle.
        let keep_from = seen.len().saturating_sub(needle.len());
        seen.drain(..keep_from);
    }
}

async fn http_garbage(addr: SocketAddr) {
    let key = format!("X-API-Key: {API_KEY}\r\n");
    let requests: Vec<Vec<u8>> = vec![
        // Not JSON, random bytes, JSON of the wrong shape, a nested bomb.
        format!("POST /api/publish HTTP/1.1\r\nHost: x\r\n{key}Content-Length: 9\r\nConnection: close\r\n\r\n{{{{{{{{{{{{").into_bytes(),
        [
            format!("POST /api/publish HTTP/1.1\r\nHost: x\r\n{key}Content-Length: 4096\r\nConnection: close\r\n\r\n").into_bytes(),
            random_bytes(4096),
        ]
        .concat(),
        format!("POST /api/publish HTTP/1.1\r\nHost: x\r\n{key}Content-Length: 20\r\nConnection: close\r\n\r\n{{\"channel\":[1,2,3]}}").into_bytes(),
        {
            let body = format!("{{\"channel\":\"calm\",\"data\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
            format!("POST /api/publish HTTP/1.1\r\nHost: x\r\n{key}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
        },
        {
            let body = format!("{{\"commands\":[{}]}}", vec!["{\"publish\":{\"channel\":\"\"}}"; 5000].join(","));
            format!("POST /api/batch HTTP/1.1\r\nHost: x\r\n{key}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
        },
        // A length far above what is sent, then silence.
        format!("POST /api/publish HTTP/1.1\r\nHost: x\r\n{key}Content-Length: 99999999999\r\n\r\n{{\"chan").into_bytes(),
        // Bad request lines, header without colon, bad chunked encoding, bad method.
        b"GARBAGE\r\n\r\n".to_vec(),
        b"POST /api/info HTTP/1.1\r\nHost x\r\nnot a header\r\n\r\n".to_vec(),
        format!("POST /api/info HTTP/1.1\r\nHost: x\r\n{key}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").into_bytes(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
        b"BREW /api/info HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        // 100 KB of headers.
        format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024)).into_bytes(),
        // The streaming transports and emulation with garbage.
        b"POST /connection/http_stream HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n\xff\xfe\x00garb".to_vec(),
        b"POST /connection/uni_http_stream HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{{{{{".to_vec(),
        b"GET /connection/sse?cf_connect=%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /connection/uni_sse?cf_connect=[[[ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"POST /emulation HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nConnection: close\r\n\r\n\x00\x01\x02\x03\x04\x05".to_vec(),
        // An upgrade request without the WebSocket headers, and one with a bad version.
        b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 1\r\n\r\n".to_vec(),
    ];
    for r in requests {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&r).await;
        let _ = s.shutdown().await;
        until_closed(s).await;
    }
}

async fn connection_flood(addr: SocketAddr) {
    for i in 0..200 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            // Half of them upgrade and vanish mid-session.
            drop(s);
            let mut s = upgrade(addr, "/connection/websocket").await;
            connect_frame(&mut s, "flood").await;
        } else {
            let _ = s.write_all(b"GET /conn").await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_everywhere_while_a_client_keeps_receiving() {
    let s = start("max_message_size = 1048576\nconnect_timeout = \"2s\"").await;
    let addr = s.addr;
    let (mut calm, _) = Client::connect(&s, "calm").await.unwrap();
    calm.call(2, "subscribe", json!({"channel": "calm"}))
        .await
        .unwrap();
    let server = std::sync::Arc::new(s);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let p = server.clone();
    let publisher = tokio::spawn(async move {
        let mut i = 0u64;
        loop {
            publish(&p, "calm", json!({"i": i})).await.unwrap();
            i += 1;
            if *stop_rx.borrow() {
                return i;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = stop_rx.changed() => {}
            }
        }
    });
    let reader = tokio::spawn(async move {
        let mut next = 0u64;
        let mut calm = calm;
        loop {
            let pb = calm.publication("calm").await.unwrap();
            let i = pb["data"]["i"].as_u64().unwrap();
            assert_eq!(i, next, "publication lost or reordered");
            next += 1;
            if pb["data"]["last"] == true {
                return (next, calm);
            }
        }
    });
    tokio::join!(
        raw_tcp_garbage(addr),
        malformed_frames(addr),
        protocol_garbage(addr),
        http_garbage(addr),
        connection_flood(addr),
    );
    let _ = stop_tx.send(true);
    let sent = publisher.await.unwrap();
    publish(&server, "calm", json!({"i": sent, "last": true}))
        .await
        .unwrap();
    let (received, _calm) = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(received, sent + 1);
    // Still serving: the API answers and a new client connects and receives.
    let info = api(&server, "info", json!({})).await.unwrap();
    assert!(info["result"]["nodes"][0]["uptime"].is_number(), "{info}");
    let (mut late, _) = Client::connect(&server, "late").await.unwrap();
    late.call(2, "subscribe", json!({"channel": "calm"}))
        .await
        .unwrap();
    publish(&server, "calm", json!("after")).await.unwrap();
    assert_eq!(late.publication("calm").await.unwrap()["data"], "after");
    assert!(sent > 10, "the attacks ran alongside {sent} publications");
}
