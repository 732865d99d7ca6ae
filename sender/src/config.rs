//! The sender's TOML configuration: one file, every key validated with an
//! error that names it, and a SHA-256 of the effective configuration that
//! travels in every heartbeat.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use weir_protocol::config::MAX_INTERLEAVE;
use weir_protocol::frame::{shard_size_for, MAX_SHARDS};
use weir_protocol::units::{parse_rate, parse_size};
use weir_protocol::{EncoderConfig, Key, Signer, NANOS_PER_MILLI};

use crate::sources::SourceConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    pub link: LinkConfig,
    #[serde(default)]
    pub fec: FecConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[log] level`: the log filter; SIGHUP re-reads it. Absent: RUST_LOG, else `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogConfig>,
    #[serde(default, deserialize_with = "crate::sources::deserialize_all")]
    pub sources: Vec<SourceConfig>,
    /// Required: frames are authenticated unless this says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
}

/// `[auth]`: the link key (or an explicit `disabled = true`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// 32-byte key written by `weir-sender keygen`, mode 0600; the receiver
    /// lists the same key in its `[auth] key_files`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Send unauthenticated frames (CRC32 only). The receiver must say the
    /// same; logged as a warning at start and every hour.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// What a config without `[auth]` is told: how to make a key and where it goes.
pub const AUTH_MISSING: &str = "[auth]: missing. Frames are authenticated by default: \
create a key with `weir-sender keygen --out /etc/weir/link.key`, copy it to the receiver \
(its `[auth] key_files`), and add `[auth]` with `key_file = \"/etc/weir/link.key\"` here. \
To run without authentication (not recommended), write `[auth]` with `disabled = true` on both sides";

/// Checks the `[auth]` table's shape (not the key file: see `read_key_file`).
fn validate_auth(auth: Option<&AuthConfig>) -> Result<()> {
    match auth {
        None => bail!("{AUTH_MISSING}"),
        Some(AuthConfig {
            key_file: Some(_),
            disabled: true,
        }) => bail!("auth.disabled: `disabled = true` and `key_file` are both set; keep one"),
        Some(AuthConfig {
            key_file: None,
            disabled: false,
        }) => bail!(
            "auth.key_file: missing; create a key with `weir-sender keygen --out FILE` and set `key_file = \"FILE\"` (or `disabled = true` to run without authentication)"
        ),
        Some(_) => Ok(()),
    }
}

/// Reads a key file for the configuration key `setting`, refusing one that
/// group or others can access, one that is not a regular file, and one that
/// is not exactly 32 bytes. The mode is checked on the opened file.
pub fn read_key_file(path: &Path, setting: &str) -> Result<Key> {
    let bytes = weir_store::secret::read_private_file(
        path,
        setting,
        weir_protocol::auth::KEY_LEN,
        "write one with `weir-sender keygen --out FILE`",
    )?;
    Key::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{setting}: key file {}: {e}", path.display()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// ip:port of the receiver across the one-way link.
    pub destination: SocketAddr,
    /// Local ip:port to send from (pins the interface); default any.
    #[serde(default)]
    pub bind: Option<SocketAddr>,
    #[serde(default = "default_mtu")]
    pub mtu: usize,
    /// Link rate, e.g. "800Mbit": the pacer never sends faster.
    pub rate: String,
    #[serde(
        default = "default_send_buffer",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub send_buffer: String,
    /// The receiver's socket receive buffer as granted (its `link.recv_buffer`,
    /// capped by the receiver host's `net.core.rmem_max`): the pacer's burst
    /// is at most a quarter of it, so one burst never fills it
    /// (docs/configuration.md, "Sizing rate and buffers").
    #[serde(
        default = "default_receiver_buffer",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub receiver_buffer: String,
}

