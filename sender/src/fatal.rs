//! Threads and tasks that must not die quietly. Each long-running part of
//! the sender (the link thread, the spool sync thread, every source) runs
//! under [`spawn`] or reports here; the first fatal error stops the sender
//! with a non-zero exit and an ERROR line naming the thread and the cause,
//! so systemd restarts it. A process that stays up doing nothing is the
//! worst failure for an unattended diode.

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub struct Fatal {
    /// (thread, cause) of the first fatal error.
    first: Mutex<Option<(String, String)>>,
    /// Woken on every report (one permit is kept if nobody waits).
    pub notify: tokio::sync::Notify,
}

impl Fatal {
    pub fn new() -> Arc<Fatal> {
        Arc::new(Fatal {
            first: Mutex::new(None),
            notify: tokio::sync::Notify::new(),
        })
    }

    /// Records a fatal error of `thread` and wakes the main loop.
    pub fn report(&self, thread: &str, cause: &str) {
        tracing::error!(
            thread,
            "{thread} failed: {cause}; the sender stops with a non-zero exit so its supervisor restarts it"
        );
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some((thread.to_string(), cause.to_string()));
        }
        drop(first);
        self.notify.notify_one();
    }

    /// The first fatal error, if any.
    pub fn first(&self) -> Option<(String, String)> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The message of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Runs `body` on a named thread; an error or a panic is reported to `fatal`.
pub fn spawn(
    name: &'static str,
    fatal: Arc<Fatal>,
    body: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(
            move || match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => fatal.report(name, &format!("{e:#}")),
                Err(panic) => fatal.report(name, &format!("panicked: {}", panic_message(&*panic))),
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_or_a_panic_of_a_spawned_thread_is_reported_with_its_name() {
        let fatal = Fatal::new();
        spawn("weir-test-err", fatal.clone(), || {
            anyhow::bail!("disk gone")
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(
            fatal.first(),
            Some(("weir-test-err".to_string(), "disk gone".to_string()))
        );
        let fatal = Fatal::new();
        spawn("weir-test-panic", fatal.clone(), || {
            panic!("invariant broken")
        })
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(
            fatal.first(),
            Some((
                "weir-test-panic".to_string(),
                "panicked: invariant broken".to_string()
            ))
        );
    }
}
