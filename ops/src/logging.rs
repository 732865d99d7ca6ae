//! Logging to stderr (journald takes it under systemd) with a filter that
//! SIGHUP can change: `[log] level` in the configuration, else RUST_LOG,
//! else `info`.

use anyhow::Result;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Changes the live filter (clones share it).
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: std::sync::Arc<std::sync::Mutex<String>>,
}

/// The filter when the configuration sets none.
pub fn default_level() -> String {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "info".to_string())
}

/// Checks a `[log] level` value: a level (`error` .. `trace`) or an
/// EnvFilter directive list such as `info,weir_receiver=debug`.
pub fn parse_level(text: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(text).map_err(|e| {
        format!("`{text}` is not a log filter ({e}); write e.g. \"info\", \"debug\" or \"info,weir_receiver=debug\"")
    })
}

/// Installs the global subscriber; `json` for log shippers.
pub fn init(json: bool) -> LogControl {
    let level = default_level();
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init();
    }
    LogControl {
        handle,
        current: std::sync::Arc::new(std::sync::Mutex::new(level)),
    }
}

impl LogControl {
    /// Sets the filter; returns the previous one if it changed.
    pub fn set(&self, level: &str) -> Result<Option<String>> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if *current == level {
            return Ok(None);
        }
        let filter = parse_level(level).map_err(|e| anyhow::anyhow!("log.level: {e}"))?;
        self.handle
            .reload(filter)
            .map_err(|e| anyhow::anyhow!("log.level: cannot change the filter: {e}"))?;
        Ok(Some(std::mem::replace(&mut *current, level.to_string())))
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
