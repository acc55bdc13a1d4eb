//! Client protocol v2, Protobuf form: the same commands, replies and pushes as
//! [`crate::client`], in the schema of `proto/client.proto` (field numbers of the public
//! Centrifugo schema, so the official SDKs read and write these bytes).
//!
//! # Framing
//! A client's binary WebSocket message holds one or more [`Command`]s, each preceded by its
//! length as a varint; the server writes [`Reply`]s the same way, several to a message if
//! it likes. An empty `Reply` (the single byte `0x00`, [`PING`]) is the server's ping and
//! an empty `Command` is the client's pong.
//!
//! # Opaque data
//! `data`, `info`, `conn_info` and `chan_info` are raw bytes in Protobuf and raw JSON on the
//! JSON side, where the session works. Going out, JSON text is sent as its bytes. Coming in
//! from a Protobuf client:
//! - bytes that are one JSON value no deeper than [`crate::json::MAX_DEPTH`] become that
//!   raw JSON value, so JSON and Protobuf clients share a channel seamlessly. Being JSON, it
//!   keeps its meaning but not its insignificant whitespace: surrounding whitespace is
//!   dropped and line breaks become spaces, as for JSON from a JSON client;
//! - any other bytes become a JSON *string* of their standard base64, and a publication
//!   made of them is marked [`crate::client::Publication::binary`]. Protobuf subscribers get
//!   the original bytes back (the flag survives history and Redis, which store the JSON
//!   form); JSON subscribers get `{"data":"<base64>","binary":true,…}`.
//!
//! Centrifugo relays binary data unchanged and, since a JSON subscriber cannot be sent it,
//! disconnects that subscriber with 3506 (inappropriate protocol). Herald keeps every JSON
//! message parseable and delivers instead: one binary publisher in a mixed channel does not
//! cut off its web clients, and the base64 string with its flag is lossless. A server that
//! wants Centrifugo's behaviour can still check the flag and disconnect with 3506.
//! Only `publish` data is ever relayed, so only [`crate::client::PublishRequest`] carries the
//! flag; other request data that is not JSON arrives as the base64 string alone.

mod convert;

#[allow(clippy::all)]
mod generated {
    include!("generated.rs");
}

pub use generated::*;

use std::iter::FusedIterator;
use std::marker::PhantomData;

use bytes::Bytes;
use prost::Message as _;

use crate::client;

/// The server's ping: an empty `Reply`, length-prefixed.
pub const PING: &[u8] = &[0];

/// Protobuf's limit on the size of one message (2 GiB). A longer declared length is
/// malformed, not merely cut off.
pub const MAX_MESSAGE_LEN: u64 = i32::MAX as u64;

/// Why a binary frame could not be split into messages. `index` counts the messages before
/// the bad one.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message {index}: the frame ends inside its length prefix")]
    TruncatedLength { index: usize },
    #[error("message {index}: length prefix longer than 64 bits")]
    LengthOverflow { index: usize },
    #[error("message {index}: declared length {declared} exceeds the protobuf limit")]
    TooLarge { index: usize, declared: u64 },
    #[error("message {index}: declared length {declared}, but only {available} bytes follow")]
    PastEnd {
        index: usize,
        declared: u64,
        available: usize,
    },
    #[error("message {index}: invalid protobuf: {source}")]
    Invalid {
        index: usize,
        #[source]
        source: prost::DecodeError,
    },
}

/// Decodes the length-prefixed messages of a frame one at a time. Nothing is allocated from
/// a declared length (each body is a slice of the frame), and decoding one by one keeps
/// memory bounded even for a frame of many empty messages. After an error it yields nothing.
#[derive(Debug, Clone)]
pub struct Messages<'a, M> {
    rest: &'a [u8],
    index: usize,
    failed: bool,
    _message: PhantomData<fn() -> M>,
}

/// The commands in a client's binary frame.
pub fn decode_commands(frame: &[u8]) -> Messages<'_, Command> {
    Messages::new(frame)
}

/// The body of a Protobuf `/emulation` request (one message, not length-prefixed).
pub fn decode_emulation_request(body: &[u8]) -> Result<EmulationRequest, prost::DecodeError> {
    EmulationRequest::decode(body)
}

/// A Protobuf `/emulation` request body (for clients and tests).
pub fn encode_emulation_request(req: &EmulationRequest) -> Vec<u8> {
    req.encode_to_vec()
}

