//! Latency histograms, per-subscriber sequence tracking and loss accounting.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency a histogram can hold, in microseconds (one hour).
pub const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Distinct error labels kept per process; the rest are counted under "other".
const MAX_ERROR_KINDS: usize = 32;

/// A latency histogram in microseconds, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    new_histogram_sigfig(3)
}

fn new_histogram_sigfig(sigfig: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, sigfig)
        .expect("constant histogram bounds are valid")
}

/// Records one sample, clamping to the histogram's range.
pub fn record(h: &mut Histogram<u64>, value_us: u64) {
    h.saturating_record(value_us.max(1));
}

/// A histogram as (bucket value, count) pairs: compact, lossless between histograms of
/// the same configuration, and plain JSON for the worker-to-parent pipe.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistData(pub Vec<(u64, u64)>);

impl HistData {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        HistData(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    /// Adds these counts to `h`. Values land in the same buckets they came from
    /// because each pair carries its bucket's highest equivalent value.
    pub fn merge_into(&self, h: &mut Histogram<u64>) {
        let high = h.high();
        for &(v, c) in &self.0 {
            // Only fails out of range; clamped, so it cannot.
            let _ = h.record_n(v.clamp(1, high), c);
        }
    }

    pub fn to_histogram(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        self.merge_into(&mut h);
        h
    }
}

/// Latency summary in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// How one delivery relates to what the subscriber saw before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqOutcome {
    /// Above everything seen so far (gaps may still be filled later).
    InOrder,
    /// New, but below the highest sequence already seen.
    OutOfOrder,
    /// Already seen.
    Duplicate,
}

/// Per-subscriber sequence tracking with a 128-entry window below the highest
/// sequence seen: 32 bytes per subscriber whatever the run length. A delivery further
/// behind than the window is counted as out of order (it cannot be told from a
/// duplicate any more, and on a real server such lateness is already a finding).
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqTracker {
    high: u64,
    /// Bit k set: `high - k` was seen.
    window: u128,
}

impl SeqTracker {
    pub fn observe(&mut self, seq: u64) -> SeqOutcome {
        if seq > self.high {
            let shift = seq - self.high;
            self.window = if shift >= 128 {
                0
            } else {
                self.window << shift
            };
            self.window |= 1;
            self.high = seq;
            return SeqOutcome::InOrder;
        }
        let back = self.high - seq;
        if back >= 128 {
            return SeqOutcome::OutOfOrder;
        }
        let bit = 1u128 << back;
        if self.window & bit != 0 {
            SeqOutcome::Duplicate
        } else {
            self.window |= bit;
            SeqOutcome::OutOfOrder
        }
    }
}

/// One second of a time series.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Interval {
    /// Seconds since the run's epoch.
    pub second: u32,
    pub count: u64,
    pub hist: HistData,
}

/// Per-second counts and latency histograms (2 significant digits: plots only).
#[derive(Debug)]
pub struct Series {
    epoch_ns: u64,
    buckets: Vec<Option<(u64, Histogram<u64>)>>,
    max_seconds: usize,
}

impl Series {
    pub fn new(epoch_ns: u64, max_seconds: usize) -> Self {
        Series {
            epoch_ns,
            buckets: Vec::new(),
            max_seconds,
        }
    }

    pub fn record(&mut self, at_ns: u64, value_us: u64) {
        let sec = (at_ns.saturating_sub(self.epoch_ns) / 1_000_000_000) as usize;
        if sec >= self.max_seconds {
            return;
        }
        if self.buckets.len() <= sec {
            self.buckets.resize_with(sec + 1, || None);
        }
        let slot = self.buckets[sec].get_or_insert_with(|| (0, new_histogram_sigfig(2)));
        slot.0 += 1;
        record(&mut slot.1, value_us);
    }

    pub fn to_data(&self) -> Vec<Interval> {
        self.buckets
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                b.as_ref().map(|(n, h)| Interval {
                    second: i as u32,
                    count: *n,
                    hist: HistData::from_histogram(h),
                })
            })
            .collect()
    }
}

/// Merges interval lists from several processes, second by second.
pub fn merge_intervals<'a>(
    parts: impl IntoIterator<Item = &'a [Interval]>,
) -> BTreeMap<u32, (u64, Histogram<u64>)> {
    let mut out: BTreeMap<u32, (u64, Histogram<u64>)> = BTreeMap::new();
    for part in parts {
        for iv in part {
            let e = out
                .entry(iv.second)
                .or_insert_with(|| (0, new_histogram_sigfig(2)));
            e.0 += iv.count;
            iv.hist.merge_into(&mut e.1);
        }
    }
    out
}

