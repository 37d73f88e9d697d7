//! `PartitionLog::appends_in_memory`: the broker writes an append on a partition's own task
//! only when this says the append and the flush policy need no more than the page cache.
//! A wrong `true` would put an fsync or a segment roll on the broker's reactor.

mod common;

use std::time::Duration;

use common::{batch, small_config};
use conveyor_storage::{FlushPolicy, PartitionLog};

#[test]
fn under_flush_os_a_small_append_stays_in_memory_until_it_would_roll_the_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config(FlushPolicy::Os);
    let segment_bytes = config.segment_bytes;
    let log = PartitionLog::open(dir.path(), config).expect("open");
    assert!(log.appends_in_memory(1, 100));
    assert!(
        !log.appends_in_memory(4, segment_bytes + 1),
        "a run of batches into an empty segment rolls on the one that no longer fits"
    );
    let b = batch(1, 3, 1_700_000_000_000);
    log.append(&b).expect("append");
    assert!(log.appends_in_memory(1, b.len() as u64));
    assert!(log.appends_in_memory(0, 0));
    assert!(
        !log.appends_in_memory(1, segment_bytes),
        "an append that fills the segment past its size rolls it, which creates files"
    );
    while log.segment_count() == 1 {
        log.append(&b).expect("append");
    }
    assert!(
        log.appends_in_memory(1, b.len() as u64),
        "a fresh active segment has room again"
    );
}

#[test]
fn under_flush_always_only_a_round_with_nothing_to_sync_stays_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("open");
    let b = batch(1, 3, 1_700_000_000_000);
    log.append(&b).expect("append (synced)");
    assert!(
        log.appends_in_memory(0, 0),
        "nothing appended, nothing unsynced: no fsync"
    );
    assert!(
        !log.appends_in_memory(1, 1),
        "anything appended must be fsynced before it is acknowledged"
    );
    assert!(
        !log.appends_in_memory(1, 0),
        "a batch whose entry carries no bytes (a Raft no-op) is still a batch to sync"
    );
    log.append_unsynced(&b).expect("append unsynced");
    assert!(
        !log.appends_in_memory(0, 0),
        "an unsynced append is synced by the next round, even with nothing new"
    );
}

#[test]
fn under_flush_interval_only_a_round_with_nothing_to_sync_stays_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let b = batch(1, 3, 1_700_000_000_000);
    let log = PartitionLog::open(
        dir.path(),
        small_config(FlushPolicy::Interval(Duration::from_secs(3600))),
    )
    .expect("open");
    assert!(log.appends_in_memory(0, 0), "nothing unsynced: nothing to sync");
    assert!(
        !log.appends_in_memory(1, b.len() as u64),
        "the interval may fall due between the question and the sync"
    );
    log.append_unsynced(&b).expect("append");
    assert!(!log.appends_in_memory(0, 0));
}

#[test]
fn an_append_near_the_segment_age_limit_does_not_stay_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = small_config(FlushPolicy::Os);
    config.segment_ms = Duration::from_millis(500);
    let log = PartitionLog::open(dir.path(), config).expect("open");
    let b = batch(1, 3, 1_700_000_000_000);
    log.append(&b).expect("append");
    assert!(
        !log.appends_in_memory(1, b.len() as u64),
        "within the margin of a roll by age, the append may roll"
    );
}

#[test]
fn an_append_that_would_fill_the_indexes_does_not_stay_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = small_config(FlushPolicy::Os);
    // Room in the segment for far more bytes than the indexes can point into.
    config.segment_bytes = 1 << 20;
    let (interval, index_bytes) = (config.index_interval_bytes, config.max_index_bytes);
    let log = PartitionLog::open(dir.path(), config).expect("open");
    log.append(&batch(1, 3, 1_700_000_000_000)).expect("append");
    assert!(log.appends_in_memory(2, interval * 4));
    // An index entry per `interval` bytes: more than either index (8 or 12 bytes an entry) holds.
    let bytes = interval * (index_bytes / 8 + 1);
    assert!(bytes < 1 << 20);
    assert!(!log.appends_in_memory(2, bytes));
}

#[test]
fn a_closed_log_never_says_an_append_stays_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    assert!(log.appends_in_memory(1, 10));
    log.close().expect("close");
    assert!(!log.appends_in_memory(1, 10));
}

#[test]
fn a_read_of_the_active_segment_is_done_in_place_and_one_of_an_older_segment_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    let b = batch(1, 3, 1_700_000_000_000);
    while log.segment_count() == 1 {
        log.append(&b).expect("append");
    }
    let end = log.log_end_offset();
    let last = end - 3;
    let in_place = log.read_up_to_in_place(last, 1 << 20, end).expect("read");
    assert_eq!(
        in_place,
        Some(log.read_up_to(last, 1 << 20, end).expect("read")),
        "just written, so cached: the same bytes as a read that may wait"
    );
    assert_eq!(
        log.read_up_to_in_place(0, 1 << 20, end).expect("read"),
        None,
        "an older segment's index may not be resident: not tried"
    );
}
