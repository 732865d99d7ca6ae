//! What `weir-bench` and `weir-tcpsink` compute from raw observations:
//! percentiles, the source timestamp of a delivered record, gaps counted
//! from the receiver's audit log, and the one report `make bench` prints as
//! a markdown table and writes as `bench.json`.
//!
//! The JSON key names are a stable interface (docs/performance.md, "What is
//! measured"): rename a field only together with that section and
//! [`SCHEMA`].

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Version of the `bench.json` layout; raise it when a key changes meaning.
/// 2: `groups`, `mqtt`, `services`, `files_large`, `files_small`; the
/// sections of a group not run are `null`.
pub const SCHEMA: u32 = 2;

/// The groups of rows `weir-bench` can run (`--only`, `--skip`): `core` is
/// issue 9's table (ceiling, bulk, small records, latency, lagging sink);
/// `mqtt` issue 10's row; `postgres`, `nats`, `kafka`, `http` issue 11's
/// (together: `services`); `files` issue 13's.
pub const GROUPS: [&str; 7] = ["core", "mqtt", "postgres", "nats", "kafka", "http", "files"];

/// The service sinks of issue 11, the members of the `services` group.
pub const SERVICES: [&str; 4] = ["postgres", "nats", "kafka", "http"];

fn group_list(flag: &str, text: &str) -> Result<Vec<&'static str>> {
    let mut out = Vec::new();
    for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        if word == "services" {
            out.extend(SERVICES);
        } else if let Some(g) = GROUPS.iter().find(|g| **g == word) {
            out.push(*g);
        } else {
            bail!(
                "{flag}: `{word}` is not a group; use any of {}, services",
                GROUPS.join(", ")
            );
        }
    }
    if out.is_empty() {
        bail!(
            "{flag}: names no group; use any of {}, services",
            GROUPS.join(", ")
        );
    }
    Ok(out)
}

/// The groups a run measures, in [`GROUPS`] order: all of them, or those
/// `only` names (comma-separated, `services` for the four service sinks),
/// less those `skip` names.
pub fn select_groups(only: Option<&str>, skip: Option<&str>) -> Result<Vec<String>> {
    let only = only.map(|t| group_list("--only", t)).transpose()?;
    let skip = skip
        .map(|t| group_list("--skip", t))
        .transpose()?
        .unwrap_or_default();
    let chosen: Vec<String> = GROUPS
        .iter()
        .filter(|g| only.as_ref().is_none_or(|o| o.contains(g)))
        .filter(|g| !skip.contains(g))
        .map(|g| g.to_string())
        .collect();
    if chosen.is_empty() {
        bail!("--only and --skip leave no group to run");
    }
    Ok(chosen)
}

/// What arrived of records numbered `0..total`: each number counted once,
/// duplicates, numbers outside the range, and numbers that came after a
/// higher one of the same lane (a stream, or an MQTT topic). A bench row
/// reports a rate only when [`SeqTally::complete`] holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqTally {
    total: u64,
    seen: Vec<bool>,
    last: Vec<Option<u64>>,
    pub distinct: u64,
    pub duplicates: u64,
    pub out_of_range: u64,
    pub out_of_order: u64,
}

impl SeqTally {
    pub fn new(total: u64) -> Self {
        SeqTally {
            total,
            seen: vec![false; usize::try_from(total).unwrap_or(usize::MAX)],
            ..SeqTally::default()
        }
    }

    /// Notes record `seq` of lane 0.
    pub fn note(&mut self, seq: u64) {
        self.note_in(0, seq);
    }

