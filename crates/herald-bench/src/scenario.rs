//! The two scenarios, orchestrated from the parent process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::cli::{CommonArgs, ConnectArgs, FanoutArgs, Protocol, Target, Transport};
use crate::error::BenchError;
use crate::fleet::{Fleet, ShardState};
use crate::nchan;
use crate::net::{loopback_endpoint, loopback_endpoints, parse_source_ips, raise_nofile_limit};
use crate::payload::{PERSONAL_C, now_ns};
use crate::progress;
use crate::publisher::{PubConfig, run_publisher};
use crate::report::{PublicationFigure, Report, series_points};
use crate::stats::{
    Interval, Percentiles, PubTrack, TRACKED_PUBLICATIONS, account, add_vec, max_vec, merge_tracks,
    new_histogram, published_by_channel,
};
use crate::sysinfo;
use crate::worker::{Counts, Job};

/// Upper bounds that keep every run finite.
const MAX_CONNECTIONS: u64 = 5_000_000;
const MAX_DURATION_S: f64 = 3600.0;
const MAX_RATE: f64 = 1_000_000.0;
const MAX_PROCS: u32 = 256;
const MAX_PAYLOAD: usize = 1 << 20;
const MAX_CHANNELS: u32 = 1_000_000;

fn bad(msg: impl Into<String>) -> BenchError {
    BenchError::BadArgument(msg.into())
}

fn check_range(name: &str, v: f64, lo: f64, hi: f64) -> Result<(), BenchError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(bad(format!("--{name} must be within {lo}..={hi}, got {v}")))
    }
}

/// What the parent measures about itself and the server around a run.
struct Meter {
    wall: Instant,
    cpu: f64,
    server_pids: Vec<u32>,
    server_rss_before: Option<u64>,
    load_start: Option<f64>,
}

impl Meter {
    fn start(server_pids: Vec<u32>) -> Self {
        Meter {
            wall: Instant::now(),
            cpu: sysinfo::self_cpu_seconds(),
            server_rss_before: sysinfo::total_rss_bytes(&server_pids),
            server_pids,
            load_start: sysinfo::load_average(),
        }
    }
}

/// `--protocol` chooses between Herald's two wire formats; the other targets have one.
fn check_protocol(c: &CommonArgs) -> Result<(), BenchError> {
    if c.protocol != Protocol::Json && c.target != Target::Herald {
        return Err(bad(format!(
            "--protocol {} applies to --target herald only, not --target {}",
            c.protocol.name(),
            c.target.name()
        )));
    }
    Ok(())
}

/// Options that belong to other targets are refused rather than ignored. A value taken
/// from the environment (`HERALD_BENCH_TOKEN_SECRET`, `HERALD_API_KEY`) is not refused:
/// it was not asked for on this command line.
fn check_target_options(c: &CommonArgs, fanout: Option<&FanoutArgs>) -> Result<(), BenchError> {
    check_protocol(c)?;
    if c.reconnect && (c.target != Target::Herald || c.protocol != Protocol::Json) {
        return Err(bad(
            "--reconnect needs --target herald with the JSON protocol (clients recover by offset)",
        ));
    }
    let from_env = |var: &str, v: &Option<String>| std::env::var(var).ok() == *v;
    let mut herald_only = Vec::new();
    if c.target != Target::Herald {
        if c.token.is_some() {
            herald_only.push("--token");
        }
        if c.token_secret.is_some() && !from_env("HERALD_BENCH_TOKEN_SECRET", &c.token_secret) {
            herald_only.push("--token-secret");
        }
        if let Some(f) = fanout
            && f.api_key.is_some()
            && !from_env("HERALD_API_KEY", &f.api_key)
        {
            herald_only.push("--api-key");
        }
    }
    if !herald_only.is_empty() {
        let verb = if herald_only.len() == 1 {
            "applies"
        } else {
            "apply"
        };
        return Err(bad(format!(
            "{} {verb} to --target herald only, not --target {}",
            herald_only.join(", "),
            c.target.name()
        )));
    }
    if let Some(f) = fanout
        && f.api_url.is_some()
        && !matches!(c.target, Target::Herald | Target::Nchan)
    {
        return Err(bad(format!(
            "--api-url applies to --target herald and nchan only, not --target {}",
            c.target.name()
        )));
    }
    if c.target == Target::Nchan {
        nchan::location(&first_endpoint(&c.url)?, nchan::DEFAULT_SUB_PATH)?;
    }
    Ok(())
}

