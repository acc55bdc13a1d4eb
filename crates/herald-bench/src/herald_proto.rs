//! Herald's client protocol in its Protobuf form (WebSocket subprotocol
//! `centrifuge-protobuf`, binary frames of varint length-prefixed messages), as far as a
//! benchmark subscriber needs it.
//!
//! Commands are built with the generated types of `herald-protocol`. Server messages are
//! read by a small borrowing wire-format scanner instead of being decoded into
//! `proto::Reply`: decoding would allocate the channel and the data of every delivery,
//! while the JSON side reads publications in place; both must cost the generator about
//! the same per delivery for the comparison to be fair.

use std::borrow::Cow;

use bytes::Bytes;
use herald_protocol::proto::{self, Command, ConnectRequest, SubscribeRequest};

use crate::herald::{Line, ReplyError};

/// The WebSocket subprotocol that selects Protobuf framing.
pub const SUBPROTOCOL: &str = "centrifuge-protobuf";

/// The client's pong: an empty `Command`, length-prefixed.
pub const PONG: &[u8] = &[0];

/// Why a server frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("truncated varint")]
    TruncatedVarint,
    #[error("varint longer than 64 bits")]
    VarintOverflow,
    #[error("declared length {declared}, but only {available} bytes follow")]
    PastEnd { declared: u64, available: usize },
    #[error("unsupported wire type {0}")]
    WireType(u64),
    #[error("invalid field number {0}")]
    FieldNumber(u64),
    #[error("{0} has the wrong wire type")]
    FieldType(&'static str),
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
}

/// The connect and subscribe commands in one binary frame: one round trip for both, as
/// on the JSON side.
pub fn connect_frame(token: Option<&str>, channel: &str) -> Bytes {
    let connect = Command {
        id: 1,
        connect: Some(ConnectRequest {
            token: token.unwrap_or_default().to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let subscribe = Command {
        id: 2,
        subscribe: Some(SubscribeRequest {
            channel: channel.to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    };
    proto::concat([
        proto::encode_command(&connect),
        proto::encode_command(&subscribe),
    ])
}

/// The messages of a server frame, in order, each read as a [`Line`]. A frame cannot be
/// resynchronised after a bad length prefix, so the first error ends the iteration.
pub fn lines(frame: &[u8]) -> Lines<'_> {
    Lines {
        r: Reader { buf: frame },
        failed: false,
    }
}

pub struct Lines<'a> {
    r: Reader<'a>,
    failed: bool,
}

impl<'a> Iterator for Lines<'a> {
    type Item = Result<Line<'a>, ProtoError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.r.buf.is_empty() {
            return None;
        }
        let item = self.r.bytes().and_then(parse_message);
        self.failed = item.is_err();
        Some(item)
    }
}

impl std::iter::FusedIterator for Lines<'_> {}

// Field numbers of the public Centrifugo schema (herald-protocol's proto/client.proto).
const REPLY_ID: u32 = 1;
const REPLY_ERROR: u32 = 2;
const REPLY_PUSH: u32 = 4;
const ERROR_CODE: u32 = 1;
const ERROR_MESSAGE: u32 = 2;
const PUSH_CHANNEL: u32 = 2;
const PUSH_PUB: u32 = 4;
const PUSH_UNSUBSCRIBE: u32 = 7;
const PUSH_DISCONNECT: u32 = 11;
const PUBLICATION_DATA: u32 = 4;

/// Reads one `Reply` (without its length prefix).
pub fn parse_message(body: &[u8]) -> Result<Line<'_>, ProtoError> {
    let (mut id, mut error, mut push) = (0u64, None, None);
    let mut r = Reader { buf: body };
    while let Some((field, v)) = r.field()? {
        match field {
            // uint32 on the wire: keep the low 32 bits, as protobuf decoders do.
            REPLY_ID => id = u64::from(v.varint("reply id")? as u32),
            REPLY_ERROR => error = Some(v.bytes("reply error")?),
            REPLY_PUSH => push = Some(v.bytes("reply push")?),
            _ => {}
        }
    }
    if let Some(p) = push {
        return parse_push(p);
    }
    match error {
        Some(e) => Ok(Line::Reply {
            id,
            error: Some(parse_error(e)?),
        }),
        // The empty Reply is the ping; like the JSON side, a reply with only fields we
        // do not know is taken for a keepalive too.
        None if id == 0 => Ok(Line::Ping),
        None => Ok(Line::Reply { id, error: None }),
    }
}

