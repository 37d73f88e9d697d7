//! raft-rs `Storage` over the partition's segmented log.
//!
//! Each Raft entry is one batch in the partition log (see [`super::entry`]); its header
//! carries the entry's index and term. Nothing is written twice: there is no separate Raft
//! write-ahead log. HardState, ConfState and the snapshot point live in the small
//! [`super::raft_state`] file. This file keeps the log's Raft view; `storage.rs` answers
//! raft-rs's `Storage` calls from it.
//!
//! # Invariants
//! - Entries `first_index ..= last_index` are the batches from the log's Raft start, with
//!   contiguous Raft indexes; `first_index = snapshot_index + 1`.
//! - The term of `snapshot_index` is kept (in the state file) for Raft's log matching.
//! - Only committed entries are ever compacted; a snapshot says where the log now starts and
//!   carries the state replayed from the log at that point: a partition's producer state
//!   (`replica::producers`), the controller's metadata (see `set_state_snapshots`).
//!
//! # Memory
//! Nothing is held per entry: the term of an entry comes from the term checkpoints (one pair
//! per term, see [`terms`]), the offset of an entry from the offsets of the most recent
//! entries ([`TAIL_OFFSETS`]) or else from a lookup by Raft index in the log's batch headers
//! (`PartitionLog::find_raft_entry`: a bisection over segments and their sparse offset index).
//!
//! # Crash behaviour
//! The snapshot point is recorded before retention deletes segments; on open, batches at or
//! below it are skipped, so a crash in between loses nothing Raft needs. Open reads a few
//! batch headers, not all of them: the first and last entries', and the term checkpoints
//! either from the file a clean close left (see [`terms`]) or, after a crash, by bisection.
//!
//! # Thread-safety
//! The state sits behind a `RwLock`; the owning partition task is the only writer.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use conveyor_storage::batch::BatchIter;
use conveyor_storage::{FlushPolicy, LogError, PartitionLog};
use raft::StorageError;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};

