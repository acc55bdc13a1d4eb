//! A cluster on the machine's Redis (127.0.0.1:6379) and on its NATS with JetStream
//! (127.0.0.1:4222): several nodes, one channel space. Every cross-node test runs once per
//! engine (`<test>::redis`, `<test>::nats`); each run isolates itself with its own prefix.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::time::Duration;

use common::*;
use herald_server::Server;
use serde_json::{Value, json};

fn prefix() -> String {
    format!("herald-test-{}", herald_core::node::new_id())
}

fn redis_config(prefix: &str, url: &str) -> String {
    config_on(&redis_engine(prefix, url))
}

fn nats_config(prefix: &str, url: &str) -> String {
    config_on(&nats_engine(prefix, url))
}

/// The engine a cross-node test runs on, with the prefix that isolates the run.
struct Engine {
    nats: bool,
    prefix: String,
}

impl Engine {
    fn config(&self) -> String {
        if self.nats {
            nats_config(&self.prefix, NATS)
        } else {
            redis_config(&self.prefix, REDIS)
        }
    }
}

/// One `#[tokio::test]` per engine for each cross-node test: `name::redis`, `name::nats`.
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn redis() {
                super::$name(super::Engine { nats: false, prefix: super::prefix() }).await;
            }

            #[tokio::test]
            async fn nats() {
                let prefix = super::prefix();
                super::$name(super::Engine { nats: true, prefix: prefix.clone() }).await;
                super::delete_nats_streams(super::NATS, &prefix);
            }
        }
    )*};
}

both_engines!(
    publish_on_one_node_reaches_subscribers_on_others_in_order,
    recovery_across_nodes,
    presence_join_leave_and_channels_are_cluster_wide,
    server_api_by_user_reaches_every_node,
    info_lists_live_nodes_and_forgets_stopped_ones,
);

async fn cluster(engine: &Engine, n: usize) -> (Vec<Server>, String) {
    if engine.nats {
        require_nats(NATS).await;
    } else {
        require_redis(REDIS).await;
    }
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(start_with(&engine.config()).await);
    }
    (nodes, engine.prefix.clone())
}

async fn node_count(s: &Server) -> usize {
    api(s, "info", json!({})).await.unwrap()["result"]["nodes"]
        .as_array()
        .map_or(0, |a| a.len())
}

