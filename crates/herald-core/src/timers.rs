//! One timer structure per node for every connection's deadlines (pings, pong timeouts,
//! expiries, the connect timeout, a request's time limit), instead of a timer inside each
//! connection's task.
//!
//! A tokio `Sleep` is 112 bytes held for the life of the connection; here a deadline is a
//! 16-byte entry in one heap, and a single task wakes the connections whose deadline came
//! (docs/performance.md, "One timer per node"). A connection schedules its next deadline
//! when it is earlier than the one it already has pending; an entry that is no longer
//! wanted (the deadline moved later, or the connection ended) only costs a spurious wakeup,
//! and the connection's task re-checks the time itself. Entries of connections that ended
//! are swept out as the heap grows, so churn cannot grow it without bound.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::conn::ConnHandle;

/// Below this many entries the heap is never swept.
const SWEEP_FLOOR: usize = 1024;

/// Deadlines are rounded up to a multiple of this many milliseconds, so the task wakes at
/// most ten times a second and each wakeup serves every connection due in its tick. Spread
/// one to a millisecond, a node's pings cost it a thread wakeup (and the client's answers
/// another) each: at 9,500 pings a second, 23–26 µs of the node's CPU per ping, 17 % of it in
/// task switches (docs/performance.md, "Pings in ticks"). No deadline here needs more
/// precision: pings, pong timeouts, expiries, connect and request time limits.
const TICK_MS: u128 = 100;

pub struct Timers {
    inner: Arc<Inner>,
}

struct Inner {
    /// Deadlines are whole milliseconds after this instant (rounded up: never early).
    epoch: Instant,
    heap: Mutex<Heap>,
    /// Tells the task that an earlier deadline came in, or that the node is gone.
    kick: Notify,
    started: AtomicBool,
    stopped: AtomicBool,
}

#[derive(Default)]
struct Heap {
    entries: BinaryHeap<Entry>,
    /// The deadline the task sleeps until (u64::MAX: none).
    armed: u64,
    /// Sweep the ended connections' entries once the heap is this long.
    sweep_at: usize,
}

/// A deadline of one connection; ordered so the heap's top is the earliest.
struct Entry {
    at: u64,
    conn: Weak<ConnHandle>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.cmp(&self.at)
    }
}

impl Default for Timers {
    fn default() -> Self {
        Self::new()
    }
}

impl Timers {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                epoch: Instant::now(),
                heap: Mutex::new(Heap {
                    armed: u64::MAX,
                    sweep_at: SWEEP_FLOOR,
                    ..Default::default()
                }),
                kick: Notify::new(),
                started: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
            }),
        }
    }

    /// Wakes `conn` (through [`ConnHandle::wake`]) at `at` or soon after. Must be called
    /// inside a tokio runtime: the first call starts the node's timer task there.
    pub fn schedule(&self, conn: &Arc<ConnHandle>, at: Instant) {
        let at = self.inner.ticks(at);
        if !self.inner.started.swap(true, AtomicOrdering::AcqRel) {
            tokio::spawn(run(Arc::downgrade(&self.inner)));
        }
        let earlier = {
            let mut heap = self.inner.heap.lock();
            heap.entries.push(Entry {
                at,
                conn: Arc::downgrade(conn),
            });
            if heap.entries.len() >= heap.sweep_at {
                heap.sweep();
            }
            at < heap.armed
        };
        if earlier {
            self.inner.kick.notify_one();
        }
    }

    /// Entries held (some may belong to ended connections or be superseded).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.heap.lock().entries.len()
    }
}

impl Drop for Timers {
    fn drop(&mut self) {
        self.inner.stopped.store(true, AtomicOrdering::Release);
        self.inner.kick.notify_one();
    }
}

impl Heap {
    /// Drops the entries of connections that ended; the next sweep waits until the heap
    /// has doubled again, so sweeping costs O(1) per entry over time.
    fn sweep(&mut self) {
        self.entries.retain(|e| e.conn.strong_count() > 0);
        self.sweep_at = (self.entries.len() * 2).max(SWEEP_FLOOR);
        if self.entries.capacity() > self.sweep_at * 2 {
            self.entries.shrink_to(self.sweep_at);
        }
    }
}

impl Inner {
    /// A deadline in milliseconds after the epoch, rounded up to the next tick: an entry
    /// never comes before its deadline.
    fn ticks(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.epoch);
        let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
        u64::try_from(ms.div_ceil(TICK_MS) * TICK_MS).unwrap_or(u64::MAX)
    }

    /// The current time in milliseconds after the epoch, rounded down: an entry that is due
    /// by it is due by the clock the connection reads.
    fn now(&self) -> u64 {
        let ms = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX)
    }

    fn instant(&self, ticks: u64) -> Instant {
        self.epoch
            .checked_add(Duration::from_millis(ticks))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400))
    }
}

