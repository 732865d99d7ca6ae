//! `weir-bench` (`make bench`): issue 9's one table, measured in one run on
//! this machine, printed as markdown and written to `<dir>/bench.json`. Not
//! a test: it reports figures and ratios and never passes or fails on time.
//!
//! Every weir run has its spool and journal on disk (`<dir>/store`),
//! frames authenticated (HMAC-SHA256, a key from `weir-sender keygen`),
//! MTU 1500 and RS 32+8 (`[fec] data_shards = 32, parity_shards = 8`):
//!
//! 1. Ceiling: `weir-udpblast pair` (1472-byte datagrams with GSO/GRO),
//!    unpaced and paced from high to low; the best rate losing under 0.5%
//!    is the ceiling; plus the one-datagram-per-syscall figure.
//! 2. Bulk: `weir-tcpfeed` → tcp source → weir-sender → UDP (loopback) →
//!    weir-receiver → tcp sink → `weir-tcpsink`, `--runs` times, median by
//!    goodput: goodput, CPU s/GB and peak RSS per side, gaps.
//! 3. Small records: a generator source (1000 tags, a fixed count) into a
//!    file sink (lines counted in its files) and into a tcp sink
//!    (`weir-tcpsink --expect-lines`): records/s from first to last record.
//! 4. Latency: the generator at 1000 points/s into a tcp sink, default
//!    spool and journal fsync settings; `weir-tcpsink --latency` takes each
//!    line's arrival minus its `ts`; p50, p99, max.
//! 5. Lagging sink: a tcp sink whose peer reads nothing
//!    (`weir-tcpsink --hold-until`) until the receiver's small journal has
//!    filled and dropped records for it, then reads everything; the
//!    receiver's peak RSS.
//!
//! 6. MQTT (issue 10), QoS 0 and QoS 1: a publisher of the bench's own →
//!    Mosquitto on :1883 → `mqtt` source → weir-sender → UDP →
//!    weir-receiver → `mqtt` sink → Mosquitto → a subscriber of the bench's
//!    own that checks every message's number, topic and bytes: messages/s
//!    from the first publish to the last message's arrival.
//! 7. Service sinks (issue 11): generator points into `postgres` (:5432),
//!    `nats` (JetStream, :4222), `kafka` (:9092) and `http` (a server of
//!    the bench's own): records/s from the first point's source timestamp
//!    to the moment the server was seen holding all of them, each record
//!    then read back by number.
//! 8. Files (issue 13): one large file, and many small files, through the
//!    `files` source and sink: MB/s and files/s from the sender's start to
//!    the last file in place, every file then hashed and checked.
//!
//! `--only` and `--skip` select groups of these (`core` is 1 to 5). A row
//! whose server answers nothing is skipped and says so; one that fails is
//! reported and the bench goes on, then exits non-zero.
//!
//! Gaps are counted from each run's audit log; peak RSS is `VmHWM`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::Value;
use weir_tests::bench::{
    count_audit_gaps, select_groups, AuditGaps, Bulk, Comparisons, EndToEnd, FilesRun, LaggingSink,
    Latency, LatencySummary, Machine, Params, PeakRss, Report, SmallRecords, UdpCeiling, MEASURED,
    RSS_BOUND_MIB, SCHEMA, SERVICES,
};
use weir_tests::bench_peers::{
    mqtt_payload, nothing_on, now_ns, poll_count, unique, Arrivals, HttpCollector, KafkaReader,
    MqttCounter, MqttPublisher, NatsStream, PgTables, MQTT_TOPICS,
};
use weir_tests::cpu::{pid_cpu_seconds, pid_peak_rss_kib};
use weir_tests::units::parse_bytes;

/// The FEC code every run uses: RS 32+8, 20% of the wire is parity.
const DATA_SHARDS: u64 = 32;
const PARITY_SHARDS: u64 = 8;
const MTU: u64 = 1500;
/// Tags of the generator in the small-record and latency runs.
const SMALL_TAGS: u64 = 1000;
/// How often the bench polls files, metrics and processes.
const POLL: Duration = Duration::from_millis(20);
/// A run whose output stops growing for this long is over.
const IDLE: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(about = "Measure weir on this machine: issue 9's table, printed and written as JSON")]
struct Args {
    /// Bytes pushed through each bulk run (binary suffixes).
    #[arg(long, default_value = "512M")]
    bytes: String,
    /// `[link] rate` of the weir sender in every run.
    #[arg(long, default_value = "4Gbit")]
    rate: String,
    /// Bulk and small-record runs each (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scratch directory, on disk: configs, logs, spools, journals, bench.json.
    #[arg(long, default_value = "/var/tmp/weir-bench")]
    dir: PathBuf,
    /// Generator points per small-record run.
    #[arg(long, default_value_t = 2_000_000)]
    small_records: u64,
    /// Generator rate of the small-record runs, points/s (high enough to saturate).
    #[arg(long, default_value_t = 2_000_000.0)]
    small_rate: f64,
    /// Length of the latency run, seconds.
    #[arg(long, default_value_t = 20.0)]
    latency_secs: f64,
    /// Generator rate of the latency run, points/s.
    #[arg(long, default_value_t = 1000.0)]
    latency_rate: f64,
    /// `[journal] max_bytes` of the lagging-sink run; it feeds twice this
    /// plus 128 MiB.
    #[arg(long, default_value = "64M")]
    lag_journal: String,
    /// Also run bulk with spool and journal on tmpfs, and with
    /// `[auth] disabled = true`, to show what the disk and the MAC cost.
    #[arg(long)]
    compare: bool,
    /// Run only these groups, comma-separated: core (the ceiling, bulk,
    /// small-record, latency and lagging-sink rows), mqtt, postgres, nats,
    /// kafka, http (the four together: services), files.
    #[arg(long)]
    only: Option<String>,
    /// Leave these groups out (the names of --only).
    #[arg(long)]
    skip: Option<String>,
    /// Messages of each MQTT row (QoS 0, QoS 1).
    #[arg(long, default_value_t = 50_000)]
    mqtt_messages: u64,
    /// Payload bytes of each MQTT message (at least 8: its number).
    #[arg(long, default_value_t = 64)]
    mqtt_payload: usize,
    /// Most MQTT messages published and not yet at the bench's subscriber:
    /// Mosquitto drops what overflows a client's queue (1000 by default).
    #[arg(long, default_value_t = 500)]
    mqtt_window: u64,
    /// Generator points of each service row.
    #[arg(long, default_value_t = 100_000)]
    service_records: u64,
    /// Generator rate of the service rows, points/s.
    #[arg(long, default_value_t = 100_000.0)]
    service_rate: f64,
    /// `[link] rate` of the weir sender in the MQTT and service rows: they
    /// measure the broker and the sinks, so the link is paced well below
    /// what the receiver absorbs (the feed is far below it anyway).
    #[arg(long, default_value = "400Mbit")]
    service_link_rate: String,
    /// Size of the large file (binary suffixes).
    #[arg(long, default_value = "512M")]
    file_bytes: String,
    /// Number of small files.
    #[arg(long, default_value_t = 10_000)]
    small_files: u64,
    /// Size of each small file (binary suffixes).
    #[arg(long, default_value = "4K")]
    small_file_bytes: String,
    /// `[link] rate` of the weir sender in the files runs: a file with a
    /// record lost beyond FEC's repair is not put in place, so the link is
    /// paced below what a busy receiver absorbs.
    #[arg(long, default_value = "800Mbit")]
    files_rate: String,
}

/// Kills (SIGKILL) and reaps the processes of a run when dropped.
#[derive(Default)]
struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn bin(name: &str) -> Result<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .context("bin dir")?
        .join(name);
    if !p.exists() {
        bail!(
            "{} missing; run `make bench` (it builds everything first)",
            p.display()
        );
    }
    Ok(p)
}

/// The last stdout line of a finished command, as JSON.
fn run_json(cmd: &mut Command) -> Result<Value> {
    let out = cmd.stderr(Stdio::null()).output()?;
    last_json_line(&out.stdout)
}

fn last_json_line(stdout: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .with_context(|| format!("parsing output: {text}"))
}

fn read_json(p: &Path) -> Value {
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(47_500)
}

