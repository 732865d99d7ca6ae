//! Sinks: where rebuilt records go on the IT side. Each sink has a config
//! struct and a [`Sink`] impl; [`run_sink`] gives every sink the same
//! stream routing, retry with backoff, and cursor confirmation. Adding a
//! sink touches its file, one variant in [`SinkConfig`], its docs section
//! and its test.

pub mod file;
pub mod json_line;
pub mod mqtt;
pub mod stdout;
pub mod tcp;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use weir_protocol::decoder::Delivered;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    File(file::Config),
    Stdout(stdout::Config),
    Tcp(tcp::Config),
    Mqtt(mqtt::Config),
}

/// Keys every sink has.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Common {
    pub name: String,
    /// Glob patterns of stream names this sink receives.
    pub streams: Vec<String>,
}

pub fn default_streams() -> Vec<String> {
    vec!["*".into()]
}

impl SinkConfig {
    pub fn common(&self) -> Common {
        let (name, streams) = match self {
            SinkConfig::File(c) => (&c.name, &c.streams),
            SinkConfig::Stdout(c) => (&c.name, &c.streams),
            SinkConfig::Tcp(c) => (&c.name, &c.streams),
            SinkConfig::Mqtt(c) => (&c.name, &c.streams),
        };
        Common {
            name: name.clone(),
            streams: streams.clone(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        match self {
            SinkConfig::File(c) => c.validate(),
            SinkConfig::Stdout(_) => Ok(()),
            SinkConfig::Tcp(c) => c.validate(),
            SinkConfig::Mqtt(c) => c.validate(),
        }
    }

    pub fn build(&self) -> anyhow::Result<Box<dyn Sink>> {
        Ok(match self {
            SinkConfig::File(c) => Box::new(file::FileSink::new(c)?),
            SinkConfig::Stdout(_) => Box::new(stdout::StdoutSink::new()),
            SinkConfig::Tcp(c) => Box::new(tcp::TcpSink::new(c)),
            SinkConfig::Mqtt(c) => Box::new(mqtt::MqttSink::new(c)?),
        })
    }
}

pub fn matcher(patterns: &[String]) -> Result<GlobSet, String> {
    if patterns.is_empty() {
        return Err("is empty; use [\"*\"] for every stream".into());
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| format!("`{p}` is not a valid glob: {e}"))?);
    }
    b.build().map_err(|e| e.to_string())
}

/// Why a write failed: worth retrying (the destination is down), or a
/// record the sink will never accept (it goes to the dead-letter file and
/// delivery continues after it).
#[derive(Debug)]
pub enum SinkError {
    Retry(anyhow::Error),
    Reject { at: usize, reason: String },
}

impl From<anyhow::Error> for SinkError {
    fn from(e: anyhow::Error) -> Self {
        SinkError::Retry(e)
    }
}

impl From<std::io::Error> for SinkError {
    fn from(e: std::io::Error) -> Self {
        SinkError::Retry(e.into())
    }
}

/// A destination for records. On a retryable error the batch is offered
/// again after a backoff, so a sink remembers the last sequence it wrote
/// per stream and skips records at or below it. `flush` makes what was
/// written durable (file) or visible (network); only then is the journal
/// cursor moved past the batch.
pub trait Sink: Send {
    fn write(&mut self, records: &[&Delivered]) -> Result<(), SinkError>;
    fn flush(&mut self) -> anyhow::Result<()>;
    /// What the sink needs to resume exactly after a restart, saved with
    /// its cursor after every confirmed batch.
    fn resume_state(&self) -> Value {
        Value::Null
    }
    /// A retryable failure happened: a sink that cannot know what its
    /// destination kept (no acknowledgement) forgets what it wrote, so the
    /// previous and current batches are written again (at least once).
    /// Returns true when the previous batch must be written again.
    fn forget_written(&mut self) -> bool {
        false
    }
    /// Called once at start with the last saved `resume_state`.
    fn resume(&mut self, _state: &Value) -> anyhow::Result<()> {
        Ok(())
    }
}

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
}

/// What the decoder thread and a sink thread share.
pub struct SinkShared {
    pub name: String,
    /// Journal entries below this are written and flushed by the sink.
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
        }
    }
}

