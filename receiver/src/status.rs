//! What the receiver shows about itself while it runs: the journal thread
//! copies its counters here at every tick (250 ms), and `[metrics] listen`
//! renders them as Prometheus text at scrape time. Sink counters and the
//! socket thread's are atomics read directly. Nothing is counted here.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use weir_ops::metrics::{Labels, Out};
use weir_protocol::decoder::REBUILT_BUCKETS;
use weir_protocol::DecoderStats;

use crate::delivery::SinkShared;
use crate::udp::RecvStats;

/// Per stream: records the decoder delivered since start, and the last
/// sequence number the journal holds.
#[derive(Debug, Clone, Default)]
pub struct StreamRow {
    pub records: u64,
    pub last_seq: Option<u64>,
}

/// The sender as its last heartbeat showed it.
#[derive(Debug, Clone, Default)]
pub struct SenderView {
    pub last_heartbeat: Option<Instant>,
    pub session: Option<u64>,
    pub config_hash: Option<String>,
    /// None without `[approval]`.
    pub approved: Option<bool>,
    pub counters: Vec<(String, u64)>,
    /// No heartbeat for `heartbeat.warn_after_ms` (the audit's heartbeat-lost).
    pub silent: bool,
}

/// Per sink: how far behind the journal it is.
#[derive(Debug, Clone, Default)]
pub struct SinkLag {
    pub entries: u64,
    pub seconds: f64,
}

/// The journal thread's view, as of its last tick.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub decoder: DecoderStats,
    pub streams: BTreeMap<String, StreamRow>,
    /// cause -> (gaps, records).
    pub gaps: BTreeMap<String, (u64, u64)>,
    pub journal_bytes: u64,
    pub journal_fsyncs: u64,
    /// The longest journal fsync job since start, in microseconds.
    pub journal_fsync_max_us: u64,
    /// Journal fsync jobs of `weir_store::SLOW_FSYNC` or more.
    pub journal_slow_fsyncs: u64,
    pub journal_corrupt_entries: u64,
    pub journal_compaction_errors: u64,
    pub audit_errors: u64,
    pub records_unrouted: u64,
    pub sender: SenderView,
    pub config_not_approved: u64,
    pub sink_lag: BTreeMap<String, SinkLag>,
    /// The stream catalogue as of the last tick, by stream name.
    pub catalogue: Vec<crate::catalogue::StreamEntry>,
    /// Records of streams the catalogue had no room for.
    pub not_catalogued: u64,
    /// Gaps a resend can still fill (link and sender gaps), at most
    /// [`OPEN_GAPS_SHOWN`], and how many there are in all.
    pub open_gaps: Vec<(String, u64, u64)>,
    pub open_gaps_total: u64,
}

/// Open gaps copied to the board for the page; the rest are counted.
pub const OPEN_GAPS_SHOWN: usize = 100;

/// Shared between the journal thread (writes at each tick) and the
/// management endpoint (reads at each scrape).
pub struct Board {
    pub snapshot: Mutex<Snapshot>,
    pub recv: Arc<RecvStats>,
    pub sinks: Vec<Arc<SinkShared>>,
    pub started: Instant,
    /// The last hour, for the status page's charts.
    pub history: Mutex<crate::history::History>,
}

