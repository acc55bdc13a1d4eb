//! The Herald server: listeners, transports, the server HTTP API and configuration.

pub mod admin;
pub mod api;
pub mod cli;
pub mod comet;
pub mod config;
pub mod echo;
pub mod emulation;
pub mod jwks;
pub mod listener;
pub mod ops;
pub mod security;
pub mod server;
pub mod tls;
pub mod uni_ws;
pub mod ws;

pub use config::Config;
pub use server::{Server, start};
