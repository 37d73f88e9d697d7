//! Typed errors, split by operation: [`BatchError`] for a batch that fails validation or
//! decoding, [`LogError`] for everything the partition log does.
//!
//! Retriable and terminal conditions are separate variants; [`LogError::is_retriable`] tells
//! a caller which is which.

use std::path::PathBuf;

/// Why a record batch was refused or could not be decoded. Nothing is written when an append
/// fails with one of these.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchError {
    #[error("batch is {len} bytes, shorter than the {min}-byte header")]
    TooShort { len: usize, min: usize },
    #[error("batch length field says {declared} bytes follow it, but {actual} do")]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("batch is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("batch format version {0} is not supported (this broker reads version 1)")]
    UnsupportedVersion(u8),
    #[error("batch compression codec {0} is not supported (0 none, 1 lz4, 2 zstd)")]
    UnsupportedCompression(u8),
    #[error("batch attributes {0:#06x} set reserved bits")]
    ReservedAttributes(u16),
    #[error("batch CRC mismatch: header says {expected:#010x}, content hashes to {actual:#010x}")]
    CrcMismatch { expected: u32, actual: u32 },
    #[error("batch header declares {declared} records but the batch holds {actual}")]
    CountMismatch { declared: u32, actual: u32 },
    #[error("a non-control batch must hold at least one record")]
    Empty,
    #[error("record {index} is malformed: {reason}")]
    InvalidRecord { index: u32, reason: &'static str },
    #[error("batch header is inconsistent: {0}")]
    InvalidHeader(&'static str),
    #[error("batch payload could not be decompressed: {0}")]
    Decompress(String),
    #[error("batch payload could not be compressed: {0}")]
    Compress(String),
    /// A record without a key, in a batch for a log that keeps the latest record per key.
    #[error("record {index} has no key")]
    KeylessRecord { index: u32 },
    /// A compressed batch whose records would decompress to more than the limit.
    #[error("batch records decompress to {size} bytes, over the limit of {limit} bytes")]
    InflatesTooLarge { size: usize, limit: usize },
}

/// Errors of [`crate::PartitionLog`] operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("offset {requested} is outside the log [{log_start_offset}, {log_end_offset}]")]
    OffsetOutOfRange {
        requested: u64,
        log_start_offset: u64,
        log_end_offset: u64,
    },
    #[error("replicated batch starts at offset {got}, but the log ends at {expected}")]
    NonContiguous { expected: u64, got: u64 },
    #[error("offset {offset} is not a batch boundary; the batch holding it starts at {batch_start}")]
    NotBatchBoundary { offset: u64, batch_start: u64 },
    #[error(
        "log is poisoned after a failed {reason}; reopen it to recover (no append is retried over a possibly lost write)"
    )]
    Poisoned { reason: String },
    #[error("log is closed")]
    Closed,
    #[error("offset {requested} was truncated away (the log now ends at {log_end_offset}) before it became durable")]
    Truncated { requested: u64, log_end_offset: u64 },
    #[error("log at {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LogError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| LogError::Io { op, path, source }
    }

    /// True when the same call may succeed later without reopening the log or changing input.
    pub fn is_retriable(&self) -> bool {
        match self {
            LogError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;
