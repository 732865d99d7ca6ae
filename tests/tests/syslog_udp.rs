//! The `syslog` and `udp` sources and sinks end to end: the real binaries
//! through weir-linksim, fed by the system's `logger` and by the test.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::Value;

struct Link {
    sender_port: u16,
    receiver_port: u16,
}

impl Link {
    fn new() -> Link {
        Link {
            sender_port: free_udp_port(),
            receiver_port: free_udp_port(),
        }
    }

    fn linksim(&self, s: &Scratch, seed: u64, loss: f64) -> Proc {
        Linksim::new(s, self.sender_port, self.receiver_port, seed, loss)
            .stats_file()
            .spawn()
    }
}

fn start_receiver(s: &Scratch, link: &Link, sinks: &str) -> Proc {
    let d = s.path.display();
    let cfg = format!(
        "{}[link]\nlisten = \"127.0.0.1:{}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
         [metrics]\npath = \"{d}/receiver-metrics.json\"\nlog_interval_s = 1\n{sinks}",
        receiver_auth(s),
        link.receiver_port
    );
    let path = s.write("receiver.toml", &cfg);
    Proc::spawn(
        s,
        "receiver",
        "weir-receiver",
        &["run", "--config", path.to_str().unwrap()],
    )
}

fn start_sender(s: &Scratch, link: &Link, sources: &str) -> Proc {
    let cfg = format!(
        "{2}[link]\ndestination = \"127.0.0.1:{}\"\nrate = \"100Mbit\"\n[metrics]\npath = \"{1}/sender-metrics.json\"\nlog_interval_s = 1\n[spool]\npath = \"{1}/spool\"\n{sources}",
        link.sender_port,
        s.path.display(),
        sender_auth(s)
    );
    let path = s.write("sender.toml", &cfg);
    Proc::spawn(
        s,
        "sender",
        "weir-sender",
        &["run", "--config", path.to_str().unwrap()],
    )
}

/// Waits until every named source of the sender says it is listening.
fn wait_listening(s: &Scratch, sources: &[&str]) {
    let metrics = s.join("sender-metrics.json");
    assert!(
        wait_until(Duration::from_secs(30), || {
            let m = read_json(&metrics);
            sources
                .iter()
                .all(|n| m["sources"][n]["state"] == "listening")
        }),
        "sources {sources:?} never listened; see {}",
        s.path.display()
    );
}

/// Every line the file sink wrote for `stream`, in order.
fn stream_lines(dir: &Path, stream: &str) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&format!("{stream}.")) && n.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    files.iter().flat_map(|p| json_lines(p)).collect()
}