    /// Notes record `seq` of lane `lane`.
    pub fn note_in(&mut self, lane: usize, seq: u64) {
        if self.last.len() <= lane {
            self.last.resize(lane + 1, None);
        }
        if self.last[lane].is_some_and(|l| seq < l) {
            self.out_of_order += 1;
        }
        self.last[lane] = Some(self.last[lane].map_or(seq, |l| l.max(seq)));
        match usize::try_from(seq).ok().and_then(|i| self.seen.get_mut(i)) {
            Some(seen) if *seen => self.duplicates += 1,
            Some(seen) => {
                *seen = true;
                self.distinct += 1;
            }
            None => self.out_of_range += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Every record arrived, exactly once, and nothing else did.
    pub fn complete(&self) -> bool {
        self.distinct == self.total && self.duplicates == 0 && self.out_of_range == 0
    }

    /// The first few numbers that did not arrive.
    pub fn first_missing(&self, n: usize) -> Vec<u64> {
        self.seen
            .iter()
            .enumerate()
            .filter(|(_, s)| !**s)
            .take(n)
            .map(|(i, _)| i as u64)
            .collect()
    }
}

/// Issue 9's memory bound: the peak RSS of each side in every bench run.
pub const RSS_BOUND_MIB: f64 = 256.0;

/// The nearest-rank percentile `p` (0 < p ≤ 100) of `sorted` (ascending):
/// the smallest sample with at least p% of the samples at or below it.
/// `None` for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    debug_assert!(sorted.windows(2).all(|w| w[0] <= w[1]), "not sorted");
    if sorted.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// p50, p99 and max of latency samples in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises `samples_ms` (any order); all zero for no samples.
    pub fn of(mut samples_ms: Vec<f64>) -> Self {
        samples_ms.retain(|v| v.is_finite());
        samples_ms.sort_by(f64::total_cmp);
        LatencySummary {
            samples: samples_ms.len() as u64,
            p50_ms: percentile(&samples_ms, 50.0).unwrap_or(0.0),
            p99_ms: percentile(&samples_ms, 99.0).unwrap_or(0.0),
            max_ms: samples_ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// Nanoseconds since the Unix epoch of an RFC 3339 timestamp such as
/// `2026-11-30T00:25:12.123456789Z` (what the sinks write as `ts`).
pub fn unix_ns_of_rfc3339(text: &str) -> Result<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("{text:?} is not an RFC 3339 timestamp"))?;
    t.timestamp_nanos_opt()
        .with_context(|| format!("{text:?} is outside the nanosecond range"))
}

/// The source timestamp (`ts`, RFC 3339) of one JSON line written by the
/// file, stdout or tcp sink, in nanoseconds since the Unix epoch.
pub fn record_ts_ns(line: &[u8]) -> Result<i64> {
    let v: serde_json::Value = serde_json::from_slice(line).context("line is not JSON")?;
    match v.get("ts").and_then(serde_json::Value::as_str) {
        Some(ts) => unix_ns_of_rfc3339(ts),
        None => bail!("line has no string \"ts\""),
    }
}

/// Splits a byte stream that arrives in arbitrary pieces into lines. A line
/// longer than `max_line` is dropped whole and counted in `overlong`, so a
/// peer that never sends a newline cannot grow the buffer.
pub struct LineSplitter {
    carry: Vec<u8>,
    max_line: usize,
    dropping: bool,
    pub lines: u64,
    pub overlong: u64,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        LineSplitter {
            carry: Vec::new(),
            max_line,
            dropping: false,
            lines: 0,
            overlong: 0,
        }
    }

    /// Feeds the next piece; calls `on_line` with each completed line
    /// (without its `\n`). Overlong lines are counted in `lines` too.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_line: impl FnMut(&[u8])) {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            self.lines += 1;
            if self.dropping {
                self.dropping = false;
            } else if self.carry.is_empty() {
                on_line(&bytes[..i]);
            } else if self.carry.len() + i <= self.max_line {
                self.carry.extend_from_slice(&bytes[..i]);
                on_line(&self.carry);
            } else {
                self.overlong += 1;
            }
            self.carry.clear();
            bytes = &bytes[i + 1..];
        }
        if self.dropping {
            return;
        }
        if self.carry.len() + bytes.len() > self.max_line {
            self.carry.clear();
            self.dropping = true;
            self.overlong += 1;
        } else {
            self.carry.extend_from_slice(bytes);
        }
    }
}

/// Gap events in a receiver audit log (`[audit] path`, JSON lines).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditGaps {
    /// `gap` events.
    pub gaps: u64,
    /// Records they name (`to - from + 1`, inclusive ranges).
    pub gap_records: u64,
    /// Records named per `cause` (`link-loss`, `sink-overflow:NAME`, ...).
    pub gap_records_by_cause: BTreeMap<String, u64>,
}

/// Counts the `gap` events of an audit log and the records they name.
/// A line that is not JSON, or a gap without numeric `from`/`to`, is an
/// error naming the line: a bench must not read a damaged log as "no gaps".
pub fn count_audit_gaps(text: &str) -> Result<AuditGaps> {
    let mut out = AuditGaps::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("audit line {}: not JSON", i + 1))?;
        if v.get("event").and_then(serde_json::Value::as_str) != Some("gap") {
            continue;
        }
        let field = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .with_context(|| format!("audit line {}: gap without a numeric {k:?}", i + 1))
        };
        let (from, to) = (field("from")?, field("to")?);
        if from > to {
            bail!("audit line {}: gap from {from} is after to {to}", i + 1);
        }
        let records = to - from + 1;
        let cause = v
            .get("cause")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unknown");
        out.gaps += 1;
        out.gap_records = out.gap_records.saturating_add(records);
        let by_cause = out
            .gap_records_by_cause
            .entry(cause.to_string())
            .or_default();
        *by_cause = by_cause.saturating_add(records);
    }
    Ok(out)
}

