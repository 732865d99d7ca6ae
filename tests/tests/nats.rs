//! The `nats` sink end to end against a real nats-server with JetStream:
//! generator records through weir-sender, weir-linksim (2% loss) and
//! weir-receiver into a JetStream stream, read back with an ordered
//! consumer. Each test uses its own stream and subjects on the shared
//! server on 127.0.0.1:4222 and deletes them at the end; the outage test
//! runs a private nats-server on a free port with its own store directory.
//!
//! Without a server on :4222 these tests print why and pass as skipped;
//! with `WEIR_SERVICES=1` (`make test-services`, CI) a missing server fails.

mod common;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::*;
use futures_util::StreamExt;
use serde_json::Value;

const SERVER: &str = "127.0.0.1:4222";
const NATS_SERVER_BIN: &str = "/usr/sbin/nats-server";

fn answers(addr: &str) -> bool {
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_ok()
}

/// True when the server answers; otherwise prints why the test is skipped
/// (or fails when WEIR_SERVICES=1 says the services must be there).
fn server_answers(test: &str) -> bool {
    let up = answers(SERVER);
    if !up {
        if std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1") {
            panic!("{test}: WEIR_SERVICES=1 but no NATS server answers on {SERVER} (.ci/run starts nats-server -js)");
        }
        eprintln!("SKIPPED {test}: no NATS server answers on {SERVER} (start `nats-server -js`, or run `make test-services`)");
    }
    up
}

/// A JetStream stream name no other run shares.
fn unique(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "WEIRTEST_{test}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn js(addr: &str) -> jetstream::Context {
    let client = async_nats::connect(addr)
        .await
        .expect("test client connects");
    jetstream::new(client)
}

/// Creates stream `name` capturing `subjects` (the test's own, so the sink
/// finds it with `create_stream = false`).
fn create_stream(addr: &str, name: &str, subjects: &str) {
    rt().block_on(async {
        js(addr)
            .await
            .create_stream(jetstream::stream::Config {
                name: name.into(),
                subjects: vec![subjects.into()],
                ..Default::default()
            })
            .await
            .expect("test stream created");
    });
}

fn delete_stream(addr: &str, name: &str) {
    rt().block_on(async {
        let _ = js(addr).await.delete_stream(name).await;
    });
}

/// Messages in the stream now (0 when it does not exist yet).
fn stream_count(addr: &str, name: &str) -> u64 {
    rt().block_on(async {
        match js(addr).await.get_stream(name).await {
            Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    })
}

/// One stored message: its JSON's stream and seq, its subject and msg id.
#[derive(Debug, Clone)]
struct Stored {
    stream: String,
    seq: u64,
    subject: String,
    msg_id: String,
}

/// Every message of the stream, in stream order (an ordered consumer).
fn read_stream(addr: &str, name: &str) -> Vec<Stored> {
    rt().block_on(async {
        let js = js(addr).await;
        let mut stream = js.get_stream(name).await.expect("stream exists");
        let total = stream.info().await.unwrap().state.messages;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .expect("ordered consumer");
        let mut messages = consumer.messages().await.expect("messages");
        let mut out = Vec::with_capacity(total as usize);
        while (out.len() as u64) < total {
            let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .expect("a message within 10 s")
                .expect("stream goes on")
                .expect("message");
            let v: Value = serde_json::from_slice(&m.payload).expect("payload is JSON");
            out.push(Stored {
                stream: v["stream"].as_str().unwrap().to_string(),
                seq: v["seq"].as_u64().unwrap(),
                subject: m.subject.to_string(),
                msg_id: m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_else(|| format!("no Nats-Msg-Id in {:?}", m.headers)),
            });
        }
        out
    })
}

struct Link {
    sender_port: u16,
    receiver_port: u16,
}

impl Link {
    fn new() -> Link {
        Link {
            sender_port: free_udp_port(),
            receiver_port: free_udp_port(),
        }
    }

    fn linksim(&self, s: &Scratch, loss: f64) -> Proc {
        Linksim::new(s, self.sender_port, self.receiver_port, 11, loss)
            .no_bursts()
            .spawn()
    }
}

fn sender(s: &Scratch, port: u16, rate: u64, count: u64) -> Proc {
    let cfg = format!(
        "{}[link]\ndestination = \"127.0.0.1:{port}\"\nrate = \"200Mbit\"\n[metrics]\npath = \"{d}/sender-metrics.json\"\nlog_interval_s = 1\n[spool]\npath = \"{d}/spool\"\n\
         [[sources]]\nname = \"gen\"\ntype = \"generator\"\ntags = 100\nrate = {rate}\ncount = {count}\n",
        sender_auth(s),
        d = s.path.display()
    );
    let path = s.write("sender.toml", &cfg);
    Proc::spawn(
        s,
        "sender",
        "weir-sender",
        &["run", "--config", path.to_str().unwrap()],
    )
}

fn receiver_config(s: &Scratch, port: u16, sink: &str) -> std::path::PathBuf {
    let d = s.path.display();
    s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:{port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
             [metrics]\npath = \"{d}/receiver-metrics.json\"\nlog_interval_s = 1\n{sink}",
            receiver_auth(s)
        ),
    )
}

