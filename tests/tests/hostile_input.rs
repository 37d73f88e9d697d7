//! Hostile input from clients (decompression bombs, oversized names, integers at their limits)
//! and bytes damaged at rest: the broker refuses or reports them with its own clear error, is
//! never altered by them, and keeps serving.

use std::time::Duration;

use bytes::Bytes;
use conveyor_client::proto::admin_client::AdminClient;
use conveyor_client::proto::fetch_client::FetchClient;
use conveyor_client::proto::produce_client::ProduceClient;
use conveyor_client::proto::{
    CreateTopicRequest, DescribeTopicRequest, ErrorCode, FetchRequest, PartitionFetch, PartitionProduce,
    ProduceRequest, Record as PbRecord,
};
use conveyor_client::{Client, ClientError, ConsumerConfig, StartAt};
use conveyor_storage::batch::{BatchBuilder, Compression, Record};
use conveyor_tests::{BrokerProcess, POLL_INTERVAL, runtime, wait_for};
use futures::StreamExt;

/// Largest gRPC message the tests send or accept (the broker's own default limit).
const GRPC_LIMIT: usize = 64 << 20;
/// How long a consumer may take to report damage it was handed.
const CONSUME_DEADLINE: Duration = Duration::from_secs(30);
/// How long a restarted broker may take to lead its partitions again.
const RESTART_DEADLINE: Duration = Duration::from_secs(30);
/// A record that inflates past the broker's default limit on decompressed batch size
/// (32 MiB) but not past the old one (64 x max.message.bytes).
const BOMB_BYTES: usize = 40 << 20;

fn url(broker: &BrokerProcess) -> String {
    format!("http://{}", broker.addr())
}

async fn produce_client(broker: &BrokerProcess) -> ProduceClient<tonic::transport::Channel> {
    ProduceClient::connect(url(broker))
        .await
        .expect("grpc")
        .max_encoding_message_size(GRPC_LIMIT)
        .max_decoding_message_size(GRPC_LIMIT)
}

async fn fetch_client(broker: &BrokerProcess) -> FetchClient<tonic::transport::Channel> {
    FetchClient::connect(url(broker))
        .await
        .expect("grpc")
        .max_decoding_message_size(GRPC_LIMIT)
}

fn one_part(topic: &str, batches: Vec<Bytes>, records: Vec<PbRecord>) -> ProduceRequest {
    ProduceRequest {
        request_id: 1,
        acks: 0,
        partitions: vec![PartitionProduce {
            topic: topic.into(),
            partition: 0,
            batches,
            records,
            ..PartitionProduce::default()
        }],
    }
}

fn value_record(value: &str) -> PbRecord {
    PbRecord {
        value: Some(Bytes::from(value.to_string())),
        ..PbRecord::default()
    }
}

/// The ErrorDetail of a failed call, with its status code.
fn detail_of(status: tonic::Status) -> (tonic::Code, String, i32) {
    let code = status.code();
    match ClientError::from(status) {
        ClientError::Broker {
            detail: Some(d),
            message,
            ..
        } => (code, message, d.code),
        other => panic!("expected the broker's own error with its detail, got {other:?}"),
    }
}

/// Every value stored in `topic` partition 0 up to its high watermark, by a decoding fetch.
async fn stored_values(broker: &BrokerProcess, topic: &str) -> Vec<Bytes> {
    let mut fetch = fetch_client(broker).await;
    let answer = fetch
        .fetch(FetchRequest {
            partitions: vec![PartitionFetch {
                topic: topic.into(),
                partition: 0,
                offset: 0,
                max_bytes: 0,
            }],
            decode_records: true,
            ..FetchRequest::default()
        })
        .await
        .expect("fetch")
        .into_inner();
    answer.partitions[0]
        .records
        .iter()
        .map(|r| r.value.clone().unwrap_or_default())
        .collect()
}

async fn high_watermark(client: &Client, topic: &str) -> u64 {
    client.admin().describe_topic(topic).await.expect("describe").partitions[0].high_watermark
}

