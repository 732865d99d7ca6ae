//! The decode thread: datagrams from the socket thread into the `Decoder`
//! (header, CRC, tag, shards, Reed-Solomon, records in order, gaps), and
//! its events out to the journal thread (`pipeline.rs`) in bounded chunks.
//!
//! It does no disk work: no journal append, no fsync request, no audit
//! line, no catch-up read, no compaction. A slow disk or a lagging sink
//! therefore slows the journal thread first; only when the `DECODED_QUEUE`
//! chunks between the two are full does this thread wait, and only then do
//! receive batches wait in the socket thread's pool.

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_protocol::{Decoder, DecoderStats, Event, Nanos};

use crate::pipeline::{record_weight, Input};
use crate::udp::RecvBatch;

/// Chunks of decoded events waiting for the journal thread. With
/// `CHUNK_EVENTS` and `CHUNK_BYTES` per chunk this holds at most 16 MiB of
/// records in memory (plus one record per chunk), about 50 ms of small
/// records at a million a second: enough to ride out one fsync or one
/// catch-up read of the journal thread, small beside the sinks' queues.
pub const DECODED_QUEUE: usize = 16;
/// Events per chunk: one channel hand-off per this many small records.
pub const CHUNK_EVENTS: usize = 4096;
/// Records' size in memory per chunk (`record_weight`); a chunk is sent as
/// soon as it reaches this, so one chunk holds at most this plus one record.
pub const CHUNK_BYTES: u64 = 1 << 20;

/// The longest the decode thread sleeps with nothing arriving; the
/// decoder's own timers wake it earlier.
const IDLE_WAIT: Duration = Duration::from_millis(20);
/// The most one turn of the decode loop advances the decoder's clock. A
/// turn takes at most `IDLE_WAIT` plus the work of `DRAIN_BATCHES`
/// batches (milliseconds), so only a
/// stall (the thread, or the whole machine, not running for a while)
/// reaches it: a stall then counts as this much, not as its length. A
/// frozen machine would otherwise wake to find every block in flight
/// "outwaited" by `block_timeout` and give it up before the shards still
/// in the socket, or not yet sent by a sender frozen with it, are read.
/// (The decoder's own wait clock then counts the silence that follows as
/// at most `SILENCE_STEP`, 20 ms, see "The wait clock" in
/// `protocol/src/decoder.rs`;
/// this bound still holds for the heartbeat route and session takeover.)
const STALL_STEP: Duration = Duration::from_millis(100);
/// Receive batches handled in one turn before the decoder's timers are
/// looked at: what already waits in the channel is read first.
const DRAIN_BATCHES: usize = 16;

/// The decoder's clock: real time, except that a stall counts as at most
/// `STALL_STEP` (see there).
struct Clock {
    last: Instant,
    now: Nanos,
}

impl Clock {
    fn new() -> Self {
        Clock {
            last: Instant::now(),
            now: 0,
        }
    }

    /// What `tick` would return now, without moving the clock.
    fn peek(&self) -> Nanos {
        self.now + self.last.elapsed().min(STALL_STEP).as_nanos() as Nanos
    }

    fn tick(&mut self) -> Nanos {
        let at = Instant::now();
        self.now += at.duration_since(self.last).min(STALL_STEP).as_nanos() as Nanos;
        self.last = at;
        self.now
    }
}

/// How often the decoder's counters are copied for the journal thread
/// (which publishes them every 250 ms).
const STATS_INTERVAL: Duration = Duration::from_millis(50);

/// Events the decoder released, in its order.
pub struct Chunk {
    pub events: Vec<Event>,
}

/// Gap resolutions waiting for the decode thread, at most: it takes them
/// every loop (at least every `IDLE_WAIT`), and each is one file a resend
/// completed, so only a stalled decode thread fills it. Past it a
/// resolution is logged and applies at the next start instead (from the
/// audit log); the gap stays in the status board's list until then.
const MAX_RESOLUTIONS: usize = 1024;

/// The decoder's counters as last copied by the decode thread: the journal
/// thread reads them for the metrics file, the status board and its log
/// lines. Final once the decode thread has ended. The one thing going the
/// other way: ranges of open gaps the journal thread wrote a `gap-resolved`
/// audit line for, which the decode thread has the decoder forget.
#[derive(Default)]
pub struct StatsView {
    stats: Mutex<DecoderStats>,
    gaps: Mutex<OpenGaps>,
    resolutions: Mutex<Vec<(String, u64, u64)>>,
}

