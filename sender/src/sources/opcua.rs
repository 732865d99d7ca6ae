//! `opcua`: subscribes to an OPC UA server's variables (through
//! async-opcua's client) and turns each data change into a `Point`: the
//! node id (or a configured name) as tag, the source timestamp (the
//! server's when the source gave none), the value in the matching type and
//! the OPC UA status code as quality (good, uncertain, bad), its name kept
//! in `status` when it is not plain Good.
//!
//! Each connection is one session with one subscription. A lost
//! connection is made again with a backoff (100 ms doubling to 5 s) as a
//! new session on which the subscription is created again (async-opcua's
//! own reconnection is not used: after a server restart the subscription
//! it re-created was never published, so the source does it itself). The
//! gap is visible: when the connection is lost, every item gets one
//! bad-quality point with status `communication-lost`, then its first
//! value once the subscription runs again. The session's state (`connecting`,
//! `connected`, `retrying`) and counts show in the source's status in the
//! metrics file.
//!
//! Security: policy None only, anonymous. The secure policies, client
//! certificates, user names and server trust are refused when configured,
//! naming what this build supports.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use opcua::client::{
    ClientBuilder, DataChangeCallback, IdentityToken, MonitoredItem, Session, SessionPollResult,
};
use opcua::crypto::CertificateStore;
use opcua::sync::RwLock;
use opcua::types::{
    DataChangeFilter, DataChangeTrigger, DataValue, DateTime, EndpointDescription, ExtensionObject,
    MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, NodeId,
    ReadValueId, StatusCode, TimestampsToReturn, UserTokenPolicy, Variant,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use weir_protocol::{Point, RecordBody, Value, QUALITY_BAD, QUALITY_GOOD, QUALITY_UNCERTAIN};

use super::{now_ns, Source, SourceHandle};
use crate::metrics::Counters;

/// Reconnect backoff: doubled per failed attempt in a row up to the max.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// One monitored variable: a node id string, or a table with a tag.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Node {
    /// `"ns=2;s=Temp"`: the tag is the node id string.
    Id(String),
    /// `{ node = "ns=2;s=Temp", tag = "boiler/temp" }`.
    Named { node: String, tag: String },
}

impl Node {
    fn node(&self) -> &str {
        match self {
            Node::Id(id) | Node::Named { node: id, .. } => id,
        }
    }

    fn tag(&self) -> &str {
        match self {
            Node::Id(id) => id,
            Node::Named { tag, .. } => tag,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The server's endpoint URL: `opc.tcp://host:4840/path`.
    pub endpoint: String,
    /// The variables to subscribe to.
    pub nodes: Vec<Node>,
    /// `None` (the only one this build supports).
    #[serde(default = "default_none")]
    pub security_policy: String,
    /// `None` (the only one this build supports).
    #[serde(default = "default_none")]
    pub security_mode: String,
    /// How often the server sends the changes it collected.
    #[serde(default = "default_publishing_interval_ms")]
    pub publishing_interval_ms: u64,
    /// How often the server samples each variable; unset: as often as it
    /// publishes.
    #[serde(default)]
    pub sampling_interval_ms: Option<u64>,
    /// Absolute deadband: a numeric value that moved less than this since
    /// the last reported one is not reported.
    #[serde(default)]
    pub deadband: Option<f64>,
}

fn default_none() -> String {
    "None".into()
}

fn default_publishing_interval_ms() -> u64 {
    1000
}

/// `opc.tcp://host:port[/path]`, checked.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!("endpoint: `{endpoint}` {why}; write e.g. \"opc.tcp://192.0.2.30:4840/\"")
    };
    let rest = endpoint
        .strip_prefix("opc.tcp://")
        .ok_or_else(|| bad("must start with opc.tcp://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("has no :port"))?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !host.is_empty() => Ok(()),
        _ => Err(bad("has no valid host:port")),
    }
}

impl Source for Config {
    const TYPE: &'static str = "opcua";

