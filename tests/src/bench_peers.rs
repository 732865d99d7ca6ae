//! The other ends of `weir-bench`'s service and MQTT rows (issues 10 and
//! 11): a publisher and a counting subscriber on the MQTT broker, and, for
//! each service sink, what reads back what the server holds: a count
//! query and a read of every row (PostgreSQL), the stream's message count
//! and an ordered consumer (NATS JetStream), a consumer reading the topic
//! as it fills (Kafka), and an HTTP server of the bench's own that takes
//! the sink's POSTs. Each counts records by number in a [`SeqTally`], so a
//! row can say whether every record arrived exactly once.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

use crate::bench::{unix_ns_of_rfc3339, SeqTally};

/// `None` when something accepts a TCP connection on 127.0.0.1:`port`
/// within a second, else the reason a row is skipped.
pub fn nothing_on(port: u16) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(_) => None,
        Err(_) => Some(format!("skipped: nothing on {addr}")),
    }
}

/// A name no other run shares: `prefix`, the pid and the time.
pub fn unique(prefix: &str) -> String {
    let nanos = now_ns() % 1_000_000_000;
    format!("{prefix}{}x{nanos}", std::process::id())
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records (the JSON objects the sinks write: `stream`, `seq`, `ts`, …) as
/// a reader sees them arrive.
#[derive(Debug, Default)]
pub struct Arrivals {
    pub tally: SeqTally,
    /// The stream every record must belong to.
    stream: String,
    /// Records that were not JSON, had no `seq`, or another stream
    /// (counted in `tally.out_of_range` too).
    pub unreadable: u64,
    /// The earliest `ts` (the source's timestamp), ns since the epoch.
    pub first_ts_ns: Option<i64>,
    /// When the last record arrived, ns since the epoch.
    pub last_ns: Option<i64>,
    /// When the tally first became complete, ns since the epoch.
    pub complete_ns: Option<i64>,
}

impl Arrivals {
    pub fn new(stream: &str, total: u64) -> Self {
        Arrivals {
            tally: SeqTally::new(total),
            stream: stream.to_string(),
            ..Arrivals::default()
        }
    }

    /// Notes one record's JSON object.
    pub fn note_json(&mut self, bytes: &[u8]) {
        let v: Option<Value> = serde_json::from_slice(bytes).ok();
        let seq = v
            .as_ref()
            .filter(|v| v["stream"].as_str() == Some(self.stream.as_str()))
            .and_then(|v| v["seq"].as_u64());
        let ts = v
            .as_ref()
            .and_then(|v| v["ts"].as_str())
            .and_then(|t| unix_ns_of_rfc3339(t).ok());
        match seq {
            Some(seq) => self.note(seq, ts),
            None => {
                self.unreadable += 1;
                self.tally.out_of_range += 1;
            }
        }
    }

    /// Notes record `seq` with source timestamp `ts_ns`.
    pub fn note(&mut self, seq: u64, ts_ns: Option<i64>) {
        self.tally.note(seq);
        if let Some(ts) = ts_ns {
            self.first_ts_ns = Some(self.first_ts_ns.map_or(ts, |f| f.min(ts)));
        }
        let now = now_ns();
        self.last_ns = Some(now);
        if self.complete_ns.is_none() && self.tally.complete() {
            self.complete_ns = Some(now);
        }
    }

    /// Records that arrived, duplicates included.
    pub fn arrived(&self) -> u64 {
        self.tally.distinct + self.tally.duplicates + self.tally.out_of_range
    }
}

// ---------------------------------------------------------------- MQTT

/// Topics the MQTT row spreads its messages over: message `i` goes to
/// `PREFIX/t{i % MQTT_TOPICS}`.
pub const MQTT_TOPICS: u64 = 8;

/// Message `i`'s payload: `i` (8 bytes, little endian), then bytes
/// `(i + k) mod 256` up to `len` (at least 8).
pub fn mqtt_payload(i: u64, len: usize) -> Vec<u8> {
    let mut p = i.to_le_bytes().to_vec();
    p.extend((8..len.max(8)).map(|k| (i.wrapping_add(k as u64)) as u8));
    p
}

/// The message number of a payload that is exactly what [`mqtt_payload`]
/// makes for it, published on its topic under `prefix`.
fn mqtt_message_number(topic: &str, payload: &[u8], prefix: &str, len: usize) -> Option<u64> {
    let i = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let lane = topic.strip_prefix(prefix)?.strip_prefix("/t")?;
    (lane == (i % MQTT_TOPICS).to_string() && payload == mqtt_payload(i, len)).then_some(i)
}

struct MqttState {
    tally: SeqTally,
    /// Payloads that were not a bench message for their topic.
    corrupt: u64,
    last_ns: Option<i64>,
    complete_ns: Option<i64>,
}

/// A subscriber counting the bench's messages under a topic prefix.
pub struct MqttCounter {
    state: Arc<(Mutex<MqttState>, Condvar)>,
    client: Client,
    /// Set when the counter goes: its thread then ends at the next event.
    stop: Arc<AtomicBool>,
}

/// What an [`MqttCounter`] saw.
pub struct MqttCount {
    pub tally: SeqTally,
    pub corrupt: u64,
    pub last_ns: Option<i64>,
    pub complete_ns: Option<i64>,
}

impl MqttCounter {
    /// Subscribes to `prefix/#` at `qos` and waits for the SUBACK; counts
    /// messages `0..total` of payload length `len`.
    pub fn subscribe(
        id: &str,
        port: u16,
        prefix: &str,
        qos: QoS,
        total: u64,
        len: usize,
    ) -> Result<Self> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(o, 64);
        client
            .subscribe(format!("{prefix}/#"), qos)
            .context("subscribing the bench's MQTT counter")?;
        let state = Arc::new((
            Mutex::new(MqttState {
                tally: SeqTally::new(total),
                corrupt: 0,
                last_ns: None,
                complete_ns: None,
            }),
            Condvar::new(),
        ));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (shared, prefix, halt) = (state.clone(), prefix.to_string(), stop.clone());
        std::thread::Builder::new()
            .name("mqtt-counter".into())
            .spawn(move || {
                for event in connection.iter() {
                    if halt.load(Ordering::Relaxed) {
                        return;
                    }
                    match event {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let (m, cv) = &*shared;
                            let mut s = lock(m);
                            match mqtt_message_number(&p.topic, &p.payload, &prefix, len) {
                                Some(i) => s.tally.note_in((i % MQTT_TOPICS) as usize, i),
                                None => {
                                    s.corrupt += 1;
                                    s.tally.out_of_range += 1;
                                }
                            }
                            let now = now_ns();
                            s.last_ns = Some(now);
                            if s.complete_ns.is_none() && s.tally.complete() {
                                s.complete_ns = Some(now);
                            }
                            cv.notify_all();
                        }
                        Ok(_) => {}
                        Err(rumqttc::ConnectionError::RequestsDone) => return,
                        Err(e) => {
                            warn(&format!("MQTT counter: {e}; reconnecting"));
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .context("starting the MQTT counter thread")?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the bench's MQTT counter got no SUBACK within 10 s")?;
        Ok(MqttCounter {
            state,
            client,
            stop,
        })
    }

    /// Messages that arrived, duplicates and strangers included.
    pub fn arrived(&self) -> u64 {
        let s = lock(&self.state.0);
        s.tally.distinct + s.tally.duplicates + s.tally.out_of_range
    }

    /// Waits until fewer than `window` of `published` messages are still
    /// on their way; false when none arrived for `idle` (some were lost).
    pub fn wait_window(&self, published: u64, window: u64, idle: Duration) -> bool {
        let (m, cv) = &*self.state;
        let mut s = lock(m);
        loop {
            let arrived = s.tally.distinct + s.tally.duplicates + s.tally.out_of_range;
            if published < arrived.saturating_add(window) {
                return true;
            }
            let (next, timeout) = cv.wait_timeout(s, idle).unwrap_or_else(|e| e.into_inner());
            s = next;
            if timeout.timed_out() {
                let now_arrived = s.tally.distinct + s.tally.duplicates + s.tally.out_of_range;
                if now_arrived == arrived {
                    return false;
                }
            }
        }
    }

    /// Waits until all `total` arrived once, or none came for `idle`.
    pub fn wait_all(&self, idle: Duration) {
        let (m, cv) = &*self.state;
        let mut s = lock(m);
        while !s.tally.complete() {
            let before = s.tally.distinct + s.tally.duplicates + s.tally.out_of_range;
            let (next, timeout) = cv.wait_timeout(s, idle).unwrap_or_else(|e| e.into_inner());
            s = next;
            let after = s.tally.distinct + s.tally.duplicates + s.tally.out_of_range;
            if timeout.timed_out() && after == before {
                return;
            }
        }
    }

    pub fn count(&self) -> MqttCount {
        let s = lock(&self.state.0);
        MqttCount {
            tally: s.tally.clone(),
            corrupt: s.corrupt,
            last_ns: s.last_ns,
            complete_ns: s.complete_ns,
        }
    }
}

impl Drop for MqttCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect();
    }
}

/// The bench has no logger; a peer's trouble goes to stderr.
fn warn(text: &str) {
    eprintln!("  weir-bench: {text}");
}

/// A publisher on the broker (rumqttc keeps up to 100 QoS 1 publishes
/// unacknowledged).
pub struct MqttPublisher {
    client: Client,
    error: Arc<Mutex<Option<String>>>,
}

impl MqttPublisher {
    /// Connects and waits for the CONNACK.
    pub fn connect(id: &str, port: u16) -> Result<Self> {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(o, 1000);
        let error = Arc::new(Mutex::new(None));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let failed = error.clone();
        std::thread::Builder::new()
            .name("mqtt-publisher".into())
            .spawn(move || {
                for event in connection.iter() {
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = ready_tx.send(());
                        }
                        Ok(_) => {}
                        Err(rumqttc::ConnectionError::RequestsDone) => return,
                        Err(e) => {
                            *lock(&failed) = Some(e.to_string());
                            return;
                        }
                    }
                }
            })
            .context("starting the MQTT publisher thread")?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the bench's MQTT publisher got no CONNACK within 10 s")?;
        Ok(MqttPublisher { client, error })
    }

    pub fn publish(&self, topic: String, qos: QoS, payload: Vec<u8>) -> Result<()> {
        if let Some(e) = lock(&self.error).clone() {
            bail!("the bench's MQTT publisher lost its connection: {e}");
        }
        self.client
            .publish(topic, qos, false, payload)
            .context("publishing")
    }
}

