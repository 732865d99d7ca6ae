//! Syslog parsing and TCP framing, pure functions (no I/O, no clock: the
//! caller passes the time and where the message came from).
//!
//! Hand-written rather than `syslog_loose`: that crate is deliberately
//! lenient (it returns *something* for any input and, in its exact mode,
//! a fixed error string), while weir must flag a line that is not syslog
//! and say why; `syslog_rfc5424` handles only RFC 5424. Both bring `nom`.
//!
//! - RFC 5424: `<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD [MSG]`, strict:
//!   any field that breaks the grammar flags the message.
//! - RFC 3164: `<PRI>Mmm dd hh:mm:ss [HOST] [TAG[pid]:] MSG`. The PRI and
//!   the timestamp are required (an RFC 3339 timestamp is accepted in its
//!   place, as rsyslog's high-precision format sends); the host is taken
//!   when the word after the timestamp is not a tag (`tag:` or `tag[pid]:`).
//!   The timestamp has no year and no zone: the zone is the configured
//!   offset (UTC by default), the year is the one of -1, 0, +1 around the
//!   sender's current year that puts the message closest to now (so a
//!   `Dec 31 23:59:59` read on Jan 1 is last year's, a `Jan 1 00:00:01`
//!   read on Dec 31 by a sender whose clock is behind is next year's).
//! - Anything else becomes a `Log` with the raw text, user.notice
//!   (priority 13, as RFC 3164 §4.3.3 tells a relay to assume), the
//!   peer's address as host, the receive time, and `parse_error` set.

use bytes::{Buf, BytesMut};
use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, TimeZone};
use weir_protocol::{Log, SdElement};

/// What a message is parsed against: the receive time and the peer.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// Receive time, nanoseconds since the Unix epoch.
    pub now_ns: i64,
    /// The zone RFC 3164 timestamps are read in.
    pub rfc3164_offset: FixedOffset,
    /// The peer's ip, the host of a message that names none.
    pub peer_host: &'a str,
}

/// RFC 3164 §4.3.3: the priority a relay gives a message without one.
const DEFAULT_PRI: u8 = 13;

/// Parses one syslog message (without its framing). Never fails: a
/// message that does not parse comes back with `parse_error` set.
pub fn parse(raw: &[u8], cx: &Context) -> Log {
    let text = String::from_utf8_lossy(raw);
    let text = text.trim_end_matches(['\n', '\r', '\0']);
    match parse_valid(text, cx) {
        Ok(log) => log,
        Err((pri, why)) => {
            let pri = pri.unwrap_or(DEFAULT_PRI);
            Log {
                facility: pri >> 3,
                severity: pri & 7,
                host: cx.peer_host.to_string(),
                app: String::new(),
                text: text.to_string(),
                ts_ns: cx.now_ns,
                proc_id: String::new(),
                msg_id: String::new(),
                structured_data: Vec::new(),
                parse_error: Some(why),
            }
        }
    }
}

type Failure = (Option<u8>, String);

fn parse_valid(text: &str, cx: &Context) -> Result<Log, Failure> {
    let (pri, rest) = parse_pri(text).map_err(|e| (None, e))?;
    let fail = |why: String| (Some(pri), why);
    if let Some(after) = rest.strip_prefix("1 ") {
        parse_5424(pri, after, cx).map_err(fail)
    } else {
        parse_3164(pri, rest, cx).map_err(fail)
    }
}

fn parse_pri(text: &str) -> Result<(u8, &str), String> {
    let Some(rest) = text.strip_prefix('<') else {
        return Err("no <PRI> at the start".into());
    };
    let end = rest
        .find('>')
        .filter(|&i| i <= 4)
        .ok_or("<PRI> is not closed by '>' within 3 digits")?;
    let digits = &rest[..end];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("<PRI> `{digits}` is not a number"));
    }
    let pri: u16 = digits.parse().map_err(|_| format!("<PRI> `{digits}`"))?;
    if pri > 191 {
        return Err(format!("<PRI> {pri} is above 191"));
    }
    Ok((pri as u8, &rest[end + 1..]))
}

