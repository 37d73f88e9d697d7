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
//! # Invariants
//! The high watermark is the offset after the last committed entry: it only moves forward,
//! and a consumer never sees a record that is not committed (and, under flush policy
//! `always`, fsynced).

use std::collections::VecDeque;
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
use crate::replica::raft_storage::RaftLog;
use crate::replica::ready::{ReadyHandler, on_ready};

/// Most requests one owner round proposes before it processes a Ready.
const MAX_REQUESTS_PER_ROUND: usize = 512;
/// Raft logical clock: elections after 10 ticks without a leader, heartbeats every 3.
const RAFT_TICK: Duration = Duration::from_millis(100);
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 3;

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
    pub reply: oneshot::Sender<Result<AppendOutcome>>,
}

/// What opening a partition needs besides its name and directory.
#[derive(Debug, Clone)]
pub struct OpenContext {
    pub node_id: u64,
    pub queue_depth: usize,
    pub metrics: Arc<Metrics>,
    pub runtime: tokio::runtime::Handle,
}

#[derive(Debug)]
pub struct Partition {
    pub topic: String,
    pub index: i32,
    pub log: Arc<PartitionLog>,
    raft: RaftLog,
    mailbox: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    high_watermark: watch::Receiver<u64>,
    owner: Mutex<Option<JoinHandle<()>>>,
    /// Set when the Raft log could not be written: the partition takes no more appends
    /// until the broker restarts and recovers it.
    failed: Arc<Mutex<Option<String>>>,
}

fn raft_logger() -> slog::Logger {
    slog::Logger::root(tracing_slog::TracingSlogDrain, slog::o!())
}

impl Partition {
    /// Opens (or creates) the log, starts its Raft group and the owner task. Blocking: call
    /// off the reactor.
    pub fn open(
        ctx: &OpenContext,
        topic: &str,
        index: i32,
        dir: &std::path::Path,
        config: LogConfig,
    ) -> Result<Arc<Partition>> {
        let storage_error = |e: crate::replica::raft_storage::ReplicaError| {
            BrokerError::Internal(format!("topic '{topic}' partition {index}: {e}"))
        };
        let log = Arc::new(PartitionLog::open(dir, config).map_err(|e| BrokerError::from_log(topic, index, e))?);
        let raft = RaftLog::open(Arc::clone(&log)).map_err(storage_error)?;
        if raft.voters().is_empty() {
            // A new partition on a single node: a group of one.
            let conf = ConfState {
                voters: vec![ctx.node_id],
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
        if raft.voters() == [ctx.node_id] {
            // Alone in its group: no reason to wait for an election timeout.
            node.campaign().map_err(|e| BrokerError::Internal(e.to_string()))?;
        }
        let (hw_tx, hw_rx) = watch::channel(raft.offset_after(state.hard_state.commit));
        let (tx, rx) = mpsc::channel(ctx.queue_depth);
        let failed = Arc::new(Mutex::new(None));
        let owner = Owner {
            failed: Arc::clone(&failed),
            topic: topic.to_string(),
            index,
            raft: raft.clone(),
            high_watermark: hw_tx,
            metrics: Arc::clone(&ctx.metrics),
            pending: VecDeque::new(),
            was_leader: false,
        };
        let handle = ctx.runtime.spawn(owner.run(rx, node));
        Ok(Arc::new(Partition {
            topic: topic.to_string(),
            index,
            log,
            raft,
            mailbox: Mutex::new(Some(tx)),
            high_watermark: hw_rx,
            owner: Mutex::new(Some(handle)),
            failed,
        }))
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
    ) -> Result<oneshot::Receiver<Result<AppendOutcome>>> {
        let (reply, rx) = oneshot::channel();
        if let Err(_closed) = self.sender()?.send(AppendRequest { batches, acks, reply }).await {
            return Err(self.failure().unwrap_or(BrokerError::ShuttingDown));
        }
        Ok(rx)
    }

    /// Why the partition stopped taking appends, if it failed.
    fn failure(&self) -> Option<BrokerError> {
        let reason = self
            .failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        Some(BrokerError::Internal(format!(
            "topic '{}' partition {} stopped after a storage failure ({reason}); restart the broker to recover it",
            self.topic, self.index
        )))
    }

    /// Applies retention without losing what Raft needs (only committed entries go).
    /// Blocking.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<usize> {
        self.raft.compact(now_ms).map_err(|e| {
            BrokerError::Internal(format!(
                "topic '{}' partition {}: retention: {e}",
                self.topic, self.index
            ))
        })
    }

    /// Stops taking appends, lets the owner finish what is queued, and waits for it.
    pub async fn stop(&self) {
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
        self.log
            .close()
            .map_err(|e| BrokerError::from_log(&self.topic, self.index, e))?;
        self.raft
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
    reply: oneshot::Sender<Result<AppendOutcome>>,
}

struct Owner {
    failed: Arc<Mutex<Option<String>>>,
    topic: String,
    index: i32,
    raft: RaftLog,
    high_watermark: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    pending: VecDeque<Pending>,
    was_leader: bool,
}

/// Collects the messages a Ready produced. Peers arrive with the transport; a group of one
/// sends nothing. Commits are read from the node itself in [`Owner::finish`].
#[derive(Debug, Default)]
struct Collected {
    messages: Vec<Message>,
}

impl ReadyHandler for Collected {
    fn send(&mut self, messages: Vec<Message>) {
        self.messages.extend(messages);
    }
    fn committed(&mut self, _index: u64) {}
}

impl Owner {
    async fn run(mut self, mut rx: mpsc::Receiver<AppendRequest>, mut node: RawNode<RaftLog>) {
        let mut ticker = tokio::time::interval(RAFT_TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        while open || node.has_ready() {
            let mut requests = Vec::new();
            let mut tick = false;
            if open {
                tokio::select! {
                    biased;
                    next = rx.recv() => match next {
                        Some(r) => requests.push(r),
                        None => open = false,
                    },
                    _ = ticker.tick() => tick = true,
                }
                while open && requests.len() < MAX_REQUESTS_PER_ROUND {
                    match rx.try_recv() {
                        Ok(r) => requests.push(r),
                        Err(_) => break,
                    }
                }
            }
            for request in requests {
                self.propose(&mut node, request);
            }
            if tick {
                node.tick();
            }
            if !node.has_ready() {
                continue;
            }
            let started = Instant::now();
            let job = tokio::task::spawn_blocking(move || {
                let mut collected = Collected::default();
                let result = (|| {
                    while on_ready(&mut node, &mut collected)? {}
                    Ok::<_, crate::replica::raft_storage::ReplicaError>(())
                })();
                (node, collected, result)
            });
            let (returned, collected, result) = match job.await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(topic = %self.topic, partition = self.index, error = %e, "raft ready processing panicked");
                    *self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(format!("internal panic: {e}"));
                    return;
                }
            };
            node = returned;
            self.metrics.fsync_latency.observe(started.elapsed());
            if !collected.messages.is_empty() {
                tracing::debug!(
                    count = collected.messages.len(),
                    "raft messages without a transport dropped"
                );
            }
            match result {
                Ok(()) => self.finish(&node),
                Err(e) => {
                    // A Ready that could not be persisted leaves the node unusable: stop here
                    // rather than retry over a log in an unknown state.
                    tracing::error!(topic = %self.topic, partition = self.index, error = %e, "raft log write failed; partition stopped");
                    let reason = e.to_string();
                    *self.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.clone());
                    let error = || BrokerError::Internal(format!("raft log write failed: {reason}"));
                    self.fail_all(error);
                    rx.close();
                    while let Some(r) = rx.recv().await {
                        drop(r.reply.send(Err(error())));
                    }
                    return;
                }
            }
        }
        tracing::debug!(topic = %self.topic, partition = self.index, "partition owner stopped");
    }