impl Drop for MqttPublisher {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

// ---------------------------------------------------------- PostgreSQL

/// The tables of one postgres-sink run (a prefix no other run shares),
/// dropped when this goes.
pub struct PgTables {
    url: String,
    prefix: String,
    client: postgres::Client,
}

impl PgTables {
    pub fn new(url: &str) -> Result<Self> {
        let client = postgres::Client::connect(url, postgres::NoTls)
            .with_context(|| format!("connecting to {url}"))?;
        Ok(PgTables {
            url: url.to_string(),
            prefix: unique("weirbench_"),
            client,
        })
    }

    pub fn name(&self, what: &str) -> String {
        format!("{}_{what}", self.prefix)
    }

    /// The `[[sinks]]` table of a postgres sink named `name` on these tables.
    pub fn sink(&self, name: &str) -> String {
        format!(
            "[[sinks]]\nname = \"{name}\"\ntype = \"postgres\"\nurl = \"{}\"\npoints_table = \"{}\"\n\
             messages_table = \"{}\"\nlogs_table = \"{}\"\nbytes_table = \"{}\"\ncursor_table = \"{}\"\n",
            self.url,
            self.name("points"),
            self.name("messages"),
            self.name("logs"),
            self.name("bytes"),
            self.name("cursor"),
        )
    }

