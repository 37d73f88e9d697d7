//! Sparse, memory-mapped indexes of a segment: [`OffsetIndex`] (offset → file position) and
//! [`TimeIndex`] (timestamp → offset).
//!
//! # On-disk format
//! A flat array of fixed-size little-endian entries, sorted. The active segment's index file
//! is preallocated to `max_index_bytes` (zero-filled) and trimmed to its entries when the
//! segment is sealed or the log is closed.
//!
//! # Invariants
//! - Entries strictly increase in both fields. Entries are only added for batches that do not
//!   start at position 0, so every real entry has a non-zero relative offset and position,
//!   and the first all-zero entry marks the end of a preallocated file.
//!
//! # Crash behaviour
//! Pages of a mapped index reach disk in any order and possibly before the log bytes they
//! point to. Recovery therefore trusts an index only below the recovery point and rebuilds the
//! rest from the log ([`crate::recovery`]).
//!
//! # Thread-safety
//! Not synchronised; each segment wraps its indexes in a `RwLock`.

mod offset_index;
mod time_index;

pub(crate) use offset_index::{OffsetEntry, OffsetIndex};
pub(crate) use time_index::{TimeEntry, TimeIndex};

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

use crate::error::{LogError, Result};

/// A fixed-size index entry.
pub(crate) trait Entry: Copy + std::fmt::Debug {
    const SIZE: usize;
    fn decode(buf: &[u8]) -> Self;
    fn encode(&self, buf: &mut [u8]);
    /// Relative offset this entry refers to; zero only in unused (zero-filled) slots.
    fn relative_offset(&self) -> u32;
}

/// A memory-mapped array of entries backed by one file.
#[derive(Debug)]
pub(crate) struct MmapIndex<E: Entry> {
    path: PathBuf,
    file: File,
    mmap: Option<MmapMut>,
    len: usize,
    capacity: usize,
    _entry: std::marker::PhantomData<E>,
}

impl<E: Entry> MmapIndex<E> {
    /// Opens (creating if absent) an index. `preallocate` maps `max_bytes` for appending;
    /// otherwise the file is mapped as it is. Entries are counted up to the first unused slot.
    pub(crate) fn open(path: &Path, preallocate: Option<u64>) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(LogError::io("open index", path))?;
        let file_len = file.metadata().map_err(LogError::io("stat index", path))?.len();
        let mut index: MmapIndex<E> = MmapIndex {
            path: path.to_path_buf(),
            file,
            mmap: None,
            len: 0,
            capacity: 0,
            _entry: std::marker::PhantomData,
        };
        let whole_entries = file_len / E::SIZE as u64 * E::SIZE as u64;
        index.remap(preallocate.map_or(whole_entries, |max| max.max(whole_entries)))?;
        let slots = (whole_entries as usize / E::SIZE).min(index.capacity);
        index.len = (0..slots)
            .position(|i| index.entry(i).relative_offset() == 0)
            .unwrap_or(slots);
        Ok(index)
    }

    /// Replaces the mapping with one of `bytes`. On failure the index is left empty (never
    /// with entries but no mapping), and the caller poisons the log.
    fn remap(&mut self, bytes: u64) -> Result<()> {
        let bytes = bytes / E::SIZE as u64 * E::SIZE as u64;
        let len = self.len;
        self.len = 0;
        self.capacity = 0;
        if let Some(m) = self.mmap.take() {
            m.flush().map_err(LogError::io("flush index", &self.path))?;
            crate::crash_sim::file_synced(&self.path, &self.file);
        }
        self.file
            .set_len(bytes)
            .map_err(LogError::io("resize index", &self.path))?;
        crate::crash_sim::truncated(&self.path, bytes);
        if bytes > 0 {
            // SAFETY: the file is private to this partition directory and only this process
            // resizes it, always after dropping the previous mapping.
            let map = unsafe { MmapMut::map_mut(&self.file) }.map_err(LogError::io("map index", &self.path))?;
            self.mmap = Some(map);
        }
        self.capacity = bytes as usize / E::SIZE;
        self.len = len.min(self.capacity);
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Entries that can still be added before the index is full.
    pub(crate) fn room(&self) -> usize {
        self.capacity.saturating_sub(self.len)
    }

    pub(crate) fn entry(&self, i: usize) -> E {
        let map = self.mmap.as_deref().unwrap_or(&[]);
        E::decode(&map[i * E::SIZE..(i + 1) * E::SIZE])
    }

    pub(crate) fn last(&self) -> Option<E> {
        self.len.checked_sub(1).map(|i| self.entry(i))
    }

    /// Appends an entry; false when the index is full (the caller rolls the segment).
    pub(crate) fn push(&mut self, entry: E) -> bool {
        if self.is_full() {
            return false;
        }
        let at = self.len * E::SIZE;
        if let Some(map) = self.mmap.as_deref_mut() {
            entry.encode(&mut map[at..at + E::SIZE]);
            self.len += 1;
            return true;
        }
        false
    }

    /// Index of the first entry for which `pred` is false, given that it is true for a prefix.
    pub(crate) fn partition_point(&self, pred: impl Fn(&E) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(&self.entry(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Keeps the first `len` entries and zeroes the rest, so no stale entry survives a crash.
    pub(crate) fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if let Some(map) = self.mmap.as_deref_mut() {
            map[len * E::SIZE..self.len * E::SIZE].fill(0);
        }
        self.len = len;
    }

    /// Drops entries for batches at or above `relative_offset`.
    pub(crate) fn truncate_to_offset(&mut self, relative_offset: u32) {
        let keep = self.partition_point(|e| e.relative_offset() < relative_offset);
        self.truncate(keep);
    }

    /// Shrinks the file to its entries, for a sealed segment or a clean close.
    pub(crate) fn trim(&mut self) -> Result<()> {
        self.remap((self.len * E::SIZE) as u64)
    }

    /// Grows the file back to `max_bytes` so that a sealed segment can become active again.
    pub(crate) fn preallocate(&mut self, max_bytes: u64) -> Result<()> {
        if (self.capacity * E::SIZE) as u64 >= max_bytes {
            return Ok(());
        }
        self.remap(max_bytes)
    }

    pub(crate) fn flush(&self) -> Result<()> {
        if let Some(m) = &self.mmap {
            m.flush().map_err(LogError::io("flush index", &self.path))?;
            crate::crash_sim::file_synced(&self.path, &self.file);
        }
        Ok(())
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_and_zero_slots_end_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.index");
        let mut idx = MmapIndex::<OffsetEntry>::open(&path, Some(800)).expect("open");
        assert_eq!(idx.capacity, 100);
        for i in 1..=10u32 {
            assert!(idx.push(OffsetEntry {
                relative_offset: i * 10,
                position: i * 4096
            }));
        }
        idx.flush().expect("flush");
        drop(idx);
        // Reopened untrimmed, as after a crash: the zero-filled tail is not counted.
        let mut idx = MmapIndex::<OffsetEntry>::open(&path, Some(800)).expect("reopen");
        assert_eq!(idx.len(), 10);
        idx.truncate(4);
        idx.trim().expect("trim");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 32);
        let idx = MmapIndex::<OffsetEntry>::open(&path, None).expect("reopen sealed");
        assert_eq!(idx.len(), 4);
        assert!(idx.is_full());
        assert_eq!(idx.last().map(|e| e.relative_offset), Some(40));
    }
}
