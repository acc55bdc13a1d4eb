//! Failover under load with real processes: three `herald` nodes on the machine's Redis
//! (and the same again on its NATS with JetStream),
//! 300 subscribers spread over them, a publisher at 200 msg/s for 10 s, and one node killed
//! with SIGKILL midway. Every subscriber must end with the complete sequence: 0 lost,
//! 0 duplicated, order kept.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const CHANNEL: &str = "big:failover";
const SUBSCRIBERS: usize = 300;
const RATE: u64 = 200;
const SECONDS: u64 = 10;
/// A subscriber that heard nothing for this long tries another node.
const QUIET_LIMIT: Duration = Duration::from_secs(15);

struct Node {
    child: Child,
    addr: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_node(dir: &std::path::Path, i: usize, prefix: &str, nats: bool) -> Node {
    let engine = if nats { "nats" } else { "redis" };
    spawn_node_with(
        dir,
        i,
        &format!(
            "[engine]\ntype = \"{engine}\"\n[engine.{engine}]\nprefix = \"{prefix}\"\nnode_heartbeat = \"200ms\"\nnode_eviction = \"1s\"\n"
        ),
    )
}

/// A `herald` process with `engine` (TOML of `[engine]` and its sub-table).
fn spawn_node_with(dir: &std::path::Path, i: usize, engine: &str) -> Node {
    try_spawn_node_with(dir, i, engine, "warn").expect("herald exited before listening")
}

/// Where node `i` writes its log.
fn node_log(dir: &std::path::Path, i: usize) -> std::path::PathBuf {
    dir.join(format!("node{i}.log"))
}

/// Like [`spawn_node_with`], logging at `log` (`HERALD_LOG`) to [`node_log`]; Err when the
/// node exits before listening (e.g. its engine could not set up yet), with its log.
fn try_spawn_node_with(
    dir: &std::path::Path,
    i: usize,
    engine: &str,
    log: &str,
) -> std::result::Result<Node, String> {
    let cfg = common::config_on(engine);
    let path = dir.join(format!("node{i}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let log_path = node_log(dir, i);
    // A file never blocks the node the way a full pipe would, and outlives a failed run.
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("HERALD_LOG", log)
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.wait();
            return Err(std::fs::read_to_string(&log_path).unwrap_or_default());
        };
        if let Some(a) = line.strip_prefix("herald: listening on http://") {
            break a.to_string();
        }
    };
    // Keep draining stdout so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok(Node { child, addr })
}

/// The last `n` lines of node `i`'s log that mention any of `needles` (all lines when
/// `needles` is empty).
fn log_tail(dir: &std::path::Path, i: usize, needles: &[&str], n: usize) -> String {
    let text = std::fs::read_to_string(node_log(dir, i)).unwrap_or_default();
    let hits: Vec<&str> = text
        .lines()
        .filter(|l| needles.is_empty() || needles.iter().any(|w| l.contains(w)))
        .collect();
    hits[hits.len().saturating_sub(n)..].join("\n")
}

/// What a subscriber did last (node, client id, replies, resubscribe pushes), to tell
/// what went wrong when it does not end whole.
#[derive(Default)]
struct Trace(std::collections::VecDeque<String>);

impl Trace {
    const KEEP: usize = 40;

    fn note(&mut self, event: String) {
        if self.0.len() == Self::KEEP {
            self.0.pop_front();
        }
        self.0.push_back(format!("{} {event}", wall_clock()));
    }

    /// Client ids this subscriber had, most recent last.
    fn clients(&self) -> Vec<String> {
        self.0
            .iter()
            .filter_map(|e| e.split("client ").nth(1))
            .filter_map(|r| r.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }
}

impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// UTC time of day with milliseconds, as the nodes' logs print it.
fn wall_clock() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Why a subscriber did not end whole: its own account and the nodes it used.
#[derive(Debug)]
struct Stalled {
    message: String,
    trace: String,
    clients: Vec<String>,
}

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}\nlast events:\n{}", self.message, self.trace)
    }
}

impl std::error::Error for Stalled {}

