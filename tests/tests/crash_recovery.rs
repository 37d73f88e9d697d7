//! SIGKILL during produce: after a restart every acknowledged record is there, in order, once,
//! and nothing unacknowledged is half-visible: every record read back is whole and one the
//! producer sent, in its key's partition; an unacknowledged record is visible only together
//! with everything sent to its partition before it; and what is visible stays visible.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_client::{Client, DeliveryFuture, ProducerConfig, ProducerRecord};
use conveyor_tests::checker::{Acked, Observed, check};
use conveyor_tests::{BrokerProcess, cli_json, read_all, wait_for};

const ACKS_BEFORE_KILL: usize = 20_000;
const PARTITIONS: i32 = 2;
const DEADLINE: Duration = Duration::from_secs(120);
/// Records are keyed `k{i % KEYS}`; each key maps to one partition.
const KEYS: u64 = 16;

#[test]
fn given_a_broker_when_sigkilled_during_produce_should_keep_every_acknowledged_record_after_restart() {
    let mut broker = BrokerProcess::start();
    let runtime = conveyor_tests::runtime();
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let failed = Arc::new(Mutex::new(0u64));
    // Records the producer took, `p0-0` up to `p0-{sent - 1}`.
    let sent = Arc::new(AtomicU64::new(0));

    // Produce until killed; acknowledgements are recorded as they arrive.
    let (producer_task, acker_task) = runtime.block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        client
            .admin()
            .create_topic("durable", PARTITIONS, &[])
            .await
            .expect("create");
        let producer = client
            .producer(ProducerConfig::default().retries(0).linger(Duration::from_millis(1)))
            .expect("producer config");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, DeliveryFuture)>(10_000);
        let sent = Arc::clone(&sent);
        let producer_task = tokio::spawn(async move {
            for i in 0u64.. {
                let id = format!("p0-{i}");
                let record = ProducerRecord::new("durable", id.clone()).key(format!("k{}", i % KEYS));
                let Ok(delivery) = producer.send(record).await else {
                    break;
                };
                sent.store(i + 1, Ordering::SeqCst);
                if tx.send((id, delivery)).await.is_err() {
                    break;
                }
            }
        });
        let (acked, failed) = (Arc::clone(&acked), Arc::clone(&failed));
        let acker_task = tokio::spawn(async move {
            while let Some((id, delivery)) = rx.recv().await {
                match delivery.await {
                    Ok(m) => acked.lock().expect("lock").push(Acked {
                        id,
                        partition: m.partition,
                        offset: m.offset.expect("offset"),
                    }),
                    Err(_) => *failed.lock().expect("lock") += 1,
                }
            }
        });
        (producer_task, acker_task)
    });
    wait_for("acknowledged records before the kill", DEADLINE, || {
        (acked.lock().expect("lock").len() >= ACKS_BEFORE_KILL).then_some(())
    });
    broker.kill();
    runtime.block_on(async {
        producer_task.abort();
        tokio::time::timeout(DEADLINE, acker_task)
            .await
            .expect("every delivery resolves after the kill")
            .expect("acker");
    });
    let acked = acked.lock().expect("lock").clone();
    let failed = *failed.lock().expect("lock");

    broker.restart();
    // The restarted leader commits a no-op first; until then its high watermark may trail.
    wait_for(
        "the restarted partitions to commit everything they hold",
        DEADLINE,
        || {
            let out = conveyor_tests::cli(broker.addr(), &["offsets", "durable", "--output", "json"], "");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let partitions = v["partitions"].as_array()?;
            partitions
                .iter()
                .all(|p| p["high_watermark"].as_u64() > Some(0) && p["high_watermark"] == p["log_end_offset"])
                .then_some(())
        },
    );
    // Nothing is written after the restart, so the high watermarks read here are the ones
    // the read below stops at.
    let described = cli_json(broker.addr(), &["topic", "describe", "durable"]);
    let observed = runtime.block_on(read_all(broker.addr(), "durable"));
    // Every partition was read to its high watermark; the only offsets without records are
    // Raft no-ops (one per election), which are control batches.
    for p in 0..PARTITIONS {
        let offsets: Vec<u64> = observed.iter().filter(|o| o.partition == p).map(|o| o.offset).collect();
        let hw = described["partitions"][p as usize]["high_watermark"]
            .as_u64()
            .expect("high watermark");
        assert!(offsets.windows(2).all(|w| w[0] < w[1]), "partition {p} out of order");
        let gaps = hw - offsets.len() as u64;
        assert!(
            gaps <= 3,
            "partition {p}: {gaps} offsets without records (expected only election no-ops)"
        );
    }
    let report = check(&acked, &observed);
    println!(
        "acknowledged {}, failed {failed}, visible after restart {}, unacknowledged but stored {}",
        acked.len(),
        observed.len(),
        observed.len().saturating_sub(acked.len())
    );
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.reordered.is_empty(), "{report}");
    assert!(report.duplicated.is_empty(), "no retries, so no duplicates: {report}");
    assert_nothing_unacknowledged_is_half_visible(&acked, &observed, sent.load(Ordering::SeqCst));
    // The consumer interleaves partitions in no fixed order: compare each partition's records.
    let by_partition = |records: &[Observed]| {
        let mut records = records.to_vec();
        records.sort_by_key(|o| (o.partition, o.offset));
        records
    };
    let again = runtime.block_on(read_all(broker.addr(), "durable"));
    assert_eq!(
        by_partition(&again),
        by_partition(&observed),
        "a second read returns exactly the records the first one did"
    );
}

