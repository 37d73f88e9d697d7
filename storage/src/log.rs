//! [`PartitionLog`]: the segmented, append-only log of one partition.
//!
//! # On-disk format
//! A directory of segments (see [`crate::segment`]) named by base offset, plus two small
//! files: `recovery-point` (offset below which every batch is known to be on disk) and
//! `.clean_shutdown` (present only between a clean close and the next open).
//!
//! # Invariants
//! - `log_start_offset` is the base offset of the first segment; `log_end_offset` is the
//!   offset the next appended batch gets. Offsets are contiguous across segments.
//! - Only the last segment (the active one) is appended to. Retention deletes whole segments
//!   and never the active one.
//! - Bad input is rejected before anything is written.
//!
//! # Crash behaviour
//! Under [`FlushPolicy::Always`] an append returns only after an fsync covers it. On open
//! after a crash, segments at or above the recovery point are scanned batch by batch and a
//! torn or corrupt tail is truncated (see [`crate::recovery`]). After a failed write or fsync
//! the log is poisoned and refuses appends and reads until reopened. A log in which the scrub
//! found a corrupt batch is quarantined the same way (see [`crate::scrub`]).
//!
//! # Thread-safety
//! `PartitionLog` is `Sync`: appends are serialised by an internal mutex (validation runs
//! before it, in parallel), reads take no lock beyond a short segment-list read lock and run
//! concurrently with appends.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use bytes::Bytes;

use crate::batch::{self, BatchHeader, RecordBatch};
use crate::config::{FlushPolicy, LogConfig};
use crate::error::{LogError, Result};
use crate::scrub::CorruptBatch;
use crate::segment::{IndexCursor, Segment};
use crate::sync::GroupCommit;

/// What an append produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: u64,
    pub last_offset: u64,
    /// The log end offset right after this append.
    pub next_offset: u64,
    pub max_timestamp: i64,
    pub record_count: u32,
}

/// Where the batch that holds an offset sits on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPosition {
    pub segment_base_offset: u64,
    pub position: u64,
    pub batch_base_offset: u64,
}

/// How long before a segment rolls by age [`PartitionLog::appends_in_memory`] stops saying
/// an append stays in memory: the roll must not fall due between the question and the append.
pub const ROLL_AGE_MARGIN_MS: i64 = 1_000;

/// The segments from the one that may hold `offset` onwards.
fn from_offset(segments: &[Arc<Segment>], offset: u64) -> Vec<Arc<Segment>> {
    let i = segments
        .partition_point(|s| s.base_offset() <= offset)
        .saturating_sub(1);
    segments[i..].to_vec()
}

/// State only the single writer touches.
#[derive(Debug)]
pub(crate) struct Writer {
    pub config: LogConfig,
    pub cursor: IndexCursor,
    pub recovery_point: u64,
}

