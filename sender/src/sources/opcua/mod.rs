//! `opcua`: subscribes to an OPC UA server's variables (through
//! async-opcua's client) and turns each data change into a `Point`: the
//! node id, a configured name or the browse path as tag, the source
//! timestamp (the server's when the source gave none), the value in the
//! matching type and the OPC UA status code as quality (good, uncertain,
//! bad), its name kept in `status` when it is not plain Good.
//!
//! Each connection is one session with one subscription: the source asks
//! the server for its endpoints, picks the one with the configured
//! security policy and mode, checks the server's certificate against the
//! trusted ones (`security.rs`), opens the session (anonymous or with a
//! user name), finds the variables under the `browse` roots
//! (`browse.rs`), and creates the monitored items. A lost connection is
//! made again with a backoff (100 ms doubling to 5 s) as a new session on
//! which all of this is done again (async-opcua's own reconnection is not
//! used: after a server restart the subscription it re-created was never
//! published, so the source does it itself). The gap is visible: when the
//! connection is lost, every item gets one bad-quality point with status
//! `communication-lost`, then its first value once the subscription runs
//! again. The session's state (`connecting`, `connected`, `retrying`) and
//! counts show in the source's status in the metrics file.

mod browse;
mod config;
mod queue;
mod security;

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use opcua::client::{
    Client, ClientBuilder, DataChangeCallback, IdentityToken, MonitoredItem, Password, Session,
    SessionPollResult,
};
use opcua::crypto::SecurityPolicy;
use opcua::types::{
    DataChangeFilter, DataChangeTrigger, DataValue, DateTime, EndpointDescription, ExtensionObject,
    MessageSecurityMode, MonitoredItemCreateRequest, MonitoringMode, MonitoringParameters, NodeId,
    ReadValueId, StatusCode, TimestampsToReturn, UserTokenType, Variant,
};
use queue::Changes;
use tokio::sync::mpsc;
use weir_protocol::{Point, RecordBody, Value, QUALITY_BAD, QUALITY_GOOD, QUALITY_UNCERTAIN};

pub use config::Config;

use super::{now_ns, Source, SourceHandle};
use crate::metrics::Counters;

/// Reconnect backoff: doubled per failed attempt in a row up to the max.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How long asking the server for its endpoints may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(15);
/// Monitored items created per request (servers limit the operations per
/// call; 1000 is below every limit seen in the field).
const ITEMS_PER_REQUEST: usize = 1000;

impl Source for Config {
    const TYPE: &'static str = "opcua";

