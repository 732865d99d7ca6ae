//! weir-tcpsink: accepts TCP connections one after another, hashes every
//! byte received, and reports the total and SHA-256 so an end-to-end test
//! can compare it with what weir-tcpfeed sent into the diode. For the
//! bench it also counts lines, measures the latency of JSON lines (arrival
//! minus their `ts`), and can hold off reading to play a lagging peer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use weir_tests::bench::{record_ts_ns, LatencySummary, LineSplitter};
use weir_tests::report::{print_json_line, sha256_hex, write_json_file};
use weir_tests::units::parse_bytes;

/// Read size; large enough that syscalls do not dominate at GB/s.
const READ_BUFFER: usize = 256 * 1024;

/// Longest line --count-lines/--latency keep whole; the sinks' JSON lines
/// of small records are a few hundred bytes.
const MAX_LINE: usize = 1 << 20;

/// Latency samples kept (8 MB): 1000 points/s for over 16 minutes. Later
/// lines are counted but not sampled (`latency_samples_capped`).
const MAX_LATENCY_SAMPLES: usize = 1 << 20;

/// How often --hold-until checks for its file.
const HOLD_POLL: Duration = Duration::from_millis(20);

#[derive(Parser, Debug)]
#[command(
    name = "weir-tcpsink",
    version,
    about = "Accept TCP connections one at a time, hash all bytes received, report JSON",
    long_about = "Listens on --listen and prints \"listening on ADDR\" to stderr once bound \
(with the real port when --listen ends in :0). Accepts connections one at a time, reads each \
to its end, and computes one SHA-256 over all bytes of all connections in arrival order.\n\n\
Stops when --expect-bytes have been received in total (or --expect-lines lines), or when no \
data has arrived for --idle-timeout seconds after the first byte, or after --timeout seconds \
overall. Then prints one JSON line to stdout (and writes it to --report): {\"bytes\":N,\
\"sha256\":\"hex\",\"seconds\":f,\"connections\":c,\"first_byte_to_last_byte_seconds\":f,\
\"read_errors\":e,\"end\":\"expect_bytes|expect_lines|idle_timeout|timeout\",\"lines\":n}. \
seconds runs from listening to the last byte (to the end if no byte came). With --latency the \
report adds \"latency\": {\"samples\",\"p50_ms\",\"p99_ms\",\"max_ms\"}, \"latency_unparsed\" \
and \"latency_samples_capped\": each line's arrival time minus its \"ts\" (RFC 3339), the \
clock of this machine on both ends.\n\n\
Exit status: 0, except 1 when --expect-bytes was given and fewer bytes arrived."
)]
struct Args {
    /// Address to listen on, ip:port (port 0 picks a free port).
    #[arg(long)]
    listen: SocketAddr,
    /// Stop once this many bytes have arrived in total (binary suffixes: 100M, 1G).
    #[arg(long, value_parser = parse_bytes)]
    expect_bytes: Option<u64>,
    /// Stop after this many seconds without data, counted from the first byte.
    #[arg(long, default_value_t = 30.0)]
    idle_timeout: f64,
    /// Stop after this many seconds overall.
    #[arg(long)]
    timeout: Option<f64>,
    /// Also write the JSON report to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// For benchmarks: count bytes without hashing them ("sha256" is then null).
    #[arg(long)]
    no_hash: bool,
    /// Count newline-terminated lines ("lines" in the report; 0 without it).
    #[arg(long)]
    count_lines: bool,
    /// Stop once this many lines have arrived (implies --count-lines).
    #[arg(long)]
    expect_lines: Option<u64>,
    /// Measure each line's latency: arrival time minus its JSON "ts"
    /// (implies --count-lines).
    #[arg(long)]
    latency: bool,
    /// Neither accept nor read until this file exists: a peer that has
    /// stopped reading (connections wait in the kernel's backlog and the
    /// writer's socket buffers fill).
    #[arg(long)]
    hold_until: Option<PathBuf>,
}

