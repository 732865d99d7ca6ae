//! The receiver's TOML configuration, validated with errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::units::parse_size;
use weir_protocol::{DecoderConfig, NANOS_PER_MILLI};

use crate::sinks::SinkConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    pub link: LinkConfig,
    #[serde(default)]
    pub decoder: DecoderSettings,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// ip:port to receive the link's datagrams on.
    pub listen: SocketAddr,
    #[serde(default = "default_mtu")]
    pub mtu: usize,
    /// SO_RCVBUF: absorbs bursts while the decoder is busy.
    #[serde(default = "default_recv_buffer")]
    pub recv_buffer: String,
}

fn default_mtu() -> usize {
    1500
}
fn default_recv_buffer() -> String {
    "64MiB".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderSettings {
    #[serde(default = "default_in_flight")]
    pub max_blocks_in_flight: usize,
    #[serde(default = "default_block_timeout")]
    pub block_timeout_ms: u64,
    #[serde(default = "default_max_record")]
    pub max_record_size: String,
}

fn default_in_flight() -> usize {
    256
}
fn default_block_timeout() -> u64 {
    300
}
fn default_max_record() -> String {
    "16MiB".into()
}

impl Default for DecoderSettings {
    fn default() -> Self {
        DecoderSettings {
            max_blocks_in_flight: default_in_flight(),
            block_timeout_ms: default_block_timeout(),
            max_record_size: default_max_record(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Append-only JSON Lines file of gaps, sessions and heartbeat events.
    #[serde(default = "default_audit")]
    pub path: PathBuf,
}

fn default_audit() -> PathBuf {
    PathBuf::from("weir-audit.jsonl")
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: default_audit(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// Directory of the journal: decoded records wait here until every
    /// sink has written them.
    #[serde(default = "default_journal")]
    pub path: PathBuf,
    /// Bound; past it the oldest segment is dropped and records a sink had
    /// not been given become `sink-overflow:NAME` gaps for that sink.
    #[serde(default = "default_journal_bytes")]
    pub max_bytes: String,
    /// fsync after this many journaled bytes...
    #[serde(default = "default_fsync_bytes")]
    pub fsync_bytes: String,
    /// ...or this many milliseconds; sinks get records only once fsynced.
    #[serde(default = "default_fsync_ms")]
    pub fsync_ms: u64,
}

fn default_journal() -> PathBuf {
    PathBuf::from("weir-journal")
}
fn default_journal_bytes() -> String {
    "1GiB".into()
}
fn default_fsync_bytes() -> String {
    "4MiB".into()
}
fn default_fsync_ms() -> u64 {
    10
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            path: default_journal(),
            max_bytes: default_journal_bytes(),
            fsync_bytes: default_fsync_bytes(),
            fsync_ms: default_fsync_ms(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Warn (and audit) when no heartbeat arrived for this long.
    #[serde(default = "default_warn_after")]
    pub warn_after_ms: u64,
}

fn default_warn_after() -> u64 {
    3000
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            warn_after_ms: default_warn_after(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "default_log_interval")]
    pub log_interval_s: u64,
}

fn default_log_interval() -> u64 {
    10
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            path: None,
            log_interval_s: default_log_interval(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: ReceiverConfig,
    pub recv_buffer: usize,
    pub decoder: DecoderConfig,
    pub journal: crate::journal::Settings,
}

/// Two file sinks in one `dir` would each take the other's files for
/// its own: a resume cuts back and removes files by its own saved state.
fn refuse_shared_file_dirs(sinks: &[SinkConfig]) -> Result<()> {
    /// The same directory however it is spelled (`a/./b/`, or via a
    /// symlink once it exists).
    fn key(dir: &Path) -> PathBuf {
        std::fs::canonicalize(dir).unwrap_or_else(|_| {
            dir.components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect()
        })
    }
    let mut seen: Vec<(PathBuf, &str, &Path)> = Vec::new();
    for s in sinks {
        let SinkConfig::File(f) = s else { continue };
        let k = key(&f.dir);
        if let Some((_, other, other_dir)) = seen.iter().find(|(d, _, _)| *d == k) {
            bail!(
                "sinks ({}).dir and sinks ({other}).dir: both file sinks write to {} ({}); \
                 give each file sink its own dir",
                f.name,
                f.dir.display(),
                other_dir.display()
            );
        }
        seen.push((k, &f.name, &f.dir));
    }
    Ok(())
}

pub fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading receiver config {}", path.display()))?;
    parse(&text).with_context(|| format!("in receiver config {}", path.display()))
}

pub fn parse(text: &str) -> Result<Loaded> {
    let config: ReceiverConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let c = &config;
    let recv_buffer = parse_size(&c.link.recv_buffer)
        .map_err(|e| anyhow::anyhow!("link.recv_buffer: {e}"))? as usize;
    if !(576..=65_535).contains(&c.link.mtu) {
        bail!(
            "link.mtu: {} is outside 576..=65535 (1500 for Ethernet, 9000 for jumbo frames)",
            c.link.mtu
        );
    }
    let max_record_size = parse_size(&c.decoder.max_record_size)
        .map_err(|e| anyhow::anyhow!("decoder.max_record_size: {e}"))?
        as usize;
    let decoder = DecoderConfig {
        max_blocks_in_flight: c.decoder.max_blocks_in_flight,
        block_timeout: c.decoder.block_timeout_ms * NANOS_PER_MILLI,
        max_record_size,
        max_shard_len: weir_protocol::frame::shard_size_for_mtu(c.link.mtu)
            .expect("mtu checked above"),
        ..DecoderConfig::default()
    };
    decoder.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    if c.sinks.is_empty() {
        bail!("sinks: no [[sinks]] configured; add at least one (type = \"file\", \"stdout\" or \"tcp\")");
    }
    let mut names = std::collections::HashSet::new();
    for (i, s) in c.sinks.iter().enumerate() {
        let common = s.common();
        if common.name.is_empty() || !names.insert(common.name.clone()) {
            bail!(
                "sinks[{i}].name: `{}` must be non-empty and unique",
                common.name
            );
        }
        if let Err(e) = crate::sinks::matcher(&common.streams) {
            bail!("sinks[{i}] ({}).streams: {e}", common.name);
        }
        s.validate()
            .map_err(|e| anyhow::anyhow!("sinks[{i}] ({}).{e}", common.name))?;
    }
    refuse_shared_file_dirs(&c.sinks)?;
    let max_bytes =
        parse_size(&c.journal.max_bytes).map_err(|e| anyhow::anyhow!("journal.max_bytes: {e}"))?;
    if max_bytes < 1 << 20 {
        bail!(
            "journal.max_bytes: {} is below the 1MiB minimum",
            c.journal.max_bytes
        );
    }
    let fsync_bytes = parse_size(&c.journal.fsync_bytes)
        .map_err(|e| anyhow::anyhow!("journal.fsync_bytes: {e}"))?;
    if fsync_bytes == 0 || fsync_bytes > max_bytes {
        bail!(
            "journal.fsync_bytes: {} must be above zero and at most journal.max_bytes",
            c.journal.fsync_bytes
        );
    }
    if c.journal.fsync_ms == 0 || c.journal.fsync_ms > 10_000 {
        bail!(
            "journal.fsync_ms: {} must be between 1 and 10000",
            c.journal.fsync_ms
        );
    }
    let journal = crate::journal::Settings {
        path: c.journal.path.clone(),
        max_bytes,
        fsync_bytes,
        fsync_interval: std::time::Duration::from_millis(c.journal.fsync_ms),
    };
    Ok(Loaded {
        journal,
        config,
        recv_buffer,
        decoder,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [link]
        listen = "127.0.0.1:7000"

        [[sinks]]
        name = "files"
        type = "file"
        dir = "/tmp/out"
    "#;

    #[test]
    fn a_minimal_config_loads_with_defaults() {
        let l = parse(GOOD).unwrap();
        assert_eq!(l.recv_buffer, 64 << 20);
        assert_eq!(l.config.sinks[0].common().streams, vec!["*".to_string()]);
    }

    #[test]
    fn two_file_sinks_in_one_dir_are_refused_naming_both_and_the_dir() {
        let two = format!(
            "{GOOD}\n[[sinks]]\nname = \"archive\"\ntype = \"file\"\ndir = \"/tmp/./out/\"\n"
        );
        let err = format!("{:#}", parse(&two).unwrap_err());
        for part in ["files", "archive", "/tmp/out", "dir"] {
            assert!(err.contains(part), "the error names {part}: {err}");
        }
        let apart = two.replace("/tmp/./out/", "/tmp/out2");
        assert!(parse(&apart).is_ok(), "different dirs are fine");
    }

    #[test]
    fn errors_name_the_key_to_fix() {
        let cases = [
            (
                GOOD.replace("[link]", "[link]\nrecv_buffer = \"lots\""),
                "link.recv_buffer",
            ),
            (GOOD.replace("[link]", "[link]\nmtu = 10"), "link.mtu"),
            (
                GOOD.replace(
                    "dir = \"/tmp/out\"",
                    "dir = \"/tmp/out\"\nstreams = [\"[\"]",
                ),
                "sinks[0] (files).streams",
            ),
            (GOOD.replace("type = \"file\"", "type = \"kafka\""), "kafka"),
            (
                GOOD.replace("[link]", "[decoder]\nmax_blocks_in_flight = 3\n[link]"),
                "decoder.max_blocks_in_flight",
            ),
            (
                GOOD.replace(
                    "dir = \"/tmp/out\"",
                    "dir = \"/tmp/out\"\nmax_file_bytes = \"x\"",
                ),
                "max_file_bytes",
            ),
            (GOOD.replace("listen", "lisen"), "lisen"),
        ];
        for (text, key) in cases {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(key), "error for {key} does not name it: {err}");
        }
    }
}
