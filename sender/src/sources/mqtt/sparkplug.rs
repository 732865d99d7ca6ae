//! Sparkplug B: `spBv1.0/{group}/{type}/{edge node}[/{device}]` payloads
//! decoded into one [`Point`] per metric. Births (NBIRTH, DBIRTH) name the
//! metrics and give their aliases and datatypes; data (NDATA, DDATA) may
//! carry only aliases, resolved from the last birth of the same node or
//! device. A death (NDEATH, DDEATH) forgets the aliases of what died (an
//! NDEATH those of the node's devices too), so data after a death and
//! before the next birth cannot be resolved with stale names.

use std::collections::HashMap;

use prost::Message as _;
use weir_protocol::{Point, Value, QUALITY_BAD, QUALITY_GOOD, QUALITY_UNCERTAIN};

use super::sparkplug_b::{
    datatype, Metric, MetricValue, Payload, PropertyValue, PropertyValueKind,
};

/// The Sparkplug B topic namespace.
pub const NAMESPACE: &str = "spBv1.0";

/// Nodes and devices whose births are remembered at once. A plant has
/// hundreds to a few thousand; past this a new birth is not remembered
/// (counted as unknown aliases when its data comes) rather than growing
/// without bound on a misbehaving network.
const MAX_BIRTHS: usize = 65_536;

/// What a metric is known as after a birth: its name and datatype.
#[derive(Debug, Clone)]
struct Known {
    name: String,
    datatype: u32,
}

/// The metrics one birth announced: by alias, and the datatypes by name
/// (data that names a metric may leave its datatype out).
#[derive(Debug, Default)]
struct Birth {
    by_alias: HashMap<u64, Known>,
    datatype_by_name: HashMap<String, u32>,
}

/// (group, edge node, device or "" for the node itself).
type Key = (String, String, String);

/// Alias tables from the births seen so far.
#[derive(Debug, Default)]
pub struct Decoder {
    births: HashMap<Key, Birth>,
}

/// What one Sparkplug payload turned into.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    pub points: Vec<Point>,
    /// Carry the payload as a `Message` too: births, deaths, commands and
    /// state always; data when some metric could not become a point.
    pub keep_message: bool,
    /// Metrics whose alias no remembered birth defines.
    pub unknown_aliases: u64,
    /// Metrics with no point form (null, dataset, template, array, no value).
    pub unsupported: u64,
}

/// A topic in the Sparkplug namespace that is not a valid Sparkplug topic,
/// or a payload that is not a Sparkplug protobuf.
#[derive(Debug, PartialEq)]
pub struct Invalid(pub String);

