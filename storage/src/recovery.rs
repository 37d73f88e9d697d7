//! Opening a log: loading segments and recovering from a crash.
//!
//! # What open does
//! 1. Removes leftovers of interrupted operations (`*.deleted`, `*.tmp`, index files without a
//!    `.log`). If the scrub left a corruption marker, re-verifies the batch it names (frame,
//!    CRC, base offset): if it is intact, nothing was lost and the marker is removed; if it is
//!    damaged, cuts the log there (later segments deleted, the recovery point lowered so the cut
//!    segment is rescanned below); if it is already gone (an earlier open cut it), nothing is
//!    cut. Damaged or gone, the report says what the log held before
//!    ([`RecoveryReport::damaged`]) and the marker stays until the replication layer has
//!    recorded that and releases it (`PartitionLog::release_corruption_marker`), so a crash
//!    before then does not forget the loss.
//! 2. After a clean close (marker present) trusts every segment, checking only that the
//!    indexes are consistent with the `.log` files (rebuilding any that are not).
//! 3. After a crash, trusts segments that lie wholly below the recovery point and scans the
//!    rest batch by batch: for the segment holding the recovery point, from its last index
//!    entry below it; for later ones, from the start. Each batch's length, CRC and offset
//!    continuity is checked. At the first bad batch (short read, impossible length, CRC
//!    mismatch, offset gap) the segment is truncated there, later segments are deleted, and
//!    the number of bytes dropped is logged. A torn tail is never served. Before the cut, a
//!    bounded search (index entries past the bad frame, later segments) looks for intact
//!    batches after it: if there are any, the cut is damage, not a torn write
//!    ([`CutCause::Damage`], with the last intact batch's stamp).
//!
//! Every cut is reported (`PartitionLog::recovery_report`: where, how many bytes, torn tail
//! or damaged batch), and so is a damaged batch a marker names (with the stamp of the last
//! batch the log held before), so the replication layer can tell that entries it may have
//! acknowledged are gone, and which.
//!
//! # Limits
//! The stamped fields (base offset, leader epoch, Raft index) sit outside the CRC by design.
//! Recovery checks base offsets for continuity; a damaged leader epoch or Raft index is not
//! detectable here and is left to the replication layer.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::batch::{BatchHeader, HEADER_LEN, validate::check_frame};
use crate::config::LogConfig;
use crate::error::{LogError, Result};
use crate::file_names::{self, CLEAN_SHUTDOWN};
use crate::log::PartitionLog;
use crate::scrub::{self, BatchStamp, CorruptBatch, Marker};
use crate::segment::Segment;
use crate::sync::{read_recovery_point, sync_dir, write_recovery_point};

/// What opening a log cut from it, so the replication layer can tell that entries it may
/// have acknowledged are gone (see `PartitionLog::recovery_report`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The first cut made, if any: everything from its offset on was dropped.
    pub cut: Option<LogCut>,
    /// Set when a scrub's corruption marker named a batch found damaged that this open cut,
    /// or that an earlier open already cut: entries the log held were lost to damage at rest.
    pub damaged: Option<Damaged>,
}

/// What a log held before it was cut at a damaged batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Damaged {
    /// The stamp of the log's last batch when the damage was found: nothing after it was
    /// ever appended, so its replica acknowledged nothing newer. `None` when the marker was
    /// written before markers carried it (a quarantine that cannot read the stamp fails
    /// rather than write a marker without one): the caller must assume the worst.
    pub last_before: Option<BatchStamp>,
}

/// One cut made while opening a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogCut {
    /// The log ends here after the cut: the first offset dropped.
    pub offset: u64,
    /// Bytes dropped, later segments included.
    pub dropped_bytes: u64,
    /// Why.
    pub cause: CutCause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutCause {
    /// Crash recovery found a torn tail: a bad frame with nothing intact after it (bytes that
    /// were never fully written back).
    TornTail,
    /// Crash recovery found a bad frame with intact batches after it. That is what damage
    /// looks like, but also what a power cut can leave: the batches of one fsync reach the
    /// disk in any order, so later pages may be there while earlier ones are not. It is
    /// reported (and logged) for people, never taken as proof that the later batches were
    /// acknowledged. `last_intact` is the stamp of the last intact batch found past the bad
    /// frame (all of it was dropped with the cut).
    Damage { last_intact: BatchStamp },
    /// The scrub's corruption marker named a damaged batch, which was still there.
    CorruptBatch,
}