fn fresh_dir(p: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(p);
    std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))
}

fn log_file(dir: &Path, name: &str) -> Result<Stdio> {
    let p = dir.join(name);
    Ok(std::fs::File::create(&p)
        .with_context(|| format!("creating {}", p.display()))?
        .into())
}

/// `[auth]` tables for both sides: a fresh key in `dir`, or disabled.
fn auth_tables(dir: &Path, auth: bool) -> Result<(String, String)> {
    if !auth {
        let off = "[auth]\ndisabled = true\n".to_string();
        return Ok((off.clone(), off));
    }
    let key = dir.join("link.key");
    let out = Command::new(bin("weir-sender")?)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()?;
    if !out.status.success() {
        bail!(
            "weir-sender keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let k = key.display();
    Ok((
        format!("[auth]\nkey_file = \"{k}\"\n"),
        format!("[auth]\nkey_files = [\"{k}\"]\n"),
    ))
}

/// One weir sender/receiver pair: its configs, and what goes around it.
struct Pair<'a> {
    /// Configs, logs, metrics and the audit log.
    dir: &'a Path,
    /// Spool and journal (disk or tmpfs).
    store: &'a Path,
    auth: bool,
    link_rate: &'a str,
    /// The `[[sources]]` table.
    source: String,
    /// The `[[sinks]]` table.
    sink: String,
    /// Extra keys of the receiver's `[journal]`.
    journal: String,
}

/// The pids of a started pair (the children themselves are in a [`Kill`])
/// and the sampler of their usage.
struct Started {
    usage: Arc<Mutex<[Usage; 2]>>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
    pids: [u32; 2],
}

/// The last CPU seconds and the highest `VmHWM` read of one process.
#[derive(Clone, Copy, Default)]
struct Usage {
    cpu_s: Option<f64>,
    peak_kib: u64,
}

/// How often a run's processes are sampled. A sender whose sources all
/// finish exits on its own, and an exited process has no `VmHWM` (its CPU
/// time stays readable until it is reaped), so its peak is the last sample.
const SAMPLE: Duration = Duration::from_millis(20);

fn sample(pids: [u32; 2], usage: &Mutex<[Usage; 2]>) {
    let mut u = usage.lock().unwrap_or_else(|e| e.into_inner());
    for (pid, u) in pids.into_iter().zip(u.iter_mut()) {
        if let Ok(cpu) = pid_cpu_seconds(pid) {
            u.cpu_s = Some(cpu);
        }
        if let Ok(kib) = pid_peak_rss_kib(pid) {
            u.peak_kib = u.peak_kib.max(kib);
        }
    }
}

impl Pair<'_> {
    fn start(&self, procs: &mut Kill) -> Result<Started> {
        fresh_dir(self.store)?;
        let (d, st) = (self.dir.display(), self.store.display());
        let link = free_port();
        let (sender_auth, receiver_auth) = auth_tables(self.dir, self.auth)?;
        std::fs::write(
            self.dir.join("receiver.toml"),
            format!(
                "{receiver_auth}[link]\nlisten = \"127.0.0.1:{link}\"\nmtu = {MTU}\n\
                 [audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{st}/journal\"\n{}\
                 [metrics]\npath = \"{d}/receiver.json\"\nlog_interval_s = 0\n{}",
                self.journal, self.sink
            ),
        )?;
        std::fs::write(
            self.dir.join("sender.toml"),
            format!(
                "{sender_auth}[link]\ndestination = \"127.0.0.1:{link}\"\nrate = \"{}\"\nmtu = {MTU}\n\
                 [fec]\ndata_shards = {DATA_SHARDS}\nparity_shards = {PARITY_SHARDS}\n\
                 [spool]\npath = \"{st}/spool\"\n\
                 [metrics]\npath = \"{d}/sender.json\"\nlog_interval_s = 0\n{}",
                self.link_rate, self.source
            ),
        )?;
        let receiver = Command::new(bin("weir-receiver")?)
            .args(["run", "--config"])
            .arg(self.dir.join("receiver.toml"))
            .stderr(log_file(self.dir, "receiver.log")?)
            .spawn()?;
        let receiver_pid = receiver.id();
        procs.0.push(receiver);
        let sender = Command::new(bin("weir-sender")?)
            .args(["run", "--config"])
            .arg(self.dir.join("sender.toml"))
            .stderr(log_file(self.dir, "sender.log")?)
            .spawn()?;
        let sender_pid = sender.id();
        procs.0.push(sender);
        let pids = [sender_pid, receiver_pid];
        let usage = Arc::new(Mutex::new([Usage::default(); 2]));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (usage, stop) = (usage.clone(), stop.clone());
            std::thread::Builder::new()
                .name("usage-sampler".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        sample(pids, &usage);
                        std::thread::sleep(SAMPLE);
                    }
                })
                .context("starting the usage sampler thread")?
        };
        Ok(Started {
            usage,
            stop,
            sampler: Some(sampler),
            pids,
        })
    }
}

impl Started {
    /// CPU seconds of (sender, receiver) and their peak RSS so far; call
    /// before the processes are killed.
    fn usage(&self) -> Result<(f64, f64, PeakRss)> {
        sample(self.pids, &self.usage);
        let [s, r] = *self.usage.lock().unwrap_or_else(|e| e.into_inner());
        if s.peak_kib == 0 || r.peak_kib == 0 {
            bail!("no memory figure of the sender or the receiver (did one fail to start? see sender.log, receiver.log)");
        }
        Ok((
            s.cpu_s
                .context("no CPU time of the sender; see sender.log")?,
            r.cpu_s
                .context("no CPU time of the receiver; see receiver.log")?,
            PeakRss {
                sender_peak_rss_mib: s.peak_kib as f64 / 1024.0,
                receiver_peak_rss_mib: r.peak_kib as f64 / 1024.0,
            },
        ))
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
        }
    }
}

fn audit_gaps(dir: &Path) -> Result<AuditGaps> {
    let p = dir.join("audit.jsonl");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    count_audit_gaps(&text).with_context(|| p.display().to_string())
}