fn logger(args: &[&str]) {
    let out = Command::new("logger")
        .args(args)
        .output()
        .expect("running logger");
    assert!(
        out.status.success(),
        "logger {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn find<'a>(lines: &'a [Value], text: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["text"] == text)
        .unwrap_or_else(|| panic!("no log with text {text:?} in {lines:#?}"))
}

#[test]
fn logger_over_udp_and_tcp_arrives_as_logs_and_malformed_lines_are_flagged() {
    let s = Scratch::new("syslog_logger");
    let link = Link::new();
    let (udp_port, tcp_port) = (free_udp_port(), free_tcp_port());
    let out = s.join("out");
    let _receiver = start_receiver(
        &s,
        &link,
        &format!(
            "[[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{}\"\n",
            out.display()
        ),
    );
    let _linksim = link.linksim(&s, 7, 0.02);
    let _sender = start_sender(
        &s,
        &link,
        &format!(
            "[[sources]]\nname = \"sys_udp\"\ntype = \"syslog\"\nlisten = \"udp://127.0.0.1:{udp_port}\"\n\
             [[sources]]\nname = \"sys_tcp\"\ntype = \"syslog\"\nlisten = \"tcp://127.0.0.1:{tcp_port}\"\nmax_message_size = \"1KiB\"\n"
        ),
    );
    wait_listening(&s, &["sys_udp", "sys_tcp"]);
    let (up, tp) = (udp_port.to_string(), tcp_port.to_string());
    let udp = ["--udp", "-n", "127.0.0.1", "-P", &up];
    let tcp = ["--tcp", "-n", "127.0.0.1", "-P", &tp];
    let with = |base: &[&str], more: &[&str]| -> Vec<String> {
        base.iter().chain(more).map(|a| a.to_string()).collect()
    };
    let run = |args: Vec<String>| logger(&args.iter().map(String::as_str).collect::<Vec<_>>());
    run(with(
        &udp,
        &[
            "--rfc5424",
            "--sd-id",
            "zoo@32473",
            "--sd-param",
            "tiger=\"hungry\"",
            "--sd-param",
            "note=\"say \\\"hi\\\"\"",
            "--msgid",
            "ID7",
            "-t",
            "app5424",
            "-p",
            "local3.err",
            "udp structured hello",
        ],
    ));
    run(with(
        &udp,
        &[
            "--rfc3164",
            "-t",
            "app3164",
            "-p",
            "user.warning",
            "udp bsd hello",
        ],
    ));
    run(with(
        &tcp,
        &[
            "--rfc5424",
            "--octet-count",
            "-t",
            "tcpapp",
            "tcp octet hello",
        ],
    ));
    run(with(
        &tcp,
        &["--rfc5424", "-t", "tcpapp", "tcp newline hello"],
    ));
    run(with(
        &tcp,
        &[
            "--rfc3164",
            "-t",
            "tcp3164",
            "-p",
            "daemon.info",
            "tcp bsd hello",
        ],
    ));
    // Malformed input: not syslog at all, a bad priority, a bad RFC 5424
    // header, an over-long line; valid lines after each still parse.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(b"this is not syslog", ("127.0.0.1", udp_port))
        .unwrap();
    sock.send_to(
        b"<13>1 2026-99-99T00:00:00Z h a - - - bad date",
        ("127.0.0.1", udp_port),
    )
    .unwrap();
    sock.send_to(
        b"<13>1 - h app - - - udp after garbage",
        ("127.0.0.1", udp_port),
    )
    .unwrap();
    let mut conn = TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
    let long = format!("<13>1 - h app - - - {}\n", "x".repeat(3000));
    conn.write_all(b"\xff\xfe binary garbage\n<999>too high\n")
        .unwrap();
    conn.write_all(long.as_bytes()).unwrap();
    conn.write_all(b"<13>1 - h app - - - tcp after garbage\n")
        .unwrap();
    drop(conn);

    let mut udp_lines = Vec::new();
    let mut tcp_lines = Vec::new();
    assert!(
        wait_until(Duration::from_secs(60), || {
            udp_lines = stream_lines(&out, "sys_udp");
            tcp_lines = stream_lines(&out, "sys_tcp");
            udp_lines.len() >= 5 && tcp_lines.len() >= 7
        }),
        "not everything arrived: udp {udp_lines:#?} tcp {tcp_lines:#?}; see {}",
        s.path.display()
    );
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap();
    let host = host.trim();

    let l = find(&udp_lines, "udp structured hello");
    assert_eq!(l["parse_error"], Value::Null);
    assert_eq!(
        (l["facility"].as_u64(), l["severity"].as_u64()),
        (Some(19), Some(3))
    );
    assert_eq!(l["app"], "app5424");
    assert_eq!(l["msg_id"], "ID7");
    assert_eq!(l["host"], host);
    assert_eq!(
        l["structured_data"]["zoo@32473"],
        serde_json::json!([["tiger", "hungry"], ["note", "say \"hi\""]])
    );
    let ts = chrono::DateTime::parse_from_rfc3339(l["ts"].as_str().expect("ts")).unwrap();
    assert!(
        (chrono::Utc::now() - ts.to_utc()).num_seconds().abs() < 120,
        "{ts}"
    );

    let l = find(&udp_lines, "udp bsd hello");
    assert_eq!(l["parse_error"], Value::Null);
    assert_eq!(
        (l["facility"].as_u64(), l["severity"].as_u64()),
        (Some(1), Some(4))
    );
    assert_eq!(l["app"], "app3164");
    assert_eq!(l["host"], host);

    for text in ["tcp octet hello", "tcp newline hello"] {
        let l = find(&tcp_lines, text);
        assert_eq!(l["parse_error"], Value::Null, "{l}");
        assert_eq!(l["app"], "tcpapp");
    }
    let l = find(&tcp_lines, "tcp bsd hello");
    assert_eq!(
        (l["facility"].as_u64(), l["severity"].as_u64()),
        (Some(3), Some(6))
    );
    assert_eq!(l["app"], "tcp3164");

    let l = find(&udp_lines, "this is not syslog");
    assert!(
        l["parse_error"].as_str().unwrap().contains("no <PRI>"),
        "{l}"
    );
    assert_eq!(l["host"], "127.0.0.1");
    let l = find(&udp_lines, "<13>1 2026-99-99T00:00:00Z h a - - - bad date");
    assert!(
        l["parse_error"].as_str().unwrap().contains("timestamp"),
        "{l}"
    );
    assert_eq!(
        find(&udp_lines, "udp after garbage")["parse_error"],
        Value::Null
    );

    let l = find(&tcp_lines, "\u{fffd}\u{fffd} binary garbage");
    assert!(
        l["parse_error"].as_str().unwrap().contains("no <PRI>"),
        "{l}"
    );
    let l = find(&tcp_lines, "<999>too high");
    assert!(l["parse_error"].as_str().unwrap().contains("191"), "{l}");
    let long = tcp_lines
        .iter()
        .find(|l| l["text"].as_str().unwrap().starts_with("xxx"))
        .expect("the over-long line arrives, cut");
    assert_eq!(long["text"].as_str().unwrap().len(), 1024 - 20);
    assert!(
        long["parse_error"].as_str().unwrap().contains("truncated"),
        "{long}"
    );
    assert_eq!(
        find(&tcp_lines, "tcp after garbage")["parse_error"],
        Value::Null
    );

    // Parse errors are counted in each source's status.
    let metrics = s.join("sender-metrics.json");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let m = read_json(&metrics);
            m["sources"]["sys_udp"]["parse_errors"] == 2
                && m["sources"]["sys_tcp"]["parse_errors"] == 2
                && m["sources"]["sys_tcp"]["truncated"] == 1
                && m["sources"]["sys_udp"]["messages"] == 5
        }),
        "counts: {:#}",
        read_json(&metrics)["sources"]
    );
}

