//! The controller: the metadata group and everything decided through it. This file holds
//! the topic registry: which topics exist, their configs, replica placement, and the
//! partitions this broker holds a replica of.
//!
//! # Layout
//! - [`bootstrap`]: the controller group's first entries on a founding broker.
//! - [`records`]: metadata records as they sit in the controller log.
//! - [`apply`]: the applier task that applies committed records in log order.
//! - [`state`]: snapshots of the applied metadata.
//! - [`placement`]: spreading a new topic's replicas over the brokers.
//! - [`dirs`], [`departures`], [`unopened`], [`leader_probe`]: topic directories, when a
//!   departed replica's data goes, replicas not opened yet, asking a group's leader.
//! - [`admin_ops`]: long admin operations as background jobs with progress; the change lock.
//! - [`membership`]: adding and removing brokers, moving replicas, reassignment.
//! - [`rebalance`]: the rebalance planner and its run.
//! - [`producer_ids`]: producer id blocks in the metadata log, and their allocation.
//!
//! # The controller
//! Cluster metadata lives in the controller group: a Raft group over every broker whose log
//! (`DATA/__cluster_metadata/0`) holds `conveyor.internal.v1.MetadataRecord`s. Its leader is
//! the controller. A change is proposed there, committed by a quorum, and then applied by
//! every broker in log order by the applier task ([`Registry::run_applier`]), which opens the
//! replicas placed on this broker and stops and removes those of deleted topics. On start the
//! committed part of the log is replayed before anything is served; the rest is applied as
//! it commits. State is never changed in any other way, so all brokers agree.
//!
//! The applier snapshots the state it applied every so many records (see [`state`]); a start
//! loads the newest snapshot and replays only the log after it, and the log's prefix below
//! the previous snapshot is deleted. A broker behind the controller's log start (a new one
//! added to the cluster, or one far behind) receives the state itself in its Raft snapshot.
//!
//! # Thread-safety
//! Lookups take a short read lock. Changes are serialised by the admin service on the
//! controller; the blocking parts (opening logs, deleting directories) run off the reactor.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use conveyor_proto::internal::v1::{
    MetadataRecord, PartitionAssignment, TopicConfigChanged, TopicCreated, TopicDeleted, metadata_record,
};
use conveyor_storage::batch::{BatchBuilder, Compression, Record, ValidatedBatch};
use prost::Message;
use tokio::sync::watch;

use crate::error::{BrokerError, Result};
use crate::metrics::Metrics;
use crate::replica::departure::Undecided;
use crate::replica::partition::{OpenContext, Partition};
use crate::replica::proposal::Acks;
use crate::replica::state_snapshot::SnapshotStore;
use crate::replica::transport::{CONTROLLER_TOPIC, Transport};
use crate::topic_config::TopicDefaults;

pub mod admin_ops;
mod apply;
mod bootstrap;
mod dirs;
pub use apply::ApplyFailure;
pub(crate) use apply::describe_change;
use dirs::{TopicDir, other_incarnation_reason, prepare_topic_dir, remove_topic_data, restore_quarantined};
mod departures;
mod leader_probe;
pub mod membership;
pub mod placement;
pub mod producer_ids;
pub mod rebalance;
mod records;
mod state;
mod unopened;

use state::Snapshotting;
pub use state::{DEFAULT_SNAPSHOT_EVERY_BYTES, DEFAULT_SNAPSHOT_EVERY_RECORDS};

use bootstrap::{JOINED_FILE, bootstrap_metadata, metadata_config};
pub use placement::place;
use records::{Located, located_records_in, records_in};
pub use unopened::Unopened;

