//! `tcp`: connects to a server on the IT side and replays each `Bytes`
//! stream's bytes in order, like the receive side of a TCP-over-diode
//! relay: one connection per source connection (closed when a chunk marked
//! `end` arrives). Records of other kinds are written as JSON lines.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::decoder::Delivered;
use weir_protocol::RecordBody;

use super::{json_line, BuildContext, Sink, SinkBuilder, SinkError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// ip:port of the server to replay into.
    pub connect: SocketAddr,
}

impl SinkBuilder for Config {
    const TYPE: &'static str = "tcp";

    fn build(&self, _ctx: &BuildContext) -> Result<Box<dyn Sink>> {
        Ok(Box::new(TcpSink::new(self)))
    }

    fn validate(&self) -> Result<(), String> {
        if self.connect.port() == 0 || self.connect.ip().is_unspecified() {
            return Err(format!(
                "connect: {} must be a concrete ip:port",
                self.connect
            ));
        }
        Ok(())
    }
}

pub struct TcpSink {
    connect: SocketAddr,
    conns: HashMap<Arc<str>, std::io::BufWriter<TcpStream>>,
    sessions: HashMap<Arc<str>, u64>,
    /// The JSON line being written (reused, so no allocation per record).
    line: Vec<u8>,
}

impl TcpSink {
    pub fn new(cfg: &Config) -> Self {
        TcpSink {
            connect: cfg.connect,
            conns: HashMap::new(),
            sessions: HashMap::new(),
            line: Vec::with_capacity(512),
        }
    }

    fn conn(&mut self, stream: &Arc<str>) -> Result<&mut std::io::BufWriter<TcpStream>> {
        if !self.conns.contains_key(stream) {
            let s = TcpStream::connect_timeout(&self.connect, Duration::from_secs(5))
                .with_context(|| {
                    format!(
                        "connecting to {} (check `connect` and that the server is up)",
                        self.connect
                    )
                })?;
            // With no server listening on a local port in the ephemeral
            // range, the kernel can pick that very port as the connection's
            // own and connect the socket to itself (TCP simultaneous open):
            // writes would then "succeed" into nothing, and the port stays
            // taken from the server that should have it. Refuse it; the
            // retry connects again.
            if s.local_addr().ok() == Some(self.connect) {
                anyhow::bail!(
                    "connecting to {}: the connection reached itself (no server is listening \
                     there); check that the server is up",
                    self.connect
                );
            }
            s.set_nodelay(true).ok();
            tracing::info!(stream = %stream, server = %self.connect, "tcp sink connected");
            self.conns.insert(
                stream.clone(),
                std::io::BufWriter::with_capacity(1 << 20, s),
            );
        }
        Ok(self.conns.get_mut(stream).expect("just inserted"))
    }
}

impl Sink for TcpSink {
    /// Confirmed once flushed to the kernel: plain TCP has no end-to-end
    /// acknowledgement (see `unconfirmed_loss`).
    fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        for r in records {
            // A new sender session cannot continue a connection the old one
            // left open (the sender restarted mid-stream): close it first.
            if self
                .sessions
                .get(&r.stream)
                .is_some_and(|s| *s != r.session)
            {
                if let Some(mut w) = self.conns.remove(&r.stream) {
                    let _ = w.flush();
                    let _ = w.get_ref().shutdown(std::net::Shutdown::Write);
                    tracing::warn!(stream = %r.stream, "new sender session: closed the connection the previous session left open");
                }
            }
            self.sessions.insert(r.stream.clone(), r.session);
            let result = match &r.body {
                RecordBody::Bytes(c) => {
                    let result = if c.data.is_empty() {
                        Ok(())
                    } else {
                        self.conn(&r.stream).and_then(|w| Ok(w.write_all(&c.data)?))
                    };
                    if c.end && result.is_ok() {
                        if let Some(mut w) = self.conns.remove(&r.stream) {
                            w.flush().context("flushing before close")?;
                            let _ = w.get_ref().shutdown(std::net::Shutdown::Write);
                            tracing::info!(stream = %r.stream, "source connection ended; tcp sink connection closed");
                        }
                    }
                    result
                }
                _ => {
                    let mut line = std::mem::take(&mut self.line);
                    line.clear();
                    json_line::write_record(&mut line, r);
                    line.push(b'\n');
                    let written = self.conn(&r.stream).and_then(|w| Ok(w.write_all(&line)?));
                    self.line = line;
                    written
                }
            };
            if let Err(e) = result {
                // Drop the broken connection; the retry opens a new one.
                self.conns.remove(&r.stream);
                return Err(SinkError::retry(e));
            }
        }
        self.flush()?;
        Ok(records.len())
    }

    /// After a failed write the server may have lost what the kernel had
    /// accepted: the previous batch is written again too (at least once).
    fn unconfirmed_loss(&mut self) -> bool {
        true
    }
}

impl TcpSink {
    fn flush(&mut self) -> Result<()> {
        let mut failed = None;
        self.conns.retain(|stream, w| match w.flush() {
            Ok(()) => true,
            Err(e) => {
                failed = Some(anyhow::anyhow!(
                    "flushing stream {stream} to the server: {e}"
                ));
                false
            }
        });
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
