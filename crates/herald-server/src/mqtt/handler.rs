//! Packets from an MQTT client, turned into client-protocol commands for the session: the
//! same authentication, permissions, history and recovery as every other transport.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_core::Node;
use herald_core::clock::Now;
use herald_core::conn::{ConnHandle, Control};
use herald_core::session::Session;
use herald_protocol::Disconnect;
use herald_protocol::client::{
    Command, ConnectRequest, PublishRequest, SubscribeRequest, UnsubscribeRequest,
};
use herald_protocol::codes::mqtt::v5;
use herald_protocol::json;
use parking_lot::Mutex;

use super::Settings;
use super::link::{Link, Pending, Sub};
use super::sessions::{Sessions, Stored};
use crate::transport::driver::Handler;
use herald_protocol::mqtt::{ConnectIn, Filter, In, PacketError, Reader, Version, Will, Writer};

/// The reason of the disconnect that closes a connection whose client id a newer
/// connection took.
pub const TAKEN_OVER: &str = "session taken over";

pub struct MqttHandler {
    session: Session,
    conn: Arc<ConnHandle>,
    node: Arc<Node>,
    link: Arc<Mutex<Link>>,
    reader: Reader,
    sessions: Arc<Sessions>,
    settings: Arc<Settings>,
    connect_seen: bool,
    /// The client id, once this connection holds it in `sessions`.
    client_id: Option<String>,
    /// 1.5 times the client's keep-alive (None: no keep-alive).
    keep_alive: Option<Duration>,
    last_seen: Instant,
    will: Option<Will>,
    /// How long the session is kept after the connection ends (None: not kept).
    keep_session: Option<Duration>,
    /// QoS 2 publications received and not yet released (PUBREL), by packet id.
    qos2: HashSet<u16>,
    /// When the persistent session is next saved to the engine.
    next_save: Option<Instant>,
    /// What was last saved to the engine, and when.
    saved: Option<(Vec<(String, Sub)>, Instant)>,
}

/// The client-protocol data of an MQTT payload: JSON as it is; other bytes (and an empty
/// payload) as a binary publication, which Protobuf and MQTT subscribers receive as the
/// same bytes and JSON subscribers as base64 with `binary: true`.
pub fn payload_data(payload: &[u8]) -> (json::Raw, bool) {
    match (!payload.is_empty())
        .then(|| json::from_bytes(payload))
        .flatten()
    {
        Some(raw) => (raw, false),
        None => (json::base64_string(payload), true),
    }
}

/// Why a topic filter cannot be subscribed, as an MQTT 5 SUBACK reason.
fn filter_refusal(topic: &str) -> Option<u8> {
    if topic.is_empty() {
        Some(v5::TOPIC_FILTER_INVALID)
    } else if topic.starts_with("$share/") {
        Some(v5::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED)
    } else if topic.contains(['+', '#']) {
        Some(v5::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED)
    } else {
        None
    }
}

fn topic_name_valid(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#'])
}

impl MqttHandler {
    pub fn new(
        session: Session,
        node: Arc<Node>,
        link: Arc<Mutex<Link>>,
        sessions: Arc<Sessions>,
        settings: Arc<Settings>,
        now: Instant,
    ) -> Self {
        let conn = session.conn().clone();
        Self {
            reader: Reader::new(settings.max_packet_size),
            session,
            conn,
            node,
            link,
            sessions,
            settings,
            connect_seen: false,
            client_id: None,
            keep_alive: None,
            last_seen: now,
            will: None,
            keep_session: None,
            qos2: HashSet::new(),
            next_save: None,
            saved: None,
        }
    }

    fn version(&self) -> Version {
        self.reader.version().unwrap_or(Version::V311)
    }

    /// Ends the connection with an MQTT 5 reason more precise than the code says.
    fn fail(&self, reason: u8, d: impl Into<Disconnect>) -> Disconnect {
        self.link.lock().reason = Some(reason);
        d.into()
    }

    fn local(&self, packet: Bytes) {
        self.link.lock().local(&self.conn, packet);
    }

