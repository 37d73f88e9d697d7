//! Key-based compaction: keeping the latest record per key of a log (`docs/compaction.md`).
//!
//! # What a pass does
//! The log is split at the cleaner checkpoint (`cleaner-offset`, the first offset no pass has
//! cleaned yet) into a clean section below it and a dirty section above. The cleanable part
//! ends at the first segment that is the active one, holds an offset at or above the
//! committed end the caller gives, or holds a record younger than `min.compaction.lag.ms`.
//! A pass:
//! 1. builds a [`key_map`] of key → offset of its latest record over the dirty section, up to
//!    the memory it is given (a dirty section with more keys is cleaned in several passes:
//!    the map's end becomes the new checkpoint);
//! 2. rewrites every cleanable segment below the map's end, in groups of consecutive
//!    segments that together fit one segment, keeping a record unless the map holds a later
//!    offset for its key; control batches, keyless records and every batch header are kept,
//!    so offsets and Raft indexes do not change and an emptied batch stays as a header;
//! 3. gives each batch that keeps a tombstone and lies wholly below the map's end a delete
//!    horizon of now + `delete.retention.ms`, and drops tombstones whose batch's horizon has
//!    passed (and that lie below the caller's tombstone floor);
//! 4. swaps each group's new segment in (see [`swap`]) and records the new checkpoint.
//!
//! # Threads and locks
//! A pass blocks: the broker runs it on cleaner threads, never on the reactor. Reading and
//! writing happen without the log's writer lock (only sealed, committed segments are
//! touched, and they do not change); the swap takes it and gives up if a group's segments
//! were deleted or replaced in the meantime (retention, a truncation, a reset).

pub(crate) mod key_map;
pub(crate) mod swap;
mod throttle;

use std::fs;
use std::sync::Arc;

use bytes::Bytes;

use crate::batch::{self, BatchHeader, BatchIter, CRC_AT, Rewritten};
use crate::error::{LogError, Result};
use crate::index::{Entry, TimeEntry};
use crate::log::PartitionLog;
use crate::segment::{IndexCursor, Segment};
pub use swap::{CLEANER_DIR, SWAP_MARKER};
pub use throttle::IoThrottle;

use key_map::{KeyHash, KeyMap};

/// The file holding the cleaner checkpoint: `FIRST_DIRTY_OFFSET LAST_CLEANED_MS`.
pub const CHECKPOINT_FILE: &str = "cleaner-offset";
/// Bytes read from a segment at once while cleaning (more for a larger batch).
const READ_CHUNK: usize = 1 << 20;

/// A topic's compaction settings, as Kafka names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompactionPolicy {
    /// `min.cleanable.dirty.ratio`: clean once dirty bytes are this share of the cleanable log.
    pub min_cleanable_dirty_ratio: f64,
    /// `min.compaction.lag.ms`: a record stays uncompacted at least this long.
    pub min_compaction_lag_ms: i64,
    /// `max.compaction.lag.ms`: a dirty record older than this makes the log due whatever its
    /// dirty ratio; `None` for no limit.
    pub max_compaction_lag_ms: Option<i64>,
    /// `delete.retention.ms`: how long a tombstone stays after a pass first cleaned it.
    pub delete_retention_ms: i64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            min_cleanable_dirty_ratio: 0.5,
            min_compaction_lag_ms: 0,
            max_compaction_lag_ms: None,
            delete_retention_ms: 24 * 3600 * 1000,
        }
    }
}

/// What the caller knows that the log does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CleanBounds {
    /// Offsets below this are committed; nothing at or above it is cleaned.
    pub committed_end: u64,
    /// Tombstones at or above this offset are kept whatever their horizon: replicas that
    /// have not reached it yet still need them.
    pub tombstone_floor: u64,
    /// The clock, in ms since the epoch.
    pub now_ms: i64,
}

/// Where cleaning of a log stands.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DirtyStats {
    /// Bytes of cleanable segments below the checkpoint.
    pub clean_bytes: u64,
    /// Bytes of cleanable segments at or above it.
    pub dirty_bytes: u64,
    pub first_dirty_offset: u64,
    /// The first offset a pass may not touch now.
    pub cleanable_end: u64,
    /// Timestamp of the first dirty batch, when there is one.
    pub oldest_dirty_ms: Option<i64>,
}

