//! Helpers shared by the fuzz targets: splitting one fuzz input into
//! datagrams, and the checks every target applies to the decoder's events.

use std::collections::HashMap;
use std::sync::Arc;

use weir_protocol::{Decoder, Event, Nanos};

/// Splits `data` into (time step, datagram) pairs. Each datagram is
/// preceded by 3 bytes: a time step in milliseconds (low 7 bits) with bit 7
/// asking to make the datagram an unauthenticated frame whose flag, key id,
/// shard length field and CRC match its bytes, so the mutation reaches the
/// checks and the state machine behind them; then a big-endian u16 length
/// (cut to what is left of the input).
/// The key both ends of `decoder_frames` hold.
pub fn fuzz_key() -> weir_protocol::Key {
    weir_protocol::Key::from_bytes(&[0x46; weir_protocol::auth::KEY_LEN]).expect("32 bytes")
}

pub fn fuzz_signer() -> weir_protocol::Signer {
    weir_protocol::Signer::Key(fuzz_key())
}

pub fn fuzz_verifier() -> weir_protocol::Verifier {
    weir_protocol::Verifier::new(vec![fuzz_key()]).expect("one key")
}

/// A frame tagged with [`fuzz_key`] rewritten in the unauthenticated layout
/// (what `decoder_datagrams` feeds its decoder); anything else unchanged.
pub fn without_tag(datagram: &[u8]) -> Vec<u8> {
    use weir_protocol::frame::{FrameHeader, FRAME_OVERHEAD};
    let mut opened = datagram.to_vec();
    match FrameHeader::parse(&mut opened, &mut fuzz_verifier()) {
        Ok((header, shard)) => {
            let mut out = vec![0u8; shard.len() + FRAME_OVERHEAD];
            let n = header.write(shard, &mut out, &weir_protocol::Signer::Disabled);
            out.truncate(n);
            out
        }
        Err(_) => datagram.to_vec(),
    }
}

pub fn split_datagrams(mut data: &[u8]) -> Vec<(u8, Vec<u8>)> {
    use weir_protocol::frame::{CRC_LEN, FLAG_UNAUTHENTICATED, HEADER_LEN};
    let mut out = Vec::new();
    while data.len() >= 3 {
        let (step, reseal) = (data[0] & 0x7f, data[0] & 0x80 != 0);
        let len = (u16::from_be_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
        let mut datagram = data[3..3 + len].to_vec();
        data = &data[3 + len..];
        let overhead = HEADER_LEN + CRC_LEN;
        if reseal && datagram.len() >= overhead && datagram.len() - overhead <= 0xffff {
            let shard_len = (datagram.len() - overhead) as u16;
            datagram[3] |= FLAG_UNAUTHENTICATED;
            datagram[4..8].copy_from_slice(&[0; 4]);
            datagram[30..32].copy_from_slice(&shard_len.to_be_bytes());
            let end = datagram.len() - CRC_LEN;
            debug_assert_eq!(end, HEADER_LEN + shard_len as usize);
            let crc = crc32(&datagram[..end]);
            datagram[end..].copy_from_slice(&crc.to_be_bytes());
        }
        out.push((step, datagram));
    }
    out
}

/// The inverse of `split_datagrams`: datagrams that arrived `at` these
/// times (nanoseconds), as one `decoder_datagrams` input, each with the
/// reseal flag set. Steps over 127 ms are cut to 127 ms.
pub fn join_datagrams(datagrams: &[(Nanos, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut last = 0;
    for (at, d) in datagrams {
        let step = (at.saturating_sub(last) / weir_protocol::NANOS_PER_MILLI).min(127) as u8;
        last = *at;
        let len = d.len().min(u16::MAX as usize);
        out.push(0x80 | step);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&d[..len]);
    }
    out
}

/// Where `decoder_frames` writes the datagrams of each input it runs, as
/// `decoder_datagrams` inputs (a seed corpus that starts past the parser):
/// the directory in `WEIR_FUZZ_DUMP_DATAGRAMS`, if set.
pub fn dump_dir() -> Option<&'static std::path::Path> {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("WEIR_FUZZ_DUMP_DATAGRAMS").map(Into::into))
        .as_deref()
}

/// CRC32 (IEEE), as the frame trailer uses.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// What the decoder promised per stream so far: the last sequence number
/// it delivered or named in a gap since the stream's numbering last
/// (re)started. Every later record or gap must lie strictly beyond it.
#[derive(Default)]
pub struct Promise {
    accounted: HashMap<Arc<str>, (u64, u64)>,
    pub records: u64,
    pub gaps: u64,
}

impl Promise {
    /// Drains the decoder's events and checks each against the promise:
    /// no record delivered twice or out of order, no gap that overlaps what
    /// was already accounted, no gap with `from > to`.
    pub fn drain(&mut self, dec: &mut Decoder) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(e) = dec.poll_event() {
            self.check(&e);
            events.push(e);
        }
        events
    }

    fn check(&mut self, e: &Event) {
        match e {
            Event::Record(d) if !d.resent => {
                self.records += 1;
                self.advance(&d.stream, d.epoch, d.seq, d.seq, "record");
            }
            Event::Gap(g) => {
                self.gaps += 1;
                assert!(g.from <= g.to, "gap with from > to: {g:?}");
                self.advance(&g.stream, g.epoch, g.from, g.to, "gap");
            }
            Event::SequenceReset { stream, .. } => {
                self.accounted.remove(stream);
            }
            _ => {}
        }
    }

    fn advance(&mut self, stream: &Arc<str>, epoch: u64, from: u64, to: u64, what: &str) {
        if let Some(&(e, last)) = self.accounted.get(stream) {
            // A new epoch restarts the numbering (the decoder says so with
            // SequenceReset when it had delivered something).
            if e == epoch {
                assert!(
                    from > last,
                    "{what} {from}..={to} of stream {stream} epoch {epoch} at or before {last}, \
                     which was already delivered or named in a gap"
                );
            }
        }
        self.accounted.insert(stream.clone(), (epoch, to));
    }
}

/// Runs the decoder's timer the way the receiver's decode thread does.
pub fn tick(dec: &mut Decoder, now: Nanos) {
    if dec.poll_timeout().is_some_and(|t| t <= now) {
        dec.handle_timeout(now);
    }
}