    async fn command(
        &mut self,
        pending: Pending,
        cmd: Command,
        now: Now,
    ) -> Result<(), Disconnect> {
        let id = self.link.lock().command(pending);
        self.session.handle_command(Command { id, ..cmd }, now)?;
        // MQTT's packets wait for their command: its reply becomes their acknowledgement.
        self.session.settle(now).await
    }

    fn packet_error(&mut self, e: PacketError) -> Disconnect {
        tracing::debug!(client = %self.conn.id, error = %e, "MQTT packet refused");
        match e {
            PacketError::TooLarge { .. } => self.fail(
                v5::PACKET_TOO_LARGE,
                Disconnect::new(3501, "packet too large"),
            ),
            PacketError::UnsupportedVersion => {
                // Answered in 3.1.1's form, which every version reads (§3.1.2.2).
                let mut link = self.link.lock();
                link.connack_sent = true;
                link.client_left = true;
                link.local(
                    &self.conn,
                    Writer(Version::V311).connack_refused((0x84, 1), ""),
                );
                Disconnect::new(3501, "unsupported protocol version")
            }
            PacketError::NotConnect => Disconnect::BAD_REQUEST.into(),
            PacketError::Malformed(_) => self.fail(v5::MALFORMED_PACKET, Disconnect::BAD_REQUEST),
        }
    }

    async fn on_packet(&mut self, packet: In, now: Now) -> Result<(), Disconnect> {
        if !self.session.is_connected() && !matches!(packet, In::Connect(_)) {
            return Err(self.fail(v5::PROTOCOL_ERROR, Disconnect::BAD_REQUEST));
        }
        match packet {
            In::Connect(c) => self.connect(*c, now).await,
            In::Publish {
                topic,
                payload,
                qos,
                packet_id,
                dup: _,
            } => self.publish(topic, payload, qos, packet_id, now).await,
            In::PubAck(id) => {
                self.link.lock().acked(id, &self.conn);
                Ok(())
            }
            In::PubRel(id) => {
                self.qos2.remove(&id);
                self.local(Writer(self.version()).pubcomp(id));
                Ok(())
            }
            // Herald never sends QoS 2, so a client has nothing to acknowledge this way.
            In::PubRec(_) | In::PubComp(_) => Ok(()),
            In::Subscribe { packet_id, filters } => self.subscribe(packet_id, filters, now).await,
            In::Unsubscribe { packet_id, filters } => {
                self.unsubscribe(packet_id, filters, now).await
            }
            In::PingReq => {
                self.local(Writer(self.version()).pingresp());
                Ok(())
            }
            In::Disconnect {
                with_will,
                session_expiry,
            } => {
                if !with_will {
                    self.will = None;
                }
                if let Some(secs) = session_expiry {
                    self.keep_session = self.session_keep(secs);
                }
                self.link.lock().client_left = true;
                Err(Disconnect::new(3000, "client disconnected"))
            }
            In::Auth => Err(self.fail(v5::BAD_AUTHENTICATION_METHOD, Disconnect::BAD_REQUEST)),
            In::Unexpected => Err(self.fail(v5::PROTOCOL_ERROR, Disconnect::BAD_REQUEST)),
        }
    }

    fn session_keep(&self, secs: u32) -> Option<Duration> {
        (secs > 0).then(|| Duration::from_secs(u64::from(secs)).min(self.settings.session_expiry))
    }

