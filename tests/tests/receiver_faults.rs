//! Receiver faults end to end: a thread's fatal error ends the process
//! (non-zero exit, an ERROR naming the thread), corrupt journal entries in
//! the middle of a segment become `journal-corrupt` gaps while delivery
//! goes on, compaction never passes a sink's saved cursor across repeated
//! `kill -9`, and `check-config` refuses two file sinks in one `dir`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The receiver's and the sender's configurations, written by hand in one
/// place. The receiver: listen port, audit log, journal (`journal` adds
/// keys to `[journal]`) and metrics in the scratch directory, then `sinks`.
/// The sender: straight to the receiver's port, spool and metrics in the
/// scratch directory, then `sources`.
struct Configs;

impl Configs {
    fn receiver(s: &Scratch, listen_port: u16, journal: &str, sinks: &str) -> PathBuf {
        let d = s.path.display();
        s.write(
            "receiver.toml",
            &format!(
                "{auth}[link]\nlisten = \"127.0.0.1:{listen_port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n\
                 [journal]\npath = \"{d}/state\"\n{journal}\n[metrics]\npath = \"{d}/receiver-metrics.json\"\n\
                 log_interval_s = 1\n{sinks}",
                auth = receiver_auth(s)
            ),
        )
    }

    fn sender(s: &Scratch, dest_port: u16, sources: &str) -> PathBuf {
        let d = s.path.display();
        s.write(
            "sender.toml",
            &format!(
                "{auth}[link]\ndestination = \"127.0.0.1:{dest_port}\"\nrate = \"200Mbit\"\n\
                 [metrics]\npath = \"{d}/sender-metrics.json\"\nlog_interval_s = 1\n\
                 [spool]\npath = \"{d}/spool\"\n{sources}",
                auth = sender_auth(s)
            ),
        )
    }

    fn file_sink(name: &str, out: &Path) -> String {
        format!(
            "[[sinks]]\nname = \"{name}\"\ntype = \"file\"\ndir = \"{}\"\n",
            out.display()
        )
    }

    fn tcp_sink(name: &str, port: u16) -> String {
        format!("[[sinks]]\nname = \"{name}\"\ntype = \"tcp\"\nconnect = \"127.0.0.1:{port}\"\n")
    }

    fn generator(name: &str, rate: u64, count: u64) -> String {
        format!(
            "[[sources]]\nname = \"{name}\"\ntype = \"generator\"\ntags = 100\nrate = {rate}\ncount = {count}\n"
        )
    }
}

fn run(s: &Scratch, log: &str, program: &str, cfg: &Path) -> Proc {
    Proc::spawn(s, log, program, &["run", "--config", cfg.to_str().unwrap()])
}

fn metric(metrics: &Path, key: &str) -> Option<u64> {
    read_json(metrics)[key].as_u64()
}

