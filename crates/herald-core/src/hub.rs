//! The node's index: channel → local subscribers, client id → connection, user → connections.
//! Publications are encoded once per channel here and the same bytes are queued to every
//! local subscriber.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use herald_protocol::client::{
    ClientInfo, Publication, encode_join_leave_push, encode_publication_push,
};
use parking_lot::RwLock;

use crate::conn::{ConnHandle, Control, PubMessage};
use crate::engine::ControlCommand;
use crate::metrics::Metrics;
use herald_protocol::Disconnect;
use herald_protocol::codes::unsubscribe;

const SHARDS: usize = 64;

struct Subscriber {
    conn: Arc<ConnHandle>,
    join_leave: bool,
}

type ChannelMap = HashMap<Arc<str>, HashMap<Arc<str>, Subscriber>>;

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
    emulation: std::sync::OnceLock<EmulationSink>,
    shards: Box<[RwLock<ChannelMap>]>,
    hasher: std::collections::hash_map::RandomState,
    conns: RwLock<HashMap<Arc<str>, Arc<ConnHandle>>>,
    users: RwLock<HashMap<Arc<str>, Vec<Arc<ConnHandle>>>>,
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
            emulation: std::sync::OnceLock::new(),
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
        self.conns.write().insert(conn.id.clone(), conn.clone());
        self.users
            .write()
            .entry(conn.user())
            .or_default()
            .push(conn.clone());
    }

    pub fn remove_conn(&self, conn: &ConnHandle) {
        self.conns.write().remove(&conn.id);
        let user = conn.user();
        let mut users = self.users.write();
        if let Some(list) = users.get_mut(&user) {
            list.retain(|c| c.id != conn.id);
            if list.is_empty() {
                users.remove(&user);
            }
        }
    }

    pub fn conn(&self, client_id: &str) -> Option<Arc<ConnHandle>> {
        self.conns.read().get(client_id).cloned()
    }

    pub fn user_conns(&self, user: &str) -> Vec<Arc<ConnHandle>> {
        self.users.read().get(user).cloned().unwrap_or_default()
    }

    pub fn all_conns(&self) -> Vec<Arc<ConnHandle>> {
        self.conns.read().values().cloned().collect()
    }

    /// Adds a subscriber; true when it is the channel's first on this node.
    pub fn add_subscriber(&self, channel: &str, conn: &Arc<ConnHandle>, join_leave: bool) -> bool {
        let mut shard = self.shard(channel).write();
        let first = !shard.contains_key(channel);
        shard.entry(Arc::from(channel)).or_default().insert(
            conn.id.clone(),
            Subscriber {
                conn: conn.clone(),
                join_leave,
            },
        );
        first
    }

    /// Removes a subscriber; true when the channel has no local subscriber left.
    pub fn remove_subscriber(&self, channel: &str, client_id: &str) -> bool {
        let mut shard = self.shard(channel).write();
        let Some(subs) = shard.get_mut(channel) else {
            return false;
        };
        if subs.remove(client_id).is_none() {
            return false;
        }
        if subs.is_empty() {
            shard.remove(channel);
            return true;
        }
        false
    }

    /// Every channel with local subscribers and their count.
    pub fn channels(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            for (ch, subs) in s.read().iter() {
                out.push((ch.to_string(), subs.len() as u32));
            }
        }
        out
    }

    pub fn stats(&self) -> HubStats {
        let mut st = HubStats {
            clients: self.conns.read().len() as u32,
            users: self.users.read().len() as u32,
            ..Default::default()
        };
        for s in self.shards.iter() {
            let s = s.read();
            st.channels += s.len() as u32;
            st.subscriptions += s.values().map(|v| v.len() as u32).sum::<u32>();
        }
        st
    }

    /// Encodes once and queues the same bytes to every local subscriber.
    pub fn broadcast_publication(&self, channel: &str, publication: Publication) {
        let shard = self.shard(channel).read();
        let Some(subs) = shard.get(channel) else {
            return;
        };
        let received = std::time::Instant::now();
        let frame = encode_publication_push(channel, &publication);
        let msg = Arc::new(PubMessage {
            publication,
            frame,
            received,
        });
        for sub in subs.values() {
            sub.conn.deliver(channel, &msg);
        }
        // Counted once per broadcast, not per subscriber.
        self.metrics.delivered(subs.len());
    }

    pub fn broadcast_join_leave(&self, channel: &str, info: &ClientInfo, join: bool) {
        let shard = self.shard(channel).read();
        let Some(subs) = shard.get(channel) else {
            return;
        };
        let frame = encode_join_leave_push(channel, info, join);
        for sub in subs.values().filter(|s| s.join_leave) {
            sub.conn.deliver_unordered(channel, frame.clone());
        }
    }
}

impl Hub {
    /// The connections a server API action addresses: a user's, optionally one client.
    fn targets(&self, user: &str, client: &str, session: &str) -> Vec<Arc<ConnHandle>> {
        self.user_conns(user)
            .into_iter()
            .filter(|c| client.is_empty() || &*c.id == client)
            .filter(|c| session.is_empty() || &*c.id == session)
            .collect()
    }

    /// Carries out a server API action on this node's connections.
    pub fn apply_control(&self, cmd: ControlCommand) {
        match cmd {
            ControlCommand::Emulation {
                node,
                session,
                data,
            } => {
                if let Some(sink) = self.emulation.get() {
                    sink(&node, &session, bytes::Bytes::from(data));
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
    /// SDK resubscribes with recovery from its last offset.
    pub fn resubscribe_all(&self, channel: &str) {
        let conns: Vec<Arc<ConnHandle>> = {
            let shard = self.shard(channel).read();
            match shard.get(channel) {
                Some(subs) => subs.values().map(|s| s.conn.clone()).collect(),
                None => return,
            }
        };
        for c in conns {
            c.control(Control::Unsubscribe {
                channel: channel.to_string(),
                code: unsubscribe::INSUFFICIENT_STATE.0,
                reason: unsubscribe::INSUFFICIENT_STATE.1.to_string(),
            });
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
}
