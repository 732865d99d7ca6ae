//! weir-udpblast: the raw UDP ceiling of this machine, to compare weir with.
//!
//! Sends and receives plain datagrams through quinn-udp, so it gets the
//! same kernel batching a tuned UDP application would (GSO on send: one
//! sendmsg carries up to 64 datagrams; GRO and recvmmsg on receive), and
//! counts bytes, datagrams, syscalls and CPU.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use quinn_udp::{RecvMeta, Transmit, BATCH_SIZE};
use weir_tests::cpu::{process_cpu_seconds, thread_cpu_seconds};
use weir_tests::net::{
    any_port_for, datagrams_in, BatchSocket, BufferSizes, Direction, MAX_GSO_PAYLOAD,
    WANTED_SOCKET_BUFFER,
};
use weir_tests::pacer::Pacer;
use weir_tests::report::print_json_line;
use weir_tests::units::{parse_bit_rate, parse_bytes};

/// Size of each receive buffer. A GRO-coalesced read holds at most 64 KiB
/// of payload; twice that leaves room so a read is never truncated.
const RECV_BUFFER: usize = 128 * 1024;

#[derive(Parser, Debug)]
#[command(
    name = "weir-udpblast",
    version,
    about = "Raw UDP throughput ceiling (GSO/GRO via quinn-udp), to compare weir against",
    long_about = "Raw UDP throughput ceiling of this machine, using quinn-udp so sends use GSO \
(up to 64 datagrams per sendmsg) and receives use GRO and recvmmsg where the kernel has them. \
Every mode prints one JSON line to stdout. MB = 10^6 bytes; rates given in bits per second \
count UDP payload only.\n\n\
  recv: count what arrives on --listen.\n\
  send: blast --bytes to --destination.\n\
  pair: both, on two threads of one process over 127.0.0.1, reporting loss and CPU.\n\n\
UDP over loopback drops whatever the receiver cannot keep up with; use --rate to find the \
loss-free rate."
)]
struct Cli {
    /// Send one datagram per sendmsg (no UDP GSO), as iperf3 -u does: the
    /// plain ceiling, next to the GSO one.
    #[arg(long, global = true)]
    no_gso: bool,
    #[command(subcommand)]
    command: Command,
}

/// Set once from --no-gso before any send.
static NO_GSO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Subcommand, Debug)]
enum Command {
    /// Receive and count datagrams; stop at --expect-bytes, after --idle-timeout
    /// without data (after the first byte), or after --timeout.
    Recv {
        /// Address to listen on, ip:port (port 0 picks one; printed as
        /// "listening on ADDR" on stderr).
        #[arg(long)]
        listen: SocketAddr,
        /// Stop once this many payload bytes arrived (binary suffixes: 1G).
        #[arg(long, value_parser = parse_bytes)]
        expect_bytes: Option<u64>,
        /// Stop after this many seconds overall.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// Stop after this many seconds without data, once data has arrived.
        #[arg(long, default_value_t = 2.0)]
        idle_timeout: f64,
    },
    /// Send --bytes of datagrams of --size bytes to --destination.
    Send {
        /// Where to send, ip:port.
        #[arg(long)]
        destination: SocketAddr,
        /// Total payload to send (binary suffixes: 200M, 1G).
        #[arg(long, value_parser = parse_bytes)]
        bytes: u64,
        /// Payload bytes per datagram (1472 fills a 1500-byte MTU).
        #[arg(long, default_value_t = 1472)]
        size: usize,
        /// Pace to this many payload bits per second (decimal: 800Mbit, 10Gbit).
        #[arg(long, value_parser = parse_bit_rate)]
        rate: Option<u64>,
        /// Local address to send from (default: any address, any port).
        #[arg(long)]
        bind: Option<SocketAddr>,
    },
    /// Sender and receiver threads in one process over 127.0.0.1.
    Pair {
        /// Total payload to send (binary suffixes: 200M, 1G).
        #[arg(long, value_parser = parse_bytes)]
        bytes: u64,
        /// Payload bytes per datagram (1472 fills a 1500-byte MTU).
        #[arg(long, default_value_t = 1472)]
        size: usize,
        /// Pace to this many payload bits per second (decimal: 800Mbit, 10Gbit).
        #[arg(long, value_parser = parse_bit_rate)]
        rate: Option<u64>,
        /// Give up after this many seconds overall.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
    },
}

fn seconds_arg(flag: &str, value: f64) -> Result<Duration> {
    if !(value.is_finite() && value >= 0.0) {
        bail!("{flag} {value} is not a number of seconds; use e.g. 30 or 0.5");
    }
    Ok(Duration::from_secs_f64(value))
}

