//! Opening a Raft log: what a clean close lets the next open skip, and what it must not.

use std::sync::Arc;

use conveyor_storage::{PartitionLog, batch_headers_read_on_this_thread};
use raft::Storage;

use super::tests::{config, entries, open, read_all, same};
use super::*;

/// Entries 1..=400 in terms 1, 2 and 5 over many small segments; returns each entry's offset.
fn fill(raft: &RaftLog) -> Vec<u64> {
    raft.append(&entries(1..=100, 1), entry::Origin::Peer).expect("append");
    raft.append(&entries(101..=250, 2), entry::Origin::Peer)
        .expect("append");
    raft.append(&entries(251..=400, 5), entry::Origin::Peer)
        .expect("append");
    raft.persist().expect("persist");
    (1..=400).map(|i| raft.offset_of(i).expect("offset")).collect()
}

fn assert_terms(raft: &RaftLog, expected: &[(u64, u64)]) {
    for &(index, term) in expected {
        assert_eq!(raft.term(index).expect("term"), term, "term of entry {index}");
    }
}

#[test]
fn reopening_after_a_clean_close_reads_a_bounded_number_of_batch_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let offsets = {
        let raft = open(dir.path());
        let offsets = fill(&raft);
        raft.close().expect("close");
        offsets
    };
    let log = Arc::new(PartitionLog::open(dir.path(), config()).expect("log"));
    assert!(log.segment_count() > 10, "entries span many segments");
    let before = batch_headers_read_on_this_thread();
    let raft = RaftLog::open(log).expect("raft log");
    let read = batch_headers_read_on_this_thread() - before;
    // Two lookups (first and last entry): a bisection over ~20 segments and their index,
    // then a walk of at most one index interval each. The old open read every header.
    assert!(
        read <= 16,
        "opening 400 entries after a clean close read {read} batch headers"
    );
    assert_eq!(
        (raft.first_index().expect("first"), raft.last_index().expect("last")),
        (1, 400)
    );
    assert_terms(&raft, &[(1, 1), (100, 1), (101, 2), (250, 2), (251, 5), (400, 5)]);
    let found: Vec<u64> = (1..=400).map(|i| raft.offset_of(i).expect("offset")).collect();
    assert_eq!(found, offsets);
    assert_eq!(raft.offset_after(0), 0);
    assert_eq!(raft.offset_after(399), offsets[399]);
    assert_eq!(raft.offset_after(400), raft.partition_log().log_end_offset());
    assert_eq!(raft.last_entry(), Promise { term: 5, index: 400 });
    let all = read_all(&raft);
    assert_eq!(all.len(), 400);
    assert!(same(&all[150], &super::tests::entry(151, 2)));
}

#[test]
fn checkpoints_a_clean_close_left_are_not_trusted_after_later_writes_and_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let raft = open(dir.path());
        fill(&raft);
        raft.close().expect("close");
    }
    let file = dir.path().join(terms::FILE_NAME);
    let left = std::fs::read(&file).expect("a clean close leaves the checkpoints");
    {
        let raft = open(dir.path());
        assert!(raft.partition_log().opened_clean());
        assert!(!file.exists(), "read and removed at open");
        // Entries 200..=400 rewritten in term 5: same end index, same end offset, same first
        // and last terms as the file says, only the checkpoints differ.
        raft.append(&entries(200..=400, 5), entry::Origin::Peer)
            .expect("overwrite");
        raft.persist().expect("persist");
        raft.partition_log().flush().expect("flush");
        // Dropped without a clean close: a crash.
    }
    // As if the file's removal had been lost.
    std::fs::write(&file, left).expect("put the old file back");
    let raft = open(dir.path());
    assert!(!raft.partition_log().opened_clean());
    assert_terms(&raft, &[(199, 2), (200, 5), (250, 5), (400, 5)]);
    assert_eq!(raft.last_entry(), Promise { term: 5, index: 400 });
}

#[test]
fn after_a_crash_the_checkpoints_are_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let offsets = {
        let raft = open(dir.path());
        let offsets = fill(&raft);
        raft.append(&entries(401..=401, 6), entry::Origin::Peer)
            .expect("append");
        raft.append(&entries(402..=420, 9), entry::Origin::Peer)
            .expect("append");
        raft.partition_log().flush().expect("flush");
        offsets
    };
    let raft = open(dir.path());
    assert_terms(
        &raft,
        &[
            (1, 1),
            (100, 1),
            (101, 2),
            (250, 2),
            (251, 5),
            (400, 5),
            (401, 6),
            (402, 9),
            (420, 9),
        ],
    );
    assert_eq!(raft.last_entry(), Promise { term: 9, index: 420 });
    assert_eq!(raft.offset_of(77), Some(offsets[76]));
    // And a clean close after that open stores what it rebuilt.
    raft.close().expect("close");
    let raft = open(dir.path());
    assert!(raft.partition_log().opened_clean());
    assert_terms(&raft, &[(250, 2), (251, 5), (401, 6), (402, 9)]);
}