impl std::fmt::Debug for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Board")
            .field("sinks", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

impl Board {
    pub fn new(recv: Arc<RecvStats>, sinks: Vec<Arc<SinkShared>>) -> Self {
        Board {
            snapshot: Mutex::new(Snapshot::default()),
            recv,
            sinks,
            started: Instant::now(),
            history: Mutex::new(crate::history::History::default()),
        }
    }

    /// Every sink's latencies merged per stream.
    pub fn latency(&self) -> BTreeMap<String, crate::catalogue::Latency> {
        let mut out: BTreeMap<String, crate::catalogue::Latency> = BTreeMap::new();
        for sink in &self.sinks {
            let book = sink.latency.lock().unwrap_or_else(|p| p.into_inner());
            for (stream, lat) in &book.streams {
                match out.get_mut(&**stream) {
                    Some(l) => l.merge(lat),
                    None => {
                        out.insert(stream.to_string(), lat.clone());
                    }
                }
            }
        }
        out
    }

    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.snapshot.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Unix time now in nanoseconds (0 before 1970, saturating far after).
pub fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The journal thread's tick for the catalogue and the page: moves the
/// catalogue's window on, copies it and the decoder's open gaps to the
/// board, and takes a history sample when one is due. `origin` is the
/// journal thread's monotonic origin.
pub fn publish_catalogue(
    board: &Board,
    catalogue: &mut crate::catalogue::Catalogue,
    open_gaps: crate::decode::OpenGaps,
    origin: Instant,
) {
    catalogue.tick(origin.elapsed().as_millis() as u64, unix_now_ns());
    let entries = catalogue.entries();
    let not_catalogued = catalogue.not_catalogued;
    let total = open_gaps.total;
    let mut gaps = open_gaps.shown;
    gaps.sort();
    board.update(|s| {
        s.catalogue = entries;
        s.not_catalogued = not_catalogued;
        s.open_gaps = gaps;
        s.open_gaps_total = total;
    });
    let totals = {
        let s = board.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let d = &s.decoder;
        crate::history::Totals {
            records: d.records,
            bytes: board.recv.bytes.load(Ordering::Relaxed),
            blocks_repaired: d.blocks_repaired,
            shards_rebuilt: d.shards_rebuilt,
            blocks_lost: d.blocks_lost + d.blocks_missing,
            gap_records: d.gap_records,
        }
    };
    let sink_errors: Vec<u64> = board
        .sinks
        .iter()
        .map(|x| x.stats.errors.load(Ordering::Relaxed))
        .collect();
    board
        .history
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .tick(Instant::now(), unix_now_ns(), totals, sink_errors);
}

/// The Prometheus collector over a [`Board`].
#[derive(Debug)]
pub struct Prometheus(pub Arc<Board>);

/// Decoder counters by what they are: rejected frames by reason (the
/// `rejected_` fields and the other frames dropped unread), the rest by
/// their own name.
fn rejected_reason(field: &str) -> Option<&str> {
    field.strip_prefix("rejected_")
}

impl prometheus_client::collector::Collector for Prometheus {
    fn encode(&self, enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let board = &self.0;
        let latency = board.latency();
        let s = board.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Out::new(enc);
        out.build_info("receiver", env!("CARGO_PKG_VERSION"))?;
        out.gauge(
            "receiver_uptime_seconds",
            "seconds since this receiver started",
            board.started.elapsed().as_secs_f64(),
        )?;
        let r = &board.recv;
        out.counter(
            "receiver_datagrams_received",
            "UDP datagrams received on the link",
            r.datagrams.load(Ordering::Relaxed),
        )?;
        out.counter(
            "receiver_received_bytes",
            "UDP payload bytes received on the link",
            r.bytes.load(Ordering::Relaxed),
        )?;
        out.counter(
            "receiver_recv_syscalls",
            "receive system calls (each takes a batch)",
            r.syscalls.load(Ordering::Relaxed),
        )?;
        out.counter(
            "receiver_recv_errors",
            "receive calls that failed (logged)",
            r.errors.load(Ordering::Relaxed),
        )?;
        let d = &s.decoder;
        out.counter(
            "receiver_frames_accepted",
            "data and parity shards that passed every check",
            d.shards_accepted,
        )?;
        out.counter(
            "receiver_control_frames",
            "control frames (heartbeats, stream announcements, gap notices) accepted",
            d.control_frames,
        )?;
        out.counter(
            "receiver_blocks_decoded",
            "FEC blocks decoded",
            d.blocks_decoded,
        )?;
        out.counter(
            "receiver_blocks_repaired",
            "FEC blocks that needed Reed-Solomon to rebuild lost data shards",
            d.blocks_repaired,
        )?;
        out.counter(
            "receiver_shards_rebuilt",
            "data shards rebuilt by Reed-Solomon",
            d.shards_rebuilt,
        )?;
        out.counter(
            "receiver_blocks_lost",
            "blocks given up with fewer than k shards (their records are gaps)",
            d.blocks_lost,
        )?;
        out.counter(
            "receiver_blocks_missing",
            "blocks given up with no shard seen (their records are gaps)",
            d.blocks_missing,
        )?;
        let rebuilt: Vec<(Labels, u64)> = REBUILT_BUCKETS
            .iter()
            .zip(d.rebuilt_per_block.iter())
            .map(|(b, n)| (vec![("rebuilt", b.to_string())], *n))
            .collect();
        out.counters(
            "receiver_blocks_by_rebuilt_shards",
            "decoded blocks by how many data shards Reed-Solomon rebuilt in each",
            &rebuilt,
        )?;
        out.gauge("receiver_parity_used_max_ratio", "the largest share of its parity shards one block used up (1: one more lost shard would have made a gap)", d.parity_used_max_pct as f64 / 100.0)?;
        let fields = d.fields();
        let rejected: Vec<(Labels, u64)> = fields
            .iter()
            .filter_map(|(k, v)| rejected_reason(k).map(|r| (vec![("reason", r.to_string())], *v)))
            .chain(
                [
                    ("stale", d.stale),
                    ("replayed", d.replayed),
                    ("inconsistent_shard", d.inconsistent_shards),
                    ("bad_control", d.bad_control),
                ]
                .into_iter()
                .map(|(r, v)| (vec![("reason", r.to_string())], v)),
            )
            .collect();
        out.counters("receiver_frames_rejected", "frames dropped before decoding, by reason (crc, bad_tag, unknown_key, ...; stale and replayed are mostly unneeded parity and link duplicates)", &rejected)?;
        out.counter(
            "receiver_records",
            "records decoded and journaled (all streams)",
            d.records,
        )?;
        out.counter(
            "receiver_duplicate_records",
            "records dropped as already delivered",
            d.duplicate_records,
        )?;
        out.counter(
            "receiver_records_unrouted",
            "records of streams no sink's `streams` matches (journaled, written nowhere)",
            s.records_unrouted,
        )?;
        let streams: Vec<(Labels, u64)> = s
            .streams
            .iter()
            .map(|(name, row)| (vec![("stream", name.clone())], row.records))
            .collect();
        out.counters(
            "receiver_stream_records",
            "records delivered per stream since this receiver started",
            &streams,
        )?;
        let last: Vec<(Labels, f64)> = s
            .streams
            .iter()
            .filter_map(|(name, row)| {
                row.last_seq
                    .map(|q| (vec![("stream", name.clone())], q as f64))
            })
            .collect();
        out.gauges(
            "receiver_stream_last_sequence",
            "the last sequence number journaled per stream",
            &last,
        )?;
        let gaps: Vec<(Labels, u64)> = s
            .gaps
            .iter()
            .map(|(c, (n, _))| (vec![("cause", c.clone())], *n))
            .collect();
        let gap_records: Vec<(Labels, u64)> = s
            .gaps
            .iter()
            .map(|(c, (_, n))| (vec![("cause", c.clone())], *n))
            .collect();
        out.counters("receiver_gaps", "gaps audited since start, by cause (sink-overflow gaps are per sink: see weir_receiver_sink_overflow_records_total)", &gaps)?;
        out.counters(
            "receiver_gap_records",
            "records named in gaps since start, by cause",
            &gap_records,
        )?;
        out.counter(
            "receiver_recovered_records",
            "records that filled an open gap (resend or a new session's spool)",
            d.resent_recovered + d.spool_recovered,
        )?;
        out.gauge(
            "receiver_journal_bytes",
            "bytes the journal holds",
            s.journal_bytes as f64,
        )?;
        out.counter(
            "receiver_journal_fsyncs",
            "journal fsyncs",
            s.journal_fsyncs,
        )?;
        out.gauge(
            "receiver_journal_fsync_max_seconds",
            "the longest journal fsync (segments and state file) since start",
            s.journal_fsync_max_us as f64 / 1e6,
        )?;
        out.counter(
            "receiver_journal_slow_fsyncs",
            &format!(
                "journal fsyncs that took {} ms or more (logged, at most one warning a minute)",
                weir_store::SLOW_FSYNC.as_millis()
            ),
            s.journal_slow_fsyncs,
        )?;
        out.counter(
            "receiver_journal_corrupt_entries",
            "journal entries skipped as corrupt (audited as journal-corrupt gaps)",
            s.journal_corrupt_entries,
        )?;
        out.counter(
            "receiver_journal_compaction_errors",
            "failed journal compactions (retried)",
            s.journal_compaction_errors,
        )?;
        out.counter(
            "receiver_audit_errors",
            "failed audit log writes (each an ERROR line carrying the event)",
            s.audit_errors,
        )?;
        let sinks = &board.sinks;
        let per_sink = |f: &dyn Fn(&SinkShared) -> u64| -> Vec<(Labels, u64)> {
            sinks
                .iter()
                .map(|x| (vec![("sink", x.name.clone())], f(x)))
                .collect()
        };
        out.counters(
            "receiver_sink_records",
            "records each sink wrote",
            &per_sink(&|x| x.stats.records.load(Ordering::Relaxed)),
        )?;
        out.counters(
            "receiver_sink_errors",
            "failed sink writes (each retried with backoff)",
            &per_sink(&|x| x.stats.errors.load(Ordering::Relaxed)),
        )?;
        out.counters(
            "receiver_sink_retries",
            "sink write retries",
            &per_sink(&|x| x.stats.retries.load(Ordering::Relaxed)),
        )?;
        out.counters(
            "receiver_sink_dead_letters",
            "records a sink refused for good (written to its dead-letter file)",
            &per_sink(&|x| x.stats.dead_letters.load(Ordering::Relaxed)),
        )?;
        out.counters("receiver_sink_overflow_records", "records dropped for a sink by journal.max_bytes while it was behind (audited as sink-overflow gaps)", &per_sink(&|x| x.overflow_records.load(Ordering::Relaxed)))?;
        out.counters(
            "receiver_sink_cursor_errors",
            "failed sink cursor saves (retried)",
            &per_sink(&|x| x.cursor_errors.load(Ordering::Relaxed)),
        )?;
        // Sinks' own counters, one family per key across the sinks that have it.
        type Family<'a> = (&'a str, Vec<(Labels, u64)>);
        let mut own: BTreeMap<&str, Family> = BTreeMap::new();
        for x in sinks {
            for c in &x.counters {
                own.entry(c.key).or_insert((c.help, Vec::new())).1.push((
                    vec![("sink", x.name.clone())],
                    c.value.load(Ordering::Relaxed),
                ));
            }
        }
        for (key, (help, samples)) in &own {
            out.counters(&format!("receiver_sink_{key}"), help, samples)?;
        }
        let lag_entries: Vec<(Labels, f64)> = s
            .sink_lag
            .iter()
            .map(|(n, l)| (vec![("sink", n.clone())], l.entries as f64))
            .collect();
        let lag_seconds: Vec<(Labels, f64)> = s
            .sink_lag
            .iter()
            .map(|(n, l)| (vec![("sink", n.clone())], l.seconds))
            .collect();
        out.gauges(
            "receiver_sink_lag_records",
            "journal entries (records and gap markers) durable but not yet confirmed by the sink",
            &lag_entries,
        )?;
        out.gauges("receiver_sink_lag_seconds", "how long the oldest entry the sink has not confirmed has been durable in the journal (0 when caught up; to the 250 ms tick)", &lag_seconds)?;
        encode_catalogue(&mut out, &s, &latency)?;
        let hb = &s.sender;
        if let Some(last) = hb.last_heartbeat {
            out.gauge(
                "receiver_heartbeat_age_seconds",
                "seconds since the sender's last heartbeat",
                last.elapsed().as_secs_f64(),
            )?;
        }
        out.counter(
            "receiver_heartbeats",
            "sender heartbeats received",
            d.heartbeats,
        )?;
        if let (Some(session), Some(hash)) = (hb.session, &hb.config_hash) {
            let labels: Labels = vec![
                ("config_hash", hash.clone()),
                ("session", format!("{session:016x}")),
            ];
            out.gauges(
                "receiver_sender_config",
                "the sender's configuration hash and session from its last heartbeat; always 1",
                &[(labels, 1.0)],
            )?;
        }
        if let Some(approved) = hb.approved {
            out.gauge("receiver_sender_config_approved", "1 if the sender's configuration hash is in [approval] hashes, 0 if not (see the config-not-approved audit line)", if approved { 1.0 } else { 0.0 })?;
        }
        out.counter("receiver_config_not_approved", "heartbeats that showed a new sender configuration hash not in [approval] hashes (each audited as config-not-approved)", s.config_not_approved)?;
        let sender: Vec<(Labels, f64)> = hb
            .counters
            .iter()
            .map(|(k, v)| (vec![("counter", k.clone())], *v as f64))
            .collect();
        out.gauges(
            "receiver_sender_status",
            "the sender's own counters as its last heartbeat carried them",
            &sender,
        )?;
        Ok(())
    }
}

/// The stream catalogue's families (docs/operations.md, "Stream catalogue").
fn encode_catalogue(
    out: &mut Out,
    s: &Snapshot,
    latency: &BTreeMap<String, crate::catalogue::Latency>,
) -> std::fmt::Result {
    use crate::catalogue::LATENCY_BOUNDS;
    let c = &s.catalogue;
    let by = |f: &dyn Fn(&crate::catalogue::StreamEntry) -> Option<f64>| -> Vec<(Labels, f64)> {
        c.iter()
            .filter_map(|e| f(e).map(|v| (vec![("stream", e.name.clone())], v)))
            .collect()
    };
    let info: Vec<(Labels, f64)> = c
        .iter()
        .map(|e| {
            (
                vec![
                    ("stream", e.name.clone()),
                    ("source_type", e.source_type.clone()),
                ],
                1.0,
            )
        })
        .collect();
    out.gauges(
        "receiver_stream_info",
        "each stream the receiver delivered, with the source type the sender announced for it; always 1",
        &info,
    )?;
    out.gauges(
        "receiver_stream_tags",
        "distinct point tags (or message topics) seen per stream; at most 65536 are counted per stream",
        &by(&|e| Some(e.tags as f64)),
    )?;
    out.gauges(
        "receiver_stream_rate_records_per_second",
        "records per second per stream over the last 10 seconds",
        &by(&|e| Some(e.rate)),
    )?;
    out.gauges(
        "receiver_stream_first_seen_timestamp_seconds",
        "Unix time this receiver first delivered a record of the stream (since it started)",
        &by(&|e| e.first_seen_ns.map(|t| t as f64 / 1e9)),
    )?;
    out.gauges(
        "receiver_stream_last_seen_timestamp_seconds",
        "Unix time this receiver last delivered a record of the stream",
        &by(&|e| e.last_seen_ns.map(|t| t as f64 / 1e9)),
    )?;
    let hist: Vec<weir_ops::metrics::Histogram> = latency
        .iter()
        .map(|(stream, l)| weir_ops::metrics::Histogram {
            labels: vec![("stream", stream.clone())],
            sum: l.sum,
            count: l.count,
            buckets: LATENCY_BOUNDS
                .iter()
                .copied()
                .chain([f64::MAX])
                .zip(l.buckets.iter().copied())
                .collect(),
        })
        .collect();
    out.histograms(
        "receiver_stream_latency_seconds",
        "seconds from a record's source timestamp to a sink's confirmation of it, per stream (one observation per record and sink that wrote it)",
        &hist,
    )?;
    let ahead: Vec<(Labels, u64)> = latency
        .iter()
        .map(|(stream, l)| (vec![("stream", stream.clone())], l.ahead))
        .collect();
    out.counters(
        "receiver_stream_latency_clock_ahead",
        "confirmed records whose source timestamp was later than the confirmation (the source clock is ahead; counted as 0 s latency)",
        &ahead,
    )?;
    out.counter(
        "receiver_streams_not_catalogued_records",
        "records of streams past the catalogue's bound (65536 streams), not shown in it",
        s.not_catalogued,
    )
}

/// One scrape of the running receiver: `name` -> [(labels, value)].
type Scrape = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

/// GET /metrics from the running receiver's management address.
fn fetch(listen: std::net::SocketAddr) -> anyhow::Result<Scrape> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&listen, std::time::Duration::from_secs(3))
        .map_err(|e| anyhow::anyhow!("metrics.listen: cannot reach the running receiver at {listen}: {e} (is `weir-receiver run` up with this configuration?)"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {listen}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(parse_scrape(body))
}

/// Parses Prometheus text samples (`name{k="v",...} value`).
fn parse_scrape(body: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            None => (head, BTreeMap::new()),
            Some((name, rest)) => {
                let mut labels = BTreeMap::new();
                let mut chars = rest.trim_end_matches('}').chars().peekable();
                loop {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    if key.is_empty() || chars.next() != Some('"') {
                        break;
                    }
                    let mut val = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '\\' => match chars.next() {
                                Some('n') => val.push('\n'),
                                Some(o) => val.push(o),
                                None => break,
                            },
                            '"' => break,
                            c => val.push(c),
                        }
                    }
                    labels.insert(key.trim_start_matches(',').to_string(), val);
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                (name, labels)
            }
        };
        out.entry(name.to_string())
            .or_default()
            .push((labels, value));
    }
    out
}

