//! `file`: JSON Lines per stream; `Bytes` streams are written raw so a
//! file sent through a tcp or stdin source comes out byte-identical. Files
//! are numbered per stream, `{dir}/{stream}.{000001}.jsonl` (or `.bin`),
//! and a new one starts when the current one would pass `max_file_bytes`
//! (so a sequence reset never mixes numbering in a name). Files are never
//! renamed, so the sink's resume state (the current file of each stream and
//! its length after the last confirmed batch) is exact: after a crash each
//! file is cut back to that length, files started after it are removed, and
//! the journal replays from the sink's cursor, so no record is written twice.
//! A write that fails is undone the same way before it is tried again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::decoder::Delivered;
use weir_protocol::units::parse_size;
use weir_protocol::RecordBody;

use super::{json_line, BuildContext, Sink, SinkBuilder, SinkError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub dir: PathBuf,
    #[serde(
        default = "default_max_file",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub max_file_bytes: String,
    /// A record whose line is longer than this is rejected for good (dead
    /// letter) rather than written.
    #[serde(
        default = "default_max_line",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub max_line_bytes: String,
}

fn default_max_file() -> String {
    "256MiB".into()
}
fn default_max_line() -> String {
    "16MiB".into()
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "file";

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        Ok(Box::new(FileSink::new(self, ctx.name())?))
    }

    fn validate(&self) -> Result<(), String> {
        let size = parse_size(&self.max_file_bytes).map_err(|e| format!("max_file_bytes: {e}"))?;
        if size < 4096 {
            return Err(format!(
                "max_file_bytes: {} is below the 4KiB minimum",
                self.max_file_bytes
            ));
        }
        let line = parse_size(&self.max_line_bytes).map_err(|e| format!("max_line_bytes: {e}"))?;
        if line < 64 {
            return Err(format!(
                "max_line_bytes: {} is below the 64B minimum",
                self.max_line_bytes
            ));
        }
        Ok(())
    }
}

/// File names keep letters, digits, `-` and `_`; anything else (`.` and
/// `/` included) becomes `_`, so a stream name cannot escape `dir` and the
/// `{stem}.{number}.{ext}` names parse unambiguously.
pub fn file_stem(stream: &str) -> String {
    let stem: String = stream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if stem.is_empty() {
        "_".into()
    } else {
        stem
    }
}

fn extension(raw: bool) -> &'static str {
    if raw {
        "bin"
    } else {
        "jsonl"
    }
}

/// The number in a file name `{stem}.{number}.{ext}`.
fn number_of(name: &str, stem: &str, ext: &str) -> Option<u64> {
    name.strip_prefix(stem)?
        .strip_prefix('.')?
        .strip_suffix(ext)?
        .strip_suffix('.')?
        .parse()
        .ok()
}

struct OpenFile {
    writer: BufWriter<File>,
    name: String,
    size: u64,
    dirty: bool,
}

/// A stream's current file as saved with the cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Current {
    name: String,
    /// Length after the last flushed batch.
    offset: u64,
}

pub struct FileSink {
    dir: PathBuf,
    /// `{dir}/.weir-created-{sink}`: every file name this sink created,
    /// appended and fsynced before the file is. A resume removes only files
    /// named here: what the sink cannot prove it wrote, it leaves.
    ledger: PathBuf,
    created: HashSet<String>,
    max_bytes: u64,
    max_line: u64,
    files: HashMap<(Arc<str>, bool), OpenFile>,
    /// Every stream's current file and its length as written so far.
    current: BTreeMap<String, Current>,
    /// `current` as of the last confirmed write: the resume state saved
    /// with the cursor, and what a failed write is cut back to.
    confirmed: BTreeMap<String, Current>,
    /// A failed write could not be undone yet: undo it before writing.
    needs_rollback: bool,
    line: Vec<u8>,
}

fn key_name(stream: &str, raw: bool) -> String {
    format!("{}|{}", extension(raw), stream)
}

