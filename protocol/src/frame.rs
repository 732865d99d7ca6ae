//! Frames: one UDP datagram each. A fixed header, a shard, and a CRC32 over both.
//!
//! ```text
//! offset size field
//!  0     2    magic 0x57 0x52 ("WR")
//!  2     1    version (2)
//!  3     1    flags (bit 0: control frame)
//!  4     8    session id (random per sender start)
//! 12     8    block number (data) or control sequence (control)
//! 20     2    shard index within the block (0..k+m)
//! 22     2    k: data shards in this block
//! 24     2    m: parity shards in this block
//! 26     2    shard length in bytes
//! 28     4    data length: bytes of block data before padding
//! 32     n    shard
//! 32+n   4    CRC32 (IEEE) of bytes 0..32+n
//! ```
//! All integers are big-endian.

use thiserror::Error;

pub const MAGIC: [u8; 2] = *b"WR";
/// 2: records carry `resent`, stream infos an `epoch`, blocks gap notices.
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 32;
pub const CRC_LEN: usize = 4;
/// Bytes a frame adds around its shard.
pub const FRAME_OVERHEAD: usize = HEADER_LEN + CRC_LEN;
/// IPv4 (20) + UDP (8) header bytes the MTU must also hold.
pub const IP_UDP_OVERHEAD: usize = 28;
/// Reed-Solomon over GF(2^8) allows at most 256 shards per block.
pub const MAX_SHARDS: usize = 256;

pub const FLAG_CONTROL: u8 = 0x01;
const KNOWN_FLAGS: u8 = FLAG_CONTROL;

/// The shard payload size that fits a link MTU: the largest shard whose frame
/// still fits one unfragmented IPv4 UDP datagram.
pub fn shard_size_for_mtu(mtu: usize) -> Option<usize> {
    shard_size_for(mtu, false)
}

/// As [`shard_size_for_mtu`], for IPv6 (a 40-byte IP header) when `ipv6`.
pub fn shard_size_for(mtu: usize, ipv6: bool) -> Option<usize> {
    let ip = if ipv6 {
        IP_UDP_OVERHEAD + 20
    } else {
        IP_UDP_OVERHEAD
    };
    mtu.checked_sub(ip + FRAME_OVERHEAD)
        .filter(|s| *s >= 64 && *s <= u16::MAX as usize - FRAME_OVERHEAD - ip)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub flags: u8,
    pub session: u64,
    pub block: u64,
    pub index: u16,
    pub k: u16,
    pub m: u16,
    pub shard_len: u16,
    pub data_len: u32,
}

impl FrameHeader {
    pub fn is_control(&self) -> bool {
        self.flags & FLAG_CONTROL != 0
    }

    /// Writes header, shard and CRC into `out`; returns the frame length.
    /// Panics if `out` is too small or `shard` is not `shard_len` long: both are
    /// the caller's invariants, not input from outside.
    pub fn write(&self, shard: &[u8], out: &mut [u8]) -> usize {
        assert_eq!(
            shard.len(),
            self.shard_len as usize,
            "shard length matches header"
        );
        let total = HEADER_LEN + shard.len() + CRC_LEN;
        assert!(out.len() >= total, "frame buffer too small");
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[3] = self.flags;
        out[4..12].copy_from_slice(&self.session.to_be_bytes());
        out[12..20].copy_from_slice(&self.block.to_be_bytes());
        out[20..22].copy_from_slice(&self.index.to_be_bytes());
        out[22..24].copy_from_slice(&self.k.to_be_bytes());
        out[24..26].copy_from_slice(&self.m.to_be_bytes());
        out[26..28].copy_from_slice(&self.shard_len.to_be_bytes());
        out[28..32].copy_from_slice(&self.data_len.to_be_bytes());
        out[HEADER_LEN..HEADER_LEN + shard.len()].copy_from_slice(shard);
        let crc = crc32fast::hash(&out[..HEADER_LEN + shard.len()]);
        out[HEADER_LEN + shard.len()..total].copy_from_slice(&crc.to_be_bytes());
        total
    }

