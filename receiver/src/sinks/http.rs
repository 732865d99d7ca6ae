//! `http`: POSTs batches of records to a URL, each record the JSON object
//! the file sink writes, as one JSON array (`format = "json"`) or as
//! newline-delimited JSON (`format = "ndjson"`).
//!
//! A 2xx answer confirms the request's records. A connection error, a
//! timeout, a 5xx, 408 or 429 is retried with backoff (by delivery). Any
//! other 4xx means the request can never succeed: the request is split in
//! halves until the one record the server refuses is found, which goes to
//! the dead-letter file with the status and the response body; the records
//! around it are delivered. The guarantee is at least once: a server that
//! committed a request and then failed to answer gets it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use weir_ops::reload::Reloadable;
use weir_protocol::decoder::Delivered;
use weir_protocol::units::parse_size;

use super::{json_line, AsyncSink, BuildContext, Sink, SinkBuilder, SinkError};

/// The longest a TCP (and TLS) connection may take to be set up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a refusing server's response body is kept for the
/// dead-letter file and the log.
const MAX_RESPONSE_KEPT: usize = 2048;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `http://` or `https://` URL the batches are POSTed to.
    pub url: String,
    /// `json` (one JSON array per request) or `ndjson` (one object a line).
    #[serde(default = "default_format")]
    pub format: String,
    /// Extra request headers, e.g. `{ "X-Api-Key" = "..." }`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// File holding a bearer token (one line, mode 0600), read at start and
    /// on SIGHUP, sent as `Authorization: Bearer <token>`.
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    /// PEM CA file for `https://` (default: the system's roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Largest request body; a batch is split into requests of at most
    /// this (a single larger record is sent alone).
    #[serde(
        default = "default_max_request",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub max_request_bytes: String,
    /// The longest a request may take, answer included.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

fn default_format() -> String {
    "json".into()
}
fn default_max_request() -> String {
    "1MiB".into()
}
fn default_timeout() -> u64 {
    30
}

/// Reads a one-line secret (a password, a token) from the file that
/// configuration key `key` names: a regular file that group and others
/// cannot access, one non-empty line (a trailing newline is dropped).
pub(crate) fn read_secret_file(path: &Path, key: &str) -> Result<String, String> {
    weir_store::secret::read_secret_line(path, key).map_err(|e| format!("{e:#}"))
}

