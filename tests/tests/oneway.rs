//! The no-return-path proof: sender and receiver on two network namespaces
//! joined by a veth pair, and the IT side's interface counts zero packets
//! sent toward the OT side while records flow. Needs root (CI runs as root).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Runs a command that must succeed.
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Two namespaces and their veth pair; deleted on drop.
struct Namespaces {
    ot: String,
    it: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ot]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.it]).status();
    }
}

fn counter(ns: &str, dev: &str, name: &str) -> u64 {
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "cat",
        &format!("/sys/class/net/{dev}/statistics/{name}"),
    ])
    .parse()
    .expect("counter")
}

#[test]
fn zero_packets_travel_from_the_receiver_side_to_the_sender_side() {
    let id = std::process::id() % 100_000;
    let ns = Namespaces {
        ot: format!("weir-ot-{id}"),
        it: format!("weir-it-{id}"),
    };
    let (ot_dev, it_dev) = (format!("wot{id}"), format!("wit{id}"));
    let net = format!("10.213.{}", id % 250);
    let (ot_ip, it_ip) = (format!("{net}.1"), format!("{net}.2"));
    sh(&["ip", "netns", "add", &ns.ot]);
    sh(&["ip", "netns", "add", &ns.it]);
    sh(&[
        "ip", "link", "add", &ot_dev, "netns", &ns.ot, "type", "veth", "peer", "name", &it_dev,
        "netns", &ns.it,
    ]);
    for (n, dev, ip) in [(&ns.ot, &ot_dev, &ot_ip), (&ns.it, &it_dev, &it_ip)] {
        // No IPv6 (router solicitations, MLD) and no ARP from the IT side:
        // any packet it sends would then be weir's, and there must be none.
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]);
        sh(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{ip}/30"),
            "dev",
            dev,
        ]);
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    sh(&["ip", "-n", &ns.it, "link", "set", &it_dev, "arp", "off"]);
    let it_mac = sh(&[
        "ip",
        "netns",
        "exec",
        &ns.it,
        "cat",
        &format!("/sys/class/net/{it_dev}/address"),
    ]);
    sh(&[
        "ip",
        "-n",
        &ns.ot,
        "neigh",
        "add",
        &it_ip,
        "lladdr",
        &it_mac,
        "dev",
        &ot_dev,
        "nud",
        "permanent",
    ]);
    sh(&["ip", "-n", &ns.ot, "link", "set", &ot_dev, "up"]);
    sh(&["ip", "-n", &ns.it, "link", "set", &it_dev, "up"]);

    let s = Scratch::new("oneway");
    let out = s.join("out");
    let port = 47_800;
    let d = s.path.display();
    let (rauth, sauth) = (receiver_auth(&s), sender_auth(&s));
    let rcfg = s.write(
        "receiver.toml",
        &format!(
            "{rauth}[link]\nlisten = \"{it_ip}:{port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
             [metrics]\npath = \"{d}/receiver-metrics.json\"\n[[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{}\"\n",
            out.display()
        ),
    );
    let total = 30_000u64;
    let scfg = s.write(
        "sender.toml",
        &format!(
            "{sauth}[link]\ndestination = \"{it_ip}:{port}\"\nrate = \"100Mbit\"\n[spool]\npath = \"{d}/spool\"\n[[sources]]\nname = \"gen\"\ntype = \"generator\"\nrate = 10000\ncount = {total}\n"
        ),
    );
    let it_tx_before = counter(&ns.it, &it_dev, "tx_packets");
    let ot_rx_before = counter(&ns.ot, &ot_dev, "rx_packets");
    let receiver_bin = bin("weir-receiver");
    let sender_bin = bin("weir-sender");
    let mut receiver = Proc::spawn_path(
        &s,
        "receiver",
        std::path::Path::new("ip"),
        &[
            "netns",
            "exec",
            &ns.it,
            receiver_bin.to_str().unwrap(),
            "run",
            "--config",
            rcfg.to_str().unwrap(),
        ],
    );
    let metrics = s.join("receiver-metrics.json");
    assert!(
        wait_until(Duration::from_secs(10), || metrics.exists()),
        "the receiver did not start in its namespace"
    );
    let mut sender = Proc::spawn_path(
        &s,
        "sender",
        std::path::Path::new("ip"),
        &[
            "netns",
            "exec",
            &ns.ot,
            sender_bin.to_str().unwrap(),
            "run",
            "--config",
            scfg.to_str().unwrap(),
        ],
    );
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish"
    );
    wait_until(Duration::from_secs(10), || {
        read_json(&metrics)["records"].as_u64() == Some(total)
    });
    // The sender has exited before the receiver stops, so no datagram can
    // reach a closed port and draw an ICMP reply from the IT kernel.
    assert!(receiver.stop(Duration::from_secs(20)));

    assert_complete_in_order(&written_seqs(&out, "gen"), total);
    let ot_tx = counter(&ns.ot, &ot_dev, "tx_packets");
    assert!(ot_tx > 100, "the OT side sent the data ({ot_tx} packets)");
    assert_eq!(
        counter(&ns.it, &it_dev, "tx_packets") - it_tx_before,
        0,
        "packets left the IT side toward the OT side"
    );
    assert_eq!(
        counter(&ns.ot, &ot_dev, "rx_packets") - ot_rx_before,
        0,
        "packets arrived on the OT side"
    );
}
