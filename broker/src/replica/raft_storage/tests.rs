use bytes::Bytes;
use conveyor_storage::batch::{BatchBuilder, Compression, Record, STAMPED_LEN};
use conveyor_storage::{FlushPolicy, LogConfig};
use raft::eraftpb::EntryType;
use raft::{GetEntriesContext, Storage};

use super::*;

pub(super) fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        max_index_bytes: 4096,
        max_batch_bytes: 4096,
        retention_ms: None,
        retention_bytes: Some(8192),
        flush: FlushPolicy::Os,
        ..LogConfig::default()
    }
}

pub(super) fn open(dir: &std::path::Path) -> RaftLog {
    let log = PartitionLog::open(dir, config()).expect("partition log");
    RaftLog::open(Arc::new(log)).expect("raft log")
}

/// Entry `index` of `term`: a client batch, a leader no-op every 10th, a conf change every 25th.
pub(super) fn entry(index: u64, term: u64) -> Entry {
    let mut e = Entry {
        index,
        term,
        ..Entry::default()
    };
    if index.is_multiple_of(25) {
        e.set_entry_type(EntryType::EntryConfChange);
        e.data = Bytes::from(format!("conf-{index}"));
        e.context = Bytes::from("ctx");
    } else if !index.is_multiple_of(10) {
        let mut b = BatchBuilder::new(Compression::None);
        for r in 0..3 {
            b.push(&Record {
                timestamp: 1_000 + index as i64,
                value: Some(Bytes::from(format!(
                    "entry-{index}-term-{term}-record-{r}-{}",
                    "x".repeat(40)
                ))),
                ..Record::default()
            });
        }
        e.data = b.build().expect("batch");
    }
    e
}

pub(super) fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| entry(i, term)).collect()
}

pub(super) fn read_all(raft: &RaftLog) -> Vec<Entry> {
    let (first, last) = (raft.first_index().expect("first"), raft.last_index().expect("last"));
    raft.entries(first, last + 1, None, GetEntriesContext::empty(false))
        .expect("entries")
}

/// Equal entries; a client batch is compared past the prefix the log stamps.
pub(super) fn same(a: &Entry, b: &Entry) -> bool {
    let body = |e: &Entry| match e.get_entry_type() {
        EntryType::EntryNormal if !e.data.is_empty() => e.data.slice(STAMPED_LEN..),
        _ => e.data.clone(),
    };
    a.index == b.index
        && a.term == b.term
        && a.get_entry_type() == b.get_entry_type()
        && body(a) == body(b)
        && a.context == b.context
}

