//! A replica whose log lost entries it once acknowledged, and how its group repairs it
//! (protocol-aware recovery, after Alagappan et al., FAST 2018).
//!
//! A corrupt tail that recovery cut, or a stored commit index past the end of the log after
//! a crash, means this replica acknowledged entries it no longer holds. Raft assumes a
//! replica never forgets what it acknowledged; trusting it anyway would go wrong three ways:
//! - its leader's heartbeat carries a commit index up to the replica's old matched index,
//!   past its log, and raft-rs panics (`to_commit N is out of range [last_index M]`);
//! - its leader still counts it at its old matched index and takes its rejections for stale
//!   ones, so it is never sent the entries again and stays out of sync for good;
//! - its vote could elect a leader that lacks the entries it once helped commit.
//!
//! # The rule
//! Such a replica is *recovering* from the moment the loss is known (at open, or when a
//! heartbeat promises more than its log holds) until its commit index reaches a target: the
//! commit its stored state promised, or, when open only knows that something was cut (see
//! `RaftLog::open`), the commit carried by the first append or heartbeat from a leader of a
//! term at least the replica's own. A heartbeat's commit is clamped to its last index, and
//! it answers with an append rejection naming where its log really ends. A leader that gets
//! a rejection whose hint is below the follower's matched index knows the follower lost
//! entries: it lowers the follower's progress to the hint and probes from there, so the
//! entries are sent again. A group of one has no one to recover from and is exempt.
//!
//! While recovering, a replica grants a vote (or pre-vote) only to a candidate whose last
//! entry has a term at least the replica's stored term (the term it had when the loss was
//! found) and an index at least the commit it promised (its target, or the stored commit):
//! every entry this replica acknowledged has a term no higher than its stored term, so such
//! a candidate's log holds everything committed with this replica's help, and Raft's own
//! up-to-date check still applies on top. Other vote requests, and a leadership transfer to
//! it, are dropped. It campaigns only when its own log passes the same test; otherwise its
//! election clock is held at zero. Without the relaxed vote rule a group whose replicas are
//! all recovering (a power cut under `always` that tore every tail) would never elect a
//! leader.
//!
//! # Crash behaviour
//! The recovering state and its target are stored in `raft-state` (see
//! [`super::raft_state`]) when they start, when the target is learned and when they end, so
//! a crash or a supervisor restart while recovering does not forget them. These writes are
//! rare (once per loss) and small; a failed write is logged and the state stays as it was
//! in memory: a replica that cannot record that it recovered simply recovers again after a
//! restart.

use raft::RawNode;
use raft::StateRole;
use raft::eraftpb::{Message, MessageType};

use super::raft_storage::RaftLog;

/// What a partition's owner knows about entries its replica lost.
#[derive(Debug)]
pub struct LostEntries {
    topic: String,
    partition: i32,
    /// While recovering: the commit index to reach before voting freely again; 0 while it is
    /// still to be learned from a leader.
    recovering_to: Option<u64>,
    /// The term stored when the replica was opened: no entry it acknowledged is newer.
    stored_term: u64,
    /// The commit index the stored state promised at open.
    promised: u64,
}

impl LostEntries {
    /// Starts recovering at once if the stored state says so (`RaftLog::open` records it
    /// when recovery cut anything this replica may have acknowledged), or if the stored
    /// commit index promised more than the log holds.
    pub fn new(topic: &str, partition: i32, raft: &RaftLog) -> LostEntries {
        let last = raft::Storage::last_index(raft).unwrap_or(0);
        let promised = raft.commit_promised_at_open();
        let stored_term = raft::Storage::initial_state(raft).map_or(0, |s| s.hard_state.term);
        let recovering_to = raft.recovering();
        if let Some(target) = recovering_to {
            tracing::warn!(
                topic,
                partition,
                promised,
                target,
                last,
                "replica lost entries it may have acknowledged; it votes only for candidates that hold them until it has caught up from its leader"
            );
        }
        LostEntries {
            topic: topic.to_string(),
            partition,
            recovering_to,
            stored_term,
            promised,
        }
    }

    /// Whether this replica is recovering lost entries (and so votes and campaigns only
    /// under the rule above).
    pub fn is_recovering(&self) -> bool {
        self.recovering_to.is_some()
    }

