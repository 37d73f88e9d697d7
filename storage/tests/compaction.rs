//! Key-based compaction against a model: whatever the puts, deletes and cleaning points, the
//! log read from its start gives the same key → value map as a `HashMap` fed the same
//! records; offsets, Raft indexes and batch headers survive; tombstones stay for
//! `delete.retention.ms` after a pass first cleaned them; a SIGKILL at any point of a swap
//! leaves a log that opens with the same map.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use common::{batches, read_all};
use conveyor_storage::batch::{BatchBuilder, Compression, Record};
use conveyor_storage::{CleanBounds, CompactionPolicy, FlushPolicy, IoThrottle, LogConfig, PartitionLog};
use proptest::prelude::*;

const KEY_MAP_BYTES: usize = 8 << 20;

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 2048,
        index_interval_bytes: 256,
        max_index_bytes: 4096,
        max_batch_bytes: 2048,
        retention_ms: None,
        flush: FlushPolicy::Os,
        ..LogConfig::default()
    }
}

/// One record: `None` value is a delete.
type Op = (u8, Option<u16>);

fn keyed_batch(ops: &[Op], timestamp: i64, compression: Compression) -> Bytes {
    let mut b = BatchBuilder::new(compression);
    for (key, value) in ops {
        b.push(&Record {
            timestamp,
            key: Some(Bytes::from(format!("key-{key}"))),
            value: value.map(|v| Bytes::from(format!("value-{v}-{}", "p".repeat(20)))),
            headers: vec![],
        });
    }
    b.build().expect("build")
}

/// What a reader from the start ends with: the latest value per key, deletes applied.
fn read_map(log: &PartitionLog) -> BTreeMap<Bytes, Bytes> {
    let mut map = BTreeMap::new();
    let mut last = None;
    for r in read_all(log, 4096) {
        assert!(last.is_none_or(|l| r.offset > l), "offsets increase");
        last = Some(r.offset);
        let key = r.key.expect("every record is keyed");
        match r.value {
            Some(v) => map.insert(key, v),
            None => map.remove(&key),
        };
    }
    map
}

fn model_map(model: &HashMap<u8, u16>) -> BTreeMap<Bytes, Bytes> {
    model
        .iter()
        .map(|(k, v)| {
            (
                Bytes::from(format!("key-{k}")),
                Bytes::from(format!("value-{v}-{}", "p".repeat(20))),
            )
        })
        .collect()
}

fn policy(delete_retention_ms: i64) -> CompactionPolicy {
    CompactionPolicy {
        delete_retention_ms,
        ..CompactionPolicy::default()
    }
}

fn clean(log: &PartitionLog, policy: &CompactionPolicy, now_ms: i64, key_map_bytes: usize) {
    let bounds = CleanBounds {
        committed_end: log.log_end_offset(),
        tombstone_floor: log.log_end_offset(),
        now_ms,
    };
    log.clean(policy, &bounds, key_map_bytes, &IoThrottle::unlimited(), true)
        .expect("clean");
}

/// (base offset, last offset, Raft index, producer id) of every batch.
fn stamps(log: &PartitionLog) -> Vec<(u64, u64, u64, i64)> {
    batches(log)
        .iter()
        .map(|b| {
            let h = b.header();
            (h.base_offset, h.last_offset(), h.raft_index, h.producer.producer_id)
        })
        .collect()
}

