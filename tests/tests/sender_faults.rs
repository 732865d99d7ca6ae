//! Sender faults end to end: a restart with a partly sent spool, a thread
//! that fails under a running sender, corrupt spool bytes mid-segment, a
//! source that cannot bind, and a source that loses its peer.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A little over the silence the receiver asks of a session before a new
/// one takes over without authentication (2 s by default).
const OLD_SESSION_SILENCE: Duration = Duration::from_millis(2500);

/// The same after a session whose link was saturated (its heartbeats
/// came about 3 s apart, so the receiver asks for about 7 s of silence).
const SATURATED_SESSION_SILENCE: Duration = Duration::from_secs(10);

/// Which binary a configuration is for.
enum Side {
    Sender,
    Receiver,
}

/// Every configuration of this file is written here (so a table every
/// configuration needs, such as `[auth]`, is added in one place).
fn config(s: &Scratch, file: &str, side: Side, body: &str) -> PathBuf {
    let text = match side {
        Side::Sender => format!("{}{body}", sender_auth(s)),
        Side::Receiver => format!("{}{body}", receiver_auth(s)),
    };
    s.write(file, &text)
}

/// Receiver: file sink into `{scratch}/out`, audit, journal and metrics in
/// the scratch directory.
fn receiver_config(s: &Scratch, listen_port: u16) -> PathBuf {
    let d = s.path.display();
    config(
        s,
        "receiver.toml",
        Side::Receiver,
        &format!(
            "[link]\nlisten = \"127.0.0.1:{listen_port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n\
             [journal]\npath = \"{d}/state\"\n[metrics]\npath = \"{d}/receiver-metrics.json\"\n\
             log_interval_s = 1\n[[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{d}/out\"\n"
        ),
    )
}

/// Sender: spool and metrics in the scratch directory; `spool` adds keys
/// to `[spool]`, `rest` adds sections and sources.
fn sender_config(
    s: &Scratch,
    file: &str,
    dest_port: u16,
    rate: &str,
    spool: &str,
    rest: &str,
) -> PathBuf {
    let d = s.path.display();
    config(
        s,
        file,
        Side::Sender,
        &format!(
            "[link]\ndestination = \"127.0.0.1:{dest_port}\"\nrate = \"{rate}\"\n\
             [metrics]\npath = \"{d}/sender-metrics.json\"\nlog_interval_s = 1\n\
             [spool]\npath = \"{d}/spool\"\n{spool}\n{rest}"
        ),
    )
}

fn run(s: &Scratch, log: &str, program: &str, cfg: &Path) -> Proc {
    Proc::spawn(s, log, program, &["run", "--config", cfg.to_str().unwrap()])
}

/// The exit status, once the process has ended within `limit`.
fn exit_status(p: &mut Proc, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = p.child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The raw stream `stem` as the file sink wrote it: its numbered `.bin`
/// files, in order, concatenated.
fn raw_stream(out: &Path, stem: &str) -> Vec<u8> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{stem}.")) && n.ends_with(".bin"))
        })
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|p| std::fs::read(p).expect("reading a raw stream file"))
        .collect()
}

/// The bytes weir-tcpfeed sends for `seed` and `len`.
fn fed_bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut pattern = weir_tests::pattern::Pattern::new(seed, len);
    let mut chunk = vec![0u8; weir_tests::pattern::CHUNK];
    let mut all = Vec::with_capacity(len as usize);
    loop {
        let n = pattern.next_chunk(&mut chunk);
        if n == 0 {
            return all;
        }
        all.extend_from_slice(&chunk[..n]);
    }
}

fn tcpfeed(s: &Scratch, log: &str, port: u16, bytes: &str, seed: u64) -> Proc {
    Proc::spawn(
        s,
        log,
        "weir-tcpfeed",
        &[
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--bytes",
            bytes,
            "--seed",
            &seed.to_string(),
        ],
    )
}

/// Spool segment files, oldest first.
fn segments(s: &Scratch) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(s.join("spool/segments"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    found.sort();
    found
}

/// Overwrites bytes of a file in place (no truncation: a reader may have it open).
fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_at(bytes, at)
        .unwrap();
}

/// Reads a postcard varint at `at`: (value, bytes it took).
fn varint(data: &[u8], at: usize) -> (u64, usize) {
    let (mut v, mut shift, mut i) = (0u64, 0, at);
    loop {
        let b = data[i];
        v |= u64::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            return (v, i - at);
        }
        shift += 7;
    }
}