/// Where and on what the bench ran.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// `git rev-parse --short HEAD`, when run inside a checkout.
    pub commit: Option<String>,
    /// RFC 3339, UTC, when the bench started.
    pub date: String,
    pub cpu_model: String,
    pub nproc: u64,
    /// `net.core.rmem_max`, which caps the receiver's socket buffer.
    pub rmem_max: Option<u64>,
}

/// The settings every figure depends on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub bulk_bytes: u64,
    /// `[link] rate` of the sender (all runs).
    pub link_rate: String,
    pub runs: u64,
    pub mtu: u64,
    pub data_shards: u64,
    pub parity_shards: u64,
    /// Directory holding the spools and journals (on disk, not tmpfs).
    pub store: String,
    pub small_records: u64,
    pub small_rate: f64,
    pub small_tags: u64,
    pub latency_seconds: f64,
    pub latency_rate: f64,
    pub lag_journal_max_bytes: u64,
    pub lag_bytes: u64,
    /// `[link] rate` of the sender in the MQTT and service rows.
    #[serde(default)]
    pub service_link_rate: String,
    /// Generator points/s of the service rows.
    #[serde(default)]
    pub service_rate: f64,
    #[serde(default)]
    pub mqtt_payload_bytes: u64,
    /// Most MQTT messages published and not yet at the bench's subscriber.
    #[serde(default)]
    pub mqtt_window: u64,
}

/// The raw UDP ceiling from `weir-udpblast pair`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UdpCeiling {
    /// Best GSO/GRO run losing under 0.5% (MB = 10^6 bytes).
    pub gso_mb_s: f64,
    /// The pacing of that run ("unpaced" or a rate).
    pub gso_rate: String,
    pub gso_unpaced_mb_s: f64,
    pub gso_unpaced_loss_percent: f64,
    /// One datagram per `sendmsg`, unpaced.
    pub plain_mb_s: f64,
    pub plain_loss_percent: f64,
}

/// Peak resident memory (`VmHWM`) of both sides in one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PeakRss {
    pub sender_peak_rss_mib: f64,
    pub receiver_peak_rss_mib: f64,
}

/// One bulk run: random bytes, tcp → sender → UDP → receiver → tcp.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bulk {
    pub bytes_delivered: u64,
    /// First to last byte at the sink.
    pub seconds: f64,
    pub goodput_mb_s: f64,
    pub wire_mb_s: f64,
    pub goodput_per_gso_ceiling: f64,
    pub goodput_per_plain_ceiling: f64,
    pub sender_cpu_s_per_gb: f64,
    pub receiver_cpu_s_per_gb: f64,
    #[serde(flatten)]
    pub rss: PeakRss,
    #[serde(flatten)]
    pub gaps: AuditGaps,
}

/// Small records (generator points) into one sink.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SmallRecords {
    /// "file" or "tcp".
    pub sink: String,
    pub records_sent: u64,
    /// Lines the sink wrote (file) or the peer received (tcp).
    pub records_delivered: u64,
    /// First to last delivered record.
    pub seconds: f64,
    pub records_per_s: f64,
    #[serde(flatten)]
    pub rss: PeakRss,
    #[serde(flatten)]
    pub gaps: AuditGaps,
}

/// Arrival time minus source timestamp of each record, at a steady rate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub rate: f64,
    pub seconds: f64,
    /// Lines that had no parsable `ts` (expected 0).
    pub unparsed: u64,
    #[serde(flatten)]
    pub summary: LatencySummary,
    /// The longest spool and journal fsync of the run (the metrics'
    /// `spool_fsync_max_us`, `journal_fsync_max_us`), in ms: a record
    /// waits for the fsync that covers it on each side. `None` (`null`)
    /// when a metrics file was not read, and in files of earlier builds.
    #[serde(default)]
    pub spool_fsync_max_ms: Option<f64>,
    #[serde(default)]
    pub journal_fsync_max_ms: Option<f64>,
    #[serde(flatten)]
    pub rss: PeakRss,
    #[serde(flatten)]
    pub gaps: AuditGaps,
}

/// A tcp sink whose peer does not read until the journal has filled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LaggingSink {
    pub journal_max_bytes: u64,
    pub bytes_fed: u64,
    pub bytes_delivered: u64,
    /// Seconds the peer did not read.
    pub held_seconds: f64,
    /// Whether `sink.NAME.overflow_records` rose above 0 before the peer
    /// began to read (the journal filled and dropped for this sink).
    pub journal_filled: bool,
    /// `sink.NAME.overflow_records` at the end.
    pub overflow_records: u64,
    #[serde(flatten)]
    pub rss: PeakRss,
    #[serde(flatten)]
    pub gaps: AuditGaps,
}

/// Bulk variants beside the headline row, when `--compare` is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparisons {
    /// Spool and journal on tmpfs, authenticated.
    pub bulk_tmpfs: Bulk,
    /// On disk, `[auth] disabled = true` on both sides.
    pub bulk_auth_disabled: Bulk,
}