impl DirtyStats {
    /// Dirty bytes over all cleanable bytes (0 when nothing is cleanable).
    pub fn dirty_ratio(&self) -> f64 {
        let total = self.clean_bytes + self.dirty_bytes;
        if total == 0 {
            0.0
        } else {
            self.dirty_bytes as f64 / total as f64
        }
    }

    /// Whether `policy` calls for a pass now.
    pub fn due(&self, policy: &CompactionPolicy, now_ms: i64) -> bool {
        if self.dirty_bytes == 0 {
            return false;
        }
        let overdue = match (policy.max_compaction_lag_ms, self.oldest_dirty_ms) {
            (Some(lag), Some(oldest)) => oldest <= now_ms.saturating_sub(lag),
            _ => false,
        };
        overdue || self.dirty_ratio() >= policy.min_cleanable_dirty_ratio
    }
}

/// What a pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// Segments, bytes and records of the rewritten range before and after.
    pub segments_before: usize,
    pub segments_after: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub records_before: u64,
    pub records_after: u64,
    pub tombstones_dropped: u64,
    /// Bytes read (map building and rewriting) and written.
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Keys in the map, and the bytes the map allocated.
    pub keys: usize,
    pub key_map_bytes: usize,
    /// The checkpoint after the pass.
    pub cleaned_up_to: u64,
    /// Groups whose swap was given up because the log changed under the pass.
    pub groups_skipped: usize,
    /// Of `records_after`, those of producers (not in control batches).
    pub data_records_after: u64,
    /// When the log now starts with segments that hold no record of a producer (every one
    /// superseded), the offset where they end: the caller may delete them as retention
    /// does, through Raft's log compaction (`docs/compaction.md`). `None` or the log start
    /// when there are none.
    pub empty_up_to: Option<u64>,
}

/// What a log object remembers of its cleaning (see [`PartitionLog::last_dirty_stats`]).
#[derive(Debug, Default)]
pub(crate) struct CleanerView {
    checkpoint: Option<Checkpoint>,
    stats: Option<DirtyStats>,
}

/// The checkpoint file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Checkpoint {
    pub first_dirty: u64,
    pub last_cleaned_ms: Option<i64>,
}

impl Checkpoint {
    fn read(dir: &std::path::Path) -> Result<Checkpoint> {
        let path = dir.join(CHECKPOINT_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checkpoint::default()),
            Err(e) => return Err(LogError::io("read cleaner checkpoint", &path)(e)),
        };
        let mut parts = text.split_whitespace().map(str::parse::<i64>);
        match (parts.next(), parts.next()) {
            (Some(Ok(first)), Some(Ok(at))) if first >= 0 => Ok(Checkpoint {
                first_dirty: first as u64,
                last_cleaned_ms: Some(at),
            }),
            // A damaged checkpoint only costs a pass over the whole log.
            _ => {
                tracing::warn!(path = %path.display(), "unreadable cleaner checkpoint; the next pass cleans from the log start");
                Ok(Checkpoint::default())
            }
        }
    }

    fn write(&self, dir: &std::path::Path) -> Result<()> {
        let text = format!("{} {}\n", self.first_dirty, self.last_cleaned_ms.unwrap_or(0));
        crate::sync::replace_file_durably(dir, CHECKPOINT_FILE, text.as_bytes())
    }
}

/// The cleanable prefix of `segments` (never the active one).
fn cleanable<'a>(segments: &'a [Arc<Segment>], bounds: &CleanBounds, policy: &CompactionPolicy) -> &'a [Arc<Segment>] {
    let sealed = &segments[..segments.len().saturating_sub(1)];
    let lag_cutoff = bounds.now_ms.saturating_sub(policy.min_compaction_lag_ms);
    let n = sealed
        .iter()
        .take_while(|s| s.next_offset() <= bounds.committed_end && s.max_timestamp() <= lag_cutoff)
        .count();
    &sealed[..n]
}

impl PartitionLog {
    fn checkpoint(&self) -> Result<Checkpoint> {
        if let Some(c) = self.cleaner_view().checkpoint {
            return Ok(c);
        }
        // Read without the view's lock: `last_dirty_stats` and `last_cleaned_ms` take it on
        // the broker's reactor and must never wait for the disk. Two first reads at once
        // read the same file.
        let c = Checkpoint::read(&self.dir)?;
        Ok(*self.cleaner_view().checkpoint.get_or_insert(c))
    }

