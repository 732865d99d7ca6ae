//! `tcp`: listens on the OT side; the bytes of each accepted connection
//! become chunks of this source's `Bytes` stream, the last chunk of a
//! connection marked `end`. Connections are served one after another so
//! each connection's bytes stay contiguous. A byte stream cannot lose bytes
//! gracefully, so while the spool holds more than its high-water mark the source
//! stops reading and TCP flow control slows the peer. It never drops on its
//! own account; only other sources overflowing the shared spool can push
//! its oldest chunks out (counted in spool_dropped_records, announced as a gap).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use weir_protocol::units::parse_size;
use weir_protocol::{Chunk, RecordBody};

use super::{Source, SourceHandle};
use crate::metrics::Counters;

/// First wait after a failed accept, doubled per failure in a row up to
/// `ACCEPT_BACKOFF_MAX`: a persistent failure (out of file descriptors)
/// costs a log line and a retry every few seconds, not a busy loop.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// Largest chunk read into one record.
    #[serde(default = "default_chunk")]
    pub chunk_size: String,
}

/// 256 KiB, as the files source: a bulk stream cost the sender about 7%
/// less CPU per GB than in 64 KiB records (a quarter of the spool writes
/// and records; docs/performance.md), and a read takes only what has
/// arrived, so a trickle is not held back.
fn default_chunk() -> String {
    "256KiB".into()
}

impl Source for Config {
    const TYPE: &'static str = "tcp";

    fn validate(&self) -> Result<(), String> {
        let size = parse_size(&self.chunk_size).map_err(|e| format!("chunk_size: {e}"))?;
        if !(512..=(16 << 20)).contains(&size) {
            return Err(format!(
                "chunk_size: {} must be between 512B and 16MiB",
                self.chunk_size
            ));
        }
        Ok(())
    }

    async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        run(self, handle).await
    }
}

async fn run(cfg: Config, mut handle: SourceHandle) -> anyhow::Result<()> {
    let name = handle.stream().to_string();
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        anyhow::anyhow!(
            "sources.{}: cannot listen on {} ({e}); check `listen`",
            name,
            cfg.listen
        )
    })?;
    tracing::info!(source = %name, listen = %cfg.listen, "tcp source listening");
    handle.status(|s| s.state = "listening");
    let chunk = parse_size(&cfg.chunk_size).expect("validated") as usize;
    let mut shutdown = handle.shutdown.clone();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (mut conn, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    Counters::add(&handle.counters().source_accept_errors, 1);
                    tracing::warn!(source = %name, retry_in_ms = backoff.as_millis() as u64,
                        "accept failed: {e}; retrying (counted in source_accept_errors)");
                    handle.status(|s| {
                        s.state = "retrying";
                        s.accept_errors += 1;
                        s.last_error = Some(format!("accept: {e}"));
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    handle.status(|s| s.state = "listening");
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        backoff = ACCEPT_BACKOFF_MIN;
        Counters::add(&handle.counters().source_connections, 1);
        handle.status(|s| {
            s.state = "connected";
            s.connections += 1;
        });
        tracing::info!(source = %name, %peer, "connection accepted");
        let mut total: u64 = 0;
        loop {
            if !handle.wait_for_room().await {
                // Shutting down mid-connection: mark the stream's end so
                // the receiver's tcp sink closes its side too.
                handle.emit(RecordBody::Bytes(Chunk {
                    data: Vec::new(),
                    end: true,
                }));
                return Ok(());
            }
            // read_buf fills spare capacity: no zeroing, no copy afterwards.
            let mut data = Vec::with_capacity(chunk);
            let n = tokio::select! {
                r = conn.read_buf(&mut data) => r,
                _ = shutdown.changed() => {
                    handle.emit(RecordBody::Bytes(Chunk { data: Vec::new(), end: true }));
                    return Ok(());
                }
            };
            match n {
                Ok(0) => break,
                Ok(n) => {
                    total += n as u64;
                    handle.emit(RecordBody::Bytes(Chunk { data, end: false }));
                }
                Err(e) => {
                    // The peer reconnects when it can; the stream goes on.
                    Counters::add(&handle.counters().source_peer_errors, 1);
                    tracing::warn!(source = %name, %peer,
                        "connection lost ({e}); closing it and waiting for the peer to reconnect (counted in source_peer_errors)");
                    handle.status(|s| {
                        s.peer_errors += 1;
                        s.last_error = Some(format!("{peer}: {e}"));
                    });
                    break;
                }
            }
        }
        handle.emit(RecordBody::Bytes(Chunk {
            data: Vec::new(),
            end: true,
        }));
        tracing::info!(source = %name, %peer, bytes = total, "connection closed");
        handle.status(|s| s.state = "listening");
    }
}
