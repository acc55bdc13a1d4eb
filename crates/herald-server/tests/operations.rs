//! Operating a node: every metric moves when what it counts happens (scraped from `/metrics`
//! before and after), health and readiness, the admin API, the drain (clients leave with 3001
//! spread over the window, then the node stops), a restart reported honestly to recovering
//! clients, and logs that never carry a token.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use common::*;
use herald_core::engine::memory::MemoryEngine;
use herald_core::engine::{
    BoxFut, ControlCommand, Engine, EngineError, HistoryQuery, HistoryResult, PublishOptions,
    StreamPosition,
};
use herald_protocol::api::NodeInfo;
use herald_protocol::client::{ClientInfo, Publication};
use serde_json::{Value, json};
use tokio::net::TcpStream;

const WS: &[(&str, &str)] = &[("transport", "websocket")];

/// Scrapes until `check` holds (the server updates some figures just after the event).
async fn until(addr: SocketAddr, what: &str, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = Scrape::take(addr).await.unwrap();
        if check(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- metrics ----------------------------------------------------------------------------

#[tokio::test]
async fn client_api_and_delivery_metrics_move() {
    let s = start("").await;
    let before = Scrape::take(s.addr).await.unwrap();
    for name in [
        "herald_clients",
        "herald_users",
        "herald_subscriptions",
        "herald_channels",
        "herald_writer_queue_bytes",
        "herald_draining",
        "herald_uptime_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "herald_client_connects_total",
        "herald_slow_consumer_disconnects_total",
        "herald_deliveries_total",
    ] {
        assert!(
            before.0.keys().any(|k| k == name),
            "{name} missing from the first scrape: {before:?}"
        );
    }
    assert!(before.get("process_resident_memory_bytes", &[]) > 1e6);
    assert!(before.get("process_open_fds", &[]) > 0.0);

    let (mut a, _) = Client::connect(&s, "alice").await.unwrap();
    let (mut b, _) = Client::connect(&s, "bob").await.unwrap();
    a.call(2, "subscribe", json!({"channel": "m"}))
        .await
        .unwrap();
    b.call(2, "subscribe", json!({"channel": "m"}))
        .await
        .unwrap();
    let r = a
        .call(3, "subscribe", json!({"channel": "nope:x"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 102);
    // One publication from the API, one from a client; both reach both subscribers.
    publish(&s, "m", json!({"from": "api"})).await.unwrap();
    a.call(4, "publish", json!({"channel": "m", "data": {"from": "a"}}))
        .await
        .unwrap();
    for c in [&mut a, &mut b] {
        c.publication("m").await.unwrap();
        c.publication("m").await.unwrap();
    }
    a.call(5, "history", json!({"channel": "m", "limit": 10}))
        .await
        .unwrap();
    // Server API: an error, a refused key, an unknown method.
    let v = api(&s, "publish", json!({"channel": "nope:x", "data": 1}))
        .await
        .unwrap();
    assert_eq!(v["error"]["code"], 102);
    let (st, _) = http(&s, "POST", "/api/publish", Some("wrong"), "{}")
        .await
        .unwrap();
    assert_eq!(st, 401);
    let (st, _) = http(&s, "POST", "/api/frobnicate", Some(API_KEY), "{}")
        .await
        .unwrap();
    assert_eq!(st, 404);

    let during = Scrape::take(s.addr).await.unwrap();
    let d =
        |name: &str, labels: &[(&str, &str)]| during.get(name, labels) - before.get(name, labels);
    assert_eq!(d("herald_connections", WS), 2.0, "{during:?}");
    assert_eq!(d("herald_clients", &[]), 2.0);
    assert_eq!(d("herald_users", &[]), 2.0);
    assert_eq!(d("herald_subscriptions", &[]), 2.0);
    assert_eq!(d("herald_channels", &[]), 1.0);
    assert_eq!(d("herald_client_connects_total", &[]), 2.0);
    assert_eq!(d("herald_publications_total", &[("source", "api")]), 1.0);
    assert_eq!(d("herald_publications_total", &[("source", "client")]), 1.0);
    assert_eq!(d("herald_deliveries_total", &[]), 4.0);
    assert!(d("herald_transport_received_bytes_total", WS) > 100.0);
    assert!(d("herald_transport_sent_bytes_total", WS) > 100.0);
    assert!(d("herald_delivery_latency_seconds_count", &[]) >= 2.0);
    assert!(d("herald_delivery_latency_seconds_bucket", &[("le", "+Inf")]) >= 2.0);
    assert_eq!(d("herald_commands_total", &[("command", "connect")]), 2.0);
    assert_eq!(d("herald_commands_total", &[("command", "subscribe")]), 3.0);
    assert_eq!(d("herald_commands_total", &[("command", "publish")]), 1.0);
    assert_eq!(d("herald_commands_total", &[("command", "history")]), 1.0);
    assert_eq!(
        d(
            "herald_command_errors_total",
            &[("command", "subscribe"), ("code", "102")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "herald_api_calls_total",
            &[("method", "publish"), ("result", "ok")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "herald_api_calls_total",
            &[("method", "publish"), ("result", "error")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "herald_api_calls_total",
            &[("method", "publish"), ("result", "unauthorized")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "herald_api_calls_total",
            &[("method", "unknown"), ("result", "not_found")]
        ),
        1.0
    );
    assert!(d("herald_engine_operations_total", &[("op", "publish")]) >= 2.0);
    assert!(d("herald_engine_operations_total", &[("op", "subscribe")]) >= 1.0);
    assert!(d("herald_engine_operations_total", &[("op", "history")]) >= 1.0);
    assert!(d("herald_uptime_seconds", &[]) >= 0.0);

    // A client leaves (3000), another is kicked by the API (3503 by default).
    drop(a);
    api(&s, "disconnect", json!({"user": "bob"})).await.unwrap();
    assert_eq!(b.closed().await.unwrap().0, 3503);
    // A connection is counted until its socket ends, which for the kicked one is after
    // the close handshake (the client's close reply or the close timeout).
    let after = until(s.addr, "both disconnects counted, both sockets gone", |m| {
        m.get("herald_client_disconnects_total", &[("code", "3503")])
            - before.get("herald_client_disconnects_total", &[("code", "3503")])
            == 1.0
            && m.get("herald_client_disconnects_total", &[("code", "3000")])
                - before.get("herald_client_disconnects_total", &[("code", "3000")])
                == 1.0
            && m.get("herald_connections", WS) == before.get("herald_connections", WS)
    })
    .await;
    assert_eq!(
        after.get("herald_clients", &[]),
        before.get("herald_clients", &[])
    );
    assert_eq!(
        after.get("herald_channels", &[]),
        before.get("herald_channels", &[])
    );
    assert!(
        after.get("herald_engine_operations_total", &[("op", "unsubscribe")])
            > before.get("herald_engine_operations_total", &[("op", "unsubscribe")])
    );
    s.shutdown().await;
}

#[tokio::test]
async fn protocol_error_closes_are_counted_per_transport_and_code() {
    let s = start("").await;
    let before = Scrape::take(s.addr).await.unwrap();
    let series = [("transport", "websocket"), ("code", "3501")];
    let mut c = Client::open(&s).await.unwrap();
    c.send_text("{not json".into()).await.unwrap();
    assert_eq!(c.closed().await.unwrap().0, 3501);
    let mut c = Client::open(&s).await.unwrap();
    c.send(json!({"id": 1, "connect": {"token": "not.a.token"}}))
        .await
        .unwrap();
    assert_eq!(c.closed().await.unwrap().0, 3500);
    let m = until(s.addr, "both closes counted", |m| {
        m.get("herald_protocol_error_disconnects_total", &series)
            - before.get("herald_protocol_error_disconnects_total", &series)
            == 1.0
            && m.get(
                "herald_protocol_error_disconnects_total",
                &[("transport", "websocket"), ("code", "3500")],
            ) == 1.0
    })
    .await;
    // A client that closes on its own is not a protocol error.
    let (c, _) = Client::connect(&s, "fine").await.unwrap();
    drop(c);
    let after = Scrape::take(s.addr).await.unwrap();
    assert_eq!(
        after.get("herald_protocol_error_disconnects_total", &series),
        m.get("herald_protocol_error_disconnects_total", &series)
    );
    s.shutdown().await;
}

#[tokio::test]
async fn slow_consumer_fills_its_queue_and_is_counted() {
    let s = start("max_queue_bytes = 4194304").await;
    let before = Scrape::take(s.addr).await.unwrap();
    let (mut slow, _) = Client::connect(&s, "slow").await.unwrap();
    slow.call(2, "subscribe", json!({"channel": "firehose"}))
        .await
        .unwrap();
    // Many more open files now: each connection is a socket.
    let mut others = Vec::new();
    for i in 0..10 {
        others.push(Client::connect(&s, &format!("o{i}")).await.unwrap().0);
    }
    let fds = Scrape::take(s.addr).await.unwrap();
    assert!(
        fds.get("process_open_fds", &[]) >= before.get("process_open_fds", &[]) + 10.0,
        "open files did not follow 11 connections: {} -> {}",
        before.get("process_open_fds", &[]),
        fds.get("process_open_fds", &[])
    );
    let rss_before = fds.get("process_resident_memory_bytes", &[]);
    // The slow client never reads again: once the socket buffers are full, publications
    // wait in its writer queue until it passes 4 MiB and is disconnected (3008).
    let blob = "x".repeat(200_000);
    let mut seen_queue = 0.0f64;
    let mut max_rss = rss_before;
    let mut slow_counted = false;
    for i in 0..400 {
        publish(&s, "firehose", json!({"i": i, "blob": blob}))
            .await
            .unwrap();
        let m = Scrape::take(s.addr).await.unwrap();
        seen_queue = seen_queue.max(m.get("herald_writer_queue_bytes", &[]));
        max_rss = max_rss.max(m.get("process_resident_memory_bytes", &[]));
        if m.get("herald_slow_consumer_disconnects_total", &[])
            > before.get("herald_slow_consumer_disconnects_total", &[])
        {
            assert_eq!(
                m.get("herald_client_disconnects_total", &[("code", "3008")])
                    - before.get("herald_client_disconnects_total", &[("code", "3008")]),
                1.0
            );
            slow_counted = true;
            break;
        }
    }
    assert!(slow_counted, "the slow consumer was never disconnected");
    assert!(
        seen_queue > 200_000.0,
        "writer queue bytes never showed the backlog (max {seen_queue})"
    );
    assert!(
        max_rss > rss_before,
        "resident memory did not move while megabytes were queued ({rss_before} -> {max_rss})"
    );
    let after = until(s.addr, "the queue emptied", |m| {
        m.get("herald_writer_queue_bytes", &[]) == 0.0
    })
    .await;
    assert_eq!(after.get("herald_clients", &[]), 10.0);
    drop(others);
    s.shutdown().await;
}

/// The memory engine, with a switch that makes every operation fail and readiness drop,
/// and one that fails the history reads of a single channel.
struct FlakyEngine {
    inner: MemoryEngine,
    down: Arc<AtomicBool>,
    refuse_history_of: Arc<std::sync::Mutex<String>>,
}

impl FlakyEngine {
    fn gate<'a, T: Send + 'a>(
        &'a self,
        fut: BoxFut<'a, Result<T, EngineError>>,
    ) -> BoxFut<'a, Result<T, EngineError>> {
        Box::pin(async move {
            if self.down.load(Ordering::Relaxed) {
                return Err(EngineError::Unavailable("switched off by the test".into()));
            }
            fut.await
        })
    }
}

impl Engine for FlakyEngine {
    fn name(&self) -> &'static str {
        "flaky"
    }
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        opts: &'a PublishOptions,
    ) -> BoxFut<'a, Result<StreamPosition, EngineError>> {
        self.gate(self.inner.publish(channel, publication, opts))
    }
    fn publish_join_leave<'a>(
        &'a self,
        channel: &'a str,
        info: ClientInfo,
        join: bool,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        self.gate(self.inner.publish_join_leave(channel, info, join))
    }
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        self.gate(self.inner.subscribe(channel))
    }
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        self.gate(self.inner.unsubscribe(channel))
    }
    fn history<'a>(
        &'a self,
        channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFut<'a, Result<HistoryResult, EngineError>> {
        if *self.refuse_history_of.lock().unwrap() == channel {
            return Box::pin(async { Err(EngineError::Unavailable("timed out".into())) });
        }
        self.gate(self.inner.history(channel, query))
    }
    fn remove_history<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        self.gate(self.inner.remove_history(channel))
    }
    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
        info: ClientInfo,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        self.gate(self.inner.add_presence(channel, client_id, info))
    }
    fn remove_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        self.gate(self.inner.remove_presence(channel, client_id))
    }
    fn presence<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFut<'a, Result<BTreeMap<String, ClientInfo>, EngineError>> {
        self.gate(self.inner.presence(channel))
    }
    fn publish_control<'a>(&'a self, cmd: ControlCommand) -> BoxFut<'a, Result<(), EngineError>> {
        self.gate(self.inner.publish_control(cmd))
    }
    fn heartbeat<'a>(&'a self, info: NodeInfo) -> BoxFut<'a, Result<(), EngineError>> {
        self.gate(self.inner.heartbeat(info))
    }
    fn channels<'a>(&'a self) -> BoxFut<'a, Result<Vec<(String, u32)>, EngineError>> {
        self.gate(self.inner.channels())
    }
    fn healthy(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }
}

