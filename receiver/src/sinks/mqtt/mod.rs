//! `mqtt`: republishes records to the IT broker. A `Message` goes to
//! `prefix/<its topic>` with its payload byte for byte, its retain flag,
//! its QoS (or the configured `qos`) and, over MQTT 5, its user
//! properties; a `Point` goes to `prefix/<tag>` as the JSON object the file
//! sink writes (QoS 1 unless `qos` says otherwise); `Log` and `Bytes`
//! records go to `prefix/<stream name>` as that JSON object too.
//!
//! `write` publishes a batch and returns only once the broker has
//! acknowledged (PUBACK) every QoS 1 publish of it, so the journal cursor
//! moves past a record only once the IT broker has it. On a lost connection
//! or a missing acknowledgement the connection is dropped, the batch is
//! offered again (retry with backoff, outside the sink) and a new
//! connection publishes what was not acknowledged: records whose PUBACK
//! came are skipped. A PUBACK lost with the connection makes the broker get
//! that message twice (at least once, as MQTT QoS 1 is).
//!
//! The connection is rumqttc's synchronous client: its event loop runs on a
//! thread per connection that only forwards events to the sink's thread.
//!
//! With `sparkplug = { group, node }`, points go out as Sparkplug B instead
//! of JSON (`sparkplug.rs`): births at each connection, DBIRTH/DDATA per
//! point, QoS 0 as the spec requires (confirmed once handed to the socket).
//! Each connection subscribes (on the IT broker) to the node's NCMD and its
//! devices' DCMDs before its births; a host's rebirth request is answered
//! with the births again at the start of the next write, or within 100 ms
//! when no points flow (`Sink::idle`). Every other command is counted and
//! ignored: nothing the IT side sends ever reaches the link or the plant.

mod sparkplug;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use weir_ops::reload::Reloadable;
use weir_protocol::decoder::Delivered;
use weir_protocol::units::parse_size;
use weir_protocol::RecordBody;

use super::{json_line, BuildContext, Sink, SinkBuilder, SinkError};

/// Publishes not yet acknowledged at once: enough to keep a loopback or
/// LAN broker busy. rumqttc's own in-flight limit and its request channel
/// are sized from it, so a publish never waits on a full channel.
const WINDOW: usize = 256;
/// The longest a connection may take to be accepted, and the longest the
/// broker may take to acknowledge after the last publish of a batch,
/// before the connection is given up and the batch retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest Sparkplug command payload read: a rebirth request is under
/// 100 bytes, and the connection's event channel (2 x WINDOW + 64 events)
/// may hold this much per event. A larger one is counted as malformed.
const MAX_COMMAND_BYTES: usize = 16 << 10;
/// A malformed command is logged at most this often (the rest counted).
const WARN_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883, TLS).
    pub url: String,
    /// Topics are `prefix/<original topic>` (messages) or `prefix/<tag>`
    /// (points).
    pub prefix: String,
    /// 0 or 1 for every publish; unset: a message keeps its own QoS and
    /// everything else is published with QoS 1.
    #[serde(default)]
    pub qos: Option<u8>,
    /// `3.1.1` or `5` (MQTT 5 keeps user properties).
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Unique on the broker. Default: `weir-` and the sink's name.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (one line), read at start and on SIGHUP.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM CA file for `mqtts://` (default: the system's roots,
    /// /etc/ssl/certs/ca-certificates.crt), read at start and on SIGHUP.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Largest packet published; a record that would be larger goes to the
    /// dead-letter file (the broker would drop the connection).
    #[serde(
        default = "default_max_packet",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub max_packet_size: String,
    /// Publish points as Sparkplug B from this edge node instead of JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparkplug: Option<sparkplug::Config>,
}

fn default_protocol() -> String {
    "3.1.1".into()
}

fn default_max_packet() -> String {
    "16MiB".into()
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
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && (h.starts_with('[') || !h.contains(':')) => {
            let port: u16 = p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("url: `{p}` in `{url}` is not a port (1-65535)"))?;
            (h, port)
        }
        _ => (rest, if tls { 8883 } else { 1883 }),
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

