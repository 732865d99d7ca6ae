//! SIGHUP: what each side re-reads without a restart besides the log
//! level. A component built from credential files (a password, a bearer
//! token, TLS certificates and keys) keeps what it built in a
//! [`Reloadable`], which the SIGHUP handler reads again; and
//! [`changed_settings`] says which other settings of the file changed, so
//! the log can say that they need a restart.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Result;
use sha2::{Digest, Sha256};

/// What a component builds from its credential files (a password, a
/// bearer token, a TLS client configuration), read at start and again on
/// SIGHUP by [`Reload::reload`]. The component takes [`Reloadable::get`]
/// at each connect or request, so a new value is used from the next one;
/// a connection already open keeps what it was opened with.
///
/// A reload that fails (a file missing, readable by others, not PEM, a
/// key that does not fit its certificate) keeps the value in use and
/// says why, naming the file.
pub struct Reloadable<T> {
    /// `(configuration key, path)` of every file the value is built from.
    files: Vec<(String, PathBuf)>,
    load: Box<dyn Fn() -> Result<T> + Send + Sync>,
    current: RwLock<Arc<T>>,
    /// SHA-256 of each file as last read into the value in use (`None`:
    /// it could not be read), to say which files changed.
    digests: Mutex<Vec<Option<[u8; 32]>>>,
}

/// What a reload did with one file (or, for `Failed`, with the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// Read again; its contents differ from the last read, and the new
    /// value is in use from the next connection or request.
    Changed,
    /// Read again; the same contents.
    Unchanged,
    /// The value could not be built (the message names the file at
    /// fault); the previous one stays in use.
    Failed(String),
}

/// One line of a reload's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// The configuration key that names the file (`password_file`).
    pub key: String,
    pub path: PathBuf,
    pub outcome: Reloaded,
}

/// A [`Reloadable`] of any type, as the SIGHUP handler holds it.
pub trait Reload: Send + Sync {
    /// Reads the files again and, when the value builds, puts it in use.
    /// One report per file; when the value does not build, one `Failed`
    /// report and nothing else.
    fn reload(&self) -> Vec<FileReport>;
}

/// Longest file digested for change detection (a CA bundle is ~200 KiB).
const MAX_DIGESTED: u64 = 4 << 20;

fn digest_of(path: &Path) -> Option<[u8; 32]> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_DIGESTED).read_to_end(&mut bytes))
        .ok()?;
    Some(Sha256::digest(&bytes).into())
}

impl<T: Send + Sync + 'static> Reloadable<T> {
    /// Builds the value now with `load`, which reads `files` (`(key,
    /// path)`: the files it depends on); an error is the component's
    /// start-up error.
    pub fn new(
        files: Vec<(String, PathBuf)>,
        load: impl Fn() -> Result<T> + Send + Sync + 'static,
    ) -> Result<Arc<Self>> {
        let digests = files.iter().map(|(_, p)| digest_of(p)).collect();
        let value = load()?;
        Ok(Arc::new(Reloadable {
            files,
            load: Box::new(load),
            current: RwLock::new(Arc::new(value)),
            digests: Mutex::new(digests),
        }))
    }

    /// The value in use.
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl<T: Send + Sync + 'static> Reload for Reloadable<T> {
    fn reload(&self) -> Vec<FileReport> {
        // Digested before the load: a file replaced in between is
        // reported changed again at the next SIGHUP, never missed.
        let digests: Vec<Option<[u8; 32]>> = self.files.iter().map(|(_, p)| digest_of(p)).collect();
        match (self.load)() {
            Err(e) => {
                let (key, path) = self.files.first().cloned().unwrap_or_default();
                vec![FileReport {
                    key,
                    path,
                    outcome: Reloaded::Failed(format!("{e:#}")),
                }]
            }
            Ok(value) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
                let mut last = self.digests.lock().unwrap_or_else(|e| e.into_inner());
                let reports = self
                    .files
                    .iter()
                    .zip(last.iter().zip(&digests))
                    .map(|((key, path), (was, now))| FileReport {
                        key: key.clone(),
                        path: path.clone(),
                        outcome: if was == now {
                            Reloaded::Unchanged
                        } else {
                            Reloaded::Changed
                        },
                    })
                    .collect();
                *last = digests;
                reports
            }
        }
    }
}

/// Logs what reloading the credential files of component `name` (`what`:
/// "sink" or "source") did: one line per file, an ERROR when the files
/// did not load (the component keeps what it had).
pub fn reload_and_log(what: &str, name: &str, reloads: &[Arc<dyn Reload>]) {
    for r in reloads {
        for report in r.reload() {
            let (key, path) = (&report.key, report.path.display());
            match report.outcome {
                Reloaded::Changed => tracing::warn!(
                    "SIGHUP: {what} `{name}`: {key} {path} re-read, changed; used from its next connection or request"
                ),
                Reloaded::Unchanged => {
                    tracing::info!("SIGHUP: {what} `{name}`: {key} {path} re-read, unchanged")
                }
                Reloaded::Failed(e) => tracing::error!(
                    "SIGHUP: {what} `{name}`: {e}; it keeps the credentials it read before"
                ),
            }
        }
    }
}