fn arb_ops() -> impl Strategy<Value = Vec<(Vec<Op>, bool)>> {
    let op = (0u8..12, prop::option::weighted(0.8, any::<u16>()));
    proptest::collection::vec((proptest::collection::vec(op, 1..5), any::<bool>()), 1..80)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_compacted_log_reads_as_the_model_and_keeps_every_batch_header(
        rounds in arb_ops(),
        small_map in any::<bool>(),
        codec in prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd)],
        retention in prop_oneof![Just(0i64), Just(1_000i64)],
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = PartitionLog::open(dir.path(), config()).expect("open");
        let mut model: HashMap<u8, u16> = HashMap::new();
        // A key map of a few entries forces passes that stop part-way through the dirty section.
        let key_map_bytes = if small_map { 16 * 25 } else { KEY_MAP_BYTES };
        let policy = policy(retention);
        let mut now = 1_000_000;
        for (ops, clean_now) in rounds {
            log.append_as_leader(&keyed_batch(&ops, 1, codec), 1, log.log_end_offset() + 1).expect("append");
            for (k, v) in ops {
                match v {
                    Some(v) => { model.insert(k, v); }
                    None => { model.remove(&k); }
                }
            }
            if clean_now {
                let before = stamps(&log);
                now += 600;
                clean(&log, &policy, now, key_map_bytes);
                prop_assert_eq!(&stamps(&log), &before, "offsets, Raft indexes and producers stay");
                prop_assert_eq!(read_map(&log), model_map(&model));
            }
        }
        now += 10_000;
        clean(&log, &policy, now, key_map_bytes);
        clean(&log, &policy, now + 10_000, key_map_bytes);
        prop_assert_eq!(read_map(&log), model_map(&model));
        let end = log.log_end_offset();
        log.close().expect("close");
        let reopened = PartitionLog::open(dir.path(), config()).expect("reopen");
        prop_assert_eq!(reopened.log_end_offset(), end);
        prop_assert_eq!(read_map(&reopened), model_map(&model));
    }
}

/// Fills segments with overwrites of a few keys until the log has `segments` segments.
fn overwrites(log: &PartitionLog, segments: usize) -> u16 {
    let mut v = 0u16;
    while log.segment_count() < segments {
        let ops: Vec<Op> = (0..4).map(|k| (k, Some(v))).collect();
        log.append(&keyed_batch(&ops, 1, Compression::None)).expect("append");
        v += 1;
    }
    v
}

#[test]
fn cleaning_shrinks_the_log_merges_segments_and_reports_what_it_did() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), config()).expect("open");
    overwrites(&log, 12);
    let size = log.size_bytes();
    let segments = log.segment_count();
    let bounds = CleanBounds {
        committed_end: log.log_end_offset(),
        tombstone_floor: log.log_end_offset(),
        now_ms: 5_000,
    };
    let stats = log.dirty_stats(&policy(0), &bounds).expect("stats");
    assert!(stats.dirty_ratio() > 0.99, "nothing cleaned yet: {stats:?}");
    let report = log
        .clean(&policy(0), &bounds, KEY_MAP_BYTES, &IoThrottle::unlimited(), false)
        .expect("clean")
        .expect("due");
    assert_eq!(report.keys, 4);
    let empty_up_to = report.empty_up_to.expect("the log starts at a cleaned segment");
    assert!(empty_up_to > 0, "every key was written again later: {report:?}");
    assert!(
        read_all(&log, 4096).iter().all(|r| r.offset >= empty_up_to),
        "no record below the empty prefix's end"
    );
    assert!(report.records_after < report.records_before / 4, "{report:?}");
    assert!(report.bytes_after < report.bytes_before, "{report:?}");
    assert!(log.size_bytes() < size);
    // Segments are grouped by their size before cleaning: the next pass merges the now small
    // segments into one.
    let again = log
        .clean(&policy(0), &bounds, KEY_MAP_BYTES, &IoThrottle::unlimited(), true)
        .expect("clean")
        .expect("forced");
    assert!(again.segments_after < again.segments_before, "{again:?}");
    assert!(again.bytes_after <= 4 * 2048, "{again:?}");
    assert_eq!(
        log.segment_count(),
        again.segments_after + 1,
        "cleaned segments and the active one (was {segments})"
    );
    assert!(
        log.last_cleaned_ms().is_some_and(|at| at >= 5_000),
        "when the pass ended"
    );
    let after = log.dirty_stats(&policy(0), &bounds).expect("stats");
    assert_eq!(after.dirty_bytes, 0, "{after:?}");
    assert!(
        log.clean(&policy(0), &bounds, KEY_MAP_BYTES, &IoThrottle::unlimited(), false)
            .expect("clean")
            .is_none(),
        "nothing is due"
    );
    // Only committed data is cleaned: with nothing committed, nothing is cleanable.
    let none = CleanBounds {
        committed_end: 0,
        ..bounds
    };
    assert_eq!(log.dirty_stats(&policy(0), &none).expect("stats").cleanable_end, 0);
}