/// The broker password: one line, in a file only its owner can read.
fn read_password(path: &std::path::Path) -> Result<String, String> {
    weir_store::secret::read_secret_line(path, "password_file").map_err(|e| format!("{e:#}"))
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "mqtt";

    fn validate(&self) -> Result<(), String> {
        self.check()
    }

    /// Connects in the first `write`, not here.
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        let broker = parse_url(&self.url).map_err(|e| anyhow!(e))?;
        let ca = broker.tls.then(|| {
            self.ca_file
                .clone()
                .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE))
        });
        let mut files = Vec::new();
        if let Some(p) = &self.password_file {
            files.push(("password_file", p.as_path()));
        }
        if let Some(p) = &ca {
            files.push(("ca_file", p.as_path()));
        }
        let (password_file, ca) = (self.password_file.clone(), ca.clone());
        let secrets = ctx.reloadable(files, move || {
            Ok(Secrets {
                password: match &password_file {
                    Some(p) => Some(read_password(p).map_err(|e| anyhow!(e))?),
                    None => None,
                },
                ca_pem: match &ca {
                    Some(ca) => Some(
                        std::fs::read(ca)
                            .with_context(|| format!("ca_file: cannot read {}", ca.display()))?,
                    ),
                    None => None,
                },
            })
        })?;
        Ok(Box::new(MqttSink::new(self, ctx, secrets)?))
    }
}