use super::entry::{self, EntryError};
use super::raft_state::{Promise, RaftStateFile, StateError};
use super::state_snapshot::{SnapshotPoint, StateSnapshots};
use terms::Terms;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Entry(#[from] EntryError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("raft log at {dir}: {reason}")]
    Inconsistent { dir: PathBuf, reason: String },
    #[error(transparent)]
    Snapshot(#[from] super::state_snapshot::SnapshotError),
}

/// Entries kept in memory after appending, at most.
const MAX_CACHED_ENTRIES: usize = 4096;

/// Offsets of the most recent entries kept, at most: the high watermark and acknowledgements
/// ask about recent entries on every round. A follower's lag may ask about an older one;
/// the owner then remembers the answer rather than looking it up every round (see
/// [`RaftLog::known_offset_after`]).
pub const TAIL_OFFSETS: usize = 1024;

fn store_error(e: impl std::error::Error + Send + Sync + 'static) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

#[derive(Debug)]
struct Inner {
    /// Highest entry applied; only applied entries are compacted.
    applied: u64,
    state: RaftStateFile,
    /// The index of the last entry; `snapshot_index` while the log holds none.
    last_index: u64,
    /// The offset of entry `first_index`, while the log holds entries.
    start_offset: u64,
    /// The first index of each term from `first_index` on.
    terms: Terms,
    /// Offsets of the last entries, up to [`TAIL_OFFSETS`]; the back one is `last_index`'s.
    tail: VecDeque<u64>,
    /// The most recent entries as appended, so that applying them (and sending them to
    /// followers) does not read back from disk what is still in memory.
    cache: VecDeque<Entry>,
    /// Set when the partition is reopened over the same directory (or deleted): the state
    /// this object holds is stale and must never be written over `raft-state` again.
    retired: bool,
    /// The last index made durable by [`RaftLog::persist`] (as the flush policy requires), or
    /// found on disk at open. The commit index stored in `raft-state` never exceeds it: see
    /// [`RaftLog::set_hard_state`].
    persisted: u64,
}

impl Inner {
    fn first_index(&self) -> u64 {
        self.state.snapshot_index + 1
    }

    fn last_index(&self) -> u64 {
        self.last_index
    }

    fn is_empty(&self) -> bool {
        self.last_index < self.first_index()
    }

    /// The term of the last entry (that of the snapshot point when the log holds none).
    fn last_term(&self) -> u64 {
        match self.terms.last_term() {
            Some(t) if !self.is_empty() => t,
            _ => self.state.snapshot_term,
        }
    }

    /// The offset of entry `index` if it is known without I/O: the first entry or a recent one.
    fn known_offset(&self, index: u64) -> Option<u64> {
        if self.is_empty() || index < self.first_index() || index > self.last_index {
            return None;
        }
        if index == self.first_index() {
            return Some(self.start_offset);
        }
        let tail_first = self.last_index + 1 - self.tail.len() as u64;
        index
            .checked_sub(tail_first)
            .and_then(|i| self.tail.get(i as usize).copied())
    }

    /// Records an appended entry.
    fn push(&mut self, index: u64, term: u64, offset: u64) {
        if self.is_empty() {
            self.start_offset = offset;
        }
        self.last_index = index;
        self.terms.push(index, term);
        self.tail.push_back(offset);
        if self.tail.len() > TAIL_OFFSETS {
            self.tail.pop_front();
        }
    }

    /// Forgets entries from `index` on.
    fn truncate_from(&mut self, index: u64) {
        let dropped = (self.last_index + 1).saturating_sub(index);
        let keep = self.tail.len().saturating_sub(dropped as usize);
        self.tail.truncate(keep);
        self.terms.truncate_from(index);
        self.last_index = self.last_index.min(index - 1);
        self.cache.retain(|e| e.index < index);
    }
}

/// A replica's Raft state as one consistent reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftView {
    /// The configuration as of `applied`.
    pub conf_state: ConfState,
    /// The last entry applied here; 0 after an open until the next entry is applied.
    pub applied: u64,
    /// The term as stored (that of the node, once it is persisted).
    pub term: u64,
    /// The index of the last entry in the log.
    pub last_index: u64,
}

/// The Raft log of one partition: raft-rs `Storage` plus the writes the Raft driver makes.
/// Clones share the same state: the Raft node owns one, the partition keeps one for
/// retention and offset lookups.
#[derive(Debug, Clone)]
pub struct RaftLog {
    log: Arc<PartitionLog>,
    dir: PathBuf,
    inner: Arc<RwLock<Inner>>,
    /// The snapshots of the state replayed from this log that a Raft snapshot carries: the
    /// controller's metadata, or a partition's producer state (see `replica::producers`).
    state: Option<Arc<dyn StateSnapshots>>,
}

impl RaftLog {
    /// Loads the state file and finds the entries already in `log`: the first and the last
    /// by lookups, the term checkpoints from the file a clean close left or by bisection (see
    /// the module docs). If opening the log lost entries this replica may have acknowledged,
    /// records durably that it is recovering and what it promised (see
    /// [`super::lost_entries`]), and only then releases the corruption marker that reported
    /// the loss. Blocking.
    pub fn open(log: Arc<PartitionLog>) -> Result<RaftLog, ReplicaError> {
        let dir = log.dir().to_path_buf();
        let mut state = RaftStateFile::load(&dir)?;
        let stored = terms::take(&dir)?;
        finish_snapshot_reset(&log, &state)?;
        let found = find_entries(&log, &state, stored)?;
        let (last, start_offset, terms, tail) = match found {
            Some(f) => (f.last, f.start_offset, f.terms, VecDeque::from([f.last_offset])),
            None => (
                state.snapshot_index,
                log.log_end_offset(),
                Terms::default(),
                VecDeque::new(),
            ),
        };
        let last_term = terms
            .last_term()
            .filter(|_| last > state.snapshot_index)
            .unwrap_or(state.snapshot_term);
        // A commit stored ahead of what survived (flush policy `os`, or a cut tail) cannot
        // be honoured; Raft must not be told about entries it does not have.
        let lost = lost_acknowledged_entries(&log, &state, last);
        if state.hard_state.commit > last {
            tracing::warn!(dir = %dir.display(), stored = state.hard_state.commit, last, "stored commit index is past the log; lowering it");
            state.hard_state.commit = last;
        }
        let own = Promise {
            term: last_term,
            index: last,
        };
        let recovering = state.recovering.max(lost.filter(|&p| p > own));
        if recovering != state.recovering {
            // Recorded before the owner runs, so that a crash or a restart while recovering
            // does not forget it (the lowered commit above is stored with it).
            state.recovering = recovering;
            state.store(&dir)?;
        }
        if log.recovery_report().damaged.is_some() {
            // Only now that the loss is recorded may the marker that reports it go; a crash
            // before this reports it again at the next open (see `conveyor_storage::recovery`).
            log.release_corruption_marker()?;
        }
        Ok(RaftLog {
            log,
            dir,
            inner: Arc::new(RwLock::new(Inner {
                applied: 0,
                state,
                last_index: last,
                start_offset,
                terms,
                // The last entry's offset, read at open anyway: the high watermark asks for it.
                tail,
                cache: VecDeque::new(),
                retired: false,
                persisted: last,
            })),
            state: None,
        })
    }

    /// Makes this group's snapshots carry its state machine's state: one sent to a follower
    /// holds the state stored at the snapshot point, and one received is stored before the
    /// log is reset. Set before the Raft node takes its clone.
    pub fn set_state_snapshots(&mut self, state: Arc<dyn StateSnapshots>) {
        self.state = Some(state);
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the replica is recovering lost entries, as stored: `Some(promise)`, the last
    /// entry it may have acknowledged. See [`super::lost_entries`].
    pub fn recovering(&self) -> Option<Promise> {
        self.read().state.recovering
    }

    /// Records durably that the replica is recovering (what it promised), or no longer is.
    /// Refused by a retired view, like every `raft-state` write.
    pub fn set_recovering(&self, recovering: Option<Promise>) -> Result<(), ReplicaError> {
        let mut inner = self.write();
        if inner.state.recovering == recovering {
            return Ok(());
        }
        let before = inner.state.recovering;
        inner.state.recovering = recovering;
        if let Err(e) = self.store_state(&inner) {
            inner.state.recovering = before;
            return Err(e);
        }
        Ok(())
    }

    /// The (term, index) of the last entry in the log (the snapshot point for an empty one).
    pub fn last_entry(&self) -> Promise {
        let inner = self.read();
        Promise {
            term: inner.last_term(),
            index: inner.last_index(),
        }
    }

    pub fn partition_log(&self) -> &Arc<PartitionLog> {
        &self.log
    }

    /// Appends entries from a Ready, replacing any conflicting suffix first (Raft only sends
    /// entries that overwrite uncommitted ones). Written, not yet synced: call
    /// [`persist`](Self::persist) before sending the messages that depend on them.
    pub fn append(&self, entries: &[Entry], origin: entry::Origin) -> Result<(), ReplicaError> {
        let Some(first) = entries.first() else { return Ok(()) };
        let mut inner = self.write();
        if first.index <= inner.state.snapshot_index {
            return Err(ReplicaError::Inconsistent {
                dir: self.dir.clone(),
                reason: format!(
                    "entry {} is at or below the snapshot point {}",
                    first.index, inner.state.snapshot_index
                ),
            });
        }
        if first.index > inner.last_index() + 1 {
            return Err(ReplicaError::Inconsistent {
                dir: self.dir.clone(),
                reason: format!("entry {} leaves a gap after {}", first.index, inner.last_index()),
            });
        }
        if first.index <= inner.last_index() {
            let offset = self.offset_in(&inner, first.index)?;
            self.log.truncate_to(offset)?;
            inner.truncate_from(first.index);
            inner.persisted = inner.persisted.min(first.index - 1);
        }
        let limit = self.log.max_batch_bytes();
        for e in entries {
            let batch = entry::to_batch(e, limit, origin)?;
            let info = self.log.append_validated_stamped_unsynced(&batch, e.term, e.index)?;
            inner.push(e.index, e.term, info.base_offset);
            inner.cache.push_back(e.clone());
        }
        while inner.cache.len() > MAX_CACHED_ENTRIES {
            inner.cache.pop_front();
        }
        Ok(())
    }

    /// Makes appended entries as durable as the topic's flush policy requires.
    pub fn persist(&self) -> Result<(), ReplicaError> {
        let last = self.read().last_index();
        self.log.apply_flush_policy(self.log.log_end_offset())?;
        self.write().persisted = last;
        Ok(())
    }

    /// Whether the entries from `index` to the last one are all in memory and plain
    /// batches: raft-rs can hand them out for applying without reading the log, and applying
    /// them changes no membership (which stores the Raft state file).
    pub fn plain_entries_cached_from(&self, index: u64) -> bool {
        let inner = self.read();
        if index > inner.last_index() {
            return true;
        }
        let Some(front) = inner.cache.front().map(|e| e.index) else {
            return false;
        };
        front <= index
            && inner
                .cache
                .iter()
                .filter(|e| e.index >= index)
                .all(|e| e.get_entry_type() == raft::eraftpb::EntryType::EntryNormal)
    }

    /// Whether storing `hard_state` writes the Raft state file (term or vote changed).
    pub fn hard_state_is_durable_change(&self, hard_state: &HardState) -> bool {
        let inner = self.read();
        hard_state.term != inner.state.hard_state.term || hard_state.vote != inner.state.hard_state.vote
    }

    /// Records the HardState. Term and vote are stored durably before this returns (a lost
    /// vote could elect two leaders in one term); a commit-only change is kept in memory and
    /// written with the next durable change, since a restarted replica relearns the commit
    /// index from its leader (or, alone, by committing a new no-op).
    ///
    /// The commit index written is capped at the last persisted index. A Ready's HardState is
    /// stored before its entries are persisted, so that term and vote are durable before any
    /// message that depends on them is sent; but raft-rs sets a follower's commit to cover the
    /// entries of that same Ready. Stored uncapped, a power cut before `persist` would leave
    /// a commit past the log, which [`RaftLog::open`] must read as acknowledged entries lost
    /// (flush policy `always`): a promise for entries never acknowledged. Capped, a stored
    /// commit past the log means synced entries were lost.
    pub fn set_hard_state(&self, hard_state: &HardState) -> Result<(), ReplicaError> {
        let mut inner = self.write();
        let durable = hard_state.term != inner.state.hard_state.term || hard_state.vote != inner.state.hard_state.vote;
        inner.state.hard_state = hard_state.clone();
        if durable {
            self.store_state(&inner)?;
        }
        Ok(())
    }

    /// Stores the state file durably, commit index included (capped at the last persisted
    /// index): at a clean shutdown, and before a reopening.
    pub fn flush_state(&self) -> Result<(), ReplicaError> {
        self.store_state(&self.read())
    }

    /// Closes the partition log cleanly, then stores the Raft state: the stored commit never
    /// covers entries that are not on disk. Blocking; once nothing appends any more.
    ///
    /// The term checkpoints are stored first, so that the partition log's clean-shutdown
    /// marker, written last by its close, vouches for them too (see [`terms`]).
    pub fn close(&self) -> Result<(), ReplicaError> {
        let inner = self.write();
        if inner.retired {
            return Err(LogError::Closed.into());
        }
        let stored = terms::Stored {
            end_index: inner.last_index() + 1,
            end_offset: self.log.log_end_offset(),
            terms: inner.terms.clone(),
        };
        terms::store(&self.dir, &stored)?;
        self.log.close()?;
        self.store_state(&inner)
    }

    /// The offset of entry `index`, which must be in the log: from memory for the first and
    /// recent entries, else by a lookup in the log's batch headers.
    fn offset_in(&self, inner: &Inner, index: u64) -> Result<u64, ReplicaError> {
        if let Some(offset) = inner.known_offset(index) {
            return Ok(offset);
        }
        let found = if inner.is_empty() || index < inner.first_index() || index > inner.last_index() {
            None
        } else {
            self.log
                .find_raft_entry(index)?
                .filter(|h| h.base_offset > inner.start_offset)
        };
        found.map(|h| h.base_offset).ok_or_else(|| ReplicaError::Inconsistent {
            dir: self.dir.clone(),
            reason: format!(
                "no batch carries raft index {index} (entries {} to {})",
                inner.first_index(),
                inner.last_index()
            ),
        })
    }

    /// Stores `inner`'s state durably, unless this object was retired.
    /// The commit index is stored capped at the last persisted index (see
    /// [`set_hard_state`](Self::set_hard_state)); the one in memory is left as Raft set it.
    fn store_state(&self, inner: &Inner) -> Result<(), ReplicaError> {
        if inner.retired {
            return Err(LogError::Closed.into());
        }
        if inner.state.hard_state.commit <= inner.persisted {
            return Ok(inner.state.store(&self.dir)?);
        }
        let mut state = inner.state.clone();
        state.hard_state.commit = inner.persisted;
        Ok(state.store(&self.dir)?)
    }

    /// Retires this view and its partition log before the replica is reopened over the same
    /// directory: neither writes `raft-state` nor changes the log's files again. Waits for a
    /// write in progress on this view to finish.
    pub fn retire(&self) {
        self.write().retired = true;
        self.log.retire();
    }

    /// Voters of the group, as last applied.
    pub fn voters(&self) -> Vec<u64> {
        self.read().state.conf_state.voters.clone()
    }

    /// Voters and learners, as last applied.
    pub fn conf_state(&self) -> ConfState {
        self.read().state.conf_state.clone()
    }

    /// The configuration with the point it holds at, and the term and last index, read
    /// together.
    pub fn view(&self) -> RaftView {
        let inner = self.read();
        RaftView {
            conf_state: inner.state.conf_state.clone(),
            applied: inner.applied,
            term: inner.state.hard_state.term,
            last_index: inner.last_index(),
        }
    }

    /// Records that entries up to `index` are applied and drops them from the cache.
    pub fn evict_cache_to(&self, index: u64) {
        let mut inner = self.write();
        inner.applied = inner.applied.max(index);
        while inner.cache.front().is_some_and(|e| e.index <= index) {
            inner.cache.pop_front();
        }
    }

    /// Offset of the batch that carries entry `index`, if it is in the log.
    pub fn offset_of(&self, index: u64) -> Option<u64> {
        let inner = self.read();
        if inner.is_empty() || index < inner.first_index() || index > inner.last_index() {
            return None;
        }
        self.offset_in(&inner, index)
            .inspect_err(
                |e| tracing::warn!(dir = %self.dir.display(), index, error = %e, "cannot find a raft entry's offset"),
            )
            .ok()
    }

    /// The offset of the first entry, or the log end while the log holds none.
    fn start_offset(&self, inner: &Inner) -> u64 {
        if inner.is_empty() {
            self.log.log_end_offset()
        } else {
            inner.start_offset
        }
    }

    pub fn set_conf_state(&self, conf_state: &ConfState) -> Result<(), ReplicaError> {
        let mut inner = self.write();
        inner.state.conf_state = conf_state.clone();
        self.store_state(&inner)?;
        Ok(())
    }

    /// Offset below which entries up to `index` lie: what a consumer may read once `index` is
    /// committed.
    /// A lookup that fails answers the first entry's offset: never more than is committed.
    pub fn offset_after(&self, index: u64) -> u64 {
        let inner = self.read();
        if index < inner.first_index() {
            return self.start_offset(&inner);
        }
        if index >= inner.last_index() {
            return self.log.log_end_offset();
        }
        match self.offset_in(&inner, index + 1) {
            Ok(offset) => offset,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), index, error = %e, "cannot find a raft entry's offset");
                inner.start_offset
            }
        }
    }

    /// [`offset_after`](Self::offset_after) if it is known without reading the log (the
    /// entry is before the first, the first, or among the [`TAIL_OFFSETS`] most recent);
    /// `None` if it would take a lookup in the log.
    pub fn known_offset_after(&self, index: u64) -> Option<u64> {
        let inner = self.read();
        if index < inner.first_index() {
            return Some(self.start_offset(&inner));
        }
        if index >= inner.last_index() {
            return Some(self.log.log_end_offset());
        }
        inner.known_offset(index + 1)
    }

    /// Applies retention without losing what Raft needs: only committed entries are removed,
    /// and the snapshot point is recorded before segments are deleted. Returns the number of
    /// entries compacted.
    pub fn compact(&self, now_ms: i64) -> Result<usize, ReplicaError> {
        let Some(cutoff) = self.log.retention_cutoff(now_ms) else {
            return Ok(0);
        };
        // The log may start only where the snapshotted state is known.
        let cutoff = match &self.state {
            Some(state) => match state.compaction_limit(cutoff) {
                Some(limit) => limit,
                None => return Ok(0),
            },
            None => cutoff,
        };
        self.compact_below(cutoff)
    }

    /// Compacts the committed, applied entries whose batches start below `cutoff` (for the
    /// controller: the offset of a stored state snapshot) and deletes the segments wholly
    /// below the new start. Returns the number of entries compacted.
    pub fn compact_below(&self, cutoff: u64) -> Result<usize, ReplicaError> {
        let mut inner = self.write();
        if inner.is_empty() {
            return Ok(0);
        }
        let committed = inner.state.hard_state.commit.min(inner.applied);
        // Entries in batches below the cutoff: those before the batch the cutoff starts;
        // all of them for a cutoff at or past the log's end, none for one below its start
        // (a stale cutoff, from before the log was reset past it).
        let below_cutoff = match self.log.batch_header_at(cutoff)? {
            Some(h) => h.raft_index.saturating_sub(1),
            None if cutoff >= self.log.log_end_offset() => inner.last_index(),
            None => return Ok(0),
        };
        let last_removed = below_cutoff.min(committed).min(inner.last_index());
        if last_removed < inner.first_index() {
            return Ok(0);
        }
        let removable = (last_removed + 1 - inner.first_index()) as usize;
        let start_offset = if last_removed == inner.last_index() {
            self.log.log_end_offset()
        } else {
            self.offset_in(&inner, last_removed + 1)?
        };
        if let Some(state) = &self.state
            && state.compaction_limit(start_offset) != Some(start_offset)
        {
            // Not all of what the cutoff asked is applied yet, and the state is not stored
            // where the log would start: wait for a later pass.
            return Ok(0);
        }
        let term = inner
            .terms
            .term_of(last_removed)
            .ok_or_else(|| ReplicaError::Inconsistent {
                dir: self.dir.clone(),
                reason: format!("no term known for entry {last_removed}"),
            })?;
        inner.state.snapshot_index = last_removed;
        inner.state.snapshot_term = term;
        inner.state.snapshot_offset = start_offset;
        self.store_state(&inner)?;
        let first = inner.first_index();
        inner.start_offset = start_offset;
        inner.terms.trim_before(first);
        let tail_first = inner.last_index() + 1 - inner.tail.len() as u64;
        let stale = (first.saturating_sub(tail_first) as usize).min(inner.tail.len());
        inner.tail.drain(..stale);
        inner.cache.retain(|e| e.index >= first);
        drop(inner);
        self.log.delete_segments_before(start_offset)?;
        if let Some(state) = &self.state {
            state.log_starts_at(start_offset);
        }
        Ok(removable)
    }

    /// Installs a leader's snapshot: the log restarts, empty, where the leader's starts.
    pub fn apply_snapshot(&self, snapshot: &Snapshot) -> Result<(), ReplicaError> {
        let meta = snapshot.get_metadata();
        let offset = snapshot_offset(snapshot).ok_or_else(|| ReplicaError::Inconsistent {
            dir: self.dir.clone(),
            reason: "snapshot without a log start offset".into(),
        })?;
        if let Some(state) = &self.state {
            // Stored before the log is reset: the state is all a restart would have of what
            // the records below the snapshot point did.
            let payload = snapshot.data.get(8..).filter(|p| !p.is_empty());
            let payload = payload.ok_or_else(|| ReplicaError::Inconsistent {
                dir: self.dir.clone(),
                reason: format!("the snapshot at index {} carries no state", meta.index),
            })?;
            let point = SnapshotPoint {
                index: meta.index,
                term: meta.term,
                offset,
            };
            state.install(point, payload)?;
        }
        let mut inner = self.write();
        inner.state.snapshot_index = meta.index;
        inner.state.snapshot_term = meta.term;
        inner.state.snapshot_offset = offset;
        inner.state.conf_state = meta.get_conf_state().clone();
        inner.state.hard_state.commit = inner.state.hard_state.commit.max(meta.index);
        inner.state.hard_state.term = inner.state.hard_state.term.max(meta.term);
        // The snapshot point is durable with the state itself: the log restarts after it.
        inner.persisted = meta.index;
        // Recorded first: if the reset below is interrupted, open skips what is left.
        self.store_state(&inner)?;
        self.log.truncate_fully_and_start_at(offset)?;
        inner.last_index = meta.index;
        inner.start_offset = offset;
        inner.terms.clear();
        inner.tail.clear();
        inner.cache.clear();
        drop(inner);
        if let Some(state) = &self.state {
            state.log_starts_at(offset);
        }
        Ok(())
    }
}

