//! The last hour of the link for the status page's charts: one sample
//! every [`SAMPLE_EVERY`] (records, bytes, FEC repairs and losses in that
//! interval), at most [`SAMPLES`] of them, oldest dropped first. Fed from
//! the journal thread's tick with the totals since start.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Time between two samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Samples kept: 360 × 10 s is the last hour.
pub const SAMPLES: usize = 360;
/// Sink error counts kept for a sink's health: 7 × 10 s spans the last minute.
const SINK_ERROR_SAMPLES: usize = 7;

/// Counters since start that the charts take differences of.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub records: u64,
    pub bytes: u64,
    pub blocks_repaired: u64,
    pub shards_rebuilt: u64,
    /// Blocks given up (fewer than k shards, or none seen).
    pub blocks_lost: u64,
    pub gap_records: u64,
}

/// What happened in one interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Unix time of the interval's end, nanoseconds.
    pub end_ns: i64,
    pub seconds: f64,
    pub delta: Totals,
}

impl Sample {
    pub fn records_per_second(&self) -> f64 {
        rate(self.delta.records, self.seconds)
    }
}

fn rate(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    /// Where the current interval started, and the totals then.
    start: Option<(Instant, Totals)>,
    /// The newest totals and when: the interval in progress.
    latest: Option<(Instant, i64, Totals)>,
    /// Per sink error counts at the last samples, oldest first.
    sink_errors: VecDeque<Vec<u64>>,
    latest_sink_errors: Vec<u64>,
}

impl History {
    /// Notes the totals at `now` (`wall_ns` its Unix time); closes the
    /// interval into a sample once it is [`SAMPLE_EVERY`] long.
    pub fn tick(&mut self, now: Instant, wall_ns: i64, totals: Totals, sink_errors: Vec<u64>) {
        let Some((since, at_start)) = self.start else {
            self.start = Some((now, totals));
            self.sink_errors.push_back(sink_errors.clone());
            self.latest = Some((now, wall_ns, totals));
            self.latest_sink_errors = sink_errors;
            return;
        };
        self.latest = Some((now, wall_ns, totals));
        self.latest_sink_errors = sink_errors.clone();
        let elapsed = now.saturating_duration_since(since);
        if elapsed < SAMPLE_EVERY {
            return;
        }
        self.samples.push_back(Sample {
            end_ns: wall_ns,
            seconds: elapsed.as_secs_f64(),
            delta: diff(&totals, &at_start),
        });
        while self.samples.len() > SAMPLES {
            self.samples.pop_front();
        }
        self.sink_errors.push_back(sink_errors);
        while self.sink_errors.len() > SINK_ERROR_SAMPLES {
            self.sink_errors.pop_front();
        }
        self.start = Some((now, totals));
    }

    /// The closed samples, oldest first, then the interval in progress
    /// (when it is at least a second long), so a fresh receiver's charts
    /// are not empty.
    pub fn samples(&self) -> Vec<Sample> {
        let mut out: Vec<Sample> = self.samples.iter().copied().collect();
        if let (Some((since, at_start)), Some((now, wall, totals))) = (self.start, self.latest) {
            let seconds = now.saturating_duration_since(since).as_secs_f64();
            if seconds >= 1.0 {
                out.push(Sample {
                    end_ns: wall,
                    seconds,
                    delta: diff(&totals, &at_start),
                });
            }
        }
        out
    }

    /// Errors of sink `i` over about the last minute.
    pub fn recent_sink_errors(&self, i: usize) -> u64 {
        let now = self.latest_sink_errors.get(i).copied().unwrap_or(0);
        let then = self
            .sink_errors
            .front()
            .and_then(|v| v.get(i))
            .copied()
            .unwrap_or(now);
        now.saturating_sub(then)
    }
}

fn diff(a: &Totals, b: &Totals) -> Totals {
    Totals {
        records: a.records.saturating_sub(b.records),
        bytes: a.bytes.saturating_sub(b.bytes),
        blocks_repaired: a.blocks_repaired.saturating_sub(b.blocks_repaired),
        shards_rebuilt: a.shards_rebuilt.saturating_sub(b.shards_rebuilt),
        blocks_lost: a.blocks_lost.saturating_sub(b.blocks_lost),
        gap_records: a.gap_records.saturating_sub(b.gap_records),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(records: u64, repaired: u64) -> Totals {
        Totals {
            records,
            blocks_repaired: repaired,
            ..Default::default()
        }
    }

    #[test]
    fn one_sample_per_interval_and_never_more_than_an_hour_of_them() {
        let t0 = Instant::now();
        let mut h = History::default();
        // 250 ms ticks for two hours; 100 records and one repair per tick.
        for i in 0..=(2 * 3600 * 4u64) {
            let now = t0 + Duration::from_millis(250 * i);
            h.tick(now, (i * 250_000_000) as i64, totals(100 * i, i), vec![0]);
        }
        let s = h.samples();
        assert_eq!(
            s.len(),
            SAMPLES,
            "an hour of closed samples, no partial one"
        );
        let last = s[s.len() - 1];
        assert_eq!(last.delta.records, 4000);
        assert_eq!(last.delta.blocks_repaired, 40);
        assert!((last.records_per_second() - 400.0).abs() < 1e-9);
        assert_eq!(last.end_ns, 2 * 3600 * 1_000_000_000);
    }

    #[test]
    fn the_interval_in_progress_is_shown_and_sink_errors_are_counted_over_the_last_minute() {
        let t0 = Instant::now();
        let mut h = History::default();
        h.tick(t0, 0, totals(0, 0), vec![0, 5]);
        assert!(h.samples().is_empty(), "nothing to show yet");
        h.tick(t0 + Duration::from_secs(2), 2, totals(50, 0), vec![0, 7]);
        let s = h.samples();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].delta.records, s[0].seconds), (50, 2.0));
        assert_eq!(h.recent_sink_errors(0), 0);
        assert_eq!(h.recent_sink_errors(1), 2);
        // Past a minute without errors the sink is healthy again.
        for k in 1..=8u64 {
            h.tick(
                t0 + Duration::from_secs(10 * k),
                k as i64,
                totals(50, 0),
                vec![0, 7],
            );
        }
        assert_eq!(h.recent_sink_errors(1), 0);
    }
}