/// Splits off the next space-separated field (exactly one space after it).
fn field(s: &str) -> (&str, &str) {
    match s.find(' ') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, ""),
    }
}

fn nil_or(v: &str) -> String {
    if v == "-" {
        String::new()
    } else {
        v.to_string()
    }
}

fn check_header_field(name: &str, v: &str, max: usize) -> Result<(), String> {
    if v.is_empty() {
        return Err(format!("RFC 5424 {name} is empty (two spaces in a row?)"));
    }
    if v.len() > max {
        return Err(format!("RFC 5424 {name} is longer than {max} characters"));
    }
    if let Some(c) = v.chars().find(|c| !('!'..='~').contains(c)) {
        return Err(format!(
            "RFC 5424 {name} `{v}` holds {c:?}, not printable ASCII"
        ));
    }
    Ok(())
}

fn parse_5424(pri: u8, s: &str, cx: &Context) -> Result<Log, String> {
    let (ts, s) = field(s);
    let ts_ns = if ts == "-" {
        cx.now_ns
    } else {
        let t = DateTime::parse_from_rfc3339(ts)
            .map_err(|e| format!("RFC 5424 timestamp `{ts}`: {e}"))?;
        t.timestamp_nanos_opt()
            .ok_or_else(|| format!("RFC 5424 timestamp `{ts}` is out of range"))?
    };
    let (host, s) = field(s);
    check_header_field("HOSTNAME", host, 255)?;
    let (app, s) = field(s);
    check_header_field("APP-NAME", app, 48)?;
    let (proc_id, s) = field(s);
    check_header_field("PROCID", proc_id, 128)?;
    let (msg_id, s) = field(s);
    check_header_field("MSGID", msg_id, 32)?;
    let (structured_data, s) = if let Some(rest) = s.strip_prefix('-') {
        (Vec::new(), rest)
    } else if s.starts_with('[') {
        parse_sd(s)?
    } else if s.is_empty() {
        return Err("RFC 5424 STRUCTURED-DATA is missing".into());
    } else {
        return Err(format!(
            "RFC 5424 STRUCTURED-DATA must be `-` or start with `[`, not `{}`",
            s.chars().take(16).collect::<String>()
        ));
    };
    let msg = match s.strip_prefix(' ') {
        Some(m) => m.strip_prefix('\u{feff}').unwrap_or(m),
        None if s.is_empty() => "",
        None => {
            return Err("RFC 5424 STRUCTURED-DATA is not followed by a space".into());
        }
    };
    Ok(Log {
        facility: pri >> 3,
        severity: pri & 7,
        host: nil_or(host),
        app: nil_or(app),
        text: msg.to_string(),
        ts_ns,
        proc_id: nil_or(proc_id),
        msg_id: nil_or(msg_id),
        structured_data,
        parse_error: None,
    })
}

fn is_sd_name_char(c: char) -> bool {
    ('!'..='~').contains(&c) && !matches!(c, '=' | ']' | '"')
}

