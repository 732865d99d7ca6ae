//! OPC UA end to end: weir-sender's `opcua` source subscribed to a real
//! server, the link (through weir-linksim with 2% loss), weir-receiver's
//! `file` sink.
//!
//! The server is `tests/peers/opcua_server.py` (asyncua, in the venv
//! /var/tmp/weir-venv that `.ci/run` installs), security None: a double,
//! an int, a bool and a string that change every 100 ms and one double
//! that is BadSensorFailure one second in two; it logs the counter and the
//! source timestamp of every change, so each point at the receiver is
//! checked against what the server published. Without the venv the test
//! prints why and passes as skipped; with `WEIR_SERVICES=1` that is a
//! failure.

mod common;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const VENV_PYTHON: &str = "/var/tmp/weir-venv/bin/python";

/// The venv's python when it has asyncua; otherwise prints why the test
/// is skipped (or fails when WEIR_SERVICES=1 says it must be there).
fn asyncua(test: &str) -> Option<PathBuf> {
    let ok = std::process::Command::new(VENV_PYTHON)
        .args(["-c", "import asyncua"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(PathBuf::from(VENV_PYTHON));
    }
    if std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1") {
        panic!(
            "{test}: WEIR_SERVICES=1 but {VENV_PYTHON} cannot import asyncua (.ci/run installs it)"
        );
    }
    eprintln!("SKIPPED {test}: {VENV_PYTHON} with asyncua is missing (python3 -m venv /var/tmp/weir-venv && /var/tmp/weir-venv/bin/pip install asyncua)");
    None
}

struct Pair {
    _linksim: Proc,
    _receiver: Proc,
    _sender: Proc,
    out: PathBuf,
}

/// sender (with `sources`) → linksim (2% loss) → receiver → file sink.
fn pair(s: &Scratch, sources: &str) -> Pair {
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let d = s.path.display();
    let out = s.join("out");
    let cfg = format!(
        "{}[link]\nlisten = \"127.0.0.1:{receiver_port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
         [metrics]\npath = \"{d}/receiver-metrics.json\"\nlog_interval_s = 1\n\
         [[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{}\"\n",
        receiver_auth(s),
        out.display()
    );
    let path = s.write("receiver.toml", &cfg);
    let receiver = Proc::spawn(
        s,
        "receiver",
        "weir-receiver",
        &["run", "--config", path.to_str().unwrap()],
    );
    let linksim = Proc::spawn(
        s,
        "linksim",
        "weir-linksim",
        &[
            "--listen",
            &format!("127.0.0.1:{sender_port}"),
            "--target",
            &format!("127.0.0.1:{receiver_port}"),
            "--seed",
            "13",
            "--loss",
            "0.02",
            "--burst-start",
            "0",
            "--burst-len",
            "0",
        ],
    );
    let cfg = format!(
        "{}[link]\ndestination = \"127.0.0.1:{sender_port}\"\nrate = \"50Mbit\"\n[metrics]\npath = \"{d}/sender-metrics.json\"\nlog_interval_s = 1\n[spool]\npath = \"{d}/spool\"\n{sources}",
        sender_auth(s),
    );
    let path = s.write("sender.toml", &cfg);
    let sender = Proc::spawn(
        s,
        "sender",
        "weir-sender",
        &["run", "--config", path.to_str().unwrap()],
    );
    Pair {
        _linksim: linksim,
        _receiver: receiver,
        _sender: sender,
        out,
    }
}

fn sender_metrics(s: &Scratch) -> Value {
    read_json(&s.join("sender-metrics.json"))
}

/// The points of `stream` the file sink wrote, in order.
fn points(out: &Path, stream: &str) -> Vec<Value> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    paths.sort();
    paths
        .iter()
        .flat_map(|p| json_lines(p))
        .filter(|r| r["stream"] == stream && r["kind"] == "point")
        .collect()
}

fn of_tag<'a>(points: &'a [Value], tag: &str) -> Vec<&'a Value> {
    points.iter().filter(|p| p["tag"] == tag).collect()
}

