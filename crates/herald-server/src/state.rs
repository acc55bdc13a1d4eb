//! What every request handler shares: the node, the configuration, the count of live
//! connections (shutdown waits for it) and the operations state (drain phase, metrics
//! exporter, admin sessions). A leaf: handlers import this module, never the reverse.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use herald_core::Node;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

use crate::config::Config;

/// Counts live connections so shutdown can wait for them.
#[derive(Default)]
pub struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

pub struct TrackGuard(Arc<Tracker>);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tracker {
    pub fn enter(self: &Arc<Self>) -> TrackGuard {
        self.live.fetch_add(1, Ordering::AcqRel);
        TrackGuard(self.clone())
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Readiness fails, new connections are refused, clients are disconnected over
    /// `shutdown.drain_duration`.
    Draining,
    /// Asked to stop again while draining: the remaining clients go now.
    Hurry,
}

/// What the operations endpoints share: the metrics exporter, the drain switch, admin sessions.
pub struct Ops {
    pub prometheus: PrometheusHandle,
    phase: watch::Sender<Phase>,
    pub admin: Sessions,
}

impl Ops {
    pub fn new(prometheus: PrometheusHandle) -> Self {
        Self {
            prometheus,
            phase: watch::Sender::new(Phase::Serving),
            admin: Sessions::default(),
        }
    }

    /// Asks the node to drain and stop (SIGTERM, `POST /api/drain`, the admin page). True when
    /// this call started it.
    pub fn drain(&self) -> bool {
        self.phase.send_if_modified(|p| {
            let start = *p == Phase::Serving;
            if start {
                *p = Phase::Draining;
            }
            start
        })
    }

    /// Cuts a drain short: the remaining clients are disconnected at once.
    pub fn hurry(&self) {
        self.phase.send_if_modified(|p| {
            let changed = *p != Phase::Hurry;
            *p = Phase::Hurry;
            changed
        });
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn watch(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }
}

/// How long an admin login lasts.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Logged-in admin sessions: token → expiry.
#[derive(Default)]
pub struct Sessions {
    tokens: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    pub(crate) fn create(&self) -> String {
        use rand::Rng;
        let mut rng = rand::rng();
        let token: String = (0..32)
            .map(|_| format!("{:02x}", rng.random::<u8>()))
            .collect();
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        tokens.retain(|_, exp| *exp > now);
        tokens.insert(token.clone(), now + SESSION_TTL);
        token
    }

    pub(crate) fn valid(&self, token: &str) -> bool {
        let now = Instant::now();
        // Compared without early exit; the map lookup itself is by hash of the whole token.
        self.tokens
            .lock()
            .iter()
            .any(|(t, exp)| *exp > now && constant_time_eq(t.as_bytes(), token.as_bytes()))
    }

    pub(crate) fn remove(&self, token: &str) {
        self.tokens.lock().remove(token);
    }
}

/// Equal in time that depends only on the longer input's length, not on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
}

/// A token bucket shared by the requests of one node (`GET /connection/nodes`).
pub struct Limiter(Option<parking_lot::Mutex<herald_core::ratelimit::CommandBucket>>);

impl Limiter {
    /// `rate` per second, bursts of `rate`; 0: no limit.
    pub fn new(rate: u32) -> Self {
        Self(herald_core::ratelimit::CommandBucket::new(rate, rate).map(parking_lot::Mutex::new))
    }

    pub fn allow(&self) -> bool {
        match &self.0 {
            None => true,
            Some(b) => {
                b.lock().take(std::time::Instant::now()) == herald_core::ratelimit::Verdict::Allow
            }
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub config: Arc<Config>,
    pub tracker: Arc<Tracker>,
    /// Metrics exporter, drain switch, admin sessions.
    pub ops: Arc<Ops>,
    /// The rate limit of `GET /connection/nodes`.
    pub nodes_limiter: Arc<Limiter>,
    /// MQTT settings and persistent sessions.
    pub mqtt: Arc<crate::mqtt::settings::Mqtt>,
}
