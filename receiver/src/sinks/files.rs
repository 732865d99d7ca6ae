//! `files`: rebuilds the files a `files` source sent, under `dir` with
//! their relative paths, and never shows a partial one.
//!
//! - **Writing.** A transfer's parts are written at their offsets into a
//!   temporary file in the final file's own directory,
//!   `.weir-{transfer}.part` (a dotfile: anything that lists `dir` and skips
//!   dotfiles never sees it). Parts seen twice (a restarted sender sends a
//!   file again, whole, under the same transfer id) are written again at
//!   the same offsets, which changes nothing. A batch is confirmed once the
//!   files it wrote are fsynced.
//! - **Completing.** Once every byte of `0..size` is there and the last
//!   part brought the SHA-256, the file is fsynced, its SHA-256 checked,
//!   its mode (permission bits only: `0o777`, no setuid/setgid/sticky) and
//!   mtime set, and it is linked into place under a name that does not
//!   exist yet (`link(2)` never replaces a file: a second version of
//!   `report.csv` becomes `report.csv.1`, then `.2`, ...), the temporary
//!   name removed and the directory fsynced. The audit log gets a `file`
//!   line: stream, path (as written), size, sha256, transfer,
//!   `complete: true`.
//! - **Incomplete.** A transfer whose last part came with bytes missing
//!   (records FEC could not repair), whose checksum does not match, or whose
//!   stream went on to another transfer before its last part, is never put
//!   in place: its data moves to `dir/incomplete/{path}.{transfer}.part`,
//!   and the audit log gets a `file` line with `complete: false`, the
//!   missing byte ranges, the missing sequence numbers between the parts
//!   seen, and why. If the missing parts arrive later (`weir-sender resend`
//!   of the stream's gap), the transfer is picked up again and completed.
//!   A new copy under new sequence numbers (a resend from disk, a restarted
//!   sender) is judged at its own last part.
//! - **Resolved gaps.** A file completed after it was given up for lost
//!   records gets a `gap-resolved` audit line per lost copy: the sequence
//!   range that copy took on its stream, and `resolved by resend of PATH at
//!   TIME`. The stream's gaps in that range are then resolved, not deleted
//!   (`weir-receiver gaps --all`), and the decoder forgets them as open.
//! - **Refused.** A part whose path is absolute, has `..`, `.` or empty
//!   components, starts a component with `.weir-`, begins with
//!   `incomplete/`, or whose bytes lie past its size, and any record that is
//!   not a file part, is rejected: counted in the sink's `dead_letters`,
//!   logged, and written to its dead-letter file.
//! - **Restarts.** The resume state saved with the cursor holds every open
//!   and incomplete transfer (ranges received, checksum) and the ids of
//!   recently completed ones (so late copies of their parts are dropped);
//!   a temporary file that was already linked into place when the receiver
//!   stopped is recognised by its link count and finished, not written
//!   twice.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use weir_protocol::decoder::Delivered;
use weir_protocol::{FilePart, RecordBody};

use super::{BuildContext, Sink, SinkBuilder, SinkError};

/// Where incomplete transfers' data is kept, under `dir`.
pub const INCOMPLETE_DIR: &str = "incomplete";
/// Incomplete transfers remembered for a later resend; past this the oldest
/// is forgotten (its data stays under `incomplete/`, logged).
const MAX_INCOMPLETE: usize = 1024;
/// Completed transfer ids remembered to drop late copies of their parts (a
/// restarted sender sends its last file again): far more than the files
/// that can be in flight in the spool at once.
const MAX_DONE: usize = 4096;
/// Byte ranges tracked per transfer at most: a transfer shredded into more
/// pieces than this by loss is given up as incomplete.
const MAX_RANGES: usize = 100_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where files are written (created if missing).
    pub dir: PathBuf,
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "files";

    fn validate(&self) -> Result<(), String> {
        if !self.dir.is_absolute() {
            return Err(format!(
                "dir: `{}` must be an absolute path",
                self.dir.display()
            ));
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        Ok(Box::new(FilesSink::new(
            &self.dir,
            ctx.name(),
            Box::new(crate::audit::sink_event),
        )?))
    }
}

/// A set of half-open ranges `[start, end)`, sorted and merged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let v = &mut self.0;
        let i = v.partition_point(|r| r.1 < start);
        let mut j = i;
        let (mut s, mut e) = (start, end);
        while j < v.len() && v[j].0 <= e {
            s = s.min(v[j].0);
            e = e.max(v[j].1);
            j += 1;
        }
        v.splice(i..j, [(s, e)]);
    }

    fn covers(&self, start: u64, end: u64) -> bool {
        start >= end || self.0.iter().any(|r| r.0 <= start && end <= r.1)
    }

    /// The parts of `[start, end)` not in the set.
    fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        for &(s, e) in &self.0 {
            if e <= at {
                continue;
            }
            if s >= end {
                break;
            }
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
        }
        if at < end {
            out.push((at, end));
        }
        out
    }
}