#[test]
fn a_tombstone_stays_until_delete_retention_after_its_first_cleaning_then_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), config()).expect("open");
    log.append(&keyed_batch(&[(8, Some(1)), (9, Some(2))], 1, Compression::None))
        .expect("put");
    log.append(&keyed_batch(&[(8, None)], 1, Compression::None))
        .expect("delete");
    overwrites(&log, 3);
    let tombstones = |log: &PartitionLog| read_all(log, 4096).iter().filter(|r| r.value.is_none()).count();
    let policy = policy(10_000);
    clean(&log, &policy, 100_000, KEY_MAP_BYTES);
    assert_eq!(tombstones(&log), 1, "kept by its first cleaning");
    assert!(!read_map(&log).contains_key(&Bytes::from("key-8")));
    clean(&log, &policy, 109_999, KEY_MAP_BYTES);
    assert_eq!(tombstones(&log), 1, "kept until the horizon");
    // Cleaning again and reopening do not move the horizon.
    log.close().expect("close");
    let log = PartitionLog::open(dir.path(), config()).expect("reopen");
    clean(&log, &policy, 109_999, KEY_MAP_BYTES);
    assert_eq!(tombstones(&log), 1);
    // A replica below the tombstone keeps it from being dropped.
    let bounds = CleanBounds {
        committed_end: log.log_end_offset(),
        tombstone_floor: 0,
        now_ms: 200_000,
    };
    log.clean(&policy, &bounds, KEY_MAP_BYTES, &IoThrottle::unlimited(), true)
        .expect("clean");
    assert_eq!(tombstones(&log), 1, "below the tombstone floor it stays");
    clean(&log, &policy, 110_000, KEY_MAP_BYTES);
    assert_eq!(tombstones(&log), 0, "gone at the horizon");
    assert!(!read_map(&log).contains_key(&Bytes::from("key-8")));
    assert!(read_map(&log).contains_key(&Bytes::from("key-9")));
}

#[test]
fn a_read_from_a_removed_offset_starts_at_the_next_record_and_time_lookups_still_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), config()).expect("open");
    for t in 0..40u16 {
        log.append(&keyed_batch(
            &[(20 + (t % 3) as u8, Some(t))],
            1_000 + i64::from(t),
            Compression::None,
        ))
        .expect("append");
    }
    overwrites(&log, 4);
    clean(&log, &policy(0), 10_000_000, KEY_MAP_BYTES);
    let records = read_all(&log, 4096);
    let survivors: Vec<u64> = records.iter().filter(|r| r.offset < 40).map(|r| r.offset).collect();
    assert_eq!(survivors, vec![37, 38, 39], "the latest of keys 20-22");
    // Offset 5 is gone: reading on from it, as a consumer does, the first record is 37.
    let mut next = 5;
    let first = loop {
        let read = log.read(next, 256).expect("read a removed offset");
        let batches: Vec<_> = conveyor_storage::batch::BatchIter::new(read)
            .map(|b| b.expect("batch"))
            .collect();
        let found = batches
            .iter()
            .flat_map(|b| b.records().expect("records").map(|r| r.expect("record").offset))
            .find(|&o| o >= 5);
        if let Some(found) = found {
            break found;
        }
        next = batches.last().expect("a batch").header().next_offset();
    };
    assert_eq!(first, 37);
    assert_eq!(
        log.offset_for_timestamp(1_010).expect("lookup"),
        Some(37),
        "the next record still there"
    );
    assert_eq!(log.offset_for_timestamp(1_038).expect("lookup"), Some(38));
}

#[test]
fn producers_and_appends_go_on_while_a_cleaner_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(PartitionLog::open(dir.path(), config()).expect("open"));
    let appending = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let cleaner = {
        let (log, appending) = (Arc::clone(&log), Arc::clone(&appending));
        std::thread::spawn(move || {
            let (mut passes, mut during_appends) = (0, 0);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while appending.load(std::sync::atomic::Ordering::Acquire) && std::time::Instant::now() < deadline {
                let bounds = CleanBounds {
                    committed_end: log.log_end_offset(),
                    tombstone_floor: log.log_end_offset(),
                    now_ms: 1_000_000 + passes,
                };
                let pass = log
                    .clean(&policy(0), &bounds, 4096, &IoThrottle::unlimited(), true)
                    .expect("clean");
                if pass.is_some() && appending.load(std::sync::atomic::Ordering::Acquire) {
                    during_appends += 1;
                }
                passes += 1;
            }
            during_appends
        })
    };
    let mut model: HashMap<u8, u16> = HashMap::new();
    for v in 0..1_000u16 {
        let ops: Vec<Op> = vec![((v % 11) as u8, Some(v)), ((v % 5) as u8, (v % 7 == 0).then_some(v))];
        log.append(&keyed_batch(&ops, 1, Compression::Lz4)).expect("append");
        for (k, v) in ops {
            match v {
                Some(v) => model.insert(k, v),
                None => model.remove(&k),
            };
        }
        let _ = read_all(&log, 1024);
    }
    appending.store(false, std::sync::atomic::Ordering::Release);
    let overlapping = cleaner.join().expect("cleaner");
    assert!(overlapping > 0, "passes ran while appends and reads went on");
    assert_eq!(read_map(&log), model_map(&model));
}

