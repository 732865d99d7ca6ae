//! Delivery: what is the same for every sink, in one place. Each sink runs
//! on its own thread (`run_sink`), which takes journal batches in order and
//! for each one
//! - routes it (the sink's `streams` globs and its `kinds`),
//! - drops records the sink already confirmed: a record whose stream is at
//!   the same epoch and a sequence at or past it is a replay (counted in
//!   `sink.NAME.duplicates`); the positions start from what a transactional
//!   sink's destination stored (`Sink::stored_positions`),
//! - writes it, taking the sink's word for how much is confirmed; the rest
//!   is offered again, after a failure with a jittered backoff (100 ms
//!   doubling to 10 s), and a record rejected for good goes to the sink's
//!   dead-letter file,
//! - moves the sink's confirmed cursor past the batch only once all of it is
//!   confirmed or dead-lettered, and hands the cursor (with the sink's
//!   resume state) to a scoped `cursor-{sink}` thread that saves it, so a
//!   batch never waits for a cursor fsync.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use globset::GlobSet;
use serde_json::Value;
use weir_protocol::decoder::Delivered;

use crate::sinks::{json_line, Kinds, Sink, SinkError};

/// Journal entries `start..end` handed to a sink: the records among them.
pub struct Batch {
    pub start: u64,
    pub end: u64,
    pub records: Arc<Vec<Delivered>>,
    /// What the batch weighs in `SinkShared::in_flight_bytes`: its journal
    /// bytes or its records' size in memory, whichever is larger
    /// (`pipeline::batch_weight`).
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub struct SinkStats {
    pub records: AtomicU64,
    pub batches: AtomicU64,
    pub errors: AtomicU64,
    pub retries: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Records dropped as already confirmed (replays by stream/epoch/seq).
    pub duplicates: AtomicU64,
}

/// What the journal thread and a sink thread share.
pub struct SinkShared {
    pub name: String,
    /// Journal entries below this are confirmed by the sink.
    pub confirmed: AtomicU64,
    /// The index of the last cursor saved to disk: what a restart resumes
    /// from, so compaction never drops an entry at or after it.
    pub saved: AtomicU64,
    /// Batches sent to the sink thread and not yet taken.
    pub in_flight: AtomicUsize,
    /// Journal bytes of the batches in `in_flight`, and the most seen.
    pub in_flight_bytes: AtomicU64,
    pub in_flight_bytes_peak: AtomicU64,
    /// Cursor saves that failed (each logged; the cursor saver tries again).
    pub cursor_errors: AtomicU64,
    /// Records dropped for this sink by journal overflow (audited as gaps).
    pub overflow_records: AtomicU64,
    pub stats: SinkStats,
    /// Source-to-confirmation latency per stream (the stream catalogue).
    pub latency: Mutex<crate::catalogue::LatencyBook>,
    /// The sink's own counters (`BuildContext::counter`), set before the
    /// sink thread starts.
    pub counters: Vec<crate::sinks::SinkCounter>,
}

impl SinkShared {
    /// A sink's shared state, resuming at journal index `start` (its saved
    /// cursor): nothing in flight, no counts yet.
    pub fn new(name: &str, start: u64) -> Self {
        SinkShared {
            name: name.to_string(),
            confirmed: AtomicU64::new(start),
            saved: AtomicU64::new(start),
            in_flight: AtomicUsize::new(0),
            in_flight_bytes: AtomicU64::new(0),
            in_flight_bytes_peak: AtomicU64::new(0),
            cursor_errors: AtomicU64::new(0),
            overflow_records: AtomicU64::new(0),
            stats: SinkStats::default(),
            latency: Mutex::new(Default::default()),
            counters: Vec::new(),
        }
    }
}

/// Backoff between retries of a failed write: doubles from 100 ms to 10 s,
/// each wait jittered by ±50%.
const RETRY_START: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Cursor saves are at most this frequent (each is an fsync).
const CURSOR_INTERVAL: Duration = Duration::from_millis(100);
/// Most records a sink writes at once from batches that queued up while it
/// wrote the last: as many as the journal thread puts in one batch, so a
/// write is never much larger than a batch can be anyway. (The batches are
/// in memory already, bounded by `SINK_QUEUE_BYTES`: this bounds the size
/// of a write, not memory.)
const GROUP_RECORDS: usize = crate::pipeline::BATCH_RECORDS;

pub struct SinkThread {
    pub shared: Arc<SinkShared>,
    pub sink: Box<dyn Sink>,
    pub routes: GlobSet,
    /// The record kinds the sink takes (`kinds`).
    pub kinds: Kinds,
    pub batches: Receiver<Batch>,
    pub abort: Arc<AtomicBool>,
    pub cursor_path: PathBuf,
    pub dead_letter_path: PathBuf,
}

/// The latest cursor a sink thread confirmed, waiting for its saver.
#[derive(Default)]
struct CursorSlot {
    state: Mutex<CursorSlotState>,
    changed: Condvar,
}

#[derive(Default)]
struct CursorSlotState {
    next: Option<(u64, Value)>,
    done: bool,
}

impl CursorSlot {
    fn lock(&self) -> MutexGuard<'_, CursorSlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces any cursor not yet taken: only the newest matters.
    fn put(&self, index: u64, resume: Value) {
        self.lock().next = Some((index, resume));
        self.changed.notify_one();
    }

