//! Herald's node core: sessions, the hub, namespaces and permissions, tokens, the engine
//! trait with the embedded memory engine, and the recovery merge. No listeners here.

pub mod auth;
pub mod channel;
pub mod clock;
pub mod conn;
pub mod duration;
pub mod engine;
pub mod failure;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod options;
pub mod proxy;
pub mod ratelimit;
pub mod recovery;
pub mod session;
pub mod timers;

pub use node::Node;