/// A point's timestamp in nanoseconds since the epoch.
fn ts_ns(p: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(p["ts"].as_str().unwrap())
        .unwrap()
        .timestamp_nanos_opt()
        .unwrap()
}

/// What the server published at each source timestamp: (n, faulty is bad).
fn published(log: &Path) -> HashMap<i64, (u64, bool)> {
    json_lines(log)
        .iter()
        .map(|l| {
            (
                l["ts_ns"].as_i64().unwrap(),
                (l["n"].as_u64().unwrap(), l["faulty_bad"].as_bool().unwrap()),
            )
        })
        .collect()
}

const TAGS: [&str; 5] = [
    "ns=2;s=Temp",
    "ns=2;i=1001",
    "ns=2;s=Flag",
    "ns=2;s=Label",
    "plant/faulty",
];

/// What the server held at counter `n` for each tag (see opcua_server.py).
fn expected(tag: &str, n: u64) -> Value {
    match tag {
        "ns=2;s=Temp" => Value::from(n as f64 / 4.0),
        "ns=2;i=1001" => Value::from(n),
        "ns=2;s=Flag" => Value::from(n % 2 == 1),
        "ns=2;s=Label" => Value::from(format!("n={n:06}")),
        "plant/faulty" => Value::from(n as f64),
        other => panic!("no expectation for {other}"),
    }
}

/// Every point of the server's run logged in `log` carries the value, source
/// timestamp and quality the server published; returns the counters seen
/// for the int variable.
fn check_run(all: &[Value], log: &Path) -> Vec<u64> {
    let published = published(log);
    let mut counts = Vec::new();
    for tag in TAGS {
        for p in of_tag(all, tag) {
            if p["status"] == "communication-lost" {
                continue;
            }
            let Some(&(n, faulty_bad)) = published.get(&ts_ns(p)) else {
                continue; // another run of the server, or its initial value
            };
            if tag == "plant/faulty" && faulty_bad {
                assert_eq!(p["quality"], 2, "{p}");
                assert_eq!(p["status"], "BadSensorFailure (0x808C0000)", "{p}");
                continue;
            }
            assert_eq!(p["quality"], 0, "{p}");
            assert!(p.get("status").is_none_or(Value::is_null), "{p}");
            let want = expected(tag, n);
            let same = match (p["value"].as_f64(), want.as_f64()) {
                (Some(a), Some(b)) => a == b,
                _ => p["value"] == want,
            };
            assert!(same, "{tag} at n={n}: got {}, want {want}", p["value"]);
            if tag == "ns=2;i=1001" {
                counts.push(n);
            }
        }
    }
    counts
}

