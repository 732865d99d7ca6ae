//! `weir-receiver gaps`: the records the audit log still names as missing.
//!
//! Every `gap` range stays open until `recovered` events of the same stream
//! cover it; a recovery of part of a gap splits it. Sequence numbers restart
//! at each `sequence-reset` (the sender lost its sequence state: a new epoch), so a recovery only
//! applies to gaps reported since the last reset of its stream: before that
//! the same numbers named other records.
//!
//! A `gap-resolved` event (a `files` sink completed a file whose transfer
//! had lost those records, from a resend under new sequence numbers)
//! closes the open gaps it covers the same way, but they are not
//! forgotten: the records of the original stream really were lost, so they
//! are kept as resolved, with the resolution (`resolved by resend of FILE
//! at TIME`), and `gaps --all` lists them.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// A range of one stream's records that has not arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenGap {
    pub stream: String,
    pub from: u64,
    /// Inclusive.
    pub to: u64,
    pub cause: String,
    /// When the gap was first reported (a split piece keeps its gap's time).
    pub at: String,
}

impl OpenGap {
    pub fn records(&self) -> u64 {
        self.to - self.from + 1
    }
}

/// A gap (or a piece of one) whose records are not needed any more: what
/// they carried arrived another way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedGap {
    pub gap: OpenGap,
    /// As the `gap-resolved` event says: `resolved by resend of FILE at TIME`.
    pub resolution: String,
}

/// The open gaps of every stream, built by applying audit events in order.
#[derive(Debug, Default)]
pub struct Ledger {
    streams: HashMap<String, StreamGaps>,
}

#[derive(Debug, Default)]
struct StreamGaps {
    /// Gaps from before the stream's last `sequence-reset`: no recovery
    /// can name them any more.
    earlier: Vec<OpenGap>,
    /// Gaps since the last reset, which `recovered` and `gap-resolved`
    /// events apply to.
    current: Vec<OpenGap>,
    /// Pieces of gaps closed by `gap-resolved` events.
    resolved: Vec<ResolvedGap>,
}

fn field<'a>(event: &'a Value, key: &str) -> Result<&'a Value, String> {
    event.get(key).ok_or_else(|| format!("lacks `{key}`"))
}

fn str_field(event: &Value, key: &str) -> Result<String, String> {
    field(event, key)?
        .as_str()
        .map(String::from)
        .ok_or_else(|| format!("`{key}` is not a string"))
}

fn seq_field(event: &Value, key: &str) -> Result<u64, String> {
    field(event, key)?
        .as_u64()
        .ok_or_else(|| format!("`{key}` is not a sequence number"))
}

/// `(from, to)` of an event, checked to be a non-empty inclusive range.
fn range(event: &Value) -> Result<(u64, u64), String> {
    let (from, to) = (seq_field(event, "from")?, seq_field(event, "to")?);
    if from > to {
        return Err(format!("`from` {from} is after `to` {to}"));
    }
    Ok((from, to))
}

/// `gap` minus `from..=to`: zero, one or two pieces; the piece taken out,
/// if any.
fn subtract(gap: OpenGap, from: u64, to: u64, out: &mut Vec<OpenGap>) -> Option<OpenGap> {
    if to < gap.from || from > gap.to {
        out.push(gap);
        return None;
    }
    let taken = OpenGap {
        from: gap.from.max(from),
        to: gap.to.min(to),
        ..gap.clone()
    };
    if gap.from < from {
        out.push(OpenGap {
            to: from - 1,
            ..gap.clone()
        });
    }
    if to < gap.to {
        out.push(OpenGap {
            from: to + 1,
            ..gap
        });
    }
    Some(taken)
}

