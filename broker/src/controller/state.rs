//! The controller's state as a state machine over the metadata log, and its snapshots.
//!
//! [`MetadataState`] is what the committed records say (topics with their current configs
//! and replica lists, brokers registered, draining, removed, the last producer id block),
//! folded record by record. It is
//! what a start replays, and what a snapshot stores (see [`crate::replica::state_snapshot`]):
//! the applier folds every record it applies, and every `snapshot_every_records` records or
//! `snapshot_every_bytes` of log it writes the state at that applied point, off the reactor,
//! then lets the log go below the previous snapshot (the newest two are kept, so a damaged
//! newest one still leaves a readable one whose tail is in the log).
//!
//! # Crash behaviour
//! A snapshot is written only at a point this broker applied: every deletion below it has
//! removed its data. A snapshot loaded at start is a replayed view like the log (see
//! `Registry::open`): nothing is deleted from it. One received from the controller (this
//! broker was behind its log start) is committed state applied live, like records: topics it
//! lacks were deleted and their data goes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use conveyor_proto::internal::v1::{
    BrokerDraining, BrokerRegistered, BrokerRemoved, MetadataRecord, MetadataSnapshot, PartitionReassigned,
    TopicConfigChanged, TopicDeleted, metadata_record,
};
use prost::Message;

use super::producer_ids::IdBlocks;
use super::{Registry, Replayed, created_assignments, records_in};
use crate::replica::state_snapshot::{Loaded, SnapshotPoint, SnapshotStore, StateMachine};

/// Default: a snapshot every this many metadata records applied...
pub const DEFAULT_SNAPSHOT_EVERY_RECORDS: u64 = 4096;
/// ...or this many bytes of metadata log, whichever comes first.
pub const DEFAULT_SNAPSHOT_EVERY_BYTES: u64 = 8 << 20;

/// A broker as the metadata log describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct BrokerState {
    address: Option<String>,
    draining: bool,
    removed: bool,
}

/// The cluster metadata as of an applied point of the controller log.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct MetadataState {
    /// This broker, for topics created before placement existed (their replica is local).
    me: u32,
    pub topics: BTreeMap<String, Replayed>,
    brokers: BTreeMap<u32, BrokerState>,
    pub producer_ids: IdBlocks,
}

impl MetadataState {
    pub fn new(me: u32) -> MetadataState {
        MetadataState {
            me,
            topics: BTreeMap::new(),
            brokers: BTreeMap::new(),
            producer_ids: IdBlocks::default(),
        }
    }

    /// Folds one committed record in. Returns the incarnation (name, id) a deletion names.
    pub fn apply(&mut self, change: &metadata_record::Change) -> Option<(String, String)> {
        use metadata_record::Change;
        match change {
            Change::ProducerIdsAllocated(block) => {
                if !self.producer_ids.apply(block) {
                    tracing::debug!(
                        broker = block.broker,
                        first = block.first,
                        next = self.producer_ids.next(),
                        "producer id block ignored: it does not start at the next id"
                    );
                }
            }
            Change::TopicCreated(t) => {
                let current = created_assignments(t, self.me);
                self.topics.entry(t.name.clone()).or_insert(Replayed {
                    created: t.clone(),
                    current,
                });
            }
            Change::TopicDeleted(d) => {
                if self
                    .topics
                    .get(&d.name)
                    .is_some_and(|t| t.created.topic_id == d.topic_id)
                {
                    self.topics.remove(&d.name);
                }
                return Some((d.name.clone(), d.topic_id.clone()));
            }
            Change::TopicConfigChanged(c) => {
                if let Some(t) = self.topics.get_mut(&c.name) {
                    t.created.configs = c.configs.clone();
                }
            }
            Change::PartitionReassigned(r) => {
                if let Some(t) = self.topics.get_mut(&r.topic)
                    && t.created.topic_id == r.topic_id
                    && let Some(slot) = usize::try_from(r.partition).ok().and_then(|p| t.current.get_mut(p))
                {
                    *slot = r.replicas.clone();
                }
            }
            Change::BrokerRegistered(b) => {
                let broker = self.brokers.entry(b.id).or_default();
                broker.address = Some(b.address.clone());
                broker.removed = false;
            }
            Change::BrokerDraining(b) => self.brokers.entry(b.id).or_default().draining = true,
            Change::BrokerRemoved(b) => {
                let broker = self.brokers.entry(b.id).or_default();
                broker.draining = false;
                broker.removed = true;
            }
        }
        None
    }

