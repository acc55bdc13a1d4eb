//! The one connection loop. Every transport — bidirectional and unidirectional WebSocket,
//! HTTP streaming, SSE, the conformance echo — is a [`Wire`] (receive a message, send a batch,
//! say goodbye) driven by [`drive`] together with a [`Handler`] (the session, or the echo).
//!
//! The loop serves, without priority, the connection's outbox (pre-encoded frames from the
//! hub and the session), the client's messages, the session's timers and the request the
//! session waits on (a subscribe on Redis, a key fetch, a proxy call), so neither a
//! publication flood nor a slow engine starves reads, pongs or deadlines. Whatever way the
//! connection ends — the client leaves, the session disconnects it, the task panics or is
//! cancelled — the session is closed exactly once, leaving hub, presence and metrics as if the
//! client had disconnected.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crate::http::Peer;
use bytes::Bytes;
use herald_core::Node;
use herald_core::clock::Now;
use herald_core::conn::{ConnHandle, Control};
use herald_core::metrics::{ConnectionGuard, TransportMetrics};
use herald_core::session::{Completion, Request, Session};
use herald_protocol::Disconnect;

/// How long the goodbye (messages still queued, the disconnect push, the close handshake) may
/// take on a client that does not read.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest a session's request (a command's engine round trips, a token key fetch, a proxy
/// call) or a handler's step may take; past it the client is disconnected with 3004 rather
/// than left hanging.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// What a wire read from its client.
pub enum Received {
    /// One message (a WebSocket message; never for the HTTP streams, whose commands come as
    /// controls through `/emulation`).
    Message(Bytes),
    /// The client is gone or closed the connection.
    Gone,
}

/// A transport's socket and framing: all that differs between transports.
pub trait Wire: Send {
    /// Whether a send abandoned half way leaves the wire usable for a goodbye (an HTTP
    /// stream's body channel does; a WebSocket frame cut in the middle does not).
    const ABANDON_SAFE: bool;

    /// The next message from the client. Must be cancel-safe: the loop races it.
    fn recv(&mut self) -> impl Future<Output = Received> + Send;

    /// Writes queued messages, framed the wire's way; returns the bytes written.
    fn send(&mut self, batch: VecDeque<Bytes>) -> impl Future<Output = Result<usize, ()>> + Send;

    /// Server-initiated end: the messages still queued, the disconnect push and the close
    /// (a WebSocket close frame with the code, the end of an HTTP stream).
    fn goodbye(
        &mut self,
        pending: VecDeque<Bytes>,
        push: Bytes,
        d: &Disconnect,
    ) -> impl Future<Output = ()> + Send;

    /// Client-initiated end: finishes the close handshake after [`Received::Gone`].
    fn farewell(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Sees each control before the handler does.
    fn on_control(&mut self, _c: &Control) {}
}

/// What runs a connection's protocol: the session, or the conformance echo.
pub trait Handler: Send + 'static {
    fn on_message(
        &mut self,
        data: Bytes,
        now: Now,
    ) -> impl Future<Output = Result<(), Disconnect>> + Send;
    fn on_control(
        &mut self,
        c: Control,
        now: Now,
    ) -> impl Future<Output = Result<(), Disconnect>> + Send;
    /// Timer work; returns when to call again.
    fn tick(&mut self, now: Now) -> impl Future<Output = Result<Instant, Disconnect>> + Send;
    fn next_wakeup(&self, now: Now) -> Instant;
    /// The push that tells the client why it is disconnected.
    fn goodbye(&self, d: &Disconnect) -> Bytes;
    /// Leaves everything the connection holds; called exactly once.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
    /// Work the handler waits on, run by the loop beside everything else.
    fn take_request(&mut self) -> Option<Request> {
        None
    }
    /// The result of the request last taken.
    fn complete(&mut self, _c: Completion, _now: Now) -> Result<(), Disconnect> {
        Ok(())
    }
    /// Whether to read the client now (false: work is piling up behind a request).
    fn wants_input(&self) -> bool {
        true
    }
}

