//! Settings of the encoder and decoder state machines, with the defaults the
//! binaries use and validation that names the configuration key to fix.

use thiserror::Error;

use crate::frame::{max_shard_for_mtu, shard_size_for_mtu, MAX_SHARDS};
use crate::{Nanos, NANOS_PER_MILLI, NANOS_PER_SEC};

/// Deepest interleave accepted; the decoder also uses it to decide how far
/// before the first block it sees a late-joined session may have started.
pub const MAX_INTERLEAVE: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The configuration key, as written in the TOML file (`fec.data_shards`).
    pub key: &'static str,
    pub message: String,
}

fn fail(key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError {
        key,
        message: message.into(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Random at each sender start; tells the receiver a new session began.
    pub session: u64,
    /// Shard payload bytes per datagram; see [`shard_size_for_mtu`].
    pub shard_size: usize,
    pub data_shards: usize,
    pub parity_shards: usize,
    /// Blocks in flight at once (owing data or configured parity), whose
    /// shards interleave: under backlog a burst of B lost datagrams costs
    /// each block about B / interleave shards.
    pub interleave: usize,
    /// Longest a record waits in a part-filled block before it is sealed
    /// (while no sealed block waits for the link).
    pub flush_after: Nanos,
    pub heartbeat_interval: Nanos,
    /// No data frame for this long counts as idle: the next blocks get
    /// `warmup_parity` because links lose a cluster of datagrams on wake-up.
    pub idle_after: Nanos,
    pub warmup_blocks: usize,
    pub warmup_parity: usize,
    /// Sealed blocks waiting for the pacer; `Encoder::is_backlogged` turns
    /// true at this bound so memory stays bounded.
    pub max_queued_blocks: usize,
    /// The link's capacity in bytes per second, counting `wire_overhead`
    /// per datagram (what the sender's pacer allows). Used to measure how
    /// much of the link is idle and to time the spread.
    pub link_rate: u64,
    /// Bytes a datagram costs on the link beyond its UDP payload.
    pub wire_overhead: usize,
    /// Most parity shards a block may carry when the link has idle capacity
    /// (configured plus spare parity); never below the configured parity.
    pub spare_parity_max: usize,
    /// Consecutive datagrams a burst may take without costing any block
    /// more than its parity: each block's shards are spread over the time
    /// the link needs for burst_tolerance × (k + m) / m datagrams.
    /// 0 sends each block's shards back to back.
    pub burst_tolerance: usize,
    /// Longest time one block's shards take: they are planned over at most
    /// half of it, and a block that fell behind catches up from
    /// `t0 + max_spread` on. Bounds the added latency.
    pub max_spread: Nanos,
}

impl EncoderConfig {
    /// Defaults for a 1500-byte MTU and a 1 Gbit/s link: RS(64,16) is 20% of
    /// the wire as parity at full load, where interleave 24 spaces a block's
    /// shards 24 datagrams apart (a 384-datagram burst costs it at most its
    /// 16 parity); below full load spare parity and spreading keep that
    /// burst tolerance (docs/wire-format.md, "Spreading and interleaving").
    pub fn new(session: u64) -> Self {
        EncoderConfig {
            session,
            shard_size: shard_size_for_mtu(1500).expect("1500 is a valid MTU"),
            data_shards: 64,
            parity_shards: 16,
            interleave: 24,
            flush_after: 5 * NANOS_PER_MILLI,
            heartbeat_interval: NANOS_PER_SEC,
            idle_after: NANOS_PER_SEC,
            warmup_blocks: 4,
            warmup_parity: 32,
            max_queued_blocks: 64,
            link_rate: 1_000_000_000 / 8,
            wire_overhead: 66,
            spare_parity_max: 64,
            burst_tolerance: 384,
            max_spread: 200 * NANOS_PER_MILLI,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_shards == 0 {
            return fail("fec.data_shards", "must be at least 1");
        }
        if self.data_shards + self.parity_shards > MAX_SHARDS {
            return fail(
                "fec.parity_shards",
                format!(
                    "data_shards + parity_shards is {} but Reed-Solomon over GF(256) allows at most 256",
                    self.data_shards + self.parity_shards
                ),
            );
        }
        if self.interleave == 0 || self.interleave > MAX_INTERLEAVE {
            return fail(
                "fec.interleave",
                format!(
                    "must be between 1 and {MAX_INTERLEAVE}, got {}",
                    self.interleave
                ),
            );
        }
        if self.shard_size < 64 || self.shard_size > u16::MAX as usize {
            return fail(
                "link.mtu",
                format!(
                    "gives a shard size of {} bytes; the MTU must be between 164 and 65535",
                    self.shard_size
                ),
            );
        }
        if self.data_shards + self.warmup_parity > MAX_SHARDS {
            return fail(
                "fec.warmup_parity",
                "data_shards + warmup_parity must not exceed 256",
            );
        }
        if self.heartbeat_interval == 0 {
            return fail("heartbeat.interval", "must be greater than zero");
        }
        if self.link_rate == 0 {
            return fail("link.rate", "must be greater than zero");
        }
        if self.data_shards + self.spare_parity_max > MAX_SHARDS {
            return fail(
                "fec.spare_parity_max",
                "data_shards + spare_parity_max must not exceed 256",
            );
        }
        if self.max_queued_blocks < self.interleave {
            return fail(
                "internal.max_queued_blocks",
                "must hold at least `interleave` blocks",
            );
        }
        Ok(())
    }

    /// Bytes of records one full block carries (before entry headers).
    pub fn block_capacity(&self) -> usize {
        self.data_shards * self.shard_size
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderConfig {
    /// Blocks held at once while waiting for missing shards or earlier
    /// blocks; a block this far behind the newest is given up.
    pub max_blocks_in_flight: usize,
    /// A missing block is given up once a later block has waited this long.
    pub block_timeout: Nanos,
    /// Largest reassembled record accepted; bigger ones are dropped and counted.
    pub max_record_size: usize,
    /// Distinct stream names tracked; more are rejected and counted.
    pub max_streams: usize,
    /// Largest shard accepted (from the receiver's MTU); bounds the memory a
    /// pending block can take: at most 256 shards of this size.
    pub max_shard_len: usize,
    /// Largest k (data shards per block) accepted; frames with more are
    /// rejected and counted (`rejected_fec_shape`). Bounds the Reed-Solomon
    /// work per block and the size of the matrices the codec cache keeps.
    pub max_data_shards: usize,
    /// Largest m (parity shards per block) accepted, likewise.
    pub max_parity_shards: usize,
    /// Set by the receiver when every frame's authentication tag is checked
    /// before the decoder sees it. Only then may a newer session take over,
    /// or the window jump far ahead, without waiting for the live session to
    /// fall silent: an authenticated frame can only be a genuine one or a
    /// replay, and replays are never newer than the live session.
    pub frames_authenticated: bool,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        DecoderConfig {
            // 256 blocks of RS(64,16) at 1416-byte shards is about 28 MiB;
            // hostile headers (k + m = 256) could make it about 90 MiB.
            max_blocks_in_flight: 256,
            block_timeout: 300 * NANOS_PER_MILLI,
            max_record_size: 16 << 20,
            max_streams: 4096,
            max_shard_len: max_shard_for_mtu(1500).expect("valid MTU"),
            // Twice the sender's default k = 64, and its warm-up parity 32
            // twice over: room for a larger configured sender, while a hostile
            // k = 255 block (about 65 KB per inverted matrix) is refused.
            max_data_shards: 128,
            max_parity_shards: 64,
            frames_authenticated: false,
        }
    }
}

/// Largest `decoder.max_blocks_in_flight` accepted: 65536 blocks of
/// RS(64,16) at 1416-byte shards would already hold about 7 GiB.
pub const MAX_BLOCKS_IN_FLIGHT: usize = 1 << 16;

/// A sender session id that grows across sender restarts: the wall clock in
/// milliseconds since the Unix epoch in the high 44 bits (enough until the
/// year 2527) and 20 random bits below, so two senders started in the same
/// millisecond still differ. The receiver lets a newer id take over a live
/// session sooner than an older one (see `decoder.rs`, "Sessions"), so
/// replays of an earlier session cannot displace the live one.
pub fn session_id(unix_ms: u64, random: u64) -> u64 {
    /// Milliseconds that fit the 44 high bits.
    const MAX_MS: u64 = (1 << 44) - 1;
    (unix_ms.min(MAX_MS) << SESSION_RANDOM_BITS) | (random & ((1 << SESSION_RANDOM_BITS) - 1))
}

/// [`session_id`] for a wall-clock reading the caller took (this crate reads
/// no clock); a clock before 1970 counts as 0.
pub fn session_id_at(wall_clock: std::time::SystemTime, random: u64) -> u64 {
    let unix_ms = wall_clock
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    session_id(unix_ms, random)
}

/// Low bits of a session id that are random.
pub const SESSION_RANDOM_BITS: u32 = 20;

impl DecoderConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_blocks_in_flight < 2 * MAX_INTERLEAVE {
            return fail(
                "decoder.max_blocks_in_flight",
                format!("must be at least {}", 2 * MAX_INTERLEAVE),
            );
        }
        if self.block_timeout == 0 {
            return fail("decoder.block_timeout_ms", "must be greater than zero");
        }
        if self.max_blocks_in_flight > MAX_BLOCKS_IN_FLIGHT {
            return fail(
                "decoder.max_blocks_in_flight",
                format!("must be at most {MAX_BLOCKS_IN_FLIGHT}"),
            );
        }
        if self.max_streams == 0 {
            return fail("decoder.max_streams", "must be at least 1");
        }
        if self.max_data_shards == 0 || self.max_data_shards > MAX_SHARDS {
            return fail(
                "fec.max_data_shards",
                format!(
                    "must be between 1 and {MAX_SHARDS}, got {}",
                    self.max_data_shards
                ),
            );
        }
        if self.max_parity_shards >= MAX_SHARDS {
            return fail(
                "fec.max_parity_shards",
                format!("must be below {MAX_SHARDS}, got {}", self.max_parity_shards),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        EncoderConfig::new(1).validate().unwrap();
        DecoderConfig::default().validate().unwrap();
    }

    #[test]
    fn session_ids_grow_with_the_clock_whatever_the_random_bits() {
        let earlier = session_id(1_700_000_000_000, u64::MAX);
        let later = session_id(1_700_000_000_001, 0);
        assert!(later > earlier);
        assert_eq!(session_id(u64::MAX, 0), ((1 << 44) - 1) << 20);
    }

    #[test]
    fn fec_limits_out_of_range_name_their_key() {
        let c = DecoderConfig {
            max_data_shards: 0,
            ..DecoderConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "fec.max_data_shards");
        let c = DecoderConfig {
            max_parity_shards: 256,
            ..DecoderConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "fec.max_parity_shards");
    }

    #[test]
    fn too_many_shards_names_the_key() {
        let mut c = EncoderConfig::new(1);
        c.data_shards = 200;
        c.parity_shards = 100;
        let err = c.validate().unwrap_err();
        assert_eq!(err.key, "fec.parity_shards");
        assert!(err.to_string().contains("256"));
    }
}