fn one(s: &Scrape, name: &str) -> Option<f64> {
    s.get(name).and_then(|v| v.first()).map(|(_, v)| *v)
}

fn by(s: &Scrape, name: &str, label: &str) -> BTreeMap<String, f64> {
    s.get(name)
        .map(|v| {
            v.iter()
                .filter_map(|(l, x)| l.get(label).map(|k| (k.clone(), *x)))
                .collect()
        })
        .unwrap_or_default()
}

/// `weir-receiver status --config FILE`: one screen about the running
/// receiver, from two scrapes of its `[metrics] listen` one second apart
/// (for rates) and its audit log (open gaps, the sender's session).
pub fn print_status(config: &std::path::Path) -> anyhow::Result<()> {
    let loaded = crate::config::load(config)?;
    let c = &loaded.config;
    let listen = c.metrics.listen.ok_or_else(|| {
        anyhow::anyhow!("metrics.listen: not set in {}; `status` reads the running receiver's management address: add [metrics] listen = \"127.0.0.1:PORT\" and restart it", config.display())
    })?;
    let a = fetch(listen)?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    let b = fetch(listen)?;
    let audit = std::fs::read_to_string(&c.audit.path).unwrap_or_default();
    let (open, _) = crate::gaps::scan(audit.as_bytes()).unwrap_or_default();
    let last_status = audit
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "sender-status");
    let mut o = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(
        o,
        "weir-receiver on {} (up {:.0} s), config {}",
        c.link.listen,
        one(&b, "weir_receiver_uptime_seconds").unwrap_or(0.0),
        config.display()
    );
    let warn = c.heartbeat.warn_after_ms as f64 / 1000.0;
    match one(&b, "weir_receiver_heartbeat_age_seconds") {
        None => {
            let _ = writeln!(o, "sender:  NO HEARTBEAT since start");
        }
        Some(age) => {
            let alive = if age < warn { "alive" } else { "SILENT" };
            let since = last_status
                .as_ref()
                .and_then(|v| v["at"].as_str())
                .unwrap_or("?");
            let _ = writeln!(
                o,
                "sender:  {alive}, last heartbeat {age:.1} s ago; session since {since}"
            );
        }
    }
    let cfg = b
        .get("weir_receiver_sender_config")
        .and_then(|v| v.first())
        .map(|(l, _)| l.clone());
    let verdict = match one(&b, "weir_receiver_sender_config_approved") {
        Some(x) if x >= 1.0 => "approved",
        Some(_) => "NOT APPROVED",
        None => "no [approval] list",
    };
    if let Some(l) = cfg {
        let _ = writeln!(
            o,
            "config:  {} ({verdict}), session {}",
            l.get("config_hash").map_or("?", |s| s),
            l.get("session").map_or("?", |s| s)
        );
    }
    let rejected: f64 = by(&b, "weir_receiver_frames_rejected_total", "reason")
        .iter()
        .filter(|(r, _)| !matches!(r.as_str(), "stale" | "replayed"))
        .map(|(_, v)| v)
        .sum();
    let _ = writeln!(
        o,
        "link:    {:.0} datagrams/s, blocks repaired {}, lost {}, rejected {}",
        one(&b, "weir_receiver_datagrams_received_total").unwrap_or(0.0)
            - one(&a, "weir_receiver_datagrams_received_total").unwrap_or(0.0),
        one(&b, "weir_receiver_blocks_repaired_total").unwrap_or(0.0),
        one(&b, "weir_receiver_blocks_lost_total").unwrap_or(0.0)
            + one(&b, "weir_receiver_blocks_missing_total").unwrap_or(0.0),
        rejected
    );
    let _ = writeln!(
        o,
        "\n{:<32} {:>14} {:>10} {:>10}",
        "stream", "last seq", "records/s", "open gaps"
    );
    let (ra, rb) = (
        by(&a, "weir_receiver_stream_records_total", "stream"),
        by(&b, "weir_receiver_stream_records_total", "stream"),
    );
    for (stream, last) in by(&b, "weir_receiver_stream_last_sequence", "stream") {
        let rate = rb.get(&stream).unwrap_or(&0.0) - ra.get(&stream).unwrap_or(&0.0);
        let gaps: u64 = open
            .iter()
            .filter(|g| g.stream == stream)
            .map(|g| g.to - g.from + 1)
            .sum();
        let _ = writeln!(
            o,
            "{stream:<32} {last:>14} {rate:>10.0} {:>10}",
            if gaps == 0 {
                "-".to_string()
            } else {
                format!("{gaps} rec")
            }
        );
    }
    let _ = write!(o, "{}", catalogue_screen(&b));
    let _ = writeln!(
        o,
        "\n{:<20} {:>10} {:>12} {:>10} {:>8} {:>12}",
        "sink", "records/s", "lag records", "lag s", "errors", "dead letters"
    );
    let (sa, sb) = (
        by(&a, "weir_receiver_sink_records_total", "sink"),
        by(&b, "weir_receiver_sink_records_total", "sink"),
    );
    let (lag, lag_s) = (
        by(&b, "weir_receiver_sink_lag_records", "sink"),
        by(&b, "weir_receiver_sink_lag_seconds", "sink"),
    );
    let (errors, dead) = (
        by(&b, "weir_receiver_sink_errors_total", "sink"),
        by(&b, "weir_receiver_sink_dead_letters_total", "sink"),
    );
    for (sink, n) in &sb {
        let _ = writeln!(
            o,
            "{sink:<20} {:>10.0} {:>12} {:>10.1} {:>8} {:>12}",
            n - sa.get(sink).unwrap_or(&0.0),
            lag.get(sink).unwrap_or(&0.0),
            lag_s.get(sink).unwrap_or(&0.0),
            errors.get(sink).unwrap_or(&0.0),
            dead.get(sink).unwrap_or(&0.0)
        );
    }
    if !open.is_empty() {
        let _ = writeln!(
            o,
            "\n{} open gaps (weir-receiver gaps --config {} lists them)",
            open.len(),
            config.display()
        );
    }
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), o.as_bytes());
    Ok(())
}

