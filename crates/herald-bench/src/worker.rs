//! A shard of connections. Runs inside the parent (one process) or in a child process
//! that the parent drives over stdin (job, then `stop`) and stdout (JSON events).

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write as _};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until};

use crate::cli::{Protocol, Target, Transport};
use crate::client::{ConnCtx, ConnSpec, Live, Stop, run_connection};
use crate::error::BenchError;
use crate::herald::make_token;
use crate::net::loopback_endpoints;
use crate::stats::{HistData, Interval, PubTrack, Recorder};
use crate::sysinfo;

/// Everything a shard needs; sent to a child as the first stdin line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub shard: u32,
    pub shards: u32,
    pub target: Target,
    #[serde(default)]
    pub protocol: Protocol,
    pub url: String,
    /// Connections over all shards; this shard opens indices `shard, shard+shards, …`.
    pub connections: u64,
    /// Connection `i` subscribes to `channels[i % channels.len()]`.
    pub channels: Vec<String>,
    /// Connections per second over all shards.
    pub rate: f64,
    pub source_ips: Vec<IpAddr>,
    pub token_secret: Option<String>,
    pub token: Option<String>,
    pub connect_timeout_s: f64,
    /// Time origin of the per-second series (ns since the Unix epoch).
    pub epoch_ns: u64,
    /// The shard stops by itself after this long, whatever the parent does.
    pub max_runtime_s: f64,
    pub threads: u32,
    /// Make lost connections again (`--reconnect`).
    #[serde(default)]
    pub reconnect: bool,
    #[serde(default)]
    pub transport: Transport,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Counts {
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub disconnected: u64,
    pub delivered: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// WebSocket payload bytes subscribers received after subscribing.
    #[serde(default)]
    pub bytes_received: u64,
    /// Unique publications received on personal channels.
    #[serde(default)]
    pub personal_delivered: u64,
    /// CPU the shard's process has used since the shard started, in milliseconds.
    pub cpu_ms: u64,
}

impl Counts {
    fn snapshot(r: &Recorder, cpu_start: f64) -> Self {
        Counts {
            cpu_ms: ((sysinfo::self_cpu_seconds() - cpu_start) * 1000.0) as u64,
            ..Counts::of(r)
        }
    }

    fn of(r: &Recorder) -> Self {
        Counts {
            attempted: r.attempted,
            established: r.established,
            failed: r.failed,
            disconnected: r.disconnected,
            delivered: r.delivered,
            duplicated: r.duplicated,
            out_of_order: r.out_of_order,
            bytes_received: r.bytes_received,
            personal_delivered: r.personal_delivered,
            cpu_ms: 0,
        }
    }

    pub fn add(&mut self, o: &Counts) {
        self.attempted += o.attempted;
        self.established += o.established;
        self.failed += o.failed;
        self.disconnected += o.disconnected;
        self.delivered += o.delivered;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
        self.bytes_received += o.bytes_received;
        self.personal_delivered += o.personal_delivered;
        self.cpu_ms += o.cpu_ms;
    }
}

/// What a shard reports when it is done.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub counts: Counts,
    pub invalid: u64,
    pub connect_latency: HistData,
    pub connect_series: Vec<Interval>,
    pub latency: HistData,
    pub series: Vec<Interval>,
    #[serde(default)]
    pub personal_duplicated: u64,
    #[serde(default)]
    pub personal_latency: HistData,
    #[serde(default)]
    pub reconnects: u64,
    #[serde(default)]
    pub unrecovered: u64,
    #[serde(default)]
    pub reconnect_latency: HistData,
    #[serde(default)]
    pub first_drop_ns: u64,
    #[serde(default)]
    pub last_back_ns: u64,
    pub subs_per_channel: Vec<u64>,
    pub unique_per_channel: Vec<u64>,
    pub first_attempt_ns: u64,
    pub last_established_ns: u64,
    pub last_delivery_ns: u64,
    pub errors: BTreeMap<String, u64>,
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    /// This process's RSS before its first connection, and once every connection of the
    /// shard was attempted and settled (the generator's cost per connection).
    #[serde(default)]
    pub per_publication: Vec<PubTrack>,
    #[serde(default)]
    pub highest_seq: Vec<u64>,
    #[serde(default)]
    pub rss_start_bytes: u64,
    #[serde(default)]
    pub rss_ready_bytes: u64,
    pub pid: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEvent {
    Progress {
        shard: u32,
        counts: Counts,
    },
    /// Every connection of the shard has been attempted and has settled.
    Ready {
        shard: u32,
        counts: Counts,
        subs_per_channel: Vec<u64>,
    },
    Done {
        shard: u32,
        result: Box<WorkerResult>,
    },
    Failed {
        shard: u32,
        message: String,
    },
}

