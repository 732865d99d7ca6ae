//! `syslog`: receives syslog messages (RFC 5424 and RFC 3164) on one UDP,
//! TCP or TLS (RFC 5425) address and hands each over as a `Log` record.
//! Over TCP and TLS a message is newline-framed or octet-counted (RFC
//! 6587), told apart per message; connections are served side by side. A message that does not
//! parse still becomes a `Log`: its raw text, `parse_error` saying why
//! (see [`parse`]). Parse errors, truncated messages and kernel drops are
//! counted in the source's status in the metrics file.

pub mod parse;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::FixedOffset;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls;
use weir_protocol::units::parse_size;
use weir_protocol::{Log, RecordBody};

use super::udp::{bind_udp, kernel_drops};
use super::{now_ns, Source, SourceHandle};
use crate::metrics::Counters;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `udp://ip:port`, `tcp://ip:port` or `tls://ip:port`.
    pub listen: String,
    /// Longest message kept; a longer one is cut to this and flagged.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: String,
    /// The zone RFC 3164 timestamps (which carry none) are read in, `+HH:MM`.
    #[serde(default = "default_offset")]
    pub rfc3164_utc_offset: String,
    /// UDP: the socket's receive buffer (the kernel caps it at net.core.rmem_max).
    #[serde(default = "super::udp::default_receive_buffer")]
    pub receive_buffer: String,
    /// TCP: connections served at once; more are closed on accept (counted).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TLS: this source's certificate chain (PEM, leaf first) and private
    /// key (PEM, mode 0600); required for a `tls://` listen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// TLS: when set, a client must present a certificate signed by one
    /// of these CAs (PEM), or its connection is refused (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_ca_file: Option<PathBuf>,
}

fn default_max_message_size() -> String {
    "64KiB".into()
}

fn default_offset() -> String {
    "+00:00".into()
}

fn default_max_connections() -> usize {
    256
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    Udp(SocketAddr),
    Tcp(SocketAddr),
    Tls(SocketAddr),
}

/// `udp://ip:port`, `tcp://ip:port` or `tls://ip:port`.
pub fn parse_listen(key: &str, s: &str) -> Result<Listen, String> {
    let (scheme, addr) = s.split_once("://").ok_or_else(|| {
        format!("{key}: `{s}` must be udp://ip:port, tcp://ip:port or tls://ip:port")
    })?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("{key}: `{addr}` is not an ip:port ({e})"))?;
    match scheme {
        "udp" => Ok(Listen::Udp(addr)),
        "tcp" => Ok(Listen::Tcp(addr)),
        "tls" => Ok(Listen::Tls(addr)),
        other => Err(format!("{key}: scheme `{other}` is not udp, tcp or tls")),
    }
}

/// `+HH:MM` / `-HH:MM` (or `Z`).
fn parse_offset(s: &str) -> Result<FixedOffset, String> {
    let bad = || format!("rfc3164_utc_offset: `{s}` must look like +01:00 or -05:30");
    if s == "Z" {
        return Ok(FixedOffset::east_opt(0).expect("0 is valid"));
    }
    let sign = match s.as_bytes().first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err(bad()),
    };
    let (h, m) = s[1..].split_once(':').ok_or_else(bad)?;
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

impl Source for Config {
    const TYPE: &'static str = "syslog";

    fn validate(&self) -> Result<(), String> {
        let listen = parse_listen("listen", &self.listen)?;
        if matches!(listen, Listen::Tls(_)) {
            if self.tls_cert_file.is_none() || self.tls_key_file.is_none() {
                return Err(format!(
                    "tls_cert_file and tls_key_file: a tls:// listen needs both (this source's certificate and key); `listen` is {}",
                    self.listen
                ));
            }
        } else {
            for (key, set) in [
                ("tls_cert_file", self.tls_cert_file.is_some()),
                ("tls_key_file", self.tls_key_file.is_some()),
                ("tls_client_ca_file", self.tls_client_ca_file.is_some()),
            ] {
                if set {
                    return Err(format!(
                        "{key}: only for a tls:// listen; `listen` is {}",
                        self.listen
                    ));
                }
            }
        }
        let max =
            parse_size(&self.max_message_size).map_err(|e| format!("max_message_size: {e}"))?;
        if !(480..=(16 << 20)).contains(&max) {
            return Err(format!(
                "max_message_size: {} must be between 480B (RFC 5424's minimum) and 16MiB",
                self.max_message_size
            ));
        }
        parse_offset(&self.rfc3164_utc_offset)?;
        super::udp::check_receive_buffer(&self.receive_buffer)?;
        if !(1..=65_536).contains(&self.max_connections) {
            return Err(format!(
                "max_connections: {} must be between 1 and 65536",
                self.max_connections
            ));
        }
        Ok(())
    }

