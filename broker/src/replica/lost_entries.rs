//! A replica whose log lost entries it once acknowledged, and how its group repairs it
//! (protocol-aware recovery, after Alagappan et al., FAST 2018).
//!
//! A damaged batch the scrub found and recovery cut, or, after a crash under flush policy
//! `always`, a stored commit index past the end of the log (it is stored capped at the
//! persisted log) or a cut at a bad frame with intact entries after it, means this replica
//! acknowledged entries it no longer holds. Raft assumes a replica never forgets what it acknowledged;
//! trusting it anyway would go wrong three ways:
//! - its leader's heartbeat carries a commit index up to the replica's old matched index,
//!   past its log, and raft-rs panics (`to_commit N is out of range [last_index M]`);
//! - its leader still counts it at its old matched index and takes its rejections for stale
//!   ones, so it is never sent the entries again and stays out of sync for good;
//! - its vote could elect a leader that lacks the entries it once helped commit.
//!
//! # The rule
//! Such a replica is *recovering*, with a *promise*: the (term, index) of the last entry its
//! log held before the loss, or an upper bound of it (see `RaftLog::open` for where each
//! comes from; a leader's heartbeat whose commit is past the log promises (its term, that
//! commit)). Raft's own safety argument then holds with the promise in place of the log it
//! lost: while recovering, the replica grants a vote or pre-vote only to a candidate whose
//! last entry is at least the promise by Raft's up-to-date comparison (term first, then
//! index), so that candidate holds every entry this replica acknowledged and so every entry
//! committed with its help (Raft's own up-to-date check against its real log applies on
//! top). Other vote requests, and a leadership transfer to it, are dropped, and its election
//! clock is held at zero: its own log is below its promise, so it must not campaign. It
//! stops recovering (durably) once its own log's last entry is at least its promise, from
//! then on under Raft's plain rules. A group of one has no one to recover from and is exempt.
//!
//! A heartbeat's commit is clamped to the replica's last index, and it answers with an
//! append rejection naming where its log really ends. A leader that gets a rejection whose
//! hint is below the follower's matched index knows the follower lost entries: it lowers the
//! follower's progress to the hint and probes from there, so the entries are sent again.
//!
//! # Liveness
//! A group whose voters are all recovering with promises no live log meets elects no leader:
//! electing one would lose entries it committed, so safety wins. The replica says so: a warning
//! every [`STALLED_WARNING_TICKS`] ticks naming the partition and its promise, and the
//! `conveyor_replicas_recovering` gauge. See docs/raft.md for what an operator can do.
//!
//! # Crash behaviour
//! The promise is stored in `raft-state` (see [`super::raft_state`]) before the owner runs
//! and when a heartbeat reveals a loss, and cleared when recovery ends, so a crash or a
//! supervisor restart while recovering does not forget it. These writes are rare (once per
//! loss) and small; a failed write is logged and the state stays as it was in memory: a
//! replica that cannot record that it recovered simply recovers again after a restart.
//!
//! # Limits
//! A loss revealed only by a heartbeat (flush policy `os` or `interval`) promises what the
//! leader's commit says; entries the replica acknowledged past it that its leader commits,
//! counting the stale acknowledgement, before its rejection arrives are not covered. Such a
//! loss is within those policies' contract.

use raft::RawNode;
use raft::StateRole;
use raft::eraftpb::{Message, MessageType};

use super::raft_state::Promise;
use super::raft_storage::RaftLog;

/// Ticks between warnings that a replica is still recovering (30 s at the owner's 50 ms tick).
pub const STALLED_WARNING_TICKS: u64 = 600;

/// What a partition's owner knows about entries its replica lost.
#[derive(Debug)]
pub struct LostEntries {
    topic: String,
    partition: i32,
    /// While recovering: the last entry this replica may have acknowledged before the loss.
    promise: Option<Promise>,
    /// Ticks since this replica last warned that it is still recovering.
    ticks_since_warning: u64,
}

impl LostEntries {
    /// Starts recovering at once if the stored state says so (`RaftLog::open` records it
    /// when it finds that this replica lost entries it may have acknowledged).
    pub fn new(topic: &str, partition: i32, raft: &RaftLog) -> LostEntries {
        let promise = raft.recovering();
        if let Some(promise) = promise {
            tracing::warn!(
                topic,
                partition,
                %promise,
                last = %raft.last_entry(),
                "replica lost entries it may have acknowledged; it votes only for candidates whose log reaches its promise, and does not campaign, until its own log does"
            );
        }
        LostEntries {
            topic: topic.to_string(),
            partition,
            promise,
            ticks_since_warning: 0,
        }
    }

    /// Whether this replica is recovering lost entries (and so votes and campaigns only
    /// under the rule above).
    pub fn is_recovering(&self) -> bool {
        self.promise.is_some()
    }

    /// Steps a message from a peer, applying the rule above on the way.
    pub fn step(&mut self, node: &mut RawNode<RaftLog>, mut m: Message) -> raft::Result<()> {
        self.check_caught_up(node);
        match m.get_msg_type() {
            MessageType::MsgAppendResponse if node.raft.state == StateRole::Leader => {
                self.reprobe_if_lost(node, &m);
                node.step(m)
            }
            MessageType::MsgHeartbeat => {
                let last = node.raft.raft_log.last_index();
                let promised = m.commit;
                if promised <= last || sole_voter(node) {
                    return node.step(m);
                }
                m.commit = last;
                let (leader, term) = (m.from, m.term);
                node.step(m)?;
                // A heartbeat of an older term is refused by Raft, and answering it with
                // this replica's newer term would depose a leader for nothing.
                if node.raft.term == term && node.raft.leader_id == leader {
                    // The entry at the leader's commit has a term no newer than the leader's.
                    self.start_recovering(node, Promise { term, index: promised });
                    node.raft.msgs.push(where_my_log_ends(node, leader, promised));
                }
                Ok(())
            }
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                if self.reaches_promise(Promise {
                    term: m.log_term,
                    index: m.index,
                }) =>
            {
                node.step(m)
            }
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote | MessageType::MsgTimeoutNow
                if self.is_recovering() =>
            {
                tracing::debug!(topic = %self.topic, partition = self.partition, from = m.from, kind = ?m.get_msg_type(), log_term = m.log_term, index = m.index, "recovering replica: election message dropped");
                Ok(())
            }
            _ => node.step(m),
        }
    }

