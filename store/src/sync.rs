//! Group commit: fsyncs run on their own thread, off the appending
//! thread, in order; each job covers every entry appended before it was
//! handed over, and the state file saved with it. Readers wait for
//! "durable up to position P" ([`Syncer::wait_durable`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The group commit's sign of load (see [`GroupCommit`]). 64 KiB: records
/// of a few hundred bytes at thousands a second stay well below it during
/// a millisecond fsync; a bulk stream of hundreds of MB/s passes it.
pub const GROUP_BYTES: u64 = 64 << 10;

/// When a log's next fsync is due, for the spool and the journal alike.
/// With no fsync running and fewer than [`GROUP_BYTES`] waiting, the
/// entries are a trickle: the next fsync is due at once, for latency. More
/// waiting means they arrived while the last fsync ran: the log is under
/// load, and the next fsync waits for the owner's `fsync_bytes` or
/// `fsync_ms` since the last one was requested, so each covers more and
/// fewer run (measured in docs/performance.md: an fsync and its state file
/// cost about the same CPU whatever they cover).
#[derive(Debug)]
pub struct GroupCommit {
    /// Framed bytes appended since the last request.
    unsynced: u64,
    /// When the last fsync was requested.
    last: Instant,
}

impl Default for GroupCommit {
    fn default() -> Self {
        GroupCommit {
            unsynced: 0,
            last: Instant::now(),
        }
    }
}

impl GroupCommit {
    pub fn appended(&mut self, bytes: u64) {
        self.unsynced += bytes;
    }

    /// An fsync covering everything appended so far was requested.
    pub fn requested(&mut self) {
        self.unsynced = 0;
        self.last = Instant::now();
    }

    pub fn unsynced(&self) -> u64 {
        self.unsynced
    }

    /// With entries waiting: whether their fsync is due now. `idle`: no
    /// fsync is running.
    pub fn due(&self, idle: bool, fsync_bytes: u64, fsync_interval: Duration) -> bool {
        (idle && self.unsynced < GROUP_BYTES)
            || self.unsynced >= fsync_bytes
            || self.last.elapsed() >= fsync_interval
    }

    /// With entries waiting: how long until `due` holds by time alone.
    pub fn wait(&self, fsync_interval: Duration) -> Duration {
        fsync_interval.saturating_sub(self.last.elapsed())
    }
}

/// Temp file, fsync, rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_data()
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// Reads a small file that may not exist yet (a state file).
pub fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// An fsync job (its segments and state file together) that takes at
/// least this long is counted as slow and logged: every record waiting to
/// be sent (spool) or handed to a sink (journal) waited that long for the
/// disk.
pub const SLOW_FSYNC: Duration = Duration::from_millis(100);

/// At most one slow-fsync warning per log in this long; the warning
/// counts those it stood for.
const SLOW_FSYNC_LOG_EVERY: Duration = Duration::from_secs(60);

/// How long a log's fsync jobs took: the longest since start and how many
/// were slow ([`SLOW_FSYNC`]). Shared by the log's owner (which publishes
/// them) and whatever runs its jobs.
#[derive(Debug, Default)]
pub struct FsyncTimes {
    max_us: AtomicU64,
    slow: AtomicU64,
    /// When the last warning was logged, and the slow fsyncs since that
    /// no warning has named.
    warned: Mutex<(Option<Instant>, u64)>,
}

impl FsyncTimes {
    /// Records one job's duration; a slow one is logged (rate-limited).
    pub fn record(&self, what: &str, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.max_us.fetch_max(us, Ordering::Relaxed);
        if took < SLOW_FSYNC {
            return;
        }
        let total = self.slow.fetch_add(1, Ordering::Relaxed) + 1;
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        warned.1 += 1;
        if warned
            .0
            .is_some_and(|at| at.elapsed() < SLOW_FSYNC_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            "{what}: an fsync took {} ms; {} fsync(s) of {} ms or more since the last such \
             warning, {total} since start. Records wait for it: check the disk under the \
             {what} (its other writers, its health) or move the {what} to a faster one",
            took.as_millis(),
            warned.1,
            SLOW_FSYNC.as_millis(),
        );
        *warned = (Some(Instant::now()), 0);
    }

    /// The longest fsync job since start, in microseconds.
    pub fn max_us(&self) -> u64 {
        self.max_us.load(Ordering::Relaxed)
    }

    /// Fsync jobs since start that took [`SLOW_FSYNC`] or more.
    pub fn slow(&self) -> u64 {
        self.slow.load(Ordering::Relaxed)
    }
}

/// One fsync: the segments to fsync, the position every entry below which
/// they make durable, and the state file to save after them.
pub struct SyncJob {
    pub files: Vec<File>,
    pub up_to: u64,
    pub state: Option<(PathBuf, Vec<u8>)>,
    /// Names the log in errors (`spool`, `journal`).
    pub what: &'static str,
    /// Where the job's duration is recorded when it succeeds.
    pub times: Arc<FsyncTimes>,
}

impl SyncJob {
    pub fn run(&self) -> Result<()> {
        let started = Instant::now();
        for f in &self.files {
            f.sync_data()
                .with_context(|| format!("{}: fsync of a segment", self.what))?;
        }
        if let Some((path, bytes)) = &self.state {
            write_atomically(path, bytes)?;
        }
        self.times.record(self.what, started.elapsed());
        Ok(())
    }
}