fn seconds_arg(flag: &str, value: f64) -> Result<Duration> {
    if !(value.is_finite() && value >= 0.0) {
        bail!("{flag} {value} is not a number of seconds; use e.g. 30 or 0.5");
    }
    Ok(Duration::from_secs_f64(value))
}

#[derive(Default)]
struct Tally {
    bytes: u64,
    connections: u64,
    read_errors: u64,
    first_byte: Option<Instant>,
    last_byte: Option<Instant>,
}

#[derive(Clone, Copy)]
enum End {
    ExpectBytes,
    ExpectLines,
    IdleTimeout,
    Timeout,
}

impl End {
    fn name(self) -> &'static str {
        match self {
            End::ExpectBytes => "expect_bytes",
            End::ExpectLines => "expect_lines",
            End::IdleTimeout => "idle_timeout",
            End::Timeout => "timeout",
        }
    }
}

struct Sink {
    expect_bytes: Option<u64>,
    idle_timeout: Duration,
    overall_deadline: Option<Instant>,
    tally: Tally,
    hasher: Sha256,
    hash: bool,
    /// Set with --count-lines, --expect-lines or --latency.
    lines: Option<LineSplitter>,
    expect_lines: Option<u64>,
    latency: bool,
    latency_ms: Vec<f64>,
    latency_unparsed: u64,
    latency_capped: u64,
    hold_until: Option<PathBuf>,
}

