//! The run's figures: JSON (stable field names) and a Markdown summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stats::{Interval, Percentiles, merge_intervals};

/// One second of a time series.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SeriesPoint {
    pub t_s: u32,
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn series_points<'a>(parts: impl IntoIterator<Item = &'a [Interval]>) -> Vec<SeriesPoint> {
    let merged = merge_intervals(parts);
    let (Some(first), Some(last)) = (
        merged.keys().next().copied(),
        merged.keys().next_back().copied(),
    ) else {
        return Vec::new();
    };
    // Every second from the first to the last, zeros included, so gaps show.
    (first..=last)
        .map(|s| match merged.get(&s) {
            Some((n, h)) => point(s - first, *n, h),
            None => SeriesPoint {
                t_s: s - first,
                ..Default::default()
            },
        })
        .collect()
}

fn point(t_s: u32, count: u64, h: &Histogram<u64>) -> SeriesPoint {
    let p = Percentiles::from_histogram(h);
    SeriesPoint {
        t_s,
        count,
        p50_ms: p.p50,
        p90_ms: p.p90,
        p99_ms: p.p99,
        max_ms: p.max,
    }
}

/// Every figure of a run. Fields are `null` where a scenario does not measure them.
/// One publication of a broadcast.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PublicationFigure {
    /// Its sequence on the channel (1 = first).
    pub sequence: u64,
    /// Subscribers of the channel, and those that got it (once).
    pub subscribers: u64,
    pub delivered: u64,
    /// From its sending until the last subscriber had it; None when some never did.
    pub all_delivered_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    /// Wire format of Herald's client protocol (`json`, `protobuf`); null for the
    /// other targets.
    pub protocol: Option<String>,
    /// Herald `connect` runs: `websocket`, `uni-sse` or `uni-http-stream`.
    pub transport: Option<String>,
    pub url: String,
    pub procs: u32,
    pub threads: u32,
    pub connections: u64,
    pub channels: u32,
    pub publish_rate: Option<f64>,
    pub payload_bytes: Option<usize>,
    pub duration_s: f64,

    pub established: u64,
    pub failed: u64,
    pub disconnected: u64,
    pub ramp_s: f64,
    pub connects_per_s: f64,
    /// TCP connect + WebSocket handshake + protocol connect + subscribe.
    pub connect_latency_ms: Percentiles,

    pub published: Option<u64>,
    pub publish_errors: Option<u64>,
    pub published_per_s: Option<f64>,
    pub expected: Option<u64>,
    pub delivered: u64,
    pub lost: Option<u64>,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub invalid: u64,
    /// WebSocket payload bytes received by subscribers once subscribed (deliveries and
    /// pings; frame headers and the connect/subscribe exchange excluded).
    pub bytes_received: u64,
    /// `bytes_received` per unique delivery (fan-out).
    pub bytes_per_delivery: Option<f64>,
    pub deliveries_per_s: Option<f64>,
    /// The scenario's headline latency: end-to-end delivery for fan-out, connect
    /// latency for the connect scenario.
    pub latency_ms: Percentiles,

    /// Pushes to personal channels (`--personal-rate`): the distinct users picked, what
    /// the server accepted, unique deliveries, loss, duplicates and latency.
    pub personal_users: Option<u64>,
    pub personal_published: Option<u64>,
    pub personal_delivered: Option<u64>,
    pub personal_lost: Option<u64>,
    pub personal_duplicated: Option<u64>,
    pub personal_latency_ms: Option<Percentiles>,

    /// With `--reconnect`: lost connections made again, how long each took (drop to
    /// subscribed again), recoveries the server reported incomplete, and the time from the
    /// first drop to the last return.
    pub reconnects: Option<u64>,
    pub reconnect_ms: Option<Percentiles>,
    pub unrecovered: Option<u64>,
    pub all_back_ms: Option<f64>,

    /// Publications the API did not acknowledge (no answer, an error) that subscribers
    /// received all the same; counted as published in `expected`.
    pub published_unacknowledged: Option<u64>,
    /// One-channel fan-out (a broadcast) of fewer than 1,000 publications: each one's
    /// deliveries and the time until every subscriber had it.
    pub publications: Option<Vec<PublicationFigure>>,

    /// The server processes measured (one per node).
    pub server_pids: Vec<u32>,
    pub server_rss_before_bytes: Option<u64>,
    pub server_rss_loaded_bytes: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
    pub server_cpu_percent: Option<f64>,
    /// Server CPU seconds over the same window as `server_cpu_percent`.
    pub server_cpu_seconds: Option<f64>,
    /// Server CPU per unique delivery (fan-out), in microseconds.
    pub server_cpu_us_per_delivery: Option<f64>,

    /// CPU of every generator process together, 100 = one core: over the publish
    /// window (publishing and drain) for fan-out, over the whole run for connect.
    pub generator_cpu_percent: f64,
    /// Over the whole run, ramp included.
    pub generator_cpu_seconds: f64,
    /// Generator CPU per unique delivery over the publish window (fan-out), in µs.
    pub generator_cpu_us_per_delivery: Option<f64>,
    pub generator_rss_bytes: u64,
    /// Generator RSS grown per established connection: from before the first connection
    /// to when every connection had settled, summed over the generator processes.
    pub generator_rss_per_connection_bytes: Option<f64>,
    pub wall_s: f64,
    /// 1-minute load average before and after the run (other work on the machine
    /// skews every figure).
    pub load_average_start: Option<f64>,
    pub load_average_end: Option<f64>,

    pub errors: BTreeMap<String, u64>,
    pub worker_failures: Vec<String>,
    /// Per second: deliveries (fan-out) or connections (connect) and their latency.
    pub series: Vec<SeriesPoint>,
    pub connect_series: Vec<SeriesPoint>,
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

