//! A cluster on the machine's Redis (127.0.0.1:6379): several nodes, one channel space.
//! Each test isolates itself with its own key prefix.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::time::Duration;

use common::*;
use herald_server::Server;
use serde_json::{Value, json};

const REDIS: &str = "redis://127.0.0.1:6379";

fn prefix() -> String {
    format!("herald-test-{}", herald_core::node::new_id())
}

fn redis_config(prefix: &str, url: &str) -> String {
    config("presence_ttl_unused = 0")
        .replace("presence_ttl_unused = 0", "")
        .replace(
            "[api]",
            &format!(
                "[engine]\ntype = \"redis\"\n[engine.redis]\nurl = \"{url}\"\nprefix = \"{prefix}\"\nnode_heartbeat = \"200ms\"\nnode_eviction = \"1s\"\npresence_ttl = \"2s\"\ncommand_timeout = \"1s\"\n[api]"
            ),
        )
}

async fn cluster(n: usize) -> (Vec<Server>, String) {
    require_redis(REDIS).await;
    let p = prefix();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(start_with(&redis_config(&p, REDIS)).await);
    }
    (nodes, p)
}

/// Fails with a clear message when the Redis these tests need is not running.
async fn require_redis(url: &str) {
    let addr = url.trim_start_matches("redis://");
    if tokio::net::TcpStream::connect(addr).await.is_err() {
        panic!(
            "cluster tests need Redis at {url} (start it: redis-server --port 6379 --daemonize yes)"
        );
    }
}

/// Waits until `check` passes, polling (bounded).
async fn eventually<F, Fut>(what: &str, mut check: F)
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

async fn node_count(s: &Server) -> usize {
    api(s, "info", json!({})).await.unwrap()["result"]["nodes"]
        .as_array()
        .map_or(0, |a| a.len())
}

