//! The AES-256-GCM nonce of a frame is its place in its session,
//! (control, block, index) (docs/wire-format.md, "Why a nonce never
//! repeats"). GCM is broken by one nonce reused for different bytes, so
//! these seeded runs drive an encoder through everything that sends frames
//! (records large and small, resent records, gap notices, flush-timer
//! seals, flushes, finishes, heartbeats on the timer and on demand, input
//! waiting, spare and reserve parity, a slow and a fast link) and record
//! the place of every frame it emits: none may appear twice.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use weir_protocol::frame::FrameHeader;
use weir_protocol::{
    Chunk, Encoder, EncoderConfig, FrameId, GapNotice, Key, Nanos, NoticeCause, Point, Record,
    RecordBody, Signer, Value, Verifier, NANOS_PER_MILLI, NANOS_PER_SEC,
};

fn key() -> Key {
    Key::from_bytes(&[0x0e; weir_protocol::auth::KEY_LEN]).expect("32 bytes")
}

fn record(stream: u32, seq: u64, len: usize, resent: bool) -> Record {
    let body = if len == 0 {
        RecordBody::Point(Point {
            tag: format!("t{}", seq % 7),
            ts_ns: seq as i64,
            value: Value::F64(seq as f64),
            quality: 0,
            status: None,
        })
    } else {
        RecordBody::Bytes(Chunk {
            data: vec![(seq % 251) as u8; len],
            end: false,
        })
    };
    Record {
        stream,
        seq,
        resent,
        body,
    }
}

/// Every frame's (session, control, block, index), with the number of
/// frames seen, from one seeded run of `steps` random operations.
fn run(seed: u64, session: u64, link_rate: u64, steps: usize) -> (HashMap<FrameId, usize>, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut cfg = EncoderConfig::new(session);
    cfg.link_rate = link_rate;
    cfg.data_shards = rng.gen_range(4..=64);
    cfg.parity_shards = rng.gen_range(0..=16);
    cfg.interleave = rng.gen_range(1..=24);
    cfg.warmup_blocks = rng.gen_range(0..=4);
    cfg.validate().expect("valid random config");
    let mut enc = Encoder::new(cfg, Signer::Key(key()));
    let streams = [
        enc.add_stream("a", "generator", 0, 1),
        enc.add_stream("b", "generator", 100, 1),
    ];
    let mut next_seq = [0u64, 100];
    let mut verifier = Verifier::new(vec![key()]).expect("one key");
    let mut buf = vec![0u8; enc.max_frame_len()];
    let mut seen: HashMap<FrameId, usize> = HashMap::new();
    let mut frames = 0usize;
    let mut now: Nanos = 0;
    let mut poll = |enc: &mut Encoder, now: Nanos, seen: &mut HashMap<FrameId, usize>| {
        while let Some(n) = enc.poll_frame(now, &mut buf) {
            let (h, _) = FrameHeader::parse(&mut buf[..n], &mut verifier).expect("own frame");
            assert_eq!(h.session, session);
            let id = h.frame_id();
            let earlier = seen.insert(id, frames);
            assert!(
                earlier.is_none(),
                "seed {seed:#x}: frame {frames} reuses the nonce of frame {earlier:?}: {id:?}"
            );
            frames += 1;
        }
    };
    for _ in 0..steps {
        now += rng.gen_range(0..3 * NANOS_PER_MILLI);
        let s = rng.gen_range(0..2);
        match rng.gen_range(0..100) {
            0..=59 => {
                let len = if rng.gen_bool(0.05) {
                    rng.gen_range(1..20_000)
                } else {
                    0
                };
                if !enc.is_backlogged() {
                    enc.push(now, &record(streams[s], next_seq[s], len, false));
                    next_seq[s] += 1;
                }
            }
            60..=64 => {
                // A resend: old sequence numbers, new blocks.
                let seq = rng.gen_range(0..next_seq[s].max(1));
                enc.push(now, &record(streams[s], seq, 0, true));
            }
            65..=66 => {
                let skip = rng.gen_range(1..5);
                let notice = GapNotice {
                    stream: streams[s],
                    from: next_seq[s],
                    to: next_seq[s] + skip - 1,
                    cause: NoticeCause::SpoolOverflow,
                };
                enc.push_gap_notice(now, &notice);
                next_seq[s] += skip;
            }
            67..=69 => enc.flush(now),
            70..=71 => enc.finish(now),
            72..=74 => enc.heartbeat_now(now),
            75..=77 => enc.set_input_waiting(rng.gen_bool(0.5)),
            78..=79 => now += rng.gen_range(0..2 * NANOS_PER_SEC),
            _ => {}
        }
        if enc.poll_timeout().is_some_and(|t| t <= now) {
            enc.handle_timeout(now);
        }
        if rng.gen_bool(0.7) {
            poll(&mut enc, now, &mut seen);
        }
    }
    // Drain: everything sealed goes out, reserve included.
    enc.flush(now);
    for _ in 0..100 {
        now += 10 * NANOS_PER_MILLI;
        enc.handle_timeout(now);
        poll(&mut enc, now, &mut seen);
    }
    (seen, frames)
}

#[test]
fn no_frame_place_is_ever_sent_twice_in_a_session_through_every_encoder_path() {
    let mut total = 0;
    let mut controls = 0;
    for seed in 0..12u64 {
        // Slow links leave idle capacity (spare and reserve parity); fast
        // ones are driven past full load.
        let rate = if seed % 2 == 0 {
            2_000_000
        } else {
            125_000_000
        };
        let (seen, frames) = run(0x6e0c_e000 + seed, 0x1000 + seed, rate, 4_000);
        assert_eq!(seen.len(), frames);
        total += frames;
        controls += seen.keys().filter(|id| id.control).count();
    }
    assert!(total > 50_000, "the runs sent enough frames: {total}");
    assert!(controls > 100, "and enough control frames: {controls}");
}

/// Two sessions through one key never share a subkey, so the same place
/// in both (block 0, index 0 every session starts with) is two nonces under
/// two keys: the ciphertexts of the same shard differ.
#[test]
fn the_same_place_in_two_sessions_is_sealed_under_different_subkeys() {
    let sealed = |session: u64| {
        let mut enc = Encoder::new(EncoderConfig::new(session), Signer::Key(key()));
        let s = enc.add_stream("a", "generator", 0, 1);
        enc.push(0, &record(s, 0, 0, false));
        enc.flush(0);
        let mut buf = vec![0u8; enc.max_frame_len()];
        let mut first_data = None;
        while let Some(n) = enc.poll_frame(0, &mut buf) {
            if buf[3] & weir_protocol::frame::FLAG_CONTROL == 0 && first_data.is_none() {
                first_data = Some(buf[weir_protocol::frame::HEADER_LEN..n].to_vec());
            }
        }
        first_data.expect("a data frame")
    };
    assert_ne!(sealed(1), sealed(2));
}
