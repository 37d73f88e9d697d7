//! Idempotent produce against a real broker: a retried batch is answered with its original
//! offsets and stored once, across restarts and retention; malformed or stale producer
//! fields are refused with a clear error and change nothing.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use conveyor_client::Client;
use conveyor_client::proto::{Acks, ErrorCode, PartitionProduce, ProduceRequest, Record as PbRecord};
use conveyor_tests::raw_produce::{batch, connect, new_producer, request, send, send_until_answered};
use conveyor_tests::{BrokerProcess, read_all, runtime, wait_for};

async fn stored_values(addr: &str, topic: &str) -> Vec<String> {
    read_all(addr, topic).await.into_iter().map(|r| r.id).collect()
}

async fn create(addr: &str, topic: &str, configs: &[(&str, &str)]) {
    Client::connect(addr)
        .await
        .expect("connect")
        .admin()
        .create_topic(topic, 1, configs)
        .await
        .expect("create topic");
}

#[test]
fn a_retried_batch_is_answered_with_its_original_offsets_and_stored_once() {
    let broker = BrokerProcess::start();
    runtime().block_on(async {
        create(broker.addr(), "t", &[]).await;
        let mut produce = connect(broker.addr()).await;
        let pid = new_producer(&mut produce).await;
        let first = batch(pid, 0, 0, &["a", "b", "c"]);
        // Offsets start after the leader's no-op entry.
        let (base, _) = send(&mut produce, request("t", Acks::All, first.clone()))
            .await
            .expect("first");
        let second = batch(pid, 0, 3, &["d"]);
        assert_eq!(
            send(&mut produce, request("t", Acks::All, second.clone())).await,
            Ok((base + 3, base + 3))
        );
        for _ in 0..3 {
            assert_eq!(
                send(&mut produce, request("t", Acks::All, first.clone())).await,
                Ok((base, base + 2))
            );
            assert_eq!(
                send(&mut produce, request("t", Acks::All, second.clone())).await,
                Ok((base + 3, base + 3))
            );
        }
        // A request that repeats a written batch and adds the next one stores only the new one.
        let third = batch(pid, 0, 4, &["e"]);
        let mut both = request("t", Acks::All, second.clone());
        both.partitions[0].batches.push(third);
        assert_eq!(send(&mut produce, both).await, Ok((base + 3, base + 4)));
        // Plain records carry the producer fields too.
        let plain = |seq: i32| ProduceRequest {
            request_id: 2,
            acks: Acks::All as i32,
            partitions: vec![PartitionProduce {
                topic: "t".into(),
                partition: 0,
                records: vec![PbRecord {
                    value: Some(Bytes::from("f")),
                    ..PbRecord::default()
                }],
                producer_id: Some(pid),
                producer_epoch: Some(0),
                base_sequence: Some(seq),
                ..PartitionProduce::default()
            }],
        };
        assert_eq!(send(&mut produce, plain(5)).await, Ok((base + 5, base + 5)));
        assert_eq!(send(&mut produce, plain(5)).await, Ok((base + 5, base + 5)));
        assert_eq!(stored_values(broker.addr(), "t").await, ["a", "b", "c", "d", "e", "f"]);
        let duplicates = broker.metric("conveyor_producer_duplicates_total").unwrap_or(0.0);
        assert!(duplicates >= 8.0, "duplicates counted: {duplicates}");
    });
}