fn parse_error(body: &[u8]) -> Result<ReplyError<'_>, ProtoError> {
    let mut e = ReplyError {
        code: 0,
        message: Cow::Borrowed(""),
    };
    let mut r = Reader { buf: body };
    while let Some((field, v)) = r.field()? {
        match field {
            ERROR_CODE => e.code = v.varint("error code")? as u32,
            ERROR_MESSAGE => {
                e.message = Cow::Borrowed(utf8(v.bytes("error message")?, "error message")?)
            }
            _ => {}
        }
    }
    Ok(e)
}

fn parse_push(body: &[u8]) -> Result<Line<'_>, ProtoError> {
    let (mut channel, mut publication) = ("", None);
    let mut kind = "other";
    let mut r = Reader { buf: body };
    while let Some((field, v)) = r.field()? {
        match field {
            PUSH_CHANNEL => channel = utf8(v.bytes("push channel")?, "push channel")?,
            PUSH_PUB => publication = Some(v.bytes("push pub")?),
            PUSH_UNSUBSCRIBE => kind = "unsubscribe",
            PUSH_DISCONNECT => kind = "disconnect",
            _ => {}
        }
    }
    let Some(p) = publication else {
        return Ok(Line::OtherPush(kind));
    };
    // Absent data is protobuf's empty default; the payload check then counts it invalid.
    let mut data: &[u8] = &[];
    let mut r = Reader { buf: p };
    while let Some((field, v)) = r.field()? {
        if field == PUBLICATION_DATA {
            data = v.bytes("publication data")?;
        }
    }
    // Offsets matter only to reconnecting clients, which speak JSON.
    Ok(Line::Publication {
        channel: Cow::Borrowed(channel),
        data,
        offset: 0,
    })
}

fn utf8<'a>(b: &'a [u8], what: &'static str) -> Result<&'a str, ProtoError> {
    std::str::from_utf8(b).map_err(|_| ProtoError::Utf8(what))
}

/// A field's value as the wire carries it.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// Fixed 32- or 64-bit: nothing the subscriber reads.
    Fixed,
}

impl<'a> Value<'a> {
    fn varint(self, what: &'static str) -> Result<u64, ProtoError> {
        match self {
            Value::Varint(v) => Ok(v),
            _ => Err(ProtoError::FieldType(what)),
        }
    }

    fn bytes(self, what: &'static str) -> Result<&'a [u8], ProtoError> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => Err(ProtoError::FieldType(what)),
        }
    }
}

