//! A sender-side pacer: keeps the average rate at a target with a small
//! bounded burst, by sleeping the calling (dedicated) thread.

use std::time::{Duration, Instant};

/// How far the pacer lets a sender fall behind schedule and then catch up
/// at full speed. Small, so a stall (e.g. a full socket buffer) is not
/// followed by a burst that overruns the receiver.
const MAX_CATCH_UP: Duration = Duration::from_micros(500);

/// Sleeps shorter than this are skipped and carried over; the kernel's
/// timer slack makes them inaccurate and they cost a syscall each.
const MIN_SLEEP: Duration = Duration::from_micros(100);

pub struct Pacer {
    bytes_per_second: Option<u64>,
    /// The time at which everything passed to `pace` so far is due.
    due: Instant,
    /// Total time spent sleeping, for the report.
    slept: Duration,
}

impl Pacer {
    /// `None` means unlimited.
    pub fn new(bytes_per_second: Option<u64>) -> Self {
        Self {
            bytes_per_second: bytes_per_second.filter(|&r| r > 0),
            due: Instant::now(),
            slept: Duration::ZERO,
        }
    }

    /// Accounts for `bytes` about to be sent, sleeping first if the sender is
    /// ahead of schedule.
    pub fn pace(&mut self, bytes: u64) {
        let Some(rate) = self.bytes_per_second else {
            return;
        };
        let now = Instant::now();
        let floor = now.checked_sub(MAX_CATCH_UP).unwrap_or(now);
        if self.due < floor {
            self.due = floor;
        }
        let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(rate);
        self.due += Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        if let Some(ahead) = self.due.checked_duration_since(now) {
            if ahead >= MIN_SLEEP {
                std::thread::sleep(ahead);
                self.slept += ahead;
            }
        }
    }

    /// Total time spent sleeping so far.
    pub fn slept(&self) -> Duration {
        self.slept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_sleeps() {
        let mut p = Pacer::new(None);
        for _ in 0..1000 {
            p.pace(1 << 20);
        }
        assert_eq!(p.slept(), Duration::ZERO);
    }

    #[test]
    fn paced_rate_is_close_to_target() {
        // 10 MB/s, 1 MB in 64 KB pieces: about 100 ms.
        let mut p = Pacer::new(Some(10_000_000));
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < 1_000_000 {
            p.pace(65_536);
            sent += 65_536;
        }
        let secs = start.elapsed().as_secs_f64();
        // The last piece is paced before it is sent, so ~1.05 MB are due.
        assert!(secs > 0.08, "too fast: {secs}");
        assert!(secs < 0.5, "too slow: {secs}");
    }
}
