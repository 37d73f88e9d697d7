use proptest::prelude::*;

use super::snapshot::{SnapshotStore, decode, encode};
use super::*;

fn header(pid: i64, epoch: i16, seq: i32, count: u32) -> BatchHeader {
    BatchHeader {
        base_offset: 0,
        batch_length: 0,
        leader_epoch: 0,
        raft_index: 0,
        magic: crate::batch::MAGIC,
        crc: 0,
        attributes: 0,
        last_offset_delta: count.saturating_sub(1),
        first_timestamp: 0,
        max_timestamp: 0,
        producer: ProducerInfo {
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
        },
        record_count: count,
    }
}

fn batch(pid: i64, epoch: i16, seq: i32, count: u32) -> Idempotent {
    idempotence_of(&header(pid, epoch, seq, count))
        .expect("well formed")
        .expect("idempotent")
}

#[test]
fn malformed_producer_fields_are_refused_before_any_state_is_consulted() {
    assert_eq!(idempotence_of(&header(-1, -1, -1, 3)), Ok(None));
    assert_eq!(
        idempotence_of(&header(-1, 0, -1, 3)),
        Err(ProducerFieldError::Stray { epoch: 0, sequence: -1 })
    );
    assert_eq!(
        idempotence_of(&header(-2, 0, 0, 1)),
        Err(ProducerFieldError::ProducerId(-2))
    );
    assert_eq!(idempotence_of(&header(7, -3, 0, 1)), Err(ProducerFieldError::Epoch(-3)));
    assert_eq!(
        idempotence_of(&header(7, 0, -5, 1)),
        Err(ProducerFieldError::Sequence(-5))
    );
    assert_eq!(
        idempotence_of(&header(7, 0, i32::MAX - 1, 3)),
        Err(ProducerFieldError::Wraps {
            first: i32::MAX - 1,
            count: 3
        })
    );
    assert!(idempotence_of(&header(7, 0, i32::MAX - 2, 3)).is_ok());
    let mut transactional = header(7, 0, 0, 1);
    transactional.attributes = 1 << 4;
    assert_eq!(idempotence_of(&transactional), Err(ProducerFieldError::Transactional));
}

#[test]
fn a_leader_appends_the_next_batch_and_answers_a_retry_with_the_original() {
    let mut table = ProducerTable::new();
    assert_eq!(classify(table.view(7).as_ref(), &batch(7, 0, 0, 3)), Verdict::Append);
    assert_eq!(classify(table.view(7).as_ref(), &batch(7, 0, 4, 3)), Verdict::Unknown);
    table.apply(&header(7, 0, 0, 3), 100, 1);
    table.apply(&header(7, 0, 3, 2), 110, 2);
    let original = BatchMeta {
        first_sequence: 0,
        last_sequence: 2,
        base_offset: 100,
        last_offset: 102,
    };
    assert_eq!(
        classify(table.view(7).as_ref(), &batch(7, 0, 0, 3)),
        Verdict::Duplicate(original)
    );
    assert_eq!(classify(table.view(7).as_ref(), &batch(7, 0, 5, 1)), Verdict::Append);
    assert_eq!(
        classify(table.view(7).as_ref(), &batch(7, 0, 6, 1)),
        Verdict::OutOfOrder { expected: 5, got: 6 }
    );
    // Same start, other length: not the batch that was written.
    assert_eq!(
        classify(table.view(7).as_ref(), &batch(7, 0, 3, 1)),
        Verdict::OutOfOrder { expected: 5, got: 3 }
    );
}

