//! The decoder behind valid CRCs: a genuine encoder session (records pushed,
//! frames lost, duplicated, replayed) mixed with forged frames whose headers,
//! bundle entries and heartbeats come from the fuzz input and are sealed with
//! a valid CRC, whole blocks FEC-encoded so they decode. Checks: no panic or
//! hang, the delivery promise (`Promise`) on every event, and, when nothing
//! was forged, every record the sender pushed is delivered exactly once or
//! named in a gap. Both ends hold one fixed key, as in production (the
//! decoder trusts authenticated frames); forged frames are tagged with it
//! too, as a forger holding the key or a faulty sender would, so they reach
//! the decoder's state. The datagrams dumped for `decoder_datagrams` are
//! rewritten unauthenticated, the layout that target feeds its decoder.
#![no_main]

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use weir_fuzz::{dump_dir, join_datagrams, tick, Promise};
use weir_protocol::bundle::{self, put_entry};
use weir_protocol::fec::Fec;
use weir_protocol::frame::{FrameHeader, FLAG_CONTROL, FRAME_OVERHEAD};
use weir_protocol::{
    Chunk, Control, Decoder, DecoderConfig, Encoder, EncoderConfig, Event, GapNotice, Heartbeat,
    NoticeCause, Record, RecordBody, StreamInfo, StreamStatus, NANOS_PER_MILLI, NANOS_PER_SEC,
};

const LIVE: u64 = 0x5eed;
const STREAMS: usize = 3;
/// Genuine frames waiting for the link; older ones are lost past this.
const MAX_QUEUED: usize = 4096;
const SHARD: usize = 256;