/// The first of `--url`'s nodes: the server API and the publisher go there.
fn first_endpoint(urls: &str) -> Result<crate::net::Endpoint, BenchError> {
    let mut list = loopback_endpoints(urls, &["ws"])?;
    Ok(list.swap_remove(0))
}

fn prepare(
    c: &CommonArgs,
    connections: u64,
    rate: f64,
    channels: Vec<String>,
    max_runtime_s: f64,
) -> Result<Vec<Job>, BenchError> {
    loopback_endpoints(&c.url, &["ws"])?;
    if connections == 0 || connections > MAX_CONNECTIONS {
        return Err(bad(format!(
            "connections must be within 1..={MAX_CONNECTIONS}"
        )));
    }
    check_range("rate", rate, 0.001, MAX_RATE)?;
    check_range("connect-timeout", c.connect_timeout, 0.1, 600.0)?;
    if c.procs == 0 || c.procs > MAX_PROCS {
        return Err(bad(format!("--procs must be within 1..={MAX_PROCS}")));
    }
    if c.threads == 0 || c.threads > 16 {
        return Err(bad("--threads must be within 1..=16"));
    }
    let source_ips = match &c.source_ips {
        Some(s) => parse_source_ips(s)?,
        None => Vec::new(),
    };
    let nofile = raise_nofile_limit()?;
    let per_proc = connections.div_ceil(u64::from(c.procs));
    if per_proc + 64 > nofile {
        return Err(bad(format!(
            "{per_proc} connections per process exceed the open-files limit {nofile}; use --procs {}",
            connections.div_ceil(nofile.saturating_sub(64).max(1))
        )));
    }
    let epoch_ns = now_ns();
    Ok((0..c.procs)
        .map(|shard| Job {
            shard,
            shards: c.procs,
            target: c.target,
            protocol: c.protocol,
            url: c.url.clone(),
            connections,
            channels: channels.clone(),
            rate,
            source_ips: source_ips.clone(),
            token_secret: c.token_secret.clone(),
            token: c.token.clone(),
            connect_timeout_s: c.connect_timeout,
            epoch_ns,
            max_runtime_s,
            threads: c.threads,
            reconnect: c.reconnect,
            transport: Transport::Websocket,
        })
        .collect())
}

/// Shard results merged.
#[derive(Default)]
struct Merged {
    counts: Counts,
    invalid: u64,
    connect_latency: Option<Histogram<u64>>,
    latency: Option<Histogram<u64>>,
    personal_duplicated: u64,
    personal_latency: Option<Histogram<u64>>,
    reconnects: u64,
    unrecovered: u64,
    reconnect_latency: Option<Histogram<u64>>,
    first_drop_ns: u64,
    last_back_ns: u64,
    subs_per_channel: Vec<u64>,
    unique_per_channel: Vec<u64>,
    first_attempt_ns: u64,
    last_established_ns: u64,
    last_delivery_ns: u64,
    errors: BTreeMap<String, u64>,
    child_cpu: f64,
    child_rss: u64,
    /// Generator RSS before the first connection and once all had settled: summed over
    /// processes, or (shards in this process) the lowest start and highest settled.
    rss_start: u64,
    rss_ready: u64,
    per_publication: Vec<PubTrack>,
    highest_seq: Vec<u64>,
    series: Vec<Vec<Interval>>,
    connect_series: Vec<Vec<Interval>>,
    failures: Vec<String>,
}

