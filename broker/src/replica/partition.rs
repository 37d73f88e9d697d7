//! One partition: its log, the Raft group that owns appends to it, and its high watermark.
//!
//! # Concurrency
//! A partition is a Raft group (a group of one on a single node: the same code path). One
//! owner task ([`crate::replica::owner`]) drives its `RawNode`: appends reach it over a
//! bounded mailbox (producers wait when it is full), it proposes them, ticks the node, and
//! processes each Ready off the reactor in raft-rs's order (see [`crate::replica::ready`]): one persist covers every
//! proposal of the round. Reads do not go through the owner: the log serves them
//! concurrently, bounded by the high watermark.
//!
//! Raft messages from peers arrive in a bounded inbox the transport routes to; messages to
//! peers go to the transport, which never blocks the owner. The owner publishes a
//! [`GroupStatus`] (leader, in-sync replicas, follower lag) after every round. Ticks follow
//! the clock whatever wakes the owner ([`crate::replica::tick`]); an owner that fails or
//! panics is reported and reopened from its log ([`crate::replica::supervisor`]).
//!
//! # Invariants
//! The high watermark is the offset after the last committed entry: it only moves forward,
//! and a consumer never sees a record that is not committed (and, under flush policy
//! `always`, fsynced).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_storage::batch::ValidatedBatch;
use conveyor_storage::{LogConfig, PartitionLog};
use raft::RawNode;
use raft::eraftpb::ConfState;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::byte_budget::{ByteBudget, Reservation};
use crate::error::{BrokerError, Result};
use crate::metrics::Metrics;
use crate::replica::owner::Owner;
use crate::replica::producers::{PartitionProducers, ProducerSnapshots};
use crate::replica::proposal::{Acks, AppendOutcome, AppendRequest, Control, HandOver, MemberChange, StreamOrder};
use crate::replica::raft_storage::{RaftLog, ReplicaError};
use crate::replica::status::GroupStatus;
use crate::replica::supervisor::{self, Channels, ReplicaFiles, SharedFiles};
use crate::replica::transport::{GroupKey, Transport};
use conveyor_storage::producer_state::snapshot::SnapshotStore;

/// Most requests one owner round proposes before it processes a Ready.
pub(crate) const MAX_REQUESTS_PER_ROUND: usize = 512;
/// Raft logical clock: a follower campaigns after 10 to 20 ticks (0.5 to 1 s) without hearing
/// from its leader, so a new leader serves writes well within 2 s; heartbeats every 3.
pub(crate) const RAFT_TICK: Duration = Duration::from_millis(50);
pub(crate) const ELECTION_TICKS: usize = 10;
pub(crate) const HEARTBEAT_TICKS: usize = 3;
/// Most ticks one owner round takes after a stall; see [`crate::replica::tick`]. Below
/// `ELECTION_TICKS`, so one round never runs two check-quorum rounds with no messages between.
pub(crate) const MAX_TICKS_PER_ROUND: u32 = 5;
/// Raft messages from peers waiting for the owner; more are dropped (Raft resends).
pub(crate) const INBOX_DEPTH: usize = 4096;
/// A follower that has not caught up with the leader's log for this long is out of sync
/// (as Kafka's `replica.lag.time.max.ms`).
pub(crate) const REPLICA_LAG_TIME: Duration = Duration::from_secs(10);
/// How often a leader that is not its partition's preferred replica checks whether it can
/// hand leadership back, which keeps leaders spread across brokers after failovers.
pub(crate) const PREFERRED_LEADER_CHECK_TICKS: u64 = 600;

