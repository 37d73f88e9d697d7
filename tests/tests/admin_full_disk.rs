//! An admin call that fails on a full disk leaves nothing half-done: what it answered is what
//! the broker shows afterwards, before and after a restart. Either nothing was recorded and
//! the topic never appears, or the record was committed, the answer says so, and the topic
//! exists and works once the disk has space again.

use std::process::Command;
use std::time::Duration;

use conveyor_client::proto::ErrorCode;
use conveyor_client::{Client, ClientError, ConsumerConfig, ProducerConfig, ProducerRecord, StartAt};
use conveyor_tests::{BrokerProcess, cli_json, runtime, wait_for};
use futures::StreamExt;

/// How long the replica may take to open once the disk has space again (the broker retries
/// it after 1 s, doubling to 30 s; the test spends a few seconds before freeing space).
const RECOVERY_DEADLINE: Duration = Duration::from_secs(30);
/// A file size limit that lets small appends to existing files through (the controller log,
/// whose index is already preallocated) but not the preallocation of a new partition's
/// index (10 MiB): a disk with a few blocks left.
const NEARLY_FULL_FILE_LIMIT: u64 = 1 << 20;

/// Sets the broker's soft file size limit (see `BrokerProcess::disk_full`).
fn limit_file_size(broker: &BrokerProcess, bytes: u64) {
    let status = Command::new("prlimit")
        .args(["--pid", &broker.pid().to_string(), &format!("--fsize={bytes}:")])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --fsize={bytes} failed");
}

/// Whether the broker knows `topic`; any error but "unknown topic" fails the test.
async fn exists(client: &Client, topic: &str) -> bool {
    match client.admin().describe_topic(topic).await {
        Ok(_) => true,
        Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => false,
        Err(e) => panic!("describe {topic}: {e}"),
    }
}

/// Produces one record to `topic` and reads it back.
async fn round_trip(client: &Client, topic: &str, value: &str) {
    let producer = client.producer(ProducerConfig::default()).expect("producer config");
    let delivery = producer
        .send(ProducerRecord::new(topic, value.to_string()))
        .await
        .expect("queue a record");
    delivery.await.expect("record acknowledged");
    let mut consumer = client.consumer(ConsumerConfig::default().max_wait(Duration::from_millis(100)));
    consumer.assign_all(topic, StartAt::Earliest).await.expect("assign");
    let mut stream = consumer.stream();
    let found = tokio::time::timeout(RECOVERY_DEADLINE, async {
        while let Some(r) = stream.next().await {
            let r = r.expect("record");
            if r.value.as_deref() == Some(value.as_bytes()) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "record {value} read back from {topic}");
}

/// The create failed with an error a person can act on, not "unknown topic".
fn assert_actionable(error: &ClientError) {
    let message = error.to_string();
    assert!(!message.contains("unknown topic"), "{message}");
    assert!(error.is_retriable(), "retriable once the disk has space: {error:?}");
    match error {
        ClientError::Broker { code, .. } => assert!(
            matches!(code, tonic::Code::Unavailable | tonic::Code::ResourceExhausted),
            "UNAVAILABLE or RESOURCE_EXHAUSTED, got {code:?}: {message}"
        ),
        other => panic!("the broker should answer: {other:?}"),
    }
}

#[test]
fn given_a_full_disk_a_failed_topic_create_should_leave_no_topic_behind_before_or_after_a_restart() {
    let mut broker = BrokerProcess::start();
    let rt = runtime();
    let client = rt.block_on(Client::connect(broker.addr())).expect("connect");

    broker.disk_full();
    let created = rt.block_on(client.admin().create_topic("orders", 1, &[]));
    broker.disk_has_space();
    let error = created.expect_err("nothing can be written");
    assert_actionable(&error);
    assert!(
        error.to_string().contains("could not be written"),
        "says the change was not recorded: {error}"
    );
    assert!(
        !rt.block_on(exists(&client, "orders")),
        "no topic after the failed create"
    );

    broker.terminate();
    broker.restart();
    let client = rt.block_on(Client::connect(broker.addr())).expect("connect");
    assert!(
        !rt.block_on(exists(&client, "orders")),
        "the failed create must not appear after a restart"
    );
}

#[test]
fn given_a_nearly_full_disk_a_committed_topic_create_should_say_so_and_the_topic_should_work_once_there_is_space() {
    let mut broker = BrokerProcess::start();
    let rt = runtime();
    let client = rt.block_on(Client::connect(broker.addr())).expect("connect");

    // The controller log's active segment preallocates its index on its first append.
    rt.block_on(client.admin().create_topic("first", 1, &[]))
        .expect("create with space");
    limit_file_size(&broker, NEARLY_FULL_FILE_LIMIT);
    let created = rt.block_on(client.admin().create_topic("orders", 1, &[]));
    let error = created.expect_err("the replica cannot be opened");
    assert_actionable(&error);
    assert!(
        error.to_string().contains("was committed"),
        "says the topic was recorded: {error}"
    );
    // The topic is registered (as a restart would show it); only its replica here is
    // stopped, and it is retried.
    assert!(rt.block_on(exists(&client, "orders")), "the committed topic is listed");
    let described = cli_json(broker.addr(), &["topic", "describe", "orders"]);
    let state = described["partitions"][0]["replica_state"].as_str().unwrap_or_default();
    assert!(
        state.starts_with("stopped: "),
        "describe says why it is stopped: {described}"
    );

    // One replica that cannot open does not hold back the metadata that follows it.
    rt.block_on(client.admin().delete_topic("first"))
        .expect("a later record applies although a replica could not be opened");
    assert!(!rt.block_on(exists(&client, "first")), "the later deletion took effect");
    assert_eq!(
        broker.metric("conveyor_metadata_apply_failing"),
        Some(0.0),
        "no metadata record is stuck"
    );

    broker.disk_has_space();
    wait_for("the stopped replica to open", RECOVERY_DEADLINE, || {
        let described = cli_json(broker.addr(), &["topic", "describe", "orders"]);
        (described["partitions"][0]["replica_state"] == "running").then_some(())
    });
    rt.block_on(round_trip(&client, "orders", "before restart"));

    broker.terminate();
    broker.restart();
    let client = rt.block_on(Client::connect(broker.addr())).expect("connect");
    assert!(rt.block_on(exists(&client, "orders")), "still there after a restart");
    assert!(!rt.block_on(exists(&client, "first")), "still deleted after a restart");
    rt.block_on(round_trip(&client, "orders", "after restart"));
}
