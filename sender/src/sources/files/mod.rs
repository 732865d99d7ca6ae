//! `files`: watches a directory on the OT side and sends each complete file
//! as a transfer: a run of `File` records (relative path, size, mtime,
//! mode, offset, data; the last one carries the SHA-256 of the whole file).
//!
//! - **When a file is taken.** The directory is scanned (recursively) every
//!   `settle / 2` (at most every second). A file is taken once its size and
//!   mtime were the same at scans `settle` apart, or at once if its mtime
//!   was already older than `settle` when it was first seen (a file written
//!   elsewhere and renamed in, or there before the sender started). Writers
//!   should write `NAME.tmp` and rename it to `NAME` when done: names ending
//!   in `.tmp` and names starting with `.` (files and directories) are never
//!   taken, nor is anything under `sent_dir` or that is not a regular file
//!   (symlinks are not followed).
//! - **Flow.** Files go one at a time, in (mtime, path) order. Content is
//!   read in `chunk_size` parts only while the spool has room for byte
//!   streams (the same high-water mark as the `tcp` source), so a file far
//!   larger than the spool streams from the file itself and the sender's
//!   memory stays at a few chunks.
//! - **After.** Once the last part is fsynced in the spool (from there the
//!   spool delivers it, across restarts too), the file is moved under
//!   `sent_dir` (`after = "move"`, default), deleted (`"delete"`) or left
//!   where it is (`"keep"`: the state file remembers its size and mtime, and
//!   an unchanged file is never sent again). A file that changed while it
//!   was read is left alone and sent again as a new transfer.
//! - **Restarts.** The file being sent is recorded (path, size, mtime,
//!   transfer id) in `DIR/.weir-files/state.json` before its first part is
//!   spooled. After a crash or kill the same file is sent again, whole,
//!   under the same transfer id: the receiver writes parts at their offsets
//!   and completes the transfer once, whichever copy of each part it gets.
//! - **History and resends.** Each file sent is appended to
//!   `DIR/.weir-files/sent.jsonl` (path, transfer id, size, mtime, mode,
//!   SHA-256, where its content stayed), bounded in bytes ([`history`]).
//!   `weir-sender resend --file NAME` reads it: if the spool still holds
//!   every part, it asks the link thread to send them again; otherwise it
//!   queues a request in `DIR/.weir-files/resend/`, which this source
//!   takes between files and sends the file again from disk, whole, under
//!   its old transfer id, so the receiver completes what it kept under
//!   `incomplete/`.
//! - **CSV.** With `csv = { ... }` each row of a file becomes a `Point`
//!   ([`csv`]); bad rows are counted and logged with file and line.

pub mod csv;
pub mod history;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use weir_protocol::units::parse_size;
use weir_protocol::{FilePart, RecordBody};

use super::{Source, SourceHandle};
use crate::metrics::Counters;

/// The source's own directory under `dir` (skipped by the scan: it starts
/// with a dot).
pub const STATE_DIR: &str = ".weir-files";
/// Files seen in one scan at most; the rest wait for a later scan (a bound
/// on the memory the scan holds, logged when hit).
const MAX_FILES_PER_SCAN: usize = 100_000;
/// Bytes of `after = "keep"` state at most (paths vary in size, so a count
/// would not bound it): `state.json` holds it and is rewritten twice per
/// file sent, so 4 MiB (about 60,000 files with 40-byte paths) keeps that
/// write small. Entries of files that are gone are pruned at each scan.
const MAX_KEPT_BYTES: usize = 4 << 20;
/// What one kept entry costs in `state.json`, besides its path: the JSON
/// punctuation and two numbers.
const KEPT_ENTRY_OVERHEAD: usize = 48;

/// The bytes the kept entries take in `state.json` (about).
fn kept_bytes(kept: &BTreeMap<String, (u64, i64)>) -> usize {
    kept.keys().map(|k| k.len() + KEPT_ENTRY_OVERHEAD).sum()
}

/// Forgets kept files that are gone; true if any was. A truncated scan
/// did not see every file, so it proves nothing gone and prunes nothing
/// (pruning a file it missed would send it again).
fn prune_kept(
    kept: &mut BTreeMap<String, (u64, i64)>,
    present: &std::collections::HashSet<&str>,
    truncated: bool,
) -> bool {
    if truncated {
        return false;
    }
    let before = kept.len();
    kept.retain(|k, _| present.contains(k.as_str()));
    kept.len() != before
}

