//! The link thread: takes records from the queue, drives the encoder, and
//! sends its frames through the pacer and the socket. It is the only place
//! that touches the link socket.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use weir_protocol::{Encoder, Nanos, Record};

use crate::metrics::Counters;
use crate::queue::Queue;
use crate::udp::LinkSocket;

/// Bytes a datagram costs on an Ethernet link beyond its UDP payload:
/// IPv4 20 + UDP 8 + Ethernet header/FCS 18 + preamble 8 + inter-frame gap 12
/// (IPv6 adds 20 more).
pub const WIRE_OVERHEAD: usize = 66;
pub const WIRE_OVERHEAD_IPV6: usize = 86;
/// Records moved from the queue to the encoder per step.
const FEED_BATCH: usize = 4096;
/// How long shutdown may spend sending what the queue still holds.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Token bucket in bytes; the bucket holds at most `burst` bytes, so the
/// sender never exceeds the rate over any window longer than burst/rate.
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
}

pub fn run(
    params: LinkParams,
    mut enc: Encoder,
    socket: LinkSocket,
    queue: Arc<Queue>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let origin = Instant::now();
    let now = || origin.elapsed().as_nanos() as Nanos;
    let frame_len = enc.max_frame_len();
    let batch_max = socket.batch_for(frame_len);
    let overhead = params.wire_overhead;
    let batch_bytes = batch_max * (frame_len + overhead);
    // Burst: two batches, or 2 ms at the link rate, whichever is larger.
    let burst = (2 * batch_bytes).max((params.rate_bps / 8 / 500) as usize);
    let mut pacer = Pacer::new(params.rate_bps, burst);
    tracing::info!(
        gso_segments = batch_max,
        frame_len,
        burst,
        "link thread started"
    );
    let mut buf = vec![0u8; batch_max * frame_len];
    let mut carry: Vec<u8> = Vec::with_capacity(frame_len);
    let mut records: Vec<Record> = Vec::with_capacity(FEED_BATCH);
    let mut last_publish = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    let mut flushed = false;
    let mut send_errors_logged = Instant::now() - Duration::from_secs(60);

    loop {
        let t = now();
        if stop.load(Ordering::Relaxed) && stopping_since.is_none() {
            stopping_since = Some(Instant::now());
        }
        if !enc.is_backlogged() {
            queue.pop_batch(&mut records, FEED_BATCH, Duration::ZERO);
            for r in records.drain(..) {
                enc.push(t, &r);
                Counters::add(&counters.records_sent, 1);
            }
        }
        if enc.poll_timeout().is_some_and(|d| d <= t) {
            enc.handle_timeout(t);
        }
        if let Some(since) = stopping_since {
            let queue_empty = queue.is_empty();
            if !flushed && (queue_empty || since.elapsed() > DRAIN_LIMIT) {
                if !queue_empty {
                    let mut abandoned = Vec::new();
                    queue.pop_batch(&mut abandoned, usize::MAX, Duration::ZERO);
                    Counters::add(&counters.queue_dropped_records, abandoned.len() as u64);
                    let bytes: usize = abandoned.iter().map(crate::queue::record_size).sum();
                    Counters::add(&counters.queue_dropped_bytes, bytes as u64);
                    for (stream, from, to) in ranges(&abandoned) {
                        tracing::warn!(
                            stream,
                            from,
                            to,
                            "shutdown: records still queued after {DRAIN_LIMIT:?} were not sent (queue_dropped_records)"
                        );
                    }
                }
                enc.flush(t);
                enc.heartbeat_now(t);
                flushed = true;
            }
            if flushed && enc.is_idle() && carry.is_empty() {
                publish(&mut enc, &counters);
                tracing::info!("link drained; sender stopping");
                return Ok(());
            }
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
            let Some(n) = enc.poll_frame(t, &mut buf[used..used + frame_len]) else {
                break;
            };
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
            if !wait.is_zero() {
                queue.pop_batch(&mut records, 0, wait.min(Duration::from_millis(50)));
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

/// (stream, first seq, last seq) runs of consecutive records.
fn ranges(records: &[Record]) -> Vec<(u32, u64, u64)> {
    let mut out: Vec<(u32, u64, u64)> = Vec::new();
    for r in records {
        match out
            .iter_mut()
            .find(|(s, _, to)| *s == r.stream && *to + 1 == r.seq)
        {
            Some(run) => run.2 = r.seq,
            None => out.push((r.stream, r.seq, r.seq)),
        }
    }
    out
}

/// Copies encoder statistics into the shared counters and hands the
/// counters to the encoder for its next heartbeat.
fn publish(enc: &mut Encoder, counters: &Counters) {
    let s = enc.stats();
    counters.blocks_sent.store(s.blocks, Ordering::Relaxed);
    counters
        .parity_frames
        .store(s.parity_frames, Ordering::Relaxed);
    enc.set_counters(counters.snapshot());
}
