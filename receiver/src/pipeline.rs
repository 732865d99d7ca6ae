//! The journal thread: the decode thread's events (`decode.rs`) in,
//! records and gaps into the journal, journaled records out to the sink
//! threads once fsynced (never waiting on a slow sink: it falls behind and
//! catches up from the journal), gaps and sender events to the audit log,
//! counters to the metrics file. All of the receiver's disk work but the
//! sinks' own and the fsyncs (`weir-journal-sync`) happens here, never on
//! the decode or socket threads.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use globset::GlobSet;
use serde_json::json;
use weir_protocol::decoder::{Delivered, REBUILT_BUCKETS};
use weir_protocol::{DecoderStats, Event, Heartbeat, RecordBody};

use crate::audit::AuditLog;
use crate::decode::{Chunk, StatsView};
use crate::delivery::{Batch, SinkShared};
use crate::journal::Journal;
use crate::sinks::Kinds;
use crate::udp::RecvStats;

/// What wakes the journal thread: events from the decode thread, or the
/// journal's syncer saying an fsync finished (entries became durable and
/// can go to the sinks now, not at the next chunk or timeout).
pub enum Input {
    Decoded(Chunk),
    Durable,
}

/// The longest the journal thread sleeps with nothing arriving: the
/// periodic work (heartbeat watch, compaction, metrics) runs at 250 ms.
const IDLE_WAIT: Duration = Duration::from_millis(20);

pub struct SinkHandle {
    pub shared: Arc<SinkShared>,
    pub tx: SyncSender<Batch>,
    pub routes: GlobSet,
    /// The record kinds the sink takes (`kinds`).
    pub kinds: crate::sinks::Kinds,
    /// Journal entries below this have been handed to the sink.
    pub dispatched: u64,
    /// The sink's thread; `None` once joined.
    pub thread: Option<JoinHandle<()>>,
}