#[test]
fn epochs_fence_older_producers_and_restart_sequences() {
    let mut table = ProducerTable::new();
    table.apply(&header(7, 2, 0, 1), 0, 1);
    assert_eq!(
        classify(table.view(7).as_ref(), &batch(7, 1, 1, 1)),
        Verdict::Fenced { current: 2, got: 1 }
    );
    assert_eq!(classify(table.view(7).as_ref(), &batch(7, 3, 0, 1)), Verdict::Append);
    assert_eq!(
        classify(table.view(7).as_ref(), &batch(7, 3, 1, 1)),
        Verdict::OutOfOrder { expected: 0, got: 1 }
    );
    table.apply(&header(7, 3, 0, 1), 1, 2);
    assert_eq!(table.get(7).map(|e| (e.epoch, e.batches.len())), Some((3, 1)));
}

#[test]
fn only_the_last_five_batches_are_remembered_and_older_retries_are_told_apart() {
    let mut table = ProducerTable::new();
    for i in 0..8 {
        table.apply(&header(7, 0, i, 1), u64::try_from(i).expect("small"), 1);
    }
    let entry = table.get(7).expect("entry");
    assert_eq!(entry.batches.len(), MAX_CACHED_BATCHES);
    assert_eq!(entry.batches.front().map(|b| b.first_sequence), Some(3));
    assert_eq!(
        classify(table.view(7).as_ref(), &batch(7, 0, 1, 1)),
        Verdict::TooOld {
            sequence: 1,
            oldest_remembered: 3
        }
    );
    assert!(matches!(
        classify(table.view(7).as_ref(), &batch(7, 0, 3, 1)),
        Verdict::Duplicate(_)
    ));
}

#[test]
fn replaying_a_batch_the_table_holds_changes_nothing_and_idle_producers_expire() {
    let mut table = ProducerTable::new();
    table.apply(&header(7, 0, 0, 2), 10, 1_000);
    table.apply(&header(8, 0, 0, 2), 12, 5_000);
    let before = table.clone();
    table.apply(&header(7, 0, 0, 2), 10, 9_000);
    assert_eq!(table, before);
    assert_eq!(table.expire(2_000), 1);
    assert!(table.get(7).is_none() && table.get(8).is_some());
}

#[test]
fn a_snapshot_round_trips_and_damage_is_detected() {
    let mut table = ProducerTable::new();
    for pid in 0..20 {
        for s in 0..7 {
            table.apply(&header(pid, 1, s * 2, 2), (pid * 100 + i64::from(s)) as u64 * 2, pid);
        }
    }
    let bytes = encode(4242, &table);
    let (offset, back) = decode(&bytes).expect("decodes");
    assert_eq!((offset, &back), (4242, &table));
    for at in [0, 5, 20, bytes.len() / 2, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x40;
        assert!(decode(&bad).is_err(), "flipped byte {at} went unnoticed");
    }
    assert!(decode(&bytes[..bytes.len() - 3]).is_err());
    // A count that claims more than the bytes hold is refused before the table is sized for it.
    let mut huge = encode(1, &ProducerTable::new());
    huge.truncate(huge.len() - 4);
    huge[13..17].copy_from_slice(&u32::MAX.to_le_bytes());
    let crc = crc32fast::hash(&huge);
    huge.extend_from_slice(&crc.to_le_bytes());
    assert!(decode(&huge).is_err());
}

#[test]
fn the_store_reads_the_newest_good_snapshot_and_prunes_behind_the_log_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SnapshotStore::open(dir.path()).expect("open");
    let mut table = ProducerTable::new();
    table.apply(&header(1, 0, 0, 1), 0, 1);
    store.write(10, &table).expect("write");
    table.apply(&header(1, 0, 1, 1), 10, 2);
    store.write(20, &table).expect("write");
    store.write(30, &table).expect("write");
    // Damage the newest: the one before it is used.
    let newest = dir.path().join(snapshot::DIR).join(format!("{:020}.snapshot", 30));
    std::fs::write(&newest, b"garbage").expect("damage");
    let (at, _, loaded) = store.read_at_or_below(35).expect("a snapshot");
    assert_eq!((at, &loaded), (20, &table));
    assert_eq!(store.read_at_or_below(15).map(|(a, ..)| a), Some(10));
    assert!(store.read_at_or_below(5).is_none());
    store.prune_below(25);
    assert_eq!(store.offsets(), vec![20, 30]);
    let reopened = SnapshotStore::open(dir.path()).expect("reopen");
    assert_eq!(reopened.offsets(), vec![20, 30]);
}

