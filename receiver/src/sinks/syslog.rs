//! `syslog`: forwards `Log` records as RFC 5424 messages to a collector
//! (a SIEM) over UDP (one datagram each), TCP (octet-counted framing,
//! RFC 6587) or TLS (octet-counted, RFC 5425), keeping each message's
//! original timestamp, host, app, proc id, msg id and structured data. A
//! log that arrived unparsed (`parse_error` set) goes as its raw text with
//! the reason in an `[weir@32473 parse_error="..."]` element (32473 is the
//! enterprise number RFC 5612 reserves for examples). Records of other
//! kinds have no syslog form: each is rejected to the dead-letter file
//! (counted in the sink's `dead_letters`); route only log streams here
//! with `streams`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls;
use weir_ops::reload::Reloadable;
use weir_protocol::decoder::Delivered;
use weir_protocol::{Log, RecordBody};

use super::{BuildContext, Sink, SinkBuilder, SinkError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `udp://host:port`, `tcp://host:port` or `tls://host:port` of the collector.
    pub target: String,
    /// TLS: the CA certificates (PEM) that sign the collector's
    /// certificate; Debian's system roots when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// TLS: the name the collector's certificate must carry, when it is
    /// not the host in `target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// TLS client authentication (mutual TLS): this sink's certificate
    /// chain (PEM) and its private key (PEM, mode 0600); both or neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

/// The CA bundle a `tls://` target trusts when `tls_ca_file` is not set.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Udp(SocketAddr),
    Tcp(SocketAddr),
    /// The address, and the host as written (the name the collector's
    /// certificate is checked against).
    Tls(SocketAddr, String),
}

/// `udp://`, `tcp://` or `tls://` then `host:port`; a host name is
/// resolved once here.
pub fn parse_target(s: &str) -> Result<Target, String> {
    use std::net::ToSocketAddrs;
    let (scheme, hostport) = s.split_once("://").ok_or_else(|| {
        format!("target: `{s}` must be udp://host:port, tcp://host:port or tls://host:port")
    })?;
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("target: `{hostport}` is not a host:port ({e})"))?
        .next()
        .ok_or_else(|| format!("target: `{hostport}` resolves to no address"))?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(format!("target: {addr} must be a concrete host:port"));
    }
    match scheme {
        "udp" => Ok(Target::Udp(addr)),
        "tcp" => Ok(Target::Tcp(addr)),
        "tls" => {
            let host = hostport
                .rsplit_once(':')
                .map_or(hostport, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            Ok(Target::Tls(addr, host.to_string()))
        }
        other => Err(format!("target: scheme `{other}` is not udp, tcp or tls")),
    }
}

impl Config {
    /// The TLS client settings of a `tls://` target, read from their files.
    fn tls_client(
        &self,
        host: &str,
    ) -> Result<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )> {
        let ca = self
            .tls_ca_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE));
        let mut roots = rustls::RootCertStore::empty();
        for cert in weir_store::secret::read_pem_certs(&ca, "tls_ca_file")? {
            roots.add(cert).map_err(|e| {
                anyhow::anyhow!(
                    "tls_ca_file: a certificate in {} is not usable as a CA ({e})",
                    ca.display()
                )
            })?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
        let config = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    weir_store::secret::read_pem_certs(cert, "tls_cert_file")?,
                    weir_store::secret::read_pem_key(key, "tls_key_file")?,
                )
                .context("tls_cert_file / tls_key_file: the key does not fit the certificate")?,
            _ => builder.with_no_client_auth(),
        };
        let name = self.tls_server_name.as_deref().unwrap_or(host);
        let server_name =
            rustls::pki_types::ServerName::try_from(name.to_string()).map_err(|e| {
                anyhow::anyhow!("tls_server_name: `{name}` is not a DNS name or IP address ({e})")
            })?;
        Ok((Arc::new(config), server_name))
    }
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "syslog";

    fn validate(&self) -> Result<(), String> {
        let tls = matches!(parse_target(&self.target)?, Target::Tls(..));
        if !tls {
            for (key, set) in [
                ("tls_ca_file", self.tls_ca_file.is_some()),
                ("tls_server_name", self.tls_server_name.is_some()),
                ("tls_cert_file", self.tls_cert_file.is_some()),
                ("tls_key_file", self.tls_key_file.is_some()),
            ] {
                if set {
                    return Err(format!(
                        "{key}: only for a tls:// target; `target` is {}",
                        self.target
                    ));
                }
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(
                "tls_cert_file and tls_key_file: set both (client authentication) or neither"
                    .into(),
            );
        }
        Ok(())
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        Ok(Box::new(SyslogSink::new(self, ctx)?))
    }
}