/// `status` of a row that ran to the end (whatever it found).
pub const MEASURED: &str = "measured";

/// One end-to-end row of issues 10 and 11: records numbered
/// `0..records_sent` go into weir and are read back from the real server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EndToEnd {
    /// `mqtt-qos0`, `mqtt-qos1`, `postgres`, `nats`, `kafka` or `http`.
    pub target: String,
    /// [`MEASURED`], `skipped: nothing on 127.0.0.1:PORT`, or `error: …`.
    pub status: String,
    /// What went in and how it was counted at the server.
    pub what: String,
    pub records_sent: u64,
    /// Distinct records (`0..records_sent`) the server holds.
    pub records_delivered: u64,
    /// Records the server holds more than once.
    pub duplicates: u64,
    /// Records with a number outside `0..records_sent` (expected 0).
    pub out_of_range: u64,
    /// Records read back after a higher-numbered one of the same stream
    /// (MQTT: topic).
    pub out_of_order: u64,
    /// Every record there exactly once.
    pub complete: bool,
    /// From the first record handed to the sender to the moment the
    /// server was seen holding all of them (or the last one that came).
    pub seconds: f64,
    /// `records_sent / seconds`; `null` unless `complete`.
    pub records_per_s: Option<f64>,
    /// CPU seconds of each side over the whole run.
    pub sender_cpu_s: f64,
    pub receiver_cpu_s: f64,
    #[serde(flatten)]
    pub rss: PeakRss,
    #[serde(flatten)]
    pub gaps: AuditGaps,
}

/// One run of issue 13: files through the `files` source and sink.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FilesRun {
    /// [`MEASURED`] or `error: …`.
    pub status: String,
    pub files_sent: u64,
    pub bytes_per_file: u64,
    /// The sender's `[link] rate` in this run.
    pub link_rate: String,
    /// Files in the sink's `dir` under their own names with the size and
    /// SHA-256 they were sent with (hashed by the bench), each named once
    /// in a complete `file` audit line.
    pub files_verified: u64,
    /// `file` audit lines with `complete: false`.
    pub files_incomplete: u64,
    /// Every file verified.
    pub complete: bool,
    /// From the sender's start (the files already in its `dir`) to the
    /// moment the last file was seen in place.
    pub seconds: f64,
    /// Bytes of all files / seconds (MB = 10^6 bytes); `null` unless complete.
    pub mb_per_s: Option<f64>,
    /// `null` unless complete.
    pub files_per_s: Option<f64>,
    pub sender_cpu_s: f64,
    pub receiver_cpu_s: f64,
    #[serde(flatten)]
    pub rss: PeakRss,
    #[serde(flatten)]
    pub gaps: AuditGaps,
}

/// Everything `make bench` measures: `bench.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    pub machine: Machine,
    pub params: Params,
    pub udp_ceiling: UdpCeiling,
    /// Median of the runs by goodput; disk, authenticated.
    pub bulk: Bulk,
    pub bulk_runs: Vec<Bulk>,
    pub small_records_file: SmallRecords,
    pub small_records_tcp: SmallRecords,
    pub latency: Latency,
    pub lagging_sink: LaggingSink,
    /// The highest peak RSS of each side over every run above.
    pub peak_rss_max: PeakRss,
    pub rss_bound_mib: f64,
    /// Both maxima at or under `rss_bound_mib`.
    pub rss_within_bound: bool,
    pub comparisons: Option<Comparisons>,
    /// The groups this run measured ([`GROUPS`]); absent (schema 1) or
    /// empty: `core` alone, which was all there was.
    #[serde(default)]
    pub groups: Vec<String>,
    /// `mqtt-qos0`, `mqtt-qos1` (group `mqtt`).
    #[serde(default)]
    pub mqtt: Vec<EndToEnd>,
    /// One per service sink run, skipped ones included.
    #[serde(default)]
    pub services: Vec<EndToEnd>,
    /// Group `files`.
    #[serde(default)]
    pub files_large: Option<FilesRun>,
    #[serde(default)]
    pub files_small: Option<FilesRun>,
}

impl Report {
    /// Whether `group` ran (a report without `groups` ran `core` only).
    pub fn ran(&self, group: &str) -> bool {
        if self.groups.is_empty() {
            group == "core"
        } else {
            self.groups.iter().any(|g| g == group)
        }
    }

    /// Records `rss` in the running maximum and the bound check.
    pub fn note_rss(&mut self, rss: PeakRss) {
        let m = &mut self.peak_rss_max;
        m.sender_peak_rss_mib = m.sender_peak_rss_mib.max(rss.sender_peak_rss_mib);
        m.receiver_peak_rss_mib = m.receiver_peak_rss_mib.max(rss.receiver_peak_rss_mib);
        self.rss_within_bound = m.sender_peak_rss_mib <= self.rss_bound_mib
            && m.receiver_peak_rss_mib <= self.rss_bound_mib;
    }