/// Reads datagrams into a list until `n` arrived or `limit` passed.
fn collect_datagrams(
    sock: UdpSocket,
    n: usize,
    limit: Duration,
) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while got.len() < n && Instant::now() < deadline {
            if let Ok(len) = sock.recv(&mut buf) {
                got.push(buf[..len].to_vec());
            }
        }
        got
    })
}

fn big_udp_socket() -> UdpSocket {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    sock.set_recv_buffer_size(4 << 20).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.into()
}

#[test]
fn ten_thousand_datagrams_of_mixed_sizes_arrive_byte_identical_at_the_udp_sink() {
    const N: usize = 10_000;
    let s = Scratch::new("udp_10k");
    let link = Link::new();
    let listener = big_udp_socket();
    let target = listener.local_addr().unwrap();
    let collector = collect_datagrams(listener, N, Duration::from_secs(180));
    let source_port = free_udp_port();
    let out = s.join("out");
    let _receiver = start_receiver(
        &s,
        &link,
        &format!(
            "[[sinks]]\nname = \"reemit\"\ntype = \"udp\"\ntarget = \"{target}\"\n\
             [[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{}\"\nstreams = [\"telemetry\"]\n",
            out.display()
        ),
    );
    let _linksim = link.linksim(&s, 11, 0.02);
    let _sender = start_sender(
        &s,
        &link,
        &format!(
            "[[sources]]\nname = \"telemetry\"\ntype = \"udp\"\nlisten = \"127.0.0.1:{source_port}\"\ntopic = \"plant/telemetry\"\n"
        ),
    );
    wait_listening(&s, &["telemetry"]);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    let sent: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            // Mostly small (telemetry, traps), some up to 8 KiB; random
            // bytes, so invalid UTF-8 and "garbage" of every kind.
            let len = if i % 10 == 0 {
                rng.gen_range(1..=8192)
            } else {
                rng.gen_range(1..=512)
            };
            (0..len).map(|_| rng.gen()).collect()
        })
        .collect();
    let feed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let feed_addr = feed.local_addr().unwrap();
    for (i, d) in sent.iter().enumerate() {
        feed.send_to(d, ("127.0.0.1", source_port)).unwrap();
        // Paced: at most ~20 datagrams a millisecond, far below what the
        // source's 4 MiB socket buffer absorbs.
        if i % 20 == 19 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let got = collector.join().unwrap();
    let metrics = read_json(&s.join("sender-metrics.json"));
    assert_eq!(
        got.len(),
        N,
        "datagrams re-emitted; sender source status {:#}; see {}",
        metrics["sources"]["telemetry"],
        s.path.display()
    );
    assert!(got == sent, "the datagrams differ or are out of order");
    // The file sink's copies carry the topic and the sender's peer address.
    assert!(
        wait_until(Duration::from_secs(30), || stream_lines(&out, "telemetry")
            .len()
            == N),
        "the file sink did not write every datagram"
    );
    let lines = stream_lines(&out, "telemetry");
    assert_eq!(lines[0]["topic"], "plant/telemetry");
    assert_eq!(lines[0]["origin"], feed_addr.to_string());
    // The metrics file is rewritten every second: wait for the count.
    let metrics = s.join("sender-metrics.json");
    assert!(
        wait_until(Duration::from_secs(10), || read_json(&metrics)["sources"]
            ["telemetry"]["datagrams"]
            == N as u64),
        "{:#}",
        read_json(&metrics)["sources"]["telemetry"]
    );
    assert_eq!(
        read_json(&metrics)["sources"]["telemetry"]["kernel_drops"],
        0
    );
}

