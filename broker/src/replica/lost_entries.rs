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
//! heartbeat promises more than its log holds) until its commit index reaches the highest
//! commit its leader sent it since. While recovering it neither votes (vote and pre-vote
//! requests are dropped, as is a leadership transfer to it) nor campaigns (its election
//! clock is held at zero). A heartbeat's commit is clamped to its last index, and it answers
//! with an append rejection naming where its log really ends. A leader that gets a
//! rejection whose hint is below the follower's matched index knows the follower lost
//! entries: it lowers the follower's progress to the hint and probes from there, so the
//! entries are sent again. A group of one has no one to recover from and is exempt.
//!
//! # Crash behaviour
//! Nothing here is stored: a replica that crashes while recovering detects the loss again on
//! its next start or on its leader's next heartbeat.

use raft::RawNode;
use raft::StateRole;
use raft::eraftpb::{Message, MessageType};

use super::raft_storage::RaftLog;

/// What a partition's owner knows about entries its replica lost.
#[derive(Debug)]
pub struct LostEntries {
    topic: String,
    partition: i32,
    /// While recovering: the commit index to reach before voting again.
    recovering_to: Option<u64>,
}

impl LostEntries {
    /// Starts recovering at once if the stored commit index promised more than the log
    /// holds after recovery.
    pub fn new(topic: &str, partition: i32, raft: &RaftLog) -> LostEntries {
        let last = raft::Storage::last_index(raft).unwrap_or(0);
        let promised = raft.commit_promised_at_open();
        let recovering_to = (promised > last).then_some(promised);
        if recovering_to.is_some() {
            tracing::warn!(topic, partition, promised, last, "replica lost committed entries; it will not vote until it has caught up from its leader");
        }
        LostEntries {
            topic: topic.to_string(),
            partition,
            recovering_to,
        }
    }

    /// Whether this replica is recovering lost entries (and so must not vote or campaign).
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
                    self.start_recovering(node, promised, last);
                    node.raft.msgs.push(where_my_log_ends(node, leader, promised));
                }
                Ok(())
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

    /// Call before each tick: a recovering replica never reaches its election timeout.
    pub fn before_tick(&mut self, node: &mut RawNode<RaftLog>) {
        self.check_caught_up(node);
        if self.is_recovering() && node.raft.state != StateRole::Leader {
            node.raft.election_elapsed = 0;
        }
    }

    fn start_recovering(&mut self, node: &RawNode<RaftLog>, promised: u64, last: u64) {
        if self.recovering_to.is_none() {
            tracing::warn!(
                topic = %self.topic,
                partition = self.partition,
                leader = node.raft.leader_id,
                promised,
                last,
                "replica lacks entries it acknowledged; catching up from the leader, and not voting until then"
            );
        }
        self.recovering_to = Some(self.recovering_to.unwrap_or(0).max(promised));
    }

    fn check_caught_up(&mut self, node: &RawNode<RaftLog>) {
        let Some(target) = self.recovering_to else { return };
        if node.raft.raft_log.committed >= target || sole_voter(node) {
            tracing::info!(topic = %self.topic, partition = self.partition, target, "replica recovered its lost entries; it votes again");
            self.recovering_to = None;
        }
    }

    /// On the leader: a rejection hinting below the follower's matched index means the
    /// follower lost entries it had acknowledged. raft-rs would take it for a stale
    /// rejection; instead the follower's progress goes back to the hint, and the rejection
    /// is then taken as the answer to a probe, which sends the entries again.
    fn reprobe_if_lost(&self, node: &mut RawNode<RaftLog>, m: &Message) {
        if !m.reject || m.term != node.raft.term {
            return;
        }
        let Some(progress) = node.raft.mut_prs().get_mut(m.from) else { return };
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
        progress.next_idx = m.index + 1;
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
