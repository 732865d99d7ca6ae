//! `weir-sender resend --file NAME`: sends one file transfer again, by the
//! name the receiver's audit line gives it, so the receiver's `files` sink
//! completes the copy it kept under `incomplete/`.
//!
//! The file is looked up in its source's history (`sent.jsonl`, see
//! `sources::files::history`) for its transfer id, size, mtime and
//! SHA-256. Then the content is found:
//! 1. **In the spool**, if every part of that transfer is still retained
//!    (and `--from-disk` was not given): a stream resend request for the
//!    sequence numbers of its parts, which the link thread sends again as
//!    any resend (the receiver takes only what it lacks, and audits the
//!    stream's gap as recovered).
//! 2. **On disk** otherwise: `--path` if given, else where the history
//!    says the content stayed (`sent_dir` for `after = "move"`, `dir` for
//!    `"keep"`), else `dir/NAME`. A candidate counts only with the size
//!    sent and the mtime sent or, failing the mtime, the SHA-256 sent. The
//!    running source sends it again, whole, under the old transfer id.
//! 3. If neither holds it, the error names every place looked at and why
//!    each did not do.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use weir_protocol::RecordBody;

use crate::sources::files::{self, history};
use crate::{config, link, spool};

/// Resend requests written for one file at most: its parts' sequence
/// numbers in this many runs (other records between them are not sent).
const MAX_RUNS: usize = 64;