/// One transfer being rebuilt (or kept incomplete).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Transfer {
    stream: String,
    transfer: u64,
    path: String,
    size: u64,
    mtime_ns: i64,
    mode: u32,
    /// From the last part, once it arrived.
    sha256: Option<String>,
    /// Bytes received, `[start, end)`.
    have: Ranges,
    /// Sequence numbers of the parts received, as `[first, last + 1)`.
    seqs: Ranges,
    /// Where its data is, relative to `dir`.
    data: String,
    /// Its content was refused by its SHA-256: some bytes on disk are
    /// wrong, nobody knows which, so only a whole new copy completes it.
    #[serde(default)]
    mismatch: bool,
    /// The length of a part that is not the last: the source cuts every
    /// part but the last to its `chunk_size`.
    #[serde(default)]
    chunk: Option<u64>,
    /// The part with the lowest sequence number since this copy started
    /// (or was picked up again): (seq, offset).
    #[serde(default)]
    lowest: Option<(u64, u64)>,
    /// The part with the highest: (seq, offset, length).
    #[serde(default)]
    highest: Option<(u64, u64, u64)>,
    /// The sequence numbers, `[first, last + 1)`, the copies given up as
    /// incomplete took on the stream: the records lost among them are what
    /// completing the file later resolves (`gap-resolved`).
    #[serde(default)]
    lost: Ranges,
}

impl Transfer {
    fn id(&self) -> String {
        format!("{:016x}", self.transfer)
    }

    fn note_part(&mut self, seq: u64, p: &FilePart) {
        let len = p.data.len() as u64;
        if p.sha256.is_none() && len > 0 && self.chunk.is_none() {
            self.chunk = Some(len);
        }
        if self.lowest.is_none_or(|(s, _)| seq < s) {
            self.lowest = Some((seq, p.offset));
        }
        if self.highest.is_none_or(|(s, _, _)| seq > s) {
            self.highest = Some((seq, p.offset, len));
        }
    }