/// Parses `[id name="value" ...]...`; returns the elements and the rest.
fn parse_sd(mut s: &str) -> Result<(Vec<SdElement>, &str), String> {
    let mut elements = Vec::new();
    while let Some(rest) = s.strip_prefix('[') {
        let id_len = rest.find(|c| !is_sd_name_char(c)).unwrap_or(rest.len());
        let id = &rest[..id_len];
        if id.is_empty() || id.len() > 32 {
            return Err(format!(
                "RFC 5424 SD-ID `{id}` must be 1 to 32 printable characters"
            ));
        }
        let mut element = SdElement {
            id: id.to_string(),
            params: Vec::new(),
        };
        let mut r = &rest[id_len..];
        loop {
            if let Some(after) = r.strip_prefix(']') {
                r = after;
                break;
            }
            let Some(after) = r.strip_prefix(' ') else {
                return Err(format!("RFC 5424 SD element `{id}` is not closed by `]`"));
            };
            let name_len = after.find(|c| !is_sd_name_char(c)).unwrap_or(after.len());
            let name = &after[..name_len];
            if name.is_empty() || name.len() > 32 {
                return Err(format!(
                    "RFC 5424 SD-PARAM name in `{id}` must be 1 to 32 printable characters"
                ));
            }
            let Some(after) = after[name_len..].strip_prefix("=\"") else {
                return Err(format!(
                    "RFC 5424 SD-PARAM `{name}` in `{id}` lacks `=\"value\"`"
                ));
            };
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    None => {
                        return Err(format!(
                            "RFC 5424 SD-PARAM `{name}` in `{id}`: value not closed by `\"`"
                        ))
                    }
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c @ ('"' | '\\' | ']'))) => value.push(c),
                        // RFC 5424 §6.3.3: a backslash before anything else is kept.
                        Some((_, c)) => {
                            value.push('\\');
                            value.push(c);
                        }
                        None => {
                            return Err(format!(
                                "RFC 5424 SD-PARAM `{name}` in `{id}`: value not closed by `\"`"
                            ))
                        }
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            element.params.push((name.to_string(), value));
            r = &after[end + 1..];
        }
        elements.push(element);
        s = r;
    }
    Ok((elements, s))
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

fn parse_3164(pri: u8, s: &str, cx: &Context) -> Result<Log, String> {
    let (ts_ns, s) = parse_3164_timestamp(s, cx)?;
    let (host, app, proc_id, text) = split_3164_header(s);
    Ok(Log {
        facility: pri >> 3,
        severity: pri & 7,
        host: host.unwrap_or(cx.peer_host).to_string(),
        app: app.to_string(),
        text: text.to_string(),
        ts_ns,
        proc_id: proc_id.to_string(),
        msg_id: String::new(),
        structured_data: Vec::new(),
        parse_error: None,
    })
}

/// `Mmm dd hh:mm:ss ` (the day space- or zero-padded), or an RFC 3339
/// timestamp; returns the time and what follows it.
fn parse_3164_timestamp<'s>(s: &'s str, cx: &Context) -> Result<(i64, &'s str), String> {
    let (first, _) = field(s);
    if first.len() > 10 && first.as_bytes()[4] == b'-' {
        if let Ok(t) = DateTime::parse_from_rfc3339(first) {
            let rest = s[first.len()..].strip_prefix(' ').unwrap_or("");
            return t
                .timestamp_nanos_opt()
                .map(|ns| (ns, rest))
                .ok_or_else(|| format!("timestamp `{first}` is out of range"));
        }
    }
    let bad = || {
        format!(
            "neither RFC 5424 (`1 ` after <PRI>) nor an RFC 3164 timestamp (`Mmm dd hh:mm:ss`) after <PRI>: `{}`",
            s.chars().take(20).collect::<String>()
        )
    };
    let month = MONTHS
        .iter()
        .position(|m| s.starts_with(m))
        .ok_or_else(bad)? as u32
        + 1;
    let rest = s[3..].strip_prefix(' ').ok_or_else(bad)?;
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let (day, rest) = field(rest);
    let (time, rest) = field(rest);
    let day: u32 = day
        .parse()
        .ok()
        .filter(|d| (1..=31).contains(d))
        .ok_or_else(bad)?;
    let hms: Vec<u32> = time.split(':').filter_map(|p| p.parse().ok()).collect();
    if time.len() != 8 || hms.len() != 3 || hms[0] > 23 || hms[1] > 59 || hms[2] > 60 {
        return Err(bad());
    }
    let now = cx.rfc3164_offset.timestamp_nanos(cx.now_ns);
    let mut best: Option<i64> = None;
    for year in [now.year() - 1, now.year(), now.year() + 1] {
        let Some(t) = NaiveDate::from_ymd_opt(year, month, day)
            .and_then(|d| d.and_hms_opt(hms[0], hms[1], hms[2].min(59)))
            .and_then(|t| t.and_local_timezone(cx.rfc3164_offset).single())
            .and_then(|t| t.timestamp_nanos_opt())
        else {
            continue; // Feb 29 in a year without one
        };
        if best.is_none_or(|b| (t - cx.now_ns).abs() < (b - cx.now_ns).abs()) {
            best = Some(t);
        }
    }
    let ts = best.ok_or_else(|| {
        format!(
            "RFC 3164 date `{} {day}` does not exist",
            MONTHS[month as usize - 1]
        )
    })?;
    Ok((ts, rest))
}