/// A header field as RFC 5424 allows it: printable ASCII (anything else
/// becomes `_`), at most `max` characters, `-` when empty.
fn write_header_field(out: &mut Vec<u8>, v: &str, max: usize) {
    if v.is_empty() {
        out.push(b'-');
        return;
    }
    for c in v.chars().take(max) {
        out.push(if ('!'..='~').contains(&c) {
            c as u8
        } else {
            b'_'
        });
    }
}

/// An SD-ID or SD-NAME: printable ASCII except `= ] "` and space, at most 32.
fn write_sd_name(out: &mut Vec<u8>, v: &str) {
    if v.is_empty() {
        out.push(b'_');
    }
    for c in v.chars().take(32) {
        let ok = ('!'..='~').contains(&c) && !matches!(c, '=' | ']' | '"');
        out.push(if ok { c as u8 } else { b'_' });
    }
}

/// A PARAM-VALUE: UTF-8 with `"`, `\` and `]` escaped by a backslash.
fn write_sd_value(out: &mut Vec<u8>, v: &str) {
    for b in v.bytes() {
        if matches!(b, b'"' | b'\\' | b']') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Writes `log` as one RFC 5424 message (no framing): PRI, version 1,
/// the timestamp in UTC to the microsecond, host, app, proc id, msg id,
/// structured data, and the text (without a BOM).
pub fn format_rfc5424(out: &mut Vec<u8>, log: &Log) {
    let pri = u16::from(log.facility.min(23)) * 8 + u16::from(log.severity.min(7));
    write!(out, "<{pri}>1 ").expect("vec");
    // RFC 5424 allows six digits of a second.
    let micros = log.ts_ns.div_euclid(1000);
    match chrono::DateTime::from_timestamp_micros(micros) {
        Some(t) if t.timestamp() >= 0 => {
            write!(out, "{}", t.format("%Y-%m-%dT%H:%M:%S%.6fZ")).expect("vec")
        }
        _ => out.push(b'-'),
    }
    out.push(b' ');
    write_header_field(out, &log.host, 255);
    out.push(b' ');
    write_header_field(out, &log.app, 48);
    out.push(b' ');
    write_header_field(out, &log.proc_id, 128);
    out.push(b' ');
    write_header_field(out, &log.msg_id, 32);
    out.push(b' ');
    if log.structured_data.is_empty() && log.parse_error.is_none() {
        out.push(b'-');
    }
    for e in &log.structured_data {
        out.push(b'[');
        write_sd_name(out, &e.id);
        for (k, v) in &e.params {
            out.push(b' ');
            write_sd_name(out, k);
            out.extend_from_slice(b"=\"");
            write_sd_value(out, v);
            out.push(b'"');
        }
        out.push(b']');
    }
    if let Some(why) = &log.parse_error {
        out.extend_from_slice(b"[weir@32473 parse_error=\"");
        write_sd_value(out, why);
        out.extend_from_slice(b"\"]");
    }
    if !log.text.is_empty() {
        out.push(b' ');
        out.extend_from_slice(log.text.as_bytes());
    }
}

/// Largest UDP payload over IPv4; a longer message is cut to it (the
/// collector sees the start of it) and counted in the log line.
const MAX_DATAGRAM: usize = 65_507;

/// A `tls://` target's client settings and the name its certificate
/// must carry.
type TlsClient = (
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
);

/// A TCP connection, plain or TLS.
type Stream = Box<dyn Write + Send>;

enum Conn {
    Udp(UdpSocket),
    Tcp(std::io::BufWriter<Stream>),
}

pub struct SyslogSink {
    name: String,
    target: Target,
    /// For a `tls://` target: the client settings and the name checked,
    /// built from the TLS files at start and on SIGHUP; each new
    /// connection takes the current ones.
    tls: Option<Arc<Reloadable<TlsClient>>>,
    conn: Option<Conn>,
    msg: Vec<u8>,
    frame: Vec<u8>,
}

impl SyslogSink {
    pub fn new(cfg: &Config, ctx: &BuildContext) -> Result<Self> {
        let name = ctx.name();
        let target = parse_target(&cfg.target).map_err(|e| anyhow::anyhow!("sinks.{name}: {e}"))?;
        let tls = match &target {
            Target::Tls(_, host) => {
                let ca = cfg
                    .tls_ca_file
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE));
                let mut files = vec![("tls_ca_file", ca.as_path())];
                if let (Some(c), Some(k)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
                    files.extend([
                        ("tls_cert_file", c.as_path()),
                        ("tls_key_file", k.as_path()),
                    ]);
                }
                let (c, host) = (cfg.clone(), host.clone());
                let tls = ctx
                    .reloadable(files, move || c.tls_client(&host))
                    .map_err(|e| anyhow::anyhow!("sinks.{name}: {e:#}"))?;
                Some(tls)
            }
            _ => None,
        };
        Ok(SyslogSink {
            name: name.to_string(),
            target,
            tls,
            conn: None,
            msg: Vec::with_capacity(1024),
            frame: Vec::with_capacity(1024),
        })
    }

    fn conn(&mut self) -> Result<&mut Conn> {
        if self.conn.is_none() {
            let conn = match self.target.clone() {
                Target::Udp(addr) => {
                    let bind: SocketAddr = if addr.is_ipv4() {
                        "0.0.0.0:0".parse().expect("addr")
                    } else {
                        "[::]:0".parse().expect("addr")
                    };
                    let s = UdpSocket::bind(bind).context("binding a udp socket")?;
                    s.connect(addr)
                        .with_context(|| format!("connecting udp to {addr} (check `target`)"))?;
                    Conn::Udp(s)
                }
                Target::Tcp(addr) => {
                    let s = connect_tcp(addr)?;
                    tracing::info!(sink = %self.name, collector = %addr, "syslog sink connected");
                    Conn::Tcp(std::io::BufWriter::with_capacity(1 << 20, Box::new(s)))
                }
                Target::Tls(addr, _) => {
                    let (config, server_name) =
                        (*self.tls.as_ref().expect("built for a tls target").get()).clone();
                    let s = tls_handshake(connect_tcp(addr)?, addr, config, server_name)?;
                    tracing::info!(sink = %self.name, collector = %addr, "syslog sink connected (tls)");
                    Conn::Tcp(std::io::BufWriter::with_capacity(1 << 20, Box::new(s)))
                }
            };
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn send(&mut self) -> Result<()> {
        let mut msg = std::mem::take(&mut self.msg);
        let mut frame = std::mem::take(&mut self.frame);
        let name = self.name.clone();
        let result = match self.conn() {
            Ok(Conn::Udp(s)) => {
                if msg.len() > MAX_DATAGRAM {
                    tracing::warn!(sink = %name, bytes = msg.len(), "message longer than a UDP datagram holds: cut to {MAX_DATAGRAM} bytes; use a tcp:// target for long messages");
                    msg.truncate(MAX_DATAGRAM);
                }
                s.send(&msg).map(|_| ()).context("sending to the collector")
            }
            Ok(Conn::Tcp(w)) => {
                frame.clear();
                write!(frame, "{} ", msg.len()).expect("vec");
                frame.extend_from_slice(&msg);
                w.write_all(&frame).context("writing to the collector")
            }
            Err(e) => Err(e),
        };
        self.msg = msg;
        self.frame = frame;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// Over TCP, pushes what is buffered to the collector.
    fn flush(&mut self) -> Result<()> {
        if let Some(Conn::Tcp(w)) = &mut self.conn {
            if let Err(e) = w.flush() {
                self.conn = None;
                return Err(anyhow::anyhow!("flushing to the collector: {e}"));
            }
        }
        Ok(())
    }
}

/// Longest a connect or a TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn connect_tcp(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).with_context(|| {
        format!("connecting to {addr} (check `target` and that the collector is up)")
    })?;
    // See the tcp sink: a connection that reached itself is no collector.
    if s.local_addr().ok() == Some(addr) {
        anyhow::bail!(
            "connecting to {addr}: the connection reached itself (no collector is listening there)"
        );
    }
    s.set_nodelay(true).ok();
    Ok(s)
}

