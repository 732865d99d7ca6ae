//! The JSON object a record becomes in the file, stdout and tcp sinks,
//! written straight into a reused byte buffer: no `serde_json::Value` tree
//! and no formatted-string allocation per record (issue 9: at tens of
//! thousands of records a second those were most of a sink's cost).
//!
//! Keys, in this order: `stream`, `seq`, `kind`, `ts` (RFC 3339 UTC with
//! nanoseconds: the source timestamp, or the time the receiver wrote the
//! record for kinds without one), then the body's fields:
//! point `tag`, `value` (a non-finite float is `null`), `quality`, and
//! `status` when the point has one; message `topic`, `payload` (base64),
//! `retain`, `qos`, and `properties` (`[["name","value"],...]`) when it has
//! any and `origin` when it has one; log `facility`, `severity`, `host`,
//! `app`, `text`, `proc_id`, `msg_id`, and `structured_data`
//! (`{"id":[["name","value"],...],...}`) when it has any and `parse_error`
//! when it did not parse; bytes `data` (base64), `end`. Strings are escaped as
//! `serde_json` escapes them. The test module keeps the previous
//! `serde_json::Value` path as the oracle the writer is checked against.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::ser::{CompactFormatter, Formatter};
use weir_protocol::decoder::Delivered;
use weir_protocol::{RecordBody, Value};

/// Appends the record's JSON object (no newline) to `out`.
pub fn write_record(out: &mut Vec<u8>, r: &Delivered) {
    out.extend_from_slice(b"{\"stream\":");
    write_str(out, &r.stream);
    out.extend_from_slice(b",\"seq\":");
    write_u64(out, r.seq);
    out.extend_from_slice(b",\"kind\":\"");
    out.extend_from_slice(r.body.kind().as_bytes());
    out.extend_from_slice(b"\",\"ts\":\"");
    write_rfc3339_ns(out, r.body.timestamp_ns().unwrap_or_else(now_ns));
    out.push(b'"');
    match &r.body {
        RecordBody::Point(p) => {
            out.extend_from_slice(b",\"tag\":");
            write_str(out, &p.tag);
            out.extend_from_slice(b",\"value\":");
            match &p.value {
                Value::F64(f) if f.is_finite() => CompactFormatter
                    .write_f64(out, *f)
                    .expect("writing into a Vec cannot fail"),
                Value::F64(_) => out.extend_from_slice(b"null"),
                Value::I64(i) => CompactFormatter
                    .write_i64(out, *i)
                    .expect("writing into a Vec cannot fail"),
                Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
                Value::Str(s) => write_str(out, s),
            }
            out.extend_from_slice(b",\"quality\":");
            write_u64(out, p.quality.into());
            if let Some(status) = &p.status {
                out.extend_from_slice(b",\"status\":");
                write_str(out, status);
            }
        }
        RecordBody::Message(m) => {
            out.extend_from_slice(b",\"topic\":");
            write_str(out, &m.topic);
            out.extend_from_slice(b",\"payload\":");
            write_base64(out, &m.payload);
            out.extend_from_slice(b",\"retain\":");
            out.extend_from_slice(if m.retain { b"true" } else { b"false" });
            out.extend_from_slice(b",\"qos\":");
            write_u64(out, m.qos.into());
            if !m.properties.is_empty() {
                out.extend_from_slice(b",\"properties\":");
                write_pairs(out, &m.properties);
            }
            if let Some(origin) = &m.origin {
                out.extend_from_slice(b",\"origin\":");
                write_str(out, origin);
            }
        }
        RecordBody::Log(l) => {
            out.extend_from_slice(b",\"facility\":");
            write_u64(out, l.facility.into());
            out.extend_from_slice(b",\"severity\":");
            write_u64(out, l.severity.into());
            out.extend_from_slice(b",\"host\":");
            write_str(out, &l.host);
            out.extend_from_slice(b",\"app\":");
            write_str(out, &l.app);
            out.extend_from_slice(b",\"text\":");
            write_str(out, &l.text);
            out.extend_from_slice(b",\"proc_id\":");
            write_str(out, &l.proc_id);
            out.extend_from_slice(b",\"msg_id\":");
            write_str(out, &l.msg_id);
            if !l.structured_data.is_empty() {
                out.extend_from_slice(b",\"structured_data\":{");
                for (i, e) in l.structured_data.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_str(out, &e.id);
                    out.push(b':');
                    write_pairs(out, &e.params);
                }
                out.push(b'}');
            }
            if let Some(err) = &l.parse_error {
                out.extend_from_slice(b",\"parse_error\":");
                write_str(out, err);
            }
        }
        RecordBody::Bytes(c) => {
            out.extend_from_slice(b",\"data\":");
            write_base64(out, &c.data);
            out.extend_from_slice(b",\"end\":");
            out.extend_from_slice(if c.end { b"true" } else { b"false" });
        }
        RecordBody::File(f) => {
            out.extend_from_slice(b",\"transfer\":\"");
            write_hex(out, &f.transfer.to_be_bytes());
            out.extend_from_slice(b"\",\"path\":");
            write_str(out, &f.path);
            out.extend_from_slice(b",\"size\":");
            write_u64(out, f.size);
            out.extend_from_slice(b",\"mode\":");
            write_u64(out, f.mode.into());
            out.extend_from_slice(b",\"offset\":");
            write_u64(out, f.offset);
            out.extend_from_slice(b",\"data\":");
            write_base64(out, &f.data);
            if let Some(sha) = &f.sha256 {
                out.extend_from_slice(b",\"sha256\":\"");
                write_hex(out, sha);
                out.push(b'"');
            }
        }
    }
    out.push(b'}');
}

