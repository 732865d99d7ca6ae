//! Frames: one UDP datagram each. A fixed header, a shard (encrypted unless
//! authentication is disabled), an AES-256-GCM tag over both, and a CRC32
//! over everything before it.
//!
//! ```text
//! offset size field
//!  0     2    magic 0x57 0x52 ("WR")
//!  2     1    version (4)
//!  3     1    flags (bit 0: control frame; bit 1: unauthenticated)
//!  4     4    key id of the sealing key (0 in unauthenticated frames)
//!  8     8    session id (random per sender start)
//! 16     8    block number (data) or control sequence (control)
//! 24     2    shard index within the block (0..k+m)
//! 26     2    k: data shards in this block
//! 28     2    m: parity shards in this block
//! 30     2    shard length n in bytes
//! 32     4    data length: bytes of block data before padding
//! 36     n    shard: AES-256-GCM ciphertext under the session subkey, with
//!             bytes 0..36 as associated data (plaintext when unauthenticated)
//! 36+n  16    tag: the GCM tag (absent when flag bit 1 is set)
//! 52+n   4    CRC32 (IEEE) of every byte before it (at 36+n when unauthenticated)
//! ```
//! All integers are big-endian. The GCM nonce is not sent: it is the
//! frame's place in its session (control flag, block, index), and the key
//! is derived per session (see [`crate::auth`] and docs/wire-format.md).
//!
//! The receiver checks, in this order and before any decoder state or FEC
//! is touched: length, magic, version, length against the header, the
//! header's values (all cheap, so garbage costs little), CRC32 (link
//! corruption), then the tag (forgery) with the key named by the key id,
//! decrypting the shard in place. The tag covers every header field, so a
//! replayed frame cannot be altered (e.g. moved to another block or
//! session) without failing it; rejecting replays of unaltered frames is
//! the decoder's job. See [`crate::auth`].

use thiserror::Error;

use crate::auth::{AuthError, FrameId, Signer, Verifier, KEY_ID_LEN, TAG_LEN};

pub const MAGIC: [u8; 2] = *b"WR";
/// 5: records carry the fields plant sources need (message retain, QoS,
/// user properties, origin and receive time; log proc id, msg id,
/// structured data and parse error; point status). 4: the shard is AES-256-GCM encrypted under a per-session subkey and the
/// tag is the GCM tag. (3: every frame carries a key id and, unless flagged
/// unauthenticated, an HMAC-SHA256-128 tag over the plaintext; 2: records
/// carry `resent`, stream infos an `epoch`, blocks gap notices.)
pub const VERSION: u8 = 5;
pub const HEADER_LEN: usize = 36;
pub const CRC_LEN: usize = 4;
/// Bytes an authenticated frame adds around its shard; unauthenticated
/// frames are `TAG_LEN` shorter. Shard sizes are computed with this, the
/// larger overhead, so both settings use the same shard size.
pub const FRAME_OVERHEAD: usize = HEADER_LEN + TAG_LEN + CRC_LEN;
/// The shortest datagram that can be a frame (unauthenticated, empty shard).
const MIN_FRAME_LEN: usize = HEADER_LEN + CRC_LEN;
/// IPv4 (20) + UDP (8) header bytes the MTU must also hold.
pub const IP_UDP_OVERHEAD: usize = 28;
/// Reed-Solomon over GF(2^8) allows at most 256 shards per block.
pub const MAX_SHARDS: usize = 256;

pub const FLAG_CONTROL: u8 = 0x01;
/// The frame has no tag: both sides run with `[auth] disabled = true`.
pub const FLAG_UNAUTHENTICATED: u8 = 0x02;
const KNOWN_FLAGS: u8 = FLAG_CONTROL | FLAG_UNAUTHENTICATED;

/// Shard sizes are a multiple of this: Reed-Solomon's SIMD kernels work
/// on 32 or 64 bytes at a time and finish any remainder byte by byte, which
/// at MTU 1500 (1416 bytes, 8 over a multiple of 32) cost 6 to 17% of the
/// encoding time (docs/performance.md); the 8 bytes given up are 0.6% of a
/// frame.
pub const SHARD_ALIGN: usize = 64;

