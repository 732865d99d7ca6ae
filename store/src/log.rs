//! The log itself: segments of framed entries, numbered by a global
//! index (each entry's position in append order), appended to the newest
//! segment and rotated at `segment_bytes`; scanned and repaired on open
//! (a torn tail is cut back to the last whole entry, corrupt stretches
//! become holes readers jump), read with large reads into a reused
//! buffer, and removed whole from the oldest end.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};

use crate::frame::{write_entry, ENTRY_HEADER, MAX_ENTRY};
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

/// Entries `from..to` whose segment file is missing.
#[derive(Debug, Clone)]
pub struct Missing {
    pub from: u64,
    pub to: u64,
    /// Where the segment should have been.
    pub path: PathBuf,
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

/// Damage `Log::open` found besides holes (which are in the segments).
#[derive(Debug, Default)]
pub struct Opened {
    pub missing: Vec<Missing>,
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

pub struct Log {
    settings: Settings,
    segments: VecDeque<Segment>,
    writer: BufWriter<File>,
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
            if first > expected {
                opened.missing.push(Missing {
                    from: expected,
                    to: first,
                    path: segment_path(&dir, expected),
                });
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
        let writer = BufWriter::with_capacity(settings.write_buffer, file);
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
        let size = write_entry(&mut self.writer, payload).with_context(|| {
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
    pub fn rotate(&mut self) -> Result<()> {
        let path = segment_path(&self.settings.dir, self.next_index);
        let file = create_segment(&path)?;
        let old = std::mem::replace(
            &mut self.writer,
            BufWriter::with_capacity(self.settings.write_buffer, file),
        );
        let what = self.settings.what;
        self.retired.push(
            old.into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| format!("{what}: writing a segment"))?,
        );
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
                .get_ref()
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
