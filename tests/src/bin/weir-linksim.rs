//! weir-linksim: a one-way UDP relay that impairs the link between a weir
//! sender and receiver (loss; uniform, Gilbert–Elliott and periodic bursts;
//! reordering, duplication, corruption).
//!
//! Datagrams arriving on `--listen` go through the seeded decision logic in
//! `weir_tests::linksim` and out to `--target`; the relay passes each
//! batch's arrival time (monotonic, from its start) in, for the periodic
//! bursts. Nothing is ever sent back
//! towards the source: the listen socket is only read, the output socket is
//! only written.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use quinn_udp::{RecvMeta, Transmit, BATCH_SIZE};
use weir_tests::linksim::{ImpairmentConfig, Impairments};
use weir_tests::net::{
    any_port_for, datagrams_in, BatchSocket, Direction, GsoBatch, WANTED_SOCKET_BUFFER,
};
use weir_tests::report::write_json_file;

/// Size of each receive buffer. A GRO-coalesced read carries at most
/// 64 KiB, and so does a single datagram.
const RECV_BUFFER: usize = 65536;

/// How long the relay waits for input before treating the link as idle:
/// held (reordered) datagrams are released, the stop flag is checked.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// How often the stats file is rewritten, so a SIGKILL leaves recent numbers.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(
    name = "weir-linksim",
    version,
    about = "One-way UDP relay that simulates a lossy link (listen -> target, never back)",
    long_about = "One-way UDP relay that simulates a lossy link. Every datagram received on \
--listen is passed through the impairment model and what survives is sent to --target. \
Nothing is ever sent back towards the source.\n\n\
Impairment model, per arriving datagram, in this order (one seeded ChaCha8 stream; the same \
--seed and the same datagram sequence at the same times reproduce the same decisions; a step \
that drops a datagram ends its handling, so later steps make no draw for it):\n\
 1. Periodic bursts: with --burst-every-ms T and --burst-count N, a burst is due once per T: \
the first at a phase drawn (from --seed) uniformly within T after the first datagram \
arrives, then every T. At the first arrival at or after a due time, that datagram and the \
next N-1 arrivals are dropped (dropped_periodic). Periods with no arrival start no burst of \
their own; a burst due while the previous one has not yet dropped its N starts anew, so at \
fewer than N arrivals per T everything is dropped. A datagram's time is when the relay \
read its receive batch (recvmmsg), on a monotonic clock.\n\
 2. Uniform bursts: if one is in progress the datagram is dropped. Otherwise with \
probability --burst-start a burst begins: its length L is drawn uniformly from \
1..=--burst-len and this datagram and the next L-1 are dropped (dropped_burst).\n\
 3. Gilbert-Elliott bursts, geometric length: outside a burst, with probability --ge-start \
(P) a burst begins and this datagram is dropped (dropped_ge); inside one, with probability \
--ge-stay (Q) the datagram is dropped too, else the burst ends there and this datagram goes on to step 4 \
(no --ge-start draw for it). Mean burst 1/(1-Q); the model drops a fraction r/(1+r) of the \
datagrams it sees, r = P/(1-Q). --ge-mean-burst B --ge-loss F set Q = 1-1/B and \
P = F/(1-F)/B instead (mean burst 20 at 4% loss: Q = 0.95, P = 0.0020833).\n\
 4. Random loss: with probability --loss the datagram is dropped (dropped_random).\n\
 5. Corruption: with probability --corrupt 1 to 3 distinct random bits are flipped.\n\
 6. Duplication: with probability --duplicate it is sent twice.\n\
 7. Reordering: with probability --reorder it is held back and sent right after the next \
K arriving datagrams (K uniform in 1..=8). Held datagrams are also released when no input \
arrives for 50 ms, and on exit.\n\n\
On exit (end of --duration, SIGINT or SIGTERM) the counters are printed to stderr as JSON \
and written to --stats-file, which is also rewritten every second (atomically, so a SIGKILL \
leaves the last second's numbers). Counters: received, forwarded (sent without error), \
dropped_random, dropped_burst, bursts and longest_burst (the uniform model's), dropped_ge, \
ge_bursts, longest_ge_burst, dropped_periodic, periodic_bursts, longest_drop_run (most \
consecutive arrivals dropped, for any reason), reordered, duplicated, corrupted, \
send_errors (any send failure, e.g. ECONNREFUSED; counted, never fatal), recv_errors, held \
(still held back), recv_calls, send_calls, max_gro_segments_seen, max_gso_segments_used, \
seconds, listen_so_rcvbuf, target_so_sndbuf. Invariant once held is 0: received + \
duplicated = forwarded + send_errors + dropped_random + dropped_burst + dropped_ge + \
dropped_periodic.\n\n\
I/O is batched through quinn-udp (recvmmsg + GRO in, GSO out: runs of equal-sized \
datagrams leave in one sendmsg), which keeps datagram order and does not change decisions."
)]
struct Args {
    /// Address to receive datagrams on, ip:port (port 0 picks one; the
    /// actual address is printed as "listening on ADDR" on stderr).
    #[arg(long)]
    listen: SocketAddr,
    /// Address to forward surviving datagrams to, ip:port.
    #[arg(long)]
    target: SocketAddr,
    /// Seed for all random decisions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Independent drop probability per datagram, e.g. 0.02.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Probability per datagram of starting a loss burst.
    #[arg(long, default_value_t = 0.0)]
    burst_start: f64,
    /// Longest burst in datagrams; each burst's length is uniform in 1..=N.
    #[arg(long, default_value_t = 0)]
    burst_len: u32,
    /// Gilbert-Elliott: probability per datagram (outside a burst) of
    /// starting a burst of geometric length; this datagram is dropped.
    #[arg(long, default_value_t = 0.0)]
    ge_start: f64,
    /// Gilbert-Elliott: probability each datagram after a dropped one is
    /// dropped too; mean burst 1/(1-Q), e.g. 0.95 for 20.
    #[arg(long, default_value_t = 0.0)]
    ge_stay: f64,
    /// Gilbert-Elliott mean burst length in datagrams; with --ge-loss, sets
    /// --ge-stay and --ge-start.
    #[arg(long, requires = "ge_loss", conflicts_with_all = ["ge_start", "ge_stay"])]
    ge_mean_burst: Option<f64>,
    /// Fraction of datagrams the Gilbert-Elliott model drops in the long
    /// run, e.g. 0.04; with --ge-mean-burst.
    #[arg(long, requires = "ge_mean_burst", conflicts_with_all = ["ge_start", "ge_stay"])]
    ge_loss: Option<f64>,
    /// Period of the periodic bursts, in milliseconds (0: none).
    #[arg(long, default_value_t = 0.0)]
    burst_every_ms: f64,
    /// Consecutive arriving datagrams each periodic burst drops.
    #[arg(long, default_value_t = 0)]
    burst_count: u32,
    /// Probability a datagram is held back and sent after the next 1..=8.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Probability a datagram is sent twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Probability 1-3 random bits of a datagram are flipped.
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// Exit after this many seconds (default: run until SIGINT/SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    /// Write the counters as one JSON object here, every second and on exit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
}