/// The log of one partition. See the module documentation for its guarantees.
#[derive(Debug)]
pub struct PartitionLog {
    pub(crate) dir: PathBuf,
    pub(crate) segments: RwLock<Vec<Arc<Segment>>>,
    pub(crate) writer: Mutex<Writer>,
    pub(crate) log_start_offset: AtomicU64,
    pub(crate) log_end_offset: AtomicU64,
    pub(crate) max_batch_bytes: AtomicUsize,
    pub(crate) commit: GroupCommit,
    /// A copy of `config.flush`, readable without waiting for the writer.
    flush_policy: Mutex<FlushPolicy>,
    poisoned: AtomicBool,
    /// The first corrupt batch found at rest; reads are refused once set.
    quarantined: OnceLock<CorruptBatch>,
    closed: AtomicBool,
    /// What the open that produced this object cut (see [`crate::recovery`]).
    pub(crate) recovery: OnceLock<crate::recovery::RecoveryReport>,
    /// Told how long each fsync round took (see [`PartitionLog::observe_syncs`]).
    pub(crate) sync_observer: OnceLock<crate::sync::SyncObserver>,
    /// Whether the open that produced this object found the clean-shutdown marker and so
    /// trusted every segment without scanning it.
    pub(crate) opened_clean: AtomicBool,
    /// The cleaner checkpoint once read or written, and the last dirty stats (see
    /// [`crate::cleaner`]).
    cleaner_view: Mutex<crate::cleaner::CleanerView>,
    /// Counts truncations and resets: a cleaning pass that sees it change gives up its swaps.
    pub(crate) cuts: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PartitionLog {
    pub(crate) fn from_parts(
        dir: PathBuf,
        segments: Vec<Arc<Segment>>,
        config: LogConfig,
        recovery_point: u64,
    ) -> Self {
        let start = segments.first().map_or(0, |s| s.base_offset());
        let end = segments.last().map_or(0, |s| s.next_offset());
        let cursor = segments.last().map_or(
            IndexCursor {
                last_indexed_position: 0,
                last_indexed_timestamp: i64::MIN,
            },
            |s| s.index_cursor(),
        );
        PartitionLog {
            dir,
            segments: RwLock::new(segments),
            max_batch_bytes: AtomicUsize::new(config.max_batch_bytes),
            flush_policy: Mutex::new(config.flush),
            writer: Mutex::new(Writer {
                config,
                cursor,
                recovery_point,
            }),
            log_start_offset: AtomicU64::new(start),
            log_end_offset: AtomicU64::new(end),
            commit: GroupCommit::new(end),
            poisoned: AtomicBool::new(false),
            quarantined: OnceLock::new(),
            closed: AtomicBool::new(false),
            recovery: OnceLock::new(),
            sync_observer: OnceLock::new(),
            opened_clean: AtomicBool::new(false),
            cleaner_view: Mutex::new(crate::cleaner::CleanerView::default()),
            cuts: AtomicU64::new(0),
        }
    }

    pub(crate) fn cleaner_view(&self) -> MutexGuard<'_, crate::cleaner::CleanerView> {
        lock(&self.cleaner_view)
    }

    pub(crate) fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        lock(&self.writer)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True if the open that produced this object followed a clean close: no segment was
    /// scanned, and nothing was cut. Files a layer above wrote before that close (and has
    /// not changed since) describe the log as it is.
    pub fn opened_clean(&self) -> bool {
        self.opened_clean.load(Ordering::Acquire)
    }

    /// The first offset still in the log.
    pub fn log_start_offset(&self) -> u64 {
        self.log_start_offset.load(Ordering::Acquire)
    }

    /// The offset the next appended batch will get.
    pub fn log_end_offset(&self) -> u64 {
        self.log_end_offset.load(Ordering::Acquire)
    }

    /// Offset below which every batch has been fsynced.
    pub fn durable_offset(&self) -> u64 {
        self.commit.durable()
    }

