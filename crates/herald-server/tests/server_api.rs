//! The server HTTP API, as `cent` and curl use it.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn api_key_is_required() {
    let s = start("").await;
    let (status, _) = http(&s, "POST", "/api/info", None, "{}").await.unwrap();
    assert_eq!(status, 401);
    let (status, _) = http(&s, "POST", "/api/info", Some("wrong"), "{}")
        .await
        .unwrap();
    assert_eq!(status, 401);
    let (status, v) = http(&s, "POST", "/api/info", Some(API_KEY), "{}")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["result"]["nodes"].as_array().unwrap().len(), 1);
    let (status, _) = http(&s, "POST", "/api/nope", Some(API_KEY), "{}")
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, v) = http(&s, "POST", "/api/publish", Some(API_KEY), "{not json")
        .await
        .unwrap();
    assert_eq!((status, v["error"]["code"].clone()), (200, json!(107)));
    let (status, _) = http(&s, "GET", "/health", None, "").await.unwrap();
    assert_eq!(status, 200);
    s.shutdown().await;
}

#[tokio::test]
async fn publish_broadcast_history_remove_channels_info() {
    let s = start("").await;
    let (mut c, _) = Client::connect(&s, "u1").await.unwrap();
    c.call(2, "subscribe", json!({"channel":"a"}))
        .await
        .unwrap();
    c.call(3, "subscribe", json!({"channel":"b"}))
        .await
        .unwrap();
    let r = publish(&s, "a", json!({"k":1})).await.unwrap();
    assert_eq!(r["offset"], 1);
    let epoch = r["epoch"].clone();
    let v = api(
        &s,
        "broadcast",
        json!({"channels":["a","b","zz:unknown"],"data":{"k":2}}),
    )
    .await
    .unwrap();
    let resp = v["result"]["responses"].as_array().unwrap();
    assert_eq!(resp[0]["result"]["offset"], 2);
    assert_eq!(resp[1]["result"]["offset"], 1);
    assert_eq!(resp[2]["error"]["code"], 102);
    let v = api(&s, "history", json!({"channel":"a","limit":-1}))
        .await
        .unwrap();
    assert_eq!(v["result"]["publications"].as_array().unwrap().len(), 2);
    assert_eq!(v["result"]["epoch"], epoch);
    api(&s, "history_remove", json!({"channel":"a"}))
        .await
        .unwrap();
    let v = api(&s, "history", json!({"channel":"a","limit":-1}))
        .await
        .unwrap();
    assert!(v["result"]["publications"].as_array().unwrap().is_empty());
    assert_eq!(v["result"]["offset"], 2, "offsets survive history removal");
    let v = api(&s, "channels", json!({})).await.unwrap();
    assert_eq!(v["result"]["channels"]["a"]["num_clients"], 1);
    let v = api(&s, "channels", json!({"pattern":"b*"})).await.unwrap();
    assert_eq!(v["result"]["channels"].as_object().unwrap().len(), 1);
    let v = api(&s, "info", json!({})).await.unwrap();
    let n = &v["result"]["nodes"][0];
    assert_eq!(
        (n["num_clients"].clone(), n["num_subs"].clone()),
        (json!(1), json!(2))
    );
    let v = api(&s, "presence_stats", json!({"channel":"a"}))
        .await
        .unwrap();
    assert_eq!(v["result"]["num_clients"], 1);
    let v = api(&s, "presence", json!({"channel":"a"})).await.unwrap();
    assert_eq!(v["result"]["presence"].as_object().unwrap().len(), 1);
    // b64data carries JSON text.
    let v = api(
        &s,
        "publish",
        json!({"channel":"b","b64data":"eyJ4IjozfQ=="}),
    )
    .await
    .unwrap();
    assert_eq!(v["result"]["offset"], 2);
    s.shutdown().await;
}

#[tokio::test]
async fn idempotent_publish_returns_first_position() {
    let s = start("").await;
    let a = api(
        &s,
        "publish",
        json!({"channel":"a","data":1,"idempotency_key":"k1"}),
    )
    .await
    .unwrap();
    let b = api(
        &s,
        "publish",
        json!({"channel":"a","data":1,"idempotency_key":"k1"}),
    )
    .await
    .unwrap();
    assert_eq!(a["result"], b["result"]);
    let h = api(&s, "history", json!({"channel":"a","limit":-1}))
        .await
        .unwrap();
    assert_eq!(h["result"]["publications"].as_array().unwrap().len(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn batch_answers_each_command() {
    let s = start("").await;
    let v = api(
        &s,
        "batch",
        json!({"commands":[
            {"publish":{"channel":"a","data":1}},
            {"publish":{"channel":"nope:a","data":1}},
            {"history":{"channel":"a","limit":-1}},
            {"frobnicate":{}}
        ]}),
    )
    .await
    .unwrap();
    let r = v["replies"].as_array().unwrap();
    assert_eq!(r[0]["publish"]["offset"], 1);
    assert_eq!(r[1]["error"]["code"], 102);
    assert_eq!(r[2]["history"]["publications"].as_array().unwrap().len(), 1);
    assert_eq!(r[3]["error"]["code"], 104);
    s.shutdown().await;
}

#[tokio::test]
async fn subscribe_unsubscribe_disconnect_by_user() {
    let s = start("").await;
    let (mut c, _) = Client::connect(&s, "target").await.unwrap();
    let (mut other, _) = Client::connect(&s, "other").await.unwrap();
    api(&s, "subscribe", json!({"user":"target","channel":"srv"}))
        .await
        .unwrap();
    loop {
        let v = c.next().await.unwrap();
        if v["push"]["channel"] == "srv" && v["push"].get("subscribe").is_some() {
            break;
        }
    }
    publish(&s, "srv", json!("x")).await.unwrap();
    assert_eq!(c.publication("srv").await.unwrap()["data"], "x");
    api(&s, "unsubscribe", json!({"user":"target","channel":"srv"}))
        .await
        .unwrap();
    loop {
        let v = c.next().await.unwrap();
        if v["push"]["unsubscribe"]["code"] == 2000 {
            break;
        }
    }
    api(
        &s,
        "disconnect",
        json!({"user":"target","disconnect":{"code":4501,"reason":"bye"}}),
    )
    .await
    .unwrap();
    assert_eq!(c.closed().await.unwrap(), (4501, "bye".to_string()));
    // Other users are untouched.
    let r = other
        .call(2, "subscribe", json!({"channel":"srv"}))
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some());
    s.shutdown().await;
}

/// `refresh` with the largest `expire_at` extends the connection (it used to overflow into
/// an immediate 3005 disconnect).
#[tokio::test]
async fn refresh_to_the_end_of_time_extends_the_connection() {
    let s = start("").await;
    let (mut c, _) = Client::connect(&s, "eternal").await.unwrap();
    api(
        &s,
        "refresh",
        json!({"user": "eternal", "expire_at": u64::MAX}),
    )
    .await
    .unwrap();
    let push = c.next().await.unwrap();
    assert_eq!(push["push"]["refresh"]["expires"], true, "{push}");
    // Still connected and answering.
    let r = c
        .call(5, "subscribe", json!({"channel":"after-refresh"}))
        .await
        .unwrap();
    assert!(r.get("error").is_none(), "{r}");
    s.shutdown().await;
}
