//! The receiver's journal: every decoded record (and every gap the decoder
//! accounted) is appended here first, fsynced, and only then handed to
//! the sinks. Fsyncs are group commits: one starts as soon as entries were
//! appended and none is running; entries appended while one runs are
//! covered by the next (`Journal::sync_due`). Each sink confirms how far it
//! has written; the journal is compacted when every sink has saved a
//! cursor past a segment, and when it passes `max_bytes` the oldest
//! segment goes anyway: records a sink had not been given yet become gaps
//! with cause `sink-overflow:NAME`.
//! Every read checks each entry's CRC; a damaged entry in the middle of a
//! segment becomes a hole that readers skip, and its records become gaps
//! with cause `journal-corrupt` (see `weir_store::segment::map_segment`,
//! `Corruption`). The segments, their framing, repair and the fsync
//! thread are `weir_store`'s; what an entry means is this module's.
//!
//! ```text
//! segments/{index of first entry:020}.seg   a weir_store log: postcard(Entry) per entry
//! state.json                                 per-stream decoder positions and the durable index
//! sinks/{name}.json                          each sink's confirmed index and its resume data
//! dead-letter/{name}.jsonl                   records a sink rejected for good, with the reason
//! ```
//!
//! Only the journal thread owns a `Journal`; sink threads never read files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::decoder::{Delivered, StreamPosition};
use weir_protocol::RecordBody;
use weir_store::frame::ENTRY_HEADER;
use weir_store::{
    FsyncTimes, GroupCommit, Hole, Log, OpenRules, ReadEnd, Step, SyncJob, Syncer, Unreadable,
    Walked,
};

// An entry is read, handed on and dropped; a `Gap` the size of a `Record`
// costs nothing that boxing the body would save.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    Record {
        stream: String,
        source_type: String,
        session: u64,
        epoch: u64,
        seq: u64,
        resent: bool,
        body: RecordBody,
    },
    /// A range the decoder accounted as lost: keeps positions exact across restarts.
    Gap {
        stream: String,
        session: u64,
        epoch: u64,
        from: u64,
        to: u64,
    },
}

#[derive(Serialize)]
enum EntryRef<'a> {
    Record {
        stream: &'a str,
        source_type: &'a str,
        session: u64,
        epoch: u64,
        seq: u64,
        resent: bool,
        body: &'a RecordBody,
    },
    Gap {
        stream: &'a str,
        session: u64,
        epoch: u64,
        from: u64,
        to: u64,
    },
}

