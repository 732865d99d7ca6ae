//! The spool/journal entry reader (`weir_store::frame::read_entry`, which both the
//! sender's spool and the receiver's journal use to read their logs back)
//! on arbitrary file contents: never panics, never reads past the input,
//! and stops at the first torn entry. Each whole entry's payload is then
//! decoded as a record, as the spool and journal do with theirs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_store::frame::{read_entry, ReadOutcome, ENTRY_HEADER};
use weir_protocol::Record;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut buf = Vec::new();
    let mut consumed = 0usize;
    loop {
        match read_entry(&mut r, &mut buf).expect("reading a slice cannot fail") {
            ReadOutcome::Entry => {
                consumed += ENTRY_HEADER + buf.len();
                assert_eq!(consumed, data.len() - r.len(), "entry length accounting");
                let _ = postcard::from_bytes::<Record>(&buf);
            }
            ReadOutcome::End => {
                assert_eq!(consumed, data.len(), "End before the input ended");
                break;
            }
            ReadOutcome::Torn(_) => break,
        }
    }
});