impl Sink {
    /// The earliest instant at which we stop waiting, and why.
    fn deadline(&self) -> Option<(Instant, End)> {
        let idle = self
            .tally
            .last_byte
            .map(|t| (t + self.idle_timeout, End::IdleTimeout));
        let overall = self.overall_deadline.map(|t| (t, End::Timeout));
        match (idle, overall) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    fn done(&self) -> Option<End> {
        if self.expect_bytes.is_some_and(|n| self.tally.bytes >= n) {
            return Some(End::ExpectBytes);
        }
        let lines = self.lines.as_ref().map_or(0, |l| l.lines);
        self.expect_lines
            .is_some_and(|n| lines >= n)
            .then_some(End::ExpectLines)
    }

    /// Counts the lines in `data` and, with --latency, samples each one.
    fn take_lines(&mut self, data: &[u8], arrival_ns: i64) {
        let Some(splitter) = self.lines.as_mut() else {
            return;
        };
        if !self.latency {
            splitter.feed(data, |_| {});
            return;
        }
        let (samples, unparsed, capped) = (
            &mut self.latency_ms,
            &mut self.latency_unparsed,
            &mut self.latency_capped,
        );
        splitter.feed(data, |line| match record_ts_ns(line) {
            Ok(ts) if samples.len() < MAX_LATENCY_SAMPLES => {
                samples.push(arrival_ns.saturating_sub(ts) as f64 / 1e6)
            }
            Ok(_) => *capped += 1,
            Err(_) => *unparsed += 1,
        });
    }

    async fn run(&mut self, listener: &TcpListener) -> End {
        let mut buf = vec![0u8; READ_BUFFER];
        if let Some(path) = self.hold_until.clone() {
            eprintln!("weir-tcpsink: not reading until {} exists", path.display());
            while !path.exists() {
                if let Some((at, why)) = self.deadline() {
                    if Instant::now() >= at {
                        return why;
                    }
                }
                tokio::time::sleep(HOLD_POLL).await;
            }
            eprintln!("weir-tcpsink: {} exists; reading", path.display());
        }
        loop {
            let accepted = match self.deadline() {
                Some((at, why)) => {
                    match tokio::time::timeout_at(at.into(), listener.accept()).await {
                        Ok(r) => r,
                        Err(_) => return why,
                    }
                }
                None => listener.accept().await,
            };
            let (mut stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // e.g. EMFILE or a connection reset before accept.
                    eprintln!("warning: accept failed: {e}");
                    self.tally.read_errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            self.tally.connections += 1;
            eprintln!(
                "weir-tcpsink: connection {} from {peer}",
                self.tally.connections
            );
            loop {
                let read = match self.deadline() {
                    Some((at, why)) => {
                        match tokio::time::timeout_at(at.into(), stream.read(&mut buf)).await {
                            Ok(r) => r,
                            Err(_) => return why,
                        }
                    }
                    None => stream.read(&mut buf).await,
                };
                match read {
                    Ok(0) => break,
                    Ok(n) => {
                        let now = Instant::now();
                        self.tally.first_byte.get_or_insert(now);
                        self.tally.last_byte = Some(now);
                        self.tally.bytes += n as u64;
                        if self.hash {
                            self.hasher.update(&buf[..n]);
                        }
                        let arrival_ns = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
                        self.take_lines(&buf[..n], arrival_ns);
                        if let Some(end) = self.done() {
                            return end;
                        }
                    }
                    Err(e) => {
                        eprintln!("warning: reading from {peer}: {e}");
                        self.tally.read_errors += 1;
                        break;
                    }
                }
            }
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let idle_timeout = seconds_arg("--idle-timeout", args.idle_timeout)?;
    let timeout = args
        .timeout
        .map(|t| seconds_arg("--timeout", t))
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding --listen {} (in use?)", args.listen))?;
        let local = listener.local_addr().context("reading the bound address")?;
        let started = Instant::now();
        eprintln!("listening on {local}");

        let mut sink = Sink {
            expect_bytes: args.expect_bytes,
            idle_timeout,
            overall_deadline: timeout.map(|t| started + t),
            tally: Tally::default(),
            hasher: Sha256::new(),
            hash: !args.no_hash,
            lines: (args.count_lines || args.expect_lines.is_some() || args.latency)
                .then(|| LineSplitter::new(MAX_LINE)),
            expect_lines: args.expect_lines,
            latency: args.latency,
            latency_ms: Vec::new(),
            latency_unparsed: 0,
            latency_capped: 0,
            hold_until: args.hold_until.clone(),
        };
        let end = sink.run(&listener).await;
        let ended = Instant::now();
        let t = &sink.tally;
        let seconds = t
            .last_byte
            .unwrap_or(ended)
            .duration_since(started)
            .as_secs_f64();
        let span = match (t.first_byte, t.last_byte) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let mut report = serde_json::json!({
            "bytes": t.bytes,
            "sha256": if sink.hash { sha256_hex(sink.hasher.clone()).into() } else { serde_json::Value::Null },
            "seconds": seconds,
            "connections": t.connections,
            "first_byte_to_last_byte_seconds": span,
            "read_errors": t.read_errors,
            "end": end.name(),
            "lines": sink.lines.as_ref().map_or(0, |l| l.lines),
        });
        if sink.latency {
            let summary = LatencySummary::of(sink.latency_ms.clone());
            report["latency"] = serde_json::to_value(summary).context("latency summary")?;
            report["latency_unparsed"] = sink.latency_unparsed.into();
            report["latency_samples_capped"] = sink.latency_capped.into();
        }
        print_json_line(&report)?;
        if let Some(path) = &args.report {
            write_json_file(path, &report)
                .with_context(|| format!("writing --report {}", path.display()))?;
        }
        if let Some(n) = args.expect_bytes {
            if t.bytes < n {
                bail!(
                    "expected {n} bytes (--expect-bytes) but received {} before {}",
                    t.bytes,
                    end.name()
                );
            }
        }
        if let Some(n) = args.expect_lines {
            let lines = sink.lines.as_ref().map_or(0, |l| l.lines);
            if lines < n {
                bail!(
                    "expected {n} lines (--expect-lines) but received {lines} before {}",
                    end.name()
                );
            }
        }
        Ok(())
    })
}
