//! The audit log: append-only JSON Lines of everything an auditor needs to
//! account for: receiver starts, sender sessions and configuration hashes,
//! gaps with their exact sequence ranges and causes, heartbeat loss.
//!
//! The lines form a hash chain: each ends with `"prev"`, the hex SHA-256 of
//! the previous line's bytes (without its newline), and 64 zeros on a file's
//! first line. Removing, inserting, reordering or altering a line breaks the
//! chain at a line after it, which [`verify`] finds. The chain cannot show
//! changes to the last line or lines removed from the end: only a copy of
//! the last line's hash kept elsewhere can.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// `prev` of a file's first line: there is no previous line.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Keys the log adds to every line; an event's own fields must not use them.
const RESERVED: [&str; 3] = ["event", "at", "prev"];

/// Bytes read per step when scanning the file backwards for the last line.
const TAIL_CHUNK: usize = 64 * 1024;

/// `verify` rejects longer lines instead of buffering them: the receiver's
/// own lines are a few hundred bytes, so such a line is damage, and the
/// bound keeps a damaged file from taking all memory.
const MAX_LINE: usize = 1 << 20;

pub struct AuditLog {
    file: File,
    path: PathBuf,
    dirty: bool,
    /// `prev` of the next line: the hash of the last line in the file.
    prev: String,
    /// A write failed part-way: the file may end in a partial line, so it
    /// is repaired before the next write.
    torn: bool,
    /// Failed writes and syncs: each is an ERROR line carrying the event,
    /// and the next write retries (delivery does not stop for them).
    pub errors: u64,
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Hex SHA-256 of one line's bytes, without its newline.
pub fn line_hash(line: &[u8]) -> String {
    hex(&Sha256::digest(line))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl AuditLog {
    /// Opens (or creates) the log and continues its chain from the last
    /// complete line. A partial last line (a write cut short by a crash or
    /// a full disk) is truncated, logged, and audited as `audit-repaired`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("audit.path: cannot create directory {}", dir.display())
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .with_context(|| format!("audit.path: cannot open {} for appending", path.display()))?;
        let mut log = AuditLog {
            file,
            path: path.to_path_buf(),
            dirty: false,
            prev: GENESIS_PREV.to_string(),
            torn: false,
            errors: 0,
        };
        log.resume().with_context(|| {
            format!(
                "audit.path: cannot read the end of {} to continue its hash chain",
                path.display()
            )
        })?;
        Ok(log)
    }

    /// Appends one event; `fields` must be a JSON object. The event name
    /// comes first, then `fields`, then `at` (RFC 3339, UTC, nanoseconds)
    /// and last `prev`, the hash of the previous line.
    pub fn write(&mut self, event: &str, fields: Value) {
        if self.torn {
            self.torn = false;
            if let Err(e) = self.resume() {
                self.torn = true;
                self.errors += 1;
                tracing::error!(
                    "audit.path: cannot repair {} after a failed write: {e}; event was: {event} {fields}",
                    self.path.display()
                );
                return;
            }
            if self.torn {
                // Writing `audit-repaired` failed too; it logged and counted it.
                tracing::error!(
                    "audit.path: {} is still not writable; event was: {event} {fields}",
                    self.path.display()
                );
                return;
            }
        }
        self.append(event, fields);
    }

    fn append(&mut self, event: &str, fields: Value) {
        let mut line = serde_json::Map::new();
        line.insert("event".into(), json!(event));
        if let Value::Object(map) = fields {
            debug_assert!(
                RESERVED.iter().all(|k| !map.contains_key(*k)),
                "audit event {event} uses a reserved key"
            );
            line.extend(
                map.into_iter()
                    .filter(|(k, _)| !RESERVED.contains(&k.as_str())),
            );
        }
        line.insert("at".into(), json!(now_rfc3339()));
        line.insert("prev".into(), json!(self.prev));
        let mut text = serde_json::to_string(&Value::Object(line)).expect("json");
        let hash = line_hash(text.as_bytes());
        text.push('\n');
        match self.file.write_all(text.as_bytes()) {
            Ok(()) => self.prev = hash,
            Err(e) => {
                // The audit log is the record of losses: failing to write it
                // is as loud as we can make it, but it must not stop delivery.
                tracing::error!(
                    "audit.path: cannot append to {}: {e}; event was: {}",
                    self.path.display(),
                    text.trim()
                );
                self.torn = true;
                self.errors += 1;
            }
        }
        self.dirty = true;
    }

    /// Makes written events durable; called on a timer and at exit.
    pub fn sync(&mut self) {
        if self.dirty {
            if let Err(e) = self.file.sync_data() {
                self.errors += 1;
                tracing::error!("audit.path: cannot sync {}: {e}", self.path.display());
            }
            self.dirty = false;
        }
    }

    /// Sets `prev` from the file's last complete line, first truncating a
    /// partial line after it so the chain never continues from garbage.
    fn resume(&mut self) -> io::Result<()> {
        let len = self.file.metadata()?.len();
        let complete = last_newline_before(&self.file, len)?.map_or(0, |nl| nl + 1);
        let truncated = len - complete;
        if truncated > 0 {
            self.file.set_len(complete)?;
            self.file.sync_data()?;
        }
        self.prev = if complete == 0 {
            GENESIS_PREV.to_string()
        } else {
            let start = last_newline_before(&self.file, complete - 1)?.map_or(0, |nl| nl + 1);
            hash_range(&self.file, start, complete - 1)?
        };
        if truncated > 0 {
            tracing::warn!(
                truncated_bytes = truncated,
                "audit.path: {} ended in a partial line; truncated {truncated} bytes back to the last complete line",
                self.path.display()
            );
            self.append("audit-repaired", json!({ "truncated_bytes": truncated }));
        }
        Ok(())
    }
}

/// Offset of the last `\n` before `end`, scanning backwards.
fn last_newline_before(file: &File, end: u64) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; TAIL_CHUNK];
    let mut hi = end;
    while hi > 0 {
        let lo = hi.saturating_sub(TAIL_CHUNK as u64);
        let chunk = &mut buf[..(hi - lo) as usize];
        file.read_exact_at(chunk, lo)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

/// Hex SHA-256 of the bytes `start..end` of `file`.
fn hash_range(file: &File, start: u64, end: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; TAIL_CHUNK];
    let mut at = start;
    while at < end {
        let n = (end - at).min(TAIL_CHUNK as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex(&hasher.finalize()))
}

/// Events sinks hand to the audit log, which the journal thread owns and
/// writes ([`drain_sink_events`], each loop): a `files` sink's line per
/// file, and its `gap-resolved` lines. Bounded: a sink that finds it full logs the event as an ERROR
/// instead (the journal thread drains it within milliseconds, so only a
/// stalled receiver fills it).
const SINK_EVENTS: usize = 4096;

type SinkEvent = (String, Value);

fn sink_events() -> &'static (
    std::sync::mpsc::SyncSender<SinkEvent>,
    std::sync::Mutex<std::sync::mpsc::Receiver<SinkEvent>>,
) {
    static CHANNEL: std::sync::OnceLock<(
        std::sync::mpsc::SyncSender<SinkEvent>,
        std::sync::Mutex<std::sync::mpsc::Receiver<SinkEvent>>,
    )> = std::sync::OnceLock::new();
    CHANNEL.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel(SINK_EVENTS);
        (tx, std::sync::Mutex::new(rx))
    })
}

