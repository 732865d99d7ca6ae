//! The receiver's state machine: datagrams in, records and gaps out.
//!
//! Shards are collected per block; a block with k of its k + m shards is
//! rebuilt and its records are released strictly in block order, so every
//! stream keeps its order. A block still incomplete when a later block has
//! waited `block_timeout` (the wait limit, on the wait clock below) and it has itself had no shard
//! for as long, or when it falls `max_blocks_in_flight` behind the newest,
//! is given up. Losses are then found by sequence number: a record
//! whose sequence jumps, or a heartbeat naming a later last sequence once
//! every block it covers is resolved, yields a [`Gap`] with the exact range.
//!
//! # The wait clock
//! The wait limit is measured on a clock that counts a silence of the link
//! (no datagram at all) as at most [`SILENCE_STEP`] (or twice the mean gap
//! between shards), unless the silence lasts longer than twice the
//! sender's heartbeat interval ([`Decoder::silence_max`], at least
//! [`SILENCE_MAX_MIN`]): then it counts in full. A block waiting for its
//! last shards is given up because the link went on without them, not
//! because nothing came: a sender that froze for a second (a paused VM, a
//! stalled machine) between a later block's last shard and this block's
//! parity, or a receiver that froze with those shards in its socket
//! buffer, would otherwise find the block "outwaited" and lose it with
//! every shard on its way. A sender that is gone for good still has its
//! incomplete blocks given up, once its silence is longer than that bound.
//! Any datagram moves the clock (even one that fails its checks), so
//! flooding the link can only make it run like real time.
//!
//! # Hostile numbers
//! Every number taken from a frame, a record or a restored cursor is
//! bounded before it is used: block numbers and heartbeat `next_block` at
//! [`MAX_BLOCK`], sequence numbers at [`MAX_SEQ`], shapes at the receiver's
//! `[fec]` limits; the arithmetic on them is checked or saturating, so no
//! frame can overflow a counter or make a loop run past its bound.
//!
//! # How far a frame may move the decoder (the window rule)
//! The live session has shown its `newest` block: the highest block of a
//! shard it had accepted, or a heartbeat's `next_block - 1`. A data frame or
//! heartbeat more than `slide` blocks past `newest` (`slide` =
//! max(`max_blocks_in_flight` / 2, 2 × `MAX_INTERLEAVE`), 128 by default) is
//! not used; it is held (at most [`HELD_MAX_BYTES`]) as evidence of a jump.
//! So one frame raises `newest` by at most `slide` blocks, and N forged
//! frames move the window by at most N × `slide` blocks. The window jumps to
//! the lowest held block only once [`CORROBORATING_FRAMES`] distinct held
//! frames are in and, unless frames are authenticated, the live session has
//! had no frame accepted for the takeover silence below; any accepted frame
//! within bound discards the evidence. A real sender after a link outage is
//! followed within that silence, and everything it sent in between is
//! named in exact `link-loss` gaps.
//!
//! # Sessions (the takeover rule)
//! Frames of another session id are held (at most [`HELD_MAX_BYTES`]) as a
//! candidate. The candidate replaces the live session when it has sent
//! [`CORROBORATING_FRAMES`] distinct frames and the live session has had no
//! frame accepted for:
//! - nothing, when frames are authenticated and the candidate's id is
//!   higher (sender ids grow with the sender's clock: `config::session_id`);
//! - 2 × the heartbeat interval the live session has shown (the
//!   difference of its heartbeats' `uptime_ms`; 1 s until it has shown one), within [`TAKEOVER_SILENCE_MIN`] and
//!   [`TAKEOVER_SILENCE_MAX`], when the candidate's id is higher but frames
//!   are not authenticated: a live sender sends a heartbeat at least every
//!   interval, so invented frames cannot take over from a sender that
//!   keeps sending;
//! - 4 × that gap, within [`OLDER_SESSION_SILENCE`] and
//!   [`OLDER_SESSION_SILENCE_MAX`], when the candidate's id is lower: a
//!   replay of an earlier session, or a sender whose clock went backwards.
//!
//! The candidate's held frames are then decoded, and records it sent that
//! did not fit the held bound become exact `link-loss` gaps.
//!
//! # Replays
//! A shard whose (session, block, index) was seen before is counted in
//! `replayed`; one whose block is older than the window in `stale`; control
//! frames likewise by their sequence number (a window of 64). Neither is
//! decoded again, and a record is delivered at most once per stream
//! position whatever arrives.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// The maps looked up for every record (by stream id and by name): SipHash,
/// the standard library's default, took about 7% of the decoder thread's
/// time on small records. foldhash is several times faster and still seeded
/// per process; the maps hold at most `max_streams` keys, so a crafted
/// collision costs at most a scan of those.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
use std::sync::Arc;

use crate::auth::{AuthError, Verifier};
use crate::bundle::{Entries, Entry};
use crate::config::{DecoderConfig, MAX_INTERLEAVE};
use crate::control::{Control, Heartbeat, StreamStatus};
use crate::fec::Fec;
use crate::frame::{FrameError, FrameHeader, HEADER_LEN};
use crate::record::{GapNotice, NoticeCause, Record, RecordBody, StreamId, StreamInfo};
use crate::Nanos;

/// Highest block number (or heartbeat `next_block`) accepted. A sender
/// sending ten million blocks a second takes over 14,000 years to reach it,
/// and every `block + n` the decoder computes stays far from `u64::MAX`.
pub const MAX_BLOCK: u64 = 1 << 62;
/// Highest record sequence number accepted (records, gap notices,
/// heartbeat `last_seq`), for the same reason.
pub const MAX_SEQ: u64 = 1 << 62;

/// Distinct frames a new session, or a jump of the window, must show before
/// the decoder follows it: one stray or CRC-colliding datagram never does.
pub const CORROBORATING_FRAMES: usize = 8;
/// Bytes of frames held per candidate session and per pending jump, so a
/// real sender's frames are not lost while the decoder waits to trust them
/// (about 2.7 s at 100 Mbit/s); frames beyond are dropped and counted.
pub const HELD_MAX_BYTES: usize = 32 << 20;
/// Bounds of the silence asked of a live session before a newer,
/// unauthenticated session takes over or the window jumps.
pub const TAKEOVER_SILENCE_MIN: Nanos = 200 * crate::NANOS_PER_MILLI;
pub const TAKEOVER_SILENCE_MAX: Nanos = 30 * crate::NANOS_PER_SEC;
/// Bounds of the silence asked before a session with a lower id takes over
/// (a replay of an earlier session, or a sender whose clock went back).
pub const OLDER_SESSION_SILENCE: Nanos = 60 * crate::NANOS_PER_SEC;
pub const OLDER_SESSION_SILENCE_MAX: Nanos = 600 * crate::NANOS_PER_SEC;
/// Heartbeat gap assumed until a session has shown two heartbeats: the
/// sender's default `heartbeat.interval`.
const DEFAULT_HEARTBEAT_GAP: Nanos = crate::NANOS_PER_SEC;
/// The most a silence of the link (no datagram at all) counts toward the
/// wait limit, unless it lasts longer than [`Decoder::silence_max`]; twice
/// the mean gap between shards if that is longer. See "The wait clock" in
/// the module documentation.
pub const SILENCE_STEP: Nanos = 20 * crate::NANOS_PER_MILLI;
/// Of the data frames dropped unread because their header names a block
/// already done (`Decoder::handle_datagram`), one in this many is checked
/// anyway: a forger aiming at such blocks still meets the tag check.
pub const SPOT_CHECK: u64 = 16;
/// The least silence that counts in full (see [`SILENCE_STEP`]).
pub const SILENCE_MAX_MIN: Nanos = crate::NANOS_PER_SEC;
/// Control frames remembered below the newest control sequence, to reject
/// replayed heartbeats.
const CONTROL_WINDOW: u64 = 64;

/// Control sequence numbers a frame may skip past the highest seen; more
/// is held as far-ahead evidence like a block past the window bound. At
/// one heartbeat a second this is over an hour of lost heartbeats.
const CONTROL_SLIDE: u64 = 4096;

enum Seen {
    Fresh,
    Replayed,
    Stale,
}

/// Frames held until enough of them corroborate a takeover or a jump.
struct Held {
    /// Where each held frame points (its block, or a heartbeat's next_block).
    positions: Vec<u64>,
    /// Held frames, already authenticated and decrypted: header and shard.
    frames: Vec<(FrameHeader, Vec<u8>)>,
    bytes: usize,
    /// (control, block, index) of the frames held: distinct frames only.
    seen: HashSet<(bool, u64, u16)>,
}

impl Held {
    fn new() -> Self {
        Held {
            positions: Vec::new(),
            frames: Vec::new(),
            bytes: 0,
            seen: HashSet::new(),
        }
    }

    /// The lowest and highest positions of the largest cluster of held
    /// frames, where a cluster is a run of positions no more than `slide`
    /// apart: a minority of outliers (forged or stray) cannot place the
    /// window, while a sender held for a long time spans many blocks.
    fn anchor(&self, slide: u64) -> (u64, u64) {
        let mut sorted = self.positions.clone();
        sorted.sort_unstable();
        let mut best = (0usize, 0u64, 0u64);
        let mut start = 0;
        for i in 0..sorted.len() {
            let ends = i + 1 == sorted.len() || sorted[i + 1] - sorted[i] > slide;
            if ends {
                let size = i + 1 - start;
                if size > best.0 {
                    best = (size, sorted[start], sorted[i]);
                }
                start = i + 1;
            }
        }
        (best.1, best.2)
    }

    /// Holds a frame, unless it repeats one held or the bytes are spent.
    fn hold(&mut self, header: &FrameHeader, position: u64, shard: &[u8]) -> Hold {
        let key = (header.is_control(), header.block, header.index);
        if self.seen.contains(&key) {
            return Hold::Repeat;
        }
        // Counted as the frame's bytes on the wire, less tag and CRC.
        let bytes = HEADER_LEN + shard.len();
        if self.bytes.saturating_add(bytes) > HELD_MAX_BYTES {
            return Hold::Full;
        }
        self.seen.insert(key);
        self.positions.push(position);
        self.bytes = self.bytes.saturating_add(bytes);
        self.frames.push((*header, shard.to_vec()));
        Hold::Held
    }

    fn distinct(&self) -> usize {
        self.seen.len()
    }
}

enum Hold {
    Held,
    Repeat,
    Full,
}

/// A session seen while another is live, not yet trusted.
struct Candidate {
    id: u64,
    held: Held,
}

/// Past sessions remembered so their late or replayed frames are rejected.
const RETIRED_SESSIONS: usize = 16;
/// Heartbeat checks waiting for their blocks to resolve; a newer heartbeat
/// covers everything an older one does, so dropping the oldest loses nothing.
const MAX_PENDING_CHECKS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GapCause {
    /// Blocks were lost on the link beyond what FEC could rebuild.
    LinkLoss,
    /// The records were sent while this receiver was not running.
    ReceiverDown,
    /// The sender's spool dropped them before they were sent (it said so).
    SenderSpoolOverflow,
    /// The sender's spool lost them to a crash (damaged tail).
    SenderSpoolDamaged,
    /// They were in a corrupt part in the middle of the sender's spool.
    SenderSpoolCorrupt,
}

impl GapCause {
    pub fn as_str(&self) -> &'static str {
        match self {
            GapCause::LinkLoss => "link-loss",
            GapCause::ReceiverDown => "receiver-down",
            GapCause::SenderSpoolOverflow => "sender-spool-overflow",
            GapCause::SenderSpoolDamaged => "sender-spool-damaged",
            GapCause::SenderSpoolCorrupt => "sender-spool-corrupt",
        }
    }
}

/// Records `from..=to` of `stream` will never be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub stream: Arc<str>,
    /// Sender session and stream epoch the range belongs to.
    pub session: u64,
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
    pub cause: GapCause,
}

