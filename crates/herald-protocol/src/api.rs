//! Server HTTP API (`POST /api/<method>`): request and result bodies.
//!
//! Compatible with the Centrifugo server API, so `cent` and its siblings work unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::client::{ClientInfo, Publication, StreamPositionWire};
use crate::json::Raw;

#[derive(Debug, Deserialize)]
pub struct PublishRequest {
    #[serde(default)]
    pub channel: String,
    pub data: Option<Raw>,
    pub b64data: Option<String>,
    #[serde(default)]
    pub skip_history: bool,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub idempotency_key: String,
}

#[derive(Debug, Deserialize)]
pub struct BroadcastRequest {
    #[serde(default)]
    pub channels: Vec<String>,
    pub data: Option<Raw>,
    pub b64data: Option<String>,
    #[serde(default)]
    pub skip_history: bool,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub idempotency_key: String,
}

#[derive(Debug, Default, Serialize, Clone)]
pub struct PublishResult {
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Deserialize)]
pub struct SubscribeRequest {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub channel: String,
    pub info: Option<Raw>,
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub session: String,
    pub data: Option<Raw>,
    pub recover_since: Option<StreamPositionWire>,
}

#[derive(Debug, Deserialize)]
pub struct UnsubscribeRequest {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub session: String,
}

#[derive(Debug, Deserialize, Default)]
pub struct DisconnectObject {
    #[serde(default)]
    pub code: u16,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Deserialize)]
pub struct DisconnectRequest {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub whitelist: Vec<String>,
    pub disconnect: Option<DisconnectObject>,
}

#[derive(Debug, Deserialize)]
pub struct RefreshRequest {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub expired: bool,
    #[serde(default)]
    pub expire_at: u64,
}

#[derive(Debug, Deserialize)]
pub struct ChannelRequest {
    #[serde(default)]
    pub channel: String,
}

#[derive(Debug, Deserialize)]
pub struct HistoryRequest {
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub limit: i32,
    pub since: Option<StreamPositionWire>,
    #[serde(default)]
    pub reverse: bool,
}

#[derive(Debug, Deserialize, Default)]
pub struct ChannelsRequest {
    #[serde(default)]
    pub pattern: String,
}

#[derive(Debug, Serialize, Default)]
pub struct HistoryResult {
    pub publications: Vec<Publication>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub epoch: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub offset: u64,
}

#[derive(Debug, Serialize, Default)]
pub struct PresenceResult {
    pub presence: BTreeMap<String, ClientInfo>,
}

#[derive(Debug, Serialize, Default)]
pub struct ChannelInfo {
    pub num_clients: u32,
}

#[derive(Debug, Serialize, Default)]
pub struct ChannelsResult {
    pub channels: BTreeMap<String, ChannelInfo>,
}

#[derive(Debug, Serialize, Deserialize, Default, Clone)]
pub struct NodeInfo {
    pub uid: String,
    pub name: String,
    pub version: String,
    pub num_clients: u32,
    pub num_users: u32,
    pub num_channels: u32,
    pub num_subs: u32,
    pub uptime: u64,
    /// The client URL the node advertises to devices (`GET /connection/nodes`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// The node is draining: devices are not sent to it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

#[derive(Debug, Serialize, Default)]
pub struct InfoResult {
    pub nodes: Vec<NodeInfo>,
}

/// The error object of the server API (`{"error":{"code":..,"message":..}}`).
#[derive(Debug, Serialize, Clone)]
pub struct ApiError {
    pub code: u32,
    pub message: String,
}

impl From<crate::codes::ErrorCode> for ApiError {
    fn from(c: crate::codes::ErrorCode) -> Self {
        Self {
            code: c.code,
            message: c.message.to_string(),
        }
    }
}

impl From<crate::codes::ProtocolError> for ApiError {
    fn from(e: crate::codes::ProtocolError) -> Self {
        Self {
            code: e.code,
            message: e.message,
        }
    }
}
