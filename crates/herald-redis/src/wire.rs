//! What travels through Redis pub/sub between nodes.
//!
//! Channel messages: `p<offset>:<epoch>:<publication json>`, `j<client info json>` (join),
//! `l<client info json>` (leave). The control channel carries [`ControlMessage`] as JSON.

use herald_core::engine::ControlCommand;
use herald_protocol::api::NodeInfo;
use herald_protocol::client::{ClientInfo, Publication};
use serde::{Deserialize, Serialize};

pub enum ChannelMessage {
    Publication {
        offset: u64,
        epoch: String,
        publication: Publication,
    },
    JoinLeave {
        info: ClientInfo,
        join: bool,
    },
}

pub fn decode(payload: &[u8]) -> Option<ChannelMessage> {
    let (kind, rest) = payload.split_first()?;
    match kind {
        b'p' => {
            let i = rest.iter().position(|b| *b == b':')?;
            let offset: u64 = std::str::from_utf8(&rest[..i]).ok()?.parse().ok()?;
            let rest = &rest[i + 1..];
            let j = rest.iter().position(|b| *b == b':')?;
            let epoch = std::str::from_utf8(&rest[..j]).ok()?.to_string();
            let mut publication: Publication = serde_json::from_slice(&rest[j + 1..]).ok()?;
            publication.offset = offset;
            Some(ChannelMessage::Publication {
                offset,
                epoch,
                publication,
            })
        }
        b'j' | b'l' => Some(ChannelMessage::JoinLeave {
            info: serde_json::from_slice(rest).ok()?,
            join: *kind == b'j',
        }),
        _ => None,
    }
}

pub fn encode_join_leave(info: &ClientInfo, join: bool) -> Vec<u8> {
    let mut out = vec![if join { b'j' } else { b'l' }];
    out.extend(serde_json::to_vec(info).unwrap_or_default());
    out
}

/// Messages on the cluster's control channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlMessage {
    /// A node announcing itself.
    Node { info: NodeInfo },
    /// A server API action for every node.
    Command { command: ControlCommand },
    /// "Which channels do you have?" — every node answers with `Channels`.
    ChannelsRequest { id: String, from: String },
    Channels {
        id: String,
        to: String,
        from: String,
        channels: Vec<(String, u32)>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publication_roundtrip() {
        let m = decode(br#"p42:abc:{"data":{"x":1}}"#).unwrap();
        match m {
            ChannelMessage::Publication {
                offset,
                epoch,
                publication,
            } => {
                assert_eq!((offset, epoch.as_str()), (42, "abc"));
                assert_eq!(publication.offset, 42);
                assert_eq!(publication.data.get(), r#"{"x":1}"#);
            }
            _ => panic!("not a publication"),
        }
        assert!(decode(b"p:x").is_none());
        assert!(decode(b"zzz").is_none());
        assert!(decode(b"").is_none());
        let info = ClientInfo {
            user: "u".into(),
            client: "c".into(),
            ..Default::default()
        };
        match decode(&encode_join_leave(&info, false)).unwrap() {
            ChannelMessage::JoinLeave { info, join } => assert!(!join && info.user == "u"),
            _ => panic!(),
        }
    }
}
