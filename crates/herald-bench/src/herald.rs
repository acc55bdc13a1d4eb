//! Herald's client protocol (Centrifugo protocol v2, JSON) as far as a benchmark
//! subscriber needs it, and connection tokens.

use std::borrow::Cow;

use jsonwebtoken::{EncodingKey, Header, encode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::BenchError;

/// The connect and subscribe commands in one frame, `\n`-separated, as centrifuge-js
/// sends them: one round trip for both.
pub fn connect_frame(token: Option<&str>, channel: &str) -> String {
    frame(token, channel, None)
}

/// Where a subscriber is in its channel's stream: what it asks to recover from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// The connect and a recoverable subscribe in one frame, as a reconnecting SDK sends them:
/// from `from` when the subscriber has a position, else from now on; the server-side
/// subscriptions the connection had (`server_subs`) recover from theirs.
pub fn reconnect_frame(
    token: Option<&str>,
    channel: &str,
    from: Option<&Position>,
    server_subs: &[(String, Position)],
) -> String {
    frame(token, channel, Some((from, server_subs)))
}

/// Where a reconnecting client's subscription was (if anywhere), and its server-side ones.
type Recovery<'a> = (Option<&'a Position>, &'a [(String, Position)]);

/// Connect and subscribe; `recovery` makes the subscription recoverable.
fn frame(token: Option<&str>, channel: &str, recovery: Option<Recovery<'_>>) -> String {
    let mut connect = serde_json::json!({"id": 1, "connect": {}});
    if let Some(t) = token {
        connect["connect"]["token"] = t.into();
    }
    let mut subscribe = serde_json::json!({"id": 2, "subscribe": {"channel": channel}});
    if let Some((from, server_subs)) = recovery {
        if !server_subs.is_empty() {
            let subs: serde_json::Map<String, serde_json::Value> = server_subs
                .iter()
                .map(|(ch, p)| {
                    let sub =
                        serde_json::json!({"recover": true, "epoch": p.epoch, "offset": p.offset});
                    (ch.clone(), sub)
                })
                .collect();
            connect["connect"]["subs"] = subs.into();
        }
        let sub = &mut subscribe["subscribe"];
        sub["recoverable"] = true.into();
        if let Some(p) = from {
            sub["recover"] = true.into();
            sub["epoch"] = p.epoch.clone().into();
            sub["offset"] = p.offset.into();
        }
    }
    format!("{connect}\n{subscribe}")
}

/// What a subscribe reply says about the stream: its position, whether the asked-for
/// recovery was complete, and the publications recovered (data, offset), oldest first.
#[derive(Debug, Default)]
pub struct SubscribeResult {
    pub position: Option<Position>,
    pub recovered: bool,
    pub publications: Vec<(Vec<u8>, u64)>,
}

#[derive(Deserialize)]
struct SubReply<'a> {
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    recoverable: bool,
    #[serde(default)]
    positioned: bool,
    #[serde(default)]
    recovered: bool,
    #[serde(default, borrow)]
    publications: Vec<Publication<'a>>,
}

impl SubReply<'_> {
    fn result(self) -> SubscribeResult {
        SubscribeResult {
            position: (self.recoverable || self.positioned || !self.epoch.is_empty()).then_some(
                Position {
                    epoch: self.epoch,
                    offset: self.offset,
                },
            ),
            recovered: self.recovered,
            publications: self
                .publications
                .iter()
                .map(|p| (p.data.get().as_bytes().to_vec(), p.offset))
                .collect(),
        }
    }
}

/// The server-side subscriptions of a connect reply line (`{"id":…,"connect":{"subs":…}}`),
/// by channel, if it is one.
pub fn connect_subs(line: &str) -> Option<Vec<(String, SubscribeResult)>> {
    #[derive(Deserialize)]
    struct Reply<'a> {
        #[serde(borrow)]
        connect: Option<Connect<'a>>,
    }
    #[derive(Deserialize)]
    struct Connect<'a> {
        #[serde(default, borrow)]
        subs: std::collections::BTreeMap<String, SubReply<'a>>,
    }
    let r: Reply<'_> = serde_json::from_str(line.trim()).ok()?;
    Some(
        r.connect?
            .subs
            .into_iter()
            .map(|(ch, s)| (ch, s.result()))
            .collect(),
    )
}

