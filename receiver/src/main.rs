//! `weir-receiver`: the IT side of a weir link.
//!
//! A socket thread receives datagrams in batches (recvmmsg/GRO); the
//! decode thread runs the protocol decoder, which rebuilds FEC blocks and
//! yields records in order and exact gaps; the journal thread journals them
//! and dispatches them to the sinks; each sink runs on its own thread
//! with retry and a confirmed cursor; gaps and sender events go to the
//! append-only audit log. Nothing is ever sent toward the OT side. Every
//! datagram's AES-256-GCM tag is checked against the `[auth] key_files`
//! keys before the decoder reads anything else of it (docs/wire-format.md).

mod audit;
mod catalogue;
mod config;
mod decode;
mod delivery;
mod gaps;
mod history;
mod journal;
mod page;
mod pipeline;
mod sinks;
mod status;
mod udp;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use weir_protocol::{Decoder, Verifier};

use crate::pipeline::{Pipeline, SinkHandle};

#[derive(Parser)]
#[command(
    name = "weir-receiver",
    version,
    about = "IT side of a weir one-way link: FEC-protected UDP frames in, records to sinks out"
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
    /// Run the receiver with a configuration file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// One screen about the running receiver: the sender (alive, since
    /// when, its configuration hash and whether it is approved), per
    /// stream the last sequence, rate and open gaps, per sink its rate,
    /// lag and errors. Reads `[metrics] listen` (twice, a second apart)
    /// and the audit log.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// List the open gaps in the audit log named by a configuration file.
    ///
    /// An open gap is a `gap` range minus the parts that later `recovered`
    /// events of the same stream cover (a recovery after a stream's
    /// `sequence-reset` does not apply to gaps before it: the numbers
    /// restarted), and minus those `gap-resolved` events close (a `files`
    /// sink completed the file whose transfer lost them, from a resend):
    /// those are resolved, not open, and listed only with `--all`. Sorted
    /// by stream, then first sequence number. Exits 0 whether or not gaps
    /// are open; prints `no open gaps` when none are. A relative
    /// `audit.path` is taken from the current directory, as by `run`. The
    /// chain is not checked here: use `audit verify`.
    Gaps {
        /// The receiver's configuration file; its `[audit] path` is read.
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object per open gap and line:
        /// {"stream","from","to","records","cause","at"}; nothing when none.
        #[arg(long)]
        json: bool,
        /// List resolved gaps too, each with its resolution (`resolved by
        /// resend of FILE at TIME`; `open` for the others; in JSON a
        /// `resolved` key, null for open gaps).
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check an audit log's hash chain; report the first bad line.
    ///
    /// Every line must end in a newline and be a JSON object with `event`,
    /// an RFC 3339 `at`, and `prev`: the hex SHA-256 of the previous line's
    /// bytes without its newline (64 zeros on line 1).
    ///
    /// The FIRST line that fails is printed (1-based) with the reason, and
    /// the exit status is 1. So a line altered in place is reported at the
    /// line after it (whose prev no longer matches), a deleted line at the
    /// line that took its place, an inserted line at itself or the line
    /// after it, two swapped lines at the first of them, and a torn last
    /// line (no newline) at itself.
    ///
    /// An intact file exits 0 with `FILE: N lines, chain intact` and the
    /// SHA-256 of its last line. The chain cannot show an edit to the last
    /// line or lines cut from the end: keep that hash off the host and
    /// compare. Exit status 2: the file could not be read.
    Verify {
        /// The audit log (the receiver's `audit.path`).
        file: PathBuf,
    },
}

/// How often a receiver with `[auth] disabled = true` repeats its warning:
/// once an hour keeps it in every log excerpt an auditor pulls, without
/// flooding the journal.
const AUTH_DISABLED_WARN_INTERVAL: Duration = Duration::from_secs(3600);

