//! The sender's state machine: records in, frames out.
//!
//! `push` packs records into the open block; a block is sealed when full or
//! when its oldest record has waited `flush_after`. A sealed block gets its
//! parity when it goes in flight (at most `interleave` blocks at once), and
//! each of its shards a due time: the k + m shards are spread evenly over the
//! block's *spread*, data first, so that a burst of `burst_tolerance`
//! consecutive datagrams costs the block at most its parity. `poll_frame`
//! emits the in-flight shard with the earliest due time (before it is due
//! only while sealed blocks wait, i.e. under backlog, where the order alone
//! interleaves the blocks). Parity beyond the configured ratio ("spare
//! parity") is added only where the link's measured idle capacity pays for
//! it. Heartbeats jump the queue. The caller paces `poll_frame` to the link
//! rate. See docs/wire-format.md, "Spreading and spare parity".

use std::collections::VecDeque;

use crate::auth::Signer;
use crate::bundle::{
    self, entry_len, put_entry, Pieces, MAX_ENTRY_HEADER, TAG_FIRST, TAG_GAP_NOTICE, TAG_LAST,
    TAG_MIDDLE, TAG_RECORD, TAG_STREAM_INFO,
};
use crate::config::EncoderConfig;
use crate::control::{Control, Heartbeat, StreamStatus};
use crate::fec::Fec;
use crate::frame::{FrameHeader, FLAG_CONTROL, FRAME_OVERHEAD, MAX_SHARDS};
use crate::record::{GapNotice, Record, StreamId, StreamInfo};
use crate::Nanos;

/// Smallest useful first fragment; below this the block is sealed instead.
const MIN_FRAGMENT: usize = 64;
/// Heartbeat counters beyond this many are not sent (a frame must fit).
const MAX_HEARTBEAT_COUNTERS: usize = 32;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EncoderStats {
    pub records: u64,
    pub record_bytes: u64,
    pub blocks: u64,
    /// Blocks sealed by the flush timer before they were full.
    pub partial_blocks: u64,
    pub warmup_blocks: u64,
    /// Blocks given parity beyond the configured ratio from the link's idle
    /// capacity.
    pub spare_parity_blocks: u64,
    /// Parity frames beyond the configured ratio (and beyond warm-up
    /// parity): what spare capacity carried.
    pub spare_parity_frames: u64,
    /// Bytes of data shards and of parity shards written (shard payloads,
    /// without frame overhead): parity_bytes / data_bytes is the overhead.
    pub data_bytes: u64,
    pub parity_bytes: u64,
    /// The widest spread given to a block, in nanoseconds.
    pub max_spread: u64,
    /// Spare parity frames computed but not sent: the link got busy before
    /// they were due, so data went first.
    pub spare_parity_dropped: u64,
    pub data_frames: u64,
    pub parity_frames: u64,
    pub control_frames: u64,
    /// Heartbeat parts too large for one datagram even without counters.
    pub heartbeats_oversized: u64,
    pub wire_bytes: u64,
}

struct StreamState {
    info: StreamInfo,
    last_pushed: Option<u64>,
    last_sealed: Option<u64>,
}

struct SealedBlock {
    number: u64,
    k: usize,
    /// Parity shards: decided and computed when the block goes in flight.
    m: usize,
    shard_len: usize,
    data_len: usize,
    /// k * shard_len data bytes, then m parity shards once in flight.
    shards: Vec<u8>,
}

/// A block whose shards are being sent, each at its due time.
struct InFlight {
    block: SealedBlock,
    /// Parity shards below this index count as configured parity; the
    /// rest were added from spare capacity.
    configured: usize,
    /// Shards below this index are sent on their schedule; the rest are
    /// reserve spare parity, sent only where the link would otherwise idle.
    scheduled: usize,
    /// Shards from this index on are not sent: k + m, or `scheduled` once
    /// the reserve is given up (flush, or too many blocks in flight).
    end: usize,
    /// Next shard index to send.
    next: usize,
    /// Due time of shard 0 and the spacing of the next ones.
    t0: Nanos,
    step: Nanos,
    /// When (in frames polled) this block last sent a shard: among blocks
    /// with a shard due, the least recently served goes next, so blocks in
    /// flight take turns whatever their spread.
    served: u64,
    last_sent: Option<Nanos>,
    deadline: Nanos,
}

impl InFlight {
    /// When the next shard may go: on its schedule, but never sooner than
    /// one step after the previous one, so a block that fell behind (the
    /// link was busy) keeps its spacing instead of catching up in a run of
    /// its own shards that one burst could take; and from its deadline
    /// (`t0 + max_spread`) on, four times as fast, which bounds the latency.
    fn due(&self) -> Nanos {
        let planned = self
            .t0
            .saturating_add(self.step.saturating_mul(self.next as u64));
        let Some(last) = self.last_sent else {
            return planned.min(self.deadline);
        };
        let spaced = planned.max(last.saturating_add(self.step));
        // Past the deadline the block catches up, but at no more than four
        // shards per step: a stalled sender must not turn a block's last
        // shards into one run that a single burst takes.
        let catch_up = self.deadline.max(last.saturating_add(self.step / 4));
        spaced.min(catch_up)
    }

