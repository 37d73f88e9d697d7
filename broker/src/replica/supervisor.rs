//! Supervising a partition's owner task: a replica that fails is reported, stops claiming
//! leadership, and is reopened from its log.
//!
//! The owner ([`crate::replica::owner`]) stops when a Ready cannot be persisted, when it
//! finds its log poisoned (a failed flush, damage found by a scrub), or when it panics. The
//! supervisor runs it so that a panic is caught like any other failure, then:
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
//! - Nothing changes the directory through retired objects: a reopening retires the old
//!   [`PartitionLog`] and [`RaftLog`] (they refuse appends, deletions, scrub steps and
//!   `raft-state` writes) under the exclusive generation lock of [`SharedFiles`] before it
//!   opens the new ones; retention, scrub steps and config changes run under it shared.
//!
//! # Crash behaviour
//! The only write here is a reopening's: it stores the old Raft view's state (its commit
//! index is otherwise stored lazily) before retiring it. A broker that dies while a replica
//! is stopped recovers it at its next start as it would any other.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, PoisonError, RwLock, TryLockError};
use std::time::Duration;

use conveyor_storage::PartitionLog;
use futures::FutureExt as _;
use raft::RawNode;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::raft_storage::RaftLog;
use crate::error::BrokerError;
use crate::replica::owner::Owner;
use crate::replica::partition::{OpenContext, Opened, OwnerContext, not_leader_error, open_replica};
use crate::replica::proposal::{AppendRequest, Control};
use crate::replica::transport::Transport;

/// Wait before the first restart of a failed replica.
const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
/// The longest wait between restarts of a replica that keeps failing.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// A replica that ran this long before failing starts over from the first delay.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// The log and Raft view a partition serves from; a restart swaps in reopened ones.
#[derive(Debug, Clone)]
pub struct ReplicaFiles {
    pub log: Arc<PartitionLog>,
    pub raft: RaftLog,
}

/// A partition's current [`ReplicaFiles`] and the lock that orders every change to its
/// directory made outside the owner against a reopening.
///
/// A task that changes the directory through the files it took (retention, a scrub step, a
/// config change) does so inside [`maintain`](Self::maintain), which holds the generation
/// lock shared; [`reopen`](Self::reopen) holds it exclusively while it retires the old
/// objects, opens the new ones and swaps them in. So no such task runs on the old objects
/// once a reopening started, and each that runs after it sees the new ones. Readers take
/// [`current`](Self::current) and need no generation lock: a retired log still reads.
#[derive(Debug)]
pub struct SharedFiles {
    current: RwLock<ReplicaFiles>,
    generation: RwLock<()>,
    /// How many `maintain` calls found a reopening or retirement under way and waited: lets
    /// a test release a reopening only once a task is known to wait for it.
    #[cfg(test)]
    waited: std::sync::atomic::AtomicUsize,
}

impl SharedFiles {
    pub fn new(files: ReplicaFiles) -> SharedFiles {
        SharedFiles {
            current: RwLock::new(files),
            generation: RwLock::new(()),
            #[cfg(test)]
            waited: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// The files in use now.
    pub fn current(&self) -> ReplicaFiles {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The log in use now: what every read needs, without copying the Raft view.
    pub fn log(&self) -> Arc<PartitionLog> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner).log)
    }

    /// Whether the replica in use now is recovering lost entries.
    pub fn is_recovering(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .raft
            .recovering()
            .is_some()
    }

