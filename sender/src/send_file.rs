//! `weir-sender send-file --config FILE PATH...`: hands files to the
//! running sender's `files` source, for an operator.
//!
//! Each file is copied into the source's `dir` (directories keep their own
//! name and structure below it) under a dotted temporary name, fsynced,
//! given the original's mtime and permission bits, and renamed to its
//! final name, so the source never sees a partial copy. A name already
//! there gets a `.1`, `.2`, ... suffix instead of being replaced. Then,
//! unless `--no-wait`, it waits until the source has taken every copy
//! (spooled durably: the copy is moved or deleted, or, with
//! `after = "keep"`, recorded in the source's state). Progress shows bytes,
//! rate and ETA; the exit status is non-zero if any file could not be read
//! or copied.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config;
use crate::sources::files::{self, After};

/// Bytes copied per read.
const COPY_CHUNK: usize = 1 << 20;

/// One file to hand over: where it is, and its path under the source's dir.
struct Job {
    from: PathBuf,
    rel: PathBuf,
    size: u64,
}

/// Every regular file under `path` (a file, or a directory walked
/// recursively), with its path relative to the parent of `path`.
fn collect(path: &Path, jobs: &mut Vec<Job>, failed: &mut Vec<String>) {
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = match std::fs::metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                failed.push(format!("{}: {e}", p.display()));
                continue;
            }
        };
        if meta.is_dir() {
            match std::fs::read_dir(&p) {
                Ok(entries) => {
                    for e in entries {
                        match e {
                            Ok(e) => stack.push(e.path()),
                            Err(e) => failed.push(format!("{}: {e}", p.display())),
                        }
                    }
                }
                Err(e) => failed.push(format!("{}: {e}", p.display())),
            }
            continue;
        }
        if !meta.is_file() {
            failed.push(format!("{}: not a regular file", p.display()));
            continue;
        }
        let rel = p.strip_prefix(&base).unwrap_or(&p).to_path_buf();
        let ignored = rel.iter().any(|c| files::is_ignored(&c.to_string_lossy()));
        if ignored {
            failed.push(format!(
                "{}: the files source never takes names starting with `.` or ending in `.tmp`; rename it",
                p.display()
            ));
            continue;
        }
        jobs.push(Job {
            from: p,
            rel,
            size: meta.len(),
        });
    }
}

/// `path`, or `path.1`, `path.2`, ...: the first that does not exist.
fn free_name(path: &Path) -> PathBuf {
    let mut n = 0u64;
    loop {
        let candidate = if n == 0 {
            path.to_path_buf()
        } else {
            let mut p = path.as_os_str().to_owned();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if std::fs::symlink_metadata(&candidate).is_err() {
            return candidate;
        }
        n += 1;
    }
}

/// Copies `job` into `dir` atomically; returns where it went.
fn copy_in(job: &Job, dir: &Path, bar: &ProgressBar) -> Result<PathBuf> {
    use std::io::{Read, Write};
    let target = free_name(&dir.join(&job.rel));
    let parent = target.parent().expect("under dir").to_path_buf();
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(
        ".{}.weir-send.tmp",
        target.file_name().expect("a file name").to_string_lossy()
    ));
    let mut src = std::fs::File::open(&job.from)
        .with_context(|| format!("opening {}", job.from.display()))?;
    let meta = src.metadata()?;
    let result = (|| -> Result<()> {
        let mut out =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut buf = vec![0u8; COPY_CHUNK];
        loop {
            let n = src
                .read(&mut buf)
                .with_context(|| format!("reading {}", job.from.display()))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", tmp.display()))?;
            bar.inc(n as u64);
        }
        out.set_permissions(meta.permissions())?;
        out.set_modified(meta.modified()?)?;
        out.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &target)
        .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))?;
    std::fs::File::open(&parent)?.sync_all()?;
    Ok(target)
}

/// True once the source has taken the copy at `target` (relative `rel`).
fn taken(after: After, dir: &Path, target: &Path, size: u64) -> bool {
    match after {
        After::Move | After::Delete => std::fs::symlink_metadata(target).is_err(),
        After::Keep => {
            let rel = target
                .strip_prefix(dir)
                .unwrap_or(target)
                .to_string_lossy()
                .into_owned();
            std::fs::read(dir.join(files::STATE_DIR).join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|s| s["kept"][&rel][0].as_u64() == Some(size))
        }
    }
}

pub fn send_file(
    config_path: &Path,
    source: Option<&str>,
    paths: &[PathBuf],
    wait: bool,
) -> Result<()> {
    let loaded = config::load(config_path)?;
    let sources: Vec<_> = loaded
        .config
        .sources
        .iter()
        .filter_map(|s| s.config::<files::Config>().map(|c| (s.name(), c)))
        .collect();
    let (name, cfg) = match (source, sources.as_slice()) {
        (_, []) => bail!(
            "{} has no source of type `files`; add one ([[sources]] type = \"files\", dir = ...)",
            config_path.display()
        ),
        (None, [one]) => *one,
        (None, _) => bail!(
            "{} has several `files` sources ({}); choose one with --source",
            config_path.display(),
            sources.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")
        ),
        (Some(want), _) => *sources.iter().find(|s| s.0 == want).with_context(|| {
            format!(
                "--source {want}: no `files` source of that name in {} (there are: {})",
                config_path.display(),
                sources.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")
            )
        })?,
    };
    let mut jobs = Vec::new();
    let mut failed = Vec::new();
    for p in paths {
        collect(p, &mut jobs, &mut failed);
    }
    let total: u64 = jobs.iter().map(|j| j.size).sum();
    let started = Instant::now();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("copying into {} ({name})", cfg.dir.display()));
    let mut copied = Vec::new();
    for job in &jobs {
        match copy_in(job, &cfg.dir, &bar) {
            Ok(target) => copied.push((target, job.size)),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    bar.finish_and_clear();
    let bytes: u64 = copied.iter().map(|c| c.1).sum();
    if wait && !copied.is_empty() {
        let bar = ProgressBar::new(bytes);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("spooled by the sender ({name})"));
        let mut pending = copied.clone();
        let mut hinted = false;
        while !pending.is_empty() {
            pending.retain(|(target, size)| {
                let done = taken(cfg.after, &cfg.dir, target, *size);
                if done {
                    bar.inc(*size);
                }
                !done
            });
            if !hinted && started.elapsed() > Duration::from_secs(30) && bar.position() == 0 {
                hinted = true;
                bar.println(format!(
                    "still waiting for source `{name}` to take the files; is `weir-sender run --config {}` running? (--no-wait returns at once)",
                    config_path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bar.finish_and_clear();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{} file(s), {} bytes handed to source `{name}` in {secs:.1} s ({:.1} MB/s){}; {} failed",
        copied.len(),
        bytes,
        bytes as f64 / 1e6 / secs.max(1e-3),
        if wait { ", spooled" } else { "" },
        failed.len()
    );
    for f in &failed {
        eprintln!("weir-sender: cannot send {f}");
    }
    if !failed.is_empty() {
        bail!("{} file(s) could not be sent (listed above)", failed.len());
    }
    Ok(())
}