pub fn resend_file(
    config_path: &Path,
    name: &str,
    source: Option<&str>,
    path: Option<&Path>,
    from_disk: bool,
) -> Result<()> {
    let loaded = config::load(config_path)?;
    let all: Vec<(&str, &files::Config)> = loaded
        .config
        .sources
        .iter()
        .filter_map(|s| s.config::<files::Config>().map(|c| (s.name(), c)))
        .collect();
    if all.is_empty() {
        bail!(
            "{} has no `files` source; --file resends files a `files` source sent",
            config_path.display()
        );
    }
    let mut candidates = Vec::new();
    for (stream, cfg) in &all {
        if source.is_some_and(|s| s != *stream) {
            continue;
        }
        if let Some(sent) = history::lookup(&cfg.state_dir(), name)? {
            candidates.push((*stream, *cfg, sent));
        }
    }
    let (stream, cfg, sent) = match candidates.len() {
        1 => candidates.pop().expect("one"),
        0 => {
            let looked: Vec<String> = all
                .iter()
                .filter(|(s, _)| source.is_none_or(|want| want == *s))
                .map(|(s, c)| format!("`{s}` ({})", c.state_dir().join(history::HISTORY).display()))
                .collect();
            if looked.is_empty() {
                bail!(
                    "--source {}: no `files` source of that name; the `files` sources are {}",
                    source.unwrap_or_default(),
                    all.iter()
                        .map(|(s, _)| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            bail!(
                "`{name}`: not in the history of {}; give the path as the receiver's audit line names it (`path`, relative to the source's dir). The history keeps about the last {} MiB of lines",
                looked.join(", "),
                (2 * history::HISTORY_BYTES) >> 20
            );
        }
        _ => bail!(
            "`{name}` was sent by several `files` sources ({}); choose one with --source",
            candidates
                .iter()
                .map(|c| format!("`{}`", c.0))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if cfg.csv.is_some() {
        bail!("source `{stream}` is in csv mode: its files cross as points, not transfers; resend the stream's gaps with --stream {stream} --from A --to B");
    }
    let transfer = sent
        .transfer_id()
        .with_context(|| format!("the history line of `{name}` has a broken transfer id"))?;
    let root = &loaded.spool.path;
    let mut spool_said = String::new();
    if !from_disk && path.is_none() {
        match in_spool(root, stream, transfer, sent.size)? {
            Ok(runs) => {
                let dir = root.join("resend");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                for (i, (from, to)) in runs.iter().enumerate() {
                    let request = link::ResendRequest {
                        stream: stream.to_string(),
                        from: *from,
                        to: *to,
                    };
                    let file = dir.join(format!(
                        "{}-{}-{i:03}.json",
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos()),
                        std::process::id()
                    ));
                    weir_store::write_atomically(&file, &serde_json::to_vec(&request)?)
                        .with_context(|| format!("writing {}", file.display()))?;
                }
                let seqs: Vec<String> = runs.iter().map(|(a, b)| format!("{a}..={b}")).collect();
                println!(
                    "`{name}` (stream `{stream}`, transfer {}, {} bytes): every part is in the spool (seq {}); queued for the running sender in {}",
                    sent.transfer,
                    sent.size,
                    seqs.join(", "),
                    dir.display()
                );
                return Ok(());
            }
            Err(why) => spool_said = why,
        }
    }
    let mut places: Vec<PathBuf> = Vec::new();
    match path {
        Some(p) => places.push(p.to_path_buf()),
        None => {
            places.extend(sent.kept_at.clone());
            let in_dir = cfg.dir.join(name);
            if !places.contains(&in_dir) {
                places.push(in_dir);
            }
        }
    }
    let mut looked = Vec::new();
    for place in &places {
        match matches_sent(place, &sent) {
            Ok(()) => {
                let from = std::fs::canonicalize(place).unwrap_or_else(|_| place.clone());
                let request = history::ResendFile {
                    sent: sent.clone(),
                    from,
                };
                let queued = history::queue(&cfg.state_dir(), &request)?;
                if !spool_said.is_empty() {
                    println!("{spool_said}");
                }
                println!(
                    "`{name}` (stream `{stream}`, transfer {}, {} bytes): sending it again from {}; queued for the running sender in {}",
                    sent.transfer,
                    sent.size,
                    place.display(),
                    queued.display()
                );
                return Ok(());
            }
            Err(why) => looked.push(format!("{} ({why})", place.display())),
        }
    }
    let spool = if spool_said.is_empty() {
        String::new()
    } else {
        format!("{spool_said}; ")
    };
    bail!(
        "`{name}` (stream `{stream}`, transfer {}): {spool}not found on disk: looked at {}; give --path to a copy of it",
        sent.transfer,
        looked.join(", ")
    )
}

/// The runs of sequence numbers holding every part of `transfer`, or why
/// the spool cannot send it whole.
fn in_spool(
    root: &Path,
    stream: &str,
    transfer: u64,
    size: u64,
) -> Result<Result<Vec<(u64, u64)>, String>> {
    let mut seqs = Vec::new();
    let mut have: Vec<(u64, u64)> = Vec::new();
    let mut last_part = false;
    spool::walk_in(root, stream, 0, u64::MAX, |e| {
        if let RecordBody::File(p) = &e.body {
            if p.transfer == transfer {
                seqs.push(e.seq);
                have.push((p.offset, p.offset.saturating_add(p.data.len() as u64)));
                last_part |= p.sha256.is_some();
            }
        }
        true
    })
    .with_context(|| format!("reading the spool at {}", root.display()))?;
    have.sort_unstable();
    let mut covered = 0u64;
    for (start, end) in &have {
        if *start > covered {
            break;
        }
        covered = covered.max(*end);
    }
    if seqs.is_empty() || covered < size || !last_part {
        return Ok(Err(format!(
            "the spool at {} no longer holds all of it ({} of {size} bytes from the start{}; spool.max_bytes / max_age decide how long)",
            root.display(),
            covered.min(size),
            if last_part { "" } else { ", not the last part" }
        )));
    }
    seqs.sort_unstable();
    seqs.dedup();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for s in seqs {
        match runs.last_mut() {
            Some((_, to)) if *to + 1 == s => *to = s,
            _ => runs.push((s, s)),
        }
    }
    if runs.len() > MAX_RUNS {
        let (first, last) = (runs[0].0, runs[runs.len() - 1].1);
        runs = vec![(first, last)];
    }
    Ok(Ok(runs))
}

/// Whether the file at `place` is the one sent: its size, and its mtime
/// or (a copy with another mtime) its SHA-256.
fn matches_sent(place: &Path, sent: &history::SentFile) -> Result<(), String> {
    let meta = match std::fs::metadata(place) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("missing".into()),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() != sent.size {
        return Err(format!(
            "{} bytes, but the file sent was {} bytes",
            meta.len(),
            sent.size
        ));
    }
    let mtime = meta
        .mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec());
    if mtime == sent.mtime_ns {
        return Ok(());
    }
    let mut f = std::fs::File::open(place).map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got == sent.sha256 {
        Ok(())
    } else {
        Err(format!(
            "its SHA-256 is {got}, but the file sent had {}",
            sent.sha256
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(size: u64, sha: &str, mtime_ns: i64) -> history::SentFile {
        history::SentFile {
            path: "r.bin".into(),
            transfer: "0000000000000001".into(),
            size,
            mtime_ns,
            mode: 0o644,
            sha256: sha.into(),
            kept_at: None,
            at: String::new(),
        }
    }

    #[test]
    fn a_file_on_disk_counts_only_with_the_size_and_the_mtime_or_checksum_sent() {
        let dir = std::env::temp_dir().join(format!("weir-resend-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.bin");
        std::fs::write(&p, b"abc").unwrap();
        let sha: String = Sha256::digest(b"abc")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let m = std::fs::metadata(&p).unwrap();
        let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
        assert_eq!(matches_sent(&p, &sent(3, "whatever", mtime)), Ok(()));
        assert_eq!(
            matches_sent(&p, &sent(3, &sha, 1)),
            Ok(()),
            "a copy with another mtime"
        );
        assert!(matches_sent(&p, &sent(3, &"0".repeat(64), 1))
            .unwrap_err()
            .contains("but the file sent had 0000"));
        assert_eq!(
            matches_sent(&p, &sent(4, &sha, mtime)).unwrap_err(),
            "3 bytes, but the file sent was 4 bytes"
        );
        assert_eq!(
            matches_sent(&dir.join("gone"), &sent(3, &sha, mtime)).unwrap_err(),
            "missing"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