#[test]
fn bad_producer_fields_are_refused_with_a_clear_error_and_nothing_is_written() {
    let broker = BrokerProcess::start();
    runtime().block_on(async {
        create(broker.addr(), "t", &[]).await;
        let mut produce = connect(broker.addr()).await;
        let pid = new_producer(&mut produce).await;
        let other = new_producer(&mut produce).await;
        assert_ne!(pid, other, "ids are never issued twice");
        send(&mut produce, request("t", Acks::All, batch(pid, 0, 0, &["a"])))
            .await
            .expect("first");

        let cases: Vec<(&str, ProduceRequest, ErrorCode, bool, &str)> = vec![
            (
                "a gap",
                request("t", Acks::All, batch(pid, 0, 2, &["x"])),
                ErrorCode::OutOfOrderSequence,
                true,
                "expected sequence 1, got 2",
            ),
            (
                "a sequence that wraps",
                request("t", Acks::All, batch(pid, 0, i32::MAX, &["x", "y"])),
                ErrorCode::InvalidRequest,
                false,
                "do not wrap",
            ),
            (
                "a negative epoch",
                request("t", Acks::All, batch(pid, -2, 1, &["x"])),
                ErrorCode::InvalidRequest,
                false,
                "epoch -2",
            ),
            (
                "a negative sequence",
                request("t", Acks::All, batch(pid, 0, -7, &["x"])),
                ErrorCode::InvalidRequest,
                false,
                "sequence -7",
            ),
            (
                "an id never issued",
                request("t", Acks::All, batch(1 << 50, 0, 0, &["x"])),
                ErrorCode::InvalidProducerId,
                true,
                "never issued",
            ),
            (
                "a producer with no state past sequence 0",
                request("t", Acks::All, batch(other, 0, 5, &["x"])),
                ErrorCode::UnknownProducerId,
                false,
                "InitProducer",
            ),
            (
                "acks none (nobody would hear a refusal from the partition)",
                request("t", Acks::None, batch(pid, 0, 1, &["x"])),
                ErrorCode::InvalidRequest,
                false,
                "acks=all",
            ),
            (
                "acks other than all",
                request("t", Acks::Leader, batch(pid, 0, 1, &["x"])),
                ErrorCode::InvalidRequest,
                false,
                "acks=all",
            ),
        ];
        for (what, req, code, retriable, needle) in cases {
            let refused = send(&mut produce, req).await.expect_err(what);
            assert_eq!((refused.0, refused.1), (code, retriable), "{what}: {}", refused.2);
            assert!(
                refused.2.contains(needle),
                "{what}: '{}' should say '{needle}'",
                refused.2
            );
        }
        // Only some of the three fields on plain records.
        let partial = ProduceRequest {
            request_id: 3,
            acks: Acks::All as i32,
            partitions: vec![PartitionProduce {
                topic: "t".into(),
                partition: 0,
                records: vec![PbRecord {
                    value: Some(Bytes::from("x")),
                    ..PbRecord::default()
                }],
                producer_id: Some(pid),
                ..PartitionProduce::default()
            }],
        };
        let refused = send(&mut produce, partial).await.expect_err("partial fields");
        assert_eq!(refused.0, ErrorCode::InvalidRequest, "{}", refused.2);

        // A new epoch starts again at 0 and fences the old one.
        send(&mut produce, request("t", Acks::All, batch(pid, 1, 0, &["b"])))
            .await
            .expect("new epoch");
        let fenced = send(&mut produce, request("t", Acks::All, batch(pid, 0, 1, &["x"])))
            .await
            .expect_err("fenced");
        assert_eq!((fenced.0, fenced.1), (ErrorCode::ProducerFenced, false), "{}", fenced.2);
        assert!(broker.metric("conveyor_producer_fenced_total").unwrap_or(0.0) >= 1.0);
        assert!(broker.metric("conveyor_producer_out_of_order_total").unwrap_or(0.0) >= 1.0);
        assert_eq!(
            stored_values(broker.addr(), "t").await,
            ["a", "b"],
            "refused batches wrote nothing"
        );
    });
}

/// The offset of the newest `<20 digits>.snapshot` in `partition_dir/producers`, if any.
fn newest_producer_snapshot(partition_dir: &Path) -> Option<u64> {
    let entries = std::fs::read_dir(partition_dir.join("producers")).ok()?;
    entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let digits = name.strip_suffix(".snapshot").filter(|d| d.len() == 20)?;
            digits.parse::<u64>().ok()
        })
        .max()
}

