//! Segment files and how their bytes divide into entries.
//!
//! ```text
//! {dir}/{index of first entry:020}.seg   [16-byte header: "weir-seg", u32 format, u32 0][entries...]
//! ```
//!
//! The header marks the format: a segment without it (written by a weir
//! before the header existed) or with another format number is refused
//! with a message naming the directory, never read as entries.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::frame::{check_entry_at, ENTRY_HEADER, MAX_ENTRY};

/// The format this build writes and reads. Bump it when entries or the
/// header change meaning; older segments are then refused, not misread.
pub const FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"weir-seg";
/// Bytes before the first entry of every segment.
pub const HEADER_LEN: u64 = 16;

/// No log reaches this many entries (2^62, at one entry per byte more
/// than 4 EiB); a segment name beyond it is damage, and the bound keeps
/// every index sum far from overflow.
pub const MAX_INDEX: u64 = 1 << 62;

fn header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    h
}

pub fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

/// Creates (or empties) a segment and writes its header; returns it open
/// for appending.
pub fn create_segment(path: &Path) -> Result<File> {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&header())
        .with_context(|| format!("writing {}", path.display()))?;
    OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// What the start of a segment file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A whole header of this format: entries start at `HEADER_LEN`.
    Current,
    /// Empty, or part of a header: a crash while the segment was created.
    Short,
}

/// Checks a segment's header. `key` names the setting that holds the
/// directory (`spool.path`), for the message.
pub fn check_header(data: &[u8], path: &Path, key: &str) -> Result<Header> {
    let want = header();
    if data.len() < want.len() {
        if want.starts_with(data) {
            return Ok(Header::Short);
        }
    } else if data[..want.len()] == want {
        return Ok(Header::Current);
    }
    let dir = path.parent().unwrap_or(path);
    if data.len() >= 12 && data[..8] == MAGIC[..] {
        let format = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
        bail!(
            "{key}: segment {} has format {format}, this weir reads format {FORMAT}; move {} away (keep it until its records are no longer needed) and start again",
            path.display(),
            dir.display()
        );
    }
    bail!(
        "{key}: segment {} has no weir segment header: it was written by an older weir (before format {FORMAT}) or is not a segment; move {} away (keep it until its records are no longer needed) and start again",
        path.display(),
        dir.display()
    )
}

/// The segments in `dir`, sorted by their first index. Other files are
/// logged and left alone.
pub fn list_segments(dir: &Path, what: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(first) = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            tracing::warn!(file = %e.path().display(), "{what}: ignoring a file that is not a segment");
            continue;
        };
        found.push((first, e.path()));
    }
    found.sort();
    Ok(found)
}

/// The whole entry at `off` in `data`: its length with the header, or why not.
pub fn entry_at(data: &[u8], off: usize) -> std::result::Result<usize, &'static str> {
    match check_entry_at(data.get(off..).unwrap_or_default()) {
        Ok(Some(payload)) => Ok(ENTRY_HEADER + payload.len()),
        Ok(None) => Err("truncated entry header"),
        Err(why) => Err(why),
    }
}

/// A corrupt entry at `off` whose length header still holds: it fits in
/// `data` and a whole entry (or the end of the data) follows it.
fn skippable(data: &[u8], off: usize) -> Option<usize> {
    let header = data.get(off..off.checked_add(ENTRY_HEADER)?)?;
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_ENTRY {
        return None;
    }
    let next = off + ENTRY_HEADER + len;
    (next == data.len() || (next < data.len() && entry_at(data, next).is_ok()))
        .then_some(ENTRY_HEADER + len)
}

/// A whole entry at `r` followed by another (or by the end of the data):
/// where reading can pick up again after a damaged run. Two CRCs that
/// hold by chance at a wrong offset are a 1 in 2^64 event.
fn resyncs_at(data: &[u8], r: usize) -> bool {
    entry_at(data, r).is_ok_and(|n| r + n == data.len() || entry_at(data, r + n).is_ok())
}

/// Entries readers skip because their bytes are unreadable: indexes
/// `from..to`, stored at bytes `offset..end_offset` of the segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    pub from: u64,
    pub to: u64,
    pub offset: u64,
    pub end_offset: u64,
    /// The entry count is known (the damaged entry's own length held, or
    /// the next segment's name fixes it); else it is a guess of one entry
    /// and the indexes after it may differ from those written.
    pub exact: bool,
    pub why: &'static str,
}

/// Where a segment stops early: a torn tail (a crash mid-append), or
/// damage no rule can skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Torn {
    /// Byte offset in the file where the readable part ends.
    pub offset: u64,
    /// The index of the first entry lost.
    pub index: u64,
    pub why: &'static str,
}

/// How a segment's bytes divide into entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// Entries, corrupt ones included (up to `torn` if it is set).
    pub count: u64,
    /// File bytes up to `torn`, or all of them (header included).
    pub good_len: u64,
    /// Sorted by `from`.
    pub holes: Vec<Hole>,
    pub torn: Option<Torn>,
}

/// How to treat damage while mapping.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// The index after the segment's last entry, when known (every
    /// segment but the newest: the next one's name).
    pub end: Option<u64>,
    /// A failure at or after this index is a torn tail (entries not yet
    /// durable when the log last recorded its durable index).
    pub torn_from: Option<u64>,
    /// Without `end`, skip a damaged run to where whole entries resume,
    /// guessing it took one entry, instead of ending the segment there.
    pub guess_past_damage: bool,
}

