//! Transport security through real sockets: TLS on every listener with a certificate that is
//! swapped without dropping connections, the WebSocket `Origin` check, the node connection
//! limit, the handshake timeout, and the server API on its own listener.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

// ---- certificates ---------------------------------------------------------------------------

struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        Self {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A certificate for localhost and 127.0.0.1: (chain PEM, key PEM, leaf DER).
    fn leaf(&self) -> (String, String, CertificateDer<'static>) {
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "herald-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the pair the way a certificate manager does: new files renamed over the old ones.
fn install(dir: &Path, cert_pem: &str, key_pem: &str) {
    std::fs::write(dir.join("key.pem.tmp"), key_pem).unwrap();
    std::fs::write(dir.join("cert.pem.tmp"), cert_pem).unwrap();
    std::fs::rename(dir.join("key.pem.tmp"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.pem.tmp"), dir.join("cert.pem")).unwrap();
}

fn connector(roots: &[CertificateDer<'static>]) -> TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls(
    addr: std::net::SocketAddr,
    c: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    c.connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn peer_leaf(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// A raw HTTP/1.1 request on any stream; returns (status, body).
async fn http_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // A TLS peer may end without close_notify; what was read counts.
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

// ---- a WebSocket client over any stream -----------------------------------------------------

struct Ws<S> {
    ws: WebSocketStream<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ws<S> {
    async fn open(stream: S) -> Self {
        let (ws, _) =
            tokio_tungstenite::client_async("wss://localhost/connection/websocket", stream)
                .await
                .unwrap();
        Self { ws }
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// The next message that is not a ping.
    async fn next(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a message in time")
                .expect("the connection is open")
                .unwrap();
            if let Message::Text(t) = m {
                for line in t.as_str().split('\n') {
                    let v: Value = serde_json::from_str(line).unwrap();
                    if v != json!({}) {
                        return v;
                    }
                }
            }
        }
    }

    async fn connected(stream: S, user: &str) -> Self {
        let mut c = Self::open(stream).await;
        c.send(json!({"id": 1, "connect": {"token": token(user, 600)}}))
            .await;
        let r = c.next().await;
        assert!(r.get("connect").is_some(), "{r}");
        c
    }
}

// ---- TLS --------------------------------------------------------------------------------------

async fn start_tls(dir: &Path, extra: &str) -> herald_server::Server {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    start_with(&config(extra).replacen(
        "[server]\n",
        &format!(
            "[server]\ntls_cert = {:?}\ntls_key = {:?}\n",
            cert.to_str().unwrap(),
            key.to_str().unwrap()
        ),
        1,
    ))
    .await
}

#[tokio::test]
async fn tls_for_clients_and_api_with_live_certificate_reload() {
    let dir = TempDir::new("tls");
    let (ca1, ca2) = (Ca::new("Herald test CA 1"), Ca::new("Herald test CA 2"));
    let (cert1, key1, leaf1) = ca1.leaf();
    install(&dir.0, &cert1, &key1);
    let s = start_tls(&dir.0, "").await;
    assert!(s.tls);
    let both = connector(&[ca1.der(), ca2.der()]);
    let only_ca1 = connector(&[ca1.der()]);

    // A WebSocket client over TLS subscribes; the API over HTTPS publishes to it.
    let stream = tls(s.addr, &both).await.unwrap();
    assert_eq!(peer_leaf(&stream), leaf1);
    let mut c = Ws::connected(stream, "alice").await;
    c.send(json!({"id": 2, "subscribe": {"channel": "room"}}))
        .await;
    assert!(c.next().await.get("subscribe").is_some());
    let publish = |data: Value| {
        let both = both.clone();
        let addr = s.addr;
        async move {
            let (status, body) = http_on(
                tls(addr, &both).await.unwrap(),
                "POST",
                "/api/publish",
                &format!("X-API-Key: {API_KEY}\r\n"),
                &json!({"channel": "room", "data": data}).to_string(),
            )
            .await;
            assert_eq!(status, 200, "{body}");
        }
    };
    publish(json!("before")).await;
    assert_eq!(c.next().await["push"]["pub"]["data"], "before");

    // Plain HTTP on the TLS port is refused; the node carries on.
    let (status, _) = http_on(
        TcpStream::connect(s.addr).await.unwrap(),
        "GET",
        "/health",
        "",
        "",
    )
    .await;
    assert_eq!(
        status, 0,
        "plain HTTP must not be answered on a TLS listener"
    );

    // Renewal: a certificate from another CA is installed; new handshakes get it without a
    // restart, and the open connection is not dropped.
    let (cert2, key2, leaf2) = ca2.leaf();
    install(&dir.0, &cert2, &key2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let fresh = tls(s.addr, &both).await.unwrap();
        if peer_leaf(&fresh) == leaf2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        tls(s.addr, &only_ca1).await.is_err(),
        "the old certificate is no longer served"
    );
    publish(json!("after")).await;
    assert_eq!(c.next().await["push"]["pub"]["data"], "after");

    // A broken file keeps the current certificate.
    std::fs::write(dir.0.join("cert.pem"), "not a certificate").unwrap();
    tokio::time::sleep(herald_server::http::tls::FILE_CHECK_INTERVAL * 2).await;
    let fresh = tls(s.addr, &both).await.unwrap();
    assert_eq!(peer_leaf(&fresh), leaf2);
    s.shutdown().await;
}

#[tokio::test]
async fn bad_tls_files_stop_the_node_at_start() {
    let dir = TempDir::new("tlsbad");
    let ca = Ca::new("Herald test CA");
    let (cert, _key, _) = ca.leaf();
    let (_, other_key, _) = ca.leaf();
    install(&dir.0, &cert, &other_key);
    let toml = config("").replacen(
        "[server]\n",
        &format!(
            "[server]\ntls_cert = {:?}\ntls_key = {:?}\n",
            dir.0.join("cert.pem").to_str().unwrap(),
            dir.0.join("key.pem").to_str().unwrap()
        ),
        1,
    );
    let e = herald_server::Config::from_toml(&toml).unwrap_err();
    assert!(e.to_string().contains("server.tls_key"), "{e}");
    let e = herald_server::Config::from_toml(&config("").replacen(
        "[server]\n",
        "[server]\ntls_cert = \"/nonexistent/cert.pem\"\n",
        1,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("server.tls_key"), "{e}");
}

// ---- Origin ---------------------------------------------------------------------------------

async fn ws_with_origin(s: &herald_server::Server, origin: Option<&str>) -> Result<(), u16> {
    let mut req = format!("ws://{}/connection/websocket", s.addr)
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn websocket_origin_check() {
    let s = start(
        "allowed_origins = [\"https://app.example.com\", \"https://*.example.org\", \"http://localhost:*\"]",
    )
    .await;
    assert_eq!(
        ws_with_origin(&s, Some("https://app.example.com")).await,
        Ok(())
    );
    assert_eq!(
        ws_with_origin(&s, Some("https://chat.example.org")).await,
        Ok(())
    );
    assert_eq!(
        ws_with_origin(&s, Some("http://localhost:3000")).await,
        Ok(())
    );
    // Not a browser: no Origin, allowed.
    assert_eq!(ws_with_origin(&s, None).await, Ok(()));
    for bad in [
        "https://evil.com",
        "http://app.example.com",
        "https://app.example.com.evil.com",
        "null",
    ] {
        assert_eq!(ws_with_origin(&s, Some(bad)).await, Err(403), "{bad}");
    }
    // The other transports get the same check.
    let (status, _) = http_on(
        TcpStream::connect(s.addr).await.unwrap(),
        "GET",
        "/connection/uni_sse?cf_connect=%7B%7D",
        "Origin: https://evil.com\r\n",
        "",
    )
    .await;
    assert_eq!(status, 403);
    // The API is not a browser transport: no origin check there (the key protects it).
    let (status, _) = http_on(
        TcpStream::connect(s.addr).await.unwrap(),
        "POST",
        "/api/info",
        &format!("Origin: https://evil.com\r\nX-API-Key: {API_KEY}\r\n"),
        "{}",
    )
    .await;
    assert_eq!(status, 200);
    s.shutdown().await;
    // No list: every origin.
    let s = start("").await;
    assert_eq!(
        ws_with_origin(&s, Some("https://anywhere.test")).await,
        Ok(())
    );
    s.shutdown().await;
}

// ---- limits ---------------------------------------------------------------------------------

#[tokio::test]
async fn node_connection_limit_refuses_with_503() {
    let s = start("max_connections = 2").await;
    let (a, _) = Client::connect(&s, "a").await.unwrap();
    let (_b, _) = Client::connect(&s, "b").await.unwrap();
    assert_eq!(ws_with_origin(&s, None).await, Err(503));
    // The streams served on the socket count the same connections.
    let (status, _) = http_on(
        TcpStream::connect(s.addr).await.unwrap(),
        "GET",
        "/connection/uni_sse?cf_connect=%7B%7D",
        "",
        "",
    )
    .await;
    assert_eq!(status, 503);
    // The API still answers, and a freed slot is taken again.
    api(&s, "info", json!({})).await.unwrap();
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while ws_with_origin(&s, None).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.shutdown().await;
}

/// Reads until the server closes the socket; returns how long that took.
async fn time_to_close(mut s: TcpStream) -> Duration {
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("socket still open after 10s"),
        }
    }
}

#[tokio::test]
async fn sockets_that_never_finish_the_handshake_are_closed() {
    let toml = config("").replacen("[server]\n", "[server]\nhandshake_timeout = \"1s\"\n", 1);
    let s = start_with(&toml).await;
    let (mut c, _) = Client::connect(&s, "steady").await.unwrap();
    c.call(2, "subscribe", json!({"channel": "room"}))
        .await
        .unwrap();
    // Connects and says nothing.
    let idle = TcpStream::connect(s.addr).await.unwrap();
    // Starts a request and never finishes the headers.
    let mut partial = TcpStream::connect(s.addr).await.unwrap();
    partial
        .write_all(b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let (a, b) = tokio::join!(time_to_close(idle), time_to_close(partial));
    assert!(a < Duration::from_secs(5), "idle socket lived {a:?}");
    assert!(b < Duration::from_secs(5), "partial request lived {b:?}");
    // An established WebSocket is not subject to it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish(&s, "room", json!("alive")).await.unwrap();
    assert_eq!(c.publication("room").await.unwrap()["data"], "alive");
    s.shutdown().await;

    // With TLS: a socket that never sends a ClientHello is closed too.
    let dir = TempDir::new("tlsidle");
    let ca = Ca::new("Herald test CA");
    let (cert, key, _) = ca.leaf();
    install(&dir.0, &cert, &key);
    let toml = config("").replacen(
        "[server]\n",
        &format!(
            "[server]\nhandshake_timeout = \"1s\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            dir.0.join("cert.pem").to_str().unwrap(),
            dir.0.join("key.pem").to_str().unwrap()
        ),
        1,
    );
    let s = start_with(&toml).await;
    let t = time_to_close(TcpStream::connect(s.addr).await.unwrap()).await;
    assert!(t < Duration::from_secs(5), "idle TLS socket lived {t:?}");
    // After the handshake, headers must come in time as well.
    let mut half = tls(s.addr, &connector(&[ca.der()])).await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "half-sent request over TLS was not closed");
    s.shutdown().await;
}

// ---- the server API listener ----------------------------------------------------------------

#[tokio::test]
async fn api_on_its_own_listener() {
    let s =
        start_with(&config("").replacen("[api]\n", "[api]\nlisten = \"127.0.0.1:0\"\n", 1)).await;
    let api_addr = s.api_addr.unwrap();
    assert_ne!(api_addr, s.addr);
    let body = json!({"channel": "room", "data": 1}).to_string();
    let key = format!("X-API-Key: {API_KEY}\r\n");
    // Not on the public listener any more.
    let (status, _) = http_on(
        TcpStream::connect(s.addr).await.unwrap(),
        "POST",
        "/api/publish",
        &key,
        &body,
    )
    .await;
    assert_eq!(status, 404);
    let (status, out) = http_on(
        TcpStream::connect(api_addr).await.unwrap(),
        "POST",
        "/api/publish",
        &key,
        &body,
    )
    .await;
    assert_eq!(status, 200, "{out}");
    // The key is still required there, and client transports are not served there.
    let (status, _) = http_on(
        TcpStream::connect(api_addr).await.unwrap(),
        "POST",
        "/api/publish",
        "",
        &body,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = http_on(
        TcpStream::connect(api_addr).await.unwrap(),
        "GET",
        "/connection/websocket",
        "",
        "",
    )
    .await;
    assert_eq!(status, 404);
    // Clients still connect on the public one.
    Client::connect(&s, "u").await.unwrap();
    s.shutdown().await;
}

#[tokio::test]
async fn api_key_required_unless_insecure() {
    let s = start("").await;
    for key in [
        None,
        Some("wrong"),
        Some("test-api-ke"),
        Some("test-api-keyy"),
    ] {
        let (status, _) = http(&s, "POST", "/api/info", key, "{}").await.unwrap();
        assert_eq!(status, 401, "{key:?}");
    }
    let (status, _) = http(&s, "POST", "/api/info", Some(API_KEY), "{}")
        .await
        .unwrap();
    assert_eq!(status, 200);
    s.shutdown().await;
    let s = start_with(&config("").replacen("[api]\n", "[api]\ninsecure = true\n", 1)).await;
    let (status, _) = http(&s, "POST", "/api/info", None, "{}").await.unwrap();
    assert_eq!(status, 200);
    s.shutdown().await;
}
