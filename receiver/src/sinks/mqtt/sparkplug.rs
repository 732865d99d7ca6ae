//! The mqtt sink's Sparkplug B edge node (Eclipse Sparkplug 3.0): with
//! `sparkplug = { group = "G", node = "N" }`, points are published as
//! Sparkplug B instead of JSON. Each stream is a device (its name with
//! `/`, `+` and `#` made `_`); each tag is a metric of it.
//!
//! Per connection: the will is an NDEATH carrying this connection's
//! `bdSeq` (QoS 1, as the spec asks); the first publish is an NBIRTH (`seq`
//! 0) with the same `bdSeq` and `Node Control/Rebirth`, then a DBIRTH per
//! device known so far with every metric's last value. A point of a new
//! device, a new metric or a metric whose datatype changed is published
//! as a DBIRTH of its device (every metric, with aliases and datatypes);
//! any other point as a DDATA that names its metric by alias only. `seq`
//! counts every NBIRTH/DBIRTH/DDATA of a connection modulo 256; `bdSeq`
//! counts connections modulo 256. Births and data are QoS 0 and not
//! retained, as the spec requires. Each metric carries its point's
//! timestamp (ms) and a `Quality` property (192 good).
//!
//! Commands: a host's NCMD with `Node Control/Rebirth` = true asks for the
//! births again on the same connection (`rebirth`: NBIRTH `seq` 0 with the
//! will's `bdSeq`, the DBIRTHs with the last values). Every other NCMD
//! metric and every DCMD is named as ignored: the sink is the IT end of a
//! one-way diode and has no way to write to the plant.
//!
//! Pure: the sink publishes what this returns.

use std::collections::{BTreeMap, HashMap};

use prost::Message as _;
use serde::{Deserialize, Serialize};
use weir_protocol::{Point, Value};

#[path = "../../../../sender/src/sources/mqtt/sparkplug_b.rs"]
#[allow(dead_code)] // the structs are shared with the sender's source
mod sparkplug_b;

use sparkplug_b::{
    datatype, Metric, MetricValue, Payload, PropertySet, PropertyValue, PropertyValueKind,
};

/// Most metrics one sink keeps (names, aliases, last values: the births
/// carry them all); a point that would add one more is dead-lettered.
pub const MAX_METRICS: usize = 100_000;

/// `sparkplug = { group = "...", node = "..." }` of an mqtt sink.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The Sparkplug group id.
    pub group: String,
    /// This sink's edge node id.
    pub node: String,
}

/// A Sparkplug id: not empty, none of `/ + #`.
fn check_id(key: &str, id: &str) -> Result<(), String> {
    if id.is_empty() || id.contains(['/', '+', '#', '\0']) {
        return Err(format!(
            "sparkplug.{key}: `{id}` must be a non-empty id without `/`, `+` or `#` (Sparkplug topic ids)"
        ));
    }
    Ok(())
}

impl Config {
    pub fn check(&self) -> Result<(), String> {
        check_id("group", &self.group)?;
        check_id("node", &self.node)
    }

    /// The topic filters of the commands a host may send this node: its
    /// NCMD and its devices' DCMDs.
    pub fn command_filters(&self) -> [String; 2] {
        [
            format!("spBv1.0/{}/NCMD/{}", self.group, self.node),
            format!("spBv1.0/{}/DCMD/{}/+", self.group, self.node),
        ]
    }