    /// Rows in the points table now (0 before the sink created it).
    pub fn count_points(&mut self) -> u64 {
        let q = format!("SELECT count(*) FROM {}", self.name("points"));
        self.client
            .query_one(&q, &[])
            .map(|r| r.get::<_, i64>(0) as u64)
            .unwrap_or(0)
    }

    /// Every row of the points table in commit order (by transaction,
    /// then the order COPY wrote them in).
    pub fn read_points(&mut self, stream: &str, total: u64) -> Result<Arrivals> {
        let q = format!(
            "SELECT stream, seq, (extract(epoch from ts) * 1000000)::bigint FROM {} \
             ORDER BY xmin::text::bigint, ctid",
            self.name("points")
        );
        let mut a = Arrivals::new(stream, total);
        for r in self
            .client
            .query(&q, &[])
            .context("reading the points back")?
        {
            let (s, seq, ts_us): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
            if s == stream && seq >= 0 {
                a.note(seq as u64, Some(ts_us.saturating_mul(1000)));
            } else {
                a.unreadable += 1;
                a.tally.out_of_range += 1;
            }
        }
        Ok(a)
    }
}

impl Drop for PgTables {
    fn drop(&mut self) {
        for t in ["points", "messages", "logs", "bytes", "cursor"] {
            let _ = self
                .client
                .batch_execute(&format!("DROP TABLE IF EXISTS {}", self.name(t)));
        }
    }
}

// ------------------------------------------------------ NATS JetStream

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")
}

