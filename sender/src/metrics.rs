//! The sender's counters: every record taken, dropped or sent is counted
//! here, published in heartbeats, in the metrics file and in status lines.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        #[derive(Debug, Default)]
        pub struct Counters {
            $(#[doc = $doc] pub $name: AtomicU64,)*
            /// What each source is doing (the metrics file's `sources`).
            pub sources: SourceBoard,
        }

        impl Counters {
            pub fn snapshot(&self) -> Vec<(String, u64)> {
                vec![$((stringify!($name).to_string(), self.$name.load(Ordering::Relaxed)),)*]
            }

            /// Each counter's name, doc and value, for the Prometheus text.
            pub fn described(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), $doc, self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    records_in: "records handed over by sources and written to the spool",
    bytes_in: "payload bytes handed over by sources",
    spool_dropped_records: "records deleted unsent with the oldest spool segment (spool.max_bytes or max_age); announced as gaps",
    spool_bytes: "bytes the spool holds (sent and unsent)",
    spool_fsyncs: "spool fsyncs (group commits: each covers every record appended before it started, and saves state)",
    spool_fsync_max_us: "the longest spool fsync (segments and state file) since start, in microseconds",
    spool_slow_fsyncs: "spool fsyncs that took weir_store::SLOW_FSYNC (100 ms) or more; logged, at most one warning a minute",
    spool_damaged_records: "records lost with a damaged spool tail after a crash; announced as gaps",
    spool_corrupt_records: "records in corrupt stretches in the middle of spool segments (or that did not decode); skipped and announced as sender-spool-corrupt gaps",
    gap_notices_sent: "dropped ranges announced to the receiver",
    resent_records: "records sent again on an operator's resend request",
    repeated_records: "extra copies sent for streams with `repeat`",
    repeat_skipped: "copies not sent because REPEAT_LIMIT bytes of copies were already waiting",
    source_connections: "connections accepted by tcp sources, and broker or device connections made by mqtt, modbus and opcua sources",
    source_accept_errors: "failed accepts of tcp sources; each is retried after a backoff",
    source_peer_errors: "source connections that ended with an error (reset, timeout) instead of a clean close",
    mqtt_messages: "messages received by mqtt sources",
    mqtt_redelivered: "messages an mqtt broker delivered again (DUP flag: after a lost connection, before our acknowledgement reached it); they may be spooled twice",
    mqtt_points: "points made by mqtt sources (json mapping, sparkplug metrics)",
    mqtt_unmapped: "mqtt payloads that did not fit the source's json mapping; carried as messages",
    mqtt_sparkplug_invalid: "messages on spBv1.0 topics that are not valid Sparkplug B (topic or protobuf); carried as messages",
    mqtt_sparkplug_unknown_alias: "sparkplug metrics whose alias no remembered birth defines; their payload is carried as a message",
    mqtt_sparkplug_unsupported: "sparkplug metrics with no point form (null, dataset, template, array); their payload is carried as a message",
    mqtt_connection_errors: "mqtt broker connections lost or refused; each is retried after a backoff",
    mqtt_subscribe_refused: "topic filters an mqtt broker refused to subscribe",
    modbus_requests: "read requests sent by modbus sources",
    modbus_timeouts: "modbus reads not answered within the source's timeout; their points are bad and the connection is made again",
    modbus_exceptions: "modbus reads a device answered with an exception; their points are bad, with the exception code",
    modbus_malformed: "modbus answers that were malformed (wrong length, unknown or mismatched function code or header); their points are bad and the connection is made again",
    modbus_connection_errors: "modbus connections that failed or were lost; retried with a backoff",
    modbus_bad_points: "bad-quality points made by modbus sources (exception, timeout, malformed answer, device unreachable)",
    opcua_data_changes: "data changes (values with their status) received by opcua sources, each made a point",
    opcua_connection_errors: "opcua connections lost or attempts that failed; retried with a backoff, the subscription carried over",
    opcua_bad_points: "bad-quality points made by opcua sources (bad status code from the server, communication-lost, item refused, overflow)",
    opcua_dropped_changes: "data changes opcua sources dropped because their 16 MiB hand-off queue was full; each tag that lost some gets a bad point with status `overflow`",
    metrics_write_errors: "failed writes of the metrics file (retried every second)",
    records_sent: "records packed into blocks",
    datagrams_sent: "UDP datagrams sent on the link",
    wire_bytes_sent: "UDP payload bytes sent on the link",
    send_errors: "sends the kernel refused; their datagrams are lost and show up as repairs or gaps",
    blocks_sent: "FEC blocks sealed",
    parity_frames: "parity shards sent",
    pacer_waits: "times the pacer held back a batch to keep to the link rate",
    data_frames: "data shards sent",
    data_bytes: "shard payload bytes of the data shards sent (no frame overhead)",
    parity_bytes: "shard payload bytes of the parity shards sent, spare parity included; parity_bytes / data_bytes is the parity overhead",
    spare_parity_blocks: "blocks given parity beyond fec.parity_shards from the link's measured idle capacity",
    spare_parity_frames: "parity shards sent beyond the configured (and warm-up) parity, paid for by idle capacity",
    spare_parity_dropped: "spare parity shards computed but not sent because the link got busy first",
    warmup_blocks: "blocks sent with fec.warmup_parity after the link was idle",
    max_spread_us: "widest spread in time given to one block's shards since start, in microseconds (at most fec.max_spread_ms)",
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Parity bytes per 100 data bytes sent so far (spare parity included),
    /// to one decimal; None before the first data shard.
    pub fn parity_overhead_pct(&self) -> Option<f64> {
        let data = self.data_bytes.load(Ordering::Relaxed);
        let parity = self.parity_bytes.load(Ordering::Relaxed);
        (data > 0).then(|| (parity as f64 * 1000.0 / data as f64).round() / 10.0)
    }

    /// Writes a JSON object of all counters atomically (temp file + rename).
    pub fn write_file(
        &self,
        path: &Path,
        extra: &[(&str, serde_json::Value)],
    ) -> std::io::Result<()> {
        let mut map = serde_json::Map::new();
        for (k, v) in self.snapshot() {
            map.insert(k, v.into());
        }
        if let Some(pct) = self.parity_overhead_pct() {
            map.insert("parity_overhead_pct".to_string(), pct.into());
        }
        map.insert("sources".to_string(), self.sources.to_json());
        for (k, v) in extra {
            map.insert((*k).to_string(), v.clone());
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&map).expect("json"))?;
        std::fs::rename(tmp, path)
    }
}

