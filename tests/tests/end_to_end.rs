//! A single broker end to end, through the Rust client and through the CLI.

use std::time::Duration;

use bytes::Bytes;
use conveyor_client::producer::partitioner::partition_for_key;
use conveyor_client::{Client, ConsumerConfig, Header, ProducerConfig, ProducerRecord, StartAt};
use conveyor_tests::checker::{Acked, Observed, check};
use conveyor_tests::{BrokerProcess, cli, metric_value, runtime, stdout};
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
        let producer = client.producer(ProducerConfig::default()).expect("producer config");
        let mut deliveries = Vec::with_capacity(RECORDS as usize);
        for i in 0..RECORDS {
            let key = format!("key-{}", i % 1000);
            let mut record = ProducerRecord::new("orders", format!("p0-{i}")).key(key.clone());
            if i.is_multiple_of(1000) {
                record = record.header("n", i.to_string());
            }
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
                let o = Observed::of(&r);
                let i: u64 = o.id.trim_start_matches("p0-").parse().expect("id");
                let header = i.is_multiple_of(1000).then(|| Header {
                    key: Bytes::from("n"),
                    value: Some(Bytes::from(i.to_string())),
                });
                assert_eq!(r.headers, Vec::from_iter(header), "headers of {}", o.id);
                observed.push(o);
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
    let commits: Option<u64> = metrics
        .lines()
        .find_map(|l| l.strip_prefix("conveyor_raft_commit_latency_seconds_count "))
        .and_then(|n| n.trim().parse().ok());
    assert!(commits.is_some_and(|n| n > 0), "commits were timed: {metrics}");
    assert!(
        metrics.contains("content-type: application/openmetrics-text"),
        "OpenMetrics text: {metrics}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
    let bytes_in = metric_value(&metrics, "conveyor_bytes_in_total{topic=\"m\"}");
    assert!(
        bytes_in.is_some_and(|n| n > 0.0),
        "bytes in are counted by topic: {metrics}"
    );

    // Bytes out by topic, and a refused request counted under its error code.
    let consumed = stdout(&cli(
        broker.addr(),
        &["consume", "m", "--from-beginning", "--max-records", "3"],
        "",
    ));
    assert_eq!(consumed.lines().count(), 3, "{consumed}");
    assert!(
        !cli(broker.addr(), &["topic", "describe", "missing"], "")
            .status
            .success()
    );
    let metrics = broker.scrape_metrics();
    let bytes_out = metric_value(&metrics, "conveyor_bytes_out_total{topic=\"m\"}");
    assert!(
        bytes_out.is_some_and(|n| n > 0.0),
        "bytes out are counted by topic: {metrics}"
    );
    let unknown = metric_value(
        &metrics,
        "conveyor_request_errors_total{code=\"ERROR_CODE_UNKNOWN_TOPIC\"}",
    );
    assert!(
        unknown.is_some_and(|n| n >= 1.0),
        "errors are counted by code: {metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "conveyor_under_replicated_partitions"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "conveyor_offline_partitions"),
        Some(0.0),
        "{metrics}"
    );
}

/// The fsync histogram times fsync calls alone: appends to a topic that never fsyncs
/// (`flush.policy=os`) add nothing to it, however many Raft rounds they take. (The cluster
/// metadata log, which always fsyncs, has its rounds counted before.)
#[test]
fn given_a_topic_that_never_fsyncs_its_appends_should_add_nothing_to_the_fsync_histogram() {
    let broker = BrokerProcess::start();
    let out = stdout(&cli(
        broker.addr(),
        &["topic", "create", "unsynced", "--config", "flush.policy=os"],
        "",
    ));
    assert!(out.contains("created"));
    let fsyncs = || broker.metric("conveyor_fsync_latency_seconds_count");
    let before = fsyncs();
    assert!(before.is_some(), "{}", broker.scrape_metrics());
    // Not idempotent: a producer id is a block record in the metadata log, which fsyncs.
    stdout(&cli(
        broker.addr(),
        &["produce", "unsynced", "--no-idempotence"],
        "x\ny\nz\n",
    ));
    stdout(&cli(
        broker.addr(),
        &["produce", "unsynced", "--no-idempotence"],
        "u\nv\nw\n",
    ));
    let metrics = broker.scrape_metrics();
    assert_eq!(
        metric_value(&metrics, "conveyor_records_in_total"),
        Some(6.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "conveyor_fsync_latency_seconds_count"),
        before,
        "no fsync ran for the appends: {metrics}"
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
                    records,
                    ..PartitionProduce::default()
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

#[test]
fn given_a_refused_part_on_a_produce_stream_should_refuse_later_parts_of_its_partition_until_resent() {
    use conveyor_client::proto::produce_client::ProduceClient;
    use conveyor_client::proto::{Acks, ErrorCode, PartitionProduce, ProduceRequest};
    use conveyor_storage::batch::{BatchBuilder, Compression, Record};

    let broker = BrokerProcess::start();
    assert!(
        cli(broker.addr(), &["topic", "create", "ordered", "--partitions", "2"], "")
            .status
            .success()
    );
    let values: Vec<String> = runtime().block_on(async {
        let batch = |value: &str| {
            let mut builder = BatchBuilder::new(Compression::None);
            builder.push(&Record {
                timestamp: 1,
                value: Some(bytes::Bytes::from(value.to_string())),
                ..Record::default()
            });
            builder.build().expect("batch")
        };
        let control = BatchBuilder::new(Compression::None)
            .control(true)
            .build_at(1)
            .expect("control batch");
        let part = |partition: i32, batch: bytes::Bytes, sequence: u64, restart: bool| PartitionProduce {
            topic: "ordered".into(),
            partition,
            batches: vec![batch],
            sequence,
            restart,
            ..PartitionProduce::default()
        };
        // (request id, parts): sent back to back on one stream, as a pipelining client would.
        let requests = vec![
            (1, vec![part(0, batch("a"), 1, true)]),
            // Refused (a control batch): part 2 of partition 0 is never appended.
            (2, vec![part(0, control, 2, false), part(1, batch("x"), 1, true)]),
            // So part 3 must not be appended either, or a resend of part 2 would land after it.
            (3, vec![part(0, batch("b"), 3, false)]),
            // The client resends from the first refused part, starting a new run.
            (4, vec![part(0, batch("c"), 4, true)]),
            (5, vec![part(0, batch("d"), 5, false), part(1, batch("y"), 2, false)]),
            // A gap: part 6 never arrived, so 7 waits for it.
            (6, vec![part(0, batch("e"), 7, false)]),
            // Unnumbered parts are not checked.
            (7, vec![part(0, batch("f"), 0, false)]),
        ];
        let mut produce = ProduceClient::connect(format!("http://{}", broker.addr()))
            .await
            .expect("grpc");
        let requests: Vec<ProduceRequest> = requests
            .into_iter()
            .map(|(request_id, partitions)| ProduceRequest {
                request_id,
                acks: Acks::All as i32,
                partitions,
            })
            .collect();
        let mut answers = produce
            .produce_stream(futures::stream::iter(requests))
            .await
            .expect("stream")
            .into_inner();
        let mut errors = std::collections::BTreeMap::new();
        while let Some(answer) = answers.next().await {
            let answer = answer.expect("answer");
            for (i, result) in answer.partitions.into_iter().enumerate() {
                errors.insert((answer.request_id, i), result.error);
            }
        }
        assert_eq!(errors.len(), 9, "every part is answered: {errors:?}");
        let code = |request: u64, i: usize| errors[&(request, i)].as_ref().map(|e| e.code);
        assert_eq!(code(1, 0), None);
        assert_eq!(code(2, 0), Some(ErrorCode::InvalidRequest as i32));
        assert_eq!(code(2, 1), None, "another partition is not held back");
        let held = errors[&(3, 0)].as_ref().expect("part 3 is refused");
        assert_eq!(held.code, ErrorCode::OutOfSequence as i32);
        assert!(held.retriable, "the client resends it");
        assert!(held.message.contains("part 2"), "{}", held.message);
        assert_eq!(code(4, 0), None);
        assert_eq!(code(5, 0), None);
        assert_eq!(code(5, 1), None);
        assert_eq!(code(6, 0), Some(ErrorCode::OutOfSequence as i32));
        assert_eq!(code(7, 0), None);
        conveyor_tests::read_all(broker.addr(), "ordered")
            .await
            .into_iter()
            .map(|o| format!("{}:{}", o.partition, o.id))
            .collect()
    });
    let mut values = values;
    values.sort_by_key(|v| v.starts_with('1'));
    assert_eq!(values, ["0:a", "0:c", "0:d", "0:f", "1:x", "1:y"]);
}
