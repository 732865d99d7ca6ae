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
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::segment::{
    check_entry_at, find_next_entry, read_entry, write_entry, ReadOutcome, ENTRY_HEADER,
};
use weir_protocol::{NoticeCause, RecordBody, RecordBodyRef};

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
    /// `spool.fsync_ms`: the longest the idle sync thread sleeps.
    pub fsync_interval: Duration,
}

impl Settings {
    fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(256 << 10, 64 << 20)
    }
}

struct Segment {
    first: u64,
    count: u64,
    /// Bytes on disk (readable entries and any corrupt stretch).
    bytes: u64,
    path: PathBuf,
    modified: SystemTime,
    /// Corrupt stretches found at open, in order; the reader jumps them.
    holes: Vec<Hole>,
}

impl Segment {
    fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// A stretch of a segment with no readable entry in it (found at open):
/// bytes that fail their CRC or do not decode, between readable entries.
#[derive(Debug, Clone)]
struct Hole {
    /// The first entry index it takes the place of, and how many it takes.
    index: u64,
    slots: u64,
    /// Byte offsets in the segment: where it starts, where entries resume.
    offset: u64,
    resume: u64,
    /// The damaged entry's own length field was intact (one entry lost, the
    /// entries after it keep the indexes they were written with), or the
    /// slot count is fixed by the next segment's name.
    exact: bool,
    why: &'static str,
}

struct Reader {
    segment_first: u64,
    file: BufReader<File>,
    index: u64,
}

/// A gap notice waiting for the reader to reach `at` (where the records it
/// names were), so it follows the records before it and precedes the rest.
type Notice = (String, u64, u64, NoticeCause);

pub struct Spool {
    settings: Settings,
    segments: VecDeque<Segment>,
    writer: BufWriter<File>,
    next_index: u64,
    durable_index: u64,
    /// The durable index recorded in the last saved state: the reader's limit.
    saved_durable: u64,
    /// Framed bytes of the readable entries at or after `read_index`:
    /// exact (counted from entry positions at open, then per append, read
    /// and eviction), because byte-stream sources stop reading above a
    /// bound of it and only start again when it falls.
    unsent_bytes: u64,
    total_bytes: u64,
    streams: BTreeMap<String, StreamState>,
    read_index: u64,
    reader: Option<Reader>,
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
    /// The sync thread waits for work on `sync_wake`: an append or a moved
    /// sent position must wake it (only then, so appends cost no wake-up
    /// while it is busy).
    sync_idle: bool,
    sync_wake: Arc<std::sync::Condvar>,
    /// The sync thread should end (`SharedSpool::stop_sync`).
    sync_stop: bool,
    /// Closed segments whose final fsync is still to run.
    retired_files: Vec<File>,
    counters: Arc<Counters>,
    scratch: Vec<u8>,
}

fn segments_dir(root: &Path) -> PathBuf {
    root.join("segments")
}

fn segment_path(root: &Path, first: u64) -> PathBuf {
    segments_dir(root).join(format!("{first:020}.seg"))
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

/// What a scan meets, in segment order.
enum Seen<'a> {
    Entry {
        index: u64,
        size: u64,
        head: EntryHead<'a>,
        payload: &'a [u8],
    },
    Hole(&'a Hole),
}

/// What a scan of one segment found.
struct Scan {
    /// Entry indexes the segment covers (readable entries and hole slots).
    count: u64,
    /// Framed bytes of the readable entries.
    good_bytes: u64,
    /// Where the readable part ends: the file length, or where a torn tail starts.
    end: u64,
    torn: Option<&'static str>,
    holes: Vec<Hole>,
}

/// Scans a segment: every readable entry (CRC and head checked) and every
/// corrupt stretch between them goes to `visit`, in order. After a bad
/// entry, reading resumes at the next whole entry (the damaged entry's own
/// length when that lands on one, else the next offset where an entry of a
/// stream in `known` starts with a matching CRC). Bad bytes that no
/// readable entry follows are a torn tail (`torn`). `expected` is the
/// entry count the next segment's name fixes (every segment but the
/// newest): entries missing from it become a trailing hole.
fn scan_segment(
    path: &Path,
    first: u64,
    expected: Option<u64>,
    known: &mut HashSet<String>,
    mut visit: impl FnMut(Seen<'_>),
) -> Result<Scan> {
    let data =
        std::fs::read(path).with_context(|| format!("reading spool segment {}", path.display()))?;
    let readable = |at: usize| -> std::result::Result<(&[u8], EntryHead<'_>), &'static str> {
        let payload = check_entry_at(&data[at..])?.ok_or("end of segment")?;
        let head = head_of(payload).ok_or("entry does not decode")?;
        Ok((payload, head))
    };
    let mut scan = Scan {
        count: 0,
        good_bytes: 0,
        end: data.len() as u64,
        torn: None,
        holes: Vec::new(),
    };
    let mut pos = 0usize;
    let mut index = first;
    while pos < data.len() {
        match readable(pos) {
            Ok((payload, head)) => {
                let size = ENTRY_HEADER + payload.len();
                if !known.contains(head.stream) {
                    known.insert(head.stream.to_string());
                }
                visit(Seen::Entry {
                    index,
                    size: size as u64,
                    head,
                    payload,
                });
                scan.good_bytes += size as u64;
                index += 1;
                pos += size;
            }
            Err(why) => {
                let claimed = data
                    .get(pos..pos + 4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
                let by_length = claimed
                    .and_then(|len| pos.checked_add(ENTRY_HEADER + len))
                    .filter(|&next| next < data.len() && readable(next).is_ok());
                let (next, exact) = match by_length {
                    Some(next) => (Some(next), true),
                    None => (
                        find_next_entry(&data, pos + 1, |p| {
                            head_of(p).is_some_and(|h| known.contains(h.stream))
                        }),
                        false,
                    ),
                };
                let Some(next) = next else {
                    scan.torn = Some(why);
                    scan.end = pos as u64;
                    break;
                };
                let hole = Hole {
                    index,
                    slots: 1,
                    offset: pos as u64,
                    resume: next as u64,
                    exact,
                    why,
                };
                visit(Seen::Hole(&hole));
                scan.holes.push(hole);
                index += 1;
                pos = next;
            }
        }
    }
    if let Some(expected) = expected {
        let seen = index - first;
        if seen > expected {
            bail!(
                "spool.path: segment {} holds {seen} entries where the next segment's name allows {expected}; the spool was altered, move it away",
                path.display()
            );
        }
        if seen < expected {
            // A torn or short segment that is not the newest: the entries
            // it lacks are a hole up to its end.
            let hole = Hole {
                index,
                slots: expected - seen,
                offset: scan.end,
                resume: data.len() as u64,
                exact: true,
                why: scan.torn.unwrap_or("entries missing at the end"),
            };
            visit(Seen::Hole(&hole));
            scan.holes.push(hole);
            index = first + expected;
        }
        scan.torn = None;
        scan.end = data.len() as u64;
    }
    scan.count = index - first;
    Ok(scan)
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

/// Reads a segment whose holes are known (found at open): every readable
/// entry and every hole goes to `visit`, in order; an entry that no longer
/// reads is an error.
fn walk_segment(seg: &Segment, mut visit: impl FnMut(Seen<'_>)) -> Result<()> {
    let data = std::fs::read(&seg.path)
        .with_context(|| format!("reading spool segment {}", seg.path.display()))?;
    let mut holes = seg.holes.iter().peekable();
    let (mut pos, mut index) = (0usize, seg.first);
    while index < seg.end() {
        if let Some(hole) = holes.next_if(|h| h.index == index) {
            visit(Seen::Hole(hole));
            index += hole.slots;
            pos = hole.resume as usize;
            continue;
        }
        let payload = match check_entry_at(data.get(pos..).unwrap_or_default()) {
            Ok(Some(p)) => p,
            Ok(None) => bail!(
                "spool: segment {} ends before entry {index}",
                seg.path.display()
            ),
            Err(why) => bail!(
                "spool: entry {index} unreadable ({why}) in {}",
                seg.path.display()
            ),
        };
        let Some(head) = head_of(payload) else {
            bail!(
                "spool: entry {index} in {} does not decode",
                seg.path.display()
            );
        };
        let size = ENTRY_HEADER + payload.len();
        visit(Seen::Entry {
            index,
            size: size as u64,
            head,
            payload,
        });
        index += 1;
        pos += size;
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

fn list_segments(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = segments_dir(root);
    let mut found = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(first) = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            tracing::warn!(file = %e.path().display(), "spool: ignoring a file that is not a segment");
            continue;
        };
        found.push((first, e.path()));
    }
    found.sort();
    Ok(found)
}

/// Opens a segment for reading at entry `index`: walks the entries before
/// it, each checked by its CRC, and jumps the holes found at open.
fn open_reader_at(seg: &Segment, index: u64, buf: &mut Vec<u8>) -> Result<Reader> {
    let file = File::open(&seg.path)
        .with_context(|| format!("spool: opening segment {}", seg.path.display()))?;
    let mut file = BufReader::with_capacity(1 << 20, file);
    let mut at = seg.first;
    while at < index {
        if let Some(hole) = seg.holes.iter().find(|h| h.index == at) {
            file.seek(SeekFrom::Start(hole.resume))?;
            at += hole.slots;
            continue;
        }
        match read_entry(&mut file, buf)? {
            ReadOutcome::Entry => at += 1,
            other => bail!(
                "spool: entry {at} unreadable ({other:?}) in {}; a restart skips unreadable entries and announces their records as sender-spool-corrupt",
                seg.path.display()
            ),
        }
    }
    if at != index {
        bail!(
            "spool: bug: read position {index} is inside a hole of {}",
            seg.path.display()
        );
    }
    Ok(Reader {
        segment_first: seg.first,
        file,
        index,
    })
}

impl Spool {
    pub fn open(settings: Settings, counters: Arc<Counters>) -> Result<Self> {
        let root = settings.path.clone();
        std::fs::create_dir_all(segments_dir(&root))
            .with_context(|| format!("spool.path: cannot create {}", root.display()))?;
        std::fs::create_dir_all(root.join("resend"))?;
        let state_path = root.join("state.json");
        let mut state: State = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| {
                format!("spool.path: {} is corrupt; move it away to rebuild sequence state from the segments", state_path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", state_path.display())),
        };
        let listed = list_segments(&root)?;
        let saved_streams = state.streams.clone();
        let mut known: HashSet<String> = state.streams.keys().cloned().collect();
        let mut continuity = Continuity::default();
        let mut damaged = false;
        let mut segments = VecDeque::new();
        // Readable bytes of each segment, for the exact unsent count.
        let mut good_bytes = Vec::new();
        let mut expected_first = listed.first().map_or(0, |(f, _)| *f);
        for (i, (first, path)) in listed.iter().enumerate() {
            if *first != expected_first {
                bail!(
                    "spool.path: segment {} should start at entry {expected_first}; the spool was altered, move it away to start afresh",
                    path.display()
                );
            }
            let expected = match listed.get(i + 1) {
                Some((next, _)) => Some(next.checked_sub(*first).with_context(|| {
                    format!(
                        "spool.path: segment names out of order at {}",
                        path.display()
                    )
                })?),
                None => None,
            };
            // Sequence numbers are rebuilt from what the state file has not
            // accounted for (all of it again below if there is damage).
            let (streams, durable) = (&mut state.streams, state.durable_index);
            let scan = scan_segment(path, *first, expected, &mut known, |seen| {
                if let Seen::Entry { index, head, .. } = seen {
                    if index >= durable {
                        see_seq(streams, head.stream, head.seq);
                    }
                }
            })?;
            for hole in &scan.holes {
                tracing::warn!(
                    segment = %path.display(),
                    index = hole.index,
                    offset = hole.offset,
                    bytes = hole.resume - hole.offset,
                    "spool: unreadable bytes in the middle of a segment ({}); skipped, the records they held are announced as sender-spool-corrupt",
                    hole.why
                );
            }
            let mut size = std::fs::metadata(path)?.len();
            if let Some(why) = scan.torn {
                tracing::warn!(
                    segment = %path.display(),
                    kept_entries = scan.count,
                    truncated_bytes = size - scan.end,
                    "spool: torn tail after a crash ({why}); truncated to the last whole record"
                );
                OpenOptions::new()
                    .write(true)
                    .open(path)?
                    .set_len(scan.end)?;
                size = scan.end;
                damaged = true;
            }
            let modified = std::fs::metadata(path)?
                .modified()
                .unwrap_or(SystemTime::now());
            good_bytes.push(scan.good_bytes);
            segments.push_back(Segment {
                first: *first,
                count: scan.count,
                bytes: size,
                path: path.clone(),
                modified,
                holes: scan.holes,
            });
            expected_first = first + scan.count;
        }
        if damaged || segments.iter().any(|s| !s.holes.is_empty()) {
            // Damage: measure what it took by the sequence numbers each
            // stream skips across it, and rebuild every stream's next
            // number from every entry (a hole's slot count may be a guess).
            for seg in &segments {
                let streams = &mut state.streams;
                walk_segment(seg, |seen| match seen {
                    Seen::Entry { index, head, .. } => {
                        continuity.see(head.stream, head.seq, index);
                        see_seq(streams, head.stream, head.seq);
                    }
                    Seen::Hole(hole) => continuity.holes.push(hole.index),
                })?;
            }
            continuity.finish(&state.streams);
        }
        let next_index = expected_first;
        let oldest = segments.front().map_or(0, |s| s.first);
        let mut read_index = state.sent_index.clamp(oldest, next_index);
        // Never start inside a hole; and after a hole whose slot count is a
        // guess, the indexes after it may not be the ones `sent_index`
        // counted: start at the hole (the receiver drops what it has).
        if let Some(seg) = segments
            .iter()
            .find(|s| s.first <= read_index && read_index < s.end())
        {
            if let Some(hole) = seg.holes.iter().find(|h| {
                (h.index <= read_index && read_index < h.index + h.slots)
                    || (!h.exact && h.index < read_index)
            }) {
                read_index = hole.index;
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
        // Exact unsent bytes: whole segments after the read position, and
        // the readable entries at or after it in the segment holding it.
        let mut unsent_bytes = 0;
        for (seg, good) in segments.iter().zip(&good_bytes) {
            if seg.first >= read_index {
                unsent_bytes += good;
            } else if seg.end() > read_index {
                walk_segment(seg, |seen| {
                    if let Seen::Entry { index, size, .. } = seen {
                        if index >= read_index {
                            unsent_bytes += size;
                        }
                    }
                })?;
            }
        }
        // A segment with damage stays as it is: new entries go to a new
        // one, so the next segment's name fixes the damaged one's count.
        if segments
            .back()
            .is_none_or(|s| s.bytes >= settings.segment_bytes() || !s.holes.is_empty())
        {
            let path = segment_path(&root, next_index);
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            segments.push_back(Segment {
                first: next_index,
                count: 0,
                bytes: 0,
                path,
                modified: SystemTime::now(),
                holes: Vec::new(),
            });
        }
        let active = segments.back().expect("a segment");
        let file = OpenOptions::new().append(true).open(&active.path)?;
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        tracing::info!(
            path = %root.display(),
            entries = next_index - oldest,
            bytes = total_bytes,
            unsent = next_index - read_index,
            unsent_bytes,
            streams = state.streams.len(),
            "spool opened"
        );
        let mut spool = Spool {
            settings,
            segments,
            writer: BufWriter::with_capacity(256 << 10, file),
            next_index,
            durable_index: next_index,
            saved_durable: 0,
            unsent_bytes,
            total_bytes,
            streams: state.streams,
            read_index,
            reader: None,
            dropped: VecDeque::new(),
            pending: pending.into(),
            sent_index: read_index,
            state_dirty: true,
            last_state_save: Instant::now(),
            sync_wanted: false,
            sync_idle: false,
            sync_wake: Arc::new(std::sync::Condvar::new()),
            sync_stop: false,
            retired_files: Vec::new(),
            counters,
            scratch: Vec::new(),
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
        let mut payload = std::mem::take(&mut self.scratch);
        let mut result = Ok(());
        for body in bodies {
            payload.clear();
            payload = postcard::to_extend(&EntryRef { stream, seq, body }, payload)
                .expect("postcard into Vec");
            // A large record (a stream chunk) goes to the OS at once, so a
            // crash of this process cannot lose it; small ones when the sync
            // thread, woken by the append, starts the fsync that covers them.
            let big = payload.len() >= 8192;
            let written = write_entry(&mut self.writer, &payload).and_then(|n| {
                if big {
                    self.writer.flush()?;
                }
                Ok(n)
            });
            if let Err(e) = written {
                result = Err(anyhow::Error::new(e).context(format!(
                    "spool: cannot write to {}",
                    self.settings.path.display()
                )));
                break;
            }
            let size = (ENTRY_HEADER + payload.len()) as u64;
            seq += 1;
            let seg = self.segments.back_mut().expect("active segment");
            seg.count += 1;
            seg.bytes += size;
            let segment_full = seg.bytes >= self.settings.segment_bytes();
            self.total_bytes += size;
            self.unsent_bytes += size;
            self.next_index += 1;
            if segment_full {
                self.segments.back_mut().expect("active segment").modified = SystemTime::now();
                if let Err(e) = self.rotate() {
                    result = Err(e);
                    break;
                }
            }
        }
        self.scratch = payload;
        // Whatever was written is numbered, even if a later write failed.
        self.streams
            .get_mut(stream)
            .expect("created above")
            .next_seq = seq;
        if seq > first {
            self.segments.back_mut().expect("active segment").modified = SystemTime::now();
            self.state_dirty = true;
        }
        result?;
        self.enforce_bounds()?;
        self.wake_sync();
        Ok(seq.saturating_sub(1))
    }

    /// Wakes the sync thread if it waits for work (see `sync_idle`).
    fn wake_sync(&mut self) {
        if std::mem::take(&mut self.sync_idle) {
            self.sync_wake.notify_one();
        }
    }

    fn rotate(&mut self) -> Result<()> {
        let path = segment_path(&self.settings.path, self.next_index);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let old = std::mem::replace(&mut self.writer, BufWriter::with_capacity(256 << 10, file));
        // The closed segment still needs its fsync: the next sync job does it.
        self.retired_files.push(
            old.into_inner()
                .map_err(|e| e.into_error())
                .context("spool: writing a segment")?,
        );
        self.sync_wanted = true;
        self.segments.push_back(Segment {
            first: self.next_index,
            count: 0,
            bytes: 0,
            path,
            modified: SystemTime::now(),
            holes: Vec::new(),
        });
        Ok(())
    }

    /// True when an fsync (and state save) should run now: at once for
    /// anything appended and not yet fsynced (only the sync thread runs
    /// them, one at a time, so this is the group commit's "none running"),
    /// and within `STATE_INTERVAL` for a moved sent position.
    fn sync_due(&self) -> bool {
        self.sync_wanted
            || self.durable_index != self.next_index
            || (self.state_dirty && self.last_state_save.elapsed() >= STATE_INTERVAL)
    }

    /// How long the idle sync thread may sleep: until a moved sent
    /// position is due to be saved, else `fsync_ms` (it then ages out
    /// segments, which appends also do; appends and a moved sent position
    /// wake it earlier).
    fn sync_idle_wait(&self) -> Duration {
        if self.state_dirty {
            STATE_INTERVAL.saturating_sub(self.last_state_save.elapsed())
        } else {
            self.settings.fsync_interval
        }
    }

    /// Writes buffered entries to the OS and returns the fsync work for
    /// everything appended so far, to run without holding the spool.
    fn prepare_sync(&mut self) -> Result<SyncJob> {
        self.writer.flush().context("spool: writing a segment")?;
        let mut files: Vec<File> = self.retired_files.drain(..).collect();
        files.push(
            self.writer
                .get_ref()
                .try_clone()
                .context("spool: duplicating a segment handle")?,
        );
        let state = State {
            streams: self.streams.clone(),
            durable_index: self.next_index,
            sent_index: self.sent_index,
        };
        self.sync_wanted = false;
        Ok(SyncJob {
            files,
            up_to: self.next_index,
            sent: self.sent_index,
            state: serde_json::to_vec_pretty(&state).expect("json"),
            path: self.settings.path.join("state.json"),
        })
    }

    fn finish_sync(&mut self, job: &SyncJob) {
        self.durable_index = self.durable_index.max(job.up_to);
        self.saved_durable = self.saved_durable.max(job.up_to);
        self.last_state_save = Instant::now();
        self.state_dirty = self.next_index != job.up_to || self.sent_index != job.sent;
        self.counters
            .spool_bytes
            .store(self.total_bytes, Ordering::Relaxed);
        Counters::add(&self.counters.spool_fsyncs, 1);
    }

    /// Fsyncs everything appended and saves state, holding the spool
    /// (start, tests); the running sender uses `SharedSpool::tick`.
    pub fn sync(&mut self) -> Result<()> {
        let job = self.prepare_sync()?;
        job.run()?;
        self.finish_sync(&job);
        Ok(())
    }

    fn enforce_bounds(&mut self) -> Result<()> {
        loop {
            let too_big = self.total_bytes > self.settings.max_bytes;
            let too_old = self.segments.front().is_some_and(|s| {
                s.count > 0
                    && s.modified
                        .elapsed()
                        .is_ok_and(|age| age > self.settings.max_age)
            });
            if !(too_big || too_old) {
                return Ok(());
            }
            if self.segments.len() < 2 {
                if self.segments.back().is_some_and(|s| s.count > 0) {
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
        let seg = self.segments.pop_front().expect("checked");
        if self.read_index < seg.end() {
            // Records never sent: find their ranges before they go.
            let from_index = self.read_index.max(seg.first);
            let mut ranges: Vec<(String, u64, u64)> = Vec::new();
            let (mut dropped, mut dropped_bytes) = (0u64, 0u64);
            walk_segment(&seg, |seen| {
                let Seen::Entry {
                    index, size, head, ..
                } = seen
                else {
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
            self.read_index = seg.end();
            self.reader = None;
        }
        self.total_bytes -= seg.bytes;
        std::fs::remove_file(&seg.path)
            .with_context(|| format!("removing {}", seg.path.display()))?;
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
        let mut buf = std::mem::take(&mut self.scratch);
        let result = self.read_records(out, max, max_bytes, &mut buf);
        self.scratch = buf;
        result
    }

    fn read_records(
        &mut self,
        out: &mut Batch,
        max: usize,
        max_bytes: usize,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        let mut n = 0;
        // Stop where damaged records were, so their notice goes first.
        let limit = match self.pending.front() {
            Some((at, _)) => self.saved_durable.min(*at),
            None => self.saved_durable,
        };
        while n < max && out.bytes() < max_bytes && self.read_index < limit {
            let Some(seg) = self
                .segments
                .iter()
                .find(|s| s.first <= self.read_index && self.read_index < s.end())
            else {
                break;
            };
            let seg_first = seg.first;
            if let Some(hole) = seg.holes.iter().find(|h| h.index == self.read_index) {
                // Announced at open (its notice went out above); jump it.
                self.read_index += hole.slots;
                if let Some(r) = self
                    .reader
                    .as_mut()
                    .filter(|r| r.segment_first == seg_first)
                {
                    r.file
                        .seek(SeekFrom::Start(hole.resume))
                        .with_context(|| format!("spool: seeking in {}", seg.path.display()))?;
                    r.index = self.read_index;
                }
                continue;
            }
            if self
                .reader
                .as_ref()
                .is_none_or(|r| r.segment_first != seg_first || r.index != self.read_index)
            {
                self.reader = Some(open_reader_at(seg, self.read_index, buf)?);
            }
            let seg_path = seg.path.clone();
            let reader = self.reader.as_mut().expect("opened");
            match read_entry(&mut reader.file, buf)? {
                ReadOutcome::Entry => {}
                other => bail!(
                    "spool: entry {} unreadable ({other:?}) in {}; a restart skips unreadable entries and announces their records as sender-spool-corrupt",
                    self.read_index,
                    seg_path.display()
                ),
            }
            let size = (ENTRY_HEADER + buf.len()) as u64;
            debug_assert!(self.unsent_bytes >= size, "unsent bytes are exact");
            self.unsent_bytes = self.unsent_bytes.saturating_sub(size);
            self.read_index += 1;
            reader.index += 1;
            n += 1;
            // The body is checked in place (RecordBodyRef: nothing
            // allocated or copied) and goes on as bytes.
            let read = postcard::take_from_bytes::<EntryHead>(buf)
                .map_err(|e| e.to_string())
                .and_then(|(head, body)| {
                    RecordBodyRef::parse(body)
                        .map(|_| (head, body))
                        .map_err(|e| e.to_string())
                });
            match read {
                Ok((head, body)) => out.push(self.read_index - 1, head.stream, head.seq, body),
                Err(e) => {
                    // Its CRC matched, so the bytes are what was written;
                    // announce the one record and go on.
                    let Some(head) = head_of(buf) else {
                        bail!(
                            "spool: entry {} in {} does not decode ({e})",
                            self.read_index - 1,
                            seg_path.display()
                        );
                    };
                    tracing::warn!(stream = head.stream, seq = head.seq,
                        "spool: a record does not decode ({e}); announced to the receiver as sender-spool-corrupt");
                    Counters::add(&self.counters.spool_corrupt_records, 1);
                    out.items.push(Item::Dropped {
                        stream: head.stream.to_string(),
                        from: head.seq,
                        to: head.seq,
                        cause: NoticeCause::SpoolCorrupt,
                    });
                }
            }
        }
        if self.read_index == self.next_index && self.unsent_bytes != 0 {
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
        self.sync_wanted |= self.durable_index != self.next_index;
        self.dropped.is_empty() && self.pending.is_empty() && self.read_index == self.next_index
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

/// An fsync of spool segments and the state that covers them.
struct SyncJob {
    files: Vec<File>,
    up_to: u64,
    sent: u64,
    state: Vec<u8>,
    path: PathBuf,
}

impl SyncJob {
    fn run(&self) -> Result<()> {
        for f in &self.files {
            f.sync_data().context("spool: fsync of a segment")?;
        }
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(&self.state)?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))
    }
}

/// Approximate memory an entry holds (for bounds on copies kept).
pub fn entry_size(e: &Entry) -> usize {
    64 + e.stream.len()
        + match &e.body {
            RecordBody::Bytes(c) => c.data.len(),
            RecordBody::Message(m) => m.payload.len() + m.topic.len(),
            RecordBody::Log(l) => l.text.len() + l.host.len() + l.app.len(),
            RecordBody::Point(p) => p.tag.len() + 16,
        }
}

/// Reads retained records of a stream from a spool directory (also used by
/// `weir-sender resend`, which runs while the sender holds the spool).
pub fn find_in(root: &Path, stream: &str, from: u64, to: u64) -> Result<Vec<Entry>> {
    let mut found = Vec::new();
    let mut known = HashSet::from([stream.to_string()]);
    for (first, path) in list_segments(root)? {
        // Evicted while we looked: skip it.
        let _ = scan_segment(&path, first, None, &mut known, |seen| {
            if let Seen::Entry { head, payload, .. } = seen {
                if head.stream == stream && (from..=to).contains(&head.seq) {
                    if let Ok(e) = postcard::from_bytes::<Entry>(payload) {
                        found.push(e);
                    }
                }
            }
        });
    }
    Ok(found)
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
        let at = spool.next_index;
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
            }
            if let Err(e) = spool.writer.flush() {
                self.fail(anyhow::Error::new(e).context("spool: writing a segment"));
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
        if let Err(e) = job.run() {
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
    use weir_protocol::Chunk;

    fn settings(dir: &Path, max_bytes: u64) -> Settings {
        Settings {
            path: dir.to_path_buf(),
            max_bytes,
            max_age: Duration::from_secs(3600),
            fsync_interval: Duration::from_millis(10),
        }
    }

    fn body(n: usize) -> RecordBody {
        RecordBody::Bytes(Chunk {
            data: vec![7; n],
            end: false,
        })
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
        let seg = s.segments.back().unwrap().path.clone();
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
        assert!(s.total_bytes <= 1 << 20);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Byte offset and framed size of every entry of a segment file.
    fn entry_offsets(path: &Path) -> Vec<(usize, usize)> {
        let data = std::fs::read(path).unwrap();
        let mut at = 0;
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
        let segments: Vec<PathBuf> = s.segments.iter().map(|g| g.path.clone()).collect();
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
        let seg = s.segments.back().unwrap().path.clone();
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
        assert!(s.segments.len() >= 2);
        let oldest = s.segments.front().unwrap().path.clone();
        let count = s.segments.front().unwrap().count;
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
        let seg = s.segments.back().unwrap().path.clone();
        drop(s);
        // Stream "a", seq 5, then a body tag no RecordBody has.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        write_entry(&mut f, &[1, b'a', 5, 200, 1, 2, 3]).unwrap();
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
