//! The engine, proxy and key-fetch work behind a session's requests. Each piece owns what it
//! needs (no borrow of the session), so the driver can run it while the session goes on
//! serving pongs, timers and writes; its result comes back as a completion.

use std::sync::Arc;

use herald_protocol::client::{ClientInfo, SubscribeResult};
use herald_protocol::json::Raw;
use herald_protocol::{Disconnect, ErrorCode, ProtocolError};

use super::{Applied, Auth, Prepared, Session, Sub, SubParams, apply_override};
use crate::auth;
use crate::clock::Now;
use crate::conn::ConnHandle;
use crate::engine::StreamPosition;
use crate::failure::{self, Fail, TokenUse};
use crate::node::Node;
use crate::options::NamespaceOptions;
use crate::proxy::{self, ProxyKind, ProxyOptions};

/// Who the connection is, for work that runs outside the session.
#[derive(Clone)]
pub(super) struct Who {
    pub node: Arc<Node>,
    pub conn: Arc<ConnHandle>,
    pub user: String,
    pub conn_info: Option<Raw>,
}

impl Who {
    pub fn client_info(&self, chan_info: Option<Raw>) -> ClientInfo {
        ClientInfo {
            user: self.user.clone(),
            client: self.conn.id.to_string(),
            conn_info: self.conn_info.clone(),
            chan_info,
        }
    }
}

/// A proxy request serialised while the session was at hand (its body borrows the session).
pub(super) struct ProxyCall {
    pub headers: Vec<(String, String)>,
    pub body: Raw,
}

impl ProxyCall {
    pub async fn send<T>(
        &self,
        node: &Node,
        kind: ProxyKind,
        options: &ProxyOptions,
    ) -> Result<T, proxy::Outcome>
    where
        T: serde::de::DeserializeOwned + Default,
    {
        node.proxy(kind, options, &self.headers, &self.body).await
    }
}

/// After authentication: the connection limit, and the user's other connections give way to
/// this one when the personal channel asks for a single connection.
pub(super) async fn admit(node: &Node, conn: &ConnHandle, mut a: Auth) -> Result<Applied, Fail> {
    let limit = node.client.user_connection_limit;
    if limit > 0 && !a.user.is_empty() && node.hub.user_conns(&a.user).len() >= limit {
        return Err(Disconnect::CONNECTION_LIMIT.into());
    }
    let personal = &node.client.subscribe_to_user_personal_channel;
    if let Some(ch) = personal.channel(&a.user) {
        a.channels.push(ch);
        if personal.single_connection {
            // The user's other connections, on every node, give way to this one.
            node.control(crate::engine::ControlCommand::Disconnect {
                user: a.user.clone(),
                client: String::new(),
                session: String::new(),
                whitelist: vec![conn.id.to_string()],
                code: Disconnect::CONNECTION_LIMIT.code,
                reason: Disconnect::CONNECTION_LIMIT.reason.to_string(),
            })
            .await?;
        }
    }
    Ok(Applied::Authorized(Box::new(a)))
}

/// Checks a subscription token; returns (chan_info, expire_at).
pub(super) async fn check_sub_token(
    who: &Who,
    ch: &str,
    token: &str,
    usage: TokenUse,
    now: Now,
) -> Result<(Option<Raw>, Option<u64>), Fail> {
    let claims = who
        .node
        .tokens
        .check_subscribe(token)
        .await
        .map_err(|e| failure::token(e, usage))?;
    if claims.sub != who.user || claims.channel != ch {
        return Err(failure::token_mismatch());
    }
    let info = auth::info_from_claims(claims.info, claims.b64info.as_deref())
        .map_err(|_| Fail::from(Disconnect::INVALID_TOKEN))?;
    Ok((
        info,
        Session::token_expiry(claims.expire_at, claims.exp, now),
    ))
}

/// How a subscribe is allowed: already (namespace permissions), or by the backend or a
/// subscription token, which fill in what the subscription carries.
pub(super) enum SubAuth {
    Allowed,
    Proxy { call: ProxyCall, proxy_expiry: bool },
    Token(String),
}

pub(super) async fn authorize_subscription(
    who: &Who,
    ch: &str,
    how: SubAuth,
    mut p: SubParams,
    now: Now,
) -> Result<SubParams, Fail> {
    match how {
        SubAuth::Allowed => {}
        SubAuth::Proxy { call, proxy_expiry } => {
            let node = &who.node;
            let r: proxy::SubscribeResult = call
                .send(node, ProxyKind::Subscribe, &node.channel_proxy.subscribe)
                .await?;
            p.chan_info = proxy::raw_or_b64(r.info, r.b64info.as_deref())?;
            p.data = proxy::raw_or_b64(r.data, r.b64data.as_deref())?;
            if r.expire_at > 0 {
                p.expire_at = now.clamp_expiry(Some(r.expire_at));
                p.proxy_expiry = proxy_expiry;
            }
            p.ns_override = r.r#override;
        }
        SubAuth::Token(token) => {
            (p.chan_info, p.expire_at) =
                check_sub_token(who, ch, &token, TokenUse::Subscribe, now).await?;
        }
    }
    Ok(p)
}

/// A subscription joined to the hub (its publications buffered), to be positioned.
pub(super) struct Joining {
    pub channel: String,
    ns: NamespaceOptions,
    first: bool,
    params: SubParams,
}

