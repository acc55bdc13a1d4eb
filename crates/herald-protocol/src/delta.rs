//! Fossil delta encoding, the `fossil` delta type of the client protocol: a subscriber that
//! asked for `delta: "fossil"` may get a publication's data as a delta against the data of
//! the previous publication in that channel, and the SDK applies it.
//!
//! A delta is ASCII commands around literal bytes. Numbers are written in base 64, most
//! significant digit first, with the digits `0-9 A-Z _ a-z ~`:
//! - header `SIZE\n`: the length of the result;
//! - `COUNT@OFFSET,`: copy `COUNT` bytes of the base starting at `OFFSET`;
//! - `COUNT:` followed by `COUNT` bytes: insert those bytes;
//! - trailer `CHECKSUM;`: the sum, wrapping at 32 bits, of the result read as big-endian
//!   32-bit words (the last one padded with zero bytes).
//!
//! No maintained Rust crate does this (the `fossil-delta` crate panics on malformed deltas
//! and uses `unsafe`), so Herald has its own. [`fossil_create`] never splits a UTF-8
//! character between a copy and an insert, so a delta of valid UTF-8 text is itself valid
//! UTF-8 and can travel inside a JSON string, as the JSON protocol sends deltas.

/// The 64 digits of Fossil's base 64 numbers, in order of value.
const DIGITS: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";

/// Width of the hashed windows, and of the blocks of the base that are indexed.
const WINDOW: usize = 16;

/// How many indexed blocks with the same hash are tried at one position: bounds the work
/// on repetitive input.
const MAX_CANDIDATES: usize = 64;

/// Why a delta could not be applied. Offsets (`at`) are positions in the delta.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("delta ends before its checksum")]
    Truncated,
    #[error("expected a number at byte {at}")]
    MissingNumber { at: usize },
    #[error("number at byte {at} is too large")]
    NumberOverflow { at: usize },
    #[error("expected {expected:?} at byte {at}")]
    Expected { at: usize, expected: char },
    #[error("unknown command {found:?} at byte {at}")]
    UnknownCommand { at: usize, found: char },
    #[error("copy of {len} bytes at offset {offset} is outside the {base_len}-byte base")]
    CopyOutOfRange {
        offset: u64,
        len: u64,
        base_len: usize,
    },
    #[error("insert of {len} bytes runs past the end of the delta")]
    InsertPastEnd { len: u64 },
    #[error("output would exceed the declared size of {declared} bytes")]
    OutputTooLong { declared: usize },
    #[error("output has {actual} bytes, the delta declared {declared}")]
    SizeMismatch { declared: usize, actual: usize },
    #[error("checksum mismatch: delta says {expected}, output sums to {actual}")]
    ChecksumMismatch { expected: u64, actual: u32 },
    #[error("unexpected bytes after the checksum at byte {at}")]
    TrailingBytes { at: usize },
}

/// A delta that turns `old` into `new`. It may be longer than `new` when the two share
/// little; a sender should then send `new` itself, as Centrifugo does.
pub fn fossil_create(old: &[u8], new: &[u8]) -> Vec<u8> {
    let mut delta = Vec::with_capacity(new.len() / 8 + 32);
    put_number(&mut delta, new.len() as u64);
    delta.push(b'\n');

    let mut done = 0; // new[..done] is already described by the delta
    if old.len() > WINDOW && new.len() > WINDOW {
        let index = BlockIndex::new(old);
        while let Some(m) = find_match(old, new, done, &index) {
            put_insert(&mut delta, &new[done..m.start]);
            put_number(&mut delta, m.len as u64);
            delta.push(b'@');
            put_number(&mut delta, m.source as u64);
            delta.push(b',');
            done = m.start + m.len;
        }
    }
    put_insert(&mut delta, &new[done..]);
    put_number(&mut delta, u64::from(checksum(new)));
    delta.push(b';');
    delta
}