impl FileSink {
    /// The sink `name` (its ledger is named after it) writing to `cfg.dir`.
    pub fn new(cfg: &Config, name: &str) -> Result<Self> {
        std::fs::create_dir_all(&cfg.dir)
            .with_context(|| format!("dir: cannot create {}", cfg.dir.display()))?;
        let ledger = cfg.dir.join(format!(".weir-created-{}", file_stem(name)));
        let created = match std::fs::read_to_string(&ledger) {
            Ok(text) => text.lines().map(str::to_string).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", ledger.display())),
        };
        Ok(FileSink {
            ledger,
            created,
            dir: cfg.dir.clone(),
            max_bytes: parse_size(&cfg.max_file_bytes).expect("validated"),
            max_line: parse_size(&cfg.max_line_bytes).expect("validated"),
            files: HashMap::new(),
            current: BTreeMap::new(),
            confirmed: BTreeMap::new(),
            needs_rollback: false,
            line: Vec::with_capacity(512),
        })
    }

    fn open(&mut self, stream: &Arc<str>, raw: bool) -> Result<()> {
        let key = key_name(stream, raw);
        let name = match self.current.get(&key) {
            Some(c) => c.name.clone(),
            None => {
                let (stem, ext) = (file_stem(stream), extension(raw));
                let newest = std::fs::read_dir(&self.dir)
                    .with_context(|| format!("reading {}", self.dir.display()))?
                    .flatten()
                    .filter_map(|e| number_of(&e.file_name().to_string_lossy(), &stem, ext))
                    .max()
                    .unwrap_or(0);
                format!("{stem}.{:06}.{ext}", newest + 1)
            }
        };
        let path = self.dir.join(&name);
        if !self.created.contains(&name) && !path.exists() {
            self.record_created(&name)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // The length is saved as the resume offset: a guess would make a
        // resume cut the file at the wrong place.
        let size = file
            .metadata()
            .with_context(|| format!("reading the length of {}", path.display()))?
            .len();
        self.current.entry(key).or_insert(Current {
            name: name.clone(),
            offset: size,
        });
        self.files.insert(
            (stream.clone(), raw),
            OpenFile {
                writer: BufWriter::with_capacity(1 << 20, file),
                name,
                size,
                dirty: false,
            },
        );
        Ok(())
    }

    /// Appends `name` to the ledger (fsynced) before the file is created.
    fn record_created(&mut self, name: &str) -> Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.ledger)
            .with_context(|| format!("opening {}", self.ledger.display()))?;
        f.write_all(format!("{name}\n").as_bytes())
            .and_then(|_| f.sync_data())
            .with_context(|| format!("writing {}", self.ledger.display()))?;
        self.created.insert(name.to_string());
        Ok(())
    }

    /// Removes a file the journal will write again, if the ledger shows
    /// this sink created it; otherwise leaves it and says so.
    fn remove_if_created(&self, name: &str, why: &str) -> Result<()> {
        if self.created.contains(name) {
            tracing::info!(file = %name, "file sink: removing {why} (its records are written again)");
            std::fs::remove_file(self.dir.join(name))
                .with_context(|| format!("removing {}", self.dir.join(name).display()))?;
        } else {
            tracing::warn!(file = %name, ledger = %self.ledger.display(),
                "file sink: leaving a file this sink did not create (not in its ledger); if it holds records of this sink they are written again in a new file");
        }
        Ok(())
    }

    /// Closes a full file; the stream's next record starts a new one.
    fn rotate(&mut self, stream: &Arc<str>, raw: bool) -> Result<()> {
        if let Some(mut f) = self.files.remove(&(stream.clone(), raw)) {
            f.writer
                .flush()
                .with_context(|| format!("writing {}", f.name))?;
            f.writer
                .get_ref()
                .sync_data()
                .with_context(|| format!("syncing {}", f.name))?;
        }
        // The stream's next file is named now, so the stream never drops out
        // of the resume state (a stream missing from it has no confirmed data).
        let key = key_name(stream, raw);
        let (stem, ext) = (file_stem(stream), extension(raw));
        let number = self
            .current
            .get(&key)
            .and_then(|c| number_of(&c.name, &stem, ext))
            .unwrap_or(0);
        self.current.insert(
            key,
            Current {
                name: format!("{stem}.{:06}.{ext}", number + 1),
                offset: 0,
            },
        );
        Ok(())
    }
}

