//! Hostile and excessive input: bad frames, oversized messages, slow consumers, limits.
//! The server answers with the documented code and other clients are unaffected.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn malformed_json_is_3501() {
    let s = start("").await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    c.send_text("{\"id\":2,\"subscribe\":".into())
        .await
        .unwrap();
    assert_eq!(c.closed().await.unwrap().0, 3501);
    // Invalid UTF-8 in a binary frame, and a first command that is not connect.
    let mut c = Client::open(&s).await.unwrap();
    c.send_raw(Message::binary(vec![0xff, 0xfe, 0x00]))
        .await
        .unwrap();
    assert_eq!(c.closed().await.unwrap().0, 3501);
    let mut c = Client::open(&s).await.unwrap();
    c.send(json!({"id":1,"subscribe":{"channel":"a"}}))
        .await
        .unwrap();
    assert_eq!(c.closed().await.unwrap().0, 3501);
    s.shutdown().await;
}

#[tokio::test]
async fn oversized_message_closes_with_1009() {
    let s = start("max_message_size = 1024").await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    let big = format!(
        "{{\"id\":2,\"publish\":{{\"channel\":\"a\",\"data\":\"{}\"}}}}",
        "x".repeat(4096)
    );
    c.send_text(big).await.unwrap();
    assert_eq!(c.closed().await.unwrap().0, 1009);
    s.shutdown().await;
}

#[tokio::test]
async fn channel_limit_is_106() {
    let s = start("max_channels = 2").await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    c.call(2, "subscribe", json!({"channel":"a"}))
        .await
        .unwrap();
    c.call(3, "subscribe", json!({"channel":"b"}))
        .await
        .unwrap();
    let r = c
        .call(4, "subscribe", json!({"channel":"c"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 106);
    s.shutdown().await;
}

#[tokio::test]
async fn no_connect_in_time_is_closed() {
    let s = start("connect_timeout = \"1s\"").await;
    let mut c = Client::open(&s).await.unwrap();
    assert_eq!(c.closed().await.unwrap().0, 3502);
    s.shutdown().await;
}

/// A client that stops reading is disconnected once its queue passes max_queue_bytes;
/// a reading client on the same channel receives everything.
#[tokio::test]
async fn slow_consumer_is_dropped_others_unaffected() {
    let s = start("max_queue_bytes = 65536").await;
    let (mut slow, _) = Client::connect(&s, "slow").await.unwrap();
    slow.call(2, "subscribe", json!({"channel":"firehose"}))
        .await
        .unwrap();
    let (mut good, _) = Client::connect(&s, "good").await.unwrap();
    good.call(2, "subscribe", json!({"channel":"firehose"}))
        .await
        .unwrap();
    let payload = "y".repeat(16 * 1024);
    let n = 600; // ~10 MB: more than the socket buffers can hold for the slow reader.
    let server = std::sync::Arc::new(s);
    let p = server.clone();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            publish(&p, "firehose", json!({"i": i, "p": payload}))
                .await
                .unwrap();
        }
    });
    for i in 0..n {
        let pb = good.publication("firehose").await.unwrap();
        assert_eq!(pb["data"]["i"], i);
    }
    publisher.await.unwrap();
    // The slow one was cut off: it never gets all n publications.
    let mut got = 0;
    let end = loop {
        match slow.next().await {
            Ok(v) if v["push"].get("pub").is_some() => got += 1,
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
    };
    assert!(
        got < n,
        "slow consumer got everything ({got}); it was not cut off: {end}"
    );
    let info = api(&server, "info", json!({})).await.unwrap();
    assert_eq!(info["result"]["nodes"][0]["num_clients"], 1);
}

