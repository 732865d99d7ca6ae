//! The no-return-path proof: sender and receiver on two network namespaces
//! joined by a veth pair, and the IT side's interface counts zero packets
//! sent toward the OT side while records flow, and zero while the receiver
//! is stopped and the IT kernel would answer with ICMP (with the shipped
//! nftables ruleset loaded). Needs root and network namespaces (CI runs as
//! root); without them each test says so on stderr and skips, or fails
//! when `WEIR_REQUIRE_NETNS=1`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

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

/// Prints why a namespace test cannot run, so a skip is never silent; with
/// `WEIR_REQUIRE_NETNS=1` in the environment a skip is a failure instead.
fn skip(test: &str, why: &str) {
    if std::env::var_os("WEIR_REQUIRE_NETNS").is_some_and(|v| v == "1") {
        panic!("{test} cannot run ({why}) and WEIR_REQUIRE_NETNS=1 forbids skipping it");
    }
    eprintln!(
        "\n######## SKIPPED {test}: {why}\n######## the no-return-path proof did NOT run; \
         run the tests as root on a host with network namespaces (CI does)\n"
    );
}

/// Whether this process may create network namespaces (root, and a kernel
/// and container that allow it); names the reason when not.
fn namespaces_unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output();
    match uid {
        Ok(o) if String::from_utf8_lossy(&o.stdout).trim() == "0" => {}
        Ok(_) => return Some("not running as root".into()),
        Err(e) => return Some(format!("cannot run `id -u`: {e}")),
    }
    let probe = format!("weir-probe-{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
            None
        }
        Ok(o) => Some(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run `ip` (iproute2): {e}")),
    }
}

/// Two namespaces joined by a veth pair; deleted on drop.
struct Link {
    ot: String,
    it: String,
    ot_dev: String,
    it_dev: String,
    it_ip: String,
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ot]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.it]).status();
    }
}

impl Link {
    /// Builds the namespaces and the veth pair, down; `tag` keeps the names
    /// of tests that run at once apart.
    fn new(tag: &str) -> Link {
        let id = std::process::id() % 100_000;
        let net = format!("10.213.{}", id % 250);
        let ot_ip = format!("{net}.1");
        let link = Link {
            ot: format!("weir-ot-{tag}-{id}"),
            it: format!("weir-it-{tag}-{id}"),
            ot_dev: format!("wot{id}"),
            it_dev: format!("wit{id}"),
            it_ip: format!("{net}.2"),
        };
        sh(&["ip", "netns", "add", &link.ot]);
        sh(&["ip", "netns", "add", &link.it]);
        sh(&[
            "ip",
            "link",
            "add",
            &link.ot_dev,
            "netns",
            &link.ot,
            "type",
            "veth",
            "peer",
            "name",
            &link.it_dev,
            "netns",
            &link.it,
        ]);
        for (n, dev, ip) in [
            (&link.ot, &link.ot_dev, &ot_ip),
            (&link.it, &link.it_dev, &link.it_ip),
        ] {
            // No IPv6 (router solicitations, MLD) and no ARP from the IT side:
            // any packet it sends would then be weir's, and there must be none.
            for key in ["all", "default"] {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    n,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
                ]);
            }
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
        sh(&[
            "ip",
            "-n",
            &link.it,
            "link",
            "set",
            &link.it_dev,
            "arp",
            "off",
        ]);
        let it_mac =
            link.read_in_namespace(&link.it, &format!("/sys/class/net/{}/address", link.it_dev));
        sh(&[
            "ip",
            "-n",
            &link.ot,
            "neigh",
            "add",
            &link.it_ip,
            "lladdr",
            &it_mac,
            "dev",
            &link.ot_dev,
            "nud",
            "permanent",
        ]);
        link
    }

    fn up(&self) {
        sh(&["ip", "-n", &self.ot, "link", "set", &self.ot_dev, "up"]);
        sh(&["ip", "-n", &self.it, "link", "set", &self.it_dev, "up"]);
    }

    fn read_in_namespace(&self, ns: &str, path: &str) -> String {
        sh(&["ip", "netns", "exec", ns, "cat", path])
    }

    /// Packets the IT side's link interface put on the wire.
    fn it_tx(&self) -> u64 {
        self.dev_counter(&self.it, &self.it_dev, "tx_packets")
    }

    /// Packets the OT side's link interface received.
    fn ot_rx(&self) -> u64 {
        self.dev_counter(&self.ot, &self.ot_dev, "rx_packets")
    }

    fn ot_tx(&self) -> u64 {
        self.dev_counter(&self.ot, &self.ot_dev, "tx_packets")
    }

    fn dev_counter(&self, ns: &str, dev: &str, name: &str) -> u64 {
        self.read_in_namespace(ns, &format!("/sys/class/net/{dev}/statistics/{name}"))
            .parse()
            .expect("interface counter")
    }

    /// Runs a weir binary inside a namespace.
    fn spawn(&self, s: &Scratch, log: &str, ns: &str, program: &str, config: &Path) -> Proc {
        let bin = bin(program);
        Proc::spawn_path(
            s,
            log,
            Path::new("ip"),
            &[
                "netns",
                "exec",
                ns,
                bin.to_str().expect("utf-8 path"),
                "run",
                "--config",
                config.to_str().expect("utf-8 path"),
            ],
        )
    }
}

