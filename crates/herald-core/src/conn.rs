//! The shared half of a connection: its bounded outbox of pre-encoded frames, the buffers of
//! channels being subscribed, and server-initiated controls. The hub writes here from any
//! task; the connection's own task drains it.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Instant;

use atomic_waker::AtomicWaker;

use bytes::Bytes;
use herald_protocol::Disconnect;
use herald_protocol::client::Publication;
use herald_protocol::codes::unsubscribe;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Identifies a publication among those this process delivered: a subscriber receiving
/// deltas gets one only against the very publication it received last.
static NEXT_MESSAGE_ID: AtomicU64 = AtomicU64::new(1);

/// A publication encoded once per client codec as a push frame, shared by every subscriber
/// of that codec.
#[derive(Debug)]
pub struct PubMessage {
    /// Unique in this process, never 0.
    pub id: u64,
    pub channel: Arc<str>,
    pub publication: Publication,
    /// `{"push":{"channel":..,"pub":{..}}}`, without trailing newline.
    pub frame: Bytes,
    /// The length-prefixed Protobuf push, encoded by the first Protobuf subscriber to need
    /// it: a channel with JSON subscribers only never encodes it.
    proto: OnceLock<Bytes>,
    /// The JSON push with `data` as a string, as JSON subscribers with delta read a whole
    /// publication; encoded only if such a subscriber exists.
    json_delta_whole: OnceLock<Bytes>,
    /// On channels with delta subscribers: the previous publication and the patches
    /// against it, each computed once.
    delta: Option<Box<Patches>>,
    /// When the hub received it (for the delivery latency metric).
    pub received: Instant,
}

/// What a delta is computed against: a publication's data as each codec carries it.
#[derive(Debug)]
pub struct DeltaBase {
    id: u64,
    /// The JSON text of `data` (JSON subscribers patch this).
    json: Box<str>,
    /// The bytes Protobuf subscribers get, when they differ from `json` (binary data).
    bytes: Option<Box<[u8]>>,
}

impl DeltaBase {
    fn bytes(&self) -> &[u8] {
        self.bytes.as_deref().unwrap_or(self.json.as_bytes())
    }
}

#[derive(Debug)]
struct Patches {
    base: Arc<DeltaBase>,
    /// `None`: a patch would not be smaller than the data, the whole publication goes.
    json: OnceLock<Option<Bytes>>,
    proto: OnceLock<Option<Bytes>>,
}

impl PubMessage {
    pub fn new(channel: Arc<str>, publication: Publication, received: Instant) -> Self {
        let frame = herald_protocol::client::encode_publication_push(&channel, &publication);
        Self {
            id: NEXT_MESSAGE_ID.fetch_add(1, Ordering::Relaxed),
            channel,
            publication,
            frame,
            proto: OnceLock::new(),
            json_delta_whole: OnceLock::new(),
            delta: None,
            received,
        }
    }

    /// Lets delta subscribers that received `base` get this one as a patch against it.
    pub fn with_delta_base(mut self, base: Arc<DeltaBase>) -> Self {
        self.delta = Some(Box::new(Patches {
            base,
            json: OnceLock::new(),
            proto: OnceLock::new(),
        }));
        self
    }

    /// This publication as the base of the next one's delta.
    pub fn as_delta_base(&self) -> Arc<DeltaBase> {
        let p = &self.publication;
        let bytes = match p.binary {
            true => Some(p.payload().into_owned().into_boxed_slice()),
            false => None,
        };
        Arc::new(DeltaBase {
            id: self.id,
            json: p.data.get().into(),
            bytes,
        })
    }

    /// The Protobuf push, encoded on first use and shared afterwards.
    pub fn proto_frame(&self) -> Bytes {
        self.proto
            .get_or_init(|| {
                herald_protocol::proto::encode_publication_push_proto(
                    &self.channel,
                    &self.publication,
                )
            })
            .clone()
    }