/// `(host, app, proc_id, msg)` from what follows an RFC 3164 timestamp.
fn split_3164_header(s: &str) -> (Option<&str>, &str, &str, &str) {
    fn tag(word: &str) -> Option<(&str, &str)> {
        let w = word.strip_suffix(':')?;
        if let Some(open) = w.find('[') {
            let pid = w[open + 1..].strip_suffix(']')?;
            return Some((&w[..open], pid));
        }
        Some((w, ""))
    }
    let (first, rest) = field(s);
    if let Some((app, pid)) = tag(first) {
        return (None, app, pid, rest);
    }
    if first.is_empty() {
        return (None, "", "", rest);
    }
    let (second, rest2) = field(rest);
    match tag(second) {
        Some((app, pid)) => (Some(first), app, pid, rest2),
        None => (Some(first), "", "", rest),
    }
}

/// One message cut from a TCP byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub data: Vec<u8>,
    /// Its length as sent, when longer than `data` (it was truncated to
    /// the maximum message size).
    pub truncated_from: Option<usize>,
}

/// Cuts a TCP byte stream into messages (RFC 6587): a frame that starts
/// with `[1-9][0-9]* ` is octet-counted (that many bytes follow), any
/// other ends at `\n` (a `\r` before it is dropped). A syslog message
/// starts with `<`, so the two cannot be confused. A message longer than
/// `max` is cut to `max` bytes and the rest of it skipped.
#[derive(Debug)]
pub struct Framer {
    /// Unframed bytes. `BytesMut`: taking a frame off the front is O(1),
    /// where removing it from a `Vec` moves the rest of the read each time.
    buf: BytesMut,
    max: usize,
    /// Bytes of the current (over-long) message still to skip; for a
    /// newline-framed one, `usize::MAX` (skip to the next `\n`).
    skip: usize,
    /// The truncated message being skipped: its length so far.
    skipped_len: usize,
}

/// Most digits an octet count may have (up to 999,999,999 bytes).
const MAX_COUNT_DIGITS: usize = 9;

impl Framer {
    pub fn new(max: usize) -> Framer {
        assert!(max > 0);
        Framer {
            buf: BytesMut::new(),
            max,
            skip: 0,
            skipped_len: 0,
        }
    }