/// Waits for `child` to exit, up to `limit`.
fn wait_exit(child: &mut Child, limit: Duration, what: &str, dir: &Path) -> Result<()> {
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > limit {
            bail!(
                "{what} did not finish within {limit:?}; see {}",
                dir.display()
            );
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

fn generator(rate: f64, count: u64) -> String {
    format!(
        "[[sources]]\nname = \"gen\"\ntype = \"generator\"\ntags = {SMALL_TAGS}\nrate = {rate:?}\ncount = {count}\n"
    )
}

fn tcp_sink(name: &str, port: u16) -> String {
    format!("[[sinks]]\nname = \"{name}\"\ntype = \"tcp\"\nconnect = \"127.0.0.1:{port}\"\n")
}

/// Ceilings the bulk goodput is divided by, MB/s.
#[derive(Clone, Copy)]
struct Ceilings {
    gso: f64,
    plain: f64,
}

fn bulk_run(args: &Args, dir: &Path, store: &Path, auth: bool, ceil: Ceilings) -> Result<Bulk> {
    fresh_dir(dir)?;
    let (src, dst) = (free_port(), free_port());
    let bytes = parse_bytes(&args.bytes).context("--bytes")?;
    let mut procs = Kill::default();
    let sink = Command::new(bin("weir-tcpsink")?)
        .args(["--no-hash", "--listen", &format!("127.0.0.1:{dst}")])
        .args(["--expect-bytes", &bytes.to_string(), "--timeout", "600"])
        .args(["--idle-timeout", "10", "--report"])
        .arg(dir.join("sink.json"))
        .stdout(Stdio::null())
        .stderr(log_file(dir, "tcpsink.log")?)
        .spawn()?;
    procs.0.push(sink);
    let pair = Pair {
        dir,
        store,
        auth,
        link_rate: &args.rate,
        source: format!(
            "[[sources]]\nname = \"raw\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{src}\"\n"
        ),
        sink: tcp_sink("replay", dst),
        journal: String::new(),
    }
    .start(&mut procs)?;
    let feed = run_json(Command::new(bin("weir-tcpfeed")?).args([
        "--no-hash",
        "--connect",
        &format!("127.0.0.1:{src}"),
        "--bytes",
        &bytes.to_string(),
    ]))?;
    wait_exit(
        &mut procs.0[0],
        Duration::from_secs(610),
        "weir-tcpsink",
        dir,
    )?;
    let (sender_cpu, receiver_cpu, rss) = pair.usage()?;
    std::thread::sleep(Duration::from_millis(600)); // one more metrics snapshot and audit sync
    let sink = read_json(&dir.join("sink.json"));
    let s = read_json(&dir.join("sender.json"));
    let delivered = sink["bytes"].as_u64().unwrap_or(0);
    if feed["bytes"].as_u64() != Some(bytes) {
        bail!(
            "weir-tcpfeed wrote {} of {bytes} bytes; see {}",
            feed["bytes"],
            dir.display()
        );
    }
    let span = sink["first_byte_to_last_byte_seconds"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let wire = s["wire_bytes_sent"].as_f64().unwrap_or(0.0);
    let gb = delivered as f64 / 1e9;
    let goodput = delivered as f64 / span / 1e6;
    Ok(Bulk {
        bytes_delivered: delivered,
        seconds: span,
        goodput_mb_s: goodput,
        wire_mb_s: wire / span / 1e6,
        goodput_per_gso_ceiling: ratio(goodput, ceil.gso),
        goodput_per_plain_ceiling: ratio(goodput, ceil.plain),
        sender_cpu_s_per_gb: sender_cpu / gb,
        receiver_cpu_s_per_gb: receiver_cpu / gb,
        rss,
        gaps: audit_gaps(dir)?,
    })
}

/// `a / b`, or not a number (`null` in bench.json, "n/a" in the table)
/// when the ceiling `b` was not measured.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// The median run by `key` (the upper one of an even count).
fn median_by<T: Clone>(runs: &[T], key: impl Fn(&T) -> f64) -> Option<T> {
    let mut sorted: Vec<&T> = runs.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted.get(sorted.len() / 2).map(|r| (*r).clone())
}

fn bulk_variant(
    args: &Args,
    report: &mut Report,
    label: &str,
    store: &Path,
    auth: bool,
    ceil: Ceilings,
) -> Result<(Bulk, Vec<Bulk>)> {
    println!("\nbulk, {label}:");
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let r = bulk_run(
            args,
            &args.dir.join(format!("bulk{i}")),
            &store.join(format!("bulk{i}")),
            auth,
            ceil,
        )?;
        println!(
            "  run {}: {:.0} MB/s goodput, {:.0} MB/s wire ({:.2} s), gaps {} ({} records), CPU s/GB sender {:.2} receiver {:.2}, peak RSS MiB sender {:.0} receiver {:.0}",
            i + 1,
            r.goodput_mb_s,
            r.wire_mb_s,
            r.seconds,
            r.gaps.gaps,
            r.gaps.gap_records,
            r.sender_cpu_s_per_gb,
            r.receiver_cpu_s_per_gb,
            r.rss.sender_peak_rss_mib,
            r.rss.receiver_peak_rss_mib,
        );
        report.note_rss(r.rss);
        runs.push(r);
    }
    let _ = std::fs::remove_dir_all(store);
    let median = median_by(&runs, |r| r.goodput_mb_s).context("--runs must be at least 1")?;
    Ok((median, runs))
}

/// Total size of the sink's output files in `dir` (not its dot files).
fn output_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Newlines in the sink's `.jsonl` output files in `dir`.
fn output_lines(dir: &Path) -> Result<u64> {
    let mut lines = 0u64;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "jsonl") {
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            lines += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    Ok(lines)
}

fn small_file_run(args: &Args, dir: &Path, store: &Path) -> Result<SmallRecords> {
    fresh_dir(dir)?;
    let out = dir.join("out");
    let mut procs = Kill::default();
    let pair = Pair {
        dir,
        store,
        auth: true,
        link_rate: &args.rate,
        source: generator(args.small_rate, args.small_records),
        sink: format!(
            "[[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{}\"\n",
            out.display()
        ),
        journal: String::new(),
    }
    .start(&mut procs)?;
    // The file sink's output grows batch by batch: the run spans from the
    // first poll that sees bytes to the last poll that sees them grow.
    let limit = Duration::from_secs_f64(60.0 + args.small_records as f64 / 10_000.0);
    let started = Instant::now();
    let (mut first, mut last, mut size) = (None, None, 0u64);
    loop {
        let now_size = output_bytes(&out);
        let now = Instant::now();
        if now_size != size {
            first.get_or_insert(now);
            last = Some(now);
            size = now_size;
        }
        let written = read_json(&dir.join("receiver.json"))["sink.files.records"]
            .as_u64()
            .unwrap_or(0);
        if written >= args.small_records && last.is_some_and(|t| now - t > POLL * 5) {
            break;
        }
        if last.is_some_and(|t| now - t > IDLE) || started.elapsed() > limit {
            break;
        }
        std::thread::sleep(POLL);
    }
    let (_, _, rss) = pair.usage()?;
    std::thread::sleep(Duration::from_millis(300)); // audit sync
    let delivered = output_lines(&out)?;
    let seconds = match (first, last) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => f64::NAN,
    };
    let result = SmallRecords {
        sink: "file".into(),
        records_sent: args.small_records,
        records_delivered: delivered,
        seconds,
        records_per_s: delivered as f64 / seconds,
        rss,
        gaps: audit_gaps(dir)?,
    };
    drop(procs);
    Ok(result)
}

fn small_tcp_run(args: &Args, dir: &Path, store: &Path) -> Result<SmallRecords> {
    fresh_dir(dir)?;
    let dst = free_port();
    let mut procs = Kill::default();
    let limit = 60.0 + args.small_records as f64 / 10_000.0;
    let sink = Command::new(bin("weir-tcpsink")?)
        .args(["--no-hash", "--listen", &format!("127.0.0.1:{dst}")])
        .args(["--expect-lines", &args.small_records.to_string()])
        .args([
            "--timeout",
            &format!("{limit}"),
            "--idle-timeout",
            "5",
            "--report",
        ])
        .arg(dir.join("sink.json"))
        .stdout(Stdio::null())
        .stderr(log_file(dir, "tcpsink.log")?)
        .spawn()?;
    procs.0.push(sink);
    let pair = Pair {
        dir,
        store,
        auth: true,
        link_rate: &args.rate,
        source: generator(args.small_rate, args.small_records),
        sink: tcp_sink("peer", dst),
        journal: String::new(),
    }
    .start(&mut procs)?;
    wait_exit(
        &mut procs.0[0],
        Duration::from_secs_f64(limit + 10.0),
        "weir-tcpsink",
        dir,
    )?;
    let (_, _, rss) = pair.usage()?;
    std::thread::sleep(Duration::from_millis(300)); // audit sync
    let sink = read_json(&dir.join("sink.json"));
    let delivered = sink["lines"].as_u64().unwrap_or(0);
    let seconds = sink["first_byte_to_last_byte_seconds"]
        .as_f64()
        .unwrap_or(f64::NAN);
    Ok(SmallRecords {
        sink: "tcp".into(),
        records_sent: args.small_records,
        records_delivered: delivered,
        seconds,
        records_per_s: delivered as f64 / seconds,
        rss,
        gaps: audit_gaps(dir)?,
    })
}

fn small_variant(
    args: &Args,
    report: &mut Report,
    sink: &str,
    run: fn(&Args, &Path, &Path) -> Result<SmallRecords>,
) -> Result<SmallRecords> {
    println!(
        "\nsmall records, {} points of 1000 tags at up to {:.0}/s into the {sink} sink:",
        args.small_records, args.small_rate
    );
    let store = args.dir.join("store");
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let name = format!("small-{sink}{i}");
        let r = run(args, &args.dir.join(&name), &store.join(&name))?;
        println!(
            "  run {}: {:.0} records/s ({} of {} delivered in {:.2} s), gaps {} ({} records), peak RSS MiB sender {:.0} receiver {:.0}",
            i + 1,
            r.records_per_s,
            r.records_delivered,
            r.records_sent,
            r.seconds,
            r.gaps.gaps,
            r.gaps.gap_records,
            r.rss.sender_peak_rss_mib,
            r.rss.receiver_peak_rss_mib,
        );
        report.note_rss(r.rss);
        runs.push(r);
    }
    let _ = std::fs::remove_dir_all(&store);
    median_by(&runs, |r| r.records_per_s).context("--runs must be at least 1")
}

