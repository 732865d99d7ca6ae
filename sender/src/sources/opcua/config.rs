//! The `opcua` source's configuration and its checks (`check-config`
//! runs them; they read the certificate, key and password files so a
//! wrong file is named before the sender starts).

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;

use opcua::types::NodeId;
use serde::{Deserialize, Serialize};

use super::security;

/// One monitored variable: a node id string, or a table with a tag.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Node {
    /// `"ns=2;s=Temp"`: the tag is the node id string.
    Id(String),
    /// `{ node = "ns=2;s=Temp", tag = "boiler/temp" }`.
    Named { node: String, tag: String },
}

impl Node {
    pub(super) fn node(&self) -> &str {
        match self {
            Node::Id(id) | Node::Named { node: id, .. } => id,
        }
    }

    pub(super) fn tag(&self) -> &str {
        match self {
            Node::Id(id) => id,
            Node::Named { tag, .. } => tag,
        }
    }
}

/// A folder (or object) whose variables are all monitored: a browse path
/// from the Root folder (`"Objects/Plant/Line1"`, a segment may carry its
/// namespace index, `"Objects/2:Plant"`) or a node id (`"ns=2;s=Line1"`),
/// or a table with the tag that stands for the root in the variables'
/// tags.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BrowseRoot {
    Path(String),
    Named { path: String, tag: String },
}

/// Where a browse starts.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Start {
    /// A node id given as such.
    Node(NodeId),
    /// Browse names from the Root folder: `(namespace index if given, name)`.
    Path(Vec<(Option<u16>, String)>),
}

impl BrowseRoot {
    pub(super) fn path(&self) -> &str {
        match self {
            BrowseRoot::Path(p) | BrowseRoot::Named { path: p, .. } => p,
        }
    }

    /// The tag of the root: the variables under it are tagged
    /// `ROOT/child/variable`.
    pub(super) fn tag(&self) -> &str {
        match self {
            BrowseRoot::Path(p) => p,
            BrowseRoot::Named { tag, .. } => tag,
        }
    }

    pub(super) fn start(&self) -> Result<Start, String> {
        let p = self.path();
        if p.contains('=') {
            return NodeId::from_str(p).map(Start::Node).map_err(|_| {
                format!("`{p}` is neither a node id (e.g. \"ns=2;s=Line1\") nor a browse path (e.g. \"Objects/Plant/Line1\")")
            });
        }
        let mut segments = Vec::new();
        for seg in p.split('/') {
            if seg.is_empty() {
                return Err(format!(
                    "`{p}` has an empty segment; write the browse names from the Root folder separated by /, e.g. \"Objects/Plant/Line1\""
                ));
            }
            let qualified = seg
                .split_once(':')
                .and_then(|(ns, name)| Some((ns.parse::<u16>().ok()?, name)));
            match qualified {
                Some((ns, name)) if !name.is_empty() => segments.push((Some(ns), name.to_string())),
                _ => segments.push((None, seg.to_string())),
            }
        }
        Ok(Start::Path(segments))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The server's endpoint URL: `opc.tcp://host:4840/path`.
    pub endpoint: String,
    /// The variables to subscribe to, by node id.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// Folders whose variables are all subscribed to (found again on
    /// every connection).
    #[serde(default)]
    pub browse: Vec<BrowseRoot>,
    /// `None` or `Basic256Sha256`.
    #[serde(default = "default_none")]
    pub security_policy: String,
    /// `None`, `Sign` or `SignAndEncrypt`.
    #[serde(default = "default_none")]
    pub security_mode: String,
    /// The sender's application instance certificate (PEM or DER).
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Its RSA private key (PEM, PKCS#8 or PKCS#1), mode 0600.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// The one server certificate trusted (PEM or DER).
    #[serde(default)]
    pub server_cert_file: Option<PathBuf>,
    /// A directory of trusted server certificates (`*.der`, `*.pem`,
    /// `*.crt`, `*.cer`), read again on every connection.
    #[serde(default)]
    pub trusted_dir: Option<PathBuf>,
    /// User name for the session; anonymous without it.
    #[serde(default)]
    pub username: Option<String>,
    /// The password: one line in a file only its owner can read.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// How often the server sends the changes it collected.
    #[serde(default = "default_publishing_interval_ms")]
    pub publishing_interval_ms: u64,
    /// How often the server samples each variable; unset: as often as it
    /// publishes.
    #[serde(default)]
    pub sampling_interval_ms: Option<u64>,
    /// A numeric value that moved less than this since the last reported
    /// one is not reported (absolute, or percent of the EURange).
    #[serde(default)]
    pub deadband: Option<f64>,
    /// `absolute` or `percent`.
    #[serde(default = "default_absolute")]
    pub deadband_type: String,
}

fn default_none() -> String {
    "None".into()
}

fn default_absolute() -> String {
    "absolute".into()
}

fn default_publishing_interval_ms() -> u64 {
    1000
}

/// `opc.tcp://host:port[/path]`, checked.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!("endpoint: `{endpoint}` {why}; write e.g. \"opc.tcp://192.0.2.30:4840/\"")
    };
    let rest = endpoint
        .strip_prefix("opc.tcp://")
        .ok_or_else(|| bad("must start with opc.tcp://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("has no :port"))?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !host.is_empty() => Ok(()),
        _ => Err(bad("has no valid host:port")),
    }
}

impl Config {
    /// Whether the channel is signed (and maybe encrypted).
    pub(super) fn secure(&self) -> bool {
        self.security_policy != "None"
    }

