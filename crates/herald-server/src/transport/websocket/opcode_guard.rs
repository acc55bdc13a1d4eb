//! Reserved opcodes close with 1002, as RFC 6455 wants.
//!
//! yawc answers a frame with a reserved opcode (non-control 0x3–0x7, control 0xB–0xF) with
//! 1003, and a frame with RSV2 or RSV3 set with 1002; it checks the reserved bits first.
//! [`OpcodeGuard`] sits between the upgraded socket (after TLS) and yawc, follows the frame
//! boundaries of what the client sends and sets RSV2 in the first header byte of a frame
//! whose opcode is reserved, so yawc refuses that frame as a protocol error: 1002. Every
//! other byte passes through untouched (RSV1, permessage-deflate's bit, included).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// RSV2, the bit yawc refuses with 1002.
const RSV2: u8 = 0x20;

/// Whether a frame's opcode is reserved by RFC 6455 (section 5.2).
fn is_reserved(opcode: u8) -> bool {
    matches!(opcode, 0x3..=0x7 | 0xB..=0xF)
}

/// Where the client's byte stream is within its frames: a few bytes inline, no buffer, so an
/// idle connection pays nothing for it.
#[derive(Debug, Default)]
struct Scanner {
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// The payload length being read from the current header.
    len: u64,
    /// Header bytes of the current frame seen so far (0: the next byte starts a frame).
    at: u8,
    /// Where the length fields of the header end (known from its second byte).
    len_end: u8,
    /// Where the header ends: length fields, then the mask key if the frame is masked.
    header_end: u8,
}

impl Scanner {
    /// Follows `buf`, the next bytes from the client, flagging reserved opcodes in place.
    /// Reads may split anywhere, headers included; only the position is carried over.
    fn scan(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            if self.payload_left > 0 {
                let rest = buf.len() - i;
                let n = usize::try_from(self.payload_left).map_or(rest, |left| left.min(rest));
                i += n;
                self.payload_left -= n as u64;
                continue;
            }
            let b = buf[i];
            match self.at {
                0 if is_reserved(b & 0x0F) => buf[i] = b | RSV2,
                0 => {}
                1 => {
                    let code = b & 0x7F;
                    let extended = match code {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    let mask = if b & 0x80 != 0 { 4 } else { 0 };
                    self.len_end = 2 + extended;
                    self.header_end = self.len_end + mask;
                    self.len = if extended == 0 { u64::from(code) } else { 0 };
                }
                at if at < self.len_end => self.len = (self.len << 8) | u64::from(b),
                // The mask key.
                _ => {}
            }
            self.at += 1;
            i += 1;
            if self.at >= 2 && self.at == self.header_end {
                *self = Self {
                    payload_left: self.len,
                    ..Self::default()
                };
            }
        }
    }
}

/// The client's side of a WebSocket as yawc reads it: see the module documentation. Writes
/// pass through.
pub struct OpcodeGuard<S> {
    inner: S,
    scanner: Scanner,
}

