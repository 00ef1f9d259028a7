//! The clocks: a cheap monotonic millisecond clock for cooldowns and expiries kept in
//! atomics (and a throttle on it for warnings), and the UTC wall clock that limit windows
//! and the request log follow. Decisions in `pure/` never read these: they are handed `now`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the process first asked; never 0, so 0 can mean "unset".
pub fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

/// Microseconds since the process first asked.
pub fn now_us() -> u64 {
    u64::try_from(epoch().elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Seconds since the Unix epoch, UTC.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Milliseconds since the Unix epoch, UTC: the request log's timestamps.
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Says yes at most once per interval: for warnings a busy gateway would otherwise log
/// once a request (a store that does not answer, a collector that is down).
#[derive(Debug)]
pub struct Throttle {
    every_ms: u64,
    /// When it last said yes (`now_ms`), 0 for never.
    last: AtomicU64,
}

impl Throttle {
    pub const fn new(every: Duration) -> Self {
        let ms = every.as_millis();
        Self {
            every_ms: if ms > u64::MAX as u128 {
                u64::MAX
            } else {
                ms as u64
            },
            last: AtomicU64::new(0),
        }
    }

    /// Whether the interval has passed since it last said yes; if so, it starts again.
    pub fn ready(&self) -> bool {
        let now = now_ms();
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now >= last.saturating_add(self.every_ms);
        due && self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_says_yes_once_per_interval() {
        let throttle = Throttle::new(Duration::from_millis(50));
        assert!(throttle.ready());
        assert!(!throttle.ready());
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            throttle.ready(),
            "due again after the interval, however often it was asked"
        );
        assert!(!throttle.ready());
    }
}
