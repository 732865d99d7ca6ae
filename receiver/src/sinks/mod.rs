//! Sinks: where rebuilt records go on the IT side. Each sink has a config
//! struct and a [`Sink`] impl; [`run_sink`] gives every sink the same
//! stream routing, retry with backoff, and cursor confirmation. Adding a
//! sink touches its file, one variant in [`SinkConfig`], its docs section
//! and its test.

pub mod file;
pub mod stdout;
pub mod tcp;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use weir_protocol::decoder::Delivered;
use weir_protocol::RecordBody;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    File(file::Config),
    Stdout(stdout::Config),
    Tcp(tcp::Config),
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
        }
    }

    pub fn build(&self) -> anyhow::Result<Box<dyn Sink>> {
        Ok(match self {
            SinkConfig::File(c) => Box::new(file::FileSink::new(c)?),
            SinkConfig::Stdout(_) => Box::new(stdout::StdoutSink::new()),
            SinkConfig::Tcp(c) => Box::new(tcp::TcpSink::new(c)),
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
    /// Journal bytes of entries `start..end` (what the batch weighs in
    /// `SinkShared::in_flight_bytes`).
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
    /// Cursor saves that failed (each logged; the next batch tries again).
    pub cursor_errors: AtomicU64,
    /// Records dropped for this sink by journal overflow (audited as gaps).
    pub overflow_records: AtomicU64,
    pub stats: SinkStats,
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

/// The loop of one sink's thread: route, write with retry, dead-letter what
/// is rejected for good, flush, confirm, save the cursor. Ends when the
/// decoder side hangs up (after writing what it was given), or when
/// `abort` is set while retrying.
pub fn run_sink(t: SinkThread) {
    let SinkThread {
        shared,
        mut sink,
        routes,
        batches,
        abort,
        cursor_path,
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
                    if !save_cursor(&shared, &cursor_path, end, sink.resume_state()) {
                        unsaved = Some(end);
                    }
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
            if save_cursor(&shared, &cursor_path, batch.end, sink.resume_state()) {
                unsaved = None;
            }
            last_save = Instant::now();
        }
    }
    if let Some(end) = unsaved {
        save_cursor(&shared, &cursor_path, end, sink.resume_state());
    }
}

/// Saves the cursor; only then may compaction pass `index` (`saved`).
/// A failure is logged and counted, and the next batch or tick tries again.
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
    let mut line = json!({ "sink": name, "reason": reason, "at": crate::audit::now_rfc3339(), "record": record_json(record) }).to_string();
    line.push('\n');
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| {
            use std::io::Write;
            f.write_all(line.as_bytes())?;
            f.sync_data()
        });
    if let Err(e) = result {
        tracing::error!(sink = %name, "cannot write the dead-letter file {}: {e}; the record was: {}", path.display(), line.trim());
    }
}

/// RFC 3339 UTC with nanoseconds.
pub fn rfc3339_ns(ts_ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ts_ns)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// The JSON object a record becomes in the file, stdout and tcp sinks.
/// Kinds without a source timestamp get the time the receiver wrote them.
pub fn record_json(r: &Delivered) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let ts = r
        .body
        .timestamp_ns()
        .map_or_else(crate::audit::now_rfc3339, rfc3339_ns);
    let mut v = json!({ "stream": &*r.stream, "seq": r.seq, "kind": r.body.kind(), "ts": ts });
    let obj = v.as_object_mut().expect("object");
    match &r.body {
        RecordBody::Point(p) => {
            obj.insert("tag".into(), json!(p.tag));
            let value = match &p.value {
                weir_protocol::Value::F64(f) => json!(f),
                weir_protocol::Value::I64(i) => json!(i),
                weir_protocol::Value::Bool(b) => json!(b),
                weir_protocol::Value::Str(s) => json!(s),
            };
            obj.insert("value".into(), value);
            obj.insert("quality".into(), json!(p.quality));
        }
        RecordBody::Message(m) => {
            obj.insert("topic".into(), json!(m.topic));
            obj.insert("payload".into(), json!(b64.encode(&m.payload)));
        }
        RecordBody::Log(l) => {
            obj.insert("facility".into(), json!(l.facility));
            obj.insert("severity".into(), json!(l.severity));
            obj.insert("host".into(), json!(l.host));
            obj.insert("app".into(), json!(l.app));
            obj.insert("text".into(), json!(l.text));
        }
        RecordBody::Bytes(c) => {
            obj.insert("data".into(), json!(b64.encode(&c.data)));
            obj.insert("end".into(), json!(c.end));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_protocol::{Message, Point, Value as V};

    fn delivered(body: RecordBody) -> Delivered {
        Delivered {
            stream: Arc::from("plant/a"),
            source_type: Arc::from("generator"),
            session: 1,
            epoch: 1,
            seq: 7,
            resent: false,
            body,
        }
    }

    #[test]
    fn a_point_becomes_the_documented_json_line() {
        let r = delivered(RecordBody::Point(Point {
            tag: "t1".into(),
            ts_ns: 1_500_000_000_123_456_789,
            value: V::F64(2.5),
            quality: 0,
        }));
        let v = record_json(&r);
        assert_eq!(v["stream"], "plant/a");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["kind"], "point");
        assert_eq!(v["ts"], "2017-07-14T02:40:00.123456789Z");
        assert_eq!(v["tag"], "t1");
        assert_eq!(v["value"], 2.5);
        assert_eq!(v["quality"], 0);
    }

    #[test]
    fn a_message_payload_is_base64() {
        let r = delivered(RecordBody::Message(Message {
            topic: "a/b".into(),
            payload: b"hi".to_vec(),
        }));
        let v = record_json(&r);
        assert_eq!(v["topic"], "a/b");
        assert_eq!(v["payload"], "aGk=");
    }

    #[test]
    fn globs_route_streams() {
        let m = matcher(&["plant/*".into()]).unwrap();
        assert!(m.is_match("plant/a"));
        assert!(!m.is_match("office/a"));
        assert!(matcher(&[]).is_err());
    }
}
