//! weir-floor: what the work that weir's bulk path cannot avoid costs on
//! this machine, in CPU seconds per GB delivered, side by side with issue
//! 9's budget (sender 0.8, receiver 0.5 s/GB). It runs no weir process:
//! each part is the bare operation, done the cheapest way this tool
//! knows, on one thread whose CPU time (user + system, from /proc) is
//! taken:
//!
//! - **tcp receive / tcp send**: `--bytes` over one loopback TCP
//!   connection in `--chunk` reads and writes (the tcp source's reads; the
//!   tcp sink's writes);
//! - **log write + fsync**: `--bytes` written to a new file under `--dir`
//!   in `--chunk` writes, fsynced after every `--fsync-bytes` (the spool on
//!   the sender, the journal on the receiver);
//! - **log read**: that file read back in 1 MiB reads (the link reading
//!   the spool);
//! - **UDP send / receive**: the frames of `--bytes` at RS k+m and the
//!   MTU, through `weir-udpblast pair` (GSO sends, GRO receives) paced at
//!   `--rate`;
//! - **seal, CRC, RS**: each frame sealed with weir's AES-256-GCM (`Key::seal`)
//!   and its CRC32 taken, the parity of each block computed
//!   (`Fec::encode`); on the receiver only the data frames are opened
//!   (`Verifier::open`, after copying the sealed frame into place, as a
//!   receive does) and checked, since surplus parity is never read.
//!
//! On loopback a send also pays for the kernel's delivery into the peer's
//! socket, as it does in weir's bulk runs, so the parts are charged to
//! the same side there and here. The kernel's flusher threads, which
//! write the page cache out, are charged to neither.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;
use weir_protocol::fec::Fec;
use weir_protocol::frame::{shard_size_for_mtu, FRAME_OVERHEAD, HEADER_LEN, MAX_SHARDS};
use weir_protocol::{FrameId, Key, Verifier};
use weir_tests::cpu::thread_cpu_seconds;
use weir_tests::pattern::Pattern;
use weir_tests::report::print_json_line;
use weir_tests::units::{parse_bit_rate, parse_bytes};

/// Issue 9's CPU budget per GB delivered.
const SENDER_TARGET: f64 = 0.8;
const RECEIVER_TARGET: f64 = 0.5;
/// Read size of the log read-back.
const READ_BACK: usize = 1 << 20;
/// Distinct sealed frames the receiver's part opens in turn.
const SEALED_FRAMES: usize = 1024;

/// Each part: its JSON key and what it stands for, indexing `Run::seconds`.
const PARTS: [(&str, &str); 8] = [
    ("tcp_receive", "tcp receive (the tcp source)"),
    (
        "log_write_fsync",
        "log write + fsync (the spool; the journal)",
    ),
    ("log_read", "log read back (the link reads the spool)"),
    (
        "seal",
        "RS parity, AES-256-GCM seal and CRC32 of every frame",
    ),
    ("udp_send", "UDP send, GSO (loopback delivery included)"),
    ("udp_receive", "UDP receive, GRO"),
    ("open", "CRC32 and AES-256-GCM open of the data frames"),
    (
        "tcp_send",
        "tcp send (the tcp sink; loopback delivery included)",
    ),
];
const SENDER_PARTS: [usize; 5] = [0, 1, 2, 3, 4];
const RECEIVER_PARTS: [usize; 4] = [5, 6, 1, 7];

/// One run's CPU seconds per part (in `PARTS` order).
struct Run {
    seconds: [f64; 8],
    udp_loss: f64,
}

