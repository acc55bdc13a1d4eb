//! Error type of the load generator library.

use tokio_tungstenite::tungstenite;

/// Everything that can go wrong inside the generator. The binary wraps it in `anyhow`.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Herald only ever drives servers on this machine.
    #[error(
        "refusing target {0}: only loopback addresses (127.0.0.0/8, localhost, ::1) are allowed"
    )]
    NotLoopback(String),
    #[error("invalid URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid source address list {0:?}: {1}")]
    BadSourceIps(String, &'static str),
    #[error("invalid argument: {0}")]
    BadArgument(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("system call failed: {0}")]
    Sys(#[from] nix::Error),
    /// Boxed: the tungstenite error is large and would bloat every `Result`.
    #[error("WebSocket error: {0}")]
    Ws(Box<tungstenite::Error>),
    #[error("{0}")]
    Protocol(String),
    #[error("MQTT: {0}")]
    Mqtt(#[from] crate::mqtt::MqttError),
    #[error("herald protobuf: {0}")]
    Protobuf(#[from] crate::herald_proto::ProtoError),
    #[error("NATS: {0}")]
    Nats(#[from] crate::nats::NatsError),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("connection closed: {0}")]
    Closed(String),
    #[error("token signing failed: {0}")]
    Token(#[from] jsonwebtoken::errors::Error),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("HTTP API: {0}")]
    Http(String),
    #[error("worker: {0}")]
    Worker(String),
    #[error("plot: {0}")]
    Plot(String),
}

impl From<tungstenite::Error> for BenchError {
    fn from(e: tungstenite::Error) -> Self {
        BenchError::Ws(Box::new(e))
    }
}

impl BenchError {
    /// A short, low-cardinality label used to group failures in reports.
    pub fn kind(&self) -> String {
        match self {
            BenchError::Io(e) => format!("io: {}", e.kind()),
            BenchError::Sys(e) => format!("sys: {e}"),
            BenchError::Ws(e) => match e.as_ref() {
                tungstenite::Error::Io(io) => format!("ws io: {}", io.kind()),
                tungstenite::Error::Http(resp) => format!("ws http status {}", resp.status()),
                other => {
                    let s = other.to_string();
                    format!("ws: {}", s.chars().take(60).collect::<String>())
                }
            },
            BenchError::Timeout(what) => format!("timeout {what}"),
            other => {
                let s = other.to_string();
                s.chars().take(80).collect()
            }
        }
    }
}
