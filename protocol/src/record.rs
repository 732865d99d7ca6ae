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
    /// Boxed: a `Log` is twice the size of the other kinds, and every
    /// record in memory (decoded, queued for sinks) would pay for it.
    Log(Box<Log>),
    Bytes(Chunk),
    /// Boxed for the same reason as `Log`: its metadata would make every
    /// record in memory larger.
    File(Box<FilePart>),
}

impl RecordBody {
    /// The short name sinks write in the `kind` field.
    pub fn kind(&self) -> &'static str {
        match self {
            RecordBody::Point(_) => "point",
            RecordBody::Message(_) => "message",
            RecordBody::Log(_) => "log",
            RecordBody::Bytes(_) => "bytes",
            RecordBody::File(_) => "file",
        }
    }

    /// Source timestamp in nanoseconds since the Unix epoch, where the kind has one.
    pub fn timestamp_ns(&self) -> Option<i64> {
        match self {
            RecordBody::Point(p) => Some(p.ts_ns),
            RecordBody::Log(l) => Some(l.ts_ns),
            RecordBody::Message(m) => Some(m.ts_ns),
            RecordBody::Bytes(_) => None,
            RecordBody::File(f) => Some(f.mtime_ns),
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
    /// [`QUALITY_GOOD`], [`QUALITY_UNCERTAIN`] or [`QUALITY_BAD`].
    pub quality: u8,
    /// What the source said about the value when it is not simply good:
    /// an OPC UA status code (`BadCommunicationError (0x80050000)`), a
    /// Modbus exception, `communication-lost`. `None` for most points.
    pub status: Option<String>,
}

/// [`Point::quality`]: the value is good.
pub const QUALITY_GOOD: u8 = 0;
/// [`Point::quality`]: the source is not sure of the value.
pub const QUALITY_UNCERTAIN: u8 = 1;
/// [`Point::quality`]: the value is not usable (the source or the path to it failed).
pub const QUALITY_BAD: u8 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    F64(f64),
    I64(i64),
    Bool(bool),
    Str(String),
}

/// A message with a topic, as from MQTT, a UDP datagram or a line of stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub topic: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// When the sender received it, nanoseconds since the Unix epoch.
    pub ts_ns: i64,
    /// MQTT retain flag (false from other sources).
    pub retain: bool,
    /// MQTT QoS it was received with (0 from other sources).
    pub qos: u8,
    /// MQTT 5 user properties, in their order (names may repeat).
    pub properties: Vec<(String, String)>,
    /// Where it came from when the topic does not say: a `udp` source's
    /// peer `ip:port`.
    pub origin: Option<String>,
}

impl Message {
    /// A message with only a topic, a payload and a receive time (QoS 0,
    /// not retained, no properties, no origin).
    pub fn new(topic: impl Into<String>, payload: Vec<u8>, ts_ns: i64) -> Self {
        Message {
            topic: topic.into(),
            payload,
            ts_ns,
            retain: false,
            qos: 0,
            properties: Vec::new(),
            origin: None,
        }
    }
}

/// A syslog message (RFC 5424 or RFC 3164), or a line that did not parse
/// as one (then `parse_error` says why and `text` is the raw line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Log {
    pub facility: u8,
    pub severity: u8,
    pub host: String,
    pub app: String,
    pub text: String,
    /// The message's timestamp (the sender's clock when it had none).
    pub ts_ns: i64,
    /// RFC 5424 PROCID (RFC 3164: the `[pid]` after the tag); empty if none.
    pub proc_id: String,
    /// RFC 5424 MSGID; empty if none.
    pub msg_id: String,
    /// RFC 5424 structured data, elements in order.
    pub structured_data: Vec<SdElement>,
    /// Set when the input was not valid syslog: why.
    pub parse_error: Option<String>,
}

/// One RFC 5424 structured-data element: `[id name="value" ...]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdElement {
    pub id: String,
    /// Parameters in order (names may repeat), values unescaped.
    pub params: Vec<(String, String)>,
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

