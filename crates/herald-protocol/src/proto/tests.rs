use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::json::raw_from_str;

fn commands(frame: &[u8]) -> Result<Vec<Command>, FrameError> {
    decode_commands(frame).collect()
}

fn replies(frame: &[u8]) -> Vec<Reply> {
    decode_replies(frame).collect::<Result<_, _>>().unwrap()
}

fn raw(s: &str) -> crate::json::Raw {
    raw_from_str(s).unwrap()
}

/// Bytes worked out by hand from the public schema (field number << 3 | wire type, then
/// the value), so compatibility with the SDKs is checked rather than assumed. (Frames from
/// this module were also decoded by the Protobuf codec of centrifuge-js 5.8.0, and its
/// encoded commands by `decode_commands`, when this code was written.)
#[test]
fn golden_connect_command() {
    let frame = [
        0x07, // length of the Command
        0x08, 0x01, // field 1 (id), varint: 1
        0x22, 0x03, // field 4 (connect), length-delimited: 3 bytes
        0x0a, 0x01, b't', // ConnectRequest field 1 (token), string "t"
    ];
    let cmd = Command {
        id: 1,
        connect: Some(ConnectRequest {
            token: "t".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(encode_command(&cmd), &frame[..]);
    assert_eq!(commands(&frame).unwrap(), vec![cmd]);
}

#[test]
fn golden_publication_push() {
    let publication = client::Publication {
        data: raw(r#"{"a":1}"#),
        info: None,
        offset: 7,
        tags: BTreeMap::new(),
        time: 0,
        binary: false,
        delta: false,
    };
    let mut expected = vec![
        0x13, // length of the Reply: 19
        0x22, 0x11, // Reply field 4 (push): 17 bytes
        0x12, 0x02, b'c', b'h', // Push field 2 (channel): "ch"
        0x22, 0x0b, // Push field 4 (pub): 11 bytes
        0x22, 0x07, // Publication field 4 (data): 7 bytes
    ];
    expected.extend_from_slice(br#"{"a":1}"#);
    expected.extend_from_slice(&[0x30, 0x07]); // Publication field 6 (offset): 7
    assert_eq!(encode_publication_push_proto("ch", &publication), expected);

    let push = client::Reply::push(client::Push {
        channel: "ch".into(),
        publication: Some(publication),
        ..Default::default()
    });
    assert_eq!(encode_reply(&(&push).into()), expected);
}

#[test]
fn golden_error_reply() {
    let reply = client::Reply::error(3, crate::ErrorCode::TOO_MANY_REQUESTS);
    let mut expected = vec![0x1b, 0x08, 0x03, 0x12, 0x17, 0x08, 0x6f, 0x12, 0x11];
    expected.extend_from_slice(b"too many requests");
    expected.extend_from_slice(&[0x18, 0x01]);
    assert_eq!(encode_reply(&(&reply).into()), expected);
}

#[test]
fn ping_and_pong() {
    assert_eq!(encode_reply(&Reply::default()), PING);
    let cmds = commands(&[0x00]).unwrap();
    assert_eq!(cmds, vec![Command::default()]);
    let cmd: client::Command = cmds.into_iter().next().unwrap().into();
    assert!(cmd.is_pong());
}

#[test]
fn several_commands_in_one_frame() {
    let a = Command {
        id: 1,
        connect: Some(ConnectRequest {
            token: "tok".into(),
            name: "java".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let b = Command {
        id: 2,
        subscribe: Some(SubscribeRequest {
            channel: "news".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let frame = concat([
        encode_command(&a),
        encode_command(&b),
        Bytes::from_static(&[0]),
    ]);
    assert_eq!(commands(&frame).unwrap(), vec![a, b, Command::default()]);
    assert!(commands(&[]).unwrap().is_empty());
}

#[test]
fn several_replies_in_one_frame() {
    let parts = [
        encode_reply(&Reply {
            id: 1,
            publish: Some(PublishResult {}),
            ..Default::default()
        }),
        Bytes::from_static(PING),
        encode_join_leave_push_proto(
            "room",
            &client::ClientInfo {
                user: "u".into(),
                client: "c".into(),
                ..Default::default()
            },
            false,
        ),
    ];
    let got = replies(&concat(&parts));
    assert_eq!(got.len(), 3);
    assert!(got[0].publish.is_some() && got[0].id == 1);
    assert_eq!(got[1], Reply::default());
    let push = got[2].push.as_ref().unwrap();
    assert_eq!(push.channel, "room");
    assert_eq!(
        push.leave.as_ref().unwrap().info.as_ref().unwrap().user,
        "u"
    );
    assert!(push.join.is_none());
}

#[test]
fn malformed_frames() {
    let body = encode_command(&Command {
        id: 5,
        ..Default::default()
    });
    let mut two = body.to_vec();
    two.push(0x80); // a second message whose length prefix is cut off
    type Check = fn(&FrameError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        ("truncated varint", vec![0x80], |e| {
            matches!(e, FrameError::TruncatedLength { index: 0 })
        }),
        ("truncated varint after a message", two, |e| {
            matches!(e, FrameError::TruncatedLength { index: 1 })
        }),
        ("length past frame", vec![0x05, 0x08, 0x01], |e| {
            matches!(
                e,
                FrameError::PastEnd {
                    index: 0,
                    declared: 5,
                    available: 2
                }
            )
        }),
        (
            "u64::MAX length",
            vec![
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00,
            ],
            |e| {
                matches!(
                    e,
                    FrameError::TooLarge {
                        index: 0,
                        declared: u64::MAX
                    }
                )
            },
        ),
        (
            "length just over the protobuf limit",
            vec![0x80, 0x80, 0x80, 0x80, 0x08],
            |e| {
                matches!(
                    e,
                    FrameError::TooLarge {
                        declared: 0x8000_0000,
                        ..
                    }
                )
            },
        ),
        (
            "10-byte varint overflow",
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
            |e| matches!(e, FrameError::LengthOverflow { index: 0 }),
        ),
        (
            "11-byte varint",
            vec![
                0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
            ],
            |e| matches!(e, FrameError::LengthOverflow { index: 0 }),
        ),
        ("garbage body", vec![0x03, 0xff, 0xff, 0xff], |e| {
            matches!(e, FrameError::Invalid { index: 0, .. })
        }),
        (
            "field length past its message",
            vec![0x03, 0x22, 0x10, 0x0a],
            |e| matches!(e, FrameError::Invalid { index: 0, .. }),
        ),
        (
            "string field that is not UTF-8",
            vec![0x05, 0x22, 0x03, 0x0a, 0x01, 0xff],
            |e| matches!(e, FrameError::Invalid { index: 0, .. }),
        ),
    ];
    for (name, frame, check) in cases {
        let mut it = decode_commands(&frame);
        let mut first_err = None;
        for item in it.by_ref() {
            if let Err(e) = item {
                first_err = Some(e);
                break;
            }
        }
        let err = first_err.unwrap_or_else(|| panic!("{name}: no error"));
        assert!(check(&err), "{name}: {err}");
        assert!(
            it.next().is_none(),
            "{name}: iterator goes on after an error"
        );
    }
}

#[test]
fn unknown_fields_are_ignored() {
    // Command{id: 4, ping: {}} plus field 99 (varint) and field 100 (bytes) from a newer
    // client.
    let body = [
        0x08, 0x04, 0x5a, 0x00, 0x98, 0x06, 0x01, 0xa2, 0x06, 0x01, 0x00,
    ];
    let mut frame = vec![body.len() as u8];
    frame.extend_from_slice(&body);
    let cmd = commands(&frame).unwrap().remove(0);
    assert_eq!(cmd.id, 4);
    assert!(cmd.ping.is_some());
}

/// Every command kind: encoded, decoded and converted to the JSON-side command.
#[test]
fn command_round_trips() {
    let all = Command {
        id: 9,
        connect: Some(ConnectRequest {
            token: "tok".into(),
            data: br#"{"x":1}"#.to_vec(),
            subs: [(
                "a".to_string(),
                SubscribeRequest {
                    recover: true,
                    offset: 3,
                    epoch: "e".into(),
                    ..Default::default()
                },
            )]
            .into(),
            name: "dart".into(),
            version: "1.0".into(),
            headers: [("Cookie".to_string(), "session=1".to_string())].into(),
        }),
        subscribe: Some(SubscribeRequest {
            channel: "c".into(),
            token: "st".into(),
            recover: true,
            epoch: "ep".into(),
            offset: u64::MAX,
            data: b"[1,2]".to_vec(),
            positioned: true,
            recoverable: true,
            join_leave: true,
            delta: "fossil".into(),
            flag: 3,
        }),
        unsubscribe: Some(UnsubscribeRequest {
            channel: "u".into(),
        }),
        publish: Some(PublishRequest {
            channel: "p".into(),
            data: br#""hi""#.to_vec(),
        }),
        presence: Some(PresenceRequest {
            channel: "pr".into(),
        }),
        presence_stats: Some(PresenceStatsRequest {
            channel: "ps".into(),
        }),
        history: Some(HistoryRequest {
            channel: "h".into(),
            limit: -1,
            since: Some(StreamPosition {
                offset: 10,
                epoch: "he".into(),
            }),
            reverse: true,
        }),
        ping: Some(PingRequest {}),
        send: Some(SendRequest {
            data: b"7".to_vec(),
        }),
        rpc: Some(RpcRequest {
            data: b"null".to_vec(),
            method: "m".into(),
        }),
        refresh: Some(RefreshRequest { token: "rt".into() }),
        sub_refresh: Some(SubRefreshRequest {
            channel: "sr".into(),
            token: "srt".into(),
        }),
    };
    let decoded = commands(&encode_command(&all)).unwrap().remove(0);
    assert_eq!(decoded, all);

    let c: client::Command = decoded.into();
    assert_eq!(c.id, 9);
    let connect = c.connect.unwrap();
    assert_eq!(
        (
            connect.token.as_str(),
            connect.name.as_str(),
            connect.version.as_str()
        ),
        ("tok", "dart", "1.0")
    );
    assert_eq!(connect.data.unwrap().get(), r#"{"x":1}"#);
    assert_eq!(connect.headers["Cookie"], "session=1");
    assert!(connect.subs["a"].recover && connect.subs["a"].offset == 3);
    let sub = c.subscribe.unwrap();
    assert_eq!((sub.channel.as_str(), sub.token.as_str()), ("c", "st"));
    assert!(sub.recover && sub.positioned && sub.recoverable && sub.join_leave);
    assert_eq!((sub.epoch.as_str(), sub.offset), ("ep", u64::MAX));
    assert_eq!(sub.data.unwrap().get(), "[1,2]");
    assert_eq!(c.unsubscribe.unwrap().channel, "u");
    let publish = c.publish.unwrap();
    assert_eq!(publish.channel, "p");
    assert_eq!(publish.data.unwrap().get(), r#""hi""#);
    assert!(!publish.binary);
    assert_eq!(c.presence.unwrap().channel, "pr");
    assert_eq!(c.presence_stats.unwrap().channel, "ps");
    let history = c.history.unwrap();
    assert_eq!((history.channel.as_str(), history.limit), ("h", -1));
    assert!(history.reverse);
    let since = history.since.unwrap();
    assert_eq!((since.offset, since.epoch.as_str()), (10, "he"));
    assert!(c.ping.is_some());
    assert_eq!(c.send.unwrap().data.unwrap().get(), "7");
    let rpc = c.rpc.unwrap();
    assert_eq!(
        (rpc.method.as_str(), rpc.data.unwrap().get()),
        ("m", "null")
    );
    assert_eq!(c.refresh.unwrap().token, "rt");
    let sr = c.sub_refresh.unwrap();
    assert_eq!((sr.channel.as_str(), sr.token.as_str()), ("sr", "srt"));
}

#[test]
fn empty_request_data_is_absent() {
    let cmd = Command {
        id: 1,
        publish: Some(PublishRequest {
            channel: "p".into(),
            data: Vec::new(),
        }),
        ..Default::default()
    };
    let c: client::Command = cmd.into();
    let p = c.publish.unwrap();
    assert!(p.data.is_none() && !p.binary);
}

fn sample_publication(offset: u64) -> client::Publication {
    client::Publication {
        data: raw(r#"{"n":1}"#),
        info: Some(client::ClientInfo {
            user: "42".into(),
            client: "cid".into(),
            conn_info: Some(raw(r#"{"name":"Ann"}"#)),
            chan_info: Some(raw("[1]")),
        }),
        offset,
        tags: [("k".to_string(), "v".to_string())].into(),
        time: 1_700_000_000_000,
        binary: false,
        delta: false,
    }
}

fn check_publication(p: &Publication, offset: u64) {
    assert_eq!(p.data, br#"{"n":1}"#);
    assert_eq!(p.offset, offset);
    assert_eq!(p.tags.get("k").map(String::as_str), Some("v"));
    assert_eq!(p.time, 1_700_000_000_000);
    let info = p.info.as_ref().unwrap();
    assert_eq!((info.user.as_str(), info.client.as_str()), ("42", "cid"));
    assert_eq!(info.conn_info, br#"{"name":"Ann"}"#);
    assert_eq!(info.chan_info, b"[1]");
}

/// Encodes a JSON-side reply in Protobuf and decodes it back.
fn through_proto(reply: &client::Reply) -> Reply {
    let proto: Reply = reply.into();
    let back = replies(&encode_reply(&proto)).remove(0);
    assert_eq!(back, proto);
    back
}

/// Every reply and push kind the session sends.
#[test]
fn reply_round_trips() {
    let sub_result = client::SubscribeResult {
        expires: true,
        ttl: 60,
        recoverable: true,
        epoch: "ep".into(),
        offset: 5,
        publications: vec![sample_publication(4), sample_publication(5)],
        recovered: true,
        was_recovering: true,
        positioned: true,
        data: Some(raw(r#"{"s":1}"#)),
        delta: true,
    };

    let r = through_proto(&client::Reply {
        id: 1,
        connect: Some(client::ConnectResult {
            client: "cid".into(),
            version: "0.1.0".into(),
            expires: true,
            ttl: 30,
            data: Some(raw(r#"{"d":2}"#)),
            subs: [("srv".to_string(), sub_result.clone())].into(),
            ping: 25,
            pong: true,
            session: "sess".into(),
            node: "n1".into(),
        }),
        ..Default::default()
    });
    let c = r.connect.unwrap();
    assert_eq!(
        (r.id, c.client.as_str(), c.version.as_str()),
        (1, "cid", "0.1.0")
    );
    assert!(c.expires && c.pong);
    assert_eq!((c.ttl, c.ping), (30, 25));
    assert_eq!((c.session.as_str(), c.node.as_str()), ("sess", "n1"));
    assert_eq!(c.data, br#"{"d":2}"#);
    assert_eq!(c.subs["srv"].publications.len(), 2);

    let r = through_proto(&client::Reply {
        id: 2,
        subscribe: Some(sub_result.clone()),
        ..Default::default()
    });
    let s = r.subscribe.unwrap();
    assert!(s.expires && s.recoverable && s.recovered && s.was_recovering && s.positioned);
    assert_eq!((s.ttl, s.epoch.as_str(), s.offset), (60, "ep", 5));
    assert_eq!(s.data, br#"{"s":1}"#);
    check_publication(&s.publications[0], 4);
    check_publication(&s.publications[1], 5);

    let r = through_proto(&client::Reply {
        id: 3,
        unsubscribe: Some(client::Empty {}),
        ..Default::default()
    });
    assert!(r.unsubscribe.is_some());
    let r = through_proto(&client::Reply {
        id: 4,
        publish: Some(client::Empty {}),
        ..Default::default()
    });
    assert!(r.publish.is_some());

    let r = through_proto(&client::Reply {
        id: 5,
        presence: Some(client::PresenceResult {
            presence: [("cid".to_string(), sample_publication(0).info.unwrap())].into(),
        }),
        ..Default::default()
    });
    assert_eq!(r.presence.unwrap().presence["cid"].user, "42");

    let r = through_proto(&client::Reply {
        id: 6,
        presence_stats: Some(client::PresenceStatsResult {
            num_clients: 3,
            num_users: 2,
        }),
        ..Default::default()
    });
    let ps = r.presence_stats.unwrap();
    assert_eq!((ps.num_clients, ps.num_users), (3, 2));

    let r = through_proto(&client::Reply {
        id: 7,
        history: Some(client::HistoryResult {
            publications: vec![sample_publication(9)],
            epoch: "he".into(),
            offset: 9,
        }),
        ..Default::default()
    });
    let h = r.history.unwrap();
    assert_eq!((h.epoch.as_str(), h.offset), ("he", 9));
    check_publication(&h.publications[0], 9);

    let r = through_proto(&client::Reply {
        id: 8,
        rpc: Some(client::RpcResult {
            data: Some(raw("[true]")),
        }),
        ..Default::default()
    });
    assert_eq!(r.rpc.unwrap().data, b"[true]");

    let r = through_proto(&client::Reply {
        id: 9,
        refresh: Some(client::RefreshResult {
            expires: true,
            ttl: 99,
        }),
        sub_refresh: Some(client::RefreshResult {
            expires: true,
            ttl: 77,
        }),
        ..Default::default()
    });
    let (rf, sr) = (r.refresh.unwrap(), r.sub_refresh.unwrap());
    assert!(rf.expires && sr.expires);
    assert_eq!((rf.ttl, sr.ttl), (99, 77));

    let r = through_proto(&client::Reply::error(10, crate::ErrorCode::INTERNAL));
    let e = r.error.unwrap();
    assert_eq!(
        (e.code, e.message.as_str(), e.temporary),
        (100, "internal server error", true)
    );

    // Pushes.
    let info = sample_publication(0).info.unwrap();
    let push = |p: client::Push| through_proto(&client::Reply::push(p)).push.unwrap();
    let p = push(client::Push {
        channel: "c".into(),
        publication: Some(sample_publication(11)),
        ..Default::default()
    });
    assert_eq!(p.channel, "c");
    check_publication(p.r#pub.as_ref().unwrap(), 11);
    let p = push(client::Push {
        channel: "c".into(),
        join: Some(client::JoinLeave { info: info.clone() }),
        ..Default::default()
    });
    assert_eq!(p.join.unwrap().info.unwrap().client, "cid");
    let p = push(client::Push {
        channel: "c".into(),
        leave: Some(client::JoinLeave { info: info.clone() }),
        ..Default::default()
    });
    assert_eq!(p.leave.unwrap().info.unwrap().client, "cid");
    let p = push(client::Push {
        channel: "c".into(),
        unsubscribe: Some(client::UnsubscribePush {
            code: 2500,
            reason: "insufficient state".into(),
        }),
        ..Default::default()
    });
    let u = p.unsubscribe.unwrap();
    assert_eq!((u.code, u.reason.as_str()), (2500, "insufficient state"));
    let p = push(client::Push {
        message: Some(client::MessagePush {
            data: raw(r#"{"m":1}"#),
        }),
        ..Default::default()
    });
    assert_eq!(p.message.unwrap().data, br#"{"m":1}"#);
    let p = push(client::Push {
        channel: "srv".into(),
        subscribe: Some(sub_result),
        ..Default::default()
    });
    let s = p.subscribe.unwrap();
    assert!(s.recoverable && s.positioned);
    assert_eq!((s.epoch.as_str(), s.offset), ("ep", 5));
    assert_eq!(s.data, br#"{"s":1}"#);
    let p = push(client::Push {
        disconnect: Some(client::DisconnectPush {
            code: 3001,
            reason: "shutdown".into(),
            reconnect: true,
        }),
        ..Default::default()
    });
    let d = p.disconnect.unwrap();
    assert_eq!(
        (d.code, d.reason.as_str(), d.reconnect),
        (3001, "shutdown", true)
    );
    let p = push(client::Push {
        refresh: Some(client::RefreshResult {
            expires: true,
            ttl: 5,
        }),
        ..Default::default()
    });
    let rf = p.refresh.unwrap();
    assert!(rf.expires && rf.ttl == 5);
}

#[test]
fn publication_push_fast_path_matches_the_general_path() {
    let publication = sample_publication(3);
    let general = encode_reply(
        &(&client::Reply::push(client::Push {
            channel: "news".into(),
            publication: Some(publication.clone()),
            ..Default::default()
        }))
            .into(),
    );
    assert_eq!(encode_publication_push_proto("news", &publication), general);
}

/// A Protobuf client publishes: JSON bytes stay JSON, anything else is carried losslessly.
#[test]
fn binary_data_rule() {
    let publish = |data: &[u8]| -> client::PublishRequest {
        let c: client::Command = Command {
            id: 1,
            publish: Some(PublishRequest {
                channel: "c".into(),
                data: data.to_vec(),
            }),
            ..Default::default()
        }
        .into();
        c.publish.unwrap()
    };

    // JSON passes through (on one line, as relayed JSON always is).
    let p = publish(b"{\"a\":\n [1, 2]}");
    assert_eq!(
        (p.data.unwrap().get(), p.binary),
        ("{\"a\":  [1, 2]}", false)
    );

    // Not JSON: invalid UTF-8, plain text, too deep.
    let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
    for bytes in [&[0u8, 0xff, 0x10][..], b"hello", deep.as_bytes()] {
        let p = publish(bytes);
        assert!(p.binary);
        let data = p.data.unwrap();
        // The JSON side holds a base64 string: valid JSON whatever the bytes.
        assert!(serde_json::from_str::<String>(data.get()).is_ok());

        // The session marks the publication; every path gets the right form.
        let publication = client::Publication {
            data,
            info: None,
            offset: 1,
            tags: BTreeMap::new(),
            time: 0,
            binary: p.binary,
            delta: false,
        };
        assert_eq!(publication.payload(), bytes);
        let proto = replies(&encode_publication_push_proto("c", &publication)).remove(0);
        assert_eq!(proto.push.unwrap().r#pub.unwrap().data, bytes);

        let json = client::encode_publication_push("c", &publication);
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["push"]["pub"]["binary"], true);
        assert!(v["push"]["pub"]["data"].is_string());

        // History and Redis keep publications as JSON: the flag survives.
        let stored = serde_json::to_vec(&publication).unwrap();
        let back: client::Publication = serde_json::from_slice(&stored).unwrap();
        assert_eq!(back, publication);
        assert_eq!(back.payload(), bytes);
    }
    assert_eq!(publish(b"\x00\x01\x02").data.unwrap().get(), r#""AAEC""#);
}

#[test]
fn json_publications_encode_as_before() {
    // No `binary` key unless set: the JSON encoding of JSON data is unchanged.
    let publication = client::Publication {
        data: raw(r#"{"a":1}"#),
        info: None,
        offset: 7,
        tags: BTreeMap::new(),
        time: 0,
        binary: false,
        delta: false,
    };
    assert_eq!(
        client::encode_publication_push("news", &publication),
        br#"{"push":{"channel":"news","pub":{"data":{"a":1},"offset":7}}}"#.as_slice()
    );
    assert_eq!(publication.payload(), br#"{"a":1}"#.as_slice());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(frame in proptest::collection::vec(any::<u8>(), 0..256)) {
        for cmd in decode_commands(&frame) {
            match cmd {
                Ok(cmd) => {
                    let _: client::Command = cmd.into();
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
        let _ = decode_replies(&frame).count();
    }

    #[test]
    fn framed_commands_round_trip(
        ids in proptest::collection::vec(any::<u32>(), 0..8),
        channel in ".{0,40}",
        data in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let cmds: Vec<Command> = ids
            .iter()
            .map(|&id| Command {
                id,
                publish: Some(PublishRequest { channel: channel.clone(), data: data.clone() }),
                ..Default::default()
            })
            .collect();
        let frame = concat(cmds.iter().map(encode_command));
        prop_assert_eq!(commands(&frame).unwrap(), cmds);
    }
}