/// What the batch a marker names looks like now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkedBatch {
    /// It parses, starts at the named offset, and its frame and CRC check out: a false alarm.
    Intact,
    /// Still there, still damaged.
    Damaged,
    /// The segment ends at or before it (or is gone): an earlier open cut it.
    Gone,
}

/// Checks the batch the marker names in the segment.
fn marked_batch(file: &fs::File, path: &Path, len: u64, corrupt: &CorruptBatch) -> Result<MarkedBatch> {
    use std::os::unix::fs::FileExt;
    if len <= corrupt.position {
        return Ok(MarkedBatch::Gone);
    }
    let mut header = vec![0u8; HEADER_LEN];
    if corrupt.position + HEADER_LEN as u64 > len {
        return Ok(MarkedBatch::Damaged);
    }
    file.read_exact_at(&mut header, corrupt.position)
        .map_err(LogError::io("read marked batch", path))?;
    let Ok(h) = BatchHeader::parse(&header) else {
        return Ok(MarkedBatch::Damaged);
    };
    let size = h.size() as u64;
    if h.base_offset != corrupt.offset || size < HEADER_LEN as u64 || corrupt.position + size > len {
        return Ok(MarkedBatch::Damaged);
    }
    let mut whole = vec![0u8; size as usize];
    file.read_exact_at(&mut whole, corrupt.position)
        .map_err(LogError::io("read marked batch", path))?;
    Ok(if check_frame(&whole, usize::MAX).is_err() {
        MarkedBatch::Damaged
    } else {
        MarkedBatch::Intact
    })
}

/// Honours a corruption marker left by the scrub: re-verifies the batch it names and, if it
/// is still there and still damaged, cuts the log at it, dropping it and everything after it.
/// Returns the segment base offsets left, the cut made, if any, and what was lost, if
/// anything. Idempotent, so a crash part-way cuts again on the next open. The marker is
/// removed here only for a false alarm; otherwise the caller releases it once it has
/// recorded the loss (see the module docs).
fn cut_at_corrupt_batch(
    dir: &Path,
    bases: Vec<u64>,
    marker: &Marker,
) -> Result<(Vec<u64>, Option<LogCut>, Option<Damaged>)> {
    let corrupt = &marker.corrupt;
    let base = corrupt.segment_base_offset;
    let mut bases = bases;
    let mut cut = None;
    let path = file_names::segment_file(dir, base, file_names::LOG_SUFFIX);
    let (found, file) = if bases.binary_search(&base).is_ok() {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(LogError::io("open segment", &path))?;
        let len = file.metadata().map_err(LogError::io("stat segment", &path))?.len();
        (marked_batch(&file, &path, len, corrupt)?, Some((file, len)))
    } else {
        (MarkedBatch::Gone, None)
    };
    if let (MarkedBatch::Damaged, Some((file, len))) = (found, file) {
        // Recovery must rescan and reindex the cut segment: lower the recovery point to it and
        // drop the clean-shutdown marker before touching anything.
        if read_recovery_point(dir).is_none_or(|rp| rp > base) {
            write_recovery_point(dir, base)?;
        }
        let clean = dir.join(CLEAN_SHUTDOWN);
        if clean.exists() {
            fs::remove_file(&clean).map_err(LogError::io("remove clean-shutdown marker", &clean))?;
            sync_dir(dir)?;
        }
        let mut dropped_bytes = 0u64;
        let later: Vec<u64> = bases.iter().copied().filter(|&b| b > base).collect();
        for &b in later.iter().rev() {
            let path = file_names::segment_file(dir, b, file_names::LOG_SUFFIX);
            dropped_bytes += fs::metadata(&path).map_or(0, |m| m.len());
            delete_segment_files(dir, b)?;
        }
        dropped_bytes += len - corrupt.position;
        file.set_len(corrupt.position)
            .map_err(LogError::io("truncate segment", &path))?;
        crate::crash_sim::truncated(&path, corrupt.position);
        file.sync_all().map_err(LogError::io("fsync segment", &path))?;
        crate::crash_sim::file_synced(&path, &file);
        sync_dir(dir)?;
        tracing::warn!(
            dir = %dir.display(),
            offset = corrupt.offset,
            segment = base,
            position = corrupt.position,
            dropped_bytes,
            dropped_segments = later.len(),
            detail = %corrupt.detail,
            "cut the log at a corrupt batch found by the scrub; the replica catches up from its leader"
        );
        bases.retain(|&b| b <= base);
        cut = Some(LogCut {
            offset: corrupt.offset,
            dropped_bytes,
            cause: CutCause::CorruptBatch,
        });
    }
    if found == MarkedBatch::Intact {
        tracing::warn!(dir = %dir.display(), offset = corrupt.offset, segment = base, "the batch named by the corruption marker is intact; nothing to cut");
        scrub::remove_marker(dir)?;
        return Ok((bases, cut, None));
    }
    if found == MarkedBatch::Gone {
        tracing::warn!(dir = %dir.display(), offset = corrupt.offset, segment = base, "the batch named by the corruption marker was already cut; reporting the loss again");
    }
    let damaged = Damaged {
        last_before: marker.last_before,
    };
    Ok((bases, cut, Some(damaged)))
}

