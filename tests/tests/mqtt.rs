//! MQTT end to end against the real Mosquitto on 127.0.0.1:1883: a test
//! publisher on an OT topic prefix, weir-sender's `mqtt` source, the link
//! (through weir-linksim where loss matters), weir-receiver's `mqtt` or
//! `file` sink, and a test subscriber on the IT prefix. Each test uses its
//! own topic prefixes (they stand for the OT and IT brokers) and client ids,
//! and clears the retained messages it made. The broker-restart test runs a
//! private mosquitto on a free port instead, so the shared one is never
//! disturbed.
//!
//! Without a broker on :1883 these tests print why and pass as skipped;
//! with `WEIR_SERVICES=1` (`make test-services`, CI) a missing broker fails.

mod common;

#[allow(dead_code)]
#[path = "../../sender/src/sources/mqtt/sparkplug_b.rs"]
mod sparkplug_b;

use std::collections::{BTreeMap, HashSet};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use prost::Message as _;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

const BROKER: &str = "127.0.0.1:1883";

/// True when a broker answers on `addr`; otherwise prints why the test is
/// skipped (or fails when WEIR_SERVICES=1 says the services must be there).
fn broker_answers(test: &str) -> bool {
    let up = TcpStream::connect_timeout(&BROKER.parse().unwrap(), Duration::from_secs(1)).is_ok();
    if !up {
        if std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1") {
            panic!("{test}: WEIR_SERVICES=1 but no MQTT broker answers on {BROKER} (.ci/run starts mosquitto)");
        }
        eprintln!("SKIPPED {test}: no MQTT broker answers on {BROKER} (start mosquitto, or run `make test-services`)");
    }
    up
}

/// A prefix no other test run shares.
fn unique(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "weir-test/{test}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000
    )
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

    /// The sender's destination: the link simulator's port, or the receiver's directly.
    fn destination(&self, through_linksim: bool) -> u16 {
        if through_linksim {
            self.sender_port
        } else {
            self.receiver_port
        }
    }

    fn linksim(&self, s: &Scratch, loss: f64) -> Proc {
        Linksim::new(s, self.sender_port, self.receiver_port, 10, loss)
            .no_bursts()
            .stats_file()
            .spawn()
    }
}

fn sender(s: &Scratch, port: u16, sources: &str) -> Proc {
    let cfg = format!(
        "{}[link]\ndestination = \"127.0.0.1:{port}\"\nrate = \"200Mbit\"\n[metrics]\npath = \"{d}/sender-metrics.json\"\nlog_interval_s = 1\n[spool]\npath = \"{d}/spool\"\n{sources}",
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

fn receiver(s: &Scratch, link: &Link, sinks: &str) -> Proc {
    let d = s.path.display();
    let cfg = format!(
        "{}[link]\nlisten = \"127.0.0.1:{}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
         [metrics]\npath = \"{d}/receiver-metrics.json\"\nlog_interval_s = 1\n{sinks}",
        receiver_auth(s),
        link.receiver_port
    );
    let path = s.write("receiver.toml", &cfg);
    Proc::spawn(
        s,
        "receiver",
        "weir-receiver",
        &["run", "--config", path.to_str().unwrap()],
    )
}

fn sender_metrics(s: &Scratch) -> Value {
    read_json(&s.join("sender-metrics.json"))
}

/// Waits until the sender's source `name` has subscribed.
fn wait_subscribed(s: &Scratch, name: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || {
            sender_metrics(s)["sources"][name]["state"] == "subscribed"
        }),
        "source {name} never subscribed; metrics: {}",
        sender_metrics(s)
    );
}