    /// The frame for a subscriber with delta whose last publication in the channel was
    /// `last` (0: none since it subscribed): a patch when this one's base is `last` and the
    /// patch is smaller, the whole publication otherwise.
    fn delta_frame(&self, codec: Codec, last: u64) -> Bytes {
        let patches = self
            .delta
            .as_deref()
            .filter(|d| last != 0 && d.base.id == last);
        match codec {
            Codec::Json => patches
                .and_then(|d| d.json.get_or_init(|| self.json_patch(&d.base)).clone())
                .unwrap_or_else(|| self.json_delta_whole()),
            Codec::Protobuf => patches
                .and_then(|d| d.proto.get_or_init(|| self.proto_patch(&d.base)).clone())
                .unwrap_or_else(|| self.proto_frame()),
        }
    }

    fn json_delta_whole(&self) -> Bytes {
        self.json_delta_whole
            .get_or_init(|| {
                herald_protocol::client::encode_publication_push(
                    &self.channel,
                    &self.publication.delta_form(None),
                )
            })
            .clone()
    }

    fn json_patch(&self, base: &DeltaBase) -> Option<Bytes> {
        let new = self.publication.data.get();
        let patch = herald_protocol::delta::fossil_create(base.json.as_bytes(), new.as_bytes());
        // Both sides are UTF-8 and the encoder never splits a character: the patch is text.
        let patch = String::from_utf8(patch).ok()?;
        (patch.len() < new.len()).then(|| {
            herald_protocol::client::encode_publication_push(
                &self.channel,
                &self.publication.delta_form(Some(&patch)),
            )
        })
    }

    fn proto_patch(&self, base: &DeltaBase) -> Option<Bytes> {
        let new = self.publication.payload();
        let patch = herald_protocol::delta::fossil_create(base.bytes(), &new);
        (patch.len() < new.len()).then(|| {
            herald_protocol::proto::encode_publication_delta_push_proto(
                &self.channel,
                &self.publication,
                &patch,
            )
        })
    }
}

/// How a subscription ended its subscribe, for [`ConnHandle::complete_buffering`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Settled {
    /// Offset through which the client has the stream (0: not positioned).
    pub through: u64,
    /// `Some` when the subscription negotiated delta: the id of the last publication queued
    /// to it (0: none), the base the next one may be patched against.
    pub delta_last: Option<u64>,
    /// What reached this node live has a hole after `through`: the client is told to
    /// resubscribe (2500) and gets nothing more of the channel until it has.
    pub resubscribe: bool,
}

/// `delivered_through` of a channel held back: its client was told to resubscribe, and any
/// publication sent before it has would move its position past the hole.
const HELD: u64 = u64::MAX;

/// How a connection's client encodes messages: JSON text, or length-prefixed Protobuf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    #[default]
    Json,
    Protobuf,
}

impl Codec {
    /// Name in logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::Protobuf => "protobuf",
        }
    }
}

/// Actions asked of a session from outside (server API, node shutdown).
#[derive(Debug)]
pub enum Control {
    Subscribe {
        channel: String,
        info: Option<herald_protocol::json::Raw>,
        data: Option<herald_protocol::json::Raw>,
    },
    Unsubscribe {
        channel: String,
        code: u32,
        reason: String,
    },
    Refresh {
        expire_at: Option<u64>,
        expired: bool,
    },
    /// Client commands that arrived on another request (the `/emulation` endpoint of the
    /// HTTP-streaming and SSE transports), handled as if read from the connection.
    Commands(bytes::Bytes),
}

impl Control {
    /// Tells the client to resubscribe to `channel` and recover from its own position
    /// (unsubscribe push 2500): what this node delivered of the channel has a hole.
    pub fn insufficient_state(channel: &str) -> Self {
        Self::Unsubscribe {
            channel: channel.to_string(),
            code: unsubscribe::INSUFFICIENT_STATE.0,
            reason: unsubscribe::INSUFFICIENT_STATE.1.to_string(),
        }
    }
}