fn latency_run(args: &Args, report: &mut Report) -> Result<Latency> {
    let dir = args.dir.join("latency");
    let store = args.dir.join("store").join("latency");
    fresh_dir(&dir)?;
    let count = (args.latency_rate * args.latency_secs).round() as u64;
    if count == 0 {
        bail!(
            "--latency-secs {} at --latency-rate {} is no record; raise them",
            args.latency_secs,
            args.latency_rate
        );
    }
    println!(
        "\nlatency, {count} points at {:.0}/s into the tcp sink, default fsync settings:",
        args.latency_rate
    );
    let dst = free_port();
    let limit = args.latency_secs + 60.0;
    let mut procs = Kill::default();
    let sink = Command::new(bin("weir-tcpsink")?)
        .args([
            "--no-hash",
            "--latency",
            "--listen",
            &format!("127.0.0.1:{dst}"),
        ])
        .args(["--expect-lines", &count.to_string()])
        .args([
            "--timeout",
            &format!("{limit}"),
            "--idle-timeout",
            "5",
            "--report",
        ])
        .arg(dir.join("sink.json"))
        .stdout(Stdio::null())
        .stderr(log_file(&dir, "tcpsink.log")?)
        .spawn()?;
    procs.0.push(sink);
    let pair = Pair {
        dir: &dir,
        store: &store,
        auth: true,
        link_rate: &args.rate,
        source: generator(args.latency_rate, count),
        sink: tcp_sink("peer", dst),
        journal: String::new(),
    }
    .start(&mut procs)?;
    wait_exit(
        &mut procs.0[0],
        Duration::from_secs_f64(limit + 10.0),
        "weir-tcpsink",
        &dir,
    )?;
    let (_, _, rss) = pair.usage()?;
    std::thread::sleep(Duration::from_millis(1100)); // audit sync, one more metrics snapshot
    let sink = read_json(&dir.join("sink.json"));
    let fsync_max_ms = |file: &str, key: &str| {
        read_json(&dir.join(file))[key]
            .as_f64()
            .map(|us| us / 1000.0)
    };
    let summary: LatencySummary = serde_json::from_value(sink["latency"].clone())
        .with_context(|| format!("no latency in {}", dir.join("sink.json").display()))?;
    let r = Latency {
        rate: args.latency_rate,
        seconds: sink["first_byte_to_last_byte_seconds"]
            .as_f64()
            .unwrap_or(0.0),
        unparsed: sink["latency_unparsed"].as_u64().unwrap_or(0),
        summary,
        spool_fsync_max_ms: fsync_max_ms("sender.json", "spool_fsync_max_us"),
        journal_fsync_max_ms: fsync_max_ms("receiver.json", "journal_fsync_max_us"),
        rss,
        gaps: audit_gaps(&dir)?,
    };
    println!(
        "  {} samples: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; longest fsync: spool {:.1} ms, journal {:.1} ms; unparsed {}, gaps {}",
        r.summary.samples,
        r.summary.p50_ms,
        r.summary.p99_ms,
        r.summary.max_ms,
        r.spool_fsync_max_ms.unwrap_or(f64::NAN),
        r.journal_fsync_max_ms.unwrap_or(f64::NAN),
        r.unparsed,
        r.gaps.gaps
    );
    report.note_rss(r.rss);
    drop(procs);
    let _ = std::fs::remove_dir_all(&store);
    Ok(r)
}

/// What the lagging-sink run feeds for a journal bound of `journal` bytes:
/// the receiver hands a sink up to 64 MiB of records in memory
/// (`SINK_QUEUE_BYTES`) before it counts as behind, the loopback socket
/// buffers hold a few MiB more, and only then does the journal fill; twice
/// the journal on top makes it overflow for certain.
fn lag_bytes(journal: u64) -> u64 {
    journal.saturating_mul(2).saturating_add(128 << 20)
}

fn lagging_run(args: &Args, report: &mut Report) -> Result<LaggingSink> {
    let dir = args.dir.join("lagging");
    let store = args.dir.join("store").join("lagging");
    fresh_dir(&dir)?;
    let journal = parse_bytes(&args.lag_journal).context("--lag-journal")?;
    let fed = lag_bytes(journal);
    println!(
        "\nlagging sink: {} MiB into a tcp sink that reads nothing until the {} MiB journal has filled:",
        fed >> 20,
        journal >> 20
    );
    let (src, dst) = (free_port(), free_port());
    let hold = dir.join("release");
    let mut procs = Kill::default();
    let sink = Command::new(bin("weir-tcpsink")?)
        .args(["--no-hash", "--listen", &format!("127.0.0.1:{dst}")])
        .arg("--hold-until")
        .arg(&hold)
        .args(["--timeout", "900", "--idle-timeout", "5", "--report"])
        .arg(dir.join("sink.json"))
        .stdout(Stdio::null())
        .stderr(log_file(&dir, "tcpsink.log")?)
        .spawn()?;
    procs.0.push(sink);
    let pair = Pair {
        dir: &dir,
        store: &store,
        auth: true,
        link_rate: &args.rate,
        source: format!(
            "[[sources]]\nname = \"raw\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{src}\"\n"
        ),
        sink: tcp_sink("lag", dst),
        journal: format!("max_bytes = {journal}\n"),
    }
    .start(&mut procs)?;
    let feed = Command::new(bin("weir-tcpfeed")?)
        .args([
            "--no-hash",
            "--connect",
            &format!("127.0.0.1:{src}"),
            "--bytes",
            &fed.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    procs.0.push(feed);
    // Hold the peer until the journal has dropped records for it; if that
    // never happens (the feed ended and the journal stopped growing), let
    // it read anyway and say so.
    let held_from = Instant::now();
    let (mut journal_bytes, mut still_since) = (0u64, Instant::now());
    let filled = loop {
        let m = read_json(&dir.join("receiver.json"));
        if m["sink.lag.overflow_records"].as_u64().unwrap_or(0) > 0 {
            break true;
        }
        let now_bytes = m["journal_bytes"].as_u64().unwrap_or(0);
        if now_bytes != journal_bytes {
            (journal_bytes, still_since) = (now_bytes, Instant::now());
        }
        let fed_all = procs.0[3].try_wait()?.is_some();
        if (fed_all && still_since.elapsed() > IDLE)
            || held_from.elapsed() > Duration::from_secs(600)
        {
            break false;
        }
        std::thread::sleep(POLL * 5);
    };
    let held_seconds = held_from.elapsed().as_secs_f64();
    std::fs::write(&hold, b"").with_context(|| format!("creating {}", hold.display()))?;
    wait_exit(
        &mut procs.0[3],
        Duration::from_secs(600),
        "weir-tcpfeed",
        &dir,
    )?;
    let feed_out = procs.0[3].stdout.take().map(|mut o| {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut o, &mut v);
        v
    });
    let feed = last_json_line(&feed_out.unwrap_or_default())?;
    wait_exit(
        &mut procs.0[0],
        Duration::from_secs(900),
        "weir-tcpsink",
        &dir,
    )?;
    let (_, _, rss) = pair.usage()?;
    std::thread::sleep(Duration::from_millis(600)); // one more metrics snapshot and audit sync
    let sink = read_json(&dir.join("sink.json"));
    let m = read_json(&dir.join("receiver.json"));
    let r = LaggingSink {
        journal_max_bytes: journal,
        bytes_fed: feed["bytes"].as_u64().unwrap_or(0),
        bytes_delivered: sink["bytes"].as_u64().unwrap_or(0),
        held_seconds,
        journal_filled: filled,
        overflow_records: m["sink.lag.overflow_records"].as_u64().unwrap_or(0),
        rss,
        gaps: audit_gaps(&dir)?,
    };
    println!(
        "  held {:.1} s ({}), then {} of {} bytes delivered; {} records overflowed, gaps {}; peak RSS MiB sender {:.0} receiver {:.0}",
        r.held_seconds,
        if filled { "journal filled" } else { "journal did NOT fill" },
        r.bytes_delivered,
        r.bytes_fed,
        r.overflow_records,
        r.gaps.gaps,
        r.rss.sender_peak_rss_mib,
        r.rss.receiver_peak_rss_mib,
    );
    report.note_rss(r.rss);
    drop(procs);
    let _ = std::fs::remove_dir_all(&store);
    Ok(r)
}

/// The `bench.json` sections of group `core`, `null` when it did not run.
const CORE_KEYS: [&str; 7] = [
    "udp_ceiling",
    "bulk",
    "bulk_runs",
    "small_records_file",
    "small_records_tcp",
    "latency",
    "lagging_sink",
];

const MQTT_PORT: u16 = 1883;
const PG_PORT: u16 = 5432;
const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const NATS_PORT: u16 = 4222;
const KAFKA_PORT: u16 = 9092;
/// A service row whose count has not moved for this long, with the sink
/// caught up, is over.
const SERVICE_IDLE: Duration = Duration::from_secs(10);

/// `sink.NAME.behind` in the receiver's metrics file.
fn sink_behind(dir: &Path, sink: &str) -> Option<u64> {
    read_json(&dir.join("receiver.json"))[format!("sink.{sink}.behind")].as_u64()
}

/// After a reader saw everything: a metrics snapshot taken after now says
/// the sink has nothing left (at most 10 s), so duplicates it might still
/// write would be read too.
fn wait_sink_drained(dir: &Path, sink: &str) {
    std::thread::sleep(Duration::from_millis(1200));
    let started = Instant::now();
    while sink_behind(dir, sink) != Some(0) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(POLL * 5);
    }
}