/// Records no sink selects (by `streams` and `kinds`): journaled (the
/// stream's position covers them) but written nowhere. Counted in total
/// and per stream (at most `decoder.max_streams` keys), and logged once per
/// stream and kind.
#[derive(Default)]
pub struct Unrouted {
    pub total: u64,
    pub by_stream: std::collections::BTreeMap<String, u64>,
    warned: HashSet<(Arc<str>, &'static str)>,
}

impl Unrouted {
    pub fn count(&mut self, r: &Delivered) {
        self.total += 1;
        match self.by_stream.get_mut(&*r.stream) {
            Some(n) => *n += 1,
            None => {
                self.by_stream.insert(r.stream.to_string(), 1);
            }
        }
        let kind = r.body.kind();
        if !self.warned.contains(&(r.stream.clone(), kind)) {
            self.warned.insert((r.stream.clone(), kind));
            tracing::warn!(stream = %r.stream, kind, "no sink selects this stream's {kind} records (by `streams` and `kinds`); they are counted in records_unrouted and not written anywhere");
        }
    }
}

pub struct Pipeline {
    /// The decoder's counters, copied by the decode thread.
    pub decoder_stats: Arc<StatsView>,
    /// `auth` as the metrics file shows it (`crate::auth_status`).
    pub auth: serde_json::Value,
    pub audit: AuditLog,
    pub journal: Journal,
    pub sinks: Vec<SinkHandle>,
    pub recv_stats: Arc<RecvStats>,
    pub metrics_path: Option<PathBuf>,
    pub log_interval: Duration,
    pub warn_after: Duration,
    /// Set when the journal cannot be written or read, or a sink thread
    /// died: the receiver stops and exits non-zero (systemd restarts it).
    pub failure: Option<String>,
    /// Sinks whose threads ended at shutdown, for their final counters.
    pub finished: Vec<Arc<SinkShared>>,
    /// Each sink's catch-up read position in the journal.
    pub readers: Vec<Option<crate::journal::Reader>>,
    /// Journal entries skipped as corrupt (`journal-corrupt`).
    pub corrupt_entries: u64,
    /// Failed compactions (each logged; retried on the next tick).
    pub compaction_errors: u64,
    /// What the management endpoint shows; updated at each tick.
    pub board: Arc<crate::status::Board>,
    /// `[approval] hashes`: the sender configurations approved; None: no check.
    pub approved: Option<Vec<String>>,
    /// Per stream: records delivered and last sequence number, and gaps by
    /// cause (gaps, records), since start: the metrics' view.
    pub stream_counts: HashMap<Arc<str>, u64>,
    pub gap_counts: HashMap<String, (u64, u64)>,
    /// (durable journal index, when) at each tick, oldest first: how long
    /// an entry a sink has not confirmed has been waiting (sink lag in seconds).
    pub durable_times: VecDeque<(u64, Instant)>,
}

/// Durable-index samples kept for the sink lag in seconds; past it every
/// other sample goes, so a long lag is still measured, more coarsely.
const DURABLE_SAMPLES: usize = 4096;

/// Most records in one journaled batch for the sinks: an fsync is requested
/// when this many wait, whatever `fsync_bytes` says.
pub const BATCH_RECORDS: usize = 65_536;
/// Batches queued per sink before it counts as behind (each holds at most
/// `journal.fsync_bytes` of records).
pub const SINK_QUEUE: usize = 32;
/// Journal entries read per catch-up batch for a sink that fell behind.
const CATCH_UP_BATCH: usize = 1024;
/// Journal bytes read per catch-up batch (one entry is always taken, so a
/// record larger than this makes a batch of one). With `SINK_QUEUE`
/// batches in flight a lagging sink held 1024 x 32 entries, about 2 GiB
/// of 64 KiB records; by bytes it is at most 32 MiB plus one record.
pub const CATCH_UP_BYTES: u64 = 1 << 20;
/// What a batch weighs against `SINK_QUEUE_BYTES`: its journal bytes, or
/// its records' size in memory if larger. A small record (a point: some
/// 60 bytes in the journal) takes about three times that in memory, so
/// counting journal bytes alone let 64 MiB of points hold over 200 MiB.
pub fn batch_weight(journal_bytes: u64, records: &[Delivered]) -> u64 {
    let memory: u64 = records.iter().map(record_weight).sum();
    journal_bytes.max(memory)
}

/// A decoded record's size in memory: the `Delivered` and its heap blocks.
pub fn record_weight(r: &Delivered) -> u64 {
    let heap = match &r.body {
        RecordBody::Point(p) => {
            p.tag.capacity()
                + match &p.value {
                    weir_protocol::Value::Str(s) => s.capacity(),
                    _ => 0,
                }
                + p.status.as_ref().map_or(0, String::capacity)
        }
        RecordBody::Message(m) => {
            m.topic.capacity()
                + m.payload.capacity()
                + pairs_heap(&m.properties)
                + m.origin.as_ref().map_or(0, String::capacity)
        }
        RecordBody::Log(l) => {
            std::mem::size_of::<weir_protocol::Log>()
                + [&l.host, &l.app, &l.text, &l.proc_id, &l.msg_id]
                    .iter()
                    .map(|s| s.capacity())
                    .sum::<usize>()
                + l.structured_data
                    .iter()
                    .map(|e| {
                        std::mem::size_of::<weir_protocol::SdElement>()
                            + e.id.capacity()
                            + pairs_heap(&e.params)
                    })
                    .sum::<usize>()
                + l.parse_error.as_ref().map_or(0, String::capacity)
        }
        RecordBody::Bytes(c) => c.data.capacity(),
        RecordBody::File(f) => {
            std::mem::size_of::<weir_protocol::FilePart>() + f.path.capacity() + f.data.capacity()
        }
    };
    // The allocator's own header per heap block, roughly.
    (std::mem::size_of::<Delivered>() + heap + 16) as u64
}

/// Heap bytes of name/value pairs (MQTT user properties, structured data).
fn pairs_heap(pairs: &[(String, String)]) -> usize {
    pairs
        .iter()
        .map(|(k, v)| std::mem::size_of::<(String, String)>() + k.capacity() + v.capacity())
        .sum()
}

/// Bytes queued for one sink before it counts as behind (`batch_weight`): live
/// batches are bounded by `journal.fsync_bytes`, catch-up batches by
/// `CATCH_UP_BYTES`; this caps the sum (plus the one batch that crosses
/// it), so memory stays bounded whatever `fsync_bytes` is.
pub const SINK_QUEUE_BYTES: u64 = 64 << 20;
/// How long shutdown waits for sinks to catch up with the journal.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Tracks sender heartbeats: warns when they stop, logs when the sender's
/// session or configuration hash changes.
struct HeartbeatWatch {
    warn_after: Duration,
    approved: Option<Vec<String>>,
    /// Heartbeats that showed a new configuration hash not approved.
    not_approved: u64,
    is_approved: Option<bool>,
    started: Instant,
    last: Option<Instant>,
    lost_since: Option<Instant>,
    last_warning: Option<Instant>,
    session: Option<u64>,
    config_hash: Option<String>,
    counters: Vec<(String, u64)>,
}

impl HeartbeatWatch {
    fn on_heartbeat(&mut self, hb: &Heartbeat, audit: &mut AuditLog) {
        if hb.part != 0 {
            return;
        }
        let now = Instant::now();
        let was_lost = self.lost_since.take();
        if let Some(since) = was_lost.filter(|_| self.last.is_some()) {
            let silent = self
                .last
                .map_or(now.duration_since(since), |l| now.duration_since(l));
            tracing::info!(
                silent_s = silent.as_secs_f64(),
                "sender heartbeats are back"
            );
            audit.write("heartbeat-returned", json!({ "silent_s": silent.as_secs_f64(), "session": format!("{:016x}", hb.session) }));
        }
        self.last = Some(now);
        if self.session != Some(hb.session)
            || self.config_hash.as_deref() != Some(hb.config_hash.as_str())
        {
            tracing::info!(
                session = format!("{:016x}", hb.session),
                config_hash = %hb.config_hash,
                sender_uptime_ms = hb.uptime_ms,
                streams = hb.streams.len(),
                "sender status"
            );
            if self.config_hash.is_some()
                && self.config_hash.as_deref() != Some(hb.config_hash.as_str())
            {
                tracing::warn!(previous = self.config_hash.as_deref().unwrap_or(""), now = %hb.config_hash, "the sender's configuration hash changed");
            }
            audit.write(
                "sender-status",
                json!({ "session": format!("{:016x}", hb.session), "config_hash": hb.config_hash, "uptime_ms": hb.uptime_ms }),
            );
            if let Some(approved) = &self.approved {
                let ok = approved.contains(&hb.config_hash);
                self.is_approved = Some(ok);
                if !ok {
                    self.not_approved += 1;
                    tracing::error!(config_hash = %hb.config_hash, session = format!("{:016x}", hb.session), approved = ?approved,
                        "the sender runs a configuration that is not approved ([approval] hashes); records keep flowing. Compare `weir-sender check-config` on the OT side with the approved configuration");
                    audit.write(
                        "config-not-approved",
                        json!({ "session": format!("{:016x}", hb.session), "config_hash": hb.config_hash, "approved": approved }),
                    );
                }
            }
            self.session = Some(hb.session);
            self.config_hash = Some(hb.config_hash.clone());
        }
        self.counters = hb.counters.clone();
    }

    fn tick(&mut self, audit: &mut AuditLog) {
        let now = Instant::now();
        let since = self.last.unwrap_or(self.started);
        let silent = now.duration_since(since);
        if silent < self.warn_after {
            return;
        }
        let repeat = self
            .last_warning
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(60));
        if self.lost_since.is_none() {
            self.lost_since = Some(since);
            if self.last.is_some() {
                audit.write("heartbeat-lost", json!({ "silent_s": silent.as_secs_f64(), "session": self.session.map(|s| format!("{s:016x}")) }));
            }
        }
        if repeat {
            self.last_warning = Some(now);
            if self.last.is_some() {
                tracing::warn!(
                    silent_s = silent.as_secs(),
                    "no heartbeat from the sender; check the sender and the link"
                );
            } else {
                tracing::warn!(silent_s = silent.as_secs(), "no heartbeat received since start; check link.listen and the sender's link.destination");
            }
        }
    }
}

/// Shortest time between two warnings about frames failing authentication:
/// a flood of forged frames must not flood the log too.
const AUTH_WARN_INTERVAL: Duration = Duration::from_secs(10);

