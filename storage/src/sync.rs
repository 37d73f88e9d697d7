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
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{LogError, Result};
use crate::file_names::{CLEAN_SHUTDOWN, RECOVERY_POINT};
use crate::log::PartitionLog;

/// Receives the duration of each fsync round of a log's segment files: the fsync calls alone,
/// no waiting for the token and no writes. The storage crate knows no metrics; its user
/// (the broker) feeds a histogram from this.
#[derive(Clone)]
pub struct SyncObserver(Arc<dyn Fn(Duration) + Send + Sync>);

impl SyncObserver {
    pub fn new(observe: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        SyncObserver(Arc::new(observe))
    }
}

impl std::fmt::Debug for SyncObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncObserver")
    }
}

#[derive(Debug)]
struct SyncState {
    durable: u64,
    /// The fsync token: at most one fsync of this log runs at a time, so a failure is recorded
    /// before anyone else can fsync (Linux reports a writeback error only once).
    syncing: bool,
    last_sync: Instant,
    /// Sticky: after a failed write or fsync nothing more is ever marked durable.
    failed: Option<String>,
    /// Bumped whenever durability moves backwards (truncation), so an fsync that started
    /// before cannot publish an end that now covers different bytes.
    generation: u64,
}

/// Proof of holding the fsync token.
#[derive(Debug)]
pub(crate) struct SyncToken {
    generation: u64,
    durable: u64,
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
                failed: None,
                generation: 0,
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

    /// Truncation: nothing at or above `offset` is durable any more.
    pub(crate) fn lower_durable(&self, offset: u64) {
        let mut st = self.lock();
        st.durable = st.durable.min(offset);
        st.generation += 1;
    }

    /// A reset log is empty at `offset`, so everything below it counts as durable.
    pub(crate) fn reset(&self, offset: u64) {
        let mut st = self.lock();
        st.durable = offset;
        st.generation += 1;
    }

    /// Why the log failed, if it did: the first failure recorded.
    pub(crate) fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    pub(crate) fn fail(&self, reason: String) {
        let mut st = self.lock();
        st.failed.get_or_insert(reason);
        drop(st);
        self.done.notify_all();
    }

    pub(crate) fn wake_all(&self) {
        self.done.notify_all();
    }

