//! Starting the controller group: the entries a broker that founds a cluster writes, and the
//! log configuration of the metadata log.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use conveyor_storage::{FlushPolicy, LogConfig};

/// Marks a controller replica that joined a running cluster: it must never bootstrap one.
pub(super) const JOINED_FILE: &str = "joined";

/// Writes the controller group's first entries on a broker that starts a new cluster: one
/// membership change per initial voter, committed in term 1, the same bytes on every
/// founding broker. A broker that joins later replays them from the leader and so starts
/// from the same membership as everyone else. Blocking.
pub(super) fn bootstrap_metadata(dir: &Path, voters: &[u32]) -> anyhow::Result<()> {
    use protobuf::Message as _;
    use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState};

    use crate::replica::entry::Origin;
    use crate::replica::raft_storage::RaftLog;

    let log = Arc::new(conveyor_storage::PartitionLog::open(dir, metadata_config())?);
    let raft = RaftLog::open(Arc::clone(&log))?;
    if raft.voters().is_empty() {
        if raft::Storage::last_index(&raft)? == 0 {
            let mut entries = Vec::new();
            for (i, &voter) in voters.iter().enumerate() {
                let mut cc = ConfChange::default();
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = u64::from(voter);
                let mut entry = Entry {
                    index: i as u64 + 1,
                    term: 1,
                    data: Bytes::from(cc.write_to_bytes()?),
                    ..Entry::default()
                };
                entry.set_entry_type(EntryType::EntryConfChange);
                entries.push(entry);
            }
            raft.append(&entries, Origin::Peer)?;
            raft.persist()?;
        }
        let hard_state = HardState {
            term: 1,
            commit: voters.len() as u64,
            ..HardState::default()
        };
        raft.set_hard_state(&hard_state)?;
        raft.set_conf_state(&ConfState {
            voters: voters.iter().map(|&v| u64::from(v)).collect(),
            ..ConfState::default()
        })?;
        raft.flush_state()?;
    }
    // `RaftLog::close`, not the partition log's: the open above took the term checkpoints a
    // clean close left, and the real open after this one should find them again.
    raft.close()?;
    Ok(())
}

pub(super) fn metadata_config() -> LogConfig {
    LogConfig {
        flush: FlushPolicy::Always,
        retention_ms: None,
        segment_bytes: 64 << 20,
        ..LogConfig::default()
    }
}
