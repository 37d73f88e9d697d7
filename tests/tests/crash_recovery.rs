//! SIGKILL during produce: after a restart every acknowledged record is there, in order, once,
//! and nothing unacknowledged is half-visible.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_client::{Client, DeliveryFuture, ProducerConfig, ProducerRecord};
use conveyor_tests::checker::{Acked, check};
use conveyor_tests::{BrokerProcess, cli_json, read_all, wait_for};

const ACKS_BEFORE_KILL: usize = 20_000;
const PARTITIONS: i32 = 2;
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn given_a_broker_when_sigkilled_during_produce_should_keep_every_acknowledged_record_after_restart() {
    let mut broker = BrokerProcess::start();
    let runtime = conveyor_tests::runtime();
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let failed = Arc::new(Mutex::new(0u64));

    // Produce until killed; acknowledgements are recorded as they arrive.
    let (producer_task, acker_task) = runtime.block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        client
            .admin()
            .create_topic("durable", PARTITIONS, &[])
            .await
            .expect("create");
        let producer = client.producer(ProducerConfig::default().retries(0).linger(Duration::from_millis(1)));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, DeliveryFuture)>(10_000);
        let producer_task = tokio::spawn(async move {
            for i in 0u64.. {
                let id = format!("p0-{i}");
                let record = ProducerRecord::new("durable", id.clone()).key(format!("k{}", i % 16));
                let Ok(delivery) = producer.send(record).await else {
                    break;
                };
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
}