    /// Moves the cleaner checkpoint down to `offset` if it is above: the log is being cut
    /// there, and whatever is appended from there on has never been cleaned. Also makes a
    /// pass under way give up its swaps and keep the checkpoint where it is. Durable before
    /// it returns. The caller holds the writer lock (or is opening the log).
    pub(crate) fn lower_cleaner_checkpoint(&self, offset: u64) -> Result<()> {
        self.cuts.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let current = self.checkpoint()?;
        if current.first_dirty > offset {
            let lowered = Checkpoint {
                first_dirty: offset,
                ..current
            };
            lowered.write(&self.dir)?;
            self.cleaner_view().checkpoint = Some(lowered);
        }
        Ok(())
    }

    /// When a pass last finished, if one did and this object has read or written the
    /// checkpoint since it opened (it reads it on the first [`dirty_stats`](Self::dirty_stats)).
    /// Never touches the disk.
    pub fn last_cleaned_ms(&self) -> Option<i64> {
        self.cleaner_view().checkpoint.and_then(|c| c.last_cleaned_ms)
    }

    /// What the last [`dirty_stats`](Self::dirty_stats) found, if it ran on this object.
    /// Never touches the disk.
    pub fn last_dirty_stats(&self) -> Option<DirtyStats> {
        self.cleaner_view().stats
    }

    /// Where cleaning stands under `policy` and `bounds`. Reads the checkpoint file once,
    /// and a batch header; blocks.
    pub fn dirty_stats(&self, policy: &CompactionPolicy, bounds: &CleanBounds) -> Result<DirtyStats> {
        let checkpoint = self.checkpoint()?;
        let segments = self.segments_snapshot();
        let cleanable = cleanable(&segments, bounds, policy);
        let start = self.log_start_offset();
        let cleanable_end = cleanable.last().map_or(start, |s| s.next_offset());
        let first_dirty = checkpoint.first_dirty.clamp(start, cleanable_end.max(start));
        let (mut clean_bytes, mut dirty_bytes) = (0, 0);
        for s in cleanable {
            if s.next_offset() <= first_dirty {
                clean_bytes += s.size();
            } else {
                dirty_bytes += s.size();
            }
        }
        let oldest_dirty_ms = if first_dirty < cleanable_end {
            first_record_batch(cleanable, first_dirty)?.map(|h| h.first_timestamp)
        } else {
            None
        };
        let stats = DirtyStats {
            clean_bytes,
            dirty_bytes,
            first_dirty_offset: first_dirty,
            cleanable_end,
            oldest_dirty_ms,
        };
        self.cleaner_view().stats = Some(stats);
        Ok(stats)
    }

    /// Seals the active segment if its first batch was appended `max_age_ms` or more before
    /// `now_ms`, so that `max.compaction.lag.ms` can reach records in it (the cleaner never
    /// touches the active segment). True if it rolled.
    pub fn roll_if_older_than(&self, now_ms: i64, max_age_ms: i64) -> Result<bool> {
        let mut writer = self.lock_writer();
        self.check_poisoned()?;
        let active = self.active();
        if active.size() == 0 || now_ms.saturating_sub(active.created_ms()) < max_age_ms {
            return Ok(false);
        }
        self.roll(&mut writer, self.log_end_offset())?;
        Ok(true)
    }