/// A JetStream stream of the bench's own on a NATS server, deleted when
/// this goes.
pub struct NatsStream {
    rt: tokio::runtime::Runtime,
    js: async_nats::jetstream::Context,
    pub name: String,
    /// Subjects `{subject_root}.>` land in the stream.
    pub subject_root: String,
}

impl NatsStream {
    pub fn create(url: &str) -> Result<Self> {
        let rt = runtime()?;
        let name = unique("WEIRBENCH_");
        let subject_root = name.to_lowercase();
        let js = rt.block_on(async {
            let client = async_nats::connect(url)
                .await
                .with_context(|| format!("connecting to NATS at {url}"))?;
            let js = async_nats::jetstream::new(client);
            js.create_stream(async_nats::jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![format!("{subject_root}.>")],
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the JetStream stream {name}"))?;
            anyhow::Ok(js)
        })?;
        Ok(NatsStream {
            rt,
            js,
            name,
            subject_root,
        })
    }

    /// Messages in the stream now.
    pub fn count(&self) -> Result<u64> {
        self.rt.block_on(async {
            let mut s = self.js.get_stream(&self.name).await?;
            Ok(s.info().await?.state.messages)
        })
    }

    /// Every message of the stream in stream order (an ordered consumer).
    pub fn read_all(&self, stream: &str, total: u64) -> Result<Arrivals> {
        use futures_util::StreamExt;
        self.rt.block_on(async {
            let mut s = self.js.get_stream(&self.name).await?;
            let held = s.info().await?.state.messages;
            let consumer = s
                .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
                .await?;
            let mut messages = consumer.messages().await?;
            let mut a = Arrivals::new(stream, total);
            while a.arrived() < held {
                let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
                    .await
                    .context("no message from the ordered consumer within 10 s")?
                    .context("the ordered consumer ended")?
                    .map_err(|e| anyhow::anyhow!("reading the stream: {e}"))?;
                a.note_json(&m.payload);
            }
            Ok(a)
        })
    }
}

impl Drop for NatsStream {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.js.delete_stream(&self.name));
    }
}

// --------------------------------------------------------------- Kafka

