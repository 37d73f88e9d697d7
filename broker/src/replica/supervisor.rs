//! Supervising a partition's owner task: a replica that fails is reported, stops claiming
//! leadership, and is reopened from its log.
//!
//! The owner ([`crate::partition`]) stops when a Ready cannot be persisted, when it finds its
//! log poisoned (a failed flush, damage found by a scrub), or when it panics. The supervisor
//! runs it so that a panic is caught like any other failure, then:
//! - publishes a status naming no leader and carrying the reason, so metadata, fetch and
//!   `topic describe` stop naming this replica (a stopped owner sends no heartbeats either,
//!   so the other replicas elect a new leader);
//! - counts the failure (`conveyor_partition_failures_total`) and logs it as an error;
//! - answers appends and membership changes with a retriable error that sends clients to
//!   another replica: `NOT_LEADER` naming the leader once a peer's append or heartbeat
//!   reveals one, else [`BrokerError::ReplicaStopped`]; peers' Raft messages are dropped;
//! - after a backoff (1 s, doubling to 30 s while restarts keep failing or the reopened
//!   replica fails again soon) reopens the replica the way the broker opens it at start:
//!   a new [`PartitionLog`] on the same directory, through recovery, and a new Raft node over
//!   it. Nothing is retried over a write that may have been lost.
//!
//! # Invariants
//! - While stopped, the published status never names this replica as leader (only a peer
//!   whose messages show it leads), and `failure` is set.
//! - Readers see the reopened log as soon as the owner over it starts: [`ReplicaFiles`] is
//!   swapped before the new owner runs. A read that started on the old log finishes on it;
//!   below the high watermark both hold the same bytes (recovery only drops an unsynced tail,
//!   which was never committed).
//!
//! # Crash behaviour
//! Nothing here writes to disk; a broker that dies while a replica is stopped recovers it at
//! its next start as it would any other.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use conveyor_storage::PartitionLog;
use futures::FutureExt as _;
use raft::RawNode;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::raft_storage::RaftLog;
use crate::error::BrokerError;
use crate::partition::{
    AppendRequest, Control, OpenContext, Opened, Owner, OwnerContext, not_leader_error, open_replica,
};

/// Wait before the first restart of a failed replica.
const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
/// The longest wait between restarts of a replica that keeps failing.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// A replica that ran this long before failing starts over from the first delay.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// The log and Raft view a partition serves from; a restart swaps in reopened ones.
#[derive(Debug)]
pub struct ReplicaFiles {
    pub log: Arc<PartitionLog>,
    pub raft: RaftLog,
}

/// Where the owner's inputs arrive; they outlive each owner so that a restart loses none of
/// the partition's senders (the mailbox, the transport's route, the control channel).
#[derive(Debug)]
pub(crate) struct Channels {
    pub(crate) requests: mpsc::Receiver<AppendRequest>,
    pub(crate) inbox: mpsc::Receiver<Message>,
    pub(crate) control: mpsc::Receiver<Control>,
}

/// How an owner ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The partition is being closed: its mailbox was closed and drained.
    Stopped,
    /// The replica cannot go on; the reason, for people.
    Failed(String),
}

/// What a restart needs besides the directory and config of the running log.
#[derive(Debug, Clone)]
pub struct Restart {
    pub initial_voters: Vec<u32>,
    /// The replica that should lead, as last told.
    pub preferred: u32,
}

/// The retriable error for a request to a replica that is stopped after a failure.
pub fn replica_stopped(topic: &str, partition: i32, reason: &str) -> BrokerError {
    BrokerError::ReplicaStopped {
        topic: topic.to_string(),
        partition,
        reason: reason.to_string(),
    }
}