    /// The one table: markdown, a row per metric, its unit in a column.
    pub fn markdown_table(&self) -> String {
        let mut rows: Vec<(String, String, &str)> = Vec::new();
        if self.ran("core") {
            rows.extend(self.core_rows());
        }
        for e in self.mqtt.iter().chain(&self.services) {
            rows.extend(end_to_end_rows(e));
        }
        for (f, large) in [(&self.files_large, true), (&self.files_small, false)] {
            if let Some(f) = f {
                rows.extend(files_rows(f, large));
            }
        }
        rows.push((
            "peak RSS over all runs, sender / receiver".into(),
            format!(
                "{:.0} / {:.0}",
                self.peak_rss_max.sender_peak_rss_mib, self.peak_rss_max.receiver_peak_rss_mib
            ),
            "MiB",
        ));
        rows.push((
            format!("peak RSS ≤ {:.0} MiB in every run", self.rss_bound_mib),
            if self.rss_within_bound { "yes" } else { "NO" }.into(),
            "",
        ));
        let mut out = String::from("| metric | value | unit |\n|---|---:|---|\n");
        for (metric, value, unit) in rows {
            out.push_str(&format!("| {metric} | {value} | {unit} |\n"));
        }
        out
    }

    /// Issue 9's rows (group `core`).
    fn core_rows(&self) -> Vec<(String, String, &'static str)> {
        let (b, f, t, l, g) = (
            &self.bulk,
            &self.small_records_file,
            &self.small_records_tcp,
            &self.latency,
            &self.lagging_sink,
        );
        let mib = |v: u64| format!("{:.0}", v as f64 / f64::from(1u32 << 20));
        let causes = |g: &AuditGaps| {
            let list: Vec<String> = g
                .gap_records_by_cause
                .iter()
                .map(|(cause, n)| format!("{cause} {n}"))
                .collect();
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        };
        vec![
            (
                format!(
                    "raw UDP ceiling, GSO/GRO (best <0.5% loss, {})",
                    self.udp_ceiling.gso_rate
                ),
                num(self.udp_ceiling.gso_mb_s, 0),
                "MB/s",
            ),
            (
                "raw UDP, one datagram per syscall".into(),
                num(self.udp_ceiling.plain_mb_s, 0),
                "MB/s",
            ),
            (
                format!(
                    "bulk goodput ({} MiB, median of {})",
                    mib(self.params.bulk_bytes),
                    self.params.runs
                ),
                num(b.goodput_mb_s, 0),
                "MB/s",
            ),
            (
                "bulk goodput / GSO ceiling".into(),
                num(b.goodput_per_gso_ceiling, 3),
                "ratio",
            ),
            (
                "bulk goodput / one-datagram-per-syscall ceiling".into(),
                num(b.goodput_per_plain_ceiling, 2),
                "ratio",
            ),
            (
                "bulk CPU, sender".into(),
                num(b.sender_cpu_s_per_gb, 2),
                "s/GB",
            ),
            (
                "bulk CPU, receiver".into(),
                num(b.receiver_cpu_s_per_gb, 2),
                "s/GB",
            ),
            (
                "bulk peak RSS, sender".into(),
                num(b.rss.sender_peak_rss_mib, 0),
                "MiB",
            ),
            (
                "bulk peak RSS, receiver".into(),
                num(b.rss.receiver_peak_rss_mib, 0),
                "MiB",
            ),
            (
                "bulk gaps (records)".into(),
                format!("{} ({})", b.gaps.gaps, b.gaps.gap_records),
                "gaps",
            ),
            (
                "small records → file sink".into(),
                num(f.records_per_s, 0),
                "records/s",
            ),
            (
                "small records → file sink, delivered / sent, gaps".into(),
                format!(
                    "{} / {}, {}",
                    f.records_delivered, f.records_sent, f.gaps.gaps
                ),
                "records",
            ),
            (
                "small records → tcp sink".into(),
                num(t.records_per_s, 0),
                "records/s",
            ),
            (
                "small records → tcp sink, delivered / sent, gaps".into(),
                format!(
                    "{} / {}, {}",
                    t.records_delivered, t.records_sent, t.gaps.gaps
                ),
                "records",
            ),
            (
                format!("latency p50 ({:.0} points/s, tcp sink)", l.rate),
                num(l.summary.p50_ms, 1),
                "ms",
            ),
            ("latency p99".into(), num(l.summary.p99_ms, 1), "ms"),
            ("latency max".into(), num(l.summary.max_ms, 1), "ms"),
            (
                "latency run: longest fsync, spool / journal".into(),
                format!(
                    "{} / {}",
                    num(l.spool_fsync_max_ms.unwrap_or(f64::NAN), 1),
                    num(l.journal_fsync_max_ms.unwrap_or(f64::NAN), 1)
                ),
                "ms",
            ),
            (
                "latency samples, gaps".into(),
                format!("{}, {}", l.summary.samples, l.gaps.gaps),
                "records",
            ),
            (
                format!(
                    "lagging sink: receiver peak RSS (journal {} MiB{})",
                    mib(g.journal_max_bytes),
                    if g.journal_filled {
                        ", filled"
                    } else {
                        ", NOT filled"
                    }
                ),
                num(g.rss.receiver_peak_rss_mib, 0),
                "MiB",
            ),
            (
                "lagging sink: gap records by cause".into(),
                causes(&g.gaps),
                "records",
            ),
        ]
    }
}