/// Applies a delta made by [`fossil_create`] or any Fossil implementation to `base`.
/// Everything read from the delta is checked: a malformed or hostile delta gives an error,
/// never a panic, and the output never grows past the size the delta declares (which
/// [`fossil_target_size`] tells before applying).
pub fn fossil_apply(base: &[u8], delta: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let mut r = Reader { delta, at: 0 };
    let declared = r.header()?;
    // Preallocate no more than the inputs could plausibly need; copies may repeat, so the
    // output can still grow (up to `declared`) as commands are applied.
    let mut out = Vec::with_capacity(declared.min(base.len().saturating_add(delta.len())));
    loop {
        let count = r.number()?;
        let at = r.at;
        match r.byte()? {
            b'@' => {
                let offset = r.number()?;
                r.expect(b',')?;
                let out_of_range = || DeltaError::CopyOutOfRange {
                    offset,
                    len: count,
                    base_len: base.len(),
                };
                let start = usize::try_from(offset).map_err(|_| out_of_range())?;
                let len = usize::try_from(count).map_err(|_| out_of_range())?;
                let end = start.checked_add(len).ok_or_else(out_of_range)?;
                let bytes = base.get(start..end).ok_or_else(out_of_range)?;
                push_bounded(&mut out, bytes, declared)?;
            }
            b':' => {
                let bytes = r.take(count)?;
                push_bounded(&mut out, bytes, declared)?;
            }
            b';' => {
                if out.len() != declared {
                    return Err(DeltaError::SizeMismatch {
                        declared,
                        actual: out.len(),
                    });
                }
                let actual = checksum(&out);
                if u64::from(actual) != count {
                    return Err(DeltaError::ChecksumMismatch {
                        expected: count,
                        actual,
                    });
                }
                if r.at != delta.len() {
                    return Err(DeltaError::TrailingBytes { at: r.at });
                }
                return Ok(out);
            }
            other => {
                return Err(DeltaError::UnknownCommand {
                    at,
                    found: char::from(other),
                });
            }
        }
    }
}

/// The size of the result a delta declares, read from its header alone.
pub fn fossil_target_size(delta: &[u8]) -> Result<usize, DeltaError> {
    Reader { delta, at: 0 }.header()
}

fn push_bounded(out: &mut Vec<u8>, bytes: &[u8], declared: usize) -> Result<(), DeltaError> {
    if bytes.len() > declared.saturating_sub(out.len()) {
        return Err(DeltaError::OutputTooLong { declared });
    }
    out.extend_from_slice(bytes);
    Ok(())
}

/// Reads a delta front to back; every step is bounds-checked.
struct Reader<'a> {
    delta: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn header(&mut self) -> Result<usize, DeltaError> {
        let at = self.at;
        let size = self.number()?;
        self.expect(b'\n')?;
        usize::try_from(size).map_err(|_| DeltaError::NumberOverflow { at })
    }

    fn byte(&mut self) -> Result<u8, DeltaError> {
        let b = *self.delta.get(self.at).ok_or(DeltaError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn expect(&mut self, expected: u8) -> Result<(), DeltaError> {
        let at = self.at;
        if self.byte()? == expected {
            Ok(())
        } else {
            Err(DeltaError::Expected {
                at,
                expected: char::from(expected),
            })
        }
    }

    /// One or more base-64 digits.
    fn number(&mut self) -> Result<u64, DeltaError> {
        let start = self.at;
        let mut value = 0u64;
        while let Some(digit) = self.delta.get(self.at).copied().and_then(digit_value) {
            value = value
                .checked_mul(64)
                .and_then(|v| v.checked_add(u64::from(digit)))
                .ok_or(DeltaError::NumberOverflow { at: start })?;
            self.at += 1;
        }
        if self.at == start {
            return Err(if self.at >= self.delta.len() {
                DeltaError::Truncated
            } else {
                DeltaError::MissingNumber { at: start }
            });
        }
        Ok(value)
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], DeltaError> {
        let bytes = usize::try_from(len)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .and_then(|end| self.delta.get(self.at..end))
            .ok_or(DeltaError::InsertPastEnd { len })?;
        self.at += bytes.len();
        Ok(bytes)
    }
}

fn digit_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'Z' => Some(b - b'A' + 10),
        b'_' => Some(36),
        b'a'..=b'z' => Some(b - b'a' + 37),
        b'~' => Some(63),
        _ => None,
    }
}

fn put_number(out: &mut Vec<u8>, value: u64) {
    let digits = number_len(value);
    for i in (0..digits).rev() {
        // The shift is below 64: a u64 has at most 11 base-64 digits.
        out.push(DIGITS[((value >> (6 * i)) & 63) as usize]);
    }
}

/// How many digits `value` takes.
fn number_len(value: u64) -> usize {
    let bits = 64 - value.leading_zeros() as usize;
    bits.div_ceil(6).max(1)
}

fn put_insert(out: &mut Vec<u8>, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_number(out, bytes.len() as u64);
        out.push(b':');
        out.extend_from_slice(bytes);
    }
}

