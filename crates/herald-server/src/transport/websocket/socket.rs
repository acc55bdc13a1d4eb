//! A server WebSocket over an upgraded connection: Herald's framing ([`super::codec`]) on
//! the socket, holding no buffer while idle.
//!
//! Reads go through one scratch buffer per thread and are decoded in place, so between
//! messages a connection keeps only the bytes of a frame a read cut in two. Frames are
//! written straight from the message; pongs and the close reply wait in a small queue that
//! is written before anything else and freed once written. A general-purpose WebSocket keeps
//! read and write buffers (and its own state) of some KiB per connection for its life
//! (docs/performance.md, "Idle memory per connection").
//!
//! Reading is cancel-safe: all state lives in the socket, none in the future.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::codec::{
    Decoder, Deflate, Incoming, Kind, OpCode, WsError, close_payload, compress, frame_head,
};

/// One read takes at most this much; the buffer is the thread's, not the connection's.
const SCRATCH: usize = 64 << 10;

/// Messages smaller than this go out uncompressed: pings, replies and small pushes rarely
/// shrink, and a connection that only sends them never compresses.
pub const COMPRESSION_THRESHOLD: usize = 128;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// What a read gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// A whole data message.
    Message(Kind, Bytes),
    /// The client sent its close frame (the reply is queued) or closed the socket.
    Closed,
    /// The client's bytes were refused; [`WsSocket::finish`] tells it why.
    Refused(WsError),
}