impl Pipeline {
    /// Runs until the decode thread hangs up, then drains to the sinks.
    /// Returns the journal failure that stopped it, if one did.
    pub fn run(mut self, inputs: Receiver<Input>) -> Option<String> {
        let origin = Instant::now();
        let mut watch = HeartbeatWatch {
            warn_after: self.warn_after,
            approved: self.approved.clone(),
            not_approved: 0,
            is_approved: None,
            started: origin,
            last: None,
            lost_since: None,
            last_warning: None,
            session: None,
            config_hash: None,
            counters: Vec::new(),
        };
        let mut records: Vec<Delivered> = Vec::new();
        let mut pending_start = self.journal.durable_index();
        let mut pending_bytes = self.journal.appended_bytes();
        // Journaled batches waiting for their fsync: (start, end, records, bytes).
        type Awaiting = (u64, u64, Arc<Vec<Delivered>>, u64);
        let mut awaiting: VecDeque<Awaiting> = VecDeque::new();
        let mut unrouted_records = Unrouted::default();
        let mut catalogue = crate::catalogue::Catalogue::default();
        // Per stream: the kinds some sink selects (its `streams` match).
        let mut routed: HashMap<Arc<str>, Kinds> = HashMap::new();
        let mut last_routed: Option<(Arc<str>, Kinds)> = None;
        // The stream of the records just delivered and how many in a row.
        let mut stream_run: Option<(Arc<str>, u64)> = None;
        let beat = weir_ops::notify::watchdog().beat("weir-journal");
        let mut last_tick = Instant::now();
        let mut last_log = Instant::now();
        // Frames rejected by authentication, as last warned about.
        let mut auth_warned: (u64, Option<Instant>) = (0, None);
        // The rebuilt-shards histogram at the last status line, for the
        // worst bucket within the interval.
        let mut logged_rebuilt = self.decoder_stats.get().rebuilt_per_block;
        loop {
            // Sleep until events, an fsync, or the periodic work is due.
            // Entries waiting for a group commit under load are due by
            // `fsync_ms` even if nothing more arrives.
            let wait = self
                .journal
                .sync_wait()
                .map_or(IDLE_WAIT, |w| w.min(IDLE_WAIT));
            let (events, disconnected) = match inputs.recv_timeout(wait) {
                Ok(Input::Decoded(chunk)) => (chunk.events, false),
                Ok(Input::Durable) | Err(RecvTimeoutError::Timeout) => (Vec::new(), false),
                Err(RecvTimeoutError::Disconnected) => (Vec::new(), true),
            };
            for ev in events {
                match ev {
                    Event::Record(r) => {
                        // Records mostly come in runs of one stream: the
                        // decoder hands out the same `Arc` for a stream, so
                        // a pointer compare saves hashing its name.
                        let kinds = match &last_routed {
                            Some((stream, kinds)) if Arc::ptr_eq(stream, &r.stream) => *kinds,
                            _ => {
                                let sinks = &self.sinks;
                                let kinds = *routed.entry(r.stream.clone()).or_insert_with(|| {
                                    sinks
                                        .iter()
                                        .filter(|s| s.routes.is_match(&*r.stream))
                                        .fold(Kinds::NONE, |k, s| k.union(s.kinds))
                                });
                                last_routed = Some((r.stream.clone(), kinds));
                                kinds
                            }
                        };
                        catalogue.observe(&r);
                        let is_routed = kinds.contains(&r.body);
                        if !is_routed {
                            unrouted_records.count(&r);
                        }
                        // Journaled either way: the stream's position must cover it.
                        if let Err(e) = self.journal.append_record(&r) {
                            self.fail("weir-journal", e);
                        }
                        // The same pointer compare as above: one hash per run of a stream.
                        match &mut stream_run {
                            Some((stream, n)) if Arc::ptr_eq(stream, &r.stream) => *n += 1,
                            run => {
                                if let Some((stream, n)) = run.take() {
                                    *self.stream_counts.entry(stream).or_default() += n;
                                }
                                *run = Some((r.stream.clone(), 1));
                            }
                        }
                        if is_routed {
                            records.push(r);
                        }
                    }
                    Event::Gap(g) => {
                        if let Err(e) = self
                            .journal
                            .append_gap(&g.stream, g.session, g.epoch, g.from, g.to)
                        {
                            self.fail("weir-journal", e);
                        }
                        tracing::warn!(stream = %g.stream, from = g.from, to = g.to, records = g.records(), cause = g.cause.as_str(), "gap: records will not arrive");
                        self.count_gap(g.cause.as_str(), g.records());
                        self.audit.write("gap", json!({ "stream": &*g.stream, "from": g.from, "to": g.to, "cause": g.cause.as_str() }));
                    }
                    Event::SessionStarted {
                        session,
                        joined_late,
                    } => {
                        tracing::info!(
                            session = format!("{session:016x}"),
                            joined_late,
                            "sender session started"
                        );
                        self.audit.write("session", json!({ "session": format!("{session:016x}"), "joined_late": joined_late }));
                    }
                    Event::SequenceReset {
                        stream,
                        last_delivered,
                        first_seq,
                    } => {
                        tracing::warn!(stream = %stream, last_delivered, first_seq, "the sender restarted this stream's numbering (it lost its sequence state)");
                        self.audit.write("sequence-reset", json!({ "stream": &*stream, "last_delivered": last_delivered, "first_seq": first_seq }));
                    }
                    Event::Heartbeat(hb) => watch.on_heartbeat(&hb, &mut self.audit),
                    Event::Recovered { stream, from, to } => {
                        tracing::info!(stream = %stream, from, to, "gap recovered by a resend");
                        self.audit.write(
                            "recovered",
                            json!({ "stream": &*stream, "from": from, "to": to }),
                        );
                    }
                }
            }
            self.drain_sink_events();
            if self.journal.sync_due() || disconnected || records.len() >= BATCH_RECORDS {
                let result = if disconnected {
                    self.journal.sync()
                } else {
                    self.journal.request_sync()
                };
                match result {
                    Ok(end) if end > pending_start => {
                        // Sinks get these once the fsync is done. The batch
                        // gives back what its growth reserved beyond its
                        // records (up to as much again, one shrinking
                        // realloc), so what the sinks' queues hold is what
                        // `batch_weight` counts.
                        let appended = self.journal.appended_bytes();
                        let mut batch = std::mem::take(&mut records);
                        batch.shrink_to_fit();
                        awaiting.push_back((
                            pending_start,
                            end,
                            Arc::new(batch),
                            appended - pending_bytes,
                        ));
                        pending_start = end;
                        pending_bytes = appended;
                    }
                    Ok(_) => {}
                    Err(e) => self.fail("weir-journal", e),
                }
            }
            let durable = self.journal.durable_index();
            while awaiting.front().is_some_and(|a| a.1 <= durable) {
                let (start, end, batch, bytes) = awaiting.pop_front().expect("front");
                self.dispatch(batch, start, end, bytes);
            }
            if let Some(f) = self.journal.failure() {
                self.fail("weir-journal-sync", anyhow::anyhow!(f));
            }
            self.check_sink_threads();
            // A sink that fell behind catches up from the journal only to
            // where the records still in memory here begin (the first batch
            // awaiting its fsync, or the records not yet in a batch): the
            // durable index also moves past those (a segment's rotation
            // fsyncs mid-batch, and the fsync thread moves it meanwhile),
            // and a read past a batch's start would leave that batch, and
            // every later one, to reach the sink only from the journal
            // (read back, checked and decoded again) until a read happened
            // to end on a batch's start.
            let in_memory = awaiting.front().map_or(pending_start, |a| a.0);
            self.catch_up(4, durable.min(in_memory));
            self.enforce_bound();
            self.report_corruption();
            if disconnected || self.failure.is_some() {
                break;
            }
            beat.touch();
            if last_tick.elapsed() >= Duration::from_millis(250) {
                last_tick = Instant::now();
                if let Some((stream, n)) = stream_run.take() {
                    *self.stream_counts.entry(stream).or_default() += n;
                }
                self.publish(unrouted_records.total, &watch);
                crate::status::publish_catalogue(
                    &self.board,
                    &mut catalogue,
                    self.decoder_stats.open_gaps(),
                    origin,
                );
                watch.tick(&mut self.audit);
                self.warn_auth_rejections(&mut auth_warned);
                self.audit.sync();
                self.compact();
                self.write_metrics(&unrouted_records, &watch);
                if !self.log_interval.is_zero() && last_log.elapsed() >= self.log_interval {
                    last_log = Instant::now();
                    self.log_status(&mut logged_rebuilt);
                }
            }
        }
        // Shutdown: hand every sink what the journal holds (for a bounded
        // time), let each finish and save its cursor.
        let deadline = Instant::now() + DRAIN_LIMIT;
        while self.failure.is_none()
            && self
                .sinks
                .iter()
                .any(|s| s.dispatched < self.journal.durable_index())
            && Instant::now() < deadline
        {
            self.check_sink_threads();
            self.catch_up(usize::MAX, self.journal.durable_index());
            self.report_corruption();
            std::thread::sleep(Duration::from_millis(10));
        }
        for s in std::mem::take(&mut self.sinks) {
            let SinkHandle {
                shared, tx, thread, ..
            } = s;
            drop(tx);
            if let Some(thread) = thread {
                if let Err(panic) = thread.join() {
                    let cause = panic_message(&*panic);
                    tracing::error!(thread = %format!("sink-{}", shared.name), "the sink thread panicked at shutdown: {cause}");
                    self.failure
                        .get_or_insert(format!("thread sink-{}: panicked: {cause}", shared.name));
                }
            }
            self.finished.push(shared);
        }
        self.compact();
        if let Some((stream, n)) = stream_run.take() {
            *self.stream_counts.entry(stream).or_default() += n;
        }
        self.publish(unrouted_records.total, &watch);
        self.write_metrics(&unrouted_records, &watch);
        self.log_status(&mut logged_rebuilt);
        self.drain_sink_events();
        self.audit.write("receiver-stop", json!({}));
        self.audit.sync();
        self.failure
    }