/// The node's timer task: wakes the connections whose deadline came, then sleeps until the
/// next deadline or an earlier one is scheduled. Ends when the node's timers are dropped.
async fn run(inner: Weak<Inner>) {
    let mut due = Vec::new();
    loop {
        let Some(me) = inner.upgrade() else { return };
        if me.stopped.load(AtomicOrdering::Acquire) {
            return;
        }
        let now = me.now();
        let next = {
            let mut heap = me.heap.lock();
            while heap.entries.peek().is_some_and(|e| e.at <= now) {
                if let Some(e) = heap.entries.pop() {
                    due.push(e.conn);
                }
            }
            let next = heap.entries.peek().map_or(u64::MAX, |e| e.at);
            heap.armed = next;
            next
        };
        // Woken outside the lock: a connection's wake takes no lock of the heap, but it
        // can run its task at once on this thread.
        for conn in due.drain(..) {
            if let Some(conn) = conn.upgrade() {
                conn.wake();
            }
        }
        let sleep = (next != u64::MAX).then(|| tokio::time::sleep_until(me.instant(next).into()));
        // The task holds the timers only while it waits on their kick; the kick of a drop
        // is a stored permit, so it is not missed between the check above and the wait.
        let kicked = async {
            me.kick.notified().await;
        };
        match sleep {
            Some(sleep) => {
                tokio::select! {
                    () = sleep => {}
                    () = kicked => {}
                }
            }
            None => kicked.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: &str) -> Arc<ConnHandle> {
        Arc::new(ConnHandle::new(Arc::from(id), 1 << 16))
    }

    /// What `f` says of each entry the heap holds.
    fn entries<T>(timers: &Timers, f: impl FnMut(&Entry) -> T) -> Vec<T> {
        timers.inner.heap.lock().entries.iter().map(f).collect()
    }

    async fn woken(c: &ConnHandle, within: Duration) -> bool {
        tokio::time::timeout(within, c.wait()).await.is_ok()
    }

    #[tokio::test]
    async fn a_connection_is_woken_at_its_deadline_not_before() {
        let timers = Timers::new();
        let c = conn("a");
        let at = Instant::now() + Duration::from_millis(150);
        timers.schedule(&c, at);
        assert!(!woken(&c, Duration::from_millis(50)).await, "woken early");
        assert!(woken(&c, Duration::from_secs(5)).await, "never woken");
        assert!(Instant::now() >= at);
    }

    #[tokio::test]
    async fn deadlines_between_milliseconds_are_not_woken_early() {
        let timers = Timers::new();
        let start = Instant::now();
        let conns: Vec<_> = (0..40u64)
            .map(|i| {
                let c = conn(&format!("c{i}"));
                let at = start + Duration::from_micros(2_000 + 350 * i + 137);
                timers.schedule(&c, at);
                (c, at)
            })
            .collect();
        for (c, at) in &conns {
            assert!(woken(c, Duration::from_secs(5)).await, "never woken");
            assert!(Instant::now() >= *at, "woken before its deadline");
        }
    }

    #[tokio::test]
    async fn deadlines_in_one_tick_are_woken_together_at_its_end() {
        let timers = Timers::new();
        let epoch = timers.inner.epoch;
        // The start of a tick at least two ticks ahead.
        let now_ms = timers.inner.now() as u128;
        let tick = Duration::from_millis(((now_ms / TICK_MS + 2) * TICK_MS) as u64);
        let start = epoch + tick;
        let (first, last) = (conn("first"), conn("last"));
        timers.schedule(&first, start + Duration::from_millis(1));
        timers.schedule(&last, start + Duration::from_millis(TICK_MS as u64 - 1));
        assert_eq!(
            entries(&timers, |e| e.at)
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            1
        );
        assert!(woken(&first, Duration::from_secs(5)).await, "never woken");
        // Woken with the last one: at the tick's end, not at its own deadline.
        assert!(Instant::now() >= start + Duration::from_millis(TICK_MS as u64 - 1));
        assert!(woken(&last, Duration::from_secs(5)).await, "never woken");
    }

    #[tokio::test]
    async fn an_earlier_deadline_scheduled_later_wakes_first() {
        let timers = Timers::new();
        let (late, early) = (conn("late"), conn("early"));
        timers.schedule(&late, Instant::now() + Duration::from_secs(3600));
        // The task now sleeps until the far deadline; the kick must bring it forward.
        tokio::task::yield_now().await;
        timers.schedule(&early, Instant::now() + Duration::from_millis(20));
        assert!(woken(&early, Duration::from_secs(5)).await);
        assert!(!woken(&late, Duration::from_millis(50)).await);
        assert_eq!(timers.len(), 1);
    }

    #[tokio::test]
    async fn entries_of_ended_connections_are_swept_as_the_heap_grows() {
        let timers = Timers::new();
        let far = Instant::now() + Duration::from_secs(3600);
        let live = conn("live");
        timers.schedule(&live, far);
        for i in 0..10 * SWEEP_FLOOR {
            let c = conn(&format!("gone-{i}"));
            timers.schedule(&c, far);
        }
        assert!(
            timers.len() < 2 * SWEEP_FLOOR,
            "{} entries held for one live connection",
            timers.len()
        );
        assert!(entries(&timers, |e| e.conn.ptr_eq(&Arc::downgrade(&live))).contains(&true));
    }

    #[tokio::test]
    async fn the_task_ends_with_the_timers() {
        let timers = Timers::new();
        let c = conn("a");
        timers.schedule(&c, Instant::now() + Duration::from_secs(3600));
        let inner = Arc::downgrade(&timers.inner);
        drop(timers);
        let deadline = Instant::now() + Duration::from_secs(5);
        while inner.strong_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "the timer task still holds the timers"
            );
            tokio::task::yield_now().await;
        }
    }
}
