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

/// Channel indices from here up mark a push to a subscriber's personal channel (the
/// `k`-th user the personal publisher picked), not one of the shared channels.
pub const PERSONAL_C: u32 = 1 << 31;

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
///
/// The fast path reads the fields in the order `encode` writes them (this runs once
/// per delivery, so it is the generator's hottest code); anything else — say a server
/// that re-serialised the JSON — goes through serde.
pub fn decode(bytes: &[u8]) -> Option<Stamp> {
    decode_fast(bytes).or_else(|| serde_json::from_slice(bytes).ok())
}

fn decode_fast(b: &[u8]) -> Option<Stamp> {
    let rest = b.strip_prefix(br#"{"t":"#)?;
    let (t, rest) = number(rest)?;
    let rest = rest.strip_prefix(br#","s":"#)?;
    let (s, rest) = number(rest)?;
    let rest = rest.strip_prefix(br#","c":"#)?;
    let (c, rest) = number(rest)?;
    // Only the padding may follow, and it must close the object.
    if !(rest == b"}" || (rest.starts_with(br#","p":""#) && rest.ends_with(br#""}"#))) {
        return None;
    }
    Some(Stamp {
        t,
        s,
        c: u32::try_from(c).ok()?,
    })
}

fn number(b: &[u8]) -> Option<(u64, &[u8])> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let v = b[..digits]
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    Some((v, &b[digits..]))
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
        // Re-serialised by a server: slow path.
        assert_eq!(
            decode(br#"{ "c": 7, "p": "xx", "s": 42, "t": 1763000000123456789 }"#),
            Some(st)
        );
        assert_eq!(
            decode_fast(br#"{"t":1,"s":2,"c":3,"p":"x"}"#).map(|s| s.c),
            Some(3)
        );
        assert_eq!(decode_fast(br#"{"t":1,"s":2,"c":3,"z":1}"#), None);
        assert_eq!(decode(b"{\"x\":1}"), None);
        assert_eq!(decode(b"garbage"), None);
    }
}
