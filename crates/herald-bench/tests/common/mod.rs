//! Helpers for the end-to-end tests: peer servers on free loopback ports, temporary
//! directories, and running the herald-bench binary with a timeout.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "herald-bench-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process killed on drop.
pub struct Server {
    pub child: Child,
    pub name: &'static str,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Finds a server binary, failing the test loudly when it is not installed.
pub fn require_binary(name: &str, package: &str) -> PathBuf {
    let mut candidates = vec![
        PathBuf::from("/usr/sbin").join(name),
        PathBuf::from("/usr/bin").join(name),
    ];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(name)));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed, so this comparison test cannot run. \
             Install it with: apt-get install -y {package}"
            )
        })
}

pub fn wait_for_port(port: u16, server: &mut Server, timeout: Duration) {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("{} exited early with {status}", server.name);
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{} did not listen on 127.0.0.1:{port} within {timeout:?}",
        server.name
    );
}

/// nats-server with a WebSocket listener; returns the server and its ws:// URL.
pub fn start_nats(dir: &TempDir) -> (Server, String) {
    let bin = require_binary("nats-server", "nats-server");
    let (client, ws) = (free_port(), free_port());
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:{client}\"\nwebsocket {{ listen: \"127.0.0.1:{ws}\", no_tls: true }}\n"
        ),
    )
    .expect("write nats.conf");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server");
    let mut s = Server {
        child,
        name: "nats-server",
    };
    wait_for_port(ws, &mut s, Duration::from_secs(10));
    (s, format!("ws://127.0.0.1:{ws}"))
}

/// mosquitto with an MQTT-over-WebSocket listener; returns the server and its URL.
///
/// mosquitto 2.0 refuses to start with only a WebSocket listener, hence the plain
/// one; `socket_domain ipv4` makes libwebsockets bind 127.0.0.1 instead of `*`.
pub fn start_mosquitto(dir: &TempDir) -> (Server, String) {
    let bin = require_binary("mosquitto", "mosquitto");
    let (plain, ws) = (free_port(), free_port());
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {plain} 127.0.0.1\nlistener {ws} 127.0.0.1\nprotocol websockets\nsocket_domain ipv4\nallow_anonymous true\n"
        ),
    )
    .expect("write mosquitto.conf");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    let mut s = Server {
        child,
        name: "mosquitto",
    };
    wait_for_port(ws, &mut s, Duration::from_secs(10));
    (s, format!("ws://127.0.0.1:{ws}"))
}

/// Runs the herald-bench binary, killing it after `timeout`.
pub fn run_bench(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start herald-bench");
    let until = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collect output");
                panic!(
                    "herald-bench {args:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    child.wait_with_output().expect("collect output")
}

/// Runs a scenario that must succeed and returns its JSON report.
pub fn bench_json(args: &[&str], dir: &TempDir) -> serde_json::Value {
    let json = dir.path().join("report.json");
    let json_s = json.to_str().expect("utf-8 temp path").to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--json", &json_s]);
    let out = run_bench(&all, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "herald-bench {all:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("| metric | value |"),
        "no Markdown summary: {stdout}"
    );
    let text = std::fs::read_to_string(&json).expect("report written");
    serde_json::from_str(&text).expect("report is JSON")
}

pub fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not an integer in {v}"))
}

/// A clean fan-out: everyone connected, everything delivered exactly once, in order.
pub fn assert_clean_fanout(r: &serde_json::Value, subscribers: u64) {
    assert_eq!(u(r, "established"), subscribers, "{r}");
    assert_eq!(u(r, "failed"), 0, "{r}");
    assert_eq!(u(r, "disconnected"), 0, "{r}");
    let expected = u(r, "expected");
    assert!(expected > 0, "{r}");
    assert_eq!(u(r, "delivered"), expected, "{r}");
    assert_eq!(u(r, "lost"), 0, "{r}");
    assert_eq!(u(r, "duplicated"), 0, "{r}");
    assert_eq!(u(r, "out_of_order"), 0, "{r}");
    assert_eq!(u(r, "invalid"), 0, "{r}");
    let lat = &r["latency_ms"];
    for k in ["p50", "p90", "p99", "p999", "max"] {
        let v = lat[k].as_f64().unwrap_or(-1.0);
        assert!(v > 0.0 && v < 5000.0, "latency_ms.{k} = {v}");
    }
    assert!(r["deliveries_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(r["generator_cpu_percent"].as_f64().is_some());
    assert!(!r["series"].as_array().is_none_or(|a| a.is_empty()), "{r}");
}
