//! `kafka`: produces records to Kafka (rdkafka with its bundled librdkafka
//! 2.3.0, on the shared sink runtime).
//!
//! Each record goes to the topic its `topic` template gives, keyed by its
//! stream and tag (or MQTT topic), with the headers `weir-stream`,
//! `weir-epoch`, `weir-seq` and, where the kind has one, `weir-ts` (source
//! timestamp, ns since the Unix epoch). The producer is idempotent
//! (`enable.idempotence`, `acks=all`) and never times a record out
//! (`message.timeout.ms=0`): librdkafka retries a broker outage itself, in
//! order, without duplicates.
//!
//! `write` produces a batch and confirms the longest prefix whose delivery
//! reports came (so the cursor moves only past records the brokers stored
//! with `acks=all`). Records still waiting after [`WRITE_WAIT`] stay with
//! librdkafka: the write fails (retried with backoff outside the sink) and
//! the next one waits for the same deliveries instead of producing again.
//!
//! Across a restart: the resume state holds, per topic and partition, the
//! offset after the last confirmed record (or the end of the partition when
//! the sink first used it). After a restart the journal replays from the
//! saved cursor; before producing into a topic the sink reads each of its
//! partitions from that offset to its end and skips the replayed records
//! it finds there (by their `weir-*` headers), so a record is stored once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use weir_protocol::decoder::Delivered;

use super::dest_template::{self, Format, Template};
use super::{record_id, AsyncSink, BuildContext, Sink, SinkBuilder, SinkError};

/// The longest one write waits for delivery reports before it fails (the
/// records stay queued in librdkafka and the next write waits again).
const WRITE_WAIT: Duration = Duration::from_secs(20);
/// Metadata and watermark requests, and the whole resume scan of a topic.
const META_TIMEOUT: Duration = Duration::from_secs(10);
const SCAN_TIMEOUT: Duration = Duration::from_secs(40);
/// After the watermarks: the resume scan stops after this long without a
/// record, or this long in all.
const SCAN_QUIET: Duration = Duration::from_secs(1);
const SCAN_PAST: Duration = Duration::from_secs(5);
/// Kafka's limit on a topic name.
const MAX_TOPIC: usize = 249;
/// The codecs the bundled librdkafka is built with (zstd is not).
const COMPRESSIONS: &[&str] = &["none", "gzip", "snappy", "lz4"];
/// Properties the sink sets itself, each with the key to use instead.
const OWN_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "brokers"),
    ("enable.idempotence", "(always true)"),
    ("acks", "(always all)"),
    ("linger.ms", "linger_ms"),
    ("batch.size", "batch_size"),
    ("compression.type", "compression"),
    ("compression.codec", "compression"),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// Topic template: fixed text with `{stream}` and `{key}` (`{tag}`,
    /// `{topic}`); in a value `/` becomes `.` and any character outside
    /// `[A-Za-z0-9._-]` `_`.
    pub topic: String,
    /// `json` (default): the file sink's JSON object; `raw`: a message's
    /// payload or a bytes record's data as they are.
    #[serde(default)]
    pub format: Format,
    /// librdkafka `linger.ms`: how long a partition's batch waits to fill.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// librdkafka `batch.size`: most bytes in one partition's batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: u64,
    /// `none`, `gzip`, `snappy` or `lz4`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// More librdkafka properties (security, timeouts), given as they are.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_linger_ms() -> u64 {
    5
}
fn default_batch_size() -> u64 {
    1_000_000
}
fn default_compression() -> String {
    "none".into()
}