/// Per stream latency quantiles from a scrape's histogram buckets.
fn latency_quantiles(s: &Scrape, q: f64) -> BTreeMap<String, f64> {
    let mut per: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (labels, v) in s
        .get("weir_receiver_stream_latency_seconds_bucket")
        .into_iter()
        .flatten()
    {
        let (Some(stream), Some(le)) = (labels.get("stream"), labels.get("le")) else {
            continue;
        };
        let Ok(le) = le.parse::<f64>() else {
            continue;
        };
        per.entry(stream.clone()).or_default().push((le, *v));
    }
    per.into_iter()
        .filter_map(|(stream, mut cum)| {
            cum.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut prev = 0.0;
            let buckets: Vec<u64> = cum
                .iter()
                .map(|(_, c)| {
                    let n = (c - prev).max(0.0) as u64;
                    prev = *c;
                    n
                })
                .collect();
            // Only a histogram with this binary's buckets reads right.
            (buckets.len() == crate::catalogue::LATENCY_BOUNDS.len() + 1)
                .then(|| crate::catalogue::quantile(&buckets, q))
                .flatten()
                .map(|v| (stream, v))
        })
        .collect()
}

/// The stream catalogue block of `status`.
fn catalogue_screen(b: &Scrape) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let source: BTreeMap<String, String> = b
        .get("weir_receiver_stream_info")
        .into_iter()
        .flatten()
        .filter_map(|(l, _)| Some((l.get("stream")?.clone(), l.get("source_type")?.clone())))
        .collect();
    if source.is_empty() {
        return o;
    }
    let tags = by(b, "weir_receiver_stream_tags", "stream");
    let rate = by(b, "weir_receiver_stream_rate_records_per_second", "stream");
    let first = by(
        b,
        "weir_receiver_stream_first_seen_timestamp_seconds",
        "stream",
    );
    let last = by(
        b,
        "weir_receiver_stream_last_seen_timestamp_seconds",
        "stream",
    );
    let (p50, p99) = (latency_quantiles(b, 0.5), latency_quantiles(b, 0.99));
    let now = unix_now_ns() as f64 / 1e9;
    let _ = writeln!(
        o,
        "\n{:<32} {:<10} {:>7} {:>10} {:<20} {:>10} {:>9} {:>9}",
        "stream catalogue",
        "source",
        "tags",
        "records/s",
        "first seen (UTC)",
        "last seen",
        "p50",
        "p99"
    );
    let secs = |v: Option<&f64>| v.map_or_else(|| "-".to_string(), |s| format!("{s:.3} s"));
    for (stream, kind) in &source {
        let first_seen = first
            .get(stream)
            .and_then(|t| chrono::DateTime::from_timestamp(*t as i64, 0))
            .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string());
        let ago = last.get(stream).map_or_else(
            || "-".into(),
            |t| format!("{:.0} s ago", (now - t).max(0.0)),
        );
        let _ = writeln!(
            o,
            "{stream:<32} {kind:<10} {:>7} {:>10.1} {first_seen:<20} {ago:>10} {:>9} {:>9}",
            tags.get(stream).copied().unwrap_or(0.0),
            rate.get(stream).copied().unwrap_or(0.0),
            secs(p50.get(stream)),
            secs(p99.get(stream)),
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_latency_quantiles_from_the_scraped_histogram() {
        use crate::catalogue::{Latency, LATENCY_BOUNDS};
        let mut l = Latency::default();
        for _ in 0..99 {
            l.observe(0.004);
        }
        l.observe(30.0);
        let mut text = String::new();
        let mut cum = 0;
        for (i, n) in l.buckets.iter().enumerate() {
            cum += n;
            let le = LATENCY_BOUNDS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            text.push_str(&format!(
                "weir_receiver_stream_latency_seconds_bucket{{stream=\"s\",le=\"{le}\"}} {cum}\n"
            ));
        }
        let scrape = parse_scrape(&text);
        assert_eq!(
            latency_quantiles(&scrape, 0.5)["s"],
            l.quantile(0.5).unwrap()
        );
        assert_eq!(
            latency_quantiles(&scrape, 0.99)["s"],
            l.quantile(0.99).unwrap()
        );
        assert_eq!(
            latency_quantiles(&scrape, 1.0)["s"],
            l.quantile(1.0).unwrap()
        );
    }

    #[test]
    fn a_sinks_own_counters_are_rendered_per_sink_for_the_sinks_that_have_them() {
        let mut spb = SinkShared::new("spb", 0);
        spb.counters.push(crate::sinks::SinkCounter {
            key: "sparkplug_rebirths",
            help: "rebirths answered",
            value: Arc::new(std::sync::atomic::AtomicU64::new(3)),
        });
        let board = Board::new(
            Default::default(),
            vec![Arc::new(spb), Arc::new(SinkShared::new("file", 0))],
        );
        let mut registry = prometheus_client::registry::Registry::with_prefix("weir");
        registry.register_collector(Box::new(Prometheus(Arc::new(board))));
        let text = String::from_utf8(weir_ops::metrics::render(&registry)).unwrap();
        assert_eq!(
            by(
                &parse_scrape(&text),
                "weir_receiver_sink_sparkplug_rebirths_total",
                "sink"
            ),
            BTreeMap::from([("spb".to_string(), 3.0)])
        );
    }

    #[test]
    fn scrape_lines_with_labels_and_escapes_parse() {
        let s = parse_scrape(
            "# HELP x y\nweir_a_total 3\nweir_b{stream=\"pl\\\"ant/gen\",sink=\"f\"} 2.5\n# EOF\n",
        );
        assert_eq!(one(&s, "weir_a_total"), Some(3.0));
        assert_eq!(by(&s, "weir_b", "stream").get("pl\"ant/gen"), Some(&2.5));
        assert_eq!(by(&s, "weir_b", "sink").get("f"), Some(&2.5));
    }
}
