//! The record decoder: a block's data split into bundle entries, and each
//! entry's postcard body decoded as the decoder does (StreamInfo, Record,
//! GapNotice; a control frame's Heartbeat). Never panics, and whatever
//! decodes re-encodes to something that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use weir_protocol::bundle::{Entries, Entry};
use weir_protocol::{Control, GapNotice, Record, StreamInfo};

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(value) = postcard::from_bytes::<T>(bytes) {
        let again = postcard::to_allocvec(&value).expect("a decoded value encodes");
        let back: T = postcard::from_bytes(&again).expect("an encoded value decodes");
        // NaN is not equal to itself; compare the encodings instead.
        assert_eq!(
            postcard::to_allocvec(&back).expect("encodes"),
            again,
            "{value:?} did not round-trip"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    round_trips::<Control>(data);
    // Pieces of a fragmented record, joined as the decoder joins them.
    let mut pieces: Option<Vec<u8>> = None;
    for entry in Entries::new(data) {
        match entry {
            Ok(Entry::StreamInfo(b)) => round_trips::<StreamInfo>(b),
            Ok(Entry::Record(b)) => round_trips::<Record>(b),
            Ok(Entry::GapNotice(b)) => round_trips::<GapNotice>(b),
            Ok(Entry::First { piece, .. }) => pieces = Some(piece.to_vec()),
            Ok(Entry::Middle(b)) => {
                if let Some(p) = pieces.as_mut() {
                    p.extend_from_slice(b);
                }
            }
            Ok(Entry::Last(b)) => {
                if let Some(mut p) = pieces.take() {
                    p.extend_from_slice(b);
                    round_trips::<Record>(&p);
                }
            }
            Err(_) => break,
        }
    }
});