fn default_mtu() -> usize {
    1500
}
fn default_send_buffer() -> String {
    "8MiB".into()
}
fn default_receiver_buffer() -> String {
    "4MiB".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FecConfig {
    #[serde(default = "default_data_shards")]
    pub data_shards: usize,
    #[serde(default = "default_parity_shards")]
    pub parity_shards: usize,
    #[serde(default = "default_interleave")]
    pub interleave: usize,
    #[serde(default = "default_flush_ms")]
    pub flush_ms: u64,
    #[serde(default = "default_warmup_blocks")]
    pub warmup_blocks: usize,
    #[serde(default = "default_warmup_parity")]
    pub warmup_parity: usize,
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
    /// Most parity shards per block when the link has idle capacity.
    #[serde(default = "default_spare_parity_max")]
    pub spare_parity_max: usize,
    /// Consecutive datagrams a burst may take without costing a block
    /// more than its parity; sets how far each block's shards are spread.
    #[serde(default = "default_burst_tolerance")]
    pub burst_tolerance: usize,
    /// Longest spread of one block's shards, in milliseconds.
    #[serde(default = "default_max_spread_ms")]
    pub max_spread_ms: u64,
}

fn default_data_shards() -> usize {
    64
}
fn default_parity_shards() -> usize {
    16
}
fn default_interleave() -> usize {
    24
}
fn default_flush_ms() -> u64 {
    5
}
fn default_warmup_blocks() -> usize {
    4
}
fn default_warmup_parity() -> usize {
    32
}
fn default_idle_ms() -> u64 {
    1000
}
fn default_spare_parity_max() -> usize {
    64
}
fn default_burst_tolerance() -> usize {
    384
}
fn default_max_spread_ms() -> u64 {
    200
}

impl Default for FecConfig {
    fn default() -> Self {
        FecConfig {
            data_shards: default_data_shards(),
            parity_shards: default_parity_shards(),
            interleave: default_interleave(),
            flush_ms: default_flush_ms(),
            warmup_blocks: default_warmup_blocks(),
            warmup_parity: default_warmup_parity(),
            idle_ms: default_idle_ms(),
            spare_parity_max: default_spare_parity_max(),
            burst_tolerance: default_burst_tolerance(),
            max_spread_ms: default_max_spread_ms(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the disk spool between sources and the link.
    #[serde(default = "default_spool_path")]
    pub path: PathBuf,
    /// Bound of the spool; past it the oldest segment is deleted, and any
    /// records in it not yet sent are counted, logged and announced.
    #[serde(
        default = "default_spool_bytes",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub max_bytes: String,
    /// Segments older than this are deleted the same way (e.g. "7d", "12h").
    #[serde(default = "default_spool_age")]
    pub max_age: String,
    /// No longer used by the spool (it fsyncs as a group commit, see
    /// docs/configuration.md); still checked so a config stays portable.
    #[serde(
        default = "default_fsync_bytes",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub fsync_bytes: String,
    /// The longest the idle spool sync thread sleeps before it checks
    /// `max_age`; an append wakes it at once. Records are sent only once
    /// fsynced.
    #[serde(default = "default_fsync_ms")]
    pub fsync_ms: u64,
}

fn default_spool_path() -> PathBuf {
    PathBuf::from("weir-spool")
}
fn default_spool_bytes() -> String {
    "1GiB".into()
}
fn default_spool_age() -> String {
    "7d".into()
}
fn default_fsync_bytes() -> String {
    "4MiB".into()
}
fn default_fsync_ms() -> u64 {
    10
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            path: default_spool_path(),
            max_bytes: default_spool_bytes(),
            max_age: default_spool_age(),
            fsync_bytes: default_fsync_bytes(),
            fsync_ms: default_fsync_ms(),
        }
    }
}

/// Parses "90s", "15m", "12h", "7d" (or plain seconds).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; write e.g. 90s, 15m, 12h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => {
            return Err(format!(
                "`{other}` in `{text}` is not a unit; use s, m, h or d"
            ))
        }
    };
    if secs == 0 {
        return Err(format!("`{text}` must be longer than zero"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    #[serde(default = "default_heartbeat_ms")]
    pub interval_ms: u64,
}

fn default_heartbeat_ms() -> u64 {
    1000
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval_ms: default_heartbeat_ms(),
        }
    }
}

/// `[log]`: what SIGHUP can change without a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a filter such as
    /// `info,weir_receiver=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// If set, a JSON snapshot of every counter is written here each second.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// If set, Prometheus text is served at `http://LISTEN/metrics`
    /// (a management address: it is read-only, but bind it to loopback or
    /// the management network, never the link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Seconds between status lines in the log; 0 turns them off.
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
            listen: None,
            log_interval_s: default_log_interval(),
        }
    }
}

