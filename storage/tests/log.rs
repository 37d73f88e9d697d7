//! Behaviour of `PartitionLog` through its public API.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{batch, batch_bases, files_with, read_all, small_config};
use conveyor_storage::batch::{BatchBuilder, BatchIter, Compression, Record, stamp};
use conveyor_storage::{BatchError, FlushPolicy, LogConfig, LogError, PartitionLog, crash_sim, unix_millis};

#[test]
fn appends_get_contiguous_offsets_and_read_back_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    for i in 0..50 {
        let info = log.append(&batch(i, 10, 1_000)).expect("append");
        assert_eq!(info.base_offset, i * 10);
        assert_eq!(info.last_offset, i * 10 + 9);
    }
    assert_eq!(log.log_end_offset(), 500);
    let records = read_all(&log, 4096);
    assert_eq!(records.len(), 500);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
        let expected = format!("batch-{}-record-{}-", i / 10, i % 10);
        assert!(r.value.as_ref().expect("value").starts_with(expected.as_bytes()));
    }
}

#[test]
fn segments_roll_at_segment_bytes_and_reads_cross_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    let one = batch(0, 10, 1).len() as u64;
    for i in 0..100 {
        log.append(&batch(i, 10, 1)).expect("append");
    }
    let per_segment = 16 * 1024 / one;
    assert_eq!(log.segment_count() as u64, 100_u64.div_ceil(per_segment));
    let names: Vec<String> = files_with(dir.path(), "log")
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(names[0], "00000000000000000000.log");
    assert_eq!(names[1], format!("{:020}.log", per_segment * 10));
    assert_eq!(read_all(&log, 1000).len(), 1000);
}

#[test]
fn a_full_index_rolls_the_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_bytes: 1 << 20,
        index_interval_bytes: 1,
        max_index_bytes: 64,
        ..small_config(FlushPolicy::Os)
    };
    let log = PartitionLog::open(dir.path(), config).expect("open");
    for i in 0..30 {
        log.append(&batch(i, 1, 1)).expect("append");
    }
    // 64 bytes hold 8 offset entries; every batch but a segment's first gets one, so a
    // segment holds 9 batches before its index is full.
    assert_eq!(log.segment_count(), 4, "index capacity must roll segments");
    assert_eq!(read_all(&log, 100).len(), 30);
}

#[test]
fn segment_ms_rolls_a_segment_whose_first_batch_is_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_ms: Duration::from_secs(3600),
        ..small_config(FlushPolicy::Os)
    };
    let eight_days_ago = unix_millis() - 8 * 24 * 3600 * 1000;
    {
        let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
        log.append(&batch(0, 1, eight_days_ago)).expect("append");
        log.close().expect("close");
    }
    let log = PartitionLog::open(dir.path(), config).expect("reopen");
    assert_eq!(log.segment_count(), 1);
    log.append(&batch(1, 1, unix_millis())).expect("append");
    assert_eq!(log.segment_count(), 2, "an old active segment rolls on the next append");
    log.append(&batch(2, 1, unix_millis())).expect("append");
    assert_eq!(log.segment_count(), 2, "a fresh segment does not roll");
}

#[test]
fn lookup_finds_the_batch_holding_any_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    for i in 0..200 {
        log.append(&batch(i, 5, 1)).expect("append");
    }
    for offset in [0, 1, 4, 5, 77, 500, 999] {
        let found = log.locate(offset).expect("locate").expect("present");
        assert_eq!(found.batch_base_offset, offset / 5 * 5, "offset {offset}");
        let bytes = log.read(offset, 1).expect("read");
        let first = BatchIter::new(bytes).next().expect("a batch").expect("whole");
        assert!(first.header().base_offset <= offset && offset <= first.header().last_offset());
    }
    assert_eq!(log.locate(1000).expect("locate"), None);
}