    fn validate(&self) -> Result<(), String> {
        check_endpoint(&self.endpoint)?;
        match self.security_policy.as_str() {
            "None" => {}
            "Basic256Sha256" => return Err(
                "security_policy: Basic256Sha256 is not supported by this build yet; use \"None\" \
                 on a trusted network segment, or put an OPC UA gateway that does the secure session \
                 next to the server"
                    .into(),
            ),
            other => {
                return Err(format!(
                    "security_policy: `{other}` is not a policy this build supports; use \"None\""
                ))
            }
        }
        match self.security_mode.as_str() {
            "None" => {}
            "Sign" | "SignAndEncrypt" => {
                return Err(format!(
                    "security_mode: {} is not supported by this build yet; use \"None\"",
                    self.security_mode
                ))
            }
            other => {
                return Err(format!(
                    "security_mode: `{other}` is not a mode; use \"None\" (Sign and SignAndEncrypt are not supported by this build yet)"
                ))
            }
        }
        if !(10..=3_600_000).contains(&self.publishing_interval_ms) {
            return Err(format!(
                "publishing_interval_ms: {} must be between 10 and 3600000",
                self.publishing_interval_ms
            ));
        }
        if let Some(ms) = self.sampling_interval_ms {
            if ms > 3_600_000 {
                return Err(format!(
                    "sampling_interval_ms: {ms} must be between 0 (as fast as the server can) and 3600000"
                ));
            }
        }
        if let Some(d) = self.deadband {
            if !(d.is_finite() && d >= 0.0) {
                return Err(format!(
                    "deadband: {d} must be a number of at least 0 (an absolute change)"
                ));
            }
        }
        if self.nodes.is_empty() {
            return Err(
                "nodes: is empty; list the variables' node ids, e.g. nodes = [\"ns=2;s=Temp\"]"
                    .into(),
            );
        }
        let mut ids = std::collections::HashSet::new();
        let mut tags = std::collections::HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let id = NodeId::from_str(n.node()).map_err(|_| {
                format!(
                    "nodes[{i}]: `{}` is not a node id; write e.g. \"ns=2;s=Temp\" or \"ns=3;i=1001\"",
                    n.node()
                )
            })?;
            if !ids.insert(id) {
                return Err(format!("nodes[{i}]: `{}` is listed twice", n.node()));
            }
            if n.tag().is_empty() {
                return Err(format!("nodes[{i}].tag: is empty"));
            }
            if !tags.insert(n.tag().to_string()) {
                return Err(format!(
                    "nodes[{i}].tag: `{}` is used twice; each point needs its own tag",
                    n.tag()
                ));
            }
        }
        Ok(())
    }

    async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        run(self, handle).await
    }
}

/// The quality of an OPC UA status code, and its name unless it is Good.
fn quality(code: StatusCode) -> (u8, Option<String>) {
    let quality = if code.is_bad() {
        QUALITY_BAD
    } else if code.is_uncertain() {
        QUALITY_UNCERTAIN
    } else {
        QUALITY_GOOD
    };
    let status = (code != StatusCode::Good).then(|| format!("{code} (0x{:08X})", code.bits()));
    (quality, status)
}

/// Nanoseconds since the Unix epoch of an OPC UA time (100 ns ticks since
/// 1601).
fn unix_ns(t: &DateTime) -> i64 {
    t.as_chrono()
        .timestamp_nanos_opt()
        .unwrap_or(if t.ticks() < 0 { i64::MIN } else { i64::MAX })
}

