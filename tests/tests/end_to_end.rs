//! A single broker end to end, through the Rust client and through the CLI.

use std::time::Duration;

use conveyor_client::producer::partitioner::partition_for_key;
use conveyor_client::{Client, ConsumerConfig, ProducerConfig, ProducerRecord, StartAt};
use conveyor_tests::checker::{Acked, Observed, check};
use conveyor_tests::{BrokerProcess, cli, runtime};
use futures::StreamExt;
use serde_json::Value;

const RECORDS: u64 = 100_000;
const PARTITIONS: i32 = 4;
const CONSUME_DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn given_a_broker_when_100k_keyed_records_are_produced_should_consume_them_all_in_order_per_partition() {
    let broker = BrokerProcess::start();
    runtime().block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        client
            .admin()
            .create_topic("orders", PARTITIONS, &[])
            .await
            .expect("create topic");
        let producer = client.producer(ProducerConfig::default());
        let mut deliveries = Vec::with_capacity(RECORDS as usize);
        for i in 0..RECORDS {
            let key = format!("key-{}", i % 1000);
            let record = ProducerRecord::new("orders", format!("p0-{i}")).key(key.clone());
            deliveries.push((i, key, producer.send(record).await.expect("send")));
        }
        producer.flush().await.expect("flush");
        let mut acked = Vec::with_capacity(deliveries.len());
        for (i, key, delivery) in deliveries {
            let written = delivery.await.expect("acknowledged");
            assert_eq!(
                written.partition,
                partition_for_key(key.as_bytes(), PARTITIONS as u32),
                "murmur2 partitioner"
            );
            acked.push(Acked {
                id: format!("p0-{i}"),
                partition: written.partition,
                offset: written.offset.expect("acks=all gives an offset"),
            });
        }

        let mut consumer = client.consumer(ConsumerConfig::default().max_wait(Duration::from_millis(100)));
        consumer.assign_all("orders", StartAt::Earliest).await.expect("assign");
        let mut stream = consumer.stream();
        let mut observed = Vec::with_capacity(RECORDS as usize);
        tokio::time::timeout(CONSUME_DEADLINE, async {
            while (observed.len() as u64) < RECORDS {
                let r = stream.next().await.expect("stream continues").expect("record");
                observed.push(Observed::of(&r));
            }
        })
        .await
        .expect("consumed every record before the deadline");
        let report = check(&acked, &observed);
        assert!(
            report.lost.is_empty() && report.duplicated.is_empty() && report.reordered.is_empty(),
            "{report}"
        );

        let description = client.admin().describe_topic("orders").await.expect("describe");
        for p in &description.partitions {
            let last = observed
                .iter()
                .filter(|o| o.partition == p.partition)
                .map(|o| o.offset)
                .max();
            assert_eq!(
                last.map(|o| o + 1),
                Some(p.high_watermark),
                "1000 keys reach every partition, read to its end"
            );
        }
    });
}

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "conveyor failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf8 output")
}

