//! Sinks: where rebuilt records go on the IT side.
//!
//! A sink is one file (or folder) under `sinks/`: its `Config` (serde,
//! `deny_unknown_fields`, only the sink's own keys) implements
//! [`SinkBuilder`], which builds a [`Sink`] (blocking, on the sink's own
//! thread) or an [`AsyncSink`] (on the shared sink runtime), and one line in
//! [`REGISTRY`] maps its `type` to it. The keys every sink has (`name`,
//! `streams`) are in [`Common`], read before the rest of the table goes to
//! the sink's `Config`.
//!
//! What is the same for every sink lives in `crate::delivery`, not here:
//! routing by stream, dropping replays by (stream, epoch, seq), retry with
//! backoff, dead letters, the cursor. A sink only writes a batch and says
//! how much of it the destination confirmed.

pub mod dest_template;
pub mod file;
pub mod files;
pub mod http;
pub mod json_line;
pub mod kafka;
pub mod mqtt;
pub mod nats;
pub mod postgres;
pub mod stdout;
pub mod syslog;
pub mod tcp;
pub mod udp;

use std::any::Any;
use std::fmt::Debug;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use weir_protocol::decoder::Delivered;

/// Every sink type, by the `type` string of its `[[sinks]]` table: one
/// line per sink.
pub const REGISTRY: &[Registration] = &[
    Registration::of::<file::Config>(),
    Registration::of::<stdout::Config>(),
    Registration::of::<tcp::Config>(),
    Registration::of::<syslog::Config>(),
    Registration::of::<udp::Config>(),
    Registration::of::<mqtt::Config>(),
    Registration::of::<postgres::Config>(),
    Registration::of::<http::Config>(),
    Registration::of::<files::Config>(),
    Registration::of::<nats::Config>(),
    Registration::of::<kafka::Config>(),
];

/// A sink type's `Config` (the sink's own keys, serde with
/// `deny_unknown_fields`): checks itself and builds the sink.
pub trait SinkBuilder:
    Serialize + DeserializeOwned + Debug + Clone + Send + Sync + 'static
{
    /// The `type` that selects this sink in `[[sinks]]`.
    const TYPE: &'static str;

    /// Checks the sink's own keys without touching the destination; the
    /// error starts with the key name (`max_file_bytes: …`), the caller
    /// prefixes `sinks[i] (name).`.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// Builds the sink at start. Must not need the destination to be up:
    /// connect in the first `write` (a failed write is retried with
    /// backoff). An async sink returns `ctx.async_sink(sink)`.
    fn build(&self, ctx: &BuildContext) -> anyhow::Result<Box<dyn Sink>>;
}

/// Why a write failed.
#[derive(Debug)]
pub enum SinkError {
    /// The destination failed (down, timed out, refused for now). The
    /// first `confirmed` records of the batch are confirmed; the rest is
    /// offered again after a backoff. Before returning it, a sink undoes
    /// what it wrote and did not confirm where it can (the file sink cuts
    /// its files back), or says it cannot via [`Sink::unconfirmed_loss`].
    Retry {
        confirmed: usize,
        error: anyhow::Error,
    },
    /// Record `at` can never be written (too large, refused by schema): it
    /// goes to the sink's dead-letter file and delivery goes on after it.
    /// The records before `at` are confirmed.
    Reject { at: usize, reason: String },
}

impl SinkError {
    /// A failure with nothing of the batch confirmed.
    pub fn retry(error: impl Into<anyhow::Error>) -> Self {
        SinkError::Retry {
            confirmed: 0,
            error: error.into(),
        }
    }
}

impl From<anyhow::Error> for SinkError {
    fn from(e: anyhow::Error) -> Self {
        SinkError::retry(e)
    }
}

impl From<std::io::Error> for SinkError {
    fn from(e: std::io::Error) -> Self {
        SinkError::retry(e)
    }
}