#[test]
fn a_full_table_evicts_the_producer_whose_last_write_is_oldest_in_the_log() {
    let mut table = ProducerTable::new();
    for pid in 0..MAX_PRODUCERS as i64 {
        // Producer 0 writes last, so producer 1 has the oldest last batch.
        let offset = if pid == 0 { 1_000_000 } else { pid as u64 };
        table.apply(&header(pid, 0, 0, 1), offset, 1);
    }
    assert_eq!(table.len(), MAX_PRODUCERS);
    table.apply(&header(-5 + i64::MAX, 0, 0, 1), 2_000_000, 1);
    assert_eq!(table.len(), MAX_PRODUCERS);
    assert!(table.get(1).is_none(), "the oldest writer was evicted");
    assert!(table.get(0).is_some() && table.get(2).is_some());
    // A known producer writing again evicts nobody.
    table.apply(&header(2, 0, 1, 1), 2_000_001, 1);
    assert_eq!(table.len(), MAX_PRODUCERS);
}

/// One producer's sends as a client with retries makes them: each step sends the next
/// batch, or resends one of the last five.
#[derive(Debug, Clone)]
enum Send {
    Next(u32),
    Retry(usize),
}

fn sends() -> impl Strategy<Value = Vec<(i64, Send)>> {
    prop::collection::vec(
        (
            0..3i64,
            prop_oneof![(1..4u32).prop_map(Send::Next), (0..5usize).prop_map(Send::Retry)],
        ),
        1..120,
    )
}

proptest! {
    /// Whatever mix of new batches and retries arrives, the leader's log holds every batch
    /// once, in sequence, and the state rebuilt from that log (whole, or from a snapshot at
    /// any point plus the rest) is the leader's state.
    #[test]
    fn retries_are_never_stored_twice_and_state_rebuilds_from_the_log(ops in sends(), cut in 0usize..200) {
        let mut live = ProducerTable::new();
        let mut log: Vec<(BatchHeader, u64)> = Vec::new();
        let mut sent: std::collections::HashMap<i64, Vec<(i32, u32)>> = Default::default();
        let mut end = 0u64;
        for (pid, send) in ops {
            let history = sent.entry(pid).or_default();
            let (seq, count) = match send {
                Send::Next(count) => {
                    let seq = history.last().map_or(0, |&(s, c)| s + c as i32);
                    history.push((seq, count));
                    (seq, count)
                }
                Send::Retry(back) => match history.iter().rev().nth(back) {
                    Some(&b) => b,
                    None => continue,
                },
            };
            let h = header(pid, 0, seq, count);
            let verdict = classify(live.view(pid).as_ref(), &batch(pid, 0, seq, count));
            match verdict {
                Verdict::Append => {
                    live.apply(&h, end, 1);
                    log.push((h, end));
                    end += u64::from(count);
                }
                Verdict::Duplicate(original) => prop_assert_eq!(original.first_sequence, seq),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (h, _) in &log {
            prop_assert!(seen.insert((h.producer.producer_id, h.producer.base_sequence)), "stored twice");
        }
        let mut rebuilt = ProducerTable::new();
        for (h, at) in &log {
            rebuilt.apply(h, *at, 1);
        }
        prop_assert_eq!(&rebuilt, &live);
        let cut = cut.min(log.len());
        let mut prefix = ProducerTable::new();
        for (h, at) in &log[..cut] {
            prefix.apply(h, *at, 1);
        }
        let (_, mut resumed) = decode(&encode(0, &prefix)).expect("round trip");
        for (h, at) in &log[cut.saturating_sub(1)..] {
            resumed.apply(h, *at, 1);
        }
        prop_assert_eq!(&resumed, &live);
    }
}