/// The settings that differ between the configuration running (`old`) and
/// the file as it is now (`new`), both as their effective JSON: the
/// top-level keys (tables) that differ, except those in `skip` (what
/// SIGHUP applies), and for the array `list` (`sinks`, `sources`) each
/// entry by its `name`: `sinks (x).url`, `sinks (y): added`.
pub fn changed_settings(
    old: &serde_json::Value,
    new: &serde_json::Value,
    list: &str,
    skip: &[&str],
) -> Vec<String> {
    use serde_json::Value;
    let empty = serde_json::Map::new();
    let (old, new) = (
        old.as_object().unwrap_or(&empty),
        new.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for key in keys {
        if skip.contains(&key.as_str()) || old.get(key) == new.get(key) {
            continue;
        }
        if key != list {
            out.push(key.clone());
            continue;
        }
        let entries = |v: Option<&Value>| -> Vec<(String, Value)> {
            v.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            let name = e.get("name").and_then(Value::as_str).unwrap_or("");
                            (name.to_string(), e.clone())
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let (was, now) = (entries(old.get(key)), entries(new.get(key)));
        let listed = out.len();
        for (name, entry) in &now {
            match was.iter().find(|(n, _)| n == name) {
                None => out.push(format!("{key} ({name}): added")),
                Some((_, before)) => {
                    let (b, a) = (
                        before.as_object().unwrap_or(&empty),
                        entry.as_object().unwrap_or(&empty),
                    );
                    let mut fields: Vec<&String> = b.keys().chain(a.keys()).collect();
                    fields.sort();
                    fields.dedup();
                    for f in fields {
                        if b.get(f) != a.get(f) {
                            out.push(format!("{key} ({name}).{f}"));
                        }
                    }
                }
            }
        }
        for (name, _) in &was {
            if !now.iter().any(|(n, _)| n == name) {
                out.push(format!("{key} ({name}): removed"));
            }
        }
        if out.len() == listed {
            out.push(format!("{key}: order"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_puts_a_changed_secret_in_use_and_a_failed_one_keeps_the_old_value() {
        let dir = std::env::temp_dir().join(format!("weir-ops-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("password");
        std::fs::write(&path, "one").unwrap();
        let p = path.clone();
        // Like a secret reader: an empty file is refused, naming it.
        let cell = Reloadable::new(vec![("password_file".into(), path.clone())], move || {
            let text = std::fs::read_to_string(&p)?;
            anyhow::ensure!(!text.is_empty(), "password_file: {} is empty", p.display());
            Ok(text)
        })
        .unwrap();
        assert_eq!(*cell.get(), "one");
        let report = |outcome| {
            vec![FileReport {
                key: "password_file".into(),
                path: path.clone(),
                outcome,
            }]
        };
        assert_eq!(cell.reload(), report(Reloaded::Unchanged));
        std::fs::write(&path, "two").unwrap();
        assert_eq!(cell.reload(), report(Reloaded::Changed));
        assert_eq!(*cell.get(), "two");
        std::fs::write(&path, "").unwrap();
        let got = cell.reload();
        assert!(
            matches!(&got[0].outcome, Reloaded::Failed(m) if m.starts_with("password_file:") && m.contains("empty")),
            "{got:?}"
        );
        assert_eq!(*cell.get(), "two", "a failed reload keeps the old value");
        std::fs::write(&path, "two").unwrap();
        assert_eq!(
            cell.reload(),
            report(Reloaded::Unchanged),
            "compared with the value in use, not with the failed read"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn changed_settings_name_the_table_and_each_sinks_key() {
        let old = serde_json::json!({
            "link": {"listen": "127.0.0.1:1"}, "log": {"level": "info"},
            "sinks": [{"name": "a", "url": "x", "qos": 1}, {"name": "b"}]
        });
        let new = serde_json::json!({
            "link": {"listen": "127.0.0.1:2"}, "log": {"level": "debug"},
            "sinks": [{"name": "a", "url": "y", "qos": 1}, {"name": "c"}]
        });
        assert_eq!(
            changed_settings(&old, &new, "sinks", &["log"]),
            [
                "link",
                "sinks (a).url",
                "sinks (c): added",
                "sinks (b): removed"
            ]
        );
        assert!(changed_settings(&old, &old, "sinks", &["log"]).is_empty());
    }
}
