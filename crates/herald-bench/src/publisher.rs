//! The publisher: one logical client sending R publications/s round-robin over the
//! channels. Herald gets them through its HTTP server API and nchan through its HTTP
//! publisher location (both pipelined keep-alive HTTP/1.1), NATS and MQTT through one
//! client-protocol WebSocket connection.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{MissedTickBehavior, timeout};

use crate::cli::Target;
use crate::client::{MAX_MESSAGE, feed, nats_wait};
use crate::error::BenchError;
use crate::mqtt::{self, Packet};
use crate::nats::{self, NatsEvent};
use crate::nchan;
use crate::net::{Endpoint, connect_tcp};
use crate::payload::{self, Stamp, now_ns};
use crate::ws::ws_connect;

/// Most publications sent in one tick (one WebSocket frame, or one pipelined write).
const MAX_BATCH: u64 = 1024;

pub struct PubConfig {
    pub target: Target,
    /// WebSocket endpoint (NATS, MQTT).
    pub ws: Endpoint,
    /// Herald server API base, or nchan's publisher location.
    pub api: Option<Endpoint>,
    /// Herald server API key.
    pub api_key: Option<String>,
    pub channels: Vec<String>,
    /// Added to a channel's index in the payload (`payload::PERSONAL_C` for personal
    /// channels, so subscribers tell them from the shared ones).
    pub channel_base: u32,
    pub rate: f64,
    pub duration: Duration,
    pub payload: usize,
    pub api_connections: u32,
    pub pipeline: u32,
}

#[derive(Debug, Default)]
pub struct PubOutcome {
    /// Publications the server accepted, per channel.
    pub published: Vec<u64>,
    pub attempted: u64,
    pub errors: u64,
    pub error_kinds: BTreeMap<String, u64>,
    /// From the first publication to the last acknowledgement / flush.
    pub elapsed: Duration,
    /// From the first publication to the last one sent.
    pub send_elapsed: Duration,
}

enum Sink {
    Http(HttpPool),
    Ws(WsPub),
}

impl Sink {
    async fn send(&mut self, items: &[(u32, u64)], cfg: &PubConfig) -> Result<(), BenchError> {
        match self {
            Sink::Http(p) => p.send(items, cfg).await,
            Sink::Ws(p) => p.send(items, cfg).await,
        }
    }
}

/// Publishes for `cfg.duration` at `cfg.rate`; `sent` follows progress.
pub async fn run_publisher(
    cfg: &PubConfig,
    sent_counter: &AtomicU64,
) -> Result<PubOutcome, BenchError> {
    let channels = cfg.channels.len().max(1) as u64;
    let mut sink = match cfg.target {
        Target::Herald | Target::Nchan => {
            let api = cfg.api.as_ref().ok_or_else(|| {
                BenchError::BadArgument(format!("{} needs a publish URL", cfg.target.name()))
            })?;
            let kind = match cfg.target {
                Target::Nchan => HttpKind::Nchan,
                _ => HttpKind::Herald(
                    cfg.api_key
                        .as_deref()
                        .ok_or_else(|| BenchError::BadArgument("herald needs --api-key".into()))?,
                ),
            };
            Sink::Http(HttpPool::connect(api, kind, cfg).await?)
        }
        Target::Nats | Target::Mqtt => Sink::Ws(WsPub::connect(cfg).await?),
    };

    let total = ((cfg.rate * cfg.duration.as_secs_f64()).round() as u64).max(1);
    let tick = Duration::from_secs_f64((1.0 / cfg.rate).clamp(0.001, 0.05));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let start = Instant::now();
    // A publisher that cannot keep up still stops: what it sent is what counts.
    let hard_end = start + cfg.duration + Duration::from_secs(10);
    let mut seqs = vec![0u64; channels as usize];
    let mut items = Vec::new();
    let mut sent = 0u64;
    while sent < total && Instant::now() < hard_end {
        ticker.tick().await;
        let due = ((start.elapsed().as_secs_f64() * cfg.rate) as u64 + 1).min(total);
        let n = due.saturating_sub(sent).min(MAX_BATCH);
        if n == 0 {
            continue;
        }
        items.clear();
        for k in 0..n {
            let c = ((sent + k) % channels) as usize;
            seqs[c] += 1;
            items.push((c as u32, seqs[c]));
        }
        sink.send(&items, cfg).await?;
        sent += n;
        sent_counter.store(sent, Ordering::Relaxed);
    }
    let send_elapsed = start.elapsed();
    let mut out = match sink {
        Sink::Http(p) => p.finish(channels as usize, start).await,
        Sink::Ws(p) => p.finish(cfg.target, start).await,
    };
    out.attempted = sent;
    out.send_elapsed = send_elapsed;
    Ok(out)
}