    fn finish(&self) {
        self.lock().done = true;
        self.changed.notify_one();
    }
}

/// A sink's cursor saver: saves the newest cursor put in `slot`, off the
/// sink thread (a save is an fsync, and the next batch does not wait for
/// it). One at a time, so saves are in order; a failed save is tried again
/// after `CURSOR_INTERVAL` unless a newer cursor replaced it. After
/// `finish` it saves what is left once and ends.
fn run_cursor_saver(shared: &SinkShared, path: &Path, slot: &CursorSlot) {
    let mut failed: Option<(u64, Value)> = None;
    loop {
        let (next, done) = {
            let mut s = slot.lock();
            if s.next.is_none() && !s.done {
                s = match failed {
                    Some(_) => {
                        slot.changed
                            .wait_timeout(s, CURSOR_INTERVAL)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    None => slot.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
                };
            }
            (s.next.take(), s.done)
        };
        let job = match next {
            Some(newer) => Some(newer),
            None => failed.take(),
        };
        failed = None;
        if let Some((index, resume)) = job {
            if !save_cursor(shared, path, index, resume.clone()) {
                failed = Some((index, resume));
            }
        }
        if done {
            return;
        }
    }
}

/// The loop of one sink's thread (see the module doc). Ends when the
/// decoder side hangs up (after writing what it was given, and saving its
/// cursor), or when `abort` is set while retrying.
pub fn run_sink(t: SinkThread) {
    let (shared, cursor_path) = (t.shared.clone(), t.cursor_path.clone());
    let slot = CursorSlot::default();
    std::thread::scope(|scope| {
        let saver = std::thread::Builder::new()
            .name(format!("cursor-{}", shared.name))
            .spawn_scoped(scope, || run_cursor_saver(&shared, &cursor_path, &slot))
            .expect("starting the sink's cursor saver thread");
        let save = |index: u64, resume: Value| {
            // A saver that died would leave the cursor behind for good:
            // the sink thread dies with it, which stops the receiver.
            assert!(!saver.is_finished(), "the sink's cursor saver thread died");
            slot.put(index, resume);
        };
        // Also when the sink panics: the scope waits for the saver before
        // the panic goes on to end the thread (which stops the receiver).
        let _finish = FinishOnDrop(&slot);
        sink_loop(t, save);
    });
}

/// Ends the cursor saver when the sink loop ends, however it ends.
struct FinishOnDrop<'a>(&'a CursorSlot);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Each stream's last confirmed (epoch, seq) for one sink: what a replay is
/// recognised by. Records mostly come in runs of one stream, and the
/// decoder hands out one `Arc` per stream, so the last stream is kept to
/// skip hashing its name.
#[derive(Default)]
struct Positions {
    map: HashMap<Arc<str>, (u64, u64)>,
    last: Option<(Arc<str>, (u64, u64))>,
}

impl Positions {
    fn is_last(&self, stream: &Arc<str>) -> bool {
        // Catch-up batches read from the journal carry other `Arc`s of
        // the same name: the pointer is only the fast path.
        self.last
            .as_ref()
            .is_some_and(|(s, _)| Arc::ptr_eq(s, stream) || **s == **stream)
    }

    fn get(&mut self, stream: &Arc<str>) -> Option<(u64, u64)> {
        if self.is_last(stream) {
            return self.last.as_ref().map(|(_, p)| *p);
        }
        self.map.get(stream).copied()
    }

    fn set(&mut self, stream: &Arc<str>, at: (u64, u64)) {
        if self.is_last(stream) {
            if let Some((_, p)) = &mut self.last {
                *p = at;
            }
            return;
        }
        if let Some((s, p)) = self.last.take() {
            self.map.insert(s, p);
        }
        self.map.remove(stream);
        self.last = Some((stream.clone(), at));
    }