#[derive(Parser, Debug)]
#[command(
    name = "weir-floor",
    version,
    about = "CPU per GB of the operations weir's bulk path cannot avoid, on this machine",
    long_about = "Measures, one bare operation at a time, what the kernel and the frame \
protection cost per GB delivered: TCP in and out over loopback, writing, fsyncing and reading \
back a log file, sending and receiving the frames over UDP (weir-udpblast pair, which must be \
beside this binary), sealing, opening and CRC-checking frames with AES-256-GCM, and computing \
Reed-Solomon parity. Prints a markdown table and one JSON line (--json to a file). CPU s/GB = \
user + system seconds of the thread doing the part / GB (10^9 bytes) delivered."
)]
struct Args {
    /// Bytes delivered, as in a bulk run (binary suffixes: 1G).
    #[arg(long, value_parser = parse_bytes, default_value = "1G")]
    bytes: u64,
    /// Directory for the log file (the spool and journal's file system).
    #[arg(long, default_value = "/var/tmp/weir-floor")]
    dir: PathBuf,
    /// Size of each TCP read and write and each log write (the tcp
    /// source's default chunk).
    #[arg(long, value_parser = parse_bytes, default_value = "256K")]
    chunk: u64,
    /// Bytes between fsyncs of the log (`fsync_bytes` under load).
    #[arg(long, value_parser = parse_bytes, default_value = "4M")]
    fsync_bytes: u64,
    /// Data shards per block.
    #[arg(long, default_value_t = 32)]
    data_shards: usize,
    /// Parity shards per block.
    #[arg(long, default_value_t = 8)]
    parity_shards: usize,
    /// Link MTU.
    #[arg(long, default_value_t = 1500)]
    mtu: usize,
    /// Pace the UDP part to this many payload bits per second.
    #[arg(long, value_parser = parse_bit_rate, default_value = "4Gbit")]
    rate: u64,
    /// Runs of every part; each part's median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also write the JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// CPU seconds the calling thread spends in `f`.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let before = thread_cpu_seconds()?;
    let value = f()?;
    Ok((value, thread_cpu_seconds()? - before))
}

/// `len` bytes of the test pattern.
fn filled(len: usize) -> Vec<u8> {
    // The pattern fills whole CHUNKs: room for the last one.
    let chunk = weir_tests::pattern::CHUNK;
    let mut buf = vec![0u8; len.div_ceil(chunk).max(1) * chunk];
    let mut at = 0;
    let mut pattern = Pattern::new(9, len as u64);
    while at < len {
        at += pattern.next_chunk(&mut buf[at..]);
    }
    buf.truncate(len);
    buf
}

/// Reads `from` to its end through `buf`; the bytes read.
fn read_to_end(from: &mut impl Read, buf: &mut [u8], what: &str) -> Result<u64> {
    let mut got = 0u64;
    loop {
        match from.read(buf).context(what.to_string())? {
            0 => return Ok(got),
            n => got += n as u64,
        }
    }
}

/// (reader's CPU s, writer's CPU s) for `bytes` over one loopback connection.
fn tcp(bytes: u64, chunk: usize) -> Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback TCP port")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> Result<(u64, f64)> {
        let (mut stream, _) = listener.accept().context("accepting the TCP connection")?;
        let mut buf = vec![0u8; chunk];
        timed(|| read_to_end(&mut stream, &mut buf, "reading TCP"))
    });
    let data = filled(chunk);
    let mut stream = TcpStream::connect(addr).context("connecting over loopback")?;
    let ((), written) = timed(|| {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk as u64) as usize;
            stream.write_all(&data[..n]).context("writing TCP")?;
            left -= n as u64;
        }
        stream
            .shutdown(std::net::Shutdown::Write)
            .context("closing TCP")
    })?;
    let (got, read) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the TCP reader panicked"))??;
    if got != bytes {
        bail!("TCP delivered {got} of {bytes} bytes");
    }
    Ok((read, written))
}

/// (write + fsync CPU s, read-back CPU s) of a log file of `bytes` in `dir`.
fn log_file(dir: &Path, bytes: u64, chunk: usize, fsync_bytes: u64) -> Result<(f64, f64)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating --dir {}", dir.display()))?;
    let path = dir.join("floor.log");
    let data = filled(chunk);
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let ((), write) = timed(|| {
        let (mut left, mut unsynced) = (bytes, 0u64);
        while left > 0 {
            let n = left.min(chunk as u64) as usize;
            file.write_all(&data[..n]).context("writing the log file")?;
            left -= n as u64;
            unsynced += n as u64;
            if unsynced >= fsync_bytes || left == 0 {
                file.sync_data().context("fsyncing the log file")?;
                unsynced = 0;
            }
        }
        Ok(())
    })?;
    drop(file);
    let mut file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; READ_BACK];
    let (got, read) = timed(|| read_to_end(&mut file, &mut buf, "reading the log file back"))?;
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    if got != bytes {
        bail!("read back {got} of {bytes} bytes");
    }
    Ok((write, read))
}

struct Shape {
    k: usize,
    m: usize,
    shard: usize,
    blocks: u64,
}

