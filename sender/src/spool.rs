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
//! never block a source on the link: they go to the OS at once and are
//! fsynced on a bound (`fsync_bytes` or `fsync_ms`); the reader only reads
//! fsynced entries, so nothing sent can vanish in a power loss and have its
//! sequence number reused. When the spool passes `max_bytes` or its oldest
//! segment passes `max_age`, the oldest segment is deleted; records in it
//! that were not sent yet are counted, logged with their sequence ranges and
//! announced over the link as gap notices. Sent segments stay until then, so
//! an operator can resend a retained range. A torn tail (power loss
//! mid-write) is found by its CRC and truncated on open.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::segment::{read_entry, write_entry, ReadOutcome, ENTRY_HEADER};
use weir_protocol::{NoticeCause, RecordBody};

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

/// What the link thread reads, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Record {
        index: u64,
        entry: Entry,
    },
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
    pub fsync_bytes: u64,
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
    bytes: u64,
    path: PathBuf,
    modified: SystemTime,
}

impl Segment {
    fn end(&self) -> u64 {
        self.first + self.count
    }
}

struct Reader {
    segment_first: u64,
    file: BufReader<File>,
    index: u64,
}

pub struct Spool {
    settings: Settings,
    segments: VecDeque<Segment>,
    writer: BufWriter<File>,
    next_index: u64,
    durable_index: u64,
    /// The durable index recorded in the last saved state: the reader's limit.
    saved_durable: u64,
    /// Bytes of entries appended and not yet read (or dropped).
    unsent_bytes: u64,
    unsynced_bytes: u64,
    last_sync: Instant,
    total_bytes: u64,
    streams: BTreeMap<String, StreamState>,
    read_index: u64,
    reader: Option<Reader>,
    dropped: VecDeque<(String, u64, u64, NoticeCause)>,
    /// Ranges a damaged tail lost, announced once the reader reaches
    /// `lost_at` (where they were), so they follow the surviving records.
    lost: VecDeque<(String, u64, u64, NoticeCause)>,
    lost_at: u64,
    sent_index: u64,
    state_dirty: bool,
    last_state_save: Instant,
    /// The fsync bound was reached: the ticker should sync now.
    sync_wanted: bool,
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

/// Scans a segment: the number of good entries and the byte length they
/// take, the reason it stopped early if it did, and each decoded entry if
/// `decode_from` is given (entries at or after that global index).
struct Scan {
    count: u64,
    good_bytes: u64,
    torn: Option<&'static str>,
    entries: Vec<(u64, Entry)>,
    /// Framed size of each decoded entry.
    sizes: Vec<u64>,
}

fn scan_segment(path: &Path, first: u64, decode_from: Option<u64>) -> Result<Scan> {
    let file =
        File::open(path).with_context(|| format!("opening spool segment {}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut scan = Scan {
        count: 0,
        good_bytes: 0,
        torn: None,
        entries: Vec::new(),
        sizes: Vec::new(),
    };
    loop {
        match read_entry(&mut r, &mut buf)? {
            ReadOutcome::End => break,
            ReadOutcome::Torn(why) => {
                scan.torn = Some(why);
                break;
            }
            ReadOutcome::Entry => {
                let index = first + scan.count;
                if decode_from.is_some_and(|from| index >= from) {
                    match postcard::from_bytes::<Entry>(&buf) {
                        Ok(e) => {
                            scan.entries.push((index, e));
                            scan.sizes.push((ENTRY_HEADER + buf.len()) as u64);
                        }
                        Err(_) => {
                            scan.torn = Some("entry does not decode");
                            break;
                        }
                    }
                }
                scan.count += 1;
                scan.good_bytes += (ENTRY_HEADER + buf.len()) as u64;
            }
        }
    }
    Ok(scan)
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
        let mut damaged = false;
        let mut segments = VecDeque::new();
        let mut expected_first = listed.first().map_or(0, |(f, _)| *f);
        for (i, (first, path)) in listed.iter().enumerate() {
            if *first != expected_first {
                bail!(
                    "spool.path: segment {} should start at entry {expected_first}; the spool was altered, move it away to start afresh",
                    path.display()
                );
            }
            let last = i + 1 == listed.len();
            // Only the newest segment can be torn; decode what the state
            // file has not accounted for to rebuild sequence numbers.
            let scan = scan_segment(path, *first, Some(state.durable_index))?;
            if let Some(why) = scan.torn {
                let size = std::fs::metadata(path)?.len();
                if !last {
                    bail!(
                        "spool.path: segment {} is corrupt before its end ({why}); move it away",
                        path.display()
                    );
                }
                tracing::warn!(
                    segment = %path.display(),
                    kept_entries = scan.count,
                    truncated_bytes = size - scan.good_bytes,
                    "spool: torn tail after a crash ({why}); truncated to the last whole record"
                );
                OpenOptions::new()
                    .write(true)
                    .open(path)?
                    .set_len(scan.good_bytes)?;
                damaged = true;
            }
            for (_, e) in &scan.entries {
                let s = state
                    .streams
                    .entry(e.stream.clone())
                    .or_insert(StreamState {
                        epoch: rand::random(),
                        next_seq: 0,
                    });
                s.next_seq = s.next_seq.max(e.seq + 1);
            }
            let modified = std::fs::metadata(path)?
                .modified()
                .unwrap_or(SystemTime::now());
            segments.push_back(Segment {
                first: *first,
                count: scan.count,
                bytes: scan.good_bytes,
                path: path.clone(),
                modified,
            });
            expected_first = first + scan.count;
        }
        let next_index = expected_first;
        // Records the saved state counted but the damaged tail lost: their
        // numbers are not reused, and the receiver is told why they are missing.
        let mut lost = VecDeque::new();
        if damaged {
            let mut surviving: BTreeMap<String, u64> = BTreeMap::new();
            for seg in &segments {
                for (_, e) in scan_segment(&seg.path, seg.first, Some(seg.first))?.entries {
                    let m = surviving.entry(e.stream).or_insert(e.seq);
                    *m = (*m).max(e.seq);
                }
            }
            for (stream, saved) in &saved_streams {
                let Some(last) = surviving.get(stream) else {
                    continue;
                };
                if last + 1 < saved.next_seq {
                    tracing::warn!(stream = %stream, from = last + 1, to = saved.next_seq - 1,
                        "spool: records lost with the damaged tail; announced to the receiver as sender-spool-damaged");
                    counters
                        .spool_damaged_records
                        .fetch_add(saved.next_seq - 1 - last, Ordering::Relaxed);
                    lost.push_back((
                        stream.clone(),
                        last + 1,
                        saved.next_seq - 1,
                        NoticeCause::SpoolDamaged,
                    ));
                }
            }
        }
        if segments
            .back()
            .is_none_or(|s| s.bytes >= settings.segment_bytes())
        {
            let path = segment_path(&root, next_index);
            File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            segments.push_back(Segment {
                first: next_index,
                count: 0,
                bytes: 0,
                path,
                modified: SystemTime::now(),
            });
        }
        let active = segments.back().expect("a segment");
        let file = OpenOptions::new().append(true).open(&active.path)?;
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let oldest = segments.front().map_or(0, |s| s.first);
        let read_index = state.sent_index.clamp(oldest, next_index);
        tracing::info!(
            path = %root.display(),
            entries = next_index - oldest,
            bytes = total_bytes,
            unsent = next_index - read_index,
            streams = state.streams.len(),
            "spool opened"
        );
        // An overestimate at start (whole segments); reads correct it.
        let unsent_bytes = segments
            .iter()
            .filter(|s| s.end() > read_index)
            .map(|s| s.bytes)
            .sum();
        let mut spool = Spool {
            settings,
            segments,
            writer: BufWriter::with_capacity(256 << 10, file),
            next_index,
            durable_index: next_index,
            saved_durable: 0,
            unsent_bytes,
            unsynced_bytes: 0,
            last_sync: Instant::now(),
            total_bytes,
            streams: state.streams,
            read_index,
            reader: None,
            dropped: VecDeque::new(),
            lost_at: next_index,
            lost,
            sent_index: read_index,
            state_dirty: true,
            last_state_save: Instant::now(),
            sync_wanted: false,
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
    pub fn append(&mut self, stream: &str, body: &RecordBody) -> Result<u64> {
        let seq = self.stream(stream).next_seq;
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        let payload = postcard::to_extend(&EntryRef { stream, seq, body }, payload)
            .expect("postcard into Vec");
        // A large record (a stream chunk) goes to the OS at once, so a crash
        // of this process cannot lose it; small ones within the sync
        // thread's 2 ms tick.
        let big = payload.len() >= 8192;
        let written = write_entry(&mut self.writer, &payload).and_then(|n| {
            if big {
                self.writer.flush()?;
            }
            Ok(n)
        });
        let size = (ENTRY_HEADER + payload.len()) as u64;
        self.scratch = payload;
        written
            .with_context(|| format!("spool: cannot write to {}", self.settings.path.display()))?;
        self.streams
            .get_mut(stream)
            .expect("created above")
            .next_seq = seq + 1;
        let seg = self.segments.back_mut().expect("active segment");
        seg.count += 1;
        seg.bytes += size;
        seg.modified = SystemTime::now();
        let segment_full = seg.bytes >= self.settings.segment_bytes();
        self.total_bytes += size;
        self.unsynced_bytes += size;
        self.unsent_bytes += size;
        self.next_index += 1;
        self.state_dirty = true;
        if self.unsynced_bytes >= self.settings.fsync_bytes {
            self.sync_wanted = true;
        }
        if segment_full {
            self.rotate()?;
        }
        self.enforce_bounds()?;
        Ok(seq)
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
        });
        Ok(())
    }

    /// True when an fsync (and state save) should run now.
    fn sync_due(&self) -> bool {
        self.sync_wanted
            || (self.durable_index != self.next_index
                && self.last_sync.elapsed() >= self.settings.fsync_interval)
            || (self.state_dirty && self.last_state_save.elapsed() >= STATE_INTERVAL)
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
        self.unsynced_bytes = 0;
        self.last_sync = Instant::now();
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
            let scan = scan_segment(&seg.path, seg.first, Some(from_index))?;
            let mut ranges: Vec<(String, u64, u64)> = Vec::new();
            for (_, e) in &scan.entries {
                match ranges
                    .iter_mut()
                    .find(|r| r.0 == e.stream && r.2 + 1 == e.seq)
                {
                    Some(r) => r.2 = e.seq,
                    None => ranges.push((e.stream.clone(), e.seq, e.seq)),
                }
            }
            let dropped = seg.end() - from_index;
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
            self.unsent_bytes = self.unsent_bytes.saturating_sub(scan.sizes.iter().sum());
            self.read_index = seg.end();
            self.reader = None;
        }
        self.total_bytes -= seg.bytes;
        std::fs::remove_file(&seg.path)
            .with_context(|| format!("removing {}", seg.path.display()))?;
        Ok(())
    }

