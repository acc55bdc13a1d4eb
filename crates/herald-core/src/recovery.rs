//! The recovery merge: publications read from history and publications that arrived live
//! while history was being read are combined into one ordered run, without duplicates, and
//! a gap is detected rather than hidden.

/// Merges two runs of items keyed by offset into the strictly increasing sequence of items
/// after `after`. Returns the merged run and whether it is contiguous from `after + 1`.
pub fn merge<T>(
    history: Vec<T>,
    live: Vec<T>,
    after: u64,
    offset: impl Fn(&T) -> u64,
) -> (Vec<T>, bool) {
    let mut all: Vec<T> = history
        .into_iter()
        .chain(live)
        .filter(|p| offset(p) > after)
        .collect();
    // Stable sort keeps the history copy first among equal offsets.
    all.sort_by_key(|p| offset(p));
    all.dedup_by_key(|p| offset(p));
    let contiguous = (after + 1..)
        .zip(&all)
        .all(|(expected, p)| offset(p) == expected);
    (all, contiguous)
}

#[cfg(test)]
mod tests {
    use super::merge;
    use proptest::prelude::*;

    proptest! {
        // History holds (after, h]; live delivery started somewhere at or before h + 1 and
        // runs to top, possibly shuffled in arrival: the merge is exactly after+1..=top.
        #[test]
        fn no_gap_no_duplicate(after in 0u64..50, hist_len in 0u64..50, overlap in 0u64..20,
                               extra in 0u64..30, seed in any::<u64>()) {
            let h = after + hist_len;
            let live_start = (h + 1).saturating_sub(overlap).max(after.saturating_sub(3));
            let top = h + extra;
            let history: Vec<u64> = (after + 1..=h).collect();
            let mut live: Vec<u64> = (live_start.max(1)..=top).collect();
            // Deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..live.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                live.swap(i, (s >> 33) as usize % (i + 1));
            }
            let (out, ok) = merge(history, live, after, |x| *x);
            prop_assert!(ok);
            prop_assert_eq!(out, (after + 1..=top).collect::<Vec<_>>());
        }

        // A hole between history and live is always detected.
        #[test]
        fn gap_detected(after in 0u64..50, hist_len in 0u64..20, hole in 1u64..10, extra in 1u64..10) {
            let h = after + hist_len;
            let history: Vec<u64> = (after + 1..=h).collect();
            let live: Vec<u64> = (h + 1 + hole..=h + hole + extra).collect();
            let (_, ok) = merge(history, live, after, |x| *x);
            prop_assert!(!ok);
        }
    }

    #[test]
    fn empty_is_contiguous() {
        let (out, ok) = merge(Vec::<u64>::new(), vec![], 5, |x| *x);
        assert!(out.is_empty() && ok);
    }
}
