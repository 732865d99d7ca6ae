//! Deterministic simulation: encoder → seeded lossy in-memory link → decoder.
//! A failing seed is a reproducible test case.

use std::collections::{BTreeMap, VecDeque};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use weir_protocol::config::session_id;
use weir_protocol::decoder::{Delivered, StreamPosition};
use weir_protocol::{
    Chunk, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, GapCause, Nanos, Point, Record,
    RecordBody, Value, NANOS_PER_SEC,
};
use weir_protocol::{FrameHeader, GapNotice, Key, NoticeCause, Signer, Verifier};

/// The link key of every simulated pair: frames are authenticated, as in
/// production.
fn link_key() -> Key {
    Key::from_bytes(&[0x5e; weir_protocol::auth::KEY_LEN]).expect("32 bytes")
}

fn signer() -> Signer {
    Signer::Key(link_key())
}

fn verifier() -> Verifier {
    Verifier::new(vec![link_key()]).expect("one key")
}

/// A seeded link: random loss, Gilbert–Elliott style bursts, reordering,
/// duplication and bit corruption.
#[derive(Clone, Copy, Default)]
struct Impairments {
    loss: f64,
    burst_start: f64,
    burst_max: u32,
    reorder: f64,
    duplicate: f64,
    corrupt: f64,
}

struct Link {
    imp: Impairments,
    rng: ChaCha8Rng,
    burst_left: u32,
    held: Vec<(u32, Vec<u8>)>,
    dropped: u64,
}

impl Link {
    fn new(seed: u64, imp: Impairments) -> Self {
        Link {
            imp,
            rng: ChaCha8Rng::seed_from_u64(seed),
            burst_left: 0,
            held: Vec::new(),
            dropped: 0,
        }
    }