/// A row that did not run to the end, and why.
fn unmeasured(target: &str, status: String) -> EndToEnd {
    println!("  {target}: {status}");
    EndToEnd {
        target: target.to_string(),
        status,
        ..EndToEnd::default()
    }
}

fn print_end_to_end(r: &EndToEnd, unit: &str) {
    println!(
        "  {}: {} {unit} ({} of {} there once in {:.2} s; duplicates {}, out of order {}, gaps {}); CPU s sender {:.2} receiver {:.2}; peak RSS MiB sender {:.0} receiver {:.0}",
        r.target,
        r.records_per_s
            .map_or("n/a (not all arrived)".to_string(), |v| format!("{v:.0}")),
        r.records_delivered,
        r.records_sent,
        r.seconds,
        r.duplicates + r.out_of_range,
        r.out_of_order,
        r.gaps.gaps,
        r.sender_cpu_s,
        r.receiver_cpu_s,
        r.rss.sender_peak_rss_mib,
        r.rss.receiver_peak_rss_mib,
    );
}

fn mqtt_rows(args: &Args, report: &mut Report, failed: &mut Vec<String>) -> Vec<EndToEnd> {
    println!(
        "\nMQTT end to end: {} messages of {} bytes over {MQTT_TOPICS} topics, at most {} on their way, Mosquitto 127.0.0.1:{MQTT_PORT} → mqtt source (MQTT 5) → sender ([link] rate {}) → receiver → mqtt sink → Mosquitto → the bench's subscriber:",
        args.mqtt_messages, args.mqtt_payload, args.mqtt_window, args.service_link_rate
    );
    let mut rows = Vec::new();
    for qos in [0u8, 1] {
        let target = format!("mqtt-qos{qos}");
        let row = if let Some(why) = nothing_on(MQTT_PORT) {
            unmeasured(&target, why)
        } else {
            match mqtt_run(args, qos) {
                Ok(r) => {
                    print_end_to_end(&r, "messages/s");
                    report.note_rss(r.rss);
                    r
                }
                Err(e) => {
                    failed.push(format!("{target}: {e:#}"));
                    unmeasured(&target, format!("error: {e:#}"))
                }
            }
        };
        rows.push(row);
    }
    rows
}

fn mqtt_run(args: &Args, qos: u8) -> Result<EndToEnd> {
    let target = format!("mqtt-qos{qos}");
    let dir = args.dir.join(&target);
    let store = args.dir.join("store").join(&target);
    fresh_dir(&dir)?;
    let (n, len, window) = (args.mqtt_messages, args.mqtt_payload, args.mqtt_window);
    let id = unique("weirbench-");
    let (ot, it) = (format!("weir-bench/{id}/ot"), format!("weir-bench/{id}/it"));
    let level = if qos == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    };
    // The sink publishes `it/<original topic>`.
    let counter = MqttCounter::subscribe(
        &format!("{id}-count"),
        MQTT_PORT,
        &format!("{it}/{ot}"),
        level,
        n,
        len,
    )?;
    let mut procs = Kill::default();
    let pair = Pair {
        dir: &dir,
        store: &store,
        auth: true,
        link_rate: &args.service_link_rate,
        source: format!(
            "[[sources]]\nname = \"mqtt\"\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{MQTT_PORT}\"\n\
             topics = [\"{ot}/#\"]\nqos = {qos}\nprotocol = \"5\"\nclient_id = \"{id}-source\"\nclean_session = true\n"
        ),
        sink: format!(
            "[[sinks]]\nname = \"it\"\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{MQTT_PORT}\"\n\
             prefix = \"{it}\"\nclient_id = \"{id}-sink\"\nprotocol = \"5\"\n"
        ),
        journal: String::new(),
    }
    .start(&mut procs)?;
    let started = Instant::now();
    while read_json(&dir.join("sender.json"))["sources"]["mqtt"]["state"] != "subscribed" {
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the mqtt source did not subscribe within 30 s; see {}",
                dir.join("sender.log").display()
            );
        }
        std::thread::sleep(POLL * 5);
    }
    let publisher = MqttPublisher::connect(&format!("{id}-pub"), MQTT_PORT)?;
    let start_ns = now_ns();
    let mut published = 0u64;
    for i in 0..n {
        if !counter.wait_window(i, window, IDLE) {
            println!(
                "  {target}: nothing arrived for {IDLE:?} with {window} on their way; publishing stopped after {i}"
            );
            break;
        }
        publisher.publish(
            format!("{ot}/t{}", i % MQTT_TOPICS),
            level,
            mqtt_payload(i, len),
        )?;
        published += 1;
    }
    counter.wait_all(IDLE);
    // Anything arriving twice comes soon after the rest.
    std::thread::sleep(Duration::from_millis(500));
    let (sender_cpu_s, receiver_cpu_s, rss) = pair.usage()?;
    std::thread::sleep(Duration::from_millis(300)); // audit sync
    let c = counter.count();
    let gaps = audit_gaps(&dir)?;
    drop(publisher);
    drop(procs);
    let _ = std::fs::remove_dir_all(&store);
    let complete = c.tally.complete();
    let end_ns = c.complete_ns.or(c.last_ns).unwrap_or(start_ns);
    let seconds = (end_ns - start_ns) as f64 / 1e9;
    let mut what = format!(
        "{n} messages of {len} bytes, ≤{window} on their way, counted by the bench's subscriber"
    );
    if published < n {
        what.push_str(&format!(", publishing stopped after {published}"));
    }
    if c.corrupt > 0 {
        what.push_str(&format!(", {} not as published", c.corrupt));
    }
    Ok(EndToEnd {
        target,
        status: MEASURED.into(),
        what,
        records_sent: n,
        records_delivered: c.tally.distinct,
        duplicates: c.tally.duplicates,
        out_of_range: c.tally.out_of_range,
        out_of_order: c.tally.out_of_order,
        complete,
        seconds,
        records_per_s: complete.then(|| n as f64 / seconds),
        sender_cpu_s,
        receiver_cpu_s,
        rss,
        gaps,
    })
}

