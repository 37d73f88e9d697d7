//! Lookups of batches by the Raft index stamped in their headers, without any table of
//! entries in memory: bisection over the segments (by the header of each one's first batch),
//! then over the segment's sparse offset index (by the header each entry points at), then a
//! walk of at most `index_interval_bytes` of headers. Raft indexes increase with offsets
//! (one batch per Raft entry, appended in order, a suffix replaced only by truncation), which
//! is what makes the bisection sound.
//!
//! Also counts the batch headers read on the calling thread, so tests can check that an open
//! after a clean close reads only a bounded number of them.

use std::cell::Cell;
use std::sync::Arc;

thread_local! {
    static HEADERS_READ: Cell<u64> = const { Cell::new(0) };
}

/// Counts one batch header read (walks and recovery scans call this per header).
pub(crate) fn count_header() {
    HEADERS_READ.with(|c| c.set(c.get() + 1));
}

/// Batch headers read by storage calls made on this thread so far: lookups, walks and
/// recovery scans. For tests and diagnostics.
pub fn batch_headers_read_on_this_thread() -> u64 {
    HEADERS_READ.with(Cell::get)
}

use crate::batch::BatchHeader;
use crate::error::{LogError, Result};
use crate::log::PartitionLog;
use crate::segment::Segment;

/// The header of the first batch of `segment`, or `None` if it holds none yet.
fn first_header(segment: &Segment) -> Result<Option<BatchHeader>> {
    header_at(segment, 0)
}

/// Where in `segment` a walk for `raft_index` may start: the position of the last offset-index
/// entry whose batch is at or below it (0 if none is). `None` if a probed entry does not point
/// at the batch it names (its header cannot be read, or has another base offset): the index
/// is then not to be trusted, and the caller walks from the start.
fn bisect_index(segment: &Segment, raft_index: u64) -> Result<Option<u64>> {
    let index = segment.offset_index();
    let (mut lo, mut hi) = (0, index.len());
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let entry = index.entry(mid);
        let expected = segment.base_offset() + u64::from(entry.relative_offset);
        let header = match header_at(segment, u64::from(entry.position)) {
            Ok(Some(h)) if h.base_offset == expected => h,
            Ok(_) | Err(LogError::Corrupt { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if header.raft_index <= raft_index {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(Some(
        lo.checked_sub(1).map_or(0, |i| u64::from(index.entry(i).position)),
    ))
}

/// The header of the batch starting at `position`, or `None` past the published bytes.
fn header_at(segment: &Segment, position: u64) -> Result<Option<BatchHeader>> {
    let mut found = None;
    segment.scan_headers(position, segment.size(), |_, h| {
        found = Some(*h);
        false
    })?;
    Ok(found)
}

impl PartitionLog {
    /// The header of the batch stamped with Raft index `raft_index`, or `None` if the log
    /// holds no such batch. Reads `O(log segments + log index entries)` headers plus at most
    /// one index interval of them; holds nothing in memory. Only meaningful for a log whose
    /// Raft indexes increase with offsets (a replica's), where it is exact: the header found
    /// carries `raft_index`.
    pub fn find_raft_entry(&self, raft_index: u64) -> Result<Option<BatchHeader>> {
        let segments = self.segments_snapshot();
        // The last segment whose first batch is at or below the target. Only the active
        // (last) segment can be empty; it sorts after every other.
        let (mut lo, mut hi) = (0, segments.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match first_header(&segments[mid])? {
                Some(h) if h.raft_index <= raft_index => lo = mid + 1,
                _ => hi = mid,
            }
        }
        let Some(segment) = lo.checked_sub(1).map(|i| &segments[i]) else {
            return Ok(None);
        };
        let end = segment.size();
        let start = match bisect_index(segment, raft_index)? {
            Some(position) => position,
            None => {
                // A damaged index must not send a lookup into the middle of a batch; the
                // `.log` alone is authoritative, as in `Segment::locate`.
                tracing::warn!(segment = %segment.log_path().display(), "offset index entry does not match the log; scanning from the start");
                0
            }
        };
        let mut found = None;
        segment.scan_headers(start, end, |_, h| {
            if h.raft_index >= raft_index {
                found = (h.raft_index == raft_index).then_some(*h);
                return false;
            }
            true
        })?;
        Ok(found)
    }

    /// The header of the batch holding `offset`, or `None` if the log does not hold it.
    pub fn batch_header_at(&self, offset: u64) -> Result<Option<BatchHeader>> {
        let segments = self.read_segments();
        let i = segments.partition_point(|s| s.base_offset() <= offset).checked_sub(1);
        let Some(segment) = i.map(|i| Arc::clone(&segments[i])) else {
            return Ok(None);
        };
        drop(segments);
        Ok(segment.locate(offset)?.map(|l| l.header))
    }

    /// The header of the last batch in the log, or `None` for an empty log.
    pub fn last_batch_header(&self) -> Result<Option<BatchHeader>> {
        match self.log_end_offset().checked_sub(1) {
            Some(last) if last >= self.log_start_offset() => self.batch_header_at(last),
            _ => Ok(None),
        }
    }
}