    async fn connect(&mut self, c: ConnectIn, now: Now) -> Result<(), Disconnect> {
        if std::mem::replace(&mut self.connect_seen, true) {
            return Err(self.fail(v5::PROTOCOL_ERROR, Disconnect::BAD_REQUEST));
        }
        let version = self.version();
        let writer = Writer(version);
        let refuse = |link: &mut Link, codes: (u8, u8), d: Disconnect| {
            link.connack_sent = true;
            link.client_left = true;
            link.local(&self.conn, writer.connack_refused(codes, &d.reason));
            d
        };
        {
            let mut link = self.link.lock();
            link.writer = writer;
            link.connect_seen = true;
            link.receive_max = c
                .receive_max
                .unwrap_or(u16::MAX)
                .min(self.settings.max_inflight)
                .max(1);
            if c.auth_method {
                return Err(refuse(
                    &mut link,
                    (v5::BAD_AUTHENTICATION_METHOD, 4),
                    Disconnect::new(3501, "enhanced authentication is not supported"),
                ));
            }
            if c.client_id.is_empty() && !c.clean && version == Version::V311 {
                return Err(refuse(
                    &mut link,
                    (v5::CLIENT_ID_NOT_VALID, 2),
                    Disconnect::new(3501, "an empty client id needs a clean session"),
                ));
            }
            if let Some(w) = &c.will
                && !topic_name_valid(&w.topic)
            {
                return Err(refuse(
                    &mut link,
                    (v5::TOPIC_NAME_INVALID, 2),
                    Disconnect::new(3501, "invalid will topic"),
                ));
            }
        }
        let token = match c.password.as_deref().map(std::str::from_utf8) {
            None => String::new(),
            Some(Ok(t)) => t.to_string(),
            Some(Err(_)) => {
                return Err(refuse(
                    &mut self.link.lock(),
                    (v5::BAD_USER_NAME_OR_PASSWORD, 4),
                    Disconnect::INVALID_TOKEN.into(),
                ));
            }
        };
        let assigned = c.client_id.is_empty().then(|| self.conn.id.to_string());
        let fresh_id = assigned.is_some();
        let client_id = assigned.clone().unwrap_or(c.client_id);
        self.keep_session = match version {
            Version::V311 => (!c.clean).then_some(self.settings.session_expiry),
            Version::V5 => self.session_keep(c.session_expiry.unwrap_or(0)),
        };
        self.keep_alive = (c.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(c.keep_alive).saturating_mul(1500)));
        self.will = c.will;
        {
            let mut link = self.link.lock();
            link.accepted.assigned_client_id = assigned;
            link.accepted.receive_max = self.settings.max_inflight;
            link.accepted.max_packet_size =
                u32::try_from(self.settings.max_packet_size).unwrap_or(u32::MAX);
            link.accepted.session_expiry = match version {
                Version::V5 => c
                    .session_expiry
                    .map(|s| self.session_keep(s).map_or(0, |d| d.as_secs() as u32)),
                Version::V311 => None,
            };
        }
        // A session kept by the engine (saved by whichever node the device was on) is read
        // before the connect: nothing may wait between the connect reply and its CONNACK,
        // which says whether a session is present. It is used only if it is this user's.
        let stored = if c.clean || fresh_id || !self.node.engine.shares_state() {
            None
        } else {
            // Unreadable (the engine is down): this node's own copy, if any, is used.
            self.node
                .engine
                .get_state(&Stored::key(&client_id))
                .await
                .ok()
        };
        let cmd = Command {
            connect: Some(ConnectRequest {
                token,
                name: "mqtt".into(),
                version: version.name().into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.command(Pending::Connect, cmd, now).await?;
        if !self.session.is_connected() {
            // Refused with an error reply: the link answers with the CONNACK and closes.
            return Ok(());
        }
        // No await from here until the CONNACK is written: it is built from the reply
        // already queued, and must say whether the session was present.
        let claimed = self.sessions.claim(
            &client_id,
            self.session.user(),
            &self.conn,
            &self.link,
            !c.clean,
            now.mono,
        );
        self.client_id = Some(client_id);
        let taken_over = claimed.previous.is_some();
        if let Some(previous) = claimed.previous {
            previous.close(Disconnect::new(3011, TAKEN_OVER));
        }
        let mut subs = claimed.subs;
        if !taken_over && let Some(kept) = stored {
            // Every node saves there, and a clean start removes it there, so it is the
            // truth unless a live connection on this node just handed over where it is.
            subs = kept.and_then(|b| Stored::decode(&b, self.session.user(), now.unix));
        }
        self.link.lock().accepted.session_present = subs.is_some();
        // Only an engine shared between nodes keeps sessions beyond this node's memory.
        let shared = self.node.engine.shares_state();
        self.next_save = self
            .keep_session
            .filter(|_| shared)
            .map(|_| now.mono + self.settings.session_save_interval);
        if shared
            && c.clean
            && !fresh_id
            && let Some(client_id) = &self.client_id
        {
            // A clean start ends the session kept for this id on every node.
            let _ = self
                .node
                .engine
                .put_state(&Stored::key(client_id), None, Duration::ZERO)
                .await;
        }
        for (channel, sub) in subs.unwrap_or_default() {
            let qos = sub.qos;
            self.join(channel, qos, Some(sub), 0, 0, true, now).await?;
        }
        Ok(())
    }

    /// The session as the engine keeps it, when it is persistent: kept `keep` from `now`.
    fn stored(&self, mut subs: Vec<(String, Sub)>, now: Now) -> Option<(Stored, Duration)> {
        let keep = self.keep_session?;
        subs.sort_by(|a, b| a.0.cmp(&b.0));
        let stored = Stored {
            user: self.session.user().to_string(),
            expires: now.unix.saturating_add(keep.as_secs()),
            subs,
        };
        Some((stored, keep))
    }

    /// Saves the persistent session where every node reads it, when it changed since the
    /// last save or half its keep time went by (the engine lets it expire then).
    async fn save(&mut self, now: Now) {
        let Some(client_id) = self.client_id.clone() else {
            return;
        };
        let positions = self.link.lock().positions();
        let Some((stored, keep)) = self.stored(positions, now) else {
            return;
        };
        if let Some((subs, at)) = &self.saved
            && *subs == stored.subs
            && now.mono < *at + keep / 2
        {
            return;
        }
        let key = Stored::key(&client_id);
        // A failure is logged and counted by the engine; the next save tries again.
        if self
            .node
            .engine
            .put_state(&key, Some(stored.encode()), keep)
            .await
            .is_ok()
        {
            self.saved = Some((stored.subs, now.mono));
        }
    }

    /// Subscribes one channel through the session: resuming from `resume`, or delivering
    /// the channel's latest publication as the retained message.
    #[allow(clippy::too_many_arguments)]
    async fn join(
        &mut self,
        channel: String,
        qos: u8,
        resume: Option<Sub>,
        packet_id: u16,
        index: usize,
        no_retained: bool,
        now: Now,
    ) -> Result<(), Disconnect> {
        let mut req = SubscribeRequest {
            channel: channel.clone(),
            recoverable: true,
            ..Default::default()
        };
        let mut retained = None;
        let mut dup_through = 0;
        match resume {
            Some(s) if s.positioned && !s.epoch.is_empty() => {
                if qos > 0 {
                    dup_through = s.sent;
                }
                req.recover = true;
                req.epoch = s.epoch;
                req.offset = s.offset;
            }
            _ if !no_retained => {
                // The latest publication, recovered from just before it: it comes in the
                // subscribe reply, in order with what is published meanwhile.
                if let Ok(h) = self.node.history(&channel, 0, None, false).await
                    && h.position.offset > 0
                {
                    req.recover = true;
                    req.epoch = h.position.epoch;
                    req.offset = h.position.offset - 1;
                    retained = Some(h.position.offset);
                }
            }
            _ => {}
        }
        let pending = Pending::Subscribe {
            packet_id,
            index,
            channel,
            qos,
            retained,
            dup_through,
        };
        let cmd = Command {
            subscribe: Some(req),
            ..Default::default()
        };
        self.command(pending, cmd, now).await
    }

    async fn subscribe(
        &mut self,
        packet_id: u16,
        filters: Vec<Filter>,
        now: Now,
    ) -> Result<(), Disconnect> {
        let v311 = self.version() == Version::V311;
        let mut codes = Vec::with_capacity(filters.len());
        let mut joins = Vec::new();
        {
            let mut link = self.link.lock();
            for (i, f) in filters.into_iter().enumerate() {
                let granted = f.qos.min(1);
                if let Some(refusal) = filter_refusal(&f.topic) {
                    codes.push(Some(if v311 { 0x80 } else { refusal }));
                } else if let Some(s) = link.subs.get_mut(&f.topic) {
                    // Subscribing again replaces the QoS (§3.8.4); the stream goes on.
                    s.qos = granted;
                    codes.push(Some(granted));
                } else {
                    codes.push(None);
                    joins.push((i, f, granted));
                }
            }
            link.expect_ack(packet_id, codes, false);
            link.flush_acks_local(&self.conn);
        }
        for (i, f, granted) in joins {
            self.join(f.topic, granted, None, packet_id, i, f.no_retained, now)
                .await?;
        }
        Ok(())
    }

    async fn unsubscribe(
        &mut self,
        packet_id: u16,
        filters: Vec<String>,
        now: Now,
    ) -> Result<(), Disconnect> {
        let mut leaves = Vec::new();
        {
            let mut link = self.link.lock();
            let codes = filters
                .into_iter()
                .map(|f| match link.subs.remove(&f) {
                    Some(_) => {
                        leaves.push(f);
                        None
                    }
                    None => Some(v5::NO_SUBSCRIPTION_EXISTED),
                })
                .collect();
            link.expect_ack(packet_id, codes, true);
            link.flush_acks_local(&self.conn);
        }
        for channel in leaves {
            let cmd = Command {
                unsubscribe: Some(UnsubscribeRequest { channel }),
                ..Default::default()
            };
            self.command(Pending::Unsubscribe { packet_id }, cmd, now)
                .await?;
        }
        Ok(())
    }

    async fn publish(
        &mut self,
        topic: String,
        payload: Bytes,
        qos: u8,
        packet_id: Option<u16>,
        now: Now,
    ) -> Result<(), Disconnect> {
        if !topic_name_valid(&topic) {
            return Err(self.fail(
                v5::TOPIC_NAME_INVALID,
                Disconnect::new(3501, "invalid topic name"),
            ));
        }
        if qos == 2 {
            if self.version() == Version::V5 {
                // CONNACK announced QoS 1 as the maximum.
                return Err(self.fail(
                    v5::QOS_NOT_SUPPORTED,
                    Disconnect::new(3501, "QoS 2 not supported"),
                ));
            }
            // 3.1.1: a QoS 2 publication received again before its PUBREL is the same one.
            if let Some(id) = packet_id
                && !self.qos2.insert(id)
            {
                self.local(Writer(self.version()).puback(id, true, v5::SUCCESS));
                return Ok(());
            }
        }
        let (data, binary) = payload_data(&payload);
        let cmd = Command {
            publish: Some(PublishRequest {
                channel: topic,
                data: Some(data),
                binary,
            }),
            ..Default::default()
        };
        self.command(Pending::Publish { packet_id, qos }, cmd, now)
            .await
    }

    /// Channels the session asked to resubscribe (a hole in what the node delivered),
    /// recovered from where the client is.
    async fn resubscribe(&mut self, now: Now) -> Result<(), Disconnect> {
        let channels = std::mem::take(&mut self.link.lock().resubscribe);
        for channel in channels {
            let Some(sub) = self.link.lock().subs.remove(&channel) else {
                continue;
            };
            let qos = sub.qos;
            self.join(channel, qos, Some(sub), 0, 0, true, now).await?;
        }
        Ok(())
    }

    fn keep_alive_deadline(&self) -> Option<Instant> {
        self.keep_alive.map(|k| self.last_seen + k)
    }

    /// The handler's own next deadline: keep-alive or session save.
    fn own_deadline(&self) -> Option<Instant> {
        match (self.keep_alive_deadline(), self.next_save) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Handler for MqttHandler {
    async fn on_message(&mut self, data: Bytes, now: Now) -> Result<(), Disconnect> {
        self.last_seen = now.mono;
        if data.is_empty() {
            // The wire could not frame a packet; why is in the link.
            let e = self.link.lock().read_error.take();
            return Err(
                self.packet_error(e.unwrap_or_else(|| PacketError::Malformed("unframed".into())))
            );
        }
        let packet = match self.reader.decode(&data) {
            Ok(p) => p,
            Err(e) => return Err(self.packet_error(e)),
        };
        self.on_packet(packet, now).await
    }

    async fn on_control(&mut self, c: Control, now: Now) -> Result<(), Disconnect> {
        match c {
            // MQTT connections take no emulated commands; the link uses this control to
            // wake the handler for resubscribes.
            Control::Commands(_) => self.resubscribe(now).await,
            c => {
                self.session.handle_control(c, now)?;
                self.session.settle(now).await
            }
        }
    }

    async fn tick(&mut self, now: Now) -> Result<Instant, Disconnect> {
        if let Some(at) = self.keep_alive_deadline()
            && now.mono >= at
        {
            return Err(self.fail(v5::KEEP_ALIVE_TIMEOUT, Disconnect::NO_PONG));
        }
        if let Some(at) = self.next_save
            && now.mono >= at
        {
            self.save(now).await;
            self.next_save = Some(now.mono + self.settings.session_save_interval);
        }
        self.session.tick(now)?;
        self.session.settle(now).await?;
        let next = self.session.next_wakeup(now);
        Ok(self.own_deadline().map_or(next, |k| next.min(k)))
    }

    fn next_wakeup(&self, now: Now) -> Instant {
        let next = self.session.next_wakeup(now);
        self.own_deadline().map_or(next, |k| next.min(k))
    }

    fn goodbye(&self, _d: &Disconnect) -> Bytes {
        // The wire writes MQTT's own goodbye (a refused CONNACK or a DISCONNECT).
        Bytes::new()
    }

    async fn close(&mut self) {
        let now = Now::system();
        if self.session.is_connected()
            && let Some(w) = self.will.take()
        {
            let (data, binary) = payload_data(&w.payload);
            let cmd = Command {
                publish: Some(PublishRequest {
                    channel: w.topic,
                    data: Some(data),
                    binary,
                }),
                ..Default::default()
            };
            // Published with the connection's permissions; the reply goes nowhere.
            if let Err(d) = self
                .command(
                    Pending::Publish {
                        packet_id: None,
                        qos: 0,
                    },
                    cmd,
                    now,
                )
                .await
            {
                tracing::debug!(client = %self.conn.id, code = d.code, "will not published");
            }
        }
        if let Some(client_id) = self.client_id.take() {
            let subs = self.link.lock().positions();
            let expires = self.keep_session.map(|d| now.mono + d);
            let shared = self.node.engine.shares_state();
            let stored = shared.then(|| self.stored(subs.clone(), now)).flatten();
            let held = self
                .sessions
                .release(&client_id, &self.conn, subs, expires, now.mono);
            // Saved for every node, unless a newer connection took the session over; a
            // session that stops being kept (MQTT 5 DISCONNECT with expiry 0) is removed.
            if held && shared && (stored.is_some() || self.saved.is_some()) {
                let (value, keep) = match stored {
                    Some((s, keep)) => (Some(s.encode()), keep),
                    None => (None, Duration::ZERO),
                };
                let _ = self
                    .node
                    .engine
                    .put_state(&Stored::key(&client_id), value, keep)
                    .await;
            }
        }
        self.session.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_payloads_pass_as_they_are_and_other_bytes_as_binary() {
        let (raw, binary) = payload_data(br#"{"t":21.5}"#);
        assert_eq!((raw.get(), binary), (r#"{"t":21.5}"#, false));
        let (raw, binary) = payload_data(b"\x00\xffhello");
        assert!(binary);
        assert_eq!(
            json::base64_bytes(&raw).as_deref(),
            Some(&b"\x00\xffhello"[..])
        );
        let (raw, binary) = payload_data(b"");
        assert!(binary);
        assert_eq!(json::base64_bytes(&raw).as_deref(), Some(&b""[..]));
    }

    #[test]
    fn wildcards_and_shared_subscriptions_are_refused_by_name() {
        assert_eq!(filter_refusal("news"), None);
        assert_eq!(
            filter_refusal("news/+"),
            Some(v5::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED)
        );
        assert_eq!(
            filter_refusal("#"),
            Some(v5::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED)
        );
        assert_eq!(
            filter_refusal("$share/g/news"),
            Some(v5::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED)
        );
        assert_eq!(filter_refusal(""), Some(v5::TOPIC_FILTER_INVALID));
    }
}
