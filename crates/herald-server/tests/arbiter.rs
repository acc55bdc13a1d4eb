//! `GET /connection/nodes`: the arbiter devices ask where to connect. A single node lists
//! itself; in a Redis cluster every node lists the live ones, least loaded first, without
//! draining or dead nodes; the endpoint is rate-limited.

#![allow(clippy::unwrap_used)] // Tests may panic on what they did not expect.

mod common;

use common::*;
use herald_server::Server;
use serde_json::{Value, json};

async fn nodes(s: &Server) -> (u16, Value) {
    http(s, "GET", "/connection/nodes", None, "").await.unwrap()
}

/// The advertised URLs of the listed nodes, in order.
async fn urls(s: &Server) -> Vec<String> {
    let (status, v) = nodes(s).await;
    assert_eq!(status, 200, "{v}");
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["url"].as_str().unwrap().to_string())
        .collect()
}

fn own_url(s: &Server) -> String {
    format!("ws://{}/connection/websocket", s.addr)
}

#[tokio::test]
async fn a_single_node_lists_itself_with_its_load() {
    let s = start("").await;
    let (_a, _) = Client::connect(&s, "a").await.unwrap();
    let (_b, _) = Client::connect(&s, "b").await.unwrap();
    let (status, v) = nodes(&s).await;
    assert_eq!(status, 200);
    let list = v["nodes"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["url"], own_url(&s));
    assert_eq!(list[0]["connections"], 2);
    s.shutdown().await;
}

#[tokio::test]
async fn advertise_url_and_rate_limit() {
    let toml = config("").replace(
        "shutdown_timeout = \"3s\"",
        "shutdown_timeout = \"3s\"\nadvertise_url = \"wss://edge-1.example.com/connection/websocket\"\nnodes_rate_limit = 3",
    );
    let s = start_with(&toml).await;
    assert_eq!(
        urls(&s).await,
        ["wss://edge-1.example.com/connection/websocket"]
    );
    let mut limited = 0;
    for _ in 0..10 {
        if nodes(&s).await.0 == 429 {
            limited += 1;
        }
    }
    assert!(limited >= 5, "only {limited} of 10 requests were limited");
    s.shutdown().await;
}

fn redis_config(prefix: &str, drain: &str) -> String {
    config_on(&redis_engine(prefix, REDIS)).replace(
        "drain_duration = \"0s\"",
        &format!("drain_duration = \"{drain}\""),
    )
}

#[tokio::test]
async fn cluster_lists_live_nodes_least_loaded_first_without_draining_or_dead_ones() {
    require_redis(REDIS).await;
    let prefix = format!("herald-arbiter-{}", herald_core::node::new_id());
    let busy = start_with(&redis_config(&prefix, "0s")).await;
    let idle = start_with(&redis_config(&prefix, "0s")).await;
    let leaving = start_with(&redis_config(&prefix, "30s")).await;
    // More than the arbiter's margin (100) of connections on one node.
    let mut held = Vec::new();
    for i in 0..130 {
        held.push(Client::connect(&busy, &format!("u{i}")).await.unwrap().0);
    }
    let (busy_url, idle_url, leaving_url) = (own_url(&busy), own_url(&idle), own_url(&leaving));
    eventually("every node listed, the busy one last", || async {
        let u = urls(&idle).await;
        u.len() == 3 && u[2] == busy_url
    })
    .await;
    // Any node answers the same way.
    eventually("the busy node sees the same ranking", || async {
        let u = urls(&busy).await;
        u.len() == 3 && u[2] == busy_url
    })
    .await;
    // A draining node leaves the list at once (its heartbeat says so).
    api(&leaving, "drain", json!({})).await.unwrap();
    eventually("the draining node left out", || async {
        !urls(&idle).await.contains(&leaving_url)
    })
    .await;
    // A dead node leaves it once evicted.
    drop(held);
    busy.shutdown().await;
    eventually("the stopped node evicted", || async {
        urls(&idle).await == [idle_url.clone()]
    })
    .await;
    idle.shutdown().await;
    leaving.shutdown().await;
}
