//! On a leader: followers left waiting for a snapshot that never arrived.
//!
//! raft-rs pauses a follower it sent a snapshot to (progress state `Snapshot`: no appends,
//! and heartbeats do not resume it) until it is told how the snapshot went. The transport
//! reports the drops it sees (see [`super::inbound`]), but a snapshot can also be lost where
//! nobody reports it: at a receiver whose inbox is full, whose group is not open yet or whose
//! replica is stopped, or with the report itself dropped under overload. Without an answer the
//! follower would stay paused until the leader changes.
//!
//! # The rule
//! A follower whose progress has stayed in `Snapshot` state, for the same pending snapshot,
//! for [`STALL_ELECTION_TIMEOUTS`] election timeouts of ticks is reported as a failed
//! snapshot; raft-rs then probes it again (and sends a new snapshot if it still needs one).
//! A partition's snapshot carries only where the log starts, and the controller's adds its
//! state, which the follower writes down durably before it answers (it applies it later);
//! so a live follower answers one within a round trip and a file write; a false report
//! costs one more probe, never safety.
//!
//! # Crash behaviour
//! Nothing is stored: a new leader starts with fresh progress.

use std::collections::HashMap;

use raft::{ProgressState, RawNode, SnapshotStatus, StateRole};

use super::raft_storage::RaftLog;

/// Election timeouts a follower may wait for a snapshot before it is reported failed.
pub const STALL_ELECTION_TIMEOUTS: usize = 5;

/// How long each follower has been waiting for its pending snapshot, in ticks.
#[derive(Debug, Default)]
pub struct StalledSnapshots {
    waiting: HashMap<u64, (u64, usize)>,
}

impl StalledSnapshots {
    /// Call on every tick; reports the followers that waited too long and returns their ids.
    pub fn on_tick(&mut self, node: &mut RawNode<RaftLog>) -> Vec<u64> {
        if node.raft.state != StateRole::Leader {
            self.waiting.clear();
            return Vec::new();
        }
        let limit = STALL_ELECTION_TIMEOUTS * node.raft.election_timeout().max(1);
        let mut stalled = Vec::new();
        let mut still = HashMap::new();
        for (&id, progress) in node.raft.prs().iter() {
            if progress.state != ProgressState::Snapshot {
                continue;
            }
            let pending = progress.pending_snapshot;
            let ticks = match self.waiting.get(&id) {
                Some(&(p, t)) if p == pending => t + 1,
                _ => 1,
            };
            if ticks >= limit {
                stalled.push(id);
            } else {
                still.insert(id, (pending, ticks));
            }
        }
        self.waiting = still;
        for &id in &stalled {
            tracing::warn!(
                follower = id,
                ticks = limit,
                "a follower waited too long for a snapshot; it is probed again"
            );
            node.report_snapshot(id, SnapshotStatus::Failure);
        }
        stalled
    }
}
