//! The link simulator's decision logic, sans-IO: datagrams in, datagrams out.
//!
//! [`Impairments::process`] takes each datagram that arrived at the relay
//! and appends what should leave, in order. It never touches a socket or a
//! clock, so a seed and a datagram sequence fully determine the output; a
//! failing seed in an end-to-end run can be replayed here.
//!
//! Per datagram, in this order (a random draw is made only when its
//! probability is non-zero, always from the one ChaCha8 stream):
//! 1. If a burst is in progress, the datagram is dropped (`dropped_burst`).
//! 2. Else with probability `burst_start` a burst begins: its length L is
//!    drawn uniformly from 1..=`burst_len`, and this datagram and the next
//!    L-1 are dropped. This is a Gilbert–Elliott channel whose bad state
//!    loses everything and lasts a uniform 1..=L datagrams.
//! 3. Else with probability `loss` it is dropped (`dropped_random`).
//! 4. Survivors: with probability `corrupt` 1..=3 distinct random bits are
//!    flipped; with probability `duplicate` it is emitted twice; with
//!    probability `reorder` it (with its duplicate) is held back and emitted
//!    right after the next K arriving datagrams have been handled, K uniform
//!    in 1..=8 (arrivals count even if they are dropped).
//!
//! At most [`MAX_REORDER_DELAY`] datagrams are held at once, since each is
//! released within that many arrivals. The driver calls
//! [`Impairments::flush`] when the link goes idle, so the tail of a stream
//! is not held forever.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Longest hold of a reordered datagram, in subsequent arrivals.
pub const MAX_REORDER_DELAY: u8 = 8;

/// Most bits a corruption flips.
pub const MAX_CORRUPT_BITS: usize = 3;

/// The impairment settings; all probabilities are per arriving datagram.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ImpairmentConfig {
    pub loss: f64,
    pub burst_start: f64,
    /// Longest burst, in datagrams; ignored while `burst_start` is 0.
    pub burst_len: u32,
    pub reorder: f64,
    pub duplicate: f64,
    pub corrupt: f64,
}

impl ImpairmentConfig {
    /// Checks that every probability is in [0, 1] and that bursts have a
    /// length; names the flag to fix.
    pub fn validate(&self) -> Result<()> {
        for (flag, p) in [
            ("--loss", self.loss),
            ("--burst-start", self.burst_start),
            ("--reorder", self.reorder),
            ("--duplicate", self.duplicate),
            ("--corrupt", self.corrupt),
        ] {
            if !(0.0..=1.0).contains(&p) {
                bail!("{flag} {p} is not a probability; use a value from 0 to 1, e.g. 0.02");
            }
        }
        if self.burst_start > 0.0 && self.burst_len == 0 {
            bail!(
                "--burst-start {} needs --burst-len of at least 1",
                self.burst_start
            );
        }
        Ok(())
    }
}

/// What happened, cumulatively. `emitted` counts datagrams handed out
/// (duplicates included), whether or not the driver then sent them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub received: u64,
    pub emitted: u64,
    pub dropped_random: u64,
    pub dropped_burst: u64,
    pub bursts: u64,
    pub longest_burst: u64,
    pub reordered: u64,
    pub duplicated: u64,
    pub corrupted: u64,
}

/// The fate of one arriving datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Emitted now (possibly twice, possibly corrupted).
    Forwarded,
    /// Held back; emitted after `after` more arrivals.
    Held {
        after: u8,
    },
    DroppedRandom,
    /// Dropped as part of burst number `burst` (counting from 1).
    DroppedBurst {
        burst: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub fate: Fate,
    /// Bits flipped (0 if not corrupted).
    pub flipped_bits: u8,
    pub duplicated: bool,
}

struct Held {
    arrivals_left: u8,
    copies: Vec<Vec<u8>>,
}

pub struct Impairments {
    config: ImpairmentConfig,
    rng: ChaCha8Rng,
    burst_left: u32,
    held: Vec<Held>,
    counters: Counters,
}