    /// Call before each tick: a recovering replica never reaches its election timeout (its
    /// own log is below its promise, or it would have stopped recovering), and says now and
    /// then that it is still recovering.
    pub fn before_tick(&mut self, node: &mut RawNode<RaftLog>) {
        self.check_caught_up(node);
        let Some(promise) = self.promise else { return };
        if node.raft.state != StateRole::Leader {
            node.raft.election_elapsed = 0;
        }
        self.ticks_since_warning += 1;
        if self.ticks_since_warning >= STALLED_WARNING_TICKS {
            self.ticks_since_warning = 0;
            tracing::warn!(
                topic = %self.topic,
                partition = self.partition,
                %promise,
                last = %node.store().last_entry(),
                leader = node.raft.leader_id,
                "replica still recovering lost entries: it waits for a leader whose log reaches its promise (none elected while no voter's log does; see docs/raft.md)"
            );
        }
    }

    /// Whether a log ending at `last` holds everything this replica may have acknowledged
    /// (always true when it is not recovering).
    fn reaches_promise(&self, last: Promise) -> bool {
        self.promise.is_none_or(|p| last >= p)
    }

    fn start_recovering(&mut self, node: &RawNode<RaftLog>, promise: Promise) {
        if self.promise.is_none() {
            tracing::warn!(
                topic = %self.topic,
                partition = self.partition,
                leader = node.raft.leader_id,
                %promise,
                last = %node.store().last_entry(),
                "replica lacks entries it acknowledged; catching up from the leader, and voting only for candidates that hold them until then"
            );
        }
        let promise = self.promise.max(Some(promise));
        self.record(node, promise);
    }

    /// Ends recovering once this replica's own log (as stored, never entries raft-rs holds
    /// only in memory) reaches its promise.
    fn check_caught_up(&mut self, node: &RawNode<RaftLog>) {
        let Some(promise) = self.promise else { return };
        let last = node.store().last_entry();
        if last >= promise || sole_voter(node) {
            tracing::info!(topic = %self.topic, partition = self.partition, %promise, %last, "replica holds what it promised again; it votes freely");
            self.record(node, None);
        }
    }

    /// Moves to `promise` in memory and in `raft-state`.
    fn record(&mut self, node: &RawNode<RaftLog>, promise: Option<Promise>) {
        self.promise = promise;
        self.ticks_since_warning = 0;
        // The owner calls this from its async loop: the write and fsync of `raft-state` leave
        // the reactor's other tasks to another worker meanwhile (rare: a recovery starting,
        // raising its promise or ending).
        let store = || node.store().set_recovering(promise);
        let stored = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(store)
            }
            _ => store(),
        };
        if let Err(e) = stored {
            tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, ?promise, "could not record the recovering state; it is kept in memory");
        }
    }

    /// On the leader: a rejection hinting below the follower's matched index means the
    /// follower lost entries it had acknowledged. raft-rs would take it for a stale
    /// rejection; instead the follower's progress goes back to the hint, and the rejection
    /// is then taken as the answer to a probe, which sends the entries again.
    fn reprobe_if_lost(&self, node: &mut RawNode<RaftLog>, m: &Message) {
        // A rejection of an index this leader never sent is no answer to anything it sent:
        // probing from there would send an append that a follower matches by a made-up term.
        if !m.reject || m.term != node.raft.term || m.index > node.raft.raft_log.last_index() {
            return;
        }
        let Some(progress) = node.raft.mut_prs().get_mut(m.from) else {
            return;
        };
        if m.reject_hint >= progress.matched {
            return;
        }
        tracing::warn!(
            topic = %self.topic,
            partition = self.partition,
            follower = m.from,
            matched = progress.matched,
            follower_last = m.reject_hint,
            "follower lost entries it had acknowledged; sending them again"
        );
        progress.matched = m.reject_hint;
        progress.become_probe();
        progress.next_idx = m.index.saturating_add(1);
    }
}

/// Alone in its group, a replica has no one to recover from: what it lost is lost. Both
/// halves of a joint configuration count: while `{A,B,C} -> {A}` is under way, A's election
/// still needs the outgoing majority, which may hold what A lost.
fn sole_voter(node: &RawNode<RaftLog>) -> bool {
    let conf = node.store().conf_state();
    let me = node.raft.id;
    conf.voters == [me] && (conf.voters_outgoing.is_empty() || conf.voters_outgoing == [me])
}

/// An append rejection telling the leader where this replica's log really ends.
fn where_my_log_ends(node: &RawNode<RaftLog>, leader: u64, promised: u64) -> Message {
    let last = node.raft.raft_log.last_index();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppendResponse);
    m.from = node.raft.id;
    m.to = leader;
    m.term = node.raft.term;
    m.index = promised;
    m.reject = true;
    m.reject_hint = last;
    m.log_term = node.raft.raft_log.term(last).unwrap_or(0);
    m.commit = node.raft.raft_log.committed;
    m
}

#[cfg(test)]
mod tests;