    fn done(&self) -> bool {
        self.next >= self.end
    }

    /// Data or configured parity still to send (spare parity does not
    /// count: it is sent only where the link is otherwise idle).
    fn owes(&self) -> bool {
        self.next < self.block.k + self.configured
    }

    /// 0: data or configured parity; 1: planned spare parity; 2: reserve.
    fn class(&self) -> u8 {
        if self.owes() {
            0
        } else if self.next < self.scheduled {
            1
        } else {
            2
        }
    }
}

/// What `poll_frame` chooses a block by, kept beside each block in flight
/// (`Encoder::keys`, same index) so the choice, made for every frame, scans
/// a few bytes per block instead of the blocks themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    /// The order blocks are served in, smallest first: class (bits 62-63),
    /// then blocks never served (bit 61 clear) by number, then the others
    /// by when they were last served.
    rank: u64,
    /// When its next shard is due.
    due: Nanos,
}

impl Key {
    fn of(f: &InFlight) -> Key {
        let order = if f.served == 0 {
            f.block.number
        } else {
            (1 << 61) | f.served
        };
        debug_assert!(f.block.number < 1 << 61 && f.served < 1 << 61);
        Key {
            rank: (u64::from(f.class()) << 62) | order,
            due: f.due(),
        }
    }

    fn class(self) -> u8 {
        (self.rank >> 62) as u8
    }
}

/// Bytes a block's buffer grows to at most: its data and the most parity
/// any block gets, so filling it and adding parity never reallocates.
fn block_buffer_len(cfg: &EncoderConfig) -> usize {
    let parity = cfg
        .parity_shards
        .max(cfg.warmup_parity)
        .max(cfg.spare_parity_max);
    (cfg.data_shards + parity).min(MAX_SHARDS) * cfg.shard_size
}

