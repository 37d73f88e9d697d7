use conveyor_storage::PartitionLog;
use conveyor_storage::batch::{BatchBuilder, Compression, ProducerInfo, Record};

use super::*;

fn batch(pid: i64, epoch: i16, seq: i32, count: usize) -> ValidatedBatch {
    let mut builder = BatchBuilder::new(Compression::None).producer(ProducerInfo {
        producer_id: pid,
        producer_epoch: epoch,
        base_sequence: seq,
    });
    for i in 0..count {
        builder.push(&Record {
            timestamp: 1,
            key: None,
            value: Some(Bytes::from(format!("v{i}"))),
            headers: vec![],
        });
    }
    ValidatedBatch::new(builder.build().expect("build"), 1 << 20).expect("valid")
}

fn producers(issued_end: i64) -> PartitionProducers {
    // No test here writes a snapshot: the store's directory is never created.
    let store = Arc::new(SnapshotStore::open(std::path::Path::new("/nonexistent/conveyor-test")).expect("store"));
    PartitionProducers {
        table: ProducerTable::new(),
        store: Some(store),
        snapshot_at: 0,
        pending: HashMap::new(),
        pending_order: VecDeque::new(),
        pending_term: Some(1),
        issued_end: Arc::new(AtomicI64::new(issued_end)),
        active: Gauge::default(),
    }
}

fn proposed(p: &mut PartitionProducers, batches: Vec<ValidatedBatch>, first: u64) -> Plan {
    let plan = p.plan(batches).expect("accepted");
    if let Plan::Propose {
        batches, idempotent, ..
    } = &plan
    {
        p.proposed(idempotent, batches, first, 1);
    }
    plan
}

#[test]
fn a_retry_of_a_batch_still_being_committed_waits_for_that_batch_and_proposes_nothing() {
    let mut p = producers(100);
    proposed(&mut p, vec![batch(7, 0, 0, 2)], 10);
    proposed(&mut p, vec![batch(7, 0, 2, 3)], 11);
    match p.plan(vec![batch(7, 0, 2, 3)]) {
        Ok(Plan::AllDuplicates(d)) => assert_eq!(
            d,
            vec![Located::Pending {
                index: 11,
                term: 1,
                last_offset_delta: 2
            }]
        ),
        other => panic!("expected a duplicate, got {other:?}"),
    }
    // Once applied, the same retry is answered from the committed state.
    p.table.apply(batch(7, 0, 0, 2).header(), 40, 1);
    p.table.apply(batch(7, 0, 2, 3).header(), 42, 1);
    p.fold(11);
    assert!(p.pending.is_empty() && p.pending_order.is_empty());
    match p.plan(vec![batch(7, 0, 2, 3)]) {
        Ok(Plan::AllDuplicates(d)) => assert!(
            matches!(d[..], [Located::Committed(m)] if m.base_offset == 42 && m.last_offset == 44),
            "{d:?}"
        ),
        other => panic!("expected a duplicate, got {other:?}"),
    }
}

#[test]
fn a_request_may_repeat_a_written_prefix_but_nothing_after_a_new_batch() {
    let mut p = producers(100);
    proposed(&mut p, vec![batch(7, 0, 0, 1)], 10);
    match p.plan(vec![batch(7, 0, 0, 1), batch(7, 0, 1, 1), batch(7, 0, 2, 1)]) {
        Ok(Plan::Propose {
            duplicates, batches, ..
        }) => {
            assert_eq!(duplicates.len(), 1);
            assert_eq!(batches.len(), 2);
        }
        other => panic!("expected a proposal, got {other:?}"),
    }
    let refused = p.plan(vec![batch(7, 0, 1, 1), batch(7, 0, 0, 1)]);
    assert!(
        matches!(refused, Err(ProducerRefusal::OutOfOrder { .. })),
        "{refused:?}"
    );
    // Two batches of one request in sequence are both new.
    assert!(matches!(
        p.plan(vec![batch(7, 0, 1, 2), batch(7, 0, 3, 1)]),
        Ok(Plan::Propose { ref duplicates, .. }) if duplicates.is_empty()
    ));
    // A gap inside the request refuses all of it.
    assert!(matches!(
        p.plan(vec![batch(7, 0, 1, 2), batch(7, 0, 4, 1)]),
        Err(ProducerRefusal::OutOfOrder {
            expected: 3,
            got: 4,
            ..
        })
    ));
}

#[test]
fn a_request_whose_repeated_batches_are_out_of_log_order_or_from_two_producers_is_refused() {
    let mut p = producers(100);
    proposed(&mut p, vec![batch(7, 0, 0, 5)], 10);
    proposed(&mut p, vec![batch(7, 0, 5, 5)], 11);
    proposed(&mut p, vec![batch(8, 0, 0, 1)], 12);
    // Answering [11, 10] would wait for 10 only and report offsets from 11.
    assert!(matches!(
        p.plan(vec![batch(7, 0, 5, 5), batch(7, 0, 0, 5)]),
        Err(ProducerRefusal::OutOfOrder { .. })
    ));
    assert!(matches!(
        p.plan(vec![batch(7, 0, 5, 5), batch(8, 0, 0, 1)]),
        Err(ProducerRefusal::MixedProducers)
    ));
    assert!(matches!(
        p.plan(vec![batch(7, 0, 0, 5), batch(7, 0, 5, 5)]),
        Ok(Plan::AllDuplicates(ref d)) if d.len() == 2
    ));
}