impl Impairments {
    pub fn new(config: ImpairmentConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            rng: ChaCha8Rng::seed_from_u64(seed),
            burst_left: 0,
            held: Vec::with_capacity(usize::from(MAX_REORDER_DELAY)),
            counters: Counters::default(),
        })
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Datagrams currently held back for reordering (copies included).
    pub fn held(&self) -> u64 {
        self.held.iter().map(|h| h.copies.len() as u64).sum()
    }

    fn draw(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.gen_bool(p)
    }

    /// Handles one arriving datagram; appends the datagrams to send now, in
    /// order, to `out` (which is not cleared).
    pub fn process(&mut self, datagram: &[u8], out: &mut Vec<Vec<u8>>) -> Decision {
        self.counters.received += 1;
        let decision = self.decide_and_emit(datagram, out);
        self.release_due(out);
        decision
    }

    /// Convenience for tests: [`Self::process`] into a fresh vector.
    pub fn decide(&mut self, datagram: &[u8]) -> (Decision, Vec<Vec<u8>>) {
        let mut out = Vec::new();
        let d = self.process(datagram, &mut out);
        (d, out)
    }

    /// Emits every held datagram, in the order they were held.
    pub fn flush(&mut self, out: &mut Vec<Vec<u8>>) {
        for held in self.held.drain(..) {
            self.counters.emitted += held.copies.len() as u64;
            out.extend(held.copies);
        }
    }

    fn decide_and_emit(&mut self, datagram: &[u8], out: &mut Vec<Vec<u8>>) -> Decision {
        let dropped = |fate| Decision {
            fate,
            flipped_bits: 0,
            duplicated: false,
        };
        if self.burst_left > 0 {
            self.burst_left -= 1;
            self.counters.dropped_burst += 1;
            return dropped(Fate::DroppedBurst {
                burst: self.counters.bursts,
            });
        }
        if self.draw(self.config.burst_start) {
            let len = self.rng.gen_range(1..=self.config.burst_len);
            self.burst_left = len - 1;
            self.counters.bursts += 1;
            self.counters.longest_burst = self.counters.longest_burst.max(u64::from(len));
            self.counters.dropped_burst += 1;
            return dropped(Fate::DroppedBurst {
                burst: self.counters.bursts,
            });
        }
        if self.draw(self.config.loss) {
            self.counters.dropped_random += 1;
            return dropped(Fate::DroppedRandom);
        }

        let mut copy = datagram.to_vec();
        let mut flipped_bits = 0;
        if self.draw(self.config.corrupt) && !copy.is_empty() {
            flipped_bits = self.flip_bits(&mut copy);
            self.counters.corrupted += 1;
        }
        let duplicated = self.draw(self.config.duplicate);
        let copies = if duplicated {
            self.counters.duplicated += 1;
            vec![copy.clone(), copy]
        } else {
            vec![copy]
        };
        let fate = if self.draw(self.config.reorder) {
            let after = self.rng.gen_range(1..=MAX_REORDER_DELAY);
            self.counters.reordered += 1;
            // Holds are released after at most MAX_REORDER_DELAY arrivals,
            // and release_due runs after every arrival.
            debug_assert!(self.held.len() < usize::from(MAX_REORDER_DELAY));
            // +1: release_due below also runs for this arrival.
            self.held.push(Held {
                arrivals_left: after + 1,
                copies,
            });
            Fate::Held { after }
        } else {
            self.counters.emitted += copies.len() as u64;
            out.extend(copies);
            Fate::Forwarded
        };
        Decision {
            fate,
            flipped_bits,
            duplicated,
        }
    }

    /// Flips 1..=3 distinct bits; returns how many.
    fn flip_bits(&mut self, datagram: &mut [u8]) -> u8 {
        let total_bits = datagram.len() * 8;
        let n = self.rng.gen_range(1..=MAX_CORRUPT_BITS).min(total_bits);
        let mut chosen = [usize::MAX; MAX_CORRUPT_BITS];
        let mut count = 0;
        while count < n {
            let bit = self.rng.gen_range(0..total_bits);
            if !chosen[..count].contains(&bit) {
                chosen[count] = bit;
                count += 1;
            }
        }
        for &bit in &chosen[..count] {
            datagram[bit / 8] ^= 1 << (bit % 8);
        }
        // count <= MAX_CORRUPT_BITS = 3.
        count as u8
    }

    fn release_due(&mut self, out: &mut Vec<Vec<u8>>) {
        if self.held.is_empty() {
            return;
        }
        for held in &mut self.held {
            held.arrivals_left -= 1;
        }
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].arrivals_left == 0 {
                let held = self.held.remove(i);
                self.counters.emitted += held.copies.len() as u64;
                out.extend(held.copies);
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(i: u32, len: usize) -> Vec<u8> {
        let mut d = vec![0xA5u8; len.max(4)];
        d[..4].copy_from_slice(&i.to_be_bytes());
        d
    }

    fn number(d: &[u8]) -> u32 {
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    fn everything() -> ImpairmentConfig {
        ImpairmentConfig {
            loss: 0.05,
            burst_start: 0.01,
            burst_len: 6,
            reorder: 0.05,
            duplicate: 0.03,
            corrupt: 0.02,
        }
    }

    fn run(config: ImpairmentConfig, seed: u64, n: u32) -> (Vec<Decision>, Vec<Vec<u8>>, Counters) {
        let mut sim = Impairments::new(config, seed).unwrap();
        let mut out = Vec::new();
        let decisions = (0..n)
            .map(|i| sim.process(&numbered(i, 100 + (i as usize % 1300)), &mut out))
            .collect();
        sim.flush(&mut out);
        (decisions, out, sim.counters())
    }

    #[test]
    fn same_seed_gives_same_decisions_and_bytes() {
        let a = run(everything(), 42, 20_000);
        let b = run(everything(), 42, 20_000);
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        assert_eq!(a.2, b.2);
        let c = run(everything(), 43, 20_000);
        assert_ne!(a.0, c.0, "a different seed should change decisions");
    }

    #[test]
    fn loss_rate_is_within_tolerance_over_100k_datagrams() {
        let config = ImpairmentConfig {
            loss: 0.02,
            ..Default::default()
        };
        for seed in [1, 2, 3] {
            let (_, out, c) = run(config, seed, 100_000);
            // Expected 2000, sigma ~44; allow ~7 sigma.
            assert!(
                (1700..=2300).contains(&c.dropped_random),
                "seed {seed}: {c:?}"
            );
            assert_eq!(c.dropped_burst, 0);
            assert_eq!(out.len() as u64 + c.dropped_random, 100_000);
            assert_eq!(c.emitted, out.len() as u64);
        }
    }

    #[test]
    fn bursts_never_exceed_burst_len_and_cover_all_lengths() {
        let burst_len = 5;
        let config = ImpairmentConfig {
            burst_start: 0.02,
            burst_len,
            ..Default::default()
        };
        let (decisions, _, c) = run(config, 9, 100_000);
        let mut lengths = std::collections::BTreeMap::<u64, u32>::new();
        for d in &decisions {
            if let Fate::DroppedBurst { burst } = d.fate {
                *lengths.entry(burst).or_default() += 1;
            }
        }
        assert_eq!(lengths.len() as u64, c.bursts);
        assert!(c.bursts > 1000, "{c:?}");
        assert!(lengths.values().all(|&l| (1..=burst_len).contains(&l)));
        let seen: std::collections::BTreeSet<u32> = lengths.values().copied().collect();
        assert_eq!(seen, (1..=burst_len).collect());
        assert!(c.longest_burst <= u64::from(burst_len));
        assert_eq!(
            c.dropped_burst,
            lengths.values().map(|&l| u64::from(l)).sum::<u64>()
        );
        // Each burst's datagrams are consecutive.
        let mut last: Option<(u64, usize)> = None;
        for (i, d) in decisions.iter().enumerate() {
            if let Fate::DroppedBurst { burst } = d.fate {
                if let Some((b, j)) = last {
                    if b == burst {
                        assert_eq!(j + 1, i, "burst {burst} is not contiguous");
                    }
                }
                last = Some((burst, i));
            }
        }
    }

    #[test]
    fn zero_settings_forward_everything_unchanged_and_in_order() {
        let mut sim = Impairments::new(ImpairmentConfig::default(), 5).unwrap();
        for i in 0..10_000u32 {
            let d = numbered(i, (i as usize * 7) % 1500);
            let (decision, out) = sim.decide(&d);
            assert_eq!(decision.fate, Fate::Forwarded);
            assert_eq!(out, vec![d]);
        }
        let mut rest = Vec::new();
        sim.flush(&mut rest);
        assert!(rest.is_empty());
        let c = sim.counters();
        assert_eq!((c.received, c.emitted), (10_000, 10_000));
        assert_eq!(
            c,
            Counters {
                received: 10_000,
                emitted: 10_000,
                ..Default::default()
            }
        );
    }

    #[test]
    fn reordered_datagrams_arrive_once_within_eight_places() {
        let config = ImpairmentConfig {
            reorder: 0.2,
            ..Default::default()
        };
        let (decisions, out, c) = run(config, 3, 10_000);
        assert_eq!(out.len(), 10_000);
        let mut seen = vec![false; 10_000];
        for (pos, d) in out.iter().enumerate() {
            let n = number(d) as usize;
            assert!(!seen[n], "datagram {n} emitted twice");
            seen[n] = true;
            if let Fate::Held { after } = decisions[n].fate {
                assert!((1..=MAX_REORDER_DELAY).contains(&after));
            }
            // A datagram moves later by at most 8 arrivals plus the others
            // released with it, earlier by at most the 8 held before it.
            assert!(pos.abs_diff(n) <= 16, "datagram {n} moved to {pos}");
        }
        assert!(c.reordered > 1500, "{c:?}");
        // A held datagram comes right after the `after`-th later arrival.
        let mut sim = Impairments::new(config, 3).unwrap();
        let mut pending: Vec<(u32, u32)> = Vec::new();
        for i in 0..2000u32 {
            let (d, out) = sim.decide(&numbered(i, 8));
            let got: Vec<u32> = out.iter().map(|d| number(d)).collect();
            let mut want = Vec::new();
            if d.fate == Fate::Forwarded {
                want.push(i);
            }
            pending.retain(|&(n, due)| {
                if due == i {
                    want.push(n);
                    false
                } else {
                    true
                }
            });
            if let Fate::Held { after } = d.fate {
                pending.push((i, i + u32::from(after)));
            }
            assert_eq!(got, want, "arrival {i}");
        }
    }

    #[test]
    fn corruption_flips_one_to_three_bits() {
        let config = ImpairmentConfig {
            corrupt: 1.0,
            ..Default::default()
        };
        let mut sim = Impairments::new(config, 11).unwrap();
        let mut counts = [0u32; 4];
        for i in 0..3000 {
            let d = numbered(i, 64);
            let (decision, out) = sim.decide(&d);
            assert_eq!(out.len(), 1);
            let flips: u32 = d
                .iter()
                .zip(&out[0])
                .map(|(a, b)| (a ^ b).count_ones())
                .sum();
            assert_eq!(flips, u32::from(decision.flipped_bits));
            counts[flips as usize] += 1;
        }
        assert_eq!(counts[0], 0);
        assert!(counts[1..].iter().all(|&c| c > 500), "{counts:?}");
        // A one-byte datagram still gets its bits flipped, distinct ones.
        let (d, out) = sim.decide(&[0u8]);
        assert_eq!(out[0][0].count_ones(), u32::from(d.flipped_bits));
        // An empty one is forwarded as is.
        let (_, out) = sim.decide(&[]);
        assert_eq!(out, vec![Vec::<u8>::new()]);
    }

    #[test]
    fn duplicates_are_identical_and_counted() {
        let config = ImpairmentConfig {
            duplicate: 0.5,
            ..Default::default()
        };
        let (_, out, c) = run(config, 4, 10_000);
        assert_eq!(out.len() as u64, 10_000 + c.duplicated);
        assert!((4500..=5500).contains(&c.duplicated), "{c:?}");
        let dups = out.windows(2).filter(|w| w[0] == w[1]).count() as u64;
        assert_eq!(dups, c.duplicated);
    }

    #[test]
    fn counters_balance_under_every_impairment() {
        let (_, out, c) = run(everything(), 8, 50_000);
        assert_eq!(
            c.received + c.duplicated,
            c.emitted + c.dropped_random + c.dropped_burst
        );
        assert_eq!(c.emitted, out.len() as u64);
    }

    #[test]
    fn bad_settings_name_the_flag() {
        let bad = ImpairmentConfig {
            loss: 1.5,
            ..Default::default()
        };
        let err = Impairments::new(bad, 1).err().unwrap().to_string();
        assert!(err.contains("--loss"), "{err}");
        let bad = ImpairmentConfig {
            burst_start: 0.1,
            burst_len: 0,
            ..Default::default()
        };
        let err = Impairments::new(bad, 1).err().unwrap().to_string();
        assert!(err.contains("--burst-len"), "{err}");
    }
}
