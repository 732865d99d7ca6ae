//! `weir-bench` (`make bench`): weir's throughput against a raw UDP ceiling
//! measured in the same run on the same machine. Not a test: it reports
//! ratios and never passes or fails on time.
//!
//! 1. Ceiling: `weir-udpblast pair` (1472-byte datagrams with GSO/GRO),
//!    paced from high to low until a rate loses under 0.5% of datagrams;
//!    plus the unpaced GSO figure and the one-datagram-per-syscall figure.
//! 2. weir: `weir-tcpfeed` → tcp source → weir-sender → UDP (loopback) →
//!    weir-receiver → tcp sink → `weir-tcpsink`, MTU 1500, RS(64,16) = 20%
//!    parity, the sender paced at `--rate`; frames authenticated
//!    (HMAC-SHA256, a key made by `weir-sender keygen`), then the same with
//!    `[auth] disabled = true` on both sides, to show what authentication
//!    costs in the same run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Measure weir's throughput against a raw UDP ceiling on this machine")]
struct Args {
    /// Bytes pushed through each run (binary suffixes).
    #[arg(long, default_value = "1G")]
    bytes: String,
    /// Link rate the weir sender is paced at.
    #[arg(long, default_value = "4Gbit")]
    rate: String,
    /// weir runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Scratch directory.
    #[arg(long, default_value = "/var/tmp/weir-bench")]
    dir: PathBuf,
}

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn bin(name: &str) -> Result<PathBuf> {
    let p = std::env::current_exe()?
        .parent()
        .context("bin dir")?
        .join(name);
    if !p.exists() {
        bail!(
            "{} missing; run `make bench` (it builds everything first)",
            p.display()
        );
    }
    Ok(p)
}

