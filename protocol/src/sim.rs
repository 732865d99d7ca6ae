//! A seeded, rate-driven simulation of a whole link: records arriving at a
//! steady rate → encoder → a paced link of a given capacity that loses
//! datagrams by a loss model → decoder. No clocks and no sockets: time is a
//! number, so a seed fully determines a run.
//!
//! It is what `docs/wire-format.md`'s tolerance table is made from
//! (`make fec-table`, binary `weir-fec-table`) and what the protocol's burst
//! tests run (`protocol/tests/sim.rs`).
//!
//! **Load** is the share of the link's rate that the records would take on
//! the wire at the configured code: data frames plus `parity_shards` per
//! `data_shards`, with frame and per-datagram overhead. At 100% the link is
//! full at the configured parity ratio; below that the encoder may spend
//! the idle rest on spare parity.

use crate::frame::FRAME_OVERHEAD;
use crate::{
    Decoder, DecoderConfig, Encoder, EncoderConfig, Event, GapCause, Nanos, Point, Record,
    RecordBody, Signer, Value, Verifier, NANOS_PER_SEC,
};

/// SplitMix64: a small, well-mixed seeded generator (no dependency, same
/// sequence on every platform).
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`; draws nothing when `p` is 0.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// How the link loses datagrams. Every model counts datagrams, in the order
/// they were sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossModel {
    None,
    /// Each datagram is lost independently with probability `p`.
    Random {
        p: f64,
    },
    /// Gilbert–Elliott bursts: in the good state a datagram starts a burst
    /// (and is lost) with probability `start`; in a burst each next datagram
    /// is lost with probability `stay`, and the first one that survives
    /// ends it. Bursts are geometric with mean 1 / (1 − stay).
    GilbertElliott {
        start: f64,
        stay: f64,
    },
    /// One burst of `len` consecutive datagrams every `every` nanoseconds:
    /// at each period's start, the next `len` datagrams sent are lost.
    Periodic {
        len: u32,
        every: Nanos,
    },
    /// The first `len` datagrams sent after the link was quiet for at least
    /// `quiet` are lost: what links do on wake-up (NIC power states,
    /// neighbour resolution), the loss clustered at the start of a
    /// transfer that warm-up parity is for.
    AfterIdle {
        quiet: Nanos,
        len: u32,
    },
}

impl LossModel {
    /// Gilbert–Elliott with mean burst `mean` datagrams and `lost` of all
    /// datagrams lost in the long run.
    pub fn gilbert_elliott(mean: f64, lost: f64) -> LossModel {
        let stay = 1.0 - 1.0 / mean;
        // lost = s·mean / (1 + s·mean) for a start probability s.
        let start = lost / (mean * (1.0 - lost));
        LossModel::GilbertElliott { start, stay }
    }

    /// A short name for tables.
    pub fn describe(&self) -> String {
        match *self {
            LossModel::None => "none".into(),
            LossModel::Random { p } => format!("random {}%", p * 100.0),
            LossModel::GilbertElliott { start, stay } => {
                let mean = 1.0 / (1.0 - stay);
                let lost = start * mean / (1.0 + start * mean);
                format!(
                    "Gilbert–Elliott, mean burst {mean:.0}, {:.1}% lost",
                    lost * 100.0
                )
            }
            LossModel::Periodic { len, every } => format!(
                "a burst of {len} every {} s",
                every as f64 / NANOS_PER_SEC as f64
            ),
            LossModel::AfterIdle { quiet, len } => format!(
                "the first {len} after {} ms quiet",
                quiet / crate::NANOS_PER_MILLI
            ),
        }
    }
}

/// The lossy link's state.
pub struct Channel {
    model: LossModel,
    rng: Rng,
    in_burst: bool,
    burst_left: u32,
    next_period: Nanos,
    last_sent: Option<Nanos>,
    pub sent: u64,
    pub lost: u64,
    pub bursts: u64,
    pub longest_burst: u64,
    current_burst: u64,
}

impl Channel {
    pub fn new(model: LossModel, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        // The first periodic burst comes at a seeded phase.
        let next_period = match model {
            LossModel::Periodic { every, .. } => (rng.unit() * every as f64) as Nanos,
            _ => 0,
        };
        Channel {
            model,
            rng,
            in_burst: false,
            burst_left: 0,
            next_period,
            last_sent: None,
            sent: 0,
            lost: 0,
            bursts: 0,
            longest_burst: 0,
            current_burst: 0,
        }
    }

    /// Whether the datagram sent at `now` arrives.
    pub fn carries(&mut self, now: Nanos) -> bool {
        self.sent += 1;
        let quiet_since = self.last_sent.replace(now);
        let lost = match self.model {
            LossModel::None => false,
            LossModel::Random { p } => self.rng.chance(p),
            LossModel::GilbertElliott { start, stay } => {
                if self.in_burst {
                    self.in_burst = self.rng.chance(stay);
                } else if self.rng.chance(start) {
                    self.in_burst = true;
                    self.bursts += 1;
                }
                self.in_burst
            }
            LossModel::Periodic { len, every } => {
                if now >= self.next_period {
                    while self.next_period <= now {
                        self.next_period += every;
                    }
                    self.burst_left = len;
                    self.bursts += 1;
                }
                if self.burst_left > 0 {
                    self.burst_left -= 1;
                    true
                } else {
                    false
                }
            }
            LossModel::AfterIdle { quiet, len } => {
                if quiet_since.is_none_or(|t| now.saturating_sub(t) >= quiet) {
                    self.burst_left = len;
                    self.bursts += 1;
                }
                if self.burst_left > 0 {
                    self.burst_left -= 1;
                    true
                } else {
                    false
                }
            }
        };
        if lost {
            self.lost += 1;
            self.current_burst += 1;
            self.longest_burst = self.longest_burst.max(self.current_burst);
        } else {
            self.current_burst = 0;
        }
        !lost
    }
}

/// One simulated run.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The sender's code and link settings (`link_rate` is the capacity).
    pub encoder: EncoderConfig,
    /// Share of the link the records take at the configured code (0..1].
    pub load: f64,
    pub records: u64,
    pub loss: LossModel,
    pub seed: u64,
    /// Idle time inserted every `idle_every` records (0: never), to test
    /// the start of a transfer after idle.
    pub idle_every: u64,
    pub idle_for: Nanos,
    /// Records are handed over in batches every `tick` (0: each at its own
    /// time). The sender's generator source ticks every 5 ms, and polling
    /// sources are bursty alike; with `flush_ms` 5 this makes the partial
    /// blocks of all sizes a real source makes.
    pub tick: Nanos,
}

/// What a run did and lost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub records: u64,
    pub delivered: u64,
    /// Records named in `link-loss` gaps.
    pub lost: u64,
    /// Records neither delivered nor in a gap (must be 0: nothing silent).
    pub unaccounted: u64,
    pub blocks: u64,
    /// Blocks the decoder gave up (with or without some shards).
    pub blocks_lost: u64,
    pub blocks_repaired: u64,
    pub datagrams: u64,
    pub datagrams_lost: u64,
    pub longest_burst: u64,
    pub data_bytes: u64,
    pub parity_bytes: u64,
    /// Parity beyond the configured ratio, in frames.
    pub spare_parity_frames: u64,
    pub max_spread_ms: f64,
    /// Source-to-decoder latency of delivered records, in milliseconds.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// Simulated seconds the run took.
    pub seconds: f64,
    /// Load measured: wire bytes of data at the configured code / capacity.
    pub load: f64,
}

impl Outcome {
    /// Records lost per million sent.
    pub fn lost_per_million(&self) -> f64 {
        self.lost as f64 * 1e6 / self.records.max(1) as f64
    }

    /// Parity bytes on the wire per data byte.
    pub fn overhead(&self) -> f64 {
        self.parity_bytes as f64 / self.data_bytes.max(1) as f64
    }

    pub fn block_loss(&self) -> f64 {
        self.blocks_lost as f64 / self.blocks.max(1) as f64
    }
}

/// A generator point as the sender's generator source makes them; its
/// timestamp is when it was pushed (for latency).
fn point(stream: u32, seq: u64, at: Nanos) -> Record {
    Record {
        stream,
        seq,
        resent: false,
        body: RecordBody::Point(Point {
            tag: format!("plant/line{}/temp", seq % 64),
            ts_ns: at as i64,
            value: Value::F64(seq as f64 * 0.25),
            quality: 0,
            status: None,
        }),
    }
}

/// Runs a scenario to the end: all records pushed, then time enough for
/// every timer and spread to finish.
pub fn run(s: &Scenario) -> Outcome {
    let cfg = s.encoder.clone();
    let capacity = cfg.link_rate as f64;
    let frame_wire = (cfg.shard_size + FRAME_OVERHEAD + cfg.wire_overhead) as f64;
    // Bytes a record takes in a block: its postcard bytes plus an entry
    // header of about 2 bytes.
    let sample = postcard::to_allocvec(&point(0, 1_000_000, 1 << 50)).expect("serializes");
    let record_bytes = sample.len() as f64 + 2.0;
    let code = (cfg.data_shards + cfg.parity_shards) as f64 / cfg.data_shards as f64;
    let wire_per_record = record_bytes / cfg.shard_size as f64 * code * frame_wire;
    let per_sec = s.load * capacity / wire_per_record;
    let gap = (NANOS_PER_SEC as f64 / per_sec).max(1.0);

    let mut enc = Encoder::new(cfg.clone(), Signer::Disabled);
    let mut dec = Decoder::new(DecoderConfig::default(), Verifier::disabled());
    let mut channel = Channel::new(s.loss, s.seed);
    let stream = enc.add_stream("sim", "generator", 0, 1);
    let mut buf = vec![0u8; enc.max_frame_len()];
    let mut now: Nanos = 0;
    let mut link_free: Nanos = 0;
    let mut next_seq: u64 = 0;
    let mut next_at = 0.0f64;
    let mut out = Outcome {
        records: s.records,
        ..Outcome::default()
    };
    let mut latencies: Vec<u32> = Vec::with_capacity(s.records.min(20_000_000) as usize);
    let mut in_gap: u64 = 0;
    let mut done_at: Option<Nanos> = None;
    enc.handle_timeout(0);
    // When the record nominally due at `at` is handed over.
    let release = |at: f64| -> Nanos {
        if s.tick == 0 {
            at as Nanos
        } else {
            ((at / s.tick as f64).ceil() as Nanos).saturating_mul(s.tick)
        }
    };
    loop {
        // Timers before records due at the same instant: a flush timer that
        // fires as a tick hands over records seals the block first.
        if enc.poll_timeout().is_some_and(|t| t <= now) {
            enc.handle_timeout(now);
        }
        // Records due by now.
        while next_seq < s.records && release(next_at) <= now && !enc.is_backlogged() {
            enc.push(now, &point(stream, next_seq, now));
            next_seq += 1;
            next_at += gap;
            if s.idle_every > 0 && next_seq.is_multiple_of(s.idle_every) {
                next_at += s.idle_for as f64;
            }
        }
        let mut sent = false;
        if link_free <= now {
            if let Some(n) = enc.poll_frame(now, &mut buf) {
                link_free = now
                    + ((n + cfg.wire_overhead) as f64 * NANOS_PER_SEC as f64 / capacity) as Nanos;
                if channel.carries(now) {
                    dec.handle_datagram(now, &mut buf[..n]);
                }
                sent = true;
            }
        }
        if dec.poll_timeout().is_some_and(|t| t <= now) {
            dec.handle_timeout(now);
        }
        while let Some(ev) = dec.poll_event() {
            match ev {
                Event::Record(d) => {
                    out.delivered += 1;
                    if let RecordBody::Point(p) = &d.body {
                        let ms = now.saturating_sub(p.ts_ns as Nanos) / 10_000;
                        latencies.push(ms.min(u32::MAX as u64) as u32);
                    }
                }
                Event::Gap(g) => {
                    if g.cause == GapCause::LinkLoss {
                        out.lost += g.records();
                    } else {
                        in_gap += g.records();
                    }
                }
                _ => {}
            }
        }
        if next_seq >= s.records && done_at.is_none() {
            done_at = Some(now);
        }
        // Done: everything pushed and sent, and the decoder has settled
        // (heartbeats name the tail, timeouts have run).
        if let Some(t) = done_at {
            if enc.is_idle() && now >= t + 3 * NANOS_PER_SEC {
                break;
            }
        }
        if sent {
            now = now.max(link_free);
            continue;
        }
        // Nothing to send now: jump to the next event.
        let mut next = [
            (next_seq < s.records && !enc.is_backlogged()).then_some(release(next_at)),
            enc.poll_timeout(),
            dec.poll_timeout(),
            (link_free > now).then_some(link_free),
        ]
        .into_iter()
        .flatten()
        .filter(|t| *t > now)
        .min()
        .unwrap_or(now + NANOS_PER_SEC / 10);
        if done_at.is_some() {
            next = next.min(now + NANOS_PER_SEC / 10);
        }
        now = next;
    }
    let es = enc.stats();
    let ds = dec.stats();
    out.unaccounted = s.records - out.delivered - out.lost - in_gap;
    out.blocks = es.blocks;
    out.blocks_lost = ds.blocks_lost + ds.blocks_missing;
    out.blocks_repaired = ds.blocks_repaired;
    out.datagrams = channel.sent;
    out.datagrams_lost = channel.lost;
    out.longest_burst = channel.longest_burst;
    out.data_bytes = es.data_bytes;
    out.parity_bytes = es.parity_bytes;
    out.spare_parity_frames = es.spare_parity_frames;
    out.max_spread_ms = es.max_spread as f64 / 1e6;
    out.seconds = done_at.unwrap_or(now) as f64 / NANOS_PER_SEC as f64;
    out.load = es.record_bytes as f64 / cfg.shard_size as f64 * code * frame_wire
        / (out.seconds.max(1e-9) * capacity);
    latencies.sort_unstable();
    let pick = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() - 1) as f64 * q) as usize;
        latencies[i] as f64 / 100.0
    };
    out.latency_p50_ms = pick(0.5);
    out.latency_p99_ms = pick(0.99);
    out.latency_max_ms = pick(1.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gilbert_elliott_loses_the_share_and_burst_length_it_is_built_for() {
        let mut c = Channel::new(LossModel::gilbert_elliott(20.0, 0.04), 1);
        for _ in 0..2_000_000 {
            c.carries(0);
        }
        let lost = c.lost as f64 / c.sent as f64;
        let mean = c.lost as f64 / c.bursts as f64;
        assert!((0.036..0.044).contains(&lost), "lost {lost}");
        assert!((18.0..22.0).contains(&mean), "mean burst {mean}");
    }

    #[test]
    fn a_periodic_burst_drops_exactly_its_length_once_per_period() {
        let mut c = Channel::new(
            LossModel::Periodic {
                len: 100,
                every: NANOS_PER_SEC,
            },
            3,
        );
        // 10,000 datagrams a second for 5 seconds.
        for i in 0..50_000u64 {
            c.carries(i * 100_000);
        }
        assert_eq!(c.bursts, 5);
        assert_eq!(c.lost, 500);
        assert_eq!(c.longest_burst, 100);
    }

    #[test]
    fn after_idle_loss_takes_the_first_datagrams_after_each_quiet_spell() {
        let mut c = Channel::new(
            LossModel::AfterIdle {
                quiet: NANOS_PER_SEC,
                len: 10,
            },
            1,
        );
        let fates: Vec<bool> = (0..30).map(|i| c.carries(i * 1000)).collect();
        assert!(fates[..10].iter().all(|d| !d) && fates[10..].iter().all(|d| *d));
        // Two seconds of silence: the next ten are lost again.
        let fates: Vec<bool> = (0..30)
            .map(|i| c.carries(3 * NANOS_PER_SEC + i * 1000))
            .collect();
        assert!(fates[..10].iter().all(|d| !d) && fates[10..].iter().all(|d| *d));
        assert_eq!((c.bursts, c.lost), (2, 20));
    }
}
