//! What the opcua source trusts and presents: the client certificate and
//! key it signs with, the server certificates it accepts (pinned: the
//! exact certificate, compared byte for byte), the password it sends.
//!
//! async-opcua's own certificate store wants a PKI directory it can
//! write (`trusted/`, `rejected/`, certificate files named
//! `CN [thumbprint].der`). The source keeps the decision to itself: it
//! compares the certificate a server offers with `server_cert_file` and
//! the files in `trusted_dir`, refuses an unknown one naming its SHA-1
//! thumbprint, and stages only an accepted certificate in a private
//! directory (mode 0700, under the temporary directory, removed when the
//! source stops) for async-opcua's store, which then also checks its
//! dates, host name and application URI.

use std::path::{Path, PathBuf};

use opcua::crypto::{PrivateKey, X509};
use x509_cert::der::Decode;

/// The longest certificate file read.
const MAX_CERT_FILE: u64 = 1 << 20;
/// The most files read from `trusted_dir` (a trust list is a handful of
/// servers; a directory of thousands is a mistake worth an error).
const MAX_TRUSTED_FILES: usize = 1000;

/// The sender's application instance certificate and key, checked.
pub struct ClientIdentity {
    pub cert: X509,
    /// The application URI from the certificate's subjectAltName: the
    /// client must announce the same one.
    pub application_uri: String,
}

fn read_limited(path: &Path, key: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CERT_FILE).read_to_end(&mut bytes))
        .map_err(|e| format!("{key}: cannot read {} ({e})", path.display()))?;
    Ok(bytes)
}

/// Every certificate (DER) in a PEM file, or the one in a DER file.
pub fn read_certs(path: &Path, key: &str) -> Result<Vec<Vec<u8>>, String> {
    let bytes = read_limited(path, key)?;
    let ders: Vec<Vec<u8>> = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        weir_store::secret::read_pem_certs(path, key)
            .map_err(|e| format!("{e:#}"))?
            .into_iter()
            .map(|c| c.as_ref().to_vec())
            .collect()
    } else {
        vec![bytes]
    };
    for der in &ders {
        X509::from_der(der).map_err(|e| {
            format!(
                "{key}: {} is not an X.509 certificate in PEM or DER ({e})",
                path.display()
            )
        })?;
    }
    Ok(ders)
}

/// The first URI in a certificate's subjectAltName.
fn application_uri(der: &[u8]) -> Option<String> {
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let (_, san) = cert.tbs_certificate.get::<SubjectAltName>().ok()??;
    san.0.into_iter().find_map(|n| match n {
        GeneralName::UniformResourceIdentifier(u) => Some(u.as_str().to_string()),
        _ => None,
    })
}

impl ClientIdentity {
    /// Reads and checks the certificate and key: an RSA key of 2048 to
    /// 4096 bits (what Basic256Sha256 takes), mode 0600, that belongs to
    /// the certificate, and a certificate that carries an application URI.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<ClientIdentity, String> {
        let ders = read_certs(cert_path, "client_cert_file")?;
        let der = &ders[0];
        let cert = X509::from_der(der).map_err(|e| format!("client_cert_file: {e}"))?;
        let bits = cert.key_length().map_err(|_| {
            format!(
                "client_cert_file: {} has no RSA public key; OPC UA's Basic256Sha256 needs an RSA key of 2048 to 4096 bits",
                cert_path.display()
            )
        })?;
        if !(2048..=4096).contains(&bits) {
            return Err(format!(
                "client_cert_file: {} has a {bits}-bit key; Basic256Sha256 needs 2048 to 4096 bits",
                cert_path.display()
            ));
        }
        let application_uri = application_uri(der).ok_or_else(|| {
            format!(
                "client_cert_file: {} has no URI in its subjectAltName; OPC UA needs the application URI there \
                 (e.g. -addext \"subjectAltName=URI:urn:weir:sender,DNS:HOST\", see docs/sources.md)",
                cert_path.display()
            )
        })?;
        // Mode 0600 and PEM, checked as for every private key weir reads.
        weir_store::secret::read_pem_key(key_path, "client_key_file")
            .map_err(|e| format!("{e:#}"))?;
        let pem = std::fs::read(key_path)
            .map_err(|e| format!("client_key_file: cannot read {} ({e})", key_path.display()))?;
        let key = PrivateKey::from_pem(&pem).map_err(|_| {
            format!(
                "client_key_file: {} is not an RSA private key in PEM (PKCS#8 \"BEGIN PRIVATE KEY\" or PKCS#1 \"BEGIN RSA PRIVATE KEY\")",
                key_path.display()
            )
        })?;
        let matches = key.public_key_to_info().ok().zip(
            x509_cert::Certificate::from_der(der)
                .ok()
                .map(|c| c.tbs_certificate.subject_public_key_info),
        );
        match matches {
            Some((a, b)) if a.subject_public_key == b.subject_public_key => {}
            _ => {
                return Err(format!(
                    "client_key_file: {} is not the private key of client_cert_file {}",
                    key_path.display(),
                    cert_path.display()
                ))
            }
        }
        Ok(ClientIdentity {
            cert,
            application_uri,
        })
    }
}