/// A scalar as JSON (for arrays) .
fn json_of(v: &Variant) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Variant::Empty => J::Null,
        Variant::Boolean(b) => J::Bool(*b),
        Variant::SByte(n) => (*n).into(),
        Variant::Byte(n) => (*n).into(),
        Variant::Int16(n) => (*n).into(),
        Variant::UInt16(n) => (*n).into(),
        Variant::Int32(n) => (*n).into(),
        Variant::UInt32(n) => (*n).into(),
        Variant::Int64(n) => (*n).into(),
        Variant::UInt64(n) => (*n).into(),
        Variant::Float(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(J::Null, J::Number),
        Variant::Double(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Variant::String(s) => J::String(s.as_ref().to_string()),
        Variant::DateTime(t) => J::String(t.to_rfc3339()),
        Variant::LocalizedText(t) => J::String(t.text.as_ref().to_string()),
        Variant::Array(a) => J::Array(a.values.iter().map(json_of).collect()),
        other => J::String(other.to_string()),
    }
}

/// The point value of a variant: numbers and booleans as themselves,
/// text as a string, arrays (and other structures) as JSON text.
fn value_of(v: &Variant) -> Value {
    match v {
        // No value: a sink writes `null`.
        Variant::Empty => Value::F64(f64::NAN),
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(n) => Value::I64((*n).into()),
        Variant::Byte(n) => Value::I64((*n).into()),
        Variant::Int16(n) => Value::I64((*n).into()),
        Variant::UInt16(n) => Value::I64((*n).into()),
        Variant::Int32(n) => Value::I64((*n).into()),
        Variant::UInt32(n) => Value::I64((*n).into()),
        Variant::Int64(n) => Value::I64(*n),
        // Above i64::MAX: as a float rather than wrapped.
        Variant::UInt64(n) => i64::try_from(*n).map_or(Value::F64(*n as f64), Value::I64),
        Variant::Float(f) => Value::F64(f64::from(*f)),
        Variant::Double(f) => Value::F64(*f),
        Variant::String(s) => Value::Str(s.as_ref().to_string()),
        Variant::LocalizedText(t) => Value::Str(t.text.as_ref().to_string()),
        Variant::DateTime(t) => Value::Str(t.to_rfc3339()),
        Variant::Array(_) => Value::Str(json_of(v).to_string()),
        other => Value::Str(other.to_string()),
    }
}

/// The point of one data change of the item tagged `tag`.
fn point_of(tag: &str, dv: &DataValue) -> Point {
    let (quality, status) = quality(dv.status.unwrap_or(StatusCode::Good));
    let ts_ns = dv
        .source_timestamp
        .as_ref()
        .filter(|t| !t.is_null())
        .or(dv.server_timestamp.as_ref().filter(|t| !t.is_null()))
        .map_or_else(now_ns, unix_ns);
    Point {
        tag: tag.to_string(),
        ts_ns,
        value: dv.value.as_ref().map_or(Value::F64(f64::NAN), value_of),
        quality,
        status,
    }
}

/// The communication-lost point of an item.
fn lost_point(tag: &str, ts_ns: i64) -> Point {
    Point {
        tag: tag.to_string(),
        ts_ns,
        value: Value::F64(f64::NAN),
        quality: QUALITY_BAD,
        status: Some("communication-lost".into()),
    }
}

/// What the session's event loop tells the source.
enum Event {
    Connected,
    Lost(StatusCode),
    ConnectFailed(StatusCode),
    /// The event loop ended without saying why.
    Ended(String),
}

fn monitored_items(cfg: &Config) -> Vec<MonitoredItemCreateRequest> {
    let sampling = cfg.sampling_interval_ms.map_or(-1.0, |ms| ms as f64);
    cfg.nodes
        .iter()
        .map(|n| {
            let id = NodeId::from_str(n.node()).expect("validated");
            let filter = cfg.deadband.map_or_else(ExtensionObject::null, |d| {
                ExtensionObject::from_message(DataChangeFilter {
                    trigger: DataChangeTrigger::StatusValue,
                    // DeadbandType Absolute.
                    deadband_type: 1,
                    deadband_value: d,
                })
            });
            MonitoredItemCreateRequest::new(
                ReadValueId::from(id),
                MonitoringMode::Reporting,
                MonitoringParameters {
                    client_handle: 0,
                    sampling_interval: sampling,
                    filter,
                    queue_size: 10,
                    discard_oldest: true,
                },
            )
        })
        .collect()
}

