//! Prints the FEC tolerance table of docs/wire-format.md from the seeded
//! simulation (`weir_protocol::sim`): loss model × load → residual block
//! loss, records lost per million, parity overhead and latency, with the
//! sender's default `[fec]` settings. `make fec-table` runs it.

use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use clap::Parser;
use weir_protocol::sim::{run, LossModel, Outcome, Scenario};
use weir_protocol::units::parse_rate;
use weir_protocol::{EncoderConfig, NANOS_PER_MILLI, NANOS_PER_SEC};

#[derive(Parser)]
#[command(about = "Print weir's FEC tolerance table from the seeded simulation")]
struct Args {
    /// Records per row (the acceptance runs use 10,000,000).
    #[arg(long, default_value_t = 10_000_000)]
    records: u64,
    /// Link rate, as in the sender's `link.rate`.
    #[arg(long, default_value = "1Gbit")]
    rate: String,
    /// Loads to run, as shares of the rate (comma-separated).
    #[arg(long, default_value = "0.05,0.5,0.8")]
    loads: String,
    /// Only these models (comma-separated: random1, random5, random10, ge20, ge50, burst100, burst300); all by default.
    #[arg(long)]
    models: Option<String>,
    /// Seed of the loss model.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Records are handed over in batches every this many ms, as the
    /// generator source does (5); 0 hands each over at its own time.
    #[arg(long, default_value_t = 5)]
    tick_ms: u64,
    /// Parallel runs.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Instead of the defaults: `[fec] parity_shards`.
    #[arg(long)]
    parity_shards: Option<usize>,
    /// Instead of the defaults: `[fec] interleave`.
    #[arg(long)]
    interleave: Option<usize>,
    /// Instead of the defaults: `[fec] spare_parity_max`.
    #[arg(long)]
    spare_parity_max: Option<usize>,
    /// Instead of the defaults: `[fec] burst_tolerance`.
    #[arg(long)]
    burst_tolerance: Option<usize>,
    /// Instead of the defaults: `[fec] max_spread_ms`.
    #[arg(long)]
    max_spread_ms: Option<u64>,
    /// Instead of the defaults: `[fec] flush_ms`.
    #[arg(long)]
    flush_ms: Option<u64>,
}

