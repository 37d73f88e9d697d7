//! Durability under a simulated power cut (the `crash-sim` hooks): only what the log fsynced
//! survives, so these tests tell a flush policy that fsyncs from one that does not. A SIGKILL
//! cannot: the page cache outlives the process.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use common::{batch, batches, small_config};
use conveyor_storage::batch::STAMPED_LEN;
use conveyor_storage::crash_sim::{fail_next_write, power_cut};
use conveyor_storage::{FlushPolicy, LogError, PartitionLog};

const APPENDERS: u64 = 8;
const BATCHES_PER_APPENDER: u64 = 60;

/// Every batch in the log as base offset -> bytes after the stamped prefix.
fn stored(log: &PartitionLog) -> HashMap<u64, Bytes> {
    batches(log)
        .into_iter()
        .map(|b| (b.header().base_offset, b.bytes().slice(STAMPED_LEN..)))
        .collect()
}

/// Appends from `APPENDERS` threads at once; returns what each append acknowledged, as
/// (base offset, bytes after the stamped prefix), in offset order.
fn append_concurrently(log: &Arc<PartitionLog>) -> Vec<(u64, Bytes)> {
    let mut acked: Vec<(u64, Bytes)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..APPENDERS)
            .map(|t| {
                s.spawn(move || {
                    (0..BATCHES_PER_APPENDER)
                        .map(|i| {
                            let b = batch(t * 1000 + i, 3, 1_700_000_000_000);
                            let info = log.append(&b).expect("append");
                            (info.base_offset, b.slice(STAMPED_LEN..))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("appender")).collect()
    });
    acked.sort_by_key(|(base, _)| *base);
    acked
}

#[test]
fn after_a_power_cut_every_batch_acknowledged_under_flush_always_is_there_byte_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config(FlushPolicy::Always);
    let (acked, end_before_cut) = {
        let log = Arc::new(PartitionLog::open(dir.path(), config.clone()).expect("open"));
        let acked = append_concurrently(&log);
        assert!(log.segment_count() > 3, "the appends cross segment rolls");
        // Written but never acknowledged: the power cut must drop it.
        log.append_unsynced(&batch(9999, 3, 1_700_000_000_000))
            .expect("unsynced append");
        (acked, log.log_end_offset())
        // Dropped without close: the power goes out with the log open.
    };
    let cut = power_cut(dir.path()).expect("power cut");
    let log = PartitionLog::open(dir.path(), config).expect("reopen after the power cut");
    let stored = stored(&log);
    for (base, body) in &acked {
        assert_eq!(
            stored.get(base),
            Some(body),
            "the batch acknowledged at offset {base} is missing or altered after the power cut ({cut:?})"
        );
    }
    assert!(
        log.log_end_offset() < end_before_cut,
        "the batch that was never fsynced did not survive the power cut ({cut:?})"
    );
    let info = log.append(&batch(7, 1, 1)).expect("append after recovery");
    assert_eq!(info.base_offset, log.log_end_offset() - 1);
}

#[test]
fn after_a_power_cut_under_flush_os_the_log_is_a_prefix_without_what_was_never_fsynced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config(FlushPolicy::Os);
    let appended = {
        let log = Arc::new(PartitionLog::open(dir.path(), config.clone()).expect("open"));
        append_concurrently(&log)
    };
    power_cut(dir.path()).expect("power cut");
    let log = PartitionLog::open(dir.path(), config).expect("reopen after the power cut");
    let kept: Vec<(u64, Bytes)> = batches(&log)
        .into_iter()
        .map(|b| (b.header().base_offset, b.bytes().slice(STAMPED_LEN..)))
        .collect();
    // Guaranteed: what survives is whole batches, byte-identical, from the start without a
    // gap; the last write was never fsynced, so it is gone.
    assert!(kept.len() < appended.len(), "unsynced batches survived the power cut");
    assert_eq!(
        kept[..],
        appended[..kept.len()],
        "the survivors are a prefix of what was appended"
    );
    let info = log.append(&batch(7, 1, 1)).expect("append after recovery");
    assert_eq!(info.base_offset, appended.get(kept.len()).map_or(0, |(base, _)| *base));
}

