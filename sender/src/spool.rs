//! The sender's disk spool: sources append records, the link thread reads
//! them at the link's pace. Append-only segment files under `[spool] path`:
//!
//! ```text
//! segments/{index of first entry:020}.seg   entries: [u32 len][u32 crc32][postcard(Entry)]
//! state.json                                 per-stream epoch and next sequence; durable and sent positions
//! resend/*.json                              operator requests from `weir-sender resend`
//! ```
//!
//! Every entry has a global index (its position in append order). Appends
//! never block a source on the link or on the disk: the sync thread writes
//! them to the OS and fsyncs them as a group commit (an fsync starts as
//! soon as entries were appended and none is running; entries appended
//! while one runs are all covered by the next); the reader only reads
//! fsynced entries, so nothing sent can vanish in a power loss and have its
//! sequence number reused. When the spool passes `max_bytes` or its oldest
//! segment passes `max_age`, the oldest segment is deleted; records in it
//! that were not sent yet are counted, logged with their sequence ranges and
//! announced over the link as gap notices. Sent segments stay until then, so
//! an operator can resend a retained range. A torn tail (power loss
//! mid-write) is found by its CRC and truncated on open.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::{NoticeCause, RecordBody, RecordBodyRef};
use weir_store::frame::ENTRY_HEADER;
use weir_store::{
    segment, FsyncTimes, GroupCommit, Hole, Log, OpenRules, ReadEnd, Step, SyncJob, Walked,
};

use crate::fatal::Fatal;
use crate::metrics::Counters;

/// How often sequence state and the sent position are saved; a crash
/// resends at most this much (the receiver drops the duplicates). Records
/// are sent only once a saved state covers them, so a sequence number that
/// reached the link is never handed out again, whatever happens to the disk.
const STATE_INTERVAL: Duration = Duration::from_millis(20);
/// Byte streams stop reading above this many unsent bytes (flow control).
const STREAM_HIGH_WATER: u64 = 16 << 20;

#[derive(Serialize)]
struct EntryRef<'a> {
    stream: &'a str,
    seq: u64,
    body: &'a RecordBody,
}

/// One spooled record (same encoding as `EntryRef`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Entry {
    pub stream: String,
    pub seq: u64,
    pub body: RecordBody,
}

/// Records as the spool stores them, for the link thread: each record's
/// stream name and serialized body stay bytes in one buffer, checked but
/// not decoded, and go to the encoder as they are
/// (`Encoder::push_encoded`): no per-record allocation, no decoding and
/// re-encoding.
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    pub items: Vec<Item>,
}

/// One spooled record in a [`Batch`]: where its stream name and body are
/// in the batch's bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spooled {
    pub index: u64,
    pub seq: u64,
    stream: (usize, usize),
    body: (usize, usize),
}

impl Batch {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.items.clear();
    }

    /// Bytes of names and bodies held.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn stream(&self, r: &Spooled) -> &str {
        std::str::from_utf8(&self.bytes[r.stream.0..r.stream.1]).expect("checked when read")
    }

    /// The body, serialized as `RecordBody` serializes.
    pub fn body(&self, r: &Spooled) -> &[u8] {
        &self.bytes[r.body.0..r.body.1]
    }

    /// The record decoded (for repeats, which keep a copy, and tests).
    pub fn entry(&self, r: &Spooled) -> Entry {
        Entry {
            stream: self.stream(r).to_string(),
            seq: r.seq,
            body: postcard::from_bytes(self.body(r)).expect("checked when read"),
        }
    }

    fn push(&mut self, index: u64, stream: &str, seq: u64, body: &[u8]) {
        let s0 = self.bytes.len();
        self.bytes.extend_from_slice(stream.as_bytes());
        let b0 = self.bytes.len();
        self.bytes.extend_from_slice(body);
        self.items.push(Item::Record(Spooled {
            index,
            seq,
            stream: (s0, b0),
            body: (b0, self.bytes.len()),
        }));
    }
}

/// What the link thread reads, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Record(Spooled),
    /// `from..=to` of `stream` were dropped unsent (spool bound or damage).
    Dropped {
        stream: String,
        from: u64,
        to: u64,
        cause: NoticeCause,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub epoch: u64,
    pub next_seq: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    streams: BTreeMap<String, StreamState>,
    /// Entries below this were fsynced when the state was saved.
    durable_index: u64,
    /// Entries below this were on the wire; a restart resends from here.
    sent_index: u64,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub max_age: Duration,
    /// `spool.fsync_ms`: the longest the idle sync thread sleeps, and
    /// under load the longest an fsync waits for more entries.
    pub fsync_interval: Duration,
    /// `spool.fsync_bytes`: under load, an fsync starts once this much was
    /// appended, if `fsync_ms` has not passed first.
    pub fsync_bytes: u64,
}

impl Settings {
    fn segment_bytes(&self) -> u64 {
        weir_store::log::segment_bytes(self.max_bytes)
    }
}

/// A gap notice waiting for the reader to reach `at` (where the records it
/// names were), so it follows the records before it and precedes the rest.
type Notice = (String, u64, u64, NoticeCause);

pub struct Spool {
    settings: Settings,
    /// The segments (`weir_store::Log`): what an entry means is this
    /// module's business, keeping them is the store's.
    log: Log,
    durable_index: u64,
    /// The durable index recorded in the last saved state: the reader's limit.
    saved_durable: u64,
    /// Framed bytes of the readable entries at or after `read_index`:
    /// exact (counted from entry positions at open, then per append, read
    /// and eviction), because byte-stream sources stop reading above a
    /// bound of it and only start again when it falls.
    unsent_bytes: u64,
    streams: BTreeMap<String, StreamState>,
    read_index: u64,
    reader: Option<weir_store::Cursor>,
    dropped: VecDeque<Notice>,
    /// Ranges lost to damage found at open (a torn tail, corrupt entries),
    /// each announced when the reader reaches its index; sorted by index.
    pending: VecDeque<(u64, Notice)>,
    sent_index: u64,
    state_dirty: bool,
    last_state_save: Instant,
    /// A segment was closed or the link is draining: the sync thread
    /// should sync now.
    sync_wanted: bool,
    /// Bytes appended since the last fsync job was prepared, and when.
    group: GroupCommit,
    /// How long the fsync jobs took (`spool_fsync_max_us`, `spool_slow_fsyncs`).
    fsync_times: Arc<FsyncTimes>,
    /// The sync thread sleeps with entries waiting, gathering a group under
    /// load (`sync_due`): appends wake it only once `fsync_bytes` wait.
    group_wait: bool,
    /// The sync thread waits for work on `sync_wake`: an append or a moved
    /// sent position must wake it (only then, so appends cost no wake-up
    /// while it is busy).
    sync_idle: bool,
    sync_wake: Arc<std::sync::Condvar>,
    /// The sync thread should end (`SharedSpool::stop_sync`).
    sync_stop: bool,
    counters: Arc<Counters>,
}

