//! The sender's state machine: records in, frames out.
//!
//! `push` packs records into the open block; a block is sealed when full or
//! when its oldest record has waited `flush_after`. Sealed blocks get their
//! parity and join an interleave group; `poll_frame` emits the group's shards
//! round-robin (shard 0 of every block, then shard 1, ...). Heartbeats jump
//! the queue. The caller paces `poll_frame` to the link rate.

use std::collections::VecDeque;

use crate::auth::Signer;
use crate::bundle::{
    self, entry_len, put_entry, MAX_ENTRY_HEADER, TAG_FIRST, TAG_GAP_NOTICE, TAG_LAST, TAG_MIDDLE,
    TAG_RECORD, TAG_STREAM_INFO,
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
    /// Blocks sent in a group shorter than `interleave` (the link had spare
    /// capacity), which carry the full configured parity count.
    pub spare_parity_blocks: u64,
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
    /// Parity shards: decided and computed when the block joins a group.
    m: usize,
    shard_len: usize,
    data_len: usize,
    /// k * shard_len data bytes, then m parity shards once in a group.
    shards: Vec<u8>,
    sealed_at: Nanos,
}

/// Shards of up to `interleave` blocks, sent round-robin.
#[derive(Default)]
struct Group {
    blocks: Vec<SealedBlock>,
    shard: usize,
    block: usize,
}

