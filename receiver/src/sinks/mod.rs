//! Sinks: where rebuilt records go on the IT side. Each sink has a config
//! struct and a [`Sink`] impl; [`run_sink`] gives every sink the same
//! stream routing, retry with backoff, and cursor confirmation. Adding a
//! sink touches its file, one variant in [`SinkConfig`], its docs section
//! and its test.

pub mod file;
pub mod stdout;
pub mod tcp;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// A destination for records. On an error the whole batch is offered
/// again after a backoff, so a sink remembers the last sequence it wrote
/// per stream and skips records at or below it. `flush` makes what was
/// written visible to readers.
pub trait Sink: Send {
    fn write(&mut self, records: &[&Delivered]) -> anyhow::Result<()>;
    fn flush(&mut self) -> anyhow::Result<()>;
}

/// One batch handed from the decoder thread to every sink.
pub type Batch = Arc<Vec<Delivered>>;

#[derive(Debug, Default)]
pub struct SinkStats {
    pub records: AtomicU64,
    pub batches: AtomicU64,
    pub errors: AtomicU64,
    pub retries: AtomicU64,
}

/// What a sink has confirmed written, per stream.
pub type Confirmed = Arc<Mutex<HashMap<Arc<str>, u64>>>;

/// Backoff between retries of a failed write: doubles from 100 ms to 10 s.
const RETRY_START: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// The loop of one sink's thread: route, write with retry, flush, confirm.
/// Ends when the decoder side hangs up, after writing what it was given;
/// or, if `abort` is set while retrying, without it.
pub fn run_sink(
    name: String,
    mut sink: Box<dyn Sink>,
    routes: GlobSet,
    batches: Receiver<Batch>,
    confirmed: Confirmed,
    stats: Arc<SinkStats>,
    abort: Arc<AtomicBool>,
) {
    let mut routed: HashMap<Arc<str>, bool> = HashMap::new();
    while let Ok(batch) = batches.recv() {
        let records: Vec<&Delivered> = batch
            .iter()
            .filter(|r| {
                *routed
                    .entry(r.stream.clone())
                    .or_insert_with(|| routes.is_match(&*r.stream))
            })
            .collect();
        if records.is_empty() {
            continue;
        }
        let mut delay = RETRY_START;
        loop {
            match sink.write(&records).and_then(|_| sink.flush()) {
                Ok(()) => break,
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    if abort.load(Ordering::Relaxed) {
                        tracing::error!(sink = %name, "giving up on a batch of {} records at shutdown: {e:#}", records.len());
                        return;
                    }
                    tracing::warn!(sink = %name, retry_in_ms = delay.as_millis() as u64, "write failed: {e:#}");
                    stats.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
        stats
            .records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        let mut c = confirmed.lock().unwrap_or_else(|p| p.into_inner());
        for r in &records {
            c.insert(r.stream.clone(), r.seq);
        }
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
