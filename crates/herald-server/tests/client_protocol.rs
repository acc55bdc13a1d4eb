//! The client protocol over a real WebSocket: connect, subscribe, publish, presence,
//! history, permissions, tokens, pings.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn connect_subscribe_receive_in_order() {
    let s = start("").await;
    let (mut c, r) = Client::connect(&s, "alice").await.unwrap();
    assert_eq!(r["connect"]["ping"], 25);
    assert_eq!(r["connect"]["pong"], true);
    assert!(r["connect"]["client"].as_str().unwrap().len() > 10);
    let sub = c
        .call(2, "subscribe", json!({"channel": "room"}))
        .await
        .unwrap();
    assert_eq!(sub["subscribe"]["recoverable"], true);
    assert!(sub["subscribe"]["epoch"].as_str().unwrap().len() >= 4);
    for i in 0..20 {
        publish(&s, "room", json!({"n": i})).await.unwrap();
    }
    for i in 0..20u64 {
        let p = c.publication("room").await.unwrap();
        assert_eq!(p["data"]["n"], i);
        assert_eq!(p["offset"], i + 1);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn batched_commands_in_one_frame_get_replies() {
    let s = start("").await;
    let mut c = Client::open(&s).await.unwrap();
    let frame = format!(
        "{}\n{}\n{}",
        json!({"id":1,"connect":{"token": token("bob", 60), "name":"js", "flag": 1}}),
        json!({"id":2,"subscribe":{"channel":"a","flag":3}}),
        json!({"id":3,"subscribe":{"channel":"b"}})
    );
    c.send_text(frame).await.unwrap();
    assert!(c.reply(1).await.unwrap().get("connect").is_some());
    assert!(c.reply(2).await.unwrap().get("subscribe").is_some());
    assert!(c.reply(3).await.unwrap().get("subscribe").is_some());
    s.shutdown().await;
}

#[tokio::test]
async fn client_publish_allowed_and_denied() {
    let s = start("").await;
    let (mut a, _) = Client::connect(&s, "a").await.unwrap();
    let (mut b, _) = Client::connect(&s, "b").await.unwrap();
    // Not subscribed yet: publish needs allow_publish_for_subscriber.
    let r = a
        .call(2, "publish", json!({"channel":"room","data":{"x":1}}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103);
    a.call(3, "subscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    b.call(2, "subscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    let r = a
        .call(4, "publish", json!({"channel":"room","data":{"x":2}}))
        .await
        .unwrap();
    assert!(r.get("publish").is_some(), "{r}");
    let p = b.publication("room").await.unwrap();
    assert_eq!(p["data"]["x"], 2);
    assert_eq!(p["info"]["user"], "a");
    // "news" does not allow client publish at all.
    a.call(5, "subscribe", json!({"channel":"news:1"}))
        .await
        .unwrap();
    let r = a
        .call(6, "publish", json!({"channel":"news:1","data":{}}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103);
    s.shutdown().await;
}

#[tokio::test]
async fn unknown_namespace_and_already_subscribed() {
    let s = start("").await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    let r = c
        .call(2, "subscribe", json!({"channel":"nope:x"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 102);
    c.call(3, "subscribe", json!({"channel":"x"}))
        .await
        .unwrap();
    let r = c
        .call(4, "subscribe", json!({"channel":"x"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 105);
    let r = c.call(5, "subscribe", json!({"channel":""})).await.unwrap();
    assert_eq!(r["error"]["code"], 107);
    let long = "x".repeat(256);
    let r = c
        .call(6, "subscribe", json!({"channel": long}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 107);
    s.shutdown().await;
}

#[tokio::test]
async fn presence_history_and_join_leave() {
    let s = start("").await;
    let (mut a, _) = Client::connect(&s, "a").await.unwrap();
    let (mut b, _) = Client::connect(&s, "b").await.unwrap();
    a.call(2, "subscribe", json!({"channel":"room","join_leave":true}))
        .await
        .unwrap();
    b.call(2, "subscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    // a asked for join/leave pushes and sees b join.
    loop {
        let v = a.next().await.unwrap();
        if v["push"]["join"]["info"]["user"] == "b" {
            break;
        }
    }
    let r = a
        .call(3, "presence", json!({"channel":"room"}))
        .await
        .unwrap();
    assert_eq!(r["presence"]["presence"].as_object().unwrap().len(), 2);
    let r = a
        .call(4, "presence_stats", json!({"channel":"room"}))
        .await
        .unwrap();
    assert_eq!(r["presence_stats"], json!({"num_clients":2,"num_users":2}));
    for i in 0..3 {
        publish(&s, "room", json!(i)).await.unwrap();
    }
    let r = a
        .call(5, "history", json!({"channel":"room","limit":-1}))
        .await
        .unwrap();
    let pubs = r["history"]["publications"].as_array().unwrap();
    assert_eq!(pubs.len(), 3);
    assert_eq!(r["history"]["offset"], 3);
    let r = a
        .call(
            6,
            "history",
            json!({"channel":"room","limit":2,"reverse":true}),
        )
        .await
        .unwrap();
    let offs: Vec<u64> = r["history"]["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offs, [3, 2]);
    // History since a position with a wrong epoch: unrecoverable position.
    let r = a
        .call(
            7,
            "history",
            json!({"channel":"room","limit":-1,"since":{"offset":1,"epoch":"nope"}}),
        )
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 112);
    // Presence in a namespace without presence: not available.
    let r = a
        .call(8, "presence", json!({"channel":"news:x"}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 108);
    // b leaves; a sees it.
    b.call(3, "unsubscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    loop {
        let v = a.next().await.unwrap();
        if v["push"]["leave"]["info"]["user"] == "b" {
            break;
        }
    }
    s.shutdown().await;
}

#[tokio::test]
async fn tokens_invalid_expired_missing() {
    let s = start("").await;
    // Forged token: terminal disconnect 3500.
    let mut c = Client::open(&s).await.unwrap();
    let forged = herald_core::auth::sign_hs256("wrong", &json!({"sub":"x"})).unwrap();
    c.send(json!({"id":1,"connect":{"token": forged}}))
        .await
        .unwrap();
    assert_eq!(c.closed().await.unwrap().0, 3500);
    // Expired: error 109 so the SDK fetches a new token.
    let mut c = Client::open(&s).await.unwrap();
    c.send(json!({"id":1,"connect":{"token": token("x", -10)}}))
        .await
        .unwrap();
    assert_eq!(c.reply(1).await.unwrap()["error"]["code"], 109);
    // No token and no anonymous access: 101.
    let mut c = Client::open(&s).await.unwrap();
    c.send(json!({"id":1,"connect":{}})).await.unwrap();
    assert_eq!(c.reply(1).await.unwrap()["error"]["code"], 101);
    s.shutdown().await;
}

#[tokio::test]
async fn anonymous_when_allowed() {
    let s = start_with(&config("allow_anonymous = true").replace(
        "allow_subscribe_for_client = true\nallow_publish_for_subscriber",
        "allow_subscribe_for_client = true\nallow_subscribe_for_anonymous = true\nallow_publish_for_subscriber",
    ))
    .await;
    let mut c = Client::open(&s).await.unwrap();
    c.send(json!({"id":1,"connect":{}})).await.unwrap();
    let r = c.reply(1).await.unwrap();
    assert!(r.get("connect").is_some(), "{r}");
    let r = c
        .call(2, "subscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some(), "{r}");
    // Anonymous publish is not allowed (allow_publish_for_anonymous is off).
    let r = c
        .call(3, "publish", json!({"channel":"room","data":1}))
        .await
        .unwrap();
    assert_eq!(r["error"]["code"], 103);
    s.shutdown().await;
}

#[tokio::test]
async fn refresh_extends_connection() {
    let s = start("").await;
    let mut c = Client::open(&s).await.unwrap();
    c.send(json!({"id":1,"connect":{"token": token("r", 2)}}))
        .await
        .unwrap();
    let r = c.reply(1).await.unwrap();
    assert_eq!(r["connect"]["expires"], true);
    assert!(r["connect"]["ttl"].as_u64().unwrap() <= 2);
    let r = c
        .call(2, "refresh", json!({"token": token("r", 3600)}))
        .await
        .unwrap();
    assert_eq!(r["refresh"]["expires"], true);
    assert!(r["refresh"]["ttl"].as_u64().unwrap() > 3000);
    // Past the first token's expiry the connection still works.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let r = c
        .call(3, "subscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some());
    // A refresh token for another user is refused.
    c.send(json!({"id":4,"refresh":{"token": token("mallory", 60)}}))
        .await
        .unwrap();
    assert_eq!(c.closed().await.unwrap().0, 3500);
    s.shutdown().await;
}

#[tokio::test]
async fn expired_connection_is_disconnected_3005() {
    let s = start("expired_close_delay = \"0s\"").await;
    let mut c = Client::open(&s).await.unwrap();
    c.send(json!({"id":1,"connect":{"token": token("e", 1)}}))
        .await
        .unwrap();
    c.reply(1).await.unwrap();
    assert_eq!(c.closed().await.unwrap().0, 3005);
    s.shutdown().await;
}

#[tokio::test]
async fn server_side_subscriptions_from_token() {
    let s = start("").await;
    let mut c = Client::open(&s).await.unwrap();
    let t = token_with(json!({"sub":"srv","channels":["room","news:a"]}), 60);
    c.send(json!({"id":1,"connect":{"token": t}}))
        .await
        .unwrap();
    let r = c.reply(1).await.unwrap();
    let subs = r["connect"]["subs"].as_object().unwrap();
    assert!(
        subs.contains_key("room") && subs.contains_key("news:a"),
        "{r}"
    );
    publish(&s, "news:a", json!("hello")).await.unwrap();
    assert_eq!(c.publication("news:a").await.unwrap()["data"], "hello");
    s.shutdown().await;
}

#[tokio::test]
async fn ping_pong_and_no_pong_disconnect() {
    let s = start("ping_interval = \"1s\"\npong_timeout = \"800ms\"").await;
    let (mut quiet, _) = Client::connect(&s, "quiet").await.unwrap();
    let (mut good, _) = Client::connect(&s, "good").await.unwrap();
    good.call(2, "subscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    // `good` answers three pings while `quiet` is left unanswered.
    let answering = tokio::spawn(async move {
        for _ in 0..3 {
            assert_eq!(good.next_raw().await.unwrap(), json!({}));
            good.send(json!({})).await.unwrap();
        }
        good
    });
    assert_eq!(quiet.next_raw().await.unwrap(), json!({}));
    assert_eq!(quiet.closed().await.unwrap().0, 3012);
    let mut good = answering.await.unwrap();
    let r = good
        .call(3, "presence_stats", json!({"channel":"room"}))
        .await
        .unwrap();
    assert_eq!(r["presence_stats"]["num_clients"], 1);
    s.shutdown().await;
}

#[tokio::test]
async fn rpc_without_handler_is_not_available() {
    let s = start("").await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    let r = c
        .call(2, "rpc", json!({"method":"x","data":{}}))
        .await
        .unwrap();
    // Centrifugo's answer when no RPC handler is configured.
    assert_eq!(r["error"]["code"], 108);
    s.shutdown().await;
}

/// A recovery from an empty epoch and offset 0 (what an SDK sends before it knows the
/// stream) returns the whole history as recovered.
#[tokio::test]
async fn recover_from_empty_epoch_returns_the_whole_history() {
    let s = start("").await;
    for i in 0..4 {
        publish(&s, "whole", json!(i)).await.unwrap();
    }
    let (mut c, _) = Client::connect(&s, "w").await.unwrap();
    let r = c
        .call(
            2,
            "subscribe",
            json!({"channel": "whole", "recover": true, "epoch": "", "offset": 0}),
        )
        .await
        .unwrap();
    let sub = &r["subscribe"];
    assert_eq!(sub["recovered"], true, "{r}");
    let offsets: Vec<_> = sub["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [1, 2, 3, 4]);
    s.shutdown().await;
}

/// `client.recovery_max_publication_limit` missed publications are recovered; one more is
/// not (the client goes on from the top, `recovered: false`).
#[tokio::test]
async fn recovery_up_to_the_limit_and_not_past_it() {
    let s = start("recovery_max_publication_limit = 3\n").await;
    for i in 0..5 {
        publish(&s, "limit", json!(i)).await.unwrap();
    }
    let (mut c, r) = Client::connect(&s, "l").await.unwrap();
    assert!(r["connect"].is_object(), "{r}");
    let epoch = {
        let h = api(&s, "history", json!({"channel": "limit", "limit": 0}))
            .await
            .unwrap();
        h["result"]["epoch"].as_str().unwrap().to_string()
    };
    let r = c
        .call(
            2,
            "subscribe",
            json!({"channel": "limit", "recover": true, "epoch": epoch, "offset": 2}),
        )
        .await
        .unwrap();
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    assert_eq!(
        r["subscribe"]["publications"].as_array().map(Vec::len),
        Some(3)
    );
    let r = c
        .call(
            3,
            "subscribe",
            json!({"channel": "limit2", "recover": true, "epoch": "", "offset": 0}),
        )
        .await
        .unwrap();
    assert_eq!(r["subscribe"]["recovered"], true, "an empty stream: {r}");
    c.call(4, "unsubscribe", json!({"channel": "limit"}))
        .await
        .unwrap();
    let r = c
        .call(
            5,
            "subscribe",
            json!({"channel": "limit", "recover": true, "epoch": epoch, "offset": 1}),
        )
        .await
        .unwrap();
    // `recovered: false` is left out of the JSON, like every false field.
    assert_ne!(r["subscribe"]["recovered"], true, "4 missed, limit 3: {r}");
    assert!(r["subscribe"]["publications"].is_null(), "{r}");
    assert_eq!(r["subscribe"]["offset"], 5, "goes on from the top: {r}");
    s.shutdown().await;
}

/// Flag bit 2 asks for error 112 instead of `recovered: false`; other bits are ignored.
#[tokio::test]
async fn reject_unrecovered_flag_gets_112() {
    let s = start("").await;
    let epoch = publish(&s, "gone", json!(0)).await.unwrap()["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut c, _) = Client::connect(&s, "f").await.unwrap();
    // A position from another epoch cannot be recovered.
    let stale = json!({"channel": "gone", "recover": true, "epoch": "not-this-one", "offset": 1});
    let mut flagged = stale.clone();
    flagged["flag"] = json!(2 | 1 | 64);
    let r = c.call(2, "subscribe", flagged).await.unwrap();
    assert_eq!(r["error"]["code"], 112, "{r}");
    // Without the bit: subscribed, told it was not recovered.
    let r = c.call(3, "subscribe", stale).await.unwrap();
    assert_eq!(r["subscribe"]["was_recovering"], true, "{r}");
    assert_ne!(r["subscribe"]["recovered"], true, "{r}");
    assert_eq!(r["subscribe"]["epoch"], epoch);
    c.call(4, "unsubscribe", json!({"channel": "gone"}))
        .await
        .unwrap();
    // With the bit and a recoverable position: recovered as usual.
    let mut ok = json!({"channel": "gone", "recover": true, "epoch": epoch, "offset": 0});
    ok["flag"] = json!(3);
    let r = c.call(5, "subscribe", ok).await.unwrap();
    assert_eq!(r["subscribe"]["recovered"], true, "{r}");
    s.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_sends_3001() {
    let s = start("").await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    let shut = tokio::spawn(s.shutdown());
    assert_eq!(c.closed().await.unwrap().0, 3001);
    tokio::time::timeout(WAIT, shut).await.unwrap().unwrap();
}

#[tokio::test]
async fn pretty_printed_data_stays_one_message() {
    let s = start("").await;
    let (mut c, _) = Client::connect(&s, "u").await.unwrap();
    c.call(2, "subscribe", json!({"channel":"room"}))
        .await
        .unwrap();
    let body = "{\"channel\":\"room\",\"data\":{\n  \"text\": \"line1\\nline2\",\r\n  \"n\": 1\n}}";
    let (status, v) = http(&s, "POST", "/api/publish", Some(API_KEY), body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{v}");
    // Publish twice so both travel batched in one frame; each parses on its own line.
    http(&s, "POST", "/api/publish", Some(API_KEY), body)
        .await
        .unwrap();
    for _ in 0..2 {
        let p = c.publication("room").await.unwrap();
        assert_eq!(p["data"]["text"], "line1\nline2");
    }
    s.shutdown().await;
}

/// The automatic personal channel: every authenticated connection is subscribed to `#<user>`
/// at connect (in the connect reply's `subs`), and a publication there reaches all of the
/// user's connections.
#[tokio::test]
async fn personal_channel_is_subscribed_at_connect() {
    let s = start(
        "allow_anonymous = true\n[client.subscribe_to_user_personal_channel]\nenabled = true",
    )
    .await;
    // An anonymous connection has no user, so no personal channel.
    let mut anon = Client::open(&s).await.unwrap();
    let r = anon.call(1, "connect", json!({})).await.unwrap();
    assert!(r["connect"].get("subs").is_none(), "{r}");
    let (mut a1, r1) = Client::connect(&s, "alice").await.unwrap();
    let (mut a2, _) = Client::connect(&s, "alice").await.unwrap();
    let (mut b, rb) = Client::connect(&s, "bob").await.unwrap();
    assert!(r1["connect"]["subs"].get("#alice").is_some(), "{r1}");
    assert!(rb["connect"]["subs"].get("#bob").is_some(), "{rb}");
    publish(&s, "#alice", json!({"to": "alice"})).await.unwrap();
    assert_eq!(
        a1.publication("#alice").await.unwrap()["data"]["to"],
        "alice"
    );
    assert_eq!(
        a2.publication("#alice").await.unwrap()["data"]["to"],
        "alice"
    );
    // Bob is not in Alice's channel: his next message is his own publication.
    publish(&s, "#bob", json!("b")).await.unwrap();
    assert_eq!(b.publication("#bob").await.unwrap()["data"], "b");
    s.shutdown().await;
}

/// `single_connection`: a user's new connection closes the older ones with 3504.
#[tokio::test]
async fn personal_channel_single_connection() {
    let s = start(
        "[client.subscribe_to_user_personal_channel]\nenabled = true\nsingle_connection = true\npersonal_channel_namespace = \"big\"",
    )
    .await;
    let (mut old, r) = Client::connect(&s, "carol").await.unwrap();
    assert!(r["connect"]["subs"].get("big:#carol").is_some(), "{r}");
    let (mut other_user, _) = Client::connect(&s, "dave").await.unwrap();
    let (mut new, _) = Client::connect(&s, "carol").await.unwrap();
    assert_eq!(old.closed().await.unwrap().0, 3504);
    publish(&s, "big:#carol", json!(1)).await.unwrap();
    assert_eq!(new.publication("big:#carol").await.unwrap()["data"], 1);
    publish(&s, "big:#dave", json!(2)).await.unwrap();
    assert_eq!(
        other_user.publication("big:#dave").await.unwrap()["data"],
        2
    );
    s.shutdown().await;
}