/// The ruleset the IT host is meant to load, from the repository.
fn shipped_ruleset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/nftables/weir-receiver.nft")
}

/// Packets counted by one named counter of the shipped ruleset (what an
/// auditor reads with `nft list table inet weir_receiver`).
fn nft_counter(ns: &str, family: &str, name: &str) -> u64 {
    nft_counter_packets_bytes(ns, family, name).0
}

fn nft_counter_packets_bytes(ns: &str, family: &str, name: &str) -> (u64, u64) {
    let json = sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "-j",
        "list",
        "counter",
        family,
        "weir_receiver",
        name,
    ]);
    let v: Value = serde_json::from_str(&json).expect("nft -j output is JSON");
    v["nftables"]
        .as_array()
        .and_then(|items| {
            items.iter().find_map(|i| {
                let c = &i["counter"];
                Some((c["packets"].as_u64()?, c["bytes"].as_u64()?))
            })
        })
        .unwrap_or_else(|| panic!("no counter {family} weir_receiver {name} in {json}"))
}

/// Every packet the shipped ruleset dropped, over all its counters.
fn nft_dropped(ns: &str) -> u64 {
    [
        ("inet", "icmp_to_link"),
        ("inet", "other_to_link"),
        ("inet", "forwarded_to_link"),
        ("inet", "forwarded_from_link"),
        ("arp", "arp_to_link"),
    ]
    .iter()
    .map(|(family, name)| nft_counter(ns, family, name))
    .sum()
}

fn receiver_config(s: &Scratch, link: &Link, port: u16) -> PathBuf {
    let d = s.path.display();
    s.write(
        "receiver.toml",
        &format!(
            "{}[link]\nlisten = \"{}:{port}\"\n[audit]\npath = \"{d}/audit.jsonl\"\n[journal]\npath = \"{d}/state\"\n\
             [metrics]\npath = \"{d}/receiver-metrics.json\"\n[[sinks]]\nname = \"files\"\ntype = \"file\"\ndir = \"{d}/out\"\n",
            receiver_auth(s),
            link.it_ip
        ),
    )
}

fn sender_config(s: &Scratch, link: &Link, port: u16, rate: u64, total: u64) -> PathBuf {
    let d = s.path.display();
    s.write(
        "sender.toml",
        &format!(
            "{}[link]\ndestination = \"{}:{port}\"\nrate = \"100Mbit\"\n[spool]\npath = \"{d}/spool\"\n[[sources]]\nname = \"gen\"\ntype = \"generator\"\nrate = {rate}\ncount = {total}\n",
            sender_auth(s),
            link.it_ip
        ),
    )
}

#[test]
fn zero_packets_travel_from_the_receiver_side_to_the_sender_side() {
    let test = "zero_packets_travel_from_the_receiver_side_to_the_sender_side";
    if let Some(why) = namespaces_unavailable() {
        return skip(test, &why);
    }
    let link = Link::new("plain");
    link.up();
    let s = Scratch::new("oneway");
    let out = s.join("out");
    let port = 47_800;
    let rcfg = receiver_config(&s, &link, port);
    let total = 30_000u64;
    let scfg = sender_config(&s, &link, port, 10_000, total);
    let it_tx_before = link.it_tx();
    let ot_rx_before = link.ot_rx();
    let mut receiver = link.spawn(&s, "receiver", &link.it, "weir-receiver", &rcfg);
    let metrics = s.join("receiver-metrics.json");
    assert!(
        wait_until(Duration::from_secs(10), || metrics.exists()),
        "the receiver did not start in its namespace"
    );
    let mut sender = link.spawn(&s, "sender", &link.ot, "weir-sender", &scfg);
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
    let ot_tx = link.ot_tx();
    assert!(ot_tx > 100, "the OT side sent the data ({ot_tx} packets)");
    assert_eq!(
        link.it_tx() - it_tx_before,
        0,
        "packets left the IT side toward the OT side"
    );
    assert_eq!(
        link.ot_rx() - ot_rx_before,
        0,
        "packets arrived on the OT side"
    );
}

