//! Framing of entries in a segment: each entry is `[u32 len][u32 crc32 of
//! payload][payload]`, little-endian. Pure functions over `Read`/`Write`
//! and byte slices; the files around them are in `segment` and `log`.
//!
//! A reader that meets a bad entry in the middle of a log (not a torn tail)
//! uses [`check_entry_at`] and [`find_next_entry`] to find where readable
//! entries resume; it never skips by a length it has not checked, because
//! a corrupt length field would land it inside another entry's payload.

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

/// Checks the framed entry at the start of `data` (header, length bound,
/// CRC); returns its payload or why it is not a readable entry.
/// `Ok(None)` is a clean end (`data` is empty).
pub fn check_entry_at(data: &[u8]) -> Result<Option<&[u8]>, &'static str> {
    if data.is_empty() {
        return Ok(None);
    }
    let Some(header) = data.get(..ENTRY_HEADER) else {
        return Err("truncated entry header");
    };
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_ENTRY {
        return Err("impossible entry length");
    }
    let Some(payload) = data.get(ENTRY_HEADER..ENTRY_HEADER + len) else {
        return Err("truncated entry");
    };
    if crc32fast::hash(payload) != crc {
        return Err("CRC mismatch");
    }
    Ok(Some(payload))
}

/// The first offset at or after `from` where a whole entry starts whose
/// CRC matches and whose payload `plausible` accepts (checked before the
/// CRC, so a cheap test keeps a search through garbage fast). `None`: no
/// readable entry follows, i.e. the rest of `data` is a torn tail.
pub fn find_next_entry(
    data: &[u8],
    from: usize,
    mut plausible: impl FnMut(&[u8]) -> bool,
) -> Option<usize> {
    let last = data.len().checked_sub(ENTRY_HEADER + 1)?;
    (from..=last).find(|&at| {
        let header = &data[at..at + ENTRY_HEADER];
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_ENTRY || len > data.len() - at - ENTRY_HEADER {
            return false;
        }
        let payload = &data[at + ENTRY_HEADER..at + ENTRY_HEADER + len];
        plausible(payload)
            && crc32fast::hash(payload)
                == u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"))
    })
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

        #[test]
        fn after_garbage_in_the_middle_the_next_whole_entry_is_found(
            payloads in proptest::collection::vec(proptest::collection::vec(1u8..255, 1..300), 3..10),
            victim in any::<usize>(),
            garbage in proptest::collection::vec(any::<u8>(), 1..40),
        ) {
            let mut log = Vec::new();
            let mut starts = Vec::new();
            for p in &payloads {
                starts.push(log.len());
                write_entry(&mut log, p).unwrap();
            }
            // Overwrite bytes at the start of one entry (not the last).
            let victim = victim % (payloads.len() - 1);
            let at = starts[victim];
            let end = (at + garbage.len()).min(starts[victim + 1]);
            log[at..end].copy_from_slice(&garbage[..end - at]);
            // Payloads never hold a 0 byte, so "starts with a nonzero byte
            // and the CRC matches" only accepts a real entry start.
            let found = find_next_entry(&log, at + 1, |p| p[0] != 0);
            if check_entry_at(&log[at..]).is_err() {
                prop_assert!(found.is_some_and(|f| starts.contains(&f) && f > at));
                let f = found.unwrap();
                prop_assert_eq!(check_entry_at(&log[f..]).unwrap().unwrap(), &payloads[starts.iter().position(|s| *s == f).unwrap()][..]);
            }
        }
    }

    #[test]
    fn check_entry_at_names_what_is_wrong() {
        let mut log = Vec::new();
        write_entry(&mut log, b"hello").unwrap();
        assert_eq!(check_entry_at(&log).unwrap(), Some(&b"hello"[..]));
        assert_eq!(check_entry_at(&[]).unwrap(), None);
        assert_eq!(check_entry_at(&log[..5]), Err("truncated entry header"));
        assert_eq!(check_entry_at(&log[..10]), Err("truncated entry"));
        let mut bad = log.clone();
        bad[9] ^= 1;
        assert_eq!(check_entry_at(&bad), Err("CRC mismatch"));
        assert_eq!(find_next_entry(&bad, 0, |_| true), None);
    }
}
