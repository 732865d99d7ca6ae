//! TLS for the postgres sink: `sslmode` as libpq reads it, on rustls
//! (ring) through tokio-postgres-rustls.
//!
//! | `sslmode`     | TLS                        | the server's certificate                          |
//! |---------------|----------------------------|---------------------------------------------------|
//! | `disable`     | never                      | -                                                 |
//! | `prefer`      | when the server offers it  | not checked                                       |
//! | `require`     | always                     | not checked; with `tls_ca_file`, as `verify-ca`   |
//! | `verify-ca`   | always                     | signed by `tls_ca_file` (default: system roots)   |
//! | `verify-full` | always                     | as `verify-ca`, and it names the host (or `tls_server_name`) |
//!
//! Handshake signatures are always checked, so even an unchecked
//! certificate's key must be the server's.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// The CA bundle `verify-ca` / `verify-full` trust when `tls_ca_file` is
/// not set (Debian's system roots).
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const NAMES: &'static str = "disable, prefer, require, verify-ca or verify-full";

    pub fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return Err(format!("sslmode: `{s}` must be one of {}", SslMode::NAMES)),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres is told: whether TLS may or must be used.
    pub fn pg(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as M;
        match self {
            SslMode::Disable => M::Disable,
            SslMode::Prefer => M::Prefer,
            _ => M::Require,
        }
    }

    /// The mode as tokio-postgres parsed it from `url` (it knows only
    /// these three).
    pub fn from_pg(mode: tokio_postgres::config::SslMode) -> SslMode {
        use tokio_postgres::config::SslMode as M;
        match mode {
            M::Disable => SslMode::Disable,
            M::Require => SslMode::Require,
            _ => SslMode::Prefer,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS files and settings of a postgres sink.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// The CA file the server's certificate is checked against, when it is
    /// checked (`tls_ca_file`, or the system roots for `verify-*`).
    pub ca: Option<PathBuf>,
    /// Client authentication: certificate chain and key.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl TlsSettings {
    /// The files the TLS settings are read from, by configuration key.
    pub fn files(&self) -> Vec<(&'static str, &Path)> {
        let mut f = Vec::new();
        if let Some(ca) = &self.ca {
            f.push(("tls_ca_file", ca.as_path()));
        }
        if let Some((cert, key)) = &self.client {
            f.push(("tls_cert_file", cert.as_path()));
            f.push(("tls_key_file", key.as_path()));
        }
        f
    }

    /// The rustls client settings (reading the files); `None` for
    /// `disable`.
    pub fn client_config(&self) -> Result<Option<rustls::ClientConfig>> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = self.verifier(provider.clone())?;
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &self.client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    weir_store::secret::read_pem_certs(cert, "tls_cert_file")?,
                    weir_store::secret::read_pem_key(key, "tls_key_file")?,
                )
                .context("tls_cert_file / tls_key_file: the key does not fit the certificate")?,
            None => builder.with_no_client_auth(),
        };
        Ok(Some(config))
    }

    /// How the server's certificate is checked, reading `ca`.
    fn verifier(&self, provider: Arc<CryptoProvider>) -> Result<Arc<dyn ServerCertVerifier>> {
        let Some(ca) = &self.ca else {
            return Ok(Arc::new(AnyCertificate(provider)));
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in weir_store::secret::read_pem_certs(ca, "tls_ca_file")? {
            roots.add(cert).map_err(|e| {
                anyhow!(
                    "tls_ca_file: a certificate in {} is not usable as a CA ({e})",
                    ca.display()
                )
            })?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .with_context(|| format!("tls_ca_file: {}", ca.display()))?;
        Ok(if self.mode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(ChainOnly(webpki))
        })
    }

    /// A connection error with what to check when TLS is what failed.
    pub fn explain(&self, error: String, server_name: &str) -> String {
        let ca = self
            .ca
            .as_deref()
            .map_or_else(String::new, |p| p.display().to_string());
        if error.contains("not valid for name") || error.contains("NotValidForName") {
            format!(
                "{error}; sslmode {}: the server's certificate does not name `{server_name}`: \
                 connect by a name it carries, set tls_server_name to one, or use \
                 sslmode = \"verify-ca\" (the CA is still checked)",
                self.mode
            )
        } else if error.contains("invalid peer certificate") {
            format!(
                "{error}; sslmode {}: the server's certificate is not signed by a CA in \
                 tls_ca_file ({ca}): put the CA that signs it in tls_ca_file",
                self.mode
            )
        } else if error.contains("server does not support TLS") {
            format!(
                "{error}; sslmode {} needs TLS: turn on `ssl` in the server's postgresql.conf, \
                 or set sslmode = \"prefer\" or \"disable\"",
                self.mode
            )
        } else if self.client.is_some() && error.contains("certificate") {
            format!("{error}; check tls_cert_file and tls_key_file (the server's ssl_ca_file must sign the certificate)")
        } else {
            error
        }
    }
}

