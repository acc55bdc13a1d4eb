//! What every request handler shares: the node, the configuration, the count of live
//! connections (shutdown waits for it) and the operations state.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use herald_core::Node;
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

#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub config: Arc<Config>,
    pub tracker: Arc<Tracker>,
    /// Metrics exporter, drain switch, admin sessions.
    pub ops: Arc<crate::ops::Ops>,
    /// The rate limit of `GET /connection/nodes`.
    pub nodes_limiter: Arc<crate::arbiter::Limiter>,
    /// MQTT settings and persistent sessions.
    pub mqtt: Arc<crate::mqtt::Mqtt>,
}

/// Resolves once `stop` is true (or its sender is gone): the node-wide stop signal every
/// background task (listeners, certificate reload, key refresh) watches.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
