//! The link thread: reads records from the spool, drives the encoder, and
//! sends its frames through the pacer and the socket. It is the only place
//! that touches the link socket.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use weir_protocol::{Encoder, GapNotice, Nanos, Record, StreamId};

use crate::metrics::Counters;
use crate::spool::{Batch, Entry, Item, Shared};
use crate::udp::LinkSocket;

/// Bytes a datagram costs on an Ethernet link beyond its UDP payload:
/// IPv4 20 + UDP 8 + Ethernet header/FCS 18 + preamble 8 + inter-frame gap 12
/// (IPv6 adds 20 more).
pub const WIRE_OVERHEAD: usize = 66;
pub const WIRE_OVERHEAD_IPV6: usize = 86;
/// Link thread modes: run; stop promptly (unsent records stay spooled);
/// drain the spool, then stop (every source has finished).
pub const RUN: u8 = 0;
pub const STOP: u8 = 1;
pub const DRAIN: u8 = 2;

/// Records moved from the spool to the encoder per step.
const FEED_BATCH: usize = 4096;
/// And at most about this many bytes of them (one record more at most):
/// the batch is read into memory, and 4096 records of 64 KiB would be
/// 256 MiB, the whole memory budget of a side.
const FEED_BYTES: usize = 4 << 20;
/// Unread spool bytes from which the sender counts as behind its input. A
/// sender that keeps up holds about one fsync's worth of records unread
/// (a few ms: 1 MiB is 8 ms at 1 Gbit/s); a tcp source stops reading at
/// 16 MiB (`STREAM_HIGH_WATER`).
const INPUT_WAITING_BYTES: u64 = 1 << 20;

/// Token bucket in bytes; the bucket holds at most `burst` bytes, so the
/// sender never exceeds the rate over any window longer than burst/rate.
/// The pacer's burst in bytes: 2 ms at the link rate, so a sender thread
/// that lost the CPU for a moment can catch up, but never more than a
/// quarter of the receiver's socket buffer (at 16 Gbit/s 2 ms is 4 MB, a
/// whole 4 MiB buffer: one burst arriving while the receiver is busy would
/// overflow it), and never less than two GSO batches, the pacer's unit.
pub fn pacer_burst(rate_bps: u64, batch_bytes: usize, receiver_buffer: usize) -> usize {
    let two_ms = (rate_bps / 8 / 500) as usize;
    two_ms.min(receiver_buffer / 4).max(2 * batch_bytes)
}