    fn validate(&self) -> Result<(), String> {
        self.check()
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

/// One monitored variable of a session.
#[derive(Debug, Clone)]
struct Item {
    node: NodeId,
    tag: String,
}

/// What the session's event loop tells the source.
enum Event {
    Connected,
    Lost(StatusCode),
    ConnectFailed(StatusCode),
    /// The event loop ended without saying why.
    Ended(String),
}

fn monitored_items(cfg: &Config, items: &[Item]) -> Vec<MonitoredItemCreateRequest> {
    let sampling = cfg.sampling_interval_ms.map_or(-1.0, |ms| ms as f64);
    items
        .iter()
        .map(|item| {
            let filter = cfg.deadband.map_or_else(ExtensionObject::null, |d| {
                ExtensionObject::from_message(DataChangeFilter {
                    trigger: DataChangeTrigger::StatusValue,
                    // DeadbandType: 1 Absolute, 2 Percent (of the EURange).
                    deadband_type: if cfg.deadband_type == "percent" { 2 } else { 1 },
                    deadband_value: d,
                })
            });
            MonitoredItemCreateRequest::new(
                ReadValueId::from(item.node.clone()),
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

/// The session's items: the listed nodes, then the variables under each
/// browse root (found now, on this session). A root that cannot be
/// browsed is logged, counted and skipped; the others go on.
async fn items_of(cfg: &Config, session: &Session, handle: &mut SourceHandle) -> Vec<Item> {
    let mut items: Vec<Item> = cfg
        .nodes
        .iter()
        .map(|n| Item {
            node: NodeId::from_str(n.node()).expect("validated"),
            tag: n.tag().to_string(),
        })
        .collect();
    let mut taken: HashSet<NodeId> = items.iter().map(|i| i.node.clone()).collect();
    let mut failed = 0u64;
    for (i, root) in cfg.browse.iter().enumerate() {
        let room = browse::MAX_VARIABLES.saturating_sub(items.len() - cfg.nodes.len());
        match browse::variables(session, root, &mut taken, room).await {
            Ok(found) => {
                tracing::info!(
                    source = handle.stream(),
                    root = root.path(),
                    variables = found.len(),
                    "opcua browse root resolved"
                );
                items.extend(found.into_iter().map(|f| Item {
                    node: f.node,
                    tag: f.tag,
                }));
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(source = handle.stream(), error = %format!("browse[{i}]: {e}"),
                    "opcua browse root skipped; its variables make no points (check `browse`)");
                handle.status(|s| s.last_error = Some(format!("browse[{i}]: {e}")));
            }
        }
    }
    let browsed = (items.len() - cfg.nodes.len()) as u64;
    handle.status(|s| {
        *s.counts.entry("browse_errors").or_default() = failed;
        *s.counts.entry("browsed_items").or_default() = browsed;
    });
    items
}

/// Creates the subscription and its items. Items the server refused get
/// a bad point with the server's status code, and are logged.
async fn subscribe(
    cfg: &Config,
    session: &Arc<Session>,
    items: &[Item],
    changes: &Arc<Changes>,
    handle: &mut SourceHandle,
) -> Result<(), String> {
    let tags: Arc<HashMap<NodeId, String>> = Arc::new(
        items
            .iter()
            .map(|i| (i.node.clone(), i.tag.clone()))
            .collect(),
    );
    let changes = changes.clone();
    let callback = DataChangeCallback::new(move |dv: DataValue, item: &MonitoredItem| {
        let id = &item.item_to_monitor().node_id;
        let tag = tags.get(id).cloned().unwrap_or_else(|| id.to_string());
        changes.push(point_of(&tag, &dv));
    });
    let publishing = Duration::from_millis(cfg.publishing_interval_ms);
    // Lifetime and keep-alive counts as the OPC UA examples use them: the
    // server keeps the subscription 30 intervals without a publish request.
    let id = session
        .create_subscription(publishing, 30, 10, 0, 0, true, callback)
        .await
        .map_err(|e| format!("cannot create the subscription: {e}"))?;
    let mut refused = Vec::new();
    for chunk in items.chunks(ITEMS_PER_REQUEST) {
        let created = session
            .create_monitored_items(id, TimestampsToReturn::Both, monitored_items(cfg, chunk))
            .await
            .map_err(|e| format!("cannot create the monitored items: {e}"))?;
        for (item, r) in chunk.iter().zip(&created) {
            let code = r.result.status_code;
            if code.is_bad() {
                let (quality, status) = quality(code);
                tracing::warn!(source = handle.stream(), node = %item.node, status = %code,
                    "opcua server refused to monitor the node; it makes no points (check the node id)");
                refused.push(RecordBody::Point(Point {
                    tag: item.tag.clone(),
                    ts_ns: now_ns(),
                    value: Value::F64(f64::NAN),
                    quality,
                    status,
                }));
            }
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
    /// The sender refused the server, or the server the sender: a person
    /// has to act (trust a certificate, fix a password); still retried.
    Refused(String),
}

/// Hands what the callback queued to the spool, counted: the data
/// changes, and one `overflow` point per tag that lost changes because
/// the queue was full (see `queue.rs`).
fn emit_changes(handle: &mut SourceHandle, changes: &Changes) {
    let drained = changes.drain(now_ns());
    if drained.points.is_empty() {
        return;
    }
    let bad = drained
        .points
        .iter()
        .filter(|p| p.quality == QUALITY_BAD)
        .count() as u64;
    let len = drained.points.len() as u64 - drained.tags_dropped as u64;
    let counters = handle.counters();
    Counters::add(&counters.opcua_data_changes, len);
    Counters::add(&counters.opcua_bad_points, bad);
    Counters::add(&counters.opcua_dropped_changes, drained.dropped);
    if drained.dropped > 0 {
        tracing::warn!(source = handle.stream(), dropped = drained.dropped, tags = drained.tags_dropped,
            limit_bytes = queue::QUEUE_BYTES,
            "opcua data changes dropped: the source's queue was full; each tag that lost changes gets a bad point with status `overflow`");
    }
    handle.status(|s| {
        *s.counts.entry("data_changes").or_default() += len;
        *s.counts.entry("bad_points").or_default() += bad;
        if drained.dropped > 0 {
            *s.counts.entry("dropped_changes").or_default() += drained.dropped;
        }
    });
    let records: Vec<RecordBody> = drained.points.into_iter().map(RecordBody::Point).collect();
    handle.emit_batch(&records);
}

/// What the source holds for all its sessions: the client (its
/// configuration and certificate store), what it trusts, who it says it is.
struct Prepared {
    client: Client,
    /// Kept for its lifetime: dropping it removes the directory.
    staging: security::Staging,
    trust: security::Trust,
    policy: SecurityPolicy,
    mode: MessageSecurityMode,
    identity: IdentityToken,
}

fn prepare(cfg: &Config, name: &str) -> Result<Prepared, String> {
    let staging = security::Staging::create(name)?;
    let (policy, mode) = match (cfg.security_policy.as_str(), cfg.security_mode.as_str()) {
        ("Basic256Sha256", "Sign") => (SecurityPolicy::Basic256Sha256, MessageSecurityMode::Sign),
        ("Basic256Sha256", _) => (
            SecurityPolicy::Basic256Sha256,
            MessageSecurityMode::SignAndEncrypt,
        ),
        _ => (SecurityPolicy::None, MessageSecurityMode::None),
    };
    let mut builder = ClientBuilder::new()
        .application_name("weir-sender")
        .application_uri("urn:weir:sender")
        .product_uri("urn:weir")
        .session_name(format!("weir-sender {name}"))
        .pki_dir(&staging.dir)
        .create_sample_keypair(false)
        // Trust is decided by `security::Trust` before async-opcua sees the
        // certificate; its store then checks dates, host and URI.
        .trust_server_certs(false)
        .verify_server_certs(true)
        // One attempt: the backoff is the source's.
        .session_retry_limit(0)
        .keep_alive_interval(Duration::from_secs(2))
        .max_failed_keep_alive_count(3)
        .request_timeout(Duration::from_secs(10))
        .recreate_subscriptions(false);
    if cfg.secure() {
        let (cert, key) = (
            cfg.client_cert_file.as_ref().expect("validated"),
            cfg.client_key_file.as_ref().expect("validated"),
        );
        let me = security::ClientIdentity::load(cert, key)?;
        staging.write_own_cert(&me.cert)?;
        builder = builder
            .application_uri(me.application_uri)
            .certificate_path(staging.own_cert())
            .private_key_path(key);
    }
    let identity = match (&cfg.username, &cfg.password_file) {
        (Some(user), Some(file)) => {
            IdentityToken::UserName(user.clone(), Password::new(security::read_password(file)?))
        }
        _ => IdentityToken::Anonymous,
    };
    Ok(Prepared {
        client: Client::new(builder.into_config()),
        staging,
        trust: security::Trust {
            server_cert_file: cfg.server_cert_file.clone(),
            trusted_dir: cfg.trusted_dir.clone(),
        },
        policy,
        mode,
        identity,
    })
}

/// `Basic256Sha256/SignAndEncrypt` of an endpoint.
fn describe(e: &EndpointDescription) -> String {
    let policy = e
        .security_policy_uri
        .as_ref()
        .rsplit('#')
        .next()
        .unwrap_or_default()
        .to_string();
    format!("{policy}/{:?} at {}", e.security_mode, e.endpoint_url)
}

/// The endpoint of the configured policy and mode, its certificate
/// trusted and its user token policy the one the configuration uses.
async fn choose_endpoint(cfg: &Config, p: &Prepared) -> Result<EndpointDescription, Ended> {
    let endpoints = match tokio::time::timeout(
        DISCOVERY_TIMEOUT,
        p.client
            .get_server_endpoints_from_url(cfg.endpoint.as_str()),
    )
    .await
    {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            return Err(Ended::Failed(format!(
                "cannot connect to {}: {e}",
                cfg.endpoint
            )))
        }
        Err(_) => {
            return Err(Ended::Failed(format!(
                "cannot connect to {}: no endpoint list within {DISCOVERY_TIMEOUT:?}",
                cfg.endpoint
            )))
        }
    };
    let Some(endpoint) =
        Client::find_matching_endpoint(&endpoints, &cfg.endpoint, p.policy, p.mode)
    else {
        let offered: Vec<String> = endpoints.iter().map(describe).collect();
        return Err(Ended::Refused(format!(
            "security_policy, security_mode: the server at {} has no endpoint with {}/{}; it offers: {}",
            cfg.endpoint,
            cfg.security_policy,
            cfg.security_mode,
            offered.join(", ")
        )));
    };
    if p.policy != SecurityPolicy::None {
        let der = endpoint.server_certificate.as_ref();
        p.trust.check(der, &cfg.endpoint).map_err(Ended::Refused)?;
        p.staging.accept(der).map_err(Ended::Failed)?;
    }
    let (token, what) = match &p.identity {
        IdentityToken::UserName(..) => (UserTokenType::UserName, "user names (`username`)"),
        _ => (UserTokenType::Anonymous, "anonymous sessions"),
    };
    let Some(policy) = endpoint.find_policy(token) else {
        let fix = if token == UserTokenType::Anonymous {
            "set `username` and `password_file`"
        } else {
            "leave `username` out for an anonymous session"
        };
        return Err(Ended::Refused(format!(
            "the server's endpoint {} takes no {what}; {fix}",
            describe(&endpoint)
        )));
    };
    let plain = policy.security_policy_uri.is_empty()
        || SecurityPolicy::from_uri(policy.security_policy_uri.as_ref()) == SecurityPolicy::None;
    if token == UserTokenType::UserName && p.mode == MessageSecurityMode::None && plain {
        return Err(Ended::Refused(
            "username: the server would take the password in clear over security_mode \"None\"; \
             use security_policy = \"Basic256Sha256\" with security_mode = \"SignAndEncrypt\""
                .into(),
        ));
    }
    Ok(endpoint)
}

/// A connection failure in words that say what to fix.
fn explain(cfg: &Config, code: StatusCode) -> Ended {
    let endpoint = &cfg.endpoint;
    match code {
        StatusCode::BadUserAccessDenied
        | StatusCode::BadIdentityTokenRejected
        | StatusCode::BadIdentityTokenInvalid => Ended::Refused(match &cfg.username {
            Some(user) => format!(
                "the server at {endpoint} refused user `{user}` ({code}); check `username` and the password in `password_file`"
            ),
            None => format!(
                "the server at {endpoint} refused an anonymous session ({code}); set `username` and `password_file`"
            ),
        }),
        StatusCode::BadCertificateHostNameInvalid => Ended::Refused(format!(
            "the server's certificate does not name the host of `endpoint` {endpoint} in its subjectAltName ({code}); \
             connect by a name the certificate holds, or have the server's certificate made again with it"
        )),
        StatusCode::BadCertificateUriInvalid => Ended::Refused(format!(
            "the server's certificate does not carry the server's application URI as its first subjectAltName ({code})"
        )),
        StatusCode::BadCertificateTimeInvalid | StatusCode::BadCertificateIssuerTimeInvalid => {
            Ended::Refused(format!(
                "a certificate is outside its validity dates ({code}): the server's, or the sender's client_cert_file; check both and the clocks"
            ))
        }
        StatusCode::BadSecurityChecksFailed
        | StatusCode::BadCertificateUntrusted
        | StatusCode::BadCertificateInvalid
        | StatusCode::BadSecurityPolicyRejected
            if cfg.secure() =>
        {
            Ended::Refused(format!(
                "the secure channel to {endpoint} failed ({code}): most often the server does not (yet) trust the sender's \
                 client_cert_file; add it to the server's trusted certificates"
            ))
        }
        _ => Ended::Failed(format!("cannot connect to {endpoint}: {code}")),
    }
}

/// One session: connects once, subscribes, and passes data changes on
/// until the connection goes away or the sender shuts down. The client's
/// own reconnection is not used: a new session with a new subscription is
/// made for every connection (see [`run`]).
async fn session_once(
    cfg: &Config,
    prepared: &Prepared,
    items: &mut Vec<Item>,
    changes: &Arc<Changes>,
    handle: &mut SourceHandle,
) -> Ended {
    let mut shutdown = handle.shutdown.clone();
    let endpoint = tokio::select! {
        r = choose_endpoint(cfg, prepared) => match r {
            Ok(e) => e,
            Err(ended) => return ended,
        },
        _ = shutdown.changed() => return Ended::Shutdown,
    };
    let built = prepared
        .client
        .session_builder()
        .connect_to_endpoint_directly(endpoint)
        .and_then(|b| {
            b.user_identity_token(prepared.identity.clone())
                .build(prepared.client.certificate_store().clone())
        });
    let (session, event_loop) = match built {
        Ok(x) => x,
        Err(e) => return Ended::Failed(format!("endpoint {}: {e}", cfg.endpoint)),
    };
    // A handful of events per session: the driver stops at the first loss.
    let (events_tx, mut events) = mpsc::channel(8);
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
            if events_tx.send(event).await.is_err() || last {
                return;
            }
        }
        let _ = events_tx.send(Event::Ended("session closed".into())).await;
    });
    let mut connected = false;
    let ended = loop {
        if handle.is_shutting_down() {
            break Ended::Shutdown;
        }
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = changes.wait() => emit_changes(handle, changes),
            event = events.recv() => match event {
                Some(Event::Connected) => {
                    connected = true;
                    let found = items_of(cfg, &session, handle).await;
                    if found.is_empty() {
                        break Ended::Failed("nothing to monitor: no node listed and no variable found under the browse roots (see the WARN lines, check `browse`)".into());
                    }
                    *items = found;
                    if let Err(e) = subscribe(cfg, &session, items, changes, handle).await {
                        break Ended::Failed(format!("endpoint {}: {e}", cfg.endpoint));
                    }
                    Counters::add(&handle.counters().source_connections, 1);
                    let n = items.len();
                    tracing::info!(source = handle.stream(), endpoint = %cfg.endpoint, items = n,
                        security_policy = %cfg.security_policy, security_mode = %cfg.security_mode,
                        "opcua session connected and subscribed");
                    handle.status(|s| {
                        s.state = "connected";
                        s.connections += 1;
                        s.last_error = None;
                        *s.counts.entry("items").or_default() = n as u64;
                    });
                }
                Some(Event::Lost(code)) => break Ended::Lost(format!("connection lost: {code}")),
                Some(Event::ConnectFailed(code)) if connected => break Ended::Lost(format!("connection lost: {code}")),
                Some(Event::ConnectFailed(code)) => break explain(cfg, code),
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
    // The files were checked by `validate`; one that went away since is
    // the sender's error, naming the key.
    let prepared = prepare(&cfg, &name).map_err(|e| anyhow::anyhow!("sources.{name}: {e}"))?;
    let mut items: Vec<Item> = Vec::new();
    let changes = Arc::new(Changes::new(queue::QUEUE_BYTES));
    tracing::info!(source = %name, endpoint = %cfg.endpoint, nodes = cfg.nodes.len(), browse = cfg.browse.len(),
        security_policy = %cfg.security_policy, security_mode = %cfg.security_mode,
        user = cfg.username.as_deref().unwrap_or("(anonymous)"),
        publishing_interval_ms = cfg.publishing_interval_ms, "opcua source connecting");
    handle.status(|s| s.state = "connecting");
    let mut shutdown = handle.shutdown.clone();
    let mut backoff = RECONNECT_MIN;
    // Why the server is unreachable, while it is (to log it once).
    let mut down: Option<String> = None;
    loop {
        let ended = session_once(&cfg, &prepared, &mut items, &changes, &mut handle).await;
        // Changes that arrived before the session ended still go out,
        // before any communication-lost point.
        emit_changes(&mut handle, &changes);
        let why = match ended {
            Ended::Shutdown => return Ok(()),
            Ended::Lost(why) => {
                tracing::warn!(source = %name, endpoint = %cfg.endpoint, error = %why,
                    "opcua connection lost; every item gets a communication-lost point, reconnecting with a backoff");
                let ts = now_ns();
                let lost: Vec<RecordBody> = items
                    .iter()
                    .map(|i| RecordBody::Point(lost_point(&i.tag, ts)))
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
            Ended::Refused(why) => {
                if down.as_ref() != Some(&why) {
                    tracing::error!(source = %name, endpoint = %cfg.endpoint, error = %why,
                        "opcua connection refused; retrying with a backoff until it is fixed");
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
        assert!(
            err.starts_with("nodes: is empty and there is no `browse`"),
            "{err}"
        );
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
    fn security_keys_are_checked_together_naming_the_key_to_fix() {
        let base = "endpoint = \"opc.tcp://h:4840\"\nnodes = [\"i=85\"]\n";
        let err = |extra: &str| config(&format!("{base}{extra}")).unwrap_err();
        let e = err("security_policy = \"Basic256Sha256\"\nsecurity_mode = \"SignAndEncrypt\"");
        assert!(e.starts_with("client_cert_file: is required"), "{e}");
        let e = err("security_policy = \"Basic256Sha256\"");
        assert!(
            e.starts_with("security_mode: \"None\" with security_policy"),
            "{e}"
        );
        let e = err("security_mode = \"Sign\"");
        assert!(
            e.starts_with("security_mode: Sign needs security_policy"),
            "{e}"
        );
        let e = err("security_policy = \"Aes256Sha256RsaPss\"\nsecurity_mode = \"Sign\"");
        assert!(
            e.starts_with("security_policy: `Aes256Sha256RsaPss` is not a policy"),
            "{e}"
        );
        let e = err("security_mode = \"Encrypt\"");
        assert!(
            e.starts_with("security_mode: `Encrypt` is not a mode"),
            "{e}"
        );
        let e = err("trusted_dir = \"/etc\"");
        assert!(
            e.starts_with("trusted_dir: is only used with security_policy"),
            "{e}"
        );
        let e = err("username = \"op\"");
        assert!(
            e.starts_with("password_file: is required with `username`"),
            "{e}"
        );
        let e = err("password_file = \"/nonexistent\"");
        assert!(
            e.starts_with("password_file: is set without `username`"),
            "{e}"
        );
        let e = err("username = \"op\"\npassword_file = \"/nonexistent/weir-opcua-pw\"");
        assert!(
            e.starts_with("password_file: cannot open /nonexistent/weir-opcua-pw"),
            "{e}"
        );
        let e = err("security_policy = \"Basic256Sha256\"\nsecurity_mode = \"Sign\"\n\
                     client_cert_file = \"/nonexistent/c.der\"\nclient_key_file = \"/nonexistent/c.key\"");
        assert!(e.starts_with("server_cert_file: is required"), "{e}");
        let e = err("security_policy = \"Basic256Sha256\"\nsecurity_mode = \"Sign\"\n\
                     client_cert_file = \"/nonexistent/c.der\"\nclient_key_file = \"/nonexistent/c.key\"\n\
                     trusted_dir = \"/nonexistent\"");
        assert!(
            e.starts_with("client_cert_file: cannot read /nonexistent/c.der"),
            "{e}"
        );
        let e = err("deadband = 150.0\ndeadband_type = \"percent\"");
        assert!(
            e.starts_with("deadband: 150 must be between 0 and 100"),
            "{e}"
        );
        let e = err("deadband_type = \"relative\"");
        assert!(e.starts_with("deadband_type: `relative`"), "{e}");
    }

    #[test]
    fn browse_roots_are_paths_from_the_root_folder_or_node_ids() {
        let ok = config(
            "endpoint = \"opc.tcp://h:4840\"\n\
             browse = [\"Objects/2:Plant/Line1\", { path = \"ns=2;s=Line2\", tag = \"line2\" }]",
        )
        .unwrap();
        assert!(ok.nodes.is_empty());
        assert_eq!(
            ok.browse[0].start().unwrap(),
            config::Start::Path(vec![
                (None, "Objects".into()),
                (Some(2), "Plant".into()),
                (None, "Line1".into())
            ])
        );
        assert_eq!(ok.browse[0].tag(), "Objects/2:Plant/Line1");
        assert_eq!(
            ok.browse[1].start().unwrap(),
            config::Start::Node(NodeId::new(2, "Line2"))
        );
        assert_eq!(ok.browse[1].tag(), "line2");
        let e =
            config("endpoint = \"opc.tcp://h:4840\"\nbrowse = [\"Objects//Line1\"]").unwrap_err();
        assert!(
            e.starts_with("browse[0]: `Objects//Line1` has an empty segment"),
            "{e}"
        );
        let e = config("endpoint = \"opc.tcp://h:4840\"\nbrowse = [\"ns=2;q=x\"]").unwrap_err();
        assert!(
            e.starts_with("browse[0]: `ns=2;q=x` is neither a node id"),
            "{e}"
        );
        let e = config("endpoint = \"opc.tcp://h:4840\"").unwrap_err();
        assert!(
            e.starts_with("nodes: is empty and there is no `browse`"),
            "{e}"
        );
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
