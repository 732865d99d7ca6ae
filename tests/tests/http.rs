//! The `http` sink end to end: generator points through weir-sender,
//! weir-linksim (2% loss) and weir-receiver, POSTed to HTTP servers the
//! tests run on loopback.
//!
//! - 100,000 records arrive exactly once, in order.
//! - A server stopped for 20 s mid-run (its port refuses connections) and
//!   started again gets every record; the sink is at least once, so a
//!   server that drops duplicates by (`stream`, `seq`) has each exactly
//!   once, and the only records sent twice are those of the request the
//!   stop left unanswered.
//! - After `kill -9` of the receiver and a restart, the same, and the
//!   records sent again are one run: those after the last saved cursor.
//! - A server that answers 503 for its first seconds, then 200, except
//!   that it refuses (400) every request holding a point of one tag:
//!   those records, and only those, end in the dead-letter file with the
//!   status and the server's answer; every other record arrives exactly
//!   once, in order.
//! - SIGHUP re-reads the bearer token file.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    let _linksim = Linksim::new(&s, sender_port, receiver_port, 12, 0.02)
        .no_bursts()
        .spawn();
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

/// What an [`Ingest`] server accepted: per request answered 200 (or
/// whose answer was lost), the `seq` of each record, in arrival order.
#[derive(Default)]
struct Accepted {
    requests: Vec<Vec<u64>>,
    /// Set by `stop`: a request read after it is not applied.
    stopped: bool,
}

/// An ingest endpoint as a receiving end that wants exactly once would
/// run one: it applies every NDJSON request it reads and answers 200, and
/// drops records it already has by (`stream`, `seq`) (`first_seen`). It
/// can be stopped (the listening socket and every connection closed, so a
/// connection is refused) and started again on its port.
struct Ingest {
    port: u16,
    listener: Arc<Mutex<Option<TcpListener>>>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<Mutex<Accepted>>,
    /// Connection handlers running.
    live: Arc<AtomicU64>,
    end: Arc<AtomicBool>,
}

/// Counts a running connection handler while it lives.
struct Live(Arc<AtomicU64>);