/// What opening a partition needs besides its name and directory.
#[derive(Debug, Clone)]
pub struct OpenContext {
    pub node_id: u64,
    pub queue_depth: usize,
    /// Bytes of produce requests queued for the partition, at most (`[limits]
    /// partition_queue_bytes`).
    pub queue_bytes: usize,
    pub metrics: Arc<Metrics>,
    pub runtime: tokio::runtime::Handle,
    pub transport: Arc<Transport>,
    /// The snapshots of the state machine replayed from this group's log, whose Raft
    /// snapshots must carry that state (the controller group's); `None` for a partition.
    pub state_snapshots: Option<Arc<dyn crate::replica::state_snapshot::StateSnapshots>>,
    /// Producer ids at or above this were never issued, as this broker's metadata says.
    pub producer_ids_issued: Arc<std::sync::atomic::AtomicI64>,
    /// How long a producer may stay idle before partitions drop its state
    /// (`[limits] producer_id_expiration`).
    pub producer_expiration: Duration,
}

/// Appends held while an election runs, at most, and for how long.
pub(crate) const MAX_WAITING: usize = 1024;
pub(crate) const MAX_WAIT_FOR_LEADER: Duration = Duration::from_secs(2);
/// How long a replica that stopped leading waits to learn whether its proposals committed.
pub(crate) const MAX_WAIT_FOR_COMMIT_AFTER_STEP_DOWN: Duration = Duration::from_secs(2);

/// A learner this many entries or fewer behind the commit index may be promoted: close
/// enough that it cannot hold back commits for long once it votes.
pub(crate) const PROMOTE_MAX_LAG: u64 = 64;

#[derive(Debug)]
pub struct Partition {
    pub topic: String,
    pub index: i32,
    /// This topic's byte counters, taken once when the partition opened.
    pub traffic: crate::metrics::TopicTraffic,
    /// The log and its Raft view; a restart after a failure swaps in reopened ones.
    files: Arc<SharedFiles>,
    node_id: u32,
    key: Arc<GroupKey>,
    transport: Arc<Transport>,
    mailbox: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    /// Bytes of the batches queued or proposed here and not answered yet.
    queued: ByteBudget,
    control: mpsc::Sender<Control>,
    high_watermark: watch::Receiver<u64>,
    status: watch::Receiver<GroupStatus>,
    owner: Mutex<Option<JoinHandle<()>>>,
    /// Why the replica is stopped, while it is: appends are refused with a retriable error
    /// until the supervisor has reopened it from its log.
    failed: Arc<Mutex<Option<String>>>,
}

/// A replica opened from its directory: the log, its Raft view, and the node over them.
pub(crate) struct Opened {
    pub log: Arc<PartitionLog>,
    pub raft: RaftLog,
    pub node: RawNode<RaftLog>,
    pub producers: PartitionProducers,
}

