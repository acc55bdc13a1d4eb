//! Test support: a real Herald node on 127.0.0.1:0 and a WebSocket client built on a
//! different WebSocket implementation (tokio-tungstenite) than the server's.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use herald_server::{Config, Server};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod proto;

pub const SECRET: &str = "test-secret";
pub const API_KEY: &str = "test-api-key";
pub const WAIT: Duration = Duration::from_secs(5);

/// A config with a permissive "" namespace (history 10), "big" (history 10000), a "news"
/// namespace (history 3) where clients may not publish, and whatever `extra` TOML adds.
pub fn config(extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "3s"
[client]
token_hmac_secret = "{SECRET}"
{extra}
[api]
key = "{API_KEY}"
[shutdown]
drain_duration = "0s"
[[namespaces]]
name = ""
history_size = 10
history_ttl = "5m"
force_recovery = true
allow_subscribe_for_client = true
allow_publish_for_subscriber = true
allow_history_for_subscriber = true
allow_presence_for_subscriber = true
presence = true
join_leave = true
[[namespaces]]
name = "big"
history_size = 10000
history_ttl = "5m"
force_recovery = true
allow_subscribe_for_client = true
[[namespaces]]
name = "news"
history_size = 3
history_ttl = "5m"
force_recovery = true
allow_subscribe_for_client = true
"#
    )
}

pub async fn start(extra: &str) -> Server {
    start_with(&config(extra)).await
}

pub async fn start_with(toml: &str) -> Server {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cfg = Config::from_toml(toml).expect("test config");
    herald_server::start(cfg).await.expect("server starts")
}

pub fn token(user: &str, ttl_secs: i64) -> String {
    token_with(json!({"sub": user}), ttl_secs)
}

pub fn token_with(mut claims: Value, ttl_secs: i64) -> String {
    let now = herald_core::auth::unix_now() as i64;
    claims["exp"] = json!(now + ttl_secs);
    herald_core::auth::sign_hs256(SECRET, &claims).expect("signing a test token")
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending: VecDeque<Value>,
    pub close: Option<(u16, String)>,
}

impl Client {
    pub async fn open(server: &Server) -> Result<Self> {
        Self::open_at(server.addr).await
    }

    /// Opens to a node listening at `addr` (one started outside `start`).
    pub async fn open_at(addr: SocketAddr) -> Result<Self> {
        let url = format!("ws://{addr}/connection/websocket");
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self {
            ws,
            pending: VecDeque::new(),
            close: None,
        })
    }

    /// Opens with extra request headers (a cookie, an `Origin`).
    pub async fn open_with(server: &Server, headers: &[(&str, &str)]) -> Result<Self> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("ws://{}/connection/websocket", server.addr);
        let mut req = url.into_client_request()?;
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())?,
                v.parse()?,
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Self {
            ws,
            pending: VecDeque::new(),
            close: None,
        })
    }

    /// Opens, connects with a token for `user` and checks the reply.
    /// Sends connect with `token` on a fresh connection: Ok(the client and its reply, which
    /// may be an error reply) or Err(the close code, 0 for none) when the server closed.
    pub async fn try_connect(
        server: &Server,
        token: &str,
    ) -> std::result::Result<(Self, Value), u16> {
        let mut c = Self::open(server).await.map_err(|_| 0u16)?;
        c.send(json!({"id": 1, "connect": {"token": token}}))
            .await
            .map_err(|_| 0u16)?;
        match c.reply(1).await {
            Ok(r) => Ok((c, r)),
            Err(_) => Err(c.close.map(|(code, _)| code).unwrap_or(0)),
        }
    }

    pub async fn connect(server: &Server, user: &str) -> Result<(Self, Value)> {
        let mut c = Self::open(server).await?;
        c.send(json!({"id": 1, "connect": {"token": token(user, 3600)}}))
            .await?;
        let r = c.reply(1).await?;
        if r.get("connect").is_none() {
            bail!("connect failed: {r}");
        }
        Ok((c, r))
    }

    pub async fn send(&mut self, v: Value) -> Result<()> {
        self.send_text(v.to_string()).await
    }

    pub async fn send_text(&mut self, s: String) -> Result<()> {
        self.ws.send(Message::text(s)).await?;
        Ok(())
    }

    pub async fn send_raw(&mut self, m: Message) -> Result<()> {
        self.ws.send(m).await?;
        Ok(())
    }

    /// The next message from the server (pings `{}` are answered and skipped).
    pub async fn next(&mut self) -> Result<Value> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                if v == json!({}) {
                    self.send(json!({})).await?;
                    continue;
                }
                return Ok(v);
            }
            self.read_frame().await?;
        }
    }

    /// The next message including pings.
    pub async fn next_raw(&mut self) -> Result<Value> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                return Ok(v);
            }
            self.read_frame().await?;
        }
    }

    async fn read_frame(&mut self) -> Result<()> {
        let msg = tokio::time::timeout(WAIT, self.ws.next())
            .await
            .context("timed out waiting for the server")?
            .ok_or_else(|| anyhow!("connection ended"))??;
        match msg {
            Message::Text(t) => {
                for line in t.as_str().split('\n') {
                    self.pending.push_back(serde_json::from_str(line)?);
                }
            }
            Message::Close(f) => {
                self.close =
                    f.map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string()));
                bail!("closed: {:?}", self.close);
            }
            _ => {}
        }
        Ok(())
    }

    /// Waits for the reply with this id, keeping pushes that come first.
    pub async fn reply(&mut self, id: u64) -> Result<Value> {
        let mut skipped = VecDeque::new();
        loop {
            let v = self.next().await?;
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                for s in skipped.into_iter().rev() {
                    self.pending.push_front(s);
                }
                return Ok(v);
            }
            skipped.push_back(v);
        }
    }

    /// Sends a command and waits for its reply.
    pub async fn call(&mut self, id: u64, method: &str, params: Value) -> Result<Value> {
        self.send(json!({"id": id, method: params})).await?;
        self.reply(id).await
    }

    /// The next publication push of `channel`.
    pub async fn publication(&mut self, channel: &str) -> Result<Value> {
        loop {
            let v = self.next().await?;
            if v["push"]["channel"] == channel && v["push"].get("pub").is_some() {
                return Ok(v["push"]["pub"].clone());
            }
        }
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn closed(&mut self) -> Result<(u16, String)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::time::Instant::now() > deadline {
                bail!("no close within 15s");
            }
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => {
                    return Ok(f
                        .map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string()))
                        .unwrap_or((1005, String::new())));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => bail!("connection broke without a close frame: {e}"),
                Ok(None) => bail!("connection ended without a close frame"),
                Err(_) => continue,
            }
        }
    }
}

