//! One segment of a partition log: a `.log` file of batches and its two sparse indexes.
//!
//! # On-disk format
//! `NNNNNNNNNNNNNNNNNNNN.log` holds whole batches back to back (format in [`crate::batch`]);
//! `.index` and `.timeindex` are described in [`crate::index`].
//!
//! # Invariants
//! - Bytes below `size` are whole, validated batches with contiguous, increasing offsets,
//!   starting at `base_offset`. Readers never look past `size`, which is published only after
//!   the bytes and index entries are written.
//! - Every batch that starts at least `index_interval_bytes` after the previous index entry
//!   gets an offset index entry; a time index entry is added at the same point when the
//!   segment's maximum timestamp has grown.
//!
//! # Thread-safety
//! Readers use positioned reads (`pread`) and may run alongside the single writer, which the
//! owning [`crate::PartitionLog`] serialises. Indexes sit behind `RwLock`s.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::{Bytes, BytesMut};

use crate::batch::{BatchHeader, CRC_AT, HEADER_LEN};
use crate::error::{LogError, Result};
use crate::file_names::{self, INDEX_SUFFIX, LOG_SUFFIX, TIME_INDEX_SUFFIX};
use crate::index::{OffsetEntry, OffsetIndex, TimeEntry, TimeIndex};

/// Bytes read per `pread` while walking batch headers.
const SCAN_CHUNK: usize = 64 * 1024;
/// First read of a header walk: enough for a few headers.
const FIRST_SCAN_READ: usize = 1024;
/// `ENOSPC` on Linux: the error a simulated full disk reports (crash-sim tests only).
const ENOSPC: i32 = 28;

/// Gives every segment object a distinct identity: a segment the cleaner rewrote keeps its
/// base offset, and positions remembered in the old one mean nothing in the new one.
static NEXT_SEGMENT_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
pub(crate) struct Segment {
    id: u64,
    base_offset: u64,
    log_path: PathBuf,
    log: File,
    size: AtomicU64,
    next_offset: AtomicU64,
    max_timestamp: AtomicI64,
    /// Wall-clock start of this segment for time-based rolling.
    created_ms: AtomicI64,
    offset_index: RwLock<OffsetIndex>,
    time_index: RwLock<TimeIndex>,
}

/// Where the writer last added index entries; lives with the writer, not the segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IndexCursor {
    pub last_indexed_position: u64,
    pub last_indexed_timestamp: i64,
}

/// What `Segment::locate` found: the batch holding an offset and where it starts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Located {
    pub position: u64,
    pub header: BatchHeader,
}