fn run_json(cmd: &mut Command) -> Result<Value> {
    let out = cmd.stderr(Stdio::null()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .with_context(|| format!("parsing output: {text}"))
}

/// (CPU seconds, peak resident KiB) of a running process, from /proc.
fn proc_usage(pid: u32) -> (f64, u64) {
    let ticks = 100.0; // USER_HZ is 100 on Linux
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let cpu = (f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0))
        / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

fn read_json(p: &Path) -> Value {
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .unwrap_or(47_500)
}

/// `[auth]` tables for both sides: a fresh key in `dir`, or disabled.
fn auth_tables(dir: &Path, auth: bool) -> Result<(String, String)> {
    if !auth {
        let off = "[auth]\ndisabled = true\n".to_string();
        return Ok((off.clone(), off));
    }
    let key = dir.join("link.key");
    let out = Command::new(bin("weir-sender")?)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()?;
    if !out.status.success() {
        bail!(
            "weir-sender keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let k = key.display();
    Ok((
        format!("[auth]\nkey_file = \"{k}\"\n"),
        format!("[auth]\nkey_files = [\"{k}\"]\n"),
    ))
}

fn weir_run(args: &Args, run: usize, store: &Path, auth: bool) -> Result<Value> {
    let dir = args.dir.join(format!("run{run}"));
    // Spool and journal live under `store` (tmpfs or disk).
    let st = store.join(format!("run{run}"));
    let _ = std::fs::remove_dir_all(&st);
    std::fs::create_dir_all(&st)?;
    let st = st.display();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (link, src, dst) = (free_port(), free_port(), free_port());
    let d = dir.display();
    let (sender_auth, receiver_auth) = auth_tables(&dir, auth)?;
    std::fs::write(
        dir.join("receiver.toml"),
        format!(
            "{receiver_auth}[link]\nlisten = \"127.0.0.1:{link}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{st}/journal\"\n\
             [metrics]\npath = \"{d}/receiver.json\"\nlog_interval_s = 0\n\
             [[sinks]]\nname = \"replay\"\ntype = \"tcp\"\nconnect = \"127.0.0.1:{dst}\"\n"
        ),
    )?;
    std::fs::write(
        dir.join("sender.toml"),
        format!(
            "{sender_auth}[link]\ndestination = \"127.0.0.1:{link}\"\nrate = \"{}\"\nmtu = 1500\n[fec]\ndata_shards = 64\nparity_shards = 16\n[spool]\npath = \"{st}/spool\"\n\
             [metrics]\npath = \"{d}/sender.json\"\nlog_interval_s = 0\n\
             [[sources]]\nname = \"raw\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{src}\"\n",
            args.rate
        ),
    )?;
    let log = |n: &str| -> Result<Stdio> { Ok(std::fs::File::create(dir.join(n))?.into()) };
    let mut procs = Kill(Vec::new());
    let sink = Command::new(bin("weir-tcpsink")?)
        .args([
            "--no-hash",
            "--listen",
            &format!("127.0.0.1:{dst}"),
            "--expect-bytes",
            &args.bytes,
            "--timeout",
            "120",
            "--idle-timeout",
            "5",
        ])
        .arg("--report")
        .arg(dir.join("sink.json"))
        .stdout(Stdio::null())
        .stderr(log("tcpsink.log")?)
        .spawn()?;
    procs.0.push(sink);
    let receiver = Command::new(bin("weir-receiver")?)
        .args(["run", "--config"])
        .arg(dir.join("receiver.toml"))
        .stderr(log("receiver.log")?)
        .spawn()?;
    let receiver_pid = receiver.id();
    procs.0.push(receiver);
    let sender = Command::new(bin("weir-sender")?)
        .args(["run", "--config"])
        .arg(dir.join("sender.toml"))
        .stderr(log("sender.log")?)
        .spawn()?;
    let sender_pid = sender.id();
    procs.0.push(sender);
    std::thread::sleep(Duration::from_millis(500));
    let feed = run_json(Command::new(bin("weir-tcpfeed")?).args([
        "--no-hash",
        "--connect",
        &format!("127.0.0.1:{src}"),
        "--bytes",
        &args.bytes,
    ]))?;
    let started = Instant::now();
    while procs.0[0].try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(130) {
            bail!("tcpsink did not finish; see {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (sender_cpu, sender_kib) = proc_usage(sender_pid);
    let (receiver_cpu, receiver_kib) = proc_usage(receiver_pid);
    std::thread::sleep(Duration::from_millis(1200)); // one more metrics snapshot
    let sink = read_json(&dir.join("sink.json"));
    let s = read_json(&dir.join("sender.json"));
    let r = read_json(&dir.join("receiver.json"));
    let bytes = sink["bytes"].as_f64().unwrap_or(0.0);
    let span = sink["first_byte_to_last_byte_seconds"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let wire = s["wire_bytes_sent"].as_f64().unwrap_or(0.0);
    let gb = bytes / 1e9;
    Ok(json!({
        "bytes_fed": feed["bytes"], "bytes_delivered": bytes, "seconds": span,
        "goodput_mb_s": bytes / span / 1e6, "wire_mb_s": wire / span / 1e6,
        "datagrams": s["datagrams_sent"], "receiver_gaps": r["gaps"], "blocks_lost": r["blocks_lost"],
        "sender_cpu_s_per_gb": sender_cpu / gb, "receiver_cpu_s_per_gb": receiver_cpu / gb,
        "sender_peak_mib": sender_kib as f64 / 1024.0, "receiver_peak_mib": receiver_kib as f64 / 1024.0,
    }))
}

/// Runs weir `args.runs` times with its spool and journal under `root`;
/// prints each run and returns the median by wire rate.
fn run_variant(args: &Args, label: &str, root: &Path, auth: bool) -> Result<Value> {
    println!("\nweir, {label}:");
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let r = weir_run(args, i, root, auth)?;
        println!(
            "  run {}: {:.0} MB/s goodput, {:.0} MB/s wire ({:.2} s), gaps {}, CPU s/GB sender {:.2} receiver {:.2}",
            i + 1,
            r["goodput_mb_s"].as_f64().unwrap_or(0.0),
            r["wire_mb_s"].as_f64().unwrap_or(0.0),
            r["seconds"].as_f64().unwrap_or(0.0),
            r["receiver_gaps"],
            r["sender_cpu_s_per_gb"].as_f64().unwrap_or(0.0),
            r["receiver_cpu_s_per_gb"].as_f64().unwrap_or(0.0),
        );
        runs.push(r);
    }
    runs.sort_by(|a, b| {
        a["wire_mb_s"]
            .as_f64()
            .partial_cmp(&b["wire_mb_s"].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Ok(runs[runs.len() / 2].clone())
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let rmem = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .unwrap_or_default()
        .trim()
        .to_string();
    println!(
        "weir-bench: {} per run, MTU 1500 (1472-byte UDP payloads), net.core.rmem_max = {rmem}",
        args.bytes
    );

    // 1. The raw UDP ceiling.
    let blast = bin("weir-udpblast")?;
    let unpaced = run_json(Command::new(&blast).args(["pair", "--bytes", &args.bytes]))?;
    let plain = run_json(Command::new(&blast).args(["--no-gso", "pair", "--bytes", &args.bytes]))?;
    // The ceiling: the most any run delivered while losing under 0.5%
    // (unpaced GSO runs vary from lossless to heavy loss between runs).
    let mut ceiling = Value::Null;
    let mut candidates = vec![("unpaced", unpaced.clone())];
    for rate in ["80Gbit", "60Gbit", "40Gbit", "30Gbit", "20Gbit", "10Gbit"] {
        candidates.push((
            rate,
            run_json(Command::new(&blast).args(["pair", "--bytes", &args.bytes, "--rate", rate]))?,
        ));
    }
    for (rate, r) in candidates {
        let mb_s = r["mb_per_s_received"].as_f64().unwrap_or(0.0);
        if r["loss_percent"].as_f64().unwrap_or(100.0) < 0.5
            && mb_s > ceiling["mb_s"].as_f64().unwrap_or(0.0)
        {
            ceiling = json!({ "rate": rate, "mb_s": mb_s, "loss_percent": r["loss_percent"], "cpu_s": r["cpu_seconds"] });
        }
    }
    let ceiling_mb_s = ceiling["mb_s"].as_f64().unwrap_or(f64::NAN);
    println!("\nraw UDP ceiling (weir-udpblast pair, sender and receiver threads in one process):");
    println!(
        "  GSO/GRO, unpaced:            {:>8.0} MB/s received, {:.1}% lost",
        unpaced["mb_per_s_received"].as_f64().unwrap_or(0.0),
        unpaced["loss_percent"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  GSO/GRO, best run <0.5% loss: {:>7.0} MB/s ({}; the ceiling used below)",
        ceiling_mb_s,
        ceiling["rate"].as_str().unwrap_or("none")
    );
    println!(
        "  one datagram per syscall:    {:>8.0} MB/s received, {:.1}% lost",
        plain["mb_per_s_received"].as_f64().unwrap_or(0.0),
        plain["loss_percent"].as_f64().unwrap_or(0.0)
    );

    // 2. weir, with spool and journal in memory (tmpfs), then on disk.
    let memory_root = PathBuf::from("/dev/shm/weir-bench");
    let memory = run_variant(
        &args,
        "spool and journal on tmpfs (/dev/shm), frames authenticated",
        &memory_root,
        true,
    )?;
    let _ = std::fs::remove_dir_all(&memory_root);
    let no_auth = run_variant(
        &args,
        "spool and journal on tmpfs (/dev/shm), [auth] disabled = true",
        &memory_root,
        false,
    )?;
    let _ = std::fs::remove_dir_all(&memory_root);
    let disk_root = args.dir.join("store");
    let disk = run_variant(
        &args,
        &format!("spool and journal on disk ({})", disk_root.display()),
        &disk_root,
        true,
    )?;
    let _ = std::fs::remove_dir_all(&disk_root);
    println!(
        "\nsummary (median of {} runs each, sender paced at {}):",
        args.runs, args.rate
    );
    for (label, m) in [("tmpfs", &memory), ("noauth", &no_auth), ("disk", &disk)] {
        let wire = m["wire_mb_s"].as_f64().unwrap_or(0.0);
        println!(
            "  {label:<5} goodput {:>6.0} MB/s, wire {:>6.0} MB/s, wire/ceiling {:.2}, wire/plain {:.2}, CPU s/GB sender {:.2} receiver {:.2}, peak MiB sender {:.0} receiver {:.0}, gaps {}",
            m["goodput_mb_s"].as_f64().unwrap_or(0.0),
            wire,
            wire / ceiling_mb_s,
            wire / plain["mb_per_s_received"].as_f64().unwrap_or(f64::NAN),
            m["sender_cpu_s_per_gb"].as_f64().unwrap_or(0.0),
            m["receiver_cpu_s_per_gb"].as_f64().unwrap_or(0.0),
            m["sender_peak_mib"].as_f64().unwrap_or(0.0),
            m["receiver_peak_mib"].as_f64().unwrap_or(0.0),
            m["receiver_gaps"],
        );
    }
    println!(
        "  disk / tmpfs goodput: {:.2}  (GSO ceiling {:.0} MB/s, one datagram per syscall {:.0} MB/s)",
        disk["goodput_mb_s"].as_f64().unwrap_or(0.0) / memory["goodput_mb_s"].as_f64().unwrap_or(f64::NAN),
        ceiling_mb_s,
        plain["mb_per_s_received"].as_f64().unwrap_or(0.0)
    );
    let f = |m: &Value, k: &str| m[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "  authentication on / off (tmpfs): goodput {:.2}, CPU s/GB sender {:.2} vs {:.2} (+{:.2}), receiver {:.2} vs {:.2} (+{:.2})",
        f(&memory, "goodput_mb_s") / f(&no_auth, "goodput_mb_s"),
        f(&memory, "sender_cpu_s_per_gb"),
        f(&no_auth, "sender_cpu_s_per_gb"),
        f(&memory, "sender_cpu_s_per_gb") - f(&no_auth, "sender_cpu_s_per_gb"),
        f(&memory, "receiver_cpu_s_per_gb"),
        f(&no_auth, "receiver_cpu_s_per_gb"),
        f(&memory, "receiver_cpu_s_per_gb") - f(&no_auth, "receiver_cpu_s_per_gb"),
    );
    let report = json!({ "ceiling": ceiling, "unpaced": unpaced, "plain": plain, "tmpfs": memory, "tmpfs_auth_disabled": no_auth, "disk": disk, "rmem_max": rmem, "rate": args.rate });
    std::fs::write(
        args.dir.join("bench.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    println!("\nfull report: {}", args.dir.join("bench.json").display());
    Ok(())
}
