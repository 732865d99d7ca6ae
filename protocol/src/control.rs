//! Control frames: the sender's heartbeat, which carries its status and
//! re-announces every stream so a receiver that starts late learns them.

use serde::{Deserialize, Serialize};

use crate::record::StreamInfo;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Control {
    Heartbeat(Heartbeat),
}

/// Sent every heartbeat interval, split into `parts` frames when the stream
/// list does not fit one datagram; every part carries the whole header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub session: u64,
    pub uptime_ms: u64,
    /// Every block numbered below this is sealed, and `streams[].last_seq`
    /// counts exactly the records in those blocks.
    pub next_block: u64,
    /// Hex SHA-256 of the sender's effective configuration.
    pub config_hash: String,
    /// Sender counters (name, value) supplied by the driver.
    pub counters: Vec<(String, u64)>,
    pub part: u16,
    pub parts: u16,
    pub streams: Vec<StreamStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub info: StreamInfo,
    /// Last sequence number sealed into a block, None before the first record.
    pub last_seq: Option<u64>,
}
