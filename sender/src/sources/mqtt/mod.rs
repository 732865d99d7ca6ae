//! `mqtt`: subscribes to topic filters on the plant's broker (MQTT 3.1.1 or
//! 5, through rumqttc). Each message becomes a `Message` record (topic,
//! payload, receive time, retain, QoS, MQTT 5 user properties); with a
//! `json` mapping a JSON payload becomes a `Point`, and with `sparkplug`
//! Sparkplug B payloads (`spBv1.0/...`) become one `Point` per metric.
//!
//! A QoS 1 message is acknowledged to the broker only once the spool's
//! fsync covers its records (manual acks, [`DurableWatch`]): a sender crash
//! or power loss before that leaves the message with the broker, which
//! delivers it again. The session is persistent by default
//! (`clean_session = false`), so the broker also keeps what arrives while
//! the sender is disconnected. A lost connection is retried with a backoff
//! and shows in the source's status; the subscriptions are made again when
//! the broker did not keep the session.
//!
//! The broker connection runs in its own task (`drive_*`), which only
//! polls rumqttc's event loop and forwards events; this task spools and
//! acknowledges and never waits on the event loop, so neither can stall
//! the other.

mod json_map;
mod sparkplug;
pub mod sparkplug_b;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5 as v5b;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use weir_ops::reload::Reloadable;
use weir_protocol::units::parse_size;
use weir_protocol::{Message, RecordBody};

use super::{now_ns, DurableWatch, Source, SourceHandle, Ticket};
use crate::metrics::Counters;

pub use json_map::JsonMap;

/// Reconnect backoff: the first retry after this, doubled per failure in a
/// row up to `RECONNECT_MAX` (a broker down for long costs a log line and a
/// connection attempt every few seconds).
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Events from the connection task waiting for this task. Small: each is
/// handled in microseconds (an append to the spool's buffer).
const EVENT_QUEUE: usize = 64;
/// Payload bytes those events may hold in all (a message larger than this
/// waits until it is the only one): a count alone would let 64 messages of
/// up to `max_packet_size` each (16 MiB by default) wait in memory.
const EVENT_QUEUE_BYTES: usize = 8 << 20;
/// rumqttc's request channel (acks and subscriptions). Acks are bounded by
/// the broker's in-flight window for this client (Mosquitto:
/// `max_inflight_messages`, 20 by default; MQTT 5: our Receive Maximum).
const REQUEST_QUEUE: usize = 1024;
/// MQTT 5 Receive Maximum: QoS 1 messages the broker may have in flight to
/// us, unacknowledged. Acks wait for an fsync, so this window is what keeps
/// the pipe full.
const RECEIVE_MAXIMUM: u16 = 1000;
/// How often a full request channel is tried again.
const RETRY_TICK: Duration = Duration::from_millis(5);
/// At most one warning per this interval per kind of bad input (the rest
/// are counted and summed up in the next warning).
const WARN_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `mqtt://host:port` (port 1883 if left out) or `mqtts://host:port`
    /// (TLS, port 8883 if left out).
    pub url: String,
    /// Topic filters to subscribe to (`+` and `#` wildcards).
    pub topics: Vec<String>,
    /// QoS of the subscriptions: 0 (at most once) or 1 (at least once,
    /// acknowledged once spooled).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// `3.1.1` or `5`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// The MQTT client id; must be unique on the broker (a second client
    /// with the same id disconnects the first). Default: `weir-` and the
    /// source's name.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// A file whose content (one line, trailing newline ignored) is the
    /// password; read at start.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the broker's certificate (`mqtts://`
    /// only; without it the system's roots, [`SYSTEM_CA_FILE`]).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// false (the default): the broker keeps the session while the sender
    /// is away, so QoS 1 messages published meanwhile are not lost. true:
    /// every connection starts afresh.
    #[serde(default)]
    pub clean_session: bool,
    /// Largest MQTT packet accepted. A larger message makes the broker or
    /// client drop the connection (and the broker deliver it again), so
    /// keep it at least the largest message the plant publishes; at most
    /// the receiver's `decoder.max_record_size`.
    #[serde(
        default = "default_max_packet",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub max_packet_size: String,
    /// Decode Sparkplug B payloads of `spBv1.0/...` topics into points.
    #[serde(default)]
    pub sparkplug: bool,
    /// Turn JSON payloads into points (see `JsonMap`).
    #[serde(default)]
    pub json: Option<JsonMap>,
}

