//! Inputs the `decoder_frames` fuzz target found (fuzz/regressions/, see
//! docs/fuzzing.md), replayed through the public API: one or two CRC-valid
//! frames each, that overflow the decoder's arithmetic or make it spin.
//!
//! The fix belongs in `protocol/src/decoder.rs` (issue 7, part 3: checked
//! arithmetic and a bound on how far one frame may move the window), which
//! has landed. Four tests fail on the decoder of main at 62f8d11 in any
//! build; the other two fail there only with overflow checks on
//! (`overflow-checks = true`, now set in the release profile). Frames here
//! carry a valid tag (a forger holding the key, or a faulty sender) and the
//! decoder trusts authenticated frames, so one or two frames reach the
//! arithmetic they target.

use std::sync::mpsc::{self, RecvTimeoutError};

fn key() -> weir_protocol::Key {
    weir_protocol::Key::from_bytes(&[0x33; weir_protocol::auth::KEY_LEN]).expect("32 bytes")
}

fn signer() -> weir_protocol::Signer {
    weir_protocol::Signer::Key(key())
}
use std::time::Duration;

use weir_protocol::frame::{FrameHeader, FLAG_CONTROL, FRAME_OVERHEAD};
use weir_protocol::{
    Chunk, Control, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, Heartbeat, Record,
    RecordBody, StreamInfo, StreamStatus, NANOS_PER_SEC,
};

const SESSION: u64 = 0x5eed;

/// Real time the decoder gets for a handful of frames; it needs
/// microseconds, so running out means it spins.
const LIMIT: Duration = Duration::from_secs(10);

fn seal(header: FrameHeader, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; body.len() + FRAME_OVERHEAD];
    let n = header.write(body, &mut out, &signer());
    out.truncate(n);
    out
}

fn heartbeat(next_block: u64, streams: Vec<StreamStatus>) -> Vec<u8> {
    let body = postcard::to_allocvec(&Control::Heartbeat(Heartbeat {
        session: SESSION,
        uptime_ms: 0,
        next_block,
        config_hash: String::new(),
        counters: Vec::new(),
        part: 0,
        parts: 1,
        streams,
    }))
    .expect("heartbeat encodes");
    let header = FrameHeader {
        flags: FLAG_CONTROL,
        session: SESSION,
        block: 0,
        index: 0,
        k: 1,
        m: 0,
        shard_len: body.len() as u16,
        data_len: body.len() as u32,
    };
    seal(header, &body)
}

/// The frames of a genuine session that sent one record.
fn genuine_frames() -> Vec<Vec<u8>> {
    let mut enc = Encoder::new(EncoderConfig::new(SESSION), signer());
    let stream = enc.add_stream("s", "test", 0, 1);
    let body = RecordBody::Bytes(Chunk {
        data: vec![1; 100],
        end: false,
    });
    enc.push(
        0,
        &Record {
            stream,
            seq: 0,
            resent: false,
            body,
        },
    );
    enc.flush(0);
    let mut buf = vec![0; enc.max_frame_len()];
    std::iter::from_fn(|| enc.poll_frame(0, &mut buf).map(|n| buf[..n].to_vec())).collect()
}

/// Feeds `datagrams`, runs the timer 10 s later, and returns the events;
/// fails if the decoder panics or has not returned within `LIMIT`.
fn decode(datagrams: Vec<Vec<u8>>) -> Vec<Event> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let cfg = DecoderConfig {
            frames_authenticated: true,
            ..DecoderConfig::default()
        };
        let mut dec = Decoder::new(cfg, weir_protocol::Verifier::new(vec![key()]).expect("key"));
        for d in &datagrams {
            dec.handle_datagram(0, &mut d.to_vec());
        }
        dec.handle_timeout(10 * NANOS_PER_SEC);
        let events: Vec<Event> = std::iter::from_fn(|| dec.poll_event()).collect();
        assert_eq!(dec.stats().datagrams, datagrams.len() as u64);
        let _ = tx.send(events);
    });
    match rx.recv_timeout(LIMIT) {
        Ok(events) => {
            for e in &events {
                if let Event::Gap(g) = e {
                    assert!(g.from <= g.to, "gap with from > to: {g:?}");
                    assert!(g.records() > 0, "a gap names zero records: {g:?}");
                }
            }
            events
        }
        Err(RecvTimeoutError::Timeout) => {
            panic!("the decoder has not returned after {LIMIT:?}: it spins")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("the decoder panicked (message above)"),
    }
}