#[test]
fn read_returns_whole_batches_within_max_bytes_but_at_least_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    let size = batch(0, 10, 1).len();
    for i in 0..20 {
        log.append(&batch(i, 10, 1)).expect("append");
    }
    assert_eq!(
        log.read(0, 1).expect("read").len(),
        size,
        "one batch even if over max_bytes"
    );
    assert_eq!(log.read(0, size * 3 + size / 2).expect("read").len(), size * 3);
    assert!(log.read(200, 1000).expect("read at end").is_empty());
    let bounded = log.read_up_to(0, 1 << 20, 30).expect("read up to");
    assert_eq!(BatchIter::new(bounded).count(), 3, "nothing at or above max_offset");
}

#[test]
fn reads_outside_the_log_are_out_of_range_with_bounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    log.append(&batch(0, 10, 1)).expect("append");
    match log.read(11, 100) {
        Err(LogError::OffsetOutOfRange {
            requested: 11,
            log_start_offset: 0,
            log_end_offset: 10,
        }) => {}
        other => panic!("expected out of range, got {other:?}"),
    }
}

#[test]
fn offset_for_timestamp_returns_the_first_record_at_or_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    for i in 0..300i64 {
        let mut b = BatchBuilder::new(Compression::Lz4);
        for j in 0..4 {
            b.push(&Record {
                timestamp: 10_000 + i * 10 + j,
                value: Some(Bytes::from("v")),
                ..Record::default()
            });
        }
        log.append(&b.build().expect("build")).expect("append");
    }
    assert!(log.segment_count() > 1);
    assert_eq!(log.offset_for_timestamp(0).expect("lookup"), Some(0));
    assert_eq!(log.offset_for_timestamp(10_000).expect("lookup"), Some(0));
    assert_eq!(log.offset_for_timestamp(10_002).expect("lookup"), Some(2));
    assert_eq!(log.offset_for_timestamp(10_005).expect("lookup"), Some(4));
    assert_eq!(log.offset_for_timestamp(11_503).expect("lookup"), Some(603));
    assert_eq!(log.offset_for_timestamp(12_993).expect("lookup"), Some(1199));
    assert_eq!(log.offset_for_timestamp(12_994).expect("lookup"), None);
}

#[test]
fn truncate_to_drops_a_suffix_across_segments_and_appends_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("open");
    for i in 0..100 {
        log.append(&batch(i, 10, 1)).expect("append");
    }
    let segments = log.segment_count();
    assert!(matches!(
        log.truncate_to(305),
        Err(LogError::NotBatchBoundary {
            offset: 305,
            batch_start: 300
        })
    ));
    log.truncate_to(300).expect("truncate");
    assert_eq!(log.log_end_offset(), 300);
    assert!(log.segment_count() < segments);
    assert!(matches!(log.read(310, 100), Err(LogError::OffsetOutOfRange { .. })));
    let info = log.append(&batch(999, 10, 1)).expect("append after truncate");
    assert_eq!(info.base_offset, 300);
    drop(log);
    // Reopen without a clean close: recovery must agree with the truncation.
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("reopen");
    let records = read_all(&log, 1 << 20);
    assert_eq!(records.len(), 310);
    assert!(records[305].value.as_ref().expect("v").starts_with(b"batch-999-"));
}

#[test]
fn truncate_fully_and_start_at_moves_the_log_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("open");
    for i in 0..50 {
        log.append(&batch(i, 10, 1)).expect("append");
    }
    log.truncate_fully_and_start_at(10_000).expect("reset");
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (10_000, 10_000));
    assert_eq!(log.append(&batch(0, 1, 1)).expect("append").base_offset, 10_000);
    drop(log);
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("reopen");
    assert_eq!((log.log_start_offset(), log.log_end_offset()), (10_000, 10_001));
}

#[test]
fn append_replicated_requires_continuity_and_keeps_stamps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    let mut b = batch(0, 3, 1).to_vec();
    stamp(&mut b, 5, 2, 9);
    assert!(matches!(
        log.append_replicated(&b),
        Err(LogError::NonContiguous { expected: 0, got: 5 })
    ));
    stamp(&mut b, 0, 2, 9);
    log.append_replicated(&b).expect("contiguous");
    let stored = BatchIter::new(log.read(0, 1 << 20).expect("read"))
        .next()
        .expect("batch")
        .expect("whole");
    assert_eq!((stored.header().leader_epoch, stored.header().raft_index), (2, 9));
    let led = log.append_as_leader(&batch(1, 1, 1), 3, 10).expect("leader append");
    assert_eq!(led.base_offset, 3);
}