/// Bytes read per `pread` while validating a segment.
const RECOVERY_CHUNK: usize = 4 << 20;

impl PartitionLog {
    /// Opens the log in `dir`, creating it (starting at offset 0) if it does not exist, and
    /// recovering it if it was not closed cleanly.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<PartitionLog> {
        Self::open_at(dir, config, 0)
    }

    /// As [`open`](Self::open); a new log starts at `initial_offset`.
    pub fn open_at(dir: impl AsRef<Path>, config: LogConfig, initial_offset: u64) -> Result<PartitionLog> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(LogError::io("create log directory", &dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        // A compaction swap a crash interrupted is finished (or an unfinished cleaning rolled
        // back) before the segments are listed.
        crate::cleaner::swap::recover(&dir)?;
        let mut bases = clean_directory(&dir)?;
        let mut report = RecoveryReport::default();
        if let Some(marker) = scrub::read_marker(&dir)? {
            (bases, report.cut, report.damaged) = cut_at_corrupt_batch(&dir, bases, &marker)?;
        }
        let marker = dir.join(CLEAN_SHUTDOWN);
        let clean = marker.exists();
        if clean {
            fs::remove_file(&marker).map_err(LogError::io("remove clean-shutdown marker", &marker))?;
            sync_dir(&dir)?;
        }
        let recovery_point = if clean {
            u64::MAX
        } else {
            read_recovery_point(&dir).unwrap_or(0)
        };
        let segments = if bases.is_empty() {
            let segment = Segment::open(&dir, initial_offset, Some(config.max_index_bytes))?;
            sync_dir(&dir)?;
            vec![Arc::new(segment)]
        } else {
            let (segments, tail_cut) = load_segments(&dir, &bases, &config, recovery_point)?;
            report.cut = report.cut.or(tail_cut);
            segments
        };
        let mut recovery_point = recovery_point;
        if !clean && !bases.is_empty() {
            // What recovery kept may only be in the page cache: make it durable, then record
            // that, so a second crash never trusts bytes this open did not check or sync.
            let end = segments.last().map_or(0, |s| s.next_offset());
            for segment in segments
                .iter()
                .filter(|s| s.next_offset() > recovery_point || s.size() == 0)
            {
                segment.sync_log()?;
                segment.flush_indexes()?;
            }
            write_recovery_point(&dir, end)?;
            tracing::info!(dir = %dir.display(), recovery_point, log_end_offset = end, "recovered partition log after unclean shutdown");
            recovery_point = end;
        }
        let rp = recovery_point.min(segments.last().map_or(0, |s| s.next_offset()));
        let log = PartitionLog::from_parts(dir, segments, config, rp);
        // A cut at open (a torn tail, damage) may have gone below the cleaner checkpoint.
        log.lower_cleaner_checkpoint(log.log_end_offset())?;
        log.opened_clean
            .store(clean && report == RecoveryReport::default(), Ordering::Release);
        let _ = log.recovery.set(report);
        Ok(log)
    }

    /// What the open that produced this log cut from it, if anything: a replica uses it to
    /// tell that entries it may have acknowledged are gone.
    pub fn recovery_report(&self) -> RecoveryReport {
        self.recovery.get().cloned().unwrap_or_default()
    }
}

