//! One partition: its log, the Raft group that owns appends to it, and its high watermark.
//!
//! # Concurrency
//! A partition is a Raft group (a group of one on a single node: the same code path). One
//! owner task drives its `RawNode`: appends reach it over a bounded mailbox (producers wait
//! when it is full), it proposes them, ticks the node, and processes each Ready off the
//! reactor in raft-rs's order (see [`crate::replica::ready`]): one persist covers every
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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_storage::batch::ValidatedBatch;
use conveyor_storage::{LogConfig, PartitionLog};
use raft::eraftpb::{ConfState, Entry, Message, MessageType};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{BrokerError, Result};
use crate::metrics::Metrics;
use crate::replica::inbound;
use crate::replica::lost_entries::LostEntries;
use crate::replica::raft_storage::RaftLog;
use crate::replica::ready::{ReadyHandler, on_ready};
use crate::replica::stalled_snapshots::StalledSnapshots;
use crate::replica::supervisor::{self, Channels, Exit, ReplicaFiles, SharedFiles};
use crate::replica::tick::TickSchedule;
use crate::transport::{GroupKey, Transport};

/// Most requests one owner round proposes before it processes a Ready.
const MAX_REQUESTS_PER_ROUND: usize = 512;
/// Raft logical clock: a follower campaigns after 10 to 20 ticks (0.5 to 1 s) without hearing
/// from its leader, so a new leader serves writes well within 2 s; heartbeats every 3.
const RAFT_TICK: Duration = Duration::from_millis(50);
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 3;
/// Most ticks one owner round takes after a stall; see [`crate::replica::tick`]. Below
/// `ELECTION_TICKS`, so one round never runs two check-quorum rounds with no messages between.
const MAX_TICKS_PER_ROUND: u32 = 5;
/// Raft messages from peers waiting for the owner; more are dropped (Raft resends).
const INBOX_DEPTH: usize = 4096;
/// A follower that has not caught up with the leader's log for this long is out of sync
/// (as Kafka's `replica.lag.time.max.ms`).
const REPLICA_LAG_TIME: Duration = Duration::from_secs(10);
/// How often a leader that is not its partition's preferred replica checks whether it can
/// hand leadership back, which keeps leaders spread across brokers after failovers.
const PREFERRED_LEADER_CHECK_TICKS: u64 = 600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    None,
    Leader,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub base_offset: u64,
    pub last_offset: u64,
}

#[derive(Debug)]
pub struct AppendRequest {
    /// Validated batches, appended in order.
    pub batches: Vec<ValidatedBatch>,
    pub acks: Acks,
    /// Set for a numbered part of a produce stream.
    pub order: Option<StreamOrder>,
    pub reply: oneshot::Sender<Result<AppendOutcome>>,
}

/// Where a numbered produce-stream part stands in its partition's sequence on that stream.
///
/// A stream's parts for one partition are refused or appended one by one in stream order by
/// the owner; if one is refused (no leader, a stale view, a dropped proposal), every later
/// part of the run must be refused too, or the client's resend of the first would land after
/// them. `next` is the stream's shared counter for the partition: only the owner moves it,
/// when it appends a part.
#[derive(Debug, Clone)]
pub struct StreamOrder {
    pub next: Arc<AtomicU64>,
    pub sequence: u64,
    /// The client had nothing of this partition awaiting an answer: a new run starts here.
    pub restart: bool,
}

impl StreamOrder {
    fn expected(&self) -> u64 {
        if self.restart {
            self.sequence
        } else {
            self.next.load(Ordering::Acquire)
        }
    }
}

/// What opening a partition needs besides its name and directory.
#[derive(Debug, Clone)]
pub struct OpenContext {
    pub node_id: u64,
    pub queue_depth: usize,
    pub metrics: Arc<Metrics>,
    pub runtime: tokio::runtime::Handle,
    pub transport: Arc<Transport>,
}

/// A follower's replication state, as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerState {
    pub id: u32,
    /// Offsets the follower's log is behind the leader's.
    pub lag: u64,
    pub in_sync: bool,
}