#[test]
fn bad_batches_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        max_batch_bytes: 2048,
        ..small_config(FlushPolicy::Os)
    };
    let log = PartitionLog::open(dir.path(), config).expect("open");
    log.append(&batch(0, 1, 1)).expect("good batch");
    let size_before = log.size_bytes();
    let mut corrupt = batch(1, 3, 1).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let too_big = batch(2, 100, 1);
    let mut bad_version = batch(3, 1, 1).to_vec();
    bad_version[28] = 7;
    type IsExpected = fn(&LogError) -> bool;
    let cases: Vec<(&[u8], IsExpected)> = vec![
        (&corrupt, |e| {
            matches!(e, LogError::Batch(BatchError::CrcMismatch { .. }))
        }),
        (&too_big, |e| matches!(e, LogError::Batch(BatchError::TooLarge { .. }))),
        (&bad_version, |e| {
            matches!(e, LogError::Batch(BatchError::UnsupportedVersion(7)))
        }),
        (&[1, 2, 3], |e| {
            matches!(e, LogError::Batch(BatchError::TooShort { .. }))
        }),
    ];
    for (bytes, expected) in cases {
        let err = log.append(bytes).expect_err("must be refused");
        assert!(expected(&err), "unexpected error {err}");
    }
    assert_eq!(log.log_end_offset(), 1);
    assert_eq!(log.size_bytes(), size_before);
}

#[test]
fn retention_by_bytes_and_time_deletes_whole_old_segments_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = unix_millis();
    let config = LogConfig {
        retention_bytes: Some(40 * 1024),
        retention_ms: Some(Duration::from_secs(3600)),
        ..small_config(FlushPolicy::Os)
    };
    let log = PartitionLog::open(dir.path(), config).expect("open");
    for i in 0..200 {
        let ts = if i < 100 { now - 2 * 3600 * 1000 } else { now };
        log.append(&batch(i, 10, ts)).expect("append");
    }
    let before = log.segment_count();
    let outcome = log.enforce_retention(now).expect("retention");
    assert!(outcome.segments_deleted > 0);
    assert_eq!(log.segment_count(), before - outcome.segments_deleted);
    assert!(
        log.size_bytes() <= 40 * 1024 + 16 * 1024,
        "size limit honoured to a segment"
    );
    let start = log.log_start_offset();
    assert!(
        start >= 1000,
        "every segment with only old records is gone (start {start})"
    );
    assert!(matches!(log.read(0, 10), Err(LogError::OffsetOutOfRange { .. })));
    assert_eq!(batch_bases(&log).first().copied(), Some(start));

    let end = log.log_end_offset();
    log.delete_segments_before(u64::MAX).expect("delete all");
    assert_eq!(log.segment_count(), 1, "the active segment is never deleted");
    assert_eq!(log.log_end_offset(), end);
    drop(log);
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("reopen");
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.log_end_offset(), end);
}

#[test]
fn reads_run_concurrently_with_appends_and_see_only_whole_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open"));
    let writer = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            for i in 0..2000 {
                log.append(&batch(i, 3, 1)).expect("append");
            }
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut next = 0;
                let mut seen = 0u64;
                while next < 6000 {
                    let bytes = log.read(next, 2048).expect("read");
                    for b in BatchIter::new(bytes) {
                        let b = b.expect("whole batch, never torn");
                        assert_eq!(b.header().base_offset, next, "contiguous offsets");
                        assert_eq!(b.records().expect("records").count(), 3);
                        next = b.header().next_offset();
                        seen += 1;
                    }
                }
                seen
            })
        })
        .collect();
    writer.join().expect("writer");
    for r in readers {
        assert_eq!(r.join().expect("reader"), 2000);
    }
}