/// A destination for records, driven by `crate::delivery` on the sink's
/// own thread (blocking calls are fine here: nothing else runs on it).
///
/// `write` gets the records routed to this sink, in journal order, without
/// records the sink already confirmed (delivery drops replays by stream,
/// epoch and sequence), and returns `Ok(n)`: the first `n` records are
/// **confirmed**, i.e. durable at the destination (fsynced for a file,
/// acknowledged by the broker for MQTT QoS 1 / Kafka `acks=all`, committed
/// for a database; handed to the kernel is the best a plain TCP or stdout
/// destination can say). `n` below the batch's length means "offer the rest
/// again" (no error counted). Only confirmed records move the sink's
/// cursor; the cursor is saved (at most every 100 ms) with
/// [`Sink::resume_state`], and the journal keeps everything after it.
pub trait Sink: Send {
    fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError>;

    /// What the sink needs to resume exactly after a restart (the file
    /// sink's file lengths), as of the last confirmed record; saved with
    /// the cursor.
    fn resume_state(&self) -> Value {
        Value::Null
    }

    /// Called once at start with the last saved `resume_state`, before any
    /// write: the journal replays everything after the saved cursor.
    fn resume(&mut self, _state: &Value) -> anyhow::Result<()> {
        Ok(())
    }

    /// Called after a retryable failure: true when records this sink
    /// confirmed earlier may have been lost with it (no end-to-end
    /// acknowledgement, as with plain TCP). Delivery then offers the
    /// previous batch again before the failed one (at least once).
    fn unconfirmed_loss(&mut self) -> bool {
        false
    }

    /// For a destination that stores, in the same transaction as the
    /// records, each stream's last written (epoch, seq) (see
    /// [`positions_after`]; a database table, a broker's idempotent key).
    /// Called before the first write; delivery then drops every replayed
    /// record at or below these positions, so a cursor saved behind the
    /// destination never writes a record twice (exactly once).
    fn stored_positions(&mut self) -> anyhow::Result<Option<Vec<Position>>> {
        Ok(None)
    }

    /// Called on the sink's thread when no batch has come for a while
    /// (every 100 ms while there is none), never during a write or its
    /// retries: for a sink whose destination talks back to it (the mqtt
    /// sink answers a Sparkplug host's rebirth request here while no
    /// points flow). Must not block for long: batches wait meanwhile.
    fn idle(&mut self) {}
}

/// A counter of one sink's own, beside the ones delivery keeps for every
/// sink: `sink.NAME.<key>` in the metrics file and
/// `weir_receiver_sink_<key>_total{sink="NAME"}` in Prometheus.
#[derive(Debug, Clone)]
pub struct SinkCounter {
    pub key: &'static str,
    pub help: &'static str,
    pub value: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// A sink written against an async client (rumqttc, rdkafka, async-nats,
/// tokio-postgres). The contract is [`Sink`]'s; the methods are async and
/// run on the shared sink runtime (`BuildContext::async_sink`), whose
/// worker threads do only network I/O: the delivery thread waits for each
/// call, and does the disk work (cursor, dead letters) itself. Background
/// tasks a client needs (an MQTT event loop that receives PUBACKs) can be
/// spawned with `tokio::spawn` from these methods. A call that hangs is
/// cut off after [`ASYNC_WRITE_TIMEOUT`] and counts as a retryable failure
/// with nothing confirmed, so a sink must be able to resume after its
/// future is dropped at any await.
pub trait AsyncSink: Send + 'static {
    fn write(
        &mut self,
        records: &[&Delivered],
    ) -> impl Future<Output = Result<usize, SinkError>> + Send;

    fn resume_state(&self) -> Value {
        Value::Null
    }

    fn resume(&mut self, _state: &Value) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }

    fn unconfirmed_loss(&mut self) -> bool {
        false
    }

    fn stored_positions(
        &mut self,
    ) -> impl Future<Output = anyhow::Result<Option<Vec<Position>>>> + Send {
        async { Ok(None) }
    }
}

/// The longest one call of an [`AsyncSink`] may take.
pub const ASYNC_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// The runtime every async sink shares, started on first use: two worker
/// threads are plenty for network clients, and they never do disk work.
fn sink_runtime() -> anyhow::Result<tokio::runtime::Handle> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.handle().clone());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weir-sink-rt")
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async sink runtime: {e}"))?;
    Ok(RUNTIME.get_or_init(|| rt).handle().clone())
}

