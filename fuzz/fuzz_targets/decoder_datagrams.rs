//! The receiver's decoder fed a sequence of datagrams cut from the fuzz
//! input (see `split_datagrams`), with time passing between them. It must
//! not panic or hang, must count every datagram, and its events must keep
//! the delivery promise (`Promise`). Authentication is disabled, so the
//! fuzzer's frames reach the decoder's state (a keyed receiver would
//! reject every one at the tag check).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_fuzz::{split_datagrams, tick, Promise};
use weir_protocol::{Decoder, DecoderConfig, Verifier, NANOS_PER_MILLI, NANOS_PER_SEC};

fuzz_target!(|data: &[u8]| {
    let mut dec = Decoder::new(DecoderConfig::default(), Verifier::disabled());
    let mut promise = Promise::default();
    let mut now = 0;
    let datagrams = split_datagrams(data);
    for (step, datagram) in &datagrams {
        now += u64::from(*step) * NANOS_PER_MILLI;
        dec.handle_datagram(now, &mut datagram.to_vec());
        tick(&mut dec, now);
        promise.drain(&mut dec);
    }
    dec.handle_timeout(now + 3600 * NANOS_PER_SEC);
    promise.drain(&mut dec);
    assert_eq!(dec.stats().datagrams, datagrams.len() as u64);
});
