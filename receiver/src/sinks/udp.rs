//! `udp`: re-emits `Message` records (as a `udp` source makes them) to an
//! IT-side address, one datagram each, the payload byte-identical. UDP
//! has no acknowledgement: a datagram the network or the target drops is
//! lost there. A send the kernel refuses (the target's port answered
//! unreachable, no route) is retried with the sink's backoff, so records
//! stay in the journal while the target is away; the one datagram sent
//! just before the kernel learnt that is lost. Records of other kinds,
//! and payloads over 65,507 bytes (no UDP datagram holds them), are
//! rejected to the dead-letter file (counted in `dead_letters`).

use std::net::{SocketAddr, UdpSocket};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::decoder::Delivered;
use weir_protocol::RecordBody;

use super::{BuildContext, Sink, SinkBuilder, SinkError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// ip:port the datagrams go to.
    pub target: SocketAddr,
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "udp";

    fn build(&self, _ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        Ok(Box::new(UdpSink::new(self)))
    }

    fn validate(&self) -> Result<(), String> {
        if self.target.port() == 0 || self.target.ip().is_unspecified() {
            return Err(format!(
                "target: {} must be a concrete ip:port",
                self.target
            ));
        }
        Ok(())
    }
}

/// Largest UDP payload over IPv4 (65,535 - 20 IP - 8 UDP header bytes).
pub const MAX_DATAGRAM: usize = 65_507;

pub struct UdpSink {
    target: SocketAddr,
    sock: Option<UdpSocket>,
}

impl UdpSink {
    pub fn new(cfg: &Config) -> Self {
        UdpSink {
            target: cfg.target,
            sock: None,
        }
    }

    fn sock(&mut self) -> Result<&UdpSocket> {
        if self.sock.is_none() {
            let bind: SocketAddr = if self.target.is_ipv4() {
                "0.0.0.0:0".parse().expect("addr")
            } else {
                "[::]:0".parse().expect("addr")
            };
            let s = UdpSocket::bind(bind).context("binding a udp socket")?;
            s.connect(self.target)
                .with_context(|| format!("connecting udp to {} (check `target`)", self.target))?;
            self.sock = Some(s);
        }
        Ok(self.sock.as_ref().expect("just set"))
    }
}

impl Sink for UdpSink {
    /// Each record is confirmed once the kernel took its datagram.
    fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        for (i, r) in records.iter().enumerate() {
            let reject = |reason: String| SinkError::Reject { at: i, reason };
            let RecordBody::Message(m) = &r.body else {
                return Err(reject(format!(
                    "a {} record has no datagram form; the udp sink takes message records (route other streams elsewhere with `streams`)",
                    r.body.kind()
                )));
            };
            if m.payload.len() > MAX_DATAGRAM {
                return Err(reject(format!(
                    "payload of {} bytes does not fit a UDP datagram ({MAX_DATAGRAM} at most)",
                    m.payload.len()
                )));
            }
            let target = self.target;
            let sent = self.sock().and_then(|s| {
                s.send(&m.payload).with_context(|| {
                    format!("sending a datagram to {target} (check `target` and that it is up)")
                })
            });
            if let Err(error) = sent {
                self.sock = None;
                return Err(SinkError::Retry {
                    confirmed: i,
                    error,
                });
            }
        }
        Ok(records.len())
    }
}
