//! The bounded in-memory queue between sources and the link thread.
//! Pushing never blocks a source: when the byte bound is reached the oldest
//! records are dropped, counted and logged with their sequence ranges, and
//! their sequence numbers never reach the link, so the receiver records
//! the hole as a gap.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use weir_protocol::{Record, RecordBody};

use crate::metrics::Counters;

/// Approximate memory a record holds in the queue.
pub fn record_size(r: &Record) -> usize {
    64 + match &r.body {
        RecordBody::Point(p) => {
            p.tag.len()
                + if let weir_protocol::Value::Str(s) = &p.value {
                    s.len()
                } else {
                    0
                }
        }
        RecordBody::Message(m) => m.topic.len() + m.payload.len(),
        RecordBody::Log(l) => l.host.len() + l.app.len() + l.text.len(),
        RecordBody::Bytes(c) => c.data.len(),
    }
}

struct Inner {
    items: VecDeque<(Record, usize)>,
    bytes: usize,
    /// Dropped since the last log line: (stream, first seq, last seq, count).
    dropped: Vec<(u32, u64, u64, u64)>,
    last_drop_log: Option<Instant>,
}

pub struct Queue {
    inner: Mutex<Inner>,
    ready: Condvar,
    max_bytes: usize,
    /// Flow-controlled sources (tcp, stdin) stop reading above this.
    high_water: usize,
    /// Woken when the queue drains below `high_water`.
    room: tokio::sync::Notify,
    counters: Arc<Counters>,
}

/// A byte stream needs little queue to keep the link busy; pausing its
/// reader early keeps memory and cache footprint small.
const STREAM_HIGH_WATER: usize = 16 << 20;

impl Queue {
    pub fn new(max_bytes: usize, counters: Arc<Counters>) -> Self {
        Queue {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                bytes: 0,
                dropped: Vec::new(),
                last_drop_log: None,
            }),
            ready: Condvar::new(),
            max_bytes,
            high_water: (max_bytes / 2).min(STREAM_HIGH_WATER),
            room: tokio::sync::Notify::new(),
            counters,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug elsewhere; the queue's
        // contents are still consistent, so keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a record, dropping the oldest if the bound is hit. Never blocks
    /// for longer than the lock is held.
    pub fn push(&self, record: Record, names: &dyn Fn(u32) -> String) {
        let size = record_size(&record);
        let mut inner = self.lock();
        while inner.bytes + size > self.max_bytes {
            let Some((old, old_size)) = inner.items.pop_front() else {
                break;
            };
            inner.bytes -= old_size;
            Counters::add(&self.counters.queue_dropped_records, 1);
            Counters::add(&self.counters.queue_dropped_bytes, old_size as u64);
            match inner
                .dropped
                .iter_mut()
                .find(|d| d.0 == old.stream && d.2 + 1 == old.seq)
            {
                Some(d) => {
                    d.2 = old.seq;
                    d.3 += 1;
                }
                None => inner.dropped.push((old.stream, old.seq, old.seq, 1)),
            }
        }
        if !inner.dropped.is_empty()
            && inner
                .last_drop_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            for (stream, from, to, n) in inner.dropped.drain(..) {
                tracing::warn!(stream = %names(stream), from, to, records = n,
                    "queue full (queue.max_bytes): dropped oldest records; the receiver will report them as a gap");
            }
            inner.last_drop_log = Some(Instant::now());
        }
        inner.bytes += size;
        inner.items.push_back((record, size));
        drop(inner);
        self.ready.notify_one();
    }

    /// Moves up to `max` records into `out`, waiting up to `wait` for the first.
    pub fn pop_batch(&self, out: &mut Vec<Record>, max: usize, wait: Duration) {
        let mut inner = self.lock();
        if inner.items.is_empty() && !wait.is_zero() {
            inner = self
                .ready
                .wait_timeout(inner, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let n = inner.items.len().min(max);
        let mut freed = 0;
        for (record, size) in inner.items.drain(..n) {
            freed += size;
            out.push(record);
        }
        inner.bytes -= freed;
        if freed > 0 && inner.bytes <= self.high_water {
            self.room.notify_waiters();
        }
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Waits until the queue is at or below its high-water mark (or a
    /// bounded time passed; the caller re-checks).
    pub async fn room(&self) {
        let notified = self.room.notified();
        if self.bytes() <= self.high_water {
            return;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), notified).await;
    }

    pub fn has_room(&self) -> bool {
        self.bytes() <= self.high_water
    }

    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// Wakes the link thread (on shutdown).
    pub fn wake(&self) {
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_protocol::Chunk;

    fn rec(seq: u64, len: usize) -> Record {
        Record {
            stream: 0,
            seq,
            resent: false,
            body: RecordBody::Bytes(Chunk {
                data: vec![0; len],
                end: false,
            }),
        }
    }

    #[test]
    fn a_full_queue_drops_oldest_first_and_counts_them() {
        let counters = Arc::new(Counters::default());
        let q = Queue::new(10_000, counters.clone());
        for seq in 0..20 {
            q.push(rec(seq, 936), &|_| "s".into());
        }
        let mut out = Vec::new();
        q.pop_batch(&mut out, 100, Duration::ZERO);
        assert_eq!(out.len(), 10);
        assert_eq!(out.first().unwrap().seq, 10, "the oldest ten were dropped");
        assert_eq!(
            counters
                .queue_dropped_records
                .load(std::sync::atomic::Ordering::Relaxed),
            10
        );
    }
}