/// Per-process counters shared by every connection task (behind one mutex: the
/// generator runs one or two threads per process, so it is uncontended).
/// A broadcast run has few publications: those of the first channel are followed one by
/// one, up to this sequence.
pub const TRACKED_PUBLICATIONS: u64 = 1000;

/// One publication of the first channel: its unique deliveries, and the latency of the
/// slowest (once every subscriber has it: the time until 100 % delivered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PubTrack {
    pub delivered: u64,
    pub last_us: u64,
}

/// Adds `from` into `into`, element by element: deliveries sum, the slowest wins.
pub fn merge_tracks(into: &mut Vec<PubTrack>, from: &[PubTrack]) {
    if into.len() < from.len() {
        into.resize(from.len(), PubTrack::default());
    }
    for (a, b) in into.iter_mut().zip(from) {
        a.delivered += b.delivered;
        a.last_us = a.last_us.max(b.last_us);
    }
}

#[derive(Debug)]
pub struct Recorder {
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub disconnected: u64,
    pub connect_latency: Histogram<u64>,
    pub connect_series: Series,
    pub first_attempt_ns: u64,
    pub last_established_ns: u64,
    pub last_delivery_ns: u64,
    pub delivered: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub invalid: u64,
    /// WebSocket payload bytes received by subscribed connections (frame headers and
    /// the connect/subscribe exchange excluded).
    pub bytes_received: u64,
    pub latency: Histogram<u64>,
    pub series: Series,
    /// Publications on personal channels (unique ones), duplicates of them, latency.
    pub personal_delivered: u64,
    pub personal_duplicated: u64,
    pub personal_latency: Histogram<u64>,
    pub subs_per_channel: Vec<u64>,
    pub unique_per_channel: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    /// With `--reconnect`: connections lost and made again, how long each took (from the
    /// drop to subscribed again), recoveries the server said were incomplete, and the
    /// first drop and last return (ns since the Unix epoch).
    pub reconnects: u64,
    pub reconnect_latency: Histogram<u64>,
    pub unrecovered: u64,
    pub first_drop_ns: u64,
    pub last_back_ns: u64,
    /// By sequence (index = sequence), for the first channel.
    pub per_publication: Vec<PubTrack>,
    /// The highest sequence received per channel: a publication the API did not
    /// acknowledge (a timeout) but subscribers received was published all the same.
    pub highest_seq: Vec<u64>,
}

impl Recorder {
    pub fn new(epoch_ns: u64, channels: usize, max_seconds: usize) -> Self {
        Recorder {
            attempted: 0,
            established: 0,
            failed: 0,
            disconnected: 0,
            connect_latency: new_histogram(),
            connect_series: Series::new(epoch_ns, max_seconds),
            first_attempt_ns: 0,
            last_established_ns: 0,
            last_delivery_ns: 0,
            delivered: 0,
            duplicated: 0,
            out_of_order: 0,
            invalid: 0,
            bytes_received: 0,
            latency: new_histogram(),
            series: Series::new(epoch_ns, max_seconds),
            personal_delivered: 0,
            personal_duplicated: 0,
            personal_latency: new_histogram(),
            subs_per_channel: vec![0; channels],
            unique_per_channel: vec![0; channels],
            errors: BTreeMap::new(),
            reconnects: 0,
            reconnect_latency: new_histogram(),
            unrecovered: 0,
            first_drop_ns: 0,
            last_back_ns: 0,
            per_publication: Vec::new(),
            highest_seq: vec![0; channels],
        }
    }

    /// A subscribed connection was lost (`--reconnect` makes it again).
    pub fn dropped(&mut self, at_ns: u64, kind: String) {
        if self.first_drop_ns == 0 || at_ns < self.first_drop_ns {
            self.first_drop_ns = at_ns;
        }
        self.error(format!("dropped: {kind}"));
    }

    /// A lost connection is subscribed again, `took_us` after it was lost; `recovered`:
    /// the server gave back everything missed meanwhile.
    pub fn reconnected(&mut self, at_ns: u64, took_us: u64, recovered: bool) {
        self.reconnects += 1;
        self.last_back_ns = self.last_back_ns.max(at_ns);
        record(&mut self.reconnect_latency, took_us);
        if !recovered {
            self.unrecovered += 1;
        }
    }

    pub fn attempt(&mut self, at_ns: u64) {
        self.attempted += 1;
        if self.first_attempt_ns == 0 || at_ns < self.first_attempt_ns {
            self.first_attempt_ns = at_ns;
        }
    }

    pub fn established(&mut self, channel: usize, at_ns: u64, latency_us: u64) {
        self.established += 1;
        self.last_established_ns = self.last_established_ns.max(at_ns);
        record(&mut self.connect_latency, latency_us);
        self.connect_series.record(at_ns, latency_us);
        if let Some(n) = self.subs_per_channel.get_mut(channel) {
            *n += 1;
        }
    }