    /// Runs one cleaning pass if `policy` calls for one (or whenever there is anything
    /// cleanable, with `force`); `None` when it did nothing. `key_map_bytes` bounds the key
    /// map's memory; `throttle` paces reads and writes. Blocks; see the module documentation.
    pub fn clean(
        &self,
        policy: &CompactionPolicy,
        bounds: &CleanBounds,
        key_map_bytes: usize,
        throttle: &IoThrottle,
        force: bool,
    ) -> Result<Option<CleanReport>> {
        self.check_readable()?;
        self.check_poisoned()?;
        // Before the stats: a cut after this is seen by the swaps and the checkpoint write.
        let cuts = self.cuts.load(std::sync::atomic::Ordering::Acquire);
        let stats = self.dirty_stats(policy, bounds)?;
        if stats.cleanable_end <= self.log_start_offset() || !(force || stats.due(policy, bounds.now_ms)) {
            return Ok(None);
        }
        let segments = self.segments_snapshot();
        let cleanable: Vec<Arc<Segment>> = cleanable(&segments, bounds, policy).to_vec();
        let mut report = CleanReport::default();
        let first_dirty = stats.first_dirty_offset;
        let map_end = if first_dirty < stats.cleanable_end {
            let mut map = KeyMap::new(
                key_map_bytes,
                Self::records_estimate(&cleanable, first_dirty, stats.dirty_bytes)?,
            );
            let end = build_map(
                &cleanable,
                first_dirty,
                stats.cleanable_end,
                &mut map,
                throttle,
                &mut report,
            )?;
            if end == first_dirty {
                return Err(LogError::InvalidConfig(format!(
                    "the cleaner's key map ({key_map_bytes} bytes) cannot hold a single key"
                )));
            }
            report.keys = map.len();
            report.key_map_bytes = map.allocated_bytes();
            let skipped_from = self.rewrite(&cleanable, &map, end, policy, bounds, throttle, cuts, &mut report)?;
            // A group given up stays as it was: the next pass cleans it as dirty.
            skipped_from.map_or(end, |at| at.min(end))
        } else {
            // Forced with nothing dirty: a pass over the clean section drops expired tombstones.
            let map = KeyMap::new(0, 0);
            let skipped_from = self.rewrite(
                &cleanable,
                &map,
                stats.cleanable_end,
                policy,
                bounds,
                throttle,
                cuts,
                &mut report,
            )?;
            skipped_from.map_or(first_dirty, |at| at.min(first_dirty))
        };
        report.cleaned_up_to = map_end;
        let checkpoint = Checkpoint {
            first_dirty: map_end,
            // When the pass ended (`now_ms` is when it started, or a test's clock).
            last_cleaned_ms: Some(bounds.now_ms.max(crate::batch::unix_millis())),
        };
        {
            let _writer = self.lock_writer();
            self.check_poisoned()?;
            // A cut meanwhile lowered the checkpoint: it stays as the cut left it.
            if self.cuts.load(std::sync::atomic::Ordering::Acquire) == cuts {
                checkpoint.write(&self.dir)?;
                self.cleaner_view().checkpoint = Some(checkpoint);
            }
        }
        self.dirty_stats(policy, bounds)?;
        Ok(Some(report))
    }

    /// About how many records `bytes` of log from `from` hold, from the first batch there
    /// (a quarter more, so the key map rarely has to grow).
    fn records_estimate(cleanable: &[Arc<Segment>], from: u64, bytes: u64) -> Result<usize> {
        let per_record = match first_record_batch(cleanable, from)? {
            Some(h) if h.record_count > 0 => (h.size() as u64 / u64::from(h.record_count)).max(8),
            _ => 8,
        };
        Ok(usize::try_from(bytes / per_record * 5 / 4 + 1024).unwrap_or(usize::MAX))
    }

    /// Rewrites the cleanable segments that start below `map_end` group by group, swapping
    /// each in. Records below `map_end` are judged by `map`; those above are kept. Returns
    /// the base offset of the first group whose swap was given up (the log changed under
    /// the pass, see `cuts`), if one was.
    #[allow(clippy::too_many_arguments)]
    fn rewrite(
        &self,
        cleanable: &[Arc<Segment>],
        map: &KeyMap,
        map_end: u64,
        policy: &CompactionPolicy,
        bounds: &CleanBounds,
        throttle: &IoThrottle,
        cuts: u64,
        report: &mut CleanReport,
    ) -> Result<Option<u64>> {
        let config = self.config();
        let targets: Vec<Arc<Segment>> = cleanable
            .iter()
            .filter(|s| s.base_offset() < map_end)
            .cloned()
            .collect();
        // The larger of the two index entries bounds how many a group's indexes take.
        let max_entries = config.max_index_bytes / <TimeEntry as Entry>::SIZE as u64;
        let mut groups: Vec<Vec<Arc<Segment>>> = Vec::new();
        for segment in targets {
            let fits = groups.last().is_some_and(|g| {
                let bytes: u64 = g.iter().map(|s| s.size()).sum::<u64>() + segment.size();
                let span = segment.next_offset() - g[0].base_offset();
                bytes <= config.segment_bytes
                    && span <= u64::from(u32::MAX)
                    && bytes / config.index_interval_bytes.max(1) < max_entries
            });
            match groups.last_mut() {
                Some(g) if fits => g.push(segment),
                _ => groups.push(vec![segment]),
            }
        }
        let rules = Rules {
            map,
            map_end,
            horizon: bounds.now_ms.saturating_add(policy.delete_retention_ms),
            now_ms: bounds.now_ms,
            tombstone_floor: bounds.tombstone_floor,
            max_batch_bytes: config.max_batch_bytes,
        };
        // The groups are consecutive from the first cleanable segment, which starts the log.
        report.empty_up_to = cleanable
            .first()
            .filter(|s| s.base_offset() == self.log_start_offset())
            .map(|s| s.base_offset());
        let pass = swap::new_pass_name();
        let staging = Staging {
            log: self,
            path: swap::staging_dir(&self.dir, &pass),
        };
        let staging = &staging.path;
        let mut skipped_from = None;
        for group in groups {
            if self.is_closed() {
                return Err(LogError::Closed);
            }
            let before = report.data_records_after;
            let staged = self.clean_group(&group, &rules, &config, staging, throttle, report)?;
            let end = group.last().map_or(0, |s| s.next_offset());
            if !self.swap_in(&group, staged, &pass, cuts)? {
                report.groups_skipped += 1;
                skipped_from.get_or_insert(group[0].base_offset());
            } else if report.data_records_after == before && report.empty_up_to == Some(group[0].base_offset()) {
                // Still a prefix of the log with no record of a producer left.
                report.empty_up_to = Some(end);
            }
        }
        Ok(skipped_from)
    }

