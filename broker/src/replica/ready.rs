//! Processing a `RawNode` Ready in the one order raft-rs documents as correct:
//! send messages the leader may send early, apply a snapshot, apply committed entries, append
//! new entries and store the HardState, persist (fsync per the flush policy), only then send
//! the messages that depend on persisted state, advance, store the new commit, send, apply,
//! advance apply.

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, Ready};

use super::raft_storage::{RaftLog, ReplicaError};

/// What the owner of a Raft group does with the results of a Ready.
pub trait ReadyHandler {
    /// Sends Raft messages to peers (the transport batches them per peer).
    fn send(&mut self, messages: Vec<Message>);
    /// A leader's snapshot was installed: the log restarts at its point, and `state` is
    /// the state it carried (after the log start offset).
    fn snapshot_installed(&mut self, _state: &[u8]) {}
    /// Entries committed and applied, in log order (their batches are in `store`). An error
    /// stops the replica, which is reopened from its log.
    fn committed(&mut self, _store: &RaftLog, _entries: &[Entry]) -> Result<(), ReplicaError> {
        Ok(())
    }
}

/// Handles one Ready, if there is one. Returns whether there was.
pub fn on_ready(node: &mut RawNode<RaftLog>, handler: &mut impl ReadyHandler) -> Result<bool, ReplicaError> {
    if !node.has_ready() {
        return Ok(false);
    }
    let ready = node.ready();
    handle(node, ready, handler)?;
    Ok(true)
}

/// Handles a Ready taken from `node` (the owner may look at it first, see
/// `owner::in_memory`).
pub fn handle(
    node: &mut RawNode<RaftLog>,
    mut ready: Ready,
    handler: &mut impl ReadyHandler,
) -> Result<(), ReplicaError> {
    if !ready.messages().is_empty() {
        handler.send(ready.take_messages());
    }
    if !ready.snapshot().is_empty() {
        node.store().apply_snapshot(ready.snapshot())?;
        handler.snapshot_installed(ready.snapshot().data.get(8..).unwrap_or_default());
    }
    apply(node, ready.take_committed_entries(), handler)?;
    let origin = if node.raft.state == raft::StateRole::Leader {
        super::entry::Origin::LeaderOf(node.raft.term)
    } else {
        super::entry::Origin::Peer
    };
    node.store().append(ready.entries(), origin)?;
    if let Some(hs) = ready.hs() {
        node.store().set_hard_state(hs)?;
    }
    node.store().persist()?;
    if !ready.persisted_messages().is_empty() {
        handler.send(ready.take_persisted_messages());
    }
    let mut light = node.advance(ready);
    if let Some(commit) = light.commit_index() {
        let mut hs = node.raft.hard_state();
        hs.commit = commit;
        node.store().set_hard_state(&hs)?;
    }
    handler.send(light.take_messages());
    apply(node, light.take_committed_entries(), handler)?;
    node.advance_apply();
    Ok(())
}

/// Applies committed membership changes; the owner reads the commit index from the node.
fn apply(
    node: &mut RawNode<RaftLog>,
    entries: Vec<Entry>,
    handler: &mut impl ReadyHandler,
) -> Result<(), ReplicaError> {
    let Some(last) = entries.last().map(|e| e.index) else {
        return Ok(());
    };
    for entry in &entries {
        let conf_state = match entry.get_entry_type() {
            EntryType::EntryConfChange => {
                let cc = ConfChange::parse_from_bytes(&entry.data).map_err(|e| bad_change(entry, e))?;
                node.apply_conf_change(&cc).map_err(|e| bad_change(entry, e))?
            }
            EntryType::EntryConfChangeV2 => {
                let cc = ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| bad_change(entry, e))?;
                node.apply_conf_change(&cc).map_err(|e| bad_change(entry, e))?
            }
            EntryType::EntryNormal => continue,
        };
        node.store().set_conf_state(&conf_state)?;
    }
    handler.committed(node.store(), &entries)?;
    node.store().evict_cache_to(last);
    Ok(())
}

