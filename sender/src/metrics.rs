//! The sender's counters: every record taken, dropped or sent is counted
//! here, published in heartbeats, in the metrics file and in status lines.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        #[derive(Debug, Default)]
        pub struct Counters { $(#[doc = $doc] pub $name: AtomicU64,)* }

        impl Counters {
            pub fn snapshot(&self) -> Vec<(String, u64)> {
                vec![$((stringify!($name).to_string(), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters! {
    records_in: "records handed over by sources and written to the spool",
    bytes_in: "payload bytes handed over by sources",
    spool_dropped_records: "records deleted unsent with the oldest spool segment (spool.max_bytes or max_age); announced as gaps",
    spool_bytes: "bytes the spool holds (sent and unsent)",
    spool_damaged_records: "records lost with a damaged spool tail after a crash; announced as gaps",
    spool_corrupt_records: "records in corrupt stretches in the middle of spool segments (or that did not decode); skipped and announced as sender-spool-corrupt gaps",
    gap_notices_sent: "dropped ranges announced to the receiver",
    resent_records: "records sent again on an operator's resend request",
    repeated_records: "extra copies sent for streams with `repeat`",
    repeat_skipped: "copies not sent because REPEAT_LIMIT bytes of copies were already waiting",
    source_connections: "connections accepted by tcp sources",
    records_sent: "records packed into blocks",
    datagrams_sent: "UDP datagrams sent on the link",
    wire_bytes_sent: "UDP payload bytes sent on the link",
    send_errors: "sends the kernel refused; their datagrams are lost and show up as repairs or gaps",
    blocks_sent: "FEC blocks sealed",
    parity_frames: "parity shards sent",
    pacer_waits: "times the pacer held back a batch to keep to the link rate",
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Writes a JSON object of all counters atomically (temp file + rename).
    pub fn write_file(
        &self,
        path: &Path,
        extra: &[(&str, serde_json::Value)],
    ) -> std::io::Result<()> {
        let mut map = serde_json::Map::new();
        for (k, v) in self.snapshot() {
            map.insert(k, v.into());
        }
        for (k, v) in extra {
            map.insert((*k).to_string(), v.clone());
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&map).expect("json"))?;
        std::fs::rename(tmp, path)
    }
}