    /// Writes the audit lines sinks queued; a `gap-resolved` line (a
    /// `files` sink completed a file from a resend) also has the decoder
    /// forget those open gaps, so the status board and a later resend no
    /// longer count them as open.
    fn drain_sink_events(&mut self) {
        let stats = self.decoder_stats.clone();
        crate::audit::drain_sink_events(&mut self.audit, |event, fields| {
            if event != "gap-resolved" {
                return;
            }
            let (Some(stream), Some(from), Some(to)) = (
                fields["stream"].as_str(),
                fields["from"].as_u64(),
                fields["to"].as_u64(),
            ) else {
                return;
            };
            tracing::info!(stream, from, to, file = %fields["file"], "gaps resolved: the file their records carried was completed by a resend");
            if !stats.resolve_gaps(stream, from, to) {
                tracing::warn!(stream, from, to, "gaps resolved, but the decode thread has not taken the earlier resolutions yet; the status board lists these as open until the next start");
            }
        });
    }

    /// A fatal error of `thread`: logged as an ERROR naming the thread and
    /// the cause; the receiver stops and exits non-zero, so systemd
    /// restarts it (records still arriving meanwhile become a
    /// receiver-down gap after the restart).
    fn fail(&mut self, thread: &str, e: anyhow::Error) {
        if self.failure.is_none() {
            tracing::error!(thread, "{e:#}; the receiver stops");
            self.failure = Some(format!("thread {thread}: {e:#}"));
        }
    }

    /// A sink thread only ends when the journal thread hangs up: one that
    /// ended while its queue is open died (a panic), and its sink would
    /// silently get nothing more. That stops the receiver.
    fn check_sink_threads(&mut self) {
        for i in 0..self.sinks.len() {
            if !self.sinks[i]
                .thread
                .as_ref()
                .is_some_and(|t| t.is_finished())
            {
                continue;
            }
            let thread = self.sinks[i].thread.take().expect("checked");
            let cause = match thread.join() {
                Err(panic) => format!("panicked: {}", panic_message(&*panic)),
                Ok(()) => "ended while the receiver was running".to_string(),
            };
            let name = format!("sink-{}", self.sinks[i].shared.name);
            self.fail(&name, anyhow::anyhow!("the sink thread died: {cause}"));
        }
    }

    /// True when a sink can take one more batch (by count and by bytes).
    fn has_room(s: &SinkHandle) -> bool {
        s.shared.in_flight.load(Ordering::Relaxed) < SINK_QUEUE
            && s.shared.in_flight_bytes.load(Ordering::Relaxed) < SINK_QUEUE_BYTES
    }

    /// Sends a batch to a sink, counting it in flight; false if the sink
    /// thread is gone.
    /// `batch.bytes` is its weight (`batch_weight`).
    fn send(s: &mut SinkHandle, batch: Batch) -> bool {
        let (end, bytes) = (batch.end, batch.bytes);
        s.shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let now = s.shared.in_flight_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        s.shared
            .in_flight_bytes_peak
            .fetch_max(now, Ordering::Relaxed);
        if s.tx.send(batch).is_ok() {
            s.dispatched = end;
            true
        } else {
            s.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            s.shared.in_flight_bytes.fetch_sub(bytes, Ordering::Relaxed);
            false
        }
    }