    async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        run(self, handle).await
    }
}

/// Warns at most once a second per source, saying how many were not logged.
struct WarnLimit {
    last: Option<Instant>,
    quiet: u64,
}

impl WarnLimit {
    fn new() -> Self {
        WarnLimit {
            last: None,
            quiet: 0,
        }
    }

    fn warn(&mut self, source: &str, what: &str) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            self.quiet += 1;
            return;
        }
        tracing::warn!(source, not_logged_since_last = self.quiet, "{what}");
        self.last = Some(Instant::now());
        self.quiet = 0;
    }
}

/// A message as it came off the wire, parsed, truncation flagged; and
/// whether it parsed.
fn to_log(
    data: &[u8],
    truncated_from: Option<usize>,
    max: usize,
    cx: &parse::Context,
) -> (Log, bool) {
    let mut log = parse::parse(data, cx);
    let parsed_ok = log.parse_error.is_none();
    if let Some(len) = truncated_from {
        let note = format!(
            "truncated: the message had {}{len} bytes, the first {max} were kept (max_message_size)",
            if len == max + 1 { "more than " } else { "" },
        );
        log.parse_error = Some(match log.parse_error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note,
        });
    }
    (log, parsed_ok)
}

/// Counts one message in the source's status; logs a flagged one.
fn account(
    handle: &SourceHandle,
    name: &str,
    log: &Log,
    parsed_ok: bool,
    truncated: bool,
    warn: &mut WarnLimit,
) {
    handle.status(|s| {
        *s.counts.entry("messages").or_default() += 1;
        if !parsed_ok {
            *s.counts.entry("parse_errors").or_default() += 1;
        }
        if truncated {
            *s.counts.entry("truncated").or_default() += 1;
        }
    });
    if let Some(e) = &log.parse_error {
        warn.warn(
            name,
            &format!(
                "message from {} kept raw and flagged (counted in the source's parse_errors / truncated): {e}",
                log.host
            ),
        );
    }
}

async fn run(cfg: Config, handle: SourceHandle) -> anyhow::Result<()> {
    let listen = parse_listen("listen", &cfg.listen).expect("validated");
    let max = parse_size(&cfg.max_message_size).expect("validated") as usize;
    let offset = parse_offset(&cfg.rfc3164_utc_offset).expect("validated");
    match listen {
        Listen::Udp(addr) => run_udp(cfg, addr, max, offset, handle).await,
        Listen::Tcp(addr) => run_tcp(cfg, addr, None, max, offset, handle).await,
        Listen::Tls(addr) => {
            let mut files = Vec::new();
            for (key, path) in [
                ("tls_cert_file", &cfg.tls_cert_file),
                ("tls_key_file", &cfg.tls_key_file),
                ("tls_client_ca_file", &cfg.tls_client_ca_file),
            ] {
                if let Some(p) = path {
                    files.push((key, p.as_path()));
                }
            }
            let c = cfg.clone();
            let acceptor = handle
                .reloadable(files, move || tls_acceptor(&c))
                .map_err(|e| anyhow::anyhow!("sources.{}: {e:#}", handle.stream()))?;
            run_tcp(cfg, addr, Some(acceptor), max, offset, handle).await
        }
    }
}

