//! What an MQTT connection's handler (packets in) and wire (packets out) share: the commands
//! in flight and the acknowledgement each awaits, the subscriptions with their QoS and
//! stream position, and the QoS 1 deliveries awaiting PUBACK.
//!
//! The session speaks the client protocol in its Protobuf form; the link reads each queued
//! reply and push as the typed Protobuf message it is and writes the MQTT packet for it, so
//! every MQTT packet follows the order of the connection's outbox. Packets the handler
//! itself answers (PINGRESP, PUBCOMP, a SUBACK decided without the session) go through the
//! same outbox as an empty frame, each standing for the next of [`Link::local`].

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use herald_core::conn::{ConnHandle, Control};
use herald_protocol::Disconnect;
use herald_protocol::codes::mqtt::{self as codes, v5};
use herald_protocol::codes::unsubscribe;
use herald_protocol::proto::{self, Publication, Push, Reply};

use herald_protocol::mqtt::{Accepted, PacketError, Version, Writer};

/// A command sent to the session and what its reply becomes.
#[derive(Debug)]
pub enum Pending {
    Connect,
    /// One filter of a SUBSCRIBE (`packet_id` 0: a subscription restored or renewed by the
    /// server, which the client gets no SUBACK for).
    Subscribe {
        packet_id: u16,
        index: usize,
        channel: String,
        qos: u8,
        /// The offset of the channel's latest publication, delivered with the retain flag.
        retained: Option<u64>,
        /// Publications through this offset were sent before (a resumed session): DUP.
        dup_through: u64,
    },
    Publish {
        packet_id: Option<u16>,
        qos: u8,
    },
    Unsubscribe {
        packet_id: u16,
    },
}

/// A subscription as MQTT sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sub {
    pub qos: u8,
    pub epoch: String,
    /// Offset through which the channel was delivered; [`Link::positions`] lowers it below
    /// QoS 1 deliveries not yet acknowledged.
    pub offset: u64,
    /// Offset through which the channel was written to the device: what a resumed session
    /// sends again below it carries the DUP flag.
    pub sent: u64,
    /// Whether the channel keeps a stream position (history on).
    pub positioned: bool,
}

impl Sub {
    /// A subscription delivered and written through `offset`.
    pub fn new(qos: u8, epoch: String, offset: u64, positioned: bool) -> Self {
        Self {
            qos,
            epoch,
            offset,
            sent: offset,
            positioned,
        }
    }
}

/// Whether a delivery at `qos` is written now rather than queued for room in the window.
fn qos_written(qos: u8, inflight: usize, receive_max: u16) -> bool {
    qos == 0 || inflight < usize::from(receive_max)
}

/// A SUBACK or UNSUBACK waiting for its filters' replies.
#[derive(Debug)]
struct Ack {
    packet_id: u16,
    codes: Vec<Option<u8>>,
    unsubscribe: bool,
}

#[derive(Debug)]
struct Inflight {
    channel: String,
    offset: u64,
}

pub struct Link {
    pub writer: Writer,
    next_command: u32,
    pending: HashMap<u32, Pending>,
    /// Packets the handler wrote, each sent when the outbox reaches its empty marker frame.
    local: VecDeque<Bytes>,
    pub subs: HashMap<String, Sub>,
    acks: VecDeque<Ack>,
    /// Output held back until the SUBACK at the front of `acks` is complete, so a
    /// subscription's publications follow its SUBACK.
    held: Vec<Bytes>,
    inflight: BTreeMap<u16, Inflight>,
    /// QoS 1 deliveries beyond the client's receive window.
    waiting: VecDeque<(String, Publication, (bool, bool))>,
    /// Payload bytes in `waiting`; past `max_waiting_bytes` the client is a slow consumer.
    waiting_bytes: usize,
    max_waiting_bytes: usize,
    next_packet_id: u16,
    pub receive_max: u16,
    pub connack_sent: bool,
    /// The client sent CONNECT (a refused connection is answered with a CONNACK only then).
    pub connect_seen: bool,
    /// Why the wire could not frame the client's bytes into a packet.
    pub read_error: Option<PacketError>,
    pub accepted: Accepted,
    /// The client sent DISCONNECT, or its CONNECT was refused: nothing more is written.
    pub client_left: bool,
    /// An MQTT 5 reason that says more than the disconnect code maps to.
    pub reason: Option<u8>,
    /// Channels the session dropped asking for a resubscribe (a hole in what this node
    /// delivered): the handler resubscribes them, recovering from `subs`.
    pub resubscribe: Vec<String>,
}