/// Each entry's offset, as the log's batch headers say.
fn offsets_in_log(raft: &RaftLog) -> Vec<u64> {
    let mut out = Vec::new();
    raft.partition_log()
        .for_each_batch_header(0, |h| {
            assert_eq!(h.raft_index, out.len() as u64 + 1);
            out.push(h.base_offset);
            true
        })
        .expect("headers");
    out
}

#[test]
fn offsets_and_terms_past_the_recent_window_come_from_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = open(dir.path());
    let n = TAIL_OFFSETS as u64 + 500;
    raft.append(&entries(1..=600, 1), entry::Origin::Peer).expect("append");
    raft.append(&entries(601..=n, 2), entry::Origin::Peer).expect("append");
    let truth = offsets_in_log(&raft);
    for i in 1..=n {
        assert_eq!(raft.offset_of(i), Some(truth[i as usize - 1]), "offset of entry {i}");
    }
    for i in 1..n {
        assert_eq!(raft.offset_after(i), truth[i as usize], "offset after entry {i}");
    }
    assert_eq!(raft.offset_of(n + 1), None);
    // A truncation far behind the recent window.
    raft.append(&entries(100..=110, 3), entry::Origin::Peer)
        .expect("overwrite");
    let truth = offsets_in_log(&raft);
    assert_eq!(truth.len(), 110);
    for i in 1..=110 {
        assert_eq!(raft.offset_of(i), Some(truth[i as usize - 1]), "offset of entry {i}");
    }
    assert_terms(&raft, &[(99, 1), (100, 3), (110, 3)]);
    assert_eq!(raft.offset_after(110), raft.partition_log().log_end_offset());
    let all = read_all(&raft);
    assert_eq!(all.len(), 110);
    assert!(same(&all[104], &super::tests::entry(105, 3)));
}

#[test]
fn compaction_trims_the_checkpoints_and_a_clean_reopen_keeps_the_snapshot_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, end) = {
        let raft = open(dir.path());
        fill(&raft);
        let hs = HardState {
            term: 5,
            commit: 400,
            ..HardState::default()
        };
        raft.set_hard_state(&hs).expect("commit");
        raft.evict_cache_to(400);
        let removed = raft.compact(conveyor_storage::unix_millis()).expect("compact");
        assert!(removed > 100, "retention removes entries of the first terms");
        let first = raft.first_index().expect("first");
        assert_eq!(
            raft.term(first - 1).expect("snapshot term"),
            if first > 251 { 5 } else { 2 }
        );
        assert_eq!(raft.offset_of(first), Some(raft.partition_log().log_start_offset()));
        let end = raft.partition_log().log_end_offset();
        raft.close().expect("close");
        (first, end)
    };
    let raft = open(dir.path());
    assert!(raft.partition_log().opened_clean());
    assert_eq!(raft.first_index().expect("first"), first);
    assert_eq!(raft.last_index().expect("last"), 400);
    assert_eq!(raft.partition_log().log_end_offset(), end);
    assert_eq!(raft.offset_of(first), Some(raft.partition_log().log_start_offset()));
    assert_terms(&raft, &[(first, if first > 250 { 5 } else { 2 }), (400, 5)]);
    let snapshot = raft.snapshot(0, 2).expect("snapshot");
    assert_eq!(
        snapshot_offset(&snapshot),
        Some(raft.partition_log().log_start_offset())
    );
    assert_eq!(read_all(&raft).len() as u64, 401 - first);
}

#[test]
fn the_last_entry_offset_is_known_after_open_without_reading_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let offsets = {
        let raft = open(dir.path());
        let offsets = fill(&raft);
        raft.close().expect("close");
        offsets
    };
    let raft = open(dir.path());
    // The high watermark after an election asks for these on every round.
    let before = batch_headers_read_on_this_thread();
    assert_eq!(raft.offset_of(400), Some(offsets[399]));
    assert_eq!(raft.offset_after(399), offsets[399]);
    let read = batch_headers_read_on_this_thread() - before;
    assert_eq!(
        read, 0,
        "the offset of the last entry after an open read {read} batch headers"
    );
}

#[test]
fn compacting_below_an_offset_the_log_no_longer_holds_removes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = open(dir.path());
    let offsets = fill(&raft);
    let hs = HardState {
        term: 5,
        commit: 400,
        ..HardState::default()
    };
    raft.set_hard_state(&hs).expect("commit");
    raft.evict_cache_to(400);
    assert_eq!(raft.compact_below(offsets[200]).expect("compact"), 200);
    assert!(
        raft.partition_log().log_start_offset() > 0,
        "segments below entry 201 are deleted"
    );
    // A stale cutoff from before the log's start (a snapshot point older than the log).
    assert_eq!(raft.compact_below(0).expect("compact below the start"), 0);
    assert_eq!(raft.first_index().expect("first"), 201);
    assert_eq!(read_all(&raft).len(), 200);
}