fn service_rows(args: &Args, report: &mut Report, failed: &mut Vec<String>) -> Vec<EndToEnd> {
    println!(
        "\nservice sinks: {} generator points ({SMALL_TAGS} tags) fed at {:.0}/s → sender ([link] rate {}) → receiver → each server, read back by number:",
        args.service_records, args.service_rate, args.service_link_rate
    );
    let mut rows = Vec::new();
    let targets: Vec<&str> = SERVICES.into_iter().filter(|t| report.ran(t)).collect();
    for target in targets {
        let port = match target {
            "postgres" => Some(PG_PORT),
            "nats" => Some(NATS_PORT),
            "kafka" => Some(KAFKA_PORT),
            _ => None,
        };
        let row = if let Some(why) = port.and_then(nothing_on) {
            unmeasured(target, why)
        } else {
            let run = match target {
                "postgres" => postgres_run(args),
                "nats" => nats_run(args),
                "kafka" => kafka_run(args),
                _ => http_run(args),
            };
            match run {
                Ok(r) => {
                    print_end_to_end(&r, "records/s");
                    report.note_rss(r.rss);
                    r
                }
                Err(e) => {
                    failed.push(format!("{target}: {e:#}"));
                    unmeasured(target, format!("error: {e:#}"))
                }
            }
        };
        rows.push(row);
    }
    rows
}

/// One service row: the generator into a receiver with `sink` (named
/// `target`); `collect` waits for the server and reads it back, returning
/// what it holds and when it was seen holding it (ns since the epoch).
fn service_run(
    args: &Args,
    target: &str,
    sink: String,
    what: String,
    collect: impl FnOnce(&Path) -> Result<(Arrivals, i64)>,
) -> Result<EndToEnd> {
    let dir = args.dir.join(target);
    let store = args.dir.join("store").join(target);
    fresh_dir(&dir)?;
    let mut procs = Kill::default();
    let pair = Pair {
        dir: &dir,
        store: &store,
        auth: true,
        link_rate: &args.service_link_rate,
        source: generator(args.service_rate, args.service_records),
        sink,
        journal: String::new(),
    }
    .start(&mut procs)?;
    let (a, end_ns) = collect(&dir)?;
    let (sender_cpu_s, receiver_cpu_s, rss) = pair.usage()?;
    std::thread::sleep(Duration::from_millis(300)); // audit sync
    let gaps = audit_gaps(&dir)?;
    drop(procs);
    let _ = std::fs::remove_dir_all(&store);
    let n = args.service_records;
    let complete = a.tally.complete();
    let seconds = a
        .first_ts_ns
        .map_or(f64::NAN, |first| (end_ns - first) as f64 / 1e9);
    if !complete {
        println!(
            "  {target}: not all there; first missing: {:?}",
            a.tally.first_missing(5)
        );
    }
    Ok(EndToEnd {
        target: target.to_string(),
        status: MEASURED.into(),
        what,
        records_sent: n,
        records_delivered: a.tally.distinct,
        duplicates: a.tally.duplicates,
        out_of_range: a.tally.out_of_range,
        out_of_order: a.tally.out_of_order,
        complete,
        seconds,
        records_per_s: complete.then(|| n as f64 / seconds),
        sender_cpu_s,
        receiver_cpu_s,
        rss,
        gaps,
    })
}

/// How long a service row may take at most.
fn service_limit(args: &Args) -> Duration {
    Duration::from_secs_f64(120.0 + args.service_records as f64 / 1000.0)
}

fn postgres_run(args: &Args) -> Result<EndToEnd> {
    let n = args.service_records;
    let mut tables = PgTables::new(PG_URL)?;
    let sink = tables.sink("postgres");
    let what = format!(
        "{n} points fed at {:.0}/s, COPY into {}, until count(*) = {n}",
        args.service_rate,
        tables.name("points")
    );
    service_run(args, "postgres", sink, what, |dir| {
        let (_, end_ns) = poll_count(
            || tables.count_points(),
            n,
            POLL * 2,
            SERVICE_IDLE,
            service_limit(args),
            || sink_behind(dir, "postgres") == Some(0),
        );
        wait_sink_drained(dir, "postgres");
        Ok((tables.read_points("gen", n)?, end_ns))
    })
}

fn nats_run(args: &Args) -> Result<EndToEnd> {
    let n = args.service_records;
    let url = format!("nats://127.0.0.1:{NATS_PORT}");
    let js = NatsStream::create(&url)?;
    let sink = format!(
        "[[sinks]]\nname = \"nats\"\ntype = \"nats\"\nurl = \"{url}\"\nsubject = \"{}.{{stream}}\"\nstream = \"{}\"\n",
        js.subject_root, js.name
    );
    let what = format!(
        "{n} points fed at {:.0}/s, JetStream stream {} (file storage), until its message count = {n}",
        args.service_rate, js.name
    );
    service_run(args, "nats", sink, what, |dir| {
        let (_, end_ns) = poll_count(
            || js.count().unwrap_or(0),
            n,
            POLL * 2,
            SERVICE_IDLE,
            service_limit(args),
            || sink_behind(dir, "nats") == Some(0),
        );
        wait_sink_drained(dir, "nats");
        Ok((js.read_all("gen", n)?, end_ns))
    })
}

fn kafka_run(args: &Args) -> Result<EndToEnd> {
    let n = args.service_records;
    let brokers = format!("127.0.0.1:{KAFKA_PORT}");
    let mut reader = KafkaReader::start(&brokers, "gen", n)?;
    let sink = format!(
        "[[sinks]]\nname = \"kafka\"\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{}\"\n",
        reader.topic
    );
    let what = format!(
        "{n} points fed at {:.0}/s, topic {} (1 partition), until a consumer has read all {n}",
        args.service_rate, reader.topic
    );
    service_run(args, "kafka", sink, what, |dir| {
        poll_count(
            || reader.arrivals().tally.distinct,
            n,
            POLL,
            SERVICE_IDLE,
            service_limit(args),
            || sink_behind(dir, "kafka") == Some(0),
        );
        wait_sink_drained(dir, "kafka");
        reader.finish()?;
        let a = std::mem::take(&mut *reader.arrivals());
        let end_ns = a.complete_ns.or(a.last_ns).unwrap_or_else(now_ns);
        Ok((a, end_ns))
    })
}

fn http_run(args: &Args) -> Result<EndToEnd> {
    let n = args.service_records;
    let server = HttpCollector::start("gen", n)?;
    let sink = format!(
        "[[sinks]]\nname = \"http\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{}/ingest\"\nformat = \"ndjson\"\n",
        server.port
    );
    let what = format!(
        "{n} points fed at {:.0}/s, NDJSON POSTs to the bench's own server, until it has parsed all {n}",
        args.service_rate
    );
    service_run(args, "http", sink, what, |dir| {
        poll_count(
            || server.arrivals().tally.distinct,
            n,
            POLL,
            SERVICE_IDLE,
            service_limit(args),
            || sink_behind(dir, "http") == Some(0),
        );
        wait_sink_drained(dir, "http");
        let a = std::mem::take(&mut *server.arrivals());
        let bad = *server
            .bad_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if bad > 0 {
            bail!("the http sink sent {bad} request(s) that were not a POST");
        }
        let end_ns = a.complete_ns.or(a.last_ns).unwrap_or_else(now_ns);
        Ok((a, end_ns))
    })
}

/// One file the files rows send: its path under the source's `dir`, size
/// and SHA-256.
struct SentFile {
    rel: String,
    size: u64,
    sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `size` seeded random bytes to `dir/rel` (through `rel.tmp` and a
/// rename, as a writer should) with an mtime an hour ago, so the source
/// takes it at its first scan.
fn write_sent_file(dir: &Path, rel: &str, size: u64, seed: u64) -> Result<SentFile> {
    use rand::{RngCore, SeedableRng};
    use sha2::Digest;
    use std::io::Write;
    let path = dir.join(rel);
    let parent = path.parent().context("a file path has a parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{}.tmp", seed));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; (1 << 20).min(size as usize).max(1)];
    let mut left = size;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..k]);
        hasher.update(&buf[..k]);
        out.write_all(&buf[..k])?;
        left -= k as u64;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))?;
    drop(file);
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(SentFile {
        rel: rel.to_string(),
        size,
        sha256: hex(&hasher.finalize()),
    })
}

/// Files under `dir` by relative path, skipping dotfiles (the sink's
/// temporary names) and `incomplete/`.
fn visible_files(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with('.') || p == dir.join("incomplete") {
                continue;
            }
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => {
                    let size = e.metadata().map_or(0, |m| m.len());
                    let rel = p
                        .strip_prefix(dir)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .into_owned();
                    out.insert(rel, size);
                }
                _ => {}
            }
        }
    }
    out
}