/// Opens (or creates) a replica's log and Raft node, as [`Partition::open`] describes; a
/// restart after a failure reopens through here too, so the log goes through recovery.
/// Blocking.
pub(crate) fn open_replica(
    ctx: &OpenContext,
    topic: &str,
    index: i32,
    dir: &std::path::Path,
    config: LogConfig,
    initial_voters: &[u32],
    preferred: u32,
) -> Result<Opened> {
    let storage_error = |e: ReplicaError| BrokerError::Internal(format!("topic '{topic}' partition {index}: {e}"));
    let log = Arc::new(PartitionLog::open(dir, config).map_err(|e| BrokerError::from_log(topic, index, e))?);
    let fsyncs = ctx.metrics.fsync_latency.clone();
    log.observe_syncs(conveyor_storage::SyncObserver::new(move |took| fsyncs.observe(took)));
    let mut raft = RaftLog::open(Arc::clone(&log)).map_err(storage_error)?;
    let producer_store = match &ctx.state_snapshots {
        Some(state) => {
            raft.set_state_snapshots(Arc::clone(state));
            None
        }
        None => {
            let store = SnapshotStore::open(dir)
                .map_err(|e| BrokerError::Internal(format!("topic '{topic}' partition {index}: {e}")))?;
            Some(Arc::new(store))
        }
    };
    let new_group = raft.voters().is_empty();
    if new_group && !initial_voters.is_empty() {
        let conf = ConfState {
            voters: initial_voters.iter().map(|&r| u64::from(r)).collect(),
            ..ConfState::default()
        };
        raft.set_conf_state(&conf).map_err(storage_error)?;
    }
    let state = raft::Storage::initial_state(&raft).map_err(|e| BrokerError::Internal(e.to_string()))?;
    let last = raft::Storage::last_index(&raft).map_err(|e| BrokerError::Internal(e.to_string()))?;
    let applied = state.hard_state.commit.min(last);
    let active = ctx.metrics.producer_ids_active.clone();
    let issued = Arc::clone(&ctx.producer_ids_issued);
    let producers = match producer_store {
        Some(store) => {
            let producers = PartitionProducers::load(&raft, Arc::clone(&store), applied, issued, active);
            // Set before the node takes its clone of the Raft log; after the load, whose
            // snapshot may be the one at the log start.
            let log_start = raft.offset_after(0);
            raft.set_state_snapshots(Arc::new(ProducerSnapshots::new(store, log_start)));
            producers
        }
        None => PartitionProducers::none(issued, active),
    };
    let config = raft::Config {
        id: ctx.node_id,
        election_tick: ELECTION_TICKS,
        heartbeat_tick: HEARTBEAT_TICKS,
        applied,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        ..raft::Config::default()
    };
    config
        .validate()
        .map_err(|e| BrokerError::Internal(format!("raft config: {e}")))?;
    let mut node =
        RawNode::new(&config, raft.clone(), &raft_logger()).map_err(|e| BrokerError::Internal(e.to_string()))?;
    let preferred = u64::from(preferred);
    // Alone in its group there is no reason to wait for an election timeout; a new group's
    // preferred leader campaigns at once too, so a new topic is writable quickly.
    // A broker shutting down takes no leadership: it would only have to hand it over again.
    let voter = raft.voters().contains(&ctx.node_id);
    let wants = raft.voters() == [ctx.node_id] || (new_group && voter && preferred == ctx.node_id);
    if wants && !ctx.transport.is_draining() {
        node.campaign().map_err(|e| BrokerError::Internal(e.to_string()))?;
    }
    Ok(Opened {
        log,
        raft,
        node,
        producers,
    })
}

/// What every incarnation of a partition's owner shares with the partition.
#[derive(Clone)]
pub(crate) struct OwnerContext {
    pub failed: Arc<Mutex<Option<String>>>,
    pub topic: String,
    pub index: i32,
    pub key: Arc<GroupKey>,
    pub transport: Arc<Transport>,
    pub high_watermark: watch::Sender<u64>,
    pub status: watch::Sender<GroupStatus>,
    pub metrics: Arc<Metrics>,
    pub traffic: crate::metrics::TopicTraffic,
    pub producer_expiration: Duration,
}

fn raft_logger() -> slog::Logger {
    slog::Logger::root(tracing_slog::TracingSlogDrain, slog::o!())
}

