//! The engine is the only part of a node that knows about other nodes: it assigns offsets,
//! keeps history and presence, and delivers publications to every interested node's hub.

pub mod memory;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use herald_protocol::api::NodeInfo;
use herald_protocol::client::{ClientInfo, Publication};
use herald_protocol::json::Raw;
use serde::{Deserialize, Serialize};

/// A new stream epoch: 8 random alphanumerics. Epochs only need to differ between the lives
/// of one stream.
pub fn new_epoch() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..8)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a stream is: its epoch (changes when the stream is lost) and last offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: String,
}

#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// 0: no history for this publication (no offset assigned).
    pub history_size: usize,
    pub history_ttl: Duration,
    pub history_meta_ttl: Duration,
    /// Drops a publication whose key was seen recently and returns the first one's position.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Only publications after this offset.
    pub since: Option<StreamPosition>,
    /// None: all; Some(0): only the stream position.
    pub limit: Option<usize>,
    /// When more than this many publications follow `since`, only the stream position: the
    /// caller (a recovery) has no use for part of them, and the engine reads none.
    pub whole_within: Option<usize>,
    pub reverse: bool,
    pub meta_ttl: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct HistoryResult {
    pub publications: Vec<Publication>,
    pub position: StreamPosition,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The backing service cannot be reached; the operation was not done.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    #[error("engine error: {0}")]
    Internal(String),
}

/// A server API action on a user's connections, carried to every node of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlCommand {
    Disconnect {
        user: String,
        #[serde(default)]
        client: String,
        #[serde(default)]
        session: String,
        #[serde(default)]
        whitelist: Vec<String>,
        code: u16,
        reason: String,
    },
    Unsubscribe {
        user: String,
        channel: String,
        #[serde(default)]
        client: String,
        #[serde(default)]
        session: String,
    },
    Subscribe {
        user: String,
        channel: String,
        #[serde(default)]
        client: String,
        #[serde(default)]
        session: String,
        #[serde(default)]
        info: Option<Raw>,
        #[serde(default)]
        data: Option<Raw>,
    },
    Refresh {
        user: String,
        #[serde(default)]
        client: String,
        #[serde(default)]
        session: String,
        #[serde(default)]
        expire_at: Option<u64>,
        #[serde(default)]
        expired: bool,
    },
    /// Client commands posted to `/emulation` on one node for a stream held by `node`.
    Emulation {
        node: String,
        session: String,
        /// The commands: JSON text, or with `binary` the base64 of Protobuf commands.
        data: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        binary: bool,
    },
}

pub trait Engine: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Assigns the next offset (when history is on), stores, and delivers to every node with
    /// subscribers of the channel, in offset order.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        opts: &'a PublishOptions,
    ) -> BoxFut<'a, Result<StreamPosition, EngineError>>;

    fn publish_join_leave<'a>(
        &'a self,
        channel: &'a str,
        info: ClientInfo,
        join: bool,
    ) -> BoxFut<'a, Result<(), EngineError>>;

    /// This node has its first local subscriber of `channel`: deliver its publications here.
    /// Returns once delivery is guaranteed for everything published afterwards.
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>>;

    /// This node has no local subscriber of `channel` left.
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>>;

    fn history<'a>(
        &'a self,
        channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFut<'a, Result<HistoryResult, EngineError>>;

    fn remove_history<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>>;

    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
        info: ClientInfo,
    ) -> BoxFut<'a, Result<(), EngineError>>;

    fn remove_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
    ) -> BoxFut<'a, Result<(), EngineError>>;

    fn presence<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFut<'a, Result<BTreeMap<String, ClientInfo>, EngineError>>;

    /// Applies a server API action on every node, this one included.
    fn publish_control<'a>(&'a self, cmd: ControlCommand) -> BoxFut<'a, Result<(), EngineError>>;

    /// Announces this node (called periodically by the node).
    fn heartbeat<'a>(&'a self, info: NodeInfo) -> BoxFut<'a, Result<(), EngineError>>;

    /// Other live nodes of the cluster, as last announced (this node excluded).
    fn peers(&self) -> Vec<NodeInfo> {
        Vec::new()
    }

    /// Channels with subscribers on any node, with their subscriber counts summed.
    /// The default is this node's own view.
    fn channels<'a>(&'a self) -> BoxFut<'a, Result<Vec<(String, u32)>, EngineError>>;

    /// Whether the engine is currently able to serve (for readiness).
    fn healthy(&self) -> bool {
        true
    }

    /// Whether [`Engine::put_state`] keeps state where every node reads it (then what
    /// [`Engine::get_state`] answers is the whole truth, "nothing" included).
    fn shares_state(&self) -> bool {
        false
    }

    /// Keeps `value` under `key` for `ttl` where every node can read it (`None` removes
    /// it): state a client's next connection picks up on whichever node it reaches, such as
    /// an MQTT persistent session. An engine without storage shared between nodes keeps
    /// nothing here; the node's own memory is then all there is.
    fn put_state<'a>(
        &'a self,
        key: &'a str,
        value: Option<Vec<u8>>,
        ttl: Duration,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        let _ = (key, value, ttl);
        Box::pin(async { Ok(()) })
    }

    /// What [`Engine::put_state`] kept under `key`, if it has not expired.
    fn get_state<'a>(&'a self, key: &'a str) -> BoxFut<'a, Result<Option<Vec<u8>>, EngineError>> {
        let _ = key;
        Box::pin(async { Ok(None) })
    }
}