impl Entry {
    pub fn into_delivered(self, names: &mut HashMap<String, Arc<str>>) -> Option<Delivered> {
        match self {
            Entry::Record {
                stream,
                source_type,
                session,
                epoch,
                seq,
                resent,
                body,
            } => {
                // One `Arc` per name read back, not one allocation per record.
                let mut shared = |name: String| {
                    names
                        .entry(name)
                        .or_insert_with_key(|n| Arc::from(n.as_str()))
                        .clone()
                };
                Some(Delivered {
                    stream: shared(stream),
                    source_type: shared(source_type),
                    session,
                    epoch,
                    seq,
                    resent,
                    body,
                })
            }
            Entry::Gap { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub session: Option<u64>,
    pub epoch: Option<u64>,
    pub last: Option<u64>,
}

impl From<Position> for StreamPosition {
    fn from(p: Position) -> Self {
        StreamPosition {
            session: p.session,
            epoch: p.epoch,
            last: p.last,
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    streams: BTreeMap<String, Position>,
    durable_index: u64,
}

/// What a sink saves after each confirmed batch.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SinkCursor {
    /// Journal entries below this are written by the sink.
    pub index: u64,
    /// Sink-specific data to resume exactly (the file sink's offsets).
    #[serde(default)]
    pub resume: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub fsync_bytes: u64,
    pub fsync_interval: Duration,
}

/// A corrupt or missing range of the journal, found and not yet reported:
/// the pipeline audits it (`journal-corrupt`) for every sink it concerns.
#[derive(Debug, Clone)]
pub struct Corruption {
    /// The segment file (for a missing one: the segment before it, whose
    /// end the missing entries are mapped to).
    pub segment: PathBuf,
    /// Journal indexes `from..to` that no reader will deliver.
    pub from: u64,
    pub to: u64,
    /// Byte range in the segment (`bytes` is 0 for entries missing at its end).
    pub offset: u64,
    pub bytes: u64,
    pub why: String,
}

/// Per-stream sequence ranges lost in a corrupt journal range, as far as
/// the entries around it show them.
#[derive(Debug, Default)]
pub struct CorruptRanges {
    /// (stream, first seq, last seq), both inclusive.
    pub ranges: Vec<(String, u64, u64)>,
    /// Streams whose lost range the surviving entries cannot bound.
    pub unknown: Vec<String>,
}

/// Wakes the thread that waits for entries to become durable (the decoder
/// thread hands them to the sinks), called by the fsync thread after each
/// fsync and after a failure.
pub use weir_store::Waker;

/// A sequential read position in a segment, kept between catch-up reads
/// so a sink that fell behind is served without rereading from the start.
pub type Reader = weir_store::Cursor;

pub use weir_store::write_atomically;

pub struct Journal {
    settings: Settings,
    /// The segments (`weir_store::Log`): what an entry means is this
    /// module's business, keeping them is the store's.
    log: Log,
    /// The fsync thread: the durable index, failure and fsync count.
    syncer: Syncer,
    /// How long the fsync jobs took (the metrics' `journal_fsync_max_us`).
    fsync_times: Arc<FsyncTimes>,
    group: GroupCommit,
    positions: BTreeMap<String, Position>,
    /// After a torn-tail repair: the positions and durable index the state
    /// file had, for when every sink is known to have written the lost entries.
    repaired: Option<(BTreeMap<String, Position>, u64)>,
    /// Bytes ever appended (for exact byte sizes of dispatched batches).
    appended_bytes: u64,
    /// Corrupt ranges found and not yet taken by the pipeline.
    corrupt: Vec<Corruption>,
}

/// Moves a stream's position to an entry; `exact` takes the entry as the
/// truth even if it is behind (used when rebuilding after a torn tail).
fn apply_position(streams: &mut BTreeMap<String, Position>, e: Entry, exact: bool) {
    let (stream, session, epoch, last, resent) = match e {
        Entry::Record {
            stream,
            session,
            epoch,
            seq,
            resent,
            ..
        } => (stream, session, epoch, seq, resent),
        Entry::Gap {
            stream,
            session,
            epoch,
            to,
            ..
        } => (stream, session, epoch, to, false),
    };
    let p = streams.entry(stream).or_default();
    if resent && p.epoch == Some(epoch) {
        return;
    }
    if exact || p.epoch != Some(epoch) || p.last.is_none_or(|l| l < last) {
        *p = Position {
            session: Some(session),
            epoch: Some(epoch),
            last: Some(last),
        };
    }
}

/// Logs a corrupt range readers skip and keeps it for the audit log.
fn report_hole(corrupt: &mut Vec<Corruption>, segment: &Path, h: &Hole, why: &str) {
    tracing::error!(
        segment = %segment.display(),
        from = h.from,
        to = h.to,
        offset = h.offset,
        bytes = h.end_offset - h.offset,
        "journal: corrupt entries; readers skip them (journal-corrupt)"
    );
    corrupt.push(Corruption {
        segment: segment.to_path_buf(),
        from: h.from,
        to: h.to,
        offset: h.offset,
        bytes: h.end_offset - h.offset,
        why: why.into(),
    });
}

/// Entries decoded from a segment, and the holes found doing it.
type Decoded = (Vec<(u64, Entry)>, Vec<Hole>);

/// Decodes the entries of segment `i` from `from` on; an entry whose CRC
/// holds but that does not decode becomes a hole (returned).
fn decode_segment(log: &mut Log, i: usize, from: u64) -> Result<Decoded> {
    let (mut out, mut bad) = (Vec::new(), Vec::new());
    log.walk(i, |w| {
        if let Walked::Entry {
            index,
            offset,
            size,
            payload,
        } = w
        {
            if index >= from {
                match postcard::from_bytes::<Entry>(payload) {
                    Ok(e) => out.push((index, e)),
                    Err(_) => bad.push(Hole {
                        from: index,
                        to: index + 1,
                        offset,
                        end_offset: offset + size,
                        exact: true,
                        why: "entry does not decode",
                    }),
                }
            }
        }
    })?;
    bad.retain(|h| log.add_hole(i, *h));
    Ok((out, bad))
}

impl Journal {
    pub fn open(settings: Settings) -> Result<Self> {
        let root = settings.path.clone();
        for dir in [root.join("sinks"), root.join("dead-letter")] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("journal.path: cannot create {}", dir.display()))?;
        }
        let state_path = root.join("state.json");
        let mut state: State = match weir_store::read_if_present(&state_path)? {
            Some(b) => serde_json::from_slice(&b).with_context(|| {
                format!(
                    "journal.path: {} is corrupt; move it away",
                    state_path.display()
                )
            })?,
            None => State::default(),
        };
        let saved_positions = state.streams.clone();
        let saved_durable = state.durable_index;
        let (mut log, opened) = Log::open(
            weir_store::Settings {
                dir: root.join("segments"),
                key: "journal.path",
                what: "journal",
                segment_bytes: weir_store::log::segment_bytes(settings.max_bytes),
                write_buffer: 1 << 20,
            },
            OpenRules {
                // Entries not fsynced when the state was saved may be torn.
                torn_from: Some(state.durable_index),
                guess_past_damage: false,
            },
            // Entries are decoded below (those after the durable index)
            // and when read; one that does not decode becomes a hole then.
            |_| true,
        )?;
        let mut corrupt: Vec<Corruption> = Vec::new();
        if let Some(r) = &opened.repair {
            if r.torn.index < state.durable_index {
                // Fsynced entries, damaged in the middle of the newest
                // segment past what a skip by length can bridge: the
                // number of entries lost cannot be known, so the segment
                // ends here and the positions are rebuilt (the decoder
                // reports the records as a gap if they never come back).
                tracing::error!(
                    segment = %r.path.display(),
                    entry = r.torn.index,
                    offset = r.torn.offset,
                    truncated_bytes = r.cut_bytes,
                    "journal: corrupt entry ({}) below the durable index {} in the newest segment; truncated there",
                    r.torn.why,
                    state.durable_index
                );
            } else {
                tracing::warn!(
                    segment = %r.path.display(),
                    truncated_bytes = r.cut_bytes,
                    "journal: torn tail after a crash ({}); truncated to the last whole record",
                    r.torn.why
                );
            }
        }
        for seg in log.segments() {
            for h in &seg.holes {
                let why = match h.why {
                    "entries missing at the end" => {
                        "entries missing (a segment cut short or removed)"
                    }
                    _ => "corrupt entry",
                };
                report_hole(&mut corrupt, &seg.path, h, why);
            }
        }
        // Positions the state file has not accounted for, from the entries
        // after its durable index.
        let repaired = opened.repair.is_some();
        for i in 0..log.segments().len() {
            let seg = &log.segments()[i];
            if seg.end() <= state.durable_index {
                continue;
            }
            let path = seg.path.clone();
            let (entries, bad) = decode_segment(&mut log, i, state.durable_index)?;
            for h in &bad {
                report_hole(&mut corrupt, &path, h, "entry does not decode");
            }
            for (_, e) in entries {
                apply_position(&mut state.streams, e, false);
            }
        }
        if repaired {
            // Entries the state file counted may be gone: rebuild every
            // position from what survives, so the decoder expects the
            // torn records again and reports them as a gap if they never
            // come back, instead of believing they were journaled.
            for i in 0..log.segments().len() {
                let path = log.segments()[i].path.clone();
                let first = log.segments()[i].first;
                let (entries, bad) = decode_segment(&mut log, i, first)?;
                for h in &bad {
                    report_hole(&mut corrupt, &path, h, "entry does not decode");
                }
                for (_, e) in entries {
                    apply_position(&mut state.streams, e, true);
                }
            }
        }
        let next_index = log.next_index();
        tracing::info!(
            path = %root.display(),
            entries = next_index - log.first_index(),
            bytes = log.total_bytes(),
            streams = state.streams.len(),
            "journal opened"
        );
        // A few jobs in flight at most: each covers everything before it.
        let syncer = Syncer::spawn("weir-journal-sync", next_index, 4)?;
        Ok(Journal {
            settings,
            log,
            syncer,
            fsync_times: Arc::default(),
            group: GroupCommit::default(),
            positions: state.streams,
            repaired: repaired.then_some((saved_positions, saved_durable)),
            appended_bytes: 0,
            corrupt,
        })
    }

    /// After a torn-tail repair that cut entries the state file counted
    /// (the disk lost fsynced data), if every sink had confirmed everything
    /// the state file counted, the lost entries were written everywhere: go
    /// back to the state's positions so they are not reported as gaps. A
    /// repair that cut only entries after the state's durable index (a
    /// crash with them in the page cache, the last one torn) keeps the
    /// positions rebuilt from the surviving entries: those entries are
    /// still to be handed to the sinks, and going back would report them as
    /// a gap as well.
    pub fn settle_repair(&mut self, confirmed_by_all: u64) {
        if let Some((positions, durable)) = self.repaired.take() {
            if self.log.next_index() >= durable {
                tracing::info!("journal: the torn tail held only entries the state file had not counted; positions rebuilt from the entries that survive");
            } else if confirmed_by_all >= durable {
                tracing::info!("journal: the entries lost with the torn tail had been written by every sink; positions kept");
                self.positions = positions;
            } else {
                tracing::warn!("journal: entries lost with the torn tail were not written by every sink; they will be reported as a gap");
            }
        }
    }

    /// Where each stream stood at the last entry journaled (for the decoder).
    pub fn positions(&self) -> &BTreeMap<String, Position> {
        &self.positions
    }

    pub fn first_index(&self) -> u64 {
        self.log.first_index()
    }

    /// Entries below this are fsynced; only they go to sinks.
    pub fn durable_index(&self) -> u64 {
        self.syncer.durable()
    }

    /// Fsyncs done since the journal opened (each a group commit).
    pub fn fsyncs(&self) -> u64 {
        self.syncer.fsyncs()
    }

    /// How long those fsyncs took (the longest, the slow ones).
    pub fn fsync_times(&self) -> &FsyncTimes {
        &self.fsync_times
    }

    /// Sets what the fsync thread calls after each fsync (and failure),
    /// so the thread waiting to hand durable entries on wakes at once. Set
    /// once; a second waker is ignored.
    pub fn set_waker(&self, waker: Waker) {
        self.syncer.set_waker(waker);
    }

    /// The first fsync failure, if any: the receiver must stop.
    pub fn failure(&self) -> Option<String> {
        self.syncer.failure()
    }

    /// Bytes of the segment files.
    pub fn total_bytes(&self) -> u64 {
        self.log.total_bytes()
    }

    pub fn max_bytes(&self) -> u64 {
        self.settings.max_bytes
    }

    /// Appends `entry` and moves `stream`'s position with `update` (one
    /// lookup of the stream per entry).
    fn append(
        &mut self,
        entry: &EntryRef<'_>,
        stream: &str,
        update: impl FnOnce(&mut Position),
    ) -> Result<u64> {
        let (index, size, full) = self
            .log
            .append_with(|b| weir_protocol::record::encode_into(entry, b))?;
        self.appended_bytes += size;
        self.group.appended(size);
        match self.positions.get_mut(stream) {
            Some(p) => update(p),
            None => {
                let mut p = Position::default();
                update(&mut p);
                self.positions.insert(stream.to_string(), p);
            }
        }
        if full {
            self.rotate()?;
        }
        Ok(index)
    }

    pub fn append_record(&mut self, r: &Delivered) -> Result<u64> {
        let entry = EntryRef::Record {
            stream: &r.stream,
            source_type: &r.source_type,
            session: r.session,
            epoch: r.epoch,
            seq: r.seq,
            resent: r.resent,
            body: &r.body,
        };
        self.append(&entry, &r.stream, |p| {
            // A resent record fills an old gap: the stream's position stays.
            let last = if r.resent && p.epoch == Some(r.epoch) {
                p.last
            } else {
                Some(r.seq)
            };
            *p = Position {
                session: Some(r.session),
                epoch: Some(r.epoch),
                last,
            };
        })
    }

    pub fn append_gap(
        &mut self,
        stream: &str,
        session: u64,
        epoch: u64,
        from: u64,
        to: u64,
    ) -> Result<u64> {
        let entry = EntryRef::Gap {
            stream,
            session,
            epoch,
            from,
            to,
        };
        self.append(&entry, stream, |p| {
            *p = Position {
                session: Some(session),
                epoch: Some(epoch),
                last: Some(to),
            }
        })
    }

    fn rotate(&mut self) -> Result<()> {
        self.request_sync()?;
        self.log.rotate()
    }

    /// True when entries wait for an fsync that should be requested now
    /// ([`GroupCommit::due`]); while one runs, the next job is queued
    /// behind it at `fsync_bytes` or `fsync_ms`, which also bound a batch
    /// handed to the sinks.
    pub fn sync_due(&self) -> bool {
        self.syncer.requested() != self.log.next_index()
            && self.group.due(
                self.syncer.idle(),
                self.settings.fsync_bytes,
                self.settings.fsync_interval,
            )
    }

    /// While entries wait for an fsync: how long until `sync_due` holds by
    /// time alone (the journal thread sleeps no longer than this).
    pub fn sync_wait(&self) -> Option<Duration> {
        (self.syncer.requested() != self.log.next_index())
            .then(|| self.group.wait(self.settings.fsync_interval))
    }

    /// Writes buffered entries to the OS and hands their fsync to the
    /// fsync thread; returns the index the fsync will make durable.
    pub fn request_sync(&mut self) -> Result<u64> {
        let next = self.log.next_index();
        if self.syncer.requested() == next {
            return Ok(next);
        }
        let files = self.log.sync_files()?;
        let state = State {
            streams: self.positions.clone(),
            durable_index: next,
        };
        let state = serde_json::to_vec_pretty(&state).expect("json");
        self.syncer.submit(SyncJob {
            files,
            up_to: next,
            state: Some((self.settings.path.join("state.json"), state)),
            what: "journal",
            times: self.fsync_times.clone(),
        })?;
        self.group.requested();
        Ok(next)
    }

    /// Requests an fsync and waits for it (shutdown, tests).
    pub fn sync(&mut self) -> Result<u64> {
        let target = self.request_sync()?;
        self.syncer.wait_durable(target)?;
        Ok(target)
    }

    /// Reads entries `from..` (at most `max`, never past the durable index).
    #[cfg(test)]
    pub fn read(&mut self, from: u64, max: usize) -> Result<Vec<(u64, Entry)>> {
        Ok(self.read_with(&mut None, from, max, u64::MAX, u64::MAX)?.0)
    }

    /// Bytes ever appended to the journal by this process.
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes
    }

    /// As `read`, continuing from a kept position when it fits, and
    /// stopping before an entry that would take the batch past `max_bytes`
    /// of journal bytes (one entry is always taken), and before `until`
    /// (the durable index at most: a sink's catch-up stops where the
    /// records it would read next are on their way to it in memory).
    /// Corrupt entries are skipped (see `take_corruption`). Returns the
    /// entries and their bytes.
    pub fn read_with(
        &mut self,
        reader: &mut Option<Reader>,
        from: u64,
        max: usize,
        max_bytes: u64,
        until: u64,
    ) -> Result<(Vec<(u64, Entry)>, u64)> {
        let until = until.min(self.durable_index());
        self.read_until(reader, from, max, max_bytes, until)
    }

    fn read_until(
        &mut self,
        reader: &mut Option<Reader>,
        from: u64,
        max: usize,
        max_bytes: u64,
        limit: u64,
    ) -> Result<(Vec<(u64, Entry)>, u64)> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut mapped: Option<u64> = None;
        // The size of each entry taken, for a retry.
        let mut sizes: Vec<u64> = Vec::new();
        loop {
            let end = self.log.read(reader, from, limit, |index, payload| {
                let size = (ENTRY_HEADER + payload.len()) as u64;
                if out.len() >= max || (!out.is_empty() && bytes + size > max_bytes) {
                    // Not taken: the next read starts here.
                    return Step::Stop;
                }
                match postcard::from_bytes::<Entry>(payload) {
                    Ok(e) => {
                        out.push((index, e));
                        sizes.push(size);
                        bytes += size;
                        Step::Next
                    }
                    Err(_) => Step::Undecodable,
                }
            })?;
            let ReadEnd::Unreadable(u) = end else {
                break;
            };
            if mapped == Some(u.index) {
                bail!(
                    "journal: entry {} of segment {} cannot be read ({}) and the segment maps whole; check the disk",
                    u.index,
                    u.segment,
                    u.why
                );
            }
            mapped = Some(u.index);
            self.map_unreadable(u)?;
            *reader = None;
            // The damaged segment is read again with its holes known; the
            // entries of segments before it are kept, and a batch that
            // has some ends there.
            let keep = out.partition_point(|(i, _)| *i < u.segment);
            out.truncate(keep);
            sizes.truncate(keep);
            bytes = sizes.iter().sum();
            if !out.is_empty() {
                break;
            }
        }
        Ok((out, bytes))
    }

