//! Fossil delta compression over a real WebSocket, in both codecs: negotiation, the first
//! publication whole and later ones as patches, recovery, and subscribers without delta on
//! the same channel.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use common::proto::ProtoClient;
use common::*;
use herald_protocol::delta::fossil_apply;
use herald_protocol::proto::{self, Command};
use serde_json::{Value, json};

/// The test config plus namespace "d" (history, delta allowed) and "plain" (no delta).
fn delta_config() -> String {
    config("")
        + r#"
[[namespaces]]
name = "d"
history_size = 100
history_ttl = "5m"
force_recovery = true
allow_subscribe_for_client = true
allowed_delta_types = ["fossil"]
[[namespaces]]
name = "plain"
allow_subscribe_for_client = true
"#
}

/// A ~2 KiB JSON document where publication `i` changes one field.
fn document(i: u64) -> Value {
    let items: Vec<Value> = (0..24)
        .map(|k| json!({"id": k, "name": format!("instrument-{k:03}"), "venue": "XPAR", "currency": "EUR"}))
        .collect();
    json!({"seq": i, "price": 100 + i * 7, "items": items})
}

/// Applies what a JSON subscriber with delta received to its previous data text.
fn json_decode(p: &Value, prev: &[u8]) -> Vec<u8> {
    let text = p["data"].as_str().expect("with delta, data is a string");
    if p["delta"] == true {
        fossil_apply(prev, text.as_bytes()).unwrap()
    } else {
        text.as_bytes().to_vec()
    }
}

#[tokio::test]
async fn json_subscriber_gets_whole_then_patches_that_rebuild_every_publication() {
    let s = start_with(&delta_config()).await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    let (mut plain, _) = Client::connect(&s, "v").await.unwrap();
    let r = c
        .call(
            2,
            "subscribe",
            json!({"channel": "d:doc", "delta": "fossil"}),
        )
        .await
        .unwrap();
    assert_eq!(r["subscribe"]["delta"], true, "{r}");
    let r = plain
        .call(2, "subscribe", json!({"channel": "d:doc"}))
        .await
        .unwrap();
    assert!(r["subscribe"].get("delta").is_none(), "{r}");

    let (mut whole_bytes, mut wire_bytes, mut patches) = (0usize, 0usize, 0);
    let mut prev = Vec::new();
    for i in 0..20 {
        publish(&s, "d:doc", document(i)).await.unwrap();
        let p = c.publication("d:doc").await.unwrap();
        assert_eq!(p["offset"], i + 1);
        if i == 0 {
            assert!(
                p.get("delta").is_none(),
                "the first publication is whole: {p}"
            );
        } else {
            assert_eq!(p["delta"], true, "publication {i}: {p}");
            patches += 1;
        }
        let data = json_decode(&p, &prev);
        assert_eq!(serde_json::from_slice::<Value>(&data).unwrap(), document(i));
        whole_bytes += data.len();
        wire_bytes += p["data"].as_str().unwrap().len();
        prev = data;
        // A subscriber without delta on the same channel reads plain JSON data.
        let q = plain.publication("d:doc").await.unwrap();
        assert_eq!(q["data"], document(i));
        assert!(q.get("delta").is_none());
    }
    assert_eq!(patches, 19);
    // Deterministic for this document: each patch is a few dozen bytes against ~2 KiB.
    let ratio = wire_bytes as f64 / whole_bytes as f64;
    println!(
        "delta: {wire_bytes} data bytes sent for {whole_bytes} bytes of documents ({:.1}% of whole)",
        ratio * 100.0
    );
    assert!(ratio < 0.15, "deltas saved too little: {ratio}");
    s.shutdown().await;
}

