//! weir-tcpfeed: writes a seeded pseudo-random byte stream to a TCP server
//! (e.g. weir-sender's TCP source) and reports its length and SHA-256, so
//! the far end of the diode can be checked byte for byte.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sha2::{Digest, Sha256};
use weir_tests::pacer::Pacer;
use weir_tests::pattern::{Pattern, CHUNK};
use weir_tests::report::{print_json_line, sha256_hex};
use weir_tests::units::parse_bytes;

/// Pause between connection attempts while the server is not up yet.
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Parser, Debug)]
#[command(
    name = "weir-tcpfeed",
    version,
    about = "Write N bytes of seeded pseudo-random data to a TCP server and print their SHA-256",
    long_about = "Connects to --connect (retrying until --connect-timeout), writes --bytes bytes \
of the ChaCha8 stream seeded by --seed in 64 KiB writes (optionally paced to --rate), shuts \
down the write side, closes, and prints one JSON line to stdout: \
{\"bytes\":N,\"sha256\":\"hex\",\"seconds\":f,\"connect_attempts\":n,\"paced_seconds\":f}. \
seconds runs from the established connection to the shutdown.\n\n\
Sizes take binary suffixes: 64K, 200M, 1G (= GiB), 1.5G."
)]
struct Args {
    /// Server to connect to, host:port.
    #[arg(long)]
    connect: String,
    /// Bytes to write, e.g. 100M or 1G (binary suffixes).
    #[arg(long, value_parser = parse_bytes)]
    bytes: u64,
    /// Seed of the data stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Limit the write rate, in bytes per second (binary suffixes, e.g. 10M).
    #[arg(long, value_parser = parse_bytes)]
    rate: Option<u64>,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
    /// For benchmarks: repeat one seeded 4 MiB block and skip hashing, so
    /// the feed costs almost no CPU ("sha256" is then null).
    #[arg(long)]
    no_hash: bool,
}

fn connect(target: &str, timeout: Duration) -> Result<(TcpStream, u64)> {
    let deadline = Instant::now() + timeout;
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let addrs: Vec<SocketAddr> = target
            .to_socket_addrs()
            .with_context(|| format!("resolving --connect {target:?} (expected host:port)"))?
            .collect();
        let mut last_error = None;
        for addr in &addrs {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(RETRY_INTERVAL);
            match TcpStream::connect_timeout(addr, left) {
                Ok(stream) => return Ok((stream, attempts)),
                Err(e) => last_error = Some(e),
            }
        }
        if Instant::now() >= deadline {
            let why = last_error.map_or("no addresses".to_string(), |e| e.to_string());
            bail!(
                "could not connect to --connect {target} within {:.1} s after {attempts} \
                 attempts (last error: {why}); is the server listening? raise --connect-timeout?",
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(RETRY_INTERVAL);
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !(args.connect_timeout.is_finite() && args.connect_timeout >= 0.0) {
        bail!(
            "--connect-timeout {} is not a number of seconds",
            args.connect_timeout
        );
    }
    if args.rate == Some(0) {
        bail!("--rate 0 would never send; omit --rate for unlimited");
    }
    let (mut stream, connect_attempts) =
        connect(&args.connect, Duration::from_secs_f64(args.connect_timeout))?;
    let peer = stream.peer_addr().context("reading the peer address")?;
    eprintln!("weir-tcpfeed: connected to {peer} after {connect_attempts} attempt(s)");
    let started = Instant::now();

    let mut pattern = Pattern::new(args.seed, args.bytes);
    let mut pacer = Pacer::new(args.rate);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let block: Vec<u8> = if args.no_hash {
        let mut block = vec![0u8; 4 << 20];
        Pattern::new(args.seed, block.len() as u64).next_chunk(&mut block);
        block
    } else {
        Vec::new()
    };
    loop {
        let len = if args.no_hash {
            let len = (args.bytes - written).min(CHUNK as u64) as usize;
            let at = (written as usize) % block.len();
            let len = len.min(block.len() - at);
            buf[..len].copy_from_slice(&block[at..at + len]);
            len
        } else {
            pattern.next_chunk(&mut buf)
        };
        if len == 0 {
            break;
        }
        pacer.pace(len as u64);
        if !args.no_hash {
            hasher.update(&buf[..len]);
        }
        stream.write_all(&buf[..len]).with_context(|| {
            format!(
                "writing to {peer} after {written} of {} bytes (peer closed?)",
                args.bytes
            )
        })?;
        written += len as u64;
    }
    stream.flush().context("flushing the TCP stream")?;
    stream
        .shutdown(Shutdown::Write)
        .with_context(|| format!("shutting down the write side to {peer}"))?;
    let seconds = started.elapsed().as_secs_f64();
    drop(stream);
    debug_assert_eq!(pattern.remaining(), 0);

    print_json_line(&serde_json::json!({
        "bytes": written,
        "sha256": if args.no_hash { serde_json::Value::Null } else { sha256_hex(hasher).into() },
        "seconds": seconds,
        "connect_attempts": connect_attempts,
        "paced_seconds": pacer.slept().as_secs_f64(),
    }))
}