/// Deletes leftovers and returns the base offsets of the segments, sorted.
fn clean_directory(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(LogError::io("list log directory", dir))? {
        let entry = entry.map_err(LogError::io("list log directory", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".deleted") || name.ends_with(".tmp") {
            fs::remove_file(entry.path()).map_err(LogError::io("remove leftover", entry.path()))?;
        } else if let Some(base) = file_names::parse_log_name(&name) {
            bases.push(base);
        } else {
            names.push(name);
        }
    }
    bases.sort_unstable();
    for name in names {
        let stem = name.split('.').next().unwrap_or_default();
        let is_index = name.ends_with(".index") || name.ends_with(".timeindex");
        let orphan = stem.len() == 20 && stem.parse::<u64>().is_ok_and(|b| bases.binary_search(&b).is_err());
        if is_index && orphan {
            fs::remove_file(dir.join(&name)).map_err(LogError::io("remove orphan index", dir.join(&name)))?;
        }
    }
    Ok(bases)
}

/// Loads the segments, recovering those at or above the recovery point; returns them and the
/// torn tail cut, if one was.
fn load_segments(
    dir: &Path,
    bases: &[u64],
    config: &LogConfig,
    recovery_point: u64,
) -> Result<(Vec<Arc<Segment>>, Option<LogCut>)> {
    let mut cut = None;
    let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len());
    for (i, &base) in bases.iter().enumerate() {
        let next_base = bases.get(i + 1).copied();
        let trusted = next_base.is_some_and(|nb| nb <= recovery_point) || recovery_point == u64::MAX;
        let last = next_base.is_none();
        let segment = Segment::open(dir, base, (!trusted || last).then_some(config.max_index_bytes))?;
        if let Some(prev) = segments.last()
            && prev.next_offset() != base
        {
            return Err(LogError::Corrupt {
                path: segment.log_path().to_path_buf(),
                detail: format!(
                    "segment starts at {base} but the previous one ends at {}",
                    prev.next_offset()
                ),
            });
        }
        let truncated = if trusted {
            load_trusted(&segment, config)?;
            None
        } else {
            recover(&segment, recovery_point, config)?
        };
        // Later segments were written after the cut one: an intact batch there is newer than
        // any in it, and makes the bad frame damage, not a torn write (see `CutCause`).
        let truncated = match truncated {
            Some(Truncated { dropped, last_intact }) => {
                let mut later_intact = None;
                for &later in bases[i + 1..].iter().rev() {
                    let path = file_names::segment_file(dir, later, file_names::LOG_SUFFIX);
                    // A diagnosis only (see `CutCause::Damage`): a segment that cannot be read
                    // here is dropped with the cut anyway and must not fail the open.
                    let Ok(file) = fs::File::open(&path) else { break };
                    let Ok(len) = file.metadata().map(|m| m.len()) else {
                        break;
                    };
                    let read = |position: u64, len: usize| read_file_at(&file, &path, position, len);
                    later_intact = last_intact_from(read, 0, later, len).unwrap_or(None);
                    if later_intact.is_some() {
                        break;
                    }
                }
                Some(Truncated {
                    dropped,
                    last_intact: later_intact.or(last_intact),
                })
            }
            None => None,
        };
        set_roll_time(&segment, config)?;
        let end = segment.next_offset();
        segments.push(Arc::new(segment));
        if let Some(Truncated {
            dropped: mut dropped_bytes,
            last_intact,
        }) = truncated
        {
            // Newest first, so a crash part-way leaves a shorter but contiguous log.
            for &later in bases[i + 1..].iter().rev() {
                let path = file_names::segment_file(dir, later, file_names::LOG_SUFFIX);
                dropped_bytes += fs::metadata(&path).map_or(0, |m| m.len());
                delete_segment_files(dir, later)?;
            }
            let cause = match last_intact {
                Some(last_intact) => {
                    tracing::warn!(
                        dir = %dir.display(),
                        offset = end,
                        leader_epoch = last_intact.leader_epoch,
                        raft_index = last_intact.raft_index,
                        "intact batches followed the bad frame: the log was damaged, not torn"
                    );
                    CutCause::Damage { last_intact }
                }
                None => CutCause::TornTail,
            };
            cut = Some(LogCut {
                offset: end,
                dropped_bytes,
                cause,
            });
            sync_dir(dir)?;
            break;
        }
    }
    let count = segments.len();
    for (i, segment) in segments.iter().enumerate() {
        if i + 1 < count {
            segment.seal()?;
        } else {
            segment.unseal(config.max_index_bytes)?;
        }
    }
    Ok((segments, cut))
}

