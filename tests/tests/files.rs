//! Files across the diode: `files` source → weir-linksim → `files` sink,
//! with the real binaries over loopback.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::*;
use rand::RngCore;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

fn linksim(s: &Scratch, name: &str, from: u16, to: u16, seed: u64, loss: f64, burst: bool) -> Proc {
    let (start, len) = if burst { ("0.0005", "10") } else { ("0", "0") };
    Linksim::new(s, from, to, seed, loss)
        .name(name)
        .bursts(start, len)
        .stats_file()
        .spawn()
}

fn receiver_config(s: &Scratch, port: u16, inbox: &Path) -> PathBuf {
    let d = s.path.display();
    s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:{port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/journal\"\n\
             [metrics]\npath = \"{d}/receiver-metrics.json\"\nlog_interval_s = 1\n\
             [[sinks]]\nname = \"inbox\"\ntype = \"files\"\ndir = \"{}\"\n",
            receiver_auth(s),
            inbox.display()
        ),
    )
}

fn sender_config(s: &Scratch, port: u16, rate: &str, extra: &str, source: &str) -> PathBuf {
    let d = s.path.display();
    s.write(
        "sender.toml",
        &format!(
            "{}[link]\ndestination = \"127.0.0.1:{port}\"\nrate = \"{rate}\"\n[metrics]\npath = \"{d}/sender-metrics.json\"\nlog_interval_s = 1\n\
             [spool]\npath = \"{d}/spool\"\n{extra}{source}",
            sender_auth(s)
        ),
    )
}

fn files_source(outbox: &Path, chunk: &str) -> String {
    format!(
        "[[sources]]\nname = \"outbox\"\ntype = \"files\"\ndir = \"{}\"\nsettle = \"500ms\"\nchunk_size = \"{chunk}\"\n",
        outbox.display()
    )
}

/// Writes `size` seeded random bytes to `path` through `path.tmp` (as a
/// writer should), with the given mtime and mode; returns its SHA-256.
fn make_file(path: &Path, size: u64, seed: u64, mtime_s: u64, mode: u32) -> String {
    use std::io::Write;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).unwrap());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    let f = f.into_inner().unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime_s))
        .unwrap();
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .unwrap();
    drop(f);
    std::fs::rename(&tmp, path).unwrap();
    hex(&hasher.finalize())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha_of(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex(&h.finalize())
}

/// Every file under `dir` by relative path with its size, skipping the
/// sink's temporary names (dotfiles) and `incomplete/`.
fn visible(dir: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let p = e.path();
            if name.starts_with('.') || p == dir.join("incomplete") {
                continue;
            }
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) => {
                    out.insert(
                        p.strip_prefix(dir).unwrap().to_string_lossy().into_owned(),
                        m.len(),
                    );
                }
                Err(_) => {}
            }
        }
    }
    out
}

/// The audit log's `file` events.
fn file_events(s: &Scratch) -> Vec<serde_json::Value> {
    json_lines(&s.join("audit.jsonl"))
        .into_iter()
        .filter(|v| v["event"] == "file")
        .collect()
}