impl Decoder {
    /// Decodes a message of `topic`; `None` when the topic is not in the
    /// Sparkplug namespace (the caller handles it as a plain message).
    /// `now_ns` stamps metrics when neither the metric nor the payload has
    /// a timestamp.
    pub fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        now_ns: i64,
    ) -> Option<Result<Decoded, Invalid>> {
        let mut parts = topic.split('/');
        if parts.next() != Some(NAMESPACE) {
            return None;
        }
        let parts: Vec<&str> = parts.collect();
        Some(self.decode_parts(&parts, payload, now_ns))
    }

    fn decode_parts(
        &mut self,
        parts: &[&str],
        payload: &[u8],
        now_ns: i64,
    ) -> Result<Decoded, Invalid> {
        let keep = Decoded {
            keep_message: true,
            ..Decoded::default()
        };
        // spBv1.0/STATE/{host id}: a host application's state.
        if parts.first() == Some(&"STATE") {
            return Ok(keep);
        }
        let (group, kind, edge, device) = match parts {
            [g, k, e] => (*g, *k, *e, ""),
            [g, k, e, d] => (*g, *k, *e, *d),
            _ => {
                return Err(Invalid(format!(
                    "topic is not spBv1.0/group/type/edge node[/device] ({} levels after spBv1.0)",
                    parts.len()
                )))
            }
        };
        if group.is_empty() || edge.is_empty() {
            return Err(Invalid("empty group or edge node id in topic".into()));
        }
        let device_kind = kind.starts_with('D');
        if device_kind == device.is_empty() {
            return Err(Invalid(format!(
                "{kind} {} a device id in the topic",
                if device_kind { "needs" } else { "takes no" }
            )));
        }
        let payload_msg = match kind {
            "NBIRTH" | "DBIRTH" | "NDATA" | "DDATA" | "NDEATH" | "DDEATH" => {
                Payload::decode(payload).map_err(|e| {
                    Invalid(format!("{kind} payload is not a Sparkplug B protobuf: {e}"))
                })?
            }
            // Commands to edge nodes and devices: carried as they are.
            "NCMD" | "DCMD" => return Ok(keep),
            other => return Err(Invalid(format!("unknown message type `{other}`"))),
        };
        let key: Key = (group.to_string(), edge.to_string(), device.to_string());
        match kind {
            "NDEATH" => {
                self.births.retain(|k, _| !(k.0 == key.0 && k.1 == key.1));
                return Ok(keep);
            }
            "DDEATH" => {
                self.births.remove(&key);
                return Ok(keep);
            }
            "NBIRTH" => {
                // A node's rebirth invalidates its devices' births too.
                self.births.retain(|k, _| !(k.0 == key.0 && k.1 == key.1));
            }
            _ => {}
        }
        let birth = kind.ends_with("BIRTH");
        if birth {
            let mut table = Birth::default();
            for m in &payload_msg.metrics {
                if let (Some(name), Some(dt)) = (&m.name, m.datatype) {
                    table.datatype_by_name.insert(name.clone(), dt);
                    if let Some(alias) = m.alias {
                        table.by_alias.insert(
                            alias,
                            Known {
                                name: name.clone(),
                                datatype: dt,
                            },
                        );
                    }
                }
            }
            if self.births.len() < MAX_BIRTHS || self.births.contains_key(&key) {
                self.births.insert(key.clone(), table);
            }
        }
        let prefix = if device.is_empty() {
            format!("{group}/{edge}/")
        } else {
            format!("{group}/{edge}/{device}/")
        };
        let default_ts = payload_msg.timestamp.and_then(ms_to_ns).unwrap_or(now_ns);
        let mut out = Decoded {
            keep_message: birth,
            ..Decoded::default()
        };
        let table = self.births.get(&key);
        for m in &payload_msg.metrics {
            let known = match (&m.name, m.alias) {
                (Some(name), _) => Some((
                    name.as_str(),
                    m.datatype
                        .or_else(|| table.and_then(|t| t.datatype_by_name.get(name).copied())),
                )),
                (None, Some(alias)) => table
                    .and_then(|t| t.by_alias.get(&alias))
                    .map(|k| (k.name.as_str(), m.datatype.or(Some(k.datatype)))),
                (None, None) => None,
            };
            let Some((name, dt)) = known else {
                out.unknown_aliases += 1;
                out.keep_message = true;
                continue;
            };
            match metric_value(m, dt) {
                Some((value, extra_status)) => {
                    let (quality, status) = quality(m);
                    out.points.push(Point {
                        tag: format!("{prefix}{name}"),
                        ts_ns: m.timestamp.and_then(ms_to_ns).unwrap_or(default_ts),
                        value,
                        quality,
                        status: status.or(extra_status),
                    });
                }
                None => {
                    out.unsupported += 1;
                    out.keep_message = true;
                }
            }
        }
        Ok(out)
    }
}

/// Milliseconds since the epoch to nanoseconds; None past i64 nanoseconds.
fn ms_to_ns(ms: u64) -> Option<i64> {
    i64::try_from(ms).ok()?.checked_mul(1_000_000)
}