/// The shard payload size that fits a link MTU: the largest multiple of
/// [`SHARD_ALIGN`] whose frame still fits one unfragmented IPv4 UDP
/// datagram.
pub fn shard_size_for_mtu(mtu: usize) -> Option<usize> {
    shard_size_for(mtu, false)
}

/// The largest shard a frame can carry within one unfragmented IPv4 UDP
/// datagram of `mtu`, aligned or not: a receiver's bound on what it accepts
/// (`mtu − 84`), whatever alignment the sender chose.
pub fn max_shard_for_mtu(mtu: usize) -> Option<usize> {
    mtu.checked_sub(IP_UDP_OVERHEAD + FRAME_OVERHEAD)
        .filter(|s| *s >= 64 && *s <= u16::MAX as usize - FRAME_OVERHEAD - IP_UDP_OVERHEAD)
}

/// As [`shard_size_for_mtu`], for IPv6 (a 40-byte IP header) when `ipv6`.
pub fn shard_size_for(mtu: usize, ipv6: bool) -> Option<usize> {
    let ip = if ipv6 {
        IP_UDP_OVERHEAD + 20
    } else {
        IP_UDP_OVERHEAD
    };
    mtu.checked_sub(ip + FRAME_OVERHEAD)
        .map(|s| s - s % SHARD_ALIGN)
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

    /// The frame's place in its session: its GCM nonce.
    pub fn frame_id(&self) -> FrameId {
        FrameId {
            control: self.is_control(),
            block: self.block,
            index: self.index,
        }
    }

    /// Writes header, shard (encrypted in place in `out` unless `signer` is
    /// disabled), tag and CRC into `out`; returns the frame length. The
    /// unauthenticated flag in `self.flags` is ignored: `signer` decides it.
    /// The caller never writes two different shards with the same session
    /// and [`FrameHeader::frame_id`] (the encoder's invariant, see
    /// docs/wire-format.md "Why a nonce never repeats").
    /// Panics if `out` is too small or `shard` is not `shard_len` long: both are
    /// the caller's invariants, not input from outside.
    pub fn write(&self, shard: &[u8], out: &mut [u8], signer: &Signer) -> usize {
        assert_eq!(
            shard.len(),
            self.shard_len as usize,
            "shard length matches header"
        );
        let key = signer.key();
        let tag_len = if key.is_some() { TAG_LEN } else { 0 };
        let body_end = HEADER_LEN + shard.len();
        let total = body_end + tag_len + CRC_LEN;
        assert!(out.len() >= total, "frame buffer too small");
        let mut flags = self.flags & !FLAG_UNAUTHENTICATED;
        if key.is_none() {
            flags |= FLAG_UNAUTHENTICATED;
        }
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[3] = flags;
        out[4..8].copy_from_slice(&key.map_or(0, |k| k.id().0).to_be_bytes());
        out[8..16].copy_from_slice(&self.session.to_be_bytes());
        out[16..24].copy_from_slice(&self.block.to_be_bytes());
        out[24..26].copy_from_slice(&self.index.to_be_bytes());
        out[26..28].copy_from_slice(&self.k.to_be_bytes());
        out[28..30].copy_from_slice(&self.m.to_be_bytes());
        out[30..32].copy_from_slice(&self.shard_len.to_be_bytes());
        out[32..36].copy_from_slice(&self.data_len.to_be_bytes());
        out[HEADER_LEN..body_end].copy_from_slice(shard);
        if let Some(key) = key {
            let (header, rest) = out.split_at_mut(HEADER_LEN);
            let (body, after) = rest.split_at_mut(shard.len());
            let tag = key.seal(self.session, self.frame_id(), header, body);
            after[..TAG_LEN].copy_from_slice(&tag);
        }
        let crc_at = body_end + tag_len;
        let crc = crc32fast::hash(&out[..crc_at]);
        out[crc_at..total].copy_from_slice(&crc.to_be_bytes());
        total
    }

    /// Where a datagram says it belongs, read from its header alone: the
    /// session and block of a data frame, or None for a control frame or
    /// anything that is not a data frame of this version. **Unchecked**: no
    /// CRC, no tag. The decoder uses it only to drop, unread, a frame that
    /// could change nothing even if genuine (a shard of a block already
    /// rebuilt or delivered: unneeded parity, mostly), so surplus parity
    /// costs a few comparisons instead of a CRC and a decryption. A forged
    /// or corrupted frame naming such a block is dropped the same way,
    /// with the same effect as checking it first: none.
    pub fn peek_block(datagram: &[u8]) -> Option<(u64, u64)> {
        if datagram.len() < MIN_FRAME_LEN
            || datagram[0..2] != MAGIC
            || datagram[2] != VERSION
            || datagram[3] & FLAG_CONTROL != 0
        {
            return None;
        }
        let be64 =
            |at: usize| u64::from_be_bytes(datagram[at..at + 8].try_into().expect("8 bytes"));
        Some((be64(8), be64(16)))
    }

    /// Parses and checks a datagram, authentication included, and decrypts
    /// its shard in place; returns the header and the plaintext shard.
    /// Nothing of the datagram is used before its CRC and tag are checked;
    /// on an error the datagram's bytes are unspecified.
    pub fn parse<'a>(
        datagram: &'a mut [u8],
        verifier: &mut Verifier,
    ) -> Result<(FrameHeader, &'a [u8]), FrameError> {
        if datagram.len() < MIN_FRAME_LEN {
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
        let bytes: &[u8] = datagram;
        let be16 = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let flags = bytes[3];
        let authenticated = flags & FLAG_UNAUTHENTICATED == 0;
        let tag_len = if authenticated { TAG_LEN } else { 0 };
        let shard_len = be16(30);
        let body_end = HEADER_LEN + shard_len as usize;
        let expected = body_end + tag_len + CRC_LEN;
        if bytes.len() != expected {
            return Err(FrameError::LengthMismatch {
                len: bytes.len(),
                expected,
            });
        }
        const _: () = assert!(KEY_ID_LEN == 4, "the key id field is a u32");
        let key_id = be32(4);
        let header = FrameHeader {
            flags,
            session: be64(8),
            block: be64(16),
            index: be16(24),
            k: be16(26),
            m: be16(28),
            shard_len,
            data_len: be32(32),
        };
        // The header's values before the CRC: a datagram that cannot be a
        // frame costs a few comparisons, not a pass over its bytes.
        header.validate()?;
        let crc_at = body_end + tag_len;
        if crc32fast::hash(&bytes[..crc_at]) != be32(crc_at) {
            return Err(FrameError::BadCrc);
        }
        let (head, rest) = datagram.split_at_mut(HEADER_LEN);
        let (shard, after) = rest.split_at_mut(shard_len as usize);
        let tag = authenticated.then(|| &after[..TAG_LEN]);
        verifier.open(key_id, header.session, header.frame_id(), head, shard, tag)?;
        if !authenticated && key_id != 0 {
            return Err(FrameError::InvalidHeader(
                "key id set in an unauthenticated frame",
            ));
        }
        Ok((header, shard))
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
    #[error("frame version {0} is not supported (this receiver speaks version {VERSION})")]
    UnsupportedVersion(u8),
    #[error("datagram is {len} bytes but its header says {expected}")]
    LengthMismatch { len: usize, expected: usize },
    #[error("CRC32 mismatch: the frame was corrupted in transit")]
    BadCrc,
    #[error("invalid frame header: {0}")]
    InvalidHeader(&'static str),
    #[error("authentication failed: {0}")]
    Auth(#[from] AuthError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Key, KEY_LEN};
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

    fn key(byte: u8) -> Key {
        Key::from_bytes(&[byte; KEY_LEN]).unwrap()
    }

    fn signer(byte: u8) -> Signer {
        Signer::Key(key(byte))
    }

    fn verifier(bytes: &[u8]) -> Verifier {
        Verifier::new(bytes.iter().map(|b| key(*b)).collect()).unwrap()
    }

    /// Parses a copy of `bytes` (parsing decrypts in place) with a fresh
    /// verifier; returns the header and the plaintext shard.
    fn parse(bytes: &[u8], mut v: Verifier) -> Result<(FrameHeader, Vec<u8>), FrameError> {
        let mut copy = bytes.to_vec();
        FrameHeader::parse(&mut copy, &mut v).map(|(h, s)| (h, s.to_vec()))
    }

    /// Rewrites the CRC of a whole frame after it was altered.
    fn fix_crc(frame: &mut [u8]) {
        let n = frame.len();
        let crc = crc32fast::hash(&frame[..n - CRC_LEN]);
        frame[n - CRC_LEN..].copy_from_slice(&crc.to_be_bytes());
    }

    #[test]
    fn authenticated_frame_round_trips_and_rejects_any_flipped_bit() {
        let shard = vec![0xAB; 16];
        let mut buf = [0u8; 128];
        let n = header(16).write(&shard, &mut buf, &signer(1));
        assert_eq!(n, 16 + FRAME_OVERHEAD);
        let (h, s) = parse(&buf[..n], verifier(&[1])).unwrap();
        assert_eq!(h, header(16));
        assert_eq!(s, shard);
        for bit in 0..n * 8 {
            let mut bad = buf[..n].to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                parse(&bad, verifier(&[1])).is_err(),
                "bit {bit} flipped was accepted"
            );
        }
    }

    /// A forger who recomputes the CRC after altering a header field, the
    /// encrypted shard or the tag is caught by the GCM tag, whatever bit it
    /// changed (or, for a header value made invalid, by the header check).
    #[test]
    fn any_altered_bit_with_a_recomputed_crc_fails_the_tag() {
        let shard = vec![0x5A; 24];
        let mut buf = [0u8; 128];
        let n = header(24).write(&shard, &mut buf, &signer(1));
        let body_end = HEADER_LEN + 24;
        for bit in 0..(n - CRC_LEN) * 8 {
            let mut bad = buf[..n].to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            fix_crc(&mut bad);
            let err = parse(&bad, verifier(&[1])).unwrap_err();
            let byte = bit / 8;
            if byte < 4 || byte == 30 || byte == 31 {
                // magic, version, flags, shard length: structure checks
                // come first and reject before the tag is looked at.
                continue;
            }
            let bad_tag = matches!(err, FrameError::Auth(AuthError::BadTag(_)));
            if (4..8).contains(&byte) {
                assert!(
                    matches!(err, FrameError::Auth(AuthError::UnknownKey(_))),
                    "bit {bit}: {err}"
                );
            } else if (24..HEADER_LEN).contains(&byte) {
                // index, k, m, data length: checked before the CRC.
                assert!(
                    bad_tag || matches!(err, FrameError::InvalidHeader(_)),
                    "bit {bit}: {err}"
                );
            } else {
                assert!(
                    bad_tag,
                    "bit {bit} (byte {byte}, body ends at {body_end}): {err}"
                );
            }
        }
    }

    #[test]
    fn the_shard_is_encrypted_on_the_wire_and_decrypted_by_parse() {
        let shard = b"a plaintext record that must not be readable on the link".to_vec();
        let len = shard.len();
        let mut buf = [0u8; 256];
        let n = header(len as u16).write(&shard, &mut buf, &signer(1));
        let wire = &buf[HEADER_LEN..HEADER_LEN + len];
        assert_ne!(wire, &shard[..]);
        assert!(
            wire.windows(8).all(|w| !shard.windows(8).any(|p| p == w)),
            "no 8 plaintext bytes appear on the wire"
        );
        let (_, plain) = parse(&buf[..n], verifier(&[1])).unwrap();
        assert_eq!(plain, shard);
    }

    /// A genuine frame replayed with another session id (CRC recomputed)
    /// fails: the session selects the subkey and is associated data.
    #[test]
    fn a_frame_replayed_under_another_session_id_fails_the_tag() {
        let shard = vec![0x77; 32];
        let mut buf = [0u8; 128];
        let n = header(32).write(&shard, &mut buf, &signer(1));
        for other in [8u64, 6, 7 ^ (1 << 63)] {
            let mut replay = buf[..n].to_vec();
            replay[8..16].copy_from_slice(&other.to_be_bytes());
            fix_crc(&mut replay);
            assert_eq!(
                parse(&replay, verifier(&[1])),
                Err(FrameError::Auth(AuthError::BadTag(key(1).id()))),
                "session {other}"
            );
        }
        // Moved to another block or shard index, or made a control frame.
        for (at, value) in [(23usize, 43u8), (25, 2)] {
            let mut moved = buf[..n].to_vec();
            moved[at] = value;
            fix_crc(&mut moved);
            assert_eq!(
                parse(&moved, verifier(&[1])),
                Err(FrameError::Auth(AuthError::BadTag(key(1).id())))
            );
        }
    }

    #[test]
    fn a_version_3_frame_is_rejected_as_unsupported_version() {
        let shard = vec![1; 16];
        let mut buf = [0u8; 128];
        let n = header(16).write(&shard, &mut buf, &signer(1));
        buf[2] = 3;
        fix_crc(&mut buf[..n]);
        let err = parse(&buf[..n], verifier(&[1])).unwrap_err();
        assert_eq!(err, FrameError::UnsupportedVersion(3));
        assert!(err.to_string().contains("speaks version 5"), "{err}");
    }

    /// Header values are checked before the CRC is computed, so garbage
    /// shaped like a frame is refused without a pass over its bytes.
    #[test]
    fn an_invalid_header_is_refused_before_the_crc() {
        let shard = vec![1; 16];
        let mut buf = [0u8; 128];
        let n = header(16).write(&shard, &mut buf, &signer(1));
        buf[26..28].copy_from_slice(&0u16.to_be_bytes()); // k = 0, CRC now wrong
        assert_eq!(
            parse(&buf[..n], verifier(&[1])),
            Err(FrameError::InvalidHeader("k (data shards) is zero"))
        );
    }

    #[test]
    fn a_frame_tagged_with_another_key_is_rejected_as_unknown_key() {
        let shard = vec![1; 16];
        let mut buf = [0u8; 128];
        let n = header(16).write(&shard, &mut buf, &signer(2));
        assert_eq!(
            parse(&buf[..n], verifier(&[1])),
            Err(FrameError::Auth(AuthError::UnknownKey(key(2).id())))
        );
    }

    #[test]
    fn a_forged_frame_carrying_a_genuine_key_id_fails_the_tag() {
        let shard = vec![1; 16];
        let mut buf = [0u8; 128];
        let n = header(16).write(&shard, &mut buf, &signer(2));
        // Claim key 1's id and fix the CRC: the tag was made with key 2.
        buf[4..8].copy_from_slice(&key(1).id().0.to_be_bytes());
        fix_crc(&mut buf[..n]);
        assert_eq!(
            parse(&buf[..n], verifier(&[1])),
            Err(FrameError::Auth(AuthError::BadTag(key(1).id())))
        );
    }

    #[test]
    fn during_a_rotation_frames_of_either_key_are_accepted() {
        let shard = vec![9; 16];
        let both = || verifier(&[1, 2]);
        for k in [1, 2] {
            let mut buf = [0u8; 128];
            let n = header(16).write(&shard, &mut buf, &signer(k));
            assert!(parse(&buf[..n], both()).is_ok(), "key {k}");
        }
    }

    #[test]
    fn unauthenticated_frames_keep_a_crc_and_match_only_a_disabled_receiver() {
        let shard = vec![3; 16];
        let mut buf = [0u8; 128];
        let n = header(16).write(&shard, &mut buf, &Signer::Disabled);
        assert_eq!(n, 16 + HEADER_LEN + CRC_LEN);
        assert_eq!(buf[3] & FLAG_UNAUTHENTICATED, FLAG_UNAUTHENTICATED);
        let (h, s) = parse(&buf[..n], Verifier::disabled()).unwrap();
        assert_eq!(h.flags & !FLAG_UNAUTHENTICATED, 0);
        assert_eq!(s, shard);
        assert_eq!(
            parse(&buf[..n], verifier(&[1])),
            Err(FrameError::Auth(AuthError::Unauthenticated))
        );
        for bit in 0..n * 8 {
            let mut bad = buf[..n].to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                parse(&bad, Verifier::disabled()).is_err(),
                "bit {bit} flipped was accepted"
            );
        }
        let m = header(16).write(&shard, &mut buf, &signer(1));
        assert_eq!(
            parse(&buf[..m], Verifier::disabled()),
            Err(FrameError::Auth(AuthError::AuthenticationDisabled))
        );
    }

    /// Stripping the tag and setting the unauthenticated flag does not turn
    /// a genuine frame into one an authenticating receiver accepts.
    #[test]
    fn stripping_the_tag_of_a_genuine_frame_is_rejected_as_unauthenticated() {
        let shard = vec![4; 16];
        let mut buf = [0u8; 128];
        let n = header(16).write(&shard, &mut buf, &signer(1));
        let body_end = HEADER_LEN + 16;
        let mut stripped = buf[..body_end].to_vec();
        stripped[3] |= FLAG_UNAUTHENTICATED;
        stripped[4..8].fill(0);
        let crc = crc32fast::hash(&stripped);
        stripped.extend_from_slice(&crc.to_be_bytes());
        assert!(n > stripped.len());
        assert_eq!(
            parse(&stripped, verifier(&[1])),
            Err(FrameError::Auth(AuthError::Unauthenticated))
        );
    }

    #[test]
    fn mtu_1500_gives_1408_byte_shards_a_multiple_of_64_and_jumbo_works() {
        assert_eq!(shard_size_for_mtu(1500), Some(1408));
        assert_eq!(shard_size_for_mtu(9000), Some(8896));
        assert_eq!(shard_size_for(1500, true), Some(1408 - 64));
        assert_eq!(shard_size_for_mtu(80), None);
        assert_eq!(shard_size_for_mtu(148), Some(64));
        // A receiver accepts the largest shard that fits, aligned or not.
        assert_eq!(max_shard_for_mtu(1500), Some(1416));
        // The largest multiple of 64 that fits: 64 more would not.
        const { assert!(1408 + FRAME_OVERHEAD + IP_UDP_OVERHEAD <= 1500) };
        const { assert!(1408 + 64 + FRAME_OVERHEAD + IP_UDP_OVERHEAD > 1500) };
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = parse(&bytes, verifier(&[1]));
            let _ = parse(&bytes, Verifier::disabled());
        }

        #[test]
        fn any_valid_header_round_trips_with_its_tag(session in any::<u64>(), block in any::<u64>(), k in 1u16..=200, m in 0u16..=56,
                                        key_byte in any::<u8>(), shard in proptest::collection::vec(any::<u8>(), 1..300)) {
            let h = FrameHeader { flags: 0, session, block, index: k + m - 1, k, m,
                                  shard_len: shard.len() as u16, data_len: shard.len() as u32 };
            let mut buf = vec![0u8; shard.len() + FRAME_OVERHEAD];
            let n = h.write(&shard, &mut buf, &signer(key_byte));
            let (h2, s2) = parse(&buf[..n], verifier(&[key_byte])).unwrap();
            prop_assert_eq!(h2, h);
            prop_assert_eq!(s2, shard.clone());
            let other = key_byte.wrapping_add(1);
            prop_assert!(parse(&buf[..n], verifier(&[other])).is_err());
        }

        #[test]
        fn any_single_flipped_bit_is_rejected(bit in 0usize..(64 + FRAME_OVERHEAD) * 8, key_byte in any::<u8>()) {
            let shard = vec![0x11; 64];
            let mut buf = vec![0u8; 64 + FRAME_OVERHEAD];
            let n = header(64).write(&shard, &mut buf, &signer(key_byte));
            buf[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(parse(&buf[..n], verifier(&[key_byte])).is_err());
        }
    }
}