impl Config {
    fn headers(&self) -> Result<HeaderMap, String> {
        let mut map = HeaderMap::new();
        for (k, v) in &self.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("headers: `{k}` is not a valid header name"))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("headers.{k}: the value is not a valid header value"))?;
            if name == AUTHORIZATION && self.bearer_token_file.is_some() {
                return Err(format!(
                    "headers.{k}: is set together with `bearer_token_file`; keep one"
                ));
            }
            map.insert(name, value);
        }
        if let Some(p) = &self.bearer_token_file {
            let token = read_secret_file(p, "bearer_token_file")?;
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                format!(
                    "bearer_token_file: {} holds characters a header cannot carry",
                    p.display()
                )
            })?;
            value.set_sensitive(true);
            map.insert(AUTHORIZATION, value);
        }
        if !map.contains_key(CONTENT_TYPE) {
            let ct = if self.format == "ndjson" {
                "application/x-ndjson"
            } else {
                "application/json"
            };
            map.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        Ok(map)
    }

    fn client(&self) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(Duration::from_secs(self.timeout_s))
            .default_headers(self.headers()?);
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("ca_file: cannot read {} ({e})", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("ca_file: {} is not a PEM certificate ({e})", ca.display()))?;
            b = b.add_root_certificate(cert);
        }
        b.build()
            .map_err(|e| format!("url: cannot set up the HTTP client: {e}"))
    }

    fn check(&self) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| {
            format!(
                "url: `{}` is not a URL ({e}); e.g. \"https://ingest.example/weir\"",
                self.url
            )
        })?;
        if !["http", "https"].contains(&url.scheme()) {
            return Err(format!(
                "url: `{}` must start with http:// or https://",
                self.url
            ));
        }
        if self.ca_file.is_some() && url.scheme() != "https" {
            return Err(format!(
                "ca_file: is set but `url` {} is not https://",
                self.url
            ));
        }
        if !["json", "ndjson"].contains(&self.format.as_str()) {
            return Err(format!(
                "format: `{}` must be \"json\" (a JSON array per request) or \"ndjson\" (one object a line)",
                self.format
            ));
        }
        let max =
            parse_size(&self.max_request_bytes).map_err(|e| format!("max_request_bytes: {e}"))?;
        if !(1024..=(256 << 20)).contains(&max) {
            return Err(format!(
                "max_request_bytes: {} must be between 1KiB and 256MiB",
                self.max_request_bytes
            ));
        }
        if !(1..=3600).contains(&self.timeout_s) {
            return Err(format!(
                "timeout_s: {} must be between 1 and 3600",
                self.timeout_s
            ));
        }
        self.client().map(|_| ())
    }
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "http";

    fn validate(&self) -> Result<(), String> {
        self.check()
    }

    /// Sends nothing here: the first request is the first `write`.
    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        self.check().map_err(|e| anyhow!(e))?;
        // The token and the CA file are in the client (its default
        // headers, its roots): SIGHUP builds a new client, which the next
        // request uses. reqwest's client is made inside the runtime it
        // will run on.
        let runtime = ctx.runtime()?;
        let files = [
            ("bearer_token_file", &self.bearer_token_file),
            ("ca_file", &self.ca_file),
        ]
        .into_iter()
        .filter_map(|(k, p)| p.as_deref().map(|p| (k, p)))
        .collect();
        let cfg = self.clone();
        let client = ctx.reloadable(files, move || {
            let _entered = runtime.enter();
            cfg.client().map_err(|e| anyhow!(e))
        })?;
        ctx.async_sink(HttpSink {
            client,
            url: self.url.clone(),
            ndjson: self.format == "ndjson",
            max_request: parse_size(&self.max_request_bytes).expect("checked") as usize,
            split: None,
            body: Vec::new(),
        })
    }
}

struct HttpSink {
    /// Rebuilt when SIGHUP re-reads `bearer_token_file` or `ca_file`.
    client: Arc<Reloadable<reqwest::Client>>,
    url: String,
    ndjson: bool,
    max_request: usize,
    /// Records per request while a refused request is being split to find
    /// the record the server refuses; `None` otherwise.
    split: Option<usize>,
    body: Vec<u8>,
}

/// What a request came to.
enum Outcome {
    Confirmed,
    /// The server refuses this request for good (a 4xx other than 408/429).
    Refused(String),
}

impl HttpSink {
    /// Fills `body` with as many of `records` as fit (at least one, at
    /// most `limit`); returns how many.
    fn fill(&mut self, records: &[&Delivered], limit: usize) -> usize {
        self.body.clear();
        if !self.ndjson {
            self.body.push(b'[');
        }
        let mut n = 0;
        let mut line = Vec::with_capacity(256);
        for r in records.iter().take(limit) {
            line.clear();
            json_line::write_record(&mut line, r);
            if n > 0 && self.body.len() + line.len() + 2 > self.max_request {
                break;
            }
            if !self.ndjson && n > 0 {
                self.body.push(b',');
            }
            self.body.extend_from_slice(&line);
            if self.ndjson {
                self.body.push(b'\n');
            }
            n += 1;
        }
        if !self.ndjson {
            self.body.push(b']');
        }
        n
    }

