//! Failover under load with real processes: three `herald` nodes on the machine's Redis,
//! 300 subscribers spread over them, a publisher at 200 msg/s for 10 s, and one node killed
//! with SIGKILL midway. Every subscriber must end with the complete sequence: 0 lost,
//! 0 duplicated, order kept.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const CHANNEL: &str = "big:failover";
const SUBSCRIBERS: usize = 300;
const RATE: u64 = 200;
const SECONDS: u64 = 10;

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

fn spawn_node(dir: &std::path::Path, i: usize, prefix: &str) -> Node {
    let cfg = common::config("").replace(
        "[api]",
        &format!(
            "[engine]\ntype = \"redis\"\n[engine.redis]\nprefix = \"{prefix}\"\nnode_heartbeat = \"200ms\"\nnode_eviction = \"1s\"\n[api]"
        ),
    );
    let path = dir.join(format!("node{i}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("HERALD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("herald exited before listening")
            .unwrap();
        if let Some(a) = line.strip_prefix("herald: listening on http://") {
            break a.to_string();
        }
    };
    // Keep draining stdout so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Node { child, addr }
}

/// A subscriber that knows every node: on a lost connection it moves to the next node and
/// resubscribes with recovery from the last offset it has.
async fn subscriber(
    addrs: Arc<Vec<String>>,
    start: usize,
    total: u64,
    killed_at: Arc<parking_lot_free::Cell>,
) -> Result<(Vec<u64>, Option<Duration>)> {
    let token = common::token("sub", 3600);
    let mut offsets: Vec<u64> = Vec::new();
    let mut epoch = String::new();
    let mut idx = start;
    let mut whole_after_kill = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    'reconnect: loop {
        if Instant::now() > deadline {
            bail!(
                "subscriber {start} not whole after 60s: {} offsets",
                offsets.len()
            );
        }
        let url = format!("ws://{}/connection/websocket", addrs[idx % addrs.len()]);
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
        if tx.send(Message::text(frame)).await.is_err() {
            idx += 1;
            continue;
        }
        loop {
            let msg = match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
                Ok(Some(Ok(m))) => m,
                _ => {
                    idx += 1;
                    continue 'reconnect;
                }
            };
            let Message::Text(text) = msg else {
                if let Message::Close(_) = msg {
                    idx += 1;
                    continue 'reconnect;
                }
                continue;
            };
            for line in text.as_str().split('\n') {
                let v: Value = serde_json::from_str(line).context("bad json")?;
                if v == json!({}) {
                    let _ = tx.send(Message::text("{}")).await;
                } else if v["id"] == 2 {
                    let r = &v["subscribe"];
                    if r.is_null() {
                        // Refused (e.g. the engine was busy): try again on another node.
                        idx += 1;
                        continue 'reconnect;
                    }
                    if recovering && r["recovered"] != true {
                        bail!("subscriber {start}: recovery failed: {v}");
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
                    offsets.push(o);
                }
            }
            if offsets.last().copied() == Some(total) {
                return Ok((offsets, whole_after_kill));
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
    if tokio::net::TcpStream::connect("127.0.0.1:6379")
        .await
        .is_err()
    {
        panic!("the failover test needs Redis at 127.0.0.1:6379");
    }
    let dir = std::env::temp_dir().join(format!("herald-failover-{}", herald_core::node::new_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = format!("herald-failover-{}", herald_core::node::new_id());
    let mut nodes: Vec<Node> = (0..3).map(|i| spawn_node(&dir, i, &prefix)).collect();
    let addrs = Arc::new(nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>());
    let total = RATE * SECONDS;
    let killed_at = Arc::new(parking_lot_free::Cell::default());

    let mut subs = Vec::new();
    for i in 0..SUBSCRIBERS {
        subs.push(tokio::spawn(subscriber(
            addrs.clone(),
            i,
            total,
            killed_at.clone(),
        )));
    }
    // Everyone subscribed before publishing starts: channels on every node.
    let api_addr = addrs[0].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = http_to(&api_addr, "channels", json!({})).await.unwrap();
        if v["result"]["channels"][CHANNEL]["num_clients"].as_u64() == Some(SUBSCRIBERS as u64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "subscribers did not all subscribe: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
        let (offsets, whole) = tokio::time::timeout(Duration::from_secs(60), s)
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
    println!(
        "failover: {SUBSCRIBERS} subscribers x {total} publications, 0 lost, 0 duplicated, order kept; \
         {moved} moved nodes, slowest whole again {:.0} ms after the kill",
        slowest.as_secs_f64() * 1000.0
    );
    let _ = std::fs::remove_dir_all(&dir);
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
