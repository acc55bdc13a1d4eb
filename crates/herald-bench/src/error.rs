//! Error type of the load generator library.

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
    /// The server answered the WebSocket handshake with another status than 101.
    #[error("WebSocket handshake answered with HTTP status {0}")]
    Handshake(u16),
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

impl BenchError {
    /// A short, low-cardinality label used to group failures in reports.
    pub fn kind(&self) -> String {
        match self {
            BenchError::Io(e) => format!("io: {}", e.kind()),
            BenchError::Sys(e) => format!("sys: {e}"),
            BenchError::Handshake(status) => format!("ws http status {status}"),
            BenchError::Timeout(what) => format!("timeout {what}"),
            other => {
                let s = other.to_string();
                s.chars().take(80).collect()
            }
        }
    }
}