impl Gap {
    /// How many records the gap names (never zero: `from <= to`).
    pub fn records(&self) -> u64 {
        self.to.saturating_sub(self.from).saturating_add(1)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    pub stream: Arc<str>,
    pub source_type: Arc<str>,
    pub session: u64,
    /// The stream's sequence epoch: `seq` is unique within it.
    pub epoch: u64,
    pub seq: u64,
    /// Delivered by a resend, after later records of its stream.
    pub resent: bool,
    pub body: RecordBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Frames of a new sender session arrived. `joined_late` is true when it
    /// had already sent many blocks before this receiver saw it.
    SessionStarted {
        session: u64,
        joined_late: bool,
    },
    Record(Delivered),
    Gap(Gap),
    /// A new session restarted a stream's numbering at or below what was
    /// already delivered (the sender lost its sequence state).
    SequenceReset {
        stream: Arc<str>,
        last_delivered: u64,
        first_seq: u64,
    },
    Heartbeat(Heartbeat),
    /// Records `from..=to` of `stream`, reported as a gap before, arrived
    /// through a resend and were delivered.
    Recovered {
        stream: Arc<str>,
        from: u64,
        to: u64,
    },
}

/// Counters of everything the decoder saw, dropped and delivered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DecoderStats {
    pub datagrams: u64,
    pub shards_accepted: u64,
    /// Shards that arrived after their block was rebuilt but while it still
    /// waited for an earlier block (also unneeded parity, usually). Counted
    /// on the header's word, before the CRC and tag (`handle_datagram`):
    /// a corrupted or forged frame naming such a block lands here too.
    pub surplus_shards: u64,
    pub control_frames: u64,
    pub rejected_truncated: u64,
    pub rejected_bad_magic: u64,
    pub rejected_bad_version: u64,
    pub rejected_length: u64,
    pub rejected_crc: u64,
    pub rejected_header: u64,
    /// Data frames whose k or m is above the receiver's `[fec]` limits.
    pub rejected_fec_shape: u64,
    /// Frames without a tag while this receiver requires authentication.
    pub rejected_unauthenticated: u64,
    /// Tagged frames while this receiver has `[auth] disabled = true`.
    pub rejected_auth_disabled: u64,
    /// Tagged with a key id that is none of this receiver's keys.
    pub rejected_unknown_key: u64,
    /// Tag does not match the frame: forged or altered.
    pub rejected_bad_tag: u64,
    pub rejected_stale_session: u64,
    /// Frames of a would-be new session that another one displaced before
    /// it sent enough frames to be trusted.
    pub rejected_stray_session: u64,
    /// Shards of blocks older than the window (already delivered or given
    /// up), and control frames older than the control window. Most are
    /// parity that was not needed: a block is delivered as soon as k shards
    /// are in. Replays of old frames land here too. Data frames of the live
    /// session are counted here on the header's word, before the CRC and
    /// tag, so corrupted or forged ones naming an old block land here too.
    pub stale: u64,
    /// A (block, shard) or control frame of the session seen before: the
    /// link duplicated it, or someone replays it.
    pub replayed: u64,
    /// Frames of the live session past its window bound, held as evidence
    /// of a jump (see the window rule).
    pub far_ahead: u64,
    /// Held far-ahead frames thrown away because the live session went on
    /// within its bound.
    pub rejected_far_ahead: u64,
    /// Frames not held because a candidate's or a jump's held bytes were
    /// spent ([`HELD_MAX_BYTES`]); after the switch they are exact gaps.
    pub rejected_held_overflow: u64,
    /// Times the window jumped to corroborated far-ahead frames.
    pub window_jumps: u64,
    pub inconsistent_shards: u64,
    pub bad_control: u64,
    pub blocks_decoded: u64,
    /// Blocks that needed Reed-Solomon to rebuild missing data shards.
    pub blocks_repaired: u64,
    pub shards_rebuilt: u64,
    /// Decoded blocks by the data shards Reed-Solomon rebuilt in each, in
    /// the buckets of [`REBUILT_BUCKETS`]: 0, 1, 2-3, 4-7, ... 64+. The
    /// buckets sum to `blocks_decoded`; all but the first to
    /// `blocks_repaired`.
    pub rebuilt_per_block: [u64; REBUILT_BUCKETS.len()],
    /// The most data shards rebuilt in one block.
    pub shards_rebuilt_max: u64,
    /// The largest share of its parity shards (m, from its header) that a
    /// block used up: data shards rebuilt * 100 / m, rounded down. 100 is a
    /// block one more lost shard would have made a gap of.
    pub parity_used_max_pct: u64,
    /// Blocks given up with some but fewer than k shards.
    pub blocks_lost: u64,
    /// Blocks given up with no shard seen at all.
    pub blocks_missing: u64,
    pub records: u64,
    pub duplicate_records: u64,
    pub bad_entries: u64,
    pub orphan_fragments: u64,
    pub oversized_records: u64,
    pub unknown_stream_records: u64,
    pub streams_rejected: u64,
    pub gaps: u64,
    pub gap_records: u64,
    pub heartbeats: u64,
    pub sequence_resets: u64,
    pub gap_notices: u64,
    /// Resent records that filled an open gap and were delivered.
    pub resent_recovered: u64,
    /// Records of a new sender session, sent again from its spool, that
    /// filled an open gap (a link-loss gap of blocks the previous session
    /// was sending when it died) and were delivered.
    pub spool_recovered: u64,
    /// Resent records already delivered (or never in a gap): dropped.
    pub resent_duplicate: u64,
    /// Resent records ahead of the stream's position: dropped, the
    /// original is still on its way.
    pub resent_ahead: u64,
    pub open_gaps_forgotten: u64,
}

/// Names of the [`DecoderStats::rebuilt_per_block`] buckets: blocks with
/// that many data shards rebuilt. Powers of two, so each bucket reads as
/// "about this much of a block was lost" whatever k is.
pub const REBUILT_BUCKETS: [&str; 8] = ["0", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64+"];

impl DecoderStats {
    /// Counts a decoded block of `m` parity shards in which Reed-Solomon
    /// rebuilt `rebuilt` data shards (0 when all data shards arrived).
    fn note_decoded(&mut self, rebuilt: usize, m: usize) {
        // A block rebuilds at most m data shards (it decodes from any k of
        // its k + m), so the share is at most 100.
        debug_assert!(rebuilt <= m, "rebuilt {rebuilt} of m {m}");
        self.blocks_decoded += 1;
        // 0 -> 0, 1 -> 1, 2..=3 -> 2, 4..=7 -> 3, ..., 64.. -> 7.
        let bucket = (usize::BITS - rebuilt.leading_zeros()) as usize;
        self.rebuilt_per_block[bucket.min(REBUILT_BUCKETS.len() - 1)] += 1;
        if rebuilt == 0 {
            return;
        }
        self.blocks_repaired += 1;
        self.shards_rebuilt += rebuilt as u64;
        self.shards_rebuilt_max = self.shards_rebuilt_max.max(rebuilt as u64);
        let pct = (rebuilt * 100 / m.max(1)).min(100) as u64;
        self.parity_used_max_pct = self.parity_used_max_pct.max(pct);
    }

    /// The `rebuilt_per_block` histogram with its bucket names, for
    /// metrics and logs.
    pub fn rebuilt_histogram(&self) -> [(&'static str, u64); REBUILT_BUCKETS.len()] {
        std::array::from_fn(|i| (REBUILT_BUCKETS[i], self.rebuilt_per_block[i]))
    }

    /// Every scalar counter with its name, for metrics and logs (the
    /// histogram is in [`DecoderStats::rebuilt_histogram`]).
    pub fn fields(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("datagrams", self.datagrams),
            ("shards_accepted", self.shards_accepted),
            ("surplus_shards", self.surplus_shards),
            ("control_frames", self.control_frames),
            ("rejected_truncated", self.rejected_truncated),
            ("rejected_bad_magic", self.rejected_bad_magic),
            ("rejected_bad_version", self.rejected_bad_version),
            ("rejected_length", self.rejected_length),
            ("rejected_crc", self.rejected_crc),
            ("rejected_header", self.rejected_header),
            ("rejected_fec_shape", self.rejected_fec_shape),
            ("rejected_unauthenticated", self.rejected_unauthenticated),
            ("rejected_auth_disabled", self.rejected_auth_disabled),
            ("rejected_unknown_key", self.rejected_unknown_key),
            ("rejected_bad_tag", self.rejected_bad_tag),
            ("rejected_stale_session", self.rejected_stale_session),
            ("rejected_stray_session", self.rejected_stray_session),
            ("stale", self.stale),
            ("replayed", self.replayed),
            ("far_ahead", self.far_ahead),
            ("rejected_far_ahead", self.rejected_far_ahead),
            ("rejected_held_overflow", self.rejected_held_overflow),
            ("window_jumps", self.window_jumps),
            ("inconsistent_shards", self.inconsistent_shards),
            ("bad_control", self.bad_control),
            ("blocks_decoded", self.blocks_decoded),
            ("blocks_repaired", self.blocks_repaired),
            ("shards_rebuilt", self.shards_rebuilt),
            ("shards_rebuilt_max", self.shards_rebuilt_max),
            ("parity_used_max_pct", self.parity_used_max_pct),
            ("blocks_lost", self.blocks_lost),
            ("blocks_missing", self.blocks_missing),
            ("records", self.records),
            ("duplicate_records", self.duplicate_records),
            ("bad_entries", self.bad_entries),
            ("orphan_fragments", self.orphan_fragments),
            ("oversized_records", self.oversized_records),
            ("unknown_stream_records", self.unknown_stream_records),
            ("streams_rejected", self.streams_rejected),
            ("gaps", self.gaps),
            ("gap_records", self.gap_records),
            ("heartbeats", self.heartbeats),
            ("sequence_resets", self.sequence_resets),
            ("gap_notices", self.gap_notices),
            ("resent_recovered", self.resent_recovered),
            ("spool_recovered", self.spool_recovered),
            ("resent_duplicate", self.resent_duplicate),
            ("resent_ahead", self.resent_ahead),
            ("open_gaps_forgotten", self.open_gaps_forgotten),
        ]
    }
}

struct PendingBlock {
    k: usize,
    m: usize,
    shard_len: usize,
    data_len: usize,
    buf: Vec<u8>,
    present: Vec<bool>,
    count: usize,
    /// When k shards were in and the block was rebuilt, on the wait clock
    /// (module documentation).
    decoded_at: Option<Nanos>,
    /// When the block's last shard was accepted, in real time and on the
    /// wait clock: a block is not given up by the timeout while its own
    /// shards keep arriving (see `handle_timeout`).
    last_shard_at: Nanos,
    last_shard_wait: Nanos,
    decoded: bool,
}

struct Partial {
    block: u64,
    /// Bytes `buf` holds once every piece is in.
    total: usize,
    buf: Vec<u8>,
    /// A `Bytes` record whose head fit its first piece: the head, parsed,
    /// while `buf` gathers only the data and the `end` byte after it, so the
    /// data becomes the record's own buffer without another copy.
    bytes_head: Option<BytesHead>,
}

/// The fields of a `Bytes` record before its data (see [`bytes_head`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct BytesHead {
    stream: StreamId,
    seq: u64,
    resent: bool,
}

/// The index postcard writes for [`RecordBody::Bytes`] (its place among
/// the variants).
const BYTES_VARIANT: u32 = 3;

/// If the first `piece` of a record of `total` bytes holds the whole head
/// of a `Bytes` record (stream, seq, resent, the variant, the data's
/// length) and the lengths add up to `total` with one `end` byte after the
/// data: the head and the offset its data starts at. Any other record
/// (another kind, a head cut by the piece's end, lengths that disagree)
/// is gathered whole and decoded by postcard as before.
fn bytes_head(piece: &[u8], total: usize) -> Option<(BytesHead, usize)> {
    // Postcard writes a record as these fields in this order: u32 and u64
    // as varints, the bool as one byte, the variant index as a varint u32,
    // and a byte string's length as a varint usize (u64 here).
    let ((stream, seq, resent, variant, len), rest) =
        postcard::take_from_bytes::<(u32, u64, bool, u32, u64)>(piece).ok()?;
    let at = piece.len() - rest.len();
    let whole = usize::try_from(len).ok()?.checked_add(at)?.checked_add(1)?;
    (variant == BYTES_VARIANT && whole == total).then_some((
        BytesHead {
            stream,
            seq,
            resent,
        },
        at,
    ))
}

struct StreamMeta {
    name: Arc<str>,
    source_type: Arc<str>,
    first_seq: u64,
    epoch: u64,
}

struct Session {
    id: u64,
    /// Lowest block not yet delivered or given up.
    base: u64,
    /// Blocks below this were sent before we joined; not counted as lost.
    first_block: u64,
    joined_late: bool,
    pending: BTreeMap<u64, PendingBlock>,
    streams: FastMap<StreamId, Arc<StreamMeta>>,
    partial: Option<Partial>,
    /// (next_block, arrival time, streams) of heartbeats not yet applied.
    checks: VecDeque<(u64, Nanos, Vec<StreamStatus>)>,
    /// Highest block the session has shown (see the window rule).
    newest: u64,
    /// When a frame of the session was last accepted (not stale, replayed
    /// or held).
    last_accepted_at: Nanos,
    /// `uptime_ms` of the session's last heartbeat (part 0) accepted.
    last_heartbeat_uptime: Option<u64>,
    /// The sender's heartbeat interval as its heartbeats show it: the
    /// difference of their `uptime_ms`, so a heartbeat delayed on a
    /// saturated link does not inflate it. Falls at once, rises by an
    /// eighth per heartbeat, so a lost heartbeat barely moves it.
    heartbeat_gap: Nanos,
    /// Highest control sequence accepted, and a bitmap of the
    /// `CONTROL_WINDOW` below it (bit d: sequence top - d was accepted).
    control_top: Option<u64>,
    control_seen: u64,
    /// Far-ahead frames held as evidence of a jump.
    ahead: Option<Held>,
}

impl Session {
    /// Notes control sequence `seq`: fresh, seen before, or older than the
    /// control window.
    fn note_control(&mut self, seq: u64) -> Seen {
        match self.control_top {
            None => {
                self.control_top = Some(seq);
                self.control_seen = 1;
                Seen::Fresh
            }
            Some(top) if seq > top => {
                let shift = seq - top;
                self.control_seen = if shift >= CONTROL_WINDOW {
                    0
                } else {
                    self.control_seen << shift
                };
                self.control_seen |= 1;
                self.control_top = Some(seq);
                Seen::Fresh
            }
            Some(top) => {
                let behind = top - seq;
                if behind >= CONTROL_WINDOW {
                    Seen::Stale
                } else if self.control_seen & (1 << behind) != 0 {
                    Seen::Replayed
                } else {
                    self.control_seen |= 1 << behind;
                    Seen::Fresh
                }
            }
        }
    }
}

