//! `weir-demo`: the README's first command. Runs a loopback weir link on
//! this machine (generator → weir-sender → weir-linksim at 2% loss with
//! bursts → weir-receiver → file sink) for a while, prints a live line of
//! progress, then a summary and where the output is. No broker needed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::Value;

#[derive(Parser)]
#[command(about = "Run a loopback weir link with a lossy link simulator and show its progress")]
struct Args {
    /// Seconds to run the generator.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Points per second the generator produces.
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// Random loss on the simulated link (0.02 = 2%), plus bursts.
    #[arg(long, default_value_t = 0.02)]
    loss: f64,
    /// Where configs, outputs, the audit log and metrics go.
    #[arg(long, default_value = "demo-out")]
    dir: PathBuf,
    /// Base UDP/TCP port on 127.0.0.1 (uses this and the next one).
    #[arg(long, default_value_t = 47_100)]
    port: u16,
}

struct Running(Vec<(String, Child)>);

impl Drop for Running {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

fn read_json(path: &Path) -> Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_path_buf();
    for b in ["weir-sender", "weir-receiver", "weir-linksim"] {
        if !bin.join(b).exists() {
            bail!(
                "{} not found next to weir-demo; build the workspace first (make demo does)",
                b
            );
        }
    }
    let dir = std::path::absolute(&args.dir)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let (link_port, recv_port) = (args.port, args.port + 1);
    let d = dir.display();
    // The link key, made the way an operator makes one: both sides refuse
    // to start without [auth].
    let key = dir.join("link.key");
    let keygen = Command::new(bin.join("weir-sender"))
        .args(["keygen", "--out"])
        .arg(&key)
        .output()?;
    if !keygen.status.success() {
        bail!(
            "weir-sender keygen failed: {}",
            String::from_utf8_lossy(&keygen.stderr)
        );
    }
    print!("{}", String::from_utf8_lossy(&keygen.stdout));
    let k = key.display();
    std::fs::write(
        dir.join("sender.toml"),
        format!(
            "# weir-sender configuration used by the demo\n[link]\ndestination = \"127.0.0.1:{link_port}\"\nrate = \"1Gbit\"\n\n[auth]\nkey_file = \"{k}\"\n\n[spool]\npath = \"{d}/spool\"\n\n\
             [metrics]\npath = \"{d}/sender-metrics.json\"\nlog_interval_s = 0\n\n\
             [[sources]]\nname = \"plant/generator\"\ntype = \"generator\"\ntags = 500\nrate = {}\ncount = {}\n",
            args.rate,
            args.rate * args.seconds
        ),
    )?;
    std::fs::write(
        dir.join("receiver.toml"),
        format!(
            "# weir-receiver configuration used by the demo\n[link]\nlisten = \"127.0.0.1:{recv_port}\"\n\n\
             [auth]\nkey_files = [\"{k}\"]\n\n[audit]\npath = \"{d}/audit.jsonl\"\n\n[journal]\npath = \"{d}/state\"\n\n\
             [metrics]\npath = \"{d}/receiver-metrics.json\"\nlog_interval_s = 0\n\n\
             [[sinks]]\nname = \"files\"\ntype = \"file\"\nstreams = [\"*\"]\ndir = \"{d}/out\"\n"
        ),
    )?;
    let log = |name: &str| -> Result<Stdio> { Ok(std::fs::File::create(dir.join(name))?.into()) };
    let mut running = Running(Vec::new());
    let receiver = Command::new(bin.join("weir-receiver"))
        .args(["run", "--config"])
        .arg(dir.join("receiver.toml"))
        .stderr(log("receiver.log")?)
        .spawn()?;
    running.0.push(("receiver".into(), receiver));
    let linksim = Command::new(bin.join("weir-linksim"))
        .args([
            "--listen",
            &format!("127.0.0.1:{link_port}"),
            "--target",
            &format!("127.0.0.1:{recv_port}"),
        ])
        .args([
            "--seed",
            "2026",
            "--loss",
            &args.loss.to_string(),
            "--burst-start",
            "0.0005",
            "--burst-len",
            "12",
        ])
        .arg("--stats-file")
        .arg(dir.join("linksim.json"))
        .stderr(log("linksim.log")?)
        .spawn()?;
    running.0.push(("linksim".into(), linksim));
    std::thread::sleep(Duration::from_millis(300));
    let sender = Command::new(bin.join("weir-sender"))
        .args(["run", "--config"])
        .arg(dir.join("sender.toml"))
        .stderr(log("sender.log")?)
        .spawn()?;
    running.0.push(("sender".into(), sender));

