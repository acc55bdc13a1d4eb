//! The generator's WebSocket client (RFC 6455, client side), shared by every target and the
//! NATS / MQTT publisher. permessage-deflate (RFC 7692) is offered on request, with the
//! server resetting its compressor per message, so inflating needs no per-connection state.
//!
//! Written for the idle cost of a connection: a connection holds its socket and nothing
//! else between messages. Reads go through one scratch buffer per thread, a frame the read
//! cut in two keeps only its own bytes until the rest arrives, and frames are written
//! straight from the message. A general-purpose client keeps a read buffer of some KiB per
//! connection for its life, which at a million connections is the generator's whole
//! memory budget (docs/performance.md, "The generator's memory").

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::client::{MAX_MESSAGE, feed};
use crate::error::BenchError;
use crate::net::{Endpoint, connect_tcp, loopback_endpoint};

/// Per-thread read buffer: one read takes at most this much.
const SCRATCH: usize = 64 << 10;
/// Largest handshake response accepted.
const MAX_RESPONSE_HEAD: usize = 16 << 10;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
    /// Masking keys (RFC 6455 5.3): the servers here are on loopback and ours, so a
    /// fast per-thread generator is enough.
    static MASK_STATE: std::cell::Cell<u64> = std::cell::Cell::new(seed());
    /// Inflates compressed messages; reset per message (the server keeps no context).
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// The permessage-deflate offer: the server must reset its compressor per message.
const DEFLATE_OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; \
                             server_no_context_takeover; client_no_context_takeover\r\n";

/// Inflates one message's payload (RFC 7692: the flush tail the sender removed is put
/// back), into at most MAX_MESSAGE bytes.
fn inflate(payload: &[u8]) -> Result<Vec<u8>, BenchError> {
    INFLATER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let z = cell.get_or_insert_with(|| Decompress::new(false));
        z.reset(false);
        let mut out = Vec::with_capacity((payload.len() * 4).min(MAX_MESSAGE) + 64);
        for input in [payload, &[0x00, 0x00, 0xff, 0xff][..]] {
            let mut rest = input;
            while !rest.is_empty() {
                if out.len() == out.capacity() {
                    if out.len() >= MAX_MESSAGE {
                        return Err(protocol("compressed message too large"));
                    }
                    out.reserve(out.len().max(1024));
                }
                let before = z.total_in();
                let status = z
                    .decompress_vec(rest, &mut out, FlushDecompress::Sync)
                    .map_err(|_| protocol("bad deflate data"))?;
                let used = (z.total_in() - before) as usize;
                rest = &rest[used..];
                if status == Status::StreamEnd {
                    break;
                }
            }
        }
        Ok(out)
    })
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)) | 1
}

fn mask_key() -> [u8; 4] {
    MASK_STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x as u32).to_le_bytes()
    })
}

/// What kind of data message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
}

/// A whole data message (its fragments joined).
#[derive(Debug, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub data: Vec<u8>,
}

impl Message {
    /// The message as text; a text message that is not UTF-8 is a protocol error.
    pub fn text(&self) -> Result<&str, BenchError> {
        std::str::from_utf8(&self.data)
            .map_err(|_| BenchError::Protocol("text message is not UTF-8".into()))
    }
}

/// Control frames seen while parsing, acted on by the caller.
#[derive(Default)]
struct Control {
    /// The last ping's payload, to be answered with a pong.
    pong: Option<Vec<u8>>,
    /// The server closed: its code and reason.
    close: Option<String>,
}

/// The reading half's state: what a read left unfinished.
#[derive(Default)]
struct Frames {
    /// The start of a frame the last read cut; unallocated between frames.
    carry: Vec<u8>,
    /// A fragmented message being joined, and whether it is compressed.
    partial: Option<(Kind, bool, Vec<u8>)>,
    /// permessage-deflate was agreed: RSV1 marks a compressed message.
    deflate: bool,
}

impl Frames {
    /// Takes in one read's bytes; calls `f` for each complete message. The carry-over is
    /// the one every reader of the generator uses ([`feed`]); parsing stops at a close.
    fn feed(
        &mut self,
        data: &[u8],
        ctl: &mut Control,
        f: &mut impl FnMut(Kind, &[u8]),
    ) -> Result<(), BenchError> {
        let (partial, deflate) = (&mut self.partial, self.deflate);
        feed(&mut self.carry, data, |buf| {
            if ctl.close.is_some() {
                return Ok(None);
            }
            let Some((head, len)) = frame_head(buf, deflate)? else {
                return Ok(None);
            };
            let Some(end) = head.checked_add(len).filter(|e| *e <= buf.len()) else {
                return Ok(None);
            };
            frame(partial, buf[0], &buf[head..end], ctl, f)?;
            Ok(Some(end))
        })
    }
}

