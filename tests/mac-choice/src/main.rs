//! Per-frame cost of candidate MACs on one weir frame, and of weir's own
//! frame write + parse with authentication on and off, on this CPU.
//!
//! Each figure is the best of 7 rounds of 200 000 frames, in CPU time of
//! the measuring thread (so time spent waiting for a core on a shared
//! machine is not counted; the best round is the least disturbed one).

use std::hint::black_box;

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hmac::{Hmac, Mac};
use weir_protocol::frame::{FrameHeader, FRAME_OVERHEAD, HEADER_LEN};
use weir_protocol::{FrameId, Key, Signer, Verifier};

const ROUNDS: usize = 7;
const FRAMES: usize = 200_000;

/// CPU time of this thread, in nanoseconds: the first field of Linux's
/// `/proc/thread-self/schedstat` (time spent on the CPU), read without
/// `unsafe` so the tree keeps its only unsafe code out of measuring tools.
fn thread_cpu_ns() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("reading /proc/thread-self/schedstat (Linux with schedstats)");
    parse_schedstat(&text).expect("/proc/thread-self/schedstat starts with a number")
}

fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Best ns per call of `f` over the rounds.
fn best_ns(mut f: impl FnMut() -> u8) -> f64 {
    let mut acc = 0u8;
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let t = thread_cpu_ns();
        for _ in 0..FRAMES {
            acc ^= f();
        }
        best = best.min((thread_cpu_ns() - t) as f64 / FRAMES as f64);
    }
    black_box(acc);
    best
}

fn report(name: &str, bytes: usize, ns: f64) {
    println!(
        "{name:44} {ns:8.0} ns/frame {:6.2} GB/s {:6.2} CPU s per GB of shards",
        bytes as f64 / ns,
        ns / weir_protocol::frame::shard_size_for_mtu(1500).unwrap() as f64
    );
}

fn main() {
    let shard_len = weir_protocol::frame::shard_size_for_mtu(1500).unwrap();
    // What the tag covers at MTU 1500: header + shard.
    let len = HEADER_LEN + shard_len;
    let msg: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    let key = [0x42u8; 32];
    println!(
        "message: {len} bytes (a {HEADER_LEN}-byte header and a {shard_len}-byte shard: one frame at MTU 1500)\n"
    );

    report(
        "crc32fast (no authentication)",
        len,
        best_ns(|| crc32fast::hash(black_box(&msg)) as u8),
    );
    let hm = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).unwrap();
    report(
        "HMAC-SHA256, RustCrypto hmac+sha2 (v3)",
        len,
        best_ns(|| {
            let mut h = hm.clone();
            h.update(black_box(&msg));
            h.finalize().into_bytes()[0]
        }),
    );
    let rk = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    report(
        "HMAC-SHA256, ring",
        len,
        best_ns(|| ring::hmac::sign(&rk, black_box(&msg)).as_ref()[0]),
    );
    let bk = blake3::Hasher::new_keyed(&key);
    report(
        "BLAKE3 keyed, blake3",
        len,
        best_ns(|| {
            let mut h = bk.clone();
            h.update(black_box(&msg));
            h.finalize().as_bytes()[0]
        }),
    );
    let gcm = Aes256Gcm::new_from_slice(&key).unwrap();
    let mut ctr = 0u64;
    report(
        "AES-256-GMAC (frame as AAD), RustCrypto",
        len,
        best_ns(|| {
            ctr += 1;
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&ctr.to_be_bytes());
            let mut empty: [u8; 0] = [];
            gcm.encrypt_in_place_detached(Nonce::from_slice(&n), black_box(&msg), &mut empty)
                .unwrap()[0]
        }),
    );
    let rg = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).unwrap(),
    );
    let mut ctr = 0u64;
    report(
        "AES-256-GMAC (frame as AAD), ring",
        len,
        best_ns(|| {
            ctr += 1;
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&ctr.to_be_bytes());
            let mut empty: [u8; 0] = [];
            rg.seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(n),
                ring::aead::Aad::from(black_box(&msg)),
                &mut empty,
            )
            .unwrap()
            .as_ref()[0]
        }),
    );
    let mut ctr = 0u64;
    let mut buf = vec![0u8; shard_len];
    report(
        "AES-256-GCM encrypting the shard, ring (v4)",
        len,
        best_ns(|| {
            ctr += 1;
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&ctr.to_be_bytes());
            buf.copy_from_slice(&msg[HEADER_LEN..]);
            rg.seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(n),
                ring::aead::Aad::from(&msg[..HEADER_LEN]),
                &mut buf,
            )
            .unwrap()
            .as_ref()[0]
        }),
    );

    println!("\nweir's frame path (FrameHeader::write, then FrameHeader::parse):");
    let k = Key::from_bytes(&key).unwrap();
    let header = FrameHeader {
        flags: 0,
        session: 7,
        block: 9,
        index: 3,
        k: 64,
        m: 16,
        shard_len: shard_len as u16,
        data_len: (64 * shard_len) as u32,
    };
    let shard = &msg[HEADER_LEN..];
    let mut out = vec![0u8; shard_len + FRAME_OVERHEAD];
    let mut scratch = vec![0u8; shard_len + FRAME_OVERHEAD];
    // parse decrypts in place, so every parse below first copies the frame
    // back into the receive buffer; this line is that copy alone.
    let copy = best_ns(|| {
        scratch.copy_from_slice(black_box(&out));
        scratch[40]
    });
    report("frame copy (included in each parse below)", len, copy);
    for (name, signer, verifier) in [
        (
            "write + parse, [auth] disabled",
            Signer::Disabled,
            Verifier::disabled(),
        ),
        (
            "write + parse, AES-256-GCM (v4)",
            Signer::Key(k.clone()),
            Verifier::new(vec![k.clone()]).unwrap(),
        ),
    ] {
        let mut verifier = verifier;
        let w = best_ns(|| header.write(black_box(shard), &mut out, &signer) as u8);
        let n = header.write(shard, &mut out, &signer);
        let p = best_ns(|| {
            scratch[..n].copy_from_slice(&out[..n]);
            FrameHeader::parse(black_box(&mut scratch[..n]), &mut verifier)
                .map(|(h, _)| h.k as u8)
                .unwrap_or(0)
        });
        assert!(FrameHeader::parse(&mut out[..n].to_vec(), &mut verifier).is_ok());
        report(&format!("{name}: write"), len, w);
        report(&format!("{name}: parse"), len, p);
    }
    // A session subkey is derived once per session (sender) or per cached
    // session (receiver); this is what a miss would cost, seal included.
    let mut session = 0u64;
    let mut buf = shard.to_vec();
    let frame = FrameId {
        control: false,
        block: 9,
        index: 3,
    };
    let fresh = Key::from_bytes(&key).unwrap();
    let per_session = best_ns(|| {
        session += 1;
        fresh.seal(session, frame, &msg[..HEADER_LEN], &mut buf)[0]
    });
    report(
        "seal under a new session each frame (HKDF + seal)",
        len,
        per_session,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_first_field_is_the_cpu_time() {
        assert_eq!(parse_schedstat("123456 789 10\n"), Some(123_456));
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn thread_cpu_time_grows_while_the_thread_works() {
        let before = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_ns() > before);
    }
}