/// fuzz/regressions/decoder_frames-first-frame-block-u64-max-overflows-window-check
/// and decoder_frames-block-u64-max-then-another-session-spins: the first
/// frame is numbered `u64::MAX`. With overflow checks `session.base +
/// max_in_flight` in `handle_shard` panics; without, the session switch to
/// the genuine sender gives that session's blocks up through `u64::MAX`,
/// where `through + 1` in `give_up_through` wraps to 0 and the loop never
/// ends (issue 7's reproduction of the hang).
#[test]
fn a_frame_numbered_u64_max_then_another_session_is_handled() {
    let header = FrameHeader {
        flags: 0,
        session: SESSION + 1,
        block: u64::MAX,
        index: 0,
        k: 1,
        m: 0,
        shard_len: 1,
        data_len: 0,
    };
    let mut frames = vec![seal(header, &[0])];
    frames.extend(genuine_frames());
    let events = decode(frames);
    assert!(
        events.iter().any(|e| matches!(e, Event::Record(_))),
        "the genuine sender's record is delivered"
    );
}

/// A stream accounted up to `u64::MAX` (found by `decoder_frames` built
/// without overflow checks, input
/// decoder_frames-stream-at-u64-max-reopens-from-zero): the cursor's next
/// expected sequence `last + 1` in `prepare_cursor` wraps to 0, so records
/// from 0 of the same stream and epoch are delivered again (a panic with
/// overflow checks).
#[test]
fn a_stream_accounted_up_to_u64_max_does_not_start_again_from_zero() {
    use weir_protocol::bundle::{put_entry, TAG_RECORD, TAG_STREAM_INFO};
    let info = StreamInfo {
        id: 0,
        name: "s".into(),
        source_type: "test".into(),
        first_seq: 0,
        epoch: 1,
    };
    let mut data = Vec::new();
    let bytes = postcard::to_allocvec(&info).expect("encodes");
    put_entry(&mut data, TAG_STREAM_INFO, 0, &bytes);
    for seq in [u64::MAX, 5] {
        let record = Record {
            stream: 0,
            seq,
            resent: false,
            body: RecordBody::Bytes(Chunk {
                data: vec![1],
                end: false,
            }),
        };
        let bytes = postcard::to_allocvec(&record).expect("encodes");
        put_entry(&mut data, TAG_RECORD, 0, &bytes);
    }
    let header = FrameHeader {
        flags: 0,
        session: SESSION,
        block: 0,
        index: 0,
        k: 1,
        m: 0,
        shard_len: data.len() as u16,
        data_len: data.len() as u32,
    };
    let events = decode(vec![seal(header, &data)]);
    let delivered: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Record(d) => Some(d.seq),
            _ => None,
        })
        .collect();
    // Sequence numbers above MAX_SEQ (2^62) are refused, so the cursor
    // never reaches u64::MAX and nothing wraps: record 5 is delivered once,
    // after the gap 0..=4 it leaves.
    assert_eq!(
        delivered,
        vec![5],
        "u64::MAX is refused, 5 is delivered once"
    );
}

/// fuzz/regressions/decoder_datagrams-decoded-block-u64-max-overflows-base-increment:
/// a live session receives a decodable block numbered `u64::MAX`; once the
/// timer has given the blocks below it up, `deliver_ready` increments
/// `base` past `u64::MAX` (a panic with overflow checks on; without, the
/// window wraps to block 0).
#[test]
fn a_decodable_block_numbered_u64_max_neither_panics_nor_hangs_the_decoder() {
    let mut frames = genuine_frames();
    let header = FrameHeader {
        flags: 0,
        session: SESSION,
        block: u64::MAX,
        index: 0,
        k: 1,
        m: 0,
        shard_len: 1,
        data_len: 0,
    };
    frames.push(seal(header, &[0]));
    decode(frames);
}

