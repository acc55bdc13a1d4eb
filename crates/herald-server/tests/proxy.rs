//! The proxy against a real backend over HTTP (an axum server in this test): a connection
//! authenticated by its cookie and no token, subscribe / publish / RPC decided by the
//! backend, refresh and sub-refresh, and a backend that is down, slow or answers garbage.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::*;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// What the backend saw: (path, headers, body).
#[derive(Default)]
struct Seen(Mutex<Vec<(String, HeaderMap, Value)>>);

impl Seen {
    fn calls(&self, path: &str) -> Vec<(HeaderMap, Value)> {
        self.0
            .lock()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, h, b)| (h.clone(), b.clone()))
            .collect()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn cookie_user(h: &HeaderMap) -> Option<String> {
    h.get("cookie")?
        .to_str()
        .ok()?
        .split(';')
        .find_map(|c| c.trim().strip_prefix("session=").map(str::to_string))
}

async fn connect(State(seen): State<Arc<Seen>>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    seen.0.lock().push(("/connect".into(), h.clone(), b));
    match cookie_user(&h).as_deref() {
        None => Json(json!({"error": {"code": 1000, "message": "no session"}})).into_response(),
        Some("kick") => {
            Json(json!({"disconnect": {"code": 4501, "reason": "kicked"}})).into_response()
        }
        Some("expiring") => Json(json!({"result": {
            "user": "expiring", "expire_at": unix_now() + 1
        }}))
        .into_response(),
        Some(user) => Json(json!({"result": {
            "user": user,
            "info": {"name": user},
            "data": {"greeting": format!("hi {user}")},
            "channels": ["srv"],
            "meta": {"tenant": 7}
        }}))
        .into_response(),
    }
}

async fn refresh(State(seen): State<Arc<Seen>>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    seen.0.lock().push(("/refresh".into(), h, b));
    Json(json!({"result": {"expire_at": unix_now() + 600}})).into_response()
}

async fn subscribe(State(seen): State<Arc<Seen>>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    let channel = b["channel"].as_str().unwrap_or_default().to_string();
    seen.0.lock().push(("/subscribe".into(), h, b));
    match channel.as_str() {
        "px:secret" => {
            Json(json!({"error": {"code": 103, "message": "permission denied"}})).into_response()
        }
        "px:short" => Json(json!({"result": {"expire_at": unix_now() + 1}})).into_response(),
        // Not in presence, whatever the namespace says.
        "px:hidden" => {
            Json(json!({"result": {"override": {"presence": {"value": false}}}})).into_response()
        }
        _ => Json(json!({"result": {
            "info": {"role": "member"},
            "data": {"welcome": true}
        }}))
        .into_response(),
    }
}

async fn sub_refresh(
    State(seen): State<Arc<Seen>>,
    h: HeaderMap,
    Json(b): Json<Value>,
) -> Response {
    seen.0.lock().push(("/sub_refresh".into(), h, b));
    Json(json!({"result": {"expire_at": unix_now() + 600}})).into_response()
}

async fn publish_hook(
    State(seen): State<Arc<Seen>>,
    h: HeaderMap,
    Json(b): Json<Value>,
) -> Response {
    let data = b["data"].clone();
    seen.0.lock().push(("/publish".into(), h, b));
    if data["forbidden"] == true {
        return Json(json!({"error": {"code": 103, "message": "permission denied"}}))
            .into_response();
    }
    Json(json!({"result": {"data": {"rewritten": data}}})).into_response()
}

async fn rpc(State(seen): State<Arc<Seen>>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    let method = b["method"].as_str().unwrap_or_default().to_string();
    seen.0.lock().push(("/rpc".into(), h, b.clone()));
    match method.as_str() {
        "echo" => Json(json!({"result": {"data": {"echo": b["data"], "user": b["user"]}}}))
            .into_response(),
        "fail" => Json(json!({"error": {"code": 1002, "message": "nope"}})).into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Json(json!({"result": {}})).into_response()
        }
        "garbage" => "<html>oops</html>".into_response(),
        "status" => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        "kick" => {
            Json(json!({"disconnect": {"code": 4502, "reason": "rpc says bye"}})).into_response()
        }
        _ => Json(json!({"error": {"code": 104, "message": "unknown method"}})).into_response(),
    }
}

async fn rpc_year(State(seen): State<Arc<Seen>>, h: HeaderMap, Json(b): Json<Value>) -> Response {
    seen.0.lock().push(("/rpc_year".into(), h, b));
    Json(json!({"result": {"data": {"year": 2026}}})).into_response()
}