async fn publish_on_one_node_reaches_subscribers_on_others_in_order(engine: Engine) {
    let (nodes, _) = cluster(&engine, 3).await;
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

async fn recovery_across_nodes(engine: Engine) {
    let (nodes, _) = cluster(&engine, 3).await;
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

async fn presence_join_leave_and_channels_are_cluster_wide(engine: Engine) {
    let (nodes, _) = cluster(&engine, 2).await;
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

async fn server_api_by_user_reaches_every_node(engine: Engine) {
    let (nodes, _) = cluster(&engine, 2).await;
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

async fn info_lists_live_nodes_and_forgets_stopped_ones(engine: Engine) {
    let (mut nodes, _) = cluster(&engine, 3).await;
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

/// Redis restarts while a publisher is running: every acknowledged publication reaches the
/// subscriber, or the subscriber is told it cannot recover — never a silent hole.
#[tokio::test]
async fn redis_restart_mid_stream_no_silent_loss() {
    let port = free_port();
    let mut redis = spawn_redis(port);
    wait_port(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let node = std::sync::Arc::new(start_with(&redis_config(&prefix(), &url)).await);
    let (mut c, _) = Client::connect(&node, "u").await.unwrap();
    c.call(2, "subscribe", json!({"channel":"big:m"}))
        .await
        .unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let node = node.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            // (epoch, offset) of every acknowledged publication.
            let mut acked: Vec<(String, u64)> = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let v = api(&node, "publish", json!({"channel":"big:m","data": i}))
                    .await
                    .unwrap();
                if let Some(r) = v.get("result") {
                    acked.push((
                        r["epoch"].as_str().unwrap().to_string(),
                        r["offset"].as_u64().unwrap(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            acked
        })
    };
    // Let some publications through, then restart Redis under the publisher.
    let mut live: Vec<u64> = Vec::new();
    while live.len() < 20 {
        live.push(
            c.publication("big:m").await.unwrap()["offset"]
                .as_u64()
                .unwrap(),
        );
    }
    redis.kill().unwrap();
    redis.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _redis = Restart(spawn_redis(port));
    wait_port(port).await;
    // The subscriber is told to resubscribe; it recovers from its last offset and the node
    // answers honestly.
    let mut told = false;
    let mut recovered_flag = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline && recovered_flag.is_none() {
        let v = c.next().await.unwrap();
        if let Some(p) = v["push"]["pub"]["offset"].as_u64() {
            live.push(p);
        }
        if v["push"]["unsubscribe"]["code"] == 2500 {
            told = true;
            let last = *live.last().unwrap();
            let r = c
                .call(
                    9,
                    "subscribe",
                    json!({"channel":"big:m","recover":true,"offset":last,"epoch":"before"}),
                )
                .await
                .unwrap();
            recovered_flag = Some(r["subscribe"]["recovered"] == true);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = publisher.await.unwrap();
    assert!(
        told,
        "the subscriber was not told its stream may have a hole"
    );
    assert_eq!(
        recovered_flag,
        Some(false),
        "Redis lost the stream: recovery must say so"
    );
    // Every publication acknowledged before the restart (first epoch) was delivered live
    // up to the moment Redis died, in order, with no gap.
    let first_epoch = &acked[0].0;
    let before: Vec<u64> = acked
        .iter()
        .filter(|(e, _)| e == first_epoch)
        .map(|(_, o)| *o)
        .collect();
    let delivered_before: Vec<u64> = live
        .iter()
        .copied()
        .take_while(|o| before.contains(o))
        .collect();
    assert_eq!(
        delivered_before,
        (1..=delivered_before.len() as u64).collect::<Vec<_>>()
    );
    let undelivered: Vec<u64> = before
        .iter()
        .copied()
        .filter(|o| !live.contains(o))
        .collect();
    // Anything acknowledged but not delivered is exactly what the client was told it cannot
    // recover (recovered: false above).
    println!(
        "restart: {} acked before, {} delivered live, {} covered by recovered:false",
        before.len(),
        delivered_before.len(),
        undelivered.len()
    );
    node_shutdown(node).await;
}

async fn node_shutdown(node: std::sync::Arc<Server>) {
    if let Ok(n) = std::sync::Arc::try_unwrap(node) {
        n.shutdown().await;
    }
}

/// Three Redis Cluster masters of our own; Herald nodes given all seed addresses.
struct RedisCluster {
    children: Vec<std::process::Child>,
    dir: std::path::PathBuf,
    ports: Vec<u16>,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn redis_cluster() -> RedisCluster {
    let dir = std::env::temp_dir().join(format!("herald-rc-{}", herald_core::node::new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut children = Vec::new();
    for p in &ports {
        children.push(
            std::process::Command::new("redis-server")
                .args([
                    "--port",
                    &p.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{p}.conf"),
                ])
                .arg("--dir")
                .arg(&dir)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server must be installed for the cluster tests"),
        );
    }
    let rc = RedisCluster {
        children,
        dir,
        ports,
    };
    for p in &rc.ports {
        wait_port(*p).await;
    }
    let addrs: Vec<String> = rc.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let status = std::process::Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("redis-cli must be installed for the cluster tests");
    assert!(status.success(), "redis-cli --cluster create failed");
    let ports = rc.ports.clone();
    eventually("the redis cluster to be ok", || {
        let ports = ports.clone();
        async move {
            ports.iter().all(|p| {
                std::process::Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                    .unwrap_or(false)
            })
        }
    })
    .await;
    rc
}

#[tokio::test]
async fn redis_cluster_mode() {
    let rc = redis_cluster().await;
    let urls: Vec<String> = rc
        .ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let p = prefix();
    let cfg = redis_config(&p, &urls.join(","))
        .replace("[engine.redis]", "[engine.redis]\ncluster = true");
    let a = start_with(&cfg).await;
    let b = start_with(&cfg).await;
    let (mut c, _) = Client::connect(&a, "u").await.unwrap();
    // Channels land on different slots, hence different masters.
    let channels: Vec<String> = (0..6).map(|i| format!("big:rc{i}")).collect();
    for (i, ch) in channels.iter().enumerate() {
        c.call(10 + i as u64, "subscribe", json!({"channel": ch}))
            .await
            .unwrap();
    }
    for ch in &channels {
        for n in 1..=3u64 {
            let r = api(
                &b,
                "publish",
                json!({"channel": ch, "data": n, "idempotency_key": format!("{ch}-{n}")}),
            )
            .await
            .unwrap();
            assert_eq!(r["result"]["offset"], n, "{r}");
        }
        let again = api(
            &b,
            "publish",
            json!({"channel": ch, "data": 3, "idempotency_key": format!("{ch}-3")}),
        )
        .await
        .unwrap();
        assert_eq!(again["result"]["offset"], 3, "idempotent retry");
    }
    let mut got: std::collections::HashMap<String, Vec<u64>> = Default::default();
    while got.values().map(Vec::len).sum::<usize>() < channels.len() * 3 {
        let v = c.next().await.unwrap();
        if let Some(o) = v["push"]["pub"]["offset"].as_u64() {
            got.entry(v["push"]["channel"].as_str().unwrap().to_string())
                .or_default()
                .push(o);
        }
    }
    for ch in &channels {
        assert_eq!(got[ch], [1, 2, 3], "{ch}");
    }
    let h = api(&b, "history", json!({"channel": channels[0], "limit": -1}))
        .await
        .unwrap();
    assert_eq!(h["result"]["publications"].as_array().unwrap().len(), 3);
    let v = api(&b, "presence_stats", json!({"channel": "room"}))
        .await
        .unwrap();
    assert_eq!(v["result"]["num_clients"], 0);
    a.shutdown().await;
    b.shutdown().await;
    drop(rc);
}

/// A nats-server of our own with JetStream (file store in `dir`), so it can be stopped.
fn spawn_nats(port: u16, dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server must be installed for the cluster tests (apt-get install nats-server)")
}

/// NATS stops under a subscribed client and comes back with its JetStream store: publishes
/// are refused meanwhile, health goes red then green, the client is told to resubscribe
/// (2500) and recovers everything, since the stream survived.
#[tokio::test]
async fn nats_restart_reports_health_and_recovers() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("herald-nats-{}", herald_core::node::new_id()));
    let mut nats = spawn_nats(port, &dir);
    wait_port(port).await;
    let url = format!("nats://127.0.0.1:{port}");
    let node = start_with(&nats_config(&prefix(), &url)).await;
    let (mut c, _) = Client::connect(&node, "u").await.unwrap();
    let r = c
        .call(2, "subscribe", json!({"channel":"big:x"}))
        .await
        .unwrap();
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    publish(&node, "big:x", json!(1)).await.unwrap();
    assert_eq!(c.publication("big:x").await.unwrap()["offset"], 1);
    nats.kill().unwrap();
    nats.wait().unwrap();
    // Refused with a temporary error while NATS is away, never acknowledged.
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
    let _nats = Restart(spawn_nats(port, &dir));
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
    // The refused publish may still have reached the stream once NATS was back (the client
    // had it buffered): recovery returns whatever the stream holds after offset 1, in order.
    let r = c
        .call(
            3,
            "subscribe",
            json!({"channel":"big:x","recover":true,"offset":1,"epoch":epoch}),
        )
        .await
        .unwrap();
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    assert_eq!(r["subscribe"]["epoch"], epoch.as_str());
    let v = publish(&node, "big:x", json!(3)).await.unwrap();
    let got = c.publication("big:x").await.unwrap();
    assert_eq!(got["offset"], v["offset"]);
    assert_eq!(got["data"], 3);
    node.shutdown().await;
    drop(_nats);
    let _ = std::fs::remove_dir_all(&dir);
}
