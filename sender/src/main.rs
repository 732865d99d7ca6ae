//! `weir-sender`: the OT side of a weir link.
//!
//! Sources (tcp, stdin, generator) hand records to a bounded queue; the
//! link thread feeds them to the protocol encoder, which bundles them into
//! Reed-Solomon protected blocks, and sends the frames through a token
//! bucket pacer at the configured link rate. Nothing is ever read from the
//! link: there is no return path.

mod config;
mod link;
mod metrics;
mod queue;
mod sources;
mod udp;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use weir_protocol::Encoder;

use crate::metrics::Counters;
use crate::queue::Queue;
use crate::sources::SourceHandle;

#[derive(Parser)]
#[command(
    name = "weir-sender",
    version,
    about = "OT side of a weir one-way link: sources in, FEC-protected UDP frames out"
)]
struct Cli {
    /// Log format: text for a terminal or journald, json for log shippers.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sender with a configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file, print the effective configuration and its SHA-256.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Run { config } => run(&config),
    };
    if let Err(e) = result {
        eprintln!("weir-sender: error: {e:#}");
        std::process::exit(2);
    }
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn check_config(path: &Path) -> Result<()> {
    let loaded = config::load(path)?;
    let text = format!(
        "# {}: configuration is valid\n# effective configuration (defaults filled in):\n\n{}\n# sha256: {}\n",
        path.display(),
        loaded.effective_toml(),
        loaded.hash
    );
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    Ok(())
}

fn run(path: &Path) -> Result<()> {
    let loaded = config::load(path)?;
    let session: u64 = rand::random();
    // Sequence numbers start at 0 at every start, so every start is a new
    // epoch: the receiver records a sequence reset rather than duplicates.
    let epoch: u64 = rand::random();
    let counters = Arc::new(Counters::default());
    let queue = Arc::new(Queue::new(loaded.queue_bytes as usize, counters.clone()));
    let mut enc = Encoder::new(loaded.encoder_config(session));
    enc.set_config_hash(loaded.hash.clone());
    let sources = loaded.config.sources.clone();
    let names: Arc<Vec<String>> = Arc::new(sources.iter().map(|s| s.name().to_string()).collect());
    let streams: Vec<_> = sources
        .iter()
        .map(|s| enc.add_stream(s.name(), s.type_name(), 0, epoch))
        .collect();
    let link_cfg = &loaded.config.link;
    let socket = udp::LinkSocket::open(link_cfg.bind, link_cfg.destination, loaded.send_buffer)?;
    tracing::info!(
        session = format!("{session:016x}"),
        config_hash = %loaded.hash,
        destination = %link_cfg.destination,
        local = %socket.local_addr().map_or("?".into(), |a| a.to_string()),
        rate = %link_cfg.rate,
        data_shards = loaded.config.fec.data_shards,
        parity_shards = loaded.config.fec.parity_shards,
        interleave = loaded.config.fec.interleave,
        "weir-sender starting"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let link = {
        let (queue, counters, stop) = (queue.clone(), counters.clone(), stop.clone());
        let wire_overhead = if link_cfg.destination.is_ipv6() {
            link::WIRE_OVERHEAD_IPV6
        } else {
            link::WIRE_OVERHEAD
        };
        let params = link::LinkParams {
            rate_bps: loaded.rate_bps,
            wire_overhead,
        };
        std::thread::Builder::new()
            .name("weir-link".into())
            .spawn(move || link::run(params, enc, socket, queue, counters, stop))
            .context("starting the link thread")?
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let metrics_cfg = loaded.config.metrics.clone();
    let hash = loaded.hash.clone();
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (source, stream) in sources.into_iter().zip(streams) {
            let handle = SourceHandle::new(stream, 0, queue.clone(), counters.clone(), names.clone(), shutdown_rx.clone());
            let name = source.name().to_string();
            tasks.spawn(async move {
                if let Err(e) = source.run(handle).await {
                    tracing::error!(source = %name, "source stopped: {e:#}");
                }
            });
        }
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_log = Instant::now();
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; draining and stopping"); break; }
                _ = async { match sigterm.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {
                    tracing::info!("terminated; draining and stopping"); break;
                }
                done = tasks.join_next() => if done.is_none() {
                    tracing::info!("every source has finished; draining and stopping");
                    break;
                },
                _ = tick.tick() => {
                    if let Some(path) = &metrics_cfg.path {
                        let extra = [
                            ("session", serde_json::Value::from(format!("{session:016x}"))),
                            ("config_hash", serde_json::Value::from(hash.clone())),
                            ("uptime_s", serde_json::Value::from(started.elapsed().as_secs())),
                        ];
                        if let Err(e) = counters.write_file(path, &extra) {
                            tracing::warn!("metrics.path: cannot write {}: {e}", path.display());
                        }
                    }
                    if metrics_cfg.log_interval_s > 0 && last_log.elapsed().as_secs() >= metrics_cfg.log_interval_s {
                        last_log = Instant::now();
                        log_status(&counters);
                    }
                }
            }
        }
        let _ = shutdown_tx.send(true);
        stop.store(true, Ordering::Relaxed);
        queue.wake();
        tasks.shutdown().await;
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    let result = link
        .join()
        .map_err(|_| anyhow::anyhow!("the link thread panicked"))?;
    log_status(&counters);
    if let Some(path) = &loaded.config.metrics.path {
        let _ = counters.write_file(
            path,
            &[
                ("session", format!("{session:016x}").into()),
                ("config_hash", loaded.hash.clone().into()),
            ],
        );
    }
    result
}

fn log_status(counters: &Counters) {
    let s: std::collections::HashMap<String, u64> = counters.snapshot().into_iter().collect();
    tracing::info!(
        records_in = s["records_in"],
        records_sent = s["records_sent"],
        queue_dropped = s["queue_dropped_records"],
        datagrams = s["datagrams_sent"],
        wire_bytes = s["wire_bytes_sent"],
        send_errors = s["send_errors"],
        "status"
    );
}