/// Runs one shard until `stop` turns true (or the job's own deadline passes).
pub async fn run_worker(
    job: Job,
    events: mpsc::UnboundedSender<WorkerEvent>,
    stop: watch::Receiver<bool>,
) -> Result<WorkerResult, BenchError> {
    let cpu_start = sysinfo::self_cpu_seconds();
    let endpoints = loopback_endpoints(&job.url, &["ws"])?;
    if job.source_ips.iter().any(|ip| !ip.is_loopback()) {
        return Err(BenchError::NotLoopback("source address".into()));
    }
    if job.channels.is_empty() || job.shards == 0 || !job.rate.is_finite() || job.rate <= 0.0 {
        return Err(BenchError::BadArgument("empty job".into()));
    }
    let max_seconds = job.max_runtime_s as usize + 120;
    let recorder = Arc::new(Mutex::new(Recorder::new(
        job.epoch_ns,
        job.channels.len(),
        max_seconds,
    )));
    let ctx = Arc::new(ConnCtx {
        target: job.target,
        protocol: job.protocol,
        endpoints,
        recorder: recorder.clone(),
        connect_timeout: Duration::from_secs_f64(job.connect_timeout_s.clamp(0.1, 600.0)),
        reconnect: job.reconnect,
        transport: job.transport,
        stop: Stop::default(),
        live: Live::default(),
    });
    let channels: Vec<Arc<str>> = job.channels.iter().map(|c| Arc::from(c.as_str())).collect();
    let rss_start_bytes = sysinfo::self_rss_bytes();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(job.max_runtime_s);

    // Connection tasks watch `ctx.stop`, set on the parent's stop or at our deadline.
    let mut parent_stop = stop.clone();
    let token_ttl = job.max_runtime_s as u64 + 3600;

    let progress = {
        let (recorder, events, shard) = (recorder.clone(), events.clone(), job.shard);
        tokio::spawn(async move {
            loop {
                sleep(Duration::from_millis(250)).await;
                let counts = Counts::snapshot(&recorder.lock(), cpu_start);
                if events
                    .send(WorkerEvent::Progress { shard, counts })
                    .is_err()
                {
                    break;
                }
            }
        })
    };

    let mut launched = 0u64;
    let mut i = u64::from(job.shard);
    while i < job.connections {
        let at = start + Duration::from_secs_f64(i as f64 / job.rate);
        tokio::select! {
            _ = sleep_until(at) => {}
            _ = parent_stop.wait_for(|s| *s) => break,
            _ = sleep_until(deadline) => break,
        }
        // Connection i subscribes to channel i mod C.
        let ch = (i % channels.len() as u64) as usize;
        let token = match (&job.token, &job.token_secret) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(secret)) => Some(make_token(
                secret.as_bytes(),
                &format!("bench-{i}"),
                token_ttl,
                // Unidirectional clients cannot subscribe: the token does it.
                if job.transport.is_uni() {
                    std::slice::from_ref(&job.channels[ch])
                } else {
                    &[]
                },
            )?),
            (None, None) => None,
        };
        let spec = ConnSpec {
            index: i,
            channel_idx: ch as u32,
            channel: channels[ch].clone(),
            token,
            src: (!job.source_ips.is_empty())
                .then(|| job.source_ips[(i % job.source_ips.len() as u64) as usize]),
        };
        // Not kept in a join set: a handle per task is memory per connection;
        // `ctx.live` counts them instead.
        tokio::spawn(run_connection(ctx.clone(), spec));
        launched += 1;
        i += u64::from(job.shards);
    }

    // Wait until every launched connection is established or has failed.
    loop {
        let settled = {
            let r = recorder.lock();
            r.established + r.failed >= launched
        };
        if settled || *parent_stop.borrow() || Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            _ = sleep(Duration::from_millis(20)) => {}
            _ = parent_stop.wait_for(|s| *s) => {}
        }
    }
    let rss_ready_bytes = sysinfo::self_rss_bytes();
    {
        let r = recorder.lock();
        let _ = events.send(WorkerEvent::Ready {
            shard: job.shard,
            counts: Counts::snapshot(&r, cpu_start),
            subs_per_channel: r.subs_per_channel.clone(),
        });
    }

    tokio::select! {
        _ = parent_stop.wait_for(|s| *s) => {}
        _ = sleep_until(deadline) => {}
    }
    ctx.stop.stop();
    // Stopped connections end within about a second (their goodbye is bounded); one
    // that does not is left to the runtime's end rather than holding the report.
    let _ = tokio::time::timeout(Duration::from_secs(10), ctx.live.all_ended()).await;
    progress.abort();

    let r = recorder.lock();
    Ok(WorkerResult {
        counts: Counts::snapshot(&r, cpu_start),
        invalid: r.invalid,
        connect_latency: HistData::from_histogram(&r.connect_latency),
        connect_series: r.connect_series.to_data(),
        latency: HistData::from_histogram(&r.latency),
        series: r.series.to_data(),
        personal_duplicated: r.personal_duplicated,
        personal_latency: HistData::from_histogram(&r.personal_latency),
        reconnects: r.reconnects,
        unrecovered: r.unrecovered,
        reconnect_latency: HistData::from_histogram(&r.reconnect_latency),
        first_drop_ns: r.first_drop_ns,
        last_back_ns: r.last_back_ns,
        subs_per_channel: r.subs_per_channel.clone(),
        unique_per_channel: r.unique_per_channel.clone(),
        first_attempt_ns: r.first_attempt_ns,
        last_established_ns: r.last_established_ns,
        last_delivery_ns: r.last_delivery_ns,
        errors: r.errors.clone(),
        cpu_seconds: sysinfo::self_cpu_seconds() - cpu_start,
        rss_bytes: sysinfo::self_rss_bytes(),
        per_publication: r.per_publication.clone(),
        highest_seq: r.highest_seq.clone(),
        rss_start_bytes,
        rss_ready_bytes,
        pid: std::process::id(),
    })
}