    /// Bytes held by all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments_snapshot().iter().map(|s| s.size()).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.read_segments().len()
    }

    /// The configuration in force.
    pub fn config(&self) -> LogConfig {
        self.lock_writer().config.clone()
    }

    /// Replaces the configuration (for example after a topic config change). Takes effect
    /// from the next append; existing segments are not rewritten.
    pub fn set_config(&self, config: LogConfig) -> Result<()> {
        config.validate()?;
        self.max_batch_bytes.store(config.max_batch_bytes, Ordering::Release);
        let mut writer = self.lock_writer();
        *lock(&self.flush_policy) = config.flush;
        writer.config = config;
        Ok(())
    }

    pub(crate) fn read_segments(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Segment>>> {
        self.segments.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn write_segments(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Segment>>> {
        self.segments.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn segments_snapshot(&self) -> Vec<Arc<Segment>> {
        self.read_segments().clone()
    }

    pub(crate) fn active(&self) -> Arc<Segment> {
        let segments = self.read_segments();
        Arc::clone(segments.last().expect("a log always has an active segment"))
    }

    /// The base offset of the segment that holds `offset` (the last one starting at or
    /// before it), if any segment does.
    pub fn segment_base_of(&self, offset: u64) -> Option<u64> {
        let segments = self.read_segments();
        let i = segments.partition_point(|s| s.base_offset() <= offset);
        i.checked_sub(1).map(|i| segments[i].base_offset())
    }

    /// Segments from the one that may hold `offset` onwards.
    fn segments_from(&self, offset: u64) -> Vec<Arc<Segment>> {
        from_offset(&self.read_segments(), offset)
    }

    /// As [`segments_from`](Self::segments_from); in a read that must not wait, an error
    /// instead of waiting for a writer of the segment list.
    fn segments_from_for_read(&self, offset: u64) -> Result<Vec<Arc<Segment>>> {
        Ok(from_offset(
            &crate::read_in_place::read_lock(&self.segments, &self.dir)?,
            offset,
        ))
    }

    pub(crate) fn poison(&self, what: &str, err: &LogError) {
        tracing::error!(dir = %self.dir.display(), error = %err, "partition log poisoned after a failed {what}");
        let reason = format!("{what}: {err}");
        self.poisoned.store(true, Ordering::Release);
        self.commit.fail(reason);
    }

    /// Poisons the log because stored data is corrupt: reads fail from now on, not only
    /// appends.
    pub(crate) fn set_quarantined(&self, corrupt: CorruptBatch) {
        let reason = format!("scrub: {corrupt}");
        let _ = self.quarantined.set(corrupt);
        self.poisoned.store(true, Ordering::Release);
        self.commit.fail(reason);
    }

    /// The corrupt batch that quarantined this log, if any.
    pub fn quarantined(&self) -> Option<&CorruptBatch> {
        self.quarantined.get()
    }

    /// Refuses reads of a quarantined or poisoned log: its stored bytes may be damaged, or
    /// may include a write whose outcome is unknown.
    pub(crate) fn check_readable(&self) -> Result<()> {
        if let Some(c) = self.quarantined.get() {
            return Err(LogError::Corrupt {
                path: crate::file_names::segment_file(&self.dir, c.segment_base_offset, crate::file_names::LOG_SUFFIX),
                detail: format!("{c}; reads are refused until the log is reopened and repaired"),
            });
        }
        if self.poisoned.load(Ordering::Acquire) {
            let reason = self.commit.failure().unwrap_or_default();
            return Err(LogError::Poisoned { reason });
        }
        Ok(())
    }

    /// Refuses further appends after a clean close, without reporting a failure.
    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        self.commit.wake_all();
    }

    /// Retires this object because the partition is being reopened on the same directory
    /// (or its directory is going away): from now on it refuses appends, truncations,
    /// segment deletions and scrub steps, as after [`close`](Self::close), but flushes and
    /// writes nothing. Waits for a change already under way to finish first.
    pub fn retire(&self) {
        let _writer = self.lock_writer();
        self.mark_closed();
    }

    /// True once closed or retired: the object refuses every change to the directory.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn check_poisoned(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        if self.poisoned.load(Ordering::Acquire) {
            let reason = self.commit.failure().unwrap_or_default();
            return Err(LogError::Poisoned { reason });
        }
        Ok(())
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    fn out_of_range(&self, requested: u64) -> LogError {
        LogError::OffsetOutOfRange {
            requested,
            log_start_offset: self.log_start_offset(),
            log_end_offset: self.log_end_offset(),
        }
    }

    /// Reads whole batches starting with the one that holds `from`, up to `max_bytes` (but at
    /// least one batch), from a single segment. Returns stored bytes without decoding them.
    /// Empty at the log end; `OffsetOutOfRange` outside `[log_start_offset, log_end_offset]`.
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<Bytes> {
        self.read_up_to(from, max_bytes, u64::MAX)
    }

    /// As [`read_up_to`](Self::read_up_to) if every byte it needs is in the page cache;
    /// `None`, having waited on nothing, if one is not (or the kernel cannot tell). Only reads
    /// that start in the active segment are tried: its index, read through a memory map,
    /// was written recently and is resident (an older segment's may not be, and a page fault
    /// cannot be refused). For a reader at the tail, on a thread that must not wait on the
    /// disk (`docs/request_cost.md`).
    pub fn read_up_to_in_place(&self, from: u64, max_bytes: usize, max_offset: u64) -> Result<Option<Bytes>> {
        crate::read_in_place::without_waiting(|| {
            let active = self.segments_from_for_read(u64::MAX)?.first().map(|s| s.base_offset());
            if active.is_none_or(|active| from < active) {
                return Err(LogError::io("read in place", &self.dir)(
                    std::io::ErrorKind::WouldBlock.into(),
                ));
            }
            self.read_up_to(from, max_bytes, max_offset)
        })
    }

    /// As [`read`](Self::read), returning no batch whose base offset is `max_offset` or above
    /// (a replica passes its high watermark here).
    pub fn read_up_to(&self, from: u64, max_bytes: usize, max_offset: u64) -> Result<Bytes> {
        self.check_readable()?;
        let end = self.log_end_offset();
        if from < self.log_start_offset() || from > end {
            return Err(self.out_of_range(from));
        }
        let max_offset = max_offset.min(end);
        for segment in self.segments_from_for_read(from)? {
            let target = from.max(segment.base_offset());
            if target >= max_offset {
                break;
            }
            if let Some(found) = segment.locate(target)? {
                return segment.read_from(found.position, max_bytes, max_offset);
            }
        }
        Ok(Bytes::new())
    }

    /// Finds the batch holding `offset`: what a read starting there would look up.
    pub fn locate(&self, offset: u64) -> Result<Option<BatchPosition>> {
        for segment in self.segments_from(offset) {
            if let Some(found) = segment.locate(offset.max(segment.base_offset()))? {
                return Ok(Some(BatchPosition {
                    segment_base_offset: segment.base_offset(),
                    position: found.position,
                    batch_base_offset: found.header.base_offset,
                }));
            }
        }
        Ok(None)
    }

    /// The offset of the first record whose timestamp is at or after `timestamp`, or `None`
    /// when every record is older. Control batches are skipped.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<u64>> {
        self.check_readable()?;
        for segment in self.segments_snapshot() {
            if segment.max_timestamp() < timestamp {
                continue;
            }
            let entry = segment.time_index().last_before(timestamp);
            let start = match entry {
                Some(e) => segment
                    .locate(segment.base_offset() + u64::from(e.relative_offset))?
                    .map_or(0, |l| l.position),
                None => 0,
            };
            let mut from = start;
            loop {
                let mut candidate: Option<(u64, BatchHeader)> = None;
                segment.scan_headers(from, segment.size(), |position, h| {
                    if h.max_timestamp >= timestamp && h.record_count > 0 && !h.is_control() {
                        candidate = Some((position, *h));
                        return false;
                    }
                    true
                })?;
                let Some((position, header)) = candidate else { break };
                let bytes = segment.read_exact_at(position, header.size())?.freeze();
                let batch = RecordBatch::parse(bytes)?;
                for record in batch.records()? {
                    let record = record?;
                    if record.timestamp >= timestamp {
                        return Ok(Some(record.offset));
                    }
                }
                from = position + header.size() as u64;
            }
        }
        Ok(None)
    }

    /// Appends a batch as the leader: validates it, stamps the next offset (leader epoch and
    /// Raft index 0) and writes it. Returns after the flush policy is met.
    pub fn append(&self, batch: &[u8]) -> Result<AppendInfo> {
        let info = self.append_inner(batch, Some((0, 0)))?;
        self.apply_flush_policy(info.next_offset)?;
        Ok(info)
    }

    /// As [`append`](Self::append) but returns once the batch is written, before the flush
    /// policy is applied. A caller that appends several batches in a row then calls
    /// [`apply_flush_policy`](Self::apply_flush_policy) once, so one fsync covers them all.
    pub fn append_unsynced(&self, batch: &[u8]) -> Result<AppendInfo> {
        self.append_inner(batch, Some((0, 0)))
    }

    /// Makes everything below `next_offset` as durable as the flush policy requires: fsyncs
    /// under `Always` (shared with concurrent callers), fsyncs if due under `Interval`.
    pub fn apply_flush_policy(&self, next_offset: u64) -> Result<()> {
        match self.flush_policy() {
            FlushPolicy::Always => self.sync_to(next_offset),
            FlushPolicy::Interval(every) => self.sync_if_older_than(every),
            FlushPolicy::Os => Ok(()),
        }
    }

    /// Whether appending `batches` batches of `bytes` bytes in all, then applying the flush
    /// policy, would be only writes to the page cache: no fsync is due (flush `os`; `always`
    /// or `interval` with nothing to append and nothing unsynced), the active segment has
    /// room for all of them (no roll, which creates files and syncs, with a margin of
    /// [`ROLL_AGE_MARGIN_MS`] before it rolls by age), and nobody else holds the writer
    /// (retention, scrub, a flush). The broker writes such appends on the partition's own
    /// task instead of a blocking thread (`docs/request_cost.md`). A `false` is always safe.
    /// The answer holds for the log's single appender, which asks right before it appends;
    /// what another thread may do in between is in `docs/request_cost.md`.
    pub fn appends_in_memory(&self, batches: usize, bytes: u64) -> bool {
        if self.is_poisoned() || self.is_closed() {
            return false;
        }
        let Ok(writer) = self.writer.try_lock() else {
            return false;
        };
        let unsynced = self.commit.durable() < self.log_end_offset();
        // `interval` syncs whenever its time has come, which may be by the time the append
        // is persisted: only a round that appends nothing and finds nothing unsynced is safe.
        if self.flush_policy() != FlushPolicy::Os && (batches > 0 || unsynced) {
            return false;
        }
        if batches == 0 {
            return true;
        }
        let active = self.active();
        let age_ms = batch::unix_millis().saturating_sub(active.created_ms());
        let index_entries = usize::try_from(bytes / writer.config.index_interval_bytes.max(1)).unwrap_or(usize::MAX);
        // As `roll_if_needed` decides, for the whole run of appends at once.
        active.size() + bytes <= writer.config.segment_bytes
            && age_ms.saturating_add(ROLL_AGE_MARGIN_MS) < crate::config::millis(writer.config.segment_ms)
            && active.indexes_have_room(index_entries.saturating_add(1))
    }

    /// The largest batch the log takes, as configured now.
    pub fn max_batch_bytes(&self) -> usize {
        self.max_batch_bytes.load(Ordering::Acquire)
    }

    pub fn flush_policy(&self) -> FlushPolicy {
        *lock(&self.flush_policy)
    }

    /// As [`append`](Self::append), stamping the given leader epoch and Raft index.
    pub fn append_as_leader(&self, batch: &[u8], leader_epoch: u64, raft_index: u64) -> Result<AppendInfo> {
        let info = self.append_inner(batch, Some((leader_epoch, raft_index)))?;
        self.apply_flush_policy(info.next_offset)?;
        Ok(info)
    }

    /// Appends a batch that already carries its offsets (follower path). Its base offset must
    /// equal the log end offset.
    pub fn append_replicated(&self, batch: &[u8]) -> Result<AppendInfo> {
        let info = self.append_inner(batch, None)?;
        self.apply_flush_policy(info.next_offset)?;
        Ok(info)
    }

    /// Appends a batch validated already (the broker validates a whole request before
    /// proposing any of it), written but not yet synced, stamping the leader epoch and Raft
    /// index of the entry that carries it. Every replica appends the same entries in the same
    /// order, so every replica stamps the same offsets. The batch is validated again only if
    /// this log's size limit is smaller than the one it passed.
    pub fn append_validated_stamped_unsynced(
        &self,
        batch: &batch::ValidatedBatch,
        leader_epoch: u64,
        raft_index: u64,
    ) -> Result<AppendInfo> {
        let limit = self.max_batch_bytes.load(Ordering::Acquire);
        let header = if batch.limit() > limit && batch.header().is_compacted() {
            // A cleaned batch a compacted leader replicates: only its frame can be checked.
            batch::validate::check_frame(batch.bytes(), limit)?
        } else if batch.limit() > limit {
            batch::validate(batch.bytes(), limit)?
        } else {
            *batch.header()
        };
        self.write_batch(batch.bytes(), header, Some((leader_epoch, raft_index)))
    }

    /// Calls `visit` with the header of every batch from the one holding `from` to the end,
    /// reading headers only, until it returns false.
    pub fn for_each_batch_header(&self, from: u64, mut visit: impl FnMut(&BatchHeader) -> bool) -> Result<()> {
        for segment in self.segments_from(from) {
            let start = match segment.locate(from.max(segment.base_offset()))? {
                Some(found) => found.position,
                None => continue,
            };
            let mut go_on = true;
            segment.scan_headers(start, segment.size(), |_, h| {
                go_on = visit(h);
                go_on
            })?;
            if !go_on {
                break;
            }
        }
        Ok(())
    }

    fn append_inner(&self, batch: &[u8], stamp: Option<(u64, u64)>) -> Result<AppendInfo> {
        self.check_poisoned()?;
        let header = batch::validate(batch, self.max_batch_bytes.load(Ordering::Acquire))?;
        self.write_batch(batch, header, stamp)
    }

    /// Stamps and writes a validated batch under the writer lock.
    fn write_batch(&self, batch: &[u8], header: BatchHeader, stamp: Option<(u64, u64)>) -> Result<AppendInfo> {
        let mut writer = self.lock_writer();
        self.check_poisoned()?;
        let end = self.log_end_offset.load(Ordering::Acquire);
        let (leader_epoch, raft_index) = match stamp {
            Some(s) => s,
            None if header.base_offset != end => {
                return Err(LogError::NonContiguous {
                    expected: end,
                    got: header.base_offset,
                });
            }
            None => (header.leader_epoch, header.raft_index),
        };
        let stamped = BatchHeader {
            base_offset: end,
            leader_epoch,
            raft_index,
            ..header
        };
        self.roll_if_needed(&mut writer, &stamped)?;
        let prefix = batch::stamped_prefix(batch, end, leader_epoch, raft_index);
        let active = self.active();
        let interval = writer.config.index_interval_bytes;
        if let Err(e) = active.append(&prefix, batch, &stamped, &mut writer.cursor, interval) {
            self.poison("write", &e);
            return Err(e);
        }
        self.log_end_offset.store(stamped.next_offset(), Ordering::Release);
        let info = AppendInfo {
            base_offset: end,
            last_offset: stamped.last_offset(),
            next_offset: stamped.next_offset(),
            max_timestamp: stamped.max_timestamp,
            record_count: stamped.record_count,
        };
        Ok(info)
    }

    fn roll_if_needed(&self, writer: &mut Writer, next: &BatchHeader) -> Result<()> {
        let active = self.active();
        let size = active.size();
        if size == 0 {
            return Ok(());
        }
        let age_ms = batch::unix_millis().saturating_sub(active.created_ms());
        let full = size + next.size() as u64 > writer.config.segment_bytes
            || age_ms >= crate::config::millis(writer.config.segment_ms)
            || active.indexes_full()
            || next.last_offset() - active.base_offset() > u64::from(u32::MAX);
        if full {
            self.roll(writer, next.base_offset)?;
        }
        Ok(())
    }

    /// Seals the active segment and starts a new one at `base_offset`.
    pub(crate) fn roll(&self, writer: &mut Writer, base_offset: u64) -> Result<()> {
        let old = self.active();
        let durable = writer.config.flush != FlushPolicy::Os;
        if durable {
            // Everything before the new segment is on disk before the recovery point moves.
            self.sync_all(Some(writer.recovery_point), true)?;
        }
        let result = (|| {
            old.seal()?;
            let segment = Segment::open(&self.dir, base_offset, Some(writer.config.max_index_bytes))?;
            if durable {
                crate::sync::sync_dir(&self.dir)?;
                crate::sync::write_recovery_point(&self.dir, base_offset)?;
                writer.recovery_point = base_offset;
            }
            Ok(segment)
        })();
        let segment = match result {
            Ok(s) => s,
            Err(e) => {
                self.poison("segment roll", &e);
                return Err(e);
            }
        };
        tracing::debug!(dir = %self.dir.display(), base_offset, "rolled segment");
        self.write_segments().push(Arc::new(segment));
        writer.cursor = IndexCursor {
            last_indexed_position: 0,
            last_indexed_timestamp: i64::MIN,
        };
        Ok(())
    }
}