/// Acts on one whole frame: its first byte `b0` and its payload.
fn frame(
    partial: &mut Option<(Kind, bool, Vec<u8>)>,
    b0: u8,
    payload: &[u8],
    ctl: &mut Control,
    f: &mut impl FnMut(Kind, &[u8]),
) -> Result<(), BenchError> {
    let fin = b0 & 0x80 != 0;
    let rsv1 = b0 & 0x40 != 0;
    // A whole message: inflated first when compressed.
    let mut deliver = |kind: Kind, compressed: bool, data: &[u8]| -> Result<(), BenchError> {
        if compressed {
            f(kind, &inflate(data)?);
        } else {
            f(kind, data);
        }
        Ok(())
    };
    match b0 & 0x0f {
        op @ (OP_TEXT | OP_BINARY) => {
            if partial.is_some() {
                return Err(protocol("a new message inside a fragmented one"));
            }
            let kind = if op == OP_TEXT {
                Kind::Text
            } else {
                Kind::Binary
            };
            if fin {
                deliver(kind, rsv1, payload)?;
            } else {
                *partial = Some((kind, rsv1, payload.to_vec()));
            }
        }
        OP_CONTINUATION => {
            let Some((kind, compressed, mut joined)) = partial.take() else {
                return Err(protocol("a continuation frame without a message"));
            };
            if rsv1 {
                return Err(protocol("RSV1 on a continuation frame"));
            }
            if joined.len() + payload.len() > MAX_MESSAGE {
                return Err(protocol("message too large"));
            }
            joined.extend_from_slice(payload);
            if fin {
                deliver(kind, compressed, &joined)?;
            } else {
                *partial = Some((kind, compressed, joined));
            }
        }
        op @ (OP_CLOSE | OP_PING | OP_PONG) => {
            if !fin || payload.len() > 125 || rsv1 {
                return Err(protocol("a fragmented or oversized control frame"));
            }
            match op {
                OP_PING => ctl.pong = Some(payload.to_vec()),
                OP_CLOSE => ctl.close = Some(close_reason(payload)),
                _ => {}
            }
        }
        op => return Err(protocol(&format!("unknown opcode {op}"))),
    }
    Ok(())
}

fn protocol(what: &str) -> BenchError {
    BenchError::Protocol(format!("websocket: {what}"))
}

/// Header length and payload length of the frame at the front of `b`; None while the
/// header is incomplete. `deflate`: RSV1 (a compressed message) is allowed.
fn frame_head(b: &[u8], deflate: bool) -> Result<Option<(usize, usize)>, BenchError> {
    if b.len() < 2 {
        return Ok(None);
    }
    let allowed = if deflate { 0x40 } else { 0 };
    if b[0] & 0x70 & !allowed != 0 {
        return Err(protocol("reserved bits set that no extension allows"));
    }
    if b[1] & 0x80 != 0 {
        return Err(protocol("a masked frame from the server"));
    }
    let (head, len) = match b[1] & 0x7f {
        126 => match b.get(2..4) {
            Some(x) => (4, u64::from(u16::from_be_bytes([x[0], x[1]]))),
            None => return Ok(None),
        },
        127 => match b.get(2..10) {
            Some(x) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(x);
                (10, u64::from_be_bytes(n))
            }
            None => return Ok(None),
        },
        n => (2, u64::from(n)),
    };
    if len > MAX_MESSAGE as u64 {
        return Err(protocol("message too large"));
    }
    Ok(Some((head, len as usize)))
}

fn close_reason(payload: &[u8]) -> String {
    match payload {
        [a, b, reason @ ..] => format!(
            "{} {}",
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(reason)
        ),
        _ => "close frame".into(),
    }
}

/// A client frame: header, masking key, masked payload.
fn encode(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | op);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = mask_key();
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
    out
}

/// A WebSocket client connection.
pub struct Ws {
    tcp: TcpStream,
    frames: Frames,
    /// Messages the handshake's read brought along, served before the socket is read.
    ready: VecDeque<Message>,
    /// A pong owed to the server, written before the next frame we send (so a read stays
    /// cancel-safe: it never writes).
    pong: Option<Vec<u8>>,
}