/// A loaded, validated configuration with its derived values.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: SenderConfig,
    pub rate_bps: u64,
    pub spool: crate::spool::Settings,
    pub send_buffer: usize,
    /// `link.receiver_buffer` in bytes.
    pub receiver_buffer: usize,
    pub hash: String,
    /// How frames are tagged: set by `load` from `[auth]` (the key file is
    /// read and checked there); `parse`, which reads no files, leaves None.
    pub signer: Option<Signer>,
}

impl Loaded {
    pub fn encoder_config(&self, session: u64) -> EncoderConfig {
        let c = &self.config;
        let mut e = EncoderConfig::new(session);
        e.shard_size = shard_size_for(c.link.mtu, c.link.destination.is_ipv6()).expect("validated");
        e.data_shards = c.fec.data_shards;
        e.parity_shards = c.fec.parity_shards;
        e.interleave = c.fec.interleave;
        e.flush_after = c.fec.flush_ms * NANOS_PER_MILLI;
        e.warmup_blocks = c.fec.warmup_blocks;
        e.warmup_parity = c.fec.warmup_parity;
        e.idle_after = c.fec.idle_ms * NANOS_PER_MILLI;
        e.heartbeat_interval = c.heartbeat.interval_ms * NANOS_PER_MILLI;
        e.max_queued_blocks = e.max_queued_blocks.max(2 * e.interleave);
        e.link_rate = self.rate_bps / 8;
        e.wire_overhead = if c.link.destination.is_ipv6() {
            crate::link::WIRE_OVERHEAD_IPV6
        } else {
            crate::link::WIRE_OVERHEAD
        };
        e.spare_parity_max = c.fec.spare_parity_max.max(c.fec.parity_shards);
        e.burst_tolerance = c.fec.burst_tolerance;
        e.max_spread = c.fec.max_spread_ms * NANOS_PER_MILLI;
        e
    }

    /// The effective configuration as TOML, defaults filled in.
    pub fn effective_toml(&self) -> String {
        toml::to_string(&self.config).expect("configuration serializes")
    }
}

/// Reads and validates the file, without reading the key file: for
/// commands that do not send (`resend`), which may run as another user.
pub fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading sender config {}", path.display()))?;
    parse(&text).with_context(|| format!("in sender config {}", path.display()))
}

/// As [`load`], and reads and checks `[auth] key_file` (`run`, `check-config`).
pub fn load_with_key(path: &Path) -> Result<Loaded> {
    let mut loaded = load(path)?;
    let auth = loaded.config.auth.as_ref().expect("checked by parse");
    let signer = match &auth.key_file {
        Some(file) => Signer::Key(
            read_key_file(file, "auth.key_file")
                .with_context(|| format!("in sender config {}", path.display()))?,
        ),
        None => Signer::Disabled,
    };
    loaded.signer = Some(signer);
    Ok(loaded)
}

pub fn parse(text: &str) -> Result<Loaded> {
    let config: SenderConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    validate(config)
}