/// The result of a subscribe reply line (`{"id":…,"subscribe":{…}}`), if it is one.
pub fn subscribe_result(line: &str) -> Option<SubscribeResult> {
    #[derive(Deserialize)]
    struct Reply<'a> {
        #[serde(borrow)]
        subscribe: Option<SubReply<'a>>,
    }
    let r: Reply<'_> = serde_json::from_str(line.trim()).ok()?;
    Some(r.subscribe?.result())
}

/// A server message: a reply (with `id`), a push, or the empty ping `{}`.
#[derive(Debug, Deserialize)]
pub struct ServerMsg<'a> {
    #[serde(default)]
    pub id: u64,
    #[serde(default, borrow)]
    pub error: Option<ReplyError<'a>>,
    #[serde(default, borrow)]
    pub push: Option<Push<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct ReplyError<'a> {
    #[serde(default)]
    pub code: u32,
    #[serde(default, borrow)]
    pub message: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
pub struct Push<'a> {
    #[serde(default, borrow)]
    pub channel: Cow<'a, str>,
    #[serde(rename = "pub", default, borrow)]
    pub publication: Option<Publication<'a>>,
    #[serde(default, borrow)]
    pub disconnect: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub unsubscribe: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
pub struct Publication<'a> {
    #[serde(borrow)]
    pub data: &'a RawValue,
    #[serde(default)]
    pub offset: u64,
}

/// What one line of a server frame means to the subscriber.
#[derive(Debug)]
pub enum Line<'a> {
    /// `{}`: a ping; answer with `{}`.
    Ping,
    Reply {
        id: u64,
        error: Option<ReplyError<'a>>,
    },
    Publication {
        channel: Cow<'a, str>,
        data: &'a [u8],
        offset: u64,
    },
    /// Any other push (join, leave, unsubscribe, disconnect, …), by kind.
    OtherPush(&'static str),
}

/// Fast path for the common line, a publication push: the `data` of
/// `{"push":{"channel":…,"pub":{"data":{…},"offset":N}}}` when it is one of our (flat)
/// payloads, and the offset (0 when absent). Keeps the generator's per-delivery cost for
/// Herald close to that for NATS and MQTT, whose framing is cheaper to parse; anything
/// unexpected returns `None` and goes through [`parse_line`].
pub fn fast_publication(line: &str) -> Option<(&[u8], u64)> {
    const KEY: &str = "\"pub\":{\"data\":";
    const OFFSET: &[u8] = b",\"offset\":";
    if !line.starts_with("{\"push\":") {
        return None;
    }
    let start = line.find(KEY)? + KEY.len();
    let rest = &line.as_bytes()[start..];
    // Our payload is a flat object: it ends at the first closing brace.
    let end = rest.iter().position(|b| *b == b'}')? + 1;
    let data = &rest[..end];
    crate::payload::decode(data)?;
    let offset = match rest[end..].strip_prefix(OFFSET) {
        Some(tail) => {
            let digits = tail.iter().take_while(|b| b.is_ascii_digit()).count();
            std::str::from_utf8(&tail[..digits]).ok()?.parse().ok()?
        }
        None => 0,
    };
    Some((data, offset))
}