    /// Writes the cleaned copy of `group` into the staging directory, synced.
    fn clean_group(
        &self,
        group: &[Arc<Segment>],
        rules: &Rules<'_>,
        config: &crate::config::LogConfig,
        staging: &std::path::Path,
        throttle: &IoThrottle,
        report: &mut CleanReport,
    ) -> Result<Segment> {
        // Under the writer lock, after the closed check: a log retired (its directory about to
        // be reopened or removed) gets no new staging directory. Never `create_dir_all`: a
        // partition directory deleted meanwhile must stay deleted.
        let _writer = self.lock_writer();
        self.check_poisoned()?;
        let mut created = false;
        for d in [staging.parent().unwrap_or(staging), staging] {
            match fs::create_dir(d) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(LogError::io("create cleaner directory", d)(e));
                }
                Err(_) => {}
                Ok(()) => created = true,
            }
        }
        if created {
            // The staged files must still be there after a power cut once the swap commits:
            // their directories' entries are made durable too.
            crate::sync::sync_dir(staging.parent().unwrap_or(staging))?;
            crate::sync::sync_dir(&self.dir)?;
        }
        let new = Segment::open(staging, group[0].base_offset(), Some(config.max_index_bytes))?;
        drop(_writer);
        let mut cursor = IndexCursor {
            last_indexed_position: 0,
            last_indexed_timestamp: i64::MIN,
        };
        report.segments_before += group.len();
        report.segments_after += 1;
        let mut hashes = Vec::new();
        for segment in group {
            report.bytes_before += segment.size();
            for_each_batch(segment, throttle, report, |batch, report| {
                let header = *batch.header();
                report.records_before += u64::from(header.record_count);
                let bytes = if header.is_control() {
                    batch.bytes().clone()
                } else {
                    match rules.apply(&batch, &mut hashes, report)? {
                        Rewritten::Unchanged => batch.bytes().clone(),
                        Rewritten::Changed(b) => b,
                    }
                };
                let header = BatchHeader::parse(&bytes)?;
                report.records_after += u64::from(header.record_count);
                if !header.is_control() {
                    report.data_records_after += u64::from(header.record_count);
                }
                let mut prefix = [0u8; CRC_AT];
                prefix.copy_from_slice(&bytes[..CRC_AT]);
                throttle.take(bytes.len() as u64);
                // Positions in the offset index are 32-bit.
                if new.size() + bytes.len() as u64 > u64::from(u32::MAX) {
                    return Err(LogError::InvalidConfig(
                        "a cleaned segment would pass 4 GiB; lower segment.bytes".into(),
                    ));
                }
                new.append(&prefix, &bytes, &header, &mut cursor, config.index_interval_bytes)
            })?;
        }
        new.seal()?;
        new.sync_log()?;
        new.flush_indexes()?;
        crate::sync::sync_dir(staging)?;
        report.bytes_written += new.size();
        report.bytes_after += new.size();
        crate::crash_sim::cleaner_step(swap::steps::WRITTEN);
        Ok(new)
    }

    /// Puts `staged` in place of `group` (see [`swap`]); false, changing nothing, if the
    /// group is no longer what the log holds there.
    fn swap_in(&self, group: &[Arc<Segment>], staged: Segment, pass: &str, cuts: u64) -> Result<bool> {
        let _writer = self.lock_writer();
        self.check_poisoned()?;
        // A cut since the pass started may have truncated a group segment in place and
        // refilled it: the same segment object, other batches.
        if self.cuts.load(std::sync::atomic::Ordering::Acquire) != cuts {
            return Ok(false);
        }
        let at = {
            let segments = self.read_segments();
            let at = segments.iter().position(|s| Arc::ptr_eq(s, &group[0]));
            at.filter(|&at| {
                at + group.len() < segments.len() && group.iter().zip(&segments[at..]).all(|(a, b)| Arc::ptr_eq(a, b))
            })
        };
        let Some(at) = at else {
            // Its files stay staged until the pass ends and removes the staging directory.
            return Ok(false);
        };
        let (size, next, max_timestamp) = (staged.size(), staged.next_offset(), staged.max_timestamp());
        let base = staged.base_offset();
        drop(staged);
        let change = swap::Swap {
            base,
            replaced: group.iter().map(|s| s.base_offset()).collect(),
            pass: pass.to_string(),
        };
        // A failed commit may still have reached the disk (the rename, not the directory
        // fsync): the log stops serving, and the next open finishes or rolls back.
        if let Err(e) = change.commit(&self.dir) {
            self.poison("compaction swap commit", &e);
            return Err(e);
        }
        // From the commit on, the next open finishes the swap: a failure here leaves the
        // directory between two states this object cannot describe, so it stops serving.
        let result = change.finish(&self.dir).and_then(|()| {
            let segment = Segment::open(&self.dir, base, None)?;
            segment.publish_state(size, next, max_timestamp)?;
            Ok(segment)
        });
        match result {
            Ok(segment) => {
                self.write_segments().splice(at..at + group.len(), [Arc::new(segment)]);
                Ok(true)
            }
            Err(e) => {
                self.poison("compaction swap", &e);
                Err(e)
            }
        }
    }
}