/// One supervised replica, as the supervision loop sees it.
pub(crate) trait Replica: Send {
    /// Runs an owner until it stops or fails. May panic.
    fn run(&mut self) -> impl Future<Output = Exit> + Send;
    /// Marks the replica stopped: status, metrics, log.
    fn failed(&mut self, reason: &str);
    /// Answers for the stopped replica for `delay`; false once the partition is closing.
    fn stand_by(&mut self, delay: Duration) -> impl Future<Output = bool> + Send;
    /// Reopens the replica from disk, ready to [`run`](Self::run) again.
    fn restart(&mut self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Runs `replica` until its partition closes, restarting it after failures and panics.
pub(crate) async fn supervise(mut replica: impl Replica) {
    let mut delay = FIRST_RESTART_DELAY;
    loop {
        let started = Instant::now();
        let reason = match AssertUnwindSafe(replica.run()).catch_unwind().await {
            Ok(Exit::Stopped) => return,
            Ok(Exit::Failed(reason)) => reason,
            Err(panic) => format!("the partition task panicked: {}", panic_message(panic.as_ref())),
        };
        if started.elapsed() >= HEALTHY_RUN {
            delay = FIRST_RESTART_DELAY;
        }
        replica.failed(&reason);
        loop {
            if !replica.stand_by(delay).await {
                return;
            }
            delay = (delay * 2).min(MAX_RESTART_DELAY);
            match replica.restart().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "reopening a failed partition replica failed");
                }
            }
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// A partition's replica: its owner, and what is needed to reopen it.
pub(crate) struct PartitionReplica {
    ctx: OpenContext,
    owner_cx: OwnerContext,
    files: Arc<RwLock<ReplicaFiles>>,
    channels: Channels,
    restart: Restart,
    next: Option<(Owner, RawNode<RaftLog>)>,
}

impl PartitionReplica {
    pub fn new(
        ctx: OpenContext,
        owner_cx: OwnerContext,
        files: Arc<RwLock<ReplicaFiles>>,
        channels: Channels,
        restart: Restart,
        owner: Owner,
        node: RawNode<RaftLog>,
    ) -> PartitionReplica {
        PartitionReplica {
            ctx,
            owner_cx,
            files,
            channels,
            restart,
            next: Some((owner, node)),
        }
    }

    /// The answer for a request to the stopped replica: where the leader is, once this
    /// replica has heard from one, so that clients go there.
    fn error(&self, reason: &str) -> BrokerError {
        let cx = &self.owner_cx;
        let leader = cx.status.borrow().leader;
        if leader != 0 && leader != cx.transport.node_id() {
            return not_leader_error(&cx.transport, &cx.topic, cx.index, leader);
        }
        replica_stopped(&cx.topic, cx.index, reason)
    }

    /// Notes the leader a peer's message reveals: only a leader sends appends, heartbeats
    /// and snapshots, and a newer term overrides an older one. The message itself is dropped
    /// (Raft resends what matters once the replica is back).
    fn learn_leader(&self, message: &Message) {
        use raft::eraftpb::MessageType::{MsgAppend, MsgHeartbeat, MsgSnapshot};
        if !matches!(message.get_msg_type(), MsgAppend | MsgHeartbeat | MsgSnapshot) {
            return;
        }
        let Ok(from) = u32::try_from(message.from) else {
            return;
        };
        self.owner_cx.status.send_if_modified(|status| {
            let newer = message.term > status.term || (message.term == status.term && status.leader == 0);
            if newer {
                status.leader = from;
                status.term = message.term;
            }
            newer
        });
    }

    fn current_log(&self) -> Arc<PartitionLog> {
        Arc::clone(&self.files.read().unwrap_or_else(std::sync::PoisonError::into_inner).log)
    }
}

impl Replica for PartitionReplica {
    async fn run(&mut self) -> Exit {
        match self.next.take() {
            Some((owner, node)) => owner.run(&mut self.channels, node).await,
            None => Exit::Failed("no reopened replica to run".into()),
        }
    }

    fn failed(&mut self, reason: &str) {
        let cx = &self.owner_cx;
        tracing::error!(topic = %cx.topic, partition = cx.index, reason, "partition replica stopped; it no longer leads or votes here and is reopened from its log");
        cx.metrics.partition_failures.add(1);
        *cx.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.to_string());
        cx.status.send_modify(|status| {
            status.leader = 0;
            status.followers.clear();
            status.failure = Some(reason.to_string());
        });
    }

    async fn stand_by(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        let reason = self.owner_cx.status.borrow().failure.clone().unwrap_or_default();
        loop {
            tokio::select! {
                next = self.channels.requests.recv() => match next {
                    Some(request) => drop(request.reply.send(Err(self.error(&reason)))),
                    None => return false,
                },
                Some(message) = self.channels.inbox.recv() => self.learn_leader(&message),
                Some(command) = self.channels.control.recv() => match command {
                    Control::SetPreferred(id) => {
                        self.restart.preferred = u32::try_from(id).unwrap_or(self.restart.preferred);
                    }
                    Control::TransferLeader(_) => {}
                    Control::Membership(_, reply) => drop(reply.send(Err(self.error(&reason)))),
                },
                () = tokio::time::sleep_until(until) => return true,
            }
        }
    }

    async fn restart(&mut self) -> Result<(), String> {
        let old = self.current_log();
        let (config, dir) = (old.config(), old.dir().to_path_buf());
        let (ctx, restart) = (self.ctx.clone(), self.restart.clone());
        let (topic, index) = (self.owner_cx.topic.clone(), self.owner_cx.index);
        let opened = tokio::task::spawn_blocking(move || {
            open_replica(
                &ctx,
                &topic,
                index,
                &dir,
                config,
                &restart.initial_voters,
                restart.preferred,
            )
        })
        .await
        .map_err(|e| format!("reopening panicked: {e}"))?
        .map_err(|e| e.to_string())?;
        let Opened { log, raft, node } = opened;
        let owner = Owner::new(&self.owner_cx, raft.clone(), u64::from(self.restart.preferred));
        *self.files.write().unwrap_or_else(std::sync::PoisonError::into_inner) = ReplicaFiles { log, raft };
        self.next = Some((owner, node));
        let cx = &self.owner_cx;
        *cx.failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        cx.status.send_modify(|status| status.failure = None);
        tracing::info!(topic = %cx.topic, partition = cx.index, "partition replica reopened from its log after a failure");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A replica whose runs follow a script; it records what the supervisor did.
    struct Scripted {
        runs: Vec<Box<dyn FnOnce() -> Exit + Send>>,
        events: Arc<Mutex<Vec<String>>>,
        restarts_failing: u32,
    }

    impl Scripted {
        fn log(&self, event: String) {
            self.events.lock().expect("lock").push(event);
        }
    }

    impl Replica for Scripted {
        async fn run(&mut self) -> Exit {
            self.log("run".into());
            let step = self.runs.remove(0);
            step()
        }
        fn failed(&mut self, reason: &str) {
            self.log(format!("failed: {reason}"));
        }
        async fn stand_by(&mut self, delay: Duration) -> bool {
            self.log(format!("stand by {delay:?}"));
            true
        }
        async fn restart(&mut self) -> Result<(), String> {
            if self.restarts_failing > 0 {
                self.restarts_failing -= 1;
                self.log("restart failed".into());
                return Err("disk still full".into());
            }
            self.log("restarted".into());
            Ok(())
        }
    }

    fn scripted(
        runs: Vec<Box<dyn FnOnce() -> Exit + Send>>,
        restarts_failing: u32,
    ) -> (Scripted, Arc<Mutex<Vec<String>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let replica = Scripted {
            runs,
            events: Arc::clone(&events),
            restarts_failing,
        };
        (replica, events)
    }

    #[tokio::test]
    async fn a_panicking_owner_is_reported_and_restarted_instead_of_left_dead() {
        let (replica, events) = scripted(
            vec![
                Box::new(|| panic!("injected fault in the owner")),
                Box::new(|| Exit::Stopped),
            ],
            0,
        );
        supervise(replica).await;
        assert_eq!(
            *events.lock().expect("lock"),
            [
                "run",
                "failed: the partition task panicked: injected fault in the owner",
                "stand by 1s",
                "restarted",
                "run",
            ]
        );
    }

    #[tokio::test]
    async fn a_restart_that_fails_is_tried_again_until_it_succeeds() {
        let (replica, events) = scripted(
            vec![
                Box::new(|| Exit::Failed("raft log write failed: file too large".into())),
                Box::new(|| Exit::Stopped),
            ],
            2,
        );
        supervise(replica).await;
        assert_eq!(
            *events.lock().expect("lock"),
            [
                "run",
                "failed: raft log write failed: file too large",
                "stand by 1s",
                "restart failed",
                "stand by 2s",
                "restart failed",
                "stand by 4s",
                "restarted",
                "run",
            ]
        );
    }

    #[test]
    fn the_error_for_a_stopped_replica_is_retriable_and_not_internal() {
        let detail = replica_stopped("t", 0, "raft log write failed").detail();
        assert!(detail.retriable);
        assert_eq!(detail.code, conveyor_proto::v1::ErrorCode::LeaderNotAvailable as i32);
        assert_eq!((detail.topic.as_str(), detail.partition), ("t", 0));
    }
}
