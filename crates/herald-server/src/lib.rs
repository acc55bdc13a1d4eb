//! The Herald server: listeners, transports, the server HTTP API and configuration.

pub mod admin;
pub mod api;
pub mod arbiter;
pub mod cli;
pub mod config;
pub mod http;
pub mod jwks;
pub mod mqtt;
pub mod ops;
pub mod proxy;
pub mod server;
pub mod state;
pub mod stop;
pub mod transport;

pub use config::Config;
pub use server::{Server, start};