    /// The sequence numbers this copy took on its stream, `[first, last +
    /// 1)`: those of the lowest and highest parts seen, widened by the
    /// parts their offsets say came before and after them (lost ones too:
    /// a `files` source sends one file at a time, every part but the last
    /// `chunk` bytes), and ending before `next`, the first part of the
    /// transfer the stream went on to, when that is what ended it.
    fn span(&self, next: Option<u64>) -> Option<(u64, u64)> {
        let (lo_seq, lo_offset) = self.lowest?;
        let (hi_seq, hi_offset, hi_len) = self.highest?;
        let (first, last) = match self.chunk {
            Some(c) => {
                let after = self.size.saturating_sub(hi_offset.saturating_add(hi_len));
                (
                    lo_seq.saturating_sub(lo_offset / c),
                    hi_seq.saturating_add(after.div_ceil(c)),
                )
            }
            None => (lo_seq, hi_seq),
        };
        let last = match next {
            Some(n) if n > hi_seq => last.min(n - 1),
            _ => last,
        };
        Some((first, last.saturating_add(1)))
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Resume {
    open: Vec<Transfer>,
    incomplete: Vec<Transfer>,
    /// Per stream, the transfer its live (not resent) parts belong to.
    current: HashMap<String, u64>,
    done: Vec<u64>,
}

/// What the sink calls to write an audit line (the receiver's audit log;
/// a test collects them).
type AuditFn = Box<dyn Fn(&str, Value) + Send>;

pub struct FilesSink {
    name: String,
    dir: PathBuf,
    open: HashMap<u64, Transfer>,
    handles: HashMap<u64, File>,
    incomplete: VecDeque<Transfer>,
    current: HashMap<String, u64>,
    done: VecDeque<u64>,
    /// Transfers written since the last fsync.
    dirty: Vec<u64>,
    audit: AuditFn,
}

/// Why a part cannot be written, ever.
fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 4096 {
        return Err(format!("path `{path}` is empty or longer than 4096 bytes"));
    }
    if path.starts_with('/') {
        return Err(format!("path `{path}` is absolute"));
    }
    if path.contains('\0') {
        return Err(format!("path `{path}` holds a NUL byte"));
    }
    for c in path.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(format!("path `{path}` has an empty, `.` or `..` component"));
        }
        if c.starts_with(".weir-") {
            return Err(format!(
                "path `{path}` has a component starting with `.weir-` (the sink's temporary names)"
            ));
        }
        if c.len() > 255 {
            return Err(format!("path `{path}` has a component over 255 bytes"));
        }
    }
    if path == INCOMPLETE_DIR || path.starts_with("incomplete/") {
        return Err(format!(
            "path `{path}` is under `incomplete/`, where the sink keeps incomplete transfers"
        ));
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `path`, or `path.1`, `path.2`, ...: what `n` names.
fn versioned(path: &Path, n: u64) -> PathBuf {
    if n == 0 {
        return path.to_path_buf();
    }
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{n}"));
    PathBuf::from(p)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn ranges_json(r: &[(u64, u64)]) -> Value {
    json!(r.iter().map(|(s, e)| json!([s, e])).collect::<Vec<_>>())
}

impl FilesSink {
    pub fn new(dir: &Path, name: &str, audit: AuditFn) -> Result<Self> {
        std::fs::create_dir_all(dir.join(INCOMPLETE_DIR)).with_context(|| {
            format!(
                "dir: cannot create {}; check `dir` and its permissions",
                dir.join(INCOMPLETE_DIR).display()
            )
        })?;
        Ok(FilesSink {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            open: HashMap::new(),
            handles: HashMap::new(),
            incomplete: VecDeque::new(),
            current: HashMap::new(),
            done: VecDeque::new(),
            dirty: Vec::new(),
            audit,
        })
    }

    fn remember_done(&mut self, transfer: u64) {
        if self.done.len() >= MAX_DONE {
            self.done.pop_front();
        }
        self.done.push_back(transfer);
    }

    /// The open handle of a transfer's data file.
    fn handle(&mut self, transfer: u64, data: &str) -> std::io::Result<&File> {
        if !self.handles.contains_key(&transfer) {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.dir.join(data))?;
            self.handles.insert(transfer, f);
        }
        Ok(&self.handles[&transfer])
    }

    /// Starts a transfer: a temporary file beside where it will end up.
    fn start(&mut self, stream: &str, p: &FilePart) -> std::io::Result<()> {
        let rel = Path::new(&p.path);
        let parent = rel.parent().unwrap_or(Path::new(""));
        std::fs::create_dir_all(self.dir.join(parent))?;
        let data = parent.join(format!(".weir-{:016x}.part", p.transfer));
        let t = Transfer {
            stream: stream.to_string(),
            transfer: p.transfer,
            path: p.path.clone(),
            size: p.size,
            mtime_ns: p.mtime_ns,
            mode: p.mode,
            sha256: None,
            have: Ranges::default(),
            seqs: Ranges::default(),
            data: data.to_string_lossy().into_owned(),
            mismatch: false,
            chunk: None,
            lowest: None,
            highest: None,
            lost: Ranges::default(),
        };
        // Created (empty) now, and its directory entry made durable, so a
        // restart finds it where the resume state says.
        self.handle(t.transfer, &t.data)?;
        fsync_dir(&self.dir.join(parent))?;
        self.open.insert(p.transfer, t);
        Ok(())
    }

    fn write_part(&mut self, r: &Delivered, p: &FilePart) -> Result<(), SinkError> {
        if self.done.contains(&p.transfer) {
            return Ok(()); // a late copy of a completed transfer's part
        }
        let stream = &*r.stream;
        if !r.resent {
            let before = self.current.insert(stream.to_string(), p.transfer);
            if let Some(prev) = before.filter(|t| *t != p.transfer) {
                if self.open.contains_key(&prev) {
                    self.give_up(
                        prev,
                        "the stream went on to another file before this one's last part arrived",
                        Some(r.seq),
                    )?;
                }
            }
        }
        if !self.open.contains_key(&p.transfer) {
            match self
                .incomplete
                .iter()
                .position(|t| t.transfer == p.transfer)
            {
                Some(i) => {
                    let mut t = self.incomplete.remove(i).expect("found");
                    tracing::info!(sink = %self.name, stream, file = %t.path, transfer = t.id(),
                        "files sink: parts of an incomplete file arrived; picking it up again");
                    if t.mismatch {
                        // Counting the old bytes as had would complete (and
                        // refuse) it again at every part of the new copy.
                        tracing::info!(sink = %self.name, stream, file = %t.path, transfer = t.id(),
                            "files sink: its content was refused by its SHA-256; waiting for every byte again");
                        t.have = Ranges::default();
                        t.sha256 = None; // the new copy's last part brings it
                        t.mismatch = false;
                    } else if !r.resent {
                        // A new copy (a resend from disk, or a restarted
                        // sender's), whole and in order: judged when its
                        // last part arrives, not at each part before it
                        // while the bytes it brings later are missing.
                        t.sha256 = None;
                    }
                    self.open.insert(t.transfer, t);
                }
                None => self.start(stream, p)?,
            }
        }
        let t = self.open.get(&p.transfer).expect("opened above");
        if (t.path.as_str(), t.size) != (p.path.as_str(), p.size) {
            return Err(SinkError::Reject {
                at: 0,
                reason: format!(
                    "file part of transfer {} says `{}` ({} bytes), but the transfer is `{}` ({} bytes)",
                    t.id(),
                    p.path,
                    p.size,
                    t.path,
                    t.size
                ),
            });
        }
        let data = t.data.clone();
        let file = self.handle(p.transfer, &data)?;
        file.write_all_at(&p.data, p.offset)?;
        let t = self.open.get_mut(&p.transfer).expect("open");
        t.have.add(p.offset, p.offset + p.data.len() as u64);
        t.seqs.add(r.seq, r.seq.saturating_add(1));
        t.note_part(r.seq, p);
        if let Some(sha) = &p.sha256 {
            t.sha256 = Some(hex(sha));
        }
        if !self.dirty.contains(&p.transfer) {
            self.dirty.push(p.transfer);
        }
        let t = &self.open[&p.transfer];
        if t.sha256.is_some() {
            if t.have.covers(0, t.size) {
                self.complete(p.transfer)?;
            } else if t.have.0.len() > MAX_RANGES || !r.resent {
                self.give_up(
                    p.transfer,
                    "bytes are missing (records lost on the link)",
                    None,
                )?;
            }
        } else if t.have.0.len() > MAX_RANGES {
            self.give_up(p.transfer, "shredded into too many pieces by loss", None)?;
        }
        Ok(())
    }

    /// Every byte is there: check, set metadata, put it in place.
    fn complete(&mut self, transfer: u64) -> Result<(), SinkError> {
        let t = self.open[&transfer].clone();
        let file = self.handle(t.transfer, &t.data)?.try_clone()?;
        file.set_len(t.size)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut reader = file.try_clone()?;
        std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(0))?;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let got = hex(&hasher.finalize());
        if Some(&got) != t.sha256.as_ref() {
            tracing::warn!(sink = %self.name, stream = %t.stream, file = %t.path, transfer = t.id(), expected = ?t.sha256, got = %got,
                "files sink: SHA-256 mismatch; the file is kept under incomplete/");
            if let Some(open) = self.open.get_mut(&transfer) {
                open.mismatch = true;
            }
            return self.give_up(
                transfer,
                &format!("SHA-256 mismatch: content hashes to {got}"),
                None,
            );
        }
        let from = self.dir.join(&t.data);
        std::fs::set_permissions(&from, std::fs::Permissions::from_mode(t.mode & 0o777))?;
        let mtime = if t.mtime_ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(t.mtime_ns as u64)
        } else {
            UNIX_EPOCH - Duration::from_nanos(t.mtime_ns.unsigned_abs())
        };
        file.set_modified(mtime)?;
        file.sync_all()?;
        let target = self.dir.join(&t.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut n = 0;
        let placed = loop {
            let candidate = versioned(&target, n);
            match std::fs::hard_link(&from, &candidate) {
                Ok(()) => break candidate,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(e.into()),
            }
        };
        std::fs::remove_file(&from)?;
        if let Some(parent) = placed.parent() {
            fsync_dir(parent)?;
        }
        if let Some(parent) = from.parent() {
            fsync_dir(parent)?;
        }
        self.handles.remove(&transfer);
        self.open.remove(&transfer);
        self.dirty.retain(|d| *d != transfer);
        self.remember_done(transfer);
        let written = placed
            .strip_prefix(&self.dir)
            .unwrap_or(&placed)
            .to_string_lossy()
            .into_owned();
        tracing::info!(sink = %self.name, stream = %t.stream, file = %written, bytes = t.size, transfer = t.id(), "files sink: file complete");
        (self.audit)(
            "file",
            json!({ "sink": self.name, "stream": t.stream, "path": t.path, "written": written,
                    "size": t.size, "sha256": got, "transfer": t.id(), "complete": true }),
        );
        self.resolve_lost(&t);
        Ok(())
    }

    /// A file given up as incomplete is complete now (from a resend, or a
    /// restarted sender's new copy): the records its lost copies took are
    /// no longer needed. Each range gets a `gap-resolved` line, which
    /// marks the stream's gaps within it resolved, not deleted: the
    /// records of the original stream were lost, the file is whole.
    fn resolve_lost(&self, t: &Transfer) {
        if t.lost.0.is_empty() {
            return;
        }
        let resolution = format!(
            "resolved by resend of {} at {}",
            t.path,
            crate::audit::now_rfc3339()
        );
        for &(from, end) in &t.lost.0 {
            tracing::info!(sink = %self.name, stream = %t.stream, file = %t.path, transfer = t.id(), from, to = end - 1,
                "files sink: the file is complete; the gaps its transfer left in the stream are resolved");
            (self.audit)(
                "gap-resolved",
                json!({ "sink": self.name, "stream": t.stream, "from": from, "to": end - 1,
                        "file": t.path, "transfer": t.id(), "resolution": resolution }),
            );
        }
    }

    /// The transfer cannot complete now: its data goes under
    /// `incomplete/`, the audit log names what is missing. `next`: the
    /// sequence number of the part of another transfer that ended it.
    fn give_up(&mut self, transfer: u64, why: &str, next: Option<u64>) -> Result<(), SinkError> {
        let Some(mut t) = self.open.remove(&transfer) else {
            return Ok(());
        };
        if let Some(f) = self.handles.remove(&transfer) {
            f.sync_all()?;
        }
        self.dirty.retain(|d| *d != transfer);
        let kept = Path::new(INCOMPLETE_DIR).join(format!("{}.{}.part", t.path, t.id()));
        let to = self.dir.join(&kept);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let from = self.dir.join(&t.data);
        if from != to {
            std::fs::rename(&from, &to)?;
            if let Some(parent) = to.parent() {
                fsync_dir(parent)?;
            }
            if let Some(parent) = from.parent() {
                fsync_dir(parent)?;
            }
        }
        t.data = kept.to_string_lossy().into_owned();
        let missing = t.have.missing(0, t.size);
        // This copy's sequence numbers; without one (no part seen since it
        // was picked up), those between the first and last part ever seen.
        let span = t.span(next);
        let (first_seq, last_seq) = span.unwrap_or((
            t.seqs.0.first().map_or(0, |r| r.0),
            t.seqs.0.last().map_or(0, |r| r.1),
        ));
        let missing_seqs: Vec<(u64, u64)> = t
            .seqs
            .missing(first_seq, last_seq)
            .into_iter()
            .map(|(s, e)| (s, e - 1))
            .collect();
        let missing_bytes: u64 = missing.iter().map(|(s, e)| e - s).sum();
        if let Some((first, end)) = span.filter(|_| !missing.is_empty() || !missing_seqs.is_empty())
        {
            // Records were lost (not just a checksum refused): completing
            // the file later resolves the gaps among these.
            t.lost.add(first, end);
        }
        // A copy picked up again later is measured afresh.
        (t.lowest, t.highest) = (None, None);
        tracing::warn!(sink = %self.name, stream = %t.stream, file = %t.path, transfer = t.id(), missing_bytes,
            missing = ?missing, last_part_seen = t.sha256.is_some(), kept = %t.data,
            "files sink: file incomplete ({why}); not put in place, its data kept for a resend");
        (self.audit)(
            "file",
            json!({ "sink": self.name, "stream": t.stream, "path": t.path, "size": t.size,
                    "sha256": t.sha256, "transfer": t.id(), "complete": false, "reason": why,
                    "missing_bytes": ranges_json(&missing),
                    "missing_seqs": missing_seqs.iter().map(|(s, e)| json!([s, e])).collect::<Vec<_>>(),
                    "seqs": span.map(|(s, e)| json!([s, e - 1])),
                    "last_part_seen": t.sha256.is_some(), "kept": t.data }),
        );
        if self.incomplete.len() >= MAX_INCOMPLETE {
            if let Some(old) = self.incomplete.pop_front() {
                tracing::warn!(sink = %self.name, file = %old.path, transfer = old.id(), kept = %old.data,
                    "files sink: too many incomplete files remembered; this one's data stays but a resend no longer completes it");
            }
        }
        self.incomplete.push_back(t);
        Ok(())
    }

    /// Fsyncs the data written since the last call.
    fn sync_dirty(&mut self) -> std::io::Result<()> {
        for t in std::mem::take(&mut self.dirty) {
            if let Some(f) = self.handles.get(&t) {
                f.sync_data()?;
            }
        }
        Ok(())
    }
}