#[test]
fn group_commit_shares_fsyncs_between_concurrent_appenders() {
    const APPENDERS: u64 = 16;
    const RECORDS: u64 = 2;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("open"));
    let fsyncs_before = crash_sim::segment_fsyncs(dir.path());
    // The first appender's fsync is held, so the others line up behind it; no timing involved.
    crash_sim::hold_fsyncs(dir.path());
    let append = |t: u64| {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            let info = log.append(&batch(t, RECORDS as u32, 1)).expect("append");
            assert!(log.durable_offset() >= info.next_offset, "acknowledged means fsynced");
        })
    };
    let mut threads = vec![append(0)];
    wait_until("the first fsync to start", || {
        crash_sim::fsyncs_waiting(dir.path()) == 1
    });
    threads.extend((1..APPENDERS).map(append));
    wait_until("every appender to write its batch", || {
        log.log_end_offset() == APPENDERS * RECORDS
    });
    crash_sim::release_fsyncs(dir.path());
    for t in threads {
        t.join().expect("appender");
    }
    assert_eq!(log.durable_offset(), APPENDERS * RECORDS);
    let fsyncs = crash_sim::segment_fsyncs(dir.path()) - fsyncs_before;
    assert!(
        fsyncs <= 2,
        "{APPENDERS} concurrent appenders used {fsyncs} fsyncs; the ones waiting behind a running fsync should share one"
    );
}

/// Polls `done` until it holds, failing the test after `POLL_DEADLINE`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    const POLL_DEADLINE: Duration = Duration::from_secs(20);
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < POLL_DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_clean_close_skips_recovery_and_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = PartitionLog::open(
            dir.path(),
            small_config(FlushPolicy::Interval(Duration::from_millis(1))),
        )
        .expect("open");
        for i in 0..120 {
            log.append(&batch(i, 4, 1_000 + i as i64)).expect("append");
        }
        log.close().expect("close");
    }
    assert!(dir.path().join(".clean_shutdown").exists());
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("reopen");
    assert!(
        !dir.path().join(".clean_shutdown").exists(),
        "marker is consumed at open"
    );
    assert!(log.opened_clean());
    assert_eq!(log.recovery_report(), conveyor_storage::RecoveryReport::default());
    assert_eq!(log.log_end_offset(), 480);
    assert_eq!(read_all(&log, 4096).len(), 480);
    assert_eq!(log.offset_for_timestamp(1_100).expect("lookup"), Some(400));
}

#[test]
fn a_missing_or_damaged_index_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
        for i in 0..100 {
            log.append(&batch(i, 10, 1)).expect("append");
        }
        log.close().expect("close");
    }
    std::fs::remove_file(dir.path().join("00000000000000000000.index")).expect("remove index");
    let second = files_with(dir.path(), "index")
        .into_iter()
        .next()
        .expect("another index");
    let mut bytes = std::fs::read(&second).expect("read index");
    bytes[5] ^= 0x40;
    std::fs::write(&second, bytes).expect("damage index");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("reopen");
    let records = read_all(&log, 700);
    assert_eq!(records.len(), 1000);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.offset, i as u64);
    }
    for offset in (0..1000).step_by(37) {
        assert_eq!(
            log.locate(offset).expect("locate").expect("found").batch_base_offset,
            offset / 10 * 10
        );
    }
}

#[test]
fn waiting_for_durability_of_truncated_offsets_fails_instead_of_spinning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("open");
    let info = log.append_unsynced(&batch(0, 10, 1)).expect("append");
    log.truncate_to(0).expect("truncate");
    match log.apply_flush_policy(info.next_offset) {
        Err(LogError::Truncated {
            requested: 10,
            log_end_offset: 0,
        }) => {}
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn a_closed_log_refuses_changes_and_reopens_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    log.append(&batch(0, 10, 1)).expect("append");
    log.close().expect("close");
    assert!(matches!(log.append(&batch(1, 1, 1)), Err(LogError::Closed)));
    assert!(matches!(log.truncate_to(0), Err(LogError::Closed)));
    assert_eq!(
        log.read(0, 1 << 20).map(|b| b.is_empty()).ok(),
        Some(false),
        "reads still work"
    );
    drop(log);
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("reopen");
    assert_eq!(log.log_end_offset(), 10);
}