    /// Records the corrupt run at `u` as a hole: one entry when its CRC
    /// held but it does not decode, else the holes a map of the whole
    /// segment shows (its last index is known: the next segment's first,
    /// or the entries this process appended).
    fn map_unreadable(&mut self, u: Unreadable) -> Result<()> {
        let i = self
            .log
            .segment_of(u.index)
            .with_context(|| format!("journal: bug: entry {} is in no segment", u.index))?;
        let (holes, why) = match u.len {
            Some(len) => {
                let h = Hole {
                    from: u.index,
                    to: u.index + 1,
                    offset: u.offset,
                    end_offset: u.offset + len,
                    exact: true,
                    why: u.why,
                };
                let new = self.log.add_hole(i, h);
                (
                    if new { vec![h] } else { Vec::new() },
                    "entry does not decode",
                )
            }
            None => (self.log.map_damage(i)?, "corrupt entry"),
        };
        let path = self.log.segments()[i].path.clone();
        for h in &holes {
            report_hole(&mut self.corrupt, &path, h, why);
        }
        Ok(())
    }

    /// Corrupt ranges found since the last call, for the audit log.
    pub fn take_corruption(&mut self) -> Vec<Corruption> {
        std::mem::take(&mut self.corrupt)
    }

    /// What the surviving entries show of the records lost in `from..to`:
    /// per stream, from its last entry before the range to its first after
    /// it (or its journaled position when none follows). Reads the whole
    /// journal once; only called when a corrupt range is found.
    pub fn corrupt_ranges(&mut self, from: u64, to: u64) -> Result<CorruptRanges> {
        // (epoch, last seq) before the range and (epoch, first seq) after it.
        let mut before: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut after: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        self.log.flush()?;
        let (mut reader, mut at) = (None, self.first_index());
        let end = self.log.next_index();
        loop {
            let (entries, _) = self.read_until(&mut reader, at, 4096, u64::MAX, end)?;
            let Some(last) = entries.last().map(|(i, _)| *i) else {
                break;
            };
            at = last + 1;
            for (index, e) in entries {
                let (stream, epoch, first_seq, last_seq) = match e {
                    Entry::Record { resent: true, .. } => continue,
                    Entry::Record {
                        stream, epoch, seq, ..
                    } => (stream, epoch, seq, seq),
                    Entry::Gap {
                        stream,
                        epoch,
                        from,
                        to,
                        ..
                    } => (stream, epoch, from, to),
                };
                if index < from {
                    before.insert(stream, (epoch, last_seq));
                } else if index >= to {
                    after.entry(stream).or_insert((epoch, first_seq));
                }
            }
        }
        let mut out = CorruptRanges::default();
        for (stream, (epoch, last)) in &before {
            let next = match after.get(stream) {
                Some(&(e, first)) if e == *epoch => first,
                Some(_) => {
                    out.unknown.push(stream.clone());
                    continue;
                }
                None => match self.positions.get(stream) {
                    Some(p) if p.epoch == Some(*epoch) => p.last.unwrap_or(*last).saturating_add(1),
                    _ => {
                        out.unknown.push(stream.clone());
                        continue;
                    }
                },
            };
            if next > last.saturating_add(1) {
                out.ranges.push((stream.clone(), last + 1, next - 1));
            }
        }
        out.unknown
            .extend(after.keys().filter(|s| !before.contains_key(*s)).cloned());
        Ok(out)
    }