impl Sink for FileSink {
    /// Confirmed once every file touched is fsynced. A record over
    /// `max_line_bytes` is rejected after the records before it are
    /// confirmed. A failure cuts every file back to the last confirmed
    /// write (see `rollback`), so the retry writes nothing twice.
    fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        if self.needs_rollback {
            self.rollback()?;
        }
        let stop = match self.write_records(records) {
            Ok(()) => None,
            Err(SinkError::Reject { at, reason }) => Some((at, reason)),
            Err(SinkError::Retry { error, .. }) => return Err(self.failed(error)),
        };
        if let Err(e) = self.flush() {
            return Err(self.failed(e));
        }
        self.confirmed.clone_from(&self.current);
        match stop {
            None => Ok(records.len()),
            Some((at, reason)) => Err(SinkError::Reject { at, reason }),
        }
    }

    fn resume_state(&self) -> serde_json::Value {
        serde_json::to_value(&self.confirmed).expect("json")
    }

    /// Cuts every file back to what the last confirmed batch left and
    /// removes files started after it: the journal replays the rest.
    fn resume(&mut self, state: &serde_json::Value) -> Result<()> {
        self.cut_back(state)
    }
}

impl FileSink {
    /// A write failed: undo what it wrote, or remember to before the next.
    fn failed(&mut self, error: anyhow::Error) -> SinkError {
        self.needs_rollback = true;
        if let Err(e) = self.rollback() {
            tracing::warn!(dir = %self.dir.display(), "file sink: cannot cut back to the last confirmed write yet ({e:#}); tried again before the next write");
        }
        SinkError::retry(error)
    }

    /// Drops what is buffered and cuts every file back to the last
    /// confirmed write, removing files started since (see `cut_back`).
    fn rollback(&mut self) -> Result<()> {
        for (_, f) in self.files.drain() {
            // Unconfirmed bytes still in the buffer are dropped, not written.
            let _ = f.writer.into_parts();
        }
        let state = serde_json::to_value(&self.confirmed).expect("json");
        self.cut_back(&state)?;
        self.needs_rollback = false;
        Ok(())
    }

    fn write_records(&mut self, records: &[&Delivered]) -> Result<(), SinkError> {
        // Records come in runs of one stream: the file is looked up once
        // per run (and again after a rotation), not once per record.
        let mut at = 0;
        while at < records.len() {
            let first = records[at];
            let raw = matches!(first.body, RecordBody::Bytes(_));
            let run_end = records[at..]
                .iter()
                .position(|r| {
                    !(Arc::ptr_eq(&r.stream, &first.stream) || r.stream == first.stream)
                        || matches!(r.body, RecordBody::Bytes(_)) != raw
                })
                .map_or(records.len(), |n| at + n);
            let key = (first.stream.clone(), raw);
            while at < run_end {
                if !self.files.contains_key(&key) {
                    self.open(&key.0, raw)?;
                }
                let f = self.files.get_mut(&key).expect("opened");
                let mut full = false;
                while at < run_end {
                    let r = records[at];
                    self.line.clear();
                    match &r.body {
                        RecordBody::Bytes(c) => self.line.extend_from_slice(&c.data),
                        _ => {
                            json_line::write_record(&mut self.line, r);
                            self.line.push(b'\n');
                        }
                    }
                    let len = self.line.len() as u64;
                    if len > self.max_line {
                        return Err(SinkError::Reject {
                            at,
                            reason: format!(
                                "record is {len} bytes, over max_line_bytes ({})",
                                self.max_line
                            ),
                        });
                    }
                    if f.size > 0 && f.size + len > self.max_bytes {
                        full = true;
                        break;
                    }
                    f.writer
                        .write_all(&self.line)
                        .with_context(|| format!("writing {}", f.name))?;
                    f.size += len;
                    f.dirty = true;
                    at += 1;
                }
                if full {
                    // The record at `at` starts the stream's next file.
                    self.rotate(&key.0, raw)?;
                }
            }
        }
        Ok(())
    }