/// Queues an audit event from a sink thread (see [`SINK_EVENTS`]).
pub fn sink_event(event: &str, fields: Value) {
    if let Err(e) = sink_events().0.try_send((event.to_string(), fields)) {
        let (event, fields) = match e {
            std::sync::mpsc::TrySendError::Full(v)
            | std::sync::mpsc::TrySendError::Disconnected(v) => v,
        };
        tracing::error!(
            "audit: {SINK_EVENTS} sink events wait for the audit log; this one is only in this log line: {event} {fields}"
        );
    }
}

/// Writes the events sinks queued (journal thread), showing each to
/// `written` once it is in the log.
pub fn drain_sink_events(log: &mut AuditLog, mut written: impl FnMut(&str, &Value)) {
    let rx = sink_events().1.lock().unwrap_or_else(|p| p.into_inner());
    while let Ok((event, fields)) = rx.try_recv() {
        log.write(&event, fields.clone());
        written(&event, &fields);
    }
}

/// An audit log whose every line checked out.
#[derive(Debug, PartialEq, Eq)]
pub struct Intact {
    pub lines: u64,
    /// Hash of the last line ([`GENESIS_PREV`] for an empty file): the one
    /// value that, kept elsewhere, also proves the end was not cut off.
    pub last_hash: String,
}

/// The first line that failed, 1-based, and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    pub line: u64,
    pub reason: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// Checks every line of an audit log and stops at the first bad one. A line
