//! The receiver's TOML configuration, validated with errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weir_protocol::auth::{KEY_LEN, MAX_KEYS};
use weir_protocol::units::parse_size;
use weir_protocol::{DecoderConfig, Key, Verifier, NANOS_PER_MILLI};

use crate::sinks::SinkConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    pub link: LinkConfig,
    #[serde(default)]
    pub decoder: DecoderSettings,
    #[serde(default)]
    pub fec: FecLimits,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub journal: JournalConfig,
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[log] level`: the log filter; SIGHUP re-reads it. Absent: RUST_LOG, else `info`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogConfig>,
    #[serde(default, deserialize_with = "crate::sinks::deserialize_all")]
    pub sinks: Vec<SinkConfig>,
    /// `[approval]`: the sender configuration hashes a safety officer approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalConfig>,
    /// Required: frames must be authenticated unless this says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
}

/// `[auth]`: the keys frames may be tagged with (or `disabled = true`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Key files (32 bytes, mode 0600, from `weir-sender keygen`). Frames
    /// tagged with any of them are accepted: list the new key beside the
    /// old one while a rotation is under way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_files: Vec<PathBuf>,
    /// Accept only unauthenticated frames (CRC32 only). The sender must say
    /// the same; logged as a warning at start and every hour, and audited.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

/// What a config without `[auth]` is told: how to make a key and where it goes.
pub const AUTH_MISSING: &str = "[auth]: missing. Frames are authenticated by default: \
create a key with `weir-sender keygen --out /etc/weir/link.key`, copy it here, and add `[auth]` \
with `key_files = [\"/etc/weir/link.key\"]` (the sender names the same key in its `[auth] key_file`). \
To run without authentication (not recommended), write `[auth]` with `disabled = true` on both sides";

fn validate_auth(auth: Option<&AuthConfig>) -> Result<()> {
    let Some(auth) = auth else {
        bail!("{AUTH_MISSING}");
    };
    match (auth.key_files.len(), auth.disabled) {
        (0, false) => bail!(
            "auth.key_files: empty; create a key with `weir-sender keygen --out FILE` and list it, `key_files = [\"FILE\"]` (or `disabled = true` to run without authentication)"
        ),
        (_, true) if !auth.key_files.is_empty() => {
            bail!("auth.disabled: `disabled = true` and `key_files` are both set; keep one")
        }
        (n, _) if n > MAX_KEYS => bail!(
            "auth.key_files: {n} files; at most {MAX_KEYS} keys are accepted at once (two cover a rotation)"
        ),
        _ => Ok(()),
    }
}

/// Reads a key file for the configuration key `setting`, refusing one that
/// group or others can access, one that is not a regular file, and one that
/// is not exactly 32 bytes. The mode is checked on the opened file.
pub fn read_key_file(path: &Path, setting: &str) -> Result<Key> {
    let bytes = weir_store::secret::read_private_file(
        path,
        setting,
        KEY_LEN,
        "write one with `weir-sender keygen --out FILE`",
    )?;
    Key::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{setting}: key file {}: {e}", path.display()))
}

/// The verifier `[auth]` asks for, reading and checking every key file.
pub fn load_verifier(auth: &AuthConfig) -> Result<Verifier> {
    if auth.disabled {
        return Ok(Verifier::disabled());
    }
    let mut keys: Vec<(Key, &Path)> = Vec::new();
    for (i, file) in auth.key_files.iter().enumerate() {
        let key = read_key_file(file, &format!("auth.key_files[{i}]"))?;
        if let Some((_, first)) = keys.iter().find(|(k, _)| k.id() == key.id()) {
            bail!(
                "auth.key_files[{i}]: {} holds the same key as {}; list each key once",
                file.display(),
                first.display()
            );
        }
        keys.push((key, file));
    }
    Verifier::new(keys.into_iter().map(|(k, _)| k).collect())
        .map_err(|e| anyhow::anyhow!("auth.key_files: {e}"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// ip:port to receive the link's datagrams on.
    pub listen: SocketAddr,
    #[serde(default = "default_mtu")]
    pub mtu: usize,
    /// SO_RCVBUF: absorbs bursts while the decoder is busy.
    #[serde(
        default = "default_recv_buffer",
        deserialize_with = "weir_protocol::units::size_text"
    )]
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
    #[serde(
        default = "default_max_record",
        deserialize_with = "weir_protocol::units::size_text"
    )]
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

