//! Sources: each turns one kind of plant input into records of one stream.
//!
//! A source is one file (or folder) under `sources/`: its `Config` (serde,
//! `deny_unknown_fields`, only the source's own keys) implements [`Source`],
//! and one line in [`REGISTRY`] maps its `type` to it. The keys every source
//! has (`name`, `repeat`, `repeat_delay_ms`) are in [`Common`], read before
//! the rest of the table goes to the source's `Config`. A running source
//! hands records to the spool through its [`SourceHandle`] and can wait
//! until they are fsynced ([`SourceHandle::emit_tracked`],
//! [`SourceHandle::durable`]) before it acknowledges them upstream.

pub mod files;
pub mod generator;
pub mod modbus;
pub mod mqtt;
pub mod opcua;
pub mod stdin;
pub mod syslog;
pub mod tcp;
pub mod udp;

use std::any::Any;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use weir_protocol::RecordBody;

use crate::metrics::{Counters, SourceStatus};
use crate::spool::Shared;

/// Every source type, by the `type` string of its `[[sources]]` table:
/// one line per source.
pub const REGISTRY: &[Registration] = &[
    Registration::of::<tcp::Config>(),
    Registration::of::<stdin::Config>(),
    Registration::of::<generator::Config>(),
    Registration::of::<syslog::Config>(),
    Registration::of::<udp::Config>(),
    Registration::of::<mqtt::Config>(),
    Registration::of::<modbus::Config>(),
    Registration::of::<files::Config>(),
    Registration::of::<opcua::Config>(),
];

/// A source type: its `Config` (the source's own keys, serde with
/// `deny_unknown_fields`) and how it runs.
pub trait Source: Serialize + DeserializeOwned + Debug + Clone + Send + Sync + 'static {
    /// The `type` that selects this source in `[[sources]]`.
    const TYPE: &'static str;

    /// Checks the source's own keys; the error starts with the key name
    /// (`chunk_size: …`), the caller prefixes `sources[i] (name).`.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    /// Runs until the input ends (stdin EOF, generator count) or shutdown
    /// (`handle.shutdown`, `handle.is_shutting_down()`). An error ends the
    /// sender (see `fatal`); what a source can retry (a lost peer, a failed
    /// accept, a broker that went away) it retries itself, with a backoff,
    /// and shows in its status (`handle.status`). Runs on the sender's
    /// async runtime: never block it (no blocking sockets or sleeps; use
    /// tokio, or `spawn_blocking` for a blocking library).
    fn run(self, handle: SourceHandle) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// The keys every source has.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Common {
    /// The stream's name: unique, 1 to 200 printable characters.
    pub name: String,
    /// Send each record this many times in all (1 = once), see `repeat_delay_ms`.
    #[serde(default = "default_repeat")]
    pub repeat: u32,
    /// Spacing of the copies; an outage shorter than this costs one copy.
    #[serde(default = "default_repeat_delay")]
    pub repeat_delay_ms: u64,
}

/// The fields of [`Common`], taken out of a `[[sources]]` table before the
/// rest goes to the source's `Config` (a test keeps them in step).
const COMMON_KEYS: &[&str] = &["name", "repeat", "repeat_delay_ms"];

pub fn default_repeat() -> u32 {
    1
}

pub fn default_repeat_delay() -> u64 {
    1000
}

/// One line of [`REGISTRY`]: a `type` string and how to read its `Config`.
pub struct Registration {
    pub type_name: &'static str,
    parse: fn(toml::Value) -> Result<Box<dyn Component>, toml::de::Error>,
}

impl Registration {
    pub const fn of<S: Source>() -> Self {
        Registration {
            type_name: S::TYPE,
            parse: parse_as::<S>,
        }
    }
}

fn parse_as<S: Source>(table: toml::Value) -> Result<Box<dyn Component>, toml::de::Error> {
    Ok(Box::new(S::deserialize(table)?))
}

type RunFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// A [`Source`] behind a pointer: what the registry hands out.
trait Component: Debug + Send + Sync {
    fn type_name(&self) -> &'static str;
    fn validate(&self) -> Result<(), String>;
    fn to_json(&self) -> serde_json::Value;
    fn clone_box(&self) -> Box<dyn Component>;
    fn as_any(&self) -> &dyn Any;
    fn run(self: Box<Self>, handle: SourceHandle) -> RunFuture;
}

impl<S: Source> Component for S {
    fn type_name(&self) -> &'static str {
        S::TYPE
    }
    fn validate(&self) -> Result<(), String> {
        Source::validate(self)
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a source config serializes")
    }
    fn clone_box(&self) -> Box<dyn Component> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn run(self: Box<Self>, handle: SourceHandle) -> RunFuture {
        Box::pin(Source::run(*self, handle))
    }
}

/// One `[[sources]]` table: the common keys and the source's own `Config`.
#[derive(Debug)]
pub struct SourceConfig {
    pub common: Common,
    component: Box<dyn Component>,
}

impl Clone for SourceConfig {
    fn clone(&self) -> Self {
        SourceConfig {
            common: self.common.clone(),
            component: self.component.clone_box(),
        }
    }
}

/// Every known `type`, for error messages: `tcp`, `stdin`, `generator`.
pub fn known_types() -> String {
    REGISTRY
        .iter()
        .map(|r| format!("`{}`", r.type_name))
        .collect::<Vec<_>>()
        .join(", ")
}

