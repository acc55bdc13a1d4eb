//! The node's MQTT state, held by `AppState`: kept apart from the handlers in `mqtt` so the
//! shared state does not depend on them.

use std::sync::Arc;
use std::time::Duration;

use super::sessions;
use crate::config::MqttConfig;

/// What every MQTT connection of the node is held to.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_packet_size: usize,
    pub max_inflight: u16,
    pub session_expiry: Duration,
    pub session_save_interval: Duration,
}

impl Settings {
    pub fn from_config(c: &MqttConfig) -> Self {
        Self {
            max_packet_size: c.max_packet_size,
            max_inflight: c.max_inflight,
            session_expiry: c.session_expiry,
            session_save_interval: c.session_save_interval,
        }
    }
}

/// The node's MQTT state: its settings and the persistent sessions.
pub struct Mqtt {
    pub settings: Arc<Settings>,
    pub sessions: Arc<sessions::Sessions>,
}

impl Mqtt {
    pub fn new(c: &MqttConfig) -> Self {
        Self {
            settings: Arc::new(Settings::from_config(c)),
            sessions: Arc::default(),
        }
    }
}