/// A subscriber that knows every node: on a lost connection it moves to the next node and
/// resubscribes with recovery from the last offset it has.
async fn subscriber(
    addrs: Arc<Vec<String>>,
    start: usize,
    total: Arc<AtomicU64>,
    killed_at: Arc<parking_lot_free::Cell>,
) -> Result<(Vec<u64>, Option<Duration>, Trace)> {
    let token = common::token("sub", 3600);
    let mut offsets: Vec<u64> = Vec::new();
    let mut epoch = String::new();
    let mut idx = start;
    let mut whole_after_kill = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut trace = Trace::default();
    let stalled = |message: String, trace: &Trace| Stalled {
        message,
        trace: trace.to_string(),
        clients: trace.clients(),
    };
    'reconnect: loop {
        if Instant::now() > deadline {
            let last = offsets.last().copied().unwrap_or(0);
            return Err(stalled(
                format!(
                    "subscriber {start} not whole after 60s: {} offsets, last {last}",
                    offsets.len()
                ),
                &trace,
            )
            .into());
        }
        let node = idx % addrs.len();
        let url = format!("ws://{}/connection/websocket", addrs[node]);
        let Ok(Ok((ws, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(url),
        )
        .await
        else {
            idx += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (mut tx, mut rx) = ws.split();
        let recovering = !epoch.is_empty();
        let sub = if recovering {
            json!({"channel": CHANNEL, "recover": true, "offset": offsets.last().copied().unwrap_or(0), "epoch": epoch})
        } else {
            json!({"channel": CHANNEL})
        };
        let frame = format!(
            "{}\n{}",
            json!({"id":1,"connect":{"token": token}}),
            json!({"id":2,"subscribe": sub})
        );
        trace.note(format!(
            "node {node}: subscribe from {:?} (have {})",
            offsets.last(),
            offsets.len()
        ));
        if tx.send(Message::text(frame)).await.is_err() {
            idx += 1;
            continue;
        }
        let mut silent = Duration::ZERO;
        let mut live_noted = false;
        loop {
            let msg = match tokio::time::timeout(Duration::from_millis(250), rx.next()).await {
                Ok(Some(Ok(m))) => m,
                // Quiet: done if the last offset became known meanwhile, else keep waiting
                // before trying another node. A healthy node is quiet while NATS elects a
                // new stream leader (publishes are refused meanwhile, several seconds):
                // leaving it then would make the subscriber recover more than
                // `recovery_max_publication_limit` publications later.
                Err(_) if silent < QUIET_LIMIT => {
                    silent += Duration::from_millis(250);
                    let total = total.load(Ordering::Relaxed);
                    if total > 0 && offsets.last().copied() == Some(total) {
                        return Ok((offsets, whole_after_kill, trace));
                    }
                    continue;
                }
                _ => {
                    trace.note(format!("node {node}: silent or closed, next node"));
                    idx += 1;
                    continue 'reconnect;
                }
            };
            silent = Duration::ZERO;
            let Message::Text(text) = msg else {
                if let Message::Close(_) = msg {
                    trace.note(format!("node {node}: closed {msg:?}"));
                    idx += 1;
                    continue 'reconnect;
                }
                continue;
            };
            for line in text.as_str().split('\n') {
                let v: Value = serde_json::from_str(line).context("bad json")?;
                if v == json!({}) {
                    let _ = tx.send(Message::text("{}")).await;
                } else if v["id"] == 1 {
                    trace.note(format!("node {node}: client {}", v["connect"]["client"]));
                } else if v["id"] == 2 {
                    let r = &v["subscribe"];
                    let pubs = r["publications"].as_array().map_or(0, Vec::len);
                    trace.note(format!(
                        "node {node}: reply recovered={} offset={} epoch={} publications={pubs} ({}..{}) error={}",
                        r["recovered"],
                        r["offset"],
                        r["epoch"],
                        r["publications"][0]["offset"],
                        r["publications"][pubs.saturating_sub(1)]["offset"],
                        v["error"],
                    ));
                    if r.is_null() {
                        // Refused (e.g. the engine was busy): try again on another node.
                        idx += 1;
                        continue 'reconnect;
                    }
                    if recovering && r["recovered"] != true {
                        return Err(stalled(
                            format!("subscriber {start}: recovery failed: {v}"),
                            &trace,
                        )
                        .into());
                    }
                    epoch = r["epoch"].as_str().unwrap_or_default().to_string();
                    for p in r["publications"].as_array().cloned().unwrap_or_default() {
                        offsets.push(p["offset"].as_u64().unwrap_or(0));
                    }
                    if recovering
                        && whole_after_kill.is_none()
                        && let Some(at) = killed_at.get()
                    {
                        whole_after_kill = Some(at.elapsed());
                    }
                } else if v["push"]["channel"] == CHANNEL
                    && let Some(o) = v["push"]["pub"]["offset"].as_u64()
                {
                    if !live_noted {
                        live_noted = true;
                        trace.note(format!("node {node}: first live {o}"));
                    }
                    offsets.push(o);
                } else if v["push"]["channel"] == CHANNEL && v["push"].get("unsubscribe").is_some()
                {
                    trace.note(format!(
                        "node {node}: unsubscribe push {} after {:?}",
                        v["push"]["unsubscribe"],
                        offsets.last()
                    ));
                    // Told to resubscribe (2500): recover on a fresh connection.
                    continue 'reconnect;
                }
            }
            let total = total.load(Ordering::Relaxed);
            if total > 0 && offsets.last().copied() == Some(total) {
                return Ok((offsets, whole_after_kill, trace));
            }
        }
    }
}

/// A write-once instant shared between tasks.
mod parking_lot_free {
    use std::sync::OnceLock;
    use std::time::Instant;

    #[derive(Default)]
    pub struct Cell(OnceLock<Instant>);

    impl Cell {
        pub fn set_now(&self) {
            let _ = self.0.set(Instant::now());
        }
        pub fn get(&self) -> Option<Instant> {
            self.0.get().copied()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_one_node_under_load_nothing_lost() {
    common::require_redis(common::REDIS).await;
    kill_one_node_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_one_node_under_load_nothing_lost_nats() {
    common::require_nats(common::NATS).await;
    kill_one_node_under_load(true).await;
}

async fn kill_one_node_under_load(nats: bool) {
    let dir = std::env::temp_dir().join(format!("herald-failover-{}", herald_core::node::new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = format!("herald-failover-{}", herald_core::node::new_id());
    let mut nodes: Vec<Node> = (0..3).map(|i| spawn_node(&dir, i, &prefix, nats)).collect();
    let addrs = Arc::new(nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>());
    let total = RATE * SECONDS;
    let killed_at = Arc::new(parking_lot_free::Cell::default());
    let known_total = Arc::new(AtomicU64::new(total));

    let mut subs = Vec::new();
    for i in 0..SUBSCRIBERS {
        subs.push(tokio::spawn(subscriber(
            addrs.clone(),
            i,
            known_total.clone(),
            killed_at.clone(),
        )));
    }
    // Everyone subscribed before publishing starts: channels on every node.
    let api_addr = addrs[0].clone();
    wait_subscribed(&api_addr, SUBSCRIBERS).await;

    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for i in 1..=total {
        tick.tick().await;
        if i == total / 2 {
            let victim = nodes.pop().unwrap();
            killed_at.set_now();
            drop(victim); // SIGKILL
        }
        let (_, v) = http_to(
            &api_addr,
            "publish",
            json!({"channel": CHANNEL, "data": {"i": i}}),
        )
        .await
        .unwrap();
        assert_eq!(v["result"]["offset"], i, "publish {i}: {v}");
    }

    let mut slowest = Duration::ZERO;
    let mut moved = 0;
    for s in subs {
        let (offsets, whole, _) = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            offsets,
            (1..=total).collect::<Vec<_>>(),
            "lost, duplicated or reordered"
        );
        if let Some(w) = whole {
            moved += 1;
            slowest = slowest.max(w);
        }
    }
    assert!(
        moved > 0,
        "no subscriber had to move: the kill did not happen"
    );
    let engine = if nats { "nats" } else { "redis" };
    println!(
        "failover ({engine}): {SUBSCRIBERS} subscribers x {total} publications, 0 lost, 0 duplicated, order kept; \
         {moved} moved nodes, slowest whole again {:.0} ms after the kill",
        slowest.as_secs_f64() * 1000.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    if nats {
        common::delete_nats_streams(common::NATS, &prefix);
    }
}

/// Waits until `n` clients are subscribed to the test channel across the cluster.
async fn wait_subscribed(api_addr: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = http_to(api_addr, "channels", json!({})).await.unwrap();
        if v["result"]["channels"][CHANNEL]["num_clients"].as_u64() == Some(n as u64) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "subscribers did not all subscribe: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn http_to(addr: &str, method: &str, body: Value) -> Result<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let body = body.to_string();
    let req = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: t\r\nX-API-Key: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        common::API_KEY,
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let status = text.split_whitespace().nth(1).unwrap_or("0").parse()?;
    let json = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap_or("null"))?;
    Ok((status, json))
}

/// One member of a 3-server NATS cluster with JetStream, on its own ports and store.
fn spawn_nats_member(dir: &std::path::Path, i: usize, ports: &[u16], routes: &[u16]) -> Child {
    let others: Vec<String> = routes
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
        .collect();
    Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &ports[i].to_string()])
        .args(["-n", &format!("hf{i}"), "--cluster_name", "herald-failover"])
        .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[i])])
        .args(["--routes", &others.join(",")])
        .arg("-sd")
        .arg(dir.join(format!("nats{i}")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server must be installed for the broker failover test")
}

/// A 3-server NATS cluster with JetStream (routes, own stores in `dir`, free ports),
/// killed on drop.
struct NatsCluster {
    dir: std::path::PathBuf,
    ports: Vec<u16>,
    routes: Vec<u16>,
    members: Vec<Option<Child>>,
}

impl NatsCluster {
    /// Starts the three servers and waits until JetStream answers (a meta leader).
    async fn start(dir: &std::path::Path) -> NatsCluster {
        let ports: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
        let members = (0..3)
            .map(|i| Some(spawn_nats_member(dir, i, &ports, &routes)))
            .collect();
        let cluster = NatsCluster {
            dir: dir.to_path_buf(),
            ports,
            routes,
            members,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = cluster.js_request("$JS.API.INFO").await;
            if info.as_ref().is_some_and(|v| v.get("error").is_none()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "JetStream cluster not ready: {info:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cluster
    }

    async fn js_request(&self, subject: &str) -> Option<Value> {
        let (port, subject) = (self.ports[0], subject.to_string());
        tokio::task::spawn_blocking(move || js_request(port, &subject))
            .await
            .unwrap()
    }

    /// SIGKILL of member `i`.
    fn kill(&mut self, i: usize) {
        let mut child = self.members[i].take().expect("member running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Member `i` again, on its ports and store.
    fn restart(&mut self, i: usize) {
        self.members[i] = Some(spawn_nats_member(&self.dir, i, &self.ports, &self.routes));
    }

    /// The `[engine]` tables of a Herald node on this cluster with R3 streams.
    fn engine(&self, prefix: &str) -> String {
        let servers: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("\"nats://127.0.0.1:{p}\""))
            .collect();
        format!(
            "[engine]\ntype = \"nats\"\n[engine.nats]\nservers = [{}]\nprefix = \"{prefix}\"\nreplicas = 3\nnode_heartbeat = \"200ms\"\nnode_eviction = \"1s\"\nrequest_timeout = \"2s\"\n",
            servers.join(", ")
        )
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for c in self.members.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `n` Herald nodes on `engine`, logging at `log`; until the JetStream cluster can place
/// R3 streams a node may refuse to start, so each is tried again for up to 30 s.
async fn herald_nodes(dir: &std::path::Path, engine: &str, n: usize, log: &str) -> Vec<Node> {
    let mut nodes: Vec<Node> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes.len() < n {
        match try_spawn_node_with(dir, nodes.len(), engine, log) {
            Ok(node) => nodes.push(node),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "herald did not start on NATS: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    nodes
}

/// A JetStream API request in plain NATS protocol; None when there is no answer in time.
fn js_request(port: u16, subject: &str) -> Option<Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?; // INFO
    let cmds = format!(
        "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.herald 1\r\nPUB {subject} _INBOX.herald 0\r\n\r\n"
    );
    stream.write_all(cmds.as_bytes()).ok()?;
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line.starts_with("PING") {
            stream.write_all(b"PONG\r\n").ok()?;
        }
        if let Some(header) = line.strip_prefix("MSG ") {
            let len: usize = header.split_whitespace().last()?.parse().ok()?;
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body).ok()?;
            body.truncate(len);
            return serde_json::from_slice(&body).ok();
        }
    }
}

/// The nodes' log in the stream-leader-kill test: enough to follow one channel's live feed
/// and one client's subscriptions.
const NATS_FAILOVER_LOG: &str = "warn,herald_nats=debug,herald_core=debug";

/// A failed subscriber's account, and what the nodes logged about its clients and the
/// NATS engine (the logs stay in `dir`).
fn stalled_report(e: &anyhow::Error, dir: &std::path::Path, nodes: usize) -> String {
    let mut out = format!("{e:#}\nnode logs in {}\n", dir.display());
    let clients: Vec<&str> = e
        .downcast_ref::<Stalled>()
        .map(|s| s.clients.iter().map(|c| c.trim_matches('"')).collect())
        .unwrap_or_default();
    for i in 0..nodes {
        out.push_str(&format!(
            "--- node {i}, its clients:\n{}\n--- node {i}, engine:\n{}\n",
            log_tail(dir, i, &clients, 20),
            log_tail(dir, i, &["herald_nats"], 30),
        ));
    }
    out
}

/// A 3-server NATS cluster, R3 streams, 3 Herald nodes, 300 subscribers, a publisher at
/// 200 msg/s; the history stream's leader is SIGKILLed midway. Publishes during the
/// election may be refused; every acknowledged one must reach every subscriber exactly
/// once, in order (subscribers see a gapless offset sequence containing every acked one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nats_stream_leader_under_load_nothing_acknowledged_lost() {
    let dir = std::env::temp_dir().join(format!("herald-nats-fo-{}", herald_core::node::new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut brokers = NatsCluster::start(&dir).await;
    let prefix = format!("herald-nfo-{}", herald_core::node::new_id());
    let engine = brokers.engine(&prefix);
    let nodes = herald_nodes(&dir, &engine, 3, NATS_FAILOVER_LOG).await;
    let addrs = Arc::new(nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>());
    let planned = RATE * SECONDS;
    let killed_at = Arc::new(parking_lot_free::Cell::default());
    // The last offset is known only at the end (refused publishes may still be stored).
    let known_total = Arc::new(AtomicU64::new(0));
    let mut subs = Vec::new();
    for i in 0..SUBSCRIBERS {
        subs.push(tokio::spawn(subscriber(
            addrs.clone(),
            i,
            known_total.clone(),
            killed_at.clone(),
        )));
    }
    let api_addr = addrs[0].clone();
    wait_subscribed(&api_addr, SUBSCRIBERS).await;
    let stream_info = brokers
        .js_request(&format!("$JS.API.STREAM.INFO.{prefix}_history"))
        .await
        .expect("stream info");
    assert_eq!(stream_info["config"]["num_replicas"], 3, "{stream_info}");
    let leader = stream_info["cluster"]["leader"]
        .as_str()
        .expect("stream leader")
        .to_string();
    let victim: usize = leader.trim_start_matches("hf").parse().unwrap();

    let mut acked: Vec<u64> = Vec::new();
    let mut refused = 0;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for i in 1..=planned {
        tick.tick().await;
        if i == planned / 2 {
            killed_at.set_now();
            brokers.kill(victim);
        }
        let v = http_to(
            &api_addr,
            "publish",
            json!({"channel": CHANNEL, "data": {"i": i}}),
        )
        .await;
        match v {
            Ok((_, v)) if v["result"]["offset"].is_u64() => {
                acked.push(v["result"]["offset"].as_u64().unwrap());
            }
            _ => refused += 1,
        }
    }
    // A last publication, retried until acknowledged: its offset ends every sequence.
    let end = loop {
        if let Ok((_, v)) = http_to(
            &api_addr,
            "publish",
            json!({"channel": CHANNEL, "data": "end"}),
        )
        .await
            && let Some(o) = v["result"]["offset"].as_u64()
        {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    acked.push(end);
    known_total.store(end, Ordering::Relaxed);
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "acknowledged offsets not increasing"
    );
    let after_kill = acked.len() as u64 - (planned / 2).min(acked.len() as u64);
    assert!(after_kill > 0, "nothing acknowledged after the kill");

    let mut slowest = Duration::ZERO;
    let mut moved = 0;
    for s in subs {
        let outcome = tokio::time::timeout(Duration::from_secs(90), s)
            .await
            .unwrap()
            .unwrap();
        let (offsets, whole, trace) = match outcome {
            Ok(o) => o,
            Err(e) => panic!("{}", stalled_report(&e, &dir, nodes.len())),
        };
        if offsets != (1..=end).collect::<Vec<_>>() {
            let at = (1..=end)
                .zip(&offsets)
                .position(|(want, got)| want != *got)
                .unwrap_or(offsets.len());
            let around = &offsets[at.saturating_sub(3)..(at + 3).min(offsets.len())];
            let e = anyhow::Error::new(Stalled {
                message: format!(
                    "lost, duplicated or reordered: {} offsets for 1..={end}, first wrong at \
                     index {at}: ...{around:?}...",
                    offsets.len()
                ),
                trace: trace.to_string(),
                clients: trace.clients(),
            });
            panic!("{}", stalled_report(&e, &dir, nodes.len()));
        }
        if let Some(w) = whole {
            moved += 1;
            slowest = slowest.max(w);
        }
    }
    println!(
        "nats broker failover: killed stream leader {leader}; {SUBSCRIBERS} subscribers x {end} \
         publications ({} acknowledged, {refused} refused during the election), 0 lost, \
         0 duplicated, order kept; {moved} recovered, slowest whole again {:.0} ms after the kill",
        acked.len(),
        slowest.as_secs_f64() * 1000.0
    );
    drop(nodes);
    drop(brokers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The status of `GET /ready` on the node at `addr` (0 when it does not answer).
async fn ready_status(addr: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        String::from_utf8_lossy(&buf)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Two of three NATS servers die: JetStream has no quorum. Publishes are refused (an error,
/// never an acknowledgement for a publication then lost) and readiness turns red while the
/// connection to the third server stands. When the two come back, publishing resumes,
/// readiness turns green, and every subscriber has every acknowledged publication, once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_quorum_loss_refuses_publishes_then_recovers() {
    let dir = std::env::temp_dir().join(format!("herald-nats-q-{}", herald_core::node::new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut brokers = NatsCluster::start(&dir).await;
    let prefix = format!("herald-nq-{}", herald_core::node::new_id());
    let nodes = herald_nodes(&dir, &brokers.engine(&prefix), 2, NATS_FAILOVER_LOG).await;
    let addrs = Arc::new(nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>());
    let killed_at = Arc::new(parking_lot_free::Cell::default());
    let known_total = Arc::new(AtomicU64::new(0));
    let subs: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(subscriber(
                addrs.clone(),
                i,
                known_total.clone(),
                killed_at.clone(),
            ))
        })
        .collect();
    let api_addr = addrs[0].clone();
    wait_subscribed(&api_addr, 20).await;
    let publish = |i: u64| {
        let addr = api_addr.clone();
        async move {
            let r = http_to(
                &addr,
                "publish",
                json!({"channel": CHANNEL, "data": {"i": i}}),
            )
            .await;
            r.ok().and_then(|(_, v)| v["result"]["offset"].as_u64())
        }
    };
    for i in 1..=10 {
        assert_eq!(publish(i).await, Some(i), "before the loss");
    }
    assert_eq!(ready_status(&api_addr).await, 200);

    // Quorum lost: the node stays connected to the third server.
    killed_at.set_now();
    brokers.kill(1);
    brokers.kill(2);
    let mut acked = (1..=10).collect::<Vec<u64>>();
    let (mut refused, mut red) = (0, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 11;
    while !(red && refused >= 3) {
        assert!(
            Instant::now() < deadline,
            "no quorum for 30 s, yet readiness red: {red}, refused: {refused}"
        );
        match publish(i).await {
            // Replicated just before the servers died: acknowledged, so it must arrive.
            Some(o) => acked.push(o),
            None => refused += 1,
        }
        i += 1;
        red = ready_status(&api_addr).await == 503;
    }

    // The two come back: writes are taken again and readiness turns green.
    brokers.restart(1);
    brokers.restart(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    let end = loop {
        if let Some(o) = publish(i).await {
            break o;
        }
        assert!(
            Instant::now() < deadline,
            "no publish taken 60 s after the quorum came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    acked.push(end);
    known_total.store(end, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready_status(&api_addr).await != 200 {
        assert!(
            Instant::now() < deadline,
            "readiness stayed red after the quorum came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        acked.windows(2).all(|w| w[0] < w[1]),
        "acknowledged offsets not increasing: {acked:?}"
    );
    for s in subs {
        let outcome = tokio::time::timeout(Duration::from_secs(90), s)
            .await
            .unwrap()
            .unwrap();
        let (offsets, _, _) = match outcome {
            Ok(o) => o,
            Err(e) => panic!("{}", stalled_report(&e, &dir, nodes.len())),
        };
        // Refused publishes may still have been stored; every acknowledged one is there.
        assert_eq!(
            offsets,
            (1..=end).collect::<Vec<_>>(),
            "lost, duplicated or reordered"
        );
        assert!(acked.iter().all(|o| offsets.binary_search(o).is_ok()));
    }
    println!(
        "nats quorum loss: {} acknowledged, {refused} refused while 2 of 3 servers were down, \
         readiness red then green, 20 subscribers whole through offset {end}",
        acked.len()
    );
    drop(nodes);
    drop(brokers);
    let _ = std::fs::remove_dir_all(&dir);
}