const TOPICS_DIR: &str = "topics";
const TRASH_DIR: &str = "trash";
/// Where topic directories the local metadata log does not know are moved at start (never
/// deleted: the log may lack their creation only because it lost its tail).
const QUARANTINE_DIR: &str = "quarantine";
/// Where the controller's state snapshots are kept, under the controller topic's directory.
const SNAPSHOTS_DIR: &str = "snapshots";
/// Marks which incarnation of a topic name a directory holds.
const TOPIC_ID_FILE: &str = "topic-id";
const MAX_TOPIC_NAME: usize = 249;
/// How long a change waits for a controller to be elected before it fails.
const CONTROLLER_WAIT: Duration = Duration::from_secs(5);
/// How long a metadata change may take to commit and be applied on the controller before
/// the call that made it fails (it may still take effect after that).
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A topic as this broker knows it. A change replaces the whole value (readers hold an
/// `Arc` to the one they looked up), so it is cloned and modified.
#[derive(Debug, Clone)]
pub struct Topic {
    pub name: String,
    pub id: String,
    pub replication_factor: i32,
    /// Explicit overrides; `effective` applies them to the broker defaults.
    pub overrides: BTreeMap<String, String>,
    pub effective: TopicDefaults,
    /// Replicas of each partition, the preferred leader first.
    pub assignments: Vec<Vec<u32>>,
    /// Replicas of each partition when the topic was created: the initial voters of its
    /// Raft group, from which every later membership change starts.
    pub initial: Vec<Vec<u32>>,
    /// The partitions with a replica on this broker.
    pub local: BTreeMap<i32, Arc<Partition>>,
    /// Replicas placed here that could not be opened, retried by the applier (see
    /// [`unopened`]); never also in `local`.
    pub unopened: BTreeMap<i32, Unopened>,
}

impl Topic {
    pub fn partition_count(&self) -> usize {
        self.assignments.len()
    }

    pub(crate) fn check_index(&self, index: i32) -> Result<()> {
        if usize::try_from(index).is_ok_and(|i| i < self.assignments.len()) {
            Ok(())
        } else {
            Err(BrokerError::UnknownPartition {
                topic: self.name.clone(),
                partition: index,
                count: self.assignments.len() as u32,
            })
        }
    }
}

/// What the registry needs to open partitions.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub node_id: u32,
    pub data_dir: PathBuf,
    pub defaults: TopicDefaults,
    pub queue_depth: usize,
    /// Bytes of produce requests queued per partition, at most.
    pub queue_bytes: usize,
    pub max_partitions: u32,
    /// Started to join a running cluster: the controller group is not bootstrapped here but
    /// learned from its leader once `conveyor cluster add-node` adds this broker.
    pub join: bool,
    /// A snapshot of the controller state every this many metadata records applied, or
    /// this many bytes of metadata log, whichever comes first.
    pub snapshot_every_records: u64,
    pub snapshot_every_bytes: u64,
    /// How long a producer may stay idle before partitions drop its state.
    pub producer_expiration: std::time::Duration,
}

#[derive(Debug)]
pub struct Registry {
    options: RegistryOptions,
    metrics: Arc<Metrics>,
    runtime: tokio::runtime::Handle,
    transport: Arc<Transport>,
    /// The controller group's replica on this broker.
    metadata: Arc<Partition>,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// The offset after the last metadata record applied here.
    applied: watch::Sender<u64>,
    /// The record this broker is failing to apply, while it retries it.
    apply_failure: watch::Sender<Option<ApplyFailure>>,
    /// Brokers being removed: no new replicas go there.
    draining: RwLock<BTreeSet<u32>>,
    /// Replicas kept here although the metadata places them elsewhere, waiting for a
    /// decision (see [`crate::replica::departure`]).
    undecided: Undecided,
    /// Asks of their groups' leaders about undecided replicas still listed by their own
    /// configuration.
    leader_probes: Arc<leader_probe::LeaderProbes>,
    /// The controller state as applied, and its snapshots.
    snapshotting: Snapshotting,
    /// Metadata records read from the log at start (after the snapshot loaded, if any).
    replayed_at_start: AtomicU64,
}

/// A topic as the committed metadata log describes it.
#[derive(Debug, Clone, PartialEq)]
struct Replayed {
    created: TopicCreated,
    /// Replicas of each partition after every reassignment.
    current: Vec<Vec<u32>>,
}

/// The replicas of each partition a creation record places.
fn created_assignments(created: &TopicCreated, me: u32) -> Vec<Vec<u32>> {
    if created.assignments.is_empty() {
        vec![vec![me]; created.partitions.max(0) as usize]
    } else {
        created.assignments.iter().map(|a| a.replicas.clone()).collect()
    }
}