/// is good when it ends in a newline, is a JSON object with a string
/// `event`, an RFC 3339 `at` and a `prev` equal to the hash of the line
/// before it (64 zeros on line 1). So a line altered in place shows at the
/// line after it, a removed line at the line that took its place, and two
/// swapped lines at the first of them. The outer error is an I/O error.
pub fn verify(mut reader: impl BufRead) -> io::Result<Result<Intact, Broken>> {
    let mut prev = GENESIS_PREV.to_string();
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Ok(Ok(Intact {
                lines: line_no,
                last_hash: prev,
            }));
        }
        line_no += 1;
        let broken = |reason: String| {
            Ok(Err(Broken {
                line: line_no,
                reason,
            }))
        };
        if buf.last() != Some(&b'\n') {
            if buf.len() > MAX_LINE {
                return broken(format!("longer than {MAX_LINE} bytes"));
            }
            return broken(
                "no newline at the end: the last write was cut short (the receiver truncates it when it next starts)"
                    .into(),
            );
        }
        let content = &buf[..buf.len() - 1];
        if let Err(reason) = check_line(content, &prev, line_no) {
            return broken(reason);
        }
        prev = line_hash(content);
    }
}

fn check_line(content: &[u8], prev: &str, line_no: u64) -> Result<(), String> {
    let value: Value = serde_json::from_slice(content).map_err(|e| format!("not JSON ({e})"))?;
    let obj = value.as_object().ok_or("not a JSON object")?;
    match obj.get("event") {
        None => return Err("missing event".into()),
        Some(v) if !v.is_string() => return Err("event is not a string".into()),
        Some(_) => {}
    }
    match obj.get("at") {
        None => return Err("missing at".into()),
        Some(Value::String(at)) => {
            chrono::DateTime::parse_from_rfc3339(at)
                .map_err(|e| format!("at is not an RFC 3339 time ({e})"))?;
        }
        Some(_) => return Err("at is not a string".into()),
    }
    let claimed = match obj.get("prev") {
        None => return Err("missing prev".into()),
        Some(Value::String(p)) => p,
        Some(_) => return Err("prev is not a string".into()),
    };
    if claimed.len() != 64
        || !claimed
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err("prev is not a SHA-256 in lowercase hex".into());
    }
    if claimed != prev {
        return Err(if line_no == 1 {
            "prev is not 64 zeros, so the chain does not start here (lines were removed from the start, or the file continues another)".into()
        } else {
            format!(
                "prev does not match line {} (a line was removed, inserted or altered before this one)",
                line_no - 1
            )
        });
    }
    Ok(())
}