#[test]
fn data_changes_arrive_with_their_value_source_timestamp_and_quality_and_a_server_restart_shows_as_communication_lost(
) {
    let Some(python) = asyncua("opcua asyncua") else {
        return;
    };
    let s = Scratch::new("opcua-server");
    let port = free_tcp_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/opcua_server.py");
    let server = |log: &Path, n: u32| {
        Proc::spawn_path(
            &s,
            &format!("server-{n}"),
            &python,
            &[
                script.to_str().unwrap(),
                &port.to_string(),
                log.to_str().unwrap(),
            ],
        )
    };
    let listening = || TcpStream::connect(("127.0.0.1", port)).is_ok();
    let (log1, log2) = (s.join("published-1.jsonl"), s.join("published-2.jsonl"));
    let mut srv = server(&log1, 1);
    // asyncua takes a while to import on a loaded machine.
    assert!(
        wait_until(Duration::from_secs(60), listening),
        "the asyncua server never listened on {port}"
    );
    let pair = pair(
        &s,
        &format!(
            "[[sources]]\nname = \"plant\"\ntype = \"opcua\"\nendpoint = \"opc.tcp://127.0.0.1:{port}/weir/\"\n\
             publishing_interval_ms = 100\nsampling_interval_ms = 50\n\
             nodes = [\"ns=2;s=Temp\", \"ns=2;i=1001\", \"ns=2;s=Flag\", \"ns=2;s=Label\", {{ node = \"ns=2;s=Faulty\", tag = \"plant/faulty\" }}]\n"
        ),
    );
    // Runs for a while: at least one bad and one good second of Faulty.
    assert!(
        wait_until(Duration::from_secs(40), || {
            let all = points(&pair.out, "plant");
            of_tag(&all, "ns=2;i=1001").len() >= 30
                && of_tag(&all, "plant/faulty")
                    .iter()
                    .any(|p| p["quality"] == 2)
        }),
        "30 data changes never arrived; sender {}",
        sender_metrics(&s)
    );
    assert!(
        wait_until(Duration::from_secs(5), || sender_metrics(&s)["sources"]
            ["plant"]["state"]
            == "connected"),
        "sender {}",
        sender_metrics(&s)
    );

    // The server goes away for 5 s: every item gets a communication-lost
    // point and the state shows it.
    srv.signal("KILL");
    assert!(srv.wait(Duration::from_secs(10)) || !srv.is_running());
    let lost_all = || {
        let all = points(&pair.out, "plant");
        TAGS.iter().all(|t| {
            of_tag(&all, t)
                .iter()
                .any(|p| p["status"] == "communication-lost" && p["quality"] == 2)
        })
    };
    assert!(
        wait_until(Duration::from_secs(20), lost_all),
        "the outage never showed as communication-lost points; sender {}",
        sender_metrics(&s)
    );
    // The metrics file is written once a second.
    assert!(
        wait_until(Duration::from_secs(5), || sender_metrics(&s)["sources"]
            ["plant"]["state"]
            == "retrying"),
        "the state never showed the outage; sender {}",
        sender_metrics(&s)
    );
    std::thread::sleep(Duration::from_secs(5));

    // It comes back: the session is made again, the subscription carried
    // over, and values flow again.
    let _srv2 = server(&log2, 2);
    assert!(
        wait_until(Duration::from_secs(60), || {
            let all = points(&pair.out, "plant");
            let published = published(&log2);
            of_tag(&all, "ns=2;i=1001")
                .iter()
                .filter(|p| published.contains_key(&ts_ns(p)))
                .count()
                >= 10
        }),
        "no values after the server came back; sender {}",
        sender_metrics(&s)
    );
    assert!(
        wait_until(Duration::from_secs(5), || sender_metrics(&s)["sources"]
            ["plant"]["state"]
            == "connected"),
        "sender {}",
        sender_metrics(&s)
    );
    let m = sender_metrics(&s);
    assert!(
        m["sources"]["plant"]["connections"].as_u64().unwrap() >= 2,
        "{m}"
    );
    assert!(m["opcua_connection_errors"].as_u64().unwrap() >= 1, "{m}");

    let all = points(&pair.out, "plant");
    let first = check_run(&all, &log1);
    let second = check_run(&all, &log2);
    // Every change of the int variable between the first and the last one
    // seen arrived, in order, in each run of the server.
    for counts in [&first, &second] {
        assert!(counts.len() >= 10, "{counts:?}");
        let want: Vec<u64> = (counts[0]..=*counts.last().unwrap()).collect();
        assert_eq!(counts, &want);
    }
    // Per item: the first run's values, one communication-lost point, then
    // the second run's values.
    let (p1, p2) = (published(&log1), published(&log2));
    for tag in TAGS {
        let mut kinds: Vec<u8> = of_tag(&all, tag)
            .iter()
            .map(|p| {
                if p["status"] == "communication-lost" {
                    b'L'
                } else if p1.contains_key(&ts_ns(p)) {
                    b'1'
                } else if p2.contains_key(&ts_ns(p)) {
                    b'2'
                } else {
                    b'?' // a variable's initial value
                }
            })
            .filter(|&k| k != b'?')
            .collect();
        let text = String::from_utf8(kinds.clone()).unwrap();
        kinds.dedup();
        assert_eq!(kinds, b"1L2", "{tag}: {text}");
    }
}