#[test]
fn entries_terms_and_bounds_span_segment_boundaries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = open(dir.path());
    let mut written = entries(1..=50, 1);
    written.extend(entries(51..=100, 2));
    raft.append(&written, entry::Origin::Peer).expect("append");
    raft.persist().expect("persist");
    assert!(raft.partition_log().segment_count() > 3, "entries cross segments");
    assert_eq!(
        (raft.first_index().expect("f"), raft.last_index().expect("l")),
        (1, 100)
    );
    assert_eq!(raft.term(0).expect("term 0"), 0);
    assert_eq!(raft.term(50).expect("term"), 1);
    assert_eq!(raft.term(51).expect("term"), 2);
    assert!(matches!(
        raft.term(101),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
    let read = read_all(&raft);
    assert_eq!(read.len(), 100);
    assert!(
        read.iter().zip(&written).all(|(a, b)| same(a, b)),
        "entries round trip, types included"
    );

    let limited = raft
        .entries(10, 60, 1, GetEntriesContext::empty(false))
        .expect("limited");
    assert_eq!(limited.len(), 1, "at least one entry even over max_size");
    let some = raft
        .entries(30, 40, 2_000, GetEntriesContext::empty(false))
        .expect("some");
    assert!(!some.is_empty() && some.len() < 10 && some[0].index == 30);
}

#[test]
fn a_leader_reading_entries_from_a_quarantined_log_is_told_to_wait_rather_than_given_a_fatal_error() {
    use conveyor_storage::{ScrubCursor, ScrubStep};
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    open(dir.path())
        .append(&entries(1..=60, 1), entry::Origin::Peer)
        .expect("append");
    // Reopened, nothing is cached: entries are read from the segments.
    let raft = open(dir.path());
    let log = Arc::clone(raft.partition_log());
    assert!(log.segment_count() > 2, "entries cross segments");
    let at = log.locate(0).expect("locate").expect("in the first segment");
    let first = conveyor_storage::file_names::segment_file(dir.path(), 0, "log");
    let file = std::fs::OpenOptions::new().write(true).open(first).expect("open");
    file.write_all_at(
        b"\xff\xff",
        at.position + conveyor_storage::batch::HEADER_LEN as u64 + 4,
    )
    .expect("flip");
    let mut cursor = ScrubCursor::start();
    loop {
        match log.scrub_step(cursor, 1 << 20).expect("scrub") {
            ScrubStep::Verified { next, .. } => cursor = next,
            ScrubStep::Corrupt(_) => break,
            ScrubStep::PassComplete => panic!("the scrub finds the flipped bytes"),
        }
    }
    assert!(log.is_poisoned(), "quarantined");

    // Sending appends may wait (raft-rs then sends nothing); anything else fails.
    let sending = raft.entries(1, 10, None, GetEntriesContext::empty(true));
    assert!(
        matches!(
            sending,
            Err(raft::Error::Store(StorageError::LogTemporarilyUnavailable))
        ),
        "{sending:?}"
    );
    let applying = raft.entries(1, 10, None, GetEntriesContext::empty(false));
    assert!(
        matches!(applying, Err(raft::Error::Store(StorageError::Other(_)))),
        "{applying:?}"
    );
}

#[test]
fn a_conflicting_suffix_is_truncated_and_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = open(dir.path());
    raft.append(&entries(1..=40, 1), entry::Origin::Peer).expect("append");
    let end_before = raft.partition_log().log_end_offset();
    raft.append(&entries(31..=33, 2), entry::Origin::Peer)
        .expect("overwrite");
    assert_eq!(raft.last_index().expect("last"), 33);
    assert_eq!(raft.term(30).expect("term"), 1);
    assert_eq!(raft.term(31).expect("term"), 2);
    assert!(raft.partition_log().log_end_offset() < end_before);
    let read = read_all(&raft);
    assert_eq!(
        read.iter().map(|e| e.index).collect::<Vec<_>>(),
        (1..=33).collect::<Vec<_>>()
    );
    assert!(same(&read[31], &entry(32, 2)));
    assert!(
        matches!(
            raft.append(&entries(40..=41, 2), entry::Origin::Peer),
            Err(ReplicaError::Inconsistent { .. })
        ),
        "gaps are refused"
    );
}

#[test]
fn a_retired_view_does_not_store_the_recovering_state() {
    use crate::replica::raft_state::Promise;
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = open(dir.path());
    raft.retire();
    let promise = Promise { term: 2, index: 9 };
    assert!(raft.set_recovering(Some(promise)).is_err(), "refused");
    assert_eq!(raft.recovering(), None, "unchanged in memory");
    assert_eq!(
        RaftStateFile::load(dir.path()).expect("load").recovering,
        None,
        "nor written"
    );
}

#[test]
fn reopening_rebuilds_entries_and_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let raft = open(dir.path());
        raft.append(&entries(1..=30, 3), entry::Origin::Peer).expect("append");
        raft.persist().expect("persist");
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 25,
            ..HardState::default()
        };
        raft.set_hard_state(&hs).expect("hard state");
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..ConfState::default()
        };
        raft.set_conf_state(&cs).expect("conf state");
    }
    let raft = open(dir.path());
    let state = raft.initial_state().expect("state");
    assert_eq!(
        (state.hard_state.term, state.hard_state.vote, state.hard_state.commit),
        (3, 2, 25)
    );
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(raft.last_index().expect("last"), 30);
    assert!(read_all(&raft).iter().zip(&entries(1..=30, 3)).all(|(a, b)| same(a, b)));
    assert_eq!(raft.offset_after(30), raft.partition_log().log_end_offset());
}

