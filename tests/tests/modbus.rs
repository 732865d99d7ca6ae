//! Modbus TCP end to end: weir-sender's `modbus` source polling a device,
//! the link (through weir-linksim with 2% loss), weir-receiver's `file`
//! sink.
//!
//! - Against a real device: `tests/peers/modbus_server.py` (pymodbus, in
//!   the venv /var/tmp/weir-venv that `.ci/run` installs), whose registers
//!   change every 100 ms and which logs the counter behind every read it
//!   answered, so each point at the receiver is checked against what the
//!   device held at that poll. Without the venv the test prints why and
//!   passes as skipped; with `WEIR_SERVICES=1` that is a failure.
//! - Against hostile devices written here (raw TCP): wrong lengths, an
//!   unknown function code, a broken header, a read never answered, a
//!   device that never answers at all and one that is not there. Each is
//!   counted and made bad-quality points while the good entries go on.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

const VENV_PYTHON: &str = "/var/tmp/weir-venv/bin/python";

/// The venv's python when it has pymodbus; otherwise prints why the test
/// is skipped (or fails when WEIR_SERVICES=1 says it must be there).
fn pymodbus(test: &str) -> Option<PathBuf> {
    let ok = std::process::Command::new(VENV_PYTHON)
        .args(["-c", "import pymodbus.simulator"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(PathBuf::from(VENV_PYTHON));
    }
    if std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1") {
        panic!("{test}: WEIR_SERVICES=1 but {VENV_PYTHON} cannot import pymodbus (.ci/run installs it)");
    }
    eprintln!("SKIPPED {test}: {VENV_PYTHON} with pymodbus is missing (python3 -m venv /var/tmp/weir-venv && /var/tmp/weir-venv/bin/pip install pymodbus)");
    None
}

