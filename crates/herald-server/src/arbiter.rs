//! `GET /connection/nodes`: where a device should connect. Every node advertises its client
//! URL and load in the cluster heartbeat; any node answers with the live, non-draining nodes'
//! URLs, least loaded first. The nodes within a margin of the least loaded come in random
//! order, so a crowd of devices reconnecting at once does not all pick the same node.
//!
//! Only the configured client URLs and connection counts are shown (no ids, no internal
//! addresses beyond those URLs), the answer is small and bounded by the cluster size, and
//! the endpoint is rate-limited per node (`server.nodes_rate_limit`).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_protocol::api::NodeInfo;
use rand::seq::SliceRandom;
use serde::Serialize;

use crate::state::AppState;
pub use crate::state::Limiter;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct AdvertisedNode {
    pub url: String,
    pub name: String,
    pub connections: u32,
}

#[derive(Debug, Serialize)]
pub struct NodesResult {
    pub nodes: Vec<AdvertisedNode>,
}

/// Nodes within this many connections (or 10 % of the least loaded, if more) of the least
/// loaded one count as equally good.
const MARGIN: u32 = 100;

/// The live nodes devices may use, least loaded first; equally good ones shuffled.
pub fn rank(nodes: Vec<NodeInfo>, rng: &mut impl rand::Rng) -> Vec<AdvertisedNode> {
    let mut nodes: Vec<AdvertisedNode> = nodes
        .into_iter()
        .filter(|n| !n.draining && !n.url.is_empty())
        .map(|n| AdvertisedNode {
            url: n.url,
            name: n.name,
            connections: n.num_clients,
        })
        .collect();
    nodes.sort_by_key(|n| n.connections);
    let Some(least) = nodes.first().map(|n| n.connections) else {
        return nodes;
    };
    let bound = least.saturating_add(MARGIN.max(least / 10));
    let near = nodes.iter().take_while(|n| n.connections <= bound).count();
    nodes[..near].shuffle(rng);
    nodes
}

pub async fn nodes(State(state): State<AppState>) -> Response {
    if !state.nodes_limiter.allow() {
        return (StatusCode::TOO_MANY_REQUESTS, "too many requests\n").into_response();
    }
    let node = &state.node;
    let mut all = node.cluster_info();
    // A node that cannot reach the engine is cut off from the cluster: devices go elsewhere.
    if !node.engine.healthy() {
        all.retain(|n| n.uid != node.id);
    }
    let nodes = rank(all, &mut rand::rng());
    let mut response = Json(NodesResult { nodes }).into_response();
    let h = response.headers_mut();
    // Public, credential-free data: any page may read it.
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, clients: u32, draining: bool, url: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            num_clients: clients,
            draining,
            url: url.into(),
            ..Default::default()
        }
    }

    #[test]
    fn least_loaded_first_draining_and_unadvertised_left_out() {
        let mut rng = rand::rng();
        let ranked = rank(
            vec![
                info("busy", 5000, false, "ws://b/connection/websocket"),
                info("idle", 10, false, "ws://i/connection/websocket"),
                info("leaving", 0, true, "ws://l/connection/websocket"),
                info("mid", 2000, false, "ws://m/connection/websocket"),
                info("nourl", 0, false, ""),
            ],
            &mut rng,
        );
        let names: Vec<&str> = ranked.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["idle", "mid", "busy"]);
        assert_eq!(ranked[0].url, "ws://i/connection/websocket");
        assert!(rank(Vec::new(), &mut rng).is_empty());
    }

    #[test]
    fn nearly_equal_nodes_are_spread() {
        let mut rng = rand::rng();
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..200 {
            let ranked = rank(
                vec![
                    info("a", 1000, false, "ws://a"),
                    info("b", 1050, false, "ws://b"),
                    info("c", 9000, false, "ws://c"),
                ],
                &mut rng,
            );
            assert_eq!(ranked[2].name, "c", "a far busier node stays last");
            firsts.insert(ranked[0].name.clone());
        }
        assert_eq!(
            firsts.len(),
            2,
            "both near-least nodes come first sometimes"
        );
    }

    #[test]
    fn limiter_refuses_beyond_the_rate() {
        let l = Limiter::new(5);
        let allowed = (0..20).filter(|_| l.allow()).count();
        assert!((5..=6).contains(&allowed), "{allowed}");
        assert!((0..100).all(|_| Limiter::new(0).allow()));
    }
}
