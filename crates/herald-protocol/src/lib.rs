//! Wire types of Herald: the Centrifugo client protocol v2 (JSON and Protobuf), Fossil
//! deltas for it, and the server HTTP API.
//!
//! No I/O here: only types, codecs and the one table of error and disconnect codes.

pub mod api;
pub mod client;
pub mod codes;
pub mod delta;
pub mod json;
pub mod mqtt;
pub mod proto;

pub use codes::{Disconnect, ErrorCode, ProtocolError};
