//! End-to-end: the audit log's hash chain (`weir-receiver audit verify`)
//! and the open-gap report (`weir-receiver gaps`), with the real binary.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn receiver_config(s: &Scratch) -> std::path::PathBuf {
    let d = s.path.display();
    let auth = receiver_auth(s);
    s.write(
        "receiver.toml",
        &format!(
            "{auth}[link]\nlisten = \"127.0.0.1:{}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
             [metrics]\npath = \"{d}/receiver-metrics.json\"\n\
             [[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{d}/out\"\n",
            free_udp_port()
        ),
    )
}

/// Starts the receiver, waits until it runs, and stops it with SIGTERM:
/// two more audit lines (`receiver-start`, `receiver-stop`).
fn run_receiver_briefly(s: &Scratch, config: &Path, run: usize) {
    let audit = s.join("audit.jsonl");
    let metrics = s.join("receiver-metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let starts_before = count_events(&audit, "receiver-start");
    let mut receiver = Proc::spawn(
        s,
        &format!("receiver-{run}"),
        "weir-receiver",
        &["run", "--config", config.to_str().unwrap()],
    );
    // `receiver-start` is audited before the SIGTERM handler is installed;
    // the first metrics file is written 250 ms after the decoder thread
    // starts, by when the handler is in place.
    assert!(
        wait_until(Duration::from_secs(10), || {
            count_events(&audit, "receiver-start") > starts_before && metrics.exists()
        }),
        "the receiver did not start"
    );
    assert!(
        receiver.stop(Duration::from_secs(15)),
        "the receiver did not stop cleanly on SIGTERM"
    );
}

fn count_events(audit: &Path, event: &str) -> usize {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == event))
        .count()
}

/// An audit log written by two runs of the receiver (at least 4 lines).
fn two_run_audit_log(s: &Scratch) -> Vec<String> {
    let config = receiver_config(s);
    run_receiver_briefly(s, &config, 1);
    run_receiver_briefly(s, &config, 2);
    let lines: Vec<String> = std::fs::read_to_string(s.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert!(lines.len() >= 4, "audit log too short: {lines:?}");
    lines
}

fn write_lines(path: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn receiver(args: &[&str]) -> Output {
    std::process::Command::new(bin("weir-receiver"))
        .args(args)
        .output()
        .expect("running weir-receiver")
}

fn verify(path: &Path) -> (Option<i32>, String) {
    let out = receiver(&["audit", "verify", path.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `events` as a chained audit log, as the receiver does: `at` and
/// then `prev` appended to each line.
fn write_chained(path: &Path, events: &[(Value, &str)]) {
    let mut prev = GENESIS_PREV.to_string();
    let mut text = String::new();
    for (event, at) in events {
        let mut line = event.as_object().expect("an object").clone();
        line.insert("at".into(), json!(at));
        line.insert("prev".into(), json!(prev));
        let line = serde_json::to_string(&line).unwrap();
        prev = sha256_hex(line.as_bytes());
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

#[test]
fn audit_verify_passes_on_the_log_of_two_receiver_runs() {
    let s = Scratch::new("audit-intact");
    let lines = two_run_audit_log(&s);
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["event"], "receiver-start");
    assert_eq!(events[0]["prev"], GENESIS_PREV);
    assert_eq!(
        events.last().unwrap()["event"],
        "receiver-stop",
        "{lines:?}"
    );
    for (i, e) in events.iter().enumerate().skip(1) {
        assert_eq!(
            e["prev"],
            sha256_hex(lines[i - 1].as_bytes()),
            "line {}",
            i + 1
        );
    }
    let audit = s.join("audit.jsonl");
    let (code, text) = verify(&audit);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!(
            "{}: {} lines, chain intact",
            audit.display(),
            lines.len()
        )),
        "{text}"
    );
    assert!(
        text.contains(&sha256_hex(lines.last().unwrap().as_bytes())),
        "verify prints the last line's hash: {text}"
    );
}

#[test]
fn audit_verify_names_line_2_when_line_2_is_deleted() {
    let s = Scratch::new("audit-delete");
    let mut lines = two_run_audit_log(&s);
    lines.remove(1);
    let cut = s.join("cut.jsonl");
    write_lines(&cut, &lines);
    let (code, text) = verify(&cut);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("line 2: prev does not match line 1"),
        "{text}"
    );
}

#[test]
fn audit_verify_names_line_4_when_a_field_of_line_3_is_edited() {
    // Line 3 still parses and its own prev is right; the edit changes its
    // hash, so line 4 is the first line whose prev does not match.
    let s = Scratch::new("audit-edit");
    let mut lines = two_run_audit_log(&s);
    let mut third: serde_json::Map<String, Value> = serde_json::from_str(&lines[2]).unwrap();
    let at = third["at"].as_str().unwrap().replacen("20", "19", 1);
    third.insert("at".into(), json!(at));
    lines[2] = serde_json::to_string(&third).unwrap();
    let edited = s.join("edited.jsonl");
    write_lines(&edited, &lines);
    let (code, text) = verify(&edited);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("line 4: prev does not match line 3"),
        "{text}"
    );
    assert!(!text.contains("line 3:"), "{text}");
}

#[test]
fn the_receiver_repairs_a_torn_audit_tail_and_the_chain_still_verifies() {
    let s = Scratch::new("audit-torn");
    let config = receiver_config(&s);
    run_receiver_briefly(&s, &config, 1);
    let audit = s.join("audit.jsonl");
    let partial = b"{\"event\":\"gap\",\"stream\":\"pla";
    let mut bytes = std::fs::read(&audit).unwrap();
    bytes.extend_from_slice(partial);
    std::fs::write(&audit, &bytes).unwrap();
    let (code, text) = verify(&audit);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("line 3: no newline at the end"), "{text}");

    run_receiver_briefly(&s, &config, 2);
    let (code, text) = verify(&audit);
    assert_eq!(code, Some(0), "{text}");
    let events = json_lines(&audit);
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        &names[..4],
        [
            "receiver-start",
            "receiver-stop",
            "audit-repaired",
            "receiver-start"
        ]
    );
    assert_eq!(events[2]["truncated_bytes"], partial.len());
}