#[test]
fn given_a_small_compressed_batch_that_inflates_past_the_limit_when_produced_should_refuse_it_and_append_nothing() {
    let broker = BrokerProcess::start();
    runtime().block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        client.admin().create_topic("bomb", 1, &[]).await.expect("create");
        let mut builder = BatchBuilder::new(Compression::Zstd);
        builder.push(&Record {
            timestamp: 1,
            value: Some(Bytes::from(vec![0u8; BOMB_BYTES])),
            ..Record::default()
        });
        let bomb = builder.build().expect("batch");
        assert!(bomb.len() < 64 << 10, "zeros compress to a few KiB, got {}", bomb.len());

        let mut produce = produce_client(&broker).await;
        let status = produce
            .produce(one_part("bomb", vec![bomb], Vec::new()))
            .await
            .expect_err("a batch inflating past the limit is refused");
        let (code, message, error) = detail_of(status);
        assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
        assert_eq!(error, ErrorCode::RecordTooLarge as i32, "{message}");
        assert!(
            message.contains("decompress") && message.contains("max_uncompressed_batch_bytes"),
            "the message names the limit: {message}"
        );
        // The broker still serves the topic, and holds only the record that followed.
        let ok = produce
            .produce(one_part("bomb", Vec::new(), vec![value_record("fine")]))
            .await
            .expect("a normal record is appended");
        assert!(ok.into_inner().partitions[0].error.is_none());
        assert_eq!(stored_values(&broker, "bomb").await, vec![Bytes::from("fine")]);
    });
}

#[test]
fn given_a_ten_thousand_character_topic_name_every_api_should_answer_invalid_argument_with_its_own_message() {
    let broker = BrokerProcess::start();
    let long = "t".repeat(10_000);
    runtime().block_on(async {
        let mut produce = produce_client(&broker).await;
        let mut fetch = fetch_client(&broker).await;
        let mut admin = AdminClient::connect(url(&broker)).await.expect("grpc");
        let produced = produce
            .produce(one_part(&long, Vec::new(), vec![value_record("x")]))
            .await
            .expect_err("produce");
        let fetched = fetch
            .fetch(FetchRequest {
                partitions: vec![PartitionFetch {
                    topic: long.clone(),
                    partition: 0,
                    offset: 0,
                    max_bytes: 0,
                }],
                ..FetchRequest::default()
            })
            .await
            .expect_err("fetch");
        let described = admin
            .describe_topic(DescribeTopicRequest { name: long.clone() })
            .await
            .expect_err("describe");
        let created = admin
            .create_topic(CreateTopicRequest {
                name: long.clone(),
                partitions: 1,
                ..CreateTopicRequest::default()
            })
            .await
            .expect_err("create");
        for (call, status) in [
            ("produce", produced),
            ("fetch", fetched),
            ("describe", described),
            ("create", created),
        ] {
            let (code, message, error) = detail_of(status);
            assert_eq!(code, tonic::Code::InvalidArgument, "{call}: {message}");
            assert_eq!(error, ErrorCode::InvalidTopicName as i32, "{call}: {message}");
            assert!(message.contains("longer than 249"), "{call}: {message}");
            assert!(message.len() < 1024, "{call}: the echoed name is cut short");
        }
    });
}

#[test]
fn given_a_produce_stream_part_numbered_u64_max_should_refuse_it_and_keep_serving() {
    let broker = BrokerProcess::start();
    runtime().block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        client.admin().create_topic("numbered", 1, &[]).await.expect("create");
        let mut produce = produce_client(&broker).await;
        let part = |sequence: u64, value: &str| ProduceRequest {
            request_id: sequence,
            acks: 0,
            partitions: vec![PartitionProduce {
                topic: "numbered".into(),
                partition: 0,
                batches: Vec::new(),
                records: vec![value_record(value)],
                sequence,
                restart: true,
                ..Default::default()
            }],
        };
        let requests = futures::stream::iter(vec![part(u64::MAX, "last"), part(1, "first")]);
        let mut answers = produce
            .produce_stream(requests)
            .await
            .expect("stream opened")
            .into_inner();
        let refused = answers.next().await.expect("an answer").expect("the stream goes on");
        let error = refused.partitions[0].error.as_ref().expect("u64::MAX is refused");
        assert_eq!(error.code, ErrorCode::InvalidRequest as i32, "{}", error.message);
        assert!(error.message.contains("sequence"), "{}", error.message);
        let accepted = answers.next().await.expect("an answer").expect("the stream goes on");
        assert!(
            accepted.partitions[0].error.is_none(),
            "the partition keeps serving: {:?}",
            accepted.partitions[0].error
        );
        assert_eq!(
            stored_values(&broker, "numbered").await,
            vec![Bytes::from("first")],
            "only the well-numbered part"
        );
    });
}

/// Every `.log` segment file of `topic` partition 0, by base offset.
fn segment_files(data_dir: &std::path::Path, topic: &str) -> Vec<std::path::PathBuf> {
    let dir = data_dir.join("topics").join(topic).join("0");
    let mut logs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    // Names are zero-padded base offsets, so name order is offset order.
    logs.sort();
    logs
}

/// Flips bits of the first occurrence of `needle` in `file`, as damage at rest would.
fn damage(file: &std::path::Path, needle: &[u8]) {
    let mut bytes = std::fs::read(file).expect("read segment");
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{} holds the record", file.display()));
    for b in &mut bytes[at..at + needle.len()] {
        *b ^= 0x20;
    }
    std::fs::write(file, bytes).expect("write segment");
}