/// Whether a file sent with `after = "keep"` can be remembered: a file
/// that could not be would be sent again at every scan, so it is not
/// taken until kept files are removed from `dir`.
fn keep_has_room(kept: &BTreeMap<String, (u64, i64)>, kept_total: usize, rel: &str) -> bool {
    kept.contains_key(rel) || kept_total + rel.len() + KEPT_ENTRY_OVERHEAD <= MAX_KEPT_BYTES
}
/// Resend requests carried out between two scans at most (each is a whole
/// file; new files are not held back longer than this).
const MAX_RESENDS_PER_SCAN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum After {
    #[default]
    Move,
    Delete,
    Keep,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The directory to watch (subdirectories included).
    pub dir: PathBuf,
    /// How long a file's size and mtime must stay the same before it is
    /// taken: `2s`, `500ms`, `1m`.
    #[serde(default = "default_settle")]
    pub settle: String,
    /// What to do with a file once it is sent: `move`, `delete` or `keep`.
    #[serde(default)]
    pub after: After,
    /// Where `after = "move"` puts sent files (relative paths kept);
    /// default `DIR/sent`, which the scan skips.
    #[serde(default)]
    pub sent_dir: Option<PathBuf>,
    /// Bytes of file content per record.
    #[serde(default = "default_chunk")]
    pub chunk_size: String,
    /// CSV mode: rows become points by this column mapping, instead of
    /// the file crossing as a transfer.
    // The effective TOML (check-config) cannot hold a None in a table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csv: Option<csv::CsvConfig>,
}

fn default_settle() -> String {
    "2s".into()
}

fn default_chunk() -> String {
    "256KiB".into()
}

/// Parses `settle`: `500ms`, or a duration as elsewhere (`2s`, `1m`).
pub fn parse_settle(text: &str) -> Result<Duration, String> {
    if let Some(ms) = text.trim().strip_suffix("ms") {
        let n: u64 = ms
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not a duration; write e.g. 500ms, 2s or 1m"))?;
        return Ok(Duration::from_millis(n));
    }
    crate::config::parse_duration(text)
}

impl Config {
    /// The source's own directory: state, history, resend requests.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(STATE_DIR)
    }

    pub fn sent_dir(&self) -> PathBuf {
        self.sent_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("sent"))
    }
}

impl Source for Config {
    const TYPE: &'static str = "files";

    fn validate(&self) -> Result<(), String> {
        if !self.dir.is_absolute() {
            return Err(format!(
                "dir: `{}` must be an absolute path",
                self.dir.display()
            ));
        }
        let settle = parse_settle(&self.settle).map_err(|e| format!("settle: {e}"))?;
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&settle) {
            return Err(format!(
                "settle: {} must be between 100ms and 1h",
                self.settle
            ));
        }
        let size = parse_size(&self.chunk_size).map_err(|e| format!("chunk_size: {e}"))?;
        if !((4 << 10)..=(4 << 20)).contains(&size) {
            return Err(format!(
                "chunk_size: {} must be between 4KiB and 4MiB",
                self.chunk_size
            ));
        }
        if let Some(sent) = &self.sent_dir {
            if !sent.is_absolute() {
                return Err(format!(
                    "sent_dir: `{}` must be an absolute path",
                    sent.display()
                ));
            }
            if self.after != After::Move {
                return Err("sent_dir: only used with after = \"move\"; leave it out".into());
            }
        }
        if let Some(c) = &self.csv {
            c.validate().map_err(|e| format!("csv.{e}"))?;
        }
        Ok(())
    }

    async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        run(self, handle).await
    }
}

/// What the source keeps across restarts (`DIR/.weir-files/state.json`).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    /// The file being sent when the state was saved.
    inflight: Option<Inflight>,
    /// `after = "keep"`: files sent, by relative path: (size, mtime_ns).
    kept: BTreeMap<String, (u64, i64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Inflight {
    path: String,
    size: u64,
    mtime_ns: i64,
    transfer: u64,
    /// CSV mode: rows (good and bad) whose points are durably spooled; a
    /// restart goes on after them.
    #[serde(default)]
    csv_rows: u64,
}

/// A regular file found by a scan.
#[derive(Debug, Clone)]
struct Found {
    rel: String,
    abs: PathBuf,
    size: u64,
    mtime_ns: i64,
    mode: u32,
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// True for names the source never takes: dotfiles and `*.tmp`.
pub fn is_ignored(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp")
}

/// Every regular file under `dir` (not following symlinks), skipping
/// ignored names and `skip` (the sent directory), at most `max`.
fn scan(dir: &Path, skip: &Path, max: usize) -> std::io::Result<(Vec<Found>, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    let mut truncated = false;
    while let Some((at, prefix)) = stack.pop() {
        let entries = match std::fs::read_dir(&at) {
            Ok(e) => e,
            // A subdirectory removed while we looked.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && at != dir => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                tracing::warn!(path = %entry.path().display(), "files source: a name that is not UTF-8 is skipped; rename it");
                continue;
            };
            if is_ignored(&name) {
                continue;
            }
            let path = entry.path();
            if path == skip {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // gone meanwhile
            };
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if meta.is_dir() {
                stack.push((path, rel));
            } else if meta.is_file() {
                if out.len() >= max {
                    truncated = true;
                    continue;
                }
                out.push(Found {
                    rel,
                    abs: path,
                    size: meta.len(),
                    mtime_ns: mtime_ns(&meta),
                    mode: meta.mode() & 0o7777,
                });
            }
        }
    }
    Ok((out, truncated))
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_DIR).join("state.json")
}

