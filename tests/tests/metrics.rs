//! End-to-end: `[metrics] listen` on both sides serves Prometheus text at
//! `/metrics` during a run, and what it shows matches what the run did;
//! the receiver's `[approval] hashes` alerts on an unapproved sender
//! configuration without stopping the flow.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::*;

/// One HTTP/1.1 request to 127.0.0.1:port; (status code, body).
fn http(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The samples of a scrape: `name{labels}` (labels as written) -> value.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let Some((200, body)) = http(port, "GET", "/metrics") else {
        return BTreeMap::new();
    };
    assert!(
        body.ends_with("# EOF\n"),
        "not a complete OpenMetrics text: {body}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample `{key}` in the scrape: {m:#?}"))
}

fn sender_hash(config: &Path) -> String {
    let out = std::process::Command::new(bin("weir-sender"))
        .args(["check-config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let hash = text
        .lines()
        .find_map(|l| l.strip_prefix("# sha256: "))
        .expect("check-config prints `# sha256: HASH`")
        .to_string();
    assert!(
        text.contains(&format!("[approval] hashes = [\"{hash}\"]")),
        "check-config shows how to approve the hash: {text}"
    );
    hash
}

struct Run {
    s: Scratch,
    receiver: Proc,
    sender: Proc,
    linksim: Proc,
    sender_metrics: u16,
    receiver_metrics: u16,
    hash: String,
    total: u64,
}

/// receiver (file sink, metrics on a TCP port, `approval`) <- linksim (2%
/// loss) <- sender (a generator of `total` points, and an idle tcp source
/// that keeps it running once the points are sent).
fn start(name: &str, approval: impl FnOnce(&str) -> String) -> Run {
    let s = Scratch::new(name);
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let (sender_metrics, receiver_metrics) = (free_tcp_port(), free_tcp_port());
    let d = s.path.display().to_string();
    let total = 20_000u64;
    let scfg = s.write(
        "sender.toml",
        &format!(
            "{}[link]\ndestination = \"127.0.0.1:{sender_port}\"\nrate = \"200Mbit\"\n\
             [metrics]\nlisten = \"127.0.0.1:{sender_metrics}\"\n[spool]\npath = \"{d}/spool\"\n\
             [[sources]]\nname = \"plant/gen\"\ntype = \"generator\"\ntags = 50\nrate = 10000\ncount = {total}\n\
             [[sources]]\nname = \"idle\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{}\"\n",
            sender_auth(&s),
            free_tcp_port()
        ),
    );
    let hash = sender_hash(&scfg);
    let rcfg = s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:{receiver_port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n\
             [journal]\npath = \"{d}/state\"\n[metrics]\nlisten = \"127.0.0.1:{receiver_metrics}\"\n{}\
             [[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{d}/out\"\n",
            receiver_auth(&s),
            approval(&hash)
        ),
    );
    let receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &["run", "--config", rcfg.to_str().unwrap()],
    );
    let linksim = Linksim::new(&s, sender_port, receiver_port, 11, 0.02)
        .stats_file()
        .spawn();
    assert!(
        wait_until(Duration::from_secs(10), || !scrape(receiver_metrics)
            .is_empty()),
        "the receiver serves nothing on metrics.listen"
    );
    let sender = Proc::spawn(
        &s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    Run {
        s,
        receiver,
        sender,
        linksim,
        sender_metrics,
        receiver_metrics,
        hash,
        total,
    }
}

impl Run {
    /// Waits until the file sink confirmed every point.
    fn wait_delivered(&self) {
        let key = "weir_receiver_sink_records_total{sink=\"files\"}".to_string();
        assert!(
            wait_until(Duration::from_secs(45), || {
                scrape(self.receiver_metrics).get(&key).copied() == Some(self.total as f64)
            }),
            "the file sink did not write {} records: {:#?}",
            self.total,
            scrape(self.receiver_metrics)
        );
    }

    /// Waits for the approval verdict, which comes with the sender's
    /// heartbeat: the points can all be written before one crosses (the
    /// generator bursts, a heartbeat is one datagram a second, and the
    /// link drops 2%), so delivery alone does not mean it is there.
    fn wait_verdict(&self) -> BTreeMap<String, f64> {
        let key = "weir_receiver_sender_config_approved";
        assert!(
            wait_until(Duration::from_secs(15), || scrape(self.receiver_metrics)
                .contains_key(key)),
            "no heartbeat brought the sender's configuration hash: {:#?}",
            scrape(self.receiver_metrics)
        );
        scrape(self.receiver_metrics)
    }
}

#[test]
fn both_sides_serve_prometheus_text_whose_counters_match_the_run() {
    let mut run = start("metrics", |_| String::new());
    // Scraped while the sender runs: it counts what it took in.
    assert!(
        wait_until(Duration::from_secs(20), || {
            scrape(run.sender_metrics)
                .get("weir_sender_records_in_total")
                .is_some_and(|v| *v > 0.0)
        }),
        "the sender's metrics never showed records"
    );
    run.wait_delivered();
    // The sender's status comes with its heartbeats, which need not have
    // crossed yet (see `wait_verdict`).
    assert!(
        wait_until(Duration::from_secs(15), || scrape(run.receiver_metrics)
            .get("weir_receiver_heartbeats_total")
            .is_some_and(|v| *v > 0.0)),
        "no heartbeat crossed: {:#?}",
        scrape(run.receiver_metrics)
    );
    // Stop the link: what the receiver got is then exactly what linksim forwarded.
    assert!(run.linksim.stop(Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(1500));
    let link = read_json(&run.s.join("linksim.json"));
    let (received, forwarded) = (
        link["received"].as_u64().unwrap(),
        link["forwarded"].as_u64().unwrap(),
    );
    let r = scrape(run.receiver_metrics);
    let sm = scrape(run.sender_metrics);
    let n = run.total as f64;

    // Sender: every point in, spooled and sent; frames at least what linksim saw.
    assert_eq!(get(&sm, "weir_sender_records_in_total"), n);
    assert_eq!(get(&sm, "weir_sender_records_sent_total"), n);
    assert_eq!(get(&sm, "weir_sender_spool_dropped_records_total"), 0.0);
    assert!(
        get(&sm, "weir_sender_frames_sent_total") >= received as f64,
        "{sm:#?}"
    );
    assert!(
        get(&sm, "weir_sender_frames_sent_total")
            >= get(&sm, "weir_sender_data_frames_total")
                + get(&sm, "weir_sender_parity_frames_total")
    );
    assert!(get(&sm, "weir_sender_blocks_sent_total") > 0.0);
    assert!(get(&sm, "weir_sender_spool_bytes") > 0.0);
    // The spool fsynced what it took, so its longest fsync is known; a
    // slow one (100 ms or more) is counted, not expected.
    assert!(get(&sm, "weir_sender_spool_fsync_max_seconds") > 0.0);
    assert!(get(&sm, "weir_sender_spool_slow_fsyncs_total") >= 0.0);
    let config = format!("weir_sender_config{{config_hash=\"{}\",session=", run.hash);
    assert!(
        sm.keys().any(|k| k.starts_with(&config)),
        "no {config}: {sm:#?}"
    );
    assert!(
        sm.contains_key("weir_build_info{side=\"sender\",version=\"0.1.0\"}"),
        "{sm:#?}"
    );
    assert_eq!(
        get(
            &sm,
            "weir_sender_source_state{source=\"plant/gen\",state=\"finished\"}"
        ),
        1.0
    );

    // Receiver: exactly what crossed the link, every point delivered, FEC
    // repaired linksim's loss, nothing lost or rejected, nothing behind.
    assert!(forwarded < received, "linksim dropped nothing: {link}");
    assert_eq!(
        get(&r, "weir_receiver_datagrams_received_total"),
        forwarded as f64
    );
    assert_eq!(
        get(
            &r,
            "weir_receiver_stream_records_total{stream=\"plant/gen\"}"
        ),
        n
    );
    assert_eq!(get(&r, "weir_receiver_records_total"), n);
    assert_eq!(
        get(
            &r,
            "weir_receiver_stream_last_sequence{stream=\"plant/gen\"}"
        ),
        n - 1.0,
        "sequence numbers start at 0"
    );
    assert!(
        get(&r, "weir_receiver_blocks_repaired_total") > 0.0,
        "{r:#?}"
    );
    assert_eq!(get(&r, "weir_receiver_blocks_lost_total"), 0.0);
    assert!(
        !r.keys().any(|k| k.starts_with("weir_receiver_gaps_total")),
        "gaps: {r:#?}"
    );
    assert_eq!(
        get(&r, "weir_receiver_frames_rejected_total{reason=\"crc\"}"),
        0.0
    );
    assert_eq!(
        get(
            &r,
            "weir_receiver_frames_rejected_total{reason=\"bad_tag\"}"
        ),
        0.0
    );
    assert_eq!(
        get(&r, "weir_receiver_sink_lag_records{sink=\"files\"}"),
        0.0
    );
    assert_eq!(
        get(&r, "weir_receiver_sink_lag_seconds{sink=\"files\"}"),
        0.0
    );
    assert_eq!(
        get(&r, "weir_receiver_sink_errors_total{sink=\"files\"}"),
        0.0
    );
    assert!(get(&r, "weir_receiver_journal_bytes") > 0.0);
    assert!(get(&r, "weir_receiver_journal_fsync_max_seconds") > 0.0);
    assert!(get(&r, "weir_receiver_journal_slow_fsyncs_total") >= 0.0);
    let age = get(&r, "weir_receiver_heartbeat_age_seconds");
    assert!(
        (1.5..10.0).contains(&age),
        "heartbeats stopped with the link 1.5 s ago: age {age}"
    );
    let seen = format!(
        "weir_receiver_sender_config{{config_hash=\"{}\",session=",
        run.hash
    );
    assert!(r.keys().any(|k| k.starts_with(&seen)), "no {seen}: {r:#?}");
    assert!(
        !r.contains_key("weir_receiver_sender_config_approved"),
        "no [approval], no verdict"
    );
    // As of the last heartbeat that crossed before the link stopped.
    let reported = get(&r, "weir_receiver_sender_status{counter=\"records_sent\"}");
    assert!(
        reported > 0.0 && reported <= n,
        "sender's records_sent in heartbeats: {reported}"
    );
    assert!(
        r.contains_key("weir_build_info{side=\"receiver\",version=\"0.1.0\"}"),
        "{r:#?}"
    );

    // Read-only: nothing but GET and HEAD, nothing but /metrics.
    assert_eq!(
        http(run.receiver_metrics, "POST", "/metrics").map(|r| r.0),
        Some(405)
    );
    assert_eq!(
        http(run.sender_metrics, "DELETE", "/metrics").map(|r| r.0),
        Some(405)
    );
    assert_eq!(
        http(run.receiver_metrics, "GET", "/nothing").map(|r| r.0),
        Some(404)
    );

    assert!(
        run.sender.stop(Duration::from_secs(15)),
        "the sender did not stop on SIGTERM"
    );
    assert!(
        run.receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop on SIGTERM"
    );
}

fn audit_events(audit: &Path, event: &str) -> Vec<serde_json::Value> {
    json_lines(audit)
        .into_iter()
        .filter(|v| v["event"] == event)
        .collect()
}

#[test]
fn an_unapproved_sender_configuration_is_alerted_and_records_keep_flowing() {
    let other = "ab".repeat(32);
    let mut run = start("unapproved", |_| {
        format!("[approval]\nhashes = [\"{other}\"]\n")
    });
    run.wait_delivered();
    let r = run.wait_verdict();
    assert_eq!(get(&r, "weir_receiver_sender_config_approved"), 0.0);
    assert_eq!(get(&r, "weir_receiver_config_not_approved_total"), 1.0);
    let audit = run.s.join("audit.jsonl");
    let alerts = audit_events(&audit, "config-not-approved");
    assert_eq!(
        alerts.len(),
        1,
        "one alert per session and hash: {alerts:?}"
    );
    assert_eq!(alerts[0]["config_hash"], run.hash.as_str());
    assert_eq!(alerts[0]["approved"][0], other.as_str());
    // `weir-receiver status` shows the same on one screen.
    let out = std::process::Command::new(bin("weir-receiver"))
        .args([
            "status",
            "--config",
            run.s.join("receiver.toml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(screen.contains("sender:  alive"), "{screen}");
    assert!(
        screen.contains(&format!("{} (NOT APPROVED)", run.hash)),
        "{screen}"
    );
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("plant/gen") && l.split_whitespace().nth(1) == Some("19999")),
        "{screen}"
    );
    assert!(screen.lines().any(|l| l.starts_with("files ")), "{screen}");
    let log = std::fs::read_to_string(run.s.join("receiver.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("not approved") && l.contains(&run.hash)),
        "no ERROR line names the unapproved hash"
    );
    assert!(run.sender.stop(Duration::from_secs(15)));
    assert!(run.receiver.stop(Duration::from_secs(20)));
}

#[test]
fn an_approved_sender_configuration_raises_no_alert() {
    let mut run = start("approved", |hash| {
        format!(
            "[approval]\nhashes = [\"{}\", \"{hash}\"]\n",
            "cd".repeat(32)
        )
    });
    run.wait_delivered();
    let r = run.wait_verdict();
    assert_eq!(get(&r, "weir_receiver_sender_config_approved"), 1.0);
    assert_eq!(get(&r, "weir_receiver_config_not_approved_total"), 0.0);
    assert!(audit_events(&run.s.join("audit.jsonl"), "config-not-approved").is_empty());
    assert!(run.sender.stop(Duration::from_secs(15)));
    assert!(run.receiver.stop(Duration::from_secs(20)));
}

#[test]
fn a_malformed_approved_hash_is_refused_naming_the_key() {
    let s = Scratch::new("approval-config");
    let d = s.path.display();
    let cfg = s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:7\"\n[approval]\nhashes = [\"sha256:1234\"]\n\
             [[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{d}/out\"\n",
            receiver_auth(&s)
        ),
    );
    let out = std::process::Command::new(bin("weir-receiver"))
        .args(["check-config", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("approval.hashes[0]") && err.contains("check-config"),
        "{err}"
    );
}