/// fuzz/regressions/decoder_frames-heartbeat-next-block-u64-max-overflows-base-plus-one:
/// a session's first frame is a heartbeat with `next_block = u64::MAX`; the
/// timer gives blocks up to it, then `base + 1` in `handle_timeout`
/// overflows (a panic with overflow checks on; it wraps harmlessly without).
#[test]
fn a_heartbeat_announcing_block_u64_max_does_not_hang_the_decoder() {
    decode(vec![heartbeat(u64::MAX, Vec::new())]);
}

/// fuzz/regressions/decoder_frames-heartbeat-last-seq-u64-max-overflows-gap-records:
/// a heartbeat says a stream that starts at 0 has sent up to `u64::MAX`;
/// the gap 0..=u64::MAX overflows `Gap::records` (a panic with overflow
/// checks; without, the gap counts 0 records in `gap_records`).
#[test]
fn a_heartbeat_claiming_every_sequence_number_never_names_a_gap_of_zero_records() {
    let status = StreamStatus {
        info: StreamInfo {
            id: 0,
            name: "s".into(),
            source_type: "test".into(),
            first_seq: 0,
            epoch: 0,
        },
        last_seq: Some(u64::MAX),
    };
    decode(vec![heartbeat(283, vec![status])]);
}

/// fuzz/regressions/decoder_frames-heartbeat-far-ahead-next-block-spins-in-handle-timeout:
/// one heartbeat with the live session's id and a far-ahead `next_block`
/// makes `handle_timeout` give the missing blocks up one per loop turn, up
/// to that number: 4.3e9 turns in the fuzzer's input (over 60 s), 1e12 here.
/// (fuzz/regressions/decoder_datagrams-two-heartbeats-far-apart-spin-in-handle-timeout
/// is the same with two heartbeats and no data frame.)
#[test]
fn a_heartbeat_far_ahead_of_the_live_session_does_not_hang_the_decoder() {
    let mut frames = genuine_frames();
    frames.push(heartbeat(1_000_000_000_000, Vec::new()));
    let events = decode(frames);
    assert!(
        events.iter().any(|e| matches!(e, Event::Record(_))),
        "the genuine record is delivered"
    );
}

/// fuzz/artifacts/decoder_frames/crash-ca65e4d46af0d30426727c6cc0bffcd77d821296
/// (and six more like it), with nothing forged: one record that ends
/// exactly where a block fills up was never claimed by a heartbeat
/// (`last_seq` stayed `None`), because the encoder sealed the block inside
/// `pack` before noting the record complete, so the note waited for a
/// later seal that never came. With the block holding its first piece lost,
/// the record was neither delivered nor named in a gap.
#[test]
fn a_record_that_fills_its_last_block_exactly_is_claimed_by_the_heartbeat_and_named_in_a_gap_when_lost(
) {
    let mut cfg = EncoderConfig::new(SESSION);
    cfg.shard_size = 256;
    cfg.data_shards = 4;
    cfg.parity_shards = 2;
    cfg.interleave = 2;
    cfg.warmup_parity = 2;
    cfg.validate().expect("test encoder config");
    let mut enc = Encoder::new(cfg, signer());
    let stream = enc.add_stream("s0", "test", 0, 1);
    // 2016 bytes: with the stream info and entry headers, two blocks of
    // 4 x 256 bytes exactly (the fuzz input's Push { len: 252 }).
    enc.push(
        0,
        &Record {
            stream,
            seq: 0,
            resent: false,
            body: RecordBody::Bytes(Chunk {
                data: vec![252; 2016],
                end: false,
            }),
        },
    );
    // As the fuzz target's finish: the blocks go out, then a heartbeat.
    let mut buf = vec![0; enc.max_frame_len()];
    let mut frames: Vec<Vec<u8>> = Vec::new();
    enc.flush(0);
    enc.handle_timeout(0);
    frames.extend(std::iter::from_fn(|| {
        enc.poll_frame(0, &mut buf).map(|n| buf[..n].to_vec())
    }));
    enc.heartbeat_now(0);
    enc.handle_timeout(0);
    frames.extend(std::iter::from_fn(|| {
        enc.poll_frame(0, &mut buf).map(|n| buf[..n].to_vec())
    }));
    let mut verifier = weir_protocol::Verifier::new(vec![key()]).expect("key");
    // Block 0 (the record's first piece) is lost entirely; the rest arrives.
    let arriving: Vec<Vec<u8>> = frames
        .into_iter()
        .filter(|f| {
            let (h, _) =
                FrameHeader::parse(&mut f.clone(), &mut verifier).expect("genuine frame parses");
            h.flags & FLAG_CONTROL != 0 || h.block != 0
        })
        .collect();
    let events = decode(arriving);
    let claimed = events.iter().any(|e| {
        matches!(e, Event::Heartbeat(hb)
            if hb.streams.iter().any(|s| s.info.name == "s0" && s.last_seq == Some(0)))
    });
    assert!(claimed, "no heartbeat claims record 0: {events:?}");
    let accounted = events
        .iter()
        .filter(|e| match e {
            Event::Record(d) => &*d.stream == "s0" && d.seq == 0,
            Event::Gap(g) => &*g.stream == "s0" && g.from == 0,
            _ => false,
        })
        .count();
    assert_eq!(
        accounted, 1,
        "record 0 is neither delivered nor named in a gap exactly once: {events:?}"
    );
}

