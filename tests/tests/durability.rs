//! Durability end to end: the sender's disk spool across kill -9, overflow,
//! a torn segment tail, and an operator's resend of a gap the link lost.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Receiver config: file sink into `out`, audit, journal and metrics inside
/// the scratch directory.
fn receiver_config(s: &Scratch, listen_port: u16, out: &Path) -> PathBuf {
    let d = s.path.display();
    let auth = receiver_auth(s);
    s.write(
        "receiver.toml",
        &format!(
            "{auth}[link]\nlisten = \"127.0.0.1:{listen_port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n\
             [journal]\npath = \"{d}/state\"\n[metrics]\npath = \"{d}/receiver-metrics.json\"\n\
             log_interval_s = 1\n[[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{}\"\n",
            out.display()
        ),
    )
}

/// Sender config text: spool and metrics inside the scratch directory;
/// `spool` adds keys to `[spool]`, `rest` adds sections and sources.
fn sender_config(s: &Scratch, dest_port: u16, rate: &str, spool: &str, rest: &str) -> String {
    let d = s.path.display();
    let auth = sender_auth(s);
    format!(
        "{auth}[link]\ndestination = \"127.0.0.1:{dest_port}\"\nrate = \"{rate}\"\n\
         [metrics]\npath = \"{d}/sender-metrics.json\"\nlog_interval_s = 1\n\
         [spool]\npath = \"{d}/spool\"\n{spool}\n{rest}"
    )
}

fn run_receiver(s: &Scratch, cfg: &Path) -> Proc {
    Proc::spawn(
        s,
        "receiver",
        "weir-receiver",
        &["run", "--config", cfg.to_str().unwrap()],
    )
}

/// Runs a sender with its log in `{log}.log`.
fn run_sender(s: &Scratch, log: &str, cfg: &Path) -> Proc {
    Proc::spawn(
        s,
        log,
        "weir-sender",
        &["run", "--config", cfg.to_str().unwrap()],
    )
}

fn linksim(s: &Scratch, log: &str, listen: u16, target: u16, seed: u64, loss: f64) -> Proc {
    Linksim::new(s, listen, target, seed, loss)
        .name(log)
        .stats_file()
        .spawn()
}

/// Waits until the receiver's `records` counter has not moved for
/// `quiet`, at most `limit`; returns the last value.
fn wait_for_receiver_quiet(metrics: &Path, quiet: Duration, limit: Duration) -> u64 {
    let start = Instant::now();
    let mut last = read_json(metrics)["records"].as_u64().unwrap_or(0);
    let mut since = Instant::now();
    while start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(250));
        let now = read_json(metrics)["records"].as_u64().unwrap_or(0);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    last
}

/// Every sequence number in the ranges, as a set.
fn covered(ranges: &[(u64, u64, String)]) -> BTreeSet<u64> {
    ranges.iter().flat_map(|(f, t, _)| *f..=*t).collect()
}

/// `(from, to)` of every `recovered` event of `stream`.
fn recovered(audit: &Path, stream: &str) -> Vec<(u64, u64, String)> {
    json_lines(audit)
        .into_iter()
        .filter(|v| v["event"] == "recovered" && v["stream"] == stream)
        .map(|v| {
            (
                v["from"].as_u64().unwrap(),
                v["to"].as_u64().unwrap(),
                "recovered".to_string(),
            )
        })
        .collect()
}