/// What a partition's Raft group looks like from this replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStatus {
    /// The leader this replica knows of; 0 when there is none.
    pub leader: u32,
    pub term: u64,
    /// Set on the leader only.
    pub followers: Vec<FollowerState>,
    /// Set while this replica is stopped after a failure; `leader` is then never this
    /// replica (0, or a peer whose heartbeats show it leads).
    pub failure: Option<String>,
}

impl GroupStatus {
    /// Replicas in sync with the leader, the leader first; empty unless this replica leads.
    pub fn in_sync(&self) -> Vec<u32> {
        if self.leader == 0 {
            return Vec::new();
        }
        let mut ids = vec![self.leader];
        ids.extend(self.followers.iter().filter(|f| f.in_sync).map(|f| f.id));
        ids
    }
}

/// One step of a Raft group membership change. Changes are made one at a time, each
/// committed before the next is accepted, so two majorities can never disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    /// Joins as a learner: it receives the log but does not vote.
    AddLearner(u64),
    /// A learner that has caught up becomes a voter.
    Promote(u64),
    Remove(u64),
}

#[derive(Debug)]
pub(crate) enum Control {
    TransferLeader(u64),
    SetPreferred(u64),
    Membership(MemberChange, oneshot::Sender<Result<()>>),
}

/// Appends held while an election runs, at most, and for how long.
const MAX_WAITING: usize = 1024;
const MAX_WAIT_FOR_LEADER: Duration = Duration::from_secs(2);
/// How long a replica that stopped leading waits to learn whether its proposals committed.
const MAX_WAIT_FOR_COMMIT_AFTER_STEP_DOWN: Duration = Duration::from_secs(2);

/// A learner this many entries or fewer behind the commit index may be promoted: close
/// enough that it cannot hold back commits for long once it votes.
const PROMOTE_MAX_LAG: u64 = 64;

