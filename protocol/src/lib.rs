//! weir's wire protocol, sans-IO.
//!
//! This crate is the pipeline's middle, with no sockets, clocks or threads:
//! the sender's driver pushes [`Record`]s into an [`Encoder`] and pulls UDP
//! payloads out with [`Encoder::poll_frame`]; the receiver's driver feeds
//! datagrams to a [`Decoder`] and pulls [`Event`]s (records in order, gaps,
//! heartbeats). Time is always passed in as [`Nanos`] from any monotonic
//! origin, so the same code runs under a seeded in-memory link in tests.
//!
//! Layers, bottom up: [`auth`] (keys, per-session AES-256-GCM
//! subkeys), [`frame`] (header + encrypted shard + tag + CRC32, checked
//! before anything else), [`fec`]
//! (Reed-Solomon k + m), [`bundle`] (records packed into block data,
//! fragmented across blocks when large), [`control`] (heartbeats), and the
//! [`encoder`] / [`decoder`] state machines.

pub mod auth;
pub mod bundle;
pub mod config;
pub mod control;
pub mod decoder;
pub mod encoder;
pub mod fec;
pub mod frame;
pub mod record;
pub mod sim;
pub mod units;

pub use auth::{AuthError, FrameId, Key, KeyError, KeyId, Signer, Verifier};
pub use config::{ConfigError, DecoderConfig, EncoderConfig};
pub use control::{Control, Heartbeat, StreamStatus};
pub use decoder::{Decoder, DecoderStats, Event, Gap, GapCause};
pub use encoder::{Encoder, EncoderStats};
pub use frame::{FrameError, FrameHeader};
pub use record::{
    Chunk, FilePart, FilePartRef, GapNotice, Log, Message, NoticeCause, Point, Record, RecordBody,
    RecordBodyRef, SdElement, StreamId, StreamInfo, Value, QUALITY_BAD, QUALITY_GOOD,
    QUALITY_UNCERTAIN,
};

/// Monotonic time in nanoseconds from an origin the caller chooses.
pub type Nanos = u64;

pub const NANOS_PER_MILLI: Nanos = 1_000_000;
pub const NANOS_PER_SEC: Nanos = 1_000_000_000;
