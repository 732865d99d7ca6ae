//! `udp`: each datagram received on an OT-side port (SNMP traps, NetFlow,
//! proprietary telemetry) becomes a `Message`: topic = the configured
//! `topic` (default: the source's name), payload = the datagram's bytes,
//! origin = the peer's `ip:port`, ts_ns = the receive time. UDP cannot be
//! slowed down, so the socket gets a large receive buffer; what the
//! kernel still drops when it overflows is read from /proc/net/udp and
//! shown as the source's `kernel_drops` in the metrics file.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use weir_protocol::units::parse_size;
use weir_protocol::{Message, RecordBody};

use super::{now_ns, Source, SourceHandle};
use crate::metrics::Counters;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// ip:port to receive on.
    pub listen: SocketAddr,
    /// The messages' topic; default: the source's name.
    #[serde(default)]
    pub topic: Option<String>,
    /// The socket's receive buffer (the kernel caps it at net.core.rmem_max).
    #[serde(default = "default_receive_buffer")]
    pub receive_buffer: String,
}

pub fn default_receive_buffer() -> String {
    "4MiB".into()
}

/// Checks a `receive_buffer` value.
pub fn check_receive_buffer(s: &str) -> Result<(), String> {
    let size = parse_size(s).map_err(|e| format!("receive_buffer: {e}"))?;
    if !(64 << 10..=1 << 30).contains(&size) {
        return Err(format!(
            "receive_buffer: {s} must be between 64KiB and 1GiB"
        ));
    }
    Ok(())
}

impl Source for Config {
    const TYPE: &'static str = "udp";

    fn validate(&self) -> Result<(), String> {
        if self.listen.port() == 0 {
            return Err(format!("listen: {} needs a port", self.listen));
        }
        if self.topic.as_deref() == Some("") {
            return Err("topic: is empty; leave it out to use the source's name".into());
        }
        check_receive_buffer(&self.receive_buffer)
    }

    async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        run(self, handle).await
    }
}

/// A non-blocking UDP socket bound to `addr` with a receive buffer of
/// `buffer` bytes asked for; returns it and the size the kernel granted.
pub fn bind_udp(
    addr: SocketAddr,
    buffer: usize,
) -> std::io::Result<(tokio::net::UdpSocket, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps it at rmem_max; the size granted is logged.
    let _ = sock.set_recv_buffer_size(buffer);
    sock.bind(&addr.into())?;
    sock.set_nonblocking(true)?;
    let granted = sock.recv_buffer_size().unwrap_or(0);
    let std: std::net::UdpSocket = sock.into();
    Ok((tokio::net::UdpSocket::from_std(std)?, granted))
}

/// Datagrams the kernel dropped for the IPv4 socket bound to `addr`
/// (its receive buffer was full): the `drops` column of /proc/net/udp.
/// None where that is not available (IPv6, not Linux).
pub fn kernel_drops(addr: SocketAddr) -> Option<u64> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace();
        (cols.nth(1)? == local).then(|| line.split_whitespace().last()?.parse().ok())?
    })
}

/// Datagrams taken from the socket per batch handed to the spool.
const BATCH: usize = 64;

async fn run(cfg: Config, mut handle: SourceHandle) -> anyhow::Result<()> {
    let name = handle.stream().to_string();
    let buffer = parse_size(&cfg.receive_buffer).expect("validated") as usize;
    let (sock, granted) = bind_udp(cfg.listen, buffer).map_err(|e| {
        anyhow::anyhow!(
            "sources.{}: cannot listen on udp {} ({e}); check `listen`",
            name,
            cfg.listen
        )
    })?;
    if granted < buffer {
        tracing::warn!(source = %name, asked = buffer, granted,
            "the kernel granted a smaller receive buffer than receive_buffer (raise net.core.rmem_max)");
    }
    tracing::info!(source = %name, listen = %cfg.listen, receive_buffer = granted, "udp source listening");
    handle.status(|s| s.state = "listening");
    let topic = cfg.topic.clone().unwrap_or_else(|| name.clone());
    let mut shutdown = handle.shutdown.clone();
    let mut buf = vec![0u8; 65_536];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_drops = kernel_drops(cfg.listen).unwrap_or(0);
    loop {
        let first = tokio::select! {
            r = sock.recv_from(&mut buf) => r,
            _ = tick.tick() => {
                if let Some(drops) = kernel_drops(cfg.listen) {
                    if drops > last_drops {
                        tracing::warn!(source = %name, dropped = drops - last_drops,
                            "the kernel dropped datagrams: the receive buffer was full (counted in the source's kernel_drops)");
                        last_drops = drops;
                    }
                    handle.status(|s| { s.counts.insert("kernel_drops", drops); });
                }
                continue;
            }
            _ = shutdown.changed() => return Ok(()),
        };
        let (mut datagrams, mut bytes) = (0u64, 0u64);
        let mut next = Some(first);
        while let Some(r) = next.take() {
            match r {
                Ok((n, peer)) => {
                    let mut m = Message::new(topic.clone(), buf[..n].to_vec(), now_ns());
                    m.origin = Some(peer.to_string());
                    batch.push(RecordBody::Message(m));
                    datagrams += 1;
                    bytes += n as u64;
                }
                Err(e) => {
                    // E.g. ICMP errors reported on the socket: nothing lost here.
                    Counters::add(&handle.counters().source_peer_errors, 1);
                    tracing::warn!(source = %name, "udp receive failed: {e} (counted in source_peer_errors)");
                    handle.status(|s| {
                        s.peer_errors += 1;
                        s.last_error = Some(format!("udp receive: {e}"));
                    });
                }
            }
            if batch.len() < BATCH {
                next = match sock.try_recv_from(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                    r => Some(r),
                };
            }
        }
        handle.status(|s| {
            *s.counts.entry("datagrams").or_default() += datagrams;
            *s.counts.entry("bytes").or_default() += bytes;
        });
        if !batch.is_empty() {
            handle.emit_batch(&batch);
            batch.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_drops_finds_a_bound_socket() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (sock, granted) = bind_udp("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
            assert!(granted > 0);
            let addr = sock.local_addr().unwrap();
            assert_eq!(kernel_drops(addr), Some(0));
        });
    }

    #[test]
    fn receive_buffer_bounds_name_the_key() {
        assert!(check_receive_buffer("4MiB").is_ok());
        assert!(check_receive_buffer("1KiB")
            .unwrap_err()
            .starts_with("receive_buffer"));
        assert!(check_receive_buffer("lots")
            .unwrap_err()
            .starts_with("receive_buffer"));
    }
}
