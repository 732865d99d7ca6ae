//! The read-only status page at `/` on `[metrics] listen`: one
//! server-rendered HTML document with inline CSS and inline SVG charts, no
//! script, no form, nothing loaded from elsewhere (the endpoint also sends
//! a Content-Security-Policy that forbids it). Every string that came from
//! the link or the configuration (stream names, source types, tags,
//! hashes, sink names) goes through [`escape`]: the sender side is
//! untrusted from this page's point of view.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use crate::history::Sample;
use crate::status::{unix_now_ns, Board};

/// HTML-escapes text for element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#f6f7f9}\
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}\
table{border-collapse:collapse;background:#fff;margin-bottom:.5em}\
th,td{border:1px solid #d0d4da;padding:.25em .6em;text-align:left;vertical-align:top}\
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#eceff3}\
.ok{color:#116329;font-weight:600}.bad{color:#b3261e;font-weight:600}.warn{color:#8a5a00;font-weight:600}\
.muted{color:#5b636d}code{font-size:.95em;word-break:break-all}\
.charts{display:flex;flex-wrap:wrap;gap:1em}.chart{background:#fff;border:1px solid #d0d4da;padding:.4em}";

/// A Unix time in nanoseconds as UTC, to the second.
fn utc(ns: i64) -> String {
    chrono::DateTime::from_timestamp(ns.div_euclid(1_000_000_000), 0).map_or_else(
        || "?".into(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// Seconds as a short duration: 850 ms, 12.3 s, 4 min, 2.1 h.
fn duration(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// Renders the page from the board as it is now.
pub fn render(board: &Board) -> String {
    let latency = board.latency();
    let history = board.history.lock().unwrap_or_else(|p| p.into_inner());
    let samples = history.samples();
    let sink_recent: Vec<u64> = (0..board.sinks.len())
        .map(|i| history.recent_sink_errors(i))
        .collect();
    drop(history);
    let s = board.snapshot.lock().unwrap_or_else(|p| p.into_inner());
    let now = unix_now_ns();
    let mut o = String::with_capacity(16 * 1024);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>weir-receiver status</title><style>{STYLE}</style></head><body>\n\
         <h1>weir-receiver status</h1><p class=\"muted\">version {}, up {}, as of {} \
         (read-only; reload for fresh numbers; Prometheus text at <code>/metrics</code>)</p>\n",
        env!("CARGO_PKG_VERSION"),
        duration(board.started.elapsed().as_secs_f64()),
        utc(now)
    );

    // Sender and its configuration.
    let hb = &s.sender;
    o.push_str("<h2>Sender</h2><table>");
    match hb.last_heartbeat {
        None => o.push_str(
            "<tr><th>heartbeat</th><td class=\"bad\" id=\"sender-state\">none since this receiver started</td></tr>",
        ),
        Some(last) => {
            let (class, word) = if hb.silent {
                ("bad", "SILENT")
            } else {
                ("ok", "alive")
            };
            let _ = write!(
                o,
                "<tr><th>heartbeat</th><td class=\"{class}\" id=\"sender-state\">{word}, last {} ago</td></tr>",
                duration(last.elapsed().as_secs_f64())
            );
        }
    }
    if let Some(session) = hb.session {
        let _ = write!(
            o,
            "<tr><th>session</th><td><code>{session:016x}</code></td></tr>"
        );
    }
    if let Some(hash) = &hb.config_hash {
        let (class, verdict) = match hb.approved {
            Some(true) => ("ok", "approved"),
            Some(false) => ("bad", "NOT APPROVED"),
            None => ("muted", "not checked: no [approval] hashes"),
        };
        let _ = write!(
            o,
            "<tr><th>configuration</th><td><code id=\"config-hash\">{}</code> \
             <span class=\"{class}\" id=\"config-verdict\">{verdict}</span></td></tr>",
            escape(hash)
        );
    }
    if s.config_not_approved > 0 {
        let _ = write!(
            o,
            "<tr><th>not approved</th><td class=\"bad\">{} time(s) a new unapproved hash was seen (audit: config-not-approved)</td></tr>",
            s.config_not_approved
        );
    }
    o.push_str("</table>\n");
    if !hb.counters.is_empty() {
        o.push_str("<details><summary>the sender's counters, as its last heartbeat carried them</summary><table>");
        for (k, v) in &hb.counters {
            let _ = write!(o, "<tr><th>{}</th><td class=\"n\">{v}</td></tr>", escape(k));
        }
        o.push_str("</table></details>\n");
    }

    // Link health.
    let d = &s.decoder;
    let r = &board.recv;
    let rejected: u64 = d
        .fields()
        .iter()
        .filter(|(k, _)| k.starts_with("rejected_"))
        .map(|(_, v)| v)
        .sum::<u64>()
        + d.inconsistent_shards
        + d.bad_control;
    let lost = d.blocks_lost + d.blocks_missing;
    o.push_str("<h2>Link</h2><table>");
    for (name, value, class) in [
        (
            "datagrams received",
            r.datagrams.load(Ordering::Relaxed),
            "",
        ),
        ("bytes received", r.bytes.load(Ordering::Relaxed), ""),
        ("frames accepted", d.shards_accepted, ""),
        ("control frames", d.control_frames, ""),
        (
            "frames rejected (crc, authentication, malformed)",
            rejected,
            if rejected > 0 { "warn" } else { "" },
        ),
        ("blocks decoded", d.blocks_decoded, ""),
        ("blocks repaired by FEC", d.blocks_repaired, ""),
        ("shards rebuilt by FEC", d.shards_rebuilt, ""),
        ("blocks lost", lost, if lost > 0 { "bad" } else { "" }),
        ("records delivered", d.records, ""),
        (
            "records in gaps",
            d.gap_records,
            if d.gap_records > 0 { "bad" } else { "" },
        ),
    ] {
        let id = name.split(' ').take(2).collect::<Vec<_>>().join("-");
        let _ = write!(
            o,
            "<tr><th>{name}</th><td class=\"n {class}\" id=\"link-{id}\">{value}</td></tr>"
        );
    }
    let _ = writeln!(
        o,
        "<tr><th>most parity one block used</th><td class=\"n\">{} %</td></tr></table>",
        d.parity_used_max_pct
    );

    // Charts.
    o.push_str("<h2>Last hour</h2><div class=\"charts\">");
    let points = |f: &dyn Fn(&Sample) -> f64| -> Vec<(i64, f64)> {
        samples.iter().map(|x| (x.end_ns, f(x))).collect()
    };
    o.push_str(&chart(
        "throughput",
        "records/s",
        &points(&|x| x.records_per_second()),
        "#1f6feb",
        now,
    ));
    o.push_str(&chart(
        "fec-repairs",
        "blocks repaired by FEC per 10 s",
        &points(&|x| x.delta.blocks_repaired as f64 * 10.0 / x.seconds.max(1.0)),
        "#8250df",
        now,
    ));
    o.push_str(&chart(
        "loss",
        "records lost in gaps per 10 s",
        &points(&|x| x.delta.gap_records as f64 * 10.0 / x.seconds.max(1.0)),
        "#cf222e",
        now,
    ));
    o.push_str("</div>\n");

    // The stream catalogue.
    o.push_str(
        "<h2>Streams</h2><table id=\"streams\"><tr><th>stream</th><th>source</th><th>records</th>\
         <th>last seq</th><th>tags</th><th>records/s</th><th>first seen</th><th>last seen</th>\
         <th>latency p50</th><th>latency p99</th><th>open gaps</th></tr>",
    );
    for e in &s.catalogue {
        let last_seq = s
            .streams
            .get(&e.name)
            .and_then(|row| row.last_seq)
            .map_or_else(|| "-".into(), |q| q.to_string());
        let lat = latency.get(&e.name);
        let q = |p: f64| {
            lat.and_then(|l| l.quantile(p))
                .map_or_else(|| "-".into(), duration)
        };
        let open: u64 = s
            .open_gaps
            .iter()
            .filter(|(st, _, _)| *st == e.name)
            .map(|(_, f, t)| t.saturating_sub(*f).saturating_add(1))
            .sum();
        let _ = write!(
            o,
            "<tr><td><code>{}</code></td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{last_seq}</td>\
             <td class=\"n\">{}{}</td><td class=\"n\">{:.1}</td><td>{}</td><td>{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n{}\">{}</td></tr>",
            escape(&e.name),
            escape(&e.source_type),
            e.records,
            if e.tags_saturated { "&ge; " } else { "" },
            e.tags,
            e.rate,
            e.first_seen_ns.map_or_else(|| "-".into(), utc),
            e.last_seen_ns.map_or_else(|| "-".into(), utc),
            q(0.5),
            q(0.99),
            if open > 0 { " bad" } else { "" },
            if open > 0 { open.to_string() } else { "-".into() },
        );
    }
    o.push_str("</table>");
    if s.catalogue.is_empty() {
        o.push_str("<p class=\"muted\">no records delivered since this receiver started</p>");
    }
    if s.not_catalogued > 0 {
        let _ = write!(
            o,
            "<p class=\"warn\">{} records of streams past the catalogue's bound are not shown</p>",
            s.not_catalogued
        );
    }
    o.push_str("<p class=\"muted\">latency: from each record's source timestamp to a sink's confirmation, since this receiver started; tags: distinct point tags or message topics</p>\n");

    // Open gaps.
    o.push_str("<h2>Open gaps</h2>");
    if s.open_gaps.is_empty() {
        o.push_str("<p class=\"ok\" id=\"open-gaps\">none: no gap is waiting for a resend</p>");
    } else {
        o.push_str("<table id=\"open-gaps\"><tr><th>stream</th><th>from</th><th>to</th><th>records</th></tr>");
        for (stream, from, to) in &s.open_gaps {
            let _ = write!(
                o,
                "<tr><td><code>{}</code></td><td class=\"n\">{from}</td><td class=\"n\">{to}</td><td class=\"n\">{}</td></tr>",
                escape(stream),
                to.saturating_sub(*from).saturating_add(1)
            );
        }
        o.push_str("</table>");
        if s.open_gaps_total > s.open_gaps.len() as u64 {
            let _ = write!(
                o,
                "<p class=\"muted\">{} more; <code>weir-receiver gaps --config FILE</code> lists all</p>",
                s.open_gaps_total - s.open_gaps.len() as u64
            );
        }
    }
    if !s.gaps.is_empty() {
        o.push_str(
            "<table><tr><th>gaps since start, by cause</th><th>gaps</th><th>records</th></tr>",
        );
        for (cause, (n, records)) in &s.gaps {
            let _ = write!(
                o,
                "<tr><td>{}</td><td class=\"n\">{n}</td><td class=\"n\">{records}</td></tr>",
                escape(cause)
            );
        }
        o.push_str("</table>");
    }

    // Sinks.
    o.push_str(
        "\n<h2>Sinks</h2><table id=\"sinks\"><tr><th>sink</th><th>health</th><th>records</th>\
         <th>lag records</th><th>lag</th><th>errors</th><th>retries</th><th>dead letters</th></tr>",
    );
    for (i, sink) in board.sinks.iter().enumerate() {
        let lag = s.sink_lag.get(&sink.name).cloned().unwrap_or_default();
        let recent = sink_recent.get(i).copied().unwrap_or(0);
        let (class, health) = if recent > 0 {
            (
                "bad",
                format!("failing: {recent} errors in the last minute"),
            )
        } else if lag.seconds > 10.0 {
            ("warn", "behind".to_string())
        } else {
            ("ok", "ok".to_string())
        };
        let st = &sink.stats;
        let _ = write!(
            o,
            "<tr><td><code>{}</code></td><td class=\"{class}\">{health}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&sink.name),
            st.records.load(Ordering::Relaxed),
            lag.entries,
            duration(lag.seconds),
            st.errors.load(Ordering::Relaxed),
            st.retries.load(Ordering::Relaxed),
            st.dead_letters.load(Ordering::Relaxed),
        );
    }
    o.push_str("</table>\n<p class=\"muted\">journal: ");
    let _ = writeln!(
        o,
        "{} bytes, {} fsyncs (longest {} ms, {} slow), {} corrupt entries skipped; audit write errors: {}</p>\n</body></html>",
        s.journal_bytes,
        s.journal_fsyncs,
        s.journal_fsync_max_us / 1000,
        s.journal_slow_fsyncs,
        s.journal_corrupt_entries,
        s.audit_errors
    );
    o
}

/// Chart size in SVG units.
const W: f64 = 480.0;
const H: f64 = 140.0;
/// Left margin for the scale's label, bottom margin for the time axis.
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 18.0;

/// One inline SVG line chart of the last hour (`points`: (Unix ns, value),
/// oldest first), scaled to its largest value.
fn chart(id: &str, title: &str, points: &[(i64, f64)], color: &str, now_ns: i64) -> String {
    let max = points.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let top = if max > 0.0 { nice_ceiling(max) } else { 1.0 };
    let (pw, ph) = (W - LEFT - 4.0, H - BOTTOM - 8.0);
    let x = |t: i64| {
        let age = (now_ns.saturating_sub(t)) as f64 / 1e9;
        LEFT + pw * (1.0 - (age / 3600.0).clamp(0.0, 1.0))
    };
    let y = |v: f64| 8.0 + ph * (1.0 - (v / top).clamp(0.0, 1.0));
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<div class=\"chart\"><div><b>{title}</b> <span class=\"muted\">max {}</span></div>\
         <svg id=\"chart-{id}\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{title}, last hour\">\
         <rect x=\"{LEFT}\" y=\"8\" width=\"{pw}\" height=\"{ph}\" fill=\"#fbfbfc\" stroke=\"#d0d4da\"/>",
        short(max)
    );
    for frac in [0.25, 0.5, 0.75] {
        let gy = 8.0 + ph * frac;
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{gy:.1}\" x2=\"{:.1}\" y2=\"{gy:.1}\" stroke=\"#eceff3\"/>",
            LEFT + pw
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{:.1}\" y=\"16\" font-size=\"10\" text-anchor=\"end\" fill=\"#5b636d\">{}</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\" fill=\"#5b636d\">0</text>\
         <text x=\"{LEFT}\" y=\"{:.1}\" font-size=\"10\" fill=\"#5b636d\">-60 min</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#5b636d\">-30 min</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\" fill=\"#5b636d\">now</text>",
        LEFT - 4.0,
        short(top),
        LEFT - 4.0,
        8.0 + ph,
        H - 4.0,
        LEFT + pw / 2.0,
        H - 4.0,
        LEFT + pw,
        H - 4.0
    );
    if !points.is_empty() {
        let line: Vec<String> = points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let first = x(points[0].0);
        let last = x(points[points.len() - 1].0);
        let _ = write!(
            svg,
            "<polygon points=\"{first:.1},{:.1} {} {last:.1},{:.1}\" fill=\"{color}\" fill-opacity=\"0.15\"/>\
             <polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"/>",
            8.0 + ph,
            line.join(" "),
            8.0 + ph,
            line.join(" ")
        );
        for (t, v) in points.iter().filter(|p| p.1 > 0.0).take(400) {
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.8\" fill=\"{color}\"/>",
                x(*t),
                y(*v)
            );
        }
    } else {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\" fill=\"#5b636d\">no samples yet</text>",
            LEFT + pw / 2.0,
            8.0 + ph / 2.0
        );
    }
    svg.push_str("</svg></div>");
    svg
}

/// The next 1, 2 or 5 times a power of ten at or above `v`.
fn nice_ceiling(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

/// A number for an axis label: 950, 12k, 3.4M.
fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::catalogue::StreamEntry;
    use crate::delivery::SinkShared;

    fn board_with(stream: &str, hash: &str, sink: &str) -> Board {
        let board = Board::new(Default::default(), vec![Arc::new(SinkShared::new(sink, 0))]);
        board.update(|s| {
            s.catalogue = vec![StreamEntry {
                name: stream.to_string(),
                source_type: "<b>mqtt</b>".to_string(),
                records: 42,
                tags: 3,
                tags_saturated: false,
                rate: 1.5,
                first_seen_ns: Some(1_700_000_000_000_000_000),
                last_seen_ns: Some(1_700_000_100_000_000_000),
            }];
            s.open_gaps = vec![(stream.to_string(), 5, 9)];
            s.open_gaps_total = 1;
            s.sender.config_hash = Some(hash.to_string());
            s.sender.approved = Some(false);
            s.sender.session = Some(7);
            s.sender.last_heartbeat = Some(std::time::Instant::now());
        });
        board
    }

    #[test]
    fn a_hostile_stream_name_hash_and_sink_name_are_escaped_not_rendered() {
        let evil = "<script>alert(1)</script>\"><img src=x onerror=alert(2)>&";
        let page = render(&board_with(
            evil,
            &format!("{evil}hash"),
            &format!("{evil}sink"),
        ));
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("<b>mqtt"), "source types are escaped too");
        assert!(page.contains(
            "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(2)&gt;&amp;"
        ));
        assert!(page.contains("&lt;b&gt;mqtt&lt;/b&gt;"));
        // No active content at all: the page is static HTML and SVG.
        for forbidden in [
            "<form", "<script", "<link", "<iframe", " src=\"", "http://", "https://",
        ] {
            assert!(!page.contains(forbidden), "{forbidden} in {page}");
        }
    }

    #[test]
    fn the_page_shows_the_catalogue_gaps_sender_verdict_and_sinks() {
        let page = render(&board_with("plant/gen", "abc123", "files"));
        assert!(page.contains("<code>plant/gen</code>"));
        assert!(page.contains(">NOT APPROVED<"));
        assert!(page.contains("<code id=\"config-hash\">abc123</code>"));
        assert!(
            page.contains("2023-11-14 22:13:20 UTC"),
            "first seen in UTC"
        );
        assert!(page.contains("<code>files</code>"));
        assert!(page.contains("id=\"chart-throughput\""));
        // The open gap 5..=9 is five records, in its table and the stream's row.
        assert!(page.contains("<td class=\"n\">5</td><td class=\"n\">9</td><td class=\"n\">5</td>"));
    }

    #[test]
    fn chart_scales_round_up_to_one_two_or_five() {
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(130.0), 200.0);
        assert_eq!(nice_ceiling(4100.0), 5000.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
        assert_eq!(short(12_345.0), "12k");
    }
}