fn delete_segment_files(dir: &Path, base: u64) -> Result<()> {
    for suffix in [
        file_names::LOG_SUFFIX,
        file_names::INDEX_SUFFIX,
        file_names::TIME_INDEX_SUFFIX,
    ] {
        let path = file_names::segment_file(dir, base, suffix);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(LogError::io("delete segment", &path)(e)),
            _ => {}
        }
    }
    tracing::warn!(dir = %dir.display(), base_offset = base, "deleted segment after a torn earlier segment");
    Ok(())
}

/// Segment rolling by age counts from the first batch's timestamp when reopening. A batch
/// without one (timestamp 0 or below: a Raft leader's no-op, which every restart and election
/// appends) says nothing about the segment's age, so the first batch that has one counts,
/// looked for within one index interval of the start (a few headers). Only when there is none
/// there does the age count from this open: counting from the open whenever the first batch is
/// a no-op would make a segment young again at every restart, so with restarts closer than
/// `segment_ms` it would never roll and retention (which deletes only sealed segments) would
/// never apply; counting from timestamp 0 would roll a new segment at every restart.
fn set_roll_time(segment: &Segment, config: &LogConfig) -> Result<()> {
    if segment.size() == 0 {
        return Ok(());
    }
    let mut first = None;
    let end = segment.size();
    segment.scan_headers(0, end, |position, h| {
        if h.max_timestamp > 0 {
            first = Some(h.max_timestamp);
            return false;
        }
        position < config.index_interval_bytes
    })?;
    if let Some(ts) = first {
        segment.set_created_ms(ts.min(crate::batch::unix_millis()));
    }
    Ok(())
}

/// Opens a segment known to be intact: derive its end from the last index entry onwards,
/// rebuilding the indexes if they disagree with the `.log`.
fn load_trusted(segment: &Segment, config: &LogConfig) -> Result<()> {
    let file_len = segment.file_len()?;
    let last_entry_ok = match segment.offset_index().last() {
        Some(e) => header_matches(segment, u64::from(e.position), segment.base_offset(), file_len)?,
        None => true,
    };
    if !last_entry_ok || !indexes_consistent(segment, file_len) {
        tracing::warn!(segment = %segment.log_path().display(), "rebuilding inconsistent indexes");
        segment.offset_index_mut().truncate(0);
        segment.time_index_mut().truncate(0);
        segment.unseal(config.max_index_bytes)?;
        return scan_and_index(segment, 0, file_len, config).and_then(|end| {
            if end < file_len {
                Err(LogError::Corrupt {
                    path: segment.log_path().to_path_buf(),
                    detail: format!("invalid batch at byte {end} of a segment below the recovery point"),
                })
            } else {
                Ok(())
            }
        });
    }
    let start = segment.offset_index().last().map_or(0, |e| u64::from(e.position));
    let mut next = segment.base_offset();
    segment.scan_headers(start, file_len, |_, h| {
        next = h.next_offset();
        true
    })?;
    let max_ts = segment.recompute_max_timestamp(file_len)?;
    segment.publish_state(file_len, next, max_ts)
}