#[test]
fn a_restarted_broker_still_answers_a_duplicate_with_the_original_offsets() {
    let mut broker = BrokerProcess::start();
    let rt = runtime();
    let pid = rt.block_on(async {
        create(broker.addr(), "t", &[]).await;
        new_producer(&mut connect(broker.addr()).await).await
    });
    let mut acked = Vec::new();
    // SIGKILL first: the state then comes from replaying the batch headers after the
    // snapshot the broker wrote when it opened the partition; SIGTERM after more batches:
    // from the snapshot a clean close writes.
    for (how, batches) in [("SIGKILL", 0..8), ("SIGTERM", 8..11)] {
        rt.block_on(async {
            let mut produce = connect(broker.addr()).await;
            for seq in batches {
                let b = batch(pid, 0, seq, &[&format!("v{seq}")]);
                let req = request("t", Acks::All, b.clone());
                let offsets = send_until_answered(&mut produce, req, Duration::from_secs(30))
                    .await
                    .expect("append");
                acked.push((b, offsets));
            }
        });
        if how == "SIGTERM" {
            broker.terminate();
            let last_offset = acked.last().expect("acknowledged batches").1.1;
            let newest = newest_producer_snapshot(&broker.data_dir().join("topics/t/0"));
            assert!(
                newest.is_some_and(|offset| offset > last_offset),
                "a clean close leaves a producer snapshot past the last acknowledged batch \
                 (offset {last_offset}); newest: {newest:?}"
            );
        } else {
            broker.kill();
        }
        broker.restart();
        rt.block_on(async {
            let mut produce = connect(broker.addr()).await;
            // The last five batches are remembered; each retry gets its original offsets.
            for (b, offsets) in &acked[acked.len() - 5..] {
                let req = request("t", Acks::All, b.clone());
                let answer = send_until_answered(&mut produce, req, Duration::from_secs(30)).await;
                assert_eq!(answer, Ok(*offsets), "after {how}");
            }
        });
    }
    rt.block_on(async {
        let mut produce = connect(broker.addr()).await;
        let next = send(&mut produce, request("t", Acks::All, batch(pid, 0, 11, &["v11"]))).await;
        assert!(
            next.is_ok(),
            "the producer goes on in sequence after restarts: {next:?}"
        );
        let values = stored_values(broker.addr(), "t").await;
        assert_eq!(values.len(), 12, "{values:?}");
    });
}

#[test]
fn producer_state_survives_retention_of_the_segments_that_carried_it() {
    /// 900-byte plain batches sent after the producer's: about four fill a 4 KiB segment.
    const FILLERS: usize = 40;
    /// Retention checks every 200 ms; the rest is margin for a loaded machine.
    const RETENTION_DEADLINE: Duration = Duration::from_secs(30);
    let mut broker = BrokerProcess::start_with_config("[log]\nretention_check_interval = \"200ms\"\n");
    let rt = runtime();
    let topic_configs = [
        ("segment.bytes", "4096"),
        ("retention.bytes", "8192"),
        ("max.message.bytes", "2048"),
    ];
    let (pid, last, last_offsets) = rt.block_on(async {
        create(broker.addr(), "t", &topic_configs).await;
        let mut produce = connect(broker.addr()).await;
        let pid = new_producer(&mut produce).await;
        let mut last = None;
        for seq in 0..3 {
            let b = batch(pid, 0, seq, &["idempotent"]);
            let offsets = send(&mut produce, request("t", Acks::All, b.clone()))
                .await
                .expect("append");
            last = Some((b, offsets));
        }
        // Plain batches fill ten 4 KiB segments, well past retention.bytes, so that retention
        // deletes the producer's.
        let filler = "x".repeat(900);
        for _ in 0..FILLERS {
            let plain = batch(-1, -1, -1, &[&filler]);
            send(&mut produce, request("t", Acks::All, plain))
                .await
                .expect("filler");
        }
        let (last, offsets) = last.expect("three batches");
        (pid, last, offsets)
    });
    let admin = rt.block_on(Client::connect(broker.addr())).expect("connect").admin();
    wait_for("retention to delete the producer's segment", RETENTION_DEADLINE, || {
        let d = rt.block_on(admin.describe_topic("t")).ok()?;
        (d.partitions[0].log_start_offset > last_offsets.1).then_some(())
    });
    for restart in [false, true] {
        if restart {
            broker.kill();
            broker.restart();
        }
        rt.block_on(async {
            let mut produce = connect(broker.addr()).await;
            let req = request("t", Acks::All, last.clone());
            let answer = send_until_answered(&mut produce, req, Duration::from_secs(30)).await;
            assert_eq!(
                answer,
                Ok(last_offsets),
                "a retry of a batch whose segment is gone (restarted: {restart})"
            );
        });
    }
    rt.block_on(async {
        let mut produce = connect(broker.addr()).await;
        let next = send(&mut produce, request("t", Acks::All, batch(pid, 0, 3, &["next"]))).await;
        assert!(next.is_ok(), "the producer is still known: {next:?}");
    });
}