#[derive(Debug)]
pub struct Partition {
    pub topic: String,
    pub index: i32,
    /// The log and its Raft view; a restart after a failure swaps in reopened ones.
    files: Arc<SharedFiles>,
    node_id: u32,
    key: Arc<GroupKey>,
    transport: Arc<Transport>,
    mailbox: Mutex<Option<mpsc::Sender<AppendRequest>>>,
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
    let storage_error = |e: crate::replica::raft_storage::ReplicaError| {
        BrokerError::Internal(format!("topic '{topic}' partition {index}: {e}"))
    };
    let log = Arc::new(PartitionLog::open(dir, config).map_err(|e| BrokerError::from_log(topic, index, e))?);
    let raft = RaftLog::open(Arc::clone(&log)).map_err(storage_error)?;
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
    let config = raft::Config {
        id: ctx.node_id,
        election_tick: ELECTION_TICKS,
        heartbeat_tick: HEARTBEAT_TICKS,
        applied: state.hard_state.commit.min(last),
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
    let voter = raft.voters().contains(&ctx.node_id);
    if raft.voters() == [ctx.node_id] || (new_group && voter && preferred == ctx.node_id) {
        node.campaign().map_err(|e| BrokerError::Internal(e.to_string()))?;
    }
    Ok(Opened { log, raft, node })
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
        let Opened { log, raft, node } = open_replica(ctx, topic, index, dir, config, initial_voters, preferred)?;
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
        };
        let owner = Owner::new(&owner_cx, raft.clone(), u64::from(preferred));
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
            files,
            node_id: ctx.node_id as u32,
            key,
            transport: Arc::clone(&ctx.transport),
            mailbox: Mutex::new(Some(tx)),
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
        self.files.current().log
    }

    fn raft(&self) -> RaftLog {
        self.files.current().raft
    }

    /// Whether this replica is recovering entries it lost, as stored (see
    /// `replica::lost_entries`).
    pub fn is_recovering(&self) -> bool {
        self.raft().recovering().is_some()
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

    /// Queues validated batches for appending, waiting while the mailbox is full. The returned
    /// receiver resolves when the append meets `acks`.
    pub async fn enqueue(
        &self,
        batches: Vec<ValidatedBatch>,
        acks: Acks,
        order: Option<StreamOrder>,
    ) -> Result<oneshot::Receiver<Result<AppendOutcome>>> {
        let (reply, rx) = oneshot::channel();
        let request = AppendRequest {
            batches,
            acks,
            order,
            reply,
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
        // Under the generation lock: a restart cannot retire and reopen the files while
        // this pass stores `raft-state` and deletes segments through them.
        // A retired log (its reopening failed and is retried) has nothing to give back.
        self.files
            .maintain(|files| {
                if files.log.is_closed() {
                    return Ok(0);
                }
                files.raft.compact(now_ms)
            })
            .map_err(|e| {
                BrokerError::Internal(format!(
                    "topic '{}' partition {}: retention: {e}",
                    self.topic, self.index
                ))
            })
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
        files
            .log
            .close()
            .map_err(|e| BrokerError::from_log(&self.topic, self.index, e))?;
        files
            .raft
            .flush_state()
            .map_err(|e| BrokerError::Internal(format!("topic '{}' partition {}: {e}", self.topic, self.index)))
    }
}

/// A proposed request waiting for its entries to be persisted or committed.
#[derive(Debug)]
struct Pending {
    first: u64,
    last: u64,
    /// The term the entries were proposed in: if the entry at `last` has another term, a new
    /// leader overwrote them and they are not this request's.
    term: u64,
    proposed_at: Instant,
    last_offset_delta: u32,
    acks: Acks,
    /// The produce stream's counter, for a numbered part (see [`StreamOrder`]).
    order: Option<Arc<AtomicU64>>,
    reply: oneshot::Sender<Result<AppendOutcome>>,
}

impl Pending {
    /// Answers with an error. The stream's later parts were admitted on the strength of this
    /// one; from now on only a part that starts a new run is, so the client's resend of this
    /// part cannot land after a later one that was admitted.
    fn fail(self, error: BrokerError) {
        if let Some(next) = &self.order {
            next.store(u64::MAX, Ordering::Release);
        }
        drop(self.reply.send(Err(error)));
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

pub(crate) struct Owner {
    topic: String,
    index: i32,
    key: Arc<GroupKey>,
    raft: RaftLog,
    transport: Arc<Transport>,
    high_watermark: watch::Sender<u64>,
    status: watch::Sender<GroupStatus>,
    metrics: Arc<Metrics>,
    pending: VecDeque<Pending>,
    was_leader: bool,
    /// When this replica last stopped leading; see [`Owner::finish`].
    stepped_down: Option<Instant>,
    preferred: u64,
    ticks: u64,
    /// When each follower last matched the leader's whole log.
    caught_up: HashMap<u64, Instant>,
    /// Membership changes proposed here, waiting to commit.
    pending_changes: Vec<PendingChange>,
    /// Appends that arrived while no leader was known, in arrival order.
    waiting: VecDeque<(Instant, AppendRequest)>,
    /// Whether this replica lost entries it acknowledged (see `replica::lost_entries`).
    lost_entries: LostEntries,
    /// Followers waiting for a snapshot that may have been lost (see `replica::stalled_snapshots`).
    stalled_snapshots: StalledSnapshots,
}

impl Drop for Owner {
    fn drop(&mut self) {
        // A panic unwinds through the owner: its waiting clients get the stopped replica's
        // retriable error rather than a closed channel (which reads as a shutdown).
        if std::thread::panicking() {
            self.fail_everything("the partition task panicked");
        }
    }
}

#[derive(Debug)]
struct PendingChange {
    index: u64,
    term: u64,
    reply: oneshot::Sender<Result<()>>,
}

/// Sends the messages a Ready produced through the transport as soon as the Ready's order
/// allows (the processing thread never waits on the network). Commits are read from the
/// node itself in [`Owner::finish`].
struct Outbox<'a> {
    transport: &'a Transport,
    key: &'a Arc<GroupKey>,
}

impl ReadyHandler for Outbox<'_> {
    fn send(&mut self, messages: Vec<Message>) {
        self.transport.send(self.key, messages);
    }
}

impl Owner {
    pub(crate) fn new(cx: &OwnerContext, raft: RaftLog, preferred: u64) -> Owner {
        let lost_entries = LostEntries::new(&cx.topic, cx.index, &raft);
        Owner {
            topic: cx.topic.clone(),
            index: cx.index,
            key: Arc::clone(&cx.key),
            raft,
            transport: Arc::clone(&cx.transport),
            high_watermark: cx.high_watermark.clone(),
            status: cx.status.clone(),
            metrics: Arc::clone(&cx.metrics),
            pending: VecDeque::new(),
            was_leader: false,
            stepped_down: None,
            preferred,
            ticks: 0,
            caught_up: HashMap::new(),
            pending_changes: Vec::new(),
            waiting: VecDeque::new(),
            lost_entries,
            stalled_snapshots: StalledSnapshots::default(),
        }
    }

    /// Drives the node until the mailbox closes ([`Exit::Stopped`]) or the replica cannot go
    /// on ([`Exit::Failed`]); the channels outlive it, for the supervisor and the next owner.
    pub(crate) async fn run(mut self, channels: &mut Channels, mut node: RawNode<RaftLog>) -> Exit {
        let Channels {
            requests: rx,
            inbox,
            control,
        } = channels;
        // Ticks follow the clock whatever wakes the loop (see `replica::tick`).
        let mut schedule = TickSchedule::new(RAFT_TICK, MAX_TICKS_PER_ROUND, tokio::time::Instant::now());
        let mut open = true;
        while open || node.has_ready() {
            let mut requests = Vec::new();
            let mut messages = Vec::new();
            if open {
                tokio::select! {
                    biased;
                    Some(m) = inbox.recv() => messages.push(m),
                    next = rx.recv() => match next {
                        Some(r) => requests.push(r),
                        None => open = false,
                    },
                    Some(c) = control.recv() => self.control(&mut node, c),
                    () = tokio::time::sleep_until(schedule.deadline()) => {}
                }
                while messages.len() < INBOX_DEPTH {
                    match inbox.try_recv() {
                        Ok(m) => messages.push(m),
                        Err(_) => break,
                    }
                }
                while open && requests.len() < MAX_REQUESTS_PER_ROUND {
                    match rx.try_recv() {
                        Ok(r) => requests.push(r),
                        Err(_) => break,
                    }
                }
            }
            if self.raft.partition_log().is_poisoned() {
                // A failed flush or a scrub that found damage poisoned the log while no
                // Ready failed here. Checked before anything is stepped: raft-rs treats a
                // log it cannot read (a leader sending entries from a quarantined segment)
                // as fatal. The replica stops, drops the messages (Raft resends), and is
                // reopened through recovery, which cuts a damaged log at the bad batch.
                let reason =
                    "the partition log refuses reads and writes (poisoned by a failed write or found damaged at rest)";
                for request in requests {
                    drop(
                        request
                            .reply
                            .send(Err(supervisor::replica_stopped(&self.topic, self.index, reason))),
                    );
                }
                self.fail_everything(reason);
                return Exit::Failed(reason.into());
            }
            for m in messages {
                // A message from a stale term or an unknown peer is refused by Raft itself;
                // nothing here depends on it. Transport reports and lost entries: see
                // `replica::inbound`.
                if let Err(e) = inbound::step(&mut node, &mut self.lost_entries, m) {
                    tracing::debug!(topic = %self.topic, partition = self.index, error = %e, "raft message refused");
                }
            }
            self.release_waiting(&mut node);
            for request in requests {
                self.propose(&mut node, request);
            }
            let due = schedule.due(tokio::time::Instant::now());
            let tick = due > 0;
            for _ in 0..due {
                // A replica recovering lost entries must not campaign.
                self.lost_entries.before_tick(&mut node);
                node.tick();
                self.stalled_snapshots.on_tick(&mut node);
                self.ticks += 1;
                if self.ticks.is_multiple_of(PREFERRED_LEADER_CHECK_TICKS) {
                    self.restore_preferred_leader(&mut node);
                }
            }
            if !node.has_ready() {
                // A former leader's proposals waiting to learn their fate time out on ticks.
                if tick && !self.pending.is_empty() && !self.was_leader {
                    self.finish(&node);
                }
                // Leader and term change only with a Ready; follower progress without one is
                // published on the next tick rather than after every message round.
                if tick {
                    self.publish_status(&node);
                }
                continue;
            }
            let started = Instant::now();
            let transport = Arc::clone(&self.transport);
            let key = Arc::clone(&self.key);
            let job = tokio::task::spawn_blocking(move || {
                let mut outbox = Outbox {
                    transport: &transport,
                    key: &key,
                };
                let result = (|| {
                    while on_ready(&mut node, &mut outbox)? {}
                    Ok::<_, crate::replica::raft_storage::ReplicaError>(())
                })();
                (node, result)
            });
            let (returned, result) = match job.await {
                Ok(r) => r,
                Err(e) => {
                    // The node went down with the job: the supervisor reopens the replica.
                    let reason = format!("raft ready processing panicked: {e}");
                    self.fail_everything(&reason);
                    return Exit::Failed(reason);
                }
            };
            node = returned;
            self.metrics.fsync_latency.observe(started.elapsed());
            match result {
                Ok(()) => {
                    self.finish(&node);
                    self.publish_status(&node);
                }
                Err(e) => {
                    // A Ready that could not be persisted leaves the node unusable: stop here
                    // rather than retry over a log in an unknown state; the supervisor reopens
                    // it through recovery.
                    let reason = format!("raft log write failed: {e}");
                    self.fail_everything(&reason);
                    return Exit::Failed(reason);
                }
            }
        }
        tracing::debug!(topic = %self.topic, partition = self.index, "partition owner stopped");
        Exit::Stopped
    }

    /// Answers everything this owner holds with the retriable error of a stopped replica.
    fn fail_everything(&mut self, reason: &str) {
        let (topic, index) = (self.topic.clone(), self.index);
        let error = || supervisor::replica_stopped(&topic, index, reason);
        self.fail_all(error);
        for (_, request) in std::mem::take(&mut self.waiting) {
            drop(request.reply.send(Err(error())));
        }
        for change in std::mem::take(&mut self.pending_changes) {
            drop(change.reply.send(Err(error())));
        }
    }

    /// Whether appends must wait rather than be answered now: while an election runs (no
    /// leader known) or while this leader hands leadership over (raft-rs drops proposals
    /// then). Refusing one request and accepting the next once things settle would let a
    /// client's retry land after later records of the same partition.
    fn must_hold(node: &RawNode<RaftLog>) -> bool {
        match node.raft.state {
            StateRole::Leader => node.raft.lead_transferee.is_some(),
            _ => node.raft.leader_id == 0,
        }
    }

    /// Proposes a request's batches, one entry each, in one step: all of them or none.
    fn propose(&mut self, node: &mut RawNode<RaftLog>, request: AppendRequest) {
        if Self::must_hold(node) && self.waiting.len() < MAX_WAITING {
            self.waiting.push_back((Instant::now(), request));
            return;
        }
        if node.raft.state != StateRole::Leader || node.raft.lead_transferee.is_some() {
            drop(request.reply.send(Err(self.not_leader())));
            return;
        }
        if let Some(order) = &request.order {
            let expected = order.expected();
            if order.sequence != expected {
                let error = BrokerError::OutOfSequence {
                    topic: self.topic.clone(),
                    partition: self.index,
                    expected,
                    got: order.sequence,
                };
                drop(request.reply.send(Err(error)));
                return;
            }
        }
        let first = node.raft.raft_log.last_index() + 1;
        let last_offset_delta = request.batches.last().map_or(0, |b| b.header().last_offset_delta);
        let entries: Vec<Entry> = request
            .batches
            .iter()
            .map(|batch| Entry {
                data: batch.bytes().clone(),
                ..Entry::default()
            })
            .collect();
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgPropose);
        message.from = node.raft.id;
        message.set_entries(entries.into());
        if let Err(e) = node.raft.step(message) {
            // A leader drops proposals only while it hands leadership over, which is held
            // above; whatever the reason, the client can retry.
            tracing::warn!(topic = %self.topic, partition = self.index, error = %e, "proposal dropped");
            let error = BrokerError::LeaderNotAvailable {
                topic: self.topic.clone(),
                partition: self.index,
            };
            drop(request.reply.send(Err(error)));
            return;
        }
        if let Some(order) = &request.order {
            order.next.store(order.sequence.saturating_add(1), Ordering::Release);
        }
        // Traffic counters are about clients' data; the controller's records are not.
        if self.key.topic != crate::transport::CONTROLLER_TOPIC {
            for batch in &request.batches {
                self.metrics.bytes_in.add(batch.bytes().len() as u64);
                self.metrics.records_in.add(u64::from(batch.header().record_count));
            }
        }
        self.pending.push_back(Pending {
            first,
            last: node.raft.raft_log.last_index(),
            term: node.raft.term,
            proposed_at: Instant::now(),
            last_offset_delta,
            acks: request.acks,
            order: request.order.map(|o| o.next),
            reply: request.reply,
        });
    }

    /// Proposes, in order, the appends held for a leader once one is known (refusing them
    /// with its name if it is another replica), and refuses those held too long.
    fn release_waiting(&mut self, node: &mut RawNode<RaftLog>) {
        if self.waiting.is_empty() {
            return;
        }
        if !Self::must_hold(node) {
            // Nothing is held again on the way: `must_hold` is false here.
            for (_, request) in std::mem::take(&mut self.waiting) {
                self.propose(node, request);
            }
            return;
        }
        while self
            .waiting
            .front()
            .is_some_and(|(since, _)| since.elapsed() >= MAX_WAIT_FOR_LEADER)
        {
            if let Some((_, request)) = self.waiting.pop_front() {
                drop(request.reply.send(Err(self.not_leader())));
            }
        }
    }

    fn not_leader(&self) -> BrokerError {
        not_leader_error(&self.transport, &self.topic, self.index, self.status.borrow().leader)
    }

    fn control(&mut self, node: &mut RawNode<RaftLog>, command: Control) {
        match command {
            Control::TransferLeader(to) => {
                tracing::info!(topic = %self.topic, partition = self.index, to, "transferring leadership");
                node.transfer_leader(to);
            }
            Control::SetPreferred(id) => self.preferred = id,
            Control::Membership(change, reply) => match self.membership(node, change) {
                Ok(Some(index)) => self.pending_changes.push(PendingChange {
                    index,
                    term: node.raft.term,
                    reply,
                }),
                Ok(None) => drop(reply.send(Ok(()))),
                Err(e) => drop(reply.send(Err(e))),
            },
        }
    }

    /// Proposes a membership change step; `None` when it is already in effect.
    fn membership(&mut self, node: &mut RawNode<RaftLog>, change: MemberChange) -> Result<Option<u64>> {
        use raft::eraftpb::{ConfChange, ConfChangeType};
        if node.raft.state != StateRole::Leader {
            return Err(self.not_leader());
        }
        let conf = self.raft.conf_state();
        let pending = |reason: String| BrokerError::MembershipChanging {
            topic: self.topic.clone(),
            partition: self.index,
            reason,
        };
        let (kind, id) = match change {
            MemberChange::AddLearner(id) => {
                if conf.voters.contains(&id) || conf.learners.contains(&id) {
                    return Ok(None);
                }
                (ConfChangeType::AddLearnerNode, id)
            }
            MemberChange::Promote(id) => {
                if conf.voters.contains(&id) {
                    return Ok(None);
                }
                if !conf.learners.contains(&id) {
                    return Err(BrokerError::InvalidRequest(format!(
                        "broker {id} is not a learner of topic '{}' partition {}; add it first",
                        self.topic, self.index
                    )));
                }
                let matched = node.raft.prs().get(id).map_or(0, |p| p.matched);
                let committed = node.raft.raft_log.committed;
                if matched + PROMOTE_MAX_LAG < committed {
                    return Err(pending(format!(
                        "broker {id} is catching up (entry {matched} of {committed})"
                    )));
                }
                (ConfChangeType::AddNode, id)
            }
            MemberChange::Remove(id) => {
                if !conf.voters.contains(&id) && !conf.learners.contains(&id) {
                    return Ok(None);
                }
                if id == node.raft.id {
                    // A leader that removed itself would go on leading a group it is not in:
                    // hand leadership to the most caught-up voter first.
                    let successor = node
                        .raft
                        .prs()
                        .iter()
                        .filter(|(other, _)| **other != id && conf.voters.contains(other))
                        .max_by_key(|(_, p)| p.matched)
                        .map(|(other, _)| *other);
                    let Some(successor) = successor else {
                        return Err(BrokerError::InvalidRequest(format!(
                            "broker {id} is the only voter of topic '{}' partition {}",
                            self.topic, self.index
                        )));
                    };
                    node.transfer_leader(successor);
                    return Err(pending(format!(
                        "leadership is moving to broker {successor} before broker {id} leaves"
                    )));
                }
                if conf.voters.contains(&id) && conf.voters.len() == 1 {
                    return Err(BrokerError::InvalidRequest(format!(
                        "broker {id} is the only voter of topic '{}' partition {}",
                        self.topic, self.index
                    )));
                }
                (ConfChangeType::RemoveNode, id)
            }
        };
        if node.raft.has_pending_conf() {
            return Err(pending("another membership change is being committed".into()));
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = id;
        node.propose_conf_change(Vec::new(), cc)
            .map_err(|e| pending(format!("proposal refused: {e}")))?;
        tracing::info!(topic = %self.topic, partition = self.index, ?change, "membership change proposed");
        Ok(Some(node.raft.raft_log.last_index()))
    }

    /// Hands leadership to the preferred replica when it is fully caught up.
    fn restore_preferred_leader(&self, node: &mut RawNode<RaftLog>) {
        if node.raft.state != StateRole::Leader || node.raft.id == self.preferred {
            return;
        }
        let last = node.raft.raft_log.last_index();
        let ready = node
            .raft
            .prs()
            .get(self.preferred)
            .is_some_and(|p| p.matched == last && p.recent_active);
        if ready {
            tracing::info!(topic = %self.topic, partition = self.index, to = self.preferred, "handing leadership back to the preferred replica");
            node.transfer_leader(self.preferred);
        }
    }

    /// Publishes leader, term and, on the leader, each follower's lag and sync state.
    fn publish_status(&mut self, node: &RawNode<RaftLog>) {
        let leader = u32::try_from(node.raft.leader_id).unwrap_or(0);
        let mut followers = Vec::new();
        if node.raft.state == StateRole::Leader {
            let last = node.raft.raft_log.last_index();
            let end = self.raft.offset_after(last);
            let now = Instant::now();
            for (&id, progress) in node.raft.prs().iter() {
                if id == node.raft.id {
                    continue;
                }
                if progress.matched >= last && progress.recent_active {
                    self.caught_up.insert(id, now);
                }
                let in_sync = self
                    .caught_up
                    .get(&id)
                    .is_some_and(|t| now.duration_since(*t) < REPLICA_LAG_TIME);
                followers.push(FollowerState {
                    id: u32::try_from(id).unwrap_or(0),
                    lag: end.saturating_sub(self.raft.offset_after(progress.matched)),
                    in_sync,
                });
            }
            followers.sort_by_key(|f| f.id);
        } else {
            self.caught_up.clear();
        }
        let status = GroupStatus {
            leader,
            term: node.raft.term,
            followers,
            failure: None,
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            if changed {
                *current = status;
            }
            changed
        });
    }

    /// Answers requests whose entries are persisted (acks=leader) or committed (acks=all),
    /// and moves the high watermark to the end of what is committed.
    fn finish(&mut self, node: &RawNode<RaftLog>) {
        let persisted = node.raft.raft_log.persisted;
        let committed = node.raft.raft_log.committed;
        let leader = node.raft.state == StateRole::Leader;
        if leader != self.was_leader {
            self.was_leader = leader;
            self.stepped_down = (!leader).then(Instant::now);
            self.metrics.leader_changes.add(1);
            tracing::info!(topic = %self.topic, partition = self.index, leader, term = node.raft.term, "raft leadership changed");
        }
        let mut still = VecDeque::with_capacity(self.pending.len());
        while let Some(p) = self.pending.pop_front() {
            let done = match p.acks {
                Acks::All => committed >= p.last,
                Acks::Leader | Acks::None => persisted >= p.last,
            };
            let ours = node.raft.raft_log.term(p.last).is_ok_and(|t| t == p.term);
            if done && !ours {
                p.fail(self.not_leader());
            } else if done {
                if p.acks == Acks::All {
                    self.metrics.commit_latency.observe(p.proposed_at.elapsed());
                }
                let outcome = match (self.raft.offset_of(p.first), self.raft.offset_of(p.last)) {
                    (Some(base), Some(last_base)) => Ok(AppendOutcome {
                        base_offset: base,
                        last_offset: last_base + u64::from(p.last_offset_delta),
                    }),
                    _ => Err(BrokerError::Internal(
                        "appended entries are missing from the log".into(),
                    )),
                };
                drop(p.reply.send(outcome));
            } else if !(leader || ours && self.learning_commit()) {
                p.fail(self.not_leader());
            } else {
                still.push_back(p);
            }
        }
        self.pending = still;
        for p in std::mem::take(&mut self.pending_changes) {
            if committed >= p.index {
                let ours = node.raft.raft_log.term(p.index).is_ok_and(|t| t == p.term);
                drop(p.reply.send(if ours { Ok(()) } else { Err(self.not_leader()) }));
            } else if !leader {
                drop(p.reply.send(Err(self.not_leader())));
            } else {
                self.pending_changes.push(p);
            }
        }
        let hw = self.raft.offset_after(committed);
        self.high_watermark.send_if_modified(|current| {
            let moved = hw > *current;
            *current = (*current).max(hw);
            moved
        });
    }

    /// Whether a former leader should keep waiting to learn if the entries it proposed
    /// commit. A new leader often commits them (a transfer hands over a caught-up log), and
    /// answering "not leader" at once would make the client resend records about to be
    /// committed: duplicates. A follower learns the commit index within a heartbeat of the
    /// new leader's election; one that learns nothing (cut off, say) answers after a while.
    fn learning_commit(&self) -> bool {
        self.stepped_down
            .is_some_and(|at| at.elapsed() < MAX_WAIT_FOR_COMMIT_AFTER_STEP_DOWN)
    }

    fn fail_all(&mut self, error: impl Fn() -> BrokerError) {
        for p in self.pending.drain(..) {
            p.fail(error());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::panic::AssertUnwindSafe;

    use super::*;

    /// A single-replica partition on `dir`, with its owner running.
    fn open_single(dir: &std::path::Path) -> Arc<Partition> {
        let metrics = Arc::new(Metrics::default());
        let transport =
            Transport::start(1, "127.0.0.1:1".into(), &BTreeMap::new(), 16, Arc::clone(&metrics)).expect("transport");
        let ctx = OpenContext {
            node_id: 1,
            queue_depth: 16,
            metrics,
            runtime: tokio::runtime::Handle::current(),
            transport,
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
        let batch = {
            use conveyor_storage::batch::{BatchBuilder, Compression, Record};
            let mut b = BatchBuilder::new(Compression::None);
            b.push(&Record {
                timestamp: 1_000,
                value: Some(bytes::Bytes::from_static(b"v")),
                ..Record::default()
            });
            b.build().expect("batch")
        };
        let scratch = tempfile::tempdir().expect("tempdir");
        PartitionLog::open(scratch.path(), LogConfig::default())
            .expect("log")
            .append(&batch)
            .expect("the batch is valid: an open log takes it");
        assert!(p.log().append(&batch).is_err(), "the retired log takes no append");
        assert_eq!(std::fs::read(&state_file).expect("raft-state"), before);
    }

    #[tokio::test]
    async fn an_owner_unwinding_from_a_panic_answers_its_waiting_clients_with_a_retriable_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Arc::new(Metrics::default());
        let transport =
            Transport::start(1, "127.0.0.1:1".into(), &BTreeMap::new(), 16, Arc::clone(&metrics)).expect("transport");
        let log = Arc::new(PartitionLog::open(dir.path(), LogConfig::default()).expect("log"));
        let raft = RaftLog::open(log).expect("raft log");
        let cx = OwnerContext {
            failed: Arc::default(),
            topic: "t".into(),
            index: 0,
            key: Arc::new(GroupKey::new("t", 0)),
            transport,
            high_watermark: watch::channel(0).0,
            status: watch::channel(GroupStatus::default()).0,
            metrics,
        };
        let mut owner = Owner::new(&cx, raft, 1);
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            batches: Vec::new(),
            acks: Acks::All,
            order: None,
            reply,
        };
        owner.waiting.push_back((Instant::now(), request));
        let unwound = std::panic::catch_unwind(AssertUnwindSafe(move || {
            let _owner = owner;
            panic!("injected fault in the owner");
        }));
        assert!(unwound.is_err());
        let error = answer.await.expect("answered, not dropped").expect_err("refused");
        assert!(matches!(error, BrokerError::ReplicaStopped { .. }), "{error}");
        assert!(error.detail().retriable);
    }
}
