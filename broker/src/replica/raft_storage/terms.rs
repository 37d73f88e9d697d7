//! Term checkpoints of a replica's Raft log: the first index of each term the log holds, as
//! Kafka's leader-epoch file keeps the start offset of each epoch. Terms never decrease along
//! a Raft log, so these few pairs give the term of any entry by bisection; nothing is held
//! per entry.
//!
//! # On-disk format
//! `raft-terms`: `"CRT1" | u64 end_index | u64 end_offset | u32 count | count × (u64
//! first_index | u64 term) | u32 crc32` (little-endian; the CRC covers everything before it).
//! `end_index` and `end_offset` are the Raft index and log offset the next entry would get:
//! the file describes exactly the log that ended there.
//!
//! # Crash behaviour
//! Written at a clean close, durably, before the partition log leaves its clean-shutdown
//! marker, and removed by the next open once read. It is trusted only when the partition log
//! opened clean (the marker was there, so nothing changed the log since the close that wrote
//! both) and its end matches the log's; any other open rebuilds the checkpoints from batch
//! headers by bisection ([`rebuild`]): `O(terms × log2(log entries))` header lookups, never a scan.

use std::fs;
use std::path::Path;

use conveyor_storage::batch::BatchHeader;
use conveyor_storage::{LogError, PartitionLog, replace_file_durably};

use super::ReplicaError;

const MAGIC: &[u8; 4] = b"CRT1";
pub const FILE_NAME: &str = "raft-terms";

/// `(first index, term)` of each term in the log, both strictly increasing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Terms {
    starts: Vec<(u64, u64)>,
}

impl Terms {
    /// The term of entry `index`, if it is at or after the first checkpoint. The tail (the
    /// last term) answers without a search.
    pub(crate) fn term_of(&self, index: u64) -> Option<u64> {
        let &(last_start, last_term) = self.starts.last()?;
        if index >= last_start {
            return Some(last_term);
        }
        let i = self.starts.partition_point(|s| s.0 <= index);
        i.checked_sub(1).map(|i| self.starts[i].1)
    }

    pub(crate) fn last_term(&self) -> Option<u64> {
        self.starts.last().map(|s| s.1)
    }

    /// Records that entry `index` has `term` (entries are pushed in order).
    pub(crate) fn push(&mut self, index: u64, term: u64) {
        // A checkpoint at or past `index` (left by trimming an emptied log) is replaced; the
        // common case, an entry past the last checkpoint, needs no search.
        if self.starts.last().is_some_and(|s| s.0 >= index) {
            self.truncate_from(index);
        }
        if self.last_term() != Some(term) {
            self.starts.push((index, term));
        }
    }

    /// Forgets entries from `index` on (the log was truncated there).
    pub(crate) fn truncate_from(&mut self, index: u64) {
        let keep = self.starts.partition_point(|s| s.0 < index);
        self.starts.truncate(keep);
    }

    /// Forgets entries before `first` (retention removed them).
    pub(crate) fn trim_before(&mut self, first: u64) {
        let covering = self.starts.partition_point(|s| s.0 <= first).saturating_sub(1);
        self.starts.drain(..covering);
        if let Some(s) = self.starts.first_mut() {
            s.0 = s.0.max(first);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.starts.clear();
    }

    /// Checkpoints held: one per term in the log.
    pub(crate) fn len(&self) -> usize {
        self.starts.len()
    }
}

/// The checkpoints as a clean close left them, with the end of the log they describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub end_index: u64,
    pub end_offset: u64,
    pub terms: Terms,
}