pub struct Pacer {
    bytes_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    pub fn new(rate_bps: u64, burst: usize) -> Self {
        let bytes_per_sec = rate_bps as f64 / 8.0;
        Pacer {
            bytes_per_sec,
            burst: burst as f64,
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    /// How long to wait before `cost` bytes may go; zero when they may now.
    pub fn delay_for(&mut self, cost: usize) -> Duration {
        let now = Instant::now();
        self.tokens = (self.tokens
            + now.duration_since(self.last).as_secs_f64() * self.bytes_per_sec)
            .min(self.burst);
        self.last = now;
        let cost = cost as f64;
        if self.tokens >= cost {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((cost - self.tokens) / self.bytes_per_sec)
        }
    }

    pub fn spend(&mut self, cost: usize) {
        self.tokens -= cost as f64;
    }
}

pub struct LinkParams {
    pub rate_bps: u64,
    /// WIRE_OVERHEAD or WIRE_OVERHEAD_IPV6.
    pub wire_overhead: usize,
    /// Source type of each configured stream, for announcements.
    pub source_types: HashMap<String, String>,
    pub spool_path: PathBuf,
    /// `link.receiver_buffer`: the pacer's burst is at most a quarter of it.
    pub receiver_buffer: usize,
    /// Streams whose records are sent more than once: (copies, spacing).
    pub repeats: HashMap<String, (u32, Duration)>,
}

/// Heartbeats a sender whose sources all finished sends after its last
/// frame, `FINAL_HEARTBEAT_SPACING` apart, before it exits. The last
/// heartbeat is the only word the receiver gets of records lost at the end
/// of a transfer (the tail: no later record shows the jump); a single one
/// sent right behind a burst can be lost with it in an overflowing socket
/// buffer, and the tail loss would then go unnamed until the sender runs
/// again. Three, spread over 200 ms, outlast such a burst.
const FINAL_HEARTBEATS: u32 = 3;
const FINAL_HEARTBEAT_SPACING: Duration = Duration::from_millis(100);

/// Bytes of record copies waiting to be repeated; past this a copy is
/// skipped and counted (the original was sent).
const REPEAT_LIMIT: usize = 64 << 20;

/// Bytes of records waiting for an operator's resend at most (records
/// range from a point to a 4 MiB file part, so a count would not bound the
/// memory): a request larger than what is left stays in `resend/`, its
/// `from` moved past what was taken, and is taken up again as the queue
/// drains. 64 MiB is a few seconds of a fast link.
const RESEND_BYTES: usize = 64 << 20;

/// What the link thread knows about the streams it has announced.
struct Streams {
    ids: HashMap<String, StreamId>,
    types: HashMap<String, String>,
    /// The stream looked up last: consecutive records are mostly of one
    /// stream, and comparing a name is cheaper than hashing it.
    last: Option<(String, StreamId)>,
}

impl Streams {
    fn id(&mut self, enc: &mut Encoder, spool: &Shared, name: &str, first_seq: u64) -> StreamId {
        if let Some((last, id)) = &self.last {
            if last == name {
                return *id;
            }
        }
        let id = self.lookup(enc, spool, name, first_seq);
        match &mut self.last {
            Some((last, last_id)) => {
                last.clear();
                last.push_str(name);
                *last_id = id;
            }
            None => self.last = Some((name.to_string(), id)),
        }
        id
    }

    fn lookup(
        &mut self,
        enc: &mut Encoder,
        spool: &Shared,
        name: &str,
        first_seq: u64,
    ) -> StreamId {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let epoch = spool.lock().stream(name).epoch;
        let kind = self.types.get(name).map_or("spool", String::as_str);
        let id = enc.add_stream(name, kind, first_seq, epoch);
        self.ids.insert(name.to_string(), id);
        id
    }
}

pub fn run(
    params: LinkParams,
    mut enc: Encoder,
    socket: LinkSocket,
    spool: Shared,
    counters: Arc<Counters>,
    stop: Arc<AtomicU8>,
) -> Result<()> {
    let origin = Instant::now();
    let now = || origin.elapsed().as_nanos() as Nanos;
    let frame_len = enc.max_frame_len();
    let batch_max = socket.batch_for(frame_len);
    let overhead = params.wire_overhead;
    let batch_bytes = batch_max * (frame_len + overhead);
    let burst = pacer_burst(params.rate_bps, batch_bytes, params.receiver_buffer);
    let mut pacer = Pacer::new(params.rate_bps, burst);
    tracing::info!(
        gso_segments = batch_max,
        frame_len,
        burst,
        "link thread started"
    );
    let mut buf = vec![0u8; batch_max * frame_len];
    let mut carry: Vec<u8> = Vec::with_capacity(frame_len);
    let mut batch = Batch::default();
    let mut streams = Streams {
        ids: HashMap::new(),
        types: params.source_types,
        last: None,
    };
    // (spool index after a pushed batch, block it ends in): the batch is on
    // the wire once that block has been fully sent.
    let mut pushed: VecDeque<(u64, u64)> = VecDeque::new();
    let mut resends: VecDeque<Entry> = VecDeque::new();
    let mut resend_bytes: usize = 0;
    // (when, copies still to send, record) for streams with `repeat`.
    let mut repeats: VecDeque<(Instant, u32, Entry)> = VecDeque::new();
    let mut repeat_bytes: usize = 0;
    let mut last_resend_poll = Instant::now();
    // Drain mode: (final heartbeats still to send, when the next goes).
    let mut final_beats: Option<(u32, Instant)> = None;
    let mut last_publish = Instant::now();
    let mut flushed = false;
    let mut send_errors_logged = Instant::now() - Duration::from_secs(60);
    // When the frames polled so far will have left at the link rate.
    let mut link_free: Nanos = 0;
    let airtime = |len: usize| -> Nanos {
        ((len + overhead) as u128 * 8 * 1_000_000_000 / u128::from(params.rate_bps.max(1))) as Nanos
    };

    let beat = weir_ops::notify::watchdog().beat("weir-link");
    loop {
        beat.touch();
        let t = now();
        let mode = stop.load(Ordering::Relaxed);
        let drained =
            mode == DRAIN && resends.is_empty() && repeats.is_empty() && spool.lock().is_drained();
        if (mode == STOP || drained) && !flushed {
            // On STOP what is still in the spool stays there for the next
            // start, and what the encoder holds goes out at once. After the
            // last source finished there is no hurry: the last blocks keep
            // their spread and spare parity, the protection they would have
            // had with traffic behind them.
            if mode == STOP {
                enc.flush(t);
            } else {
                enc.finish(t);
            }
            enc.heartbeat_now(t);
            flushed = true;
        }
        if !flushed && !enc.is_backlogged() {
            while !enc.is_backlogged()
                && repeats
                    .front()
                    .is_some_and(|(due, _, _)| *due <= Instant::now())
            {
                let (_, left, e) = repeats.pop_front().expect("front");
                let id = streams.id(&mut enc, &spool, &e.stream, e.seq);
                enc.push(
                    t,
                    &Record {
                        stream: id,
                        seq: e.seq,
                        resent: true,
                        body: e.body.clone(),
                    },
                );
                Counters::add(&counters.repeated_records, 1);
                if left > 1 {
                    let delay = params
                        .repeats
                        .get(&e.stream)
                        .map_or(Duration::from_secs(1), |r| r.1);
                    repeats.push_back((Instant::now() + delay, left - 1, e));
                } else {
                    repeat_bytes = repeat_bytes.saturating_sub(crate::spool::entry_size(&e));
                }
            }
            while !enc.is_backlogged() {
                let Some(e) = resends.pop_front() else { break };
                resend_bytes = resend_bytes.saturating_sub(crate::spool::entry_size(&e));
                let id = streams.id(&mut enc, &spool, &e.stream, e.seq);
                enc.push(
                    t,
                    &Record {
                        stream: id,
                        seq: e.seq,
                        resent: true,
                        body: e.body,
                    },
                );
                Counters::add(&counters.resent_records, 1);
            }
            batch.clear();
            let unread = {
                let mut sp = spool.lock();
                sp.read(&mut batch, FEED_BATCH, FEED_BYTES)?;
                sp.unsent_bytes()
            };
            if !batch.items.is_empty() {
                spool.room.notify_waiters();
            }
            // A full read, or records piling up in the spool (appended, not
            // yet durable or not yet read), means the sender is behind its
            // input: it is at full load whatever the link rate says, and
            // spare parity would only slow it down further (see the encoder).
            enc.set_input_waiting(
                batch.items.len() >= FEED_BATCH
                    || batch.bytes() >= FEED_BYTES
                    || unread >= INPUT_WAITING_BYTES,
            );
            let mut last_index = None;
            // Counted once per batch: the counters are shared with the
            // source threads, and an atomic add per record would move their
            // cache line between cores a million times a second.
            let mut records = 0;
            for item in &batch.items {
                match item {
                    Item::Record(r) => {
                        let name = batch.stream(r);
                        let id = streams.id(&mut enc, &spool, name, r.seq);
                        if let Some((copies, delay)) = params.repeats.get(name) {
                            let entry = batch.entry(r);
                            let size = crate::spool::entry_size(&entry);
                            if repeat_bytes + size <= REPEAT_LIMIT {
                                repeat_bytes += size;
                                repeats.push_back((Instant::now() + *delay, copies - 1, entry));
                            } else {
                                Counters::add(&counters.repeat_skipped, 1);
                            }
                        }
                        enc.push_encoded(t, id, r.seq, false, batch.body(r));
                        records += 1;
                        last_index = Some(r.index + 1);
                    }
                    Item::Dropped {
                        stream,
                        from,
                        to,
                        cause,
                    } => {
                        let id = streams.id(&mut enc, &spool, stream, *from);
                        enc.push_gap_notice(
                            t,
                            &GapNotice {
                                stream: id,
                                from: *from,
                                to: *to,
                                cause: *cause,
                            },
                        );
                        Counters::add(&counters.gap_notices_sent, 1);
                    }
                }
            }
            Counters::add(&counters.records_sent, records);
            if let Some(index) = last_index {
                pushed.push_back((index, enc.next_block()));
            }
        }
        if enc.poll_timeout().is_some_and(|d| d <= t) {
            enc.handle_timeout(t);
        }
        let unsent_from = if enc.is_idle() {
            u64::MAX
        } else {
            enc.unsent_from()
        };
        let mut sent = None;
        while pushed
            .front()
            .is_some_and(|(_, block)| *block < unsent_from)
        {
            sent = pushed.pop_front().map(|(index, _)| index);
        }
        if let Some(index) = sent {
            spool.lock().mark_sent(index);
        }
        if flushed && enc.is_idle() && carry.is_empty() && mode == DRAIN {
            // After everything else, spare parity included (the flush's
            // heartbeat may have gone before that).
            let (left, at) = final_beats.get_or_insert((FINAL_HEARTBEATS, Instant::now()));
            if *left > 0 && Instant::now() >= *at {
                enc.heartbeat_now(now());
                *left -= 1;
                *at = Instant::now() + FINAL_HEARTBEAT_SPACING;
            }
        }
        // Only while draining: a SIGTERM in between stops at once.
        let beats_left = mode == DRAIN && final_beats.is_none_or(|(left, _)| left > 0);
        if flushed && enc.is_idle() && carry.is_empty() && !beats_left {
            publish(&mut enc, &counters);
            // The final state save happens in main, after the sync thread stops.
            tracing::info!("link drained; sender stopping (unsent records stay in the spool)");
            return Ok(());
        }
        if last_resend_poll.elapsed() >= Duration::from_secs(1) && !flushed {
            last_resend_poll = Instant::now();
            take_resend_requests(
                &params.spool_path,
                &mut resends,
                &mut resend_bytes,
                RESEND_BYTES,
            );
        }

        // Gather frames of equal size into one GSO batch.
        let mut count = 0;
        let mut seg = 0;
        let mut used = 0;
        if !carry.is_empty() {
            buf[..carry.len()].copy_from_slice(&carry);
            seg = carry.len();
            used = seg;
            count = 1;
            carry.clear();
        }
        while count < batch_max {
            // Each frame is polled at the time the pacer will let it onto
            // the link, not at the time the batch is gathered: the encoder
            // spaces a block's shards in time, and a batch at a low rate
            // spans milliseconds (44 frames at 100 Mbit/s: 5.4 ms).
            let at = t.max(link_free);
            let Some(n) = enc.poll_frame(at, &mut buf[used..used + frame_len]) else {
                break;
            };
            link_free = at + airtime(n);
            if count == 0 {
                seg = n;
            } else if n > seg {
                carry.extend_from_slice(&buf[used..used + n]);
                break;
            }
            used += n;
            count += 1;
            if n < seg {
                break; // a shorter datagram can only end a GSO batch
            }
        }

        if count == 0 {
            if last_publish.elapsed() >= Duration::from_millis(100) {
                publish(&mut enc, &counters);
                last_publish = Instant::now();
            }
            // Nothing to send: sleep until a record arrives or a timer is due.
            let wait = enc.poll_timeout().map_or(Duration::from_millis(50), |d| {
                Duration::from_nanos(d.saturating_sub(now()))
            });
            let wait = repeats.front().map_or(wait, |(due, _, _)| {
                wait.min(due.saturating_duration_since(Instant::now()))
            });
            let wait = final_beats.map_or(wait, |(_, at)| {
                wait.min(at.saturating_duration_since(Instant::now()))
            });
            if !wait.is_zero() {
                spool.wait(wait.min(Duration::from_millis(50)));
            }
            continue;
        }

        let cost = used + count * overhead;
        let delay = pacer.delay_for(cost);
        if !delay.is_zero() {
            Counters::add(&counters.pacer_waits, 1);
            std::thread::sleep(delay);
        }
        pacer.spend(cost);
        match socket.send(&buf[..used], seg) {
            Ok(()) => {
                Counters::add(&counters.datagrams_sent, count as u64);
                Counters::add(&counters.wire_bytes_sent, used as u64);
            }
            Err(e) => {
                Counters::add(&counters.send_errors, 1);
                if send_errors_logged.elapsed() >= Duration::from_secs(5) {
                    tracing::warn!("sending on the link failed ({e}); the datagrams are lost and counted in send_errors");
                    send_errors_logged = Instant::now();
                }
            }
        }
        if last_publish.elapsed() >= Duration::from_millis(100) {
            publish(&mut enc, &counters);
            last_publish = Instant::now();
        }
    }
}

/// An operator's request, written by `weir-sender resend`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ResendRequest {
    pub stream: String,
    pub from: u64,
    pub to: u64,
}

/// Picks up resend requests, oldest first, and queues the retained records
/// they name while the queue holds less than `limit` bytes (`queued`
/// counts them). A request only partly queued is rewritten to start at
/// its first record not taken and waits for the next poll, and the ones
/// after it wait too, so records go in the order they were asked for.
fn take_resend_requests(
    spool_path: &Path,
    queue: &mut VecDeque<Entry>,
    queued: &mut usize,
    limit: usize,
) {
    let dir = spool_path.join("resend");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for file in files {
        if *queued >= limit {
            return;
        }
        let request: Option<ResendRequest> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(r) = request else {
            let _ = std::fs::remove_file(&file);
            tracing::warn!(file = %file.display(), "resend: ignoring a request that is not valid JSON");
            continue;
        };
        let (mut taken, mut rest) = (0u64, None);
        let walked = crate::spool::walk_in(spool_path, &r.stream, r.from, r.to, |e| {
            let size = crate::spool::entry_size(&e);
            // At least one record moves, whatever its size.
            if *queued + size > limit && !queue.is_empty() {
                rest = Some(e.seq);
                return false;
            }
            *queued += size;
            queue.push_back(e);
            taken += 1;
            true
        });
        if let Err(e) = walked {
            let _ = std::fs::remove_file(&file);
            tracing::warn!(stream = %r.stream, "resend: cannot read the spool: {e:#}");
            continue;
        }
        match rest {
            None => {
                let _ = std::fs::remove_file(&file);
                tracing::info!(stream = %r.stream, from = r.from, to = r.to, records = taken, "resend: queued retained records");
            }
            Some(from) => {
                let left = ResendRequest { from, ..r };
                let saved = serde_json::to_vec(&left)
                    .map_err(anyhow::Error::from)
                    .and_then(|b| weir_store::write_atomically(&file, &b));
                if let Err(e) = saved {
                    tracing::warn!(file = %file.display(), stream = %left.stream, from, to = left.to,
                        "resend: cannot save the rest of a request ({e:#}); resend {from}..={} again", left.to);
                    let _ = std::fs::remove_file(&file);
                }
                tracing::info!(stream = %left.stream, records = taken, next = from, to = left.to,
                    "resend: queued retained records up to the queue's bound; the rest follows as it drains");
                return;
            }
        }
    }
}

/// Copies encoder statistics into the shared counters and hands the
/// counters to the encoder for its next heartbeat.
fn publish(enc: &mut Encoder, counters: &Counters) {
    let s = enc.stats();
    for (counter, value) in [
        (&counters.blocks_sent, s.blocks),
        (&counters.parity_frames, s.parity_frames),
        (&counters.data_frames, s.data_frames),
        (&counters.data_bytes, s.data_bytes),
        (&counters.parity_bytes, s.parity_bytes),
        (&counters.spare_parity_blocks, s.spare_parity_blocks),
        (&counters.spare_parity_frames, s.spare_parity_frames),
        (&counters.spare_parity_dropped, s.spare_parity_dropped),
        (&counters.warmup_blocks, s.warmup_blocks),
        (&counters.max_spread_us, s.max_spread / 1_000),
    ] {
        counter.store(value, Ordering::Relaxed);
    }
    enc.set_counters(heartbeat_counters(counters.snapshot()));
}

/// Counters of the sender's own disk, kept out of heartbeats (the metrics
/// file and Prometheus have them): a heartbeat has room for 32, which the
/// rest and the sources' nonzero ones need more.
const LOCAL_COUNTERS: [&str; 2] = ["spool_fsync_max_us", "spool_slow_fsyncs"];

/// Heartbeats carry at most 32 counters: the sender's own (records,
/// spool, link) always, except [`LOCAL_COUNTERS`], then those of source
/// components (`mqtt_`, `modbus_`, `opcua_`) that are not zero, in their
/// order.
fn heartbeat_counters(all: Vec<(String, u64)>) -> Vec<(String, u64)> {
    const MAX: usize = 32;
    let component = |name: &str| {
        ["mqtt_", "modbus_", "opcua_"]
            .iter()
            .any(|p| name.starts_with(p))
    };
    let (components, own): (Vec<_>, Vec<_>) = all
        .into_iter()
        .filter(|(n, _)| !LOCAL_COUNTERS.contains(&n.as_str()))
        .partition(|(n, _)| component(n));
    let mut out = own;
    let room = MAX.saturating_sub(out.len());
    out.extend(components.into_iter().filter(|(_, v)| *v != 0).take(room));
    out
}

#[cfg(test)]
mod tests {
    use super::{heartbeat_counters, pacer_burst, take_resend_requests, ResendRequest};
    use std::collections::VecDeque;
    use std::sync::Arc;