impl Partition {
    /// Opens (or creates) the log, starts its Raft group and the owner task. A new group's
    /// membership starts as `initial_voters` (the partition's replicas when it was created;
    /// a replica added later replays the membership changes since from its leader). An empty
    /// set starts a replica that only waits to be told by a leader. A restarted group keeps
    /// the membership it stored. `preferred` is the replica that should lead.
    /// Blocking: call off the reactor.
    pub fn open(
        ctx: &OpenContext,
        topic: &str,
        index: i32,
        dir: &std::path::Path,
        config: LogConfig,
        initial_voters: &[u32],
        preferred: u32,
    ) -> Result<Arc<Partition>> {
        let Opened {
            log,
            raft,
            node,
            producers,
        } = open_replica(ctx, topic, index, dir, config, initial_voters, preferred)?;
        let key = Arc::new(GroupKey::new(topic, index));
        let (hw_tx, hw_rx) = watch::channel(raft.offset_after(node.raft.raft_log.committed));
        let (status_tx, status_rx) = watch::channel(GroupStatus {
            leader: u32::try_from(node.raft.leader_id).unwrap_or(0),
            term: node.raft.term,
            followers: Vec::new(),
            failure: None,
        });
        let (tx, rx) = mpsc::channel(ctx.queue_depth);
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_DEPTH);
        let (control_tx, control_rx) = mpsc::channel(16);
        let failed = Arc::new(Mutex::new(None));
        let owner_cx = OwnerContext {
            failed: Arc::clone(&failed),
            topic: topic.to_string(),
            index,
            key: Arc::clone(&key),
            transport: Arc::clone(&ctx.transport),
            high_watermark: hw_tx,
            status: status_tx,
            metrics: Arc::clone(&ctx.metrics),
            traffic: ctx.metrics.topic_traffic(topic),
            producer_expiration: ctx.producer_expiration,
        };
        let owner = Owner::new(&owner_cx, raft.clone(), u64::from(preferred), producers);
        let traffic = owner_cx.traffic.clone();
        let files = Arc::new(SharedFiles::new(ReplicaFiles { log, raft }));
        ctx.transport.register(GroupKey::clone(&key), inbox_tx);
        let channels = Channels {
            requests: rx,
            inbox: inbox_rx,
            control: control_rx,
        };
        let replica = supervisor::PartitionReplica::new(
            ctx.clone(),
            owner_cx,
            Arc::clone(&files),
            channels,
            supervisor::Restart {
                initial_voters: initial_voters.to_vec(),
                preferred,
            },
            owner,
            node,
        );
        let handle = ctx.runtime.spawn(supervisor::supervise(replica));
        Ok(Arc::new(Partition {
            topic: topic.to_string(),
            index,
            traffic,
            files,
            node_id: ctx.node_id as u32,
            key,
            transport: Arc::clone(&ctx.transport),
            mailbox: Mutex::new(Some(tx)),
            queued: ByteBudget::new(
                ctx.queue_bytes,
                crate::byte_budget::MAX_WAIT,
                "the partition's queued produce bytes ([limits] partition_queue_bytes)",
            ),
            control: control_tx,
            high_watermark: hw_rx,
            status: status_rx,
            owner: Mutex::new(Some(handle)),
            failed,
        }))
    }

    pub fn status(&self) -> GroupStatus {
        self.status.borrow().clone()
    }

    /// The partition log readers use: after a restart, the reopened one.
    pub fn log(&self) -> Arc<PartitionLog> {
        self.files.log()
    }

    fn raft(&self) -> RaftLog {
        self.files.current().raft
    }

    /// Whether this replica is recovering entries it lost, as stored (see
    /// `replica::lost_entries`).
    pub fn is_recovering(&self) -> bool {
        self.files.is_recovering()
    }

    /// Replaces the log's config. Waits for a reopening under way, so the change lands on
    /// the log that stays. Blocking.
    pub fn set_log_config(&self, config: LogConfig) -> Result<()> {
        self.files
            .maintain(|files| files.log.set_config(config))
            .map_err(|e| BrokerError::from_log(&self.topic, self.index, e))
    }

    /// One scrub step on the log, unless the partition was reopened since `log` was its
    /// log (`None`: that pass is over, its cursor means nothing to the new log). No
    /// reopening starts while the step runs. What to do with damage is decided here, from
    /// the group's voters as the step starts (a pass may take hours, and membership change
    /// meanwhile): cut and repair when another voter holds the data, else only report it.
    /// Returns that choice with the step. Blocking.
    #[allow(clippy::type_complexity)]
    pub fn scrub_step(
        &self,
        log: &Arc<PartitionLog>,
        cursor: conveyor_storage::ScrubCursor,
        max_bytes: u64,
    ) -> Option<
        std::result::Result<(conveyor_storage::ScrubStep, conveyor_storage::OnDamage), conveyor_storage::LogError>,
    > {
        self.files.maintain(|files| {
            if !Arc::ptr_eq(&files.log, log) {
                return None;
            }
            let me = u64::from(self.node_id);
            let on_damage = if files.raft.conf_state().voters.iter().any(|&voter| voter != me) {
                conveyor_storage::OnDamage::Quarantine
            } else {
                conveyor_storage::OnDamage::Report
            };
            Some(
                log.scrub_step_with(cursor, max_bytes, on_damage)
                    .map(|step| (step, on_damage)),
            )
        })
    }

    /// Retires the log and its Raft view for good, after [`stop`](Self::stop), when the
    /// partition's directory is removed: a task still holding this partition can no longer
    /// write `raft-state` or delete segment files there (a topic recreated under the same
    /// name uses the same path). Waits for a retention pass or scrub step under way. Blocking.
    pub fn retire(&self) {
        self.files.retire();
    }

    /// Whether a task still holding this partition could store `raft-state` in its directory
    /// (it stores it, if so).
    #[cfg(test)]
    pub(crate) fn stores_raft_state(&self) -> bool {
        self.files.maintain(|files| files.raft.flush_state().is_ok())
    }

    /// A receiver that wakes when leadership or replication state changes.
    pub fn watch_status(&self) -> watch::Receiver<GroupStatus> {
        self.status.clone()
    }

    /// The Raft term this replica knows of.
    pub fn term(&self) -> u64 {
        self.status.borrow().term
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == self.node_id
    }

    /// The leader this replica knows of; 0 when there is none.
    pub fn leader(&self) -> u32 {
        self.status.borrow().leader
    }

    /// The error for a request this replica cannot serve because it does not lead.
    pub fn not_leader(&self) -> BrokerError {
        let failure = self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let leader = self.status.borrow().leader;
        supervisor::refusal(&self.transport, &self.topic, self.index, leader, failure.as_deref())
    }

    /// Fails unless this replica leads the partition.
    pub fn ensure_leader(&self) -> Result<()> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(self.not_leader())
        }
    }

    /// Asks the Raft group to hand leadership to replica `to`. Returns at once; watch
    /// [`watch_status`](Self::watch_status) to see it happen.
    pub async fn transfer_leader(&self, to: u32) -> Result<()> {
        self.control
            .send(Control::TransferLeader(u64::from(to)))
            .await
            .map_err(|_| BrokerError::ShuttingDown)
    }

    /// Asks this replica, if it leads, to hand leadership to an in-sync voter. Returns once
    /// the transfer started; watch [`watch_status`](Self::watch_status) to see it finish.
    pub async fn hand_over_leadership(&self) -> HandOver {
        let (reply, rx) = oneshot::channel();
        if self.control.send(Control::HandOver(reply)).await.is_err() {
            return HandOver::Never;
        }
        rx.await.unwrap_or(HandOver::Never)
    }

    /// The idempotent producers whose state this replica keeps (applied state: on the
    /// leader, batches it has not applied yet are not shown).
    pub async fn producers(&self) -> Result<Vec<conveyor_storage::producer_state::ProducerSummary>> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Producers(reply))
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        rx.await.map_err(|_| self.not_leader())
    }

    /// How many appends this replica holds unanswered; 0 when its owner is stopped. A
    /// replica that just handed leadership over answers its last appends once it learns
    /// from the new leader that they committed.
    pub async fn unanswered_appends(&self) -> usize {
        let (reply, rx) = oneshot::channel();
        if self.control.send(Control::Unanswered(reply)).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Makes `id` the replica that should lead (after a reassignment).
    pub async fn set_preferred(&self, id: u32) {
        // A stopped owner has nothing to prefer.
        let _ = self.control.send(Control::SetPreferred(u64::from(id))).await;
    }

    /// Applies one membership change step on this replica, which must lead the group.
    /// Returns once the change is committed, or at once if it is already in effect.
    pub async fn change_membership(&self, change: MemberChange) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Membership(change, reply))
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        rx.await.map_err(|_| BrokerError::ShuttingDown)?
    }

    /// The group's configuration, term and indexes as this replica holds them.
    pub fn raft_view(&self) -> crate::replica::raft_storage::RaftView {
        self.raft().view()
    }

    /// Voters and learners of the group, as last applied here.
    pub fn members(&self) -> (Vec<u32>, Vec<u32>) {
        let conf = self.raft().conf_state();
        let ids = |v: &[u64]| v.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        (ids(&conf.voters), ids(&conf.learners))
    }

    pub fn high_watermark(&self) -> u64 {
        *self.high_watermark.borrow()
    }

    /// A receiver that wakes when the high watermark moves, for long-polling fetches.
    pub fn watch_high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.clone()
    }

    fn sender(&self) -> Result<mpsc::Sender<AppendRequest>> {
        let guard = self.mailbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.clone().ok_or(BrokerError::ShuttingDown)
    }

    /// Queues validated batches for appending, waiting while the mailbox is full and while
    /// the partition's queued bytes are at their bound: at most `wait` (then `BUSY`), or as
    /// long as it takes for `None`. `shares` (and the partition's share) are held until the
    /// append is answered. The returned receiver resolves when the append meets `acks`.
    pub async fn enqueue(
        &self,
        batches: Vec<ValidatedBatch>,
        acks: Acks,
        order: Option<StreamOrder>,
        shares: Vec<Reservation>,
        wait: Option<Duration>,
    ) -> Result<oneshot::Receiver<Result<AppendOutcome>>> {
        self.enqueue_in(None, batches, acks, order, shares, wait).await
    }

    /// As [`enqueue`](Self::enqueue), proposed only while the Raft term is `term` (when
    /// given): a write held across an election is refused instead of landing in a term
    /// its writer did not load.
    pub async fn enqueue_in(
        &self,
        term: Option<u64>,
        batches: Vec<ValidatedBatch>,
        acks: Acks,
        order: Option<StreamOrder>,
        mut shares: Vec<Reservation>,
        wait: Option<Duration>,
    ) -> Result<oneshot::Receiver<Result<AppendOutcome>>> {
        let bytes = batches.iter().map(|b| b.bytes().len()).sum();
        let (topic, index) = (self.topic.clone(), self.index);
        let what = move || format!("a produce request to topic '{topic}' partition {index}");
        shares.push(self.queued.acquire(bytes, wait, what).await?);
        let (reply, rx) = oneshot::channel();
        let request = AppendRequest {
            batches,
            acks,
            order,
            reply,
            shares,
            term,
        };
        if let Err(_closed) = self.sender()?.send(request).await {
            let failed = self
                .failed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .is_some();
            return Err(if failed {
                self.not_leader()
            } else {
                BrokerError::ShuttingDown
            });
        }
        Ok(rx)
    }

    /// Applies retention without losing what Raft needs (only committed entries go).
    /// Blocking.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<usize> {
        self.compact_with("retention", |raft| raft.compact(now_ms))
    }

    /// Deletes the committed, applied entries below `offset`, where a state snapshot of
    /// the group's state machine stands (see [`crate::replica::state_snapshot`]). Blocking.
    pub fn compact_below(&self, offset: u64) -> Result<usize> {
        self.compact_with("compaction below a snapshot", |raft| raft.compact_below(offset))
    }

    /// Runs `compact` on the Raft log under the generation lock: a restart cannot retire and
    /// reopen the files while it stores `raft-state` and deletes segments through them. A
    /// retired log (its reopening failed and is retried) has nothing to give back. Blocking.
    fn compact_with(
        &self,
        what: &str,
        compact: impl FnOnce(&RaftLog) -> std::result::Result<usize, ReplicaError>,
    ) -> Result<usize> {
        self.files
            .maintain(|files| {
                if files.log.is_closed() {
                    return Ok(0);
                }
                compact(&files.raft)
            })
            .map_err(|e| BrokerError::Internal(format!("topic '{}' partition {}: {what}: {e}", self.topic, self.index)))
    }

    /// Stops taking appends, lets the owner finish what is queued, and waits for it.
    pub async fn stop(&self) {
        self.transport.deregister(&self.key);
        self.mailbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let handle = self
            .owner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && let Err(e) = handle.await
        {
            tracing::error!(topic = %self.topic, partition = self.index, error = %e, "partition owner task failed");
        }
    }

    /// Closes the log cleanly, then stores the Raft state: the stored commit never covers
    /// entries that are not on disk. Blocking; after [`stop`](Self::stop).
    pub fn close(&self) -> Result<()> {
        let files = self.files.current();
        files.raft.close().map_err(|e| match e {
            ReplicaError::Log(e) => BrokerError::from_log(&self.topic, self.index, e),
            e => BrokerError::Internal(format!("topic '{}' partition {}: {e}", self.topic, self.index)),
        })
    }
}