fn default_qos() -> u8 {
    1
}

fn default_protocol() -> String {
    "3.1.1".into()
}

fn default_max_packet() -> String {
    "16MiB".into()
}

/// Where the broker is, from `url`.
#[derive(Debug, Clone, PartialEq)]
struct Broker {
    host: String,
    port: u16,
    tls: bool,
}

fn parse_url(url: &str) -> Result<Broker, String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(format!(
            "url: `{url}` must start with mqtt:// or mqtts:// (e.g. \"mqtt://127.0.0.1:1883\")"
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(format!(
            "url: `{url}` must be mqtt[s]://host[:port] (no path; credentials go in `username` and `password_file`)"
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = match rest.rsplit_once(':') {
        // [v6]:port, host:port
        Some((h, p)) if !h.ends_with(':') && (h.starts_with('[') || !h.contains(':')) => {
            let port: u16 = p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("url: `{p}` in `{url}` is not a port (1-65535)"))?;
            (h, port)
        }
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("url: `{url}` has no host"));
    }
    Ok(Broker {
        host: host.to_string(),
        port,
        tls,
    })
}

/// MQTT topic filter rules: non-empty, `#` only as the whole last level,
/// `+` only as a whole level.
fn check_filter(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("an empty filter".into());
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!("`{f}`: `#` must be the whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("`{f}`: `+` must be a whole level"));
        }
    }
    Ok(())
}

impl Source for Config {
    const TYPE: &'static str = "mqtt";

    fn validate(&self) -> Result<(), String> {
        self.check()
    }

    async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        run(self, handle).await
    }
}

impl Config {
    fn check(&self) -> Result<(), String> {
        let broker = parse_url(&self.url)?;
        if self.topics.is_empty() {
            return Err(
                "topics: is empty; list the topic filters to subscribe to, e.g. [\"plant/#\"]"
                    .into(),
            );
        }
        for f in &self.topics {
            check_filter(f).map_err(|e| format!("topics: {e}"))?;
        }
        if self.qos > 1 {
            return Err(format!(
                "qos: {} must be 0 or 1 (QoS 2 is not supported)",
                self.qos
            ));
        }
        if !["3.1.1", "5"].contains(&self.protocol.as_str()) {
            return Err(format!(
                "protocol: `{}` must be \"3.1.1\" or \"5\"",
                self.protocol
            ));
        }
        if let Some(id) = &self.client_id {
            if id.is_empty() || id.len() > 256 {
                return Err("client_id: must be 1 to 256 characters".into());
            }
        }
        if self.password_file.is_some() && self.username.is_none() {
            return Err("password_file: is set without `username`".into());
        }
        if let Some(p) = &self.password_file {
            read_password(p)?;
        }
        if let Some(ca) = &self.ca_file {
            if !broker.tls {
                return Err(format!(
                    "ca_file: is set but `url` {} is not mqtts://",
                    self.url
                ));
            }
            std::fs::metadata(ca)
                .map_err(|e| format!("ca_file: cannot read {} ({e})", ca.display()))?;
        }
        let max = parse_size(&self.max_packet_size).map_err(|e| format!("max_packet_size: {e}"))?;
        if !(1024..=(256 << 20)).contains(&max) {
            return Err(format!(
                "max_packet_size: {} must be between 1KiB and 256MiB",
                self.max_packet_size
            ));
        }
        if let Some(j) = &self.json {
            j.validate()?;
        }
        Ok(())
    }