impl<S> OpcodeGuard<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            scanner: Scanner::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for OpcodeGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        // Only the bytes this read added: earlier ones were scanned when they came.
        this.scanner.scan(&mut buf.filled_mut()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OpcodeGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A frame as a client sends it: `first` is the FIN/RSV/opcode byte.
    fn frame(first: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
        let mask_bit = if masked { 0x80 } else { 0 };
        let mut f = vec![first];
        let n = payload.len();
        if n < 126 {
            f.push(mask_bit | n as u8);
        } else if n <= 0xffff {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        if masked {
            f.extend_from_slice(&MASK);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }

    /// Scans `stream` in the given pieces and returns what yawc would read.
    fn scan_in(stream: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = stream.to_vec();
        let mut s = Scanner::default();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            s.scan(&mut out[from..cut]);
            from = cut;
        }
        out
    }

    /// Payloads that look like headers with reserved opcodes, so a scanner that lost the
    /// frame boundaries would change them.
    fn tricky(n: usize) -> Vec<u8> {
        (0..n).map(|i| [0x83, 0x8B, 0x0F, 0xFF][i % 4]).collect()
    }

    fn valid_stream() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(frame(0x81, true, b"hello"));
        v.extend(frame(0xC1, true, &tricky(40))); // RSV1: a compressed message
        v.extend(frame(0x02, true, &tricky(200))); // 16-bit length, not final
        v.extend(frame(0x89, true, b"")); // ping, empty
        v.extend(frame(0x80, true, &tricky(70_000))); // 64-bit length, continuation
        v.extend(frame(0x8A, true, b"pong"));
        v.extend(frame(0x82, false, &tricky(3))); // unmasked: yawc refuses it, not this
        v.extend(frame(0x88, true, &[0x03, 0xE8]));
        v
    }

    #[test]
    fn reserved_opcodes_are_exactly_the_rfc_ones() {
        let reserved: Vec<u8> = (0..16).filter(|&o| is_reserved(o)).collect();
        assert_eq!(reserved, [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]);
    }

    #[test]
    fn valid_frames_pass_byte_identical() {
        let stream = valid_stream();
        assert_eq!(scan_in(&stream, &[]), stream);
        // One byte at a time.
        let cuts: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(scan_in(&stream, &cuts), stream);
    }

    #[test]
    fn reserved_opcodes_set_rsv2_and_nothing_else() {
        for opcode in (0..16u8).filter(|&o| is_reserved(o)) {
            for first in [0x80 | opcode, opcode, 0xC0 | opcode] {
                for len in [5, 300, 70_000] {
                    let mut stream = frame(0x81, true, b"before");
                    let at = stream.len();
                    stream.extend(frame(first, true, &tricky(len)));
                    let next = stream.len();
                    stream.extend(frame(0x81, true, &tricky(9)));
                    let mut expected = stream.clone();
                    expected[at] |= RSV2;
                    // Headers split at every byte boundary of the reserved frame's header
                    // and of the frame after it.
                    for cut in (at..at + 15).chain(next..next + 7) {
                        assert_eq!(scan_in(&stream, &[cut]), expected, "{first:#x} {len} {cut}");
                    }
                    assert_eq!(scan_in(&stream, &[]), expected);
                }
            }
        }
    }

    #[test]
    fn reserved_opcode_after_frames_split_everywhere() {
        // Two cuts at every pair of positions over a stream of valid frames then a reserved
        // one: only the reserved frame's first byte changes.
        let mut stream = Vec::new();
        stream.extend(frame(0x81, true, &tricky(3)));
        stream.extend(frame(0x82, true, &tricky(130)));
        let at = stream.len();
        stream.extend(frame(0x8B, true, b"x"));
        let mut expected = stream.clone();
        expected[at] |= RSV2;
        for a in 0..stream.len() {
            for b in a..stream.len() {
                assert_eq!(scan_in(&stream, &[a, b]), expected, "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn extended_lengths_are_read_whole() {
        // A 64-bit length above 4 GiB: the scanner counts it down without reading it.
        let mut s = Scanner::default();
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&0x1_0000_0005u64.to_be_bytes());
        header.extend_from_slice(&MASK);
        for b in header.chunks_mut(1) {
            s.scan(b);
        }
        assert_eq!(s.payload_left, 0x1_0000_0005);
        // A 16-bit length of exactly 126 and of 0xFFFF.
        for n in [126usize, 0xFFFF] {
            let stream = frame(0x81, true, &tricky(n));
            let mut s = Scanner::default();
            let mut copy = stream[..4].to_vec();
            s.scan(&mut copy);
            assert_eq!(s.payload_left, 0);
            assert_eq!(s.len, n as u64);
        }
    }

    #[tokio::test]
    async fn as_a_stream_it_flags_and_writes_through() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut guard = OpcodeGuard::new(server);
        let mut stream = valid_stream();
        let at = stream.len();
        stream.extend(frame(0x85, true, b"??"));
        let mut expected = stream.clone();
        expected[at] |= RSV2;
        let writer = tokio::spawn(async move {
            // Small writes, so reads split frames.
            for piece in stream.chunks(7) {
                client.write_all(piece).await.unwrap();
            }
            let mut back = [0u8; 3];
            client.read_exact(&mut back).await.unwrap();
            back
        });
        let mut got = vec![0u8; expected.len()];
        guard.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
        guard.write_all(b"out").await.unwrap();
        assert_eq!(&writer.await.unwrap(), b"out");
    }
}