/// Fossil's checksum: the wrapping sum of big-endian 32-bit words, the tail zero-padded.
fn checksum(data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(4);
    let mut sum = 0u32;
    for word in &mut words {
        sum = sum.wrapping_add(u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
    }
    let mut tail = [0u8; 4];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    sum.wrapping_add(u32::from_be_bytes(tail))
}

/// The rolling checksum of a `WINDOW`-byte window (rsync's weak checksum): two 16-bit
/// sums that can slide one byte at a time.
#[derive(Clone, Copy)]
struct Rolling {
    sum: u16,
    weighted: u16,
}

impl Rolling {
    fn new(window: &[u8]) -> Self {
        let mut h = Rolling {
            sum: 0,
            weighted: 0,
        };
        for &b in window {
            h.sum = h.sum.wrapping_add(u16::from(b));
            h.weighted = h.weighted.wrapping_add(h.sum);
        }
        h
    }

    /// Slides the window one byte: `out` leaves at the front, `next` joins at the back.
    fn roll(&mut self, out: u8, next: u8) {
        self.sum = self
            .sum
            .wrapping_sub(u16::from(out))
            .wrapping_add(u16::from(next));
        self.weighted = self
            .weighted
            .wrapping_sub((WINDOW as u16).wrapping_mul(u16::from(out)))
            .wrapping_add(self.sum);
    }

    fn value(self) -> u32 {
        u32::from(self.sum) | (u32::from(self.weighted) << 16)
    }
}

/// The base's aligned `WINDOW`-byte blocks by hash, as chains through `next`.
struct BlockIndex {
    hashes: Vec<u32>,
    heads: Vec<u32>,
    next: Vec<u32>,
    mask: u32,
}

const NONE: u32 = u32::MAX;

impl BlockIndex {
    fn new(base: &[u8]) -> Self {
        let blocks = base.len() / WINDOW;
        let buckets = blocks.next_power_of_two();
        let mut index = BlockIndex {
            hashes: Vec::with_capacity(blocks),
            heads: vec![NONE; buckets],
            next: Vec::with_capacity(blocks),
            mask: u32::try_from(buckets - 1).unwrap_or(u32::MAX),
        };
        for (i, block) in base.chunks_exact(WINDOW).enumerate() {
            let Ok(i) = u32::try_from(i) else { break };
            let hash = Rolling::new(block).value();
            let bucket = (hash & index.mask) as usize;
            index.hashes.push(hash);
            index.next.push(index.heads[bucket]);
            index.heads[bucket] = i;
        }
        index
    }

    /// Starts of blocks whose hash is `hash`.
    fn candidates(&self, hash: u32) -> impl Iterator<Item = usize> + '_ {
        let mut block = self.heads[(hash & self.mask) as usize];
        std::iter::from_fn(move || {
            while block != NONE {
                let b = block as usize;
                block = self.next[b];
                if self.hashes[b] == hash {
                    return Some(b * WINDOW);
                }
            }
            None
        })
        .take(MAX_CANDIDATES)
    }
}

/// A run of `new` starting at `start` equal to `old[source..source + len]`.
struct Match {
    start: usize,
    source: usize,
    len: usize,
}

/// The first worthwhile match at or after `done`: the window slides over `new` until a
/// block of `old` with the same hash extends into a match that costs fewer bytes as a copy
/// than as an insert; of the candidates there, the longest wins.
fn find_match(old: &[u8], new: &[u8], done: usize, index: &BlockIndex) -> Option<Match> {
    if done + WINDOW > new.len() {
        return None;
    }
    let mut hash = Rolling::new(&new[done..done + WINDOW]);
    let mut at = done;
    loop {
        let mut best: Option<Match> = None;
        for source in index.candidates(hash.value()) {
            let Some(m) = extend(old, new, done, at, source) else {
                continue;
            };
            let cost = number_len((m.start - done) as u64)
                + number_len(m.len as u64)
                + number_len(m.source as u64)
                + 3;
            if m.len >= cost && best.as_ref().is_none_or(|b| m.len > b.len) {
                best = Some(m);
            }
        }
        if best.is_some() {
            return best;
        }
        if at + WINDOW >= new.len() {
            return None;
        }
        hash.roll(new[at], new[at + WINDOW]);
        at += 1;
    }
}

/// Grows the equality of `old[source..]` and `new[at..]` both ways (not back past `done`),
/// then trims it to whole UTF-8 characters of `new`.
fn extend(old: &[u8], new: &[u8], done: usize, at: usize, source: usize) -> Option<Match> {
    let forward = old[source..]
        .iter()
        .zip(&new[at..])
        .take_while(|(a, b)| a == b)
        .count();
    let backward = old[..source]
        .iter()
        .rev()
        .zip(new[done..at].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    let (mut start, mut src, mut end) = (at - backward, source - backward, at + forward);
    while start < end && is_continuation(new[start]) {
        start += 1;
        src += 1;
    }
    while end > start && end < new.len() && is_continuation(new[end]) {
        end -= 1;
    }
    (end > start).then(|| Match {
        start,
        source: src,
        len: end - start,
    })
}

/// A byte inside a multi-byte UTF-8 character (never the first).
fn is_continuation(b: u8) -> bool {
    b & 0xc0 == 0x80
}

#[cfg(test)]
mod tests;