    /// Waits for the fsync token. With `target`, returns `None` instead once everything below
    /// it is durable. `check` runs under the lock on every wake-up and may refuse.
    fn acquire(&self, target: Option<u64>, check: impl Fn() -> Result<()>) -> Result<Option<SyncToken>> {
        let mut st = self.lock();
        loop {
            if target.is_some_and(|t| st.durable >= t) {
                return Ok(None);
            }
            if let Some(reason) = &st.failed {
                return Err(LogError::Poisoned { reason: reason.clone() });
            }
            check()?;
            if !st.syncing {
                st.syncing = true;
                return Ok(Some(SyncToken {
                    generation: st.generation,
                    durable: st.durable,
                }));
            }
            st = self.done.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn release(&self, token: SyncToken, outcome: std::result::Result<u64, String>) {
        let mut st = self.lock();
        st.syncing = false;
        match outcome {
            Ok(covered) if st.generation == token.generation => {
                st.durable = st.durable.max(covered);
                st.last_sync = Instant::now();
            }
            Ok(_) => {}
            Err(reason) => {
                st.failed.get_or_insert(reason);
            }
        }
        drop(st);
        self.done.notify_all();
    }
}

impl PartitionLog {
    /// Blocks until every offset below `target` is fsynced, sharing fsyncs with concurrent
    /// callers.
    pub(crate) fn sync_to(&self, target: u64) -> Result<()> {
        loop {
            let check = || {
                if self.is_closed() {
                    return Err(LogError::Closed);
                }
                let end = self.log_end_offset();
                if target > end {
                    return Err(LogError::Truncated {
                        requested: target,
                        log_end_offset: end,
                    });
                }
                Ok(())
            };
            match self.commit.acquire(Some(target), check)? {
                None => return Ok(()),
                Some(token) => {
                    self.sync_with(token, None, false)?;
                }
            }
        }
    }

    /// Takes the fsync token unconditionally (roll, flush, close).
    pub(crate) fn sync_all(&self, from: Option<u64>, indexes: bool) -> Result<u64> {
        let token = self.commit.acquire(None, || Ok(()))?;
        match token {
            Some(token) => self.sync_with(token, from, indexes),
            None => Ok(self.commit.durable()),
        }
    }

    /// fsyncs every segment holding offsets at or above `from` (default: the durable offset),
    /// and their indexes if asked, then releases the token, publishing the new durable end.
    fn sync_with(&self, token: SyncToken, from: Option<u64>, indexes: bool) -> Result<u64> {
        let from = from.map_or(token.durable, |f| f.min(token.durable));
        // The active segment and any before it still holding offsets at or above `from` (a
        // suffix of the list, usually the active segment alone), taken without copying the
        // whole list: fsync runs with no lock held.
        let segments: Vec<_> = {
            let all = self.read_segments();
            let older = all.iter().rev().skip(1).take_while(|s| s.next_offset() > from).count();
            all[all.len().saturating_sub(older + 1)..].to_vec()
        };
        let covered = segments.last().map_or(from, |s| s.next_offset());
        let started = Instant::now();
        let result = segments.iter().try_for_each(|s| {
            s.sync_log()?;
            if indexes {
                s.flush_indexes()?;
            }
            Ok(())
        });
        if let Some(observer) = self.sync_observer.get() {
            (observer.0)(started.elapsed());
        }
        match result {
            Ok(()) => {
                self.commit.release(token, Ok(covered));
                Ok(covered)
            }
            Err(e) => {
                self.commit.release(token, Err(format!("fsync: {e}")));
                self.poison("fsync", &e);
                Err(e)
            }
        }
    }

    /// Reports the duration of every later fsync round of this log to `observer`. Only the
    /// first observer set counts.
    pub fn observe_syncs(&self, observer: SyncObserver) {
        let _ = self.sync_observer.set(observer);
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
        let policy = self.flush_policy();
        if let crate::FlushPolicy::Interval(every) = policy {
            self.sync_if_older_than(every)?;
        }
        Ok(())
    }

    /// fsyncs everything appended so far, indexes included, and advances the recovery point
    /// so that a later crash recovery scans only what came after.
    pub fn flush(&self) -> Result<()> {
        let mut writer = self.lock_writer();
        self.flush_locked(&mut writer)
    }

    fn flush_locked(&self, writer: &mut crate::log::Writer) -> Result<()> {
        self.check_poisoned()?;
        let end = self.sync_all(Some(writer.recovery_point), true)?;
        if let Err(e) = write_recovery_point(&self.dir, end) {
            self.poison("recovery point write", &e);
            return Err(e);
        }
        writer.recovery_point = end;
        Ok(())
    }

    /// Flushes, trims the active indexes and leaves the clean-shutdown marker, so the next
    /// open skips recovery. The log refuses appends and other changes afterwards.
    pub fn close(&self) -> Result<()> {
        let mut writer = self.lock_writer();
        self.flush_locked(&mut writer)?;
        self.mark_closed();
        self.active().seal()?;
        let marker = self.dir.join(CLEAN_SHUTDOWN);
        let file = File::create(&marker)
            .and_then(|f| f.sync_all().map(|()| f))
            .map_err(LogError::io("write clean-shutdown marker", &marker))?;
        crate::crash_sim::file_synced(&marker, &file);
        sync_dir(&self.dir)
    }
}

/// fsyncs a directory so that file creations, renames and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(LogError::io("fsync directory", dir))?;
    crate::crash_sim::dir_synced(dir);
    Ok(())
}

/// Replaces `dir/name` with `content` so that a crash leaves either the old file or the new
/// one, whole: written to `name.tmp`, fsynced, renamed over, directory fsynced.
pub fn replace_file_durably(dir: &Path, name: &str, content: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp).map_err(LogError::io("create", &tmp))?;
    file.write_all(content)
        .and_then(|()| file.sync_all())
        .map_err(LogError::io("write", &tmp))?;
    crate::crash_sim::file_synced(&tmp, &file);
    fs::rename(&tmp, &path).map_err(LogError::io("rename", &path))?;
    crate::crash_sim::renamed(&tmp, &path);
    sync_dir(dir)
}

/// Durably replaces the recovery-point file: `[offset: u64 LE][crc32 of those 8 bytes]`.
pub(crate) fn write_recovery_point(dir: &Path, offset: u64) -> Result<()> {
    let mut content = offset.to_le_bytes().to_vec();
    content.extend_from_slice(&crc32fast::hash(&offset.to_le_bytes()).to_le_bytes());
    replace_file_durably(dir, RECOVERY_POINT, &content)
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
    fn the_sync_observer_hears_each_fsync_round() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = PartitionLog::open(dir.path(), crate::LogConfig::default()).expect("open");
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = Arc::clone(&rounds);
        log.observe_syncs(SyncObserver::new(move |_| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }));
        let mut b = crate::batch::BatchBuilder::new(crate::batch::Compression::None);
        b.push(&crate::batch::Record {
            timestamp: 1,
            value: Some(bytes::Bytes::from_static(b"x")),
            ..crate::batch::Record::default()
        });
        log.append(&b.build().expect("batch")).expect("append");
        log.sync_to(log.log_end_offset()).expect("sync");
        assert_eq!(
            rounds.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "one fsync round, one observation"
        );
        log.sync_to(log.log_end_offset()).expect("sync");
        assert_eq!(
            rounds.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "nothing new to make durable: no fsync, nothing observed"
        );
    }

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
