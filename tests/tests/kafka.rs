//! The `kafka` sink end to end against a real Kafka-protocol broker
//! (tansu, installed by .ci/run under /var/tmp/weir-tools): generator
//! records through weir-sender, weir-linksim (2% loss) and weir-receiver
//! into a topic, read back with an rdkafka consumer. Each test makes its
//! own topic. The broker on 127.0.0.1:9092 is used when it answers; else
//! each test starts a private tansu on a free port when it is installed.
//! The outage test always runs a private tansu behind a TCP proxy that it
//! stops for 20 s (its port refuses connections, open ones are closed):
//! tansu's `memory://` storage would lose the topic on a broker restart,
//! so the outage is the network's, not the broker process's.
//!
//! Without a broker and without tansu these tests print why and pass as
//! skipped; with `WEIR_SERVICES=1` (`make test-services`, CI) they fail.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

const SHARED: &str = "127.0.0.1:9092";
const TANSU: &str = "/var/tmp/weir-tools/bin/tansu";

fn answers(addr: &str) -> bool {
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1)).is_ok()
}

fn required() -> bool {
    std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1")
}

/// A tansu broker on `port`, advertising `advertised` (a proxy in front of
/// it, or itself), with in-memory storage.
fn start_tansu(s: &Scratch, log: &str, port: u16, advertised: u16) -> Proc {
    Proc::spawn_path(
        s,
        log,
        Path::new(TANSU),
        &[
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{port}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{advertised}"),
            "--storage-engine",
            "memory://tansu/",
        ],
    )
}

/// The broker a test uses: the shared one, or a private tansu (kept in the
/// returned Proc); None (skipped, with the reason printed) when neither.
fn broker(s: &Scratch, test: &str) -> Option<(String, Option<Proc>)> {
    if answers(SHARED) {
        return Some((SHARED.to_string(), None));
    }
    if !Path::new(TANSU).exists() {
        if required() {
            panic!("{test}: WEIR_SERVICES=1 but nothing answers on {SHARED} and {TANSU} is missing (.ci/run installs it)");
        }
        eprintln!("SKIPPED {test}: no Kafka broker on {SHARED} and no {TANSU} (run .ci/run, or `cargo install tansu --features dynostore --root /var/tmp/weir-tools`)");
        return None;
    }
    let port = free_tcp_port();
    let p = start_tansu(s, "tansu", port, port);
    let addr = format!("127.0.0.1:{port}");
    assert!(
        wait_until(Duration::from_secs(20), || answers(&addr)),
        "the private tansu did not answer on {addr}"
    );
    Some((addr, Some(p)))
}

fn unique(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "weirtest.{test}.{}.{}",
        std::process::id(),
        nanos % 1_000_000_000
    )
}

fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let res = rt
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .expect("create_topics");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// One record read back.
#[derive(Debug, Clone)]
struct Got {
    partition: i32,
    offset: i64,
    key: String,
    stream: String,
    seq: u64,
    headers: HashMap<String, String>,
}

/// Reads every record of `topic` (all partitions from the start) until
/// `total` or until nothing new came for `quiet`.
fn read_topic(brokers: &str, topic: &str, total: usize, quiet: Duration) -> Vec<Got> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in meta.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut last = Instant::now();
    while out.len() < total && last.elapsed() < quiet {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.expect("a record");
        last = Instant::now();
        let v: Value = serde_json::from_slice(m.payload().unwrap()).expect("value is JSON");
        let mut headers = HashMap::new();
        if let Some(h) = m.headers() {
            for i in 0..h.count() {
                let x = h.get(i);
                headers.insert(
                    x.key.to_string(),
                    String::from_utf8_lossy(x.value.unwrap_or_default()).to_string(),
                );
            }
        }
        out.push(Got {
            partition: m.partition(),
            offset: m.offset(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).to_string(),
            stream: v["stream"].as_str().unwrap().to_string(),
            seq: v["seq"].as_u64().unwrap(),
            headers,
        });
    }
    out
}