impl Group {
    fn next(&mut self) -> Option<(&SealedBlock, usize)> {
        let widest = self.blocks.iter().map(|b| b.k + b.m).max()?;
        while self.shard < widest {
            while self.block < self.blocks.len() {
                let b = self.block;
                self.block += 1;
                if self.shard < self.blocks[b].k + self.blocks[b].m {
                    return Some((&self.blocks[b], self.shard));
                }
            }
            self.block = 0;
            self.shard += 1;
        }
        None
    }
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
    group: Group,
    /// Control frames, each sent once every block numbered below its
    /// `after_block` has been sent, so a heartbeat never overtakes the
    /// blocks it describes.
    control: VecDeque<(u64, Vec<u8>)>,
    /// Set by `flush`: send the sealed blocks without waiting for a full group.
    flushing: bool,
    next_control_seq: u64,
    next_heartbeat: Option<Nanos>,
    start: Option<Nanos>,
    last_data_frame: Option<Nanos>,
    warmup_left: usize,
    config_hash: String,
    counters: Vec<(String, u64)>,
    scratch: Vec<u8>,
    /// Block buffers of sent groups, reused so the hot path does not fault
    /// in fresh pages for every block; at most one group's worth is kept.
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
            open: Vec::with_capacity(cfg.block_capacity()),
            cfg,
            signer,
            fec: Fec::default(),
            streams: Vec::new(),
            open_streams: Vec::new(),
            open_since: None,
            open_completed: Vec::new(),
            next_block: 0,
            sealed: VecDeque::new(),
            group: Group::default(),
            control: VecDeque::new(),
            flushing: false,
            next_control_seq: 0,
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
        self.start.get_or_insert(now);
        let stream = &mut self.streams[record.stream as usize];
        if !record.resent {
            let expected = stream.last_pushed.map_or(stream.info.first_seq, |s| s + 1);
            assert!(
                record.seq >= expected,
                "records of stream {} pushed out of sequence",
                stream.info.name
            );
            stream.last_pushed = Some(record.seq);
        }

        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let record_bytes =
            postcard::to_extend(record, scratch).expect("postcard into a Vec cannot fail");
        self.stats.records += 1;
        self.stats.record_bytes += record_bytes.len() as u64;
        self.pack(now, record.stream, &record_bytes);
        // A heartbeat claims a record (`last_seq`) once the block holding its
        // end is sealed, so the receiver names it in a gap if that block is
        // lost. `pack` ends by writing into the open block and seals that
        // block itself when the record fills it: then the end is already
        // sealed and the claim is made now (left to the next seal, it would
        // wait for a block that may never come, and a record lost with its
        // block would be named nowhere).
        if !record.resent {
            if self.open.is_empty() {
                self.streams[record.stream as usize].last_sealed = Some(record.seq);
            } else {
                self.open_completed.push((record.stream, record.seq));
            }
        }
        self.scratch = record_bytes;
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
        self.ensure_stream_info(now, notice.stream);
        if entry_len(TAG_GAP_NOTICE, 0, bytes.len()) > self.room() {
            self.seal(now, false);
            self.ensure_stream_info(now, notice.stream);
        }
        put_entry(&mut self.open, TAG_GAP_NOTICE, 0, &bytes);
        self.open_completed.push((notice.stream, notice.to));
        if self.open_since.is_none() {
            self.open_since = Some(now);
        }
    }

    /// Names the stream in the open block, so a block is readable on its own.
    fn ensure_stream_info(&mut self, now: Nanos, stream: StreamId) {
        if self.open_streams.contains(&stream) {
            return;
        }
        let info = postcard::to_allocvec(&self.streams[stream as usize].info)
            .expect("StreamInfo serializes");
        if self.room() < entry_len(TAG_STREAM_INFO, 0, info.len()) + MIN_FRAGMENT {
            self.seal(now, false);
        }
        put_entry(&mut self.open, TAG_STREAM_INFO, 0, &info);
        self.open_streams.push(stream);
    }

    fn room(&self) -> usize {
        self.cfg.block_capacity() - self.open.len()
    }

    fn pack(&mut self, now: Nanos, stream: StreamId, bytes: &[u8]) {
        self.ensure_stream_info(now, stream);
        if entry_len(TAG_RECORD, 0, bytes.len()) <= self.room() {
            put_entry(&mut self.open, TAG_RECORD, 0, bytes);
            if self.room() < MAX_ENTRY_HEADER + 1 {
                self.seal(now, false);
            }
            return;
        }
        if self.room() < MIN_FRAGMENT + MAX_ENTRY_HEADER {
            // Too little room for a useful first piece: start afresh.
            self.seal(now, false);
            return self.pack(now, stream, bytes);
        }
        let total = bytes.len() as u32;
        let first =
            self.room() - (1 + bundle::varint_len(total) + bundle::varint_len(self.room() as u32));
        put_entry(&mut self.open, TAG_FIRST, total, &bytes[..first]);
        self.seal(now, false);
        let mut rest = &bytes[first..];
        loop {
            if entry_len(TAG_LAST, 0, rest.len()) <= self.room() {
                put_entry(&mut self.open, TAG_LAST, 0, rest);
                if self.room() < MAX_ENTRY_HEADER + 1 {
                    self.seal(now, false);
                }
                return;
            }
            let piece = self.room() - (1 + bundle::varint_len(self.room() as u32));
            put_entry(&mut self.open, TAG_MIDDLE, 0, &rest[..piece]);
            self.seal(now, false);
            rest = &rest[piece..];
        }
    }

    /// Turns the open block into a sealed block with parity.
    fn seal(&mut self, now: Nanos, by_timer: bool) {
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
        let fresh = self.spare_buffers.pop().unwrap_or_default();
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
            sealed_at: now,
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

    /// Parity for a block of k data shards: the configured ratio, but never
    /// fewer than min(4, M) shards, because a small block with proportional
    /// parity (1 + 1) would be lost by two drops.
    fn parity_for(&self, k: usize) -> usize {
        let (kk, mm) = (self.cfg.data_shards, self.cfg.parity_shards);
        if mm == 0 {
            return 0;
        }
        (k * mm).div_ceil(kk).max(mm.min(4)).min(MAX_SHARDS - k)
    }

    /// When the caller should next call `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        let flush = self
            .open_since
            .filter(|_| self.sealed.is_empty())
            .map(|t| t + self.cfg.flush_after);
        let group = self
            .sealed
            .front()
            .map(|b| b.sealed_at + self.cfg.flush_after);
        [flush, group, self.next_heartbeat]
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
            self.seal(now, true);
        }
        let due = *self.next_heartbeat.get_or_insert(now);
        if now >= due {
            self.heartbeat_now(now);
            self.next_heartbeat = Some(now + self.cfg.heartbeat_interval);
        }
    }

    /// Seals whatever is open so it is sent without waiting for the timer
    /// (end of input, shutdown).
    pub fn flush(&mut self, now: Nanos) {
        self.seal(now, true);
        self.flushing = true;
    }

    /// The number the open block will get when sealed: a record pushed
    /// now ends in a block numbered at most this.
    pub fn next_block(&self) -> u64 {
        self.next_block
    }

    /// Every block numbered below this has had all its frames polled.
    pub fn unsent_from(&self) -> u64 {
        if !self.group.blocks.is_empty() && !self.group.next_is_done() {
            return self.group.blocks[0].number;
        }
        self.sealed.front().map_or(self.next_block, |b| b.number)
    }

    /// True when nothing is waiting to be sent.
    pub fn is_idle(&self) -> bool {
        self.open.is_empty()
            && self.sealed.is_empty()
            && self.group.blocks.is_empty()
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
    /// and returns its length, or None when nothing is ready to send now.
    pub fn poll_frame(&mut self, now: Nanos, buf: &mut [u8]) -> Option<usize> {
        let group_done = self.group.blocks.is_empty() || self.group.next_is_done();
        let next_unsent = self.sealed.front().map_or(self.next_block, |b| b.number);
        if group_done
            && self
                .control
                .front()
                .is_some_and(|(after, _)| *after <= next_unsent)
        {
            let (_, frame) = self.control.pop_front().expect("front exists");
            buf[..frame.len()].copy_from_slice(&frame);
            self.stats.control_frames += 1;
            self.stats.wire_bytes += frame.len() as u64;
            return Some(frame.len());
        }
        if group_done {
            self.form_group(now)?;
        }
        let session = self.cfg.session;
        let Some((block, index)) = self.group.next() else {
            // The group's last frame went out on the previous call and
            // `next` only now finds the group done: whatever waits behind
            // it (a heartbeat, the next group) is ready, so it goes now
            // rather than after one more call (a caller that polls until
            // None would otherwise leave the final heartbeat unsent). The
            // group is done now, so the second call does not come back here.
            return if group_done {
                None
            } else {
                self.poll_frame(now, buf)
            };
        };
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
        let is_parity = index >= block.k;
        let n = header.write(
            &block.shards[offset..offset + block.shard_len],
            buf,
            &self.signer,
        );
        if is_parity {
            self.stats.parity_frames += 1;
        } else {
            self.stats.data_frames += 1;
        }
        self.stats.wire_bytes += n as u64;
        self.last_data_frame = Some(now);
        Some(n)
    }

    fn form_group(&mut self, now: Nanos) -> Option<()> {
        if self.sealed.is_empty() {
            self.flushing = false;
        }
        let ready = self.flushing
            || self.sealed.len() >= self.cfg.interleave
            || self
                .sealed
                .front()
                .is_some_and(|b| now >= b.sealed_at + self.cfg.flush_after);
        if !ready {
            self.group = Group::default();
            return None;
        }
        for mut sent in std::mem::take(&mut self.group.blocks) {
            if self.spare_buffers.len() < self.cfg.interleave {
                sent.shards.clear();
                self.spare_buffers.push(sent.shards);
            }
        }
        let take = self.sealed.len().min(self.cfg.interleave);
        let mut blocks: Vec<SealedBlock> = self.sealed.drain(..take).collect();
        // A group that is not full means the link has spare capacity: spend
        // it on parity, because a short group spreads a burst over fewer
        // blocks than `interleave`.
        let spare = take < self.cfg.interleave;
        let idle = self
            .last_data_frame
            .is_none_or(|t| now.saturating_sub(t) >= self.cfg.idle_after);
        if idle && self.group.blocks.is_empty() {
            self.warmup_left = self.cfg.warmup_blocks;
        }
        for block in &mut blocks {
            let k = block.k;
            let mut m = self.parity_for(k);
            if spare {
                m = m.max(self.cfg.parity_shards).min(MAX_SHARDS - k);
                self.stats.spare_parity_blocks += 1;
            }
            if self.warmup_left > 0 {
                self.warmup_left -= 1;
                self.stats.warmup_blocks += 1;
                m = m.max(self.cfg.warmup_parity).min(MAX_SHARDS - k);
            }
            block.m = m;
            block.shards.resize((k + m) * block.shard_len, 0);
            self.fec.encode(k, m, block.shard_len, &mut block.shards);
        }
        self.group = Group {
            blocks,
            shard: 0,
            block: 0,
        };
        Some(())
    }
}

impl Group {
    fn next_is_done(&self) -> bool {
        let widest = self.blocks.iter().map(|b| b.k + b.m).max().unwrap_or(0);
        self.shard >= widest
    }
}
