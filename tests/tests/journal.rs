//! The receiver's disk journal end to end: kill -9 of the receiver, a tcp
//! sink server that goes away (and one away longer than the journal can
//! hold), a torn journal tail, and a record a sink rejects for good.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Journal entries read per catch-up batch (receiver/src/pipeline.rs): the
/// largest batch a sink can have in flight.
const CATCH_UP_BATCH: usize = 4096;

/// Receiver config: listen port, audit, journal (`journal` adds keys to
/// `[journal]`), metrics inside the scratch directory, then `sinks`.
fn receiver_config(s: &Scratch, listen_port: u16, journal: &str, sinks: &str) -> PathBuf {
    let d = s.path.display();
    let auth = receiver_auth(s);
    s.write(
        "receiver.toml",
        &format!(
            "{auth}[link]\nlisten = \"127.0.0.1:{listen_port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n\
             [journal]\npath = \"{d}/state\"\n{journal}\n[metrics]\npath = \"{d}/receiver-metrics.json\"\n\
             log_interval_s = 1\n{sinks}"
        ),
    )
}

fn file_sink(name: &str, out: &Path, extra: &str) -> String {
    format!(
        "[[sinks]]\nname = \"{name}\"\ntype = \"file\"\ndir = \"{}\"\n{extra}\n",
        out.display()
    )
}

fn tcp_sink(name: &str, port: u16) -> String {
    format!("[[sinks]]\nname = \"{name}\"\ntype = \"tcp\"\nconnect = \"127.0.0.1:{port}\"\n")
}

/// Sender config: straight to the receiver's port, spool and metrics
/// inside the scratch directory, then `sources`.
fn sender_config(s: &Scratch, dest_port: u16, sources: &str) -> PathBuf {
    let d = s.path.display();
    let auth = sender_auth(s);
    s.write(
        "sender.toml",
        &format!(
            "{auth}[link]\ndestination = \"127.0.0.1:{dest_port}\"\nrate = \"200Mbit\"\n\
             [metrics]\npath = \"{d}/sender-metrics.json\"\nlog_interval_s = 1\n\
             [spool]\npath = \"{d}/spool\"\n{sources}"
        ),
    )
}

fn generator(name: &str, rate: u64, count: u64) -> String {
    format!(
        "[[sources]]\nname = \"{name}\"\ntype = \"generator\"\ntags = 100\nrate = {rate}\ncount = {count}\n"
    )
}

fn run_receiver(s: &Scratch, log: &str, cfg: &Path) -> Proc {
    Proc::spawn(
        s,
        log,
        "weir-receiver",
        &["run", "--config", cfg.to_str().unwrap()],
    )
}

fn run_sender(s: &Scratch, cfg: &Path) -> Proc {
    Proc::spawn(
        s,
        "sender",
        "weir-sender",
        &["run", "--config", cfg.to_str().unwrap()],
    )
}

fn metric(metrics: &Path, key: &str) -> Option<u64> {
    read_json(metrics)[key].as_u64()
}

/// Waits until the receiver's `records` counter has not moved for
/// `quiet`, at most `limit`; returns the last value.
fn wait_for_receiver_quiet(metrics: &Path, quiet: Duration, limit: Duration) -> u64 {
    let start = Instant::now();
    let mut last = metric(metrics, "records").unwrap_or(0);
    let mut since = Instant::now();
    while start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(250));
        let now = metric(metrics, "records").unwrap_or(0);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    last
}

/// The file sink's JSON Lines files of a stream, in number order.
fn stream_files(out: &Path, stem: &str) -> Vec<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name
                .strip_prefix(stem)?
                .strip_prefix('.')?
                .strip_suffix(".jsonl")?
                .parse::<u64>()
                .ok()?;
            Some((n, e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// Every JSON line the file sink wrote for a stream, in write order.
fn lines_of(out: &Path, stem: &str) -> Vec<Value> {
    stream_files(out, stem)
        .iter()
        .flat_map(|p| json_lines(p))
        .collect()
}

fn seqs_of(out: &Path, stem: &str) -> Vec<u64> {
    lines_of(out, stem)
        .iter()
        .map(|v| v["seq"].as_u64().expect("seq"))
        .collect()
}

fn covered(ranges: &[(u64, u64, String)]) -> BTreeSet<u64> {
    ranges.iter().flat_map(|(f, t, _)| *f..=*t).collect()
}

/// Lines a test TCP server received, shared across its restarts.
#[derive(Clone, Default)]
struct Collected {
    lines: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl Collected {
    /// The `seq` of every line, in arrival order.
    fn seqs(&self) -> Vec<u64> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("the server received a bad JSON line: {e}: {l}"))
                    ["seq"]
                    .as_u64()
                    .expect("seq")
            })
            .collect()
    }

    fn unique(&self) -> BTreeSet<u64> {
        self.seqs().into_iter().collect()
    }

    fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