const AUTH_DISABLED_WARNING: &str = "[auth] disabled = true: frames are NOT authenticated; anyone who can reach the link port can inject records. Create a key with `weir-sender keygen` and set [auth] key_files";

/// `auth` as shown in the start log, the audit log and the metrics file.
pub fn auth_status(verifier: &Verifier) -> serde_json::Value {
    if verifier.is_disabled() {
        json!("disabled")
    } else {
        json!({
            "mac": weir_protocol::auth::SCHEME,
            "key_ids": verifier.key_ids().iter().map(|id| id.to_string()).collect::<Vec<_>>(),
        })
    }
}

/// Receive batches in flight between the socket and decode threads.
const RECV_POOL: usize = 16;

fn main() {
    let cli = Cli::parse();
    let log = weir_ops::logging::init(matches!(cli.log_format, LogFormat::Json));
    let result = match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Run { config } => run(&config, &log),
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => audit_verify(&file),
        Command::Gaps { config, json, all } => gaps::print_open_gaps(&config, json, all),
        Command::Status { config } => status::print_status(&config),
    };
    if let Err(e) = result {
        eprintln!("weir-receiver: error: {e:#}");
        std::process::exit(2);
    }
}

fn check_config(path: &Path) -> Result<()> {
    let loaded = config::load_with_keys(path)?;
    let text = format!(
        "# {}: configuration is valid\n# effective configuration (defaults filled in):\n\n{}",
        path.display(),
        toml::to_string(&loaded.config).expect("configuration serializes")
    );
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    Ok(())
}

fn audit_verify(path: &Path) -> Result<()> {
    if !audit::verify_file(path)? {
        std::process::exit(1);
    }
    Ok(())
}

