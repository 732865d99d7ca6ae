//! The receiver's journal: every decoded record (and every gap the decoder
//! accounted) is appended here first, fsynced on a bound, and only then
//! handed to the sinks. Each sink confirms how far it has written; the
//! journal is compacted when every sink has passed a segment, and when it
//! passes `max_bytes` the oldest segment goes anyway: records a sink had
//! not been given yet become gaps with cause `sink-overflow:NAME`.
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
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::decoder::{Delivered, StreamPosition};
use weir_protocol::segment::{read_entry, write_entry, ReadOutcome};
use weir_protocol::RecordBody;

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

/// Runs fsyncs off the decoder thread, in order; a failure is kept for the
/// decoder thread to see (and the durable index stops moving).
fn syncer(
    jobs: std::sync::mpsc::Receiver<SyncJob>,
    root: PathBuf,
    durable: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
) {
    while let Ok(job) = jobs.recv() {
        let result = job
            .file
            .sync_data()
            .context("journal: fsync of a segment")
            .and_then(|_| write_atomically(&root.join("state.json"), &job.state));
        match result {
            Ok(()) => durable.store(job.up_to, Ordering::Release),
            Err(e) => {
                let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                f.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

pub struct Journal {
    settings: Settings,
    segments: VecDeque<Segment>,
    writer: BufWriter<File>,
    next_index: u64,
    /// Entries below this are fsynced (set by the syncer thread).
    durable: Arc<AtomicU64>,
    /// Highest index handed to the syncer.
    requested: u64,
    jobs: std::sync::mpsc::SyncSender<SyncJob>,
    sync_failure: Arc<Mutex<Option<String>>>,
    unsynced_bytes: u64,
    last_sync: Instant,
    total_bytes: u64,
    positions: BTreeMap<String, Position>,
    /// After a torn-tail repair: the positions and durable index the state
    /// file had, for when every sink is known to have written the lost entries.
    repaired: Option<(BTreeMap<String, Position>, u64)>,
    scratch: Vec<u8>,
}

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
}

/// Up to `max` entries of a segment from global index `from`: entries
/// before it are skipped by their length headers, not decoded.
fn read_from(
    reader: &mut Option<Reader>,
    path: &Path,
    first: u64,
    from: u64,
    max: usize,
    limit: u64,
) -> Result<Vec<(u64, Entry)>> {
    if reader
        .as_ref()
        .is_none_or(|r| r.first != first || r.index > from)
    {
        let file = BufReader::with_capacity(
            1 << 20,
            File::open(path).with_context(|| format!("opening {}", path.display()))?,
        );
        *reader = Some(Reader {
            first,
            file,
            index: first,
        });
    }
    let Reader { file, index, .. } = reader.as_mut().expect("opened");
    while *index < from {
        let mut header = [0u8; 8];
        if std::io::Read::read_exact(file, &mut header).is_err() {
            *reader = None;
            return Ok(Vec::new());
        }
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as i64;
        file.seek_relative(len)?;
        *index += 1;
    }
    let mut out = Vec::new();
    let mut buf = Vec::new();
    // Only fsynced entries (below `limit`) are whole; never read past them.
    while out.len() < max && *index < limit {
        match read_entry(file, &mut buf)? {
            ReadOutcome::Entry => {
                let e: Entry = postcard::from_bytes(&buf)
                    .with_context(|| format!("journal entry {index} does not decode"))?;
                out.push((*index, e));
                *index += 1;
            }
            ReadOutcome::End | ReadOutcome::Torn(_) => {
                // The position may be inside an entry: reopen next time.
                *reader = None;
                break;
            }
        }
    }
    Ok(out)
}

/// Decoded entries, count and byte length of the good prefix, and why the
/// segment ended early if it did.
type Scanned = (Vec<(u64, Entry)>, u64, u64, Option<&'static str>);

/// Entries of a segment at or after `from`, and the count and byte length
/// of its good prefix (a torn tail is where it stops).
fn scan(path: &Path, first: u64, from: u64) -> Result<Scanned> {
    let mut r = BufReader::with_capacity(
        1 << 20,
        File::open(path).with_context(|| format!("opening {}", path.display()))?,
    );
    let (mut entries, mut count, mut bytes, mut buf) = (Vec::new(), 0u64, 0u64, Vec::new());
    loop {
        match read_entry(&mut r, &mut buf)? {
            ReadOutcome::End => return Ok((entries, count, bytes, None)),
            ReadOutcome::Torn(why) => return Ok((entries, count, bytes, Some(why))),
            ReadOutcome::Entry => {
                let index = first + count;
                if index >= from {
                    match postcard::from_bytes::<Entry>(&buf) {
                        Ok(e) => entries.push((index, e)),
                        Err(_) => {
                            return Ok((entries, count, bytes, Some("entry does not decode")))
                        }
                    }
                }
                count += 1;
                bytes += (8 + buf.len()) as u64;
            }
        }
    }
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
        let mut segments = VecDeque::new();
        let mut expected = listed.first().map_or(0, |(f, _)| *f);
        for (i, (first, path)) in listed.iter().enumerate() {
            if *first != expected {
                bail!("journal.path: segment {} should start at entry {expected}; move the journal away", path.display());
            }
            let (entries, count, bytes, torn) = scan(path, *first, state.durable_index)?;
            repaired |= torn.is_some();
            if let Some(why) = torn {
                if i + 1 != listed.len() {
                    bail!(
                        "journal.path: segment {} is corrupt before its end ({why}); move it away",
                        path.display()
                    );
                }
                let size = std::fs::metadata(path)?.len();
                tracing::warn!(
                    segment = %path.display(),
                    truncated_bytes = size - bytes,
                    "journal: torn tail after a crash ({why}); truncated to the last whole record"
                );
                OpenOptions::new().write(true).open(path)?.set_len(bytes)?;
            }
            for (_, e) in entries {
                apply_position(&mut state.streams, e, false);
            }
            segments.push_back(Segment {
                first: *first,
                count,
                bytes,
                path: path.clone(),
            });
            expected = first + count;
            if torn.is_some() {
                // Entries the state file counted may be gone: rebuild every
                // position from what survives, so the decoder expects the
                // torn records again and reports them as a gap if they never
                // come back, instead of believing they were journaled.
                for seg in &segments {
                    for (_, e) in scan(&seg.path, seg.first, seg.first)?.0 {
                        apply_position(&mut state.streams, e, true);
                    }
                }
            }
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
        let durable = Arc::new(AtomicU64::new(next_index));
        let sync_failure = Arc::new(Mutex::new(None));
        // A few jobs in flight at most: each covers everything before it.
        let (jobs, rx) = std::sync::mpsc::sync_channel(4);
        {
            let (root, durable, failure) = (root.clone(), durable.clone(), sync_failure.clone());
            std::thread::Builder::new()
                .name("weir-journal-sync".into())
                .spawn(move || syncer(rx, root, durable, failure))
                .context("starting the journal's fsync thread")?;
        }
        Ok(Journal {
            settings,
            segments,
            writer,
            next_index,
            durable,
            requested: next_index,
            jobs,
            sync_failure,
            unsynced_bytes: 0,
            last_sync: Instant::now(),
            total_bytes,
            positions: state.streams,
            repaired: repaired.then_some((saved_positions, saved_durable)),
            scratch: Vec::new(),
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
        self.durable.load(Ordering::Acquire)
    }

    /// The first fsync failure, if any: the receiver must stop.
    pub fn failure(&self) -> Option<String> {
        self.sync_failure
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
        });
        Ok(())
    }

    /// True when the fsync bound (bytes or time) has been reached.
    pub fn sync_due(&self) -> bool {
        self.requested != self.next_index
            && (self.unsynced_bytes >= self.settings.fsync_bytes
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
        while self.durable_index() < target {
            if let Some(f) = self.failure() {
                bail!("{f}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(target)
    }

    /// Reads entries `from..` (at most `max`, never past the durable index).
    #[cfg(test)]
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<(u64, Entry)>> {
        self.read_with(&mut None, from, max)
    }

    /// As `read`, continuing from a kept position when it fits.
    pub fn read_with(
        &self,
        reader: &mut Option<Reader>,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Entry)>> {
        let mut out = Vec::new();
        let durable = self.durable_index();
        for seg in self
            .segments
            .iter()
            .filter(|s| s.end() > from && s.first < durable)
        {
            if out.len() >= max {
                break;
            }
            let want = max - out.len();
            let entries = read_from(
                reader,
                &seg.path,
                seg.first,
                from.max(seg.first),
                want,
                durable,
            )?;
            out.extend(entries.into_iter().filter(|(i, _)| *i < durable));
        }
        Ok(out)
    }

    /// The oldest segment's index range, if there is more than the active one.
    pub fn oldest(&self) -> Option<(u64, u64)> {
        (self.segments.len() > 1)
            .then(|| self.segments.front().map(|s| (s.first, s.end())))
            .flatten()
    }

    /// Entries of the oldest segment from `from` on (before it is dropped).
    pub fn scan_oldest(&self, from: u64) -> Result<Vec<(u64, Entry)>> {
        let seg = self.segments.front().expect("a segment");
        Ok(scan(&seg.path, seg.first, from)?.0)
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
        let j = Journal::open(settings(&dir, 64 << 20)).unwrap();
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
}