/// What `--reconnect` saw, into the report.
fn reconnect_figures(r: &mut Report, m: &Merged, on: bool) {
    if !on {
        return;
    }
    r.reconnects = Some(m.reconnects);
    r.unrecovered = Some(m.unrecovered);
    r.reconnect_ms = Some(
        m.reconnect_latency
            .as_ref()
            .map(Percentiles::from_histogram)
            .unwrap_or_default(),
    );
    r.all_back_ms = Some(if m.last_back_ns > m.first_drop_ns && m.first_drop_ns > 0 {
        (m.last_back_ns - m.first_drop_ns) as f64 / 1e6
    } else {
        0.0
    });
}

fn merge(shards: Vec<ShardState>, in_process: bool) -> Merged {
    let mut m = Merged {
        connect_latency: Some(new_histogram()),
        latency: Some(new_histogram()),
        personal_latency: Some(new_histogram()),
        reconnect_latency: Some(new_histogram()),
        ..Default::default()
    };
    for (i, s) in shards.into_iter().enumerate() {
        if let Some(f) = s.failed {
            m.failures.push(format!("shard {i}: {f}"));
        }
        let Some(r) = s.done else {
            m.counts.add(&s.counts);
            continue;
        };
        m.counts.add(&r.counts);
        m.invalid += r.invalid;
        if let Some(h) = m.connect_latency.as_mut() {
            r.connect_latency.merge_into(h);
        }
        if let Some(h) = m.latency.as_mut() {
            r.latency.merge_into(h);
        }
        if let Some(h) = m.personal_latency.as_mut() {
            r.personal_latency.merge_into(h);
        }
        m.personal_duplicated += r.personal_duplicated;
        m.reconnects += r.reconnects;
        m.unrecovered += r.unrecovered;
        if let Some(h) = m.reconnect_latency.as_mut() {
            r.reconnect_latency.merge_into(h);
        }
        if r.first_drop_ns > 0 && (m.first_drop_ns == 0 || r.first_drop_ns < m.first_drop_ns) {
            m.first_drop_ns = r.first_drop_ns;
        }
        m.last_back_ns = m.last_back_ns.max(r.last_back_ns);
        add_vec(&mut m.subs_per_channel, &r.subs_per_channel);
        merge_tracks(&mut m.per_publication, &r.per_publication);
        max_vec(&mut m.highest_seq, &r.highest_seq);
        add_vec(&mut m.unique_per_channel, &r.unique_per_channel);
        if r.first_attempt_ns > 0
            && (m.first_attempt_ns == 0 || r.first_attempt_ns < m.first_attempt_ns)
        {
            m.first_attempt_ns = r.first_attempt_ns;
        }
        m.last_established_ns = m.last_established_ns.max(r.last_established_ns);
        m.last_delivery_ns = m.last_delivery_ns.max(r.last_delivery_ns);
        for (k, v) in r.errors {
            *m.errors.entry(k).or_insert(0) += v;
        }
        if !in_process {
            m.child_cpu += r.cpu_seconds;
            m.child_rss += r.rss_bytes;
            m.rss_start += r.rss_start_bytes;
            m.rss_ready += r.rss_ready_bytes;
        } else {
            m.rss_start = match m.rss_start {
                0 => r.rss_start_bytes,
                s => s.min(r.rss_start_bytes),
            };
            m.rss_ready = m.rss_ready.max(r.rss_ready_bytes);
        }
        m.series.push(r.series);
        m.connect_series.push(r.connect_series);
    }
    m
}