    /// The configured client id, or `weir-` and the source's name.
    fn client_id(&self, source: &str) -> String {
        self.client_id.clone().unwrap_or_else(|| {
            let name: String = source
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            format!("weir-{name}")
        })
    }
}

/// The broker password: one line, in a file only its owner can read.
fn read_password(path: &std::path::Path) -> Result<String, String> {
    weir_store::secret::read_secret_line(path, "password_file").map_err(|e| format!("{e:#}"))
}

/// What the connection task reports.
#[derive(Debug)]
enum Event {
    Connected {
        session_present: bool,
    },
    Publish(Incoming),
    /// Subscription results: the filters the broker refused.
    Subscribed {
        refused: usize,
    },
    Lost {
        error: String,
        retry_in: Duration,
    },
}

#[derive(Debug)]
struct Incoming {
    topic: String,
    payload: bytes::Bytes,
    qos: u8,
    retain: bool,
    dup: bool,
    pkid: u16,
    properties: Vec<(String, String)>,
    /// Its share of `EVENT_QUEUE_BYTES`, given back when it is dropped.
    _budget: Option<OwnedSemaphorePermit>,
}

/// Takes `payload`'s bytes from the event queue's budget (waiting while
/// the source task is behind); `None` if the budget is gone.
async fn reserve(budget: &Arc<Semaphore>, payload: usize) -> Option<OwnedSemaphorePermit> {
    let n = payload.clamp(1, EVENT_QUEUE_BYTES) as u32;
    budget.clone().acquire_many_owned(n).await.ok()
}

/// The request side of the connection, whichever protocol version.
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Queues the PUBACK of a QoS 1 message; false when the request channel
    /// is full (try again later).
    fn try_ack(&self, pkid: u16) -> bool {
        match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", rumqttc::QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
            Client::V5(c) => {
                let mut p = v5b::Publish::new(
                    "",
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    Vec::new(),
                    None,
                );
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
        }
    }

    fn try_subscribe(&self, topics: &[String], qos: u8) -> bool {
        match self {
            Client::V4(c) => {
                let qos = if qos == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                c.try_subscribe_many(
                    topics
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), qos)),
                )
                .is_ok()
            }
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::QoS;
                let qos = if qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                // Retain As Published: a live retained message keeps its
                // flag (MQTT 3.1.1 clears it on live delivery); retained
                // messages are sent only for a new subscription, not for a
                // kept one subscribed again.
                c.try_subscribe_many(topics.iter().map(|t| {
                    let mut f = v5b::Filter::new(t.clone(), qos);
                    f.preserve_retain = true;
                    f.retain_forward_rule = v5b::RetainForwardRule::OnNewSubscribe;
                    f
                }))
                .is_ok()
            }
        }
    }

    fn try_disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        };
    }
}

/// A connection error with what to check when the broker refused the
/// credentials or TLS failed.
fn with_hint(error: String) -> String {
    if error.contains("NotAuthorized") || error.contains("BadUserNamePassword") {
        format!("{error}; the broker refused the credentials: check `username` and `password_file`")
    } else if error.contains("certificate") || error.contains("Tls") || error.contains("TLS") {
        format!("{error}; check that `ca_file` signs the broker's certificate and that it names the host in `url`")
    } else {
        error
    }
}

/// The CA bundle `mqtts://` trusts when `ca_file` is not set (Debian's
/// system roots).
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What the source reads from files, at start and on SIGHUP; the
/// connection task takes the current ones before each reconnection.
struct Secrets {
    /// `username` and the password from `password_file`.
    credentials: Option<(String, String)>,
    /// The PEM CA bundle of an `mqtts://` broker.
    ca_pem: Option<Vec<u8>>,
}

impl Secrets {
    fn transport(&self) -> Option<rumqttc::Transport> {
        self.ca_pem
            .clone()
            .map(|pem| rumqttc::Transport::tls(pem, None, None))
    }
}