/// A publication of offset `offset` for unit tests.
#[cfg(test)]
pub(crate) fn test_publication(offset: u64) -> Publication {
    Publication {
        data: herald_protocol::json::raw_from_str("1").expect("valid JSON"),
        info: None,
        offset,
        tags: Default::default(),
        time: 0,
        binary: false,
        delta: false,
    }
}

#[derive(Default)]
struct Outbox {
    frames: VecDeque<Bytes>,
    bytes: usize,
    /// Channels between "joined the hub" and "subscribe reply sent": their publications wait
    /// here so they can be merged with history and follow the reply.
    buffering: Vec<(Arc<str>, Vec<Arc<PubMessage>>)>,
    /// (channel, offset): live publications of the channel at or below the offset were
    /// already sent in a subscribe reply, and are dropped. A cluster engine can show a
    /// publication in history before its live copy reaches this node. [`HELD`]: none are
    /// sent until the channel is subscribed again.
    delivered_through: Vec<(Arc<str>, u64)>,
    /// Channels whose subscription negotiated delta, and the id of the last publication
    /// queued in each (0: none yet).
    deltas: Vec<(Arc<str>, u64)>,
    controls: Vec<Control>,
    /// Boxed: set once, at the end, and 24 bytes smaller inline, which keeps the handle in a
    /// smaller allocation class (idle memory per connection, docs/performance.md).
    closing: Option<Box<Disconnect>>,
    /// When the oldest publication among `frames` reached the hub.
    oldest_publication: Option<Instant>,
}

/// What the connection task takes from the outbox in one go.
#[derive(Default)]
pub struct Drained {
    pub frames: VecDeque<Bytes>,
    pub controls: Vec<Control>,
    pub closing: Option<Disconnect>,
    /// When the oldest publication among `frames` reached the hub; after writing them, pass
    /// it to `Metrics::written`.
    pub oldest_publication: Option<Instant>,
}

/// What a connection's client reads: the full protocol, or bare pushes only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Replies and `{"push":…}` messages (WebSocket, HTTP-streaming and SSE emulation).
    Bidirectional,
    /// Bare pushes, the first being `{"connect":…}`; the client sends nothing after connect.
    Unidirectional,
}

pub struct ConnHandle {
    pub id: Arc<str>,
    pub mode: Mode,
    pub codec: Codec,
    user: parking_lot::RwLock<Arc<str>>,
    state: Mutex<Outbox>,
    /// The connection's task is its only waiter: a flag and a waker, where a `Notify` would
    /// put an 80-byte wait state in every idle connection's task (idle memory per
    /// connection, docs/performance.md).
    pending: AtomicBool,
    waker: AtomicWaker,
    /// Signalled once when the connection starts closing, so a blocked write can give up.
    closed: Notify,
    max_queue_bytes: usize,
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle").field("id", &self.id).finish()
    }
}

impl ConnHandle {
    pub fn new(id: Arc<str>, max_queue_bytes: usize) -> Self {
        Self::with_mode(id, max_queue_bytes, Mode::Bidirectional)
    }

    pub fn with_mode(id: Arc<str>, max_queue_bytes: usize, mode: Mode) -> Self {
        Self {
            id,
            mode,
            codec: Codec::Json,
            user: parking_lot::RwLock::new(Arc::from("")),
            state: Mutex::new(Outbox::default()),
            pending: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            closed: Notify::new(),
            max_queue_bytes,
        }
    }

    /// The same connection, speaking `codec` (set before the handle is shared).
    pub fn with_codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    pub fn user(&self) -> Arc<str> {
        self.user.read().clone()
    }

    pub fn set_user(&self, user: &str) {
        *self.user.write() = Arc::from(user);
    }

