//! The comet transports over real sockets: bidirectional emulation (HTTP streaming and SSE
//! with `/emulation`) and the unidirectional endpoints (uni_http_stream, uni_sse,
//! uni_websocket). The HTTP client here is a few lines over a TcpStream (chunked decoding
//! included), so that the test controls when it reads.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use common::*;
use futures_util::{SinkExt, StreamExt};
use herald_protocol::proto;
use herald_server::Server;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Percent-encodes a query parameter value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One streaming HTTP response, read only when the test asks.
struct HttpStream {
    sock: TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    status: u16,
    headers: String,
    ended: bool,
    sse: bool,
    messages: VecDeque<Value>,
}

impl HttpStream {
    async fn open(
        server: &Server,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> Result<Self> {
        Self::open_with(server, method, path, content_type, body.as_bytes(), None).await
    }

    /// `recv_buffer`: a small receive buffer makes a client that stops reading fill up fast.
    async fn open_with(
        server: &Server,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
        recv_buffer: Option<u32>,
    ) -> Result<Self> {
        let socket = TcpSocket::new_v4()?;
        if let Some(n) = recv_buffer {
            socket.set_recv_buffer_size(n)?;
        }
        let mut sock = tokio::time::timeout(WAIT, socket.connect(server.addr)).await??;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        sock.write_all(req.as_bytes()).await?;
        sock.write_all(body).await?;
        Self::attach(sock, Vec::new()).await
    }

    /// Sends `request` as it is (head and body) and reads the response head.
    async fn raw(server: &Server, request: &[u8]) -> Result<Self> {
        let mut sock = tokio::time::timeout(WAIT, TcpStream::connect(server.addr)).await??;
        sock.write_all(request).await?;
        Self::attach(sock, Vec::new()).await
    }

    /// The response on `sock`, of which `raw` has been read already.
    async fn attach(sock: TcpStream, raw: Vec<u8>) -> Result<Self> {
        let mut s = Self {
            sock,
            raw,
            body: Vec::new(),
            status: 0,
            headers: String::new(),
            ended: false,
            sse: false,
            messages: VecDeque::new(),
        };
        s.decode()?;
        while s.status == 0 {
            s.read_more().await?;
        }
        s.sse = s
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream"));
        Ok(s)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    async fn read_more(&mut self) -> Result<()> {
        if self.ended {
            bail!("stream ended");
        }
        let mut buf = [0u8; 16384];
        let n = tokio::time::timeout(WAIT, self.sock.read(&mut buf))
            .await
            .context("timed out waiting for the server")??;
        if n == 0 {
            self.ended = true;
            bail!("connection closed");
        }
        self.raw.extend_from_slice(&buf[..n]);
        self.decode()
    }

    /// Moves complete chunks of the chunked body from `raw` to `body`.
    fn decode(&mut self) -> Result<()> {
        if self.status == 0 {
            let Some(end) = find(&self.raw, b"\r\n\r\n") else {
                return Ok(());
            };
            let head = String::from_utf8_lossy(&self.raw[..end]).to_string();
            self.raw.drain(..end + 4);
            let mut lines = head.lines();
            self.status = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .ok_or_else(|| anyhow!("no status line"))?
                .parse()?;
            self.headers = lines.collect::<Vec<_>>().join("\n");
            if !self
                .header("transfer-encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
            {
                // A fixed-length answer (errors): take it whole.
                self.body.append(&mut self.raw);
                return Ok(());
            }
        }
        if !self
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            self.body.append(&mut self.raw);
            return Ok(());
        }
        loop {
            let Some(eol) = find(&self.raw, b"\r\n") else {
                return Ok(());
            };
            let size = usize::from_str_radix(std::str::from_utf8(&self.raw[..eol])?.trim(), 16)?;
            if size == 0 {
                self.ended = true;
                return Ok(());
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return Ok(());
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    /// Parses complete messages out of the body: lines, or SSE events.
    fn split(&mut self) -> Result<()> {
        let sep: &[u8] = if self.sse { b"\n\n" } else { b"\n" };
        while let Some(end) = find(&self.body, sep) {
            let unit: Vec<u8> = self.body.drain(..end + sep.len()).collect();
            let text = String::from_utf8(unit[..end].to_vec())?;
            let text = if self.sse {
                // Comments and other fields are skipped; data lines join with `\n`.
                text.lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                text
            };
            if text.trim().is_empty() {
                continue;
            }
            self.messages.push_back(serde_json::from_str(&text)?);
        }
        Ok(())
    }

    /// The next Protobuf reply of a binary stream (pings included).
    async fn next_proto(&mut self) -> Result<proto::Reply> {
        loop {
            let mut iter = proto::decode_replies(&self.body);
            if let Some(Ok(r)) = iter.next() {
                // Complete: drop its bytes (prefix + body) from the buffer.
                let used = self.body.len() - iter.remaining();
                self.body.drain(..used);
                return Ok(r);
            }
            self.read_more().await?;
        }
    }

    /// The next message (pings included).
    async fn next(&mut self) -> Result<Value> {
        loop {
            self.split()?;
            if let Some(v) = self.messages.pop_front() {
                return Ok(v);
            }
            self.read_more().await?;
        }
    }

    /// The next message other than a ping.
    async fn next_msg(&mut self) -> Result<Value> {
        loop {
            let v = self.next().await?;
            if v != json!({}) {
                return Ok(v);
            }
        }
    }

    /// Waits for the reply with this id; pushes that come first stay queued, pings go.
    async fn reply(&mut self, id: u64) -> Result<Value> {
        let mut skipped = VecDeque::new();
        loop {
            let v = self.next_msg().await?;
            if v["id"].as_u64() == Some(id) {
                while let Some(s) = skipped.pop_back() {
                    self.messages.push_front(s);
                }
                return Ok(v);
            }
            skipped.push_back(v);
        }
    }

    /// Reads to the end; returns every message left.
    async fn rest(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(v) = self.next().await {
            out.push(v);
        }
        out
    }
}

/// POSTs an `application/octet-stream` body; returns the status.
async fn post_binary(server: &Server, path: &str, body: &[u8]) -> Result<u16> {
    let mut st =
        HttpStream::open_with(server, "POST", path, "application/octet-stream", body, None).await?;
    // A complete answer: nothing else to read.
    st.ended = true;
    Ok(st.status)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A connected bidirectional stream: (stream, node, session, client).
struct Emulated {
    stream: HttpStream,
    node: String,
    session: String,
    client: String,
}

impl Emulated {
    async fn http_stream(server: &Server, user: &str) -> Result<Self> {
        let connect = json!({"id": 1, "connect": {"token": token(user, 3600), "name": "test"}});
        let s = HttpStream::open(
            server,
            "POST",
            "/connection/http_stream",
            "application/json",
            &connect.to_string(),
        )
        .await?;
        Self::connected(s).await
    }

    async fn sse(server: &Server, user: &str) -> Result<Self> {
        let connect = json!({"id": 1, "connect": {"token": token(user, 3600)}});
        let path = format!(
            "/connection/sse?cf_connect={}",
            urlencode(&connect.to_string())
        );
        let s = HttpStream::open(server, "GET", &path, "text/plain", "").await?;
        Self::connected(s).await
    }

    async fn connected(mut stream: HttpStream) -> Result<Self> {
        if stream.status != 200 {
            bail!("HTTP {}", stream.status);
        }
        let r = stream.reply(1).await?;
        let c = &r["connect"];
        if c.is_null() {
            bail!("connect failed: {r}");
        }
        Ok(Self {
            node: c["node"].as_str().unwrap_or_default().to_string(),
            session: c["session"].as_str().unwrap_or_default().to_string(),
            client: c["client"].as_str().unwrap_or_default().to_string(),
            stream,
        })
    }

    /// Sends commands through `/emulation` as centrifuge-js does (a JSON string of commands).
    async fn send(&self, server: &Server, commands: &[Value]) -> Result<u16> {
        let data: Vec<String> = commands.iter().map(Value::to_string).collect();
        let body = json!({"node": self.node, "session": self.session, "data": data.join("\n")});
        let (status, _) = http(server, "POST", "/emulation", None, &body.to_string()).await?;
        Ok(status)
    }

    async fn call(
        &mut self,
        server: &Server,
        id: u64,
        method: &str,
        params: Value,
    ) -> Result<Value> {
        let status = self
            .send(server, &[json!({"id": id, method: params})])
            .await?;
        if status != 204 {
            bail!("emulation: HTTP {status}");
        }
        self.stream.reply(id).await
    }

    async fn publication(&mut self, channel: &str) -> Result<Value> {
        loop {
            let v = self.stream.next_msg().await?;
            if v["push"]["channel"] == channel && v["push"].get("pub").is_some() {
                return Ok(v["push"]["pub"].clone());
            }
        }
    }
}

async fn bidirectional_flow(s: &Server, mut c: Emulated) {
    assert_eq!(c.node, s.node.id);
    // The session token is not the client id (which other users can see).
    assert!(!c.session.is_empty());
    assert_ne!(c.session, c.client);
    let r = c
        .call(s, 2, "subscribe", json!({"channel": "room"}))
        .await
        .unwrap();
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(r["subscribe"]["recoverable"], true);
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();

    let published = publish(s, "room", json!({"via": "api"})).await.unwrap();
    let p = c.publication("room").await.unwrap();
    assert_eq!(p["data"], json!({"via": "api"}));
    assert_eq!(p["offset"], published["offset"]);

    // Publishing is allowed for subscribers of the "" namespace; presence too.
    let r = c
        .call(
            s,
            3,
            "publish",
            json!({"channel": "room", "data": {"via": "client"}}),
        )
        .await
        .unwrap();
    assert!(r.get("error").is_none(), "{r}");
    let p = c.publication("room").await.unwrap();
    assert_eq!(p["data"], json!({"via": "client"}));
    assert_eq!(p["info"]["client"], c.client.as_str());
    let r = c
        .call(s, 4, "presence", json!({"channel": "room"}))
        .await
        .unwrap();
    assert!(r["presence"]["presence"].get(&c.client).is_some(), "{r}");

    // Several commands in one emulation request are handled in order.
    assert_eq!(
        c.send(
            s,
            &[
                json!({"id": 5, "history": {"channel": "room", "limit": -1}}),
                json!({"id": 6, "presence_stats": {"channel": "room"}}),
            ],
        )
        .await
        .unwrap(),
        204
    );
    let h = c.stream.reply(5).await.unwrap();
    assert_eq!(h["history"]["publications"].as_array().unwrap().len(), 2);
    assert_eq!(h["history"]["epoch"], epoch.as_str());
    let st = c.stream.reply(6).await.unwrap();
    assert_eq!(st["presence_stats"]["num_clients"], 1);

    // A command sent with the client id as session goes nowhere; the next real one arrives.
    let forged = json!({"node": c.node, "session": c.client, "data": json!({"id": 7, "unsubscribe": {"channel": "room"}}).to_string()});
    let (status, _) = http(s, "POST", "/emulation", None, &forged.to_string())
        .await
        .unwrap();
    assert_eq!(status, 204);
    let r = c
        .call(s, 8, "presence_stats", json!({"channel": "room"}))
        .await
        .unwrap();
    assert_eq!(r["presence_stats"]["num_clients"], 1, "still subscribed");

    // The server API disconnect reaches the stream as a disconnect push, then it ends.
    api(s, "disconnect", json!({"user": "alice"}))
        .await
        .unwrap();
    let rest = c.stream.rest().await;
    let last = rest.last().cloned().unwrap_or_default();
    assert_eq!(last["push"]["disconnect"]["code"], 3503, "{rest:?}");
    assert_eq!(last["push"]["disconnect"]["reconnect"], false);
    assert!(c.stream.ended, "the response body was finished");
}

#[tokio::test]
async fn http_stream_connect_subscribe_publish_receive() {
    let s = start("").await;
    let c = Emulated::http_stream(&s, "alice").await.unwrap();
    assert!(
        c.stream
            .header("content-type")
            .is_some_and(|v| v.contains("ndjson"))
    );
    bidirectional_flow(&s, c).await;
    s.shutdown().await;
}

#[tokio::test]
async fn sse_connect_subscribe_publish_receive() {
    let s = start("").await;
    let c = Emulated::sse(&s, "alice").await.unwrap();
    assert!(c.stream.sse, "text/event-stream");
    bidirectional_flow(&s, c).await;
    s.shutdown().await;
}

#[tokio::test]
async fn emulation_request_errors() {
    let s = start("max_message_size = 1024").await;
    let c = Emulated::http_stream(&s, "bob").await.unwrap();
    // Served on the socket: the connection ends with the stream.
    assert_eq!(c.stream.header("connection").as_deref(), Some("close"));
    let post = |body: String| {
        let s = &s;
        async move { http(s, "POST", "/emulation", None, &body).await.unwrap() }
    };
    // Another node: a clear 404 (the client reconnects, maybe to the right node).
    let (status, body) =
        post(json!({"node": "elsewhere", "session": c.session, "data": "{}"}).to_string()).await;
    assert_eq!(status, 404);
    assert!(body.to_string().contains("elsewhere"), "{body}");
    // Malformed.
    assert_eq!(post("{\"node\":".into()).await.0, 400);
    assert_eq!(post(json!({"node": c.node}).to_string()).await.0, 400);
    // Too large.
    let big = json!({"node": c.node, "session": c.session, "data": "x".repeat(2000)});
    assert_eq!(post(big.to_string()).await.0, 413);
    // A session that is gone: nothing to deliver, and nothing to fix on the client's side.
    let gone = json!({"node": c.node, "session": "no-such-session", "data": "{}"});
    assert_eq!(post(gone.to_string()).await.0, 204);
    // Bad commands end the session the same way as on WebSocket (3501).
    let (status, _) = post(
        json!({"node": c.node, "session": c.session, "data": "{\"id\":2,\"subscribe\":"})
            .to_string(),
    )
    .await;
    assert_eq!(status, 204);
    let mut stream = c.stream;
    let rest = stream.rest().await;
    assert_eq!(
        rest.last().unwrap()["push"]["disconnect"]["code"],
        3501,
        "{rest:?}"
    );
    // The streaming endpoints refuse what they cannot start.
    let r = HttpStream::open(&s, "GET", "/connection/sse", "text/plain", "")
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let path = format!("/connection/sse?cf_connect={}", "x".repeat(2000));
    let r = HttpStream::open(&s, "GET", &path, "text/plain", "")
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    let r = HttpStream::open(
        &s,
        "POST",
        "/connection/http_stream",
        "application/json",
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    // The unidirectional stream is JSON only.
    let r = HttpStream::open(
        &s,
        "POST",
        "/connection/uni_http_stream",
        "application/octet-stream",
        "\x0a\x01",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 415);
    // A Protobuf HTTP stream whose connect is malformed: a disconnect push, then the end.
    let mut r = HttpStream::open(
        &s,
        "POST",
        "/connection/http_stream",
        "application/octet-stream",
        "\x0a\x01",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let push = r.next_proto().await.unwrap().push.unwrap();
    assert_eq!(push.disconnect.unwrap().code, 3501);
    // A Protobuf emulation request that does not decode: 400.
    let status = post_binary(&s, "/emulation", b"\xff\xff\xff")
        .await
        .unwrap();
    assert_eq!(status, 400);
    s.shutdown().await;
}

#[tokio::test]
async fn protobuf_http_stream_with_protobuf_emulation() {
    let s = start("").await;
    let connect = proto::Command {
        id: 1,
        connect: Some(proto::ConnectRequest {
            token: token("pb-stream", 3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut st = HttpStream::open_with(
        &s,
        "POST",
        "/connection/http_stream",
        "application/octet-stream",
        &proto::encode_command(&connect),
        None,
    )
    .await
    .unwrap();
    assert_eq!(st.status, 200);
    assert_eq!(
        st.header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    let r = st.next_proto().await.unwrap();
    let c = r.connect.expect("connect reply");
    assert!(!c.session.is_empty() && !c.node.is_empty());
    // Two commands in one emulation request, Protobuf-encoded.
    let subscribe = |id, ch: &str| proto::Command {
        id,
        subscribe: Some(proto::SubscribeRequest {
            channel: ch.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let body = proto::encode_emulation_request(&proto::EmulationRequest {
        node: c.node.clone(),
        session: c.session.clone(),
        data: proto::concat([
            proto::encode_command(&subscribe(2, "pa")),
            proto::encode_command(&subscribe(3, "pb")),
        ])
        .to_vec(),
    });
    let status = post_binary(&s, "/emulation", &body).await.unwrap();
    assert_eq!(status, 204);
    let mut ids = Vec::new();
    while ids.len() < 2 {
        let r = st.next_proto().await.unwrap();
        if r.subscribe.is_some() {
            ids.push(r.id);
        }
    }
    ids.sort();
    assert_eq!(ids, [2, 3]);
    publish(&s, "pb", json!({"via": "stream"})).await.unwrap();
    let p = loop {
        let r = st.next_proto().await.unwrap();
        if let Some(p) = r.push.and_then(|p| p.r#pub) {
            break p;
        }
    };
    assert_eq!(p.data, br#"{"via":"stream"}"#);
    s.shutdown().await;
}

#[tokio::test]
async fn invalid_token_on_a_stream_is_a_disconnect_push() {
    let s = start("").await;
    let connect = json!({"id": 1, "connect": {"token": "not.a.jwt"}});
    let mut st = HttpStream::open(
        &s,
        "POST",
        "/connection/http_stream",
        "application/json",
        &connect.to_string(),
    )
    .await
    .unwrap();
    let rest = st.rest().await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0]["push"]["disconnect"]["code"], 3500);
    assert!(st.ended);
    s.shutdown().await;
}

#[tokio::test]
async fn emulated_pings_need_pongs_like_websocket() {
    let s = start("ping_interval = \"1s\"\npong_timeout = \"800ms\"").await;
    let mut answering = Emulated::sse(&s, "pinged").await.unwrap();
    let mut silent = Emulated::http_stream(&s, "quiet").await.unwrap();
    // Answer two pings through /emulation: still connected after the pong deadline.
    for _ in 0..2 {
        assert_eq!(answering.stream.next().await.unwrap(), json!({}));
        assert_eq!(answering.send(&s, &[json!({})]).await.unwrap(), 204);
    }
    let r = answering
        .call(&s, 2, "presence_stats", json!({"channel": "room"}))
        .await
        .unwrap();
    assert!(
        r["error"]["code"].is_number(),
        "connected (not subscribed): {r}"
    );
    // The one that does not answer is closed with 3012.
    assert_eq!(silent.stream.next().await.unwrap(), json!({}));
    let rest = silent.stream.rest().await;
    assert_eq!(
        rest.last().unwrap()["push"]["disconnect"]["code"],
        3012,
        "{rest:?}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn closed_stream_leaves_its_channels() {
    let s = start("").await;
    let (mut watcher, _) = Client::connect(&s, "watcher").await.unwrap();
    watcher
        .call(
            2,
            "subscribe",
            json!({"channel": "lobby", "join_leave": true}),
        )
        .await
        .unwrap();
    let mut c = Emulated::http_stream(&s, "leaver").await.unwrap();
    c.call(&s, 2, "subscribe", json!({"channel": "lobby"}))
        .await
        .unwrap();
    let join = watcher.next().await.unwrap();
    assert_eq!(join["push"]["join"]["info"]["user"], "leaver", "{join}");
    // The client goes away without a word: the server notices and cleans up.
    drop(c);
    let leave = watcher.next().await.unwrap();
    assert_eq!(leave["push"]["leave"]["info"]["user"], "leaver", "{leave}");
    s.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_streams_with_3001() {
    let s = start("").await; // the test config has no drain window
    let mut bidi = Emulated::sse(&s, "stays").await.unwrap();
    let mut uni = HttpStream::open(
        &s,
        "POST",
        "/connection/uni_http_stream",
        "application/json",
        &json!({"token": uni_token("stays-too", &["x"])}).to_string(),
    )
    .await
    .unwrap();
    assert!(uni.next_msg().await.unwrap().get("connect").is_some());
    tokio::time::timeout(Duration::from_secs(10), s.shutdown())
        .await
        .expect("shutdown completes with streams open");
    let rest = bidi.stream.rest().await;
    assert_eq!(
        rest.last().unwrap()["push"]["disconnect"]["code"],
        3001,
        "{rest:?}"
    );
    assert!(bidi.stream.ended);
    let rest = uni.rest().await;
    assert_eq!(rest.last().unwrap()["disconnect"]["code"], 3001, "{rest:?}");
}

// ---- unidirectional --------------------------------------------------------------------

fn uni_token(user: &str, channels: &[&str]) -> String {
    token_with(json!({"sub": user, "channels": channels}), 3600)
}

async fn uni_flow(s: &Server, mut st: HttpStream, channel: &str) {
    assert_eq!(st.status, 200);
    let first = st.next_msg().await.unwrap();
    let c = &first["connect"];
    assert!(c["client"].is_string(), "{first}");
    assert!(c.get("pong").is_none(), "no pong expected: {first}");
    assert_eq!(c["subs"][channel]["recoverable"], true, "{first}");
    publish(s, channel, json!({"n": 1})).await.unwrap();
    let p = st.next_msg().await.unwrap();
    // A bare push: no "push" wrapper.
    assert_eq!(p["channel"], channel, "{p}");
    assert_eq!(p["pub"]["data"], json!({"n": 1}));
}

#[tokio::test]
async fn uni_http_stream_receives_api_publications_and_recovers() {
    let s = start("").await;
    let body = json!({"token": uni_token("dev", &["sensors"])}).to_string();
    let st = HttpStream::open(
        &s,
        "POST",
        "/connection/uni_http_stream",
        "application/json",
        &body,
    )
    .await
    .unwrap();
    uni_flow(&s, st, "sensors").await;
    let pos = publish(&s, "sensors", json!({"n": 2})).await.unwrap();
    publish(&s, "sensors", json!({"n": 3})).await.unwrap();

    // Reconnect from offset of n=1: gets n=2 and n=3 in the connect push, in order.
    let from = pos["offset"].as_u64().unwrap() - 1;
    let body = json!({
        "token": uni_token("dev", &["sensors"]),
        "subs": {"sensors": {"recover": true, "epoch": pos["epoch"], "offset": from}},
    })
    .to_string();
    let mut st = HttpStream::open(
        &s,
        "POST",
        "/connection/uni_http_stream",
        "application/json",
        &body,
    )
    .await
    .unwrap();
    let first = st.next_msg().await.unwrap();
    let sub = &first["connect"]["subs"]["sensors"];
    assert_eq!(sub["recovered"], true, "{first}");
    let data: Vec<Value> = sub["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(data, vec![json!({"n": 2}), json!({"n": 3})]);
    s.shutdown().await;
}

#[tokio::test]
async fn uni_sse_get_and_post_receive_api_publications() {
    let s = start("").await;
    let req = json!({"token": uni_token("dev", &["feed"])}).to_string();
    let path = format!("/connection/uni_sse?cf_connect={}", urlencode(&req));
    let st = HttpStream::open(&s, "GET", &path, "text/plain", "")
        .await
        .unwrap();
    assert!(st.sse);
    uni_flow(&s, st, "feed").await;
    let st = HttpStream::open(&s, "POST", "/connection/uni_sse", "application/json", &req)
        .await
        .unwrap();
    assert!(st.sse);
    uni_flow(&s, st, "feed").await;
    s.shutdown().await;
}

/// The unidirectional streams are served on the socket, outside the HTTP library: the
/// request forms clients use must all work there.
#[tokio::test]
async fn uni_streams_take_chunked_bodies_expect_continue_and_http_10() {
    let s = start("max_message_size = 4096").await;
    let body = json!({"token": uni_token("dev", &["c1"])}).to_string();

    // A chunked body in two chunks, with a trailer.
    let (a, b) = body.split_at(10);
    let req = format!(
        "POST /connection/uni_http_stream HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Trailer: 1\r\n\r\n",
        a.len(),
        b.len()
    );
    let st = HttpStream::raw(&s, req.as_bytes()).await.unwrap();
    // The connection closes when the stream ends: it is never reused for another request.
    assert_eq!(st.header("connection").as_deref(), Some("close"));
    assert_eq!(
        st.header("cache-control").as_deref(),
        Some("private, no-cache, no-store, must-revalidate, max-age=0")
    );
    uni_flow(&s, st, "c1").await;

    // Expect: 100-continue: the body follows the interim answer.
    let mut sock = TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /connection/uni_sse HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut got = vec![0u8; interim.len()];
    tokio::time::timeout(WAIT, sock.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, interim);
    sock.write_all(body.as_bytes()).await.unwrap();
    let st = HttpStream::attach(sock, Vec::new()).await.unwrap();
    assert!(st.sse);
    uni_flow(&s, st, "c1").await;

    // HTTP/1.0: no chunked encoding; the body ends with the connection.
    let req = format!(
        "POST /connection/uni_http_stream HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let st = HttpStream::raw(&s, req.as_bytes()).await.unwrap();
    assert_eq!(st.header("transfer-encoding"), None);
    uni_flow(&s, st, "c1").await;
    s.shutdown().await;
}

#[tokio::test]
async fn uni_stream_requests_that_cannot_be_served_get_http_errors() {
    let s = start("max_message_size = 4096").await;
    let token = uni_token("dev", &["c1"]);
    let cases: Vec<(String, u16)> = vec![
        // Larger than client.max_message_size, declared or chunked.
        (
            "POST /connection/uni_http_stream HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n\r\n".into(),
            413,
        ),
        (
            format!(
                "POST /connection/uni_sse HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\n{}\r\n0\r\n\r\n",
                "x".repeat(0x2000)
            ),
            413,
        ),
        // Bad chunked encoding, an unknown transfer coding, two lengths.
        (
            "POST /connection/uni_sse HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".into(),
            400,
        ),
        (
            "POST /connection/uni_sse HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n".into(),
            501,
        ),
        (
            "POST /connection/uni_sse HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".into(),
            400,
        ),
        // Protobuf is not spoken here; a malformed connect request.
        (
            "POST /connection/uni_http_stream HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\nContent-Length: 2\r\n\r\n{}".into(),
            415,
        ),
        (
            "GET /connection/uni_sse?cf_connect=%5B%5B HTTP/1.1\r\nHost: t\r\n\r\n".into(),
            400,
        ),
        // A head that is not HTTP after the request line.
        (
            "GET /connection/uni_sse?cf_connect=%7B%7D HTTP/1.1\r\nnot a header\r\n\r\n".into(),
            400,
        ),
        // A head past its limit (three times the message size and 16 KiB).
        (
            format!(
                "GET /connection/uni_sse?cf_connect=%7B%7D HTTP/1.1\r\nX-Big: {}\r\n\r\n",
                "a".repeat(40 << 10)
            ),
            431,
        ),
    ];
    for (req, status) in cases {
        let mut st = HttpStream::raw(&s, req.as_bytes()).await.unwrap();
        assert_eq!(st.status, status, "{req:.120}");
        assert_eq!(st.header("connection").as_deref(), Some("close"));
        // The connection closes after the answer.
        while st.read_more().await.is_ok() {}
    }
    // The node still serves streams.
    let req = format!(
        "/connection/uni_sse?cf_connect={}",
        urlencode(&json!({"token": token}).to_string())
    );
    let st = HttpStream::open(&s, "GET", &req, "text/plain", "")
        .await
        .unwrap();
    uni_flow(&s, st, "c1").await;
    s.shutdown().await;
}

#[tokio::test]
async fn uni_connect_refused_is_a_disconnect() {
    let s = start("").await;
    let expired = token_with(json!({"sub": "dev"}), -10);
    let body = json!({"token": expired}).to_string();
    let mut st = HttpStream::open(
        &s,
        "POST",
        "/connection/uni_http_stream",
        "application/json",
        &body,
    )
    .await
    .unwrap();
    let rest = st.rest().await;
    assert_eq!(
        rest,
        vec![
            json!({"disconnect": {"code": 3005, "reason": "connection expired", "reconnect": true}})
        ]
    );
    // No token and no anonymous access.
    let mut st = HttpStream::open(
        &s,
        "POST",
        "/connection/uni_http_stream",
        "application/json",
        "",
    )
    .await
    .unwrap();
    let rest = st.rest().await;
    assert_eq!(rest[0]["disconnect"]["code"], 3500, "{rest:?}");
    assert_eq!(rest[0]["disconnect"]["reconnect"], false);
    let st = HttpStream::open(
        &s,
        "POST",
        "/connection/uni_sse",
        "application/json",
        "{\"token\":",
    )
    .await
    .unwrap();
    assert_eq!(st.status, 400);
    s.shutdown().await;
}

#[tokio::test]
async fn uni_pings_expect_no_pong() {
    let s = start("ping_interval = \"1s\"\npong_timeout = \"800ms\"").await;
    let body = json!({"token": uni_token("dev", &["quiet"])}).to_string();
    let mut st = HttpStream::open(&s, "POST", "/connection/uni_sse", "application/json", &body)
        .await
        .unwrap();
    assert!(st.next().await.unwrap().get("connect").is_some());
    // Two pings, past the pong timeout, and still delivering.
    assert_eq!(st.next().await.unwrap(), json!({}));
    assert_eq!(st.next().await.unwrap(), json!({}));
    publish(&s, "quiet", json!("still here")).await.unwrap();
    assert_eq!(st.next_msg().await.unwrap()["pub"]["data"], "still here");
    s.shutdown().await;
}

#[tokio::test]
async fn uni_websocket_receives_api_publications() {
    let s = start("").await;
    let url = format!("ws://{}/connection/uni_websocket", s.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text(
        json!({"token": uni_token("dev", &["ws-feed"])}).to_string(),
    ))
    .await
    .unwrap();
    let mut next = async || -> Result<Value> {
        loop {
            let m = tokio::time::timeout(WAIT, ws.next())
                .await?
                .ok_or_else(|| anyhow!("ended"))??;
            match m {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str())?;
                    if v != json!({}) {
                        return Ok(v);
                    }
                }
                Message::Close(f) => bail!("closed: {f:?}"),
                _ => {}
            }
        }
    };
    let first = next().await.unwrap();
    assert!(first["connect"]["subs"].get("ws-feed").is_some(), "{first}");
    publish(&s, "ws-feed", json!({"n": 1})).await.unwrap();
    publish(&s, "ws-feed", json!({"n": 2})).await.unwrap();
    for n in 1..=2 {
        let p = next().await.unwrap();
        assert_eq!(p["channel"], "ws-feed");
        assert_eq!(p["pub"]["data"]["n"], n);
    }
    // The server API disconnect: a disconnect push, then the close frame with the code.
    api(&s, "disconnect", json!({"user": "dev"})).await.unwrap();
    let d = next().await.unwrap();
    assert_eq!(d["disconnect"]["code"], 3503, "{d}");
    let closed = next().await.unwrap_err().to_string();
    assert!(closed.contains("3503"), "{closed}");
    s.shutdown().await;
}

#[tokio::test]
async fn uni_websocket_connect_from_query() {
    let s = start("").await;
    let req = json!({"token": uni_token("dev", &["q"])}).to_string();
    let url = format!(
        "ws://{}/connection/uni_websocket?cf_connect={}",
        s.addr,
        urlencode(&req)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let m = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
    assert!(v["connect"]["subs"].get("q").is_some(), "{v}");
    s.shutdown().await;
}

// ---- limits ----------------------------------------------------------------------------

#[tokio::test]
async fn slow_stream_reader_is_disconnected_others_unaffected() {
    let s = start("max_queue_bytes = 65536").await;
    let connect = json!({"id": 1, "connect": {"token": token("slow", 3600)}});
    let stalled = HttpStream::open_with(
        &s,
        "POST",
        "/connection/http_stream",
        "application/json",
        connect.to_string().as_bytes(),
        Some(4096),
    )
    .await
    .unwrap();
    let mut slow = Emulated::connected(stalled).await.unwrap();
    slow.call(&s, 2, "subscribe", json!({"channel": "firehose"}))
        .await
        .unwrap();
    let mut good = Emulated::sse(&s, "good").await.unwrap();
    good.call(&s, 2, "subscribe", json!({"channel": "firehose"}))
        .await
        .unwrap();
    let mut uni = HttpStream::open(
        &s,
        "POST",
        "/connection/uni_http_stream",
        "application/json",
        &json!({"token": uni_token("uni", &["firehose"])}).to_string(),
    )
    .await
    .unwrap();
    assert!(uni.next_msg().await.unwrap().get("connect").is_some());

    let payload = "y".repeat(16 * 1024);
    let n = 600; // ~10 MB: more than the socket buffers can hold for the stalled reader.
    let server = std::sync::Arc::new(s);
    let p = server.clone();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            publish(&p, "firehose", json!({"i": i, "p": payload}))
                .await
                .unwrap();
        }
    });
    // The readers that keep reading get everything, in order (the slow one stops reading).
    let uni_reader = tokio::spawn(async move {
        for i in 0..n {
            let v = uni.next_msg().await.unwrap();
            assert_eq!(v["pub"]["data"]["i"], i);
        }
        uni // kept open until the end
    });
    for i in 0..n {
        let pb = good.publication("firehose").await.unwrap();
        assert_eq!(pb["data"]["i"], i);
    }
    let _uni = uni_reader.await.unwrap();
    publisher.await.unwrap();
    // The stalled one was cut off: it never gets all n publications. (It is told 3008 only
    // if it reads again within the goodbye timeout, like a WebSocket's close frame.)
    let rest = slow.stream.rest().await;
    let got = rest
        .iter()
        .filter(|v| v["push"].get("pub").is_some())
        .count();
    assert!(got < n, "slow consumer got everything ({got})");
    for v in rest
        .iter()
        .filter(|v| v["push"].get("disconnect").is_some())
    {
        assert_eq!(v["push"]["disconnect"]["code"], 3008);
    }
    let info = api(&server, "info", json!({})).await.unwrap();
    assert_eq!(info["result"]["nodes"][0]["num_clients"], 2);
}

/// In a cluster, `/emulation` may land on any node: it is routed to the node that holds the
/// stream through the engine.
#[tokio::test]
async fn emulation_is_routed_to_the_node_holding_the_stream() {
    require_redis(REDIS).await;
    let prefix = format!("herald-test-{}", herald_core::node::new_id());
    let cfg = config("").replace(
        "[api]",
        &format!("[engine]\ntype = \"redis\"\n[engine.redis]\nprefix = \"{prefix}\"\nnode_heartbeat = \"100ms\"\nnode_eviction = \"1s\"\n[api]"),
    );
    let a = start_with(&cfg).await;
    let b = start_with(&cfg).await;
    // b must have heard of a before it can route to it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while b.node.engine.peers().iter().all(|p| p.uid != a.node.id) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nodes did not see each other"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut c = Emulated::http_stream(&a, "roamer").await.unwrap();
    let r = c
        .call(&b, 2, "subscribe", json!({"channel": "room"}))
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some(), "{r}");
    publish(&b, "room", json!("via b")).await.unwrap();
    assert_eq!(c.publication("room").await.unwrap()["data"], "via b");
    // A session token that no node holds is not delivered anywhere (and not an error).
    let bogus = json!({"node": a.node.id, "session": "nope", "data": "{\"id\":3,\"presence\":{\"channel\":\"room\"}}"});
    let (status, _) = http(&b, "POST", "/emulation", None, &bogus.to_string())
        .await
        .unwrap();
    assert_eq!(status, 204);
    a.shutdown().await;
    b.shutdown().await;
}