/// A stream's delivered position, as saved and restored by the receiver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamPosition {
    /// Sender session of the last record.
    pub session: Option<u64>,
    /// The stream's sequence epoch (see `StreamInfo::epoch`).
    pub epoch: Option<u64>,
    /// Last sequence delivered or accounted as a gap.
    pub last: Option<u64>,
}

/// Open gaps remembered per stream for resends to fill; the oldest is
/// forgotten (and counted) past this.
const MAX_OPEN_GAPS: usize = 1024;

/// What has been delivered of a stream, across sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    session: Option<u64>,
    epoch: Option<u64>,
    last: Option<u64>,
    /// Nothing delivered or accounted since this decoder started.
    fresh: bool,
    /// Loaded from a previous run's state by `restore_cursor`.
    restored: bool,
}

pub struct Decoder {
    cfg: DecoderConfig,
    /// Checks every datagram's tag before anything else reads it.
    verifier: Verifier,
    fec: Fec,
    session: Option<Session>,
    candidate: Option<Candidate>,
    retired: VecDeque<u64>,
    cursors: FastMap<Arc<str>, Cursor>,
    events: VecDeque<Event>,
    open_gaps: FastMap<Arc<str>, Vec<(u64, u64)>>,
    /// A run of recovered sequences not yet reported.
    recovered: Option<(Arc<str>, u64, u64)>,
    last_shard_at: Option<Nanos>,
    /// Moving mean of the time between accepted shards, in nanoseconds.
    interarrival: f64,
    /// Data frames whose header was looked at before their checks (for the
    /// spot check in `handle_datagram`).
    peeked: u64,
    /// The wait clock (module documentation) at the last datagram, and
    /// that datagram's real time; None before the first.
    wait_now: Nanos,
    wait_last: Option<Nanos>,
    /// Buffers of delivered blocks, reused for new ones (bounded).
    spare_buffers: Vec<Vec<u8>>,
    stats: DecoderStats,
}

/// Block buffers kept for reuse by the decoder.
const SPARE_BUFFERS: usize = 32;

/// A buffer of `len` bytes for a new block: a delivered block's if one is
/// spare, with its old bytes left in place (zeroing every block's buffer
/// took about 3% of the receiver's CPU in a bulk run). No old byte is
/// read: a block is unpacked only once each of its data shards was
/// received into its slot or rebuilt there (`Fec::reconstruct` writes
/// every missing data shard whole), and only its first `data_len` bytes.
fn block_buffer(spare: &mut Vec<Vec<u8>>, len: usize) -> Vec<u8> {
    let mut buf = spare.pop().unwrap_or_default();
    buf.resize(len, 0);
    buf
}

impl Decoder {
    /// `verifier` holds the keys frames must be tagged with (or says
    /// authentication is disabled); no datagram reaches any state before
    /// it passes.
    pub fn new(cfg: DecoderConfig, verifier: Verifier) -> Self {
        cfg.validate()
            .expect("decoder configuration validated by the caller");
        // The relaxed takeover and jump rules trust a frame's origin: only
        // sound when every frame's tag is checked.
        assert!(
            !cfg.frames_authenticated || !verifier.is_disabled(),
            "frames_authenticated set while authentication is disabled"
        );
        Decoder {
            cfg,
            verifier,
            fec: Fec::default(),
            session: None,
            candidate: None,
            retired: VecDeque::new(),
            cursors: FastMap::default(),
            events: VecDeque::new(),
            open_gaps: FastMap::default(),
            recovered: None,
            spare_buffers: Vec::new(),
            last_shard_at: None,
            interarrival: 0.0,
            peeked: 0,
            wait_now: 0,
            wait_last: None,
            stats: DecoderStats::default(),
        }
    }