/// The relay's own counters, on top of the impairment model's.
#[derive(Default)]
struct RelayCounters {
    forwarded: u64,
    send_errors: u64,
    recv_errors: u64,
    recv_calls: u64,
    send_calls: u64,
    max_gro_segments_seen: u64,
    max_gso_segments_used: u64,
}

struct Relay {
    local: SocketAddr,
    input: BatchSocket,
    output: BatchSocket,
    target: SocketAddr,
    sim: Impairments,
    counters: RelayCounters,
    batch: GsoBatch,
    started: Instant,
    stats_file: Option<PathBuf>,
}

impl Relay {
    fn stats(&self) -> serde_json::Value {
        let c = self.sim.counters();
        serde_json::json!({
            "received": c.received,
            "forwarded": self.counters.forwarded,
            "dropped_random": c.dropped_random,
            "dropped_burst": c.dropped_burst,
            "bursts": c.bursts,
            "longest_burst": c.longest_burst,
            "dropped_ge": c.dropped_ge,
            "ge_bursts": c.ge_bursts,
            "longest_ge_burst": c.longest_ge_burst,
            "dropped_periodic": c.dropped_periodic,
            "periodic_bursts": c.periodic_bursts,
            "longest_drop_run": c.longest_drop_run,
            "reordered": c.reordered,
            "duplicated": c.duplicated,
            "corrupted": c.corrupted,
            "send_errors": self.counters.send_errors,
            "recv_errors": self.counters.recv_errors,
            "held": self.sim.held(),
            "recv_calls": self.counters.recv_calls,
            "send_calls": self.counters.send_calls,
            "max_gro_segments_seen": self.counters.max_gro_segments_seen,
            "max_gso_segments_used": self.counters.max_gso_segments_used,
            "seconds": self.started.elapsed().as_secs_f64(),
            "listen_so_rcvbuf": self.input.buffers.recv,
            "target_so_sndbuf": self.output.buffers.send,
        })
    }

