//! HTTP below the routes: the accept loop (`listener`), TLS with live certificate reload
//! (`tls`), and the checks every request passes before a route sees it (`gate`).

pub mod gate;
pub mod listener;
pub mod tls;
