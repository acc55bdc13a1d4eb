//! Server-side WebSocket framing (RFC 6455) with permessage-deflate (RFC 7692), Sans-IO.
//!
//! The I/O wrapper reads into a shared scratch buffer and hands each read to [`Decoder::feed`];
//! writes are a [`frame_head`] followed by the payload. Nothing here buffers between messages:
//! an idle [`Decoder`] is a few words with every buffer unallocated, which is what an idle
//! connection costs. Bytes are kept only while a frame or a fragmented message is partway
//! through, and a message that arrives within one read is unmasked in place and copied once.

use std::cell::RefCell;
use std::mem;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Longest frame head: 2 bytes, 8 of extended length, 4 of mask key.
const MAX_HEAD: usize = 14;

/// Largest control frame payload (RFC 6455 section 5.5).
const MAX_CONTROL: usize = 125;

/// The end of a sync flush, which RFC 7692 strips from every compressed message and the
/// receiver appends again before inflating.
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Permessage-deflate terms agreed in the handshake (what the server's 101 response said).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deflate {
    /// LZ77 window of the server's compressor, 9..=15 (zlib's raw deflate cannot do 8).
    pub server_max_window_bits: u8,
    /// The server resets its compressor after every message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message, so the server's decompressor
    /// can be reset per message too.
    pub client_no_context_takeover: bool,
}

impl Deflate {
    /// Parses the agreed `Sec-WebSocket-Extensions` value of the server's response, e.g.
    /// "permessage-deflate; server_no_context_takeover; client_no_context_takeover;
    /// server_max_window_bits=9".
    ///
    /// None when it does not name permessage-deflate. A missing server_max_window_bits means
    /// 15; a value outside 9..=15 (or not a number) is clamped into it, since that is all the
    /// compressor can do. `client_max_window_bits` needs nothing: the decompressor always
    /// uses the largest window, which reads any smaller one.
    pub fn from_response(value: &str) -> Option<Deflate> {
        value.split(',').find_map(|extension| {
            let mut params = extension.split(';').map(str::trim);
            if !params.next()?.eq_ignore_ascii_case("permessage-deflate") {
                return None;
            }
            let mut terms = Deflate {
                server_max_window_bits: 15,
                server_no_context_takeover: false,
                client_no_context_takeover: false,
            };
            for param in params {
                let (name, value) = match param.split_once('=') {
                    Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
                    None => (param, None),
                };
                if name.eq_ignore_ascii_case("server_no_context_takeover") {
                    terms.server_no_context_takeover = true;
                } else if name.eq_ignore_ascii_case("client_no_context_takeover") {
                    terms.client_no_context_takeover = true;
                } else if name.eq_ignore_ascii_case("server_max_window_bits") {
                    terms.server_max_window_bits = value
                        .and_then(|v| v.parse::<u64>().ok())
                        .map_or(15, |bits| u8::try_from(bits.clamp(9, 15)).unwrap_or(15));
                }
            }
            Some(terms)
        })
    }
}

/// The type of a data message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
}

/// What the client sent, whole.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A complete data message (fragments joined, decompressed; text is valid UTF-8).
    Message(Kind, Bytes),
    /// A ping: answer with a pong carrying this payload.
    Ping(Bytes),
    Pong,
    /// A close frame: its code (None when the frame had no payload) and reason. After it the
    /// decoder yields nothing more.
    Close(Option<u16>, String),
}

/// Why the client's bytes were refused; each maps to the close code the server then sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// Close code 1002.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// Close code 1007.
    #[error("text is not UTF-8")]
    InvalidUtf8,
    /// Close code 1009.
    #[error("message too big")]
    TooBig,
}

impl WsError {
    /// The close code the server answers this refusal with.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => 1002,
            WsError::InvalidUtf8 => 1007,
            WsError::TooBig => 1009,
        }
    }
}

/// Opcodes for encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpCode {
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn bits(self) -> u8 {
        match self {
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }
}

/// The head of one unmasked server frame with FIN set: the bytes and how many are used (2, 4
/// or 10). `compressed` sets RSV1.
pub fn frame_head(op: OpCode, compressed: bool, payload_len: usize) -> ([u8; 10], usize) {
    let mut head = [0u8; 10];
    head[0] = 0x80 | if compressed { 0x40 } else { 0 } | op.bits();
    if let Some(len) = u8::try_from(payload_len).ok().filter(|&len| len <= 125) {
        head[1] = len;
        (head, 2)
    } else if let Ok(len) = u16::try_from(payload_len) {
        head[1] = 126;
        head[2..4].copy_from_slice(&len.to_be_bytes());
        (head, 4)
    } else {
        head[1] = 127;
        let len = u64::try_from(payload_len).unwrap_or(u64::MAX);
        head[2..10].copy_from_slice(&len.to_be_bytes());
        (head, 10)
    }
}

/// The payload of a close frame: 2-byte code then the reason, truncated on a char boundary so
/// the payload fits a control frame (125 bytes).
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = reason.as_bytes().get(..end).unwrap_or_default();
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason);
    payload
}

thread_local! {
    /// Compressors of this thread, one per window size in use (index: bits - 9). Reset after
    /// every message, so no connection's data outlives its message in them.
    static COMPRESSORS: RefCell<[Option<Compress>; 7]> = const { RefCell::new([const { None }; 7]) };

    /// Decompressor for clients that reset their compressor per message: reset before each
    /// message, so idle connections hold none.
    static DECOMPRESSOR: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Compresses one whole message per RFC 7692: raw deflate at `terms.server_max_window_bits`,
/// level 1, the trailing 0x00 0x00 0xff 0xff removed.
///
/// The thread's compressor is reset after every message whatever the terms say: Herald agrees
/// server_no_context_takeover, and resetting is always legal for the sender.
pub fn compress(payload: &[u8], terms: &Deflate) -> Vec<u8> {
    let bits = terms.server_max_window_bits.clamp(9, 15);
    let fresh = || Compress::new_with_window_bits(Compression::fast(), false, bits);
    let run = |z: &mut Compress| {
        let out = deflate_message(z, payload);
        z.reset();
        out
    };
    let out = COMPRESSORS
        .try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut slots) => match slots.get_mut(usize::from(bits - 9)) {
                Some(slot) => run(slot.get_or_insert_with(fresh)),
                None => run(&mut fresh()),
            },
            Err(_) => run(&mut fresh()),
        })
        .unwrap_or_else(|_| run(&mut fresh()));
    // zlib does not fail on valid input; should it, stored blocks are still a valid payload.
    out.unwrap_or_else(|| stored_blocks(payload))
}

/// Deflates `input` with a sync flush and strips the flush's tail; None if zlib fails.
fn deflate_message(z: &mut Compress, input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() / 2 + 64);
    let mut rest = input;
    loop {
        // zlib wants more than 6 bytes of room while flushing, or it repeats flush markers.
        if out.capacity() - out.len() < 16 {
            out.reserve(out.capacity().max(64));
        }
        let (in_before, out_before) = (z.total_in(), out.len());
        z.compress_vec(rest, &mut out, FlushCompress::Sync).ok()?;
        let consumed = usize::try_from(z.total_in().checked_sub(in_before)?).ok()?;
        rest = rest.get(consumed..)?;
        // The flush is complete once all input is in and zlib left room unused.
        if rest.is_empty() && out.len() < out.capacity() {
            break;
        }
        if consumed == 0 && out.len() == out_before {
            return None;
        }
    }
    let body = out.len().checked_sub(DEFLATE_TAIL.len())?;
    if out.get(body..)? != DEFLATE_TAIL {
        return None;
    }
    out.truncate(body);
    Some(out)
}

/// `payload` as uncompressed deflate blocks, followed by the header byte of the empty block
/// whose LEN/NLEN the receiver appends (RFC 7692 section 7.2.1).
fn stored_blocks(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload.len() / 0xffff * 5 + 6);
    for block in payload.chunks(0xffff) {
        let len = u16::try_from(block.len()).unwrap_or(u16::MAX);
        out.push(0x00);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.push(0x00);
    out
}

/// Inflates one message's compressed payload, with the tail appended, into at most `max`
/// bytes: the output grows only as far as `max` allows, so a deflate bomb costs at most
/// `max`. Also returns whether the stream ended (a final block), which loses the window.
fn inflate_message(
    z: &mut Decompress,
    input: &[u8],
    max: usize,
) -> Result<(Vec<u8>, bool), WsError> {
    const CORRUPT: WsError = WsError::Protocol("invalid compressed data");
    let limit = max.saturating_add(1);
    let mut out = Vec::new();
    for part in [input, &DEFLATE_TAIL[..]] {
        let mut rest = part;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= limit {
                    return Err(WsError::TooBig);
                }
                let want = out.len().max(input.len().saturating_mul(2)).max(1024);
                out.reserve_exact(want.min(limit - out.len()));
            }
            let (in_before, out_before) = (z.total_in(), out.len());
            let status = z
                .decompress_vec(rest, &mut out, FlushDecompress::None)
                .map_err(|_| CORRUPT)?;
            let consumed = z
                .total_in()
                .checked_sub(in_before)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or(CORRUPT)?;
            rest = rest.get(consumed..).ok_or(CORRUPT)?;
            if out.len() > max {
                return Err(WsError::TooBig);
            }
            if status == Status::StreamEnd {
                return Ok((out, true));
            }
            // Done with this part once its input is in and zlib left room unused.
            if rest.is_empty() && out.len() < out.capacity() {
                break;
            }
            if consumed == 0 && out.len() == out_before {
                return Err(CORRUPT);
            }
        }
    }
    Ok((out, false))
}

