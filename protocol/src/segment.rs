//! Framing of the append-only logs on disk (the sender's spool, the
//! receiver's journal): each entry is `[u32 len][u32 crc32 of payload]
//! [payload]`, little-endian. Pure functions over `Read`/`Write`; the logs
//! themselves live in the binaries.

use std::io::{self, Read, Write};

pub const ENTRY_HEADER: usize = 8;
/// Largest entry accepted when reading back; anything larger is corruption.
pub const MAX_ENTRY: usize = 64 << 20;
/// The payload buffer grows by at most this much ahead of the bytes read,
/// so a corrupt length near `MAX_ENTRY` on a short file costs this much
/// memory, not 64 MiB per read (found by fuzzing: `fuzz/` segment_read).
const READ_STEP: usize = 1 << 20;

/// Writes one framed entry; returns the bytes written.
pub fn write_entry(w: &mut impl Write, payload: &[u8]) -> io::Result<u64> {
    w.write_all(&(payload.len() as u32).to_le_bytes())?;
    w.write_all(&crc32fast::hash(payload).to_le_bytes())?;
    w.write_all(payload)?;
    Ok((ENTRY_HEADER + payload.len()) as u64)
}

/// What reading at a position found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A clean end of the log.
    End,
    /// A whole entry, now in the buffer.
    Entry,
    /// A torn or corrupt entry: the log ends before it.
    Torn(&'static str),
}

fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads the next entry's payload into `buf`.
pub fn read_entry(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<ReadOutcome> {
    let mut header = [0u8; ENTRY_HEADER];
    match fill(r, &mut header)? {
        0 => return Ok(ReadOutcome::End),
        ENTRY_HEADER => {}
        _ => return Ok(ReadOutcome::Torn("truncated entry header")),
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_ENTRY {
        return Ok(ReadOutcome::Torn("impossible entry length"));
    }
    buf.clear();
    while buf.len() < len {
        let at = buf.len();
        let step = (len - at).min(READ_STEP);
        buf.resize(at + step, 0);
        if fill(r, &mut buf[at..])? < step {
            return Ok(ReadOutcome::Torn("truncated entry"));
        }
    }
    if crc32fast::hash(buf) != crc {
        return Ok(ReadOutcome::Torn("CRC mismatch"));
    }
    Ok(ReadOutcome::Entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_corrupt_length_on_a_short_log_allocates_one_read_step_not_the_claimed_length() {
        let mut log = Vec::new();
        log.extend_from_slice(&(MAX_ENTRY as u32).to_le_bytes());
        log.extend_from_slice(&0u32.to_le_bytes());
        log.extend_from_slice(&[7; 100]);
        let mut buf = Vec::new();
        let outcome = read_entry(&mut &log[..], &mut buf).unwrap();
        assert_eq!(outcome, ReadOutcome::Torn("truncated entry"));
        assert!(
            buf.capacity() <= READ_STEP,
            "a 108-byte log made the reader allocate {} bytes",
            buf.capacity()
        );
    }

    #[test]
    fn an_entry_larger_than_one_read_step_round_trips() {
        let payload: Vec<u8> = (0..READ_STEP * 2 + 5).map(|i| i as u8).collect();
        let mut log = Vec::new();
        write_entry(&mut log, &payload).unwrap();
        let mut buf = Vec::new();
        assert_eq!(
            read_entry(&mut &log[..], &mut buf).unwrap(),
            ReadOutcome::Entry
        );
        assert_eq!(buf, payload);
        let cut = &log[..log.len() - 1];
        assert_eq!(
            read_entry(&mut &cut[..], &mut buf).unwrap(),
            ReadOutcome::Torn("truncated entry")
        );
    }

    proptest! {
        #[test]
        fn entries_round_trip_and_any_truncation_is_torn_not_a_panic(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..10),
            cut in any::<usize>(),
        ) {
            let mut log = Vec::new();
            for p in &payloads {
                write_entry(&mut log, p).unwrap();
            }
            let mut r = &log[..];
            let mut buf = Vec::new();
            for p in &payloads {
                prop_assert_eq!(read_entry(&mut r, &mut buf).unwrap(), ReadOutcome::Entry);
                prop_assert_eq!(&buf, p);
            }
            prop_assert_eq!(read_entry(&mut r, &mut buf).unwrap(), ReadOutcome::End);
            let cut = cut % log.len();
            let mut r = &log[..cut];
            let mut whole = 0;
            loop {
                match read_entry(&mut r, &mut buf).unwrap() {
                    ReadOutcome::Entry => whole += 1,
                    ReadOutcome::End => break,
                    ReadOutcome::Torn(_) => break,
                }
            }
            prop_assert!(whole <= payloads.len());
        }
    }
}
