//! Bundles: how records are packed into the data bytes of a block.
//!
//! A block's data is a sequence of entries, each a tag byte, LEB128 lengths
//! and bytes:
//!
//! ```text
//! 0x01 STREAM_INFO  len, postcard(StreamInfo)   names a stream before its first record in this block
//! 0x02 RECORD       len, postcard(Record)       a whole record
//! 0x03 FIRST        total, len, bytes           first piece of a record larger than the room left
//! 0x04 MIDDLE       len, bytes                  continuation, more follows in the next block
//! 0x05 LAST         len, bytes                  final piece
//! 0x06 GAP_NOTICE   len, postcard(GapNotice)    records the sender will never send, and why
//! ```
//! A MIDDLE or LAST entry is always the first entry of the block after the
//! one holding the previous piece, so a decoder reassembles by block order
//! alone and drops a record whose pieces are not all present.

use thiserror::Error;

pub const TAG_STREAM_INFO: u8 = 0x01;
pub const TAG_RECORD: u8 = 0x02;
pub const TAG_FIRST: u8 = 0x03;
pub const TAG_MIDDLE: u8 = 0x04;
pub const TAG_LAST: u8 = 0x05;
pub const TAG_GAP_NOTICE: u8 = 0x06;

/// Worst-case bytes of an entry header: a tag and two 5-byte LEB128 lengths.
pub const MAX_ENTRY_HEADER: usize = 11;

pub fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub fn varint_len(v: u32) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0xfff_ffff => 4,
        _ => 5,
    }
}

