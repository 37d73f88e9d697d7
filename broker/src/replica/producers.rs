//! Idempotent producers on one partition replica: the state applied from committed entries,
//! the leader's view of what it proposed on top, and the verdict on each new batch.
//!
//! # Where the state comes from
//! - `table`: every committed, applied batch, folded in by the Ready job in log order
//!   ([`PartitionProducers::apply_committed`]); the same on every replica. Loaded at open
//!   from the newest snapshot at or below the applied point plus a replay of batch headers.
//! - `pending`: on the leader only, the idempotent batches in its log above the applied
//!   point: those it proposed, and those of earlier terms it found in its log when it took
//!   over (they commit with its first entry). A retry of one of them is answered once it
//!   commits, with its offsets; nothing is written twice.
//!
//! A snapshot file is written when the applied state reaches a segment's base offset and
//! when the replica closes cleanly (see `conveyor_storage::producer_state::snapshot`);
//! retention never moves the log start past the newest snapshot, so a follower sent a Raft
//! snapshot gets the producer state at exactly the leader's log start.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use conveyor_storage::PartitionLog;
use conveyor_storage::batch::{BatchHeader, ValidatedBatch, unix_millis};
use conveyor_storage::producer_state::snapshot::SnapshotStore;
use conveyor_storage::producer_state::{
    BatchMeta, Idempotent, MAX_CACHED_BATCHES, ProducerFieldError, ProducerSummary, ProducerTable, Verdict, View,
    classify, idempotence_of,
};
use prometheus_client::metrics::gauge::Gauge;
use raft::eraftpb::Entry;

use super::raft_storage::RaftLog;
use super::state_snapshot::{SnapshotPoint, StateSnapshots};

/// Why the leader refused an idempotent batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProducerRefusal {
    #[error(
        "producer {producer_id}: expected sequence {expected}, got {got} (an earlier batch was not appended); resend from the first unacknowledged batch, in order"
    )]
    OutOfOrder { producer_id: i64, expected: i32, got: i32 },
    #[error(
        "producer {producer_id}: sequence {sequence} was written before and is older than the last {MAX_CACHED_BATCHES} batches the partition remembers (oldest remembered: {oldest}); it is not resent"
    )]
    TooOld {
        producer_id: i64,
        sequence: i32,
        oldest: i32,
    },
    #[error(
        "producer {producer_id} epoch {got} is fenced: epoch {current} of the same id has written since; this producer must stop"
    )]
    Fenced { producer_id: i64, current: i16, got: i16 },
    #[error(
        "producer {producer_id}: the partition keeps no state for this id (it expired after a long idle time) and sequence {sequence} does not start a producer; resend from sequence 0 under a new epoch, or take a new id with InitProducer"
    )]
    Unknown { producer_id: i64, sequence: i32 },
    #[error(
        "producer id {producer_id} was never issued by this cluster (ids issued so far are below {issued_end}, as this broker knows); call InitProducer"
    )]
    NotIssued { producer_id: i64, issued_end: i64 },
    #[error("{0}")]
    Malformed(ProducerFieldError),
    #[error("the idempotent batches of one partition in one request must come from one producer")]
    MixedProducers,
}

impl ProducerRefusal {
    /// (gRPC code, error code, retriable).
    pub fn code(&self) -> (tonic::Code, conveyor_proto::v1::ErrorCode, bool) {
        use conveyor_proto::v1::ErrorCode as E;
        use tonic::Code as C;
        match self {
            ProducerRefusal::OutOfOrder { .. } => (C::FailedPrecondition, E::OutOfOrderSequence, true),
            ProducerRefusal::Fenced { .. } => (C::FailedPrecondition, E::ProducerFenced, false),
            ProducerRefusal::Unknown { .. } => (C::FailedPrecondition, E::UnknownProducerId, false),
            // This broker's view of the metadata may be behind the broker that issued it.
            ProducerRefusal::NotIssued { .. } => (C::FailedPrecondition, E::InvalidProducerId, true),
            ProducerRefusal::TooOld { .. } | ProducerRefusal::Malformed(_) | ProducerRefusal::MixedProducers => {
                (C::InvalidArgument, E::InvalidRequest, false)
            }
        }
    }
}

