//! Small private files read at start (the link key files, TLS private
//! keys): refused unless they are regular files only their owner can
//! access. Also the PEM certificate files TLS needs.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Opens the key file that configuration key `setting` names, refusing
/// one that is not a regular file or that group or others can access
/// (the mode is checked on the opened file).
fn open_private(path: &Path, setting: &str) -> Result<(File, Metadata)> {
    let file =
        File::open(path).with_context(|| format!("{setting}: cannot open {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("{setting}: cannot stat key file {}", path.display()))?;
    if !meta.is_file() {
        bail!("{setting}: {} is not a regular file", path.display());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{setting}: key file {} has mode {mode:04o}, so group or others can read it; run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    Ok((file, meta))
}

/// Reads the file that configuration key `setting` names, refusing one
/// that group or others can access, one that is not a regular file, and
/// one that is not exactly `len` bytes (`how` says how to write a right
/// one).
pub fn read_private_file(path: &Path, setting: &str, len: usize, how: &str) -> Result<Vec<u8>> {
    let (file, meta) = open_private(path, setting)?;
    // One byte more than wanted, so a longer file is seen as too long
    // without reading all of it.
    let mut bytes = Vec::with_capacity(len + 1);
    file.take(len as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("{setting}: cannot read key file {}", path.display()))?;
    if bytes.len() != len {
        bail!(
            "{setting}: key file {} is {} bytes; a key file is exactly {len} bytes ({how})",
            path.display(),
            meta.len()
        );
    }
    Ok(bytes)
}

/// The one line of a private text file (a password, a bearer token) that
/// `setting` names, refused like [`read_private_file`] when others can
/// read it; a trailing newline is dropped, an empty or multi-line file is
/// refused.
pub fn read_secret_line(path: &Path, setting: &str) -> Result<String> {
    let (file, _) = open_private(path, setting)?;
    let mut text = String::new();
    file.take(64 << 10)
        .read_to_string(&mut text)
        .with_context(|| {
            format!(
                "{setting}: cannot read {} (one line of UTF-8 text)",
                path.display()
            )
        })?;
    let line = text.trim_end_matches(['\n', '\r']);
    if line.is_empty() || line.contains(['\n', '\r']) {
        bail!(
            "{setting}: {} must hold exactly one non-empty line",
            path.display()
        );
    }
    Ok(line.to_string())
}

/// Longest PEM file read (a key or a CA bundle; Debian's bundle is
/// about 200 KiB).
const MAX_PEM: u64 = 4 << 20;

/// The private key (PKCS#8, PKCS#1 or SEC1 PEM) in the file that `setting`
/// names, refused like [`read_private_file`] when others can read it.
pub fn read_pem_key(path: &Path, setting: &str) -> Result<PrivateKeyDer<'static>> {
    let (file, _) = open_private(path, setting)?;
    let mut pem = Vec::new();
    file.take(MAX_PEM)
        .read_to_end(&mut pem)
        .with_context(|| format!("{setting}: cannot read key file {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        anyhow!(
            "{setting}: {} holds no PEM private key ({e}); it must contain a \
             -----BEGIN PRIVATE KEY----- (or RSA / EC PRIVATE KEY) block",
            path.display()
        )
    })
}

/// Every certificate in the PEM file that `setting` names (a chain, leaf
/// first, or a CA bundle); at least one.
pub fn read_pem_certs(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>> {
    let mut pem = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_PEM).read_to_end(&mut pem))
        .with_context(|| format!("{setting}: cannot read {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{setting}: {} is not a PEM file ({e})", path.display()))?;
    if certs.is_empty() {
        bail!(
            "{setting}: {} holds no -----BEGIN CERTIFICATE----- block",
            path.display()
        );
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_others_can_read_or_of_the_wrong_length_is_refused_naming_the_setting() {
        let dir = std::env::temp_dir().join(format!("weir-store-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("link.key");
        std::fs::write(&path, [7u8; 32]).unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = format!(
                "{:#}",
                read_private_file(&path, "auth.key_file", 32, "x").unwrap_err()
            );
            assert!(
                err.contains("auth.key_file") && err.contains("chmod 600"),
                "{err}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_private_file(&path, "auth.key_file", 32, "x").unwrap(),
            vec![7u8; 32]
        );
        std::fs::write(&path, [7u8; 33]).unwrap();
        let err = format!(
            "{:#}",
            read_private_file(&path, "auth.key_file", 32, "write one").unwrap_err()
        );
        assert!(
            err.contains("33 bytes") && err.contains("exactly 32") && err.contains("write one"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            read_private_file(&dir, "auth.key_file", 32, "x").unwrap_err()
        );
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