#[test]
fn given_a_broker_when_driven_by_the_cli_should_create_produce_consume_describe_and_delete() {
    let broker = BrokerProcess::start();
    let addr = broker.addr();
    let out = stdout(&cli(
        addr,
        &[
            "topic",
            "create",
            "cli-topic",
            "--partitions",
            "2",
            "--config",
            "retention.ms=3600000",
        ],
        "",
    ));
    assert!(out.contains("created topic cli-topic"), "{out}");

    let out = stdout(&cli(
        addr,
        &["produce", "cli-topic", "--key-separator", ":"],
        "a:1\nb:2\nc:3\nno-key-here\n",
    ));
    assert!(out.contains("4 record(s) acknowledged"), "{out}");

    let out = stdout(&cli(
        addr,
        &["consume", "cli-topic", "--from-beginning", "--output", "json"],
        "",
    ));
    let records: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(records.len(), 4, "{out}");
    let mut pairs: Vec<(Value, Value)> = records.iter().map(|r| (r["key"].clone(), r["value"].clone())).collect();
    pairs.sort_by_key(|(_, v)| v.to_string());
    assert_eq!(
        pairs,
        vec![
            (Value::from("a"), Value::from("1")),
            (Value::from("b"), Value::from("2")),
            (Value::from("c"), Value::from("3")),
            (Value::Null, Value::from("no-key-here")),
        ]
    );
    for r in &records {
        assert!(r["partition"].is_number() && r["offset"].is_number() && r["timestamp"].is_number());
        assert!(r["headers"].is_object());
    }

    let out = stdout(&cli(
        addr,
        &["consume", "cli-topic", "--from-beginning", "--max-records", "1"],
        "",
    ));
    assert_eq!(out.lines().count(), 1);

    let out = stdout(&cli(addr, &["offsets", "cli-topic", "--output", "json"], ""));
    let offsets: Value = serde_json::from_str(&out).expect("json");
    for p in offsets["partitions"].as_array().expect("partitions") {
        assert_eq!(
            p["high_watermark"], p["log_end_offset"],
            "everything acknowledged is committed"
        );
        assert!(p["high_watermark"].as_u64().expect("hw") >= 1);
    }

    let out = stdout(&cli(
        addr,
        &["topic", "alter", "cli-topic", "--config", "retention.ms=60000"],
        "",
    ));
    assert!(out.contains("updated"), "{out}");
    let out = stdout(&cli(addr, &["topic", "describe", "cli-topic", "--output", "json"], ""));
    let d: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(d["name"], "cli-topic");
    assert_eq!(d["config"]["retention.ms"], "60000");
    let partitions = d["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 2);
    for p in partitions {
        for field in ["partition", "leader", "high_watermark", "log_end_offset"] {
            assert!(p[field].is_number(), "{field} in {p}");
        }
        assert!(p["replicas"].is_array() && p["in_sync"].is_array());
    }
    let text = stdout(&cli(addr, &["topic", "describe", "cli-topic"], ""));
    assert!(text.contains("PARTITION") && text.contains("retention.ms"), "{text}");

    let info: Value =
        serde_json::from_str(&stdout(&cli(addr, &["cluster", "info", "--output", "json"], ""))).expect("json");
    assert_eq!(info["controller"], 1);
    assert_eq!(info["brokers"][0]["address"], addr);
    assert_eq!(info["brokers"][0]["alive"], true);

    stdout(&cli(addr, &["topic", "delete", "cli-topic"], ""));
    let list: Value =
        serde_json::from_str(&stdout(&cli(addr, &["topic", "list", "--output", "json"], ""))).expect("json");
    assert_eq!(list, Value::Array(vec![]));
    assert!(
        !broker.data_dir().join("topics").join("cli-topic").exists(),
        "deleted topic data is gone"
    );
}

#[test]
fn given_produced_records_when_metrics_are_scraped_should_report_requests_and_offsets() {
    let broker = BrokerProcess::start();
    let out = stdout(&cli(broker.addr(), &["topic", "create", "m"], ""));
    assert!(out.contains("created"));
    stdout(&cli(broker.addr(), &["produce", "m"], "x\ny\nz\n"));
    let metrics = broker.scrape_metrics();
    assert!(metrics.starts_with("HTTP/1.0 200 OK"), "{metrics}");
    // Three records after the Raft leader's no-op at offset 0.
    assert!(
        metrics.contains("conveyor_log_end_offset{topic=\"m\",partition=\"0\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("conveyor_high_watermark{topic=\"m\",partition=\"0\"} 4"),
        "{metrics}"
    );
    assert!(metrics.contains("conveyor_records_in_total 3"), "{metrics}");
    assert!(metrics.contains("conveyor_produce_latency_seconds_count"), "{metrics}");
    assert!(metrics.contains("conveyor_fsync_latency_seconds_count"), "{metrics}");
    assert!(
        metrics.contains("conveyor_raft_leader_changes_total 2"),
        "the controller group and the partition each became leader once: {metrics}"
    );
    assert!(
        !metrics.contains("conveyor_raft_commit_latency_seconds_count 0"),
        "commits were timed: {metrics}"
    );
}

#[test]
fn given_plain_protobuf_records_should_store_them_and_fetch_them_decoded() {
    use bytes::Bytes;
    use conveyor_client::proto::fetch_client::FetchClient;
    use conveyor_client::proto::produce_client::ProduceClient;
    use conveyor_client::proto::{
        Acks, FetchRequest, Header, PartitionFetch, PartitionProduce, ProduceRequest, Record,
    };

    let broker = BrokerProcess::start();
    assert!(cli(broker.addr(), &["topic", "create", "plain"], "").status.success());
    runtime().block_on(async {
        let url = format!("http://{}", broker.addr());
        let mut produce = ProduceClient::connect(url.clone()).await.expect("grpc");
        let records = (0..3)
            .map(|i| Record {
                key: Some(Bytes::from(format!("k{i}"))),
                value: (i != 2).then(|| Bytes::from(format!("v{i}"))),
                headers: vec![Header {
                    key: "trace".into(),
                    value: Some(Bytes::from("abc")),
                }],
                timestamp: 1_700_000_000_000 + i,
                offset: 0,
            })
            .collect();
        let response = produce
            .produce(ProduceRequest {
                request_id: 7,
                acks: Acks::All as i32,
                partitions: vec![PartitionProduce {
                    topic: "plain".into(),
                    partition: 0,
                    batches: vec![],
                    records,
                }],
            })
            .await
            .expect("produce")
            .into_inner();
        assert_eq!(response.request_id, 7);
        let result = &response.partitions[0];
        assert!(result.error.is_none());
        let base = result.base_offset;
        assert_eq!(result.last_offset, base + 2);

        let mut fetch = FetchClient::connect(url).await.expect("grpc");
        let data = fetch
            .fetch(FetchRequest {
                partitions: vec![PartitionFetch {
                    topic: "plain".into(),
                    partition: 0,
                    offset: base + 1,
                    max_bytes: 0,
                }],
                decode_records: true,
                ..FetchRequest::default()
            })
            .await
            .expect("fetch")
            .into_inner();
        let p = &data.partitions[0];
        assert_eq!(p.high_watermark, base + 3);
        let got: Vec<(u64, Option<Bytes>, Option<Bytes>, i64)> = p
            .records
            .iter()
            .map(|r| (r.offset, r.key.clone(), r.value.clone(), r.timestamp))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    base + 1,
                    Some(Bytes::from("k1")),
                    Some(Bytes::from("v1")),
                    1_700_000_000_001
                ),
                (base + 2, Some(Bytes::from("k2")), None, 1_700_000_000_002),
            ],
            "records from the requested offset on, the tombstone kept as a null value"
        );
        assert_eq!(p.records[0].headers[0].key, "trace");
        assert_eq!(p.records[0].headers[0].value, Some(Bytes::from("abc")));
    });
    let out = cli(broker.addr(), &["produce", "plain", "--acks", "none"], "x\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(broker.addr(), &["produce", "plain", "--acks", "leader"], "y\n");
    assert!(out.status.success());
    wait_for_visible(broker.addr(), 5);
}

/// acks=none answers before the append: wait for it to become visible.
fn wait_for_visible(addr: &str, expected: u64) {
    conveyor_tests::wait_for(
        "records produced with acks=none to become visible",
        Duration::from_secs(30),
        || {
            let out = cli(addr, &["offsets", "plain", "--output", "json"], "");
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            let out = cli(addr, &["consume", "plain", "--from-beginning"], "");
            let lines = String::from_utf8_lossy(&out.stdout).lines().count() as u64;
            (v["partitions"][0]["high_watermark"].as_u64()? > 0 && lines == expected).then_some(())
        },
    );
}