#[derive(Arbitrary, Debug)]
enum Who {
    Live,
    Other(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Where {
    /// Relative to the genuine encoder's next block.
    Near(i16),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
enum Piece {
    Info {
        id: u8,
        name: u8,
        first_seq: u64,
        epoch: u8,
    },
    Record {
        stream: u8,
        seq: u64,
        resent: bool,
        data: Vec<u8>,
    },
    Gap {
        stream: u8,
        from: u64,
        to: u64,
        damaged: bool,
    },
    First {
        total: u32,
        bytes: Vec<u8>,
    },
    Middle(Vec<u8>),
    Last(Vec<u8>),
    Raw {
        tag: u8,
        bytes: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The sender packs one record into `stream`, `len` bytes long.
    Push {
        stream: u8,
        len: u8,
    },
    Tick {
        ms: u16,
    },
    /// The next genuine frame crosses the link (or is lost, or doubled).
    Send {
        lose: bool,
        twice: bool,
    },
    /// An already sent genuine frame arrives again.
    Replay {
        which: u16,
    },
    /// One frame with any header fields and shard, CRC valid.
    Forge {
        who: Who,
        at: Where,
        index: u16,
        k: u16,
        m: u16,
        control: bool,
        data_len: u32,
        shard: Vec<u8>,
    },
    /// A whole block of bundle entries, FEC-encoded, CRC valid.
    ForgeBlock {
        who: Who,
        at: Where,
        k: u8,
        m: u8,
        pieces: Vec<Piece>,
        lose: u64,
    },
    /// A heartbeat with any fields, CRC valid.
    ForgeHeartbeat {
        who: Who,
        seq: u64,
        at: Where,
        streams: Vec<(u8, u8, Option<u64>, u8)>,
    },
}

fn session(who: &Who) -> u64 {
    match who {
        Who::Live => LIVE,
        Who::Other(n) => 0x0bad_0000 + u64::from(*n % 4),
        Who::Any(x) => *x,
    }
}

fn block(at: &Where, next: u64) -> u64 {
    match at {
        Where::Near(d) => next.saturating_add_signed(i64::from(*d)),
        Where::Any(x) => *x,
    }
}

fn name(n: u8) -> String {
    format!("s{}", n % 4)
}

fn seal(h: FrameHeader, shard: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; shard.len() + FRAME_OVERHEAD];
    let n = h.write(shard, &mut out, &weir_fuzz::fuzz_signer());
    out.truncate(n);
    out
}

fn bundle_data(pieces: &[Piece]) -> Vec<u8> {
    let mut data = Vec::new();
    for p in pieces {
        match p {
            Piece::Info {
                id,
                name: n,
                first_seq,
                epoch,
            } => {
                let info = StreamInfo {
                    id: u32::from(*id % 8),
                    name: name(*n),
                    source_type: "fuzz".into(),
                    first_seq: *first_seq,
                    epoch: u64::from(*epoch % 4),
                };
                let bytes = postcard::to_allocvec(&info).expect("encodes");
                put_entry(&mut data, bundle::TAG_STREAM_INFO, 0, &bytes);
            }
            Piece::Record {
                stream,
                seq,
                resent,
                data: d,
            } => {
                let r = Record {
                    stream: u32::from(*stream % 8),
                    seq: *seq,
                    resent: *resent,
                    body: RecordBody::Bytes(Chunk {
                        data: d.clone(),
                        end: false,
                    }),
                };
                let bytes = postcard::to_allocvec(&r).expect("encodes");
                put_entry(&mut data, bundle::TAG_RECORD, 0, &bytes);
            }
            Piece::Gap {
                stream,
                from,
                to,
                damaged,
            } => {
                let g = GapNotice {
                    stream: u32::from(*stream % 8),
                    from: *from,
                    to: *to,
                    cause: if *damaged {
                        NoticeCause::SpoolDamaged
                    } else {
                        NoticeCause::SpoolOverflow
                    },
                };
                let bytes = postcard::to_allocvec(&g).expect("encodes");
                put_entry(&mut data, bundle::TAG_GAP_NOTICE, 0, &bytes);
            }
            Piece::First { total, bytes } => put_entry(&mut data, bundle::TAG_FIRST, *total, bytes),
            Piece::Middle(b) => put_entry(&mut data, bundle::TAG_MIDDLE, 0, b),
            Piece::Last(b) => put_entry(&mut data, bundle::TAG_LAST, 0, b),
            Piece::Raw { tag, bytes } => put_entry(&mut data, *tag, 0, bytes),
        }
    }
    data
}

/// The frames of one block holding `data`, FEC-encoded; those whose bit is
/// set in `lose` are left out.
fn block_frames(
    fec: &mut Fec,
    session: u64,
    number: u64,
    k: u8,
    m: u8,
    data: &[u8],
    lose: u64,
) -> Vec<Vec<u8>> {
    let k = usize::from(k % 16) + 1;
    let m = usize::from(m % 8);
    let data = &data[..data.len().min(k * SHARD)];
    let shard_len = data.len().div_ceil(k).max(1);
    let mut shards = vec![0u8; (k + m) * shard_len];
    shards[..data.len()].copy_from_slice(data);
    fec.encode(k, m, shard_len, &mut shards);
    (0..k + m)
        .filter(|i| *i >= 64 || lose & (1 << i) == 0)
        .map(|i| {
            let h = FrameHeader {
                flags: 0,
                session,
                block: number,
                index: i as u16,
                k: k as u16,
                m: m as u16,
                shard_len: shard_len as u16,
                data_len: data.len() as u32,
            };
            seal(h, &shards[i * shard_len..(i + 1) * shard_len])
        })
        .collect()
}

struct Link {
    enc: Encoder,
    queued: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
    buf: Vec<u8>,
    next_seq: [u64; STREAMS],
}

impl Link {
    fn poll(&mut self, now: u64) {
        self.enc.handle_timeout(now);
        while let Some(n) = self.enc.poll_frame(now, &mut self.buf) {
            if self.queued.len() == MAX_QUEUED {
                self.queued.pop_front();
            }
            self.queued.push_back(self.buf[..n].to_vec());
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut cfg = EncoderConfig::new(LIVE);
    cfg.shard_size = SHARD;
    cfg.data_shards = 4;
    cfg.parity_shards = 2;
    cfg.interleave = 2;
    cfg.warmup_parity = 2;
    cfg.validate().expect("fuzz encoder config");
    let mut enc = Encoder::new(cfg, weir_fuzz::fuzz_signer());
    for s in 0..STREAMS {
        enc.add_stream(&name(s as u8), "fuzz", 0, 1);
    }
    let buf = vec![0u8; enc.max_frame_len()];
    let mut link = Link {
        enc,
        queued: VecDeque::new(),
        sent: Vec::new(),
        buf,
        next_seq: [0; STREAMS],
    };
    let dec_cfg = DecoderConfig {
        frames_authenticated: true,
        ..DecoderConfig::default()
    };
    let mut dec = Decoder::new(dec_cfg, weir_fuzz::fuzz_verifier());
    let mut fec = Fec::default();
    let mut promise = Promise::default();
    let mut forged = false;
    let mut events: Vec<Event> = Vec::new();
    let mut now = 0u64;
    let transcript = RefCell::new(Vec::new());
    let deliver = |dec: &mut Decoder,
                   now: u64,
                   frame: &[u8],
                   promise: &mut Promise,
                   events: &mut Vec<Event>| {
        // Dumping only records what would cross the link (it does not
        // depend on the decoder), so inputs that crash the decoder dump too.
        if dump_dir().is_some() {
            transcript.borrow_mut().push((now, frame.to_vec()));
            return;
        }
        dec.handle_datagram(now, &mut frame.to_vec());
        tick(dec, now);
        events.extend(promise.drain(dec));
    };
    for op in &ops {
        let next = link.enc.next_block();
        match op {
            Op::Push { stream, len } => {
                if link.enc.is_backlogged() {
                    continue;
                }
                let s = usize::from(*stream) % STREAMS;
                let r = Record {
                    stream: s as u32,
                    seq: link.next_seq[s],
                    resent: false,
                    body: RecordBody::Bytes(Chunk {
                        data: vec![*len; usize::from(*len) * 8],
                        end: false,
                    }),
                };
                link.next_seq[s] += 1;
                link.enc.push(now, &r);
                link.poll(now);
            }
            Op::Tick { ms } => {
                now += u64::from(*ms) * NANOS_PER_MILLI;
                link.poll(now);
                tick(&mut dec, now);
                events.extend(promise.drain(&mut dec));
            }
            Op::Send { lose, twice } => {
                let Some(f) = link.queued.pop_front() else {
                    continue;
                };
                if !lose {
                    deliver(&mut dec, now, &f, &mut promise, &mut events);
                    if *twice {
                        deliver(&mut dec, now, &f, &mut promise, &mut events);
                    }
                }
                link.sent.push(f);
            }
            Op::Replay { which } => {
                if !link.sent.is_empty() {
                    let f = link.sent[usize::from(*which) % link.sent.len()].clone();
                    deliver(&mut dec, now, &f, &mut promise, &mut events);
                }
            }
            Op::Forge {
                who,
                at,
                index,
                k,
                m,
                control,
                data_len,
                shard,
            } => {
                forged = true;
                let shard = if shard.is_empty() {
                    &[0u8][..]
                } else {
                    &shard[..shard.len().min(2048)]
                };
                let h = FrameHeader {
                    flags: if *control { FLAG_CONTROL } else { 0 },
                    session: session(who),
                    block: block(at, next),
                    index: *index,
                    k: *k,
                    m: *m,
                    shard_len: shard.len() as u16,
                    data_len: *data_len,
                };
                deliver(&mut dec, now, &seal(h, shard), &mut promise, &mut events);
            }
            Op::ForgeBlock {
                who,
                at,
                k,
                m,
                pieces,
                lose,
            } => {
                forged = true;
                let data = bundle_data(pieces);
                for f in block_frames(
                    &mut fec,
                    session(who),
                    block(at, next),
                    *k,
                    *m,
                    &data,
                    *lose,
                ) {
                    deliver(&mut dec, now, &f, &mut promise, &mut events);
                }
            }
            Op::ForgeHeartbeat {
                who,
                seq,
                at,
                streams,
            } => {
                forged = true;
                let hb = Heartbeat {
                    session: session(who),
                    uptime_ms: 0,
                    next_block: block(at, next),
                    config_hash: String::new(),
                    counters: Vec::new(),
                    part: 0,
                    parts: 1,
                    streams: streams
                        .iter()
                        .take(16)
                        .map(|(id, n, last_seq, epoch)| StreamStatus {
                            info: StreamInfo {
                                id: u32::from(*id % 8),
                                name: name(*n),
                                source_type: "fuzz".into(),
                                first_seq: 0,
                                epoch: u64::from(*epoch % 4),
                            },
                            last_seq: *last_seq,
                        })
                        .collect(),
                };
                let body = postcard::to_allocvec(&Control::Heartbeat(hb)).expect("encodes");
                let h = FrameHeader {
                    flags: FLAG_CONTROL,
                    session: session(who),
                    block: *seq,
                    index: 0,
                    k: 1,
                    m: 0,
                    shard_len: body.len() as u16,
                    data_len: body.len() as u32,
                };
                deliver(&mut dec, now, &seal(h, &body), &mut promise, &mut events);
            }
        }
    }
    // The sender finishes: everything still queued crosses, then a final
    // heartbeat says where each stream ended, and the receiver waits.
    link.enc.flush(now);
    link.poll(now);
    link.enc.heartbeat_now(now);
    link.poll(now);
    while let Some(f) = link.queued.pop_front() {
        deliver(&mut dec, now, &f, &mut promise, &mut events);
    }
    if let Some(dir) = dump_dir() {
        let unauthenticated: Vec<_> = transcript
            .borrow()
            .iter()
            .map(|(at, d)| (*at, weir_fuzz::without_tag(d)))
            .collect();
        let input = join_datagrams(&unauthenticated);
        let name = format!("{:08x}-{}", weir_fuzz::crc32(&input), input.len());
        std::fs::write(dir.join(name), &input).expect("writing to WEIR_FUZZ_DUMP_DATAGRAMS");
        return;
    }
    for _ in 0..4 {
        now += 10 * NANOS_PER_SEC;
        dec.handle_timeout(now);
        events.extend(promise.drain(&mut dec));
    }
    if forged {
        return;
    }
    // Only the genuine session spoke: each pushed record is delivered
    // exactly once or inside exactly one gap.
    let mut seen: HashMap<(String, u64), u32> = HashMap::new();
    for e in &events {
        match e {
            Event::Record(d) => *seen.entry((d.stream.to_string(), d.seq)).or_default() += 1,
            Event::Gap(g) => {
                for seq in g.from..=g.to.min(g.from + 100_000) {
                    *seen.entry((g.stream.to_string(), seq)).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    for s in 0..STREAMS {
        for seq in 0..link.next_seq[s] {
            let n = seen.get(&(name(s as u8), seq)).copied().unwrap_or(0);
            assert_eq!(
                n,
                1,
                "record {seq} of stream {} accounted {n} times",
                name(s as u8)
            );
        }
    }
});