/// A topic of the bench's own (one partition) and a consumer reading it
/// from the start on its own thread as it fills; the topic is deleted
/// when this goes.
pub struct KafkaReader {
    brokers: String,
    pub topic: String,
    arrivals: Arc<Mutex<Arrivals>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl KafkaReader {
    pub fn start(brokers: &str, stream: &str, total: u64) -> Result<Self> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        use rdkafka::config::ClientConfig;
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::{Message, Offset, TopicPartitionList};

        let topic = unique("weirbench.");
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .context("Kafka admin client")?;
        let res = runtime()?
            .block_on(admin.create_topics(
                &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            ))
            .with_context(|| format!("creating the Kafka topic {topic} on {brokers}"))?;
        for r in res {
            r.map_err(|(t, e)| anyhow::anyhow!("creating the Kafka topic {t}: {e}"))?;
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("{topic}-reader"))
            .set("enable.auto.commit", "false")
            .create()
            .context("Kafka consumer")?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl).context("assigning the partition")?;
        let arrivals = Arc::new(Mutex::new(Arrivals::new(stream, total)));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, halt) = (arrivals.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("kafka-reader".into())
            .spawn(move || {
                while !halt.load(Ordering::Relaxed) {
                    let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let m = m.context("consuming")?;
                    // Read on after the last one, until stopped: a record
                    // stored twice must be seen too.
                    lock(&seen).note_json(m.payload().unwrap_or_default());
                }
                Ok(())
            })
            .context("starting the Kafka reader thread")?;
        Ok(KafkaReader {
            brokers: brokers.to_string(),
            topic,
            arrivals,
            stop,
            thread: Some(thread),
        })
    }

    pub fn arrivals(&self) -> MutexGuard<'_, Arrivals> {
        lock(&self.arrivals)
    }

    /// Stops reading; an error of the consumer, if it had one.
    pub fn finish(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the Kafka reader thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for KafkaReader {
    fn drop(&mut self) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        use rdkafka::config::ClientConfig;
        let _ = self.finish();
        let admin: Option<AdminClient<DefaultClientContext>> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .ok();
        if let (Some(admin), Ok(rt)) = (admin, runtime()) {
            let _ = rt.block_on(admin.delete_topics(
                &[self.topic.as_str()],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            ));
        }
    }
}

// ---------------------------------------------------------------- HTTP

/// An HTTP/1.1 server of the bench's own on loopback that takes the http
/// sink's NDJSON POSTs, counts their records and answers 200.
pub struct HttpCollector {
    pub port: u16,
    arrivals: Arc<Mutex<Arrivals>>,
    stop: Arc<AtomicBool>,
    /// Requests that were not a POST with a readable body (answered 400).
    pub bad_requests: Arc<Mutex<u64>>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, Vec<u8>)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let method = line.split_whitespace().next().unwrap_or("").to_string();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok()?;
            }
        }
    }
    // The sink's requests are at most max_request_bytes (1 MiB by default).
    if len > 64 << 20 {
        return None;
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((method, body))
}

impl HttpCollector {
    pub fn start(stream: &str, total: u64) -> Result<Self> {
        let listener =
            TcpListener::bind("127.0.0.1:0").context("binding the bench's HTTP server")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let arrivals = Arc::new(Mutex::new(Arrivals::new(stream, total)));
        let stop = Arc::new(AtomicBool::new(false));
        let bad_requests = Arc::new(Mutex::new(0u64));
        let (seen, halt, bad) = (arrivals.clone(), stop.clone(), bad_requests.clone());
        std::thread::Builder::new()
            .name("http-collector".into())
            .spawn(move || {
                while !halt.load(Ordering::Relaxed) {
                    let conn = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                    };
                    let (seen, bad) = (seen.clone(), bad.clone());
                    let _ = std::thread::Builder::new()
                        .name("http-conn".into())
                        .spawn(move || serve_connection(conn, &seen, &bad));
                }
            })
            .context("starting the bench's HTTP server")?;
        Ok(HttpCollector {
            port,
            arrivals,
            stop,
            bad_requests,
        })
    }

    pub fn arrivals(&self) -> MutexGuard<'_, Arrivals> {
        lock(&self.arrivals)
    }
}