/// What a sink's `build` gets.
pub struct BuildContext {
    name: String,
    /// The sink's credential files, re-read on SIGHUP.
    reloads: std::sync::Mutex<Vec<std::sync::Arc<dyn weir_ops::reload::Reload>>>,
    /// The sink's own counters, shown with the delivery ones.
    counters: std::sync::Mutex<Vec<SinkCounter>>,
}

impl BuildContext {
    pub fn new(name: &str) -> Self {
        BuildContext {
            name: name.to_string(),
            reloads: Default::default(),
            counters: Default::default(),
        }
    }

    /// A counter of the sink's own (`key` in snake case, `help` one line
    /// for Prometheus), shown with the delivery counters of the sink.
    pub fn counter(
        &self,
        key: &'static str,
        help: &'static str,
    ) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        debug_assert!(key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        let value = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(SinkCounter {
                key,
                help,
                value: value.clone(),
            });
        value
    }

    /// What the sink builds from its credential files (`files`: each
    /// `(key, path)`), built now by `load` and again on SIGHUP; the sink
    /// takes `get()` at each connect or request. A failed start-up load
    /// names the sink.
    pub fn reloadable<T: Send + Sync + 'static>(
        &self,
        files: Vec<(&str, &std::path::Path)>,
        load: impl Fn() -> anyhow::Result<T> + Send + Sync + 'static,
    ) -> anyhow::Result<std::sync::Arc<weir_ops::reload::Reloadable<T>>> {
        let files = files
            .into_iter()
            .map(|(k, p)| (k.to_string(), p.to_path_buf()))
            .collect();
        let cell = weir_ops::reload::Reloadable::new(files, load)?;
        self.reloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cell.clone());
        Ok(cell)
    }

    /// The sink's configured `name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shared runtime async sinks run on (for a client that must be
    /// created inside one).
    #[allow(dead_code)] // for async sinks (MQTT, Kafka, NATS, Postgres)
    pub fn runtime(&self) -> anyhow::Result<tokio::runtime::Handle> {
        sink_runtime()
    }

    /// Runs an [`AsyncSink`] on the shared sink runtime.
    #[allow(dead_code)] // for async sinks (MQTT, Kafka, NATS, Postgres)
    pub fn async_sink<S: AsyncSink>(&self, sink: S) -> anyhow::Result<Box<dyn Sink>> {
        Ok(Box::new(OnRuntime {
            sink,
            runtime: sink_runtime()?,
        }))
    }
}

/// An [`AsyncSink`] driven from its delivery thread.
struct OnRuntime<S> {
    sink: S,
    runtime: tokio::runtime::Handle,
}

impl<S> OnRuntime<S> {
    /// Runs `f` on the runtime (so it can spawn and use timers), waiting on
    /// the calling thread, cut off after ASYNC_WRITE_TIMEOUT.
    fn call<'a, T>(
        runtime: &tokio::runtime::Handle,
        what: &str,
        f: impl Future<Output = T> + Send + 'a,
    ) -> Result<T, anyhow::Error> {
        let _entered = runtime.enter();
        runtime
            .block_on(tokio::time::timeout(ASYNC_WRITE_TIMEOUT, f))
            .map_err(|_| {
                anyhow::anyhow!(
                    "{what} took longer than {} s; cut off",
                    ASYNC_WRITE_TIMEOUT.as_secs()
                )
            })
    }
}

impl<S: AsyncSink> Sink for OnRuntime<S> {
    fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        Self::call(&self.runtime, "a write", self.sink.write(records))?
    }
    fn resume_state(&self) -> Value {
        self.sink.resume_state()
    }
    fn resume(&mut self, state: &Value) -> anyhow::Result<()> {
        Self::call(&self.runtime, "resuming", self.sink.resume(state))?
    }
    fn unconfirmed_loss(&mut self) -> bool {
        self.sink.unconfirmed_loss()
    }
    fn stored_positions(&mut self) -> anyhow::Result<Option<Vec<Position>>> {
        Self::call(
            &self.runtime,
            "reading stored positions",
            self.sink.stored_positions(),
        )?
    }
}

/// A stream's last written record, as a transactional sink stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub stream: String,
    pub epoch: u64,
    pub seq: u64,
}

