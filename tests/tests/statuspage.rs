//! End-to-end: the receiver's read-only status page at `/` on
//! `[metrics] listen`, loaded in headless Chromium during a real run
//! (sender → weir-linksim with loss → receiver), shows what the run did:
//! the stream catalogue (source type, records, tags), the sender's
//! configuration hash as approved, the link's FEC repairs; a hostile
//! stream name from the sender side is shown as text, never as markup.
//! The same catalogue is in the Prometheus text and `weir-receiver status`.
//!
//! Needs Debian's `chromium` (/usr/bin/chromium): without it the test
//! prints why and passes as skipped; with `WEIR_SERVICES=1` it fails.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A stream name that would run script if the page rendered it as HTML.
const HOSTILE: &str = "<img src=x onerror=alert(1)>\"'&evil";

/// Debian's chromium, or None (skipped, or a failure under WEIR_SERVICES=1).
fn chromium(test: &str) -> Option<PathBuf> {
    let path = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if path.is_none() {
        if std::env::var("WEIR_SERVICES").is_ok_and(|v| v == "1") {
            panic!("{test}: WEIR_SERVICES=1 but /usr/bin/chromium is missing (apt-get install -y chromium)");
        }
        eprintln!("SKIPPED {test}: /usr/bin/chromium is missing (apt-get install -y chromium, or run `make test-services`)");
    }
    path
}

/// One HTTP/1.1 request to 127.0.0.1:port; (status code, head, body).
fn http(port: u16, method: &str, path: &str) -> Option<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, head.to_string(), body.to_string()))
}

/// The samples of a scrape: `name{labels}` (labels as written) -> value.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let Some((200, _, body)) = http(port, "GET", "/metrics") else {
        return BTreeMap::new();
    };
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Runs chromium headless with `args` and the URL, in its own profile
/// directory; its stdout, or a panic with its stderr after 120 s.
fn run_chromium(chromium: &Path, s: &Scratch, args: &[String], url: &str) -> Vec<u8> {
    let profile = s.join("chromium-profile");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .arg(url)
        .env("HOME", &s.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting chromium");
    let mut out = Vec::new();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let mut err = Vec::new();
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let _ = stderr.read_to_end(&mut err);
        err
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium {args:?} did not finish in 120 s: {}",
                String::from_utf8_lossy(&err_reader.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().unwrap();
    let err = err_reader.join().unwrap();
    assert!(
        status.success(),
        "chromium {args:?} failed ({status}): {}",
        String::from_utf8_lossy(&err)
    );
    out
}

/// (width, height) from a PNG's IHDR, after checking the signature.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(
        png.len() > 24 && png[..8] == *b"\x89PNG\r\n\x1a\n" && &png[12..16] == b"IHDR",
        "not a PNG ({} bytes)",
        png.len()
    );
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

/// The `<tr>` of the catalogue table whose first cell is `<code>{name}</code>`.
fn catalogue_row<'a>(html: &'a str, name_html: &str) -> &'a str {
    let table = html
        .split_once("id=\"streams\"")
        .expect("a stream catalogue table")
        .1;
    let table = table.split_once("</table>").unwrap().0;
    table
        .split("<tr>")
        .find(|r| r.starts_with(&format!("<td><code>{name_html}</code></td>")))
        .unwrap_or_else(|| panic!("no catalogue row for {name_html} in {table}"))
}