    /// The oldest segment's index range, if there is more than the active one.
    pub fn oldest(&self) -> Option<(u64, u64)> {
        let segments = self.log.segments();
        (segments.len() > 1)
            .then(|| segments.front().map(|s| (s.first, s.end())))
            .flatten()
    }

    /// Entries of the oldest segment from `from` on (before it is dropped).
    pub fn scan_oldest(&mut self, from: u64) -> Result<Vec<(u64, Entry)>> {
        let end = self.log.segments().front().expect("a segment").end();
        Ok(self
            .read_until(&mut None, from, usize::MAX, u64::MAX, end)?
            .0)
    }

    pub fn drop_oldest(&mut self) -> Result<()> {
        self.log.remove_oldest()?;
        Ok(())
    }

    /// Deletes segments every sink has written past.
    pub fn compact(&mut self, confirmed_by_all: u64) -> Result<()> {
        self.log.remove_below(confirmed_by_all)?;
        Ok(())
    }

    pub fn sink_cursor_path(&self, sink: &str) -> PathBuf {
        self.settings
            .path
            .join("sinks")
            .join(format!("{}.json", crate::sinks::file::file_stem(sink)))
    }

    pub fn dead_letter_path(&self, sink: &str) -> PathBuf {
        self.settings
            .path
            .join("dead-letter")
            .join(format!("{}.jsonl", crate::sinks::file::file_stem(sink)))
    }
}