/// Finishes an `apply_snapshot` that stopped between storing the snapshot point and
/// resetting the log to it: left as it is, the log would hold entries from before the
/// snapshot where the ones after it belong (or end below it), and this replica's offsets
/// would no longer be the leader's. Resetting again is idempotent. Blocking.
fn finish_snapshot_reset(log: &PartitionLog, state: &RaftStateFile) -> Result<(), ReplicaError> {
    let at = state.snapshot_offset;
    let unfinished = if at > log.log_end_offset() {
        true
    } else if at < log.log_end_offset() && at >= log.log_start_offset() {
        // A batch at the snapshot point that carries an index the snapshot covers is one
        // the reset should have removed.
        log.batch_header_at(at)?
            .is_some_and(|h| h.raft_index > 0 && h.raft_index <= state.snapshot_index)
    } else {
        false
    };
    if unfinished {
        tracing::warn!(dir = %log.dir().display(), offset = at, index = state.snapshot_index, "the log was not reset to its stored snapshot point before the stop; resetting it now");
        log.truncate_fully_and_start_at(at)?;
    }
    Ok(())
}

/// The entries `log` holds after the snapshot point: the last one's index, the first one's
/// offset and the term checkpoints; `None` if it holds none. Reads the first and last
/// entries' headers and trusts a clean close's checkpoint file if it describes this very log
/// (see [`terms`]); otherwise rebuilds the checkpoints by bisection. Gaps in the Raft indexes
/// are found where a lookup lands on one (at the ends, at every probe of a rebuild, and at
/// every read of entries), not by reading every header.
fn find_entries(
    log: &PartitionLog,
    state: &RaftStateFile,
    stored: Option<terms::Stored>,
) -> Result<Option<Found>, ReplicaError> {
    let inconsistent = |reason: String| ReplicaError::Inconsistent {
        dir: log.dir().to_path_buf(),
        reason,
    };
    let first = state.snapshot_index + 1;
    // Batches below the snapshot point may still be there: compacted for Raft, not yet
    // deleted.
    let start = log
        .log_start_offset()
        .max(state.snapshot_offset.min(log.log_end_offset()));
    let last = log
        .last_batch_header()?
        .filter(|h| h.base_offset >= start && h.raft_index >= first);
    let Some(last) = last else {
        return Ok(None);
    };
    let head = log
        .find_raft_entry(first)?
        .filter(|h| h.base_offset >= start)
        .ok_or_else(|| {
            inconsistent(format!(
                "the last batch carries raft index {}, but none at or after offset {start} carries {first}, the first after the snapshot point",
                last.raft_index
            ))
        })?;
    // Every batch takes at least one offset: more entries than offsets means a gap.
    let entries = last.raft_index - first;
    if last
        .base_offset
        .checked_sub(head.base_offset)
        .is_none_or(|d| d < entries)
    {
        return Err(inconsistent(format!(
            "raft indexes {first} to {} lie at offsets {} to {}",
            last.raft_index, head.base_offset, last.base_offset
        )));
    }
    let trusted = stored.filter(|s| {
        log.opened_clean()
            && s.end_index == last.raft_index + 1
            && s.end_offset == log.log_end_offset()
            && s.terms.term_of(first) == Some(head.leader_epoch)
            && s.terms.last_term() == Some(last.leader_epoch)
    });
    let from_file = trusted.is_some();
    let terms = match trusted {
        Some(s) => {
            let mut terms = s.terms;
            terms.trim_before(first);
            terms
        }
        None => terms::rebuild(log, &head, &last)?,
    };
    tracing::debug!(dir = %log.dir().display(), first, last = last.raft_index, terms = terms.len(), from_file, "found raft entries");
    Ok(Some(Found {
        last: last.raft_index,
        last_offset: last.base_offset,
        start_offset: head.base_offset,
        terms,
    }))
}