#[test]
fn refusals_name_their_cause() {
    let mut p = producers(100);
    proposed(&mut p, vec![batch(7, 3, 0, 1)], 10);
    assert!(matches!(
        p.plan(vec![batch(7, 2, 1, 1)]),
        Err(ProducerRefusal::Fenced { current: 3, got: 2, .. })
    ));
    assert!(matches!(
        p.plan(vec![batch(8, 0, 5, 1)]),
        Err(ProducerRefusal::Unknown { sequence: 5, .. })
    ));
    assert!(matches!(
        p.plan(vec![batch(100, 0, 0, 1)]),
        Err(ProducerRefusal::NotIssued { issued_end: 100, .. })
    ));
    assert!(matches!(
        p.plan(vec![batch(7, -1, 1, 1)]),
        Err(ProducerRefusal::Malformed(_))
    ));
    // Plain batches pass untouched.
    assert!(matches!(p.plan(vec![batch(-1, -1, -1, 1)]), Ok(Plan::Propose { .. })));
}

#[test]
fn a_new_leader_judges_retries_of_batches_it_inherited_uncommitted() {
    let mut p = producers(100);
    p.pending_term = None;
    let entries: Vec<Entry> = [(5u64, batch(7, 0, 0, 1)), (6, batch(7, 0, 1, 1))]
        .into_iter()
        .map(|(index, b)| Entry {
            index,
            term: 2,
            data: b.bytes().clone(),
            ..Entry::default()
        })
        .collect();
    assert!(p.needs_pending(3));
    p.rebuild_pending(3, &entries);
    assert!(!p.needs_pending(3));
    assert!(matches!(
        p.plan(vec![batch(7, 0, 1, 1)]),
        Ok(Plan::AllDuplicates(ref d)) if d == &[Located::Pending { index: 6, term: 2, last_offset_delta: 0 }]
    ));
    assert!(matches!(p.plan(vec![batch(7, 0, 2, 1)]), Ok(Plan::Propose { .. })));
}

/// A Raft log of `count` single-record idempotent batches of producer 7 (sequences 0..),
/// in segments of 4 KiB, all committed.
fn log_of_idempotent_batches(dir: &std::path::Path, count: u64) -> RaftLog {
    let config = conveyor_storage::LogConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        max_index_bytes: 4096,
        max_batch_bytes: 4096,
        flush: conveyor_storage::FlushPolicy::Os,
        ..conveyor_storage::LogConfig::default()
    };
    let log = Arc::new(PartitionLog::open(dir, config).expect("log"));
    let raft = RaftLog::open(log).expect("raft log");
    let entries: Vec<Entry> = (1..=count)
        .map(|index| Entry {
            index,
            term: 1,
            data: batch(7, 0, (index - 1) as i32, 1).bytes().clone(),
            ..Entry::default()
        })
        .collect();
    raft.append(&entries, crate::replica::entry::Origin::Peer)
        .expect("append");
    raft.persist().expect("persist");
    raft
}

#[test]
fn a_log_without_producer_snapshots_gets_one_at_every_segment_start_it_replays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = log_of_idempotent_batches(dir.path(), 200);
    let log = raft.partition_log();
    assert!(log.segment_count() > 3, "the batches span segments");
    let store = Arc::new(SnapshotStore::open(dir.path()).expect("store"));
    let loaded = PartitionProducers::load(&raft, Arc::clone(&store), 200, Arc::default(), Gauge::default());
    let entry = loaded.table.get(7).expect("producer 7 replayed");
    assert_eq!(entry.last().map(|b| b.last_sequence), Some(199));
    // Retention can move the log start to any segment start: each has a snapshot.
    let offsets = store.offsets();
    let starts: Vec<u64> = (log.log_start_offset() + 1..log.log_end_offset())
        .filter(|o| log.segment_base_of(*o) == Some(*o))
        .collect();
    assert!(starts.len() >= 3, "{starts:?}");
    for start in &starts {
        assert!(
            offsets.contains(start),
            "no snapshot at segment start {start}: {offsets:?}"
        );
    }
    // And one at the end of the replay, so the next open replays nothing.
    assert_eq!(offsets.last(), Some(&raft.offset_after(200)));
    // The snapshot at a segment start holds exactly the batches below it.
    let second = offsets[1];
    let (_, _, table) = store.read_at_or_below(second).expect("snapshot");
    assert_eq!(
        table.get(7).and_then(|e| e.last()).map(|b| b.last_offset + 1),
        Some(second)
    );
}
