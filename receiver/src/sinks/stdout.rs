//! `stdout`: every record as a JSON line on standard output.

use std::io::Write;

use serde::{Deserialize, Serialize};
use weir_protocol::decoder::Delivered;

use super::{json_line, BuildContext, Sink, SinkBuilder, SinkError};

/// No keys of its own: `name` and `streams` are every sink's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

impl SinkBuilder for Config {
    const TYPE: &'static str = "stdout";

    fn build(&self, _ctx: &BuildContext) -> anyhow::Result<Box<dyn Sink>> {
        Ok(Box::new(StdoutSink::new()))
    }
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
    /// Confirmed once written to standard output and flushed: what a pipe
    /// can say. A failure writes the whole batch again.
    fn write(&mut self, records: &[&Delivered]) -> Result<usize, SinkError> {
        for r in records {
            json_line::write_record(&mut self.lines, r);
            self.lines.push(b'\n');
            if self.lines.len() >= WRITE_BYTES {
                self.write_out()?;
            }
        }
        self.write_out()?;
        std::io::stdout().lock().flush()?;
        Ok(records.len())
    }
}