/// The session's inputs are synchronous: its steps are ready at once, and what it waits on
/// comes out as requests.
impl Handler for Session {
    async fn on_message(&mut self, data: Bytes, now: Now) -> Result<(), Disconnect> {
        self.handle_frame(&data, now)
    }
    async fn on_control(&mut self, c: Control, now: Now) -> Result<(), Disconnect> {
        self.handle_control(c, now)
    }
    async fn tick(&mut self, now: Now) -> Result<Instant, Disconnect> {
        Session::tick(self, now)
    }
    fn next_wakeup(&self, now: Now) -> Instant {
        Session::next_wakeup(self, now)
    }
    fn goodbye(&self, d: &Disconnect) -> Bytes {
        Session::goodbye(self, d)
    }
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        Session::close(self)
    }
    fn take_request(&mut self) -> Option<Request> {
        Session::take_request(self)
    }
    fn complete(&mut self, c: Completion, now: Now) -> Result<(), Disconnect> {
        Session::complete(self, c, now)
    }
    fn wants_input(&self) -> bool {
        Session::wants_input(self)
    }
}

/// How the loop ended.
enum Ending {
    /// The server ends the connection and tells the client why.
    Disconnect(Disconnect),
    /// The client left (or closed); the wire finishes the handshake.
    ClientGone,
    /// The wire can no longer be written (a write failed or was cut mid-frame).
    Broken,
}

/// Closes the handler however the task ends: normally through [`Guard::close`]; if the task
/// panics or is dropped mid-way, from `Drop`, on a task of its own.
struct Guard<H: Handler> {
    handler: Option<Box<H>>,
    conn: Arc<ConnHandle>,
}

impl<H: Handler> Guard<H> {
    fn get(&mut self) -> &mut H {
        self.parts().0
    }

    /// The handler and the handle, borrowed together.
    fn parts(&mut self) -> (&mut H, &Arc<ConnHandle>) {
        // Only `close` and `Drop` take the handler, and both end the guard's use.
        let h = self
            .handler
            .as_deref_mut()
            .expect("handler present until close");
        (h, &self.conn)
    }

    async fn close(&mut self) {
        if let Some(mut h) = self.handler.take() {
            h.close().await;
        }
    }
}

impl<H: Handler> Drop for Guard<H> {
    fn drop(&mut self) {
        let Some(mut h) = self.handler.take() else {
            return;
        };
        let d = if std::thread::panicking() {
            tracing::error!(client = %self.conn.id, "connection task panicked; cleaning up");
            Disconnect::SERVER_ERROR.into()
        } else {
            Disconnect::new(3000, "closed")
        };
        self.conn.close(d);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { h.close().await });
        }
    }
}

/// The pieces of a connection that frames flow through.
struct Io<'a, W> {
    conn: &'a Arc<ConnHandle>,
    wire: &'a mut W,
    transport: &'a TransportMetrics,
    node: &'a Node,
}

/// One connection's parts, in one box made before the connection's future exists: a future
/// keeps its arguments both as they were passed and where its body moved them, so passed by
/// value they would be held twice for the life of the connection (docs/performance.md,
/// "Idle memory per connection" and "One timer per node").
struct Connection<W, H: Handler> {
    guard: Guard<H>,
    wire: W,
    /// Boxed: only the HTTP streams and a `cf_connect` parameter bring one.
    first: Option<Box<Bytes>>,
    /// Counts the connection, and holds its transport's metrics.
    counted: ConnectionGuard,
    node: Arc<Node>,
    peer: Peer,
}

/// Runs one connection to its end. `first` is a message the transport already received
/// (the connect request of an HTTP stream, a `cf_connect` parameter).
pub fn drive<W: Wire, H: Handler>(
    conn: Arc<ConnHandle>,
    handler: H,
    wire: W,
    first: Option<Bytes>,
    transport: Arc<TransportMetrics>,
    node: Arc<Node>,
    peer: Peer,
) -> impl Future<Output = ()> + Send {
    drive_boxed(Box::new(Connection {
        guard: Guard {
            handler: Some(Box::new(handler)),
            conn,
        },
        wire,
        first: first.map(Box::new),
        counted: transport.open(),
        node,
        peer,
    }))
}