/// Backoff between retries of a failed write: doubles from 100 ms to 10 s,
/// each wait jittered by ±50%.
const RETRY_START: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Cursor saves are at most this frequent (each is an fsync).
const CURSOR_INTERVAL: Duration = Duration::from_millis(100);

pub struct SinkThread {
    pub shared: Arc<SinkShared>,
    pub sink: Box<dyn Sink>,
    pub routes: GlobSet,
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

/// The loop of one sink's thread: route, write with retry, dead-letter what
/// is rejected for good, flush, confirm, and hand the cursor to the sink's
/// cursor saver (a scoped thread). Ends when the decoder side hangs up
/// (after writing what it was given, and saving its cursor), or when
/// `abort` is set while retrying.
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

fn sink_loop(t: SinkThread, save: impl Fn(u64, Value)) {
    let SinkThread {
        shared,
        mut sink,
        routes,
        batches,
        abort,
        cursor_path: _,
        dead_letter_path,
    } = t;
    let name = shared.name.clone();
    let mut routed: HashMap<Arc<str>, bool> = HashMap::new();
    // The last batch written, offered again after a failure (see forget_written).
    let mut previous: Option<Arc<Vec<Delivered>>> = None;
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
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        shared
            .in_flight_bytes
            .fetch_sub(batch.bytes, Ordering::Relaxed);
        // Batches come in journal order; a jump forward is an overflow skip.
        debug_assert!(
            batch.start >= last_end && batch.start <= batch.end,
            "batch {}..{} after {last_end}",
            batch.start,
            batch.end
        );
        last_end = batch.end;
        let mut records: Vec<&Delivered> = batch
            .records
            .iter()
            .filter(|r| {
                *routed
                    .entry(r.stream.clone())
                    .or_insert_with(|| routes.is_match(&*r.stream))
            })
            .collect();
        let mut delay = RETRY_START;
        let mut replayed = false;
        while !records.is_empty() {
            let result = sink
                .write(&records)
                .and_then(|_| sink.flush().map_err(SinkError::Retry));
            match result {
                Ok(()) => break,
                Err(SinkError::Reject { at, reason }) => {
                    let rejected = records.remove(at.min(records.len() - 1));
                    dead_letter(&name, &dead_letter_path, rejected, &reason);
                    shared.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
                }
                Err(SinkError::Retry(e)) => {
                    shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if sink.forget_written() && !replayed {
                        replayed = true;
                        if let Some(prev) = &previous {
                            let mut again: Vec<&Delivered> = prev
                                .iter()
                                .filter(|r| routed.get(&r.stream).copied().unwrap_or(false))
                                .collect();
                            again.append(&mut records);
                            records = again;
                        }
                    }
                    if abort.load(Ordering::Relaxed) {
                        tracing::error!(sink = %name, "giving up on a batch of {} records at shutdown; they stay in the journal: {e:#}", records.len());
                        return;
                    }
                    tracing::warn!(sink = %name, retry_in_ms = delay.as_millis() as u64, "write failed: {e:#}");
                    shared.stats.retries.fetch_add(1, Ordering::Relaxed);
                    // Jitter (0.5x to 1.5x) so sinks failing together do not retry in step.
                    std::thread::sleep(delay.mul_f64(rand::random::<f64>() + 0.5));
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
        shared
            .stats
            .records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        shared.stats.batches.fetch_add(1, Ordering::Relaxed);
        shared.confirmed.store(batch.end, Ordering::Release);
        previous = Some(batch.records.clone());
        unsaved = Some(batch.end);
        if last_save.elapsed() >= CURSOR_INTERVAL {
            save(batch.end, sink.resume_state());
            unsaved = None;
            last_save = Instant::now();
        }
    }
    if let Some(end) = unsaved {
        save(end, sink.resume_state());
    }
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

    #[test]
    fn globs_route_streams() {
        let m = matcher(&["plant/*".into()]).unwrap();
        assert!(m.is_match("plant/a"));
        assert!(!m.is_match("office/a"));
        assert!(matcher(&[]).is_err());
    }
}