impl Config {
    fn check(&self) -> Result<(), String> {
        let broker = parse_url(&self.url)?;
        if self.prefix.is_empty()
            || self.prefix.contains(['+', '#', '\0'])
            || self.prefix.ends_with('/')
        {
            return Err(format!(
                "prefix: `{}` must be a non-empty topic without wildcards or a trailing `/` (e.g. \"it/plant\")",
                self.prefix
            ));
        }
        if self.qos.is_some_and(|q| q > 1) {
            return Err("qos: must be 0 or 1 (or unset to keep each message's QoS)".into());
        }
        if !["3.1.1", "5"].contains(&self.protocol.as_str()) {
            return Err(format!(
                "protocol: `{}` must be \"3.1.1\" or \"5\"",
                self.protocol
            ));
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
        if let Some(s) = &self.sparkplug {
            s.check()?;
        }
        let max = parse_size(&self.max_packet_size).map_err(|e| format!("max_packet_size: {e}"))?;
        if !(1024..=(256 << 20)).contains(&max) {
            return Err(format!(
                "max_packet_size: {} must be between 1KiB and 256MiB",
                self.max_packet_size
            ));
        }
        Ok(())
    }

    /// The configured client id, or `weir-` and the sink's name.
    fn client_id(&self, sink: &str) -> String {
        self.client_id.clone().unwrap_or_else(|| {
            let name: String = sink
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

/// The CA bundle `mqtts://` trusts when `ca_file` is not set (Debian's
/// system roots).
const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What the sink reads from files (at start and on SIGHUP) and uses at
/// each new connection.
pub struct Secrets {
    password: Option<String>,
    /// The PEM CA bundle of an `mqtts://` broker.
    ca_pem: Option<Vec<u8>>,
}

/// What a connection's thread reports.
enum Event {
    Connected,
    /// A publish left for the broker with this packet id (0 for QoS 0).
    Sent(u16),
    Acked(u16),
    /// The broker's answer to the command subscription: how many of its
    /// filters it refused.
    Subscribed {
        refused: usize,
    },
    /// A publish on a subscribed (Sparkplug command) topic: its payload, or
    /// its length when above MAX_COMMAND_BYTES.
    Command {
        topic: String,
        payload: Result<Vec<u8>, usize>,
    },
    Lost(String),
}

/// A command's payload as the connection thread forwards it.
fn command_payload(payload: &[u8]) -> Result<Vec<u8>, usize> {
    if payload.len() > MAX_COMMAND_BYTES {
        Err(payload.len())
    } else {
        Ok(payload.to_vec())
    }
}

enum Client {
    V4(rumqttc::Client),
    V5(rumqttc::v5::Client),
}

/// One connection: a client and the thread running its event loop. Dropped
/// on any failure; the next write opens a new one, so nothing queued for the
/// old one is ever sent twice by the library itself.
struct Session {
    client: Client,
    events: Receiver<Event>,
}

impl Session {
    fn open(
        cfg: &Config,
        name: &str,
        broker: &Broker,
        secrets: &Secrets,
        will: Option<sparkplug::Out>,
        commands: Option<[String; 2]>,
    ) -> Result<Session> {
        let max_packet = parse_size(&cfg.max_packet_size).expect("validated") as usize;
        let transport = secrets
            .ca_pem
            .clone()
            .filter(|_| broker.tls)
            .map(|pem| rumqttc::Transport::tls(pem, None, None));
        let credentials = cfg
            .username
            .clone()
            .map(|u| (u, secrets.password.clone().unwrap_or_default()));
        // Every event of a window fits: a publish makes at most two.
        let (tx, events) = sync_channel(2 * WINDOW + 64);
        let client_id = cfg.client_id(name);
        let forward = move |event: Event| -> bool {
            match tx.try_send(event) {
                Ok(()) => true,
                Err(TrySendError::Full(e)) => tx.send(e).is_ok(),
                Err(TrySendError::Disconnected(_)) => false,
            }
        };
        let client = if cfg.protocol == "5" {
            let mut o = rumqttc::v5::MqttOptions::new(client_id, &broker.host, broker.port);
            o.set_keep_alive(Duration::from_secs(30))
                .set_clean_start(true)
                .set_max_packet_size(Some(max_packet as u32))
                .set_outgoing_inflight_upper_limit(WINDOW as u16)
                .set_request_channel_capacity(WINDOW + 16);
            if let Some((u, p)) = credentials {
                o.set_credentials(u, p);
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            if let Some(w) = &will {
                o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                    w.topic.clone(),
                    w.payload.clone(),
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    None,
                ));
            }
            let (client, mut connection) = rumqttc::v5::Client::new(o, WINDOW + 16);
            spawn(name, move || {
                use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
                use rumqttc::v5::Event as E;
                for event in connection.iter() {
                    let forwarded = match event {
                        Ok(E::Incoming(Packet::ConnAck(_))) => forward(Event::Connected),
                        Ok(E::Incoming(Packet::PubAck(a))) => forward(Event::Acked(a.pkid)),
                        Ok(E::Incoming(Packet::SubAck(a))) => forward(Event::Subscribed {
                            refused: a
                                .return_codes
                                .iter()
                                .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                                .count(),
                        }),
                        Ok(E::Incoming(Packet::Publish(p))) => forward(Event::Command {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: command_payload(&p.payload),
                        }),
                        Ok(E::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                            forward(Event::Sent(pkid))
                        }
                        Ok(_) => true,
                        Err(e) => {
                            forward(Event::Lost(with_hint(e.to_string())));
                            return;
                        }
                    };
                    if !forwarded {
                        return;
                    }
                }
            })?;
            Client::V5(client)
        } else {
            let mut o = rumqttc::MqttOptions::new(client_id, &broker.host, broker.port);
            o.set_keep_alive(Duration::from_secs(30))
                .set_clean_session(true)
                .set_max_packet_size(max_packet, max_packet)
                .set_inflight(WINDOW as u16)
                .set_request_channel_capacity(WINDOW + 16);
            if let Some((u, p)) = credentials {
                o.set_credentials(u, p);
            }
            if let Some(t) = transport {
                o.set_transport(t);
            }
            if let Some(w) = &will {
                o.set_last_will(rumqttc::LastWill::new(
                    w.topic.clone(),
                    w.payload.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                ));
            }
            let (client, mut connection) = rumqttc::Client::new(o, WINDOW + 16);
            spawn(name, move || {
                use rumqttc::{Event as E, Packet, SubscribeReasonCode};
                for event in connection.iter() {
                    let forwarded = match event {
                        Ok(E::Incoming(Packet::ConnAck(_))) => forward(Event::Connected),
                        Ok(E::Incoming(Packet::PubAck(a))) => forward(Event::Acked(a.pkid)),
                        Ok(E::Incoming(Packet::SubAck(a))) => forward(Event::Subscribed {
                            refused: a
                                .return_codes
                                .iter()
                                .filter(|c| matches!(c, SubscribeReasonCode::Failure))
                                .count(),
                        }),
                        Ok(E::Incoming(Packet::Publish(p))) => forward(Event::Command {
                            topic: p.topic,
                            payload: command_payload(&p.payload),
                        }),
                        Ok(E::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                            forward(Event::Sent(pkid))
                        }
                        Ok(_) => true,
                        Err(e) => {
                            forward(Event::Lost(with_hint(e.to_string())));
                            return;
                        }
                    };
                    if !forwarded {
                        return;
                    }
                }
            })?;
            Client::V4(client)
        };
        let session = Session { client, events };
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            match session.next_event(deadline)? {
                Event::Connected => break,
                Event::Lost(e) => return Err(anyhow!(e)),
                _ => {}
            }
        }
        // A clean session has no subscriptions: every connection (after its
        // CONNACK) subscribes again, and the births wait for the SUBACK, so
        // a host never sees a birth before the node listens for commands.
        let Some(filters) = commands else {
            return Ok(session);
        };
        if !session.subscribe(&filters) {
            return Err(anyhow!("the connection closed while subscribing"));
        }
        loop {
            match session.next_event(deadline)? {
                Event::Subscribed { refused: 0 } => return Ok(session),
                Event::Subscribed { refused } => {
                    tracing::warn!(sink = %name, refused, filters = ?filters,
                        "the broker refused the subscription to this Sparkplug node's NCMD/DCMD topics (check the broker's ACL for the sink's user); points are still published, but a host's rebirth request goes unanswered");
                    return Ok(session);
                }
                Event::Lost(e) => return Err(anyhow!(e)),
                _ => {}
            }
        }
    }

    /// Subscribes (QoS 1) to `filters`; false when the connection is gone.
    fn subscribe(&self, filters: &[String]) -> bool {
        match &self.client {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters.iter().map(|f| {
                        rumqttc::SubscribeFilter::new(f.clone(), rumqttc::QoS::AtLeastOnce)
                    }),
                )
                .is_ok(),
            Client::V5(c) => c
                .try_subscribe_many(filters.iter().map(|f| {
                    rumqttc::v5::mqttbytes::v5::Filter::new(
                        f.clone(),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    )
                }))
                .is_ok(),
        }
    }

    /// The next event, waiting until `deadline`.
    fn next_event(&self, deadline: Instant) -> Result<Event> {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.events.recv_timeout(wait) {
            Ok(e) => Ok(e),
            Err(RecvTimeoutError::Timeout) => Err(anyhow!("the broker did not answer in time")),
            Err(RecvTimeoutError::Disconnected) => Err(anyhow!("the connection thread ended")),
        }
    }

    fn publish(&self, p: &Publish) -> Result<()> {
        let ok = match &self.client {
            Client::V4(c) => {
                let qos = if p.qos == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                };
                c.try_publish(p.topic.clone(), qos, p.retain, p.payload.clone())
                    .is_ok()
            }
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::QoS;
                let qos = if p.qos == 0 {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                if p.properties.is_empty() {
                    c.try_publish(p.topic.clone(), qos, p.retain, p.payload.clone())
                        .is_ok()
                } else {
                    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                        user_properties: p.properties.clone(),
                        ..Default::default()
                    };
                    c.try_publish_with_properties(
                        p.topic.clone(),
                        qos,
                        p.retain,
                        p.payload.clone(),
                        props,
                    )
                    .is_ok()
                }
            }
        };
        // The channel holds a whole window, so a refusal means the
        // connection's event loop is gone.
        if ok {
            Ok(())
        } else {
            Err(anyhow!("the connection closed while publishing"))
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name(format!("mqtt-{name}"))
        .spawn(f)
        .map(|_| ())
        .context("starting the mqtt connection thread")
}

/// Milliseconds since the Unix epoch (Sparkplug payload timestamps).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One record as a publish.
#[derive(Debug)]
struct Publish {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    properties: Vec<(String, String)>,
}

pub struct MqttSink {
    name: String,
    cfg: Config,
    broker: Broker,
    /// Taken at each new connection; SIGHUP may replace it.
    secrets: Arc<Reloadable<Secrets>>,
    max_packet: usize,
    session: Option<Session>,
    /// The JSON object of a point (reused buffer).
    line: Vec<u8>,
    /// `sparkplug`: the edge node's state (births, aliases, seq).
    edge: Option<sparkplug::Edge>,
    /// Births to publish before anything else on a new connection, or
    /// again on the same one when a host asked for a rebirth.
    births: Vec<sparkplug::Out>,
    /// `sparkplug`: the commands hosts send the node.
    inbox: Option<Inbox>,
}

/// A Sparkplug node's incoming commands: what they ask, counted.
struct Inbox {
    sink: String,
    cfg: sparkplug::Config,
    /// A host asked for the births again and they are not yet queued.
    rebirth_due: bool,
    rebirths: Arc<AtomicU64>,
    ignored: Arc<AtomicU64>,
    malformed: Arc<AtomicU64>,
    /// Ignored commands are logged once (the first); the rest are counted.
    ignored_logged: bool,
    malformed_warned: Option<Instant>,
    malformed_held: u64,
}

impl Inbox {
    fn new(cfg: sparkplug::Config, ctx: &BuildContext) -> Inbox {
        Inbox {
            sink: ctx.name().to_string(),
            cfg,
            rebirth_due: false,
            rebirths: ctx.counter(
                "sparkplug_rebirths",
                "Sparkplug rebirth requests (NCMD Node Control/Rebirth) the mqtt sink answered with its births",
            ),
            ignored: ctx.counter(
                "sparkplug_commands_ignored",
                "Sparkplug NCMD/DCMD commands the mqtt sink ignored (a diode sink cannot write to the plant)",
            ),
            malformed: ctx.counter(
                "sparkplug_commands_malformed",
                "payloads on the Sparkplug NCMD/DCMD topics that were not a Sparkplug B command",
            ),
            ignored_logged: false,
            malformed_warned: None,
            malformed_held: 0,
        }
    }

    /// Takes in one command: notes a rebirth request, counts and logs the
    /// rest. Nothing in it can fail the sink.
    fn receive(&mut self, topic: &str, payload: Result<Vec<u8>, usize>) {
        let command = match payload {
            Ok(p) => self.cfg.command(topic, &p),
            Err(len) => Err(format!(
                "{len} bytes, above the {MAX_COMMAND_BYTES}-byte limit for a command"
            )),
        };
        let sink = &self.sink;
        match command {
            Ok(c) => {
                self.rebirth_due |= c.rebirth;
                if !c.ignored.is_empty() {
                    self.ignored.fetch_add(1, Ordering::Relaxed);
                    if !std::mem::replace(&mut self.ignored_logged, true) {
                        tracing::warn!(sink = %sink, topic, ignored = ?c.ignored,
                            "ignoring a Sparkplug command: this sink is the IT end of a one-way diode and cannot write to the plant (only NCMD Node Control/Rebirth = true is acted on); logged once, further ignored commands are counted in sink.{sink}.sparkplug_commands_ignored");
                    }
                }
            }
            Err(why) => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                if self
                    .malformed_warned
                    .is_some_and(|t| t.elapsed() < WARN_INTERVAL)
                {
                    self.malformed_held += 1;
                } else {
                    self.malformed_warned = Some(Instant::now());
                    let held_back = std::mem::take(&mut self.malformed_held);
                    tracing::warn!(sink = %sink, topic, held_back,
                        "dropped a malformed Sparkplug command ({why}); counted in sink.{sink}.sparkplug_commands_malformed, logged at most once a minute");
                }
            }
        }
    }
}

impl MqttSink {
    pub fn new(
        cfg: &Config,
        ctx: &BuildContext,
        secrets: Arc<Reloadable<Secrets>>,
    ) -> Result<Self> {
        let name = ctx.name();
        let broker = parse_url(&cfg.url).map_err(|e| anyhow!("sinks.{name}: {e}"))?;
        Ok(MqttSink {
            name: name.to_string(),
            cfg: cfg.clone(),
            broker,
            secrets,
            max_packet: parse_size(&cfg.max_packet_size).expect("validated") as usize,
            session: None,
            line: Vec::with_capacity(512),
            edge: cfg.sparkplug.clone().map(sparkplug::Edge::new),
            births: Vec::new(),
            inbox: cfg.sparkplug.clone().map(|s| Inbox::new(s, ctx)),
        })
    }