/// While no receiver listens, the IT kernel answers every datagram with an
/// ICMP port-unreachable carrying the datagram's first bytes toward the OT
/// side. The shipped ruleset drops them (its counter shows it) and the IT
/// interface puts nothing on the wire, through a 5 s stop mid-run.
#[test]
fn with_the_shipped_ruleset_no_packet_leaves_the_receiver_side_while_the_receiver_is_stopped() {
    let test =
        "with_the_shipped_ruleset_no_packet_leaves_the_receiver_side_while_the_receiver_is_stopped";
    if let Some(why) = namespaces_unavailable() {
        return skip(test, &why);
    }
    if Command::new("nft").arg("--version").output().is_err() {
        return skip(
            test,
            "`nft` is not installed (apt-get install nftables; .ci/run does)",
        );
    }
    let link = Link::new("stop");
    let ruleset = shipped_ruleset();
    sh(&[
        "ip",
        "netns",
        "exec",
        &link.it,
        "nft",
        "-D",
        &format!("LINK_IF={}", link.it_dev),
        "-f",
        ruleset.to_str().expect("utf-8 path"),
    ]);
    link.up();

    let s = Scratch::new("oneway-stop");
    let out = s.join("out");
    let audit = s.join("audit.jsonl");
    let metrics = s.join("receiver-metrics.json");
    let port = 47_801;
    let rcfg = receiver_config(&s, &link, port);
    // 15 s of records at 2000/s: the stop falls well inside the run.
    let total = 30_000u64;
    let scfg = sender_config(&s, &link, port, 2_000, total);
    let it_tx_before = link.it_tx();
    let ot_rx_before = link.ot_rx();

    let mut receiver = link.spawn(&s, "receiver", &link.it, "weir-receiver", &rcfg);
    assert!(
        wait_until(Duration::from_secs(10), || metrics.exists()),
        "the receiver did not start in its namespace"
    );
    let mut sender = link.spawn(&s, "sender", &link.ot, "weir-sender", &scfg);
    assert!(
        wait_until(Duration::from_secs(20), || {
            read_json(&metrics)["records"].as_u64().unwrap_or(0) > 2_000
        }),
        "records did not reach the receiver"
    );
    assert_eq!(
        nft_dropped(&link.it),
        0,
        "the ruleset dropped packets while the receiver ran: something on the IT side sends"
    );

    assert!(
        receiver.stop(Duration::from_secs(20)),
        "the receiver did not stop cleanly"
    );
    let (icmp_at_stop, icmp_bytes_at_stop) =
        nft_counter_packets_bytes(&link.it, "inet", "icmp_to_link");
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        sender.is_running(),
        "the sender must still be sending for the stop to mean anything"
    );
    let (icmp_now, icmp_bytes_now) = nft_counter_packets_bytes(&link.it, "inet", "icmp_to_link");
    let icmp_during_stop = icmp_now - icmp_at_stop;
    assert!(
        icmp_during_stop > 0,
        "the IT kernel answered nothing while no receiver listened; \
         the test no longer exercises the ICMP return path"
    );
    let it_tx_during_stop = link.it_tx() - it_tx_before;
    eprintln!(
        "receiver stopped 5 s: the ruleset dropped {icmp_during_stop} ICMP packets \
         ({} bytes), the IT interface sent {it_tx_during_stop}",
        icmp_bytes_now - icmp_bytes_at_stop
    );

    let _ = std::fs::remove_file(&metrics);
    let mut receiver = link.spawn(&s, "receiver-restarted", &link.it, "weir-receiver", &rcfg);
    assert!(
        wait_until(Duration::from_secs(10), || {
            read_json(&metrics)["datagrams"].as_u64().unwrap_or(0) > 0
        }),
        "the restarted receiver did not receive"
    );
    let dropped_after_restart = nft_dropped(&link.it);
    assert!(
        sender.wait(Duration::from_secs(60)),
        "the sender did not finish"
    );
    let accounted = || {
        let mut n = written_seqs(&out, "gen").len() as u64;
        n += gaps(&audit, "gen")
            .iter()
            .map(|(f, t, _)| t - f + 1)
            .sum::<u64>();
        n >= total
    };
    assert!(
        wait_until(Duration::from_secs(20), accounted),
        "the receiver did not account for every record after its restart"
    );
    // The sender has exited: no datagram can reach a closed port now.
    assert!(receiver.stop(Duration::from_secs(20)));
    assert_eq!(
        nft_dropped(&link.it),
        dropped_after_restart,
        "the ruleset dropped packets while the restarted receiver ran"
    );

    let gaps = gaps(&audit, "gen");
    assert!(
        !gaps.is_empty(),
        "records sent while the receiver was stopped are named in a gap"
    );
    assert_exactly_accounted(&written_seqs(&out, "gen"), &gaps, total);
    assert!(link.ot_tx() > 100, "the OT side sent the data");
    assert_eq!(
        link.it_tx() - it_tx_before,
        0,
        "packets left the IT side toward the OT side"
    );
    assert_eq!(
        link.ot_rx() - ot_rx_before,
        0,
        "packets arrived on the OT side"
    );
}
