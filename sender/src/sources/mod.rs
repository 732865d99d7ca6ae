//! Sources: each turns one kind of plant input into records of one stream.
//! Adding a source touches its file, one variant in [`SourceConfig`], its
//! docs section and its test.

pub mod generator;
pub mod mqtt;
pub mod stdin;
pub mod tcp;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use weir_protocol::RecordBody;

use crate::metrics::{Counters, SourceStatus};
use crate::spool::Shared;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    Tcp(tcp::Config),
    Stdin(stdin::Config),
    Generator(generator::Config),
    Mqtt(mqtt::Config),
}

impl SourceConfig {
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Tcp(c) => &c.name,
            SourceConfig::Stdin(c) => &c.name,
            SourceConfig::Generator(c) => &c.name,
            SourceConfig::Mqtt(c) => &c.name,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            SourceConfig::Tcp(_) => "tcp",
            SourceConfig::Stdin(_) => "stdin",
            SourceConfig::Generator(_) => "generator",
            SourceConfig::Mqtt(_) => "mqtt",
        }
    }

    /// (copies in all, spacing) for the stream's records.
    pub fn repeat(&self) -> (u32, u64) {
        match self {
            SourceConfig::Tcp(c) => (c.repeat, c.repeat_delay_ms),
            SourceConfig::Stdin(c) => (c.repeat, c.repeat_delay_ms),
            SourceConfig::Generator(c) => (c.repeat, c.repeat_delay_ms),
            SourceConfig::Mqtt(c) => (c.repeat, c.repeat_delay_ms),
        }
    }

    /// Checks the source's own keys; the error starts with the key name.
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
        match self {
            SourceConfig::Tcp(c) => c.validate(),
            SourceConfig::Stdin(c) => c.validate(),
            SourceConfig::Generator(c) => c.validate(),
            SourceConfig::Mqtt(c) => c.validate(),
        }
    }

    /// Runs until the input ends (stdin EOF, generator count) or shutdown.
    /// An error ends the sender (see `fatal`); what a source can retry
    /// (a lost peer, a failed accept) it retries itself.
    pub async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        let (counters, stream) = (handle.counters.clone(), handle.stream.clone());
        let result = match self {
            SourceConfig::Tcp(c) => tcp::run(c, handle).await,
            SourceConfig::Stdin(c) => stdin::run(c, handle).await,
            SourceConfig::Generator(c) => generator::run(c, handle).await,
            SourceConfig::Mqtt(c) => mqtt::run(c, handle).await,
        };
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

pub fn default_repeat() -> u32 {
    1
}

pub fn default_repeat_delay() -> u64 {
    1000
}

/// A position in the spool: the records emitted up to it are durable once
/// the spool's fsync covers it ([`SourceHandle::durable_watch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// Watches the spool's fsynced position, for a source that keeps many
/// tickets at once (an MQTT QoS 1 source acknowledging packets in order).
pub struct DurableWatch {
    durable: tokio::sync::watch::Receiver<u64>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

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
}

/// What a running source uses to hand records over.
pub struct SourceHandle {
    /// The stream this source feeds (its name).
    stream: String,
    spool: Shared,
    counters: Arc<Counters>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
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
        }
    }

    /// Appends a record to the spool, which numbers it; never waits on the link.
    pub fn emit(&mut self, body: RecordBody) {
        self.emit_batch(std::slice::from_ref(&body));
    }

    /// As [`SourceHandle::emit_batch`], and returns a ticket that a
    /// [`DurableWatch`] resolves once the spool's fsync covers these
    /// records: a source whose protocol acknowledges (MQTT QoS 1)
    /// acknowledges only then.
    pub fn emit_tracked(&mut self, bodies: &[RecordBody]) -> Ticket {
        self.count(bodies);
        Ticket(self.spool.append_batch_at(&self.stream, bodies))
    }

    /// The spool's fsynced position, for a source that holds many tickets.
    pub fn durable_watch(&self) -> DurableWatch {
        DurableWatch {
            durable: self.spool.durable(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Appends records to the spool under one lock, counted once: for
    /// sources that produce many records at a time.
    pub fn emit_batch(&mut self, bodies: &[RecordBody]) {
        self.count(bodies);
        self.spool.append_batch(&self.stream, bodies);
    }

    fn count(&self, bodies: &[RecordBody]) {
        let bytes: usize = bodies
            .iter()
            .map(|body| match body {
                RecordBody::Bytes(c) => c.data.len(),
                RecordBody::Message(m) => m.payload.len(),
                _ => 0,
            })
            .sum();
        Counters::add(&self.counters.records_in, bodies.len() as u64);
        Counters::add(&self.counters.bytes_in, bytes as u64);
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
