//! weir's durable segmented log, under both the sender's spool and the
//! receiver's journal: numbered entries framed with a length and a CRC32
//! in segment files that carry a format marker; appends buffered and
//! rotated at a segment size; a group-commit fsync thread that publishes
//! "durable up to position P"; on open, torn tails cut back to the last
//! whole entry and corrupt stretches mapped to holes (both reported with
//! their byte and entry ranges, so the owner can turn them into gaps);
//! reads with large reads into a reused buffer; removal of whole old
//! segments. What an entry means (a spooled record, a journal entry) is
//! the owner's business. Also the reading of private key files
//! (`secret`), which both binaries share.

pub mod frame;
pub mod log;
pub mod secret;
pub mod segment;
pub mod sync;

pub use log::{Cursor, Log, OpenRules, Opened, ReadEnd, Segment, Settings, Step, Unreadable};
pub use segment::{Hole, Torn, Walked, HEADER_LEN};
pub use sync::{
    read_if_present, write_atomically, FsyncTimes, GroupCommit, SyncJob, Syncer, Waker,
    GROUP_BYTES, SLOW_FSYNC,
};