    /// Writes out and fsyncs every file touched since the last flush, so
    /// the cursor saved after it never runs ahead of the data on disk.
    fn flush(&mut self) -> Result<()> {
        for ((stream, raw), f) in self.files.iter_mut().filter(|(_, f)| f.dirty) {
            f.writer
                .flush()
                .with_context(|| format!("writing {}", f.name))?;
            f.writer
                .get_ref()
                .sync_data()
                .with_context(|| format!("syncing {}", f.name))?;
            f.dirty = false;
            self.current.insert(
                key_name(stream, *raw),
                Current {
                    name: f.name.clone(),
                    offset: f.size,
                },
            );
        }
        Ok(())
    }

    /// Cuts every file back to the lengths in `state` (a saved resume
    /// state) and removes the files this sink started after it.
    fn cut_back(&mut self, state: &serde_json::Value) -> Result<()> {
        // The resume state is the only proof of which files the sink wrote:
        // without it nothing may be cut or removed, so an unreadable one
        // stops the start (the caller names the cursor file).
        let current: BTreeMap<String, Current> =
            serde_json::from_value(state.clone()).map_err(|e| {
                anyhow::anyhow!(
                    "the saved resume state is not a file sink's ({e}); nothing in {} was cut or \
                     removed. Move the cursor file away to start this sink over (its files are \
                     kept, and the journal's records are written again into new files)",
                    self.dir.display()
                )
            })?;
        let listing: Vec<String> = std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        for (key, cur) in &current {
            let (ext, _stream) = key.split_once('|').unwrap_or(("jsonl", key));
            let path = self.dir.join(&cur.name);
            if let Ok(meta) = std::fs::metadata(&path) {
                if meta.len() > cur.offset {
                    tracing::info!(file = %path.display(), cut_bytes = meta.len() - cur.offset, "file sink: removing records written after the last confirmed batch (they are written again)");
                    OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(cur.offset)?;
                }
            }
            let stem = cur.name.split('.').next().unwrap_or_default();
            let Some(number) = number_of(&cur.name, stem, ext) else {
                continue;
            };
            for name in &listing {
                if number_of(name, stem, ext).is_some_and(|n| n > number) {
                    self.remove_if_created(name, "a file started after the last confirmed batch")?;
                }
            }
        }
        // Streams with no confirmed data at all started after the cursor was
        // saved: their files hold only records the journal replays.
        let known: std::collections::HashSet<(String, String)> = current
            .values()
            .filter_map(|c| {
                let mut parts = c.name.rsplitn(3, '.');
                let ext = parts.next()?.to_string();
                let _number = parts.next()?;
                Some((parts.next()?.to_string(), ext))
            })
            .collect();
        for name in &listing {
            let mut parts = name.rsplitn(3, '.');
            let (Some(ext), Some(number), Some(stem)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let ours = (ext == "jsonl" || ext == "bin")
                && number.len() == 6
                && number.chars().all(|c| c.is_ascii_digit());
            if ours && !known.contains(&(stem.to_string(), ext.to_string())) {
                self.remove_if_created(
                    name,
                    "a file of a stream first written after the last confirmed batch",
                )?;
            }
        }
        self.confirmed.clone_from(&current);
        self.current = current;
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
            epoch: 1,
            seq,
            resent: false,
            body,
        }
    }

    fn point(seq: u64) -> Delivered {
        rec(
            "plant/a",
            seq,
            RecordBody::Point(Point {
                tag: "t".into(),
                ts_ns: 0,
                value: Value::I64(seq as i64),
                quality: 0,
                status: None,
            }),
        )
    }

    fn config(dir: &std::path::Path, max: &str) -> Config {
        Config {
            dir: dir.to_path_buf(),
            max_file_bytes: max.into(),
            max_line_bytes: "1KiB".into(),
        }
    }

    fn seqs(dir: &std::path::Path) -> Vec<u64> {
        seqs_of(dir, "plant_a")
    }

