//! The decoder thread: datagrams in from the socket thread, records out to
//! the sink threads, gaps and sender events to the audit log, cursors to
//! the state file, counters to the metrics file.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use globset::GlobSet;
use serde_json::json;
use weir_protocol::decoder::Delivered;
use weir_protocol::{Decoder, Event, Heartbeat, Nanos};

use crate::audit::AuditLog;
use crate::sinks::{Batch, Confirmed, SinkStats};
use crate::state::{State, StateFile, StreamCursor};
use crate::udp::{RecvBatch, RecvStats};

pub struct SinkHandle {
    pub name: String,
    pub tx: SyncSender<Batch>,
    pub routes: GlobSet,
    pub confirmed: Confirmed,
    pub stats: Arc<SinkStats>,
    pub thread: JoinHandle<()>,
}

pub struct Pipeline {
    pub decoder: Decoder,
    pub audit: AuditLog,
    pub state_file: StateFile,
    pub sinks: Vec<SinkHandle>,
    pub recv_stats: Arc<RecvStats>,
    pub metrics_path: Option<PathBuf>,
    pub log_interval: Duration,
    pub warn_after: Duration,
    /// Sinks whose threads have ended (at shutdown), kept for their cursors.
    pub finished_sinks: Vec<(String, GlobSet, Confirmed, Arc<SinkStats>)>,
}