    /// Runs `f` on the current files, with no reopening or retirement under way until it
    /// returns. Blocking: waits for a reopening to finish.
    pub fn maintain<T>(&self, f: impl FnOnce(&ReplicaFiles) -> T) -> T {
        let _generation = match self.generation.try_read() {
            Ok(shared) => shared,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                #[cfg(test)]
                self.waited.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.generation.read().unwrap_or_else(PoisonError::into_inner)
            }
        };
        f(&self.current())
    }

    /// Retires the current files, then swaps in what `open` makes of the directory (it gets
    /// the retired files, to read their directory and config). A failed `open` leaves the
    /// retired files current; they are reopened by the next try. Blocking.
    pub fn reopen<T, E>(&self, open: impl FnOnce(&ReplicaFiles) -> Result<(ReplicaFiles, T), E>) -> Result<T, E> {
        let _generation = self.generation.write().unwrap_or_else(PoisonError::into_inner);
        let old = self.current();
        // The old view may hold a newer commit index than `raft-state` (it is stored lazily):
        // store it before retiring, so that the reopened replica knows how far it committed
        // and, should recovery cut the log below it, that it lost entries it acknowledged
        // (see `RaftLog::open`). It is stored capped at what the old view persisted, so a
        // failed `persist` does not make its entries look acknowledged. A view already retired (a failed reopening retried) refuses.
        if let Err(e) = old.raft.flush_state() {
            tracing::debug!(dir = %old.log.dir().display(), error = %e, "raft state not stored before reopening");
        }
        old.raft.retire();
        let (new, made) = open(&old)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = new;
        Ok(made)
    }

    /// Retires the current files for good (the partition's directory is going away).
    /// Blocking.
    pub fn retire(&self) {
        let _generation = self.generation.write().unwrap_or_else(PoisonError::into_inner);
        self.current().raft.retire();
    }
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

