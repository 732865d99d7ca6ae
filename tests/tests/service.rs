//! Running as a systemd service: the shipped units parse and are
//! sandboxed (systemd-analyze), READY=1 and WATCHDOG=1 reach the notify
//! socket, SIGHUP re-reads the log level and says what changed.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn systemd_analyze() -> bool {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: systemd-analyze is not installed (Debian package systemd)");
    }
    found
}

/// The unit with ExecStart and friends pointing at the built binary, so
/// `verify` checks the unit and not whether a package is installed here.
fn unit_copy(s: &Scratch, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("packaging/systemd").join(name)).unwrap();
    let text = text
        .replace("/usr/bin/weir-sender", bin("weir-sender").to_str().unwrap())
        .replace(
            "/usr/bin/weir-receiver",
            bin("weir-receiver").to_str().unwrap(),
        );
    s.write(name, &text)
}

#[test]
fn the_shipped_units_verify_and_expose_at_most_2_0() {
    if !systemd_analyze() {
        return;
    }
    let s = Scratch::new("units");
    for name in ["weir-sender.service", "weir-receiver.service"] {
        let unit = unit_copy(&s, name);
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.trim().is_empty(),
            "systemd-analyze verify {name}: {text}"
        );
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in: {text}"));
        assert!(score <= 2.0, "{name}: exposure {score} above 2.0:\n{text}");
        for key in [
            "Type=notify",
            "WatchdogSec=",
            "Restart=always",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=\n",
            "SystemCallFilter=@system-service",
            "MemoryDenyWriteExecute=yes",
        ] {
            assert!(
                std::fs::read_to_string(&unit).unwrap().contains(key),
                "{name} lacks {key}"
            );
        }
    }
}

/// Reads notify messages until one contains `want` or `limit` passes.
fn expect_notify(sock: &UnixDatagram, want: &str, limit: Duration, seen: &mut Vec<String>) -> bool {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return true;
            }
        }
    }
    false
}

#[test]
fn the_receiver_notifies_ready_feeds_the_watchdog_and_reloads_its_log_level_on_sighup() {
    let s = Scratch::new("notify");
    let d = s.path.display().to_string();
    let sock_path = s.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = |level: &str| {
        format!(
            "{}[link]\nlisten = \"127.0.0.1:{}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
             [log]\nlevel = \"{level}\"\n[[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{d}/out\"\n",
            receiver_auth(&s),
            free_udp_port()
        )
    };
    let cfg = s.write("receiver.toml", &config("info"));
    let log = std::fs::File::create(s.join("receiver.log")).unwrap();
    // systemd sets WATCHDOG_PID to the service's pid: exec keeps the shell's.
    let child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\"")
        .arg(bin("weir-receiver"))
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("RUST_LOG")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut receiver = Proc {
        name: "receiver".into(),
        child,
    };
    let mut seen = Vec::new();
    assert!(
        expect_notify(&sock, "READY=1", Duration::from_secs(10), &mut seen),
        "no READY=1: {seen:?}"
    );
    // Pings every 100 ms while the socket and decoder threads run.
    for _ in 0..3 {
        assert!(
            expect_notify(&sock, "WATCHDOG=1", Duration::from_secs(2), &mut seen),
            "no WATCHDOG=1: {seen:?}"
        );
    }
    s.write("receiver.toml", &config("warn"));
    receiver.signal("HUP");
    assert!(
        expect_notify(&sock, "RELOADING=1", Duration::from_secs(5), &mut seen),
        "no RELOADING=1: {seen:?}"
    );
    assert!(
        expect_notify(&sock, "READY=1", Duration::from_secs(5), &mut seen),
        "no READY=1 after the reload: {seen:?}"
    );
    let logged = |what: &str| {
        std::fs::read_to_string(s.join("receiver.log"))
            .unwrap()
            .contains(what)
    };
    assert!(
        wait_until(Duration::from_secs(5), || logged(
            "SIGHUP: log level changed"
        )),
        "the reload was not logged"
    );
    assert!(logged("previous=info now=warn"));
    // An invalid file changes nothing and says so.
    s.write("receiver.toml", "[link]\nlisten = 5\n");
    receiver.signal("HUP");
    assert!(
        wait_until(Duration::from_secs(5), || logged("nothing changed")),
        "an invalid file at SIGHUP was not reported"
    );
    let stopping = Instant::now();
    receiver.signal("TERM");
    assert!(
        expect_notify(&sock, "STOPPING=1", Duration::from_secs(5), &mut seen),
        "no STOPPING=1: {seen:?}"
    );
    assert!(
        receiver.wait(Duration::from_secs(20)),
        "the receiver did not stop cleanly"
    );
    eprintln!(
        "receiver stopped {:.2} s after SIGTERM",
        stopping.elapsed().as_secs_f64()
    );
    // The new level was live: no INFO line after the change (the stop
    // lines are INFO).
    let text = std::fs::read_to_string(s.join("receiver.log")).unwrap();
    let after = text.split("SIGHUP: log level changed").nth(1).unwrap();
    assert!(
        !after.contains(" INFO "),
        "INFO lines after the level became warn: {after}"
    );
}

#[test]
fn the_sender_notifies_ready_feeds_the_watchdog_and_says_stopping() {
    let s = Scratch::new("notify-sender");
    let sock_path = s.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let cfg = s.write(
        "sender.toml",
        &format!(
            "{}[link]\ndestination = \"127.0.0.1:{}\"\nrate = \"10Mbit\"\n[spool]\npath = \"{}/spool\"\n\
             [[sources]]\nname = \"gen\"\ntype = \"generator\"\ntags = 10\nrate = 100\n",
            sender_auth(&s),
            free_udp_port(),
            s.path.display()
        ),
    );
    let log = std::fs::File::create(s.join("sender.log")).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\"")
        .arg(bin("weir-sender"))
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "4000000")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut sender = Proc {
        name: "sender".into(),
        child,
    };
    let mut seen = Vec::new();
    assert!(
        expect_notify(&sock, "READY=1", Duration::from_secs(10), &mut seen),
        "no READY=1: {seen:?}"
    );
    // Every second while the link thread and the main loop (1 s tick) run.
    for _ in 0..3 {
        assert!(
            expect_notify(&sock, "WATCHDOG=1", Duration::from_secs(3), &mut seen),
            "no WATCHDOG=1: {seen:?}"
        );
    }
    sender.signal("TERM");
    assert!(
        expect_notify(&sock, "STOPPING=1", Duration::from_secs(5), &mut seen),
        "no STOPPING=1: {seen:?}"
    );
    assert!(
        sender.wait(Duration::from_secs(20)),
        "the sender did not stop cleanly"
    );
}