/// Reads octet-counted frames (RFC 6587) from one accepted connection.
fn read_octet_counted(listener: TcpListener, n: usize) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        octet_counted_frames(conn, n)
    })
}

/// The first `n` octet-counted frames read from `conn` (fewer if it ends).
fn octet_counted_frames(mut conn: impl Read, n: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = [0u8; 4096];
    while frames.len() < n {
        let k = conn
            .read(&mut chunk)
            .expect("reading the sink's connection");
        if k == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..k]);
        while let Some(sp) = buf.iter().position(|&b| b == b' ') {
            let len: usize = std::str::from_utf8(&buf[..sp])
                .unwrap()
                .parse()
                .expect("octet count");
            if buf.len() < sp + 1 + len {
                break;
            }
            frames.push(String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap());
            buf.drain(..sp + 1 + len);
        }
    }
    frames
}

#[test]
fn the_syslog_sink_forwards_rfc5424_over_tcp_and_udp_keeping_time_host_and_sd() {
    let s = Scratch::new("syslog_sink");
    let link = Link::new();
    let tcp_collector = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp_collector.local_addr().unwrap();
    let udp_collector = big_udp_socket();
    let udp_addr = udp_collector.local_addr().unwrap();
    let tcp_frames = read_octet_counted(tcp_collector, 3);
    let udp_frames = collect_datagrams(udp_collector, 3, Duration::from_secs(60));
    let _receiver = start_receiver(
        &s,
        &link,
        &format!(
            "[[sinks]]\nname = \"siem_tcp\"\ntype = \"syslog\"\ntarget = \"tcp://{tcp_addr}\"\n\
             [[sinks]]\nname = \"siem_udp\"\ntype = \"syslog\"\ntarget = \"udp://{udp_addr}\"\n"
        ),
    );
    let _linksim = link.linksim(&s, 5, 0.02);
    let source_port = free_udp_port();
    let _sender = start_sender(
        &s,
        &link,
        &format!("[[sources]]\nname = \"plc\"\ntype = \"syslog\"\nlisten = \"udp://127.0.0.1:{source_port}\"\n"),
    );
    wait_listening(&s, &["plc"]);
    let feed = UdpSocket::bind("127.0.0.1:0").unwrap();
    for m in [
        &br#"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog 42 ID47 [exampleSDID@32473 iut="3" eventSource="Appli\"cation\]"] An application event"#[..],
        b"<34>Oct 11 22:14:15 plc7 su[123]: 'su root' failed",
        b"not syslog",
    ] {
        feed.send_to(m, ("127.0.0.1", source_port)).unwrap();
    }
    let year = chrono::Datelike::year(&chrono::Utc::now());
    let first = r#"<165>1 2003-10-11T22:14:15.003000Z mymachine.example.com evntslog 42 ID47 [exampleSDID@32473 iut="3" eventSource="Appli\"cation\]"] An application event"#;
    let check = |frames: Vec<String>, via: &str| {
        assert_eq!(
            frames.len(),
            3,
            "{via}: {frames:#?}; see {}",
            s.path.display()
        );
        assert_eq!(frames[0], first, "{via}");
        assert!(
            frames[1].starts_with("<34>1 ")
                && frames[1].ends_with("T22:14:15.000000Z plc7 su 123 - - 'su root' failed"),
            "{via}: {}",
            frames[1]
        );
        // RFC 3164 has no year: the sender took the one nearest to now.
        let y: i32 = frames[1][6..10].parse().unwrap();
        assert!((year - 1..=year + 1).contains(&y), "{via}: {}", frames[1]);
        assert!(
            frames[2].starts_with("<13>1 ")
                && frames[2].contains(" 127.0.0.1 - - - [weir@32473 parse_error=\"no <PRI> at the start\"] not syslog"),
            "{via}: {}",
            frames[2]
        );
    };
    check(tcp_frames.join().unwrap(), "tcp");
    check(
        udp_frames
            .join()
            .unwrap()
            .into_iter()
            .map(|d| String::from_utf8(d).unwrap())
            .collect(),
        "udp",
    );
}

