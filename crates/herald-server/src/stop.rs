//! The node-wide stop signal. A leaf: listeners, certificate reload and key refresh watch
//! it without depending on the node state that owns its sender.

use tokio::sync::watch;

/// Resolves once `stop` is true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