/// (byte offset, framed size, sequence number) of every entry of a spool
/// segment: `[u32 len][u32 crc][postcard { stream: str, seq: varint, .. }]`.
fn spool_entries(data: &[u8]) -> Vec<(usize, usize, u64)> {
    // Entries start after the segment's format header.
    let mut at = weir_store::HEADER_LEN as usize;
    let mut out = Vec::new();
    while at + 8 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let (name_len, n) = varint(data, at + 8);
        let (seq, _) = varint(data, at + 8 + n + name_len as usize);
        out.push((at, 8 + len, seq));
        at += 8 + len;
    }
    out
}

#[test]
fn a_sender_restarted_after_kill_9_with_a_partly_sent_spool_reads_its_tcp_source_again() {
    let s = Scratch::new("restart-stall");
    let receiver_port = free_udp_port();
    let mut receiver = run(
        &s,
        "receiver",
        "weir-receiver",
        &receiver_config(&s, receiver_port),
    );
    let source_port = free_tcp_port();
    // The default spool bound (1 GiB, 64 MiB segments): after 4 s at
    // 100 Mbit/s about 50 MB are sent and the rest of one large segment
    // is not.
    let cfg = sender_config(
        &s,
        "sender.toml",
        receiver_port,
        "100Mbit",
        "",
        &format!(
            "[[sources]]\nname = \"raw\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{source_port}\"\n"
        ),
    );
    let mut sender = run(&s, "sender-1", "weir-sender", &cfg);
    let feed = tcpfeed(&s, "feed-1", source_port, "100M", 1);
    std::thread::sleep(Duration::from_secs(4));
    assert!(sender.is_running(), "the sender died on its own");
    sender.signal("KILL");
    assert!(
        exit_status(&mut sender, Duration::from_secs(5)).is_some(),
        "kill -9 did not end the sender"
    );
    drop(feed);
    let state = read_json(&s.join("spool/state.json"));
    let spooled = state["durable_index"].as_u64().unwrap_or(0);
    let sent = state["sent_index"].as_u64().unwrap_or(0);
    assert!(
        sent > 0 && sent + 16 < spooled,
        "the spool is partly sent when killed: sent {sent} of {spooled} chunks"
    );

    // Without authentication the receiver follows a new session once the
    // old one has been silent for twice its observed heartbeat gap
    // (docs/wire-format.md, Sessions), and holds at most 32 MiB of the new
    // one's frames meanwhile. The killed sender's link was saturated, which
    // stretched its heartbeat gap to about 3 s; restart after the silence
    // that asks for, so the test is about the sender alone.
    std::thread::sleep(SATURATED_SESSION_SILENCE);
    let mut sender = run(&s, "sender-2", "weir-sender", &cfg);
    let mut feed = tcpfeed(&s, "feed-2", source_port, "10M", 2);
    let fed = exit_status(&mut feed, Duration::from_secs(60));
    assert!(
        fed.is_some_and(|st| st.success()),
        "the restarted sender did not read the new 10 MB connection (tcpfeed: {fed:?}); \
         sender metrics: {}",
        read_json(&s.join("sender-metrics.json"))
    );
    let out = s.join("out");
    let expected = fed_bytes(2, 10 << 20);
    // The new connection's bytes end the stream once they have all arrived.
    let ends_with_new = || {
        let raw = raw_stream(&out, "raw");
        raw.len() > expected.len() && raw[raw.len() - expected.len()..] == expected[..]
    };
    let start = Instant::now();
    while !ends_with_new() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        ends_with_new(),
        "the new connection's 10 MiB arrived whole, in order, at the end of the stream \
         (after the first connection's spooled part): {} bytes",
        raw_stream(&out, "raw").len()
    );
    assert!(sender.stop(Duration::from_secs(20)), "sender stop");
    assert!(receiver.stop(Duration::from_secs(20)), "receiver stop");
    let m = read_json(&s.join("sender-metrics.json"));
    assert!(
        m["bytes_in"].as_u64().unwrap_or(0) >= expected.len() as u64,
        "the restarted sender read the new connection's 10 MiB: {m}"
    );
    assert!(
        gaps(&s.join("audit.jsonl"), "raw").is_empty(),
        "nothing was lost"
    );
}