/// `[["name","value"],...]`.
fn write_pairs(out: &mut Vec<u8>, pairs: &[(String, String)]) {
    out.push(b'[');
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'[');
        write_str(out, k);
        out.push(b',');
        write_str(out, v);
        out.push(b']');
    }
    out.push(b']');
}

/// Nanoseconds since the Unix epoch now (negative before it).
pub fn now_ns() -> i64 {
    let ns = |d: std::time::Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => ns(d),
        Err(e) => -ns(e.duration()),
    }
}

fn write_u64(out: &mut Vec<u8>, v: u64) {
    CompactFormatter
        .write_u64(out, v)
        .expect("writing into a Vec cannot fail");
}

/// A JSON string with the escapes `serde_json` uses: `\"`, `\\`, the short
/// forms of backspace, form feed, newline, carriage return and tab, and
/// `\u00XX` for the other control characters. Everything else (non-ASCII
/// included) is copied as it is.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x00..=0x1f => b'u',
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        start = i + 1;
        if short == b'u' {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.extend_from_slice(&[b'\\', short]);
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Lower-case hex digits of `bytes` (not quoted).
fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
    }
}

/// A quoted standard base64 string (with padding), encoded in place.
fn write_base64(out: &mut Vec<u8>, data: &[u8]) {
    let len = base64::encoded_len(data.len(), true)
        .expect("a record held in memory has a base64 length within usize");
    out.push(b'"');
    let at = out.len();
    out.resize(at + len, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(data, &mut out[at..])
        .expect("the buffer was sized by encoded_len");
    debug_assert_eq!(written, len);
    out.push(b'"');
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ` for nanoseconds since the Unix epoch,
/// as chrono's `to_rfc3339_opts(SecondsFormat::Nanos, true)` writes it. An
/// `i64` of nanoseconds spans the years 1677 to 2262, so the year always
/// has four digits.
pub fn write_rfc3339_ns(out: &mut Vec<u8>, ts_ns: i64) {
    const NANOS_PER_SEC: i64 = 1_000_000_000;
    let secs = ts_ns.div_euclid(NANOS_PER_SEC);
    let nanos = ts_ns.rem_euclid(NANOS_PER_SEC) as u32;
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    debug_assert!((1677..=2262).contains(&year), "year {year} of {ts_ns} ns");
    let year = year as u32;
    let (h, mi, s) = (of_day / 3600, of_day / 60 % 60, of_day % 60);
    let digit = |v: u32| b'0' + (v % 10) as u8;
    let mut text = [
        digit(year / 1000),
        digit(year / 100),
        digit(year / 10),
        digit(year),
        b'-',
        digit(month / 10),
        digit(month),
        b'-',
        digit(day / 10),
        digit(day),
        b'T',
        digit(h / 10),
        digit(h),
        b':',
        digit(mi / 10),
        digit(mi),
        b':',
        digit(s / 10),
        digit(s),
        b'.',
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        b'Z',
    ];
    let mut n = nanos;
    for place in text[20..29].iter_mut().rev() {
        *place = digit(n);
        n /= 10;
    }
    out.extend_from_slice(&text);
}

/// (year, month 1-12, day 1-31) of a day count from 1970-01-01, by Howard
/// Hinnant's `civil_from_days` (proleptic Gregorian, exact for any `i64`
/// day count an `i64` of nanoseconds can reach).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u32; // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365
    let mp = (5 * doy + 2) / 153; // March-based month, 0..=11
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = i64::from(yoe) + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use std::sync::Arc;
    use weir_protocol::{Chunk, Log, Message, Point, SdElement};

    /// The previous path, kept as the oracle: a `serde_json::Value` per
    /// record, with chrono formatting the timestamp.
    fn record_json(r: &Delivered, now: &str) -> serde_json::Value {
        let b64 = base64::engine::general_purpose::STANDARD;
        let ts = r.body.timestamp_ns().map_or_else(
            || now.to_string(),
            |ns| {
                chrono::DateTime::from_timestamp_nanos(ns)
                    .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
            },
        );
        let mut v = json!({ "stream": &*r.stream, "seq": r.seq, "kind": r.body.kind(), "ts": ts });
        let obj = v.as_object_mut().expect("object");
        match &r.body {
            RecordBody::Point(p) => {
                obj.insert("tag".into(), json!(p.tag));
                let value = match &p.value {
                    Value::F64(f) => json!(f),
                    Value::I64(i) => json!(i),
                    Value::Bool(b) => json!(b),
                    Value::Str(s) => json!(s),
                };
                obj.insert("value".into(), value);
                obj.insert("quality".into(), json!(p.quality));
                if let Some(s) = &p.status {
                    obj.insert("status".into(), json!(s));
                }
            }
            RecordBody::Message(m) => {
                obj.insert("topic".into(), json!(m.topic));
                obj.insert("payload".into(), json!(b64.encode(&m.payload)));
                obj.insert("retain".into(), json!(m.retain));
                obj.insert("qos".into(), json!(m.qos));
                if !m.properties.is_empty() {
                    obj.insert("properties".into(), json!(m.properties));
                }
                if let Some(o) = &m.origin {
                    obj.insert("origin".into(), json!(o));
                }
            }
            RecordBody::Log(l) => {
                obj.insert("facility".into(), json!(l.facility));
                obj.insert("severity".into(), json!(l.severity));
                obj.insert("host".into(), json!(l.host));
                obj.insert("app".into(), json!(l.app));
                obj.insert("text".into(), json!(l.text));
                obj.insert("proc_id".into(), json!(l.proc_id));
                obj.insert("msg_id".into(), json!(l.msg_id));
                if !l.structured_data.is_empty() {
                    let sd: serde_json::Map<String, serde_json::Value> = l
                        .structured_data
                        .iter()
                        .map(|e| (e.id.clone(), json!(e.params)))
                        .collect();
                    obj.insert("structured_data".into(), serde_json::Value::Object(sd));
                }
                if let Some(e) = &l.parse_error {
                    obj.insert("parse_error".into(), json!(e));
                }
            }
            RecordBody::Bytes(c) => {
                obj.insert("data".into(), json!(b64.encode(&c.data)));
                obj.insert("end".into(), json!(c.end));
            }
            RecordBody::File(f) => {
                obj.insert("transfer".into(), json!(format!("{:016x}", f.transfer)));
                obj.insert("path".into(), json!(f.path));
                obj.insert("size".into(), json!(f.size));
                obj.insert("mode".into(), json!(f.mode));
                obj.insert("offset".into(), json!(f.offset));
                obj.insert("data".into(), json!(b64.encode(&f.data)));
                if let Some(sha) = &f.sha256 {
                    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
                    obj.insert("sha256".into(), json!(hex));
                }
            }
        }
        v
    }

    fn delivered(stream: &str, seq: u64, body: RecordBody) -> Delivered {
        Delivered {
            stream: Arc::from(stream),
            source_type: Arc::from("generator"),
            session: 1,
            epoch: 1,
            seq,
            resent: false,
            body,
        }
    }

    fn line(r: &Delivered) -> Vec<u8> {
        let mut out = Vec::new();
        write_record(&mut out, r);
        out
    }

    /// Strings with quotes, backslashes, every control character, DEL and
    /// multi-byte characters.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            ".*",
            "[\\x00-\\x1f\"\\\\\\x7f]{0,8}",
            proptest::collection::vec(any::<char>(), 0..12)
                .prop_map(|c| c.into_iter().collect::<String>()),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<f64>().prop_map(Value::F64),
            prop_oneof![
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(f64::NEG_INFINITY),
                Just(-0.0),
                Just(f64::MIN_POSITIVE),
                Just(f64::MAX),
                Just(5e-324),
            ]
            .prop_map(Value::F64),
            any::<i64>().prop_map(Value::I64),
            any::<bool>().prop_map(Value::Bool),
            text().prop_map(Value::Str),
        ]
    }

    fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec((text(), text()), 0..3)
    }

    /// Structured data with distinct ids (RFC 5424 allows an id once).
    fn sd() -> impl Strategy<Value = Vec<SdElement>> {
        proptest::collection::btree_map(text(), pairs(), 0..3).prop_map(|m| {
            m.into_iter()
                .map(|(id, params)| SdElement { id, params })
                .collect()
        })
    }

    fn body() -> impl Strategy<Value = RecordBody> {
        let ts = prop_oneof![
            any::<i64>(),
            Just(i64::MIN),
            Just(i64::MAX),
            Just(0i64),
            Just(-1i64),
            -1_000_000_000_000i64..1_000_000_000_000,
        ];
        prop_oneof![
            (
                text(),
                ts.clone(),
                value(),
                any::<u8>(),
                proptest::option::of(text())
            )
                .prop_map(|(tag, ts_ns, value, quality, status)| {
                    RecordBody::Point(Point {
                        tag,
                        ts_ns,
                        value,
                        quality,
                        status,
                    })
                }),
            (
                text(),
                proptest::collection::vec(any::<u8>(), 0..64),
                ts.clone(),
                any::<bool>(),
                0u8..3,
                pairs(),
                proptest::option::of(text())
            )
                .prop_map(
                    |(topic, payload, ts_ns, retain, qos, properties, origin)| {
                        RecordBody::Message(Message {
                            topic,
                            payload,
                            ts_ns,
                            retain,
                            qos,
                            properties,
                            origin,
                        })
                    }
                ),
            (
                (any::<u8>(), any::<u8>(), text(), text(), text(), ts.clone()),
                (text(), text(), sd(), proptest::option::of(text()))
            )
                .prop_map(
                    |(
                        (facility, severity, host, app, text, ts_ns),
                        (proc_id, msg_id, structured_data, parse_error),
                    )| {
                        RecordBody::Log(Box::new(Log {
                            facility,
                            severity,
                            host,
                            app,
                            text,
                            ts_ns,
                            proc_id,
                            msg_id,
                            structured_data,
                            parse_error,
                        }))
                    }
                ),
            (proptest::collection::vec(any::<u8>(), 0..64), any::<bool>())
                .prop_map(|(data, end)| RecordBody::Bytes(Chunk { data, end })),
            (
                (any::<u64>(), text(), any::<u64>(), ts, any::<u32>()),
                (
                    any::<u64>(),
                    proptest::collection::vec(any::<u8>(), 0..64),
                    proptest::option::of(any::<[u8; 32]>())
                )
            )
                .prop_map(
                    |((transfer, path, size, mtime_ns, mode), (offset, data, sha256))| {
                        RecordBody::File(Box::new(weir_protocol::FilePart {
                            transfer,
                            path,
                            size,
                            mtime_ns,
                            mode,
                            offset,
                            data,
                            sha256,
                        }))
                    }
                ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn the_direct_writer_parses_to_the_same_json_as_the_value_path(
            stream in text(),
            seq in any::<u64>(),
            body in body(),
        ) {
            let r = delivered(&stream, seq, body);
            let out = line(&r);
            let parsed: serde_json::Value = serde_json::from_slice(&out)
                .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&out))))?;
            // Kinds without a source timestamp are stamped with the time
            // they are written: compare that field's shape, then the rest.
            // The old path's output is its `Value` as text, parsed the same
            // way (serde_json's parser rounds some long floats by an ulp
            // either way, so text is compared to text).
            let now = parsed["ts"].as_str().expect("ts is a string").to_string();
            let old: serde_json::Value =
                serde_json::from_str(&record_json(&r, &now).to_string()).expect("old line parses");
            prop_assert_eq!(&parsed, &old);
            if r.body.timestamp_ns().is_none() {
                prop_assert!(chrono::DateTime::parse_from_rfc3339(&now).is_ok(), "{}", now);
            }
            // Same keys in the same order as before, too.
            let keys: Vec<&String> = parsed.as_object().expect("object").keys().collect();
            let old_keys: Vec<&String> = old.as_object().expect("object").keys().collect();
            prop_assert_eq!(keys, old_keys);
        }

        #[test]
        fn the_hand_formatted_timestamp_is_chronos_for_every_i64(ts in any::<i64>()) {
            let mut out = Vec::new();
            write_rfc3339_ns(&mut out, ts);
            let chrono = chrono::DateTime::from_timestamp_nanos(ts)
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            prop_assert_eq!(String::from_utf8(out).expect("ascii"), chrono);
        }
    }

    #[test]
    fn timestamps_at_the_edges_match_chrono() {
        let day = 86_400 * 1_000_000_000i64;
        let mut edges = vec![i64::MIN, i64::MAX, 0, -1, 1, day - 1, day, -day, -day - 1];
        // Leap days and century years either side of the epoch.
        for secs in [
            951_782_400i64, // 2000-02-29
            951_868_800,    // 2000-03-01
            -2_203_891_200, // 1900-03-01
            4_107_542_400,  // 2100-03-01
            -2_208_988_800, // 1900-01-01
            1_709_164_800,  // 2024-02-29
            -5_364_662_400, // 1800-01-01
            7_258_118_400,  // 2200-01-01
        ] {
            for d in [-1, 0, 1] {
                edges.push((secs + d) * 1_000_000_000 + 123);
            }
        }
        for ts in edges {
            let mut out = Vec::new();
            write_rfc3339_ns(&mut out, ts);
            let chrono = chrono::DateTime::from_timestamp_nanos(ts)
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            assert_eq!(String::from_utf8(out).unwrap(), chrono, "{ts}");
        }
    }

    #[test]
    fn a_point_becomes_the_documented_json_line() {
        let r = delivered(
            "plant/a",
            7,
            RecordBody::Point(Point {
                tag: "t1".into(),
                ts_ns: 1_500_000_000_123_456_789,
                value: Value::F64(2.5),
                quality: 0,
                status: None,
            }),
        );
        assert_eq!(
            String::from_utf8(line(&r)).unwrap(),
            r#"{"stream":"plant/a","seq":7,"kind":"point","ts":"2017-07-14T02:40:00.123456789Z","tag":"t1","value":2.5,"quality":0}"#
        );
    }

    #[test]
    fn a_message_payload_is_base64_and_a_nan_value_is_null() {
        let r = delivered(
            "m",
            1,
            RecordBody::Message(Message::new("a/b", b"hi".to_vec(), 0)),
        );
        let v: serde_json::Value = serde_json::from_slice(&line(&r)).unwrap();
        assert_eq!(v["topic"], "a/b");
        assert_eq!(v["payload"], "aGk=");
        let nan = delivered(
            "p",
            1,
            RecordBody::Point(Point {
                tag: "t".into(),
                ts_ns: 0,
                value: Value::F64(f64::NAN),
                quality: 0,
                status: None,
            }),
        );
        let v: serde_json::Value = serde_json::from_slice(&line(&nan)).unwrap();
        assert!(v["value"].is_null());
    }
}