/// Reads `password_file` and, for `mqtts://`, the CA file, into a value
/// SIGHUP re-reads.
fn secrets(
    cfg: &Config,
    broker: &Broker,
    handle: &SourceHandle,
) -> anyhow::Result<Arc<Reloadable<Secrets>>> {
    let ca = broker.tls.then(|| {
        cfg.ca_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE))
    });
    let mut files = Vec::new();
    if let Some(p) = &cfg.password_file {
        files.push(("password_file", p.as_path()));
    }
    if let Some(p) = &ca {
        files.push(("ca_file", p.as_path()));
    }
    let (username, password_file, ca) =
        (cfg.username.clone(), cfg.password_file.clone(), ca.clone());
    handle.reloadable(files, move || {
        let password = match &password_file {
            Some(p) => read_password(p).map_err(|e| anyhow::anyhow!(e))?,
            None => String::new(),
        };
        let ca_pem = match &ca {
            Some(ca) => Some(
                std::fs::read(ca)
                    .map_err(|e| anyhow::anyhow!("ca_file: cannot read {} ({e})", ca.display()))?,
            ),
            None => None,
        };
        Ok(Secrets {
            credentials: username.clone().map(|u| (u, password)),
            ca_pem,
        })
    })
}

/// Opens the client and starts the connection task.
fn connect(
    cfg: &Config,
    name: &str,
    broker: &Broker,
    secrets: Arc<Reloadable<Secrets>>,
    events: mpsc::Sender<Event>,
) -> anyhow::Result<(Client, tokio::task::JoinHandle<()>)> {
    let max_packet = parse_size(&cfg.max_packet_size).expect("validated") as usize;
    let budget = Arc::new(Semaphore::new(EVENT_QUEUE_BYTES));
    let keep_alive = Duration::from_secs(30);
    let now = secrets.get();
    let (credentials, transport) = (now.credentials.clone(), now.transport());
    Ok(if cfg.protocol == "5" {
        let mut o = rumqttc::v5::MqttOptions::new(cfg.client_id(name), &broker.host, broker.port);
        o.set_keep_alive(keep_alive)
            .set_clean_start(cfg.clean_session)
            .set_manual_acks(true)
            .set_max_packet_size(Some(max_packet as u32))
            .set_receive_maximum(Some(RECEIVE_MAXIMUM))
            .set_request_channel_capacity(REQUEST_QUEUE);
        if !cfg.clean_session {
            // MQTT 5 ends a session at disconnect unless told otherwise:
            // keep it as long as the broker allows.
            o.set_session_expiry_interval(Some(u32::MAX));
        }
        if let Some((u, p)) = credentials {
            o.set_credentials(u, p);
        }
        if let Some(t) = transport {
            o.set_transport(t);
        }
        let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, REQUEST_QUEUE);
        (
            Client::V5(client),
            tokio::spawn(drive_v5(budget, eventloop, events, secrets)),
        )
    } else {
        let mut o = rumqttc::MqttOptions::new(cfg.client_id(name), &broker.host, broker.port);
        o.set_keep_alive(keep_alive)
            .set_clean_session(cfg.clean_session)
            .set_manual_acks(true)
            .set_max_packet_size(max_packet, max_packet)
            .set_request_channel_capacity(REQUEST_QUEUE);
        if let Some((u, p)) = credentials {
            o.set_credentials(u, p);
        }
        if let Some(t) = transport {
            o.set_transport(t);
        }
        let (client, eventloop) = rumqttc::AsyncClient::new(o, REQUEST_QUEUE);
        (
            Client::V4(client),
            tokio::spawn(drive_v4(budget, eventloop, events, secrets)),
        )
    })
}

/// Backoff of the connection task: doubles per failure in a row.
struct Backoff(Duration);

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(RECONNECT_MAX);
        d
    }
    fn reset(&mut self) {
        self.0 = RECONNECT_MIN;
    }
}