const CHILD_DIR_ENV: &str = "CONVEYOR_COMPACTION_CHILD_DIR";

/// Entry point of the child process: cleans the log in the directory it is given (and is
/// killed at the step `CONVEYOR_CLEANER_KILL_AT` names). Does nothing in a normal run.
#[test]
fn child_cleaner() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let log = PartitionLog::open(&dir, config()).expect("child open");
    clean(&log, &policy(0), 1_000_000, 4096);
    clean(&log, &policy(0), 2_000_000, 4096);
    log.close().expect("close");
}

#[test]
fn a_sigkill_at_any_point_of_a_swap_leaves_a_log_with_the_same_map() {
    let steps = ["written", "committed", "old-deleted", "index-moved", "moved", "done"];
    let mut killed = 0;
    for step in steps {
        for occurrence in [1, 2, 5] {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut model = HashMap::new();
            {
                let log = PartitionLog::open(dir.path(), config()).expect("open");
                for v in 0..300u16 {
                    let ops: Vec<Op> = vec![((v % 9) as u8, (v % 13 != 0).then_some(v))];
                    log.append(&keyed_batch(&ops, 1, Compression::None)).expect("append");
                    for (k, v) in ops {
                        match v {
                            Some(v) => model.insert(k, v),
                            None => model.remove(&k),
                        };
                    }
                }
                log.close().expect("close");
            }
            let bases_before = {
                let log = PartitionLog::open(dir.path(), config()).expect("open");
                let s = stamps(&log);
                log.close().expect("close");
                s
            };
            let status = Command::new(std::env::current_exe().expect("test binary"))
                .args(["child_cleaner", "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_DIR_ENV, dir.path())
                .env("CONVEYOR_CLEANER_KILL_AT", format!("{step}:{occurrence}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run child");
            if !status.success() {
                killed += 1;
            }
            let log = PartitionLog::open(dir.path(), config()).expect("reopen after the kill");
            assert_eq!(read_map(&log), model_map(&model), "step {step}:{occurrence}");
            assert_eq!(
                stamps(&log),
                bases_before,
                "step {step}:{occurrence}: every batch header, once"
            );
            assert!(
                !dir.path().join(conveyor_storage::cleaner::SWAP_MARKER).exists(),
                "the open finished the swap"
            );
            // And the log cleans on from there.
            clean(&log, &policy(0), 3_000_000, KEY_MAP_BYTES);
            assert_eq!(read_map(&log), model_map(&model));
        }
    }
    assert!(
        killed >= steps.len() * 2,
        "the child died at the named steps ({killed} kills)"
    );
}

#[test]
fn max_compaction_lag_rolls_an_old_active_segment_so_its_records_can_be_cleaned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), config()).expect("open");
    let now = conveyor_storage::unix_millis();
    assert!(!log.roll_if_older_than(now, 0).expect("roll"), "an empty segment stays");
    for v in 0..3 {
        log.append(&keyed_batch(&[(1, Some(v))], 1, Compression::None))
            .expect("append");
    }
    assert!(
        !log.roll_if_older_than(now, 3_600_000).expect("roll"),
        "younger than the lag"
    );
    // The segment's age counts from its first append, after `now`.
    let now = conveyor_storage::unix_millis();
    assert!(
        log.roll_if_older_than(now + 3_600_000, 3_600_000).expect("roll"),
        "as old as the lag"
    );
    assert_eq!(log.segment_count(), 2);
    let overdue = CompactionPolicy {
        min_cleanable_dirty_ratio: 1.0,
        max_compaction_lag_ms: Some(1),
        ..CompactionPolicy::default()
    };
    let bounds = CleanBounds {
        committed_end: log.log_end_offset(),
        tombstone_floor: log.log_end_offset(),
        now_ms: now + 3_600_000,
    };
    let report = log
        .clean(&overdue, &bounds, KEY_MAP_BYTES, &IoThrottle::unlimited(), false)
        .expect("clean")
        .expect("overdue: due whatever the ratio");
    assert_eq!((report.records_before, report.records_after), (3, 1));
    let due_by_ratio_only = CompactionPolicy {
        min_cleanable_dirty_ratio: 1.0,
        ..CompactionPolicy::default()
    };
    log.append(&keyed_batch(&[(1, Some(9))], 1, Compression::None))
        .expect("append");
    log.roll_if_older_than(now + 7_200_000, 1).expect("roll");
    let stats = log
        .dirty_stats(
            &due_by_ratio_only,
            &CleanBounds {
                committed_end: log.log_end_offset(),
                tombstone_floor: 0,
                now_ms: now,
            },
        )
        .expect("stats");
    assert!(
        stats.dirty_ratio() < 1.0 && !stats.due(&due_by_ratio_only, now),
        "{stats:?}"
    );
}

