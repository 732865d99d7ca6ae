//! `tcp`: listens on the OT side; the bytes of each accepted connection
//! become chunks of this source's `Bytes` stream, the last chunk of a
//! connection marked `end`. Connections are served one after another so
//! each connection's bytes stay contiguous. A byte stream cannot lose bytes
//! gracefully, so while the spool holds more than its high-water mark the source
//! stops reading and TCP flow control slows the peer. It never drops on its
//! own account; only other sources overflowing the shared spool can push
//! its oldest chunks out (counted in spool_dropped_records, announced as a gap).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use weir_protocol::units::parse_size;
use weir_protocol::{Chunk, RecordBody};

use super::SourceHandle;
use crate::metrics::Counters;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub name: String,
    /// Send each record this many times in all (1 = once), see `repeat_delay_ms`.
    #[serde(default = "super::default_repeat")]
    pub repeat: u32,
    /// Spacing of the copies; an outage shorter than this costs one copy.
    #[serde(default = "super::default_repeat_delay")]
    pub repeat_delay_ms: u64,
    pub listen: SocketAddr,
    /// Largest chunk read into one record.
    #[serde(default = "default_chunk")]
    pub chunk_size: String,
}

fn default_chunk() -> String {
    "64KiB".into()
}

impl Config {
    pub fn validate(&self) -> Result<(), String> {
        let size = parse_size(&self.chunk_size).map_err(|e| format!("chunk_size: {e}"))?;
        if !(512..=(16 << 20)).contains(&size) {
            return Err(format!(
                "chunk_size: {} must be between 512B and 16MiB",
                self.chunk_size
            ));
        }
        Ok(())
    }
}

pub async fn run(cfg: Config, mut handle: SourceHandle) -> anyhow::Result<()> {
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        anyhow::anyhow!(
            "sources.{}: cannot listen on {} ({e}); check `listen`",
            cfg.name,
            cfg.listen
        )
    })?;
    tracing::info!(source = %cfg.name, listen = %cfg.listen, "tcp source listening");
    let chunk = parse_size(&cfg.chunk_size).expect("validated") as usize;
    let mut shutdown = handle.shutdown.clone();
    loop {
        let (mut conn, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(source = %cfg.name, "accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        Counters::add(&handle.counters().source_connections, 1);
        tracing::info!(source = %cfg.name, %peer, "connection accepted");
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
                    tracing::warn!(source = %cfg.name, %peer, "read failed, closing connection: {e}");
                    break;
                }
            }
        }
        handle.emit(RecordBody::Bytes(Chunk {
            data: Vec::new(),
            end: true,
        }));
        tracing::info!(source = %cfg.name, %peer, bytes = total, "connection closed");
    }
}
