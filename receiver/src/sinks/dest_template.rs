//! A destination name built from a record: the `subject` of the `nats` sink
//! and the `topic` of the `kafka` sink. Fixed text with placeholders:
//! `{stream}` (the stream name) and `{key}` (a point's tag, a message's
//! MQTT topic, the stream name for other kinds); `{tag}` and `{topic}` are
//! other spellings of `{key}`. A value's characters the destination does
//! not allow are mapped by [`Destination`] (see each sink).
//!
//! Also the payload `format` both sinks share, and the record's key name.

use serde::{Deserialize, Serialize};
use weir_protocol::decoder::Delivered;
use weir_protocol::RecordBody;

use super::json_line;

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Stream,
    Key,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Reads `text`; the error names the unknown placeholder or the
    /// unclosed brace (the caller prefixes the key).
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("`{text}` has a `{{` without its `}}`"))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "stream" => Part::Stream,
                "key" | "tag" | "topic" => Part::Key,
                _ => {
                    return Err(format!(
                        "`{{{name}}}` in `{text}` is not a placeholder; use {{stream}}, {{key}}, {{tag}} or {{topic}}"
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{text}` has a `}}` without its `{{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("is empty".into());
        }
        Ok(Template { parts })
    }

    /// True when every record gets the same destination.
    pub fn is_fixed(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The fixed text before the first placeholder.
    pub fn prefix(&self) -> &str {
        match self.parts.first() {
            Some(Part::Text(t)) => t,
            _ => "",
        }
    }

    /// The destination of `r`: fixed text as written, each placeholder's
    /// value through `map` (which makes it legal for the destination).
    pub fn render(&self, r: &Delivered, map: impl Fn(&str, &mut String)) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Stream => map(&r.stream, &mut out),
                Part::Key => map(key_name(r), &mut out),
            }
        }
        out
    }
}

/// A point's tag, a message's MQTT topic, or the stream name.
pub fn key_name(r: &Delivered) -> &str {
    match &r.body {
        RecordBody::Point(p) => &p.tag,
        RecordBody::Message(m) => &m.topic,
        _ => &r.stream,
    }
}

/// What a published record carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The JSON object the file sink writes (`stream`, `seq`, `kind`, ...).
    #[default]
    Json,
    /// A message's payload and a bytes record's data as they are; points
    /// and logs as the JSON object.
    Raw,
}

/// The payload of `r` in `format`, into `out` (cleared first).
pub fn payload(out: &mut Vec<u8>, r: &Delivered, format: Format) {
    out.clear();
    match (&r.body, format) {
        (RecordBody::Message(m), Format::Raw) => out.extend_from_slice(&m.payload),
        (RecordBody::Bytes(b), Format::Raw) => out.extend_from_slice(&b.data),
        _ => json_line::write_record(out, r),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn record(body: RecordBody) -> Delivered {
        Delivered {
            stream: "plant/line1".into(),
            source_type: "generator".into(),
            session: 1,
            epoch: 3,
            seq: 7,
            resent: false,
            body,
        }
    }

    pub fn point(tag: &str) -> RecordBody {
        RecordBody::Point(weir_protocol::Point {
            tag: tag.into(),
            ts_ns: 1_700_000_000_000_000_000,
            value: weir_protocol::Value::F64(1.5),
            quality: 192,
            status: None,
        })
    }

    #[test]
    fn placeholders_take_the_stream_and_the_tag_or_topic() {
        let t = Template::parse("it.{stream}.{tag}").unwrap();
        assert!(!t.is_fixed());
        assert_eq!(t.prefix(), "it.");
        let same = |s: &str, out: &mut String| out.push_str(s);
        assert_eq!(t.render(&record(point("G/T")), same), "it.plant/line1.G/T");
        let m = weir_protocol::Message::new("a/b", vec![1], 0);
        assert_eq!(
            Template::parse("{topic}")
                .unwrap()
                .render(&record(RecordBody::Message(m)), same),
            "a/b"
        );
        assert!(Template::parse("fixed").unwrap().is_fixed());
        for bad in ["", "a.{nope}", "a.{stream", "a}"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn raw_format_keeps_message_payloads_and_json_is_the_file_sinks_object() {
        let mut out = Vec::new();
        let m = weir_protocol::Message::new("a/b", vec![0, 255], 0);
        payload(
            &mut out,
            &record(RecordBody::Message(m.clone())),
            Format::Raw,
        );
        assert_eq!(out, [0, 255]);
        let r = record(RecordBody::Message(m));
        payload(&mut out, &r, Format::Json);
        let mut file = Vec::new();
        json_line::write_record(&mut file, &r);
        assert_eq!(out, file);
        payload(&mut out, &record(point("t")), Format::Raw);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!((v["seq"].as_u64(), v["tag"].as_str()), (Some(7), Some("t")));
    }
}