impl Ws {
    /// Sends a text message.
    pub async fn send_text(&mut self, text: &str) -> Result<(), BenchError> {
        self.send(true, text.as_bytes()).await
    }

    /// Sends a binary message.
    pub async fn send_binary(&mut self, data: &[u8]) -> Result<(), BenchError> {
        self.send(false, data).await
    }

    /// Sends a text (`text`: the caller vouches it is UTF-8) or binary message.
    pub async fn send(&mut self, text: bool, data: &[u8]) -> Result<(), BenchError> {
        let op = if text { OP_TEXT } else { OP_BINARY };
        if let Some(p) = self.pong.take() {
            self.tcp.write_all(&encode(OP_PONG, &p)).await?;
        }
        self.tcp.write_all(&encode(op, data)).await?;
        Ok(())
    }

    /// Waits for data and calls `f` for every whole message one read brings (possibly
    /// none: a read can end inside a frame). Cancel-safe: it only awaits readiness. A
    /// close from the server, the end of the stream or a protocol violation is an error.
    pub async fn read(&mut self, mut f: impl FnMut(Kind, &[u8])) -> Result<(), BenchError> {
        if !self.ready.is_empty() {
            for m in std::mem::take(&mut self.ready) {
                f(m.kind, &m.data);
            }
            return Ok(());
        }
        let ctl = loop {
            self.tcp.readable().await?;
            let read = SCRATCH_BUF.with(|s| -> Result<Option<Control>, BenchError> {
                let mut s = s.borrow_mut();
                match self.tcp.try_read(&mut s) {
                    Ok(0) => Err(BenchError::Closed("eof".into())),
                    Ok(n) => {
                        let mut ctl = Control::default();
                        self.frames.feed(&s[..n], &mut ctl, &mut f)?;
                        Ok(Some(ctl))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                    Err(e) => Err(e.into()),
                }
            })?;
            if let Some(ctl) = read {
                break ctl;
            }
        };
        if let Some(p) = ctl.pong {
            self.pong = Some(p);
        }
        match ctl.close {
            Some(reason) => Err(BenchError::Closed(reason)),
            None => Ok(()),
        }
    }

    /// The next whole data message; pings are answered with the next message sent.
    pub async fn next_data(&mut self) -> Result<Message, BenchError> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                if self.ready.is_empty() {
                    self.ready = VecDeque::new();
                }
                return Ok(m);
            }
            let mut got = VecDeque::new();
            self.read(|kind, data| {
                got.push_back(Message {
                    kind,
                    data: data.to_vec(),
                })
            })
            .await?;
            self.ready = got;
            if let Some(p) = self.pong.take() {
                self.tcp.write_all(&encode(OP_PONG, &p)).await?;
            }
        }
    }

    /// Best-effort goodbye: `last` (a protocol's own goodbye), then a close frame; a slow
    /// server does not hold the shutdown.
    pub async fn close(&mut self, last: Option<Vec<u8>>) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if let Some(m) = last {
                self.send_binary(&m).await?;
            }
            self.tcp
                .write_all(&encode(OP_CLOSE, &1000u16.to_be_bytes()))
                .await?;
            self.tcp.shutdown().await?;
            Ok::<_, BenchError>(())
        })
        .await;
    }
}

/// TCP connect (from `src` when given) and WebSocket handshake.
pub async fn ws_connect(
    ep: &Endpoint,
    src: Option<IpAddr>,
    subprotocol: Option<&'static str>,
) -> Result<Ws, BenchError> {
    handshake(ep.addr, &ep.authority, &ep.path, src, subprotocol, false).await
}

/// As [`ws_connect`], offering permessage-deflate when `deflate` (refused unless the
/// server agrees to reset its compressor per message).
pub async fn ws_connect_with(
    ep: &Endpoint,
    src: Option<IpAddr>,
    subprotocol: Option<&'static str>,
    deflate: bool,
) -> Result<Ws, BenchError> {
    handshake(ep.addr, &ep.authority, &ep.path, src, subprotocol, deflate).await
}

/// As [`ws_connect`], for a URL derived from an already checked endpoint (same
/// address, another path).
pub async fn ws_connect_url(
    addr: SocketAddr,
    url: &str,
    src: Option<IpAddr>,
    subprotocol: Option<&'static str>,
) -> Result<Ws, BenchError> {
    let ep = loopback_endpoint(url, &["ws"])?;
    handshake(addr, &ep.authority, &ep.path, src, subprotocol, false).await
}

