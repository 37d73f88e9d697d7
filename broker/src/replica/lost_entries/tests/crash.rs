//! Power cuts and damage found by crash recovery under flush policy `always`: a replica
//! promises what it acknowledged, and nothing it did not.

use std::path::{Path, PathBuf};

use super::*;

/// Each segment file of the log in `dir` with its length: what a power cut now keeps.
fn synced_lengths(dir: &Path) -> Vec<(PathBuf, u64)> {
    std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| {
            let len = std::fs::metadata(&p).expect("stat").len();
            (p, len)
        })
        .collect()
}

/// A power cut: every segment file goes back to its length in `synced`, and segments created
/// since are gone (`raft-state` is replaced durably, so it stays as last stored).
fn power_cut(dir: &Path, synced: &[(PathBuf, u64)]) {
    for (path, _) in synced_lengths(dir) {
        match synced.iter().find(|(p, _)| *p == path) {
            Some((_, len)) => std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open")
                .set_len(*len)
                .expect("cut"),
            None => {
                for suffix in ["log", "index", "timeindex"] {
                    let _ = std::fs::remove_file(path.with_extension(suffix));
                }
            }
        }
    }
}

#[test]
fn given_a_power_cut_before_a_ready_s_entries_are_synced_the_replica_promises_none_of_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    // (term of the new entries, whether the in-memory commit is stored before the cut, as the
    // supervisor does when it reopens a replica whose persist failed)
    for (term, flush_state) in [(8, false), (7, true)] {
        let path = dir.path().join(format!("{term}-{flush_state}"));
        let raft = storage_with(&path, FlushPolicy::Always);
        synced_entries(&raft, 3, 7, 7, 3);
        let synced = synced_lengths(&path);
        // One Ready, handled as `on_ready` does: its entries appended, then its HardState
        // stored, with a commit that covers them (raft-rs sets a follower's so) ...
        raft.append(&[entry_at(4, term), entry_at(5, term), entry_at(6, term)], Origin::Peer)
            .expect("append");
        raft.set_hard_state(&HardState {
            term,
            vote: if term == 7 { 1 } else { 0 },
            commit: 5,
            ..HardState::default()
        })
        .expect("hard state");
        if flush_state {
            raft.flush_state().expect("flush state");
        }
        // ... and the power goes before `persist`: nothing of it was acknowledged.
        drop(raft);
        power_cut(&path, &synced);
        let raft = storage_with(&path, FlushPolicy::Always);
        assert_eq!(raft.last_index().expect("last"), 3, "the unsynced entries are gone");
        assert_eq!(
            raft.recovering(),
            None,
            "term {term}, flush_state {flush_state}: entries never synced were never acknowledged"
        );
        assert_eq!(
            raft.initial_state().expect("state").hard_state.term,
            term,
            "the term is stored before the Ready's messages go"
        );
    }
}

/// Entries 1..=40 persisted under `always`, entry 10's batch then damaged on disk and the
/// log reopened as after a crash; `commit` is the commit stored with them.
fn reopen_after_damage_at_entry_10(dir: &std::path::Path, commit: u64) -> RaftLog {
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        index_interval_bytes: 256,
        ..log_config(FlushPolicy::Always)
    };
    let open = || {
        let log = PartitionLog::open(dir, config.clone()).expect("log");
        RaftLog::open(Arc::new(log)).expect("raft log")
    };
    let raft = open();
    synced_entries(&raft, 40, 3, 3, commit);
    let at = raft
        .partition_log()
        .locate(raft.offset_of(10).expect("offset"))
        .expect("locate")
        .expect("batch");
    assert_eq!(raft.partition_log().segment_count(), 1);
    drop(raft);
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(last_segment(dir))
            .expect("open");
        file.write_all_at(
            b"\xff\xff",
            at.position + conveyor_storage::batch::HEADER_LEN as u64 + 4,
        )
        .expect("flip");
    }
    let raft = open();
    assert_eq!(raft.last_index().expect("last"), 9, "cut at the damaged entry");
    assert!(
        matches!(
            raft.partition_log().recovery_report().cut.map(|c| c.cause),
            Some(conveyor_storage::CutCause::Damage { .. })
        ),
        "storage reports intact batches after the bad frame"
    );
    raft
}

#[test]
fn under_flush_always_a_damaged_frame_followed_by_intact_entries_promises_only_what_the_stored_commit_proves() {
    // The batches of one fsync reach the disk in any order: intact batches after a bad frame
    // may be pages of a Ready whose sync never completed, never acknowledged. Promising them
    // could stall a group whose surviving logs all lack them.
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = reopen_after_damage_at_entry_10(dir.path(), 0);
    assert_eq!(
        raft.recovering(),
        None,
        "intact batches after the bad frame prove nothing"
    );

    // A commit stored after the sync proves entries up to it were acknowledged.
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = reopen_after_damage_at_entry_10(dir.path(), 30);
    assert_eq!(
        raft.recovering(),
        Some(Promise { term: 3, index: 30 }),
        "the stored commit covers synced entries the cut dropped"
    );
}
