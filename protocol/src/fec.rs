//! Reed-Solomon erasure coding of blocks: k data shards + m parity shards,
//! any k of the k + m rebuild the data.

use std::collections::HashMap;

use reed_solomon_erasure::galois_8::ReedSolomon;

/// How many distinct (k, m) codecs to keep built. Partial blocks use smaller
/// k, so a handful of shapes recur; the matrices are cheap to rebuild, and the
/// cache is cleared when full so it stays bounded whatever frames arrive.
const CODEC_CACHE_LIMIT: usize = 64;

#[derive(Default)]
pub struct Fec {
    codecs: HashMap<(usize, usize), ReedSolomon>,
}

impl std::fmt::Debug for Fec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fec")
            .field("codecs", &self.codecs.len())
            .finish()
    }
}

impl Fec {
    fn codec(&mut self, k: usize, m: usize) -> &ReedSolomon {
        if !self.codecs.contains_key(&(k, m)) && self.codecs.len() >= CODEC_CACHE_LIMIT {
            self.codecs.clear();
        }
        self.codecs.entry((k, m)).or_insert_with(|| {
            ReedSolomon::new(k, m).expect("k >= 1, m >= 1, k + m <= 256 checked by caller")
        })
    }

    /// Fills the m parity shards that follow the k data shards in `shards`
    /// (a flat buffer of (k + m) * shard_len bytes).
    pub fn encode(&mut self, k: usize, m: usize, shard_len: usize, shards: &mut [u8]) {
        assert_eq!(shards.len(), (k + m) * shard_len);
        if m == 0 {
            return;
        }
        let (data, parity) = shards.split_at_mut(k * shard_len);
        let data: Vec<&[u8]> = data.chunks(shard_len).collect();
        let mut parity: Vec<&mut [u8]> = parity.chunks_mut(shard_len).collect();
        self.codec(k, m)
            .encode_sep(&data, &mut parity)
            .expect("shard counts and lengths are consistent");
    }

    /// Rebuilds the missing data shards in place. `present[i]` says whether
    /// shard i of the flat buffer holds received bytes. Returns the number of
    /// data shards rebuilt, or None if fewer than k shards are present.
    pub fn reconstruct(
        &mut self,
        k: usize,
        m: usize,
        shard_len: usize,
        shards: &mut [u8],
        present: &[bool],
    ) -> Option<usize> {
        assert_eq!(shards.len(), (k + m) * shard_len);
        assert_eq!(present.len(), k + m);
        let missing_data = present[..k].iter().filter(|p| !**p).count();
        if missing_data == 0 {
            return Some(0);
        }
        if present.iter().filter(|p| **p).count() < k {
            return None;
        }
        let mut slices: Vec<(&mut [u8], bool)> = shards
            .chunks_mut(shard_len)
            .zip(present.iter().copied())
            .collect();
        self.codec(k, m).reconstruct_data(&mut slices).ok()?;
        Some(missing_data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn rebuilds_any_pattern_of_at_most_m_lost_shards(
            k in 1usize..40, m in 1usize..12, shard_len in 1usize..64, seed in any::<u64>(), losses in 0usize..12,
        ) {
            let losses = losses.min(m);
            let mut rng = seed;
            let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            let mut shards = vec![0u8; (k + m) * shard_len];
            for b in shards[..k * shard_len].iter_mut() { *b = next() as u8; }
            let mut fec = Fec::default();
            fec.encode(k, m, shard_len, &mut shards);
            let original = shards[..k * shard_len].to_vec();
            let mut present = vec![true; k + m];
            let mut lost = 0;
            while lost < losses {
                let i = (next() % (k + m) as u64) as usize;
                if present[i] { present[i] = false; lost += 1; shards[i * shard_len..(i + 1) * shard_len].fill(0xEE); }
            }
            prop_assert!(fec.reconstruct(k, m, shard_len, &mut shards, &present).is_some());
            prop_assert_eq!(&shards[..k * shard_len], &original[..]);
        }
    }

    #[test]
    fn more_than_m_losses_is_reported_not_guessed() {
        let (k, m, len) = (4, 2, 8);
        let mut shards = vec![1u8; (k + m) * len];
        let mut fec = Fec::default();
        fec.encode(k, m, len, &mut shards);
        let present = [false, false, false, true, true, true];
        assert_eq!(fec.reconstruct(k, m, len, &mut shards, &present), None);
    }
}