    /// Hands a durable batch to every sink that is caught up; a sink whose
    /// queue is full falls behind and is served from the journal later.
    fn dispatch(&mut self, batch: Arc<Vec<Delivered>>, start: u64, end: u64, bytes: u64) {
        // Weighed once: every sink shares the same records.
        let bytes = batch_weight(bytes, &batch);
        for s in &mut self.sinks {
            if s.dispatched == start && Self::has_room(s) {
                Self::send(
                    s,
                    Batch {
                        start,
                        end,
                        records: batch.clone(),
                        bytes,
                    },
                );
            }
        }
    }

    /// Serves sinks that fell behind from the journal, `rounds` batches each,
    /// each at most `CATCH_UP_BATCH` entries and `CATCH_UP_BYTES`, up to
    /// `until` (at most the durable index; while running, where the
    /// records still held in memory begin, so a sink that catches up lands
    /// on the start of the next batch dispatched).
    fn catch_up(&mut self, rounds: usize, until: u64) {
        let durable = until.min(self.journal.durable_index());
        let mut names: HashMap<String, Arc<str>> = HashMap::new();
        for i in 0..self.sinks.len() {
            for _ in 0..rounds {
                let s = &self.sinks[i];
                if s.dispatched >= durable || !Self::has_room(s) || self.failure.is_some() {
                    break;
                }
                let from = s.dispatched;
                let (entries, bytes) = match self.journal.read_with(
                    &mut self.readers[i],
                    from,
                    CATCH_UP_BATCH,
                    CATCH_UP_BYTES,
                    durable,
                ) {
                    Ok(e) => e,
                    Err(e) => {
                        // Corrupt entries were skipped inside the read: this
                        // is the disk or a file gone, and retrying every
                        // 20 ms would leave the sink silently stalled.
                        let e = e.context(format!(
                            "journal: cannot read entries from {from} for sink {}",
                            self.sinks[i].shared.name
                        ));
                        self.fail("weir-journal", e);
                        return;
                    }
                };
                // Reported before the batch moves `dispatched` past them.
                self.report_corruption();
                let Some(end) = entries.last().map(|(i, _)| i + 1) else {
                    break;
                };
                let start = from.max(self.journal.first_index());
                let records: Vec<Delivered> = entries
                    .into_iter()
                    .filter_map(|(_, e)| e.into_delivered(&mut names))
                    .collect();
                let batch = Batch {
                    start,
                    end,
                    bytes: batch_weight(bytes, &records),
                    records: Arc::new(records),
                };
                if !Self::send(&mut self.sinks[i], batch) {
                    break;
                }
            }
        }
    }

    /// Audits corrupt journal ranges the journal found: per stream, the
    /// exact sequence ranges the entries around them show, as `gap` lines
    /// with cause `journal-corrupt` for every sink that had not been given
    /// the range (a sink served live before the damage has its records).
    /// Called as soon as a read found them, before any `dispatched` moves.
    fn report_corruption(&mut self) {
        for c in self.journal.take_corruption() {
            let affected: Vec<usize> = (0..self.sinks.len())
                .filter(|i| self.sinks[*i].dispatched < c.to)
                .collect();
            self.corrupt_entries += c.to - c.from;
            if affected.is_empty() {
                tracing::warn!(from = c.from, to = c.to, segment = %c.segment.display(),
                    "journal: corrupt entries every sink had already been given; nothing lost");
                continue;
            }
            let ranges = match self.journal.corrupt_ranges(c.from, c.to) {
                Ok(r) => r,
                Err(e) => {
                    self.fail(
                        "weir-journal",
                        e.context("journal: reading around a corrupt range"),
                    );
                    return;
                }
            };
            let names: Vec<String> = affected
                .iter()
                .map(|i| self.sinks[*i].shared.name.clone())
                .collect();
            self.audit.write(
                "journal-corrupt",
                json!({ "segment": c.segment.display().to_string(), "entries_from": c.from, "entries_to": c.to,
                        "offset": c.offset, "bytes": c.bytes, "why": c.why, "sinks": names, "streams_unknown": ranges.unknown }),
            );
            if !ranges.unknown.is_empty() {
                tracing::error!(streams = ?ranges.unknown, from = c.from, to = c.to,
                    "journal: corrupt entries; the lost records of these streams cannot be bounded");
            }
            for (stream, from, to) in ranges.ranges {
                let sinks: Vec<&str> = affected
                    .iter()
                    .filter(|i| self.sinks[**i].routes.is_match(&stream))
                    .map(|i| self.sinks[*i].shared.name.as_str())
                    .collect();
                if sinks.is_empty() {
                    continue;
                }
                tracing::warn!(stream = %stream, from, to, records = to - from + 1, sinks = ?sinks,
                    cause = "journal-corrupt", "gap: records lost to a corrupt journal entry");
                self.audit.write(
                    "gap",
                    json!({ "stream": stream, "from": from, "to": to, "cause": "journal-corrupt", "sinks": sinks }),
                );
                self.count_gap("journal-corrupt", to - from + 1);
            }
        }
    }

    /// Keeps the journal within `max_bytes`: the oldest segment goes, and
    /// each sink not yet given its records gets them as exact gaps.
    fn enforce_bound(&mut self) {
        while self.journal.total_bytes() > self.journal.max_bytes() {
            let Some((first, end)) = self.journal.oldest() else {
                return;
            };
            for i in 0..self.sinks.len() {
                if self.sinks[i].dispatched >= end {
                    continue;
                }
                let from = self.sinks[i].dispatched.max(first);
                let entries = match self.journal.scan_oldest(from) {
                    Ok(e) => e,
                    Err(e) => {
                        // Without its entries the overflow gaps cannot be
                        // named: stop rather than drop records silently.
                        self.fail(
                            "weir-journal",
                            e.context("journal: cannot read the segment being dropped"),
                        );
                        return;
                    }
                };
                self.report_corruption();
                let mut ranges: Vec<(String, u64, u64)> = Vec::new();
                for (_, e) in entries {
                    if let crate::journal::Entry::Record {
                        stream, seq, body, ..
                    } = e
                    {
                        if !self.sinks[i].routes.is_match(&stream)
                            || !self.sinks[i].kinds.contains(&body)
                        {
                            continue;
                        }
                        match ranges.iter_mut().find(|r| r.0 == stream && r.2 + 1 == seq) {
                            Some(r) => r.2 = seq,
                            None => ranges.push((stream, seq, seq)),
                        }
                    }
                }
                let name = self.sinks[i].shared.name.clone();
                let cause = format!("sink-overflow:{name}");
                for (stream, from, to) in ranges {
                    tracing::warn!(sink = %name, stream = %stream, from, to, records = to - from + 1,
                        "journal.max_bytes reached while this sink was behind: records dropped for this sink only");
                    self.audit.write(
                        "gap",
                        json!({ "stream": stream, "from": from, "to": to, "cause": cause }),
                    );
                    self.sinks[i]
                        .shared
                        .overflow_records
                        .fetch_add(to - from + 1, Ordering::Relaxed);
                    self.count_gap("sink-overflow", to - from + 1);
                }
                self.sinks[i].dispatched = end;
            }
            if let Err(e) = self.journal.drop_oldest() {
                self.fail("weir-journal", e);
                return;
            }
        }
    }