/// The index of the smallest-ranked key that `eligible` admits.
fn pick(keys: &[Key], eligible: impl Fn(Key) -> bool) -> Option<usize> {
    let mut best: Option<(u64, usize)> = None;
    for (i, k) in keys.iter().enumerate() {
        if eligible(*k) && best.is_none_or(|(rank, _)| k.rank < rank) {
            best = Some((k.rank, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Blocks in flight with only spare parity left are kept at most this many
/// times `interleave`; past it the oldest one's spare parity is dropped.
const SPARE_ONLY_FACTOR: usize = 2;

/// Share of the link taken by data and configured parity (in the last
/// measuring window) from which the encoder treats the link as full: no
/// spare parity, configured parity only.
const FULL_LOAD: f64 = 0.95;

/// Share of the measured idle capacity reserve spare parity may use, and
/// the most reserve frames sent back to back.
const RESERVE_SHARE: f64 = 0.5;
const RESERVE_BURST: f64 = 4.0;

/// Length of the windows in which the link's use is measured.
const MEASURE_WINDOW: Nanos = 100 * crate::NANOS_PER_MILLI;

/// Share of the measured idle capacity that spare parity may plan on (the
/// reserve fills the rest where the link is idle). Planning more makes the
/// scheduled shards demand nearly the whole link, so blocks drift behind
/// their schedule; 0.6 lost nothing in the 10-million-record runs of the
/// tolerance table at 80% load, where 0.9 lost a block at 200 Mbit/s.
const SPARE_SHARE: f64 = 0.6;

/// What the link carried in the last complete measuring window.
#[derive(Default, Clone, Copy)]
struct LinkUse {
    /// Frames per second, all kinds.
    frames: f64,
    /// Data frames per second.
    data: f64,
    /// Share of the link's capacity taken by frames other than spare parity.
    busy: f64,
}

#[derive(Default)]
struct Meter {
    start: Nanos,
    frames: u64,
    data: u64,
    /// Wire bytes of frames other than spare parity.
    busy_bytes: u64,
    last: Option<LinkUse>,
}

pub struct Encoder {
    cfg: EncoderConfig,
    /// Tags every frame written (or marks it unauthenticated).
    signer: Signer,
    fec: Fec,
    streams: Vec<StreamState>,
    /// Data bytes of the block being filled.
    open: Vec<u8>,
    open_streams: Vec<StreamId>,
    open_since: Option<Nanos>,
    /// (stream, seq) of records whose last byte is in the open block.
    open_completed: Vec<(StreamId, u64)>,
    next_block: u64,
    sealed: VecDeque<SealedBlock>,
    in_flight: Vec<InFlight>,
    /// `Key::of` each block in flight, same order as `in_flight`.
    keys: Vec<Key>,
    meter: Meter,
    /// Control frames, each sent once every block numbered below its
    /// `after_block` has been sent, so a heartbeat never overtakes the
    /// blocks it describes.
    control: VecDeque<(u64, Vec<u8>)>,
    /// Set by `flush`: send what is sealed and in flight without waiting
    /// for due times.
    flushing: bool,
    next_control_seq: u64,
    /// Frames polled: the clock of `InFlight::served`.
    polled: u64,
    /// Set by the driver while records wait upstream (a spool backlog):
    /// the sender, not the link, is the bottleneck, so there is no idle
    /// capacity to spend on spare parity.
    input_waiting: bool,
    /// Token bucket of reserve spare parity frames (`reserve_allowed`).
    reserve_tokens: f64,
    reserve_at: Nanos,
    next_heartbeat: Option<Nanos>,
    start: Option<Nanos>,
    last_data_frame: Option<Nanos>,
    warmup_left: usize,
    config_hash: String,
    counters: Vec<(String, u64)>,
    scratch: Vec<u8>,
    /// Block buffers of sent blocks, reused so the hot path does not fault
    /// in fresh pages for every block; at most `interleave` are kept.
    spare_buffers: Vec<Vec<u8>>,
    stats: EncoderStats,
}

impl Encoder {
    /// Panics if the configuration is invalid: validate it first, at load.
    /// `signer` tags every frame; `Signer::Disabled` only where the
    /// operator turned authentication off.
    pub fn new(cfg: EncoderConfig, signer: Signer) -> Self {
        cfg.validate()
            .expect("encoder configuration validated by the caller");
        Encoder {
            open: Vec::with_capacity(block_buffer_len(&cfg)),
            cfg,
            signer,
            fec: Fec::default(),
            streams: Vec::new(),
            open_streams: Vec::new(),
            open_since: None,
            open_completed: Vec::new(),
            next_block: 0,
            sealed: VecDeque::new(),
            in_flight: Vec::new(),
            keys: Vec::new(),
            meter: Meter::default(),
            control: VecDeque::new(),
            flushing: false,
            next_control_seq: 0,
            polled: 0,
            input_waiting: false,
            reserve_tokens: RESERVE_BURST,
            reserve_at: 0,
            next_heartbeat: None,
            start: None,
            last_data_frame: None,
            warmup_left: 0,
            config_hash: String::new(),
            counters: Vec::new(),
            scratch: Vec::new(),
            spare_buffers: Vec::new(),
            stats: EncoderStats::default(),
        }
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &EncoderStats {
        &self.stats
    }

    /// Largest datagram `poll_frame` writes.
    pub fn max_frame_len(&self) -> usize {
        self.cfg.shard_size + FRAME_OVERHEAD
    }

    /// Registers a stream for this session; its records must then be pushed
    /// with consecutive sequence numbers starting at `first_seq`.
    pub fn add_stream(
        &mut self,
        name: &str,
        source_type: &str,
        first_seq: u64,
        epoch: u64,
    ) -> StreamId {
        let id = self.streams.len() as StreamId;
        let info = StreamInfo {
            id,
            name: name.to_string(),
            source_type: source_type.to_string(),
            first_seq,
            epoch,
        };
        self.streams.push(StreamState {
            info,
            last_pushed: None,
            last_sealed: None,
        });
        id
    }

    pub fn streams(&self) -> impl Iterator<Item = &StreamInfo> {
        self.streams.iter().map(|s| &s.info)
    }

    pub fn set_config_hash(&mut self, hash: String) {
        self.config_hash = hash;
    }

    /// Counters the driver wants to publish in heartbeats.
    pub fn set_counters(&mut self, counters: Vec<(String, u64)>) {
        self.counters = counters;
        self.counters.truncate(MAX_HEARTBEAT_COUNTERS);
    }

    /// Tells the encoder whether records wait upstream of it (the sender's
    /// spool has more than one read holds). While they do, blocks get the
    /// configured parity only: a sender that cannot keep up with its input
    /// is at full load whatever the link's rate says.
    pub fn set_input_waiting(&mut self, waiting: bool) {
        self.input_waiting = waiting;
    }

    /// True when enough sealed blocks wait for the link that the caller
    /// should stop pushing (and buffer upstream) until frames are polled.
    pub fn is_backlogged(&self) -> bool {
        self.sealed.len() >= self.cfg.max_queued_blocks
    }

    /// Packs a record into the open block. Sequence numbers must increase
    /// per stream; a skipped number (a record dropped before the encoder)
    /// reaches the receiver as a gap. Resent records carry old numbers and
    /// are exempt. Panics on an unregistered stream or a sequence that goes
    /// backwards: both are the driver's bugs, never input from outside.
    pub fn push(&mut self, now: Nanos, record: &Record) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        crate::record::encode_into(record, &mut scratch);
        let bytes = Pieces(&scratch, &[]);
        self.push_record_bytes(now, record.stream, record.seq, record.resent, bytes);
        self.scratch = scratch;
    }

    /// As [`Self::push`], for a body already serialized (postcard, as
    /// [`RecordBody`] serializes): the sender's spool stores bodies so, and
    /// the link thread hands them over without decoding them. The caller
    /// has checked `body` (with [`crate::record::RecordBodyRef::parse`]).
    pub fn push_encoded(
        &mut self,
        now: Nanos,
        stream: StreamId,
        seq: u64,
        resent: bool,
        body: &[u8],
    ) {
        debug_assert!(crate::record::RecordBodyRef::parse(body).is_ok());
        // Only the head is written apart; the body is copied once, into
        // the block.
        let mut head = std::mem::take(&mut self.scratch);
        head.clear();
        crate::record::put_record_head(&mut head, stream, seq, resent);
        self.push_record_bytes(now, stream, seq, resent, Pieces(&head, body));
        self.scratch = head;
    }

    fn push_record_bytes(
        &mut self,
        now: Nanos,
        id: StreamId,
        seq: u64,
        resent: bool,
        record_bytes: Pieces<'_>,
    ) {
        self.start.get_or_insert(now);
        let stream = &mut self.streams[id as usize];
        if !resent {
            let expected = stream.last_pushed.map_or(stream.info.first_seq, |s| s + 1);
            assert!(
                seq >= expected,
                "records of stream {} pushed out of sequence",
                stream.info.name
            );
            stream.last_pushed = Some(seq);
        }
        self.stats.records += 1;
        self.stats.record_bytes += record_bytes.len() as u64;
        self.pack(id, record_bytes);
        // A heartbeat claims a record (`last_seq`) once the block holding its
        // end is sealed, so the receiver names it in a gap if that block is
        // lost. `pack` ends by writing into the open block and seals that
        // block itself when the record fills it: then the end is already
        // sealed and the claim is made now (left to the next seal, it would
        // wait for a block that may never come, and a record lost with its
        // block would be named nowhere).
        if !resent {
            if self.open.is_empty() {
                self.streams[id as usize].last_sealed = Some(seq);
            } else {
                self.open_completed.push((id, seq));
            }
        }
        if self.open_since.is_none() && !self.open.is_empty() {
            self.open_since = Some(now);
        }
    }

    /// Tells the receiver that records `from..=to` of `stream` will never
    /// be sent (the spool dropped them), in order with the stream's records.
    pub fn push_gap_notice(&mut self, now: Nanos, notice: &GapNotice) {
        self.start.get_or_insert(now);
        let stream = &mut self.streams[notice.stream as usize];
        let expected = stream.last_pushed.map_or(stream.info.first_seq, |s| s + 1);
        assert!(
            notice.from >= expected && notice.to >= notice.from,
            "gap notice out of sequence"
        );
        stream.last_pushed = Some(notice.to);
        let bytes = postcard::to_allocvec(notice).expect("GapNotice serializes");
        self.ensure_stream_info(notice.stream);
        if entry_len(TAG_GAP_NOTICE, 0, bytes.len()) > self.room() {
            self.seal(false);
            self.ensure_stream_info(notice.stream);
        }
        put_entry(&mut self.open, TAG_GAP_NOTICE, 0, &bytes);
        self.open_completed.push((notice.stream, notice.to));
        if self.open_since.is_none() {
            self.open_since = Some(now);
        }
    }

    /// Names the stream in the open block, so a block is readable on its own.
    fn ensure_stream_info(&mut self, stream: StreamId) {
        if self.open_streams.contains(&stream) {
            return;
        }
        let info = postcard::to_allocvec(&self.streams[stream as usize].info)
            .expect("StreamInfo serializes");
        if self.room() < entry_len(TAG_STREAM_INFO, 0, info.len()) + MIN_FRAGMENT {
            self.seal(false);
        }
        put_entry(&mut self.open, TAG_STREAM_INFO, 0, &info);
        self.open_streams.push(stream);
    }

    fn room(&self) -> usize {
        self.cfg.block_capacity() - self.open.len()
    }

    fn pack(&mut self, stream: StreamId, bytes: Pieces<'_>) {
        self.ensure_stream_info(stream);
        if entry_len(TAG_RECORD, 0, bytes.len()) <= self.room() {
            bytes.put_entry(&mut self.open, TAG_RECORD, 0);
            if self.room() < MAX_ENTRY_HEADER + 1 {
                self.seal(false);
            }
            return;
        }
        if self.room() < MIN_FRAGMENT + MAX_ENTRY_HEADER {
            // Too little room for a useful first piece: start afresh.
            self.seal(false);
            return self.pack(stream, bytes);
        }
        let total = bytes.len() as u32;
        let first =
            self.room() - (1 + bundle::varint_len(total) + bundle::varint_len(self.room() as u32));
        let (piece, mut rest) = bytes.split_at(first);
        piece.put_entry(&mut self.open, TAG_FIRST, total);
        self.seal(false);
        loop {
            if entry_len(TAG_LAST, 0, rest.len()) <= self.room() {
                rest.put_entry(&mut self.open, TAG_LAST, 0);
                if self.room() < MAX_ENTRY_HEADER + 1 {
                    self.seal(false);
                }
                return;
            }
            let (piece, after) =
                rest.split_at(self.room() - (1 + bundle::varint_len(self.room() as u32)));
            piece.put_entry(&mut self.open, TAG_MIDDLE, 0);
            self.seal(false);
            rest = after;
        }
    }

    /// Turns the open block into a sealed block with parity.
    fn seal(&mut self, by_timer: bool) {
        if self.open.is_empty() {
            return;
        }
        let data_len = self.open.len();
        let full = self.cfg.shard_size;
        let k = data_len.div_ceil(full);
        let shard_len = if k == self.cfg.data_shards {
            full
        } else {
            data_len.div_ceil(k)
        };
        let fresh = self
            .spare_buffers
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(block_buffer_len(&self.cfg)));
        let mut shards = std::mem::replace(&mut self.open, fresh);
        shards.resize(k * shard_len, 0);
        let number = self.next_block;
        self.next_block += 1;
        self.sealed.push_back(SealedBlock {
            number,
            k,
            m: 0,
            shard_len,
            data_len,
            shards,
        });
        self.stats.blocks += 1;
        if by_timer {
            self.stats.partial_blocks += 1;
        }
        for (stream, seq) in self.open_completed.drain(..) {
            self.streams[stream as usize].last_sealed = Some(seq);
        }
        self.open_streams.clear();
        self.open_since = None;
    }

    /// Configured parity for a block of k data shards: the configured ratio,
    /// but never fewer than min(4, M) shards, because a small block with
    /// proportional parity (1 + 1) would be lost by two drops.
    fn parity_for(&self, k: usize) -> usize {
        let (kk, mm) = (self.cfg.data_shards, self.cfg.parity_shards);
        if mm == 0 {
            return 0;
        }
        (k * mm).div_ceil(kk).max(mm.min(4)).min(MAX_SHARDS - k)
    }

    /// When the caller should next call `handle_timeout` or `poll_frame`
    /// (a shard falls due).
    pub fn poll_timeout(&self) -> Option<Nanos> {
        let flush = self
            .open_since
            .filter(|_| self.sealed.is_empty())
            .map(|t| t + self.cfg.flush_after);
        let due = self
            .keys
            .iter()
            .filter(|k| k.class() < 2)
            .map(|k| k.due)
            .min();
        let reserve = self
            .keys
            .iter()
            .any(|k| k.class() == 2)
            .then(|| self.next_reserve_at())
            .flatten();
        [flush, due, reserve, self.next_heartbeat]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn handle_timeout(&mut self, now: Nanos) {
        self.start.get_or_insert(now);
        // While sealed blocks still wait for the link, sealing early buys
        // no latency: let the open block fill instead.
        if self.sealed.is_empty()
            && self
                .open_since
                .is_some_and(|t| now >= t + self.cfg.flush_after)
        {
            self.seal(true);
        }
        let due = *self.next_heartbeat.get_or_insert(now);
        if now >= due {
            self.heartbeat_now(now);
            self.next_heartbeat = Some(now + self.cfg.heartbeat_interval);
        }
    }

    /// Seals whatever is open without waiting for the timer, and sends
    /// the rest on its schedule: the last blocks keep their spread and
    /// their spare parity, reserve included (the end of all input). The
    /// encoder is idle once every shard is out.
    pub fn finish(&mut self, now: Nanos) {
        self.start.get_or_insert(now);
        // The input has ended: nothing waits upstream any more, so the last
        // blocks get the spare parity the now idle link pays for.
        self.input_waiting = false;
        self.seal(true);
    }

    /// Seals whatever is open and sends everything at once, without
    /// waiting for due times, giving up reserve spare parity (a prompt
    /// shutdown).
    pub fn flush(&mut self, now: Nanos) {
        self.start.get_or_insert(now);
        // Reserve parity waits for idle moments, which a flush does not
        // wait for: give it up, so the encoder goes idle once the scheduled
        // shards are out.
        for f in &mut self.in_flight {
            let end = f.end.min(f.scheduled.max(f.next));
            self.stats.spare_parity_dropped += (f.end - end) as u64;
            f.end = end;
        }
        self.in_flight.retain(|f| !f.done());
        self.keys = self.in_flight.iter().map(Key::of).collect();
        self.input_waiting = false;
        self.seal(true);
        self.flushing = true;
    }

    /// The number the open block will get when sealed: a record pushed
    /// now ends in a block numbered at most this.
    pub fn next_block(&self) -> u64 {
        self.next_block
    }

    /// Every block numbered below this has had all its frames polled.
    pub fn unsent_from(&self) -> u64 {
        let queued = self.sealed.front().map_or(self.next_block, |b| b.number);
        self.in_flight
            .iter()
            .filter(|f| f.owes())
            .map(|f| f.block.number)
            .min()
            .map_or(queued, |n| n.min(queued))
    }

    /// True when nothing is waiting to be sent.
    pub fn is_idle(&self) -> bool {
        self.open.is_empty()
            && self.sealed.is_empty()
            && self.in_flight.is_empty()
            && self.control.is_empty()
    }

    /// Queues a heartbeat now (after a final flush, so the receiver learns
    /// the last sequence numbers without waiting for the timer).
    pub fn heartbeat_now(&mut self, now: Nanos) {
        let header = Heartbeat {
            session: self.cfg.session,
            uptime_ms: now.saturating_sub(self.start.unwrap_or(now)) / crate::NANOS_PER_MILLI,
            next_block: self.next_block,
            config_hash: self.config_hash.clone(),
            counters: self.counters.clone(),
            part: 0,
            parts: 1,
            streams: Vec::new(),
        };
        let statuses: Vec<StreamStatus> = self
            .streams
            .iter()
            .map(|s| StreamStatus {
                info: s.info.clone(),
                last_seq: s.last_sealed,
            })
            .collect();
        // Split the stream list into parts that each fit one frame.
        let mut parts: Vec<Heartbeat> = vec![header.clone()];
        for status in statuses {
            let last = parts.last_mut().expect("at least one part");
            last.streams.push(status);
            let size = postcard::to_allocvec(&Control::Heartbeat(last.clone()))
                .map_or(usize::MAX, |v| v.len());
            if size > self.cfg.shard_size && last.streams.len() > 1 {
                let moved = last.streams.pop().expect("just pushed");
                let mut next = header.clone();
                next.streams.push(moved);
                parts.push(next);
            }
        }
        let count = parts.len() as u16;
        for (i, mut part) in parts.into_iter().enumerate() {
            part.part = i as u16;
            part.parts = count;
            let mut body = postcard::to_allocvec(&Control::Heartbeat(part.clone()))
                .expect("heartbeat serializes");
            if body.len() > self.cfg.shard_size {
                // Too big for one datagram (a small MTU): drop the counters,
                // which the next heartbeat repeats anyway.
                part.counters.clear();
                body =
                    postcard::to_allocvec(&Control::Heartbeat(part)).expect("heartbeat serializes");
            }
            if body.len() > self.cfg.shard_size {
                // One stream's name alone does not fit: counted, not sent.
                self.stats.heartbeats_oversized += 1;
                continue;
            }
            let header = FrameHeader {
                flags: FLAG_CONTROL,
                session: self.cfg.session,
                block: self.next_control_seq,
                index: 0,
                k: 1,
                m: 0,
                shard_len: body.len() as u16,
                data_len: body.len() as u32,
            };
            self.next_control_seq += 1;
            let mut frame = vec![0u8; body.len() + FRAME_OVERHEAD];
            let n = header.write(&body, &mut frame, &self.signer);
            frame.truncate(n);
            self.control.push_back((self.next_block, frame));
        }
    }

    /// Writes the next datagram into `buf` (at least `max_frame_len` bytes)
    /// and returns its length, or None when nothing is ready to send now
    /// (`poll_timeout` says when something will be).
    pub fn poll_frame(&mut self, now: Nanos, buf: &mut [u8]) -> Option<usize> {
        self.meter_roll(now);
        // `unsent_from` scans the blocks in flight: only when a control
        // frame waits.
        if self
            .control
            .front()
            .is_some_and(|(after, _)| *after <= self.unsent_from())
        {
            let (_, frame) = self.control.pop_front().expect("front exists");
            buf[..frame.len()].copy_from_slice(&frame);
            self.stats.control_frames += 1;
            self.stats.wire_bytes += frame.len() as u64;
            self.meter_count(frame.len(), false, false);
            return Some(frame.len());
        }
        self.admit(now);
        // Under backlog (sealed blocks wait) or when flushing, due times
        // do not hold shards back: the link must not idle while data waits.
        // Data and configured parity go before spare parity; among those of
        // a kind, the block served least recently.
        let eager = self.flushing || !self.sealed.is_empty();
        debug_assert!(
            self.keys.len() == self.in_flight.len()
                && self
                    .keys
                    .iter()
                    .zip(&self.in_flight)
                    .all(|(k, f)| *k == Key::of(f)),
            "selection keys out of step with the blocks in flight"
        );
        let scheduled = pick(&self.keys, |k| k.class() < 2 && (eager || k.due <= now));
        // Reserve parity only where nothing is due and nothing waits, and
        // never two shards of one block in a row while another block has
        // reserve left.
        let i = match scheduled {
            Some(i) => i,
            None => {
                if eager || !self.reserve_allowed(now) {
                    return None;
                }
                let i = pick(&self.keys, |k| k.class() == 2)?;
                self.reserve_tokens -= 1.0;
                i
            }
        };
        let session = self.cfg.session;
        let f = &mut self.in_flight[i];
        let index = f.next;
        // Each (block, index) is written once: it is the frame's GCM nonce
        // (docs/wire-format.md, "Why a nonce never repeats").
        debug_assert!(
            index < f.block.k + f.block.m,
            "shard index beyond the block"
        );
        f.next += 1;
        self.polled += 1;
        f.served = self.polled;
        f.last_sent = Some(now);
        let block = &f.block;
        let offset = index * block.shard_len;
        let header = FrameHeader {
            flags: 0,
            session,
            block: block.number,
            index: index as u16,
            k: block.k as u16,
            m: block.m as u16,
            shard_len: block.shard_len as u16,
            data_len: block.data_len as u32,
        };
        let n = header.write(
            &block.shards[offset..offset + block.shard_len],
            buf,
            &self.signer,
        );
        let is_parity = index >= block.k;
        let spare = index >= block.k + f.configured;
        if is_parity {
            self.stats.parity_frames += 1;
            self.stats.parity_bytes += block.shard_len as u64;
        } else {
            self.stats.data_frames += 1;
            self.stats.data_bytes += block.shard_len as u64;
        }
        if spare {
            self.stats.spare_parity_frames += 1;
        }
        self.stats.wire_bytes += n as u64;
        self.last_data_frame = Some(now);
        self.meter_count(n, !is_parity, spare);
        self.keys[i] = Key::of(&self.in_flight[i]);
        if self.in_flight[i].done() {
            self.keys.swap_remove(i);
            let sent = self.in_flight.swap_remove(i);
            self.recycle(sent.block.shards);
            if self.in_flight.is_empty() && self.sealed.is_empty() {
                self.flushing = false;
            }
        }
        Some(n)
    }

    /// Whether a reserve spare parity frame may go now. Reserve fills idle
    /// moments at a bounded rate (a small token bucket filled at the idle
    /// share of the link last measured), so the driver, which gathers a
    /// batch of frames at once, never fills a whole batch with reserve
    /// that data due a moment later would have to wait behind.
    fn reserve_allowed(&mut self, now: Nanos) -> bool {
        let idle = self.meter.last.map_or(1.0, |u| (1.0 - u.busy).max(0.0));
        let per_sec = idle * RESERVE_SHARE * self.link_frames_per_sec();
        let elapsed = now.saturating_sub(self.reserve_at) as f64 / crate::NANOS_PER_SEC as f64;
        self.reserve_at = now;
        self.reserve_tokens = (self.reserve_tokens + elapsed * per_sec).min(RESERVE_BURST);
        self.reserve_tokens >= 1.0
    }

    /// When the reserve bucket next holds a whole token (None while the
    /// link was measured full).
    fn next_reserve_at(&self) -> Option<Nanos> {
        let idle = self.meter.last.map_or(1.0, |u| (1.0 - u.busy).max(0.0));
        let per_sec = idle * RESERVE_SHARE * self.link_frames_per_sec();
        if per_sec <= 0.0 {
            return None;
        }
        let wait = (1.0 - self.reserve_tokens).max(0.0) / per_sec;
        Some(self.reserve_at + (wait * crate::NANOS_PER_SEC as f64).ceil() as Nanos)
    }

    /// Counts a frame polled into the current measuring window.
    fn meter_count(&mut self, len: usize, data: bool, spare: bool) {
        self.meter.frames += 1;
        if data {
            self.meter.data += 1;
        }
        if !spare {
            self.meter.busy_bytes += (len + self.cfg.wire_overhead) as u64;
        }
    }

    /// Closes the measuring window once it is `MEASURE_WINDOW` old (a window
    /// that spans an idle period is longer, and shows the link idle).
    fn meter_roll(&mut self, now: Nanos) {
        let elapsed = now.saturating_sub(self.meter.start);
        if elapsed < MEASURE_WINDOW {
            return;
        }
        let secs = elapsed as f64 / crate::NANOS_PER_SEC as f64;
        self.meter.last = Some(LinkUse {
            frames: self.meter.frames as f64 / secs,
            data: self.meter.data as f64 / secs,
            busy: self.meter.busy_bytes as f64 / (secs * self.cfg.link_rate as f64),
        });
        self.meter.start = now;
        self.meter.frames = 0;
        self.meter.data = 0;
        self.meter.busy_bytes = 0;
    }

    /// Frames per second the link can carry at full-size frames.
    fn link_frames_per_sec(&self) -> f64 {
        self.cfg.link_rate as f64 / (self.max_frame_len() + self.cfg.wire_overhead) as f64
    }

    /// Puts sealed blocks in flight, up to `interleave` at once: decides
    /// each one's parity, computes it, and spreads its shards.
    fn admit(&mut self, now: Nanos) {
        if self.sealed.is_empty() {
            return;
        }
        let owing = self.keys.iter().filter(|k| k.class() == 0).count();
        if owing >= self.cfg.interleave {
            return;
        }
        let idle = self.in_flight.is_empty()
            && self
                .last_data_frame
                .is_none_or(|t| now.saturating_sub(t) >= self.cfg.idle_after);
        if idle {
            self.warmup_left = self.cfg.warmup_blocks;
        }
        let t0 = now;
        let mut owing = owing;
        while owing < self.cfg.interleave {
            // Full load: more blocks wait than can go in flight, or the
            // link was (nearly) full in the last measuring window. Then
            // there is no idle capacity to spend, and parity stays at the
            // configured ratio. A source handing over several blocks' worth
            // at once is not full load.
            let backlog = self.input_waiting
                || self.sealed.len() > self.cfg.interleave
                || self.meter.last.is_some_and(|u| u.busy >= FULL_LOAD);
            let reserve_wanted = !self.flushing;
            let Some(mut block) = self.sealed.pop_front() else {
                break;
            };
            let k = block.k;
            let mut configured = self.parity_for(k);
            if !backlog {
                // Below full load every block gets at least the full M:
                // a partial block with proportional parity (12 + 4) is lost
                // far more often than a full one (64 + 16) at the same loss.
                configured = configured.max(self.cfg.parity_shards).min(MAX_SHARDS - k);
            }
            if self.warmup_left > 0 {
                self.warmup_left -= 1;
                self.stats.warmup_blocks += 1;
                configured = configured.max(self.cfg.warmup_parity).min(MAX_SHARDS - k);
            }
            // Spare parity: what the measured idle capacity pays for is
            // planned (scheduled with the block's other shards); up to
            // `spare_parity_max` more is computed as a reserve, sent only in
            // moments the link would otherwise be idle (at the end of a
            // transfer, the last blocks are then not alone on the link).
            let (planned, reserve) = if backlog {
                (0, 0)
            } else {
                let cap = self
                    .cfg
                    .spare_parity_max
                    .min(MAX_SHARDS - k)
                    .saturating_sub(configured);
                let planned = self.spare_for(k, configured).min(cap);
                (planned, if reserve_wanted { cap - planned } else { 0 })
            };
            if planned + reserve > 0 {
                self.stats.spare_parity_blocks += 1;
            }
            let m = configured + planned + reserve;
            block.m = m;
            block.shards.resize((k + m) * block.shard_len, 0);
            self.fec.encode(k, m, block.shard_len, &mut block.shards);
            let spread = self.spread_for(k, configured + planned);
            self.stats.max_spread = self.stats.max_spread.max(spread);
            let step = spread / (k + configured + planned) as u64;
            self.in_flight.push(InFlight {
                block,
                configured,
                scheduled: k + configured + planned,
                end: k + m,
                next: 0,
                t0,
                step,
                served: 0,
                last_sent: None,
                deadline: t0.saturating_add(self.cfg.max_spread),
            });
            self.keys
                .push(Key::of(self.in_flight.last().expect("just pushed")));
            owing += 1;
        }
        self.bound_spare_only();
    }

    /// Drops the spare parity of the oldest blocks that have nothing else
    /// left while more than `SPARE_ONLY_FACTOR × interleave` are in flight.
    fn bound_spare_only(&mut self) {
        while self.in_flight.len() > SPARE_ONLY_FACTOR * self.cfg.interleave {
            let Some(i) = self
                .in_flight
                .iter()
                .enumerate()
                .filter(|(_, f)| !f.owes())
                .min_by_key(|(_, f)| f.block.number)
                .map(|(i, _)| i)
            else {
                return;
            };
            self.keys.swap_remove(i);
            let dropped = self.in_flight.swap_remove(i);
            self.stats.spare_parity_dropped += (dropped.end - dropped.next) as u64;
            self.recycle(dropped.block.shards);
        }
    }

    fn recycle(&mut self, mut buffer: Vec<u8>) {
        if self.spare_buffers.len() < self.cfg.interleave {
            buffer.clear();
            self.spare_buffers.push(buffer);
        }
    }

    /// Parity beyond `configured` that the link's idle capacity pays for:
    /// the measured idle share of the link (60% of it), divided among the
    /// data frames in proportion to k, up to `spare_parity_max` in all.
    fn spare_for(&self, k: usize, configured: usize) -> usize {
        if self.cfg.parity_shards == 0 {
            return 0;
        }
        let cap = self
            .cfg
            .spare_parity_max
            .min(MAX_SHARDS - k)
            .saturating_sub(configured);
        if cap == 0 {
            return 0;
        }
        let Some(used) = self.meter.last else {
            return cap;
        };
        let idle_frames = (1.0 - used.busy).max(0.0) * SPARE_SHARE * self.link_frames_per_sec();
        if used.data < 1.0 {
            return cap;
        }
        let per_data_shard = idle_frames / used.data;
        ((k as f64 * per_data_shard) as usize).min(cap)
    }

    /// How long a block's shards are spread: long enough that a burst of
    /// `burst_tolerance` consecutive datagrams, at the rate the link
    /// carried frames lately (at least the rate this block adds), costs it
    /// at most its m shards; at most half of `max_spread`.
    fn spread_for(&self, k: usize, m: usize) -> Nanos {
        if m == 0 || self.cfg.burst_tolerance == 0 {
            return 0;
        }
        let n = (k + m) as f64;
        let recent = self.meter.last.map_or(0.0, |u| u.frames);
        let capacity = self.link_frames_per_sec();
        // Positions per second the burst is counted in: what the link
        // carried lately (no more than it can carry); with no measurement
        // yet (after idle), one block's shards per flush interval.
        let floor = n * crate::NANOS_PER_SEC as f64 / self.cfg.flush_after.max(1) as f64;
        let rate = if recent >= 1.0 { recent } else { floor }
            .min(capacity)
            .max(1.0);
        let positions = self.cfg.burst_tolerance as f64 * n / m as f64;
        let secs = positions / rate;
        // Planned within half of `max_spread`: the other half is headroom
        // for a block that falls behind (a busy link, a stalled sender)
        // before its deadline makes it catch up.
        ((secs * crate::NANOS_PER_SEC as f64) as Nanos).min(self.cfg.max_spread / 2)
    }
}