    pub(super) fn check(&self) -> Result<(), String> {
        check_endpoint(&self.endpoint)?;
        self.check_security()?;
        if !(10..=3_600_000).contains(&self.publishing_interval_ms) {
            return Err(format!(
                "publishing_interval_ms: {} must be between 10 and 3600000",
                self.publishing_interval_ms
            ));
        }
        if let Some(ms) = self.sampling_interval_ms {
            if ms > 3_600_000 {
                return Err(format!(
                    "sampling_interval_ms: {ms} must be between 0 (as fast as the server can) and 3600000"
                ));
            }
        }
        match self.deadband_type.as_str() {
            "absolute" | "percent" => {}
            other => {
                return Err(format!(
                    "deadband_type: `{other}` must be \"absolute\" or \"percent\""
                ))
            }
        }
        if let Some(d) = self.deadband {
            if !(d.is_finite() && d >= 0.0) {
                return Err(format!(
                    "deadband: {d} must be a number of at least 0 (an absolute change, or a percent with deadband_type = \"percent\")"
                ));
            }
            if self.deadband_type == "percent" && d > 100.0 {
                return Err(format!(
                    "deadband: {d} must be between 0 and 100 with deadband_type = \"percent\""
                ));
            }
        }
        if self.nodes.is_empty() && self.browse.is_empty() {
            return Err(
                "nodes: is empty and there is no `browse`; list the variables' node ids, e.g. nodes = [\"ns=2;s=Temp\"], or folders to browse, e.g. browse = [\"Objects/Plant\"]"
                    .into(),
            );
        }
        let mut ids = HashSet::new();
        let mut tags = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let id = NodeId::from_str(n.node()).map_err(|_| {
                format!(
                    "nodes[{i}]: `{}` is not a node id; write e.g. \"ns=2;s=Temp\" or \"ns=3;i=1001\"",
                    n.node()
                )
            })?;
            if !ids.insert(id) {
                return Err(format!("nodes[{i}]: `{}` is listed twice", n.node()));
            }
            if n.tag().is_empty() {
                return Err(format!("nodes[{i}].tag: is empty"));
            }
            if !tags.insert(n.tag().to_string()) {
                return Err(format!(
                    "nodes[{i}].tag: `{}` is used twice; each point needs its own tag",
                    n.tag()
                ));
            }
        }
        let mut roots = HashSet::new();
        for (i, b) in self.browse.iter().enumerate() {
            b.start().map_err(|e| format!("browse[{i}]: {e}"))?;
            if b.tag().is_empty() {
                return Err(format!("browse[{i}].tag: is empty"));
            }
            if !roots.insert(b.path().to_string()) {
                return Err(format!("browse[{i}]: `{}` is listed twice", b.path()));
            }
        }
        Ok(())
    }

    fn check_security(&self) -> Result<(), String> {
        match (self.security_policy.as_str(), self.security_mode.as_str()) {
            ("None", "None") => {
                for (key, set) in [
                    ("client_cert_file", self.client_cert_file.is_some()),
                    ("client_key_file", self.client_key_file.is_some()),
                    ("server_cert_file", self.server_cert_file.is_some()),
                    ("trusted_dir", self.trusted_dir.is_some()),
                ] {
                    if set {
                        return Err(format!(
                            "{key}: is only used with security_policy = \"Basic256Sha256\"; with \"None\" nothing is signed or encrypted"
                        ));
                    }
                }
            }
            ("None", mode @ ("Sign" | "SignAndEncrypt")) => {
                return Err(format!(
                    "security_mode: {mode} needs security_policy = \"Basic256Sha256\" (the policy \"None\" neither signs nor encrypts)"
                ))
            }
            ("Basic256Sha256", "None") => {
                return Err(
                    "security_mode: \"None\" with security_policy = \"Basic256Sha256\"; write security_mode = \"SignAndEncrypt\" (or \"Sign\")"
                        .into(),
                )
            }
            ("Basic256Sha256", "Sign" | "SignAndEncrypt") => {
                let cert = self.client_cert_file.as_ref().ok_or(
                    "client_cert_file: is required with security_policy = \"Basic256Sha256\"; see docs/sources.md (opcua, certificates) to make one",
                )?;
                let key = self.client_key_file.as_ref().ok_or(
                    "client_key_file: is required with security_policy = \"Basic256Sha256\" (the private key of client_cert_file)",
                )?;
                if self.server_cert_file.is_none() && self.trusted_dir.is_none() {
                    return Err(
                        "server_cert_file: is required with security_policy = \"Basic256Sha256\" (or trusted_dir): the server's certificate, so the sender knows it talks to the right server"
                            .into(),
                    );
                }
                security::ClientIdentity::load(cert, key)?;
                if let Some(dir) = &self.trusted_dir {
                    if !dir.is_dir() {
                        return Err(format!(
                            "trusted_dir: {} is not a directory",
                            dir.display()
                        ));
                    }
                }
                if let Some(f) = &self.server_cert_file {
                    security::read_certs(f, "server_cert_file")?;
                }
            }
            ("None" | "Basic256Sha256", other) => {
                return Err(format!(
                    "security_mode: `{other}` is not a mode; write \"None\", \"Sign\" or \"SignAndEncrypt\""
                ))
            }
            (other, _) => {
                return Err(format!(
                    "security_policy: `{other}` is not a policy this source supports; write \"None\" or \"Basic256Sha256\""
                ))
            }
        }
        match (&self.username, &self.password_file) {
            (Some(u), Some(p)) => {
                if u.is_empty() {
                    return Err("username: is empty".into());
                }
                security::read_password(p)?;
            }
            (Some(_), None) => {
                return Err(
                    "password_file: is required with `username` (one line, mode 0600)".into(),
                )
            }
            (None, Some(_)) => return Err("password_file: is set without `username`".into()),
            (None, None) => {}
        }
        Ok(())
    }
}
