//! `weir-sender`: the OT side of a weir link.
//!
//! Sources (tcp, stdin, generator) append records to a bounded disk spool;
//! the link thread feeds them to the protocol encoder, which bundles them into
//! Reed-Solomon protected blocks, and sends the frames through a token
//! bucket pacer at the configured link rate. Nothing is ever read from the
//! link: there is no return path. Every frame carries an HMAC-SHA256 tag
//! made with the `[auth] key_file` key (see `weir_protocol::auth`);
//! `weir-sender keygen` writes such a key.

mod config;
mod fatal;
mod link;
mod metrics;
mod resend_file;
mod send_file;
mod sources;
mod spool;
mod udp;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use weir_protocol::{Encoder, Signer};

use crate::metrics::Counters;
use crate::sources::SourceHandle;
use crate::spool::{SharedSpool, Spool};

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
    /// Ask the running sender to send a retained range of a stream again
    /// (after the IT side reports a gap), or one file a `files` source sent
    /// (`--file NAME`, after the receiver kept it incomplete). The receiver
    /// delivers only what it lacks and audits the gap as recovered, or
    /// completes the file.
    Resend {
        #[arg(long, short)]
        config: PathBuf,
        /// Stream name, as in the audit log.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        stream: Option<String>,
        /// First sequence number to send again.
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        from: Option<u64>,
        /// Last sequence number (inclusive); default: the newest retained.
        #[arg(long, conflicts_with = "file")]
        to: Option<u64>,
        /// A file a `files` source sent, by its path relative to the
        /// source's `dir`, as the receiver's `file` audit line names it.
        #[arg(long)]
        file: Option<String>,
        /// With --file: the `files` source, when several sent that name.
        #[arg(long, requires = "file")]
        source: Option<String>,
        /// With --file: send the content of this file (a copy of the one
        /// sent: same size and SHA-256) instead of looking for it.
        #[arg(long, requires = "file")]
        path: Option<PathBuf>,
        /// With --file: send it from disk even if the spool still holds it
        /// (when a spool resend did not complete it: the receiver takes
        /// from the spool only what its open gaps lack).
        #[arg(long, requires = "file")]
        from_disk: bool,
    },
    /// Send files or directories through the running sender: copies them
    /// atomically into its `files` source's `dir`, shows progress (bytes,
    /// rate, ETA) until the sender has spooled them, and prints a summary.
    /// Exits non-zero if a file cannot be read.
    SendFile {
        #[arg(long, short)]
        config: PathBuf,
        /// The `files` source to use, when the config has several.
        #[arg(long)]
        source: Option<String>,
        /// Return once copied, without waiting for the sender to take them.
        #[arg(long)]
        no_wait: bool,
        /// Files and directories (sent with their own name and structure).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Write a new random 32-byte link key (raw bytes) to FILE with mode
    /// 0600. Refuses to overwrite an existing file. Give the same file to
    /// the sender (`[auth] key_file`) and the receiver (`[auth] key_files`).
    Keygen {
        /// The key file to create; must not exist.
        #[arg(long)]
        out: PathBuf,
    },
}

/// How often a sender with `[auth] disabled = true` repeats its warning:
/// once an hour keeps it in every log excerpt an auditor pulls, without
/// flooding the journal.
const AUTH_DISABLED_WARN_INTERVAL: Duration = Duration::from_secs(3600);

const AUTH_DISABLED_WARNING: &str = "[auth] disabled = true: frames are NOT authenticated; anyone who can reach the receiver's link port can inject records. Create a key with `weir-sender keygen` and set [auth] key_file";

