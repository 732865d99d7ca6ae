//! The log itself: segments of framed entries, numbered by a global
//! index (each entry's position in append order), appended to the newest
//! segment and rotated at `segment_bytes`; scanned and repaired on open
//! (a torn tail is cut back to the last whole entry, corrupt stretches
//! become holes readers jump), read with large reads into a reused
//! buffer, and removed whole from the oldest end.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

use crate::frame::{ENTRY_HEADER, MAX_ENTRY};
use crate::segment::{
    check_header, create_segment, list_segments, map_segment, segment_path, walk, Header, Hole,
    Rules, Torn, Walked, HEADER_LEN, MAX_INDEX,
};

/// How big segments grow before the next one starts: an eighth of the
/// log's bound (so removing the oldest frees a useful share of it), at
/// least 256 KiB (a file per few records would cost more than it frees),
/// at most 64 MiB (what a reader of a whole segment may hold).
pub fn segment_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 8).clamp(256 << 10, 64 << 20)
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// The directory of the segment files.
    pub dir: PathBuf,
    /// The setting that names the log's directory (`spool.path`), for messages.
    pub key: &'static str,
    /// The log's name in messages (`spool`, `journal`).
    pub what: &'static str,
    pub segment_bytes: u64,
    /// Bytes buffered before a write to the OS.
    pub write_buffer: usize,
}

/// How `Log::open` treats damage it finds.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenRules {
    /// Entries at or after this index were not durable when the owner last
    /// recorded it: damage there, in the newest segment, is a torn tail.
    pub torn_from: Option<u64>,
    /// In the newest segment, skip a damaged run the entry lengths cannot
    /// bridge, guessing it took one entry (see `Hole::exact`), instead of
    /// cutting the segment there.
    pub guess_past_damage: bool,
}

#[derive(Debug, Clone)]
pub struct Segment {
    pub first: u64,
    /// Entries it covers (readable ones and hole slots).
    pub count: u64,
    /// Bytes of the file (header, entries and holes).
    pub bytes: u64,
    /// Framed bytes of its readable entries.
    pub entry_bytes: u64,
    pub path: PathBuf,
    /// When an entry was last appended (the file's mtime at open).
    pub modified: SystemTime,
    /// Unreadable stretches readers jump, sorted, not overlapping.
    pub holes: Vec<Hole>,
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// A torn tail cut at open.
#[derive(Debug, Clone)]
pub struct Repair {
    pub path: PathBuf,
    pub torn: Torn,
    /// Bytes cut from the end of the file.
    pub cut_bytes: u64,
    /// Entries the segment keeps.
    pub kept_entries: u64,
}

/// Damage `Log::open` found besides holes (which are in the segments:
/// entries a missing segment held are a hole at the end of the segment
/// before it, its entry count fixed by the next segment's name).
#[derive(Debug, Default)]
pub struct Opened {
    pub repair: Option<Repair>,
}

/// What a reader's visitor says about the entry it was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Taken: go on.
    Next,
    /// Not taken: stop before it (the next read starts with it).
    Stop,
    /// Whole (its CRC holds) but it does not decode: stop, report it.
    Undecodable,
}

/// Where a read stopped on bytes that are not an entry it can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreadable {
    /// The segment's first index.
    pub segment: u64,
    pub index: u64,
    pub offset: u64,
    /// The entry's framed length when its CRC held but it does not decode.
    pub len: Option<u64>,
    pub why: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// At the limit (or the end of the log); `next` is where the next read
    /// starts (past any hole it reached).
    Done { next: u64 },
    /// The visitor stopped before entry `next`.
    Stopped { next: u64 },
    /// An entry below the limit does not read; the cursor is dropped.
    Unreadable(Unreadable),
}

/// Bytes read from a segment at a time.
const CHUNK: usize = 1 << 20;