/// A message seen by a test subscriber.
#[derive(Debug, Clone)]
struct Got {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

/// A subscriber on `filter` (QoS 1, clean session) collecting what arrives.
struct Subscriber {
    got: Arc<Mutex<Vec<Got>>>,
    client: Client,
}

impl Subscriber {
    fn new(id: &str, port: u16, filter: &str) -> Subscriber {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(true)
            .set_max_packet_size(1 << 24, 1 << 24);
        let (client, mut connection) = Client::new(o, 64);
        client.subscribe(filter, QoS::AtLeastOnce).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = got.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => sink.lock().unwrap().push(Got {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("test subscriber got no SUBACK");
        Subscriber { got, client }
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    fn taken(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// A publisher that waits for each QoS 1 message's PUBACK (so a test knows
/// exactly what the broker acknowledged) or publishes QoS 0 straight on.
struct Publisher {
    client: Client,
    acks: std::sync::mpsc::Receiver<Result<(), String>>,
}

impl Publisher {
    fn new(id: &str, port: u16) -> Option<Publisher> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(true)
            .set_max_packet_size(1 << 24, 1 << 24);
        let (client, mut connection) = Client::new(o, 64);
        let (tx, acks) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                let sent = match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => tx.send(Ok(())),
                    Ok(Event::Incoming(Packet::PubAck(_))) => tx.send(Ok(())),
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        match acks.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Some(Publisher { client, acks }),
            _ => None,
        }
    }

    /// Publishes and, for QoS 1, waits for the PUBACK: true once acknowledged.
    fn publish(&self, topic: &str, payload: Vec<u8>, qos: QoS, retain: bool) -> bool {
        if self.client.publish(topic, qos, retain, payload).is_err() {
            return false;
        }
        if qos == QoS::AtMostOnce {
            return true;
        }
        matches!(self.acks.recv_timeout(Duration::from_secs(10)), Ok(Ok(())))
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

/// Deterministic binary payload for message `i`: its index, then bytes of
/// every value (NULs, 0xff, invalid UTF-8), of varying length.
fn payload(i: u32) -> Vec<u8> {
    let len = (i as usize * 37) % 1500;
    let mut p = i.to_le_bytes().to_vec();
    p.extend((0..len).map(|k| (k as u32 ^ i.wrapping_mul(2_654_435_761)) as u8));
    p
}

/// Clears retained messages under the given topics.
fn clear_retained(topics: &[String]) {
    if let Some(p) = Publisher::new(&format!("weir-test-clear-{}", std::process::id()), 1883) {
        for t in topics {
            p.publish(t, Vec::new(), QoS::AtLeastOnce, true);
        }
    }
}

#[test]
fn ten_thousand_qos1_messages_cross_a_lossy_link_to_the_it_broker_once_in_order_byte_identical() {
    if !broker_answers("mqtt 10k") {
        return;
    }
    let s = Scratch::new("mqtt10k");
    let base = unique("10k");
    let (ot, it) = (format!("{base}/ot"), format!("{base}/it"));
    let link = Link::new();
    let _linksim = link.linksim(&s, 0.02);
    let _receiver = receiver(
        &s,
        &link,
        &format!("[[sinks]]\nname = \"it-broker\"\ntype = \"mqtt\"\nurl = \"mqtt://{BROKER}\"\nprefix = \"{it}\"\nclient_id = \"{base}-sink\"\nprotocol = \"5\"\n"),
    );
    let subscriber = Subscriber::new(&format!("{base}-sub"), 1883, &format!("{it}/#"));
    let _sender = sender(
        &s,
        link.destination(true),
        &format!("[[sources]]\nname = \"plant/mqtt\"\ntype = \"mqtt\"\nurl = \"mqtt://{BROKER}\"\ntopics = [\"{ot}/#\"]\nclient_id = \"{base}-source\"\nprotocol = \"5\"\n"),
    );
    wait_subscribed(&s, "plant/mqtt");
    let publisher = Publisher::new(&format!("{base}-pub"), 1883).expect("publisher connects");

    // 10,000 QoS 1 messages over 4 topics, 5 of them retained on their own
    // topics, and one of 256 KiB.
    let mut expected: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let mut retained = Vec::new();
    let total = 10_000u32;
    let started = Instant::now();
    for i in 0..total {
        let (topic, body, retain) = if i % 2000 == 1999 {
            let t = format!("{ot}/retained/{}", i / 2000);
            retained.push(t.clone());
            (t, payload(i), true)
        } else if i == 5000 {
            let mut big = payload(i);
            big.resize(256 << 10, 0xa5);
            (format!("{ot}/big"), big, false)
        } else {
            (format!("{ot}/line{}", i % 4), payload(i), false)
        };
        expected
            .entry(format!("{it}/{topic}"))
            .or_default()
            .push(body.clone());
        assert!(
            publisher.publish(&topic, body, QoS::AtLeastOnce, retain),
            "publish {i}"
        );
        // Keep well inside Mosquitto's per-client queue (max_queued_messages
        // 1000): a broker drops what overflows it, before weir ever sees it.
        if i % 100 == 99 {
            assert!(
                wait_until(Duration::from_secs(60), || subscriber.count() + 600
                    > i as usize),
                "the IT subscriber fell behind: {} of {i}; sender {}",
                subscriber.count(),
                sender_metrics(&s)
            );
        }
    }
    let arrived = wait_until(Duration::from_secs(120), || {
        subscriber.count() >= total as usize
    });
    let elapsed = started.elapsed();
    let got = subscriber.taken();
    assert!(
        arrived,
        "{} of {total} arrived; sender {}",
        got.len(),
        sender_metrics(&s)
    );
    // Once, in order per topic, byte-identical.
    let mut by_topic: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for g in &got {
        by_topic
            .entry(g.topic.clone())
            .or_default()
            .push(g.payload.clone());
    }
    assert_eq!(
        by_topic.len(),
        expected.len(),
        "topics: {:?}",
        by_topic.keys()
    );
    for (topic, want) in &expected {
        let have = &by_topic[topic];
        assert_eq!(have.len(), want.len(), "{topic}: count");
        for (k, (h, w)) in have.iter().zip(want).enumerate() {
            assert!(
                h == w,
                "{topic}: message {k} differs ({} vs {} bytes)",
                h.len(),
                w.len()
            );
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(subscriber.count(), total as usize, "nothing arrives twice");
    let linksim = read_json(&s.join("linksim.json"));
    assert!(
        linksim["dropped_random"].as_u64().unwrap_or(0) > 0,
        "the link lost datagrams: {linksim}"
    );
    eprintln!("10,000 QoS 1 messages end to end through 2% loss in {elapsed:?}");
    // The retained ones are retained on the IT broker too.
    let late = Subscriber::new(
        &format!("{base}-late"),
        1883,
        &format!("{it}/{ot}/retained/#"),
    );
    assert!(wait_until(Duration::from_secs(10), || late.count() >= retained.len()));
    assert!(
        late.taken().iter().all(|g| g.retain),
        "retained on the IT side"
    );
    let mut clear: Vec<String> = retained.clone();
    clear.extend(retained.iter().map(|t| format!("{it}/{t}")));
    drop(late);
    clear_retained(&clear);
}

fn file_records(dir: &std::path::Path) -> Vec<Value> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if p.extension().is_some_and(|e| e == "jsonl") {
                out.extend(json_lines(&p));
            }
        }
    }
    out
}

fn metric(
    name: Option<&str>,
    alias: u64,
    datatype: u32,
    value: sparkplug_b::MetricValue,
) -> sparkplug_b::Metric {
    sparkplug_b::Metric {
        name: name.map(str::to_string),
        alias: Some(alias),
        datatype: name.map(|_| datatype),
        value: Some(value),
        ..Default::default()
    }
}

fn with_quality(mut m: sparkplug_b::Metric, q: u32) -> sparkplug_b::Metric {
    m.properties = Some(sparkplug_b::PropertySet {
        keys: vec!["Quality".into()],
        values: vec![sparkplug_b::PropertyValue {
            r#type: Some(3),
            value: Some(sparkplug_b::PropertyValueKind::IntValue(q)),
            ..Default::default()
        }],
    });
    m
}

fn spb(ts: u64, seq: u64, metrics: Vec<sparkplug_b::Metric>) -> Vec<u8> {
    sparkplug_b::Payload {
        timestamp: Some(ts),
        metrics,
        seq: Some(seq),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn sparkplug_births_and_data_arrive_as_points_with_names_values_timestamps_and_qualities_while_garbage_is_kept_and_counted(
) {
    if !broker_answers("mqtt sparkplug") {
        return;
    }
    use sparkplug_b::MetricValue as V;
    let s = Scratch::new("mqtt-spb");
    let base = unique("spb");
    let group = base.replace('/', "-");
    let link = Link::new();
    let out = s.join("out");
    let _receiver = receiver(
        &s,
        &link,
        &format!(
            "[[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{}\"\n",
            out.display()
        ),
    );
    let _sender = sender(
        &s,
        link.destination(false),
        &format!(
            "[[sources]]\nname = \"spb\"\ntype = \"mqtt\"\nurl = \"mqtt://{BROKER}\"\ntopics = [\"spBv1.0/{group}/#\", \"{base}/json/#\"]\n\
             client_id = \"{base}-source\"\nsparkplug = true\njson = {{ value = \"/v\", timestamp = \"/t\" }}\n"
        ),
    );
    wait_subscribed(&s, "spb");
    let p = Publisher::new(&format!("{base}-pub"), 1883).expect("publisher connects");
    let topic = |kind: &str, device: Option<&str>| match device {
        Some(d) => format!("spBv1.0/{group}/{kind}/edge1/{d}"),
        None => format!("spBv1.0/{group}/{kind}/edge1"),
    };
    let q1 = QoS::AtLeastOnce;
    assert!(p.publish(
        &topic("NBIRTH", None),
        spb(
            1_700_000_000_000,
            0,
            vec![
                metric(Some("bdSeq"), 0, 8, V::LongValue(1)),
                metric(Some("Node Control/Rebirth"), 1, 11, V::BooleanValue(false)),
                metric(Some("Uptime"), 2, 4, V::LongValue(5)),
            ]
        ),
        q1,
        false
    ));
    assert!(p.publish(
        &topic("DBIRTH", Some("pump")),
        spb(
            1_700_000_000_100,
            1,
            vec![
                metric(Some("Temperature"), 10, 10, V::DoubleValue(20.5)),
                metric(Some("Running"), 11, 11, V::BooleanValue(true)),
                metric(Some("Mode"), 12, 12, V::StringValue("auto".into())),
                metric(Some("Offset"), 13, 3, V::IntValue((-7i32) as u32)),
            ]
        ),
        q1,
        false
    ));
    // Garbage in between: not a protobuf, a bad topic, non-JSON for the mapping.
    assert!(p.publish(
        &topic("DDATA", Some("pump")),
        b"\xff\xfe garbage".to_vec(),
        q1,
        false
    ));
    assert!(p.publish(
        &format!("spBv1.0/{group}/NDATA"),
        b"short topic".to_vec(),
        q1,
        false
    ));
    assert!(p.publish(
        &format!("{base}/json/a"),
        b"not json at all".to_vec(),
        q1,
        false
    ));
    assert!(p.publish(
        &format!("{base}/json/a"),
        br#"{"v": 42.5, "t": 1700000000999}"#.to_vec(),
        q1,
        false
    ));
    // Data by alias, one with its own timestamp, with qualities.
    let mut temp = with_quality(metric(None, 10, 0, V::DoubleValue(21.25)), 192);
    temp.timestamp = Some(1_700_000_000_500);
    assert!(p.publish(
        &topic("DDATA", Some("pump")),
        spb(
            1_700_000_000_400,
            2,
            vec![
                temp,
                with_quality(metric(None, 11, 0, V::BooleanValue(false)), 64),
                with_quality(metric(None, 13, 0, V::IntValue(9)), 0),
                metric(None, 99, 0, V::IntValue(1)),
            ]
        ),
        q1,
        false
    ));
    assert!(p.publish(
        &topic("NDATA", None),
        spb(
            1_700_000_000_600,
            3,
            vec![metric(None, 2, 0, V::LongValue(6))]
        ),
        q1,
        false
    ));
    assert!(p.publish(
        &topic("DDEATH", Some("pump")),
        spb(1_700_000_000_700, 4, vec![]),
        q1,
        false
    ));
    assert!(p.publish(
        &topic("DDATA", Some("pump")),
        spb(
            1_700_000_000_800,
            5,
            vec![metric(None, 10, 0, V::DoubleValue(1.0))]
        ),
        q1,
        false
    ));

    let prefix = format!("{group}/edge1");
    // 3 + 4 birth points, 3 data points + 1 node point, 1 JSON point; the
    // messages: 2 births, 2 invalid, 1 non-JSON, 1 DDATA with an unknown
    // alias, 1 death, 1 DDATA after the death.
    let complete = || {
        let recs = file_records(&out);
        let points = recs.iter().filter(|r| r["kind"] == "point").count();
        let messages = recs.iter().filter(|r| r["kind"] == "message").count();
        points >= 12 && messages >= 8
    };
    assert!(
        wait_until(Duration::from_secs(30), complete),
        "records: {:#?}\nsender: {}",
        file_records(&out),
        sender_metrics(&s)
    );
    let recs = file_records(&out);
    let point = |tag: &str, ts: &str| -> Value {
        recs.iter()
            .find(|r| {
                r["kind"] == "point"
                    && r["tag"] == tag
                    && r["ts"].as_str().is_some_and(|t| t.starts_with(ts))
            })
            .unwrap_or_else(|| panic!("no point {tag} at {ts} in {recs:#?}"))
            .clone()
    };
    let good = 0;
    let (uncertain, bad) = (1, 2);
    let r = point(
        &format!("{prefix}/pump/Temperature"),
        "2023-11-14T22:13:20.100",
    );
    assert_eq!(
        (r["value"].as_f64(), r["quality"].as_u64()),
        (Some(20.5), Some(good))
    );
    let r = point(&format!("{prefix}/pump/Offset"), "2023-11-14T22:13:20.100");
    assert_eq!(r["value"].as_i64(), Some(-7));
    let r = point(&format!("{prefix}/pump/Mode"), "2023-11-14T22:13:20.100");
    assert_eq!(r["value"], "auto");
    let r = point(
        &format!("{prefix}/pump/Temperature"),
        "2023-11-14T22:13:20.500",
    );
    assert_eq!(
        (r["value"].as_f64(), r["quality"].as_u64()),
        (Some(21.25), Some(good))
    );
    let r = point(&format!("{prefix}/pump/Running"), "2023-11-14T22:13:20.400");
    assert_eq!(
        (
            r["value"].as_bool(),
            r["quality"].as_u64(),
            r["status"].as_str()
        ),
        (Some(false), Some(uncertain), Some("sparkplug quality 64"))
    );
    let r = point(&format!("{prefix}/pump/Offset"), "2023-11-14T22:13:20.400");
    assert_eq!(
        (
            r["value"].as_i64(),
            r["quality"].as_u64(),
            r["status"].as_str()
        ),
        (Some(9), Some(bad), Some("sparkplug quality 0"))
    );
    let r = point(&format!("{prefix}/Uptime"), "2023-11-14T22:13:20.600");
    assert_eq!(r["value"].as_i64(), Some(6));
    let r = point(&format!("{base}/json/a"), "2023-11-14T22:13:20.999");
    assert_eq!(r["value"].as_f64(), Some(42.5));
    // Births and deaths are carried as messages too, byte for byte.
    let topics: HashSet<&str> = recs
        .iter()
        .filter(|r| r["kind"] == "message")
        .filter_map(|r| r["topic"].as_str())
        .collect();
    for t in [
        topic("NBIRTH", None),
        topic("DBIRTH", Some("pump")),
        topic("DDEATH", Some("pump")),
    ] {
        assert!(topics.contains(t.as_str()), "{t} in {topics:?}");
    }
    assert!(
        wait_until(Duration::from_secs(5), || {
            let m = sender_metrics(&s);
            m["mqtt_sparkplug_invalid"] == 2
                && m["mqtt_unmapped"] == 1
                && m["mqtt_sparkplug_unknown_alias"] == 2
        }),
        "counters: {}",
        sender_metrics(&s)
    );
}

/// A private broker on a free loopback port with persistence in `dir`.
fn private_broker(s: &Scratch, port: u16, run: u32) -> Proc {
    let dir = s.join("mosquitto");
    std::fs::create_dir_all(&dir).unwrap();
    // mosquitto started as root runs as the `mosquitto` user: it must be
    // able to write its database here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let conf = s.write(
        "mosquitto.conf",
        &format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\n",
            dir.display()
        ),
    );
    let p = Proc::spawn_path(
        s,
        &format!("mosquitto-{run}"),
        std::path::Path::new("/usr/sbin/mosquitto"),
        &["-c", conf.to_str().unwrap()],
    );
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "private mosquitto did not start on {port}"
    );
    p
}

#[test]
fn a_broker_restart_mid_run_loses_nothing_the_broker_acknowledged() {
    if !broker_answers("mqtt broker restart") {
        return;
    }
    if !std::path::Path::new("/usr/sbin/mosquitto").exists() {
        eprintln!("SKIPPED mqtt broker restart: /usr/sbin/mosquitto is not installed");
        return;
    }
    let s = Scratch::new("mqtt-restart");
    let port = free_tcp_port();
    let mut broker = private_broker(&s, port, 1);
    let link = Link::new();
    let out = s.join("out");
    let _receiver = receiver(
        &s,
        &link,
        &format!(
            "[[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{}\"\n",
            out.display()
        ),
    );
    let _sender = sender(
        &s,
        link.destination(false),
        &format!("[[sources]]\nname = \"ot\"\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\ntopics = [\"plant/#\"]\nprotocol = \"5\"\n"),
    );
    wait_subscribed(&s, "ot");
    let total = 3000u32;
    let mut acked: Vec<u32> = Vec::new();
    let mut publisher = Publisher::new("restart-pub", port);
    let mut i = 0;
    let mut restarted = false;
    while i < total {
        if i == total / 2 && !restarted {
            restarted = true;
            // SIGTERM: mosquitto saves its persistent sessions and queues.
            assert!(broker.stop(Duration::from_secs(10)), "mosquitto stopped");
            drop(publisher.take());
            std::thread::sleep(Duration::from_millis(500));
            broker = private_broker(&s, port, 2);
        }
        let p = match &publisher {
            Some(p) => p,
            None => {
                publisher = Publisher::new("restart-pub", port);
                if publisher.is_none() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        if p.publish(
            &format!("plant/line{}", i % 3),
            payload(i),
            QoS::AtLeastOnce,
            false,
        ) {
            acked.push(i);
            i += 1;
        } else {
            publisher = None;
        }
    }
    let want: HashSet<Vec<u8>> = acked.iter().map(|i| payload(*i)).collect();
    let arrived = || -> HashSet<Vec<u8>> {
        use base64::Engine;
        file_records(&out)
            .iter()
            .filter(|r| r["kind"] == "message")
            .filter_map(|r| r["payload"].as_str())
            .filter_map(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(60), || want.is_subset(&arrived())),
        "{} of {} acknowledged messages arrived; sender {}",
        want.intersection(&arrived()).count(),
        want.len(),
        sender_metrics(&s)
    );
    // The metrics file is written once a second.
    assert!(
        wait_until(Duration::from_secs(5), || {
            let m = sender_metrics(&s);
            m["mqtt_connection_errors"].as_u64() >= Some(1)
                && m["sources"]["ot"]["connections"].as_u64() >= Some(2)
                && m["sources"]["ot"]["state"] != "retrying"
        }),
        "the lost connection is counted and shows in the status, and it reconnected: {}",
        sender_metrics(&s)
    );
    drop(broker);
}

/// A private mosquitto with a plain anonymous listener (for the test's
/// own clients) and a TLS listener that wants a username and password
/// (for weir's source and sink).
fn tls_broker(s: &Scratch, plain: u16, tls: u16, pki: &pki::Pki) -> Proc {
    let passwd = s.join("mosquitto.passwd");
    let out = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c", passwd.to_str().unwrap(), "weir", "s3cret pass"])
        .output()
        .expect("running mosquitto_passwd");
    assert!(out.status.success(), "{out:?}");
    let conf = s.write(
        "mosquitto-tls.conf",
        &format!(
            "user root\nper_listener_settings true\n\
             listener {plain} 127.0.0.1\nallow_anonymous true\n\
             listener {tls} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
             cafile {}\ncertfile {}\nkeyfile {}\n",
            passwd.display(),
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    );
    let p = Proc::spawn_path(
        s,
        "mosquitto-tls",
        std::path::Path::new("/usr/sbin/mosquitto"),
        &["-c", conf.to_str().unwrap()],
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", plain)).is_ok()
                && TcpStream::connect(("127.0.0.1", tls)).is_ok()
        }),
        "private mosquitto did not start on {plain} and {tls}; see {}",
        s.path.display()
    );
    p
}

/// An MQTT 5 client on the plain listener: publishes with user
/// properties, and collects what arrives under `it/#` with its properties.
/// A message as received: topic, payload, user properties.
type V5Got = (String, Vec<u8>, Vec<(String, String)>);

struct V5Client {
    client: rumqttc::v5::Client,
    got: Arc<Mutex<Vec<V5Got>>>,
    acks: std::sync::mpsc::Receiver<()>,
}

impl V5Client {
    fn new(id: &str, port: u16) -> V5Client {
        use rumqttc::v5::mqttbytes::v5::Packet as P5;
        use rumqttc::v5::{Event as E5, MqttOptions as O5};
        let (client, mut connection) = rumqttc::v5::Client::new(O5::new(id, "127.0.0.1", port), 64);
        let got = Arc::new(Mutex::new(Vec::new()));
        let (tx, acks) = std::sync::mpsc::channel();
        let g = got.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(E5::Incoming(P5::Publish(p))) => g.lock().unwrap().push((
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        p.payload.to_vec(),
                        p.properties.map(|p| p.user_properties).unwrap_or_default(),
                    )),
                    Ok(E5::Incoming(P5::ConnAck(_) | P5::PubAck(_) | P5::SubAck(_))) => {
                        let _ = tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        acks.recv_timeout(Duration::from_secs(5))
            .expect("the v5 client connects");
        V5Client { client, got, acks }
    }
}

impl Drop for V5Client {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

#[test]
fn mqtts_with_a_password_file_carries_mqtt5_user_properties_through_source_and_sink_and_a_wrong_password_is_named(
) {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS as Q5;
    if !std::path::Path::new("/usr/sbin/mosquitto").exists() {
        assert!(
            !std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1"),
            "WEIR_SERVICES=1 but /usr/sbin/mosquitto is not installed"
        );
        eprintln!("SKIPPED mqtts: /usr/sbin/mosquitto is not installed");
        return;
    }
    let s = Scratch::new("mqtt-tls");
    let pki = pki::Pki::new(&s);
    let (plain, tls) = (free_tcp_port(), free_tcp_port());
    let _broker = tls_broker(&s, plain, tls, &pki);
    let password = s.write("mqtt.password", "s3cret pass\n");
    let wrong = s.write("wrong.password", "not it\n");
    for f in [&password, &wrong] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let link = Link::new();
    let tls_keys = |pw: &std::path::Path| {
        format!(
            "url = \"mqtts://127.0.0.1:{tls}\"\nprotocol = \"5\"\nusername = \"weir\"\npassword_file = \"{}\"\nca_file = \"{}\"\n",
            pw.display(),
            pki.ca.display()
        )
    };
    let _receiver = receiver(
        &s,
        &link,
        &format!(
            "[[sinks]]\nname = \"it\"\ntype = \"mqtt\"\nprefix = \"it\"\n{}",
            tls_keys(&password)
        ),
    );
    let _sender = sender(
        &s,
        link.destination(false),
        &format!(
            "[[sources]]\nname = \"ot\"\ntype = \"mqtt\"\ntopics = [\"plant/#\"]\n{}\
             [[sources]]\nname = \"locked-out\"\ntype = \"mqtt\"\ntopics = [\"plant/#\"]\n{}",
            tls_keys(&password),
            tls_keys(&wrong)
        ),
    );
    wait_subscribed(&s, "ot");
    let it = V5Client::new("it-reader", plain);
    it.client.subscribe("it/#", Q5::AtLeastOnce).unwrap();
    it.acks
        .recv_timeout(Duration::from_secs(5))
        .expect("suback");
    let ot = V5Client::new("ot-writer", plain);
    let props = vec![
        ("unit".to_string(), "degC".to_string()),
        ("line".to_string(), "7".to_string()),
    ];
    let n = 50u32;
    for i in 0..n {
        let p = PublishProperties {
            user_properties: props.clone(),
            ..Default::default()
        };
        ot.client
            .publish_with_properties(
                format!("plant/oven{}", i % 2),
                Q5::AtLeastOnce,
                false,
                payload(i),
                p,
            )
            .unwrap();
        ot.acks
            .recv_timeout(Duration::from_secs(5))
            .expect("puback");
    }
    assert!(
        wait_until(Duration::from_secs(30), || it.got.lock().unwrap().len()
            >= n as usize),
        "{} of {n} arrived at it/#; sender {}",
        it.got.lock().unwrap().len(),
        sender_metrics(&s)
    );
    let got = it.got.lock().unwrap().clone();
    for i in 0..n {
        let want = payload(i);
        let m = got
            .iter()
            .find(|(_, p, _)| *p == want)
            .unwrap_or_else(|| panic!("message {i} did not arrive"));
        assert_eq!(m.0, format!("it/plant/oven{}", i % 2));
        assert_eq!(m.2, props, "user properties of message {i}");
    }
    // The source with the wrong password never subscribes, and says why.
    let locked = &sender_metrics(&s)["sources"]["locked-out"];
    assert_ne!(locked["state"], "subscribed", "{locked}");
    assert!(
        locked["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("check `username` and `password_file`")),
        "{locked}"
    );
}

#[test]
fn points_are_republished_as_sparkplug_b_births_then_data_by_alias_with_seq_and_the_ndeath_will() {
    let test = "mqtt_sparkplug_sink";
    if !broker_answers(test) {
        return;
    }
    use sparkplug_b::MetricValue as V;
    let s = Scratch::new("mqtt-spb-sink");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // A Sparkplug group id has no `/`.
    let group = format!("weirt-{}-{}", std::process::id(), nanos % 1_000_000_000);
    let sub = Subscriber::new(&format!("{group}-sub"), 1883, &format!("spBv1.0/{group}/#"));
    let link = Link::new();
    let d = s.path.display();
    let mut receiver = receiver(
        &s,
        &link,
        &format!(
            "[[sinks]]\nname = \"spb\"\ntype = \"mqtt\"\nurl = \"mqtt://{BROKER}\"\nprefix = \"it/{group}\"\n\
             sparkplug = {{ group = \"{group}\", node = \"weir-it\" }}\n\
             [[sinks]]\nname = \"file\"\ntype = \"file\"\ndir = \"{d}/out\"\n"
        ),
    );
    let (tags, total) = (3usize, 600usize);
    let mut sender = sender(
        &s,
        link.destination(false),
        &format!("[[sources]]\nname = \"plant/gen\"\ntype = \"generator\"\ntags = {tags}\nrate = 2000\ncount = {total}\n"),
    );
    // An NBIRTH, a DBIRTH per new tag (which carries that point), a DDATA
    // per other point.
    assert!(
        wait_until(Duration::from_secs(30), || sub.count() > total
            && file_records(&s.join("out")).len() >= total),
        "got {} Sparkplug messages, {} file records; see {}",
        sub.count(),
        file_records(&s.join("out")).len(),
        s.path.display()
    );
    assert!(sender.stop(Duration::from_secs(10)));
    // The will: a receiver killed without a DISCONNECT leaves its NDEATH.
    receiver.child.kill().unwrap();
    let _ = receiver.child.wait();
    assert!(
        wait_until(Duration::from_secs(10), || sub
            .taken()
            .iter()
            .any(|g| g.topic.contains("/NDEATH/"))),
        "no NDEATH after the receiver was killed"
    );
    let got = sub.taken();
    let decoded: Vec<(String, sparkplug_b::Payload)> = got
        .iter()
        .map(|g| {
            (
                g.topic.clone(),
                sparkplug_b::Payload::decode(g.payload.as_slice()).unwrap(),
            )
        })
        .collect();
    let node = format!("spBv1.0/{group}");
    let (first_topic, nbirth) = &decoded[0];
    assert_eq!(first_topic, &format!("{node}/NBIRTH/weir-it"));
    assert_eq!(nbirth.seq, Some(0));
    let bd_seq = nbirth
        .metrics
        .iter()
        .find(|m| m.name.as_deref() == Some("bdSeq"))
        .and_then(|m| m.value.clone());
    assert_eq!(bd_seq, Some(V::LongValue(0)));
    assert!(nbirth
        .metrics
        .iter()
        .any(|m| m.name.as_deref() == Some("Node Control/Rebirth")));
    // Every birth and data message of the connection in seq order.
    let (deaths, live): (Vec<_>, Vec<_>) =
        decoded.iter().partition(|(t, _)| t.contains("/NDEATH/"));
    for (i, (topic, p)) in live.iter().enumerate() {
        assert_eq!(p.seq, Some(i as u64 % 256), "seq of message {i} ({topic})");
        assert!(p.timestamp.is_some(), "payload timestamp of {topic}");
    }
    assert_eq!(deaths.len(), 1);
    assert_eq!(deaths[0].0, format!("{node}/NDEATH/weir-it"));
    assert_eq!(deaths[0].1.metrics[0].name.as_deref(), Some("bdSeq"));
    assert_eq!(
        deaths[0].1.metrics[0].value.clone(),
        Some(V::LongValue(0)),
        "the NDEATH's bdSeq is the NBIRTH's"
    );
    // Per metric: (value, timestamp ms, quality) in order, from the births
    // (a metric's first appearance) and the data (by alias alone).
    let device = format!("{node}/DBIRTH/weir-it/plant_gen");
    let data = format!("{node}/DDATA/weir-it/plant_gen");
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    let mut seen: BTreeMap<String, Vec<(f64, u64, u32)>> = BTreeMap::new();
    let quality =
        |m: &sparkplug_b::Metric| match m.properties.as_ref().map(|p| (&p.keys[..], &p.values[..]))
        {
            Some(([k], [v])) if k == "Quality" => match v.value {
                Some(sparkplug_b::PropertyValueKind::IntValue(q)) => q,
                _ => panic!("Quality is not an int"),
            },
            other => panic!("no Quality property: {other:?}"),
        };
    let double = |m: &sparkplug_b::Metric| match m.value {
        Some(V::DoubleValue(v)) => v,
        ref other => panic!("not a double: {other:?}"),
    };
    for (topic, p) in &live[1..] {
        if *topic == device {
            for m in &p.metrics {
                let name = m.name.clone().expect("a birth names each metric");
                assert_eq!(m.datatype, Some(sparkplug_b::datatype::DOUBLE));
                let alias = m.alias.expect("a birth gives each metric an alias");
                if names.insert(alias, name.clone()).is_none() {
                    seen.entry(name).or_default().push((
                        double(m),
                        m.timestamp.unwrap(),
                        quality(m),
                    ));
                }
            }
        } else {
            assert_eq!(*topic, data, "only this device's births and data");
            assert_eq!(p.metrics.len(), 1);
            let m = &p.metrics[0];
            assert_eq!(m.name, None, "data names a metric by alias only");
            let name = names[&m.alias.expect("an alias")].clone();
            seen.entry(name)
                .or_default()
                .push((double(m), m.timestamp.unwrap(), quality(m)));
        }
    }
    // The same points, values, timestamps and qualities as the file sink wrote.
    let mut want: BTreeMap<String, Vec<(f64, u64, u32)>> = BTreeMap::new();
    for r in file_records(&s.join("out")) {
        let ts = chrono::DateTime::parse_from_rfc3339(r["ts"].as_str().unwrap())
            .unwrap()
            .timestamp_millis() as u64;
        want.entry(r["tag"].as_str().unwrap().to_string())
            .or_default()
            .push((
                r["value"].as_f64().unwrap(),
                ts,
                r["quality"].as_u64().unwrap() as u32,
            ));
    }
    assert_eq!(seen.len(), tags);
    assert_eq!(seen, want);
}

/// The live (not NDEATH) Sparkplug messages a test subscriber got, decoded,
/// without the commands the test itself published.
fn sparkplug_live(sub: &Subscriber) -> Vec<(String, sparkplug_b::Payload)> {
    sub.taken()
        .into_iter()
        .filter(|g| {
            !["/NCMD/", "/DCMD/", "/NDEATH/"]
                .iter()
                .any(|k| g.topic.contains(k))
        })
        .map(|g| {
            let p = sparkplug_b::Payload::decode(g.payload.as_slice()).unwrap();
            (g.topic, p)
        })
        .collect()
}

#[test]
fn a_hosts_ncmd_rebirth_gets_a_fresh_nbirth_and_dbirths_with_the_current_values_then_data_goes_on_also_after_a_reconnect(
) {
    let test = "mqtt_sparkplug_rebirth";
    if !broker_answers(test) {
        return;
    }
    use sparkplug_b::MetricValue as V;
    let s = Scratch::new("mqtt-spb-rebirth");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let group = format!("weirr-{}-{}", std::process::id(), nanos % 1_000_000_000);
    let node = format!("spBv1.0/{group}");
    let ncmd = format!("{node}/NCMD/weir-it");
    let sink_client = format!("{group}-sink");
    let sub = Subscriber::new(&format!("{group}-sub"), 1883, &format!("{node}/#"));
    let link = Link::new();
    let _receiver = receiver(
        &s,
        &link,
        &format!(
            "[[sinks]]\nname = \"spb\"\ntype = \"mqtt\"\nurl = \"mqtt://{BROKER}\"\nprefix = \"it/{group}\"\n\
             client_id = \"{sink_client}\"\nsparkplug = {{ group = \"{group}\", node = \"weir-it\" }}\n"
        ),
    );
    // Points keep flowing for the whole test: 3 tags, 60 points a second.
    let mut sender = sender(
        &s,
        link.destination(false),
        "[[sources]]\nname = \"plant/gen\"\ntype = \"generator\"\ntags = 3\nrate = 60\n",
    );
    let nbirths = |sub: &Subscriber| {
        sparkplug_live(sub)
            .iter()
            .filter(|(t, _)| t.contains("/NBIRTH/"))
            .count()
    };
    // Data after the last NBIRTH.
    let data_since_birth = |sub: &Subscriber| {
        sparkplug_live(sub)
            .iter()
            .rev()
            .take_while(|(t, _)| !t.contains("/NBIRTH/"))
            .filter(|(t, _)| t.contains("/DDATA/"))
            .count()
    };
    let flowing = |sub: &Subscriber, births: usize| {
        wait_until(Duration::from_secs(30), || {
            nbirths(sub) == births && data_since_birth(sub) >= 20
        })
    };
    assert!(
        flowing(&sub, 1),
        "no births and data from the sink; see {}",
        s.path.display()
    );

    // A host application: garbage, commands a diode cannot carry out (an
    // NCMD reboot, a DCMD write), then the rebirth request.
    let host = Publisher::new(&format!("{group}-host"), 1883).expect("host connects");
    let command = |name: &str, value: V| {
        spb(
            1,
            0,
            vec![sparkplug_b::Metric {
                name: Some(name.into()),
                datatype: Some(sparkplug_b::datatype::BOOLEAN),
                value: Some(value),
                ..Default::default()
            }],
        )
    };
    assert!(host.publish(&ncmd, vec![0xff, 0xff, 0xff], QoS::AtLeastOnce, false));
    assert!(host.publish(
        &ncmd,
        command("Node Control/Reboot", V::BooleanValue(true)),
        QoS::AtLeastOnce,
        false
    ));
    assert!(host.publish(
        &format!("{node}/DCMD/weir-it/plant_gen"),
        command("plant/gen/tag-00000", V::BooleanValue(true)),
        QoS::AtLeastOnce,
        false
    ));
    assert!(host.publish(
        &ncmd,
        command("Node Control/Rebirth", V::BooleanValue(true)),
        QoS::AtLeastOnce,
        false
    ));
    assert!(
        flowing(&sub, 2),
        "no rebirth after the NCMD; see {}",
        s.path.display()
    );

    // The broker drops the sink's connection (another client takes its
    // client id); the sink connects again, subscribes again, and a second
    // rebirth request is answered on the new connection.
    drop(Publisher::new(&sink_client, 1883).expect("takeover connects"));
    assert!(
        flowing(&sub, 3),
        "no births after the reconnection; see {}",
        s.path.display()
    );
    assert!(host.publish(
        &ncmd,
        command("Node Control/Rebirth", V::BooleanValue(true)),
        QoS::AtLeastOnce,
        false
    ));
    assert!(
        flowing(&sub, 4),
        "no rebirth after the reconnection; see {}",
        s.path.display()
    );
    let metrics = || read_json(&s.join("receiver-metrics.json"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = metrics();
            m["sink.spb.sparkplug_rebirths"] == 2
                && m["sink.spb.sparkplug_commands_ignored"] == 2
                && m["sink.spb.sparkplug_commands_malformed"] == 1
        }),
        "rebirths, ignored and malformed commands not counted: {}",
        metrics()
    );
    assert!(sender.stop(Duration::from_secs(10)));

    // Four runs of births then data: the first connection's, the rebirth
    // on it (same bdSeq 0), the second connection's (bdSeq 1), the rebirth
    // on that one (bdSeq 1). In each, seq counts from the NBIRTH's 0.
    let live = sparkplug_live(&sub);
    let starts: Vec<usize> = (0..live.len())
        .filter(|&i| live[i].0.contains("/NBIRTH/"))
        .collect();
    assert_eq!(starts.len(), 4);
    assert_eq!(starts[0], 0, "the first message is an NBIRTH");
    let device = format!("{node}/DBIRTH/weir-it/plant_gen");
    let data = format!("{node}/DDATA/weir-it/plant_gen");
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    // Each metric's last value, by name, as a host following the messages
    // knows it.
    let mut last: BTreeMap<String, V> = BTreeMap::new();
    for (run, &start) in starts.iter().enumerate() {
        let end = starts.get(run + 1).copied().unwrap_or(live.len());
        let (topic, nbirth) = &live[start];
        assert_eq!(topic, &format!("{node}/NBIRTH/weir-it"));
        let bd_seq = nbirth
            .metrics
            .iter()
            .find(|m| m.name.as_deref() == Some("bdSeq"))
            .and_then(|m| m.value.clone());
        assert_eq!(
            bd_seq,
            Some(V::LongValue(run as u64 / 2)),
            "bdSeq of births run {run}: a rebirth keeps the connection's, a new connection counts on"
        );
        for (i, (topic, p)) in live[start..end].iter().enumerate() {
            assert_eq!(
                p.seq,
                Some(i as u64 % 256),
                "seq of message {i} of births run {run} ({topic})"
            );
        }
        // After the first connection's (where each new tag brings a
        // DBIRTH), births open with a DBIRTH of every metric; after a
        // rebirth it holds each metric's current value. Data then goes on
        // by the same aliases.
        if run > 0 {
            let (topic, dbirth) = &live[start + 1];
            assert_eq!(topic, &device, "births run {run}");
            assert_eq!(dbirth.metrics.len(), 3, "births run {run}");
            assert!(
                live[start + 2..end].iter().all(|(t, _)| *t == data),
                "only data after the births of run {run}"
            );
        }
        let mut datas = 0;
        for (i, (topic, p)) in live[start + 1..end].iter().enumerate() {
            if *topic == device {
                for m in &p.metrics {
                    let name = m.name.clone().expect("a birth names each metric");
                    let alias = m.alias.expect("a birth gives each metric an alias");
                    if let Some(known) = names.insert(alias, name.clone()) {
                        assert_eq!(known, name, "alias {alias} keeps its metric");
                    }
                    let value = m.value.clone().expect("a value");
                    if run % 2 == 1 && i == 0 {
                        assert_eq!(
                            Some(&value),
                            last.get(&name),
                            "the rebirth's DBIRTH holds {name}'s current value"
                        );
                    }
                    last.insert(name, value);
                }
            } else {
                assert_eq!(topic, &data, "births run {run}");
                datas += 1;
                let m = &p.metrics[0];
                assert_eq!(m.name, None, "data names its metric by alias only");
                let name = names[&m.alias.expect("an alias")].clone();
                last.insert(name, m.value.clone().expect("a value"));
            }
        }
        assert!(datas >= 20, "data after births run {run}: {datas}");
    }
    drop(host);
}
