//! Durability: group commit, explicit flushes, the recovery point and the clean-shutdown
//! marker.
//!
//! # Group commit
//! An appender that needs durability waits until `durable >= its end offset`. If no fsync is
//! running it becomes the leader: it notes the active segment's end, fsyncs, publishes that
//! end as durable and wakes everyone. Appenders that wrote while the fsync ran are covered by
//! the next one, so N concurrent appenders share far fewer than N fsyncs.
//!
//! # Crash behaviour
//! `recovery-point` is replaced atomically (write temp, fsync, rename, fsync directory). A
//! stale value only makes recovery scan more. The clean-shutdown marker is removed, durably,
//! at open, so a later crash can never be mistaken for a clean close.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{LogError, Result};
use crate::file_names::{CLEAN_SHUTDOWN, RECOVERY_POINT};
use crate::log::PartitionLog;

#[derive(Debug)]
struct SyncState {
    durable: u64,
    syncing: bool,
    last_sync: Instant,
}

#[derive(Debug)]
pub(crate) struct GroupCommit {
    state: Mutex<SyncState>,
    done: Condvar,
}

impl GroupCommit {
    pub(crate) fn new(durable: u64) -> Self {
        GroupCommit {
            state: Mutex::new(SyncState {
                durable,
                syncing: false,
                last_sync: Instant::now(),
            }),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn durable(&self) -> u64 {
        self.lock().durable
    }

    pub(crate) fn mark_durable(&self, offset: u64) {
        let mut st = self.lock();
        st.durable = st.durable.max(offset);
        st.last_sync = Instant::now();
        drop(st);
        self.done.notify_all();
    }

    /// After truncation nothing above the new end can be durable.
    pub(crate) fn lower_durable(&self, offset: u64) {
        let mut st = self.lock();
        st.durable = st.durable.min(offset);
    }

    pub(crate) fn wake_all(&self) {
        self.done.notify_all();
    }
}

impl PartitionLog {
    /// Blocks until every offset below `target` is fsynced, sharing fsyncs with concurrent
    /// callers.
    pub(crate) fn sync_to(&self, target: u64) -> Result<()> {
        let mut st = self.commit.lock();
        loop {
            self.check_poisoned()?;
            if st.durable >= target {
                return Ok(());
            }
            if st.syncing {
                st = self
                    .commit
                    .done
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            st.syncing = true;
            drop(st);
            let active = self.active();
            let covered = active.next_offset();
            let result = active.sync_log();
            st = self.commit.lock();
            st.syncing = false;
            if let Err(e) = result {
                drop(st);
                self.poison("fsync", &e);
                return Err(e);
            }
            st.durable = st.durable.max(covered);
            st.last_sync = Instant::now();
            self.commit.done.notify_all();
        }
    }

    /// fsyncs if the last fsync is older than `every` (the `Interval` flush policy). The owner
    /// of the log calls this on a timer so that an idle log is flushed too.
    pub fn sync_if_older_than(&self, every: Duration) -> Result<()> {
        let due = {
            let st = self.commit.lock();
            !st.syncing && st.last_sync.elapsed() >= every && st.durable < self.log_end_offset()
        };
        if due {
            self.sync_to(self.log_end_offset())?;
        }
        Ok(())
    }

    /// Applies the `Interval` flush policy if that is the configured one.
    pub fn flush_if_due(&self) -> Result<()> {
        if let crate::FlushPolicy::Interval(every) = self.lock_writer().config.flush {
            self.sync_if_older_than(every)?;
        }
        Ok(())
    }

    /// fsyncs everything appended so far, indexes included, and advances the recovery point
    /// so that a later crash recovery scans only what came after.
    pub fn flush(&self) -> Result<()> {
        let mut writer = self.lock_writer();
        self.check_poisoned()?;
        let end = self.log_end_offset();
        let active = self.active();
        let result = active
            .sync_log()
            .and_then(|()| active.flush_indexes())
            .and_then(|()| write_recovery_point(&self.dir, end));
        if let Err(e) = result {
            self.poison("flush", &e);
            return Err(e);
        }
        writer.recovery_point = end;
        self.commit.mark_durable(end);
        Ok(())
    }

    /// Flushes, trims the active indexes and leaves the clean-shutdown marker, so the next
    /// open skips recovery. The log refuses appends afterwards.
    pub fn close(&self) -> Result<()> {
        self.flush()?;
        let _writer = self.lock_writer();
        self.check_poisoned()?;
        self.mark_closed();
        self.active().seal()?;
        let marker = self.dir.join(CLEAN_SHUTDOWN);
        File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(LogError::io("write clean-shutdown marker", &marker))?;
        sync_dir(&self.dir)
    }
}

/// fsyncs a directory so that file creations, renames and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(LogError::io("fsync directory", dir))
}

/// Durably replaces the recovery-point file: `[offset: u64 LE][crc32 of those 8 bytes]`.
pub(crate) fn write_recovery_point(dir: &Path, offset: u64) -> Result<()> {
    let path = dir.join(RECOVERY_POINT);
    let tmp = dir.join(format!("{RECOVERY_POINT}.tmp"));
    let mut content = offset.to_le_bytes().to_vec();
    content.extend_from_slice(&crc32fast::hash(&offset.to_le_bytes()).to_le_bytes());
    let mut file = File::create(&tmp).map_err(LogError::io("create", &tmp))?;
    file.write_all(&content)
        .and_then(|()| file.sync_all())
        .map_err(LogError::io("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(LogError::io("rename", &path))?;
    sync_dir(dir)
}

/// The recorded recovery point, or `None` when absent or damaged.
pub(crate) fn read_recovery_point(dir: &Path) -> Option<u64> {
    let content = fs::read(dir.join(RECOVERY_POINT)).ok()?;
    if content.len() != 12 {
        return None;
    }
    let offset = u64::from_le_bytes(content[..8].try_into().ok()?);
    let crc = u32::from_le_bytes(content[8..].try_into().ok()?);
    (crc32fast::hash(&content[..8]) == crc).then_some(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_point_round_trips_and_damage_reads_as_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_recovery_point(dir.path()), None);
        write_recovery_point(dir.path(), 1234).expect("write");
        assert_eq!(read_recovery_point(dir.path()), Some(1234));
        let path = dir.path().join(RECOVERY_POINT);
        let mut bytes = fs::read(&path).expect("read");
        bytes[0] ^= 1;
        fs::write(&path, bytes).expect("write");
        assert_eq!(read_recovery_point(dir.path()), None);
    }
}