/// The replies in a server's binary frame (for clients and tests).
pub fn decode_replies(frame: &[u8]) -> Messages<'_, Reply> {
    Messages::new(frame)
}

impl<'a, M> Messages<'a, M> {
    fn new(frame: &'a [u8]) -> Self {
        Self {
            rest: frame,
            index: 0,
            failed: false,
            _message: PhantomData,
        }
    }

    /// Bytes not yet consumed: a stream reader keeps them for when more arrive.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn next_body(&mut self) -> Result<&'a [u8], FrameError> {
        let index = self.index;
        let (declared, prefix) = read_varint(self.rest).map_err(|e| match e {
            VarintError::Truncated => FrameError::TruncatedLength { index },
            VarintError::Overflow => FrameError::LengthOverflow { index },
        })?;
        let rest = self.rest.get(prefix..).unwrap_or_default();
        if declared > MAX_MESSAGE_LEN {
            return Err(FrameError::TooLarge { index, declared });
        }
        let len =
            usize::try_from(declared).map_err(|_| FrameError::TooLarge { index, declared })?;
        if len > rest.len() {
            return Err(FrameError::PastEnd {
                index,
                declared,
                available: rest.len(),
            });
        }
        let (body, rest) = rest.split_at(len);
        self.rest = rest;
        self.index += 1;
        Ok(body)
    }
}

impl<M: prost::Message + Default> Iterator for Messages<'_, M> {
    type Item = Result<M, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let index = self.index;
        let item = self.next_body().and_then(|body| {
            M::decode(body).map_err(|source| FrameError::Invalid { index, source })
        });
        self.failed = item.is_err();
        Some(item)
    }
}

impl<M: prost::Message + Default> FusedIterator for Messages<'_, M> {}

enum VarintError {
    Truncated,
    Overflow,
}

/// Reads a base-128 varint: its value and how many bytes it took. At most 10 bytes, and the
/// 10th may only carry the 64th bit.
fn read_varint(buf: &[u8]) -> Result<(u64, usize), VarintError> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        if i == 9 && byte > 1 {
            return Err(VarintError::Overflow);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(VarintError::Truncated)
}

/// One reply, length-prefixed: a complete frame, or one part of a batch (see [`concat`]).
pub fn encode_reply(reply: &Reply) -> Bytes {
    reply.encode_length_delimited_to_vec().into()
}

/// One command, length-prefixed (for clients and tests).
pub fn encode_command(command: &Command) -> Bytes {
    command.encode_length_delimited_to_vec().into()
}

/// Several encoded replies as one frame: length-prefixed messages simply follow each other.
pub fn concat<I>(parts: I) -> Bytes
where
    I: IntoIterator,
    I::Item: AsRef<[u8]>,
{
    let mut frame = Vec::new();
    for part in parts {
        frame.extend_from_slice(part.as_ref());
    }
    frame.into()
}

/// The publication push, encoded once per publication for every Protobuf subscriber (the
/// counterpart of [`client::encode_publication_push`]).
pub fn encode_publication_push_proto(channel: &str, publication: &client::Publication) -> Bytes {
    encode_reply(&Reply {
        push: Some(Push {
            channel: channel.to_owned(),
            r#pub: Some(publication.into()),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The publication push carrying a Fossil delta of its data (`delta: true`) for Protobuf
/// subscribers that negotiated delta.
pub fn encode_publication_delta_push_proto(
    channel: &str,
    publication: &client::Publication,
    patch: &[u8],
) -> Bytes {
    let mut p: Publication = publication.into();
    p.data = patch.to_vec();
    p.delta = true;
    encode_reply(&Reply {
        push: Some(Push {
            channel: channel.to_owned(),
            r#pub: Some(p),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A join (`join = true`) or leave push (the counterpart of
/// [`client::encode_join_leave_push`]).
pub fn encode_join_leave_push_proto(channel: &str, info: &client::ClientInfo, join: bool) -> Bytes {
    let info = Some(info.into());
    let (join, leave) = if join {
        (Some(Join { info }), None)
    } else {
        (None, Some(Leave { info }))
    };
    encode_reply(&Reply {
        push: Some(Push {
            channel: channel.to_owned(),
            join,
            leave,
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests;