impl Config {
    fn check(&self) -> Result<Template, String> {
        if self.brokers.split(',').any(|b| {
            let b = b.trim();
            b.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        }) {
            return Err(format!(
                "brokers: `{}` must be host:port[,host:port...] (e.g. \"127.0.0.1:9092\")",
                self.brokers
            ));
        }
        let t = Template::parse(&self.topic).map_err(|e| format!("topic: {e}"))?;
        let fixed: String = t.prefix().to_string();
        if self.topic.replace(['{', '}'], "").len() > MAX_TOPIC
            || !fixed
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            || (t.is_fixed() && (fixed == "." || fixed == ".."))
        {
            return Err(format!(
                "topic: `{}` must be made of A-Z a-z 0-9 . _ - and placeholders, at most {MAX_TOPIC} characters",
                self.topic
            ));
        }
        if !COMPRESSIONS.contains(&self.compression.as_str()) {
            return Err(format!(
                "compression: `{}` must be one of {}",
                self.compression,
                COMPRESSIONS.join(", ")
            ));
        }
        if self.linger_ms > 900_000 {
            return Err(format!(
                "linger_ms: {} is above librdkafka's 900000",
                self.linger_ms
            ));
        }
        if !(1..=2_147_483_647).contains(&self.batch_size) {
            return Err(format!(
                "batch_size: {} must be between 1 and 2147483647 bytes",
                self.batch_size
            ));
        }
        for (key, instead) in OWN_PROPERTIES {
            if self.properties.contains_key(*key) {
                return Err(format!(
                    "properties: `{key}` is set by the sink; use {instead}"
                ));
            }
        }
        Ok(t)
    }

    /// The librdkafka settings of the producer.
    fn producer_config(&self, name: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("weir-{name}"))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("linger.ms", self.linger_ms.to_string())
            .set("batch.size", self.batch_size.to_string())
            .set("compression.type", &self.compression);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// Appends `value` as topic characters: `/` becomes `.`, anything outside
/// `[A-Za-z0-9._-]` `_`.
fn topic_value(value: &str, out: &mut String) {
    out.extend(value.chars().map(|c| match c {
        '/' => '.',
        c if c.is_ascii_alphanumeric() || "._-".contains(c) => c,
        _ => '_',
    }));
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "kafka";

    fn validate(&self) -> Result<(), String> {
        self.check().map(|_| ())
    }

    /// Creates the producer in the first `write`, not here.
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        let template = self
            .check()
            .map_err(|e| anyhow!("sinks.{}: {e}", ctx.name()))?;
        ctx.async_sink(KafkaSink {
            name: ctx.name().to_string(),
            cfg: self.clone(),
            template,
            producer: None,
            flights: HashMap::new(),
            offsets: BTreeMap::new(),
            resumed: false,
            prepared: HashSet::new(),
            found: HashMap::new(),
            payload: Vec::with_capacity(512),
        })
    }
}

/// Where a stored record is.
#[derive(Debug, Clone)]
struct Stored {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
}

/// A produced record not yet confirmed.
enum Flight {
    Waiting {
        topic: Arc<str>,
        report: DeliveryFuture,
    },
    Stored(Stored),
}

/// Per topic, per partition: the offset after the last confirmed record.
type Offsets = BTreeMap<String, BTreeMap<i32, i64>>;

pub struct KafkaSink {
    name: String,
    cfg: Config,
    template: Template,
    producer: Option<FutureProducer>,
    /// Produced records by `record_id`, until confirmed.
    flights: HashMap<String, Flight>,
    /// The resume state (see the module comment).
    offsets: Offsets,
    /// Started from a saved state: topics are scanned before use.
    resumed: bool,
    /// Topics whose partitions this process has looked at.
    prepared: HashSet<String>,
    /// Replayed records the resume scan found stored, by `record_id`.
    found: HashMap<String, Stored>,
    payload: Vec<u8>,
}

impl KafkaSink {
    fn producer(&mut self) -> Result<FutureProducer> {
        if let Some(p) = &self.producer {
            return Ok(p.clone());
        }
        let p: FutureProducer = self
            .cfg
            .producer_config(&self.name)
            .create()
            .context("creating the Kafka producer (check `brokers` and `properties`)")?;
        tracing::info!(sink = %self.name, brokers = %self.cfg.brokers, "kafka producer created");
        self.producer = Some(p.clone());
        Ok(p)
    }