#[test]
fn a_spool_entry_made_unreadable_under_a_running_sender_ends_it_non_zero_naming_the_link_thread() {
    let s = Scratch::new("thread-dies");
    let receiver_port = free_udp_port();
    // 16 MiB bound: 2 MiB segments. The generator spools about 11 MB in
    // 1 s; the 8 Mbit/s link reads it in about 14 s. The idle tcp source
    // keeps the sender running (not draining) after the generator ends.
    let cfg = sender_config(
        &s,
        "sender.toml",
        receiver_port,
        "8Mbit",
        "max_bytes = \"16MiB\"",
        &format!("[fec]\ndata_shards = 4\nparity_shards = 2\ninterleave = 2\n\
         [[sources]]\nname = \"idle\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{}\"\n\
         [[sources]]\nname = \"gen\"\ntype = \"generator\"\ntags = 1000\nrate = 200000\ncount = 200000\n",
            free_tcp_port()
        ),
    );
    let mut sender = run(&s, "sender", "weir-sender", &cfg);
    assert!(
        wait_until(Duration::from_secs(10), || segments(&s).len() >= 5),
        "the generator filled several segments"
    );
    std::thread::sleep(Duration::from_millis(500));
    let state = read_json(&s.join("spool/state.json"));
    let victim = segments(&s)[3].clone();
    let first: u64 = victim
        .file_stem()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("segment name");
    assert!(
        state["sent_index"].as_u64().unwrap_or(u64::MAX) < first,
        "the link has not read segment {} yet: {state}",
        victim.display()
    );
    let len = std::fs::metadata(&victim).unwrap().len();
    overwrite(&victim, len / 2, &[0xee; 64]);

    let status = exit_status(&mut sender, Duration::from_secs(60));
    let log = log_text(&s, "sender");
    let status = status
        .unwrap_or_else(|| panic!("the sender kept running with a dead link thread; log:\n{log}"));
    assert!(!status.success(), "exit status {status}");
    let error = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("weir-link failed"))
        .unwrap_or_else(|| panic!("no ERROR line names the link thread; log:\n{log}"));
    assert!(
        error.contains("unreadable") && error.contains(&victim.display().to_string()),
        "the ERROR line names the cause and the segment: {error}"
    );
    assert!(
        log.contains("weir-sender: error: weir-link failed"),
        "the exit message names the thread"
    );
}

#[test]
fn corrupt_bytes_mid_segment_of_a_stopped_sender_become_a_spool_corrupt_gap_and_the_rest_is_delivered(
) {
    let s = Scratch::new("spool-corrupt");
    let receiver_port = free_udp_port();
    let mut receiver = run(
        &s,
        "receiver",
        "weir-receiver",
        &receiver_config(&s, receiver_port),
    );
    // First run: a slow link and small FEC blocks (a small encoder
    // queue), so most records are unsent in the spool when it stops.
    let first = sender_config(
        &s,
        "sender-1.toml",
        receiver_port,
        "2Mbit",
        "",
        "[fec]\ndata_shards = 4\nparity_shards = 2\ninterleave = 2\n\
         [[sources]]\nname = \"gen\"\ntype = \"generator\"\ntags = 100\nrate = 50000\ncount = 50000\n",
    );
    let mut sender = run(&s, "sender-1", "weir-sender", &first);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        sender.stop(Duration::from_secs(20)),
        "the sender did not stop on SIGTERM"
    );
    let state = read_json(&s.join("spool/state.json"));
    let appended = state["streams"]["gen"]["next_seq"].as_u64().unwrap();
    let sent = state["sent_index"].as_u64().unwrap();
    assert_eq!(appended, 50_000, "the generator spooled its count");
    assert!(sent < 25_000, "most records unsent: {sent}");

    // 100 bytes of garbage at 3/4 of the (only) segment, in unsent records.
    let segs = segments(&s);
    let seg = segs.last().unwrap();
    let before = std::fs::read(seg).unwrap();
    let entries = spool_entries(&before);
    assert_eq!(entries.len() as u64, appended, "one segment holds them all");
    let from = before.len() * 3 / 4;
    overwrite(seg, from as u64, &[0xee; 100]);
    let after = std::fs::read(seg).unwrap();
    // The records whose bytes the garbage changed.
    let hit: Vec<u64> = entries
        .iter()
        .filter(|(at, size, _)| before[*at..at + size] != after[*at..at + size])
        .map(|e| e.2)
        .collect();
    assert!(
        hit.windows(2).all(|w| w[1] == w[0] + 1),
        "one stream, consecutive records: {hit:?}"
    );
    let (lost_from, lost_to) = (hit[0], *hit.last().unwrap());
    assert!(lost_from > sent, "the damage is in unsent records");

    // Second run: a fast link. An idle tcp source keeps it running (with
    // its heartbeats) until the receiver has followed the new session and
    // has every record: without authentication it waits for the old
    // session's silence first (docs/wire-format.md, Sessions).
    std::thread::sleep(OLD_SESSION_SILENCE);
    let second = sender_config(
        &s,
        "sender-2.toml",
        receiver_port,
        "200Mbit",
        "",
        &format!(
            "[[sources]]\nname = \"idle\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{}\"\n",
            free_tcp_port()
        ),
    );
    let mut sender = run(&s, "sender-2", "weir-sender", &second);
    let audit = s.join("audit.jsonl");
    let out = s.join("out");
    let accounted = || {
        let g: u64 = gaps(&audit, "gen").iter().map(|g| g.1 - g.0 + 1).sum();
        written_seqs(&out, "gen").len() as u64 + g
    };
    assert!(
        wait_until(Duration::from_secs(60), || accounted() >= appended),
        "the restarted sender's records and gap reached the receiver: {} of {appended}",
        accounted()
    );
    assert!(sender.stop(Duration::from_secs(20)), "sender stop");
    assert!(receiver.stop(Duration::from_secs(20)), "receiver stop");

    let gen_gaps = gaps(&s.join("audit.jsonl"), "gen");
    assert_eq!(
        gen_gaps,
        vec![(lost_from, lost_to, "sender-spool-corrupt".to_string())],
        "exactly the records the garbage hit are named, with their cause"
    );
    let written = written_seqs(&out, "gen");
    assert_exactly_accounted(&written, &gen_gaps, appended);
    let log = log_text(&s, "sender-2");
    assert!(
        log.contains("sender-spool-corrupt"),
        "the sender logs what it skipped"
    );
    let m = read_json(&s.join("sender-metrics.json"));
    assert_eq!(
        m["spool_corrupt_records"].as_u64(),
        Some(lost_to - lost_from + 1),
        "counted: {m}"
    );
}