/// Creates the subscription and its items (once: the client's event loop
/// carries it over to every later session). Items the server refused get
/// a bad point with the server's status code, and are logged.
async fn subscribe(
    cfg: &Config,
    session: &Arc<Session>,
    tags: &Arc<HashMap<NodeId, String>>,
    data: &mpsc::UnboundedSender<Point>,
    handle: &mut SourceHandle,
) -> Result<(), String> {
    let (tags_cb, data_cb) = (tags.clone(), data.clone());
    let callback = DataChangeCallback::new(move |dv: DataValue, item: &MonitoredItem| {
        let id = &item.item_to_monitor().node_id;
        let tag = tags_cb.get(id).cloned().unwrap_or_else(|| id.to_string());
        let _ = data_cb.send(point_of(&tag, &dv));
    });
    let publishing = Duration::from_millis(cfg.publishing_interval_ms);
    // Lifetime and keep-alive counts as the OPC UA examples use them: the
    // server keeps the subscription 30 intervals without a publish request.
    let id = session
        .create_subscription(publishing, 30, 10, 0, 0, true, callback)
        .await
        .map_err(|e| format!("cannot create the subscription: {e}"))?;
    let created = session
        .create_monitored_items(id, TimestampsToReturn::Both, monitored_items(cfg))
        .await
        .map_err(|e| format!("cannot create the monitored items: {e}"))?;
    let mut refused = Vec::new();
    for (n, r) in cfg.nodes.iter().zip(&created) {
        let code = r.result.status_code;
        if code.is_bad() {
            let (quality, status) = quality(code);
            tracing::warn!(source = handle.stream(), node = n.node(), status = %code,
                "opcua server refused to monitor the node; it makes no points (check the node id)");
            refused.push(RecordBody::Point(Point {
                tag: n.tag().to_string(),
                ts_ns: now_ns(),
                value: Value::F64(f64::NAN),
                quality,
                status,
            }));
        }
    }
    let refused_n = refused.len() as u64;
    handle.status(|s| *s.counts.entry("refused_items").or_default() = refused_n);
    Counters::add(&handle.counters().opcua_bad_points, refused_n);
    handle.emit_batch(&refused);
    Ok(())
}

/// How one session ended.
enum Ended {
    Shutdown,
    /// It was connected and the connection went away.
    Lost(String),
    /// It never got connected (or could not subscribe).
    Failed(String),
}

/// Hands the points of data changes to the spool, counted.
fn emit_points(handle: &mut SourceHandle, batch: &mut Vec<Point>) {
    let bad = batch.iter().filter(|p| p.quality == QUALITY_BAD).count() as u64;
    let len = batch.len() as u64;
    let counters = handle.counters();
    Counters::add(&counters.opcua_data_changes, len);
    Counters::add(&counters.opcua_bad_points, bad);
    handle.status(|s| {
        *s.counts.entry("data_changes").or_default() += len;
        *s.counts.entry("bad_points").or_default() += bad;
    });
    let records: Vec<RecordBody> = batch.drain(..).map(RecordBody::Point).collect();
    handle.emit_batch(&records);
}