struct Pair {
    _linksim: Proc,
    _receiver: Proc,
    sender: Proc,
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
    let linksim = Linksim::new(s, sender_port, receiver_port, 12, 0.02)
        .no_bursts()
        .spawn();
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
        sender,
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

/// The device log's counters for reads of function `fc` at `address`.
fn served(log: &Path, fc: u64, address: u64) -> Vec<u64> {
    json_lines(log)
        .iter()
        .filter(|l| l["fc"] == fc && l["address"] == address)
        .map(|l| l["n"].as_u64().unwrap())
        .collect()
}

const REGISTER_MAP: &str = r#"
[[sources.registers]]
tag = "counter"
kind = "holding"
address = 0
type = "u16"
[[sources.registers]]
tag = "half_abcd"
kind = "holding"
address = 1
type = "f32"
word_order = "big"
[[sources.registers]]
tag = "half_cdab"
kind = "holding"
address = 3
type = "f32"
word_order = "little"
[[sources.registers]]
tag = "negative"
kind = "holding"
address = 5
type = "i16"
[[sources.registers]]
tag = "thousands"
kind = "holding"
address = 6
type = "i32"
[[sources.registers]]
tag = "eighth"
kind = "holding"
address = 8
type = "f64"
[[sources.registers]]
tag = "label"
kind = "holding"
address = 12
type = "string"
count = 4
[[sources.registers]]
tag = "swapped"
kind = "holding"
address = 16
type = "u16"
byte_order = "little"
[[sources.registers]]
tag = "flow"
kind = "input"
address = 0
type = "u32"
scale = 0.001
offset = 1.0
[[sources.registers]]
tag = "odd"
kind = "coil"
address = 0
[[sources.registers]]
tag = "by3"
kind = "coil"
address = 1
[[sources.registers]]
tag = "even"
kind = "discrete"
address = 0
[[sources.registers]]
tag = "unmapped"
kind = "holding"
address = 100
"#;

/// What the device held at counter `n` for each tag (see modbus_server.py).
fn expected(tag: &str, n: u64) -> Value {
    let n_f = n as f64;
    match tag {
        "counter" => Value::from(n & 0xFFFF),
        "half_abcd" => Value::from(n_f / 2.0),
        "half_cdab" => Value::from(n_f / 2.0 + 0.25),
        "negative" => Value::from(-((n % 30000) as i64)),
        "thousands" => Value::from(-1000 * n as i64),
        "eighth" => Value::from(n_f / 8.0),
        "label" => Value::from(format!("n={:06}", n % 1_000_000)),
        "swapped" => Value::from((3 * n) & 0xFFFF),
        "flow" => Value::from(((100_000 * n) & 0xFFFF_FFFF) as f64 * 0.001 + 1.0),
        "odd" => Value::from(n % 2 == 1),
        "by3" => Value::from(n.is_multiple_of(3)),
        "even" => Value::from(n.is_multiple_of(2)),
        other => panic!("no expectation for {other}"),
    }
}

#[test]
fn polled_registers_arrive_with_the_values_the_device_held_at_each_poll_and_an_outage_shows_as_bad_points(
) {
    let Some(python) = pymodbus("modbus pymodbus") else {
        return;
    };
    let s = Scratch::new("modbus-device");
    let port = free_tcp_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/modbus_server.py");
    let log1 = s.join("served-1.jsonl");
    let device = |log: &Path, n: u32| {
        Proc::spawn_path(
            &s,
            &format!("device-{n}"),
            &python,
            &[
                script.to_str().unwrap(),
                &port.to_string(),
                log.to_str().unwrap(),
                "1",
            ],
        )
    };
    let mut dev = device(&log1, 1);
    assert!(
        wait_until(Duration::from_secs(20), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "the pymodbus device never listened on {port}"
    );
    let pair = pair(
        &s,
        &format!(
            "[[sources]]\nname = \"plc\"\ntype = \"modbus\"\naddress = \"127.0.0.1:{port}\"\nunit = 1\ninterval = \"100ms\"\ntimeout = \"1s\"\n{REGISTER_MAP}"
        ),
    );
    // Polls for a while: the counter moves every 100 ms.
    assert!(
        wait_until(Duration::from_secs(30), || {
            of_tag(&points(&pair.out, "plc"), "counter").len() >= 30
        }),
        "30 polls never arrived; sender {}",
        sender_metrics(&s)
    );
    assert_eq!(sender_metrics(&s)["sources"]["plc"]["state"], "connected");
    // The device goes away: its points turn bad (communication-lost) and
    // the state shows it; everything polled before is at the receiver.
    assert!(dev.stop(Duration::from_secs(10)) || !dev.is_running());
    assert!(
        wait_until(Duration::from_secs(20), || {
            sender_metrics(&s)["sources"]["plc"]["state"] == "retrying"
                && points(&pair.out, "plc").iter().any(|p| {
                    p["tag"] == "counter"
                        && p["status"]
                            .as_str()
                            .is_some_and(|s| s.starts_with("communication-lost"))
                })
        }),
        "the outage never showed; sender {}",
        sender_metrics(&s)
    );
    let all = points(&pair.out, "plc");
    // Each tag's good points, in order, are exactly what the device served
    // at each poll (a read the device logged just as it was stopped may
    // have had no answer: at most one more in the log).
    let reads = [
        ("counter", 3, 0),
        ("flow", 4, 0),
        ("odd", 1, 0),
        ("even", 2, 0),
    ];
    let tags_of = |fc: u64| -> Vec<&str> {
        match fc {
            3 => vec![
                "counter",
                "half_abcd",
                "half_cdab",
                "negative",
                "thousands",
                "eighth",
                "label",
                "swapped",
            ],
            4 => vec!["flow"],
            1 => vec!["odd", "by3"],
            _ => vec!["even"],
        }
    };
    for (_, fc, address) in reads {
        let ns = served(&log1, fc, address);
        for tag in tags_of(fc) {
            let good: Vec<&Value> = of_tag(&all, tag)
                .into_iter()
                .filter(|p| p["quality"] == 0)
                .collect();
            assert!(
                good.len() >= 30 && (good.len() == ns.len() || good.len() + 1 == ns.len()),
                "{tag}: {} good points, the device answered {} reads",
                good.len(),
                ns.len()
            );
            for (i, (p, n)) in good.iter().zip(&ns).enumerate() {
                let want = expected(tag, *n);
                let same = match (p["value"].as_f64(), want.as_f64()) {
                    (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                    _ => p["value"] == want,
                };
                assert!(
                    same,
                    "{tag} poll #{i}: got {} but the device held {want} (n = {n})",
                    p["value"]
                );
            }
        }
    }
    // The counter moved between polls: these are live values.
    let distinct: std::collections::HashSet<u64> = served(&log1, 3, 0).into_iter().collect();
    assert!(
        distinct.len() >= 10,
        "the counter barely moved: {distinct:?}"
    );
    // The unmapped address is a bad point every poll, naming the exception.
    let unmapped = of_tag(&all, "unmapped");
    assert!(unmapped.len() >= 30);
    for p in &unmapped {
        assert_eq!(p["quality"], 2, "{p}");
        let st = p["status"].as_str().unwrap_or_default();
        assert!(
            st == "modbus exception 0x02 (illegal data address)"
                || st.starts_with("communication-lost"),
            "{p}"
        );
        assert!(p["value"].is_null(), "{p}");
    }
    // The device returns: polling resumes by itself.
    let log2 = s.join("served-2.jsonl");
    let _dev2 = device(&log2, 2);
    assert!(
        wait_until(Duration::from_secs(30), || {
            sender_metrics(&s)["sources"]["plc"]["state"] == "connected"
                && !served(&log2, 3, 0).is_empty()
                && points(&pair.out, "plc")
                    .iter()
                    .rev()
                    .take(13)
                    .any(|p| p["tag"] == "counter" && p["quality"] == 0)
        }),
        "polling never resumed; sender {}",
        sender_metrics(&s)
    );
    let m = sender_metrics(&s);
    assert!(m["modbus_exceptions"].as_u64() >= Some(30), "{m}");
    assert!(m["modbus_connection_errors"].as_u64() >= Some(1), "{m}");
    assert!(
        m["sources"]["plc"]["connections"].as_u64() >= Some(2),
        "{m}"
    );
    assert_eq!(m["modbus_malformed"], 0, "{m}");
    drop(pair.sender);
}

/// What the hostile device does with a read at each address.
fn hostile_answer(
    transaction: [u8; 2],
    unit: u8,
    fc: u8,
    address: u16,
    count: u16,
) -> Option<Vec<u8>> {
    let adu = |pdu: Vec<u8>, length: Option<u16>| {
        let len = length.unwrap_or(pdu.len() as u16 + 1);
        let mut out = vec![transaction[0], transaction[1], 0, 0];
        out.extend_from_slice(&len.to_be_bytes());
        out.push(unit);
        out.extend(pdu);
        out
    };
    let registers = |n: u16| {
        let mut pdu = vec![fc, (n * 2) as u8];
        for _ in 0..n {
            pdu.extend_from_slice(&7u16.to_be_bytes());
        }
        pdu
    };
    match address {
        // A good answer: every register holds 7.
        0 => Some(adu(registers(count), None)),
        // Fewer registers than asked for.
        10 => Some(adu(registers(count - 1), None)),
        // A function code nobody asked for.
        20 => Some(adu(vec![0x41, 2, 0, 0], None)),
        // A header whose length is zero.
        30 => Some(adu(registers(count), Some(0))),
        // Never answered.
        _ => None,
    }
}

/// A Modbus TCP device that answers by [`hostile_answer`], or (`silent`)
/// takes requests and never answers. Stops when the flag is set.
fn hostile_device(silent: bool, stop: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let stop = stop.clone();
            std::thread::spawn(move || {
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let mut req = [0u8; 12];
                while !stop.load(Ordering::Relaxed) {
                    match conn.read_exact(&mut req) {
                        Ok(()) => {}
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut =>
                        {
                            continue
                        }
                        Err(_) => return,
                    }
                    if silent {
                        continue;
                    }
                    let address = u16::from_be_bytes([req[8], req[9]]);
                    let count = u16::from_be_bytes([req[10], req[11]]);
                    if let Some(answer) =
                        hostile_answer([req[0], req[1]], req[6], req[7], address, count)
                    {
                        if conn.write_all(&answer).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

#[test]
fn malformed_unanswered_and_unreachable_devices_are_counted_as_bad_points_while_good_reads_go_on() {
    let s = Scratch::new("modbus-hostile");
    let stop = Arc::new(AtomicBool::new(false));
    let hostile = hostile_device(false, stop.clone());
    let silent = hostile_device(true, stop.clone());
    let absent = free_tcp_port();
    let entry = |tag: &str, address: u16| {
        format!("[[sources.registers]]\ntag = \"{tag}\"\nkind = \"holding\"\naddress = {address}\ntype = \"u32\"\n")
    };
    let source = |name: &str, port: u16, entries: &str| {
        format!("[[sources]]\nname = \"{name}\"\ntype = \"modbus\"\naddress = \"127.0.0.1:{port}\"\ninterval = \"200ms\"\ntimeout = \"300ms\"\n{entries}")
    };
    let sources = [
        source(
            "hostile",
            hostile,
            &[
                entry("good", 0),
                entry("short", 10),
                entry("alien", 20),
                entry("zero_length", 30),
                entry("unanswered", 40),
            ]
            .concat(),
        ),
        source("silent", silent, &entry("x", 0)),
        source("absent", absent, &entry("y", 0)),
    ]
    .concat();
    let pair = pair(&s, &sources);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let pts = points(&pair.out, "hostile");
            of_tag(&pts, "good").len() >= 8
                && of_tag(&pts, "unanswered").len() >= 8
                && of_tag(&points(&pair.out, "silent"), "x").len() >= 3
                && of_tag(&points(&pair.out, "absent"), "y").len() >= 3
        }),
        "points did not keep coming; sender {}",
        sender_metrics(&s)
    );
    let pts = points(&pair.out, "hostile");
    for p in of_tag(&pts, "good") {
        assert_eq!(p["quality"], 0, "{p}");
        assert_eq!(p["value"], 7 * 65536 + 7, "{p}");
    }
    let status_of = |tag: &str| -> Vec<String> {
        of_tag(&pts, tag)
            .iter()
            .map(|p| {
                assert_eq!(p["quality"], 2, "{p}");
                p["status"].as_str().unwrap().to_string()
            })
            .collect()
    };
    for st in status_of("short") {
        assert!(
            st.starts_with("malformed answer: 1 values for a read of holding 10..+2"),
            "{st}"
        );
    }
    for st in status_of("alien") {
        assert!(
            st.starts_with("malformed answer to a read of holding 20..+2"),
            "{st}"
        );
    }
    for st in status_of("zero_length") {
        assert!(
            st.starts_with("malformed answer to a read of holding 30..+2"),
            "{st}"
        );
    }
    for st in status_of("unanswered") {
        assert!(
            st.starts_with("timeout: no answer to a read of holding 40..+2"),
            "{st}"
        );
    }
    for p in of_tag(&points(&pair.out, "silent"), "x") {
        assert_eq!(p["quality"], 2);
        let st = p["status"].as_str().unwrap();
        assert!(st.starts_with("timeout"), "{st}");
    }
    for p in of_tag(&points(&pair.out, "absent"), "y") {
        assert_eq!(p["quality"], 2);
        let st = p["status"].as_str().unwrap();
        assert!(st.starts_with("communication-lost: cannot connect"), "{st}");
    }
    assert!(
        wait_until(Duration::from_secs(5), || {
            let m = sender_metrics(&s);
            let h = &m["sources"]["hostile"];
            m["modbus_malformed"].as_u64() >= Some(24)
                && m["modbus_timeouts"].as_u64() >= Some(11)
                && h["malformed"].as_u64() >= Some(24)
                && h["timeouts"].as_u64() >= Some(8)
                && m["sources"]["silent"]["timeouts"].as_u64() >= Some(3)
                && m["sources"]["absent"]["state"] == "retrying"
                && m["sources"]["absent"]["connection_errors"].as_u64() >= Some(1)
        }),
        "the bad answers are counted; sender {}",
        sender_metrics(&s)
    );
    stop.store(true, Ordering::Relaxed);
    drop(pair);
}