    #[test]
    fn a_resend_larger_than_the_queue_bound_is_queued_in_parts_in_order() {
        let dir = std::env::temp_dir().join(format!("weir-link-resend-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let settings = crate::spool::Settings {
            path: dir.clone(),
            max_bytes: 64 << 20,
            max_age: std::time::Duration::from_secs(3600),
            fsync_interval: std::time::Duration::from_millis(10),
            fsync_bytes: 4 << 20,
        };
        let mut spool = crate::spool::Spool::open(settings, Arc::default()).unwrap();
        let body = weir_protocol::RecordBody::Bytes(weir_protocol::Chunk {
            data: vec![1; 1000],
            end: false,
        });
        for _ in 0..100 {
            spool.append("a", &body).unwrap();
        }
        spool.sync().unwrap();
        std::fs::create_dir_all(dir.join("resend")).unwrap();
        let ask = |name: &str, from, to| {
            let r = ResendRequest {
                stream: "a".into(),
                from,
                to,
            };
            std::fs::write(
                dir.join("resend").join(name),
                serde_json::to_vec(&r).unwrap(),
            )
            .unwrap();
        };
        ask("1.json", 10, 59);
        ask("2.json", 90, 99);
        let size = crate::spool::entry_size(&crate::spool::find_in(&dir, "a", 0, 0).unwrap()[0]);
        let limit = 20 * size;
        let (mut queue, mut queued) = (VecDeque::new(), 0);
        let mut seqs = Vec::new();
        for _ in 0..10 {
            take_resend_requests(&dir, &mut queue, &mut queued, limit);
            assert!(queued <= limit, "{queued} > {limit}");
            // The link sends what is queued.
            while let Some(e) = queue.pop_front() {
                queued -= crate::spool::entry_size(&e);
                seqs.push(e.seq);
            }
        }
        let want: Vec<u64> = (10..60).chain(90..100).collect();
        assert_eq!(seqs, want, "every record once, in the order asked");
        assert_eq!(std::fs::read_dir(dir.join("resend")).unwrap().count(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn heartbeats_keep_the_senders_own_counters_and_only_nonzero_component_ones() {
        let all = crate::metrics::Counters::default().snapshot();
        let own = all
            .iter()
            .filter(|(n, _)| {
                !["mqtt_", "modbus_", "opcua_"]
                    .iter()
                    .any(|p| n.starts_with(p))
                    && !super::LOCAL_COUNTERS.contains(&n.as_str())
            })
            .count();
        let mut hb = heartbeat_counters(all.clone());
        assert_eq!(hb.len(), own, "zero component counters are left out");
        assert!(
            !hb.iter().any(|(n, _)| n == "spool_fsync_max_us"),
            "the spool's fsync times stay local"
        );
        assert!(
            hb.len() <= 32,
            "the sender's own counters alone fit a heartbeat"
        );
        assert!(hb.iter().any(|(n, _)| n == "records_sent"));
        let mut busy = all;
        for (n, v) in &mut busy {
            if n == "modbus_requests" {
                *v = 7;
            }
        }
        hb = heartbeat_counters(busy);
        assert!(hb.contains(&("modbus_requests".to_string(), 7)));
        assert!(hb.len() <= 32);
    }

    const BATCH: usize = 44 * 1530;

    #[test]
    fn the_pacer_burst_is_2_ms_at_the_link_rate_when_the_receiver_buffer_allows() {
        // 1 Gbit/s: 2 ms is 250 kB, under a quarter of 4 MiB.
        assert_eq!(pacer_burst(1_000_000_000, BATCH, 4 << 20), 250_000);
    }

    #[test]
    fn the_pacer_burst_never_exceeds_a_quarter_of_the_receiver_buffer() {
        // 16 Gbit/s: 2 ms is 4 MB, the whole of a 4 MiB buffer.
        assert_eq!(pacer_burst(16_000_000_000, BATCH, 4 << 20), 1 << 20);
        assert_eq!(pacer_burst(16_000_000_000, BATCH, 64 << 20), 4_000_000);
    }

    #[test]
    fn the_pacer_burst_is_at_least_two_gso_batches() {
        assert_eq!(pacer_burst(10_000_000, BATCH, 4 << 20), 2 * BATCH);
        assert_eq!(pacer_burst(16_000_000_000, BATCH, 256 << 10), 2 * BATCH);
    }
}