/// The position each stream reaches with `records` (resent records, which
/// fill older gaps, do not move it), in order of first appearance: what a
/// transactional sink stores with them.
#[allow(dead_code)] // for transactional sinks (Postgres); tested
pub fn positions_after(records: &[&Delivered]) -> Vec<Position> {
    let mut out: Vec<Position> = Vec::new();
    for r in records.iter().filter(|r| !r.resent) {
        match out.iter_mut().rev().find(|p| *p.stream == *r.stream) {
            Some(p) => (p.epoch, p.seq) = (r.epoch, r.seq),
            None => out.push(Position {
                stream: r.stream.to_string(),
                epoch: r.epoch,
                seq: r.seq,
            }),
        }
    }
    out
}

/// A record's identity, unique across sender restarts: for idempotent
/// keys (NATS `Nats-Msg-Id`, a Kafka key, a database's unique key).
#[allow(dead_code)] // for idempotent sinks (NATS, Kafka); tested
pub fn record_id(r: &Delivered) -> String {
    format!("{}/{:016x}/{}", r.stream, r.epoch, r.seq)
}

/// The keys every sink has.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Common {
    pub name: String,
    /// Glob patterns of stream names this sink receives.
    #[serde(default = "default_streams")]
    pub streams: Vec<String>,
    /// Record kinds this sink receives (`point`, `message`, `log`,
    /// `bytes`); a record must match `streams` and `kinds`.
    #[serde(default = "default_kinds")]
    pub kinds: Vec<String>,
}

/// The fields of [`Common`], taken out of a `[[sinks]]` table before the
/// rest goes to the sink's `Config` (a test keeps them in step).
const COMMON_KEYS: &[&str] = &["name", "streams", "kinds"];

pub fn default_streams() -> Vec<String> {
    vec!["*".into()]
}

pub fn default_kinds() -> Vec<String> {
    KIND_NAMES.iter().map(|k| k.to_string()).collect()
}

/// Every record kind, by the name `kinds` and the JSON `kind` field use,
/// in the order of [`Kinds`]' bits.
pub const KIND_NAMES: [&str; 5] = ["point", "message", "log", "bytes", "file"];

/// A set of record kinds (`kinds`), one bit per [`KIND_NAMES`] entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    #[cfg(test)]
    pub const ALL: Kinds = Kinds(0b11111);
    pub const NONE: Kinds = Kinds(0);

    /// Reads `kinds`; the error names the unknown kind and the valid ones.
    pub fn parse(names: &[String]) -> Result<Kinds, String> {
        if names.is_empty() {
            return Err(format!(
                "is empty; list the record kinds this sink takes (any of {})",
                KIND_NAMES.join(", ")
            ));
        }
        let mut bits = 0u8;
        for n in names {
            let Some(i) = KIND_NAMES.iter().position(|k| k == n) else {
                return Err(format!(
                    "`{n}` is not a record kind; use any of {}",
                    KIND_NAMES.join(", ")
                ));
            };
            bits |= 1 << i;
        }
        Ok(Kinds(bits))
    }

    /// The kind of `body` alone.
    pub fn of(body: &weir_protocol::RecordBody) -> Kinds {
        use weir_protocol::RecordBody as B;
        Kinds(match body {
            B::Point(_) => 1,
            B::Message(_) => 2,
            B::Log(_) => 4,
            B::Bytes(_) => 8,
            B::File(_) => 16,
        })
    }

    pub fn contains(self, body: &weir_protocol::RecordBody) -> bool {
        self.0 & Kinds::of(body).0 != 0
    }

    pub fn union(self, other: Kinds) -> Kinds {
        Kinds(self.0 | other.0)
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

/// One line of [`REGISTRY`]: a `type` string and how to read its `Config`.
pub struct Registration {
    pub type_name: &'static str,
    parse: fn(toml::Value) -> Result<Box<dyn Component>, toml::de::Error>,
}

impl Registration {
    pub const fn of<B: SinkBuilder>() -> Self {
        Registration {
            type_name: B::TYPE,
            parse: parse_as::<B>,
        }
    }
}

fn parse_as<B: SinkBuilder>(table: toml::Value) -> Result<Box<dyn Component>, toml::de::Error> {
    Ok(Box::new(B::deserialize(table)?))
}

/// A [`SinkBuilder`] behind a pointer: what the registry hands out.
trait Component: Debug + Send + Sync {
    fn type_name(&self) -> &'static str;
    fn validate(&self) -> Result<(), String>;
    fn build(&self, ctx: &BuildContext) -> anyhow::Result<Box<dyn Sink>>;
    fn to_json(&self) -> Value;
    fn clone_box(&self) -> Box<dyn Component>;
    fn as_any(&self) -> &dyn Any;
}

impl<B: SinkBuilder> Component for B {
    fn type_name(&self) -> &'static str {
        B::TYPE
    }
    fn validate(&self) -> Result<(), String> {
        SinkBuilder::validate(self)
    }
    fn build(&self, ctx: &BuildContext) -> anyhow::Result<Box<dyn Sink>> {
        SinkBuilder::build(self, ctx)
    }
    fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a sink config serializes")
    }
    fn clone_box(&self) -> Box<dyn Component> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// One `[[sinks]]` table: the common keys and the sink's own `Config`.
