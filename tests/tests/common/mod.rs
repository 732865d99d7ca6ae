//! Shared harness for the end-to-end tests: locate the release binaries,
//! spawn them with logs in a per-test directory, and clean up.

#![allow(dead_code)]

pub mod pki;

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Directory holding weir-sender, weir-receiver and the test tools
/// (the test executable lives in its `deps/` subdirectory).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make test` (it builds the binaries before the tests)",
        p.display()
    );
    p
}

/// A scratch directory removed when the test passes (kept on failure for
/// the logs).
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("weir-e2e-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("scratch dir");
        Scratch { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        } else {
            eprintln!("test files kept in {}", self.path.display());
        }
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    /// Runs one of the workspace binaries.
    pub fn spawn(scratch: &Scratch, name: &str, program: &str, args: &[&str]) -> Proc {
        Proc::spawn_path(scratch, name, &bin(program), args)
    }

    /// Runs any program, logging to `{name}.log` in the scratch directory.
    pub fn spawn_path(scratch: &Scratch, name: &str, program: &Path, args: &[&str]) -> Proc {
        let log = std::fs::File::create(scratch.join(&format!("{name}.log"))).expect("log file");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Proc {
            name: name.to_string(),
            child,
        }
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Sends SIGTERM and waits up to `limit` for a clean exit.
    pub fn stop(&mut self, limit: Duration) -> bool {
        self.signal("TERM");
        self.wait(limit)
    }

    pub fn wait(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The 32-byte link key both sides of a test use: `link.key` in the scratch
/// directory, created once with mode 0600 (the receiver and sender refuse
/// anything more open).
pub fn link_key(scratch: &Scratch) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = scratch.join("link.key");
    if !path.exists() {
        let key: [u8; 32] = rand::random();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("create link.key");
        f.write_all(&key).expect("write link.key");
    }
    path
}

/// `[auth]` table for a sender config, using [`link_key`]; a complete line
/// block that can stand first in the file.
pub fn sender_auth(scratch: &Scratch) -> String {
    format!("[auth]\nkey_file = \"{}\"\n", link_key(scratch).display())
}

/// `[auth]` table for a receiver config, using [`link_key`].
pub fn receiver_auth(scratch: &Scratch) -> String {
    format!(
        "[auth]\nkey_files = [\"{}\"]\n",
        link_key(scratch).display()
    )
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

pub fn read_json(path: &Path) -> Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// The complete lines of a JSON-lines file, parsed. A file a sink is still
/// writing may end in part of a line (its buffer reached the disk at an
/// arbitrary byte): that part is not read until its newline is there.
pub fn json_lines(path: &Path) -> Vec<Value> {
    let bytes = std::fs::read(path).unwrap_or_default();
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    std::str::from_utf8(&bytes[..end])
        .unwrap_or_else(|e| panic!("{} is not UTF-8: {e}", path.display()))
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad JSON line in {}: {e}: {l}", path.display()))
        })
        .collect()
}

/// `(from, to, cause)` of every gap of `stream` in an audit log.
pub fn gaps(audit: &Path, stream: &str) -> Vec<(u64, u64, String)> {
    json_lines(audit)
        .into_iter()
        .filter(|v| v["event"] == "gap" && v["stream"] == stream)
        .map(|v| {
            (
                v["from"].as_u64().unwrap(),
                v["to"].as_u64().unwrap(),
                v["cause"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Sequence numbers of every line in the JSON Lines files of `stream`
/// (the current file and any rotated ones).
pub fn written_seqs(dir: &Path, stem: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().into_string().unwrap_or_default();
        if name.starts_with(stem) && name.ends_with(".jsonl") {
            seqs.extend(
                json_lines(&e.path())
                    .iter()
                    .map(|v| v["seq"].as_u64().expect("seq")),
            );
        }
    }
    seqs
}

/// Asserts that `delivered` (in write order) and `gaps` together account
/// for `0..total` exactly: no duplicates, in order, nothing missing.
pub fn assert_exactly_accounted(delivered: &[u64], gaps: &[(u64, u64, String)], total: u64) {
    assert!(
        delivered.windows(2).all(|w| w[0] < w[1]),
        "records written out of order or twice"
    );
    let mut all: Vec<u64> = delivered.to_vec();
    for (from, to, _) in gaps {
        all.extend(*from..=*to);
    }
    all.sort_unstable();
    let dupes = all.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(
        dupes, 0,
        "a sequence number is both written and in a gap, or in two gaps"
    );
    let missing: Vec<u64> = (0..total)
        .filter(|s| all.binary_search(s).is_err())
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "sequence numbers neither written nor in a gap (first 10): {missing:?}"
    );
    assert_eq!(
        all.len() as u64,
        total,
        "more sequence numbers accounted than were sent"
    );
}

/// Asserts `seqs` is exactly `0..total` in order, naming the first difference.
pub fn assert_complete_in_order(seqs: &[u64], total: u64) {
    if let Some(i) = (0..seqs.len()).find(|i| seqs[*i] != *i as u64) {
        panic!(
            "record #{i} has seq {} (expected {i}); {} records written of {total}",
            seqs[i],
            seqs.len()
        );
    }
    assert_eq!(seqs.len() as u64, total, "records written");
}

/// A TCP relay from a loopback port to `target` that a test can take down
/// as a server outage looks from a client: `stop` closes the listening
/// socket (a new connection is refused) and every open connection;
/// `start` listens on the same port again.
pub struct TcpProxy {
    pub port: u16,
    listener: std::sync::Arc<std::sync::Mutex<Option<TcpListener>>>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    end: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TcpProxy {
    /// Relays `listen` (0: any free port) to `target` on loopback.
    pub fn start(listen: u16, target: u16) -> TcpProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpStream};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind(("127.0.0.1", listen)).expect("proxy port");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = TcpProxy {
            port,
            listener: std::sync::Arc::new(std::sync::Mutex::new(Some(listener))),
            open: Default::default(),
            end: Default::default(),
        };
        let (listener, open, end) = (
            proxy.listener.clone(),
            proxy.open.clone(),
            proxy.end.clone(),
        );
        std::thread::spawn(move || {
            while !end.load(Ordering::Relaxed) {
                // The listener stays locked until the connection is in
                // `open`, so `stop` closes every connection it let in.
                let guard = listener.lock().unwrap();
                let Some(Ok((client, _))) = guard.as_ref().map(TcpListener::accept) else {
                    drop(guard);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                open.lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                drop(guard);
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        proxy
    }

    /// Closes the listening socket and every open connection: from now on
    /// a connection to `port` is refused.
    pub fn stop(&self) {
        drop(self.listener.lock().unwrap().take());
        for c in self.open.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Listens on `port` again.
    pub fn restart(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .unwrap_or_else(|e| panic!("listening again on proxy port {}: {e}", self.port));
        listener.set_nonblocking(true).unwrap();
        *self.listener.lock().unwrap() = Some(listener);
    }

    /// True when a connection to `port` is refused (the proxy is down).
    pub fn refuses(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port))
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.end.store(true, std::sync::atomic::Ordering::Relaxed);
        self.stop();
    }
}

/// What a process spawned as `log` wrote to its log so far ("" if none).
pub fn log_text(s: &Scratch, log: &str) -> String {
    std::fs::read_to_string(s.join(&format!("{log}.log"))).unwrap_or_default()
}

/// weir-linksim on loopback from `from` to `to` with a seeded random
/// `loss`, and linksim's default bursts unless told otherwise.
pub struct Linksim<'a> {
    s: &'a Scratch,
    name: String,
    args: Vec<String>,
}

impl<'a> Linksim<'a> {
    pub fn new(s: &'a Scratch, from: u16, to: u16, seed: u64, loss: f64) -> Self {
        let args = [
            "--listen".to_string(),
            format!("127.0.0.1:{from}"),
            "--target".to_string(),
            format!("127.0.0.1:{to}"),
            "--seed".to_string(),
            seed.to_string(),
            "--loss".to_string(),
            loss.to_string(),
        ];
        Linksim {
            s,
            name: "linksim".into(),
            args: args.into(),
        }
    }

    /// Its log is NAME.log (and its stats NAME.json); `linksim` by default.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// Bursts starting with probability `start` per datagram, `len` long.
    pub fn bursts(mut self, start: &str, len: &str) -> Self {
        self.args
            .extend(["--burst-start", start, "--burst-len", len].map(String::from));
        self
    }

    /// Random loss only.
    pub fn no_bursts(self) -> Self {
        self.bursts("0", "0")
    }

    /// Writes its counts to NAME.json in the scratch directory.
    pub fn stats_file(mut self) -> Self {
        let path = self.s.join(&format!("{}.json", self.name));
        self.args
            .extend(["--stats-file".into(), path.display().to_string()]);
        self
    }

    pub fn spawn(self) -> Proc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        Proc::spawn(self.s, &self.name, "weir-linksim", &args)
    }
}
