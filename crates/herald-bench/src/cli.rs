//! Command-line interface (clap). Public so that the `herald` binary can mount it as
//! `herald bench …`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

/// Herald load generator: connection ramps and fan-out latency against Herald,
/// nats-server, mosquitto and nginx with nchan, on loopback only.
#[derive(Parser, Debug, Clone)]
#[command(name = "herald-bench", version)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// Open N connections (connect + subscribe) at a target rate, hold them, close.
    Connect(ConnectArgs),
    /// S subscribers over C channels, one publisher at R publications/s; measures
    /// delivery (loss, duplicates, order) and end-to-end latency.
    Fanout(FanoutArgs),
    /// Internal: one shard of connections, driven over stdin/stdout by the parent.
    #[command(hide = true)]
    Worker,
}

/// The server under test and the protocol spoken to it.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Centrifugo protocol v2 over WebSocket, JSON or Protobuf (`--protocol`).
    Herald,
    /// NATS text protocol over nats-server's WebSocket listener.
    Nats,
    /// MQTT 3.1.1, QoS 0, over WebSocket (subprotocol `mqtt`).
    Mqtt,
    /// nginx's nchan module: WebSocket subscribers at `<url>/<channel>`, publications
    /// POSTed to `<api-url>/<channel>`.
    Nchan,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Herald => "herald",
            Target::Nats => "nats",
            Target::Mqtt => "mqtt",
            Target::Nchan => "nchan",
        }
    }
}

/// Wire format of Herald's client protocol.
#[derive(ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// JSON text frames, messages separated by `\n`.
    #[default]
    Json,
    /// Protobuf binary frames (subprotocol `centrifuge-protobuf`), messages prefixed by
    /// their varint length.
    Protobuf,
}

/// How `connect` subscribers reach Herald.
#[derive(ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// `--url` itself (bidirectional WebSocket).
    #[default]
    Websocket,
    /// `--url` with permessage-deflate negotiated (`server_no_context_takeover` required):
    /// compressed server messages are inflated; the client sends uncompressed frames.
    WebsocketDeflate,
    /// `POST /connection/uni_sse` beside `--url`'s `/connection/websocket`: server-sent
    /// events, subscribed through the token's `channels` claim.
    UniSse,
    /// `POST /connection/uni_http_stream`, likewise: a chunked HTTP response.
    UniHttpStream,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Websocket => "websocket",
            Transport::WebsocketDeflate => "websocket-deflate",
            Transport::UniSse => "uni-sse",
            Transport::UniHttpStream => "uni-http-stream",
        }
    }

    /// One of the unidirectional HTTP transports (subscribed through the token).
    pub fn is_uni(self) -> bool {
        matches!(self, Transport::UniSse | Transport::UniHttpStream)
    }
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Json => "json",
            Protocol::Protobuf => "protobuf",
        }
    }
}

/// Options shared by every scenario.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Protocol of the server under test.
    #[arg(long, value_enum, default_value = "herald")]
    pub target: Target,
    /// Wire format spoken to Herald (`--target herald` only).
    #[arg(long, value_enum, default_value = "json")]
    pub protocol: Protocol,
    /// WebSocket URL of the server (loopback only), e.g.
    /// ws://127.0.0.1:8000/connection/websocket; a comma-separated list for a cluster
    /// (connection i goes to the (i mod n)-th URL; the server API defaults to the first).
    /// For nchan, the subscriber location
    /// that the channel name is appended to (ws://127.0.0.1:8090/sub; a bare
    /// ws://host:port means /sub).
    #[arg(long)]
    pub url: String,
    /// Child processes to shard connections over (each has its own open-files limit).
    #[arg(long, default_value_t = 1)]
    pub procs: u32,
    /// Runtime threads per process (1 = current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: u32,
    /// Source addresses for client sockets, e.g. 127.0.1.1-127.0.1.200.
    #[arg(long)]
    pub source_ips: Option<String>,
    /// HMAC secret to sign one HS256 connection token per connection (herald).
    #[arg(long, env = "HERALD_BENCH_TOKEN_SECRET")]
    pub token_secret: Option<String>,
    /// A ready-made connection token shared by every connection (herald).
    #[arg(long, conflicts_with = "token_secret")]
    pub token: Option<String>,
    /// Server process id(s), comma-separated for a cluster: report their RSS and CPU
    /// (summed) from /proc.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Give up on a connection attempt after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// A lost connection is made again, as an SDK would: the node to use comes from
    /// `GET /connection/nodes`, and the subscribe recovers from the last publication
    /// received, so loss across a node failure is measured (herald, JSON). A first connect
    /// that fails (refused, timed out, closed by an overloaded node) is also tried again,
    /// with backoff; the retries are counted among the errors.
    #[arg(long)]
    pub reconnect: bool,
    /// Write every figure to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw latency percentiles and throughput over time to this PNG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,
    /// Target connection rate (connections per second, all processes together).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds to hold the connections once the ramp is over.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Channel every connection subscribes to.
    #[arg(long, default_value = "bench")]
    pub channel: String,
    /// How the connections reach Herald (`--target herald`, JSON, with a token secret:
    /// the unidirectional transports subscribe through the token).
    #[arg(long, value_enum, default_value = "websocket")]
    pub transport: Transport,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Herald server API base URL (default: http://<host:port of --url>/api); for nchan,
    /// the publisher location the channel name is appended to (default:
    /// http://<host:port of --url>/pub).
    #[arg(long)]
    pub api_url: Option<String>,
    /// Herald server API key (sent as X-API-Key).
    #[arg(long, env = "HERALD_API_KEY")]
    pub api_key: Option<String>,
    /// Subscribers, spread round-robin over the channels.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: u64,
    /// Channels (named `<prefix>0` … `<prefix>C-1`).
    #[arg(long, default_value_t = 1)]
    pub channels: u32,
    /// Channel name prefix.
    #[arg(long, default_value = "bench-")]
    pub channel_prefix: String,
    /// Publications per second, all channels together (round-robin over channels).
    #[arg(long, default_value_t = 10.0)]
    pub publish_rate: f64,
    /// Payload size in bytes (minimum ~50: timestamp, sequence, channel).
    #[arg(long, default_value_t = 128)]
    pub payload: usize,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait for outstanding deliveries after the last publication (the wait
    /// ends as soon as everything has arrived); later deliveries count as lost.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Pushes per second, while publishing, to the personal channels (`#bench-<i>`) of
    /// distinct randomly picked users (herald with --token-secret, whose connection i is
    /// user bench-<i>; the server must subscribe users to their personal channel,
    /// client.subscribe_to_user_personal_channel). 0: none.
    #[arg(long, default_value_t = 0.0)]
    pub personal_rate: f64,
    /// Subscriber connection rate during the ramp (per second).
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Keep-alive HTTP connections used to publish (Herald's API, nchan's publisher).
    #[arg(long, default_value_t = 4)]
    pub api_connections: u32,
    /// Pipelined requests in flight per API connection.
    #[arg(long, default_value_t = 64)]
    pub pipeline: u32,
}