/// The file sink's files of a stream with extension `ext`, oldest first:
/// numbered `{stem}.{n}.{ext}` files in number order (a `{first}-{last}`
/// range counts as its first), then an unnumbered `{stem}.{ext}`.
fn stream_files(out: &Path, stem: &str, ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(out).into_iter().flatten().flatten() {
        let name = e.file_name().into_string().unwrap_or_default();
        let Some(middle) = name
            .strip_prefix(stem)
            .and_then(|n| n.strip_suffix(&format!(".{ext}")))
        else {
            continue;
        };
        let order = if middle.is_empty() {
            u64::MAX
        } else {
            let Some(n) = middle
                .strip_prefix('.')
                .and_then(|m| m.split('-').next())
                .and_then(|m| m.parse::<u64>().ok())
            else {
                continue;
            };
            n
        };
        found.push((order, e.path()));
    }
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// Every JSON line the file sink wrote for a stream, in write order.
fn lines_of(out: &Path, stem: &str) -> Vec<Value> {
    stream_files(out, stem, "jsonl")
        .iter()
        .flat_map(|p| json_lines(p))
        .collect()
}

/// Sequence numbers of a stream's JSON lines, in write order.
fn seqs_of(out: &Path, stem: &str) -> Vec<u64> {
    lines_of(out, stem)
        .iter()
        .map(|v| v["seq"].as_u64().expect("seq"))
        .collect()
}

#[test]
fn kill_9_of_the_sender_mid_run_loses_nothing_and_duplicates_nothing() {
    let s = Scratch::new("kill9");
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let out = s.join("out");
    let rcfg = receiver_config(&s, receiver_port, &out);
    let mut receiver = run_receiver(&s, &rcfg);
    let _linksim = linksim(&s, "linksim", sender_port, receiver_port, 21, 0.01);
    let source_port = free_tcp_port();
    let scfg = s.write(
        "sender.toml",
        &sender_config(
            &s,
            sender_port,
            "200Mbit",
            // Spreading keeps up to 100 ms of blocks half sent; a kill then
            // leaves those with a lost shard unrecoverable, and their records
            // come back only as out-of-order recoveries from the restarted
            // sender's spool (tested in protocol/tests/sim.rs,
            // `a_restarted_sender_resending_from_its_spool_fills_the_gap_its_predecessor_left`).
            // This test is about the spool: blocks go out back to back.
            "[fec]\nburst_tolerance = 0\n",
            &format!(
                "[[sources]]\nname = \"plant/gen\"\ntype = \"generator\"\ntags = 50\nrate = 30000\n\
                 [[sources]]\nname = \"raw\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{source_port}\"\n"
            ),
        ),
    );
    let mut sender = run_sender(&s, "sender-1", &scfg);
    let feed_bytes: u64 = 20 << 20;
    let feed_seed = 9u64;
    let mut feed = Proc::spawn(
        &s,
        "tcpfeed",
        "weir-tcpfeed",
        &[
            "--connect",
            &format!("127.0.0.1:{source_port}"),
            "--bytes",
            "20M",
            "--rate",
            "4M",
            "--seed",
            &feed_seed.to_string(),
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(sender.is_running(), "the sender died on its own");
    sender.signal("KILL");
    assert!(
        wait_until(Duration::from_secs(5), || !sender.is_running()),
        "kill -9 did not end the sender"
    );
    // The feed's connection died with the sender.
    assert!(
        !feed.wait(Duration::from_secs(10)),
        "tcpfeed finished 20M at 4M/s in 2 s?"
    );
    let metrics = s.join("receiver-metrics.json");
    // What the receiver took from the killed sender (both streams), and
    // where the restart resends from: anything in between reaches the
    // receiver twice and must be dropped, exactly that many records.
    let received =
        wait_for_receiver_quiet(&metrics, Duration::from_secs(1), Duration::from_secs(5));
    let resend_from = read_json(&s.join("spool/state.json"))["sent_index"]
        .as_u64()
        .expect("state.json has sent_index");
    let before_restart = seqs_of(&out, "plant_gen").len();
    assert!(
        before_restart > 10_000,
        "about 2 s of records arrive before the kill: {before_restart}"
    );

    let mut sender = run_sender(&s, "sender-2", &scfg);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        sender.stop(Duration::from_secs(20)),
        "the restarted sender did not stop cleanly on SIGTERM"
    );
    wait_for_receiver_quiet(
        &metrics,
        Duration::from_millis(1500),
        Duration::from_secs(15),
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "receiver did not stop cleanly"
    );
    drop(feed);

    let audit = s.join("audit.jsonl");
    let written = seqs_of(&out, "plant_gen");
    let gen_gaps = gaps(&audit, "plant/gen");
    let max = written
        .iter()
        .copied()
        .chain(gen_gaps.iter().map(|g| g.1))
        .max()
        .expect("something arrived");
    assert!(
        written.len() > before_restart + 30_000,
        "the restarted sender delivered its 3 s of records: {} then {}",
        before_restart,
        written.len()
    );
    assert_exactly_accounted(&written, &gen_gaps, max + 1);
    let m = read_json(&metrics);
    assert_eq!(
        m["duplicate_records"].as_u64(),
        Some(received.saturating_sub(resend_from)),
        "the records sent both before the kill and after the restart \
         ({resend_from}..{received}) are each dropped once: {m}"
    );
    assert!(
        gen_gaps.is_empty(),
        "kill -9 left gaps in the generator stream (records lost or numbers skipped): {gen_gaps:?}"
    );

    // The raw TCP stream: what was written is exactly the start of what
    // tcpfeed sent (bytes taken but not yet spooled die with the process;
    // nothing may be missing in the middle or written twice).
    let raw_gaps = gaps(&audit, "raw");
    assert!(
        raw_gaps.is_empty(),
        "kill -9 lost raw stream records: {raw_gaps:?}"
    );
    let bin: Vec<u8> = stream_files(&out, "raw", "bin")
        .iter()
        .flat_map(|p| std::fs::read(p).expect("reading a raw stream file"))
        .collect();
    assert!(
        bin.len() > 1 << 20,
        "some of the raw stream arrived: {}",
        bin.len()
    );
    let mut pattern = weir_tests::pattern::Pattern::new(feed_seed, feed_bytes);
    let mut chunk = vec![0u8; weir_tests::pattern::CHUNK];
    let mut at = 0usize;
    while at < bin.len() {
        let n = pattern.next_chunk(&mut chunk);
        assert!(n > 0, "raw.bin is longer than what tcpfeed sent");
        let take = n.min(bin.len() - at);
        if bin[at..at + take] != chunk[..take] {
            let off = (0..take).find(|i| bin[at + i] != chunk[*i]).unwrap();
            panic!(
                "raw.bin differs from the fed stream at byte {} of {}",
                at + off,
                bin.len()
            );
        }
        at += take;
    }
}

#[test]
fn spool_overflow_drops_exactly_the_ranges_it_reports() {
    let s = Scratch::new("overflow");
    let receiver_port = free_udp_port();
    let out = s.join("out");
    let rcfg = receiver_config(&s, receiver_port, &out);
    let mut receiver = run_receiver(&s, &rcfg);
    let total = 200_000u64;
    // Small FEC blocks keep the encoder's own queue (64 blocks) small, so
    // the spool, not the encoder, holds the backlog and the drain is quick.
    // Interleave 2 sends a group (2 x 20 frames) in ~0.12 s at 4 Mbit/s,
    // within the receiver's 300 ms `decoder.block_timeout_ms`: the receiver
    // gives up a block whose group takes longer, as link loss, although
    // every frame arrives. That is a separate receiver problem; this test
    // is about the spool.
    let scfg = s.write(
        "sender.toml",
        &sender_config(
            &s,
            receiver_port,
            "4Mbit",
            "max_bytes = \"1MiB\"\nfsync_bytes = \"256KiB\"\n",
            &format!(
                "[fec]\ndata_shards = 16\nparity_shards = 4\ninterleave = 2\n\
                 [[sources]]\nname = \"gen\"\ntype = \"generator\"\ntags = 100\nrate = 40000\ncount = {total}\n"
            ),
        ),
    );
    let mut sender = run_sender(&s, "sender", &scfg);
    assert!(
        sender.wait(Duration::from_secs(45)),
        "the sender did not drain and exit cleanly"
    );
    let metrics = s.join("receiver-metrics.json");
    let audit = s.join("audit.jsonl");
    wait_until(Duration::from_secs(10), || {
        let w = read_json(&metrics)["records"].as_u64().unwrap_or(0);
        w + covered(&gaps(&audit, "gen")).len() as u64 >= total
    });
    assert!(receiver.stop(Duration::from_secs(20)));

    let written = seqs_of(&out, "gen");
    let all_gaps = gaps(&audit, "gen");
    let causes: BTreeSet<&str> = all_gaps.iter().map(|g| g.2.as_str()).collect();
    assert!(
        all_gaps.iter().all(|g| g.2 == "sender-spool-overflow"),
        "only overflow gaps, found causes {causes:?}: {all_gaps:?}"
    );
    assert!(
        !all_gaps.is_empty(),
        "the spool overflowed (sources far faster than the link)"
    );
    assert_exactly_accounted(&written, &all_gaps, total);
    let dropped: u64 = all_gaps.iter().map(|g| g.1 - g.0 + 1).sum();
    let sm = read_json(&s.join("sender-metrics.json"));
    assert_eq!(
        sm["spool_dropped_records"].as_u64(),
        Some(dropped),
        "the sender counts exactly the records its gap notices name: {sm}"
    );
    assert!(
        log_text(&s, "sender").contains("sender-spool-overflow"),
        "the sender logs each dropped range"
    );
}

#[test]
fn a_torn_spool_tail_is_repaired_and_only_the_torn_record_is_lost() {
    let s = Scratch::new("torn");
    let receiver_port = free_udp_port();
    let out = s.join("out");
    let rcfg = receiver_config(&s, receiver_port, &out);
    let mut receiver = run_receiver(&s, &rcfg);
    // First run: a slow link and small FEC blocks (a small encoder queue,
    // short interleave groups), so most records are still unsent in the
    // spool when it stops. One tag per record: seq i carries tag i, which
    // identifies each record.
    let tags = 100_000u32;
    let first = s.write(
        "sender-1.toml",
        &sender_config(
            &s,
            receiver_port,
            "2Mbit",
            "",
            &format!(
                "[fec]\ndata_shards = 4\nparity_shards = 2\ninterleave = 2\n\
                 [[sources]]\nname = \"gen\"\ntype = \"generator\"\ntags = {tags}\nrate = 20000\n"
            ),
        ),
    );
    let mut sender = run_sender(&s, "sender-1", &first);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        sender.stop(Duration::from_secs(20)),
        "the sender did not stop cleanly on SIGTERM"
    );
    let state = read_json(&s.join("spool/state.json"));
    let appended = state["streams"]["gen"]["next_seq"]
        .as_u64()
        .expect("state.json names the stream's next sequence number");
    let sent = state["sent_index"].as_u64().expect("sent_index");
    assert!(
        appended > 20_000 && appended < u64::from(tags),
        "about 1.5 s of records spooled: {appended}"
    );
    assert!(
        sent + 1000 < appended,
        "most records still unsent when stopped: sent {sent} of {appended}"
    );
    let mut segments: Vec<PathBuf> = std::fs::read_dir(s.join("spool/segments"))
        .expect("segments dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let newest = segments.last().expect("spool segments exist").clone();
    let len = std::fs::metadata(&newest).unwrap().len();
    assert!(len > 1000, "the newest segment holds records: {len} bytes");
    // 37 bytes: less than one record (~50 bytes), so only the last is torn.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(len - 37)
        .unwrap();
    let torn_seq = appended - 1;

    // Second run: a fast link; the generator adds one record and finishes,
    // so the sender sends everything spooled and exits.
    let second = s.write(
        "sender-2.toml",
        &sender_config(
            &s,
            receiver_port,
            "200Mbit",
            "",
            "[[sources]]\nname = \"gen\"\ntype = \"generator\"\ntags = 1\nrate = 1000\ncount = 1\n",
        ),
    );
    let mut sender = run_sender(&s, "sender-2", &second);
    assert!(
        sender.wait(Duration::from_secs(30)),
        "the restarted sender did not drain and exit cleanly"
    );
    let metrics = s.join("receiver-metrics.json");
    // Without authentication the receiver follows the new session only 2 s
    // after the old one's last frame (the takeover rule, wire-format.md).
    wait_for_receiver_quiet(
        &metrics,
        Duration::from_millis(3000),
        Duration::from_secs(10),
    );
    assert!(receiver.stop(Duration::from_secs(20)));

    let log = log_text(&s, "sender-2");
    assert!(
        log.contains("torn tail"),
        "the restarted sender logs the torn tail it truncated"
    );
    let lines = lines_of(&out, "gen");
    let written: Vec<u64> = lines.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(
        written.windows(2).all(|w| w[0] < w[1]),
        "records written out of order or twice"
    );
    // Every record before the torn one arrived, each the record first
    // spooled under its number.
    for (i, line) in lines.iter().enumerate().take(torn_seq as usize) {
        assert_eq!(line["seq"].as_u64(), Some(i as u64), "record #{i}");
        assert_eq!(
            line["tag"].as_str(),
            Some(format!("gen/tag-{i:05}").as_str()),
            "record #{i} is the one first spooled as seq {i}"
        );
    }
    // The torn record never arrives, and it is the only one missing. Its
    // number was in the saved sequence state (a clean stop saved it), so
    // the spool must not hand it out again: the record the second run
    // appended comes after it, and the one missing number is a gap.
    assert!(
        !lines
            .iter()
            .any(|l| l["tag"].as_str() == Some(&format!("gen/tag-{torn_seq:05}"))),
        "the torn record was delivered"
    );
    let last = lines.last().expect("records written");
    assert_eq!(
        last["tag"].as_str(),
        Some("gen/tag-00000"),
        "the last record is the one the second run appended"
    );
    let last_seq = last["seq"].as_u64().unwrap();
    let g = gaps(&s.join("audit.jsonl"), "gen");
    assert_exactly_accounted(&written, &g, last_seq + 1);
    if last_seq == torn_seq {
        assert!(g.is_empty(), "the torn number was reused: no gap {g:?}");
    } else {
        assert_eq!(
            (last_seq, g.len(), g[0].0, g[0].1),
            (appended, 1, torn_seq, torn_seq),
            "one gap, exactly the torn record: {g:?}"
        );
        assert_ne!(
            g[0].2, "link-loss",
            "the torn record (seq {torn_seq}) was lost in the sender's spool, yet the audit \
             log blames the link (the sender announces nothing for it)"
        );
    }
}

#[test]
fn resend_fills_a_gap_caused_by_link_loss_and_the_audit_log_shows_its_recovery() {
    let s = Scratch::new("resend");
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let out = s.join("out");
    let rcfg = receiver_config(&s, receiver_port, &out);
    let mut receiver = run_receiver(&s, &rcfg);
    let lossy = linksim(&s, "linksim-lossy", sender_port, receiver_port, 31, 0.6);
    let total = 20_000u64;
    let idle_port = free_tcp_port();
    // The tcp source nobody connects to keeps the sender running after the
    // generator's count, so it can take the resend requests.
    let scfg = s.write(
        "sender.toml",
        &sender_config(
            &s,
            sender_port,
            "100Mbit",
            // Four parity shards and no spare parity, shards back to back.
            // The run makes some 240 blocks of one to a few data shards
            // (flush_ms), and 60% loss takes 8-42% of such blocks: some are
            // lost, most get through, whatever sizes timing gives them. With
            // the default 16 parity shards every block got through in about
            // one run in five on a loaded machine.
            "[fec]\nparity_shards = 4\nspare_parity_max = 4\nburst_tolerance = 0\nwarmup_blocks = 0\n",
            &format!(
                "[[sources]]\nname = \"gen\"\ntype = \"generator\"\ntags = 10\nrate = 10000\ncount = {total}\n\
                 [[sources]]\nname = \"idle\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{idle_port}\"\n"
            ),
        ),
    );
    let mut sender = run_sender(&s, "sender", &scfg);
    let audit = s.join("audit.jsonl");
    // Lost blocks become gaps once later records or a heartbeat name them.
    let accounted = || {
        let mut all = covered(&gaps(&audit, "gen"));
        all.extend(seqs_of(&out, "gen"));
        all.len() as u64
    };
    assert!(
        wait_until(Duration::from_secs(20), || accounted() >= total),
        "the receiver did not account for all {total} records: {}",
        accounted()
    );
    let lost = gaps(&audit, "gen");
    assert!(!lost.is_empty(), "60% loss beat the FEC somewhere");
    assert!(
        lost.iter().all(|g| g.2 == "link-loss"),
        "gaps are link losses: {lost:?}"
    );
    let written_before = seqs_of(&out, "gen").len() as u64;
    assert!(written_before > 0, "some blocks got through");
    drop(lossy);
    let _clean = linksim(&s, "linksim-clean", sender_port, receiver_port, 32, 0.0);

    for (from, to, _) in &lost {
        let done = Command::new(bin("weir-sender"))
            .args([
                "resend",
                "--config",
                scfg.to_str().unwrap(),
                "--stream",
                "gen",
                "--from",
                &from.to_string(),
                "--to",
                &to.to_string(),
            ])
            .output()
            .expect("running weir-sender resend");
        assert!(
            done.status.success(),
            "resend {from}..={to} failed: {}{}",
            String::from_utf8_lossy(&done.stdout),
            String::from_utf8_lossy(&done.stderr)
        );
    }
    let metrics = s.join("receiver-metrics.json");
    let lost_records = covered(&lost).len() as u64;
    let all_recovered = wait_until(Duration::from_secs(15), || {
        covered(&recovered(&audit, "gen")).len() as u64 >= lost_records
    });
    wait_for_receiver_quiet(
        &metrics,
        Duration::from_millis(1000),
        Duration::from_secs(10),
    );
    assert!(
        sender.stop(Duration::from_secs(20)),
        "the sender did not stop cleanly"
    );
    assert!(receiver.stop(Duration::from_secs(20)));

    let rec = covered(&recovered(&audit, "gen"));
    let missing: Vec<u64> = covered(&lost).difference(&rec).take(10).copied().collect();
    assert!(
        all_recovered && missing.is_empty(),
        "recovered events cover every gap; not recovered (first 10): {missing:?}"
    );
    let mut written = seqs_of(&out, "gen");
    written.sort_unstable();
    assert_eq!(
        written.len() as u64,
        total,
        "every record written once after the resends ({} before them, {lost_records} lost)",
        written_before
    );
    assert_complete_in_order(&written, total);
    let open = Command::new(bin("weir-receiver"))
        .args(["gaps", "--config", rcfg.to_str().unwrap()])
        .output()
        .expect("running weir-receiver gaps");
    let text = String::from_utf8_lossy(&open.stdout);
    assert!(open.status.success(), "weir-receiver gaps failed: {text}");
    assert!(text.contains("no open gaps"), "open gaps remain: {text}");
}