/// The FEC shapes this receiver accepts. Frames of blocks with more data or
/// parity shards are rejected and counted (`rejected_fec_shape`): they
/// bound the Reed-Solomon work per block and the matrices the codec cache
/// keeps. Must cover the sender's `fec.data_shards` and the larger of its
/// `fec.parity_shards` and `fec.warmup_parity`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FecLimits {
    #[serde(default = "default_max_data_shards")]
    pub max_data_shards: usize,
    #[serde(default = "default_max_parity_shards")]
    pub max_parity_shards: usize,
}

fn default_max_data_shards() -> usize {
    DecoderConfig::default().max_data_shards
}
fn default_max_parity_shards() -> usize {
    DecoderConfig::default().max_parity_shards
}

impl Default for FecLimits {
    fn default() -> Self {
        FecLimits {
            max_data_shards: default_max_data_shards(),
            max_parity_shards: default_max_parity_shards(),
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
    #[serde(
        default = "default_journal_bytes",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub max_bytes: String,
    /// While an fsync runs, queue the next one once this many bytes were
    /// journaled (an fsync starts at once when none runs)...
    #[serde(
        default = "default_fsync_bytes",
        deserialize_with = "weir_protocol::units::size_text"
    )]
    pub fsync_bytes: String,
    /// ...or this many milliseconds passed; sinks get records only once
    /// fsynced.
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

/// `[approval]`: a heartbeat carrying a configuration hash not listed here
/// raises an alert (ERROR log, `config-not-approved` audit line,
/// `weir_receiver_sender_config_approved` 0) and the flow goes on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalConfig {
    /// Hex SHA-256 hashes as `weir-sender check-config` prints them.
    pub hashes: Vec<String>,
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
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// If set, Prometheus text is served at `http://LISTEN/metrics`
    /// (a management address: it is read-only, but bind it to loopback or
    /// the management network, never the link).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
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

#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: ReceiverConfig,
    pub recv_buffer: usize,
    pub decoder: DecoderConfig,
    pub journal: crate::journal::Settings,
    /// What frames must carry: set by `load` from `[auth]` (key files are
    /// read and checked there); `parse`, which reads no files, leaves None.
    pub verifier: Option<Verifier>,
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
        let Some(f) = s.config::<crate::sinks::file::Config>() else {
            continue;
        };
        let k = key(&f.dir);
        if let Some((_, other, other_dir)) = seen.iter().find(|(d, _, _)| *d == k) {
            bail!(
                "sinks ({}).dir and sinks ({other}).dir: both file sinks write to {} ({}); \
                 give each file sink its own dir",
                s.common().name,
                f.dir.display(),
                other_dir.display()
            );
        }
        seen.push((k, &s.common().name, &f.dir));
    }
    Ok(())
}

/// Reads and validates the file, without reading the key files: for
/// commands that only read the audit log (`gaps`), which may run as
/// another user.
pub fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading receiver config {}", path.display()))?;
    parse(&text).with_context(|| format!("in receiver config {}", path.display()))
}