    /// Before the first record into `topic`: notes where each partition
    /// ends and, after a restart, finds the replayed records already there.
    async fn prepare_topic(&mut self, producer: &FutureProducer, topic: &str) -> Result<()> {
        if self.prepared.contains(topic) {
            return Ok(());
        }
        let saved = self.offsets.get(topic).cloned();
        let resumed = self.resumed;
        let (p, t, cfg, name) = (
            producer.clone(),
            topic.to_string(),
            self.cfg.clone(),
            self.name.clone(),
        );
        let (ends, found) = tokio::task::spawn_blocking(move || {
            let ends = partition_ends(&p, &t)?;
            let mut ranges = Vec::new();
            if resumed {
                for (part, (low, high)) in &ends {
                    // A topic or partition the saved state does not know
                    // got all its records from this sink after the cursor.
                    let from = saved
                        .as_ref()
                        .and_then(|s| s.get(part).copied())
                        .unwrap_or(*low);
                    // Scanned even when `from` is at the reported end: the
                    // end may be reported short (see `scan`).
                    ranges.push((*part, from, *high));
                }
            }
            let found = if ranges.is_empty() {
                Vec::new()
            } else {
                scan(&cfg, &name, &t, &ranges)?
            };
            Ok::<_, anyhow::Error>((ends, found))
        })
        .await
        .context("the topic scan task failed")??;
        let topic_arc: Arc<str> = Arc::from(topic);
        let parts = self.offsets.entry(topic.to_string()).or_default();
        for (part, (low, high)) in ends {
            // Without a scan, everything up to the end is older than this
            // sink's records; with one, the found records move it on.
            let base = if resumed {
                parts.get(&part).copied().unwrap_or(low)
            } else {
                high
            };
            let cur = parts.entry(part).or_insert(base);
            *cur = (*cur).max(base);
        }
        if !found.is_empty() {
            tracing::info!(sink = %self.name, topic, records = found.len(),
                "found records stored after the saved cursor; their replay is skipped");
        }
        for (id, partition, offset) in found {
            self.found.insert(
                id,
                Stored {
                    topic: topic_arc.clone(),
                    partition,
                    offset,
                },
            );
        }
        self.prepared.insert(topic.to_string());
        Ok(())
    }

    fn confirm(&mut self, s: &Stored) {
        let o = self
            .offsets
            .entry(s.topic.to_string())
            .or_default()
            .entry(s.partition)
            .or_insert(0);
        *o = (*o).max(s.offset + 1);
    }

    /// Produces the records of `records` not yet produced; `Some(i, why)`
    /// when record `i` can never be produced.
    async fn produce(
        &mut self,
        producer: &FutureProducer,
        records: &[&Delivered],
        ids: &[String],
        deadline: Instant,
    ) -> Result<Option<(usize, String)>, SinkError> {
        for (i, r) in records.iter().enumerate() {
            let id = &ids[i];
            if self.flights.contains_key(id) || self.found.contains_key(id) {
                continue;
            }
            let topic = self.template.render(r, topic_value);
            if topic.len() > MAX_TOPIC || topic == "." || topic == ".." {
                return Ok(Some((
                    i,
                    format!(
                        "topic `{topic}` is not a valid Kafka topic name (too long, or . or ..)"
                    ),
                )));
            }
            self.prepare_topic(producer, &topic)
                .await
                .with_context(|| format!("reading the partitions of topic `{topic}`"))
                .map_err(SinkError::retry)?;
            if self.found.contains_key(id) {
                continue;
            }
            dest_template::payload(&mut self.payload, r, self.cfg.format);
            let name = dest_template::key_name(r);
            let key = if name == &*r.stream {
                name.to_string()
            } else {
                format!("{}/{name}", r.stream)
            };
            let mut headers = OwnedHeaders::new_with_capacity(4)
                .insert(Header {
                    key: "weir-stream",
                    value: Some(r.stream.as_bytes()),
                })
                .insert(Header {
                    key: "weir-epoch",
                    value: Some(r.epoch.to_string().as_bytes()),
                })
                .insert(Header {
                    key: "weir-seq",
                    value: Some(r.seq.to_string().as_bytes()),
                });
            if let Some(ts) = r.body.timestamp_ns() {
                headers = headers.insert(Header {
                    key: "weir-ts",
                    value: Some(ts.to_string().as_bytes()),
                });
            }
            let mut record = FutureRecord::to(&topic)
                .key(key.as_bytes())
                .payload(self.payload.as_slice())
                .headers(headers);
            let report = loop {
                match producer.send_result(record) {
                    Ok(report) => break report,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        if Instant::now() >= deadline {
                            return Err(SinkError::retry(anyhow!(
                                "librdkafka's queue stayed full for {} s (brokers down or slow?)",
                                WRITE_WAIT.as_secs()
                            )));
                        }
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((
                        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                        _,
                    )) => {
                        return Ok(Some((
                            i,
                            format!(
                                "a {}-byte record is above the producer's message.max.bytes",
                                self.payload.len()
                            ),
                        )))
                    }
                    Err((e, _)) => {
                        return Err(SinkError::retry(
                            anyhow!(e).context(format!("producing to topic `{topic}`")),
                        ))
                    }
                }
            };
            self.flights.insert(
                id.clone(),
                Flight::Waiting {
                    topic: Arc::from(topic.as_str()),
                    report,
                },
            );
        }
        Ok(None)
    }
}

