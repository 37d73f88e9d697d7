//! A full disk under a running broker: the partition whose write failed stops, says so
//! (describe, metrics) and refuses appends with a retriable error; nothing is acknowledged
//! that is not stored; once writes succeed again it is reopened through recovery by itself,
//! without a broker restart, and takes appends again.

use std::time::Duration;

use conveyor_client::proto::produce_client::ProduceClient;
use conveyor_client::proto::{Acks as WireAcks, ErrorCode, ErrorDetail, PartitionProduce, ProduceRequest, Record};
use conveyor_client::{Client, ProducerConfig, ProducerRecord};
use conveyor_tests::checker::{Acked, check};
use conveyor_tests::cluster::Cluster;
use conveyor_tests::{BrokerProcess, cli, cli_json, read_all, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);
/// A stopped replica is reopened 1, 2, 4, ... s after its failure while the disk stays full;
/// this covers several attempts and a loaded machine.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const RECORDS: u64 = 100;

/// Sends `NAME-0..count` with acks=all through a retrying producer; returns what was acked.
async fn produce(bootstrap: &str, topic: &str, name: &str, count: u64) -> Vec<Acked> {
    let client = Client::connect(bootstrap).await.expect("connect");
    let config = ProducerConfig::default()
        .linger(Duration::from_millis(2))
        .delivery_timeout(DEADLINE);
    let producer = client.producer(config).expect("producer config");
    let mut deliveries = Vec::new();
    for i in 0..count {
        let id = format!("{name}-{i}");
        let delivery = producer
            .send(ProducerRecord::new(topic.to_string(), id.clone()))
            .await
            .expect("send");
        deliveries.push((id, delivery));
    }
    let mut acked = Vec::new();
    for (id, delivery) in deliveries {
        let m = delivery.await.unwrap_or_else(|e| panic!("{id} not delivered: {e}"));
        acked.push(Acked {
            id,
            partition: m.partition,
            offset: m.offset.expect("acks=all returns offsets"),
        });
    }
    acked
}

/// One acks=all produce request of one record straight to `address`: the partition's error,
/// or `None` when it was acknowledged.
async fn produce_one(address: &str, topic: &str, id: &str) -> Option<ErrorDetail> {
    let mut grpc = ProduceClient::connect(format!("http://{address}"))
        .await
        .expect("connect");
    let mut request = tonic::Request::new(ProduceRequest {
        request_id: 1,
        acks: WireAcks::All as i32,
        partitions: vec![PartitionProduce {
            topic: topic.into(),
            partition: 0,
            records: vec![Record {
                value: Some(id.as_bytes().to_vec().into()),
                ..Record::default()
            }],
            ..PartitionProduce::default()
        }],
    });
    request.set_timeout(REQUEST_TIMEOUT);
    let answer = grpc
        .produce(request)
        .await
        .expect("a produce answer, not a transport failure");
    let part = answer
        .into_inner()
        .partitions
        .into_iter()
        .next()
        .expect("one partition result");
    part.error
}

