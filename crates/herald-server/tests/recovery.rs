//! Recovery after a lost connection: every missed publication, in order, exactly once — or
//! `recovered: false`, never a silent hole.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use common::*;
use serde_json::{Value, json};

async fn subscribed(s: &herald_server::Server, user: &str, ch: &str) -> (Client, u64, String) {
    let (mut c, _) = Client::connect(s, user).await.unwrap();
    let r = c
        .call(2, "subscribe", json!({"channel": ch}))
        .await
        .unwrap();
    let offset = r["subscribe"]["offset"].as_u64().unwrap_or(0);
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    (c, offset, epoch)
}

async fn resubscribe(s: &herald_server::Server, ch: &str, offset: u64, epoch: &str) -> Value {
    let (mut c, _) = Client::connect(s, "back").await.unwrap();
    let r = c
        .call(
            2,
            "subscribe",
            json!({"channel": ch, "recover": true, "offset": offset, "epoch": epoch}),
        )
        .await
        .unwrap();
    r["subscribe"].clone()
}

#[tokio::test]
async fn recovers_missed_publications_in_order() {
    let s = start("").await;
    publish(&s, "room", json!("before")).await.unwrap();
    let (mut c, _, epoch) = subscribed(&s, "u", "room").await;
    publish(&s, "room", json!(0)).await.unwrap();
    let last = c.publication("room").await.unwrap()["offset"]
        .as_u64()
        .unwrap();
    drop(c);
    for i in 1..=5 {
        publish(&s, "room", json!(i)).await.unwrap();
    }
    let r = resubscribe(&s, "room", last, &epoch).await;
    assert_eq!(r["was_recovering"], true);
    assert_eq!(r["recovered"], true, "{r}");
    let pubs: Vec<Value> = r["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(pubs, (1..=5).map(|i| json!(i)).collect::<Vec<_>>());
    assert_eq!(r["offset"], last + 5);
    s.shutdown().await;
}

#[tokio::test]
async fn nothing_missed_is_recovered_empty() {
    let s = start("").await;
    publish(&s, "room", json!(1)).await.unwrap();
    let (_c, offset, epoch) = subscribed(&s, "u", "room").await;
    let r = resubscribe(&s, "room", offset, &epoch).await;
    assert_eq!(r["recovered"], true);
    assert!(r.get("publications").is_none());
    s.shutdown().await;
}

#[tokio::test]
async fn trimmed_history_is_not_recovered() {
    // news: history_size = 3.
    let s = start("").await;
    let (_c, offset, epoch) = subscribed(&s, "u", "news:x").await;
    for i in 0..5 {
        publish(&s, "news:x", json!(i)).await.unwrap();
    }
    let r = resubscribe(&s, "news:x", offset, &epoch).await;
    assert_eq!(r["was_recovering"], true);
    assert!(r.get("recovered").is_none(), "{r}");
    assert!(r.get("publications").is_none());
    assert_eq!(r["offset"], 5);
    s.shutdown().await;
}

#[tokio::test]
async fn other_epoch_is_not_recovered() {
    let s = start("").await;
    let (_c, offset, _) = subscribed(&s, "u", "room").await;
    publish(&s, "room", json!(1)).await.unwrap();
    let r = resubscribe(&s, "room", offset, "another-epoch").await;
    assert!(r.get("recovered").is_none(), "{r}");
    // A position ahead of the stream cannot be recovered either.
    let epoch = r["epoch"].as_str().unwrap().to_string();
    let r = resubscribe(&s, "room", 100, &epoch).await;
    assert!(r.get("recovered").is_none(), "{r}");
    s.shutdown().await;
}

/// Publications flow while clients resubscribe with recovery: each ends with the exact
/// sequence, whatever the interleaving of history read and live delivery.
#[tokio::test]
async fn recovery_under_concurrent_publishing_has_no_gap_or_duplicate() {
    let s = start("").await;
    let total = 300u64;
    let (mut c, _, epoch) = subscribed(&s, "u", "big:live").await;
    let server = std::sync::Arc::new(s);
    let p = server.clone();
    let publisher = tokio::spawn(async move {
        for i in 1..=total {
            publish(&p, "big:live", json!(i)).await.unwrap();
        }
    });
    let mut seen: Vec<u64> = Vec::new();
    // Take a few, drop, resubscribe from the last seen offset; repeat while publishing runs.
    while seen.len() < total as usize {
        let mut n = 0;
        while n < 20 && seen.len() < total as usize {
            let pb = c.publication("big:live").await.unwrap();
            seen.push(pb["offset"].as_u64().unwrap());
            n += 1;
        }
        if seen.len() >= total as usize {
            break;
        }
        let last = *seen.last().unwrap();
        let (mut again, _) = Client::connect(&server, "u").await.unwrap();
        let r = again
            .call(
                2,
                "subscribe",
                json!({"channel":"big:live","recover":true,"offset":last,"epoch":epoch}),
            )
            .await
            .unwrap();
        assert_eq!(r["subscribe"]["recovered"], true, "{r}");
        for pb in r["subscribe"]["publications"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            seen.push(pb["offset"].as_u64().unwrap());
        }
        c = again;
    }
    publisher.await.unwrap();
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
}
