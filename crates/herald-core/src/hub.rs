//! The node's index: channel → local subscribers, client id → connection, user → connections.
//! Publications are encoded once per channel and client codec here, and the same bytes are
//! queued to every local subscriber of that codec.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use herald_protocol::client::{ClientInfo, Publication, encode_join_leave_push};
use herald_protocol::proto::encode_join_leave_push_proto;
use parking_lot::RwLock;

use crate::conn::{Codec, ConnHandle, Control, DeltaBase, PubMessage};
use crate::engine::ControlCommand;
use crate::metrics::Metrics;
use herald_protocol::Disconnect;
use herald_protocol::codes::unsubscribe;

const SHARDS: usize = 64;

#[derive(Clone)]
struct Subscriber {
    conn: Arc<ConnHandle>,
    join_leave: bool,
    delta: bool,
}

/// A channel's local subscribers.
#[derive(Default)]
struct Channel {
    subs: HashMap<Arc<str>, Subscriber>,
    /// Subscribers that asked for join/leave pushes.
    join_leave: usize,
    /// Subscribers that negotiated delta; while there are some, `last` is kept.
    delta: usize,
    /// The last publication broadcast, the base of the next one's delta.
    last: parking_lot::Mutex<Option<Arc<DeltaBase>>>,
    /// An immutable copy of `subs` that delivery iterates without the shard lock. Cleared on
    /// every change and rebuilt by the next broadcast, so a ramp of N subscribes costs O(N)
    /// rather than O(N²).
    snapshot: OnceLock<Arc<[Subscriber]>>,
}

impl Channel {
    /// Forgets a leaving subscriber's flags.
    fn uncount(&mut self, s: &Subscriber) {
        if s.join_leave {
            self.join_leave = self.join_leave.saturating_sub(1);
        }
        if s.delta {
            self.delta = self.delta.saturating_sub(1);
            if self.delta == 0 {
                *self.last.get_mut() = None;
            }
        }
    }
}

type ChannelMap = HashMap<Arc<str>, Channel>;

/// Non-empty users → their connections by client id.
/// A user's connections are few (one per device or tab): a vector, grown one slot at a time,
/// costs 8 bytes a connection where a map cost ~115 (idle-memory measurements,
/// docs/performance.md).
type UserMap = HashMap<Arc<str>, Vec<Arc<ConnHandle>>>;

/// A connected client and the user it was registered under (its index key in `users`).
struct ConnEntry {
    conn: Arc<ConnHandle>,
    user: Arc<str>,
}

/// Receives what the engine delivers to this node.
pub trait BrokerHandler: Send + Sync {
    fn on_publication(&self, channel: &str, publication: Publication);
    fn on_join_leave(&self, channel: &str, info: &ClientInfo, join: bool);
    /// A server API action for the users connected here.
    fn on_control(&self, cmd: ControlCommand);
    /// The live stream of `channel` may have a hole (missed or reordered delivery, engine
    /// reconnect): its local subscribers are told to resubscribe and recover.
    fn on_insufficient_state(&self, channel: &str);
    /// Channels with local subscribers and their counts.
    fn local_channels(&self) -> Vec<(String, u32)>;
}

/// Hands `/emulation` commands to a stream of this node: (target node, session, commands).
pub type EmulationSink = Box<dyn Fn(&str, &str, bytes::Bytes) + Send + Sync>;

pub struct Hub {
    emulation: OnceLock<EmulationSink>,
    shards: Box<[RwLock<ChannelMap>]>,
    hasher: std::collections::hash_map::RandomState,
    conns: RwLock<HashMap<Arc<str>, ConnEntry>>,
    /// Anonymous connections are not indexed here (one shared list would make each
    /// disconnect O(N)); `conns` has them.
    users: RwLock<UserMap>,
    metrics: Arc<Metrics>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

/// Node-local counts for `info` and the channel list.
#[derive(Debug, Default, Clone, Copy)]
pub struct HubStats {
    pub clients: u32,
    pub users: u32,
    pub channels: u32,
    pub subscriptions: u32,
}

impl Hub {
    pub fn new() -> Self {
        Self::with_metrics(Arc::new(Metrics::noop()))
    }