mod tls {
    use std::path::Path;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    pub use tokio_rustls::rustls;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn certs(p: &Path) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(p)
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
    }

    fn roots(ca: &Path) -> Arc<rustls::RootCertStore> {
        let mut r = rustls::RootCertStore::empty();
        for c in certs(ca) {
            r.add(c).unwrap();
        }
        Arc::new(r)
    }

    /// A collector that requires a client certificate from `ca`.
    pub fn server(cert: &Path, key: &Path, ca: &Path) -> Arc<rustls::ServerConfig> {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
                .build()
                .unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs(cert), PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap(),
        )
    }

    /// A client trusting `ca`, with a client certificate when given one.
    pub fn client(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
        let b = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(ca));
        Arc::new(match identity {
            Some((cert, key)) => b
                .with_client_auth_cert(certs(cert), PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap(),
            None => b.with_no_client_auth(),
        })
    }
}

#[test]
fn syslog_crosses_over_tls_both_ways_and_clients_without_a_trusted_certificate_are_refused() {
    let s = Scratch::new("syslog_tls");
    let pki = pki::Pki::new(&s);
    let link = Link::new();
    // The collector (a SIEM) on the IT side: TLS, requires the sink's client certificate.
    let collector = TcpListener::bind("127.0.0.1:0").unwrap();
    let collector_addr = collector.local_addr().unwrap();
    let server = tls::server(&pki.server_cert, &pki.server_key, &pki.ca);
    let frames = std::thread::spawn(move || {
        let (conn, _) = collector.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let tls = tls::rustls::ServerConnection::new(server).unwrap();
        octet_counted_frames(tls::rustls::StreamOwned::new(tls, conn), 2)
    });
    let _receiver = start_receiver(
        &s,
        &link,
        &format!(
            "[[sinks]]\nname = \"siem\"\ntype = \"syslog\"\ntarget = \"tls://{collector_addr}\"\n\
             tls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            pki.ca.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        ),
    );
    let _linksim = link.linksim(&s, 7, 0.02);
    let source_port = free_tcp_port();
    let _sender = start_sender(
        &s,
        &link,
        &format!(
            "[[sources]]\nname = \"plc\"\ntype = \"syslog\"\nlisten = \"tls://127.0.0.1:{source_port}\"\n\
             tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_client_ca_file = \"{}\"\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca.display()
        ),
    );
    wait_listening(&s, &["plc"]);

    // A plain-TCP client, and a TLS client with no certificate: both refused, counted.
    let mut plain = TcpStream::connect(("127.0.0.1", source_port)).unwrap();
    plain.write_all(b"13 <13>1 - - - -").unwrap();
    drop(plain);
    {
        let sock = TcpStream::connect(("127.0.0.1", source_port)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let name = "127.0.0.1".try_into().unwrap();
        let conn = tls::rustls::ClientConnection::new(tls::client(&pki.ca, None), name).unwrap();
        let mut stream = tls::rustls::StreamOwned::new(conn, sock);
        // TLS 1.3: the server's refusal arrives after the client's Finished.
        let refused = stream
            .write_all(b"13 <13>1 - - - -")
            .and_then(|_| stream.flush())
            .and_then(|_| stream.read(&mut [0u8; 16]));
        assert!(
            !matches!(refused, Ok(n) if n > 0),
            "a client without a certificate was served: {refused:?}"
        );
    }
    // A client with a certificate from the CA: served.
    let sock = TcpStream::connect(("127.0.0.1", source_port)).unwrap();
    let conn = tls::rustls::ClientConnection::new(
        tls::client(&pki.ca, Some((&pki.client_cert, &pki.client_key))),
        "127.0.0.1".try_into().unwrap(),
    )
    .unwrap();
    let mut stream = tls::rustls::StreamOwned::new(conn, sock);
    for m in [
        "<165>1 2003-10-11T22:14:15.003Z plc7 evntslog 42 ID47 - over tls, octet-counted",
        "<34>1 2003-10-11T22:14:16.000Z plc7 su - - - second",
    ] {
        write!(stream, "{} {m}", m.len()).unwrap();
    }
    stream.flush().unwrap();

    let frames = frames.join().unwrap();
    assert_eq!(
        frames,
        [
            "<165>1 2003-10-11T22:14:15.003000Z plc7 evntslog 42 ID47 - over tls, octet-counted",
            "<34>1 2003-10-11T22:14:16.000000Z plc7 su - - - second",
        ],
        "see {}",
        s.path.display()
    );
    let metrics = s.join("sender-metrics.json");
    assert!(
        wait_until(Duration::from_secs(10), || {
            read_json(&metrics)["sources"]["plc"]["tls_handshake_failures"].as_u64() >= Some(2)
        }),
        "{:#}",
        read_json(&metrics)["sources"]["plc"]
    );
    drop(stream);
}