    /// Waits until there is something to drain (or a deadline scheduled on the node's
    /// timers came). One task at a time may wait: the connection's own.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + '_ {
        std::future::poll_fn(|cx| {
            if self.pending.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.pending.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Resolves once the connection is closing (slow, kicked, shut down).
    pub async fn closing(&self) {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_closing() {
                return;
            }
            notified.await;
        }
    }

    fn push_locked(&self, st: &mut Outbox, frame: Bytes) -> bool {
        if st.closing.is_some() {
            return false;
        }
        st.bytes += frame.len();
        if st.bytes > self.max_queue_bytes {
            // A slow consumer: drop what it has not read and close it; nobody else waits.
            st.frames.clear();
            st.bytes = 0;
            st.oldest_publication = None;
            st.closing = Some(Box::new(Disconnect::SLOW.into()));
            self.closed.notify_waiters();
            return false;
        }
        st.frames.push_back(frame);
        true
    }

    /// Queues one encoded message (reply or push). False if the connection is closing.
    pub fn send(&self, frame: Bytes) -> bool {
        let ok = {
            let mut st = self.state.lock();
            self.push_locked(&mut st, frame)
        };
        self.wake();
        ok
    }

    /// Delivers a publication of `channel`; held back while that channel is being subscribed.
    pub fn deliver(&self, channel: &str, msg: &Arc<PubMessage>) {
        // Encoded (or the shared encoding taken) before the outbox lock.
        let frame = self.frame_for(msg);
        {
            let mut st = self.state.lock();
            if let Some((_, buf)) = st.buffering.iter_mut().find(|(c, _)| &**c == channel) {
                buf.push(msg.clone());
                return;
            }
            if !st.delivered_through.is_empty()
                && let Some(i) = st
                    .delivered_through
                    .iter()
                    .position(|(c, _)| &**c == channel)
            {
                let offset = msg.publication.offset;
                let through = st.delivered_through[i].1;
                if through == HELD || (offset != 0 && offset <= through) {
                    return;
                }
                if offset != 0 && offset > through.saturating_add(1) {
                    // The live stream is ahead of the reply: publications in between reached
                    // this node before the subscription joined, yet were not in the history
                    // it read (a cluster engine's history can lag its live feed, e.g. while a
                    // broker's stream leader moves). Skipping them would be silent loss: hold
                    // the channel back and have the client resubscribe and recover them.
                    Self::hold_back(&mut st, channel);
                    drop(st);
                    self.wake();
                    return;
                }
                // The live stream has caught up with the reply: no more filtering.
                st.delivered_through.swap_remove(i);
            }
            let mut frame = frame;
            if let Some(d) = st.deltas.iter_mut().find(|(c, _)| &**c == channel) {
                frame = self.json_push_for_codec(msg.delta_frame(self.codec, d.1));
                d.1 = msg.id;
            }
            if self.push_locked(&mut st, frame) {
                st.oldest_publication.get_or_insert(msg.received);
            }
        }
        self.wake();
    }

    /// Delivers a frame that is not part of the stream (join/leave), already in this
    /// connection's codec (see [`ConnHandle::json_push_for`]); dropped while the channel is
    /// being subscribed.
    pub fn deliver_unordered(&self, channel: &str, frame: Bytes) {
        {
            let mut st = self.state.lock();
            if st.buffering.iter().any(|(c, _)| &**c == channel) {
                return;
            }
            self.push_locked(&mut st, frame);
        }
        self.wake();
    }

    /// A publication push encoded once for every subscriber, as this connection's client
    /// reads it.
    pub fn frame_for(&self, msg: &PubMessage) -> Bytes {
        match self.codec {
            Codec::Json => self.json_push_for(&msg.frame),
            Codec::Protobuf => msg.proto_frame(),
        }
    }

    /// The frames of publications queued after a subscribe reply to a subscription with
    /// delta, and the id of the last one: the first whole, the next ones patched.
    pub fn delta_frames(&self, msgs: &[&Arc<PubMessage>], mut last: u64) -> (Vec<Bytes>, u64) {
        let frames = msgs
            .iter()
            .map(|m| {
                let f = self.json_push_for_codec(m.delta_frame(self.codec, last));
                last = m.id;
                f
            })
            .collect();
        (frames, last)
    }

    fn json_push_for_codec(&self, frame: Bytes) -> Bytes {
        match self.codec {
            Codec::Json => self.json_push_for(&frame),
            Codec::Protobuf => frame,
        }
    }

    /// Ends delta for `channel` (unsubscribed).
    pub fn end_delta(&self, channel: &str) {
        self.state.lock().deltas.retain(|(c, _)| &**c != channel);
    }

    /// A JSON `{"push":…}` message shared by every subscriber, as this connection's client
    /// reads it: whole, or the bare push of a unidirectional client.
    pub fn json_push_for(&self, frame: &Bytes) -> Bytes {
        match self.mode {
            Mode::Bidirectional => frame.clone(),
            Mode::Unidirectional => herald_protocol::client::push_body(frame),
        }
    }

    pub fn start_buffering(&self, channel: &str) {
        let mut st = self.state.lock();
        if !st.buffering.iter().any(|(c, _)| &**c == channel) {
            st.buffering.push((Arc::from(channel), Vec::new()));
        }
    }

    /// Ends buffering of a subscription that failed. Until the channel is subscribed again
    /// its publications are dropped: a broadcast already under way can still reach this
    /// connection after it left the hub, and the client must not read a publication of a
    /// subscription it was refused (it would take its offset as its position).
    pub fn cancel_buffering(&self, channel: &str) {
        let mut st = self.state.lock();
        st.buffering.retain(|(c, _)| &**c != channel);
        match st
            .delivered_through
            .iter_mut()
            .find(|(c, _)| &**c == channel)
        {
            Some((_, through)) => *through = HELD,
            None => st.delivered_through.push((Arc::from(channel), HELD)),
        }
    }

    /// Ends buffering of `channels` atomically: `build` receives each channel's held-back
    /// publications (in the order given) and returns the frames to queue — the reply first,
    /// then whatever live publications follow it — and, per channel, the offset through which
    /// the client now has the stream (0: not positioned). Nothing can slip in between, and a
    /// late live copy of an already sent publication is dropped.
    pub fn complete_buffering<F>(&self, channels: &[&str], build: F)
    where
        F: FnOnce(Vec<Vec<Arc<PubMessage>>>) -> (Vec<Bytes>, Vec<Settled>),
    {
        {
            let mut st = self.state.lock();
            let mut held = Vec::with_capacity(channels.len());
            for ch in channels {
                match st.buffering.iter().position(|(c, _)| &**c == *ch) {
                    Some(i) => held.push(st.buffering.swap_remove(i).1),
                    None => held.push(Vec::new()),
                }
            }
            let (frames, settled) = build(held);
            for (ch, s) in channels.iter().zip(settled) {
                st.delivered_through.retain(|(c, _)| &**c != *ch);
                if s.through > 0 {
                    st.delivered_through.push((Arc::from(*ch), s.through));
                }
                st.deltas.retain(|(c, _)| &**c != *ch);
                if let Some(last) = s.delta_last {
                    st.deltas.push((Arc::from(*ch), last));
                }
                if s.resubscribe {
                    Self::hold_back(&mut st, ch);
                }
            }
            for frame in frames {
                if !self.push_locked(&mut st, frame) {
                    break;
                }
            }
        }
        self.wake();
    }

    pub fn control(&self, c: Control) {
        self.state.lock().controls.push(c);
        self.wake();
    }

    /// Tells the client to resubscribe to `channel` and recover (2500), holding back every
    /// publication of it until the client has: a live publication queued before the
    /// unsubscribe push would move the client's position past what it missed.
    pub fn insufficient_state(&self, channel: &str) {
        Self::hold_back(&mut self.state.lock(), channel);
        self.wake();
    }

    /// Holds `channel` back and queues the 2500 control, once until it is subscribed again.
    fn hold_back(st: &mut Outbox, channel: &str) {
        match st
            .delivered_through
            .iter_mut()
            .find(|(c, _)| &**c == channel)
        {
            Some((_, HELD)) => return,
            Some((_, through)) => *through = HELD,
            None => st.delivered_through.push((Arc::from(channel), HELD)),
        }
        st.controls.push(Control::insufficient_state(channel));
    }

    /// Asks the connection to close; the first reason wins.
    pub fn close(&self, d: Disconnect) {
        {
            let mut st = self.state.lock();
            if st.closing.is_none() {
                st.closing = Some(Box::new(d));
                self.closed.notify_waiters();
            }
        }
        self.wake();
    }

    /// Closing because its queue overflowed.
    pub fn is_slow(&self) -> bool {
        self.state
            .lock()
            .closing
            .as_ref()
            .is_some_and(|d| d.code == Disconnect::SLOW.code)
    }

    pub fn is_closing(&self) -> bool {
        self.state.lock().closing.is_some()
    }

    /// Why the connection is closing, once it is.
    pub fn close_reason(&self) -> Option<Disconnect> {
        self.state.lock().closing.as_deref().cloned()
    }

    /// Takes every queued frame and control at once (the writer batches them).
    pub fn drain(&self) -> Drained {
        let mut st = self.state.lock();
        st.bytes = 0;
        Drained {
            frames: std::mem::take(&mut st.frames),
            controls: std::mem::take(&mut st.controls),
            closing: st.closing.as_deref().cloned(),
            oldest_publication: st.oldest_publication.take(),
        }
    }

    /// Takes the queued frames only, leaving controls for when the session is free to take
    /// them (frames keep flowing while the session waits on the engine).
    pub fn drain_frames(&self) -> (VecDeque<Bytes>, Option<Instant>) {
        let mut st = self.state.lock();
        st.bytes = 0;
        (std::mem::take(&mut st.frames), st.oldest_publication.take())
    }

    /// Whether a control waits to be handled.
    pub fn has_controls(&self) -> bool {
        !self.state.lock().controls.is_empty()
    }

    /// Wakes the connection's task (it rechecks its queue).
    pub fn wake(&self) {
        self.pending.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Channels in the middle of being subscribed (joined to the hub, reply not yet queued):
    /// what a connection cut short mid-subscribe still has to leave.
    pub fn buffering_channels(&self) -> Vec<Arc<str>> {
        self.state
            .lock()
            .buffering
            .iter()
            .map(|(c, _)| c.clone())
            .collect()
    }

    pub fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection holds one handle, allocated with its two reference counts: kept
    /// within mimalloc's 320-byte class (it was in the 384-byte one), docs/performance.md.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_handle_fits_its_allocation_class() {
        let with_counts = std::mem::size_of::<ConnHandle>() + 2 * std::mem::size_of::<usize>();
        assert!(
            with_counts <= 320,
            "ConnHandle allocation grew to {with_counts} bytes"
        );
    }

    fn msg(offset: u64) -> Arc<PubMessage> {
        let mut m = PubMessage::new(Arc::from("ch"), test_publication(offset), Instant::now());
        m.frame = Bytes::from(format!("p{offset}"));
        Arc::new(m)
    }

    #[test]
    fn slow_consumer_is_closed_and_dropped() {
        let c = ConnHandle::new(Arc::from("c"), 10);
        assert!(c.send(Bytes::from_static(b"12345")));
        assert!(!c.send(Bytes::from_static(b"123456")));
        let d = c.drain();
        assert!(d.frames.is_empty());
        assert_eq!(d.closing.unwrap().code, 3008);
    }

    #[test]
    fn buffering_holds_publications_until_reply() {
        let c = ConnHandle::new(Arc::from("c"), 1 << 20);
        c.start_buffering("ch");
        c.deliver("ch", &msg(1));
        c.deliver("other", &msg(9));
        c.complete_buffering(&["ch"], |held| {
            let mut v = vec![Bytes::from_static(b"reply")];
            v.extend(held[0].iter().map(|m| m.frame.clone()));
            (
                v,
                vec![Settled {
                    through: 1,
                    ..Default::default()
                }],
            )
        });
        // A late live copy of offset 1, already sent, is dropped; later ones go through.
        c.deliver("ch", &msg(1));
        c.deliver("ch", &msg(2));
        c.deliver("ch", &msg(3));
        let d = c.drain();
        let got: Vec<_> = d
            .frames
            .iter()
            .map(|b| String::from_utf8_lossy(b).to_string())
            .collect();
        assert_eq!(got, ["p9", "reply", "p1", "p2", "p3"]);
    }

    fn settled_through(c: &ConnHandle, through: u64) {
        c.start_buffering("ch");
        c.complete_buffering(&["ch"], |_| {
            (
                vec![Bytes::from_static(b"reply")],
                vec![Settled {
                    through,
                    ..Default::default()
                }],
            )
        });
        c.drain();
    }

    #[test]
    fn live_ahead_of_the_reply_resubscribes_instead_of_skipping() {
        let c = ConnHandle::new(Arc::from("c"), 1 << 20);
        settled_through(&c, 10);
        // 11 never came live: 12 would hide it.
        c.deliver("ch", &msg(12));
        c.deliver("ch", &msg(13));
        let d = c.drain();
        assert!(d.frames.is_empty(), "nothing after the hole is delivered");
        assert!(
            matches!(&d.controls[..], [Control::Unsubscribe { channel, code: 2500, .. }] if channel == "ch"),
            "{:?}",
            d.controls
        );
    }

    #[test]
    fn live_following_the_reply_is_delivered() {
        let c = ConnHandle::new(Arc::from("c"), 1 << 20);
        settled_through(&c, 10);
        c.deliver("ch", &msg(9));
        c.deliver("ch", &msg(11));
        c.deliver("ch", &msg(12));
        let d = c.drain();
        let got: Vec<_> = d.frames.iter().map(|b| b.to_vec()).collect();
        assert_eq!(got, [b"p11".to_vec(), b"p12".to_vec()]);
        assert!(d.controls.is_empty());
    }

    #[test]
    fn told_to_resubscribe_nothing_more_is_delivered_until_subscribed_again() {
        let c = ConnHandle::new(Arc::from("c"), 1 << 20);
        settled_through(&c, 10);
        c.deliver("ch", &msg(11));
        // The engine saw 12 missing: 13, which revealed it, and later ones must not reach the
        // client before the unsubscribe push, or it would recover from past the hole.
        c.insufficient_state("ch");
        c.deliver("ch", &msg(13));
        c.insufficient_state("ch");
        c.deliver("ch", &msg(14));
        let d = c.drain();
        let got: Vec<_> = d.frames.iter().map(|b| b.to_vec()).collect();
        assert_eq!(got, [b"p11".to_vec()]);
        assert!(
            matches!(&d.controls[..], [Control::Unsubscribe { channel, code: 2500, .. }] if channel == "ch"),
            "{:?}",
            d.controls
        );
        settled_through(&c, 14);
        c.deliver("ch", &msg(15));
        let got: Vec<_> = c.drain().frames.iter().map(|b| b.to_vec()).collect();
        assert_eq!(got, [b"p15".to_vec()]);
    }

    #[test]
    fn a_failed_subscribe_gets_no_publication() {
        let c = ConnHandle::new(Arc::from("c"), 1 << 20);
        c.start_buffering("ch");
        c.deliver("ch", &msg(1));
        c.cancel_buffering("ch");
        // A broadcast that listed this connection before it left the hub.
        c.deliver("ch", &msg(2));
        let d = c.drain();
        assert!(d.frames.is_empty() && d.controls.is_empty());
        settled_through(&c, 2);
        c.deliver("ch", &msg(3));
        let got: Vec<_> = c.drain().frames.iter().map(|b| b.to_vec()).collect();
        assert_eq!(got, [b"p3".to_vec()]);
    }
}
