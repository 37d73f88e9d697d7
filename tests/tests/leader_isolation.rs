//! A leader cut off from its peers while producers pipeline to it at full speed: it steps
//! down within the election timeout plus a margin (Raft's check-quorum runs on ticks, and a
//! busy owner must still tick), the other replicas elect a leader, and after healing every
//! acknowledged record is read back, once and in order.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_client::proto::admin_client::AdminClient;
use conveyor_client::proto::produce_client::ProduceClient;
use conveyor_client::proto::{Acks as WireAcks, DescribeTopicRequest, PartitionProduce, ProduceRequest, Record};
use conveyor_client::{Client, ProducerConfig, ProducerRecord};
use conveyor_tests::checker::{Acked, check};
use conveyor_tests::cluster::Cluster;
use conveyor_tests::{read_all, wait_for};

const DEADLINE: Duration = Duration::from_secs(120);
/// The election timeout is 0.5 to 1 s; check-quorum steps a leader down within two of them.
/// The rest is margin for a loaded CI machine: the test asserts that it happens, not how fast.
const STEP_DOWN_DEADLINE: Duration = Duration::from_secs(10);
/// Records acknowledged before the cut: the load is running.
const WARM_UP_RECORDS: usize = 200;
/// Flood requests answered by the leader before the cut: the flood is running.
const WARM_UP_FLOOD: u64 = 20;
/// Tasks sending raw produce requests to the leader without waiting for one another.
const FLOOD_TASKS: usize = 4;
const FLOOD_RECORDS_PER_REQUEST: usize = 50;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends acks=leader requests to `address` as fast as it answers until `stop`; counts answers.
/// Its records are not checked: an isolated leader may append them and lose them later.
async fn flood(address: String, topic: &'static str, stop: Arc<AtomicBool>, answered: Arc<AtomicU64>) {
    let Ok(mut grpc) = ProduceClient::connect(format!("http://{address}")).await else {
        return;
    };
    let mut request_id = 0;
    while !stop.load(Ordering::Relaxed) {
        request_id += 1;
        let records = (0..FLOOD_RECORDS_PER_REQUEST)
            .map(|i| Record {
                value: Some(format!("flood-{request_id}-{i}").into_bytes().into()),
                ..Record::default()
            })
            .collect();
        let mut request = tonic::Request::new(ProduceRequest {
            request_id,
            acks: WireAcks::Leader as i32,
            partitions: vec![PartitionProduce {
                topic: topic.into(),
                partition: 0,
                records,
                ..PartitionProduce::default()
            }],
        });
        request.set_timeout(REQUEST_TIMEOUT);
        if grpc.produce(request).await.is_ok() {
            answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends `checked-i` records with acks=all, idempotently and with retries, until `stop`,
/// recording each acknowledgement. Returns the records it resent under a new epoch.
async fn produce_checked(
    bootstrap: String,
    topic: &'static str,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
) -> u64 {
    let client = Client::connect(&bootstrap).await.expect("connect");
    let config = ProducerConfig::default()
        .linger(Duration::from_millis(2))
        .retries(1_000)
        .delivery_timeout(Duration::from_secs(60));
    let producer = client.producer(config).expect("producer config");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, conveyor_client::DeliveryFuture)>(4_096);
    let acker = tokio::spawn(async move {
        while let Some((id, delivery)) = rx.recv().await {
            if let Ok(m) = delivery.await {
                acked.lock().expect("lock").push(Acked {
                    id,
                    partition: m.partition,
                    offset: m.offset.expect("acks=all returns offsets"),
                });
            }
        }
    });
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("checked-{i}");
        i += 1;
        let Ok(delivery) = producer.send(ProducerRecord::new(topic, id.clone())).await else {
            break;
        };
        if tx.send((id, delivery)).await.is_err() {
            break;
        }
    }
    drop(tx);
    acker.await.expect("acker");
    producer.unvouched_records()
}

/// The leader `address`'s broker names for partition 0 of `topic`, asked of it directly.
async fn leader_seen_by(address: &str, topic: &str) -> Option<i32> {
    let mut admin = AdminClient::connect(format!("http://{address}")).await.ok()?;
    let mut request = tonic::Request::new(DescribeTopicRequest { name: topic.into() });
    request.set_timeout(REQUEST_TIMEOUT);
    let description = admin.describe_topic(request).await.ok()?.into_inner();
    description.partitions.first().map(|p| p.leader)
}

#[test]
fn given_a_leader_under_full_produce_load_when_cut_off_from_its_peers_should_step_down_and_lose_nothing_acknowledged() {
    let cluster = Cluster::start(3, &[]);
    cluster.create_topic("isolated", 1, 3, &[]);
    let old = cluster.wait_for_leader("isolated", 0, None, DEADLINE);
    let old_address = cluster.broker(old).addr().to_string();
    let runtime = conveyor_tests::runtime();
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..FLOOD_TASKS {
        tasks.push(runtime.spawn(flood(
            old_address.clone(),
            "isolated",
            Arc::clone(&stop),
            Arc::clone(&answered),
        )));
    }
    let checked_producer = runtime.spawn(produce_checked(
        cluster.bootstrap(),
        "isolated",
        Arc::clone(&stop),
        Arc::clone(&acked),
    ));
    wait_for("the load to run", DEADLINE, || {
        let running =
            acked.lock().expect("lock").len() >= WARM_UP_RECORDS && answered.load(Ordering::Relaxed) >= WARM_UP_FLOOD;
        running.then_some(())
    });

    cluster.isolate(old);
    wait_for(
        "the isolated leader to stop naming itself leader",
        STEP_DOWN_DEADLINE,
        || {
            let leader = runtime.block_on(leader_seen_by(&old_address, "isolated"))?;
            (leader != old as i32).then_some(())
        },
    );
    let new = cluster.wait_for_leader("isolated", 0, Some(old), DEADLINE);
    assert_ne!(new, old);

    cluster.heal_all();
    stop.store(true, Ordering::Relaxed);
    let unvouched = runtime.block_on(async {
        for task in tasks {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("load tasks finish")
                .expect("load task");
        }
        tokio::time::timeout(DEADLINE, checked_producer)
            .await
            .expect("the checked producer finishes")
            .expect("checked producer task")
    });
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= WARM_UP_RECORDS);
    let observed = runtime.block_on(read_all(&cluster.bootstrap(), "isolated"));
    let checked: Vec<_> = observed.into_iter().filter(|o| o.id.starts_with("checked-")).collect();
    let report = check(&acked, &checked);
    println!("{report}; unvouched {unvouched}");
    // A partition resets only when a sequenced batch failed for good or the broker forgot the
    // producer; records resent under a new epoch are ones the broker cannot dedupe.
    assert_eq!(unvouched, 0, "records resent under a new epoch");
    assert!(report.lost.is_empty() && report.reordered.is_empty(), "{report}");
    // The checked producer is idempotent: its batches resent after the cut are answered from
    // the producer state, not stored again.
    assert!(report.duplicated.is_empty(), "{report}");
}
