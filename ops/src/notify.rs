//! systemd notification for `Type=notify` units. Every call is a no-op
//! outside systemd (no NOTIFY_SOCKET).
//!
//! The watchdog is fed only while every thread that matters is alive:
//! each such thread holds a [`Beat`] and touches it in its loop; the
//! `weir-watchdog` thread sends WATCHDOG=1 only when every beat is fresher
//! than half the watchdog interval, so a hung decoder or link thread stops
//! the pings and systemd restarts the service.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// READY=1 with a status line.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(status),
        ],
    );
}

/// STOPPING=1 with a status line.
pub fn stopping(status: &str) {
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status(status),
        ],
    );
}

/// RELOADING=1 then READY=1 around a SIGHUP reload (Type=notify-reload semantics).
pub fn reloading() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
}

/// The last sign of life of one thread.
#[derive(Clone)]
pub struct Beat {
    at: Arc<AtomicU64>,
    origin: Instant,
}

impl Beat {
    /// Marks the thread alive now.
    pub fn touch(&self) {
        self.at
            .store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// The process's watchdog (WATCHDOG_USEC read on first use): threads
/// take their beat from it with `watchdog().beat("name")`.
pub fn watchdog() -> &'static Arc<Watchdog> {
    static DOG: std::sync::OnceLock<Arc<Watchdog>> = std::sync::OnceLock::new();
    DOG.get_or_init(Watchdog::from_env)
}

/// The threads the watchdog waits for.
pub struct Watchdog {
    origin: Instant,
    beats: Mutex<Vec<(String, Arc<AtomicU64>)>>,
    interval: Option<Duration>,
}

impl Watchdog {
    /// Reads WATCHDOG_USEC (for this process only); without it the
    /// watchdog is off and beats cost one relaxed store.
    pub fn from_env() -> Arc<Watchdog> {
        let mut usec = 0;
        let enabled = sd_notify::watchdog_enabled(false, &mut usec);
        Arc::new(Watchdog {
            origin: Instant::now(),
            beats: Mutex::new(Vec::new()),
            interval: (enabled && usec > 0).then(|| Duration::from_micros(usec)),
        })
    }

    pub fn enabled(&self) -> bool {
        self.interval.is_some()
    }

    /// A beat for the thread `name`, alive from now.
    pub fn beat(&self, name: &str) -> Beat {
        let at = Arc::new(AtomicU64::new(self.origin.elapsed().as_millis() as u64));
        self.beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), at.clone()));
        Beat {
            at,
            origin: self.origin,
        }
    }

    /// The thread names whose beat is older than `limit`.
    pub fn stale(&self, limit: Duration) -> Vec<String> {
        let now = self.origin.elapsed().as_millis() as u64;
        self.beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, at)| {
                now.saturating_sub(at.load(Ordering::Relaxed)) > limit.as_millis() as u64
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Starts `weir-watchdog` when systemd asked for a watchdog: every
    /// quarter interval it sends WATCHDOG=1 if no beat is older than half
    /// the interval, else logs (once per stall) which thread is stuck.
    pub fn start(self: &Arc<Self>) {
        let Some(interval) = self.interval else {
            return;
        };
        let dog = self.clone();
        let spawned = std::thread::Builder::new()
            .name("weir-watchdog".into())
            .spawn(move || {
                let mut warned = false;
                loop {
                    std::thread::sleep(interval / 4);
                    let stale = dog.stale(interval / 2);
                    if stale.is_empty() {
                        warned = false;
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    } else if !warned {
                        warned = true;
                        tracing::error!(threads = ?stale, "threads stopped making progress: not feeding the systemd watchdog, which will restart the service");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the watchdog thread: {e}; systemd will restart the service when the watchdog expires");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_stops_touching_its_beat_is_named_stale() {
        let dog = Watchdog::from_env();
        let live = dog.beat("weir-decode");
        let _hung = dog.beat("weir-recv");
        std::thread::sleep(Duration::from_millis(30));
        live.touch();
        assert_eq!(
            dog.stale(Duration::from_millis(20)),
            vec!["weir-recv".to_string()]
        );
        assert!(dog.stale(Duration::from_secs(5)).is_empty());
    }
}