/// A pass's staging directory, removed when the pass ends however it ends (a panic
/// included), unless the log is poisoned: a swap that failed after its commit poisons it,
/// and its staged files are what the next open finishes the swap with.
struct Staging<'a> {
    log: &'a PartitionLog,
    path: std::path::PathBuf,
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        if self.log.is_poisoned() {
            return;
        }
        if let Err(e) = swap::remove_staging(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the cleaner's staging directory; the next open does");
        }
    }
}

/// Most batch headers looked at for the first batch with records after an offset.
const FIRST_RECORDS_LOOKAHEAD: usize = 64;

/// The header of the first batch at or after `offset` (in its segment, within a few
/// batches) that holds records of producers: not a control batch (whose timestamps are 0),
/// not an emptied one, and with no delete horizon. Looked up in `segments` themselves, so
/// position and file agree even if the log swapped a segment since.
fn first_record_batch(segments: &[Arc<Segment>], offset: u64) -> Result<Option<BatchHeader>> {
    let Some(segment) = segments.iter().rev().find(|s| s.base_offset() <= offset) else {
        return Ok(None);
    };
    let Some(found) = segment.locate(offset)? else {
        return Ok(None);
    };
    let (mut found_header, mut looked) = (None, 0);
    segment.scan_headers(found.position, segment.size(), |_, h| {
        looked += 1;
        if !h.is_control() && h.record_count > 0 && h.delete_horizon().is_none() {
            found_header = Some(*h);
            return false;
        }
        looked < FIRST_RECORDS_LOOKAHEAD
    })?;
    Ok(found_header)
}

