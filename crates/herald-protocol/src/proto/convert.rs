//! Between the Protobuf types and the JSON-side types of [`crate::client`], so one session
//! serves both codecs: commands come in as `client::Command`, replies go out from
//! `client::Reply`. The rule for opaque data is in the module doc of [`crate::proto`].

use crate::client;
use crate::codes::ProtocolError;
use crate::json::{self, Raw};

use super::*;

/// Request data from a Protobuf client: empty means absent (proto3 cannot tell them apart).
fn request_data(bytes: &[u8]) -> Option<Raw> {
    request_data_flagged(bytes).map(|(raw, _)| raw)
}

/// Like [`request_data`], also telling whether the bytes were binary (not JSON).
fn request_data_flagged(bytes: &[u8]) -> Option<(Raw, bool)> {
    if bytes.is_empty() {
        return None;
    }
    Some(match json::from_bytes(bytes) {
        Some(raw) => (raw, false),
        None => (json::base64_string(bytes), true),
    })
}

fn raw_bytes(raw: &Option<Raw>) -> Vec<u8> {
    raw.as_ref()
        .map(|r| r.get().as_bytes().to_vec())
        .unwrap_or_default()
}

impl From<Command> for client::Command {
    fn from(c: Command) -> Self {
        client::Command {
            id: c.id,
            connect: c.connect.map(Into::into),
            subscribe: c.subscribe.map(Into::into),
            unsubscribe: c
                .unsubscribe
                .map(|r| client::UnsubscribeRequest { channel: r.channel }),
            publish: c.publish.map(|r| {
                let (data, binary) = request_data_flagged(&r.data).unzip();
                client::PublishRequest {
                    channel: r.channel,
                    data,
                    binary: binary.unwrap_or(false),
                }
            }),
            presence: c
                .presence
                .map(|r| client::ChannelRequest { channel: r.channel }),
            presence_stats: c
                .presence_stats
                .map(|r| client::ChannelRequest { channel: r.channel }),
            history: c.history.map(|r| client::HistoryRequest {
                channel: r.channel,
                limit: r.limit,
                since: r.since.map(|s| client::StreamPositionWire {
                    offset: s.offset,
                    epoch: s.epoch,
                }),
                reverse: r.reverse,
            }),
            ping: c.ping.map(|_| serde::de::IgnoredAny),
            send: c.send.map(|r| client::SendRequest {
                data: request_data(&r.data),
            }),
            rpc: c.rpc.map(|r| client::RpcRequest {
                method: r.method,
                data: request_data(&r.data),
            }),
            refresh: c.refresh.map(|r| client::RefreshRequest { token: r.token }),
            sub_refresh: c.sub_refresh.map(|r| client::SubRefreshRequest {
                channel: r.channel,
                token: r.token,
            }),
        }
    }
}

impl From<ConnectRequest> for client::ConnectRequest {
    fn from(r: ConnectRequest) -> Self {
        client::ConnectRequest {
            token: r.token,
            data: request_data(&r.data),
            subs: r.subs.into_iter().map(|(k, v)| (k, v.into())).collect(),
            name: r.name,
            version: r.version,
            headers: r.headers.into_iter().collect(),
        }
    }
}

impl From<SubscribeRequest> for client::SubscribeRequest {
    fn from(r: SubscribeRequest) -> Self {
        client::SubscribeRequest {
            channel: r.channel,
            token: r.token,
            recover: r.recover,
            epoch: r.epoch,
            offset: r.offset,
            data: request_data(&r.data),
            positioned: r.positioned,
            recoverable: r.recoverable,
            join_leave: r.join_leave,
            flag: r.flag,
            delta: r.delta,
        }
    }
}

impl From<&ProtocolError> for Error {
    fn from(e: &ProtocolError) -> Self {
        Error {
            code: e.code,
            message: e.message.clone(),
            temporary: e.temporary,
        }
    }
}

impl From<&client::ClientInfo> for ClientInfo {
    fn from(i: &client::ClientInfo) -> Self {
        ClientInfo {
            user: i.user.clone(),
            client: i.client.clone(),
            conn_info: raw_bytes(&i.conn_info),
            chan_info: raw_bytes(&i.chan_info),
        }
    }
}