    /// Queues the births again when a host asked for them since the last
    /// time (a new connection's births answer it as well).
    fn answer_rebirth(&mut self) {
        let (Some(inbox), Some(edge)) = (&mut self.inbox, &mut self.edge) else {
            return;
        };
        if !std::mem::take(&mut inbox.rebirth_due) {
            return;
        }
        inbox.rebirths.fetch_add(1, Ordering::Relaxed);
        if self.births.is_empty() {
            self.births = edge.rebirth(now_ms());
        }
        tracing::info!(sink = %self.name, bd_seq = edge.bd_seq(), births = self.births.len(),
            "a Sparkplug host asked for a rebirth (NCMD Node Control/Rebirth): publishing the NBIRTH (seq 0) and a DBIRTH per device again");
    }

    fn publish_of(&mut self, r: &Delivered) -> Result<Publish, String> {
        let p = match &r.body {
            RecordBody::Message(m) => Publish {
                topic: format!("{}/{}", self.cfg.prefix, m.topic),
                payload: m.payload.clone(),
                qos: self.cfg.qos.unwrap_or(m.qos.min(1)),
                retain: m.retain,
                properties: if self.cfg.protocol == "5" {
                    m.properties.clone()
                } else {
                    Vec::new()
                },
            },
            RecordBody::Point(point) if self.edge.is_some() => {
                let edge = self.edge.as_mut().expect("matched");
                let out = edge.point(&r.stream, point, now_ms())?;
                Publish {
                    topic: out.topic,
                    payload: out.payload,
                    qos: out.qos,
                    retain: false,
                    properties: Vec::new(),
                }
            }
            body => {
                self.line.clear();
                json_line::write_record(&mut self.line, r);
                let name = match body {
                    RecordBody::Point(p) => &p.tag,
                    _ => &*r.stream,
                };
                Publish {
                    topic: format!("{}/{}", self.cfg.prefix, name),
                    payload: self.line.clone(),
                    qos: self.cfg.qos.unwrap_or(1),
                    retain: false,
                    properties: Vec::new(),
                }
            }
        };
        if p.topic.contains(['+', '#', '\0']) || p.topic.len() > 65_535 {
            return Err(format!(
                "topic `{}` cannot be published (wildcard or NUL character, or longer than 65535 bytes)",
                p.topic
            ));
        }
        // Fixed header, topic, packet id and properties fit in this margin.
        let overhead = 16
            + p.topic.len()
            + p.properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 5)
                .sum::<usize>();
        if p.payload.len() + overhead > self.max_packet {
            return Err(format!(
                "a {}-byte publish is above max_packet_size {}",
                p.payload.len() + overhead,
                self.cfg.max_packet_size
            ));
        }
        Ok(p)
    }

