//! `stdout`: every record as a JSON line on standard output.

use std::io::Write;

use serde::{Deserialize, Serialize};
use weir_protocol::decoder::Delivered;

use super::{default_streams, record_json, Sink, SinkError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub name: String,
    #[serde(default = "default_streams")]
    pub streams: Vec<String>,
}

pub struct StdoutSink {
    out: std::io::BufWriter<std::io::Stdout>,
}

impl StdoutSink {
    pub fn new() -> Self {
        StdoutSink {
            out: std::io::BufWriter::with_capacity(1 << 16, std::io::stdout()),
        }
    }
}

impl Sink for StdoutSink {
    fn write(&mut self, records: &[&Delivered]) -> Result<(), SinkError> {
        for r in records {
            serde_json::to_writer(&mut self.out, &record_json(r))
                .map_err(|e| SinkError::Retry(e.into()))?;
            self.out.write_all(b"\n")?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        Ok(self.out.flush()?)
    }
}