/// Starts the backend; returns its base URL and what it sees.
async fn backend() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = axum::Router::new()
        .route("/connect", post(connect))
        .route("/refresh", post(refresh))
        .route("/subscribe", post(subscribe))
        .route("/sub_refresh", post(sub_refresh))
        .route("/publish", post(publish_hook))
        .route("/rpc", post(rpc))
        .route("/rpc_year", post(rpc_year))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}

/// A node whose proxies all point at `base`.
fn proxied_config(base: &str) -> String {
    config(&format!(
        r#"[client.proxy.connect]
enabled = true
endpoint = "{base}/connect"
timeout = "500ms"
http_headers = ["Cookie", "User-Agent"]
static_http_headers = {{ "X-Herald-Secret" = "s3cret" }}
[client.proxy.refresh]
enabled = true
endpoint = "{base}/refresh"
[channel.proxy.subscribe]
enabled = true
endpoint = "{base}/subscribe"
[channel.proxy.publish]
enabled = true
endpoint = "{base}/publish"
[channel.proxy.sub_refresh]
enabled = true
endpoint = "{base}/sub_refresh"
[rpc.proxy]
enabled = true
endpoint = "{base}/rpc"
timeout = "500ms"
http_headers = ["Cookie"]
[rpc.proxy.routes]
year = "{base}/rpc_year"
"#
    )) + r#"
[[namespaces]]
name = "px"
history_size = 10
history_ttl = "5m"
presence = true
allow_presence_for_subscriber = true
subscribe_proxy_enabled = true
publish_proxy_enabled = true
sub_refresh_proxy_enabled = true
"#
}

async fn cookie_client(s: &herald_server::Server, session: &str) -> Client {
    let cookie = format!("session={session}; theme=dark");
    Client::open_with(s, &[("Cookie", cookie.as_str())])
        .await
        .unwrap()
}

#[tokio::test]
async fn cookie_connects_without_a_token() {
    let (base, seen) = backend().await;
    let s = start_with(&proxied_config(&base)).await;
    let mut c = cookie_client(&s, "alice").await;
    let r = c
        .call(1, "connect", json!({"name": "test", "version": "1"}))
        .await
        .unwrap();
    let connect = &r["connect"];
    assert_eq!(connect["data"], json!({"greeting": "hi alice"}), "{r}");
    assert!(connect["subs"].get("srv").is_some(), "{r}");
    let (h, body) = seen.calls("/connect").pop().unwrap();
    assert!(h["cookie"].to_str().unwrap().contains("session=alice"));
    assert_eq!(h["x-herald-secret"], "s3cret");
    assert_eq!(body["client"], connect["client"]);
    assert_eq!(body["transport"], "websocket");
    assert_eq!(body["protocol"], "json");
    assert_eq!(body["name"], "test");
    // The server-side channel the backend gave delivers.
    publish(&s, "srv", json!("to alice")).await.unwrap();
    let p = c.publication("srv").await.unwrap();
    assert_eq!(p["data"], "to alice");
    // RPC goes to the backend with the user, the cookie and the connect `meta`.
    let r = c
        .call(2, "rpc", json!({"method": "echo", "data": {"q": 1}}))
        .await
        .unwrap();
    assert_eq!(
        r["rpc"]["data"],
        json!({"echo": {"q": 1}, "user": "alice"}),
        "{r}"
    );
    let (h, body) = seen.calls("/rpc").pop().unwrap();
    assert!(h["cookie"].to_str().unwrap().contains("session=alice"));
    assert_eq!(body["meta"], json!({"tenant": 7}));
    // A routed method goes to its own endpoint.
    let r = c.call(3, "rpc", json!({"method": "year"})).await.unwrap();
    assert_eq!(r["rpc"]["data"], json!({"year": 2026}), "{r}");
    assert_eq!(seen.calls("/rpc_year").len(), 1);
    // The backend's error reaches the client as is; the connection stays.
    let r = c.call(4, "rpc", json!({"method": "fail"})).await.unwrap();
    assert_eq!(r["error"]["code"], 1002, "{r}");
    assert_eq!(r["error"]["message"], "nope");
    s.shutdown().await;
}

/// An SDK whose transport cannot set headers sends them in the connect command.
#[tokio::test]
async fn emulated_headers_in_the_connect_command_are_forwarded() {
    let (base, seen) = backend().await;
    let s = start_with(&proxied_config(&base)).await;
    let mut c = Client::open(&s).await.unwrap();
    let r = c
        .call(
            1,
            "connect",
            json!({"headers": {"Cookie": "session=emulated", "X-Other": "no"}}),
        )
        .await
        .unwrap();
    assert_eq!(
        r["connect"]["data"],
        json!({"greeting": "hi emulated"}),
        "{r}"
    );
    let (h, _) = seen.calls("/connect").pop().unwrap();
    assert_eq!(h["cookie"], "session=emulated");
    // Only the headers listed in http_headers go to the backend.
    assert!(h.get("x-other").is_none());
    s.shutdown().await;
}

