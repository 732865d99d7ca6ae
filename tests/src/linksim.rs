//! The link simulator's decision logic, sans-IO: datagrams in, datagrams out.
//!
//! [`Impairments::process`] takes each datagram that arrived at the relay,
//! with the time it arrived, and appends what should leave, in order. It
//! never touches a socket or reads a clock, so a seed and a sequence of
//! (time, datagram) pairs fully determine the output; a failing seed in an
//! end-to-end run can be replayed here.
//!
//! Random draws come from one ChaCha8 stream seeded with the seed, and a
//! draw is made only when its probability is non-zero. Once, in
//! [`Impairments::new`], and only if periodic bursts are on: the phase of
//! the periodic bursts is drawn uniformly from the whole nanoseconds in
//! `0..burst_every_ms`.
//! Then per datagram, in this order:
//! 1. Periodic bursts (no draw). The first arrival's time is the origin
//!    t0; a burst is due at t0 + phase + k·`burst_every_ms` for k = 0, 1, …
//!    At an arrival whose time has reached the next due time, a burst
//!    begins: this datagram and the next `burst_count` − 1 arrivals are
//!    dropped (`dropped_periodic`). Due times that pass with no arrival
//!    start no burst of their own (at most one burst begins per arrival),
//!    and a burst that falls due while the previous one has not yet
//!    dropped its `burst_count` starts anew from there, so at fewer than
//!    `burst_count` arrivals per period everything is dropped.
//! 2. If a uniform burst is in progress, the datagram is dropped
//!    (`dropped_burst`).
//! 3. Else with probability `burst_start` a uniform burst begins: its
//!    length L is drawn uniformly from 1..=`burst_len`, and this datagram
//!    and the next L-1 are dropped. This is a Gilbert–Elliott channel whose
//!    bad state loses everything and lasts a uniform 1..=L datagrams.
//! 4. Gilbert–Elliott with geometric bursts. Inside a GE burst, with
//!    probability `ge_stay` (Q) the datagram is dropped (`dropped_ge`);
//!    otherwise the burst ends and this datagram goes on to step 5 with no
//!    `ge_start` draw. Outside a burst, with probability `ge_start` (P) a
//!    burst begins and this datagram is dropped. A burst's length L is
//!    geometric: P(L = k) = Q^(k−1)·(1−Q), mean 1/(1−Q); the model alone
//!    drops a fraction r/(1+r) of the datagrams it sees, r = P/(1−Q)
//!    ([`ImpairmentConfig::ge_loss`]).
//! 5. Else with probability `loss` it is dropped (`dropped_random`).
//! 6. Survivors: with probability `corrupt` 1..=3 distinct random bits are
//!    flipped; with probability `duplicate` it is emitted twice; with
//!    probability `reorder` it (with its duplicate) is held back and emitted
//!    right after the next K arriving datagrams have been handled, K uniform
//!    in 1..=8 (arrivals count even if they are dropped).
//!
//! A step that drops the datagram ends its handling: later steps make no
//! draw for it and do not see it (a uniform or GE burst in progress goes
//! on after the datagrams an earlier step took). With the GE and periodic
//! models off, a seed gives the same decisions as before they were added
//! (a test holds the digests recorded then).
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

/// Longest period of the periodic bursts, in ms: a day is longer than any
/// test run, and the bound keeps the due-time arithmetic far from overflow.
pub const MAX_BURST_EVERY_MS: f64 = 86_400_000.0;

/// The impairment settings; all probabilities are per arriving datagram.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ImpairmentConfig {
    pub loss: f64,
    pub burst_start: f64,
    /// Longest burst, in datagrams; ignored while `burst_start` is 0.
    pub burst_len: u32,
    /// Gilbert–Elliott: probability that a datagram outside a GE burst
    /// starts one (and is dropped).
    pub ge_start: f64,
    /// Gilbert–Elliott: probability that each datagram after a GE drop is
    /// dropped too; mean burst 1/(1 − `ge_stay`). Ignored while `ge_start`
    /// is 0.
    pub ge_stay: f64,
    /// Period of the periodic bursts, in ms; 0 turns them off.
    pub burst_every_ms: f64,
    /// Consecutive arrivals each periodic burst drops; ignored while
    /// `burst_every_ms` is 0.
    pub burst_count: u32,
    pub reorder: f64,
    pub duplicate: f64,
    pub corrupt: f64,
}

