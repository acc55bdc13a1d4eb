//! The benchmark payload: a JSON object carrying the send time, the per-channel
//! sequence number and the channel index, padded to the requested size.
//!
//! JSON so that Herald can embed it as publication `data` unchanged; the same bytes go
//! to NATS and MQTT so that every server moves identical payloads.

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// What a subscriber recovers from a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct Stamp {
    /// Send time, nanoseconds since the Unix epoch (one machine, one clock).
    pub t: u64,
    /// Sequence number within the channel, from 1.
    pub s: u64,
    /// Channel index.
    pub c: u32,
}

/// Wall-clock nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Appends the payload for `stamp`, padded with `"p":"xxx…"` to `size` bytes when
/// `size` leaves room for the padding field (the stamp alone is 40–60 bytes).
pub fn encode(out: &mut Vec<u8>, stamp: &Stamp, size: usize) {
    let start = out.len();
    // Writing into a Vec cannot fail.
    let _ = write!(out, r#"{{"t":{},"s":{},"c":{}"#, stamp.t, stamp.s, stamp.c);
    let used = out.len() - start;
    // `,"p":""` is 7 bytes and the closing brace one more.
    if size >= used + 8 {
        out.extend_from_slice(br#","p":""#);
        out.resize(out.len() + (size - used - 8), b'x');
        out.push(b'"');
    }
    out.push(b'}');
}

/// Parses a payload; `None` for anything that is not one of ours.
pub fn decode(bytes: &[u8]) -> Option<Stamp> {
    serde_json::from_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_size() {
        let st = Stamp {
            t: 1_763_000_000_123_456_789,
            s: 42,
            c: 7,
        };
        for size in [0, 10, 60, 128, 1000] {
            let mut v = Vec::new();
            encode(&mut v, &st, size);
            if size >= 60 {
                assert_eq!(v.len(), size);
            }
            assert_eq!(decode(&v), Some(st));
        }
        assert_eq!(decode(b"{\"x\":1}"), None);
        assert_eq!(decode(b"garbage"), None);
    }
}
