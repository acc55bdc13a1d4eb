//! The Protobuf client protocol over a real WebSocket: subprotocol negotiation, binary
//! frames of length-prefixed messages, binary data end to end, JSON and Protobuf
//! subscribers on one channel, and malformed frames.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use base64::Engine as _;
use common::proto::{ProtoClient, publish as proto_publish, subscribe};
use common::*;
use herald_protocol::proto::{self, Command};
use serde_json::json;

#[tokio::test]
async fn subprotocol_is_echoed_and_replies_are_binary() {
    let s = start("").await;
    let (mut c, r) = ProtoClient::connect(&s, "alice").await.unwrap();
    assert_eq!(c.subprotocol.as_deref(), Some("centrifuge-protobuf"));
    let connect = r.connect.unwrap();
    assert!(connect.client.len() > 10);
    assert_eq!(connect.ping, 25);
    assert!(connect.pong);
    let sub = c.call(subscribe(2, "room")).await.unwrap();
    let sub = sub.subscribe.unwrap();
    assert!(sub.recoverable);
    assert!(!sub.epoch.is_empty());
    for i in 0..5 {
        publish(&s, "room", json!({"n": i})).await.unwrap();
    }
    for i in 0..5u64 {
        let p = c.publication("room").await.unwrap();
        // JSON data from the API reaches Protobuf clients as the JSON bytes.
        assert_eq!(p.data, format!(r#"{{"n":{i}}}"#).as_bytes());
        assert_eq!(p.offset, i + 1);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn several_commands_in_one_frame_and_unknown_fields() {
    let s = start("").await;
    let mut c = ProtoClient::open(&s).await.unwrap();
    let connect = Command {
        id: 1,
        connect: Some(proto::ConnectRequest {
            token: token("bob", 60),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut frame = proto::concat([
        proto::encode_command(&connect),
        proto::encode_command(&subscribe(2, "a")),
    ])
    .to_vec();
    // A third command with an unknown field (number 99, varint 7) before its subscribe: a
    // newer client's field is skipped, not refused.
    let mut body = vec![0x98, 0x06, 7];
    body.extend_from_slice(&proto::encode_command(&subscribe(3, "b"))[1..]);
    frame.push(u8::try_from(body.len()).unwrap());
    frame.extend_from_slice(&body);
    c.send_bytes(frame).await.unwrap();
    assert!(c.reply(1).await.unwrap().connect.is_some());
    assert!(c.reply(2).await.unwrap().subscribe.is_some());
    assert!(c.reply(3).await.unwrap().subscribe.is_some());
    s.shutdown().await;
}

#[tokio::test]
async fn server_ping_is_an_empty_reply_and_an_empty_command_answers_it() {
    let s = start("ping_interval = \"1s\"\npong_timeout = \"800ms\"").await;
    let (mut c, _) = ProtoClient::connect(&s, "p").await.unwrap();
    // Three ping rounds: without the answers `next` sends, the server would close with 3012.
    let mut id = 10;
    while c.pings < 3 {
        id += 1;
        let r = c
            .call(Command {
                id,
                presence_stats: Some(proto::PresenceStatsRequest {
                    channel: "x".into(),
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(r.error.is_some() || r.presence_stats.is_some());
        tokio::time::timeout(WAIT, async {
            let seen = c.pings;
            // Reading answers pings; wait for the next one.
            while c.pings == seen {
                let sub = c.call(subscribe(id + 1000, "tick")).await.unwrap();
                assert!(sub.subscribe.is_some() || sub.error.is_some());
            }
        })
        .await
        .unwrap();
    }
    s.shutdown().await;
}

#[tokio::test]
async fn binary_data_end_to_end_and_json_subscribers_get_base64() {
    let s = start("").await;
    let (mut pub_c, _) = ProtoClient::connect(&s, "pub").await.unwrap();
    let (mut proto_sub, _) = ProtoClient::connect(&s, "ps").await.unwrap();
    let (mut json_sub, _) = Client::connect(&s, "js").await.unwrap();
    assert!(
        pub_c
            .call(subscribe(2, "bin"))
            .await
            .unwrap()
            .error
            .is_none()
    );
    assert!(
        proto_sub
            .call(subscribe(2, "bin"))
            .await
            .unwrap()
            .error
            .is_none()
    );
    json_sub
        .call(2, "subscribe", json!({"channel": "bin"}))
        .await
        .unwrap();

    let bytes: &[u8] = &[0, 159, 146, 150, 255, b'\n', b'{'];
    let r = pub_c.call(proto_publish(3, "bin", bytes)).await.unwrap();
    assert!(r.error.is_none(), "{r:?}");
    // JSON bytes from a Protobuf client are JSON to everyone.
    let r = pub_c
        .call(proto_publish(4, "bin", br#"{"k": [1, 2]}"#))
        .await
        .unwrap();
    assert!(r.error.is_none(), "{r:?}");

    let p = proto_sub.publication("bin").await.unwrap();
    assert_eq!(p.data, bytes);
    assert_eq!(p.info.unwrap().user, "pub");
    let p = proto_sub.publication("bin").await.unwrap();
    // JSON on one line is relayed byte for byte.
    assert_eq!(p.data, br#"{"k": [1, 2]}"#);

    let j = json_sub.publication("bin").await.unwrap();
    assert_eq!(j["binary"], true);
    let b64 = j["data"].as_str().unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        bytes
    );
    let j = json_sub.publication("bin").await.unwrap();
    assert_eq!(j["data"], json!({"k": [1, 2]}));
    assert!(j.get("binary").is_none());

    // History and the API's b64data carry the bytes unchanged.
    let b64 = base64::engine::general_purpose::STANDARD.encode([1u8, 2, 3, 254]);
    api(&s, "publish", json!({"channel": "bin", "b64data": b64}))
        .await
        .unwrap();
    let p = proto_sub.publication("bin").await.unwrap();
    assert_eq!(p.data, [1, 2, 3, 254]);
    let h = proto_sub
        .call(Command {
            id: 9,
            history: Some(proto::HistoryRequest {
                channel: "bin".into(),
                limit: -1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .history
        .unwrap();
    let datas: Vec<_> = h.publications.iter().map(|p| p.data.clone()).collect();
    assert_eq!(
        datas,
        [
            bytes.to_vec(),
            br#"{"k": [1, 2]}"#.to_vec(),
            vec![1, 2, 3, 254]
        ]
    );
    s.shutdown().await;
}

#[tokio::test]
async fn json_and_protobuf_subscribers_get_every_publication_once() {
    let s = start("").await;
    let (mut p, _) = ProtoClient::connect(&s, "p").await.unwrap();
    let (mut j, _) = Client::connect(&s, "j").await.unwrap();
    p.call(subscribe(2, "mix")).await.unwrap();
    j.call(2, "subscribe", json!({"channel": "mix"}))
        .await
        .unwrap();
    for i in 0..50 {
        publish(&s, "mix", json!(i)).await.unwrap();
    }
    for i in 0..50u64 {
        let pp = p.publication("mix").await.unwrap();
        assert_eq!(pp.offset, i + 1);
        assert_eq!(pp.data, i.to_string().as_bytes());
        let jp = j.publication("mix").await.unwrap();
        assert_eq!(jp["offset"], i + 1);
        assert_eq!(jp["data"], i);
    }
    s.shutdown().await;
}

#[tokio::test]
async fn recovery_over_protobuf() {
    let s = start("").await;
    let (mut c, _) = ProtoClient::connect(&s, "r").await.unwrap();
    let sub = c
        .call(subscribe(2, "rec"))
        .await
        .unwrap()
        .subscribe
        .unwrap();
    publish(&s, "rec", json!("a")).await.unwrap();
    let first = c.publication("rec").await.unwrap();
    drop(c);
    publish(&s, "rec", json!("b")).await.unwrap();
    publish(&s, "rec", json!("c")).await.unwrap();
    let (mut c, _) = ProtoClient::connect(&s, "r").await.unwrap();
    let r = c
        .call(Command {
            id: 2,
            subscribe: Some(proto::SubscribeRequest {
                channel: "rec".into(),
                recover: true,
                epoch: sub.epoch.clone(),
                offset: first.offset,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .subscribe
        .unwrap();
    assert!(r.recovered);
    let datas: Vec<_> = r.publications.iter().map(|p| p.data.clone()).collect();
    assert_eq!(datas, [b"\"b\"".to_vec(), b"\"c\"".to_vec()]);
    s.shutdown().await;
}

/// Each malformed frame closes its connection with 3501 (bad request); a bystander on the
/// same channel keeps working.
#[tokio::test]
async fn malformed_frames_close_with_bad_request_and_spare_bystanders() {
    let s = start("").await;
    let (mut bystander, _) = ProtoClient::connect(&s, "by").await.unwrap();
    bystander.call(subscribe(2, "calm")).await.unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated varint", vec![0x80]),
        ("length past the frame", vec![10, 8, 1]),
        (
            "huge declared length",
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ),
        ("varint over 64 bits", vec![0xff; 11]),
        ("not protobuf", vec![3, 0xff, 0xff, 0xff]),
    ];
    for (what, frame) in cases {
        let (mut c, _) = ProtoClient::connect(&s, "bad").await.unwrap();
        c.send_bytes(frame).await.unwrap();
        let (code, _) = c.closed().await.unwrap();
        assert_eq!(code, 3501, "{what}");
    }
    publish(&s, "calm", json!("still here")).await.unwrap();
    assert_eq!(
        bystander.publication("calm").await.unwrap().data,
        b"\"still here\""
    );
    s.shutdown().await;
}

/// Without the subprotocol the same endpoint speaks JSON; `cf_protocol=protobuf` also asks
/// for Protobuf.
#[tokio::test]
async fn protocol_chosen_per_connection() {
    let s = start("").await;
    let (mut j, _) = Client::connect(&s, "j").await.unwrap();
    let r = j
        .call(2, "subscribe", json!({"channel": "x"}))
        .await
        .unwrap();
    assert!(r.get("subscribe").is_some());

    let url = format!("ws://{}/connection/websocket?cf_protocol=protobuf", s.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    let connect = Command {
        id: 1,
        connect: Some(proto::ConnectRequest {
            token: token("q", 60),
            ..Default::default()
        }),
        ..Default::default()
    };
    ws.send(tokio_tungstenite::tungstenite::Message::binary(
        proto::encode_command(&connect).to_vec(),
    ))
    .await
    .unwrap();
    let msg = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let reply = proto::decode_replies(&msg.into_data())
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(reply.id, 1);
    assert!(reply.connect.is_some());
    s.shutdown().await;
}