    /// Drops journal segments every sink has confirmed and saved. Bounded
    /// by the saved cursors, not the confirmed ones: after a `kill -9` a
    /// sink resumes from its saved cursor (the file sink cuts its files back
    /// to it), so every entry from there on must still be in the journal.
    fn compact(&mut self) {
        let saved = self
            .sinks
            .iter()
            .map(|s| &s.shared)
            .chain(self.finished.iter())
            .map(|s| s.saved.load(Ordering::Acquire))
            .min()
            .unwrap_or(0);
        if let Err(e) = self.journal.compact(saved) {
            self.compaction_errors += 1;
            tracing::error!("journal: compaction failed (retried on the next tick): {e:#}");
        }
    }

    /// Counts an audited gap for the metrics.
    fn count_gap(&mut self, cause: &str, records: u64) {
        let c = self.gap_counts.entry(cause.to_string()).or_default();
        c.0 += 1;
        c.1 += records;
    }

    /// Copies what the management endpoint shows onto the board, and
    /// samples the durable index for the sinks' lag in seconds.
    fn publish(&mut self, unrouted: u64, watch: &HeartbeatWatch) {
        let now = Instant::now();
        let durable = self.journal.durable_index();
        if self.durable_times.back().is_none_or(|(i, _)| *i < durable) {
            if self.durable_times.len() >= DURABLE_SAMPLES {
                let thinned: VecDeque<_> = self.durable_times.iter().step_by(2).copied().collect();
                self.durable_times = thinned;
            }
            self.durable_times.push_back((durable, now));
        }
        // Samples every sink has confirmed past are no longer needed.
        let slowest = self
            .sinks
            .iter()
            .map(|s| s.shared.confirmed.load(Ordering::Relaxed))
            .min()
            .unwrap_or(durable);
        while self.durable_times.len() > 1 && self.durable_times[1].0 <= slowest {
            self.durable_times.pop_front();
        }
        let lag = |confirmed: u64| -> crate::status::SinkLag {
            if confirmed >= durable {
                return crate::status::SinkLag::default();
            }
            // The first sample at which the entry at `confirmed` was
            // durable: it has waited at least since then.
            let since = self
                .durable_times
                .iter()
                .find(|(i, _)| *i > confirmed)
                .map_or(now, |(_, t)| *t);
            crate::status::SinkLag {
                entries: durable - confirmed,
                seconds: now.duration_since(since).as_secs_f64(),
            }
        };
        let sink_lag = self
            .sinks
            .iter()
            .map(|s| {
                (
                    s.shared.name.clone(),
                    lag(s.shared.confirmed.load(Ordering::Relaxed)),
                )
            })
            .collect();
        let streams = self
            .journal
            .positions()
            .iter()
            .map(|(name, p)| {
                let records = self.stream_counts.get(name.as_str()).copied().unwrap_or(0);
                (
                    name.clone(),
                    crate::status::StreamRow {
                        records,
                        last_seq: p.last,
                    },
                )
            })
            .collect();
        let gaps = self
            .gap_counts
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let decoder = self.decoder_stats.get();
        let sender = crate::status::SenderView {
            last_heartbeat: watch.last,
            session: watch.session,
            config_hash: watch.config_hash.clone(),
            approved: watch.is_approved,
            counters: watch.counters.clone(),
            silent: watch.lost_since.is_some(),
        };
        let (journal_bytes, journal_fsyncs) = (self.journal.total_bytes(), self.journal.fsyncs());
        let fsync_times = self.journal.fsync_times();
        let (fsync_max_us, slow_fsyncs) = (fsync_times.max_us(), fsync_times.slow());
        let (corrupt, compaction, audit) = (
            self.corrupt_entries,
            self.compaction_errors,
            self.audit.errors,
        );
        let not_approved = watch.not_approved;
        self.board.update(|s| {
            s.decoder = decoder;
            s.streams = streams;
            s.gaps = gaps;
            s.journal_bytes = journal_bytes;
            s.journal_fsyncs = journal_fsyncs;
            s.journal_fsync_max_us = fsync_max_us;
            s.journal_slow_fsyncs = slow_fsyncs;
            s.journal_corrupt_entries = corrupt;
            s.journal_compaction_errors = compaction;
            s.audit_errors = audit;
            s.records_unrouted = unrouted;
            s.sender = sender;
            s.config_not_approved = not_approved;
            s.sink_lag = sink_lag;
        });
    }

