//! `syslog`: forwards `Log` records as RFC 5424 messages to a collector
//! (a SIEM) over UDP (one datagram each) or TCP (octet-counted framing,
//! RFC 6587), keeping each message's original timestamp, host, app,
//! proc id, msg id and structured data. A log that arrived unparsed
//! (`parse_error` set) goes as its raw text with the reason in an
//! `[weir@32473 parse_error="..."]` element (32473 is the enterprise
//! number RFC 5612 reserves for examples). Records of other kinds have
//! no syslog form: each is rejected to the dead-letter file (counted in
//! the sink's `dead_letters`); route only log streams here with `streams`.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::decoder::Delivered;
use weir_protocol::{Log, RecordBody};

use super::{BuildContext, Sink, SinkBuilder, SinkError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `udp://host:port` or `tcp://host:port` of the collector.
    pub target: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Udp(SocketAddr),
    Tcp(SocketAddr),
}

/// `udp://ip:port` or `tcp://ip:port`; a host name is resolved once here.
pub fn parse_target(s: &str) -> Result<Target, String> {
    use std::net::ToSocketAddrs;
    let (scheme, addr) = s
        .split_once("://")
        .ok_or_else(|| format!("target: `{s}` must be udp://host:port or tcp://host:port"))?;
    let addr = addr
        .to_socket_addrs()
        .map_err(|e| format!("target: `{addr}` is not a host:port ({e})"))?
        .next()
        .ok_or_else(|| format!("target: `{addr}` resolves to no address"))?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(format!("target: {addr} must be a concrete host:port"));
    }
    match scheme {
        "udp" => Ok(Target::Udp(addr)),
        "tcp" => Ok(Target::Tcp(addr)),
        other => Err(format!(
            "target: scheme `{other}` is not udp or tcp (TLS is not supported yet)"
        )),
    }
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "syslog";

    fn validate(&self) -> Result<(), String> {
        parse_target(&self.target).map(|_| ())
    }

    fn build(&self, ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        Ok(Box::new(SyslogSink::new(self, ctx.name())?))
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

enum Conn {
    Udp(UdpSocket),
    Tcp(std::io::BufWriter<TcpStream>),
}

pub struct SyslogSink {
    name: String,
    target: Target,
    conn: Option<Conn>,
    msg: Vec<u8>,
    frame: Vec<u8>,
}

impl SyslogSink {
    pub fn new(cfg: &Config, name: &str) -> Result<Self> {
        let target = parse_target(&cfg.target).map_err(|e| anyhow::anyhow!("sinks.{name}: {e}"))?;
        Ok(SyslogSink {
            name: name.to_string(),
            target,
            conn: None,
            msg: Vec::with_capacity(1024),
            frame: Vec::with_capacity(1024),
        })
    }

    fn conn(&mut self) -> Result<&mut Conn> {
        if self.conn.is_none() {
            let conn = match self.target {
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
                    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| {
                        format!("connecting to {addr} (check `target` and that the collector is up)")
                    })?;
                    // See the tcp sink: a connection that reached itself is no collector.
                    if s.local_addr().ok() == Some(addr) {
                        anyhow::bail!("connecting to {addr}: the connection reached itself (no collector is listening there)");
                    }
                    s.set_nodelay(true).ok();
                    tracing::info!(sink = %self.name, collector = %addr, "syslog sink connected");
                    Conn::Tcp(std::io::BufWriter::with_capacity(1 << 20, s))
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
        matches!(self.target, Target::Tcp(_))
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
        for bad in ["127.0.0.1:514", "tls://127.0.0.1:6514", "udp://0.0.0.0:514"] {
            assert!(
                parse_target(bad).unwrap_err().starts_with("target: "),
                "{bad}"
            );
        }
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
