//! A small pool of Redis pub/sub connections. Channels are sharded over them by hash; each
//! shard batches its SUBSCRIBE/UNSUBSCRIBE commands, resubscribes everything after a
//! reconnect, and tells local subscribers to recover when messages may have been missed.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use herald_core::engine::EngineError;
use tokio::sync::{mpsc, oneshot};

use crate::Shared;

/// Most operations folded into one SUBSCRIBE/UNSUBSCRIBE command.
const MAX_BATCH: usize = 512;

enum Op {
    Subscribe(String, oneshot::Sender<Result<(), EngineError>>),
    Unsubscribe(String),
}

struct Shard {
    tx: mpsc::UnboundedSender<Op>,
    connected: Arc<AtomicBool>,
}

pub(crate) struct PubSubPool {
    shards: Vec<Shard>,
    hasher: std::collections::hash_map::RandomState,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for PubSubPool {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl PubSubPool {
    pub(crate) fn start(client: redis::Client, shared: Arc<Shared>, conn: crate::Conn) -> Self {
        let mut shards = Vec::new();
        let mut tasks = Vec::new();
        for index in 0..shared.cfg.pubsub_shards {
            let (tx, rx) = mpsc::unbounded_channel();
            let connected = Arc::new(AtomicBool::new(false));
            tasks.push(tokio::spawn(run_shard(
                index,
                client.clone(),
                shared.clone(),
                conn.clone(),
                rx,
                connected.clone(),
            )));
            shards.push(Shard { tx, connected });
        }
        Self {
            shards,
            hasher: Default::default(),
            tasks,
        }
    }

    fn shard(&self, channel: &str) -> &Shard {
        let i = (self.hasher.hash_one(channel) as usize) % self.shards.len();
        &self.shards[i]
    }

    pub(crate) fn connected(&self) -> bool {
        self.shards
            .iter()
            .all(|s| s.connected.load(Ordering::Relaxed))
    }

    pub(crate) async fn wait_ready(&self, timeout: Duration) -> Result<(), EngineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.connected() {
            if tokio::time::Instant::now() > deadline {
                return Err(EngineError::Unavailable(
                    "redis pub/sub did not connect".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Resolves once Redis confirmed the subscription: everything published afterwards
    /// reaches this node.
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<(), EngineError> {
        let (tx, rx) = oneshot::channel();
        self.shard(channel)
            .tx
            .send(Op::Subscribe(channel.to_string(), tx))
            .map_err(|_| EngineError::Unavailable("pub/sub stopped".into()))?;
        rx.await
            .map_err(|_| EngineError::Unavailable("pub/sub stopped".into()))?
    }

    pub(crate) async fn unsubscribe(&self, channel: &str) -> Result<(), EngineError> {
        self.shard(channel)
            .tx
            .send(Op::Unsubscribe(channel.to_string()))
            .map_err(|_| EngineError::Unavailable("pub/sub stopped".into()))
    }
}

fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

/// Applies queued operations in order to `channels` and returns the names to SUBSCRIBE and
/// UNSUBSCRIBE, plus who waits for the subscribe confirmation.
type Waiters = Vec<oneshot::Sender<Result<(), EngineError>>>;

fn fold(ops: Vec<Op>, channels: &mut HashSet<String>) -> (Vec<String>, Vec<String>, Waiters) {
    let mut subs: Vec<String> = Vec::new();
    let mut unsubs: Vec<String> = Vec::new();
    let mut waiters = Vec::new();
    for op in ops {
        match op {
            Op::Subscribe(ch, w) => {
                unsubs.retain(|c| *c != ch);
                if channels.insert(ch.clone()) {
                    subs.push(ch);
                }
                waiters.push(w);
            }
            Op::Unsubscribe(ch) => {
                subs.retain(|c| *c != ch);
                if channels.remove(&ch) {
                    unsubs.push(ch);
                }
            }
        }
    }
    (subs, unsubs, waiters)
}

async fn run_shard(
    index: usize,
    client: redis::Client,
    shared: Arc<Shared>,
    conn: crate::Conn,
    mut rx: mpsc::UnboundedReceiver<Op>,
    connected: Arc<AtomicBool>,
) {
    let control = shared.control_channel();
    let pub_prefix = format!("{}.pub.", shared.cfg.prefix);
    let mut channels: HashSet<String> = HashSet::new();
    let mut first = true;
    let mut backoff = Duration::from_millis(50);
    loop {
        let pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                if connected.swap(false, Ordering::Relaxed) || first {
                    tracing::warn!(shard = index, error = %e, "redis pub/sub unavailable");
                }
                // Nobody can be confirmed while Redis is away: refuse waiting subscribes.
                while let Ok(op) = rx.try_recv() {
                    let mut pending = vec![op];
                    let (_, _, waiters) = fold(std::mem::take(&mut pending), &mut channels);
                    for w in waiters {
                        let _ = w.send(Err(unavailable("redis unavailable")));
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut names: Vec<String> = channels.iter().map(|c| shared.pub_channel(c)).collect();
        if index == 0 {
            names.push(control.clone());
        }
        if !names.is_empty()
            && let Err(e) = sink.subscribe(&names).await
        {
            tracing::warn!(shard = index, error = %e, "redis resubscribe failed");
            tokio::time::sleep(backoff).await;
            continue;
        }
        if !first {
            tracing::info!(
                shard = index,
                channels = channels.len(),
                "redis pub/sub reconnected"
            );
            let list: Vec<String> = channels.iter().cloned().collect();
            shared.on_resubscribed(&list);
        }
        first = false;
        backoff = Duration::from_millis(50);
        connected.store(true, Ordering::Relaxed);
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    let name = msg.get_channel_name();
                    if name == control {
                        shared.on_control_message(msg.get_payload_bytes(), &conn);
                    } else if let Some(ch) = name.strip_prefix(&pub_prefix) {
                        shared.on_channel_message(ch, msg.get_payload_bytes());
                    }
                }
                op = rx.recv() => {
                    let Some(op) = op else { return };
                    let mut ops = vec![op];
                    while ops.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(op) => ops.push(op),
                            Err(_) => break,
                        }
                    }
                    let (subs, unsubs, waiters) = fold(ops, &mut channels);
                    let mut result: Result<(), String> = Ok(());
                    if !subs.is_empty() {
                        let names: Vec<String> = subs.iter().map(|c| shared.pub_channel(c)).collect();
                        result = sink.subscribe(&names).await.map_err(|e| e.to_string());
                    }
                    if result.is_ok() && !unsubs.is_empty() {
                        let names: Vec<String> = unsubs.iter().map(|c| shared.pub_channel(c)).collect();
                        result = sink.unsubscribe(&names).await.map_err(|e| e.to_string());
                    }
                    let failed = result.is_err();
                    for w in waiters {
                        let _ = w.send(result.clone().map_err(unavailable));
                    }
                    if failed {
                        break;
                    }
                }
            }
        }
        connected.store(false, Ordering::Relaxed);
        tracing::warn!(shard = index, "redis pub/sub connection lost; reconnecting");
    }
}
