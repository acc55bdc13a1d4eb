//! End-to-end runs of herald-bench against nats-server, mosquitto and nginx with nchan
//! started on free loopback ports. These servers are required: without them the tests
//! fail and say how to install them.

mod common;

use common::*;

#[test]
fn fanout_against_nats_sharded_over_two_processes() {
    let dir = TempDir::new("nats");
    let (server, url) = start_nats(&dir);
    let pid = server.pid().to_string();
    let plot = dir.path().join("fanout.png");
    let r = bench_json(
        &[
            "fanout",
            "--target",
            "nats",
            "--url",
            &url,
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
            "--plot",
            plot.to_str().unwrap(),
        ],
        &dir,
    );
    assert_clean_fanout(&r, 120);
    // 3 channels × 40 subscribers × 40 publications each (120 at 60/s for 2 s).
    assert_eq!(u(&r, "expected"), 120 * 40);
    assert!(r["server_rss_loaded_bytes"].as_u64().unwrap_or(0) > 0);
    assert!(std::fs::read(&plot).unwrap().starts_with(b"\x89PNG"));
    drop(server);
}

#[test]
fn fanout_against_mosquitto_from_many_source_addresses() {
    let dir = TempDir::new("mqtt");
    let (server, url) = start_mosquitto(&dir);
    let r = bench_json(
        &[
            "fanout",
            "--target",
            "mqtt",
            "--url",
            &url,
            "--subscribers",
            "100",
            "--channels",
            "2",
            "--publish-rate",
            "50",
            "--payload",
            "200",
            "--duration",
            "2",
            "--source-ips",
            "127.0.1.1-127.0.1.20",
        ],
        &dir,
    );
    assert_clean_fanout(&r, 100);
    drop(server);
}

#[test]
fn fanout_against_nchan_over_websocket_and_http_publisher() {
    let dir = TempDir::new("nchan");
    let (nginx, url) = start_nchan(&dir);
    let worker = nginx.worker_pid().to_string();
    let r = bench_json(
        &[
            "fanout",
            "--target",
            "nchan",
            "--url",
            &url,
            "--subscribers",
            "150",
            "--channels",
            "3",
            "--publish-rate",
            "60",
            "--payload",
            "128",
            "--duration",
            "2",
            "--server-pid",
            &worker,
        ],
        &dir,
    );
    assert_clean_fanout(&r, 150);
    // 3 channels × 50 subscribers × 40 publications each (120 at 60/s for 2 s).
    assert_eq!(u(&r, "expected"), 150 * 40, "{r}");
    assert_eq!(u(&r, "published"), 120, "{r}");
    assert_eq!(u(&r, "publish_errors"), 0, "{r}");
    assert_eq!(r["target"], "nchan", "{r}");
    assert!(r["protocol"].is_null(), "{r}");
    // Each frame is exactly one payload: no framing of nchan's own.
    assert_eq!(u(&r, "bytes_received"), 150 * 40 * 128, "{r}");
    assert!(r["server_cpu_us_per_delivery"].as_f64().is_some(), "{r}");

    // A second run on the same channels: `nchan_subscriber_first_message newest`
    // means nothing from the first run is replayed to the new subscribers.
    let again = bench_json(
        &[
            "fanout",
            "--target",
            "nchan",
            "--url",
            &url,
            "--subscribers",
            "30",
            "--channels",
            "3",
            "--publish-rate",
            "30",
            "--duration",
            "1",
        ],
        &dir,
    );
    assert_clean_fanout(&again, 30);
    drop(nginx);
}

#[test]
fn nchan_refuses_herald_only_options() {
    let cases: [&[&str]; 4] = [
        &["--protocol", "protobuf"],
        &["--api-key", "k"],
        &["--token", "t"],
        &["--channel-prefix", "a/b"],
    ];
    for extra in cases {
        let mut args = vec![
            "fanout",
            "--target",
            "nchan",
            "--url",
            "ws://127.0.0.1:9/sub",
            "--duration",
            "1",
        ];
        args.extend_from_slice(extra);
        let out = run_bench(&args, std::time::Duration::from_secs(20));
        assert!(!out.status.success(), "{extra:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        let expect = if extra[0] == "--channel-prefix" {
            "only ASCII letters"
        } else {
            "applies to --target herald only, not --target nchan"
        };
        assert!(err.contains(expect), "{extra:?}: {err}");
    }
}

#[test]
fn connect_against_nats_reports_server_memory() {
    let dir = TempDir::new("connect");
    let (server, url) = start_nats(&dir);
    let pid = server.pid().to_string();
    let r = bench_json(
        &[
            "connect",
            "--target",
            "nats",
            "--url",
            &url,
            "--connections",
            "300",
            "--rate",
            "1000",
            "--duration",
            "1",
            "--server-pid",
            &pid,
        ],
        &dir,
    );
    assert_eq!(u(&r, "established"), 300, "{r}");
    assert_eq!(u(&r, "failed"), 0, "{r}");
    assert!(r["connects_per_s"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(r["rss_per_connection_bytes"].as_f64().is_some(), "{r}");
    assert!(r["latency_ms"]["p99"].as_f64().unwrap_or(0.0) > 0.0);
    drop(server);
}

#[test]
fn refuses_targets_off_this_machine() {
    // Validation happens before any socket is opened.
    for url in ["ws://example.invalid:8000/", "ws://10.1.2.3:8000/"] {
        let out = run_bench(
            &[
                "fanout",
                "--target",
                "nats",
                "--url",
                url,
                "--duration",
                "1",
            ],
            std::time::Duration::from_secs(20),
        );
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("loopback"), "{err}");
    }
}