/// The error for a request a replica cannot serve because `leader` (0: none known) leads.
pub fn not_leader_error(transport: &Transport, topic: &str, partition: i32, leader: u32) -> BrokerError {
    match transport.client_address(leader).filter(|_| leader != 0) {
        Some(address) if leader != transport.node_id() => BrokerError::NotLeader {
            topic: topic.to_string(),
            partition,
            leader,
            address,
        },
        _ => BrokerError::LeaderNotAvailable {
            topic: topic.to_string(),
            partition,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A single-replica partition on `dir`, with its owner running.
    fn open_single(dir: &std::path::Path) -> Arc<Partition> {
        let metrics = Arc::new(Metrics::default());
        let transport =
            Transport::start(1, "127.0.0.1:1".into(), &BTreeMap::new(), 16, Arc::clone(&metrics)).expect("transport");
        let ctx = OpenContext {
            node_id: 1,
            queue_depth: 16,
            queue_bytes: 1 << 20,
            metrics,
            runtime: tokio::runtime::Handle::current(),
            transport,
            state_snapshots: None,
            producer_ids_issued: Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX)),
            producer_expiration: Duration::from_secs(86_400),
        };
        Partition::open(&ctx, "t", 0, dir, LogConfig::default(), &[1], 1).expect("open")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrub_pass_begun_on_a_log_the_partition_reopened_ends_instead_of_reading_the_retired_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open_single(dir.path());
        p.stop().await;
        let scrubbed = p.log();
        let cursor = conveyor_storage::ScrubCursor::start();
        assert!(
            p.scrub_step(&scrubbed, cursor, 1 << 20).is_some(),
            "steps run while the log is current"
        );
        let reopened = {
            let p = Arc::clone(&p);
            tokio::task::spawn_blocking(move || {
                p.files.reopen(|old| {
                    let log = Arc::new(PartitionLog::open(old.log.dir(), old.log.config()).map_err(|e| e.to_string())?);
                    let raft = RaftLog::open(Arc::clone(&log)).map_err(|e| e.to_string())?;
                    Ok::<_, String>((ReplicaFiles { log, raft }, ()))
                })
            })
        };
        reopened.await.expect("join").expect("reopened");
        assert!(scrubbed.is_closed(), "the old log was retired");
        assert!(
            p.scrub_step(&scrubbed, cursor, 1 << 20).is_none(),
            "the pass ends: its cursor belongs to the retired log"
        );
        assert!(p.scrub_step(&p.log(), cursor, 1 << 20).is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retired_partition_of_a_deleted_topic_neither_stores_raft_state_nor_deletes_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = open_single(dir.path());
        p.stop().await;
        let state_file = dir.path().join("raft-state");
        let before = std::fs::read(&state_file).expect("raft-state exists");
        let retired = Arc::clone(&p);
        tokio::task::spawn_blocking(move || retired.retire())
            .await
            .expect("join");
        // What a retention pass that still holds the old partition does after the deletion.
        assert!(p.raft().flush_state().is_err(), "the retired Raft view stores nothing");
        assert!(p.log().is_closed(), "the retired log refuses deletions and appends");
        let batch = crate::test_batches::batch_of(conveyor_storage::batch::Compression::None, 1);
        let scratch = tempfile::tempdir().expect("tempdir");
        PartitionLog::open(scratch.path(), LogConfig::default())
            .expect("log")
            .append(&batch)
            .expect("the batch is valid: an open log takes it");
        assert!(p.log().append(&batch).is_err(), "the retired log takes no append");
        assert_eq!(std::fs::read(&state_file).expect("raft-state"), before);
    }
}
