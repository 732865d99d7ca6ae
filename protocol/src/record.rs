//! Records: the unit of data a source hands to the sender and a sink receives.

use serde::{Deserialize, Serialize};

/// Per-session numeric id of a stream; names travel in [`StreamInfo`].
pub type StreamId = u32;

/// One record of a stream, with that stream's sequence number (+1 per record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub stream: StreamId,
    pub seq: u64,
    /// Sent again on an operator's request (`weir-sender resend`): the
    /// receiver delivers it only if it fills a gap, and never reorders the
    /// stream's normal flow around it.
    pub resent: bool,
    pub body: RecordBody,
}

/// What a record carries. Each kind maps to one kind of source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RecordBody {
    Point(Point),
    Message(Message),
    Log(Log),
    Bytes(Chunk),
}

impl RecordBody {
    /// The short name sinks write in the `kind` field.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordBody::Point(_) => "point",
            RecordBody::Message(_) => "message",
            RecordBody::Log(_) => "log",
            RecordBody::Bytes(_) => "bytes",
        }
    }

    /// Source timestamp in nanoseconds since the Unix epoch, where the kind has one.
    pub fn timestamp_ns(&self) -> Option<i64> {
        match self {
            RecordBody::Point(p) => Some(p.ts_ns),
            RecordBody::Log(l) => Some(l.ts_ns),
            RecordBody::Message(_) | RecordBody::Bytes(_) => None,
        }
    }
}

/// A sensor or historian value at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub tag: String,
    /// Nanoseconds since the Unix epoch, as stamped by the source.
    pub ts_ns: i64,
    pub value: Value,
    /// OPC-UA style quality: 0 = good; anything else is source-specific.
    pub quality: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    F64(f64),
    I64(i64),
    Bool(bool),
    Str(String),
}

/// A message with a topic, as from MQTT or a line of stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub topic: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// A syslog-like log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Log {
    pub facility: u8,
    pub severity: u8,
    pub host: String,
    pub app: String,
    pub text: String,
    pub ts_ns: i64,
}

/// A chunk of a raw byte stream; consecutive chunks of a stream concatenate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// Serialized as one length-prefixed byte string, not a sequence of u8.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// The source connection ended after this chunk (a tcp sink closes its
    /// connection and opens a new one for the next chunk).
    pub end: bool,
}

/// What a stream is called and where it comes from; sent in-band before a
/// stream's first record in every block and repeated in heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub id: StreamId,
    pub name: String,
    /// The source type that feeds it (`tcp`, `stdin`, `generator`, ...).
    pub source_type: String,
    /// The first sequence number this sender session sends on this stream.
    pub first_seq: u64,
    /// Random when the sender first created the stream's sequence state;
    /// a different epoch means the numbering restarted (state was lost).
    pub epoch: u64,
}

/// In-band notice that records of a stream will never be sent, ordered
/// with the stream's records so the receiver can state the gap's cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapNotice {
    pub stream: StreamId,
    pub from: u64,
    pub to: u64,
    pub cause: NoticeCause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeCause {
    /// The sender's disk spool hit `max_bytes` or `max_age` and dropped
    /// its oldest records before they were sent.
    SpoolOverflow,
    /// The sender found them damaged in its spool after a crash (torn or
    /// corrupt tail) and cut them away.
    SpoolDamaged,
    /// They were in a corrupt stretch in the middle of a spool segment
    /// (failed CRC or decode); the sender skipped it and sent the rest.
    SpoolCorrupt,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<f64>()
                .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
                .prop_map(Value::F64),
            any::<i64>().prop_map(Value::I64),
            any::<bool>().prop_map(Value::Bool),
            ".{0,40}".prop_map(Value::Str),
        ]
    }

    fn body() -> impl Strategy<Value = RecordBody> {
        prop_oneof![
            (".{0,60}", any::<i64>(), value(), any::<u8>()).prop_map(
                |(tag, ts_ns, value, quality)| RecordBody::Point(Point {
                    tag,
                    ts_ns,
                    value,
                    quality
                })
            ),
            (".{0,60}", proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(topic, payload)| RecordBody::Message(Message { topic, payload })),
            (
                any::<u8>(),
                any::<u8>(),
                ".{0,20}",
                ".{0,20}",
                ".{0,200}",
                any::<i64>()
            )
                .prop_map(|(facility, severity, host, app, text, ts_ns)| {
                    RecordBody::Log(Log {
                        facility,
                        severity,
                        host,
                        app,
                        text,
                        ts_ns,
                    })
                }),
            (
                proptest::collection::vec(any::<u8>(), 0..2000),
                any::<bool>()
            )
                .prop_map(|(data, end)| RecordBody::Bytes(Chunk { data, end })),
        ]
    }

    proptest! {
        #[test]
        fn every_record_kind_round_trips_through_postcard(stream in any::<u32>(), seq in any::<u64>(), body in body()) {
            let record = Record { stream, seq, resent: false, body };
            let bytes = postcard::to_allocvec(&record).unwrap();
            let back: Record = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(back, record);
        }

        #[test]
        fn stream_info_round_trips(id in any::<u32>(), name in ".{0,64}", source_type in "[a-z]{0,12}", first_seq in any::<u64>(), epoch in any::<u64>()) {
            let info = StreamInfo { id, name, source_type, first_seq, epoch };
            let back: StreamInfo = postcard::from_bytes(&postcard::to_allocvec(&info).unwrap()).unwrap();
            prop_assert_eq!(back, info);
        }
    }
}