/// `weir-receiver audit verify FILE`: prints the verdict; false when the
/// chain is broken.
pub fn verify_file(path: &Path) -> Result<bool> {
    let file =
        File::open(path).with_context(|| format!("cannot open audit log {}", path.display()))?;
    let verdict = verify(io::BufReader::new(file))
        .with_context(|| format!("reading audit log {}", path.display()))?;
    let mut out = io::stdout().lock();
    // A closed pipe is not worth a panic; the exit status still tells.
    Ok(match verdict {
        Ok(intact) => {
            let _ = writeln!(
                out,
                "{}: {} lines, chain intact\n{}: last line sha256 {}",
                path.display(),
                intact.lines,
                path.display(),
                intact.last_hash
            );
            true
        }
        Err(broken) => {
            let _ = writeln!(out, "{}: {broken}", path.display());
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("weir-audit-test-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A log of `n` gap events written through [`AuditLog`].
    fn written_log(dir: &TempDir, n: u64) -> PathBuf {
        let path = dir.0.join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        for i in 0..n {
            log.write(
                "gap",
                json!({ "stream": "plant/a", "from": i * 10, "to": i * 10 + 4, "cause": "link-loss" }),
            );
        }
        log.sync();
        path
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn verify_lines(lines: &[String]) -> Result<Intact, Broken> {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        verify(text.as_bytes()).unwrap()
    }

    fn broken_at(lines: &[String]) -> u64 {
        match verify_lines(lines) {
            Ok(i) => panic!("verify passed ({} lines)", i.lines),
            Err(b) => b.line,
        }
    }

    #[test]
    fn lines_put_event_first_and_prev_last_and_the_first_prev_is_zeros() {
        let dir = TempDir::new("order");
        let path = written_log(&dir, 2);
        let lines = lines(&path);
        let keys = |l: &str| -> Vec<String> {
            let v: serde_json::Map<String, Value> = serde_json::from_str(l).unwrap();
            v.keys().cloned().collect()
        };
        assert_eq!(
            keys(&lines[0]),
            ["event", "stream", "from", "to", "cause", "at", "prev"]
        );
        let first: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["prev"], GENESIS_PREV);
        let second: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["prev"], line_hash(lines[0].as_bytes()));
    }

    #[test]
    fn the_chain_continues_across_reopen() {
        let dir = TempDir::new("reopen");
        let path = written_log(&dir, 3);
        let mut log = AuditLog::open(&path).unwrap();
        log.write("receiver-stop", json!({}));
        drop(log);
        let lines = lines(&path);
        assert_eq!(lines.len(), 4);
        let last: Value = serde_json::from_str(&lines[3]).unwrap();
        assert_eq!(last["prev"], line_hash(lines[2].as_bytes()));
        assert_eq!(verify_lines(&lines).unwrap().lines, 4);
    }

    #[test]
    fn verify_passes_on_an_intact_log_and_names_the_last_hash() {
        let dir = TempDir::new("intact");
        let path = written_log(&dir, 5);
        let lines = lines(&path);
        let intact = verify(io::BufReader::new(File::open(&path).unwrap()))
            .unwrap()
            .unwrap();
        assert_eq!(intact.lines, 5);
        assert_eq!(intact.last_hash, line_hash(lines[4].as_bytes()));
        assert!(verify_file(&path).unwrap());
    }

    #[test]
    fn verify_passes_on_an_empty_file() {
        assert_eq!(
            verify(&b""[..]).unwrap(),
            Ok(Intact {
                lines: 0,
                last_hash: GENESIS_PREV.into()
            })
        );
    }

    #[test]
    fn editing_any_field_of_a_middle_line_is_reported_at_the_next_line() {
        let dir = TempDir::new("edit");
        let lines = lines(&written_log(&dir, 6));
        let edits: [(&str, Value); 6] = [
            ("event", json!("gap2")),
            ("stream", json!("plant/b")),
            ("from", json!(21)),
            ("to", json!(23)),
            ("cause", json!("receiver-down")),
            ("at", json!("2020-01-01T00:00:00.000000000Z")),
        ];
        for (key, value) in edits {
            let mut edited = lines.clone();
            let mut v: Value = serde_json::from_str(&edited[2]).unwrap();
            v[key] = value;
            edited[2] = serde_json::to_string(&v).unwrap();
            assert_eq!(broken_at(&edited), 4, "editing {key} of line 3");
        }
        // An edit that keeps the value and only changes the bytes counts too.
        let mut spaced = lines.clone();
        spaced[2] = spaced[2].replacen(',', ", ", 1);
        assert_eq!(broken_at(&spaced), 4);
        // Editing a line's own prev shows at that line.
        let mut v: Value = serde_json::from_str(&lines[2]).unwrap();
        v["prev"] = json!(line_hash(b"something else"));
        let mut edited = lines.clone();
        edited[2] = serde_json::to_string(&v).unwrap();
        let err = verify_lines(&edited).unwrap_err();
        assert_eq!(err.line, 3);
        assert_eq!(
            err.to_string(),
            "line 3: prev does not match line 2 (a line was removed, inserted or altered before this one)"
        );
    }

    #[test]
    fn deleting_a_line_is_reported_at_the_line_that_took_its_place() {
        let dir = TempDir::new("delete");
        let lines = lines(&written_log(&dir, 6));
        for k in 0..5 {
            let mut cut = lines.clone();
            cut.remove(k);
            assert_eq!(broken_at(&cut), k as u64 + 1, "deleting line {}", k + 1);
        }
        // Removing lines from the end cannot show in the chain.
        assert_eq!(verify_lines(&lines[..5]).unwrap().lines, 5);
    }

    #[test]
    fn inserting_a_line_is_reported_at_it_or_after_it() {
        let dir = TempDir::new("insert");
        let lines = lines(&written_log(&dir, 6));
        let forged = |prev: &str| {
            format!(
                r#"{{"event":"gap","stream":"plant/a","from":1,"to":2,"cause":"link-loss","at":"2026-01-01T00:00:00.000000000Z","prev":"{prev}"}}"#
            )
        };
        // With a guessed prev the inserted line itself fails.
        let mut naive = lines.clone();
        naive.insert(3, forged(GENESIS_PREV));
        assert_eq!(broken_at(&naive), 4);
        // With the right prev, the line after it no longer matches.
        let mut careful = lines.clone();
        careful.insert(3, forged(&line_hash(lines[2].as_bytes())));
        assert_eq!(broken_at(&careful), 5);
    }

    #[test]
    fn swapping_two_lines_is_reported_at_the_first_of_them() {
        let dir = TempDir::new("swap");
        let lines = lines(&written_log(&dir, 6));
        let mut adjacent = lines.clone();
        adjacent.swap(2, 3);
        assert_eq!(broken_at(&adjacent), 3);
        let mut apart = lines.clone();
        apart.swap(1, 4);
        assert_eq!(broken_at(&apart), 2);
    }

    #[test]
    fn verify_names_malformed_lines() {
        let dir = TempDir::new("malformed");
        let lines = lines(&written_log(&dir, 4));
        let mut not_json = lines.clone();
        not_json[2] = "{\"event\":".into();
        let err = verify_lines(&not_json).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.reason.starts_with("not JSON"), "{err}");

        for (key, reason) in [
            ("prev", "missing prev"),
            ("at", "missing at"),
            ("event", "missing event"),
        ] {
            let mut v: serde_json::Map<String, Value> = serde_json::from_str(&lines[1]).unwrap();
            v.remove(key);
            let mut edited = lines.clone();
            edited[1] = serde_json::to_string(&v).unwrap();
            assert_eq!(
                verify_lines(&edited).unwrap_err().to_string(),
                format!("line 2: {reason}")
            );
        }

        let mut other_file = lines[1..].to_vec();
        other_file.truncate(2);
        let err = verify_lines(&other_file).unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.reason.starts_with("prev is not 64 zeros"), "{err}");
    }

    #[test]
    fn verify_reports_a_last_line_without_its_newline() {
        let dir = TempDir::new("torn-verify");
        let path = written_log(&dir, 3);
        let mut text = std::fs::read(&path).unwrap();
        text.pop();
        let err = verify(&text[..]).unwrap().unwrap_err();
        assert_eq!(err.line, 3);
        assert!(err.reason.starts_with("no newline at the end"), "{err}");
        text.extend_from_slice(b"\n{\"event\":\"ga");
        assert_eq!(verify(&text[..]).unwrap().unwrap_err().line, 4);
    }

    #[test]
    fn a_torn_tail_is_truncated_on_open_and_audited_as_repaired() {
        let dir = TempDir::new("torn-open");
        let path = written_log(&dir, 3);
        let intact = std::fs::read(&path).unwrap();
        let partial = b"{\"event\":\"gap\",\"stream\":\"pla";
        let mut torn = intact.clone();
        torn.extend_from_slice(partial);
        std::fs::write(&path, &torn).unwrap();

        let mut log = AuditLog::open(&path).unwrap();
        log.write("receiver-start", json!({}));
        drop(log);
        let after = std::fs::read(&path).unwrap();
        assert!(after.starts_with(&intact), "complete lines are kept");
        let lines = lines(&path);
        assert_eq!(lines.len(), 5);
        let repaired: Value = serde_json::from_str(&lines[3]).unwrap();
        assert_eq!(repaired["event"], "audit-repaired");
        assert_eq!(repaired["truncated_bytes"], partial.len());
        assert_eq!(repaired["prev"], line_hash(lines[2].as_bytes()));
        assert_eq!(verify_lines(&lines).unwrap().lines, 5);
    }

    #[test]
    fn a_file_that_is_only_a_partial_line_restarts_the_chain() {
        let dir = TempDir::new("torn-only");
        let path = dir.0.join("audit.jsonl");
        std::fs::write(&path, b"{\"ev").unwrap();
        drop(AuditLog::open(&path).unwrap());
        let lines = lines(&path);
        assert_eq!(lines.len(), 1);
        let v: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["event"], "audit-repaired");
        assert_eq!(v["truncated_bytes"], 4);
        assert_eq!(v["prev"], GENESIS_PREV);
    }

    #[test]
    fn the_last_line_is_found_across_read_chunks() {
        let dir = TempDir::new("chunks");
        let path = dir.0.join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        let long = "x".repeat(TAIL_CHUNK + 100);
        log.write("sender-status", json!({ "note": long }));
        log.write("sender-status", json!({ "note": long }));
        drop(log);
        let mut log = AuditLog::open(&path).unwrap();
        log.write("receiver-stop", json!({}));
        drop(log);
        assert_eq!(verify_lines(&lines(&path)).unwrap().lines, 3);
    }
}