/// fuzz/artifacts/decoder_frames/crash-d6e85f41992c2eb1a0aee0032acade80e4c10b45
/// (and four more like it), with nothing forged: `Encoder::poll_frame`
/// returned None on the call after a group's last frame although the next
/// group, or a heartbeat queued behind it, was ready. A caller that polls
/// until None (the fuzz target's finish) left the last block and the final
/// heartbeat unsent, so no heartbeat claimed the records of a lost block.
#[test]
fn polling_the_encoder_until_none_after_a_flush_sends_every_block_and_the_heartbeat() {
    let mut cfg = EncoderConfig::new(SESSION);
    cfg.shard_size = 256;
    cfg.data_shards = 4;
    cfg.parity_shards = 2;
    cfg.interleave = 2;
    cfg.warmup_parity = 2;
    cfg.validate().expect("test encoder config");
    let mut enc = Encoder::new(cfg, signer());
    let s0 = enc.add_stream("s0", "test", 0, 1);
    let s1 = enc.add_stream("s1", "test", 0, 1);
    let mut buf = vec![0; enc.max_frame_len()];
    let mut frames: Vec<Vec<u8>> = Vec::new();
    // The fuzz input's Push { stream: 10, len: 251 }, Push { stream: 138,
    // len: 255 }: five blocks, the last one alone in its group.
    for (stream, len) in [(s1, 251usize), (s0, 255)] {
        enc.push(
            0,
            &Record {
                stream,
                seq: 0,
                resent: false,
                body: RecordBody::Bytes(Chunk {
                    data: vec![len as u8; len * 8],
                    end: false,
                }),
            },
        );
        enc.handle_timeout(0);
        frames.extend(std::iter::from_fn(|| {
            enc.poll_frame(0, &mut buf).map(|n| buf[..n].to_vec())
        }));
    }
    enc.flush(0);
    enc.handle_timeout(0);
    frames.extend(std::iter::from_fn(|| {
        enc.poll_frame(0, &mut buf).map(|n| buf[..n].to_vec())
    }));
    enc.heartbeat_now(0);
    enc.handle_timeout(0);
    frames.extend(std::iter::from_fn(|| {
        enc.poll_frame(0, &mut buf).map(|n| buf[..n].to_vec())
    }));
    assert!(
        enc.is_idle(),
        "polling until None left frames unsent after a flush"
    );
    let mut verifier = weir_protocol::Verifier::new(vec![key()]).expect("key");
    // Block 0 (s1's first piece) is lost; everything else arrives.
    let arriving: Vec<Vec<u8>> = frames
        .into_iter()
        .filter(|f| {
            let (h, _) =
                FrameHeader::parse(&mut f.clone(), &mut verifier).expect("genuine frame parses");
            h.flags & FLAG_CONTROL != 0 || h.block != 0
        })
        .collect();
    let events = decode(arriving);
    for (stream, what) in [("s0", "delivered"), ("s1", "named in a gap")] {
        let accounted = events
            .iter()
            .filter(|e| match e {
                Event::Record(d) => &*d.stream == stream && d.seq == 0,
                Event::Gap(g) => &*g.stream == stream && g.from == 0,
                _ => false,
            })
            .count();
        assert_eq!(
            accounted, 1,
            "record 0 of {stream} is not {what} exactly once: {events:?}"
        );
    }
}
