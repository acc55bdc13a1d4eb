//! The embedded engine for a single node: history, offsets and presence in this process.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_protocol::client::{ClientInfo, Publication};
use parking_lot::Mutex;

use herald_protocol::api::NodeInfo;

use super::{
    BoxFut, ControlCommand, Engine, EngineError, HistoryQuery, HistoryResult, PublishOptions,
    StreamPosition,
};
use crate::hub::BrokerHandler;

/// One channel's stream: offsets, history, and the publications waiting to be delivered.
struct Stream {
    epoch: String,
    top: u64,
    /// (expires at, publication), oldest first; None: never (a ttl past `Instant`'s range).
    pubs: VecDeque<(Option<Instant>, Publication)>,
    touched: Instant,
    meta_ttl: Duration,
    /// Publications given an offset but not yet handed to the hub, in offset order.
    pending: VecDeque<Publication>,
    /// A publisher is delivering `pending` outside the lock; the others only enqueue.
    delivering: bool,
    /// Its life is over (idle past its meta ttl): history dropped, life counters bumped. The
    /// next publish starts a new life in place.
    ended: bool,
    /// Taken out of the map by the sweep; whoever still holds it looks the channel up again.
    removed: bool,
}

impl Stream {
    fn new(epoch: String, now: Instant, meta_ttl: Duration) -> Self {
        Self {
            epoch,
            top: 0,
            pubs: VecDeque::new(),
            touched: now,
            meta_ttl,
            pending: VecDeque::new(),
            delivering: false,
            ended: false,
            removed: false,
        }
    }

    /// Idle for longer than its metadata ttl: the stream is lost.
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.touched) > self.meta_ttl
    }

    fn end(&mut self) {
        self.ended = true;
        self.pubs = VecDeque::new();
    }

    /// Keeps at most `size` publications and none past its expiry instant.
    fn trim(&mut self, now: Instant, size: usize) {
        while self.pubs.len() > size {
            self.pubs.pop_front();
        }
        while let Some((Some(expires), _)) = self.pubs.front() {
            if *expires <= now {
                self.pubs.pop_front();
            } else {
                break;
            }
        }
    }
}

type StreamRef = Arc<Mutex<Stream>>;

/// Rows and cells per row of the life counters (see `Streams::epoch`).
const LIFE_ROWS: usize = 2;
const LIFE_CELLS: usize = 8192;

/// Streams examined for idleness per publish or history call.
const SWEEP_BATCH: usize = 4;

/// The stream map. Lock order: a stream's lock may be held while taking this one, never the
/// reverse (the sweep only `try_lock`s streams).
struct Streams {
    map: HashMap<Arc<str>, StreamRef>,
    /// The map's keys, each once, in the order the sweep visits them.
    sweep: VecDeque<Arc<str>>,
    /// Lossy per-channel life counters: a channel's cells are bumped when one of its streams
    /// ends. A stream's epoch is a keyed hash of its channel and cells, so a channel with no
    /// stream already has the epoch its next stream will get: reads create nothing and a
    /// position handed out before the first publish stays valid. Lives of one channel never
    /// share an epoch (its cells only grow); another channel bumping both of its cells in
    /// between changes it, which costs that client one `recovered: false`.
    lives: Box<[u32]>,
}

impl Streams {
    fn cells(keys: &RandomState, channel: &str) -> [usize; LIFE_ROWS] {
        std::array::from_fn(|row| {
            let h = keys.hash_one((row, channel));
            row * LIFE_CELLS + (h % LIFE_CELLS as u64) as usize
        })
    }

    /// The epoch of the channel's current (or next) life.
    fn epoch(&self, keys: &RandomState, channel: &str) -> String {
        let lives = Self::cells(keys, channel).map(|i| self.lives[i]);
        encode_epoch(keys.hash_one((channel, lives)))
    }

    fn end_life(&mut self, keys: &RandomState, channel: &str) {
        for i in Self::cells(keys, channel) {
            self.lives[i] = self.lives[i].wrapping_add(1);
        }
    }