    /// What a command published on `topic` asks of this node. Only `Node
    /// Control/Rebirth` = true on the NCMD topic is acted on; everything
    /// else is named in `ignored` (a diode sink cannot write to the plant).
    /// An error says why the payload is not a Sparkplug B command.
    pub fn command(&self, topic: &str, payload: &[u8]) -> Result<Command, String> {
        let ncmd = topic == format!("spBv1.0/{}/NCMD/{}", self.group, self.node);
        let device = topic
            .strip_prefix(&format!("spBv1.0/{}/DCMD/{}/", self.group, self.node))
            .filter(|d| !d.is_empty() && !d.contains('/'));
        if !ncmd && device.is_none() {
            return Err(format!(
                "topic `{topic}` is not this node's NCMD or a DCMD of its devices"
            ));
        }
        let payload =
            Payload::decode(payload).map_err(|e| format!("not a Sparkplug B payload ({e})"))?;
        let mut command = Command::default();
        for m in &payload.metrics {
            let name = match (&m.name, m.alias) {
                (Some(n), _) => n.clone(),
                (None, Some(a)) => format!("alias {a}"),
                (None, None) => "a metric without name or alias".into(),
            };
            let rebirth = m.name.as_deref() == Some(REBIRTH);
            match device {
                Some(d) => command.ignored.push(format!("DCMD {name} of device {d}")),
                None if rebirth && m.value == Some(MetricValue::BooleanValue(true)) => {
                    command.rebirth = true;
                }
                None if rebirth => command.ignored.push(format!(
                    "NCMD {REBIRTH} = {} (only true asks for a rebirth)",
                    m.value
                        .as_ref()
                        .map_or("no value".into(), |v| format!("{v:?}"))
                )),
                None => command.ignored.push(format!("NCMD {name}")),
            }
        }
        if payload.metrics.is_empty() {
            let kind = if ncmd { "NCMD" } else { "DCMD" };
            command.ignored.push(format!("{kind} without metrics"));
        }
        Ok(command)
    }
}

/// One publish the edge node makes.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
}

struct MetricState {
    name: String,
    alias: u64,
    datatype: u32,
    value: MetricValue,
    ts_ms: u64,
    quality: u8,
}

struct Device {
    /// The stream this device stands for (two streams may not share one).
    stream: String,
    metrics: Vec<MetricState>,
    by_name: HashMap<String, usize>,
}

pub struct Edge {
    cfg: Config,
    /// This connection's bdSeq; the next connection's is one more.
    bd_seq: u64,
    connections: u64,
    /// The next message's seq.
    seq: u64,
    devices: BTreeMap<String, Device>,
    next_alias: u64,
    metrics: usize,
}

/// The device id of a stream.
pub fn device_id(stream: &str) -> String {
    stream.replace(['/', '+', '#', '\0'], "_")
}

fn metric_of(p: &Point) -> (u32, MetricValue) {
    match &p.value {
        Value::F64(v) => (datatype::DOUBLE, MetricValue::DoubleValue(*v)),
        // Signed integers travel as two's complement in the uint64 field.
        Value::I64(v) => (datatype::INT64, MetricValue::LongValue(*v as u64)),
        Value::Bool(v) => (datatype::BOOLEAN, MetricValue::BooleanValue(*v)),
        Value::Str(v) => (datatype::STRING, MetricValue::StringValue(v.clone())),
    }
}

fn ts_ms(ns: i64) -> u64 {
    u64::try_from(ns.div_euclid(1_000_000)).unwrap_or(0)
}

fn quality_property(q: u8) -> PropertySet {
    PropertySet {
        keys: vec!["Quality".into()],
        values: vec![PropertyValue {
            r#type: Some(datatype::INT32),
            is_null: None,
            value: Some(PropertyValueKind::IntValue(u32::from(q))),
        }],
    }
}

impl Edge {
    pub fn new(cfg: Config) -> Edge {
        Edge {
            cfg,
            bd_seq: 0,
            connections: 0,
            seq: 0,
            devices: BTreeMap::new(),
            next_alias: 1,
            metrics: 0,
        }
    }

    fn topic(&self, kind: &str, device: Option<&str>) -> String {
        match device {
            Some(d) => format!("spBv1.0/{}/{kind}/{}/{d}", self.cfg.group, self.cfg.node),
            None => format!("spBv1.0/{}/{kind}/{}", self.cfg.group, self.cfg.node),
        }
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq = (self.seq + 1) % 256;
        s
    }

