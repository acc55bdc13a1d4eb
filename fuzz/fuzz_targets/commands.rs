//! The client command decoder and the session behind it: a frame of `\n`-separated JSON
//! commands, decoded with `split_commands` + serde, then handled by a real `Session` on a
//! node with the memory engine. Must never panic, whatever the bytes; a bad frame is a
//! disconnect (3501), never a crash.
#![no_main]

use std::sync::{Arc, OnceLock};

use herald_core::conn::ConnHandle;
use herald_core::engine::memory::MemoryEngine;
use herald_core::node::{Node, NodeConfig};
use herald_core::options::{ClientOptions, NamespaceOptions};
use herald_core::session::Session;
use herald_protocol::client::{Command, split_commands};
use libfuzzer_sys::fuzz_target;

struct World {
    rt: tokio::runtime::Runtime,
    node: Arc<Node>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let client = ClientOptions {
            token_hmac_secret: "fuzz-secret".into(),
            allow_anonymous: true,
            max_channels: 16,
            ..Default::default()
        };
        let open = NamespaceOptions {
            history_size: 4,
            history_ttl: std::time::Duration::from_secs(60),
            force_recovery: true,
            presence: true,
            join_leave: true,
            allow_subscribe_for_client: true,
            allow_subscribe_for_anonymous: true,
            allow_publish_for_client: true,
            allow_publish_for_anonymous: true,
            allow_history_for_client: true,
            allow_history_for_anonymous: true,
            allow_presence_for_client: true,
            allow_presence_for_anonymous: true,
            ..Default::default()
        };
        let closed = NamespaceOptions {
            name: "closed".into(),
            ..Default::default()
        };
        let node = rt.block_on(async {
            Node::new(
                NodeConfig {
                    name: "fuzz".into(),
                    client,
                    namespaces: vec![open, closed],
                },
                |hub| Arc::new(MemoryEngine::new(hub)),
            )
        });
        World { rt, node }
    })
}

fuzz_target!(|data: &[u8]| {
    // The decoder alone.
    for line in split_commands(data) {
        if let Ok(cmd) = serde_json::from_slice::<Command>(line) {
            let _ = cmd.is_pong();
        }
    }
    // The session: the first byte picks whether it starts connected.
    let w = world();
    let (preconnect, frame) = match data.split_first() {
        Some((b, rest)) => (b & 1 == 1, rest),
        None => (false, data),
    };
    w.rt.block_on(async {
        let conn = Arc::new(ConnHandle::new(Arc::from("fuzz-conn"), 1 << 20));
        let mut session = Session::new(w.node.clone(), conn.clone());
        if preconnect {
            let _ = session.handle_frame(b"{\"id\":1,\"connect\":{}}").await;
        }
        let _ = session.handle_frame(frame).await;
        let _ = conn.drain();
        session.close().await;
    });
});