/// Inflates a message of a client that resets its compressor per message, with the thread's
/// decompressor.
fn inflate_fresh(input: &[u8], max: usize) -> Result<Vec<u8>, WsError> {
    let run = |z: &mut Decompress| {
        z.reset(false);
        inflate_message(z, input, max).map(|(out, _)| out)
    };
    DECOMPRESSOR
        .try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut slot) => run(slot.get_or_insert_with(|| Decompress::new(false))),
            Err(_) => run(&mut Decompress::new(false)),
        })
        .unwrap_or_else(|_| run(&mut Decompress::new(false)))
}

/// Compressed bytes a message may take: a little over `max`, because data that does not
/// compress grows by a few bytes per 64 KiB stored block and can still inflate within `max`.
fn compressed_limit(max: usize) -> usize {
    max.saturating_add(max / 1024).saturating_add(64)
}

/// XORs `buf` with the mask key, starting at the key's first byte; sixteen bytes at a time.
fn unmask(buf: &mut [u8], key: [u8; 4]) {
    let [a, b, c, d] = key;
    let wide = u128::from_ne_bytes([a, b, c, d, a, b, c, d, a, b, c, d, a, b, c, d]);
    let mut words = buf.chunks_exact_mut(16);
    for word in &mut words {
        if let Ok(word) = <&mut [u8; 16]>::try_from(word) {
            *word = (u128::from_ne_bytes(*word) ^ wide).to_ne_bytes();
        }
    }
    for (byte, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// Validates `buf` from `checked` on, advancing `checked` past what is valid; an incomplete
/// sequence at the end waits for more bytes, anything else fails at once.
fn check_utf8(buf: &[u8], checked: &mut usize) -> Result<(), WsError> {
    let rest = buf.get(*checked..).unwrap_or_default();
    match std::str::from_utf8(rest) {
        Ok(_) => *checked = buf.len(),
        Err(e) if e.error_len().is_none() => *checked += e.valid_up_to(),
        Err(_) => return Err(WsError::InvalidUtf8),
    }
    Ok(())
}

/// Close codes a client may send (RFC 6455 section 7.4 and the IANA registry).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The event of a whole control frame's (unmasked) payload.
fn control_event(opcode: u8, payload: &[u8]) -> Result<Incoming, WsError> {
    match opcode {
        0x9 => Ok(Incoming::Ping(Bytes::copy_from_slice(payload))),
        0xA => Ok(Incoming::Pong),
        _ => match payload {
            [] => Ok(Incoming::Close(None, String::new())),
            [_] => Err(WsError::Protocol("close frame with a 1-byte payload")),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !valid_close_code(code) {
                    return Err(WsError::Protocol("invalid close code"));
                }
                let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
                Ok(Incoming::Close(Some(code), reason.to_owned()))
            }
        },
    }
}

/// `N` bytes of `b` from `at`, if they have arrived.
fn bytes_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The bytes of the frame head being read: the `filled` kept from earlier reads, then as many
/// of `rest` as a head can need. Gives the bytes, how many were kept and how many are valid.
fn head_bytes(mut buf: [u8; MAX_HEAD], filled: u8, rest: &[u8]) -> ([u8; MAX_HEAD], usize, usize) {
    let kept = usize::from(filled).min(MAX_HEAD);
    let take = (MAX_HEAD - kept).min(rest.len());
    buf[kept..kept + take].copy_from_slice(&rest[..take]);
    (buf, kept, kept + take)
}

/// The opcode, mask key (zeros when unmasked), payload length and size of a frame head,
/// whatever its bits say; None while incomplete. For following a refused stream.
fn any_head(b: &[u8]) -> Option<(u8, [u8; 4], u64, usize)> {
    let [b0, b1, ..] = *b else {
        return None;
    };
    let (len, at) = match b1 & 0x7F {
        126 => (u64::from(u16::from_be_bytes(bytes_at(b, 2)?)), 4),
        127 => (u64::from_be_bytes(bytes_at(b, 2)?), 10),
        short => (u64::from(short), 2),
    };
    if b1 & 0x80 == 0 {
        return Some((b0 & 0x0F, [0; 4], len, at));
    }
    Some((b0 & 0x0F, bytes_at(b, at)?, len, at + 4))
}

/// A parsed and checked frame head.
#[derive(Clone, Copy, Debug)]
struct Head {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
}

/// What the payload being read belongs to.
#[derive(Clone, Copy, Debug)]
enum Part {
    /// A data frame, whose bytes join the message in progress.
    Data { fin: bool },
    /// A control frame, whose bytes are kept after the message's until complete.
    Control { opcode: u8, len: u8 },
    /// After a refusal, a frame passed over unread; `close` when it is an (oversized) close.
    Skip { close: bool },
}

/// Where the reader is within the client's byte stream.
#[derive(Clone, Copy, Debug)]
enum State {
    /// Expecting a frame head, `filled` bytes of which came in earlier reads.
    Head { buf: [u8; MAX_HEAD], filled: u8 },
    /// Inside a frame's payload; `mask` is rotated to the next byte's key.
    Payload {
        part: Part,
        mask: [u8; 4],
        remaining: usize,
    },
    /// The client sent a close frame.
    Closed,
}

/// How frames are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Checked and yielded.
    Normal,
    /// The client's bytes were refused: frames are followed, unchecked, up to the close
    /// frame, and nothing is yielded.
    Refused,
    /// As `Refused`, but the close frame is yielded ([`Decoder::drain_mode`]).
    Draining,
}

/// Between frames, with nothing kept.
const START: State = State::Head {
    buf: [0; MAX_HEAD],
    filled: 0,
};

/// A data message partway through.
#[derive(Clone, Copy, Debug)]
struct Message {
    kind: Kind,
    compressed: bool,
    /// Bytes of uncompressed text validated so far.
    checked: usize,
}

/// The reading side's state between reads: a few words while idle, every buffer unallocated
/// unless a frame or a fragmented message is partway through.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    deflate: Option<Deflate>,
    mode: Mode,
    state: State,
    /// The message in progress, if any.
    message: Option<Message>,
    /// The message's payload so far (compressed as received if compressed), then the bytes of
    /// a control frame cut by a read.
    buf: Vec<u8>,
    /// Decompressor of a client that keeps its compression context across messages, which
    /// later messages may reference; allocated at its first compressed message.
    inflater: Option<Box<Decompress>>,
}

impl Decoder {
    /// `max_message`: largest message accepted (after decompression); `deflate`: the agreed
    /// terms, None when not negotiated.
    pub fn new(max_message: usize, deflate: Option<Deflate>) -> Self {
        Decoder {
            max_message,
            deflate,
            mode: Mode::Normal,
            state: START,
            message: None,
            buf: Vec::new(),
            inflater: None,
        }
    }

    /// Takes one read's bytes (mutable so masked payload can be unmasked in place) and calls
    /// `f` with each complete event, in order.
    ///
    /// Bytes of a frame cut by the end of `data` are kept until the next call. After a close
    /// frame, or once an error was returned, further calls yield nothing and return
    /// `Ok(())` (but see [`Decoder::drain_mode`]).
    pub fn feed(&mut self, data: &mut [u8], f: &mut impl FnMut(Incoming)) -> Result<(), WsError> {
        let mut pos = 0;
        if self.mode != Mode::Normal {
            self.scan(data, pos, f);
            return Ok(());
        }
        let result = self.run(data, &mut pos, f);
        if result.is_err() {
            // Frame boundaries are still followed, so a later drain finds the close frame.
            self.refuse();
            self.scan(data, pos, f);
        }
        result
    }

    /// After a refusal (or to end a connection), reads on only for the client's close frame:
    /// later calls to [`Decoder::feed`] pass over every frame without checking or keeping it
    /// and yield just the close frame, as [`Incoming::Close`] (its code if it has one, its
    /// reason decoded lossily), then nothing.
    ///
    /// A close frame that came in the very read that was refused is not yielded: it ends the
    /// stream silently, which [`Decoder::close_seen`] tells.
    pub fn drain_mode(&mut self) {
        if self.mode == Mode::Normal {
            self.refuse();
        }
        self.mode = Mode::Draining;
    }

    /// The permessage-deflate terms the decoder was made with (None: not agreed).
    pub fn deflate(&self) -> Option<&Deflate> {
        self.deflate.as_ref()
    }