async fn drive_boxed<W: Wire, H: Handler>(mut c: Box<Connection<W, H>>) {
    let mut leftover = VecDeque::new();
    let ending = {
        let c = &mut *c;
        let (h, conn) = c.guard.parts();
        let mut io = Io {
            conn,
            wire: &mut c.wire,
            transport: c.counted.transport(),
            node: &c.node,
        };
        let first = match c.first.take() {
            Some(data) => Box::pin(step(&mut io, h.on_message(*data, Now::system())))
                .await
                .err(),
            None => None,
        };
        match first {
            Some(ending) => ending,
            None => Box::pin(run(h, &mut io, &mut leftover)).await,
        }
    };
    Box::pin(finish(c, ending, leftover)).await;
}

/// Ends the connection the way the loop ended: the session lets go, then the wire says
/// goodbye (bounded).
async fn finish<W: Wire, H: Handler>(
    mut c: Box<Connection<W, H>>,
    ending: Ending,
    leftover: VecDeque<Bytes>,
) {
    let conn = c.guard.conn.clone();
    let transport = c.counted.transport();
    match ending {
        Ending::Disconnect(d) => {
            if d.is_protocol_error() {
                tracing::debug!(
                    client = %conn.id,
                    addr = %c.peer,
                    transport = transport.name,
                    code = d.code,
                    reason = %d.reason,
                    "closing a connection for a protocol error"
                );
                transport.protocol_error(d.code);
            }
            // Recorded as the reason (metrics and logs read it when the session closes).
            conn.close(d.clone());
            let mut pending = leftover;
            if d.code == Disconnect::SLOW.code {
                // A slow consumer's queue was dropped; it only gets the reason.
                pending.clear();
            } else {
                pending.extend(conn.drain_frames().0);
            }
            let push = c.guard.get().goodbye(&d);
            // The session lets go first: a client that sees the close can count on it.
            conn.close(Disconnect::new(3000, "closed"));
            c.guard.close().await;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, c.wire.goodbye(pending, push, &d)).await;
        }
        Ending::ClientGone => {
            conn.close(Disconnect::new(3000, "closed"));
            c.guard.close().await;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, c.wire.farewell()).await;
        }
        Ending::Broken => {
            conn.close(Disconnect::new(3000, "closed"));
            c.guard.close().await;
        }
    }
}

/// Everything the loop awaits besides its wait is boxed: an idle connection's task then
/// holds only the small waiting state, and the large futures exist while they run (idle
/// RSS per connection). Deadlines are kept by the node's timers, which wake the task
/// through the outbox's signal; the loop itself checks whether one came.
async fn run<W: Wire, H: Handler>(
    h: &mut H,
    io: &mut Io<'_, W>,
    leftover: &mut VecDeque<Bytes>,
) -> Ending {
    let mut deadline = h.next_wakeup(Now::system());
    // The request in flight, boxed by the session; an idle connection holds none.
    let mut in_flight: Option<InFlight> = None;
    let mut request_deadline: Option<Instant> = None;
    // The deadline last given to the node's timers, while it has not come.
    let mut scheduled: Option<Instant> = None;
    loop {
        if in_flight.is_none()
            && let Some(r) = h.take_request()
        {
            in_flight = Some(r.into_future());
            request_deadline = Some(Instant::now() + STEP_TIMEOUT);
        }
        let due = {
            let wake = request_deadline.map_or(deadline, |r| r.min(deadline));
            let now = Instant::now();
            if request_deadline.is_some_and(|at| now >= at) {
                tracing::warn!(client = %io.conn.id, "session request timed out");
                return Ending::Disconnect(Disconnect::SERVER_ERROR.into());
            }
            // A deadline already scheduled and not yet come still wakes the task in time; a
            // later one is scheduled when that wakeup comes.
            if now < wake && scheduled.is_none_or(|at| at <= now || wake < at) {
                io.node.timers.schedule(io.conn, wake);
                scheduled = Some(wake);
            }
            now >= wake
        };
        if due {
            match Box::pin(step(io, h.tick(Now::system()))).await {
                Ok(next) => deadline = next,
                Err(e) => return e,
            }
            continue;
        }
        let turn = tokio::select! {
            () = io.conn.wait() => Box::pin(flush(io, h, &mut deadline, leftover)).await,
            received = io.wire.recv(), if h.wants_input() => match received {
                Received::Message(data) => Box::pin(message(io, h, data, &mut deadline)).await,
                Received::Gone => Err(Ending::ClientGone),
            },
            done = completion(&mut in_flight) => {
                (in_flight, request_deadline) = (None, None);
                h.complete(done, Now::system()).map_err(Ending::Disconnect).map(|()| {
                    deadline = h.next_wakeup(Now::system());
                })
            }
        };
        if let Err(e) = turn {
            return e;
        }
    }
}