impl Ledger {
    /// Applies one audit line. Events other than `gap`, `recovered`,
    /// `gap-resolved` and `sequence-reset` are ignored; a malformed one of
    /// those is an error, because skipping it could hide a loss.
    pub fn apply(&mut self, event: &Value) -> Result<(), String> {
        match event.get("event").and_then(Value::as_str) {
            Some("gap") => {
                let (from, to) = range(event)?;
                let gap = OpenGap {
                    stream: str_field(event, "stream")?,
                    from,
                    to,
                    cause: str_field(event, "cause")?,
                    at: str_field(event, "at")?,
                };
                self.streams
                    .entry(gap.stream.clone())
                    .or_default()
                    .current
                    .push(gap);
            }
            Some("recovered") => {
                let (from, to) = range(event)?;
                let stream = str_field(event, "stream")?;
                if let Some(s) = self.streams.get_mut(&stream) {
                    let mut open = Vec::with_capacity(s.current.len() + 1);
                    for gap in s.current.drain(..) {
                        subtract(gap, from, to, &mut open);
                    }
                    s.current = open;
                }
            }
            Some("gap-resolved") => {
                let (from, to) = range(event)?;
                let stream = str_field(event, "stream")?;
                let resolution = str_field(event, "resolution")?;
                if let Some(s) = self.streams.get_mut(&stream) {
                    let mut open = Vec::with_capacity(s.current.len() + 1);
                    for gap in s.current.drain(..) {
                        if let Some(gap) = subtract(gap, from, to, &mut open) {
                            s.resolved.push(ResolvedGap {
                                gap,
                                resolution: resolution.clone(),
                            });
                        }
                    }
                    s.current = open;
                }
            }
            Some("sequence-reset") => {
                let stream = str_field(event, "stream")?;
                if let Some(s) = self.streams.get_mut(&stream) {
                    let current = std::mem::take(&mut s.current);
                    s.earlier.extend(current);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Open gaps sorted by stream, then `from`, then when reported.
    pub fn open_gaps(&self) -> Vec<OpenGap> {
        let mut all: Vec<OpenGap> = self
            .streams
            .values()
            .flat_map(|s| s.earlier.iter().chain(&s.current).cloned())
            .collect();
        all.sort_by(|a, b| (&a.stream, a.from, &a.at, a.to).cmp(&(&b.stream, b.from, &b.at, b.to)));
        all
    }

    /// Gaps closed by `gap-resolved` events, sorted as [`Self::open_gaps`].
    pub fn resolved_gaps(&self) -> Vec<ResolvedGap> {
        let mut all: Vec<ResolvedGap> = self
            .streams
            .values()
            .flat_map(|s| s.resolved.iter().cloned())
            .collect();
        all.sort_by(|a, b| {
            let (a, b) = (&a.gap, &b.gap);
            (&a.stream, a.from, &a.at, a.to).cmp(&(&b.stream, b.from, &b.at, b.to))
        });
        all
    }
}

/// The open gaps of an audit log, and whether it ended in a partial line
/// (which is skipped: the receiver may be writing it right now).
pub fn scan(reader: impl BufRead) -> Result<(Vec<OpenGap>, bool)> {
    let (ledger, torn) = scan_ledger(reader)?;
    Ok((ledger.open_gaps(), torn))
}

/// The ledger of an audit log (open and resolved gaps), and whether it
/// ended in a partial line.
pub fn scan_ledger(mut reader: impl BufRead) -> Result<(Ledger, bool)> {
    let mut ledger = Ledger::default();
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            return Ok((ledger, false));
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            return Ok((ledger, true));
        }
        let event: Value = serde_json::from_slice(&buf[..buf.len() - 1])
            .map_err(|e| anyhow::anyhow!("line {line_no}: not JSON ({e})"))?;
        if let Err(why) = ledger.apply(&event) {
            let name = event.get("event").and_then(Value::as_str).unwrap_or("?");
            bail!("line {line_no}: {name} event {why}");
        }
    }
}

/// `weir-receiver gaps --config FILE [--json] [--all]`: the open gaps;
/// with `all`, the resolved ones too (each with its resolution).
pub fn print_open_gaps(config: &Path, as_json: bool, all: bool) -> Result<()> {
    let loaded = crate::config::load(config)?;
    let path = &loaded.config.audit.path;
    let file = std::fs::File::open(path)
        .with_context(|| format!("audit.path: cannot open {}", path.display()))?;
    let (ledger, torn) = scan_ledger(std::io::BufReader::new(file))
        .with_context(|| format!("reading audit log {}", path.display()))?;
    if torn {
        eprintln!(
            "weir-receiver: {}: the last line is incomplete and was skipped (a write in progress, or cut short)",
            path.display()
        );
    }
    let (gaps, resolved) = (ledger.open_gaps(), ledger.resolved_gaps());
    let text = if as_json {
        if gaps.is_empty() {
            eprintln!("weir-receiver: no open gaps");
        }
        let line = |g: &OpenGap, resolution: Option<&str>| {
            let mut v = json!({ "stream": g.stream, "from": g.from, "to": g.to, "records": g.records(), "cause": g.cause, "at": g.at });
            if all {
                v["resolved"] = json!(resolution);
            }
            v.to_string() + "\n"
        };
        let mut out: String = gaps.iter().map(|g| line(g, None)).collect();
        if all {
            out.extend(resolved.iter().map(|r| line(&r.gap, Some(&r.resolution))));
        }
        out
    } else {
        table(&gaps, &resolved, all)
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(())
}

/// The open gaps as a table; with `all`, the resolved ones too, in a
/// RESOLVED column (`open` for the others). Without it, a last line counts
/// the resolved ones left out.
fn table(gaps: &[OpenGap], resolved: &[ResolvedGap], all: bool) -> String {
    let resolved_records: u64 = resolved.iter().map(|r| r.gap.records()).sum();
    let left_out = if resolved.is_empty() || all {
        String::new()
    } else {
        format!(
            "{} resolved gaps ({resolved_records} records, completed by a file resend) not listed; --all lists them\n",
            resolved.len()
        )
    };
    if gaps.is_empty() && (resolved.is_empty() || !all) {
        return format!("no open gaps\n{left_out}");
    }
    let mut header = vec![
        "STREAM",
        "FROM",
        "TO",
        "RECORDS",
        "CAUSE",
        "FIRST REPORTED AT",
    ];
    if all {
        header.push("RESOLVED");
    }
    let row = |g: &OpenGap, resolution: &str| {
        let mut cells = vec![
            g.stream.clone(),
            g.from.to_string(),
            g.to.to_string(),
            g.records().to_string(),
            g.cause.clone(),
            g.at.clone(),
        ];
        if all {
            cells.push(resolution.to_string());
        }
        cells
    };
    let mut rows: Vec<(&OpenGap, Vec<String>)> = gaps.iter().map(|g| (g, row(g, "open"))).collect();
    if all {
        rows.extend(
            resolved
                .iter()
                .map(|r| (&r.gap, row(&r.gap, &r.resolution))),
        );
        rows.sort_by(|(a, _), (b, _)| {
            (&a.stream, a.from, &a.at, a.to).cmp(&(&b.stream, b.from, &b.at, b.to))
        });
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for (_, cells) in &rows {
        for (w, cell) in widths.iter_mut().zip(cells) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: &[&str]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            // Numbers right-aligned, text left-aligned.
            let cell = if (1..=3).contains(&i) {
                format!("{cell:>w$}", w = widths[i])
            } else {
                format!("{cell:<w$}", w = widths[i])
            };
            line.push_str(&cell);
            line.push_str("  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_row(&header);
    for (_, cells) in &rows {
        push_row(&cells.iter().map(String::as_str).collect::<Vec<_>>());
    }
    let total: u64 = gaps.iter().map(OpenGap::records).sum();
    out.push_str(&format!("{} open gaps, {total} records\n", gaps.len()));
    if all && !resolved.is_empty() {
        out.push_str(&format!(
            "{} resolved gaps, {resolved_records} records\n",
            resolved.len()
        ));
    }
    out.push_str(&left_out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(stream: &str, from: u64, to: u64, at: &str) -> Value {
        json!({ "event": "gap", "stream": stream, "from": from, "to": to, "cause": "link-loss", "at": at })
    }

    fn recovered(stream: &str, from: u64, to: u64) -> Value {
        json!({ "event": "recovered", "stream": stream, "from": from, "to": to, "at": "t9" })
    }

    fn open(events: &[Value]) -> Vec<(String, u64, u64)> {
        let mut ledger = Ledger::default();
        for e in events {
            ledger.apply(e).unwrap();
        }
        ledger
            .open_gaps()
            .into_iter()
            .map(|g| (g.stream, g.from, g.to))
            .collect()
    }

    fn r(stream: &str, from: u64, to: u64) -> (String, u64, u64) {
        (stream.to_string(), from, to)
    }

    #[test]
    fn a_gap_without_recovery_stays_open() {
        assert_eq!(open(&[gap("a", 10, 19, "t1")]), [r("a", 10, 19)]);
    }

    #[test]
    fn a_recovery_inside_a_gap_splits_it_and_keeps_cause_and_time() {
        let mut ledger = Ledger::default();
        ledger.apply(&gap("a", 10, 19, "t1")).unwrap();
        ledger.apply(&recovered("a", 12, 14)).unwrap();
        let gaps = ledger.open_gaps();
        assert_eq!(
            gaps.iter().map(|g| (g.from, g.to)).collect::<Vec<_>>(),
            [(10, 11), (15, 19)]
        );
        assert!(gaps.iter().all(|g| g.at == "t1" && g.cause == "link-loss"));
        assert_eq!(gaps[0].records() + gaps[1].records(), 7);
    }

    #[test]
    fn recoveries_at_either_edge_trim_and_a_full_one_closes() {
        assert_eq!(
            open(&[gap("a", 10, 19, "t1"), recovered("a", 5, 12)]),
            [r("a", 13, 19)]
        );
        assert_eq!(
            open(&[gap("a", 10, 19, "t1"), recovered("a", 19, 30)]),
            [r("a", 10, 18)]
        );
        assert_eq!(open(&[gap("a", 10, 19, "t1"), recovered("a", 10, 19)]), []);
        assert_eq!(
            open(&[gap("a", 10, 19, "t1"), recovered("a", 0, u64::MAX)]),
            []
        );
        assert_eq!(
            open(&[gap("a", 10, 10, "t1"), recovered("a", 11, 20)]),
            [r("a", 10, 10)]
        );
    }

    #[test]
    fn one_recovery_can_span_several_gaps() {
        assert_eq!(
            open(&[
                gap("a", 10, 19, "t1"),
                gap("a", 30, 39, "t2"),
                gap("a", 50, 59, "t3"),
                recovered("a", 15, 52),
            ]),
            [r("a", 10, 14), r("a", 53, 59)]
        );
    }

    #[test]
    fn recoveries_apply_only_to_their_own_stream() {
        assert_eq!(
            open(&[
                gap("b", 0, 9, "t1"),
                gap("a", 0, 9, "t2"),
                recovered("a", 0, 4),
                recovered("c", 0, 9),
                gap("b", 20, 29, "t3"),
            ]),
            [r("a", 5, 9), r("b", 0, 9), r("b", 20, 29)]
        );
    }

    #[test]
    fn a_recovery_does_not_cover_a_gap_reported_after_it() {
        assert_eq!(
            open(&[recovered("a", 0, 9), gap("a", 0, 9, "t1")]),
            [r("a", 0, 9)]
        );
    }

    #[test]
    fn a_sequence_reset_keeps_earlier_gaps_out_of_reach_of_later_recoveries() {
        let reset = json!({ "event": "sequence-reset", "stream": "a", "last_delivered": 99, "first_seq": 0, "at": "t2" });
        assert_eq!(
            open(&[
                gap("a", 10, 19, "t1"),
                reset,
                gap("a", 12, 13, "t3"),
                recovered("a", 10, 19),
            ]),
            [r("a", 10, 19)]
        );
    }

    #[test]
    fn other_events_are_ignored_and_malformed_gaps_are_errors() {
        assert_eq!(
            open(&[
                json!({ "event": "receiver-start", "at": "t0" }),
                gap("a", 1, 1, "t1")
            ]),
            [r("a", 1, 1)]
        );
        let mut ledger = Ledger::default();
        assert_eq!(
            ledger.apply(&json!({ "event": "gap", "stream": "a", "from": 1, "cause": "link-loss", "at": "t" })),
            Err("lacks `to`".into())
        );
        assert!(ledger.apply(&gap("a", 5, 4, "t")).is_err());
        assert!(ledger.apply(&recovered("a", 5, 4)).is_err());
    }

    #[test]
    fn scan_reads_lines_skips_a_torn_tail_and_names_a_bad_line() {
        let text = format!(
            "{}\n{}\n{}\n{{\"event\":\"gap\",\"str",
            gap("b", 5, 5, "t1"),
            gap("a", 10, 19, "t2"),
            recovered("a", 12, 14)
        );
        let (gaps, torn) = scan(text.as_bytes()).unwrap();
        assert!(torn);
        assert_eq!(
            gaps.iter()
                .map(|g| (g.stream.as_str(), g.from, g.to))
                .collect::<Vec<_>>(),
            [("a", 10, 11), ("a", 15, 19), ("b", 5, 5)]
        );
        let err = scan(&b"{\"event\":\"receiver-start\"}\nnot json\n"[..]).unwrap_err();
        assert!(err.to_string().starts_with("line 2: not JSON"), "{err}");
        let err = scan(&b"{\"event\":\"gap\",\"stream\":\"a\"}\n"[..]).unwrap_err();
        assert_eq!(err.to_string(), "line 1: gap event lacks `from`");
    }

    #[test]
    fn the_table_aligns_columns_and_totals_records() {
        let gaps = vec![
            OpenGap {
                stream: "plant/gen".into(),
                from: 10,
                to: 11,
                cause: "link-loss".into(),
                at: "2026-01-01T00:00:00Z".into(),
            },
            OpenGap {
                stream: "x".into(),
                from: 100000,
                to: 100000,
                cause: "receiver-down".into(),
                at: "2026-01-01T00:00:01Z".into(),
            },
        ];
        assert_eq!(
            table(&gaps, &[], false),
            "STREAM       FROM      TO  RECORDS  CAUSE          FIRST REPORTED AT\n\
             plant/gen      10      11        2  link-loss      2026-01-01T00:00:00Z\n\
             x          100000  100000        1  receiver-down  2026-01-01T00:00:01Z\n\
             2 open gaps, 3 records\n"
        );
        assert_eq!(table(&[], &[], false), "no open gaps\n");
    }

    fn resolved_by(stream: &str, from: u64, to: u64, file: &str) -> Value {
        json!({ "event": "gap-resolved", "stream": stream, "from": from, "to": to, "file": file,
                "resolution": format!("resolved by resend of {file} at t8"), "at": "t8" })
    }

    #[test]
    fn a_gap_resolved_by_a_file_resend_is_no_longer_open_but_is_kept_as_resolved_with_its_resolution(
    ) {
        let mut ledger = Ledger::default();
        for e in [
            gap("a", 10, 19, "t1"),
            gap("a", 30, 39, "t2"),
            gap("b", 10, 19, "t3"),
            // The file's transfer held records 15..=32 of stream a.
            resolved_by("a", 15, 32, "report.bin"),
            // Nothing open there: nothing resolved.
            resolved_by("c", 0, 9, "other.bin"),
        ] {
            ledger.apply(&e).unwrap();
        }
        let open: Vec<_> = ledger
            .open_gaps()
            .into_iter()
            .map(|g| (g.stream, g.from, g.to))
            .collect();
        assert_eq!(open, [r("a", 10, 14), r("a", 33, 39), r("b", 10, 19)]);
        let resolved = ledger.resolved_gaps();
        assert_eq!(
            resolved
                .iter()
                .map(|x| (
                    x.gap.from,
                    x.gap.to,
                    x.gap.at.as_str(),
                    x.resolution.as_str()
                ))
                .collect::<Vec<_>>(),
            [
                (15, 19, "t1", "resolved by resend of report.bin at t8"),
                (30, 32, "t2", "resolved by resend of report.bin at t8")
            ]
        );
        // A later recovery of a resolved range changes nothing.
        ledger.apply(&recovered("a", 15, 19)).unwrap();
        assert_eq!(ledger.resolved_gaps().len(), 2);
        assert_eq!(
            ledger.apply(
                &json!({ "event": "gap-resolved", "stream": "a", "from": 1, "to": 2, "at": "t" })
            ),
            Err("lacks `resolution`".into())
        );
    }

    #[test]
    fn the_table_leaves_resolved_gaps_out_unless_asked_and_then_names_their_resolution() {
        let mut ledger = Ledger::default();
        for e in [
            gap("a", 10, 19, "t1"),
            gap("a", 30, 39, "t2"),
            resolved_by("a", 0, 25, "report.bin"),
        ] {
            ledger.apply(&e).unwrap();
        }
        let (open, resolved) = (ledger.open_gaps(), ledger.resolved_gaps());
        assert_eq!(
            table(&open, &resolved, false),
            "STREAM  FROM  TO  RECORDS  CAUSE      FIRST REPORTED AT\n\
             a         30  39       10  link-loss  t2\n\
             1 open gaps, 10 records\n\
             1 resolved gaps (10 records, completed by a file resend) not listed; --all lists them\n"
        );
        assert_eq!(
            table(&open, &resolved, true),
            "STREAM  FROM  TO  RECORDS  CAUSE      FIRST REPORTED AT  RESOLVED\n\
             a         10  19       10  link-loss  t1                 resolved by resend of report.bin at t8\n\
             a         30  39       10  link-loss  t2                 open\n\
             1 open gaps, 10 records\n\
             1 resolved gaps, 10 records\n"
        );
        ledger
            .apply(&resolved_by("a", 30, 39, "second.bin"))
            .unwrap();
        let (open, resolved) = (ledger.open_gaps(), ledger.resolved_gaps());
        assert_eq!(
            table(&open, &resolved, false),
            "no open gaps\n2 resolved gaps (20 records, completed by a file resend) not listed; --all lists them\n"
        );
    }
}