    fn metrics(&self, unrouted: &Unrouted) -> Vec<(String, u64)> {
        let mut m: Vec<(String, u64)> = self
            .decoder_stats
            .get()
            .fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let r = &self.recv_stats;
        m.push(("recv_syscalls".into(), r.syscalls.load(Ordering::Relaxed)));
        m.push(("recv_datagrams".into(), r.datagrams.load(Ordering::Relaxed)));
        m.push(("recv_bytes".into(), r.bytes.load(Ordering::Relaxed)));
        m.push(("recv_errors".into(), r.errors.load(Ordering::Relaxed)));
        m.push(("records_unrouted".into(), unrouted.total));
        m.push(("journal_bytes".into(), self.journal.total_bytes()));
        m.push(("journal_fsyncs".into(), self.journal.fsyncs()));
        let fsync_times = self.journal.fsync_times();
        m.push(("journal_fsync_max_us".into(), fsync_times.max_us()));
        m.push(("journal_slow_fsyncs".into(), fsync_times.slow()));
        m.push(("journal_corrupt_entries".into(), self.corrupt_entries));
        m.push(("audit_errors".into(), self.audit.errors));
        m.push(("journal_compaction_errors".into(), self.compaction_errors));
        let all = self
            .sinks
            .iter()
            .map(|s| &s.shared)
            .chain(self.finished.iter());
        for shared in all {
            let (name, s) = (&shared.name, &shared.stats);
            m.push((
                format!("sink.{name}.dead_letters"),
                s.dead_letters.load(Ordering::Relaxed),
            ));
            m.push((
                format!("sink.{name}.overflow_records"),
                shared.overflow_records.load(Ordering::Relaxed),
            ));
            m.push((
                format!("sink.{name}.behind"),
                self.journal
                    .durable_index()
                    .saturating_sub(shared.confirmed.load(Ordering::Relaxed)),
            ));
            m.push((
                format!("sink.{name}.records"),
                s.records.load(Ordering::Relaxed),
            ));
            m.push((
                format!("sink.{name}.errors"),
                s.errors.load(Ordering::Relaxed),
            ));
            m.push((
                format!("sink.{name}.retries"),
                s.retries.load(Ordering::Relaxed),
            ));
            m.push((
                format!("sink.{name}.duplicates"),
                s.duplicates.load(Ordering::Relaxed),
            ));
            m.push((
                format!("sink.{name}.cursor_errors"),
                shared.cursor_errors.load(Ordering::Relaxed),
            ));
            m.push((
                format!("sink.{name}.in_flight_bytes_peak"),
                shared.in_flight_bytes_peak.load(Ordering::Relaxed),
            ));
            for c in &shared.counters {
                m.push((
                    format!("sink.{name}.{}", c.key),
                    c.value.load(Ordering::Relaxed),
                ));
            }
        }
        m
    }

    fn write_metrics(&self, unrouted: &Unrouted, watch: &HeartbeatWatch) {
        let Some(path) = &self.metrics_path else {
            return;
        };
        let mut map = serde_json::Map::new();
        for (k, v) in self.metrics(unrouted) {
            map.insert(k, v.into());
        }
        map.insert(
            "sender_session".into(),
            json!(watch.session.map(|s| format!("{s:016x}"))),
        );
        map.insert("sender_config_hash".into(), json!(watch.config_hash));
        map.insert("sender_config_approved".into(), json!(watch.is_approved));
        map.insert("config_not_approved".into(), json!(watch.not_approved));
        map.insert("auth".into(), self.auth.clone());
        let rebuilt: serde_json::Map<String, serde_json::Value> = self
            .decoder_stats
            .get()
            .rebuilt_histogram()
            .iter()
            .map(|(bucket, n)| (bucket.to_string(), json!(n)))
            .collect();
        map.insert("rebuilt_per_block".into(), rebuilt.into());
        map.insert(
            "records_unrouted_by_stream".into(),
            json!(unrouted.by_stream),
        );
        map.insert(
            "heartbeat_age_ms".into(),
            json!(watch.last.map(|l| l.elapsed().as_millis() as u64)),
        );
        let sender: serde_json::Map<String, serde_json::Value> = watch
            .counters
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        map.insert("sender".into(), serde_json::Value::Object(sender));
        let tmp = path.with_extension("tmp");
        let result = std::fs::write(&tmp, serde_json::to_vec_pretty(&map).expect("json"))
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            tracing::warn!("metrics.path: cannot write {}: {e}", path.display());
        }
    }

    /// WARNs when frames failed authentication since the last warning, at
    /// most every AUTH_WARN_INTERVAL (the counters have every one).
    fn warn_auth_rejections(&self, warned: &mut (u64, Option<Instant>)) {
        let s = &self.decoder_stats.get();
        let total = s.rejected_unauthenticated
            + s.rejected_auth_disabled
            + s.rejected_unknown_key
            + s.rejected_bad_tag;
        if total > warned.0 && warned.1.is_none_or(|t| t.elapsed() >= AUTH_WARN_INTERVAL) {
            tracing::warn!(
                new = total - warned.0,
                rejected_unauthenticated = s.rejected_unauthenticated,
                rejected_auth_disabled = s.rejected_auth_disabled,
                rejected_unknown_key = s.rejected_unknown_key,
                rejected_bad_tag = s.rejected_bad_tag,
                "frames failed authentication and were dropped: a sender with another key or [auth] setting, or forged frames on the link"
            );
            *warned = (total, Some(Instant::now()));
        }
    }

    /// The periodic `status` line. `logged_rebuilt` is the rebuilt-shards
    /// histogram at the previous line; it is updated.
    fn log_status(&self, logged_rebuilt: &mut [u64; REBUILT_BUCKETS.len()]) {
        let s = &self.decoder_stats.get();
        let interval = rebuilt_max_bucket(logged_rebuilt, &s.rebuilt_per_block);
        *logged_rebuilt = s.rebuilt_per_block;
        tracing::info!(
            datagrams = s.datagrams,
            records = s.records,
            blocks_repaired = s.blocks_repaired,
            rebuilt_per_block = rebuilt_line(s).as_str(),
            shards_rebuilt_max = s.shards_rebuilt_max,
            parity_used_max_pct = s.parity_used_max_pct,
            rebuilt_max_interval = interval,
            blocks_lost = s.blocks_lost,
            gaps = s.gaps,
            gap_records = s.gap_records,
            rejected_crc = s.rejected_crc,
            rejected_unauthenticated = s.rejected_unauthenticated,
            rejected_auth_disabled = s.rejected_auth_disabled,
            rejected_unknown_key = s.rejected_unknown_key,
            rejected_bad_tag = s.rejected_bad_tag,
            "status"
        );
    }
}