fn sha256_of(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex(&h.finalize()))
}

fn files_row(args: &Args, report: &mut Report, large: bool, failed: &mut Vec<String>) -> FilesRun {
    let label = if large { "files-large" } else { "files-small" };
    match files_run(args, large) {
        Ok(r) => {
            println!(
                "  {}: {} ({} of {} files verified in place in {:.2} s, incomplete {}, gaps {}); CPU s sender {:.2} receiver {:.2}; peak RSS MiB sender {:.0} receiver {:.0}",
                label,
                match (large, r.mb_per_s, r.files_per_s) {
                    (true, Some(v), _) => format!("{v:.0} MB/s"),
                    (false, _, Some(v)) => format!("{v:.1} files/s"),
                    _ => "n/a (not all verified)".to_string(),
                },
                r.files_verified,
                r.files_sent,
                r.seconds,
                r.files_incomplete,
                r.gaps.gaps,
                r.sender_cpu_s,
                r.receiver_cpu_s,
                r.rss.sender_peak_rss_mib,
                r.rss.receiver_peak_rss_mib,
            );
            report.note_rss(r.rss);
            r
        }
        Err(e) => {
            println!("  {label}: error: {e:#}");
            failed.push(format!("{label}: {e:#}"));
            FilesRun {
                status: format!("error: {e:#}"),
                ..FilesRun::default()
            }
        }
    }
}

fn files_run(args: &Args, large: bool) -> Result<FilesRun> {
    let name = if large { "files-large" } else { "files-small" };
    let dir = args.dir.join(name);
    let store = args.dir.join("store").join(name);
    fresh_dir(&dir)?;
    let (outbox, inbox) = (dir.join("outbox"), dir.join("inbox"));
    let (count, size) = if large {
        (1, parse_bytes(&args.file_bytes)?)
    } else {
        (args.small_files, parse_bytes(&args.small_file_bytes)?)
    };
    println!(
        "\nfiles, {}: {count} file(s) of {size} bytes, files source (after = \"move\") → sender ([link] rate {}) → receiver → files sink:",
        if large { "one large file" } else { "small files" },
        args.files_rate
    );
    let mut sent = Vec::new();
    for i in 0..count {
        let rel = if large {
            "large.bin".to_string()
        } else {
            format!("d{:03}/f{i:06}.bin", i / 100)
        };
        sent.push(write_sent_file(&outbox, &rel, size, 13_000 + i)?);
    }
    let total_bytes = count.saturating_mul(size);
    let limit = Duration::from_secs_f64(300.0 + total_bytes as f64 / 1e6 + count as f64 * 0.05);
    let mut procs = Kill::default();
    let start_ns = now_ns();
    let pair = Pair {
        dir: &dir,
        store: &store,
        auth: true,
        link_rate: &args.files_rate,
        source: format!(
            "[[sources]]\nname = \"files\"\ntype = \"files\"\ndir = \"{}\"\n",
            outbox.display()
        ),
        sink: format!(
            "[[sinks]]\nname = \"files\"\ntype = \"files\"\ndir = \"{}\"\n",
            inbox.display()
        ),
        journal: String::new(),
    }
    .start(&mut procs)?;
    // Done when every file is in place under its name; over when neither
    // that count nor the records the sink confirmed moved for 30 s.
    let started = Instant::now();
    let (mut seen, mut sink_records, mut since) = (0u64, 0u64, Instant::now());
    let mut end_ns = start_ns;
    loop {
        let now_seen = visible_files(&inbox).len() as u64;
        let now_records = read_json(&dir.join("receiver.json"))["sink.files.records"]
            .as_u64()
            .unwrap_or(0);
        if now_seen != seen {
            end_ns = now_ns();
        }
        if now_seen != seen || now_records != sink_records {
            (seen, sink_records, since) = (now_seen, now_records, Instant::now());
        }
        if seen >= count || since.elapsed() > Duration::from_secs(30) || started.elapsed() > limit {
            break;
        }
        std::thread::sleep(if large { POLL } else { POLL * 5 });
    }
    let (sender_cpu_s, receiver_cpu_s, rss) = pair.usage()?;
    // The sink's audit lines follow on the decoder's next tick.
    let events = |dir: &Path| -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default();
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).context("an audit line is not JSON")?;
            if v["event"] == "file" {
                out.push(v);
            }
        }
        Ok(out)
    };
    let waited = Instant::now();
    let mut file_events = events(&dir)?;
    while (file_events.len() as u64) < seen && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(POLL * 5);
        file_events = events(&dir)?;
    }
    let gaps = audit_gaps(&dir)?;
    drop(procs);
    let _ = std::fs::remove_dir_all(&store);
    // Verify: each file under its own name, its size, and its bytes hash to
    // what was sent; one complete audit line names it, with that hash.
    let mut complete_lines: std::collections::HashMap<String, Vec<&Value>> =
        std::collections::HashMap::new();
    let mut incomplete = 0u64;
    for e in &file_events {
        if e["complete"] == true {
            complete_lines
                .entry(e["path"].as_str().unwrap_or("").to_string())
                .or_default()
                .push(e);
        } else {
            incomplete += 1;
        }
    }
    let visible = visible_files(&inbox);
    let mut verified = 0u64;
    let mut bad = Vec::new();
    for f in &sent {
        let lines = complete_lines.get(&f.rel).map_or(&[][..], Vec::as_slice);
        let ok = visible.get(&f.rel) == Some(&f.size)
            && lines.len() == 1
            && lines[0]["written"] == f.rel.as_str()
            && lines[0]["sha256"] == f.sha256.as_str()
            && sha256_of(&inbox.join(&f.rel))? == f.sha256;
        if ok {
            verified += 1;
        } else if bad.len() < 5 {
            bad.push(f.rel.clone());
        }
    }
    let extra = visible.len() as u64 - verified.min(visible.len() as u64);
    let complete = verified == count && extra == 0 && incomplete == 0;
    if !complete {
        println!(
            "  {name}: {verified} of {count} verified, {extra} other file(s) in the sink's dir, {incomplete} incomplete; first not verified: {bad:?}"
        );
    }
    let seconds = (end_ns - start_ns) as f64 / 1e9;
    let _ = std::fs::remove_dir_all(&outbox);
    let _ = std::fs::remove_dir_all(&inbox);
    Ok(FilesRun {
        status: MEASURED.into(),
        files_sent: count,
        bytes_per_file: size,
        link_rate: args.files_rate.clone(),
        files_verified: verified,
        files_incomplete: incomplete,
        complete,
        seconds,
        mb_per_s: complete.then(|| total_bytes as f64 / seconds / 1e6),
        files_per_s: complete.then(|| count as f64 / seconds),
        sender_cpu_s,
        receiver_cpu_s,
        rss,
        gaps,
    })
}

fn machine(rmem_max: Option<u64>) -> Machine {
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty());
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".into(), |(_, m)| m.trim().to_string());
    Machine {
        commit,
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        cpu_model,
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get() as u64),
        rmem_max,
    }
}