fn models() -> Vec<(&'static str, LossModel)> {
    vec![
        ("random1", LossModel::Random { p: 0.01 }),
        ("random5", LossModel::Random { p: 0.05 }),
        ("random10", LossModel::Random { p: 0.10 }),
        ("ge20", LossModel::gilbert_elliott(20.0, 0.04)),
        ("ge50", LossModel::gilbert_elliott(50.0, 0.04)),
        (
            "burst100",
            LossModel::Periodic {
                len: 100,
                every: NANOS_PER_SEC,
            },
        ),
        (
            "burst300",
            LossModel::Periodic {
                len: 300,
                every: NANOS_PER_SEC,
            },
        ),
    ]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rate_bps = parse_rate(&args.rate).map_err(|e| anyhow::anyhow!("--rate: {e}"))?;
    let loads: Vec<f64> = args
        .loads
        .split(',')
        .map(|l| {
            l.trim()
                .parse::<f64>()
                .with_context(|| format!("--loads: `{l}` is not a number"))
        })
        .collect::<Result<_>>()?;
    if loads.iter().any(|l| !(*l > 0.0 && *l <= 1.0)) {
        bail!("--loads: each load must be above 0 and at most 1, e.g. 0.05,0.5,0.8");
    }
    let mut chosen = models();
    if let Some(list) = &args.models {
        let names: Vec<&str> = list.split(',').map(str::trim).collect();
        for n in &names {
            if !chosen.iter().any(|(m, _)| m == n) {
                bail!("--models: unknown model `{n}`; use random1, random5, random10, ge20, ge50, burst100 or burst300");
            }
        }
        chosen.retain(|(m, _)| names.contains(m));
    }
    let mut encoder = EncoderConfig::new(1);
    encoder.link_rate = rate_bps / 8;
    let mut changed = Vec::new();
    if let Some(v) = args.parity_shards {
        encoder.parity_shards = v;
        changed.push(format!("parity_shards {v}"));
    }
    if let Some(v) = args.interleave {
        encoder.interleave = v;
        encoder.max_queued_blocks = encoder.max_queued_blocks.max(2 * v);
        changed.push(format!("interleave {v}"));
    }
    if let Some(v) = args.spare_parity_max {
        encoder.spare_parity_max = v;
        changed.push(format!("spare_parity_max {v}"));
    }
    if let Some(v) = args.burst_tolerance {
        encoder.burst_tolerance = v;
        changed.push(format!("burst_tolerance {v}"));
    }
    if let Some(v) = args.max_spread_ms {
        encoder.max_spread = v * NANOS_PER_MILLI;
        changed.push(format!("max_spread_ms {v}"));
    }
    if let Some(v) = args.flush_ms {
        encoder.flush_after = v * NANOS_PER_MILLI;
        changed.push(format!("flush_ms {v}"));
    }
    encoder.validate().map_err(|e| {
        anyhow::anyhow!(
            "--{}: {}",
            e.key.rsplit('.').next().unwrap_or(e.key).replace('_', "-"),
            e.message
        )
    })?;
    let mut rows: Vec<(usize, LossModel, f64)> = Vec::new();
    for (_, model) in &chosen {
        for load in &loads {
            rows.push((rows.len(), *model, *load));
        }
    }
    let results: Mutex<Vec<(usize, Outcome)>> = Mutex::new(Vec::new());
    let queue = Mutex::new(rows.clone());
    std::thread::scope(|scope| {
        for _ in 0..args.jobs.max(1) {
            scope.spawn(|| loop {
                let Some((i, loss, load)) = queue.lock().expect("queue").pop() else {
                    return;
                };
                let outcome = run(&Scenario {
                    encoder: encoder.clone(),
                    load,
                    records: args.records,
                    loss,
                    seed: args.seed,
                    idle_every: 0,
                    idle_for: 0,
                    tick: args.tick_ms * NANOS_PER_MILLI,
                });
                eprintln!("done: {} at {:.0}%", loss.describe(), load * 100.0);
                results.lock().expect("results").push((i, outcome));
            });
        }
    });
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|(i, _)| *i);
    let what = if changed.is_empty() {
        "Defaults".to_string()
    } else {
        format!("Defaults except {}", changed.join(", "))
    };
    println!(
        "{what} (RS {}+{}, interleave {}, flush_ms {}, spare_parity_max {}, burst_tolerance {}, max_spread_ms {}), link {}, {} generator points per row (handed over every {} ms), seed {}:",
        encoder.data_shards,
        encoder.parity_shards,
        encoder.interleave,
        encoder.flush_after / 1_000_000,
        encoder.spare_parity_max,
        encoder.burst_tolerance,
        encoder.max_spread / 1_000_000,
        args.rate,
        args.records,
        args.tick_ms,
        args.seed
    );
    println!();
    println!("| loss model | load | datagrams lost | longest burst | blocks lost | records lost per million | parity / data bytes | latency p99 / max (ms) |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, o) in &results {
        let (_, model, load) = rows[*i];
        println!(
            "| {} | {:.0}% | {:.2}% | {} | {} of {} | {} | {:.2} | {:.1} / {:.1} |",
            model.describe(),
            load * 100.0,
            o.datagrams_lost as f64 * 100.0 / o.datagrams.max(1) as f64,
            o.longest_burst,
            o.blocks_lost,
            o.blocks,
            fmt_ppm(o.lost_per_million()),
            o.overhead(),
            o.latency_p99_ms,
            o.latency_max_ms,
        );
        if o.unaccounted != 0 {
            bail!(
                "{} at {load}: {} records neither delivered nor in a gap",
                model.describe(),
                o.unaccounted
            );
        }
    }
    Ok(())
}

fn fmt_ppm(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else {
        format!("{v:.1}")
    }
}