fn read_guard<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_guard<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Segment {
    /// Opens or creates the three files of a segment. `active` preallocates the indexes.
    /// The caller sets `size`, `next_offset` and `max_timestamp` after recovering it.
    pub(crate) fn open(dir: &Path, base_offset: u64, active: Option<u64>) -> Result<Segment> {
        let log_path = file_names::segment_file(dir, base_offset, LOG_SUFFIX);
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .map_err(LogError::io("open segment", &log_path))?;
        let offset_index = OffsetIndex::open(&file_names::segment_file(dir, base_offset, INDEX_SUFFIX), active)?;
        let time_index = TimeIndex::open(&file_names::segment_file(dir, base_offset, TIME_INDEX_SUFFIX), active)?;
        Ok(Segment {
            id: NEXT_SEGMENT_ID.fetch_add(1, Ordering::Relaxed),
            base_offset,
            log_path,
            log,
            size: AtomicU64::new(0),
            next_offset: AtomicU64::new(base_offset),
            max_timestamp: AtomicI64::new(i64::MIN),
            created_ms: AtomicI64::new(crate::batch::unix_millis()),
            offset_index: RwLock::new(offset_index),
            time_index: RwLock::new(time_index),
        })
    }

    pub(crate) fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// This object's identity (see `NEXT_SEGMENT_ID`).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    pub(crate) fn max_timestamp(&self) -> i64 {
        self.max_timestamp.load(Ordering::Acquire)
    }

    pub(crate) fn created_ms(&self) -> i64 {
        self.created_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub(crate) fn file_len(&self) -> Result<u64> {
        Ok(self
            .log
            .metadata()
            .map_err(LogError::io("stat segment", &self.log_path))?
            .len())
    }

    pub(crate) fn offset_index(&self) -> RwLockReadGuard<'_, OffsetIndex> {
        read_guard(&self.offset_index)
    }

    pub(crate) fn offset_index_mut(&self) -> RwLockWriteGuard<'_, OffsetIndex> {
        write_guard(&self.offset_index)
    }

    pub(crate) fn time_index(&self) -> RwLockReadGuard<'_, TimeIndex> {
        read_guard(&self.time_index)
    }

    pub(crate) fn time_index_mut(&self) -> RwLockWriteGuard<'_, TimeIndex> {
        write_guard(&self.time_index)
    }

    pub(crate) fn indexes_full(&self) -> bool {
        self.offset_index().is_full() || self.time_index().is_full()
    }

    /// Whether both indexes can take `entries` more entries.
    pub(crate) fn indexes_have_room(&self, entries: usize) -> bool {
        self.offset_index().room() >= entries && self.time_index().room() >= entries
    }

    /// Sets the recovered state; used on open and after truncation.
    pub(crate) fn publish_state(&self, size: u64, next_offset: u64, max_timestamp: i64) -> Result<()> {
        (&self.log)
            .seek(SeekFrom::Start(size))
            .map_err(LogError::io("seek segment", &self.log_path))?;
        self.max_timestamp.store(max_timestamp, Ordering::Release);
        self.size.store(size, Ordering::Release);
        self.next_offset.store(next_offset, Ordering::Release);
        Ok(())
    }

    pub(crate) fn set_created_ms(&self, ms: i64) {
        self.created_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn index_cursor(&self) -> IndexCursor {
        IndexCursor {
            last_indexed_position: self.offset_index().last().map_or(0, |e| u64::from(e.position)),
            last_indexed_timestamp: self.time_index().last().map_or(i64::MIN, |e| e.timestamp),
        }
    }

    /// Appends a batch whose stamped prefix is `prefix` and whose remaining bytes are
    /// `batch[CRC_AT..]`, then indexes and publishes it. One `writev`, no copy of the body.
    pub(crate) fn append(
        &self,
        prefix: &[u8; CRC_AT],
        batch: &[u8],
        header: &BatchHeader,
        cursor: &mut IndexCursor,
        index_interval_bytes: u64,
    ) -> Result<()> {
        let position = self.size.load(Ordering::Relaxed);
        let mut slices = [IoSlice::new(prefix), IoSlice::new(&batch[CRC_AT..])];
        if crate::crash_sim::take_write_failure(&self.log_path) {
            // A simulated full disk: part of the batch reaches the file, then the write fails.
            let _ = (&self.log).write_all(prefix);
            return Err(LogError::io("write segment", &self.log_path)(
                std::io::Error::from_raw_os_error(ENOSPC),
            ));
        }
        write_all_vectored(&self.log, &mut slices).map_err(LogError::io("write segment", &self.log_path))?;
        let max_timestamp = self.max_timestamp().max(header.max_timestamp);
        if position > 0 && position - cursor.last_indexed_position >= index_interval_bytes {
            self.add_index_entries(position, header.base_offset, max_timestamp, cursor);
        }
        if position == 0 {
            self.set_created_ms(crate::batch::unix_millis());
        }
        // Size before end offset: a reader that sees the new end also sees the bytes.
        self.max_timestamp.store(max_timestamp, Ordering::Release);
        self.size.store(position + header.size() as u64, Ordering::Release);
        self.next_offset.store(header.next_offset(), Ordering::Release);
        Ok(())
    }

    /// Adds the index entries for the batch at `position`. Callers roll before the indexes
    /// fill, so the pushes cannot fail.
    pub(crate) fn add_index_entries(
        &self,
        position: u64,
        base_offset: u64,
        max_timestamp: i64,
        cursor: &mut IndexCursor,
    ) {
        let relative_offset = (base_offset - self.base_offset) as u32;
        self.offset_index_mut().push(OffsetEntry {
            relative_offset,
            position: position as u32,
        });
        cursor.last_indexed_position = position;
        if max_timestamp > cursor.last_indexed_timestamp {
            self.time_index_mut().push(TimeEntry {
                timestamp: max_timestamp,
                relative_offset,
            });
            cursor.last_indexed_timestamp = max_timestamp;
        }
    }

    pub(crate) fn read_exact_at(&self, position: u64, len: usize) -> Result<BytesMut> {
        let mut buf = BytesMut::zeroed(len);
        crate::read_in_place::read_exact_at(&self.log, &mut buf, position)
            .map_err(LogError::io("read segment", &self.log_path))?;
        Ok(buf)
    }

    /// Walks batch headers from `position` up to `end`, calling `visit` for each until it
    /// returns false. The first read is small (a lookup usually needs one header); later reads
    /// double up to `SCAN_CHUNK`, so long walks do not cost one `pread` per batch.
    pub(crate) fn scan_headers(
        &self,
        mut position: u64,
        end: u64,
        mut visit: impl FnMut(u64, &BatchHeader) -> bool,
    ) -> Result<()> {
        let mut chunk = Vec::new();
        let mut chunk_start = position;
        let mut next_read = FIRST_SCAN_READ;
        while position + HEADER_LEN as u64 <= end {
            let chunk_end = chunk_start + chunk.len() as u64;
            if position < chunk_start || position + HEADER_LEN as u64 > chunk_end {
                let len = (end - position).min(next_read as u64) as usize;
                next_read = (next_read * 2).min(SCAN_CHUNK);
                chunk.resize(len, 0);
                crate::read_in_place::read_exact_at(&self.log, &mut chunk, position)
                    .map_err(LogError::io("read segment", &self.log_path))?;
                chunk_start = position;
            }
            let at = (position - chunk_start) as usize;
            let header = BatchHeader::parse(&chunk[at..]).map_err(|e| self.corrupt(position, e))?;
            if header.size() < HEADER_LEN || position + header.size() as u64 > end {
                return Err(self.corrupt(position, "batch length runs past the segment"));
            }
            crate::lookup::count_header();
            if !visit(position, &header) {
                return Ok(());
            }
            position += header.size() as u64;
        }
        Ok(())
    }

    fn corrupt(&self, position: u64, detail: impl std::fmt::Display) -> LogError {
        LogError::Corrupt {
            path: self.log_path.clone(),
            detail: format!("at byte {position}: {detail}"),
        }
    }

    /// Finds the batch that holds `offset` among the published bytes, or `None` when the
    /// segment ends before it.
    pub(crate) fn locate(&self, offset: u64) -> Result<Option<Located>> {
        if offset < self.base_offset || offset >= self.next_offset() {
            return Ok(None);
        }
        let end = self.size();
        let entry = crate::read_in_place::read_lock(&self.offset_index, &self.log_path)?
            .floor((offset - self.base_offset) as u32);
        if let Some(e) = entry {
            let expected = self.base_offset + u64::from(e.relative_offset);
            match self.locate_from(u64::from(e.position), end, offset, Some(expected)) {
                Err(LogError::Corrupt { .. }) | Ok(None) => {
                    // A damaged index must not send a reader into the middle of a batch.
                    tracing::warn!(segment = %self.log_path.display(), "offset index entry does not match the log; scanning from the start");
                }
                found => return found,
            }
        }
        self.locate_from(0, end, offset, None)
    }

    /// Walks from `start` to the batch holding `offset`. With `first_base`, the batch at
    /// `start` must have that base offset, or the walk gives up.
    fn locate_from(&self, start: u64, end: u64, offset: u64, first_base: Option<u64>) -> Result<Option<Located>> {
        let mut found = None;
        let mut first = first_base;
        self.scan_headers(start, end, |position, header| {
            if first.take().is_some_and(|b| b != header.base_offset) {
                return false;
            }
            if header.last_offset() >= offset {
                found = Some(Located {
                    position,
                    header: *header,
                });
                return false;
            }
            true
        })?;
        Ok(found)
    }

    /// Reads whole batches starting at `position`: as many as fit in `max_bytes`, at least
    /// one, none whose base offset is `max_offset` or above.
    pub(crate) fn read_from(&self, position: u64, max_bytes: usize, max_offset: u64) -> Result<Bytes> {
        let end = self.size();
        if position >= end {
            return Ok(Bytes::new());
        }
        let want = (end - position).min(max_bytes.max(HEADER_LEN) as u64) as usize;
        let mut buf = self.read_exact_at(position, want)?;
        let mut keep = 0;
        while keep + HEADER_LEN <= buf.len() {
            let header = BatchHeader::parse(&buf[keep..]).map_err(|e| self.corrupt(position + keep as u64, e))?;
            if header.base_offset >= max_offset {
                break;
            }
            if keep + header.size() > buf.len() {
                if keep == 0 {
                    // The first batch is larger than max_bytes: return it whole anyway.
                    if position + header.size() as u64 > end {
                        return Err(self.corrupt(position, "batch length runs past the segment"));
                    }
                    buf = self.read_exact_at(position, header.size())?;
                    keep = header.size();
                }
                break;
            }
            keep += header.size();
        }
        buf.truncate(keep);
        Ok(buf.freeze())
    }

    /// Cuts the `.log` file to `position` and drops index entries at or above `next_offset`.
    /// Cuts the segment at `position`, where `next_offset` starts. `max_timestamp: None`
    /// recomputes it from what is left, after the indexes are cut (it reads them), and is
    /// published together with the new end: readers never see a lowered placeholder.
    pub(crate) fn truncate(&self, position: u64, next_offset: u64, max_timestamp: Option<i64>) -> Result<()> {
        let relative = (next_offset - self.base_offset) as u32;
        self.offset_index_mut().truncate_to_offset(relative);
        self.time_index_mut().truncate_to_offset(relative);
        self.size.store(position.min(self.size()), Ordering::Release);
        self.log
            .set_len(position)
            .map_err(LogError::io("truncate segment", &self.log_path))?;
        crate::crash_sim::truncated(&self.log_path, position);
        let max_timestamp = match max_timestamp {
            Some(ms) => ms,
            None => self.recompute_max_timestamp(position)?,
        };
        self.publish_state(position, next_offset, max_timestamp)
    }

    /// Largest timestamp among batches from the last offset index entry to `end`, combined
    /// with the time index: the segment's maximum timestamp without a full scan.
    pub(crate) fn recompute_max_timestamp(&self, end: u64) -> Result<i64> {
        let mut max = self.time_index().last().map_or(i64::MIN, |e| e.timestamp);
        let start = self.offset_index().last().map_or(0, |e| u64::from(e.position));
        self.scan_headers(start.min(end), end, |_, h| {
            max = max.max(h.max_timestamp);
            true
        })?;
        Ok(max)
    }

    /// fsyncs the `.log` file's data.
    pub(crate) fn sync_log(&self) -> Result<()> {
        crate::crash_sim::before_segment_fsync(&self.log_path);
        self.log
            .sync_data()
            .map_err(LogError::io("fsync segment", &self.log_path))?;
        crate::crash_sim::file_synced(&self.log_path, &self.log);
        Ok(())
    }

    /// Flushes both mapped indexes to disk.
    pub(crate) fn flush_indexes(&self) -> Result<()> {
        self.offset_index().flush()?;
        self.time_index().flush()
    }

    /// Trims the indexes to their entries: the segment is no longer appended to.
    pub(crate) fn seal(&self) -> Result<()> {
        self.offset_index_mut().trim()?;
        self.time_index_mut().trim()
    }

    /// Grows the indexes again so that the segment can take appends.
    pub(crate) fn unseal(&self, max_index_bytes: u64) -> Result<()> {
        self.offset_index_mut().preallocate(max_index_bytes)?;
        self.time_index_mut().preallocate(max_index_bytes)
    }

    /// The three file paths, for deletion.
    pub(crate) fn paths(&self) -> [PathBuf; 3] {
        [
            self.log_path.clone(),
            self.offset_index().path().to_path_buf(),
            self.time_index().path().to_path_buf(),
        ]
    }
}

fn write_all_vectored(mut file: &File, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
