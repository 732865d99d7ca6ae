//! What a `files` source remembers of the files it sent, and the requests
//! `weir-sender resend --file` leaves for it.
//!
//! - **History.** One JSON line per file sent, appended (and fsynced) to
//!   `DIR/.weir-files/sent.jsonl` once the file is durably spooled: path,
//!   transfer id, size, mtime, mode, SHA-256, where its content stayed.
//!   When the file reaches [`HISTORY_BYTES`] it becomes `sent.1.jsonl`
//!   (replacing the older one) and a new one starts, so the history holds
//!   between one and two times that many bytes: the last files sent, the
//!   newest line of a path winning. A torn last line (a crash mid-append)
//!   is skipped when read.
//! - **Requests.** `DIR/.weir-files/resend/*.json`, written atomically by
//!   the CLI (a dotted temporary name, then a rename), taken by the running
//!   source in name order (the names start with the time). A request done
//!   is removed; one that cannot be carried out is renamed `*.failed` with
//!   the reason beside it (`*.failed.txt`), never deleted.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The history file, in the source's state directory.
pub const HISTORY: &str = "sent.jsonl";
/// The previous generation of the history.
pub const HISTORY_OLD: &str = "sent.1.jsonl";
/// Bytes of one history generation: at about 300 bytes a line, the last
/// 14,000 to 28,000 files sent are remembered, in at most 8 MiB on disk;
/// a lookup reads both generations.
pub const HISTORY_BYTES: u64 = 4 << 20;
/// Where resend requests wait, in the source's state directory.
pub const RESEND_DIR: &str = "resend";
/// A request file larger than this is not one the CLI wrote.
const MAX_REQUEST_BYTES: u64 = 64 << 10;

/// One file sent (a line of the history).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentFile {
    /// Its path relative to `dir`, as the receiver names it.
    pub path: String,
    /// The transfer id, 16 hex digits, as in the receiver's audit line.
    pub transfer: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    /// SHA-256 of the content sent, 64 hex digits.
    pub sha256: String,
    /// Where the content stayed: under `sent_dir` (`after = "move"`), in
    /// `dir` (`"keep"`), nowhere (`"delete"`, or it changed while sent).
    pub kept_at: Option<PathBuf>,
    /// When it was spooled (RFC 3339, UTC).
    pub at: String,
}

impl SentFile {
    pub fn transfer_id(&self) -> Option<u64> {
        (self.transfer.len() == 16)
            .then(|| u64::from_str_radix(&self.transfer, 16).ok())
            .flatten()
    }
}

/// 64 hex digits as 32 bytes.
pub fn parse_sha(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Appends one line, rotating first when the history is full.
pub fn append(state_dir: &Path, entry: &SentFile) -> Result<()> {
    let path = state_dir.join(HISTORY);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= HISTORY_BYTES) {
        std::fs::rename(&path, state_dir.join(HISTORY_OLD))
            .with_context(|| format!("rotating {}", path.display()))?;
    }
    let mut line = serde_json::to_vec(entry).expect("json");
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(&line)
        .and_then(|_| f.sync_data())
        .with_context(|| format!("writing {}", path.display()))
}

/// The newest history line of `path`, if the history still has one.
pub fn lookup(state_dir: &Path, path: &str) -> Result<Option<SentFile>> {
    let mut found = None;
    for name in [HISTORY_OLD, HISTORY] {
        let file = state_dir.join(name);
        let f = match std::fs::File::open(&file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
        };
        for line in std::io::BufReader::new(f).split(b'\n') {
            let line = line.with_context(|| format!("reading {}", file.display()))?;
            // A torn line (crash mid-append) does not parse: skipped.
            if let Ok(e) = serde_json::from_slice::<SentFile>(&line) {
                if e.path == path {
                    found = Some(e);
                }
            }
        }
    }
    Ok(found)
}

/// A request to send a file again from disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResendFile {
    /// The file as it was first sent (from the history).
    pub sent: SentFile,
    /// Where its content is now (checked by the CLI).
    pub from: PathBuf,
}