impl Link {
    /// `max_waiting_bytes`: what QoS 1 deliveries beyond the receive window may hold on the
    /// node (the connection's `client.max_queue_bytes`).
    pub fn new(version: Version, receive_max: u16, max_waiting_bytes: usize) -> Self {
        Self {
            writer: Writer(version),
            next_command: 0,
            pending: HashMap::new(),
            local: VecDeque::new(),
            subs: HashMap::new(),
            acks: VecDeque::new(),
            held: Vec::new(),
            inflight: BTreeMap::new(),
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            max_waiting_bytes,
            next_packet_id: 0,
            receive_max: receive_max.max(1),
            connack_sent: false,
            connect_seen: false,
            read_error: None,
            accepted: Accepted::default(),
            client_left: false,
            reason: None,
            resubscribe: Vec::new(),
        }
    }

    /// A fresh command id, remembered with what its reply becomes.
    pub fn command(&mut self, pending: Pending) -> u32 {
        self.next_command = self.next_command.wrapping_add(1).max(1);
        self.pending.insert(self.next_command, pending);
        self.next_command
    }

    /// Queues a packet of the handler's, to go out in outbox order.
    pub fn local(&mut self, conn: &ConnHandle, packet: Bytes) {
        self.local.push_back(packet);
        conn.send(Bytes::new());
    }

    /// Starts a SUBACK (or UNSUBACK) with codes known so far (`None`: awaiting the session).
    pub fn expect_ack(&mut self, packet_id: u16, codes: Vec<Option<u8>>, unsubscribe: bool) {
        self.acks.push_back(Ack {
            packet_id,
            codes,
            unsubscribe,
        });
    }

    /// Sends the acks at the front that are complete, from the handler.
    pub fn flush_acks_local(&mut self, conn: &ConnHandle) {
        let mut out = Vec::new();
        self.flush_acks(&mut out);
        for p in out {
            self.local(conn, p);
        }
    }

    fn flush_acks(&mut self, out: &mut Vec<Bytes>) {
        while let Some(front) = self.acks.front() {
            let Some(codes) = front.codes.iter().copied().collect::<Option<Vec<u8>>>() else {
                break;
            };
            let packet = match front.unsubscribe {
                false => self.writer.suback(front.packet_id, &codes),
                true => self.writer.unsuback(front.packet_id, &codes),
            };
            self.acks.pop_front();
            out.push(packet);
        }
        if self.acks.iter().all(|a| a.unsubscribe) {
            out.append(&mut self.held);
        }
    }

    fn settle(&mut self, packet_id: u16, index: usize, code: u8, out: &mut Vec<Bytes>) {
        if let Some(a) = self.acks.iter_mut().find(|a| a.packet_id == packet_id)
            && let Some(c) = a.codes.get_mut(index)
        {
            *c = Some(code);
        }
        self.flush_acks(out);
    }

    /// Output of publications: held while a SUBACK is incomplete.
    fn emit(&mut self, packet: Bytes, out: &mut Vec<Bytes>) {
        if self.acks.iter().any(|a| !a.unsubscribe) {
            self.held.push(packet);
        } else {
            out.push(packet);
        }
    }