    /// Moves up to `max` items into `out`: first any notices of dropped
    /// ranges, then fsynced records from the read position.
    pub fn read(&mut self, out: &mut Vec<Item>, max: usize) -> Result<()> {
        if self.read_index >= self.lost_at {
            self.dropped.extend(self.lost.drain(..));
        }
        while let Some((stream, from, to, cause)) = self.dropped.pop_front() {
            out.push(Item::Dropped {
                stream,
                from,
                to,
                cause,
            });
        }
        let mut buf = std::mem::take(&mut self.scratch);
        let result = self.read_records(out, max, &mut buf);
        self.scratch = buf;
        result
    }

    fn read_records(&mut self, out: &mut Vec<Item>, max: usize, buf: &mut Vec<u8>) -> Result<()> {
        let mut n = 0;
        // Stop where a damaged tail's records were, so their notice goes first.
        let limit = if self.lost.is_empty() {
            self.saved_durable
        } else {
            self.saved_durable.min(self.lost_at)
        };
        while n < max && self.read_index < limit {
            let Some(seg) = self
                .segments
                .iter()
                .find(|s| s.first <= self.read_index && self.read_index < s.end())
            else {
                break;
            };
            let (seg_first, seg_path) = (seg.first, seg.path.clone());
            if self
                .reader
                .as_ref()
                .is_none_or(|r| r.segment_first != seg_first || r.index != self.read_index)
            {
                let mut file = BufReader::with_capacity(1 << 20, File::open(&seg_path)?);
                // Skip to the read position (after a restart or eviction).
                let mut index = seg_first;
                while index < self.read_index {
                    let mut header = [0u8; ENTRY_HEADER];
                    file.read_exact(&mut header)?;
                    let len = u32::from_le_bytes(header[0..4].try_into().expect("4")) as i64;
                    file.seek_relative(len)?;
                    index += 1;
                }
                self.reader = Some(Reader {
                    segment_first: seg_first,
                    file,
                    index,
                });
            }
            let reader = self.reader.as_mut().expect("opened");
            match read_entry(&mut reader.file, buf)? {
                ReadOutcome::Entry => {}
                other => bail!(
                    "spool: entry {} unreadable ({other:?}) in {}",
                    self.read_index,
                    seg_path.display()
                ),
            }
            let entry: Entry = postcard::from_bytes(buf).context("spool: entry does not decode")?;
            self.unsent_bytes = self
                .unsent_bytes
                .saturating_sub((ENTRY_HEADER + buf.len()) as u64);
            out.push(Item::Record {
                index: self.read_index,
                entry,
            });
            self.read_index += 1;
            reader.index += 1;
            n += 1;
        }
        Ok(())
    }