/// The decoder's open gaps as last copied: at most
/// [`crate::status::OPEN_GAPS_SHOWN`] of them (stream, from, to), and how
/// many there are in all.
#[derive(Default, Clone, PartialEq, Debug)]
pub struct OpenGaps {
    pub shown: Vec<(String, u64, u64)>,
    pub total: u64,
}

impl StatsView {
    pub fn get(&self) -> DecoderStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The open gaps a resend can still fill, as of the last copy.
    pub fn open_gaps(&self) -> OpenGaps {
        self.gaps.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the decode thread to forget the stream's open gaps within
    /// `from..=to` ([`Decoder::resolve_open_gaps`]); false if
    /// [`MAX_RESOLUTIONS`] already wait.
    pub fn resolve_gaps(&self, stream: &str, from: u64, to: u64) -> bool {
        let mut r = self.resolutions.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= MAX_RESOLUTIONS {
            return false;
        }
        r.push((stream.to_string(), from, to));
        true
    }

    fn take_resolutions(&self) -> Vec<(String, u64, u64)> {
        std::mem::take(&mut *self.resolutions.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn set(&self, decoder: &Decoder) {
        let stats = decoder.stats();
        {
            let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            if *s != *stats {
                s.clone_from(stats);
            }
        }
        let mut gaps = OpenGaps::default();
        for (stream, from, to) in decoder.open_gaps() {
            gaps.total += 1;
            if gaps.shown.len() < crate::status::OPEN_GAPS_SHOWN {
                gaps.shown.push((stream.to_string(), from, to));
            }
        }
        *self.gaps.lock().unwrap_or_else(|p| p.into_inner()) = gaps;
    }
}

/// Collects events into chunks and hands full ones on.
struct Outbox {
    tx: Arc<SyncSender<Input>>,
    events: Vec<Event>,
    bytes: u64,
}

impl Outbox {
    /// Adds an event; false once the journal thread is gone.
    fn push(&mut self, ev: Event) -> bool {
        if let Event::Record(r) = &ev {
            self.bytes += record_weight(r);
        }
        self.events.push(ev);
        if self.events.len() >= CHUNK_EVENTS || self.bytes >= CHUNK_BYTES {
            return self.flush();
        }
        true
    }

    /// Sends what was collected; false once the journal thread is gone.
    fn flush(&mut self) -> bool {
        if self.events.is_empty() {
            return true;
        }
        let events = std::mem::replace(&mut self.events, Vec::with_capacity(CHUNK_EVENTS));
        self.bytes = 0;
        self.tx.send(Input::Decoded(Chunk { events })).is_ok()
    }
}

/// Runs until the socket thread hangs up (then hands on what is left and
/// returns) or the journal thread is gone. Dropping `out` at the end is
/// what tells the journal thread that no more input comes.
pub fn run(
    mut decoder: Decoder,
    batches: Receiver<RecvBatch>,
    free: SyncSender<RecvBatch>,
    out: Arc<SyncSender<Input>>,
    stats: Arc<StatsView>,
) {
    let mut clock = Clock::new();
    let beat = weir_ops::notify::watchdog().beat("weir-decode");
    let mut outbox = Outbox {
        tx: out,
        events: Vec::with_capacity(CHUNK_EVENTS),
        bytes: 0,
    };
    let mut last_stats = Instant::now();
    loop {
        let wait = decoder.poll_timeout().map_or(IDLE_WAIT, |d| {
            Duration::from_nanos(d.saturating_sub(clock.peek())).min(IDLE_WAIT)
        });
        let mut open = true;
        // The records a receive batch released go on (and wait for room in
        // the journal thread's queue) before the next batch is decoded: the
        // decoder holds one batch's records at most. A 2 MiB batch of small
        // points unpacks to an estimated 15 MB of records; decoding the
        // sixteen batches of one turn before any went on let the receiver's
        // records reach 176 MiB (docs/performance.md).
        let mut handle = |mut batch: RecvBatch, t: Nanos, open: &mut bool| {
            for d in batch.datagrams_mut() {
                decoder.handle_datagram(t, d);
            }
            let _ = free.try_send(batch);
            while *open {
                let Some(ev) = decoder.poll_event() else {
                    break;
                };
                *open = outbox.push(ev);
            }
        };
        let disconnected = match batches.recv_timeout(wait) {
            Ok(batch) => {
                handle(batch, clock.tick(), &mut open);
                // Shards already received are read before any block is
                // given up for want of them.
                for _ in 1..DRAIN_BATCHES {
                    let Ok(batch) = batches.try_recv() else { break };
                    handle(batch, clock.tick(), &mut open);
                }
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let t = clock.tick();
        if decoder.poll_timeout().is_some_and(|d| d <= t) {
            decoder.handle_timeout(t);
        }
        let resolutions = stats.take_resolutions();
        for (stream, from, to) in &resolutions {
            let records = decoder.resolve_open_gaps(stream, *from, *to);
            tracing::debug!(stream = %stream, from, to, records, "open gaps resolved (a file completed by a resend)");
        }
        while open {
            let Some(ev) = decoder.poll_event() else {
                break;
            };
            open = outbox.push(ev);
        }
        // What one receive batch released goes on at once: the journal
        // thread groups records for its fsync, not this one.
        open = open && outbox.flush();
        beat.touch();
        if disconnected
            || !open
            || !resolutions.is_empty()
            || last_stats.elapsed() >= STATS_INTERVAL
        {
            last_stats = Instant::now();
            stats.set(&decoder);
        }
        if disconnected || !open {
            // The journal thread sees the channel close only after every
            // chunk sent, with the final counters already in `stats`.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_moves_the_decoders_clock_by_one_stall_step_and_normal_turns_by_their_length() {
        let mut clock = Clock::new();
        std::thread::sleep(STALL_STEP * 3);
        assert_eq!(clock.peek(), STALL_STEP.as_nanos() as Nanos);
        assert_eq!(clock.tick(), STALL_STEP.as_nanos() as Nanos);
        std::thread::sleep(Duration::from_millis(5));
        let t = clock.tick() - STALL_STEP.as_nanos() as Nanos;
        assert!(
            (5_000_000..=STALL_STEP.as_nanos() as Nanos).contains(&t),
            "a 5 ms turn moved the clock by {t} ns"
        );
    }
    use weir_protocol::{
        Chunk as BytesChunk, EncoderConfig, Point, Record, RecordBody, Signer, Value,
    };

    fn point(seq: u64) -> RecordBody {
        RecordBody::Point(Point {
            tag: format!("plant/tag-{}", seq % 1000),
            ts_ns: seq as i64,
            value: Value::F64(seq as f64),
            quality: 192,
            status: None,
        })
    }

    fn record(seq: u64, body: RecordBody) -> Event {
        Event::Record(weir_protocol::decoder::Delivered {
            stream: Arc::from("s"),
            source_type: Arc::from("generator"),
            session: 1,
            epoch: 1,
            seq,
            resent: false,
            body,
        })
    }

    fn chunks(rx: &Receiver<Input>) -> Vec<Vec<Event>> {
        let mut out = Vec::new();
        while let Ok(input) = rx.recv() {
            if let Input::Decoded(c) = input {
                out.push(c.events);
            }
        }
        out
    }

    /// The sequence numbers of the records in `chunks`, in order.
    fn record_seqs(chunks: &[Vec<Event>]) -> Vec<u64> {
        chunks
            .iter()
            .flatten()
            .filter_map(|e| match e {
                Event::Record(r) => Some(r.seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_chunk_holds_at_most_chunk_events_events_or_chunk_bytes_of_records_plus_one() {
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        let mut outbox = Outbox {
            tx: Arc::new(tx),
            events: Vec::new(),
            bytes: 0,
        };
        for seq in 0..10_000 {
            assert!(outbox.push(record(seq, point(seq))));
        }
        assert!(outbox.flush());
        // 300 KiB records: the chunk goes once it reaches CHUNK_BYTES.
        for seq in 0..10 {
            let body = RecordBody::Bytes(BytesChunk {
                data: vec![0; 300 << 10],
                end: false,
            });
            assert!(outbox.push(record(10_000 + seq, body)));
        }
        assert!(outbox.flush());
        drop(outbox);
        let sizes: Vec<usize> = chunks(&rx).iter().map(Vec::len).collect();
        assert_eq!(sizes, [4096, 4096, 1808, 4, 4, 2]);
    }

    #[test]
    fn the_decode_thread_hands_every_record_on_in_order_then_closes_its_output_when_the_socket_thread_hangs_up(
    ) {
        let total = 20_000u64;
        let frames = frames(&mut encoder(), 0..total);
        let (batch_tx, batch_rx) = std::sync::mpsc::sync_channel(RECV_BATCHES);
        let (free_tx, _free_rx) = std::sync::mpsc::sync_channel(RECV_BATCHES);
        let (out_tx, out_rx) = std::sync::mpsc::sync_channel(DECODED_QUEUE);
        let stats = Arc::new(StatsView::default());
        let thread = {
            let stats = stats.clone();
            let decoder = Decoder::new(Default::default(), weir_protocol::Verifier::disabled());
            std::thread::spawn(move || run(decoder, batch_rx, free_tx, Arc::new(out_tx), stats))
        };
        let feeder = std::thread::spawn(move || {
            for group in frames.chunks(32) {
                batch_tx.send(RecvBatch::from_datagrams(group)).unwrap();
            }
            // Dropping the sender is the socket thread hanging up.
        });
        let got = chunks(&out_rx);
        feeder.join().unwrap();
        thread.join().unwrap();
        assert!(got.iter().all(|c| c.len() <= CHUNK_EVENTS));
        assert_eq!(record_seqs(&got), (0..total).collect::<Vec<_>>());
        assert_eq!(
            stats.get().records,
            total,
            "the final counters are published before the output closes"
        );
    }

    /// Receive batches in flight in the test (as `RECV_POOL` in main.rs).
    const RECV_BATCHES: usize = 16;

    fn encoder() -> weir_protocol::Encoder {
        let mut enc = weir_protocol::Encoder::new(EncoderConfig::new(7), Signer::Disabled);
        enc.add_stream("plant", "generator", 0, 1);
        enc
    }

    /// The frames that carry points `seqs` of the encoder's stream 0.
    fn frames(enc: &mut weir_protocol::Encoder, seqs: std::ops::Range<u64>) -> Vec<Vec<u8>> {
        for seq in seqs {
            let record = Record {
                stream: 0,
                seq,
                resent: false,
                body: point(seq),
            };
            enc.push(0, &record);
        }
        enc.flush(0);
        let mut buf = vec![0; enc.max_frame_len()];
        std::iter::from_fn(|| enc.poll_frame(0, &mut buf).map(|n| buf[..n].to_vec())).collect()
    }

    /// With the journal thread not taking chunks, the decode thread waits
    /// with the records of the receive batch it decoded and leaves the next
    /// batch unread, so the decoder never holds more than one batch's
    /// records; once chunks are taken every record goes on, in order.
    #[test]
    fn the_decode_thread_hands_a_batchs_records_on_before_it_decodes_the_next_batch() {
        let mut enc = encoder();
        // Each batch releases more than a chunk of records.
        let per_batch = 2 * CHUNK_EVENTS as u64;
        let first = frames(&mut enc, 0..per_batch);
        let second = frames(&mut enc, per_batch..2 * per_batch);
        let (batch_tx, batch_rx) = std::sync::mpsc::sync_channel(RECV_BATCHES);
        let (free_tx, free_rx) = std::sync::mpsc::sync_channel(RECV_BATCHES);
        // No room at all: a chunk goes only when the test takes it.
        let (out_tx, out_rx) = std::sync::mpsc::sync_channel(0);
        batch_tx.send(RecvBatch::from_datagrams(&first)).unwrap();
        batch_tx.send(RecvBatch::from_datagrams(&second)).unwrap();
        drop(batch_tx);
        let thread = std::thread::spawn(move || {
            let decoder = Decoder::new(Default::default(), weir_protocol::Verifier::disabled());
            run(
                decoder,
                batch_rx,
                free_tx,
                Arc::new(out_tx),
                Default::default(),
            )
        });
        let done = free_rx.recv_timeout(Duration::from_secs(10));
        assert!(done.is_ok(), "the first batch was decoded and given back");
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            free_rx.try_recv().is_err(),
            "the second batch stays unread while the first batch's records wait"
        );
        let seqs = record_seqs(&chunks(&out_rx));
        thread.join().unwrap();
        assert_eq!(seqs, (0..2 * per_batch).collect::<Vec<_>>());
        assert!(
            free_rx.try_recv().is_ok(),
            "then the second batch was decoded"
        );
    }
}