#[test]
fn given_a_lowered_size_limit_replicated_batches_accepted_before_are_stored_and_corrupt_ones_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = open(dir.path());
    let mut b = BatchBuilder::new(Compression::None);
    b.push(&Record {
        value: Some(Bytes::from(vec![b'x'; 3_000])),
        ..Record::default()
    });
    let big = Entry {
        index: 1,
        term: 1,
        data: b.build().expect("batch"),
        ..Entry::default()
    };
    assert!(big.data.len() > 2_048);
    raft.partition_log()
        .set_config(LogConfig {
            max_batch_bytes: 1_024,
            ..config()
        })
        .expect("lower the limit");
    raft.append(std::slice::from_ref(&big), entry::Origin::Peer)
        .expect("a batch its leader accepted under the old limit is replicated");
    assert_eq!(raft.last_index().expect("last"), 1);

    let mut damaged = big.clone();
    damaged.index = 2;
    let mut bytes = damaged.data.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    damaged.data = Bytes::from(bytes);
    assert!(
        matches!(
            raft.append(&[damaged], entry::Origin::Peer),
            Err(ReplicaError::Entry(EntryError::NotABatch { index: 2, .. }))
        ),
        "integrity is still checked"
    );
}

#[test]
fn only_committed_entries_are_compacted_and_a_snapshot_moves_a_follower() {
    let dir = tempfile::tempdir().expect("tempdir");
    let leader = open(&dir.path().join("leader"));
    leader
        .append(&entries(1..=120, 1), entry::Origin::Peer)
        .expect("append");
    assert_eq!(
        leader.compact(conveyor_storage::unix_millis()).expect("compact"),
        0,
        "nothing committed yet"
    );
    let hs = HardState {
        term: 1,
        commit: 120,
        ..HardState::default()
    };
    leader.set_hard_state(&hs).expect("commit");
    assert_eq!(
        leader.compact(conveyor_storage::unix_millis()).expect("compact"),
        0,
        "committed but not applied yet"
    );
    leader.evict_cache_to(120);
    let removed = leader.compact(conveyor_storage::unix_millis()).expect("compact");
    assert!(removed > 0);
    let first = leader.first_index().expect("first");
    assert_eq!(first, removed as u64 + 1);
    assert_eq!(leader.term(first - 1).expect("term kept for matching"), 1);
    assert!(matches!(
        leader.entries(1, 3, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    let start = leader.partition_log().log_start_offset();
    assert!(start > 0);

    let snapshot = leader.snapshot(0, 2).expect("snapshot");
    assert_eq!(snapshot.get_metadata().index, first - 1);
    assert_eq!(snapshot_offset(&snapshot), Some(start));

    let follower = open(&dir.path().join("follower"));
    follower
        .append(&entries(1..=5, 1), entry::Origin::Peer)
        .expect("stale prefix");
    follower.apply_snapshot(&snapshot).expect("apply snapshot");
    assert_eq!(follower.first_index().expect("first"), first);
    assert_eq!(follower.partition_log().log_start_offset(), start);
    let rest = leader
        .entries(first, 121, None, GetEntriesContext::empty(false))
        .expect("rest");
    follower.append(&rest, entry::Origin::Peer).expect("catch up");
    assert_eq!(
        follower.partition_log().log_end_offset(),
        leader.partition_log().log_end_offset(),
        "same entries, same offsets"
    );
    drop(follower);
    let reopened = open(&dir.path().join("follower"));
    assert_eq!(reopened.first_index().expect("first"), first);
    assert_eq!(reopened.last_index().expect("last"), 120);
}
