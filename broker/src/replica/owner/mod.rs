//! The partition owner: the one task that drives a partition's Raft node. It takes appends
//! and membership changes from the partition's mailbox and messages from its inbox, ticks
//! by the clock (see [`super::tick`]), processes each Ready (see [`super::ready`]), and
//! answers requests once their entries are persisted or committed, as their acks ask.
//!
//! # Crash behaviour
//! Nothing here is durable on its own: what a crash can lose or keep is decided by the Ready
//! order (`ready.rs`) and the log. A failing or panicking owner is contained by the
//! supervisor (`supervisor.rs`); its waiting clients get a retriable error.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use raft::eraftpb::{Entry, Message, MessageType};
use raft::{RawNode, StateRole};
use tokio::sync::{oneshot, watch};

use crate::error::{BrokerError, Result};
use crate::metrics::Metrics;
use crate::replica::inbound;
use crate::replica::lost_entries::LostEntries;
use crate::replica::partition::{
    INBOX_DEPTH, MAX_REQUESTS_PER_ROUND, MAX_TICKS_PER_ROUND, MAX_WAIT_FOR_COMMIT_AFTER_STEP_DOWN, MAX_WAIT_FOR_LEADER,
    MAX_WAITING, OwnerContext, PREFERRED_LEADER_CHECK_TICKS, RAFT_TICK, REPLICA_LAG_TIME, not_leader_error,
};
use crate::replica::producers::PartitionProducers;
use crate::replica::proposal::{Acks, AppendOutcome, AppendRequest};
use crate::replica::raft_storage::{RaftLog, ReplicaError};
use crate::replica::ready::{ReadyHandler, handle, on_ready};
use crate::replica::stalled_snapshots::StalledSnapshots;
use crate::replica::status::{FollowerState, GroupStatus};
use crate::replica::supervisor::{self, Channels, Exit};
use crate::replica::tick::TickSchedule;
use crate::replica::transport::{GroupKey, Transport};

mod control;
mod idempotence;
mod in_memory;
use control::hold_off_campaign;

/// How often the offset of a far-behind follower's matched entry is looked up in the log.
const LAG_LOOKUP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A proposed request waiting for its entries to be persisted or committed.
#[derive(Debug)]
struct Pending {
    first: u64,
    last: u64,
    /// The offset of the request's first record when it is known already: a retried batch
    /// that was written before leads the request.
    base_offset: Option<u64>,
    /// The term the entries were proposed in: if the entry at `last` has another term, a new
    /// leader overwrote them and they are not this request's.
    term: u64,
    proposed_at: Instant,
    last_offset_delta: u32,
    acks: Acks,
    /// The produce stream's counter, for a numbered part (see [`StreamOrder`]).
    order: Option<Arc<AtomicU64>>,
    reply: oneshot::Sender<Result<AppendOutcome>>,
    /// The request's shares of byte budgets: the entries stay in memory (raft-rs's unstable
    /// log) until they are persisted, so they are returned with the answer.
    _shares: Vec<crate::byte_budget::Reservation>,
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

pub(crate) struct Owner {
    topic: String,
    index: i32,
    key: Arc<GroupKey>,
    raft: RaftLog,
    transport: Arc<Transport>,
    high_watermark: watch::Sender<u64>,
    status: watch::Sender<GroupStatus>,
    metrics: Arc<Metrics>,
    /// This topic's byte counters, taken once when the partition opened.
    traffic: crate::metrics::TopicTraffic,
    pending: VecDeque<Pending>,
    was_leader: bool,
    /// When this replica last stopped leading; see [`Owner::finish`].
    stepped_down: Option<Instant>,
    preferred: u64,
    ticks: u64,
    /// When each follower last matched the leader's whole log.
    caught_up: HashMap<u64, Instant>,
    /// Per follower far behind: its matched index, the offset after it, and when that was looked
    /// up in the log (see [`Owner::follower_offset`]).
    lag_offsets: HashMap<u64, (u64, u64, Instant)>,
    /// The voter a controlled shutdown last handed leadership to, and in which term.
    handing_to: Option<(u64, u64)>,
    /// Voters that were handed leadership and did not take it (they drain too, say).
    refused_handover: BTreeSet<u64>,
    /// Membership changes proposed here, waiting to commit.
    pending_changes: Vec<PendingChange>,
    /// Appends that arrived while no leader was known, in arrival order.
    waiting: VecDeque<(Instant, AppendRequest)>,
    /// Whether this replica lost entries it acknowledged (see `replica::lost_entries`).
    lost_entries: LostEntries,
    /// Followers waiting for a snapshot that may have been lost (see `replica::stalled_snapshots`).
    stalled_snapshots: StalledSnapshots,
    /// Idempotent producers' state; moved into the Ready job and back.
    producers: Option<PartitionProducers>,
    /// How long a producer may stay idle before its state is dropped.
    producer_expiration: std::time::Duration,
    /// Producers idle since this time (ms) are dropped in the next Ready job.
    expire_before: Option<i64>,
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
    producers: &'a mut PartitionProducers,
}

impl ReadyHandler for Outbox<'_> {
    fn send(&mut self, messages: Vec<Message>) {
        self.transport.send(self.key, messages);
    }

