//! The NATS engine against the real nats-server on 127.0.0.1:4222 (JetStream on).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use herald_core::engine::{ControlCommand, Engine, HistoryQuery, PublishOptions, StreamPosition};
use herald_core::hub::BrokerHandler;
use herald_nats::{NatsConfig, NatsEngine};
use herald_protocol::client::{ClientInfo, Publication};
use tokio::sync::mpsc;

#[derive(Debug)]
enum Event {
    Publication(String, u64, String),
    JoinLeave(String, bool),
    Insufficient,
    Control,
}

struct Handler(mpsc::UnboundedSender<Event>);

impl BrokerHandler for Handler {
    fn on_publication(&self, channel: &str, p: Publication) {
        let _ = self.0.send(Event::Publication(
            channel.into(),
            p.offset,
            p.data.get().to_string(),
        ));
    }
    fn on_join_leave(&self, _channel: &str, info: &ClientInfo, join: bool) {
        let _ = self.0.send(Event::JoinLeave(info.client.clone(), join));
    }
    fn on_control(&self, _cmd: ControlCommand) {
        let _ = self.0.send(Event::Control);
    }
    fn on_insufficient_state(&self, _channel: &str) {
        let _ = self.0.send(Event::Insufficient);
    }
    fn local_channels(&self) -> Vec<(String, u32)> {
        Vec::new()
    }
}

fn require_nats() {
    if std::net::TcpStream::connect("127.0.0.1:4222").is_err() {
        panic!("these tests need nats-server with JetStream on 127.0.0.1:4222 (nats-server -js)");
    }
}

async fn engine(prefix: &str) -> (NatsEngine, mpsc::UnboundedReceiver<Event>) {
    require_nats();
    let (tx, rx) = mpsc::unbounded_channel();
    let cfg = NatsConfig {
        prefix: prefix.into(),
        ..Default::default()
    };
    let e = NatsEngine::connect(cfg, herald_core::node::new_id(), Arc::new(Handler(tx)))
        .await
        .expect("connect");
    (e, rx)
}

/// Drops the streams a test created, so runs leave nothing behind on the shared server.
async fn cleanup(prefix: &str) {
    let client = async_nats::connect("127.0.0.1:4222")
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    for s in ["history", "presence"] {
        let _ = js.delete_stream(format!("{prefix}_{s}")).await;
    }
}

fn unique(name: &str) -> String {
    format!("t{}_{name}", herald_core::node::new_id().replace('-', ""))
}

fn publication(data: &str) -> Publication {
    Publication {
        data: herald_protocol::json::raw_from_str(data).expect("json"),
        info: None,
        offset: 0,
        tags: BTreeMap::new(),
        time: 0,
        binary: false,
        delta: false,
    }
}

fn query() -> HistoryQuery {
    HistoryQuery {
        meta_ttl: Duration::from_secs(600),
        ..Default::default()
    }
}