fn indexes_consistent(segment: &Segment, file_len: u64) -> bool {
    let offsets = segment.offset_index();
    let mut previous = (0u32, 0u32);
    for i in 0..offsets.len() {
        let e = offsets.entry(i);
        if e.relative_offset <= previous.0 || e.position <= previous.1 || u64::from(e.position) >= file_len {
            return false;
        }
        previous = (e.relative_offset, e.position);
    }
    let times = segment.time_index();
    let last_rel = previous.0;
    let mut prev_ts = i64::MIN;
    for i in 0..times.len() {
        let e = times.entry(i);
        if e.timestamp <= prev_ts || e.relative_offset > last_rel {
            return false;
        }
        prev_ts = e.timestamp;
    }
    true
}

/// What recovering a segment cut from it.
struct Truncated {
    dropped: u64,
    /// The stamp of the last intact batch found past the bad frame, if any.
    last_intact: Option<BatchStamp>,
}

/// Index entries past the recovery point kept as candidates for intact batches after a bad
/// frame: the newest ones, so the search stays bounded.
const INTACT_CANDIDATES: usize = 32;

/// Recovers a segment at or above the recovery point. Returns what was dropped if it was
/// truncated.
fn recover(segment: &Segment, recovery_point: u64, config: &LogConfig) -> Result<Option<Truncated>> {
    let file_len = segment.file_len()?;
    let base = segment.base_offset();
    // Index entries below the recovery point were flushed before it was recorded.
    let trusted_rel = recovery_point.saturating_sub(base).min(u64::from(u32::MAX)) as u32;
    // Those above it may point at batches past a bad frame: kept (the newest few) to tell
    // damage from a torn write should the scan below stop early.
    let candidates: Vec<(u64, u64)> = {
        let index = segment.offset_index();
        (0..index.len())
            .rev()
            .map(|i| index.entry(i))
            .take_while(|e| e.relative_offset >= trusted_rel)
            .take(INTACT_CANDIDATES)
            .map(|e| (u64::from(e.position), base + u64::from(e.relative_offset)))
            .collect()
    };
    segment.offset_index_mut().truncate_to_offset(trusted_rel);
    segment.time_index_mut().truncate_to_offset(trusted_rel);
    let mut start = 0;
    if let Some(entry) = segment.offset_index().last() {
        start = u64::from(entry.position);
    }
    if start > 0 && !header_matches(segment, start, base, file_len)? {
        start = 0;
    }
    if start == 0 {
        segment.offset_index_mut().truncate(0);
        segment.time_index_mut().truncate(0);
    }
    let valid_end = scan_and_index(segment, start, file_len, config)?;
    if valid_end < file_len {
        tracing::warn!(
            segment = %segment.log_path().display(),
            dropped_bytes = file_len - valid_end,
            valid_bytes = valid_end,
            "truncating torn or corrupt tail of segment"
        );
        let cut_offset = segment.next_offset();
        let mut last_intact = None;
        for &(position, offset) in candidates.iter().filter(|c| c.0 > valid_end && c.1 > cut_offset) {
            let read = |position: u64, len: usize| segment.read_exact_at(position, len);
            // A diagnosis only: a read error here must not fail the open.
            last_intact = last_intact_from(read, position, offset, file_len).unwrap_or(None);
            if last_intact.is_some() {
                break;
            }
        }
        segment.truncate(valid_end, cut_offset, Some(segment.max_timestamp()))?;
        segment.sync_log()?;
        return Ok(Some(Truncated {
            dropped: file_len - valid_end,
            last_intact,
        }));
    }
    Ok(None)
}

fn read_file_at(file: &fs::File, path: &Path, position: u64, len: usize) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, position)
        .map_err(LogError::io("read segment", path))?;
    Ok(buf)
}

/// Most bytes one diagnosis walk reads past where it starts: the finding promises nothing
/// (see [`CutCause::Damage`]), so an open never reads a whole large segment for it.
const DIAGNOSIS_WALK_BYTES: u64 = 4 << 20;