impl Shape {
    fn frames(&self) -> u64 {
        self.blocks * (self.k + self.m) as u64
    }
    fn frame_len(&self) -> usize {
        self.shard + FRAME_OVERHEAD
    }
}

/// (sealing: RS + seal + CRC of every frame; opening: copy + CRC + open of
/// the data frames) in CPU s.
fn frames(shape: &Shape) -> Result<(f64, f64)> {
    let key = Key::from_bytes(&[7u8; 32]).expect("a 32-byte key");
    let session = 1u64;
    let (k, m, shard) = (shape.k, shape.m, shape.shard);
    let mut block = filled((k + m) * shard);
    let header = [0x5au8; HEADER_LEN];
    let mut fec = Fec::default();
    let mut crc = 0u32;
    let ((), seal) = timed(|| {
        for b in 0..shape.blocks {
            fec.encode(k, m, shard, &mut block);
            for (i, s) in block.chunks_mut(shard).enumerate() {
                let id = FrameId {
                    control: false,
                    block: b,
                    index: i as u16,
                };
                let tag = key.seal(session, id, &header, s);
                let mut h = crc32fast::Hasher::new();
                h.update(&header);
                h.update(s);
                h.update(&tag);
                crc ^= h.finalize();
            }
        }
        Ok(())
    })?;

    // Sealed frames to open: header, shard, tag (the CRC is checked over
    // all three, as the receiver does before it opens a frame).
    let mut sealed = Vec::with_capacity(SEALED_FRAMES);
    for i in 0..SEALED_FRAMES {
        let mut s = block[(i % k) * shard..][..shard].to_vec();
        let id = FrameId {
            control: false,
            block: (i / k) as u64,
            index: (i % k) as u16,
        };
        let tag = key.seal(session, id, &header, &mut s);
        s.extend_from_slice(&tag);
        sealed.push((id, s));
    }
    let mut verifier = Verifier::new(vec![key.clone()]).expect("one key");
    let key_id = key.id().0;
    let mut place = vec![0u8; shard + weir_protocol::auth::TAG_LEN];
    let data_frames = shape.blocks * k as u64;
    let ((), open) = timed(|| {
        for n in 0..data_frames {
            let (id, frame) = &sealed[(n % SEALED_FRAMES as u64) as usize];
            place.copy_from_slice(frame);
            let mut h = crc32fast::Hasher::new();
            h.update(&header);
            h.update(&place);
            crc ^= h.finalize();
            let (body, tag) = place.split_at_mut(shard);
            verifier
                .open(key_id, session, *id, &header, body, Some(tag))
                .map_err(|e| anyhow::anyhow!("opening a sealed frame: {e}"))?;
        }
        Ok(())
    })?;
    std::hint::black_box(crc);
    Ok((seal, open))
}