/// Where a batch the producer wrote is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Located {
    /// Committed and applied: its offsets are known.
    Committed(BatchMeta),
    /// In this leader's log, not applied yet: its Raft entry.
    Pending {
        index: u64,
        term: u64,
        last_offset_delta: u32,
    },
}

/// What to do with an append request's batches.
#[derive(Debug)]
pub enum Plan {
    /// Propose these batches; the ones before them (a prefix of the request) were written
    /// already and are located in `duplicates`.
    Propose {
        duplicates: Vec<Located>,
        batches: Vec<ValidatedBatch>,
        idempotent: Vec<Option<Idempotent>>,
    },
    /// Every batch was written already.
    AllDuplicates(Vec<Located>),
}

#[derive(Debug, Clone)]
struct PendingProducer {
    epoch: i16,
    batches: VecDeque<(i32, i32, Located)>,
}

/// The producers of one partition replica (see the module docs).
#[derive(Debug)]
pub struct PartitionProducers {
    table: ProducerTable,
    store: Option<Arc<SnapshotStore>>,
    /// The offset of the newest snapshot written or loaded.
    snapshot_at: u64,
    pending: HashMap<i64, PendingProducer>,
    /// Raft index and producer of each pending batch, in log order.
    pending_order: VecDeque<(u64, i64)>,
    /// The term `pending` was built for; `None` when this replica does not lead.
    pending_term: Option<u64>,
    /// Ids at or above this were never issued (the broker's view of the metadata).
    issued_end: Arc<AtomicI64>,
    active: Gauge,
}

impl Drop for PartitionProducers {
    fn drop(&mut self) {
        self.active.dec_by(self.table.len() as i64);
    }
}

impl PartitionProducers {
    /// A replica without producer state (the controller's metadata log).
    pub fn none(issued_end: Arc<AtomicI64>, active: Gauge) -> PartitionProducers {
        PartitionProducers {
            table: ProducerTable::new(),
            store: None,
            snapshot_at: 0,
            pending: HashMap::new(),
            pending_order: VecDeque::new(),
            pending_term: None,
            issued_end,
            active,
        }
    }

    /// Loads the state of every batch up to Raft index `applied`: the newest snapshot at or
    /// below it, then the batch headers after it. Blocking.
    pub fn load(
        raft: &RaftLog,
        store: Arc<SnapshotStore>,
        applied: u64,
        issued_end: Arc<AtomicI64>,
        active: Gauge,
    ) -> PartitionProducers {
        let log = raft.partition_log();
        let end = raft.offset_after(applied);
        let start = log.log_start_offset();
        // A snapshot below the log start (kept by retention for want of a newer one, or the
        // newest readable one after damage) still holds producers the deleted batches carried.
        let (mut snapshot_at, mut table) = match store.read_at_or_below(end) {
            Some((at, _, table)) => (at, table),
            None => (start, ProducerTable::new()),
        };
        if snapshot_at < start {
            tracing::warn!(dir = %log.dir().display(), snapshot = snapshot_at, log_start = start, "the producer state starts below the log: producers whose only batches were in between are forgotten (their next batches are refused UNKNOWN_PRODUCER_ID)");
        }
        // Replayed batches count as written now: their timestamps are the clients', and a
        // producer must not expire because it stamps old event times.
        let now = unix_millis();
        let mut replayed = 0u64;
        let read = log.for_each_batch_header(snapshot_at.max(start), |h| {
            if h.base_offset >= end || h.raft_index > applied {
                return false;
            }
            if h.base_offset >= snapshot_at {
                // As while applying: the state at each segment start is stored, so that
                // retention can move the log start there (a log from before producer
                // snapshots, or segments rolled after the last snapshot before a crash).
                if h.base_offset > snapshot_at && log.segment_base_of(h.base_offset) == Some(h.base_offset) {
                    match store.write(h.base_offset, &table) {
                        Ok(()) => snapshot_at = h.base_offset,
                        Err(e) => tracing::warn!(dir = %log.dir().display(), error = %e, "cannot write a producer snapshot during replay"),
                    }
                }
                table.apply(h, h.base_offset, now);
                replayed += 1;
            }
            true
        });
        if let Err(e) = read {
            tracing::error!(dir = %log.dir().display(), error = %e, "replaying the producer state stopped at a batch it cannot read; producers after it are forgotten");
        }
        if replayed > 0 || store.offsets().is_empty() {
            // The next open starts here instead of replaying the same batches again.
            match store.write(end, &table) {
                Ok(()) => snapshot_at = end,
                Err(e) => {
                    tracing::warn!(dir = %log.dir().display(), error = %e, "cannot write the producer snapshot after replay")
                }
            }
        }
        active.inc_by(table.len() as i64);
        PartitionProducers {
            table,
            store: Some(store),
            snapshot_at,
            pending: HashMap::new(),
            pending_order: VecDeque::new(),
            pending_term: None,
            issued_end,
            active,
        }
    }