/// Wakes the thread that waits for entries to become durable, called by
/// the fsync thread after each fsync and after a failure.
pub type Waker = Box<dyn Fn() + Send + Sync>;

/// What the owner of a log and its fsync thread share.
struct Shared {
    /// Entries below this are fsynced (set by the fsync thread).
    durable: AtomicU64,
    /// The first fsync failure; the durable position stops moving after it.
    failure: Mutex<Option<String>>,
    /// Fsync jobs done.
    fsyncs: AtomicU64,
    /// Notified with `durable` or `failure` changed.
    changed: Condvar,
    changed_lock: Mutex<()>,
    waker: OnceLock<Waker>,
}

impl Shared {
    fn notify(&self) {
        drop(self.changed_lock.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.notify_all();
        if let Some(wake) = self.waker.get() {
            wake();
        }
    }
}

fn run_jobs(jobs: Receiver<SyncJob>, shared: Arc<Shared>) {
    while let Ok(job) = jobs.recv() {
        match job.run() {
            Ok(()) => {
                shared.fsyncs.fetch_add(1, Ordering::Relaxed);
                shared.durable.fetch_max(job.up_to, Ordering::Release);
            }
            Err(e) => {
                let mut f = shared.failure.lock().unwrap_or_else(|p| p.into_inner());
                f.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        shared.notify();
    }
}

/// A log's fsync thread. The owner hands it jobs ([`Syncer::submit`]);
/// it runs them in order and publishes the durable position. Dropping the
/// `Syncer` ends the thread after the jobs queued.
pub struct Syncer {
    shared: Arc<Shared>,
    jobs: SyncSender<SyncJob>,
    /// The highest position handed over.
    requested: u64,
}

impl Syncer {
    /// Starts the thread; `durable` is what is durable already (at open:
    /// everything on disk, fsynced by `Log::open`). `queue` jobs may wait:
    /// each covers everything before it, so a few suffice.
    pub fn spawn(thread: &str, durable: u64, queue: usize) -> Result<Self> {
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(durable),
            failure: Mutex::new(None),
            fsyncs: AtomicU64::new(0),
            changed: Condvar::new(),
            changed_lock: Mutex::new(()),
            waker: OnceLock::new(),
        });
        let (jobs, rx) = std::sync::mpsc::sync_channel(queue);
        {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(thread.into())
                .spawn(move || run_jobs(rx, shared))
                .with_context(|| format!("starting the fsync thread {thread}"))?;
        }
        Ok(Syncer {
            shared,
            jobs,
            requested: durable,
        })
    }

    /// Hands a job over (waits while `queue` jobs wait already).
    pub fn submit(&mut self, job: SyncJob) -> Result<()> {
        let (up_to, what) = (job.up_to, job.what);
        self.jobs
            .send(job)
            .map_err(|_| anyhow::anyhow!("{what}: the fsync thread has stopped"))?;
        self.requested = self.requested.max(up_to);
        Ok(())
    }

    /// The highest position handed over.
    pub fn requested(&self) -> u64 {
        self.requested
    }

    /// Entries below this are fsynced.
    pub fn durable(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// True when no fsync is running or waiting (the group commit's cue
    /// to start one at once).
    pub fn idle(&self) -> bool {
        self.durable() >= self.requested
    }

    pub fn fsyncs(&self) -> u64 {
        self.shared.fsyncs.load(Ordering::Relaxed)
    }

    /// The first fsync failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets what the thread calls after each fsync (and failure). Set
    /// once; a second waker is ignored.
    pub fn set_waker(&self, waker: Waker) {
        let _ = self.shared.waker.set(waker);
    }

    /// Waits until entries below `target` are durable, or an fsync failed.
    pub fn wait_durable(&self, target: u64) -> Result<()> {
        anyhow::ensure!(
            target <= self.requested,
            "bug: waiting for position {target}, beyond the {} handed to the fsync thread",
            self.requested
        );
        let mut guard = self
            .shared
            .changed_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while self.durable() < target {
            if let Some(f) = self.failure() {
                anyhow::bail!("{f}");
            }
            // The thread notifies under `changed_lock` after it moves the
            // durable position: checked under the lock, no wake is missed.
            guard = self
                .shared
                .changed
                .wait(guard)
                .unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_times_keep_the_longest_and_count_the_slow_ones_warning_once_a_minute() {
        let times = FsyncTimes::default();
        times.record("test", Duration::from_millis(5));
        assert_eq!((times.max_us(), times.slow()), (5_000, 0));
        times.record("test", SLOW_FSYNC + Duration::from_millis(50));
        assert_eq!((times.max_us(), times.slow()), (150_000, 1));
        let first_warning = times.warned.lock().unwrap().0;
        assert!(first_warning.is_some(), "the first slow fsync is logged");
        times.record("test", SLOW_FSYNC);
        times.record("test", Duration::from_millis(1));
        assert_eq!((times.max_us(), times.slow()), (150_000, 2));
        let warned = *times.warned.lock().unwrap();
        assert_eq!(
            warned,
            (first_warning, 1),
            "a second slow fsync within a minute waits for the next warning"
        );
    }
}