/// The metric's value by its datatype (signed integers travel as two's
/// complement in the unsigned fields); None for what has no point form.
fn metric_value(m: &Metric, dt: Option<u32>) -> Option<(Value, Option<String>)> {
    if m.is_null == Some(true) {
        return None;
    }
    let dt = dt?;
    let value = match (m.value.as_ref()?, dt) {
        (MetricValue::IntValue(v), datatype::INT8) => Value::I64(*v as u8 as i8 as i64),
        (MetricValue::IntValue(v), datatype::INT16) => Value::I64(*v as u16 as i16 as i64),
        (MetricValue::IntValue(v), datatype::INT32) => Value::I64(*v as i32 as i64),
        (MetricValue::LongValue(v), datatype::INT8 | datatype::INT16 | datatype::INT32) => {
            Value::I64(*v as i64)
        }
        (MetricValue::LongValue(v), datatype::INT64) => Value::I64(*v as i64),
        (MetricValue::IntValue(v), datatype::INT64) => Value::I64(*v as i32 as i64),
        (
            MetricValue::IntValue(v),
            datatype::UINT8 | datatype::UINT16 | datatype::UINT32 | datatype::UINT64,
        ) => Value::I64(*v as i64),
        (
            MetricValue::LongValue(v),
            datatype::UINT8
            | datatype::UINT16
            | datatype::UINT32
            | datatype::UINT64
            | datatype::DATETIME,
        ) => match i64::try_from(*v) {
            Ok(v) => Value::I64(v),
            Err(_) => {
                return Some((
                    Value::F64(*v as f64),
                    Some(format!("uint64 {v} above the i64 range, carried as f64")),
                ))
            }
        },
        (MetricValue::FloatValue(v), datatype::FLOAT | datatype::DOUBLE) => Value::F64(*v as f64),
        (MetricValue::DoubleValue(v), datatype::FLOAT | datatype::DOUBLE) => Value::F64(*v),
        (MetricValue::BooleanValue(v), datatype::BOOLEAN) => Value::Bool(*v),
        (MetricValue::StringValue(v), datatype::STRING | datatype::TEXT | datatype::UUID) => {
            Value::Str(v.clone())
        }
        (MetricValue::BytesValue(v), datatype::BYTES) => {
            use base64::Engine;
            Value::Str(base64::engine::general_purpose::STANDARD.encode(v))
        }
        _ => return None,
    };
    Some((value, None))
}

/// The metric's `Quality` property (OPC DA quality: 192 good, 64
/// uncertain, 0 bad; other numbers by their top two bits) as weir's
/// quality, and a status that keeps the number when it is not 192.
fn quality(m: &Metric) -> (u8, Option<String>) {
    let Some(props) = &m.properties else {
        return (QUALITY_GOOD, None);
    };
    let Some(i) = props.keys.iter().position(|k| k == "Quality") else {
        return (QUALITY_GOOD, None);
    };
    let q = match props.values.get(i) {
        Some(PropertyValue {
            value: Some(PropertyValueKind::IntValue(q)),
            ..
        }) => *q as i32 as i64,
        Some(PropertyValue {
            value: Some(PropertyValueKind::LongValue(q)),
            ..
        }) => *q as i64,
        _ => {
            return (
                QUALITY_UNCERTAIN,
                Some("sparkplug quality property without an integer value".into()),
            )
        }
    };
    if q == 192 {
        return (QUALITY_GOOD, None);
    }
    let quality = match q & 0xC0 {
        0xC0 => QUALITY_GOOD,
        0x40 => QUALITY_UNCERTAIN,
        _ => QUALITY_BAD,
    };
    (quality, Some(format!("sparkplug quality {q}")))
}

#[cfg(test)]
mod tests {
    use super::super::sparkplug_b::PropertySet;
    use super::*;

    fn metric(name: Option<&str>, alias: Option<u64>, dt: Option<u32>, v: MetricValue) -> Metric {
        Metric {
            name: name.map(str::to_string),
            alias,
            datatype: dt,
            value: Some(v),
            ..Metric::default()
        }
    }