impl ImpairmentConfig {
    /// Checks that every probability is in [0, 1], that bursts have a
    /// length and an end, and that the periodic burst period is usable;
    /// names the flag to fix.
    pub fn validate(&self) -> Result<()> {
        for (flag, p) in [
            ("--loss", self.loss),
            ("--burst-start", self.burst_start),
            ("--ge-start", self.ge_start),
            ("--ge-stay", self.ge_stay),
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
        if self.ge_start > 0.0 && self.ge_stay >= 1.0 {
            bail!(
                "--ge-stay {} never ends a burst (every datagram after --ge-start's first \
                 drop would be lost); use a value below 1, e.g. 0.95 for a mean burst of 20",
                self.ge_stay
            );
        }
        let every = self.burst_every_ms;
        if !(every.is_finite() && (0.0..=MAX_BURST_EVERY_MS).contains(&every)) {
            bail!(
                "--burst-every-ms {every} is not a period; use milliseconds from 0 (off) \
                 to {MAX_BURST_EVERY_MS}, e.g. 100"
            );
        }
        if every > 0.0 && every_ns(every) == 0 {
            bail!("--burst-every-ms {every} is shorter than a nanosecond; use e.g. 0.1 or more");
        }
        if every > 0.0 && self.burst_count == 0 {
            bail!("--burst-every-ms {every} needs --burst-count of at least 1");
        }
        Ok(())
    }

    /// The (`ge_start`, `ge_stay`) that give GE bursts of mean length
    /// `mean_burst` datagrams and drop a long-run fraction `loss` of the
    /// datagrams the model sees: `ge_stay` = 1 − 1/`mean_burst`, and
    /// `ge_start` = r/`mean_burst` with r = `loss`/(1 − `loss`). Errors
    /// name `--ge-mean-burst` and `--ge-loss`, the flags that feed this.
    pub fn ge_for(mean_burst: f64, loss: f64) -> Result<(f64, f64)> {
        if !(mean_burst.is_finite() && mean_burst >= 1.0) {
            bail!("--ge-mean-burst {mean_burst} is not a burst length; use datagrams, at least 1, e.g. 20");
        }
        let stay = 1.0 - 1.0 / mean_burst;
        if stay >= 1.0 {
            bail!("--ge-mean-burst {mean_burst} is too long to ever end; use e.g. 20");
        }
        // Bursts are at least one datagram apart, so at most
        // mean/(mean + 1) of the datagrams can be lost.
        let most = mean_burst / (mean_burst + 1.0);
        if !(loss.is_finite() && (0.0..=most).contains(&loss)) {
            bail!(
                "--ge-loss {loss} is not a loss fraction reachable with --ge-mean-burst \
                 {mean_burst}; use a value from 0 to {most:.6}, e.g. 0.04"
            );
        }
        let start = (loss / (1.0 - loss) / mean_burst).min(1.0);
        Ok((start, stay))
    }

    /// Mean length of a GE burst, 1/(1 − `ge_stay`), in datagrams.
    pub fn ge_mean_burst(&self) -> f64 {
        1.0 / (1.0 - self.ge_stay)
    }

    /// Long-run fraction of the datagrams it sees that the GE model drops:
    /// r/(1 + r) with r = `ge_start`/(1 − `ge_stay`). Per cycle, a burst
    /// loses 1/(1 − Q) on average and 1/P get through: the survivor that
    /// ends the burst, then (1 − P)/P before the next one starts.
    pub fn ge_loss(&self) -> f64 {
        let r = self.ge_start / (1.0 - self.ge_stay);
        r / (1.0 + r)
    }
}

/// `ms` as whole nanoseconds, rounded.
fn every_ns(ms: f64) -> u64 {
    // ms <= MAX_BURST_EVERY_MS after validation, far below u64::MAX ns.
    (ms * 1e6).round() as u64
}

/// What happened, cumulatively. `emitted` counts datagrams handed out
/// (duplicates included), whether or not the driver then sent them.
/// `bursts` and `longest_burst` are the uniform model's;
/// `longest_drop_run` is the longest run of consecutive arrivals dropped
/// for any reason (uniform, GE, periodic and random drops alike).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub received: u64,
    pub emitted: u64,
    pub dropped_random: u64,
    pub dropped_burst: u64,
    pub bursts: u64,
    pub longest_burst: u64,
    pub dropped_ge: u64,
    pub ge_bursts: u64,
    pub longest_ge_burst: u64,
    pub dropped_periodic: u64,
    pub periodic_bursts: u64,
    pub longest_drop_run: u64,
    pub reordered: u64,
    pub duplicated: u64,
    pub corrupted: u64,
}

