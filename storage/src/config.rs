//! Per-log configuration.

use std::time::Duration;

use crate::error::LogError;

/// When appended bytes are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// fsync before `append` returns. Concurrent appenders share fsyncs (group commit): one
    /// fsync covers every append that was written before it started.
    Always,
    /// fsync when this much time has passed since the last one, checked on append and by
    /// [`crate::PartitionLog::flush_if_due`], which the owner calls on a timer.
    Interval(Duration),
    /// Leave it to the operating system's writeback. A crash of the machine may lose
    /// acknowledged appends; a crash of the process does not.
    Os,
}

/// Configuration of one partition log. Defaults follow Kafka's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll the active segment when appending would take it past this size.
    pub segment_bytes: u64,
    /// Roll the active segment when its first batch is this old.
    pub segment_ms: Duration,
    /// Bytes of log between two sparse index entries.
    pub index_interval_bytes: u64,
    /// Preallocated size of each index file; a full index rolls the segment.
    pub max_index_bytes: u64,
    /// Delete whole segments whose newest record is older than this; `None` keeps forever.
    pub retention_ms: Option<Duration>,
    /// Delete the oldest whole segments while the log is larger than this; `None` for no limit.
    pub retention_bytes: Option<u64>,
    /// Largest batch accepted by `append`.
    pub max_batch_bytes: usize,
    pub flush: FlushPolicy,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 1 << 30,
            segment_ms: Duration::from_secs(7 * 24 * 3600),
            index_interval_bytes: 4096,
            max_index_bytes: 10 << 20,
            retention_ms: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_bytes: None,
            max_batch_bytes: 1 << 20,
            flush: FlushPolicy::Always,
        }
    }
}

/// Milliseconds of `d`, saturating, so "keep forever" never wraps negative.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Segment positions are stored as u32 in the offset index.
const MAX_SEGMENT_BYTES: u64 = u32::MAX as u64;

impl LogConfig {
    /// Rejects settings the log cannot honour, naming the field.
    pub fn validate(&self) -> Result<(), LogError> {
        let fail = |msg: String| Err(LogError::InvalidConfig(msg));
        if self.segment_bytes < 1024 || self.segment_bytes > MAX_SEGMENT_BYTES {
            return fail(format!(
                "segment_bytes must be in [1024, {MAX_SEGMENT_BYTES}], got {}",
                self.segment_bytes
            ));
        }
        if self.index_interval_bytes == 0 {
            return fail("index_interval_bytes must be positive".into());
        }
        if self.max_index_bytes < 64 {
            return fail(format!(
                "max_index_bytes must be at least 64, got {}",
                self.max_index_bytes
            ));
        }
        if self.segment_ms.is_zero() {
            return fail("segment_ms must be positive".into());
        }
        if self.max_batch_bytes < crate::batch::HEADER_LEN || self.max_batch_bytes as u64 > self.segment_bytes {
            return fail(format!(
                "max_batch_bytes must be between the batch header size and segment_bytes, got {}",
                self.max_batch_bytes
            ));
        }
        if let FlushPolicy::Interval(d) = self.flush
            && d.is_zero()
        {
            return fail("flush interval must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_the_field() {
        LogConfig::default().validate().expect("defaults");
        let bad = LogConfig {
            segment_bytes: 10,
            ..LogConfig::default()
        };
        let err = bad.validate().expect_err("too small").to_string();
        assert!(err.contains("segment_bytes"), "{err}");
        let bad = LogConfig {
            max_batch_bytes: 1 << 31,
            segment_bytes: 1 << 20,
            ..LogConfig::default()
        };
        assert!(
            bad.validate()
                .expect_err("batch > segment")
                .to_string()
                .contains("max_batch_bytes")
        );
    }
}