    println!("weir demo: generator → weir-sender → weir-linksim ({:.1}% loss + bursts) → weir-receiver → file sink", args.loss * 100.0);
    println!(
        "           {} points/s for {} s; output in {d}\n",
        args.rate, args.seconds
    );
    let start = Instant::now();
    let (mut last_records, mut last_bytes, mut last_t) = (0u64, 0u64, Instant::now());
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let r = read_json(&dir.join("receiver-metrics.json"));
        let (records, bytes) = (num(&r, "records"), num(&r, "recv_bytes"));
        let dt = last_t.elapsed().as_secs_f64();
        println!(
            "  {:>3} s  {:>9.0} records/s  {:>7.2} MB/s  FEC repaired {:>5} blocks  gaps {} ({} records)",
            start.elapsed().as_secs(),
            (records - last_records) as f64 / dt,
            (bytes - last_bytes) as f64 / dt / 1e6,
            num(&r, "blocks_repaired"),
            num(&r, "gaps"),
            num(&r, "gap_records"),
        );
        (last_records, last_bytes, last_t) = (records, bytes, Instant::now());
        let sender = &mut running.0[2].1;
        if sender.try_wait()?.is_some() || start.elapsed() > Duration::from_secs(args.seconds + 30)
        {
            break;
        }
    }
    // Let the last blocks and the final heartbeat cross, then stop the rest.
    std::thread::sleep(Duration::from_secs(1));
    for name in ["receiver", "linksim"] {
        if let Some((_, c)) = running.0.iter_mut().find(|(n, _)| n == name) {
            signal(c, "TERM");
            let _ = c.wait();
        }
    }
    let s = read_json(&dir.join("sender-metrics.json"));
    let r = read_json(&dir.join("receiver-metrics.json"));
    let l = read_json(&dir.join("linksim.json"));
    let written = count_lines(&dir.join("out"));
    println!("\nsummary");
    println!(
        "  sender:   {} records in, {} datagrams, {} bytes on the wire",
        num(&s, "records_in"),
        num(&s, "datagrams_sent"),
        num(&s, "wire_bytes_sent")
    );
    println!(
        "  link:     {} datagrams in, {} dropped ({} in bursts), {} forwarded",
        num(&l, "received"),
        num(&l, "dropped_random") + num(&l, "dropped_burst"),
        num(&l, "dropped_burst"),
        num(&l, "forwarded")
    );
    println!(
        "  receiver: {} records written, {} blocks repaired by FEC, {} blocks lost, {} gaps ({} records)",
        written,
        num(&r, "blocks_repaired"),
        num(&r, "blocks_lost"),
        num(&r, "gaps"),
        num(&r, "gap_records")
    );
    let accounted = written + num(&r, "gap_records");
    let verdict = if accounted == num(&s, "records_in") {
        "every record is written or named in a gap"
    } else {
        "MISMATCH: see the logs"
    };
    println!(
        "  check:    {} written + {} in gaps = {} of {} sent: {verdict}",
        written,
        num(&r, "gap_records"),
        accounted,
        num(&s, "records_in")
    );
    println!("\noutput:     {d}/out/ (JSON Lines per stream)\naudit log:  {d}/audit.jsonl\nlogs:       {d}/sender.log, {d}/receiver.log, {d}/linksim.log");
    Ok(())
}

/// Lines of the sink's JSON Lines files (`*.jsonl`); the sink's own hidden
/// ledger of the files it created is not output.
fn count_lines(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .map(|b| b.iter().filter(|c| **c == b'\n').count() as u64)
        .sum()
}