/// A minimal HTTP/1.1 request to the server, with the API key when given; returns (status,
/// body as JSON, or as a JSON string when it is not JSON).
pub async fn http(
    server: &Server,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Result<(u16, Value)> {
    let headers: Vec<(&str, &str)> = key.map(|k| vec![("X-API-Key", k)]).unwrap_or_default();
    let r = request(server.addr, method, path, &headers, body).await?;
    let json = serde_json::from_str(&r.body).unwrap_or(Value::String(r.body));
    Ok((r.status, json))
}

pub struct HttpReply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// One HTTP/1.1 request with arbitrary headers to `addr`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<HttpReply> {
    let mut s = TcpStream::connect(addr).await?;
    let mut extra = String::new();
    for (k, v) in headers {
        extra.push_str(&format!("{k}: {v}\r\n"));
    }
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP head in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("no status"))?
        .parse()?;
    Ok(HttpReply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// The admin API's `/admin/api/stats` at `addr`, logged in with `password`.
pub async fn admin_stats(addr: SocketAddr, password: &str) -> Result<Value> {
    let login = request(
        addr,
        "POST",
        "/admin/api/login",
        &[],
        &json!({ "password": password }).to_string(),
    )
    .await?;
    let token = login.json()["token"]
        .as_str()
        .ok_or_else(|| anyhow!("admin login refused: {}", login.body))?
        .to_string();
    let bearer = format!("Bearer {token}");
    let stats = request(
        addr,
        "GET",
        "/admin/api/stats",
        &[("Authorization", &bearer)],
        "",
    )
    .await?;
    Ok(stats.json())
}

/// A scrape of `/metrics`: series (`name{k="v",…}`) → value.
#[derive(Debug, Default)]
pub struct Scrape(pub BTreeMap<String, f64>);

impl Scrape {
    pub async fn take(addr: SocketAddr) -> Result<Self> {
        let r = request(addr, "GET", "/metrics", &[], "").await?;
        if r.status != 200 {
            bail!("/metrics: HTTP {}: {}", r.status, r.body);
        }
        if !r
            .head
            .to_ascii_lowercase()
            .contains("content-type: text/plain")
        {
            bail!("/metrics is not text/plain: {}", r.head);
        }
        Ok(Self::parse(&r.body))
    }

    pub fn parse(text: &str) -> Self {
        let mut m = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((series, value)) = line.rsplit_once(' ')
                && let Ok(v) = value.parse::<f64>()
            {
                m.insert(series.to_string(), v);
            }
        }
        Self(m)
    }

    /// The value of `name` with exactly these labels (in any order); 0 when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        want.sort();
        for (series, v) in &self.0 {
            let (n, l) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series.as_str(), ""),
            };
            if n != name {
                continue;
            }
            let mut got: Vec<String> = if l.is_empty() {
                Vec::new()
            } else {
                l.split(',').map(str::to_string).collect()
            };
            got.sort();
            if got == want {
                return *v;
            }
        }
        0.0
    }
}