/// The sequence number of a record id `p0-N`, panicking on anything the producer never sent.
fn sequence(id: &str, sent: u64) -> u64 {
    let n: u64 = id
        .strip_prefix("p0-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a record read back is not one the producer sent: {id:?}"));
    assert!(n < sent, "record {id} read back, but only {sent} were sent");
    n
}

/// Every record read back is one the producer sent, in its key's partition; per partition the
/// records read back are exactly the first ones sent to it, so an unacknowledged record shows
/// only with everything sent before it.
fn assert_nothing_unacknowledged_is_half_visible(acked: &[Acked], observed: &[Observed], sent: u64) {
    let mut partition_of_key: HashMap<u64, i32> = HashMap::new();
    for a in acked {
        partition_of_key.insert(sequence(&a.id, sent) % KEYS, a.partition);
    }
    assert_eq!(
        partition_of_key.len() as u64,
        KEYS,
        "every key was acknowledged at least once"
    );
    for p in 0..PARTITIONS {
        let seen: Vec<u64> = observed
            .iter()
            .filter(|o| o.partition == p)
            .map(|o| sequence(&o.id, sent))
            .collect();
        for n in &seen {
            assert_eq!(
                partition_of_key[&(n % KEYS)],
                p,
                "record p0-{n} read back from the wrong partition"
            );
        }
        let sent_here: Vec<u64> = (0..sent).filter(|n| partition_of_key[&(n % KEYS)] == p).collect();
        let kept = seen.len().min(sent_here.len());
        if let Some(i) = (0..kept).find(|&i| seen[i] != sent_here[i]) {
            panic!(
                "partition {p}: record p0-{} is visible but p0-{}, sent to the same partition before it, is not",
                seen[i], sent_here[i]
            );
        }
        assert!(
            seen.len() <= sent_here.len(),
            "partition {p}: more records than were sent"
        );
    }
}

/// The records `p0-0..p0-{n}` acknowledged, each key `k` in partition `k % 2`.
fn acked_all(n: u64) -> Vec<Acked> {
    (0..n)
        .map(|i| Acked {
            id: format!("p0-{i}"),
            partition: ((i % KEYS) % 2) as i32,
            offset: i,
        })
        .collect()
}

fn observed_of(ids: &[u64]) -> Vec<Observed> {
    ids.iter()
        .map(|&i| Observed {
            id: format!("p0-{i}"),
            partition: ((i % KEYS) % 2) as i32,
            offset: i,
        })
        .collect()
}

#[test]
fn the_half_visible_check_accepts_a_prefix_per_partition_with_unacknowledged_records() {
    let acked = acked_all(KEYS);
    // p0-16 and p0-18 (partition 0) and p0-17 (partition 1) were sent but never acknowledged.
    let observed = observed_of(&(0..19).collect::<Vec<_>>());
    assert_nothing_unacknowledged_is_half_visible(&acked, &observed, 20);
}

#[test]
#[should_panic(expected = "is visible but p0-16")]
fn the_half_visible_check_rejects_an_unacknowledged_record_visible_past_a_hole() {
    let acked = acked_all(KEYS);
    let mut ids: Vec<u64> = (0..KEYS).collect();
    ids.push(18); // p0-16, sent to the same partition before it, is missing
    assert_nothing_unacknowledged_is_half_visible(&acked, &observed_of(&ids), 20);
}

#[test]
#[should_panic(expected = "not one the producer sent")]
fn the_half_visible_check_rejects_a_record_the_producer_never_sent() {
    let acked = acked_all(KEYS);
    let mut observed = observed_of(&(0..KEYS).collect::<Vec<_>>());
    observed[3].id = "p0-3\u{0}garbage".into();
    assert_nothing_unacknowledged_is_half_visible(&acked, &observed, 20);
}