/// The entries an open found in the log.
struct Found {
    /// The last entry's index and offset.
    last: u64,
    last_offset: u64,
    /// The first entry's offset.
    start_offset: u64,
    terms: Terms,
}

/// What opening `log` says this replica may have acknowledged and no longer holds, as the
/// last entry it may have acknowledged (an upper bound; see [`super::lost_entries`]):
/// - the log was cut at a damaged batch the scrub found (damage at rest, whatever the flush
///   policy): the stamp of the log's last batch when the damage was found, which the
///   corruption marker carries. A marker written before markers carried it promises the
///   worst, `(stored term, u64::MAX)`: every entry this replica acknowledged has a term no
///   higher than its stored term.
/// - under flush policy `always` (an entry is acknowledged only once synced), a stored commit
///   index past the log's end: `(stored term, stored commit)`. The stored commit never
///   exceeds what was persisted when it was stored (see [`RaftLog::set_hard_state`]), so
///   this fires only when synced entries were lost.
///
/// A torn tail cut alone is not a loss: under `always` its bytes were never synced, so never
/// acknowledged; under `os` and `interval` an acknowledged but unsynced tail may be lost at a
/// power cut by contract (a leader's heartbeat still reveals it, see
/// [`super::lost_entries`]). Neither is a damaged frame with intact batches after it
/// ([`CutCause::Damage`]), whatever the policy: a Ready's entries are synced by one fsync, and
/// a power cut before it completes can leave later pages on disk and not earlier ones, so
/// those batches prove nothing about what was acknowledged. Damage to synced entries below
/// the stored commit is caught by the rule above; damage between the stored commit (written
/// lazily) and the synced end is not told apart from a torn write.
fn lost_acknowledged_entries(log: &PartitionLog, state: &RaftStateFile, last: u64) -> Option<Promise> {
    let stored_term = state.hard_state.term;
    let damaged = log.recovery_report().damaged.map(|d| match d.last_before {
        Some(stamp) => Promise {
            term: stamp.leader_epoch,
            index: stamp.raft_index,
        },
        None => Promise {
            term: stored_term,
            index: u64::MAX,
        },
    });
    let always = log.flush_policy() == FlushPolicy::Always;
    let commit = state.hard_state.commit;
    let past_commit = (always && commit > last).then_some(Promise {
        term: stored_term,
        index: commit,
    });
    damaged.max(past_commit)
}

/// The log start offset a snapshot carries (its first 8 bytes; a state machine's state, if
/// any, follows).
pub fn snapshot_offset(snapshot: &Snapshot) -> Option<u64> {
    let data: [u8; 8] = snapshot.data.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(data))
}

mod storage;

pub(crate) mod terms;

#[cfg(test)]
mod open_tests;
#[cfg(test)]
mod tests;