fn encode_payload(buf: &mut Vec<u8>, c: u32, s: u64, t: u64, cfg: &PubConfig) {
    let c = c.saturating_add(cfg.channel_base);
    payload::encode(buf, &Stamp { t, s, c }, cfg.payload);
}

// ---------------------------------------------------------------- HTTP publishers

/// Which HTTP publisher is spoken to.
#[derive(Clone, Copy, Debug)]
enum HttpKind<'a> {
    /// `POST {api}/publish` with `{"channel":…,"data":<payload>}` and the API key.
    Herald(&'a str),
    /// `POST {location}/<channel>` with the payload as the body.
    Nchan,
}

/// What an HTTP publisher's answer means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accept {
    /// 200 without `"error"` in the body.
    Herald,
    /// 201 or 202.
    Nchan,
}

#[derive(Default)]
struct HttpResults {
    ok: Vec<u64>,
    errors: u64,
    kinds: BTreeMap<String, u64>,
}

struct HttpConn {
    writer: OwnedWriteHalf,
    /// Free pipeline slots; the reader gives one back per response.
    slots: Arc<Semaphore>,
    /// Channel of each request in flight, in order (HTTP/1.1 answers in order).
    fifo: Arc<Mutex<VecDeque<u32>>>,
    reader: JoinHandle<()>,
    last_write: Instant,
}

/// A kept-alive API connection idle this long is replaced before the next request:
/// servers close idle keep-alive connections (Herald after `server.handshake_timeout`,
/// 10 s by default), and a request written as the close arrives would be lost.
const API_IDLE_REOPEN: Duration = Duration::from_secs(4);

impl HttpConn {
    async fn open(
        api: &Endpoint,
        accept: Accept,
        pipeline: u32,
        results: &Arc<Mutex<HttpResults>>,
    ) -> Result<Self, BenchError> {
        let tcp = connect_tcp(api.addr, None).await?;
        let (r, w) = tcp.into_split();
        let slots = Arc::new(Semaphore::new(pipeline as usize));
        let fifo = Arc::new(Mutex::new(VecDeque::new()));
        let reader = tokio::spawn(http_reader(
            r,
            accept,
            slots.clone(),
            fifo.clone(),
            results.clone(),
        ));
        Ok(HttpConn {
            writer: w,
            slots,
            fifo,
            reader,
            last_write: Instant::now(),
        })
    }

    /// Requests written that will never be answered.
    fn abandon(self) -> u64 {
        self.reader.abort();
        self.fifo.lock().len() as u64
    }
}

struct HttpPool {
    api: Endpoint,
    accept: Accept,
    conns: Vec<HttpConn>,
    results: Arc<Mutex<HttpResults>>,
    /// Request head per channel, up to and including `Content-Length: `; Herald's
    /// channels share one (a run with 75,000 personal channels held 75,000 copies).
    heads: Vec<Arc<[u8]>>,
    /// Herald: `{"channel":"<name>","data":` per channel, JSON-escaped once; nchan:
    /// nothing (the payload is the body).
    prefixes: Vec<Vec<u8>>,
    /// Herald: `}`; nchan: nothing.
    suffix: &'static [u8],
    pipeline: u32,
    buf: Vec<u8>,
    body: Vec<u8>,
}

