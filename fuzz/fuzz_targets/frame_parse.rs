//! The frame parser on arbitrary datagrams: it never panics, and a frame it
//! accepts writes back to exactly the same bytes. The same bytes are tried
//! again with their CRC recomputed, so the header checks behind the CRC
//! are reached too. Both receivers are tried: one with authentication
//! disabled (frames without a tag) and one holding a fixed key (a frame it
//! accepts carries that key's GCM tag; the fuzzer cannot forge one, so this
//! mostly exercises the rejection paths in front of the tag check).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_fuzz::crc32;
use weir_protocol::frame::{FrameHeader, CRC_LEN, FRAME_OVERHEAD};
use weir_protocol::{Key, Signer, Verifier};

fn key() -> Key {
    Key::from_bytes(&[0x17; weir_protocol::auth::KEY_LEN]).expect("32 bytes")
}

fn parse_and_rewrite(datagram: &[u8]) {
    let keyed = Verifier::new(vec![key()]).expect("one key");
    for (verifier, signer) in [
        (Verifier::disabled(), Signer::Disabled),
        (keyed, Signer::Key(key())),
    ] {
        rewrite_with(datagram, verifier, &signer);
    }
}

fn rewrite_with(datagram: &[u8], mut verifier: Verifier, signer: &Signer) {
    // Parsing decrypts in place: parse a copy, compare with the original.
    let mut opened = datagram.to_vec();
    if let Ok((header, shard)) = FrameHeader::parse(&mut opened, &mut verifier) {
        let mut out = vec![0u8; shard.len() + FRAME_OVERHEAD];
        let n = header.write(shard, &mut out, signer);
        assert_eq!(
            &out[..n],
            datagram,
            "an accepted frame rewrites to other bytes"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    parse_and_rewrite(data);
    if data.len() >= FRAME_OVERHEAD {
        let mut resealed = data.to_vec();
        let end = resealed.len() - CRC_LEN;
        let crc = crc32(&resealed[..end]);
        resealed[end..].copy_from_slice(&crc.to_be_bytes());
        parse_and_rewrite(&resealed);
    }
});