fn bad_change(entry: &Entry, e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Entry(super::entry::EntryError::Malformed {
        index: entry.index,
        reason: format!("membership change cannot be applied: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use bytes::Bytes;
    use conveyor_storage::batch::{BatchBuilder, BatchIter, Compression, Record};
    use conveyor_storage::{FlushPolicy, LogConfig, PartitionLog};
    use raft::eraftpb::ConfState;
    use raft::{Config, StateRole};

    use super::*;

    /// Bounds the simulation; a healthy cluster needs far fewer rounds.
    const MAX_ROUNDS: usize = 2_000;

    struct Node {
        raw: RawNode<RaftLog>,
        outbox: Vec<Message>,
    }

    struct Collect<'a> {
        outbox: &'a mut Vec<Message>,
    }

    impl ReadyHandler for Collect<'_> {
        fn send(&mut self, messages: Vec<Message>) {
            self.outbox.extend(messages);
        }
    }

    fn node(id: u64, dir: &std::path::Path) -> Node {
        let config = LogConfig {
            segment_bytes: 16 * 1024,
            max_batch_bytes: 8 * 1024,
            flush: FlushPolicy::Always,
            retention_ms: None,
            ..LogConfig::default()
        };
        let log = Arc::new(PartitionLog::open(dir.join(id.to_string()), config).expect("log"));
        let storage = RaftLog::open(log).expect("raft log");
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..ConfState::default()
        };
        storage.set_conf_state(&cs).expect("conf state");
        let cfg = Config {
            id,
            election_tick: 10,
            heartbeat_tick: 3,
            ..Config::default()
        };
        cfg.validate().expect("raft config");
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        Node {
            raw: RawNode::new(&cfg, storage, &logger).expect("raw node"),
            outbox: Vec::new(),
        }
    }

    fn batch(i: u64) -> Bytes {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(&Record {
            timestamp: 1,
            value: Some(Bytes::from(format!("proposal-{i}"))),
            ..Record::default()
        });
        b.build().expect("batch")
    }

    /// One round: tick, process Readies, deliver every message.
    fn round(nodes: &mut [Node], tick: bool) {
        let mut mail: VecDeque<Message> = VecDeque::new();
        for n in nodes.iter_mut() {
            if tick {
                n.raw.tick();
            }
            let mut handler = Collect { outbox: &mut n.outbox };
            while on_ready(&mut n.raw, &mut handler).expect("ready") {}
            mail.extend(n.outbox.drain(..));
        }
        while let Some(m) = mail.pop_front() {
            let to = (m.to - 1) as usize;
            nodes[to].raw.step(m).expect("step");
        }
    }

    #[test]
    fn three_replicas_elect_a_leader_and_store_identical_logs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes: Vec<Node> = (1..=3).map(|id| node(id, dir.path())).collect();
        let mut rounds = 0;
        let leader = loop {
            round(&mut nodes, true);
            rounds += 1;
            assert!(rounds < MAX_ROUNDS, "no leader elected");
            if let Some(i) = nodes.iter().position(|n| n.raw.raft.state == StateRole::Leader) {
                break i;
            }
        };
        for i in 0..60 {
            nodes[leader].raw.propose(vec![], batch(i).to_vec()).expect("propose");
        }
        let target = nodes[leader].raw.raft.raft_log.last_index();
        while nodes.iter().any(|n| n.raw.raft.raft_log.applied < target) {
            round(&mut nodes, false);
            rounds += 1;
            assert!(rounds < MAX_ROUNDS, "proposals not committed everywhere");
        }
        let logs: Vec<Vec<Bytes>> = nodes
            .iter()
            .map(|n| {
                let log = n.raw.store().partition_log();
                let mut out = Vec::new();
                let mut next = log.log_start_offset();
                while next < log.log_end_offset() {
                    for b in BatchIter::new(log.read(next, 1 << 20).expect("read")) {
                        let b = b.expect("batch");
                        next = b.header().next_offset();
                        out.push(b.into_bytes());
                    }
                }
                out
            })
            .collect();
        assert!(logs[0].len() >= 61, "60 proposals and the leader's no-op");
        assert_eq!(logs[0], logs[1], "replicas store the same bytes at the same offsets");
        assert_eq!(logs[0], logs[2]);
        let offset = nodes[leader].raw.store().offset_after(target);
        assert_eq!(offset, nodes[leader].raw.store().partition_log().log_end_offset());
    }
}