    /// A hub that counts its deliveries in `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
            conns: RwLock::new(HashMap::new()),
            users: RwLock::new(HashMap::new()),
            metrics,
            emulation: OnceLock::new(),
        }
    }

    /// Sets where `/emulation` commands arriving from other nodes go (once, at start).
    pub fn set_emulation_sink(&self, sink: EmulationSink) {
        let _ = self.emulation.set(sink);
    }

    /// Connected clients on this node.
    pub fn num_conns(&self) -> usize {
        self.conns.read().len()
    }

    fn shard(&self, channel: &str) -> &RwLock<ChannelMap> {
        &self.shards[(self.hasher.hash_one(channel) as usize) % SHARDS]
    }

    /// Registers a connected client.
    pub fn add_conn(&self, conn: &Arc<ConnHandle>) {
        let user = conn.user();
        let mut conns = self.conns.write();
        let old = conns.insert(
            conn.id.clone(),
            ConnEntry {
                conn: conn.clone(),
                user: user.clone(),
            },
        );
        // Both indexes change under the `conns` lock so they agree.
        let mut users = self.users.write();
        if let Some(old) = old {
            Self::unindex_user(&mut users, &old.user, &conn.id);
        }
        if !user.is_empty() {
            let by_user = users.entry(user).or_default();
            by_user.reserve_exact(1);
            by_user.push(conn.clone());
        }
    }

    pub fn remove_conn(&self, conn: &ConnHandle) {
        let mut conns = self.conns.write();
        if let Some(entry) = conns.remove(&conn.id) {
            Self::unindex_user(&mut self.users.write(), &entry.user, &conn.id);
        }
    }

    fn unindex_user(users: &mut UserMap, user: &str, client_id: &str) {
        if let Some(conns) = users.get_mut(user) {
            conns.retain(|c| *c.id != *client_id);
            if conns.is_empty() {
                users.remove(user);
            } else if conns.capacity() > 2 * conns.len() {
                conns.shrink_to_fit();
            }
        }
    }

    pub fn conn(&self, client_id: &str) -> Option<Arc<ConnHandle>> {
        self.conns.read().get(client_id).map(|e| e.conn.clone())
    }

    /// The connections of a (non-empty) user; anonymous connections are not indexed by user,
    /// so `""` gives none.
    pub fn user_conns(&self, user: &str) -> Vec<Arc<ConnHandle>> {
        if user.is_empty() {
            return Vec::new();
        }
        self.users
            .read()
            .get(user)
            .map(|conns| conns.to_vec())
            .unwrap_or_default()
    }

    pub fn all_conns(&self) -> Vec<Arc<ConnHandle>> {
        self.conns.read().values().map(|e| e.conn.clone()).collect()
    }

    /// Adds a subscriber; true when it is the channel's first on this node.
    pub fn add_subscriber(&self, channel: &str, conn: &Arc<ConnHandle>, join_leave: bool) -> bool {
        self.add_subscriber_with(channel, conn, join_leave, false)
    }

    /// Adds a subscriber that may have negotiated delta; true when it is the channel's
    /// first on this node.
    pub fn add_subscriber_with(
        &self,
        channel: &str,
        conn: &Arc<ConnHandle>,
        join_leave: bool,
        delta: bool,
    ) -> bool {
        let mut shard = self.shard(channel).write();
        let first = !shard.contains_key(channel);
        let ch = shard.entry(Arc::from(channel)).or_default();
        let old = ch.subs.insert(
            conn.id.clone(),
            Subscriber {
                conn: conn.clone(),
                join_leave,
                delta,
            },
        );
        if let Some(o) = old {
            ch.uncount(&o);
        }
        if join_leave {
            ch.join_leave = ch.join_leave.saturating_add(1);
        }
        if delta {
            ch.delta = ch.delta.saturating_add(1);
        }
        let stale = ch.snapshot.take();
        // Releasing a large snapshot is O(N): not under the lock.
        drop(shard);
        drop(stale);
        first
    }

    /// Removes a subscriber; true when the channel has no local subscriber left.
    pub fn remove_subscriber(&self, channel: &str, client_id: &str) -> bool {
        let mut shard = self.shard(channel).write();
        let Some(ch) = shard.get_mut(channel) else {
            return false;
        };
        let Some(old) = ch.subs.remove(client_id) else {
            return false;
        };
        if ch.subs.is_empty() {
            shard.remove(channel);
            return true;
        }
        ch.uncount(&old);
        let stale = ch.snapshot.take();
        drop(shard);
        drop(stale);
        false
    }

    /// The channel's current subscribers. The shard lock is held only to clone an `Arc`
    /// (or, after a change, to rebuild the copy): delivery runs without it, so subscribes
    /// and unsubscribes on the shard never wait for a fan-out.
    fn subscribers(&self, channel: &str, join_leave_only: bool) -> Option<Arc<[Subscriber]>> {
        let shard = self.shard(channel).read();
        let ch = shard.get(channel)?;
        if join_leave_only && ch.join_leave == 0 {
            return None;
        }
        Some(Self::snapshot(ch))
    }

    /// The channel's subscribers, and whether some of them negotiated delta.
    fn subscribers_delta(&self, channel: &str) -> Option<(Arc<[Subscriber]>, bool)> {
        let shard = self.shard(channel).read();
        let ch = shard.get(channel)?;
        Some((Self::snapshot(ch), ch.delta > 0))
    }

    fn snapshot(ch: &Channel) -> Arc<[Subscriber]> {
        ch.snapshot
            .get_or_init(|| ch.subs.values().cloned().collect())
            .clone()
    }

    /// Ties `msg` to the channel's previous publication and records it as the next one's
    /// delta base. Concurrent broadcasts may race here; a subscriber only ever gets a patch
    /// against the exact publication it received last, so a race costs a whole frame, never
    /// a wrong one.
    fn chain_delta(&self, channel: &str, msg: PubMessage) -> PubMessage {
        let shard = self.shard(channel).read();
        let Some(ch) = shard.get(channel).filter(|ch| ch.delta > 0) else {
            return msg;
        };
        let base = ch.last.lock().replace(msg.as_delta_base());
        match base {
            Some(b) => msg.with_delta_base(b),
            None => msg,
        }
    }

    /// Every channel with local subscribers and their count.
    pub fn channels(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            for (ch, subs) in s.read().iter() {
                out.push((ch.to_string(), count(subs.subs.len())));
            }
        }
        out
    }

    pub fn stats(&self) -> HubStats {
        let mut st = HubStats {
            clients: count(self.conns.read().len()),
            // Distinct non-empty users: anonymous clients are not a user.
            users: count(self.users.read().len()),
            ..Default::default()
        };
        for s in self.shards.iter() {
            let s = s.read();
            st.channels = st.channels.saturating_add(count(s.len()));
            for ch in s.values() {
                st.subscriptions = st.subscriptions.saturating_add(count(ch.subs.len()));
            }
        }
        st
    }

    /// Encodes once and queues the same bytes to every local subscriber.
    pub fn broadcast_publication(&self, channel: &str, publication: Publication) {
        let Some((subs, delta)) = self.subscribers_delta(channel) else {
            return;
        };
        let received = std::time::Instant::now();
        let mut msg = PubMessage::new(Arc::from(channel), publication, received);
        if delta {
            msg = self.chain_delta(channel, msg);
        }
        let msg = Arc::new(msg);
        for sub in subs.iter() {
            sub.conn.deliver(channel, &msg);
        }
        // Counted once per broadcast, not per subscriber.
        self.metrics.delivered(subs.len());
    }

    pub fn broadcast_join_leave(&self, channel: &str, info: &ClientInfo, join: bool) {
        let Some(subs) = self.subscribers(channel, true) else {
            return;
        };
        // Encoded once per codec, the Protobuf form only if a subscriber needs it.
        let json = encode_join_leave_push(channel, info, join);
        let proto = std::sync::OnceLock::new();
        for sub in subs.iter().filter(|s| s.join_leave) {
            let frame = match sub.conn.codec {
                Codec::Json => sub.conn.json_push_for(&json),
                Codec::Protobuf => proto
                    .get_or_init(|| encode_join_leave_push_proto(channel, info, join))
                    .clone(),
            };
            sub.conn.deliver_unordered(channel, frame);
        }
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Hub {
    /// The connections a server API action addresses: a user's, optionally one client.
    fn targets(&self, user: &str, client: &str, session: &str) -> Vec<Arc<ConnHandle>> {
        let wanted = |c: &ConnHandle| {
            (client.is_empty() || &*c.id == client) && (session.is_empty() || &*c.id == session)
        };
        if !user.is_empty() {
            return self
                .user_conns(user)
                .into_iter()
                .filter(|c| wanted(c))
                .collect();
        }
        // Anonymous connections are found by id, or (no id given) by a scan of `conns`.
        let conns = self.conns.read();
        let anonymous = |e: &&ConnEntry| e.user.is_empty() && wanted(&e.conn);
        let id = if client.is_empty() { session } else { client };
        if id.is_empty() {
            conns
                .values()
                .filter(anonymous)
                .map(|e| e.conn.clone())
                .collect()
        } else {
            conns
                .get(id)
                .filter(anonymous)
                .map(|e| e.conn.clone())
                .into_iter()
                .collect()
        }
    }

    /// Carries out a server API action on this node's connections.
    pub fn apply_control(&self, cmd: ControlCommand) {
        match cmd {
            ControlCommand::Emulation {
                node,
                session,
                data,
                binary,
            } => {
                let data = if binary {
                    use base64::Engine as _;
                    match base64::engine::general_purpose::STANDARD.decode(&data) {
                        Ok(b) => bytes::Bytes::from(b),
                        Err(_) => return,
                    }
                } else {
                    bytes::Bytes::from(data)
                };
                if let Some(sink) = self.emulation.get() {
                    sink(&node, &session, data);
                }
            }
            ControlCommand::Disconnect {
                user,
                client,
                session,
                whitelist,
                code,
                reason,
            } => {
                for c in self.targets(&user, &client, &session) {
                    if !whitelist.iter().any(|w| **w == *c.id) {
                        c.close(Disconnect::new(code, reason.clone()));
                    }
                }
            }
            ControlCommand::Unsubscribe {
                user,
                channel,
                client,
                session,
            } => {
                for c in self.targets(&user, &client, &session) {
                    c.control(Control::Unsubscribe {
                        channel: channel.clone(),
                        code: unsubscribe::SERVER.0,
                        reason: unsubscribe::SERVER.1.to_string(),
                    });
                }
            }
            ControlCommand::Subscribe {
                user,
                channel,
                client,
                session,
                info,
                data,
            } => {
                for c in self.targets(&user, &client, &session) {
                    c.control(Control::Subscribe {
                        channel: channel.clone(),
                        info: info.clone(),
                        data: data.clone(),
                    });
                }
            }
            ControlCommand::Refresh {
                user,
                client,
                session,
                expire_at,
                expired,
            } => {
                for c in self.targets(&user, &client, &session) {
                    c.control(Control::Refresh { expire_at, expired });
                }
            }
        }
    }

    /// Tells every local subscriber of `channel` to resubscribe (unsubscribe push 2500); the
    /// SDK resubscribes with recovery from its last offset. Until it has, nothing more of
    /// the channel reaches it: the publication that revealed the hole, delivered next,
    /// would move its position past the hole.
    pub fn resubscribe_all(&self, channel: &str) {
        let Some(subs) = self.subscribers(channel, false) else {
            return;
        };
        for s in subs.iter() {
            s.conn.insufficient_state(channel);
        }
    }
}

impl BrokerHandler for Hub {
    fn on_publication(&self, channel: &str, publication: Publication) {
        self.broadcast_publication(channel, publication);
    }
    fn on_join_leave(&self, channel: &str, info: &ClientInfo, join: bool) {
        self.broadcast_join_leave(channel, info, join);
    }
    fn on_control(&self, cmd: ControlCommand) {
        self.apply_control(cmd);
    }
    fn on_insufficient_state(&self, channel: &str) {
        self.resubscribe_all(channel);
    }
    fn local_channels(&self) -> Vec<(String, u32)> {
        self.channels()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_once_same_bytes_to_all() {
        let hub = Hub::new();
        let a = Arc::new(ConnHandle::new(Arc::from("a"), 1 << 20));
        let b = Arc::new(ConnHandle::new(Arc::from("b"), 1 << 20));
        assert!(hub.add_subscriber("ch", &a, false));
        assert!(!hub.add_subscriber("ch", &b, false));
        hub.broadcast_publication(
            "ch",
            Publication {
                data: herald_protocol::json::raw_from_str("1").unwrap(),
                info: None,
                offset: 1,
                tags: Default::default(),
                time: 0,
                binary: false,
                delta: false,
            },
        );
        let fa = a.drain().frames.pop_front().unwrap();
        let fb = b.drain().frames.pop_front().unwrap();
        // Same allocation: a refcount bump, not a copy.
        assert_eq!(fa.as_ptr(), fb.as_ptr());
        assert!(!hub.remove_subscriber("ch", "a"));
        assert!(hub.remove_subscriber("ch", "b"));
        assert_eq!(hub.stats().channels, 0);
    }

    #[test]
    fn encode_once_per_codec() {
        let hub = Hub::new();
        let json = [conn("j1"), conn("j2")];
        let proto: Vec<_> = ["p1", "p2"]
            .iter()
            .map(|id| {
                Arc::new(ConnHandle::new(Arc::from(*id), 1 << 20).with_codec(Codec::Protobuf))
            })
            .collect();
        for c in json.iter().chain(&proto) {
            hub.add_subscriber("ch", c, true);
        }
        hub.broadcast_publication("ch", publication(1));
        let info = ClientInfo {
            user: "u".into(),
            client: "c".into(),
            conn_info: None,
            chan_info: None,
        };
        hub.broadcast_join_leave("ch", &info, true);
        let all = |c: &ConnHandle| c.drain().frames.into_iter().collect::<Vec<_>>();
        let (j1, j2, p1, p2) = (all(&json[0]), all(&json[1]), all(&proto[0]), all(&proto[1]));
        for i in 0..2 {
            // One allocation per codec, shared by its subscribers.
            assert_eq!(j1[i].as_ptr(), j2[i].as_ptr());
            assert_eq!(p1[i].as_ptr(), p2[i].as_ptr());
            assert_ne!(j1[i].as_ptr(), p1[i].as_ptr());
        }
        assert!(j1[0].starts_with(b"{\"push\""));
        let push = herald_protocol::proto::decode_replies(&p1[0])
            .next()
            .unwrap()
            .unwrap()
            .push
            .unwrap();
        assert_eq!(push.channel, "ch");
        assert_eq!(push.r#pub.unwrap().offset, 1);
        let join = herald_protocol::proto::decode_replies(&p1[1])
            .next()
            .unwrap()
            .unwrap()
            .push
            .unwrap()
            .join
            .unwrap();
        assert_eq!(join.info.unwrap().user, "u");
    }

    use crate::conn::test_publication as publication;

    fn conn(id: &str) -> Arc<ConnHandle> {
        Arc::new(ConnHandle::new(Arc::from(id), 1 << 20))
    }

    fn frames(c: &ConnHandle) -> usize {
        c.drain().frames.len()
    }

    #[test]
    fn snapshot_follows_subscribes_and_unsubscribes() {
        let hub = Hub::new();
        let (a, b) = (conn("a"), conn("b"));
        hub.add_subscriber("ch", &a, false);
        hub.broadcast_publication("ch", publication(1));
        assert_eq!((frames(&a), frames(&b)), (1, 0));
        hub.add_subscriber("ch", &b, true);
        hub.broadcast_publication("ch", publication(2));
        assert_eq!((frames(&a), frames(&b)), (1, 1));
        let info = ClientInfo {
            client: "x".into(),
            user: "u".into(),
            conn_info: None,
            chan_info: None,
        };
        hub.broadcast_join_leave("ch", &info, true);
        assert_eq!(
            (frames(&a), frames(&b)),
            (0, 1),
            "join/leave only to who asked"
        );
        // Re-adding b without join/leave: nobody wants them any more.
        hub.add_subscriber("ch", &b, false);
        hub.broadcast_join_leave("ch", &info, true);
        assert_eq!((frames(&a), frames(&b)), (0, 0));
        assert!(!hub.remove_subscriber("ch", "a"));
        hub.broadcast_publication("ch", publication(3));
        assert_eq!((frames(&a), frames(&b)), (0, 1));
        assert_eq!(hub.stats().subscriptions, 1);
    }

    /// A fan-out stuck on one subscriber must not hold up subscribes on the same shard (the
    /// old hub delivered under the shard's read guard).
    #[test]
    fn subscribe_does_not_wait_for_a_fan_out() {
        use std::sync::mpsc;
        use std::time::Duration;
        let hub = Arc::new(Hub::new());
        let stuck = conn("stuck");
        hub.add_subscriber("ch", &stuck, false);
        // Hold the subscriber's outbox lock: delivering to it blocks.
        let (locked_tx, locked_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let holder = {
            let stuck = stuck.clone();
            std::thread::spawn(move || {
                stuck.complete_buffering(&[], |_| {
                    locked_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    (Vec::new(), Vec::new())
                })
            })
        };
        locked_rx.recv().unwrap();
        let publisher = {
            let hub = hub.clone();
            std::thread::spawn(move || hub.broadcast_publication("ch", publication(1)))
        };
        // The publisher is delivering once it holds a second reference to the snapshot.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let delivering = hub
                .shard("ch")
                .read()
                .get("ch")
                .and_then(|c| c.snapshot.get().map(|s| Arc::strong_count(s) > 1))
                .unwrap_or(false);
            if delivering {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no delivery started");
            std::thread::yield_now();
        }
        let (done_tx, done_rx) = mpsc::channel();
        let subscriber = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                let first = hub.add_subscriber("ch", &conn("late"), false);
                let other = hub.add_subscriber("ch2", &conn("late2"), false);
                done_tx.send((first, other)).unwrap();
            })
        };
        let got = done_rx.recv_timeout(Duration::from_secs(10));
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        publisher.join().unwrap();
        subscriber.join().unwrap();
        assert_eq!(got, Ok((false, true)), "subscribe waited for the fan-out");
        assert_eq!(frames(&stuck), 1);
    }

    /// "First subscriber" and "last one left" stay exact under concurrent churn: every first
    /// is matched by exactly one last.
    #[test]
    fn first_and_last_are_exact_under_concurrency() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let hub = Arc::new(Hub::new());
        let firsts = Arc::new(AtomicU64::new(0));
        let lasts = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (hub, firsts, lasts) = (hub.clone(), firsts.clone(), lasts.clone());
                std::thread::spawn(move || {
                    let c = conn(&format!("c{t}"));
                    for i in 0..2000 {
                        if hub.add_subscriber("ch", &c, false) {
                            firsts.fetch_add(1, Ordering::Relaxed);
                        }
                        if i % 3 == 0 {
                            hub.broadcast_publication("ch", publication(0));
                        }
                        if hub.remove_subscriber("ch", &c.id) {
                            lasts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(firsts.load(Ordering::Relaxed) > 0);
        assert_eq!(
            firsts.load(Ordering::Relaxed),
            lasts.load(Ordering::Relaxed)
        );
        assert_eq!(hub.stats().channels, 0);
        assert!(hub.channels().is_empty());
    }

    #[test]
    fn anonymous_connections_are_indexed_by_id_only() {
        let hub = Hub::new();
        let anon: Vec<_> = (0..3).map(|i| conn(&format!("anon{i}"))).collect();
        for c in &anon {
            hub.add_conn(c);
        }
        let named: Vec<_> = [("a1", "alice"), ("a2", "alice"), ("b1", "bob")]
            .iter()
            .map(|(id, user)| {
                let c = conn(id);
                c.set_user(user);
                hub.add_conn(&c);
                c
            })
            .collect();
        let st = hub.stats();
        assert_eq!((st.clients, st.users), (6, 2), "anonymous is not a user");
        assert!(hub.user_conns("").is_empty());
        assert_eq!(hub.user_conns("alice").len(), 2);
        assert!(hub.conn("anon1").is_some());

        // A server action for an anonymous client reaches it by id, and nothing else.
        hub.apply_control(ControlCommand::Disconnect {
            user: String::new(),
            client: "anon1".into(),
            session: String::new(),
            whitelist: Vec::new(),
            code: 3000,
            reason: "x".into(),
        });
        let closing: Vec<bool> = anon.iter().map(|c| c.is_closing()).collect();
        assert_eq!(closing, [false, true, false]);
        assert!(named.iter().all(|c| !c.is_closing()));

        hub.remove_conn(&anon[1]);
        hub.remove_conn(&named[0]);
        let st = hub.stats();
        assert_eq!((st.clients, st.users), (4, 2));
        assert!(hub.conn("anon1").is_none());
        assert_eq!(hub.user_conns("alice").len(), 1);
        // Registered again (as a reconnecting session is), it is still indexed once.
        hub.add_conn(&named[1]);
        assert_eq!(hub.user_conns("alice").len(), 1);
        hub.remove_conn(&named[1]);
        assert_eq!(hub.stats().users, 1);
        assert!(hub.user_conns("alice").is_empty());
    }
}