pub fn load_sink_cursor(path: &Path) -> Result<Option<SinkCursor>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!("{} is corrupt; move it away", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_protocol::{Point, Value};
    use weir_store::GROUP_BYTES;

    fn settings(dir: &Path, max: u64) -> Settings {
        Settings {
            path: dir.to_path_buf(),
            max_bytes: max,
            fsync_bytes: 1 << 20,
            fsync_interval: Duration::from_millis(5),
        }
    }

    fn rec(stream: &str, seq: u64) -> Delivered {
        Delivered {
            stream: Arc::from(stream),
            source_type: Arc::from("generator"),
            session: 9,
            epoch: 3,
            seq,
            resent: false,
            body: RecordBody::Point(Point {
                tag: "t".into(),
                ts_ns: 0,
                value: Value::I64(seq as i64),
                quality: 0,
                status: None,
            }),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weir-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn an_fsync_is_due_at_once_for_a_trickle_and_under_load_waits_for_fsync_bytes_or_fsync_ms() {
        let dir = scratch("group");
        let mut settings = settings(&dir, 64 << 20);
        settings.fsync_interval = Duration::from_secs(3600);
        let mut j = Journal::open(settings).unwrap();
        let big = |seq| Delivered {
            body: RecordBody::Bytes(weir_protocol::Chunk {
                data: vec![7; 16 << 10],
                end: false,
            }),
            ..rec("a", seq)
        };
        // A trickle: due at once.
        j.append_record(&rec("a", 0)).unwrap();
        assert!(j.sync_due());
        j.sync().unwrap();
        assert!(!j.sync_due());
        assert_eq!(j.sync_wait(), None);
        // More than GROUP_BYTES waiting (under load): held until
        // fsync_bytes (1 MiB here) wait...
        let mut seq = 1;
        while j.group.unsynced() < GROUP_BYTES {
            j.append_record(&big(seq)).unwrap();
            seq += 1;
        }
        assert!(!j.sync_due());
        assert!(j.sync_wait().is_some_and(|w| w > Duration::from_secs(3000)));
        while j.group.unsynced() < 1 << 20 {
            j.append_record(&big(seq)).unwrap();
            seq += 1;
        }
        assert!(j.sync_due());
        j.sync().unwrap();
        // ...or fsync_ms passed since the last request.
        j.settings.fsync_interval = Duration::from_millis(1);
        while j.group.unsynced() < GROUP_BYTES {
            j.append_record(&big(seq)).unwrap();
            seq += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
        assert!(j.sync_due());
        assert_eq!(j.sync_wait(), Some(Duration::ZERO));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn positions_and_entries_survive_a_reopen_and_a_torn_tail_loses_only_the_torn_entry() {
        let dir = scratch("reopen");
        let mut j = Journal::open(settings(&dir, 64 << 20)).unwrap();
        for seq in 0..100 {
            j.append_record(&rec("a", seq)).unwrap();
        }
        j.append_gap("a", 9, 3, 100, 109).unwrap();
        j.append_record(&rec("a", 110)).unwrap();
        j.sync().unwrap();
        assert_eq!(j.read(0, usize::MAX).unwrap().len(), 102);
        let seg = j.log.segments().back().unwrap().path.clone();
        drop(j);
        let len = std::fs::metadata(&seg).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        // The state file said 110; the torn entry is gone, so the position
        // is rebuilt from what survives: the decoder will expect 110 again.
        let mut j = Journal::open(settings(&dir, 64 << 20)).unwrap();
        assert_eq!(j.read(0, usize::MAX).unwrap().len(), 101);
        assert_eq!(j.positions()["a"].last, Some(109));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A kill -9 leaves entries after the state's durable index in the
    /// page cache, the last one torn. The sinks had written everything the
    /// state counted, but the surviving entries after it are still to be
    /// written: the positions must stay at them, or the decoder reports
    /// them as a gap too (a record both written and in a gap). Only when
    /// the cut reaches below the durable index do the state's positions
    /// come back.
    #[test]
    fn a_torn_tail_past_the_durable_index_keeps_the_positions_of_the_entries_that_survive() {
        let dir = scratch("torn-past-durable");
        let mut j = Journal::open(settings(&dir, 64 << 20)).unwrap();
        for seq in 0..100 {
            j.append_record(&rec("a", seq)).unwrap();
        }
        j.sync().unwrap();
        for seq in 100..150 {
            j.append_record(&rec("a", seq)).unwrap();
        }
        j.log.flush().unwrap();
        let seg = j.log.segments().back().unwrap().path.clone();
        drop(j);
        let len = std::fs::metadata(&seg).unwrap().len();
        let torn = |len: u64| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&seg)
                .unwrap()
                .set_len(len)
                .unwrap()
        };
        torn(len - 5);
        let mut j = Journal::open(settings(&dir, 64 << 20)).unwrap();
        assert_eq!(j.read(0, usize::MAX).unwrap().len(), 149);
        // Every sink had confirmed the 100 entries the state counted.
        j.settle_repair(100);
        assert_eq!(j.positions()["a"].last, Some(148));
        j.append_record(&rec("a", 149)).unwrap();
        j.sync().unwrap();
        drop(j);
        // Now the state counts 150 entries; cut into them.
        let offsets = offsets(&seg);
        torn(offsets[140] + 3);
        let mut j = Journal::open(settings(&dir, 64 << 20)).unwrap();
        assert_eq!(j.read(0, usize::MAX).unwrap().len(), 140);
        assert_eq!(
            j.positions()["a"].last,
            Some(139),
            "rebuilt from what survives"
        );
        j.settle_repair(150);
        assert_eq!(
            j.positions()["a"].last,
            Some(149),
            "the sinks had written the lost entries: the state's positions"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn compaction_and_overflow_drop_whole_oldest_segments() {
        let dir = scratch("bounds");
        let mut j = Journal::open(settings(&dir, 1 << 20)).unwrap();
        for seq in 0..50_000 {
            j.append_record(&rec("a", seq)).unwrap();
        }
        j.sync().unwrap();
        assert!(j.log.segments().len() > 2);
        let (first, end) = j.oldest().unwrap();
        assert_eq!(j.scan_oldest(first).unwrap().len() as u64, end - first);
        j.compact(end).unwrap();
        assert_eq!(j.first_index(), end);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Byte offsets of every entry in a segment file.
    fn offsets(path: &Path) -> Vec<u64> {
        let data = std::fs::read(path).unwrap();
        let (mut off, mut out) = (weir_store::HEADER_LEN as usize, Vec::new());
        while off < data.len() {
            out.push(off as u64);
            off += weir_store::segment::entry_at(&data, off).unwrap();
        }
        out
    }

    fn flip(path: &Path, at: u64) {
        let mut data = std::fs::read(path).unwrap();
        data[at as usize] ^= 0x5a;
        std::fs::write(path, data).unwrap();
    }

    fn seqs(entries: &[(u64, Entry)]) -> Vec<u64> {
        entries
            .iter()
            .filter_map(|(_, e)| match e {
                Entry::Record { seq, .. } => Some(*seq),
                Entry::Gap { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_corrupt_payload_mid_segment_is_skipped_as_one_entry_with_its_exact_range() {
        let dir = scratch("corrupt-payload");
        let mut j = Journal::open(settings(&dir, 64 << 20)).unwrap();
        for seq in 0..1000 {
            j.append_record(&rec("a", seq)).unwrap();
            j.append_record(&rec("b", seq)).unwrap();
        }
        j.sync().unwrap();
        let seg = j.log.segments().back().unwrap().path.clone();
        // Entry 401 is b/200: a byte inside its payload.
        flip(&seg, offsets(&seg)[401] + 12);
        let (got, _) = j
            .read_with(&mut None, 0, usize::MAX, u64::MAX, u64::MAX)
            .unwrap();
        assert_eq!(got.len(), 1999, "every entry but the corrupt one");
        assert!(got.iter().all(|(i, _)| *i != 401));
        let found = j.take_corruption();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].from, found[0].to), (401, 402));
        let r = j.corrupt_ranges(401, 402).unwrap();
        assert_eq!(r.ranges, vec![("b".to_string(), 200, 200)]);
        assert!(r.unknown.is_empty());
        // A reader that only skips past it (from beyond it) checks its CRC too.
        drop(j);
        let mut j = Journal::open(settings(&dir, 64 << 20)).unwrap();
        let (got, _) = j.read_with(&mut None, 500, 10, u64::MAX, u64::MAX).unwrap();
        assert_eq!(got.first().map(|e| e.0), Some(500));
        assert_eq!(
            j.take_corruption().len(),
            1,
            "found again when the journal reopens"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_corrupt_length_mid_segment_resyncs_on_the_next_whole_entry_and_counts_exactly() {
        let dir = scratch("corrupt-length");
        let mut j = Journal::open(settings(&dir, 64 << 20)).unwrap();
        for seq in 0..1000 {
            j.append_record(&rec("a", seq)).unwrap();
        }
        j.sync().unwrap();
        let seg = j.log.segments().back().unwrap().path.clone();
        // The length field of entry 300: skipping by it leads nowhere.
        flip(&seg, offsets(&seg)[300] + 2);
        let (got, _) = j
            .read_with(&mut None, 0, usize::MAX, u64::MAX, u64::MAX)
            .unwrap();
        assert_eq!(
            seqs(&got),
            (0..1000).filter(|s| *s != 300).collect::<Vec<_>>()
        );
        let found = j.take_corruption();
        assert_eq!((found[0].from, found[0].to), (300, 301));
        assert_eq!(
            j.corrupt_ranges(300, 301).unwrap().ranges,
            vec![("a".to_string(), 300, 300)]
        );
        // New entries after the damage keep their indexes.
        j.append_record(&rec("a", 1000)).unwrap();
        j.sync().unwrap();
        let (got, _) = j
            .read_with(&mut None, 1000, 10, u64::MAX, u64::MAX)
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 1000);
        assert_eq!(seqs(&got), vec![1000]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn two_corrupt_lengths_in_one_segment_become_one_hole_between_them_and_nothing_silent() {
        let dir = scratch("corrupt-two");
        let mut j = Journal::open(settings(&dir, 64 << 20)).unwrap();
        for seq in 0..100_000 {
            j.append_record(&rec("a", seq)).unwrap();
        }
        j.sync().unwrap();
        let seg = j.log.segments().back().unwrap().path.clone();
        let at = offsets(&seg);
        // Only the sum of the two runs' lengths is known: the entries
        // between them go with them, and the gap names all of it.
        flip(&seg, at[30_000] + 2);
        flip(&seg, at[60_000] + 2);
        let (got, _) = j
            .read_with(&mut None, 0, usize::MAX, u64::MAX, u64::MAX)
            .unwrap();
        let found = j.take_corruption();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].from, found[0].to), (30_000, 60_001));
        let want: Vec<u64> = (0..100_000)
            .filter(|s| !(30_000..=60_000).contains(s))
            .collect();
        assert_eq!(seqs(&got), want);
        assert_eq!(
            j.corrupt_ranges(30_000, 60_001).unwrap().ranges,
            vec![("a".to_string(), 30_000, 60_000)]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_corrupt_entry_in_an_older_segment_no_longer_stops_the_journal_from_opening() {
        let dir = scratch("corrupt-older");
        let mut j = Journal::open(settings(&dir, 1 << 20)).unwrap();
        for seq in 0..20_000 {
            j.append_record(&rec("a", seq)).unwrap();
        }
        j.sync().unwrap();
        assert!(j.log.segments().len() > 2);
        let (first, end) = j.oldest().unwrap();
        let seg = j.log.segments().front().unwrap().path.clone();
        drop(j);
        let at = offsets(&seg);
        // A run of damage over entries 100..=102 (headers included; the
        // last 3 bytes of 102 are left, so no length leads past it).
        let mut data = std::fs::read(&seg).unwrap();
        for b in &mut data[at[100] as usize..at[103] as usize - 3] {
            *b = 0xff;
        }
        std::fs::write(&seg, data).unwrap();
        let mut j = Journal::open(settings(&dir, 1 << 20)).unwrap();
        let found = j.take_corruption();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].from, found[0].to), (first + 100, first + 103));
        let (got, _) = j
            .read_with(&mut None, first, usize::MAX, u64::MAX, u64::MAX)
            .unwrap();
        let want: Vec<u64> = (0..20_000).filter(|s| !(100..103).contains(s)).collect();
        assert_eq!(seqs(&got), want);
        assert_eq!(j.scan_oldest(first).unwrap().len() as u64, end - first - 3);
        assert_eq!(
            j.corrupt_ranges(first + 100, first + 103).unwrap().ranges,
            vec![("a".to_string(), 100, 102)]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn catch_up_reads_of_large_records_stay_within_the_byte_bound() {
        let dir = scratch("bytes-bound");
        let mut j = Journal::open(settings(&dir, 64 << 20)).unwrap();
        let big = |seq: u64| Delivered {
            body: RecordBody::Bytes(weir_protocol::Chunk {
                data: vec![seq as u8; 64 << 10],
                end: false,
            }),
            ..rec("big", seq)
        };
        for seq in 0..200 {
            j.append_record(&big(seq)).unwrap();
        }
        j.sync().unwrap();
        let bound = crate::pipeline::CATCH_UP_BYTES;
        let (mut reader, mut from, mut batches) = (None, 0u64, 0);
        while from < 200 {
            let (got, bytes) = j
                .read_with(&mut reader, from, 1024, bound, u64::MAX)
                .unwrap();
            assert!(!got.is_empty());
            assert!(bytes <= bound, "a batch of {bytes} bytes, over {bound}");
            assert_eq!(got[0].0, from, "batches follow each other exactly");
            from = got.last().unwrap().0 + 1;
            batches += 1;
        }
        assert!(batches >= 200 * (64 << 10) / bound, "{batches} batches");
        // A record larger than the bound still goes, alone.
        let (got, bytes) = j.read_with(&mut None, 0, 1024, 1000, u64::MAX).unwrap();
        assert_eq!(got.len(), 1);
        assert!(bytes > 64 << 10);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