/// Builds the runtime a generator process uses: few threads, so that the server,
/// not the generator, gets the machine.
pub fn runtime(threads: u32) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.min(16) as usize)
            .enable_all()
            .build()
    }
}

/// Entry point of a child process: job on the first stdin line, `stop` (or EOF)
/// later; events as JSON lines on stdout.
pub fn child_main() -> Result<(), BenchError> {
    let stdin = std::io::stdin();
    let mut first = String::new();
    stdin.lock().read_line(&mut first)?;
    let job: Job = serde_json::from_str(&first)?;
    crate::net::raise_nofile_limit()?;
    let rt = runtime(job.threads)?;
    rt.block_on(async move {
        let shard = job.shard;
        let (stop_tx, stop_rx) = watch::channel(false);
        // Any line or EOF means stop: a parent that dies takes its children with it.
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            let _ = stop_tx.send(true);
        });
        let (tx, mut rx) = mpsc::unbounded_channel::<WorkerEvent>();
        let printer = tokio::task::spawn_blocking(move || {
            let stdout = std::io::stdout();
            while let Some(ev) = rx.blocking_recv() {
                let last = matches!(ev, WorkerEvent::Done { .. } | WorkerEvent::Failed { .. });
                let mut out = stdout.lock();
                let ok = serde_json::to_writer(&mut out, &ev).is_ok()
                    && out.write_all(b"\n").is_ok()
                    && out.flush().is_ok();
                if !ok || last {
                    break;
                }
            }
        });
        let final_event = match run_worker(job, tx.clone(), stop_rx).await {
            Ok(result) => WorkerEvent::Done {
                shard,
                result: Box::new(result),
            },
            Err(e) => WorkerEvent::Failed {
                shard,
                message: e.to_string(),
            },
        };
        let _ = tx.send(final_event);
        drop(tx);
        let _ = printer.await;
    });
    // Do not wait for the stdin thread or straggling tasks.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