fn run(path: &Path, log: &weir_ops::logging::LogControl) -> Result<()> {
    let loaded = config::load_with_keys(path)?;
    let cfg = &loaded.config;
    if let Some(l) = &cfg.log {
        log.set(&l.level)?;
    }
    let mut audit = audit::AuditLog::open(&cfg.audit.path)?;
    let mut journal = journal::Journal::open(loaded.journal.clone())?;
    let mut confirmed_by_all = u64::MAX;
    for sink_cfg in &cfg.sinks {
        let index = journal::load_sink_cursor(&journal.sink_cursor_path(&sink_cfg.common().name))?
            .map_or(0, |c| c.index);
        confirmed_by_all = confirmed_by_all.min(index);
    }
    journal.settle_repair(confirmed_by_all);
    let verifier = loaded
        .verifier
        .clone()
        .context("[auth]: the keys were not loaded")?;
    let auth = auth_status(&verifier);
    if verifier.is_disabled() {
        tracing::warn!("{AUTH_DISABLED_WARNING}");
        std::thread::Builder::new()
            .name("weir-auth-warn".into())
            .spawn(|| loop {
                std::thread::sleep(AUTH_DISABLED_WARN_INTERVAL);
                tracing::warn!("{AUTH_DISABLED_WARNING}");
            })
            .context("starting the auth warning thread")?;
    }
    let decoder_cfg = weir_protocol::DecoderConfig {
        // Every frame's tag is checked before the decoder sees it: a newer
        // session may take over without waiting for the live one's silence.
        frames_authenticated: !verifier.is_disabled(),
        ..loaded.decoder.clone()
    };
    let mut decoder = Decoder::new(decoder_cfg, verifier);
    for (name, position) in journal.positions() {
        decoder.restore_cursor(name, (*position).into());
    }
    // Gaps still open in the audit log can be filled by a resend.
    let open_gaps = match std::fs::File::open(&cfg.audit.path) {
        Ok(f) => gaps::scan(std::io::BufReader::new(f)).map(|(g, _)| g).unwrap_or_else(|e| {
            tracing::warn!("audit.path: cannot read open gaps ({e:#}); resends will not be matched to them");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    };
    // Only gaps of the link and the sender: a sink-overflow or
    // journal-corrupt gap concerns the sinks that had not written the
    // records, and a resend of it would reach every sink.
    for g in open_gaps
        .iter()
        .filter(|g| !g.cause.starts_with("sink-overflow") && g.cause != "journal-corrupt")
    {
        decoder.restore_open_gap(&g.stream, g.from, g.to);
    }
    let socket = udp::LinkSocket::open(cfg.link.listen, loaded.recv_buffer, cfg.link.mtu)?;
    let listen = socket
        .local_addr()
        .map_or_else(|_| cfg.link.listen.to_string(), |a| a.to_string());
    let restored = journal.positions().len();
    tracing::info!(listen = %listen, sinks = cfg.sinks.len(), restored_streams = restored, open_gaps = open_gaps.len(), auth = %auth, "weir-receiver starting");
    audit.write("receiver-start", json!({ "listen": listen, "version": env!("CARGO_PKG_VERSION"), "restored_streams": restored, "auth": auth }));
    if auth == "disabled" {
        audit.write(
            "auth-disabled",
            json!({ "warning": "frames are not authenticated ([auth] disabled = true)" }),
        );
    }

    let abort = Arc::new(AtomicBool::new(false));
    let mut sinks = Vec::new();
    let mut reloads = Vec::new();
    for sink_cfg in &cfg.sinks {
        let common = sink_cfg.common();
        let built = sink_cfg
            .build()
            .with_context(|| format!("sinks ({})", common.name))?;
        let mut sink = built.sink;
        reloads.push((common.name.clone(), built.reloads));
        let routes = sinks::matcher(&common.streams)
            .map_err(|e| anyhow::anyhow!("sinks ({}).streams: {e}", common.name))?;
        let kinds = sinks::Kinds::parse(&common.kinds)
            .map_err(|e| anyhow::anyhow!("sinks ({}).kinds: {e}", common.name))?;
        let cursor_path = journal.sink_cursor_path(&common.name);
        let start = match journal::load_sink_cursor(&cursor_path)? {
            Some(cursor) => {
                sink.resume(&cursor.resume).with_context(|| {
                    format!(
                        "sinks ({}): resuming from {}",
                        common.name,
                        cursor_path.display()
                    )
                })?;
                if cursor.index < journal.first_index() {
                    tracing::warn!(sink = %common.name, cursor = cursor.index, first = journal.first_index(),
                        "sink cursor is behind the journal; the records in between were reported as sink-overflow gaps when dropped");
                }
                // A repaired (shortened) journal may end before the cursor:
                // new entries will reuse those indexes, so start at the end.
                cursor
                    .index
                    .max(journal.first_index())
                    .min(journal.durable_index())
            }
            None => journal.first_index(),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(pipeline::SINK_QUEUE + 1);
        let shared = Arc::new(delivery::SinkShared {
            counters: built.counters,
            ..delivery::SinkShared::new(&common.name, start)
        });
        let thread = {
            let t = delivery::SinkThread {
                shared: shared.clone(),
                sink,
                routes: routes.clone(),
                kinds,
                batches: rx,
                abort: abort.clone(),
                cursor_path,
                dead_letter_path: journal.dead_letter_path(&common.name),
            };
            std::thread::Builder::new()
                .name(format!("sink-{}", common.name))
                .spawn(move || delivery::run_sink(t))
                .context("starting a sink thread")?
        };
        sinks.push(SinkHandle {
            shared,
            tx,
            routes,
            kinds,
            dispatched: start,
            thread: Some(thread),
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let recv_stats = Arc::new(udp::RecvStats::default());
    let (batch_tx, batch_rx) = std::sync::mpsc::sync_channel(RECV_POOL);
    // Decoded events for the journal thread, and its fsync wake-ups. The
    // decode thread holds the only strong reference: when it ends the
    // channel disconnects and the journal thread drains and stops. The
    // journal's syncer wakes the journal thread through a weak one.
    let (input_tx, input_rx) = std::sync::mpsc::sync_channel(decode::DECODED_QUEUE);
    let input_tx = Arc::new(input_tx);
    {
        let wake = Arc::downgrade(&input_tx);
        journal.set_waker(Box::new(move || {
            if let Some(tx) = wake.upgrade() {
                // A full queue already wakes the journal thread.
                let _ = tx.try_send(pipeline::Input::Durable);
            }
        }));
    }
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel(RECV_POOL);
    let recv = {
        let (stop, stats) = (stop.clone(), recv_stats.clone());
        std::thread::Builder::new()
            .name("weir-recv".into())
            .spawn(move || socket.run(batch_tx, free_rx, RECV_POOL, stop, stats))
            .context("starting the receive thread")?
    };
    let board = Arc::new(status::Board::new(
        recv_stats.clone(),
        sinks.iter().map(|s| s.shared.clone()).collect(),
    ));
    let endpoint = match cfg.metrics.listen {
        Some(listen) => {
            let mut registry = prometheus_client::registry::Registry::with_prefix("weir");
            registry.register_collector(Box::new(status::Prometheus(board.clone())));
            let page_board = board.clone();
            let endpoint = weir_ops::http::Endpoint::serve(
                listen,
                "metrics.listen",
                Box::new(move |path| match path {
                    "/metrics" => Some(weir_ops::http::Page {
                        content_type: weir_ops::http::OPENMETRICS,
                        body: weir_ops::metrics::render(&registry),
                    }),
                    "/" => Some(weir_ops::http::Page {
                        content_type: "text/html; charset=utf-8",
                        body: page::render(&page_board).into_bytes(),
                    }),
                    _ => None,
                }),
            )?;
            tracing::info!(listen = %endpoint.local_addr(), "metrics: Prometheus text at /metrics, the status page at /");
            Some(endpoint)
        }
        None => None,
    };
    let decoder_stats = Arc::new(decode::StatsView::default());
    let pipeline = Pipeline {
        decoder_stats: decoder_stats.clone(),
        auth: auth.clone(),
        audit,
        journal,
        sinks,
        recv_stats,
        metrics_path: cfg.metrics.path.clone(),
        log_interval: Duration::from_secs(cfg.metrics.log_interval_s),
        warn_after: Duration::from_millis(cfg.heartbeat.warn_after_ms),
        failure: None,
        finished: Vec::new(),
        readers: (0..cfg.sinks.len()).map(|_| None).collect(),
        corrupt_entries: 0,
        compaction_errors: 0,
        board,
        approved: cfg.approval.as_ref().map(|a| a.hashes.clone()),
        stream_counts: Default::default(),
        gap_counts: Default::default(),
        durable_times: Default::default(),
    };
    let journal_thread = std::thread::Builder::new()
        .name("weir-journal".into())
        .spawn(move || pipeline.run(input_rx))
        .context("starting the journal thread")?;
    let decode = std::thread::Builder::new()
        .name("weir-decode".into())
        .spawn(move || decode::run(decoder, batch_rx, free_tx, input_tx, decoder_stats))
        .context("starting the decode thread")?;

    {
        let stop = stop.clone();
        let (path, log) = (path.to_path_buf(), log.clone());
        let running = Running {
            config: cfg.clone(),
            reloads,
        };
        std::thread::spawn(move || {
            wait_for_signal(&path, &log, &running);
            stop.store(true, Ordering::Relaxed);
        });
    }
    // The socket is bound, the journal and the audit log are open, the
    // sink, journal and decode threads run.
    weir_ops::notify::ready(&format!("receiving on {listen}"));
    weir_ops::notify::watchdog().start();
    // The socket, decode and journal threads end only when told to stop:
    // any ending first is fatal (it is logged and the exit status is non-zero).
    while !stop.load(Ordering::Relaxed)
        && !decode.is_finished()
        && !journal_thread.is_finished()
        && !recv.is_finished()
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("stopping: finishing what was received");
    weir_ops::notify::stopping(
        "stopping: handing the journal to the sinks (at most 10 s), then saving cursors",
    );
    stop.store(true, Ordering::Relaxed);
    let recv_result = match recv.join() {
        Ok(r) => r,
        Err(panic) => Err(anyhow::anyhow!(
            "panicked: {}",
            pipeline::panic_message(&*panic)
        )),
    };
    if let Err(e) = &recv_result {
        tracing::error!(thread = "weir-recv", "{e:#}; the receiver stops");
    }
    // If a sink is stuck retrying, give it a bounded time, then abort it.
    let aborter = {
        let abort = abort.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(15));
            abort.store(true, Ordering::Relaxed);
        })
    };
    // The decode thread ends once the socket thread has (its input is
    // gone) or the journal thread has (its output is gone).
    let decode_failure = decode.join().err().map(|panic| {
        let cause = pipeline::panic_message(&*panic);
        tracing::error!(
            thread = "weir-decode",
            "panicked: {cause}; the receiver stops"
        );
        format!("thread weir-decode: panicked: {cause}")
    });
    let failure = match journal_thread.join() {
        Ok(f) => f,
        Err(panic) => {
            let cause = pipeline::panic_message(&*panic);
            tracing::error!(
                thread = "weir-journal",
                "panicked: {cause}; the receiver stops"
            );
            Some(format!("thread weir-journal: panicked: {cause}"))
        }
    };
    let failure = decode_failure.or(failure);
    drop(aborter);
    if let Some(failure) = failure {
        anyhow::bail!(
            "{failure} (journal.path {}); the receiver stopped, fix the cause and restart",
            cfg.journal.path.display()
        );
    }
    drop(endpoint);
    recv_result.context("thread weir-recv")?;
    tracing::info!("weir-receiver stopped");
    Ok(())
}

/// What SIGHUP compares the file with and re-reads.
struct Running {
    /// The configuration the receiver started with.
    config: config::ReceiverConfig,
    /// Each sink's name and its credential files.
    reloads: Vec<(String, Vec<Arc<dyn weir_ops::reload::Reload>>)>,
}

/// Waits for SIGTERM or SIGINT; SIGHUP meanwhile re-reads `[log] level`
/// and the sinks' credential files.
fn wait_for_signal(path: &Path, log: &weir_ops::logging::LogControl, running: &Running) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("signal runtime");
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut hup = signal(SignalKind::hangup()).ok();
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return,
                _ = async { match term.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => return,
                _ = async { match hup.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => reload(path, log, running),
            }
        }
    });
}

/// SIGHUP: applies `[log] level` from the file, re-reads every sink's
/// credential files (each sink uses them from its next connection or
/// request), and says what changed, including the settings that need a
/// restart. An invalid file changes nothing.
fn reload(path: &Path, log: &weir_ops::logging::LogControl, running: &Running) {
    weir_ops::notify::reloading();
    match config::load(path) {
        Err(e) => tracing::error!(
            "SIGHUP: {e:#}; nothing changed (the log level and the sinks' credential files are applied only from a valid file)"
        ),
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
            for (name, reloads) in &running.reloads {
                weir_ops::reload::reload_and_log("sink", name, reloads);
            }
            let as_json = |c: &config::ReceiverConfig| {
                serde_json::to_value(c).expect("a configuration serializes")
            };
            let changed = weir_ops::reload::changed_settings(
                &as_json(&running.config),
                &as_json(&new.config),
                "sinks",
                &["log"],
            );
            if changed.is_empty() {
                tracing::info!("SIGHUP: no other setting changed");
            } else {
                tracing::warn!(
                    changed = %changed.join(", "),
                    "SIGHUP: other settings changed; they apply only after a restart"
                );
            }
        }
    }
    weir_ops::notify::ready("reloaded");
}