/// Walks a segment's bytes (the whole file, header included). A corrupt
/// entry whose length header holds is skipped by that length (one entry
/// lost). A longer damaged run is skipped to the next offset where whole
/// entries resume, when `end` is known: the entries from there to the end
/// of the data, counted, give the run's length in entries exactly. Should
/// a second such run follow, the two and everything between them become
/// one hole (only their sum is known). Without `end` the segment stops at
/// such a run (`torn`), unless `guess_past_damage`. A failure at or after
/// `torn_from` is a torn tail: the segment stops there too. Linear in the
/// data.
pub fn map_segment(data: &[u8], first: u64, rules: Rules) -> Mapped {
    let Rules {
        end,
        torn_from,
        guess_past_damage,
    } = rules;
    let start = (HEADER_LEN as usize).min(data.len());
    let (mut off, mut index, mut holes) = (start, first, Vec::new());
    // A damaged run whose length is known only at the end: its first index
    // and byte offset, where reading resumed, the entries since, and the
    // single-entry holes since (indexes relative to the resync point).
    let mut open: Option<(u64, usize, usize)> = None;
    let (mut since, mut after): (u64, Vec<Hole>) = (0, Vec::new());
    while off < data.len() {
        let why = match entry_at(data, off) {
            Ok(n) => {
                off += n;
                match open {
                    Some(_) => since += 1,
                    None => index += 1,
                }
                continue;
            }
            Err(why) => why,
        };
        let torn = open.is_none() && torn_from.is_some_and(|t| index >= t);
        if let Some(n) = skippable(data, off).filter(|_| !torn) {
            let at = if open.is_some() { since } else { index };
            let hole = Hole {
                from: at,
                to: at + 1,
                offset: off as u64,
                end_offset: (off + n) as u64,
                exact: true,
                why,
            };
            match open {
                Some(_) => {
                    after.push(hole);
                    since += 1;
                }
                None => {
                    holes.push(hole);
                    index += 1;
                }
            }
            off += n;
            continue;
        }
        if torn || (end.is_none() && !guess_past_damage) {
            return Mapped {
                count: index - first,
                good_len: off as u64,
                holes,
                torn: Some(Torn {
                    offset: off as u64,
                    index,
                    why,
                }),
            };
        }
        let resync = (off + 1..data.len()).find(|r| resyncs_at(data, *r));
        if end.is_none() {
            // Guessing: one entry lost, or a torn tail if nothing follows.
            let Some(resync) = resync else {
                return Mapped {
                    count: index - first,
                    good_len: off as u64,
                    holes,
                    torn: Some(Torn {
                        offset: off as u64,
                        index,
                        why,
                    }),
                };
            };
            holes.push(Hole {
                from: index,
                to: index + 1,
                offset: off as u64,
                end_offset: resync as u64,
                exact: false,
                why,
            });
            index += 1;
            off = resync;
            continue;
        }
        let resync = resync.unwrap_or(data.len());
        let (from, from_off) = open.map_or((index, off), |(f, o, _)| (f, o));
        open = Some((from, from_off, resync));
        since = 0;
        after.clear();
        off = resync;
    }
    if let (Some((from, from_off, resync)), Some(end)) = (open, end) {
        let to = end.checked_sub(since).filter(|t| *t > from);
        match to {
            Some(to) => {
                holes.push(Hole {
                    from,
                    to,
                    offset: from_off as u64,
                    end_offset: resync as u64,
                    exact: true,
                    why: "corrupt entries",
                });
                holes.extend(after.iter().map(|h| Hole {
                    from: to + h.from,
                    to: to + h.to,
                    ..*h
                }));
            }
            // More entries after the run than the segment can hold: the
            // resync point is not to be trusted, so all of it is lost.
            None => holes.push(Hole {
                from,
                to: end.max(from + 1),
                offset: from_off as u64,
                end_offset: data.len() as u64,
                exact: true,
                why: "corrupt entries",
            }),
        }
        index = end.max(from + 1);
    } else if let Some(end) = end.filter(|e| *e > index) {
        // Whole entries end before the segment should: the rest is missing.
        holes.push(Hole {
            from: index,
            to: end,
            offset: off as u64,
            end_offset: data.len() as u64,
            exact: true,
            why: "entries missing at the end",
        });
        index = end;
    }
    Mapped {
        count: index - first,
        good_len: data.len() as u64,
        holes,
        torn: None,
    }
}

/// What a walk of a mapped segment meets, in order.
#[derive(Debug)]
pub enum Walked<'a> {
    Entry {
        index: u64,
        offset: u64,
        /// Framed size.
        size: u64,
        payload: &'a [u8],
    },
    Hole(&'a Hole),
    /// Bytes that no longer read as an entry (changed since it was mapped).
    Unreadable {
        index: u64,
        offset: u64,
        why: &'static str,
    },
}

/// Walks the entries `first..end` of a mapped segment's bytes, jumping its
/// holes, every entry's CRC checked. Stops after an unreadable one.
pub fn walk(data: &[u8], first: u64, end: u64, holes: &[Hole], mut visit: impl FnMut(Walked<'_>)) {
    let (mut off, mut index) = (HEADER_LEN as usize, first);
    let mut holes = holes.iter().peekable();
    while index < end {
        if let Some(h) = holes.next_if(|h| h.from <= index) {
            if index < h.to {
                visit(Walked::Hole(h));
                index = h.to;
                off = h.end_offset as usize;
            }
            continue;
        }
        match check_entry_at(data.get(off..).unwrap_or_default()) {
            Ok(Some(payload)) => {
                let size = (ENTRY_HEADER + payload.len()) as u64;
                visit(Walked::Entry {
                    index,
                    offset: off as u64,
                    size,
                    payload,
                });
                index += 1;
                off += size as usize;
            }
            Ok(None) => {
                return visit(Walked::Unreadable {
                    index,
                    offset: off as u64,
                    why: "segment ends early",
                })
            }
            Err(why) => {
                return visit(Walked::Unreadable {
                    index,
                    offset: off as u64,
                    why,
                })
            }
        }
    }
}