    fn bd_seq_metric(&self, now_ms: u64) -> Metric {
        Metric {
            name: Some("bdSeq".into()),
            timestamp: Some(now_ms),
            datatype: Some(datatype::INT64),
            value: Some(MetricValue::LongValue(self.bd_seq)),
            ..Default::default()
        }
    }

    /// A new connection: its will (the NDEATH) and the births it opens
    /// with (NBIRTH, then a DBIRTH per known device).
    pub fn connect(&mut self, now_ms: u64) -> (Out, Vec<Out>) {
        self.bd_seq = self.connections % 256;
        self.connections += 1;
        let death = Payload {
            timestamp: Some(now_ms),
            metrics: vec![self.bd_seq_metric(now_ms)],
            ..Default::default()
        };
        let will = Out {
            topic: self.topic("NDEATH", None),
            payload: death.encode_to_vec(),
            qos: 1,
        };
        (will, self.births(now_ms))
    }

    /// The births again, on the same connection (a host's rebirth
    /// request): an NBIRTH with `seq` 0 and the `bdSeq` of this
    /// connection's will (the will is unchanged, so the NDEATH that ends
    /// this connection still matches it), then a DBIRTH per known device
    /// with every metric's last value; data goes on counting `seq` after
    /// them.
    pub fn rebirth(&mut self, now_ms: u64) -> Vec<Out> {
        self.births(now_ms)
    }

    /// The `bdSeq` of this connection's will and births.
    pub fn bd_seq(&self) -> u64 {
        self.bd_seq
    }

    fn births(&mut self, now_ms: u64) -> Vec<Out> {
        self.seq = 0;
        let birth = Payload {
            timestamp: Some(now_ms),
            metrics: vec![
                self.bd_seq_metric(now_ms),
                Metric {
                    name: Some(REBIRTH.into()),
                    timestamp: Some(now_ms),
                    datatype: Some(datatype::BOOLEAN),
                    value: Some(MetricValue::BooleanValue(false)),
                    ..Default::default()
                },
            ],
            seq: Some(self.next_seq()),
            ..Default::default()
        };
        let mut births = vec![Out {
            topic: self.topic("NBIRTH", None),
            payload: birth.encode_to_vec(),
            qos: 0,
        }];
        let ids: Vec<String> = self.devices.keys().cloned().collect();
        for id in ids {
            births.push(self.dbirth(&id, now_ms));
        }
        births
    }

    fn dbirth(&mut self, id: &str, now_ms: u64) -> Out {
        let metrics = self.devices[id]
            .metrics
            .iter()
            .map(|m| Metric {
                name: Some(m.name.clone()),
                alias: Some(m.alias),
                timestamp: Some(m.ts_ms),
                datatype: Some(m.datatype),
                properties: Some(quality_property(m.quality)),
                value: Some(m.value.clone()),
                ..Default::default()
            })
            .collect();
        let payload = Payload {
            timestamp: Some(now_ms),
            metrics,
            seq: Some(self.next_seq()),
            ..Default::default()
        };
        Out {
            topic: self.topic("DBIRTH", Some(id)),
            payload: payload.encode_to_vec(),
            qos: 0,
        }
    }

