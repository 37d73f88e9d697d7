//! When a replica's data may be deleted.
//!
//! A replica's directory holds its Raft state (term, vote, configuration) as well as its
//! log: deleting it while the group still counts on it is vote amnesia, a full
//! re-replication, and, with one more replica lost, acknowledged writes gone. So the data
//! goes only when both of these hold (ARCHITECTURE.md section 9):
//! 1. a committed metadata record, applied here from the live log, places the partition's
//!    replicas elsewhere; and
//! 2. the partition's own Raft configuration, as stored with the replica, lists this broker
//!    neither as voter nor as learner.
//!
//! A view of the metadata replayed at start only up to the locally stored commit index may
//! be stale, so nothing is deleted from it: such replicas are kept, opened if their own
//! configuration lists this broker, and decided later, once the applier has applied the
//! whole local metadata log with a leader known (see [`Undecided`]).
//!
//! A replica's own configuration can be stale too: a replica whose broker was down while
//! its group removed it never receives that change (the leader no longer sends to it), so
//! the configuration it stores lists it forever. For condition 2 such a replica asks the
//! group's leader, and takes the leader's configuration in place of its own only when
//! [`leader_confirms_departure`] holds: the answer comes from the leader itself, at a term
//! no older than this replica's, and applied at least up to this replica's last entry. Any
//! configuration entry this replica holds that was committed (the one that added it
//! included) is then in the leader's log and applied there, so the leader's configuration
//! reflects it; one never committed counts for nothing. An error, a timeout or any other
//! answer keeps the data.
//!
//! # Crash behaviour
//! Deciding reads only; a crash before or during a deletion leaves a replica that the next
//! start keeps and decides again.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;

use raft::eraftpb::ConfState;

use super::raft_state::RaftStateFile;
use super::raft_storage::RaftView;

/// Whether a Raft configuration names `me` as voter or learner, joint halves included.
pub fn config_lists(conf: &ConfState, me: u64) -> bool {
    [&conf.voters, &conf.learners, &conf.voters_outgoing, &conf.learners_next]
        .iter()
        .any(|ids| ids.contains(&me))
}

/// Whether the configuration stored with the replica in `dir` names `me`. A state file that
/// cannot be read counts as naming it: damage is never a reason to delete.
pub fn stored_config_lists(dir: &Path, me: u64) -> bool {
    match RaftStateFile::load(dir) {
        Ok(state) => config_lists(&state.conf_state, me),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read a replica's raft state; keeping its data");
            true
        }
    }
}

/// A partition's group as a broker of its current placement describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupReport {
    /// The broker that answered.
    pub from: u32,
    /// The leader that broker knows of (0: none).
    pub leader: u32,
    /// Its configuration, as applied up to `applied`.
    pub conf_state: ConfState,
    pub term: u64,
    pub applied: u64,
}

/// Why a replica still listed by its own configuration is kept after asking its group.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Keep {
    #[error("broker {from} does not report itself the group's leader (it names {leader})")]
    NotLeader { from: u32, leader: u32 },
    #[error("the leader (broker {leader}) still lists this broker in its configuration")]
    StillListed { leader: u32 },
    #[error("the leader's term {theirs} is older than this replica's term {ours}")]
    OlderTerm { theirs: u64, ours: u64 },
    #[error("the leader has applied entries up to {theirs}, this replica holds entries up to {ours}")]
    LeaderBehind { theirs: u64, ours: u64 },
}

/// Whether the group's leader, as `report` describes it, confirms that the group no longer
/// counts on `me`'s replica, whose own state is `own` (see the module documentation).
pub fn leader_confirms_departure(me: u64, own: &RaftView, report: &GroupReport) -> Result<(), Keep> {
    if report.leader == 0 || report.leader != report.from {
        return Err(Keep::NotLeader {
            from: report.from,
            leader: report.leader,
        });
    }
    if config_lists(&report.conf_state, me) {
        return Err(Keep::StillListed { leader: report.from });
    }
    if report.term < own.term {
        return Err(Keep::OlderTerm {
            theirs: report.term,
            ours: own.term,
        });
    }
    if report.applied < own.last_index {
        return Err(Keep::LeaderBehind {
            theirs: report.applied,
            ours: own.last_index,
        });
    }
    Ok(())
}