#[tokio::test]
async fn backend_refusals_errors_and_disconnects() {
    let (base, _seen) = backend().await;
    let s = start_with(&proxied_config(&base)).await;
    // No cookie: the backend's error.
    let mut c = Client::open(&s).await.unwrap();
    let r = c.call(1, "connect", json!({})).await.unwrap();
    assert_eq!(r["error"]["code"], 1000, "{r}");
    // The backend's disconnect.
    let mut c = cookie_client(&s, "kick").await;
    c.send(json!({"id": 1, "connect": {}})).await.unwrap();
    assert_eq!(c.closed().await.unwrap(), (4501, "kicked".to_string()));
    // A token still works as before, without the proxy.
    let (mut t, _) = Client::connect(&s, "tokened").await.unwrap();
    let r = t
        .call(2, "rpc", json!({"method": "kick"}))
        .await
        .unwrap_err();
    assert!(r.to_string().contains("closed"), "{r}");
    assert_eq!(t.close.as_ref().unwrap().0, 4502);
    s.shutdown().await;
}

#[tokio::test]
async fn subscribe_and_publish_decided_by_the_backend() {
    let (base, seen) = backend().await;
    let s = start_with(&proxied_config(&base)).await;
    let mut c = cookie_client(&s, "bob").await;
    c.call(1, "connect", json!({})).await.unwrap();
    let r = c
        .call(2, "subscribe", json!({"channel": "px:secret"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103, "{r}");
    let r = c
        .call(
            3,
            "subscribe",
            json!({"channel": "px:open", "data": {"hello": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(r["subscribe"]["data"], json!({"welcome": true}), "{r}");
    let (_, body) = seen.calls("/subscribe").pop().unwrap();
    assert_eq!(body["data"], json!({"hello": 1}));
    assert_eq!(body["user"], "bob");
    // Presence carries the backend's channel info.
    let r = c
        .call(4, "presence", json!({"channel": "px:open"}))
        .await
        .unwrap();
    let clients: Vec<&Value> = r["presence"]["presence"]
        .as_object()
        .unwrap()
        .values()
        .collect();
    assert_eq!(clients.len(), 1, "{r}");
    assert_eq!(clients[0]["chan_info"], json!({"role": "member"}));
    // An override turns presence off for one subscription.
    c.call(7, "subscribe", json!({"channel": "px:hidden"}))
        .await
        .unwrap();
    let r = c
        .call(8, "presence", json!({"channel": "px:hidden"}))
        .await
        .unwrap();
    assert!(
        r["presence"]["presence"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "{r}"
    );
    // The publish proxy rewrites what subscribers get, and may refuse.
    let r = c
        .call(
            5,
            "publish",
            json!({"channel": "px:open", "data": {"n": 1}}),
        )
        .await
        .unwrap();
    assert!(r.get("publish").is_some(), "{r}");
    let p = c.publication("px:open").await.unwrap();
    assert_eq!(p["data"], json!({"rewritten": {"n": 1}}));
    let r = c
        .call(
            6,
            "publish",
            json!({"channel": "px:open", "data": {"forbidden": true}}),
        )
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103, "{r}");
    s.shutdown().await;
}

#[tokio::test]
async fn refresh_and_sub_refresh_extend_by_proxy() {
    let (base, seen) = backend().await;
    let s = start_with(&proxied_config(&base)).await;
    let mut c = cookie_client(&s, "expiring").await;
    let r = c.call(1, "connect", json!({})).await.unwrap();
    // The server renews a proxied connection; the client is not asked to refresh.
    assert!(r["connect"].get("expires").is_none(), "{r}");
    let r = c
        .call(2, "subscribe", json!({"channel": "px:short"}))
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some(), "{r}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while seen.calls("/refresh").is_empty() || seen.calls("/sub_refresh").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refresh proxy calls"
        );
        // Reading keeps the connection answering pings while waiting.
        let _ = tokio::time::timeout(Duration::from_millis(200), c.next()).await;
    }
    let (_, body) = seen.calls("/sub_refresh").pop().unwrap();
    assert_eq!(body["channel"], "px:short");
    assert_eq!(body["user"], "expiring");
    // Still connected and subscribed.
    publish(&s, "px:short", json!("still")).await.unwrap();
    // The publish proxy only sees client publications; API publications go as they are.
    assert_eq!(c.publication("px:short").await.unwrap()["data"], "still");
    s.shutdown().await;
}

#[tokio::test]
async fn backend_down_slow_or_garbage_is_internal_error_and_bystanders_keep_working() {
    let (base, _seen) = backend().await;
    let s = start_with(&proxied_config(&base)).await;
    let (mut bystander, _) = Client::connect(&s, "by").await.unwrap();
    bystander
        .call(2, "subscribe", json!({"channel": "calm"}))
        .await
        .unwrap();
    let (mut c, _) = Client::connect(&s, "caller").await.unwrap();
    for (i, method) in ["slow", "garbage", "status"].into_iter().enumerate() {
        let r = c
            .call(10 + i as u64, "rpc", json!({"method": method}))
            .await
            .unwrap();
        assert_eq!(r["error"]["code"], 100, "{method}: {r}");
        assert_eq!(r["error"]["temporary"], true, "{method}: {r}");
        publish(&s, "calm", json!(method)).await.unwrap();
        assert_eq!(bystander.publication("calm").await.unwrap()["data"], method);
    }
    // Each failure is counted by proxy and result.
    let metrics = scrape(&s).await;
    for result in ["timeout", "bad_response", "bad_status"] {
        let series = format!("herald_proxy_requests_total{{proxy=\"rpc\",result=\"{result}\"}} 1");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }
    s.shutdown().await;
    // A backend that is not there at all: the connect proxy gives 100 too.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let s = start_with(&proxied_config(&format!("http://127.0.0.1:{port}"))).await;
    let mut c = cookie_client(&s, "alice").await;
    let r = c.call(1, "connect", json!({})).await.unwrap();
    assert_eq!(r["error"]["code"], 100, "{r}");
    s.shutdown().await;
}

/// The text of `/metrics`.
async fn scrape(s: &herald_server::Server) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    sock.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn cookie_auth_without_allowed_origins_is_same_origin_only() {
    let (base, _seen) = backend().await;
    let s = start_with(&proxied_config(&base)).await;
    let host = s.addr.to_string();
    let own = format!("http://{host}");
    let err = Client::open_with(
        &s,
        &[
            ("Origin", "http://evil.example"),
            ("Cookie", "session=alice"),
        ],
    )
    .await
    .err()
    .expect("a foreign origin is refused");
    assert!(err.to_string().contains("403"), "{err}");
    let mut c = Client::open_with(&s, &[("Origin", own.as_str()), ("Cookie", "session=alice")])
        .await
        .unwrap();
    let r = c.call(1, "connect", json!({})).await.unwrap();
    assert!(r.get("connect").is_some(), "{r}");
    s.shutdown().await;
}

#[tokio::test]
async fn without_rpc_proxy_rpc_is_not_available() {
    let s = start("").await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    let r = c.call(2, "rpc", json!({"method": "x"})).await.unwrap();
    assert_eq!(r["error"]["code"], 108, "{r}");
    s.shutdown().await;
}

/// A command waiting on a slow backend does not stop its connection: pings still go out,
/// the client's pongs are read (no 3012 however long the backend takes), and the command is
/// answered once the backend is. (When the session awaited its engine and proxy calls inside
/// a step, no ping went out until the subscribe was done.)
#[tokio::test]
async fn a_command_waiting_on_the_backend_leaves_pings_and_pongs_served() {
    let release = Arc::new(tokio::sync::Notify::new());
    let held = release.clone();
    let app = axum::Router::new().route(
        "/subscribe",
        post(move || {
            let held = held.clone();
            async move {
                held.notified().await;
                Json(json!({"result": {}}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let s = start_with(
        &(config(&format!(
            r#"ping_interval = "1s"
pong_timeout = "500ms"
[channel.proxy.subscribe]
enabled = true
endpoint = "http://{addr}/subscribe"
timeout = "20s"
"#
        )) + r#"
[[namespaces]]
name = "px"
subscribe_proxy_enabled = true
"#),
    )
    .await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    c.send(json!({"id": 2, "subscribe": {"channel": "px:slow"}}))
        .await
        .unwrap();
    // Three ping intervals while the backend holds the subscribe; each ping is answered.
    for _ in 0..3 {
        let v = c
            .next_raw()
            .await
            .expect("a ping while the subscribe waits");
        assert_eq!(v, json!({}), "only pings before the reply: {v}");
        c.send(json!({})).await.unwrap();
    }
    release.notify_one();
    let reply = c.reply(2).await.unwrap();
    assert!(reply.get("subscribe").is_some(), "{reply}");
    s.shutdown().await;
}