    fn payload(ts: u64, metrics: Vec<Metric>) -> Vec<u8> {
        Payload {
            timestamp: Some(ts),
            metrics,
            seq: Some(0),
            ..Payload::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn data_by_alias_resolves_to_the_names_and_datatypes_of_the_birth() {
        let mut d = Decoder::default();
        let birth = payload(
            1_000,
            vec![
                metric(
                    Some("Temp"),
                    Some(1),
                    Some(datatype::DOUBLE),
                    MetricValue::DoubleValue(20.5),
                ),
                metric(
                    Some("Count"),
                    Some(2),
                    Some(datatype::INT16),
                    MetricValue::IntValue(0xFFFF),
                ),
            ],
        );
        let out = d
            .decode("spBv1.0/G/DBIRTH/E/D", &birth, 5)
            .unwrap()
            .unwrap();
        assert!(out.keep_message, "a birth is carried as a message too");
        assert_eq!(out.points[0].tag, "G/E/D/Temp");
        assert_eq!(out.points[0].ts_ns, 1_000_000_000);
        assert_eq!(
            out.points[1].value,
            Value::I64(-1),
            "int16 two's complement"
        );
        let mut m = metric(None, Some(2), None, MetricValue::IntValue(7));
        m.timestamp = Some(2_000);
        let data = payload(
            1_500,
            vec![m, metric(None, Some(9), None, MetricValue::IntValue(1))],
        );
        let out = d.decode("spBv1.0/G/DDATA/E/D", &data, 5).unwrap().unwrap();
        assert_eq!(out.points.len(), 1);
        assert_eq!(
            (
                out.points[0].tag.as_str(),
                out.points[0].ts_ns,
                &out.points[0].value
            ),
            ("G/E/D/Count", 2_000_000_000, &Value::I64(7))
        );
        assert_eq!(out.unknown_aliases, 1, "alias 9 was never born");
        assert!(out.keep_message, "a payload with an unknown alias is kept");
        // After the node dies its devices' aliases are forgotten.
        d.decode("spBv1.0/G/NDEATH/E", &payload(3_000, vec![]), 5)
            .unwrap()
            .unwrap();
        let out = d.decode("spBv1.0/G/DDATA/E/D", &data, 5).unwrap().unwrap();
        assert_eq!((out.points.len(), out.unknown_aliases), (0, 2));
    }

    #[test]
    fn the_quality_property_maps_192_64_and_0_and_keeps_the_number() {
        let mut d = Decoder::default();
        let with_q = |q: u32| {
            let mut m = metric(
                Some("X"),
                None,
                Some(datatype::FLOAT),
                MetricValue::FloatValue(1.5),
            );
            m.properties = Some(PropertySet {
                keys: vec!["engUnit".into(), "Quality".into()],
                values: vec![
                    PropertyValue {
                        r#type: Some(12),
                        value: Some(PropertyValueKind::StringValue("C".into())),
                        ..PropertyValue::default()
                    },
                    PropertyValue {
                        r#type: Some(3),
                        value: Some(PropertyValueKind::IntValue(q)),
                        ..PropertyValue::default()
                    },
                ],
            });
            m
        };
        let out = d
            .decode(
                "spBv1.0/G/NDATA/E",
                &payload(1, vec![with_q(192), with_q(64), with_q(0)]),
                0,
            )
            .unwrap()
            .unwrap();
        let q: Vec<(u8, Option<&str>)> = out
            .points
            .iter()
            .map(|p| (p.quality, p.status.as_deref()))
            .collect();
        assert_eq!(
            q,
            [
                (QUALITY_GOOD, None),
                (QUALITY_UNCERTAIN, Some("sparkplug quality 64")),
                (QUALITY_BAD, Some("sparkplug quality 0"))
            ]
        );
        assert!(
            !out.keep_message,
            "plain data with every metric named is points only"
        );
    }

    #[test]
    fn garbage_and_bad_topics_are_invalid_and_foreign_topics_are_not_sparkplug() {
        let mut d = Decoder::default();
        assert!(d.decode("plant/a", b"x", 0).is_none());
        assert!(matches!(
            d.decode("spBv1.0/G/NDATA/E", &[0xff, 0xff, 0xff], 0),
            Some(Err(_))
        ));
        assert!(matches!(d.decode("spBv1.0/G/NDATA", b"", 0), Some(Err(_))));
        assert!(
            matches!(d.decode("spBv1.0/G/DDATA/E", b"", 0), Some(Err(_))),
            "DDATA needs a device"
        );
        assert!(matches!(
            d.decode("spBv1.0/G/XDATA/E", b"", 0),
            Some(Err(_))
        ));
        let state = d
            .decode("spBv1.0/STATE/host", b"ONLINE", 0)
            .unwrap()
            .unwrap();
        assert!(state.keep_message && state.points.is_empty());
    }

    #[test]
    fn nulls_and_unknown_datatypes_are_counted_not_pointed() {
        let mut d = Decoder::default();
        let mut null = metric(
            Some("N"),
            None,
            Some(datatype::INT32),
            MetricValue::IntValue(0),
        );
        null.is_null = Some(true);
        let odd = metric(Some("DS"), None, Some(16), MetricValue::IntValue(0));
        let out = d
            .decode("spBv1.0/G/NDATA/E", &payload(1, vec![null, odd]), 0)
            .unwrap()
            .unwrap();
        assert_eq!(
            (out.points.len(), out.unsupported, out.keep_message),
            (0, 2, true)
        );
    }
}