    fn write_stats(&self) {
        if let Some(path) = &self.stats_file {
            if let Err(e) = write_json_file(path, &self.stats()) {
                eprintln!("warning: {e:#}");
            }
        }
    }

    /// Sends `out` in order, packing runs of equal-sized datagrams into GSO
    /// sends.
    async fn send_all(&mut self, out: &mut Vec<Vec<u8>>) {
        for datagram in out.drain(..) {
            if !self
                .batch
                .fits(&datagram, self.output.state.max_gso_segments())
            {
                self.flush_batch().await;
            }
            self.batch.push(&datagram);
        }
        self.flush_batch().await;
    }

    async fn flush_batch(&mut self) {
        let count = self.batch.len();
        if count == 0 {
            return;
        }
        let gso_before = self.output.state.max_gso_segments();
        let transmit = self.batch.transmit(self.target);
        self.counters.send_calls += 1;
        match self.output.send(&transmit).await {
            Ok(()) => {
                self.counters.forwarded += count as u64;
                self.counters.max_gso_segments_used =
                    self.counters.max_gso_segments_used.max(count as u64);
            }
            Err(e) if count > 1 && self.output.state.max_gso_segments() < gso_before => {
                // quinn-udp turned GSO off after EIO/EINVAL: resend singly.
                eprintln!("warning: GSO send failed ({e}); continuing without GSO");
                for datagram in self.batch.datagrams() {
                    let single = Transmit {
                        contents: datagram,
                        segment_size: None,
                        ..transmit.clone()
                    };
                    self.counters.send_calls += 1;
                    match self.output.send(&single).await {
                        Ok(()) => self.counters.forwarded += 1,
                        Err(_) => self.counters.send_errors += 1,
                    }
                }
            }
            // ECONNREFUSED (target not up yet) and friends: the link is
            // one-way, so a lost datagram is the receiver's problem.
            Err(_) => self.counters.send_errors += count as u64,
        }
        self.batch.clear();
    }

