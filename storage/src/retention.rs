//! Removing data: retention (whole segments from the front) and truncation (a suffix, for
//! Raft conflicts, or everything, when a follower restarts from a snapshot).
//!
//! # Crash behaviour
//! Segments are deleted by renaming their files to `*.deleted` and then unlinking them; open
//! removes any `*.deleted` left by a crash. Truncation deletes later segments last-first before
//! cutting the one that holds the new end, so a crash part-way leaves a shorter but
//! contiguous log. The recovery point is lowered, durably, before truncation returns, so
//! recovery never trusts bytes that were cut and rewritten.

use std::fs;
use std::sync::Arc;

use crate::config::FlushPolicy;
use crate::error::{LogError, Result};
use crate::log::{PartitionLog, Writer};
use crate::segment::{IndexCursor, Segment};
use crate::sync::{sync_dir, write_recovery_point};

/// What a retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
}

impl PartitionLog {
    /// Deletes every segment all of whose offsets are below `offset`. The active segment is
    /// never deleted. Returns the number of segments deleted.
    pub fn delete_segments_before(&self, offset: u64) -> Result<usize> {
        let _writer = self.lock_writer();
        let segments = self.segments_snapshot();
        let count = segments
            .windows(2)
            .take_while(|pair| pair[1].base_offset() <= offset)
            .count();
        self.delete_prefix(count).map(|o| o.segments_deleted)
    }