    pub fn stats(&self) -> &DecoderStats {
        &self.stats
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Seeds what a previous run of the receiver delivered, so a restart
    /// neither repeats records nor misses the gap while it was down.
    pub fn restore_cursor(&mut self, stream: &str, position: StreamPosition) {
        let StreamPosition {
            session,
            epoch,
            last,
        } = position;
        self.cursors.insert(
            Arc::from(stream),
            Cursor {
                session,
                epoch,
                last,
                fresh: true,
                restored: true,
            },
        );
    }

    /// Where every stream seen stands: what to save for `restore_cursor`.
    pub fn cursors(&self) -> impl Iterator<Item = (&str, StreamPosition)> {
        self.cursors.iter().map(|(k, c)| {
            (
                &**k,
                StreamPosition {
                    session: c.session,
                    epoch: c.epoch,
                    last: c.last,
                },
            )
        })
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Takes one datagram from the link. Its shard is decrypted in place,
    /// so the caller's buffer holds unspecified bytes afterwards.
    pub fn handle_datagram(&mut self, now: Nanos, datagram: &mut [u8]) {
        self.stats.datagrams += 1;
        self.wait_now = self.wait_time(now);
        self.wait_last = Some(now.max(self.wait_last.unwrap_or(0)));
        // Unneeded parity (most of it arrives after its block was rebuilt)
        // is dropped on its header's word, before the CRC and the tag: it
        // could change nothing even if genuine, so checking it would only
        // cost a pass over its bytes and a decryption (`peek_block`). One
        // in `SPOT_CHECK` is checked anyway, so frames forged to name such
        // blocks still show in the `rejected_*` counters.
        if let Some((session, block)) = FrameHeader::peek_block(datagram) {
            self.peeked = self.peeked.wrapping_add(1);
            if let Some(live) = self
                .session
                .as_ref()
                .filter(|s| s.id == session && !self.peeked.is_multiple_of(SPOT_CHECK))
            {
                if block < live.base {
                    self.stats.stale += 1;
                    return;
                }
                if live.pending.get(&block).is_some_and(|b| b.decoded) {
                    self.stats.surplus_shards += 1;
                    return;
                }
            }
        }
        // The only place datagrams from the link are parsed: CRC and tag
        // are checked here, before any state below is touched.
        let (header, shard) = match FrameHeader::parse(datagram, &mut self.verifier) {
            Ok(parsed) => parsed,
            Err(e) => {
                let counter = match e {
                    FrameError::Truncated { .. } => &mut self.stats.rejected_truncated,
                    FrameError::BadMagic => &mut self.stats.rejected_bad_magic,
                    FrameError::UnsupportedVersion(_) => &mut self.stats.rejected_bad_version,
                    FrameError::LengthMismatch { .. } => &mut self.stats.rejected_length,
                    FrameError::BadCrc => &mut self.stats.rejected_crc,
                    FrameError::InvalidHeader(_) => &mut self.stats.rejected_header,
                    FrameError::Auth(AuthError::Unauthenticated) => {
                        &mut self.stats.rejected_unauthenticated
                    }
                    FrameError::Auth(AuthError::AuthenticationDisabled) => {
                        &mut self.stats.rejected_auth_disabled
                    }
                    FrameError::Auth(AuthError::UnknownKey(_)) => {
                        &mut self.stats.rejected_unknown_key
                    }
                    FrameError::Auth(AuthError::BadTag(_)) => &mut self.stats.rejected_bad_tag,
                };
                *counter += 1;
                return;
            }
        };
        if (!header.is_control() && header.shard_len as usize > self.cfg.max_shard_len)
            || header.block > MAX_BLOCK
        {
            self.stats.rejected_header += 1;
            return;
        }
        if !header.is_control()
            && (header.k as usize > self.cfg.max_data_shards
                || header.m as usize > self.cfg.max_parity_shards)
        {
            self.stats.rejected_fec_shape += 1;
            return;
        }
        if self.session.as_ref().map(|s| s.id) != Some(header.session) {
            if self.retired.contains(&header.session) {
                self.stats.rejected_stale_session += 1;
                return;
            }
            let Some(position) = Self::position(&header, shard) else {
                self.stats.bad_control += 1;
                return;
            };
            self.hold_candidate(now, &header, position, shard);
            return;
        }
        self.handle_frame(now, &header, shard);
    }

    /// Handles an authenticated frame: its header and plaintext shard.
    fn handle_frame(&mut self, now: Nanos, header: &FrameHeader, shard: &[u8]) {
        if header.is_control() {
            self.handle_control(now, header, shard);
        } else {
            self.handle_shard(now, header, shard);
        }
    }

    /// Where a frame sits in its session: its block, or a heartbeat's
    /// next_block; None for a control frame that is not a heartbeat with a
    /// next_block within [`MAX_BLOCK`].
    fn position(header: &FrameHeader, shard: &[u8]) -> Option<u64> {
        if !header.is_control() {
            return Some(header.block);
        }
        match postcard::from_bytes::<Control>(shard) {
            Ok(Control::Heartbeat(hb)) if hb.next_block <= MAX_BLOCK => Some(hb.next_block),
            _ => None,
        }
    }

    /// How far past the newest block it has shown a session's frame may
    /// point and still be used (see the window rule in the module doc).
    fn slide(&self) -> u64 {
        (self.cfg.max_blocks_in_flight as u64 / 2).max(2 * MAX_INTERLEAVE as u64)
    }

    /// Holds frames of a session other than the live one until it may take
    /// over (see the takeover rule in the module doc), then switches and
    /// decodes them, so stray, invented or replayed frames cannot end a
    /// live session.
    fn hold_candidate(&mut self, now: Nanos, header: &FrameHeader, position: u64, shard: &[u8]) {
        let id = header.session;
        if self.candidate.as_ref().is_some_and(|c| c.id != id) {
            let old = self.candidate.take().expect("checked above");
            self.stats.rejected_stray_session = self
                .stats
                .rejected_stray_session
                .saturating_add(old.held.frames.len() as u64);
        }
        let c = self.candidate.get_or_insert_with(|| Candidate {
            id,
            held: Held::new(),
        });
        match c.held.hold(header, position, shard) {
            Hold::Held => {}
            Hold::Repeat => self.stats.replayed += 1,
            Hold::Full => self.stats.rejected_held_overflow += 1,
        }
        self.try_takeover(now);
    }

    /// The silence asked of the live session before a session with id
    /// `candidate` takes over (the takeover rule).
    fn takeover_silence(&self, candidate: u64) -> Nanos {
        let Some(live) = self.session.as_ref() else {
            return 0;
        };
        let gap = live.heartbeat_gap;
        if candidate > live.id {
            if self.cfg.frames_authenticated {
                0
            } else {
                gap.saturating_mul(2)
                    .clamp(TAKEOVER_SILENCE_MIN, TAKEOVER_SILENCE_MAX)
            }
        } else {
            gap.saturating_mul(4)
                .clamp(OLDER_SESSION_SILENCE, OLDER_SESSION_SILENCE_MAX)
        }
    }

    /// When the candidate session may take over, once it has shown enough
    /// distinct frames. A receiver without a live session trusts the first
    /// authenticated frame; without authentication it too waits for
    /// `CORROBORATING_FRAMES`, so one forged frame cannot place the window.
    fn takeover_at(&self) -> Option<Nanos> {
        let c = self.candidate.as_ref()?;
        let Some(live) = self.session.as_ref() else {
            let needed = if self.cfg.frames_authenticated {
                1
            } else {
                CORROBORATING_FRAMES
            };
            return (c.held.distinct() >= needed).then_some(0);
        };
        if c.held.distinct() < CORROBORATING_FRAMES {
            return None;
        }
        Some(
            live.last_accepted_at
                .saturating_add(self.takeover_silence(c.id)),
        )
    }

    fn try_takeover(&mut self, now: Nanos) {
        if self.takeover_at().is_none_or(|at| now < at) {
            return;
        }
        let c = self.candidate.take().expect("takeover_at saw a candidate");
        let (first, newest) = c.held.anchor(self.slide());
        self.start_session(now, c.id, first, newest);
        self.replay_held(now, c.held.frames);
    }

    /// Decodes held frames in arrival order, as if they arrived now (they
    /// were authenticated and decrypted when they arrived).
    fn replay_held(&mut self, now: Nanos, frames: Vec<(FrameHeader, Vec<u8>)>) {
        for (header, shard) in &frames {
            self.handle_frame(now, header, shard);
        }
    }

    fn start_session(&mut self, now: Nanos, id: u64, first_block: u64, newest: u64) {
        self.finish_session();
        let lookback = (self.cfg.max_blocks_in_flight / 2) as u64;
        let joined_late = first_block > MAX_INTERLEAVE as u64;
        self.session = Some(Session {
            id,
            base: first_block.saturating_sub(lookback),
            first_block,
            joined_late,
            pending: BTreeMap::new(),
            streams: FastMap::default(),
            partial: None,
            checks: VecDeque::new(),
            newest: newest.max(first_block),
            last_accepted_at: now,
            last_heartbeat_uptime: None,
            heartbeat_gap: DEFAULT_HEARTBEAT_GAP,
            control_top: None,
            control_seen: 0,
            ahead: None,
        });
        self.events.push_back(Event::SessionStarted {
            session: id,
            joined_late,
        });
    }

    /// Delivers what the current session completed and retires it.
    fn finish_session(&mut self) {
        let last_check = self
            .session
            .as_ref()
            .and_then(|s| s.checks.back().and_then(|c| c.0.checked_sub(1)));
        let last_block = self
            .session
            .as_ref()
            .and_then(|s| s.pending.keys().next_back().copied());
        let Some(last) = last_block.max(last_check) else {
            if let Some(s) = self.session.take() {
                self.retire(s.id);
            }
            return;
        };
        self.give_up_through(last);
        if let Some(s) = self.session.take() {
            self.retire(s.id);
        }
    }

    fn retire(&mut self, id: u64) {
        if self.retired.len() == RETIRED_SESSIONS {
            self.retired.pop_front();
        }
        self.retired.push_back(id);
    }

    /// A frame of the live session within its bound was accepted: it shows
    /// the session alive, and contradicts any far-ahead evidence.
    fn note_accepted(&mut self, now: Nanos) {
        let session = self.session.as_mut().expect("session present");
        session.last_accepted_at = session.last_accepted_at.max(now);
        if let Some(held) = session.ahead.take() {
            self.stats.rejected_far_ahead = self
                .stats
                .rejected_far_ahead
                .saturating_add(held.frames.len() as u64);
        }
    }

    /// Holds a frame of the live session that points past its bound, as
    /// evidence of a jump (the window rule).
    fn hold_ahead(&mut self, now: Nanos, header: &FrameHeader, position: u64, shard: &[u8]) {
        self.stats.far_ahead += 1;
        let session = self.session.as_mut().expect("session present");
        let held = session.ahead.get_or_insert_with(Held::new);
        match held.hold(header, position, shard) {
            Hold::Held => {}
            Hold::Repeat => self.stats.replayed += 1,
            Hold::Full => self.stats.rejected_held_overflow += 1,
        }
        self.try_jump(now);
    }

    /// When the window may jump to the held far-ahead frames.
    fn jump_at(&self) -> Option<Nanos> {
        let session = self.session.as_ref()?;
        let held = session.ahead.as_ref()?;
        if held.distinct() < CORROBORATING_FRAMES {
            return None;
        }
        let silence = if self.cfg.frames_authenticated {
            0
        } else {
            session
                .heartbeat_gap
                .saturating_mul(2)
                .clamp(TAKEOVER_SILENCE_MIN, TAKEOVER_SILENCE_MAX)
        };
        Some(session.last_accepted_at.saturating_add(silence))
    }

    fn try_jump(&mut self, now: Nanos) {
        if self.jump_at().is_none_or(|at| now < at) {
            return;
        }
        let slide = self.slide();
        let session = self.session.as_mut().expect("jump_at saw a session");
        let held = session.ahead.take().expect("jump_at saw held frames");
        let (lowest, newest) = held.anchor(slide);
        // Blocks of the same interleave group as the lowest one held may
        // still be on their way.
        let to = lowest.saturating_sub(MAX_INTERLEAVE as u64);
        session.newest = session.newest.max(newest);
        session.control_top = None;
        session.control_seen = 0;
        if let Some(through) = to.checked_sub(1).filter(|t| *t >= session.base) {
            self.give_up_through(through);
        }
        self.stats.window_jumps += 1;
        self.replay_held(now, held.frames);
    }

    fn handle_control(&mut self, now: Nanos, header: &FrameHeader, body: &[u8]) {
        self.stats.control_frames += 1;
        let Ok(Control::Heartbeat(hb)) = postcard::from_bytes::<Control>(body) else {
            self.stats.bad_control += 1;
            return;
        };
        let slide = self.slide();
        let session = self
            .session
            .as_mut()
            .expect("session started before control is handled");
        if hb.session != session.id || hb.next_block > MAX_BLOCK {
            self.stats.bad_control += 1;
            return;
        }
        let control_bound = session
            .control_top
            .map_or(u64::MAX, |top| top.saturating_add(CONTROL_SLIDE));
        if hb.next_block > session.newest.saturating_add(slide).saturating_add(1)
            || header.block > control_bound
        {
            self.hold_ahead(now, header, hb.next_block, body);
            return;
        }
        match session.note_control(header.block) {
            Seen::Fresh => {}
            Seen::Replayed => {
                self.stats.replayed += 1;
                return;
            }
            Seen::Stale => {
                self.stats.stale += 1;
                return;
            }
        }
        session.newest = session.newest.max(hb.next_block.saturating_sub(1));
        if hb.part == 0 {
            let interval = session
                .last_heartbeat_uptime
                .and_then(|last| hb.uptime_ms.checked_sub(last))
                .map(|ms| {
                    ms.saturating_mul(crate::NANOS_PER_MILLI)
                        .min(TAKEOVER_SILENCE_MAX)
                })
                .filter(|ns| *ns > 0);
            if let Some(interval) = interval {
                let gap = session.heartbeat_gap;
                session.heartbeat_gap = if interval <= gap {
                    interval
                } else {
                    gap + (interval - gap) / 8
                };
            }
            session.last_heartbeat_uptime = Some(hb.uptime_ms);
        }
        self.note_accepted(now);
        self.stats.heartbeats += 1;
        for status in &hb.streams {
            self.learn_stream(&status.info);
        }
        let session = self.session.as_mut().expect("session present");
        if session.checks.len() == MAX_PENDING_CHECKS {
            session.checks.pop_front();
        }
        session
            .checks
            .push_back((hb.next_block, now, hb.streams.clone()));
        self.events.push_back(Event::Heartbeat(hb));
        self.apply_checks();
    }

    fn learn_stream(&mut self, info: &StreamInfo) {
        let session = self.session.as_mut().expect("session present");
        if session.streams.contains_key(&info.id) {
            return;
        }
        if session.streams.len() >= self.cfg.max_streams {
            self.stats.streams_rejected += 1;
            return;
        }
        // Share the name with the cursor map so records carry a cheap Arc.
        let name = self
            .cursors
            .get_key_value(info.name.as_str())
            .map_or_else(|| Arc::from(info.name.as_str()), |(k, _)| k.clone());
        session.streams.insert(
            info.id,
            Arc::new(StreamMeta {
                name,
                source_type: Arc::from(info.source_type.as_str()),
                first_seq: info.first_seq,
                epoch: info.epoch,
            }),
        );
    }

    fn handle_shard(&mut self, now: Nanos, h: &FrameHeader, shard: &[u8]) {
        // Block timing is on the wait clock; liveness and the shard gap
        // on real time.
        let wait_now = self.wait_now;
        let max_in_flight = self.cfg.max_blocks_in_flight as u64;
        let slide = self.slide();
        let session = self.session.as_mut().expect("session started");
        if h.block < session.base {
            self.stats.stale += 1;
            return;
        }
        if h.block > session.newest.saturating_add(slide) {
            self.hold_ahead(now, h, h.block, shard);
            return;
        }
        if let Some(through) = h
            .block
            .checked_sub(max_in_flight)
            .filter(|t| *t >= session.base)
        {
            // Past the window, within the bound: make room by giving up the
            // oldest blocks.
            self.give_up_through(through);
        }
        let session = self.session.as_mut().expect("session started");
        let (k, m, shard_len) = (h.k as usize, h.m as usize, h.shard_len as usize);
        let spare = &mut self.spare_buffers;
        let block = session
            .pending
            .entry(h.block)
            .or_insert_with(|| PendingBlock {
                k,
                m,
                shard_len,
                data_len: h.data_len as usize,
                buf: block_buffer(spare, (k + m) * shard_len),
                present: vec![false; k + m],
                count: 0,
                decoded_at: None,
                last_shard_at: now,
                last_shard_wait: wait_now,
                decoded: false,
            });
        if block.k != k
            || block.m != m
            || block.shard_len != shard_len
            || block.data_len != h.data_len as usize
        {
            self.stats.inconsistent_shards += 1;
            return;
        }
        let index = h.index as usize;
        if block.present[index] {
            self.stats.replayed += 1;
            return;
        }
        block.present[index] = true;
        if block.decoded {
            self.stats.surplus_shards += 1;
            session.newest = session.newest.max(h.block);
            self.note_accepted(now);
            return;
        }
        block.buf[index * shard_len..(index + 1) * shard_len].copy_from_slice(shard);
        block.count += 1;
        block.last_shard_at = block.last_shard_at.max(now);
        block.last_shard_wait = block.last_shard_wait.max(wait_now);
        session.newest = session.newest.max(h.block);
        self.stats.shards_accepted += 1;
        // Mean gap between shards (idle periods capped), for `wait_limit`.
        if let Some(last) = self.last_shard_at {
            let gap = now.saturating_sub(last).min(100 * crate::NANOS_PER_MILLI) as f64;
            self.interarrival = self.interarrival * 0.99 + gap * 0.01;
        }
        self.last_shard_at = Some(now);
        let base = session.base;
        self.note_accepted(now);
        let session = self.session.as_mut().expect("session started");
        let block = session.pending.get_mut(&h.block).expect("inserted above");
        if block.count < k {
            return;
        }
        match self
            .fec
            .reconstruct(k, m, shard_len, &mut block.buf, &block.present)
        {
            Some(rebuilt) => {
                block.decoded = true;
                block.decoded_at = Some(wait_now);
                self.stats.note_decoded(rebuilt, m);
            }
            None => {
                // k shards present yet no rebuild: cannot happen with a
                // well-formed block; count it and let the block time out.
                self.stats.inconsistent_shards += 1;
                return;
            }
        }
        if h.block == base {
            self.deliver_ready();
        }
    }

    /// Delivers consecutive decoded blocks from the base.
    fn deliver_ready(&mut self) {
        loop {
            let session = self.session.as_mut().expect("session present");
            let base = session.base;
            match session.pending.get(&base) {
                Some(b) if b.decoded => {
                    let block = session.pending.remove(&base).expect("present");
                    session.base = base.saturating_add(1);
                    self.unpack_block(base, &block.buf[..block.data_len]);
                    self.recycle(block.buf);
                }
                _ => break,
            }
        }
        self.apply_checks();
    }

    /// Resolves every block up to and including `through` (at most
    /// [`MAX_BLOCK`]): decoded ones are delivered, the rest given up. Runs
    /// of blocks never seen are skipped in one step, so the loop runs at
    /// most once per pending block plus once per run.
    fn give_up_through(&mut self, through: u64) {
        let through = through.min(MAX_BLOCK);
        loop {
            let session = self.session.as_mut().expect("session present");
            if session.base > through {
                break;
            }
            let base = session.base;
            match session.pending.remove(&base) {
                Some(b) if b.decoded => {
                    session.base = base.saturating_add(1);
                    self.unpack_block(base, &b.buf[..b.data_len]);
                    self.recycle(b.buf);
                    continue;
                }
                Some(_) => {
                    self.stats.blocks_lost += 1;
                    session.base = base.saturating_add(1);
                }
                None => {
                    // Jump over the whole run of blocks never seen.
                    let after = through.saturating_add(1);
                    let next = session
                        .pending
                        .keys()
                        .next()
                        .copied()
                        .unwrap_or(after)
                        .min(after);
                    let counted_from = base.max(session.first_block);
                    self.stats.blocks_missing = self
                        .stats
                        .blocks_missing
                        .saturating_add(next.saturating_sub(counted_from));
                    session.base = next;
                }
            }
            session.partial = None;
        }
        self.deliver_ready();
    }

    /// When `handle_timeout` should next run, if anything waits on time.
    pub fn poll_timeout(&self) -> Option<Nanos> {
        let blocks = self.session.as_ref().and_then(|session| {
            let after = session.base.saturating_add(1);
            let limit = self.wait_limit();
            // A base block whose shards are still arriving is not given up
            // before it has had none for the wait limit (`handle_timeout`).
            let base = session.pending.get(&session.base).filter(|b| !b.decoded);
            // A later block complete for the wait limit, on the wait clock.
            let witness = session
                .pending
                .range(after..)
                .filter_map(|(_, b)| b.decoded_at)
                .min()
                .map(|t| {
                    let quiet = base.map_or(0, |b| b.last_shard_wait);
                    self.real_time_of(t.max(quiet).saturating_add(limit))
                });
            // A heartbeat vouching for the base, the wait limit ago.
            let vouched = session
                .checks
                .iter()
                .filter(|c| c.0 > session.base)
                .map(|c| c.1)
                .min()
                .map(|t| {
                    let quiet = base.map_or(0, |b| b.last_shard_at);
                    t.max(quiet).saturating_add(limit)
                });
            witness.into_iter().chain(vouched).min()
        });
        [blocks, self.takeover_at(), self.jump_at()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The wait clock at real time `now`: the last datagram's, plus the
    /// silence since then as it counts (module documentation).
    fn wait_time(&self, now: Nanos) -> Nanos {
        let Some(last) = self.wait_last else {
            return self.wait_now;
        };
        let silence = now.saturating_sub(last);
        let counted = if silence > self.silence_max() {
            silence
        } else {
            silence.min(self.silence_step())
        };
        self.wait_now.saturating_add(counted)
    }

    /// The earliest real time at which the wait clock reaches `due`
    /// (the inverse of [`Decoder::wait_time`]) if no datagram comes.
    fn real_time_of(&self, due: Nanos) -> Nanos {
        let last = self.wait_last.unwrap_or(0);
        let need = due.saturating_sub(self.wait_now);
        if need <= self.silence_step() {
            last.saturating_add(need)
        } else {
            last.saturating_add(need.max(self.silence_max().saturating_add(1)))
        }
    }

    /// The most a silence counts before it is longer than `silence_max`.
    fn silence_step(&self) -> Nanos {
        SILENCE_STEP.max((2.0 * self.interarrival) as Nanos)
    }

    /// A silence longer than this counts in full: twice the live sender's
    /// heartbeat interval, at least [`SILENCE_MAX_MIN`] and at most
    /// [`TAKEOVER_SILENCE_MAX`]. A live sender is never silent that long.
    pub fn silence_max(&self) -> Nanos {
        self.session
            .as_ref()
            .map_or(DEFAULT_HEARTBEAT_GAP, |s| s.heartbeat_gap)
            .saturating_mul(2)
            .clamp(SILENCE_MAX_MIN, TAKEOVER_SILENCE_MAX)
    }

    /// How long a missing block is waited for once a later block is
    /// complete: `block_timeout`, or longer on a slow link, where a block
    /// that needs parity completes up to 16 interleave rounds (about 128
    /// datagrams) after its neighbours.
    fn wait_limit(&self) -> Nanos {
        self.cfg
            .block_timeout
            .max((256.0 * self.interarrival) as Nanos)
    }

    /// Gives up blocks that a later block has outwaited by the wait limit,
    /// and lets a corroborated candidate session or window jump through
    /// once the live session's silence allows it.
    pub fn handle_timeout(&mut self, now: Nanos) {
        self.try_takeover(now);
        self.try_jump(now);
        loop {
            let Some(session) = self.session.as_ref() else {
                return;
            };
            let base = session.base;
            let limit = self.wait_limit();
            let wait_now = self.wait_time(now);
            // Two routes, each with its own clock. A later block complete
            // for the wait limit on the wait clock (a silence of the link
            // counts little: the missing shards may be behind it). Or a
            // heartbeat, which the sender sends only once every scheduled
            // shard of the blocks below its next_block is out, received the
            // wait limit ago in real time (nothing of those blocks is still
            // on its way but reordered shards). Everything below the
            // furthest of these that is not decoded is given up, in one step.
            let waited = |t: Nanos| wait_now >= t.saturating_add(limit);
            let real = |t: Nanos| now >= t.saturating_add(limit);
            let witness = session
                .pending
                .range(base.saturating_add(1)..)
                .filter(|(_, b)| b.decoded_at.is_some_and(waited))
                .map(|(k, _)| *k)
                .next_back();
            let vouched = session
                .checks
                .iter()
                .filter(|c| c.0 > base && real(c.1))
                .map(|c| c.0)
                .max();
            let blocked = !session.pending.get(&base).is_some_and(|b| b.decoded);
            if !blocked {
                return;
            }
            // Invariant: a block is given up by the timeout only once it has
            // had no shard for the wait limit, measured from its own last
            // shard (on the clock of the route). A short final interleave
            // group completes its small last block long before its
            // round-robin neighbours, whose shards are still arriving; they
            // must not become link loss. Each of a block's k + m shards is
            // accepted once, so a block holds the base back for at most
            // (k + m) x the wait limit, and the window
            // (`max_blocks_in_flight`) still bounds what is pending.
            let through = |until: Option<u64>, quiet: &dyn Fn(&PendingBlock) -> bool| {
                let until = until?;
                let arriving = session
                    .pending
                    .range(base..until)
                    .find(|(_, b)| !b.decoded && !quiet(b))
                    .map(|(k, _)| *k);
                match arriving {
                    Some(first) if first <= base => None,
                    Some(first) => Some(first - 1),
                    None => Some(until.saturating_sub(1)),
                }
            };
            let through = through(witness, &|b| waited(b.last_shard_wait))
                .max(through(vouched, &|b| real(b.last_shard_at)));
            let Some(through) = through else {
                return;
            };
            self.give_up_through(through);
        }
    }

    fn unpack_block(&mut self, number: u64, data: &[u8]) {
        self.unpack_entries(number, data);
        self.flush_recovered();
    }

    fn unpack_entries(&mut self, number: u64, data: &[u8]) {
        let mut first_entry = true;
        for entry in Entries::new(data) {
            let continues = first_entry;
            first_entry = false;
            let entry = match entry {
                Ok(e) => e,
                Err(_) => {
                    self.stats.bad_entries += 1;
                    self.session_mut().partial = None;
                    return;
                }
            };
            match entry {
                Entry::StreamInfo(bytes) => match postcard::from_bytes::<StreamInfo>(bytes) {
                    Ok(info) => self.learn_stream(&info),
                    Err(_) => self.stats.bad_entries += 1,
                },
                Entry::Record(bytes) => {
                    self.drop_partial();
                    self.handle_record(bytes);
                }
                Entry::GapNotice(bytes) => {
                    self.drop_partial();
                    match postcard::from_bytes::<GapNotice>(bytes) {
                        Ok(notice) => self.handle_gap_notice(notice),
                        Err(_) => self.stats.bad_entries += 1,
                    }
                }
                Entry::First { total, piece } => {
                    self.drop_partial();
                    if total as usize > self.cfg.max_record_size || piece.len() > total as usize {
                        self.stats.oversized_records += 1;
                        continue;
                    }
                    let total = total as usize;
                    let (bytes_head, at) = match bytes_head(piece, total) {
                        Some((head, at)) => (Some(head), at),
                        None => (None, 0),
                    };
                    let mut buf = Vec::with_capacity(total - at);
                    buf.extend_from_slice(&piece[at..]);
                    self.session_mut().partial = Some(Partial {
                        block: number,
                        total: total - at,
                        buf,
                        bytes_head,
                    });
                }
                Entry::Middle(piece) | Entry::Last(piece) => {
                    let last = matches!(entry, Entry::Last(_));
                    let session = self.session_mut();
                    let follows = continues
                        && session
                            .partial
                            .as_ref()
                            .is_some_and(|p| p.block.checked_add(1) == Some(number));
                    let Some(partial) = session.partial.as_mut().filter(|_| follows) else {
                        self.drop_partial();
                        self.stats.orphan_fragments += 1;
                        continue;
                    };
                    if partial.buf.len() + piece.len() > partial.total
                        || (last && partial.buf.len() + piece.len() != partial.total)
                    {
                        self.drop_partial();
                        self.stats.bad_entries += 1;
                        continue;
                    }
                    partial.buf.extend_from_slice(piece);
                    partial.block = number;
                    if last {
                        let whole = session.partial.take().expect("checked above");
                        match whole.bytes_head {
                            Some(head) => self.handle_bytes_record(head, whole.buf),
                            None => self.handle_record(&whole.buf),
                        }
                    }
                }
            }
        }
    }

    /// Keeps a delivered block's buffer, bytes and all, for a later block
    /// ([`block_buffer`]).
    fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare_buffers.len() < SPARE_BUFFERS {
            self.spare_buffers.push(buf);
        }
    }

    fn session_mut(&mut self) -> &mut Session {
        self.session.as_mut().expect("session present")
    }

    fn drop_partial(&mut self) {
        if self.session_mut().partial.take().is_some() {
            self.stats.orphan_fragments += 1;
        }
    }

    fn handle_record(&mut self, bytes: &[u8]) {
        match postcard::from_bytes(bytes) {
            Ok(record) => self.handle_decoded(record),
            Err(_) => self.stats.bad_entries += 1,
        }
    }

    /// A gathered `Bytes` record: `data` holds its data and then its `end`
    /// byte, which postcard would accept only as 0 or 1.
    fn handle_bytes_record(&mut self, head: BytesHead, mut data: Vec<u8>) {
        let end = match data.pop() {
            Some(0) => false,
            Some(1) => true,
            _ => {
                self.stats.bad_entries += 1;
                return;
            }
        };
        self.handle_decoded(Record {
            stream: head.stream,
            seq: head.seq,
            resent: head.resent,
            body: RecordBody::Bytes(crate::record::Chunk { data, end }),
        });
    }

    fn handle_decoded(&mut self, record: Record) {
        if record.seq > MAX_SEQ {
            self.stats.bad_entries += 1;
            return;
        }
        let session = self.session.as_ref().expect("session present");
        let Some(meta) = session.streams.get(&record.stream).cloned() else {
            self.stats.unknown_stream_records += 1;
            return;
        };
        let session_id = session.id;
        let Some(expected) = self.prepare_cursor(&meta) else {
            return;
        };
        // Delivered after later records of its stream (it fills a gap).
        let mut late = record.resent;
        if record.seq < expected || (record.resent && record.seq != expected) {
            // A resent record only fills a gap; it never moves the stream
            // on. A record sent again by a new session from the sender's
            // spool (the old one died with blocks half sent, some of them
            // lost) fills an open gap the same way, or is a duplicate.
            if record.seq > expected {
                self.stats.resent_ahead += 1;
                return;
            }
            if !self.take_from_open_gap(&meta.name, record.seq) {
                if record.resent {
                    self.stats.resent_duplicate += 1;
                } else {
                    self.stats.duplicate_records += 1;
                }
                return;
            }
            if record.resent {
                self.stats.resent_recovered += 1;
            } else {
                self.stats.spool_recovered += 1;
            }
            late = true;
            self.note_recovered(&meta.name, record.seq);
        } else {
            if record.seq > expected {
                self.emit_gap(&meta.name, expected, record.seq - 1, None);
            }
            self.advance(&meta.name, record.seq);
        }
        self.stats.records += 1;
        self.events.push_back(Event::Record(Delivered {
            stream: meta.name.clone(),
            source_type: meta.source_type.clone(),
            session: session_id,
            epoch: meta.epoch,
            seq: record.seq,
            resent: late,
            body: record.body,
        }));
    }

    fn handle_gap_notice(&mut self, notice: GapNotice) {
        let Some(meta) = self.session_mut().streams.get(&notice.stream).cloned() else {
            self.stats.unknown_stream_records += 1;
            return;
        };
        self.stats.gap_notices += 1;
        if notice.to > MAX_SEQ {
            self.stats.bad_entries += 1;
            return;
        }
        let Some(expected) = self.prepare_cursor(&meta) else {
            return;
        };
        if notice.to < expected || notice.from > notice.to {
            return;
        }
        if notice.from > expected {
            self.emit_gap(&meta.name, expected, notice.from - 1, None);
        }
        let cause = match notice.cause {
            NoticeCause::SpoolOverflow => GapCause::SenderSpoolOverflow,
            NoticeCause::SpoolDamaged => GapCause::SenderSpoolDamaged,
            NoticeCause::SpoolCorrupt => GapCause::SenderSpoolCorrupt,
        };
        self.emit_gap(
            &meta.name,
            notice.from.max(expected),
            notice.to,
            Some(cause),
        );
        self.advance(&meta.name, notice.to);
    }

    /// Brings a stream's cursor into the current session and epoch and
    /// returns the next sequence expected, or None when the stream is over
    /// the `max_streams` bound.
    fn prepare_cursor(&mut self, meta: &StreamMeta) -> Option<u64> {
        let session_id = self.session.as_ref().expect("session present").id;
        if !self.cursors.contains_key(&meta.name) && self.cursors.len() >= self.cfg.max_streams {
            self.stats.streams_rejected += 1;
            return None;
        }
        let cursor = self.cursors.entry(meta.name.clone()).or_insert(Cursor {
            session: None,
            epoch: None,
            last: None,
            fresh: true,
            restored: false,
        });
        cursor.session = Some(session_id);
        if cursor.epoch != Some(meta.epoch) {
            // A cursor without an epoch (older state) adopts this one.
            if let (Some(_), Some(last)) = (cursor.epoch, cursor.last) {
                self.stats.sequence_resets += 1;
                self.events.push_back(Event::SequenceReset {
                    stream: meta.name.clone(),
                    last_delivered: last,
                    first_seq: meta.first_seq,
                });
                cursor.last = None;
            }
            cursor.epoch = Some(meta.epoch);
        }
        // A restored cursor comes from disk: saturate rather than wrap.
        Some(cursor.last.map_or(meta.first_seq, |l| l.saturating_add(1)))
    }

    fn advance(&mut self, stream: &Arc<str>, to: u64) {
        let cursor = self.cursors.get_mut(stream).expect("prepared");
        cursor.last = Some(to);
        cursor.fresh = false;
    }

    /// Reports `from..=to` of `stream` as lost and remembers it as open, so
    /// a resend can fill it. Without a given cause: records sent while this
    /// receiver was away are `ReceiverDown`, anything else `LinkLoss`.
    fn emit_gap(&mut self, stream: &Arc<str>, from: u64, to: u64, cause: Option<GapCause>) {
        let joined_late = self.session.as_ref().is_some_and(|s| s.joined_late);
        let cursor = self.cursors.get(stream).expect("prepared");
        let cause = cause.unwrap_or(if cursor.fresh && (cursor.restored || joined_late) {
            GapCause::ReceiverDown
        } else {
            GapCause::LinkLoss
        });
        let session = self.session.as_ref().map_or(0, |s| s.id);
        let epoch = cursor.epoch.unwrap_or(0);
        let gap = Gap {
            stream: stream.clone(),
            session,
            epoch,
            from,
            to,
            cause,
        };
        self.stats.gaps += 1;
        self.stats.gap_records = self.stats.gap_records.saturating_add(gap.records());
        self.remember_open_gap(stream, from, to);
        self.events.push_back(Event::Gap(gap));
    }

    fn remember_open_gap(&mut self, stream: &Arc<str>, from: u64, to: u64) {
        let gaps = self.open_gaps.entry(stream.clone()).or_default();
        if gaps.len() >= MAX_OPEN_GAPS {
            gaps.remove(0);
            self.stats.open_gaps_forgotten += 1;
        }
        gaps.push((from, to));
    }

    /// Tells the decoder a gap is still open (from the audit log, at start),
    /// so a later resend can fill it.
    pub fn restore_open_gap(&mut self, stream: &str, from: u64, to: u64) {
        let name = self
            .cursors
            .get_key_value(stream)
            .map_or_else(|| Arc::from(stream), |(k, _)| k.clone());
        self.remember_open_gap(&name, from, to);
    }

    /// Forgets the stream's open gaps within `from..=to` (a gap partly in
    /// it keeps the rest): what those records carried arrived another way
    /// (a `files` sink completed their file from a resend under new
    /// sequence numbers), so no resend needs to fill them. Returns the
    /// records no longer open. A resent record in the range is then a
    /// duplicate (`resent_duplicate`), as for a gap already recovered.
    pub fn resolve_open_gaps(&mut self, stream: &str, from: u64, to: u64) -> u64 {
        let Some(gaps) = self.open_gaps.get_mut(stream) else {
            return 0;
        };
        let mut resolved = 0u64;
        let mut kept = Vec::with_capacity(gaps.len() + 1);
        for &(f, t) in gaps.iter() {
            if t < from || f > to {
                kept.push((f, t));
                continue;
            }
            let (cut_from, cut_to) = (f.max(from), t.min(to));
            resolved = resolved.saturating_add(cut_to - cut_from + 1);
            if f < cut_from {
                kept.push((f, cut_from - 1));
            }
            if cut_to < t {
                kept.push((cut_to + 1, t));
            }
        }
        while kept.len() > MAX_OPEN_GAPS {
            kept.remove(0);
            self.stats.open_gaps_forgotten += 1;
        }
        *gaps = kept;
        resolved
    }

    /// The gaps a resend can still fill, per stream (at most
    /// `MAX_OPEN_GAPS` each, oldest first): (stream, from, to).
    pub fn open_gaps(&self) -> impl Iterator<Item = (&str, u64, u64)> + '_ {
        self.open_gaps
            .iter()
            .flat_map(|(s, gaps)| gaps.iter().map(move |(f, t)| (&**s, *f, *t)))
    }

    /// Removes `seq` from the stream's open gaps; false if it is in none.
    fn take_from_open_gap(&mut self, stream: &Arc<str>, seq: u64) -> bool {
        let Some(gaps) = self.open_gaps.get_mut(stream) else {
            return false;
        };
        let Some(i) = gaps.iter().position(|(f, t)| *f <= seq && seq <= *t) else {
            return false;
        };
        let (from, to) = gaps[i];
        match (seq == from, seq == to) {
            (true, true) => {
                gaps.remove(i);
            }
            (true, false) => gaps[i].0 = seq + 1,
            (false, true) => gaps[i].1 = seq - 1,
            (false, false) => {
                gaps[i].1 = seq - 1;
                gaps.insert(i + 1, (seq + 1, to));
            }
        }
        true
    }

    /// Coalesces consecutive recovered sequences into one event.
    fn note_recovered(&mut self, stream: &Arc<str>, seq: u64) {
        match &mut self.recovered {
            Some((s, _, to)) if s == stream && to.checked_add(1) == Some(seq) => *to = seq,
            _ => {
                self.flush_recovered();
                self.recovered = Some((stream.clone(), seq, seq));
            }
        }
    }

    fn flush_recovered(&mut self) {
        if let Some((stream, from, to)) = self.recovered.take() {
            self.events.push_back(Event::Recovered { stream, from, to });
        }
    }

    /// Applies heartbeats whose blocks are all resolved: any stream whose
    /// heartbeat last sequence is past what was delivered lost the rest.
    fn apply_checks(&mut self) {
        loop {
            let session = self.session.as_mut().expect("session present");
            match session.checks.front() {
                Some((next_block, _, _)) if *next_block <= session.base => {}
                _ => return,
            }
            let (_, _, statuses) = session.checks.pop_front().expect("front exists");
            for status in statuses {
                let Some(last) = status.last_seq else {
                    continue;
                };
                if last > MAX_SEQ {
                    self.stats.bad_control += 1;
                    continue;
                }
                let Some(meta) = self.session_mut().streams.get(&status.info.id).cloned() else {
                    continue;
                };
                if meta.name.as_ref() != status.info.name {
                    self.stats.bad_control += 1;
                    continue;
                }
                let Some(expected) = self.prepare_cursor(&meta) else {
                    continue;
                };
                if last >= expected {
                    self.emit_gap(&meta.name, expected, last, None);
                    self.advance(&meta.name, last);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EncoderConfig, Point, Value, NANOS_PER_SEC};
    use proptest::prelude::*;

    fn test_key() -> crate::Key {
        crate::Key::from_bytes(&[0x42; crate::auth::KEY_LEN]).unwrap()
    }

    fn test_verifier() -> Verifier {
        Verifier::new(vec![test_key()]).unwrap()
    }

    /// Valid frames of a small session, to mutate.
    fn some_frames(signer: crate::Signer) -> Vec<Vec<u8>> {
        frames_signed(42, 0..300, signer)
    }

    /// Every frame a session with id `session` sends for records `seqs` of
    /// one stream "s".
    fn frames_of(session: u64, seqs: std::ops::Range<u64>) -> Vec<Vec<u8>> {
        frames_signed(session, seqs, crate::Signer::Key(test_key()))
    }

    fn frames_signed(
        session: u64,
        seqs: std::ops::Range<u64>,
        signer: crate::Signer,
    ) -> Vec<Vec<u8>> {
        frames_with(EncoderConfig::new(session), seqs, signer)
    }

    /// Every frame an encoder configured with `cfg` sends for records
    /// `seqs` of one stream "s".
    fn frames_with(
        cfg: EncoderConfig,
        seqs: std::ops::Range<u64>,
        signer: crate::Signer,
    ) -> Vec<Vec<u8>> {
        let mut enc = crate::Encoder::new(cfg, signer);
        let s = enc.add_stream("s", "generator", seqs.start, 7);
        enc.handle_timeout(0);
        for seq in seqs {
            let body = RecordBody::Point(Point {
                tag: "t".into(),
                ts_ns: 0,
                value: Value::I64(seq as i64),
                quality: 0,
                status: None,
            });
            enc.push(
                0,
                &Record {
                    stream: s,
                    seq,
                    resent: false,
                    body,
                },
            );
        }
        drain(&mut enc)
    }

    /// Flushes `enc` and returns every frame it then sends.
    fn drain(enc: &mut crate::Encoder) -> Vec<Vec<u8>> {
        enc.flush(0);
        let mut buf = vec![0; enc.max_frame_len()];
        let mut frames = Vec::new();
        while let Some(n) = enc.poll_frame(0, &mut buf) {
            frames.push(buf[..n].to_vec());
        }
        frames
    }

    /// Bodies that fit a block, span two, and span many (with the blocks
    /// partly filled by earlier records) give the same frames pushed as
    /// records or as stored bodies, and decode to the same records.
    #[test]
    fn a_stored_body_pushed_without_joining_its_head_sends_the_frames_of_the_record() {
        let sizes = [1usize, 300, 1300, 1500, 5000, 47_000, 70_000, 2, 64 << 10];
        let mut records: Vec<Record> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Record {
                stream: 0,
                seq: i as u64,
                resent: false,
                body: RecordBody::Bytes(crate::Chunk {
                    data: (0..n).map(|b| (b * 7 + i) as u8).collect(),
                    end: i % 2 == 0,
                }),
            })
            .collect();
        // A resend of a record already sent: its head carries the flag.
        records.push(Record {
            resent: true,
            ..records[1].clone()
        });
        let frames = |encoded: bool| {
            let mut enc =
                crate::Encoder::new(EncoderConfig::new(9), crate::Signer::Key(test_key()));
            enc.add_stream("s", "tcp", 0, 7);
            enc.handle_timeout(0);
            for r in &records {
                if encoded {
                    let body = postcard::to_allocvec(&r.body).unwrap();
                    enc.push_encoded(0, r.stream, r.seq, r.resent, &body);
                } else {
                    enc.push(0, r);
                }
            }
            drain(&mut enc)
        };
        let stored = frames(true);
        assert_eq!(stored, frames(false));
        let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
        for f in &stored {
            dec.handle_datagram(0, &mut f.clone());
        }
        let mut got = Vec::new();
        while let Some(ev) = dec.poll_event() {
            if let Event::Record(r) = ev {
                got.push((r.seq, r.body.clone()));
            }
        }
        // The resent record fills no gap and is not delivered again.
        let want: Vec<_> = records
            .iter()
            .filter(|r| !r.resent)
            .map(|r| (r.seq, r.body.clone()))
            .collect();
        assert_eq!(got, want);
    }

    /// Blocks decoded into the buffers of delivered blocks (which keep
    /// their bytes) come out with their own bytes only: each block loses
    /// its first two data shards, so they are rebuilt over an earlier
    /// block's bytes, and the blocks' data lengths differ. The frames go in
    /// block by block, so each block finds the last one's buffer spare.
    #[test]
    fn a_block_rebuilt_in_a_reused_buffer_delivers_its_own_bytes() {
        let records: Vec<Record> = (0..40u64)
            .map(|seq| Record {
                stream: 0,
                seq,
                resent: false,
                body: RecordBody::Bytes(crate::Chunk {
                    data: (0..20_000 + 3_000 * (seq as usize % 7))
                        .map(|b| (b as u64 * 31 + seq * 7) as u8)
                        .collect(),
                    end: false,
                }),
            })
            .collect();
        let mut enc = crate::Encoder::new(EncoderConfig::new(9), crate::Signer::Key(test_key()));
        enc.add_stream("s", "tcp", 0, 7);
        enc.handle_timeout(0);
        for r in &records {
            enc.push(0, r);
            // Short blocks too: some blocks are flushed before they fill.
            if r.seq % 5 == 4 {
                enc.flush(0);
            }
        }
        let mut frames = drain(&mut enc);
        // Interleaved, every block would be pending before the first is
        // delivered and none would find a buffer spare: one block at a
        // time (control frames last).
        frames.sort_by_key(|f| FrameHeader::peek_block(f).map_or(u64::MAX, |(_, b)| b));
        let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
        let mut blocks = std::collections::BTreeSet::new();
        for f in &frames {
            if let Some((_, block)) = FrameHeader::peek_block(f) {
                blocks.insert(block);
                // The shard's index, bytes 24..26 of the header.
                if u16::from_be_bytes([f[24], f[25]]) < 2 {
                    continue;
                }
            }
            dec.handle_datagram(0, &mut f.clone());
        }
        let mut got = Vec::new();
        while let Some(ev) = dec.poll_event() {
            match ev {
                Event::Record(r) => got.push((r.seq, r.body.clone())),
                Event::Gap(g) => panic!("gap {g:?}"),
                _ => {}
            }
        }
        assert!(blocks.len() >= 10, "{} blocks", blocks.len());
        // Had each block taken a new buffer, all of theirs would be spare.
        assert_eq!(dec.spare_buffers.len(), 1, "one buffer went round");
        let want: Vec<_> = records.iter().map(|r| (r.seq, r.body.clone())).collect();
        assert_eq!(got, want);
        assert_eq!(dec.stats().blocks_repaired, blocks.len() as u64);
    }

    proptest! {
        /// The head of a `Bytes` record read from its first piece, cut
        /// anywhere, is the head postcard decodes, and the data starts
        /// where it says; a piece cut inside the head leaves the record to
        /// postcard, and no other kind is taken for `Bytes`.
        #[test]
        fn a_bytes_records_head_read_from_its_first_piece_is_the_one_postcard_decodes(
            stream in any::<u32>(),
            seq in any::<u64>(),
            resent in any::<bool>(),
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            end in any::<bool>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let record = Record {
                stream,
                seq,
                resent,
                body: RecordBody::Bytes(crate::Chunk { data: data.clone(), end }),
            };
            let bytes = postcard::to_allocvec(&record).unwrap();
            let head_len = bytes.len() - data.len() - 1;
            let piece = cut.index(bytes.len()) + 1;
            match bytes_head(&bytes[..piece], bytes.len()) {
                Some((head, at)) => {
                    prop_assert_eq!(head, BytesHead { stream, seq, resent });
                    prop_assert_eq!(at, head_len);
                    prop_assert_eq!(&bytes[at..bytes.len() - 1], &data[..]);
                }
                None => prop_assert!(piece < head_len, "a whole head is read"),
            }
            let point = Record {
                stream,
                seq,
                resent,
                body: RecordBody::Point(Point {
                    tag: "t".repeat(data.len()),
                    ts_ns: 1,
                    value: Value::F64(2.5),
                    quality: 0,
                    status: None,
                }),
            };
            let bytes = postcard::to_allocvec(&point).unwrap();
            let piece = cut.index(bytes.len()) + 1;
            prop_assert_eq!(bytes_head(&bytes[..piece], bytes.len()), None);
        }

        #[test]
        fn decoder_survives_arbitrary_datagrams(datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1600), 0..40)) {
            let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
            for (i, d) in datagrams.iter().enumerate() {
                dec.handle_datagram(i as Nanos, &mut d.to_vec());
                dec.handle_timeout(i as Nanos * 1_000_000_000);
                while dec.poll_event().is_some() {}
            }
            prop_assert_eq!(dec.stats().datagrams, datagrams.len() as u64);
        }

        #[test]
        fn decoder_survives_mutated_valid_frames(seed in any::<u64>(), mutations in 1usize..8) {
            // Unauthenticated frames, so a mutation with a re-sealed CRC
            // reaches the parsers behind the tag check.
            let frames = some_frames(crate::Signer::Disabled);
            let mut rng = seed | 1;
            let mut next = move || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng as usize };
            let mut dec = Decoder::new(DecoderConfig::default(), Verifier::disabled());
            for f in &frames {
                let mut f = f.clone();
                for _ in 0..mutations {
                    let i = next() % f.len();
                    f[i] = next() as u8;
                }
                // Re-seal the CRC so the mutation reaches the parsers behind it.
                if next() % 2 == 0 && f.len() >= crate::frame::HEADER_LEN + crate::frame::CRC_LEN {
                    let end = f.len() - 4;
                    let crc = crc32fast::hash(&f[..end]);
                    f[end..].copy_from_slice(&crc.to_be_bytes());
                }
                dec.handle_datagram(0, &mut f.to_vec());
                while dec.poll_event().is_some() {}
            }
            dec.handle_timeout(u64::MAX / 2);
            while dec.poll_event().is_some() {}
        }
    }

    #[test]
    fn frames_failing_authentication_are_counted_by_reason_and_change_nothing() {
        let genuine = some_frames(crate::Signer::Key(test_key()));
        let other_key = crate::Key::from_bytes(&[7; crate::auth::KEY_LEN]).unwrap();
        let forged = some_frames(crate::Signer::Key(other_key));
        let unauthenticated = some_frames(crate::Signer::Disabled);
        let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
        for f in forged.iter().chain(&unauthenticated) {
            dec.handle_datagram(0, &mut f.to_vec());
        }
        // Forged with the genuine key's id and a valid CRC.
        let mut bad_tag = forged[0].clone();
        bad_tag[4..8].copy_from_slice(&test_key().id().0.to_be_bytes());
        let end = bad_tag.len() - 4;
        let crc = crc32fast::hash(&bad_tag[..end]);
        bad_tag[end..].copy_from_slice(&crc.to_be_bytes());
        dec.handle_datagram(0, &mut bad_tag.to_vec());
        dec.handle_timeout(10 * crate::NANOS_PER_SEC);
        assert_eq!(dec.poll_event(), None, "a rejected frame produced an event");
        let s = dec.stats().clone();
        assert_eq!(s.rejected_unknown_key, forged.len() as u64);
        assert_eq!(s.rejected_unauthenticated, unauthenticated.len() as u64);
        assert_eq!(s.rejected_bad_tag, 1);
        assert_eq!((s.shards_accepted, s.control_frames), (0, 0));
        // The genuine session is then delivered in full.
        for f in &genuine {
            dec.handle_datagram(0, &mut f.to_vec());
        }
        let mut records = 0;
        while let Some(ev) = dec.poll_event() {
            records += matches!(ev, Event::Record(_)) as usize;
        }
        assert_eq!(records, 300);
        // A receiver with authentication off refuses tagged frames.
        let mut off = Decoder::new(DecoderConfig::default(), Verifier::disabled());
        off.handle_datagram(0, &mut genuine[0].to_vec());
        assert_eq!(off.stats().rejected_auth_disabled, 1);
        assert_eq!(off.poll_event(), None);
    }

    #[test]
    fn each_rejection_reason_is_counted() {
        let frames = some_frames(crate::Signer::Key(test_key()));
        let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
        dec.handle_datagram(0, &mut b"short".to_vec());
        let mut bad_magic = frames[0].clone();
        bad_magic[0] = b'X';
        dec.handle_datagram(0, &mut bad_magic.to_vec());
        let mut bad_crc = frames[0].clone();
        *bad_crc.last_mut().unwrap() ^= 1;
        dec.handle_datagram(0, &mut bad_crc.to_vec());
        dec.handle_datagram(0, &mut frames[1].to_vec());
        dec.handle_datagram(0, &mut frames[1].to_vec());
        let s = dec.stats();
        assert_eq!(
            (s.rejected_truncated, s.rejected_bad_magic, s.rejected_crc),
            (1, 1, 1)
        );
        assert_eq!(s.replayed, 1);
    }

    /// A CRC-valid frame with any header, as a hostile sender would write.
    fn forged(session: u64, block: u64, k: u16, m: u16, index: u16, shard: &[u8]) -> Vec<u8> {
        let header = FrameHeader {
            flags: 0,
            session,
            block,
            index,
            k,
            m,
            shard_len: shard.len() as u16,
            data_len: shard.len() as u32,
        };
        let mut buf = vec![0u8; shard.len() + crate::frame::FRAME_OVERHEAD];
        let n = header.write(shard, &mut buf, &crate::Signer::Key(test_key()));
        buf.truncate(n);
        buf
    }

    /// A control frame carrying `hb`, as a hostile sender would write it.
    fn forged_heartbeat(control_seq: u64, hb: &Heartbeat) -> Vec<u8> {
        let body = postcard::to_allocvec(&Control::Heartbeat(hb.clone())).unwrap();
        let header = FrameHeader {
            flags: crate::frame::FLAG_CONTROL,
            session: hb.session,
            block: control_seq,
            index: 0,
            k: 1,
            m: 0,
            shard_len: body.len() as u16,
            data_len: body.len() as u32,
        };
        let mut buf = vec![0u8; body.len() + crate::frame::FRAME_OVERHEAD];
        let n = header.write(&body, &mut buf, &crate::Signer::Key(test_key()));
        buf.truncate(n);
        buf
    }

    /// Runs `work` on its own thread and fails the test if it does not end
    /// within 20 s (the old decoder spun forever on these inputs).
    fn finishes_in_time<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(work());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20))
            .expect("the decoder hung (or panicked) on hostile input")
    }

    fn delivered_seqs(dec: &mut Decoder) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Some(ev) = dec.poll_event() {
            if let Event::Record(r) = ev {
                seqs.push(r.seq);
            }
        }
        seqs
    }

    #[test]
    fn a_block_u64_max_frame_then_frames_of_another_session_do_not_hang_the_decoder() {
        let live = frames_of(42, 0..300);
        let other = frames_of(43, 0..30_000);
        assert!(other.len() >= 40);
        let (seqs, later) = finishes_in_time(move || {
            let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
            for f in &live {
                dec.handle_datagram(0, &mut f.to_vec());
            }
            let mut seqs = delivered_seqs(&mut dec);
            // Shaped like a real RS(64,16) shard, so it waits for more.
            dec.handle_datagram(0, &mut forged(42, u64::MAX, 64, 16, 0, &[0u8; 1416]));
            // Session 43 sends a frame a millisecond once 42 has been silent
            // for 2 s, the takeover silence of an unauthenticated sender.
            let at = |i: usize| 2 * NANOS_PER_SEC + i as Nanos * crate::NANOS_PER_MILLI;
            for (i, f) in other[..40].iter().enumerate() {
                dec.handle_datagram(at(i), &mut f.to_vec());
                dec.handle_timeout(at(i));
            }
            seqs.extend(delivered_seqs(&mut dec));
            // The new session took over once the old one fell silent, and
            // still decodes what comes next, although its small last block
            // completed long before its interleaved neighbours.
            for (i, f) in other.iter().enumerate().skip(40) {
                dec.handle_datagram(at(i), &mut f.to_vec());
                dec.handle_timeout(at(i));
            }
            dec.handle_timeout(200 * NANOS_PER_SEC);
            (seqs, delivered_seqs(&mut dec))
        });
        let all: Vec<u64> = seqs.into_iter().chain(later).collect();
        assert_eq!(all, (0..30_000).collect::<Vec<_>>());
    }

    #[test]
    fn a_heartbeat_announcing_a_far_ahead_next_block_neither_hangs_nor_moves_the_window() {
        let frames = frames_of(42, 0..3000);
        let (first, second) = frames.split_at(frames.len() / 3);
        let (first, second) = (first.to_vec(), second.to_vec());
        let seqs = finishes_in_time(move || {
            let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
            for f in &first {
                dec.handle_datagram(0, &mut f.to_vec());
            }
            let hb = Heartbeat {
                session: 42,
                uptime_ms: 0,
                next_block: 1 << 40,
                config_hash: String::new(),
                counters: Vec::new(),
                part: 0,
                parts: 1,
                streams: Vec::new(),
            };
            dec.handle_datagram(0, &mut forged_heartbeat(1000, &hb));
            dec.handle_timeout(NANOS_PER_SEC);
            // The real sender goes on.
            for f in &second {
                dec.handle_datagram(NANOS_PER_SEC, &mut f.to_vec());
            }
            dec.handle_timeout(2 * NANOS_PER_SEC);
            delivered_seqs(&mut dec)
        });
        assert_eq!(seqs, (0..3000).collect::<Vec<_>>());
    }

    #[test]
    fn a_heartbeat_claiming_last_seq_u64_max_is_rejected_without_overflow() {
        let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
        for f in frames_of(42, 0..300) {
            dec.handle_datagram(0, &mut f.to_vec());
        }
        while dec.poll_event().is_some() {}
        let info = StreamInfo {
            id: 0,
            name: "s".into(),
            source_type: "generator".into(),
            first_seq: 0,
            epoch: 7,
        };
        let hb = Heartbeat {
            session: 42,
            uptime_ms: 0,
            next_block: 0,
            config_hash: String::new(),
            counters: Vec::new(),
            part: 0,
            parts: 1,
            streams: vec![StreamStatus {
                info,
                last_seq: Some(u64::MAX),
            }],
        };
        dec.handle_datagram(0, &mut forged_heartbeat(1000, &hb));
        dec.handle_timeout(NANOS_PER_SEC);
        assert_eq!(dec.stats().gaps, 0);
        assert_eq!(dec.stats().gap_records, 0);
        assert!(dec.stats().bad_control >= 1);
    }

    #[test]
    fn frames_with_fec_shapes_beyond_the_receiver_limits_are_rejected_and_counted() {
        let mut dec = Decoder::new(
            DecoderConfig {
                max_data_shards: 64,
                max_parity_shards: 32,
                ..DecoderConfig::default()
            },
            test_verifier(),
        );
        dec.handle_datagram(0, &mut forged(42, 0, 255, 1, 0, &[0u8; 64]));
        dec.handle_datagram(0, &mut forged(42, 0, 64, 33, 0, &[0u8; 64]));
        dec.handle_datagram(0, &mut forged(42, 0, 64, 32, 0, &[0u8; 64]));
        assert_eq!(dec.stats().rejected_fec_shape, 2);
    }

    #[test]
    fn rebuilt_shards_per_block_fill_their_histogram_buckets_and_the_maxima() {
        // Small shards, so 3000 records fill several blocks.
        let cfg = EncoderConfig {
            shard_size: 128,
            ..EncoderConfig::new(42)
        };
        let frames = frames_with(cfg, 0..3000, crate::Signer::Key(test_key()));
        // Each data block's (k, m), in the order the encoder sent them.
        let mut blocks: Vec<(u64, usize, usize)> = Vec::new();
        for f in &frames {
            let (h, _) = FrameHeader::parse(&mut f.to_vec(), &mut test_verifier()).unwrap();
            if !h.is_control() && !blocks.iter().any(|b| b.0 == h.block) {
                blocks.push((h.block, h.k as usize, h.m as usize));
            }
        }
        // Lose 1 data shard of one block, 3 of another and all the parity
        // can cover (m) of a third; the other blocks lose nothing.
        let usable: Vec<_> = blocks.iter().filter(|b| b.1 >= b.2 && b.2 >= 3).collect();
        assert!(
            usable.len() >= 3,
            "need 3 blocks with k >= m >= 3: {blocks:?}"
        );
        let (full, full_m) = (usable[2].0, usable[2].2);
        let lose = [(usable[0].0, 1), (usable[1].0, 3), (full, full_m)];
        let lost = |h: &FrameHeader| {
            lose.iter()
                .any(|&(b, n)| h.block == b && !h.is_control() && (h.index as usize) < n)
        };
        let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
        for f in &frames {
            let (h, _) = FrameHeader::parse(&mut f.to_vec(), &mut test_verifier()).unwrap();
            if !lost(&h) {
                dec.handle_datagram(0, &mut f.to_vec());
            }
        }
        dec.handle_timeout(NANOS_PER_SEC);
        assert_eq!(delivered_seqs(&mut dec), (0..3000).collect::<Vec<_>>());
        let s = dec.stats();
        assert_eq!(s.blocks_decoded, blocks.len() as u64);
        assert_eq!(s.blocks_repaired, 3);
        assert_eq!(s.shards_rebuilt, 1 + 3 + full_m as u64);
        let mut expected = [0u64; REBUILT_BUCKETS.len()];
        expected[0] = blocks.len() as u64 - 3;
        expected[1] += 1;
        expected[2] += 1;
        expected[(usize::BITS - full_m.leading_zeros()) as usize] += 1;
        assert_eq!(s.rebuilt_per_block, expected);
        assert_eq!(s.rebuilt_per_block.iter().sum::<u64>(), s.blocks_decoded);
        assert_eq!(s.shards_rebuilt_max, full_m.max(3) as u64);
        assert_eq!(s.parity_used_max_pct, 100);
        let names: Vec<_> = s.rebuilt_histogram().iter().map(|b| b.0).collect();
        assert_eq!(names, REBUILT_BUCKETS);
        let fields = s.fields();
        assert!(fields.contains(&("shards_rebuilt_max", full_m.max(3) as u64)));
        assert!(fields.contains(&("parity_used_max_pct", 100)));
    }

    #[test]
    fn rebuilt_counts_land_in_power_of_two_buckets_and_the_parity_share_rounds_down() {
        let mut s = DecoderStats::default();
        for (rebuilt, bucket) in [
            (0, "0"),
            (1, "1"),
            (2, "2-3"),
            (3, "2-3"),
            (4, "4-7"),
            (7, "4-7"),
            (8, "8-15"),
            (15, "8-15"),
            (16, "16-31"),
            (31, "16-31"),
            (32, "32-63"),
            (63, "32-63"),
            (64, "64+"),
            (200, "64+"),
        ] {
            let before = s.rebuilt_histogram();
            s.note_decoded(rebuilt, 255);
            let after = s.rebuilt_histogram();
            let grew: Vec<_> = (0..after.len())
                .filter(|&i| after[i].1 > before[i].1)
                .map(|i| after[i].0)
                .collect();
            assert_eq!(grew, [bucket], "{rebuilt} rebuilt");
        }
        assert_eq!(s.shards_rebuilt_max, 200);
        assert_eq!(s.parity_used_max_pct, 200 * 100 / 255);
        // 12 of 16 parity used is 75 %; 2 of 3 rounds down to 66.
        let mut s = DecoderStats::default();
        s.note_decoded(12, 16);
        assert_eq!((s.shards_rebuilt_max, s.parity_used_max_pct), (12, 75));
        s.note_decoded(2, 3);
        assert_eq!((s.shards_rebuilt_max, s.parity_used_max_pct), (12, 75));
        s.note_decoded(13, 13);
        assert_eq!((s.shards_rebuilt_max, s.parity_used_max_pct), (13, 100));
        assert_eq!(s.blocks_decoded, 3);
        assert_eq!(s.blocks_repaired, 3);
    }

    #[test]
    fn replayed_shards_and_heartbeats_are_counted_and_never_decoded_twice() {
        let frames = frames_of(42, 0..3000);
        let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
        for f in &frames {
            dec.handle_datagram(0, &mut f.to_vec());
        }
        dec.handle_timeout(NANOS_PER_SEC);
        let before = dec.stats().clone();
        // Everything again: delivered blocks are stale, heartbeats replayed.
        for f in &frames {
            dec.handle_datagram(2 * NANOS_PER_SEC, &mut f.to_vec());
        }
        dec.handle_timeout(3 * NANOS_PER_SEC);
        let after = dec.stats();
        assert_eq!(after.records, before.records);
        assert_eq!(after.heartbeats, before.heartbeats);
        assert_eq!(after.duplicate_records, before.duplicate_records);
        assert_eq!(
            (after.stale - before.stale) + (after.replayed - before.replayed),
            frames.len() as u64
        );
        assert!(after.replayed > before.replayed, "heartbeats are replays");
        assert_eq!(delivered_seqs(&mut dec), (0..3000).collect::<Vec<_>>());
    }

    #[test]
    fn unneeded_parity_is_dropped_on_its_header_before_crc_and_tag_and_other_frames_are_still_checked(
    ) {
        let frames = frames_of(42, 0..3000);
        let data = |f: &Vec<u8>| FrameHeader::peek_block(f).is_some();
        let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
        for f in &frames {
            dec.handle_datagram(0, &mut f.to_vec());
        }
        dec.handle_timeout(NANOS_PER_SEC);
        let delivered = dec.stats().clone();
        assert!(delivered.records == 3000 && delivered.stale > 0);
        // A frame of a delivered block with its CRC and tag destroyed: it
        // could change nothing, and is counted stale without being read,
        // but for one in SPOT_CHECK, which is checked anyway.
        let mut old = frames.iter().find(|f| data(f)).unwrap().clone();
        let end = old.len();
        old[end - 20..].fill(0xA5);
        for _ in 0..SPOT_CHECK {
            dec.handle_datagram(2 * NANOS_PER_SEC, &mut old.clone());
        }
        let s = dec.stats().clone();
        assert_eq!(s.stale, delivered.stale + SPOT_CHECK - 1);
        assert_eq!((s.rejected_crc, s.rejected_bad_tag), (1, 0));
        // The same damage to a block not yet seen is checked and rejected,
        // and so is a heartbeat, which is never judged by its header.
        let mut fresh = forged(42, 10_000, 4, 2, 0, &[7; 64]);
        let end = fresh.len();
        fresh[end - 4..].fill(0xA5);
        dec.handle_datagram(2 * NANOS_PER_SEC, &mut fresh);
        let mut heartbeat = frames.iter().find(|f| !data(f)).unwrap().clone();
        let end = heartbeat.len();
        heartbeat[end - 4..].fill(0xA5);
        dec.handle_datagram(2 * NANOS_PER_SEC, &mut heartbeat);
        assert_eq!(dec.stats().rejected_crc, 3);
        assert_eq!(delivered_seqs(&mut dec), (0..3000).collect::<Vec<_>>());
    }

    /// A block rebuilt while an earlier one is missing: its late shards are
    /// surplus, counted on their header's word; the block is still
    /// delivered once the earlier one is in.
    #[test]
    fn late_shards_of_a_rebuilt_block_waiting_for_an_earlier_one_are_surplus_and_unread() {
        let frames = frames_of(42, 0..20_000);
        let block_of = |f: &Vec<u8>| FrameHeader::peek_block(f).map(|(_, b)| b);
        let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
        // Everything but the first block, then the first block.
        let first = frames.iter().find_map(block_of).unwrap();
        let (zero, rest): (Vec<_>, Vec<_>) =
            frames.iter().partition(|f| block_of(f) == Some(first));
        assert!(!zero.is_empty() && rest.iter().any(|f| block_of(f) == Some(first + 1)));
        for f in &rest {
            dec.handle_datagram(0, &mut f.to_vec());
        }
        let before = dec.stats().clone();
        let mut late = rest
            .iter()
            .find(|f| block_of(f) == Some(first + 1))
            .unwrap()
            .to_vec();
        let end = late.len();
        late[end - 4..].fill(0xA5);
        for _ in 0..SPOT_CHECK {
            dec.handle_datagram(0, &mut late.clone());
        }
        assert_eq!(
            dec.stats().surplus_shards,
            before.surplus_shards + SPOT_CHECK - 1
        );
        assert_eq!(dec.stats().rejected_crc, 1, "the spot check");
        for f in &zero {
            dec.handle_datagram(0, &mut f.to_vec());
        }
        dec.handle_timeout(NANOS_PER_SEC);
        assert_eq!(delivered_seqs(&mut dec), (0..20_000).collect::<Vec<_>>());
    }

    /// The frames of 20,000 records with the first block's parity held
    /// back and one of its data shards lost: the rest goes in at a frame a
    /// microsecond, so later blocks are rebuilt while the first one waits
    /// for its parity. Returns the decoder, the held parity and the time.
    fn first_block_waiting_for_its_parity() -> (Decoder, Vec<Vec<u8>>, Nanos) {
        let frames = frames_of(42, 0..20_000);
        let block_of = |f: &Vec<u8>| FrameHeader::peek_block(f).map(|(_, b)| b);
        let index_of = |f: &Vec<u8>| u16::from_be_bytes([f[24], f[25]]);
        let k_of = |f: &Vec<u8>| u16::from_be_bytes([f[26], f[27]]);
        let first = frames.iter().find_map(block_of).unwrap();
        let of_first = |f: &Vec<u8>| block_of(f) == Some(first);
        let parity: Vec<Vec<u8>> = frames
            .iter()
            .filter(|f| of_first(f) && index_of(f) >= k_of(f))
            .cloned()
            .collect();
        let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
        let mut now = 0;
        for f in frames
            .iter()
            .filter(|f| !of_first(f) || (index_of(f) != 0 && index_of(f) < k_of(f)))
        {
            dec.handle_datagram(now, &mut f.to_vec());
            now += 1_000;
        }
        assert!(!parity.is_empty());
        assert!(dec.stats().blocks_decoded > 0, "later blocks are rebuilt");
        assert_eq!(
            delivered_seqs(&mut dec),
            Vec::<u64>::new(),
            "they wait for the first"
        );
        (dec, parity, now)
    }

    /// Runs the decoder's timers every 20 ms (as the decode thread does)
    /// from `from` for `silence`, with no datagram.
    fn silence(dec: &mut Decoder, from: Nanos, silence: Nanos) -> Nanos {
        let step = 20 * crate::NANOS_PER_MILLI;
        let mut now = from;
        while now < from + silence {
            now += step;
            dec.handle_timeout(now);
        }
        now
    }

    #[test]
    fn a_block_whose_parity_comes_after_the_link_froze_for_a_second_and_a_half_is_rebuilt() {
        let (mut dec, parity, now) = first_block_waiting_for_its_parity();
        // The sender (or this receiver, with the parity in its socket)
        // freezes for 1.5 s: five times the wait limit of real time.
        let now = silence(&mut dec, now, 1_500 * crate::NANOS_PER_MILLI);
        assert_eq!(
            dec.stats().blocks_lost + dec.stats().gaps,
            0,
            "nothing given up"
        );
        for f in &parity {
            dec.handle_datagram(now, &mut f.to_vec());
        }
        dec.handle_timeout(now + NANOS_PER_SEC);
        assert_eq!(delivered_seqs(&mut dec), (0..20_000).collect::<Vec<_>>());
        assert_eq!((dec.stats().blocks_lost, dec.stats().gaps), (0, 0));
        assert_eq!(dec.stats().blocks_repaired, 1);
    }

    #[test]
    fn a_sender_gone_for_good_has_its_incomplete_block_given_up_once_silent_past_the_bound() {
        let (mut dec, _parity, now) = first_block_waiting_for_its_parity();
        let bound = dec.silence_max();
        assert_eq!(bound, 2 * NANOS_PER_SEC, "twice the default heartbeat gap");
        let then = silence(&mut dec, now, bound - 20 * crate::NANOS_PER_MILLI);
        assert_eq!(dec.stats().blocks_lost, 0, "not within the bound");
        // Past the bound the silence counts in full: the wait limit is long
        // gone, and the block is given up; the records after it go on.
        let due = dec.poll_timeout().expect("a block waits on time");
        assert!(due > then && due <= now + bound + DecoderConfig::default().block_timeout);
        silence(&mut dec, then, due - then);
        assert_eq!(dec.stats().blocks_lost, 1);
        let seqs = delivered_seqs(&mut dec);
        assert!(!seqs.is_empty() && seqs.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(*seqs.last().unwrap(), 19_999);
        assert!(dec.stats().gaps > 0);
    }

    #[test]
    fn a_corroborated_jump_to_the_block_bound_and_a_takeover_after_it_stay_within_bounds() {
        let live = frames_of(42, 0..300);
        let other = frames_of(43, 0..3000);
        let (stats, seqs) = finishes_in_time(move || {
            let mut dec = Decoder::new(DecoderConfig::default(), test_verifier());
            for f in &live {
                dec.handle_datagram(0, &mut f.to_vec());
            }
            // Eight distinct shards at the highest block accepted, and the
            // live session silent: the window follows them.
            for index in 0..8 {
                dec.handle_datagram(0, &mut forged(42, MAX_BLOCK, 64, 16, index, &[0u8; 1416]));
            }
            dec.handle_timeout(10 * NANOS_PER_SEC);
            for f in &other {
                dec.handle_datagram(20 * NANOS_PER_SEC, &mut f.to_vec());
            }
            dec.handle_timeout(40 * NANOS_PER_SEC);
            dec.handle_timeout(u64::MAX);
            (dec.stats().clone(), delivered_seqs(&mut dec))
        });
        assert_eq!(stats.window_jumps, 1);
        assert_eq!(seqs, (0..3000).collect::<Vec<_>>());
    }

    #[test]
    fn resolving_open_gaps_forgets_only_the_range_given_and_splits_a_gap_it_cuts() {
        let mut dec = Decoder::new(DecoderConfig::default(), Verifier::disabled());
        dec.restore_open_gap("s", 10, 19);
        dec.restore_open_gap("s", 30, 39);
        dec.restore_open_gap("t", 10, 19);
        assert_eq!(dec.resolve_open_gaps("s", 15, 32), 8);
        assert_eq!(dec.resolve_open_gaps("nothing", 0, u64::MAX), 0);
        let mut open: Vec<_> = dec
            .open_gaps()
            .map(|(s, f, t)| (s.to_string(), f, t))
            .collect();
        open.sort();
        assert_eq!(
            open,
            [
                ("s".to_string(), 10, 14),
                ("s".to_string(), 33, 39),
                ("t".to_string(), 10, 19)
            ]
        );
        assert_eq!(dec.resolve_open_gaps("s", 12, 12), 1);
        assert_eq!(dec.resolve_open_gaps("s", 0, u64::MAX), 11);
        assert_eq!(dec.open_gaps().filter(|g| g.0 == "s").count(), 0);
    }
}