    /// Adds bytes read from the stream; call `next_frame` until None.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if self.skip > 0 {
                if self.skip == usize::MAX {
                    match self.buf.iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            self.skipped_len += i;
                            self.buf.advance(i + 1);
                            self.skip = 0;
                        }
                        None => {
                            self.skipped_len += self.buf.len();
                            self.buf.clear();
                            return None;
                        }
                    }
                } else {
                    let n = self.skip.min(self.buf.len());
                    self.buf.advance(n);
                    self.skip -= n;
                    if self.skip > 0 {
                        return None;
                    }
                }
                continue;
            }
            if self.buf.is_empty() {
                return None;
            }
            let digits = self
                .buf
                .iter()
                .take(MAX_COUNT_DIGITS + 1)
                .take_while(|b| b.is_ascii_digit())
                .count();
            let counted = self.buf[0] != b'0' && digits > 0 && digits <= MAX_COUNT_DIGITS;
            if counted && digits == self.buf.len() {
                return None; // the count may go on in the next read
            }
            if counted && self.buf[digits] == b' ' {
                let len: usize = std::str::from_utf8(&self.buf[..digits])
                    .expect("digits")
                    .parse()
                    .expect("at most 9 digits");
                let start = digits + 1;
                if len <= self.max {
                    if self.buf.len() < start + len {
                        return None;
                    }
                    let data = self.buf[start..start + len].to_vec();
                    self.buf.advance(start + len);
                    return Some(Frame {
                        data,
                        truncated_from: None,
                    });
                }
                if self.buf.len() < start + self.max {
                    return None;
                }
                let data = self.buf[start..start + self.max].to_vec();
                self.buf.advance(start + self.max);
                self.skip = len - self.max;
                return Some(Frame {
                    data,
                    truncated_from: Some(len),
                });
            }
            match self.buf.iter().take(self.max + 1).position(|&b| b == b'\n') {
                Some(i) => {
                    let mut data = self.buf.split_to(i + 1).to_vec();
                    data.pop();
                    if data.last() == Some(&b'\r') {
                        data.pop();
                    }
                    if data.is_empty() {
                        continue; // a blank line is not a message
                    }
                    return Some(Frame {
                        data,
                        truncated_from: None,
                    });
                }
                None if self.buf.len() > self.max => {
                    let data = self.buf.split_to(self.max).to_vec();
                    self.skip = usize::MAX;
                    self.skipped_len = self.max;
                    // The length is known once the newline comes; report
                    // at least one byte more than kept.
                    return Some(Frame {
                        data,
                        truncated_from: Some(self.max + 1),
                    });
                }
                None => return None,
            }
        }
    }

    /// At the end of the stream: what is left, as a last message (a
    /// peer that closes without a final newline still sent it).
    pub fn finish(&mut self) -> Option<Frame> {
        if let Some(f) = self.next_frame() {
            return Some(f);
        }
        if self.skip > 0 || self.buf.is_empty() {
            self.buf.clear();
            return None;
        }
        let mut data = std::mem::take(&mut self.buf).to_vec();
        if data.last() == Some(&b'\r') {
            data.pop();
        }
        (!data.is_empty()).then_some(Frame {
            data,
            truncated_from: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 2026-11-30T03:00:00Z
    const NOW: i64 = 1_796_007_600_000_000_000;

    fn cx() -> Context<'static> {
        Context {
            now_ns: NOW,
            rfc3164_offset: FixedOffset::east_opt(0).unwrap(),
            peer_host: "10.0.0.9",
        }
    }

    fn ts(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_nanos_opt()
            .unwrap()
    }

    #[test]
    fn now_constant_is_the_date_it_claims() {
        assert_eq!(NOW, ts("2026-11-30T03:00:00Z"));
    }

    #[test]
    fn rfc5424_with_structured_data_parses_every_field() {
        let l = parse(
            br#"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog 42 ID47 [exampleSDID@32473 iut="3" eventSource="Appli\"cation\]" eventID="1011"][examplePriority@32473 class="high"] An application event"#,
            &cx(),
        );
        assert_eq!(l.parse_error, None);
        assert_eq!((l.facility, l.severity), (20, 5));
        assert_eq!(l.host, "mymachine.example.com");
        assert_eq!(l.app, "evntslog");
        assert_eq!(l.proc_id, "42");
        assert_eq!(l.msg_id, "ID47");
        assert_eq!(l.ts_ns, ts("2003-10-11T22:14:15.003Z"));
        assert_eq!(l.text, "An application event");
        assert_eq!(l.structured_data.len(), 2);
        assert_eq!(l.structured_data[0].id, "exampleSDID@32473");
        assert_eq!(
            l.structured_data[0].params,
            vec![
                ("iut".into(), "3".into()),
                ("eventSource".into(), "Appli\"cation]".into()),
                ("eventID".into(), "1011".into())
            ]
        );
        assert_eq!(
            l.structured_data[1].params,
            vec![("class".into(), "high".into())]
        );
    }

    #[test]
    fn rfc5424_nil_values_and_no_message_and_bom() {
        let l = parse(b"<34>1 - - - - - -", &cx());
        assert_eq!(l.parse_error, None);
        assert_eq!((l.host.as_str(), l.app.as_str(), l.ts_ns), ("", "", NOW));
        assert_eq!(l.text, "");
        let l = parse(
            "<34>1 2026-11-30T04:00:00+01:00 h a - - - \u{feff}hällo".as_bytes(),
            &cx(),
        );
        assert_eq!(l.parse_error, None);
        assert_eq!(l.text, "hällo");
        assert_eq!(l.ts_ns, NOW);
    }

    #[test]
    fn rfc3164_with_host_tag_and_pid() {
        let l = parse(
            b"<34>Oct 11 22:14:15 mymachine su[123]: 'su root' failed for lonvick",
            &cx(),
        );
        assert_eq!(l.parse_error, None);
        assert_eq!((l.facility, l.severity), (4, 2));
        assert_eq!(l.host, "mymachine");
        assert_eq!(l.app, "su");
        assert_eq!(l.proc_id, "123");
        assert_eq!(l.text, "'su root' failed for lonvick");
        assert_eq!(l.ts_ns, ts("2026-10-11T22:14:15Z"));
    }

    #[test]
    fn rfc3164_without_host_takes_the_peer_and_space_padded_day() {
        let l = parse(b"<13>Feb  5 01:02:03 kernel: link up", &cx());
        assert_eq!(l.parse_error, None);
        assert_eq!(l.host, "10.0.0.9");
        assert_eq!(l.app, "kernel");
        assert_eq!(l.text, "link up");
        // 2026-02-05 is 298 days before now, 2027-02-05 67 days after: the nearer wins.
        assert_eq!(l.ts_ns, ts("2027-02-05T01:02:03Z"));
    }

    #[test]
    fn rfc3164_year_rolls_over_at_new_year() {
        let mut c = cx();
        c.now_ns = ts("2027-01-01T00:00:05Z");
        let l = parse(b"<13>Dec 31 23:59:59 h app: late", &c);
        assert_eq!(l.ts_ns, ts("2026-12-31T23:59:59Z"));
        c.now_ns = ts("2026-12-31T23:59:58Z");
        let l = parse(b"<13>Jan  1 00:00:01 h app: early", &c);
        assert_eq!(l.ts_ns, ts("2027-01-01T00:00:01Z"));
    }

    #[test]
    fn rfc3164_time_is_read_in_the_configured_zone() {
        let mut c = cx();
        c.rfc3164_offset = FixedOffset::east_opt(3600).unwrap();
        let l = parse(b"<13>Nov 30 04:00:00 h app: x", &c);
        assert_eq!(l.ts_ns, NOW);
    }

    #[test]
    fn rfc3164_with_rfc3339_timestamp_and_no_tag() {
        let l = parse(b"<14>2026-11-30T03:00:00.5Z myhost hello world", &cx());
        assert_eq!(l.parse_error, None);
        assert_eq!(l.host, "myhost");
        assert_eq!(l.app, "");
        assert_eq!(l.text, "hello world");
        assert_eq!(l.ts_ns, NOW + 500_000_000);
    }

    #[test]
    fn garbage_is_kept_raw_and_flagged_with_the_reason() {
        for (raw, why) in [
            (&b"hello there"[..], "no <PRI>"),
            (b"<999>Oct 11 22:14:15 h a: x", "above 191"),
            (b"<13>not a date", "RFC 3164 timestamp"),
            (
                b"<13>1 2026-13-01T00:00:00Z h a - - - x",
                "RFC 5424 timestamp",
            ),
            (b"<13>1 - h a - - [broken x", "SD"),
            (b"<13>1 - h a - -", "STRUCTURED-DATA is missing"),
            (b"<1a>x", "not a number"),
            (b"", "no <PRI>"),
        ] {
            let l = parse(raw, &cx());
            let e = l.parse_error.unwrap_or_else(|| panic!("{raw:?} parsed"));
            assert!(e.contains(why), "{raw:?}: {e}");
            assert_eq!(l.text, String::from_utf8_lossy(raw));
            assert_eq!(l.host, "10.0.0.9");
            assert_eq!(l.ts_ns, NOW);
        }
        // The priority is kept when it was readable.
        let l = parse(b"<11>gibberish", &cx());
        assert_eq!((l.facility, l.severity), (1, 3));
        let l = parse(b"gibberish", &cx());
        assert_eq!((l.facility, l.severity), (1, 5));
    }

    fn frames(f: &mut Framer) -> Vec<Frame> {
        std::iter::from_fn(|| f.next_frame()).collect()
    }

    fn plain(data: &[u8]) -> Frame {
        Frame {
            data: data.to_vec(),
            truncated_from: None,
        }
    }

    #[test]
    fn framer_mixes_newline_and_octet_counted_frames() {
        let mut f = Framer::new(1024);
        f.push(b"<13>a\r\n9 <13>b\nc d\n\n<13>e\n5 <1>x");
        assert_eq!(
            frames(&mut f),
            vec![plain(b"<13>a"), plain(b"<13>b\nc d"), plain(b"<13>e")]
        );
        f.push(b"y");
        assert_eq!(frames(&mut f), vec![plain(b"<1>xy")]);
        f.push(b"<13>no newline");
        assert_eq!(frames(&mut f), vec![]);
        assert_eq!(f.finish(), Some(plain(b"<13>no newline")));
    }

    #[test]
    fn framer_truncates_oversized_frames_and_resyncs() {
        let mut f = Framer::new(5);
        f.push(b"10 0123456789<13>x\n<13>long line\n<1>\n");
        assert_eq!(
            frames(&mut f),
            vec![
                Frame {
                    data: b"01234".to_vec(),
                    truncated_from: Some(10)
                },
                plain(b"<13>x"),
                Frame {
                    data: b"<13>l".to_vec(),
                    truncated_from: Some(6)
                },
                plain(b"<1>"),
            ]
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_flags_or_parses(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let l = parse(&raw, &cx());
            prop_assert!(l.severity <= 7 && l.facility <= 23);
            if l.parse_error.is_some() {
                prop_assert_eq!(l.ts_ns, NOW);
            }
        }

        #[test]
        fn rfc5424_sd_values_survive_escaping(v in "[ -~]{0,40}", msg in "[ -~]{0,40}") {
            let escaped: String = v.chars().flat_map(|c| match c {
                '"' | '\\' | ']' => vec!['\\', c],
                c => vec![c],
            }).collect();
            let raw = format!("<14>1 - h a - - [x@1 k=\"{escaped}\"] {msg}");
            let l = parse(raw.as_bytes(), &cx());
            prop_assert_eq!(l.parse_error, None);
            prop_assert_eq!(&l.structured_data[0].params[0].1, &v);
            prop_assert_eq!(l.text, msg.trim_end_matches(['\n', '\r', '\0']));
        }

        /// However a stream of octet-counted and newline-framed messages
        /// is cut into reads, the same messages come out.
        #[test]
        fn framing_does_not_depend_on_read_boundaries(
            msgs in proptest::collection::vec(("<[0-9]{1,3}>[ -~]{0,30}", any::<bool>()), 1..20),
            cuts in proptest::collection::vec(1usize..17, 1..40),
        ) {
            let mut stream = Vec::new();
            for (m, counted) in &msgs {
                if *counted {
                    stream.extend_from_slice(format!("{} {m}", m.len()).as_bytes());
                } else {
                    stream.extend_from_slice(format!("{m}\n").as_bytes());
                }
            }
            let mut f = Framer::new(1024);
            let mut got = Vec::new();
            let mut rest = &stream[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                f.push(&rest[..n]);
                rest = &rest[n..];
                i += 1;
                got.extend(frames(&mut f).into_iter().map(|f| f.data));
            }
            got.extend(f.finish().map(|f| f.data));
            let want: Vec<Vec<u8>> = msgs.iter().map(|(m, _)| m.as_bytes().to_vec()).collect();
            prop_assert_eq!(got, want);
        }
    }
}