    async fn post(&self) -> Result<Outcome> {
        let response = self
            .client
            .get()
            .post(&self.url)
            .body(self.body.clone())
            .send()
            .await
            .map_err(|e| anyhow!("POST {}: {}", self.url, error_chain(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(Outcome::Confirmed);
        }
        let text = response.bytes().await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text[..text.len().min(MAX_RESPONSE_KEPT)]);
        let what = format!("HTTP {status} from {}: {}", self.url, text.trim());
        let retryable = status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || !status.is_client_error();
        if retryable {
            Err(anyhow!(what))
        } else {
            Ok(Outcome::Refused(what))
        }
    }
}

/// An error with its sources (reqwest's own message says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

impl AsyncSink for HttpSink {
    async fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        let mut done = 0;
        while done < records.len() {
            let limit = self.split.unwrap_or(usize::MAX);
            let n = self.fill(&records[done..], limit);
            match self.post().await {
                Ok(Outcome::Confirmed) => done += n,
                Ok(Outcome::Refused(reason)) if n == 1 => {
                    self.split = None;
                    return Err(SinkError::Reject { at: done, reason });
                }
                // Halve the request until the refused record is alone.
                Ok(Outcome::Refused(_)) => self.split = Some(n / 2),
                Err(error) => {
                    return Err(SinkError::Retry {
                        confirmed: done,
                        error,
                    })
                }
            }
        }
        self.split = None;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        toml::from_str(&format!("url = \"http://127.0.0.1:9/in\"\n{extra}")).unwrap()
    }

    #[test]
    fn keys_are_checked_naming_the_key_to_fix() {
        assert!(cfg("").check().is_ok());
        assert!(cfg("format = \"xml\"")
            .check()
            .unwrap_err()
            .starts_with("format:"));
        assert!(cfg("headers = { \"bad name\" = \"x\" }")
            .check()
            .unwrap_err()
            .starts_with("headers:"));
        assert!(cfg("timeout_s = 0")
            .check()
            .unwrap_err()
            .starts_with("timeout_s:"));
        let bad: Config = toml::from_str("url = \"ftp://x/\"").unwrap();
        assert!(bad.check().unwrap_err().starts_with("url:"));
        let err = cfg("bearer_token_file = \"/nonexistent/token\"")
            .check()
            .unwrap_err();
        assert!(err.starts_with("bearer_token_file: cannot open"), "{err}");
    }

    #[test]
    fn a_token_file_others_can_read_is_refused_and_a_private_one_is_sent_as_bearer() {
        use std::os::unix::fs::PermissionsExt;
        let p = std::env::temp_dir().join(format!("weir-http-token-{}", std::process::id()));
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = cfg(&format!("bearer_token_file = \"{}\"", p.display()));
        assert!(c.check().unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let h = c.headers().unwrap();
        assert_eq!(h[AUTHORIZATION], "Bearer s3cret");
        assert_eq!(h[CONTENT_TYPE], "application/json");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_batch_is_a_json_array_or_ndjson_of_the_file_sinks_objects_split_by_size() {
        let recs: Vec<Delivered> = (0..3)
            .map(|i| Delivered {
                stream: "s".into(),
                source_type: "t".into(),
                session: 1,
                epoch: 1,
                seq: i,
                resent: false,
                body: weir_protocol::RecordBody::Point(weir_protocol::Point {
                    tag: "t".repeat(800),
                    ts_ns: 1_700_000_000_000_000_000,
                    value: weir_protocol::Value::F64(1.5),
                    quality: 0,
                    status: None,
                }),
            })
            .collect();
        let refs: Vec<&Delivered> = recs.iter().collect();
        let mut sink = HttpSink {
            client: Reloadable::new(vec![], || Ok(reqwest::Client::new())).unwrap(),
            url: String::new(),
            ndjson: false,
            max_request: 2048,
            split: None,
            body: Vec::new(),
        };
        let mut one = Vec::new();
        json_line::write_record(&mut one, &recs[0]);
        assert_eq!(
            sink.fill(&refs, usize::MAX),
            2,
            "two ~850-byte records fit 2 KiB"
        );
        let v: serde_json::Value = serde_json::from_slice(&sink.body).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert!(sink.body[1..].starts_with(&one));
        sink.ndjson = true;
        assert_eq!(sink.fill(&refs, 1), 1);
        assert_eq!(sink.body, [one.as_slice(), b"\n"].concat());
    }
}