fn receiver(s: &Scratch, log: &str, cfg: &Path) -> Proc {
    Proc::spawn(
        s,
        log,
        "weir-receiver",
        &["run", "--config", cfg.to_str().unwrap()],
    )
}

fn nats_sink(url: &str, subject: &str, stream: &str, extra: &str) -> String {
    format!(
        "[[sinks]]\nname = \"js\"\ntype = \"nats\"\nurl = \"nats://{url}\"\nsubject = \"{subject}\"\nstream = \"{stream}\"\n{extra}\n"
    )
}

/// Waits until the stream holds `total` messages, or its count has not
/// moved for `quiet` while the sink is caught up; returns the count.
fn wait_for_stream(s: &Scratch, addr: &str, name: &str, total: u64, limit: Duration) -> u64 {
    let start = Instant::now();
    let mut last = 0;
    let mut since = Instant::now();
    while start.elapsed() < limit {
        let n = stream_count(addr, name);
        if n >= total {
            return n;
        }
        if n != last {
            last = n;
            since = Instant::now();
        } else if since.elapsed() > Duration::from_secs(4)
            && read_json(&s.join("receiver-metrics.json"))["sink.js.behind"].as_u64() == Some(0)
        {
            return n;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    last
}

/// The seqs of stream `gen` in stored order, checking each message's id
/// and subject.
fn gen_seqs(stored: &[Stored], subject_prefix: &str) -> Vec<u64> {
    let mut per_stream: BTreeMap<&str, usize> = BTreeMap::new();
    for m in stored {
        *per_stream.entry(&m.stream).or_default() += 1;
        assert!(
            m.subject.starts_with(subject_prefix),
            "subject {} is under {subject_prefix}",
            m.subject
        );
        let parts: Vec<&str> = m.msg_id.split('/').collect();
        assert_eq!(
            (parts.len(), parts[0], parts.last().copied()),
            (3, m.stream.as_str(), Some(m.seq.to_string().as_str())),
            "Nats-Msg-Id {} is stream/epoch/seq",
            m.msg_id
        );
    }
    assert_eq!(per_stream.keys().copied().collect::<Vec<_>>(), ["gen"]);
    stored.iter().map(|m| m.seq).collect()
}

#[test]
fn a_hundred_thousand_records_cross_a_lossy_link_into_jetstream_once_in_order() {
    if !server_answers("nats 100k") {
        return;
    }
    let s = Scratch::new("nats100k");
    let name = unique("100K");
    let subjects = format!("{}.>", name.to_lowercase());
    create_stream(SERVER, &name, &subjects);
    let link = Link::new();
    let _linksim = link.linksim(&s, 0.02);
    let rcfg = receiver_config(
        &s,
        link.receiver_port,
        &nats_sink(
            SERVER,
            &format!("{}.{{stream}}", name.to_lowercase()),
            &name,
            "",
        ),
    );
    let mut receiver = receiver(&s, "receiver", &rcfg);
    let total = 100_000u64;
    let started = Instant::now();
    let mut sender = sender(&s, link.sender_port, 20_000, total);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let n = wait_for_stream(&s, SERVER, &name, total, Duration::from_secs(40));
    let elapsed = started.elapsed();
    assert!(
        receiver.is_running(),
        "receiver died: {}",
        log_text(&s, "receiver")
    );
    let stored = read_stream(SERVER, &name);
    delete_stream(SERVER, &name);
    eprintln!(
        "{n} records in JetStream {:.1} s after the sender started",
        elapsed.as_secs_f64()
    );
    let seqs = gen_seqs(&stored, &format!("{}.gen", name.to_lowercase()));
    assert_complete_in_order(&seqs, total);
    assert!(receiver.stop(Duration::from_secs(20)));
}

#[test]
fn kill_9_of_the_receiver_mid_run_stores_every_record_in_jetstream_at_most_once() {
    if !server_answers("nats kill -9") {
        return;
    }
    let s = Scratch::new("natskill9");
    let name = unique("KILL9");
    let subject = format!("{}.{{stream}}.{{tag}}", name.to_lowercase());
    let link = Link::new();
    let _linksim = link.linksim(&s, 0.02);
    let rcfg = receiver_config(
        &s,
        link.receiver_port,
        &nats_sink(SERVER, &subject, &name, "create_stream = true"),
    );
    let mut receiver1 = receiver(&s, "receiver-1", &rcfg);
    let total = 100_000u64;
    let mut sender = sender(&s, link.sender_port, 20_000, total);
    assert!(
        wait_until(Duration::from_secs(20), || stream_count(SERVER, &name)
            > 20_000),
        "records reach JetStream before the kill: {}",
        log_text(&s, "receiver-1")
    );
    receiver1.signal("KILL");
    assert!(wait_until(Duration::from_secs(5), || !receiver1.is_running()));
    let before = stream_count(SERVER, &name);
    std::thread::sleep(Duration::from_millis(1000));
    let mut receiver2 = receiver(&s, "receiver-2", &rcfg);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let n = wait_for_stream(&s, SERVER, &name, total, Duration::from_secs(40));
    assert!(
        receiver2.is_running(),
        "the restarted receiver died: {}",
        log_text(&s, "receiver-2")
    );
    assert!(receiver2.stop(Duration::from_secs(20)));
    let stored = read_stream(SERVER, &name);
    delete_stream(SERVER, &name);
    let seqs = gen_seqs(&stored, &format!("{}.gen.gen.tag-", name.to_lowercase()));
    let g = gaps(&s.join("audit.jsonl"), "gen");
    eprintln!("{n} stored ({before} before the kill), gaps {g:?}");
    assert!(
        g.iter().all(|x| x.2 == "receiver-down"),
        "the only gaps are records sent while the receiver was down: {g:?}"
    );
    assert_exactly_accounted(&seqs, &g, total);
}

/// A private nats-server with JetStream on `port`, storing in `dir`.
fn private_server(s: &Scratch, log: &str, port: u16, dir: &Path) -> Proc {
    Proc::spawn_path(
        s,
        log,
        Path::new(NATS_SERVER_BIN),
        &[
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-js",
            "-sd",
            dir.to_str().unwrap(),
        ],
    )
}

#[test]
fn a_jetstream_server_down_for_20_s_mid_run_loses_and_duplicates_nothing() {
    if !Path::new(NATS_SERVER_BIN).exists() {
        if std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1") {
            panic!(
                "WEIR_SERVICES=1 but {NATS_SERVER_BIN} is missing (apt-get install nats-server)"
            );
        }
        eprintln!("SKIPPED nats outage: {NATS_SERVER_BIN} is missing");
        return;
    }
    let s = Scratch::new("natsoutage");
    let port = free_tcp_port();
    let addr = format!("127.0.0.1:{port}");
    let store = s.join("nats-store");
    let mut server = private_server(&s, "nats-1", port, &store);
    assert!(wait_until(Duration::from_secs(10), || answers(&addr)));
    let name = "WEIR_OUTAGE";
    let link = Link::new();
    let _linksim = link.linksim(&s, 0.02);
    let rcfg = receiver_config(
        &s,
        link.receiver_port,
        &nats_sink(&addr, "outage.{stream}", name, "create_stream = true"),
    );
    let mut receiver = receiver(&s, "receiver", &rcfg);
    // 25 s of records: the sender is still sending when the server is back.
    let total = 100_000u64;
    let mut sender = sender(&s, link.sender_port, 4_000, total);
    assert!(
        wait_until(Duration::from_secs(20), || stream_count(&addr, name)
            > 8_000),
        "records reach JetStream before the outage: {}",
        log_text(&s, "receiver")
    );
    server.signal("KILL");
    assert!(wait_until(Duration::from_secs(5), || !server.is_running()));
    assert!(!answers(&addr), "the server's port refuses connections");
    let at_stop = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let _server = private_server(&s, "nats-2", port, &store);
    assert!(wait_until(Duration::from_secs(10), || answers(&addr)));
    eprintln!("server down for {:.1} s", at_stop.elapsed().as_secs_f64());
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let n = wait_for_stream(&s, &addr, name, total, Duration::from_secs(60));
    assert!(
        receiver.is_running(),
        "receiver died: {}",
        log_text(&s, "receiver")
    );
    let log = log_text(&s, "receiver");
    assert!(
        log.contains("write failed"),
        "the outage shows as failed writes in the receiver's log"
    );
    assert!(receiver.stop(Duration::from_secs(20)));
    let stored = read_stream(&addr, name);
    eprintln!("{n} stored");
    let seqs = gen_seqs(&stored, "outage.gen");
    assert_complete_in_order(&seqs, total);
}