/// The TLS server settings, read from their files at start and on SIGHUP
/// (each new connection's handshake uses the last read).
fn tls_acceptor(cfg: &Config) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use weir_store::secret::{read_pem_certs, read_pem_key};
    let cert = cfg.tls_cert_file.as_ref().expect("validated");
    let key = cfg.tls_key_file.as_ref().expect("validated");
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?;
    let builder = match &cfg.tls_client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_pem_certs(ca, "tls_client_ca_file")? {
                roots.add(c).map_err(|e| {
                    anyhow::anyhow!(
                        "tls_client_ca_file: a certificate in {} is not usable as a CA ({e})",
                        ca.display()
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .context("tls_client_ca_file: building the client certificate check")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(
            read_pem_certs(cert, "tls_cert_file")?,
            read_pem_key(key, "tls_key_file")?,
        )
        .context("tls_cert_file / tls_key_file: the key does not fit the certificate")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Datagrams taken from the socket per batch handed to the spool.
const UDP_BATCH: usize = 64;

async fn run_udp(
    cfg: Config,
    addr: SocketAddr,
    max: usize,
    offset: FixedOffset,
    mut handle: SourceHandle,
) -> anyhow::Result<()> {
    let name = handle.stream().to_string();
    let buffer = parse_size(&cfg.receive_buffer).expect("validated") as usize;
    let (sock, got) = bind_udp(addr, buffer).map_err(|e| {
        anyhow::anyhow!(
            "sources.{}: cannot listen on udp {addr} ({e}); check `listen`",
            name
        )
    })?;
    tracing::info!(source = %name, %addr, receive_buffer = got, "syslog source listening (udp)");
    handle.status(|s| s.state = "listening");
    let mut shutdown = handle.shutdown.clone();
    // A datagram can be up to 64 KiB: read it whole to know its length.
    let mut buf = vec![0u8; 65_536];
    let mut warn = WarnLimit::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut logs = Vec::with_capacity(UDP_BATCH);
    loop {
        let first = tokio::select! {
            r = sock.recv_from(&mut buf) => r,
            _ = tick.tick() => {
                if let Some(drops) = kernel_drops(addr) {
                    handle.status(|s| { s.counts.insert("kernel_drops", drops); });
                }
                continue;
            }
            _ = shutdown.changed() => return Ok(()),
        };
        let mut next = Some(first);
        while let Some(r) = next.take() {
            match r {
                Ok((n, peer)) => {
                    let host = peer.ip().to_string();
                    let cx = parse::Context {
                        now_ns: now_ns(),
                        rfc3164_offset: offset,
                        peer_host: &host,
                    };
                    let truncated = (n > max).then_some(n);
                    let (log, parsed_ok) = to_log(&buf[..n.min(max)], truncated, max, &cx);
                    account(
                        &handle,
                        &name,
                        &log,
                        parsed_ok,
                        truncated.is_some(),
                        &mut warn,
                    );
                    logs.push(RecordBody::Log(Box::new(log)));
                }
                Err(e) => {
                    Counters::add(&handle.counters().source_peer_errors, 1);
                    handle.status(|s| {
                        s.peer_errors += 1;
                        s.last_error = Some(format!("udp receive: {e}"));
                    });
                    warn.warn(
                        &name,
                        &format!("udp receive failed: {e} (counted in source_peer_errors)"),
                    );
                }
            }
            if logs.len() < UDP_BATCH {
                next = match sock.try_recv_from(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                    r => Some(r),
                };
            }
        }
        if !logs.is_empty() {
            handle.emit_batch(&logs);
            logs.clear();
        }
    }
}

/// What a TCP connection's task tells the source's loop.
enum Event {
    Log {
        log: Log,
        parsed_ok: bool,
        truncated: bool,
        /// The message's share of `TCP_QUEUE_BYTES`, given back once it
        /// is handed to the spool.
        _budget: OwnedSemaphorePermit,
    },
    Closed {
        peer: SocketAddr,
        error: Option<String>,
    },
    /// A TLS client that did not complete its handshake (an untrusted or
    /// missing client certificate, a plain-TCP client, a timeout).
    HandshakeFailed { peer: SocketAddr, error: String },
}

/// Messages parsed ahead of the spool, across all connections, at most
/// this many and this many bytes of message: a bound so a slow spool slows
/// the peers (TCP flow control) instead of growing memory. A message
/// larger than the byte bound waits until it is the only one.
const TCP_QUEUE: usize = 1024;
const TCP_QUEUE_BYTES: usize = 8 << 20;

async fn run_tcp(
    cfg: Config,
    addr: SocketAddr,
    tls: Option<Arc<weir_ops::reload::Reloadable<tokio_rustls::TlsAcceptor>>>,
    max: usize,
    offset: FixedOffset,
    mut handle: SourceHandle,
) -> anyhow::Result<()> {
    let name = handle.stream().to_string();
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "sources.{}: cannot listen on tcp {addr} ({e}); check `listen`",
            name
        )
    })?;
    let scheme = if tls.is_some() { "tls" } else { "tcp" };
    tracing::info!(source = %name, %addr, "syslog source listening ({scheme})");
    handle.status(|s| s.state = "listening");
    let mut shutdown = handle.shutdown.clone();
    let (tx, mut rx) = mpsc::channel::<Event>(TCP_QUEUE);
    let budget = Arc::new(Semaphore::new(TCP_QUEUE_BYTES));
    let mut active = 0usize;
    let mut warn = WarnLimit::new();
    let mut logs = Vec::with_capacity(UDP_BATCH);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, peer)) if active >= cfg.max_connections => {
                    drop(conn);
                    handle.status(|s| *s.counts.entry("rejected_connections").or_default() += 1);
                    warn.warn(&name, &format!(
                        "closed the connection from {peer}: max_connections ({}) are open (counted in rejected_connections)",
                        cfg.max_connections));
                }
                Ok((conn, peer)) => {
                    active += 1;
                    Counters::add(&handle.counters().source_connections, 1);
                    handle.status(|s| { s.state = "connected"; s.connections += 1; });
                    tracing::info!(source = %name, %peer, "syslog connection accepted");
                    let (tx, shutdown, budget) = (tx.clone(), handle.shutdown.clone(), budget.clone());
                    match tls.as_ref().map(|t| (*t.get()).clone()) {
                        None => { tokio::spawn(serve(conn, peer, max, offset, tx, budget, shutdown)); }
                        Some(acceptor) => { tokio::spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                                Ok(Ok(stream)) => serve(stream, peer, max, offset, tx, budget, shutdown).await,
                                Ok(Err(e)) => { let _ = tx.send(Event::HandshakeFailed { peer, error: e.to_string() }).await; }
                                Err(_) => { let _ = tx.send(Event::HandshakeFailed { peer, error: format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()) }).await; }
                            }
                        }); }
                    }
                }
                Err(e) => {
                    Counters::add(&handle.counters().source_accept_errors, 1);
                    handle.status(|s| { s.accept_errors += 1; s.last_error = Some(format!("accept: {e}")); });
                    warn.warn(&name, &format!("accept failed: {e}; retrying in 100 ms (counted in source_accept_errors)"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            event = rx.recv() => {
                let mut next = event;
                while let Some(ev) = next.take() {
                    match ev {
                        Event::Log { log, parsed_ok, truncated, .. } => {
                            account(&handle, &name, &log, parsed_ok, truncated, &mut warn);
                            logs.push(RecordBody::Log(Box::new(log)));
                        }
                        Event::Closed { peer, error } => {
                            active -= 1;
                            match error {
                                Some(e) => {
                                    Counters::add(&handle.counters().source_peer_errors, 1);
                                    tracing::warn!(source = %name, %peer, "connection lost ({e}) (counted in source_peer_errors)");
                                    handle.status(|s| { s.peer_errors += 1; s.last_error = Some(format!("{peer}: {e}")); });
                                }
                                None => tracing::info!(source = %name, %peer, "syslog connection closed"),
                            }
                            if active == 0 {
                                handle.status(|s| s.state = "listening");
                            }
                        }
                        Event::HandshakeFailed { peer, error } => {
                            active -= 1;
                            handle.status(|s| {
                                *s.counts.entry("tls_handshake_failures").or_default() += 1;
                                s.last_error = Some(format!("{peer}: TLS handshake: {error}"));
                                if active == 0 { s.state = "listening"; }
                            });
                            warn.warn(&name, &format!(
                                "TLS handshake with {peer} failed: {error} (counted in tls_handshake_failures; a client needs a certificate from tls_client_ca_file when that is set)"));
                        }
                    }
                    if logs.len() < UDP_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                if !logs.is_empty() {
                    // Unlike UDP, TCP can wait: hold the peers back while
                    // the spool is over its high-water mark.
                    if !handle.wait_for_room().await {
                        handle.emit_batch(&logs);
                        return Ok(());
                    }
                    handle.emit_batch(&logs);
                    logs.clear();
                }
            }
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

/// Reads one connection, frames and parses its messages, and hands them
/// to the source's loop; ends at EOF, an error or shutdown.
async fn serve(
    mut conn: impl AsyncRead + Unpin,
    peer: SocketAddr,
    max: usize,
    offset: FixedOffset,
    tx: mpsc::Sender<Event>,
    budget: Arc<Semaphore>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let host = peer.ip().to_string();
    let mut framer = parse::Framer::new(max);
    let mut buf = vec![0u8; 64 << 10];
    let mut error = None;
    let send = |frame: parse::Frame, budget: OwnedSemaphorePermit| {
        let cx = parse::Context {
            now_ns: now_ns(),
            rfc3164_offset: offset,
            peer_host: &host,
        };
        let truncated = frame.truncated_from.is_some();
        let (log, parsed_ok) = to_log(&frame.data, frame.truncated_from, max, &cx);
        Event::Log {
            log,
            parsed_ok,
            truncated,
            _budget: budget,
        }
    };
    // Takes a frame's bytes from the queue's budget, waiting while the
    // source's loop is behind; None once the source has ended.
    let reserve = |len: usize| {
        let n = len.clamp(1, TCP_QUEUE_BYTES) as u32;
        budget.clone().acquire_many_owned(n)
    };
    loop {
        let n = tokio::select! {
            r = conn.read(&mut buf) => r,
            _ = shutdown.changed() => break,
        };
        match n {
            Ok(0) => {
                if let Some(frame) = framer.finish() {
                    let Ok(permit) = reserve(frame.data.len()).await else {
                        return;
                    };
                    if tx.send(send(frame, permit)).await.is_err() {
                        return;
                    }
                }
                break;
            }
            Ok(n) => {
                framer.push(&buf[..n]);
                while let Some(frame) = framer.next_frame() {
                    let Ok(permit) = reserve(frame.data.len()).await else {
                        return;
                    };
                    if tx.send(send(frame, permit)).await.is_err() {
                        return; // the source ended
                    }
                }
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let _ = tx.send(Event::Closed { peer, error }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_udp_or_tcp_and_names_the_key() {
        assert_eq!(
            parse_listen("listen", "udp://127.0.0.1:5514"),
            Ok(Listen::Udp("127.0.0.1:5514".parse().unwrap()))
        );
        assert_eq!(
            parse_listen("listen", "tcp://[::1]:5514"),
            Ok(Listen::Tcp("[::1]:5514".parse().unwrap()))
        );
        assert_eq!(
            parse_listen("listen", "tls://127.0.0.1:6514"),
            Ok(Listen::Tls("127.0.0.1:6514".parse().unwrap()))
        );
        for bad in ["127.0.0.1:5514", "ssl://127.0.0.1:1", "udp://host:1"] {
            let e = parse_listen("listen", bad).unwrap_err();
            assert!(e.starts_with("listen: "), "{e}");
        }
    }

    #[test]
    fn a_tls_listen_needs_a_certificate_and_tls_keys_need_a_tls_listen() {
        let cfg =
            |extra: &str| -> Config { toml::from_str(&format!("listen = \"{extra}")).unwrap() };
        let e = Source::validate(&cfg("tls://127.0.0.1:6514\"")).unwrap_err();
        assert!(
            e.starts_with("tls_cert_file and tls_key_file: a tls:// listen needs both"),
            "{e}"
        );
        let e = Source::validate(&cfg(
            "tcp://127.0.0.1:6514\"\ntls_client_ca_file = \"/ca.pem\"",
        ))
        .unwrap_err();
        assert!(
            e.starts_with("tls_client_ca_file: only for a tls:// listen"),
            "{e}"
        );
        let ok =
            cfg("tls://127.0.0.1:6514\"\ntls_cert_file = \"/c.pem\"\ntls_key_file = \"/c.key\"");
        assert_eq!(Source::validate(&ok), Ok(()));
        // The files are read at start: a missing one is named there.
        let e = format!("{:#}", tls_acceptor(&ok).err().unwrap());
        assert!(e.starts_with("tls_cert_file: cannot read /c.pem"), "{e}");
    }

    #[test]
    fn offsets_parse_and_bad_ones_name_the_key() {
        assert_eq!(parse_offset("+01:30").unwrap().local_minus_utc(), 5400);
        assert_eq!(parse_offset("-05:00").unwrap().local_minus_utc(), -18000);
        assert!(parse_offset("01:00")
            .unwrap_err()
            .starts_with("rfc3164_utc_offset"));
    }

    #[test]
    fn a_truncated_message_is_flagged_with_its_length() {
        let cx = parse::Context {
            now_ns: 0,
            rfc3164_offset: FixedOffset::east_opt(0).unwrap(),
            peer_host: "h",
        };
        let (log, parsed_ok) = to_log(b"<13>1 - h a - - - abc", Some(5000), 480, &cx);
        assert!(parsed_ok);
        assert_eq!(log.text, "abc");
        assert_eq!(
            log.parse_error.as_deref(),
            Some(
                "truncated: the message had 5000 bytes, the first 480 were kept (max_message_size)"
            )
        );
    }
}