    fn carry(&mut self, datagram: &[u8], out: &mut VecDeque<Vec<u8>>) {
        // Held (reordered) datagrams are released after a few others pass.
        let mut i = 0;
        while i < self.held.len() {
            self.held[i].0 -= 1;
            if self.held[i].0 == 0 {
                out.push_back(self.held.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        if self.burst_left == 0 && self.imp.burst_max > 0 && self.rng.gen_bool(self.imp.burst_start)
        {
            self.burst_left = self.rng.gen_range(1..=self.imp.burst_max);
        }
        if self.burst_left > 0 {
            self.burst_left -= 1;
            self.dropped += 1;
            return;
        }
        if self.rng.gen_bool(self.imp.loss) {
            self.dropped += 1;
            return;
        }
        let mut d = datagram.to_vec();
        if self.rng.gen_bool(self.imp.corrupt) {
            let bit = self.rng.gen_range(0..d.len() * 8);
            d[bit / 8] ^= 1 << (bit % 8);
        }
        if self.rng.gen_bool(self.imp.duplicate) {
            out.push_back(d.clone());
        }
        if self.rng.gen_bool(self.imp.reorder) {
            let after = self.rng.gen_range(1..=8);
            self.held.push((after, d));
        } else {
            out.push_back(d);
        }
    }

    fn drain(&mut self, out: &mut VecDeque<Vec<u8>>) {
        out.extend(self.held.drain(..).map(|(_, d)| d));
    }
}

/// What arrived at the decoder, per stream.
#[derive(Default)]
struct Outcome {
    delivered: BTreeMap<String, Vec<u64>>,
    gaps: BTreeMap<String, Vec<(u64, u64, GapCause)>>,
    bodies: BTreeMap<String, Vec<RecordBody>>,
    recovered: Vec<(String, u64, u64)>,
}

impl Outcome {
    fn take(&mut self, decoder: &mut Decoder, keep_bodies: bool) {
        while let Some(ev) = decoder.poll_event() {
            match ev {
                Event::Record(Delivered {
                    stream, seq, body, ..
                }) => {
                    self.delivered
                        .entry(stream.to_string())
                        .or_default()
                        .push(seq);
                    if keep_bodies {
                        self.bodies
                            .entry(stream.to_string())
                            .or_default()
                            .push(body);
                    }
                }
                Event::Recovered { stream, from, to } => {
                    self.recovered.push((stream.to_string(), from, to))
                }
                Event::Gap(g) => self
                    .gaps
                    .entry(g.stream.to_string())
                    .or_default()
                    .push((g.from, g.to, g.cause)),
                _ => {}
            }
        }
    }

    fn gap_count(&self) -> u64 {
        self.gaps
            .values()
            .flatten()
            .map(|(f, t, _)| t - f + 1)
            .sum()
    }

    /// Every sequence in `range` was delivered exactly once, in order, or is
    /// in exactly one gap; nothing else was reported.
    fn assert_exact(&self, stream: &str, range: std::ops::Range<u64>) {
        let delivered = self.delivered.get(stream).cloned().unwrap_or_default();
        assert!(
            delivered.windows(2).all(|w| w[0] < w[1]),
            "{stream}: delivered out of order or twice"
        );
        let mut accounted: Vec<u64> = delivered.clone();
        for (from, to, _) in self.gaps.get(stream).into_iter().flatten() {
            assert!(from <= to);
            accounted.extend(*from..=*to);
        }
        accounted.sort_unstable();
        let expected: Vec<u64> = range.collect();
        let missing: Vec<u64> = expected
            .iter()
            .filter(|s| accounted.binary_search(s).is_err())
            .copied()
            .take(20)
            .collect();
        assert!(
            missing.is_empty(),
            "{stream}: neither delivered nor in a gap (first 20): {missing:?}"
        );
        assert_eq!(
            accounted.len(),
            expected.len(),
            "{stream}: more accounted than sent"
        );
        assert!(
            accounted == expected,
            "{stream}: delivered + gaps must cover each record exactly once"
        );
    }
}

struct Harness {
    now: Nanos,
    enc: Encoder,
    dec: Decoder,
    link: Link,
    frame: Vec<u8>,
    wire: VecDeque<Vec<u8>>,
    out: Outcome,
    keep_bodies: bool,
    /// Simulated time per datagram (the link rate).
    frame_time: Nanos,
    /// Every datagram the sender sent, when set (to replay them later).
    capture: bool,
    captured: Vec<Vec<u8>>,
}

/// One simulated microsecond per datagram: about 1.4 GB/s at MTU 1500.
const FRAME_TIME: Nanos = 1_000;

impl Harness {
    fn new(seed: u64, enc_cfg: EncoderConfig, imp: Impairments) -> Self {
        let frame = vec![0u8; enc_cfg.shard_size + 64];
        Harness {
            now: 0,
            enc: Encoder::new(enc_cfg, signer()),
            dec: Decoder::new(DecoderConfig::default(), verifier()),
            link: Link::new(seed, imp),
            frame,
            wire: VecDeque::new(),
            out: Outcome::default(),
            keep_bodies: false,
            frame_time: FRAME_TIME,
            capture: false,
            captured: Vec::new(),
        }
    }

    /// Sends whatever the encoder has ready, one frame time each.
    fn pump(&mut self) {
        loop {
            if self.enc.poll_timeout().is_some_and(|t| t <= self.now) {
                self.enc.handle_timeout(self.now);
            }
            let Some(n) = self.enc.poll_frame(self.now, &mut self.frame) else {
                break;
            };
            if self.capture {
                self.captured.push(self.frame[..n].to_vec());
            }
            self.link.carry(&self.frame[..n], &mut self.wire);
            self.deliver();
            self.now += self.frame_time;
        }
    }

    fn deliver(&mut self) {
        while let Some(d) = self.wire.pop_front() {
            self.dec.handle_datagram(self.now, &mut d.to_vec());
        }
        if self.dec.poll_timeout().is_some_and(|t| t <= self.now) {
            self.dec.handle_timeout(self.now);
        }
        self.out.take(&mut self.dec, self.keep_bodies);
    }

    fn push(&mut self, record: &Record) {
        while self.enc.is_backlogged() {
            self.pump();
        }
        self.enc.push(self.now, record);
    }

    /// Flushes, lets a final heartbeat cross, and waits out every timeout.
    fn finish(&mut self) {
        self.enc.flush(self.now);
        self.pump();
        // Let time pass in steps so timers fire and a heartbeat crosses.
        for _ in 0..40 {
            self.now += NANOS_PER_SEC / 10;
            self.enc.handle_timeout(self.now);
            self.pump();
            self.link.drain(&mut self.wire);
            self.deliver();
        }
    }
}

fn point(stream: u32, seq: u64) -> Record {
    Record {
        stream,
        seq,
        resent: false,
        body: RecordBody::Point(Point {
            tag: format!("plant/line{}/temp", seq % 16),
            ts_ns: 1_700_000_000_000_000_000 + seq as i64,
            value: Value::F64(seq as f64 * 0.5),
            quality: 0,
            status: None,
        }),
    }
}

fn run_points(seed: u64, cfg: EncoderConfig, imp: Impairments, per_stream: u64) -> Harness {
    let mut h = Harness::new(seed, cfg, imp);
    let a = h.enc.add_stream("gen-a", "generator", 0, 7);
    let b = h.enc.add_stream("gen-b", "generator", 1000, 7);
    h.enc.handle_timeout(0);
    for i in 0..per_stream {
        h.push(&point(a, i));
        h.push(&point(b, 1000 + i));
        if i % 512 == 0 {
            h.now += FRAME_TIME;
        }
    }
    h.finish();
    h
}

#[test]
fn a_million_records_survive_5pct_loss_with_20_datagram_bursts_under_defaults() {
    let imp = Impairments {
        loss: 0.05,
        burst_start: 0.002,
        burst_max: 20,
        ..Default::default()
    };
    let h = run_points(0x5eed, EncoderConfig::new(1), imp, 500_000);
    assert!(h.link.dropped > 0);
    assert_eq!(h.out.gap_count(), 0, "gaps: {:?}", h.out.gaps);
    h.out.assert_exact("gen-a", 0..500_000);
    h.out.assert_exact("gen-b", 1000..501_000);
    let s = h.dec.stats();
    assert!(
        s.blocks_repaired > 0,
        "the loss must have needed FEC: {s:?}"
    );
    assert_eq!(s.blocks_lost, 0);
}

#[test]
fn loss_beyond_fec_is_reported_as_exact_gaps() {
    for seed in 1..=4 {
        let imp = Impairments {
            loss: 0.16,
            burst_start: 0.004,
            burst_max: 30,
            ..Default::default()
        };
        let h = run_points(seed, EncoderConfig::new(seed), imp, 100_000);
        assert!(
            h.out.gap_count() > 0,
            "seed {seed}: this loss must exceed FEC"
        );
        h.out.assert_exact("gen-a", 0..100_000);
        h.out.assert_exact("gen-b", 1000..101_000);
        assert!(h
            .out
            .gaps
            .values()
            .flatten()
            .all(|g| g.2 == GapCause::LinkLoss));
    }
}

#[test]
fn reordering_duplication_and_corruption_are_absorbed() {
    let imp = Impairments {
        loss: 0.02,
        reorder: 0.05,
        duplicate: 0.05,
        corrupt: 0.02,
        ..Default::default()
    };
    let h = run_points(7, EncoderConfig::new(9), imp, 100_000);
    assert_eq!(h.out.gap_count(), 0);
    h.out.assert_exact("gen-a", 0..100_000);
    let s = h.dec.stats();
    assert!(
        s.rejected_crc > 0,
        "corrupted frames are rejected by CRC: {s:?}"
    );
    assert!(s.replayed > 0);
}

#[test]
fn tail_loss_is_reported_from_the_heartbeat() {
    // Drop everything after the first records: only heartbeats tell the
    // receiver how far the stream went.
    let mut h = Harness::new(3, EncoderConfig::new(3), Impairments::default());
    let s = h.enc.add_stream("tail", "generator", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..10 {
        h.push(&point(s, i));
    }
    h.enc.flush(h.now);
    h.pump();
    h.link.imp.loss = 1.0;
    for i in 10..5000 {
        h.push(&point(s, i));
    }
    h.enc.flush(h.now);
    h.pump();
    h.link.imp.loss = 0.0;
    h.finish();
    assert_eq!(h.out.delivered["tail"], (0..10).collect::<Vec<_>>());
    assert_eq!(h.out.gaps["tail"], vec![(10, 4999, GapCause::LinkLoss)]);
}

#[test]
fn large_records_are_fragmented_and_reassembled_byte_exact() {
    let mut h = Harness::new(
        11,
        EncoderConfig::new(11),
        Impairments {
            loss: 0.03,
            ..Default::default()
        },
    );
    h.keep_bodies = true;
    let s = h.enc.add_stream("raw", "tcp", 0, 7);
    h.enc.handle_timeout(0);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut sent = Vec::new();
    for seq in 0..60 {
        let len = [10usize, 1500, 91_000, 92_000, 250_000, 700_000][seq as usize % 6];
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let body = RecordBody::Bytes(Chunk { data, end: false });
        sent.push(body.clone());
        h.push(&Record {
            stream: s,
            seq,
            resent: false,
            body,
        });
    }
    h.finish();
    assert_eq!(h.out.gap_count(), 0);
    assert_eq!(h.out.bodies["raw"], sent);
}

#[test]
fn a_restarted_receiver_reports_what_it_missed_as_receiver_down() {
    let mut h = Harness::new(5, EncoderConfig::new(5), Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..20_000 {
        h.push(&point(s, i));
    }
    h.enc.flush(h.now);
    h.pump();
    let last = *h.out.delivered["gen"].last().unwrap();
    // The receiver goes away while the sender keeps sending...
    h.link.imp.loss = 1.0;
    for i in 20_000..200_000 {
        h.push(&point(s, i));
    }
    h.enc.flush(h.now);
    h.pump();
    // ...and a new one starts with the saved cursor.
    h.dec = Decoder::new(DecoderConfig::default(), verifier());
    h.dec.restore_cursor(
        "gen",
        StreamPosition {
            session: Some(5),
            epoch: Some(7),
            last: Some(last),
        },
    );
    h.out = Outcome::default();
    h.link.imp.loss = 0.0;
    for i in 200_000..300_000 {
        h.push(&point(s, i));
    }
    h.finish();
    let first = h.out.delivered["gen"][0];
    assert_eq!(
        h.out.gaps["gen"],
        vec![(last + 1, first - 1, GapCause::ReceiverDown)]
    );
    assert_eq!(*h.out.delivered["gen"].last().unwrap(), 299_999);
}

#[test]
fn a_new_sender_session_restarting_numbering_is_a_sequence_reset_not_duplicates() {
    let mut h = Harness::new(8, EncoderConfig::new(100), Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 1);
    h.enc.handle_timeout(0);
    for i in 0..1000 {
        h.push(&point(s, i));
    }
    h.finish();
    // The sender lost its sequence state: a new epoch, numbering from 0.
    h.enc = Encoder::new(EncoderConfig::new(200), signer());
    let s = h.enc.add_stream("gen", "generator", 0, 2);
    h.enc.handle_timeout(h.now);
    for i in 0..1000 {
        h.push(&point(s, i));
    }
    h.finish();
    assert_eq!(h.out.delivered["gen"].len(), 2000);
    assert_eq!(h.dec.stats().sequence_resets, 1);
    assert!(h.out.gaps.is_empty());
}

#[test]
fn a_restarted_sender_resending_from_its_spool_causes_no_duplicates_and_no_gap() {
    let mut h = Harness::new(8, EncoderConfig::new(100), Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 42);
    h.enc.handle_timeout(0);
    for i in 0..1000 {
        h.push(&point(s, i));
    }
    h.finish();
    // Same epoch: the new session starts again from 900, which the
    // receiver already has up to 999.
    h.enc = Encoder::new(EncoderConfig::new(200), signer());
    let s = h.enc.add_stream("gen", "generator", 900, 42);
    h.enc.handle_timeout(h.now);
    for i in 900..2000 {
        h.push(&point(s, i));
    }
    h.finish();
    h.out.assert_exact("gen", 0..2000);
    assert_eq!(h.dec.stats().duplicate_records, 100);
    assert_eq!(h.dec.stats().sequence_resets, 0);
}

/// A sender killed while its blocks were on the wire: some were lost, later
/// ones arrived, so the lost records became a link-loss gap. The restarted
/// sender sends again from its spool's last sent mark: the records in the
/// gap are delivered (recovered), the others dropped as duplicates.
#[test]
fn a_restarted_sender_resending_from_its_spool_fills_the_gap_its_predecessor_left() {
    let mut h = Harness::new(8, EncoderConfig::new(100), Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 42);
    h.enc.handle_timeout(0);
    for i in 0..1000 {
        h.push(&point(s, i));
    }
    h.enc.flush(h.now);
    h.pump();
    // Records 1000..2000 are lost on the link, 2000..3000 arrive.
    h.link.imp.loss = 1.0;
    for i in 1000..2000 {
        h.push(&point(s, i));
    }
    h.enc.flush(h.now);
    h.pump();
    h.link.imp.loss = 0.0;
    for i in 2000..3000 {
        h.push(&point(s, i));
    }
    h.finish();
    let gaps = h.out.gaps["gen"].clone();
    assert!(
        !gaps.is_empty() && gaps.iter().all(|g| g.2 == GapCause::LinkLoss),
        "{gaps:?}"
    );
    let gap_records: u64 = gaps.iter().map(|g| g.1 - g.0 + 1).sum();
    // The new session resends everything from 900.
    h.enc = Encoder::new(EncoderConfig::new(200), signer());
    let s = h.enc.add_stream("gen", "generator", 900, 42);
    h.enc.handle_timeout(h.now);
    for i in 900..3500 {
        h.push(&point(s, i));
    }
    h.finish();
    let st = h.dec.stats();
    assert_eq!(st.spool_recovered, gap_records);
    assert_eq!(st.duplicate_records, 2100 - gap_records);
    let mut seqs = h.out.delivered["gen"].clone();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..3500).collect::<Vec<_>>(), "each record once");
    let recovered: u64 = h.out.recovered.iter().map(|r| r.2 - r.1 + 1).sum();
    assert_eq!(recovered, gap_records);
}

#[test]
fn a_spool_overflow_notice_becomes_a_gap_with_its_cause_and_a_resend_recovers_it() {
    let mut h = Harness::new(13, EncoderConfig::new(1), Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 1);
    h.enc.handle_timeout(0);
    for i in 0..100 {
        h.push(&point(s, i));
    }
    h.enc.push_gap_notice(
        h.now,
        &GapNotice {
            stream: s,
            from: 100,
            to: 199,
            cause: NoticeCause::SpoolOverflow,
        },
    );
    for i in 200..300 {
        h.push(&point(s, i));
    }
    h.finish();
    assert_eq!(
        h.out.gaps["gen"],
        vec![(100, 199, GapCause::SenderSpoolOverflow)]
    );
    // An operator resends 150..=249: 150..=199 fill the gap, 200..=249 are
    // duplicates and dropped.
    for i in 150..250 {
        let mut r = point(s, i);
        r.resent = true;
        h.push(&r);
    }
    h.finish();
    let mut seqs = h.out.delivered["gen"].clone();
    assert_eq!(seqs.len(), 250);
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 250, "no record delivered twice");
    assert_eq!(h.dec.stats().resent_recovered, 50);
    assert_eq!(h.dec.stats().resent_duplicate, 50);
    assert_eq!(h.out.recovered, vec![("gen".to_string(), 150, 199)]);
}

#[test]
fn replayed_frames_of_an_old_session_are_rejected() {
    let mut h = Harness::new(9, EncoderConfig::new(1), Impairments::default());
    h.capture = true;
    let s = h.enc.add_stream("gen", "generator", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..1000 {
        h.push(&point(s, i));
    }
    h.finish();
    h.capture = false;
    let old = std::mem::take(&mut h.captured);
    h.enc = Encoder::new(EncoderConfig::new(2), signer());
    let s = h.enc.add_stream("gen", "generator", 1000, 7);
    h.enc.handle_timeout(h.now);
    for i in 1000..2000 {
        h.push(&point(s, i));
    }
    h.finish();
    for f in &old {
        h.dec.handle_datagram(h.now, &mut f.to_vec());
    }
    h.deliver();
    assert_eq!(h.dec.stats().rejected_stale_session, old.len() as u64);
    h.out.assert_exact("gen", 0..2000);
}

#[test]
fn a_stray_frame_of_another_session_does_not_end_the_live_one() {
    let mut h = Harness::new(12, EncoderConfig::new(1), Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..5000 {
        h.push(&point(s, i));
    }
    h.pump();
    // One well-formed frame of some other session arrives...
    let mut other = Encoder::new(EncoderConfig::new(0xbad), signer());
    other.handle_timeout(0);
    let n = other.poll_frame(0, &mut h.frame).unwrap();
    let stray = h.frame[..n].to_vec();
    h.dec.handle_datagram(h.now, &mut stray.to_vec());
    // ...and the live session carries on, complete.
    for i in 5000..10_000 {
        h.push(&point(s, i));
    }
    h.finish();
    h.out.assert_exact("gen", 0..10_000);
    assert_eq!(h.out.gap_count(), 0);
}

#[test]
fn warmup_blocks_after_idle_carry_extra_parity() {
    let mut cfg = EncoderConfig::new(4);
    cfg.warmup_blocks = 2;
    let mut h = Harness::new(4, cfg, Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..50_000 {
        h.push(&point(s, i));
    }
    h.finish();
    assert_eq!(h.enc.stats().warmup_blocks, 2);
    let before = h.enc.stats().warmup_blocks;
    h.now += 5 * NANOS_PER_SEC;
    h.push(&point(s, 50_000));
    h.finish();
    assert_eq!(
        h.enc.stats().warmup_blocks,
        before + 1,
        "a burst after idle starts with a warm-up block"
    );
    h.out.assert_exact("gen", 0..50_001);
}

#[test]
fn low_rate_traffic_survives_bursts_through_spare_capacity_parity() {
    // 20k points/s: blocks are sealed part-full by the flush timer and go
    // out in short groups, so interleaving alone cannot spread a burst.
    let imp = Impairments {
        loss: 0.02,
        burst_start: 0.002,
        burst_max: 12,
        ..Default::default()
    };
    let mut h = Harness::new(21, EncoderConfig::new(21), imp);
    let s = h.enc.add_stream("slow", "generator", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..200_000 {
        h.enc.push(h.now, &point(s, i));
        h.now += 50_000;
        h.pump();
    }
    h.finish();
    assert!(h.enc.stats().spare_parity_blocks > 0);
    assert_eq!(h.out.gap_count(), 0, "gaps: {:?}", h.out.gaps);
    h.out.assert_exact("slow", 0..200_000);
}

/// Sends `count` points over a 1 Mbit/s link with 3% loss.
fn slow_link_run(count: u64) -> Harness {
    // 1 Mbit/s: a 1472-byte datagram every 12 ms, so a block that needs
    // parity completes up to 16 rounds of 8 datagrams (about 1.5 s) after
    // its neighbours, far longer than block_timeout.
    let mut h = Harness::new(
        31,
        EncoderConfig::new(31),
        Impairments {
            loss: 0.03,
            ..Default::default()
        },
    );
    h.frame_time = 12_000_000;
    let s = h.enc.add_stream("slow", "generator", 0, 1);
    h.enc.handle_timeout(0);
    for i in 0..count {
        h.push(&point(s, i));
    }
    h.finish();
    h
}

#[test]
fn a_slow_link_loses_no_block_to_the_timeout_while_interleaved_groups_trickle_in() {
    // 58 000 points: full final groups; 60 000 (below) ends in a short one.
    let h = slow_link_run(58_000);
    assert_eq!(
        h.dec.stats().blocks_lost + h.dec.stats().blocks_missing,
        0,
        "{:?}",
        h.dec.stats()
    );
    h.out.assert_exact("slow", 0..58_000);
    assert_eq!(h.out.gap_count(), 0);
}

/// A CRC-valid data frame with any header, as a hostile sender writes it.
fn forged_frame(session: u64, block: u64, k: u16, m: u16, shard_len: usize) -> Vec<u8> {
    let header = FrameHeader {
        flags: 0,
        session,
        block,
        index: 0,
        k,
        m,
        shard_len: shard_len as u16,
        data_len: (k as usize * shard_len) as u32,
    };
    let mut buf = vec![0u8; shard_len + 64];
    let n = header.write(&vec![0xA5; shard_len], &mut buf, &signer());
    buf.truncate(n);
    buf
}

fn bytes_record(stream: u32, seq: u64, len: usize) -> Record {
    Record {
        stream,
        seq,
        resent: false,
        body: RecordBody::Bytes(Chunk {
            data: vec![seq as u8; len],
            end: false,
        }),
    }
}

#[test]
fn one_forged_far_ahead_frame_of_the_live_session_does_not_turn_later_records_into_gaps() {
    let mut h = Harness::new(41, EncoderConfig::new(41), Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..20_000 {
        h.push(&point(s, i));
    }
    h.pump();
    let shard = h.enc.config().shard_size;
    h.dec
        .handle_datagram(h.now, &mut forged_frame(41, 1_000_000, 64, 16, shard));
    for i in 20_000..60_000 {
        h.push(&point(s, i));
    }
    h.finish();
    assert_eq!(h.out.gap_count(), 0, "gaps: {:?}", h.out.gaps);
    h.out.assert_exact("gen", 0..60_000);
    assert_eq!(h.dec.stats().window_jumps, 0);
}

#[test]
fn forty_frames_of_an_invented_session_do_not_take_over_from_a_live_sender() {
    let mut h = Harness::new(42, EncoderConfig::new(42), Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 7);
    h.enc.handle_timeout(0);
    // Well-formed frames of a session nobody started, with a higher id.
    let mut invented = Encoder::new(EncoderConfig::new(u64::MAX), signer());
    let t = invented.add_stream("gen", "generator", 0, 8);
    invented.handle_timeout(0);
    for i in 0..100_000 {
        invented.push(0, &point(t, i));
    }
    invented.flush(0);
    let mut forged = Vec::new();
    while let Some(n) = invented.poll_frame(0, &mut h.frame) {
        forged.push(h.frame[..n].to_vec());
    }
    let mut forged = forged.into_iter().take(40);
    for i in 0..60_000 {
        h.push(&point(s, i));
        if i % 1000 == 999 {
            h.enc.flush(h.now);
            h.pump();
            if let Some(f) = forged.next() {
                h.dec.handle_datagram(h.now, &mut f.to_vec());
            }
        }
    }
    h.finish();
    assert_eq!(h.out.gap_count(), 0, "gaps: {:?}", h.out.gaps);
    h.out.assert_exact("gen", 0..60_000);
    assert_eq!(h.dec.stats().records, 60_000);
}

#[test]
fn replayed_frames_of_an_earlier_session_do_not_take_over_while_the_live_one_is_briefly_silent() {
    let a = session_id(1_700_000_000_000, 0xa);
    let b = session_id(1_700_000_100_000, 0xb);
    let mut h = Harness::new(43, EncoderConfig::new(a), Impairments::default());
    h.capture = true;
    let s = h.enc.add_stream("gen", "generator", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..5000 {
        h.push(&point(s, i));
    }
    h.finish();
    h.capture = false;
    let replay = std::mem::take(&mut h.captured);
    // The sender restarts as session b; the receiver restarts too and so
    // has forgotten session a.
    h.enc = Encoder::new(EncoderConfig::new(b), signer());
    let s = h.enc.add_stream("gen", "generator", 5000, 7);
    h.enc.handle_timeout(h.now);
    h.dec = Decoder::new(DecoderConfig::default(), verifier());
    h.dec.restore_cursor(
        "gen",
        StreamPosition {
            session: Some(a),
            epoch: Some(7),
            last: Some(4999),
        },
    );
    h.out = Outcome::default();
    for i in 5000..10_000 {
        h.push(&point(s, i));
    }
    h.enc.flush(h.now);
    h.pump();
    // Session b falls silent for 5 s (say a link outage) while someone
    // replays session a's frames...
    let step = 5 * NANOS_PER_SEC / replay.len() as u64;
    for f in &replay {
        h.now += step;
        h.dec.handle_datagram(h.now, &mut f.to_vec());
        h.dec.handle_timeout(h.now);
    }
    h.out.take(&mut h.dec, false);
    // ...and then carries on.
    for i in 10_000..15_000 {
        h.push(&point(s, i));
    }
    h.finish();
    assert_eq!(h.out.gap_count(), 0, "gaps: {:?}", h.out.gaps);
    h.out.assert_exact("gen", 5000..15_000);
}

/// Sends one record of `stream` every `every` ns for `count` records,
/// starting at `first`, and returns when (simulated) the first record with
/// sequence `watch` was delivered, if it was.
fn trickle(
    h: &mut Harness,
    stream: u32,
    first: u64,
    count: u64,
    every: Nanos,
    watch: u64,
) -> Option<Nanos> {
    let mut seen = None;
    for i in first..first + count {
        h.enc.push(h.now, &point(stream, i));
        h.now += every;
        h.pump();
        if seen.is_none()
            && h.out
                .delivered
                .get("gen")
                .is_some_and(|d| d.contains(&watch))
        {
            seen = Some(h.now);
        }
    }
    seen
}

#[test]
fn a_restarted_sender_with_a_newer_session_is_followed_within_twice_its_heartbeat_gap() {
    let a = session_id(1_700_000_000_000, 0xa);
    let b = session_id(1_700_000_100_000, 0xb);
    let mut h = Harness::new(44, EncoderConfig::new(a), Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..5000 {
        h.push(&point(s, i));
    }
    h.finish();
    let stopped = h.now;
    h.enc = Encoder::new(EncoderConfig::new(b), signer());
    let s = h.enc.add_stream("gen", "generator", 5000, 7);
    h.enc.handle_timeout(h.now);
    let seen = trickle(
        &mut h,
        s,
        5000,
        500,
        10 * weir_protocol::NANOS_PER_MILLI,
        5000,
    )
    .expect("the new session was followed");
    h.finish();
    // A heartbeat each second: the old session is given up 2 s after its
    // last frame, which came at most 1 s before it stopped.
    assert!(seen - stopped <= 2 * NANOS_PER_SEC + 100 * weir_protocol::NANOS_PER_MILLI);
    assert_eq!(h.out.gap_count(), 0, "gaps: {:?}", h.out.gaps);
    h.out.assert_exact("gen", 0..5500);
}

#[test]
fn a_sender_whose_clock_went_backwards_is_followed_once_the_live_session_is_silent_for_a_minute() {
    let b = session_id(1_700_000_100_000, 0xb);
    let earlier = session_id(1_700_000_000_000, 0xc);
    let mut h = Harness::new(45, EncoderConfig::new(b), Impairments::default());
    let s = h.enc.add_stream("gen", "generator", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..5000 {
        h.push(&point(s, i));
    }
    h.finish();
    let stopped = h.now;
    h.enc = Encoder::new(EncoderConfig::new(earlier), signer());
    let s = h.enc.add_stream("gen", "generator", 5000, 7);
    h.enc.handle_timeout(h.now);
    let seen = trickle(
        &mut h,
        s,
        5000,
        900,
        100 * weir_protocol::NANOS_PER_MILLI,
        5000,
    )
    .expect("the new session was followed");
    h.finish();
    let waited = seen - stopped;
    assert!(
        (59 * NANOS_PER_SEC..=61 * NANOS_PER_SEC + 100 * weir_protocol::NANOS_PER_MILLI)
            .contains(&waited),
        "followed after {waited} ns"
    );
    // What it sent meanwhile was held and delivered.
    assert_eq!(h.out.gap_count(), 0, "gaps: {:?}", h.out.gaps);
    h.out.assert_exact("gen", 0..5900);
}

#[test]
fn a_sender_after_a_link_outage_longer_than_the_window_is_followed_with_exact_link_loss_gaps() {
    let mut h = Harness::new(46, EncoderConfig::new(46), Impairments::default());
    // 100 µs per datagram, about 14 MB/s: the outage below lasts ~2.5 s.
    h.frame_time = 100_000;
    let s = h.enc.add_stream("gen", "tcp", 0, 7);
    h.enc.handle_timeout(0);
    for i in 0..5000 {
        h.push(&bytes_record(s, i, 1000));
    }
    h.enc.flush(h.now);
    h.pump();
    h.link.imp.loss = 1.0;
    for i in 5000..35_000 {
        h.push(&bytes_record(s, i, 1000));
    }
    h.enc.flush(h.now);
    h.pump();
    h.link.imp.loss = 0.0;
    for i in 35_000..45_000 {
        h.push(&bytes_record(s, i, 1000));
    }
    h.finish();
    h.out.assert_exact("gen", 0..45_000);
    let gaps = &h.out.gaps["gen"];
    assert!(gaps.iter().all(|g| g.2 == GapCause::LinkLoss), "{gaps:?}");
    // The encoder queues up to 64 blocks, so the lost range is shifted
    // from the pushes above, but most of the outage is a gap.
    assert!(h.out.gap_count() >= 25_000, "{gaps:?}");
    assert_eq!(h.dec.stats().window_jumps, 1, "{:?}", h.dec.stats());
    // Held while waiting for the silence, then decoded: nothing sent after
    // the link came back was lost.
    let delivered = &h.out.delivered["gen"];
    assert!((35_000..45_000).all(|i| delivered.binary_search(&i).is_ok()));
}

/// Found when frame version 3 moved MTU-1500 shards from 1436 to 1416
/// bytes: 60 000 points end in a short final group whose last block is
/// small (few data shards), so it completes long before its round-robin
/// neighbours, which need ~64 rounds of 6 datagrams. The decoder once gave
/// those neighbours up as link loss when the small block had outwaited
/// `wait_limit`, while their shards were still arriving; now a block is only
/// given up once it has had no shard of its own for the wait limit.
#[test]
fn a_small_final_block_does_not_time_out_its_group_neighbours_on_a_slow_link() {
    let h = slow_link_run(60_000);
    assert_eq!(h.out.gap_count(), 0, "gaps: {:?}", h.out.gaps);
    h.out.assert_exact("slow", 0..60_000);
}

// ---- Bursts at every load (issue 8): the rate-driven simulation of
// `weir_protocol::sim`, defaults, 1 Gbit/s. `make fec-table` runs the same
// scenarios over 10,000,000 records each, at 1 Gbit/s and 200 Mbit/s, for
// the table in docs/wire-format.md; these shorter runs keep CI fast.

mod rate_driven {
    use weir_protocol::sim::{run, LossModel, Outcome, Scenario};
    use weir_protocol::{EncoderConfig, NANOS_PER_MILLI, NANOS_PER_SEC};

    const RECORDS: u64 = 1_000_000;

    fn defaults() -> EncoderConfig {
        let mut cfg = EncoderConfig::new(1);
        cfg.link_rate = 1_000_000_000 / 8;
        cfg
    }

    fn scenario(cfg: EncoderConfig, load: f64, loss: LossModel, seed: u64) -> Scenario {
        Scenario {
            encoder: cfg,
            load,
            records: RECORDS,
            loss,
            seed,
            idle_every: 0,
            idle_for: 0,
            // Records in batches every 5 ms, as the generator source hands
            // them over: partial blocks of every size.
            tick: 5 * NANOS_PER_MILLI,
        }
    }

    fn assert_nothing_lost(o: &Outcome, what: &str) {
        assert_eq!(
            o.unaccounted, 0,
            "{what}: records neither delivered nor in a gap: {o:?}"
        );
        assert!(o.datagrams_lost > 0, "{what}: the link lost nothing: {o:?}");
        assert_eq!(o.lost, 0, "{what}: records lost: {o:?}");
        assert_eq!(o.blocks_lost, 0, "{what}: {o:?}");
        assert_eq!(o.delivered, o.records, "{what}: {o:?}");
    }

    #[test]
    fn defaults_lose_no_record_to_5pct_random_loss_at_5_50_and_80pct_load() {
        for load in [0.05, 0.5, 0.8] {
            let o = run(&scenario(
                defaults(),
                load,
                LossModel::Random { p: 0.05 },
                11,
            ));
            assert_nothing_lost(&o, &format!("5% random loss at {load}"));
        }
    }

    #[test]
    fn defaults_lose_no_record_to_gilbert_elliott_bursts_of_mean_20_at_5_and_80pct_load() {
        for load in [0.05, 0.8] {
            let loss = LossModel::gilbert_elliott(20.0, 0.04);
            let o = run(&scenario(defaults(), load, loss, 12));
            assert_nothing_lost(&o, &format!("GE bursts at {load}"));
            assert!(o.longest_burst >= 60, "bursts were long: {o:?}");
        }
    }

    #[test]
    fn defaults_lose_no_record_to_a_100_datagram_burst_every_second_at_5_and_80pct_load() {
        for load in [0.05, 0.8] {
            let loss = LossModel::Periodic {
                len: 100,
                every: NANOS_PER_SEC,
            };
            // At 200 Mbit/s a million points take seconds, so several
            // bursts fall in the run even at 80% load.
            let mut cfg = defaults();
            cfg.link_rate = 200_000_000 / 8;
            let o = run(&scenario(cfg, load, loss, 13));
            assert_nothing_lost(&o, &format!("100-datagram bursts at {load}"));
            assert_eq!(o.longest_burst, 100);
            assert!(o.datagrams_lost >= 200, "{o:?}");
        }
    }

    #[test]
    fn the_same_bursts_cost_records_with_spreading_and_spare_parity_turned_off() {
        // What the defaults buy: the configured code alone, shards of a
        // block back to back, loses blocks to the same Gilbert–Elliott
        // bursts at low load.
        let mut cfg = defaults();
        cfg.spare_parity_max = cfg.parity_shards;
        cfg.burst_tolerance = 0;
        cfg.warmup_blocks = 0;
        let o = run(&scenario(
            cfg,
            0.05,
            LossModel::gilbert_elliott(20.0, 0.04),
            12,
        ));
        assert_eq!(o.unaccounted, 0);
        assert!(o.lost > 0, "{o:?}");
    }

    #[test]
    fn parity_falls_back_to_the_configured_ratio_when_the_link_is_full() {
        let cfg = defaults();
        let configured = cfg.parity_shards as f64 / cfg.data_shards as f64;
        // Offered 120% of the link: the encoder is backlogged after the
        // first moments (before its first measurement it plans the cap).
        let mut s = scenario(cfg, 1.2, LossModel::None, 14);
        s.records = 5_000_000;
        let o = run(&s);
        assert_eq!(o.delivered, o.records);
        assert!(
            o.overhead() >= configured && o.overhead() < configured * 1.1,
            "parity / data {} vs configured {configured}: {o:?}",
            o.overhead()
        );
        // And at low load the idle link carries several times the parity.
        let o = run(&scenario(defaults(), 0.05, LossModel::None, 14));
        assert!(o.overhead() > 2.0, "{o:?}");
        assert!(o.spare_parity_frames > 0);
    }

    #[test]
    fn the_first_blocks_after_idle_get_full_protection() {
        // 5 s of silence every 20,000 records; the link then loses the first
        // 40 datagrams after each quiet spell (a cold link waking up).
        let loss = LossModel::AfterIdle {
            quiet: NANOS_PER_SEC,
            len: 40,
        };
        let mut s = scenario(defaults(), 0.05, loss, 15);
        s.records = 200_000;
        s.idle_every = 20_000;
        s.idle_for = 5 * NANOS_PER_SEC;
        let o = run(&s);
        assert!(o.datagrams_lost >= 9 * 40, "{o:?}");
        assert_nothing_lost(&o, "loss after idle");
        // Without spreading, spare and warm-up parity the same wake-up
        // loss takes the first block of each transfer.
        s.encoder.spare_parity_max = s.encoder.parity_shards;
        s.encoder.burst_tolerance = 0;
        s.encoder.warmup_blocks = 0;
        let o = run(&s);
        assert!(o.lost > 0, "{o:?}");
    }

    #[test]
    fn latency_stays_within_flush_ms_plus_max_spread_at_every_load() {
        let cfg = defaults();
        let bound = (cfg.flush_after + cfg.max_spread) as f64 / NANOS_PER_MILLI as f64;
        for load in [0.05, 0.5, 0.8] {
            let o = run(&scenario(cfg.clone(), load, LossModel::None, 16));
            assert_eq!(o.delivered, o.records);
            assert!(
                o.latency_max_ms <= bound,
                "at {load}: latency max {} ms above {bound} ms",
                o.latency_max_ms
            );
        }
    }
}

/// Found end to end: a sender draining its spool at shutdown never went
/// idle, because blocks kept reserve spare parity that only goes out in idle
/// moments, which a flush does not wait for.
#[test]
fn a_flushed_encoder_goes_idle_once_its_scheduled_shards_are_out() {
    // Records take about 70% of this link, so blocks plan part of their
    // spare parity and keep the rest as reserve.
    let mut cfg = EncoderConfig::new(1);
    cfg.link_rate = 7_500_000;
    let mut enc = Encoder::new(cfg, signer());
    let s = enc.add_stream("gen", "generator", 0, 1);
    enc.handle_timeout(0);
    let mut buf = vec![0u8; enc.max_frame_len()];
    let mut now = 0;
    for i in 0..30_000 {
        enc.push(now, &point(s, i));
        now += 10_000;
        if enc.poll_timeout().is_some_and(|t| t <= now) {
            enc.handle_timeout(now);
        }
        // One frame per record: a link too slow to send all the reserve.
        enc.poll_frame(now, &mut buf);
    }
    assert!(enc.stats().spare_parity_blocks > 0, "{:?}", enc.stats());
    enc.flush(now);
    enc.heartbeat_now(now);
    send_until_idle(&mut enc, now, &mut buf);
    assert!(enc.is_idle(), "still busy after a flush: {:?}", enc.stats());
    assert!(enc.stats().spare_parity_dropped > 0);
}

/// Polls every frame the encoder has, letting time pass in 0.1 ms steps,
/// until it is idle (at most 1 s).
fn send_until_idle(enc: &mut Encoder, mut now: Nanos, buf: &mut [u8]) {
    for _ in 0..10_000 {
        if enc.is_idle() {
            return;
        }
        now += 100_000;
        if enc.poll_timeout().is_some_and(|t| t <= now) {
            enc.handle_timeout(now);
        }
        while enc.poll_frame(now, buf).is_some() {}
    }
}

/// Regression: a sender behind its input (`set_input_waiting(true)`) sends
/// configured parity only; when its input then ends (`finish`), the last
/// block must not keep that full-load verdict, or the tail of a transfer,
/// alone on an idle link, has the least protection of all.
#[test]
fn the_last_block_after_the_input_ends_gets_spare_parity_though_input_was_waiting() {
    let mut cfg = EncoderConfig::new(1);
    cfg.link_rate = 100_000_000;
    let mut enc = Encoder::new(cfg, signer());
    let s = enc.add_stream("gen", "generator", 0, 1);
    enc.handle_timeout(0);
    let mut buf = vec![0u8; enc.max_frame_len()];
    let now = 0;
    enc.set_input_waiting(true);
    for i in 0..100 {
        enc.push(now, &point(s, i));
    }
    assert_eq!(enc.stats().spare_parity_blocks, 0, "{:?}", enc.stats());
    enc.finish(now);
    send_until_idle(&mut enc, now, &mut buf);
    assert!(enc.is_idle(), "still busy: {:?}", enc.stats());
    assert_eq!(enc.stats().spare_parity_blocks, 1, "{:?}", enc.stats());
    assert!(enc.stats().spare_parity_frames > 0, "{:?}", enc.stats());
}