/// The state of one source, as the metrics file shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    /// `running`, `listening`, `connected`, `retrying` (waiting out a
    /// backoff after an error) or `finished`.
    pub state: &'static str,
    pub connections: u64,
    /// Connections that ended with an error.
    pub peer_errors: u64,
    /// Accepts that failed (each retried after a backoff).
    pub accept_errors: u64,
    /// The last error, until the next success.
    pub last_error: Option<String>,
    /// Counts particular to a source type (a syslog source's
    /// `parse_errors`, a udp source's `datagrams`), by name.
    #[serde(flatten)]
    pub counts: BTreeMap<&'static str, u64>,
}

/// Every source's status, by stream name.
#[derive(Debug, Default)]
pub struct SourceBoard(Mutex<BTreeMap<String, SourceStatus>>);

impl SourceBoard {
    pub fn update(&self, source: &str, f: impl FnOnce(&mut SourceStatus)) {
        let mut board = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match board.get_mut(source) {
            Some(s) => f(s),
            None => f(board.entry(source.to_string()).or_default()),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let board = self.0.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::to_value(&*board).unwrap_or_default()
    }
}

/// What `[metrics] listen` serves: the counters above, read at scrape time.
#[derive(Debug)]
pub struct Prometheus {
    pub counters: std::sync::Arc<Counters>,
    pub session: u64,
    pub config_hash: String,
    pub started: std::time::Instant,
}

/// The Prometheus name of a counter (without `weir_` and `_total`), and
/// whether it is a gauge: units last, as Prometheus names them.
fn prometheus_name(field: &str) -> (String, bool) {
    let name = match field {
        "bytes_in" => "in_bytes",
        "wire_bytes_sent" => "wire_sent_bytes",
        "data_bytes" => "data_shard_bytes",
        "parity_bytes" => "parity_shard_bytes",
        "datagrams_sent" => "frames_sent",
        "spool_bytes" => return ("sender_spool_bytes".into(), true),
        other => other,
    };
    (format!("sender_{name}"), false)
}

impl prometheus_client::collector::Collector for Prometheus {
    fn encode(&self, enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let mut out = weir_ops::metrics::Out::new(enc);
        out.build_info("sender", env!("CARGO_PKG_VERSION"))?;
        for (field, doc, v) in self.counters.described() {
            match field {
                // Peaks in microseconds: gauges in seconds.
                "max_spread_us" => out.gauge(
                    "sender_max_spread_seconds",
                    "widest spread in time given to one block's shards since start (at most fec.max_spread_ms)",
                    v as f64 / 1e6,
                )?,
                "spool_fsync_max_us" => out.gauge(
                    "sender_spool_fsync_max_seconds",
                    "the longest spool fsync (segments and state file) since start",
                    v as f64 / 1e6,
                )?,
                _ => match prometheus_name(field) {
                    (name, true) => out.gauge(&name, doc, v as f64)?,
                    (name, false) => out.counter(&name, doc, v)?,
                },
            }
        }
        let info: weir_ops::metrics::Labels = vec![
            ("config_hash", self.config_hash.clone()),
            ("session", format!("{:016x}", self.session)),
        ];
        out.gauges(
            "sender_config",
            "the running configuration's SHA-256 (as in every heartbeat and `weir-sender check-config`) and session; always 1",
            &[(info, 1.0)],
        )?;
        out.gauge(
            "sender_uptime_seconds",
            "seconds since this sender started",
            self.started.elapsed().as_secs_f64(),
        )?;
        let board = self
            .counters
            .sources
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let state: Vec<_> = board
            .iter()
            .map(|(name, s)| {
                (
                    vec![("source", name.clone()), ("state", s.state.to_string())],
                    1.0,
                )
            })
            .collect();
        out.gauges(
            "sender_source_state",
            "what each source is doing (running, listening, connected, retrying, finished); 1 for the current state",
            &state,
        )?;
        let mut counts: BTreeMap<&'static str, Vec<(weir_ops::metrics::Labels, u64)>> =
            BTreeMap::new();
        for (name, s) in &board {
            for (k, v) in s.counts.iter() {
                counts
                    .entry(k)
                    .or_default()
                    .push((vec![("source", name.clone())], *v));
            }
        }
        for (k, samples) in counts {
            out.counters(
                &format!("sender_source_{k}"),
                "a count particular to the source type, per source (see docs/sources.md)",
                &samples,
            )?;
        }
        Ok(())
    }
}