#[test]
fn a_clean_close_marker_is_not_trusted_once_the_log_is_reopened_written_and_crashes() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
        for i in 0..50 {
            log.append(&batch(i, 4, 1_000 + i as i64)).expect("append");
        }
        log.close().expect("close");
    }
    {
        let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("reopen");
        assert!(log.opened_clean());
        for i in 50..60 {
            log.append(&batch(i, 4, 1_000 + i as i64)).expect("append");
        }
        // A crash: no close. The write after the last batch was torn.
    }
    let last = files_with(dir.path(), "log").pop().expect("a segment");
    let mut file = std::fs::OpenOptions::new().append(true).open(&last).expect("segment");
    std::io::Write::write_all(&mut file, &[7u8; 40]).expect("torn bytes");
    drop(file);
    let before = conveyor_storage::batch_headers_read_on_this_thread();
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("recover");
    assert!(!log.opened_clean(), "the marker of the earlier close was consumed");
    assert!(
        conveyor_storage::batch_headers_read_on_this_thread() > before,
        "recovery scanned batches"
    );
    assert_eq!(
        log.recovery_report().cut.map(|c| c.cause),
        Some(conveyor_storage::CutCause::TornTail)
    );
    assert_eq!(log.log_end_offset(), 240);
    assert_eq!(read_all(&log, 4096).len(), 240);
}

#[test]
fn a_segment_starting_with_a_timestamp_zero_batch_is_not_rolled_at_once_after_a_reopen() {
    // A Raft leader's no-op is a control batch with timestamp 0; every restart appends one.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_ms: Duration::from_secs(3600),
        ..small_config(FlushPolicy::Os)
    };
    for round in 0..3 {
        let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
        log.append(&batch(round, 1, 0)).expect("append");
        log.close().expect("close");
    }
    let log = PartitionLog::open(dir.path(), config).expect("reopen");
    assert_eq!(
        log.segment_count(),
        1,
        "a reopen does not roll a segment that is seconds old"
    );
}

#[test]
fn a_segment_starting_with_a_timestamp_zero_batch_still_rolls_by_the_age_of_its_first_timestamped_batch() {
    // A leader's no-op (timestamp 0) first, then records two hours old: a restart must not make
    // the segment young again, or it never rolls by age and retention never deletes it.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_ms: Duration::from_secs(3600),
        ..small_config(FlushPolicy::Os)
    };
    let two_hours_ago = unix_millis() - 2 * 3600 * 1000;
    let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    log.append(&batch(0, 1, 0)).expect("append no-op");
    log.append(&batch(1, 1, two_hours_ago)).expect("append old records");
    log.close().expect("close");
    let log = PartitionLog::open(dir.path(), config).expect("reopen");
    log.append(&batch(2, 1, 0)).expect("append after reopen");
    assert_eq!(
        log.segment_count(),
        2,
        "a segment whose first timestamped batch is two hours old rolls at the first append after a reopen"
    );
}

#[test]
fn a_lookup_by_raft_index_does_not_trust_a_damaged_offset_index_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = LogConfig {
        segment_bytes: 1024 * 1024,
        ..small_config(FlushPolicy::Os)
    };
    let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    for i in 0..60 {
        log.append_as_leader(&batch(i, 1, 1_000), 1, i + 1).expect("append");
    }
    log.close().expect("close");
    // Point a middle entry into the middle of its batch; it stays ordered, so a clean open
    // (which checks ordering and the last entry) keeps it.
    let index = files_with(dir.path(), "index").pop().expect("index file");
    let mut bytes = std::fs::read(&index).expect("read index");
    let entries = bytes.chunks(8).take_while(|e| e.iter().any(|&b| b != 0)).count();
    assert!(entries >= 5, "the test needs several index entries, got {entries}");
    let at = entries / 2 * 8 + 4;
    let position = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    bytes[at..at + 4].copy_from_slice(&(position + 8).to_le_bytes());
    std::fs::write(&index, &bytes).expect("write index");
    let log = PartitionLog::open(dir.path(), config).expect("reopen");
    for raft_index in 1..=60 {
        let found = log
            .find_raft_entry(raft_index)
            .expect("lookup despite a damaged index entry");
        assert_eq!(
            found.map(|h| h.raft_index),
            Some(raft_index),
            "lookup of Raft index {raft_index}"
        );
    }
}