/// One session: connects once, subscribes, and passes data changes on
/// until the connection goes away or the sender shuts down. The client's
/// own reconnection is not used: a new session with a new subscription is
/// made for every connection (see [`run`]).
async fn session_once(
    cfg: &Config,
    tags: &Arc<HashMap<NodeId, String>>,
    data_tx: &mpsc::UnboundedSender<Point>,
    data: &mut mpsc::UnboundedReceiver<Point>,
    handle: &mut SourceHandle,
) -> Ended {
    let name = handle.stream().to_string();
    let config = ClientBuilder::new()
        .application_name("weir-sender")
        .application_uri("urn:weir:sender")
        .product_uri("urn:weir")
        .session_name(format!("weir-sender {name}"))
        // One attempt: the backoff is the source's.
        .session_retry_limit(0)
        .keep_alive_interval(Duration::from_secs(2))
        .max_failed_keep_alive_count(3)
        .request_timeout(Duration::from_secs(10))
        .recreate_subscriptions(false)
        .into_config();
    let endpoint: EndpointDescription = (
        cfg.endpoint.as_str(),
        "http://opcfoundation.org/UA/SecurityPolicy#None",
        MessageSecurityMode::None,
        UserTokenPolicy::anonymous(),
    )
        .into();
    // Security None: no certificates, so a store that never touches the
    // disk (the client's own would create a pki directory).
    let store = Arc::new(RwLock::new(CertificateStore::new(std::path::Path::new(
        "/nonexistent-weir-opcua-pki",
    ))));
    let built = opcua::client::SessionBuilder::new(&config)
        .connect_to_endpoint_directly(endpoint)
        .and_then(|b| b.user_identity_token(IdentityToken::Anonymous).build(store));
    let (session, event_loop) = match built {
        Ok(x) => x,
        Err(e) => return Ended::Failed(format!("endpoint {}: {e}", cfg.endpoint)),
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let stream = event_loop.enter();
        tokio::pin!(stream);
        while let Some(r) = stream.next().await {
            let (event, last) = match r {
                Ok(SessionPollResult::Reconnected(_)) => (Event::Connected, false),
                Ok(SessionPollResult::ConnectionLost(code)) => (Event::Lost(code), true),
                Ok(SessionPollResult::ReconnectFailed(code)) => (Event::ConnectFailed(code), true),
                Ok(_) => continue,
                Err(code) => (Event::ConnectFailed(code), true),
            };
            if events_tx.send(event).is_err() || last {
                return;
            }
        }
        let _ = events_tx.send(Event::Ended("session closed".into()));
    });
    let mut shutdown = handle.shutdown.clone();
    let mut batch = Vec::new();
    let mut connected = false;
    let ended = loop {
        if handle.is_shutting_down() {
            break Ended::Shutdown;
        }
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = data.recv_many(&mut batch, 1024) => emit_points(handle, &mut batch),
            event = events.recv() => match event {
                Some(Event::Connected) => {
                    connected = true;
                    if let Err(e) = subscribe(cfg, &session, tags, data_tx, handle).await {
                        break Ended::Failed(format!("endpoint {}: {e}", cfg.endpoint));
                    }
                    Counters::add(&handle.counters().source_connections, 1);
                    handle.status(|s| {
                        s.state = "connected";
                        s.connections += 1;
                        s.last_error = None;
                    });
                }
                Some(Event::Lost(code)) => break Ended::Lost(format!("connection lost: {code}")),
                Some(Event::ConnectFailed(code)) if connected => break Ended::Lost(format!("connection lost: {code}")),
                Some(Event::ConnectFailed(code)) => break Ended::Failed(format!("cannot connect to {}: {code}", cfg.endpoint)),
                Some(Event::Ended(why)) => break Ended::Failed(why),
                None => break Ended::Failed("the session's event loop stopped".into()),
            },
        }
    };
    if matches!(ended, Ended::Shutdown) && connected {
        // Close the session politely, but do not hold shutdown up for it.
        let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
    }
    driver.abort();
    ended
}