    /// Applies `retention_ms` and `retention_bytes` at time `now_ms`: deletes the oldest
    /// segments whose newest record is older than the time limit, then the oldest while the
    /// log exceeds the size limit. Whole segments only; never the active one.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<RetentionOutcome> {
        let writer = self.lock_writer();
        let count = self.expired_segments(&writer, now_ms);
        self.delete_prefix(count)
    }

    /// The log start offset that [`enforce_retention`](Self::enforce_retention) would leave at
    /// `now_ms`, or `None` if it would delete nothing. Lets a replica record its snapshot point
    /// before the segments go.
    pub fn retention_cutoff(&self, now_ms: i64) -> Option<u64> {
        let writer = self.lock_writer();
        let count = self.expired_segments(&writer, now_ms);
        (count > 0).then(|| self.read_segments()[count].base_offset())
    }

    /// How many of the oldest segments retention would delete.
    fn expired_segments(&self, writer: &Writer, now_ms: i64) -> usize {
        let segments = self.segments_snapshot();
        let sealed = &segments[..segments.len() - 1];
        let mut count = 0;
        if let Some(limit) = writer.config.retention_ms {
            let cutoff = now_ms.saturating_sub(crate::config::millis(limit));
            count = sealed.iter().take_while(|s| s.max_timestamp() < cutoff).count();
        }
        if let Some(limit) = writer.config.retention_bytes {
            let total: u64 = segments.iter().map(|s| s.size()).sum();
            let mut excess = total.saturating_sub(limit);
            let mut by_size = 0;
            for s in sealed {
                if excess < s.size() {
                    break;
                }
                excess -= s.size();
                by_size += 1;
            }
            count = count.max(by_size);
        }
        count
    }

    /// Deletes the first `count` segments; the caller holds the writer lock.
    fn delete_prefix(&self, count: usize) -> Result<RetentionOutcome> {
        if count == 0 {
            return Ok(RetentionOutcome::default());
        }
        self.check_poisoned()?;
        let removed: Vec<Arc<Segment>> = {
            let mut segments = self.write_segments();
            let count = count.min(segments.len() - 1);
            let removed = segments.drain(..count).collect();
            self.log_start_offset
                .store(segments[0].base_offset(), std::sync::atomic::Ordering::Release);
            removed
        };
        let mut outcome = RetentionOutcome::default();
        for segment in &removed {
            outcome.bytes_deleted += segment.size();
            outcome.segments_deleted += 1;
            remove_segment_files(segment)?;
        }
        tracing::info!(
            dir = %self.dir.display(),
            segments = outcome.segments_deleted,
            bytes = outcome.bytes_deleted,
            log_start_offset = self.log_start_offset(),
            "deleted segments"
        );
        Ok(outcome)
    }

    /// Drops every batch at or above `offset`, which must be a batch boundary (Raft truncates
    /// whole entries). A no-op at or past the log end.
    pub fn truncate_to(&self, offset: u64) -> Result<()> {
        let mut writer = self.lock_writer();
        self.check_poisoned()?;
        let end = self.log_end_offset();
        if offset >= end {
            return Ok(());
        }
        if offset < self.log_start_offset() {
            return Err(LogError::OffsetOutOfRange {
                requested: offset,
                log_start_offset: self.log_start_offset(),
                log_end_offset: end,
            });
        }
        // Before the cut: what is appended after it must be cleaned as new (a crash between
        // the two leaves a checkpoint lower than needed, which only costs cleaning).
        self.lower_cleaner_checkpoint(offset)?;
        let segments = self.segments_snapshot();
        let keep = segments.partition_point(|s| s.base_offset() <= offset);
        let target = Arc::clone(&segments[keep - 1]);
        let position = if offset == target.base_offset() {
            0
        } else {
            let found = target.locate(offset)?.ok_or(LogError::OffsetOutOfRange {
                requested: offset,
                log_start_offset: self.log_start_offset(),
                log_end_offset: end,
            })?;
            if found.header.base_offset != offset {
                return Err(LogError::NotBatchBoundary {
                    offset,
                    batch_start: found.header.base_offset,
                });
            }
            found.position
        };
        self.lower_recovery_point(&mut writer, offset)?;
        let result = self.cut(&segments[keep..], &target, position, offset, &writer);
        if let Err(e) = result {
            self.poison("truncation", &e);
            return Err(e);
        }
        writer.cursor = target.index_cursor();
        tracing::info!(dir = %self.dir.display(), from = end, to = offset, "truncated log");
        Ok(())
    }

    fn cut(
        &self,
        later: &[Arc<Segment>],
        target: &Arc<Segment>,
        position: u64,
        offset: u64,
        writer: &Writer,
    ) -> Result<()> {
        // First, so that an fsync already running cannot publish the old end as durable.
        self.commit.lower_durable(offset);
        for segment in later.iter().rev() {
            self.write_segments().pop();
            remove_segment_files(segment)?;
        }
        target.truncate(position, offset, None)?;
        target.unseal(writer.config.max_index_bytes)?;
        self.log_end_offset.store(offset, std::sync::atomic::Ordering::Release);
        if writer.config.flush != FlushPolicy::Os {
            self.sync_all(Some(offset), false)?;
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn lower_recovery_point(&self, writer: &mut Writer, offset: u64) -> Result<()> {
        if writer.recovery_point > offset {
            write_recovery_point(&self.dir, offset)?;
            writer.recovery_point = offset;
        }
        Ok(())
    }

    /// Empties the log and restarts it at `offset`, for a follower that installs a snapshot
    /// because the leader no longer has the entries it needs.
    pub fn truncate_fully_and_start_at(&self, offset: u64) -> Result<()> {
        let mut writer = self.lock_writer();
        self.check_poisoned()?;
        self.lower_cleaner_checkpoint(offset)?;
        write_recovery_point(&self.dir, 0)?;
        writer.recovery_point = 0;
        let result = {
            // Held across the file operations so that no reader or syncer sees an empty list.
            let mut segments = self.write_segments();
            let result = segments
                .iter()
                .rev()
                .try_for_each(|s| remove_segment_files(s))
                .and_then(|()| {
                    let fresh = Segment::open(&self.dir, offset, Some(writer.config.max_index_bytes))?;
                    sync_dir(&self.dir)?;
                    write_recovery_point(&self.dir, offset)?;
                    Ok(Arc::new(fresh))
                });
            if let Ok(fresh) = &result {
                *segments = vec![Arc::clone(fresh)];
            }
            result
        };
        if let Err(e) = result {
            self.poison("reset", &e);
            return Err(e);
        }
        writer.recovery_point = offset;
        writer.cursor = IndexCursor {
            last_indexed_position: 0,
            last_indexed_timestamp: i64::MIN,
        };
        self.commit.reset(offset);
        self.log_start_offset
            .store(offset, std::sync::atomic::Ordering::Release);
        self.log_end_offset.store(offset, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

fn remove_segment_files(segment: &Segment) -> Result<()> {
    for path in segment.paths() {
        let mut deleted = path.clone().into_os_string();
        deleted.push(".deleted");
        match fs::rename(&path, &deleted) {
            Ok(()) => fs::remove_file(&deleted).map_err(LogError::io("delete segment file", &deleted))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogError::io("rename segment file", &path)(e)),
        }
    }
    Ok(())
}