/// A cursor over protobuf wire data.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A base-128 varint: at most 10 bytes, the 10th carrying only the 64th bit.
    fn varint(&mut self) -> Result<u64, ProtoError> {
        let mut value = 0u64;
        for (i, &byte) in self.buf.iter().enumerate().take(10) {
            if i == 9 && byte > 1 {
                return Err(ProtoError::VarintOverflow);
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err(ProtoError::TruncatedVarint)
    }

    /// A varint length, then that many bytes.
    fn bytes(&mut self) -> Result<&'a [u8], ProtoError> {
        let declared = self.varint()?;
        let available = self.buf.len();
        let len = usize::try_from(declared)
            .ok()
            .filter(|n| *n <= available)
            .ok_or(ProtoError::PastEnd {
                declared,
                available,
            })?;
        let (b, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), ProtoError> {
        let available = self.buf.len();
        self.buf = self.buf.get(n..).ok_or(ProtoError::PastEnd {
            declared: n as u64,
            available,
        })?;
        Ok(())
    }

    /// The next field's number and value; `None` at the end of the message.
    fn field(&mut self) -> Result<Option<(u32, Value<'a>)>, ProtoError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = match u32::try_from(key >> 3) {
            Ok(n) if n > 0 => n,
            _ => return Err(ProtoError::FieldNumber(key >> 3)),
        };
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.skip(8)?;
                Value::Fixed
            }
            2 => Value::Bytes(self.bytes()?),
            5 => {
                self.skip(4)?;
                Value::Fixed
            }
            // Groups (3, 4) are deprecated and absent from the schema.
            w => return Err(ProtoError::WireType(w)),
        };
        Ok(Some((number, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::proto::{
        Disconnect, Error, Publication, Push, Reply, Unsubscribe, decode_commands, encode_reply,
    };

    fn one(frame: &[u8]) -> Line<'_> {
        let mut it = lines(frame);
        let line = it.next().expect("one message").expect("valid message");
        assert!(it.next().is_none(), "exactly one message");
        line
    }

    fn publication(channel: &str, data: &[u8], offset: u64) -> Reply {
        Reply {
            push: Some(Push {
                channel: channel.into(),
                r#pub: Some(Publication {
                    data: data.to_vec(),
                    offset,
                    time: 1_700_000_000_000,
                    tags: [("k".to_string(), "v".to_string())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn connect_frame_holds_connect_then_subscribe() {
        let f = connect_frame(Some("tok"), "bench-3");
        let cmds: Vec<Command> = decode_commands(&f).collect::<Result<_, _>>().unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].id, 1);
        assert_eq!(cmds[0].connect.as_ref().unwrap().token, "tok");
        assert_eq!(cmds[1].id, 2);
        assert_eq!(cmds[1].subscribe.as_ref().unwrap().channel, "bench-3");
        let f = connect_frame(None, "c");
        let cmds: Vec<Command> = decode_commands(&f).collect::<Result<_, _>>().unwrap();
        assert_eq!(cmds[0].connect.as_ref().unwrap().token, "");
    }

    #[test]
    fn pong_is_an_empty_command() {
        let cmds: Vec<Command> = decode_commands(PONG).collect::<Result<_, _>>().unwrap();
        assert_eq!(cmds, vec![Command::default()]);
    }

    #[test]
    fn empty_reply_is_a_ping() {
        assert!(matches!(one(proto::PING), Line::Ping));
        assert!(matches!(one(&encode_reply(&Reply::default())), Line::Ping));
    }

    #[test]
    fn replies_with_and_without_error() {
        let ok = encode_reply(&Reply {
            id: 1,
            connect: Some(Default::default()),
            ..Default::default()
        });
        assert!(matches!(one(&ok), Line::Reply { id: 1, error: None }));
        let err = encode_reply(&Reply {
            id: 2,
            error: Some(Error {
                code: 103,
                message: "permission denied".into(),
                temporary: true,
            }),
            ..Default::default()
        });
        match one(&err) {
            Line::Reply {
                id: 2,
                error: Some(e),
            } => {
                assert_eq!(e.code, 103);
                assert_eq!(e.message, "permission denied");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publication_data_is_read_in_place() {
        let mut payload = Vec::new();
        crate::payload::encode(
            &mut payload,
            &crate::payload::Stamp { t: 5, s: 6, c: 7 },
            128,
        );
        let frame = encode_reply(&publication("bench-7", &payload, 9));
        match one(&frame) {
            Line::Publication { channel, data, .. } => {
                assert_eq!(channel, "bench-7");
                assert_eq!(data, payload.as_slice());
                assert_eq!(
                    crate::payload::decode(data),
                    Some(crate::payload::Stamp { t: 5, s: 6, c: 7 })
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_pushes_by_kind() {
        let push = |p: Push| {
            encode_reply(&Reply {
                push: Some(p),
                ..Default::default()
            })
        };
        let unsub = push(Push {
            channel: "x".into(),
            unsubscribe: Some(Unsubscribe {
                code: 2000,
                reason: "server unsubscribe".into(),
            }),
            ..Default::default()
        });
        assert!(matches!(one(&unsub), Line::OtherPush("unsubscribe")));
        let disc = push(Push {
            disconnect: Some(Disconnect {
                code: 3001,
                reason: "shutdown".into(),
                reconnect: true,
            }),
            ..Default::default()
        });
        assert!(matches!(one(&disc), Line::OtherPush("disconnect")));
        let join = push(Push {
            channel: "x".into(),
            join: Some(Default::default()),
            ..Default::default()
        });
        assert!(matches!(one(&join), Line::OtherPush("other")));
    }

    #[test]
    fn several_messages_in_one_frame() {
        let frame = proto::concat([
            encode_reply(&publication("a", b"{\"n\":1}", 1)),
            Bytes::from_static(proto::PING),
            encode_reply(&Reply {
                id: 7,
                ..Default::default()
            }),
            encode_reply(&publication("b", b"{\"n\":2}", 2)),
        ]);
        let got: Vec<Line<'_>> = lines(&frame).collect::<Result<_, _>>().unwrap();
        assert_eq!(got.len(), 4);
        assert!(
            matches!(&got[0], Line::Publication { channel, data, .. } if channel == "a" && *data == b"{\"n\":1}")
        );
        assert!(matches!(got[1], Line::Ping));
        assert!(matches!(got[2], Line::Reply { id: 7, error: None }));
        assert!(
            matches!(&got[3], Line::Publication { channel, data, .. } if channel == "b" && *data == b"{\"n\":2}")
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        let good = encode_reply(&publication("bench-0", b"{\"t\":1}", 3));
        // Every truncation of a valid message fails cleanly (or, cut at a message
        // boundary, yields fewer messages); none panics.
        for cut in 1..good.len() {
            let r: Result<Vec<_>, _> = lines(&good[..cut]).collect();
            assert!(r.is_err(), "cut at {cut}");
        }
        let cases: &[(&[u8], ProtoError)] = &[
            (&[0x80], ProtoError::TruncatedVarint),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                ProtoError::VarintOverflow,
            ),
            (
                &[5, 0x08],
                ProtoError::PastEnd {
                    declared: 5,
                    available: 1,
                },
            ),
            // Field 1 (id) as a length-delimited field.
            (&[2, 0x0a, 0x00], ProtoError::FieldType("reply id")),
            // Wire type 3 (start group).
            (&[1, 0x0b], ProtoError::WireType(3)),
            (&[2, 0x00, 0x00], ProtoError::FieldNumber(0)),
            // A push whose channel is not UTF-8.
            (
                &[5, 0x22, 3, 0x12, 1, 0xff],
                ProtoError::Utf8("push channel"),
            ),
            // A fixed64 field cut short.
            (
                &[3, 0x09, 1, 2],
                ProtoError::PastEnd {
                    declared: 8,
                    available: 2,
                },
            ),
        ];
        for (frame, want) in cases {
            let mut it = lines(frame);
            match it.next() {
                Some(Err(e)) => assert_eq!(&e, want, "{frame:?}"),
                other => panic!("{frame:?}: {other:?}"),
            }
            assert!(it.next().is_none(), "nothing after an error");
        }
        // A good message before the bad one is still read.
        let mut frame = good.to_vec();
        frame.extend_from_slice(&[9, 1]);
        let mut it = lines(&frame);
        assert!(matches!(it.next(), Some(Ok(Line::Publication { .. }))));
        assert!(matches!(it.next(), Some(Err(ProtoError::PastEnd { .. }))));
        assert!(it.next().is_none());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..400usize {
            let frame: Vec<u8> = (0..len % 40)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            for line in lines(&frame) {
                let _ = line;
            }
        }
    }
}