impl SourceConfig {
    /// Reads `sources[index]`: `type`, then the common keys, then the rest
    /// as the source's `Config`. Errors name the entry, its type and the key.
    pub fn from_table(index: usize, mut table: toml::Table) -> Result<Self, String> {
        let at = format!("sources[{index}]");
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
        let component = (registration.parse)(toml::Value::Table(table)).map_err(|e| {
            let message = e.message().replace("unknown field", "unknown key");
            if message.starts_with("unknown key") {
                format!(
                    "{at}: {message}; every source also takes {}",
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
        Ok(SourceConfig { common, component })
    }

    pub fn name(&self) -> &str {
        &self.common.name
    }

    pub fn type_name(&self) -> &'static str {
        self.component.type_name()
    }

    /// The source's own `Config`, if it is of type `S`.
    pub fn config<S: Source>(&self) -> Option<&S> {
        self.component.as_any().downcast_ref()
    }

    /// (copies in all, spacing) for the stream's records.
    pub fn repeat(&self) -> (u32, u64) {
        (self.common.repeat, self.common.repeat_delay_ms)
    }

    /// Checks the source's keys; the error starts with the key name.
    pub fn validate(&self) -> Result<(), String> {
        let (repeat, delay) = self.repeat();
        if !(1..=16).contains(&repeat) {
            return Err(format!(
                "repeat: {repeat} must be between 1 (send once) and 16"
            ));
        }
        if repeat > 1 && !(1..=3_600_000).contains(&delay) {
            return Err(format!(
                "repeat_delay_ms: {delay} must be between 1 and 3600000"
            ));
        }
        self.component.validate()
    }

    /// Runs the source (see [`Source::run`]) and records how it ended in
    /// its status.
    pub async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        let (counters, stream) = (handle.counters.clone(), handle.stream.clone());
        let result = self.component.run(handle).await;
        counters.sources.update(&stream, |s| match &result {
            Ok(()) => s.state = "finished",
            Err(e) => {
                s.state = "failed";
                s.last_error = Some(format!("{e:#}"));
            }
        });
        result
    }
}

/// The effective configuration shows a source as it was written: `type`,
/// the common keys, then the source's own (defaults filled in).
impl Serialize for SourceConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("type", self.type_name())?;
        let common = serde_json::to_value(&self.common).expect("json");
        let own = self.component.to_json();
        for fields in [common, own] {
            if let serde_json::Value::Object(fields) = fields {
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

/// `sources = [...]` of the sender config, each entry read with its index.
pub fn deserialize_all<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SourceConfig>, D::Error> {
    let tables = Vec::<toml::Table>::deserialize(d)?;
    tables
        .into_iter()
        .enumerate()
        .map(|(i, t)| SourceConfig::from_table(i, t).map_err(serde::de::Error::custom))
        .collect()
}

/// A position in the spool: the records emitted up to it are durable once
/// the spool's fsync covers it ([`SourceHandle::durable`]).
// Used by sources whose protocol acknowledges (MQTT QoS 1); tested here.
#[cfg_attr(not(test), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// Watches the spool's fsynced position, for a source that keeps many
/// tickets at once (an MQTT QoS 1 source acknowledging packets in order).
#[cfg_attr(not(test), allow(dead_code))]
pub struct DurableWatch {
    durable: tokio::sync::watch::Receiver<u64>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

#[cfg_attr(not(test), allow(dead_code))]
impl DurableWatch {
    /// True once everything emitted up to `ticket` is fsynced in the spool.
    pub fn covers(&self, ticket: Ticket) -> bool {
        *self.durable.borrow() >= ticket.0
    }

    /// Waits until the fsynced position moves; false on shutdown (or when
    /// the spool is gone), after which nothing more becomes durable.
    pub async fn changed(&mut self) -> bool {
        if *self.shutdown.borrow() {
            return false;
        }
        tokio::select! {
            r = self.durable.changed() => r.is_ok(),
            _ = self.shutdown.changed() => false,
        }
    }

    /// Waits until `ticket` is durable: true, or false on shutdown.
    pub async fn wait_for(&mut self, ticket: Ticket) -> bool {
        loop {
            if self.covers(ticket) {
                return true;
            }
            if !self.changed().await {
                return self.covers(ticket);
            }
        }
    }
}

/// The sources' credential files, by source name: what SIGHUP re-reads.
pub type Reloads = Arc<std::sync::Mutex<Vec<(String, Arc<dyn weir_ops::reload::Reload>)>>>;

/// What a running source uses to hand records over.
pub struct SourceHandle {
    /// The stream this source feeds (its name).
    stream: String,
    spool: Shared,
    counters: Arc<Counters>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    reloads: Reloads,
}

impl SourceHandle {
    pub fn new(
        stream: &str,
        spool: Shared,
        counters: Arc<Counters>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        counters.sources.update(stream, |s| s.state = "running");
        SourceHandle {
            stream: stream.to_string(),
            spool,
            counters,
            shutdown,
            reloads: Reloads::default(),
        }
    }

    /// Where [`SourceHandle::reloadable`] registers what SIGHUP re-reads.
    pub fn with_reloads(mut self, reloads: Reloads) -> Self {
        self.reloads = reloads;
        self
    }

    /// What the source builds from its credential files (`files`: each
    /// `(key, path)`), built now by `load` and again on SIGHUP; the source
    /// takes `get()` at each (re)connection or handshake.
    pub fn reloadable<T: Send + Sync + 'static>(
        &self,
        files: Vec<(&str, &std::path::Path)>,
        load: impl Fn() -> anyhow::Result<T> + Send + Sync + 'static,
    ) -> anyhow::Result<Arc<weir_ops::reload::Reloadable<T>>> {
        let files = files
            .into_iter()
            .map(|(k, p)| (k.to_string(), p.to_path_buf()))
            .collect();
        let cell = weir_ops::reload::Reloadable::new(files, load)?;
        self.reloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.stream.clone(), cell.clone()));
        Ok(cell)
    }

    /// The stream this source feeds: its configured `name`.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Appends a record to the spool, which numbers it; never waits on the link.
    pub fn emit(&mut self, body: RecordBody) {
        self.emit_batch(std::slice::from_ref(&body));
    }

    /// Appends records to the spool under one lock, counted once: for
    /// sources that produce many records at a time.
    pub fn emit_batch(&mut self, bodies: &[RecordBody]) {
        self.count(bodies);
        self.spool.append_batch(&self.stream, bodies);
    }

    #[cfg_attr(not(test), allow(dead_code))]
    /// As [`SourceHandle::emit_batch`], and returns a ticket that
    /// [`SourceHandle::durable`] (or a [`DurableWatch`]) resolves once the
    /// spool's fsync covers these records: a source whose protocol
    /// acknowledges (MQTT QoS 1) acknowledges only then.
    pub fn emit_tracked(&mut self, bodies: &[RecordBody]) -> Ticket {
        self.count(bodies);
        Ticket(self.spool.append_batch_at(&self.stream, bodies))
    }

    fn count(&self, bodies: &[RecordBody]) {
        let bytes: usize = bodies
            .iter()
            .map(|body| match body {
                RecordBody::Bytes(c) => c.data.len(),
                RecordBody::Message(m) => m.payload.len(),
                RecordBody::File(f) => f.data.len(),
                _ => 0,
            })
            .sum();
        Counters::add(&self.counters.records_in, bodies.len() as u64);
        Counters::add(&self.counters.bytes_in, bytes as u64);
    }

    /// Waits until the records of `ticket` are fsynced in the spool (the
    /// spool's sync thread does the fsync; this only waits). True once they
    /// are; false on shutdown, when they may never be.
    #[cfg_attr(not(test), allow(dead_code))]
    pub async fn durable(&self, ticket: Ticket) -> bool {
        self.durable_watch().wait_for(ticket).await
    }

    /// The spool's fsynced position, for a source that holds many tickets.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn durable_watch(&self) -> DurableWatch {
        DurableWatch {
            durable: self.spool.durable(),
            shutdown: self.shutdown.clone(),
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Updates this source's status in the metrics file.
    pub fn status(&self, f: impl FnOnce(&mut SourceStatus)) {
        self.counters.sources.update(&self.stream, f);
    }

    /// For byte-stream sources that can be flow-controlled (a TCP peer, a
    /// pipe): waits while the spool holds more than its high-water mark of
    /// unsent bytes, so the stream slows down instead of overflowing the
    /// spool. Returns false on shutdown.
    pub async fn wait_for_room(&mut self) -> bool {
        loop {
            if *self.shutdown.borrow() {
                return false;
            }
            let notified = self.spool.room.notified();
            if self.spool.lock().has_room_for_streams() {
                return true;
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(50), notified).await;
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// The sender's clock now, nanoseconds since the Unix epoch (0 before it):
/// the timestamp of records whose input carries none.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    fn parse(index: usize, text: &str) -> Result<SourceConfig, String> {
        SourceConfig::from_table(index, table(text))
    }

    #[test]
    fn an_unknown_type_is_refused_naming_every_known_type() {
        let err = parse(3, "type = \"profibus\"\nname = \"m\"").unwrap_err();
        assert!(
            err.starts_with("sources[3]: unknown type `profibus`"),
            "{err}"
        );
        for r in REGISTRY {
            assert!(err.contains(&format!("`{}`", r.type_name)), "{err}");
        }
        let err = parse(0, "name = \"m\"").unwrap_err();
        assert!(err.contains("sources[0]: missing key `type`"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_refused_naming_the_key_the_entry_and_its_type() {
        let err = parse(
            2,
            "type = \"tcp\"\nname = \"t\"\nlisten = \"127.0.0.1:1\"\nlistenz = 1",
        )
        .unwrap_err();
        assert!(
            err.starts_with("sources[2] (type tcp): unknown key `listenz`"),
            "{err}"
        );
        assert!(
            err.contains("`chunk_size`") && err.contains("`repeat`"),
            "{err}"
        );
        let err = parse(1, "type = \"generator\"\nname = \"g\"\nrepeat = \"twice\"").unwrap_err();
        assert!(err.starts_with("sources[1] (type generator): "), "{err}");
        let err = parse(1, "type = \"tcp\"\nname = \"t\"").unwrap_err();
        assert!(
            err.contains("sources[1] (type tcp): missing field `listen`"),
            "{err}"
        );
    }

    #[test]
    fn common_keys_are_read_once_and_each_source_keeps_only_its_own() {
        let s = parse(
            0,
            "type = \"generator\"\nname = \"g\"\nrepeat = 2\nrepeat_delay_ms = 50\ntags = 7",
        )
        .unwrap();
        assert_eq!(
            (s.name(), s.type_name(), s.repeat()),
            ("g", "generator", (2, 50))
        );
        assert_eq!(s.config::<generator::Config>().unwrap().tags, 7);
        assert!(s.config::<tcp::Config>().is_none());
        // COMMON_KEYS names exactly the fields of Common.
        let fields = serde_json::to_value(&s.common).unwrap();
        let fields: Vec<&str> = fields
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(fields, COMMON_KEYS);
    }

    #[test]
    fn the_effective_config_lists_type_then_common_then_own_keys_as_before() {
        let s = parse(
            0,
            "name = \"raw\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:9000\"",
        )
        .unwrap();
        #[derive(Serialize)]
        struct Wrap {
            sources: Vec<SourceConfig>,
        }
        let text = toml::to_string(&Wrap { sources: vec![s] }).unwrap();
        // The order the enum-tagged configs had, so config hashes stay put
        // (the default chunk_size, 256KiB since 64KiB, is a value change
        // and changes them; docs/configuration.md says so).
        assert_eq!(
            text,
            "[[sources]]\ntype = \"tcp\"\nname = \"raw\"\nrepeat = 1\nrepeat_delay_ms = 1000\nlisten = \"127.0.0.1:9000\"\nchunk_size = \"256KiB\"\n"
        );
        // An unset optional key (generator `count`) is left out.
        let g = parse(0, "name = \"g\"\ntype = \"generator\"").unwrap();
        let text = toml::to_string(&Wrap { sources: vec![g] }).unwrap();
        assert!(
            !text.contains("count") && text.contains("rate = 1000.0"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_ticket_resolves_only_once_the_spool_fsync_covers_its_records() {
        let dir = std::env::temp_dir().join(format!("weir-source-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let counters = Arc::new(Counters::default());
        let settings = crate::spool::Settings {
            path: dir.clone(),
            max_bytes: 64 << 20,
            max_age: Duration::from_secs(3600),
            fsync_interval: Duration::from_millis(10),
            fsync_bytes: 4 << 20,
        };
        let spool = crate::spool::SharedSpool::new(
            crate::spool::Spool::open(settings, counters.clone()).unwrap(),
            crate::fatal::Fatal::new(),
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut handle = SourceHandle::new("plant/mqtt", spool.clone(), counters.clone(), stop_rx);
        let body = RecordBody::Message(weir_protocol::Message::new("a", b"1".to_vec(), 0));
        let first = handle.emit_tracked(std::slice::from_ref(&body));
        let second = handle.emit_tracked(&[body.clone(), body.clone()]);
        assert!(first < second);
        assert_eq!(
            Counters::snapshot(&counters)[0],
            ("records_in".to_string(), 3)
        );
        let watch = handle.durable_watch();
        assert!(
            !watch.covers(first),
            "nothing is fsynced before the sync thread runs"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(50), handle.durable(first))
                .await
                .is_err(),
            "durable() waits for the fsync"
        );
        // One sync-thread tick fsyncs both appends.
        let ticker = spool.clone();
        tokio::task::spawn_blocking(move || ticker.tick())
            .await
            .unwrap();
        assert!(handle.durable(first).await && handle.durable(second).await);
        assert!(watch.covers(second));
        // Appended after the fsync: on shutdown it is reported not durable.
        let third = handle.emit_tracked(&[body]);
        stop_tx.send(true).unwrap();
        assert!(!handle.durable(third).await);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