impl From<&client::Publication> for Publication {
    fn from(p: &client::Publication) -> Self {
        Publication {
            data: p.payload().into_owned(),
            info: p.info.as_ref().map(Into::into),
            offset: p.offset,
            tags: p.tags.clone(),
            delta: p.delta,
            time: i64::try_from(p.time).unwrap_or(i64::MAX),
        }
    }
}

impl From<&client::SubscribeResult> for SubscribeResult {
    fn from(r: &client::SubscribeResult) -> Self {
        SubscribeResult {
            expires: r.expires,
            ttl: r.ttl,
            recoverable: r.recoverable,
            epoch: r.epoch.clone(),
            publications: r.publications.iter().map(Into::into).collect(),
            recovered: r.recovered,
            offset: r.offset,
            positioned: r.positioned,
            data: raw_bytes(&r.data),
            was_recovering: r.was_recovering,
            delta: r.delta,
        }
    }
}

impl From<&client::ConnectResult> for ConnectResult {
    fn from(r: &client::ConnectResult) -> Self {
        ConnectResult {
            client: r.client.clone(),
            version: r.version.clone(),
            expires: r.expires,
            ttl: r.ttl,
            data: raw_bytes(&r.data),
            subs: r.subs.iter().map(|(k, v)| (k.clone(), v.into())).collect(),
            ping: r.ping,
            pong: r.pong,
            session: r.session.clone(),
            node: r.node.clone(),
        }
    }
}

impl From<&client::Push> for Push {
    fn from(p: &client::Push) -> Self {
        Push {
            channel: p.channel.clone(),
            r#pub: p.publication.as_ref().map(Into::into),
            join: p.join.as_ref().map(|j| Join {
                info: Some((&j.info).into()),
            }),
            leave: p.leave.as_ref().map(|l| Leave {
                info: Some((&l.info).into()),
            }),
            unsubscribe: p.unsubscribe.as_ref().map(|u| Unsubscribe {
                code: u.code,
                reason: u.reason.clone(),
            }),
            message: p.message.as_ref().map(|m| Message {
                data: m.data.get().as_bytes().to_vec(),
            }),
            subscribe: p.subscribe.as_ref().map(|s| Subscribe {
                recoverable: s.recoverable,
                epoch: s.epoch.clone(),
                offset: s.offset,
                positioned: s.positioned,
                data: raw_bytes(&s.data),
            }),
            connect: None,
            disconnect: p.disconnect.as_ref().map(|d| Disconnect {
                code: u32::from(d.code),
                reason: d.reason.clone(),
                reconnect: d.reconnect,
            }),
            refresh: p.refresh.as_ref().map(|r| Refresh {
                expires: r.expires,
                ttl: r.ttl,
            }),
        }
    }
}

impl From<&client::Reply> for Reply {
    fn from(r: &client::Reply) -> Self {
        Reply {
            id: r.id,
            error: r.error.as_ref().map(Into::into),
            push: r.push.as_ref().map(Into::into),
            connect: r.connect.as_ref().map(Into::into),
            subscribe: r.subscribe.as_ref().map(Into::into),
            unsubscribe: r.unsubscribe.map(|_| UnsubscribeResult {}),
            publish: r.publish.map(|_| PublishResult {}),
            presence: r.presence.as_ref().map(|p| PresenceResult {
                presence: p
                    .presence
                    .iter()
                    .map(|(k, v)| (k.clone(), v.into()))
                    .collect(),
            }),
            presence_stats: r.presence_stats.as_ref().map(|s| PresenceStatsResult {
                num_clients: s.num_clients,
                num_users: s.num_users,
            }),
            history: r.history.as_ref().map(|h| HistoryResult {
                publications: h.publications.iter().map(Into::into).collect(),
                epoch: h.epoch.clone(),
                offset: h.offset,
            }),
            ping: None,
            rpc: r.rpc.as_ref().map(|x| RpcResult {
                data: raw_bytes(&x.data),
            }),
            refresh: r.refresh.as_ref().map(|x| RefreshResult {
                expires: x.expires,
                ttl: x.ttl,
                ..Default::default()
            }),
            sub_refresh: r.sub_refresh.as_ref().map(|x| SubRefreshResult {
                expires: x.expires,
                ttl: x.ttl,
            }),
        }
    }
}
