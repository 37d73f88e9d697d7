//! Corruption at rest on a single broker: bytes flipped in a sealed segment are found by the
//! background scrub, reported (metric and a log line naming topic, partition and offset), and
//! never served; with no peer to repair from, nothing else of the log is lost.

use std::collections::HashSet;
use std::time::Duration;

use conveyor_client::{Client, ConsumerConfig, StartAt};
use conveyor_tests::{BrokerProcess, cli, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);
/// How long a reader may take to reach the damaged batch.
const READ_WINDOW: Duration = Duration::from_secs(10);
const TOPIC: &str = "scrubbed";

/// The value of `conveyor_corrupt_batches_total`, if the scrape has it.
fn corrupt_batches(broker: &BrokerProcess) -> Option<u64> {
    broker.metric("conveyor_corrupt_batches_total").map(|v| v as u64)
}

#[test]
fn given_flipped_bytes_in_a_sealed_segment_when_the_broker_runs_should_find_them_and_never_serve_them() {
    let mut broker = BrokerProcess::start();
    let create = cli(
        broker.addr(),
        &[
            "topic",
            "create",
            TOPIC,
            "--config",
            "segment.bytes=8192",
            "--config",
            "max.message.bytes=8192",
        ],
        "",
    );
    assert!(create.status.success(), "{}", String::from_utf8_lossy(&create.stderr));
    let mut produced = HashSet::new();
    for run in 0..10 {
        let lines: Vec<String> = (run * 50..(run + 1) * 50)
            .map(|i| format!("record-{i:04}-{}", "x".repeat(40)))
            .collect();
        let out = cli(broker.addr(), &["produce", TOPIC], &(lines.join("\n") + "\n"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        produced.extend(lines);
    }
    assert_eq!(corrupt_batches(&broker), Some(0), "an intact log has no corrupt batch");
    broker.terminate();

    // Alter an acknowledged value in the oldest (sealed) segment, as a bad disk would.
    let dir = broker.data_dir().join("topics").join(TOPIC).join("0");
    let mut logs: Vec<_> = std::fs::read_dir(&dir)
        .expect("partition directory")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    assert!(logs.len() >= 2, "several segments: {logs:?}");
    let mut bytes = std::fs::read(&logs[0]).expect("read segment");
    let needle = b"record-0003-x";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the record is stored uncompressed in the first segment");
    bytes[at + needle.len() - 1] = b'y';
    std::fs::write(&logs[0], &bytes).expect("write segment");
    let altered = format!("record-0003-y{}", "x".repeat(39));

    broker.restart();
    wait_for("the scrub to find the corrupt batch", DEADLINE, || {
        corrupt_batches(&broker).filter(|n| *n >= 1)
    });
    let log = broker.log();
    let report = log
        .lines()
        .find(|l| l.contains("scrub found a corrupt batch"))
        .unwrap_or_else(|| panic!("the finding is logged:\n{log}"));
    assert!(report.contains(TOPIC) && report.contains("partition=0"), "{report}");
    let offset: u64 = report
        .split("offset=")
        .nth(1)
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the log names the corrupt batch's offset: {report}"));
    assert!(
        offset <= 3,
        "the batch holding record 3 starts at or before it: {report}"
    );

    // A single broker has no peer to repair from: the log is kept whole (cutting it at the
    // damage would destroy the intact, acknowledged records after it), and the damaged batch
    // is refused, never served. A reader from the start gets the records before it, then a
    // retriable CRC error, never the altered value.
    let runtime = conveyor_tests::runtime();
    runtime.block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        let mut consumer = client.consumer(ConsumerConfig::default().max_wait(Duration::from_millis(100)));
        consumer.assign_all(TOPIC, StartAt::Earliest).await.expect("assign");
        let mut stream = consumer.stream();
        let error = tokio::time::timeout(READ_WINDOW, async {
            while let Some(r) = futures::StreamExt::next(&mut stream).await {
                match r {
                    Ok(r) => {
                        let value = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
                        assert_ne!(value, altered, "the altered value was served");
                        assert!(produced.contains(&value), "served a value never produced: {value:?}");
                    }
                    Err(e) => return e,
                }
            }
            panic!("the stream ended without reaching the damaged batch");
        })
        .await
        .expect("the reader reaches the damaged batch within the read window");
        assert!(error.is_retriable(), "damage is a retriable error: {error}");
    });

    // Everything produced after the damaged batch (the first produce run) is still there.
    let after: Vec<String> = runtime.block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        let description = client.admin().describe_topic(TOPIC).await.expect("describe");
        let ends: std::collections::HashMap<(String, i32), u64> =
            [((TOPIC.to_string(), 0), description.partitions[0].high_watermark)].into();
        let mut consumer = client.consumer(ConsumerConfig::default().max_wait(Duration::from_millis(100)));
        consumer.assign_all(TOPIC, StartAt::Offset(100)).await.expect("assign");
        let mut stream = consumer.stream();
        let mut values = Vec::new();
        tokio::time::timeout(DEADLINE, async {
            while let Some(r) = stream.next_until(&ends).await {
                let r = r.expect("the batches after the damage decode");
                values.push(String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned());
            }
        })
        .await
        .expect("read to the high watermark");
        values
    });
    for i in 100..500 {
        let value = format!("record-{i:04}-{}", "x".repeat(40));
        assert!(
            after.contains(&value),
            "acknowledged record {i} is gone after the scrub"
        );
    }
}
