//! `tcp`: connects to a server on the IT side and replays each `Bytes`
//! stream's bytes in order, like the receive side of a TCP-over-diode
//! relay: one connection per source connection (closed when a chunk marked
//! `end` arrives). Records of other kinds are written as JSON lines.

use std::collections::HashMap;
use std::io::{IoSlice, Write};
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

/// Byte chunks of at least this many bytes are written to the socket from
/// the records themselves (`TcpSink::write_run`); smaller ones and JSON
/// lines gather in the 1 MiB write buffer.
const DIRECT_WRITE: usize = 16 << 10;

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
        // Large chunks of one stream and session that follow each other
        // go out together straight from the records (`write_run`).
        let mut run: Vec<&[u8]> = Vec::new();
        let mut run_of: Option<&Delivered> = None;
        for r in records {
            let big = matches!(&r.body, RecordBody::Bytes(c) if c.data.len() >= DIRECT_WRITE);
            let joins =
                big && run_of.is_some_and(|p| p.stream == r.stream && p.session == r.session);
            if !joins {
                if let Some(p) = run_of.take() {
                    self.write_run(p, &mut run)?;
                }
            }
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
                    } else if big {
                        run.push(&c.data);
                        run_of = Some(r);
                        if c.end {
                            run_of = None;
                            self.write_run(r, &mut run)?;
                        }
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
        if let Some(p) = run_of {
            self.write_run(p, &mut run)?;
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
    /// Writes `run`, large chunks of `r`'s stream, to its connection in
    /// as few `writev` calls as the kernel takes, after whatever the
    /// connection's buffer holds: the chunks are not copied (into the
    /// buffer, they took about 3% of the receiver's CPU in a bulk run).
    fn write_run(&mut self, r: &Delivered, run: &mut Vec<&[u8]>) -> Result<(), SinkError> {
        let result = self.conn(&r.stream).and_then(|w| {
            w.flush()?;
            let mut slices: Vec<IoSlice<'_>> = run.iter().map(|b| IoSlice::new(b)).collect();
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                match w.get_mut().write_vectored(rest) {
                    Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
                    Ok(n) => IoSlice::advance_slices(&mut rest, n),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        });
        run.clear();
        if let Err(e) = result {
            // Drop the broken connection; the retry opens a new one.
            self.conns.remove(&r.stream);
            return Err(SinkError::retry(e));
        }
        Ok(())
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::dest_template::tests::{point, record};
    use std::io::Read;
    use weir_protocol::Chunk;

    fn bytes(data: Vec<u8>, end: bool) -> Delivered {
        record(RecordBody::Bytes(Chunk { data, end }))
    }

    /// Small chunks and JSON lines go through the write buffer, large
    /// chunks (one, or several in a row) straight from the records; the
    /// server still reads every byte in record order, and the stream's end
    /// closes the connection.
    #[test]
    fn buffered_and_directly_written_chunks_reach_the_server_in_record_order() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let connect = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).unwrap();
            got
        });
        let pattern = |n: usize, k: u8| {
            (0..n)
                .map(|i| (i as u8).wrapping_mul(k))
                .collect::<Vec<u8>>()
        };
        let records = [
            bytes(pattern(100, 3), false),
            bytes(pattern(DIRECT_WRITE, 5), false),
            bytes(pattern(10, 7), false),
            record(point("t")),
            bytes(pattern(300_000, 11), false),
            bytes(pattern(DIRECT_WRITE + 5, 19), false),
            bytes(pattern(DIRECT_WRITE - 1, 13), false),
            bytes(pattern(70_000, 17), true),
        ];
        let mut want = Vec::new();
        for r in &records {
            match &r.body {
                RecordBody::Bytes(c) => want.extend_from_slice(&c.data),
                _ => {
                    json_line::write_record(&mut want, r);
                    want.push(b'\n');
                }
            }
        }
        let mut sink = TcpSink::new(&Config { connect });
        let refs: Vec<&Delivered> = records.iter().collect();
        // In each write, buffered bytes come before a direct write.
        assert_eq!(sink.write(&refs[..3]).unwrap(), 3);
        assert_eq!(sink.write(&refs[3..]).unwrap(), 5);
        let got = server.join().unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the server read the records' bytes in order");
    }
}