    /// Parses and checks a datagram; returns the header and the shard bytes.
    pub fn parse(datagram: &[u8]) -> Result<(FrameHeader, &[u8]), FrameError> {
        if datagram.len() < FRAME_OVERHEAD {
            return Err(FrameError::Truncated {
                len: datagram.len(),
            });
        }
        if datagram[0..2] != MAGIC {
            return Err(FrameError::BadMagic);
        }
        if datagram[2] != VERSION {
            return Err(FrameError::UnsupportedVersion(datagram[2]));
        }
        let be16 = |at: usize| u16::from_be_bytes([datagram[at], datagram[at + 1]]);
        let be32 =
            |at: usize| u32::from_be_bytes(datagram[at..at + 4].try_into().expect("4 bytes"));
        let be64 =
            |at: usize| u64::from_be_bytes(datagram[at..at + 8].try_into().expect("8 bytes"));
        let header = FrameHeader {
            flags: datagram[3],
            session: be64(4),
            block: be64(12),
            index: be16(20),
            k: be16(22),
            m: be16(24),
            shard_len: be16(26),
            data_len: be32(28),
        };
        let expected = FRAME_OVERHEAD + header.shard_len as usize;
        if datagram.len() != expected {
            return Err(FrameError::LengthMismatch {
                len: datagram.len(),
                expected,
            });
        }
        let body_end = HEADER_LEN + header.shard_len as usize;
        let crc = be32(body_end);
        if crc32fast::hash(&datagram[..body_end]) != crc {
            return Err(FrameError::BadCrc);
        }
        header.validate()?;
        Ok((header, &datagram[HEADER_LEN..body_end]))
    }

    fn validate(&self) -> Result<(), FrameError> {
        let invalid = |why: &'static str| Err(FrameError::InvalidHeader(why));
        if self.flags & !KNOWN_FLAGS != 0 {
            return invalid("unknown flag bits set");
        }
        if self.k == 0 {
            return invalid("k (data shards) is zero");
        }
        if self.k as usize + self.m as usize > MAX_SHARDS {
            return invalid("k + m exceeds 256 shards");
        }
        if self.index >= self.k + self.m {
            return invalid("shard index beyond k + m");
        }
        if self.shard_len == 0 {
            return invalid("shard length is zero");
        }
        if self.data_len as usize > self.k as usize * self.shard_len as usize {
            return invalid("data length exceeds k shards");
        }
        if self.is_control()
            && (self.k != 1 || self.m != 0 || self.data_len != self.shard_len as u32)
        {
            return invalid("control frame must be a single unpadded shard");
        }
        Ok(())
    }
}

/// Why a datagram was not accepted as a frame. Each maps to a counter.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("datagram of {len} bytes is shorter than a frame header and CRC")]
    Truncated { len: usize },
    #[error("datagram does not start with the weir magic bytes")]
    BadMagic,
    #[error("frame version {0} is not supported (this receiver speaks version 2)")]
    UnsupportedVersion(u8),
    #[error("datagram is {len} bytes but its header says {expected}")]
    LengthMismatch { len: usize, expected: usize },
    #[error("CRC32 mismatch: the frame was corrupted in transit")]
    BadCrc,
    #[error("invalid frame header: {0}")]
    InvalidHeader(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(shard_len: u16) -> FrameHeader {
        FrameHeader {
            flags: 0,
            session: 7,
            block: 42,
            index: 3,
            k: 4,
            m: 2,
            shard_len,
            data_len: 10,
        }
    }

    #[test]
    fn frame_round_trips_and_rejects_any_flipped_bit() {
        let shard = vec![0xAB; 16];
        let mut buf = [0u8; 128];
        let n = header(16).write(&shard, &mut buf);
        let (h, s) = FrameHeader::parse(&buf[..n]).unwrap();
        assert_eq!(h, header(16));
        assert_eq!(s, &shard[..]);
        for bit in 0..n * 8 {
            let mut bad = buf[..n].to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                FrameHeader::parse(&bad).is_err(),
                "bit {bit} flipped was accepted"
            );
        }
    }

    #[test]
    fn mtu_1500_gives_1436_byte_shards_and_jumbo_works() {
        assert_eq!(shard_size_for_mtu(1500), Some(1436));
        assert_eq!(shard_size_for_mtu(9000), Some(8936));
        assert_eq!(shard_size_for_mtu(80), None);
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = FrameHeader::parse(&bytes);
        }

        #[test]
        fn any_valid_header_round_trips(session in any::<u64>(), block in any::<u64>(), k in 1u16..=200, m in 0u16..=56,
                                        shard in proptest::collection::vec(any::<u8>(), 1..300)) {
            let h = FrameHeader { flags: 0, session, block, index: k + m - 1, k, m,
                                  shard_len: shard.len() as u16, data_len: shard.len() as u32 };
            let mut buf = vec![0u8; shard.len() + FRAME_OVERHEAD];
            let n = h.write(&shard, &mut buf);
            let (h2, s2) = FrameHeader::parse(&buf[..n]).unwrap();
            prop_assert_eq!(h2, h);
            prop_assert_eq!(s2, &shard[..]);
        }
    }
}
