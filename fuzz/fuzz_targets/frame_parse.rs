//! The frame parser on arbitrary datagrams: it never panics, and a frame it
//! accepts writes back to exactly the same bytes. The same bytes are tried
//! again with their CRC recomputed, so the header checks behind the CRC
//! are reached too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_fuzz::crc32;
use weir_protocol::frame::{FrameHeader, CRC_LEN, FRAME_OVERHEAD};

fn parse_and_rewrite(datagram: &[u8]) {
    if let Ok((header, shard)) = FrameHeader::parse(datagram) {
        let mut out = vec![0u8; shard.len() + FRAME_OVERHEAD];
        let n = header.write(shard, &mut out);
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