#[test]
fn given_a_full_disk_when_space_returns_the_partition_should_recover_by_itself_and_lose_nothing_acknowledged() {
    let broker = BrokerProcess::start();
    let out = cli(broker.addr(), &["topic", "create", "full", "--partitions", "1"], "");
    assert!(out.status.success(), "create: {}", String::from_utf8_lossy(&out.stderr));
    let runtime = conveyor_tests::runtime();
    let mut acked = runtime.block_on(produce(broker.addr(), "full", "before", RECORDS));

    broker.disk_full();
    let error = runtime
        .block_on(produce_one(broker.addr(), "full", "during-0"))
        .expect("a write on a full disk is not acknowledged");
    assert!(error.retriable, "a stopped replica's error is retriable: {error:?}");
    assert_eq!(
        error.code,
        ErrorCode::LeaderNotAvailable as i32,
        "it sends the client elsewhere, not INTERNAL or SHUTTING_DOWN: {error:?}"
    );
    assert!(
        error.message.contains("stopped"),
        "the message says what happened: {}",
        error.message
    );
    // Until space returns, appends keep being refused, never acknowledged.
    for i in 1..5 {
        let answer = runtime.block_on(produce_one(broker.addr(), "full", &format!("during-{i}")));
        let error = answer.expect("no append is acknowledged while the disk is full");
        assert!(error.retriable, "{error:?}");
    }
    let described = cli_json(broker.addr(), &["topic", "describe", "full"]);
    let partition = &described["partitions"][0];
    assert_eq!(
        partition["leader"],
        0,
        "a stopped replica is not reported as leader: {partition}\n{}",
        broker.log()
    );
    let state = partition["replica_state"].as_str().unwrap_or_default();
    assert!(
        state.starts_with("stopped"),
        "describe shows the stopped replica: {partition}"
    );
    assert!(
        broker
            .metric("conveyor_partition_failures_total")
            .is_some_and(|v| v >= 1.0)
    );
    assert_eq!(broker.metric("conveyor_partitions_stopped"), Some(1.0));

    broker.disk_has_space();
    wait_for(
        "the partition to be reopened and take appends",
        RECOVERY_DEADLINE,
        || {
            runtime
                .block_on(produce_one(broker.addr(), "full", "probe-0"))
                .is_none()
                .then_some(())
        },
    );
    acked.extend(runtime.block_on(produce(broker.addr(), "full", "after", RECORDS)));
    let described = cli_json(broker.addr(), &["topic", "describe", "full"]);
    assert_eq!(described["partitions"][0]["replica_state"], "running");
    assert_eq!(broker.metric("conveyor_partitions_stopped"), Some(0.0));
    assert!(broker.log().contains("reopened from its log"), "the recovery is logged");

    let observed = runtime.block_on(read_all(broker.addr(), "full"));
    let report = check(&acked, &observed);
    assert!(report.lost.is_empty() && report.reordered.is_empty(), "{report}");
    assert!(
        report.duplicated.is_empty(),
        "idempotent producers store each record once: {report}"
    );
}

#[test]
fn given_three_brokers_when_the_leaders_disk_fills_should_move_leadership_and_rejoin_once_space_returns() {
    let cluster = Cluster::start(3, &[]);
    cluster.create_topic("full", 1, 3, &[]);
    let old = cluster.wait_for_leader("full", 0, None, DEADLINE);
    let runtime = conveyor_tests::runtime();
    let mut acked = runtime.block_on(produce(&cluster.bootstrap(), "full", "before", RECORDS));

    cluster.broker(old).disk_full();
    // The first write on the full disk stops the leader's replica; a retrying producer rides
    // it out on the replica elected in its place.
    acked.extend(runtime.block_on(produce(&cluster.bootstrap(), "full", "during", RECORDS)));
    let new = cluster.wait_for_leader("full", 0, Some(old), DEADLINE);
    assert_ne!(new, old);
    let described = cli_json(cluster.broker(old).addr(), &["topic", "describe", "full"]);
    let state = described["partitions"][0]["replica_state"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        state.starts_with("stopped"),
        "the full broker's replica is stopped: {described}"
    );

    cluster.broker(old).disk_has_space();
    wait_for("the stopped replica to be reopened", RECOVERY_DEADLINE, || {
        let described = cli_json(cluster.broker(old).addr(), &["topic", "describe", "full"]);
        (described["partitions"][0]["replica_state"] == "running").then_some(())
    });
    acked.extend(runtime.block_on(produce(&cluster.bootstrap(), "full", "after", RECORDS)));
    wait_for(
        "the reopened replica to catch up and be in sync",
        RECOVERY_DEADLINE,
        || {
            let described = cluster.describe("full", None)?;
            let in_sync = described["partitions"][0]["in_sync"].as_array()?.len();
            (in_sync == 3).then_some(())
        },
    );
    let observed = runtime.block_on(read_all(&cluster.bootstrap(), "full"));
    let report = check(&acked, &observed);
    assert!(report.lost.is_empty() && report.reordered.is_empty(), "{report}");
    assert!(
        report.duplicated.is_empty(),
        "idempotent producers store each record once: {report}"
    );
}