    /// The publish for one point of `stream`: a DBIRTH of its device when
    /// the point brings a new device, metric or datatype (the birth holds
    /// its value), else a DDATA. An error is why it cannot be published.
    pub fn point(&mut self, stream: &str, p: &Point, now_ms: u64) -> Result<Out, String> {
        let id = device_id(stream);
        if let Some(d) = self.devices.get(&id) {
            if d.stream != stream {
                return Err(format!(
                    "streams `{}` and `{stream}` would both be Sparkplug device `{id}`; rename one",
                    d.stream
                ));
            }
        }
        let (dt, value) = metric_of(p);
        let ts = ts_ms(p.ts_ns);
        let known = self
            .devices
            .get(&id)
            .and_then(|d| d.by_name.get(&p.tag).map(|i| &d.metrics[*i]));
        match known {
            Some(m) if m.datatype == dt => {
                let alias = m.alias;
                let d = self.devices.get_mut(&id).expect("known");
                let m = &mut d.metrics[d.by_name[&p.tag]];
                (m.value, m.ts_ms, m.quality) = (value.clone(), ts, p.quality);
                let payload = Payload {
                    timestamp: Some(now_ms),
                    metrics: vec![Metric {
                        alias: Some(alias),
                        timestamp: Some(ts),
                        datatype: Some(dt),
                        properties: Some(quality_property(p.quality)),
                        value: Some(value),
                        ..Default::default()
                    }],
                    seq: Some(self.next_seq()),
                    ..Default::default()
                };
                Ok(Out {
                    topic: self.topic("DDATA", Some(&id)),
                    payload: payload.encode_to_vec(),
                    qos: 0,
                })
            }
            Some(_) => {
                // The datatype changed: a new birth declares it.
                let d = self.devices.get_mut(&id).expect("known");
                let m = &mut d.metrics[d.by_name[&p.tag]];
                (m.datatype, m.value, m.ts_ms, m.quality) = (dt, value, ts, p.quality);
                Ok(self.dbirth(&id, now_ms))
            }
            None => {
                if self.metrics >= MAX_METRICS {
                    return Err(format!(
                        "the Sparkplug edge node already has {MAX_METRICS} metrics; a new tag is not added (route fewer tags to this sink)"
                    ));
                }
                let alias = self.next_alias;
                self.next_alias += 1;
                self.metrics += 1;
                let d = self.devices.entry(id.clone()).or_insert_with(|| Device {
                    stream: stream.to_string(),
                    metrics: Vec::new(),
                    by_name: HashMap::new(),
                });
                d.by_name.insert(p.tag.clone(), d.metrics.len());
                d.metrics.push(MetricState {
                    name: p.tag.clone(),
                    alias,
                    datatype: dt,
                    value,
                    ts_ms: ts,
                    quality: p.quality,
                });
                Ok(self.dbirth(&id, now_ms))
            }
        }
    }
}

/// The NCMD metric a host sets to true to ask for the births again.
pub const REBIRTH: &str = "Node Control/Rebirth";

/// An NCMD payload setting `Node Control/Rebirth` to `value`, as a host
/// sends it (for the sink's tests).
#[cfg(test)]
pub fn rebirth_request(value: bool) -> Vec<u8> {
    Payload {
        timestamp: Some(1),
        metrics: vec![Metric {
            name: Some(REBIRTH.into()),
            datatype: Some(datatype::BOOLEAN),
            value: Some(MetricValue::BooleanValue(value)),
            ..Default::default()
        }],
        seq: Some(0),
        ..Default::default()
    }
    .encode_to_vec()
}

/// What an NCMD or DCMD asks of this node.
#[derive(Debug, Default, PartialEq)]
pub struct Command {
    /// `Node Control/Rebirth` = true in an NCMD.
    pub rebirth: bool,
    /// The metrics not acted on, each named with its command kind.
    pub ignored: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(tag: &str, value: Value, ts_ms: i64) -> Point {
        Point {
            tag: tag.into(),
            ts_ns: ts_ms * 1_000_000,
            value,
            quality: 192,
            status: None,
        }
    }

    fn decode(o: &Out) -> Payload {
        Payload::decode(o.payload.as_slice()).unwrap()
    }

