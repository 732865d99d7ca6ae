//! The optional JSON mapping of an `mqtt` source: a payload that is a JSON
//! document becomes a [`Point`], its value and timestamp found by JSON
//! pointers (RFC 6901). A payload that does not map (not JSON, the pointer
//! finds nothing, a value that is an object, array or null, a timestamp
//! that does not read) stays a `Message`; the caller counts it.

use serde::{Deserialize, Serialize};
use weir_protocol::{Point, Value, QUALITY_GOOD};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonMap {
    /// JSON pointer to the value: a number (integers stay integers), a
    /// boolean or a string.
    pub value: String,
    /// JSON pointer to the timestamp; without it the receive time is used.
    /// A string is read as RFC 3339, a number as `timestamp_unit` since the
    /// Unix epoch.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// `s`, `ms` (the default), `us` or `ns`: the unit of a numeric timestamp.
    #[serde(default = "default_unit")]
    pub timestamp_unit: String,
    /// The point's tag; `{topic}` in it is replaced by the message's topic.
    #[serde(default = "default_tag")]
    pub tag: String,
}

fn default_unit() -> String {
    "ms".into()
}

fn default_tag() -> String {
    "{topic}".into()
}

impl JsonMap {
    pub fn validate(&self) -> Result<(), String> {
        for (key, p) in [
            ("json.value", Some(&self.value)),
            ("json.timestamp", self.timestamp.as_ref()),
        ] {
            if let Some(p) = p {
                if !(p.is_empty() || p.starts_with('/')) {
                    return Err(format!(
                        "{key}: `{p}` is not a JSON pointer; it starts with `/` (e.g. \"/value\"), or is \"\" for the whole document"
                    ));
                }
            }
        }
        if self.unit_ns().is_none() {
            return Err(format!(
                "json.timestamp_unit: `{}` is not one of `s`, `ms`, `us`, `ns`",
                self.timestamp_unit
            ));
        }
        if self.tag.is_empty() {
            return Err("json.tag: is empty; use \"{topic}\" for the message's topic".into());
        }
        Ok(())
    }

    fn unit_ns(&self) -> Option<i64> {
        Some(match self.timestamp_unit.as_str() {
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" => 1_000,
            "ns" => 1,
            _ => return None,
        })
    }

    /// The point for `payload` of `topic`, or why it does not map.
    pub fn map(&self, topic: &str, payload: &[u8], now_ns: i64) -> Result<Point, String> {
        let doc: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
        let value = match doc.pointer(&self.value) {
            None => return Err(format!("no value at JSON pointer `{}`", self.value)),
            Some(serde_json::Value::Number(n)) => match n.as_i64() {
                Some(i) => Value::I64(i),
                None => Value::F64(n.as_f64().ok_or("a number out of range")?),
            },
            Some(serde_json::Value::Bool(b)) => Value::Bool(*b),
            Some(serde_json::Value::String(s)) => Value::Str(s.clone()),
            Some(other) => {
                return Err(format!(
                    "the value at `{}` is {}, not a number, boolean or string",
                    self.value,
                    kind(other)
                ))
            }
        };
        let ts_ns = match &self.timestamp {
            None => now_ns,
            Some(p) => match doc.pointer(p) {
                None => return Err(format!("no timestamp at JSON pointer `{p}`")),
                Some(serde_json::Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
                    .ok()
                    .and_then(|t| t.timestamp_nanos_opt())
                    .ok_or_else(|| format!("the timestamp `{s}` at `{p}` is not RFC 3339"))?,
                Some(serde_json::Value::Number(n)) => {
                    let unit = self.unit_ns().expect("validated");
                    let ns = match n.as_i64() {
                        Some(i) => i.checked_mul(unit),
                        None => n
                            .as_f64()
                            .map(|f| f * unit as f64)
                            .filter(|f| f.is_finite() && f.abs() < i64::MAX as f64)
                            .map(|f| f as i64),
                    };
                    ns.ok_or_else(|| format!("the timestamp {n} at `{p}` is out of range"))?
                }
                Some(other) => {
                    return Err(format!(
                        "the timestamp at `{p}` is {}, not a string or number",
                        kind(other)
                    ))
                }
            },
        };
        Ok(Point {
            tag: self.tag.replace("{topic}", topic),
            ts_ns,
            value,
            quality: QUALITY_GOOD,
            status: None,
        })
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(ts: Option<&str>, unit: &str) -> JsonMap {
        JsonMap {
            value: "/v".into(),
            timestamp: ts.map(str::to_string),
            timestamp_unit: unit.into(),
            tag: "site/{topic}".into(),
        }
    }

    #[test]
    fn values_and_timestamps_are_read_by_pointer_in_each_unit_and_rfc3339() {
        let m = map(Some("/t"), "ms");
        let p = m
            .map("a/b", br#"{"v": 21, "t": 1700000000123}"#, 9)
            .unwrap();
        assert_eq!(
            (p.tag.as_str(), p.value, p.ts_ns),
            ("site/a/b", Value::I64(21), 1_700_000_000_123_000_000)
        );
        let p = m
            .map("a", br#"{"v": 2.5, "t": "2023-11-14T22:13:20.5Z"}"#, 9)
            .unwrap();
        assert_eq!(
            (p.value, p.ts_ns),
            (Value::F64(2.5), 1_700_000_000_500_000_000)
        );
        let p = map(Some("/t"), "s")
            .map("a", br#"{"v": true, "t": 2}"#, 9)
            .unwrap();
        assert_eq!((p.value, p.ts_ns), (Value::Bool(true), 2_000_000_000));
        let p = map(None, "ms").map("a", br#"{"v": "on"}"#, 9).unwrap();
        assert_eq!((p.value, p.ts_ns), (Value::Str("on".into()), 9));
    }

    #[test]
    fn what_does_not_map_says_why() {
        let m = map(Some("/t"), "ms");
        assert!(m
            .map("a", b"\xff\x00", 0)
            .unwrap_err()
            .starts_with("not JSON"));
        assert!(m
            .map("a", br#"{"x": 1}"#, 0)
            .unwrap_err()
            .contains("no value"));
        assert!(m
            .map("a", br#"{"v": {}, "t": 1}"#, 0)
            .unwrap_err()
            .contains("an object"));
        assert!(m
            .map("a", br#"{"v": 1, "t": "yesterday"}"#, 0)
            .unwrap_err()
            .contains("RFC 3339"));
        assert!(m
            .map("a", br#"{"v": 1, "t": 1e300}"#, 0)
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn bad_pointers_and_units_are_refused_naming_the_key() {
        let mut m = map(Some("t"), "ms");
        assert!(m.validate().unwrap_err().starts_with("json.timestamp:"));
        m.timestamp = None;
        m.timestamp_unit = "days".into();
        assert!(m
            .validate()
            .unwrap_err()
            .starts_with("json.timestamp_unit:"));
    }
}
