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
    let channel = serde_json::Value::from(channel);
    match token {
        Some(t) => format!(
            "{{\"id\":1,\"connect\":{{\"token\":{}}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":{channel}}}}}",
            serde_json::Value::from(t)
        ),
        None => format!(
            "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":{channel}}}}}"
        ),
    }
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
    },
    /// Any other push (join, leave, unsubscribe, disconnect, …), by kind.
    OtherPush(&'static str),
}

/// Fast path for the common line, a publication push: the `data` of
/// `{"push":{"channel":…,"pub":{"data":{…},…}}}` when it is one of our (flat) payloads.
/// Keeps the generator's per-delivery cost for Herald close to that for NATS and MQTT,
/// whose framing is cheaper to parse; anything unexpected returns `None` and goes
/// through [`parse_line`].
pub fn fast_publication(line: &str) -> Option<&[u8]> {
    const KEY: &str = "\"pub\":{\"data\":";
    if !line.starts_with("{\"push\":") {
        return None;
    }
    let start = line.find(KEY)? + KEY.len();
    let rest = &line.as_bytes()[start..];
    // Our payload is a flat object: it ends at the first closing brace.
    let end = rest.iter().position(|b| *b == b'}')? + 1;
    let data = &rest[..end];
    crate::payload::decode(data).map(|_| data)
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
}

/// An HS256 connection token for user `sub`, valid for `ttl_s` seconds.
pub fn make_token(secret: &[u8], sub: &str, ttl_s: u64) -> Result<String, BenchError> {
    let now = crate::payload::now_ns() / 1_000_000_000;
    let claims = Claims {
        sub,
        exp: now + ttl_s,
        iat: now,
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
        let f = connect_frame(None, "c");
        assert!(f.starts_with("{\"id\":1,\"connect\":{}}\n"));
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
            Line::Publication { channel, data } => {
                assert_eq!(channel, "bench-0");
                assert_eq!(data, br#"{"t":1,"s":2,"c":0}"#);
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
        assert_eq!(fast_publication(&line), Some(p.as_bytes()));
        match parse_line(&line).unwrap() {
            Line::Publication { data, .. } => assert_eq!(data, p.as_bytes()),
            other => panic!("{other:?}"),
        }
        // Not ours, or not a publication: left to the full parser.
        assert_eq!(
            fast_publication(r#"{"push":{"channel":"x","pub":{"data":{"a":{"b":1}}}}}"#),
            None
        );
        assert_eq!(fast_publication(r#"{"id":1,"connect":{}}"#), None);
        assert_eq!(fast_publication("{}"), None);
    }

    #[test]
    fn token_is_hs256_with_sub_and_exp() {
        use jsonwebtoken::{DecodingKey, Validation, decode};
        let t = make_token(b"bench-secret", "user-1", 60).unwrap();
        #[derive(Deserialize)]
        struct C {
            sub: String,
            exp: u64,
        }
        let d = decode::<C>(
            &t,
            &DecodingKey::from_secret(b"bench-secret"),
            &Validation::new(jsonwebtoken::Algorithm::HS256),
        )
        .unwrap();
        assert_eq!(d.claims.sub, "user-1");
        assert!(d.claims.exp > 0);
    }
}
