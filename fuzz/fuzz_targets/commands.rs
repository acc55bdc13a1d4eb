//! The client command decoder and the session behind it: a frame of `\n`-separated JSON
//! commands, decoded with `split_commands` + serde, then handled by a real `Session` on a
//! fresh node (memory engine) per input, so a crash reproduces from its input alone. Checks
//! what is documented, not just "no panic": a frame whose first command is not JSON closes
//! with 3501; the session's timers, stepped with a fake clock, close an unconnected session
//! with 3502 after the connect timeout and a connected one that never answers a ping with
//! 3012.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use herald_core::clock::Now;
use herald_core::conn::ConnHandle;
use herald_core::engine::memory::MemoryEngine;
use herald_core::node::{Node, NodeConfig};
use herald_core::options::{ClientOptions, NamespaceOptions};
use herald_core::session::Session;
use herald_protocol::client::{Command, split_commands};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

fn node() -> Arc<Node> {
    let client = ClientOptions {
        token_hmac_secret: "fuzz-secret".into(),
        allow_anonymous: true,
        max_channels: 16,
        ..Default::default()
    };
    let open = NamespaceOptions {
        history_size: 4,
        history_ttl: Duration::from_secs(60),
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
    Node::new(
        NodeConfig {
            name: "fuzz".into(),
            client,
            namespaces: vec![open, closed],
            ..Default::default()
        },
        |hub| Arc::new(MemoryEngine::new(hub)),
    )
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks whether the session starts connected.
    let (preconnect, frame) = match data.split_first() {
        Some((b, rest)) => (b & 1 == 1, rest),
        None => (false, data),
    };
    let first_is_garbage = split_commands(frame)
        .next()
        .is_some_and(|l| serde_json::from_slice::<Command>(l).is_err());
    runtime().block_on(async {
        let node = node();
        let opts = node.client.clone();
        let start = Now::system();
        let conn = Arc::new(ConnHandle::new(Arc::from("fuzz-conn"), 1 << 20));
        let mut session = Session::new(node.clone(), conn.clone(), start.mono);
        if preconnect {
            let r = match session.handle_frame(b"{\"id\":1,\"connect\":{}}", start) {
                Ok(()) => session.settle(start).await,
                Err(d) => Err(d),
            };
            assert!(r.is_ok(), "anonymous connect refused: {r:?}");
        }
        let r = match session.handle_frame(frame, start) {
            Ok(()) => session.settle(start).await,
            Err(d) => Err(d),
        };
        if first_is_garbage {
            let d = r.as_ref().expect_err("a frame that is not JSON was accepted");
            assert_eq!(d.code, 3501, "garbage closed with {d:?}");
        }
        let _ = conn.drain();
        if r.is_ok() {
            if !session.is_connected() {
                let late = start.after(opts.connect_timeout + Duration::from_secs(1));
                let t = session.tick(late);
                assert_eq!(t.map_err(|d| d.code), Err(3502));
            } else {
                // The ping goes out, then nobody answers it.
                let ping = start.after(opts.ping_interval);
                assert!(session.tick(ping).is_ok());
                let silent = ping.after(opts.pong_timeout + Duration::from_secs(1));
                let t = session.tick(silent);
                assert!(matches!(t, Err(ref d) if d.code == 3012 || d.code == 3005), "{t:?}");
            }
        }
        session.close().await;
        let stats = node.hub.stats();
        assert_eq!(stats.clients, 0, "a closed session left a client in the hub");
        assert_eq!(stats.subscriptions, 0, "a closed session left subscriptions");
    });
});
