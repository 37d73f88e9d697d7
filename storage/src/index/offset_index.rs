//! Offset index: `[relative_offset: u32][position: u32]` per entry, mapping the base offset of
//! a batch (relative to the segment's base offset) to its byte position in the `.log` file.

use super::{Entry, MmapIndex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

impl Entry for OffsetEntry {
    const SIZE: usize = 8;

    fn decode(buf: &[u8]) -> Self {
        OffsetEntry {
            relative_offset: u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]),
            position: u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]),
        }
    }

    fn encode(&self, buf: &mut [u8]) {
        buf[..4].copy_from_slice(&self.relative_offset.to_le_bytes());
        buf[4..8].copy_from_slice(&self.position.to_le_bytes());
    }

    fn relative_offset(&self) -> u32 {
        self.relative_offset
    }
}

pub(crate) type OffsetIndex = MmapIndex<OffsetEntry>;

impl OffsetIndex {
    /// The last entry at or below `relative_offset`: where a scan for it may start.
    pub(crate) fn floor(&self, relative_offset: u32) -> Option<OffsetEntry> {
        let i = self.partition_point(|e| e.relative_offset <= relative_offset);
        i.checked_sub(1).map(|i| self.entry(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_finds_the_last_entry_at_or_below() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut idx = OffsetIndex::open(&dir.path().join("x.index"), Some(1024)).expect("open");
        for (o, p) in [(10, 100), (20, 200), (30, 300)] {
            idx.push(OffsetEntry {
                relative_offset: o,
                position: p,
            });
        }
        assert_eq!(idx.floor(5), None);
        assert_eq!(idx.floor(10).map(|e| e.position), Some(100));
        assert_eq!(idx.floor(29).map(|e| e.position), Some(200));
        assert_eq!(idx.floor(u32::MAX).map(|e| e.position), Some(300));
        idx.truncate_to_offset(20);
        assert_eq!(idx.len(), 1);
    }
}