fn udp_ceiling(bytes: &str) -> Result<UdpCeiling> {
    let blast = bin("weir-udpblast")?;
    let unpaced = run_json(Command::new(&blast).args(["pair", "--bytes", bytes]))?;
    let plain = run_json(Command::new(&blast).args(["--no-gso", "pair", "--bytes", bytes]))?;
    // The ceiling: the most any run delivered while losing under 0.5%
    // (unpaced GSO runs vary from lossless to heavy loss between runs).
    let mut best: (String, f64) = ("none".into(), 0.0);
    let mut candidates = vec![("unpaced".to_string(), unpaced.clone())];
    for rate in ["80Gbit", "60Gbit", "40Gbit", "30Gbit", "20Gbit", "10Gbit"] {
        candidates.push((
            rate.to_string(),
            run_json(Command::new(&blast).args(["pair", "--bytes", bytes, "--rate", rate]))?,
        ));
    }
    for (rate, r) in candidates {
        let mb_s = r["mb_per_s_received"].as_f64().unwrap_or(0.0);
        if r["loss_percent"].as_f64().unwrap_or(100.0) < 0.5 && mb_s > best.1 {
            best = (rate, mb_s);
        }
    }
    let c = UdpCeiling {
        gso_mb_s: best.1,
        gso_rate: best.0,
        gso_unpaced_mb_s: unpaced["mb_per_s_received"].as_f64().unwrap_or(0.0),
        gso_unpaced_loss_percent: unpaced["loss_percent"].as_f64().unwrap_or(0.0),
        plain_mb_s: plain["mb_per_s_received"].as_f64().unwrap_or(0.0),
        plain_loss_percent: plain["loss_percent"].as_f64().unwrap_or(0.0),
    };
    println!("\nraw UDP ceiling (weir-udpblast pair, sender and receiver threads in one process):");
    println!(
        "  GSO/GRO, unpaced:             {:>7.0} MB/s received, {:.1}% lost",
        c.gso_unpaced_mb_s, c.gso_unpaced_loss_percent
    );
    println!(
        "  GSO/GRO, best run <0.5% loss: {:>7.0} MB/s ({}; the ceiling used below)",
        c.gso_mb_s, c.gso_rate
    );
    println!(
        "  one datagram per syscall:     {:>7.0} MB/s received, {:.1}% lost",
        c.plain_mb_s, c.plain_loss_percent
    );
    if c.gso_rate == "none" {
        println!("  (no GSO run lost under 0.5%: the machine is too busy for a ceiling; its ratios are n/a)");
    }
    Ok(c)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bulk_bytes = parse_bytes(&args.bytes).context("--bytes")?;
    if args.runs == 0 {
        bail!("--runs 0 measures nothing; use 1 or more");
    }
    if !(args.small_rate > 0.0 && args.latency_rate > 0.0 && args.latency_secs > 0.0) {
        bail!("--small-rate, --latency-rate and --latency-secs must be above 0");
    }
    if args.mqtt_payload < 8 || args.mqtt_window == 0 || args.mqtt_messages == 0 {
        bail!("--mqtt-payload must be at least 8 (the message number), --mqtt-window and --mqtt-messages at least 1");
    }
    if args.service_rate.is_nan()
        || args.service_rate <= 0.0
        || args.service_records == 0
        || args.small_files == 0
    {
        bail!("--service-rate, --service-records and --small-files must be above 0");
    }
    parse_bytes(&args.file_bytes).context("--file-bytes")?;
    parse_bytes(&args.small_file_bytes).context("--small-file-bytes")?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating --dir {}", args.dir.display()))?;
    let rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let store = args.dir.join("store");
    let mut report = Report {
        schema: SCHEMA,
        machine: machine(rmem_max),
        params: Params {
            bulk_bytes,
            link_rate: args.rate.clone(),
            runs: args.runs as u64,
            mtu: MTU,
            data_shards: DATA_SHARDS,
            parity_shards: PARITY_SHARDS,
            store: store.display().to_string(),
            small_records: args.small_records,
            small_rate: args.small_rate,
            small_tags: SMALL_TAGS,
            latency_seconds: args.latency_secs,
            latency_rate: args.latency_rate,
            lag_journal_max_bytes: parse_bytes(&args.lag_journal).context("--lag-journal")?,
            lag_bytes: lag_bytes(parse_bytes(&args.lag_journal)?),
            service_link_rate: args.service_link_rate.clone(),
            service_rate: args.service_rate,
            mqtt_payload_bytes: args.mqtt_payload as u64,
            mqtt_window: args.mqtt_window,
        },
        rss_bound_mib: RSS_BOUND_MIB,
        rss_within_bound: true,
        groups: select_groups(args.only.as_deref(), args.skip.as_deref())?,
        ..Report::default()
    };
    println!(
        "weir-bench at {} on {} ({} cores), {}: spool and journal on disk under {}, frames authenticated, MTU {MTU}, RS {DATA_SHARDS}+{PARITY_SHARDS}, sender [link] rate {}, net.core.rmem_max = {}",
        report.machine.commit.as_deref().unwrap_or("(no git)"),
        report.machine.cpu_model,
        report.machine.nproc,
        report.machine.date,
        store.display(),
        args.rate,
        rmem_max.map_or("unknown".into(), |v| v.to_string()),
    );

    if report.ran("core") {
        report.udp_ceiling = udp_ceiling(&args.bytes)?;
        let ceil = Ceilings {
            gso: report.udp_ceiling.gso_mb_s,
            plain: report.udp_ceiling.plain_mb_s,
        };
        let (bulk, bulk_runs) = bulk_variant(
            &args,
            &mut report,
            &format!(
                "{} MiB, spool and journal on disk, authenticated",
                bulk_bytes >> 20
            ),
            &store,
            true,
            ceil,
        )?;
        (report.bulk, report.bulk_runs) = (bulk, bulk_runs);
        if args.compare {
            let tmpfs = PathBuf::from("/dev/shm/weir-bench");
            let (bulk_tmpfs, _) = bulk_variant(
                &args,
                &mut report,
                "spool and journal on tmpfs (/dev/shm), authenticated",
                &tmpfs,
                true,
                ceil,
            )?;
            let (bulk_auth_disabled, _) = bulk_variant(
                &args,
                &mut report,
                "on disk, [auth] disabled = true",
                &store,
                false,
                ceil,
            )?;
            report.comparisons = Some(Comparisons {
                bulk_tmpfs,
                bulk_auth_disabled,
            });
        }
        report.small_records_file = small_variant(&args, &mut report, "file", small_file_run)?;
        report.small_records_tcp = small_variant(&args, &mut report, "tcp", small_tcp_run)?;
        report.latency = latency_run(&args, &mut report)?;
        report.lagging_sink = lagging_run(&args, &mut report)?;
        let _ = std::fs::remove_dir_all(&store);
    }
    let mut failed: Vec<String> = Vec::new();
    if report.ran("mqtt") {
        report.mqtt = mqtt_rows(&args, &mut report, &mut failed);
    }
    if SERVICES.iter().any(|g| report.ran(g)) {
        report.services = service_rows(&args, &mut report, &mut failed);
    }
    if report.ran("files") {
        report.files_large = Some(files_row(&args, &mut report, true, &mut failed));
        report.files_small = Some(files_row(&args, &mut report, false, &mut failed));
    }

    println!(
        "\nweir-bench, {} ({}), {} on {} cores; groups {}; core rows: medians of {} runs; mqtt, service and files rows: one run each:\n",
        report.machine.date,
        report.machine.commit.as_deref().unwrap_or("no git"),
        report.machine.cpu_model,
        report.machine.nproc,
        report.groups.join(","),
        args.runs
    );
    print!("{}", report.markdown_table());
    if let Some(c) = &report.comparisons {
        let (b, t, n) = (&report.bulk, &c.bulk_tmpfs, &c.bulk_auth_disabled);
        println!(
            "\ndisk / tmpfs goodput {:.2}; authentication on / off goodput {:.2}, CPU s/GB sender {:.2} vs {:.2}, receiver {:.2} vs {:.2}",
            b.goodput_mb_s / t.goodput_mb_s,
            b.goodput_mb_s / n.goodput_mb_s,
            b.sender_cpu_s_per_gb,
            n.sender_cpu_s_per_gb,
            b.receiver_cpu_s_per_gb,
            n.receiver_cpu_s_per_gb,
        );
    }
    let path = args.dir.join("bench.json");
    let mut json = serde_json::to_value(&report)?;
    if !report.ran("core") {
        for key in CORE_KEYS {
            json[key] = Value::Null;
        }
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nthe same as JSON: {}", path.display());
    if !failed.is_empty() {
        bail!("{} row(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_run_is_the_middle_one_by_its_key() {
        let runs = [3.0, 1.0, 2.0];
        assert_eq!(median_by(&runs, |v| *v), Some(2.0));
        assert_eq!(median_by(&[1.0, 4.0], |v| *v), Some(4.0));
        assert_eq!(median_by::<f64>(&[], |v| *v), None);
    }

    #[test]
    fn a_ratio_to_an_unmeasured_ceiling_is_not_a_number() {
        assert_eq!(ratio(50.0, 200.0), 0.25);
        assert!(ratio(50.0, 0.0).is_nan());
    }
}