/// The outbox's turn: writes what is queued and hands the controls to the handler.
async fn flush<W: Wire, H: Handler>(
    io: &mut Io<'_, W>,
    h: &mut H,
    deadline: &mut Instant,
    leftover: &mut VecDeque<Bytes>,
) -> Result<(), Ending> {
    let drained = io.conn.drain();
    if let Some(d) = drained.closing {
        *leftover = drained.frames;
        return Err(Ending::Disconnect(d));
    }
    write(io, drained.frames, drained.oldest_publication).await?;
    // Only a control can move the session's deadline; written frames cannot, so the plain
    // write path (every delivery) does not recompute it.
    if !drained.controls.is_empty() {
        for c in drained.controls {
            io.wire.on_control(&c);
            step(io, h.on_control(c, Now::system())).await?;
        }
        *deadline = h.next_wakeup(Now::system());
    }
    Ok(())
}

/// A message from the client, handled to its end.
async fn message<W: Wire, H: Handler>(
    io: &mut Io<'_, W>,
    h: &mut H,
    data: Bytes,
    deadline: &mut Instant,
) -> Result<(), Ending> {
    io.transport.bytes_received.increment(data.len() as u64);
    step(io, h.on_message(data, Now::system())).await?;
    *deadline = h.next_wakeup(Now::system());
    Ok(())
}

type InFlight = Pin<Box<dyn Future<Output = Completion> + Send>>;