#[tokio::test]
async fn publish_on_one_node_reaches_subscribers_on_others_in_order() {
    let (nodes, _) = cluster(3).await;
    let (mut a, _) = Client::connect(&nodes[0], "a").await.unwrap();
    let (mut b, _) = Client::connect(&nodes[1], "b").await.unwrap();
    a.call(2, "subscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    b.call(2, "subscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    for i in 0..50 {
        let r = publish(&nodes[2], "room", json!({"n": i})).await.unwrap();
        assert_eq!(r["offset"], i + 1);
    }
    for c in [&mut a, &mut b] {
        for i in 0..50u64 {
            let p = c.publication("room").await.unwrap();
            assert_eq!(
                (p["data"]["n"].as_u64(), p["offset"].as_u64()),
                (Some(i), Some(i + 1))
            );
        }
    }
    // Exactly once: nothing more arrives.
    publish(&nodes[2], "room", json!("end")).await.unwrap();
    assert_eq!(a.publication("room").await.unwrap()["data"], "end");
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn recovery_across_nodes() {
    let (nodes, _) = cluster(3).await;
    let (mut a, _) = Client::connect(&nodes[0], "u").await.unwrap();
    let r = a
        .call(2, "subscribe", json!({"channel":"big:r"}))
        .await
        .unwrap();
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    publish(&nodes[1], "big:r", json!(0)).await.unwrap();
    let last = a.publication("big:r").await.unwrap()["offset"]
        .as_u64()
        .unwrap();
    drop(a);
    for i in 1..=20 {
        publish(&nodes[1], "big:r", json!(i)).await.unwrap();
    }
    let (mut c, _) = Client::connect(&nodes[2], "u").await.unwrap();
    let r = c
        .call(
            2,
            "subscribe",
            json!({"channel":"big:r","recover":true,"offset":last,"epoch":epoch}),
        )
        .await
        .unwrap();
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    let got: Vec<Value> = r["subscribe"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(got, (1..=20).map(|i| json!(i)).collect::<Vec<_>>());
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn presence_join_leave_and_channels_are_cluster_wide() {
    let (nodes, _) = cluster(2).await;
    let (mut a, _) = Client::connect(&nodes[0], "a").await.unwrap();
    a.call(2, "subscribe", json!({"channel":"room","join_leave":true}))
        .await
        .unwrap();
    let (mut b, _) = Client::connect(&nodes[1], "b").await.unwrap();
    b.call(2, "subscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    loop {
        let v = a.next().await.unwrap();
        if v["push"]["join"]["info"]["user"] == "b" {
            break;
        }
    }
    let v = api(&nodes[0], "presence_stats", json!({"channel":"room"}))
        .await
        .unwrap();
    assert_eq!(v["result"], json!({"num_clients":2,"num_users":2}));
    let r = a
        .call(3, "presence", json!({"channel":"room"}))
        .await
        .unwrap();
    assert_eq!(r["presence"]["presence"].as_object().unwrap().len(), 2);
    eventually("peers to see each other", || async {
        node_count(&nodes[0]).await == 2
    })
    .await;
    let v = api(&nodes[0], "channels", json!({})).await.unwrap();
    assert_eq!(v["result"]["channels"]["room"]["num_clients"], 2, "{v}");
    b.call(3, "unsubscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    loop {
        let v = a.next().await.unwrap();
        if v["push"]["leave"]["info"]["user"] == "b" {
            break;
        }
    }
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn server_api_by_user_reaches_every_node() {
    let (nodes, _) = cluster(2).await;
    let (mut c, _) = Client::connect(&nodes[1], "target").await.unwrap();
    api(
        &nodes[0],
        "subscribe",
        json!({"user":"target","channel":"srv"}),
    )
    .await
    .unwrap();
    loop {
        let v = c.next().await.unwrap();
        if v["push"]["channel"] == "srv" && v["push"].get("subscribe").is_some() {
            break;
        }
    }
    api(
        &nodes[0],
        "unsubscribe",
        json!({"user":"target","channel":"srv"}),
    )
    .await
    .unwrap();
    loop {
        let v = c.next().await.unwrap();
        if v["push"]["unsubscribe"]["code"] == 2000 {
            break;
        }
    }
    api(&nodes[0], "disconnect", json!({"user":"target"}))
        .await
        .unwrap();
    assert_eq!(c.closed().await.unwrap().0, 3503);
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn info_lists_live_nodes_and_forgets_stopped_ones() {
    let (mut nodes, _) = cluster(3).await;
    eventually("3 nodes in info", || async {
        node_count(&nodes[0]).await == 3
    })
    .await;
    let gone = nodes.pop().unwrap();
    gone.shutdown().await;
    eventually("2 nodes after one stopped", || async {
        node_count(&nodes[0]).await == 2
    })
    .await;
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn redis_down_refuses_publish_and_reports_health() {
    // A Redis of our own, so it can be stopped.
    let port = free_port();
    let mut redis = spawn_redis(port);
    let url = format!("redis://127.0.0.1:{port}");
    wait_port(port).await;
    let node = start_with(&redis_config(&prefix(), &url)).await;
    let (mut c, _) = Client::connect(&node, "u").await.unwrap();
    c.call(2, "subscribe", json!({"channel":"big:x"}))
        .await
        .unwrap();
    publish(&node, "big:x", json!(1)).await.unwrap();
    let epoch_before = c.publication("big:x").await.unwrap()["offset"].clone();
    assert_eq!(epoch_before, 1);
    redis.kill().unwrap();
    redis.wait().unwrap();
    // Refused with a temporary error while Redis is away, never acknowledged.
    let v = api(&node, "publish", json!({"channel":"big:x","data":2}))
        .await
        .unwrap();
    assert_eq!(v["error"]["code"], 100, "{v}");
    eventually("readiness and health to report the engine down", || async {
        let (ready, _) = http(&node, "GET", "/ready", None, "").await.unwrap();
        let (_, health) = http(&node, "GET", "/health", None, "").await.unwrap();
        ready == 503 && health["engine"] == "down"
    })
    .await;
    // Redis comes back (empty: no persistence): the node reconnects, the client is told to
    // resubscribe (2500) and its recovery says what it can.
    let _redis = Restart(spawn_redis(port));
    wait_port(port).await;
    eventually("readiness back", || async {
        http(&node, "GET", "/ready", None, "").await.unwrap().0 == 200
    })
    .await;
    loop {
        let v = c.next().await.unwrap();
        if v["push"]["unsubscribe"]["code"] == 2500 {
            break;
        }
    }
    let r = c
        .call(
            3,
            "subscribe",
            json!({"channel":"big:x","recover":true,"offset":1,"epoch":"old"}),
        )
        .await
        .unwrap();
    assert_eq!(r["subscribe"]["was_recovering"], true);
    assert!(
        r["subscribe"].get("recovered").is_none(),
        "stream was lost: {r}"
    );
    let v = publish(&node, "big:x", json!(3)).await.unwrap();
    assert_eq!(c.publication("big:x").await.unwrap()["offset"], v["offset"]);
    node.shutdown().await;
}

struct Restart(std::process::Child);
impl Drop for Restart {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_redis(port: u16) -> std::process::Child {
    std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect(
            "redis-server must be installed for the cluster tests (apt-get install redis-server)",
        )
}

async fn wait_port(port: u16) {
    eventually("redis to listen", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
}