/// Tracks sender heartbeats: warns when they stop, logs when the sender's
/// session or configuration hash changes.
struct HeartbeatWatch {
    warn_after: Duration,
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

impl Pipeline {
    /// Runs until the socket thread hangs up, then drains to the sinks.
    pub fn run(mut self, batches: Receiver<RecvBatch>, free: SyncSender<RecvBatch>) {
        let origin = Instant::now();
        let now = || origin.elapsed().as_nanos() as Nanos;
        let mut watch = HeartbeatWatch {
            warn_after: self.warn_after,
            started: origin,
            last: None,
            lost_since: None,
            last_warning: None,
            session: None,
            config_hash: None,
            counters: Vec::new(),
        };
        let mut records: Vec<Delivered> = Vec::new();
        let mut unrouted: HashSet<Arc<str>> = HashSet::new();
        let mut routed: HashMap<Arc<str>, bool> = HashMap::new();
        let mut unrouted_records: u64 = 0;
        let mut last_tick = Instant::now();
        let mut last_log = Instant::now();
        loop {
            let disconnected = match batches.recv_timeout(Duration::from_millis(20)) {
                Ok(batch) => {
                    let t = now();
                    for d in batch.datagrams() {
                        self.decoder.handle_datagram(t, d);
                    }
                    let _ = free.try_send(batch);
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            let t = now();
            if self.decoder.poll_timeout().is_some_and(|d| d <= t) {
                self.decoder.handle_timeout(t);
            }
            while let Some(ev) = self.decoder.poll_event() {
                match ev {
                    Event::Record(r) => {
                        let sinks = &self.sinks;
                        let is_routed = *routed
                            .entry(r.stream.clone())
                            .or_insert_with(|| sinks.iter().any(|s| s.routes.is_match(&*r.stream)));
                        if is_routed {
                            records.push(r);
                        } else {
                            unrouted_records += 1;
                            if unrouted.insert(r.stream.clone()) {
                                tracing::warn!(stream = %r.stream, "stream matches no sink's `streams`; its records are counted in records_unrouted and discarded");
                            }
                        }
                    }
                    Event::Gap(g) => {
                        tracing::warn!(stream = %g.stream, from = g.from, to = g.to, records = g.len(), cause = g.cause.as_str(), "gap: records will not arrive");
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
                if records.len() >= 8192 {
                    self.dispatch(&mut records);
                }
            }
            self.dispatch(&mut records);
            if disconnected {
                break;
            }
            if last_tick.elapsed() >= Duration::from_millis(250) {
                last_tick = Instant::now();
                watch.tick(&mut self.audit);
                self.audit.sync();
                self.save_state();
                self.write_metrics(unrouted_records, &watch);
                if !self.log_interval.is_zero() && last_log.elapsed() >= self.log_interval {
                    last_log = Instant::now();
                    self.log_status();
                }
            }
        }
        // Shutdown: let every sink finish what it was given, then record
        // exactly what they confirmed.
        for s in std::mem::take(&mut self.sinks) {
            drop(s.tx);
            let _ = s.thread.join();
            self.finished_sinks
                .push((s.name, s.routes, s.confirmed, s.stats));
        }
        self.save_state();
        self.write_metrics(unrouted_records, &watch);
        self.log_status();
        self.audit.write("receiver-stop", json!({}));
        self.audit.sync();
    }

    fn dispatch(&mut self, records: &mut Vec<Delivered>) {
        if records.is_empty() {
            return;
        }
        let batch: Batch = Arc::new(std::mem::take(records));
        for s in &self.sinks {
            // Blocks while a sink's queue is full; the socket buffer absorbs
            // the wait and anything beyond it becomes a reported gap.
            if s.tx.send(batch.clone()).is_err() {
                tracing::error!(sink = %s.name, "sink thread has stopped; its records are not written");
            }
        }
    }

    /// Per stream, the last sequence every sink routing it has confirmed.
    fn save_state(&mut self) {
        let mut state = State::default();
        let sinks: Vec<(&GlobSet, &Confirmed)> = self
            .sinks
            .iter()
            .map(|s| (&s.routes, &s.confirmed))
            .chain(self.finished_sinks.iter().map(|s| (&s.1, &s.2)))
            .collect();
        let confirmed: Vec<HashMap<Arc<str>, u64>> = sinks
            .iter()
            .map(|(_, c)| c.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        for (stream, position) in self.decoder.cursors() {
            let last = position.last;
            let routing: Vec<usize> = sinks
                .iter()
                .enumerate()
                .filter(|(_, (r, _))| r.is_match(stream))
                .map(|(i, _)| i)
                .collect();
            let last = if routing.is_empty() {
                last
            } else {
                routing
                    .iter()
                    .map(|i| confirmed[*i].get(stream).copied())
                    .min()
                    .flatten()
            };
            if last.is_some() {
                state.streams.insert(
                    stream.to_string(),
                    StreamCursor {
                        session: position.session.map(|s| format!("{s:016x}")),
                        epoch: position.epoch.map(|e| format!("{e:016x}")),
                        last,
                    },
                );
            }
        }
        if let Err(e) = self.state_file.save(&state) {
            tracing::error!("journal.path: cannot save cursors: {e:#}");
        }
    }

    fn metrics(&self, unrouted: u64) -> Vec<(String, u64)> {
        let mut m: Vec<(String, u64)> = self
            .decoder
            .stats()
            .fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let r = &self.recv_stats;
        m.push(("recv_syscalls".into(), r.syscalls.load(Ordering::Relaxed)));
        m.push(("recv_datagrams".into(), r.datagrams.load(Ordering::Relaxed)));
        m.push(("recv_bytes".into(), r.bytes.load(Ordering::Relaxed)));
        m.push(("recv_errors".into(), r.errors.load(Ordering::Relaxed)));
        m.push(("records_unrouted".into(), unrouted));
        let all = self
            .sinks
            .iter()
            .map(|s| (&s.name, &s.stats))
            .chain(self.finished_sinks.iter().map(|s| (&s.0, &s.3)));
        for (name, s) in all {
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
        }
        m
    }

    fn write_metrics(&self, unrouted: u64, watch: &HeartbeatWatch) {
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

    fn log_status(&self) {
        let s = self.decoder.stats();
        tracing::info!(
            datagrams = s.datagrams,
            records = s.records,
            blocks_repaired = s.blocks_repaired,
            blocks_lost = s.blocks_lost,
            gaps = s.gaps,
            gap_records = s.gap_records,
            rejected_crc = s.rejected_crc,
            "status"
        );
    }
}