    #[test]
    fn births_then_data_by_alias_with_seq_and_bdseq_per_the_spec() {
        let mut e = Edge::new(Config {
            group: "G".into(),
            node: "N".into(),
        });
        let (will, births) = e.connect(1000);
        assert_eq!((will.topic.as_str(), will.qos), ("spBv1.0/G/NDEATH/N", 1));
        let death = decode(&will);
        assert_eq!(death.metrics[0].name.as_deref(), Some("bdSeq"));
        assert_eq!(death.metrics[0].value, Some(MetricValue::LongValue(0)));
        assert_eq!(death.seq, None, "an NDEATH has no seq");
        assert_eq!(births.len(), 1);
        let nbirth = decode(&births[0]);
        assert_eq!(births[0].topic, "spBv1.0/G/NBIRTH/N");
        assert_eq!(nbirth.seq, Some(0));
        assert_eq!(nbirth.metrics[0].value, Some(MetricValue::LongValue(0)));
        // A new device and metric: a DBIRTH with name, alias, datatype and value.
        let o = e
            .point("plant/a", &point("T/1", Value::F64(1.5), 5000), 1001)
            .unwrap();
        assert_eq!(o.topic, "spBv1.0/G/DBIRTH/N/plant_a");
        let b = decode(&o);
        assert_eq!(b.seq, Some(1));
        let m = &b.metrics[0];
        assert_eq!(
            (m.name.as_deref(), m.alias, m.datatype, m.timestamp),
            (Some("T/1"), Some(1), Some(datatype::DOUBLE), Some(5000))
        );
        assert_eq!(m.value, Some(MetricValue::DoubleValue(1.5)));
        // Known: a DDATA by alias alone.
        let o = e
            .point("plant/a", &point("T/1", Value::F64(2.5), 6000), 1002)
            .unwrap();
        assert_eq!(o.topic, "spBv1.0/G/DDATA/N/plant_a");
        let d = decode(&o);
        assert_eq!(d.seq, Some(2));
        assert_eq!(
            (d.metrics[0].name.as_deref(), d.metrics[0].alias),
            (None, Some(1))
        );
        assert_eq!(d.metrics[0].value, Some(MetricValue::DoubleValue(2.5)));
        // A second metric: the device is born again with both.
        let o = e
            .point("plant/a", &point("n", Value::I64(-3), 7000), 1003)
            .unwrap();
        let b = decode(&o);
        assert_eq!(o.topic, "spBv1.0/G/DBIRTH/N/plant_a");
        assert_eq!(b.metrics.len(), 2);
        assert_eq!(b.metrics[0].value, Some(MetricValue::DoubleValue(2.5)));
        assert_eq!(
            b.metrics[1].value,
            Some(MetricValue::LongValue(-3i64 as u64))
        );
        // seq wraps at 256.
        for _ in 0..300 {
            e.point("plant/a", &point("n", Value::I64(1), 7000), 1003)
                .unwrap();
        }
        assert_eq!(e.seq, (4 + 300) % 256);
        // A reconnection: bdSeq 1, seq from 0, births of what is known.
        let (will, births) = e.connect(2000);
        assert_eq!(
            decode(&will).metrics[0].value,
            Some(MetricValue::LongValue(1))
        );
        assert_eq!(births.len(), 2);
        assert_eq!(decode(&births[0]).seq, Some(0));
        assert_eq!(decode(&births[1]).seq, Some(1));
        assert_eq!(decode(&births[1]).metrics.len(), 2);
        // Two streams on one device id are refused.
        let err = e
            .point("plant_a", &point("x", Value::Bool(true), 0), 0)
            .unwrap_err();
        assert!(err.contains("plant_a") && err.contains("rename"), "{err}");
    }

