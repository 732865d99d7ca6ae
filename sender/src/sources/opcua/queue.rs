//! The hand-off from async-opcua's data-change callback to the source's
//! task. The callback is synchronous and runs on the client's event loop,
//! so it cannot wait; the queue between them is bounded in bytes instead.
//! When the source's task falls that far behind (a starved runtime, a
//! server flooding changes), a change that does not fit is dropped and
//! counted against its tag; the next drain appends one bad-quality point
//! with status `overflow` per tag that lost changes, so the gap in its
//! values is visible at the receiver, as a lost connection's is.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;
use weir_protocol::{Point, Value, QUALITY_BAD};

/// The bound of one source's queue: about 100,000 numeric changes.
pub const QUEUE_BYTES: usize = 16 << 20;

/// The status of the point that marks changes dropped on overflow.
pub const OVERFLOW: &str = "overflow";

/// Bytes a queued point is charged: its strings, its value and the rest.
fn cost(p: &Point) -> usize {
    let value = match &p.value {
        Value::Str(s) => s.len(),
        _ => 8,
    };
    64 + p.tag.len() + value + p.status.as_ref().map_or(0, |s| s.len())
}

#[derive(Default)]
struct Inner {
    points: VecDeque<Point>,
    bytes: usize,
    /// Changes dropped since the last drain, by tag.
    dropped: BTreeMap<String, u64>,
}

pub struct Changes {
    inner: Mutex<Inner>,
    ready: Notify,
    limit: usize,
}

/// What one drain took: the points in arrival order (overflow markers
/// last) and how many changes were dropped since the previous drain.
#[derive(Debug, Default)]
pub struct Drained {
    pub points: Vec<Point>,
    pub dropped: u64,
    pub tags_dropped: usize,
}

impl Changes {
    pub fn new(limit: usize) -> Self {
        Changes {
            inner: Mutex::default(),
            ready: Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a change, or drops and counts it when it does not fit.
    pub fn push(&self, p: Point) {
        let c = cost(&p);
        let mut q = self.lock();
        if q.bytes + c > self.limit {
            *q.dropped.entry(p.tag).or_default() += 1;
        } else {
            q.bytes += c;
            q.points.push_back(p);
        }
        drop(q);
        self.ready.notify_one();
    }

    /// Resolves once something was pushed since the last wake-up (a push
    /// before the wait is not missed: its permit is kept).
    pub async fn wait(&self) {
        self.ready.notified().await;
    }

    /// Takes everything queued, plus one `overflow` point (at `now_ns`)
    /// per tag that lost changes since the last drain.
    pub fn drain(&self, now_ns: i64) -> Drained {
        let (points, dropped) = {
            let mut q = self.lock();
            q.bytes = 0;
            (
                std::mem::take(&mut q.points),
                std::mem::take(&mut q.dropped),
            )
        };
        let mut out = Drained {
            points: Vec::from(points),
            dropped: dropped.values().sum(),
            tags_dropped: dropped.len(),
        };
        out.points.extend(dropped.into_keys().map(|tag| Point {
            tag,
            ts_ns: now_ns,
            value: Value::F64(f64::NAN),
            quality: QUALITY_BAD,
            status: Some(OVERFLOW.into()),
        }));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_protocol::QUALITY_GOOD;

    fn point(tag: &str, v: f64) -> Point {
        Point {
            tag: tag.into(),
            ts_ns: 1,
            value: Value::F64(v),
            quality: QUALITY_GOOD,
            status: None,
        }
    }

    #[test]
    fn changes_beyond_the_byte_bound_are_dropped_counted_by_tag_and_marked_bad_once_per_tag() {
        let one = cost(&point("a", 0.0));
        let q = Changes::new(3 * one);
        q.push(point("a", 1.0));
        q.push(point("b", 2.0));
        q.push(point("a", 3.0));
        // Full: these three are dropped.
        q.push(point("a", 4.0));
        q.push(point("b", 5.0));
        q.push(point("a", 6.0));
        let d = q.drain(99);
        assert_eq!((d.dropped, d.tags_dropped), (3, 2));
        let kept: Vec<(&str, Option<&str>)> = d
            .points
            .iter()
            .map(|p| (p.tag.as_str(), p.status.as_deref()))
            .collect();
        assert_eq!(
            kept,
            [
                ("a", None),
                ("b", None),
                ("a", None),
                ("a", Some(OVERFLOW)),
                ("b", Some(OVERFLOW))
            ]
        );
        let marker = &d.points[3];
        assert_eq!((marker.quality, marker.ts_ns), (QUALITY_BAD, 99));
        // The drain freed the room and reset the count.
        q.push(point("a", 7.0));
        let d = q.drain(100);
        assert_eq!((d.points.len(), d.dropped), (1, 0));
    }

    #[test]
    fn a_string_value_is_charged_its_length() {
        let big = Point {
            value: Value::Str("x".repeat(1000)),
            ..point("s", 0.0)
        };
        let q = Changes::new(cost(&point("s", 0.0)) * 4);
        q.push(big);
        let d = q.drain(0);
        assert_eq!((d.points.len(), d.dropped), (1, 1));
        assert_eq!(d.points[0].status.as_deref(), Some(OVERFLOW));
    }

    #[tokio::test]
    async fn a_push_before_the_wait_wakes_it() {
        let q = Changes::new(QUEUE_BYTES);
        q.push(point("a", 1.0));
        tokio::time::timeout(std::time::Duration::from_secs(5), q.wait())
            .await
            .expect("the push's wake-up was kept");
        assert_eq!(q.drain(0).points.len(), 1);
    }
}