    pub fn failed(&mut self, kind: String) {
        self.failed += 1;
        self.error(kind);
    }

    pub fn disconnected(&mut self, kind: String) {
        self.disconnected += 1;
        self.error(kind);
    }

    pub fn error(&mut self, kind: String) {
        if self.errors.len() < MAX_ERROR_KINDS || self.errors.contains_key(&kind) {
            *self.errors.entry(kind).or_insert(0) += 1;
        } else {
            *self.errors.entry("other".to_string()).or_insert(0) += 1;
        }
    }

    /// A publication on the connection's personal channel.
    pub fn personal(&mut self, outcome: SeqOutcome, latency_us: u64) {
        if outcome == SeqOutcome::Duplicate {
            self.personal_duplicated += 1;
            return;
        }
        self.personal_delivered += 1;
        record(&mut self.personal_latency, latency_us);
    }

    /// A publication of `channel` with sequence `seq` arrived.
    pub fn delivery(
        &mut self,
        channel: usize,
        seq: u64,
        outcome: SeqOutcome,
        at_ns: u64,
        latency_us: u64,
    ) {
        match outcome {
            SeqOutcome::Duplicate => {
                self.duplicated += 1;
                return;
            }
            SeqOutcome::OutOfOrder => self.out_of_order += 1,
            SeqOutcome::InOrder => {}
        }
        self.delivered += 1;
        self.last_delivery_ns = self.last_delivery_ns.max(at_ns);
        if let Some(h) = self.highest_seq.get_mut(channel) {
            *h = (*h).max(seq);
        }
        if let Some(n) = self.unique_per_channel.get_mut(channel) {
            *n += 1;
        }
        record(&mut self.latency, latency_us);
        self.series.record(at_ns, latency_us);
        if channel == 0 && seq < TRACKED_PUBLICATIONS {
            let i = seq as usize;
            if self.per_publication.len() <= i {
                self.per_publication.resize(i + 1, PubTrack::default());
            }
            let t = &mut self.per_publication[i];
            t.delivered += 1;
            t.last_us = t.last_us.max(latency_us);
        }
    }
}

/// Delivery accounting for a whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
}

/// Expected deliveries are, per channel, subscribers × publications the publisher got
/// accepted; whatever a channel's subscribers did not receive (uniquely) is lost.
/// Unique deliveries above the expectation (which a correct server cannot produce)
/// are not allowed to cancel losses on other channels.
pub fn account(subs: &[u64], published: &[u64], unique: &[u64]) -> Tally {
    let mut t = Tally::default();
    let n = subs.len().max(published.len()).max(unique.len());
    for c in 0..n {
        let s = subs.get(c).copied().unwrap_or(0);
        let p = published.get(c).copied().unwrap_or(0);
        let u = unique.get(c).copied().unwrap_or(0);
        let expected = s.saturating_mul(p);
        t.expected += expected;
        t.delivered += u;
        t.lost += expected.saturating_sub(u);
    }
    t
}

/// Publications per channel: those the publisher had acknowledged, or as many as the
/// highest sequence a subscriber received where that is more (sequences are sent in order,
/// so every one below it was sent too).
pub fn published_by_channel(acknowledged: &[u64], highest_seen: &[u64]) -> Vec<u64> {
    let n = acknowledged.len().max(highest_seen.len());
    (0..n)
        .map(|c| {
            let a = acknowledged.get(c).copied().unwrap_or(0);
            a.max(highest_seen.get(c).copied().unwrap_or(0))
        })
        .collect()
}

/// Element-wise maximum, growing `into` as needed.
pub fn max_vec(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a = (*a).max(*b);
    }
}