impl Sink for FilesSink {
    fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        for (at, r) in records.iter().enumerate() {
            let checked = match &r.body {
                RecordBody::File(p) => check_path(&p.path).and_then(|()| {
                    let end = p.offset.checked_add(p.data.len() as u64);
                    if end.is_some_and(|e| e <= p.size) {
                        Ok(p)
                    } else {
                        Err(format!(
                            "part of `{}` at offset {} with {} bytes lies past its size {}",
                            p.path,
                            p.offset,
                            p.data.len(),
                            p.size
                        ))
                    }
                }),
                other => Err(format!(
                    "a `{}` record is not a file part; route only `files` streams to this sink (`streams`)",
                    other.kind()
                )),
            };
            let result = match checked {
                Ok(p) => self.write_part(r, p),
                Err(reason) => Err(SinkError::Reject { at: 0, reason }),
            };
            match result {
                Ok(()) => {}
                Err(SinkError::Reject { reason, .. }) => {
                    tracing::warn!(sink = %self.name, stream = %r.stream, seq = r.seq,
                        "files sink: record refused ({reason}); dead-lettered");
                    self.sync_dirty()?;
                    return Err(SinkError::Reject { at, reason });
                }
                Err(SinkError::Retry { error, .. }) => {
                    // Writes are idempotent (parts land at their offsets):
                    // the whole batch is offered again.
                    let _ = self.sync_dirty();
                    return Err(SinkError::Retry {
                        confirmed: 0,
                        error: error
                            .context(format!("files sink: writing under {}", self.dir.display())),
                    });
                }
            }
        }
        self.sync_dirty()?;
        Ok(records.len())
    }

    fn resume_state(&self) -> Value {
        let state = Resume {
            open: self.open.values().cloned().collect(),
            incomplete: self.incomplete.iter().cloned().collect(),
            current: self.current.clone(),
            done: self.done.iter().copied().collect(),
        };
        serde_json::to_value(state).expect("json")
    }

    fn resume(&mut self, state: &Value) -> Result<()> {
        if state.is_null() {
            return Ok(());
        }
        let state: Resume = serde_json::from_value(state.clone())
            .context("the files sink's resume state does not read")?;
        self.current = state.current;
        self.done = state.done.into();
        for t in state.open {
            let data = self.dir.join(&t.data);
            match std::fs::metadata(&data) {
                Ok(m) if m.nlink() > 1 => {
                    // Linked into place before the stop: finish, once.
                    std::fs::remove_file(&data)
                        .with_context(|| format!("removing {}", data.display()))?;
                    tracing::info!(sink = %self.name, file = %t.path, transfer = t.id(),
                        "files sink: a file put in place just before the stop is complete");
                    (self.audit)(
                        "file",
                        json!({ "sink": self.name, "stream": t.stream, "path": t.path,
                                "size": t.size, "sha256": t.sha256, "transfer": t.id(), "complete": true }),
                    );
                    self.resolve_lost(&t);
                    self.remember_done(t.transfer);
                }
                Ok(_) => {
                    self.open.insert(t.transfer, t);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Put in place and its temporary name removed before
                    // the cursor was saved.
                    tracing::info!(sink = %self.name, file = %t.path, transfer = t.id(),
                        "files sink: a file completed just before the stop; its replayed parts are dropped");
                    self.remember_done(t.transfer);
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("reading {}", data.display()));
                }
            }
        }
        for t in state.incomplete {
            if self.dir.join(&t.data).exists() {
                self.incomplete.push_back(t);
            } else {
                tracing::warn!(sink = %self.name, file = %t.path, kept = %t.data,
                    "files sink: an incomplete file's data is gone (removed by an operator?); a resend starts it afresh");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weir-files-sink-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    type Events = Arc<Mutex<Vec<(String, Value)>>>;

    fn sink(dir: &Path) -> (FilesSink, Events) {
        let events: Events = Arc::default();
        let e = events.clone();
        let s = FilesSink::new(
            dir,
            "out",
            Box::new(move |ev, f| e.lock().unwrap().push((ev.to_string(), f))),
        )
        .unwrap();
        (s, events)
    }

    /// The parts of `content` as a `files` source sends them.
    fn parts(transfer: u64, path: &str, content: &[u8], chunk: usize) -> Vec<FilePart> {
        let sha: [u8; 32] = Sha256::digest(content).into();
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            let end = (offset + chunk).min(content.len());
            let last = end == content.len();
            out.push(FilePart {
                transfer,
                path: path.into(),
                size: content.len() as u64,
                mtime_ns: 1_600_000_000_123_456_789,
                mode: 0o640,
                offset: offset as u64,
                data: content[offset..end].to_vec(),
                sha256: last.then_some(sha),
            });
            if last {
                return out;
            }
            offset = end;
        }
    }

    fn delivered(seq: u64, p: &FilePart, resent: bool) -> Delivered {
        Delivered {
            stream: Arc::from("outbox"),
            source_type: Arc::from("files"),
            session: 1,
            epoch: 1,
            seq,
            resent,
            body: RecordBody::File(Box::new(p.clone())),
        }
    }

    fn write(s: &mut FilesSink, recs: &[Delivered]) -> Result<usize, SinkError> {
        let refs: Vec<&Delivered> = recs.iter().collect();
        s.write(&refs)
    }

    /// Every file under `dir`, relative, skipping `incomplete/`.
    fn listing(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    if p != dir.join(INCOMPLETE_DIR) {
                        stack.push(p);
                    }
                } else {
                    out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn ranges_merge_and_name_what_is_missing() {
        let mut r = Ranges::default();
        r.add(10, 20);
        r.add(30, 40);
        r.add(20, 25);
        assert_eq!(r.0, [(10, 25), (30, 40)]);
        assert_eq!(r.missing(0, 50), [(0, 10), (25, 30), (40, 50)]);
        r.add(0, 100);
        assert_eq!(r.0, [(0, 100)]);
        assert!(r.covers(0, 100) && !r.covers(0, 101));
    }

    #[test]
    fn a_file_appears_whole_with_its_mtime_and_mode_and_never_replaces_another() {
        let dir = scratch("whole");
        let (mut s, events) = sink(&dir);
        let content: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let ps = parts(7, "a/b/data.bin", &content, 4096);
        let recs: Vec<Delivered> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| delivered(i as u64, p, false))
            .collect();
        assert_eq!(write(&mut s, &recs[..2]).unwrap(), 2);
        assert_eq!(
            listing(&dir),
            ["a/b/.weir-0000000000000007.part"],
            "only the dotted temporary name"
        );
        assert_eq!(write(&mut s, &recs[2..]).unwrap(), 1);
        assert_eq!(listing(&dir), ["a/b/data.bin"]);
        let meta = std::fs::metadata(dir.join("a/b/data.bin")).unwrap();
        assert_eq!(std::fs::read(dir.join("a/b/data.bin")).unwrap(), content);
        assert_eq!(
            (meta.mtime(), meta.mtime_nsec()),
            (1_600_000_000, 123_456_789)
        );
        assert_eq!(meta.mode() & 0o777, 0o640);
        let ev = events.lock().unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].1["complete"], true);
        assert_eq!(ev[0].1["sha256"], hex(&Sha256::digest(&content)));
        drop(ev);
        // Late copies of its parts (a restarted sender) change nothing.
        assert_eq!(write(&mut s, &recs).unwrap(), 3);
        assert_eq!(listing(&dir), ["a/b/data.bin"]);
        // A second version of the same path gets a suffix.
        let ps2 = parts(8, "a/b/data.bin", b"v2", 4096);
        write(&mut s, &[delivered(3, &ps2[0], false)]).unwrap();
        assert_eq!(listing(&dir), ["a/b/data.bin", "a/b/data.bin.1"]);
        assert_eq!(std::fs::read(dir.join("a/b/data.bin.1")).unwrap(), b"v2");
        // An empty file is one part.
        let ps3 = parts(9, "empty", b"", 4096);
        write(&mut s, &[delivered(4, &ps3[0], false)]).unwrap();
        assert_eq!(std::fs::read(dir.join("empty")).unwrap(), b"");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_with_a_lost_part_is_kept_under_incomplete_and_a_resend_completes_it() {
        let dir = scratch("gap");
        let (mut s, events) = sink(&dir);
        let content = vec![5u8; 9000];
        let ps = parts(3, "x.csv", &content, 3000);
        // Part 1 (seq 11) lost on the link.
        write(
            &mut s,
            &[delivered(10, &ps[0], false), delivered(12, &ps[2], false)],
        )
        .unwrap();
        assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
        let kept = dir.join("incomplete/x.csv.0000000000000003.part");
        assert!(kept.exists());
        {
            let ev = events.lock().unwrap();
            assert_eq!(ev[0].1["complete"], false);
            assert_eq!(ev[0].1["path"], "x.csv");
            assert_eq!(ev[0].1["missing_bytes"], json!([[3000, 6000]]));
            assert_eq!(ev[0].1["missing_seqs"], json!([[11, 11]]));
        }
        // Survives a restart, then the resend fills it.
        let state = s.resume_state();
        let (mut s, events) = sink(&dir);
        s.resume(&state).unwrap();
        write(&mut s, &[delivered(11, &ps[1], true)]).unwrap();
        assert_eq!(listing(&dir), ["x.csv"]);
        assert_eq!(std::fs::read(dir.join("x.csv")).unwrap(), content);
        assert!(!kept.exists());
        let ev = events.lock().unwrap();
        assert_eq!(ev[0].1["complete"], true);
        // The transfer took seqs 10..=12: gaps among them are resolved.
        assert_eq!(ev[1].0, "gap-resolved");
        assert_eq!(
            (&ev[1].1["stream"], &ev[1].1["from"], &ev[1].1["to"]),
            (&json!("outbox"), &json!(10), &json!(12))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_completed_by_a_new_copy_resolves_the_seqs_its_lost_copy_took_first_and_last_parts_included(
    ) {
        let dir = scratch("resolve");
        let (mut s, events) = sink(&dir);
        let content: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let ps = parts(3, "x.bin", &content, 1000);
        // Seqs 100..=109; the first, a middle and the last part lost, then
        // the next file (seq 110) ends the transfer.
        let mut live: Vec<Delivered> = ps
            .iter()
            .enumerate()
            .filter(|(i, _)| ![0, 4, 9].contains(i))
            .map(|(i, p)| delivered(100 + i as u64, p, false))
            .collect();
        live.push(delivered(110, &parts(4, "next.bin", b"n", 1000)[0], false));
        write(&mut s, &live).unwrap();
        assert_eq!(listing(&dir), ["next.bin"]);
        {
            let ev = events.lock().unwrap();
            assert_eq!(ev[0].1["path"], "x.bin");
            assert_eq!(ev[0].1["complete"], false);
            assert_eq!(ev[0].1["seqs"], json!([100, 109]));
            assert_eq!(
                ev[0].1["missing_seqs"],
                json!([[100, 100], [104, 104], [109, 109]])
            );
            assert_eq!(ev.len(), 2, "{ev:?}");
        }
        // The whole file again under new seqs (a resend from disk).
        let again: Vec<Delivered> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| delivered(200 + i as u64, p, false))
            .collect();
        write(&mut s, &again).unwrap();
        assert_eq!(std::fs::read(dir.join("x.bin")).unwrap(), content);
        let ev = events.lock().unwrap();
        assert_eq!(
            (ev[2].1["path"].clone(), ev[2].1["complete"].clone()),
            (json!("x.bin"), json!(true))
        );
        assert_eq!(ev[3].0, "gap-resolved");
        let r = &ev[3].1;
        assert_eq!(
            (&r["from"], &r["to"], &r["file"]),
            (&json!(100), &json!(109), &json!("x.bin"))
        );
        assert!(
            r["resolution"]
                .as_str()
                .unwrap()
                .starts_with("resolved by resend of x.bin at 20"),
            "{r}"
        );
        assert_eq!(ev.len(), 4, "one resolution, none for next.bin: {ev:?}");
        drop(ev);
        // The last part seen (it brought the checksum), the first lost: the
        // new copy is judged at its own last part, not at each part.
        let ys = parts(5, "y.bin", &content[..5000], 1000);
        let first: Vec<Delivered> = ys
            .iter()
            .enumerate()
            .filter(|(i, _)| ![0, 2].contains(i))
            .map(|(i, p)| delivered(300 + i as u64, p, false))
            .collect();
        write(&mut s, &first).unwrap();
        let again: Vec<Delivered> = ys
            .iter()
            .enumerate()
            .map(|(i, p)| delivered(400 + i as u64, p, false))
            .collect();
        write(&mut s, &again).unwrap();
        assert_eq!(std::fs::read(dir.join("y.bin")).unwrap(), &content[..5000]);
        let ev = events.lock().unwrap();
        let lines: Vec<_> = ev[4..]
            .iter()
            .map(|(e, f)| {
                (
                    e.as_str(),
                    f["complete"].clone(),
                    f["from"].clone(),
                    f["to"].clone(),
                )
            })
            .collect();
        assert_eq!(
            lines,
            [
                ("file", json!(false), Value::Null, Value::Null),
                ("file", json!(true), Value::Null, Value::Null),
                ("gap-resolved", Value::Null, json!(300), json!(304)),
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_transfer_cut_off_by_the_next_one_is_incomplete() {
        let dir = scratch("cut");
        let (mut s, events) = sink(&dir);
        let a = parts(1, "a", &[1u8; 5000], 2000);
        let b = parts(2, "b", &[2u8; 10], 2000);
        write(
            &mut s,
            &[delivered(0, &a[0], false), delivered(1, &b[0], false)],
        )
        .unwrap();
        assert_eq!(listing(&dir), ["b"]);
        let ev = events.lock().unwrap();
        assert_eq!(ev[0].1["path"], "a");
        assert_eq!(ev[0].1["complete"], false);
        assert_eq!(ev[0].1["last_part_seen"], false);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_restart_mid_file_resumes_exactly_and_a_file_linked_before_the_stop_is_not_written_twice() {
        let dir = scratch("restart");
        let (mut s, _) = sink(&dir);
        let content: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let ps = parts(4, "r.bin", &content, 5000);
        let recs: Vec<Delivered> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| delivered(i as u64, p, false))
            .collect();
        write(&mut s, &recs[..2]).unwrap();
        let state = s.resume_state();
        drop(s);
        let (mut s, _) = sink(&dir);
        s.resume(&state).unwrap();
        // The journal replays from the cursor: parts 2.. (and maybe 1 again).
        write(&mut s, &recs[1..]).unwrap();
        assert_eq!(std::fs::read(dir.join("r.bin")).unwrap(), content);

        // Stopped after the link into place, before the temporary name went.
        let ps = parts(5, "s.bin", b"hello", 5000);
        let (mut s, events) = sink(&dir);
        let tmp = dir.join(".weir-0000000000000005.part");
        s.start("outbox", &ps[0]).unwrap();
        let state = s.resume_state();
        std::fs::write(&tmp, b"hello").unwrap();
        std::fs::hard_link(&tmp, dir.join("s.bin")).unwrap();
        drop(s);
        let (mut s, _) = sink(&dir);
        s.resume(&state).unwrap();
        write(&mut s, &[delivered(9, &ps[0], false)]).unwrap();
        assert_eq!(listing(&dir), ["r.bin", "s.bin"], "no s.bin.1");
        drop(events);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn paths_that_escape_dir_and_records_that_are_not_files_are_dead_lettered() {
        let dir = scratch("reject");
        let (mut s, _) = sink(&dir);
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/../../b",
            "a//b",
            "./a",
            "incomplete/x",
            "a/.weir-1.part",
        ] {
            let ps = parts(1, bad, b"x", 10);
            let good = parts(2, "ok", b"y", 10);
            let err = write(
                &mut s,
                &[delivered(0, &good[0], false), delivered(1, &ps[0], false)],
            )
            .unwrap_err();
            assert!(
                matches!(err, SinkError::Reject { at: 1, .. }),
                "{bad}: {err:?}"
            );
        }
        let mut past = parts(3, "p", b"abc", 10);
        past[0].offset = 1;
        assert!(matches!(
            write(&mut s, &[delivered(5, &past[0], false)]),
            Err(SinkError::Reject { at: 0, .. })
        ));
        let other = Delivered {
            body: RecordBody::Bytes(weir_protocol::Chunk {
                data: vec![1],
                end: false,
            }),
            ..delivered(6, &parts(4, "q", b"", 1)[0], false)
        };
        assert!(matches!(
            write(&mut s, &[other]),
            Err(SinkError::Reject { at: 0, .. })
        ));
        assert_eq!(listing(&dir), ["ok"]);
        assert!(!dir.parent().unwrap().join("etc/passwd").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_checksum_mismatch_is_never_put_in_place() {
        let dir = scratch("sha");
        let (mut s, events) = sink(&dir);
        let mut ps = parts(6, "c", b"content", 100);
        ps[0].sha256 = Some([0; 32]);
        write(&mut s, &[delivered(0, &ps[0], false)]).unwrap();
        assert!(listing(&dir).is_empty());
        let ev = events.lock().unwrap();
        assert_eq!(ev[0].1["complete"], false);
        assert!(ev[0].1["reason"]
            .as_str()
            .unwrap()
            .contains("SHA-256 mismatch"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_refused_by_its_checksum_waits_for_a_whole_new_copy_and_is_audited_once_each_way() {
        let dir = scratch("sha-again");
        let (mut s, events) = sink(&dir);
        let content: Vec<u8> = (0..12_000u32).map(|i| (i % 251) as u8).collect();
        let good = parts(9, "d.bin", &content, 3000);
        let mut bad = good.clone();
        bad[1].data = vec![0; 3000]; // corrupted at the source
        let recs = |ps: &[FilePart], seq0: u64| -> Vec<Delivered> {
            ps.iter()
                .enumerate()
                .map(|(i, p)| delivered(seq0 + i as u64, p, false))
                .collect()
        };
        write(&mut s, &recs(&bad, 0)).unwrap();
        assert!(listing(&dir).is_empty());
        // Survives a restart, then the whole file comes again (resend from disk).
        let state = s.resume_state();
        let (mut s, events2) = sink(&dir);
        s.resume(&state).unwrap();
        for r in recs(&good, 10) {
            write(&mut s, &[r]).unwrap();
        }
        assert_eq!(listing(&dir), ["d.bin"]);
        assert_eq!(std::fs::read(dir.join("d.bin")).unwrap(), content);
        let before = events.lock().unwrap();
        assert_eq!(before.len(), 1);
        assert_eq!(before[0].1["complete"], false);
        let after = events2.lock().unwrap();
        assert_eq!(
            after.len(),
            1,
            "no `complete: false` line per part of the new copy: {after:?}"
        );
        assert_eq!(after[0].1["complete"], true);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