/// Polls until the restarted broker leads `topic` partition 0 with `records` committed.
async fn wait_until_led(client: &Client, topic: &str, records: u64) {
    let started = std::time::Instant::now();
    loop {
        if let Ok(d) = client.admin().describe_topic(topic).await
            && d.partitions[0].leader != 0
            && d.partitions[0].high_watermark >= records
        {
            return;
        }
        assert!(
            started.elapsed() < RESTART_DEADLINE,
            "{topic} has no leader after the restart"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A broker config with the background scrub of sealed segments off.
const NO_SCRUB: &str = "[log]\nscrub_bytes_per_second = 0\n";

fn stored_value(i: usize) -> String {
    format!("acknowledged-value-{i:03}-{}", "p".repeat(160))
}

#[test]
fn given_a_flipped_byte_in_a_sealed_segment_neither_the_client_nor_a_decoding_fetch_should_get_the_altered_value() {
    const RECORDS: usize = 16;
    // What this tests is the fetch path (the broker's CRC check when it decodes, the client's
    // on raw batches); the background scrub would find the damage first and change what the
    // reads see, so it is off here (its own behaviour is tested in scrub_at_rest).
    let mut broker = BrokerProcess::start_with_config(NO_SCRUB);
    runtime().block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        let small_segments = [("segment.bytes", "1024"), ("max.message.bytes", "1024")];
        client
            .admin()
            .create_topic("damaged", 1, &small_segments)
            .await
            .expect("create");
        let mut produce = produce_client(&broker).await;
        for i in 0..RECORDS {
            let answer = produce
                .produce(one_part("damaged", Vec::new(), vec![value_record(&stored_value(i))]))
                .await
                .expect("acknowledged");
            assert!(answer.into_inner().partitions[0].error.is_none());
        }
    });
    broker.kill();
    let segments = segment_files(broker.data_dir(), "damaged");
    assert!(segments.len() > 1, "the first segment is sealed: {segments:?}");
    let needle = stored_value(0);
    damage(&segments[0], &needle.as_bytes()[..24]);
    broker.restart();
    // The scrub task logs this as it starts, which may come after the port opens.
    wait_for(
        "the log to say the scrub is off, so the reads below meet the damage first",
        Duration::from_secs(10),
        || broker.log().contains("background scrub disabled").then_some(()),
    );

    runtime().block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        wait_until_led(&client, "damaged", RECORDS as u64).await;
        // A decoding fetch first: the broker must not serve the altered value either.
        let mut fetch = fetch_client(&broker).await;
        let answer = fetch
            .fetch(FetchRequest {
                partitions: vec![PartitionFetch {
                    topic: "damaged".into(),
                    partition: 0,
                    offset: 0,
                    max_bytes: 0,
                }],
                decode_records: true,
                ..FetchRequest::default()
            })
            .await;
        let decoded = answer.map(|r| {
            let records = &r.get_ref().partitions[0].records;
            records.iter().map(|r| r.value.clone()).collect::<Vec<_>>()
        });

        let config = ConsumerConfig::default().max_wait(Duration::from_millis(100));
        let mut consumer = client.consumer(config);
        consumer.assign("damaged", 0, StartAt::Earliest);
        let mut stream = consumer.stream();
        let mut altered = Vec::new();
        let stored: Vec<Bytes> = (0..RECORDS).map(|i| Bytes::from(stored_value(i))).collect();
        let ends =
            std::collections::HashMap::from([(("damaged".to_string(), 0), high_watermark(&client, "damaged").await)]);
        let consumed = tokio::time::timeout(CONSUME_DEADLINE, async {
            loop {
                match stream.next_until(&ends).await {
                    Some(Ok(r)) if !r.value.as_ref().is_some_and(|v| stored.contains(v)) => altered.push(r.value),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                }
            }
        })
        .await
        .expect("the consumer reads or reports the damage in time");
        let status = decoded.expect_err("a decoding fetch does not serve the damaged batch");
        let (code, message, _) = detail_of(status);
        assert_eq!(code, tonic::Code::DataLoss, "{message}");
        assert!(message.contains("CRC") && message.contains("damaged"), "{message}");
        assert!(
            altered.is_empty(),
            "the consumer was handed altered values: {altered:?}"
        );
        let error = consumed.expect_err("the consumer reports the damage");
        assert!(
            matches!(error, ClientError::CorruptBatch { .. }),
            "a typed CRC error: {error:?}"
        );
        assert!(error.to_string().contains("CRC"), "{error}");
        assert!(error.is_retriable(), "another replica may serve it: {error}");
    });
}