fn base_report(
    scenario: &str,
    c: &CommonArgs,
    connections: u64,
    m: &Merged,
    meter: &Meter,
) -> Report {
    let ramp_s = if m.last_established_ns > m.first_attempt_ns {
        (m.last_established_ns - m.first_attempt_ns) as f64 / 1e9
    } else {
        0.0
    };
    let connect_latency = m
        .connect_latency
        .as_ref()
        .map(Percentiles::from_histogram)
        .unwrap_or_default();
    let wall_s = meter.wall.elapsed().as_secs_f64();
    let cpu = sysinfo::self_cpu_seconds() - meter.cpu + m.child_cpu;
    Report {
        scenario: scenario.into(),
        target: c.target.name().into(),
        protocol: (c.target == Target::Herald).then(|| c.protocol.name().into()),
        url: c.url.clone(),
        procs: c.procs,
        threads: c.threads,
        connections,
        established: m.counts.established,
        failed: m.counts.failed,
        disconnected: m.counts.disconnected,
        ramp_s,
        connects_per_s: if ramp_s > 0.0 {
            m.counts.established as f64 / ramp_s
        } else {
            m.counts.established as f64
        },
        connect_latency_ms: connect_latency,
        delivered: m.counts.delivered,
        duplicated: m.counts.duplicated,
        out_of_order: m.counts.out_of_order,
        invalid: m.invalid,
        bytes_received: m.counts.bytes_received,
        server_pids: meter.server_pids.clone(),
        server_rss_before_bytes: meter.server_rss_before,
        generator_cpu_percent: if wall_s > 0.0 {
            cpu / wall_s * 100.0
        } else {
            0.0
        },
        generator_cpu_seconds: cpu,
        generator_rss_bytes: sysinfo::self_rss_bytes() + m.child_rss,
        generator_rss_per_connection_bytes: rss_per_connection(
            (m.rss_start > 0).then_some(m.rss_start),
            (m.rss_ready > 0).then_some(m.rss_ready),
            m.counts.established,
        ),
        wall_s,
        load_average_start: meter.load_start,
        load_average_end: sysinfo::load_average(),
        errors: m.errors.clone(),
        worker_failures: m.failures.clone(),
        connect_series: series_points(m.connect_series.iter().map(Vec::as_slice)),
        ..Default::default()
    }
}