/// Lists `dir` every 50 ms until stopped; any file visible under a final
/// name with a size other than its whole size is a partial file shown.
struct Watcher {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn start(dir: &Path, expected: BTreeMap<String, u64>) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (dir, s2, seen2) = (dir.to_path_buf(), stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                for (name, size) in visible(&dir) {
                    if expected.get(&name) != Some(&size) {
                        seen2.lock().unwrap().push(format!("{name} ({size} bytes)"));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watcher {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// The large file's size: `WEIR_FILES_LARGE_MB` (default 300).
fn large_mb() -> u64 {
    std::env::var("WEIR_FILES_LARGE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

#[test]
fn files_and_a_nested_directory_arrive_identical_through_3pct_loss_with_bursts_and_no_partial_file_is_ever_visible(
) {
    let s = Scratch::new("files-loss");
    let (outbox, inbox) = (s.join("outbox"), s.join("inbox"));
    std::fs::create_dir_all(&outbox).unwrap();
    let large = large_mb() * 1_000_000;
    // (relative path, size, seed, mtime, mode)
    let specs: [(&str, u64, u64, u64, u32); 5] = [
        ("one.bin", 1, 1, 1_500_000_001, 0o600),
        ("ten.bin", 10_000_000, 2, 1_500_000_002, 0o644),
        ("large.bin", large, 3, 1_500_000_003, 0o640),
        ("plant/line-2/export.csv", 123_457, 4, 1_500_000_004, 0o644),
        ("plant/line-2/deeper/empty.dat", 0, 5, 1_500_000_005, 0o444),
    ];
    let mut want = BTreeMap::new();
    for (rel, size, seed, mtime, mode) in specs {
        let sha = make_file(&outbox.join(rel), size, seed, mtime, mode);
        want.insert(rel.to_string(), (size, sha, mtime, mode));
    }
    let sizes = want.iter().map(|(k, v)| (k.clone(), v.0)).collect();
    let watcher = Watcher::start(&inbox, sizes);
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let _receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &[
            "run",
            "--config",
            receiver_config(&s, receiver_port, &inbox).to_str().unwrap(),
        ],
    );
    let _link = linksim(&s, "linksim", sender_port, receiver_port, 5, 0.03, true);
    let scfg = sender_config(
        &s,
        sender_port,
        "500Mbit",
        "",
        &files_source(&outbox, "256KiB"),
    );
    let _sender = Proc::spawn(
        &s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    let started = Instant::now();
    let all_there = wait_until(Duration::from_secs(240), || {
        visible(&inbox).len() == want.len()
    });
    let took = started.elapsed();
    let partial = watcher.finish();
    assert!(
        all_there,
        "not every file arrived: {:?}; see {}",
        visible(&inbox),
        s.path.display()
    );
    eprintln!(
        "{} MB large file: all files in {:.1} s",
        large_mb(),
        took.as_secs_f64()
    );
    assert!(
        partial.is_empty(),
        "partial files were visible: {partial:?}"
    );
    for (rel, (size, sha, mtime, mode)) in &want {
        let p = inbox.join(rel);
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), *size, "{rel}");
        assert_eq!(&sha_of(&p), sha, "{rel}: content differs");
        assert_eq!(
            (m.mtime(), m.mtime_nsec()),
            (*mtime as i64, 0),
            "{rel}: mtime"
        );
        assert_eq!(m.mode() & 0o777, *mode, "{rel}: mode");
    }
    // Sent files moved under sent/ once spooled.
    assert!(wait_until(Duration::from_secs(10), || {
        want.keys()
            .all(|rel| outbox.join("sent").join(rel).exists() && !outbox.join(rel).exists())
    }));
    assert!(wait_until(Duration::from_secs(5), || file_events(&s).len()
        >= want.len()));
    let events = file_events(&s);
    assert_eq!(events.len(), want.len(), "{events:?}");
    assert!(events.iter().all(|e| e["complete"] == true), "{events:?}");
    let lk = read_json(&s.join("linksim.json"));
    assert!(
        lk["dropped_random"].as_u64().unwrap_or(0) > 0,
        "the link simulator dropped nothing: {lk}"
    );
    assert!(gaps(&s.join("audit.jsonl"), "outbox").is_empty());
}

#[test]
fn a_file_losing_more_than_fec_repairs_stays_out_of_dir_is_named_in_the_audit_and_a_resend_completes_it(
) {
    let s = Scratch::new("files-gap");
    let (outbox, inbox) = (s.join("outbox"), s.join("inbox"));
    std::fs::create_dir_all(&outbox).unwrap();
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let _receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &[
            "run",
            "--config",
            receiver_config(&s, receiver_port, &inbox).to_str().unwrap(),
        ],
    );
    let lossy = linksim(
        &s,
        "linksim-lossy",
        sender_port,
        receiver_port,
        31,
        0.10,
        false,
    );
    // The configured parity only, shards back to back (as in durability.rs):
    // 10% loss beats RS(32,4) in 29% of the blocks. Small parts, so many
    // survive and many do not. data_shards is set: under the default 64,
    // 10% loss beats 82% of the blocks and all eleven of this file about
    // one run in nine (seen as a flaky failure of the test below).
    let scfg = sender_config(
        &s,
        sender_port,
        "100Mbit",
        "[fec]\ndata_shards = 32\nparity_shards = 4\nspare_parity_max = 4\nburst_tolerance = 0\nwarmup_blocks = 0\n",
        &files_source(&outbox, "4KiB"),
    );
    let mut sender = Proc::spawn(
        &s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    let sha = make_file(
        &outbox.join("report.bin"),
        1_000_000,
        7,
        1_500_000_000,
        0o644,
    );
    assert!(
        wait_until(Duration::from_secs(30), || outbox
            .join("sent/report.bin")
            .exists()),
        "the sender did not take report.bin"
    );
    std::thread::sleep(Duration::from_secs(1));
    drop(lossy);
    let _clean = linksim(
        &s,
        "linksim-clean",
        sender_port,
        receiver_port,
        32,
        0.0,
        false,
    );
    // The next file ends the first one's transfer at the receiver.
    make_file(&outbox.join("marker.bin"), 10, 8, 1_500_000_001, 0o644);
    assert!(
        wait_until(Duration::from_secs(30), || inbox
            .join("marker.bin")
            .exists()),
        "marker.bin did not arrive over the clean link"
    );
    assert!(
        !inbox.join("report.bin").exists(),
        "a file with lost parts was put in place"
    );
    // The sink's audit lines are written on the decoder's next tick:
    // the marker may be in place before the line for report.bin is.
    let mut events = file_events(&s);
    wait_until(Duration::from_secs(10), || {
        events = file_events(&s);
        events.iter().any(|e| e["path"] == "report.bin")
    });
    let report: Vec<_> = events
        .iter()
        .filter(|e| e["path"] == "report.bin")
        .collect();
    assert_eq!(report.len(), 1, "{events:?}");
    assert_eq!(report[0]["complete"], false);
    assert!(!report[0]["missing_bytes"].as_array().unwrap().is_empty());
    let kept = inbox.join(report[0]["kept"].as_str().unwrap());
    assert!(
        kept.starts_with(inbox.join("incomplete")) && kept.exists(),
        "{kept:?}"
    );
    let lost = gaps(&s.join("audit.jsonl"), "outbox");
    assert!(!lost.is_empty(), "the audit log names the stream's gaps");
    for (from, to, _) in &lost {
        let done = Command::new(bin("weir-sender"))
            .args([
                "resend",
                "--config",
                scfg.to_str().unwrap(),
                "--stream",
                "outbox",
                "--from",
                &from.to_string(),
                "--to",
                &to.to_string(),
            ])
            .output()
            .unwrap();
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
    assert!(
        wait_until(Duration::from_secs(60), || inbox
            .join("report.bin")
            .exists()),
        "the resend did not complete report.bin; see {}",
        s.path.display()
    );
    assert_eq!(sha_of(&inbox.join("report.bin")), sha);
    assert!(!kept.exists(), "the incomplete copy is gone once completed");
    // The audit line follows the file within the decoder thread's next loop.
    let done = || {
        file_events(&s)
            .into_iter()
            .filter(|e| e["path"] == "report.bin" && e["complete"] == true)
            .count()
    };
    assert!(wait_until(Duration::from_secs(5), || done() > 0));
    assert_eq!(done(), 1);
    assert!(sender.stop(Duration::from_secs(20)));
}

#[test]
fn kill_9_of_the_sender_mid_file_completes_the_transfer_once() {
    let s = Scratch::new("files-kill9");
    let (outbox, inbox) = (s.join("outbox"), s.join("inbox"));
    std::fs::create_dir_all(&outbox).unwrap();
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let _receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &[
            "run",
            "--config",
            receiver_config(&s, receiver_port, &inbox).to_str().unwrap(),
        ],
    );
    let _link = linksim(&s, "linksim", sender_port, receiver_port, 9, 0.01, false);
    let size = large_mb().min(300) * 1_000_000 / 2;
    let sha = make_file(&outbox.join("big.bin"), size, 11, 1_500_000_000, 0o644);
    // 400 Mbit/s: the file takes a few seconds, so the kill lands mid-file.
    let scfg = sender_config(
        &s,
        sender_port,
        "400Mbit",
        "",
        &files_source(&outbox, "256KiB"),
    );
    let mut sender = Proc::spawn(
        &s,
        "sender-1",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    let temp = inbox.join(".weir-");
    let partial_size = || {
        std::fs::read_dir(&inbox)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.path()
                    .to_string_lossy()
                    .starts_with(&*temp.to_string_lossy())
            })
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(60), || partial_size() > size / 4),
        "the receiver never held a quarter of the file; see {}",
        s.path.display()
    );
    sender.signal("KILL");
    assert!(!sender.wait(Duration::from_secs(5)));
    assert!(
        !inbox.join("big.bin").exists(),
        "the kill came too late to test anything"
    );
    let _sender = Proc::spawn(
        &s,
        "sender-2",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    assert!(
        wait_until(Duration::from_secs(120), || inbox.join("big.bin").exists()),
        "big.bin did not arrive after the restart; see {}",
        s.path.display()
    );
    assert_eq!(sha_of(&inbox.join("big.bin")), sha);
    // Once: no second version, one audit line, the original moved once.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(visible(&inbox).into_keys().collect::<Vec<_>>(), ["big.bin"]);
    let events = file_events(&s);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["complete"], true);
    assert!(outbox.join("sent/big.bin").exists() && !outbox.join("sent/big.bin.1").exists());
    let log = std::fs::read_to_string(s.join("sender-2.log")).unwrap();
    assert!(
        log.contains("sending again a file a previous run did not finish"),
        "the restarted sender sent big.bin again under its transfer id"
    );
}

#[test]
fn send_file_copies_files_and_a_directory_into_the_running_sender_and_fails_on_an_unreadable_path()
{
    let s = Scratch::new("files-send");
    let (outbox, inbox, local) = (s.join("outbox"), s.join("inbox"), s.join("local"));
    std::fs::create_dir_all(&outbox).unwrap();
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let _receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &[
            "run",
            "--config",
            receiver_config(&s, receiver_port, &inbox).to_str().unwrap(),
        ],
    );
    let _link = linksim(&s, "linksim", sender_port, receiver_port, 3, 0.01, false);
    let scfg = sender_config(
        &s,
        sender_port,
        "200Mbit",
        "",
        &files_source(&outbox, "256KiB"),
    );
    let _sender = Proc::spawn(
        &s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    let a = make_file(
        &local.join("backup.tar"),
        3_000_000,
        21,
        1_500_000_000,
        0o600,
    );
    let b = make_file(
        &local.join("exports/2026/day.csv"),
        40_000,
        22,
        1_500_000_001,
        0o644,
    );
    let out = Command::new(bin("weir-sender"))
        .args(["send-file", "--config", scfg.to_str().unwrap()])
        .arg(local.join("backup.tar"))
        .arg(local.join("exports"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("2 file(s), 3040000 bytes") && stdout.contains("0 failed"),
        "{stdout}"
    );
    assert!(wait_until(Duration::from_secs(30), || {
        inbox.join("backup.tar").exists() && inbox.join("exports/2026/day.csv").exists()
    }));
    assert_eq!(sha_of(&inbox.join("backup.tar")), a);
    assert_eq!(sha_of(&inbox.join("exports/2026/day.csv")), b);
    let m = std::fs::metadata(inbox.join("backup.tar")).unwrap();
    assert_eq!((m.mtime(), m.mode() & 0o777), (1_500_000_000, 0o600));
    // A path that cannot be read: named, non-zero exit, the rest still sent.
    let c = make_file(&local.join("again.bin"), 10, 23, 1_500_000_002, 0o644);
    let out = Command::new(bin("weir-sender"))
        .args(["send-file", "--no-wait", "--config", scfg.to_str().unwrap()])
        .arg(local.join("missing.bin"))
        .arg(local.join("again.bin"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("missing.bin") && stderr.contains("1 file(s) could not be sent"),
        "{stderr}"
    );
    assert!(wait_until(Duration::from_secs(30), || inbox
        .join("again.bin")
        .exists()));
    assert_eq!(sha_of(&inbox.join("again.bin")), c);
}

/// Peak resident memory of a process (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Asks the sender to resend, by stream range, each gap of stream
/// `outbox` the receiver's audit log names that was not asked for yet
/// (`asked`); says on stderr what it answered. Before the first request,
/// keeps the sender's (`pid`) peak RSS so far in `before`.
fn resend_new_gaps(
    s: &Scratch,
    scfg: &Path,
    asked: &mut Vec<(u64, u64)>,
    pid: u32,
    before: &mut Option<u64>,
) {
    for (from, to, _) in gaps(&s.join("audit.jsonl"), "outbox") {
        if asked.contains(&(from, to)) {
            continue;
        }
        before.get_or_insert_with(|| peak_rss_kib(pid));
        asked.push((from, to));
        let (from, to) = (from.to_string(), to.to_string());
        let out = resend_file(scfg, &["--stream", "outbox", "--from", &from, "--to", &to]);
        eprintln!(
            "gap {from}..={to}: resend by stream range: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

/// The link rate of the 2 GiB test: see its doc comment.
const HUGE_RATE: &str = "400Mbit";

/// A 2 GiB file through a 256 MiB spool (issue 13): it arrives whole and
/// identical (SHA-256, computed streaming on both ends), and the sender's
/// peak RSS (VmHWM, sampled while it runs and read at the end) stays under
/// 100 MiB. The `files` source reads a part only while the spool has room,
/// so what the sender holds is a few parts and the encoder's blocks,
/// whatever the size of the file.
///
/// Built to run in `make test` on a shared 2-core machine:
/// - The content is a seeded ChaCha8 stream, written and hashed in one pass
///   (a few seconds): 2 GiB that nothing can shrink. The sender hashes,
///   spools, encrypts and FEC-encodes every byte and sends them all; weir
///   neither compresses nor deduplicates, and random bytes would defeat
///   either, so no shortcut could make the file cheaper to move.
/// - Sender straight to receiver, no link simulator: one busy process and
///   one copy of every datagram fewer; loss is the other tests' subject.
/// - `rate` is [`HUGE_RATE`], 400 Mbit/s (a fifth of it parity at full
///   load: 2 GiB take about 55 s): the receiver journals and writes every
///   byte (twice the data rate to disk) behind a socket buffer capped by
///   `net.core.rmem_max` (4 MiB here), and a stall of its threads longer
///   than the buffer holds loses a run of datagrams no FEC repairs. On
///   this 2-core machine, shared with other builds (load 3 to 6), 500 and
///   600 Mbit/s lost such a run in each of four tries, 400 in two of
///   eight (700 and 1200 passed once each at lower load): 400 keeps loss
///   rare and the test near 70 s. MTU 9000 was no better (more loss, RSS
///   near the bound).
/// - The file is fsynced before the transfer starts (see below).
/// - It runs alone (`.config/nextest.toml`), as the FEC burst tests do:
///   an end-to-end test beside it takes the CPU the receiver's socket
///   thread needs, and the datagrams then overflow its buffer.
/// - Should the receiver still drop more than FEC repairs (on a host
///   busier than that), it names the gap in its audit log within a second,
///   and the test asks for it at once the documented way, `weir-sender
///   resend --stream outbox --from A --to B`, while the 256 MiB spool
///   still holds those records (about 6 s of the transfer): the resent
///   parts complete the file, picked up again if it was already kept
///   under `incomplete/`. If that did not complete it, `weir-sender resend
///   --file huge.bin` sends it again, whole, from `sent/` (twice the
///   time). Either is said on stderr; the checks are the same, so a loaded
///   host does not fail the test, except that the 100 MiB bound then
///   applies to the peak before the first resend: a resend queues its
///   records in memory, up to 64 MiB more (`RESEND_BYTES`, sender/src/
///   link.rs; 36 MiB became 93 MiB with four small gaps resent). A small file after it ends its transfer
///   at the receiver, so a lost last part is named too.
#[test]
fn a_2gib_file_through_a_256mib_spool_arrives_identical_and_keeps_the_sender_under_100mib_rss() {
    let s = Scratch::new("files-2g");
    let (outbox, inbox) = (s.join("outbox"), s.join("inbox"));
    std::fs::create_dir_all(&outbox).unwrap();
    let size: u64 = 2 << 30;
    let made = Instant::now();
    let sha = make_file(&outbox.join("huge.bin"), size, 13, 1_500_000_000, 0o644);
    // On disk before the transfer starts: else the kernel writes its 2 GiB
    // back once they are 30 s old (`vm.dirty_expire_centisecs`), mid-transfer,
    // and the receiver's journal fsyncs queue behind it long enough for its
    // socket buffer to overflow (seen 1.2 to 1.5 GB in, at 500 and 600 Mbit/s).
    std::fs::File::open(outbox.join("huge.bin"))
        .unwrap()
        .sync_all()
        .unwrap();
    eprintln!(
        "2 GiB file written and fsynced in {:.1} s",
        made.elapsed().as_secs_f64()
    );
    let receiver_port = free_udp_port();
    let _receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &[
            "run",
            "--config",
            receiver_config(&s, receiver_port, &inbox).to_str().unwrap(),
        ],
    );
    let scfg = sender_config(
        &s,
        receiver_port,
        HUGE_RATE,
        "",
        &files_source(&outbox, "256KiB"),
    );
    // The spool bound: 256 MiB.
    let text = std::fs::read_to_string(&scfg)
        .unwrap()
        .replace("[spool]\n", "[spool]\nmax_bytes = \"256MiB\"\n");
    std::fs::write(&scfg, text).unwrap();
    let sender = Proc::spawn(
        &s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    let pid = sender.child.id();
    let started = Instant::now();
    let mut peak = 0;
    let mut asked = Vec::new();
    // The sender's peak RSS before the first resend, if one was needed.
    let mut before = None;
    assert!(
        wait_until(Duration::from_secs(300), || {
            peak = peak.max(peak_rss_kib(pid));
            resend_new_gaps(&s, &scfg, &mut asked, pid, &mut before);
            outbox.join("sent/huge.bin").exists()
        }),
        "the sender did not spool huge.bin; see {}",
        s.path.display()
    );
    make_file(&outbox.join("after.bin"), 10, 14, 1_500_000_001, 0o644);
    // The receiver's verdicts on huge.bin (`file` audit lines): none yet,
    // or whether it is in place, once there is one (with `whole`, once it
    // is in place, or at `limit`).
    let verdict = |peak: &mut u64,
                   asked: &mut Vec<(u64, u64)>,
                   before: &mut Option<u64>,
                   whole: bool,
                   limit: Duration| {
        let mut lines: Vec<bool> = Vec::new();
        wait_until(limit, || {
            *peak = (*peak).max(peak_rss_kib(pid));
            resend_new_gaps(&s, &scfg, asked, pid, before);
            lines = file_events(&s)
                .iter()
                .filter(|e| e["path"] == "huge.bin")
                .map(|e| e["complete"] == true)
                .collect();
            lines.contains(&true) || (!whole && !lines.is_empty())
        });
        (!lines.is_empty()).then(|| lines.contains(&true))
    };
    let mut by_file = false;
    match verdict(
        &mut peak,
        &mut asked,
        &mut before,
        false,
        Duration::from_secs(300),
    ) {
        None => panic!("no audit line for huge.bin; see {}", s.path.display()),
        Some(true) => {}
        Some(false) => {
            // Resends of its gaps by stream range may still be on the way.
            let whole = !asked.is_empty()
                && verdict(
                    &mut peak,
                    &mut asked,
                    &mut before,
                    true,
                    Duration::from_secs(60),
                ) == Some(true);
            if !whole {
                let lost = file_events(&s)
                    .into_iter()
                    .find(|e| e["path"] == "huge.bin")
                    .unwrap();
                eprintln!(
                    "huge.bin lost more than FEC repairs at {HUGE_RATE} (missing bytes {}); completing it with `weir-sender resend --file huge.bin`",
                    lost["missing_bytes"]
                );
                before.get_or_insert_with(|| peak_rss_kib(pid));
                let out = resend_file(&scfg, &["--file", "huge.bin"]);
                assert!(
                    out.status.success(),
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                by_file = true;
                assert_eq!(
                    verdict(
                        &mut peak,
                        &mut asked,
                        &mut before,
                        true,
                        Duration::from_secs(300)
                    ),
                    Some(true),
                    "huge.bin did not arrive whole after a resend either; see {}",
                    s.path.display()
                );
            }
        }
    }
    let resent = match (asked.len(), by_file) {
        (0, _) => String::new(),
        (n, false) => format!(", {n} gap(s) resent by stream range"),
        (n, true) => format!(", {n} gap(s) resent by stream range, then the file"),
    };
    let secs = started.elapsed().as_secs_f64();
    peak = peak.max(peak_rss_kib(pid));
    eprintln!(
        "2 GiB file: in place after {secs:.1} s ({:.0} MB/s{resent}), sender peak RSS {} MiB ({} MiB before any resend)",
        size as f64 / 1e6 / secs,
        peak / 1024,
        before.unwrap_or(peak) / 1024
    );
    let placed = inbox.join("huge.bin");
    assert_eq!(std::fs::metadata(&placed).unwrap().len(), size);
    assert_eq!(sha_of(&placed), sha, "huge.bin arrived with other content");
    assert!(peak > 0, "VmHWM of the sender (pid {pid}) did not read");
    // Streaming the file: under 100 MiB. A resend queues what it sends
    // again in memory, bounded at 64 MiB (`RESEND_BYTES` in
    // sender/src/link.rs): that much more once one was needed.
    let streaming = before.unwrap_or(peak);
    assert!(
        streaming < 100 * 1024,
        "sender peak RSS {} MiB while streaming the file",
        streaming / 1024
    );
    assert!(
        peak < (100 + 64) * 1024,
        "sender peak RSS {} MiB with resends (streaming: {} MiB)",
        peak / 1024,
        streaming / 1024
    );
}

/// A file that loses more than FEC repairs: sent through a lossy link
/// (10% loss, the configured parity only, 4 KiB parts), then a marker file
/// over a clean link ends its transfer at the receiver, which keeps it
/// under `incomplete/`. What a resend test needs afterwards.
struct LostFile {
    s: Scratch,
    scfg: PathBuf,
    outbox: PathBuf,
    inbox: PathBuf,
    sha: String,
    kept: PathBuf,
    /// The receiver's management address (`metrics.listen`): its status page.
    status: u16,
    _receiver: Proc,
    sender: Proc,
    _link: Proc,
}

/// The receiver's status page (`/` at `metrics.listen`).
fn status_page(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let mut page = String::new();
    let _ = c.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let _ = c.read_to_string(&mut page);
    page
}

/// `weir-receiver gaps` with `args`: its standard output.
fn receiver_gaps(s: &Scratch, args: &[&str]) -> String {
    let out = Command::new(bin("weir-receiver"))
        .args([
            "gaps",
            "--config",
            s.join("receiver.toml").to_str().unwrap(),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lose_a_file(name: &str) -> LostFile {
    let s = Scratch::new(name);
    let (outbox, inbox) = (s.join("outbox"), s.join("inbox"));
    std::fs::create_dir_all(&outbox).unwrap();
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let status = free_tcp_port();
    let rcfg = receiver_config(&s, receiver_port, &inbox);
    let text = std::fs::read_to_string(&rcfg).unwrap().replace(
        "log_interval_s = 1\n",
        &format!("log_interval_s = 1\nlisten = \"127.0.0.1:{status}\"\n"),
    );
    std::fs::write(&rcfg, text).unwrap();
    let receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &["run", "--config", rcfg.to_str().unwrap()],
    );
    let lossy = linksim(
        &s,
        "linksim-lossy",
        sender_port,
        receiver_port,
        31,
        0.10,
        false,
    );
    // RS(32,4) against 10% loss, as in the test above: some of the 22
    // blocks are lost (all but 1 in 1,800 runs) and some arrive (all but 1
    // in 10^12), so the receiver has a part of the file to keep.
    let scfg = sender_config(
        &s,
        sender_port,
        "100Mbit",
        "[fec]\ndata_shards = 32\nparity_shards = 4\nspare_parity_max = 4\nburst_tolerance = 0\nwarmup_blocks = 0\n",
        &files_source(&outbox, "4KiB"),
    );
    let sender = Proc::spawn(
        &s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    let sha = make_file(
        &outbox.join("report.bin"),
        1_000_000,
        7,
        1_500_000_000,
        0o644,
    );
    assert!(
        wait_until(Duration::from_secs(30), || outbox
            .join("sent/report.bin")
            .exists()),
        "the sender did not take report.bin"
    );
    std::thread::sleep(Duration::from_secs(1));
    drop(lossy);
    let link = linksim(
        &s,
        "linksim-clean",
        sender_port,
        receiver_port,
        32,
        0.0,
        false,
    );
    make_file(&outbox.join("marker.bin"), 10, 8, 1_500_000_001, 0o644);
    assert!(
        wait_until(Duration::from_secs(30), || inbox
            .join("marker.bin")
            .exists()),
        "marker.bin did not arrive over the clean link"
    );
    let mut events = file_events(&s);
    wait_until(Duration::from_secs(10), || {
        events = file_events(&s);
        events.iter().any(|e| e["path"] == "report.bin")
    });
    let report: Vec<_> = events
        .iter()
        .filter(|e| e["path"] == "report.bin")
        .collect();
    assert_eq!(report.len(), 1, "{events:?}");
    assert_eq!(
        report[0]["complete"], false,
        "the lossy link lost nothing FEC could not repair"
    );
    assert!(!inbox.join("report.bin").exists());
    let kept = inbox.join(report[0]["kept"].as_str().unwrap());
    assert!(kept.exists(), "{kept:?}");
    LostFile {
        s,
        scfg,
        outbox,
        inbox,
        sha,
        kept,
        status,
        _receiver: receiver,
        sender,
        _link: link,
    }
}

fn resend_file(scfg: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("weir-sender"))
        .args(["resend", "--config", scfg.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

/// Waits for report.bin in place with the content first sent, its
/// incomplete copy gone, and exactly one `complete: true` audit line.
fn assert_completed_once(lost: &LostFile) {
    assert!(
        wait_until(Duration::from_secs(60), || lost
            .inbox
            .join("report.bin")
            .exists()),
        "the resend did not complete report.bin; see {}",
        lost.s.path.display()
    );
    assert_eq!(sha_of(&lost.inbox.join("report.bin")), lost.sha);
    assert!(
        !lost.kept.exists(),
        "the incomplete copy is gone once completed"
    );
    let done = || {
        file_events(&lost.s)
            .into_iter()
            .filter(|e| e["path"] == "report.bin" && e["complete"] == true)
            .collect::<Vec<_>>()
    };
    assert!(wait_until(Duration::from_secs(5), || !done().is_empty()));
    let done = done();
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0]["sha256"], lost.sha.as_str());
}

#[test]
fn resend_by_file_name_sends_the_parts_the_spool_still_holds_and_the_receiver_completes_the_file() {
    let mut lost = lose_a_file("files-resend-spool");
    let out = resend_file(&lost.scfg, &["--file", "report.bin"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("every part is in the spool"), "{stdout}");
    assert_completed_once(&lost);
    // The stream's gaps were filled by the resent records: none is open.
    let gaps = receiver_gaps(&lost.s, &[]);
    assert!(gaps.contains("no open gaps"), "{gaps}");
    assert!(lost.sender.stop(Duration::from_secs(20)));
}

#[test]
fn resend_by_file_name_sends_from_the_sent_dir_and_names_where_it_looked_once_the_file_is_gone() {
    let mut lost = lose_a_file("files-resend-disk");
    // The records the lossy link took are open gaps, on the status page too.
    let audit = lost.s.join("audit.jsonl");
    let lost_gaps = gaps(&audit, "outbox");
    assert!(
        !lost_gaps.is_empty(),
        "the audit log names the stream's gaps"
    );
    assert!(
        wait_until(Duration::from_secs(10), || status_page(lost.status)
            .contains("<table id=\"open-gaps\">")),
        "the status page lists no open gap: {}",
        status_page(lost.status)
    );
    // A name the source never sent is refused, naming its history.
    let out = resend_file(&lost.scfg, &["--file", "nothing.bin"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`nothing.bin`: not in the history") && stderr.contains("sent.jsonl"),
        "{stderr}"
    );
    // From disk (as when the spool has evicted the parts): sent/report.bin.
    let out = resend_file(&lost.scfg, &["--file", "report.bin", "--from-disk"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = lost.outbox.join("sent/report.bin");
    assert!(
        stdout.contains(&format!("sending it again from {}", sent.display())),
        "{stdout}"
    );
    assert_completed_once(&lost);
    let log = std::fs::read_to_string(lost.s.join("sender.log")).unwrap();
    assert!(
        log.contains("sending a file again on an operator's request"),
        "{log}"
    );
    // The copy from disk came under new sequence numbers, so no resend
    // recovered the original records: the gaps they left are resolved by
    // the file, not deleted. The audit says by what and when, `gaps` no
    // longer lists them as open, `gaps --all` does with the resolution, and
    // the status page (the decoder's open gaps) drops them.
    let mut resolved = Vec::new();
    assert!(wait_until(Duration::from_secs(5), || {
        resolved = json_lines(&audit)
            .into_iter()
            .filter(|e| e["event"] == "gap-resolved")
            .collect();
        !resolved.is_empty()
    }));
    for r in &resolved {
        assert_eq!(
            (&r["stream"], &r["file"]),
            (
                &serde_json::json!("outbox"),
                &serde_json::json!("report.bin")
            ),
            "{r}"
        );
        assert!(
            r["resolution"]
                .as_str()
                .unwrap()
                .starts_with("resolved by resend of report.bin at 20"),
            "{r}"
        );
    }
    for (from, to, _) in &lost_gaps {
        assert!(
            resolved
                .iter()
                .any(|r| r["from"].as_u64().unwrap() <= *from && *to <= r["to"].as_u64().unwrap()),
            "gap {from}..={to} is outside every resolved range: {resolved:?}"
        );
    }
    let open = receiver_gaps(&lost.s, &[]);
    assert!(
        open.starts_with("no open gaps\n")
            && open.contains("resolved gaps")
            && open.contains("--all lists them"),
        "{open}"
    );
    let all = receiver_gaps(&lost.s, &["--all"]);
    let rows: Vec<&str> = all.lines().filter(|l| l.starts_with("outbox ")).collect();
    assert!(!rows.is_empty(), "{all}");
    assert!(
        rows.iter()
            .all(|l| l.contains("resolved by resend of report.bin at 20")),
        "{all}"
    );
    assert!(all.contains("\n0 open gaps, 0 records\n"), "{all}");
    assert!(
        wait_until(Duration::from_secs(10), || status_page(lost.status)
            .contains("none: no gap is waiting for a resend")),
        "the status page still lists open gaps: {}",
        status_page(lost.status)
    );
    // Gone from disk: the error names every place it looked.
    std::fs::remove_file(&sent).unwrap();
    let out = resend_file(&lost.scfg, &["--file", "report.bin", "--from-disk"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains(&format!("{} (missing)", sent.display()))
            && stderr.contains(&format!(
                "{} (missing)",
                lost.outbox.join("report.bin").display()
            ))
            && stderr.contains("give --path"),
        "{stderr}"
    );
    // A copy elsewhere with another mtime is taken by its SHA-256; one
    // with other content is refused.
    let copy = lost.s.join("copy.bin");
    std::fs::write(&copy, vec![0u8; 1_000_000]).unwrap();
    let out = resend_file(
        &lost.scfg,
        &["--file", "report.bin", "--path", copy.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("its SHA-256 is") && stderr.contains(&lost.sha),
        "{stderr}"
    );
    assert!(lost.sender.stop(Duration::from_secs(20)));
}

fn file_sink_receiver_config(s: &Scratch, port: u16, out: &Path) -> PathBuf {
    let d = s.path.display();
    s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:{port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/journal\"\n\
             [[sinks]]\nname = \"points\"\ntype = \"file\"\ndir = \"{}\"\n",
            receiver_auth(s),
            out.display()
        ),
    )
}

#[test]
fn csv_rows_cross_as_points_into_the_file_sink_and_bad_rows_are_counted_and_logged_with_their_line()
{
    let s = Scratch::new("files-csv");
    let (outbox, out) = (s.join("outbox"), s.join("out"));
    std::fs::create_dir_all(&outbox).unwrap();
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let _receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &[
            "run",
            "--config",
            file_sink_receiver_config(&s, receiver_port, &out)
                .to_str()
                .unwrap(),
        ],
    );
    let _link = linksim(&s, "linksim", sender_port, receiver_port, 4, 0.01, false);
    let source = format!(
        "[[sources]]\nname = \"historian\"\ntype = \"files\"\ndir = \"{}\"\nsettle = \"500ms\"\n\
         csv = {{ tag = \"Tag\", time = \"Timestamp\", time_format = \"%Y-%m-%d %H:%M:%S%.f\", utc_offset = \"+01:00\", value = \"Value\", quality = \"Quality\", delimiter = \";\" }}\n",
        outbox.display()
    );
    let scfg = sender_config(&s, sender_port, "50Mbit", "", &source);
    let _sender = Proc::spawn(
        &s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    // 2000 good rows of three kinds, a quoted tag holding the delimiter,
    // and three bad rows at known lines.
    let mut csv = String::from("Timestamp;Tag;Value;Quality\n");
    let mut want = Vec::new();
    for i in 0..2000u64 {
        let (tag, value, json_value, quality) = match i % 3 {
            0 => (
                "line1/temp".to_string(),
                format!("{}.5", i),
                serde_json::json!(i as f64 + 0.5),
                "good",
            ),
            1 => (
                "line1/count".to_string(),
                format!("{i}"),
                serde_json::json!(i),
                "Uncertain",
            ),
            _ => (
                "\"line1;run\"".to_string(),
                "true".to_string(),
                serde_json::json!(true),
                "bad",
            ),
        };
        let secs = 1_000 + i;
        csv.push_str(&format!(
            "2026-03-01 13:{:02}:{:02}.25;{tag};{value};{quality}\n",
            secs / 60 % 60,
            secs % 60
        ));
        // 13:mm:ss.25 at +01:00 is 12:mm:ss.25 UTC.
        let ts = format!(
            "2026-03-01T12:{:02}:{:02}.250000000Z",
            secs / 60 % 60,
            secs % 60
        );
        let q = match quality {
            "good" => 0,
            "Uncertain" => 1,
            _ => 2,
        };
        want.push((tag.trim_matches('"').to_string(), json_value, ts, q));
        if i == 10 {
            csv.push_str("2026-03-01 13:00:00.0;line1/temp;;good\n"); // line 13: empty value
        }
        if i == 20 {
            csv.push_str("yesterday;line1/temp;1;good\n"); // line 24: bad time
            csv.push_str("2026-03-01 13:00:00.0;line1/temp\n"); // line 25: short row
        }
    }
    let path = outbox.join("export.csv");
    std::fs::write(outbox.join("export.csv.tmp"), &csv).unwrap();
    std::fs::rename(outbox.join("export.csv.tmp"), &path).unwrap();
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_dir(&out)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("historian"))
            .flat_map(|e| json_lines(&e.path()))
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(60), || lines().len() >= want.len()),
        "{} of {} points arrived; see {}",
        lines().len(),
        want.len(),
        s.path.display()
    );
    let mut got = lines();
    got.sort_by_key(|v| v["seq"].as_u64().unwrap());
    assert_eq!(got.len(), want.len(), "no point twice, none extra");
    for (g, (tag, value, ts, q)) in got.iter().zip(&want) {
        assert_eq!(g["kind"], "point", "{g}");
        assert_eq!(
            (&g["tag"], &g["value"], &g["ts"], &g["quality"]),
            (
                &serde_json::json!(tag),
                value,
                &serde_json::json!(ts),
                &serde_json::json!(q)
            ),
            "{g}"
        );
    }
    assert!(wait_until(Duration::from_secs(10), || outbox
        .join("sent/export.csv")
        .exists()));
    assert!(gaps(&s.join("audit.jsonl"), "historian").is_empty());
    // Counted in the source's counts, each logged with file and line.
    assert!(wait_until(Duration::from_secs(5), || {
        read_json(&s.join("sender-metrics.json"))["sources"]["historian"]["csv_bad_rows"] == 3
    }));
    let m = read_json(&s.join("sender-metrics.json"));
    assert_eq!(m["sources"]["historian"]["csv_points"], 2000, "{m}");
    let log = std::fs::read_to_string(s.join("sender.log")).unwrap();
    for (line, why) in [
        (13, "value column `Value`: empty"),
        (24, "time column `Timestamp`: `yesterday` does not match"),
        (25, "the row has 2 field(s); column `Value` is field 3"),
    ] {
        assert!(
            log.lines().any(|l| l.contains("export.csv")
                && l.contains(&format!("line={line}"))
                && l.contains(why)),
            "no log line for line {line} ({why}):\n{log}"
        );
    }
}