/// (sender thread CPU s, receiver thread CPU s, loss %) of weir-udpblast pair.
fn udp(shape: &Shape, rate: u64) -> Result<(f64, f64, f64)> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let blast = exe.with_file_name("weir-udpblast");
    let wire = shape.frames() * shape.frame_len() as u64;
    let out = Command::new(&blast)
        .args(["pair", "--bytes", &wire.to_string()])
        .args(["--size", &shape.frame_len().to_string()])
        .args(["--rate", &format!("{rate}")])
        .output()
        .with_context(|| format!("running {} (build it with `make build`)", blast.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            blast.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("parsing weir-udpblast's output {line:?}"))?;
    let number = |key: &str| {
        json[key]
            .as_f64()
            .with_context(|| format!("weir-udpblast's output has no {key}: {line}"))
    };
    Ok((
        number("sender_cpu_seconds")?,
        number("receiver_cpu_seconds")?,
        number("loss_percent")?,
    ))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let chunk = usize::try_from(args.chunk)
        .ok()
        .filter(|c| (1..=64 << 20).contains(c))
        .with_context(|| format!("--chunk {} must be between 1 byte and 64M", args.chunk))?;
    if args.bytes == 0 {
        bail!("--bytes must be more than 0");
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.data_shards == 0 || args.data_shards + args.parity_shards > MAX_SHARDS {
        bail!(
            "--data-shards {} + --parity-shards {} must be 1 to {} shards",
            args.data_shards,
            args.parity_shards,
            MAX_SHARDS
        );
    }
    let shard = shard_size_for_mtu(args.mtu)
        .with_context(|| format!("--mtu {} leaves no room for a 64-byte shard", args.mtu))?;
    let shape = Shape {
        k: args.data_shards,
        m: args.parity_shards,
        shard,
        blocks: args.bytes.div_ceil((args.data_shards * shard) as u64),
    };
    let gb = args.bytes as f64 / 1e9;
    let mut runs: Vec<Run> = Vec::new();
    for run in 1..=args.runs {
        eprintln!("weir-floor: run {run} of {}: tcp", args.runs);
        let (tcp_receive, tcp_send) = tcp(args.bytes, chunk)?;
        eprintln!("weir-floor: run {run}: log file in {}", args.dir.display());
        let (log_write, log_read) = log_file(&args.dir, args.bytes, chunk, args.fsync_bytes)?;
        eprintln!("weir-floor: run {run}: udp");
        let (udp_send, udp_receive, udp_loss) = udp(&shape, args.rate)?;
        eprintln!("weir-floor: run {run}: frames");
        let (seal, open) = frames(&shape)?;
        runs.push(Run {
            seconds: [
                tcp_receive,
                log_write,
                log_read,
                seal,
                udp_send,
                udp_receive,
                open,
                tcp_send,
            ],
            udp_loss,
        });
    }
    let median = |part: usize| {
        let mut v: Vec<f64> = runs.iter().map(|r| r.seconds[part] / gb).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let max_loss = runs.iter().map(|r| r.udp_loss).fold(0.0, f64::max);
    println!(
        "{} bytes delivered, median of {} runs; RS {}+{}, {}-byte frames ({} frames), {}-byte \
         chunks, fsync every {} bytes, UDP paced at {} bit/s (most lost in a run: {:.2}%)\n",
        args.bytes,
        args.runs,
        shape.k,
        shape.m,
        shape.frame_len(),
        shape.frames(),
        chunk,
        args.fsync_bytes,
        args.rate,
        max_loss
    );
    println!("| side | part | CPU s/GB |\n|---|---|---:|");
    let mut json = serde_json::Map::new();
    for (side, parts, target) in [
        ("sender", &SENDER_PARTS[..], SENDER_TARGET),
        ("receiver", &RECEIVER_PARTS[..], RECEIVER_TARGET),
    ] {
        let mut sum = 0.0;
        let mut fields = serde_json::Map::new();
        for &part in parts {
            let (key, name) = PARTS[part];
            let cost = median(part);
            println!("| {side} | {name} | {cost:.2} |");
            fields.insert(key.into(), cost.into());
            sum += cost;
        }
        println!("| {side} | **sum (issue 9's budget: {target})** | **{sum:.2}** |");
        fields.insert("sum".into(), sum.into());
        fields.insert("budget".into(), target.into());
        json.insert(side.into(), fields.into());
    }
    json.insert("bytes".into(), args.bytes.into());
    json.insert("runs".into(), args.runs.into());
    json.insert("udp_loss_percent_max".into(), max_loss.into());
    let json = serde_json::Value::Object(json);
    if let Some(path) = &args.json {
        weir_tests::report::write_json_file(path, &json)?;
    }
    print_json_line(&json)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parts_move_every_byte_and_open_every_frame_they_seal() {
        // tcp and log_file fail unless every byte written was read back;
        // frames fails unless every frame it sealed opens.
        tcp((3 << 20) + 17, 256 << 10).expect("all bytes over TCP");
        let dir = std::env::temp_dir().join(format!("weir-floor-test-{}", std::process::id()));
        log_file(&dir, (5 << 20) + 123, 256 << 10, 1 << 20).expect("all bytes read back");
        assert!(!dir.join("floor.log").exists(), "the log file is removed");
        std::fs::remove_dir_all(&dir).expect("removing the test directory");
        let shape = Shape {
            k: 4,
            m: 2,
            shard: 1408,
            blocks: 300,
        };
        assert_eq!(shape.frames(), 1800);
        frames(&shape).expect("every sealed frame opens");
        // Lengths that are not a whole number of pattern chunks (RS 64+16
        // blocks, a 100 KB --chunk) are filled too.
        for len in [80 * 1408, 100_000, 1] {
            assert_eq!(filled(len).len(), len);
        }
    }
}