/// A line-collecting TCP server on a fixed port. Stopping it closes the
/// listener and every connection (what it had not read is lost, as when a
/// real server goes away).
struct LineServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LineServer {
    fn start(port: u16, into: &Collected) -> LineServer {
        let mut listener = None;
        let bound = wait_until(Duration::from_secs(10), || {
            listener = TcpListener::bind(("127.0.0.1", port)).ok();
            listener.is_some()
        });
        assert!(bound, "cannot bind the test server to 127.0.0.1:{port}");
        let listener = listener.unwrap();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, into) = (stop.clone(), into.clone());
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            into.connections.fetch_add(1, Ordering::Relaxed);
                            let (stop, lines) = (stop.clone(), into.lines.clone());
                            conns.push(std::thread::spawn(move || {
                                read_lines(stream, &stop, &lines)
                            }));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                drop(listener);
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        LineServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads whole lines into `lines` until the peer closes or `stop` is set;
/// then drops the connection (an unfinished line is not counted).
fn read_lines(mut stream: TcpStream, stop: &AtomicBool, lines: &Mutex<Vec<String>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 << 10];
    let mut pending: Vec<u8> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                if let Some(last) = pending.iter().rposition(|b| *b == b'\n') {
                    let done: Vec<u8> = pending.drain(..=last).collect();
                    let text = String::from_utf8(done).expect("UTF-8 lines");
                    lines
                        .lock()
                        .unwrap()
                        .extend(text.lines().map(str::to_string));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
}

/// Runs of consecutive sequence numbers that arrived more than once.
fn duplicate_runs(seqs: &[u64]) -> (usize, Vec<(u64, u64)>) {
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for s in seqs {
        *count.entry(*s).or_default() += 1;
    }
    let dupes: Vec<u64> = count
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(s, _)| *s)
        .collect();
    let extra = count.values().map(|c| c - 1).sum();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for s in dupes {
        match runs.last_mut() {
            Some(r) if r.1 + 1 == s => r.1 = s,
            _ => runs.push((s, s)),
        }
    }
    (extra, runs)
}

/// Ranges `(from, to)` of `0..total` not in `have`.
fn missing_ranges(have: &BTreeSet<u64>, total: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for s in (0..total).filter(|s| !have.contains(s)) {
        match runs.last_mut() {
            Some(r) if r.1 + 1 == s => r.1 = s,
            _ => runs.push((s, s)),
        }
    }
    runs
}

/// Waits until `done()`, or until the sink has confirmed everything the
/// journal holds and the server got nothing new for `quiet` (nothing more
/// is coming), at most `limit`.
fn wait_for_sink(
    metrics: &Path,
    sink: &str,
    got: &Collected,
    quiet: Duration,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) {
    let start = Instant::now();
    let mut last = got.len();
    let mut since = Instant::now();
    while start.elapsed() < limit && !done() {
        std::thread::sleep(Duration::from_millis(250));
        let now = got.len();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet
            && metric(metrics, &format!("sink.{sink}.behind")) == Some(0)
        {
            return;
        }
    }
}

