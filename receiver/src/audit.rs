//! The audit log: append-only JSON Lines of everything an auditor needs to
//! account for: receiver starts, sender sessions and configuration hashes,
//! gaps with their exact sequence ranges and causes, heartbeat loss.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

pub struct AuditLog {
    file: File,
    path: PathBuf,
    dirty: bool,
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("audit.path: cannot create directory {}", dir.display())
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("audit.path: cannot open {} for appending", path.display()))?;
        Ok(AuditLog {
            file,
            path: path.to_path_buf(),
            dirty: false,
        })
    }

    /// Appends one event; `fields` must be a JSON object. The event name
    /// comes first and `at` (RFC 3339, UTC, nanoseconds) is added.
    pub fn write(&mut self, event: &str, fields: Value) {
        let mut line = serde_json::Map::new();
        line.insert("event".into(), json!(event));
        if let Value::Object(map) = fields {
            line.extend(map);
        }
        line.insert("at".into(), json!(now_rfc3339()));
        let mut text = serde_json::to_string(&Value::Object(line)).expect("json");
        text.push('\n');
        if let Err(e) = self.file.write_all(text.as_bytes()) {
            // The audit log is the record of losses: failing to write it is
            // as loud as we can make it, but it must not stop delivery.
            tracing::error!(
                "audit.path: cannot append to {}: {e}; event was: {}",
                self.path.display(),
                text.trim()
            );
        }
        self.dirty = true;
    }

    /// Makes written events durable; called on a timer and at exit.
    pub fn sync(&mut self) {
        if self.dirty {
            if let Err(e) = self.file.sync_data() {
                tracing::error!("audit.path: cannot sync {}: {e}", self.path.display());
            }
            self.dirty = false;
        }
    }
}