/// As [`load`], and reads and checks every `[auth] key_files` entry
/// (`run`, `check-config`).
pub fn load_with_keys(path: &Path) -> Result<Loaded> {
    let mut loaded = load(path)?;
    let auth = loaded.config.auth.as_ref().expect("checked by parse");
    let verifier =
        load_verifier(auth).with_context(|| format!("in receiver config {}", path.display()))?;
    loaded.verifier = Some(verifier);
    Ok(loaded)
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
        max_shard_len: weir_protocol::frame::max_shard_for_mtu(c.link.mtu)
            .expect("mtu checked above"),
        max_data_shards: c.fec.max_data_shards,
        max_parity_shards: c.fec.max_parity_shards,
        ..DecoderConfig::default()
    };
    decoder.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    if c.sinks.is_empty() {
        bail!(
            "sinks: no [[sinks]] configured; add at least one (type = one of {})",
            crate::sinks::known_types()
        );
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
    if let Some(log) = &c.log {
        weir_ops::logging::parse_level(&log.level)
            .map_err(|e| anyhow::anyhow!("log.level: {e}"))?;
    }
    if let Some(approval) = &c.approval {
        for (i, h) in approval.hashes.iter().enumerate() {
            if h.len() != 64
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                bail!("approval.hashes[{i}]: `{h}` is not a configuration hash; copy the 64 lowercase hex digits after `# sha256:` from `weir-sender check-config --config FILE`");
            }
        }
    }
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
    // Last, so a config with other mistakes too is told about those first.
    validate_auth(c.auth.as_ref())?;
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
        verifier: None,
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

        [auth]
        key_files = ["/etc/weir/link.key"]
    "#;

    #[test]
    fn a_minimal_config_loads_with_defaults() {
        let l = parse(GOOD).unwrap();
        assert_eq!(l.recv_buffer, 64 << 20);
        assert_eq!(l.config.sinks[0].common().streams, vec!["*".to_string()]);
    }

    #[test]
    fn size_keys_take_plain_integers_and_fec_limits_reach_the_decoder() {
        let text = GOOD.replace("[link]", "[journal]\nmax_bytes = 2097152\nfsync_bytes = 65536\n[decoder]\nmax_record_size = 1048576\n[fec]\nmax_data_shards = 200\nmax_parity_shards = 40\n[link]\nrecv_buffer = 8388608");
        let l = parse(&text).unwrap();
        assert_eq!(l.recv_buffer, 8 << 20);
        assert_eq!(l.decoder.max_record_size, 1 << 20);
        assert_eq!(l.decoder.max_data_shards, 200);
        assert_eq!(l.decoder.max_parity_shards, 40);
        let err =
            parse(&GOOD.replace("[link]", "[fec]\nmax_data_shards = 300\n[link]")).unwrap_err();
        assert!(
            format!("{err:#}").contains("fec.max_data_shards"),
            "{err:#}"
        );
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
            (
                GOOD.replace("[auth]", "[auth]\ndisabled = true"),
                "auth.disabled",
            ),
            (
                GOOD.replace("[\"/etc/weir/link.key\"]", "[]"),
                "auth.key_files",
            ),
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
            .replace("key_files = [\"/etc/weir/link.key\"]", "");
        let err = format!("{:#}", parse(&text).unwrap_err());
        assert!(err.contains("keygen") && err.contains("[auth]"), "{err}");
        let off = GOOD.replace("key_files = [\"/etc/weir/link.key\"]", "disabled = true");
        assert!(parse(&off).unwrap().config.auth.unwrap().disabled);
    }

    #[test]
    fn key_lists_load_every_key_and_refuse_a_key_listed_twice() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("weir-receiver-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, byte: u8, mode: u32| {
            let p = dir.join(name);
            std::fs::write(&p, [byte; KEY_LEN]).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            p
        };
        let (old, new, same) = (
            write("old.key", 1, 0o600),
            write("new.key", 2, 0o400),
            write("same.key", 1, 0o600),
        );
        let auth = |files: Vec<PathBuf>| AuthConfig {
            key_files: files,
            disabled: false,
        };
        let v = load_verifier(&auth(vec![old.clone(), new.clone()])).unwrap();
        assert_eq!(v.key_ids().len(), 2);
        let err = format!(
            "{:#}",
            load_verifier(&auth(vec![old.clone(), same.clone()])).unwrap_err()
        );
        assert!(
            err.contains("auth.key_files[1]") && err.contains("same key"),
            "{err}"
        );
        let open = write("open.key", 3, 0o644);
        let err = format!(
            "{:#}",
            load_verifier(&auth(vec![old, open.clone()])).unwrap_err()
        );
        assert!(
            err.contains(&format!("chmod 600 {}", open.display())),
            "{err}"
        );
        let short = dir.join("short.key");
        std::fs::write(&short, [1u8; 31]).unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = format!(
            "{:#}",
            load_verifier(&auth(vec![short.clone()])).unwrap_err()
        );
        assert!(
            err.contains(&short.display().to_string()) && err.contains("exactly 32"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