/// Each partition of `topic` with its (low, high) watermarks; none when
/// the topic does not exist yet (the brokers create it on first produce,
/// if they are set to).
fn partition_ends(p: &FutureProducer, topic: &str) -> Result<BTreeMap<i32, (i64, i64)>> {
    let meta = p
        .client()
        .fetch_metadata(Some(topic), META_TIMEOUT)
        .context("fetching metadata (are the brokers up?)")?;
    let mut out = BTreeMap::new();
    for t in meta.topics().iter().filter(|t| t.name() == topic) {
        if t.error().is_some() {
            continue;
        }
        for part in t.partitions() {
            let w = p
                .client()
                .fetch_watermarks(topic, part.id(), META_TIMEOUT)
                .with_context(|| format!("fetching the end of partition {}", part.id()))?;
            out.insert(part.id(), w);
        }
    }
    Ok(out)
}

/// Reads `(partition, from, to)` of `topic` and returns the id, partition
/// and offset of each record this sink wrote there.
fn scan(
    cfg: &Config,
    name: &str,
    topic: &str,
    ranges: &[(i32, i64, i64)],
) -> Result<Vec<(String, i32, i64)>> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", format!("weir-{name}-resume"))
        .set("client.id", format!("weir-{name}-resume"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted");
    for (k, v) in cfg.properties.iter().filter(|(k, _)| !is_producer_only(k)) {
        c.set(k, v);
    }
    let consumer: BaseConsumer = c.create().context("creating the resume scan consumer")?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for &(part, from, to) in ranges {
        tpl.add_partition_offset(topic, part, Offset::Offset(from))
            .context("assigning partitions")?;
        if from < to {
            ends.insert(part, to);
        }
    }
    consumer.assign(&tpl).context("assigning partitions")?;
    let deadline = Instant::now() + SCAN_TIMEOUT;
    let mut out = Vec::new();
    // Past the watermarks, reading goes on until nothing came for
    // SCAN_QUIET (at most SCAN_PAST): a broker may report a partition's end
    // short of its last records (tansu 0.6 reports a few dozen records
    // short), and a replayed record missed here would be stored twice.
    let mut past: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        if ends.is_empty() {
            let since = *past.get_or_insert_with(Instant::now);
            if last.elapsed() >= SCAN_QUIET || since.elapsed() >= SCAN_PAST {
                break;
            }
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "reading topic `{topic}` from the saved offsets took over {} s ({} partitions left)",
                SCAN_TIMEOUT.as_secs(),
                ends.len()
            ));
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.context("reading the topic after a restart")?;
        last = Instant::now();
        if let Some(id) = m.headers().and_then(id_of) {
            out.push((id, m.partition(), m.offset()));
        }
        if ends
            .get(&m.partition())
            .is_some_and(|end| m.offset() + 1 >= *end)
        {
            ends.remove(&m.partition());
        }
    }
    Ok(out)
}