fn serve_connection(conn: TcpStream, seen: &Mutex<Arrivals>, bad: &Mutex<u64>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_nodelay(true);
    let Ok(mut w) = conn.try_clone() else {
        return;
    };
    let mut r = BufReader::new(conn);
    while let Some((method, body)) = read_request(&mut r) {
        let status = if method == "POST" {
            let mut a = lock(seen);
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                a.note_json(line);
            }
            "200 OK"
        } else {
            *lock(bad) += 1;
            "400 Bad Request"
        };
        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
        if w.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for HttpCollector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Polls `count` every `every` until it reaches `total`, or it has not
/// moved for `idle` while `settled()` says nothing more is coming, or
/// `limit` passes. Returns the last count and when it was first seen at
/// that value (ns since the epoch).
pub fn poll_count(
    mut count: impl FnMut() -> u64,
    total: u64,
    every: Duration,
    idle: Duration,
    limit: Duration,
    mut settled: impl FnMut() -> bool,
) -> (u64, i64) {
    let started = Instant::now();
    let (mut last, mut last_ns, mut since) = (0u64, now_ns(), Instant::now());
    loop {
        let n = count();
        if n != last {
            (last, last_ns, since) = (n, now_ns(), Instant::now());
        }
        if n >= total || (since.elapsed() > idle && settled()) || started.elapsed() > limit {
            return (last, last_ns);
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mqtt_payload_is_recognised_only_whole_and_on_its_own_topic() {
        let p = mqtt_payload(13, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(mqtt_message_number("it/ot/t5", &p, "it/ot", 64), Some(13));
        assert_eq!(mqtt_message_number("it/ot/t4", &p, "it/ot", 64), None);
        assert_eq!(mqtt_message_number("other/t5", &p, "it/ot", 64), None);
        let mut bad = p.clone();
        bad[40] ^= 1;
        assert_eq!(mqtt_message_number("it/ot/t5", &bad, "it/ot", 64), None);
        assert_eq!(mqtt_message_number("it/ot/t5", &p[..63], "it/ot", 64), None);
        assert_eq!(mqtt_payload(1, 3).len(), 8, "the number always fits");
    }

    #[test]
    fn arrivals_count_records_of_their_stream_and_the_earliest_timestamp() {
        let mut a = Arrivals::new("gen", 2);
        a.note_json(br#"{"stream":"gen","seq":1,"ts":"1970-01-01T00:00:02Z"}"#);
        a.note_json(br#"{"stream":"other","seq":0,"ts":"1970-01-01T00:00:01Z"}"#);
        a.note_json(b"not json");
        assert_eq!((a.unreadable, a.tally.out_of_range), (2, 2));
        assert!(a.complete_ns.is_none());
        a.note_json(br#"{"stream":"gen","seq":0,"ts":"1970-01-01T00:00:01Z"}"#);
        assert_eq!(a.first_ts_ns, Some(1_000_000_000));
        assert_eq!(a.tally.distinct, 2);
        assert!(!a.tally.complete(), "strangers arrived too");
        assert_eq!(a.arrived(), 4);
    }

    #[test]
    fn the_http_collector_counts_ndjson_posts_and_answers_each() {
        let c = HttpCollector::start("gen", 3).unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
        let body = "{\"stream\":\"gen\",\"seq\":0}\n{\"stream\":\"gen\",\"seq\":1}\n";
        let body2 = "{\"stream\":\"gen\",\"seq\":2}\n";
        for b in [body, body2] {
            write!(
                s,
                "POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n{b}",
                b.len()
            )
            .unwrap();
        }
        let mut r = BufReader::new(s);
        for _ in 0..2 {
            let mut status = String::new();
            r.read_line(&mut status).unwrap();
            assert!(status.starts_with("HTTP/1.1 200"), "{status}");
            let mut blank = String::new();
            while blank != "\r\n" {
                blank.clear();
                r.read_line(&mut blank).unwrap();
            }
        }
        assert!(c.arrivals().tally.complete());
    }
}