impl HttpPool {
    async fn connect(
        api: &Endpoint,
        kind: HttpKind<'_>,
        cfg: &PubConfig,
    ) -> Result<Self, BenchError> {
        let accept = match kind {
            HttpKind::Herald(_) => Accept::Herald,
            HttpKind::Nchan => Accept::Nchan,
        };
        let results = Arc::new(Mutex::new(HttpResults {
            ok: vec![0; cfg.channels.len()],
            ..Default::default()
        }));
        let n = cfg
            .api_connections
            .clamp(1, 64)
            .min(cfg.channels.len().max(1) as u32);
        let pipeline = cfg.pipeline.clamp(1, 4096);
        let mut conns = Vec::new();
        for _ in 0..n {
            conns.push(HttpConn::open(api, accept, pipeline, &results).await?);
        }
        type Parts = (Vec<Arc<[u8]>>, Vec<Vec<u8>>, &'static [u8]);
        let (heads, prefixes, suffix): Parts = match kind {
            HttpKind::Herald(key) => {
                let path = format!("{}/publish", api.path.trim_end_matches('/'));
                let head = format!(
                    "POST {path} HTTP/1.1\r\nHost: {}\r\nX-API-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: ",
                    api.authority
                )
                .into_bytes();
                let prefixes = cfg
                    .channels
                    .iter()
                    .map(|ch| {
                        format!(
                            "{{\"channel\":{},\"data\":",
                            serde_json::Value::from(ch.as_str())
                        )
                        .into_bytes()
                    })
                    .collect();
                (vec![Arc::from(head); cfg.channels.len()], prefixes, b"}")
            }
            HttpKind::Nchan => {
                let heads = cfg
                    .channels
                    .iter()
                    .map(|ch| nchan::publish_head(api, ch).map(Arc::from))
                    .collect::<Result<_, _>>()?;
                (heads, vec![Vec::new(); cfg.channels.len()], b"")
            }
        };
        Ok(HttpPool {
            api: api.clone(),
            accept,
            conns,
            results,
            heads,
            prefixes,
            suffix,
            pipeline,
            buf: Vec::new(),
            body: Vec::new(),
        })
    }

    async fn send(&mut self, items: &[(u32, u64)], cfg: &PubConfig) -> Result<(), BenchError> {
        let n = self.conns.len();
        // Channel c always goes over connection c % n so its publications stay in order.
        for ci in 0..n {
            let stale = {
                let conn = &self.conns[ci];
                conn.slots.is_closed()
                    || (conn.fifo.lock().is_empty() && conn.last_write.elapsed() >= API_IDLE_REOPEN)
            };
            if stale {
                let fresh =
                    HttpConn::open(&self.api, self.accept, self.pipeline, &self.results).await?;
                let unanswered = std::mem::replace(&mut self.conns[ci], fresh).abandon();
                if unanswered > 0 {
                    let mut res = self.results.lock();
                    res.errors += unanswered;
                    *res.kinds
                        .entry("API connection closed with requests in flight".into())
                        .or_insert(0) += unanswered;
                }
            }
            let conn = &mut self.conns[ci];
            let mine: Vec<(u32, u64)> = items
                .iter()
                .copied()
                .filter(|(c, _)| *c as usize % n == ci)
                .collect();
            for chunk in mine.chunks(self.pipeline as usize) {
                conn.slots
                    .acquire_many(chunk.len() as u32)
                    .await
                    .map_err(|_| BenchError::Http("API connection closed by the server".into()))?
                    .forget();
                // Stamp after waiting for a slot: time spent queued behind our own
                // pipeline limit is the generator's, not the server's.
                let t = now_ns();
                self.buf.clear();
                {
                    let mut fifo = conn.fifo.lock();
                    for &(c, s) in chunk {
                        self.body.clear();
                        self.body.extend_from_slice(&self.prefixes[c as usize]);
                        encode_payload(&mut self.body, c, s, t, cfg);
                        self.body.extend_from_slice(self.suffix);
                        self.buf.extend_from_slice(&self.heads[c as usize]);
                        self.buf
                            .extend_from_slice(format!("{}\r\n\r\n", self.body.len()).as_bytes());
                        self.buf.extend_from_slice(&self.body);
                        fifo.push_back(c);
                    }
                }
                conn.writer.write_all(&self.buf).await?;
                conn.last_write = Instant::now();
            }
        }
        Ok(())
    }

    async fn finish(self, channels: usize, start: Instant) -> PubOutcome {
        let deadline = Instant::now() + Duration::from_secs(10);
        for conn in &self.conns {
            while conn.slots.available_permits() < self.pipeline as usize
                && !conn.slots.is_closed()
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let elapsed = start.elapsed();
        let mut unanswered = 0;
        for conn in self.conns {
            unanswered += conn.abandon();
        }
        let r = std::mem::take(&mut *self.results.lock());
        let mut kinds = r.kinds;
        if unanswered > 0 {
            *kinds.entry("no API response".into()).or_insert(0) += unanswered;
        }
        let mut published = r.ok;
        published.resize(channels, 0);
        PubOutcome {
            published,
            errors: r.errors + unanswered,
            error_kinds: kinds,
            elapsed,
            ..Default::default()
        }
    }
}

/// Reads pipelined responses in order and credits each to its channel.
async fn http_reader(
    mut r: OwnedReadHalf,
    accept: Accept,
    slots: Arc<Semaphore>,
    fifo: Arc<Mutex<VecDeque<u32>>>,
    results: Arc<Mutex<HttpResults>>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let mut off = 0;
        loop {
            match parse_response(&buf[off..], accept) {
                Ok(Some(resp)) => {
                    off += resp.len;
                    let ch = fifo.lock().pop_front();
                    let mut res = results.lock();
                    match (ch, resp.ok) {
                        (Some(c), true) => {
                            if let Some(n) = res.ok.get_mut(c as usize) {
                                *n += 1;
                            }
                        }
                        (_, ok) => {
                            res.errors += 1;
                            let kind = if ok {
                                "unexpected publish response".to_string()
                            } else {
                                format!("publish status {} {}", resp.status, resp.error_hint)
                            };
                            *res.kinds.entry(kind).or_insert(0) += 1;
                        }
                    }
                    drop(res);
                    slots.add_permits(1);
                }
                Ok(None) => break,
                Err(e) => {
                    *results.lock().kinds.entry(e.to_string()).or_insert(0) += 1;
                    slots.close();
                    return;
                }
            }
        }
        buf.drain(..off);
        if buf.len() > 16 << 20 {
            break;
        }
    }
    // Wake a publisher waiting for slots: this connection is gone.
    slots.close();
}

struct HttpResponse {
    len: usize,
    status: u16,
    ok: bool,
    error_hint: String,
}

/// Parses one HTTP/1.1 response (Content-Length or chunked body).
fn parse_response(buf: &[u8], accept: Accept) -> Result<Option<HttpResponse>, BenchError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(BenchError::Http(format!("bad response: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let mut content_length = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| BenchError::Http("bad Content-Length".into()))?;
            content_length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            && h.value.to_ascii_lowercase().ends_with(b"chunked")
        {
            chunked = true;
        }
    }
    let rest = &buf[head_len..];
    let (body, used) = if chunked {
        match dechunk(rest)? {
            Some(x) => x,
            None => return Ok(None),
        }
    } else {
        let n = content_length.unwrap_or(0);
        if rest.len() < n {
            return Ok(None);
        }
        (rest[..n].to_vec(), n)
    };
    let ok = match accept {
        // The API answers 200 with {"error":{…}} for refused commands.
        Accept::Herald => status == 200 && !body.windows(7).any(|w| w == b"\"error\""),
        Accept::Nchan => nchan::accepted(status),
    };
    let error_hint = if ok {
        String::new()
    } else {
        String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned()
    };
    Ok(Some(HttpResponse {
        len: head_len + used,
        status,
        ok,
        error_hint,
    }))
}

/// Decodes a chunked body: `Ok(None)` until the terminating chunk has arrived.
fn dechunk(mut buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, BenchError> {
    let start_len = buf.len();
    let mut body = Vec::new();
    loop {
        let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_str = std::str::from_utf8(&buf[..eol])
            .ok()
            .map(|s| s.split(';').next().unwrap_or("").trim())
            .ok_or_else(|| BenchError::Http("bad chunk size".into()))?;
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|_| BenchError::Http("bad chunk size".into()))?;
        buf = &buf[eol + 2..];
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                return Ok(None);
            };
            buf = &buf[end + 2..];
            return Ok(Some((body, start_len - buf.len())));
        }
        if buf.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[..size]);
        buf = &buf[size + 2..];
    }
}