#[test]
fn kill_9_of_the_receiver_mid_run_writes_nothing_twice_and_loses_nothing_silently() {
    let s = Scratch::new("journal-kill9");
    let port = free_udp_port();
    let out = s.join("out");
    let rcfg = receiver_config(&s, port, "", &file_sink("files", &out, ""));
    let mut receiver = run_receiver(&s, "receiver-1", &rcfg);
    let total = 150_000u64;
    let scfg = sender_config(&s, port, &generator("gen", 30_000, total));
    let mut sender = run_sender(&s, &scfg);
    std::thread::sleep(Duration::from_secs(2));
    assert!(receiver.is_running(), "the receiver died on its own");
    receiver.signal("KILL");
    assert!(
        wait_until(Duration::from_secs(5), || !receiver.is_running()),
        "kill -9 did not end the receiver"
    );
    let before = seqs_of(&out, "gen").len();
    assert!(
        before > 10_000,
        "about 2 s of records written before the kill: {before}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut receiver = run_receiver(&s, "receiver-2", &rcfg);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let metrics = s.join("receiver-metrics.json");
    wait_for_receiver_quiet(
        &metrics,
        Duration::from_millis(1500),
        Duration::from_secs(20),
    );
    assert!(
        receiver.is_running(),
        "the restarted receiver died: {}",
        log_text(&s, "receiver-2")
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the restarted receiver did not stop cleanly on SIGTERM"
    );

    let written = seqs_of(&out, "gen");
    let g = gaps(&s.join("audit.jsonl"), "gen");
    eprintln!(
        "written {} (before the kill {before}), gaps {g:?}",
        written.len()
    );
    let dupes = written.len() - written.iter().collect::<BTreeSet<_>>().len();
    assert!(
        written.windows(2).all(|w| w[0] < w[1]),
        "the file holds {dupes} records twice or out of order after kill -9 and restart"
    );
    assert!(
        g.iter().all(|x| x.2 == "receiver-down"),
        "the only gaps are records sent while the receiver was down: {g:?}"
    );
    assert!(
        written.len() as u64 > total / 2,
        "most records were written: {}",
        written.len()
    );
    assert_exactly_accounted(&written, &g, total);
}

#[test]
fn a_tcp_sink_server_away_for_30_s_loses_nothing_once_it_returns() {
    let s = Scratch::new("journal-tcp30");
    let port = free_udp_port();
    let server_port = free_tcp_port();
    let got = Collected::default();
    let server = LineServer::start(server_port, &got);
    let rcfg = receiver_config(&s, port, "", &tcp_sink("replay", server_port));
    let mut receiver = run_receiver(&s, "receiver", &rcfg);
    let total = 60_000u64;
    let scfg = sender_config(&s, port, &generator("gen", 2_000, total));
    let mut sender = run_sender(&s, &scfg);
    std::thread::sleep(Duration::from_secs(3));
    let before = got.len();
    assert!(
        before > 2_000,
        "the server received about 3 s of records before it went away: {before}"
    );
    drop(server);
    let at_stop = got.len();
    std::thread::sleep(Duration::from_secs(30));
    assert_eq!(
        got.len(),
        at_stop,
        "nothing is received while the server is away"
    );
    let _server = LineServer::start(server_port, &got);
    assert!(
        sender.wait(Duration::from_secs(30)),
        "the sender did not finish its count and exit cleanly"
    );
    let metrics = s.join("receiver-metrics.json");
    wait_for_sink(
        &metrics,
        "replay",
        &got,
        Duration::from_secs(3),
        Duration::from_secs(60),
        || got.unique().len() as u64 >= total,
    );
    assert!(
        receiver.is_running(),
        "the receiver died: {}",
        log_text(&s, "receiver")
    );
    let m = read_json(&metrics);
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "receiver did not stop cleanly"
    );

    let seqs = got.seqs();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    let reconnects = got.connections.load(Ordering::Relaxed).saturating_sub(1);
    let (extra, runs) = duplicate_runs(&seqs);
    let missing = missing_ranges(&unique, total);
    eprintln!(
        "received {} lines ({} distinct) over {} connections: {extra} duplicates in {} runs {:?}; \
         missing {missing:?}; sink metrics: retries {} errors {}",
        seqs.len(),
        unique.len(),
        reconnects + 1,
        runs.len(),
        runs.iter().take(10).collect::<Vec<_>>(),
        m["sink.replay.retries"],
        m["sink.replay.errors"],
    );
    assert!(
        missing.is_empty(),
        "records the tcp sink never delivered after the server came back \
         ({} records in {} ranges, first 10 {:?}; at_stop {at_stop} lines)",
        missing.iter().map(|r| r.1 - r.0 + 1).sum::<u64>(),
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
    assert!(unique.iter().all(|x| *x < total), "a seq beyond the count");
    assert!(
        runs.len() <= reconnects,
        "duplicates come from at most one batch in flight per reconnect: \
         {} duplicate runs over {reconnects} reconnects: {runs:?}",
        runs.len()
    );
    assert!(
        runs.iter()
            .all(|r| (r.1 - r.0 + 1) as usize <= CATCH_UP_BATCH),
        "a duplicate run longer than one batch: {runs:?}"
    );
    let g = gaps(&s.join("audit.jsonl"), "gen");
    assert!(g.is_empty(), "no gaps in the audit log: {g:?}");
}

#[test]
fn a_journal_too_small_for_the_outage_records_the_overflow_exactly_as_gaps() {
    let s = Scratch::new("journal-overflow");
    let port = free_udp_port();
    let server_port = free_tcp_port();
    let got = Collected::default();
    let server = LineServer::start(server_port, &got);
    let rcfg = receiver_config(
        &s,
        port,
        "max_bytes = \"1MiB\"\nfsync_bytes = \"64KiB\"",
        &tcp_sink("replay", server_port),
    );
    let mut receiver = run_receiver(&s, "receiver", &rcfg);
    let total = 300_000u64;
    let scfg = sender_config(&s, port, &generator("gen", 20_000, total));
    let mut sender = run_sender(&s, &scfg);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        got.len() > 20_000,
        "the server received about 3 s of records before it went away: {}",
        got.len()
    );
    drop(server);
    std::thread::sleep(Duration::from_secs(10));
    let _server = LineServer::start(server_port, &got);
    assert!(
        sender.wait(Duration::from_secs(30)),
        "the sender did not finish its count and exit cleanly"
    );
    let metrics = s.join("receiver-metrics.json");
    let audit = s.join("audit.jsonl");
    wait_for_sink(
        &metrics,
        "replay",
        &got,
        Duration::from_secs(3),
        Duration::from_secs(60),
        || {
            let mut all = got.unique();
            all.extend(covered(&gaps(&audit, "gen")));
            all.len() as u64 >= total
        },
    );
    assert!(
        receiver.is_running(),
        "the receiver died: {}",
        log_text(&s, "receiver")
    );
    let live = read_json(&metrics);
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "receiver did not stop cleanly"
    );

    let seqs = got.seqs();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    let all_gaps = gaps(&audit, "gen");
    let overflow: Vec<(u64, u64, String)> = all_gaps
        .iter()
        .filter(|g| g.2 == "sink-overflow:replay")
        .cloned()
        .collect();
    let dropped = covered(&overflow);
    let (extra, runs) = duplicate_runs(&seqs);
    let both: Vec<u64> = unique.intersection(&dropped).take(10).copied().collect();
    let mut accounted = unique.clone();
    accounted.extend(dropped.iter().copied());
    let missing = missing_ranges(&accounted, total);
    let last = read_json(&metrics);
    eprintln!(
        "received {} lines ({} distinct, {extra} duplicates in {} runs) over {} connections; \
         {} overflow gaps of {} records; missing {:?}; sink.replay.records {} (live) {} (final); \
         overflow_records {} (live) {} (final)",
        seqs.len(),
        unique.len(),
        runs.len(),
        got.connections.load(Ordering::Relaxed),
        overflow.len(),
        dropped.len(),
        missing.iter().take(10).collect::<Vec<_>>(),
        live["sink.replay.records"],
        last["sink.replay.records"],
        live["sink.replay.overflow_records"],
        last["sink.replay.overflow_records"],
    );
    // Every property is checked; the test fails once, naming all that broke.
    let mut problems: Vec<String> = Vec::new();
    if all_gaps.len() != overflow.len() {
        problems.push(format!(
            "gaps other than sink-overflow:replay: {all_gaps:?}"
        ));
    }
    if overflow.is_empty() {
        problems.push(
            "no sink-overflow gap: a 1 MiB journal did not overflow during a 10 s outage \
             at 20000 records/s"
                .into(),
        );
    }
    if !both.is_empty() {
        problems.push(format!(
            "records both delivered and reported dropped by the overflow (first 10): {both:?}"
        ));
    }
    if !missing.is_empty() {
        problems.push(format!(
            "records neither delivered nor in an overflow gap ({} records in {} ranges, first 10 {:?})",
            missing.iter().map(|r| r.1 - r.0 + 1).sum::<u64>(),
            missing.len(),
            missing.iter().take(10).collect::<Vec<_>>()
        ));
    }
    if unique.iter().any(|x| *x >= total) {
        problems.push("the server received a seq beyond the count".into());
    }
    if overflow.iter().map(|g| g.1 - g.0 + 1).sum::<u64>() != dropped.len() as u64 {
        problems.push(format!("overflow gaps overlap: {overflow:?}"));
    }
    for (when, m) in [("while running", &live), ("after the stop", &last)] {
        if m["sink.replay.overflow_records"].as_u64() != Some(dropped.len() as u64) {
            problems.push(format!(
                "metrics {when}: sink.replay.overflow_records is {}, the overflow gaps name {} records",
                m["sink.replay.overflow_records"],
                dropped.len()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Entries in a journal's segments (whole ones) and the newest segment.
fn journal_entries(state: &Path) -> (u64, Option<PathBuf>) {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(state.join("segments"))
        .expect("journal segments dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    let mut n = 0u64;
    let mut buf = Vec::new();
    for p in &segs {
        let mut r = std::io::BufReader::new(std::fs::File::open(p).unwrap());
        std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(weir_store::HEADER_LEN)).unwrap();
        while let Ok(weir_store::frame::ReadOutcome::Entry) =
            weir_store::frame::read_entry(&mut r, &mut buf)
        {
            n += 1;
        }
    }
    let first = segs
        .first()
        .and_then(|p| p.file_stem()?.to_str()?.parse::<u64>().ok())
        .unwrap_or(0);
    (first + n, segs.last().cloned())
}

#[test]
fn a_torn_journal_tail_is_repaired_on_start() {
    let s = Scratch::new("journal-torn");
    let port = free_udp_port();
    let out = s.join("out");
    let rcfg = receiver_config(&s, port, "", &file_sink("files", &out, ""));
    let mut receiver = run_receiver(&s, "receiver-1", &rcfg);
    let total = 150_000u64;
    let scfg = sender_config(&s, port, &generator("gen", 30_000, total));
    let mut sender = run_sender(&s, &scfg);
    std::thread::sleep(Duration::from_secs(2));
    assert!(receiver.is_running(), "the receiver died on its own");
    receiver.signal("KILL");
    assert!(
        wait_until(Duration::from_secs(5), || !receiver.is_running()),
        "kill -9 did not end the receiver"
    );
    let state = s.join("state");
    let (entries, newest) = journal_entries(&state);
    let newest = newest.expect("journal segments exist");
    let len = std::fs::metadata(&newest).unwrap().len();
    assert!(len > 1000, "the newest segment holds records: {len} bytes");
    // 5 bytes: less than one entry (~60 bytes), so only the last is torn.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let cursor = read_json(&state.join("sinks/files.json"));
    eprintln!(
        "journal held {entries} entries; the file sink's saved cursor is at {} \
         (the torn entry is index {}); {} lines written",
        cursor["index"],
        entries - 1,
        seqs_of(&out, "gen").len()
    );
    std::thread::sleep(Duration::from_millis(1000));
    let mut receiver = run_receiver(&s, "receiver-2", &rcfg);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let metrics = s.join("receiver-metrics.json");
    wait_for_receiver_quiet(
        &metrics,
        Duration::from_millis(1500),
        Duration::from_secs(20),
    );
    let log = log_text(&s, "receiver-2");
    assert!(
        receiver.is_running(),
        "the restarted receiver did not run on after the repair: {log}"
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the restarted receiver did not stop cleanly"
    );
    assert!(
        log.contains("torn tail"),
        "the restarted receiver logs the torn tail it truncated"
    );
    let written = seqs_of(&out, "gen");
    let g = gaps(&s.join("audit.jsonl"), "gen");
    eprintln!("written {}, gaps {g:?}", written.len());
    assert!(
        written.len() as u64 > total / 2,
        "most records were written: {}",
        written.len()
    );
    assert_exactly_accounted(&written, &g, total);
}

/// Start offsets of the whole entries in a journal segment.
fn entry_offsets(seg: &Path) -> Vec<u64> {
    let mut r = std::io::BufReader::new(std::fs::File::open(seg).unwrap());
    // Entries start after the segment's format header.
    std::io::Seek::seek(&mut r, std::io::SeekFrom::Start(weir_store::HEADER_LEN)).unwrap();
    let (mut at, mut offsets, mut buf) = (weir_store::HEADER_LEN, Vec::new(), Vec::new());
    while let Ok(weir_store::frame::ReadOutcome::Entry) =
        weir_store::frame::read_entry(&mut r, &mut buf)
    {
        offsets.push(at);
        at += (weir_store::frame::ENTRY_HEADER + buf.len()) as u64;
    }
    offsets
}

/// Beyond the brief's list: the torn-tail case `a_torn_journal_tail_is_repaired_on_start`
/// reaches only by luck (a kill -9 mid-flow almost always tears an entry the file
/// sink had not confirmed yet). Here the sender is paused so the sink confirms
/// and saves its cursor past the last entry, then the last 4 entries are torn.
#[test]
fn a_torn_journal_tail_a_sink_had_already_written_loses_nothing_silently() {
    let s = Scratch::new("journal-torn-confirmed");
    let port = free_udp_port();
    let out = s.join("out");
    let rcfg = receiver_config(&s, port, "", &file_sink("files", &out, ""));
    let mut receiver = run_receiver(&s, "receiver-1", &rcfg);
    let total = 150_000u64;
    let scfg = sender_config(&s, port, &generator("gen", 30_000, total));
    let mut sender = run_sender(&s, &scfg);
    std::thread::sleep(Duration::from_secs(2));
    sender.signal("STOP");
    // Everything the sender sent is decoded and journaled...
    wait_for_receiver_quiet(
        &s.join("receiver-metrics.json"),
        Duration::from_secs(1),
        Duration::from_secs(10),
    );
    // ...and the file sink has written, confirmed and saved all of it.
    let state = s.join("state");
    let confirmed = wait_until(Duration::from_secs(10), || {
        let (entries, _) = journal_entries(&state);
        entries > 0 && read_json(&state.join("sinks/files.json"))["index"].as_u64() == Some(entries)
    });
    assert!(
        confirmed,
        "the file sink confirmed the whole journal while the sender was paused"
    );
    receiver.signal("KILL");
    assert!(
        wait_until(Duration::from_secs(5), || !receiver.is_running()),
        "kill -9 did not end the receiver"
    );
    let (entries, newest) = journal_entries(&state);
    let newest = newest.expect("journal segments exist");
    let offsets = entry_offsets(&newest);
    assert!(offsets.len() > 10, "the newest segment holds entries");
    let before = seqs_of(&out, "gen");
    assert_eq!(
        before.len() as u64,
        entries,
        "every journaled record is in the file before the kill"
    );
    // Cut into the 4th entry from the end: 4 entries the sink wrote are gone.
    let seg_len = std::fs::metadata(&newest).unwrap().len();
    let cut_at = offsets[offsets.len() - 4] + 3;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(cut_at)
        .unwrap();
    let torn: Vec<u64> = before[before.len() - 4..].to_vec();
    eprintln!(
        "journal: {entries} entries, newest segment {} with {} entries, {} bytes, cut to {cut_at}; \
         sink cursor {}",
        newest.display(),
        offsets.len(),
        seg_len,
        read_json(&state.join("sinks/files.json"))["index"]
    );
    let mut receiver = run_receiver(&s, "receiver-2", &rcfg);
    std::thread::sleep(Duration::from_millis(1000));
    sender.signal("CONT");
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let metrics = s.join("receiver-metrics.json");
    wait_for_receiver_quiet(
        &metrics,
        Duration::from_millis(1500),
        Duration::from_secs(20),
    );
    let log = log_text(&s, "receiver-2");
    assert!(
        receiver.is_running(),
        "the restarted receiver did not run on after the repair: {log}"
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the restarted receiver did not stop cleanly"
    );
    assert!(
        log.contains("torn tail"),
        "the restarted receiver logs the torn tail"
    );

    let written = seqs_of(&out, "gen");
    let g = gaps(&s.join("audit.jsonl"), "gen");
    let have: BTreeSet<u64> = written.iter().copied().collect();
    let in_gaps = covered(&g);
    let silent: Vec<u64> = (0..total)
        .filter(|x| !have.contains(x) && !in_gaps.contains(x))
        .take(20)
        .collect();
    let both: Vec<u64> = have.intersection(&in_gaps).take(20).copied().collect();
    eprintln!(
        "torn records (written before the kill) {torn:?}; written {}; gaps {g:?}",
        written.len()
    );
    let mut problems: Vec<String> = Vec::new();
    if !written.windows(2).all(|w| w[0] < w[1]) {
        problems.push("records written out of order or twice".into());
    }
    if !silent.is_empty() {
        problems.push(format!(
            "records neither written nor in a gap, lost silently (first 20): {silent:?}"
        ));
    }
    if !both.is_empty() {
        problems.push(format!(
            "records the sink wrote are also reported lost in the audit log (first 20): {both:?}"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A child with piped stdin, killed when dropped.
struct Piped(Child);

impl Drop for Piped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_record_the_sink_rejects_goes_to_the_dead_letter_file_and_delivery_continues() {
    let s = Scratch::new("journal-deadletter");
    let port = free_udp_port();
    let out = s.join("out");
    let rcfg = receiver_config(
        &s,
        port,
        "",
        &file_sink("files", &out, "max_line_bytes = \"1KiB\""),
    );
    let mut receiver = run_receiver(&s, "receiver", &rcfg);
    let scfg = sender_config(
        &s,
        port,
        "[[sources]]\nname = \"lines\"\ntype = \"stdin\"\nmode = \"lines\"\n",
    );
    let text: Vec<String> = (0..100)
        .map(|i| {
            let head = format!("line {i:03} ");
            if i == 49 {
                format!("{head}{}", "x".repeat(5000 - head.len()))
            } else {
                format!("{head}hello")
            }
        })
        .collect();
    assert_eq!(text[49].len(), 5000);
    let log = std::fs::File::create(s.join("sender.log")).unwrap();
    let mut sender = Piped(
        Command::new(bin("weir-sender"))
            .args(["run", "--config", scfg.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting weir-sender"),
    );
    {
        let mut stdin = sender.0.stdin.take().expect("piped stdin");
        for line in &text {
            stdin.write_all(line.as_bytes()).unwrap();
            stdin.write_all(b"\n").unwrap();
        }
    } // stdin closed: the source reaches its end
    let exited = wait_until(Duration::from_secs(30), || {
        matches!(sender.0.try_wait(), Ok(Some(_)))
    });
    assert!(exited, "the sender did not exit after its stdin closed");
    assert!(
        sender.0.wait().unwrap().success(),
        "the sender failed: {}",
        log_text(&s, "sender")
    );
    let metrics = s.join("receiver-metrics.json");
    wait_until(Duration::from_secs(10), || {
        metric(&metrics, "sink.files.records") == Some(99)
            && metric(&metrics, "sink.files.dead_letters") == Some(1)
    });
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "receiver did not stop cleanly"
    );

    let lines = lines_of(&out, "lines");
    let seqs: Vec<u64> = lines.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (0..100).filter(|i| *i != 49).collect();
    assert_eq!(seqs, expected, "the other 99 records, in order");
    for (v, i) in lines.iter().zip(&expected) {
        assert_eq!(
            v["payload"].as_str(),
            Some(base64(text[*i as usize].as_bytes()).as_str()),
            "record {i} carries its line"
        );
    }
    let dead = json_lines(&s.join("state/dead-letter/files.jsonl"));
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    let d = &dead[0];
    assert!(
        d["reason"]
            .as_str()
            .is_some_and(|r| r.contains("max_line_bytes")),
        "the dead letter names the reason: {d}"
    );
    assert_eq!(d["record"]["seq"].as_u64(), Some(49), "{d}");
    assert_eq!(d["record"]["stream"].as_str(), Some("lines"), "{d}");
    assert_eq!(
        d["record"]["payload"].as_str(),
        Some(base64(text[49].as_bytes()).as_str()),
        "the dead letter holds the whole record"
    );
    let m = read_json(&metrics);
    assert_eq!(
        m["sink.files.dead_letters"].as_u64(),
        Some(1),
        "dead letters counted: {m}"
    );
    assert!(gaps(&s.join("audit.jsonl"), "lines").is_empty());
}