    /// Publishes `records` on `session` and waits for their PUBACKs;
    /// `done` gets how many from the start are acknowledged (or were QoS 0
    /// and handed to the socket), also when this fails.
    fn publish_batch(
        &mut self,
        session: &Session,
        records: &[&Delivered],
        done: &mut usize,
    ) -> Result<(), SinkError> {
        let mut t = Tracker::new(records.len());
        let mut result = Ok(());
        // Sparkplug births go first (a new connection's, or a rebirth's):
        // no record of their own, QoS 0, in windows like the records (a
        // node may have more devices than a window).
        for b in std::mem::take(&mut self.births) {
            let p = Publish {
                topic: b.topic,
                payload: b.payload,
                qos: b.qos,
                retain: false,
                properties: Vec::new(),
            };
            while t.outstanding >= WINDOW {
                if let Err(e) = session
                    .next_event(Instant::now() + ACK_TIMEOUT)
                    .map_err(|e| SinkError::retry(e.context("publishing the Sparkplug births")))
                    .and_then(|e| t.handle(e, &mut self.inbox))
                {
                    *done = 0;
                    return Err(e);
                }
            }
            if let Err(e) = session.publish(&p) {
                *done = 0;
                return Err(SinkError::retry(e));
            }
            t.published.push_back(None);
            t.outstanding += 1;
        }
        for (i, r) in records.iter().enumerate() {
            let p = match self.publish_of(r) {
                Ok(p) => p,
                Err(reason) => {
                    result = Err(SinkError::Reject { at: i, reason });
                    break;
                }
            };
            while t.outstanding >= WINDOW && result.is_ok() {
                result = session
                    .next_event(Instant::now() + ACK_TIMEOUT)
                    .map_err(|e| SinkError::retry(e.context("waiting for PUBACKs")))
                    .and_then(|e| t.handle(e, &mut self.inbox));
            }
            if result.is_err() {
                break;
            }
            if let Err(e) = session.publish(&p) {
                result = Err(SinkError::retry(e));
                break;
            }
            t.published.push_back(Some(i));
            t.outstanding += 1;
            while let Ok(e) = session.events.try_recv() {
                result = t.handle(e, &mut self.inbox);
                if result.is_err() {
                    break;
                }
            }
            if result.is_err() {
                break;
            }
        }
        // Wait for what is outstanding; after a rejection too, so the
        // records before it count as written.
        let deadline = Instant::now() + ACK_TIMEOUT;
        while t.outstanding > 0 && !matches!(result, Err(SinkError::Retry { .. })) {
            if let Err(e) = session
                .next_event(deadline)
                .map_err(|e| SinkError::retry(e.context("waiting for PUBACKs")))
                .and_then(|e| t.handle(e, &mut self.inbox))
            {
                result = Err(e);
            }
        }
        *done = t.complete.iter().take_while(|c| **c).count();
        result
    }
}