/// The completion of the request in flight; never, when there is none.
async fn completion(in_flight: &mut Option<InFlight>) -> Completion {
    match in_flight {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Runs one step of the handler to completion while the outbox keeps draining to the
/// client. Controls wait for the step to finish; a connection closed meanwhile (kicked,
/// slow, shutting down) abandons the step — `Session::close` cleans up a half-done one.
async fn step<W: Wire, T>(
    io: &mut Io<'_, W>,
    fut: impl Future<Output = Result<T, Disconnect>>,
) -> Result<T, Ending> {
    let mut fut = std::pin::pin!(fut);
    // The session's steps are synchronous, ready at the first poll: no timer, no race.
    let outcome = match std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await {
        Poll::Ready(r) => Ok(r),
        Poll::Pending => race(io, fut).await?,
    };
    // Controls or a close that arrived during the step are picked up by the loop.
    io.conn.wake();
    match outcome {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(d)) => Err(Ending::Disconnect(d)),
        Err(_) => {
            tracing::warn!(client = %io.conn.id, "session step timed out");
            Err(Ending::Disconnect(Disconnect::SERVER_ERROR.into()))
        }
    }
}

/// A step that waits: bounded, abandoned when the connection closes, and the outbox keeps
/// draining meanwhile.
async fn race<W: Wire, R>(
    io: &mut Io<'_, W>,
    fut: Pin<&mut impl Future<Output = R>>,
) -> Result<Result<R, tokio::time::error::Elapsed>, Ending> {
    let fut = tokio::time::timeout(STEP_TIMEOUT, fut);
    tokio::pin!(fut);
    Ok(loop {
        tokio::select! {
            r = &mut fut => break r,
            _ = io.conn.closing() => {
                let d = io.conn.close_reason().unwrap_or_else(|| Disconnect::SHUTDOWN.into());
                return Err(Ending::Disconnect(d));
            }
            _ = io.conn.wait() => {
                let (frames, oldest) = io.conn.drain_frames();
                let w = write(io, frames, oldest);
                tokio::pin!(w);
                let mut done = None;
                // The write is never cut short by the step finishing (that would break the
                // frame); the step is still polled while the write waits on the socket.
                let written = loop {
                    tokio::select! {
                        r = &mut w => break r,
                        r = &mut fut, if done.is_none() => done = Some(r),
                    }
                };
                written?;
                if let Some(r) = done {
                    break r;
                }
            }
        }
    })
}

/// Writes frames; a write blocked on a client that stopped reading gives up as soon as the
/// connection is declared slow (or closed for another reason).
async fn write<W: Wire>(
    io: &mut Io<'_, W>,
    frames: VecDeque<Bytes>,
    oldest: Option<Instant>,
) -> Result<(), Ending> {
    if frames.is_empty() {
        return Ok(());
    }
    let conn = io.conn;
    let send = io.wire.send(frames);
    tokio::pin!(send);
    let written = tokio::select! {
        r = &mut send => r.ok(),
        _ = conn.closing() => {
            if conn.is_slow() {
                return Err(if W::ABANDON_SAFE {
                    // Still try to tell the client why.
                    Ending::Disconnect(Disconnect::SLOW.into())
                } else {
                    // Mid-frame on a client that does not read: no clean close is possible.
                    Ending::Broken
                });
            }
            tokio::time::timeout(CLOSE_TIMEOUT, send).await.ok().and_then(Result::ok)
        }
    };
    let Some(n) = written else {
        return Err(Ending::Broken);
    };
    io.transport.bytes_sent.increment(n as u64);
    if let Some(t) = oldest {
        io.node.metrics.written(t);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use herald_core::Node;
    use herald_core::conn::Mode;
    use herald_core::engine::memory::MemoryEngine;
    use herald_core::node::NodeConfig;
    use herald_core::options::{ClientOptions, NamespaceOptions};
    use tokio::sync::mpsc;

    use super::*;

    /// A wire made of two channels: what the test sends, what the driver wrote.
    struct TestWire {
        rx: mpsc::UnboundedReceiver<Bytes>,
        out: mpsc::UnboundedSender<Bytes>,
    }

    impl Wire for TestWire {
        const ABANDON_SAFE: bool = true;
        async fn recv(&mut self) -> Received {
            match self.rx.recv().await {
                Some(m) => Received::Message(m),
                None => Received::Gone,
            }
        }
        async fn send(&mut self, batch: VecDeque<Bytes>) -> Result<usize, ()> {
            let mut n = 0;
            for m in batch {
                n += m.len();
                self.out.send(m).map_err(|_| ())?;
            }
            Ok(n)
        }
        async fn goodbye(&mut self, _pending: VecDeque<Bytes>, push: Bytes, _d: &Disconnect) {
            let _ = self.out.send(push);
        }
    }

    /// The session, except that the message `panic` panics inside the connection task.
    struct Panicky(Session);

    impl Handler for Panicky {
        async fn on_message(&mut self, data: Bytes, now: Now) -> Result<(), Disconnect> {
            assert!(&data[..] != b"panic", "injected panic");
            self.0.handle_frame(&data, now)
        }
        async fn on_control(&mut self, c: Control, now: Now) -> Result<(), Disconnect> {
            self.0.handle_control(c, now)
        }
        async fn tick(&mut self, now: Now) -> Result<Instant, Disconnect> {
            self.0.tick(now)
        }
        fn next_wakeup(&self, now: Now) -> Instant {
            self.0.next_wakeup(now)
        }
        fn goodbye(&self, d: &Disconnect) -> Bytes {
            self.0.goodbye(d)
        }
        fn close(&mut self) -> impl Future<Output = ()> + Send {
            self.0.close()
        }
        fn take_request(&mut self) -> Option<Request> {
            self.0.take_request()
        }
        fn complete(&mut self, c: Completion, now: Now) -> Result<(), Disconnect> {
            self.0.complete(c, now)
        }
    }

    fn node() -> Arc<Node> {
        Node::new(
            NodeConfig {
                name: "test".into(),
                client: ClientOptions {
                    token_hmac_secret: "s".into(),
                    allow_anonymous: true,
                    ..Default::default()
                },
                namespaces: vec![NamespaceOptions {
                    allow_subscribe_for_anonymous: true,
                    presence: true,
                    ..Default::default()
                }],
                ..Default::default()
            },
            |hub| Arc::new(MemoryEngine::new(hub)),
        )
    }

    async fn next(out: &mut mpsc::UnboundedReceiver<Bytes>) -> String {
        let m = tokio::time::timeout(Duration::from_secs(5), out.recv())
            .await
            .expect("a message within 5 s")
            .expect("the wire is open");
        String::from_utf8_lossy(&m).into_owned()
    }

    /// Waits (bounded) until the node holds no client, subscription or presence of `room`.
    async fn released(node: &Node, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let st = node.hub.stats();
            let gone = node.presence("room").await.is_ok_and(|p| p.is_empty());
            if st.clients == 0 && st.subscriptions == 0 && gone {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::task::yield_now().await;
        }
    }

    /// The loop's waiting state is what an idle connection's task holds. With the timers on
    /// the node and every turn boxed it is 256 bytes with the WebSocket wire (608, in
    /// mimalloc's 640-byte class, with a `Sleep` and a `Notified` of its own and the turns
    /// inline); docs/performance.md, "One timer per node".
    #[cfg(target_pointer_width = "64")]
    #[tokio::test]
    async fn the_waiting_loop_fits_its_allocation_class() {
        let node = node();
        let conn = Arc::new(ConnHandle::new(Arc::from("c-size"), 1 << 20));
        let mut session = Session::new(node.clone(), conn.clone(), Instant::now());
        let (_tx, rx) = mpsc::unbounded_channel();
        let (out, _written) = mpsc::unbounded_channel();
        let mut wire = TestWire { rx, out };
        let transport = node.metrics.transport("test");
        let mut io = Io {
            conn: &conn,
            wire: &mut wire,
            transport: &transport,
            node: &node,
        };
        let mut leftover = VecDeque::new();
        let size = std::mem::size_of_val(&run(&mut session, &mut io, &mut leftover));
        assert!(
            size <= 256,
            "the connection loop's state grew to {size} bytes"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_connection_is_cleaned_up_like_a_disconnect() {
        let node = node();
        let conn = Arc::new(ConnHandle::with_mode(
            Arc::from("c-panic"),
            1 << 20,
            Mode::Bidirectional,
        ));
        let session = Session::new(node.clone(), conn.clone(), Instant::now());
        let (tx, rx) = mpsc::unbounded_channel();
        let (out_tx, mut out) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(
            conn,
            Panicky(session),
            TestWire { rx, out: out_tx },
            None,
            node.metrics.transport("test"),
            node.clone(),
            Peer::default(),
        ));
        tx.send(Bytes::from_static(br#"{"id":1,"connect":{}}"#))
            .unwrap();
        assert!(next(&mut out).await.contains("\"connect\""));
        tx.send(Bytes::from_static(
            br#"{"id":2,"subscribe":{"channel":"room"}}"#,
        ))
        .unwrap();
        assert!(next(&mut out).await.contains("\"id\":2"));
        assert_eq!(node.hub.stats().subscriptions, 1);
        assert_eq!(node.presence("room").await.unwrap().len(), 1);

        tx.send(Bytes::from_static(b"panic")).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task ends");
        assert!(ended.is_err_and(|e| e.is_panic()));
        released(&node, "hub and presence let go after the panic").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_connection_is_cleaned_up_too() {
        let node = node();
        let conn = Arc::new(ConnHandle::new(Arc::from("c-cancel"), 1 << 20));
        let session = Session::new(node.clone(), conn.clone(), Instant::now());
        let (tx, rx) = mpsc::unbounded_channel();
        let (out_tx, mut out) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(
            conn,
            session,
            TestWire { rx, out: out_tx },
            None,
            node.metrics.transport("test"),
            node.clone(),
            Peer::default(),
        ));
        tx.send(Bytes::from_static(
            b"{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"room\"}}",
        ))
        .unwrap();
        assert!(next(&mut out).await.contains("\"connect\""));
        assert!(next(&mut out).await.contains("\"id\":2"));
        task.abort();
        released(&node, "hub and presence let go after the abort").await;
    }
}