/// tokio-postgres-rustls' connector, with the name the certificate is
/// checked against set by `tls_server_name` instead of the host.
#[derive(Clone)]
pub struct Connector {
    inner: MakeRustlsConnect,
    server_name: Option<String>,
}

impl Connector {
    pub fn new(config: rustls::ClientConfig, server_name: Option<String>) -> Connector {
        Connector {
            inner: MakeRustlsConnect::new(config),
            server_name,
        }
    }
}

impl<S> MakeTlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Self::TlsConnect, Self::Error> {
        let name = self.server_name.as_deref().unwrap_or(domain);
        MakeTlsConnect::<S>::make_tls_connect(&mut self.inner, name)
    }
}

/// `prefer` and `require` without a CA file: any certificate, but the
/// handshake must be signed by its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked as `verify-full` checks it, the name
/// is not. webpki checks the name only after the chain, so a name error
/// means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        (p.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn verify_ca_checks_the_chain_only_and_verify_full_the_name_too() {
        let dir = std::env::temp_dir().join(format!("weir-pg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, good_key) = ca("good CA");
        let (other, _) = ca("other CA");
        let (good_file, other_file) = (dir.join("good.pem"), dir.join("other.pem"));
        std::fs::write(&good_file, good.pem()).unwrap();
        std::fs::write(&other_file, other.pem()).unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["db.example".to_string()]).unwrap();
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = p
            .signed_by(&rcgen::KeyPair::generate().unwrap(), &good, &good_key)
            .unwrap();
        let check = |mode, ca: &Path, name: &str| {
            let s = TlsSettings {
                mode,
                ca: Some(ca.to_path_buf()),
                client: None,
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            s.verifier(provider)
                .unwrap()
                .verify_server_cert(
                    leaf.der(),
                    &[],
                    &ServerName::try_from(name.to_string()).unwrap(),
                    &[],
                    UnixTime::now(),
                )
                .map(|_| ())
                .map_err(|e| s.explain(e.to_string(), name))
        };
        assert_eq!(check(SslMode::VerifyFull, &good_file, "db.example"), Ok(()));
        assert_eq!(check(SslMode::VerifyCa, &good_file, "127.0.0.1"), Ok(()));
        let e = check(SslMode::VerifyFull, &good_file, "127.0.0.1").unwrap_err();
        assert!(
            e.contains("does not name `127.0.0.1`") && e.contains("tls_server_name"),
            "{e}"
        );
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let e = check(mode, &other_file, "db.example").unwrap_err();
            assert!(
                e.contains("UnknownIssuer")
                    && e.contains("tls_ca_file")
                    && e.contains(mode.as_str()),
                "{e}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sslmode_names_are_libpqs() {
        for n in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            assert_eq!(SslMode::parse(n).unwrap().as_str(), n);
        }
        let e = SslMode::parse("verify").unwrap_err();
        assert!(
            e.starts_with("sslmode: `verify`") && e.contains("verify-full"),
            "{e}"
        );
    }
}
