//! Client protocol v2, JSON encoding: commands in, replies and pushes out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codes::ProtocolError;
use crate::json::Raw;

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}

/// One command from a client. Exactly one request field is set, except for the empty
/// command `{}`, which is the client's pong. Unknown fields are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct Command {
    #[serde(default)]
    pub id: u32,
    pub connect: Option<ConnectRequest>,
    pub subscribe: Option<SubscribeRequest>,
    pub unsubscribe: Option<UnsubscribeRequest>,
    pub publish: Option<PublishRequest>,
    pub presence: Option<ChannelRequest>,
    pub presence_stats: Option<ChannelRequest>,
    pub history: Option<HistoryRequest>,
    pub ping: Option<serde::de::IgnoredAny>,
    pub send: Option<SendRequest>,
    pub rpc: Option<RpcRequest>,
    pub refresh: Option<RefreshRequest>,
    pub sub_refresh: Option<SubRefreshRequest>,
}

impl Command {
    /// The empty command `{}` answers a server ping.
    pub fn is_pong(&self) -> bool {
        self.id == 0
            && self.connect.is_none()
            && self.subscribe.is_none()
            && self.unsubscribe.is_none()
            && self.publish.is_none()
            && self.presence.is_none()
            && self.presence_stats.is_none()
            && self.history.is_none()
            && self.ping.is_none()
            && self.send.is_none()
            && self.rpc.is_none()
            && self.refresh.is_none()
            && self.sub_refresh.is_none()
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ConnectRequest {
    #[serde(default)]
    pub token: String,
    pub data: Option<Raw>,
    #[serde(default)]
    pub subs: BTreeMap<String, SubscribeRequest>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: String,
    /// Headers the SDK emulates (a browser WebSocket cannot set its own); forwarded to the
    /// connect proxy like the HTTP request's headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
pub struct StreamPositionWire {
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub epoch: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct SubscribeRequest {
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub recover: bool,
    #[serde(default)]
    pub epoch: String,
    #[serde(default)]
    pub offset: u64,
    pub data: Option<Raw>,
    #[serde(default)]
    pub positioned: bool,
    #[serde(default)]
    pub recoverable: bool,
    #[serde(default)]
    pub join_leave: bool,
    /// Bits of [`subscribe_flag`]; unknown bits are ignored.
    #[serde(default)]
    pub flag: i64,
    /// Delta type asked for (`"fossil"`), empty for whole publications.
    #[serde(default)]
    pub delta: String,
}

/// Bits of a subscribe request's `flag`.
pub mod subscribe_flag {
    /// The client can take a channel whose history was compacted (no effect here).
    pub const CHANNEL_COMPACTION: i64 = 1;
    /// Answer a recovery that cannot be complete with error 112 instead of subscribing with
    /// `recovered: false`: the client then reloads its state another way.
    pub const REJECT_UNRECOVERED: i64 = 2;
}

#[derive(Debug, Default, Deserialize)]
pub struct UnsubscribeRequest {
    #[serde(default)]
    pub channel: String,
}

#[derive(Debug, Deserialize)]
pub struct PublishRequest {
    #[serde(default)]
    pub channel: String,
    pub data: Option<Raw>,
    /// Set when a Protobuf client sent bytes that are not JSON: `data` is then their base64
    /// as a JSON string and the publication must be marked [`Publication::binary`]. Never
    /// set from JSON, so a JSON client cannot claim it.
    #[serde(skip)]
    pub binary: bool,
}

#[derive(Debug, Default, Deserialize)]
pub struct ChannelRequest {
    #[serde(default)]
    pub channel: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct HistoryRequest {
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub limit: i32,
    pub since: Option<StreamPositionWire>,
    #[serde(default)]
    pub reverse: bool,
}

#[derive(Debug, Deserialize)]
pub struct SendRequest {
    pub data: Option<Raw>,
}

#[derive(Debug, Deserialize)]
pub struct RpcRequest {
    #[serde(default)]
    pub method: String,
    pub data: Option<Raw>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RefreshRequest {
    #[serde(default)]
    pub token: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct SubRefreshRequest {
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub token: String,
}

/// Who published or who is present.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientInfo {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_info: Option<Raw>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chan_info: Option<Raw>,
}

/// A message in a channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Publication {
    pub data: Raw,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<ClientInfo>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Milliseconds since the Unix epoch when the node accepted it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub time: u64,
    /// `data` is a JSON string holding the base64 of bytes that are not JSON (published by
    /// a Protobuf client). Protobuf subscribers get the bytes back; JSON subscribers get
    /// the string and this flag. Serialised only when set, so JSON data encodes as before.
    #[serde(default, skip_serializing_if = "is_false")]
    pub binary: bool,
    /// `data` is a Fossil delta against the previous publication this subscriber received
    /// in the channel (only to subscribers that negotiated delta; see [`Publication::delta_form`]).
    #[serde(default, skip_serializing_if = "is_false")]
    pub delta: bool,
}

impl Publication {
    /// This publication as a JSON subscriber with delta negotiated reads it: `data` is a JSON
    /// string holding the data's JSON text (what centrifuge-js parses after applying a
    /// delta), or with `patch`, a string holding that Fossil delta and `delta: true`.
    pub fn delta_form(&self, patch: Option<&str>) -> Publication {
        let text = patch.unwrap_or(self.data.get());
        let data = serde_json::value::to_raw_value(text).unwrap_or_else(|_| crate::json::null());
        Publication {
            data,
            info: self.info.clone(),
            offset: self.offset,
            tags: self.tags.clone(),
            time: self.time,
            binary: self.binary,
            delta: patch.is_some(),
        }
    }

    /// The payload as the publisher sent it: the JSON text, or the original bytes of a
    /// binary publication. This is what Protobuf carries and what deltas are computed on.
    pub fn payload(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.binary.then(|| crate::json::base64_bytes(&self.data)) {
            Some(Some(bytes)) => bytes.into(),
            _ => self.data.get().as_bytes().into(),
        }
    }
}

fn raw_eq(a: &Option<Raw>, b: &Option<Raw>) -> bool {
    a.as_ref().map(|r| r.get()) == b.as_ref().map(|r| r.get())
}

impl PartialEq for ClientInfo {
    fn eq(&self, other: &Self) -> bool {
        self.user == other.user
            && self.client == other.client
            && raw_eq(&self.conn_info, &other.conn_info)
            && raw_eq(&self.chan_info, &other.chan_info)
    }
}

impl PartialEq for Publication {
    fn eq(&self, other: &Self) -> bool {
        self.data.get() == other.data.get()
            && self.info == other.info
            && self.offset == other.offset
            && self.tags == other.tags
            && self.time == other.time
            && self.binary == other.binary
            && self.delta == other.delta
    }
}

/// A reply to a command (`id` > 0) or an asynchronous push (`id` = 0).
#[derive(Debug, Default, Serialize)]
pub struct Reply {
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ProtocolError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<Push>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<ConnectResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<Empty>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<Empty>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_stats: Option<PresenceStatsResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<HistoryResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc: Option<RpcResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_refresh: Option<RefreshResult>,
}

impl Reply {
    pub fn error(id: u32, error: impl Into<ProtocolError>) -> Self {
        Self {
            id,
            error: Some(error.into()),
            ..Default::default()
        }
    }
    pub fn push(push: Push) -> Self {
        Self {
            push: Some(push),
            ..Default::default()
        }
    }
    /// Serialises to one JSON line (no trailing newline).
    pub fn encode(&self) -> bytes::Bytes {
        // Serialising these types cannot fail: no maps with non-string keys, no custom errors.
        serde_json::to_vec(self)
            .unwrap_or_else(|_| b"{}".to_vec())
            .into()
    }
}

#[derive(Debug, Default, Serialize, Deserialize, Clone, Copy)]
pub struct Empty {}

#[derive(Debug, Default, Serialize)]
pub struct ConnectResult {
    pub client: String,
    pub version: String,
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Raw>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: BTreeMap<String, SubscribeResult>,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ping: u32,
    #[serde(skip_serializing_if = "is_false")]
    pub pong: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub session: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct SubscribeResult {
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
    #[serde(skip_serializing_if = "is_false")]
    pub recoverable: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<Publication>,
    #[serde(skip_serializing_if = "is_false")]
    pub recovered: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub was_recovering: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub positioned: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Raw>,
    /// The server agreed to send deltas in this subscription.
    #[serde(skip_serializing_if = "is_false")]
    pub delta: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PresenceResult {
    pub presence: BTreeMap<String, ClientInfo>,
}

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PresenceStatsResult {
    pub num_clients: u32,
    pub num_users: u32,
}

#[derive(Debug, Default, Serialize)]
pub struct HistoryResult {
    pub publications: Vec<Publication>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct RpcResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Raw>,
}

#[derive(Debug, Default, Serialize)]
pub struct RefreshResult {
    #[serde(skip_serializing_if = "is_false")]
    pub expires: bool,
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub ttl: u32,
}

/// An asynchronous message from the server.
#[derive(Debug, Default, Serialize)]
pub struct Push {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub channel: String,
    #[serde(rename = "pub", skip_serializing_if = "Option::is_none")]
    pub publication: Option<Publication>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinLeave>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leave: Option<JoinLeave>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsubscribe: Option<UnsubscribePush>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<MessagePush>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<DisconnectPush>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshResult>,
}

#[derive(Debug, Serialize)]
pub struct JoinLeave {
    pub info: ClientInfo,
}

#[derive(Debug, Serialize)]
pub struct UnsubscribePush {
    pub code: u32,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct MessagePush {
    pub data: Raw,
}

#[derive(Debug, Serialize)]
pub struct DisconnectPush {
    pub code: u16,
    pub reason: String,
    pub reconnect: bool,
}

/// Splits a text frame into commands: one JSON object per `\n`-separated line; blank lines
/// are skipped.
pub fn split_commands(frame: &[u8]) -> impl Iterator<Item = &[u8]> {
    frame
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| l.iter().any(|b| !b.is_ascii_whitespace()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_ignored_and_batches_split() {
        let frame = b"{\"id\":1,\"connect\":{\"token\":\"t\",\"name\":\"js\"},\"flag\":3}\n{\"id\":2,\"subscribe\":{\"channel\":\"a\",\"flag\":1,\"dict\":{}}}\n";
        let cmds: Vec<Command> = split_commands(frame)
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].connect.as_ref().unwrap().token, "t");
        assert_eq!(cmds[1].subscribe.as_ref().unwrap().channel, "a");
    }

    #[test]
    fn empty_command_is_pong() {
        let c: Command = serde_json::from_slice(b"{}").unwrap();
        assert!(c.is_pong());
        let c: Command =
            serde_json::from_slice(b"{\"id\":3,\"presence\":{\"channel\":\"x\"}}").unwrap();
        assert!(!c.is_pong());
    }

    #[test]
    fn publication_push_shape() {
        let p = Reply::push(Push {
            channel: "news".into(),
            publication: Some(Publication {
                data: crate::json::raw_from_str(r#"{"a":1}"#).unwrap(),
                info: None,
                offset: 7,
                tags: BTreeMap::new(),
                time: 0,
                binary: false,
                delta: false,
            }),
            ..Default::default()
        });
        assert_eq!(
            std::str::from_utf8(&p.encode()).unwrap(),
            r#"{"push":{"channel":"news","pub":{"data":{"a":1},"offset":7}}}"#
        );
    }
}

#[derive(Serialize)]
struct PubPushRef<'a> {
    push: PubPushInner<'a>,
}

#[derive(Serialize)]
struct PubPushInner<'a> {
    channel: &'a str,
    #[serde(rename = "pub")]
    publication: &'a Publication,
}

#[derive(Serialize)]
struct JoinLeavePushRef<'a> {
    push: JoinLeaveInner<'a>,
}

#[derive(Serialize)]
struct JoinLeaveInner<'a> {
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    join: Option<JoinLeaveRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    leave: Option<JoinLeaveRef<'a>>,
}

#[derive(Serialize)]
struct JoinLeaveRef<'a> {
    info: &'a ClientInfo,
}

/// Encodes the publication push once; the same bytes go to every subscriber.
pub fn encode_publication_push(channel: &str, publication: &Publication) -> bytes::Bytes {
    serde_json::to_vec(&PubPushRef {
        push: PubPushInner {
            channel,
            publication,
        },
    })
    .unwrap_or_default()
    .into()
}

/// Encodes a join (`join = true`) or leave push.
pub fn encode_join_leave_push(channel: &str, info: &ClientInfo, join: bool) -> bytes::Bytes {
    let r = JoinLeaveRef { info };
    let (join, leave) = if join {
        (Some(r), None)
    } else {
        (None, Some(r))
    };
    serde_json::to_vec(&JoinLeavePushRef {
        push: JoinLeaveInner {
            channel,
            join,
            leave,
        },
    })
    .unwrap_or_default()
    .into()
}

/// The push object inside a frame this module encoded as `{"push":…}` (a publication, join or
/// leave push, or `Reply::push`), without copying: unidirectional clients read bare pushes,
/// and the hub encodes each publication once for both kinds of client.
pub fn push_body(frame: &bytes::Bytes) -> bytes::Bytes {
    const PREFIX: &[u8] = b"{\"push\":";
    if frame.len() > PREFIX.len() && frame.starts_with(PREFIX) && frame.ends_with(b"}") {
        frame.slice(PREFIX.len()..frame.len() - 1)
    } else {
        frame.clone()
    }
}

/// A bare push, as unidirectional clients read it.
pub fn encode_bare_push(push: &Push) -> bytes::Bytes {
    serde_json::to_vec(push).unwrap_or_default().into()
}

/// The first message of a unidirectional connection: `{"connect":{…}}`.
pub fn encode_uni_connect(result: &ConnectResult) -> bytes::Bytes {
    #[derive(Serialize)]
    struct UniConnect<'a> {
        connect: &'a ConnectResult,
    }
    serde_json::to_vec(&UniConnect { connect: result })
        .unwrap_or_default()
        .into()
}

/// A unidirectional connect request: `{token, data, subs, name, version}`. An empty body or
/// `null` is an empty request (anonymous, when allowed).
pub fn parse_uni_connect(data: &[u8]) -> Result<ConnectRequest, serde_json::Error> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return Ok(ConnectRequest::default());
    }
    serde_json::from_slice::<Option<ConnectRequest>>(data).map(Option::unwrap_or_default)
}

#[cfg(test)]
mod uni_tests {
    use super::*;

    #[test]
    fn push_body_is_a_slice_of_the_frame() {
        let f = bytes::Bytes::from_static(br#"{"push":{"channel":"a","pub":{"data":1}}}"#);
        let body = push_body(&f);
        assert_eq!(&body[..], br#"{"channel":"a","pub":{"data":1}}"#);
        assert_eq!(body.as_ptr(), f[8..].as_ptr());
        assert_eq!(&push_body(&bytes::Bytes::from_static(b"{}"))[..], b"{}");
    }

    #[test]
    fn uni_connect_request_parsing() {
        assert!(parse_uni_connect(b"").unwrap().token.is_empty());
        assert!(parse_uni_connect(b"null").unwrap().token.is_empty());
        assert_eq!(parse_uni_connect(b"{\"token\":\"t\"}").unwrap().token, "t");
        assert!(parse_uni_connect(b"{\"token\":").is_err());
    }
}