fn is_producer_only(key: &str) -> bool {
    key.starts_with("queue.buffering")
        || key.starts_with("batch.")
        || key.starts_with("message.")
        || key.starts_with("retry")
        || key.starts_with("delivery.")
        || key.starts_with("transaction")
}

/// The `record_id` of a record from its `weir-*` headers.
fn id_of(h: &rdkafka::message::BorrowedHeaders) -> Option<String> {
    let mut stream = None;
    let mut epoch = None;
    let mut seq = None;
    for i in 0..h.count() {
        let header = h.get(i);
        let value = header.value.and_then(|v| std::str::from_utf8(v).ok());
        match header.key {
            "weir-stream" => stream = value,
            "weir-epoch" => epoch = value.and_then(|v| v.parse::<u64>().ok()),
            "weir-seq" => seq = value.and_then(|v| v.parse::<u64>().ok()),
            _ => {}
        }
    }
    Some(format!("{}/{:016x}/{}", stream?, epoch?, seq?))
}

impl AsyncSink for KafkaSink {
    /// Confirms the longest prefix of `records` with a delivery report.
    async fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        let producer = self.producer().map_err(SinkError::retry)?;
        let deadline = Instant::now() + WRITE_WAIT;
        let ids: Vec<String> = records.iter().map(|r| record_id(r)).collect();
        let produced = self.produce(&producer, records, &ids, deadline).await;
        let (limit, reject) = match &produced {
            Ok(Some((at, _))) => (*at, true),
            _ => (records.len(), false),
        };
        let mut confirmed = 0;
        let mut failure = None;
        for id in &ids[..limit] {
            if let Some(s) = self.found.remove(id) {
                self.confirm(&s);
                confirmed += 1;
                continue;
            }
            let Some(flight) = self.flights.remove(id) else {
                break; // not produced: the production error below
            };
            let stored = match flight {
                Flight::Stored(s) => s,
                Flight::Waiting { topic, mut report } => {
                    let wait = tokio::time::Instant::from_std(deadline);
                    match tokio::time::timeout_at(wait, &mut report).await {
                        Ok(Ok(Ok((partition, offset)))) => Stored {
                            topic,
                            partition,
                            offset,
                        },
                        Ok(Ok(Err((e, _)))) => {
                            if matches!(
                                e,
                                KafkaError::MessageProduction(
                                    RDKafkaErrorCode::MessageSizeTooLarge
                                )
                            ) {
                                failure = Some(SinkError::Reject {
                                    at: confirmed,
                                    reason: format!("the brokers refused the record: {e}"),
                                });
                            } else {
                                if matches!(
                                    e,
                                    KafkaError::MessageProduction(RDKafkaErrorCode::Fatal)
                                ) {
                                    // A new producer (and idempotence epoch) next time.
                                    self.producer = None;
                                }
                                failure = Some(SinkError::retry(
                                    anyhow!(e).context(format!("delivering to topic `{topic}`")),
                                ));
                            }
                            break;
                        }
                        Ok(Err(_canceled)) => {
                            failure = Some(SinkError::retry(anyhow!(
                                "the producer dropped a record's delivery report"
                            )));
                            break;
                        }
                        Err(_elapsed) => {
                            self.flights.insert(
                                id.clone(),
                                Flight::Waiting {
                                    topic: topic.clone(),
                                    report,
                                },
                            );
                            let waiting = ids[confirmed..limit]
                                .iter()
                                .filter(|i| {
                                    matches!(self.flights.get(*i), Some(Flight::Waiting { .. }))
                                })
                                .count();
                            failure = Some(SinkError::retry(anyhow!(
                                "{waiting} records produced to `{topic}` have no delivery report after {} s (brokers down? check `brokers`); librdkafka keeps them and retries",
                                WRITE_WAIT.as_secs()
                            )));
                            break;
                        }
                    }
                }
            };
            self.confirm(&stored);
            confirmed += 1;
        }
        // Reports that came for later records are kept as stored.
        for id in &ids[confirmed.min(ids.len())..] {
            if let Some(Flight::Waiting { topic, report }) = self.flights.get_mut(id) {
                if let Some(Ok(Ok((partition, offset)))) =
                    futures_util::FutureExt::now_or_never(&mut *report)
                {
                    let topic = topic.clone();
                    self.flights.insert(
                        id.clone(),
                        Flight::Stored(Stored {
                            topic,
                            partition,
                            offset,
                        }),
                    );
                }
            }
        }
        match (failure, produced) {
            (Some(SinkError::Retry { error, .. }), _) => Err(SinkError::Retry { confirmed, error }),
            (Some(SinkError::Reject { reason, .. }), _) => Err(SinkError::Reject {
                at: confirmed,
                reason,
            }),
            (None, Err(SinkError::Retry { error, .. })) => {
                Err(SinkError::Retry { confirmed, error })
            }
            (None, Ok(Some((at, reason)))) if reject && confirmed == at => {
                Err(SinkError::Reject { at, reason })
            }
            (None, Ok(Some((_, reason)))) => Err(SinkError::retry(anyhow!(reason))),
            (None, Err(e)) => Err(e),
            (None, Ok(None)) if confirmed == records.len() => Ok(confirmed),
            (None, Ok(None)) => Err(SinkError::Retry {
                confirmed,
                error: anyhow!("records were not produced"),
            }),
        }
    }

    fn resume_state(&self) -> Value {
        serde_json::json!({ "offsets": self.offsets })
    }

    async fn resume(&mut self, state: &Value) -> Result<()> {
        if state.is_null() {
            return Ok(());
        }
        self.offsets = serde_json::from_value(state["offsets"].clone()).with_context(|| {
            format!("reading the kafka sink's saved offsets {state} (from its cursor file)")
        })?;
        self.resumed = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::dest_template::tests::{point, record};

    fn config(extra: &str) -> Result<Template, String> {
        let c: Config = toml::from_str(&format!("brokers = \"127.0.0.1:9092\"\n{extra}"))
            .map_err(|e| e.to_string())?;
        c.check()
    }

    #[test]
    fn bad_keys_are_refused_naming_the_key() {
        assert!(config("topic = \"weir.{stream}\"\ncompression = \"gzip\"").is_ok());
        for (extra, key) in [
            ("topic = \"a b.{stream}\"", "topic:"),
            ("topic = \"a.{nope}\"", "topic:"),
            ("topic = \"t\"\ncompression = \"brotli\"", "compression:"),
            ("topic = \"t\"\ncompression = \"zstd\"", "compression:"),
            ("topic = \"t\"\nbatch_size = 0", "batch_size:"),
            ("topic = \"t\"\nlinger_ms = 1000000", "linger_ms:"),
            (
                "topic = \"t\"\n[properties]\nacks = \"1\"",
                "properties: `acks`",
            ),
        ] {
            let err = config(extra).unwrap_err();
            assert!(err.starts_with(key), "{extra}: {err}");
        }
        let c: Config = toml::from_str("brokers = \"h\"\ntopic = \"t\"").unwrap();
        assert!(c.check().unwrap_err().starts_with("brokers:"));
    }

    #[test]
    fn topics_keep_legal_characters_and_map_the_rest() {
        let t = config("topic = \"it.{stream}.{tag}\"").unwrap();
        assert_eq!(
            t.render(&record(point("G/E 1:ä")), topic_value),
            "it.plant.line1.G.E_1__"
        );
    }

    #[test]
    fn the_resume_state_round_trips_its_offsets() {
        let mut offsets = Offsets::new();
        offsets.entry("t".into()).or_default().insert(2, 17);
        let state = serde_json::json!({ "offsets": offsets });
        let back: Offsets = serde_json::from_value(state["offsets"].clone()).unwrap();
        assert_eq!(back, offsets);
    }
}