#[test]
fn a_log_poisoned_by_a_failed_write_reopens_consistent_and_takes_appends_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config(FlushPolicy::Always);
    let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let mut acked = Vec::new();
    for i in 0..20 {
        let b = batch(i, 3, 1_700_000_000_000);
        let info = log.append(&b).expect("append");
        acked.push((info.base_offset, b.slice(STAMPED_LEN..)));
    }
    let end = log.log_end_offset();
    fail_next_write(dir.path());
    let err = log
        .append(&batch(100, 3, 1))
        .expect_err("the write fails like a full disk");
    assert!(matches!(err, LogError::Io { .. }), "{err}");
    assert!(log.is_poisoned());
    let again = log
        .append(&batch(101, 3, 1))
        .expect_err("a poisoned log refuses appends");
    assert!(matches!(again, LogError::Poisoned { .. }), "{again}");
    let read = log.read(0, 1 << 20).expect_err("a poisoned log refuses reads");
    assert!(matches!(read, LogError::Poisoned { .. }), "{read}");
    drop(log);

    let log = PartitionLog::open(dir.path(), config).expect("reopen through recovery");
    assert_eq!(
        log.log_end_offset(),
        end,
        "the partial write is cut, nothing acknowledged is lost"
    );
    let stored = stored(&log);
    assert_eq!(stored.len(), acked.len());
    for (base, body) in &acked {
        assert_eq!(stored.get(base), Some(body), "batch at {base}");
    }
    let b = batch(200, 3, 1_700_000_000_000);
    let info = log.append(&b).expect("the reopened log takes appends");
    assert_eq!(info.base_offset, end);
    assert_eq!(self::stored(&log).get(&end), Some(&b.slice(STAMPED_LEN..)));
}

#[test]
fn after_a_power_cut_a_truncated_log_under_flush_always_is_exactly_what_was_kept_and_appended_since() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config(FlushPolicy::Always);
    let expected = {
        let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
        let mut kept = Vec::new();
        for i in 0..200 {
            let b = batch(i, 3, 1_700_000_000_000);
            let info = log.append(&b).expect("append");
            kept.push((info.base_offset, b.slice(STAMPED_LEN..)));
        }
        assert!(log.segment_count() > 3);
        // A Raft conflict: the suffix from batch 70 on is replaced.
        let cut_at = kept[70].0;
        log.truncate_to(cut_at).expect("truncate");
        kept.truncate(70);
        for i in 0..50 {
            let b = batch(1000 + i, 2, 1_700_000_000_000);
            let info = log.append(&b).expect("append after truncation");
            kept.push((info.base_offset, b.slice(STAMPED_LEN..)));
        }
        kept
    };
    let cut = power_cut(dir.path()).expect("power cut");
    let log = PartitionLog::open(dir.path(), config).expect("reopen after the power cut");
    let stored: Vec<(u64, Bytes)> = batches(&log)
        .into_iter()
        .map(|b| (b.header().base_offset, b.bytes().slice(STAMPED_LEN..)))
        .collect();
    assert_eq!(
        stored, expected,
        "the log holds what truncation kept and what was acknowledged since, nothing cut comes back ({cut:?})"
    );
}

#[test]
fn after_a_power_cut_a_log_reset_to_a_snapshot_offset_keeps_its_new_start_and_acknowledged_appends() {
    const SNAPSHOT_OFFSET: u64 = 5000;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config(FlushPolicy::Always);
    let expected = {
        let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
        for i in 0..100 {
            log.append(&batch(i, 3, 1_700_000_000_000)).expect("append");
        }
        log.truncate_fully_and_start_at(SNAPSHOT_OFFSET).expect("reset");
        (0..30)
            .map(|i| {
                let b = batch(2000 + i, 2, 1_700_000_000_000);
                let info = log.append(&b).expect("append after reset");
                (info.base_offset, b.slice(STAMPED_LEN..))
            })
            .collect::<Vec<_>>()
    };
    power_cut(dir.path()).expect("power cut");
    let log = PartitionLog::open(dir.path(), config).expect("reopen after the power cut");
    assert_eq!(log.log_start_offset(), SNAPSHOT_OFFSET);
    let stored: Vec<(u64, Bytes)> = batches(&log)
        .into_iter()
        .map(|b| (b.header().base_offset, b.bytes().slice(STAMPED_LEN..)))
        .collect();
    assert_eq!(stored, expected);
}
