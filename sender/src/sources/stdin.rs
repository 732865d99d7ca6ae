//! `stdin`: lines become `Message` records (topic = `topic` or the source
//! name), or raw bytes become a `Bytes` stream. The source finishes at EOF.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use weir_protocol::{Chunk, Message, RecordBody};

use super::{now_ns, Source, SourceHandle};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Lines,
    Raw,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Topic of line messages; default: the source name.
    #[serde(default)]
    pub topic: Option<String>,
}

fn default_mode() -> Mode {
    Mode::Lines
}

/// Longest line kept whole; a longer one is split into messages of this size.
const MAX_LINE: usize = 1 << 20;
const RAW_CHUNK: usize = 64 * 1024;

impl Source for Config {
    const TYPE: &'static str = "stdin";

    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    async fn run(self, handle: SourceHandle) -> anyhow::Result<()> {
        run(self, handle).await
    }
}

async fn run(cfg: Config, mut handle: SourceHandle) -> anyhow::Result<()> {
    let name = handle.stream().to_string();
    let stdin = tokio::io::stdin();
    match cfg.mode {
        Mode::Lines => {
            let topic = cfg.topic.clone().unwrap_or_else(|| name.clone());
            let mut reader = BufReader::with_capacity(256 * 1024, stdin);
            let mut line = Vec::new();
            loop {
                if !handle.wait_for_room().await {
                    return Ok(());
                }
                line.clear();
                let n = (&mut reader)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut line)
                    .await?;
                if n == 0 {
                    break;
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                }
                handle.emit(RecordBody::Message(Message::new(
                    topic.clone(),
                    line.clone(),
                    now_ns(),
                )));
            }
        }
        Mode::Raw => {
            let mut stdin = stdin;
            let mut buf = vec![0u8; RAW_CHUNK];
            loop {
                if !handle.wait_for_room().await {
                    return Ok(());
                }
                let n = stdin.read(&mut buf).await?;
                if n == 0 {
                    handle.emit(RecordBody::Bytes(Chunk {
                        data: Vec::new(),
                        end: true,
                    }));
                    break;
                }
                handle.emit(RecordBody::Bytes(Chunk {
                    data: buf[..n].to_vec(),
                    end: false,
                }));
            }
        }
    }
    tracing::info!(source = %name, "stdin reached end of input");
    Ok(())
}