/// The partition indexes of the replica directories under a topic's directory.
pub fn partition_dirs(topic_dir: &Path) -> std::io::Result<Vec<i32>> {
    let entries = match std::fs::read_dir(topic_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if let Some(p) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
            found.push(p);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Replicas whose data is kept although the metadata known here places them elsewhere,
/// waiting for a decision: (topic, partition).
#[derive(Debug, Default)]
pub struct Undecided {
    replicas: Mutex<BTreeSet<(String, i32)>>,
}

impl Undecided {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<(String, i32)>> {
        self.replicas.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn insert(&self, topic: &str, partition: i32) {
        self.lock().insert((topic.to_string(), partition));
    }

    /// Inserts; whether it was not there yet.
    pub fn insert_new(&self, topic: &str, partition: i32) -> bool {
        self.lock().insert((topic.to_string(), partition))
    }

    pub fn remove(&self, topic: &str, partition: i32) {
        self.lock().remove(&(topic.to_string(), partition));
    }

    /// Forgets every replica of `topic` (deleted: its whole directory goes).
    pub fn remove_topic(&self, topic: &str) {
        self.lock().retain(|(t, _)| t != topic);
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn snapshot(&self) -> Vec<(String, i32)> {
        self.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_lists_voters_learners_and_both_joint_halves() {
        let conf = ConfState {
            voters: vec![1],
            learners: vec![2],
            voters_outgoing: vec![3],
            learners_next: vec![4],
            ..ConfState::default()
        };
        for id in 1..=4 {
            assert!(config_lists(&conf, id), "{id}");
        }
        assert!(!config_lists(&conf, 5));
    }

    fn report(leader: u32, voters: Vec<u64>, learners: Vec<u64>, term: u64, applied: u64) -> GroupReport {
        GroupReport {
            from: 1,
            leader,
            conf_state: ConfState {
                voters,
                learners,
                ..ConfState::default()
            },
            term,
            applied,
        }
    }

    #[test]
    fn a_leader_confirms_a_departure_only_from_a_newer_configuration_without_this_broker() {
        let own = RaftView {
            conf_state: ConfState {
                voters: vec![1, 2, 4],
                ..ConfState::default()
            },
            applied: 40,
            term: 3,
            last_index: 42,
        };
        let me = 4;
        assert_eq!(
            leader_confirms_departure(me, &own, &report(1, vec![1, 2, 3], vec![], 3, 42)),
            Ok(()),
            "every condition holds"
        );
        assert_eq!(
            leader_confirms_departure(me, &own, &report(1, vec![1, 2, 3], vec![], 5, 90)),
            Ok(())
        );
        assert_eq!(
            leader_confirms_departure(me, &own, &report(2, vec![1, 2, 3], vec![], 3, 42)),
            Err(Keep::NotLeader { from: 1, leader: 2 }),
            "an answer from a follower"
        );
        assert_eq!(
            leader_confirms_departure(me, &own, &report(0, vec![1, 2, 3], vec![], 3, 42)),
            Err(Keep::NotLeader { from: 1, leader: 0 }),
            "no leader known"
        );
        assert_eq!(
            leader_confirms_departure(me, &own, &report(1, vec![1, 2, 4], vec![], 3, 42)),
            Err(Keep::StillListed { leader: 1 }),
            "a voter"
        );
        assert_eq!(
            leader_confirms_departure(me, &own, &report(1, vec![1, 2, 3], vec![4], 3, 42)),
            Err(Keep::StillListed { leader: 1 }),
            "a learner"
        );
        let joint = GroupReport {
            conf_state: ConfState {
                voters: vec![1, 2, 3],
                voters_outgoing: vec![1, 2, 4],
                ..ConfState::default()
            },
            ..report(1, vec![], vec![], 3, 42)
        };
        assert_eq!(
            leader_confirms_departure(me, &own, &joint),
            Err(Keep::StillListed { leader: 1 }),
            "an outgoing voter of a joint configuration"
        );
        assert_eq!(
            leader_confirms_departure(me, &own, &report(1, vec![1, 2, 3], vec![], 3, 41)),
            Err(Keep::LeaderBehind { theirs: 41, ours: 42 }),
            "this replica holds an entry the leader has not applied"
        );
        assert_eq!(
            leader_confirms_departure(me, &own, &report(1, vec![1, 2, 3], vec![], 2, 90)),
            Err(Keep::OlderTerm { theirs: 2, ours: 3 }),
            "a leader of an older term"
        );
    }

    #[test]
    fn a_replica_without_state_is_not_listed_and_a_damaged_one_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(
            !stored_config_lists(dir.path(), 4),
            "no state: a replica that never joined"
        );
        let state = RaftStateFile {
            conf_state: ConfState {
                voters: vec![2, 3, 4],
                ..ConfState::default()
            },
            ..RaftStateFile::default()
        };
        state.store(dir.path()).expect("store");
        assert!(stored_config_lists(dir.path(), 4));
        assert!(!stored_config_lists(dir.path(), 1));
        std::fs::write(dir.path().join(super::super::raft_state::FILE_NAME), b"damaged").expect("damage");
        assert!(stored_config_lists(dir.path(), 1), "damage is never a reason to delete");
    }
}
