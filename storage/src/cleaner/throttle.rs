//! The cleaner's I/O rate limit, shared by every cleaner thread of a broker: bytes read and
//! written by cleaning count against one budget, so compaction leaves the disk to producers.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far ahead of the clock the budget may be spent before a caller sleeps; lets short
/// bursts through without a sleep per batch.
const BURST: Duration = Duration::from_millis(50);

/// Sleeps callers so that, together, they move at most `bytes_per_second`. `0` is no limit.
#[derive(Debug)]
pub struct IoThrottle {
    bytes_per_second: u64,
    /// When the bytes counted so far will have been paid for.
    paid_until: Mutex<Option<Instant>>,
}

impl IoThrottle {
    pub fn new(bytes_per_second: u64) -> IoThrottle {
        IoThrottle {
            bytes_per_second,
            paid_until: Mutex::new(None),
        }
    }

    /// No limit.
    pub fn unlimited() -> IoThrottle {
        IoThrottle::new(0)
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// Counts `bytes` and sleeps this (blocking) thread while the budget is overspent.
    pub fn take(&self, bytes: u64) {
        if self.bytes_per_second == 0 || bytes == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        let now = Instant::now();
        let wake = {
            let mut paid = self
                .paid_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let until = paid.map_or(now, |p| p.max(now)) + cost;
            *paid = Some(until);
            until
        };
        if let Some(ahead) = wake.checked_duration_since(now + BURST) {
            std::thread::sleep(ahead);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_holds_callers_to_its_rate() {
        let t = IoThrottle::new(1 << 20);
        let start = Instant::now();
        for _ in 0..8 {
            t.take(64 << 10);
        }
        // 512 KiB at 1 MiB/s is half a second, less the burst allowance.
        assert!(start.elapsed() >= Duration::from_millis(400), "{:?}", start.elapsed());
    }
}
