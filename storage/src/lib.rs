//! Conveyor's storage engine: the record batch format and the segmented partition log.
//!
//! # Layout
//! - [`batch`]: the record batch format (header, builder, validation, record iterator,
//!   compression). One format from producer to disk to consumer.
//! - [`index`]: sparse memory-mapped offset and time indexes.
//! - `segment`: one `.log` file with its indexes.
//! - [`log`]: [`PartitionLog`], appends, reads, lookups.
//! - `lookup`: finding a batch by its Raft index without a table of entries.
//! - [`producer_state`]: idempotent producers' sequence state, rebuilt from batch headers,
//!   and its snapshot files.
//! - `sync`: group commit, flushes, recovery point, clean-shutdown marker.
//! - `recovery`: opening a log and repairing it after a crash.
//! - `retention`: deleting old segments, truncating suffixes.
//! - [`cleaner`]: key-based compaction (the key map, segment rewriting, the crash-safe swap,
//!   the cleaner checkpoint, the I/O throttle).
//! - [`scrub`]: verifying sealed segments in the background and quarantining damage.
//! - `crash_sim`: test hooks that keep written and durable bytes apart (feature
//!   `crash-sim`, on for this crate's own tests; empty otherwise).
//! - [`config`]: [`LogConfig`] and [`FlushPolicy`].
//! - [`error`]: [`BatchError`], [`LogError`].
//! - [`file_names`]: how files in a partition directory are named.
//!
//! # Invariants
//! - A batch is validated (CRC, lengths, counts, size) before anything is written, and its
//!   bytes are stored as received apart from the stamped fields that precede the CRC.
//! - Reads return whole batches exactly as stored; they never return a byte that recovery
//!   would truncate.
//! - This crate knows nothing of gRPC, Raft or topics. All calls block; async callers run
//!   them off the reactor.
//!
//! ```
//! use conveyor_storage::{LogConfig, PartitionLog, batch::{BatchBuilder, BatchIter, Compression, Record}};
//! use bytes::Bytes;
//!
//! let dir = tempfile::tempdir()?;
//! let log = PartitionLog::open(dir.path(), LogConfig::default())?;
//! let mut builder = BatchBuilder::new(Compression::None);
//! builder.push(&Record { timestamp: 1, key: Some(Bytes::from("k")), value: Some(Bytes::from("v")), headers: vec![] });
//! let appended = log.append(&builder.build()?)?;
//! assert_eq!(appended.base_offset, 0);
//! let bytes = log.read(0, 1 << 20)?;
//! let batch = BatchIter::new(bytes).next().expect("one batch")?;
//! assert_eq!(batch.records()?.next().expect("one record")?.value, Some(Bytes::from("v")));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod batch;
pub mod cleaner;
pub mod config;
#[cfg(feature = "crash-sim")]
pub mod crash_sim;
#[cfg(not(feature = "crash-sim"))]
mod crash_sim;
pub mod error;
pub mod file_names;
pub(crate) mod index;
pub mod log;
mod lookup;
pub mod producer_state;
mod read_in_place;
mod recovery;
mod retention;
pub mod scrub;
mod segment;
mod sync;

pub use batch::{unix_millis, unix_millis_coarse};
pub use cleaner::{CleanBounds, CleanReport, CompactionPolicy, DirtyStats, IoThrottle};
pub use config::{FlushPolicy, LogConfig};
pub use error::{BatchError, LogError};
pub use log::{AppendInfo, BatchPosition, PartitionLog};
pub use lookup::batch_headers_read_on_this_thread;
pub use recovery::{CutCause, Damaged, LogCut, RecoveryReport};
pub use retention::RetentionOutcome;
pub use scrub::{BatchStamp, CorruptBatch, OnDamage, ScrubCursor, ScrubStep};
pub use sync::{SyncObserver, replace_file_durably};