/// `want` distinct user indices below `n` (all of them when `want >= n`), in random order
/// (xorshift seeded by the caller; a partial Fisher–Yates shuffle).
fn pick_users(n: u64, want: u64, seed: u64) -> Vec<u64> {
    let mut all: Vec<u64> = (0..n).collect();
    let k = want.min(n) as usize;
    let mut x = seed | 1;
    for i in 0..k {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = i + (x % (all.len() - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(k);
    all
}

fn rss_per_connection(before: Option<u64>, loaded: Option<u64>, established: u64) -> Option<f64> {
    match (before, loaded) {
        (Some(b), Some(l)) if established > 0 => Some((l as f64 - b as f64) / established as f64),
        _ => None,
    }
}

/// CPU seconds used so far by every generator process (the parent includes in-process
/// shards; children report theirs with each progress event).
fn generator_cpu(fleet: &Fleet, in_process: bool) -> f64 {
    let children = if in_process {
        0.0
    } else {
        fleet.totals().cpu_ms as f64 / 1000.0
    };
    sysinfo::self_cpu_seconds() + children
}

fn progress_message(c: &Counts) -> String {
    format!(
        "ok {} failed {} dropped {} delivered {}",
        c.established, c.failed, c.disconnected, c.delivered
    )
}

/// Ramps `--connections` up at `--rate`, holds them for `--duration`, closes.
pub async fn connect(args: ConnectArgs) -> Result<Report, BenchError> {
    let c = &args.common;
    check_target_options(c, None)?;
    check_range("duration", args.duration, 0.0, MAX_DURATION_S)?;
    if args.transport == Transport::WebsocketDeflate && c.target != Target::Herald {
        return Err(bad("--transport websocket-deflate needs --target herald"));
    }
    if args.transport.is_uni() {
        if c.target != Target::Herald || c.protocol != Protocol::Json || c.reconnect {
            return Err(bad(format!(
                "--transport {} needs --target herald with the JSON protocol, without --reconnect",
                args.transport.name()
            )));
        }
        if c.token_secret.is_none() {
            return Err(bad(format!(
                "--transport {} needs --token-secret: the connection's token subscribes it",
                args.transport.name()
            )));
        }
        for ep in loopback_endpoints(&c.url, &["ws"])? {
            crate::uni::path(&ep, true)?;
        }
    }
    if c.target == Target::Nchan {
        nchan::check_channel(&args.channel)?;
    }
    let ramp_s = args.connections as f64 / args.rate.max(0.001);
    let max_runtime = ramp_s + c.connect_timeout + args.duration + 120.0;
    let mut jobs = prepare(
        c,
        args.connections,
        args.rate,
        vec![args.channel.clone()],
        max_runtime,
    )?;
    for j in &mut jobs {
        j.transport = args.transport;
    }
    let meter = Meter::start(c.server_pid.clone());
    let server_cpu0 = sysinfo::total_cpu_seconds(&c.server_pid);
    let in_process = jobs.len() == 1;
    let mut fleet = Fleet::start(jobs)?;

    let bar = progress::bar(args.connections, "connect");
    let ramp_deadline = Instant::now() + Duration::from_secs_f64(ramp_s + c.connect_timeout + 30.0);
    let ramped = fleet
        .wait_until(
            ramp_deadline,
            |f| {
                let t = f.totals();
                bar.set_position(t.established + t.failed);
                bar.set_message(progress_message(&t));
            },
            Fleet::all_ready,
        )
        .await;
    bar.finish_and_clear();

    // Let the server settle (lazy allocations, timers) before reading its RSS.
    let settle_until = Instant::now() + Duration::from_secs(1);
    fleet.wait_until(settle_until, |_| {}, |_| false).await;
    let rss_loaded = sysinfo::total_rss_bytes(&c.server_pid);

    let hold = progress::bar(args.duration.ceil() as u64, "hold");
    let hold_start = Instant::now();
    fleet
        .wait_until(
            hold_start + Duration::from_secs_f64(args.duration),
            |f| {
                hold.set_position(hold_start.elapsed().as_secs());
                hold.set_message(progress_message(&f.totals()));
            },
            |_| false,
        )
        .await;
    hold.finish_and_clear();
    let server_cpu1 = sysinfo::total_cpu_seconds(&c.server_pid);
    let run_s = meter.wall.elapsed().as_secs_f64();

    let shards = fleet.finish(Duration::from_secs(30)).await;
    let m = merge(shards, in_process);
    let mut r = base_report("connect", c, args.connections, &m, &meter);
    if c.target == Target::Herald {
        r.transport = Some(args.transport.name().into());
    }
    reconnect_figures(&mut r, &m, c.reconnect);
    if !ramped {
        r.worker_failures.push("ramp did not finish in time".into());
    }
    r.channels = 1;
    r.duration_s = args.duration;
    r.latency_ms = r.connect_latency_ms.clone();
    r.series = r.connect_series.clone();
    r.server_rss_loaded_bytes = rss_loaded;
    r.rss_per_connection_bytes =
        rss_per_connection(meter.server_rss_before, rss_loaded, r.established);
    if let (Some(a), Some(b)) = (server_cpu0, server_cpu1) {
        r.server_cpu_percent = Some((b - a) / run_s * 100.0);
        r.server_cpu_seconds = Some(b - a);
    }
    Ok(r)
}

/// Subscribers over channels, one publisher; delivery and latency accounting.
pub async fn fanout(args: FanoutArgs) -> Result<Report, BenchError> {
    let c = &args.common;
    check_target_options(c, Some(&args))?;
    check_range("duration", args.duration, 0.1, MAX_DURATION_S)?;
    if c.target == Target::Nchan {
        // Channel names are the prefix and a number.
        nchan::check_channel(&format!("{}0", args.channel_prefix))?;
    }
    check_range("drain", args.drain, 0.0, 600.0)?;
    check_range("publish-rate", args.publish_rate, 0.01, MAX_RATE)?;
    if args.personal_rate != 0.0 {
        check_range("personal-rate", args.personal_rate, 0.01, MAX_RATE)?;
        if c.target != Target::Herald || c.token_secret.is_none() {
            return Err(bad(
                "--personal-rate needs --target herald and --token-secret (users bench-<i>)",
            ));
        }
    }
    if args.channels == 0 || args.channels > MAX_CHANNELS {
        return Err(bad(format!("--channels must be within 1..={MAX_CHANNELS}")));
    }
    if args.payload > MAX_PAYLOAD {
        return Err(bad(format!("--payload must be at most {MAX_PAYLOAD}")));
    }
    let ws = first_endpoint(&c.url)?;
    let api = match c.target {
        Target::Herald => {
            if args.api_key.is_none() {
                return Err(bad("--target herald needs --api-key (or HERALD_API_KEY)"));
            }
            let url = args
                .api_url
                .clone()
                .unwrap_or_else(|| format!("http://{}/api", ws.authority));
            Some(loopback_endpoint(&url, &["http"])?)
        }
        Target::Nchan => {
            let url = args
                .api_url
                .clone()
                .unwrap_or_else(|| format!("http://{}{}", ws.authority, nchan::DEFAULT_PUB_PATH));
            let ep = loopback_endpoint(&url, &["http"])?;
            nchan::location(&ep, nchan::DEFAULT_PUB_PATH)?;
            Some(ep)
        }
        _ => None,
    };
    let channels: Vec<String> = (0..args.channels)
        .map(|i| format!("{}{i}", args.channel_prefix))
        .collect();
    let ramp_s = args.subscribers as f64 / args.connect_rate.max(0.001);
    let max_runtime = ramp_s + c.connect_timeout + args.duration + args.drain + 180.0;
    let jobs = prepare(
        c,
        args.subscribers,
        args.connect_rate,
        channels.clone(),
        max_runtime,
    )?;
    let meter = Meter::start(c.server_pid.clone());
    let in_process = jobs.len() == 1;
    let mut fleet = Fleet::start(jobs)?;

    let bar = progress::bar(args.subscribers, "subscribe");
    let ramp_deadline = Instant::now() + Duration::from_secs_f64(ramp_s + c.connect_timeout + 30.0);
    let ramped = fleet
        .wait_until(
            ramp_deadline,
            |f| {
                let t = f.totals();
                bar.set_position(t.established + t.failed);
                bar.set_message(progress_message(&t));
            },
            Fleet::all_ready,
        )
        .await;
    bar.finish_and_clear();
    let mut subs_per_channel = Vec::new();
    for s in &fleet.shards {
        if let Some(v) = &s.ready {
            add_vec(&mut subs_per_channel, v);
        }
    }
    if fleet.totals().established == 0 {
        let shards = fleet.finish(Duration::from_secs(10)).await;
        let m = merge(shards, in_process);
        return Err(BenchError::Worker(format!(
            "no subscriber could connect; errors: {:?} {:?}",
            m.errors, m.failures
        )));
    }
    let rss_loaded = sysinfo::total_rss_bytes(&c.server_pid);
    let server_cpu0 = sysinfo::total_cpu_seconds(&c.server_pid);
    let gen_cpu0 = generator_cpu(&fleet, in_process);
    let publish_start = Instant::now();
    let publish_start_ns = now_ns();

    let cfg = PubConfig {
        target: c.target,
        ws,
        api,
        api_key: (c.target == Target::Herald)
            .then(|| args.api_key.clone())
            .flatten(),
        channels,
        channel_base: 0,
        rate: args.publish_rate,
        duration: Duration::from_secs_f64(args.duration),
        payload: args.payload,
        api_connections: args.api_connections,
        pipeline: args.pipeline,
    };
    // Personal pushes: distinct users, each getting its own sequence from 1.
    let personal_cfg = (args.personal_rate > 0.0).then(|| {
        let pushes = (args.personal_rate * args.duration).round().max(1.0) as u64;
        let users = pick_users(args.subscribers, pushes, now_ns());
        PubConfig {
            target: c.target,
            ws: cfg.ws.clone(),
            api: cfg.api.clone(),
            api_key: cfg.api_key.clone(),
            channels: users.iter().map(|u| format!("#bench-{u}")).collect(),
            channel_base: PERSONAL_C,
            rate: args.personal_rate,
            duration: cfg.duration,
            payload: args.payload,
            api_connections: args.api_connections,
            pipeline: args.pipeline,
        }
    });
    let sent = AtomicU64::new(0);
    let personal_sent = AtomicU64::new(0);
    let run_bar = progress::bar(args.duration.ceil() as u64, "publish");
    let (outcome, personal) = {
        let publisher = futures_util::future::join(run_publisher(&cfg, &sent), async {
            match &personal_cfg {
                Some(p) => Some(run_publisher(p, &personal_sent).await),
                None => None,
            }
        });
        tokio::pin!(publisher);
        loop {
            tokio::select! {
                r = &mut publisher => break r,
                _ = fleet.recv(Instant::now() + Duration::from_millis(250)) => {
                    run_bar.set_position(publish_start.elapsed().as_secs());
                    let t = fleet.totals();
                    run_bar.set_message(format!(
                        "sent {} delivered {} dropped {}",
                        sent.load(Ordering::Relaxed), t.delivered, t.disconnected
                    ));
                }
            }
        }
    };
    run_bar.finish_and_clear();
    let (outcome, personal) = match (outcome, personal.transpose()) {
        (Ok(o), Ok(p)) => (o, p),
        (Err(e), _) | (_, Err(e)) => {
            fleet.finish(Duration::from_secs(10)).await;
            return Err(e);
        }
    };
    let expected = account(&subs_per_channel, &outcome.published, &[]).expected;
    let personal_expected: u64 = personal.as_ref().map_or(0, |p| p.published.iter().sum());
    let drain_until = Instant::now() + Duration::from_secs_f64(args.drain);
    fleet
        .wait_until(
            drain_until,
            |_| {},
            |f| {
                let t = f.totals();
                t.delivered >= expected && t.personal_delivered >= personal_expected
            },
        )
        .await;
    let server_cpu1 = sysinfo::total_cpu_seconds(&c.server_pid);
    let publish_window = publish_start.elapsed().as_secs_f64();
    let gen_cpu_window = generator_cpu(&fleet, in_process) - gen_cpu0;

    let shards = fleet.finish(Duration::from_secs(30)).await;
    let m = merge(shards, in_process);
    // Expected from what was published, acknowledged or not: a publication whose answer
    // was lost (an API timeout) but which subscribers received would otherwise show as
    // more delivered than expected and hide the losses of its channel.
    let published_by = published_by_channel(&outcome.published, &m.highest_seq);
    let tally = account(&m.subs_per_channel, &published_by, &m.unique_per_channel);
    let mut r = base_report("fanout", c, args.subscribers, &m, &meter);
    if !ramped {
        r.worker_failures
            .push("subscriber ramp did not finish in time".into());
    }
    let published: u64 = outcome.published.iter().sum();
    let sent: u64 = published_by.iter().sum();
    if sent > published {
        r.published_unacknowledged = Some(sent - published);
    }
    let pub_s = outcome.send_elapsed.as_secs_f64().max(1e-9);
    r.channels = args.channels;
    r.publish_rate = Some(args.publish_rate);
    r.payload_bytes = Some(args.payload);
    r.duration_s = args.duration;
    r.published = Some(published);
    r.publish_errors = Some(outcome.errors);
    r.published_per_s = Some(published as f64 / pub_s);
    r.expected = Some(tally.expected);
    r.delivered = tally.delivered;
    r.lost = Some(tally.lost);
    // Sustained delivery rate: from the first publication to the last delivery, so a
    // server that queues (and delivers late) is not credited with the publish rate.
    let delivery_s = (m.last_delivery_ns.saturating_sub(publish_start_ns) as f64 / 1e9).max(pub_s);
    r.deliveries_per_s = Some(tally.delivered as f64 / delivery_s);
    if tally.delivered > 0 {
        r.bytes_per_delivery = Some(r.bytes_received as f64 / tally.delivered as f64);
    }
    r.latency_ms = m
        .latency
        .as_ref()
        .map(Percentiles::from_histogram)
        .unwrap_or_default();
    r.series = series_points(m.series.iter().map(Vec::as_slice));
    r.server_rss_loaded_bytes = rss_loaded;
    r.rss_per_connection_bytes =
        rss_per_connection(meter.server_rss_before, rss_loaded, r.established);
    if let (Some(a), Some(b)) = (server_cpu0, server_cpu1) {
        r.server_cpu_percent = Some((b - a) / publish_window * 100.0);
        r.server_cpu_seconds = Some(b - a);
        if tally.delivered > 0 {
            r.server_cpu_us_per_delivery = Some((b - a) * 1e6 / tally.delivered as f64);
        }
    }
    // While publishing is what matters: the ramp is a different load.
    r.generator_cpu_percent = gen_cpu_window / publish_window * 100.0;
    if tally.delivered > 0 {
        r.generator_cpu_us_per_delivery = Some(gen_cpu_window * 1e6 / tally.delivered as f64);
    }
    for (k, v) in outcome.error_kinds {
        *r.errors.entry(format!("publisher: {k}")).or_insert(0) += v;
    }
    if let (Some(p), Some(pc)) = (personal, &personal_cfg) {
        let delivered = m.counts.personal_delivered;
        r.personal_users = Some(pc.channels.len() as u64);
        r.personal_published = Some(personal_expected);
        r.personal_delivered = Some(delivered);
        r.personal_lost = Some(personal_expected.saturating_sub(delivered));
        r.personal_duplicated = Some(m.personal_duplicated);
        r.personal_latency_ms = Some(
            m.personal_latency
                .as_ref()
                .map(Percentiles::from_histogram)
                .unwrap_or_default(),
        );
        for (k, v) in p.error_kinds {
            *r.errors
                .entry(format!("personal publisher: {k}"))
                .or_insert(0) += v;
        }
    }
    reconnect_figures(&mut r, &m, c.reconnect);
    if args.channels == 1 && sent < TRACKED_PUBLICATIONS {
        r.publications = Some(publication_figures(
            &m.per_publication,
            sent,
            m.subs_per_channel.first().copied().unwrap_or(0),
        ));
    }
    Ok(r)
}

/// Each publication of a one-channel run (a broadcast): how many subscribers got it and,
/// when all did, how long after it was sent the last one had it.
fn publication_figures(
    tracks: &[PubTrack],
    published: u64,
    subscribers: u64,
) -> Vec<PublicationFigure> {
    (1..=published)
        .map(|seq| {
            let t = tracks.get(seq as usize).copied().unwrap_or_default();
            PublicationFigure {
                sequence: seq,
                subscribers,
                delivered: t.delivered,
                all_delivered_ms: (subscribers > 0 && t.delivered >= subscribers)
                    .then(|| t.last_us as f64 / 1000.0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broadcast_is_complete_only_when_every_subscriber_had_it() {
        let mut tracks = Vec::new();
        // Two processes' views: sequence 1 reached 2 + 1 subscribers, sequence 2 only 2.
        let a = [
            PubTrack::default(),
            PubTrack {
                delivered: 2,
                last_us: 4_000,
            },
            PubTrack {
                delivered: 2,
                last_us: 9_000,
            },
        ];
        let b = [
            PubTrack::default(),
            PubTrack {
                delivered: 1,
                last_us: 7_500,
            },
        ];
        merge_tracks(&mut tracks, &a);
        merge_tracks(&mut tracks, &b);
        let f = publication_figures(&tracks, 3, 3);
        assert_eq!(f.len(), 3);
        assert_eq!((f[0].sequence, f[0].delivered), (1, 3));
        assert_eq!(
            f[0].all_delivered_ms,
            Some(7.5),
            "the slowest of all processes"
        );
        assert_eq!((f[1].delivered, f[1].all_delivered_ms), (2, None));
        assert_eq!(
            (f[2].delivered, f[2].all_delivered_ms),
            (0, None),
            "never arrived"
        );
    }

    #[test]
    fn picked_users_are_distinct_and_in_range() {
        let users = pick_users(1000, 300, 42);
        assert_eq!(users.len(), 300);
        let set: std::collections::BTreeSet<u64> = users.iter().copied().collect();
        assert_eq!(set.len(), 300);
        assert!(users.iter().all(|&u| u < 1000));
        // Asking for more than there are gives everyone once.
        let mut all = pick_users(5, 9, 7);
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3, 4]);
        assert!(pick_users(0, 3, 1).is_empty());
    }
}
