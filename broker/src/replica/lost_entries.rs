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
            tracing::warn!(
                topic,
                partition,
                promised,
                last,
                "replica lost committed entries; it will not vote until it has caught up from its leader"
            );
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use bytes::Bytes;
    use conveyor_storage::batch::{BatchBuilder, Compression, Record};
    use conveyor_storage::{FlushPolicy, LogConfig, PartitionLog};
    use raft::eraftpb::{ConfState, HardState};
    use raft::{Config, GetEntriesContext, ProgressState, Storage};

    use super::super::entry::Origin;
    use super::super::inbound;
    use super::super::ready::{ReadyHandler, on_ready};
    use super::*;

    /// Bounds the simulation; a healthy group needs far fewer rounds.
    const MAX_ROUNDS: usize = 2_000;

    struct Node {
        raw: RawNode<RaftLog>,
        lost: LostEntries,
        outbox: Vec<Message>,
    }

    struct Collect<'a>(&'a mut Vec<Message>);

    impl ReadyHandler for Collect<'_> {
        fn send(&mut self, messages: Vec<Message>) {
            self.0.extend(messages);
        }
    }

    fn storage(dir: &std::path::Path) -> RaftLog {
        let config = LogConfig {
            segment_bytes: 16 * 1024,
            max_batch_bytes: 8 * 1024,
            flush: FlushPolicy::Os,
            retention_ms: None,
            ..LogConfig::default()
        };
        RaftLog::open(Arc::new(PartitionLog::open(dir, config).expect("log"))).expect("raft log")
    }

    fn node(id: u64, raft: RaftLog) -> Node {
        if raft.voters().is_empty() {
            let cs = ConfState {
                voters: vec![1, 2, 3],
                ..ConfState::default()
            };
            raft.set_conf_state(&cs).expect("conf state");
        }
        let state = raft.initial_state().expect("state");
        let cfg = Config {
            id,
            election_tick: 10,
            heartbeat_tick: 3,
            applied: state.hard_state.commit,
            pre_vote: true,
            check_quorum: true,
            ..Config::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        Node {
            lost: LostEntries::new("t", 0, &raft),
            raw: RawNode::new(&cfg, raft, &logger).expect("raw node"),
            outbox: Vec::new(),
        }
    }

    fn batch(i: u64) -> Vec<u8> {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(&Record {
            timestamp: 1,
            value: Some(Bytes::from(format!("proposal-{i}"))),
            ..Record::default()
        });
        b.build().expect("batch").to_vec()
    }

    /// One round: tick (through the lost-entries rule), process Readies, deliver every
    /// message through the owner's inbound path.
    fn round(nodes: &mut [Node], tick: bool) {
        let mut mail: VecDeque<Message> = VecDeque::new();
        for n in nodes.iter_mut() {
            if tick {
                n.lost.before_tick(&mut n.raw);
                n.raw.tick();
            }
            while on_ready(&mut n.raw, &mut Collect(&mut n.outbox)).expect("ready") {}
            mail.extend(n.outbox.drain(..));
        }
        while let Some(m) = mail.pop_front() {
            let n = &mut nodes[(m.to - 1) as usize];
            // Refusals (stale terms and the like) are Raft's business here as in the owner.
            let _ = inbound::step(&mut n.raw, &mut n.lost, m);
        }
    }

    fn leader(nodes: &[Node]) -> Option<usize> {
        nodes.iter().position(|n| n.raw.raft.state == StateRole::Leader)
    }

    #[test]
    fn given_a_follower_that_lost_acknowledged_entries_it_should_not_vote_and_should_recover_from_its_leader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes: Vec<Node> = (1..=3u64)
            .map(|id| node(id, storage(&dir.path().join(id.to_string()))))
            .collect();
        let mut rounds = 0;
        let l = loop {
            round(&mut nodes, true);
            rounds += 1;
            assert!(rounds < MAX_ROUNDS, "no leader elected");
            if let Some(l) = leader(&nodes) {
                break l;
            }
        };
        for i in 0..40 {
            nodes[l].raw.propose(vec![], batch(i)).expect("propose");
        }
        let target = nodes[l].raw.raft.raft_log.last_index();
        while nodes.iter().any(|n| n.raw.raft.raft_log.applied < target) {
            round(&mut nodes, false);
            rounds += 1;
            assert!(rounds < MAX_ROUNDS, "proposals not committed everywhere");
        }

        // Follower `f` restarts with only a prefix of what it acknowledged, and a stored
        // commit inside that prefix: only its leader's heartbeat can reveal the loss.
        let f = (l + 1) % 3;
        let f_id = f as u64 + 1;
        let kept = target - 10;
        let copy = storage(&dir.path().join("lost"));
        let prefix = nodes[l]
            .raw
            .store()
            .entries(1, kept + 1, None, GetEntriesContext::empty(false))
            .expect("prefix");
        copy.append(&prefix, Origin::Peer).expect("append prefix");
        let before = nodes[f].raw.raft.hard_state();
        copy.set_hard_state(&HardState {
            commit: kept - 5,
            ..before
        })
        .expect("hard state");
        copy.set_conf_state(&nodes[f].raw.store().conf_state())
            .expect("conf state");
        nodes[f] = node(f_id, copy);
        assert!(!nodes[f].lost.is_recovering());

        // Heartbeats only: no new proposals would otherwise send the entries again.
        let mut seen_recovering = false;
        while nodes[f].raw.raft.raft_log.committed < target {
            round(&mut nodes, true);
            rounds += 1;
            assert!(rounds < MAX_ROUNDS, "the follower never caught up");
            if nodes[f].lost.is_recovering() && !seen_recovering {
                seen_recovering = true;
                // A vote request to a recovering replica goes unanswered.
                let other = (f + 1) % 3;
                let mut vote = Message::default();
                vote.set_msg_type(MessageType::MsgRequestVote);
                vote.from = other as u64 + 1;
                vote.to = f_id;
                vote.term = nodes[f].raw.raft.term + 1;
                vote.index = target;
                vote.log_term = nodes[f].raw.raft.term;
                let term = nodes[f].raw.raft.term;
                let n = &mut nodes[f];
                inbound::step(&mut n.raw, &mut n.lost, vote).expect("step");
                let answered = n
                    .raw
                    .raft
                    .msgs
                    .iter()
                    .any(|m| m.get_msg_type() == MessageType::MsgRequestVoteResponse);
                assert!(!answered, "no vote granted or refused");
                assert_eq!(nodes[f].raw.raft.term, term, "the request changed nothing");
            }
        }
        assert!(seen_recovering, "the heartbeat revealed the loss");
        assert_eq!(nodes[f].raw.raft.raft_log.last_index(), target);
        round(&mut nodes, false);
        assert!(!nodes[f].lost.is_recovering(), "caught up: it votes again");
        assert_eq!(leader(&nodes), Some(l), "no leader change on the way");
    }

    #[test]
    fn a_dropped_snapshot_reported_by_the_transport_unpauses_its_follower() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes: Vec<Node> = (1..=3u64)
            .map(|id| node(id, storage(&dir.path().join(id.to_string()))))
            .collect();
        let mut rounds = 0;
        let l = loop {
            round(&mut nodes, true);
            rounds += 1;
            assert!(rounds < MAX_ROUNDS, "no leader elected");
            if let Some(l) = leader(&nodes) {
                break l;
            }
        };
        let f_id = ((l + 1) % 3) as u64 + 1;
        let n = &mut nodes[l];
        n.raw.raft.mut_prs().get_mut(f_id).expect("progress").become_snapshot(5);
        assert!(n.raw.raft.prs().get(f_id).expect("progress").is_paused());
        inbound::step(&mut n.raw, &mut n.lost, inbound::snapshot_dropped(f_id)).expect("report");
        let progress = n.raw.raft.prs().get(f_id).expect("progress");
        assert_eq!(
            progress.state,
            ProgressState::Probe,
            "no longer waiting for the snapshot"
        );
        // raft-rs probes again after the follower's next heartbeat response.
        nodes[l].raw.propose(vec![], batch(0)).expect("propose");
        let last = nodes[l].raw.raft.raft_log.last_index();
        while nodes[l].raw.raft.prs().get(f_id).expect("progress").matched < last {
            round(&mut nodes, true);
            rounds += 1;
            assert!(rounds < MAX_ROUNDS, "the follower stayed paused");
        }
    }
}