/// Element-wise sum, growing `into` as needed.
pub fn add_vec(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += *b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unacknowledged_publication_that_arrived_counts_as_published() {
        // Channel 0: 4 acknowledged, subscribers saw up to 5 (the 5th's answer was lost);
        // channel 1: 3 acknowledged, nothing seen beyond.
        let published = published_by_channel(&[4, 3], &[5, 2]);
        assert_eq!(published, vec![5, 3]);
        // 10 subscribers each; channel 0's 5th reached only 6 of them: 4 lost, not hidden
        // behind the surplus over 4 × 10.
        let t = account(&[10, 10], &published, &[46, 30]);
        assert_eq!((t.expected, t.delivered, t.lost), (80, 76, 4));
        let mut m = vec![1, 9];
        max_vec(&mut m, &[3, 2, 7]);
        assert_eq!(m, vec![3, 9, 7]);
    }

    #[test]
    fn seq_tracker_classifies() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(1), SeqOutcome::InOrder);
        assert_eq!(t.observe(2), SeqOutcome::InOrder);
        assert_eq!(t.observe(2), SeqOutcome::Duplicate);
        assert_eq!(t.observe(5), SeqOutcome::InOrder);
        assert_eq!(t.observe(4), SeqOutcome::OutOfOrder);
        assert_eq!(t.observe(4), SeqOutcome::Duplicate);
        assert_eq!(t.observe(3), SeqOutcome::OutOfOrder);
        assert_eq!(t.observe(1), SeqOutcome::Duplicate);
        assert_eq!(t.observe(1000), SeqOutcome::InOrder);
        assert_eq!(t.observe(900), SeqOutcome::OutOfOrder);
        assert_eq!(t.observe(900), SeqOutcome::Duplicate);
        // Beyond the window: cannot tell, counted as out of order.
        assert_eq!(t.observe(6), SeqOutcome::OutOfOrder);
        // A shift of exactly 128 must not overflow.
        assert_eq!(t.observe(1128), SeqOutcome::InOrder);
        assert_eq!(t.observe(1001), SeqOutcome::OutOfOrder);
        assert_eq!(t.observe(1000), SeqOutcome::OutOfOrder);
    }

    #[test]
    fn histogram_merge_equals_direct_recording() {
        let mut direct = new_histogram();
        let mut a = new_histogram();
        let mut b = new_histogram();
        let mut x: u64 = 12345;
        for i in 0..20_000u64 {
            // Cheap deterministic spread over 1 µs .. ~10 s.
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = 1 + (x >> 40) % 10_000_000;
            record(&mut direct, v);
            record(if i % 3 == 0 { &mut a } else { &mut b }, v);
        }
        let wire_a = serde_json::to_string(&HistData::from_histogram(&a)).unwrap();
        let wire_b = serde_json::to_string(&HistData::from_histogram(&b)).unwrap();
        let mut merged = new_histogram();
        serde_json::from_str::<HistData>(&wire_a)
            .unwrap()
            .merge_into(&mut merged);
        serde_json::from_str::<HistData>(&wire_b)
            .unwrap()
            .merge_into(&mut merged);
        assert_eq!(merged.len(), direct.len());
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                merged.value_at_quantile(q),
                direct.value_at_quantile(q),
                "q={q}"
            );
        }
        assert_eq!(merged.max(), direct.max());
        assert_eq!(
            HistData::from_histogram(&merged),
            HistData::from_histogram(&direct)
        );
    }

    #[test]
    fn interval_merge_sums_per_second() {
        let mut s1 = Series::new(0, 10);
        let mut s2 = Series::new(0, 10);
        s1.record(500_000_000, 100);
        s1.record(1_500_000_000, 200);
        s2.record(1_700_000_000, 300);
        s2.record(99_000_000_000, 300); // beyond max_seconds: dropped
        let (d1, d2) = (s1.to_data(), s2.to_data());
        let m = merge_intervals([d1.as_slice(), d2.as_slice()]);
        assert_eq!(m.len(), 2);
        assert_eq!(m[&0].0, 1);
        assert_eq!(m[&1].0, 2);
        assert_eq!(m[&1].1.len(), 2);
    }

    #[test]
    fn loss_accounting() {
        // 2 channels: 3 subscribers × 10 publications, 2 × 5.
        let t = account(&[3, 2], &[10, 5], &[30, 7]);
        assert_eq!(
            t,
            Tally {
                expected: 40,
                delivered: 37,
                lost: 3
            }
        );
        // Surplus on one channel does not hide loss on another.
        let t = account(&[1, 1], &[10, 10], &[12, 8]);
        assert_eq!(t.lost, 2);
        // Channels nobody subscribed to expect nothing.
        assert_eq!(account(&[0], &[100], &[0]).expected, 0);
    }

    #[test]
    fn recorder_counts_outcomes() {
        let mut r = Recorder::new(0, 2, 60);
        r.established(1, 1, 50);
        let mut t = SeqTracker::default();
        for s in [1, 2, 2, 4, 3] {
            let o = t.observe(s);
            r.delivery(1, 1, o, 2_000_000_000, 10);
        }
        assert_eq!(r.delivered, 4);
        assert_eq!(r.duplicated, 1);
        assert_eq!(r.out_of_order, 1);
        assert_eq!(r.unique_per_channel, vec![0, 4]);
        assert_eq!(r.subs_per_channel, vec![0, 1]);
        let tally = account(&r.subs_per_channel, &[0, 5], &r.unique_per_channel);
        assert_eq!(tally.lost, 1);
    }
}
