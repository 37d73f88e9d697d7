//! `conveyor producers` and `Admin::list_producers` against a real broker: the idempotent
//! producers a partition's leader remembers, with the offset of their last write.

use std::collections::BTreeMap;
use std::time::Duration;

use conveyor_client::{Client, ProducerConfig, ProducerRecord};
use conveyor_tests::{BrokerProcess, cli, cli_json, runtime, stdout};
use serde_json::Value;

const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);

/// Sends `count` records to each partition of `counts` with one default (idempotent) producer
/// and returns the last offset acknowledged per partition.
async fn produce(client: &Client, topic: &str, counts: &[(i32, u64)]) -> BTreeMap<i32, u64> {
    let producer = client.producer(ProducerConfig::default()).expect("producer");
    assert!(ProducerConfig::default().idempotence, "idempotence is the default");
    let mut deliveries = Vec::new();
    for &(partition, count) in counts {
        for i in 0..count {
            let record = ProducerRecord::new(topic, format!("record {i}")).partition(partition);
            deliveries.push(producer.send(record).await.expect("send"));
        }
    }
    producer.flush().await.expect("flush");
    let mut last = BTreeMap::new();
    tokio::time::timeout(DELIVERY_DEADLINE, async {
        for d in deliveries {
            let written = d.await.expect("acknowledged");
            let offset = written.offset.expect("acks=all reports offsets");
            let entry = last.entry(written.partition).or_insert(offset);
            *entry = (*entry).max(offset);
        }
    })
    .await
    .expect("every record acknowledged in time");
    last
}

/// The producers of one partition in `conveyor producers --output json`.
fn producers_of(listing: &Value, partition: i64) -> &Vec<Value> {
    listing["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["partition"] == partition)
        .unwrap_or_else(|| panic!("partition {partition} listed: {listing}"))["producers"]
        .as_array()
        .expect("producers")
}

#[test]
fn given_an_idempotent_producer_on_two_partitions_when_listed_should_show_it_on_each_with_its_last_offset() {
    let broker = BrokerProcess::start();
    let addr = broker.addr();
    let started_ms = conveyor_storage::unix_millis();
    let last = runtime().block_on(async {
        let client = Client::connect(addr).await.expect("connect");
        client.admin().create_topic("deliveries", 2, &[]).await.expect("create");
        let last = produce(&client, "deliveries", &[(0, 5), (1, 3)]).await;
        assert_eq!(last.len(), 2, "{last:?}");

        let rows = client.admin().list_producers("deliveries", 1).await.expect("list");
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            (rows[0].producer_epoch, rows[0].last_sequence, rows[0].last_offset),
            (0, 2, last[&1]),
            "{rows:?}"
        );
        assert!(rows[0].cached_batches >= 1, "{rows:?}");
        last
    });
    let finished_ms = conveyor_storage::unix_millis();

    let listing = cli_json(addr, &["producers", "deliveries"]);
    assert_eq!(listing["topic"], "deliveries");
    assert_eq!(listing["partitions"].as_array().map(Vec::len), Some(2), "{listing}");
    let mut ids = Vec::new();
    for (partition, records) in [(0, 5), (1, 3)] {
        let producers = producers_of(&listing, partition);
        assert_eq!(producers.len(), 1, "one producer on partition {partition}: {listing}");
        let p = &producers[0];
        assert_eq!(p["last_offset"], last[&(partition as i32)], "{listing}");
        assert_eq!(p["last_sequence"], records - 1, "sequences start at 0: {listing}");
        assert_eq!(p["producer_epoch"], 0);
        let written = p["last_write_ms"].as_i64().expect("last write");
        assert!(
            (started_ms..=finished_ms).contains(&written),
            "written at {written}, produced within [{started_ms}, {finished_ms}]"
        );
        ids.push(p["producer_id"].as_i64().expect("producer id"));
    }
    assert_eq!(ids[0], ids[1], "one producer wrote both partitions: {listing}");

    let one = cli_json(addr, &["producers", "deliveries", "--partition", "1"]);
    let partitions = one["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 1, "{one}");
    assert_eq!(producers_of(&one, 1)[0]["last_offset"], last[&1]);

    let table = stdout(&cli(addr, &["producers", "deliveries"], ""));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("PARTITION") && lines[0].contains("PRODUCER ID") && lines[0].contains("LAST WRITE"),
        "{table}"
    );
    assert_eq!(lines.len(), 3, "a header and one row per partition: {table}");
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    let expected = [
        "1".to_string(),
        ids[1].to_string(),
        "0".into(),
        "2".into(),
        last[&1].to_string(),
    ];
    assert_eq!(row[..5], expected, "{table}");
    assert!(row[5].ends_with('Z'), "the last write as an RFC 3339 time: {table}");
}

#[test]
fn given_no_idempotent_writes_or_no_such_topic_when_listed_should_say_so() {
    let broker = BrokerProcess::start();
    let addr = broker.addr();
    stdout(&cli(addr, &["topic", "create", "plain", "--partitions", "2"], ""));
    stdout(&cli(
        addr,
        &["produce", "plain", "--partition", "0", "--no-idempotence"],
        "a\nb\n",
    ));

    let text = stdout(&cli(addr, &["producers", "plain", "--partition", "0"], ""));
    assert_eq!(text.trim(), "topic plain partition 0: no idempotent producers");
    let text = stdout(&cli(addr, &["producers", "plain"], ""));
    assert_eq!(text.trim(), "topic plain: no idempotent producers on any partition");
    let listing = cli_json(addr, &["producers", "plain"]);
    assert!(
        producers_of(&listing, 0).is_empty() && producers_of(&listing, 1).is_empty(),
        "{listing}"
    );

    let out = cli(addr, &["producers", "nosuch"], "");
    assert!(!out.status.success(), "an unknown topic is an error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown topic 'nosuch'"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));

    let out = cli(addr, &["producers", "plain", "--partition", "2"], "");
    assert!(!out.status.success(), "a partition past the last is an error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("topic 'plain' has no partition 2 (it has 2)"),
        "{stderr}"
    );
}