/// Calls `visit` with every batch of `segment`, reading it in chunks paced by `throttle`.
/// Batches are CRC-checked: the cleaner never rewrites damage into a fresh, valid batch.
fn for_each_batch(
    segment: &Segment,
    throttle: &IoThrottle,
    report: &mut CleanReport,
    mut visit: impl FnMut(batch::RecordBatch, &mut CleanReport) -> Result<()>,
) -> Result<()> {
    let end = segment.size();
    let mut position = 0;
    let mut expected = segment.base_offset();
    while position < end {
        let chunk: Bytes = segment.read_from(position, READ_CHUNK, u64::MAX)?;
        if chunk.is_empty() {
            break;
        }
        throttle.take(chunk.len() as u64);
        report.bytes_read += chunk.len() as u64;
        for batch in BatchIter::new(chunk) {
            let batch = batch?;
            let at = position;
            position += batch.header().size() as u64;
            let corrupt = |detail: String| LogError::Corrupt {
                path: segment.log_path().to_path_buf(),
                detail: format!("the cleaner found a bad batch at byte {at}: {detail}"),
            };
            batch.verify_crc().map_err(|e| corrupt(e.to_string()))?;
            // The base offset sits before the CRC: checked against the batch before it.
            if batch.header().base_offset != expected {
                return Err(corrupt(format!(
                    "base offset {} where {expected} was due",
                    batch.header().base_offset
                )));
            }
            expected = batch.header().next_offset();
            visit(batch, report)?;
        }
    }
    Ok(())
}

/// Fills `map` with the latest offset of each key in `[from, to)`; returns where it stopped:
/// `to`, or the offset of the first record whose key did not fit.
fn build_map(
    cleanable: &[Arc<Segment>],
    from: u64,
    to: u64,
    map: &mut KeyMap,
    throttle: &IoThrottle,
    report: &mut CleanReport,
) -> Result<u64> {
    // One buffer for every batch's keys: their hashes are computed and their slots
    // prefetched before any lookup.
    let mut keyed: Vec<(u64, KeyHash)> = Vec::new();
    for segment in cleanable
        .iter()
        .filter(|s| s.next_offset() > from && s.base_offset() < to)
    {
        let mut full_at = None;
        for_each_batch(segment, throttle, report, |batch, _| {
            let header = batch.header();
            if full_at.is_some() || header.is_control() || header.next_offset() <= from {
                return Ok(());
            }
            keyed.clear();
            batch::PlainBatch::new(&batch)?.for_each_key(|offset, key| {
                if offset >= from {
                    let hash = map.hash(key);
                    map.prefetch(hash);
                    keyed.push((offset, hash));
                }
            })?;
            full_at = keyed
                .iter()
                .find(|&&(offset, hash)| !map.put(hash, offset))
                .map(|&(offset, _)| offset);
            Ok(())
        })?;
        if let Some(at) = full_at {
            return Ok(at);
        }
    }
    Ok(to)
}

/// What decides a record's fate in a pass.
struct Rules<'a> {
    map: &'a KeyMap,
    map_end: u64,
    /// The horizon given to batches that now keep a tombstone for the first time.
    horizon: i64,
    now_ms: i64,
    tombstone_floor: u64,
    /// The log's batch size limit, which a rewritten batch stays within.
    max_batch_bytes: usize,
}

impl Rules<'_> {
    /// Rewrites one batch by the rules; `hashes` is a buffer the caller keeps across
    /// batches.
    fn apply(
        &self,
        batch: &batch::RecordBatch,
        hashes: &mut Vec<KeyHash>,
        report: &mut CleanReport,
    ) -> Result<Rewritten> {
        let header = batch.header();
        let horizon_passed = header.delete_horizon().is_some_and(|h| h <= self.now_ms);
        let mut dropped_tombstones = 0;
        let plain = batch::PlainBatch::new(batch)?;
        // Every key's hash first, its slot prefetched, then the lookups (in record order).
        hashes.clear();
        if header.base_offset < self.map_end && self.map.len() > 0 {
            plain.for_each_key(|_, key| {
                let hash = self.map.hash(key);
                self.map.prefetch(hash);
                hashes.push(hash);
            })?;
        }
        let mut next_hash = hashes.iter();
        let rewritten = plain.rewrite(
            |r: batch::Judged<'_>| {
                if r.key.is_none() {
                    return true;
                }
                let hash = next_hash.next();
                if r.offset >= self.map_end {
                    return true;
                }
                let latest = hash
                    .and_then(|&h| self.map.get(h))
                    .is_none_or(|latest| latest <= r.offset);
                if latest && r.tombstone && horizon_passed && r.offset < self.tombstone_floor {
                    dropped_tombstones += 1;
                    return false;
                }
                latest
            },
            (header.next_offset() <= self.map_end).then_some(self.horizon),
            self.max_batch_bytes,
        )?;
        report.tombstones_dropped += dropped_tombstones;
        Ok(rewritten)
    }
}