/// The journal's segment files, oldest first.
fn segments(state: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(state.join("segments"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    segs
}

fn first_index(seg: &Path) -> u64 {
    seg.file_stem()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("segment files are named by their first index")
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

/// XORs bytes in place (the receiver keeps the file open).
fn damage(path: &Path, at: u64, len: usize) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut buf).unwrap();
    for b in &mut buf {
        *b ^= 0xa5;
    }
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
}

/// A TCP server collecting the `seq` of every JSON line it receives.
struct LineServer {
    seqs: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LineServer {
    fn start(port: u16) -> LineServer {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind the test server");
        listener.set_nonblocking(true).unwrap();
        let seqs = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seqs, stop) = (seqs.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (seqs, stop) = (seqs.clone(), stop.clone());
                            conns.push(std::thread::spawn(move || read_seqs(stream, &stop, &seqs)));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        LineServer {
            seqs,
            stop,
            thread: Some(thread),
        }
    }

    fn unique(&self) -> BTreeSet<u64> {
        self.seqs.lock().unwrap().iter().copied().collect()
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

fn read_seqs(mut stream: TcpStream, stop: &AtomicBool, seqs: &Mutex<Vec<u64>>) {
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
                    let mut got = seqs.lock().unwrap();
                    for line in String::from_utf8(done).expect("UTF-8").lines() {
                        let v: Value = serde_json::from_str(line).expect("a JSON line");
                        got.push(v["seq"].as_u64().expect("seq"));
                    }
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

/// Runs a sender until it has sent `total` records of `gen` and waits
/// until the receiver has journaled all of them.
fn send_all_and_wait(s: &Scratch, port: u16, rate: u64, total: u64) {
    let scfg = Configs::sender(s, port, &Configs::generator("gen", rate, total));
    let mut sender = run(s, "sender", "weir-sender", &scfg);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count: {}",
        log_text(s, "sender")
    );
    let metrics = s.join("receiver-metrics.json");
    assert!(
        wait_until(Duration::from_secs(20), || metric(&metrics, "records")
            == Some(total)),
        "the receiver journaled {:?} of {total} records",
        metric(&metrics, "records")
    );
}

#[test]
fn a_journal_segment_lost_under_a_lagging_sink_ends_the_receiver_with_an_error_naming_the_thread() {
    let s = Scratch::new("faults-fatal");
    let port = free_udp_port();
    let server_port = free_tcp_port();
    // 16 MiB journal: 2 MiB segments, so the backlog spans several.
    let rcfg = Configs::receiver(
        &s,
        port,
        "max_bytes = \"16MiB\"",
        &Configs::tcp_sink("replay", server_port),
    );
    let mut receiver = run(&s, "receiver", "weir-receiver", &rcfg);
    // No server yet: the sink retries, its queue fills, it falls behind.
    send_all_and_wait(&s, port, 30_000, 120_000);
    let state = s.join("state");
    let segs = segments(&state);
    assert!(segs.len() >= 3, "the backlog spans segments: {segs:?}");
    for seg in &segs[1..segs.len() - 1] {
        std::fs::remove_file(seg).unwrap();
    }
    let _server = LineServer::start(server_port);
    // The sink's retry backoff reaches 10 s (jittered to 15 s).
    let ended = wait_until(Duration::from_secs(60), || !receiver.is_running());
    let log = log_text(&s, "receiver");
    assert!(
        ended,
        "the receiver runs on, its sink silently stalled on a missing segment: {log}"
    );
    let status = receiver.child.wait().unwrap();
    assert!(!status.success(), "the exit status is non-zero: {status}");
    let error = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("weir-journal"))
        .unwrap_or_else(|| panic!("no ERROR line naming the thread: {log}"));
    assert!(
        error.contains("cannot read entries") && error.contains("replay"),
        "the ERROR line names the cause: {error}"
    );
}

#[test]
fn corrupt_journal_entries_mid_segment_become_journal_corrupt_gaps_and_the_rest_is_delivered() {
    let s = Scratch::new("faults-corrupt");
    let port = free_udp_port();
    let server_port = free_tcp_port();
    let rcfg = Configs::receiver(&s, port, "", &Configs::tcp_sink("replay", server_port));
    let mut receiver = run(&s, "receiver", "weir-receiver", &rcfg);
    let total = 20_000u64;
    send_all_and_wait(&s, port, 10_000, total);
    // The sink is behind (no server): damage two entries it has not been
    // given, one in its payload (the length still holds) and one in its
    // length (skipping by it leads nowhere).
    let seg = segments(&s.join("state")).pop().expect("a segment");
    assert_eq!(first_index(&seg), 0);
    let offsets = entry_offsets(&seg);
    assert_eq!(offsets.len() as u64, total, "one entry per record");
    damage(&seg, offsets[12_000] + 20, 4);
    damage(&seg, offsets[16_000] + 1, 2);
    let server = LineServer::start(server_port);
    let audit = s.join("audit.jsonl");
    let metrics = s.join("receiver-metrics.json");
    wait_until(Duration::from_secs(60), || {
        server.unique().len() as u64 >= total - 2
            && gaps(&audit, "gen").len() >= 2
            && metric(&metrics, "sink.replay.behind") == Some(0)
    });
    let log = log_text(&s, "receiver");
    assert!(receiver.is_running(), "the receiver died: {log}");
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop cleanly"
    );
    let got = server.unique();
    let missing: Vec<u64> = (0..total).filter(|x| !got.contains(x)).collect();
    let g = gaps(&audit, "gen");
    eprintln!("missing {missing:?}; gaps {g:?}");
    assert!(
        g.iter().all(|x| x.2 == "journal-corrupt"),
        "only journal-corrupt gaps: {g:?}"
    );
    let in_gaps: Vec<u64> = g.iter().flat_map(|(f, t, _)| *f..=*t).collect();
    assert_eq!(
        missing, in_gaps,
        "the records not delivered are exactly the journal-corrupt gaps"
    );
    assert_eq!(missing.len(), 2, "each damaged entry cost one record");
    let events = json_lines(&audit);
    let corrupt: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "journal-corrupt")
        .collect();
    assert_eq!(corrupt.len(), 2, "{corrupt:?}");
    assert!(corrupt.iter().all(|e| e["sinks"][0] == "replay"));
    assert_eq!(metric(&metrics, "journal_corrupt_entries"), Some(2));
    assert!(
        log.contains("ERROR") && log.contains("journal-corrupt"),
        "the corruption is logged as an ERROR"
    );
}

#[test]
fn repeated_kill_9_while_compaction_runs_never_drops_journal_entries_past_a_saved_cursor() {
    let s = Scratch::new("faults-compaction");
    let port = free_udp_port();
    let out = s.join("out");
    // 4 MiB journal: 512 KiB segments, one compacted about every 0.3 s.
    let rcfg = Configs::receiver(
        &s,
        port,
        "max_bytes = \"4MiB\"",
        &Configs::file_sink("files", &out),
    );
    let state = s.join("state");
    let total = 300_000u64;
    let scfg = Configs::sender(&s, port, &Configs::generator("gen", 30_000, total));
    let mut receiver = run(&s, "receiver-0", "weir-receiver", &rcfg);
    let mut sender = run(&s, "sender", "weir-sender", &scfg);
    let mut violations = Vec::new();
    let start = Instant::now();
    for round in 1..=8 {
        // Kill at varying points of the compaction and cursor-save cycles.
        std::thread::sleep(Duration::from_millis(700 + 97 * round));
        assert!(
            receiver.is_running(),
            "the receiver died on its own: {}",
            log_text(&s, &format!("receiver-{}", round - 1))
        );
        receiver.signal("KILL");
        assert!(wait_until(Duration::from_secs(5), || !receiver.is_running()));
        let first = segments(&state).first().map(|p| first_index(p));
        let saved = read_json(&state.join("sinks/files.json"))["index"].as_u64();
        if let (Some(first), Some(saved)) = (first, saved) {
            if first > saved {
                violations.push(format!(
                    "kill {round}: the journal starts at entry {first}, past the saved cursor {saved}"
                ));
            }
        }
        receiver = run(&s, &format!("receiver-{round}"), "weir-receiver", &rcfg);
    }
    eprintln!("8 kills in {:?}", start.elapsed());
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count"
    );
    let metrics = s.join("receiver-metrics.json");
    wait_until(Duration::from_secs(30), || {
        metric(&metrics, "sink.files.behind") == Some(0)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the last receiver did not stop cleanly"
    );
    let written = written_seqs(&out, "gen");
    let mut written_sorted = written.clone();
    written_sorted.sort_unstable();
    let g = gaps(&s.join("audit.jsonl"), "gen");
    eprintln!("written {}, gaps {g:?}", written.len());
    // A sink so slow that the journal overflowed may legitimately find the
    // journal past its cursor: those records are named as sink-overflow.
    let overflowed = g.iter().any(|x| x.2 == "sink-overflow:files");
    assert!(
        overflowed || violations.is_empty(),
        "{}",
        violations.join("\n")
    );
    assert!(
        g.iter()
            .all(|x| x.2 == "receiver-down" || x.2 == "sink-overflow:files"),
        "the only gaps are records sent while the receiver was down (or dropped \
         for a sink the 4 MiB journal could not wait for): {g:?}"
    );
    assert_exactly_accounted(&written_sorted, &g, total);
}

/// `SINK_QUEUE_BYTES` (receiver/src/pipeline.rs): a sink's queue holds at
/// most this plus the one batch that crosses it. A catch-up batch is at
/// most `CATCH_UP_BYTES` (1 MiB) plus one entry; a live batch is what one
/// fsync covers, `journal.fsync_bytes` (4 MiB by default) plus what the
/// last receive batch decoded (up to about 2 MiB): 8 MiB bounds either.
const SINK_QUEUE_BYTES: u64 = 64 << 20;
const LARGEST_BATCH: u64 = 8 << 20;

#[test]
fn a_lagging_sink_with_64_kib_records_holds_at_most_the_byte_bound_in_flight() {
    let s = Scratch::new("faults-bytes");
    let port = free_udp_port();
    let server_port = free_tcp_port();
    let rcfg = Configs::receiver(
        &s,
        port,
        "max_bytes = \"512MiB\"",
        &Configs::tcp_sink("replay", server_port),
    );
    let mut receiver = run(&s, "receiver", "weir-receiver", &rcfg);
    // 96 MiB of raw stdin: 1536 records of 64 KiB, while the server is down.
    let total: u64 = 96 << 20;
    let scfg = Configs::sender(
        &s,
        port,
        "[[sources]]\nname = \"blob\"\ntype = \"stdin\"\nmode = \"raw\"\n",
    );
    let log = std::fs::File::create(s.join("sender.log")).unwrap();
    let mut sender = Command::new(bin("weir-sender"))
        .args(["run", "--config", scfg.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting weir-sender");
    {
        let mut stdin = sender.stdin.take().unwrap();
        let block: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        for _ in 0..total >> 20 {
            stdin.write_all(&block).unwrap();
        }
    }
    let exited = wait_until(Duration::from_secs(60), || {
        matches!(sender.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = sender.kill();
    }
    assert!(
        exited,
        "the sender did not finish: {}",
        log_text(&s, "sender")
    );
    let metrics = s.join("receiver-metrics.json");
    assert!(
        // One record per 64 KiB chunk, and the empty one that marks the end.
        wait_until(Duration::from_secs(30), || metric(&metrics, "records")
            == Some((total >> 16) + 1)),
        "the receiver journaled {:?} records",
        metric(&metrics, "records")
    );
    let report = s.join("tcpsink.json");
    let mut server = Proc::spawn(
        &s,
        "tcpsink",
        "weir-tcpsink",
        &[
            "--listen",
            &format!("127.0.0.1:{server_port}"),
            "--expect-bytes",
            &total.to_string(),
            "--timeout",
            "90",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert!(
        server.wait(Duration::from_secs(100)),
        "the server did not get every byte: {}",
        log_text(&s, "tcpsink")
    );
    assert_eq!(read_json(&report)["bytes"].as_u64(), Some(total));
    let peak = wait_until(Duration::from_secs(5), || {
        metric(&metrics, "sink.replay.in_flight_bytes_peak").is_some()
    });
    assert!(peak, "the metrics show the in-flight peak");
    let peak = metric(&metrics, "sink.replay.in_flight_bytes_peak").unwrap();
    eprintln!("in-flight peak {peak} bytes");
    assert!(
        peak > 8 << 20,
        "the sink really lagged with large records: peak {peak} bytes"
    );
    assert!(
        peak <= SINK_QUEUE_BYTES + LARGEST_BATCH,
        "{peak} bytes in flight for one sink, over {} + one batch",
        SINK_QUEUE_BYTES
    );
    assert!(receiver.stop(Duration::from_secs(20)));
}

#[test]
fn check_config_refuses_two_file_sinks_in_one_dir_naming_both_and_the_dir() {
    let s = Scratch::new("faults-shared-dir");
    let out = s.join("out");
    let sinks = format!(
        "{}{}",
        Configs::file_sink("files", &out),
        Configs::file_sink("archive", &s.join("./out/"))
    );
    let cfg = Configs::receiver(&s, free_udp_port(), "", &sinks);
    let result = Command::new(bin("weir-receiver"))
        .args(["check-config", "--config", cfg.to_str().unwrap()])
        .output()
        .expect("running weir-receiver check-config");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        !result.status.success(),
        "check-config accepted it: {stderr}"
    );
    for part in ["files", "archive", out.to_str().unwrap()] {
        assert!(stderr.contains(part), "the error names {part}: {stderr}");
    }
}