    fn command(metrics: Vec<Metric>) -> Vec<u8> {
        Payload {
            timestamp: Some(1),
            metrics,
            seq: Some(0),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn bool_metric(name: &str, v: bool) -> Metric {
        Metric {
            name: Some(name.into()),
            datatype: Some(datatype::BOOLEAN),
            value: Some(MetricValue::BooleanValue(v)),
            ..Default::default()
        }
    }

    #[test]
    fn a_rebirth_repeats_the_births_with_seq_0_the_wills_bdseq_and_the_last_values() {
        let mut e = Edge::new(Config {
            group: "G".into(),
            node: "N".into(),
        });
        e.connect(1000);
        let (will, _) = e.connect(1000);
        e.point("a", &point("x", Value::F64(1.0), 10), 1001)
            .unwrap();
        e.point("a", &point("x", Value::F64(2.0), 11), 1002)
            .unwrap();
        e.point("b", &point("y", Value::Bool(true), 12), 1003)
            .unwrap();
        let births = e.rebirth(2000);
        let topics: Vec<&str> = births.iter().map(|b| b.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "spBv1.0/G/NBIRTH/N",
                "spBv1.0/G/DBIRTH/N/a",
                "spBv1.0/G/DBIRTH/N/b"
            ]
        );
        let nbirth = decode(&births[0]);
        assert_eq!(nbirth.seq, Some(0));
        assert_eq!(
            nbirth.metrics[0].value,
            decode(&will).metrics[0].value,
            "the NBIRTH's bdSeq is the will's"
        );
        assert_eq!(nbirth.metrics[0].value, Some(MetricValue::LongValue(1)));
        let a = decode(&births[1]);
        assert_eq!(a.seq, Some(1));
        assert_eq!(
            (a.metrics[0].name.as_deref(), a.metrics[0].alias),
            (Some("x"), Some(1))
        );
        assert_eq!(a.metrics[0].value, Some(MetricValue::DoubleValue(2.0)));
        assert_eq!(a.metrics[0].timestamp, Some(11));
        assert_eq!(decode(&births[2]).seq, Some(2));
        // Data goes on after the births, by the same alias.
        let d = e
            .point("a", &point("x", Value::F64(3.0), 13), 2001)
            .unwrap();
        assert_eq!(d.topic, "spBv1.0/G/DDATA/N/a");
        assert_eq!(decode(&d).seq, Some(3));
        assert_eq!(decode(&d).metrics[0].alias, Some(1));
    }

    #[test]
    fn only_an_ncmd_rebirth_true_is_acted_on_and_everything_else_is_named_as_ignored() {
        let cfg = Config {
            group: "G".into(),
            node: "N".into(),
        };
        assert_eq!(
            cfg.command_filters(),
            ["spBv1.0/G/NCMD/N", "spBv1.0/G/DCMD/N/+"]
        );
        let ncmd = "spBv1.0/G/NCMD/N";
        let c = cfg
            .command(ncmd, &command(vec![bool_metric(REBIRTH, true)]))
            .unwrap();
        assert_eq!(
            c,
            Command {
                rebirth: true,
                ignored: vec![]
            }
        );
        let c = cfg
            .command(
                ncmd,
                &command(vec![
                    bool_metric("Node Control/Reboot", true),
                    bool_metric(REBIRTH, false),
                ]),
            )
            .unwrap();
        assert!(!c.rebirth);
        assert_eq!(c.ignored.len(), 2);
        assert_eq!(c.ignored[0], "NCMD Node Control/Reboot");
        assert_eq!(
            c.ignored[1],
            "NCMD Node Control/Rebirth = BooleanValue(false) (only true asks for a rebirth)"
        );
        // A DCMD is never acted on, not even one that says rebirth.
        let c = cfg
            .command(
                "spBv1.0/G/DCMD/N/plant_a",
                &command(vec![bool_metric(REBIRTH, true)]),
            )
            .unwrap();
        assert!(!c.rebirth);
        assert_eq!(c.ignored, ["DCMD Node Control/Rebirth of device plant_a"]);
        assert_eq!(
            cfg.command(ncmd, &command(vec![])).unwrap().ignored,
            ["NCMD without metrics"]
        );
        // Garbage and foreign topics are errors, never a panic.
        let err = cfg.command(ncmd, &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(err.starts_with("not a Sparkplug B payload"), "{err}");
        assert!(cfg
            .command("spBv1.0/G/NCMD/other", &command(vec![]))
            .is_err());
        assert!(cfg
            .command("spBv1.0/G/DCMD/N/a/b", &command(vec![]))
            .is_err());
    }

    #[test]
    fn ids_with_topic_characters_are_refused_naming_the_key() {
        let c = Config {
            group: "a/b".into(),
            node: "n".into(),
        };
        assert!(c.check().unwrap_err().starts_with("sparkplug.group:"));
    }
}