fn validate(config: SenderConfig) -> Result<Loaded> {
    let c = &config;
    let rate_bps = parse_rate(&c.link.rate).map_err(|e| anyhow::anyhow!("link.rate: {e}"))?;
    let spool_bytes =
        parse_size(&c.spool.max_bytes).map_err(|e| anyhow::anyhow!("spool.max_bytes: {e}"))?;
    if spool_bytes < 1 << 20 {
        bail!(
            "spool.max_bytes: {} is below the 1MiB minimum",
            c.spool.max_bytes
        );
    }
    let max_age =
        parse_duration(&c.spool.max_age).map_err(|e| anyhow::anyhow!("spool.max_age: {e}"))?;
    let fsync_bytes =
        parse_size(&c.spool.fsync_bytes).map_err(|e| anyhow::anyhow!("spool.fsync_bytes: {e}"))?;
    if fsync_bytes == 0 || fsync_bytes > spool_bytes {
        bail!(
            "spool.fsync_bytes: {} must be above zero and at most spool.max_bytes",
            c.spool.fsync_bytes
        );
    }
    if c.spool.fsync_ms == 0 || c.spool.fsync_ms > 10_000 {
        bail!(
            "spool.fsync_ms: {} must be between 1 and 10000",
            c.spool.fsync_ms
        );
    }
    let spool = crate::spool::Settings {
        path: c.spool.path.clone(),
        max_bytes: spool_bytes,
        max_age,
        fsync_interval: std::time::Duration::from_millis(c.spool.fsync_ms),
        fsync_bytes,
    };
    let send_buffer = parse_size(&c.link.send_buffer)
        .map_err(|e| anyhow::anyhow!("link.send_buffer: {e}"))? as usize;
    let receiver_buffer = parse_size(&c.link.receiver_buffer)
        .map_err(|e| anyhow::anyhow!("link.receiver_buffer: {e}"))?
        as usize;
    if receiver_buffer < 256 << 10 {
        bail!(
            "link.receiver_buffer: {} is below 256KiB; set it to the receiver's granted socket \
             buffer (its log says `granted` at start) and raise the receiver host's \
             net.core.rmem_max if that is smaller",
            c.link.receiver_buffer
        );
    }
    if !(576..=65_535).contains(&c.link.mtu)
        || shard_size_for(c.link.mtu, c.link.destination.is_ipv6()).is_none()
    {
        bail!(
            "link.mtu: {} is outside 576..=65535 (1500 for Ethernet, 9000 for jumbo frames)",
            c.link.mtu
        );
    }
    if c.link.destination.ip().is_unspecified() || c.link.destination.port() == 0 {
        bail!(
            "link.destination: {} must be a concrete ip:port of the receiver",
            c.link.destination
        );
    }
    if c.fec.data_shards == 0 || c.fec.data_shards + c.fec.parity_shards > MAX_SHARDS {
        bail!(
            "fec.data_shards / fec.parity_shards: {} + {} must be at least 1 data shard and at most 256 in total",
            c.fec.data_shards,
            c.fec.parity_shards
        );
    }
    if c.fec.interleave == 0 || c.fec.interleave > MAX_INTERLEAVE {
        bail!(
            "fec.interleave: {} must be between 1 and {MAX_INTERLEAVE}",
            c.fec.interleave
        );
    }
    if c.fec.data_shards + c.fec.warmup_parity > MAX_SHARDS {
        bail!("fec.warmup_parity: data_shards + warmup_parity must not exceed 256");
    }
    if c.fec.data_shards + c.fec.spare_parity_max > MAX_SHARDS {
        bail!(
            "fec.spare_parity_max: data_shards + spare_parity_max is {} but must not exceed 256",
            c.fec.data_shards + c.fec.spare_parity_max
        );
    }
    if c.fec.burst_tolerance > 100_000 {
        bail!(
            "fec.burst_tolerance: {} datagrams is beyond any spread; use 0 (no spreading) to 100000",
            c.fec.burst_tolerance
        );
    }
    if c.fec.max_spread_ms > 1_000 {
        bail!(
            "fec.max_spread_ms: {} must be at most 1000 (the receiver waits `decoder.block_timeout_ms`, 300 by default, for a block)",
            c.fec.max_spread_ms
        );
    }
    if c.fec.flush_ms == 0 || c.fec.flush_ms > 10_000 {
        bail!(
            "fec.flush_ms: {} must be between 1 and 10000",
            c.fec.flush_ms
        );
    }
    if c.heartbeat.interval_ms < 10 || c.heartbeat.interval_ms > 60_000 {
        bail!(
            "heartbeat.interval_ms: {} must be between 10 and 60000",
            c.heartbeat.interval_ms
        );
    }
    if let Some(log) = &c.log {
        weir_ops::logging::parse_level(&log.level)
            .map_err(|e| anyhow::anyhow!("log.level: {e}"))?;
    }
    if c.sources.is_empty() {
        bail!(
            "sources: no [[sources]] configured; add at least one (type = one of {})",
            crate::sources::known_types()
        );
    }
    let mut names = std::collections::HashSet::new();
    for (i, s) in c.sources.iter().enumerate() {
        let name = s.name();
        if name.is_empty() || name.len() > 200 || name.chars().any(|ch| ch.is_control()) {
            bail!("sources[{i}].name: `{name}` must be 1 to 200 printable characters");
        }
        if !names.insert(name.to_string()) {
            bail!("sources[{i}].name: `{name}` is used twice; stream names must be unique");
        }
        s.validate()
            .map_err(|e| anyhow::anyhow!("sources[{i}] ({name}).{e}"))?;
    }
    // Last, so a config with other mistakes too is told about those first.
    validate_auth(c.auth.as_ref())?;
    let mut loaded = Loaded {
        config,
        rate_bps,
        spool,
        send_buffer,
        receiver_buffer,
        hash: String::new(),
        signer: None,
    };
    loaded.hash = hex(&Sha256::digest(loaded.effective_toml().as_bytes()));
    Ok(loaded)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [link]
        destination = "127.0.0.1:7000"
        rate = "800Mbit"

        [[sources]]
        name = "gen"
        type = "generator"
        tags = 10
        rate = 1000

        [auth]
        key_file = "/etc/weir/link.key"
    "#;

    #[test]
    fn a_minimal_config_loads_with_defaults_and_a_stable_hash() {
        let a = parse(GOOD).unwrap();
        assert_eq!(a.rate_bps, 800_000_000);
        assert_eq!(a.config.fec.data_shards, 64);
        assert_eq!(a.hash.len(), 64);
        assert_eq!(parse(GOOD).unwrap().hash, a.hash);
        let changed = GOOD.replace("800Mbit", "900Mbit");
        assert_ne!(parse(&changed).unwrap().hash, a.hash);
    }

    #[test]
    fn errors_name_the_key_to_fix() {
        let cases = [
            (
                GOOD.replace("rate = \"800Mbit\"", "rate = \"fast\""),
                "link.rate",
            ),
            (GOOD.replace("[link]", "[link]\nmtu = 20"), "link.mtu"),
            (
                GOOD.replace("tags = 10", "tags = 0"),
                "sources[0] (gen).tags",
            ),
            (
                GOOD.replace(
                    "[link]",
                    "[fec]\ndata_shards = 200\nparity_shards = 100\n[link]",
                ),
                "fec.data_shards",
            ),
            (GOOD.replace("[link]", "[link]\ncolour = 1"), "colour"),
            (
                GOOD.replace("type = \"generator\"", "type = \"modbus\""),
                "modbus",
            ),
            (GOOD.replace("127.0.0.1:7000", "nowhere"), "destination"),
            (
                GOOD.replace("[auth]", "[auth]\ndisabled = true"),
                "auth.disabled",
            ),
            (GOOD.replace("key_file", "key_fil"), "key_fil"),
        ];
        for (text, key) in cases {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(key), "error for {key} does not name it: {err}");
        }
    }

    #[test]
    fn a_config_without_auth_is_refused_with_how_to_make_a_key() {
        let text = GOOD
            .replace("[auth]", "")
            .replace("key_file = \"/etc/weir/link.key\"", "");
        let err = format!("{:#}", parse(&text).unwrap_err());
        assert!(
            err.contains("weir-sender keygen") && err.contains("[auth]"),
            "{err}"
        );
        let empty = GOOD.replace("key_file = \"/etc/weir/link.key\"", "");
        let err = format!("{:#}", parse(&empty).unwrap_err());
        assert!(err.contains("auth.key_file"), "{err}");
        let off = GOOD.replace("key_file = \"/etc/weir/link.key\"", "disabled = true");
        assert!(parse(&off).unwrap().config.auth.unwrap().disabled);
    }

    #[test]
    fn key_files_open_to_group_or_others_or_of_the_wrong_length_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weir-sender-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("link.key");
        std::fs::write(&path, [7u8; 32]).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = format!("{:#}", read_key_file(&path, "auth.key_file").unwrap_err());
            assert!(
                err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let key = read_key_file(&path, "auth.key_file").unwrap();
        assert_eq!(key.id(), Key::from_bytes(&[7; 32]).unwrap().id());
        std::fs::write(&path, [7u8; 64]).unwrap();
        let err = format!("{:#}", read_key_file(&path, "auth.key_file").unwrap_err());
        assert!(
            err.contains(&path.display().to_string())
                && err.contains("64 bytes")
                && err.contains("exactly 32"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