/// A figure with `digits` decimals; "n/a" when it is not a number (a
/// ratio to a ceiling that was not measured).
fn num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "n/a".to_string()
    }
}

/// The rate of a row, or why there is none.
fn rate_cell(status: &str, complete: bool, rate: Option<f64>) -> String {
    match rate {
        _ if status != MEASURED => status.to_string(),
        Some(r) if complete => num(r, 0),
        _ => "n/a (not all arrived, see next row)".to_string(),
    }
}

fn end_to_end_rows(e: &EndToEnd) -> Vec<(String, String, &'static str)> {
    let (label, unit) = match e.target.as_str() {
        "mqtt-qos0" => ("MQTT QoS 0 end to end".to_string(), "messages/s"),
        "mqtt-qos1" => ("MQTT QoS 1 end to end".to_string(), "messages/s"),
        t => (format!("records → {t}"), "records/s"),
    };
    let mut rows = vec![(
        format!("{label} ({})", e.what),
        rate_cell(&e.status, e.complete, e.records_per_s),
        unit,
    )];
    if e.status == MEASURED {
        rows.push((
            format!("{label}: there once / sent, duplicates, out of order, gaps"),
            format!(
                "{} / {}, {}, {}, {}",
                e.records_delivered,
                e.records_sent,
                e.duplicates + e.out_of_range,
                e.out_of_order,
                e.gaps.gaps
            ),
            "records",
        ));
    }
    rows
}