    /// Removes up to `SWEEP_BATCH` streams idle past their meta ttl.
    fn sweep(&mut self, keys: &RandomState, now: Instant) {
        for _ in 0..SWEEP_BATCH.min(self.sweep.len()) {
            let Some(name) = self.sweep.pop_front() else {
                break;
            };
            // Some(bump) when removable; a busy (locked) stream is not idle.
            let verdict = self.map.get(&name).and_then(|stream| {
                let mut s = stream.try_lock()?;
                if !(s.ended || s.expired(now)) || s.delivering || !s.pending.is_empty() {
                    return None;
                }
                let bump = !s.ended;
                s.end();
                s.removed = true;
                Some(bump)
            });
            match verdict {
                Some(bump) => {
                    self.map.remove(&name);
                    if bump {
                        self.end_life(keys, &name);
                    }
                }
                None if self.map.contains_key(&name) => self.sweep.push_back(name),
                None => {}
            }
        }
    }
}

/// 8 alphanumerics from a hash.
fn encode_epoch(mut h: u64) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let base = ALPHABET.len() as u64;
    (0..8)
        .map(|_| {
            let c = ALPHABET[(h % base) as usize] as char;
            h /= base;
            c
        })
        .collect()
}

pub struct MemoryEngine {
    handler: Arc<dyn BrokerHandler>,
    streams: Mutex<Streams>,
    /// Keys the epoch hash: another process gives the same channel other epochs.
    keys: RandomState,
    presence: Mutex<HashMap<String, BTreeMap<String, ClientInfo>>>,
    idempotency: Mutex<HashMap<(String, String), (Instant, StreamPosition)>>,
}

/// How long an idempotency key is remembered.
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);

/// Clears `delivering` if a handler panics mid-delivery, so the stream is not left with
/// nobody to deliver it.
struct DeliveryGuard<'a>(&'a Mutex<Stream>);

impl Drop for DeliveryGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().delivering = false;
        }
    }
}

impl MemoryEngine {
    pub fn new(handler: Arc<dyn BrokerHandler>) -> Self {
        Self {
            handler,
            streams: Mutex::new(Streams {
                map: HashMap::new(),
                sweep: VecDeque::new(),
                lives: vec![0; LIFE_ROWS * LIFE_CELLS].into_boxed_slice(),
            }),
            keys: RandomState::new(),
            presence: Mutex::new(HashMap::new()),
            idempotency: Mutex::new(HashMap::new()),
        }
    }

    /// The channel's stream, created if absent (publish only: reads never create one).
    fn stream_for_publish(&self, channel: &str, meta_ttl: Duration, now: Instant) -> StreamRef {
        let mut st = self.streams.lock();
        st.sweep(&self.keys, now);
        if let Some(s) = st.map.get(channel) {
            return s.clone();
        }
        let stream = Arc::new(Mutex::new(Stream::new(
            st.epoch(&self.keys, channel),
            now,
            meta_ttl,
        )));
        let name: Arc<str> = Arc::from(channel);
        st.map.insert(name.clone(), stream.clone());
        st.sweep.push_back(name);
        stream
    }

    fn do_publish(
        &self,
        channel: &str,
        mut publication: Publication,
        opts: &PublishOptions,
        now: Instant,
    ) -> StreamPosition {
        if let Some(key) = &opts.idempotency_key {
            let mut seen = self.idempotency.lock();
            seen.retain(|_, (at, _)| now.saturating_duration_since(*at) < IDEMPOTENCY_WINDOW);
            if let Some((_, pos)) = seen.get(&(channel.to_string(), key.clone())) {
                return pos.clone();
            }
        }
        let pos = if opts.history_size == 0 || opts.history_ttl.is_zero() {
            self.handler.on_publication(channel, publication);
            StreamPosition::default()
        } else {
            let (stream, pos, drain) = loop {
                let stream = self.stream_for_publish(channel, opts.history_meta_ttl, now);
                let mut s = stream.lock();
                if s.removed {
                    continue;
                }
                if s.ended || s.expired(now) {
                    // The stream was lost: a new life, with its own epoch, in place.
                    let epoch = {
                        let mut st = self.streams.lock();
                        if !s.ended {
                            st.end_life(&self.keys, channel);
                        }
                        st.epoch(&self.keys, channel)
                    };
                    s.end();
                    s.epoch = epoch;
                    s.top = 0;
                    s.ended = false;
                }
                s.meta_ttl = opts.history_meta_ttl;
                s.touched = now;
                s.top = s.top.saturating_add(1);
                publication.offset = s.top;
                s.pubs
                    .push_back((now.checked_add(opts.history_ttl), publication.clone()));
                s.trim(now, opts.history_size);
                // Offsets are assigned and queued in the same critical section, so the queue
                // is in offset order; delivery happens after the lock is released.
                s.pending.push_back(publication);
                let drain = !std::mem::replace(&mut s.delivering, true);
                let pos = StreamPosition {
                    offset: s.top,
                    epoch: s.epoch.clone(),
                };
                drop(s);
                break (stream, pos, drain);
            };
            if drain {
                self.deliver_pending(channel, &stream);
            }
            pos
        };
        if let Some(key) = &opts.idempotency_key {
            self.idempotency
                .lock()
                .insert((channel.to_string(), key.clone()), (now, pos.clone()));
        }
        pos
    }