    pub fn summaries(&self) -> Vec<ProducerSummary> {
        self.table.summaries()
    }

    fn set_table(&mut self, table: ProducerTable) {
        self.active.inc_by(table.len() as i64 - self.table.len() as i64);
        self.table = table;
    }

    /// Folds committed entries in, in log order, writing a snapshot whenever the state
    /// reaches a segment's base offset. Runs in the Ready job. Blocking. An entry whose
    /// offset is not in the log leaves the state unknown from there: an error, so that the
    /// replica is reopened (and replays) rather than judge batches against a wrong state.
    pub fn apply_committed(&mut self, raft: &RaftLog, entries: &[Entry]) -> Result<(), String> {
        let Some(store) = self.store.clone() else {
            return Ok(());
        };
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let log = raft.partition_log();
        let mut base = raft
            .offset_of(first.index)
            .ok_or_else(|| format!("committed entry {} is not in the log", first.index))?;
        let now = unix_millis();
        let before = self.table.len();
        for entry in entries {
            self.snapshot_at_segment_start(&store, log, base);
            // Every entry is one batch; one without client data (a no-op, a membership
            // change) is a control batch of one offset.
            let header = match entry.get_entry_type() {
                raft::eraftpb::EntryType::EntryNormal if !entry.data.is_empty() => Some(
                    BatchHeader::parse(&entry.data)
                        .map_err(|e| format!("committed entry {} is not a batch: {e}", entry.index))?,
                ),
                _ => None,
            };
            match header {
                Some(h) => {
                    if h.producer.producer_id >= 0 {
                        self.table.apply(&h, base, now);
                    }
                    base += u64::from(h.last_offset_delta) + 1;
                }
                None => base += 1,
            }
        }
        self.active.inc_by(self.table.len() as i64 - before as i64);
        Ok(())
    }

    /// Whether applying the committed entries from offset `from` on may write a producer
    /// snapshot (one of them starts a segment not yet snapshotted). Only the active segment
    /// can start at or after `from` when the entries are recent; a `true` is always safe.
    pub fn may_snapshot_from(&self, log: &PartitionLog, from: u64) -> bool {
        if self.store.is_none() {
            return false;
        }
        let active = log.segment_base_of(u64::MAX).unwrap_or(0);
        active >= from && active > self.snapshot_at
    }

    /// Before the batch at `base` is applied, the state is that of everything below it: if
    /// `base` starts a segment, that is the snapshot retention needs there.
    fn snapshot_at_segment_start(&mut self, store: &SnapshotStore, log: &PartitionLog, base: u64) {
        if base <= self.snapshot_at || log.segment_base_of(base) != Some(base) {
            return;
        }
        match store.write(base, &self.table) {
            Ok(()) => self.snapshot_at = base,
            Err(e) => {
                tracing::warn!(dir = %log.dir().display(), offset = base, error = %e, "cannot write a producer snapshot; retention keeps the segments until one is written")
            }
        }
    }

    /// Replaces the state with a leader's snapshot this replica installed.
    pub fn installed(&mut self, payload: &[u8]) {
        if self.store.is_none() {
            return;
        }
        match conveyor_storage::producer_state::snapshot::decode(payload) {
            Ok((offset, table)) => {
                self.set_table(table);
                self.snapshot_at = offset;
            }
            Err(e) => tracing::error!(error = %e, "an installed producer snapshot cannot be read back"),
        }
        self.clear_pending();
    }

