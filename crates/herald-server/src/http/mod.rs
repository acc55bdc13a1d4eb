//! HTTP below the routes: the accept loop (`listener`), TLS with live certificate reload
//! (`tls`), and the checks every request passes before a route sees it (`gate`); the
//! client's address as handlers see it (`Peer`).

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

pub mod gate;
pub mod listener;
pub mod tls;

/// The address a request came from, put in the request's extensions by the accept loop
/// (absent for requests that did not come through it).
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(parts.extensions.get::<Peer>().copied().unwrap_or_default())
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("-"),
        }
    }
}
