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

/// Where Debian's libnginx-mod-nchan puts the module.
pub const NCHAN_MODULE: &str = "/usr/lib/nginx/modules/ngx_nchan_module.so";

/// nginx configuration for the nchan target: one worker, everything it writes inside
/// `dir` (so it runs without root), WebSocket subscribers at `/sub/<channel>` that get
/// only messages published after they subscribed, publishers at `/pub/<channel>`.
pub fn nchan_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"load_module {NCHAN_MODULE};
worker_processes 1;
worker_rlimit_nofile 20000;
error_log {d}/error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  # One publisher connection carries every publication of its channels.
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port};
    location ~ ^/sub/([A-Za-z0-9._~-]+)$ {{
      nchan_subscriber websocket;
      nchan_channel_id $1;
      nchan_subscriber_first_message newest;
    }}
    location ~ ^/pub/([A-Za-z0-9._~-]+)$ {{
      nchan_publisher http;
      nchan_channel_id $1;
    }}
  }}
}}
"#
    )
}

/// nginx with nchan, stopped on drop: the master is asked to stop (it takes its worker
/// with it), and whatever is left after 5 s, master or worker, is killed.
pub struct Nginx {
    pub server: Server,
    bin: PathBuf,
    dir: PathBuf,
}

impl Nginx {
    /// The worker process: it holds the connections and does the work, so its pid is
    /// the one to measure.
    pub fn worker_pid(&self) -> u32 {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(&pid) = children_of(self.server.pid()).first() {
                return pid;
            }
            assert!(Instant::now() < until, "nginx started no worker process");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn args(&self) -> Vec<std::ffi::OsString> {
        nginx_args(&self.dir)
    }
}

fn nginx_args(dir: &Path) -> Vec<std::ffi::OsString> {
    let d = dir.display();
    vec![
        "-e".into(),
        format!("{d}/error.log").into(),
        "-p".into(),
        dir.as_os_str().to_owned(),
        "-c".into(),
        format!("{d}/nginx.conf").into(),
        "-g".into(),
        format!("daemon off; pid {d}/nginx.pid;").into(),
    ]
}

/// Processes whose parent is `pid`, from /proc.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|st| {
                    // "pid (comm) state ppid …": comm may hold spaces, so split after ')'.
                    let rest = &st[st.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let master = self.server.pid();
        let workers = children_of(master);
        let _ = Command::new(&self.bin)
            .args(self.args())
            .args(["-s", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.server.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // `Server`'s own drop kills and reaps the master; a worker outliving it is
        // killed here, if that pid is still an nginx process.
        let _ = self.server.child.kill();
        let _ = self.server.child.wait();
        for w in workers {
            let is_nginx = std::fs::read_to_string(format!("/proc/{w}/comm"))
                .is_ok_and(|c| c.trim() == "nginx");
            if is_nginx {
                let _ = Command::new("kill")
                    .args(["-KILL", &w.to_string()])
                    .status();
            }
        }
    }
}

/// nginx with the nchan module on a free port, configured by [`nchan_conf`] in `dir`;
/// returns the server and the subscriber location (`ws://127.0.0.1:PORT/sub`). Fails
/// the test, saying what to install, when nginx or the module is missing.
pub fn start_nchan(dir: &TempDir) -> (Nginx, String) {
    let bin = require_binary("nginx", "nginx-light libnginx-mod-nchan");
    assert!(
        Path::new(NCHAN_MODULE).is_file(),
        "the nchan module ({NCHAN_MODULE}) is not installed, so this comparison test cannot \
         run. Install it with: apt-get install -y libnginx-mod-nchan"
    );
    let port = free_port();
    std::fs::write(dir.path().join("nginx.conf"), nchan_conf(dir.path(), port))
        .expect("write nginx.conf");
    let args = nginx_args(dir.path());
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("create stderr.log");
    let child = Command::new(&bin)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start nginx");
    let mut nginx = Nginx {
        server: Server {
            child,
            name: "nginx",
        },
        bin,
        dir: dir.path().to_path_buf(),
    };
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = nginx.server.child.try_wait() {
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            panic!("nginx exited early with {status}:\n{stderr}\n{log}");
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        assert!(
            Instant::now() < until,
            "nginx did not listen on 127.0.0.1:{port} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (nginx, format!("ws://127.0.0.1:{port}/sub"))
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