async fn handshake(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    src: Option<IpAddr>,
    subprotocol: Option<&'static str>,
    deflate: bool,
) -> Result<Ws, BenchError> {
    let mut tcp = connect_tcp(addr, src).await?;
    let key = generate_key();
    let mut offer = subprotocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    if deflate {
        offer.push_str(DEFLATE_OFFER);
    }
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{offer}\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let expected = derive_accept_key(key.as_bytes());
    let (head, used) = read_response_head(&mut tcp, 101, |resp| {
        let accept = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|h| h.value);
        if accept != Some(expected.as_bytes()) {
            return Err(protocol("wrong Sec-WebSocket-Accept"));
        }
        let extensions = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
            .map(|h| String::from_utf8_lossy(h.value).into_owned());
        match (deflate, extensions) {
            (_, None) if deflate => Err(protocol("permessage-deflate was not agreed")),
            (_, None) => Ok(()),
            (true, Some(e))
                if e.contains("permessage-deflate") && e.contains("server_no_context_takeover") =>
            {
                Ok(())
            }
            (_, Some(e)) => Err(protocol(&format!("unexpected extensions: {e}"))),
        }
    })
    .await?;
    let mut ws = Ws {
        tcp,
        frames: Frames {
            deflate,
            ..Frames::default()
        },
        ready: VecDeque::new(),
        pong: None,
    };
    if used < head.len() {
        // Frames that came with the response.
        let mut ctl = Control::default();
        let mut got = VecDeque::new();
        ws.frames.feed(&head[used..], &mut ctl, &mut |kind, data| {
            got.push_back(Message {
                kind,
                data: data.to_vec(),
            })
        })?;
        ws.ready = got;
        ws.pong = ctl.pong;
        if let Some(reason) = ctl.close {
            return Err(BenchError::Closed(reason));
        }
    }
    Ok(ws)
}

