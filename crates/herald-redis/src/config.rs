//! `[engine.redis]` options.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Redis address, e.g. "redis://127.0.0.1:6379" (or "rediss://" with TLS). With
    /// `cluster = true`, several seed addresses separated by commas.
    /// Default: "redis://127.0.0.1:6379".
    pub url: String,
    /// Talk to a Redis Cluster: `url` lists seed nodes. Default: false (standalone).
    pub cluster: bool,
    /// Prefix of every key and pub/sub channel, so several Herald clusters can share one
    /// Redis. Default: "herald".
    pub prefix: String,
    /// Pub/sub connections per node; channels are sharded over them. Default: 4.
    pub pubsub_shards: usize,
    /// How long a presence entry lives unless its node refreshes it (a dead node's clients
    /// vanish after this). Default: "60s".
    #[serde(with = "herald_core::duration")]
    pub presence_ttl: Duration,
    /// How often a node announces itself. Default: "2s".
    #[serde(with = "herald_core::duration")]
    pub node_heartbeat: Duration,
    /// A node silent for longer than this is dropped from `info`. Default: "10s".
    #[serde(with = "herald_core::duration")]
    pub node_eviction: Duration,
    /// Timeout of one Redis command. Default: "3s".
    #[serde(with = "herald_core::duration")]
    pub command_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            prefix: "herald".into(),
            pubsub_shards: 4,
            presence_ttl: Duration::from_secs(60),
            node_heartbeat: Duration::from_secs(2),
            node_eviction: Duration::from_secs(10),
            command_timeout: Duration::from_secs(3),
        }
    }
}

impl RedisConfig {
    /// The addresses in `url`.
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect()
    }

    pub fn validate(&self) -> Result<(), String> {
        let urls = self.urls();
        if urls.is_empty() {
            return Err("engine.redis.url: no address given".into());
        }
        for u in &urls {
            if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                return Err(format!(
                    "engine.redis.url: {u:?} must start with redis:// or rediss://"
                ));
            }
        }
        if urls.len() > 1 && !self.cluster {
            return Err(
                "engine.redis.url: several addresses need engine.redis.cluster = true".into(),
            );
        }
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err("engine.redis.prefix: must be non-empty and without braces".into());
        }
        if self.pubsub_shards == 0 || self.pubsub_shards > 64 {
            return Err("engine.redis.pubsub_shards: must be 1..=64".into());
        }
        if self.node_eviction <= self.node_heartbeat {
            return Err("engine.redis.node_eviction: must be longer than node_heartbeat".into());
        }
        if self.presence_ttl < Duration::from_secs(1) {
            return Err("engine.redis.presence_ttl: must be at least 1s".into());
        }
        Ok(())
    }
}
