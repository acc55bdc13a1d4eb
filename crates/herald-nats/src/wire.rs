//! Subjects, headers and control messages shared by Herald nodes over NATS.
//!
//! A channel name becomes one subject token: letters, digits, `_` and `-` stay, every other
//! byte is `=XX` (hex), so `.`, `*`, `>` and spaces never reach a subject.

use herald_core::engine::ControlCommand;
use herald_protocol::api::NodeInfo;
use serde::{Deserialize, Serialize};

/// Offset of a publication in its channel (decimal).
pub const OFFSET: &str = "Herald-Offset";
/// Epoch of the channel's stream.
pub const EPOCH: &str = "Herald-Epoch";
/// Stream sequence of the previous message of the channel (0: none), so history is walked
/// backwards from the last message without scanning the channel.
pub const PREV: &str = "Herald-Prev";
/// Unix ms after which the channel's publications are gone (`history_ttl` after the last
/// publish, as with Redis).
pub const EXPIRES: &str = "Herald-Expires";
/// Unix ms after which the channel's position (offset, epoch) is forgotten.
pub const META_EXPIRES: &str = "Herald-Meta-Expires";
/// `history_size` of the publish: older offsets are not history any more.
pub const SIZE: &str = "Herald-Size";
/// Unix ms of the publish: an older message whose `Herald-Expires` came before a later
/// publish had expired by then, so history stops there.
pub const PUBLISHED: &str = "Herald-Published";
/// Message kind: absent for a publication, `m` for a position marker (no data), `j` / `l`
/// for join / leave.
pub const KIND: &str = "Herald-Kind";

pub fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.is_empty() {
        // Subjects have no empty tokens; no escaped name is a lone "=".
        out.push('=');
    }
    out
}

/// Messages on the cluster's control subject.
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
    fn tokens_are_subject_safe_and_distinct() {
        assert_eq!(token("chat_1-a"), "chat_1-a");
        assert_eq!(token("a.b"), "a=2Eb");
        assert_eq!(token("ns:*> x"), "ns=3A=2A=3E=20x");
        assert_eq!(token(""), "=");
        assert_ne!(token("a.b"), token("a=2Eb"));
        assert_eq!(token("é"), "=C3=A9");
    }
}
