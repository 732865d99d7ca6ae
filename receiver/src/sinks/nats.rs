//! `nats`: publishes records into a NATS JetStream stream (async-nats, on
//! the shared sink runtime).
//!
//! Each record goes to the subject its `subject` template gives, with the
//! header `Nats-Msg-Id` = `stream/epoch/seq` ([`super::record_id`]) and
//! `Nats-Expected-Stream` = `stream`, so the server stores it only in the
//! configured stream and drops a second publish of it inside the stream's
//! duplicate window. `write` publishes a batch with up to [`WINDOW`]
//! acknowledgements outstanding and confirms the prefix whose publish acks
//! came (a duplicate ack counts: the record is stored), so the cursor moves
//! only past records JetStream has stored. A failed or late ack drops the
//! connection; the rest of the batch is offered again after a backoff and
//! published again with the same ids.
//!
//! Order: the server stores what one connection sends in the order sent,
//! so after a failure the records stored are a prefix of those published,
//! and publishing again from the first unacknowledged record keeps the
//! stream in order. To keep it so, the client reconnects at most once by
//! itself (immediately): publishes it still held would otherwise go out on
//! the new connection after ones lost with the old. A confirmed record
//! whose stream sequence is below the previous one's is logged (WARN
//! `stored out of order`).

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use weir_protocol::decoder::Delivered;

use super::dest_template::{self, Format, Template};
use super::{record_id, AsyncSink, BuildContext, Sink, SinkBuilder, SinkError};

/// Publish acknowledgements outstanding at once: enough to keep a LAN
/// server busy, small enough that a failure republishes little.
const WINDOW: usize = 1024;
/// The longest the server may take to acknowledge one publish, and to
/// accept a connection, before the connection is given up.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `nats://host[:port]` (4222), or several separated by commas.
    pub url: String,
    /// Subject template: fixed text with `{stream}` and `{key}` (`{tag}`,
    /// `{topic}`); in a value `/` becomes `.`, and spaces, `*` and `>` `_`.
    pub subject: String,
    /// The JetStream stream that must capture every subject.
    pub stream: String,
    /// Create `stream` (file storage, subjects: the template's fixed
    /// prefix and `>`) when it does not exist.
    #[serde(default)]
    pub create_stream: bool,
    /// `json` (default): the file sink's JSON object; `raw`: a message's
    /// payload or a bytes record's data as they are.
    #[serde(default)]
    pub format: Format,
}

impl Config {
    fn check(&self) -> Result<Template, String> {
        parse_servers(&self.url)?;
        let t = Template::parse(&self.subject).map_err(|e| format!("subject: {e}"))?;
        if let Some(bad) = self
            .subject
            .split('.')
            .find(|tok| tok.is_empty() || tok.contains([' ', '\t', '*', '>']))
        {
            return Err(format!(
                "subject: `{}` has an empty token or a wildcard (`{bad}`); e.g. \"it.{{stream}}\"",
                self.subject
            ));
        }
        if self.stream.is_empty()
            || self
                .stream
                .contains(|c: char| c.is_whitespace() || ".*>/\\".contains(c))
        {
            return Err(format!(
                "stream: `{}` is not a JetStream stream name (no spaces, `.`, `*`, `>`, `/`)",
                self.stream
            ));
        }
        if self.create_stream && !t.is_fixed() && stream_subject(&t).is_none() {
            return Err(format!(
                "create_stream: the subject `{}` starts with a placeholder, so no subject filter can be derived; give it a fixed first token (\"it.{{stream}}\") or create the stream yourself",
                self.subject
            ));
        }
        Ok(t)
    }
}

/// `nats://h:p,nats://h2:p` as the client's server list.
fn parse_servers(url: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    url.split(',')
        .map(|u| {
            let u = u.trim();
            if !["nats://", "tls://"].iter().any(|p| u.starts_with(p)) {
                return Err(format!(
                    "url: `{u}` must start with nats:// or tls:// (e.g. \"nats://127.0.0.1:4222\")"
                ));
            }
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("url: `{u}` is not a server address: {e}"))
        })
        .collect()
}

/// The subject filter of a stream weir creates: the template itself when
/// fixed, else its fixed leading tokens and `>`.
fn stream_subject(t: &Template) -> Option<String> {
    let prefix = t.prefix();
    let fixed = prefix.rsplit_once('.').map(|(head, _)| head)?;
    (!fixed.is_empty()).then(|| format!("{fixed}.>"))
}

