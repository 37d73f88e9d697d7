//! raft-rs's `Storage` trait over [`RaftLog`]: entries read back from the partition log's
//! batches (the recent ones from the cache), terms from the term checkpoints, and snapshots
//! that carry the log start offset (and a state machine's state, where the group has one).

use raft::eraftpb::{Entry, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use super::*;

impl Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let inner = self.read();
        Ok(RaftState::new(
            inner.state.hard_state.clone(),
            inner.state.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let inner = self.read();
        if low < inner.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > inner.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        // raft-rs may ask for everything up to the end for a follower far behind; what is
        // returned is bounded by `max_size`, so reserve no more than a modest batch up front.
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        if let Some(cached) = inner.cache.front()
            && cached.index <= low
        {
            let skip = (low - cached.index) as usize;
            for e in inner.cache.iter().skip(skip).take((high - low) as usize) {
                size += e.data.len() as u64;
                if !out.is_empty() && size > max_size {
                    break;
                }
                out.push(e.clone());
            }
            return Ok(out);
        }
        if low >= high {
            return Ok(out);
        }
        let mut next = low;
        // A leader whose log was quarantined or poisoned meanwhile sends nothing rather than
        // fail: raft-rs treats any other storage error as fatal, and the owner stops the
        // replica at its next round (see `Owner::run`).
        let unavailable = |e: ReplicaError| {
            if context.can_async() && self.log.is_poisoned() {
                raft::Error::Store(StorageError::LogTemporarilyUnavailable)
            } else {
                store_error(e)
            }
        };
        let mut offset = self.offset_in(&inner, low).map_err(unavailable)?;
        while next < high {
            let bytes = self.log.read(offset, 1 << 20).map_err(|e| unavailable(e.into()))?;
            for batch in BatchIter::new(bytes) {
                let batch = batch.map_err(store_error)?;
                let entry = entry::from_batch(&batch).map_err(store_error)?;
                if entry.index != next {
                    return Err(store_error(EntryError::Malformed {
                        index: next,
                        reason: format!("found raft index {} at offset {offset}", entry.index),
                    }));
                }
                size += batch.bytes().len() as u64;
                if !out.is_empty() && size > max_size {
                    return Ok(out);
                }
                out.push(entry);
                offset = batch.header().next_offset();
                next += 1;
                if next == high {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let inner = self.read();
        if idx == inner.state.snapshot_index {
            return Ok(inner.state.snapshot_term);
        }
        if idx < inner.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > inner.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        inner.terms.term_of(idx).ok_or_else(|| {
            store_error(ReplicaError::Inconsistent {
                dir: self.dir.clone(),
                reason: format!("no term known for entry {idx}"),
            })
        })
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index())
    }

    /// A snapshot whose index and term are the snapshot point and whose data is the log
    /// start offset, followed by the state at that point for a group with state (the
    /// controller's).
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let inner = self.read();
        if request_index > inner.state.snapshot_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        let mut snapshot = Snapshot::default();
        let start = self.start_offset(&inner);
        let mut data = start.to_le_bytes().to_vec();
        if let Some(state) = &self.state {
            // A follower this far behind cannot replay the records it lacks: it gets the
            // state at the snapshot point.
            let point = SnapshotPoint {
                index: inner.state.snapshot_index,
                term: inner.state.snapshot_term,
                offset: start,
            };
            let Some(payload) = state.state_at(&point) else {
                return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
            };
            data.extend_from_slice(&payload);
        }
        snapshot.data = bytes::Bytes::from(data);
        let meta = snapshot.mut_metadata();
        meta.index = inner.state.snapshot_index;
        meta.term = inner.state.snapshot_term;
        meta.set_conf_state(inner.state.conf_state.clone());
        Ok(snapshot)
    }
}