impl Counters {
    /// Datagrams dropped, by every model.
    pub fn dropped(&self) -> u64 {
        self.dropped_random + self.dropped_burst + self.dropped_ge + self.dropped_periodic
    }
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
    /// Dropped as part of uniform burst number `burst` (counting from 1).
    DroppedBurst {
        burst: u64,
    },
    /// Dropped as part of Gilbert–Elliott burst number `burst` (from 1).
    DroppedGe {
        burst: u64,
    },
    /// Dropped as part of periodic burst number `burst` (from 1).
    DroppedPeriodic {
        burst: u64,
    },
}

impl Fate {
    pub fn is_dropped(&self) -> bool {
        !matches!(self, Fate::Forwarded | Fate::Held { .. })
    }
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

/// The periodic burst schedule, present while `burst_every_ms` > 0.
struct Periodic {
    every_ns: u64,
    count: u32,
    /// Offset of the first burst from the first arrival, in 0..every_ns.
    phase_ns: u64,
    /// When the next burst is due; set at the first arrival.
    next_due_ns: Option<u64>,
    /// Arrivals the current burst still drops.
    left: u32,
}

pub struct Impairments {
    config: ImpairmentConfig,
    rng: ChaCha8Rng,
    burst_left: u32,
    /// Length so far of the GE burst in progress; 0 outside one.
    ge_burst_len: u64,
    periodic: Option<Periodic>,
    /// Latest arrival time seen; time never goes back.
    now_ns: u64,
    /// Consecutive arrivals dropped up to the latest one.
    drop_run: u64,
    held: Vec<Held>,
    counters: Counters,
}

impl Impairments {
    pub fn new(config: ImpairmentConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let periodic = (config.burst_every_ms > 0.0).then(|| {
            let every_ns = every_ns(config.burst_every_ms);
            Periodic {
                every_ns,
                count: config.burst_count,
                phase_ns: rng.gen_range(0..every_ns),
                next_due_ns: None,
                left: 0,
            }
        });
        Ok(Self {
            config,
            rng,
            burst_left: 0,
            ge_burst_len: 0,
            periodic,
            now_ns: 0,
            drop_run: 0,
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

    /// Handles one datagram that arrived at `now_ns` (nanoseconds from any
    /// fixed origin, monotonic; a time earlier than one already seen counts
    /// as that one). Appends the datagrams to send now, in order, to `out`
    /// (which is not cleared).
    pub fn process(&mut self, now_ns: u64, datagram: &[u8], out: &mut Vec<Vec<u8>>) -> Decision {
        self.counters.received += 1;
        self.now_ns = self.now_ns.max(now_ns);
        let decision = self.decide_and_emit(datagram, out);
        if decision.fate.is_dropped() {
            self.drop_run += 1;
            self.counters.longest_drop_run = self.counters.longest_drop_run.max(self.drop_run);
        } else {
            self.drop_run = 0;
        }
        self.release_due(out);
        decision
    }

    /// Convenience for tests: [`Self::process`] into a fresh vector.
    pub fn decide(&mut self, now_ns: u64, datagram: &[u8]) -> (Decision, Vec<Vec<u8>>) {
        let mut out = Vec::new();
        let d = self.process(now_ns, datagram, &mut out);
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
        if let Some(burst) = self.periodic_drop() {
            return dropped(Fate::DroppedPeriodic { burst });
        }
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
        if let Some(burst) = self.ge_drop() {
            return dropped(Fate::DroppedGe { burst });
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

    /// Step 1: starts a periodic burst if one is due at `self.now_ns`, and
    /// takes this arrival if a burst has some left; returns its number.
    fn periodic_drop(&mut self) -> Option<u64> {
        let now = self.now_ns;
        let p = self.periodic.as_mut()?;
        let due = *p.next_due_ns.get_or_insert(now.saturating_add(p.phase_ns));
        if now >= due {
            // The first due time after now: periods that passed with no
            // arrival start no burst of their own.
            let periods = (now - due) / p.every_ns + 1;
            p.next_due_ns = Some(due.saturating_add(periods.saturating_mul(p.every_ns)));
            p.left = p.count;
            self.counters.periodic_bursts += 1;
        }
        if p.left == 0 {
            return None;
        }
        p.left -= 1;
        self.counters.dropped_periodic += 1;
        Some(self.counters.periodic_bursts)
    }

    /// Step 4: the Gilbert–Elliott draws; returns the burst's number if
    /// this datagram is dropped.
    fn ge_drop(&mut self) -> Option<u64> {
        if self.ge_burst_len > 0 {
            if !self.draw(self.config.ge_stay) {
                // The survivor ends the burst and skips the ge_start draw.
                self.ge_burst_len = 0;
                return None;
            }
        } else if self.draw(self.config.ge_start) {
            self.counters.ge_bursts += 1;
        } else {
            return None;
        }
        self.ge_burst_len += 1;
        self.counters.dropped_ge += 1;
        self.counters.longest_ge_burst = self.counters.longest_ge_burst.max(self.ge_burst_len);
        Some(self.counters.ge_bursts)
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

    /// Arrivals 10 µs apart: 100 000 datagrams/s.
    fn arrival_ns(i: u32) -> u64 {
        u64::from(i) * 10_000
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
            ..Default::default()
        }
    }

    fn run(config: ImpairmentConfig, seed: u64, n: u32) -> (Vec<Decision>, Vec<Vec<u8>>, Counters) {
        let mut sim = Impairments::new(config, seed).unwrap();
        let mut out = Vec::new();
        let decisions = (0..n)
            .map(|i| {
                sim.process(
                    arrival_ns(i),
                    &numbered(i, 100 + (i as usize % 1300)),
                    &mut out,
                )
            })
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
        // The second flag of a pair does nothing while the first is 0.
        let idle = ImpairmentConfig {
            burst_len: 7,
            ge_stay: 0.9,
            burst_count: 5,
            ..Default::default()
        };
        let mut sim = Impairments::new(idle, 5).unwrap();
        for i in 0..10_000u32 {
            let d = numbered(i, (i as usize * 7) % 1500);
            let (decision, out) = sim.decide(arrival_ns(i), &d);
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
            let (d, out) = sim.decide(arrival_ns(i), &numbered(i, 8));
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
            let (decision, out) = sim.decide(arrival_ns(i), &d);
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
        let (d, out) = sim.decide(arrival_ns(3000), &[0u8]);
        assert_eq!(out[0][0].count_ones(), u32::from(d.flipped_bits));
        // An empty one is forwarded as is.
        let (_, out) = sim.decide(arrival_ns(3001), &[]);
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
        assert_eq!(c.dropped(), c.dropped_random + c.dropped_burst);
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
        let cases = [
            (
                ImpairmentConfig {
                    ge_start: -0.1,
                    ..Default::default()
                },
                "--ge-start",
            ),
            (
                ImpairmentConfig {
                    ge_start: 0.01,
                    ge_stay: 1.5,
                    ..Default::default()
                },
                "--ge-stay",
            ),
            (
                ImpairmentConfig {
                    ge_start: 0.01,
                    ge_stay: 1.0,
                    ..Default::default()
                },
                "--ge-stay",
            ),
            (periodic(-1.0, 5), "--burst-every-ms"),
            (periodic(f64::NAN, 5), "--burst-every-ms"),
            (periodic(f64::INFINITY, 5), "--burst-every-ms"),
            (periodic(MAX_BURST_EVERY_MS * 2.0, 5), "--burst-every-ms"),
            (periodic(1e-7, 5), "--burst-every-ms"),
            (periodic(10.0, 0), "--burst-count"),
        ];
        for (bad, flag) in cases {
            let err = Impairments::new(bad, 1).err().unwrap().to_string();
            assert!(err.contains(flag), "{bad:?}: {err}");
        }
        // The edges that are allowed.
        Impairments::new(periodic(MAX_BURST_EVERY_MS, 1), 1).unwrap();
        Impairments::new(periodic(1e-6, 1), 1).unwrap();
        Impairments::new(ge_config(1.0, 0.5), 1).unwrap();
    }

    fn ge_config(mean_burst: f64, loss: f64) -> ImpairmentConfig {
        let (ge_start, ge_stay) = ImpairmentConfig::ge_for(mean_burst, loss).unwrap();
        ImpairmentConfig {
            ge_start,
            ge_stay,
            ..Default::default()
        }
    }

    /// Every model at once: uniform and GE bursts, periodic bursts (one of
    /// 10 arrivals every 0.5 ms, i.e. every 50 arrivals), random loss,
    /// corruption, duplication and reordering.
    fn all_models() -> ImpairmentConfig {
        ImpairmentConfig {
            ge_start: 0.002,
            ge_stay: 0.9,
            burst_every_ms: 0.5,
            burst_count: 10,
            ..everything()
        }
    }

    /// The length of the longest run of consecutive dropped arrivals.
    fn longest_run(decisions: &[Decision]) -> u64 {
        let (mut run, mut longest) = (0, 0);
        for d in decisions {
            run = if d.fate.is_dropped() { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        longest
    }

    #[test]
    fn existing_impairments_give_the_same_outcome_as_before_the_new_models() {
        use sha2::{Digest, Sha256};
        // Digests and counters recorded with the simulator before the GE
        // and periodic models were added (same run(), 50 000 datagrams).
        let cases = [
            (
                everything(),
                42,
                "95b1399c3c7668131020547bf28998d80565ce2540c315a3a1276f1f8756bd3a",
                (50_000, 47_177, 2471, 1665, 472, 6),
            ),
            (
                ImpairmentConfig {
                    burst_start: 0.02,
                    burst_len: 5,
                    loss: 0.01,
                    ..Default::default()
                },
                9,
                "0690d3b61397ac042a74e7c7d9b8fbee9e5d9034b4f51a5a0a0b2e40326e3bf5",
                (50_000, 46_626, 496, 2878, 942, 5),
            ),
        ];
        for (config, seed, digest, (received, emitted, random, burst, bursts, longest)) in cases {
            let (decisions, out, c) = run(config, seed, 50_000);
            let mut h = Sha256::new();
            for d in &out {
                h.update((d.len() as u32).to_be_bytes());
                h.update(d);
            }
            for d in &decisions {
                h.update(format!("{d:?}").as_bytes());
            }
            assert_eq!(crate::report::sha256_hex(h), digest, "seed {seed}");
            assert_eq!(
                (c.received, c.emitted, c.dropped_random, c.dropped_burst),
                (received, emitted, random, burst)
            );
            assert_eq!((c.bursts, c.longest_burst), (bursts, longest));
            assert_eq!((c.dropped_ge, c.dropped_periodic), (0, 0));
        }
    }

    #[test]
    fn every_model_together_is_deterministic_on_a_seed_and_balances() {
        let a = run(all_models(), 42, 100_000);
        let b = run(all_models(), 42, 100_000);
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        assert_eq!(a.2, b.2);
        let c = run(all_models(), 43, 100_000);
        assert_ne!(a.0, c.0, "a different seed should change decisions");
        for (decisions, out, c) in [a, c] {
            assert!(
                c.dropped_random > 0
                    && c.dropped_burst > 0
                    && c.dropped_ge > 0
                    && c.dropped_periodic > 0
                    && c.reordered > 0,
                "{c:?}"
            );
            assert_eq!(c.received + c.duplicated, c.emitted + c.dropped());
            assert_eq!(c.emitted, out.len() as u64);
            assert_eq!(c.longest_drop_run, longest_run(&decisions));
            let by_fate = |f: fn(&Fate) -> bool| decisions.iter().filter(|d| f(&d.fate)).count();
            assert_eq!(
                by_fate(|f| matches!(f, Fate::DroppedGe { .. })) as u64,
                c.dropped_ge
            );
            assert_eq!(
                by_fate(|f| matches!(f, Fate::DroppedPeriodic { .. })) as u64,
                c.dropped_periodic
            );
            // 100 000 arrivals 10 µs apart are 2000 periods of 0.5 ms.
            assert!((1999..=2000).contains(&c.periodic_bursts), "{c:?}");
        }
    }

    /// Runs `n` small datagrams through; returns each GE burst's arrival
    /// indices, by burst, and the counters.
    fn ge_run(config: ImpairmentConfig, seed: u64, n: u32) -> (Vec<Vec<u32>>, Counters) {
        let mut sim = Impairments::new(config, seed).unwrap();
        let mut out = Vec::new();
        let mut bursts: Vec<Vec<u32>> = Vec::new();
        for i in 0..n {
            out.clear();
            match sim.process(arrival_ns(i), &i.to_be_bytes(), &mut out).fate {
                Fate::DroppedGe { burst } => {
                    if bursts.len() as u64 != burst {
                        bursts.push(Vec::new());
                    }
                    bursts.last_mut().unwrap().push(i);
                }
                Fate::Forwarded => assert_eq!(out.len(), 1),
                other => panic!("arrival {i}: {other:?} with only GE on"),
            }
        }
        (bursts, sim.counters())
    }

    #[test]
    fn ge_bursts_are_geometric_with_the_mean_and_loss_of_the_formula() {
        // The issue's target model: mean burst 20, 4% of datagrams lost.
        let config = ge_config(20.0, 0.04);
        assert!((config.ge_mean_burst() - 20.0).abs() < 1e-9);
        assert!((config.ge_loss() - 0.04).abs() < 1e-12);
        let n = 2_000_000;
        for seed in [1, 2, 3] {
            let (bursts, c) = ge_run(config, seed, n);
            let lengths: Vec<u64> = bursts.iter().map(|b| b.len() as u64).collect();
            assert_eq!(lengths.len() as u64, c.ge_bursts);
            assert_eq!(lengths.iter().sum::<u64>(), c.dropped_ge);
            assert_eq!(Some(&c.longest_ge_burst), lengths.iter().max());
            assert_eq!(c.longest_drop_run, c.longest_ge_burst);
            // A burst is consecutive arrivals, and the one that ends it
            // gets through: two bursts never touch.
            for pair in bursts.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                assert!(a.windows(2).all(|w| w[1] == w[0] + 1), "{a:?}");
                assert!(b[0] > a[a.len() - 1] + 1, "bursts touch: {a:?} {b:?}");
            }
            // One cycle is 1/(1-Q) + 1/P = 500 arrivals: ~4000 bursts. A
            // burst's sd is sqrt(Q)/(1-Q) = 19.5, so the mean's is ~0.31
            // (1.5%); the loss fraction's is ~2.1% of 0.04. Allow ~4 sd.
            let mean = c.dropped_ge as f64 / c.ge_bursts as f64;
            let fraction = c.dropped_ge as f64 / f64::from(n);
            assert!((mean / 20.0 - 1.0).abs() < 0.06, "seed {seed}: mean {mean}");
            assert!(
                (fraction / 0.04 - 1.0).abs() < 0.085,
                "seed {seed}: fraction {fraction}"
            );
            // Geometric, not uniform: P(L > 20) = Q^20 = 0.358.
            let over = lengths.iter().filter(|&&l| l > 20).count() as f64 / lengths.len() as f64;
            assert!(
                (over - 0.95f64.powi(20)).abs() < 0.03,
                "seed {seed}: {over}"
            );
            eprintln!(
                "seed {seed}: {} bursts, mean {mean:.3}, fraction {fraction:.5}, \
                 P(L>20) {over:.4}, longest {}",
                c.ge_bursts, c.longest_ge_burst
            );
        }
    }

    #[test]
    fn ge_with_stay_zero_drops_single_datagrams_at_the_start_rate() {
        // Q = 0: every burst is one datagram; then loss = P/(1+P).
        let config = ImpairmentConfig {
            ge_start: 0.1,
            ..Default::default()
        };
        let (bursts, c) = ge_run(config, 5, 200_000);
        assert!(bursts.iter().all(|b| b.len() == 1));
        assert_eq!(c.longest_ge_burst, 1);
        // Expected 0.1/1.1 = 9.09%: 18 182 of 200 000, sd ~130.
        let want = config.ge_loss() * 200_000.0;
        assert!((c.dropped_ge as f64 - want).abs() < 600.0, "{c:?}");
    }

    #[test]
    fn ge_for_gives_the_issue_target_and_names_its_flags() {
        let (start, stay) = ImpairmentConfig::ge_for(20.0, 0.04).unwrap();
        assert!((stay - 0.95).abs() < 1e-12);
        assert!((start - 0.04 / 0.96 / 20.0).abs() < 1e-12);
        assert!((start - 0.002_083).abs() < 1e-6, "{start}");
        // A mean burst of 1 is single drops: ge_stay 0.
        assert_eq!(ImpairmentConfig::ge_for(1.0, 0.5).unwrap(), (1.0, 0.0));
        assert_eq!(ImpairmentConfig::ge_for(20.0, 0.0).unwrap(), (0.0, 0.95));
        for (mean, loss, flag) in [
            (0.5, 0.04, "--ge-mean-burst"),
            (f64::NAN, 0.04, "--ge-mean-burst"),
            (f64::INFINITY, 0.04, "--ge-mean-burst"),
            (1e300, 0.04, "--ge-mean-burst"),
            (20.0, 0.96, "--ge-loss"),
            (1.0, 0.6, "--ge-loss"),
            (20.0, -0.1, "--ge-loss"),
            (20.0, f64::NAN, "--ge-loss"),
        ] {
            let err = ImpairmentConfig::ge_for(mean, loss)
                .unwrap_err()
                .to_string();
            assert!(err.contains(flag), "{mean} {loss}: {err}");
        }
    }

    /// `n` arrivals `spacing_ns` apart from `t0`; returns each periodic
    /// burst's arrival indices, by burst, and the counters.
    fn periodic_run(
        config: ImpairmentConfig,
        seed: u64,
        times: impl IntoIterator<Item = u64>,
    ) -> (Vec<Vec<u32>>, Vec<Decision>, Counters) {
        let mut sim = Impairments::new(config, seed).unwrap();
        let mut out = Vec::new();
        let mut bursts: Vec<Vec<u32>> = Vec::new();
        let mut decisions = Vec::new();
        for (i, t) in (0u32..).zip(times) {
            let d = sim.process(t, &numbered(i, 8), &mut out);
            match d.fate {
                Fate::DroppedPeriodic { burst } => {
                    if bursts.len() as u64 != burst {
                        bursts.push(Vec::new());
                    }
                    bursts.last_mut().unwrap().push(i);
                }
                Fate::Forwarded => {}
                other => panic!("arrival {i}: {other:?} with only periodic bursts on"),
            }
            decisions.push(d);
        }
        let c = sim.counters();
        assert_eq!(out.len() as u64 + c.dropped_periodic, c.received);
        (bursts, decisions, c)
    }

    fn periodic(every_ms: f64, count: u32) -> ImpairmentConfig {
        ImpairmentConfig {
            burst_every_ms: every_ms,
            burst_count: count,
            ..Default::default()
        }
    }

    #[test]
    fn periodic_bursts_drop_exactly_n_consecutive_arrivals_once_per_period() {
        // 1 ms period, 20 per burst, arrivals 10 µs apart: 100 per period.
        let t0 = 5_000_000_123;
        let times = (0..100_000).map(|i| t0 + arrival_ns(i));
        let (bursts, decisions, c) = periodic_run(periodic(1.0, 20), 7, times);
        assert_eq!(c.periodic_bursts, bursts.len() as u64);
        // 1000 periods; the phase decides whether the last burst begins
        // before the run ends.
        assert!((999..=1000).contains(&bursts.len()), "{c:?}");
        let (last, whole) = bursts.split_last().unwrap();
        for burst in whole {
            assert_eq!(burst.len(), 20, "{burst:?}");
        }
        assert!(!last.is_empty() && last.len() <= 20);
        for burst in &bursts {
            assert!(burst.windows(2).all(|w| w[1] == w[0] + 1), "{burst:?}");
        }
        // The first begins within the first period, then one every 100.
        assert!(bursts[0][0] < 100, "{:?}", bursts[0]);
        for pair in bursts.windows(2) {
            assert_eq!(pair[1][0] - pair[0][0], 100);
        }
        assert_eq!(
            c.dropped_periodic,
            bursts.iter().map(|b| b.len() as u64).sum::<u64>()
        );
        assert_eq!(c.longest_drop_run, 20);
        assert_eq!(longest_run(&decisions), 20);
    }

    #[test]
    fn periodic_first_burst_falls_at_a_seeded_phase_within_the_first_period() {
        let first_start = |seed| {
            let times = (0..300).map(arrival_ns);
            let (bursts, _, _) = periodic_run(periodic(1.0, 5), seed, times);
            bursts[0][0]
        };
        let starts: Vec<u32> = (1..=40).map(first_start).collect();
        assert!(starts.iter().all(|&s| s < 100), "{starts:?}");
        let distinct: std::collections::BTreeSet<u32> = starts.iter().copied().collect();
        assert!(distinct.len() > 20, "phases are not spread: {starts:?}");
        assert_eq!(starts, (1..=40).map(first_start).collect::<Vec<_>>());
    }

    #[test]
    fn periodic_bursts_skip_idle_periods_and_stay_on_their_schedule() {
        // Arrivals 10 µs apart for 2 ms, nothing for 10 ms, then 3 ms more.
        let times: Vec<u64> = (0..200)
            .map(arrival_ns)
            .chain((1200..1500).map(arrival_ns))
            .collect();
        let (bursts, _, c) = periodic_run(periodic(1.0, 3), 11, times.iter().copied());
        let start_times: Vec<u64> = bursts.iter().map(|b| times[b[0] as usize]).collect();
        // Two before the gap, one at the first arrival after it (the due
        // times inside the gap do not pile up), then on the old grid.
        let resumed = start_times
            .iter()
            .position(|&t| t == arrival_ns(1200))
            .expect("the first arrival after the gap starts a burst");
        assert_eq!(resumed, 2, "{start_times:?}");
        assert!((5..=6).contains(&start_times.len()), "{start_times:?}");
        for (k, &t) in start_times.iter().enumerate() {
            if k != resumed {
                assert_eq!((t - start_times[0]) % 1_000_000, 0, "{start_times:?}");
            }
        }
        assert!(bursts.iter().all(|b| b.len() == 3));
        assert_eq!(c.dropped_periodic, 3 * start_times.len() as u64);
    }

    #[test]
    fn periodic_bursts_longer_than_a_period_of_arrivals_drop_everything() {
        // 20 per burst but only 10 arrivals per 1 ms: each due burst starts
        // anew before the last one has dropped its 20.
        let times = (0..10_000).map(|i| arrival_ns(i) * 10);
        let (bursts, _, c) = periodic_run(periodic(1.0, 20), 3, times);
        assert_eq!(c.dropped_periodic, 10_000 - (bursts[0][0] as u64));
        assert_eq!(c.periodic_bursts, bursts.len() as u64);
        assert!(bursts[1..bursts.len() - 1].iter().all(|b| b.len() == 10));
    }

    #[test]
    fn time_that_goes_back_counts_as_the_latest_time_seen() {
        let ms = 1_000_000;
        let steady = [0, 3 * ms, 3 * ms, 3 * ms, 4 * ms, 5 * ms];
        let jumpy = [0, 3 * ms, ms, 2 * ms, 4 * ms, 5 * ms];
        let (_, a, _) = periodic_run(periodic(1.0, 1), 8, steady);
        let (_, b, _) = periodic_run(periodic(1.0, 1), 8, jumpy);
        assert_eq!(a, b);
    }
}
