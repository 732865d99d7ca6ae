//! OPC UA end to end: weir-sender's `opcua` source subscribed to a real
//! server, the link (through weir-linksim with 2% loss), weir-receiver's
//! `file` sink.
//!
//! The server is `tests/peers/opcua_server.py` (asyncua, in the venv
//! /var/tmp/weir-venv that `.ci/run` installs): a double, an int, a bool
//! and a string that change every 100 ms, one double that is
//! BadSensorFailure one second in two, and a folder Plant/Line1 with
//! three more variables (one in a subfolder, one with a property); it logs
//! the counter and the source timestamp of every change, so each point at
//! the receiver is checked against what the server published. It runs
//! with security None, or with Basic256Sha256 (Sign, SignAndEncrypt) and a
//! user name, with certificates the test makes with the `openssl`
//! commands docs/sources.md gives. Without the venv (or openssl) the test
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

fn skip(test: &str, why: &str) {
    if std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1") {
        panic!("{test}: WEIR_SERVICES=1 but {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// An OPC UA application instance certificate and its key, made with the
/// openssl commands of docs/sources.md: RSA 2048, the application URI
/// first in subjectAltName, then the host.
fn make_cert(s: &Scratch, name: &str, cn: &str, san: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        s.join(&format!("{name}.pem")),
        s.join(&format!("{name}.key")),
    );
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-days", "825", "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-subj", &format!("/CN={cn}")])
        .args(["-addext", &format!("subjectAltName={san}")])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args([
            "-addext",
            "keyUsage=critical,digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment",
        ])
        .args(["-addext", "extendedKeyUsage=clientAuth,serverAuth"])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// `openssl x509 -fingerprint -sha1`, as the 40 hex digits OPC UA tools show.
fn sha1_thumbprint(cert: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha1", "-in"])
        .arg(cert)
        .output()
        .expect("openssl");
    let text = String::from_utf8(out.stdout).unwrap();
    let (_, hex) = text.trim().split_once('=').expect("fingerprint line");
    hex.replace(':', "").to_uppercase()
}

fn openssl(test: &str) -> bool {
    let ok = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        skip(
            test,
            "the openssl command is missing (apt-get install openssl)",
        );
    }
    ok
}

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
    skip(test, &format!("{VENV_PYTHON} with asyncua is missing (python3 -m venv /var/tmp/weir-venv && /var/tmp/weir-venv/bin/pip install asyncua)"));
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
    let linksim = Linksim::new(s, sender_port, receiver_port, 13, 0.02)
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

/// The variables under the browse root Objects/Plant/Line1, tagged by
/// their browse path (the property Line1.Speed.Unit is not among them).
const LINE1_TAGS: [&str; 3] = [
    "Objects/Plant/Line1/Speed",
    "Objects/Plant/Line1/Running",
    "Objects/Plant/Line1/Motor/Current",
];

/// What the server held at counter `n` for each tag (see opcua_server.py).
fn expected(tag: &str, n: u64) -> Value {
    match tag {
        "Objects/Plant/Line1/Speed" => Value::from(n as f64 * 1.5),
        "Objects/Plant/Line1/Running" => Value::from(n.is_multiple_of(3)),
        "Objects/Plant/Line1/Motor/Current" => Value::from(n as f64 / 10.0),
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
    check_tags(all, log, &TAGS)
}

fn check_tags(all: &[Value], log: &Path, tags: &[&str]) -> Vec<u64> {
    let published = published(log);
    let mut counts = Vec::new();
    for &tag in tags {
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

/// The certificates and secrets of a secure run, made in the scratch
/// directory.
struct Secure {
    client_cert: PathBuf,
    client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// Holds only the server's certificate.
    trusted_dir: PathBuf,
    password_file: PathBuf,
}

const USER: &str = "op";
const PASSWORD: &str = "s3cret-2026";

fn secret_file(s: &Scratch, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = s.write(name, text);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn secure(s: &Scratch) -> Secure {
    let (client_cert, client_key) = make_cert(
        s,
        "client",
        "weir-sender",
        "URI:urn:weir:sender,DNS:localhost",
    );
    let (server_cert, server_key) = make_cert(
        s,
        "server",
        "weir test server",
        "URI:urn:weir:test:server,IP:127.0.0.1",
    );
    let trusted_dir = s.join("trusted");
    std::fs::create_dir(&trusted_dir).unwrap();
    std::fs::copy(&server_cert, trusted_dir.join("weir-test-server.pem")).unwrap();
    let password_file = secret_file(s, "opcua.password", &format!("{PASSWORD}\n"));
    Secure {
        client_cert,
        client_key,
        server_cert,
        server_key,
        trusted_dir,
        password_file,
    }
}

/// The server with Basic256Sha256 (Sign and SignAndEncrypt) only, only the
/// sender's client certificate accepted, user `USER` with `PASSWORD` only.
fn secure_server(s: &Scratch, python: &Path, port: u16, log: &Path, sec: &Secure) -> Proc {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/opcua_server.py");
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        p(&script),
        port.to_string(),
        p(log),
        "--cert".into(),
        p(&sec.server_cert),
        "--key".into(),
        p(&sec.server_key),
        "--client-cert".into(),
        p(&sec.client_cert),
        "--user".into(),
        USER.into(),
        "--password".into(),
        PASSWORD.into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Proc::spawn_path(s, "server", python, &args);
    assert!(
        wait_until(Duration::from_secs(60), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "the asyncua server never listened on {port}"
    );
    server
}

#[test]
fn under_basic256sha256_sign_and_encrypt_with_a_user_name_listed_and_browsed_variables_arrive_with_value_tag_source_timestamp_and_quality(
) {
    let test = "opcua secure";
    let Some(python) = asyncua(test) else {
        return;
    };
    if !openssl(test) {
        return;
    }
    let s = Scratch::new("opcua-secure");
    let sec = secure(&s);
    let port = free_tcp_port();
    let log = s.join("published.jsonl");
    let _server = secure_server(&s, &python, port, &log, &sec);
    let pair = pair(
        &s,
        &format!(
            "[[sources]]\nname = \"plant\"\ntype = \"opcua\"\nendpoint = \"opc.tcp://127.0.0.1:{port}/weir/\"\n\
             security_policy = \"Basic256Sha256\"\nsecurity_mode = \"SignAndEncrypt\"\n\
             client_cert_file = \"{}\"\nclient_key_file = \"{}\"\ntrusted_dir = \"{}\"\n\
             username = \"{USER}\"\npassword_file = \"{}\"\n\
             publishing_interval_ms = 100\nsampling_interval_ms = 50\n\
             nodes = [\"ns=2;s=Temp\", \"ns=2;i=1001\", \"ns=2;s=Flag\", \"ns=2;s=Label\", {{ node = \"ns=2;s=Faulty\", tag = \"plant/faulty\" }}]\n\
             browse = [\"Objects/Plant/Line1\"]\n",
            sec.client_cert.display(),
            sec.client_key.display(),
            sec.trusted_dir.display(),
            sec.password_file.display(),
        ),
    );
    assert!(
        wait_until(Duration::from_secs(60), || {
            let all = points(&pair.out, "plant");
            of_tag(&all, "ns=2;i=1001").len() >= 30
                && of_tag(&all, "plant/faulty")
                    .iter()
                    .any(|p| p["quality"] == 2)
                && LINE1_TAGS.iter().all(|t| of_tag(&all, t).len() >= 10)
        }),
        "30 data changes never arrived; sender {}",
        sender_metrics(&s)
    );
    let all = points(&pair.out, "plant");
    let tags: Vec<&str> = TAGS.iter().chain(&LINE1_TAGS).copied().collect();
    let counts = check_tags(&all, &log, &tags);
    let want: Vec<u64> = (counts[0]..=*counts.last().unwrap()).collect();
    assert_eq!(counts, want, "a change of the int variable is missing");
    // Every browsed variable is checked against what the server held.
    for tag in LINE1_TAGS {
        let published = published(&log);
        let checked = of_tag(&all, tag)
            .iter()
            .filter(|p| published.contains_key(&ts_ns(p)))
            .count();
        assert!(checked >= 10, "{tag}: {checked} points checked");
    }
    // Browsing found exactly the folder's variables: no property, nothing else.
    let mut seen: Vec<&str> = all.iter().filter_map(|p| p["tag"].as_str()).collect();
    seen.sort_unstable();
    seen.dedup();
    let mut want_tags = tags.clone();
    want_tags.sort_unstable();
    assert_eq!(seen, want_tags);
    let m = sender_metrics(&s);
    let plant = &m["sources"]["plant"];
    assert_eq!(plant["state"], "connected", "{m}");
    assert_eq!(plant["browsed_items"], 3, "{m}");
    assert_eq!(plant["items"], 8, "{m}");
}

#[test]
fn an_untrusted_server_is_refused_naming_its_thumbprint_and_a_wrong_password_naming_username_and_password_file(
) {
    let test = "opcua refusals";
    let Some(python) = asyncua(test) else {
        return;
    };
    if !openssl(test) {
        return;
    }
    let s = Scratch::new("opcua-refusals");
    let sec = secure(&s);
    // A trust list that holds another server's certificate only.
    let (other, _) = make_cert(
        &s,
        "other",
        "another server",
        "URI:urn:weir:test:other,IP:127.0.0.1",
    );
    let other_dir = s.join("trusted-other");
    std::fs::create_dir(&other_dir).unwrap();
    std::fs::copy(&other, other_dir.join("other.der.pem")).unwrap();
    let wrong = secret_file(&s, "wrong.password", "not-the-password\n");
    let port = free_tcp_port();
    let _server = secure_server(&s, &python, port, &s.join("published.jsonl"), &sec);
    let source = |name: &str, mode: &str, trust: String, password: &Path| {
        format!(
            "[[sources]]\nname = \"{name}\"\ntype = \"opcua\"\nendpoint = \"opc.tcp://127.0.0.1:{port}/weir/\"\n\
             security_policy = \"Basic256Sha256\"\nsecurity_mode = \"{mode}\"\n\
             client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n{trust}\n\
             username = \"{USER}\"\npassword_file = \"{}\"\nnodes = [\"ns=2;i=1001\"]\n",
            sec.client_cert.display(),
            sec.client_key.display(),
            password.display(),
        )
    };
    let pair = pair(
        &s,
        &format!(
            "{}{}",
            source(
                "untrusted",
                "SignAndEncrypt",
                format!("trusted_dir = \"{}\"", other_dir.display()),
                &sec.password_file
            ),
            // Sign only: the channel opens, the session is refused.
            source(
                "badpass",
                "Sign",
                format!("server_cert_file = \"{}\"", sec.server_cert.display()),
                &wrong
            ),
        ),
    );
    let thumbprint = sha1_thumbprint(&sec.server_cert);
    let error = |source: &str| {
        sender_metrics(&s)["sources"][source]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        wait_until(Duration::from_secs(60), || error("untrusted")
            .contains(&thumbprint)
            && error("badpass").contains("refused user `op`")),
        "no refusals; sender {}",
        sender_metrics(&s)
    );
    let untrusted = error("untrusted");
    assert!(
        untrusted.contains("is not trusted")
            && untrusted.contains(&format!("SHA-1 thumbprint {thumbprint}"))
            && untrusted.contains(&format!("trusted_dir {}", other_dir.display())),
        "{untrusted}"
    );
    let badpass = error("badpass");
    assert!(
        badpass.contains("check `username` and the password in `password_file`")
            && badpass.contains("BadUserAccessDenied"),
        "{badpass}"
    );
    let m = sender_metrics(&s);
    for source in ["untrusted", "badpass"] {
        assert_eq!(m["sources"][source]["state"], "retrying", "{m}");
    }
    // The same words are in the sender's log, at ERROR.
    let log = std::fs::read_to_string(s.join("sender.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains(&thumbprint)),
        "{log}"
    );
    assert!(points(&pair.out, "untrusted").is_empty());
    assert!(points(&pair.out, "badpass").is_empty());
}