/// Writes `stored` durably (replacing any earlier file).
pub(crate) fn store(dir: &Path, stored: &Stored) -> Result<(), LogError> {
    let mut buf = Vec::with_capacity(28 + 16 * stored.terms.starts.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&stored.end_index.to_le_bytes());
    buf.extend_from_slice(&stored.end_offset.to_le_bytes());
    buf.extend_from_slice(&(stored.terms.starts.len() as u32).to_le_bytes());
    for &(index, term) in &stored.terms.starts {
        buf.extend_from_slice(&index.to_le_bytes());
        buf.extend_from_slice(&term.to_le_bytes());
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    replace_file_durably(dir, FILE_NAME, &buf)
}

/// Reads the file and removes it, so that it never outlives the clean open it was written
/// for. The removal needs no fsync of its own: should a crash undo it, the partition log has
/// not been closed cleanly since (its close syncs the directory), so the file is not trusted.
/// A missing or damaged file reads as `None`: it is only a shortcut.
pub(crate) fn take(dir: &Path) -> Result<Option<Stored>, ReplicaError> {
    let path = dir.join(FILE_NAME);
    let content = match fs::read(&path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read", &path, e)),
    };
    fs::remove_file(&path).map_err(|e| io_error("remove", &path, e))?;
    let stored = decode(&content);
    if stored.is_none() {
        tracing::warn!(path = %path.display(), "damaged term checkpoint file; rebuilding it from the log");
    }
    Ok(stored)
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> ReplicaError {
    ReplicaError::State(super::super::raft_state::StateError::Io {
        op,
        path: path.to_path_buf(),
        source,
    })
}

fn decode(content: &[u8]) -> Option<Stored> {
    let (body, crc) = content.split_at_checked(content.len().checked_sub(4)?)?;
    if crc32fast::hash(body).to_le_bytes() != crc || body.get(..4)? != MAGIC {
        return None;
    }
    let u64_at = |at: usize| Some(u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?));
    let count = u32::from_le_bytes(body.get(20..24)?.try_into().ok()?) as usize;
    if body.len() != 24 + 16 * count {
        return None;
    }
    let mut starts = Vec::with_capacity(count);
    for i in 0..count {
        starts.push((u64_at(24 + 16 * i)?, u64_at(32 + 16 * i)?));
    }
    let increasing = starts.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
    increasing.then_some(Stored {
        end_index: u64_at(4)?,
        end_offset: u64_at(12)?,
        terms: Terms { starts },
    })
}

/// The checkpoints of the entries from `first` to `last` (headers of the log's batches for
/// both), found by bisection: a range whose two ends have the same term holds no change,
/// since terms never decrease along the log. Each probe is one lookup by Raft index.
pub(crate) fn rebuild(log: &PartitionLog, first: &BatchHeader, last: &BatchHeader) -> Result<Terms, ReplicaError> {
    let mut terms = Terms::default();
    terms.push(first.raft_index, first.leader_epoch);
    split(log, first, last, &mut terms)?;
    Ok(terms)
}

/// Finds the term changes strictly after `lo` and up to `hi`, two entries' batch headers.
fn split(log: &PartitionLog, lo: &BatchHeader, hi: &BatchHeader, terms: &mut Terms) -> Result<(), ReplicaError> {
    let inconsistent = |reason: String| ReplicaError::Inconsistent {
        dir: log.dir().to_path_buf(),
        reason,
    };
    if hi.leader_epoch < lo.leader_epoch {
        return Err(inconsistent(format!(
            "entry {} has term {} but the later entry {} has term {}",
            lo.raft_index, lo.leader_epoch, hi.raft_index, hi.leader_epoch
        )));
    }
    if lo.leader_epoch == hi.leader_epoch {
        return Ok(());
    }
    if hi.raft_index == lo.raft_index + 1 {
        terms.push(hi.raft_index, hi.leader_epoch);
        return Ok(());
    }
    let mid = lo.raft_index + (hi.raft_index - lo.raft_index) / 2;
    let header = log.find_raft_entry(mid)?.ok_or_else(|| {
        inconsistent(format!(
            "no batch carries raft index {mid}, between {} and {}",
            lo.raft_index, hi.raft_index
        ))
    })?;
    // Stale batches of another history (left below the start by an interrupted reset) can
    // carry indexes in this range; only a batch between the two ends belongs to this log.
    if header.base_offset <= lo.base_offset || header.base_offset >= hi.base_offset {
        return Err(inconsistent(format!(
            "raft index {mid} is at offset {}, outside the offsets {} to {} of indexes {} to {}",
            header.base_offset, lo.base_offset, hi.base_offset, lo.raft_index, hi.raft_index
        )));
    }
    split(log, lo, &header, terms)?;
    split(log, &header, hi, terms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_truncation_and_trimming_keep_one_pair_per_term() {
        let mut t = Terms::default();
        for (i, term) in [(5, 1), (6, 1), (7, 3), (8, 3), (9, 4)] {
            t.push(i, term);
        }
        assert_eq!(t.len(), 3);
        assert_eq!(
            [4, 5, 6, 7, 8, 9, 100].map(|i| t.term_of(i)),
            [None, Some(1), Some(1), Some(3), Some(3), Some(4), Some(4)]
        );
        t.truncate_from(8);
        assert_eq!(t.term_of(100), Some(3));
        t.push(8, 5);
        assert_eq!((t.term_of(7), t.term_of(8)), (Some(3), Some(5)));
        t.trim_before(7);
        assert_eq!(t.starts, vec![(7, 3), (8, 5)]);
        t.trim_before(8);
        assert_eq!(t.starts, vec![(8, 5)]);
        t.trim_before(9);
        assert_eq!(t.starts, vec![(9, 5)]);
        // Retention emptied the log up to 8; entry 9 comes in a newer term.
        t.push(9, 6);
        assert_eq!(t.starts, vec![(9, 6)]);
    }

    #[test]
    fn the_file_round_trips_is_removed_when_read_and_damage_reads_as_absent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut terms = Terms::default();
        terms.push(3, 1);
        terms.push(40, 7);
        let stored = Stored {
            end_index: 90,
            end_offset: 1234,
            terms,
        };
        store(dir.path(), &stored).expect("store");
        assert_eq!(take(dir.path()).expect("take"), Some(stored.clone()));
        assert!(!dir.path().join(FILE_NAME).exists(), "removed once read");
        assert_eq!(take(dir.path()).expect("take"), None);
        store(dir.path(), &stored).expect("store");
        let path = dir.path().join(FILE_NAME);
        let mut bytes = fs::read(&path).expect("read");
        bytes[10] ^= 1;
        fs::write(&path, bytes).expect("write");
        assert_eq!(take(dir.path()).expect("take"), None);
    }
}
