//! Per-connection command rate limit: a token bucket (`client.command_rate` per second,
//! `client.command_burst` deep). A command over the limit gets error 111; a connection that
//! keeps sending while refused — another full burst of refused commands before one is
//! accepted again — is closed with 3013.

use std::time::Instant;

/// What to do with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit.
    Allow,
    /// Over the limit: answer error 111 (too many requests, temporary).
    Refuse,
    /// Over the limit and not backing off: close with 3013.
    Disconnect,
}

/// One connection's bucket.
#[derive(Debug, Clone)]
pub struct CommandBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
    refused: u32,
    max_refused: u32,
}

impl CommandBucket {
    /// None when `rate` is 0 (no limit). `burst` 0 means a burst of `rate`.
    pub fn new(rate: u32, burst: u32) -> Option<Self> {
        Self::starting(rate, burst, Instant::now())
    }

    pub fn starting(rate: u32, burst: u32, now: Instant) -> Option<Self> {
        if rate == 0 {
            return None;
        }
        let burst = if burst == 0 { rate } else { burst };
        Some(Self {
            rate: f64::from(rate),
            capacity: f64::from(burst),
            tokens: f64::from(burst),
            last: now,
            refused: 0,
            max_refused: burst,
        })
    }

    /// Takes one command's token.
    pub fn take(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            return Verdict::Allow;
        }
        self.refused = self.refused.saturating_add(1);
        if self.refused > self.max_refused {
            Verdict::Disconnect
        } else {
            Verdict::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unlimited_when_rate_is_zero() {
        assert!(CommandBucket::new(0, 10).is_none());
    }

    #[test]
    fn burst_then_refuse_then_disconnect() {
        let t0 = Instant::now();
        let mut b = CommandBucket::starting(10, 3, t0).unwrap();
        for _ in 0..3 {
            assert_eq!(b.take(t0), Verdict::Allow);
        }
        for _ in 0..3 {
            assert_eq!(b.take(t0), Verdict::Refuse);
        }
        assert_eq!(b.take(t0), Verdict::Disconnect);
    }

    #[test]
    fn refills_at_rate_and_forgives_a_client_that_backs_off() {
        let t0 = Instant::now();
        let mut b = CommandBucket::starting(10, 2, t0).unwrap();
        assert_eq!(b.take(t0), Verdict::Allow);
        assert_eq!(b.take(t0), Verdict::Allow);
        assert_eq!(b.take(t0), Verdict::Refuse);
        // 100 ms later one token is back, and the refusals are forgiven.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.take(t1), Verdict::Allow);
        assert_eq!(b.take(t1), Verdict::Refuse);
        assert_eq!(b.take(t1), Verdict::Refuse);
        // Never more than the burst, however long the pause.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(b.take(t2), Verdict::Allow);
        assert_eq!(b.take(t2), Verdict::Allow);
        assert_eq!(b.take(t2), Verdict::Refuse);
    }
}