/// One part of a file transfer (a `files` source): every part carries the
/// file's metadata, so any part that arrives names the file even when others
/// were lost. A transfer's parts are consecutive records of its stream, in
/// offset order; a sender that restarts mid-file sends the whole file again
/// under the same `transfer` id, and the receiver writes each part at its
/// offset, so parts seen twice cost nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilePart {
    /// Chosen at random when the sender takes the file; kept across a
    /// sender restart, so a resend completes the same transfer.
    pub transfer: u64,
    /// Relative path under the source's directory, `/`-separated.
    pub path: String,
    /// The whole file's size in bytes.
    pub size: u64,
    /// The file's modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Unix permission bits (`0o644`).
    pub mode: u32,
    /// Where `data` starts in the file.
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Set on the last part only (it ends at `size`): the SHA-256 of the
    /// whole content, which the receiver checks before the file appears.
    pub sha256: Option<[u8; 32]>,
}

impl FilePart {
    /// The last part of its transfer.
    pub fn is_last(&self) -> bool {
        self.sha256.is_some()
    }
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

/// A serialized [`RecordBody`] read in place: the same postcard encoding,
/// with every string and byte string borrowed from the input. The sender's
/// link thread checks a spooled body with it (no allocation, nothing
/// copied) and hands the bytes to the encoder as they are
/// ([`crate::Encoder::push_encoded`]). Its variants and fields mirror
/// `RecordBody` exactly, in order; a test proves every body decodes as both.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub enum RecordBodyRef<'a> {
    Point(#[serde(borrow)] PointRef<'a>),
    Message(#[serde(borrow)] MessageRef<'a>),
    Log(#[serde(borrow)] LogRef<'a>),
    Bytes(#[serde(borrow)] ChunkRef<'a>),
    File(#[serde(borrow)] FilePartRef<'a>),
}

impl<'a> RecordBodyRef<'a> {
    /// Reads a whole serialized body; trailing bytes are an error.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, postcard::Error> {
        match postcard::take_from_bytes::<RecordBodyRef>(bytes)? {
            (body, []) => Ok(body),
            _ => Err(postcard::Error::DeserializeBadEncoding),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct PointRef<'a> {
    pub tag: &'a str,
    pub ts_ns: i64,
    #[serde(borrow)]
    pub value: ValueRef<'a>,
    pub quality: u8,
    pub status: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub enum ValueRef<'a> {
    F64(f64),
    I64(i64),
    Bool(bool),
    Str(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct MessageRef<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub ts_ns: i64,
    pub retain: bool,
    pub qos: u8,
    pub properties: PairsRef,
    pub origin: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct LogRef<'a> {
    pub facility: u8,
    pub severity: u8,
    pub host: &'a str,
    pub app: &'a str,
    pub text: &'a str,
    pub ts_ns: i64,
    pub proc_id: &'a str,
    pub msg_id: &'a str,
    pub structured_data: SdRef,
    pub parse_error: Option<&'a str>,
}

/// A serialized `Vec<(String, String)>`, checked in place: every string is
/// valid UTF-8 within the input. Only the count is kept (the link thread
/// checks spooled bodies; it never reads their fields).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairsRef {
    pub len: usize,
}

/// A serialized `Vec<SdElement>`, checked in place like [`PairsRef`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SdRef {
    pub len: usize,
}

/// One `SdElement` checked in place.
#[derive(Deserialize)]
struct SdElementRef<'a> {
    #[serde(borrow)]
    _id: &'a str,
    _params: PairsRef,
}

/// Deserializes a sequence by walking its elements as `$elem` (borrowed,
/// so nothing is allocated) and keeping their count.
macro_rules! counted_seq {
    ($ty:ident, $elem:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = usize;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a sequence")
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(
                        self,
                        mut seq: A,
                    ) -> Result<usize, A::Error> {
                        let mut n = 0;
                        while seq.next_element::<$elem>()?.is_some() {
                            n += 1;
                        }
                        Ok(n)
                    }
                }
                Ok($ty {
                    len: d.deserialize_seq(V)?,
                })
            }
        }
    };
}
counted_seq!(PairsRef, (&'de str, &'de str));
counted_seq!(SdRef, SdElementRef<'de>);

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct ChunkRef<'a> {
    pub data: &'a [u8],
    pub end: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct FilePartRef<'a> {
    pub transfer: u64,
    pub path: &'a str,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub offset: u64,
    pub data: &'a [u8],
    pub sha256: Option<[u8; 32]>,
}

/// Most bytes [`put_record_head`] writes: a u32 and a u64 as postcard
/// varints (5 + 10) and a bool.
pub const MAX_RECORD_HEAD: usize = 16;

/// Writes what postcard writes for a [`Record`] before its body: `stream`
/// and `seq` as varints, then `resent`. Followed by a serialized body, the
/// bytes equal `postcard::to_allocvec(&record)` (a test proves it).
pub fn put_record_head(out: &mut Vec<u8>, stream: StreamId, seq: u64, resent: bool) {
    let mut v = u64::from(stream);
    for n in [v, seq] {
        v = n;
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    out.push(u8::from(resent));
}

/// Appends `value` in postcard to `out`. The same bytes as
/// `postcard::to_extend`, which pushes through `Extend` a byte at a time;
/// here strings and byte fields are copied whole, which is most of the
/// cost of a small record (spool, encoder and journal all serialize each
/// one).
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    struct Tail<'a>(&'a mut Vec<u8>);
    impl postcard::ser_flavors::Flavor for Tail<'_> {
        type Output = ();
        fn try_push(&mut self, b: u8) -> postcard::Result<()> {
            self.0.push(b);
            Ok(())
        }
        fn try_extend(&mut self, b: &[u8]) -> postcard::Result<()> {
            self.0.extend_from_slice(b);
            Ok(())
        }
        fn finalize(self) -> postcard::Result<()> {
            Ok(())
        }
    }
    // Writing into a Vec cannot fail, and weir's types only use what
    // postcard supports (a test serializes every kind).
    postcard::serialize_with_flavor(value, Tail(out)).expect("postcard into a Vec");
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

    fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec((".{0,12}", ".{0,12}"), 0..3)
    }

    fn body() -> impl Strategy<Value = RecordBody> {
        prop_oneof![
            (
                ".{0,60}",
                any::<i64>(),
                value(),
                any::<u8>(),
                proptest::option::of(".{0,20}")
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
                ".{0,60}",
                proptest::collection::vec(any::<u8>(), 0..300),
                any::<i64>(),
                any::<bool>(),
                any::<u8>(),
                pairs(),
                proptest::option::of(".{0,20}")
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
                (
                    any::<u8>(),
                    any::<u8>(),
                    ".{0,20}",
                    ".{0,20}",
                    ".{0,200}",
                    any::<i64>()
                ),
                (
                    ".{0,8}",
                    ".{0,8}",
                    proptest::collection::vec((".{0,12}", pairs()), 0..3),
                    proptest::option::of(".{0,20}")
                )
            )
                .prop_map(
                    |(
                        (facility, severity, host, app, text, ts_ns),
                        (proc_id, msg_id, sd, parse_error),
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
                            structured_data: sd
                                .into_iter()
                                .map(|(id, params)| SdElement { id, params })
                                .collect(),
                            parse_error,
                        }))
                    },
                ),
            (
                proptest::collection::vec(any::<u8>(), 0..2000),
                any::<bool>()
            )
                .prop_map(|(data, end)| RecordBody::Bytes(Chunk { data, end })),
            (
                (
                    any::<u64>(),
                    ".{0,80}",
                    any::<u64>(),
                    any::<i64>(),
                    any::<u32>()
                ),
                (
                    any::<u64>(),
                    proptest::collection::vec(any::<u8>(), 0..2000),
                    proptest::option::of(any::<[u8; 32]>())
                )
            )
                .prop_map(
                    |((transfer, path, size, mtime_ns, mode), (offset, data, sha256))| {
                        RecordBody::File(Box::new(FilePart {
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

    #[test]
    fn the_kinds_before_file_keep_their_bytes() {
        // Adding `File` at the end leaves the earlier variants' encoding alone.
        let chunk = RecordBody::Bytes(Chunk {
            data: vec![1, 2],
            end: true,
        });
        assert_eq!(postcard::to_allocvec(&chunk).unwrap(), [3, 2, 1, 2, 1]);
        let part = RecordBody::File(Box::new(FilePart {
            transfer: 1,
            path: "a".into(),
            size: 1,
            mtime_ns: -1,
            mode: 0o644,
            offset: 0,
            data: vec![9],
            sha256: None,
        }));
        assert_eq!(
            postcard::to_allocvec(&part).unwrap(),
            [4, 1, 1, b'a', 1, 1, 0xa4, 0x03, 0, 1, 9, 0]
        );
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
        fn encode_into_appends_the_bytes_postcard_writes(stream in any::<u32>(), seq in any::<u64>(), body in body(), before in proptest::collection::vec(any::<u8>(), 0..8)) {
            let record = Record { stream, seq, resent: false, body };
            let mut out = before.clone();
            encode_into(&record, &mut out);
            prop_assert_eq!(&out[..before.len()], &before[..]);
            prop_assert_eq!(&out[before.len()..], &postcard::to_allocvec(&record).unwrap()[..]);
        }

        #[test]
        fn a_serialized_body_reads_in_place_as_the_same_fields(body in body()) {
            let bytes = postcard::to_allocvec(&body).unwrap();
            let view = RecordBodyRef::parse(&bytes).unwrap();
            let same = match (&body, view) {
                (RecordBody::Point(p), RecordBodyRef::Point(v)) => {
                    p.tag == v.tag && p.ts_ns == v.ts_ns && p.quality == v.quality
                        && p.status.as_deref() == v.status
                        && match (&p.value, v.value) {
                            (Value::F64(a), ValueRef::F64(b)) => a.to_bits() == b.to_bits(),
                            (Value::I64(a), ValueRef::I64(b)) => *a == b,
                            (Value::Bool(a), ValueRef::Bool(b)) => *a == b,
                            (Value::Str(a), ValueRef::Str(b)) => a == b,
                            _ => false,
                        }
                }
                (RecordBody::Message(m), RecordBodyRef::Message(v)) => {
                    m.topic == v.topic && m.payload == v.payload && m.ts_ns == v.ts_ns
                        && m.retain == v.retain && m.qos == v.qos
                        && m.properties.len() == v.properties.len
                        && m.origin.as_deref() == v.origin
                }
                (RecordBody::Log(l), RecordBodyRef::Log(v)) => {
                    (l.facility, l.severity, l.host.as_str(), l.app.as_str(), l.text.as_str(), l.ts_ns)
                        == (v.facility, v.severity, v.host, v.app, v.text, v.ts_ns)
                        && (l.proc_id.as_str(), l.msg_id.as_str(), l.parse_error.as_deref())
                            == (v.proc_id, v.msg_id, v.parse_error)
                        && l.structured_data.len() == v.structured_data.len
                }
                (RecordBody::Bytes(c), RecordBodyRef::Bytes(v)) => c.data == v.data && c.end == v.end,
                (RecordBody::File(f), RecordBodyRef::File(v)) => {
                    (f.transfer, f.path.as_str(), f.size, f.mtime_ns, f.mode, f.offset)
                        == (v.transfer, v.path, v.size, v.mtime_ns, v.mode, v.offset)
                        && f.data == v.data && f.sha256 == v.sha256
                }
                _ => false,
            };
            prop_assert!(same, "{:?} read as {:?}", body, view);
            // A truncated body is refused, and so is one with bytes after it.
            prop_assert!(RecordBodyRef::parse(&bytes[..bytes.len() - 1]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert!(RecordBodyRef::parse(&longer).is_err());
        }

        #[test]
        fn a_record_head_and_a_serialized_body_are_the_record_as_postcard_writes_it(stream in any::<u32>(), seq in any::<u64>(), resent in any::<bool>(), body in body()) {
            let mut bytes = Vec::new();
            put_record_head(&mut bytes, stream, seq, resent);
            prop_assert!(bytes.len() <= MAX_RECORD_HEAD);
            bytes.extend_from_slice(&postcard::to_allocvec(&body).unwrap());
            let record = Record { stream, seq, resent, body };
            prop_assert_eq!(bytes, postcard::to_allocvec(&record).unwrap());
        }

        #[test]
        fn stream_info_round_trips(id in any::<u32>(), name in ".{0,64}", source_type in "[a-z]{0,12}", first_seq in any::<u64>(), epoch in any::<u64>()) {
            let info = StreamInfo { id, name, source_type, first_seq, epoch };
            let back: StreamInfo = postcard::from_bytes(&postcard::to_allocvec(&info).unwrap()).unwrap();
            prop_assert_eq!(back, info);
        }
    }
}
