//! Durable per-stream cursors: the last sequence number every sink routed
//! that stream has written, and the sender session it belonged to. Loaded
//! at start so a restarted receiver neither repeats records nor hides what
//! it missed; saved atomically (temp file, fsync, rename).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCursor {
    /// Sender session (hex) the last record belonged to.
    pub session: Option<String>,
    /// The stream's sequence epoch (hex), see the wire format.
    #[serde(default)]
    pub epoch: Option<String>,
    pub last: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub streams: BTreeMap<String, StreamCursor>,
}

pub struct StateFile {
    path: PathBuf,
    last_saved: State,
}

impl StateFile {
    pub fn open(dir: &Path) -> Result<(Self, State)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("journal.path: cannot create directory {}", dir.display()))?;
        let path = dir.join("cursors.json");
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!("journal.path: {} is not a valid cursor file; move it away to start without cursors", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e).with_context(|| format!("journal.path: cannot read {}", path.display())),
        };
        Ok((
            StateFile {
                path,
                last_saved: state.clone(),
            },
            state,
        ))
    }

    pub fn save(&mut self, state: &State) -> Result<()> {
        if *state == self.last_saved {
            return Ok(());
        }
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("json");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(&bytes)?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))?;
        self.last_saved = state.clone();
        Ok(())
    }
}

pub fn parse_session(hex: &str) -> Option<u64> {
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_survive_a_save_and_reopen() {
        let dir = std::env::temp_dir().join(format!("weir-state-test-{}", std::process::id()));
        let (mut file, state) = StateFile::open(&dir).unwrap();
        assert!(state.streams.is_empty());
        let mut s = State::default();
        s.streams.insert(
            "gen".into(),
            StreamCursor {
                session: Some("00ff".into()),
                epoch: Some("01".into()),
                last: Some(41),
            },
        );
        file.save(&s).unwrap();
        let (_, back) = StateFile::open(&dir).unwrap();
        assert_eq!(back, s);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