impl Live {
    fn new(count: &Arc<AtomicU64>) -> Live {
        count.fetch_add(1, Ordering::Relaxed);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Ingest {
    fn start() -> Ingest {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let ingest = Ingest {
            port: listener.local_addr().unwrap().port(),
            listener: Arc::new(Mutex::new(Some(listener))),
            open: Arc::default(),
            accepted: Arc::default(),
            live: Arc::default(),
            end: Arc::default(),
        };
        let (listener, open, accepted, live, end) = (
            ingest.listener.clone(),
            ingest.open.clone(),
            ingest.accepted.clone(),
            ingest.live.clone(),
            ingest.end.clone(),
        );
        std::thread::spawn(move || {
            while !end.load(Ordering::Relaxed) {
                // The listener stays locked until the connection is in
                // `open`, so `stop` closes every connection it let in.
                let guard = listener.lock().unwrap();
                let Some(Ok((conn, _))) = guard.as_ref().map(TcpListener::accept) else {
                    drop(guard);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_nodelay(true).unwrap();
                open.lock().unwrap().push(conn.try_clone().unwrap());
                drop(guard);
                let accepted = accepted.clone();
                let live = Live::new(&live);
                std::thread::spawn(move || {
                    let _live = live;
                    let mut w = conn.try_clone().unwrap();
                    let mut r = BufReader::new(conn);
                    while let Some((_, body)) = read_request(&mut r) {
                        let seqs: Vec<u64> = String::from_utf8(body)
                            .unwrap()
                            .lines()
                            .map(|l| {
                                serde_json::from_str::<Value>(l).unwrap()["seq"]
                                    .as_u64()
                                    .unwrap()
                            })
                            .collect();
                        {
                            let mut a = accepted.lock().unwrap();
                            if a.stopped {
                                return;
                            }
                            a.requests.push(seqs);
                        }
                        if respond(&mut w, "200 OK", "").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        ingest
    }

    /// Stops serving: nothing is applied from now on, the listening socket
    /// and every connection are closed. Returns how many requests were
    /// applied.
    fn stop(&self) -> usize {
        let applied = {
            let mut a = self.accepted.lock().unwrap();
            a.stopped = true;
            a.requests.len()
        };
        drop(self.listener.lock().unwrap().take());
        for c in self.open.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        applied
    }

    /// Listens on its port again and applies what it reads.
    fn restart(&self) {
        let l = TcpListener::bind(("127.0.0.1", self.port))
            .unwrap_or_else(|e| panic!("the test server listening again on {}: {e}", self.port));
        l.set_nonblocking(true).unwrap();
        self.accepted.lock().unwrap().stopped = false;
        *self.listener.lock().unwrap() = Some(l);
    }

    /// Connections whose handler still runs (reads, applies, answers).
    fn connections(&self) -> usize {
        self.live.load(Ordering::Relaxed) as usize
    }

    fn refuses(&self) -> bool {
        TcpStream::connect(("127.0.0.1", self.port))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    }

    fn requests(&self) -> Vec<Vec<u64>> {
        self.accepted.lock().unwrap().requests.clone()
    }

    /// Records applied, counting each (stream, seq) once.
    fn distinct(&self) -> usize {
        let a = self.accepted.lock().unwrap();
        let mut seen = std::collections::HashSet::new();
        a.requests
            .iter()
            .flatten()
            .filter(|s| seen.insert(**s))
            .count()
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.end.store(true, Ordering::Relaxed);
        self.stop();
    }
}

/// The seqs in arrival order with each later copy of one dropped (what a
/// server that drops duplicates by (`stream`, `seq`) keeps), and the
/// copies dropped.
fn first_seen(requests: &[Vec<u64>]) -> (Vec<u64>, Vec<u64>) {
    let mut seen = std::collections::HashSet::new();
    let (mut kept, mut again) = (Vec::new(), Vec::new());
    for s in requests.iter().flatten() {
        if seen.insert(*s) {
            kept.push(*s);
        } else {
            again.push(*s);
        }
    }
    (kept, again)
}

/// A receiver with one `http` sink `ingest` (NDJSON) POSTing to `http_port`.
fn http_receiver_config(s: &Scratch, udp_port: u16, http_port: u16) -> std::path::PathBuf {
    let d = s.path.display();
    s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:{udp_port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
             [metrics]\npath = \"{d}/receiver-metrics.json\"\nlog_interval_s = 1\n\
             [[sinks]]\nname = \"ingest\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{http_port}/weir\"\nformat = \"ndjson\"\n",
            receiver_auth(s),
        ),
    )
}

fn spawn_receiver(s: &Scratch, log: &str, cfg: &std::path::Path) -> Proc {
    Proc::spawn(
        s,
        log,
        "weir-receiver",
        &["run", "--config", cfg.to_str().unwrap()],
    )
}

/// weir-linksim from `sender_port` to `receiver_port`, dropping 2% of the
/// datagrams.
fn lossy_link(s: &Scratch, sender_port: u16, receiver_port: u16) -> Proc {
    Linksim::new(s, sender_port, receiver_port, 13, 0.02)
        .no_bursts()
        .spawn()
}

/// A sender whose generator `gen` sends `count` points at `rate` a second,
/// then exits.
fn generator_sender(s: &Scratch, port: u16, rate: u64, count: u64) -> Proc {
    let scfg = s.write(
        "sender.toml",
        &format!(
            "{}[link]\ndestination = \"127.0.0.1:{port}\"\nrate = \"200Mbit\"\n[spool]\npath = \"{d}/spool\"\n\
             [[sources]]\nname = \"gen\"\ntype = \"generator\"\ntags = 100\nrate = {rate}\ncount = {count}\n",
            sender_auth(s),
            d = s.path.display()
        ),
    );
    Proc::spawn(
        s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    )
}

fn receiver_metric(s: &Scratch, key: &str) -> Option<u64> {
    read_json(&s.join("receiver-metrics.json"))[key].as_u64()
}

/// Waits until the server has `want` distinct records, or their count has
/// not moved for 4 s while the sink is caught up; returns the count.
fn wait_for_ingest(s: &Scratch, ingest: &Ingest, want: usize, limit: Duration) -> usize {
    let start = Instant::now();
    let (mut last, mut since) = (usize::MAX, Instant::now());
    loop {
        let n = ingest.distinct();
        if n >= want || start.elapsed() > limit {
            return n;
        }
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() > Duration::from_secs(4)
            && receiver_metric(s, "sink.ingest.behind") == Some(0)
        {
            return n;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn receiver_log(s: &Scratch, log: &str) -> String {
    std::fs::read_to_string(s.join(&format!("{log}.log"))).unwrap_or_default()
}

#[test]
fn a_hundred_thousand_records_cross_a_lossy_link_to_an_http_server_once_in_order() {
    let s = Scratch::new("http-100k");
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let ingest = Ingest::start();
    let rcfg = http_receiver_config(&s, receiver_port, ingest.port);
    let mut receiver = spawn_receiver(&s, "receiver", &rcfg);
    let _linksim = lossy_link(&s, sender_port, receiver_port);
    let total = 100_000u64;
    let started = Instant::now();
    let mut sender = generator_sender(&s, sender_port, 25_000, total);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let n = wait_for_ingest(&s, &ingest, total as usize, Duration::from_secs(40));
    eprintln!(
        "{n} records at the server {:.1} s after the sender started",
        started.elapsed().as_secs_f64()
    );
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop cleanly: {}",
        receiver_log(&s, "receiver")
    );
    let seqs: Vec<u64> = ingest.requests().concat();
    assert!(
        gaps(&s.join("audit.jsonl"), "gen").is_empty(),
        "2% loss is within FEC"
    );
    assert_complete_in_order(&seqs, total);
}

#[test]
fn an_http_server_stopped_for_20_s_mid_run_gets_every_record_and_at_most_its_unanswered_request_again(
) {
    let s = Scratch::new("http-outage");
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let ingest = Ingest::start();
    let rcfg = http_receiver_config(&s, receiver_port, ingest.port);
    let mut receiver = spawn_receiver(&s, "receiver", &rcfg);
    let _linksim = lossy_link(&s, sender_port, receiver_port);
    // 25 s of records: the sender is still sending when the server is back.
    let total = 100_000u64;
    let mut sender = generator_sender(&s, sender_port, 4_000, total);
    assert!(
        wait_until(Duration::from_secs(30), || ingest.distinct() > 8_000),
        "records reach the server before the outage: {}",
        receiver_log(&s, "receiver")
    );
    let applied = ingest.stop();
    assert!(ingest.refuses(), "the server's port refuses connections");
    std::thread::sleep(Duration::from_secs(20));
    let errors = receiver_metric(&s, "sink.ingest.errors").unwrap_or(0);
    ingest.restart();
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let n = wait_for_ingest(&s, &ingest, total as usize, Duration::from_secs(60));
    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop cleanly: {}",
        receiver_log(&s, "receiver")
    );
    let requests = ingest.requests();
    let (kept, again) = first_seen(&requests);
    eprintln!(
        "{n} records, {applied} requests before the stop, sink errors during the outage {errors}, records sent again {}",
        again.len()
    );
    assert!(errors > 0, "the outage shows in sink.ingest.errors");
    assert!(
        receiver_log(&s, "receiver").contains("Connection refused"),
        "the refused connections are logged"
    );
    assert!(
        gaps(&s.join("audit.jsonl"), "gen").is_empty(),
        "2% loss is within FEC"
    );
    assert_complete_in_order(&kept, total);
    // Sent again can only be what the server applied and never answered:
    // the last request before the stop.
    let unanswered = applied.checked_sub(1).map_or(&[][..], |i| &requests[i][..]);
    assert!(
        again.iter().all(|s| unanswered.contains(s)),
        "records sent twice that were not in the request the stop left unanswered: {again:?}"
    );
}

#[test]
fn kill_9_of_the_receiver_mid_run_sends_every_record_and_again_only_what_followed_its_last_saved_cursor(
) {
    let s = Scratch::new("http-kill9");
    let (sender_port, receiver_port) = (free_udp_port(), free_udp_port());
    let ingest = Ingest::start();
    let rcfg = http_receiver_config(&s, receiver_port, ingest.port);
    let mut receiver1 = spawn_receiver(&s, "receiver-1", &rcfg);
    let _linksim = lossy_link(&s, sender_port, receiver_port);
    let total = 100_000u64;
    let mut sender = generator_sender(&s, sender_port, 20_000, total);
    assert!(
        wait_until(Duration::from_secs(30), || ingest.distinct() > 20_000),
        "records reach the server before the kill: {}",
        receiver_log(&s, "receiver-1")
    );
    receiver1.signal("KILL");
    assert!(
        wait_until(Duration::from_secs(5), || !receiver1.is_running()),
        "kill -9 did not end the receiver"
    );
    // What the dead receiver sent is applied once its connections end.
    assert!(
        wait_until(Duration::from_secs(10), || ingest.connections() == 0),
        "the dead receiver's connections did not end"
    );
    let before_kill = ingest.requests().len();
    std::thread::sleep(Duration::from_millis(1000));
    let mut receiver2 = spawn_receiver(&s, "receiver-2", &rcfg);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let n = wait_for_ingest(&s, &ingest, total as usize, Duration::from_secs(40));
    assert!(
        receiver2.stop(Duration::from_secs(20)),
        "the restarted receiver did not stop cleanly: {}",
        receiver_log(&s, "receiver-2")
    );
    let requests = ingest.requests();
    let (kept, again) = first_seen(&requests);
    let g = gaps(&s.join("audit.jsonl"), "gen");
    eprintln!(
        "{n} distinct records, sent again after the restart {} (seqs {:?}..={:?}), gaps {g:?}",
        again.len(),
        again.first(),
        again.last()
    );
    assert!(
        g.iter().all(|x| x.2 == "receiver-down"),
        "the only gaps are records sent while the receiver was down: {g:?}"
    );
    assert_exactly_accounted(&kept, &g, total);
    // The restart replays the journal from the last saved cursor: what is
    // sent again is one run of consecutive records the dead receiver had
    // delivered last, sent first by the new one.
    let before: Vec<u64> = requests[..before_kill].concat();
    let after: Vec<u64> = requests[before_kill..].concat();
    assert_eq!(
        after.get(..again.len()),
        Some(&again[..]),
        "the records sent again come first after the restart"
    );
    if let (Some(first), Some(last)) = (again.first(), again.last()) {
        assert_eq!(
            again,
            (*first..=*last).collect::<Vec<_>>(),
            "one run of consecutive records"
        );
        assert_eq!(
            before.last(),
            Some(last),
            "the run ends at the last record delivered before the kill"
        );
    }
}