impl Report {
    /// The target, with the wire format when it has a choice: `herald/protobuf`.
    pub fn target_label(&self) -> String {
        let label = match &self.protocol {
            Some(p) => format!("{}/{p}", self.target),
            None => self.target.clone(),
        };
        match self.transport.as_deref() {
            Some(t) if t != "websocket" => format!("{label} over {t}"),
            _ => label,
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## herald-bench {} — {} ({})\n",
            self.scenario,
            self.target_label(),
            self.url
        );
        let _ = writeln!(s, "| metric | value |\n|---|---|");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "| {k} | {v} |");
        };
        row(
            "connections established / failed",
            format!(
                "{} / {} (of {})",
                self.established, self.failed, self.connections
            ),
        );
        if self.disconnected > 0 {
            row("disconnected early", self.disconnected.to_string());
        }
        row("connects/s achieved", format!("{:.0}", self.connects_per_s));
        let c = &self.connect_latency_ms;
        row(
            "connect latency p50 / p99 / max",
            format!("{:.2} / {:.2} / {:.2} ms", c.p50, c.p99, c.max),
        );
        if let (Some(p), Some(rate)) = (self.published, self.published_per_s) {
            row(
                "published (errors)",
                format!("{p} ({}) at {rate:.1}/s", self.publish_errors.unwrap_or(0)),
            );
        }
        if let Some(n) = self.published_unacknowledged {
            row("published without an answer, received", n.to_string());
        }
        if let Some(e) = self.expected {
            row(
                "expected / delivered / lost",
                format!("{e} / {} / {}", self.delivered, self.lost.unwrap_or(0)),
            );
            row(
                "duplicated / out of order / invalid",
                format!(
                    "{} / {} / {}",
                    self.duplicated, self.out_of_order, self.invalid
                ),
            );
        }
        if let Some(d) = self.deliveries_per_s {
            row("deliveries/s", format!("{d:.0}"));
            if let Some(b) = self.bytes_per_delivery {
                row(
                    "bytes received by subscribers (per delivery)",
                    format!("{} ({b:.1})", self.bytes_received),
                );
            }
            let l = &self.latency_ms;
            row(
                "end-to-end latency p50 / p90 / p99 / p99.9 / max",
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2} / {:.2} ms",
                    l.p50, l.p90, l.p99, l.p999, l.max
                ),
            );
        }
        // A long run's list would swamp the table; the JSON has every one.
        if let Some(pubs) = self.publications.as_ref().filter(|p| p.len() <= 20) {
            let each: Vec<String> = pubs
                .iter()
                .map(|p| match p.all_delivered_ms {
                    Some(ms) => format!("#{} {ms:.0} ms", p.sequence),
                    None => format!("#{} {} of {}", p.sequence, p.delivered, p.subscribers),
                })
                .collect();
            row("time until every subscriber had it", each.join(", "));
        }
        if let (Some(p), Some(l)) = (self.personal_published, &self.personal_latency_ms) {
            row(
                "personal pushes: users / published / delivered / lost / duplicated",
                format!(
                    "{} / {p} / {} / {} / {}",
                    self.personal_users.unwrap_or(0),
                    self.personal_delivered.unwrap_or(0),
                    self.personal_lost.unwrap_or(0),
                    self.personal_duplicated.unwrap_or(0)
                ),
            );
            row(
                "personal push latency p50 / p99 / max",
                format!("{:.2} / {:.2} / {:.2} ms", l.p50, l.p99, l.max),
            );
        }
        if let (Some(n), Some(l)) = (self.reconnects, &self.reconnect_ms) {
            row(
                "reconnects / unrecovered / first drop to last back",
                format!(
                    "{n} / {} / {:.0} ms",
                    self.unrecovered.unwrap_or(0),
                    self.all_back_ms.unwrap_or(0.0)
                ),
            );
            row(
                "reconnect time p50 / p99 / max",
                format!("{:.2} / {:.2} / {:.2} ms", l.p50, l.p99, l.max),
            );
        }
        if let (Some(b), Some(l)) = (self.server_rss_before_bytes, self.server_rss_loaded_bytes) {
            row(
                "server RSS before / loaded",
                format!("{} / {}", mib(b), mib(l)),
            );
        }
        if let Some(r) = self.rss_per_connection_bytes {
            row(
                "server RSS per connection",
                format!("{:.1} KiB", r / 1024.0),
            );
        }
        if let (Some(c), Some(s)) = (self.server_cpu_percent, self.server_cpu_seconds) {
            row("server CPU", format!("{c:.0}% ({s:.1} s)"));
        }
        if let Some(u) = self.server_cpu_us_per_delivery {
            row("server CPU per delivery", format!("{u:.2} µs"));
        }
        row(
            "generator CPU (% of one core) / CPU time / RSS",
            format!(
                "{:.0}% ({:.1} s) / {}",
                self.generator_cpu_percent,
                self.generator_cpu_seconds,
                mib(self.generator_rss_bytes)
            ),
        );
        if let Some(r) = self.generator_rss_per_connection_bytes {
            row(
                "generator RSS per connection",
                format!("{:.2} KiB", r / 1024.0),
            );
        }
        if let (Some(a), Some(b)) = (self.load_average_start, self.load_average_end) {
            row(
                "load average (1 min) start → end",
                format!("{a:.2} → {b:.2}"),
            );
        }
        if let Some(u) = self.generator_cpu_us_per_delivery {
            row("generator CPU per delivery", format!("{u:.2} µs"));
        }
        if !self.errors.is_empty() {
            let e: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            row("errors", e.join("; ").replace('|', "/"));
        }
        for f in &self.worker_failures {
            row("worker failure", f.replace('|', "/"));
        }
        s
    }
}