/// The rebuilt-shards histogram as one log field: `0:9120 1:310 2-3:41 ...`.
fn rebuilt_line(s: &DecoderStats) -> String {
    s.rebuilt_histogram()
        .iter()
        .map(|(bucket, n)| format!("{bucket}:{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The highest rebuilt-shards bucket that gained a block between two
/// histograms (`"0"` when every block since decoded without repair), or
/// `"none"` when no block was decoded in between.
fn rebuilt_max_bucket(
    before: &[u64; REBUILT_BUCKETS.len()],
    now: &[u64; REBUILT_BUCKETS.len()],
) -> &'static str {
    (0..REBUILT_BUCKETS.len())
        .rev()
        .find(|&i| now[i] > before[i])
        .map_or("none", |i| REBUILT_BUCKETS[i])
}

/// The text of a thread's panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivered(body: RecordBody) -> Delivered {
        Delivered {
            stream: Arc::from("s"),
            source_type: Arc::from("generator"),
            session: 1,
            epoch: 1,
            seq: 0,
            resent: false,
            body,
        }
    }

    #[test]
    fn unrouted_records_are_counted_per_stream_and_warned_about_once_per_stream_and_kind() {
        let mut u = Unrouted::default();
        let bytes = || {
            delivered(RecordBody::Bytes(weir_protocol::Chunk {
                data: vec![1],
                end: false,
            }))
        };
        for _ in 0..3 {
            u.count(&bytes());
        }
        let mut other = bytes();
        other.stream = Arc::from("t");
        u.count(&other);
        assert_eq!(u.total, 4);
        assert_eq!(
            u.by_stream
                .iter()
                .map(|(k, v)| (k.as_str(), *v))
                .collect::<Vec<_>>(),
            [("s", 3), ("t", 1)]
        );
        assert_eq!(u.warned.len(), 2, "one warning per stream and kind");
    }

    #[test]
    fn small_records_weigh_their_size_in_memory_and_large_ones_their_journal_bytes() {
        let points: Vec<Delivered> = (0..1000)
            .map(|i| {
                delivered(RecordBody::Point(weir_protocol::Point {
                    tag: format!("plant/tag-{i:05}"),
                    ts_ns: 0,
                    value: weir_protocol::Value::F64(1.0),
                    quality: 0,
                    status: None,
                }))
            })
            .collect();
        // About 60 journal bytes each; far more in memory.
        let weight = batch_weight(60_000, &points);
        assert!(
            weight >= 1000 * (std::mem::size_of::<Delivered>() as u64 + 15),
            "{weight}"
        );
        let chunks = vec![delivered(RecordBody::Bytes(weir_protocol::Chunk {
            data: vec![0; 1000],
            end: false,
        }))];
        assert_eq!(batch_weight(1 << 20, &chunks), 1 << 20);
    }

    /// A pipeline over a journal in `dir` with one sink `name`, whose
    /// queue is `tx` and whose thread is `thread`.
    fn pipeline(
        dir: &std::path::Path,
        name: &str,
        tx: SyncSender<Batch>,
        thread: std::thread::JoinHandle<()>,
    ) -> Pipeline {
        let journal = Journal::open(crate::journal::Settings {
            path: dir.join("journal"),
            max_bytes: 1 << 20,
            fsync_bytes: 1 << 20,
            fsync_interval: Duration::from_millis(5),
        })
        .unwrap();
        Pipeline {
            decoder_stats: Default::default(),
            auth: serde_json::json!("disabled"),
            audit: AuditLog::open(&dir.join("audit.jsonl")).unwrap(),
            journal,
            sinks: vec![SinkHandle {
                shared: Arc::new(SinkShared::new(name, 0)),
                tx,
                routes: crate::sinks::matcher(&["*".into()]).unwrap(),
                kinds: Kinds::ALL,
                dispatched: 0,
                thread: Some(thread),
            }],
            recv_stats: Default::default(),
            metrics_path: None,
            log_interval: Duration::ZERO,
            warn_after: Duration::from_secs(3),
            failure: None,
            finished: Vec::new(),
            readers: vec![None],
            corrupt_entries: 0,
            compaction_errors: 0,
            board: Arc::new(crate::status::Board::new(Default::default(), Vec::new())),
            approved: None,
            stream_counts: HashMap::new(),
            gap_counts: HashMap::new(),
            durable_times: VecDeque::new(),
        }
    }

    #[test]
    fn a_sink_thread_that_dies_stops_the_receiver_naming_the_thread_and_the_cause() {
        let dir = std::env::temp_dir().join(format!("weir-pipeline-dies-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::spawn(|| panic!("disk on fire"));
        while !thread.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut p = pipeline(&dir, "files", tx, thread);
        p.check_sink_threads();
        let failure = p.failure.expect("a dead sink thread is fatal");
        assert!(
            failure.contains("sink-files") && failure.contains("panicked: disk on fire"),
            "{failure}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_sink_catching_up_from_the_journal_stops_where_the_records_in_memory_begin() {
        // 300 durable entries; the ones from 200 on are (as in the journal
        // thread after a segment's rotation fsynced them mid-batch) still
        // in a batch on its way to the sinks in memory.
        let dir = std::env::temp_dir().join(format!("weir-pipeline-until-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (tx, rx) = std::sync::mpsc::sync_channel(SINK_QUEUE);
        let mut p = pipeline(&dir, "files", tx, std::thread::spawn(|| {}));
        let chunk = |seq| Delivered {
            seq,
            ..delivered(RecordBody::Bytes(weir_protocol::Chunk {
                data: vec![7; 100],
                end: false,
            }))
        };
        for seq in 0..300 {
            p.journal.append_record(&chunk(seq)).unwrap();
        }
        assert_eq!(p.journal.sync().unwrap(), 300);
        p.catch_up(usize::MAX, 200);
        assert_eq!(p.sinks[0].dispatched, 200, "the catch-up ends at 200");
        let mut seqs = Vec::new();
        while let Ok(b) = rx.try_recv() {
            assert_eq!(b.start, seqs.len() as u64);
            seqs.extend(b.records.iter().map(|r| r.seq));
            assert_eq!(b.end, seqs.len() as u64);
        }
        assert_eq!(seqs, (0..200).collect::<Vec<u64>>());
        // The batch in memory then goes to the sink as it is.
        let rest: Vec<Delivered> = (200..300).map(chunk).collect();
        p.dispatch(Arc::new(rest), 200, 300, 10_000);
        let b = rx.try_recv().expect("the batch in memory was dispatched");
        assert_eq!((b.start, b.end, b.records.len()), (200, 300, 100));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_status_line_names_each_rebuilt_bucket_and_the_worst_one_of_the_interval() {
        let s = DecoderStats {
            rebuilt_per_block: [9120, 310, 41, 2, 0, 0, 0, 0],
            ..Default::default()
        };
        assert_eq!(
            rebuilt_line(&s),
            "0:9120 1:310 2-3:41 4-7:2 8-15:0 16-31:0 32-63:0 64+:0"
        );
        let before = s.rebuilt_per_block;
        assert_eq!(rebuilt_max_bucket(&before, &before), "none");
        let mut now = before;
        now[0] += 100;
        assert_eq!(rebuilt_max_bucket(&before, &now), "0");
        now[1] += 3;
        now[4] += 1;
        assert_eq!(rebuilt_max_bucket(&before, &now), "8-15");
        now[7] += 1;
        assert_eq!(rebuilt_max_bucket(&before, &now), "64+");
    }
}