/// Polls a 3.1.1 event loop (which reconnects when polled after an error)
/// and forwards what matters; ends when the source task is gone.
async fn drive_v4(
    budget: Arc<Semaphore>,
    mut eventloop: rumqttc::EventLoop,
    events: mpsc::Sender<Event>,
    secrets: Arc<Reloadable<Secrets>>,
) {
    use rumqttc::{Event as E, Packet};
    let mut backoff = Backoff(RECONNECT_MIN);
    loop {
        let event = match eventloop.poll().await {
            Ok(E::Incoming(Packet::ConnAck(c))) => {
                backoff.reset();
                Event::Connected {
                    session_present: c.session_present,
                }
            }
            Ok(E::Incoming(Packet::Publish(p))) => {
                let Some(budget) = reserve(&budget, p.payload.len()).await else {
                    return;
                };
                Event::Publish(Incoming {
                    topic: p.topic,
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    dup: p.dup,
                    pkid: p.pkid,
                    properties: Vec::new(),
                    _budget: Some(budget),
                })
            }
            Ok(E::Incoming(Packet::SubAck(s))) => Event::Subscribed {
                refused: s
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .count(),
            },
            Ok(_) => continue,
            Err(e) => {
                let retry_in = backoff.next();
                if events
                    .send(Event::Lost {
                        error: with_hint(e.to_string()),
                        retry_in,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(retry_in).await;
                // The next poll reconnects: with what SIGHUP read last.
                let now = secrets.get();
                if let Some((u, p)) = &now.credentials {
                    eventloop.mqtt_options.set_credentials(u, p);
                }
                if let Some(t) = now.transport() {
                    eventloop.mqtt_options.set_transport(t);
                }
                continue;
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// As [`drive_v4`], for MQTT 5.
async fn drive_v5(
    budget: Arc<Semaphore>,
    mut eventloop: rumqttc::v5::EventLoop,
    events: mpsc::Sender<Event>,
    secrets: Arc<Reloadable<Secrets>>,
) {
    use rumqttc::v5::Event as E;
    use v5b::Packet;
    let mut backoff = Backoff(RECONNECT_MIN);
    loop {
        let event = match eventloop.poll().await {
            Ok(E::Incoming(Packet::ConnAck(c))) => {
                backoff.reset();
                Event::Connected {
                    session_present: c.session_present,
                }
            }
            Ok(E::Incoming(Packet::Publish(p))) => {
                let Some(budget) = reserve(&budget, p.payload.len()).await else {
                    return;
                };
                Event::Publish(Incoming {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    dup: p.dup,
                    pkid: p.pkid,
                    properties: p.properties.map(|p| p.user_properties).unwrap_or_default(),
                    _budget: Some(budget),
                })
            }
            Ok(E::Incoming(Packet::SubAck(s))) => Event::Subscribed {
                refused: s
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, v5b::SubscribeReasonCode::Success(_)))
                    .count(),
            },
            Ok(_) => continue,
            Err(e) => {
                let retry_in = backoff.next();
                if events
                    .send(Event::Lost {
                        error: with_hint(e.to_string()),
                        retry_in,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(retry_in).await;
                // The next poll reconnects: with what SIGHUP read last.
                let now = secrets.get();
                if let Some((u, p)) = &now.credentials {
                    eventloop.options.set_credentials(u, p);
                }
                if let Some(t) = now.transport() {
                    eventloop.options.set_transport(t);
                }
                continue;
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

/// A warning at most every `WARN_INTERVAL`, with how many were held back.
struct Throttled {
    last: Option<Instant>,
    held: u64,
}

impl Throttled {
    fn new() -> Self {
        Throttled {
            last: None,
            held: 0,
        }
    }

    /// Some(number held back since the last warning) when one may be logged now.
    fn allow(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < WARN_INTERVAL) {
            self.held += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.held))
    }
}

/// Turns messages into records: Sparkplug, the JSON mapping, or plain.
struct Mapper {
    source: String,
    sparkplug: Option<sparkplug::Decoder>,
    json: Option<JsonMap>,
    warn_unmapped: Throttled,
    warn_sparkplug: Throttled,
}

impl Mapper {
    fn new(cfg: &Config, source: &str) -> Self {
        Mapper {
            source: source.to_string(),
            sparkplug: cfg.sparkplug.then(sparkplug::Decoder::default),
            json: cfg.json.clone(),
            warn_unmapped: Throttled::new(),
            warn_sparkplug: Throttled::new(),
        }
    }

    fn records(&mut self, m: Incoming, counters: &Counters, out: &mut Vec<RecordBody>) {
        let now = now_ns();
        let mut keep_message = true;
        let sparkplug = self
            .sparkplug
            .as_mut()
            .and_then(|d| d.decode(&m.topic, &m.payload, now));
        match sparkplug {
            Some(Ok(d)) => {
                Counters::add(&counters.mqtt_points, d.points.len() as u64);
                Counters::add(&counters.mqtt_sparkplug_unknown_alias, d.unknown_aliases);
                Counters::add(&counters.mqtt_sparkplug_unsupported, d.unsupported);
                if d.unknown_aliases + d.unsupported > 0 {
                    if let Some(held) = self.warn_sparkplug.allow() {
                        tracing::warn!(source = %self.source, topic = %m.topic,
                            unknown_aliases = d.unknown_aliases, unsupported = d.unsupported, held_back = held,
                            "sparkplug metrics that did not become points (no birth defines the alias, or a null or non-scalar value); the payload is carried as a message (counted in mqtt_sparkplug_unknown_alias, mqtt_sparkplug_unsupported)");
                    }
                }
                keep_message = d.keep_message;
                out.extend(d.points.into_iter().map(RecordBody::Point));
            }
            Some(Err(sparkplug::Invalid(why))) => {
                Counters::add(&counters.mqtt_sparkplug_invalid, 1);
                if let Some(held) = self.warn_sparkplug.allow() {
                    tracing::warn!(source = %self.source, topic = %m.topic, held_back = held,
                        "invalid sparkplug message ({why}); carried as a plain message (counted in mqtt_sparkplug_invalid)");
                }
            }
            None => {
                if let Some(j) = &self.json {
                    match j.map(&m.topic, &m.payload, now) {
                        Ok(p) => {
                            Counters::add(&counters.mqtt_points, 1);
                            out.push(RecordBody::Point(p));
                            keep_message = false;
                        }
                        Err(why) => {
                            Counters::add(&counters.mqtt_unmapped, 1);
                            if let Some(held) = self.warn_unmapped.allow() {
                                tracing::warn!(source = %self.source, topic = %m.topic, held_back = held,
                                    "payload does not fit the json mapping ({why}); carried as a plain message (counted in mqtt_unmapped)");
                            }
                        }
                    }
                }
            }
        }
        if keep_message {
            out.push(RecordBody::Message(Message {
                topic: m.topic,
                payload: m.payload.into(),
                ts_ns: now,
                retain: m.retain,
                qos: m.qos,
                properties: m.properties,
                origin: None,
            }));
        }
    }
}

async fn run(cfg: Config, mut handle: SourceHandle) -> anyhow::Result<()> {
    let name = handle.stream().to_string();
    let broker = parse_url(&cfg.url).map_err(|e| anyhow::anyhow!("sources.{name}: {e}"))?;
    let secrets =
        secrets(&cfg, &broker, &handle).map_err(|e| anyhow::anyhow!("sources.{name}: {e:#}"))?;
    let (tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let (client, task) = connect(&cfg, &name, &broker, secrets, tx)?;
    // The connection task ends with this function, however it ends.
    let _abort = AbortOnDrop(task);
    tracing::info!(source = %name, url = %cfg.url, client_id = %cfg.client_id(&name),
        protocol = %cfg.protocol, topics = ?cfg.topics, "mqtt source connecting");
    handle.status(|s| s.state = "connecting");
    let mut mapper = Mapper::new(&cfg, &name);
    let mut durable: DurableWatch = handle.durable_watch();
    let mut shutdown = handle.shutdown.clone();
    // QoS 1 messages spooled and not yet fsynced (ticket, packet id), in
    // arrival order; then the acks the request channel had no room for.
    let mut unsynced: VecDeque<(Ticket, u16)> = VecDeque::new();
    let mut unacked: VecDeque<u16> = VecDeque::new();
    let mut subscribe_due = false;
    let mut first_connection = true;
    let mut bodies: Vec<RecordBody> = Vec::new();
    loop {
        while let Some(&(ticket, pkid)) = unsynced.front() {
            if !durable.covers(ticket) {
                break;
            }
            unsynced.pop_front();
            unacked.push_back(pkid);
        }
        while let Some(&pkid) = unacked.front() {
            if !client.try_ack(pkid) {
                break;
            }
            unacked.pop_front();
        }
        if subscribe_due && client.try_subscribe(&cfg.topics, cfg.qos) {
            subscribe_due = false;
        }
        let retry = !unacked.is_empty() || subscribe_due;
        let event = tokio::select! {
            _ = shutdown.changed() => break,
            e = events.recv() => match e {
                Some(e) => e,
                None => anyhow::bail!("sources.{name}: the mqtt connection task ended unexpectedly"),
            },
            ok = durable.changed(), if !unsynced.is_empty() => {
                if !ok { break; }
                continue;
            }
            _ = tokio::time::sleep(RETRY_TICK), if retry => continue,
        };
        match event {
            Event::Connected { session_present } => {
                Counters::add(&handle.counters().source_connections, 1);
                handle.status(|s| {
                    s.state = "connected";
                    s.connections += 1;
                    s.last_error = None;
                });
                // Subscribe at the first connection (the configured topics
                // may differ from the kept session's) and whenever the
                // broker did not keep the session; a kept session has its
                // subscriptions, and subscribing again would make the
                // broker send its retained messages again.
                subscribe_due = first_connection || !session_present;
                first_connection = false;
                tracing::info!(source = %name, session_present, resubscribe = subscribe_due, "mqtt source connected");
            }
            Event::Subscribed { refused } => {
                if refused > 0 {
                    Counters::add(&handle.counters().mqtt_subscribe_refused, refused as u64);
                    tracing::error!(source = %name, refused, topics = ?cfg.topics,
                        "the broker refused {refused} of the topic filters (not authorized, or invalid); check `topics` and the broker's ACL (counted in mqtt_subscribe_refused)");
                    handle.status(|s| {
                        s.last_error = Some(format!("broker refused {refused} topic filter(s)"))
                    });
                } else {
                    handle.status(|s| s.state = "subscribed");
                }
            }
            Event::Lost { error, retry_in } => {
                // Unacknowledged messages stay with the broker, which
                // delivers them again on the next connection (rumqttc
                // drops the acks still queued); they may be spooled twice.
                let abandoned = unsynced.len() + unacked.len();
                unsynced.clear();
                unacked.clear();
                subscribe_due = false;
                Counters::add(&handle.counters().mqtt_connection_errors, 1);
                tracing::warn!(source = %name, url = %cfg.url, retry_in_ms = retry_in.as_millis() as u64,
                    unacknowledged = abandoned,
                    "mqtt connection lost or refused: {error}; reconnecting (counted in mqtt_connection_errors)");
                handle.status(|s| {
                    s.state = "retrying";
                    s.peer_errors += 1;
                    s.last_error = Some(error);
                });
            }
            Event::Publish(m) => {
                Counters::add(&handle.counters().mqtt_messages, 1);
                if m.dup {
                    Counters::add(&handle.counters().mqtt_redelivered, 1);
                }
                let (qos, pkid) = (m.qos, m.pkid);
                bodies.clear();
                mapper.records(m, handle.counters(), &mut bodies);
                if qos >= 1 {
                    let ticket = handle.emit_tracked(&bodies);
                    unsynced.push_back((ticket, pkid));
                } else {
                    handle.emit_batch(&bodies);
                }
            }
        }
    }
    // Messages spooled but not yet fsynced are not acknowledged: the broker
    // delivers them again to the next run (persistent session).
    tracing::info!(source = %name, unacknowledged = unsynced.len() + unacked.len(), "mqtt source stopping");
    client.try_disconnect();
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<Config, String> {
        let text = format!("url = \"mqtt://127.0.0.1:1883\"\ntopics = [\"plant/#\"]\n{extra}");
        let c: Config = toml::from_str(&text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    #[test]
    fn urls_give_host_port_and_tls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1883").unwrap(),
            Broker {
                host: "127.0.0.1".into(),
                port: 1883,
                tls: false
            }
        );
        assert_eq!(parse_url("mqtts://broker.plant").unwrap().port, 8883);
        assert_eq!(parse_url("mqtt://[::1]:1884").unwrap().host, "::1");
        assert!(parse_url("tcp://x:1").unwrap_err().starts_with("url:"));
        assert!(parse_url("mqtt://x:0").unwrap_err().starts_with("url:"));
        assert!(parse_url("mqtt://u:p@x:1")
            .unwrap_err()
            .contains("password_file"));
    }

    #[test]
    fn defaults_suit_a_durable_plant_subscription() {
        let c = config("").unwrap();
        assert_eq!(
            (c.qos, c.protocol.as_str(), c.clean_session),
            (1, "3.1.1", false)
        );
        assert_eq!(c.client_id("plant/mqtt"), "weir-plant-mqtt");
    }

    #[test]
    fn bad_keys_are_refused_naming_the_key() {
        for (extra, key) in [
            ("qos = 2", "qos:"),
            ("protocol = \"4\"", "protocol:"),
            (
                "password_file = \"/nonexistent/pw\"\nusername = \"u\"",
                "password_file: cannot open /nonexistent/pw",
            ),
            (
                "password_file = \"/etc/hostname\"",
                "password_file: is set without `username`",
            ),
            ("ca_file = \"/etc/hostname\"", "ca_file:"),
            ("max_packet_size = \"10B\"", "max_packet_size:"),
            ("json = { value = \"v\" }", "json.value:"),
        ] {
            let err = config(extra).unwrap_err();
            assert!(err.starts_with(key), "{extra}: {err}");
        }
        let err = config("topicz = 1").unwrap_err();
        assert!(err.contains("topicz"), "{err}");
        for bad in ["a/#/b", "a/b#", "a+/b", ""] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
        assert!(check_filter("a/+/b/#").is_ok());
    }

    #[test]
    fn sparkplug_json_and_plain_messages_map_as_configured() {
        let cfg = config("sparkplug = true\njson = { value = \"/v\" }").unwrap();
        let mut mapper = Mapper::new(&cfg, "s");
        let counters = Counters::default();
        let msg = |topic: &str, payload: &[u8]| Incoming {
            topic: topic.into(),
            payload: bytes::Bytes::copy_from_slice(payload),
            qos: 1,
            retain: true,
            dup: false,
            pkid: 1,
            properties: vec![("k".into(), "v".into())],
            _budget: None,
        };
        let mut out = Vec::new();
        mapper.records(msg("a", br#"{"v": 1}"#), &counters, &mut out);
        assert!(matches!(&out[..], [RecordBody::Point(p)] if p.tag == "a"));
        out.clear();
        mapper.records(msg("a", b"not json"), &counters, &mut out);
        match &out[..] {
            [RecordBody::Message(m)] => {
                assert_eq!(
                    (m.topic.as_str(), m.payload.as_slice(), m.retain, m.qos),
                    ("a", &b"not json"[..], true, 1)
                );
                assert_eq!(m.properties, vec![("k".to_string(), "v".to_string())]);
            }
            other => panic!("{other:?}"),
        }
        out.clear();
        mapper.records(msg("spBv1.0/G/NDATA/E", b"\xff\xff"), &counters, &mut out);
        assert!(matches!(&out[..], [RecordBody::Message(_)]));
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            (
                count(&counters.mqtt_unmapped),
                count(&counters.mqtt_sparkplug_invalid),
                count(&counters.mqtt_points)
            ),
            (1, 1, 1)
        );
    }
}
