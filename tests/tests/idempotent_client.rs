//! The client's idempotent producer against a real broker: what it writes into the batch
//! headers, and that turning idempotence off still produces.

use std::time::Duration;

use conveyor_client::proto::fetch_client::FetchClient;
use conveyor_client::proto::{FetchRequest, PartitionFetch};
use conveyor_client::{Client, ProducerConfig, ProducerRecord};
use conveyor_storage::batch::{BatchHeader, BatchIter};
use conveyor_tests::{BrokerProcess, cli, runtime, stdout};

/// Small batches, so that each partition gets many and their sequences can be followed.
const BATCH_SIZE: usize = 2 * 1024;
const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);

/// The headers of every data batch of a partition, read raw from the broker.
async fn stored_headers(broker: &str, topic: &str, partition: i32) -> Vec<BatchHeader> {
    let mut fetch = FetchClient::connect(format!("http://{broker}")).await.expect("grpc");
    let (mut offset, mut headers) = (0u64, Vec::new());
    loop {
        let request = FetchRequest {
            partitions: vec![PartitionFetch {
                topic: topic.into(),
                partition,
                offset,
                max_bytes: 0,
            }],
            ..FetchRequest::default()
        };
        let data = fetch
            .fetch(request)
            .await
            .expect("fetch")
            .into_inner()
            .partitions
            .remove(0);
        assert!(data.error.is_none(), "{:?}", data.error);
        if offset >= data.high_watermark {
            return headers;
        }
        for batch in BatchIter::new(data.batches) {
            let batch = batch.expect("a whole batch");
            batch.verify_crc().expect("the CRC covers the stamped producer fields");
            let header = *batch.header();
            offset = offset.max(header.next_offset());
            if !header.is_control() && header.next_offset() <= data.high_watermark {
                headers.push(header);
            }
        }
    }
}

/// Checks that a partition's batches carry one producer id, epoch 0 and sequences that run
/// on from 0 without a gap; returns the records they hold.
fn assert_sequenced(headers: &[BatchHeader]) -> u64 {
    assert!(headers.len() > 1, "several batches expected, got {}", headers.len());
    let id = headers[0].producer.producer_id;
    assert!(id >= 0, "an idempotent batch carries an issued producer id, not {id}");
    let mut next = 0i64;
    for h in headers {
        assert_eq!(
            h.producer.producer_id, id,
            "one producer id per partition without a reset"
        );
        assert_eq!(h.producer.producer_epoch, 0);
        assert_eq!(
            i64::from(h.producer.base_sequence),
            next,
            "sequences run on without a gap"
        );
        next += i64::from(h.record_count);
    }
    next as u64
}

async fn send_all(producer: &conveyor_client::Producer, topic: &str, partition: i32, count: u64) {
    let mut deliveries = Vec::new();
    for i in 0..count {
        let record = ProducerRecord::new(topic, format!("{partition}-{i:0>40}")).partition(partition);
        deliveries.push(producer.send(record).await.expect("send"));
    }
    producer.flush().await.expect("flush");
    tokio::time::timeout(DELIVERY_DEADLINE, async {
        for d in deliveries {
            d.await.expect("acknowledged");
        }
    })
    .await
    .expect("every record acknowledged in time");
}

#[test]
fn given_the_default_producer_when_it_sends_to_two_partitions_should_store_each_with_its_producer_id_and_consecutive_sequences()
 {
    let broker = BrokerProcess::start();
    runtime().block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        client.admin().create_topic("idem", 2, &[]).await.expect("create");
        let first = client.init_producer().await.expect("a producer id");
        let second = client.init_producer().await.expect("another producer id");
        assert!(first.producer_id >= 0 && first.producer_epoch == 0, "{first:?}");
        assert_ne!(first.producer_id, second.producer_id, "no id is issued twice");

        let config = ProducerConfig::default().batch_size(BATCH_SIZE);
        assert!(config.idempotence, "idempotence is the default");
        let producer = client.producer(config).expect("producer");
        send_all(&producer, "idem", 0, 3_000).await;
        send_all(&producer, "idem", 1, 700).await;
        assert_eq!(assert_sequenced(&stored_headers(broker.addr(), "idem", 0).await), 3_000);
        assert_eq!(assert_sequenced(&stored_headers(broker.addr(), "idem", 1).await), 700);
        assert_eq!(producer.unvouched_records(), 0);
    });
}

#[test]
fn given_idempotence_off_when_records_are_sent_should_store_them_without_producer_identity() {
    let broker = BrokerProcess::start();
    runtime().block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        client.admin().create_topic("plain", 1, &[]).await.expect("create");
        let producer = client
            .producer(ProducerConfig::default().batch_size(BATCH_SIZE).idempotence(false))
            .expect("producer");
        send_all(&producer, "plain", 0, 1_000).await;
        let headers = stored_headers(broker.addr(), "plain", 0).await;
        assert_eq!(headers.iter().map(|h| u64::from(h.record_count)).sum::<u64>(), 1_000);
        for h in &headers {
            assert_eq!(
                (
                    h.producer.producer_id,
                    h.producer.producer_epoch,
                    h.producer.base_sequence
                ),
                (-1, -1, -1)
            );
        }
    });
}

#[test]
fn given_the_cli_when_it_produces_should_be_idempotent_unless_told_not_to_be() {
    let broker = BrokerProcess::start();
    stdout(&cli(
        broker.addr(),
        &["topic", "create", "lines", "--partitions", "2"],
        "",
    ));
    let lines: String = (0..50).map(|i| format!("line {i}\n")).collect();
    stdout(&cli(broker.addr(), &["produce", "lines", "--partition", "0"], &lines));
    stdout(&cli(
        broker.addr(),
        &["produce", "lines", "--partition", "1", "--no-idempotence"],
        &lines,
    ));
    runtime().block_on(async {
        let on = stored_headers(broker.addr(), "lines", 0).await;
        assert!(!on.is_empty());
        assert!(on.iter().all(|h| h.producer.producer_id >= 0), "{on:?}");
        assert_eq!(on[0].producer.base_sequence, 0);
        let off = stored_headers(broker.addr(), "lines", 1).await;
        assert_eq!(off.iter().map(|h| h.record_count).sum::<u32>(), 50);
        assert!(off.iter().all(|h| h.producer.producer_id == -1), "{off:?}");
    });
}