    /// Run by the one publisher that found no delivery in progress: hands the queued
    /// publications to the hub in offset order, its own and those queued meanwhile by others,
    /// until the queue is empty. No lock is held while the hub fans out.
    fn deliver_pending(&self, channel: &str, stream: &Mutex<Stream>) {
        let _guard = DeliveryGuard(stream);
        loop {
            let batch = {
                let mut s = stream.lock();
                if s.pending.is_empty() {
                    s.delivering = false;
                    return;
                }
                std::mem::take(&mut s.pending)
            };
            for publication in batch {
                self.handler.on_publication(channel, publication);
            }
        }
    }

    /// The position a channel without a stream reports: offset 0 and the epoch its next
    /// stream will get.
    fn absent(st: &Streams, keys: &RandomState, channel: &str) -> HistoryResult {
        HistoryResult {
            publications: Vec::new(),
            position: StreamPosition {
                offset: 0,
                epoch: st.epoch(keys, channel),
            },
        }
    }

    fn do_history(&self, channel: &str, q: &HistoryQuery, now: Instant) -> HistoryResult {
        loop {
            let stream = {
                let mut st = self.streams.lock();
                st.sweep(&self.keys, now);
                match st.map.get(channel) {
                    Some(s) => s.clone(),
                    None => return Self::absent(&st, &self.keys, channel),
                }
            };
            let mut s = stream.lock();
            if s.removed {
                continue;
            }
            if s.ended || s.expired(now) {
                let mut st = self.streams.lock();
                if !s.ended {
                    st.end_life(&self.keys, channel);
                    s.end();
                }
                return Self::absent(&st, &self.keys, channel);
            }
            let size = s.pubs.len();
            s.trim(now, size);
            let position = StreamPosition {
                offset: s.top,
                epoch: s.epoch.clone(),
            };
            let after = q.since.as_ref().map_or(0, |p| p.offset);
            if q.whole_within
                .is_some_and(|m| s.top.saturating_sub(after) > m as u64)
            {
                return HistoryResult {
                    publications: Vec::new(),
                    position,
                };
            }
            let mut pubs: Vec<Publication> = s
                .pubs
                .iter()
                .filter(|(_, p)| p.offset > after)
                .map(|(_, p)| p.clone())
                .collect();
            if q.reverse {
                pubs.reverse();
            }
            if let Some(limit) = q.limit {
                pubs.truncate(limit);
            }
            return HistoryResult {
                publications: pubs,
                position,
            };
        }
    }
}

fn ready<'a, T: Send + 'a>(v: T) -> BoxFut<'a, T> {
    Box::pin(std::future::ready(v))
}

impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        opts: &'a PublishOptions,
    ) -> BoxFut<'a, Result<StreamPosition, EngineError>> {
        ready(Ok(self.do_publish(
            channel,
            publication,
            opts,
            Instant::now(),
        )))
    }

    fn publish_join_leave<'a>(
        &'a self,
        channel: &'a str,
        info: ClientInfo,
        join: bool,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        self.handler.on_join_leave(channel, &info, join);
        ready(Ok(()))
    }

    fn subscribe<'a>(&'a self, _channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        ready(Ok(()))
    }

    fn unsubscribe<'a>(&'a self, _channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        ready(Ok(()))
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFut<'a, Result<HistoryResult, EngineError>> {
        ready(Ok(self.do_history(channel, &query, Instant::now())))
    }

    fn remove_history<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        // Not holding the map lock while taking the stream's (see `Streams`).
        let stream = self.streams.lock().map.get(channel).cloned();
        if let Some(s) = stream {
            // Offsets and epoch stay: removing history is not losing the stream.
            s.lock().pubs.clear();
        }
        ready(Ok(()))
    }

    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
        info: ClientInfo,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        self.presence
            .lock()
            .entry(channel.to_string())
            .or_default()
            .insert(client_id.to_string(), info);
        ready(Ok(()))
    }

    fn remove_presence<'a>(
        &'a self,
        channel: &'a str,
        client_id: &'a str,
    ) -> BoxFut<'a, Result<(), EngineError>> {
        let mut p = self.presence.lock();
        if let Some(m) = p.get_mut(channel) {
            m.remove(client_id);
            if m.is_empty() {
                p.remove(channel);
            }
        }
        ready(Ok(()))
    }

    fn publish_control<'a>(&'a self, cmd: ControlCommand) -> BoxFut<'a, Result<(), EngineError>> {
        self.handler.on_control(cmd);
        ready(Ok(()))
    }

    fn heartbeat<'a>(&'a self, _info: NodeInfo) -> BoxFut<'a, Result<(), EngineError>> {
        ready(Ok(()))
    }

    fn channels<'a>(&'a self) -> BoxFut<'a, Result<Vec<(String, u32)>, EngineError>> {
        ready(Ok(self.handler.local_channels()))
    }

    fn presence<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFut<'a, Result<BTreeMap<String, ClientInfo>, EngineError>> {
        ready(Ok(self
            .presence
            .lock()
            .get(channel)
            .cloned()
            .unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::ConnHandle;
    use crate::hub::Hub;

    fn publication(n: u32) -> Publication {
        Publication {
            data: herald_protocol::json::raw_from_str(&n.to_string()).unwrap(),
            info: None,
            offset: 0,
            tags: Default::default(),
            time: 0,
            binary: false,
            delta: false,
        }
    }

    fn opts(size: usize) -> PublishOptions {
        PublishOptions {
            history_size: size,
            history_ttl: Duration::from_secs(60),
            history_meta_ttl: Duration::from_secs(3600),
            idempotency_key: None,
        }
    }

    #[test]
    fn offsets_history_and_trim() {
        let e = MemoryEngine::new(Arc::new(Hub::new()));
        let o = opts(3);
        let mut last = StreamPosition::default();
        for i in 0..5 {
            last = e.do_publish("ch", publication(i), &o, Instant::now());
        }
        assert_eq!(last.offset, 5);
        let h = e.do_history("ch", &HistoryQuery::default(), Instant::now());
        let offs: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offs, [3, 4, 5]);
        assert_eq!(h.position, last);
        let h = e.do_history(
            "ch",
            &HistoryQuery {
                since: Some(StreamPosition {
                    offset: 4,
                    epoch: last.epoch.clone(),
                }),
                ..Default::default()
            },
            Instant::now(),
        );
        assert_eq!(h.publications.len(), 1);
        let h = e.do_history(
            "ch",
            &HistoryQuery {
                limit: Some(2),
                reverse: true,
                ..Default::default()
            },
            Instant::now(),
        );
        let offs: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offs, [5, 4]);
    }

    #[test]
    fn more_than_whole_within_after_since_gives_the_position_only() {
        let e = MemoryEngine::new(Arc::new(Hub::new()));
        for i in 1..=5 {
            e.do_publish("ch", publication(i), &opts(10), Instant::now());
        }
        let since = |offset| {
            Some(StreamPosition {
                offset,
                epoch: String::new(),
            })
        };
        let q = |offset| HistoryQuery {
            since: since(offset),
            whole_within: Some(3),
            ..Default::default()
        };
        let h = e.do_history("ch", &q(2), Instant::now());
        assert_eq!(h.publications.len(), 3, "3 follow offset 2: all of them");
        let h = e.do_history("ch", &q(1), Instant::now());
        assert!(h.publications.is_empty(), "4 follow offset 1: none");
        assert_eq!(h.position.offset, 5);
    }

    #[test]
    fn idempotent_publish() {
        let e = MemoryEngine::new(Arc::new(Hub::new()));
        let mut o = opts(10);
        o.idempotency_key = Some("k".into());
        let a = e.do_publish("ch", publication(1), &o, Instant::now());
        let b = e.do_publish("ch", publication(1), &o, Instant::now());
        assert_eq!(a, b);
        assert_eq!(
            e.do_history("ch", &HistoryQuery::default(), Instant::now())
                .publications
                .len(),
            1
        );
    }

    const HOUR: Duration = Duration::from_secs(3600);

    fn position_query() -> HistoryQuery {
        // What a positioned subscribe asks: the stream position only.
        HistoryQuery {
            limit: Some(0),
            meta_ttl: HOUR,
            ..Default::default()
        }
    }

    /// Offsets of the publication pushes queued to `conn`, in queue order.
    fn delivered_offsets(conn: &ConnHandle) -> Vec<u64> {
        conn.drain()
            .frames
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_slice(f).unwrap();
                v["push"]["pub"]["offset"].as_u64().unwrap()
            })
            .collect()
    }

    fn subscriber(hub: &Hub, channel: &str, id: &str) -> Arc<ConnHandle> {
        let c = Arc::new(ConnHandle::new(Arc::from(id), 1 << 30));
        hub.add_subscriber(channel, &c, false);
        c
    }

    #[test]
    fn concurrent_publishers_deliver_in_offset_order() {
        let hub = Arc::new(Hub::new());
        let subs: Vec<_> = (0..20)
            .map(|i| subscriber(&hub, "ch", &format!("s{i}")))
            .collect();
        let e = Arc::new(MemoryEngine::new(hub));
        let (threads, each) = (4usize, 300u32);
        let start = Arc::new(std::sync::Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (e, start) = (e.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    (0..each)
                        .map(|i| {
                            e.do_publish("ch", publication(i), &opts(10), Instant::now())
                                .offset
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut returned: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        returned.sort_unstable();
        let all: Vec<u64> = (1..=threads as u64 * u64::from(each)).collect();
        assert_eq!(returned, all, "each publish got its own offset");
        for s in &subs {
            assert_eq!(delivered_offsets(s), all, "live order is offset order");
        }
    }

    /// A publisher whose fan-out is stuck on a subscriber holds up neither the stream nor the
    /// next publisher of the channel (the old engine delivered under the stream lock).
    #[test]
    fn publisher_does_not_wait_for_another_publishers_fan_out() {
        use std::sync::mpsc;
        let hub = Arc::new(Hub::new());
        let stuck = subscriber(&hub, "ch", "stuck");
        let e = Arc::new(MemoryEngine::new(hub));
        let (locked_tx, locked_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let holder = {
            let stuck = stuck.clone();
            std::thread::spawn(move || {
                // Holds the subscriber's outbox lock: delivering to it blocks.
                stuck.complete_buffering(&[], |_| {
                    locked_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    (Vec::new(), Vec::new())
                })
            })
        };
        locked_rx.recv().unwrap();
        let first = {
            let e = e.clone();
            std::thread::spawn(move || {
                e.do_publish("ch", publication(1), &opts(10), Instant::now())
            })
        };
        // Wait until the first publisher is delivering, with the stream lock free.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stream = e.streams.lock().map.get("ch").cloned();
            if stream.and_then(|s| s.try_lock().map(|s| s.delivering)) == Some(true) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "stream lock held during delivery"
            );
            std::thread::yield_now();
        }
        let (done_tx, done_rx) = mpsc::channel();
        let second = {
            let e = e.clone();
            std::thread::spawn(move || {
                let pos = e.do_publish("ch", publication(2), &opts(10), Instant::now());
                done_tx.send(pos.offset).unwrap();
            })
        };
        let got = done_rx.recv_timeout(Duration::from_secs(10));
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(first.join().unwrap().offset, 1);
        second.join().unwrap();
        assert_eq!(
            got,
            Ok(2),
            "second publisher waited for the first one's fan-out"
        );
        // The first publisher delivered the second's publication too, in order.
        assert_eq!(delivered_offsets(&stuck), [1, 2]);
    }

    /// A positioned subscribe before the first publication learns the epoch the stream will
    /// have, without creating it; recovering from that position later is exact.
    #[test]
    fn position_read_before_first_publish_stays_valid() {
        let e = MemoryEngine::new(Arc::new(Hub::new()));
        let t0 = Instant::now();
        let sub = e.do_history("ch", &position_query(), t0).position;
        assert_eq!(sub.offset, 0);
        assert!(e.streams.lock().map.is_empty(), "a read created a stream");
        let p1 = e.do_publish("ch", publication(1), &opts(10), t0 + Duration::from_secs(1));
        let p2 = e.do_publish("ch", publication(2), &opts(10), t0 + Duration::from_secs(2));
        assert_eq!((p1.offset, p2.offset), (1, 2));
        assert_eq!(p1.epoch, sub.epoch);
        assert_eq!(p2.epoch, sub.epoch);
        let recovered = e.do_history(
            "ch",
            &HistoryQuery {
                since: Some(sub.clone()),
                meta_ttl: HOUR,
                ..Default::default()
            },
            t0 + Duration::from_secs(3),
        );
        let offs: Vec<u64> = recovered.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offs, [1, 2], "contiguous from the subscribe position");
        assert_eq!(recovered.position, p2, "same epoch");
    }

    #[tokio::test]
    async fn reads_of_unknown_channels_create_no_state() {
        let e = MemoryEngine::new(Arc::new(Hub::new()));
        for i in 0..10_000 {
            let ch = format!("nobody:{i}");
            let a = e.history(&ch, position_query()).await.unwrap();
            let since = Some(StreamPosition {
                offset: 3,
                epoch: "old".into(),
            });
            let q = HistoryQuery {
                since,
                meta_ttl: HOUR,
                ..Default::default()
            };
            let b = e.history(&ch, q).await.unwrap();
            assert!(b.publications.is_empty());
            assert_eq!(
                a.position, b.position,
                "an unknown channel's position is stable"
            );
            assert!(e.presence(&ch).await.unwrap().is_empty());
        }
        let st = e.streams.lock();
        assert!(st.map.is_empty() && st.sweep.is_empty());
        assert!(e.presence.lock().is_empty());
    }

    #[test]
    fn idle_stream_is_evicted_after_its_meta_ttl() {
        let e = MemoryEngine::new(Arc::new(Hub::new()));
        let t0 = Instant::now();
        let old = e.do_publish("ch", publication(1), &opts(10), t0);
        let q = HistoryQuery::default();
        e.do_history("other", &q, t0 + HOUR / 2);
        assert_eq!(e.streams.lock().map.len(), 1, "not idle long enough");
        // Any call sweeps it once it has been idle past its meta ttl.
        e.do_history("other", &q, t0 + HOUR + Duration::from_secs(1));
        {
            let st = e.streams.lock();
            assert!(st.map.is_empty() && st.sweep.is_empty(), "idle stream kept");
        }
        // The stream is lost: a new epoch, already known before the next publish.
        let t1 = t0 + HOUR + Duration::from_secs(2);
        let next = e.do_history("ch", &position_query(), t1).position;
        assert_eq!(next.offset, 0);
        assert_ne!(next.epoch, old.epoch);
        let new = e.do_publish("ch", publication(2), &opts(10), t1);
        assert_eq!(new.offset, 1);
        assert_eq!(new.epoch, next.epoch);
        let h = e.do_history(
            "ch",
            &HistoryQuery {
                since: Some(old.clone()),
                ..Default::default()
            },
            t1,
        );
        assert_ne!(
            h.position.epoch, old.epoch,
            "the old position must not recover"
        );
    }

    /// Streams that expired but were not yet swept: a read ends them, a publish restarts
    /// them in place; either way the new life has a new epoch and the map stays consistent.
    #[test]
    fn expired_streams_not_yet_swept_start_a_new_life() {
        let e = MemoryEngine::new(Arc::new(Hub::new()));
        let t0 = Instant::now();
        // Ahead of x and y in the sweep order: three calls' batches do not reach them.
        for i in 0..3 * SWEEP_BATCH {
            e.do_publish(&format!("a{i}"), publication(0), &opts(10), t0);
        }
        let x = e.do_publish("x", publication(0), &opts(10), t0);
        let y = e.do_publish("y", publication(0), &opts(10), t0);
        let t1 = t0 + 2 * HOUR;
        // The sweep's batch does not reach y: the read finds it expired in the map.
        let next_y = e.do_history("y", &position_query(), t1).position;
        assert_eq!(next_y.offset, 0);
        assert_ne!(next_y.epoch, y.epoch);
        let new_y = e.do_publish("y", publication(1), &opts(10), t1);
        assert_eq!((new_y.offset, &new_y.epoch), (1, &next_y.epoch));
        assert!(
            e.streams.lock().map["x"].lock().expired(t1),
            "x was swept, not restarted"
        );
        let new_x = e.do_publish("x", publication(1), &opts(10), t1);
        assert_eq!(new_x.offset, 1);
        assert_ne!(new_x.epoch, x.epoch);
        let h = e.do_history("x", &HistoryQuery::default(), t1);
        assert_eq!(h.publications.len(), 1, "the old life's history is gone");
        for _ in 0..10 {
            e.do_history("z", &HistoryQuery::default(), t1);
        }
        let st = e.streams.lock();
        let mut keys: Vec<&str> = st.map.keys().map(|k| &**k).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["x", "y"]);
        assert_eq!(st.sweep.len(), st.map.len());
    }
}