#[test]
fn idempotent_producers_state_read_from_compacted_headers_is_the_state_before() {
    use conveyor_storage::batch::ProducerInfo;
    use conveyor_storage::producer_state::idempotence_of;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), config()).expect("open");
    let mut sequence = 0;
    for round in 0..40u16 {
        // Three records per batch, two of them the same key: compaction removes some.
        let mut b = BatchBuilder::new(Compression::None).producer(ProducerInfo {
            producer_id: 7,
            producer_epoch: 2,
            base_sequence: sequence,
        });
        for (key, value) in [(1u8, round), (1, round + 1), (2, round)] {
            b.push(&Record {
                timestamp: 1,
                key: Some(Bytes::from(format!("key-{key}"))),
                value: Some(Bytes::from(format!("value-{value}"))),
                headers: vec![],
            });
        }
        log.append(&b.build().expect("build")).expect("append");
        sequence += 3;
    }
    let sequences = |log: &PartitionLog| -> Vec<(i32, i32, u64)> {
        batches(log)
            .iter()
            .map(|b| {
                let i = idempotence_of(b.header()).expect("fields").expect("idempotent");
                (i.first_sequence, i.last_sequence, b.header().base_offset)
            })
            .collect()
    };
    let before = sequences(&log);
    clean(&log, &policy(0), 1_000_000, KEY_MAP_BYTES);
    assert!(read_all(&log, 1 << 20).len() < 40 * 3, "records were removed");
    assert_eq!(
        sequences(&log),
        before,
        "every batch still says which sequences it carried"
    );
}

#[test]
fn a_log_cut_below_the_cleaner_checkpoint_is_cleaned_again_from_the_cut() {
    for reopen in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = PartitionLog::open(dir.path(), config()).expect("open");
        overwrites(&log, 4);
        clean(&log, &policy(0), 1_000_000, KEY_MAP_BYTES);
        let cut = log.segment_base_of(log.log_end_offset() / 2).expect("a segment");
        log.truncate_to(cut).expect("cut below the checkpoint");
        if reopen {
            log.close().expect("close");
            log = PartitionLog::open(dir.path(), config()).expect("reopen");
        }
        // Appended again after the cut: a value, its delete, and enough to seal them.
        log.append(&keyed_batch(&[(30, Some(1))], 1, Compression::None))
            .expect("put");
        log.append(&keyed_batch(&[(30, None)], 1, Compression::None))
            .expect("delete");
        overwrites(&log, log.segment_count() + 2);
        clean(&log, &policy(0), 2_000_000, KEY_MAP_BYTES);
        clean(&log, &policy(0), 3_000_000, KEY_MAP_BYTES);
        let key = Bytes::from("key-30");
        assert!(
            !read_map(&log).contains_key(&key),
            "reopen {reopen}: the deleted key stays deleted once its tombstone goes"
        );
        assert!(
            !read_all(&log, 4096)
                .iter()
                .any(|r| r.key.as_ref() == Some(&key) && r.value.is_some()),
            "reopen {reopen}: the old value was compacted away"
        );
    }
}
