//! The owner's answers to control requests: leadership transfer, handing leadership over
//! before a shutdown, giving it back to the preferred replica, and proposing membership
//! steps; and how a follower of a shutting-down broker holds off campaigning.

use std::time::Instant;

use raft::{RawNode, StateRole};

use super::{Owner, PendingChange};
use crate::error::{BrokerError, Result};
use crate::replica::partition::{PROMOTE_MAX_LAG, REPLICA_LAG_TIME};
use crate::replica::proposal::{Control, HandOver, MemberChange};
use crate::replica::raft_storage::RaftLog;

impl Owner {
    pub(super) fn control(&mut self, node: &mut RawNode<RaftLog>, command: Control) {
        match command {
            Control::TransferLeader(to) => {
                tracing::info!(topic = %self.topic, partition = self.index, to, "transferring leadership");
                node.transfer_leader(to);
            }
            Control::HandOver(reply) => {
                let answer = self.hand_over(node);
                let _ = reply.send(answer);
            }
            Control::Unanswered(reply) => {
                let _ = reply.send(self.pending.len() + self.waiting.len());
            }
            Control::Producers(reply) => {
                let _ = reply.send(self.producer_summaries());
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
            return Err(self.not_leader(node));
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

    /// Starts handing leadership to an in-sync voter, for a controlled shutdown. A voter
    /// that was handed leadership before and did not take it (raft-rs gave the transfer up
    /// and this replica still leads in the same term) is not asked again: it is most likely
    /// shutting down as well, and asking it again would hold appends for nothing.
    fn hand_over(&mut self, node: &mut RawNode<RaftLog>) -> HandOver {
        if node.raft.state != StateRole::Leader {
            return HandOver::Never;
        }
        if let Some(to) = node.raft.lead_transferee {
            return HandOver::Started(u32::try_from(to).unwrap_or(0));
        }
        if let Some((to, term)) = self.handing_to.take()
            && term == node.raft.term
        {
            self.refused_handover.insert(to);
        }
        let me = node.raft.id;
        let voters = self.raft.conf_state().voters;
        if voters.iter().all(|v| *v == me || self.refused_handover.contains(v)) {
            return HandOver::Never;
        }
        match self.in_sync_successor(node) {
            Some(to) => {
                tracing::info!(topic = %self.topic, partition = self.index, to, "handing leadership over before shutting down");
                node.transfer_leader(to);
                self.handing_to = Some((to, node.raft.term));
                HandOver::Started(u32::try_from(to).unwrap_or(0))
            }
            None => HandOver::NotNow,
        }
    }

    /// The voter to hand leadership to when this broker shuts down: one in sync (as
    /// [`publish_status`](Self::publish_status) reports it) and not known to refuse, the
    /// preferred replica if it is one, else the most caught up. `None` unless this replica
    /// leads and such a voter exists. Raft's `recent_active` is not asked: raft-rs clears it
    /// at every check-quorum round, so an idle group would have no successor for a while
    /// after each; the `caught_up` time already says the voter was heard from.
    fn in_sync_successor(&self, node: &RawNode<RaftLog>) -> Option<u64> {
        if node.raft.state != StateRole::Leader {
            return None;
        }
        let voters = self.raft.conf_state().voters;
        let now = Instant::now();
        let candidates: Vec<(u64, u64)> = node
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| {
                **id != node.raft.id
                    && voters.contains(id)
                    && !self.refused_handover.contains(id)
                    && self
                        .caught_up
                        .get(id)
                        .is_some_and(|t| now.duration_since(*t) < REPLICA_LAG_TIME)
            })
            .map(|(id, p)| (*id, p.matched))
            .collect();
        if candidates.iter().any(|(id, _)| *id == self.preferred) {
            return Some(self.preferred);
        }
        candidates.iter().max_by_key(|(_, matched)| *matched).map(|(id, _)| *id)
    }

    /// Hands leadership to the preferred replica when it is fully caught up.
    pub(super) fn restore_preferred_leader(&self, node: &mut RawNode<RaftLog>) {
        // While draining, the hand-over chooses the successor: a transfer to the preferred
        // replica here would replace it, and the voter it chose would be blamed for refusing.
        if node.raft.state != StateRole::Leader || node.raft.id == self.preferred || self.transport.is_draining() {
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
}

/// Keeps a follower of a shutting-down broker from campaigning: its election timer stops
/// short of firing. The timer still runs past the minimum election timeout, so the follower
/// does not hold a leader lease forever and still votes when its leader goes quiet.
pub(super) fn hold_off_campaign(node: &mut RawNode<RaftLog>) {
    if node.raft.state == StateRole::Leader {
        return;
    }
    // The longest timeout raft-rs allows: [election_tick, 2 * election_tick).
    let longest = 2 * node.raft.election_timeout() - 1;
    if node.raft.randomized_election_timeout() != longest {
        node.raft.set_randomized_election_timeout(longest);
    }
    // The tick adds one: it must stay below the timeout.
    node.raft.election_elapsed = node.raft.election_elapsed.min(longest - 2);
}
