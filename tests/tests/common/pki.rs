//! Test certificates (rcgen): a CA and certificates it signs, as PEM files.

use super::Scratch;

/// A test PKI: one CA, a server certificate for 127.0.0.1 and a client
/// certificate, written as PEM files (keys mode 0600) under `s`.
pub struct Pki {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

pub fn issue(
    s: &Scratch,
    name: &str,
    sans: Vec<String>,
    usage: rcgen::ExtendedKeyUsagePurpose,
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let mut params = rcgen::CertificateParams::new(sans).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca, ca_key).unwrap();
    let cert_path = s.write(&format!("{name}.pem"), &cert.pem());
    let key_path = s.write(&format!("{name}.key"), &key.serialize_pem());
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (cert_path, key_path)
}

impl Pki {
    pub fn new(s: &Scratch) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "weir test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        let ca_path = s.write("ca.pem", &ca.pem());
        let (server_cert, server_key) = issue(
            s,
            "server",
            vec!["127.0.0.1".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
            &ca_key,
        );
        let (client_cert, client_key) = issue(
            s,
            "client",
            vec![],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
            &ca_key,
        );
        Pki {
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}