    /// True when `r` is at or below what was confirmed in its epoch (a
    /// replay); otherwise it becomes the stream's position. Resent records
    /// fill older gaps: never replays, and they do not move the position.
    fn is_replay(&mut self, r: &Delivered) -> bool {
        if r.resent {
            return false;
        }
        match self.get(&r.stream) {
            Some((epoch, seq)) if epoch == r.epoch && r.seq <= seq => true,
            _ => {
                self.set(&r.stream, (r.epoch, r.seq));
                false
            }
        }
    }
}

/// Whether this sink's `streams` globs take a stream, per stream name.
/// Records come in runs of one stream (one `Arc` per stream from the
/// decoder), so the last answer is kept to skip hashing the name.
#[derive(Default)]
struct Routed {
    map: HashMap<Arc<str>, bool>,
    last: Option<(Arc<str>, bool)>,
}

impl Routed {
    fn get(&mut self, stream: &Arc<str>, routes: &GlobSet) -> bool {
        if let Some((s, taken)) = &self.last {
            if Arc::ptr_eq(s, stream) {
                return *taken;
            }
        }
        let taken = *self
            .map
            .entry(stream.clone())
            .or_insert_with(|| routes.is_match(&**stream));
        self.last = Some((stream.clone(), taken));
        taken
    }
}

/// Waits out a retry's backoff; false when `abort` ends the wait (shutdown
/// gave up on the sink).
fn back_off(delay: &mut Duration, abort: &AtomicBool) -> bool {
    // Jitter (0.5x to 1.5x) so sinks failing together do not retry in step.
    let until = Instant::now() + delay.mul_f64(rand::random::<f64>() + 0.5);
    *delay = (*delay * 2).min(RETRY_MAX);
    while Instant::now() < until {
        if abort.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    !abort.load(Ordering::Relaxed)
}

fn sink_loop(t: SinkThread, save: impl Fn(u64, Value)) {
    let SinkThread {
        shared,
        mut sink,
        routes,
        kinds,
        batches,
        abort,
        cursor_path: _,
        dead_letter_path,
    } = t;
    let name = shared.name.clone();
    let mut routed = Routed::default();
    let mut positions = Positions::default();
    let mut stored_loaded = false;
    // The last batches written together, offered again after a failure of
    // a sink that cannot know what its destination kept
    // (`Sink::unconfirmed_loss`).
    let mut previous: Vec<Arc<Vec<Delivered>>> = Vec::new();
    let mut last_end = 0;
    let mut last_save = Instant::now() - CURSOR_INTERVAL;
    let mut unsaved: Option<u64> = None;
    loop {
        let batch = match batches.recv_timeout(CURSOR_INTERVAL) {
            Ok(b) => b,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some(end) = unsaved.take() {
                    save(end, sink.resume_state());
                    last_save = Instant::now();
                }
                sink.idle();
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        // Under load batches queue up while the sink writes: they are
        // written together, one write and one confirmation (one fsync for
        // the file sink) for all, instead of one each.
        let mut group = vec![batch];
        let mut group_records = group[0].records.len();
        while group_records < GROUP_RECORDS {
            match batches.try_recv() {
                Ok(b) => {
                    group_records += b.records.len();
                    group.push(b);
                }
                Err(_) => break,
            }
        }
        for b in &group {
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            shared.in_flight_bytes.fetch_sub(b.bytes, Ordering::Relaxed);
            // Batches come in journal order; a jump forward is an overflow skip.
            debug_assert!(
                b.start >= last_end && b.start <= b.end,
                "batch {}..{} after {last_end}",
                b.start,
                b.end
            );
            last_end = b.end;
        }
        let end = last_end;
        // A transactional destination says what it holds, once, before the
        // first write: retried like a write while it is unreachable.
        let mut delay = RETRY_START;
        while !stored_loaded {
            match sink.stored_positions() {
                Ok(stored) => {
                    for p in stored.into_iter().flatten() {
                        positions.set(&Arc::from(p.stream.as_str()), (p.epoch, p.seq));
                    }
                    stored_loaded = true;
                }
                Err(e) => {
                    shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(sink = %name, retry_in_ms = delay.as_millis() as u64, "cannot read the positions the destination stored: {e:#}");
                    shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if !back_off(&mut delay, &abort) {
                        tracing::error!(sink = %name, "giving up at shutdown; the batch stays in the journal");
                        return;
                    }
                }
            }
        }
        let mut replays = 0u64;
        let mut pending: Vec<&Delivered> = group
            .iter()
            .flat_map(|b| b.records.iter())
            .filter(|r| kinds.contains(&r.body) && routed.get(&r.stream, &routes))
            .filter(|r| {
                let replay = positions.is_replay(r);
                replays += replay as u64;
                !replay
            })
            .collect();
        if replays > 0 {
            shared
                .stats
                .duplicates
                .fetch_add(replays, Ordering::Relaxed);
            tracing::info!(sink = %name, records = replays, "skipped records this sink had already confirmed (a replay); counted in sink.{name}.duplicates");
        }
        let mut delay = RETRY_START;
        let mut replayed = false;
        let mut confirmed_records = 0u64;
        while !pending.is_empty() {
            let failure = match sink.write(&pending) {
                Ok(n) if n > 0 => {
                    let n = n.min(pending.len());
                    note_latency(&shared, &pending[..n]);
                    pending.drain(..n);
                    confirmed_records += n as u64;
                    delay = RETRY_START;
                    continue;
                }
                Ok(_) => anyhow::anyhow!(
                    "the sink confirmed none of {} records without an error",
                    pending.len()
                ),
                Err(SinkError::Reject { at, reason }) => {
                    let at = at.min(pending.len() - 1);
                    note_latency(&shared, &pending[..at]);
                    pending.drain(..at);
                    confirmed_records += at as u64;
                    let rejected = pending.remove(0);
                    dead_letter(&name, &dead_letter_path, rejected, &reason);
                    shared.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(SinkError::Retry { confirmed, error }) => {
                    let n = confirmed.min(pending.len());
                    note_latency(&shared, &pending[..n]);
                    pending.drain(..n);
                    confirmed_records += n as u64;
                    error
                }
            };
            shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            if sink.unconfirmed_loss() && !replayed {
                replayed = true;
                if !previous.is_empty() {
                    let mut again: Vec<&Delivered> = previous
                        .iter()
                        .flat_map(|b| b.iter())
                        .filter(|r| kinds.contains(&r.body) && routed.get(&r.stream, &routes))
                        .collect();
                    again.append(&mut pending);
                    pending = again;
                }
            }
            if abort.load(Ordering::Relaxed) {
                tracing::error!(sink = %name, "giving up on a batch of {} records at shutdown; they stay in the journal: {failure:#}", pending.len());
                return;
            }
            tracing::warn!(sink = %name, retry_in_ms = delay.as_millis() as u64, "write failed: {failure:#}");
            shared.stats.retries.fetch_add(1, Ordering::Relaxed);
            if !back_off(&mut delay, &abort) {
                tracing::error!(sink = %name, "giving up on a batch of {} records at shutdown; they stay in the journal", pending.len());
                return;
            }
        }
        shared
            .stats
            .records
            .fetch_add(confirmed_records, Ordering::Relaxed);
        shared
            .stats
            .batches
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        shared.confirmed.store(end, Ordering::Release);
        previous = group.into_iter().map(|b| b.records).collect();
        unsaved = Some(end);
        if last_save.elapsed() >= CURSOR_INTERVAL {
            save(end, sink.resume_state());
            unsaved = None;
            last_save = Instant::now();
        }
    }
    if let Some(end) = unsaved {
        save(end, sink.resume_state());
    }
}

/// Measures the latency of records the sink just confirmed, from their
/// source timestamps to now (one clock read and one lock per write).
fn note_latency(shared: &SinkShared, confirmed: &[&Delivered]) {
    if confirmed.is_empty() {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    shared
        .latency
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .confirmed(confirmed.iter().copied(), now);
}

/// Saves the cursor; only then may compaction pass `index` (`saved`).
/// A failure is logged and counted, and the saver tries again.
fn save_cursor(shared: &SinkShared, path: &Path, index: u64, resume: Value) -> bool {
    let cursor = crate::journal::SinkCursor { index, resume };
    let bytes = serde_json::to_vec(&cursor).expect("json");
    match crate::journal::write_atomically(path, &bytes) {
        Ok(()) => {
            shared.saved.store(index, Ordering::Release);
            true
        }
        Err(e) => {
            shared.cursor_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(sink = %shared.name, "cannot save the sink cursor {}: {e:#}; the journal keeps everything after the last saved one", path.display());
            false
        }
    }
}

fn dead_letter(name: &str, path: &Path, record: &Delivered, reason: &str) {
    tracing::warn!(sink = %name, stream = %record.stream, seq = record.seq, "record rejected for good, written to the dead-letter file: {reason}");
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(b"{\"sink\":");
    json_line::write_str(&mut line, name);
    line.extend_from_slice(b",\"reason\":");
    json_line::write_str(&mut line, reason);
    line.extend_from_slice(b",\"at\":\"");
    json_line::write_rfc3339_ns(&mut line, json_line::now_ns());
    line.extend_from_slice(b"\",\"record\":");
    json_line::write_record(&mut line, record);
    line.extend_from_slice(b"}\n");
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| {
            use std::io::Write;
            f.write_all(&line)?;
            f.sync_data()
        });
    if let Err(e) = result {
        tracing::error!(sink = %name, "cannot write the dead-letter file {}: {e}; the record was: {}", path.display(), String::from_utf8_lossy(&line).trim());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_saver_retries_a_failed_save_and_saves_the_newest_at_finish() {
        let dir = std::env::temp_dir().join(format!("weir-cursor-saver-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sinks").join("s.json");
        let shared = SinkShared::new("s", 0);
        let slot = CursorSlot::default();
        std::thread::scope(|scope| {
            scope.spawn(|| run_cursor_saver(&shared, &path, &slot));
            // The directory is missing: the save fails and is counted.
            slot.put(5, Value::Null);
            let deadline = Instant::now() + Duration::from_secs(30);
            while shared.cursor_errors.load(Ordering::Relaxed) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "the failed save was never counted"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(shared.saved.load(Ordering::Relaxed), 0);
            // Once the disk is back, the retry saves it.
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            while shared.saved.load(Ordering::Relaxed) != 5 {
                assert!(
                    Instant::now() < deadline,
                    "the failed save was never retried"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            slot.put(6, Value::Null);
            slot.put(7, serde_json::json!({ "f": 1 }));
            slot.finish();
        });
        assert_eq!(
            shared.saved.load(Ordering::Relaxed),
            7,
            "the newest is saved at finish"
        );
        let saved = crate::journal::load_sink_cursor(&path).unwrap().unwrap();
        assert_eq!(
            (saved.index, saved.resume),
            (7, serde_json::json!({ "f": 1 }))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    use std::collections::VecDeque;

    use crate::sinks::Position;
    use weir_protocol::{Chunk, RecordBody};

    /// What the fake sink does on one call.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// Confirm the first n (at most all).
        Confirm(usize),
        /// Fail with nothing confirmed, or with the first n confirmed.
        Fail(usize),
        /// Reject the record at this place (the ones before it confirmed).
        Reject(usize),
    }

    /// A record as the fake sink sees it: (stream, epoch, seq).
    type Key = (String, u64, u64);

    /// What the fake sink was given and kept, shared with the test.
    #[derive(Default)]
    struct Seen {
        /// Every call: when, and the (stream, epoch, seq) it was offered.
        calls: Vec<(Instant, Vec<Key>)>,
        /// What the destination holds: confirmed records, in order.
        kept: Vec<Key>,
        /// The positions a transactional destination stored with them.
        stored: Vec<Position>,
    }

    /// A test double of a destination: follows a script, keeps what it
    /// confirms, and (when `transactional`) stores positions with it.
    struct FakeSink {
        seen: Arc<Mutex<Seen>>,
        script: VecDeque<Step>,
        transactional: bool,
        loses_unconfirmed: bool,
        /// When set, the first write says it started and waits to be released.
        hold: Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>,
    }

    impl FakeSink {
        fn new(seen: &Arc<Mutex<Seen>>, script: &[Step]) -> Self {
            FakeSink {
                seen: seen.clone(),
                script: script.iter().copied().collect(),
                transactional: false,
                loses_unconfirmed: false,
                hold: None,
            }
        }
    }

    fn key(r: &Delivered) -> Key {
        (r.stream.to_string(), r.epoch, r.seq)
    }

    impl Sink for FakeSink {
        fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
            if let Some((started, release)) = self.hold.take() {
                started.send(()).unwrap();
                release.recv().unwrap();
            }
            let mut seen = self.seen.lock().unwrap();
            seen.calls
                .push((Instant::now(), records.iter().map(|r| key(r)).collect()));
            let step = self.script.pop_front().unwrap_or(Step::Confirm(usize::MAX));
            let kept = match step {
                Step::Confirm(n) | Step::Fail(n) => n.min(records.len()),
                Step::Reject(at) => at,
            };
            seen.kept.extend(records[..kept].iter().map(|r| key(r)));
            if self.transactional {
                for p in crate::sinks::positions_after(&records[..kept]) {
                    seen.stored.retain(|s| s.stream != p.stream);
                    seen.stored.push(p);
                }
            }
            match step {
                Step::Confirm(_) => Ok(kept),
                Step::Fail(n) => Err(SinkError::Retry {
                    confirmed: n,
                    error: anyhow::anyhow!("destination down"),
                }),
                Step::Reject(at) => Err(SinkError::Reject {
                    at,
                    reason: "too large".into(),
                }),
            }
        }

        fn unconfirmed_loss(&mut self) -> bool {
            self.loses_unconfirmed
        }

        fn stored_positions(&mut self) -> anyhow::Result<Option<Vec<Position>>> {
            Ok(self
                .transactional
                .then(|| self.seen.lock().unwrap().stored.clone()))
        }
    }

    fn rec(stream: &str, epoch: u64, seq: u64) -> Delivered {
        Delivered {
            stream: Arc::from(stream),
            source_type: Arc::from("test"),
            session: 1,
            epoch,
            seq,
            resent: false,
            body: RecordBody::Bytes(Chunk {
                data: vec![seq as u8],
                end: false,
            }),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weir-delivery-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A running sink thread fed by the test, as the journal thread feeds it.
    struct Running {
        shared: Arc<SinkShared>,
        tx: Option<std::sync::mpsc::SyncSender<Batch>>,
        thread: Option<std::thread::JoinHandle<()>>,
        cursor: PathBuf,
        dead_letters: PathBuf,
    }

    impl Running {
        fn start(dir: &Path, sink: FakeSink, streams: &str, start: u64) -> Self {
            Self::start_with_kinds(dir, sink, streams, Kinds::ALL, start)
        }

        fn start_with_kinds(
            dir: &Path,
            sink: FakeSink,
            streams: &str,
            kinds: Kinds,
            start: u64,
        ) -> Self {
            let shared = Arc::new(SinkShared::new("fake", start));
            let (tx, rx) = std::sync::mpsc::sync_channel(8);
            let t = SinkThread {
                shared: shared.clone(),
                sink: Box::new(sink),
                routes: crate::sinks::matcher(&[streams.to_string()]).unwrap(),
                kinds,
                batches: rx,
                abort: Arc::new(AtomicBool::new(false)),
                cursor_path: dir.join("fake.json"),
                dead_letter_path: dir.join("fake.dead.jsonl"),
            };
            Running {
                shared,
                tx: Some(tx),
                thread: Some(std::thread::spawn(move || run_sink(t))),
                cursor: dir.join("fake.json"),
                dead_letters: dir.join("fake.dead.jsonl"),
            }
        }

        fn send(&self, start: u64, records: Vec<Delivered>) {
            let end = start + records.len() as u64;
            self.shared.in_flight.fetch_add(1, Ordering::Relaxed);
            self.tx
                .as_ref()
                .unwrap()
                .send(Batch {
                    start,
                    end,
                    records: Arc::new(records),
                    bytes: 0,
                })
                .unwrap();
        }

        fn wait_confirmed(&self, index: u64) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.shared.confirmed.load(Ordering::Acquire) < index {
                assert!(Instant::now() < deadline, "never confirmed {index}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        /// Hangs up and waits for the thread (which saves its cursor).
        fn finish(mut self) -> Arc<SinkShared> {
            drop(self.tx.take());
            self.thread.take().unwrap().join().unwrap();
            self.shared.clone()
        }
    }

    #[test]
    fn a_failing_sink_is_retried_with_a_growing_backoff_and_gets_each_record_once() {
        let dir = scratch("retry");
        let seen = Arc::new(Mutex::new(Seen::default()));
        // Down three times, the second time after confirming one record.
        let sink = FakeSink::new(&seen, &[Step::Fail(0), Step::Fail(1), Step::Fail(0)]);
        let run = Running::start(&dir, sink, "*", 0);
        run.send(0, (0..5).map(|i| rec("a", 1, i)).collect());
        let shared = run.finish();
        let seen = seen.lock().unwrap();
        let kept: Vec<u64> = seen.kept.iter().map(|k| k.2).collect();
        assert_eq!(kept, [0, 1, 2, 3, 4], "each record kept once, in order");
        assert_eq!(seen.calls.len(), 4);
        let offered: Vec<usize> = seen.calls.iter().map(|c| c.1.len()).collect();
        assert_eq!(
            offered,
            [5, 5, 4, 4],
            "what was confirmed is not offered again"
        );
        // Waits of 100, 200, 400 ms, each jittered 0.5x to 1.5x.
        let waits: Vec<Duration> = seen.calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
        for (wait, base) in waits.iter().zip([100u64, 200, 400]) {
            assert!(
                *wait >= Duration::from_millis(base / 2),
                "waited {wait:?} before a retry, less than half of {base} ms"
            );
        }
        assert_eq!(shared.stats.retries.load(Ordering::Relaxed), 3);
        assert_eq!(shared.stats.errors.load(Ordering::Relaxed), 3);
        assert_eq!(shared.stats.records.load(Ordering::Relaxed), 5);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_cursor_moves_only_once_the_sink_confirmed_the_whole_batch() {
        let dir = scratch("cursor");
        let seen = Arc::new(Mutex::new(Seen::default()));
        // Confirms 2, then 0 (no progress, no error), then fails: the batch
        // is not done until all 6 are confirmed.
        let sink = FakeSink::new(
            &seen,
            &[
                Step::Confirm(2),
                Step::Confirm(0),
                Step::Fail(1),
                Step::Fail(0),
            ],
        );
        let run = Running::start(&dir, sink, "*", 10);
        run.send(10, (0..6).map(|i| rec("a", 1, i)).collect());
        // While the sink is still failing, the cursor stays where it was.
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.lock().unwrap().calls.len() < 3 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(run.shared.confirmed.load(Ordering::Acquire), 10);
        assert!(
            !run.cursor.exists(),
            "no cursor is saved before a confirmation"
        );
        run.wait_confirmed(16);
        let shared = run.finish();
        assert_eq!(shared.saved.load(Ordering::Acquire), 16);
        let cursor = crate::journal::load_sink_cursor(&dir.join("fake.json"))
            .unwrap()
            .unwrap();
        assert_eq!(cursor.index, 16);
        let kept: Vec<u64> = seen.lock().unwrap().kept.iter().map(|k| k.2).collect();
        assert_eq!(kept, [0, 1, 2, 3, 4, 5]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn replays_after_a_restart_are_dropped_at_the_positions_a_transactional_sink_stored() {
        let dir = scratch("replay");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let batch = |from: u64, to: u64| -> Vec<Delivered> {
            (from..to)
                .flat_map(|i| [rec("a", 7, i), rec("b", 9, i)])
                .collect()
        };
        let mut sink = FakeSink::new(&seen, &[]);
        sink.transactional = true;
        let run = Running::start(&dir, sink, "*", 0);
        run.send(0, batch(0, 5));
        run.send(10, batch(5, 8));
        run.finish();
        let first_run_calls = seen.lock().unwrap().calls.len();
        // A crash lost the cursor saves: the journal replays from 0, and
        // more records follow.
        let mut sink = FakeSink::new(&seen, &[]);
        sink.transactional = true;
        let run = Running::start(&dir, sink, "*", 0);
        run.send(0, batch(0, 5));
        run.send(10, batch(5, 10));
        let shared = run.finish();
        let seen = seen.lock().unwrap();
        for stream in ["a", "b"] {
            let kept: Vec<u64> = seen
                .kept
                .iter()
                .filter(|k| k.0 == stream)
                .map(|k| k.2)
                .collect();
            assert_eq!(
                kept,
                (0..10).collect::<Vec<_>>(),
                "stream {stream} once each"
            );
        }
        assert_eq!(shared.stats.duplicates.load(Ordering::Relaxed), 16);
        // The second run was never offered a record the destination held.
        let last_calls: Vec<&(String, u64, u64)> = seen.calls[first_run_calls..]
            .iter()
            .flat_map(|c| c.1.iter())
            .collect();
        assert!(last_calls.iter().all(|k| k.2 >= 8), "{last_calls:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn records_at_or_below_a_streams_confirmed_sequence_are_dropped_but_resends_and_new_epochs_pass(
    ) {
        let dir = scratch("order");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let run = Running::start(&dir, FakeSink::new(&seen, &[]), "plant/*", 0);
        let mut resent = rec("plant/a", 1, 1);
        resent.resent = true;
        run.send(
            0,
            vec![
                rec("plant/a", 1, 5),
                rec("plant/a", 1, 6),
                rec("plant/a", 1, 6),  // a duplicate
                rec("plant/a", 1, 4),  // behind: out of order
                rec("office/x", 1, 0), // not routed here
                resent,                // fills an older gap
                rec("plant/a", 2, 0),  // a sequence reset: new epoch
                rec("plant/a", 2, 1),
            ],
        );
        let shared = run.finish();
        let kept: Vec<(String, u64, u64)> = seen.lock().unwrap().kept.clone();
        let want = [
            ("plant/a", 1, 5),
            ("plant/a", 1, 6),
            ("plant/a", 1, 1),
            ("plant/a", 2, 0),
            ("plant/a", 2, 1),
        ];
        assert_eq!(kept, want.map(|(s, e, q)| (s.to_string(), e, q)).to_vec());
        assert_eq!(shared.stats.duplicates.load(Ordering::Relaxed), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_sink_gets_only_the_record_kinds_it_selects_and_its_cursor_passes_the_others() {
        let dir = scratch("kinds");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let kinds = Kinds::parse(&["point".to_string()]).unwrap();
        let run = Running::start_with_kinds(&dir, FakeSink::new(&seen, &[]), "*", kinds, 0);
        let point = |seq: u64| Delivered {
            body: RecordBody::Point(weir_protocol::Point {
                tag: "t".into(),
                ts_ns: 0,
                value: weir_protocol::Value::I64(1),
                quality: 192,
                status: None,
            }),
            ..rec("a", 1, seq)
        };
        // Bytes records (`rec`) interleaved with points on one stream.
        run.send(0, vec![point(0), rec("a", 1, 1), point(2), rec("a", 1, 3)]);
        run.wait_confirmed(4);
        let shared = run.finish();
        let kept: Vec<u64> = seen.lock().unwrap().kept.iter().map(|k| k.2).collect();
        assert_eq!(kept, [0, 2]);
        assert_eq!(shared.stats.records.load(Ordering::Relaxed), 2);
        assert_eq!(shared.stats.duplicates.load(Ordering::Relaxed), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_rejected_record_goes_to_the_dead_letter_file_and_delivery_goes_on_after_it() {
        let dir = scratch("dead");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let run = Running::start(&dir, FakeSink::new(&seen, &[Step::Reject(2)]), "*", 0);
        run.send(0, (0..5).map(|i| rec("a", 1, i)).collect());
        let dead = run.dead_letters.clone();
        let shared = run.finish();
        let kept: Vec<u64> = seen.lock().unwrap().kept.iter().map(|k| k.2).collect();
        assert_eq!(kept, [0, 1, 3, 4]);
        let text = std::fs::read_to_string(dead).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(
            (
                line["sink"].as_str(),
                line["reason"].as_str(),
                line["record"]["seq"].as_u64()
            ),
            (Some("fake"), Some("too large"), Some(2))
        );
        assert_eq!(shared.stats.dead_letters.load(Ordering::Relaxed), 1);
        assert_eq!(shared.confirmed.load(Ordering::Relaxed), 5);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_sink_that_may_lose_confirmed_records_gets_the_previous_batch_again_after_a_failure() {
        let dir = scratch("lossy");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut sink = FakeSink::new(&seen, &[Step::Confirm(3), Step::Fail(0)]);
        sink.loses_unconfirmed = true;
        let run = Running::start(&dir, sink, "*", 0);
        run.send(0, (0..3).map(|i| rec("a", 1, i)).collect());
        // Confirmed before the next is sent, so the two are not written together.
        run.wait_confirmed(3);
        run.send(3, (3..5).map(|i| rec("a", 1, i)).collect());
        run.finish();
        let seen = seen.lock().unwrap();
        let offered: Vec<Vec<u64>> = seen
            .calls
            .iter()
            .map(|c| c.1.iter().map(|k| k.2).collect())
            .collect();
        assert_eq!(offered, [vec![0, 1, 2], vec![3, 4], vec![0, 1, 2, 3, 4]]);
        std::fs::remove_dir_all(dir).unwrap();
    }
    #[test]
    fn batches_that_queue_while_a_sink_writes_are_written_together_and_confirmed_at_the_last_end() {
        let dir = scratch("group");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let mut sink = FakeSink::new(&seen, &[]);
        sink.hold = Some((started_tx, release_rx));
        let run = Running::start(&dir, sink, "*", 0);
        run.send(0, vec![rec("a", 1, 0)]);
        started.recv().unwrap();
        // Three batches queue while the first write is held.
        run.send(1, vec![rec("a", 1, 1), rec("a", 1, 2)]);
        run.send(3, vec![rec("b", 1, 0)]);
        run.send(4, vec![rec("a", 1, 3)]);
        release.send(()).unwrap();
        run.wait_confirmed(5);
        let shared = run.finish();
        let seen = seen.lock().unwrap();
        let offered: Vec<Vec<(String, u64)>> = seen
            .calls
            .iter()
            .map(|c| c.1.iter().map(|k| (k.0.clone(), k.2)).collect())
            .collect();
        let a = |seq| ("a".to_string(), seq);
        assert_eq!(
            offered,
            [vec![a(0)], vec![a(1), a(2), ("b".to_string(), 0), a(3)]],
            "the queued batches went in one write, in journal order"
        );
        assert_eq!(shared.confirmed.load(Ordering::Acquire), 5);
        assert_eq!(shared.stats.batches.load(Ordering::Relaxed), 4);
        assert_eq!(shared.stats.records.load(Ordering::Relaxed), 5);
        assert_eq!(shared.in_flight.load(Ordering::Relaxed), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