    /// True when every appended record has been read.
    pub fn is_drained(&mut self) -> bool {
        self.sync_wanted |= self.durable_index != self.next_index;
        self.dropped.is_empty() && self.lost.is_empty() && self.read_index == self.next_index
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
    for (first, path) in list_segments(root)? {
        let scan = match scan_segment(&path, first, Some(first)) {
            Ok(s) => s,
            Err(_) => continue, // evicted while we looked
        };
        found.extend(
            scan.entries
                .into_iter()
                .map(|(_, e)| e)
                .filter(|e| e.stream == stream && e.seq >= from && e.seq <= to),
        );
    }
    Ok(found)
}

/// The spool shared by the sources and the link thread.
pub type Shared = Arc<SharedSpool>;

pub struct SharedSpool {
    inner: Mutex<Spool>,
    /// The first write or fsync failure: the sender stops with it.
    pub failure: Mutex<Option<String>>,
    /// Woken when the link thread reads, for flow-controlled sources.
    pub room: tokio::sync::Notify,
    /// Woken when records are appended, for the link thread.
    pub appended: std::sync::Condvar,
}

impl SharedSpool {
    pub fn new(spool: Spool) -> Shared {
        Arc::new(SharedSpool {
            inner: Mutex::new(spool),
            failure: Mutex::new(None),
            room: tokio::sync::Notify::new(),
            appended: std::sync::Condvar::new(),
        })
    }

