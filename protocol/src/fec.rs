//! Reed-Solomon erasure coding of blocks: k data shards + m parity shards,
//! any k of the k + m rebuild the data.

use std::collections::{HashMap, VecDeque};

use reed_solomon_erasure::galois_8::ReedSolomon;

/// How many distinct (k, m) codecs to keep built. Partial blocks use smaller
/// k, so a handful of shapes recur; the matrices are cheap to rebuild.
const CODEC_CACHE_LIMIT: usize = 64;

/// Bytes the cached codecs may hold at most, counted by
/// [`codec_worst_case_bytes`]. Each codec keeps up to 254 inverted k × k
/// matrices (one per loss pattern, inside `reed-solomon-erasure`), so with
/// k = 255 one codec can grow to about 17 MB and 64 of them to about 1 GB.
/// 64 MiB holds about 48 codecs of the default RS(64,16) at their worst,
/// or 14 of the largest shape the receiver accepts by default (128 + 64).
pub const CODEC_CACHE_BYTES: usize = 64 << 20;

/// Inverted matrices `reed-solomon-erasure` 6 caches per codec (its
/// `DATA_DECODE_MATRIX_CACHE_CAPACITY`).
const DECODE_MATRICES_PER_CODEC: usize = 254;
/// A `Matrix` stores up to 1024 elements inline (a `SmallVec`), plus its
/// dimensions; larger ones also take rows × cols bytes on the heap.
const MATRIX_INLINE_BYTES: usize = 1024 + 64;
/// LRU node, `Arc` and key `Vec` headers per cached matrix, rounded up.
const DECODE_ENTRY_OVERHEAD: usize = 256;

fn matrix_bytes(rows: usize, cols: usize) -> usize {
    let elems = rows.saturating_mul(cols);
    MATRIX_INLINE_BYTES.saturating_add(if elems > 1024 { elems } else { 0 })
}

/// An upper bound of the memory one RS(k, m) codec can hold: its encoding
/// matrix and a full cache of inverted matrices, each keyed by the indices
/// of up to m missing shards.
pub fn codec_worst_case_bytes(k: usize, m: usize) -> usize {
    let entry = matrix_bytes(k, k)
        .saturating_add(m.saturating_mul(std::mem::size_of::<usize>()))
        .saturating_add(DECODE_ENTRY_OVERHEAD);
    matrix_bytes(k.saturating_add(m), k)
        .saturating_add(DECODE_MATRICES_PER_CODEC.saturating_mul(entry))
}

#[derive(Default)]
pub struct Fec {
    codecs: HashMap<(usize, usize), ReedSolomon>,
    /// Shapes in the order they were built: the oldest is evicted first.
    order: VecDeque<(usize, usize)>,
    /// Sum of `codec_worst_case_bytes` over the cached codecs.
    bytes: usize,
}

impl std::fmt::Debug for Fec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fec")
            .field("codecs", &self.codecs.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Fec {
    /// The worst-case bytes the cached codecs hold; never above
    /// [`CODEC_CACHE_BYTES`] (one codec alone may exceed it, and is then
    /// the only one kept).
    pub fn cached_bytes(&self) -> usize {
        self.bytes
    }

    /// Codecs currently built.
    pub fn cached_codecs(&self) -> usize {
        self.codecs.len()
    }

    fn codec(&mut self, k: usize, m: usize) -> &ReedSolomon {
        if !self.codecs.contains_key(&(k, m)) {
            let need = codec_worst_case_bytes(k, m);
            while !self.order.is_empty()
                && (self.codecs.len() >= CODEC_CACHE_LIMIT
                    || self.bytes.saturating_add(need) > CODEC_CACHE_BYTES)
            {
                let oldest = self.order.pop_front().expect("checked non-empty");
                self.codecs.remove(&oldest);
                self.bytes = self
                    .bytes
                    .saturating_sub(codec_worst_case_bytes(oldest.0, oldest.1));
            }
            self.order.push_back((k, m));
            self.bytes = self.bytes.saturating_add(need);
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
    fn the_codec_cache_stays_within_its_byte_bound_under_hostile_shapes() {
        // Every shape a hostile sender could choose near k = 255, each
        // reconstructed with a different loss pattern.
        let mut fec = Fec::default();
        let len = 1;
        for k in (250..=255).rev() {
            let m = 256 - k;
            let mut shards = vec![7u8; (k + m) * len];
            let mut present = vec![true; k + m];
            present[0] = false;
            fec.reconstruct(k, m, len, &mut shards, &present);
            assert!(
                fec.cached_bytes() <= CODEC_CACHE_BYTES,
                "{} bytes cached after k = {k}",
                fec.cached_bytes()
            );
        }
        assert!(fec.cached_codecs() >= 1);
        assert!(codec_worst_case_bytes(255, 1) > 16_000_000);
        assert!(codec_worst_case_bytes(255, 1) * 64 > 1_000_000_000);
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