/// Parses one `\n`-separated line of a server frame.
pub fn parse_line(line: &str) -> Result<Line<'_>, BenchError> {
    let line = line.trim();
    if line == "{}" {
        return Ok(Line::Ping);
    }
    let msg: ServerMsg<'_> = serde_json::from_str(line)?;
    if let Some(push) = msg.push {
        if let Some(p) = push.publication {
            return Ok(Line::Publication {
                channel: push.channel,
                data: p.data.get().as_bytes(),
                offset: p.offset,
            });
        }
        let kind = if push.disconnect.is_some() {
            "disconnect"
        } else if push.unsubscribe.is_some() {
            "unsubscribe"
        } else {
            "other"
        };
        return Ok(Line::OtherPush(kind));
    }
    if msg.id == 0 && msg.error.is_none() {
        // Unknown fields only: treat as a ping-like keepalive from a newer server.
        return Ok(Line::Ping);
    }
    Ok(Line::Reply {
        id: msg.id,
        error: msg.error,
    })
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    /// Server-side subscriptions.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    channels: &'a [String],
}

/// An HS256 connection token for user `sub`, valid for `ttl_s` seconds.
pub fn make_token(
    secret: &[u8],
    sub: &str,
    ttl_s: u64,
    channels: &[String],
) -> Result<String, BenchError> {
    let now = crate::payload::now_ns() / 1_000_000_000;
    let claims = Claims {
        sub,
        exp: now + ttl_s,
        iat: now,
        channels,
    };
    Ok(encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_frame_is_two_json_lines() {
        let f = connect_frame(Some("t\"k"), "bench-1");
        let lines: Vec<serde_json::Value> = f
            .split('\n')
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["id"], 1);
        assert_eq!(lines[0]["connect"]["token"], "t\"k");
        assert_eq!(lines[1]["subscribe"]["channel"], "bench-1");
        let first: serde_json::Value =
            serde_json::from_str(connect_frame(None, "c").split('\n').next().unwrap()).unwrap();
        assert_eq!(first, serde_json::json!({"id": 1, "connect": {}}));
        assert!(lines[1]["subscribe"].get("recoverable").is_none());
    }

    #[test]
    fn parses_replies_pushes_and_pings() {
        assert!(matches!(parse_line("{}").unwrap(), Line::Ping));
        match parse_line(
            r#"{"id":1,"connect":{"client":"x","version":"0.1","ping":25,"pong":true}}"#,
        )
        .unwrap()
        {
            Line::Reply { id: 1, error: None } => {}
            other => panic!("{other:?}"),
        }
        match parse_line(r#"{"id":2,"error":{"code":103,"message":"permission denied"}}"#).unwrap()
        {
            Line::Reply {
                id: 2,
                error: Some(e),
            } => {
                assert_eq!(e.code, 103);
                assert_eq!(e.message, "permission denied");
            }
            other => panic!("{other:?}"),
        }
        match parse_line(
            r#"{"push":{"channel":"bench-0","pub":{"data":{"t":1,"s":2,"c":0},"offset":3}}}"#,
        )
        .unwrap()
        {
            Line::Publication {
                channel,
                data,
                offset,
            } => {
                assert_eq!(channel, "bench-0");
                assert_eq!(data, br#"{"t":1,"s":2,"c":0}"#);
                assert_eq!(offset, 3);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_line(r#"{"push":{"channel":"x","unsubscribe":{"code":2000}}}"#).unwrap(),
            Line::OtherPush("unsubscribe")
        ));
        assert!(parse_line("{not json").is_err());
    }

    #[test]
    fn fast_path_agrees_with_the_parser() {
        let mut payload = Vec::new();
        crate::payload::encode(
            &mut payload,
            &crate::payload::Stamp { t: 5, s: 6, c: 7 },
            128,
        );
        let p = String::from_utf8(payload).unwrap();
        let line = format!(r#"{{"push":{{"channel":"bench-7","pub":{{"data":{p},"offset":9}}}}}}"#);
        assert_eq!(fast_publication(&line), Some((p.as_bytes(), 9)));
        match parse_line(&line).unwrap() {
            Line::Publication { data, offset, .. } => assert_eq!((data, offset), (p.as_bytes(), 9)),
            other => panic!("{other:?}"),
        }
        let unpositioned = format!(r#"{{"push":{{"channel":"bench-7","pub":{{"data":{p}}}}}}}"#);
        assert_eq!(fast_publication(&unpositioned), Some((p.as_bytes(), 0)));
        // Not ours, or not a publication: left to the full parser.
        assert_eq!(
            fast_publication(r#"{"push":{"channel":"x","pub":{"data":{"a":{"b":1}}}}}"#),
            None
        );
        assert_eq!(fast_publication(r#"{"id":1,"connect":{}}"#), None);
        assert_eq!(fast_publication("{}"), None);
    }

    #[test]
    fn a_reconnect_asks_to_recover_and_reads_what_was_recovered() {
        let from = Position {
            epoch: "ep".into(),
            offset: 41,
        };
        let f = reconnect_frame(
            Some("tk"),
            "bench-0",
            Some(&from),
            &[("#u".into(), from.clone())],
        );
        let lines: Vec<serde_json::Value> = f
            .split('\n')
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["connect"]["token"], "tk");
        assert_eq!(
            lines[0]["connect"]["subs"]["#u"],
            serde_json::json!({"recover": true, "epoch": "ep", "offset": 41})
        );
        let sub = &lines[1]["subscribe"];
        assert_eq!(
            (&sub["recover"], &sub["epoch"], &sub["offset"]),
            (
                &serde_json::json!(true),
                &serde_json::json!("ep"),
                &serde_json::json!(41)
            )
        );
        let r = subscribe_result(
            r#"{"id":2,"subscribe":{"recoverable":true,"epoch":"ep","offset":43,"recovered":true,"publications":[{"data":{"s":1},"offset":42},{"data":{"s":2},"offset":43}]}}"#,
        )
        .unwrap();
        assert!(r.recovered);
        assert_eq!(
            r.position,
            Some(Position {
                epoch: "ep".into(),
                offset: 43
            })
        );
        assert_eq!(
            r.publications,
            vec![(br#"{"s":1}"#.to_vec(), 42), (br#"{"s":2}"#.to_vec(), 43)]
        );
        assert!(subscribe_result(r#"{"id":1,"connect":{}}"#).is_none());
        let subs = connect_subs(
            r##"{"id":1,"connect":{"client":"c","subs":{"#u":{"recoverable":true,"epoch":"e","offset":7,"recovered":true,"publications":[{"data":{"s":1},"offset":7}]}}}}"##,
        )
        .unwrap();
        assert_eq!(subs.len(), 1);
        assert_eq!(subs[0].0, "#u");
        assert_eq!(
            subs[0].1.position,
            Some(Position {
                epoch: "e".into(),
                offset: 7
            })
        );
        assert_eq!(subs[0].1.publications, vec![(br#"{"s":1}"#.to_vec(), 7)]);
    }

    #[test]
    fn token_is_hs256_with_sub_and_exp() {
        use jsonwebtoken::{DecodingKey, Validation, decode};
        let t = make_token(b"bench-secret", "user-1", 60, &[]).unwrap();
        #[derive(Deserialize)]
        struct C {
            sub: String,
            exp: u64,
            channels: Option<Vec<String>>,
        }
        let d = decode::<C>(
            &t,
            &DecodingKey::from_secret(b"bench-secret"),
            &Validation::new(jsonwebtoken::Algorithm::HS256),
        )
        .unwrap();
        assert_eq!(d.claims.sub, "user-1");
        assert!(d.claims.exp > 0);
        assert_eq!(
            d.claims.channels, None,
            "no claim when there is nothing to subscribe"
        );
        let t = make_token(b"bench-secret", "user-1", 60, &["news".into()]).unwrap();
        let d = decode::<C>(
            &t,
            &DecodingKey::from_secret(b"bench-secret"),
            &Validation::new(jsonwebtoken::Algorithm::HS256),
        )
        .unwrap();
        assert_eq!(d.claims.channels, Some(vec!["news".to_string()]));
    }
}