/// Reads an HTTP response head (at most 16 KiB) and refuses any status but `status`;
/// `check` looks at its headers. Returns what was read — the head, and whatever of the body
/// came with it — and the head's length.
pub(crate) async fn read_response_head(
    tcp: &mut TcpStream,
    status: u16,
    check: impl FnOnce(&httparse::Response<'_, '_>) -> Result<(), BenchError>,
) -> Result<(Vec<u8>, usize), BenchError> {
    let mut got = Vec::with_capacity(512);
    loop {
        if got.len() >= MAX_RESPONSE_HEAD {
            return Err(BenchError::Protocol("response head too large".into()));
        }
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Err(BenchError::Closed("eof before the response head".into()));
        }
        got.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&got) {
            Ok(httparse::Status::Complete(used)) => {
                let code = resp.code.unwrap_or(0);
                if code != status {
                    return Err(BenchError::Handshake(code));
                }
                check(&resp)?;
                return Ok((got, used));
            }
            Ok(httparse::Status::Partial) => {}
            Err(_) => return Err(BenchError::Protocol("unparsable response head".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked).
    fn server_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n <= 65535 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    fn run(frames: &mut Frames, chunks: &[&[u8]]) -> (Vec<Message>, Control) {
        let mut got = Vec::new();
        let mut ctl = Control::default();
        for c in chunks {
            frames
                .feed(c, &mut ctl, &mut |kind, data| {
                    got.push(Message {
                        kind,
                        data: data.to_vec(),
                    })
                })
                .unwrap();
        }
        (got, ctl)
    }

    #[test]
    fn messages_cut_anywhere_come_out_whole_and_leave_no_buffer() {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (i, len) in [0usize, 1, 125, 126, 300, 65535, 65536, 70000]
            .iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..*len).map(|j| (i + j) as u8).collect();
            let (b0, kind) = if i % 2 == 0 {
                (0x80 | OP_BINARY, Kind::Binary)
            } else {
                (0x80 | OP_TEXT, Kind::Text)
            };
            stream.extend(server_frame(b0, &data));
            want.push(Message { kind, data });
        }
        // A fragmented text message, a ping between its fragments.
        stream.extend(server_frame(OP_TEXT, b"hel"));
        stream.extend(server_frame(0x80 | OP_PING, b"p"));
        stream.extend(server_frame(OP_CONTINUATION, b"lo "));
        stream.extend(server_frame(0x80 | OP_CONTINUATION, b"world"));
        want.push(Message {
            kind: Kind::Text,
            data: b"hello world".to_vec(),
        });
        for size in [1usize, 2, 3, 7, 1000, 65536, stream.len()] {
            let mut frames = Frames::default();
            let chunks: Vec<&[u8]> = stream.chunks(size).collect();
            let (got, ctl) = run(&mut frames, &chunks);
            assert_eq!(got, want, "chunks of {size}");
            assert_eq!(ctl.pong.as_deref(), Some(&b"p"[..]));
            assert_eq!(frames.carry.capacity(), 0, "idle: no buffer kept");
            assert!(frames.partial.is_none());
        }
    }

    #[test]
    fn a_close_frame_ends_parsing_with_its_code_and_reason() {
        let mut payload = 3012u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"no pong");
        let mut stream = server_frame(0x80 | OP_CLOSE, &payload);
        stream.extend(server_frame(0x80 | OP_TEXT, b"after"));
        let (got, ctl) = run(&mut Frames::default(), &[&stream]);
        assert!(got.is_empty());
        assert_eq!(ctl.close.as_deref(), Some("3012 no pong"));
    }

    #[test]
    fn protocol_violations_are_errors() {
        let bad: [Vec<u8>; 5] = [
            vec![0x80 | OP_TEXT, 0x81, 1, 2, 3, 4, b'x'], // masked by the server
            vec![0xC0 | OP_TEXT, 0],                      // RSV1 without an extension
            server_frame(0x80 | OP_CONTINUATION, b"x"),   // continuation of nothing
            vec![0x80 | 0x3, 0],                          // unknown opcode
            {
                let mut f = vec![0x80 | OP_BINARY, 127];
                f.extend_from_slice(&(MAX_MESSAGE as u64 + 1).to_be_bytes());
                f
            },
        ];
        for b in bad {
            let mut ctl = Control::default();
            let r = Frames::default().feed(&b, &mut ctl, &mut |_, _| {});
            assert!(r.is_err(), "{b:?}");
        }
    }

    /// `data` compressed as RFC 7692 sends it: raw deflate, sync flush, tail removed.
    fn deflated(data: &[u8]) -> Vec<u8> {
        let mut z = flate2::Compress::new(flate2::Compression::fast(), false);
        let mut out = Vec::with_capacity(data.len() + 64);
        z.compress_vec(data, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    #[test]
    fn compressed_messages_are_inflated_when_deflate_was_agreed() {
        let text = "a compressed publication ".repeat(20);
        let packed = deflated(text.as_bytes());
        let mut stream = server_frame(0xC0 | OP_TEXT, &packed);
        // The same message in two fragments: RSV1 on the first only.
        let (a, b) = packed.split_at(packed.len() / 2);
        stream.extend(server_frame(0x40 | OP_TEXT, a));
        stream.extend(server_frame(0x80 | OP_CONTINUATION, b));
        stream.extend(server_frame(0x80 | OP_TEXT, b"plain"));
        for cut in 1..stream.len() {
            let mut frames = Frames {
                deflate: true,
                ..Frames::default()
            };
            let (got, _) = run(&mut frames, &[&stream[..cut], &stream[cut..]]);
            let texts: Vec<&[u8]> = got.iter().map(|m| m.data.as_slice()).collect();
            assert_eq!(
                texts,
                [text.as_bytes(), text.as_bytes(), b"plain"],
                "cut at {cut}"
            );
        }
        // RSV1 on a continuation or a control frame stays an error.
        for bad in [
            [server_frame(0x40 | OP_TEXT, a), server_frame(0xC0, b)].concat(),
            server_frame(0xC0 | OP_PING, b""),
        ] {
            let mut frames = Frames {
                deflate: true,
                ..Frames::default()
            };
            let r = frames.feed(&bad, &mut Control::default(), &mut |_, _| {});
            assert!(r.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_frames_are_masked() {
        let f = encode(OP_TEXT, b"hello");
        assert_eq!(f[0], 0x80 | OP_TEXT);
        assert_eq!(f[1], 0x80 | 5);
        let key = [f[2], f[3], f[4], f[5]];
        let plain: Vec<u8> = f[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i & 3])
            .collect();
        assert_eq!(plain, b"hello");
        let long = encode(OP_BINARY, &[7u8; 300]);
        assert_eq!(long[1], 0x80 | 126);
        assert_eq!(u16::from_be_bytes([long[2], long[3]]), 300);
        assert_eq!(long.len(), 4 + 4 + 300);
    }
}