/// Which publishes of a batch were sent and acknowledged.
struct Tracker {
    /// Per record: acknowledged (QoS 1) or handed to the socket (QoS 0).
    complete: Vec<bool>,
    /// Packet id -> record, for QoS 1 publishes awaiting their PUBACK.
    waiting: HashMap<u16, Option<usize>>,
    /// Records published, in the order their `Sent` events will come
    /// (`None`: a Sparkplug birth, which no record waits for).
    published: VecDeque<Option<usize>>,
    outstanding: usize,
}

impl Tracker {
    fn new(records: usize) -> Tracker {
        Tracker {
            complete: vec![false; records],
            waiting: HashMap::new(),
            published: VecDeque::new(),
            outstanding: 0,
        }
    }

    /// Takes one event; a command goes to `inbox`.
    fn handle(&mut self, event: Event, inbox: &mut Option<Inbox>) -> Result<(), SinkError> {
        match event {
            Event::Sent(pkid) => {
                let i = self.published.pop_front().ok_or_else(|| {
                    SinkError::retry(anyhow!(
                        "the broker connection sent a publish this sink did not make"
                    ))
                })?;
                if pkid == 0 {
                    if let Some(i) = i {
                        self.complete[i] = true;
                    }
                    self.outstanding -= 1;
                } else {
                    self.waiting.insert(pkid, i);
                }
            }
            Event::Acked(pkid) => {
                if let Some(i) = self.waiting.remove(&pkid) {
                    if let Some(i) = i {
                        self.complete[i] = true;
                    }
                    self.outstanding -= 1;
                }
            }
            Event::Lost(e) => return Err(SinkError::retry(anyhow!("connection lost: {e}"))),
            Event::Command { topic, payload } => {
                if let Some(inbox) = inbox {
                    inbox.receive(&topic, payload);
                }
            }
            Event::Connected | Event::Subscribed { .. } => {}
        }
        Ok(())
    }
}