#[derive(Debug)]
pub struct SinkConfig {
    pub common: Common,
    component: Box<dyn Component>,
}

impl Clone for SinkConfig {
    fn clone(&self) -> Self {
        SinkConfig {
            common: self.common.clone(),
            component: self.component.clone_box(),
        }
    }
}

/// Every known `type`, for error messages: `` `file`, `stdout`, `tcp` ``.
pub fn known_types() -> String {
    REGISTRY
        .iter()
        .map(|r| format!("`{}`", r.type_name))
        .collect::<Vec<_>>()
        .join(", ")
}

impl SinkConfig {
    /// Reads `sinks[index]`: `type`, then the common keys, then the rest as
    /// the sink's `Config`. Errors name the entry, its type and the key.
    pub fn from_table(index: usize, mut table: toml::Table) -> Result<Self, String> {
        let at = format!("sinks[{index}]");
        let type_name = match table.remove("type") {
            Some(toml::Value::String(t)) => t,
            Some(other) => {
                return Err(format!(
                    "{at}.type: `{other}` is not a string; use one of {}",
                    known_types()
                ))
            }
            None => {
                return Err(format!(
                    "{at}: missing key `type`; use one of {}",
                    known_types()
                ))
            }
        };
        let Some(registration) = REGISTRY.iter().find(|r| r.type_name == type_name) else {
            return Err(format!(
                "{at}: unknown type `{type_name}`; known types: {}",
                known_types()
            ));
        };
        let at = format!("{at} (type {type_name})");
        let mut common = toml::Table::new();
        for key in COMMON_KEYS {
            if let Some(v) = table.remove(*key) {
                common.insert(key.to_string(), v);
            }
        }
        let common = Common::deserialize(toml::Value::Table(common))
            .map_err(|e| format!("{at}: {}", e.message()))?;
        Kinds::parse(&common.kinds)
            .map_err(|e| format!("sinks[{index}] ({}).kinds: {e}", common.name))?;
        let component = (registration.parse)(toml::Value::Table(table)).map_err(|e| {
            let message = e.message().replace("unknown field", "unknown key");
            if message.starts_with("unknown key") {
                format!(
                    "{at}: {message}; every sink also takes {}",
                    COMMON_KEYS
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                format!("{at}: {message}")
            }
        })?;
        Ok(SinkConfig { common, component })
    }

    pub fn common(&self) -> &Common {
        &self.common
    }

    pub fn type_name(&self) -> &'static str {
        self.component.type_name()
    }

    /// The sink's own `Config`, if it is of type `B`.
    pub fn config<B: SinkBuilder>(&self) -> Option<&B> {
        self.component.as_any().downcast_ref()
    }

    /// Checks the sink's own keys; the error starts with the key name.
    pub fn validate(&self) -> Result<(), String> {
        self.component.validate()
    }

    /// Builds the sink, with what SIGHUP re-reads of it (its credential
    /// files; empty when it has none).
    pub fn build(&self) -> anyhow::Result<Built> {
        let ctx = BuildContext::new(&self.common.name);
        let sink = self.component.build(&ctx)?;
        let reloads = ctx.reloads.into_inner().unwrap_or_else(|e| e.into_inner());
        let counters = ctx.counters.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok(Built {
            sink,
            reloads,
            counters,
        })
    }
}