fn get_varint(data: &[u8], pos: &mut usize) -> Result<u32, EntryError> {
    let mut v: u32 = 0;
    for shift in (0..35).step_by(7) {
        let byte = *data.get(*pos).ok_or(EntryError::Truncated)?;
        *pos += 1;
        if shift == 28 && byte > 0x0f {
            return Err(EntryError::BadLength);
        }
        v |= u32::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(EntryError::BadLength)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry<'a> {
    StreamInfo(&'a [u8]),
    Record(&'a [u8]),
    First { total: u32, piece: &'a [u8] },
    Middle(&'a [u8]),
    Last(&'a [u8]),
    GapNotice(&'a [u8]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EntryError {
    #[error("entry runs past the end of the block data")]
    Truncated,
    #[error("entry length is not a valid LEB128 u32")]
    BadLength,
    #[error("unknown entry tag {0:#04x}")]
    UnknownTag(u8),
}

/// Iterates the entries of a block's data; stops at the first malformed one.
pub struct Entries<'a> {
    data: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Entries<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Entries {
            data,
            pos: 0,
            failed: false,
        }
    }

    fn take(&mut self, len: u32) -> Result<&'a [u8], EntryError> {
        let end = self
            .pos
            .checked_add(len as usize)
            .ok_or(EntryError::BadLength)?;
        let bytes = self.data.get(self.pos..end).ok_or(EntryError::Truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn next_entry(&mut self) -> Result<Entry<'a>, EntryError> {
        let tag = self.data[self.pos];
        self.pos += 1;
        let len = get_varint(self.data, &mut self.pos)?;
        match tag {
            TAG_STREAM_INFO => Ok(Entry::StreamInfo(self.take(len)?)),
            TAG_RECORD => Ok(Entry::Record(self.take(len)?)),
            TAG_FIRST => {
                let piece_len = get_varint(self.data, &mut self.pos)?;
                Ok(Entry::First {
                    total: len,
                    piece: self.take(piece_len)?,
                })
            }
            TAG_MIDDLE => Ok(Entry::Middle(self.take(len)?)),
            TAG_LAST => Ok(Entry::Last(self.take(len)?)),
            TAG_GAP_NOTICE => Ok(Entry::GapNotice(self.take(len)?)),
            other => Err(EntryError::UnknownTag(other)),
        }
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, EntryError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.data.len() {
            return None;
        }
        let entry = self.next_entry();
        self.failed = entry.is_err();
        Some(entry)
    }
}

/// Appends one entry. `total` is only used for FIRST.
pub fn put_entry(out: &mut Vec<u8>, tag: u8, total: u32, bytes: &[u8]) {
    Pieces(bytes, &[]).put_entry(out, tag, total);
}

/// A record's bytes held in two pieces (a head written apart and a body
/// as it was stored), packed as one run of bytes without first joining
/// them in a buffer of their own.
#[derive(Debug, Clone, Copy)]
pub struct Pieces<'a>(pub &'a [u8], pub &'a [u8]);

impl<'a> Pieces<'a> {
    pub fn len(&self) -> usize {
        self.0.len() + self.1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` bytes and the rest. Panics if `n > self.len()`.
    pub fn split_at(self, n: usize) -> (Pieces<'a>, Pieces<'a>) {
        if n <= self.0.len() {
            let (a, b) = self.0.split_at(n);
            (Pieces(a, &[]), Pieces(b, self.1))
        } else {
            let (a, b) = self.1.split_at(n - self.0.len());
            (Pieces(self.0, a), Pieces(b, &[]))
        }
    }

    /// As [`put_entry`], with these bytes as the entry's payload.
    pub fn put_entry(self, out: &mut Vec<u8>, tag: u8, total: u32) {
        out.push(tag);
        if tag == TAG_FIRST {
            put_varint(out, total);
        }
        put_varint(out, self.len() as u32);
        out.extend_from_slice(self.0);
        out.extend_from_slice(self.1);
    }
}

/// Bytes `put_entry` writes for an entry of `len` payload bytes.
pub fn entry_len(tag: u8, total: u32, len: usize) -> usize {
    let extra = if tag == TAG_FIRST {
        varint_len(total)
    } else {
        0
    };
    1 + extra + varint_len(len as u32) + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pieces_split_anywhere_pack_the_same_bytes_as_the_joined_slice(
            head in proptest::collection::vec(any::<u8>(), 0..40),
            body in proptest::collection::vec(any::<u8>(), 0..300),
            cut in any::<proptest::sample::Index>(),
            tag in prop_oneof![Just(TAG_FIRST), Just(TAG_MIDDLE), Just(TAG_LAST)],
        ) {
            let joined = [head.as_slice(), body.as_slice()].concat();
            let n = cut.index(joined.len() + 1);
            let (a, b) = Pieces(&head, &body).split_at(n);
            prop_assert_eq!(a.len() + b.len(), joined.len());
            let (mut want, mut got) = (Vec::new(), Vec::new());
            put_entry(&mut want, tag, 7, &joined[..n]);
            put_entry(&mut want, tag, 7, &joined[n..]);
            a.put_entry(&mut got, tag, 7);
            b.put_entry(&mut got, tag, 7);
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn entries_round_trip() {
        let mut buf = Vec::new();
        put_entry(&mut buf, TAG_STREAM_INFO, 0, b"info");
        put_entry(&mut buf, TAG_RECORD, 0, &[7; 300]);
        put_entry(&mut buf, TAG_FIRST, 100_000, b"abc");
        put_entry(&mut buf, TAG_MIDDLE, 0, b"d");
        put_entry(&mut buf, TAG_LAST, 0, b"");
        let got: Vec<_> = Entries::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            got,
            vec![
                Entry::StreamInfo(b"info"),
                Entry::Record(&[7; 300]),
                Entry::First {
                    total: 100_000,
                    piece: b"abc"
                },
                Entry::Middle(b"d"),
                Entry::Last(b""),
            ]
        );
        assert_eq!(entry_len(TAG_FIRST, 100_000, 3), 1 + 3 + 1 + 3);
    }

    proptest! {
        #[test]
        fn varint_round_trips(v in any::<u32>()) {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            prop_assert_eq!(buf.len(), varint_len(v));
            let mut pos = 0;
            prop_assert_eq!(get_varint(&buf, &mut pos), Ok(v));
        }

        #[test]
        fn entry_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for _ in Entries::new(&bytes) {}
        }
    }
}
