//! The MQTT front end with Debian's mosquitto clients (`mosquitto_sub`, `mosquitto_pub`),
//! hand-written hostile packets, TLS, and two nodes of a Redis cluster. The paho-mqtt tests
//! (interop/python/test_mqtt.py) cover the rest of the protocol from a second client.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{
    Client, NATS, REDIS, Scrape, WAIT, api, nats_engine, publish, redis_engine, require_nats,
    require_redis, start_with, token,
};
use herald_server::Server;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// MQTT on, and a "dev" namespace where clients may subscribe and publish.
const MQTT: &str = "[[namespaces]]\nname = \"dev\"\nhistory_size = 100\nhistory_ttl = \"5m\"\n\
                    allow_subscribe_for_client = true\nallow_publish_for_client = true\npresence = true\n\
                    [mqtt]\nlisten = \"127.0.0.1:0\"\nmax_packet_size = 1024\n";

async fn node(extra: &str) -> Server {
    start_with(&common::config(&format!("{extra}{MQTT}"))).await
}

fn port(s: &Server) -> String {
    s.mqtt_addr.expect("mqtt listening").port().to_string()
}

fn channel(tag: &str) -> String {
    format!("dev:{tag}-{}", rand::random::<u32>())
}

/// A mosquitto client, or a clear failure when Debian's mosquitto-clients is missing.
fn mosquitto(bin: &str, server: &Server, user: &str, args: &[&str]) -> Command {
    if std::process::Command::new(bin)
        .arg("--help")
        .output()
        .is_err()
    {
        panic!(
            "{bin} not found: install Debian's mosquitto-clients (apt-get install mosquitto-clients)"
        );
    }
    // Line-buffered, so a test reads each line as it is printed.
    let mut c = Command::new("stdbuf");
    c.args([
        "-oL",
        bin,
        "-h",
        "127.0.0.1",
        "-p",
        &port(server),
        "-u",
        "device",
        "-P",
    ])
    .arg(token(user, 3600))
    .args(args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    c
}

/// A running `mosquitto_sub -d -v`: its output lines, read until what a test waits for.
struct Sub {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Sub {
    async fn start(server: &Server, user: &str, args: &[&str]) -> Sub {
        let mut sub = Sub::spawn(server, user, args);
        sub.line_starting("Subscribed").await;
        sub
    }

    fn spawn(server: &Server, user: &str, args: &[&str]) -> Sub {
        let mut all = vec!["-d", "-v"];
        all.extend_from_slice(args);
        let mut child = mosquitto("mosquitto_sub", server, user, &all)
            .spawn()
            .expect("mosquitto_sub starts");
        let stdout = child.stdout.take().expect("piped");
        Sub {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    async fn line_starting(&mut self, prefix: &str) -> String {
        let wait = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.lines.next_line().await.expect("read stdout") {
                if line.starts_with(prefix) {
                    return line;
                }
            }
            panic!("mosquitto_sub ended before a line starting with {prefix:?}");
        });
        wait.await
            .unwrap_or_else(|_| panic!("no line starting with {prefix:?} within {WAIT:?}"))
    }

    /// The payload of the next message on `topic` (`-v` prints "topic payload").
    async fn message(&mut self, topic: &str) -> String {
        let line = self.line_starting(&format!("{topic} ")).await;
        line[topic.len() + 1..].to_string()
    }
}

async fn pub_ok(server: &Server, user: &str, args: &[&str]) {
    let out = mosquitto("mosquitto_pub", server, user, args)
        .output()
        .await
        .expect("mosquitto_pub runs");
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn mosquitto_clients_publish_and_subscribe_at_qos_0_and_1() {
    let s = node("").await;
    let ch = channel("m");
    for (qos, version) in [("0", "mqttv311"), ("1", "mqttv5")] {
        let ch = format!("{ch}-{qos}");
        let mut sub = Sub::start(&s, "alice", &["-t", &ch, "-q", qos, "-V", version]).await;
        publish(&s, &ch, json!({"api": qos})).await.unwrap();
        let got: Value = serde_json::from_str(&sub.message(&ch).await).unwrap();
        assert_eq!(got, json!({"api": qos}));
        let body = format!("from mosquitto_pub {qos}");
        pub_ok(
            &s,
            "bob",
            &["-t", &ch, "-m", &body, "-q", qos, "-V", version],
        )
        .await;
        assert_eq!(sub.message(&ch).await, body);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn a_mosquitto_publication_reaches_a_websocket_client() {
    let s = node("").await;
    let ch = channel("x");
    let (mut c, _) = Client::connect(&s, "web").await.unwrap();
    c.call(1, "subscribe", json!({"channel": ch}))
        .await
        .unwrap();
    pub_ok(&s, "dev", &["-t", &ch, "-m", "{\"temp\":3}", "-q", "1"]).await;
    let p = c.publication(&ch).await.unwrap();
    assert_eq!(p["data"], json!({"temp": 3}));
    assert_eq!(p["info"]["user"], "dev");
    // Not JSON: base64 with `binary: true` for JSON clients.
    pub_ok(&s, "dev", &["-t", &ch, "-m", "plain text", "-q", "1"]).await;
    let p = c.publication(&ch).await.unwrap();
    assert_eq!(p["binary"], true);
    assert_eq!(p["data"], "cGxhaW4gdGV4dA==");
    s.shutdown().await;
}

#[tokio::test]
async fn mosquitto_persistent_session_recovers_what_it_missed() {
    let s = node("").await;
    let ch = channel("p");
    let id = format!("dev-{}", rand::random::<u32>());
    let args = ["-t", ch.as_str(), "-q", "1", "-c", "-i", id.as_str()];
    let mut sub = Sub::start(&s, "carol", &args).await;
    publish(&s, &ch, json!(0)).await.unwrap();
    assert_eq!(sub.message(&ch).await, "0");
    sub.child.kill().await.unwrap();
    for i in 1..=5 {
        publish(&s, &ch, json!(i)).await.unwrap();
    }
    // The kept subscription delivers what was missed right after CONNACK, before the
    // SUBACK of the subscribe mosquitto_sub sends again.
    let mut back = Sub::spawn(&s, "carol", &args);
    for i in 1..=5 {
        assert_eq!(back.message(&ch).await, i.to_string());
    }
    back.line_starting("Subscribed").await;
    publish(&s, &ch, json!(6)).await.unwrap();
    assert_eq!(back.message(&ch).await, "6", "once, not twice");
    back.child.kill().await.unwrap();
    let rest = tokio::time::timeout(WAIT, async {
        let mut rest = Vec::new();
        while let Ok(Some(l)) = back.lines.next_line().await {
            rest.push(l);
        }
        rest
    })
    .await
    .unwrap_or_default();
    assert!(
        !rest.iter().any(|l| l.starts_with(&format!("{ch} "))),
        "duplicates: {rest:?}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn mosquitto_refused_token_and_topic() {
    let s = node("").await;
    let mut c = mosquitto("mosquitto_sub", &s, "u", &["-t", "a", "-C", "1", "-W", "3"]);
    let out = c.arg("-P").arg("not-a-token").output().await.unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad user name or password"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A namespace that does not exist, a topic over client.channel_max_length: SUBACK
    // refuses them.
    let long = format!("dev:{}", "a".repeat(300));
    for topic in ["nons:x", long.as_str()] {
        let args = ["-t", topic, "-V", "mqttv5", "-W", "3"];
        let out = mosquitto("mosquitto_sub", &s, "u", &args)
            .output()
            .await
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("denied"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    s.shutdown().await;
}

#[tokio::test]
async fn will_of_a_killed_mosquitto_client_is_published() {
    let s = node("").await;
    let will = channel("will");
    let mut watcher = Sub::start(&s, "w", &["-t", &will, "-q", "1"]).await;
    let mut doomed = Sub::start(
        &s,
        "d",
        &[
            "-t",
            "other",
            "--will-topic",
            &will,
            "--will-payload",
            "{\"gone\":1}",
            "--will-qos",
            "1",
        ],
    )
    .await;
    doomed.child.kill().await.unwrap();
    assert_eq!(watcher.message(&will).await, "{\"gone\":1}");
    s.shutdown().await;
}

// ---- hand-written packets -------------------------------------------------------------------

fn remaining(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            return out;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![first];
    p.extend(remaining(body.len()));
    p.extend_from_slice(body);
    p
}

fn utf8(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

fn connect(level: u8, user: &str) -> Vec<u8> {
    connect_for(level, user, 3600)
}

fn connect_for(level: u8, user: &str, ttl: i64) -> Vec<u8> {
    let mut body = utf8(b"MQTT");
    body.extend([level, 0b1100_0010, 0, 30]);
    if level == 5 {
        body.push(0);
    }
    body.extend(utf8(format!("raw-{}", rand::random::<u32>()).as_bytes()));
    body.extend(utf8(b"device"));
    body.extend(utf8(token(user, ttl).as_bytes()));
    packet(0x10, &body)
}

async fn raw(s: &Server) -> TcpStream {
    TcpStream::connect(s.mqtt_addr.expect("mqtt"))
        .await
        .unwrap()
}

/// Reads until the server closes; everything it sent.
async fn until_closed(t: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let read = tokio::time::timeout(WAIT, t.read_to_end(&mut all)).await;
    assert!(read.is_ok(), "still open after {WAIT:?}; got {all:02x?}");
    all
}

async fn connected(s: &Server, level: u8) -> TcpStream {
    connected_as(s, level, "raw", 3600).await
}

async fn connected_as(s: &Server, level: u8, user: &str, ttl: i64) -> TcpStream {
    let mut t = raw(s).await;
    t.write_all(&connect_for(level, user, ttl)).await.unwrap();
    let mut head = [0u8; 4];
    tokio::time::timeout(WAIT, t.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (head[0], head[3]),
        (0x20, 0),
        "CONNACK accepted: {head:02x?}"
    );
    if level == 5 {
        let mut props = vec![0u8; usize::from(head[1]) - 2];
        t.read_exact(&mut props).await.unwrap();
    }
    t
}

#[tokio::test]
async fn hostile_packets_close_only_their_connection() {
    let s = node("").await;
    let ch = channel("calm");
    let mut bystander = Sub::start(&s, "calm", &["-t", &ch, "-q", "1"]).await;

    // Not CONNECT first; garbage; a length over four bytes; a connect cut short; an unknown
    // protocol level (answered with 3.1.1's return code 1).
    for bytes in [
        vec![0xc0, 0x00],
        vec![0xff; 64],
        vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01],
        connect(4, "x")[..9].to_vec(),
    ] {
        let mut t = raw(&s).await;
        t.write_all(&bytes).await.unwrap();
        if bytes.len() == 9 {
            // Half a packet: the connect timeout ends it, not a read error.
            t.shutdown().await.unwrap();
        }
        let got = until_closed(&mut t).await;
        assert!(
            got.is_empty() || got[0] == 0x20,
            "{bytes:02x?} -> {got:02x?}"
        );
    }
    let mut body = utf8(b"MQTT");
    body.extend([9, 0b0000_0010, 0, 30]);
    body.extend(utf8(b"v9"));
    let mut t = raw(&s).await;
    t.write_all(&packet(0x10, &body)).await.unwrap();
    assert_eq!(until_closed(&mut t).await, vec![0x20, 2, 0, 1]);

    // A publish over mqtt.max_packet_size (1024): MQTT 5 is told 0x95, 3.1.1 is closed.
    let mut t = connected(&s, 5).await;
    let mut big = utf8(ch.as_bytes());
    big.extend([0]);
    big.extend(vec![b'x'; 4096]);
    t.write_all(&packet(0x30, &big)).await.unwrap();
    let got = until_closed(&mut t).await;
    assert_eq!(&got[..1], &[0xe0], "DISCONNECT: {got:02x?}");
    assert_eq!(got[2], 0x95, "packet too large: {got:02x?}");
    let mut t = connected(&s, 4).await;
    t.write_all(&packet(0x30, &big[..big.len() - 1]))
        .await
        .unwrap();
    assert!(until_closed(&mut t).await.is_empty());

    // A second CONNECT, and a SUBSCRIBE with bad flags, are protocol errors.
    let mut t = connected(&s, 4).await;
    t.write_all(&connect(4, "again")).await.unwrap();
    until_closed(&mut t).await;
    let mut t = connected(&s, 5).await;
    t.write_all(&packet(0x80, &[0, 1, 0, 1, b'a', 0]))
        .await
        .unwrap();
    let got = until_closed(&mut t).await;
    assert_eq!(
        (got[0], got[2]),
        (0xe0, 0x81),
        "malformed packet: {got:02x?}"
    );

    // The bystander never noticed.
    publish(&s, &ch, json!("still here")).await.unwrap();
    assert_eq!(bystander.message(&ch).await, "\"still here\"");
    // Each refusal above is counted as a protocol error of the MQTT transport.
    let m = Scrape::take(s.addr).await.unwrap();
    let refused = m.get(
        "herald_protocol_error_disconnects_total",
        &[("transport", "mqtt"), ("code", "3501")],
    );
    assert_eq!(refused, 8.0, "MQTT protocol errors counted: {m:?}");
    s.shutdown().await;
}

/// Reads one packet: (first byte, body).
async fn read_packet(t: &mut TcpStream) -> (u8, Vec<u8>) {
    tokio::time::timeout(WAIT, async {
        let first = t.read_u8().await.unwrap();
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let b = t.read_u8().await.unwrap();
            len |= usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0; len];
        t.read_exact(&mut body).await.unwrap();
        (first, body)
    })
    .await
    .expect("a packet in time")
}

/// A QoS 1 MQTT 5 PUBLISH: (packet id, DUP flag, payload).
fn qos1_publish((first, body): (u8, Vec<u8>)) -> (u16, bool, Vec<u8>) {
    assert_eq!(first & 0xf6, 0x32, "QoS 1 PUBLISH: {first:02x}");
    let topic = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let at = 2 + topic;
    let id = u16::from_be_bytes([body[at], body[at + 1]]);
    // Properties length (one byte here: none are sent), then the payload.
    (id, first & 0x08 != 0, body[at + 3..].to_vec())
}

/// An MQTT 5 CONNECT that keeps its session (expiry 600 s) and takes 2 QoS 1 deliveries
/// unacknowledged (Receive Maximum 2).
fn connect_window(client: &str) -> Vec<u8> {
    let mut body = utf8(b"MQTT");
    body.extend([5, 0b1100_0000, 0, 30]);
    body.extend([8, 0x11, 0, 0, 2, 0x58, 0x21, 0, 2]);
    body.extend(utf8(client.as_bytes()));
    body.extend(utf8(b"device"));
    body.extend(utf8(token("win", 3600).as_bytes()));
    packet(0x10, &body)
}

#[tokio::test]
async fn qos1_window_and_redelivery_with_dup_after_a_reconnect() {
    let s = node("").await;
    let ch = channel("win");
    let client = format!("win-{}", rand::random::<u32>());
    let mut t = raw(&s).await;
    t.write_all(&connect_window(&client)).await.unwrap();
    let (first, body) = read_packet(&mut t).await;
    assert_eq!(
        (first, body[0], body[1]),
        (0x20, 0, 0),
        "CONNACK, no session yet"
    );
    let mut sub = vec![0, 1, 0];
    sub.extend(utf8(ch.as_bytes()));
    sub.push(1);
    t.write_all(&packet(0x82, &sub)).await.unwrap();
    assert_eq!(read_packet(&mut t).await.0, 0x90, "SUBACK");
    for i in 1..=5 {
        publish(&s, &ch, json!(i)).await.unwrap();
    }
    let (a, dup_a, pa) = qos1_publish(read_packet(&mut t).await);
    let (_, _, pb) = qos1_publish(read_packet(&mut t).await);
    assert_eq!(
        (pa.as_slice(), pb.as_slice(), dup_a),
        (&b"1"[..], &b"2"[..], false)
    );
    // The window is full: the third waits until one is acknowledged.
    let mut one = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), t.read(&mut one)).await;
    assert!(early.is_err(), "a third delivery past Receive Maximum 2");
    t.write_all(&packet(0x40, &a.to_be_bytes())).await.unwrap();
    let (_, _, pc) = qos1_publish(read_packet(&mut t).await);
    assert_eq!(pc, b"3");
    // Gone with 2 and 3 unacknowledged, 4 and 5 never sent.
    drop(t);
    let mut t = raw(&s).await;
    t.write_all(&connect_window(&client)).await.unwrap();
    let (first, body) = read_packet(&mut t).await;
    assert_eq!(
        (first, body[0], body[1]),
        (0x20, 1, 0),
        "CONNACK, session present"
    );
    let mut got = Vec::new();
    for _ in 0..4 {
        let (id, dup, payload) = qos1_publish(read_packet(&mut t).await);
        t.write_all(&packet(0x40, &id.to_be_bytes())).await.unwrap();
        got.push((String::from_utf8(payload).unwrap(), dup));
    }
    let want: Vec<(String, bool)> = [("2", true), ("3", true), ("4", false), ("5", false)]
        .map(|(p, d)| (p.into(), d))
        .into();
    assert_eq!(
        got, want,
        "unacknowledged again with DUP, then the rest, in order"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn a_publish_flood_is_refused_then_disconnected() {
    let s = node("command_rate = 1\ncommand_burst = 3\n").await;
    let ch = channel("flood");
    let mut t = connected(&s, 5).await;
    let mut flood = Vec::new();
    for id in 1..=10u16 {
        let mut body = utf8(ch.as_bytes());
        body.extend(id.to_be_bytes());
        body.extend([0, b'1']);
        flood.extend(packet(0x32, &body));
    }
    t.write_all(&flood).await.unwrap();
    let mut reasons = Vec::new();
    loop {
        let (first, body) = read_packet(&mut t).await;
        match first {
            // PUBACK: a reason byte when it is not success.
            0x40 => reasons.push(body.get(2).copied().unwrap_or(0)),
            0xe0 => {
                assert_eq!(body[0], 0x96, "DISCONNECT message rate too high");
                break;
            }
            other => panic!("unexpected packet {other:02x}"),
        }
    }
    // The connect took one of the 3; two publishes pass, the next are refused with
    // "quota exceeded" until the refusals are a burst long.
    assert_eq!(reasons[..2], [0, 0], "{reasons:02x?}");
    assert!(reasons[2..].iter().all(|&r| r == 0x97), "{reasons:02x?}");
    assert!(!reasons[2..].is_empty(), "{reasons:02x?}");
    let m = Scrape::take(s.addr).await.unwrap();
    assert_eq!(
        m.get(
            "herald_protocol_error_disconnects_total",
            &[("transport", "mqtt"), ("code", "3013")],
        ),
        1.0,
        "the flood's disconnect is counted: {m:?}"
    );
    s.shutdown().await;
}

/// A QoS 2 PUBLISH (3.1.1 layout, or MQTT 5 with no properties) of `payload` to `topic`.
fn qos2_publish(level: u8, topic: &str, id: u16, dup: bool, payload: &[u8]) -> Vec<u8> {
    let mut body = utf8(topic.as_bytes());
    body.extend(id.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(if dup { 0x3c } else { 0x34 }, &body)
}

/// How many publications the channel's history holds.
async fn history_len(s: &Server, ch: &str) -> usize {
    let h = api(s, "history", json!({"channel": ch, "limit": 100}))
        .await
        .unwrap();
    h["result"]["publications"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn a_qos2_retransmission_before_pubrel_is_published_once() {
    let s = node("").await;
    let ch = channel("twice");
    let mut t = connected(&s, 4).await;
    t.write_all(&qos2_publish(4, &ch, 7, false, b"\"once\""))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut t).await, (0x50, vec![0, 7]), "PUBREC");
    // The device did not see the PUBREC and sends it again, marked DUP.
    t.write_all(&qos2_publish(4, &ch, 7, true, b"\"once\""))
        .await
        .unwrap();
    assert_eq!(
        read_packet(&mut t).await,
        (0x50, vec![0, 7]),
        "PUBREC again"
    );
    t.write_all(&packet(0x62, &[0, 7])).await.unwrap();
    assert_eq!(read_packet(&mut t).await, (0x70, vec![0, 7]), "PUBCOMP");
    assert_eq!(history_len(&s, &ch).await, 1, "published once");
    // After PUBREL the packet id is free: the same id is a new publication.
    t.write_all(&qos2_publish(4, &ch, 7, false, b"\"again\""))
        .await
        .unwrap();
    assert_eq!(read_packet(&mut t).await, (0x50, vec![0, 7]), "PUBREC");
    assert_eq!(history_len(&s, &ch).await, 2, "a new publication");
    s.shutdown().await;
}

#[tokio::test]
async fn qos2_from_an_mqtt5_device_is_refused_with_0x9b() {
    let s = node("").await;
    let ch = channel("qos2");
    let mut t = connected(&s, 5).await;
    t.write_all(&qos2_publish(5, &ch, 1, false, b"1"))
        .await
        .unwrap();
    assert_eq!(disconnect_reason(&mut t).await, 0x9b, "QoS not supported");
    assert_eq!(history_len(&s, &ch).await, 0, "nothing published");
    s.shutdown().await;
}

#[tokio::test]
async fn a_draining_node_refuses_new_devices_and_sends_its_own_away() {
    let toml = common::config(MQTT).replace("drain_duration = \"0s\"", "drain_duration = \"2s\"");
    let s = start_with(&toml).await;
    let mut held = connected(&s, 5).await;
    api(&s, "drain", json!({})).await.unwrap();
    // A new device is refused, or closed before any CONNACK.
    if let Ok(mut late) = TcpStream::connect(s.mqtt_addr.expect("mqtt")).await {
        let _ = late.write_all(&connect(5, "late")).await;
        let got = until_closed(&mut late).await;
        assert!(got.is_empty(), "no CONNACK while draining: {got:02x?}");
    }
    // The one connected is told the server is going away (3001).
    assert_eq!(disconnect_reason(&mut held).await, 0x8b);
    tokio::time::timeout(Duration::from_secs(10), s.stopped())
        .await
        .expect("the node stops after draining");
}

/// The reason of the DISCONNECT a closed MQTT 5 connection last got.
async fn disconnect_reason(t: &mut TcpStream) -> u8 {
    let got = until_closed(t).await;
    assert_eq!(got.first(), Some(&0xe0), "DISCONNECT: {got:02x?}");
    got[2]
}

#[tokio::test]
async fn server_side_disconnects_carry_mqtt5_reasons() {
    let s = node("expired_close_delay = \"0s\"\n").await;
    // The server API disconnects a user: administrative action.
    let mut t = connected_as(&s, 5, "kicked", 3600).await;
    api(&s, "disconnect", json!({"user": "kicked"}))
        .await
        .unwrap();
    assert_eq!(disconnect_reason(&mut t).await, 0x98);
    // The token expires: maximum connect time.
    let mut t = connected_as(&s, 5, "brief", 1).await;
    assert_eq!(disconnect_reason(&mut t).await, 0xa0);
    // A silent device past 1.5 times its keep-alive is covered by the paho tests; the node
    // shutting down: server shutting down.
    let mut t = connected(&s, 5).await;
    s.shutdown().await;
    assert_eq!(disconnect_reason(&mut t).await, 0x8b);
}

#[tokio::test]
async fn mqtt_clients_show_in_presence_and_on_the_admin_page() {
    let toml = common::config(MQTT).replacen(
        "[shutdown]",
        "[admin]\npassword = \"correct horse\"\n[shutdown]",
        1,
    );
    let s = start_with(&toml).await;
    let ch = channel("here");
    let _sub = Sub::start(&s, "present", &["-t", &ch]).await;
    let p = api(&s, "presence", json!({"channel": ch})).await.unwrap();
    let users: Vec<&str> = p["result"]["presence"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|c| c["user"].as_str())
        .collect();
    assert_eq!(users, ["present"]);
    // The admin page counts the device like any client, and lists its channel.
    let stats = common::admin_stats(s.addr, "correct horse").await.unwrap();
    assert_eq!(
        (&stats["clients"], &stats["subscriptions"]),
        (&json!(1), &json!(1)),
        "{stats}"
    );
    assert_eq!(stats["top_channels"][0]["channel"], json!(ch), "{stats}");
    s.shutdown().await;
}

#[tokio::test]
async fn mqtt_over_tls() {
    let dir = std::env::temp_dir().join(format!("herald-mqtt-tls-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let toml = common::config(&format!("{MQTT}tls = true\n"));
    let toml = toml.replacen(
        "[server]\n",
        &format!("[server]\ntls_cert = {cert_path:?}\ntls_key = {key_path:?}\n"),
        1,
    );
    let s = start_with(&toml).await;
    let ch = channel("tls");
    // The first certificate, kept apart: the files are replaced below.
    let ca_path = dir.join("ca1.pem");
    std::fs::write(&ca_path, cert.cert.pem()).unwrap();
    let ca = ca_path.to_string_lossy().to_string();
    let mut sub = Sub::start(&s, "t", &["-t", &ch, "--cafile", &ca]).await;
    pub_ok(
        &s,
        "p",
        &["-t", &ch, "-m", "{\"over\":\"tls\"}", "--cafile", &ca],
    )
    .await;
    assert_eq!(sub.message(&ch).await, "{\"over\":\"tls\"}");
    // Plain MQTT is not spoken on a TLS listener.
    let mut t = raw(&s).await;
    t.write_all(&connect(4, "plain")).await.unwrap();
    let got = until_closed(&mut t).await;
    assert!(got.first() != Some(&0x20), "a plain CONNECT got {got:02x?}");

    // Renewal: the MQTT listener serves new files without a restart, like the client
    // listener, and the open subscriber stays.
    let renewed =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let ca2_path = dir.join("ca2.pem");
    std::fs::write(&ca2_path, renewed.cert.pem()).unwrap();
    std::fs::write(&key_path, renewed.signing_key.serialize_pem()).unwrap();
    std::fs::write(&cert_path, renewed.cert.pem()).unwrap();
    let ca2 = ca2_path.to_string_lossy().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let args = ["-t", &ch, "-m", "\"renewed\"", "--cafile", &ca2];
        let out = mosquitto("mosquitto_pub", &s, "p", &args)
            .output()
            .await
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the MQTT listener never served the renewed certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(sub.message(&ch).await, "\"renewed\"");
    let old = mosquitto(
        "mosquitto_pub",
        &s,
        "p",
        &["-t", &ch, "-m", "1", "--cafile", &ca],
    )
    .output()
    .await
    .unwrap();
    assert!(
        !old.status.success(),
        "the old certificate is no longer served"
    );
    s.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn mqtt_devices_on_two_nodes_of_a_redis_cluster() {
    require_redis(REDIS).await;
    let prefix = format!("mqtt{}", rand::random::<u32>());
    let a = node(&redis_engine(&prefix, REDIS)).await;
    let b = node(&redis_engine(&prefix, REDIS)).await;
    let ch = channel("c");
    let mut on_b = Sub::start(&b, "b", &["-t", &ch, "-q", "1"]).await;
    let mut on_a = Sub::start(&a, "a", &["-t", &ch, "-q", "1"]).await;
    // API on one node, device on the other.
    publish(&a, &ch, json!({"via": "api on a"})).await.unwrap();
    assert_eq!(on_b.message(&ch).await, "{\"via\":\"api on a\"}");
    assert_eq!(on_a.message(&ch).await, "{\"via\":\"api on a\"}");
    // A device on b publishes; the device on a and a WebSocket client on a receive it.
    let (mut web, _) = Client::connect(&a, "web").await.unwrap();
    web.call(1, "subscribe", json!({"channel": ch}))
        .await
        .unwrap();
    pub_ok(
        &b,
        "dev",
        &["-t", &ch, "-m", "{\"via\":\"device on b\"}", "-q", "1"],
    )
    .await;
    assert_eq!(on_a.message(&ch).await, "{\"via\":\"device on b\"}");
    assert_eq!(
        web.publication(&ch).await.unwrap()["data"],
        json!({"via": "device on b"})
    );
    let info = api(&a, "info", json!({})).await.unwrap();
    assert_eq!(info["result"]["nodes"].as_array().map(Vec::len), Some(2));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn mqtt_is_off_until_listen_is_set() {
    let s = start_with(&common::config("")).await;
    assert!(s.mqtt_addr.is_none());
    let (status, _) = common::http(&s, "GET", "/mqtt", None, "").await.unwrap();
    assert_eq!(status, 404);
    s.shutdown().await;
    for (bad, key) in [
        ("[mqtt]\nlisten = \"nowhere\"\n", "mqtt.listen"),
        ("[mqtt]\nmax_packet_size = 10\n", "mqtt.max_packet_size"),
        ("[mqtt]\nmax_inflight = 0\n", "mqtt.max_inflight"),
        (
            "[mqtt]\nsession_save_interval = \"0s\"\n",
            "mqtt.session_save_interval",
        ),
        ("[mqtt]\ntls = true\n", "mqtt.tls"),
        ("[mqtt]\nlisten_on = \"x\"\n", "mqtt"),
    ] {
        let e = herald_server::Config::from_toml(&common::config(bad)).unwrap_err();
        assert!(e.to_string().contains(key), "{bad}: {e}");
    }
}

// ---- persistent sessions across the nodes of a cluster -------------------------------------

/// Two nodes on `engine`: `a` saves sessions only when a device leaves ("1h" between saves),
/// `b` every 100 ms while a device is connected.
async fn session_nodes(engine: &str) -> (Server, Server) {
    let node = |every: &str| {
        common::config(&format!(
            "{engine}{MQTT}session_save_interval = \"{every}\"\n"
        ))
    };
    (
        start_with(&node("1h")).await,
        start_with(&node("100ms")).await,
    )
}

/// Connects `client` with a kept session (MQTT 5, expiry 600 s) to `s`: the connection, and
/// whether the CONNACK said the session was present.
async fn resume(s: &Server, client: &str) -> (TcpStream, bool) {
    let mut t = raw(s).await;
    t.write_all(&connect_window(client)).await.unwrap();
    let (first, body) = read_packet(&mut t).await;
    assert_eq!((first, body[1]), (0x20, 0), "CONNACK accepted: {body:02x?}");
    (t, body[0] == 1)
}

async fn subscribe_qos1(t: &mut TcpStream, ch: &str) {
    let mut sub = vec![0, 1, 0];
    sub.extend(utf8(ch.as_bytes()));
    sub.push(1);
    t.write_all(&packet(0x82, &sub)).await.unwrap();
    assert_eq!(read_packet(t).await.0, 0x90, "SUBACK");
}

/// The payloads of the next `n` QoS 1 deliveries, each acknowledged.
async fn take_acked(t: &mut TcpStream, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    for _ in 0..n {
        let (id, _, payload) = qos1_publish(read_packet(t).await);
        t.write_all(&packet(0x40, &id.to_be_bytes())).await.unwrap();
        got.push(String::from_utf8(payload).unwrap());
    }
    got
}

async fn nothing_more(t: &mut TcpStream) {
    let mut one = [0u8; 1];
    let more = tokio::time::timeout(Duration::from_millis(300), t.read(&mut one)).await;
    assert!(more.is_err(), "a delivery more than expected");
}

/// A device leaves node a with its session kept, publications go on, and it comes back
/// through node b: b finds the session a saved and the device gets what it missed, once.
async fn a_session_left_on_one_node_resumes_on_another(engine: &str) {
    let (a, b) = session_nodes(engine).await;
    let ch = channel("moves");
    let client = format!("moving-{}", rand::random::<u32>());
    let (mut t, present) = resume(&a, &client).await;
    assert!(!present, "a new session");
    subscribe_qos1(&mut t, &ch).await;
    publish(&a, &ch, json!(1)).await.unwrap();
    assert_eq!(take_acked(&mut t, 1).await, ["1"]);
    // MQTT 5 DISCONNECT, session kept: node a saves it before it closes the connection.
    t.write_all(&[0xe0, 0]).await.unwrap();
    until_closed(&mut t).await;
    publish(&b, &ch, json!(2)).await.unwrap();
    publish(&a, &ch, json!(3)).await.unwrap();
    let (mut t, present) = resume(&b, &client).await;
    assert!(present, "the session node a kept is present on node b");
    assert_eq!(take_acked(&mut t, 2).await, ["2", "3"]);
    nothing_more(&mut t).await;
    // A clean start ends it on every node.
    t.write_all(&[0xe0, 0]).await.unwrap();
    until_closed(&mut t).await;
    let mut clean = raw(&a).await;
    let mut body = utf8(b"MQTT");
    body.extend([5, 0b1100_0010, 0, 30, 0]);
    body.extend(utf8(client.as_bytes()));
    body.extend(utf8(b"device"));
    body.extend(utf8(token("win", 3600).as_bytes()));
    clean.write_all(&packet(0x10, &body)).await.unwrap();
    let (first, ack) = read_packet(&mut clean).await;
    assert_eq!((first, ack[0], ack[1]), (0x20, 0, 0), "clean start");
    clean.write_all(&[0xe0, 0]).await.unwrap();
    until_closed(&mut clean).await;
    let (_t, present) = resume(&b, &client).await;
    assert!(!present, "no session after a clean start");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_session_left_on_one_node_resumes_on_another_redis() {
    require_redis(REDIS).await;
    let prefix = format!("mqtt{}", rand::random::<u32>());
    a_session_left_on_one_node_resumes_on_another(&redis_engine(&prefix, REDIS)).await;
}

#[tokio::test]
async fn a_session_left_on_one_node_resumes_on_another_nats() {
    require_nats(NATS).await;
    let prefix = format!("mqtt{}", rand::random::<u32>());
    a_session_left_on_one_node_resumes_on_another(&nats_engine(&prefix, NATS)).await;
    common::delete_nats_streams(NATS, &prefix);
}

/// The value Redis holds at `key` (a plain RESP GET), or None.
async fn redis_get(key: &str) -> Option<String> {
    let mut t = TcpStream::connect(REDIS.trim_start_matches("redis://"))
        .await
        .ok()?;
    let cmd = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    t.write_all(cmd.as_bytes()).await.ok()?;
    let mut r = BufReader::new(t);
    let mut head = String::new();
    r.read_line(&mut head).await.ok()?;
    // "$-1" (no value) does not parse as a length.
    let len: usize = head.trim_end().strip_prefix('$')?.parse().ok()?;
    let mut body = vec![0; len + 2];
    r.read_exact(&mut body).await.ok()?;
    body.truncate(len);
    String::from_utf8(body).ok()
}

/// The device's node stops answering it (gone from its side: the node never saw it leave).
/// The device comes back through another node, which resumes the session from the last
/// periodic save: nothing it acknowledged comes again, nothing published since is missing.
#[tokio::test]
async fn a_device_cut_off_from_its_node_resumes_from_the_last_save() {
    require_redis(REDIS).await;
    let prefix = format!("mqtt{}", rand::random::<u32>());
    let (a, b) = session_nodes(&redis_engine(&prefix, REDIS)).await;
    let ch = channel("cut");
    let client = format!("cut-{}", rand::random::<u32>());
    let (mut held, _) = resume(&b, &client).await;
    subscribe_qos1(&mut held, &ch).await;
    publish(&b, &ch, json!(1)).await.unwrap();
    assert_eq!(take_acked(&mut held, 1).await, ["1"]);
    let key = format!("{prefix}.state.mqtt.session.{client}");
    common::eventually("node b saves the acknowledged position", || async {
        redis_get(&key)
            .await
            .is_some_and(|v| v.contains(&format!("\"{ch}\"")) && v.contains("\"offset\":1"))
    })
    .await;
    publish(&a, &ch, json!(2)).await.unwrap();
    publish(&a, &ch, json!(3)).await.unwrap();
    // `held` stays open on b: the device just cannot reach it any more.
    let (mut t, present) = resume(&a, &client).await;
    assert!(present, "node a resumes what node b saved");
    assert_eq!(take_acked(&mut t, 2).await, ["2", "3"]);
    nothing_more(&mut t).await;
    drop(held);
    a.shutdown().await;
    b.shutdown().await;
}