/// The password: one line, mode 0600.
pub fn read_password(path: &Path) -> Result<String, String> {
    weir_store::secret::read_secret_line(path, "password_file").map_err(|e| format!("{e:#}"))
}

/// A certificate's SHA-1 thumbprint as OPC UA tools show it: 40
/// upper-case hex digits.
pub fn thumbprint(der: &[u8]) -> String {
    X509::from_der(der)
        .map(|c| c.thumbprint().as_hex_string().to_uppercase())
        .unwrap_or_else(|_| "(not a certificate)".into())
}

/// The server certificates the configuration trusts, read now (so a
/// certificate added to `trusted_dir` counts from the next connection).
pub struct Trust {
    pub server_cert_file: Option<PathBuf>,
    pub trusted_dir: Option<PathBuf>,
}

impl Trust {
    fn trusted(&self) -> Result<Vec<Vec<u8>>, String> {
        let mut all = Vec::new();
        if let Some(f) = &self.server_cert_file {
            all.extend(read_certs(f, "server_cert_file")?);
        }
        if let Some(dir) = &self.trusted_dir {
            let entries = std::fs::read_dir(dir)
                .map_err(|e| format!("trusted_dir: cannot list {} ({e})", dir.display()))?;
            let mut n = 0;
            for e in entries.flatten() {
                let p = e.path();
                let ext = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .map(str::to_ascii_lowercase);
                if !matches!(ext.as_deref(), Some("der" | "pem" | "crt" | "cer")) || !p.is_file() {
                    continue;
                }
                n += 1;
                if n > MAX_TRUSTED_FILES {
                    return Err(format!(
                        "trusted_dir: {} holds more than {MAX_TRUSTED_FILES} certificate files",
                        dir.display()
                    ));
                }
                match read_certs(&p, "trusted_dir") {
                    Ok(c) => all.extend(c),
                    // One bad file does not take the others' trust away.
                    Err(e) => tracing::warn!(error = %e, "opcua: a file in trusted_dir is skipped"),
                }
            }
        }
        Ok(all)
    }

    /// Accepts the certificate a server offered when it is one of the
    /// trusted ones; otherwise says which one it is and where to put it.
    pub fn check(&self, offered: &[u8], endpoint: &str) -> Result<(), String> {
        if offered.is_empty() {
            return Err(format!(
                "the server at {endpoint} offered no certificate on its secure endpoint"
            ));
        }
        if self.trusted()?.iter().any(|t| t == offered) {
            return Ok(());
        }
        let subject = X509::from_der(offered)
            .map(|c| c.subject_name())
            .unwrap_or_default();
        let place = match (&self.server_cert_file, &self.trusted_dir) {
            (_, Some(dir)) => format!("put its certificate (DER or PEM) in trusted_dir {}", dir.display()),
            (Some(f), None) => format!(
                "server_cert_file {} holds another certificate; replace it with this server's certificate (DER or PEM)",
                f.display()
            ),
            (None, None) => "set server_cert_file to its certificate".into(),
        };
        Err(format!(
            "the server at {endpoint} is not trusted: its certificate `{subject}` has SHA-1 thumbprint {}; \
             if the server's administrator confirms that thumbprint, {place}",
            thumbprint(offered)
        ))
    }
}

/// The private PKI directory async-opcua's store works in: `own/cert.der`
/// (the client certificate, public), `trusted/` (server certificates the
/// source accepted), `rejected/` (empty). The private key stays where
/// `client_key_file` is.
pub struct Staging {
    pub dir: PathBuf,
}

impl Staging {
    pub fn create(source: &str) -> Result<Staging, String> {
        use std::os::unix::fs::DirBuilderExt;
        let safe: String = source
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let dir = std::env::temp_dir().join(format!(
            "weir-opcua-{}-{safe}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        // `create`, not `create_all`: a directory already there is not ours.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create the PKI directory {} ({e})", dir.display()))?;
        let staging = Staging { dir };
        for sub in ["own", "trusted", "rejected"] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(staging.dir.join(sub))
                .map_err(|e| format!("cannot create {}/{sub} ({e})", staging.dir.display()))?;
        }
        Ok(staging)
    }

    pub fn own_cert(&self) -> PathBuf {
        self.dir.join("own/cert.der")
    }

    pub fn write_own_cert(&self, cert: &X509) -> Result<(), String> {
        let der = cert
            .to_der()
            .map_err(|e| format!("client_cert_file: {e}"))?;
        std::fs::write(self.own_cert(), der)
            .map_err(|e| format!("cannot write {} ({e})", self.own_cert().display()))
    }

    /// Puts a server certificate the source accepted where async-opcua's
    /// store looks for it.
    pub fn accept(&self, der: &[u8]) -> Result<(), String> {
        let cert = X509::from_der(der).map_err(|e| format!("server certificate: {e}"))?;
        let path = self
            .dir
            .join("trusted")
            .join(opcua::crypto::CertificateStore::cert_file_name(&cert));
        if path.exists() {
            return Ok(());
        }
        std::fs::write(&path, der).map_err(|e| format!("cannot write {} ({e})", path.display()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Made by `create` above, holding only certificates.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