/// Appends `value` as subject tokens: `/` separates tokens like `.`, an
/// empty token becomes `_`, and characters a token cannot hold become `_`.
fn subject_value(value: &str, out: &mut String) {
    for (i, tok) in value.split(['/', '.']).enumerate() {
        if i > 0 {
            out.push('.');
        }
        if tok.is_empty() {
            out.push('_');
        }
        out.extend(tok.chars().map(|c| {
            if c.is_whitespace() || c == '*' || c == '>' {
                '_'
            } else {
                c
            }
        }));
    }
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "nats";

    fn validate(&self) -> Result<(), String> {
        self.check().map(|_| ())
    }

    /// Connects in the first `write`, not here.
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        let template = self
            .check()
            .map_err(|e| anyhow!("sinks.{}: {e}", ctx.name()))?;
        ctx.async_sink(NatsSink {
            name: ctx.name().to_string(),
            cfg: self.clone(),
            template,
            conn: None,
            last_stream_seq: 0,
            payload: Vec::with_capacity(512),
        })
    }
}

struct Connection {
    client: async_nats::Client,
    js: jetstream::Context,
    max_payload: usize,
}

pub struct NatsSink {
    name: String,
    cfg: Config,
    template: Template,
    conn: Option<Connection>,
    /// The stream sequence of the last confirmed publish, to notice
    /// records stored out of order.
    last_stream_seq: u64,
    payload: Vec<u8>,
}

impl NatsSink {
    /// Connects and checks that the stream exists (or creates it).
    async fn connect(&self) -> Result<Connection> {
        let servers = parse_servers(&self.cfg.url).map_err(|e| anyhow!(e))?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("weir-{}", self.name))
            .connection_timeout(CONNECT_TIMEOUT)
            // One immediate reconnect, then the client gives up and this
            // sink connects anew (see the module comment: order).
            .max_reconnects(1)
            .reconnect_delay_callback(|_| Duration::ZERO)
            .connect(servers)
            .await
            .with_context(|| {
                format!(
                    "connecting to NATS at {} (check `url` and that the server is up)",
                    self.cfg.url
                )
            })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .max_ack_inflight(2 * WINDOW)
            .backpressure_on_inflight(true)
            .build(client.clone());
        match js.get_stream(&self.cfg.stream).await {
            Ok(mut s) => {
                let info = s.info().await.context("reading the stream's info")?;
                tracing::info!(sink = %self.name, stream = %self.cfg.stream,
                    duplicate_window_s = info.config.duplicate_window.as_secs(),
                    subjects = ?info.config.subjects, "nats sink connected");
            }
            Err(e) if is_not_found(&e) => {
                if !self.cfg.create_stream {
                    return Err(anyhow!(
                        "the JetStream stream `{}` does not exist on {}: create it (e.g. `nats stream add {} --subjects '{}'`), or set `create_stream = true` in this sink",
                        self.cfg.stream,
                        self.cfg.url,
                        self.cfg.stream,
                        self.subject_filter()
                    ));
                }
                js.create_stream(stream::Config {
                    name: self.cfg.stream.clone(),
                    subjects: vec![self.subject_filter()],
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating the JetStream stream `{}`", self.cfg.stream))?;
                tracing::info!(sink = %self.name, stream = %self.cfg.stream,
                    subjects = %self.subject_filter(), "created the JetStream stream");
            }
            Err(e) => {
                return Err(anyhow!(e).context(format!(
                    "looking up the JetStream stream `{}` (is JetStream enabled on the server?)",
                    self.cfg.stream
                )))
            }
        }
        let max_payload = client.server_info().max_payload;
        Ok(Connection {
            client,
            js,
            max_payload,
        })
    }

    fn subject_filter(&self) -> String {
        if self.template.is_fixed() {
            self.cfg.subject.clone()
        } else {
            stream_subject(&self.template).unwrap_or_else(|| ">".into())
        }
    }

    fn subject_of(&self, r: &Delivered) -> String {
        self.template.render(r, subject_value)
    }

    /// Publishes `records` on `conn`; `confirmed` gets how many from the
    /// start are stored, also when this fails.
    async fn publish_batch(
        &mut self,
        conn: &Connection,
        records: &[&Delivered],
        confirmed: &mut usize,
    ) -> Result<(), SinkError> {
        let mut acks = VecDeque::with_capacity(WINDOW);
        let mut result = Ok(());
        for (i, r) in records.iter().enumerate() {
            dest_template::payload(&mut self.payload, r, self.cfg.format);
            // Headers and subject fit in this margin.
            if self.payload.len() + 256 > conn.max_payload {
                result = Err(SinkError::Reject {
                    at: i,
                    reason: format!(
                        "a {}-byte payload is above the server's max_payload {}",
                        self.payload.len(),
                        conn.max_payload
                    ),
                });
                break;
            }
            if acks.len() >= WINDOW {
                if let Err(e) = self.await_ack(&mut acks, confirmed).await {
                    result = Err(e);
                    break;
                }
            }
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::copy_from_slice(&self.payload))
                .message_id(record_id(r))
                .expected_stream(&self.cfg.stream);
            match conn.js.send_publish(self.subject_of(r), publish).await {
                Ok(ack) => acks.push_back(ack),
                Err(e) => {
                    result = Err(SinkError::retry(anyhow!(e).context("publishing")));
                    break;
                }
            }
        }
        // Wait for what is outstanding; after a rejection too, so the
        // records before it count as confirmed.
        while !acks.is_empty() && !matches!(result, Err(SinkError::Retry { .. })) {
            if let Err(e) = self.await_ack(&mut acks, confirmed).await {
                result = Err(e);
            }
        }
        result
    }

