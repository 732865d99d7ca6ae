//! The deterministic test byte stream: ChaCha8 keyed by a u64 seed.
//!
//! `weir-tcpfeed` writes it; anything that wants to predict or check the
//! data (an end-to-end test, a hash comparison) regenerates it here.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Size of each write, and of each keystream chunk. The stream is defined
/// as successive `fill_bytes` calls of this size (the last one shorter), so
/// changing it changes the bytes produced for a given seed.
pub const CHUNK: usize = 64 * 1024;

/// Produces the seeded stream chunk by chunk.
pub struct Pattern {
    rng: ChaCha8Rng,
    remaining: u64,
}

impl Pattern {
    pub fn new(seed: u64, total_bytes: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            remaining: total_bytes,
        }
    }

    /// Bytes not yet produced.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Fills the front of `buf` (which must be at least [`CHUNK`] long) with
    /// the next chunk and returns its length; 0 at the end of the stream.
    pub fn next_chunk(&mut self, buf: &mut [u8]) -> usize {
        assert!(buf.len() >= CHUNK, "pattern buffer smaller than CHUNK");
        let len = usize::try_from(self.remaining).map_or(CHUNK, |r| r.min(CHUNK));
        self.rng.fill_bytes(&mut buf[..len]);
        self.remaining -= len as u64;
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_bytes_and_length() {
        let mut a = Pattern::new(7, 200_000);
        let mut b = Pattern::new(7, 200_000);
        let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let mut total = 0;
        loop {
            let (na, nb) = (a.next_chunk(&mut ba), b.next_chunk(&mut bb));
            assert_eq!(na, nb);
            assert_eq!(ba[..na], bb[..nb]);
            if na == 0 {
                break;
            }
            total += na;
        }
        assert_eq!(total, 200_000);
    }

    #[test]
    fn different_seeds_differ() {
        let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        Pattern::new(1, 100).next_chunk(&mut ba);
        Pattern::new(2, 100).next_chunk(&mut bb);
        assert_ne!(ba[..100], bb[..100]);
    }
}