impl Sink for MqttSink {
    /// Confirms the records whose PUBACK came (QoS 0: handed to the socket).
    fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        let session = match self.session.take() {
            Some(s) => s,
            None => {
                // Sparkplug: this connection's NDEATH will and its births.
                let will = self.edge.as_mut().map(|edge| {
                    let (will, births) = edge.connect(now_ms());
                    self.births = births;
                    will
                });
                let s = Session::open(
                    &self.cfg,
                    &self.name,
                    &self.broker,
                    &self.secrets.get(),
                    will,
                    self.cfg.sparkplug.as_ref().map(|s| s.command_filters()),
                )
                .with_context(|| {
                    format!(
                        "connecting to the broker at {} (check `url` and that the broker is up)",
                        self.cfg.url
                    )
                })
                .map_err(SinkError::retry)?;
                tracing::info!(sink = %self.name, url = %self.cfg.url, "mqtt sink connected");
                s
            }
        };
        self.answer_rebirth();
        let mut done = 0;
        let result = self.publish_batch(&session, records, &mut done);
        match result {
            Ok(()) => {
                self.session = Some(session);
                Ok(records.len())
            }
            Err(SinkError::Retry { error, .. }) => {
                drop(session); // a new connection next time
                Err(SinkError::Retry {
                    confirmed: done,
                    error,
                })
            }
            Err(e) => {
                self.session = Some(session);
                Err(e)
            }
        }
    }

    /// With no points flowing, still answers a host's rebirth request:
    /// takes the commands that came and publishes the births when asked.
    /// A connection found lost is dropped (the next write opens one).
    fn idle(&mut self) {
        if self.inbox.is_none() {
            return;
        }
        let Some(session) = self.session.take() else {
            return;
        };
        let mut t = Tracker::new(0);
        let mut result = Ok(());
        while let Ok(e) = session.events.try_recv() {
            result = t.handle(e, &mut self.inbox);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            self.answer_rebirth();
            if !self.births.is_empty() {
                result = self.publish_batch(&session, &[], &mut 0);
            }
        }
        let why = match result {
            Ok(()) => {
                self.session = Some(session);
                return;
            }
            Err(SinkError::Retry { error, .. }) => format!("{error:#}"),
            Err(SinkError::Reject { reason, .. }) => reason,
        };
        tracing::warn!(sink = %self.name, "the broker connection failed while no records were being written ({why}); the next write connects again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<Config, String> {
        let text = format!("url = \"mqtt://127.0.0.1:1883\"\nprefix = \"it/plant\"\n{extra}");
        let c: Config = toml::from_str(&text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    #[test]
    fn bad_keys_are_refused_naming_the_key() {
        assert!(config("").is_ok());
        for (extra, key) in [
            ("qos = 2", "qos:"),
            ("protocol = \"3\"", "protocol:"),
            (
                "password_file = \"/nonexistent\"\nusername = \"u\"",
                "password_file: cannot open /nonexistent",
            ),
            ("ca_file = \"/etc/hostname\"", "ca_file:"),
        ] {
            let err = config(extra).unwrap_err();
            assert!(err.starts_with(key), "{extra}: {err}");
        }
        for prefix in ["", "a/#", "a/"] {
            let c: Config =
                toml::from_str(&format!("url = \"mqtt://h\"\nprefix = \"{prefix}\"")).unwrap();
            assert!(c.check().unwrap_err().starts_with("prefix:"), "{prefix}");
        }
        assert!(parse_url("http://h").unwrap_err().starts_with("url:"));
    }

    fn no_secrets() -> Arc<Reloadable<Secrets>> {
        Reloadable::new(vec![], || {
            Ok(Secrets {
                password: None,
                ca_pem: None,
            })
        })
        .unwrap()
    }

    #[test]
    fn a_rebirth_request_queues_the_births_again_and_other_commands_are_only_counted() {
        let c = config("sparkplug = { group = \"G\", node = \"N\" }").unwrap();
        let ctx = BuildContext::new("spb");
        let mut sink = MqttSink::new(&c, &ctx, no_secrets()).unwrap();
        let (ncmd, dcmd) = ("spBv1.0/G/NCMD/N", "spBv1.0/G/DCMD/N/plant_a");
        // The connection's births went out; points follow.
        sink.edge.as_mut().unwrap().connect(1);
        let point = weir_protocol::Point {
            tag: "t".into(),
            ts_ns: 0,
            value: weir_protocol::Value::F64(1.5),
            quality: 192,
            status: None,
        };
        sink.edge
            .as_mut()
            .unwrap()
            .point("plant/a", &point, 2)
            .unwrap();
        let inbox = sink.inbox.as_mut().unwrap();
        inbox.receive(ncmd, Ok(vec![0xff, 0xff, 0xff]));
        inbox.receive(ncmd, Err(MAX_COMMAND_BYTES + 1));
        inbox.receive(dcmd, Ok(sparkplug::rebirth_request(true)));
        inbox.receive(ncmd, Ok(sparkplug::rebirth_request(false)));
        sink.answer_rebirth();
        assert!(sink.births.is_empty(), "nothing asked for a rebirth yet");
        let inbox = sink.inbox.as_mut().unwrap();
        inbox.receive(ncmd, Ok(sparkplug::rebirth_request(true)));
        inbox.receive(ncmd, Ok(sparkplug::rebirth_request(true)));
        sink.answer_rebirth();
        let topics: Vec<&str> = sink.births.iter().map(|b| b.topic.as_str()).collect();
        assert_eq!(topics, ["spBv1.0/G/NBIRTH/N", "spBv1.0/G/DBIRTH/N/plant_a"]);
        sink.answer_rebirth();
        assert_eq!(
            sink.births.len(),
            2,
            "two requests before an answer: one rebirth"
        );
        let counters: Vec<(&str, u64)> = ctx
            .counters
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.key, c.value.load(Ordering::Relaxed)))
            .collect();
        assert_eq!(
            counters,
            [
                ("sparkplug_rebirths", 1),
                ("sparkplug_commands_ignored", 2),
                ("sparkplug_commands_malformed", 2)
            ]
        );
    }

    #[test]
    fn messages_keep_topic_retain_and_qos_and_points_go_to_their_tag_as_json() {
        let c = config("").unwrap();
        let mut sink = MqttSink::new(&c, &BuildContext::new("it"), no_secrets()).unwrap();
        let rec = |body: RecordBody| Delivered {
            stream: "plant/mqtt".into(),
            source_type: "mqtt".into(),
            session: 1,
            epoch: 1,
            seq: 7,
            resent: false,
            body,
        };
        let mut m = weir_protocol::Message::new("a/b", vec![0, 255, 1], 5);
        m.retain = true;
        m.qos = 1;
        let p = sink.publish_of(&rec(RecordBody::Message(m))).unwrap();
        assert_eq!(
            (p.topic.as_str(), p.payload.as_slice(), p.qos, p.retain),
            ("it/plant/a/b", &[0u8, 255, 1][..], 1, true)
        );
        let point = weir_protocol::Point {
            tag: "G/E/Temp".into(),
            ts_ns: 0,
            value: weir_protocol::Value::F64(1.5),
            quality: 0,
            status: None,
        };
        let p = sink.publish_of(&rec(RecordBody::Point(point))).unwrap();
        assert_eq!(
            (p.topic.as_str(), p.qos, p.retain),
            ("it/plant/G/E/Temp", 1, false)
        );
        let json: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(
            (json["tag"].as_str(), json["value"].as_f64()),
            (Some("G/E/Temp"), Some(1.5))
        );
        let bad = weir_protocol::Message::new("a/#", vec![], 5);
        assert!(sink
            .publish_of(&rec(RecordBody::Message(bad)))
            .unwrap_err()
            .contains("wildcard"));
    }
}