    fn packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_packet_id) {
                return self.next_packet_id;
            }
        }
    }

    /// Translates frames the session queued into MQTT packets.
    pub fn translate(
        &mut self,
        frames: impl IntoIterator<Item = Bytes>,
        conn: &ConnHandle,
    ) -> Vec<Bytes> {
        let mut out = Vec::new();
        for frame in frames {
            if frame.is_empty() {
                if let Some(p) = self.local.pop_front() {
                    out.push(p);
                }
                continue;
            }
            for reply in proto::decode_replies(&frame) {
                match reply {
                    Ok(reply) => self.on_reply(reply, &mut out, conn),
                    Err(e) => {
                        tracing::error!(client = %conn.id, error = %e, "unreadable session frame")
                    }
                }
            }
        }
        self.release_idle();
        out
    }

    /// Frees the queues a quiet connection no longer uses: an idle device keeps only its
    /// subscriptions (docs/performance.md, idle memory).
    fn release_idle(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            self.pending = HashMap::new();
        }
        if self.local.is_empty() && self.local.capacity() > 0 {
            self.local = VecDeque::new();
        }
        if self.acks.is_empty() && self.acks.capacity() > 0 {
            self.acks = VecDeque::new();
        }
        if self.held.is_empty() && self.held.capacity() > 0 {
            self.held = Vec::new();
        }
        if self.waiting.is_empty() && self.waiting.capacity() > 0 {
            self.waiting = VecDeque::new();
        }
    }

    fn on_reply(&mut self, reply: Reply, out: &mut Vec<Bytes>, conn: &ConnHandle) {
        if reply.id == 0 {
            // A push, or the session's ping (MQTT's keep-alive replaces it).
            if let Some(push) = reply.push {
                self.on_push(push, out, conn);
            }
            return;
        }
        let Some(pending) = self.pending.remove(&reply.id) else {
            return;
        };
        let error = reply.error.as_ref().map(|e| e.code);
        match pending {
            Pending::Connect => match error {
                Some(code) => {
                    out.push(
                        self.writer
                            .connack_refused(codes::connack_for_error(code), ""),
                    );
                    self.connack_sent = true;
                    // A refused CONNACK is the last packet (§3.2.2.2).
                    self.client_left = true;
                    conn.close(Disconnect::new(3500, "connect refused"));
                }
                None => {
                    out.push(self.writer.connack_accepted(&self.accepted));
                    self.connack_sent = true;
                    // Server-side subscriptions of the token deliver at QoS 0.
                    if let Some(result) = reply.connect {
                        for (channel, sub) in result.subs {
                            let positioned = sub.positioned || sub.recoverable;
                            let at = sub.offset;
                            self.subs
                                .insert(channel.clone(), Sub::new(0, sub.epoch, at, positioned));
                            for p in sub.publications {
                                self.deliver(&channel, p, (false, false), out, conn);
                            }
                        }
                    }
                }
            },
            Pending::Subscribe {
                packet_id,
                index,
                channel,
                qos,
                retained,
                dup_through,
            } => match (error, reply.subscribe) {
                (None, Some(result)) => {
                    // Written so far: up to just before the reply's publications, which
                    // `deliver` counts as they are written (some may wait for the window).
                    let before = match result.publications.first() {
                        Some(p) => p.offset.saturating_sub(1),
                        None => result.offset,
                    };
                    let positioned = result.positioned || result.recoverable;
                    self.subs.insert(
                        channel.clone(),
                        Sub::new(qos, result.epoch.clone(), before, positioned),
                    );
                    if packet_id != 0 {
                        self.settle(packet_id, index, qos, out);
                    }
                    for p in result.publications {
                        let flags = (retained == Some(p.offset), p.offset <= dup_through);
                        self.deliver(&channel, p, flags, out, conn);
                    }
                }
                (code, _) => {
                    self.subs.remove(&channel);
                    if packet_id != 0 {
                        let c = match self.writer.0 {
                            Version::V311 => codes::v3::SUBACK_FAILURE,
                            Version::V5 => codes::suback_v5(code.unwrap_or(100)),
                        };
                        self.settle(packet_id, index, c, out);
                    }
                }
            },
            Pending::Publish { packet_id, qos } => match (error, self.writer.0) {
                (Some(code), Version::V311) => {
                    // 3.1.1 cannot refuse a publish: the connection is closed (§3.3.5).
                    tracing::debug!(client = %conn.id, code, "MQTT publish refused");
                    conn.close(Disconnect::PERMISSION_DENIED.into());
                }
                (error, _) => {
                    if let Some(id) = packet_id
                        && qos > 0
                    {
                        let reason = error.map_or(v5::SUCCESS, codes::puback_v5);
                        out.push(self.writer.puback(id, qos == 2, reason));
                    }
                }
            },
            Pending::Unsubscribe { packet_id } => {
                if let Some(a) = self.acks.iter_mut().find(|a| a.packet_id == packet_id)
                    && let Some(c) = a.codes.iter_mut().find(|c| c.is_none())
                {
                    *c = Some(match error {
                        None => v5::SUCCESS,
                        Some(_) => v5::NO_SUBSCRIPTION_EXISTED,
                    });
                }
                self.flush_acks(out);
            }
        }
    }

    fn on_push(&mut self, push: Push, out: &mut Vec<Bytes>, conn: &ConnHandle) {
        if let Some(p) = push.r#pub {
            self.deliver(&push.channel, p, (false, false), out, conn);
        } else if let Some(u) = push.unsubscribe {
            if u.code == unsubscribe::INSUFFICIENT_STATE.0 && self.subs.contains_key(&push.channel)
            {
                self.resubscribe.push(push.channel);
                // Wakes the handler (see `MqttHandler::on_control`).
                conn.control(Control::Commands(Bytes::new()));
            } else {
                self.subs.remove(&push.channel);
            }
        } else if let Some(s) = push.subscribe {
            // A subscription made by the server API: QoS 0.
            let positioned = s.positioned || s.recoverable;
            self.subs.insert(
                push.channel,
                Sub::new(0, String::new(), s.offset, positioned),
            );
        }
    }

    /// Writes a publication at the subscription's QoS; `(retain, dup)` are its flags.
    fn deliver(
        &mut self,
        channel: &str,
        p: Publication,
        (retain, dup): (bool, bool),
        out: &mut Vec<Bytes>,
        conn: &ConnHandle,
    ) {
        let qos = match self.subs.get_mut(channel) {
            Some(s) => {
                s.offset = s.offset.max(p.offset);
                if qos_written(s.qos, self.inflight.len(), self.receive_max) {
                    s.sent = s.sent.max(p.offset);
                }
                s.qos
            }
            None => 0,
        };
        if qos == 0 {
            let packet = self
                .writer
                .publish(channel, Bytes::from(p.data), 0, None, retain, false);
            self.emit(packet, out);
            return;
        }
        if !qos_written(qos, self.inflight.len(), self.receive_max) {
            self.waiting_bytes = self.waiting_bytes.saturating_add(p.data.len());
            if self.waiting_bytes > self.max_waiting_bytes {
                // Like any connection whose queue overflows: a slow consumer, closed.
                self.waiting.clear();
                self.waiting_bytes = 0;
                conn.close(Disconnect::SLOW.into());
                return;
            }
            self.waiting
                .push_back((channel.to_string(), p, (retain, dup)));
            return;
        }
        let id = self.packet_id();
        self.inflight.insert(
            id,
            Inflight {
                channel: channel.to_string(),
                offset: p.offset,
            },
        );
        let packet = self
            .writer
            .publish(channel, Bytes::from(p.data), 1, Some(id), retain, dup);
        self.emit(packet, out);
    }

    /// The client acknowledged a QoS 1 delivery; deliveries waiting for room go out.
    pub fn acked(&mut self, packet_id: u16, conn: &ConnHandle) {
        if self.inflight.remove(&packet_id).is_none() {
            return;
        }
        let mut out = Vec::new();
        while self.inflight.len() < usize::from(self.receive_max)
            && let Some((channel, p, flags)) = self.waiting.pop_front()
        {
            self.waiting_bytes = self.waiting_bytes.saturating_sub(p.data.len());
            self.deliver(&channel, p, flags, &mut out, conn);
        }
        for p in out {
            self.local(conn, p);
        }
    }

    /// The subscriptions and their positions, as a persistent session keeps them: a QoS 1
    /// delivery not acknowledged is delivered again.
    pub fn positions(&self) -> Vec<(String, Sub)> {
        let mut subs: HashMap<&str, Sub> = self
            .subs
            .iter()
            .map(|(c, s)| (c.as_str(), s.clone()))
            .collect();
        for f in self.inflight.values() {
            if let Some(s) = subs.get_mut(f.channel.as_str()) {
                s.offset = s.offset.min(f.offset.saturating_sub(1));
            }
        }
        for (channel, p, _) in &self.waiting {
            if let Some(s) = subs.get_mut(channel.as_str()) {
                s.offset = s.offset.min(p.offset.saturating_sub(1));
            }
        }
        subs.into_iter().map(|(c, s)| (c.to_string(), s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn publication(offset: u64, data: &[u8]) -> Publication {
        Publication {
            data: data.to_vec(),
            offset,
            ..Default::default()
        }
    }

    fn qos1_link(window: u16, max_bytes: usize) -> (Link, ConnHandle) {
        let mut link = Link::new(Version::V5, window, max_bytes);
        link.subs
            .insert("ch".into(), Sub::new(1, "e".into(), 0, true));
        (link, ConnHandle::new(Arc::from("c"), 1 << 20))
    }

    #[test]
    fn qos1_beyond_the_window_waits_and_counts_as_unacknowledged() {
        let (mut link, conn) = qos1_link(1, 1 << 20);
        let mut out = Vec::new();
        for offset in 1..=3 {
            link.deliver(
                "ch",
                publication(offset, b"x"),
                (false, false),
                &mut out,
                &conn,
            );
        }
        assert_eq!(out.len(), 1, "one in flight, two waiting");
        let kept = link.positions();
        assert_eq!(
            kept[0].1.offset, 0,
            "resumes before the first unacknowledged"
        );
        assert_eq!(kept[0].1.sent, 1, "only the first was written");
        link.acked(1, &conn);
        assert_eq!(link.positions()[0].1.offset, 1);
        assert!(!conn.is_closing());
    }

    #[test]
    fn waiting_past_the_queue_limit_is_a_slow_consumer() {
        let (mut link, conn) = qos1_link(1, 100);
        let mut out = Vec::new();
        for offset in 1..=3 {
            link.deliver(
                "ch",
                publication(offset, &[0; 60]),
                (false, false),
                &mut out,
                &conn,
            );
        }
        assert!(conn.is_slow(), "120 bytes waiting over a 100-byte limit");
    }
}