/// Calls `POST /api/<method>` with the right key and returns the JSON body.
pub async fn api(server: &Server, method: &str, params: Value) -> Result<Value> {
    let (status, v) = http(
        server,
        "POST",
        &format!("/api/{method}"),
        Some(API_KEY),
        &params.to_string(),
    )
    .await?;
    if status != 200 {
        bail!("api {method}: HTTP {status}: {v}");
    }
    Ok(v)
}

pub async fn publish(server: &Server, channel: &str, data: Value) -> Result<Value> {
    let v = api(server, "publish", json!({"channel": channel, "data": data})).await?;
    v.get("result")
        .cloned()
        .ok_or_else(|| anyhow!("publish failed: {v}"))
}

/// Polls `check` until it holds; fails the test with `what` after 10 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Redis the cluster tests use.
pub const REDIS: &str = "redis://127.0.0.1:6379";

/// Fails with a clear message when the Redis at `url` is not running.
pub async fn require_redis(url: &str) {
    let addr = url.trim_start_matches("redis://");
    if TcpStream::connect(addr).await.is_err() {
        panic!(
            "this test needs Redis at {url} (start it: redis-server --port 6379 --daemonize yes)"
        );
    }
}

/// The test config ([`config`]) on the engine whose `[engine]` tables are given
/// ([`redis_engine`], [`nats_engine`]).
pub fn config_on(engine: &str) -> String {
    config("").replace("[api]", &format!("{engine}[api]"))
}

/// The `[engine]` tables of a node on the Redis at `url`, under its own key `prefix`, with
/// fast heartbeats so membership changes show within a second.
pub fn redis_engine(prefix: &str, url: &str) -> String {
    format!(
        "[engine]\ntype = \"redis\"\n[engine.redis]\nurl = \"{url}\"\nprefix = \"{prefix}\"\nnode_heartbeat = \"200ms\"\nnode_eviction = \"1s\"\npresence_ttl = \"2s\"\ncommand_timeout = \"1s\"\n"
    )
}

/// The NATS (with JetStream) the cluster tests use.
pub const NATS: &str = "nats://127.0.0.1:4222";

/// The `[engine]` tables of a node on the NATS at `url`, under its own stream `prefix`,
/// with fast heartbeats and short timeouts.
pub fn nats_engine(prefix: &str, url: &str) -> String {
    format!(
        "[engine]\ntype = \"nats\"\n[engine.nats]\nservers = [\"{url}\"]\nprefix = \"{prefix}\"\nnode_heartbeat = \"200ms\"\nnode_eviction = \"1s\"\npresence_ttl = \"2s\"\nrequest_timeout = \"1s\"\nconnect_timeout = \"1s\"\n"
    )
}

/// Fails with a clear message when the NATS these tests need is not running.
pub async fn require_nats(url: &str) {
    let addr = url.trim_start_matches("nats://");
    if tokio::net::TcpStream::connect(addr).await.is_err() {
        panic!(
            "this test needs nats-server with JetStream at {url} (start it: nats-server -js -a 127.0.0.1 -p 4222)"
        );
    }
}

/// Drops the JetStream streams a test created (plain NATS protocol, best effort), so runs
/// leave nothing behind on the shared server.
pub fn delete_nats_streams(url: &str, prefix: &str) {
    use std::io::{BufRead, Write};
    let Ok(stream) = std::net::TcpStream::connect(url.trim_start_matches("nats://")) else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    let _ = reader.read_line(&mut line); // INFO
    let mut w = stream;
    let mut cmds = String::from("CONNECT {\"verbose\":false}\r\n");
    for s in ["history", "presence", "state"] {
        cmds.push_str(&format!("PUB $JS.API.STREAM.DELETE.{prefix}_{s} 0\r\n\r\n"));
    }
    cmds.push_str("PING\r\n");
    let _ = w.write_all(cmds.as_bytes());
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(n) if n > 0 && !line.starts_with("PONG") => continue,
            _ => break,
        }
    }
}

/// A port free on 127.0.0.1 now (for a child server to bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The mask key of the raw WebSocket frames tests write.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A raw client WebSocket frame (masked, as clients must); `first` is the FIN/RSV/opcode byte.
pub fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else if n <= 0xffff {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(&MASK);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    f
}

/// Opens a WebSocket by hand on `path` with extra request header lines; returns the socket
/// after the 101 response, and the response head.
pub async fn raw_upgrade(
    addr: std::net::SocketAddr,
    path: &str,
    extra: &str,
) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "closed during the handshake");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}