    /// Writes the state at `offset` (the end of the applied entries), for a clean close.
    /// Blocking.
    pub fn snapshot_now(&mut self, offset: u64) {
        let Some(store) = &self.store else {
            return;
        };
        if offset == self.snapshot_at {
            return;
        }
        match store.write(offset, &self.table) {
            Ok(()) => self.snapshot_at = offset,
            Err(e) => tracing::warn!(offset, error = %e, "cannot write the producer snapshot at close"),
        }
    }

    /// Drops the state of producers idle since `before_ms`.
    pub fn expire(&mut self, before_ms: i64) -> usize {
        let dropped = self.table.expire(before_ms);
        self.active.dec_by(dropped as i64);
        dropped
    }

    /// Forgets what this replica proposed as leader (it stepped down).
    pub fn clear_pending(&mut self) {
        self.pending.clear();
        self.pending_order.clear();
        self.pending_term = None;
    }

    /// Whether the leader's pending view must be built for `term` before a batch is judged.
    pub fn needs_pending(&self, term: u64) -> bool {
        self.store.is_some() && self.pending_term != Some(term)
    }

    /// Builds the leader's pending view from the entries in its log above the applied
    /// point (`entries`: those of `applied + 1 ..= last`).
    pub fn rebuild_pending(&mut self, term: u64, entries: &[Entry]) {
        self.clear_pending();
        for entry in entries {
            if entry.data.is_empty() {
                continue;
            }
            let Ok(header) = BatchHeader::parse(&entry.data) else {
                continue;
            };
            if let Ok(Some(batch)) = idempotence_of(&header) {
                self.push_pending(&batch, entry.index, entry.term, header.last_offset_delta);
            }
        }
        self.pending_term = Some(term);
    }

    fn push_pending(&mut self, batch: &Idempotent, index: u64, term: u64, last_offset_delta: u32) {
        let p = self
            .pending
            .entry(batch.producer_id)
            .or_insert_with(|| PendingProducer {
                epoch: batch.epoch,
                batches: VecDeque::new(),
            });
        if batch.epoch > p.epoch {
            p.epoch = batch.epoch;
            p.batches.clear();
        }
        p.batches.push_back((
            batch.first_sequence,
            batch.last_sequence,
            Located::Pending {
                index,
                term,
                last_offset_delta,
            },
        ));
        if p.batches.len() > MAX_CACHED_BATCHES {
            p.batches.pop_front();
        }
        self.pending_order.push_back((index, batch.producer_id));
    }

    /// Drops the pending batches that are applied now (`applied`: the applied index).
    pub fn fold(&mut self, applied: u64) {
        while let Some(&(index, pid)) = self.pending_order.front() {
            if index > applied {
                break;
            }
            self.pending_order.pop_front();
            let now_empty = self.pending.get_mut(&pid).is_some_and(|p| {
                if let Some(pos) = p
                    .batches
                    .iter()
                    .position(|(_, _, at)| matches!(at, Located::Pending { index: i, .. } if *i == index))
                {
                    p.batches.remove(pos);
                }
                p.batches.is_empty()
            });
            // A producer's newest pending batch is always in its list: an empty list means
            // none of its batches is pending any more.
            if now_empty {
                self.pending.remove(&pid);
            }
        }
    }

    /// The producer's latest state: the applied table with this leader's pending batches on
    /// top.
    fn view(&self, producer_id: i64) -> Option<View<Located>> {
        let committed = self.table.get(producer_id);
        let pending = self.pending.get(&producer_id);
        let mut view = match (committed, pending) {
            (None, None) => return None,
            (Some(c), p) if p.is_none_or(|p| p.epoch == c.epoch) => View {
                epoch: c.epoch,
                batches: c
                    .batches
                    .iter()
                    .map(|b| (b.first_sequence, b.last_sequence, Located::Committed(*b)))
                    .collect(),
            },
            (_, p) => View {
                epoch: p.map_or(0, |p| p.epoch),
                batches: Vec::new(),
            },
        };
        if let Some(p) = pending {
            view.batches.extend(p.batches.iter().copied());
        }
        let excess = view.batches.len().saturating_sub(MAX_CACHED_BATCHES);
        view.batches.drain(..excess);
        Some(view)
    }