/// Leaves a request for the running source; returns its file.
pub fn queue(state_dir: &Path, request: &ResendFile) -> Result<PathBuf> {
    let dir = state_dir.join(RESEND_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!(
        "{}-{}.json",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        std::process::id()
    );
    let path = dir.join(&name);
    weir_store::write_atomically(&path, &serde_json::to_vec_pretty(request).expect("json"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Up to `max` waiting requests, oldest first, each read or the reason it
/// does not read.
pub fn pending(state_dir: &Path, max: usize) -> Vec<(PathBuf, Result<ResendFile, String>)> {
    let dir = state_dir.join(RESEND_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files.truncate(max);
    files
        .into_iter()
        .map(|p| {
            let read = match std::fs::metadata(&p) {
                Ok(m) if m.len() > MAX_REQUEST_BYTES => Err(format!(
                    "{} bytes; a request is at most {MAX_REQUEST_BYTES}",
                    m.len()
                )),
                _ => std::fs::read(&p)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())),
            };
            (p, read)
        })
        .collect()
}

/// Done with a request: removed, or (`failed`) kept as `*.failed` with the
/// reason in `*.failed.txt`.
pub fn finish(request: &Path, failed: Option<&str>) {
    let result = match failed {
        None => std::fs::remove_file(request),
        Some(why) => {
            let mut kept = request.as_os_str().to_owned();
            kept.push(".failed");
            let kept = PathBuf::from(kept);
            let mut reason = kept.as_os_str().to_owned();
            reason.push(".txt");
            let _ = std::fs::write(PathBuf::from(reason), format!("{why}\n"));
            std::fs::rename(request, kept)
        }
    };
    if let Err(e) = result {
        tracing::warn!(request = %request.display(), "files source: cannot remove or rename a resend request: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("weir-files-history-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entry(path: &str, transfer: u64) -> SentFile {
        SentFile {
            path: path.into(),
            transfer: format!("{transfer:016x}"),
            size: 3,
            mtime_ns: 1,
            mode: 0o644,
            sha256: "ab".repeat(32),
            kept_at: None,
            at: "2026-03-01T12:00:00.000Z".into(),
        }
    }

    #[test]
    fn the_newest_line_of_a_path_wins_across_a_rotation_and_a_torn_line_is_skipped() {
        let dir = scratch("lookup");
        append(&dir, &entry("a.csv", 1)).unwrap();
        append(&dir, &entry("b.csv", 2)).unwrap();
        // Force a rotation: the current generation is full.
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(HISTORY))
            .unwrap();
        f.set_len(HISTORY_BYTES).unwrap();
        append(&dir, &entry("a.csv", 3)).unwrap();
        assert!(dir.join(HISTORY_OLD).exists());
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(HISTORY))
            .unwrap()
            .write_all(b"{\"path\":\"a.csv\",\"trans")
            .unwrap();
        assert_eq!(
            lookup(&dir, "a.csv").unwrap().unwrap().transfer_id(),
            Some(3)
        );
        assert_eq!(
            lookup(&dir, "b.csv").unwrap().unwrap().transfer_id(),
            Some(2)
        );
        assert_eq!(lookup(&dir, "c.csv").unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn requests_are_taken_in_order_removed_when_done_and_kept_with_the_reason_when_not() {
        let dir = scratch("requests");
        let r1 = ResendFile {
            sent: entry("a", 1),
            from: "/x/a".into(),
        };
        let p1 = queue(&dir, &r1).unwrap();
        let p2 = queue(
            &dir,
            &ResendFile {
                sent: entry("b", 2),
                from: "/x/b".into(),
            },
        )
        .unwrap();
        std::fs::write(dir.join(RESEND_DIR).join("zz-garbage.json"), b"{").unwrap();
        let got = pending(&dir, 10);
        assert_eq!(got.len(), 3);
        assert_eq!((&got[0].0, got[0].1.as_ref().unwrap()), (&p1, &r1));
        assert_eq!(got[1].0, p2);
        assert!(got[2].1.is_err());
        assert_eq!(pending(&dir, 1).len(), 1);
        finish(&p1, None);
        finish(&got[2].0, Some("does not parse"));
        assert!(!p1.exists());
        let kept = dir.join(RESEND_DIR).join("zz-garbage.json.failed");
        assert!(kept.exists());
        assert_eq!(
            std::fs::read_to_string(dir.join(RESEND_DIR).join("zz-garbage.json.failed.txt"))
                .unwrap(),
            "does not parse\n"
        );
        assert_eq!(pending(&dir, 10).len(), 1, "only b is left");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn checksums_and_transfer_ids_parse_only_when_whole() {
        assert_eq!(parse_sha(&"0f".repeat(32)), Some([0x0f; 32]));
        assert_eq!(parse_sha("0f"), None);
        assert_eq!(parse_sha(&"zz".repeat(32)), None);
        assert_eq!(entry("a", 0xabc).transfer_id(), Some(0xabc));
        let mut e = entry("a", 1);
        e.transfer = "12".into();
        assert_eq!(e.transfer_id(), None);
    }
}
