//! Test and measurement tools for weir, shared by the binaries in `src/bin/`.
//!
//! weir is one-way: a sender turns data into FEC-protected UDP frames and a
//! receiver rebuilds them with no return path. These tools sit around that
//! pipeline on loopback: `weir-tcpfeed` produces a seeded byte stream,
//! `weir-linksim` impairs the UDP link between sender and receiver,
//! `weir-tcpsink` checks what comes out, and `weir-udpblast` measures the raw
//! UDP ceiling of the machine to compare weir against.
//!
//! The library holds what the binaries share: the bench's measurements and
//! report ([`bench`]) and the
//! servers' ends of its service rows ([`bench_peers`]), size/rate parsing ([`units`]),
//! the seeded data stream ([`pattern`]), hashing and JSON reports
//! ([`report`]), socket setup ([`net`]), pacing ([`pacer`]), CPU accounting
//! ([`cpu`]) and the link simulator's sans-IO decision logic ([`linksim`]).

pub mod bench;
pub mod bench_peers;
pub mod cpu;
pub mod linksim;
pub mod net;
pub mod pacer;
pub mod pattern;
pub mod report;
pub mod units;