    /// Whether the client's close frame has been read, yielded or not: nothing more is to
    /// be read from it.
    pub fn close_seen(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// An incomplete head, all of the read's rest (fewer than MAX_HEAD bytes): kept for the
    /// next read.
    fn keep_head(&mut self, buf: [u8; MAX_HEAD], have: usize) {
        self.state = State::Head {
            buf,
            filled: u8::try_from(have).unwrap_or(u8::MAX),
        };
    }

    /// Whether a frame or fragmented message is partway through.
    pub fn is_idle(&self) -> bool {
        self.message.is_none()
            && match self.state {
                State::Head { filled, .. } => filled == 0,
                State::Payload { .. } => false,
                State::Closed => true,
            }
    }

    /// Stops judging the stream: drops the message in progress and whatever it kept, and
    /// turns the frame being read into one to pass over (a close frame's bytes so far stay).
    fn refuse(&mut self) {
        self.mode = Mode::Refused;
        self.message = None;
        self.inflater = None;
        let mut keep = Vec::new();
        if let State::Payload {
            part, remaining, ..
        } = &mut self.state
        {
            match *part {
                Part::Data { .. } => *part = Part::Skip { close: false },
                Part::Control { opcode, len } => {
                    if opcode == 0x8 {
                        let have = usize::from(len).saturating_sub(*remaining);
                        let start = self.buf.len().saturating_sub(have);
                        keep = self.buf.get(start..).unwrap_or_default().to_vec();
                    } else {
                        *part = Part::Skip { close: false };
                    }
                }
                Part::Skip { .. } => {}
            }
        }
        self.buf = keep;
    }

    /// The close frame ends the stream; it is yielded unless the stream was refused.
    fn close<F: FnMut(Incoming)>(&mut self, event: Incoming, f: &mut F) {
        self.message = None;
        self.buf = Vec::new();
        self.inflater = None;
        self.state = State::Closed;
        if self.mode != Mode::Refused {
            f(event);
        }
    }

    /// Reads frames from `data[*pos..]`. On an error `*pos` and the state are where the
    /// refused frame's bytes end so far, for [`Decoder::scan`] to go on from.
    fn run<F: FnMut(Incoming)>(
        &mut self,
        data: &mut [u8],
        pos: &mut usize,
        f: &mut F,
    ) -> Result<(), WsError> {
        while *pos < data.len() {
            match self.state {
                State::Head { buf, filled } => {
                    let (buf, kept, have) = head_bytes(buf, filled, &data[*pos..]);
                    match self.parse_head(&buf[..have])? {
                        Some((head, used)) => {
                            // A kept head was incomplete, so this read supplied the rest.
                            *pos += used.saturating_sub(kept);
                            self.state = START;
                            self.start_frame(head, data, pos, f)?;
                        }
                        None => {
                            self.keep_head(buf, have);
                            *pos = data.len();
                        }
                    }
                }
                State::Payload { .. } => self.payload(data, pos, f)?,
                State::Closed => break,
            }
        }
        Ok(())
    }

    /// Parses and checks a frame head from its first bytes: None while incomplete, an error
    /// as soon as the bytes so far break a rule.
    fn parse_head(&self, b: &[u8]) -> Result<Option<(Head, usize)>, WsError> {
        let [b0, b1, ..] = *b else {
            return Ok(None);
        };
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        let opcode = b0 & 0x0F;
        let len7 = b1 & 0x7F;
        if b0 & 0x30 != 0 {
            return Err(WsError::Protocol("RSV2 or RSV3 set"));
        }
        if b1 & 0x80 == 0 {
            return Err(WsError::Protocol("client frame not masked"));
        }
        match opcode {
            0x0 => {
                if self.message.is_none() {
                    return Err(WsError::Protocol("continuation without a message"));
                }
                if rsv1 {
                    return Err(WsError::Protocol("RSV1 on a continuation frame"));
                }
            }
            0x1 | 0x2 => {
                if self.message.is_some() {
                    return Err(WsError::Protocol("new message inside a fragmented message"));
                }
                if rsv1 && self.deflate.is_none() {
                    return Err(WsError::Protocol("RSV1 set without permessage-deflate"));
                }
            }
            0x8..=0xA => {
                if !fin {
                    return Err(WsError::Protocol("fragmented control frame"));
                }
                if usize::from(len7) > MAX_CONTROL {
                    return Err(WsError::Protocol("control frame longer than 125 bytes"));
                }
                if rsv1 {
                    return Err(WsError::Protocol("RSV1 on a control frame"));
                }
            }
            _ => return Err(WsError::Protocol("reserved opcode")),
        }
        let (len, at) = match len7 {
            126 => match bytes_at::<2>(b, 2) {
                Some(x) => (u64::from(u16::from_be_bytes(x)), 4),
                None => return Ok(None),
            },
            127 => match bytes_at::<8>(b, 2) {
                Some(x) => {
                    let len = u64::from_be_bytes(x);
                    if len >> 63 != 0 {
                        return Err(WsError::Protocol("64-bit length with the top bit set"));
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            short => (u64::from(short), 2),
        };
        let len = usize::try_from(len).map_err(|_| WsError::TooBig)?;
        if opcode < 0x8 {
            // Refused on its declared length, before any of it is kept.
            let (compressed, so_far) = match self.message {
                Some(m) => (m.compressed, self.buf.len()),
                None => (rsv1, 0),
            };
            let limit = if compressed {
                compressed_limit(self.max_message)
            } else {
                self.max_message
            };
            if so_far.checked_add(len).is_none_or(|total| total > limit) {
                return Err(WsError::TooBig);
            }
        }
        let Some(mask) = bytes_at::<4>(b, at) else {
            return Ok(None);
        };
        let head = Head {
            fin,
            rsv1,
            opcode,
            mask,
            len,
        };
        Ok(Some((head, at + 4)))
    }

    /// Starts reading a frame's payload at `data[*pos..]`: a control frame or a whole message
    /// that arrived complete is handled in place; anything else is kept as it arrives.
    fn start_frame<F: FnMut(Incoming)>(
        &mut self,
        head: Head,
        data: &mut [u8],
        pos: &mut usize,
        f: &mut F,
    ) -> Result<(), WsError> {
        let end = pos.checked_add(head.len).filter(|&end| end <= data.len());
        if head.opcode >= 0x8 {
            if let Some(end) = end {
                let payload = &mut data[*pos..end];
                *pos = end;
                unmask(payload, head.mask);
                let event = self.ended_by(control_event(head.opcode, payload))?;
                self.emit_control(event, f);
                return Ok(());
            }
            let len = u8::try_from(head.len)
                .map_err(|_| WsError::Protocol("control frame longer than 125 bytes"))?;
            self.state = State::Payload {
                part: Part::Control {
                    opcode: head.opcode,
                    len,
                },
                mask: head.mask,
                remaining: head.len,
            };
        } else {
            if self.message.is_none() {
                let kind = if head.opcode == 0x1 {
                    Kind::Text
                } else {
                    Kind::Binary
                };
                if let (true, Some(end)) = (head.fin, end) {
                    let payload = &mut data[*pos..end];
                    *pos = end;
                    unmask(payload, head.mask);
                    let bytes = self.whole_message(kind, head.rsv1, payload)?;
                    f(Incoming::Message(kind, bytes));
                    return Ok(());
                }
                self.message = Some(Message {
                    kind,
                    compressed: head.rsv1,
                    checked: 0,
                });
            }
            self.state = State::Payload {
                part: Part::Data { fin: head.fin },
                mask: head.mask,
                remaining: head.len,
            };
        }
        self.payload(data, pos, f)
    }

    /// Takes what `data[*pos..]` holds of the current frame's payload; completes the frame
    /// (and the message, at FIN) once all of it is in.
    fn payload<F: FnMut(Incoming)>(
        &mut self,
        data: &mut [u8],
        pos: &mut usize,
        f: &mut F,
    ) -> Result<(), WsError> {
        let State::Payload {
            part,
            mask,
            remaining,
        } = &mut self.state
        else {
            return Ok(());
        };
        let n = (*remaining).min(data.len().saturating_sub(*pos));
        let chunk = &mut data[*pos..*pos + n];
        unmask(chunk, *mask);
        mask.rotate_left(n % 4);
        *remaining -= n;
        *pos += n;
        let (part, done) = (*part, *remaining == 0);
        self.buf.extend_from_slice(chunk);
        if done {
            self.state = START;
        }
        match part {
            Part::Data { fin } => {
                if let Some(m) = &mut self.message
                    && m.kind == Kind::Text
                    && !m.compressed
                {
                    check_utf8(&self.buf, &mut m.checked)?;
                }
                if done && fin {
                    self.finish_message(f)?;
                }
            }
            Part::Control { opcode, len } => {
                if done {
                    let start = self.buf.len().saturating_sub(usize::from(len));
                    let event = control_event(opcode, self.buf.get(start..).unwrap_or_default());
                    self.buf.truncate(start);
                    if self.message.is_none() {
                        self.buf = Vec::new();
                    }
                    let event = self.ended_by(event)?;
                    self.emit_control(event, f);
                }
            }
            // Only a refused stream passes frames over.
            Part::Skip { .. } => {}
        }
        Ok(())
    }

    /// Only a close frame's event can be refused (a bad code, a bad reason), and that close
    /// still ends the client's stream: a client sends nothing after its close frame, so
    /// there is no other close to wait for ([`Decoder::close_seen`]).
    fn ended_by(&mut self, event: Result<Incoming, WsError>) -> Result<Incoming, WsError> {
        if event.is_err() {
            self.state = State::Closed;
        }
        event
    }

    fn emit_control<F: FnMut(Incoming)>(&mut self, event: Incoming, f: &mut F) {
        if matches!(event, Incoming::Close(..)) {
            self.close(event, f);
        } else {
            f(event);
        }
    }

    /// Follows a refused stream's frames through `data[pos..]` without judging them, up to
    /// the close frame.
    fn scan<F: FnMut(Incoming)>(&mut self, data: &mut [u8], mut pos: usize, f: &mut F) {
        while pos < data.len() {
            match self.state {
                State::Head { buf, filled } => {
                    let (buf, kept, have) = head_bytes(buf, filled, &data[pos..]);
                    let Some((opcode, mask, len, used)) = any_head(&buf[..have]) else {
                        self.keep_head(buf, have);
                        return;
                    };
                    pos += used.saturating_sub(kept);
                    let part = match u8::try_from(len) {
                        Ok(len) if opcode == 0x8 && usize::from(len) <= MAX_CONTROL => {
                            Part::Control { opcode, len }
                        }
                        _ => Part::Skip {
                            close: opcode == 0x8,
                        },
                    };
                    self.state = State::Payload {
                        part,
                        mask,
                        remaining: usize::try_from(len).unwrap_or(usize::MAX),
                    };
                    self.skip(data, &mut pos, f);
                }
                State::Payload { .. } => self.skip(data, &mut pos, f),
                State::Closed => return,
            }
        }
    }

    /// Passes over what `data[*pos..]` holds of a refused stream's frame; keeps only a close
    /// frame's payload, for its code and reason.
    fn skip<F: FnMut(Incoming)>(&mut self, data: &mut [u8], pos: &mut usize, f: &mut F) {
        let State::Payload {
            part,
            mask,
            remaining,
        } = &mut self.state
        else {
            return;
        };
        let n = (*remaining).min(data.len().saturating_sub(*pos));
        let chunk = &mut data[*pos..*pos + n];
        *remaining -= n;
        *pos += n;
        let (part, done) = (*part, *remaining == 0);
        if let Part::Control { .. } = part {
            unmask(chunk, *mask);
            mask.rotate_left(n % 4);
            self.buf.extend_from_slice(chunk);
        }
        if !done {
            return;
        }
        self.state = START;
        match part {
            Part::Control { .. } => {
                let (code, reason) = match self.buf.as_slice() {
                    [hi, lo, reason @ ..] => (
                        Some(u16::from_be_bytes([*hi, *lo])),
                        String::from_utf8_lossy(reason).into_owned(),
                    ),
                    _ => (None, String::new()),
                };
                self.close(Incoming::Close(code, reason), f);
            }
            Part::Skip { close: true } => self.close(Incoming::Close(None, String::new()), f),
            Part::Data { .. } | Part::Skip { close: false } => {}
        }
    }

    /// A single-frame message that arrived within one read: checked and copied once.
    fn whole_message(
        &mut self,
        kind: Kind,
        compressed: bool,
        payload: &[u8],
    ) -> Result<Bytes, WsError> {
        if compressed {
            let out = self.inflate(payload)?;
            if kind == Kind::Text && std::str::from_utf8(&out).is_err() {
                return Err(WsError::InvalidUtf8);
            }
            Ok(Bytes::from(out))
        } else {
            if kind == Kind::Text && std::str::from_utf8(payload).is_err() {
                return Err(WsError::InvalidUtf8);
            }
            Ok(Bytes::copy_from_slice(payload))
        }
    }

    /// Yields the message kept in `buf`, leaving the buffer unallocated.
    fn finish_message<F: FnMut(Incoming)>(&mut self, f: &mut F) -> Result<(), WsError> {
        let Some(message) = self.message.take() else {
            return Ok(());
        };
        let payload = mem::take(&mut self.buf);
        let payload = if message.compressed {
            let out = self.inflate(&payload)?;
            if message.kind == Kind::Text && std::str::from_utf8(&out).is_err() {
                return Err(WsError::InvalidUtf8);
            }
            out
        } else {
            // Validated as it arrived; what is left unchecked is a cut sequence.
            if message.kind == Kind::Text && message.checked != payload.len() {
                return Err(WsError::InvalidUtf8);
            }
            payload
        };
        f(Incoming::Message(message.kind, Bytes::from(payload)));
        Ok(())
    }

    /// Inflates one compressed message, bounded by `max_message`.
    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, WsError> {
        let max = self.max_message;
        if self.deflate.is_some_and(|d| d.client_no_context_takeover) {
            return inflate_fresh(input, max);
        }
        // The window bits of the client's compressor are at most 15, which 15 reads.
        let z = self
            .inflater
            .get_or_insert_with(|| Box::new(Decompress::new(false)));
        let (out, ended) = inflate_message(z, input, max)?;
        if ended {
            // A final block ends the stream; the next message starts a new one.
            z.reset(false);
        }
        Ok(out)
    }

    /// Heap bytes held for partial frames and messages.
    #[cfg(test)]
    fn retained_bytes(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    const MAX: usize = 1 << 20;

    /// How a test frame writes its payload length.
    #[derive(Clone, Copy)]
    enum Len {
        Minimal,
        U16,
        U64,
    }

    /// A client frame: masked unless told otherwise.
    #[derive(Clone)]
    struct Frame {
        fin: bool,
        rsv: u8,
        opcode: u8,
        payload: Vec<u8>,
        key: Option<[u8; 4]>,
        len: Len,
    }

    impl Frame {
        fn new(opcode: u8, payload: &[u8]) -> Self {
            Frame {
                fin: true,
                rsv: 0,
                opcode,
                payload: payload.to_vec(),
                key: Some(KEY),
                len: Len::Minimal,
            }
        }

        fn text(payload: &[u8]) -> Self {
            Frame::new(0x1, payload)
        }

        fn more(mut self) -> Self {
            self.fin = false;
            self
        }

        fn rsv(mut self, bits: u8) -> Self {
            self.rsv = bits;
            self
        }

        fn unmasked(mut self) -> Self {
            self.key = None;
            self
        }

        fn key(mut self, key: [u8; 4]) -> Self {
            self.key = Some(key);
            self
        }

        fn len(mut self, len: Len) -> Self {
            self.len = len;
            self
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = vec![u8::from(self.fin) << 7 | self.rsv | self.opcode];
            let masked = if self.key.is_some() { 0x80 } else { 0 };
            let n = self.payload.len();
            match self.len {
                Len::Minimal if n <= 125 => out.push(masked | n as u8),
                Len::Minimal if n <= 0xffff => {
                    out.push(masked | 126);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                }
                Len::U16 => {
                    out.push(masked | 126);
                    out.extend_from_slice(&(n as u16).to_be_bytes());
                }
                Len::Minimal | Len::U64 => {
                    out.push(masked | 127);
                    out.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            match self.key {
                Some(key) => {
                    out.extend_from_slice(&key);
                    out.extend(
                        self.payload
                            .iter()
                            .zip(key.iter().cycle())
                            .map(|(b, k)| b ^ k),
                    );
                }
                None => out.extend_from_slice(&self.payload),
            }
            out
        }
    }

    fn stream(frames: &[Frame]) -> Vec<u8> {
        frames.iter().flat_map(Frame::bytes).collect()
    }

    /// Feeds `bytes` cut at `cuts` (ascending), stopping at the first error.
    fn decode_cut(
        dec: &mut Decoder,
        bytes: &[u8],
        cuts: &[usize],
    ) -> (Vec<Incoming>, Result<(), WsError>) {
        let mut scratch = bytes.to_vec();
        let mut events = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&bytes.len()]) {
            if let Err(e) = dec.feed(&mut scratch[start..end], &mut |ev| events.push(ev)) {
                return (events, Err(e));
            }
            start = end;
        }
        (events, Ok(()))
    }

    fn decode_with(
        max: usize,
        deflate: Option<Deflate>,
        bytes: &[u8],
    ) -> (Vec<Incoming>, Result<(), WsError>) {
        decode_cut(&mut Decoder::new(max, deflate), bytes, &[])
    }

    fn decode(bytes: &[u8]) -> (Vec<Incoming>, Result<(), WsError>) {
        decode_with(MAX, None, bytes)
    }

    fn assert_released(dec: &Decoder) {
        assert!(dec.is_idle());
        assert_eq!(dec.retained_bytes(), 0);
    }

    /// Checks that `bytes` decodes to `expected` fed whole, cut in two at many positions and
    /// (when `bytewise`) one byte at a time, leaving the decoder idle with nothing kept.
    fn check_every_cut(
        deflate: Option<Deflate>,
        bytes: &[u8],
        expected: &[Incoming],
        bytewise: bool,
    ) {
        let mut dec = Decoder::new(MAX, deflate);
        let (events, result) = decode_cut(&mut dec, bytes, &[]);
        assert_eq!(result, Ok(()));
        assert_eq!(events, expected);
        assert_released(&dec);

        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
        // Every cut through the heads and the ends of a payload, a stride through the rest
        // (each cut costs a pass over the whole input).
        let cuts: Vec<usize> = (1..bytes.len())
            .filter(|&c| c < 64 || bytes.len() - c < 64 || c % 61 == 0)
            .collect();
        let per = cuts.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for part in cuts.chunks(per) {
                s.spawn(move || {
                    let mut scratch = bytes.to_vec();
                    for &cut in part {
                        scratch.copy_from_slice(bytes);
                        let mut dec = Decoder::new(MAX, deflate);
                        let mut events = Vec::new();
                        let (first, second) = scratch.split_at_mut(cut);
                        let r1 = dec.feed(first, &mut |ev| events.push(ev));
                        let r2 = dec.feed(second, &mut |ev| events.push(ev));
                        assert_eq!((r1, r2), (Ok(()), Ok(())), "cut at {cut}");
                        assert!(events == expected, "cut at {cut}");
                        assert_released(&dec);
                    }
                });
            }
        });

        if bytewise {
            let mut dec = Decoder::new(MAX, deflate);
            let cuts: Vec<usize> = (1..bytes.len()).collect();
            let (events, result) = decode_cut(&mut dec, bytes, &cuts);
            assert_eq!(result, Ok(()));
            assert_eq!(events, expected);
            assert_released(&dec);
        }
    }

    /// Valid UTF-8 of exactly `n` bytes, with characters of every width, so cuts fall inside
    /// them.
    fn text_payload(n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n);
        let mut chars = ['a', 'é', '€', '😀'].iter().cycle();
        let mut utf8 = [0u8; 4];
        while out.len() < n {
            let c = chars.next().unwrap();
            let c = if c.len_utf8() <= n - out.len() {
                *c
            } else {
                'z'
            };
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        }
        out
    }

    fn binary_payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 256) as u8).collect()
    }

    fn protocol(result: Result<(), WsError>) -> bool {
        matches!(result, Err(WsError::Protocol(_)))
    }

    const SIZES: [usize; 6] = [0, 125, 126, 65535, 65536, 70000];

    #[test]
    fn text_messages_of_every_size_and_cut() {
        for n in SIZES {
            let payload = text_payload(n);
            let bytes = Frame::text(&payload).bytes();
            let expected = [Incoming::Message(Kind::Text, Bytes::from(payload))];
            check_every_cut(None, &bytes, &expected, n <= 126);
        }
    }

    #[test]
    fn binary_messages_of_every_size_and_cut() {
        for n in SIZES {
            let payload = binary_payload(n);
            let bytes = Frame::new(0x2, &payload).key([1, 2, 3, 4]).bytes();
            let expected = [Incoming::Message(Kind::Binary, Bytes::from(payload))];
            check_every_cut(None, &bytes, &expected, n <= 126);
        }
    }

    #[test]
    fn several_messages_in_one_read() {
        let bytes = stream(&[
            Frame::text(b"one"),
            Frame::new(0x2, &[0, 1, 2]),
            Frame::text(b""),
        ]);
        let (events, result) = decode(&bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(
            events,
            [
                Incoming::Message(Kind::Text, Bytes::from_static(b"one")),
                Incoming::Message(Kind::Binary, Bytes::from_static(&[0, 1, 2])),
                Incoming::Message(Kind::Text, Bytes::new()),
            ]
        );
    }

    #[test]
    fn non_minimal_lengths_are_accepted() {
        for len in [Len::U16, Len::U64] {
            let (events, result) = decode(&Frame::text(b"hello").len(len).bytes());
            assert_eq!(result, Ok(()));
            assert_eq!(
                events,
                [Incoming::Message(Kind::Text, Bytes::from_static(b"hello"))]
            );
        }
    }

    #[test]
    fn fragments_with_control_frames_between() {
        let bytes = stream(&[
            Frame::text("Hello, 😀".as_bytes()).more(),
            Frame::new(0x9, b"p1"),
            Frame::new(0x0, b" wor").more().key([9, 8, 7, 6]),
            Frame::new(0xA, b"pong"),
            Frame::new(0x9, b""),
            Frame::new(0x0, b"ld"),
            Frame::new(0x2, &[0xff]).more(),
            Frame::new(0x9, &[0x55; 125]),
            Frame::new(0x0, &[0xfe]),
        ]);
        let expected = [
            Incoming::Ping(Bytes::from_static(b"p1")),
            Incoming::Pong,
            Incoming::Ping(Bytes::new()),
            Incoming::Message(Kind::Text, Bytes::from("Hello, 😀 world")),
            Incoming::Ping(Bytes::from(vec![0x55; 125])),
            Incoming::Message(Kind::Binary, Bytes::from_static(&[0xff, 0xfe])),
        ];
        check_every_cut(None, &bytes, &expected, true);
    }

    #[test]
    fn ping_is_yielded_before_the_message_completes() {
        let mut dec = Decoder::new(MAX, None);
        let mut events = Vec::new();
        let mut first = stream(&[Frame::text(b"ab").more(), Frame::new(0x9, b"x")]);
        dec.feed(&mut first, &mut |ev| events.push(ev)).unwrap();
        assert_eq!(events, [Incoming::Ping(Bytes::from_static(b"x"))]);
        assert!(!dec.is_idle());
        let mut last = Frame::new(0x0, b"c").bytes();
        dec.feed(&mut last, &mut |ev| events.push(ev)).unwrap();
        assert_eq!(
            events[1],
            Incoming::Message(Kind::Text, Bytes::from_static(b"abc"))
        );
        assert_released(&dec);
    }

    #[test]
    fn protocol_violations() {
        let deflate = Some(Deflate {
            server_max_window_bits: 15,
            server_no_context_takeover: true,
            client_no_context_takeover: true,
        });
        let mut cases: Vec<(&str, Option<Deflate>, Vec<u8>)> = vec![
            ("unmasked", None, Frame::text(b"hi").unmasked().bytes()),
            (
                "unmasked ping",
                None,
                Frame::new(0x9, b"").unmasked().bytes(),
            ),
            ("RSV2", None, Frame::text(b"hi").rsv(0x20).bytes()),
            ("RSV3", None, Frame::text(b"hi").rsv(0x10).bytes()),
            (
                "RSV2 with deflate",
                deflate,
                Frame::text(b"hi").rsv(0x20).bytes(),
            ),
            (
                "RSV1 without deflate",
                None,
                Frame::text(b"hi").rsv(0x40).bytes(),
            ),
            (
                "RSV1 on continuation",
                deflate,
                stream(&[
                    Frame::text(&[0x00]).rsv(0x40).more(),
                    Frame::new(0x0, &[]).rsv(0x40),
                ]),
            ),
            (
                "RSV1 on uncompressed continuation",
                deflate,
                stream(&[Frame::text(b"a").more(), Frame::new(0x0, b"b").rsv(0x40)]),
            ),
            (
                "RSV1 on ping",
                deflate,
                Frame::new(0x9, b"").rsv(0x40).bytes(),
            ),
            (
                "RSV1 on close",
                deflate,
                Frame::new(0x8, b"").rsv(0x40).bytes(),
            ),
            (
                "fragmented ping",
                None,
                Frame::new(0x9, b"a").more().bytes(),
            ),
            (
                "fragmented pong",
                None,
                Frame::new(0xA, b"a").more().bytes(),
            ),
            (
                "fragmented close",
                None,
                Frame::new(0x8, &[3, 232]).more().bytes(),
            ),
            ("ping of 126", None, Frame::new(0x9, &[0; 126]).bytes()),
            ("pong of 126", None, Frame::new(0xA, &[0; 126]).bytes()),
            ("close of 126", None, Frame::new(0x8, &[b'a'; 126]).bytes()),
            ("stray continuation", None, Frame::new(0x0, b"a").bytes()),
            (
                "stray final continuation after a message",
                None,
                stream(&[Frame::text(b"a"), Frame::new(0x0, b"b")]),
            ),
            (
                "text inside a fragmented message",
                None,
                stream(&[Frame::text(b"a").more(), Frame::text(b"b")]),
            ),
            (
                "binary inside a fragmented message",
                None,
                stream(&[Frame::new(0x2, b"a").more(), Frame::new(0x2, b"b").more()]),
            ),
            (
                "64-bit length with the top bit",
                None,
                vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4],
            ),
            ("close of 1 byte", None, Frame::new(0x8, &[3]).bytes()),
        ];
        for opcode in (0x3..=0x7).chain(0xB..=0xF) {
            cases.push(("reserved opcode", None, Frame::new(opcode, b"").bytes()));
        }
        for (name, deflate, bytes) in cases {
            let (_, result) = decode_with(MAX, deflate, &bytes);
            assert!(protocol(result), "{name}: {result:?}");
            assert_eq!(result.unwrap_err().close_code(), 1002);
        }
    }

    #[test]
    fn protocol_errors_are_found_from_the_first_two_bytes() {
        let mut dec = Decoder::new(MAX, None);
        let mut bytes = Frame::text(b"hi").unmasked().bytes();
        assert!(protocol(dec.feed(&mut bytes[..2], &mut |_| {})));
        let mut dec = Decoder::new(MAX, None);
        let mut bytes = Frame::new(0x3, b"hi").bytes();
        assert!(protocol(
            dec.feed(&mut bytes[..1], &mut |_| {})
                .and_then(|()| dec.feed(&mut bytes[1..2], &mut |_| {}))
        ));
    }

    fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        Frame::new(0x8, &payload).bytes()
    }

    #[test]
    fn invalid_close_codes() {
        for code in [
            0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let (events, result) = decode(&close_frame(code, b""));
            assert!(protocol(result), "{code}");
            assert!(events.is_empty());
        }
    }

    #[test]
    fn valid_close_codes() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            let (events, result) = decode(&close_frame(code, "bye ✓".as_bytes()));
            assert_eq!(result, Ok(()));
            assert_eq!(events, [Incoming::Close(Some(code), "bye ✓".to_owned())]);
        }
        let (events, result) = decode(&Frame::new(0x8, b"").bytes());
        assert_eq!(result, Ok(()));
        assert_eq!(events, [Incoming::Close(None, String::new())]);
    }

    #[test]
    fn close_cut_inside_a_fragmented_message() {
        let bytes = stream(&[
            Frame::text(b"partial").more(),
            Frame::new(0x8, &[3, 232, b'o', b'k']),
            Frame::new(0x0, b"ignored"),
        ]);
        let expected = [Incoming::Close(Some(1000), "ok".to_owned())];
        check_every_cut(None, &bytes, &expected, true);
    }

    /// Autobahn 6.3.1: valid text but for an encoded surrogate.
    const BAD_TEXT: [u8; 20] = [
        0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80, 0x65,
        0x64, 0x69, 0x74, 0x65, 0x64,
    ];

    #[test]
    fn invalid_text_in_one_frame() {
        let (events, result) = decode(&Frame::text(&BAD_TEXT).bytes());
        assert_eq!(result, Err(WsError::InvalidUtf8));
        assert!(events.is_empty());
        assert_eq!(WsError::InvalidUtf8.close_code(), 1007);
        // Binary is not text.
        let (_, result) = decode(&Frame::new(0x2, &BAD_TEXT).bytes());
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn invalid_text_fails_before_the_final_fragment() {
        let mut dec = Decoder::new(MAX, None);
        let mut first = Frame::text(&BAD_TEXT).more().bytes();
        assert_eq!(dec.feed(&mut first, &mut |_| {}), Err(WsError::InvalidUtf8));
        assert_released(&dec);

        // Within one frame cut by a read, too: the rest of the frame never arrives.
        let mut payload = BAD_TEXT.to_vec();
        payload.extend_from_slice(&[b'x'; 1000]);
        let mut bytes = Frame::text(&payload).bytes();
        let mut dec = Decoder::new(MAX, None);
        assert_eq!(
            dec.feed(&mut bytes[..40], &mut |_| {}),
            Err(WsError::InvalidUtf8)
        );
    }

    #[test]
    fn char_split_across_fragments_is_valid() {
        let smile = "😀".as_bytes();
        let bytes = stream(&[
            Frame::text(&[b'a', smile[0]]).more(),
            Frame::new(0x0, &smile[1..2]).more(),
            Frame::new(0x0, &[smile[2], smile[3], b'b']),
        ]);
        let expected = [Incoming::Message(Kind::Text, Bytes::from("a😀b"))];
        check_every_cut(None, &bytes, &expected, true);
    }

    #[test]
    fn truncated_sequence_at_the_end_is_invalid() {
        let smile = "😀".as_bytes();
        let (_, result) = decode(&Frame::text(&[b'a', smile[0], smile[1]]).bytes());
        assert_eq!(result, Err(WsError::InvalidUtf8));
        let bytes = stream(&[Frame::text(b"a").more(), Frame::new(0x0, &smile[..3])]);
        let (_, result) = decode(&bytes);
        assert_eq!(result, Err(WsError::InvalidUtf8));
        // Cut by reads, the same.
        let mut dec = Decoder::new(MAX, None);
        let (_, result) = decode_cut(&mut dec, &bytes, &[3, 8, 10]);
        assert_eq!(result, Err(WsError::InvalidUtf8));
    }

    #[test]
    fn invalid_close_reason() {
        let (events, result) = decode(&close_frame(1000, &[b'o', 0xff]));
        assert_eq!(result, Err(WsError::InvalidUtf8));
        assert!(events.is_empty());
    }

    #[test]
    fn declared_length_over_the_limit_is_refused_at_the_head() {
        let mut dec = Decoder::new(1000, None);
        let bytes = Frame::new(0x2, &[0; 1001]).bytes();
        let mut head = bytes[..8].to_vec();
        assert_eq!(dec.feed(&mut head, &mut |_| {}), Err(WsError::TooBig));
        assert_eq!(WsError::TooBig.close_code(), 1009);
        assert_eq!(dec.retained_bytes(), 0);
        // Exactly the limit is fine.
        let (_, result) = decode_with(1000, None, &Frame::new(0x2, &[0; 1000]).bytes());
        assert_eq!(result, Ok(()));
        // A length beyond any buffer.
        let huge = [
            0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
        ];
        let (_, result) = decode(&huge);
        assert_eq!(result, Err(WsError::TooBig));
    }

    #[test]
    fn fragments_summing_over_the_limit() {
        let bytes = stream(&[
            Frame::new(0x2, &[0; 600]).more(),
            Frame::new(0x9, b"ok"),
            Frame::new(0x0, &[0; 401]),
        ]);
        let (events, result) = decode_with(1000, None, &bytes);
        assert_eq!(result, Err(WsError::TooBig));
        assert_eq!(events, [Incoming::Ping(Bytes::from_static(b"ok"))]);
        let bytes = stream(&[
            Frame::new(0x2, &[0; 600]).more(),
            Frame::new(0x0, &[0; 400]),
        ]);
        let (_, result) = decode_with(1000, None, &bytes);
        assert_eq!(result, Ok(()));
    }

    // --- permessage-deflate ---

    fn terms(bits: u8, client_no_context_takeover: bool) -> Deflate {
        Deflate {
            server_max_window_bits: bits,
            server_no_context_takeover: true,
            client_no_context_takeover,
        }
    }

    /// A client's compressor: raw deflate, sync flush, tail stripped.
    struct Client(Compress);

    impl Client {
        fn new(bits: u8) -> Self {
            Client(Compress::new_with_window_bits(
                Compression::default(),
                false,
                bits,
            ))
        }

        fn compress(&mut self, payload: &[u8]) -> Vec<u8> {
            deflate_message(&mut self.0, payload).unwrap()
        }
    }

    fn sample_text(n: usize) -> Vec<u8> {
        let words = [
            "herald ",
            "pushes ",
            "messages ",
            "to ",
            "clients ",
            "fast ",
            "✓ ",
        ];
        let mut out = Vec::new();
        let mut i = 0usize;
        while out.len() < n {
            out.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
            i += 1;
        }
        out
    }

    #[test]
    fn compress_round_trip() {
        for bits in [9, 12, 15] {
            for client_nct in [true, false] {
                let terms = terms(bits, client_nct);
                for payload in [
                    Vec::new(),
                    b"x".to_vec(),
                    sample_text(20_000),
                    binary_payload(70_000),
                ] {
                    let compressed = compress(&payload, &terms);
                    if payload.is_empty() {
                        assert_eq!(compressed, [0x00]);
                    }
                    let kind = if payload.len() == 20_000 { 0x1 } else { 0x2 };
                    let bytes = Frame::new(kind, &compressed).rsv(0x40).bytes();
                    let (events, result) = decode_with(MAX, Some(terms), &bytes);
                    assert_eq!(result, Ok(()));
                    let kind = if kind == 0x1 {
                        Kind::Text
                    } else {
                        Kind::Binary
                    };
                    assert_eq!(events, [Incoming::Message(kind, Bytes::from(payload))]);
                }
            }
        }
        let text = sample_text(20_000);
        assert!(compress(&text, &terms(15, true)).len() < text.len() / 4);
    }

    #[test]
    fn compress_resets_between_messages() {
        let terms = terms(9, true);
        let text = sample_text(3000);
        let first = compress(&text, &terms);
        assert_eq!(compress(&text, &terms), first);
        // Another window size in between does not disturb either.
        let other = compress(&text, &super::tests::terms(15, true));
        assert_eq!(compress(&text, &terms), first);
        assert_eq!(compress(&text, &super::tests::terms(15, true)), other);
    }

    #[test]
    fn stored_blocks_decode() {
        for n in [0, 10, 0xffff, 0x1_0000 + 7] {
            let payload = binary_payload(n);
            let bytes = Frame::new(0x2, &stored_blocks(&payload)).rsv(0x40).bytes();
            for nct in [true, false] {
                let (events, result) = decode_with(MAX, Some(terms(15, nct)), &bytes);
                assert_eq!(result, Ok(()));
                assert_eq!(
                    events,
                    [Incoming::Message(
                        Kind::Binary,
                        Bytes::from(payload.clone())
                    )]
                );
            }
        }
    }

    #[test]
    fn client_context_takeover_across_messages() {
        let text = sample_text(4000);
        let mut client = Client::new(15);
        let first = client.compress(&text);
        let second = client.compress(&text);
        // The second message is mostly a reference to the first.
        assert!(second.len() < 64, "{}", second.len());
        let bytes = stream(&[
            Frame::text(&first).rsv(0x40),
            Frame::new(0x9, b"between"),
            Frame::text(&second).rsv(0x40),
        ]);
        let message = Incoming::Message(Kind::Text, Bytes::from(text.clone()));
        let expected = [
            message,
            Incoming::Ping(Bytes::from_static(b"between")),
            Incoming::Message(Kind::Text, Bytes::from(text)),
        ];
        check_every_cut(Some(terms(15, false)), &bytes, &expected, false);

        // A decoder that resets per message cannot read the second one.
        let (events, result) = decode_with(MAX, Some(terms(15, true)), &bytes);
        assert_eq!(events.len(), 2);
        assert!(protocol(result));
    }

    #[test]
    fn client_resets_per_message() {
        for bits in [9, 15] {
            let text = sample_text(5000);
            let mut client = Client::new(bits);
            let first = client.compress(&text);
            client.0.reset();
            let second = client.compress(&text);
            assert_eq!(first, second);
            let bytes = stream(&[
                Frame::text(&first).rsv(0x40),
                Frame::text(&second).rsv(0x40),
            ]);
            let mut dec = Decoder::new(MAX, Some(terms(15, true)));
            let (events, result) = decode_cut(&mut dec, &bytes, &[]);
            assert_eq!(result, Ok(()));
            assert_eq!(events.len(), 2);
            assert!(
                events
                    .iter()
                    .all(|e| *e == Incoming::Message(Kind::Text, Bytes::from(text.clone())))
            );
            // Nothing kept for the connection: the thread's decompressor did the work.
            assert!(dec.inflater.is_none());
            assert_released(&dec);
        }
    }

    #[test]
    fn compressed_fragments_with_controls_between() {
        let text = sample_text(3000);
        let compressed = Client::new(15).compress(&text);
        let third = compressed.len() / 3;
        let bytes = stream(&[
            Frame::text(&compressed[..third]).rsv(0x40).more(),
            Frame::new(0x9, b"a"),
            Frame::new(0x0, &compressed[third..2 * third]).more(),
            Frame::new(0xA, b""),
            Frame::new(0x0, &compressed[2 * third..]),
        ]);
        let expected = [
            Incoming::Ping(Bytes::from_static(b"a")),
            Incoming::Pong,
            Incoming::Message(Kind::Text, Bytes::from(text)),
        ];
        for nct in [true, false] {
            check_every_cut(Some(terms(15, nct)), &bytes, &expected, true);
        }
    }

    #[test]
    fn compressed_empty_message() {
        let bytes = Frame::text(&[0x00]).rsv(0x40).bytes();
        let (events, result) = decode_with(MAX, Some(terms(15, true)), &bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(events, [Incoming::Message(Kind::Text, Bytes::new())]);
        // Compressed and empty: the payload is only the sync flush's first byte.
        let bytes = Frame::new(0x2, &Client::new(15).compress(b""))
            .rsv(0x40)
            .bytes();
        let (events, result) = decode_with(MAX, Some(terms(15, false)), &bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(events, [Incoming::Message(Kind::Binary, Bytes::new())]);
    }

    #[test]
    fn deflate_bomb_is_refused() {
        let zeros = vec![0u8; 1 << 20];
        let compressed = Client::new(15).compress(&zeros);
        assert!(compressed.len() < 4096);
        for nct in [true, false] {
            let bytes = Frame::new(0x2, &compressed).rsv(0x40).bytes();
            let (events, result) = decode_with(64 * 1024, Some(terms(15, nct)), &bytes);
            assert_eq!(result, Err(WsError::TooBig));
            assert!(events.is_empty());
            // Exactly the limit inflates.
            let exact = Client::new(15).compress(&zeros[..64 * 1024]);
            let bytes = Frame::new(0x2, &exact).rsv(0x40).bytes();
            let (events, result) = decode_with(64 * 1024, Some(terms(15, nct)), &bytes);
            assert_eq!(result, Ok(()));
            assert_eq!(
                events,
                [Incoming::Message(
                    Kind::Binary,
                    Bytes::from(zeros[..64 * 1024].to_vec())
                )]
            );
        }
    }

    #[test]
    fn corrupt_and_invalid_compressed_messages() {
        // Block type 3 is invalid.
        let bytes = Frame::text(&[0xff, 0xff, 0xff]).rsv(0x40).bytes();
        for nct in [true, false] {
            let (_, result) = decode_with(MAX, Some(terms(15, nct)), &bytes);
            assert!(protocol(result), "{result:?}");
        }
        // Valid deflate, invalid text.
        let compressed = Client::new(15).compress(&BAD_TEXT);
        let bytes = Frame::text(&compressed).rsv(0x40).bytes();
        let (_, result) = decode_with(MAX, Some(terms(15, true)), &bytes);
        assert_eq!(result, Err(WsError::InvalidUtf8));
        // The same bytes as binary are fine.
        let bytes = Frame::new(0x2, &compressed).rsv(0x40).bytes();
        let (_, result) = decode_with(MAX, Some(terms(15, true)), &bytes);
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn final_block_ends_the_stream_cleanly() {
        // A client may end a message with a final block (RFC 7692 section 7.2.3.3).
        let mut z = Compress::new(Compression::default(), false);
        let mut first = Vec::with_capacity(256);
        z.compress_vec(b"Hello", &mut first, FlushCompress::Finish)
            .unwrap();
        let bytes = stream(&[
            Frame::text(&first).rsv(0x40),
            Frame::text(&compress(b"again", &terms(15, false))).rsv(0x40),
        ]);
        let (events, result) = decode_with(MAX, Some(terms(15, false)), &bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(
            events,
            [
                Incoming::Message(Kind::Text, Bytes::from_static(b"Hello")),
                Incoming::Message(Kind::Text, Bytes::from_static(b"again")),
            ]
        );
    }

    #[test]
    fn parses_response_terms() {
        assert_eq!(
            Deflate::from_response(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"
            ),
            Some(Deflate {
                server_max_window_bits: 9,
                server_no_context_takeover: true,
                client_no_context_takeover: true,
            })
        );
        assert_eq!(
            Deflate::from_response("permessage-deflate"),
            Some(Deflate {
                server_max_window_bits: 15,
                server_no_context_takeover: false,
                client_no_context_takeover: false,
            })
        );
        assert_eq!(
            Deflate::from_response(
                "Permessage-Deflate;server_max_window_bits=\"12\";client_max_window_bits=10"
            ),
            Some(Deflate {
                server_max_window_bits: 12,
                server_no_context_takeover: false,
                client_no_context_takeover: false,
            })
        );
        let bits = |v: &str| Deflate::from_response(v).map(|d| d.server_max_window_bits);
        assert_eq!(
            bits("permessage-deflate; server_max_window_bits=8"),
            Some(9)
        );
        assert_eq!(
            bits("permessage-deflate; server_max_window_bits=16"),
            Some(15)
        );
        assert_eq!(
            bits("permessage-deflate; server_max_window_bits=99999999999999999999"),
            Some(15)
        );
        assert_eq!(bits("permessage-deflate; server_max_window_bits"), Some(15));
        assert_eq!(
            bits("x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=10"),
            Some(10)
        );
        assert_eq!(Deflate::from_response(""), None);
        assert_eq!(Deflate::from_response("x-webkit-deflate-frame"), None);
        assert_eq!(Deflate::from_response("permessage-deflateX"), None);
    }

    #[test]
    fn frame_heads() {
        let head = |op, compressed, len| {
            let (bytes, n) = frame_head(op, compressed, len);
            bytes[..n].to_vec()
        };
        assert_eq!(head(OpCode::Text, false, 0), [0x81, 0]);
        assert_eq!(head(OpCode::Binary, true, 125), [0xC2, 125]);
        assert_eq!(head(OpCode::Binary, false, 126), [0x82, 126, 0, 126]);
        assert_eq!(head(OpCode::Text, false, 65535), [0x81, 126, 0xff, 0xff]);
        assert_eq!(
            head(OpCode::Text, true, 65536),
            [0xC1, 127, 0, 0, 0, 0, 0, 1, 0, 0]
        );
        assert_eq!(head(OpCode::Close, false, 2), [0x88, 2]);
        assert_eq!(head(OpCode::Ping, false, 0), [0x89, 0]);
        assert_eq!(head(OpCode::Pong, false, 1), [0x8A, 1]);
    }

    #[test]
    fn close_payloads() {
        assert_eq!(close_payload(1000, ""), [0x03, 0xe8]);
        assert_eq!(close_payload(1009, "big"), [0x03, 0xf1, b'b', b'i', b'g']);
        // 200 bytes of two-byte chars: 123 would cut one, so 122 are kept.
        let reason = "é".repeat(100);
        let payload = close_payload(1002, &reason);
        assert_eq!(payload.len(), 124);
        assert_eq!(std::str::from_utf8(&payload[2..]).unwrap(), "é".repeat(61));
        let payload = close_payload(1002, &"a".repeat(300));
        assert_eq!(payload.len(), 125);
    }

    #[test]
    fn nothing_after_close() {
        let mut dec = Decoder::new(MAX, None);
        let mut bytes = stream(&[
            Frame::new(0x8, &[3, 232]),
            Frame::text(b"after"),
            Frame::new(0x9, b""),
        ]);
        let mut events = Vec::new();
        assert_eq!(dec.feed(&mut bytes, &mut |ev| events.push(ev)), Ok(()));
        assert_eq!(events, [Incoming::Close(Some(1000), String::new())]);
        let mut more = Frame::text(b"more").bytes();
        assert_eq!(dec.feed(&mut more, &mut |ev| events.push(ev)), Ok(()));
        assert_eq!(dec.feed(&mut [0xff; 3], &mut |ev| events.push(ev)), Ok(()));
        assert_eq!(events.len(), 1);
        assert_released(&dec);
    }

    #[test]
    fn nothing_after_an_error() {
        let mut dec = Decoder::new(MAX, None);
        let mut events = Vec::new();
        let mut bad = Frame::new(0x0, b"x").bytes();
        assert!(protocol(dec.feed(&mut bad, &mut |ev| events.push(ev))));
        for _ in 0..3 {
            let mut good = Frame::text(b"fine").bytes();
            assert_eq!(dec.feed(&mut good, &mut |ev| events.push(ev)), Ok(()));
            assert_eq!(dec.feed(&mut [], &mut |ev| events.push(ev)), Ok(()));
            assert_eq!(dec.feed(&mut [0xff; 20], &mut |ev| events.push(ev)), Ok(()));
        }
        assert!(events.is_empty());
        // Refused, the stream is followed but nothing of it is kept.
        assert_eq!(dec.retained_bytes(), 0);
    }

    /// Feeds `reads` after `drain_mode`, returning the events.
    fn drain(dec: &mut Decoder, reads: &[Vec<u8>]) -> Vec<Incoming> {
        dec.drain_mode();
        let mut events = Vec::new();
        for read in reads {
            let mut read = read.clone();
            assert_eq!(dec.feed(&mut read, &mut |ev| events.push(ev)), Ok(()));
        }
        events
    }

    #[test]
    fn drain_after_a_refusal_finds_the_close() {
        let tail = Frame::text(b"after the close").bytes();
        let mut after = stream(&[
            Frame::text(b"skipped"),
            Frame::new(0x9, b"skipped"),
            Frame::new(0x2, &[0; 300]).more(),
            Frame::new(0x8, &[3, 232, b'b', b'y', b'e']),
        ]);
        after.extend_from_slice(&tail);
        let refused = [
            Frame::new(0x3, b"reserved opcode with a payload").bytes(),
            Frame::text(b"unmasked, then resynchronised")
                .unmasked()
                .bytes(),
            Frame::new(0x0, b"stray").bytes(),
            Frame::text(&BAD_TEXT).more().bytes(),
        ];
        for bad in refused {
            let mut bytes = bad.clone();
            bytes.extend_from_slice(&after);
            let close_end = bytes.len() - tail.len();
            for cut in 1..bytes.len() {
                let mut dec = Decoder::new(MAX, None);
                let mut first = bytes[..cut].to_vec();
                let mut second = bytes[cut..].to_vec();
                let mut events = Vec::new();
                if dec.feed(&mut first, &mut |ev| events.push(ev)).is_ok() {
                    // Too little of the refused frame to tell: the next read refuses it and
                    // its close frame, in the refused read, ends the stream silently.
                    assert!(dec.feed(&mut second, &mut |ev| events.push(ev)).is_err());
                    // ... which the socket learns from close_seen, so it does not wait on.
                    assert!(dec.close_seen(), "cut at {cut}");
                    assert!(drain(&mut dec, &[Frame::new(0x8, b"").bytes()]).is_empty());
                } else {
                    assert_eq!(dec.close_seen(), close_end <= cut, "cut at {cut}");
                    let drained = drain(&mut dec, &[second]);
                    if close_end > cut {
                        let bye = Incoming::Close(Some(1000), "bye".to_owned());
                        assert_eq!(drained, [bye], "cut at {cut}");
                    } else {
                        assert!(drained.is_empty(), "cut at {cut}");
                    }
                    assert!(dec.close_seen(), "cut at {cut}");
                }
                assert!(events.is_empty(), "cut at {cut}");
                assert_released(&dec);
            }
        }
    }

    #[test]
    fn a_refused_close_frame_ends_the_stream() {
        let after = stream(&[Frame::text(b"after the close"), Frame::new(0x8, &[3, 232])]);
        let refused = [
            Frame::new(0x8, &[0x03, 0xed]),       // 1005 is never sent
            Frame::new(0x8, &[0x03]),             // a 1-byte payload
            Frame::new(0x8, &[0x03, 0xe8, 0xff]), // reason not UTF-8
        ];
        for bad in refused {
            let mut bytes = bad.bytes();
            let close_end = bytes.len();
            bytes.extend_from_slice(&after);
            for cut in 1..bytes.len() {
                let mut dec = Decoder::new(MAX, None);
                let mut events = Vec::new();
                let mut first = bytes[..cut].to_vec();
                let mut second = bytes[cut..].to_vec();
                let r1 = dec.feed(&mut first, &mut |ev| events.push(ev));
                let r2 = dec.feed(&mut second, &mut |ev| events.push(ev));
                assert!(r1.is_err() != r2.is_err(), "cut at {cut}");
                assert_eq!(r1.is_err(), cut >= close_end, "cut at {cut}");
                // Nothing after the client's close is read: there is no other to wait for.
                assert!(events.is_empty(), "cut at {cut}");
                assert!(dec.close_seen(), "cut at {cut}");
                assert!(drain(&mut dec, &[Frame::new(0x8, b"").bytes()]).is_empty());
                assert_released(&dec);
            }
        }
    }

    #[test]
    fn drain_after_a_refused_payload_keeps_frame_sync() {
        // Invalid text early in a large frame; the rest of the frame comes later.
        let mut payload = BAD_TEXT.to_vec();
        payload.extend_from_slice(&[0x80; 5000]);
        let mut bytes = Frame::text(&payload).bytes();
        bytes.extend_from_slice(&stream(&[
            Frame::new(0x9, b"p"),
            Frame::new(0x8, &[0x0f, 0xa0, 0xff]), // 4000, reason not UTF-8
        ]));
        let mut dec = Decoder::new(MAX, None);
        let mut first = bytes[..100].to_vec();
        assert_eq!(dec.feed(&mut first, &mut |_| {}), Err(WsError::InvalidUtf8));
        let reads: Vec<Vec<u8>> = bytes[100..].chunks(7).map(<[u8]>::to_vec).collect();
        let events = drain(&mut dec, &reads);
        assert_eq!(events, [Incoming::Close(Some(4000), "\u{fffd}".to_owned())]);

        // A frame refused on its declared length is passed over as it arrives.
        let mut bytes = Frame::new(0x2, &[7; 3000]).bytes();
        bytes.extend_from_slice(&Frame::new(0x8, b"").bytes());
        let mut dec = Decoder::new(1000, None);
        let mut first = bytes[..500].to_vec();
        assert_eq!(dec.feed(&mut first, &mut |_| {}), Err(WsError::TooBig));
        assert_eq!(dec.retained_bytes(), 0);
        let events = drain(
            &mut dec,
            &[bytes[500..2000].to_vec(), bytes[2000..].to_vec()],
        );
        assert_eq!(events, [Incoming::Close(None, String::new())]);
    }

    #[test]
    fn drain_without_a_refusal() {
        // The server closes first: the rest of a fragmented message is passed over.
        let bytes = stream(&[
            Frame::text(b"start").more(),
            Frame::new(0x0, b"end"),
            Frame::new(0x8, &[3, 233]),
        ]);
        let mut dec = Decoder::new(MAX, None);
        let mut first = bytes[..10].to_vec();
        dec.feed(&mut first, &mut |_| {}).unwrap();
        assert!(!dec.is_idle());
        let events = drain(&mut dec, &[bytes[10..].to_vec()]);
        assert_eq!(events, [Incoming::Close(Some(1001), String::new())]);
        assert_released(&dec);

        // A close frame cut by the read keeps what arrived of it.
        let close = Frame::new(0x8, &[3, 232, b'o', b'k']).bytes();
        let mut dec = Decoder::new(MAX, None);
        let mut first = stream(&[Frame::text(b"a").more()]);
        first.extend_from_slice(&close[..8]);
        dec.feed(&mut first, &mut |_| {}).unwrap();
        let events = drain(&mut dec, &[close[8..].to_vec()]);
        assert_eq!(events, [Incoming::Close(Some(1000), "ok".to_owned())]);

        // An oversized close frame still ends the stream.
        let mut dec = Decoder::new(MAX, None);
        let events = drain(&mut dec, &[Frame::new(0x8, &[b'x'; 200]).bytes()]);
        assert_eq!(events, [Incoming::Close(None, String::new())]);
    }

    #[test]
    fn idle_decoder_is_small() {
        assert!(size_of::<Decoder>() <= 96, "{}", size_of::<Decoder>());
        let dec = Decoder::new(MAX, Some(terms(15, false)));
        assert_released(&dec);
        assert!(dec.inflater.is_none());
    }

    #[test]
    fn partial_frames_keep_only_what_arrived() {
        let payload = binary_payload(1 << 20);
        let mut bytes = Frame::new(0x2, &payload).bytes();
        let mut dec = Decoder::new(2 << 20, None);
        dec.feed(&mut bytes[..1000], &mut |_| {}).unwrap();
        assert!(!dec.is_idle());
        assert!(dec.retained_bytes() < 4096, "{}", dec.retained_bytes());
        // A cut head is kept inline.
        let mut dec = Decoder::new(MAX, None);
        let mut small = Frame::text(b"hi").bytes();
        dec.feed(&mut small[..3], &mut |_| {}).unwrap();
        assert!(!dec.is_idle());
        assert_eq!(dec.retained_bytes(), 0);
        let mut events = Vec::new();
        dec.feed(&mut small[3..], &mut |ev| events.push(ev))
            .unwrap();
        assert_eq!(
            events,
            [Incoming::Message(Kind::Text, Bytes::from_static(b"hi"))]
        );
        assert_released(&dec);
    }

    #[test]
    fn unmask_matches_bytewise_at_every_length() {
        for n in 0..40 {
            let original = binary_payload(n);
            let mut fast = original.clone();
            unmask(&mut fast, KEY);
            let slow: Vec<u8> = original
                .iter()
                .zip(KEY.iter().cycle())
                .map(|(b, k)| b ^ k)
                .collect();
            assert_eq!(fast, slow);
        }
    }
}