fn opts(size: usize) -> PublishOptions {
    PublishOptions {
        history_size: size,
        history_ttl: Duration::from_secs(60),
        history_meta_ttl: Duration::from_secs(600),
        idempotency_key: None,
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("event in time")
        .expect("open")
}

#[tokio::test]
async fn offsets_history_live_and_idempotency() {
    let prefix = unique("a");
    let (a, mut rx_a) = engine(&prefix).await;
    let (b, _rx_b) = engine(&prefix).await;
    let ch = "news.x y*>";
    a.subscribe(ch).await.expect("subscribe");
    // Position before anything is published is shared by both nodes.
    let pa = a.history(ch, query()).await.expect("history");
    let pb = b.history(ch, query()).await.expect("history");
    assert_eq!(pa.position, pb.position);
    assert_eq!(pa.position.offset, 0);
    let epoch = pa.position.epoch.clone();
    for i in 1..=5u64 {
        let p = b
            .publish(ch, publication(&i.to_string()), &opts(3))
            .await
            .expect("publish");
        assert_eq!(
            p,
            StreamPosition {
                offset: i,
                epoch: epoch.clone()
            }
        );
    }
    for i in 1..=5u64 {
        match next(&mut rx_a).await {
            Event::Publication(c, off, data) => {
                assert_eq!((c.as_str(), off, data), (ch, i, i.to_string()));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // history_size 3: only offsets 3..=5.
    let h = a.history(ch, query()).await.expect("history");
    let offs: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offs, vec![3, 4, 5]);
    assert_eq!(h.position.offset, 5);
    let h = a
        .history(
            ch,
            HistoryQuery {
                since: Some(StreamPosition {
                    offset: 3,
                    epoch: epoch.clone(),
                }),
                ..query()
            },
        )
        .await
        .expect("history");
    let offs: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offs, vec![4, 5]);
    let h = a
        .history(
            ch,
            HistoryQuery {
                limit: Some(2),
                reverse: true,
                ..query()
            },
        )
        .await
        .expect("history");
    let offs: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offs, vec![5, 4]);
    // A recovery that cannot be whole reads nothing: more missed than it may return, or
    // missed publications already beyond history_size (3: offsets 1 and 2 are gone).
    let recovery = |offset, within| HistoryQuery {
        since: Some(StreamPosition {
            offset,
            epoch: epoch.clone(),
        }),
        whole_within: Some(within),
        ..query()
    };
    let h = a.history(ch, recovery(3, 2)).await.expect("history");
    let offs: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offs, vec![4, 5], "2 missed, 2 allowed");
    let h = a.history(ch, recovery(2, 2)).await.expect("history");
    assert!(h.publications.is_empty(), "3 missed, 2 allowed");
    assert_eq!(h.position.offset, 5);
    let h = a.history(ch, recovery(1, 10)).await.expect("history");
    assert!(h.publications.is_empty(), "offset 2 is beyond history_size");
    // Idempotent publish: the second one returns the first one's position, delivers nothing.
    let mut o = opts(3);
    o.idempotency_key = Some("k1".into());
    let p1 = a.publish(ch, publication("6"), &o).await.expect("publish");
    let p2 = b.publish(ch, publication("6"), &o).await.expect("publish");
    assert_eq!(p1, p2);
    assert_eq!(p1.offset, 6);
    match next(&mut rx_a).await {
        Event::Publication(_, 6, _) => {}
        other => panic!("unexpected {other:?}"),
    }
    let p3 = a
        .publish(ch, publication("7"), &opts(3))
        .await
        .expect("publish");
    assert_eq!(p3.offset, 7);
    match next(&mut rx_a).await {
        Event::Publication(_, 7, _) => {}
        other => panic!("unexpected {other:?}"),
    }
    // Removing history keeps the position.
    a.remove_history(ch).await.expect("remove");
    let h = b.history(ch, query()).await.expect("history");
    assert!(h.publications.is_empty());
    assert_eq!(
        h.position,
        StreamPosition {
            offset: 7,
            epoch: epoch.clone()
        }
    );
    let p = b
        .publish(ch, publication("8"), &opts(3))
        .await
        .expect("publish");
    assert_eq!(p, StreamPosition { offset: 8, epoch });
    match next(&mut rx_a).await {
        Event::Publication(_, 8, _) => {}
        other => panic!("unexpected {other:?}"),
    }
    // Join/leave and publications without history go through the live feed too.
    b.publish_join_leave(
        ch,
        ClientInfo {
            client: "c1".into(),
            ..Default::default()
        },
        true,
    )
    .await
    .expect("join");
    match next(&mut rx_a).await {
        Event::JoinLeave(c, true) => assert_eq!(c, "c1"),
        other => panic!("unexpected {other:?}"),
    }
    let p = b
        .publish(ch, publication("9"), &opts(0))
        .await
        .expect("publish");
    assert_eq!(p.offset, 0);
    match next(&mut rx_a).await {
        Event::Publication(_, 0, d) => assert_eq!(d, "9"),
        other => panic!("unexpected {other:?}"),
    }
    // Unsubscribed: nothing more arrives; a control command does.
    a.unsubscribe(ch).await.expect("unsubscribe");
    b.publish(ch, publication("10"), &opts(3))
        .await
        .expect("publish");
    b.publish_control(ControlCommand::Unsubscribe {
        user: "u".into(),
        channel: ch.into(),
        client: String::new(),
        session: String::new(),
    })
    .await
    .expect("control");
    loop {
        match next(&mut rx_a).await {
            Event::Control => break,
            Event::Publication(_, off, _) => panic!("publication {off} after unsubscribe"),
            _ => {}
        }
    }
    cleanup(&prefix).await;
}

#[tokio::test]
async fn concurrent_publishers_get_distinct_offsets() {
    let prefix = unique("b");
    let (a, _ra) = engine(&prefix).await;
    let (b, _rb) = engine(&prefix).await;
    let ch = "race";
    let o = opts(1000);
    let fa = async {
        let mut v = Vec::new();
        for i in 0..50 {
            v.push(
                a.publish(ch, publication(&i.to_string()), &o)
                    .await
                    .expect("a")
                    .offset,
            );
        }
        v
    };
    let fb = async {
        let mut v = Vec::new();
        for i in 0..50 {
            v.push(
                b.publish(ch, publication(&i.to_string()), &o)
                    .await
                    .expect("b")
                    .offset,
            );
        }
        v
    };
    let (va, vb) = tokio::join!(fa, fb);
    let mut all: Vec<u64> = va.into_iter().chain(vb).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=100).collect::<Vec<u64>>());
    let h = a.history(ch, query()).await.expect("history");
    assert_eq!(h.publications.len(), 100);
    assert!(
        h.publications
            .windows(2)
            .all(|w| w[0].offset + 1 == w[1].offset)
    );
    cleanup(&prefix).await;
}

#[tokio::test]
async fn presence_across_nodes() {
    let prefix = unique("c");
    let (a, _ra) = engine(&prefix).await;
    let (b, _rb) = engine(&prefix).await;
    let ch = "room.1";
    let info = |c: &str| ClientInfo {
        user: "u".into(),
        client: c.into(),
        ..Default::default()
    };
    a.add_presence(ch, "c1", info("c1")).await.expect("add");
    b.add_presence(ch, "c2", info("c2")).await.expect("add");
    b.add_presence("other", "c3", info("c3"))
        .await
        .expect("add");
    let p = a.presence(ch).await.expect("presence");
    assert_eq!(p.keys().cloned().collect::<Vec<_>>(), vec!["c1", "c2"]);
    a.remove_presence(ch, "c1").await.expect("remove");
    let p = b.presence(ch).await.expect("presence");
    assert_eq!(p.keys().cloned().collect::<Vec<_>>(), vec!["c2"]);
    assert!(a.presence("empty").await.expect("presence").is_empty());
    assert!(a.healthy());
    cleanup(&prefix).await;
}