    fn snapshot_installed(&mut self, state: &[u8]) {
        self.producers.installed(state);
    }

    fn committed(&mut self, store: &RaftLog, entries: &[Entry]) -> Result<(), ReplicaError> {
        self.producers
            .apply_committed(store, entries)
            .map_err(|reason| ReplicaError::Inconsistent {
                dir: store.partition_log().dir().to_path_buf(),
                reason: format!("producer state: {reason}"),
            })
    }
}

impl Owner {
    pub(crate) fn new(cx: &OwnerContext, raft: RaftLog, preferred: u64, producers: PartitionProducers) -> Owner {
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
            traffic: cx.traffic.clone(),
            pending: VecDeque::new(),
            was_leader: false,
            stepped_down: None,
            preferred,
            ticks: 0,
            caught_up: HashMap::new(),
            lag_offsets: HashMap::new(),
            handing_to: None,
            refused_handover: BTreeSet::new(),
            pending_changes: Vec::new(),
            waiting: VecDeque::new(),
            lost_entries,
            stalled_snapshots: StalledSnapshots::default(),
            producers: Some(producers),
            producer_expiration: cx.producer_expiration,
            expire_before: None,
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
                if let Err(e) = inbound::step(&mut node, &mut self.lost_entries, m, self.transport.is_draining()) {
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
                if self.transport.is_draining() {
                    hold_off_campaign(&mut node);
                }
                node.tick();
                self.stalled_snapshots.on_tick(&mut node);
                self.ticks += 1;
                if self.ticks.is_multiple_of(PREFERRED_LEADER_CHECK_TICKS) {
                    self.restore_preferred_leader(&mut node);
                }
                if self.ticks.is_multiple_of(idempotence::EXPIRY_CHECK_TICKS) {
                    self.expiry_due();
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
            // Readies that only write to the page cache are handled here, one after another;
            // the first that needs the disk goes to the blocking pool with the node.
            let first = loop {
                match self.next_ready(&mut node) {
                    in_memory::Next::Nothing => break None,
                    in_memory::Next::Blocking(first) => break Some(first),
                    in_memory::Next::InMemory(ready) => {
                        let (started, waits) = (Instant::now(), crate::process_metrics::thread_waits());
                        let result = self.handle_in_memory(&mut node, *ready);
                        self.timed_in_memory(started.elapsed(), waits);
                        if let Err(e) = result {
                            let reason = format!("raft log write failed: {e}");
                            self.fail_everything(&reason);
                            return Exit::Failed(reason);
                        }
                    }
                }
            };
            let Some(first) = first else {
                self.finish(&node);
                self.publish_status(&node);
                continue;
            };
            self.metrics.readies_blocking.add(1);
            let transport = Arc::clone(&self.transport);
            let key = Arc::clone(&self.key);
            let Some(mut producers) = self.producers.take() else {
                let reason = "the producer state was lost by an earlier failed job".to_string();
                self.fail_everything(&reason);
                return Exit::Failed(reason);
            };
            let expire_before = self.expire_before.take();
            let (topic, index) = (self.topic.clone(), self.index);
            let job = tokio::task::spawn_blocking(move || {
                idempotence::expire(&mut producers, expire_before, &topic, index);
                let mut outbox = Outbox {
                    transport: &transport,
                    key: &key,
                    producers: &mut producers,
                };
                let result = (|| {
                    if let Some(ready) = first {
                        handle(&mut node, *ready, &mut outbox)?;
                    }
                    while on_ready(&mut node, &mut outbox)? {}
                    Ok::<_, crate::replica::raft_storage::ReplicaError>(())
                })();
                // A new leader learns what its log holds above the applied point here, off
                // the reactor, before it judges a batch.
                idempotence::build_pending(&node, &mut producers);
                (node, producers, result)
            });
            let (returned, producers, result) = match job.await {
                Ok(r) => r,
                Err(e) => {
                    // The node went down with the job: the supervisor reopens the replica.
                    let reason = format!("raft ready processing panicked: {e}");
                    self.fail_everything(&reason);
                    return Exit::Failed(reason);
                }
            };
            node = returned;
            self.producers = Some(producers);
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
        self.snapshot_producers(&node).await;
        tracing::debug!(topic = %self.topic, partition = self.index, "partition owner stopped");
        Exit::Stopped
    }

    /// Handles a Ready that only writes to the page cache, on this task (see `in_memory`).
    fn handle_in_memory(
        &mut self,
        node: &mut RawNode<RaftLog>,
        ready: raft::Ready,
    ) -> std::result::Result<(), ReplicaError> {
        let Some(producers) = self.producers.as_mut() else {
            return Err(ReplicaError::Inconsistent {
                dir: self.raft.partition_log().dir().to_path_buf(),
                reason: "the producer state was lost by an earlier failed job".into(),
            });
        };
        let mut outbox = Outbox {
            transport: &self.transport,
            key: &self.key,
            producers,
        };
        handle(node, ready, &mut outbox)
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
    /// leader known), while this leader hands leadership over (raft-rs drops proposals
    /// then), or while a new leader's Ready job is about to read its log's unapplied tail for
    /// the producer state (off the reactor: requests are judged after it). Refusing one
    /// request and accepting the next once things settle would let a client's retry land
    /// after later records of the same partition.
    fn must_hold(&self, node: &RawNode<RaftLog>) -> bool {
        match node.raft.state {
            StateRole::Leader => {
                node.raft.lead_transferee.is_some()
                    || (node.has_ready() && self.producers.as_ref().is_some_and(|p| p.needs_pending(node.raft.term)))
            }
            _ => node.raft.leader_id == 0,
        }
    }

    /// Proposes a request's batches, one entry each, in one step: all of them or none.
    fn propose(&mut self, node: &mut RawNode<RaftLog>, request: AppendRequest) {
        if self.must_hold(node) && self.waiting.len() < MAX_WAITING {
            self.waiting.push_back((Instant::now(), request));
            return;
        }
        if node.raft.state != StateRole::Leader
            || node.raft.lead_transferee.is_some()
            || request.term.is_some_and(|t| t != node.raft.term)
        {
            drop(request.reply.send(Err(self.not_leader(node))));
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
        let Some((request, duplicates, idempotent)) = self.judge(node, request) else {
            return;
        };
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
        let term = node.raft.term;
        if let Some(producers) = self.producers.as_mut() {
            producers.proposed(&idempotent, &request.batches, first, term);
        }
        let (first, base_offset) = idempotence::request_start(first, &duplicates);
        // Traffic counters are about clients' data; the controller's records are not.
        if self.key.topic != crate::replica::transport::CONTROLLER_TOPIC {
            for batch in &request.batches {
                self.traffic.bytes_in.add(batch.bytes().len() as u64);
                self.metrics.records_in.add(u64::from(batch.header().record_count));
            }
        }
        self.pending.push_back(Pending {
            first,
            last: node.raft.raft_log.last_index(),
            base_offset,
            term,
            proposed_at: Instant::now(),
            last_offset_delta,
            acks: request.acks,
            order: request.order.map(|o| o.next),
            reply: request.reply,
            _shares: request.shares,
        });
    }

    /// Proposes, in order, the appends held for a leader once one is known (refusing them
    /// with its name if it is another replica), and refuses those held too long.
    fn release_waiting(&mut self, node: &mut RawNode<RaftLog>) {
        if self.waiting.is_empty() {
            return;
        }
        if !self.must_hold(node) {
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
                drop(request.reply.send(Err(self.not_leader(node))));
            }
        }
    }

    /// The refusal for a request this replica cannot serve, naming the leader the node knows
    /// of now: the published status lags behind a step that just made another replica leader
    /// (a hand-over completing), and would name this one.
    fn not_leader(&self, node: &RawNode<RaftLog>) -> BrokerError {
        let leader = u32::try_from(node.raft.leader_id).unwrap_or(0);
        not_leader_error(&self.transport, &self.topic, self.index, leader)
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
                let reached = self.follower_offset(id, progress.matched, now);
                followers.push(FollowerState {
                    id: u32::try_from(id).unwrap_or(0),
                    lag: end.saturating_sub(reached),
                    reached,
                    in_sync,
                });
            }
            followers.sort_by_key(|f| f.id);
            self.lag_offsets.retain(|id, _| node.raft.prs().get(*id).is_some());
        } else {
            self.caught_up.clear();
            self.lag_offsets.clear();
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

    /// The offset after follower `id`'s matched entry, for its lag. This runs on every round,
    /// on the reactor: for a follower more than
    /// [`TAIL_OFFSETS`](crate::replica::raft_storage::TAIL_OFFSETS) entries behind, the offset
    /// takes a lookup in the log (tens of reads), so it is remembered, and looked up again at
    /// most once per [`LAG_LOOKUP_INTERVAL`] while the follower moves (its lag reads high
    /// meanwhile).
    fn follower_offset(&mut self, id: u64, matched: u64, now: Instant) -> u64 {
        if let Some(offset) = self.raft.known_offset_after(matched) {
            self.lag_offsets.remove(&id);
            return offset;
        }
        match self.lag_offsets.get(&id) {
            // A cached offset of a higher match than now (the follower lost entries) is not
            // used: the offset it reached must never be overstated (see `crate::cleaner`).
            Some(&(m, offset, at))
                if m == matched || (m <= matched && now.duration_since(at) < LAG_LOOKUP_INTERVAL) =>
            {
                offset
            }
            _ => {
                let offset = self.raft.offset_after(matched);
                self.lag_offsets.insert(id, (matched, offset, now));
                offset
            }
        }
    }

    /// Answers requests whose entries are persisted (acks=leader) or committed (acks=all),
    /// and moves the high watermark to the end of what is committed.
    fn finish(&mut self, node: &RawNode<RaftLog>) {
        let persisted = node.raft.raft_log.persisted;
        let committed = node.raft.raft_log.committed;
        let leader = node.raft.state == StateRole::Leader;
        if let Some(producers) = self.producers.as_mut() {
            if !leader {
                producers.clear_pending();
            }
            producers.fold(node.raft.raft_log.applied);
        }
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
                p.fail(self.not_leader(node));
            } else if done {
                if p.acks == Acks::All {
                    self.metrics.commit_latency.observe(p.proposed_at.elapsed());
                }
                let base = p.base_offset.or_else(|| self.raft.offset_of(p.first));
                let outcome = match (base, self.raft.offset_of(p.last)) {
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
                p.fail(self.not_leader(node));
            } else {
                still.push_back(p);
            }
        }
        self.pending = still;
        for p in std::mem::take(&mut self.pending_changes) {
            if committed >= p.index {
                let ours = node.raft.raft_log.term(p.index).is_ok_and(|t| t == p.term);
                drop(p.reply.send(if ours { Ok(()) } else { Err(self.not_leader(node)) }));
            } else if !leader {
                drop(p.reply.send(Err(self.not_leader(node))));
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

/// An owner of partition "t"/0 on `raft`, with a transport that reaches no peer and no
/// producer state, for tests (within a Tokio runtime).
#[cfg(test)]
fn test_owner(raft: RaftLog) -> Owner {
    let metrics = Arc::new(Metrics::default());
    let transport = Transport::start(
        1,
        "127.0.0.1:1".into(),
        &std::collections::BTreeMap::new(),
        16,
        Arc::clone(&metrics),
    )
    .expect("transport");
    let cx = OwnerContext {
        failed: Arc::default(),
        topic: "t".into(),
        index: 0,
        key: Arc::new(GroupKey::new("t", 0)),
        transport,
        high_watermark: watch::channel(0).0,
        status: watch::channel(GroupStatus::default()).0,
        traffic: metrics.topic_traffic("t"),
        metrics,
        producer_expiration: std::time::Duration::from_secs(60),
    };
    Owner::new(
        &cx,
        raft,
        1,
        PartitionProducers::none(Arc::default(), Default::default()),
    )
}

#[cfg(test)]
mod tests {
    use std::panic::AssertUnwindSafe;

    use conveyor_storage::{LogConfig, PartitionLog};

    use super::*;

    #[tokio::test]
    async fn an_owner_unwinding_from_a_panic_answers_its_waiting_clients_with_a_retriable_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(PartitionLog::open(dir.path(), LogConfig::default()).expect("log"));
        let raft = RaftLog::open(log).expect("raft log");
        let mut owner = test_owner(raft);
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            batches: Vec::new(),
            acks: Acks::All,
            order: None,
            reply,
            shares: Vec::new(),
            term: None,
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

    /// A follower of a three-voter group, with its log on `dir`, as the broker configures it.
    fn follower(dir: &std::path::Path) -> RawNode<RaftLog> {
        let log = Arc::new(PartitionLog::open(dir, LogConfig::default()).expect("log"));
        let raft = RaftLog::open(log).expect("raft log");
        let conf = raft::eraftpb::ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        raft.set_conf_state(&conf).expect("conf state");
        let config = raft::Config {
            id: 1,
            election_tick: crate::replica::partition::ELECTION_TICKS,
            heartbeat_tick: crate::replica::partition::HEARTBEAT_TICKS,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        RawNode::new(&config, raft, &logger).expect("node")
    }

    #[test]
    fn a_follower_of_a_draining_broker_never_campaigns_but_its_leader_lease_still_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut node = follower(dir.path());
        for _ in 0..10 * crate::replica::partition::ELECTION_TICKS {
            hold_off_campaign(&mut node);
            node.tick();
            assert_eq!(node.raft.state, StateRole::Follower, "campaigned while draining");
        }
        assert!(
            node.raft.election_elapsed >= node.raft.election_timeout(),
            "a follower that hears nothing must leave its leader lease, so that it votes: {}",
            node.raft.election_elapsed
        );
        // Without the hold the same follower campaigns within the longest timeout.
        let other = tempfile::tempdir().expect("tempdir");
        let mut node = follower(other.path());
        let campaigned = (0..2 * crate::replica::partition::ELECTION_TICKS).any(|_| {
            node.tick();
            node.raft.state != StateRole::Follower
        });
        assert!(campaigned);
    }

    #[test]
    fn a_draining_replica_drops_a_leaders_hand_over_and_does_not_campaign() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut node = follower(dir.path());
        let log = node.store().clone();
        let mut lost = LostEntries::new("t", 0, &log);
        let mut timeout_now = Message::default();
        timeout_now.set_msg_type(MessageType::MsgTimeoutNow);
        timeout_now.from = 2;
        timeout_now.to = 1;
        inbound::step(&mut node, &mut lost, timeout_now.clone(), true).expect("step");
        assert_eq!(node.raft.state, StateRole::Follower);
        inbound::step(&mut node, &mut lost, timeout_now, false).expect("step");
        assert_ne!(
            node.raft.state,
            StateRole::Follower,
            "without draining the hand-over starts an election"
        );
    }
}
