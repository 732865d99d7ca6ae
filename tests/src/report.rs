//! Hashing and JSON reporting shared by the tools.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Lowercase hex of a digest or any byte string.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Finishes a SHA-256 and returns it as lowercase hex.
pub fn sha256_hex(hasher: Sha256) -> String {
    hex(&hasher.finalize())
}

/// Prints `value` as one compact JSON line on stdout and flushes, so a
/// harness reading line by line sees it immediately.
pub fn print_json_line(value: &serde_json::Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}").context("writing the JSON report to stdout")?;
    out.flush().context("flushing the JSON report to stdout")
}

/// Writes `value` as one JSON line to `path`, atomically: a reader (or a
/// SIGKILL during the write) sees either the old file or the new one, never
/// a truncated one. The temporary file sits next to `path`.
pub fn write_json_file(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{value}\n"))
        .with_context(|| format!("writing {} (is its directory writable?)", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc_matches_the_standard_vector() {
        let mut h = Sha256::new();
        h.update(b"abc");
        assert_eq!(
            sha256_hex(h),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn json_file_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("weir-report-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stats.json");
        write_json_file(&path, &serde_json::json!({"a": 1})).unwrap();
        write_json_file(&path, &serde_json::json!({"a": 2})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["a"], 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