/// Checks a topic name against Kafka's rules; `__` names are reserved for internal topics.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let fail = |reason: &str| {
        Err(BrokerError::InvalidTopicName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > MAX_TOPIC_NAME {
        return fail("it is longer than 249 characters");
    }
    if name == "." || name == ".." {
        return fail("'.' and '..' are not allowed");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return fail("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    if name.starts_with("__") {
        return fail("names starting with '__' are reserved for internal topics");
    }
    Ok(())
}

impl Registry {
    /// Opens the controller group's replica, replays its committed records and opens this
    /// broker's replicas. Blocking.
    pub fn open(
        options: RegistryOptions,
        metrics: Arc<Metrics>,
        runtime: tokio::runtime::Handle,
        transport: Arc<Transport>,
    ) -> anyhow::Result<Registry> {
        // The metadata log's own replica judges no producer: its batches carry none.
        let producer_ids_issued = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let ctx = OpenContext {
            node_id: u64::from(options.node_id),
            queue_depth: options.queue_depth,
            queue_bytes: options.queue_bytes,
            metrics: Arc::clone(&metrics),
            runtime: runtime.clone(),
            transport: Arc::clone(&transport),
            state_snapshots: None,
            producer_ids_issued: Arc::clone(&producer_ids_issued),
            producer_expiration: options.producer_expiration,
        };
        let meta_dir = options.data_dir.join(CONTROLLER_TOPIC).join("0");
        let joined = meta_dir.join(JOINED_FILE);
        if options.join && !joined.exists() {
            std::fs::create_dir_all(&meta_dir)?;
            conveyor_storage::replace_file_durably(&meta_dir, JOINED_FILE, b"")?;
        }
        if !joined.exists() {
            bootstrap_metadata(&meta_dir, &transport.broker_ids())?;
        } else if options.join {
            tracing::info!("joining a running cluster: waiting for `conveyor cluster add-node` to add this broker");
        }
        let preferred = transport.broker_ids().first().copied().unwrap_or(options.node_id);
        let store = Arc::new(SnapshotStore::new(
            options.data_dir.join(CONTROLLER_TOPIC).join(SNAPSHOTS_DIR),
        ));
        // Raft's snapshot index is not known here: nothing is pruned until the applier
        // compacts (or installs) and so says where Raft's snapshot stands.
        store.prune_only_below(0);
        let meta_ctx = OpenContext {
            state_snapshots: Some(Arc::clone(&store) as _),
            ..ctx
        };
        let metadata = Partition::open(
            &meta_ctx,
            CONTROLLER_TOPIC,
            0,
            &meta_dir,
            metadata_config(),
            &[],
            preferred,
        )?;
        let snapshotting = Snapshotting::new(
            store,
            options.node_id,
            options.snapshot_every_records,
            options.snapshot_every_bytes,
        );
        let (applied, _) = watch::channel(metadata.log().log_start_offset());
        let registry = Registry {
            options,
            metrics,
            runtime,
            transport,
            metadata,
            topics: RwLock::new(BTreeMap::new()),
            applied,
            apply_failure: watch::channel(None).0,
            draining: RwLock::new(BTreeSet::new()),
            undecided: Undecided::default(),
            leader_probes: Arc::default(),
            snapshotting,
            replayed_at_start: AtomicU64::new(0),
        };
        let (committed, deleted) = registry.replay()?;
        for (name, id) in &deleted {
            // A committed, applied deletion: that incarnation's data goes (matched by id, so
            // a later incarnation of the name is never touched).
            let held =
                std::fs::read_to_string(registry.topics_dir().join(name).join(TOPIC_ID_FILE)).unwrap_or_default();
            if held.trim() == id {
                remove_topic_data(&registry.options.data_dir, name, id)?;
            }
        }
        let mut keep: BTreeSet<String> = committed.keys().cloned().collect();
        let newer = registry.created_after_commit()?;
        keep.extend(newer.iter().map(|(name, _)| name.clone()));
        registry.remove_unknown_dirs(&keep)?;
        for replayed in committed.into_values() {
            let dir = registry.topics_dir().join(&replayed.created.name);
            let held = std::fs::read_to_string(dir.join(TOPIC_ID_FILE)).unwrap_or_default();
            if held.trim() != replayed.created.topic_id && newer.iter().any(|(_, id)| id == held.trim()) {
                // The directory holds a later incarnation of the name, created past the
                // stored commit: the records that replace this one are still to be applied.
                tracing::info!(topic = %replayed.created.name, "keeping a topic's newer data until its creation is applied");
                continue;
            }
            let topic = registry.open_topic(replayed.created, Some(replayed.current))?;
            registry.insert(topic);
        }
        Ok(registry)
    }

    /// Topics (name, id) created in the part of the metadata log that is not known to be
    /// committed yet: their data must stay until the log says what became of them.
    fn created_after_commit(&self) -> anyhow::Result<Vec<(String, String)>> {
        let log = &self.metadata.log();
        let mut names = Vec::new();
        // A snapshot loaded at start may stand past the stored commit (stored lazily): what
        // it holds was committed.
        let mut next = self.metadata.high_watermark().max(self.applied_offset());
        while next < log.log_end_offset() {
            let (changes, after) = records_in(log.read(next, 1 << 20)?)?;
            for change in changes {
                if let metadata_record::Change::TopicCreated(t) = change {
                    names.push((t.name, t.topic_id));
                }
            }
            match after {
                Some(after) if after > next => next = after,
                _ => break,
            }
        }
        Ok(names)
    }

    fn write_draining(&self) -> std::sync::RwLockWriteGuard<'_, BTreeSet<u32>> {
        self.draining.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Brokers being removed.
    pub fn draining(&self) -> BTreeSet<u32> {
        self.draining
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The brokers of the cluster: the controller group's voters and learners (before this
    /// broker has learned them, the brokers it was configured with).
    pub fn members(&self) -> Vec<u32> {
        let (mut members, learners) = self.metadata.members();
        members.extend(learners);
        if members.is_empty() {
            return self.transport.broker_ids();
        }
        members.sort_unstable();
        members.dedup();
        members
    }

    /// Live brokers that can take new replicas.
    pub fn placeable_brokers(&self) -> Vec<u32> {
        let draining = self.draining();
        self.members()
            .into_iter()
            .filter(|id| !draining.contains(id) && self.transport.is_alive(*id))
            .collect()
    }

    fn open_context(&self) -> OpenContext {
        OpenContext {
            node_id: u64::from(self.options.node_id),
            queue_depth: self.options.queue_depth,
            queue_bytes: self.options.queue_bytes,
            metrics: Arc::clone(&self.metrics),
            runtime: self.runtime.clone(),
            transport: Arc::clone(&self.transport),
            state_snapshots: None,
            producer_ids_issued: self.producer_ids_issued_end(),
            producer_expiration: self.options.producer_expiration,
        }
    }

    fn topics_dir(&self) -> PathBuf {
        self.options.data_dir.join(TOPICS_DIR)
    }

    /// Builds a topic from its creation record (and, on replay, its partitions' replicas
    /// after reassignments) and opens the replicas placed here, and those whose own Raft
    /// configuration still lists this broker. Nothing is deleted here: the view may be stale
    /// (see [`Self::kept_replicas`]). Blocking.
    fn open_topic(&self, created: TopicCreated, current: Option<Vec<Vec<u32>>>) -> Result<Topic> {
        let overrides: BTreeMap<String, String> = created.configs.clone().into_iter().collect();
        let effective = self
            .options
            .defaults
            .with_overrides(&overrides)
            .map_err(BrokerError::InvalidConfig)?;
        let me = self.options.node_id;
        let initial = created_assignments(&created, me);
        let assignments = current.unwrap_or_else(|| initial.clone());
        let topic_dir = self.topics_dir().join(&created.name);
        let local_wanted = assignments.iter().any(|r| r.contains(&me));
        let dir_error = |e: std::io::Error| BrokerError::Internal(format!("topic '{}' directory: {e}", created.name));
        // `prepare_topic_dir` restores a quarantined directory of this incarnation itself;
        // where it would not run, the restore alone decides whether there is one.
        if (local_wanted
            || topic_dir.exists()
            || restore_quarantined(&self.options.data_dir, &created.name, &created.topic_id).map_err(dir_error)?)
            && let TopicDir::Other(held) =
                prepare_topic_dir(&self.options.data_dir, &created.name, &created.topic_id).map_err(dir_error)?
        {
            // Another incarnation of the name is there: this record is not what the data
            // belongs to, and it goes only through that incarnation's own `TopicDeleted`.
            // The replicas placed here are reported stopped (and retried) meanwhile.
            tracing::info!(topic = %created.name, id = %created.topic_id, held = %held, "the topic's directory holds another incarnation of the name; opening no replica of this one here");
            let reason = other_incarnation_reason(&held);
            let unopened = assignments
                .iter()
                .enumerate()
                .filter(|(_, replicas)| replicas.contains(&me))
                .map(|(p, _)| (p as i32, Unopened::new(reason.clone())))
                .collect();
            return Ok(Topic {
                name: created.name.clone(),
                id: created.topic_id.clone(),
                replication_factor: created.replication_factor.max(1),
                overrides,
                effective,
                assignments,
                initial,
                local: BTreeMap::new(),
                unopened,
            });
        }
        let kept = self
            .kept_replicas(&created.name, &topic_dir, &assignments)
            .map_err(dir_error)?;
        let ctx = self.open_context();
        let mut local = BTreeMap::new();
        let mut unopened = BTreeMap::new();
        for (p, replicas) in assignments.iter().enumerate() {
            if !replicas.contains(&me) && !kept.contains(&(p as i32)) {
                continue;
            }
            let preferred = replicas.first().copied().unwrap_or(me);
            let p = p as i32;
            let dir = topic_dir.join(p.to_string());
            match Partition::open(
                &ctx,
                &created.name,
                p,
                &dir,
                effective.log_config(),
                &initial[p as usize],
                preferred,
            ) {
                Ok(partition) => {
                    local.insert(p, partition);
                }
                Err(e) => {
                    // Local to this partition: the topic is registered all the same and
                    // the applier retries the replica (see [`unopened`]).
                    tracing::error!(topic = %created.name, partition = p, error = %e, "cannot open a replica placed here; it is reported stopped and retried");
                    unopened.insert(p, Unopened::new(e.to_string()));
                }
            }
        }
        Ok(Topic {
            name: created.name.clone(),
            id: created.topic_id.clone(),
            replication_factor: created.replication_factor.max(1),
            overrides,
            effective,
            assignments,
            initial,
            local,
            unopened,
        })
    }

    fn insert(&self, topic: Topic) {
        self.topics
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.name.clone(), Arc::new(topic));
    }

    pub fn get(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))
    }

    /// This broker's replica of a partition, or an error naming where to go instead.
    pub fn replica(&self, topic: &Topic, index: i32) -> Result<Arc<Partition>> {
        topic.check_index(index)?;
        match topic.local.get(&index) {
            Some(p) => Ok(Arc::clone(p)),
            None => {
                // Not a replica here: the preferred leader is the best guess at the leader.
                let preferred = topic.assignments[index as usize].first().copied().unwrap_or(0);
                let unopened = topic.unopened.get(&index).map(|u| u.reason.as_str());
                Err(crate::replica::supervisor::refusal(
                    &self.transport,
                    &topic.name,
                    index,
                    preferred,
                    unopened,
                ))
            }
        }
    }

    /// The partition if this broker leads it, or an error naming the leader.
    pub fn leader(&self, topic: &Topic, index: i32) -> Result<Arc<Partition>> {
        let p = self.replica(topic, index)?;
        p.ensure_leader()?;
        Ok(p)
    }

    pub fn list(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Every partition replica on this broker, the controller group's included.
    pub fn all_partitions(&self) -> Vec<Arc<Partition>> {
        let mut all: Vec<Arc<Partition>> = self.list().iter().flat_map(|t| t.local.values().cloned()).collect();
        all.push(Arc::clone(&self.metadata));
        all
    }

    pub fn transport(&self) -> &Arc<Transport> {
        &self.transport
    }

    pub fn metadata_partition(&self) -> &Arc<Partition> {
        &self.metadata
    }

    /// How far producer ids have been allocated cluster-wide, as this broker has applied the
    /// metadata log: every id below the value was allocated in a block (and may be in use);
    /// none at or above it was, unless this broker is behind. Starts at what the start
    /// replayed, only grows, and is updated by the applier before a record counts as
    /// applied. Shared: hold the `Arc` and read it with `Ordering::Acquire`.
    pub fn producer_ids_issued_end(&self) -> Arc<AtomicI64> {
        Arc::clone(&self.snapshotting.producer_ids_issued_end)
    }

    /// The controller's broker id, waiting up to [`CONTROLLER_WAIT`] for one to be elected.
    pub async fn controller(&self) -> Result<u32> {
        let mut status = self.metadata.watch_status();
        let found = tokio::time::timeout(CONTROLLER_WAIT, status.wait_for(|s| s.leader != 0)).await;
        match found {
            Ok(Ok(s)) => Ok(s.leader),
            _ => Err(BrokerError::NoController),
        }
    }

    /// Proposes a metadata change and waits, at most [`PROPOSE_TIMEOUT`], until this broker
    /// has applied it. Only the controller may call this; elsewhere the proposal fails with a
    /// leader error. A change that is not committed in time may still be (the error says
    /// so); one committed but not applied here is reported with what blocks it.
    pub(crate) async fn propose(&self, change: metadata_record::Change) -> Result<()> {
        let what = describe_change(&change);
        let deadline = tokio::time::Instant::now() + PROPOSE_TIMEOUT;
        let value = MetadataRecord { change: Some(change) }.encode_to_vec();
        let mut builder = BatchBuilder::new(Compression::None);
        builder.push(&Record {
            timestamp: conveyor_storage::unix_millis(),
            key: None,
            value: Some(Bytes::from(value)),
            headers: vec![],
        });
        let internal = |e: &dyn std::fmt::Display| BrokerError::Internal(format!("metadata record: {e}"));
        let bytes = builder.build().map_err(|e| internal(&e))?;
        let batch = ValidatedBatch::new(bytes, metadata_config().max_batch_bytes).map_err(|e| internal(&e))?;
        let committed = tokio::time::timeout_at(deadline, async {
            let reply = self
                .metadata
                .enqueue(vec![batch], Acks::All, None, Vec::new(), None)
                .await?;
            reply.await.map_err(|_| BrokerError::ShuttingDown)?
        })
        .await;
        let outcome = match committed {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => return Err(self.not_written(what, e)),
            Err(_) => {
                return Err(BrokerError::TimedOut {
                    what,
                    after: PROPOSE_TIMEOUT,
                    state: "not committed by a quorum of the controller group yet (are a majority of brokers up?); \
                            it may still take effect, so look before repeating it"
                        .into(),
                });
            }
        };
        let mut applied = self.applied.subscribe();
        let mut failures = self.apply_failure.subscribe();
        let blocked = |f: &Option<ApplyFailure>| f.as_ref().is_some_and(|f| f.offset <= outcome.last_offset);
        tokio::select! {
            done = applied.wait_for(|a| *a > outcome.last_offset) => {
                done.map_err(|_| BrokerError::ShuttingDown)?;
                Ok(())
            }
            failed = failures.wait_for(blocked) => {
                let reason = match failed.as_deref() {
                    Ok(Some(f)) => format!("{} failed: {}", f.change, f.error),
                    _ => "the broker is shutting down".into(),
                };
                Err(BrokerError::MetadataNotApplied { what, broker: self.options.node_id, reason })
            }
            _ = tokio::time::sleep_until(deadline) => Err(BrokerError::MetadataNotApplied {
                what,
                broker: self.options.node_id,
                reason: format!("it is still applying earlier records after {PROPOSE_TIMEOUT:?}"),
            }),
        }
    }

    /// The error for a change whose record could not be appended to the controller log.
    fn not_written(&self, what: String, e: BrokerError) -> BrokerError {
        match e {
            // Answers that say where to go or when to retry keep their meaning.
            BrokerError::NotLeader { .. }
            | BrokerError::LeaderNotAvailable { .. }
            | BrokerError::NoController
            | BrokerError::ShuttingDown => e,
            other => BrokerError::MetadataNotWritten {
                what,
                broker: self.options.node_id,
                reason: other.to_string(),
            },
        }
    }

    /// Validates, places and records a new topic (controller only).
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        overrides: BTreeMap<String, String>,
    ) -> Result<Arc<Topic>> {
        validate_topic_name(name)?;
        self.create_topic_unchecked(name, partitions, replication_factor, overrides)
            .await
    }

    /// [`Registry::create_topic`] without the name rules, which reserve `__` names for the
    /// internal topics the broker creates itself.
    pub(crate) async fn create_topic_unchecked(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        overrides: BTreeMap<String, String>,
    ) -> Result<Arc<Topic>> {
        let max = self.options.max_partitions;
        if partitions <= 0 || partitions as u32 > max {
            return Err(BrokerError::InvalidPartitions(partitions, max));
        }
        let rf = if replication_factor == 0 { 1 } else { replication_factor };
        let alive = self.placeable_brokers();
        if rf < 1 || rf as usize > alive.len() {
            return Err(BrokerError::InvalidReplication(rf, alive.len() as u32));
        }
        self.options
            .defaults
            .accept_overrides(&overrides)
            .map_err(BrokerError::InvalidConfig)?;
        if self.get(name).is_ok() {
            return Err(BrokerError::TopicExists(name.to_string()));
        }
        let start: usize = self.list().iter().map(|t| t.partition_count()).sum();
        let assignments = place(&alive, partitions as usize, rf as usize, start)
            .into_iter()
            .map(|replicas| PartitionAssignment { replicas })
            .collect();
        let created = TopicCreated {
            name: name.to_string(),
            partitions,
            replication_factor: rf,
            configs: overrides.into_iter().collect(),
            topic_id: new_topic_id(),
            assignments,
        };
        let id = created.topic_id.clone();
        self.propose(metadata_record::Change::TopicCreated(created)).await?;
        let topic = self.get(name)?;
        if topic.id != id {
            // Another creation of the same name committed first.
            return Err(BrokerError::TopicExists(name.to_string()));
        }
        if let Some((p, u)) = topic.unopened.first_key_value() {
            // The topic exists (and will after a restart); say that it does not work here yet.
            return Err(BrokerError::MetadataNotApplied {
                what: format!("creation of topic '{name}'"),
                broker: self.options.node_id,
                reason: format!(
                    "its replica of partition {p} cannot be opened here ({}); `topic describe` shows it stopped until a retry opens it",
                    u.reason
                ),
            });
        }
        Ok(topic)
    }

    /// Records a topic's deletion (controller only); every broker then stops and removes
    /// its replicas.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let topic = self.get(name)?;
        self.propose(metadata_record::Change::TopicDeleted(TopicDeleted {
            name: name.to_string(),
            topic_id: topic.id.clone(),
        }))
        .await
    }

    /// Applies config changes (an empty value resets a key); controller only.
    pub async fn alter_topic_config(&self, name: &str, changes: BTreeMap<String, String>) -> Result<Arc<Topic>> {
        let topic = self.get(name)?;
        let mut overrides = topic.overrides.clone();
        for (k, v) in changes {
            if v.is_empty() {
                overrides.remove(&k);
            } else {
                overrides.insert(k, v);
            }
        }
        self.options
            .defaults
            .accept_overrides(&overrides)
            .map_err(BrokerError::InvalidConfig)?;
        self.propose(metadata_record::Change::TopicConfigChanged(TopicConfigChanged {
            name: name.to_string(),
            configs: overrides.into_iter().collect(),
        }))
        .await?;
        self.get(name)
    }
}

fn new_topic_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:032x}", nanos ^ (u128::from(std::process::id()) << 96))
}

#[cfg(test)]
mod tests;
