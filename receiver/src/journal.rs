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
//! with cause `journal-corrupt` (see `map_segment`, `Corruption`).
//!
//! ```text
//! segments/{index of first entry:020}.seg   entries framed by weir_protocol::segment
//! state.json                                 per-stream decoder positions and the durable index
//! sinks/{name}.json                          each sink's confirmed index and its resume data
//! dead-letter/{name}.jsonl                   records a sink rejected for good, with the reason
//! ```
//!
//! Only the decoder thread owns a `Journal`; sink threads never read files.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::decoder::{Delivered, StreamPosition};
use weir_protocol::segment::{read_entry, write_entry, ReadOutcome, ENTRY_HEADER, MAX_ENTRY};
use weir_protocol::RecordBody;

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
                let name = names
                    .entry(stream.clone())
                    .or_insert_with(|| Arc::from(stream.as_str()))
                    .clone();
                Some(Delivered {
                    stream: name,
                    source_type: Arc::from(source_type.as_str()),
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

struct Segment {
    first: u64,
    count: u64,
    bytes: u64,
    path: PathBuf,
    /// Corrupt runs of entries readers skip, sorted by `from`.
    holes: Vec<Hole>,
}

/// Entries readers skip because their bytes are corrupt (a bad CRC, a
/// length that leads nowhere, a payload that does not decode): journal
/// indexes `from..to`, stored at bytes `offset..end_offset` of the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hole {
    from: u64,
    to: u64,
    offset: u64,
    end_offset: u64,
}

/// A corrupt or missing range of the journal, found and not yet reported:
/// the pipeline audits it (`journal-corrupt`) for every sink it concerns.
#[derive(Debug, Clone)]
pub struct Corruption {
    /// The segment file, or where a missing one should have been.
    pub segment: PathBuf,
    /// Journal indexes `from..to` that no reader will deliver.
    pub from: u64,
    pub to: u64,
    /// Byte range in the segment (`bytes` is 0 for a missing segment).
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

impl Segment {
    fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// An fsync for the syncer thread: the segment's file, the index every
/// entry below which it makes durable, and the state file to write after.
struct SyncJob {
    file: File,
    up_to: u64,
    state: Vec<u8>,
}

/// Wakes the thread that waits for entries to become durable (the decoder
/// thread hands them to the sinks), called by the syncer thread after each
/// fsync and after a failure.
pub type Waker = Box<dyn Fn() + Send + Sync>;

/// What the journal and its syncer thread share.
struct SyncShared {
    /// Entries below this are fsynced (set by the syncer thread).
    durable: AtomicU64,
    /// The first fsync failure; the durable index stops moving after it.
    failure: Mutex<Option<String>>,
    /// Fsync jobs done (a segment fsync and a state file save each).
    fsyncs: AtomicU64,
    /// Notified with `durable` or `failure` changed, for `Journal::sync`.
    changed: Condvar,
    changed_lock: Mutex<()>,
    waker: OnceLock<Waker>,
}

impl SyncShared {
    fn notify(&self) {
        drop(self.changed_lock.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_all();
        if let Some(wake) = self.waker.get() {
            wake();
        }
    }
}

/// Runs fsyncs off the decoder thread, in order; a failure is kept for the
/// decoder thread to see (and the durable index stops moving).
fn syncer(jobs: std::sync::mpsc::Receiver<SyncJob>, root: PathBuf, shared: Arc<SyncShared>) {
    while let Ok(job) = jobs.recv() {
        let result = job
            .file
            .sync_data()
            .context("journal: fsync of a segment")
            .and_then(|_| write_atomically(&root.join("state.json"), &job.state));
        match result {
            Ok(()) => {
                shared.fsyncs.fetch_add(1, Ordering::Relaxed);
                shared.durable.store(job.up_to, Ordering::Release);
            }
            Err(e) => {
                let mut f = shared.failure.lock().unwrap_or_else(|p| p.into_inner());
                f.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        shared.notify();
    }
}

pub struct Journal {
    settings: Settings,
    segments: VecDeque<Segment>,
    writer: BufWriter<File>,
    next_index: u64,
    /// The durable index, failure and fsync count the syncer thread sets.
    sync: Arc<SyncShared>,
    /// Highest index handed to the syncer.
    requested: u64,
    jobs: std::sync::mpsc::SyncSender<SyncJob>,
    unsynced_bytes: u64,
    last_sync: Instant,
    total_bytes: u64,
    positions: BTreeMap<String, Position>,
    /// After a torn-tail repair: the positions and durable index the state
    /// file had, for when every sink is known to have written the lost entries.
    repaired: Option<(BTreeMap<String, Position>, u64)>,
    scratch: Vec<u8>,
    /// Bytes ever appended (for exact byte sizes of dispatched batches).
    appended_bytes: u64,
    /// Corrupt ranges found and not yet taken by the pipeline.
    corrupt: Vec<Corruption>,
}

/// No journal reaches this many entries (2^62, at one entry per byte
/// more than 4 EiB); a segment name beyond it is damage, and the bound
/// keeps every index sum far from overflow.
const MAX_INDEX: u64 = 1 << 62;

fn seg_dir(root: &Path) -> PathBuf {
    root.join("segments")
}

fn seg_path(root: &Path, first: u64) -> PathBuf {
    seg_dir(root).join(format!("{first:020}.seg"))
}

/// A sequential read position in a segment, kept between catch-up reads
/// so a sink that fell behind is served without rereading from the start.
pub struct Reader {
    first: u64,
    file: BufReader<File>,
    index: u64,
    /// Byte offset of `index` in the segment.
    offset: u64,
}

/// Where a read of whole entries stopped on bytes that are not one.
#[derive(Debug, Clone, Copy)]
struct Unreadable {
    index: u64,
    offset: u64,
    /// The entry's length when its CRC held but its payload does not decode.
    len: Option<u64>,
}

/// What `read_from` got: entries, their journal bytes, and whether it
/// stopped on `max`/`max_bytes` (rather than at `limit` or the segment's
/// end); or the first entry below `limit` that is not whole (corruption to
/// map, then retry).
type ReadFrom = std::result::Result<(Vec<(u64, Entry)>, u64, bool), Unreadable>;

/// Up to `max` entries (and about `max_bytes`: at least one entry, then
/// none that would pass it) of a segment from global index `from`, never
/// at or past `limit`. Entries before `from` are skipped by reading them
/// whole (their CRC is checked), and known holes are skipped by offset.
fn read_from(
    reader: &mut Option<Reader>,
    seg: &Segment,
    from: u64,
    max: usize,
    max_bytes: u64,
    limit: u64,
) -> Result<ReadFrom> {
    if reader
        .as_ref()
        .is_none_or(|r| r.first != seg.first || r.index > from)
    {
        let file = BufReader::with_capacity(
            1 << 20,
            File::open(&seg.path).with_context(|| format!("opening {}", seg.path.display()))?,
        );
        *reader = Some(Reader {
            first: seg.first,
            file,
            index: seg.first,
            offset: 0,
        });
    }
    let r = reader.as_mut().expect("opened");
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    let mut full = false;
    // Only fsynced entries (below `limit`) are whole; never read past them.
    while r.index < limit {
        if out.len() >= max {
            full = true;
            break;
        }
        if let Some(h) = seg
            .holes
            .iter()
            .find(|h| h.from <= r.index && r.index < h.to)
        {
            r.file
                .seek(std::io::SeekFrom::Start(h.end_offset))
                .with_context(|| format!("reading {}", seg.path.display()))?;
            r.index = h.to;
            r.offset = h.end_offset;
            continue;
        }
        let at = (r.index, r.offset);
        match read_entry(&mut r.file, &mut buf)
            .with_context(|| format!("reading {}", seg.path.display()))?
        {
            ReadOutcome::Entry => {
                let size = (ENTRY_HEADER + buf.len()) as u64;
                if r.index >= from {
                    if !out.is_empty() && bytes + size > max_bytes {
                        // Not taken: step back so the next read starts here.
                        r.file
                            .seek_relative(-(size as i64))
                            .with_context(|| format!("reading {}", seg.path.display()))?;
                        full = true;
                        break;
                    }
                    match postcard::from_bytes::<Entry>(&buf) {
                        Ok(e) => out.push((r.index, e)),
                        Err(_) => {
                            *reader = None;
                            return Ok(Err(Unreadable {
                                index: at.0,
                                offset: at.1,
                                len: Some(size),
                            }));
                        }
                    }
                    bytes += size;
                }
                r.index += 1;
                r.offset += size;
            }
            ReadOutcome::End | ReadOutcome::Torn(_) => {
                *reader = None;
                if at.0 < limit.min(seg.end()) {
                    // Below the durable index every entry is whole: this is
                    // corruption, not an entry still being written.
                    return Ok(Err(Unreadable {
                        index: at.0,
                        offset: at.1,
                        len: None,
                    }));
                }
                break;
            }
        }
    }
    Ok(Ok((out, bytes, full)))
}

/// The whole entry at `off` in `data`: its length with the header, or why not.
fn entry_at(data: &[u8], off: usize) -> std::result::Result<usize, &'static str> {
    let Some(header) = off
        .checked_add(ENTRY_HEADER)
        .and_then(|end| data.get(off..end))
    else {
        return Err("truncated entry header");
    };
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_ENTRY {
        return Err("impossible entry length");
    }
    let Some(payload) = data.get(off + ENTRY_HEADER..off + ENTRY_HEADER + len) else {
        return Err("truncated entry");
    };
    if crc32fast::hash(payload) != crc {
        return Err("CRC mismatch");
    }
    Ok(ENTRY_HEADER + len)
}

/// A corrupt entry at `off` whose length header still holds: it fits in
/// `data` and a whole entry (or the end of the data) follows it.
fn skippable(data: &[u8], off: usize) -> Option<usize> {
    let header = data.get(off..off.checked_add(ENTRY_HEADER)?)?;
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_ENTRY {
        return None;
    }
    let next = off + ENTRY_HEADER + len;
    (next == data.len() || (next < data.len() && entry_at(data, next).is_ok()))
        .then_some(ENTRY_HEADER + len)
}

/// A whole entry at `r` followed by another (or by the end of the data):
/// where reading can pick up again after a damaged run. Two CRCs that
/// hold by chance at a wrong offset are a 1 in 2^64 event.
fn resyncs_at(data: &[u8], r: usize) -> bool {
    entry_at(data, r).is_ok_and(|n| r + n == data.len() || entry_at(data, r + n).is_ok())
}

/// How a segment's bytes divide into entries.
#[derive(Debug)]
struct Mapped {
    /// Entries, corrupt ones included (up to `torn` if it is set).
    count: u64,
    /// Bytes up to `torn`, or all of them.
    good_len: u64,
    holes: Vec<Hole>,
    /// Where the segment stops early (a torn tail): byte offset, index, why.
    torn: Option<(u64, u64, &'static str)>,
}

/// Walks a segment's bytes. A corrupt entry whose length header holds is
/// skipped by that length (one entry lost). A longer damaged run is
/// skipped to the next offset where whole entries resume, when `end` (the
/// index after the segment's last entry) is known: the entries from there
/// to the end of the data, counted, give the run's length in entries
/// exactly. Should a second such run follow, the two and everything
/// between them become one hole (only their sum is known). Without `end`
/// the segment stops at such a run (`torn`). A failure at or after
/// `torn_from` (entries not fsynced when the journal last saved its state)
/// is a torn tail: the segment stops there too. Linear in the data.
fn map_segment(data: &[u8], first: u64, end: Option<u64>, torn_from: Option<u64>) -> Mapped {
    let (mut off, mut index, mut holes) = (0usize, first, Vec::new());
    // A damaged run whose length is known only at the end: its first index
    // and byte offset, where reading resumed, the entries since, and the
    // single-entry holes since (indexes relative to the resync point).
    let mut open: Option<(u64, usize, usize)> = None;
    let (mut since, mut after): (u64, Vec<Hole>) = (0, Vec::new());
    while off < data.len() {
        let why = match entry_at(data, off) {
            Ok(n) => {
                off += n;
                match open {
                    Some(_) => since += 1,
                    None => index += 1,
                }
                continue;
            }
            Err(why) => why,
        };
        let torn = open.is_none() && torn_from.is_some_and(|t| index >= t);
        if let Some(n) = skippable(data, off).filter(|_| !torn) {
            let at = if open.is_some() { since } else { index };
            let hole = Hole {
                from: at,
                to: at + 1,
                offset: off as u64,
                end_offset: (off + n) as u64,
            };
            match open {
                Some(_) => {
                    after.push(hole);
                    since += 1;
                }
                None => {
                    holes.push(hole);
                    index += 1;
                }
            }
            off += n;
            continue;
        }
        if end.is_none() || torn {
            return Mapped {
                count: index - first,
                good_len: off as u64,
                holes,
                torn: Some((off as u64, index, why)),
            };
        }
        let resync = (off + 1..data.len())
            .find(|r| resyncs_at(data, *r))
            .unwrap_or(data.len());
        let (from, from_off) = open.map_or((index, off), |(f, o, _)| (f, o));
        open = Some((from, from_off, resync));
        since = 0;
        after.clear();
        off = resync;
    }
    if let (Some((from, from_off, resync)), Some(end)) = (open, end) {
        let to = end.checked_sub(since).filter(|t| *t > from);
        match to {
            Some(to) => {
                holes.push(Hole {
                    from,
                    to,
                    offset: from_off as u64,
                    end_offset: resync as u64,
                });
                holes.extend(after.iter().map(|h| Hole {
                    from: to + h.from,
                    to: to + h.to,
                    ..*h
                }));
            }
            // More entries after the run than the segment can hold: the
            // resync point is not to be trusted, so all of it is lost.
            None => holes.push(Hole {
                from,
                to: end.max(from + 1),
                offset: from_off as u64,
                end_offset: data.len() as u64,
            }),
        }
        index = end.max(from + 1);
    } else if let Some(end) = end.filter(|e| *e > index) {
        // Whole entries end before the segment should: the rest is missing.
        holes.push(Hole {
            from: index,
            to: end,
            offset: off as u64,
            end_offset: off as u64,
        });
        index = end;
    }
    Mapped {
        count: index - first,
        good_len: data.len().min(off) as u64,
        holes,
        torn: None,
    }
}

/// Decoded entries of a mapped segment's bytes at or after `from` (up to
/// `len`), skipping holes; an entry that does not decode becomes a hole.
fn decode_entries(
    data: &[u8],
    first: u64,
    from: u64,
    len: u64,
    holes: &mut Vec<Hole>,
) -> Vec<(u64, Entry)> {
    let (mut off, mut index, mut out) = (0usize, first, Vec::new());
    let len = len as usize;
    while off < len {
        if let Some(h) = holes.iter().find(|h| h.from <= index && index < h.to) {
            off = h.end_offset as usize;
            index = h.to;
            continue;
        }
        let Ok(n) = entry_at(data, off) else {
            break; // mapped: cannot happen
        };
        if index >= from {
            match postcard::from_bytes::<Entry>(&data[off + ENTRY_HEADER..off + n]) {
                Ok(e) => out.push((index, e)),
                Err(_) => {
                    holes.push(Hole {
                        from: index,
                        to: index + 1,
                        offset: off as u64,
                        end_offset: (off + n) as u64,
                    });
                    holes.sort_by_key(|h| h.from);
                }
            }
        }
        off += n;
        index += 1;
    }
    out
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

impl Journal {
    pub fn open(settings: Settings) -> Result<Self> {
        let root = settings.path.clone();
        for dir in [seg_dir(&root), root.join("sinks"), root.join("dead-letter")] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("journal.path: cannot create {}", dir.display()))?;
        }
        let state_path = root.join("state.json");
        let mut state: State = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| {
                format!(
                    "journal.path: {} is corrupt; move it away",
                    state_path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_path.display())),
        };
        let mut listed: Vec<(u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(seg_dir(&root))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(first) = name
                .strip_suffix(".seg")
                .and_then(|n| n.parse::<u64>().ok())
            {
                listed.push((first, e.path()));
            }
        }
        listed.sort();
        let saved_positions = state.streams.clone();
        let saved_durable = state.durable_index;
        let mut repaired = false;
        let mut segments: VecDeque<Segment> = VecDeque::new();
        let mut corrupt: Vec<Corruption> = Vec::new();
        let mut expected = listed.first().map_or(0, |(f, _)| *f);
        for (i, (first, path)) in listed.iter().enumerate() {
            if *first > MAX_INDEX {
                bail!("journal.path: segment {} names entry {first}, beyond any journal (at most {MAX_INDEX}); move it away", path.display());
            }
            if *first < expected {
                bail!("journal.path: segment {} starts at entry {first}, inside the segment before it (which ends at {expected}); move the journal away", path.display());
            }
            if *first > expected {
                tracing::error!(
                    from = expected,
                    to = first,
                    "journal: the segment holding entries {expected}..{first} is missing; they are skipped (journal-corrupt)"
                );
                corrupt.push(Corruption {
                    segment: seg_path(&root, expected),
                    from: expected,
                    to: *first,
                    offset: 0,
                    bytes: 0,
                    why: "segment file missing".into(),
                });
            }
            let data = std::fs::read(path)
                .with_context(|| format!("journal.path: reading {}", path.display()))?;
            let last = i + 1 == listed.len();
            let end = listed.get(i + 1).map(|(next, _)| *next);
            let torn_from = last.then_some(state.durable_index);
            let mut m = map_segment(&data, *first, end, torn_from);
            if let Some((at, index, why)) = m.torn {
                repaired = true;
                let size = data.len() as u64;
                if index < state.durable_index {
                    // Fsynced entries, damaged in the middle of the newest
                    // segment past what a skip by length can bridge: the
                    // number of entries lost cannot be known, so the segment
                    // ends here and the positions are rebuilt (the decoder
                    // reports the records as a gap if they never come back).
                    tracing::error!(
                        segment = %path.display(),
                        entry = index,
                        offset = at,
                        truncated_bytes = size - at,
                        "journal: corrupt entry ({why}) below the durable index {} in the newest segment; truncated there",
                        state.durable_index
                    );
                } else {
                    tracing::warn!(
                        segment = %path.display(),
                        truncated_bytes = size - at,
                        "journal: torn tail after a crash ({why}); truncated to the last whole record"
                    );
                }
                OpenOptions::new().write(true).open(path)?.set_len(at)?;
            }
            let entries =
                decode_entries(&data, *first, state.durable_index, m.good_len, &mut m.holes);
            for h in &m.holes {
                tracing::error!(
                    segment = %path.display(),
                    from = h.from,
                    to = h.to,
                    offset = h.offset,
                    bytes = h.end_offset - h.offset,
                    "journal: corrupt entries; readers skip them (journal-corrupt)"
                );
                corrupt.push(Corruption {
                    segment: path.clone(),
                    from: h.from,
                    to: h.to,
                    offset: h.offset,
                    bytes: h.end_offset - h.offset,
                    why: "corrupt entry".into(),
                });
            }
            for (_, e) in entries {
                apply_position(&mut state.streams, e, false);
            }
            segments.push_back(Segment {
                first: *first,
                count: m.count,
                bytes: m.good_len,
                path: path.clone(),
                holes: m.holes,
            });
            expected = first + m.count;
            if m.torn.is_some() {
                // Entries the state file counted may be gone: rebuild every
                // position from what survives, so the decoder expects the
                // torn records again and reports them as a gap if they never
                // come back, instead of believing they were journaled.
                for seg in &mut segments {
                    let data = std::fs::read(&seg.path)
                        .with_context(|| format!("journal.path: reading {}", seg.path.display()))?;
                    for (_, e) in
                        decode_entries(&data, seg.first, seg.first, seg.bytes, &mut seg.holes)
                    {
                        apply_position(&mut state.streams, e, true);
                    }
                }
                // A torn segment is the last one read: nothing after it counts.
                break;
            }
        }
        // Every segment is fsynced before its entries count as durable: the
        // previous process may have been killed before its syncer ran.
        for seg in &segments {
            File::open(&seg.path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("journal.path: syncing {}", seg.path.display()))?;
        }
        let next_index = expected;
        let path = seg_path(&root, next_index);
        if segments
            .back()
            .is_none_or(|s| s.bytes >= segment_bytes(&settings))
        {
            File::create(&path)?;
            segments.push_back(Segment {
                first: next_index,
                count: 0,
                bytes: 0,
                path: path.clone(),
                holes: Vec::new(),
            });
        }
        let active = segments.back().expect("a segment").path.clone();
        let writer =
            BufWriter::with_capacity(1 << 20, OpenOptions::new().append(true).open(&active)?);
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        tracing::info!(
            path = %root.display(),
            entries = next_index - segments.front().map_or(next_index, |s| s.first),
            bytes = total_bytes,
            streams = state.streams.len(),
            "journal opened"
        );
        let sync = Arc::new(SyncShared {
            durable: AtomicU64::new(next_index),
            failure: Mutex::new(None),
            fsyncs: AtomicU64::new(0),
            changed: Condvar::new(),
            changed_lock: Mutex::new(()),
            waker: OnceLock::new(),
        });
        // A few jobs in flight at most: each covers everything before it.
        let (jobs, rx) = std::sync::mpsc::sync_channel(4);
        {
            let (root, sync) = (root.clone(), sync.clone());
            std::thread::Builder::new()
                .name("weir-journal-sync".into())
                .spawn(move || syncer(rx, root, sync))
                .context("starting the journal's fsync thread")?;
        }
        Ok(Journal {
            settings,
            segments,
            writer,
            next_index,
            sync,
            requested: next_index,
            jobs,
            unsynced_bytes: 0,
            last_sync: Instant::now(),
            total_bytes,
            positions: state.streams,
            repaired: repaired.then_some((saved_positions, saved_durable)),
            scratch: Vec::new(),
            appended_bytes: 0,
            corrupt,
        })
    }

    /// After a torn-tail repair, if every sink had confirmed everything the
    /// state file counted, the lost entries were written everywhere: go back
    /// to the state's positions so they are not reported as gaps.
    pub fn settle_repair(&mut self, confirmed_by_all: u64) {
        if let Some((positions, durable)) = self.repaired.take() {
            if confirmed_by_all >= durable {
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
        self.segments.front().map_or(self.next_index, |s| s.first)
    }

    /// Entries below this are fsynced; only they go to sinks.
    pub fn durable_index(&self) -> u64 {
        self.sync.durable.load(Ordering::Acquire)
    }

    /// Fsyncs done since the journal opened (each a group commit).
    pub fn fsyncs(&self) -> u64 {
        self.sync.fsyncs.load(Ordering::Relaxed)
    }

    /// Sets what the syncer thread calls after each fsync (and failure),
    /// so the thread waiting to hand durable entries on wakes at once. Set
    /// once; a second waker is ignored.
    pub fn set_waker(&self, waker: Waker) {
        let _ = self.sync.waker.set(waker);
    }

    /// The first fsync failure, if any: the receiver must stop.
    pub fn failure(&self) -> Option<String> {
        self.sync
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    pub fn max_bytes(&self) -> u64 {
        self.settings.max_bytes
    }

    fn append(&mut self, entry: &EntryRef<'_>, stream: &str, position: Position) -> Result<u64> {
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        let payload = postcard::to_extend(entry, payload).expect("postcard into Vec");
        let written = write_entry(&mut self.writer, &payload);
        self.scratch = payload;
        let size = written.with_context(|| {
            format!("journal: cannot write to {}", self.settings.path.display())
        })?;
        let index = self.next_index;
        self.next_index += 1;
        let seg = self.segments.back_mut().expect("active segment");
        seg.count += 1;
        seg.bytes += size;
        let full = seg.bytes >= segment_bytes(&self.settings);
        self.total_bytes += size;
        self.appended_bytes += size;
        self.unsynced_bytes += size;
        match self.positions.get_mut(stream) {
            Some(p) => *p = position,
            None => {
                self.positions.insert(stream.to_string(), position);
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
        let previous = self.positions.get(&*r.stream).copied().unwrap_or_default();
        // A resent record fills an old gap: the stream's position stays.
        let last = if r.resent && previous.epoch == Some(r.epoch) {
            previous.last
        } else {
            Some(r.seq)
        };
        self.append(
            &entry,
            &r.stream,
            Position {
                session: Some(r.session),
                epoch: Some(r.epoch),
                last,
            },
        )
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
        self.append(
            &entry,
            stream,
            Position {
                session: Some(session),
                epoch: Some(epoch),
                last: Some(to),
            },
        )
    }

    fn rotate(&mut self) -> Result<()> {
        self.request_sync()?;
        let path = seg_path(&self.settings.path, self.next_index);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        self.writer = BufWriter::with_capacity(1 << 20, file);
        self.segments.push_back(Segment {
            first: self.next_index,
            count: 0,
            bytes: 0,
            path,
            holes: Vec::new(),
        });
        Ok(())
    }

    /// True when entries wait for an fsync that should be requested now:
    /// at once when no fsync is running (group commit: entries appended
    /// while one runs wait for it and are all covered by the next), or,
    /// while one runs, once `fsync_bytes` were appended or `fsync_ms`
    /// passed since the last request (the next job is then queued behind
    /// it, which bounds a batch handed to the sinks).
    pub fn sync_due(&self) -> bool {
        self.requested != self.next_index
            && (self.durable_index() >= self.requested
                || self.unsynced_bytes >= self.settings.fsync_bytes
                || self.last_sync.elapsed() >= self.settings.fsync_interval)
    }

    /// Writes buffered entries to the OS and hands their fsync to the
    /// syncer thread; returns the index the fsync will make durable.
    pub fn request_sync(&mut self) -> Result<u64> {
        if self.requested == self.next_index {
            return Ok(self.requested);
        }
        self.writer.flush().context("journal: writing a segment")?;
        let file = self
            .writer
            .get_ref()
            .try_clone()
            .context("journal: duplicating a segment handle")?;
        let state = State {
            streams: self.positions.clone(),
            durable_index: self.next_index,
        };
        let state = serde_json::to_vec_pretty(&state).expect("json");
        self.jobs
            .send(SyncJob {
                file,
                up_to: self.next_index,
                state,
            })
            .map_err(|_| anyhow::anyhow!("journal: the fsync thread has stopped"))?;
        self.requested = self.next_index;
        self.unsynced_bytes = 0;
        self.last_sync = Instant::now();
        Ok(self.requested)
    }

    /// Requests an fsync and waits for it (shutdown, tests).
    pub fn sync(&mut self) -> Result<u64> {
        let target = self.request_sync()?;
        let mut guard = self
            .sync
            .changed_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while self.durable_index() < target {
            if let Some(f) = self.failure() {
                bail!("{f}");
            }
            // The syncer notifies under `changed_lock` after it moves the
            // durable index: checked under the lock, no wake is missed.
            guard = self
                .sync
                .changed
                .wait(guard)
                .unwrap_or_else(|p| p.into_inner());
        }
        Ok(target)
    }

    /// Reads entries `from..` (at most `max`, never past the durable index).
    #[cfg(test)]
    pub fn read(&mut self, from: u64, max: usize) -> Result<Vec<(u64, Entry)>> {
        Ok(self.read_with(&mut None, from, max, u64::MAX)?.0)
    }

    /// Bytes ever appended to the journal by this process.
    pub fn appended_bytes(&self) -> u64 {
        self.appended_bytes
    }

    /// As `read`, continuing from a kept position when it fits, and
    /// stopping before an entry that would take the batch past `max_bytes`
    /// of journal bytes (one entry is always taken). Corrupt entries are
    /// skipped (see `take_corruption`). Returns the entries and their bytes.
    pub fn read_with(
        &mut self,
        reader: &mut Option<Reader>,
        from: u64,
        max: usize,
        max_bytes: u64,
    ) -> Result<(Vec<(u64, Entry)>, u64)> {
        let durable = self.durable_index();
        self.read_until(reader, from, max, max_bytes, durable)
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
        let mut i = 0;
        let mut mapped: Option<(usize, u64)> = None;
        while i < self.segments.len() && out.len() < max && bytes < max_bytes {
            let seg = &self.segments[i];
            if seg.end() <= from || seg.first >= limit {
                i += 1;
                continue;
            }
            let start = from.max(seg.first);
            let got = read_from(
                reader,
                seg,
                start,
                max - out.len(),
                max_bytes - bytes,
                limit,
            )?;
            match got {
                Ok((entries, b, full)) => {
                    out.extend(entries);
                    bytes += b;
                    if full {
                        break;
                    }
                    i += 1;
                }
                Err(u) => {
                    if mapped == Some((i, u.index)) {
                        bail!(
                            "journal: entry {} of {} cannot be read and the segment maps whole; check the disk",
                            u.index,
                            seg.path.display()
                        );
                    }
                    mapped = Some((i, u.index));
                    self.map_unreadable(i, u)?;
                    *reader = None;
                    // A read stops at a batch's first entry; the entries
                    // already taken here are kept and the read goes on.
                    if !out.is_empty() {
                        break;
                    }
                }
            }
        }
        Ok((out, bytes))
    }

    /// Records the corrupt run at `u` in segment `i` as a hole: one entry
    /// when its CRC held but it does not decode, else the holes a map of
    /// the whole segment shows (its last index is known: the next
    /// segment's first, or the entries this process appended).
    fn map_unreadable(&mut self, i: usize, u: Unreadable) -> Result<()> {
        let holes = match u.len {
            Some(len) => vec![Hole {
                from: u.index,
                to: u.index + 1,
                offset: u.offset,
                end_offset: u.offset + len,
            }],
            None => {
                if i + 1 == self.segments.len() {
                    self.writer.flush().context("journal: writing a segment")?;
                }
                let seg = &self.segments[i];
                let data = std::fs::read(&seg.path)
                    .with_context(|| format!("reading {}", seg.path.display()))?;
                let data = &data[..(seg.bytes as usize).min(data.len())];
                let m = map_segment(data, seg.first, Some(seg.end()), None);
                m.holes
            }
        };
        let seg = &mut self.segments[i];
        for h in holes {
            if seg.holes.iter().any(|k| k.from < h.to && h.from < k.to) {
                continue;
            }
            tracing::error!(
                segment = %seg.path.display(),
                from = h.from,
                to = h.to,
                offset = h.offset,
                bytes = h.end_offset - h.offset,
                "journal: corrupt entries; readers skip them (journal-corrupt)"
            );
            self.corrupt.push(Corruption {
                segment: seg.path.clone(),
                from: h.from,
                to: h.to,
                offset: h.offset,
                bytes: h.end_offset - h.offset,
                why: if u.len.is_some() {
                    "entry does not decode".into()
                } else {
                    "corrupt entry".into()
                },
            });
            seg.holes.push(h);
        }
        seg.holes.sort_by_key(|h| h.from);
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
        self.writer.flush().context("journal: writing a segment")?;
        let (mut reader, mut at) = (None, self.first_index());
        let end = self.next_index;
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
        (self.segments.len() > 1)
            .then(|| self.segments.front().map(|s| (s.first, s.end())))
            .flatten()
    }

    /// Entries of the oldest segment from `from` on (before it is dropped).
    pub fn scan_oldest(&mut self, from: u64) -> Result<Vec<(u64, Entry)>> {
        let end = self.segments.front().expect("a segment").end();
        Ok(self
            .read_until(&mut None, from, usize::MAX, u64::MAX, end)?
            .0)
    }

    pub fn drop_oldest(&mut self) -> Result<()> {
        if self.segments.len() < 2 {
            return Ok(());
        }
        let seg = self.segments.pop_front().expect("checked");
        self.total_bytes -= seg.bytes;
        std::fs::remove_file(&seg.path).with_context(|| format!("removing {}", seg.path.display()))
    }

    /// Deletes segments every sink has written past.
    pub fn compact(&mut self, confirmed_by_all: u64) -> Result<()> {
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.end() <= confirmed_by_all)
        {
            self.drop_oldest()?;
        }
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

fn segment_bytes(s: &Settings) -> u64 {
    (s.max_bytes / 8).clamp(256 << 10, 64 << 20)
}

/// Temp file, fsync, rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_data()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
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
        let seg = j.segments.back().unwrap().path.clone();
        drop(j);
        let len = std::fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
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

    #[test]
    fn compaction_and_overflow_drop_whole_oldest_segments() {
        let dir = scratch("bounds");
        let mut j = Journal::open(settings(&dir, 1 << 20)).unwrap();
        for seq in 0..50_000 {
            j.append_record(&rec("a", seq)).unwrap();
        }
        j.sync().unwrap();
        assert!(j.segments.len() > 2);
        let (first, end) = j.oldest().unwrap();
        assert_eq!(j.scan_oldest(first).unwrap().len() as u64, end - first);
        j.compact(end).unwrap();
        assert_eq!(j.first_index(), end);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Byte offsets of every entry in a segment file.
    fn offsets(path: &Path) -> Vec<u64> {
        let data = std::fs::read(path).unwrap();
        let (mut off, mut out) = (0usize, Vec::new());
        while off < data.len() {
            out.push(off as u64);
            off += entry_at(&data, off).unwrap();
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
        let seg = j.segments.back().unwrap().path.clone();
        // Entry 401 is b/200: a byte inside its payload.
        flip(&seg, offsets(&seg)[401] + 12);
        let (got, _) = j.read_with(&mut None, 0, usize::MAX, u64::MAX).unwrap();
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
        let (got, _) = j.read_with(&mut None, 500, 10, u64::MAX).unwrap();
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
        let seg = j.segments.back().unwrap().path.clone();
        // The length field of entry 300: skipping by it leads nowhere.
        flip(&seg, offsets(&seg)[300] + 2);
        let (got, _) = j.read_with(&mut None, 0, usize::MAX, u64::MAX).unwrap();
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
        let (got, _) = j.read_with(&mut None, 1000, 10, u64::MAX).unwrap();
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
        let seg = j.segments.back().unwrap().path.clone();
        let at = offsets(&seg);
        // Only the sum of the two runs' lengths is known: the entries
        // between them go with them, and the gap names all of it.
        flip(&seg, at[30_000] + 2);
        flip(&seg, at[60_000] + 2);
        let (got, _) = j.read_with(&mut None, 0, usize::MAX, u64::MAX).unwrap();
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
        assert!(j.segments.len() > 2);
        let (first, end) = j.oldest().unwrap();
        let seg = j.segments.front().unwrap().path.clone();
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
        let (got, _) = j.read_with(&mut None, first, usize::MAX, u64::MAX).unwrap();
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
            let (got, bytes) = j.read_with(&mut reader, from, 1024, bound).unwrap();
            assert!(!got.is_empty());
            assert!(bytes <= bound, "a batch of {bytes} bytes, over {bound}");
            assert_eq!(got[0].0, from, "batches follow each other exactly");
            from = got.last().unwrap().0 + 1;
            batches += 1;
        }
        assert!(batches >= 200 * (64 << 10) / bound, "{batches} batches");
        // A record larger than the bound still goes, alone.
        let (got, bytes) = j.read_with(&mut None, 0, 1024, 1000).unwrap();
        assert_eq!(got.len(), 1);
        assert!(bytes > 64 << 10);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