    async fn run(mut self, stop: &AtomicBool) -> Self {
        let mut storage = vec![vec![0u8; RECV_BUFFER]; BATCH_SIZE];
        let mut slices: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut metas = vec![RecvMeta::default(); BATCH_SIZE];
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(4 * BATCH_SIZE);
        let mut next_stats = Instant::now() + STATS_INTERVAL;
        let mut last_error_report: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let received =
                tokio::time::timeout(IDLE_POLL, self.input.recv(&mut slices, &mut metas)).await;
            match received {
                Ok(Ok(n)) => {
                    self.counters.recv_calls += 1;
                    // One time for the batch: its datagrams arrived together.
                    let now_ns =
                        u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    for (meta, slice) in metas[..n].iter().zip(&slices) {
                        let data = &slice[..meta.len];
                        let stride = if meta.stride == 0 {
                            meta.len.max(1)
                        } else {
                            meta.stride
                        };
                        self.counters.max_gro_segments_seen = self
                            .counters
                            .max_gro_segments_seen
                            .max(datagrams_in(meta) as u64);
                        if data.is_empty() {
                            self.sim.process(now_ns, data, &mut out);
                        }
                        for datagram in data.chunks(stride) {
                            self.sim.process(now_ns, datagram, &mut out);
                        }
                    }
                    self.send_all(&mut out).await;
                }
                Err(_idle) => {
                    self.sim.flush(&mut out);
                    self.send_all(&mut out).await;
                }
                Ok(Err(e)) => {
                    self.counters.recv_errors += 1;
                    if last_error_report.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        eprintln!("warning: receiving on the listen socket: {e}");
                        last_error_report = Some(Instant::now());
                    }
                    // Do not spin if the error repeats.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            let now = Instant::now();
            if now >= next_stats {
                self.write_stats();
                next_stats = now + STATS_INTERVAL;
            }
        }
        self.sim.flush(&mut out);
        self.send_all(&mut out).await;
        self
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (ge_start, ge_stay) = match (args.ge_mean_burst, args.ge_loss) {
        (Some(mean_burst), Some(loss)) => ImpairmentConfig::ge_for(mean_burst, loss)?,
        _ => (args.ge_start, args.ge_stay),
    };
    let config = ImpairmentConfig {
        loss: args.loss,
        burst_start: args.burst_start,
        burst_len: args.burst_len,
        ge_start,
        ge_stay,
        burst_every_ms: args.burst_every_ms,
        burst_count: args.burst_count,
        reorder: args.reorder,
        duplicate: args.duplicate,
        corrupt: args.corrupt,
    };
    let sim = Impairments::new(config, args.seed)?;
    let duration = match args.duration {
        Some(d) if !(d.is_finite() && d >= 0.0) => {
            anyhow::bail!("--duration {d} is not a number of seconds; use e.g. 30 or 0.5")
        }
        Some(d) => Some(Duration::from_secs_f64(d)),
        None => None,
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the signal-handling runtime")?;
    // Install the handlers before anything else, so an early SIGTERM still
    // gets a clean exit with counters.
    let signals = {
        let _guard = runtime.enter();
        Signals::install()?
    };
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = Arc::clone(&stop);
    // The relay gets its own thread and runtime, so signal handling and
    // the --duration timer never compete with the datagram loop.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<()>>(1);
    let stats_file = args.stats_file.clone();
    let (listen, target, seed) = (args.listen, args.target, args.seed);
    let worker = std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || -> Result<Relay> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the relay runtime")?;
            rt.block_on(async move {
                let relay = match bind_relay(listen, target, sim, stats_file) {
                    Ok(relay) => relay,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                let local = relay.local;
                eprintln!(
                    "weir-linksim: relaying {local} -> {target} seed={seed} {config:?}, \
                     GSO up to {} segments, GRO up to {}",
                    relay.output.state.max_gso_segments(),
                    relay.input.state.gro_segments(),
                );
                eprintln!("listening on {local}");
                relay.write_stats();
                let _ = ready_tx.send(Ok(()));
                Ok(relay.run(&thread_stop).await)
            })
        })
        .context("spawning the relay thread")?;
    ready_rx
        .recv()
        .context("the relay thread exited before binding")??;
    let reason = runtime.block_on(signals.wait(duration));
    stop.store(true, Ordering::Relaxed);
    let relay = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the relay thread panicked"))??;
    relay.write_stats();
    eprintln!(
        "weir-linksim: exiting ({reason}); counters: {}",
        relay.stats()
    );
    Ok(())
}

fn bind_relay(
    listen: SocketAddr,
    target: SocketAddr,
    sim: Impairments,
    stats_file: Option<PathBuf>,
) -> Result<Relay> {
    let input = BatchSocket::bind(listen, Direction::Receive, WANTED_SOCKET_BUFFER, "listen")?;
    // The output socket is only ever written; nothing is read from it, and
    // the listen socket is never written: the relay is strictly one-way.
    let output = BatchSocket::bind(
        any_port_for(target),
        Direction::Send,
        WANTED_SOCKET_BUFFER,
        "target",
    )?;
    let local = input
        .socket
        .local_addr()
        .context("reading the listen socket's address")?;
    Ok(Relay {
        local,
        input,
        output,
        target,
        sim,
        counters: RelayCounters::default(),
        batch: GsoBatch::default(),
        started: Instant::now(),
        stats_file,
    })
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must be called inside a tokio runtime context.
    fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Waits for SIGTERM, SIGINT or the end of `duration`; says which.
    async fn wait(mut self, duration: Option<Duration>) -> &'static str {
        let timer = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = timer => "--duration elapsed",
        }
    }
}