/// Completes the TLS handshake before anything is written, so a collector
/// whose certificate is not trusted is named at connect.
fn tls_handshake(
    mut sock: TcpStream,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server_name: rustls::pki_types::ServerName<'static>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let shown = server_name.to_str().into_owned();
    let mut conn =
        rustls::ClientConnection::new(config, server_name).context("starting a TLS session")?;
    sock.set_read_timeout(Some(CONNECT_TIMEOUT)).ok();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).with_context(|| {
            format!(
                "TLS handshake with {addr} as `{shown}` (check that tls_ca_file signs the collector's \
                 certificate, that it names `{shown}` (tls_server_name), and for client authentication \
                 tls_cert_file)"
            )
        })?;
    }
    // Writes only from here on; the collector sends nothing back.
    sock.set_read_timeout(None).ok();
    Ok(rustls::StreamOwned::new(conn, sock))
}

impl Sink for SyslogSink {
    /// Sends each log; over TCP the batch is confirmed once its flush
    /// succeeds, over UDP each record once the kernel took its datagram.
    fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        let udp = matches!(self.target, Target::Udp(_));
        for (i, r) in records.iter().enumerate() {
            let RecordBody::Log(log) = &r.body else {
                // The records before it are confirmed by the reject: flush them first.
                self.flush().map_err(SinkError::retry)?;
                return Err(SinkError::Reject {
                    at: i,
                    reason: format!(
                        "a {} record has no syslog form; the syslog sink takes log records (route other streams elsewhere with `streams`)",
                        r.body.kind()
                    ),
                });
            };
            self.msg.clear();
            format_rfc5424(&mut self.msg, log);
            if let Err(error) = self.send() {
                let confirmed = if udp { i } else { 0 };
                return Err(SinkError::Retry { confirmed, error });
            }
        }
        self.flush().map_err(SinkError::retry)?;
        Ok(records.len())
    }

    /// Over TCP the collector may have lost what the kernel had accepted:
    /// the previous batch goes again (at least once). Over UDP what was
    /// sent is gone either way; a failed send is retried from the record
    /// that failed.
    fn unconfirmed_loss(&mut self) -> bool {
        !matches!(self.target, Target::Udp(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use weir_protocol::SdElement;

    fn log() -> Log {
        Log {
            facility: 20,
            severity: 5,
            host: "mymachine.example.com".into(),
            app: "evntslog".into(),
            text: "An application event".into(),
            // 2003-10-11T22:14:15.003Z
            ts_ns: 1_065_910_455_003_000_000,
            proc_id: "42".into(),
            msg_id: "ID47".into(),
            structured_data: vec![SdElement {
                id: "exampleSDID@32473".into(),
                params: vec![
                    ("iut".into(), "3".into()),
                    ("eventSource".into(), "Appli\"ca\\tion]".into()),
                ],
            }],
            parse_error: None,
        }
    }

    fn formatted(l: &Log) -> String {
        let mut out = Vec::new();
        format_rfc5424(&mut out, l);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_log_formats_as_rfc5424_with_its_timestamp_host_and_escaped_sd() {
        assert_eq!(
            formatted(&log()),
            r#"<165>1 2003-10-11T22:14:15.003000Z mymachine.example.com evntslog 42 ID47 [exampleSDID@32473 iut="3" eventSource="Appli\"ca\\tion\]"] An application event"#
        );
    }

    #[test]
    fn empty_fields_are_nil_and_bad_characters_replaced() {
        let mut l = log();
        l.host = "bad host\u{e9}".into();
        l.app.clear();
        l.proc_id.clear();
        l.msg_id.clear();
        l.structured_data.clear();
        l.text.clear();
        assert_eq!(
            formatted(&l),
            "<165>1 2003-10-11T22:14:15.003000Z bad_host_ - - - -"
        );
    }

    #[test]
    fn an_unparsed_log_carries_its_reason_in_sd() {
        let mut l = log();
        l.structured_data.clear();
        l.parse_error = Some("no <PRI> at the start".into());
        l.text = "garbage ] line".into();
        assert_eq!(
            formatted(&l),
            r#"<165>1 2003-10-11T22:14:15.003000Z mymachine.example.com evntslog 42 ID47 [weir@32473 parse_error="no <PRI> at the start"] garbage ] line"#
        );
    }

    #[test]
    fn targets_need_a_scheme_and_name_the_key() {
        assert_eq!(
            parse_target("tcp://127.0.0.1:6514"),
            Ok(Target::Tcp("127.0.0.1:6514".parse().unwrap()))
        );
        assert_eq!(
            parse_target("tls://127.0.0.1:6514"),
            Ok(Target::Tls(
                "127.0.0.1:6514".parse().unwrap(),
                "127.0.0.1".into()
            ))
        );
        assert_eq!(
            parse_target("tls://[::1]:6514"),
            Ok(Target::Tls("[::1]:6514".parse().unwrap(), "::1".into()))
        );
        for bad in ["127.0.0.1:514", "ssl://127.0.0.1:6514", "udp://0.0.0.0:514"] {
            assert!(
                parse_target(bad).unwrap_err().starts_with("target: "),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_collector_whose_certificate_the_ca_file_does_not_sign_is_refused_naming_the_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weir-syslog-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The collector's certificate is self-signed; tls_ca_file holds another CA.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "another CA");
        let other_ca = ca.self_signed(&other_key).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, other_ca.pem()).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                )
                .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            let mut conn = rustls::ServerConnection::new(server).unwrap();
            // The client aborts the handshake: an error here is expected.
            while conn.is_handshaking() {
                if conn.complete_io(&mut sock).is_err() {
                    break;
                }
            }
        });
        let cfg = Config {
            target: format!("tls://{addr}"),
            tls_ca_file: Some(ca_file),
            tls_server_name: None,
            tls_cert_file: None,
            tls_key_file: None,
        };
        assert_eq!(SinkBuilder::validate(&cfg), Ok(()));
        let mut sink = SyslogSink::new(&cfg, &BuildContext::new("siem")).unwrap();
        let r = Delivered {
            stream: "plc".into(),
            source_type: "syslog".into(),
            session: 1,
            epoch: 1,
            seq: 1,
            resent: false,
            body: RecordBody::Log(Box::new(log())),
        };
        match sink.write(&[&r]) {
            Err(SinkError::Retry {
                confirmed: 0,
                error,
            }) => {
                let e = format!("{error:#}");
                assert!(
                    e.contains("TLS handshake")
                        && e.contains("tls_ca_file")
                        && e.contains("UnknownIssuer"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        collector.join().unwrap();
        // A key file others can read is refused at start, naming the key.
        let key_file = dir.join("client.key");
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cert_file = dir.join("client.pem");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        let cfg = Config {
            tls_cert_file: Some(cert_file),
            tls_key_file: Some(key_file),
            ..cfg
        };
        let e = format!(
            "{:#}",
            SyslogSink::new(&cfg, &BuildContext::new("siem"))
                .err()
                .unwrap()
        );
        assert!(
            e.contains("sinks.siem: tls_key_file") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_keys_on_a_plain_target_and_half_a_client_identity_are_config_errors() {
        let base = Config {
            target: "tcp://127.0.0.1:514".into(),
            tls_ca_file: Some("/etc/ssl/certs/ca-certificates.crt".into()),
            tls_server_name: None,
            tls_cert_file: None,
            tls_key_file: None,
        };
        let e = SinkBuilder::validate(&base).unwrap_err();
        assert!(
            e.starts_with("tls_ca_file: only for a tls:// target"),
            "{e}"
        );
        let half = Config {
            target: "tls://127.0.0.1:6514".into(),
            tls_cert_file: Some("/x.pem".into()),
            ..base
        };
        let e = SinkBuilder::validate(&half).unwrap_err();
        assert!(e.contains("set both"), "{e}");
    }

    /// Reads back a PARAM-VALUE written by `write_sd_value`.
    fn unescape(s: &str) -> String {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                out.extend(chars.next());
            } else {
                out.push(c);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn sd_values_escape_and_read_back(v in "\\PC{0,40}", host in "\\PC{0,20}") {
            let mut l = log();
            l.structured_data[0].params = vec![("k".into(), v.clone())];
            l.host = host;
            let s = formatted(&l);
            // Header: PRI, version, time, then four printable fields.
            let fields: Vec<&str> = s.splitn(7, ' ').collect();
            for f in &fields[2..6] {
                prop_assert!(!f.is_empty() && f.chars().all(|c| ('!'..='~').contains(&c)), "{s}");
            }
            let sd = fields[6].strip_prefix("[exampleSDID@32473 k=\"").unwrap();
            // The value ends at the first unescaped quote.
            let mut end = 0;
            let b = sd.as_bytes();
            while b[end] != b'"' {
                end += if b[end] == b'\\' { 2 } else { 1 };
            }
            prop_assert_eq!(unescape(&sd[..end]), v);
            prop_assert_eq!(&sd[end..end + 2], "\"]");
        }
    }
}