    /// The records that rebuild this state when folded, in order, into an empty one.
    pub fn records(&self) -> Vec<metadata_record::Change> {
        use metadata_record::Change;
        let mut out = Vec::new();
        for (&id, b) in &self.brokers {
            if let Some(address) = &b.address {
                out.push(Change::BrokerRegistered(BrokerRegistered {
                    id,
                    address: address.clone(),
                }));
            }
            if b.draining {
                out.push(Change::BrokerDraining(BrokerDraining { id }));
            }
            if b.removed {
                out.push(Change::BrokerRemoved(BrokerRemoved { id }));
            }
        }
        for t in self.topics.values() {
            out.push(Change::TopicCreated(t.created.clone()));
            let initial = created_assignments(&t.created, self.me);
            for (p, replicas) in t.current.iter().enumerate() {
                if initial.get(p) != Some(replicas) {
                    out.push(Change::PartitionReassigned(PartitionReassigned {
                        topic: t.created.name.clone(),
                        topic_id: t.created.topic_id.clone(),
                        partition: p as i32,
                        replicas: replicas.clone(),
                    }));
                }
            }
        }
        out.extend(self.producer_ids.record());
        out
    }

    /// Rebuilds a state for broker `me` from a snapshot's bytes.
    pub fn decode(me: u32, bytes: &[u8]) -> Result<MetadataState, String> {
        let snapshot = MetadataSnapshot::decode(bytes).map_err(|e| format!("cannot decode the metadata state: {e}"))?;
        let mut state = MetadataState::new(me);
        for record in snapshot.records {
            if let Some(change) = record.change {
                state.apply(&change);
            }
        }
        Ok(state)
    }
}