#[tokio::test]
async fn many_commands_in_one_frame_and_deep_json() {
    let s = start("max_message_size = 1048576").await;
    let (mut victim, _) = Client::connect(&s, "victim").await.unwrap();
    victim
        .call(2, "subscribe", json!({"channel":"calm"}))
        .await
        .unwrap();
    let (mut c, _) = Client::connect(&s, "noisy").await.unwrap();
    c.call(2, "subscribe", json!({"channel":"calm"}))
        .await
        .unwrap();
    let frame: Vec<String> = (0..10_000)
        .map(|i| json!({"id": i + 10, "presence_stats": {"channel":"calm"}}).to_string())
        .collect();
    c.send_text(frame.join("\n")).await.unwrap();
    let last = c.reply(10_009).await.unwrap();
    assert_eq!(last["presence_stats"]["num_clients"], 2);
    // Deeply nested data is refused (107), not relayed to every subscriber's parser.
    let deep = format!(
        "{{\"id\":1,\"publish\":{{\"channel\":\"calm\",\"data\":{}{}}}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    c.send_text(deep).await.unwrap();
    assert_eq!(c.reply(1).await.unwrap()["error"]["code"], 107);
    let deep_api = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let r = api(&s, "publish", json!({"channel":"calm","data": serde_json::from_str::<serde_json::Value>(&deep_api).unwrap()})).await;
    assert_eq!(r.unwrap()["error"]["code"], 107);
    // Deep nesting in the command itself (not in opaque data) is a bad request.
    let (mut d, _) = Client::connect(&s, "deep").await.unwrap();
    d.send_text(format!(
        "{{\"id\":2,\"subscribe\":{}{}}}",
        "{\"a\":".repeat(3000),
        "}".repeat(3000)
    ))
    .await
    .unwrap();
    assert_eq!(d.closed().await.unwrap().0, 3501);
    publish(&s, "calm", json!("still here")).await.unwrap();
    assert_eq!(
        victim.publication("calm").await.unwrap()["data"],
        "still here"
    );
    s.shutdown().await;
}

/// A subscriber flooded with publications still has its commands read and answered, and its
/// pongs read: the connection loop serves reads and timers beside the outbox, without
/// priority. (With the outbox served first, the reply never came while the flood ran.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_flood_does_not_starve_reads_pongs_or_timers() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let s = start("ping_interval = \"1s\"\npong_timeout = \"900ms\"\nmax_queue_bytes = 268435456")
        .await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    c.call(2, "subscribe", json!({"channel":"big:flood"}))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let flood = {
        let node = s.node.clone();
        let (stop, published) = (stop.clone(), published.clone());
        tokio::spawn(async move {
            let data = herald_protocol::json::raw_from_str(r#"{"x":"0123456789abcdef"}"#).unwrap();
            // Bounded: 20 s or 2,000,000 publications, whichever first.
            let end = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
            for i in 0..2_000_000u64 {
                if stop.load(Ordering::Relaxed) || tokio::time::Instant::now() > end {
                    break;
                }
                let _ = node
                    .publish(
                        "big:flood",
                        data.clone(),
                        None,
                        Default::default(),
                        true,
                        None,
                    )
                    .await;
                published.store(i + 1, Ordering::Relaxed);
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    // Let the flood get going, then ask something and wait for the answer amid the flood.
    let mut received = 0u64;
    while received < 2_000 {
        let v = c.next().await.unwrap();
        if v.get("push").is_some() {
            received += 1;
        }
    }
    c.send(json!({"id": 3, "subscribe": {"channel": "other"}}))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut pings_seen = 0;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reply within 10 s while flooded ({received} publications read)"
        );
        let v = c.next_raw().await.unwrap();
        if v == json!({}) {
            pings_seen += 1;
            c.send(json!({})).await.unwrap();
        } else if v.get("id").and_then(|i| i.as_u64()) == Some(3) {
            assert!(v.get("error").is_none(), "{v}");
            break;
        } else {
            received += 1;
        }
    }
    // The reply came while the flood was still running.
    assert!(!flood.is_finished(), "the flood ended before the reply");
    // Keep reading through a few ping intervals: pongs are read, so no 3012.
    let until = tokio::time::Instant::now() + std::time::Duration::from_millis(2_500);
    while tokio::time::Instant::now() < until {
        let v = c.next_raw().await.unwrap();
        if v == json!({}) {
            pings_seen += 1;
            c.send(json!({})).await.unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    flood.await.unwrap();
    assert!(pings_seen >= 1, "no ping reached the client in 2.5 s");
    assert!(published.load(Ordering::Relaxed) > received / 2);
    s.shutdown().await;
}
