//! Herald's load generator.
//!
//! One tool drives Herald (Centrifugo protocol v2 over WebSocket, JSON or Protobuf), nats-server
//! (NATS over WebSocket), mosquitto (MQTT 3.1.1 over WebSocket) and nginx with nchan
//! (WebSocket subscribers, HTTP publisher) with the same scenarios, so that their figures
//! compare fairly:
//!
//! - `connect`: ramp N connections at a target rate, hold, close; connect latency and
//!   the server's memory per connection.
//! - `fanout`: S subscribers over C channels and one publisher at R/s; delivery
//!   accounting (lost, duplicated, out of order) and end-to-end latency.
//!
//! Targets must be loopback addresses. `--procs K` shards connections over K child
//! processes (the current executable re-run with the hidden `worker` subcommand).

pub mod arbiter;
pub mod cli;
pub mod client;
pub mod error;
pub mod fleet;
pub mod herald;
pub mod herald_proto;
pub mod mqtt;
pub mod nats;
pub mod nchan;
pub mod net;
pub mod payload;
pub mod plot;
pub mod progress;
pub mod publisher;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod sysinfo;
pub mod uni;
pub mod worker;
pub mod ws;

pub use cli::{BenchArgs, BenchCommand, ConnectArgs, FanoutArgs, Protocol, Target};
pub use error::BenchError;
pub use report::Report;

use anyhow::Context as _;

/// Runs a scenario on the caller's runtime: prints the Markdown summary on stdout and
/// writes `--json` / `--plot` when asked.
///
/// The hidden `worker` subcommand cannot run here (it builds its own runtime): use
/// [`main_with_args`] for it.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (report, common) = match args.command {
        BenchCommand::Connect(a) => {
            let common = a.common.clone();
            (scenario::connect(a).await?, common)
        }
        BenchCommand::Fanout(a) => {
            let common = a.common.clone();
            (scenario::fanout(a).await?, common)
        }
        BenchCommand::Worker => {
            anyhow::bail!("the worker subcommand runs through main_with_args")
        }
    };
    println!("{}", report.markdown());
    if let Some(path) = &common.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &common.plot {
        plot::plot(&report, path).with_context(|| format!("drawing {}", path.display()))?;
    }
    Ok(())
}

/// Entry point for a binary: builds the runtime (`--threads`) and runs the command,
/// including the hidden `worker` subcommand used by `--procs`.
pub fn main_with_args(args: BenchArgs) -> anyhow::Result<()> {
    let threads = match &args.command {
        BenchCommand::Worker => {
            worker::child_main()?;
            return Ok(());
        }
        BenchCommand::Connect(a) => a.common.threads,
        BenchCommand::Fanout(a) => a.common.threads,
    };
    net::raise_nofile_limit()?;
    let rt = worker::runtime(threads)?;
    let res = rt.block_on(run(args));
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    res
}