/// Joins the hub first, buffering what arrives while the engine positions the subscription.
/// Synchronous, so a subscription is either joined and buffering (which
/// [`Session::close`] leaves) or not joined at all.
pub(super) fn join(who: &Who, ch: &str, mut p: SubParams) -> Result<Joining, Fail> {
    let base = who.node.namespace(ch).ok_or(ErrorCode::UNKNOWN_CHANNEL)?;
    let ns = match p.ns_override.take() {
        Some(o) => apply_override(base.clone(), o),
        None => base.clone(),
    };
    let push_join_leave = ns.join_leave && (p.join_leave || ns.force_push_join_leave);
    who.conn.start_buffering(ch);
    let first = who
        .node
        .hub
        .add_subscriber_with(ch, &who.conn, push_join_leave, p.delta);
    Ok(Joining {
        channel: ch.to_string(),
        ns,
        first,
        params: p,
    })
}

/// Reads the stream position and, when recovering, the missed publications; on failure
/// leaves what `join` joined. The reply is queued when the session finishes it.
pub(super) async fn position(who: &Who, j: Joining, now: Now) -> Result<Prepared, Fail> {
    let Joining {
        channel: ch,
        ns,
        first,
        params: p,
    } = j;
    match read_position(who, &ch, &ns, first, &p, now).await {
        Ok((result, history, recovering, after)) => Ok(Prepared {
            result: SubscribeResult {
                data: p.data,
                delta: p.delta,
                ..result
            },
            history,
            recovering,
            after,
            sub: Sub {
                presence: ns.presence,
                join_leave: ns.join_leave,
                chan_info: p.chan_info,
                expire_at: p.expire_at,
                proxy_expiry: p.proxy_expiry,
                expiring: false,
            },
            channel: ch,
        }),
        Err(e) => {
            abandon(who, &ch, ns.presence).await;
            Err(e)
        }
    }
}

/// Leaves a channel `join` joined whose subscription will not be finished: it stops
/// buffering, leaves the hub (and the engine when it was the node's last subscriber) and
/// drops its presence.
pub(super) async fn abandon(who: &Who, ch: &str, presence: bool) {
    let node = &who.node;
    who.conn.cancel_buffering(ch);
    if node.hub.remove_subscriber(ch, &who.conn.id) {
        let _ = node.engine.unsubscribe(ch).await;
    }
    if presence {
        let _ = node.engine.remove_presence(ch, &who.conn.id).await;
    }
}

impl Joining {
    /// Whether the namespace keeps presence for this channel.
    pub(super) fn presence(&self) -> bool {
        self.ns.presence
    }
}

type Positioned = (
    SubscribeResult,
    Vec<herald_protocol::client::Publication>,
    bool,
    u64,
);

async fn read_position(
    who: &Who,
    ch: &str,
    ns: &NamespaceOptions,
    first: bool,
    p: &SubParams,
    now: Now,
) -> Result<Positioned, Fail> {
    let engine = &who.node.engine;
    if first {
        engine.subscribe(ch).await.map_err(ProtocolError::from)?;
    }
    let info = who.client_info(p.chan_info.clone());
    if ns.presence {
        engine
            .add_presence(ch, &who.conn.id, info.clone())
            .await
            .map_err(ProtocolError::from)?;
    }
    if ns.join_leave {
        engine
            .publish_join_leave(ch, info, true)
            .await
            .map_err(ProtocolError::from)?;
    }
    let history = ns.history_enabled();
    let recoverable = history && (ns.force_recovery || p.recoverable);
    let positioned = history && (ns.force_positioning || p.positioned || recoverable);
    let (expires, ttl) = Session::ttl_fields(p.expire_at, now);
    let mut result = SubscribeResult {
        expires,
        ttl,
        recoverable,
        positioned,
        ..Default::default()
    };
    if !positioned {
        return Ok((result, Vec::new(), false, 0));
    }
    let recovering = recoverable && p.recover;
    let mut q = Node::history_query(ns);
    if recovering {
        q.since = Some(StreamPosition {
            offset: p.offset,
            epoch: p.epoch.clone(),
        });
        // A client further behind than a recovery may return costs the engine no reads
        // (NATS reads one message per request): it gets the position only.
        q.whole_within = Some(who.node.client.recovery_max_publication_limit);
    } else {
        q.limit = Some(0);
    }
    let h = engine.history(ch, q).await.map_err(ProtocolError::from)?;
    result.epoch = h.position.epoch.clone();
    result.offset = h.position.offset;
    if !recovering {
        return Ok((result, Vec::new(), false, h.position.offset));
    }
    result.was_recovering = true;
    let top = h.position.offset;
    let epoch_ok = p.epoch.is_empty() || p.epoch == h.position.epoch;
    let complete = epoch_ok
        && p.offset <= top
        && match h.publications.first() {
            Some(first) => p.offset.checked_add(1) == Some(first.offset),
            None => p.offset == top,
        }
        && h.publications.len() <= who.node.client.recovery_max_publication_limit;
    if complete {
        Ok((result, h.publications, true, p.offset))
    } else if p.reject_unrecovered {
        Err(ErrorCode::UNRECOVERABLE_POSITION.into())
    } else {
        // Not recoverable: the client is told so, and goes live from the current top.
        Ok((result, Vec::new(), false, top))
    }
}

/// The engine side of leaving a channel the hub has already let go of (`last`: this node
/// has no other subscriber, so the engine stops delivering it here).
pub(super) async fn leave(who: &Who, ch: &str, sub: Sub, last: bool) {
    let engine = &who.node.engine;
    if last && let Err(e) = engine.unsubscribe(ch).await {
        tracing::warn!(channel = %ch, error = %e, "engine unsubscribe failed");
    }
    if sub.presence {
        let _ = engine.remove_presence(ch, &who.conn.id).await;
    }
    if sub.join_leave {
        let _ = engine
            .publish_join_leave(ch, who.client_info(sub.chan_info), false)
            .await;
    }
}