/// Checks keys and headers and returns the seqs of stream `gen` in the
/// order read, and per key (in partition order).
fn check(got: &[Got]) -> (Vec<u64>, BTreeMap<String, Vec<u64>>) {
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut partitions: BTreeMap<i32, usize> = BTreeMap::new();
    for g in got {
        assert_eq!(g.stream, "gen");
        assert!(g.key.starts_with("gen/gen/tag-"), "key {}", g.key);
        assert_eq!(g.headers["weir-stream"], "gen");
        assert_eq!(g.headers["weir-seq"], g.seq.to_string());
        assert!(g.headers["weir-epoch"].parse::<u64>().is_ok());
        assert!(g.headers["weir-ts"].parse::<i64>().unwrap() > 0);
        per_key.entry(g.key.clone()).or_default().push(g.seq);
        *partitions.entry(g.partition).or_default() += 1;
    }
    eprintln!("records per partition: {partitions:?}");
    (got.iter().map(|g| g.seq).collect(), per_key)
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
        Linksim::new(s, self.sender_port, self.receiver_port, 12, loss)
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

fn receiver_config(s: &Scratch, port: u16, brokers: &str, topic: &str) -> PathBuf {
    let d = s.path.display();
    s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:{port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
             [metrics]\npath = \"{d}/receiver-metrics.json\"\nlog_interval_s = 1\n\
             [[sinks]]\nname = \"kafka\"\ntype = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\nlinger_ms = 10\ncompression = \"lz4\"\n",
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

fn sink_metric(s: &Scratch, key: &str) -> Option<u64> {
    read_json(&s.join("receiver-metrics.json"))[key].as_u64()
}

/// Waits until the sink confirmed `total` records or stopped moving while
/// caught up.
fn wait_for_sink(s: &Scratch, total: u64, limit: Duration) -> u64 {
    let start = Instant::now();
    let mut last = 0;
    let mut since = Instant::now();
    while start.elapsed() < limit {
        let n = sink_metric(s, "sink.kafka.records").unwrap_or(0);
        if n >= total {
            return n;
        }
        if n != last {
            last = n;
            since = Instant::now();
        } else if since.elapsed() > Duration::from_secs(4)
            && sink_metric(s, "sink.kafka.behind") == Some(0)
        {
            return n;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    last
}

#[test]
fn a_hundred_thousand_records_cross_a_lossy_link_into_kafka_once_in_order() {
    let s = Scratch::new("kafka100k");
    let Some((brokers, _tansu)) = broker(&s, "kafka 100k") else {
        return;
    };
    let topic = unique("100k");
    create_topic(&brokers, &topic, 1);
    let link = Link::new();
    let _linksim = link.linksim(&s, 0.02);
    let rcfg = receiver_config(&s, link.receiver_port, &brokers, &topic);
    let mut receiver = receiver(&s, "receiver", &rcfg);
    let total = 100_000u64;
    let started = Instant::now();
    let mut sender = sender(&s, link.sender_port, 20_000, total);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let n = wait_for_sink(&s, total, Duration::from_secs(40));
    eprintln!(
        "{n} records confirmed by Kafka {:.1} s after the sender started",
        started.elapsed().as_secs_f64()
    );
    assert!(
        receiver.is_running(),
        "receiver died: {}",
        log_text(&s, "receiver")
    );
    assert!(receiver.stop(Duration::from_secs(20)));
    let got = read_topic(&brokers, &topic, total as usize + 1, Duration::from_secs(5));
    let (seqs, _) = check(&got);
    assert_complete_in_order(&seqs, total);
}

#[test]
fn kill_9_of_the_receiver_mid_run_stores_every_record_in_kafka_at_most_once() {
    let s = Scratch::new("kafkakill9");
    let Some((brokers, _tansu)) = broker(&s, "kafka kill -9") else {
        return;
    };
    let topic = unique("kill9");
    // Three partitions: the restart's scan reads each from its own offset.
    create_topic(&brokers, &topic, 3);
    let link = Link::new();
    let _linksim = link.linksim(&s, 0.02);
    let rcfg = receiver_config(&s, link.receiver_port, &brokers, &topic);
    let mut receiver1 = receiver(&s, "receiver-1", &rcfg);
    let total = 100_000u64;
    let mut sender = sender(&s, link.sender_port, 20_000, total);
    assert!(
        wait_until(Duration::from_secs(30), || sink_metric(
            &s,
            "sink.kafka.records"
        )
        .unwrap_or(0)
            > 20_000),
        "records reach Kafka before the kill: {}",
        log_text(&s, "receiver-1")
    );
    receiver1.signal("KILL");
    assert!(wait_until(Duration::from_secs(5), || !receiver1.is_running()));
    std::thread::sleep(Duration::from_millis(1000));
    let mut receiver2 = receiver(&s, "receiver-2", &rcfg);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    wait_for_sink(&s, total, Duration::from_secs(40));
    assert!(
        receiver2.is_running(),
        "the restarted receiver died: {}",
        log_text(&s, "receiver-2")
    );
    assert!(receiver2.stop(Duration::from_secs(20)));
    let got = read_topic(&brokers, &topic, total as usize + 1, Duration::from_secs(5));
    let (seqs, per_key) = check(&got);
    for (key, seqs) in &per_key {
        if let Some(i) = seqs.windows(2).position(|w| w[0] >= w[1]) {
            let at: Vec<_> = got
                .iter()
                .filter(|g| &g.key == key && (g.seq == seqs[i] || g.seq == seqs[i + 1]))
                .map(|g| (g.partition, g.offset, g.seq))
                .collect();
            panic!("key {key}: records twice or out of order: (partition, offset, seq) {at:?}");
        }
    }
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    let g = gaps(&s.join("audit.jsonl"), "gen");
    eprintln!(
        "{} stored, gaps {g:?}; {}",
        seqs.len(),
        log_text(&s, "receiver-2")
            .lines()
            .filter(|l| l.contains("found records stored"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert!(
        g.iter().all(|x| x.2 == "receiver-down"),
        "the only gaps are records sent while the receiver was down: {g:?}"
    );
    assert_exactly_accounted(&sorted, &g, total);
}

#[test]
fn a_broker_unreachable_for_20_s_mid_run_loses_and_duplicates_nothing() {
    let s = Scratch::new("kafkaoutage");
    if !Path::new(TANSU).exists() {
        if required() {
            panic!("WEIR_SERVICES=1 but {TANSU} is missing (.ci/run installs it)");
        }
        eprintln!("SKIPPED kafka outage: {TANSU} is missing (run .ci/run)");
        return;
    }
    let (broker_port, proxy_port) = (free_tcp_port(), free_tcp_port());
    let _tansu = start_tansu(&s, "tansu", broker_port, proxy_port);
    assert!(wait_until(Duration::from_secs(20), || answers(&format!(
        "127.0.0.1:{broker_port}"
    ))));
    let proxy = TcpProxy::start(proxy_port, broker_port);
    let brokers = format!("127.0.0.1:{proxy_port}");
    let topic = unique("outage");
    create_topic(&brokers, &topic, 1);
    let link = Link::new();
    let _linksim = link.linksim(&s, 0.02);
    let rcfg = receiver_config(&s, link.receiver_port, &brokers, &topic);
    let mut receiver = receiver(&s, "receiver", &rcfg);
    // 25 s of records: the sender is still sending when the broker is back.
    let total = 100_000u64;
    let mut sender = sender(&s, link.sender_port, 4_000, total);
    assert!(
        wait_until(Duration::from_secs(30), || sink_metric(
            &s,
            "sink.kafka.records"
        )
        .unwrap_or(0)
            > 8_000),
        "records reach Kafka before the outage: {}",
        log_text(&s, "receiver")
    );
    proxy.stop();
    assert!(proxy.refuses(), "the broker's port refuses connections");
    let during = sink_metric(&s, "sink.kafka.records").unwrap_or(0);
    std::thread::sleep(Duration::from_secs(20));
    let after = sink_metric(&s, "sink.kafka.records").unwrap_or(0);
    proxy.restart();
    eprintln!("confirmed at the cut {during}, 20 s later {after}");
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish its count and exit cleanly"
    );
    let n = wait_for_sink(&s, total, Duration::from_secs(60));
    assert!(
        receiver.is_running(),
        "receiver died: {}",
        log_text(&s, "receiver")
    );
    assert!(receiver.stop(Duration::from_secs(20)));
    let got = read_topic(&brokers, &topic, total as usize + 1, Duration::from_secs(5));
    eprintln!("{n} confirmed, {} read back", got.len());
    let (seqs, _) = check(&got);
    assert_complete_in_order(&seqs, total);
}