#[test]
fn the_status_page_in_headless_chromium_shows_the_runs_streams_sender_and_link() {
    let test = "the_status_page_in_headless_chromium_shows_the_runs_streams_sender_and_link";
    let Some(chromium) = chromium(test) else {
        return;
    };
    let s = Scratch::new("statuspage");
    let (sender_port, receiver_port, metrics) = (free_udp_port(), free_udp_port(), free_tcp_port());
    let d = s.path.display().to_string();
    let total = 20_000u64;
    let hostile_toml = HOSTILE.replace('\\', "\\\\").replace('"', "\\\"");
    let scfg = s.write(
        "sender.toml",
        &format!(
            "{}[link]\ndestination = \"127.0.0.1:{sender_port}\"\nrate = \"200Mbit\"\n\
             [spool]\npath = \"{d}/spool\"\n\
             [[sources]]\nname = \"plant/gen\"\ntype = \"generator\"\ntags = 50\nrate = 5000\ncount = {total}\n\
             [[sources]]\nname = \"{hostile_toml}\"\ntype = \"generator\"\ntags = 3\nrate = 100\ncount = 300\n\
             [[sources]]\nname = \"idle\"\ntype = \"tcp\"\nlisten = \"127.0.0.1:{}\"\n",
            sender_auth(&s),
            free_tcp_port()
        ),
    );
    let out = Command::new(bin("weir-sender"))
        .args(["check-config", "--config", scfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("# sha256: ").map(str::to_string))
        .expect("check-config prints `# sha256: HASH`");
    // The file sink takes the plant's stream only; the hostile one is
    // journaled and catalogued but written nowhere.
    let rcfg = s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"127.0.0.1:{receiver_port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n\
             [journal]\npath = \"{d}/state\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [approval]\nhashes = [\"{hash}\"]\n\
             [[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{d}/out\"\nstreams = [\"plant/*\"]\n",
            receiver_auth(&s),
        ),
    );
    let mut receiver = Proc::spawn(
        &s,
        "receiver",
        "weir-receiver",
        &["run", "--config", rcfg.to_str().unwrap()],
    );
    let mut linksim = Linksim::new(&s, sender_port, receiver_port, 7, 0.02).spawn();
    assert!(
        wait_until(Duration::from_secs(10), || !scrape(metrics).is_empty()),
        "the receiver serves nothing on metrics.listen"
    );
    let mut sender = Proc::spawn(
        &s,
        "sender",
        "weir-sender",
        &["run", "--config", scfg.to_str().unwrap()],
    );
    let hostile_label = HOSTILE.replace('\\', "\\\\").replace('"', "\\\"");
    let written = "weir_receiver_sink_records_total{sink=\"files\"}".to_string();
    let hostile_tags = format!("weir_receiver_stream_tags{{stream=\"{hostile_label}\"}}");
    assert!(
        wait_until(Duration::from_secs(60), || {
            let m = scrape(metrics);
            m.get(&written).copied() == Some(total as f64) && m.get(&hostile_tags) == Some(&3.0)
        }),
        "the run did not complete: {:#?}",
        scrape(metrics)
    );
    // The catalogue's numbers settle at the decoder thread's next tick.
    std::thread::sleep(Duration::from_millis(600));

    // Prometheus: the catalogue and every written record's latency.
    let m = scrape(metrics);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample `{k}` in the scrape: {m:#?}"))
    };
    assert_eq!(
        get("weir_receiver_stream_info{stream=\"plant/gen\",source_type=\"generator\"}"),
        1.0
    );
    assert_eq!(get("weir_receiver_stream_tags{stream=\"plant/gen\"}"), 50.0);
    assert_eq!(
        get("weir_receiver_stream_latency_seconds_count{stream=\"plant/gen\"}"),
        total as f64,
        "one latency per record the file sink confirmed"
    );
    assert_eq!(
        get("weir_receiver_stream_latency_seconds_bucket{le=\"+Inf\",stream=\"plant/gen\"}"),
        total as f64
    );
    assert!(
        !m.keys().any(|k| k.starts_with(&format!(
            "weir_receiver_stream_latency_seconds_count{{stream=\"{hostile_label}\""
        ))),
        "no sink wrote the hostile stream, so it has no latency"
    );
    let first = get("weir_receiver_stream_first_seen_timestamp_seconds{stream=\"plant/gen\"}");
    let last = get("weir_receiver_stream_last_seen_timestamp_seconds{stream=\"plant/gen\"}");
    assert!(first > 1.6e9 && last >= first, "first {first}, last {last}");
    let repaired = get("weir_receiver_blocks_repaired_total");
    assert!(repaired > 0.0, "linksim's loss was repaired by FEC: {m:#?}");

    // The page over plain HTTP: escaped, static, read-only.
    let (code, head, html) = http(metrics, "GET", "/").expect("GET /");
    assert_eq!(code, 200, "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(!html.contains("<img"), "the hostile name became markup");
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp;evil"),
        "the hostile name is shown escaped"
    );
    for forbidden in [
        "<script", "<form", "<link", "<iframe", "http://", "https://",
    ] {
        assert!(!html.contains(forbidden), "{forbidden} on the page");
    }
    let row = catalogue_row(&html, "plant/gen");
    for cell in [
        ">generator<",
        &format!(">{total}<"),
        &format!(">{}<", total - 1),
        ">50<",
    ] {
        assert!(row.contains(cell), "{cell} not in the plant/gen row: {row}");
    }
    assert_eq!(http(metrics, "POST", "/").map(|r| r.0), Some(405));
    assert_eq!(http(metrics, "PUT", "/").map(|r| r.0), Some(405));

    // Headless Chromium: the DOM it built and a screenshot.
    let url = format!("http://127.0.0.1:{metrics}/");
    let dom = String::from_utf8(run_chromium(&chromium, &s, &["--dump-dom".into()], &url))
        .expect("the DOM is UTF-8");
    std::fs::write(s.join("dom.html"), &dom).unwrap();
    assert!(dom.contains("weir-receiver status"), "{dom}");
    assert!(
        dom.contains(&format!("<code id=\"config-hash\">{hash}</code>")),
        "the sender's hash: {dom}"
    );
    assert!(
        dom.contains("<span class=\"ok\" id=\"config-verdict\">approved</span>"),
        "{dom}"
    );
    assert!(dom.contains("id=\"sender-state\">alive"), "{dom}");
    let row = catalogue_row(&dom, "plant/gen");
    assert!(
        row.contains(&format!(">{total}<")) && row.contains(">50<"),
        "{row}"
    );
    assert!(
        !dom.contains("<img") && dom.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "chromium parsed the hostile name as text"
    );
    assert!(dom.contains("<svg id=\"chart-throughput\""), "{dom}");
    let repaired_cell = format!("id=\"link-blocks-repaired\">{}</td>", repaired as u64);
    assert!(
        dom.contains("id=\"link-blocks-repaired\">")
            && !dom.contains("id=\"link-blocks-repaired\">0<"),
        "FEC repairs on the page (scrape said {repaired}; looked for {repaired_cell}): {dom}"
    );

    let png = s.join("status.png");
    run_chromium(
        &chromium,
        &s,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,1600".into(),
        ],
        &url,
    );
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert_eq!(png_size(&bytes), (1280, 1600));
    assert!(
        bytes.len() > 30_000,
        "a screenshot of a rendered page, not a blank one: {} bytes",
        bytes.len()
    );
    if let Ok(dir) = std::env::var("WEIR_SCREENSHOT_DIR") {
        let _ = std::fs::copy(&png, Path::new(&dir).join("status.png"));
    }

    // `weir-receiver status`: the same catalogue on one screen.
    let out = Command::new(bin("weir-receiver"))
        .args(["status", "--config", rcfg.to_str().unwrap()])
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        screen.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.first() == Some(&"plant/gen")
                && w.get(1) == Some(&"generator")
                && w.get(2) == Some(&"50")
        }),
        "{screen}"
    );
    assert!(screen.contains(&format!("{hash} (approved)")), "{screen}");

    assert!(sender.stop(Duration::from_secs(15)));
    assert!(linksim.stop(Duration::from_secs(10)));
    assert!(receiver.stop(Duration::from_secs(20)));
}
