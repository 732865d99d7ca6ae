//! The `http` sink end to end: generator points through weir-sender,
//! weir-linksim (2% loss) and weir-receiver, POSTed to an HTTP server the
//! test runs on loopback. The server answers 503 for its first seconds,
//! then 200, except that it refuses (400) every request holding a point
//! of one tag: those records, and only those, end in the dead-letter file
//! with the status and the server's answer; every other record arrives
//! exactly once, in order.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The tag whose points the server refuses.
const POISON_TAG: &str = "plant/gen/tag-00042";

#[derive(Default)]
struct Served {
    /// `seq` of each point accepted, in arrival order.
    seqs: Mutex<Vec<u64>>,
    /// The first accepted record, as sent.
    first: Mutex<Option<String>>,
    unavailable: AtomicU64,
    refused: AtomicU64,
    /// Requests without the configured headers (answered 401).
    unauthorized: AtomicU64,
}

/// One HTTP/1.1 request: headers (lower-case names) and body.
type Request = (Vec<(String, String)>, Vec<u8>);

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|h| h.0 == "content-length")
        .and_then(|h| h.1.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((headers, body))
}

/// One write per answer (and no Nagle delay): the sink sends one request
/// at a time, so each answer's latency is the sink's pace.
fn respond(w: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    w.write_all(answer.as_bytes())
}