/// The error for a request that this replica cannot serve because it does not lead, or is
/// stopped after a failure (`failure`): `NOT_LEADER` naming the leader whenever one other than
/// this replica is known (a stopped replica learns it from peers' messages), so that clients
/// go there; else the stopped-replica error; else `LEADER_NOT_AVAILABLE`. The one rule for
/// both the partition and its stopped owner.
pub fn refusal(transport: &Transport, topic: &str, partition: i32, leader: u32, failure: Option<&str>) -> BrokerError {
    let elsewhere = leader != 0 && leader != transport.node_id();
    match failure {
        Some(reason) if !elsewhere => replica_stopped(topic, partition, reason),
        _ => not_leader_error(transport, topic, partition, leader),
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
    files: Arc<SharedFiles>,
    channels: Channels,
    restart: Restart,
    next: Option<(Owner, RawNode<RaftLog>)>,
}

impl PartitionReplica {
    pub fn new(
        ctx: OpenContext,
        owner_cx: OwnerContext,
        files: Arc<SharedFiles>,
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
        refusal(&cx.transport, &cx.topic, cx.index, leader, Some(reason))
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
        *cx.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.to_string());
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
                    // A stopped replica leads nothing.
                    Control::HandOver(reply) => drop(reply.send(crate::replica::proposal::HandOver::Never)),
                    Control::Unanswered(reply) => drop(reply.send(0)),
                    // Dropped: the asker hears that this replica cannot answer.
                    Control::Producers(_) => {}
                    Control::Membership(_, reply) => drop(reply.send(Err(self.error(&reason)))),
                },
                () = tokio::time::sleep_until(until) => return true,
            }
        }
    }

    async fn restart(&mut self) -> Result<(), String> {
        let (ctx, restart) = (self.ctx.clone(), self.restart.clone());
        let (topic, index) = (self.owner_cx.topic.clone(), self.owner_cx.index);
        let files = Arc::clone(&self.files);
        // The config is read from the retired log inside the reopening: a config change
        // waits for the reopening, or landed on the old log before it began.
        let node = tokio::task::spawn_blocking(move || {
            files.reopen(|old| {
                let Opened {
                    log,
                    raft,
                    node,
                    producers,
                } = open_replica(
                    &ctx,
                    &topic,
                    index,
                    old.log.dir(),
                    old.log.config(),
                    &restart.initial_voters,
                    restart.preferred,
                )?;
                Ok::<_, BrokerError>((ReplicaFiles { log, raft }, (node, producers)))
            })
        })
        .await
        .map_err(|e| format!("reopening panicked: {e}"))?
        .map_err(|e| e.to_string())?;
        let (node, producers) = node;
        let raft = self.files.current().raft;
        let owner = Owner::new(&self.owner_cx, raft, u64::from(self.restart.preferred), producers);
        self.next = Some((owner, node));
        let cx = &self.owner_cx;
        *cx.failed.lock().unwrap_or_else(PoisonError::into_inner) = None;
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

    fn small_segments() -> conveyor_storage::LogConfig {
        conveyor_storage::LogConfig {
            segment_bytes: 4096,
            index_interval_bytes: 256,
            max_index_bytes: 4096,
            max_batch_bytes: 4096,
            retention_ms: None,
            retention_bytes: Some(4096),
            flush: conveyor_storage::FlushPolicy::Os,
            ..conveyor_storage::LogConfig::default()
        }
    }

    fn open_files(dir: &std::path::Path, config: conveyor_storage::LogConfig) -> ReplicaFiles {
        let log = Arc::new(PartitionLog::open(dir, config).expect("partition log"));
        let raft = RaftLog::open(Arc::clone(&log)).expect("raft log");
        ReplicaFiles { log, raft }
    }

    /// A log with `count` committed and applied entries of term 1, over several segments.
    fn filled(dir: &std::path::Path, count: u64) -> ReplicaFiles {
        use conveyor_storage::batch::{BatchBuilder, Compression, Record};
        let files = open_files(dir, small_segments());
        let entries: Vec<raft::eraftpb::Entry> = (1..=count)
            .map(|index| {
                let mut b = BatchBuilder::new(Compression::None);
                b.push(&Record {
                    timestamp: 1_000,
                    value: Some(bytes::Bytes::from(vec![b'x'; 400])),
                    ..Record::default()
                });
                raft::eraftpb::Entry {
                    index,
                    term: 1,
                    data: b.build().expect("batch"),
                    ..raft::eraftpb::Entry::default()
                }
            })
            .collect();
        files
            .raft
            .append(&entries, super::super::entry::Origin::Peer)
            .expect("append");
        files.raft.persist().expect("persist");
        files
            .raft
            .set_hard_state(&raft::eraftpb::HardState {
                term: 1,
                vote: 1,
                commit: count,
                ..raft::eraftpb::HardState::default()
            })
            .expect("hard state");
        files.raft.evict_cache_to(count);
        files
    }

    /// A batch any open log accepts.
    fn valid_batch() -> bytes::Bytes {
        crate::test_batches::batch_of(conveyor_storage::batch::Compression::None, 1)
    }

    fn hard_state_on_disk(dir: &std::path::Path) -> raft::eraftpb::HardState {
        let raft = open_files(dir, small_segments()).raft;
        raft::Storage::initial_state(&raft).expect("state").hard_state
    }

    #[test]
    fn a_reopening_stores_the_commit_index_the_old_view_held_only_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = filled(dir.path(), 60);
        let hs = |commit| raft::eraftpb::HardState {
            term: 2,
            vote: 1,
            commit,
            ..raft::eraftpb::HardState::default()
        };
        files.raft.set_hard_state(&hs(30)).expect("stored with the new term");
        files.raft.set_hard_state(&hs(60)).expect("kept in memory");
        let shared = SharedFiles::new(files);
        shared
            .reopen(|old| Ok::<_, String>((open_files(old.log.dir(), old.log.config()), ())))
            .expect("reopened");
        let new = shared.current();
        let state = raft::Storage::initial_state(&new.raft).expect("state").hard_state;
        assert_eq!(state.commit, 60, "the commit the old view held is not forgotten");
    }

    #[test]
    fn after_a_reopening_the_old_log_and_raft_view_can_neither_store_raft_state_nor_delete_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = SharedFiles::new(filled(dir.path(), 60));
        // What a retention pass (or any task) took just before the restart began.
        let stale = shared.current();
        let segments = stale.log.segment_count();
        assert!(segments > 3, "entries span segments");
        shared
            .reopen(|old| Ok::<_, String>((open_files(old.log.dir(), old.log.config()), ())))
            .expect("reopened");
        let new = shared.current();
        assert!(!Arc::ptr_eq(&new.log, &stale.log));
        new.raft
            .set_hard_state(&raft::eraftpb::HardState {
                term: 7,
                vote: 2,
                commit: 60,
                ..raft::eraftpb::HardState::default()
            })
            .expect("the new owner votes");

        assert!(
            stale.raft.compact(i64::MAX).is_err(),
            "retention through the old view is refused"
        );
        assert!(
            stale
                .raft
                .set_hard_state(&raft::eraftpb::HardState {
                    term: 8,
                    vote: 1,
                    commit: 60,
                    ..raft::eraftpb::HardState::default()
                })
                .is_err(),
            "the old view stores no vote"
        );
        assert!(stale.raft.flush_state().is_err());
        assert!(stale.log.delete_segments_before(u64::MAX).is_err());
        let batch = valid_batch();
        let scratch = tempfile::tempdir().expect("tempdir");
        open_files(scratch.path(), small_segments())
            .log
            .append(&batch)
            .expect("the batch is valid: an open log takes it");
        assert!(stale.log.append(&batch).is_err(), "the retired log takes no append");
        assert_eq!(
            new.log.segment_count(),
            segments,
            "no segment of the new log was deleted"
        );
        let on_disk = hard_state_on_disk(dir.path());
        assert_eq!(
            (on_disk.term, on_disk.vote),
            (7, 2),
            "the old view wrote raft-state after the reopening"
        );
    }

    #[test]
    fn a_config_change_made_while_a_reopening_runs_lands_on_the_reopened_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = Arc::new(SharedFiles::new(open_files(dir.path(), small_segments())));
        let (opening, opened) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let reopening = {
            let shared = Arc::clone(&shared);
            let (tell, wait) = (opening.0, opened.1);
            std::thread::spawn(move || {
                shared.reopen(|old| {
                    let config = old.log.config();
                    tell.send(()).expect("tell");
                    wait.recv().expect("go on");
                    Ok::<_, String>((open_files(old.log.dir(), config), ()))
                })
            })
        };
        opening.1.recv().expect("reopening under way");
        let changing = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                shared.maintain(|files| {
                    files.log.set_config(conveyor_storage::LogConfig {
                        max_batch_bytes: 1234,
                        ..files.log.config()
                    })
                })
            })
        };
        // Released only once the change waits for the reopening: without the generation
        // lock it would land on the retired log, and the reopened one would not have it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shared.waited.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline && !changing.is_finished(),
                "the config change did not wait for the reopening"
            );
            std::thread::yield_now();
        }
        opened.0.send(()).expect("release");
        reopening.join().expect("reopen thread").expect("reopened");
        changing.join().expect("config thread").expect("config set");
        assert_eq!(shared.current().log.config().max_batch_bytes, 1234);
    }

    #[tokio::test]
    async fn a_stopped_replica_and_its_partition_both_send_clients_to_a_leader_they_learned() {
        let mut peers = std::collections::BTreeMap::new();
        peers.insert(2, "127.0.0.1:2".to_string());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let transport = Transport::start(1, "127.0.0.1:1".into(), &peers, 16, metrics).expect("transport");
        let learned = refusal(&transport, "t", 0, 2, Some("raft log write failed"));
        assert!(matches!(learned, BrokerError::NotLeader { leader: 2, .. }), "{learned}");
        let unknown = refusal(&transport, "t", 0, 0, Some("raft log write failed"));
        assert!(matches!(unknown, BrokerError::ReplicaStopped { .. }), "{unknown}");
        let running = refusal(&transport, "t", 0, 0, None);
        assert!(matches!(running, BrokerError::LeaderNotAvailable { .. }), "{running}");
    }

    #[test]
    fn the_error_for_a_stopped_replica_is_retriable_and_not_internal() {
        let detail = replica_stopped("t", 0, "raft log write failed").detail();
        assert!(detail.retriable);
        assert_eq!(detail.code, conveyor_proto::v1::ErrorCode::LeaderNotAvailable as i32);
        assert_eq!((detail.topic.as_str(), detail.partition), ("t", 0));
    }
}