#[tokio::test]
async fn delta_is_negotiated_only_where_the_namespace_allows_it() {
    let s = start_with(&delta_config()).await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    // Not allowed in "plain": subscribed, without delta, plain data.
    let r = c
        .call(
            2,
            "subscribe",
            json!({"channel": "plain:x", "delta": "fossil"}),
        )
        .await
        .unwrap();
    assert!(r["subscribe"].get("delta").is_none(), "{r}");
    publish(&s, "plain:x", json!({"a": 1})).await.unwrap();
    publish(&s, "plain:x", json!({"a": 2})).await.unwrap();
    assert_eq!(
        c.publication("plain:x").await.unwrap()["data"],
        json!({"a": 1})
    );
    assert_eq!(
        c.publication("plain:x").await.unwrap()["data"],
        json!({"a": 2})
    );
    // An unknown delta type is a bad request; the connection stays.
    let r = c
        .call(3, "subscribe", json!({"channel": "d:y", "delta": "xdelta"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 107, "{r}");
    let r = c
        .call(4, "subscribe", json!({"channel": "d:y", "delta": "fossil"}))
        .await
        .unwrap();
    assert_eq!(r["subscribe"]["delta"], true, "{r}");
    s.shutdown().await;
}

#[tokio::test]
async fn recovery_with_delta_sends_whole_publications_then_patches() {
    let s = start_with(&delta_config()).await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    let r = c
        .call(2, "subscribe", json!({"channel": "d:r", "delta": "fossil"}))
        .await
        .unwrap();
    let epoch = r["subscribe"]["epoch"].as_str().unwrap().to_string();
    publish(&s, "d:r", document(0)).await.unwrap();
    publish(&s, "d:r", document(1)).await.unwrap();
    let first = c.publication("d:r").await.unwrap();
    let second = c.publication("d:r").await.unwrap();
    assert_eq!(second["delta"], true);
    drop(c);
    for i in 2..5 {
        publish(&s, "d:r", document(i)).await.unwrap();
    }
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    let r = c
        .call(
            2,
            "subscribe",
            json!({"channel": "d:r", "delta": "fossil", "recover": true, "epoch": epoch, "offset": 2}),
        )
        .await
        .unwrap();
    let sub = &r["subscribe"];
    assert_eq!(sub["recovered"], true, "{r}");
    assert_eq!(sub["delta"], true, "{r}");
    let pubs = sub["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 3);
    let mut prev = Vec::new();
    for (k, p) in pubs.iter().enumerate() {
        // Recovered publications are whole, as strings.
        assert!(p.get("delta").is_none(), "{p}");
        prev = json_decode(p, &prev);
        let doc = document(k as u64 + 2);
        assert_eq!(serde_json::from_slice::<Value>(&prev).unwrap(), doc);
    }
    // The first live publication after a recovery is whole; the next one a patch.
    publish(&s, "d:r", document(5)).await.unwrap();
    publish(&s, "d:r", document(6)).await.unwrap();
    let p5 = c.publication("d:r").await.unwrap();
    assert!(p5.get("delta").is_none(), "{p5}");
    prev = json_decode(&p5, &prev);
    let p6 = c.publication("d:r").await.unwrap();
    assert_eq!(p6["delta"], true, "{p6}");
    prev = json_decode(&p6, &prev);
    assert_eq!(serde_json::from_slice::<Value>(&prev).unwrap(), document(6));
    drop((first, second));
    s.shutdown().await;
}

#[tokio::test]
async fn protobuf_subscriber_gets_byte_patches_including_binary_data() {
    let s = start_with(&delta_config()).await;
    let (mut c, _) = ProtoClient::connect(&s, "p").await.unwrap();
    let r = c
        .call(Command {
            id: 2,
            subscribe: Some(proto::SubscribeRequest {
                channel: "d:bin".into(),
                delta: "fossil".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(r.subscribe.unwrap().delta);
    let mut prev: Vec<u8> = Vec::new();
    for i in 0..6u64 {
        publish(&s, "d:bin", document(i)).await.unwrap();
        let p = c.publication("d:bin").await.unwrap();
        assert_eq!(p.delta, i > 0, "publication {i}");
        let data = if p.delta {
            fossil_apply(&prev, &p.data).unwrap()
        } else {
            p.data.clone()
        };
        assert_eq!(serde_json::from_slice::<Value>(&data).unwrap(), document(i));
        prev = data;
    }
    // Binary data (not JSON) from the API: patches are computed on the bytes themselves.
    let mut blob: Vec<u8> = (0..1500u32).map(|k| (k % 251) as u8).collect();
    for round in 0..3u8 {
        blob[700] = round;
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &blob);
        api(&s, "publish", json!({"channel": "d:bin", "b64data": b64}))
            .await
            .unwrap();
        let p = c.publication("d:bin").await.unwrap();
        let data = if p.delta {
            fossil_apply(&prev, &p.data).unwrap()
        } else {
            p.data.clone()
        };
        assert_eq!(data, blob, "round {round}");
        prev = data;
        if round > 0 {
            assert!(
                p.delta && p.data.len() < 100,
                "round {round}: {}",
                p.data.len()
            );
        }
    }
    s.shutdown().await;
}