    async fn await_ack(
        &mut self,
        acks: &mut VecDeque<jetstream::context::PublishAckFuture>,
        confirmed: &mut usize,
    ) -> Result<(), SinkError> {
        let ack = acks.pop_front().expect("an outstanding ack");
        match ack.await {
            Ok(a) => {
                if a.sequence < self.last_stream_seq && !a.duplicate {
                    tracing::warn!(sink = %self.name, stream_seq = a.sequence,
                        previous = self.last_stream_seq,
                        "a record was stored out of order (the connection was lost and the client resent publishes it held)");
                }
                self.last_stream_seq = self.last_stream_seq.max(a.sequence);
                *confirmed += 1;
                Ok(())
            }
            Err(e) => {
                let hint = match e.kind() {
                    PublishErrorKind::StreamNotFound => format!(
                        " (no JetStream stream captures this subject: check `subject` against the subjects of stream `{}`)",
                        self.cfg.stream
                    ),
                    PublishErrorKind::TimedOut => " (no acknowledgement in time)".into(),
                    _ => String::new(),
                };
                Err(SinkError::retry(anyhow!(
                    "JetStream publish to stream `{}` failed: {e}{hint}",
                    self.cfg.stream
                )))
            }
        }
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

impl AsyncSink for NatsSink {
    /// Confirms the records whose publish ack came, in order.
    async fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        if self.conn.as_ref().is_some_and(|c| {
            c.client.connection_state() != async_nats::connection::State::Connected
        }) {
            self.conn = None;
        }
        let conn = match self.conn.take() {
            Some(c) => c,
            None => self.connect().await.map_err(SinkError::retry)?,
        };
        let mut confirmed = 0;
        let result = self.publish_batch(&conn, records, &mut confirmed).await;
        match result {
            Ok(()) => {
                self.conn = Some(conn);
                Ok(records.len())
            }
            // A new connection next time: publishes the old one still
            // holds are lost with it, never sent late.
            Err(SinkError::Retry { error, .. }) => Err(SinkError::Retry { confirmed, error }),
            Err(e) => {
                self.conn = Some(conn);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::dest_template::tests::{point, record};

    fn config(extra: &str) -> Result<Template, String> {
        let c: Config = toml::from_str(&format!(
            "url = \"nats://127.0.0.1:4222\"\nstream = \"WEIR\"\n{extra}"
        ))
        .map_err(|e| e.to_string())?;
        c.check()
    }

    #[test]
    fn bad_keys_are_refused_naming_the_key() {
        assert!(config("subject = \"it.{stream}\"\ncreate_stream = true").is_ok());
        for (extra, key) in [
            ("subject = \"it.{nope}\"", "subject:"),
            ("subject = \"it..x\"", "subject:"),
            ("subject = \"it.*\"", "subject:"),
            (
                "subject = \"{stream}.x\"\ncreate_stream = true",
                "create_stream:",
            ),
        ] {
            let err = config(extra).unwrap_err();
            assert!(err.starts_with(key), "{extra}: {err}");
        }
        let c: Config =
            toml::from_str("url = \"http://h\"\nsubject = \"a\"\nstream = \"S\"").unwrap();
        assert!(c.check().unwrap_err().starts_with("url:"));
        let c: Config =
            toml::from_str("url = \"nats://h\"\nsubject = \"a\"\nstream = \"a.b\"").unwrap();
        assert!(c.check().unwrap_err().starts_with("stream:"));
    }

    #[test]
    fn subjects_map_slashes_to_tokens_and_a_created_stream_captures_them() {
        let t = config("subject = \"it.{stream}.{tag}\"").unwrap();
        let r = record(point("G/E 1/*"));
        assert_eq!(t.render(&r, subject_value), "it.plant.line1.G.E_1._");
        assert_eq!(stream_subject(&t).as_deref(), Some("it.>"));
        let t = config("subject = \"weir.all\"").unwrap();
        assert!(t.is_fixed());
        let m = weir_protocol::Message::new("/a//b", vec![], 0);
        let mut s = String::new();
        subject_value(
            crate::sinks::dest_template::key_name(&record(weir_protocol::RecordBody::Message(m))),
            &mut s,
        );
        assert_eq!(s, "_.a._.b");
    }
}
