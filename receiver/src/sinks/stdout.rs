//! `stdout`: every record as a JSON line on standard output.

use std::io::Write;

use serde::{Deserialize, Serialize};
use weir_protocol::decoder::Delivered;

use super::{default_streams, json_line, Sink, SinkError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub name: String,
    #[serde(default = "default_streams")]
    pub streams: Vec<String>,
}

/// Bytes of lines collected before they go to standard output in one
/// write; a batch is written out at its end in any case (`flush`).
const WRITE_BYTES: usize = 1 << 16;

pub struct StdoutSink {
    /// Lines not yet written: a batch becomes one write, not one per record.
    lines: Vec<u8>,
}

impl StdoutSink {
    pub fn new() -> Self {
        StdoutSink {
            lines: Vec::with_capacity(WRITE_BYTES),
        }
    }

    fn write_out(&mut self) -> std::io::Result<()> {
        // Taken before the write: after a failed write the batch is
        // offered again whole, so nothing of it may stay behind twice.
        let result = std::io::stdout().lock().write_all(&self.lines);
        self.lines.clear();
        result
    }
}

impl Sink for StdoutSink {
    fn write(&mut self, records: &[&Delivered]) -> Result<(), SinkError> {
        for r in records {
            json_line::write_record(&mut self.lines, r);
            self.lines.push(b'\n');
            if self.lines.len() >= WRITE_BYTES {
                self.write_out()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.write_out()?;
        Ok(std::io::stdout().lock().flush()?)
    }
}