/// A read position in one segment, kept between reads so a reader that
/// goes on where it stopped is served without reading from the start:
/// a chunk of the file in a reused buffer, entries checked in place.
pub struct Cursor {
    segment: u64,
    file: File,
    /// The next entry and its byte offset in the file.
    index: u64,
    offset: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`, and how much of `buf` holds file bytes.
    buf_at: u64,
    filled: usize,
}

impl Cursor {
    fn open(seg: &Segment) -> Result<Cursor> {
        let file =
            File::open(&seg.path).with_context(|| format!("opening {}", seg.path.display()))?;
        Ok(Cursor {
            segment: seg.first,
            file,
            index: seg.first,
            offset: HEADER_LEN,
            buf: Vec::new(),
            buf_at: 0,
            filled: 0,
        })
    }

    /// Makes `buf` hold `want` bytes from `offset`; false if the file ends first.
    fn ensure(&mut self, want: usize) -> std::io::Result<bool> {
        if self.offset >= self.buf_at && (self.offset - self.buf_at) as usize + want <= self.filled
        {
            return Ok(true);
        }
        let size = want.max(CHUNK);
        if self.buf.len() < size {
            self.buf.resize(size, 0);
        } else if self.buf.len() > size.max(4 * CHUNK) {
            // One huge entry passed: do not keep its buffer.
            self.buf.truncate(size);
            self.buf.shrink_to_fit();
        }
        self.buf_at = self.offset;
        self.filled = 0;
        while self.filled < want {
            let n = self.file.read_at(
                &mut self.buf[self.filled..],
                self.buf_at + self.filled as u64,
            )?;
            if n == 0 {
                break;
            }
            self.filled += n;
        }
        Ok(self.filled >= want)
    }

    /// The entry at `offset`: its payload's range in `buf`, or why not.
    /// `seg_bytes` bounds the length a corrupt header may claim.
    fn entry(
        &mut self,
        seg_bytes: u64,
    ) -> std::io::Result<std::result::Result<(usize, usize), &'static str>> {
        let left = seg_bytes.saturating_sub(self.offset);
        if left == 0 {
            return Ok(Err("segment ends early"));
        }
        if left < ENTRY_HEADER as u64 || !self.ensure(ENTRY_HEADER)? {
            return Ok(Err("truncated entry header"));
        }
        let at = (self.offset - self.buf_at) as usize;
        let header = &self.buf[at..at + ENTRY_HEADER];
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_ENTRY {
            return Ok(Err("impossible entry length"));
        }
        if (ENTRY_HEADER + len) as u64 > left || !self.ensure(ENTRY_HEADER + len)? {
            return Ok(Err("truncated entry"));
        }
        let start = (self.offset - self.buf_at) as usize + ENTRY_HEADER;
        if crc32fast::hash(&self.buf[start..start + len]) != crc {
            return Ok(Err("CRC mismatch"));
        }
        Ok(Ok((start, start + len)))
    }
}

/// The newest segment's file and the entries appended to it that are not
/// yet written to the OS. An entry is framed in place here (its owner
/// encodes the payload straight into the buffer), so its bytes are copied
/// once on their way to the file, not into a scratch buffer and then into
/// a `BufWriter`.
struct Appender {
    file: File,
    buf: Vec<u8>,
    /// Buffered bytes that make a write to the OS.
    limit: usize,
}

impl Appender {
    fn new(file: File, limit: usize) -> Self {
        Appender {
            file,
            buf: Vec::with_capacity(limit),
            limit,
        }
    }

    /// Frames the payload `encode` appends; returns the entry's bytes.
    /// A full buffer goes to the OS first, so an error leaves the entry
    /// out (never in the buffer, to be written later, but uncounted).
    fn append_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<u64> {
        if self.buf.len() >= self.limit {
            self.flush()?;
        }
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0; ENTRY_HEADER]);
        encode(&mut self.buf);
        let len = self.buf.len() - at - ENTRY_HEADER;
        if len == 0 || len > MAX_ENTRY {
            self.buf.truncate(at);
            bail!("an entry of {len} bytes cannot be stored (1 to {MAX_ENTRY} bytes)");
        }
        let crc = crc32fast::hash(&self.buf[at + ENTRY_HEADER..]);
        self.buf[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
        self.buf[at + 4..at + ENTRY_HEADER].copy_from_slice(&crc.to_le_bytes());
        Ok((ENTRY_HEADER + len) as u64)
    }

    /// Writes the buffered entries to the OS. What a failed write did not
    /// take stays buffered, ahead of later entries.
    fn flush(&mut self) -> std::io::Result<()> {
        let mut done = 0;
        let result = loop {
            if done == self.buf.len() {
                break Ok(());
            }
            match self.file.write(&self.buf[done..]) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.buf.drain(..done);
        // One very large entry must not keep its buffer for the log's life.
        if self.buf.is_empty() && self.buf.capacity() > 2 * self.limit {
            self.buf = Vec::with_capacity(self.limit);
        }
        result
    }
}

impl Drop for Appender {
    /// As a `BufWriter` does: what was appended reaches the OS when the
    /// log is dropped, if it can (errors here have no one to go to; a
    /// later open finds a torn tail and cuts it).
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

pub struct Log {
    settings: Settings,
    segments: VecDeque<Segment>,
    writer: Appender,
    next_index: u64,
    total_bytes: u64,
    /// Closed segments whose final fsync is still to run.
    retired: Vec<File>,
}

impl Log {
    /// Opens the log in `settings.dir` (created if missing): maps every
    /// segment, cuts a torn tail, fsyncs what is there (the previous
    /// process may have died before its fsync ran), and opens a segment to
    /// append to (a new one if the newest is full or damaged, so the next
    /// segment's name fixes the damaged one's entry count).
    ///
    /// `accept` sees every whole entry's payload (its CRC holds): an entry
    /// it refuses (its owner cannot decode it) becomes a one-entry hole.
    pub fn open(
        settings: Settings,
        rules: OpenRules,
        mut accept: impl FnMut(&[u8]) -> bool,
    ) -> Result<(Log, Opened)> {
        let (key, what) = (settings.key, settings.what);
        let dir = settings.dir.clone();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{key}: cannot create {}", dir.display()))?;
        let listed = list_segments(&dir, what)?;
        let mut opened = Opened::default();
        let mut segments = VecDeque::new();
        let mut expected = listed.first().map_or(0, |(f, _)| *f);
        for (i, (first, path)) in listed.iter().enumerate() {
            let first = *first;
            if first > MAX_INDEX {
                bail!("{key}: segment {} names entry {first}, beyond any log (at most {MAX_INDEX}); move it away", path.display());
            }
            if first < expected {
                bail!("{key}: segment {} starts at entry {first}, inside the segment before it (which ends at {expected}); the {what} was altered, move {} away", path.display(), dir.display());
            }
            let mut data = std::fs::read(path)
                .with_context(|| format!("{key}: reading {}", path.display()))?;
            if check_header(&data, path, key)? == Header::Short {
                // Created, then a crash before its header was written.
                drop(create_segment(path)?);
                data = std::fs::read(path)
                    .with_context(|| format!("{key}: reading {}", path.display()))?;
            }
            let last = i + 1 == listed.len();
            let m = map_segment(
                &data,
                first,
                Rules {
                    end: listed.get(i + 1).map(|(next, _)| *next),
                    torn_from: rules.torn_from.filter(|_| last),
                    guess_past_damage: rules.guess_past_damage && last,
                },
            );
            if let Some(torn) = m.torn {
                OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(torn.offset))
                    .with_context(|| {
                        format!("{key}: cutting the torn tail of {}", path.display())
                    })?;
                opened.repair = Some(Repair {
                    path: path.clone(),
                    torn,
                    cut_bytes: data.len() as u64 - torn.offset,
                    kept_entries: m.count,
                });
            }
            let data = &data[..m.good_len as usize];
            let (mut entry_bytes, mut refused) = (0, Vec::new());
            walk(data, first, first + m.count, &m.holes, |w| {
                if let Walked::Entry {
                    index,
                    offset,
                    size,
                    payload,
                } = w
                {
                    if accept(payload) {
                        entry_bytes += size;
                    } else {
                        refused.push(Hole {
                            from: index,
                            to: index + 1,
                            offset,
                            end_offset: offset + size,
                            exact: true,
                            why: "entry does not decode",
                        });
                    }
                }
            });
            let mut holes = m.holes;
            if !refused.is_empty() {
                holes.extend(refused);
                holes.sort_by_key(|h| h.from);
            }
            let modified = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .unwrap_or_else(|_| SystemTime::now());
            segments.push_back(Segment {
                first,
                count: m.count,
                bytes: m.good_len,
                entry_bytes,
                path: path.clone(),
                modified,
                holes,
            });
            expected = first + m.count;
        }
        for seg in &segments {
            File::open(&seg.path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("{key}: syncing {}", seg.path.display()))?;
        }
        let next_index = expected;
        if segments
            .back()
            .is_none_or(|s| s.bytes >= settings.segment_bytes || !s.holes.is_empty())
        {
            let path = segment_path(&dir, next_index);
            drop(create_segment(&path)?);
            segments.push_back(Segment {
                first: next_index,
                count: 0,
                bytes: HEADER_LEN,
                entry_bytes: 0,
                path,
                modified: SystemTime::now(),
                holes: Vec::new(),
            });
        }
        let active = &segments.back().expect("a segment").path;
        let file = OpenOptions::new()
            .append(true)
            .open(active)
            .with_context(|| format!("{key}: opening {}", active.display()))?;
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let writer = Appender::new(file, settings.write_buffer);
        Ok((
            Log {
                settings,
                segments,
                writer,
                next_index,
                total_bytes,
                retired: Vec::new(),
            },
            opened,
        ))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn segments(&self) -> &VecDeque<Segment> {
        &self.segments
    }

    /// The index of the next entry appended.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// The first index still held.
    pub fn first_index(&self) -> u64 {
        self.segments.front().map_or(self.next_index, |s| s.first)
    }

    /// Bytes of all segment files (what is on disk).
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Framed bytes of the readable entries held.
    pub fn entry_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.entry_bytes).sum()
    }

    /// Appends one entry; returns its index, its framed size, and whether
    /// the segment is now full (the caller rotates: `rotate`).
    pub fn append(&mut self, payload: &[u8]) -> Result<(u64, u64, bool)> {
        self.append_with(|b| b.extend_from_slice(payload))
    }

    /// As `append`, for the payload `encode` appends to the buffer it is
    /// given (its owner serializes straight into the log's write buffer;
    /// `encode` must only append, and at least one byte).
    pub fn append_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(u64, u64, bool)> {
        let size = self.writer.append_with(encode).with_context(|| {
            format!(
                "{}: cannot write to {}",
                self.settings.what,
                self.settings.dir.display()
            )
        })?;
        let index = self.next_index;
        self.next_index += 1;
        let seg = self.segments.back_mut().expect("active segment");
        seg.count += 1;
        seg.bytes += size;
        seg.entry_bytes += size;
        self.total_bytes += size;
        Ok((index, size, seg.bytes >= self.settings.segment_bytes))
    }

    /// Records that the newest segment was appended to now (for `max_age`).
    pub fn touch(&mut self) {
        self.segments.back_mut().expect("active segment").modified = SystemTime::now();
    }

    /// Writes buffered entries to the OS.
    pub fn flush(&mut self) -> Result<()> {
        self.writer
            .flush()
            .with_context(|| format!("{}: writing a segment", self.settings.what))
    }

    /// Closes the newest segment (its fsync goes with the next
    /// `sync_files`) and starts a new one at the next index.
    /// Does nothing while the newest segment is empty (a segment is named
    /// by its first entry: the next one would have the same name).
    pub fn rotate(&mut self) -> Result<()> {
        if self.segments.back().is_some_and(|s| s.count == 0) {
            return Ok(());
        }
        // The old segment's entries go to the OS first: a failure leaves
        // the log as it was.
        self.flush()?;
        let retired = self
            .writer
            .file
            .try_clone()
            .with_context(|| format!("{}: duplicating a segment handle", self.settings.what))?;
        let path = segment_path(&self.settings.dir, self.next_index);
        let file = create_segment(&path)?;
        // The old appender holds nothing now: dropping it writes nothing.
        self.writer = Appender::new(file, self.settings.write_buffer);
        self.retired.push(retired);
        self.touch();
        self.total_bytes += HEADER_LEN;
        self.segments.push_back(Segment {
            first: self.next_index,
            count: 0,
            bytes: HEADER_LEN,
            entry_bytes: 0,
            path,
            modified: SystemTime::now(),
            holes: Vec::new(),
        });
        Ok(())
    }

    /// Writes buffered entries to the OS and returns the files whose fsync
    /// makes every entry appended so far durable (run it off this thread:
    /// `SyncJob`).
    pub fn sync_files(&mut self) -> Result<Vec<File>> {
        self.flush()?;
        let mut files: Vec<File> = self.retired.drain(..).collect();
        files.push(
            self.writer
                .file
                .try_clone()
                .with_context(|| format!("{}: duplicating a segment handle", self.settings.what))?,
        );
        Ok(files)
    }

    /// Deletes the oldest segment (never the newest); returns what it held.
    pub fn remove_oldest(&mut self) -> Result<Option<Segment>> {
        if self.segments.len() < 2 {
            return Ok(None);
        }
        let seg = self.segments.pop_front().expect("checked");
        self.total_bytes -= seg.bytes;
        std::fs::remove_file(&seg.path)
            .with_context(|| format!("removing {}", seg.path.display()))?;
        Ok(Some(seg))
    }

    /// Deletes the oldest segments while they end at or below `retained`
    /// (the first index someone still needs); returns how many went.
    pub fn remove_below(&mut self, retained: u64) -> Result<usize> {
        let mut n = 0;
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.end() <= retained)
        {
            self.remove_oldest()?;
            n += 1;
        }
        Ok(n)
    }

    /// The bytes of segment `i` that hold entries (the newest is flushed first).
    fn segment_data(&mut self, i: usize) -> Result<Vec<u8>> {
        if i + 1 == self.segments.len() {
            self.flush()?;
        }
        let seg = &self.segments[i];
        let mut data = std::fs::read(&seg.path).with_context(|| {
            format!(
                "reading {} segment {}",
                self.settings.what,
                seg.path.display()
            )
        })?;
        data.truncate((seg.bytes as usize).min(data.len()));
        Ok(data)
    }

    /// Walks segment `i` whole: every readable entry (CRC checked) and
    /// every hole, in order; stops after an entry that no longer reads.
    pub fn walk(&mut self, i: usize, visit: impl FnMut(Walked<'_>)) -> Result<()> {
        let data = self.segment_data(i)?;
        let seg = &self.segments[i];
        walk(&data, seg.first, seg.end(), &seg.holes, visit);
        Ok(())
    }

    /// Makes one whole entry a hole (its CRC holds but its owner cannot
    /// decode it). False if a hole covers it already.
    pub fn add_hole(&mut self, i: usize, hole: Hole) -> bool {
        let seg = &mut self.segments[i];
        if seg
            .holes
            .iter()
            .any(|k| k.from < hole.to && hole.from < k.to)
        {
            return false;
        }
        seg.entry_bytes = seg
            .entry_bytes
            .saturating_sub(hole.end_offset - hole.offset);
        let at = seg.holes.partition_point(|k| k.from < hole.from);
        seg.holes.insert(at, hole);
        true
    }

    /// Maps segment `i` again, its entry count known (a read met damage
    /// below the durable position): adds the holes it shows and returns
    /// the new ones.
    pub fn map_damage(&mut self, i: usize) -> Result<Vec<Hole>> {
        let data = self.segment_data(i)?;
        let seg = &self.segments[i];
        let m = map_segment(
            &data,
            seg.first,
            Rules {
                end: Some(seg.end()),
                ..Rules::default()
            },
        );
        let mut new = Vec::new();
        for h in m.holes {
            let seg = &mut self.segments[i];
            if seg.holes.iter().any(|k| k.from < h.to && h.from < k.to) {
                continue;
            }
            let at = seg.holes.partition_point(|k| k.from < h.from);
            seg.holes.insert(at, h);
            new.push(h);
        }
        let seg = &self.segments[i];
        let mut entry_bytes = 0;
        walk(&data, seg.first, seg.end(), &seg.holes, |w| {
            if let Walked::Entry { size, .. } = w {
                entry_bytes += size;
            }
        });
        self.segments[i].entry_bytes = entry_bytes;
        Ok(new)
    }

    /// The position of the segment holding `index`.
    pub fn segment_of(&self, index: u64) -> Option<usize> {
        let i = self.segments.partition_point(|s| s.end() <= index);
        self.segments
            .get(i)
            .filter(|s| s.first <= index && index < s.end())
            .map(|_| i)
    }

    /// Shows `visit` the entries from `from` (or the first held) up to
    /// `limit` (entries there must be written to the OS: the caller's
    /// durable position), in order, jumping holes. Entries before `from`
    /// in its segment are read (CRC checked) unless `cursor` is already
    /// past them; the cursor is kept for the next read.
    pub fn read(
        &self,
        cursor: &mut Option<Cursor>,
        from: u64,
        limit: u64,
        mut visit: impl FnMut(u64, &[u8]) -> Step,
    ) -> Result<ReadEnd> {
        let limit = limit.min(self.next_index);
        let mut at = from.max(self.first_index());
        while at < limit {
            let i = self.segments.partition_point(|s| s.end() <= at);
            let Some(seg) = self.segments.get(i) else {
                break;
            };
            if !cursor
                .as_ref()
                .is_some_and(|c| c.segment == seg.first && c.index <= at)
            {
                *cursor = Some(Cursor::open(seg)?);
            }
            let c = cursor.as_mut().expect("opened");
            let seg_limit = limit.min(seg.end());
            let mut hole = seg.holes.partition_point(|h| h.to <= c.index);
            while c.index < seg_limit {
                if let Some(h) = seg.holes.get(hole).filter(|h| h.from <= c.index) {
                    c.index = h.to;
                    c.offset = h.end_offset;
                    hole += 1;
                    continue;
                }
                let entry = c
                    .entry(seg.bytes)
                    .with_context(|| format!("reading {}", seg.path.display()))?;
                let (p0, p1) = match entry {
                    Ok(range) => range,
                    Err(why) => {
                        let u = Unreadable {
                            segment: seg.first,
                            index: c.index,
                            offset: c.offset,
                            len: None,
                            why,
                        };
                        *cursor = None;
                        return Ok(ReadEnd::Unreadable(u));
                    }
                };
                let size = (ENTRY_HEADER + p1 - p0) as u64;
                if c.index >= at {
                    match visit(c.index, &c.buf[p0..p1]) {
                        Step::Next => {}
                        Step::Stop => return Ok(ReadEnd::Stopped { next: c.index }),
                        Step::Undecodable => {
                            let u = Unreadable {
                                segment: seg.first,
                                index: c.index,
                                offset: c.offset,
                                len: Some(size),
                                why: "entry does not decode",
                            };
                            *cursor = None;
                            return Ok(ReadEnd::Unreadable(u));
                        }
                    }
                }
                c.index += 1;
                c.offset += size;
            }
            at = at.max(c.index);
        }
        Ok(ReadEnd::Done { next: at })
    }

    /// The directory of the segments.
    pub fn dir(&self) -> &Path {
        &self.settings.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{FsyncTimes, SyncJob, Syncer};
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn scratch(name: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "weir-store-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn settings(dir: &Path, segment_bytes: u64) -> Settings {
        Settings {
            dir: dir.join("segments"),
            key: "test.path",
            what: "test",
            segment_bytes,
            write_buffer: 4096,
        }
    }

    fn open(dir: &Path, segment_bytes: u64, rules: OpenRules) -> (Log, Opened) {
        Log::open(settings(dir, segment_bytes), rules, |_| true).unwrap()
    }

    /// The payload of entry `index`: its size and bytes follow from the index.
    fn payload(index: u64, size: usize) -> Vec<u8> {
        let mut p = index.to_le_bytes().to_vec();
        p.resize(size.max(8), (index % 251) as u8);
        p
    }

    fn append(log: &mut Log, index_size: usize) -> u64 {
        let index = log.next_index();
        let (i, _, full) = log.append(&payload(index, index_size)).unwrap();
        assert_eq!(i, index);
        if full {
            log.rotate().unwrap();
        }
        i
    }

    /// Every readable entry, read the way owners read.
    fn read_all(log: &mut Log) -> Vec<(u64, Vec<u8>)> {
        log.flush().unwrap();
        let mut out = Vec::new();
        let end = log
            .read(&mut None, 0, u64::MAX, |i, p| {
                out.push((i, p.to_vec()));
                Step::Next
            })
            .unwrap();
        assert!(matches!(end, ReadEnd::Done { .. }), "{end:?}");
        out
    }

    fn disk_bytes(log: &Log) -> u64 {
        std::fs::read_dir(log.dir())
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    fn assert_counts_match_the_disk(log: &mut Log, entries: &[(u64, Vec<u8>)]) {
        log.flush().unwrap();
        assert_eq!(log.total_bytes(), disk_bytes(log), "total bytes = files");
        let framed: u64 = entries
            .iter()
            .map(|(_, p)| (ENTRY_HEADER + p.len()) as u64)
            .sum();
        assert_eq!(log.entry_bytes(), framed, "entry bytes = readable entries");
        let counted: u64 = log.segments().iter().map(|s| s.count).sum();
        assert_eq!(counted, log.next_index() - log.first_index());
    }

    fn flip(path: &Path, at: u64) {
        let mut data = std::fs::read(path).unwrap();
        data[at as usize] ^= 0x5a;
        std::fs::write(path, data).unwrap();
    }

    /// Start offsets of the entries of a clean segment.
    fn offsets(path: &Path) -> Vec<u64> {
        let data = std::fs::read(path).unwrap();
        let (mut at, mut out) = (HEADER_LEN as usize, Vec::new());
        while at < data.len() {
            out.push(at as u64);
            at += crate::segment::entry_at(&data, at).unwrap();
        }
        out
    }

    #[test]
    fn byte_and_entry_counts_equal_the_files_after_appends_rotation_removal_and_reopen() {
        let dir = scratch("counts");
        let (mut log, opened) = open(&dir, 4096, OpenRules::default());
        assert!(opened.repair.is_none());
        for i in 0..500 {
            append(&mut log, 10 + (i * 7) % 300);
        }
        assert!(log.segments().len() > 10, "rotated");
        let all = read_all(&mut log);
        assert_eq!(all.len(), 500);
        assert!(all.iter().all(|(i, p)| *p == payload(*i, p.len())));
        assert_counts_match_the_disk(&mut log, &all);
        let retained = log.segments()[4].end();
        let removed = log.remove_below(retained + 1).unwrap();
        assert_eq!(removed, 5);
        assert_eq!(log.first_index(), retained);
        let kept: Vec<_> = all.into_iter().filter(|(i, _)| *i >= retained).collect();
        assert_eq!(read_all(&mut log), kept);
        assert_counts_match_the_disk(&mut log, &kept);
        drop(log);
        let (mut log, opened) = open(&dir, 4096, OpenRules::default());
        assert!(opened.repair.is_none());
        assert_eq!(log.next_index(), 500);
        assert_eq!(read_all(&mut log), kept);
        assert_counts_match_the_disk(&mut log, &kept);
        assert_eq!(
            append(&mut log, 20),
            500,
            "numbering goes on after a reopen"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_back_to_the_last_whole_entry_and_what_was_cut_is_reported() {
        let dir = scratch("torn");
        let (mut log, _) = open(&dir, 1 << 20, OpenRules::default());
        for _ in 0..10 {
            append(&mut log, 100);
        }
        log.flush().unwrap();
        let seg = log.segments().back().unwrap().path.clone();
        drop(log);
        let len = std::fs::metadata(&seg).unwrap().len();
        let at = offsets(&seg);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 30)
            .unwrap();
        let (mut log, opened) = open(&dir, 1 << 20, OpenRules::default());
        let r = opened.repair.expect("a repair is reported");
        assert_eq!(r.torn.index, 9, "the first entry lost");
        assert_eq!(r.torn.offset, at[9]);
        assert_eq!(r.kept_entries, 9);
        assert_eq!(r.cut_bytes, len - 30 - at[9], "the partial entry's bytes");
        assert_eq!(r.torn.why, "truncated entry");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), at[9], "cut on disk");
        assert_eq!(log.next_index(), 9);
        let all = read_all(&mut log);
        assert_eq!(all.len(), 9);
        assert_counts_match_the_disk(&mut log, &all);
        assert_eq!(
            append(&mut log, 5),
            9,
            "the lost entry's index is the next one"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn damage_at_or_after_the_durable_position_is_a_torn_tail_even_with_whole_entries_after_it() {
        let dir = scratch("torn-from");
        let (mut log, _) = open(&dir, 1 << 20, OpenRules::default());
        for _ in 0..10 {
            append(&mut log, 100);
        }
        log.flush().unwrap();
        let seg = log.segments().back().unwrap().path.clone();
        drop(log);
        flip(&seg, offsets(&seg)[6] + 20);
        let rules = OpenRules {
            torn_from: Some(5),
            guess_past_damage: true,
        };
        let (log, opened) = open(&dir, 1 << 20, rules);
        assert_eq!(opened.repair.map(|r| r.torn.index), Some(6));
        assert_eq!(log.next_index(), 6);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_corrupt_entry_mid_segment_is_a_hole_readers_skip_with_its_byte_and_entry_range() {
        let dir = scratch("hole");
        let (mut log, _) = open(&dir, 1 << 20, OpenRules::default());
        for _ in 0..20 {
            append(&mut log, 50);
        }
        log.flush().unwrap();
        let seg = log.segments().back().unwrap().path.clone();
        drop(log);
        let at = offsets(&seg);
        flip(&seg, at[7] + 12);
        let (mut log, opened) = open(&dir, 1 << 20, OpenRules::default());
        assert!(opened.repair.is_none(), "skipped by its intact length");
        let holes = &log.segments()[0].holes;
        assert_eq!(
            holes,
            &vec![Hole {
                from: 7,
                to: 8,
                offset: at[7],
                end_offset: at[8],
                exact: true,
                why: "CRC mismatch"
            }]
        );
        assert_eq!(log.segments().len(), 2, "appends go to a new segment");
        let all = read_all(&mut log);
        assert_eq!(
            all.iter().map(|e| e.0).collect::<Vec<_>>(),
            (0..20).filter(|i| *i != 7).collect::<Vec<_>>()
        );
        assert_counts_match_the_disk(&mut log, &all);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_damaged_run_in_an_older_segment_is_counted_exactly_from_the_next_segments_name() {
        let dir = scratch("run");
        let (mut log, _) = open(&dir, 4096, OpenRules::default());
        for _ in 0..200 {
            append(&mut log, 60);
        }
        log.flush().unwrap();
        let seg = log.segments()[0].path.clone();
        let end = log.segments()[0].end();
        drop(log);
        let at = offsets(&seg);
        // Garbage over the headers of entries 3, 4 and 5.
        let mut data = std::fs::read(&seg).unwrap();
        data[at[3] as usize..at[5] as usize + 8].fill(0xee);
        std::fs::write(&seg, data).unwrap();
        let (mut log, _) = open(&dir, 4096, OpenRules::default());
        let h = log.segments()[0].holes.clone();
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!((h[0].from, h[0].to, h[0].exact), (3, 6, true));
        assert_eq!((h[0].offset, h[0].end_offset), (at[3], at[6]));
        assert_eq!(log.segments()[0].end(), end);
        let all = read_all(&mut log);
        assert_eq!(all.len(), 197);
        assert_counts_match_the_disk(&mut log, &all);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn without_the_end_a_damaged_run_is_guessed_as_one_entry_or_cuts_the_segment() {
        for guess in [true, false] {
            let dir = scratch("guess");
            let (mut log, _) = open(&dir, 1 << 20, OpenRules::default());
            for _ in 0..20 {
                append(&mut log, 60);
            }
            log.flush().unwrap();
            let seg = log.segments()[0].path.clone();
            drop(log);
            let at = offsets(&seg);
            let mut data = std::fs::read(&seg).unwrap();
            data[at[3] as usize..at[5] as usize + 8].fill(0xee);
            std::fs::write(&seg, data).unwrap();
            let rules = OpenRules {
                torn_from: None,
                guess_past_damage: guess,
            };
            let (mut log, opened) = open(&dir, 1 << 20, rules);
            if guess {
                assert!(opened.repair.is_none());
                let h = &log.segments()[0].holes;
                assert_eq!((h[0].from, h[0].to, h[0].exact), (3, 4, false));
                assert_eq!(read_all(&mut log).len(), 17, "0..3 and 6..20");
            } else {
                assert_eq!(opened.repair.map(|r| r.torn.index), Some(3));
                assert_eq!(read_all(&mut log).len(), 3);
            }
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_missing_segment_is_a_hole_with_its_entry_range_at_the_end_of_the_one_before() {
        let dir = scratch("missing");
        let (mut log, _) = open(&dir, 4096, OpenRules::default());
        for _ in 0..200 {
            append(&mut log, 60);
        }
        let victim = log.segments()[1].clone();
        drop(log);
        std::fs::remove_file(&victim.path).unwrap();
        let (mut log, opened) = open(&dir, 4096, OpenRules::default());
        assert!(opened.repair.is_none());
        let h = log.segments()[0].holes.clone();
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!((h[0].from, h[0].to), (victim.first, victim.end()));
        assert_eq!(h[0].offset, h[0].end_offset, "no bytes: the file is gone");
        assert_eq!(h[0].why, "entries missing at the end");
        assert_eq!(read_all(&mut log).len() as u64, 200 - victim.count);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_segment_of_an_older_format_is_refused_with_a_message_naming_the_directory() {
        let dir = scratch("old-format");
        let segs = dir.join("segments");
        std::fs::create_dir_all(&segs).unwrap();
        // An entry where the header should be: the layout before format 1.
        let mut old = Vec::new();
        crate::frame::write_entry(&mut old, b"an old record").unwrap();
        std::fs::write(segs.join(format!("{:020}.seg", 0)), &old).unwrap();
        let err = Log::open(settings(&dir, 4096), OpenRules::default(), |_| true)
            .err()
            .expect("refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("test.path"), "{msg}");
        assert!(msg.contains(&segs.display().to_string()), "{msg}");
        assert!(msg.contains("older weir") && msg.contains("move"), "{msg}");
        assert_eq!(
            std::fs::read(segs.join(format!("{:020}.seg", 0))).unwrap(),
            old,
            "left as it was"
        );
        // A future format is refused too, naming both.
        let mut future = b"weir-seg".to_vec();
        future.extend_from_slice(&9u32.to_le_bytes());
        future.extend_from_slice(&[0; 4]);
        std::fs::write(segs.join(format!("{:020}.seg", 0)), &future).unwrap();
        let err = Log::open(settings(&dir, 4096), OpenRules::default(), |_| true)
            .err()
            .expect("refused");
        assert!(format!("{err:#}").contains("format 9"), "{err:#}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_segment_created_without_its_header_by_a_crash_is_rewritten_empty() {
        let dir = scratch("short-header");
        let (mut log, _) = open(&dir, 1 << 20, OpenRules::default());
        append(&mut log, 10);
        log.rotate().unwrap();
        drop(log);
        let newest = segment_path(&dir.join("segments"), 1);
        std::fs::write(&newest, b"weir").unwrap();
        let (mut log, opened) = open(&dir, 1 << 20, OpenRules::default());
        assert!(opened.repair.is_none());
        assert_eq!(std::fs::metadata(&newest).unwrap().len(), HEADER_LEN);
        assert_eq!(append(&mut log, 10), 1);
        let all = read_all(&mut log);
        assert_eq!(all.len(), 2);
        assert_counts_match_the_disk(&mut log, &all);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_entry_the_owner_cannot_decode_is_a_hole_at_open() {
        let dir = scratch("refused");
        let (mut log, _) = open(&dir, 1 << 20, OpenRules::default());
        for _ in 0..5 {
            append(&mut log, 30);
        }
        drop(log);
        let (mut log, _) =
            Log::open(settings(&dir, 1 << 20), OpenRules::default(), |p| p[0] != 2).unwrap();
        let h = &log.segments()[0].holes;
        assert_eq!(
            (h[0].from, h[0].to, h[0].why),
            (2, 3, "entry does not decode")
        );
        let all = read_all(&mut log);
        assert_eq!(all.len(), 4);
        assert_counts_match_the_disk(&mut log, &all);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_reader_stops_before_an_entry_it_does_not_take_and_goes_on_from_there() {
        let dir = scratch("cursor");
        let (mut log, _) = open(&dir, 4096, OpenRules::default());
        for _ in 0..300 {
            append(&mut log, 40);
        }
        log.flush().unwrap();
        let (mut cursor, mut at, mut seen) = (None, 0u64, Vec::new());
        loop {
            let mut taken = 0;
            let end = log
                .read(&mut cursor, at, 250, |i, p| {
                    if taken == 7 {
                        return Step::Stop;
                    }
                    assert_eq!(p, &payload(i, 40)[..]);
                    seen.push(i);
                    taken += 1;
                    Step::Next
                })
                .unwrap();
            match end {
                ReadEnd::Stopped { next } => at = next,
                ReadEnd::Done { next } => {
                    assert_eq!(next, 250, "the limit");
                    break;
                }
                ReadEnd::Unreadable(u) => panic!("{u:?}"),
            }
        }
        assert_eq!(seen, (0..250).collect::<Vec<_>>());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn entries_encoded_in_the_write_buffer_read_back_and_an_empty_one_is_refused_without_a_trace() {
        let dir = scratch("in-place");
        let (mut log, _) = open(&dir, 64 << 20, OpenRules::default());
        // Small entries that stay buffered, one larger than the buffer, and
        // the buffer's limit crossed in the middle of an entry.
        let sizes = [10usize, 4000, 9000, 100, 4090, 1];
        let mut want = Vec::new();
        for (n, &size) in sizes.iter().enumerate() {
            let p = payload(n as u64, size);
            let (i, framed, _) = log.append_with(|b| b.extend_from_slice(&p)).unwrap();
            assert_eq!((i, framed), (n as u64, (ENTRY_HEADER + p.len()) as u64));
            want.push((i, p));
            if n == 2 {
                let e = log.append_with(|_| {}).unwrap_err();
                assert!(
                    format!("{e:#}").contains("0 bytes cannot be stored"),
                    "{e:#}"
                );
            }
        }
        assert_eq!(read_all(&mut log), want);
        assert_counts_match_the_disk(&mut log, &want);
        // Still buffered when the log is dropped: written then, as a
        // `BufWriter` would.
        let p = payload(6, 20);
        log.append_with(|b| b.extend_from_slice(&p)).unwrap();
        want.push((6, p));
        drop(log);
        let (mut log, opened) = open(&dir, 64 << 20, OpenRules::default());
        assert!(opened.repair.is_none());
        assert_eq!(read_all(&mut log), want);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_entry_larger_than_a_read_chunk_reads_whole() {
        let dir = scratch("big");
        let (mut log, _) = open(&dir, 64 << 20, OpenRules::default());
        append(&mut log, 10);
        append(&mut log, 3 * CHUNK + 5);
        append(&mut log, 10);
        let all = read_all(&mut log);
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].1, payload(1, 3 * CHUNK + 5));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn damage_found_by_a_read_is_mapped_into_holes_with_the_count_known() {
        let dir = scratch("read-damage");
        let (mut log, _) = open(&dir, 1 << 20, OpenRules::default());
        for _ in 0..100 {
            append(&mut log, 50);
        }
        log.flush().unwrap();
        let seg = log.segments()[0].path.clone();
        let at = offsets(&seg);
        flip(&seg, at[40] + 2);
        let end = log.read(&mut None, 0, 100, |_, _| Step::Next).unwrap();
        let ReadEnd::Unreadable(u) = end else {
            panic!("{end:?}")
        };
        assert_eq!((u.index, u.offset, u.len), (40, at[40], None));
        let new = log.map_damage(0).unwrap();
        assert_eq!(new.len(), 1);
        assert_eq!((new[0].from, new[0].to), (40, 41));
        assert!(log.map_damage(0).unwrap().is_empty(), "found once");
        let all = read_all(&mut log);
        assert_eq!(all.len(), 99);
        assert_counts_match_the_disk(&mut log, &all);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_fsync_thread_publishes_durable_positions_in_order_and_wakes_waiters() {
        let dir = scratch("syncer");
        let (mut log, _) = open(&dir, 4096, OpenRules::default());
        let mut syncer = Syncer::spawn("weir-test-sync", log.next_index(), 2).unwrap();
        let woken = Arc::new(AtomicU64::new(0));
        let w = woken.clone();
        syncer.set_waker(Box::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        }));
        assert!(syncer.idle());
        let times = Arc::new(FsyncTimes::default());
        for round in 1..=5u64 {
            for _ in 0..50 {
                append(&mut log, 30);
            }
            let up_to = log.next_index();
            let state = dir.join("state.json");
            syncer
                .submit(SyncJob {
                    files: log.sync_files().unwrap(),
                    up_to,
                    state: Some((state.clone(), format!("{round}").into_bytes())),
                    what: "test",
                    times: times.clone(),
                })
                .unwrap();
            assert_eq!(syncer.requested(), up_to);
            syncer.wait_durable(up_to).unwrap();
            assert!(syncer.durable() >= up_to);
            assert!(syncer.idle());
            assert_eq!(
                std::fs::read(&state).unwrap(),
                format!("{round}").into_bytes()
            );
        }
        assert_eq!(syncer.fsyncs(), 5);
        assert!(times.max_us() > 0, "each job's duration is recorded");
        // The waker runs after waiters are notified: give it a moment.
        let t = std::time::Instant::now();
        while woken.load(Ordering::Relaxed) < 5 && t.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(woken.load(Ordering::Relaxed), 5, "woken after each fsync");
        assert!(syncer.failure().is_none());
        assert!(
            syncer.wait_durable(log.next_index() + 1).is_err(),
            "waiting past what was handed over is a bug, not a hang"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(usize),
        Rotate,
        /// Drop the log and cut this many bytes off the newest segment.
        Crash(u64),
        Reopen,
        /// Remove segments wholly below this share (in 1/8) of the entries.
        Remove(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (1usize..600).prop_map(Op::Append),
            1 => Just(Op::Rotate),
            1 => (0u64..700).prop_map(Op::Crash),
            1 => Just(Op::Reopen),
            1 => (0u8..=8).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_appends_crashes_and_reopens_keep_exact_accounting(
            ops in proptest::collection::vec(op(), 1..60)
        ) {
            let dir = scratch("prop");
            let (mut log, _) = open(&dir, 2048, OpenRules::default());
            // The model: every entry held, and where it is.
            let mut model: Vec<(u64, Vec<u8>, u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Append(size) => {
                        let index = log.next_index();
                        let p = payload(index, size);
                        let (seg, off) = {
                            let s = log.segments().back().unwrap();
                            (s.first, s.bytes)
                        };
                        let (i, _, full) = log.append(&p).unwrap();
                        prop_assert_eq!(i, index);
                        model.push((i, p, seg, off));
                        if full {
                            log.rotate().unwrap();
                        }
                    }
                    Op::Rotate => log.rotate().unwrap(),
                    Op::Crash(cut) => {
                        log.flush().unwrap();
                        let newest = log.segments().back().unwrap().clone();
                        drop(log);
                        let len = std::fs::metadata(&newest.path).unwrap().len();
                        let keep = len - cut.min(len - HEADER_LEN);
                        std::fs::OpenOptions::new().write(true).open(&newest.path).unwrap()
                            .set_len(keep).unwrap();
                        let whole = |e: &(u64, Vec<u8>, u64, u64)| {
                            e.2 != newest.first || e.3 + (ENTRY_HEADER + e.1.len()) as u64 <= keep
                        };
                        let lost = model.iter().filter(|e| !whole(e)).count() as u64;
                        let partial = model.iter().any(|e| e.2 == newest.first && e.3 < keep && !whole(e));
                        model.retain(whole);
                        let (l, opened) = open(&dir, 2048, OpenRules::default());
                        log = l;
                        prop_assert_eq!(opened.repair.is_some(), partial);
                        if let Some(r) = opened.repair {
                            prop_assert_eq!(r.kept_entries + lost, newest.count);
                            prop_assert_eq!(r.torn.index, newest.first + r.kept_entries);
                        }
                    }
                    Op::Reopen => {
                        drop(log);
                        let (l, opened) = open(&dir, 2048, OpenRules::default());
                        prop_assert!(opened.repair.is_none());
                        log = l;
                    }
                    Op::Remove(share) => {
                        let span = log.next_index() - log.first_index();
                        let retained = log.first_index() + span * u64::from(share) / 8;
                        log.remove_below(retained).unwrap();
                        let first = log.first_index();
                        model.retain(|e| e.0 >= first);
                    }
                }
                let expected: Vec<(u64, Vec<u8>)> =
                    model.iter().map(|e| (e.0, e.1.clone())).collect();
                prop_assert_eq!(read_all(&mut log), expected.clone());
                assert_counts_match_the_disk(&mut log, &expected);
                prop_assert_eq!(log.next_index(), model.last().map_or(log.next_index(), |e| e.0 + 1));
            }
            drop(log);
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