/// A config whose audit log is `events`, chained as the receiver writes it.
fn gaps_fixture(s: &Scratch, events: &[(Value, &str)]) -> std::path::PathBuf {
    let audit = s.join("crafted.jsonl");
    write_chained(&audit, events);
    s.write(
        "gaps.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:9\"\n[audit]\npath = \"{}\"\n[[sinks]]\nname = \"out\"\ntype = \"stdout\"\n",
            receiver_auth(s),
            audit.display()
        ),
    )
}

fn stdout_of(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn gaps_lists_open_gaps_with_a_partly_recovered_gap_split_in_two() {
    let s = Scratch::new("gaps-open");
    let config = gaps_fixture(
        &s,
        &[
            (
                json!({ "event": "receiver-start", "listen": "127.0.0.1:9", "version": "0.1.0", "restored_streams": 0 }),
                "2026-11-25T11:00:00.000000000Z",
            ),
            (
                json!({ "event": "gap", "stream": "plant/b", "from": 5, "to": 5, "cause": "receiver-down" }),
                "2026-11-25T11:00:01.000000000Z",
            ),
            (
                json!({ "event": "gap", "stream": "plant/a", "from": 10, "to": 19, "cause": "link-loss" }),
                "2026-11-25T11:00:02.000000000Z",
            ),
            (
                json!({ "event": "recovered", "stream": "plant/a", "from": 12, "to": 14 }),
                "2026-11-25T11:00:03.000000000Z",
            ),
            (
                json!({ "event": "receiver-stop" }),
                "2026-11-25T11:00:04.000000000Z",
            ),
        ],
    );
    // The crafted file is a valid chain: the test and the receiver agree.
    let (code, text) = verify(&s.join("crafted.jsonl"));
    assert_eq!(code, Some(0), "{text}");

    let table = stdout_of(&receiver(&["gaps", "--config", config.to_str().unwrap()]));
    assert_eq!(
        table,
        "STREAM   FROM  TO  RECORDS  CAUSE          FIRST REPORTED AT\n\
         plant/a    10  11        2  link-loss      2026-11-25T11:00:02.000000000Z\n\
         plant/a    15  19        5  link-loss      2026-11-25T11:00:02.000000000Z\n\
         plant/b     5   5        1  receiver-down  2026-11-25T11:00:01.000000000Z\n\
         3 open gaps, 8 records\n"
    );

    let out = stdout_of(&receiver(&[
        "gaps",
        "--config",
        config.to_str().unwrap(),
        "--json",
    ]));
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        rows,
        [
            json!({ "stream": "plant/a", "from": 10, "to": 11, "records": 2, "cause": "link-loss", "at": "2026-11-25T11:00:02.000000000Z" }),
            json!({ "stream": "plant/a", "from": 15, "to": 19, "records": 5, "cause": "link-loss", "at": "2026-11-25T11:00:02.000000000Z" }),
            json!({ "stream": "plant/b", "from": 5, "to": 5, "records": 1, "cause": "receiver-down", "at": "2026-11-25T11:00:01.000000000Z" }),
        ]
    );
}

#[test]
fn gaps_prints_no_open_gaps_when_every_gap_was_recovered() {
    let s = Scratch::new("gaps-none");
    let config = gaps_fixture(
        &s,
        &[
            (
                json!({ "event": "gap", "stream": "plant/a", "from": 10, "to": 19, "cause": "link-loss" }),
                "2026-11-25T11:00:02.000000000Z",
            ),
            (
                json!({ "event": "recovered", "stream": "plant/a", "from": 10, "to": 14 }),
                "2026-11-25T11:00:03.000000000Z",
            ),
            (
                json!({ "event": "recovered", "stream": "plant/a", "from": 15, "to": 19 }),
                "2026-11-25T11:00:04.000000000Z",
            ),
        ],
    );
    let out = stdout_of(&receiver(&["gaps", "--config", config.to_str().unwrap()]));
    assert_eq!(out, "no open gaps\n");
    let out = stdout_of(&receiver(&[
        "gaps",
        "--config",
        config.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(out, "", "--json prints only gaps");
}