/// A server WebSocket on `S`.
pub struct WsSocket<S> {
    io: S,
    /// Also holds the permessage-deflate terms, which the writing side compresses by.
    decoder: Decoder,
    /// Events a read decoded and the caller has not taken yet; unallocated when empty.
    inbox: VecDeque<Incoming>,
    /// Control frames (pongs, the close) not yet written; unallocated when empty.
    out: Vec<u8>,
    /// How much of `out` is written.
    out_at: usize,
    /// Why reading stopped, once it has.
    ended: Option<End>,
    /// Bytes a read refused, reported once the events before them are taken.
    refused: Option<WsError>,
    /// Our close frame is queued or sent: nothing but it goes out any more.
    close_sent: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The client's close frame, or the end of its stream.
    Closed,
    /// Refused bytes: after the close frame, read on to the client's close.
    Refused,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> WsSocket<S> {
    /// `max_message`: the largest message taken (larger closes with 1009); `deflate`: the
    /// permessage-deflate terms of the handshake, when agreed.
    pub fn new(io: S, max_message: usize, deflate: Option<Deflate>) -> Self {
        Self {
            io,
            decoder: Decoder::new(max_message, deflate),
            inbox: VecDeque::new(),
            out: Vec::new(),
            out_at: 0,
            ended: None,
            refused: None,
            close_sent: false,
        }
    }

    /// The next data message; pings are answered and a client's close frame is answered on
    /// the way. Cancel-safe.
    pub async fn recv(&mut self) -> Read {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Read> {
        loop {
            // Control frames first: a client that does not read our pongs is not read from.
            if let Err(e) = ready!(self.poll_out(cx)) {
                tracing::debug!(error = %e, "websocket write failed");
                self.ended = Some(End::Closed);
                return Poll::Ready(Read::Closed);
            }
            if let Some(event) = self.inbox.pop_front() {
                if self.inbox.is_empty() && self.inbox.capacity() > 0 {
                    self.inbox = VecDeque::new();
                }
                match event {
                    Incoming::Message(kind, data) => return Poll::Ready(Read::Message(kind, data)),
                    Incoming::Ping(payload) => {
                        if !self.close_sent {
                            self.queue(OpCode::Pong, &payload);
                        }
                    }
                    Incoming::Pong => {}
                    Incoming::Close(code, _) => {
                        self.inbox = VecDeque::new();
                        if !self.close_sent {
                            // The status code is echoed (RFC 6455 5.5.1); none for none.
                            let payload = code.map(|c| close_payload(c, "")).unwrap_or_default();
                            self.queue(OpCode::Close, &payload);
                            self.close_sent = true;
                        }
                        self.ended = Some(End::Closed);
                        return Poll::Ready(Read::Closed);
                    }
                }
                continue;
            }
            if let Some(e) = self.refused.take() {
                self.ended = Some(End::Refused);
                return Poll::Ready(Read::Refused(e));
            }
            if self.ended.is_some() {
                return Poll::Ready(Read::Closed);
            }
            let inbox = &mut self.inbox;
            let decoder = &mut self.decoder;
            let io = &mut self.io;
            let read = SCRATCH_BUF.with(|buf| {
                let mut buf = buf.borrow_mut();
                let mut rb = ReadBuf::new(&mut buf[..]);
                match Pin::new(io).poll_read(cx, &mut rb) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(Some(e))),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            return Poll::Ready(Err(None));
                        }
                        Poll::Ready(Ok(decoder.feed(&mut buf[..n], &mut |e| inbox.push_back(e))))
                    }
                }
            });
            match ready!(read) {
                Ok(Ok(())) => {}
                // What came before the refused bytes is still the client's: taken first.
                Ok(Err(e)) => self.refused = Some(e),
                Err(e) => {
                    if let Some(e) = e {
                        tracing::debug!(error = %e, "websocket read failed");
                    }
                    self.ended = Some(End::Closed);
                }
            }
        }
    }

    /// Queues a control frame to be written before anything else.
    fn queue(&mut self, op: OpCode, payload: &[u8]) {
        let (head, n) = frame_head(op, false, payload.len());
        self.out.extend_from_slice(&head[..n]);
        self.out.extend_from_slice(payload);
    }

    /// Writes the queued control frames; frees the queue once written.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        if self.out.capacity() > 0 {
            self.out = Vec::new();
            self.out_at = 0;
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes data messages, one frame each (compressed when agreed and worth it).
    pub async fn send(
        &mut self,
        messages: impl IntoIterator<Item = (Kind, Bytes)>,
    ) -> io::Result<()> {
        poll_fn(|cx| self.poll_out(cx)).await?;
        if self.close_sent {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        // Frames are gathered into one write; a large payload is written from its own bytes.
        let mut frames: Vec<u8> = Vec::new();
        for (kind, payload) in messages {
            let op = match kind {
                Kind::Text => OpCode::Text,
                Kind::Binary => OpCode::Binary,
            };
            let (payload, compressed) = match self.decoder.deflate() {
                Some(terms) if payload.len() >= COMPRESSION_THRESHOLD => {
                    (Bytes::from(compress(&payload, terms)), true)
                }
                _ => (payload, false),
            };
            let (head, n) = frame_head(op, compressed, payload.len());
            if payload.len() > SCRATCH {
                frames.extend_from_slice(&head[..n]);
                self.io.write_all(&frames).await?;
                frames = Vec::new();
                self.io.write_all(&payload).await?;
            } else {
                frames.reserve(n + payload.len());
                frames.extend_from_slice(&head[..n]);
                frames.extend_from_slice(&payload);
            }
        }
        if !frames.is_empty() {
            self.io.write_all(&frames).await?;
        }
        self.io.flush().await
    }

    /// Starts the close handshake: the close frame with `code` and `reason`, then what the
    /// client still sends is read up to its close frame and the socket is shut. The caller
    /// bounds the wait.
    pub async fn close(&mut self, code: u16, reason: &str) {
        if !self.close_sent {
            self.queue(OpCode::Close, &close_payload(code, reason));
            self.close_sent = true;
        }
        self.drain().await;
    }

    /// Ends the socket after a read gave [`Read::Closed`] or [`Read::Refused`]: the close
    /// reply, or the close frame of the refusal (1002, 1007 or 1009), is written; after a
    /// refusal what the client still sends is read up to its close frame, so the socket ends
    /// without a reset. The caller bounds the wait.
    pub async fn finish(&mut self, refused: Option<&WsError>) {
        match refused {
            Some(e) => self.close(e.close_code(), &e.to_string()).await,
            None => self.drain().await,
        }
    }

    /// Writes what is queued, reads up to the client's close frame (or the end of its
    /// stream), and shuts the socket.
    async fn drain(&mut self) {
        if poll_fn(|cx| self.poll_out(cx)).await.is_err() {
            return;
        }
        // A close frame that shared the refused read was already passed over: the client
        // waits for us to end the socket, not for more reading.
        if self.ended != Some(End::Closed) && !self.decoder.close_seen() {
            // The decoder skips a refused frame and reads on only for the close.
            self.decoder.drain_mode();
            self.ended = None;
            while let Read::Message(..) = self.recv().await {}
        }
        let _ = poll_fn(|cx| self.poll_out(cx)).await;
        let _ = self.io.shutdown().await;
    }
}
