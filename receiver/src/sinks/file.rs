//! `file`: one JSON Lines file per stream (`{dir}/{stream}.jsonl`); `Bytes`
//! streams are written raw (`{dir}/{stream}.bin`) so a file sent through a
//! tcp or stdin source comes out byte-identical. When a file would pass
//! `max_file_bytes` it is closed and renamed with the sequence range it
//! holds (`{stream}.{first}-{last}.jsonl`) and a new one is started.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::decoder::Delivered;
use weir_protocol::units::parse_size;
use weir_protocol::RecordBody;

use super::{default_streams, record_json, Sink};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub name: String,
    #[serde(default = "default_streams")]
    pub streams: Vec<String>,
    pub dir: PathBuf,
    #[serde(default = "default_max_file")]
    pub max_file_bytes: String,
}

fn default_max_file() -> String {
    "256MiB".into()
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        let size = parse_size(&self.max_file_bytes).map_err(|e| format!("max_file_bytes: {e}"))?;
        if size < 4096 {
            return Err(format!(
                "max_file_bytes: {} is below the 4KiB minimum",
                self.max_file_bytes
            ));
        }
        Ok(())
    }
}

/// File names keep letters, digits, `.`, `-` and `_`; anything else
/// (including `/`) becomes `_`, so a stream name cannot escape `dir`.
pub fn file_stem(stream: &str) -> String {
    let stem: String = stream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if stem.starts_with('.') {
        format!("_{stem}")
    } else {
        stem
    }
}

struct OpenFile {
    writer: BufWriter<File>,
    path: PathBuf,
    size: u64,
    first_seq: Option<u64>,
    last_seq: u64,
    /// Written since the last fsync.
    dirty: bool,
}

pub struct FileSink {
    dir: PathBuf,
    max_bytes: u64,
    files: HashMap<(Arc<str>, bool), OpenFile>,
    written: HashMap<Arc<str>, u64>,
    line: Vec<u8>,
}

impl FileSink {
    pub fn new(cfg: &Config) -> Result<Self> {
        std::fs::create_dir_all(&cfg.dir)
            .with_context(|| format!("dir: cannot create {}", cfg.dir.display()))?;
        Ok(FileSink {
            dir: cfg.dir.clone(),
            max_bytes: parse_size(&cfg.max_file_bytes).expect("validated"),
            files: HashMap::new(),
            written: HashMap::new(),
            line: Vec::with_capacity(512),
        })
    }

    fn open(dir: &Path, stream: &str, raw: bool) -> Result<OpenFile> {
        let path = dir.join(format!(
            "{}.{}",
            file_stem(stream),
            if raw { "bin" } else { "jsonl" }
        ));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(OpenFile {
            writer: BufWriter::with_capacity(1 << 20, file),
            path,
            size,
            first_seq: None,
            last_seq: 0,
            dirty: false,
        })
    }

    fn rotate(&mut self, key: &(Arc<str>, bool)) -> Result<()> {
        let Some(mut f) = self.files.remove(key) else {
            return Ok(());
        };
        f.writer
            .flush()
            .with_context(|| format!("writing {}", f.path.display()))?;
        f.writer
            .get_ref()
            .sync_data()
            .with_context(|| format!("syncing {}", f.path.display()))?;
        let first = f
            .first_seq
            .map_or_else(|| "start".to_string(), |s| s.to_string());
        let ext = if key.1 { "bin" } else { "jsonl" };
        let rotated = self.dir.join(format!(
            "{}.{}-{}.{ext}",
            file_stem(&key.0),
            first,
            f.last_seq
        ));
        std::fs::rename(&f.path, &rotated)
            .with_context(|| format!("rotating {} to {}", f.path.display(), rotated.display()))?;
        Ok(())
    }
}