impl StateMachine for MetadataState {
    fn encode_state(&self) -> Vec<u8> {
        MetadataSnapshot {
            records: self
                .records()
                .into_iter()
                .map(|change| MetadataRecord { change: Some(change) })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Decoded for broker 0: call [`MetadataState::decode`] to keep this broker's id.
    fn decode_state(bytes: &[u8]) -> Result<Self, String> {
        MetadataState::decode(0, bytes)
    }
}

/// The applier's state machine and when it last wrote it down.
#[derive(Debug)]
pub(super) struct Snapshotting {
    pub store: Arc<SnapshotStore>,
    /// Changed only through [`Snapshotting::apply`] and [`Snapshotting::replace`], which
    /// publish what it says to `producer_ids_issued_end`.
    state: Mutex<MetadataState>,
    /// The state's next producer id as this broker applied it: every id below it was
    /// allocated in a block; none at or above it ever was (as far as this broker knows).
    /// Only grows.
    pub producer_ids_issued_end: Arc<AtomicI64>,
    /// The newest snapshot written or loaded, and the records and log bytes applied since.
    last: Mutex<(Option<SnapshotPoint>, u64, u64)>,
    every_records: u64,
    every_bytes: u64,
}

impl Snapshotting {
    pub fn new(store: Arc<SnapshotStore>, me: u32, every_records: u64, every_bytes: u64) -> Snapshotting {
        Snapshotting {
            store,
            state: Mutex::new(MetadataState::new(me)),
            producer_ids_issued_end: Arc::new(AtomicI64::new(0)),
            last: Mutex::new((None, 0, 0)),
            every_records: every_records.max(1),
            every_bytes: every_bytes.max(1),
        }
    }

    pub fn lock_state(&self) -> std::sync::MutexGuard<'_, MetadataState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Folds a committed record into the state.
    pub fn apply(&self, change: &metadata_record::Change) {
        let mut state = self.lock_state();
        state.apply(change);
        self.publish(&state);
    }

    /// Makes `state` the applied state (loaded, replayed or received from the controller).
    pub fn replace(&self, state: MetadataState) {
        let mut current = self.lock_state();
        *current = state;
        self.publish(&current);
    }

    /// A state reset (a snapshot still to be installed) never takes the issued end back:
    /// ids below it were issued all the same.
    fn publish(&self, state: &MetadataState) {
        self.producer_ids_issued_end
            .fetch_max(state.producer_ids.next(), Ordering::Release);
    }

    fn lock_last(&self) -> std::sync::MutexGuard<'_, (Option<SnapshotPoint>, u64, u64)> {
        self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that the state is (now) the one stored at `point`.
    pub fn loaded(&self, point: SnapshotPoint) {
        *self.lock_last() = (Some(point), 0, 0);
    }
}

impl Registry {
    /// The committed topics, as the newest snapshot and the metadata log after it describe
    /// them, and the incarnations (name, id) that log deleted; broker changes are applied on
    /// the way. Deletions below the snapshot were applied, their data removed, before it was
    /// written. Without a readable snapshot the whole log is replayed, if it is all there.
    #[allow(clippy::type_complexity)]
    pub(super) fn replay(&self) -> anyhow::Result<(BTreeMap<String, Replayed>, Vec<(String, String)>)> {
        let me = self.options.node_id;
        let mut deleted = Vec::new();
        let log = &self.metadata.log();
        let log_start = log.log_start_offset();
        let (mut state, mut next) = (MetadataState::new(me), log_start);
        let store = &self.snapshotting.store;
        let mut reasons = Vec::new();
        // A snapshot that reads back but does not decode is damaged like one that does not
        // read back: it is set aside and the older one tried.
        let loaded = loop {
            let (loaded, failures) = store.load_newest();
            for failure in &failures {
                tracing::warn!(error = %failure, "a metadata snapshot cannot be read; falling back to an older one or the log");
            }
            reasons.extend(failures.iter().map(ToString::to_string));
            let Some(l) = loaded else { break None };
            match MetadataState::decode(me, &l.payload) {
                Ok(s) => break Some((l.point, s)),
                Err(e) => {
                    tracing::warn!(index = l.point.index, error = %e, "a metadata snapshot cannot be decoded; falling back to an older one or the log");
                    reasons.push(format!("snapshot at index {}: {e}", l.point.index));
                    let path = store.dir().join(format!("{:020}.snap", l.point.index));
                    std::fs::rename(&path, path.with_extension("damaged"))?;
                }
            }
        };
        let pending = store.pending_install();
        let mut from_snapshot = false;
        match loaded {
            Some((point, _)) if pending == Some(point.index) => {
                // A snapshot received from the controller whose state was never applied
                // here: it is the committed, live view, not one replayed from this log. The
                // start knows no topic (their directories go to quarantine, from which their
                // incarnations come back as the applier installs the snapshot live).
                tracing::info!(
                    index = point.index,
                    "the metadata snapshot received from the controller was not applied before the stop; applying it now"
                );
                self.applied.send_replace(0);
                self.snapshotting.replace(MetadataState::new(me));
                return Ok((BTreeMap::new(), Vec::new()));
            }
            Some((point, s)) if point.offset >= log_start => {
                tracing::info!(
                    index = point.index,
                    offset = point.offset,
                    topics = s.topics.len(),
                    "loaded the metadata snapshot; replaying the log after it"
                );
                (state, next) = (s, point.offset);
                from_snapshot = true;
                self.snapshotting.loaded(point);
            }
            Some((point, _)) => reasons.push(format!(
                "the newest snapshot ends at offset {}, before the log's start",
                point.offset
            )),
            None => {}
        }
        if let Some(index) = pending {
            // Its snapshot never got written (or is damaged): the log was not reset for it,
            // and the controller sends it again.
            store.installed(index)?;
        }
        // A snapshot exactly at the log start (one received from the controller) reaches it.
        if !from_snapshot && log_start > 0 {
            anyhow::bail!(
                "the controller's metadata log in {} starts at offset {log_start} (its prefix was deleted after a \
                 snapshot) and no snapshot that reaches it can be read{}. Restore {} from a backup, or move this \
                 broker's data directory aside and add the broker to the cluster again so it receives the \
                 metadata from the controller",
                log.dir().display(),
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", reasons.join("; "))
                },
                self.snapshotting.store.dir().display(),
            );
        }
        for change in state.records() {
            if matches!(
                change,
                metadata_record::Change::BrokerRegistered(_)
                    | metadata_record::Change::BrokerDraining(_)
                    | metadata_record::Change::BrokerRemoved(_)
            ) {
                self.apply_broker_change(change);
            }
        }
        let end = self.metadata.high_watermark();
        let mut replayed = 0;
        while next < end {
            let (changes, after) = records_in(log.read_up_to(next, 1 << 20, end)?)?;
            replayed += changes.len() as u64;
            for change in changes {
                if let Some(gone) = state.apply(&change) {
                    deleted.push(gone);
                }
                self.apply_broker_change(change);
            }
            match after {
                Some(after) if after > next => next = after,
                _ => break,
            }
        }
        self.replayed_at_start.store(replayed, Ordering::Relaxed);
        self.applied.send_replace(next);
        let topics = state.topics.clone();
        self.snapshotting.replace(state);
        Ok((topics, deleted))
    }

    /// How many metadata records the start read from the log (after its snapshot).
    pub fn replayed_at_start(&self) -> u64 {
        self.replayed_at_start.load(Ordering::Relaxed)
    }

    /// Counts `records` (`bytes` of log) applied up to `point` and, when the policy says so,
    /// writes the state there and lets the log go below the previous snapshot. A failure is logged: the log
    /// is kept, so nothing is lost but start time.
    pub(super) async fn maybe_snapshot(&self, point: SnapshotPoint, records: u64, bytes: u64) {
        let snap = &self.snapshotting;
        let previous = {
            let mut last = snap.lock_last();
            last.1 += records;
            // Offsets count records, not bytes: the bytes are those read from the log.
            last.2 += bytes;
            let due = last.1 >= snap.every_records || last.2 >= snap.every_bytes;
            if !due || last.0.is_some_and(|p| p.index >= point.index) {
                return;
            }
            last.0
        };
        // Cloned under the lock, encoded and written off the reactor.
        let state = snap.lock_state().clone();
        let store = Arc::clone(&snap.store);
        let written = crate::blocking::blocking(move || {
            store
                .write(point, &state.encode_state())
                .map_err(|e| crate::error::BrokerError::Internal(e.to_string()))
        })
        .await;
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot write a metadata snapshot; the metadata log is kept whole");
            return;
        }
        snap.loaded(point);
        tracing::debug!(index = point.index, offset = point.offset, "metadata snapshot written");
        // The log goes only below the previous snapshot: the newest two are kept, and a
        // damaged newest one leaves the other with its tail still in the log.
        let Some(previous) = previous else { return };
        if self.metadata.raft_view().applied < previous.index {
            return; // Raft has not applied that far yet; the next snapshot compacts.
        }
        if previous.offset < self.metadata.log().log_start_offset() {
            // The log was reset past it (a snapshot received from the controller): it has
            // nothing left below that point to compact.
            return;
        }
        let metadata = Arc::clone(&self.metadata);
        let compacted = crate::blocking::blocking(move || metadata.compact_below(previous.offset)).await;
        match compacted {
            Ok(n) if n > 0 => tracing::debug!(entries = n, below = previous.offset, "metadata log compacted"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot compact the metadata log below a snapshot");
                return;
            }
        }
        // Raft now serves the state at `previous`: older snapshots may go.
        self.prune_snapshots_below(previous.index).await;
    }