/// A sink as built at start.
pub struct Built {
    pub sink: Box<dyn Sink>,
    /// Its credential files, re-read on SIGHUP.
    pub reloads: Vec<std::sync::Arc<dyn weir_ops::reload::Reload>>,
    /// Its own counters (most sinks have none).
    pub counters: Vec<SinkCounter>,
}

/// The effective configuration shows a sink as it was written: `type`,
/// the common keys, then the sink's own (defaults filled in).
impl Serialize for SinkConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", self.type_name())?;
        let common = serde_json::to_value(&self.common).expect("json");
        for fields in [common, self.component.to_json()] {
            if let Value::Object(fields) = fields {
                for (k, v) in fields {
                    // TOML has no null: an unset optional key is left out.
                    if !v.is_null() {
                        map.serialize_entry(&k, &v)?;
                    }
                }
            }
        }
        map.end()
    }
}

/// `sinks = [...]` of the receiver config, each entry read with its index.
pub fn deserialize_all<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SinkConfig>, D::Error> {
    let tables = Vec::<toml::Table>::deserialize(d)?;
    tables
        .into_iter()
        .enumerate()
        .map(|(i, t)| SinkConfig::from_table(i, t).map_err(serde::de::Error::custom))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn parse(index: usize, text: &str) -> Result<SinkConfig, String> {
        SinkConfig::from_table(index, toml::from_str(text).unwrap())
    }

    #[test]
    fn globs_route_streams() {
        let m = matcher(&["plant/*".into()]).unwrap();
        assert!(m.is_match("plant/a"));
        assert!(!m.is_match("office/a"));
        assert!(matcher(&[]).is_err());
    }

    #[test]
    fn an_unknown_type_is_refused_naming_every_known_type() {
        let err = parse(1, "type = \"amqp\"\nname = \"k\"").unwrap_err();
        assert!(err.starts_with("sinks[1]: unknown type `amqp`"), "{err}");
        for r in REGISTRY {
            assert!(err.contains(&format!("`{}`", r.type_name)), "{err}");
        }
        let err = parse(0, "type = 3\nname = \"k\"").unwrap_err();
        assert!(err.starts_with("sinks[0].type:"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_refused_naming_the_key_the_entry_and_its_type() {
        let err = parse(
            2,
            "type = \"tcp\"\nname = \"t\"\nconnect = \"127.0.0.1:1\"\nconect = 1",
        )
        .unwrap_err();
        assert!(
            err.starts_with("sinks[2] (type tcp): unknown key `conect`"),
            "{err}"
        );
        assert!(err.contains("`streams`"), "{err}");
        let err = parse(0, "type = \"file\"\nname = \"f\"").unwrap_err();
        assert!(
            err.contains("sinks[0] (type file): missing field `dir`"),
            "{err}"
        );
        let err = parse(0, "type = \"stdout\"\nname = \"o\"\nstreams = \"*\"").unwrap_err();
        assert!(err.starts_with("sinks[0] (type stdout): "), "{err}");
    }

    #[test]
    fn common_keys_are_read_once_and_each_sink_keeps_only_its_own() {
        let s = parse(
            0,
            "type = \"file\"\nname = \"f\"\nstreams = [\"plant/*\"]\ndir = \"/tmp/x\"",
        )
        .unwrap();
        assert_eq!(s.common().streams, vec!["plant/*".to_string()]);
        assert_eq!(
            s.config::<file::Config>().unwrap().dir,
            std::path::PathBuf::from("/tmp/x")
        );
        assert!(s.config::<tcp::Config>().is_none());
        let fields = serde_json::to_value(&s.common).unwrap();
        let fields: Vec<&str> = fields
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(fields, COMMON_KEYS);
        #[derive(Serialize)]
        struct Wrap {
            sinks: Vec<SinkConfig>,
        }
        assert_eq!(
            toml::to_string(&Wrap { sinks: vec![s] }).unwrap(),
            "[[sinks]]\ntype = \"file\"\nname = \"f\"\nstreams = [\"plant/*\"]\nkinds = [\"point\", \"message\", \"log\", \"bytes\", \"file\"]\ndir = \"/tmp/x\"\nmax_file_bytes = \"256MiB\"\nmax_line_bytes = \"16MiB\"\n"
        );
    }

    #[test]
    fn kinds_select_record_kinds_and_an_unknown_kind_is_refused_naming_the_valid_ones() {
        let s = parse(
            0,
            "type = \"stdout\"\nname = \"o\"\nkinds = [\"log\", \"point\"]",
        )
        .unwrap();
        let k = Kinds::parse(&s.common().kinds).unwrap();
        let point = weir_protocol::RecordBody::Point(weir_protocol::Point {
            tag: "t".into(),
            ts_ns: 0,
            value: weir_protocol::Value::F64(1.0),
            quality: 192,
            status: None,
        });
        let bytes = weir_protocol::RecordBody::Bytes(weir_protocol::Chunk {
            data: vec![],
            end: false,
        });
        assert!(k.contains(&point));
        assert!(!k.contains(&bytes));
        assert!(Kinds::ALL.contains(&bytes));
        assert!(!Kinds::NONE.contains(&point));
        assert_eq!(
            Kinds::parse(&default_kinds()).unwrap(),
            Kinds::ALL,
            "the default is every kind"
        );
        let err = parse(
            2,
            "type = \"stdout\"\nname = \"o\"\nkinds = [\"point\", \"points\"]",
        )
        .unwrap_err();
        assert_eq!(
            err,
            "sinks[2] (o).kinds: `points` is not a record kind; use any of point, message, log, bytes, file"
        );
        let err = parse(0, "type = \"stdout\"\nname = \"o\"\nkinds = []").unwrap_err();
        assert!(err.starts_with("sinks[0] (o).kinds: is empty"), "{err}");
    }

    fn rec(stream: &str, epoch: u64, seq: u64, resent: bool) -> Delivered {
        Delivered {
            stream: Arc::from(stream),
            source_type: Arc::from("x"),
            session: 1,
            epoch,
            seq,
            resent,
            body: weir_protocol::RecordBody::Bytes(weir_protocol::Chunk {
                data: vec![],
                end: false,
            }),
        }
    }

    #[test]
    fn positions_after_a_batch_are_each_streams_last_record_not_its_resends() {
        let recs = [
            rec("a", 1, 5, false),
            rec("b", 2, 9, false),
            rec("a", 1, 6, false),
            rec("a", 1, 2, true),
            rec("b", 3, 0, false),
        ];
        let refs: Vec<&Delivered> = recs.iter().collect();
        let p = positions_after(&refs);
        let got: Vec<(&str, u64, u64)> = p
            .iter()
            .map(|p| (p.stream.as_str(), p.epoch, p.seq))
            .collect();
        assert_eq!(got, [("a", 1, 6), ("b", 3, 0)]);
        assert_eq!(record_id(&recs[1]), "b/0000000000000002/9");
    }

    /// An async sink that confirms what it is given after a timer (which
    /// needs a runtime), and fails while `down`.
    struct Acks {
        got: Arc<std::sync::Mutex<Vec<u64>>>,
        down: bool,
    }

    impl AsyncSink for Acks {
        async fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            if self.down {
                return Err(SinkError::retry(anyhow::anyhow!("broker down")));
            }
            self.got
                .lock()
                .unwrap()
                .extend(records.iter().map(|r| r.seq));
            Ok(records.len())
        }
        fn unconfirmed_loss(&mut self) -> bool {
            true
        }
    }

    #[test]
    fn an_async_sink_runs_on_the_shared_runtime_behind_the_blocking_trait() {
        let got = Arc::new(std::sync::Mutex::new(Vec::new()));
        let ctx = BuildContext::new("acks");
        let mut sink = ctx
            .async_sink(Acks {
                got: got.clone(),
                down: true,
            })
            .unwrap();
        let recs = [rec("a", 1, 0, false), rec("a", 1, 1, false)];
        let refs: Vec<&Delivered> = recs.iter().collect();
        // Called from a plain thread, as the delivery thread does.
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(matches!(
                    sink.write(&refs),
                    Err(SinkError::Retry { confirmed: 0, .. })
                ));
                assert!(sink.unconfirmed_loss());
            });
        });
        let mut sink = ctx
            .async_sink(Acks {
                got: got.clone(),
                down: false,
            })
            .unwrap();
        assert_eq!(sink.write(&refs).unwrap(), 2);
        assert_eq!(*got.lock().unwrap(), [0, 1]);
    }
}