/// A node on the flaky engine, served by the same router the binary uses.
struct FlakyNode {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    refuse_history_of: Arc<std::sync::Mutex<String>>,
    served: tokio::task::JoinHandle<()>,
}

async fn start_flaky() -> FlakyNode {
    let config = herald_server::Config::from_toml(&config("")).unwrap();
    let (metrics, prometheus) = herald_server::ops::new_metrics();
    let down = Arc::new(AtomicBool::new(false));
    let refuse_history_of = Arc::new(std::sync::Mutex::new(String::new()));
    let (switch, refuse) = (down.clone(), refuse_history_of.clone());
    let node = herald_core::Node::with_metrics(config.node_config(), metrics, move |hub| {
        Arc::new(FlakyEngine {
            inner: MemoryEngine::new(hub),
            down: switch,
            refuse_history_of: refuse,
        })
    });
    let state = herald_server::state::AppState {
        mqtt: Arc::new(herald_server::mqtt::Mqtt::new(&config.mqtt)),
        node,
        config: Arc::new(config),
        tracker: Default::default(),
        ops: Arc::new(herald_server::ops::Ops::new(prometheus)),
        nodes_limiter: Arc::new(herald_server::arbiter::Limiter::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = herald_server::server::router(state);
    let served = tokio::spawn(async move { axum_serve(listener, app).await });
    FlakyNode {
        addr,
        down,
        refuse_history_of,
        served,
    }
}

#[tokio::test]
async fn engine_failures_are_counted_and_fail_readiness() {
    let FlakyNode {
        addr, down, served, ..
    } = start_flaky().await;

    let ready = request(addr, "GET", "/ready", &[], "").await.unwrap();
    assert_eq!(
        (ready.status, ready.json()["status"].clone()),
        (200, json!("ready"))
    );
    let before = Scrape::take(addr).await.unwrap();
    down.store(true, Ordering::Relaxed);
    let ready = request(addr, "GET", "/ready", &[], "").await.unwrap();
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.json()["status"], "engine unavailable");
    // Liveness is not readiness: the process is fine.
    assert_eq!(
        request(addr, "GET", "/health", &[], "")
            .await
            .unwrap()
            .status,
        200
    );
    let r = request(
        addr,
        "POST",
        "/api/publish",
        &[("X-API-Key", API_KEY)],
        r#"{"channel":"x","data":1}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.json()["error"]["code"], 100, "{}", r.body);
    let after = Scrape::take(addr).await.unwrap();
    let d = |n: &str, l: &[(&str, &str)]| after.get(n, l) - before.get(n, l);
    assert_eq!(d("herald_engine_errors_total", &[("op", "publish")]), 1.0);
    assert_eq!(
        d("herald_engine_operations_total", &[("op", "publish")]),
        1.0
    );
    assert_eq!(
        d(
            "herald_api_calls_total",
            &[("method", "publish"), ("result", "error")]
        ),
        1.0
    );
    down.store(false, Ordering::Relaxed);
    assert_eq!(
        request(addr, "GET", "/ready", &[], "")
            .await
            .unwrap()
            .status,
        200
    );
    served.abort();
}

#[tokio::test]
async fn a_connect_whose_server_side_subscription_fails_is_refused_and_leaves_nothing() {
    let node = start_flaky().await;
    let addr = node.addr;
    // Server-side subscriptions are joined in channel order: "alpha" is positioned before
    // the history read of "beta" fails, so it has to be undone.
    *node.refuse_history_of.lock().unwrap() = "beta".into();
    let claims = json!({"sub": "ann", "channels": ["beta", "alpha"]});
    let mut c = Client::open_at(addr).await.unwrap();
    c.send(json!({"id": 1, "connect": {"token": token_with(claims.clone(), 3600)}}))
        .await
        .unwrap();
    assert!(
        c.reply(1).await.is_err(),
        "a connect without one of its server-side subscriptions was answered"
    );
    assert_eq!(c.close.as_ref().map(|(code, _)| *code), Some(3004));
    let s = until(addr, "the refused client to leave", |m| {
        m.get("herald_clients", &[]) == 0.0
    })
    .await;
    assert_eq!(s.get("herald_subscriptions", &[]), 0.0, "{s:?}");
    assert_eq!(s.get("herald_channels", &[]), 0.0, "{s:?}");

    // Once the engine answers, the same token connects with both channels, live.
    node.refuse_history_of.lock().unwrap().clear();
    let mut c = Client::open_at(addr).await.unwrap();
    c.send(json!({"id": 1, "connect": {"token": token_with(claims, 3600)}}))
        .await
        .unwrap();
    let r = c.reply(1).await.unwrap();
    let subs = r["connect"]["subs"].as_object().unwrap();
    assert!(
        subs.contains_key("alpha") && subs.contains_key("beta"),
        "{r}"
    );
    for ch in ["alpha", "beta"] {
        let r = request(
            addr,
            "POST",
            "/api/publish",
            &[("X-API-Key", API_KEY)],
            &json!({"channel": ch, "data": {"to": ch}}).to_string(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(c.publication(ch).await.unwrap()["data"]["to"], ch);
    }
    node.served.abort();
}

async fn axum_serve(listener: tokio::net::TcpListener, app: axum::Router) {
    let _ = axum::serve(listener, app).await;
}

// ---- health, admin, separate listener ---------------------------------------------------

#[tokio::test]
async fn operations_endpoints_can_leave_the_public_port() {
    let s = start_with(&config("").replace(
        "[shutdown]",
        "[admin]\nlisten = \"127.0.0.1:0\"\npassword = \"correct horse\"\n[shutdown]",
    ))
    .await;
    let admin = s.admin_addr.expect("admin listener");
    assert_ne!(admin, s.addr);
    for path in ["/metrics", "/health", "/ready", "/admin/"] {
        let public = request(s.addr, "GET", path, &[], "").await.unwrap();
        assert_eq!(public.status, 404, "{path} on the public port");
        let own = request(admin, "GET", path, &[], "").await.unwrap();
        assert_eq!(own.status, 200, "{path} on the admin port: {}", own.body);
    }
    // The API and the clients stay on the public port.
    let (mut c, _) = Client::connect(&s, "watcher").await.unwrap();
    c.call(2, "subscribe", json!({"channel": "ops"}))
        .await
        .unwrap();

    // The admin API wants a login; a wrong password gets nothing.
    let r = request(admin, "GET", "/admin/api/stats", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let r = request(
        admin,
        "POST",
        "/admin/api/login",
        &[],
        r#"{"password":"wrong"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    assert!(!r.head.to_ascii_lowercase().contains("set-cookie"));
    let r = request(
        admin,
        "POST",
        "/admin/api/login",
        &[],
        r#"{"password":"correct horse"}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let head = r.head.to_ascii_lowercase();
    assert!(head.contains("set-cookie: herald_admin="), "{}", r.head);
    assert!(head.contains("httponly") && head.contains("samesite=strict"));
    let token = r.json()["token"].as_str().unwrap().to_string();
    let bearer = format!("Bearer {token}");
    let cookie = format!("herald_admin={token}");

    let stats = request(
        admin,
        "GET",
        "/admin/api/stats",
        &[("Authorization", &bearer)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(stats.status, 200, "{}", stats.body);
    let v = stats.json();
    assert_eq!(v["clients"], 1, "{v}");
    assert_eq!(v["subscriptions"], 1);
    assert_eq!(v["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["top_channels"][0],
        json!({"channel": "ops", "subscribers": 1})
    );

    // Publish from the admin API (cookie auth): the subscriber gets it.
    let r = request(
        admin,
        "POST",
        "/admin/api/publish",
        &[("Cookie", &cookie)],
        r#"{"channel":"ops","data":{"note":"from admin"}}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.json()["result"]["offset"], 1, "{}", r.body);
    assert_eq!(
        c.publication("ops").await.unwrap()["data"]["note"],
        "from admin"
    );
    let r = request(
        admin,
        "POST",
        "/admin/api/history",
        &[("Cookie", &cookie)],
        r#"{"channel":"ops","limit":5}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        r.json()["result"]["publications"][0]["data"]["note"],
        "from admin",
        "{}",
        r.body
    );
    let v = request(
        admin,
        "GET",
        "/admin/api/stats",
        &[("Authorization", &bearer)],
        "",
    )
    .await
    .unwrap()
    .json();
    assert!(v["totals"]["publications"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["totals"]["deliveries"].as_u64().unwrap() >= 1, "{v}");

    // Logged out: the token is worthless.
    request(
        admin,
        "POST",
        "/admin/api/logout",
        &[("Authorization", &bearer)],
        "{}",
    )
    .await
    .unwrap();
    let r = request(
        admin,
        "GET",
        "/admin/api/stats",
        &[("Authorization", &bearer)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 401);
    s.shutdown().await;
}

#[tokio::test]
async fn admin_page_is_off_without_a_password() {
    let s = start("").await;
    for path in ["/admin/", "/admin/api/stats"] {
        assert_eq!(
            request(s.addr, "GET", path, &[], "").await.unwrap().status,
            404
        );
    }
    let r = request(
        s.addr,
        "POST",
        "/admin/api/login",
        &[],
        r#"{"password":""}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404);
    // Health, readiness and metrics are on the client port by default.
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(
            request(s.addr, "GET", path, &[], "").await.unwrap().status,
            200
        );
    }
    s.shutdown().await;
}

// ---- drain ------------------------------------------------------------------------------

#[tokio::test]
async fn drain_spreads_disconnects_over_the_window() {
    let s =
        start_with(&config("").replace("drain_duration = \"0s\"", "drain_duration = \"2s\"")).await;
    let n = 8;
    let mut clients = Vec::new();
    for i in 0..n {
        let (mut c, _) = Client::connect(&s, &format!("d{i}")).await.unwrap();
        c.call(2, "subscribe", json!({"channel": "drained"}))
            .await
            .unwrap();
        clients.push(c);
    }
    assert_eq!(
        request(s.addr, "GET", "/ready", &[], "")
            .await
            .unwrap()
            .status,
        200
    );
    let started = Instant::now();
    let r = api(&s, "drain", json!({})).await.unwrap();
    assert_eq!(r, json!({"result": {}}));

    // Readiness fails at once; liveness stays; new connections are refused.
    let ready = request(s.addr, "GET", "/ready", &[], "").await.unwrap();
    assert_eq!(
        (ready.status, ready.json()["status"].clone()),
        (503, json!("draining"))
    );
    assert_eq!(
        request(s.addr, "GET", "/health", &[], "")
            .await
            .unwrap()
            .status,
        200
    );
    let m = Scrape::take(s.addr).await.unwrap();
    assert_eq!(m.get("herald_draining", &[]), 1.0);
    assert!(
        Client::open(&s).await.is_err(),
        "a new connection was accepted while draining"
    );

    // Every client gets 3001, not all at the same instant.
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            let code = c.closed().await.unwrap().0;
            (code, started.elapsed())
        }));
    }
    let mut at = Vec::new();
    for t in tasks {
        let (code, when) = t.await.unwrap();
        assert_eq!(code, 3001);
        at.push(when);
    }
    at.sort();
    let spread = at[n - 1] - at[0];
    assert!(
        spread >= Duration::from_millis(1200),
        "disconnects not spread over the 2s window: {at:?}"
    );
    assert!(at[n - 1] < Duration::from_secs(4), "drain overran: {at:?}");
    let distinct: std::collections::BTreeSet<u128> =
        at.iter().map(|d| d.as_millis() / 100).collect();
    assert!(distinct.len() >= 4, "disconnects bunched: {at:?}");
    // Then the node stops by itself.
    tokio::time::timeout(Duration::from_secs(10), s.stopped())
        .await
        .expect("the node stops after draining");
}

#[tokio::test]
async fn restarted_node_reports_recovered_false_and_serves_again() {
    let first = start("").await;
    let (mut c, _) = Client::connect(&first, "back").await.unwrap();
    let r = c
        .call(2, "subscribe", json!({"channel": "news:flash"}))
        .await
        .unwrap();
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    publish(&first, "news:flash", json!("one")).await.unwrap();
    let offset = c.publication("news:flash").await.unwrap()["offset"]
        .as_u64()
        .unwrap();
    assert_eq!(offset, 1);
    let stop = tokio::spawn(first.shutdown());
    assert_eq!(c.closed().await.unwrap().0, 3001);
    stop.await.unwrap();

    // A new node (the memory engine keeps nothing across a restart): the client reconnects,
    // asks to recover from where it was, and is told honestly that it cannot.
    let second = start("").await;
    let (mut c, _) = Client::connect(&second, "back").await.unwrap();
    let r = c
        .call(
            2,
            "subscribe",
            json!({"channel": "news:flash", "recover": true, "epoch": epoch, "offset": offset}),
        )
        .await
        .unwrap();
    let sub = &r["subscribe"];
    assert_eq!(sub["was_recovering"], true, "{r}");
    assert_ne!(sub["recovered"], true, "{r}");
    assert_ne!(
        sub["epoch"],
        json!(epoch),
        "a restarted memory engine has a new epoch"
    );
    assert!(
        sub["publications"].as_array().is_none_or(|p| p.is_empty()),
        "{r}"
    );
    // The new subscription is live.
    publish(&second, "news:flash", json!("two")).await.unwrap();
    let p = c.publication("news:flash").await.unwrap();
    assert_eq!(
        (p["data"].clone(), p["offset"].clone()),
        (json!("two"), json!(1))
    );
    second.shutdown().await;
}

// ---- the binary: SIGTERM drain, logs --------------------------------------------------

struct Binary {
    child: std::process::Child,
    addr: SocketAddr,
    stderr: std::thread::JoinHandle<String>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

async fn spawn_binary(toml: &str) -> Binary {
    use std::io::{BufRead, Read};
    let dir = std::env::temp_dir().join(format!("herald-ops-{}", herald_core::node::new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("herald.toml");
    std::fs::write(&path, toml).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env_remove("HERALD_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let out = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(a) = line.strip_prefix("herald: listening on http://")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(a.parse::<SocketAddr>().unwrap());
            }
        }
    });
    let addr = tokio::time::timeout(Duration::from_secs(20), rx)
        .await
        .expect("herald prints its address")
        .expect("herald exited before listening");
    Binary {
        child,
        addr,
        stderr,
        _dir: TempDir(dir),
    }
}

impl Binary {
    /// SIGTERM, then the exit status and everything written to stderr.
    async fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "herald did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
        std::thread::spawn(move || {
            let _ = tx.send(handle.join().unwrap_or_default());
        });
        (status, rx.await.unwrap_or_default())
    }
}

async fn ws_client(
    addr: SocketAddr,
    token: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/connection/websocket")).await?;
    ws.send(Message::text(
        json!({"id": 1, "connect": {"token": token}}).to_string(),
    ))
    .await?;
    let reply = tokio::time::timeout(WAIT, ws.next())
        .await?
        .ok_or_else(|| anyhow!("closed"))??;
    let v: Value = serde_json::from_str(reply.to_text()?)?;
    if v.get("connect").is_none() {
        bail!("connect refused: {v}");
    }
    Ok(ws)
}

#[tokio::test]
async fn sigterm_drains_and_logs_never_carry_tokens() {
    let toml = config("").replace("drain_duration = \"0s\"", "drain_duration = \"1s\"")
        + "[admin]\npassword = \"admin-password-value\"\n[log]\nlevel = \"debug\"\n";
    let b = spawn_binary(&toml).await;
    let tok = token("logged", 3600);
    let refreshed = token("logged", 7200);
    let forged = format!("{}x", token("intruder", 3600));
    let mut ws = ws_client(b.addr, &tok).await.unwrap();
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        ws.send(Message::text(
            json!({"id": 2, "refresh": {"token": refreshed}}).to_string(),
        ))
        .await
        .unwrap();
        let r = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(r.to_text().unwrap().contains("\"refresh\""), "{r:?}");
    }
    assert!(ws_client(b.addr, &forged).await.is_err());
    let api = request(
        b.addr,
        "POST",
        "/api/publish",
        &[("X-API-Key", API_KEY)],
        r#"{"channel":"logs","data":1}"#,
    )
    .await
    .unwrap();
    assert_eq!(api.status, 200);
    let login = request(
        b.addr,
        "POST",
        "/admin/api/login",
        &[],
        r#"{"password":"admin-password-value"}"#,
    )
    .await
    .unwrap();
    let admin_token = login.json()["token"].as_str().unwrap().to_string();

    let (status, logs) = b.terminate().await;
    // The connected client was told to go elsewhere during the drain.
    {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let mut code = None;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT, ws.next()).await {
            if let Message::Close(Some(f)) = m {
                code = Some(u16::from(f.code));
                break;
            }
        }
        assert_eq!(code, Some(3001), "logs:\n{logs}");
    }
    assert!(status.success(), "exit {status:?}; logs:\n{logs}");
    assert!(
        logs.contains("client connected"),
        "no connect line at debug:\n{logs}"
    );
    assert!(
        logs.contains("client disconnected"),
        "no disconnect line at debug:\n{logs}"
    );
    assert!(
        logs.contains("code=3001"),
        "disconnect line without its code:\n{logs}"
    );
    assert!(logs.contains("draining"), "{logs}");
    // The forged token's close is logged with the client's address, transport and code.
    assert!(
        logs.lines()
            .any(|l| l.contains("closing a connection for a protocol error")
                && l.contains("addr=127.0.0.1:")
                && l.contains("websocket")
                && l.contains("code=3500")),
        "no protocol error line for the forged token:\n{logs}"
    );
    for (what, secret) in [
        ("connection token", tok.as_str()),
        ("refresh token", refreshed.as_str()),
        ("forged token", forged.as_str()),
        ("API key", API_KEY),
        ("token secret", SECRET),
        ("admin password", "admin-password-value"),
        ("admin session", admin_token.as_str()),
    ] {
        assert!(
            !logs.contains(secret),
            "the {what} appears in the logs:\n{logs}"
        );
        // Not even its signature.
        if let Some(sig) = secret.rsplit('.').next().filter(|s| s.len() > 16) {
            assert!(
                !logs.contains(sig),
                "the {what}'s signature appears in the logs"
            );
        }
    }
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let toml = config("") + "[log]\nlevel = \"debug\"\nformat = \"json\"\n";
    let b = spawn_binary(&toml).await;
    let ws = ws_client(b.addr, &token("j", 3600)).await.unwrap();
    drop(ws);
    let (status, logs) = b.terminate().await;
    assert!(status.success(), "{logs}");
    let mut lines = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 2, "{logs}");
    assert!(logs.contains("client connected"), "{logs}");
}

/// The client listener queues up to `net.core.somaxconn` pending handshakes (it asks for
/// 65,535), not Tokio's default 1,024: a burst of reconnecting devices is not dropped by the
/// kernel. Read from the listening socket itself (`ss` shows a listener's backlog as its
/// send queue).
#[tokio::test]
async fn listeners_ask_the_kernel_for_a_deep_backlog() -> Result<()> {
    let server = start("").await;
    let port = server.addr.port();
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")?
        .trim()
        .parse()?;
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .map_err(|e| anyhow!("`ss` (iproute2) is needed to read a listener's backlog: {e}"))?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let backlog: u32 = listing
        .split_whitespace()
        .nth(2)
        .ok_or_else(|| anyhow!("no listener on port {port}: {listing:?}"))?
        .parse()?;
    assert_eq!(backlog, somaxconn.min(65_535), "{listing}");
    if somaxconn > 1024 {
        assert!(backlog > 1024, "more than Tokio's default: {listing}");
    }
    Ok(())
}