    /// Steps a message from a peer, applying the rule above on the way.
    pub fn step(&mut self, node: &mut RawNode<RaftLog>, mut m: Message) -> raft::Result<()> {
        self.check_caught_up(node);
        match m.get_msg_type() {
            MessageType::MsgAppendResponse if node.raft.state == StateRole::Leader => {
                self.reprobe_if_lost(node, &m);
                node.step(m)
            }
            MessageType::MsgAppend => {
                self.learn_target(node, &m);
                node.step(m)
            }
            MessageType::MsgHeartbeat => {
                self.learn_target(node, &m);
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
                    self.start_recovering(node, promised, last);
                    node.raft.msgs.push(where_my_log_ends(node, leader, promised));
                }
                Ok(())
            }
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                if self.is_recovering() && self.holds_what_i_promised(m.log_term, m.index) =>
            {
                node.step(m)
            }
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote | MessageType::MsgTimeoutNow
                if self.is_recovering() =>
            {
                tracing::debug!(topic = %self.topic, partition = self.partition, from = m.from, kind = ?m.get_msg_type(), "recovering replica: election message dropped");
                Ok(())
            }
            _ => node.step(m),
        }
    }

    /// Call before each tick: a recovering replica whose own log lacks what it promised
    /// never reaches its election timeout.
    pub fn before_tick(&mut self, node: &mut RawNode<RaftLog>) {
        self.check_caught_up(node);
        if !self.is_recovering() || node.raft.state == StateRole::Leader {
            return;
        }
        let last = node.raft.raft_log.last_index();
        let last_term = node.raft.raft_log.term(last).unwrap_or(0);
        if !self.holds_what_i_promised(last_term, last) {
            node.raft.election_elapsed = 0;
        }
    }

    /// The vote rule of a recovering replica: whether a log ending at (`term`, `index`)
    /// holds every entry this replica acknowledged and may have helped commit.
    fn holds_what_i_promised(&self, term: u64, index: u64) -> bool {
        let promised = self.promised.max(self.recovering_to.unwrap_or(0));
        term >= self.stored_term && index >= promised
    }

    /// A recovering replica that knows only that something was cut takes its target from
    /// the first leader that speaks to it in a term at least its stored one.
    fn learn_target(&mut self, node: &RawNode<RaftLog>, m: &Message) {
        if self.recovering_to != Some(0) || m.term < self.stored_term.max(node.raft.term) {
            return;
        }
        let target = m.commit.max(self.promised).max(1);
        tracing::info!(topic = %self.topic, partition = self.partition, leader = m.from, target, "recovering replica learned the commit index to catch up to");
        self.record(node, Some(target));
    }

    fn start_recovering(&mut self, node: &RawNode<RaftLog>, promised: u64, last: u64) {
        if self.recovering_to.is_none() {
            tracing::warn!(
                topic = %self.topic,
                partition = self.partition,
                leader = node.raft.leader_id,
                promised,
                last,
                "replica lacks entries it acknowledged; catching up from the leader, and voting only for candidates that hold them until then"
            );
        }
        let target = self.recovering_to.unwrap_or(0).max(promised);
        self.record(node, Some(target));
    }

    fn check_caught_up(&mut self, node: &RawNode<RaftLog>) {
        let Some(mut target) = self.recovering_to else { return };
        if target == 0 && node.raft.state == StateRole::Leader {
            // Elected under the rule above, so its log holds what it promised; it has
            // caught up once that is committed in its own term.
            target = self.promised.max(1);
            self.record(node, Some(target));
        }
        let reached = target > 0 && node.raft.raft_log.committed >= target;
        if reached || sole_voter(node) {
            tracing::info!(topic = %self.topic, partition = self.partition, target, "replica recovered its lost entries; it votes again");
            self.record(node, None);
        }
    }

    /// Moves to `recovering_to` in memory and in `raft-state`.
    fn record(&mut self, node: &RawNode<RaftLog>, recovering_to: Option<u64>) {
        self.recovering_to = recovering_to;
        if let Err(e) = node.store().set_recovering(recovering_to) {
            tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, recovering_to, "could not record the recovering state; it is kept in memory");
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

/// Alone in its group, a replica has no one to recover from: what it lost is lost.
fn sole_voter(node: &RawNode<RaftLog>) -> bool {
    node.store().voters() == [node.raft.id]
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