fn check_size(size: usize) -> Result<()> {
    if !(1..=MAX_GSO_PAYLOAD).contains(&size) {
        bail!("--size {size} must be between 1 and {MAX_GSO_PAYLOAD} bytes");
    }
    Ok(())
}

#[derive(Debug, Default)]
struct SendReport {
    bytes: u64,
    datagrams: u64,
    sendmsg_calls: u64,
    send_errors: u64,
    /// Datagrams per sendmsg actually used (the GSO batch).
    gso_segments: usize,
    max_gso_segments: usize,
    seconds: f64,
    paced_seconds: f64,
    cpu_seconds: f64,
    buffers: Option<BufferSizes>,
}

impl SendReport {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "bytes_sent": self.bytes,
            "datagrams_sent": self.datagrams,
            "sendmsg_calls": self.sendmsg_calls,
            "send_errors": self.send_errors,
            "gso_segments": self.gso_segments,
            "max_gso_segments": self.max_gso_segments,
            "send_seconds": self.seconds,
            "paced_seconds": self.paced_seconds,
            "sender_cpu_seconds": self.cpu_seconds,
            "sender_so_sndbuf": self.buffers.map_or(0, |b| b.send),
        })
    }
}

async fn blast(
    sock: &BatchSocket,
    destination: SocketAddr,
    total: u64,
    size: usize,
    bits_per_second: Option<u64>,
) -> SendReport {
    let mut report = SendReport {
        buffers: Some(sock.buffers),
        max_gso_segments: sock.state.max_gso_segments(),
        ..Default::default()
    };
    let mut segments = if NO_GSO.load(std::sync::atomic::Ordering::Relaxed) {
        1
    } else {
        sock.gso_segments_for(size)
    };
    report.gso_segments = segments;
    let payload = vec![0x5au8; segments * size];
    let mut pacer = Pacer::new(bits_per_second.map(|b| (b / 8).max(1)));
    let started = Instant::now();
    let mut remaining = total;
    while remaining > 0 {
        let len = usize::try_from(remaining).map_or(segments * size, |r| r.min(segments * size));
        let transmit = Transmit {
            destination,
            ecn: None,
            contents: &payload[..len],
            segment_size: (len > size).then_some(size),
            src_ip: None,
        };
        pacer.pace(len as u64);
        report.sendmsg_calls += 1;
        match sock.send(&transmit).await {
            Ok(()) => {
                remaining -= len as u64;
                report.bytes += len as u64;
                report.datagrams += len.div_ceil(size) as u64;
            }
            Err(e) => {
                report.send_errors += 1;
                let now_segments = sock.gso_segments_for(size);
                if now_segments < segments {
                    // quinn-udp turned GSO off after EIO/EINVAL: retry the
                    // same bytes in smaller sends.
                    eprintln!("warning: GSO send failed ({e}); continuing without GSO");
                    segments = now_segments;
                    report.gso_segments = segments;
                } else {
                    // e.g. ECONNREFUSED: count these bytes as not sent.
                    if report.send_errors == 1 {
                        eprintln!(
                            "warning: sendmsg to {destination} failed: {e} (counting, continuing)"
                        );
                    }
                    remaining -= len as u64;
                }
            }
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.paced_seconds = pacer.slept().as_secs_f64();
    report.cpu_seconds = thread_cpu_seconds().unwrap_or(f64::NAN);
    report
}

#[derive(Debug, Default)]
struct RecvReport {
    bytes: u64,
    datagrams: u64,
    /// recvmmsg calls that returned data.
    recv_calls: u64,
    /// Buffers filled (one per datagram, or per GRO-coalesced group).
    buffers_filled: u64,
    /// Most datagrams seen coalesced into one buffer by GRO.
    max_gro_segments: u64,
    recv_errors: u64,
    first_byte: Option<Instant>,
    last_byte: Option<Instant>,
    cpu_seconds: f64,
    end: &'static str,
    buffers: Option<BufferSizes>,
    gro_segments: usize,
}

impl RecvReport {
    fn span(&self) -> f64 {
        match (self.first_byte, self.last_byte) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let span = self.span();
        serde_json::json!({
            "bytes_received": self.bytes,
            "datagrams_received": self.datagrams,
            "recv_calls": self.recv_calls,
            "buffers_filled": self.buffers_filled,
            "max_gro_segments_seen": self.max_gro_segments,
            "gro_segments_supported": self.gro_segments,
            "recv_errors": self.recv_errors,
            "first_byte_to_last_byte_seconds": span,
            "mb_per_s_first_to_last_byte": if span > 0.0 { self.bytes as f64 / span / 1e6 } else { 0.0 },
            "receiver_cpu_seconds": self.cpu_seconds,
            "receiver_so_rcvbuf": self.buffers.map_or(0, |b| b.recv),
            "end": self.end,
        })
    }
}

struct RecvLimits {
    expect_bytes: Option<u64>,
    deadline: Instant,
    idle_timeout: Duration,
    /// When set (pair mode), the idle timeout counts only from the moment
    /// the sender finished, so a slow or stalled sender is not mistaken for
    /// the end.
    sender_done: Option<Arc<OnceLock<Instant>>>,
}

impl RecvLimits {
    /// When to stop waiting for data, and why; "recheck" means wake up to
    /// see whether the sender has finished.
    fn wake(&self, last_byte: Option<Instant>) -> (Instant, &'static str) {
        let idle_from = match &self.sender_done {
            None => last_byte,
            Some(done) => match done.get() {
                Some(&d) => Some(last_byte.map_or(d, |t| t.max(d))),
                None => {
                    let recheck = Instant::now() + self.idle_timeout;
                    return if recheck < self.deadline {
                        (recheck, "recheck")
                    } else {
                        (self.deadline, "timeout")
                    };
                }
            },
        };
        match idle_from {
            Some(t) if t + self.idle_timeout < self.deadline => {
                (t + self.idle_timeout, "idle_timeout")
            }
            _ => (self.deadline, "timeout"),
        }
    }
}

async fn count(sock: &BatchSocket, limits: &RecvLimits) -> RecvReport {
    let mut report = RecvReport {
        buffers: Some(sock.buffers),
        gro_segments: sock.state.gro_segments(),
        ..Default::default()
    };
    let mut storage = vec![vec![0u8; RECV_BUFFER]; BATCH_SIZE];
    let mut slices: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    let mut metas = vec![RecvMeta::default(); BATCH_SIZE];
    loop {
        if limits.expect_bytes.is_some_and(|n| report.bytes >= n) {
            report.end = "expect_bytes";
            break;
        }
        let (wake, why) = limits.wake(report.last_byte);
        let received =
            tokio::time::timeout_at(wake.into(), sock.recv(&mut slices, &mut metas)).await;
        let n = match received {
            Err(_) if why == "recheck" => continue,
            Err(_) => {
                report.end = why;
                break;
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                // On loopback this is e.g. a stale ICMP error; keep going.
                report.recv_errors += 1;
                if report.recv_errors == 1 {
                    eprintln!("warning: recv failed: {e} (counting, continuing)");
                }
                continue;
            }
        };
        let now = Instant::now();
        report.recv_calls += 1;
        for meta in &metas[..n] {
            let datagrams = datagrams_in(meta) as u64;
            report.bytes += meta.len as u64;
            report.datagrams += datagrams;
            report.buffers_filled += 1;
            report.max_gro_segments = report.max_gro_segments.max(datagrams);
        }
        report.first_byte.get_or_insert(now);
        report.last_byte = Some(now);
    }
    report.cpu_seconds = thread_cpu_seconds().unwrap_or(f64::NAN);
    report
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a tokio runtime")
}

fn run_recv(listen: SocketAddr, limits: RecvLimits) -> Result<()> {
    let rt = current_thread_runtime()?;
    let report = rt.block_on(async {
        let sock = BatchSocket::bind(listen, Direction::Receive, WANTED_SOCKET_BUFFER, "receive")?;
        let local = sock
            .socket
            .local_addr()
            .context("reading the bound address")?;
        eprintln!("listening on {local}");
        anyhow::Ok(count(&sock, &limits).await)
    })?;
    let mut json = report.to_json();
    json["mode"] = "recv".into();
    print_json_line(&json)
}

fn run_send(
    destination: SocketAddr,
    bind: Option<SocketAddr>,
    bytes: u64,
    size: usize,
    rate: Option<u64>,
) -> Result<()> {
    check_size(size)?;
    let rt = current_thread_runtime()?;
    let report = rt.block_on(async {
        let sock = BatchSocket::bind(
            bind.unwrap_or(any_port_for(destination)),
            Direction::Send,
            WANTED_SOCKET_BUFFER,
            "send",
        )?;
        anyhow::Ok(blast(&sock, destination, bytes, size, rate).await)
    })?;
    let mut json = report.to_json();
    json["mode"] = "send".into();
    json["size"] = size.into();
    json["rate_bits_per_s"] = rate.into();
    json["mb_per_s_sent"] = if report.seconds > 0.0 {
        (report.bytes as f64 / report.seconds / 1e6).into()
    } else {
        0.0.into()
    };
    print_json_line(&json)
}

fn run_pair(bytes: u64, size: usize, rate: Option<u64>, timeout: Duration) -> Result<()> {
    check_size(size)?;
    let cpu_before = process_cpu_seconds()?;
    let started = Instant::now();
    // The receiver must be bound before the sender starts.
    let (addr_tx, addr_rx) = std::sync::mpsc::sync_channel::<Result<SocketAddr>>(1);
    let sender_done = Arc::new(OnceLock::new());
    let receiver_sender_done = Arc::clone(&sender_done);
    let receiver = std::thread::Builder::new()
        .name("blast-recv".into())
        .spawn(move || -> Result<RecvReport> {
            let rt = current_thread_runtime()?;
            rt.block_on(async move {
                let bound = BatchSocket::bind(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    Direction::Receive,
                    WANTED_SOCKET_BUFFER,
                    "receive",
                )
                .and_then(|s| Ok((s.socket.local_addr()?, s)));
                let sock = match bound {
                    Ok((addr, sock)) => {
                        let _ = addr_tx.send(Ok(addr));
                        sock
                    }
                    Err(e) => {
                        let _ = addr_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        return Err(e);
                    }
                };
                // After the sender finishes, whatever is still queued
                // arrives within microseconds on loopback; a gap this long
                // means the rest was dropped.
                let limits = RecvLimits {
                    expect_bytes: Some(bytes),
                    deadline: started + timeout,
                    idle_timeout: Duration::from_millis(250),
                    sender_done: Some(receiver_sender_done),
                };
                Ok(count(&sock, &limits).await)
            })
        })
        .context("spawning the receiver thread")?;
    let destination = addr_rx
        .recv()
        .context("the receiver thread exited before binding")??;
    let sender = std::thread::Builder::new()
        .name("blast-send".into())
        .spawn(move || -> Result<SendReport> {
            let rt = current_thread_runtime()?;
            let report = rt.block_on(async move {
                let sock = BatchSocket::bind(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    Direction::Send,
                    WANTED_SOCKET_BUFFER,
                    "send",
                )?;
                anyhow::Ok(blast(&sock, destination, bytes, size, rate).await)
            });
            let _ = sender_done.set(Instant::now());
            report
        })
        .context("spawning the sender thread")?;
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender thread panicked"))??;
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver thread panicked"))??;
    let cpu = process_cpu_seconds()? - cpu_before;

    let seconds = received
        .last_byte
        .map_or(0.0, |t| t.duration_since(started).as_secs_f64());
    let loss = |sent: u64, got: u64| {
        if sent == 0 {
            0.0
        } else {
            (sent.saturating_sub(got)) as f64 * 100.0 / sent as f64
        }
    };
    let mb_per_s = if seconds > 0.0 {
        received.bytes as f64 / seconds / 1e6
    } else {
        0.0
    };
    let mut json = serde_json::json!({
        "mode": "pair",
        "size": size,
        "rate_bits_per_s": rate,
        "bytes_sent": sent.bytes,
        "bytes_received": received.bytes,
        "loss_percent": loss(sent.bytes, received.bytes),
        "datagram_loss_percent": loss(sent.datagrams, received.datagrams),
        "seconds": seconds,
        "mb_per_s_received": mb_per_s,
        "gbit_per_s_received": mb_per_s * 8.0 / 1000.0,
        "cpu_seconds": cpu,
        "gso_segments": sent.gso_segments,
    });
    for part in [sent.to_json(), received.to_json()] {
        if let (Some(into), serde_json::Value::Object(from)) = (json.as_object_mut(), part) {
            for (k, v) in from {
                into.entry(k).or_insert(v);
            }
        }
    }
    print_json_line(&json)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    NO_GSO.store(cli.no_gso, std::sync::atomic::Ordering::Relaxed);
    match cli.command {
        Command::Recv {
            listen,
            expect_bytes,
            timeout,
            idle_timeout,
        } => {
            let limits = RecvLimits {
                expect_bytes,
                deadline: Instant::now() + seconds_arg("--timeout", timeout)?,
                idle_timeout: seconds_arg("--idle-timeout", idle_timeout)?,
                sender_done: None,
            };
            run_recv(listen, limits)
        }
        Command::Send {
            destination,
            bytes,
            size,
            rate,
            bind,
        } => run_send(destination, bind, bytes, size, rate),
        Command::Pair {
            bytes,
            size,
            rate,
            timeout,
        } => run_pair(bytes, size, rate, seconds_arg("--timeout", timeout)?),
    }
}
