//! End-to-end runs of herald-bench against the Herald server binary of this workspace
//! (`target/<profile>/herald`, or `HERALD_BIN`). Build it first with
//! `cargo build -p herald-server`; a workspace test run builds it anyway.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
[client]
token_hmac_secret = "bench-secret"
max_channels = 128
[api]
key = "bench-key"
[engine]
type = "memory"
[[namespaces]]
name = ""
allow_subscribe_for_client = true
"#;

fn herald_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HERALD_BIN") {
        return PathBuf::from(p);
    }
    // This test runs from target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile> directory");
    let bin = profile_dir.join("herald");
    assert!(
        bin.is_file(),
        "Herald binary not found at {}: build it with `cargo build -p herald-server` \
         (or point HERALD_BIN at one)",
        bin.display()
    );
    bin
}

/// Starts Herald on a free port; returns the server and its WebSocket URL.
fn start_herald(dir: &TempDir) -> (Server, String) {
    start_herald_with(dir, "herald.toml", CONFIG)
}

fn start_herald_with(dir: &TempDir, file: &str, config: &str) -> (Server, String) {
    let conf = dir.path().join(file);
    std::fs::write(&conf, config).expect("write herald config");
    let mut child = Command::new(herald_binary())
        .arg("serve")
        .arg("--config")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start herald");
    let stdout = child.stdout.take().expect("herald stdout");
    let server = Server {
        child,
        name: "herald",
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("herald: listening on http://") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("herald did not print its listening address within 20 s");
    (server, format!("ws://{addr}/connection/websocket"))
}

/// `herald-bench fanout` against Herald with this file's token secret and API key, then
/// `extra`.
/// `herald-bench connect` against Herald: `n` connections with tokens signed by `secret`,
/// held `hold` seconds.
fn herald_connect(
    url: &str,
    secret: &str,
    n: &str,
    hold: &str,
    extra: &[&str],
    dir: &TempDir,
) -> serde_json::Value {
    let mut args = vec![
        "connect",
        "--target",
        "herald",
        "--url",
        url,
        "--token-secret",
        secret,
        "--connections",
        n,
        "--rate",
        "1000",
        "--duration",
        hold,
    ];
    args.extend_from_slice(extra);
    bench_json(&args, dir)
}

fn herald_fanout(url: &str, extra: &[&str], dir: &TempDir) -> serde_json::Value {
    let mut args = vec![
        "fanout",
        "--target",
        "herald",
        "--url",
        url,
        "--token-secret",
        "bench-secret",
        "--api-key",
        "bench-key",
    ];
    args.extend_from_slice(extra);
    bench_json(&args, dir)
}

#[test]
fn fanout_against_herald_sharded_over_two_processes() {
    let dir = TempDir::new("herald-fanout");
    let (server, url) = start_herald(&dir);
    let pid = server.pid().to_string();
    let r = herald_fanout(
        &url,
        &[
            "--subscribers",
            "120",
            "--channels",
            "3",
            "--publish-rate",
            "60",
            "--payload",
            "128",
            "--duration",
            "2",
            "--procs",
            "2",
            "--server-pid",
            &pid,
        ],
        &dir,
    );
    assert_clean_fanout(&r, 120);
    assert_eq!(u(&r, "expected"), 120 * 40);
    assert_eq!(u(&r, "publish_errors"), 0, "{r}");
    drop(server);
}

/// `config` on the Redis engine (`HERALD_TEST_REDIS`, else the local one) under `prefix`,
/// with node heartbeats fast enough that a dead node leaves the arbiter's list in a second.
fn on_redis(config: &str, prefix: &str) -> String {
    let redis =
        std::env::var("HERALD_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let hostport = redis.trim_start_matches("redis://").trim_end_matches('/');
    assert!(
        std::net::TcpStream::connect(hostport).is_ok(),
        "this test needs Redis at {redis} (set HERALD_TEST_REDIS to another redis:// address)"
    );
    let on = config.replace(
        "[engine]\ntype = \"memory\"",
        &format!(
            "[engine]\ntype = \"redis\"\n[engine.redis]\nurl = \"{redis}\"\nprefix = \"{prefix}\"\n\
             node_heartbeat = \"200ms\"\nnode_eviction = \"1s\""
        ),
    );
    assert_ne!(on, config, "the engine section was not replaced");
    on
}

/// A metric without labels of the node whose WebSocket URL is `ws_url`.
fn metric_of(ws_url: &str, name: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let addr = ws_url.strip_prefix("ws://")?.split('/').next()?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Subscribers that reconnect (`--reconnect`): one of two nodes is killed (SIGKILL) while
/// publishing goes on through the other. Its subscribers get the live node from the
/// arbiter, subscribe again recovering from their last offset, and nothing is lost or
/// delivered twice.
#[test]
fn reconnecting_subscribers_recover_across_a_node_kill() {
    let dir = TempDir::new("herald-failover");
    // History with recovery for every subscription, personal channels included.
    let history = CONFIG
        .replace(
            "allow_subscribe_for_client = true",
            "allow_subscribe_for_client = true\nhistory_size = 1000\nhistory_ttl = \"60s\"\n\
             force_recovery = true",
        )
        .replace(
            "max_channels = 128\n",
            "max_channels = 128\n[client.subscribe_to_user_personal_channel]\nenabled = true\n",
        );
    let config = on_redis(&history, &format!("bench-kill-{}", std::process::id()));
    let (a, url_a) = start_herald_with(&dir, "a.toml", &config);
    let (mut b, url_b) = start_herald_with(&dir, "b.toml", &config);
    let urls = format!("{url_a},{url_b}");
    let run = {
        let dir = TempDir::new("herald-failover-run");
        std::thread::spawn(move || {
            herald_fanout(
                &urls,
                &[
                    "--subscribers",
                    "40",
                    "--channels",
                    "1",
                    "--publish-rate",
                    "50",
                    "--payload",
                    "64",
                    "--duration",
                    "5",
                    "--drain",
                    "5",
                    "--personal-rate",
                    "40",
                    "--reconnect",
                ],
                &dir,
            )
        })
    };
    // Once publishing has begun (after every subscriber is in), node b dies without a word.
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while metric_of(&url_b, "herald_deliveries_total").unwrap_or(0) < 20 {
        assert!(
            std::time::Instant::now() < until,
            "node b's 20 subscribers never received a publication"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    b.child.kill().expect("SIGKILL node b");
    let r = run.join().expect("the bench run");
    assert_eq!(
        u(&r, "reconnects"),
        20,
        "node b's subscribers came back: {r}"
    );
    assert_eq!(u(&r, "unrecovered"), 0, "{r}");
    assert_eq!(u(&r, "lost"), 0, "{r}");
    assert_eq!(u(&r, "duplicated"), 0, "{r}");
    assert_eq!(u(&r, "out_of_order"), 0, "{r}");
    assert_eq!(u(&r, "delivered"), u(&r, "expected"), "{r}");
    // Personal pushes to node b's users while they were away come back through the
    // connect's recovery of server-side subscriptions.
    assert_eq!(u(&r, "personal_published"), 200, "{r}");
    assert_eq!(u(&r, "personal_lost"), 0, "{r}");
    assert_eq!(u(&r, "personal_duplicated"), 0, "{r}");
    assert!(r["all_back_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{r}");
    // Each publication reached all 40 subscribers (those of node b through recovery), and
    // the report says when the last one had it.
    let pubs = r["publications"]
        .as_array()
        .expect("per-publication figures");
    assert_eq!(pubs.len() as u64, u(&r, "published"), "{r}");
    for p in pubs {
        assert_eq!(p["delivered"].as_u64(), Some(40), "{p}");
        assert!(
            p["all_delivered_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
            "{p}"
        );
    }
    drop(a);
}

/// A two-node cluster on Redis: the bench spreads subscribers over both URLs, publishes
/// through the first node, and sums both nodes' memory.
#[test]
fn fanout_against_a_two_node_redis_cluster() {
    let dir = TempDir::new("herald-cluster");
    let config = on_redis(CONFIG, &format!("bench-two-{}", std::process::id()));
    let (a, url_a) = start_herald_with(&dir, "a.toml", &config);
    let (b, url_b) = start_herald_with(&dir, "b.toml", &config);
    let urls = format!("{url_a},{url_b}");
    let pids = format!("{},{}", a.pid(), b.pid());
    let r = herald_fanout(
        &urls,
        &[
            "--subscribers",
            "100",
            "--channels",
            "2",
            "--publish-rate",
            "40",
            "--payload",
            "64",
            "--duration",
            "2",
            "--server-pid",
            &pids,
        ],
        &dir,
    );
    // Half the subscribers sit on the node the publisher does not talk to: without the
    // cluster (or with every connection on one URL) they would count as lost.
    assert_clean_fanout(&r, 100);
    assert_eq!(u(&r, "expected"), 100 * 40);
    assert_eq!(
        r["server_pids"],
        serde_json::json!([a.pid(), b.pid()]),
        "{r}"
    );
    assert!(r["server_rss_loaded_bytes"].as_u64().is_some(), "{r}");
    drop((a, b));
}

/// Pushes to personal channels of random users: counted apart from the shared channel,
/// and counted as lost when the server does not subscribe users to their channel.
#[test]
fn personal_pushes_are_counted_per_user() {
    let dir = TempDir::new("herald-personal");
    let personal = CONFIG.replace(
        "max_channels = 128\n",
        "max_channels = 128\n[client.subscribe_to_user_personal_channel]\nenabled = true\n",
    );
    assert_ne!(personal, CONFIG);
    let run = |url: &str| {
        herald_fanout(
            url,
            &[
                "--subscribers",
                "100",
                "--publish-rate",
                "10",
                "--personal-rate",
                "20",
                "--duration",
                "2",
                "--drain",
                "3",
            ],
            &dir,
        )
    };
    let (server, url) = start_herald_with(&dir, "personal.toml", &personal);
    let r = run(&url);
    assert_clean_fanout(&r, 100);
    assert_eq!(u(&r, "personal_users"), 40, "{r}");
    assert_eq!(u(&r, "personal_published"), 40, "{r}");
    assert_eq!(u(&r, "personal_delivered"), 40, "{r}");
    assert_eq!(u(&r, "personal_lost"), 0, "{r}");
    assert_eq!(u(&r, "personal_duplicated"), 0, "{r}");
    assert!(
        r["personal_latency_ms"]["p99"].as_f64().unwrap_or(0.0) > 0.0,
        "{r}"
    );
    drop(server);

    // Without personal channels nobody receives them: all lost, the shared channel unharmed.
    let (server, url) = start_herald(&dir);
    let r = run(&url);
    assert_clean_fanout(&r, 100);
    assert_eq!(u(&r, "personal_published"), 40, "{r}");
    assert_eq!(u(&r, "personal_delivered"), 0, "{r}");
    assert_eq!(u(&r, "personal_lost"), 40, "{r}");
    drop(server);
}

#[test]
fn connect_against_herald_and_token_failures() {
    let dir = TempDir::new("herald-connect");
    let (server, url) = start_herald(&dir);
    let pid = server.pid().to_string();
    let r = herald_connect(
        &url,
        "bench-secret",
        "300",
        "1",
        &["--server-pid", &pid],
        &dir,
    );
    assert_eq!(u(&r, "established"), 300, "{r}");
    assert_eq!(u(&r, "failed"), 0, "{r}");
    assert!(r["rss_per_connection_bytes"].as_f64().is_some(), "{r}");
    assert!(
        r["generator_rss_per_connection_bytes"].as_f64().is_some(),
        "{r}"
    );

    // Tokens signed with the wrong secret: every connection fails, and the report
    // says so instead of hanging or erroring out.
    let r = herald_connect(&url, "wrong-secret", "20", "0", &[], &dir);
    assert_eq!(u(&r, "established"), 0, "{r}");
    assert_eq!(u(&r, "failed"), 20, "{r}");
    assert!(!r["errors"].as_object().is_none_or(|e| e.is_empty()), "{r}");
    drop(server);
}

/// Idle connections over the unidirectional HTTP transports: each subscribed by its token
/// (the bench checks the connect push lists the channel), held, and the memory reported.
#[test]
fn connect_over_the_unidirectional_http_transports() {
    let dir = TempDir::new("herald-uni");
    let (server, url) = start_herald(&dir);
    let pid = server.pid().to_string();
    for transport in ["uni-sse", "uni-http-stream"] {
        let extra = ["--transport", transport, "--server-pid", &pid];
        let r = herald_connect(&url, "bench-secret", "200", "1", &extra, &dir);
        assert_eq!(r["transport"].as_str(), Some(transport), "{r}");
        assert_eq!(u(&r, "established"), 200, "{r}");
        assert_eq!(u(&r, "failed"), 0, "{r}");
        assert_eq!(u(&r, "disconnected"), 0, "{r}");
        assert!(r["rss_per_connection_bytes"].as_f64().is_some(), "{r}");
    }
    // A token the node does not accept: every stream is refused, and counted so.
    let r = herald_connect(
        &url,
        "not-the-secret",
        "20",
        "0",
        &["--transport", "uni-sse"],
        &dir,
    );
    assert_eq!(u(&r, "established"), 0, "{r}");
    assert_eq!(u(&r, "failed"), 20, "{r}");
    drop(server);
}

/// Connections with permessage-deflate agreed. The channel's name is long enough that the
/// replies naming it are over Herald's compression threshold (128 bytes), so they arrive
/// compressed and the bench must inflate them to see its subscription confirmed. A node with
/// compression off does not agree, which the bench counts as failed connections.
#[test]
fn connect_with_permessage_deflate() {
    let dir = TempDir::new("herald-deflate");
    let (server, url) = start_herald(&dir);
    let pid = server.pid().to_string();
    let channel = "c".repeat(150);
    let extra = [
        "--transport",
        "websocket-deflate",
        "--channel",
        &channel,
        "--server-pid",
        &pid,
    ];
    let r = herald_connect(&url, "bench-secret", "200", "1", &extra, &dir);
    assert_eq!(r["transport"].as_str(), Some("websocket-deflate"), "{r}");
    assert_eq!(u(&r, "established"), 200, "{r}");
    assert_eq!(u(&r, "failed"), 0, "{r}");
    assert_eq!(u(&r, "disconnected"), 0, "{r}");
    drop(server);

    let off = CONFIG.replacen("[server]\n", "[server]\nwebsocket_compression = false\n", 1);
    let (server, url) = start_herald_with(&dir, "no-deflate.toml", &off);
    let r = herald_connect(&url, "bench-secret", "20", "0", &extra[..4], &dir);
    assert_eq!(u(&r, "established"), 0, "{r}");
    assert_eq!(u(&r, "failed"), 20, "{r}");
    drop(server);
}

#[test]
fn fanout_against_herald_over_protobuf_and_json() {
    let dir = TempDir::new("herald-protobuf");
    let (server, url) = start_herald(&dir);
    let pid = server.pid().to_string();
    let run = |protocol: &str, procs: &str| {
        bench_json(
            &[
                "fanout",
                "--target",
                "herald",
                "--protocol",
                protocol,
                "--url",
                &url,
                "--token-secret",
                "bench-secret",
                "--api-key",
                "bench-key",
                "--subscribers",
                "100",
                "--channels",
                "2",
                "--publish-rate",
                "40",
                "--payload",
                "128",
                "--duration",
                "2",
                "--procs",
                procs,
                "--server-pid",
                &pid,
            ],
            &dir,
        )
    };
    // Two processes: the children must get the protocol with their job.
    let pb = run("protobuf", "2");
    assert_clean_fanout(&pb, 100);
    assert_eq!(u(&pb, "expected"), 100 * 40);
    assert_eq!(u(&pb, "publish_errors"), 0, "{pb}");
    assert_eq!(pb["protocol"], "protobuf", "{pb}");
    let json = run("json", "1");
    assert_clean_fanout(&json, 100);
    assert_eq!(json["protocol"], "json", "{json}");

    // Every delivery carries the 128-byte payload; Protobuf framing is the leaner one.
    let per = |r: &serde_json::Value| r["bytes_per_delivery"].as_f64().unwrap_or(0.0);
    let (pb_b, json_b) = (per(&pb), per(&json));
    assert!(
        u(&pb, "bytes_received") >= 128 * u(&pb, "delivered"),
        "{pb}"
    );
    assert!(
        pb_b > 128.0 && pb_b < json_b,
        "protobuf {pb_b} vs json {json_b}"
    );

    // Refused connections are reported as failures, not hangs.
    let r = bench_json(
        &[
            "connect",
            "--target",
            "herald",
            "--protocol",
            "protobuf",
            "--url",
            &url,
            "--token-secret",
            "wrong-secret",
            "--connections",
            "10",
            "--rate",
            "1000",
            "--duration",
            "0",
        ],
        &dir,
    );
    assert_eq!(u(&r, "established"), 0, "{r}");
    assert_eq!(u(&r, "failed"), 10, "{r}");
    assert!(!r["errors"].as_object().is_none_or(|e| e.is_empty()), "{r}");
    drop(server);
}

#[test]
fn protobuf_is_refused_for_other_targets() {
    // Validation happens before any socket is opened.
    for (scenario, target) in [("fanout", "nats"), ("connect", "mqtt")] {
        let out = run_bench(
            &[
                scenario,
                "--target",
                target,
                "--protocol",
                "protobuf",
                "--url",
                "ws://127.0.0.1:9/",
                "--duration",
                "1",
            ],
            Duration::from_secs(20),
        );
        assert!(!out.status.success(), "{scenario} --target {target}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--protocol protobuf applies to --target herald only"),
            "{err}"
        );
    }
}