fn main() {
    let cli = Cli::parse();
    let log = weir_ops::logging::init(matches!(cli.log_format, LogFormat::Json));
    let result = match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Run { config } => run(&config, &log),
        Command::Resend {
            config,
            stream,
            from,
            to,
            file,
            source,
            path,
            from_disk,
        } => match (file, stream, from) {
            (Some(file), _, _) => resend_file::resend_file(
                &config,
                &file,
                source.as_deref(),
                path.as_deref(),
                from_disk,
            ),
            (None, Some(stream), Some(from)) => resend(&config, &stream, from, to),
            _ => Err(anyhow::anyhow!(
                "give --stream NAME --from A [--to B], or --file NAME"
            )),
        },
        Command::Keygen { out } => keygen(&out),
        Command::SendFile {
            config,
            source,
            no_wait,
            paths,
        } => send_file::send_file(&config, source.as_deref(), &paths, !no_wait),
    };
    if let Err(e) = result {
        eprintln!("weir-sender: error: {e:#}");
        std::process::exit(2);
    }
}

fn check_config(path: &Path) -> Result<()> {
    let loaded = config::load_with_key(path)?;
    let text = format!(
        "# {}: configuration is valid\n# effective configuration (defaults filled in):\n\n{}\n# sha256: {}\n\
         # The receiver shows this hash from every heartbeat; to approve this configuration, list it\n\
         # in the receiver's [approval] hashes = [\"{}\"]\n",
        path.display(),
        loaded.effective_toml(),
        loaded.hash,
        loaded.hash
    );
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    Ok(())
}

/// Creates `out` with 32 random bytes from the OS, mode 0600, never
/// replacing an existing file (create_new fails if anything is there, even
/// a dangling symlink).
fn keygen(out: &Path) -> Result<()> {
    use rand::RngCore;
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut key = [0u8; weir_protocol::auth::KEY_LEN];
    rand::rngs::OsRng
        .try_fill_bytes(&mut key)
        .context("reading random bytes from the operating system")?;
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!(
            "{} already exists; keygen never overwrites a key file (choose another --out, or remove the old key once no side uses it)",
            out.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("creating key file {}", out.display())),
    };
    // The umask may only have narrowed 0600; make it exactly 0600.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|_| file.write_all(&key))
        .and_then(|_| file.sync_all())
        .with_context(|| format!("writing key file {}", out.display()))?;
    let id = weir_protocol::Key::from_bytes(&key).expect("32 bytes").id();
    println!(
        "wrote a new {}-byte link key to {} (mode 0600, key id {id}); copy it to the receiver over a trusted channel, list it in the receiver's [auth] key_files, and set [auth] key_file here",
        key.len(),
        out.display()
    );
    Ok(())
}

fn resend(path: &Path, stream: &str, from: u64, to: Option<u64>) -> Result<()> {
    let loaded = config::load(path)?;
    let root = &loaded.spool.path;
    let to = to.unwrap_or(u64::MAX);
    if to < from {
        anyhow::bail!("--to {to} is before --from {from}");
    }
    let found = spool::find_in(root, stream, from, to)
        .with_context(|| format!("reading the spool at {}", root.display()))?;
    let (Some(first), Some(last)) = (found.first().map(|e| e.seq), found.last().map(|e| e.seq))
    else {
        let held = spool::find_in(root, stream, 0, u64::MAX)?;
        match (held.first(), held.last()) {
            (Some(a), Some(b)) => anyhow::bail!(
                "stream `{stream}`: nothing from {from} to {} is retained; the spool holds {}..={} (spool.max_bytes / max_age decide how long)",
                if to == u64::MAX { "the end".to_string() } else { to.to_string() },
                a.seq,
                b.seq
            ),
            _ => anyhow::bail!("stream `{stream}`: the spool at {} holds no records of it; check the name against the audit log", root.display()),
        }
    };
    // Records past the newest retained one do not exist yet: not "missing".
    let wanted = to.min(last) - from + 1;
    let request = link::ResendRequest {
        stream: stream.to_string(),
        from,
        to: to.min(last),
    };
    let dir = root.join("resend");
    std::fs::create_dir_all(&dir)?;
    let name = format!(
        "{}-{}.json",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        std::process::id()
    );
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&request)?)?;
    std::fs::rename(&tmp, dir.join(&name))?;
    println!(
        "stream `{stream}`: {} of {wanted} requested records are retained (seq {first}..={last}); queued for the running sender in {}",
        found.len(),
        dir.display()
    );
    if (found.len() as u64) < wanted {
        println!(
            "missing records were deleted from the spool before this request and cannot be resent"
        );
    }
    Ok(())
}