    /// Appends for a source. A disk failure is recorded for the main loop,
    /// which stops the sender with the error: a spool that cannot write
    /// cannot promise anything.
    pub fn append(&self, stream: &str, body: &RecordBody) {
        let mut spool = self.lock();
        if let Err(e) = spool.append(stream, body) {
            self.fail(e);
        }
    }

    /// Ages out segments and, when due, fsyncs and saves state without
    /// holding the spool during the fsync (sources keep appending).
    pub fn tick(&self) {
        let job = {
            let mut spool = self.lock();
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
        self.lock().finish_sync(&job);
        self.appended.notify_all();
    }

    fn fail(&self, e: anyhow::Error) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_none() {
            tracing::error!("spool: {e:#}");
            *failure = Some(format!("{e:#}"));
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Spool> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (the link thread) until records may be readable or `wait` passes.
    pub fn wait(&self, wait: Duration) {
        let guard = self.lock();
        if guard.read_index < guard.saved_durable || !guard.dropped.is_empty() {
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
            fsync_bytes: 1 << 20,
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

    fn read_all(s: &mut Spool) -> Vec<Item> {
        s.sync().unwrap();
        s.save_state().unwrap();
        let mut out = Vec::new();
        s.read(&mut out, usize::MAX).unwrap();
        out
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
        assert!(matches!(&items[0], Item::Record { index: 4, entry } if entry.seq == 4));
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
        let mut items = read_all(&mut s);
        items.extend(read_all(&mut s));
        assert_eq!(
            items.len(),
            5,
            "four records, then the notice of the damaged one"
        );
        assert!(matches!(
            &items[4],
            Item::Dropped {
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
                Item::Dropped {
                    stream, from, to, ..
                } => dropped.push((stream, from, to)),
                Item::Record { entry, .. } => got.entry(entry.stream).or_default().push(entry.seq),
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
