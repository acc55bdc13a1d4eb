//! The Herald server: listeners, transports, the server HTTP API and configuration.

pub mod api;
pub mod cli;
pub mod config;
pub mod server;
pub mod ws;

pub use config::Config;
pub use server::{Server, start};