/// The leading fields of an entry (same encoding as `Entry`), enough to
/// number and route it without decoding its body.
#[derive(Deserialize)]
struct EntryHead<'a> {
    #[serde(borrow)]
    stream: &'a str,
    seq: u64,
}

fn head_of(payload: &[u8]) -> Option<EntryHead<'_>> {
    postcard::take_from_bytes::<EntryHead>(payload)
        .ok()
        .map(|(h, _)| h)
}

/// What a walk of a segment meets, in order.
enum Seen<'a> {
    Entry {
        index: u64,
        size: u64,
        head: EntryHead<'a>,
    },
    Hole(&'a Hole),
}

/// Raises a stream's next sequence number past `seq` (creating the stream
/// with a fresh epoch if the state file did not know it).
fn see_seq(streams: &mut BTreeMap<String, StreamState>, stream: &str, seq: u64) {
    let s = match streams.get_mut(stream) {
        Some(s) => s,
        None => streams.entry(stream.to_string()).or_insert(StreamState {
            epoch: rand::random(),
            next_seq: 0,
        }),
    };
    s.next_seq = s.next_seq.max(seq.saturating_add(1));
}

/// Walks segment `i` whole: its readable entries (with their heads) and
/// its holes, in order; an entry that no longer reads is an error.
fn walk_heads(log: &mut Log, i: usize, mut visit: impl FnMut(Seen<'_>)) -> Result<()> {
    let mut failed = None;
    log.walk(i, |w| match w {
        Walked::Entry {
            index,
            size,
            payload,
            ..
        } => match head_of(payload) {
            Some(head) => visit(Seen::Entry { index, size, head }),
            None => failed = Some((index, "entry does not decode")),
        },
        Walked::Hole(h) => visit(Seen::Hole(h)),
        Walked::Unreadable { index, why, .. } => failed = Some((index, why)),
    })?;
    if let Some((index, why)) = failed {
        bail!(
            "spool: entry {index} unreadable ({why}) in {}; a restart skips unreadable entries and announces their records as sender-spool-corrupt",
            log.segments()[i].path.display()
        );
    }
    Ok(())
}

/// Sequence continuity across holes, built while scanning at open: the
/// records a hole took are the sequence numbers its streams skip across it.
#[derive(Default)]
struct Continuity {
    /// Per stream: the last sequence number seen and its entry index.
    last: HashMap<String, (u64, u64)>,
    /// Index of every hole, in order.
    holes: Vec<u64>,
    /// (hole index, stream, from, to): ranges the holes took.
    lost: Vec<(u64, String, u64, u64)>,
    /// (hole index, stream, first seq after it): streams first seen after a
    /// hole, so what they lost in it (if anything) has no known start.
    unknown: Vec<(u64, String, u64)>,
}

impl Continuity {
    /// The first hole after entry `after` (and before `before`).
    fn hole_between(&self, after: u64, before: u64) -> Option<u64> {
        let i = self.holes.partition_point(|h| *h <= after);
        self.holes.get(i).copied().filter(|h| *h < before)
    }

    fn see(&mut self, stream: &str, seq: u64, index: u64) {
        match self.last.get(stream).copied() {
            Some((last_seq, last_index)) => {
                if seq > last_seq.saturating_add(1) {
                    if let Some(hole) = self.hole_between(last_index, index) {
                        self.lost
                            .push((hole, stream.to_string(), last_seq + 1, seq - 1));
                    }
                }
                if let Some(last) = self.last.get_mut(stream) {
                    *last = (seq, index);
                }
            }
            None => {
                if let Some(hole) = self.holes.first().filter(|h| **h < index) {
                    self.unknown.push((*hole, stream.to_string(), seq));
                }
                self.last.insert(stream.to_string(), (seq, index));
            }
        }
    }

    /// Streams whose last record is before a hole: everything they were
    /// given after it (up to `next_seq`) was in a hole.
    fn finish(&mut self, streams: &BTreeMap<String, StreamState>) {
        for (stream, (seq, index)) in &self.last {
            let Some(hole) = self.hole_between(*index, u64::MAX) else {
                continue;
            };
            if let Some(s) = streams.get(stream) {
                if s.next_seq > seq.saturating_add(1) {
                    self.lost
                        .push((hole, stream.clone(), seq + 1, s.next_seq - 1));
                }
            }
        }
        self.lost.sort_by_key(|l| l.0);
    }
}

impl Spool {
    pub fn open(settings: Settings, counters: Arc<Counters>) -> Result<Self> {
        let root = settings.path.clone();
        std::fs::create_dir_all(&root)
            .with_context(|| format!("spool.path: cannot create {}", root.display()))?;
        std::fs::create_dir_all(root.join("resend")).with_context(|| {
            format!(
                "spool.path: cannot create {}",
                root.join("resend").display()
            )
        })?;
        let state_path = root.join("state.json");
        let saved = weir_store::read_if_present(&state_path)?;
        let state_found = saved.is_some();
        let mut state: State = match saved {
            Some(b) => serde_json::from_slice(&b).with_context(|| {
                format!("spool.path: {} is corrupt; move it away to rebuild sequence state from the segments", state_path.display())
            })?,
            None => State::default(),
        };
        let (mut log, opened) = Log::open(
            weir_store::Settings {
                dir: root.join("segments"),
                key: "spool.path",
                what: "spool",
                segment_bytes: settings.segment_bytes(),
                write_buffer: 256 << 10,
            },
            OpenRules {
                // Entries not fsynced when the state was saved may be torn
                // (without a state file nothing says where that was).
                torn_from: state_found.then_some(state.durable_index),
                // Sequence numbers measure what a guessed hole took.
                guess_past_damage: true,
            },
            |payload| head_of(payload).is_some(),
        )?;
        let saved_streams = state.streams.clone();
        let mut continuity = Continuity::default();
        let damaged = opened.repair.is_some();
        if let Some(r) = &opened.repair {
            tracing::warn!(
                segment = %r.path.display(),
                kept_entries = r.kept_entries,
                truncated_bytes = r.cut_bytes,
                "spool: torn tail after a crash ({}); truncated to the last whole record",
                r.torn.why
            );
        }
        for seg in log.segments() {
            for hole in &seg.holes {
                tracing::warn!(
                    segment = %seg.path.display(),
                    index = hole.from,
                    offset = hole.offset,
                    bytes = hole.end_offset - hole.offset,
                    "spool: unreadable bytes in the middle of a segment ({}); skipped, the records they held are announced as sender-spool-corrupt",
                    hole.why
                );
            }
        }
        let any_holes = log.segments().iter().any(|s| !s.holes.is_empty());
        for i in 0..log.segments().len() {
            let seg = &log.segments()[i];
            if damaged || any_holes {
                // Damage: measure what it took by the sequence numbers each
                // stream skips across it, and rebuild every stream's next
                // number from every entry (a hole's slot count may be a guess).
                let streams = &mut state.streams;
                walk_heads(&mut log, i, |seen| match seen {
                    Seen::Entry { index, head, .. } => {
                        continuity.see(head.stream, head.seq, index);
                        see_seq(streams, head.stream, head.seq);
                    }
                    Seen::Hole(hole) => continuity.holes.push(hole.from),
                })?;
            } else if seg.end() > state.durable_index {
                // Sequence numbers are rebuilt from what the state file has
                // not accounted for.
                let (streams, durable) = (&mut state.streams, state.durable_index);
                walk_heads(&mut log, i, |seen| {
                    if let Seen::Entry { index, head, .. } = seen {
                        if index >= durable {
                            see_seq(streams, head.stream, head.seq);
                        }
                    }
                })?;
            }
        }
        if damaged || any_holes {
            continuity.finish(&state.streams);
        }
        let next_index = log.next_index();
        let oldest = log.first_index();
        let mut read_index = state.sent_index.clamp(oldest, next_index);
        // Never start inside a hole; and after a hole whose slot count is a
        // guess, the indexes after it may not be the ones `sent_index`
        // counted: start at the hole (the receiver drops what it has).
        if let Some(i) = log.segment_of(read_index) {
            if let Some(hole) = log.segments()[i].holes.iter().find(|h| {
                (h.from <= read_index && read_index < h.to) || (!h.exact && h.from < read_index)
            }) {
                read_index = hole.from;
            }
        }
        // Records the saved state counted but the damaged tail lost: their
        // numbers are not reused, and the receiver is told why they are missing.
        let mut pending: Vec<(u64, Notice)> = Vec::new();
        let mut corrupt_streams: HashSet<&str> = HashSet::new();
        for (at, stream, from, to) in &continuity.lost {
            if *at < read_index {
                continue; // passed before: sent before the damage, or announced then
            }
            tracing::warn!(stream = %stream, from, to, records = to - from + 1,
                "spool: records lost in a corrupt part of a segment; announced to the receiver as sender-spool-corrupt");
            counters
                .spool_corrupt_records
                .fetch_add(to - from + 1, Ordering::Relaxed);
            corrupt_streams.insert(stream);
            pending.push((*at, (stream.clone(), *from, *to, NoticeCause::SpoolCorrupt)));
        }
        for (at, stream, first_after) in &continuity.unknown {
            if *at >= read_index {
                tracing::warn!(stream = %stream, before = first_after,
                    "spool: a corrupt part of a segment precedes this stream's first readable record; records of it before that one may be lost (the receiver reports any it lacks as a gap)");
            }
        }
        if damaged {
            for (stream, saved) in &saved_streams {
                let Some((last, _)) = continuity.last.get(stream) else {
                    continue;
                };
                if last + 1 < saved.next_seq && !corrupt_streams.contains(stream.as_str()) {
                    tracing::warn!(stream = %stream, from = last + 1, to = saved.next_seq - 1,
                        "spool: records lost with the damaged tail; announced to the receiver as sender-spool-damaged");
                    counters
                        .spool_damaged_records
                        .fetch_add(saved.next_seq - 1 - last, Ordering::Relaxed);
                    pending.push((
                        next_index,
                        (
                            stream.clone(),
                            last + 1,
                            saved.next_seq - 1,
                            NoticeCause::SpoolDamaged,
                        ),
                    ));
                }
            }
        }
        pending.sort_by_key(|p| p.0);
        // Exact unsent bytes: the readable entries of whole segments after
        // the read position, and those at or after it in the segment
        // holding it.
        let mut unsent_bytes = 0;
        for i in 0..log.segments().len() {
            let seg = &log.segments()[i];
            if seg.first >= read_index {
                unsent_bytes += seg.entry_bytes;
            } else if seg.end() > read_index {
                walk_heads(&mut log, i, |seen| {
                    if let Seen::Entry { index, size, .. } = seen {
                        if index >= read_index {
                            unsent_bytes += size;
                        }
                    }
                })?;
            }
        }
        tracing::info!(
            path = %root.display(),
            entries = next_index - oldest,
            bytes = log.total_bytes(),
            unsent = next_index - read_index,
            unsent_bytes,
            streams = state.streams.len(),
            "spool opened"
        );
        let mut spool = Spool {
            settings,
            log,
            durable_index: next_index,
            saved_durable: 0,
            unsent_bytes,
            streams: state.streams,
            read_index,
            reader: None,
            dropped: VecDeque::new(),
            pending: pending.into(),
            sent_index: read_index,
            state_dirty: true,
            last_state_save: Instant::now(),
            sync_wanted: false,
            group: GroupCommit::default(),
            fsync_times: Arc::default(),
            group_wait: false,
            sync_idle: false,
            sync_wake: Arc::new(std::sync::Condvar::new()),
            sync_stop: false,
            counters,
        };
        spool.save_state()?;
        Ok(spool)
    }

    /// The sequence state of a stream, created (with a fresh epoch) if new.
    pub fn stream(&mut self, name: &str) -> StreamState {
        // Called per appended record: look up before allocating a key.
        if let Some(s) = self.streams.get(name) {
            return *s;
        }
        let s = StreamState {
            epoch: rand::random(),
            next_seq: 0,
        };
        self.streams.insert(name.to_string(), s);
        s
    }

    /// Appends a record, assigning the stream's next sequence number.
    /// Never waits on the link; a full spool drops its oldest segment.
    #[cfg(test)]
    pub fn append(&mut self, stream: &str, body: &RecordBody) -> Result<u64> {
        self.append_batch(stream, std::slice::from_ref(body))
    }

    /// Appends records of one stream, numbered in order; returns the last
    /// number. The stream is looked up, the clock read and the bounds
    /// enforced once per batch, not per record.
    pub fn append_batch(&mut self, stream: &str, bodies: &[RecordBody]) -> Result<u64> {
        let first = self.stream(stream).next_seq;
        let mut seq = first;
        let mut result = Ok(());
        for body in bodies {
            let entry = EntryRef { stream, seq, body };
            let appended = self
                .log
                .append_with(|b| weir_protocol::record::encode_into(&entry, b));
            let (size, full) = match appended {
                Ok((_, size, full)) => (size, full),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            // A large record (a stream chunk) goes to the OS at once, so a
            // crash of this process cannot lose it; small ones when the sync
            // thread, woken by the append, starts the fsync that covers them.
            let big = size >= 8192;
            seq += 1;
            self.unsent_bytes += size;
            self.group.appended(size);
            if big {
                if let Err(e) = self.log.flush() {
                    result = Err(e);
                    break;
                }
            }
            if full {
                if let Err(e) = self.rotate() {
                    result = Err(e);
                    break;
                }
            }
        }
        // Whatever was written is numbered, even if a later write failed.
        self.streams
            .get_mut(stream)
            .expect("created above")
            .next_seq = seq;
        if seq > first {
            self.log.touch();
            self.state_dirty = true;
        }
        result?;
        self.enforce_bounds()?;
        // While the sync thread gathers a group under load, appends wake it
        // only once the group is full (its timeout covers `fsync_ms`).
        if !self.group_wait || self.group.unsynced() >= self.settings.fsync_bytes {
            self.wake_sync();
        }
        Ok(seq.saturating_sub(1))
    }

    /// Wakes the sync thread if it waits for work (see `sync_idle`).
    fn wake_sync(&mut self) {
        if std::mem::take(&mut self.sync_idle) {
            self.sync_wake.notify_one();
        }
    }

    fn rotate(&mut self) -> Result<()> {
        // The closed segment still needs its fsync: the next sync job does it.
        self.log.rotate()?;
        self.sync_wanted = true;
        Ok(())
    }

    /// True when an fsync (and state save) should run now: for entries
    /// appended and not yet fsynced, by [`GroupCommit::due`] (only the sync
    /// thread runs fsyncs, one at a time, so when it asks none is running);
    /// for a moved sent position, within `STATE_INTERVAL`.
    fn sync_due(&self) -> bool {
        self.sync_wanted
            || (self.durable_index != self.log.next_index()
                && self.group.due(
                    true,
                    self.settings.fsync_bytes,
                    self.settings.fsync_interval,
                ))
            || (self.state_dirty && self.last_state_save.elapsed() >= STATE_INTERVAL)
    }

    /// Entries wait for an fsync that `sync_due` holds back (a group under load).
    fn gathering(&self) -> bool {
        self.durable_index != self.log.next_index() && !self.sync_due()
    }

    /// How long the idle sync thread may sleep: until a moved sent
    /// position is due to be saved, else `fsync_ms` (it then ages out
    /// segments, which appends also do; appends and a moved sent position
    /// wake it earlier).
    fn sync_idle_wait(&self) -> Duration {
        let wait = if self.state_dirty {
            STATE_INTERVAL.saturating_sub(self.last_state_save.elapsed())
        } else {
            self.settings.fsync_interval
        };
        if self.durable_index != self.log.next_index() {
            // A group gathering under load is due by `fsync_ms`.
            wait.min(self.group.wait(self.settings.fsync_interval))
        } else {
            wait
        }
    }

    /// Writes buffered entries to the OS and returns the fsync work for
    /// everything appended so far, to run without holding the spool.
    fn prepare_sync(&mut self) -> Result<SpoolSync> {
        let files = self.log.sync_files()?;
        let up_to = self.log.next_index();
        let state = State {
            streams: self.streams.clone(),
            durable_index: up_to,
            sent_index: self.sent_index,
        };
        self.sync_wanted = false;
        self.group.requested();
        Ok(SpoolSync {
            job: SyncJob {
                files,
                up_to,
                state: Some((
                    self.settings.path.join("state.json"),
                    serde_json::to_vec_pretty(&state).expect("json"),
                )),
                what: "spool",
                times: self.fsync_times.clone(),
            },
            sent: self.sent_index,
        })
    }

    fn finish_sync(&mut self, sync: &SpoolSync) {
        let up_to = sync.job.up_to;
        self.durable_index = self.durable_index.max(up_to);
        self.saved_durable = self.saved_durable.max(up_to);
        self.last_state_save = Instant::now();
        self.state_dirty = self.log.next_index() != up_to || self.sent_index != sync.sent;
        self.counters
            .spool_bytes
            .store(self.log.total_bytes(), Ordering::Relaxed);
        Counters::add(&self.counters.spool_fsyncs, 1);
        self.counters
            .spool_fsync_max_us
            .store(self.fsync_times.max_us(), Ordering::Relaxed);
        self.counters
            .spool_slow_fsyncs
            .store(self.fsync_times.slow(), Ordering::Relaxed);
    }

    /// Fsyncs everything appended and saves state, holding the spool
    /// (start, tests); the running sender uses `SharedSpool::tick`.
    pub fn sync(&mut self) -> Result<()> {
        let sync = self.prepare_sync()?;
        sync.job.run()?;
        self.finish_sync(&sync);
        Ok(())
    }

    fn enforce_bounds(&mut self) -> Result<()> {
        loop {
            let segments = self.log.segments();
            let too_big = self.log.total_bytes() > self.settings.max_bytes;
            let too_old = segments.front().is_some_and(|s| {
                s.count > 0
                    && s.modified
                        .elapsed()
                        .is_ok_and(|age| age > self.settings.max_age)
            });
            if !(too_big || too_old) {
                return Ok(());
            }
            if segments.len() < 2 {
                if segments.back().is_some_and(|s| s.count > 0) {
                    // Everything is in the active segment: start a new one
                    // so the old one can go.
                    self.rotate()?;
                    continue;
                }
                return Ok(());
            }
            self.evict_oldest(if too_big { "max_bytes" } else { "max_age" })?;
        }
    }

    fn evict_oldest(&mut self, bound: &str) -> Result<()> {
        let (first, end) = {
            let seg = self.log.segments().front().expect("checked");
            (seg.first, seg.end())
        };
        if self.read_index < end {
            // Records never sent: find their ranges before they go.
            let from_index = self.read_index.max(first);
            let mut ranges: Vec<(String, u64, u64)> = Vec::new();
            let (mut dropped, mut dropped_bytes) = (0u64, 0u64);
            walk_heads(&mut self.log, 0, |seen| {
                let Seen::Entry { index, size, head } = seen else {
                    return;
                };
                if index < from_index {
                    return;
                }
                dropped += 1;
                dropped_bytes += size;
                match ranges
                    .iter_mut()
                    .find(|r| r.0 == head.stream && r.2 + 1 == head.seq)
                {
                    Some(r) => r.2 = head.seq,
                    None => ranges.push((head.stream.to_string(), head.seq, head.seq)),
                }
            })?;
            Counters::add(&self.counters.spool_dropped_records, dropped);
            for (stream, from, to) in &ranges {
                tracing::warn!(
                    stream = %stream,
                    from,
                    to,
                    records = to - from + 1,
                    "spool: {bound} reached, oldest records dropped before they were sent; the receiver records a sender-spool-overflow gap"
                );
            }
            self.dropped.extend(
                ranges
                    .into_iter()
                    .map(|(s, f, t)| (s, f, t, NoticeCause::SpoolOverflow)),
            );
            debug_assert!(self.unsent_bytes >= dropped_bytes, "unsent bytes are exact");
            self.unsent_bytes = self.unsent_bytes.saturating_sub(dropped_bytes);
            self.read_index = end;
            self.reader = None;
        }
        self.log.remove_oldest()?;
        Ok(())
    }

    /// Moves the notices whose position the reader has reached to `dropped`.
    fn release_pending(&mut self) {
        while self
            .pending
            .front()
            .is_some_and(|(at, _)| *at <= self.read_index)
        {
            let (_, notice) = self.pending.pop_front().expect("front");
            self.dropped.push_back(notice);
        }
    }

    /// Moves up to `max` items, and records of about `max_bytes` in all,
    /// into `out`: first any notices of dropped ranges, then fsynced
    /// records from the read position.
    pub fn read(&mut self, out: &mut Batch, max: usize, max_bytes: usize) -> Result<()> {
        self.release_pending();
        while let Some((stream, from, to, cause)) = self.dropped.pop_front() {
            out.items.push(Item::Dropped {
                stream,
                from,
                to,
                cause,
            });
        }
        self.read_records(out, max, max_bytes)
    }

    fn read_records(&mut self, out: &mut Batch, max: usize, max_bytes: usize) -> Result<()> {
        let mut n = 0;
        // Stop where damaged records were, so their notice goes first.
        let limit = match self.pending.front() {
            Some((at, _)) => self.saved_durable.min(*at),
            None => self.saved_durable,
        };
        let (unsent_bytes, counters) = (&mut self.unsent_bytes, &self.counters);
        // Holes (announced at open: their notices went out above) are jumped.
        let end = self
            .log
            .read(&mut self.reader, self.read_index, limit, |index, entry| {
                if n >= max || out.bytes() >= max_bytes {
                    return Step::Stop;
                }
                let Some(head) = head_of(entry) else {
                    return Step::Undecodable;
                };
                let size = (ENTRY_HEADER + entry.len()) as u64;
                debug_assert!(*unsent_bytes >= size, "unsent bytes are exact");
                *unsent_bytes = unsent_bytes.saturating_sub(size);
                n += 1;
                // The body is checked in place (RecordBodyRef: nothing
                // allocated or copied) and goes on as bytes.
                let read = postcard::take_from_bytes::<EntryHead>(entry)
                    .map_err(|e| e.to_string())
                    .and_then(|(head, body)| {
                        RecordBodyRef::parse(body)
                            .map(|_| (head, body))
                            .map_err(|e| e.to_string())
                    });
                match read {
                    Ok((head, body)) => out.push(index, head.stream, head.seq, body),
                    Err(e) => {
                        // Its CRC matched, so the bytes are what was written;
                        // announce the one record and go on.
                        tracing::warn!(stream = head.stream, seq = head.seq,
                            "spool: a record does not decode ({e}); announced to the receiver as sender-spool-corrupt");
                        Counters::add(&counters.spool_corrupt_records, 1);
                        out.items.push(Item::Dropped {
                            stream: head.stream.to_string(),
                            from: head.seq,
                            to: head.seq,
                            cause: NoticeCause::SpoolCorrupt,
                        });
                    }
                }
                Step::Next
            })?;
        match end {
            ReadEnd::Done { next } | ReadEnd::Stopped { next } => {
                self.read_index = self.read_index.max(next)
            }
            ReadEnd::Unreadable(u) => bail!(
                "spool: entry {} unreadable ({}) in segment {}; a restart skips unreadable entries and announces their records as sender-spool-corrupt",
                u.index,
                u.why,
                self.log
                    .segment_of(u.index)
                    .map_or_else(String::new, |i| self.log.segments()[i].path.display().to_string())
            ),
        }
        if self.read_index == self.log.next_index() && self.unsent_bytes != 0 {
            debug_assert!(false, "unsent bytes are exact");
            tracing::error!(
                unsent_bytes = self.unsent_bytes,
                "spool: bug: unsent bytes left with every entry read; corrected to 0"
            );
            self.unsent_bytes = 0;
        }
        Ok(())
    }

    /// True when every appended record has been read.
    pub fn is_drained(&mut self) -> bool {
        self.sync_wanted |= self.durable_index != self.log.next_index();
        self.dropped.is_empty()
            && self.pending.is_empty()
            && self.read_index == self.log.next_index()
    }

    /// Bytes appended but not yet read by the link thread.
    pub fn unsent_bytes(&self) -> u64 {
        self.unsent_bytes
    }

    pub fn has_room_for_streams(&self) -> bool {
        self.unsent_bytes() <= STREAM_HIGH_WATER.min(self.settings.max_bytes / 4)
    }

    /// Entries below `index` are on the wire; saved for the next start.
    pub fn mark_sent(&mut self, index: u64) {
        if index > self.sent_index {
            self.sent_index = index;
            self.state_dirty = true;
            self.wake_sync();
        }
    }

    pub fn save_state(&mut self) -> Result<()> {
        self.sync()
    }
}

/// An fsync of spool segments and the state that covers them, and the
/// sent position that state saves.
struct SpoolSync {
    job: SyncJob,
    sent: u64,
}

/// Approximate memory an entry holds (for bounds on copies kept).
pub fn entry_size(e: &Entry) -> usize {
    64 + e.stream.len()
        + match &e.body {
            RecordBody::Bytes(c) => c.data.len(),
            RecordBody::Message(m) => m.payload.len() + m.topic.len(),
            RecordBody::Log(l) => l.text.len() + l.host.len() + l.app.len(),
            RecordBody::Point(p) => p.tag.len() + 16,
            RecordBody::File(f) => f.data.len() + f.path.len() + 64,
        }
}

/// Reads retained records of a stream from a spool directory (also used by
/// `weir-sender resend`, which runs while the sender holds the spool).
pub fn find_in(root: &Path, stream: &str, from: u64, to: u64) -> Result<Vec<Entry>> {
    let mut found = Vec::new();
    walk_in(root, stream, from, to, |e| {
        found.push(e);
        true
    })?;
    Ok(found)
}

/// Calls `f` with each retained record of `stream` in `from..=to`, in
/// spool order, one at a time (one segment's bytes are held at once, not
/// the records); `f` returns false to stop.
pub fn walk_in(
    root: &Path,
    stream: &str,
    from: u64,
    to: u64,
    mut f: impl FnMut(Entry) -> bool,
) -> Result<()> {
    let dir = root.join("segments");
    let mut going = true;
    for (first, path) in segment::list_segments(&dir, "spool")? {
        // Evicted while we looked: skip it.
        let Ok(data) = std::fs::read(&path) else {
            continue;
        };
        segment::check_header(&data, &path, "spool.path")?;
        let rules = segment::Rules {
            guess_past_damage: true,
            ..Default::default()
        };
        let m = segment::map_segment(&data, first, rules);
        segment::walk(&data, first, first + m.count, &m.holes, |w| {
            if !going {
                return;
            }
            if let Walked::Entry { payload, .. } = w {
                if head_of(payload)
                    .is_some_and(|h| h.stream == stream && (from..=to).contains(&h.seq))
                {
                    if let Ok(e) = postcard::from_bytes::<Entry>(payload) {
                        going = f(e);
                    }
                }
            }
        });
        if !going {
            break;
        }
    }
    Ok(())
}

/// The spool shared by the sources and the link thread.
pub type Shared = Arc<SharedSpool>;

pub struct SharedSpool {
    inner: Mutex<Spool>,
    /// A write or fsync failure stops the sender: a spool that cannot
    /// write cannot promise anything.
    fatal: Arc<Fatal>,
    /// Woken when the link thread reads, for flow-controlled sources.
    pub room: tokio::sync::Notify,
    /// Woken when appended records became durable (readable), for the
    /// link thread.
    pub appended: std::sync::Condvar,
    /// The spool's `sync_wake`: the sync thread waits on it when idle.
    unsynced: Arc<std::sync::Condvar>,
    /// The spool position below which every appended record is fsynced
    /// (moved by the sync thread after each fsync): what
    /// [`SharedSpool::append_batch_at`] positions are compared against.
    durable: tokio::sync::watch::Sender<u64>,
}

impl SharedSpool {
    pub fn new(spool: Spool, fatal: Arc<Fatal>) -> Shared {
        let unsynced = spool.sync_wake.clone();
        let durable = tokio::sync::watch::Sender::new(spool.durable_index);
        Arc::new(SharedSpool {
            inner: Mutex::new(spool),
            fatal,
            room: tokio::sync::Notify::new(),
            appended: std::sync::Condvar::new(),
            unsynced,
            durable,
        })
    }

    /// Appends for a source. A disk failure stops the sender with the error.
    /// Appends records of one stream under one lock (see
    /// [`Spool::append_batch`]).
    pub fn append_batch(&self, stream: &str, bodies: &[RecordBody]) {
        self.append_batch_at(stream, bodies);
    }

    /// As [`SharedSpool::append_batch`], and returns the spool position just
    /// past the appended records: they are fsynced once [`SharedSpool::durable`]
    /// reaches it.
    pub fn append_batch_at(&self, stream: &str, bodies: &[RecordBody]) -> u64 {
        let mut spool = self.lock();
        let result = spool.append_batch(stream, bodies);
        let at = spool.log.next_index();
        drop(spool);
        if let Err(e) = result {
            if self.fatal.first().is_none() {
                self.fatal
                    .report(&format!("source {stream}"), &format!("{e:#}"));
            }
        }
        at
    }

    /// The spool position below which every appended record is fsynced;
    /// it only grows. A failed fsync stops the sender and it stops growing.
    pub fn durable(&self) -> tokio::sync::watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// The sync thread: runs `tick` until `stop_sync`.
    pub fn run_sync(&self) {
        while !self.lock().sync_stop {
            self.tick();
        }
    }

    /// Ends `run_sync` (after the fsync it is running, if any).
    pub fn stop_sync(&self) {
        self.lock().sync_stop = true;
        self.unsynced.notify_all();
    }

    /// Waits until something is to be fsynced (an append wakes it) or the
    /// idle wait passes, ages out segments and, when due, fsyncs and saves
    /// state without holding the spool during the fsync (sources keep
    /// appending; what they append meanwhile goes in the next fsync).
    pub fn tick(&self) {
        let job = {
            let mut spool = self.lock();
            // After a fatal error (the sender is stopping) a failing fsync
            // is retried every `fsync_ms`, not in a tight loop.
            let failed = self.fatal.first().is_some();
            if (failed || !spool.sync_due()) && !spool.sync_stop {
                // Checked and waited on under the lock: an append after
                // the check sees `sync_idle` and wakes this thread.
                spool.sync_idle = !failed;
                spool.group_wait = !failed && spool.gathering();
                let wait = if failed {
                    spool.settings.fsync_interval
                } else {
                    spool.sync_idle_wait()
                };
                spool = self
                    .unsynced
                    .wait_timeout(spool, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                spool.sync_idle = false;
                spool.group_wait = false;
            }
            if let Err(e) = spool.log.flush() {
                self.fail(e);
            }
            if let Err(e) = spool.enforce_bounds() {
                self.fail(e);
            }
            if !spool.sync_due() {
                return;
            }
            match spool.prepare_sync() {
                Ok(job) => job,
                Err(e) => return self.fail(e),
            }
        };
        if let Err(e) = job.job.run() {
            return self.fail(e);
        }
        let durable = {
            let mut spool = self.lock();
            spool.finish_sync(&job);
            spool.durable_index
        };
        self.durable.send_replace(durable);
        self.appended.notify_all();
    }

    /// A failure of the spool sync thread (which runs `tick`).
    fn fail(&self, e: anyhow::Error) {
        // Reported once: the thread keeps ticking until the sender stops.
        if self.fatal.first().is_none() {
            self.fatal.report("weir-spool-sync", &format!("{e:#}"));
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Spool> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (the link thread) until records may be readable or `wait` passes.
    pub fn wait(&self, wait: Duration) {
        let guard = self.lock();
        if guard.read_index < guard.saved_durable
            || !guard.dropped.is_empty()
            || guard
                .pending
                .front()
                .is_some_and(|(at, _)| *at <= guard.read_index)
        {
            return;
        }
        let _ = self.appended.wait_timeout(guard, wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use weir_protocol::Chunk;
    use weir_store::GROUP_BYTES;

    fn settings(dir: &Path, max_bytes: u64) -> Settings {
        Settings {
            path: dir.to_path_buf(),
            max_bytes,
            max_age: Duration::from_secs(3600),
            fsync_interval: Duration::from_millis(10),
            fsync_bytes: 4 << 20,
        }
    }

    fn body(n: usize) -> RecordBody {
        RecordBody::Bytes(Chunk {
            data: vec![7; n],
            end: false,
        })
    }

    #[test]
    fn an_fsync_is_due_at_once_for_a_trickle_and_under_load_waits_for_fsync_bytes_or_fsync_ms() {
        let dir = scratch("group");
        let mut settings = settings(&dir, 64 << 20);
        settings.fsync_interval = Duration::from_secs(3600);
        settings.fsync_bytes = 1 << 20;
        let mut s = Spool::open(settings, Arc::default()).unwrap();
        s.sync().unwrap();
        // A trickle: due at once.
        s.append("a", &body(10)).unwrap();
        assert!(s.sync_due());
        s.sync().unwrap();
        assert!(!s.sync_due());
        // More than GROUP_BYTES waiting (under load): held until
        // fsync_bytes wait...
        while s.group.unsynced() < GROUP_BYTES {
            s.append("a", &body(16 << 10)).unwrap();
        }
        assert!(!s.sync_due() && s.gathering());
        while s.group.unsynced() < 1 << 20 {
            s.append("a", &body(16 << 10)).unwrap();
        }
        assert!(s.sync_due());
        s.sync().unwrap();
        // ...or fsync_ms passed since the last fsync started.
        s.settings.fsync_interval = Duration::from_millis(1);
        while s.group.unsynced() < GROUP_BYTES {
            s.append("a", &body(16 << 10)).unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
        assert!(s.sync_due());
        assert_eq!(s.sync_idle_wait(), Duration::ZERO);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weir-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// An item as read, its record decoded.
    #[derive(Debug, Clone, PartialEq)]
    enum Got {
        Record {
            index: u64,
            entry: Entry,
        },
        Dropped {
            stream: String,
            from: u64,
            to: u64,
            cause: NoticeCause,
        },
    }

    fn read_all(s: &mut Spool) -> Vec<Got> {
        s.sync().unwrap();
        s.save_state().unwrap();
        let mut out = Vec::new();
        // A notice of damage stops a read where the damage was.
        loop {
            let mut batch = Batch::default();
            s.read(&mut batch, usize::MAX, usize::MAX).unwrap();
            if batch.items.is_empty() {
                return out;
            }
            out.extend(batch.items.iter().map(|item| match item {
                Item::Record(r) => Got::Record {
                    index: r.index,
                    entry: batch.entry(r),
                },
                Item::Dropped {
                    stream,
                    from,
                    to,
                    cause,
                } => Got::Dropped {
                    stream: stream.clone(),
                    from: *from,
                    to: *to,
                    cause: *cause,
                },
            }));
        }
    }

    #[test]
    fn sequence_numbers_survive_a_restart_and_unsent_records_are_read_again() {
        let dir = scratch("restart");
        let c = Arc::new(Counters::default());
        let mut s = Spool::open(settings(&dir, 64 << 20), c.clone()).unwrap();
        for _ in 0..10 {
            s.append("a", &body(10)).unwrap();
        }
        let epoch = s.stream("a").epoch;
        let items = read_all(&mut s);
        assert_eq!(items.len(), 10);
        s.mark_sent(4);
        s.save_state().unwrap();
        drop(s);
        let mut s = Spool::open(settings(&dir, 64 << 20), c).unwrap();
        assert_eq!(
            s.stream("a"),
            StreamState {
                epoch,
                next_seq: 10
            }
        );
        let items = read_all(&mut s);
        assert_eq!(items.len(), 6, "entries 4..10 were not marked sent");
        assert!(matches!(&items[0], Got::Record { index: 4, entry } if entry.seq == 4));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_torn_tail_is_truncated_and_only_the_torn_record_is_lost() {
        let dir = scratch("torn");
        let c = Arc::new(Counters::default());
        let mut s = Spool::open(settings(&dir, 64 << 20), c.clone()).unwrap();
        for _ in 0..5 {
            s.append("a", &body(100)).unwrap();
        }
        s.sync().unwrap();
        let seg = s.log.segments().back().unwrap().path.clone();
        drop(s);
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 30)
            .unwrap();
        let mut s = Spool::open(settings(&dir, 64 << 20), c).unwrap();
        let items = read_all(&mut s);
        assert_eq!(
            items.len(),
            5,
            "four records, then the notice of the damaged one"
        );
        assert!(matches!(
            &items[4],
            Got::Dropped {
                from: 4,
                to: 4,
                cause: NoticeCause::SpoolDamaged,
                ..
            }
        ));
        assert_eq!(
            s.append("a", &body(1)).unwrap(),
            5,
            "the saved state counted the lost record: its number is not reused"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn overflow_drops_the_oldest_unsent_records_and_announces_their_exact_ranges() {
        let dir = scratch("overflow");
        let c = Arc::new(Counters::default());
        // 1 MiB bound, 256 KiB segments, ~1 KiB records.
        let mut s = Spool::open(settings(&dir, 1 << 20), c.clone()).unwrap();
        for _ in 0..3000 {
            s.append("a", &body(1000)).unwrap();
            s.append("b", &body(1000)).unwrap();
        }
        let items = read_all(&mut s);
        let mut dropped: Vec<(String, u64, u64)> = Vec::new();
        let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for i in items {
            match i {
                Got::Dropped {
                    stream, from, to, ..
                } => dropped.push((stream, from, to)),
                Got::Record { entry, .. } => got.entry(entry.stream).or_default().push(entry.seq),
            }
        }
        for stream in ["a", "b"] {
            let mut all: Vec<u64> = got[stream].clone();
            for (_, f, t) in dropped.iter().filter(|d| d.0 == stream) {
                all.extend(*f..=*t);
            }
            all.sort_unstable();
            assert_eq!(
                all,
                (0..3000).collect::<Vec<_>>(),
                "{stream}: read + dropped = appended, exactly"
            );
        }
        let n_dropped: u64 = dropped.iter().map(|d| d.2 - d.1 + 1).sum();
        assert_eq!(c.spool_dropped_records.load(Ordering::Relaxed), n_dropped);
        assert!(s.log.total_bytes() <= 1 << 20);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Byte offset and framed size of every entry of a segment file.
    fn entry_offsets(path: &Path) -> Vec<(usize, usize)> {
        let data = std::fs::read(path).unwrap();
        let mut at = weir_store::HEADER_LEN as usize;
        let mut out = Vec::new();
        while at < data.len() {
            let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            out.push((at, ENTRY_HEADER + len));
            at += ENTRY_HEADER + len;
        }
        out
    }

    #[test]
    fn after_a_restart_unsent_bytes_count_only_the_unsent_entries_of_a_partly_sent_segment() {
        let dir = scratch("unsent-exact");
        let c = Arc::new(Counters::default());
        // 64 MiB bound: 8 MiB segments, streams stop above 16 MiB unsent.
        let mut s = Spool::open(settings(&dir, 64 << 20), c.clone()).unwrap();
        for _ in 0..400 {
            s.append("raw", &body(64 << 10)).unwrap();
        }
        assert!(
            !s.has_room_for_streams(),
            "25 MiB unsent is above the bound"
        );
        let items = read_all(&mut s);
        assert_eq!(items.len(), 400);
        assert_eq!(s.unsent_bytes(), 0);
        s.mark_sent(300);
        s.save_state().unwrap();
        let segments: Vec<PathBuf> = s.log.segments().iter().map(|g| g.path.clone()).collect();
        drop(s);
        // What entries 300.. take on disk, measured from the files.
        let mut sizes = Vec::new();
        for p in &segments {
            sizes.extend(entry_offsets(p).into_iter().map(|(_, n)| n as u64));
        }
        let unsent: u64 = sizes[300..].iter().sum();
        let mut s = Spool::open(settings(&dir, 64 << 20), c).unwrap();
        assert_eq!(
            s.unsent_bytes(),
            unsent,
            "exactly the entries after the sent position, not their whole segments"
        );
        assert!(s.has_room_for_streams(), "6 MiB unsent is below the bound");
        let items = read_all(&mut s);
        assert_eq!(items.len(), 100);
        assert_eq!(
            s.unsent_bytes(),
            0,
            "every read subtracts exactly what it counted"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_entries_mid_segment_are_skipped_and_their_exact_records_announced_as_spool_corrupt()
    {
        let dir = scratch("corrupt-mid");
        let c = Arc::new(Counters::default());
        let mut s = Spool::open(settings(&dir, 64 << 20), c.clone()).unwrap();
        // Entry i is stream a (even i) or b (odd i), seq i / 2.
        for _ in 0..100 {
            s.append("a", &body(100)).unwrap();
            s.append("b", &body(100)).unwrap();
        }
        s.sync().unwrap();
        let seg = s.log.segments().back().unwrap().path.clone();
        drop(s);
        let offsets = entry_offsets(&seg);
        let mut data = std::fs::read(&seg).unwrap();
        // Entry 40 (a 20): one payload byte flipped, its length intact.
        data[offsets[40].0 + 20] ^= 0xff;
        // Entries 60 and 61 (a 30, b 30): garbage over the header of 60
        // into the payload of 61, so its length cannot be trusted.
        let (at, _) = offsets[60];
        let end = offsets[61].0 + 12;
        data[at..end].fill(0xee);
        std::fs::write(&seg, &data).unwrap();
        let readable: u64 = offsets
            .iter()
            .enumerate()
            .filter(|(i, _)| ![40, 60, 61].contains(i))
            .map(|(_, (_, n))| *n as u64)
            .sum();

        let mut s = Spool::open(settings(&dir, 64 << 20), c.clone()).unwrap();
        assert_eq!(s.unsent_bytes(), readable, "unsent bytes skip the holes");
        let items = read_all(&mut s);
        let mut seen: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        let mut notices = Vec::new();
        for item in &items {
            match item {
                Got::Record { entry, .. } => seen
                    .entry(entry.stream.as_str())
                    .or_default()
                    .push(entry.seq),
                Got::Dropped {
                    stream,
                    from,
                    to,
                    cause,
                } => {
                    assert_eq!(*cause, NoticeCause::SpoolCorrupt);
                    // Announced in order: after the records before it.
                    assert_eq!(
                        seen.get(stream.as_str()).and_then(|v| v.last()),
                        Some(&(from - 1)),
                        "{stream} {from}..={to} announced in its place"
                    );
                    notices.push((stream.clone(), *from, *to));
                }
            }
        }
        notices.sort();
        assert_eq!(
            notices,
            vec![
                ("a".to_string(), 20, 20),
                ("a".to_string(), 30, 30),
                ("b".to_string(), 30, 30)
            ]
        );
        let a: Vec<u64> = (0..100).filter(|q| *q != 20 && *q != 30).collect();
        let b: Vec<u64> = (0..100).filter(|q| *q != 30).collect();
        assert_eq!(seen["a"], a);
        assert_eq!(seen["b"], b);
        assert_eq!(c.spool_corrupt_records.load(Ordering::Relaxed), 3);
        assert_eq!(s.unsent_bytes(), 0);
        let read_to = s.read_index;
        s.mark_sent(read_to);
        // New records go to a fresh segment and keep their numbers.
        assert_eq!(s.append("a", &body(1)).unwrap(), 100);
        s.save_state().unwrap();
        drop(s);
        // A second start finds the same damage, counts the same entries,
        // and announces nothing again: the reader has passed it.
        let c2 = Arc::new(Counters::default());
        let mut s = Spool::open(settings(&dir, 64 << 20), c2.clone()).unwrap();
        let items = read_all(&mut s);
        assert_eq!(items.len(), 1, "only the new record: {}", items.len());
        assert_eq!(c2.spool_corrupt_records.load(Ordering::Relaxed), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_older_segment_cut_short_is_a_hole_up_to_the_next_segment_and_its_records_are_announced() {
        let dir = scratch("short-older");
        let c = Arc::new(Counters::default());
        // 1 MiB bound: 256 KiB segments of ~1 KiB records.
        let mut s = Spool::open(settings(&dir, 1 << 20), c.clone()).unwrap();
        for _ in 0..400 {
            s.append("a", &body(1000)).unwrap();
        }
        s.sync().unwrap();
        assert!(s.log.segments().len() >= 2);
        let oldest = s.log.segments().front().unwrap().path.clone();
        let count = s.log.segments().front().unwrap().count;
        drop(s);
        let offsets = entry_offsets(&oldest);
        // Cut the oldest segment in the middle of entry 100.
        OpenOptions::new()
            .write(true)
            .open(&oldest)
            .unwrap()
            .set_len((offsets[100].0 + 10) as u64)
            .unwrap();
        let mut s = Spool::open(settings(&dir, 1 << 20), c.clone()).unwrap();
        let items = read_all(&mut s);
        let seqs: Vec<u64> = items
            .iter()
            .filter_map(|i| match i {
                Got::Record { entry, .. } => Some(entry.seq),
                _ => None,
            })
            .collect();
        let expected: Vec<u64> = (0..100).chain(count..400).collect();
        assert_eq!(seqs, expected, "the records around the hole, in order");
        assert!(
            items.contains(&Got::Dropped {
                stream: "a".into(),
                from: 100,
                to: count - 1,
                cause: NoticeCause::SpoolCorrupt
            }),
            "the cut records are announced"
        );
        assert_eq!(c.spool_corrupt_records.load(Ordering::Relaxed), count - 100);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_record_that_passes_its_crc_but_does_not_decode_is_announced_alone() {
        let dir = scratch("undecodable");
        let c = Arc::new(Counters::default());
        let mut s = Spool::open(settings(&dir, 64 << 20), c.clone()).unwrap();
        for _ in 0..5 {
            s.append("a", &body(10)).unwrap();
        }
        s.sync().unwrap();
        let seg = s.log.segments().back().unwrap().path.clone();
        drop(s);
        // Stream "a", seq 5, then a body tag no RecordBody has.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        weir_store::frame::write_entry(&mut f, &[1, b'a', 5, 200, 1, 2, 3]).unwrap();
        drop(f);
        let mut s = Spool::open(settings(&dir, 64 << 20), c.clone()).unwrap();
        let items = read_all(&mut s);
        assert_eq!(items.len(), 6);
        assert_eq!(
            items[5],
            Got::Dropped {
                stream: "a".into(),
                from: 5,
                to: 5,
                cause: NoticeCause::SpoolCorrupt
            }
        );
        assert_eq!(c.spool_corrupt_records.load(Ordering::Relaxed), 1);
        assert_eq!(
            s.append("a", &body(1)).unwrap(),
            6,
            "its number is not reused"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn retained_ranges_can_be_found_for_a_resend() {
        let dir = scratch("find");
        let c = Arc::new(Counters::default());
        let mut s = Spool::open(settings(&dir, 64 << 20), c).unwrap();
        for _ in 0..50 {
            s.append("a", &body(10)).unwrap();
            s.append("b", &body(10)).unwrap();
        }
        s.sync().unwrap();
        let found = find_in(&dir, "b", 10, 19).unwrap();
        assert_eq!(
            found.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (10..20).collect::<Vec<_>>()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