    /// Lets the snapshot store prune below Raft index `index` (Raft's snapshot index), and
    /// prunes. A failure is logged: an extra file costs only disk.
    async fn prune_snapshots_below(&self, index: u64) {
        let store = Arc::clone(&self.snapshotting.store);
        let pruned = crate::blocking::blocking(move || {
            store.prune_only_below(index);
            store
                .prune()
                .map_err(|e| crate::error::BrokerError::Internal(e.to_string()))
        })
        .await;
        if let Err(e) = pruned {
            tracing::warn!(error = %e, "cannot remove old metadata snapshots");
        }
    }

    /// Applies the state of a snapshot received from the controller (this broker was behind
    /// the log start, see `RaftLog::apply_snapshot`): committed state, applied live like the
    /// records it stands for. Returns whether the state was applied whole.
    pub(super) async fn install_received_snapshot(self: &Arc<Self>, loaded: Loaded) -> bool {
        let me = self.options.node_id;
        let target = match MetadataState::decode(me, &loaded.payload) {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(index = loaded.point.index, error = %e, "cannot read the metadata snapshot received from the controller");
                return false;
            }
        };
        let mut changes = Vec::new();
        // Topics it lacks (or holds as another incarnation) were deleted.
        for topic in self.list() {
            if target
                .topics
                .get(&topic.name)
                .is_none_or(|t| t.created.topic_id != topic.id)
            {
                changes.push(metadata_record::Change::TopicDeleted(TopicDeleted {
                    name: topic.name.clone(),
                    topic_id: topic.id.clone(),
                }));
            }
        }
        for change in target.records() {
            // A known topic keeps its replicas: its current configs and replica lists are
            // applied as changes to it instead of a creation that would be ignored.
            if let metadata_record::Change::TopicCreated(t) = &change
                && let Ok(known) = self.get(&t.name)
                && known.id == t.topic_id
            {
                let configs: BTreeMap<String, String> = t.configs.clone().into_iter().collect();
                if configs != known.overrides {
                    changes.push(metadata_record::Change::TopicConfigChanged(TopicConfigChanged {
                        name: t.name.clone(),
                        configs: t.configs.clone(),
                    }));
                }
                let current = &target.topics[&t.name].current;
                for (p, replicas) in current.iter().enumerate() {
                    if known.assignments.get(p) != Some(replicas) {
                        changes.push(metadata_record::Change::PartitionReassigned(PartitionReassigned {
                            topic: t.name.clone(),
                            topic_id: t.topic_id.clone(),
                            partition: p as i32,
                            replicas: replicas.clone(),
                        }));
                    }
                }
                continue;
            }
            changes.push(change);
        }
        // Brokers the snapshot no longer marks draining stop being so.
        let draining: BTreeSet<u32> = target
            .brokers
            .iter()
            .filter(|(_, b)| b.draining)
            .map(|(&id, _)| id)
            .collect();
        self.write_draining().retain(|id| draining.contains(id));
        for change in changes {
            let what = super::describe_change(&change);
            let result = match change {
                metadata_record::Change::TopicCreated(t) => {
                    let current = target.topics.get(&t.name).map(|r| r.current.clone());
                    let registry = Arc::clone(self);
                    crate::blocking::blocking(move || registry.open_topic(t, current))
                        .await
                        .map(|topic| self.insert(topic))
                }
                other => self.apply(other).await,
            };
            if let Err(e) = result {
                tracing::error!(change = %what, error = %e, "cannot apply the metadata snapshot received from the controller; retrying");
                return false;
            }
        }
        let store = Arc::clone(&self.snapshotting.store);
        let index = loaded.point.index;
        let marked = crate::blocking::blocking(move || {
            store
                .installed(index)
                .map_err(|e| crate::error::BrokerError::Internal(e.to_string()))
        })
        .await;
        if let Err(e) = marked {
            tracing::error!(error = %e, "cannot mark the metadata snapshot received from the controller as applied; retrying");
            return false;
        }
        self.snapshotting.replace(target);
        self.snapshotting.loaded(loaded.point);
        // Raft's snapshot index is this one now (the log was reset to it).
        self.prune_snapshots_below(index).await;
        tracing::info!(
            index = loaded.point.index,
            topics = self.list().len(),
            "applied the metadata snapshot received from the controller"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use conveyor_proto::internal::v1::{PartitionAssignment, ProducerIdsAllocated, TopicCreated};

    use super::*;

    fn created(name: &str, id: &str) -> metadata_record::Change {
        metadata_record::Change::TopicCreated(TopicCreated {
            name: name.into(),
            partitions: 2,
            replication_factor: 2,
            configs: [("retention.ms".to_string(), "1000".to_string())].into(),
            topic_id: id.into(),
            assignments: vec![
                PartitionAssignment { replicas: vec![1, 2] },
                PartitionAssignment { replicas: vec![2, 3] },
            ],
        })
    }

    #[test]
    fn a_state_encoded_and_decoded_is_the_same_state() {
        use metadata_record::Change;
        let mut state = MetadataState::new(1);
        let changes = vec![
            Change::BrokerRegistered(BrokerRegistered {
                id: 4,
                address: "h:4".into(),
            }),
            Change::BrokerRegistered(BrokerRegistered {
                id: 5,
                address: "h:5".into(),
            }),
            Change::BrokerDraining(BrokerDraining { id: 5 }),
            Change::BrokerRemoved(BrokerRemoved { id: 4 }),
            Change::BrokerDraining(BrokerDraining { id: 3 }),
            created("a", "ida"),
            created("b", "idb"),
            created("c", "idc"),
            Change::TopicDeleted(TopicDeleted {
                name: "b".into(),
                topic_id: "idb".into(),
            }),
            Change::TopicConfigChanged(TopicConfigChanged {
                name: "a".into(),
                configs: [("cleanup.policy".to_string(), "compact".to_string())].into(),
            }),
            Change::PartitionReassigned(PartitionReassigned {
                topic: "c".into(),
                topic_id: "idc".into(),
                partition: 1,
                replicas: vec![3, 4],
            }),
        ];
        for change in &changes {
            state.apply(change);
        }
        assert_eq!(state.topics.len(), 2);
        assert_eq!(state.topics["c"].current, vec![vec![1, 2], vec![3, 4]]);
        let decoded = MetadataState::decode(1, &state.encode_state()).expect("decode");
        assert_eq!(decoded, state);
        assert_eq!(
            decoded.records().len(),
            8,
            "2 registrations, 2 drainings, 1 removal, 2 creations, 1 reassignment, nothing for the deleted topic"
        );
        assert!(MetadataState::decode(1, b"\xff\xff\xff").is_err());
    }

    fn block(broker: u32, first: i64) -> metadata_record::Change {
        metadata_record::Change::ProducerIdsAllocated(ProducerIdsAllocated {
            broker,
            first,
            count: 1000,
            proposal: u64::from(broker) << 32 | first as u64,
        })
    }

    #[test]
    fn a_producer_id_block_at_the_wrong_start_is_ignored_and_the_next_id_survives_a_snapshot() {
        let mut state = MetadataState::new(1);
        state.apply(&created("a", "ida"));
        for change in [
            block(1, 0),
            block(2, 1000),
            // A second controller that read the same state: committed later, ignored.
            block(3, 1000),
            block(3, 2000),
            // Never proposed by a controller (it reads the next id), ignored all the same.
            block(3, 9000),
        ] {
            state.apply(&change);
        }
        assert_eq!(state.producer_ids.next(), 3000);
        assert_eq!(state.producer_ids.last().map(|b| b.broker), Some(3));

        let decoded = MetadataState::decode(1, &state.encode_state()).expect("decode");
        assert_eq!(decoded, state);
        assert_eq!(decoded.producer_ids.next(), 3000);

        // The rebuilt state goes on where the old one stopped.
        let snapshotting = Snapshotting::new(
            Arc::new(SnapshotStore::new(std::env::temp_dir().join("unused"))),
            1,
            1,
            1,
        );
        snapshotting.replace(decoded);
        let issued_end = Arc::clone(&snapshotting.producer_ids_issued_end);
        assert_eq!(issued_end.load(Ordering::Acquire), 3000);
        snapshotting.apply(&block(1, 2000));
        assert_eq!(issued_end.load(Ordering::Acquire), 3000, "a stale block moves nothing");
        snapshotting.apply(&block(1, 3000));
        assert_eq!(issued_end.load(Ordering::Acquire), 4000);
        // A reset while a received snapshot waits to be installed never takes it back.
        snapshotting.replace(MetadataState::new(1));
        assert_eq!(issued_end.load(Ordering::Acquire), 4000);
    }
}
