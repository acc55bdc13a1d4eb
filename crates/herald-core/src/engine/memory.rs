//! The embedded engine for a single node: history, offsets and presence in this process.

use std::collections::{BTreeMap, HashMap, VecDeque};
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

struct Stream {
    epoch: String,
    top: u64,
    /// (expires at, publication), oldest first.
    pubs: VecDeque<(Instant, Publication)>,
    touched: Instant,
    meta_ttl: Duration,
}

impl Stream {
    fn new(meta_ttl: Duration) -> Self {
        Self {
            epoch: super::new_epoch(),
            top: 0,
            pubs: VecDeque::new(),
            touched: Instant::now(),
            meta_ttl,
        }
    }

    /// A stream idle for longer than its metadata ttl is lost: it restarts with a new epoch.
    fn expire(&mut self, now: Instant) {
        if now.duration_since(self.touched) > self.meta_ttl {
            *self = Stream::new(self.meta_ttl);
        }
    }

    /// Keeps at most `size` publications and none past its expiry instant.
    fn trim(&mut self, now: Instant, size: usize) {
        while self.pubs.len() > size {
            self.pubs.pop_front();
        }
        while let Some((expires, _)) = self.pubs.front() {
            if *expires <= now {
                self.pubs.pop_front();
            } else {
                break;
            }
        }
    }
}

type StreamRef = Arc<Mutex<Stream>>;

pub struct MemoryEngine {
    handler: Arc<dyn BrokerHandler>,
    streams: Mutex<HashMap<String, (StreamRef, Duration)>>,
    presence: Mutex<HashMap<String, BTreeMap<String, ClientInfo>>>,
    idempotency: Mutex<HashMap<(String, String), (Instant, StreamPosition)>>,
}

/// How long an idempotency key is remembered.
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);

impl MemoryEngine {
    pub fn new(handler: Arc<dyn BrokerHandler>) -> Self {
        Self {
            handler,
            streams: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
            idempotency: Mutex::new(HashMap::new()),
        }
    }

    fn stream(&self, channel: &str, meta_ttl: Duration) -> StreamRef {
        let mut streams = self.streams.lock();
        streams
            .entry(channel.to_string())
            .or_insert_with(|| (Arc::new(Mutex::new(Stream::new(meta_ttl))), meta_ttl))
            .0
            .clone()
    }

    fn do_publish(
        &self,
        channel: &str,
        mut publication: Publication,
        opts: &PublishOptions,
    ) -> StreamPosition {
        let now = Instant::now();
        if let Some(key) = &opts.idempotency_key {
            let mut seen = self.idempotency.lock();
            seen.retain(|_, (at, _)| now.duration_since(*at) < IDEMPOTENCY_WINDOW);
            if let Some((_, pos)) = seen.get(&(channel.to_string(), key.clone())) {
                return pos.clone();
            }
        }
        let pos = if opts.history_size == 0 || opts.history_ttl.is_zero() {
            self.handler.on_publication(channel, publication);
            StreamPosition::default()
        } else {
            let stream = self.stream(channel, opts.history_meta_ttl);
            let mut s = stream.lock();
            s.expire(now);
            s.meta_ttl = opts.history_meta_ttl;
            s.top += 1;
            s.touched = now;
            publication.offset = s.top;
            s.pubs
                .push_back((now + opts.history_ttl, publication.clone()));
            s.trim(now, opts.history_size);
            // Delivered under the stream lock so live order equals offset order.
            self.handler.on_publication(channel, publication);
            StreamPosition {
                offset: s.top,
                epoch: s.epoch.clone(),
            }
        };
        if let Some(key) = &opts.idempotency_key {
            self.idempotency
                .lock()
                .insert((channel.to_string(), key.clone()), (now, pos.clone()));
        }
        pos
    }

    fn do_history(&self, channel: &str, q: &HistoryQuery) -> HistoryResult {
        let now = Instant::now();
        let stream = self.stream(channel, q.meta_ttl);
        let mut s = stream.lock();
        s.expire(now);
        let size = s.pubs.len();
        s.trim(now, size);
        let position = StreamPosition {
            offset: s.top,
            epoch: s.epoch.clone(),
        };
        let after = q.since.as_ref().map_or(0, |p| p.offset);
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
        HistoryResult {
            publications: pubs,
            position,
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
        ready(Ok(self.do_publish(channel, publication, opts)))
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
        ready(Ok(self.do_history(channel, &query)))
    }

    fn remove_history<'a>(&'a self, channel: &'a str) -> BoxFut<'a, Result<(), EngineError>> {
        let streams = self.streams.lock();
        if let Some((s, _)) = streams.get(channel) {
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
    use crate::hub::Hub;

    fn publication(n: u32) -> Publication {
        Publication {
            data: herald_protocol::json::raw_from_str(&n.to_string()).unwrap(),
            info: None,
            offset: 0,
            tags: Default::default(),
            time: 0,
            binary: false,
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
            last = e.do_publish("ch", publication(i), &o);
        }
        assert_eq!(last.offset, 5);
        let h = e.do_history("ch", &HistoryQuery::default());
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
        );
        assert_eq!(h.publications.len(), 1);
        let h = e.do_history(
            "ch",
            &HistoryQuery {
                limit: Some(2),
                reverse: true,
                ..Default::default()
            },
        );
        let offs: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offs, [5, 4]);
    }

    #[test]
    fn idempotent_publish() {
        let e = MemoryEngine::new(Arc::new(Hub::new()));
        let mut o = opts(10);
        o.idempotency_key = Some("k".into());
        let a = e.do_publish("ch", publication(1), &o);
        let b = e.do_publish("ch", publication(1), &o);
        assert_eq!(a, b);
        assert_eq!(
            e.do_history("ch", &HistoryQuery::default())
                .publications
                .len(),
            1
        );
    }
}