fn load_state(dir: &Path) -> anyhow::Result<State> {
    let path = state_path(dir);
    match weir_store::read_if_present(&path)? {
        Some(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "files source: {} is corrupt; move it away (files kept with after = \"keep\" are then sent again)",
                path.display()
            )
        }),
        None => Ok(State::default()),
    }
}

fn save_state(dir: &Path, state: &State) -> anyhow::Result<()> {
    let path = state_path(dir);
    weir_store::write_atomically(&path, &serde_json::to_vec_pretty(state).expect("json"))
        .with_context(|| format!("files source: saving {}", path.display()))
}

/// How one file's transfer ended.
enum Sent {
    /// Every part is fsynced in the spool.
    Done,
    /// Shutdown came first; the state keeps it in flight.
    Interrupted,
}

async fn run(cfg: Config, mut handle: SourceHandle) -> anyhow::Result<()> {
    let name = handle.stream().to_string();
    let settle = parse_settle(&cfg.settle).expect("validated");
    let chunk = parse_size(&cfg.chunk_size).expect("validated") as usize;
    let sent_dir = cfg.sent_dir();
    std::fs::create_dir_all(cfg.dir.join(STATE_DIR)).with_context(|| {
        format!(
            "sources.{name}.dir: cannot create {}; check `dir` and its permissions",
            cfg.dir.join(STATE_DIR).display()
        )
    })?;
    if cfg.after == After::Move {
        std::fs::create_dir_all(&sent_dir).with_context(|| {
            format!(
                "sources.{name}.sent_dir: cannot create {}",
                sent_dir.display()
            )
        })?;
    }
    let mut state = load_state(&cfg.dir)?;
    let interval = (settle / 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
    // Per relative path: (size, mtime) as last seen and since when.
    let mut seen: HashMap<String, (u64, i64, Instant)> = HashMap::new();
    // Files that could not be read, by (path, size, mtime): retried once they change.
    let mut unreadable: HashMap<String, (u64, i64)> = HashMap::new();
    let mut shutdown = handle.shutdown.clone();
    tracing::info!(source = %name, dir = %cfg.dir.display(), settle_ms = settle.as_millis() as u64, after = ?cfg.after, "files source watching");
    handle.status(|s| s.state = "watching");
    let mut truncated_warned = false;
    let mut keep_full_warned = false;
    loop {
        if handle.is_shutting_down() {
            return Ok(());
        }
        // An operator's resends go before new files.
        for (request, parsed) in history::pending(&cfg.state_dir(), MAX_RESENDS_PER_SCAN) {
            let result = match &parsed {
                Ok(r) => resend_file(&mut handle, r, chunk).await,
                Err(e) => Err(anyhow::anyhow!("{e}")),
            };
            match result {
                Ok(Sent::Done) => history::finish(&request, None),
                Ok(Sent::Interrupted) => return Ok(()),
                Err(e) => {
                    handle.status(|s| {
                        *s.counts.entry("files_resend_failed").or_default() += 1;
                        s.last_error = Some(format!("resend request {}: {e:#}", request.display()));
                    });
                    tracing::warn!(source = %name, request = %request.display(),
                        "files source: cannot carry out this resend request: {e:#}; it is kept as .failed (counted in files_resend_failed)");
                    history::finish(&request, Some(&format!("{e:#}")));
                }
            }
            if handle.is_shutting_down() {
                return Ok(());
            }
        }
        let (dir, skip) = (cfg.dir.clone(), sent_dir.clone());
        let (mut found, truncated) =
            tokio::task::spawn_blocking(move || scan(&dir, &skip, MAX_FILES_PER_SCAN))
                .await?
                .with_context(|| {
                    format!(
                        "sources.{name}.dir: cannot list {}; check `dir` and its permissions",
                        cfg.dir.display()
                    )
                })?;
        if truncated && !truncated_warned {
            truncated_warned = true;
            tracing::warn!(source = %name, max = MAX_FILES_PER_SCAN, "files source: more files than one scan takes; the rest are taken by later scans");
        }
        let now = Instant::now();
        let wall_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let present: std::collections::HashSet<&str> =
            found.iter().map(|f| f.rel.as_str()).collect();
        seen.retain(|k, _| present.contains(k.as_str()));
        unreadable.retain(|k, _| present.contains(k.as_str()));
        if prune_kept(&mut state.kept, &present, truncated) {
            save_state(&cfg.dir, &state)?;
            keep_full_warned = false;
        }
        found.sort_by(|a, b| (a.mtime_ns, &a.rel).cmp(&(b.mtime_ns, &b.rel)));
        let mut ready = Vec::new();
        for f in found {
            if state.kept.get(&f.rel) == Some(&(f.size, f.mtime_ns))
                || unreadable.get(&f.rel) == Some(&(f.size, f.mtime_ns))
            {
                continue;
            }
            let resumed = state.inflight.as_ref().is_some_and(|i| {
                (i.path.as_str(), i.size, i.mtime_ns) == (&f.rel, f.size, f.mtime_ns)
            });
            let settled = match seen.get(&f.rel) {
                Some((size, mtime, since)) if (*size, *mtime) == (f.size, f.mtime_ns) => {
                    now.duration_since(*since) >= settle
                }
                Some(_) => {
                    seen.insert(f.rel.clone(), (f.size, f.mtime_ns, now));
                    false
                }
                None => {
                    seen.insert(f.rel.clone(), (f.size, f.mtime_ns, now));
                    // Written before `settle` ago: complete (renamed in, or
                    // there before this scan).
                    wall_ns.saturating_sub(f.mtime_ns) >= settle.as_nanos() as i64
                }
            };
            if resumed || settled {
                ready.push(f);
            }
        }
        let mut kept_total = kept_bytes(&state.kept);
        for f in ready {
            if cfg.after == After::Keep && !keep_has_room(&state.kept, kept_total, &f.rel) {
                if !keep_full_warned {
                    keep_full_warned = true;
                    tracing::warn!(source = %name, file = %f.rel, max_bytes = MAX_KEPT_BYTES,
                        "files source: the state of kept files is full; new files wait (not sent) until sent files are removed from dir, or use after = \"move\"");
                }
                handle.status(|s| {
                    s.last_error = Some(format!(
                        "{}: waiting: the state of kept files is full ({MAX_KEPT_BYTES} bytes); remove sent files from dir",
                        f.rel
                    ))
                });
                continue;
            }
            let sent = match &cfg.csv {
                Some(c) => send_csv(&cfg, c, &mut handle, &mut state, &f).await,
                None => send_file(&cfg, &mut handle, &mut state, &f, chunk).await,
            };
            match sent {
                Ok(Sent::Done) => {
                    seen.remove(&f.rel);
                    if cfg.after == After::Keep {
                        kept_total = kept_bytes(&state.kept);
                    }
                }
                Ok(Sent::Interrupted) => return Ok(()),
                Err(e) => {
                    // The file, not the source: count it, say why, go on.
                    handle.status(|s| {
                        *s.counts.entry("files_failed").or_default() += 1;
                        s.last_error = Some(format!("{}: {e:#}", f.rel));
                    });
                    Counters::add(&handle.counters().source_peer_errors, 1);
                    tracing::warn!(source = %name, file = %f.rel, "files source: cannot send this file: {e:#}; it is tried again once it changes (counted in files_failed)");
                    unreadable.insert(f.rel.clone(), (f.size, f.mtime_ns));
                    if state.inflight.as_ref().is_some_and(|i| i.path == f.rel) {
                        state.inflight = None;
                        save_state(&cfg.dir, &state)?;
                    }
                }
            }
            if handle.is_shutting_down() {
                return Ok(());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Reads up to `want` bytes (fewer only at the end of the file).
async fn read_up_to(file: &mut tokio::fs::File, want: usize) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(want);
    while data.len() < want {
        let n = (&mut *file)
            .take((want - data.len()) as u64)
            .read_buf(&mut data)
            .await?;
        if n == 0 {
            break;
        }
    }
    Ok(data)
}

/// What every part of one transfer says about its file.
struct PartHead {
    transfer: u64,
    path: String,
    size: u64,
    mtime_ns: i64,
    mode: u32,
}

/// Streams `file` as the parts of a transfer, read only while the spool has
/// room, and waits until the last part is fsynced in the spool. The last
/// part carries `sha256` if given (a resend: the checksum of the file as
/// first sent, so the receiver checks the result against that), else the
/// checksum of what was read. Returns what was read's SHA-256, or `None`
/// on shutdown.
async fn stream_parts(
    handle: &mut SourceHandle,
    file: &mut tokio::fs::File,
    abs: &Path,
    head: &PartHead,
    chunk: usize,
    sha256: Option<[u8; 32]>,
) -> anyhow::Result<Option<[u8; 32]>> {
    let name = handle.stream().to_string();
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    let part = |offset: u64, data: Vec<u8>, sha256: Option<[u8; 32]>| {
        RecordBody::File(Box::new(FilePart {
            transfer: head.transfer,
            path: head.path.clone(),
            size: head.size,
            mtime_ns: head.mtime_ns,
            mode: head.mode,
            offset,
            data,
            sha256,
        }))
    };
    let (ticket, read_sha) = loop {
        if !handle.wait_for_room().await {
            return Ok(None);
        }
        let want = chunk.min((head.size - offset) as usize);
        let data = read_up_to(file, want)
            .await
            .with_context(|| format!("reading {} at offset {offset}", abs.display()))?;
        hasher.update(&data);
        let n = data.len() as u64;
        // The last part: at the size taken, or the file ended early (it
        // shrank; the receiver then finds the rest missing).
        if offset + n >= head.size || (n as usize) < want {
            if offset + n < head.size {
                tracing::warn!(source = %name, file = %head.path, size = head.size, read = offset + n,
                    "files source: the file ended before its size while it was read; the receiver keeps it as incomplete");
            }
            let read_sha: [u8; 32] = hasher.finalize().into();
            let ticket =
                handle.emit_tracked(&[part(offset, data, Some(sha256.unwrap_or(read_sha)))]);
            break (ticket, read_sha);
        }
        handle.emit(part(offset, data, None));
        offset += n;
    };
    if !handle.durable(ticket).await {
        return Ok(None);
    }
    Ok(Some(read_sha))
}

async fn send_file(
    cfg: &Config,
    handle: &mut SourceHandle,
    state: &mut State,
    f: &Found,
    chunk: usize,
) -> anyhow::Result<Sent> {
    let name = handle.stream().to_string();
    let mut file = tokio::fs::File::open(&f.abs)
        .await
        .with_context(|| format!("opening {}", f.abs.display()))?;
    let transfer = match &state.inflight {
        Some(i) if (i.path.as_str(), i.size, i.mtime_ns) == (&f.rel, f.size, f.mtime_ns) => {
            tracing::info!(source = %name, file = %f.rel, transfer = format!("{:016x}", i.transfer),
                "files source: sending again a file a previous run did not finish (same transfer)");
            i.transfer
        }
        _ => {
            let transfer = rand::random();
            state.inflight = Some(Inflight {
                path: f.rel.clone(),
                size: f.size,
                mtime_ns: f.mtime_ns,
                transfer,
                csv_rows: 0,
            });
            save_state(&cfg.dir, state)?;
            transfer
        }
    };
    handle.status(|s| s.state = "sending");
    let started = Instant::now();
    let head = PartHead {
        transfer,
        path: f.rel.clone(),
        size: f.size,
        mtime_ns: f.mtime_ns,
        mode: f.mode,
    };
    let Some(sha) = stream_parts(handle, &mut file, &f.abs, &head, chunk, None).await? else {
        return Ok(Sent::Interrupted);
    };
    let kept_at = apply_after(cfg, handle, state, f)?;
    state.inflight = None;
    save_state(&cfg.dir, state)?;
    let entry = history::SentFile {
        path: f.rel.clone(),
        transfer: format!("{transfer:016x}"),
        size: f.size,
        mtime_ns: f.mtime_ns,
        mode: f.mode,
        sha256: hex(&sha),
        kept_at,
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    history::append(&cfg.state_dir(), &entry).with_context(|| {
        format!(
            "appending to {}",
            cfg.state_dir().join(history::HISTORY).display()
        )
    })?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(source = %name, file = %f.rel, bytes = f.size, transfer = format!("{transfer:016x}"),
        mb_per_s = format!("{:.1}", f.size as f64 / 1e6 / secs.max(1e-6)), "files source: file spooled");
    handle.status(|s| {
        s.state = "watching";
        *s.counts.entry("files_sent").or_default() += 1;
        *s.counts.entry("file_bytes_sent").or_default() += f.size;
    });
    Ok(Sent::Done)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Applies `after` to a file whose content is durably spooled; returns
/// where its content stays (for the history), if anywhere.
fn apply_after(
    cfg: &Config,
    handle: &SourceHandle,
    state: &mut State,
    f: &Found,
) -> anyhow::Result<Option<PathBuf>> {
    let name = handle.stream();
    // Changed while read: leave it; the next scan sends it as a new transfer.
    let now = std::fs::symlink_metadata(&f.abs).ok();
    let unchanged = now
        .as_ref()
        .is_some_and(|m| m.len() == f.size && mtime_ns(m) == f.mtime_ns);
    if !unchanged {
        tracing::warn!(source = %name, file = %f.rel,
            "files source: the file changed while it was sent; it stays and is sent again as a new transfer");
        return Ok(None);
    }
    Ok(match cfg.after {
        After::Move => {
            let target = free_name(&cfg.sent_dir().join(&f.rel));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::rename(&f.abs, &target).with_context(|| {
                format!(
                    "moving {} to {} (after = \"move\")",
                    f.abs.display(),
                    target.display()
                )
            })?;
            Some(target)
        }
        After::Delete => {
            std::fs::remove_file(&f.abs)
                .with_context(|| format!("deleting {} (after = \"delete\")", f.abs.display()))?;
            None
        }
        After::Keep => {
            // Room was checked before the file was taken (`keep_has_room`).
            state.kept.insert(f.rel.clone(), (f.size, f.mtime_ns));
            Some(f.abs.clone())
        }
    })
}

/// Sends a file again from disk for `weir-sender resend --file`: whole,
/// under the transfer id it first had, with its first metadata and
/// checksum, so the receiver completes the copy it kept incomplete.
async fn resend_file(
    handle: &mut SourceHandle,
    request: &history::ResendFile,
    chunk: usize,
) -> anyhow::Result<Sent> {
    let name = handle.stream().to_string();
    let sent = &request.sent;
    let transfer = sent
        .transfer_id()
        .with_context(|| format!("transfer `{}` is not 16 hex digits", sent.transfer))?;
    let sha = history::parse_sha(&sent.sha256)
        .with_context(|| format!("sha256 `{}` is not 64 hex digits", sent.sha256))?;
    let mut file = tokio::fs::File::open(&request.from)
        .await
        .with_context(|| format!("opening {}", request.from.display()))?;
    let len = file.metadata().await?.len();
    if len != sent.size {
        anyhow::bail!(
            "{} is {len} bytes, but `{}` was {} bytes when it was sent",
            request.from.display(),
            sent.path,
            sent.size
        );
    }
    tracing::info!(source = %name, file = %sent.path, transfer = %sent.transfer, from = %request.from.display(),
        "files source: sending a file again on an operator's request (same transfer)");
    handle.status(|s| s.state = "resending");
    let head = PartHead {
        transfer,
        path: sent.path.clone(),
        size: sent.size,
        mtime_ns: sent.mtime_ns,
        mode: sent.mode,
    };
    let Some(read) =
        stream_parts(handle, &mut file, &request.from, &head, chunk, Some(sha)).await?
    else {
        return Ok(Sent::Interrupted);
    };
    if read != sha {
        // The CLI checked it; it changed since. The receiver's check fails
        // and it keeps the file incomplete, saying so.
        tracing::warn!(source = %name, file = %sent.path, from = %request.from.display(), read = %hex(&read), sent = %sent.sha256,
            "files source: the file sent again differs from the one first sent; the receiver will refuse it by its SHA-256");
    } else {
        tracing::info!(source = %name, file = %sent.path, transfer = %sent.transfer, bytes = sent.size, "files source: file spooled again");
    }
    handle.status(|s| {
        s.state = "watching";
        *s.counts.entry("files_resent").or_default() += 1;
    });
    Ok(Sent::Done)
}

/// CSV rows read per batch at most: one spool append and one state save
/// per batch, and after a crash at most one batch is sent twice.
const CSV_BATCH_ROWS: usize = 4096;
/// Bytes of fields read per batch at most (rows vary in size).
const CSV_BATCH_BYTES: usize = 1 << 20;
/// Bad rows of one file logged one by one; the rest are counted and
/// summed up in one line at the end of the file.
const CSV_BAD_ROWS_LOGGED: u64 = 10;

/// One batch of a CSV file: points, bad rows (line, why), rows consumed.
struct CsvBatch {
    points: Vec<RecordBody>,
    bad: Vec<(u64, String)>,
    rows: u64,
    end: bool,
}

/// Reads the next batch of rows; an I/O error ends the file, a row that
/// does not read (invalid UTF-8) is a bad row.
fn read_csv_batch(
    reader: &mut ::csv::Reader<std::fs::File>,
    mapping: &csv::Mapping,
    skip: &mut u64,
) -> Result<CsvBatch, ::csv::Error> {
    let mut batch = CsvBatch {
        points: Vec::new(),
        bad: Vec::new(),
        rows: 0,
        end: false,
    };
    let mut bytes = 0;
    let mut row = ::csv::StringRecord::new();
    while batch.points.len() < CSV_BATCH_ROWS && bytes < CSV_BATCH_BYTES {
        let read = reader.read_record(&mut row);
        let line = |e: &::csv::Error| e.position().map_or(0, |p| p.line());
        match read {
            Ok(false) => {
                batch.end = true;
                break;
            }
            Err(e) if matches!(e.kind(), ::csv::ErrorKind::Io(_)) => return Err(e),
            read => {
                batch.rows += 1;
                if *skip > 0 {
                    *skip -= 1;
                    continue;
                }
                match read {
                    Ok(_) => {
                        let line = row.position().map_or(0, |p| p.line());
                        bytes += row.as_slice().len();
                        match mapping.point(&row, super::now_ns()) {
                            Ok(p) => batch.points.push(RecordBody::Point(p)),
                            Err(why) => batch.bad.push((line, why)),
                        }
                    }
                    Err(e) => batch.bad.push((line(&e), e.to_string())),
                }
            }
        }
    }
    Ok(batch)
}

/// CSV mode: the file's rows become points, in batches, each durably
/// spooled before the state records how far the file is done.
async fn send_csv(
    cfg: &Config,
    csv_cfg: &csv::CsvConfig,
    handle: &mut SourceHandle,
    state: &mut State,
    f: &Found,
) -> anyhow::Result<Sent> {
    let name = handle.stream().to_string();
    let file =
        std::fs::File::open(&f.abs).with_context(|| format!("opening {}", f.abs.display()))?;
    let mut reader = csv::reader(csv_cfg, file);
    let header = match &csv_cfg.columns {
        Some(c) => ::csv::StringRecord::from(c.clone()),
        None => reader
            .headers()
            .with_context(|| format!("reading the header row of {}", f.abs.display()))?
            .clone(),
    };
    let mapping = std::sync::Arc::new(
        csv::Mapping::new(csv_cfg, &header).map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let mut skip = match &state.inflight {
        Some(i) if (i.path.as_str(), i.size, i.mtime_ns) == (&f.rel, f.size, f.mtime_ns) => {
            tracing::info!(source = %name, file = %f.rel, rows_done = i.csv_rows,
                "files source: going on with a CSV file a previous run did not finish");
            i.csv_rows
        }
        _ => {
            state.inflight = Some(Inflight {
                path: f.rel.clone(),
                size: f.size,
                mtime_ns: f.mtime_ns,
                transfer: 0,
                csv_rows: 0,
            });
            save_state(&cfg.dir, state)?;
            0
        }
    };
    handle.status(|s| s.state = "sending");
    let started = Instant::now();
    // Rows consumed, the skipped ones of a previous run included.
    let (mut rows, mut points, mut bad) = (0u64, 0u64, 0u64);
    let mut first_bad = None;
    let mut reader = Some(reader);
    loop {
        if !handle.wait_for_room().await {
            return Ok(Sent::Interrupted);
        }
        let (mut r, m) = (reader.take().expect("put back"), mapping.clone());
        let (r, batch, skip_left) = tokio::task::spawn_blocking(move || {
            let batch = read_csv_batch(&mut r, &m, &mut skip);
            (r, batch, skip)
        })
        .await?;
        skip = skip_left;
        reader = Some(r);
        let batch = batch.with_context(|| format!("reading {}", f.abs.display()))?;
        for (line, why) in &batch.bad {
            bad += 1;
            first_bad.get_or_insert(*line);
            if bad <= CSV_BAD_ROWS_LOGGED {
                tracing::warn!(source = %name, file = %f.rel, line, "files source: CSV row skipped: {why} (counted in csv_bad_rows)");
            }
            handle.status(|s| s.last_error = Some(format!("{} line {line}: {why}", f.rel)));
        }
        let (n_points, n_bad) = (batch.points.len() as u64, batch.bad.len() as u64);
        if !batch.points.is_empty() {
            let ticket = handle.emit_tracked(&batch.points);
            if !handle.durable(ticket).await {
                return Ok(Sent::Interrupted);
            }
        }
        points += n_points;
        rows += batch.rows;
        handle.status(|s| {
            *s.counts.entry("csv_rows").or_default() += n_points + n_bad;
            *s.counts.entry("csv_points").or_default() += n_points;
            *s.counts.entry("csv_bad_rows").or_default() += n_bad;
        });
        if let Some(i) = state.inflight.as_mut() {
            i.csv_rows = rows;
        }
        if batch.end {
            break;
        }
        save_state(&cfg.dir, state)?;
    }
    if bad > CSV_BAD_ROWS_LOGGED {
        tracing::warn!(source = %name, file = %f.rel, bad_rows = bad, first_line = first_bad.unwrap_or(0),
            "files source: {} more bad CSV rows in this file were skipped without a line each (counted in csv_bad_rows)", bad - CSV_BAD_ROWS_LOGGED);
    }
    apply_after(cfg, handle, state, f)?;
    state.inflight = None;
    save_state(&cfg.dir, state)?;
    tracing::info!(source = %name, file = %f.rel, rows, points, bad_rows = bad,
        secs = format!("{:.2}", started.elapsed().as_secs_f64()), "files source: CSV file spooled as points");
    handle.status(|s| {
        s.state = "watching";
        *s.counts.entry("files_sent").or_default() += 1;
    });
    Ok(Sent::Done)
}

/// `path`, or `path.1`, `path.2`, ... : the first that does not exist.
fn free_name(path: &Path) -> PathBuf {
    if std::fs::symlink_metadata(path).is_err() {
        return path.to_path_buf();
    }
    (1u64..)
        .map(|n| {
            let mut p = path.as_os_str().to_owned();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        })
        .find(|p| std::fs::symlink_metadata(p).is_err())
        .expect("some suffix is free")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settle_takes_milliseconds_seconds_and_minutes() {
        assert_eq!(parse_settle("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_settle("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_settle("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_settle("soon").is_err());
    }

    #[test]
    fn the_scan_keeps_subdirectories_and_skips_temporaries_dotfiles_and_the_sent_dir() {
        let dir = std::env::temp_dir().join(format!("weir-files-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::create_dir_all(dir.join("sent")).unwrap();
        std::fs::create_dir_all(dir.join(".hidden")).unwrap();
        for p in [
            "top.csv",
            "a/b/deep.bin",
            "a/partial.csv.tmp",
            ".dot",
            "sent/old.csv",
            ".hidden/x",
        ] {
            std::fs::write(dir.join(p), p).unwrap();
        }
        std::os::unix::fs::symlink(dir.join("top.csv"), dir.join("link.csv")).unwrap();
        let (mut found, truncated) = scan(&dir, &dir.join("sent"), 100).unwrap();
        found.sort_by(|a, b| a.rel.cmp(&b.rel));
        let rels: Vec<&str> = found.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(rels, ["a/b/deep.bin", "top.csv"]);
        assert!(!truncated);
        assert_eq!(found[1].size, 7);
        let (found, truncated) = scan(&dir, &dir.join("sent"), 1).unwrap();
        assert_eq!((found.len(), truncated), (1, true));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_free_name_never_replaces_an_existing_file() {
        let dir = std::env::temp_dir().join(format!("weir-files-free-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.csv");
        assert_eq!(free_name(&p), p);
        std::fs::write(&p, "1").unwrap();
        assert_eq!(free_name(&p), dir.join("x.csv.1"));
        std::fs::write(dir.join("x.csv.1"), "2").unwrap();
        assert_eq!(free_name(&p), dir.join("x.csv.2"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_a_whole_scan_forgets_kept_files_that_are_gone() {
        let mut kept: BTreeMap<String, (u64, i64)> =
            [("a".to_string(), (1, 1)), ("b".to_string(), (1, 1))].into();
        let present: std::collections::HashSet<&str> = ["a"].into();
        assert!(
            !prune_kept(&mut kept, &present, true),
            "b may only be past the scan's limit"
        );
        assert_eq!(kept.len(), 2);
        assert!(prune_kept(&mut kept, &present, false));
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["a"]);
        assert!(!prune_kept(&mut kept, &present, false));
    }

    #[test]
    fn kept_state_is_bounded_in_bytes_of_paths_not_in_entries() {
        let mut kept = BTreeMap::new();
        kept.insert("a".repeat(100), (1, 1));
        kept.insert("b".to_string(), (1, 1));
        assert_eq!(kept_bytes(&kept), 101 + 2 * KEPT_ENTRY_OVERHEAD);
        let state = State {
            inflight: None,
            kept: (0..1000)
                .map(|i| (format!("{i:04}-{}", "x".repeat(4000)), (1, 1)))
                .collect(),
        };
        let json = serde_json::to_vec(&state).unwrap().len();
        let counted = kept_bytes(&state.kept);
        assert!(
            counted >= json * 99 / 100,
            "the estimate covers the JSON: {counted} < {json}"
        );
        // Full: a new path waits, a path already kept (changed) still goes.
        let full: BTreeMap<String, (u64, i64)> = (0..1100)
            .map(|i| (format!("{i:04}-{}", "x".repeat(4000)), (1, 1)))
            .collect();
        let total = kept_bytes(&full);
        assert!(total > MAX_KEPT_BYTES);
        assert!(!keep_has_room(&full, total, "new.csv"));
        assert!(keep_has_room(&full, total, full.keys().next().unwrap()));
        assert!(keep_has_room(&state.kept, counted, "new.csv"));
    }

    #[test]
    fn a_config_is_checked_key_by_key() {
        let ok = Config {
            dir: "/var/lib/weir/outbox".into(),
            settle: "2s".into(),
            after: After::Move,
            sent_dir: None,
            chunk_size: "256KiB".into(),
            csv: None,
        };
        assert!(ok.validate().is_ok());
        let bad = |f: fn(&mut Config), key: &str| {
            let mut c = ok.clone();
            f(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.starts_with(key), "{e}");
        };
        bad(|c| c.dir = "outbox".into(), "dir:");
        bad(|c| c.settle = "10ms".into(), "settle:");
        bad(|c| c.chunk_size = "1KiB".into(), "chunk_size:");
        bad(
            |c| {
                c.after = After::Keep;
                c.sent_dir = Some("/x".into())
            },
            "sent_dir:",
        );
    }
}