// ---------------------------------------------------------------- NATS / MQTT

struct WsPub {
    tx: mpsc::Sender<Vec<u8>>,
    /// Writes what `tx` sends and reads the server's answers, on one connection.
    io: JoinHandle<Result<(), BenchError>>,
    /// Flush acknowledgements (NATS PONG / MQTT PINGRESP) seen by the reader.
    acks: Arc<AtomicU64>,
    errors: Arc<Mutex<BTreeMap<String, u64>>>,
    published: Vec<u64>,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl WsPub {
    async fn connect(cfg: &PubConfig) -> Result<Self, BenchError> {
        let mut ws = match cfg.target {
            Target::Nats => {
                let mut ws = ws_connect(&cfg.ws, None, None).await?;
                let mut carry = Vec::new();
                nats_wait(&mut ws, &mut carry, |e| matches!(e, NatsEvent::Info(_))).await?;
                let mut out = Vec::new();
                nats::encode_connect(&mut out, "hb-publisher");
                out.extend_from_slice(nats::PING);
                ws.send_binary(&out).await?;
                nats_wait(&mut ws, &mut carry, |e| matches!(e, NatsEvent::Pong)).await?;
                ws
            }
            _ => {
                let mut ws = ws_connect(&cfg.ws, None, Some("mqtt")).await?;
                let mut out = Vec::new();
                // Keep-alive 0: the publisher is never idle, and its only PINGREQ is
                // the final flush barrier.
                mqtt::encode_connect(&mut out, &format!("hb-pub-{}", std::process::id()), 0);
                ws.send_binary(&out).await?;
                let mut carry = Vec::new();
                loop {
                    let m = ws.next_data().await?;
                    let mut code = None;
                    feed(&mut carry, &m.data, |b| {
                        Ok::<_, BenchError>(mqtt::decode(b, MAX_MESSAGE)?.map(|(p, n)| {
                            if let Packet::Connack { code: c, .. } = p {
                                code = Some(c);
                            }
                            n
                        }))
                    })?;
                    match code {
                        Some(0) => break,
                        Some(c) => {
                            return Err(BenchError::Protocol(format!("mqtt CONNACK code {c}")));
                        }
                        None => {}
                    }
                }
                ws
            }
        };
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        let acks = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(BTreeMap::new()));
        let (acks2, errors2, target) = (acks.clone(), errors.clone(), cfg.target);
        let io = tokio::spawn(async move {
            let mut carry = Vec::new();
            loop {
                let mut pings = 0;
                let mut failed = None;
                // Reading is cancel-safe; a write, once begun, is finished in its arm.
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => ws.send_binary(&m).await?,
                        None => break,
                    },
                    r = ws.read(|_, data| {
                        let res = if target == Target::Nats {
                            feed(&mut carry, data, |b| {
                                Ok::<_, BenchError>(nats::parse(b, MAX_MESSAGE)?.map(|(ev, n)| {
                                    match ev {
                                        NatsEvent::Ping => pings += 1,
                                        NatsEvent::Pong => {
                                            acks2.fetch_add(1, Ordering::Release);
                                        }
                                        NatsEvent::Err(e) => {
                                            let k =
                                                format!("nats -ERR {}", String::from_utf8_lossy(e));
                                            *errors2.lock().entry(k).or_insert(0) += 1;
                                        }
                                        _ => {}
                                    }
                                    n
                                }))
                            })
                        } else {
                            feed(&mut carry, data, |b| {
                                Ok::<_, BenchError>(mqtt::decode(b, MAX_MESSAGE)?.map(|(p, n)| {
                                    if p == Packet::Pingresp {
                                        acks2.fetch_add(1, Ordering::Release);
                                    }
                                    n
                                }))
                            })
                        };
                        if let Err(e) = res {
                            failed = Some(e);
                        }
                    }) => r?,
                }
                if let Some(e) = failed {
                    *errors2.lock().entry(e.kind()).or_insert(0) += 1;
                    break;
                }
                for _ in 0..pings {
                    ws.send_binary(nats::PONG).await?;
                }
            }
            ws.close(None).await;
            Ok(())
        });
        Ok(WsPub {
            tx,
            io,
            acks,
            errors,
            published: vec![0; cfg.channels.len()],
            buf: Vec::new(),
            scratch: Vec::new(),
        })
    }

    async fn send(&mut self, items: &[(u32, u64)], cfg: &PubConfig) -> Result<(), BenchError> {
        let t = now_ns();
        self.buf.clear();
        for &(c, s) in items {
            self.scratch.clear();
            encode_payload(&mut self.scratch, c, s, t, cfg);
            let topic = &cfg.channels[c as usize];
            if cfg.target == Target::Nats {
                nats::encode_pub(&mut self.buf, topic, &self.scratch);
            } else {
                mqtt::encode_publish(&mut self.buf, topic, &self.scratch);
            }
        }
        // Several publications per frame: the protocols allow it, and it keeps the
        // publisher cheap so the subscribers' side is what gets measured.
        self.tx
            .send(std::mem::take(&mut self.buf))
            .await
            .map_err(|_| BenchError::Closed("publisher connection".into()))?;
        for &(c, _) in items {
            self.published[c as usize] += 1;
        }
        Ok(())
    }

    /// Flush barrier: the server answers PING / PINGREQ after it has processed
    /// every publication sent before it.
    async fn finish(self, target: Target, start: Instant) -> PubOutcome {
        let mut out = PubOutcome {
            published: self.published,
            ..Default::default()
        };
        let mut ping = Vec::new();
        if target == Target::Nats {
            ping.extend_from_slice(nats::PING);
        } else {
            mqtt::encode_pingreq(&mut ping);
        }
        let before = self.acks.load(Ordering::Acquire);
        let flushed = self.tx.send(ping).await.is_ok()
            && timeout(Duration::from_secs(10), async {
                while self.acks.load(Ordering::Acquire) <= before {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await
            .is_ok();
        out.elapsed = start.elapsed();
        if !flushed {
            *out.error_kinds
                .entry("publisher flush not acknowledged".into())
                .or_insert(0) += 1;
        }
        if target == Target::Mqtt {
            let mut bye = Vec::new();
            mqtt::encode_disconnect(&mut bye);
            let _ = self.tx.send(bye).await;
        }
        drop(self.tx);
        let _ = timeout(Duration::from_secs(2), self.io).await;
        out.error_kinds
            .extend(std::mem::take(&mut *self.errors.lock()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pipelined_responses() {
        let one = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n{\"result\":{}}";
        let err = b"HTTP/1.1 200 OK\r\ncontent-length: 36\r\n\r\n{\"error\":{\"code\":102,\"message\":\"x\"}}";
        let chunked = b"HTTP/1.1 401 Unauthorized\r\ntransfer-encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n";
        let mut all = Vec::new();
        all.extend_from_slice(one);
        all.extend_from_slice(err);
        all.extend_from_slice(chunked);
        let r1 = parse_response(&all, Accept::Herald).unwrap().unwrap();
        assert!(r1.ok);
        assert_eq!(r1.len, one.len());
        let r2 = parse_response(&all[r1.len..], Accept::Herald)
            .unwrap()
            .unwrap();
        assert!(!r2.ok);
        assert_eq!(r2.status, 200);
        let r3 = parse_response(&all[r1.len + r2.len..], Accept::Herald)
            .unwrap()
            .unwrap();
        assert!(!r3.ok);
        assert_eq!(r3.status, 401);
        assert_eq!(r1.len + r2.len + r3.len, all.len());
        for cut in 0..one.len() {
            assert!(
                parse_response(&one[..cut], Accept::Herald)
                    .unwrap()
                    .is_none(),
                "cut {cut}"
            );
        }
        for cut in 0..chunked.len() {
            assert!(
                parse_response(&chunked[..cut], Accept::Herald)
                    .unwrap()
                    .is_none(),
                "cut {cut}"
            );
        }
        assert!(parse_response(b"garbage\r\n\r\n", Accept::Herald).is_err());
    }

    /// A server that answers one request per connection and closes it (as servers do
    /// with idle keep-alive connections): every publication still goes out, each on a
    /// fresh connection, none counted as an error.
    #[tokio::test(flavor = "current_thread")]
    async fn a_closed_api_connection_is_reopened() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    // Read until the head and its Content-Length body are in.
                    loop {
                        let mut chunk = [0u8; 4096];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        let mut headers = [httparse::EMPTY_HEADER; 16];
                        let mut req = httparse::Request::new(&mut headers);
                        if let Ok(httparse::Status::Complete(head)) = req.parse(&buf) {
                            let len = req
                                .headers
                                .iter()
                                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                                .unwrap_or(0usize);
                            if buf.len() >= head + len {
                                break;
                            }
                        }
                    }
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 13\r\n\r\n{\"result\":{}}")
                        .await;
                });
            }
        });
        let api = crate::net::loopback_endpoint(&format!("http://{addr}/api"), &["http"]).unwrap();
        let cfg = PubConfig {
            target: Target::Herald,
            ws: api.clone(),
            api: Some(api),
            api_key: Some("k".into()),
            channels: vec!["c".into()],
            channel_base: 0,
            rate: 2.0,
            duration: Duration::from_millis(1500),
            payload: 64,
            api_connections: 1,
            pipeline: 4,
        };
        let sent = AtomicU64::new(0);
        let out = run_publisher(&cfg, &sent).await.unwrap();
        assert_eq!(out.attempted, 3);
        assert_eq!(out.published, vec![3], "{:?}", out.error_kinds);
        assert_eq!(out.errors, 0, "{:?}", out.error_kinds);
        assert_eq!(accepted.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn nchan_accepts_created_and_accepted() {
        let body = "queued messages: 1\r\nlast requested: -1 sec. ago\r\nactive subscribers: 0\r\nlast message id: 1796519467:0";
        for (status, ok) in [
            ("201 Created", true),
            ("202 Accepted", true),
            ("200 OK", false),
            ("403 Forbidden", false),
        ] {
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let r = parse_response(resp.as_bytes(), Accept::Nchan)
                .unwrap()
                .unwrap();
            assert_eq!(r.ok, ok, "{status}");
            assert_eq!(r.len, resp.len());
        }
        // Herald's rule does not leak into nchan's: 200 is not an nchan success.
        let herald_ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert!(
            parse_response(herald_ok, Accept::Herald)
                .unwrap()
                .unwrap()
                .ok
        );
        assert!(
            !parse_response(herald_ok, Accept::Nchan)
                .unwrap()
                .unwrap()
                .ok
        );
    }
}