    /// Judges an append request's batches in order: a prefix may repeat batches written
    /// already, the rest must follow each producer's sequence. Nothing changes here; the
    /// owner calls [`PartitionProducers::proposed`] once the batches are proposed.
    /// Idempotent batches come with acks=all: the produce path refuses others before they
    /// are queued.
    pub fn plan(&self, batches: Vec<ValidatedBatch>) -> Result<Plan, ProducerRefusal> {
        let mut idempotent = Vec::with_capacity(batches.len());
        let mut any = false;
        for b in &batches {
            let i = idempotence_of(b.header()).map_err(ProducerRefusal::Malformed)?;
            any |= i.is_some();
            idempotent.push(i);
        }
        if !any {
            return Ok(Plan::Propose {
                duplicates: Vec::new(),
                batches,
                idempotent,
            });
        }
        let issued_end = self.issued_end.load(Ordering::Acquire);
        let mut duplicates = Vec::new();
        let mut appending = false;
        let mut producer = None;
        for batch in idempotent.iter().flatten() {
            let producer_id = batch.producer_id;
            if producer_id >= issued_end {
                return Err(ProducerRefusal::NotIssued {
                    producer_id,
                    issued_end,
                });
            }
            // One producer per part: its batches are in the log in sequence order, so the
            // answer's first and last batches bound all of them.
            if *producer.get_or_insert(producer_id) != producer_id {
                return Err(ProducerRefusal::MixedProducers);
            }
        }
        // The producer's state, moved on by each batch of the request as it is judged.
        let mut view = producer.and_then(|id| self.view(id));
        for (i, batch) in idempotent.iter().enumerate() {
            let Some(batch) = batch else {
                appending = true;
                continue;
            };
            match classify(view.as_ref(), batch) {
                Verdict::Append => {
                    appending = true;
                    // Later batches of the request follow this one.
                    let v = view.get_or_insert_with(|| View {
                        epoch: batch.epoch,
                        batches: Vec::new(),
                    });
                    if batch.epoch > v.epoch {
                        v.epoch = batch.epoch;
                        v.batches.clear();
                    }
                    v.batches.push((
                        batch.first_sequence,
                        batch.last_sequence,
                        Located::Pending {
                            index: 0,
                            term: 0,
                            last_offset_delta: 0,
                        },
                    ));
                }
                Verdict::Duplicate(at) if !appending && duplicates.len() == i && rises(&duplicates, &at) => {
                    duplicates.push(at)
                }
                Verdict::Duplicate(_) => {
                    return Err(ProducerRefusal::OutOfOrder {
                        producer_id: batch.producer_id,
                        expected: view
                            .as_ref()
                            .and_then(|v| v.batches.last())
                            .map_or(0, |b| b.1.saturating_add(1)),
                        got: batch.first_sequence,
                    });
                }
                Verdict::OutOfOrder { expected, got } => {
                    return Err(ProducerRefusal::OutOfOrder {
                        producer_id: batch.producer_id,
                        expected,
                        got,
                    });
                }
                Verdict::TooOld {
                    sequence,
                    oldest_remembered,
                } => {
                    return Err(ProducerRefusal::TooOld {
                        producer_id: batch.producer_id,
                        sequence,
                        oldest: oldest_remembered,
                    });
                }
                Verdict::Fenced { current, got } => {
                    return Err(ProducerRefusal::Fenced {
                        producer_id: batch.producer_id,
                        current,
                        got,
                    });
                }
                Verdict::Unknown => {
                    return Err(ProducerRefusal::Unknown {
                        producer_id: batch.producer_id,
                        sequence: batch.first_sequence,
                    });
                }
            }
        }
        let written = duplicates.len();
        if written == batches.len() {
            return Ok(Plan::AllDuplicates(duplicates));
        }
        let batches = batches.into_iter().skip(written).collect();
        let idempotent = idempotent.into_iter().skip(written).collect();
        Ok(Plan::Propose {
            duplicates,
            batches,
            idempotent,
        })
    }

