//! Time as the session sees it: handed in by the caller, never read by the session itself,
//! so tests can step a session through ping deadlines and token expiry without sleeping.

use std::time::{Duration, Instant};

/// One reading of both clocks: monotonic for deadlines, Unix seconds for token times.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub unix: u64,
}

/// The furthest ahead a client- or token-supplied expiry is taken to be: later times are
/// clamped, so no deadline arithmetic can overflow.
pub const MAX_EXPIRY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Now {
    /// The system clocks.
    pub fn system() -> Self {
        Self {
            mono: Instant::now(),
            unix: crate::auth::unix_now(),
        }
    }

    /// This reading moved forward by `d` on both clocks (tests step sessions with it).
    pub fn after(self, d: Duration) -> Self {
        Self {
            mono: self.mono.checked_add(d).unwrap_or(self.mono),
            unix: self.unix.saturating_add(d.as_secs()),
        }
    }

    /// A Unix expiry clamped to at most [`MAX_EXPIRY`] from now; 0 means none.
    pub fn clamp_expiry(self, at: Option<u64>) -> Option<u64> {
        at.filter(|a| *a > 0)
            .map(|a| a.min(self.unix.saturating_add(MAX_EXPIRY.as_secs())))
    }

    /// The monotonic instant matching a Unix second (now if it is past).
    pub fn mono_at(self, unix: u64) -> Instant {
        let wait = Duration::from_secs(unix.saturating_sub(self.unix)).min(MAX_EXPIRY);
        self.mono.checked_add(wait).unwrap_or(self.mono)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_expiries_are_clamped_and_never_overflow() {
        let now = Now::system();
        let at = now.clamp_expiry(Some(u64::MAX)).unwrap();
        assert_eq!(at, now.unix + MAX_EXPIRY.as_secs());
        assert!(now.mono_at(u64::MAX) > now.mono);
        assert_eq!(now.clamp_expiry(Some(0)), None);
        assert_eq!(now.mono_at(0), now.mono);
    }
}