    /// Proposes a request's batches, one entry each, in one step: all of them or none.
    fn propose(&mut self, node: &mut RawNode<RaftLog>, request: AppendRequest) {
        if node.raft.state != StateRole::Leader {
            drop(request.reply.send(Err(self.not_leader())));
            return;
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
            let error = BrokerError::Internal(format!("proposal refused: {e}"));
            drop(request.reply.send(Err(error)));
            return;
        }
        for batch in &request.batches {
            self.metrics.bytes_in.add(batch.bytes().len() as u64);
            self.metrics.records_in.add(u64::from(batch.header().record_count));
        }
        self.pending.push_back(Pending {
            first,
            last: node.raft.raft_log.last_index(),
            term: node.raft.term,
            proposed_at: Instant::now(),
            last_offset_delta,
            acks: request.acks,
            reply: request.reply,
        });
    }

    fn not_leader(&self) -> BrokerError {
        BrokerError::LeaderNotAvailable {
            topic: self.topic.clone(),
            partition: self.index,
        }
    }

    /// Answers requests whose entries are persisted (acks=leader) or committed (acks=all),
    /// and moves the high watermark to the end of what is committed.
    fn finish(&mut self, node: &RawNode<RaftLog>) {
        let persisted = node.raft.raft_log.persisted;
        let committed = node.raft.raft_log.committed;
        let leader = node.raft.state == StateRole::Leader;
        if leader != self.was_leader {
            self.was_leader = leader;
            self.metrics.leader_changes.add(1);
            tracing::info!(topic = %self.topic, partition = self.index, leader, term = node.raft.term, "raft leadership changed");
        }
        let mut still = VecDeque::new();
        while let Some(p) = self.pending.pop_front() {
            let done = match p.acks {
                Acks::All => committed >= p.last,
                Acks::Leader | Acks::None => persisted >= p.last,
            };
            let ours = node.raft.raft_log.term(p.last).is_ok_and(|t| t == p.term);
            if done && !ours {
                drop(p.reply.send(Err(self.not_leader())));
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
            } else if !leader {
                drop(p.reply.send(Err(self.not_leader())));
            } else {
                still.push_back(p);
            }
        }
        self.pending = still;
        let hw = self.raft.offset_after(committed);
        self.high_watermark.send_if_modified(|current| {
            let moved = hw > *current;
            *current = (*current).max(hw);
            moved
        });
    }

    fn fail_all(&mut self, error: impl Fn() -> BrokerError) {
        for p in self.pending.drain(..) {
            drop(p.reply.send(Err(error())));
        }
    }
}