    /// Records batches proposed at Raft indexes `first ..` in `term`.
    pub fn proposed(&mut self, idempotent: &[Option<Idempotent>], batches: &[ValidatedBatch], first: u64, term: u64) {
        for (i, (batch, stored)) in idempotent.iter().zip(batches).enumerate() {
            if let Some(batch) = batch {
                self.push_pending(batch, first + i as u64, term, stored.header().last_offset_delta);
            }
        }
    }
}

/// Whether `next` comes after the last of `duplicates` in the log (a retried request repeats
/// its batches in their order).
fn rises(duplicates: &[Located], next: &Located) -> bool {
    let Some(last) = duplicates.last() else {
        return true;
    };
    match (last, next) {
        (Located::Committed(a), Located::Committed(b)) => b.base_offset > a.base_offset,
        (Located::Committed(_), Located::Pending { .. }) => true,
        (Located::Pending { .. }, Located::Committed(_)) => false,
        (Located::Pending { index: a, .. }, Located::Pending { index: b, .. }) => b > a,
    }
}

/// A partition's producer snapshots as its Raft snapshots carry them: a follower behind the
/// leader's log start gets the state at that start.
///
/// raft-rs asks for a snapshot from within a step or a tick, on the reactor: the bytes of
/// the snapshot at the log start are kept in memory (read when the log start moves, off the
/// reactor), so that asking reads no file.
#[derive(Debug)]
pub struct ProducerSnapshots {
    store: Arc<SnapshotStore>,
    at_start: std::sync::Mutex<Option<(u64, Bytes)>>,
}

impl ProducerSnapshots {
    /// Blocking: reads the snapshot at `log_start`.
    pub fn new(store: Arc<SnapshotStore>, log_start: u64) -> ProducerSnapshots {
        let snapshots = ProducerSnapshots {
            store,
            at_start: std::sync::Mutex::new(None),
        };
        snapshots.remember(log_start);
        snapshots
    }

    fn remember(&self, log_start: u64) {
        let bytes = match self.store.read_at_or_below(log_start) {
            Some((at, bytes, _)) => {
                if at != log_start {
                    tracing::warn!(dir = %self.store.dir().display(), snapshot = at, log_start, "no producer snapshot at the log start: a follower sent one gets the older state");
                }
                Bytes::from(bytes)
            }
            // A log from before producer snapshots: nothing is known of its producers.
            None => Bytes::from(conveyor_storage::producer_state::snapshot::encode(
                log_start,
                &ProducerTable::new(),
            )),
        };
        *self.at_start.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((log_start, bytes));
    }
}

impl StateSnapshots for ProducerSnapshots {
    fn state_at(&self, point: &SnapshotPoint) -> Option<Bytes> {
        if let Some((at, bytes)) = self
            .at_start
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            && *at == point.offset
        {
            return Some(bytes.clone());
        }
        // Raft retries a snapshot it could not get; the log start's is read when it moves.
        None
    }

    fn install(&self, point: SnapshotPoint, payload: &[u8]) -> Result<(), super::state_snapshot::SnapshotError> {
        let (at, _) = self.store.install(payload)?;
        if at != point.offset {
            tracing::warn!(dir = %self.store.dir().display(), snapshot = at, log_start = point.offset, "the leader's producer snapshot is not at its log start: producers written in between are not known here");
        }
        // The state at this replica's new log start, for a follower of its own later.
        *self.at_start.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((point.offset, Bytes::copy_from_slice(payload)));
        Ok(())
    }

    fn compaction_limit(&self, cutoff: u64) -> Option<u64> {
        self.store.latest_at_or_below(cutoff)
    }

    fn log_starts_at(&self, offset: u64) {
        self.store.prune_below(offset);
        let known = self
            .at_start
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|(at, _)| *at == offset);
        if !known {
            self.remember(offset);
        }
    }
}

#[cfg(test)]
mod tests;