/// Walks intact batches from `position`, where a batch starting at `offset` should be, up to
/// `file_len` or [`DIAGNOSIS_WALK_BYTES`] further: each must parse, fit, continue the offsets
/// and pass its frame and CRC checks. Returns the stamp of the last one walked, or `None` if
/// the batch at `position` is not intact. One batch is read at a time.
fn last_intact_from<B: AsRef<[u8]>>(
    read: impl Fn(u64, usize) -> Result<B>,
    mut position: u64,
    mut offset: u64,
    file_len: u64,
) -> Result<Option<BatchStamp>> {
    let mut last = None;
    let file_len = file_len.min(position.saturating_add(DIAGNOSIS_WALK_BYTES));
    while position + HEADER_LEN as u64 <= file_len {
        let Ok(header) = BatchHeader::parse(read(position, HEADER_LEN)?.as_ref()) else {
            break;
        };
        let size = header.size() as u64;
        if size < HEADER_LEN as u64 || position + size > file_len || header.base_offset != offset {
            break;
        }
        if check_frame(read(position, size as usize)?.as_ref(), usize::MAX).is_err() {
            break;
        }
        last = Some(BatchStamp {
            leader_epoch: header.leader_epoch,
            raft_index: header.raft_index,
        });
        offset = header.next_offset();
        position += size;
    }
    Ok(last)
}

fn header_matches(segment: &Segment, position: u64, base: u64, file_len: u64) -> Result<bool> {
    if position + HEADER_LEN as u64 > file_len {
        return Ok(false);
    }
    let buf = segment.read_exact_at(position, HEADER_LEN)?;
    let expected = segment
        .offset_index()
        .last()
        .map(|e| base + u64::from(e.relative_offset));
    Ok(BatchHeader::parse(&buf).is_ok_and(|h| Some(h.base_offset) == expected))
}

/// Validates batches from `start` (a batch boundary) to `file_len`, adding index entries, and
/// publishes the segment state up to the last valid batch. Returns that batch's end.
fn scan_and_index(segment: &Segment, start: u64, file_len: u64, config: &LogConfig) -> Result<u64> {
    let mut cursor = segment.index_cursor();
    let mut max_ts = segment.time_index().last().map_or(i64::MIN, |e| e.timestamp);
    // The offset the next batch must start at: batches are contiguous.
    let mut expected = match segment.offset_index().last() {
        Some(e) if start > 0 => segment.base_offset() + u64::from(e.relative_offset),
        _ => segment.base_offset(),
    };
    let mut position = start;
    let mut chunk = bytes::BytesMut::new();
    let mut chunk_start = start;
    loop {
        if position + HEADER_LEN as u64 > file_len {
            break;
        }
        let chunk_end = chunk_start + chunk.len() as u64;
        if position + HEADER_LEN as u64 > chunk_end {
            chunk = segment.read_exact_at(position, (file_len - position).min(RECOVERY_CHUNK as u64) as usize)?;
            chunk_start = position;
        }
        let at = (position - chunk_start) as usize;
        let Ok(header) = BatchHeader::parse(&chunk[at..]) else {
            break;
        };
        crate::lookup::count_header();
        let size = header.size() as u64;
        if size < HEADER_LEN as u64 || position + size > file_len {
            break;
        }
        if header.base_offset != expected {
            break;
        }
        let frame_ok = if at as u64 + size <= chunk.len() as u64 {
            check_frame(&chunk[at..at + size as usize], usize::MAX).is_ok()
        } else {
            let whole = segment.read_exact_at(position, size as usize)?;
            check_frame(&whole, usize::MAX).is_ok()
        };
        if !frame_ok {
            break;
        }
        max_ts = max_ts.max(header.max_timestamp);
        let index_room = !segment.indexes_full();
        if position > 0 && index_room && position - cursor.last_indexed_position >= config.index_interval_bytes {
            segment.add_index_entries(position, header.base_offset, max_ts, &mut cursor);
        }
        expected = header.next_offset();
        position += size;
    }
    segment.publish_state(position, expected, max_ts)?;
    Ok(position)
}

#[cfg(test)]
mod tests;