#[test]
fn a_tcp_source_that_cannot_bind_its_address_makes_run_exit_non_zero_with_the_error() {
    let s = Scratch::new("bind-fails");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = sender_config(
        &s,
        "sender.toml",
        free_udp_port(),
        "10Mbit",
        "",
        &format!("[[sources]]\nname = \"raw\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut sender = run(&s, "sender", "weir-sender", &cfg);
    let status = exit_status(&mut sender, Duration::from_secs(10));
    let log = log_text(&s, "sender");
    let status =
        status.unwrap_or_else(|| panic!("the sender runs on without its source; log:\n{log}"));
    assert!(!status.success(), "exit status {status}");
    assert!(
        log.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && log.contains("weir-sender: error: source raw failed"),
        "the error names the source and the address; log:\n{log}"
    );
    drop(taken);
}

#[test]
fn a_tcp_source_whose_peer_resets_counts_it_shows_it_in_the_metrics_file_and_takes_the_next_connection(
) {
    use std::io::Write;
    let s = Scratch::new("peer-lost");
    let port = free_tcp_port();
    let cfg = sender_config(
        &s,
        "sender.toml",
        free_udp_port(),
        "100Mbit",
        "",
        &format!("[[sources]]\nname = \"raw\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut sender = run(&s, "sender", "weir-sender", &cfg);
    let metrics = s.join("sender-metrics.json");
    let source = |m: &Value| m["sources"]["raw"].clone();
    assert!(
        wait_until(Duration::from_secs(10), || source(&read_json(&metrics))
            ["state"]
            == "listening"),
        "the metrics file shows the source listening: {}",
        read_json(&metrics)
    );
    // A peer that sends, then resets the connection (SO_LINGER 0).
    let peer = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    peer.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let mut stream: std::net::TcpStream = peer.into();
    stream.write_all(&[1u8; 1000]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = read_json(&metrics);
            m["source_peer_errors"] == 1 && source(&m)["peer_errors"] == 1
        }),
        "the reset is counted and shown: {}",
        read_json(&metrics)
    );
    let m = read_json(&metrics);
    assert!(
        source(&m)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("reset")),
        "the status names the error: {m}"
    );
    // The next connection is taken as usual.
    let mut feed = tcpfeed(&s, "feed", port, "1M", 3);
    assert!(
        exit_status(&mut feed, Duration::from_secs(20)).is_some_and(|st| st.success()),
        "the next connection is read"
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = read_json(&metrics);
            source(&m)["connections"] == 2 && m["bytes_in"].as_u64() >= Some(1 << 20)
        }),
        "both connections counted and read: {}",
        read_json(&metrics)
    );
    assert!(sender.is_running(), "a lost peer does not stop the sender");
    assert!(sender.stop(Duration::from_secs(20)), "sender stop");
}