fn run(path: &Path, log: &weir_ops::logging::LogControl) -> Result<()> {
    let loaded = config::load_with_key(path)?;
    if let Some(l) = &loaded.config.log {
        log.set(&l.level)?;
    }
    let session =
        weir_protocol::config::session_id_at(std::time::SystemTime::now(), rand::random());
    let counters = Arc::new(Counters::default());
    let fatal = fatal::Fatal::new();
    let spool = SharedSpool::new(
        Spool::open(loaded.spool.clone(), counters.clone())?,
        fatal.clone(),
    );
    let signer = loaded
        .signer
        .clone()
        .context("[auth]: the key was not loaded")?;
    let auth_status = match &signer {
        Signer::Key(k) => format!("{} key {}", weir_protocol::auth::SCHEME, k.id()),
        Signer::Disabled => "disabled".to_string(),
    };
    if matches!(signer, Signer::Disabled) {
        tracing::warn!("{AUTH_DISABLED_WARNING}");
        std::thread::Builder::new()
            .name("weir-auth-warn".into())
            .spawn(|| loop {
                std::thread::sleep(AUTH_DISABLED_WARN_INTERVAL);
                tracing::warn!("{AUTH_DISABLED_WARNING}");
            })
            .context("starting the auth warning thread")?;
    }
    let mut enc = Encoder::new(loaded.encoder_config(session), signer);
    enc.set_config_hash(loaded.hash.clone());
    let sources = loaded.config.sources.clone();
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
        spare_parity_max = loaded.config.fec.spare_parity_max,
        burst_tolerance = loaded.config.fec.burst_tolerance,
        max_spread_ms = loaded.config.fec.max_spread_ms,
        auth = %auth_status,
        "weir-sender starting"
    );

    let stop = Arc::new(AtomicU8::new(link::RUN));
    let link = {
        let (spool, counters, stop) = (spool.clone(), counters.clone(), stop.clone());
        let wire_overhead = if link_cfg.destination.is_ipv6() {
            link::WIRE_OVERHEAD_IPV6
        } else {
            link::WIRE_OVERHEAD
        };
        let params = link::LinkParams {
            rate_bps: loaded.rate_bps,
            wire_overhead,
            source_types: sources
                .iter()
                .map(|s| (s.name().to_string(), s.type_name().to_string()))
                .collect(),
            spool_path: loaded.spool.path.clone(),
            receiver_buffer: loaded.receiver_buffer,
            repeats: sources
                .iter()
                .filter(|s| s.repeat().0 > 1)
                .map(|s| {
                    (
                        s.name().to_string(),
                        (s.repeat().0, Duration::from_millis(s.repeat().1)),
                    )
                })
                .collect(),
        };
        fatal::spawn("weir-link", fatal.clone(), move || {
            link::run(params, enc, socket, spool, counters, stop)
        })
        .context("starting the link thread")?
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let metrics_cfg = loaded.config.metrics.clone();
    let _endpoint = match metrics_cfg.listen {
        Some(listen) => {
            let mut registry = prometheus_client::registry::Registry::with_prefix("weir");
            registry.register_collector(Box::new(metrics::Prometheus {
                counters: counters.clone(),
                session,
                config_hash: loaded.hash.clone(),
                started: Instant::now(),
            }));
            let endpoint = weir_ops::http::Endpoint::serve(
                listen,
                "metrics.listen",
                Box::new(move |path| {
                    (path == "/metrics").then(|| weir_ops::http::Page {
                        content_type: weir_ops::http::OPENMETRICS,
                        body: weir_ops::metrics::render(&registry),
                    })
                }),
            )?;
            tracing::info!(listen = %endpoint.local_addr(), "metrics: Prometheus text at /metrics");
            Some(endpoint)
        }
        None => None,
    };
    let watchdog = weir_ops::notify::watchdog();
    let main_beat = watchdog.beat("weir-sender-main");
    watchdog.start();
    let mut ticker_stop_handle = None;
    let hash = loaded.hash.clone();
    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        let mut source_names = std::collections::HashMap::new();
        let reloads = sources::Reloads::default();
        for source in sources {
            let handle = SourceHandle::new(source.name(), spool.clone(), counters.clone(), shutdown_rx.clone())
                .with_reloads(reloads.clone());
            let name = format!("source {}", source.name());
            let id = tasks.spawn(source.run(handle)).id();
            source_names.insert(id, name);
        }
        let ticker = {
            let spool = spool.clone();
            fatal::spawn("weir-spool-sync", fatal.clone(), move || {
                spool.run_sync();
                Ok(())
            })
        };
        if let Err(e) = &ticker {
            fatal.report("weir-spool-sync", &format!("cannot start the thread: {e}"));
        }
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut mode = link::STOP;
        let mut last_log = Instant::now();
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut ready = false;
        loop {
            tokio::select! {
                _ = async { match sighup.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {
                    reload(path, log, &hash, &reloads);
                }
                _ = tokio::signal::ctrl_c() => { tracing::info!("interrupted; stopping (unsent records stay in the spool)"); break; }
                _ = async { match sigterm.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {
                    tracing::info!("terminated; stopping (unsent records stay in the spool)"); break;
                }
                // Logged where it happened; the sender stops and exits non-zero.
                _ = fatal.notify.notified() => break,
                done = tasks.join_next_with_id() => match done {
                    None => {
                        tracing::info!("every source has finished; sending what the spool holds, then stopping");
                        mode = link::DRAIN;
                        break;
                    }
                    Some(Ok((id, Ok(())))) => {
                        let name = source_names.get(&id).map_or("a source", String::as_str);
                        tracing::info!("{name} finished");
                    }
                    Some(Ok((id, Err(e)))) => {
                        let name = source_names.get(&id).map_or("a source", String::as_str);
                        fatal.report(name, &format!("{e:#}"));
                        break;
                    }
                    Some(Err(e)) => {
                        let name = source_names.get(&e.id()).map_or("a source", String::as_str);
                        let cause = if e.is_panic() {
                            format!("panicked: {}", fatal::panic_message(&*e.into_panic()))
                        } else {
                            "cancelled".to_string()
                        };
                        fatal.report(name, &cause);
                        break;
                    }
                },
                _ = tick.tick() => {
                    main_beat.touch();
                    if !ready {
                        // The link socket and the spool are open, the sources started.
                        ready = true;
                        weir_ops::notify::ready(&format!("sending to {}, config {}", link_cfg.destination, &hash[..12]));
                    }
                    // A thread that ended without reporting (it cannot
                    // while running, but nothing may end unnoticed).
                    if fatal.first().is_some() {
                        break;
                    }
                    if link.is_finished() {
                        fatal.report("weir-link", "ended while the sender was running");
                        break;
                    }
                    if ticker.as_ref().is_ok_and(|t| t.is_finished()) {
                        fatal.report("weir-spool-sync", "ended while the sender was running");
                        break;
                    }
                    if let Some(path) = &metrics_cfg.path {
                        let extra = [
                            ("session", serde_json::Value::from(format!("{session:016x}"))),
                            ("config_hash", serde_json::Value::from(hash.clone())),
                            ("uptime_s", serde_json::Value::from(started.elapsed().as_secs())),
                            ("auth", serde_json::Value::from(auth_status.clone())),
                        ];
                        if let Err(e) = counters.write_file(path, &extra) {
                            // Retried every second, counted.
                            Counters::add(&counters.metrics_write_errors, 1);
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
        if fatal.first().is_some() {
            mode = link::STOP;
        }
        weir_ops::notify::stopping("stopping: unsent records stay in the spool");
        let _ = shutdown_tx.send(true);
        tasks.shutdown().await;
        stop.store(mode, Ordering::Relaxed);
        spool.appended.notify_all();
        ticker_stop_handle = Some(ticker);
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    // While the link drains the spool (every source finished), a signal or
    // a fatal error still stops the sender promptly; what is unsent stays spooled.
    {
        let (stop, fatal) = (stop.clone(), fatal.clone());
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let why = rt.block_on(async {
                    let failed = fatal.notify.notified();
                    tokio::pin!(failed);
                    failed.as_mut().enable();
                    if fatal.first().is_some() {
                        return "a fatal error";
                    }
                    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => "a signal",
                        _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => "a signal",
                        _ = failed => "a fatal error",
                    }
                });
                tracing::info!("{why} while draining: stopping (unsent records stay in the spool)");
                stop.store(link::STOP, Ordering::Relaxed);
            }
        });
    }
    // A failure of the link thread was reported by `fatal::spawn`.
    let _ = link.join();
    if let Some(Ok(ticker)) = ticker_stop_handle {
        spool.stop_sync();
        let _ = ticker.join();
    }
    if let Err(e) = spool.lock().sync() {
        tracing::error!("spool: final sync failed: {e:#}");
    }
    log_status(&counters);
    if let Some(path) = &loaded.config.metrics.path {
        let _ = counters.write_file(
            path,
            &[
                ("session", format!("{session:016x}").into()),
                ("config_hash", loaded.hash.clone().into()),
                ("auth", auth_status.clone().into()),
            ],
        );
    }
    if let Some((thread, cause)) = fatal.first() {
        anyhow::bail!("{thread} failed: {cause}");
    }
    Ok(())
}

/// SIGHUP: re-reads the configuration file and applies what can change
/// without a restart (`[log] level`, the sources' credential files, used
/// from each source's next connection or handshake), saying what changed
/// and what needs a restart. An invalid file changes nothing.
fn reload(
    path: &Path,
    log: &weir_ops::logging::LogControl,
    running_hash: &str,
    reloads: &sources::Reloads,
) {
    weir_ops::notify::reloading();
    match config::load(path) {
        Err(e) => tracing::error!("SIGHUP: {e:#}; nothing changed (the log level and the sources' credential files are applied only from a valid file)"),
        Ok(new) => {
            let level = new
                .config
                .log
                .as_ref()
                .map_or_else(weir_ops::logging::default_level, |l| l.level.clone());
            match log.set(&level) {
                Ok(Some(previous)) => {
                    tracing::warn!(previous = %previous, now = %level, "SIGHUP: log level changed")
                }
                Ok(None) => tracing::info!(level = %level, "SIGHUP: log level unchanged"),
                Err(e) => tracing::error!("SIGHUP: {e:#}"),
            }
            let reloads = reloads.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for (name, r) in &reloads {
                weir_ops::reload::reload_and_log("source", name, std::slice::from_ref(r));
            }
            if new.hash != running_hash {
                tracing::warn!(running = %running_hash, file = %new.hash,
                    "SIGHUP: {} differs from the running configuration beyond what a reload applies; heartbeats carry the running hash until a restart", path.display());
            }
        }
    }
    weir_ops::notify::ready("reloaded");
}

fn log_status(counters: &Counters) {
    let s: std::collections::HashMap<String, u64> = counters.snapshot().into_iter().collect();
    tracing::info!(
        records_in = s["records_in"],
        records_sent = s["records_sent"],
        spool_dropped = s["spool_dropped_records"],
        spool_bytes = s["spool_bytes"],
        datagrams = s["datagrams_sent"],
        wire_bytes = s["wire_bytes_sent"],
        send_errors = s["send_errors"],
        parity_overhead_pct = counters.parity_overhead_pct().unwrap_or(0.0),
        spare_parity_frames = s["spare_parity_frames"],
        spare_parity_dropped = s["spare_parity_dropped"],
        "status"
    );
}