    /// The `seq` of every line in the `.jsonl` files of `stem`, in file order.
    fn seqs_of(dir: &std::path::Path, stem: &str) -> Vec<u64> {
        let mut out = Vec::new();
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort_by_key(|n| number_of(n, stem, "jsonl"));
        for n in names
            .iter()
            .filter(|n| n.starts_with(stem) && n.ends_with(".jsonl"))
        {
            out.extend(
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
        out
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weir-file-sink-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn points_become_jsonl_bytes_stay_raw_and_files_are_numbered_per_stream() {
        let dir = scratch("names");
        let mut sink = FileSink::new(&config(&dir, "4KiB"), "f").unwrap();
        let points: Vec<Delivered> = (0..100).map(point).collect();
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
        assert_eq!(sink.write(&refs).unwrap(), refs.len());
        assert_eq!(
            std::fs::read(dir.join("raw.000001.bin")).unwrap(),
            b"hello\0world"
        );
        assert!(
            dir.join("plant_a.000002.jsonl").exists(),
            "4 KiB files: the points took several"
        );
        assert_eq!(seqs(&dir), (0..100).collect::<Vec<_>>());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn interleaved_streams_and_kinds_in_one_write_each_go_to_their_own_file_in_order() {
        let dir = scratch("interleaved");
        let mut sink = FileSink::new(&config(&dir, "1KiB"), "f").unwrap();
        let chunk = |seq: u64| {
            rec(
                "plant/a",
                seq,
                RecordBody::Bytes(Chunk {
                    data: vec![b'0' + seq as u8],
                    end: false,
                }),
            )
        };
        let other = |seq: u64| {
            let mut r = point(seq);
            r.stream = Arc::from("plant/b");
            r
        };
        // Runs of one stream, a stream's points and bytes in turn, and
        // 1 KiB files, so the runs also cross file rotations.
        let mut records = Vec::new();
        for seq in 0..60 {
            records.push(point(seq));
            if seq % 3 == 0 {
                records.push(other(seq));
                records.push(chunk(seq % 10));
            }
        }
        let refs: Vec<&Delivered> = records.iter().collect();
        assert_eq!(sink.write(&refs).unwrap(), refs.len());
        assert_eq!(seqs(&dir), (0..60).collect::<Vec<_>>());
        assert!(
            dir.join("plant_a.000003.jsonl").exists(),
            "rotated within runs"
        );
        assert_eq!(
            seqs_of(&dir, "plant_b"),
            (0..60).step_by(3).collect::<Vec<_>>()
        );
        let raw = std::fs::read(dir.join("plant_a.000001.bin")).unwrap();
        let want: Vec<u8> = (0..60).step_by(3).map(|s| b'0' + (s % 10) as u8).collect();
        assert_eq!(raw, want);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn resume_cuts_back_to_the_last_confirmed_batch_so_a_replay_writes_nothing_twice() {
        let dir = scratch("resume");
        let mut sink = FileSink::new(&config(&dir, "4KiB"), "f").unwrap();
        let points: Vec<Delivered> = (0..100).map(point).collect();
        let refs: Vec<&Delivered> = points.iter().collect();
        sink.write(&refs[..40]).unwrap();
        let saved = sink.resume_state();
        // Written and flushed after the cursor was saved, then a crash.
        sink.write(&refs[40..70]).unwrap();
        drop(sink);
        let mut sink = FileSink::new(&config(&dir, "4KiB"), "f").unwrap();
        sink.resume(&saved).unwrap();
        sink.write(&refs[40..]).unwrap();
        assert_eq!(seqs(&dir), (0..100).collect::<Vec<_>>());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_unreadable_resume_state_is_an_error_and_deletes_nothing() {
        let dir = scratch("unreadable");
        std::fs::create_dir_all(&dir).unwrap();
        let theirs = ["plant_a.000001.jsonl", "other.000007.bin", "x.000002.jsonl"];
        for name in theirs {
            std::fs::write(dir.join(name), b"not the sink's\n").unwrap();
        }
        for state in [
            serde_json::json!("garbage"),
            serde_json::json!({ "jsonl|plant/a": 5 }),
            serde_json::Value::Null,
        ] {
            let mut sink = FileSink::new(&config(&dir, "4KiB"), "f").unwrap();
            let err = sink
                .resume(&state)
                .expect_err("an unreadable state must not resume");
            assert!(
                format!("{err:#}").contains("nothing in"),
                "the error says nothing was removed: {err:#}"
            );
            for name in theirs {
                assert_eq!(
                    std::fs::read(dir.join(name)).unwrap(),
                    b"not the sink's\n",
                    "{name} survived a resume from {state}"
                );
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn resume_removes_only_files_its_ledger_shows_it_created() {
        let dir = scratch("ledger");
        std::fs::create_dir_all(&dir).unwrap();
        // Someone else's files that look like the sink's.
        std::fs::write(dir.join("plant_a.000009.jsonl"), b"theirs\n").unwrap();
        std::fs::write(dir.join("other.000001.jsonl"), b"theirs\n").unwrap();
        let mut sink = FileSink::new(&config(&dir, "4KiB"), "f").unwrap();
        let points: Vec<Delivered> = (0..10).map(point).collect();
        let refs: Vec<&Delivered> = points.iter().collect();
        sink.write(&refs[..5]).unwrap();
        assert!(dir.join("plant_a.000010.jsonl").exists());
        // Numbered after the sink's current file of that stream.
        std::fs::write(dir.join("plant_a.000011.jsonl"), b"theirs\n").unwrap();
        let saved = sink.resume_state();
        // A stream first written after the cursor was saved, then a crash.
        let late = rec("late", 0, points[0].body.clone());
        sink.write(&[&late]).unwrap();
        drop(sink);
        assert!(dir.join("late.000001.jsonl").exists());
        let mut sink = FileSink::new(&config(&dir, "4KiB"), "f").unwrap();
        sink.resume(&saved).unwrap();
        assert!(
            !dir.join("late.000001.jsonl").exists(),
            "the sink's own late file goes"
        );
        for name in [
            "plant_a.000009.jsonl",
            "plant_a.000011.jsonl",
            "other.000001.jsonl",
        ] {
            assert_eq!(
                std::fs::read(dir.join(name)).unwrap(),
                b"theirs\n",
                "{name} stays"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_overlong_record_is_rejected_for_the_dead_letter_file() {
        let dir = scratch("reject");
        let mut sink = FileSink::new(&config(&dir, "4KiB"), "f").unwrap();
        let big = rec(
            "m",
            0,
            RecordBody::Message(weir_protocol::Message::new("t", vec![1; 4000], 0)),
        );
        match sink.write(&[&big]) {
            Err(SinkError::Reject { at: 0, reason }) => assert!(reason.contains("max_line_bytes")),
            other => panic!("expected a rejection, got {other:?}"),
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_write_is_cut_back_to_the_last_confirmed_one_so_its_retry_writes_nothing_twice() {
        let dir = scratch("rollback");
        let mut sink = FileSink::new(&config(&dir, "4KiB"), "f").unwrap();
        let points: Vec<Delivered> = (0..100).map(point).collect();
        let refs: Vec<&Delivered> = points.iter().collect();
        assert_eq!(sink.write(&refs[..10]).unwrap(), 10);
        // The file the batch rotates into cannot be created: a directory
        // is in its way, so the write fails part way through.
        std::fs::create_dir(dir.join("plant_a.000002.jsonl")).unwrap();
        match sink.write(&refs[10..]) {
            Err(SinkError::Retry { confirmed: 0, .. }) => {}
            other => panic!("expected a retryable failure, got {other:?}"),
        }
        assert_eq!(
            seqs_in(&dir, "plant_a.000001.jsonl"),
            (0..10).collect::<Vec<_>>()
        );
        std::fs::remove_dir(dir.join("plant_a.000002.jsonl")).unwrap();
        assert_eq!(sink.write(&refs[10..]).unwrap(), 90);
        assert_eq!(seqs(&dir), (0..100).collect::<Vec<_>>());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn seqs_in(dir: &std::path::Path, name: &str) -> Vec<u64> {
        std::fs::read_to_string(dir.join(name))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn stream_names_cannot_escape_the_directory() {
        assert_eq!(file_stem("../../etc/passwd"), "______etc_passwd");
        assert_eq!(file_stem("plant/line 1"), "plant_line_1");
    }
}
