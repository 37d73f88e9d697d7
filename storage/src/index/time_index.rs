//! Time index: `[timestamp: i64][relative_offset: u32]` per entry. An entry says that every
//! record in batches up to and including the one at `relative_offset` has a timestamp at most
//! `timestamp`; entries are added only when that maximum grows.

use super::{Entry, MmapIndex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub timestamp: i64,
    pub relative_offset: u32,
}

impl Entry for TimeEntry {
    const SIZE: usize = 12;

    fn decode(buf: &[u8]) -> Self {
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&buf[..8]);
        TimeEntry {
            timestamp: i64::from_le_bytes(ts),
            relative_offset: u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]),
        }
    }

    fn encode(&self, buf: &mut [u8]) {
        buf[..8].copy_from_slice(&self.timestamp.to_le_bytes());
        buf[8..12].copy_from_slice(&self.relative_offset.to_le_bytes());
    }

    fn relative_offset(&self) -> u32 {
        self.relative_offset
    }
}

pub(crate) type TimeIndex = MmapIndex<TimeEntry>;

impl TimeIndex {
    /// The last entry whose timestamp is below `timestamp`: every record up to its batch is
    /// older, so a search for the first record at or after `timestamp` may start there.
    pub(crate) fn last_before(&self, timestamp: i64) -> Option<TimeEntry> {
        let i = self.partition_point(|e| e.timestamp < timestamp);
        i.checked_sub(1).map(|i| self.entry(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_before_skips_entries_at_or_after_the_timestamp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut idx = TimeIndex::open(&dir.path().join("x.timeindex"), Some(1200)).expect("open");
        for (t, o) in [(100, 1), (200, 2), (300, 3)] {
            idx.push(TimeEntry {
                timestamp: t,
                relative_offset: o,
            });
        }
        assert_eq!(idx.last_before(100), None);
        assert_eq!(idx.last_before(201).map(|e| e.relative_offset), Some(2));
        assert_eq!(idx.last_before(i64::MAX).map(|e| e.relative_offset), Some(3));
    }
}