fn files_rows(f: &FilesRun, large: bool) -> Vec<(String, String, &'static str)> {
    let (label, value, unit) = if large {
        (
            format!(
                "files: one {:.0} MiB file, files source → files sink (link {})",
                f.bytes_per_file as f64 / f64::from(1u32 << 20),
                f.link_rate
            ),
            rate_cell(&f.status, f.complete, f.mb_per_s),
            "MB/s",
        )
    } else {
        (
            format!(
                "files: {} files of {} bytes, files source → files sink (link {})",
                f.files_sent, f.bytes_per_file, f.link_rate
            ),
            rate_cell(&f.status, f.complete, f.files_per_s),
            "files/s",
        )
    };
    let mut rows = vec![(label, value, unit)];
    if f.status == MEASURED {
        rows.push((
            format!(
                "files ({}): verified in place / sent, incomplete, gaps",
                if large { "large" } else { "small" }
            ),
            format!(
                "{} / {}, {}, {}",
                f.files_verified, f.files_sent, f.files_incomplete, f.gaps.gaps
            ),
            "files",
        ));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&v, 0.0), None);
    }

    #[test]
    fn latency_summary_sorts_and_skips_non_finite_samples() {
        let s = LatencySummary::of(vec![5.0, 1.0, f64::NAN, 3.0, 2.0, 4.0]);
        assert_eq!(s.samples, 5);
        assert_eq!(s.p50_ms, 3.0);
        assert_eq!(s.p99_ms, 5.0);
        assert_eq!(s.max_ms, 5.0);
        assert_eq!(LatencySummary::of(Vec::new()), LatencySummary::default());
    }

    #[test]
    fn sink_timestamps_parse_to_unix_nanoseconds() {
        assert_eq!(
            unix_ns_of_rfc3339("1970-01-01T00:00:01.000000002Z").unwrap(),
            1_000_000_002
        );
        assert_eq!(
            unix_ns_of_rfc3339("2026-11-30T00:25:12.123456789Z").unwrap(),
            1_795_998_312_123_456_789
        );
        assert_eq!(unix_ns_of_rfc3339("1970-01-01T01:00:00+01:00").unwrap(), 0);
        assert!(unix_ns_of_rfc3339("yesterday").is_err());
        let line = br#"{"stream":"gen","seq":3,"kind":"point","ts":"1970-01-01T00:00:00.5Z","tag":"gen/tag-00001","value":1.0,"quality":0}"#;
        assert_eq!(record_ts_ns(line).unwrap(), 500_000_000);
        assert!(record_ts_ns(br#"{"seq":3}"#).is_err());
        assert!(record_ts_ns(b"not json").is_err());
    }

    #[test]
    fn lines_split_across_pieces_come_out_whole_and_overlong_ones_are_dropped() {
        let mut s = LineSplitter::new(8);
        let mut got = Vec::new();
        for piece in [&b"ab"[..], b"c\nde", b"f\n\nxy", b"z\n"] {
            s.feed(piece, |l| got.push(String::from_utf8_lossy(l).into_owned()));
        }
        assert_eq!(got, ["abc", "def", "", "xyz"]);
        assert_eq!((s.lines, s.overlong), (4, 0));
        got.clear();
        s.feed(b"0123456", |l| {
            got.push(String::from_utf8_lossy(l).into_owned())
        });
        s.feed(b"789abc", |l| {
            got.push(String::from_utf8_lossy(l).into_owned())
        });
        s.feed(b"def\nok\n", |l| {
            got.push(String::from_utf8_lossy(l).into_owned())
        });
        assert_eq!(got, ["ok"]);
        assert_eq!((s.lines, s.overlong), (6, 1));
    }

    #[test]
    fn audit_gaps_count_events_and_inclusive_record_ranges() {
        let log = concat!(
            r#"{"event":"start","at":"t","prev":"0"}"#,
            "\n",
            r#"{"event":"gap","stream":"a","from":10,"to":14,"cause":"link-loss","at":"t","prev":"1"}"#,
            "\n",
            r#"{"event":"gap","stream":"a","from":20,"to":20,"cause":"sink-overflow:x","at":"t","prev":"2"}"#,
            "\n",
            r#"{"event":"recovered","stream":"a","from":10,"to":14,"at":"t","prev":"3"}"#,
            "\n"
        );
        let gaps = count_audit_gaps(log).unwrap();
        assert_eq!((gaps.gaps, gaps.gap_records), (2, 6));
        assert_eq!(
            gaps.gap_records_by_cause,
            BTreeMap::from([("link-loss".into(), 5), ("sink-overflow:x".into(), 1)])
        );
        assert_eq!(count_audit_gaps("").unwrap(), AuditGaps::default());
        let err = count_audit_gaps("{\"event\":\"gap\",\"from\":1}\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
        assert!(count_audit_gaps("{torn").is_err());
    }

    #[test]
    fn bench_json_keeps_its_documented_key_names() {
        let mut r = Report {
            schema: SCHEMA,
            rss_bound_mib: RSS_BOUND_MIB,
            ..Report::default()
        };
        r.note_rss(PeakRss {
            sender_peak_rss_mib: 40.0,
            receiver_peak_rss_mib: 90.0,
        });
        assert!(r.rss_within_bound);
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "schema",
            "machine",
            "params",
            "udp_ceiling",
            "bulk",
            "bulk_runs",
            "small_records_file",
            "small_records_tcp",
            "latency",
            "lagging_sink",
            "peak_rss_max",
            "rss_bound_mib",
            "rss_within_bound",
            "comparisons",
        ] {
            assert!(v.get(key).is_some(), "missing top-level key {key}");
        }
        for key in [
            "goodput_mb_s",
            "goodput_per_gso_ceiling",
            "goodput_per_plain_ceiling",
            "sender_cpu_s_per_gb",
            "receiver_cpu_s_per_gb",
            "sender_peak_rss_mib",
            "receiver_peak_rss_mib",
            "gaps",
            "gap_records",
        ] {
            assert!(v["bulk"].get(key).is_some(), "missing bulk.{key}");
        }
        for key in [
            "p50_ms",
            "p99_ms",
            "max_ms",
            "samples",
            "spool_fsync_max_ms",
            "journal_fsync_max_ms",
        ] {
            assert!(v["latency"].get(key).is_some(), "missing latency.{key}");
        }
        for key in ["commit", "date", "cpu_model", "nproc"] {
            assert!(v["machine"].get(key).is_some(), "missing machine.{key}");
        }
        assert!(v["small_records_tcp"].get("records_per_s").is_some());
        assert!(v["lagging_sink"].get("receiver_peak_rss_mib").is_some());
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        r.note_rss(PeakRss {
            sender_peak_rss_mib: 10.0,
            receiver_peak_rss_mib: 300.0,
        });
        assert!(!r.rss_within_bound);
        assert_eq!(r.peak_rss_max.sender_peak_rss_mib, 40.0);
    }

    #[test]
    fn the_table_has_one_row_per_metric_with_units() {
        let r = Report::default();
        let table = r.markdown_table();
        for needle in [
            "raw UDP ceiling",
            "bulk goodput",
            "bulk CPU, sender",
            "bulk peak RSS, receiver",
            "small records → file sink",
            "small records → tcp sink",
            "latency p99",
            "lagging sink: receiver peak RSS",
            "| MB/s |",
            "| s/GB |",
            "| ms |",
            "| records/s |",
        ] {
            assert!(table.contains(needle), "table lacks {needle:?}:\n{table}");
        }
        assert!(table
            .lines()
            .all(|l| l.starts_with('|') && l.ends_with('|')));
    }

    #[test]
    fn groups_are_all_by_default_and_only_and_skip_select_them() {
        assert_eq!(select_groups(None, None).unwrap(), GROUPS);
        assert_eq!(
            select_groups(Some("services,files"), None).unwrap(),
            ["postgres", "nats", "kafka", "http", "files"]
        );
        assert_eq!(
            select_groups(None, Some("services")).unwrap(),
            ["core", "mqtt", "files"]
        );
        assert_eq!(
            select_groups(Some("core,kafka"), Some("kafka")).unwrap(),
            ["core"]
        );
        let err = select_groups(Some("bulk"), None).unwrap_err().to_string();
        assert!(err.contains("`bulk` is not a group"), "{err}");
        assert!(select_groups(Some("files"), Some("files")).is_err());
        assert!(select_groups(Some(","), None).is_err());
    }

    #[test]
    fn a_tally_is_complete_only_with_every_number_once() {
        let mut t = SeqTally::new(4);
        for s in [0, 1, 2] {
            t.note(s);
        }
        assert!(!t.complete());
        assert_eq!(t.first_missing(5), [3]);
        t.note(3);
        assert!(t.complete());
        assert_eq!((t.distinct, t.out_of_order), (4, 0));
        t.note(2);
        assert!(!t.complete(), "a duplicate spoils it");
        assert_eq!((t.duplicates, t.out_of_order), (1, 1));
        let mut t = SeqTally::new(2);
        t.note(0);
        t.note(1);
        t.note(7);
        assert_eq!(t.out_of_range, 1);
        assert!(!t.complete(), "a number that was never sent spoils it");
        // Order is per lane: lane 1 going back is counted, lane 0 is not
        // affected by it.
        let mut t = SeqTally::new(4);
        t.note_in(0, 0);
        t.note_in(1, 3);
        t.note_in(0, 2);
        t.note_in(1, 1);
        assert_eq!((t.out_of_order, t.distinct), (1, 4));
        assert!(t.complete());
    }

    #[test]
    fn a_row_that_did_not_get_everything_or_did_not_run_shows_no_rate() {
        let mut r = Report {
            groups: vec!["mqtt".into(), "kafka".into(), "files".into()],
            ..Report::default()
        };
        r.mqtt.push(EndToEnd {
            target: "mqtt-qos1".into(),
            status: MEASURED.into(),
            what: "10 messages".into(),
            records_sent: 10,
            records_delivered: 9,
            records_per_s: Some(1234.0),
            ..EndToEnd::default()
        });
        r.services.push(EndToEnd {
            target: "kafka".into(),
            status: "skipped: nothing on 127.0.0.1:9092".into(),
            ..EndToEnd::default()
        });
        r.files_small = Some(FilesRun {
            status: MEASURED.into(),
            files_sent: 3,
            files_verified: 3,
            complete: true,
            files_per_s: Some(42.0),
            ..FilesRun::default()
        });
        let table = r.markdown_table();
        assert!(
            !table.contains("bulk goodput"),
            "core did not run:\n{table}"
        );
        assert!(!table.contains("1234"), "{table}");
        assert!(table.contains("n/a (not all arrived"), "{table}");
        assert!(table.contains("| 9 / 10, 0, 0, 0 |"), "{table}");
        assert!(
            table.contains("| skipped: nothing on 127.0.0.1:9092 | records/s |"),
            "{table}"
        );
        assert!(table.contains("| 42 | files/s |"), "{table}");
        assert!(table.contains("| 3 / 3, 0, 0 | files |"), "{table}");
        let old: Report = serde_json::from_str(
            &serde_json::to_string(&Report::default())
                .unwrap()
                .replace(",\"groups\":[]", ""),
        )
        .unwrap();
        assert!(
            old.ran("core") && !old.ran("mqtt"),
            "a schema 1 file ran core"
        );
    }

    #[test]
    fn a_latency_row_without_fsync_times_reads_back_as_unknown() {
        let mut v = serde_json::to_value(Latency::default()).unwrap();
        let row = v.as_object_mut().unwrap();
        row.remove("spool_fsync_max_ms");
        row.remove("journal_fsync_max_ms");
        let earlier: Latency = serde_json::from_value(v).unwrap();
        assert_eq!(earlier.spool_fsync_max_ms, None);
        assert_eq!(earlier.journal_fsync_max_ms, None);
        let measured = Latency {
            spool_fsync_max_ms: Some(4.4),
            ..Latency::default()
        };
        let back: Latency =
            serde_json::from_value(serde_json::to_value(&measured).unwrap()).unwrap();
        assert_eq!(back, measured);
    }
}