/// Serves until the test ends: 503 until `unavailable_until`, then 200 for
/// NDJSON batches without a point of POISON_TAG and 400 for the others.
fn serve(port: u16, served: Arc<Served>, unavailable_until: Instant) {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let served = served.clone();
            std::thread::spawn(move || {
                conn.set_nodelay(true).unwrap();
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                while let Some((headers, body)) = read_request(&mut r) {
                    let has = |k: &str, v: &str| headers.iter().any(|h| h.0 == k && h.1 == v);
                    let answer = if Instant::now() < unavailable_until {
                        served.unavailable.fetch_add(1, Ordering::Relaxed);
                        respond(&mut w, "503 Service Unavailable", "warming up")
                    } else if !has("authorization", "Bearer t0ken")
                        || !has("x-plant", "north")
                        || !has("content-type", "application/x-ndjson")
                    {
                        served.unauthorized.fetch_add(1, Ordering::Relaxed);
                        respond(&mut w, "401 Unauthorized", "who are you")
                    } else {
                        let text = String::from_utf8(body).unwrap();
                        let records: Vec<Value> = text
                            .lines()
                            .map(|l| serde_json::from_str(l).unwrap())
                            .collect();
                        if records.iter().any(|r| r["tag"] == POISON_TAG) {
                            served.refused.fetch_add(1, Ordering::Relaxed);
                            respond(
                                &mut w,
                                "400 Bad Request",
                                "{\"error\":\"tag 42 is not accepted\"}",
                            )
                        } else {
                            let mut first = served.first.lock().unwrap();
                            if first.is_none() {
                                *first = text.lines().next().map(str::to_string);
                            }
                            served
                                .seqs
                                .lock()
                                .unwrap()
                                .extend(records.iter().map(|r| r["seq"].as_u64().unwrap()));
                            respond(&mut w, "200 OK", "")
                        }
                    };
                    if answer.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[test]
fn batches_arrive_exactly_once_after_503s_and_records_refused_with_400_go_to_the_dead_letter_file()
{
    let s = Scratch::new("http-e2e");
    let (sender_port, receiver_port, http_port) =
        (free_udp_port(), free_udp_port(), free_tcp_port());
    let served = Arc::new(Served::default());
    serve(
        http_port,
        served.clone(),
        Instant::now() + Duration::from_secs(4),
    );
    let token = s.write("token", "t0ken\n");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let d = s.path.display();
    let rcfg = s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:{receiver_port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
             [metrics]\npath = \"{d}/receiver-metrics.json\"\nlog_interval_s = 1\n\
             [[sinks]]\nname = \"ingest\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{http_port}/weir\"\nformat = \"ndjson\"\n\
             bearer_token_file = \"{}\"\nheaders = {{ \"X-Plant\" = \"north\" }}\nmax_request_bytes = \"64KiB\"\n",
            receiver_auth(&s),
            token.display()
        ),
    );
    let mut receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &["run", "--config", rcfg.to_str().unwrap()],
    );
    let _linksim = Proc::spawn(
        &s,
        "linksim",
        "weir-linksim",
        &[
            "--listen",
            &format!("127.0.0.1:{sender_port}"),
            "--target",
            &format!("127.0.0.1:{receiver_port}"),
            "--seed",
            "12",
            "--loss",
            "0.02",
            "--burst-start",
            "0",
            "--burst-len",
            "0",
        ],
    );
    let total = 100_000u64;
    let scfg = s.write(
        "sender.toml",
        &format!(
            "{}[link]\ndestination = \"127.0.0.1:{sender_port}\"\nrate = \"200Mbit\"\n[spool]\npath = \"{d}/spool\"\n\
             [[sources]]\nname = \"plant/gen\"\ntype = \"generator\"\ntags = 100\nrate = 25000\ncount = {total}\n",
            sender_auth(&s)
        ),
    );
    let mut sender = Proc::spawn(
        &s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    let poison = total / 100;
    let dead = s.join("state/dead-letter/ingest.jsonl");
    assert!(
        wait_until(Duration::from_secs(60), || {
            served.seqs.lock().unwrap().len() as u64 == total - poison
                && json_lines(&dead).len() as u64 == poison
        }),
        "accepted {} of {}, dead letters {} of {poison}; see {}",
        served.seqs.lock().unwrap().len(),
        total - poison,
        json_lines(&dead).len(),
        s.path.display()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sender.stop(Duration::from_secs(10)),
        "the sender did not stop cleanly"
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop cleanly"
    );
    let metrics = read_json(&s.join("receiver-metrics.json"));
    eprintln!(
        "503 answers {}, 400 answers {}, sink retries {}, dead letters {}",
        served.unavailable.load(Ordering::Relaxed),
        served.refused.load(Ordering::Relaxed),
        metrics["sink.ingest.retries"],
        metrics["sink.ingest.dead_letters"]
    );
    assert_eq!(
        served.unauthorized.load(Ordering::Relaxed),
        0,
        "every request carried the token and the headers"
    );
    assert!(
        served.unavailable.load(Ordering::Relaxed) > 0,
        "the server answered 503 first"
    );
    assert!(
        metrics["sink.ingest.retries"].as_u64() > Some(0),
        "503s are retried: {metrics}"
    );
    assert_eq!(metrics["sink.ingest.dead_letters"].as_u64(), Some(poison));
    // Exactly once, in order: every seq but the refused tag's.
    let seqs = served.seqs.lock().unwrap().clone();
    let want: Vec<u64> = (0..total).filter(|s| s % 100 != 42).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "records arrived twice or out of order"
    );
    assert_eq!(seqs, want);
    // Each record is the file sink's JSON object.
    let first: Value =
        serde_json::from_str(served.first.lock().unwrap().as_deref().unwrap()).unwrap();
    let keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        ["stream", "seq", "kind", "ts", "tag", "value", "quality"]
    );
    assert_eq!(
        (first["stream"].as_str(), first["seq"].as_u64()),
        (Some("plant/gen"), Some(0))
    );
    // The dead letters: the refused tag's records, with the answer.
    let letters = json_lines(&dead);
    for l in &letters {
        assert_eq!(l["record"]["tag"], POISON_TAG);
        let reason = l["reason"].as_str().unwrap();
        assert!(
            reason.starts_with(&format!("HTTP 400 Bad Request from http://127.0.0.1:{http_port}/weir: {{\"error\":\"tag 42 is not accepted\"}}")),
            "{reason}"
        );
    }
    let dead_seqs: Vec<u64> = letters
        .iter()
        .map(|l| l["record"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        dead_seqs,
        (0..total).filter(|s| s % 100 == 42).collect::<Vec<_>>()
    );
}

/// Tokens a [`serve_tokens`] server accepts, and what it saw.
#[derive(Default)]
struct TokenServer {
    /// Bearer tokens answered 200; any other is answered 401.
    accepted: Mutex<Vec<String>>,
    /// Per accepted request, in arrival order: its token and its seqs.
    requests: Mutex<Vec<(String, Vec<u64>)>>,
    unauthorized: AtomicU64,
}

impl TokenServer {
    fn count(&self, token: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == token)
            .map(|r| r.1.len())
            .sum()
    }
}

fn serve_tokens(port: u16, served: Arc<TokenServer>) {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let served = served.clone();
            std::thread::spawn(move || {
                conn.set_nodelay(true).unwrap();
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                while let Some((headers, body)) = read_request(&mut r) {
                    let token = headers
                        .iter()
                        .find(|h| h.0 == "authorization")
                        .and_then(|h| h.1.strip_prefix("Bearer "))
                        .unwrap_or("")
                        .to_string();
                    let answer = if served.accepted.lock().unwrap().contains(&token) {
                        let seqs = String::from_utf8(body)
                            .unwrap()
                            .lines()
                            .map(|l| {
                                serde_json::from_str::<Value>(l).unwrap()["seq"]
                                    .as_u64()
                                    .unwrap()
                            })
                            .collect();
                        served.requests.lock().unwrap().push((token, seqs));
                        respond(&mut w, "200 OK", "")
                    } else {
                        served.unauthorized.fetch_add(1, Ordering::Relaxed);
                        respond(&mut w, "401 Unauthorized", "unknown token")
                    };
                    if answer.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Replaces `path` with a new file of `text` and `mode`, as an operator
/// rotating a secret would (write beside it, rename over it).
fn replace_file(path: &std::path::Path, text: &str, mode: u32) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn sighup_rereads_the_bearer_token_file_and_the_next_requests_carry_the_new_token() {
    let s = Scratch::new("http-token-rotation");
    let (receiver_port, http_port) = (free_udp_port(), free_tcp_port());
    let served = Arc::new(TokenServer::default());
    served.accepted.lock().unwrap().push("first-token".into());
    serve_tokens(http_port, served.clone());
    let token = s.join("token");
    replace_file(&token, "first-token\n", 0o600);
    let d = s.path.display();
    let rcfg = s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:{receiver_port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
             [[sinks]]\nname = \"ingest\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{http_port}/weir\"\nformat = \"ndjson\"\n\
             bearer_token_file = \"{}\"\nmax_request_bytes = \"16KiB\"\n",
            receiver_auth(&s),
            token.display()
        ),
    );
    let mut receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &["run", "--config", rcfg.to_str().unwrap()],
    );
    // Runs until stopped, so the rotation happens mid-stream however
    // fast the machine is.
    let scfg = s.write(
        "sender.toml",
        &format!(
            "{}[link]\ndestination = \"127.0.0.1:{receiver_port}\"\nrate = \"100Mbit\"\n[spool]\npath = \"{d}/spool\"\n\
             [[sources]]\nname = \"plant/gen\"\ntype = \"generator\"\ntags = 10\nrate = 2000\n",
            sender_auth(&s)
        ),
    );
    let mut sender = Proc::spawn(
        &s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    let logged = |what: &str| {
        std::fs::read_to_string(s.join("receiver.log"))
            .unwrap_or_default()
            .contains(what)
    };
    assert!(
        wait_until(Duration::from_secs(30), || served.count("first-token")
            > 500),
        "no records with the first token; see {}",
        s.path.display()
    );
    // Rotation: the server takes both tokens while the file changes.
    served.accepted.lock().unwrap().push("second-token".into());
    replace_file(&token, "second-token\n", 0o600);
    receiver.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || logged(&format!(
            "SIGHUP: sink `ingest`: bearer_token_file {} re-read, changed",
            token.display()
        ))),
        "the changed token file was not reported; see {}",
        s.path.display()
    );
    assert!(
        wait_until(Duration::from_secs(30), || served.count("second-token") > 0),
        "no request with the new token after SIGHUP; see {}",
        s.path.display()
    );
    // The old token is revoked: a request still carrying it would be
    // answered 401 (and its records dead-lettered).
    served
        .accepted
        .lock()
        .unwrap()
        .retain(|t| t == "second-token");
    let before = served.count("second-token");
    assert!(
        wait_until(Duration::from_secs(30), || served.count("second-token")
            > before + 500),
        "records stopped after the old token was revoked; see {}",
        s.path.display()
    );
    // A token file others can read is refused at SIGHUP, naming the file,
    // and the sink keeps the token it has.
    replace_file(&token, "third-token\n", 0o644);
    receiver.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || logged("chmod 600")
            && logged("nothing changed")),
        "the unreadable token file was not reported; see {}",
        s.path.display()
    );
    let before = served.count("second-token");
    assert!(
        wait_until(Duration::from_secs(30), || served.count("second-token")
            > before + 500),
        "records stopped after a refused reload; see {}",
        s.path.display()
    );
    assert!(
        sender.stop(Duration::from_secs(10)),
        "the sender did not stop cleanly"
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop cleanly"
    );
    assert_eq!(
        served.unauthorized.load(Ordering::Relaxed),
        0,
        "no request carried a revoked or unknown token"
    );
    let requests = served.requests.lock().unwrap().clone();
    let switch = requests.iter().position(|r| r.0 == "second-token").unwrap();
    assert!(
        requests[..switch].iter().all(|r| r.0 == "first-token")
            && requests[switch..].iter().all(|r| r.0 == "second-token"),
        "every request after the first with the new token carries the new token"
    );
    // Exactly once, in order, across the rotation.
    let seqs: Vec<u64> = requests.iter().flat_map(|r| r.1.iter().copied()).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
    let log = std::fs::read_to_string(s.join("receiver.log")).unwrap();
    assert!(
        !log.contains("third-token") && !log.contains("second-token"),
        "a token was written to the log"
    );
}