async fn run(cfg: Config, mut handle: SourceHandle) -> anyhow::Result<()> {
    let name = handle.stream().to_string();
    let tags: Arc<HashMap<NodeId, String>> = Arc::new(
        cfg.nodes
            .iter()
            .map(|n| {
                (
                    NodeId::from_str(n.node()).expect("validated"),
                    n.tag().to_string(),
                )
            })
            .collect(),
    );
    let (data_tx, mut data) = mpsc::unbounded_channel::<Point>();
    tracing::info!(source = %name, endpoint = %cfg.endpoint, nodes = cfg.nodes.len(),
        publishing_interval_ms = cfg.publishing_interval_ms, "opcua source connecting");
    handle.status(|s| s.state = "connecting");
    let mut shutdown = handle.shutdown.clone();
    let mut backoff = RECONNECT_MIN;
    // Why the server is unreachable, while it is (to log it once).
    let mut down: Option<String> = None;
    loop {
        let ended = session_once(&cfg, &tags, &data_tx, &mut data, &mut handle).await;
        let why = match ended {
            Ended::Shutdown => return Ok(()),
            Ended::Lost(why) => {
                tracing::warn!(source = %name, endpoint = %cfg.endpoint, error = %why,
                    "opcua connection lost; every item gets a communication-lost point, reconnecting with a backoff");
                let ts = now_ns();
                let lost: Vec<RecordBody> = cfg
                    .nodes
                    .iter()
                    .map(|n| RecordBody::Point(lost_point(n.tag(), ts)))
                    .collect();
                let n = lost.len() as u64;
                Counters::add(&handle.counters().opcua_bad_points, n);
                handle.status(|s| {
                    s.peer_errors += 1;
                    *s.counts.entry("bad_points").or_default() += n;
                });
                handle.emit_batch(&lost);
                backoff = RECONNECT_MIN;
                why
            }
            Ended::Failed(why) => {
                if down.as_ref() != Some(&why) {
                    tracing::warn!(source = %name, endpoint = %cfg.endpoint, error = %why,
                        "opcua server unreachable; retrying with a backoff");
                }
                why
            }
        };
        Counters::add(&handle.counters().opcua_connection_errors, 1);
        handle.status(|s| {
            s.state = "retrying";
            s.last_error = Some(why.clone());
            *s.counts.entry("connection_errors").or_default() += 1;
        });
        down = Some(why);
        // Changes that arrived before the session ended still go out.
        let mut batch = Vec::new();
        while let Ok(p) = data.try_recv() {
            batch.push(p);
        }
        emit_points(&mut handle, &mut batch);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => {}
        }
        if handle.is_shutting_down() {
            return Ok(());
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map(|_| c)
    }

    #[test]
    fn a_node_list_config_is_checked_naming_the_key() {
        let ok = config(
            "endpoint = \"opc.tcp://127.0.0.1:4840/weir/\"\n\
             nodes = [\"ns=2;s=Temp\", \"ns=3;i=1001\", { node = \"ns=2;s=Flag\", tag = \"boiler/flag\" }]\n",
        )
        .unwrap();
        assert_eq!(ok.nodes[0].tag(), "ns=2;s=Temp");
        assert_eq!(ok.nodes[2].tag(), "boiler/flag");
        assert_eq!(
            (ok.publishing_interval_ms, ok.security_policy.as_str()),
            (1000, "None")
        );
        let err = config("endpoint = \"tcp://h:4840\"\nnodes = [\"i=85\"]").unwrap_err();
        assert!(
            err.starts_with("endpoint: `tcp://h:4840` must start with opc.tcp://"),
            "{err}"
        );
        let err = config("endpoint = \"opc.tcp://h/x\"\nnodes = [\"i=85\"]").unwrap_err();
        assert!(
            err.starts_with("endpoint:") && err.contains("no :port"),
            "{err}"
        );
        let err = config("endpoint = \"opc.tcp://h:4840\"\nnodes = []").unwrap_err();
        assert!(err.starts_with("nodes: is empty"), "{err}");
        let err = config("endpoint = \"opc.tcp://h:4840\"\nnodes = [\"ns=2;x=1\"]").unwrap_err();
        assert!(
            err.starts_with("nodes[0]: `ns=2;x=1` is not a node id"),
            "{err}"
        );
        let err = config("endpoint = \"opc.tcp://h:4840\"\nnodes = [\"ns=2;i=1\", \"ns=2;i=1\"]")
            .unwrap_err();
        assert!(err.contains("listed twice"), "{err}");
        let err = config(
            "endpoint = \"opc.tcp://h:4840\"\nnodes = [{ node = \"ns=2;i=1\", tag = \"a\" }, { node = \"ns=2;i=2\", tag = \"a\" }]",
        )
        .unwrap_err();
        assert!(err.starts_with("nodes[1].tag: `a` is used twice"), "{err}");
        let err = config(
            "endpoint = \"opc.tcp://h:4840\"\nnodes = [\"i=85\"]\npublishing_interval_ms = 1",
        )
        .unwrap_err();
        assert!(
            err.starts_with("publishing_interval_ms: 1 must be between"),
            "{err}"
        );
        let err = config("endpoint = \"opc.tcp://h:4840\"\nnodes = [\"i=85\"]\ndeadband = -1.0")
            .unwrap_err();
        assert!(err.starts_with("deadband:"), "{err}");
    }

    #[test]
    fn secure_modes_are_refused_saying_what_this_build_supports() {
        let err = config(
            "endpoint = \"opc.tcp://h:4840\"\nnodes = [\"i=85\"]\nsecurity_policy = \"Basic256Sha256\"\nsecurity_mode = \"SignAndEncrypt\"",
        )
        .unwrap_err();
        assert!(
            err.starts_with("security_policy: Basic256Sha256 is not supported"),
            "{err}"
        );
        let err =
            config("endpoint = \"opc.tcp://h:4840\"\nnodes = [\"i=85\"]\nsecurity_mode = \"Sign\"")
                .unwrap_err();
        assert!(
            err.starts_with("security_mode: Sign is not supported"),
            "{err}"
        );
        let err = config("endpoint = \"opc.tcp://h:4840\"\nnodes = [\"i=85\"]\nusername = \"op\"")
            .unwrap_err();
        assert!(err.contains("username"), "{err}");
    }

    #[test]
    fn status_codes_map_to_quality_keeping_the_name() {
        assert_eq!(quality(StatusCode::Good), (QUALITY_GOOD, None));
        let (q, s) = quality(StatusCode::BadSensorFailure);
        assert_eq!(q, QUALITY_BAD);
        assert_eq!(s.unwrap(), "BadSensorFailure (0x808C0000)");
        let (q, s) = quality(StatusCode::UncertainLastUsableValue);
        assert_eq!(q, QUALITY_UNCERTAIN);
        assert!(s.unwrap().starts_with("UncertainLastUsableValue (0x"));
    }

    #[test]
    fn values_keep_their_type_and_arrays_become_json() {
        assert_eq!(value_of(&Variant::Boolean(true)), Value::Bool(true));
        assert_eq!(value_of(&Variant::Int32(-7)), Value::I64(-7));
        assert_eq!(
            value_of(&Variant::UInt64(u64::MAX)),
            Value::F64(u64::MAX as f64)
        );
        assert_eq!(value_of(&Variant::Float(1.5)), Value::F64(1.5));
        assert_eq!(value_of(&Variant::from("on")), Value::Str("on".into()));
        let array = Variant::from(vec![1i32, 2, 3]);
        assert_eq!(value_of(&array), Value::Str("[1,2,3]".into()));
    }

    #[test]
    fn a_point_takes_the_source_timestamp_else_the_server_one() {
        let t = DateTime::ymd_hms(2026, 11, 30, 6, 0, 0);
        let dv = DataValue {
            value: Some(Variant::Double(2.5)),
            status: Some(StatusCode::Good),
            source_timestamp: Some(t),
            server_timestamp: Some(DateTime::ymd_hms(2026, 11, 30, 7, 0, 0)),
            ..Default::default()
        };
        let p = point_of("ns=2;s=Temp", &dv);
        assert_eq!(p.ts_ns, 1_796_018_400_000_000_000);
        assert_eq!(
            (p.value, p.quality, p.status),
            (Value::F64(2.5), QUALITY_GOOD, None)
        );
        let dv = DataValue {
            source_timestamp: None,
            ..dv
        };
        assert_eq!(
            point_of("t", &dv).ts_ns,
            1_796_018_400_000_000_000 + 3_600_000_000_000
        );
    }
}