impl Sink for FileSink {
    fn write(&mut self, records: &[&Delivered]) -> Result<()> {
        for r in records {
            if self.written.get(&r.stream).is_some_and(|w| r.seq <= *w) {
                continue; // already written before a retried failure
            }
            let raw = matches!(r.body, RecordBody::Bytes(_));
            self.line.clear();
            match &r.body {
                RecordBody::Bytes(c) => self.line.extend_from_slice(&c.data),
                _ => {
                    serde_json::to_writer(&mut self.line, &record_json(r))?;
                    self.line.push(b'\n');
                }
            }
            let key = (r.stream.clone(), raw);
            if let Some(f) = self.files.get(&key) {
                if f.size > 0 && f.size + self.line.len() as u64 > self.max_bytes {
                    self.rotate(&key)?;
                }
            }
            let f = match self.files.get_mut(&key) {
                Some(f) => f,
                None => {
                    let f = Self::open(&self.dir, &r.stream, raw)?;
                    self.files.entry(key).or_insert(f)
                }
            };
            f.writer
                .write_all(&self.line)
                .with_context(|| format!("writing {}", f.path.display()))?;
            f.size += self.line.len() as u64;
            f.dirty = true;
            f.first_seq.get_or_insert(r.seq);
            f.last_seq = r.seq;
            self.written.insert(r.stream.clone(), r.seq);
        }
        Ok(())
    }

    /// Writes out and fsyncs every file touched since the last flush, so
    /// the cursor saved after it never runs ahead of the data on disk.
    fn flush(&mut self) -> Result<()> {
        for f in self.files.values_mut().filter(|f| f.dirty) {
            f.writer
                .flush()
                .with_context(|| format!("writing {}", f.path.display()))?;
            f.writer
                .get_ref()
                .sync_data()
                .with_context(|| format!("syncing {}", f.path.display()))?;
            f.dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_protocol::{Chunk, Point, Value};

    fn rec(stream: &str, seq: u64, body: RecordBody) -> Delivered {
        Delivered {
            stream: Arc::from(stream),
            source_type: Arc::from("x"),
            session: 1,
            seq,
            resent: false,
            body,
        }
    }

    #[test]
    fn points_become_jsonl_bytes_stay_raw_and_files_rotate_with_their_range() {
        let dir = std::env::temp_dir().join(format!("weir-file-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = Config {
            name: "f".into(),
            streams: default_streams(),
            dir: dir.clone(),
            max_file_bytes: "4KiB".into(),
        };
        let mut sink = FileSink::new(&cfg).unwrap();
        let points: Vec<Delivered> = (0..100)
            .map(|i| {
                rec(
                    "plant/a",
                    i,
                    RecordBody::Point(Point {
                        tag: "t".into(),
                        ts_ns: 0,
                        value: Value::I64(i as i64),
                        quality: 0,
                    }),
                )
            })
            .collect();
        let bytes = rec(
            "raw",
            0,
            RecordBody::Bytes(Chunk {
                data: b"hello\0world".to_vec(),
                end: true,
            }),
        );
        let mut refs: Vec<&Delivered> = points.iter().collect();
        refs.push(&bytes);
        sink.write(&refs).unwrap();
        sink.write(&refs).unwrap(); // a retry writes nothing twice
        sink.flush().unwrap();
        assert_eq!(std::fs::read(dir.join("raw.bin")).unwrap(), b"hello\0world");
        let mut lines = Vec::new();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert!(
            names.iter().any(|n| n.starts_with("plant_a.0-")),
            "rotated file named by range: {names:?}"
        );
        for n in names.iter().filter(|n| n.starts_with("plant_a")) {
            lines.extend(
                std::fs::read_to_string(dir.join(n))
                    .unwrap()
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                            .as_u64()
                            .unwrap()
                    }),
            );
        }
        lines.sort_unstable();
        assert_eq!(lines, (0..100).collect::<Vec<_>>());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stream_names_cannot_escape_the_directory() {
        assert_eq!(file_stem("../../etc/passwd"), "_.._.._etc_passwd");
        assert_eq!(file_stem("plant/line 1"), "plant_line_1");
    }
}
