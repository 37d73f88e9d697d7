//! Bad input gets a clear, typed error and changes nothing.

use bytes::Bytes;
use conveyor_client::proto::fetch_client::FetchClient;
use conveyor_client::proto::produce_client::ProduceClient;
use conveyor_client::proto::{ErrorCode, ErrorDetail, FetchRequest, PartitionFetch, PartitionProduce, ProduceRequest};
use conveyor_client::{Client, ClientError, ProducerConfig, ProducerRecord};
use conveyor_storage::batch::{BatchBuilder, Compression, Record};
use conveyor_tests::{BrokerProcess, cli, runtime};
use prost_detail::decode_detail;

mod prost_detail {
    use super::*;
    /// The ErrorDetail carried in a status, decoded through the client's error type.
    pub fn decode_detail(status: tonic::Status) -> (tonic::Code, ErrorDetail) {
        let code = status.code();
        match ClientError::from(status) {
            ClientError::Broker { detail: Some(d), .. } => (code, *d),
            other => panic!("expected a broker error with detail, got {other}"),
        }
    }
}

fn broker_code(e: &ClientError) -> tonic::Code {
    match e {
        ClientError::Broker { code, .. } => *code,
        other => panic!("expected a broker error, got {other}"),
    }
}

const NO_CONFIG: &[(&str, &str)] = &[];

#[test]
fn given_bad_admin_requests_should_answer_with_typed_errors_naming_the_problem() {
    let broker = BrokerProcess::start();
    runtime().block_on(async {
        let admin = Client::connect(broker.addr()).await.expect("connect").admin();
        let e = admin.describe_topic("missing").await.expect_err("unknown topic");
        assert_eq!(broker_code(&e), tonic::Code::NotFound);
        assert!(e.to_string().contains("missing"), "{e}");
        assert_eq!(e.code(), Some(ErrorCode::UnknownTopic));

        type Case<'a> = (&'a str, i32, &'a [(&'a str, &'a str)], &'a str);
        let cases: [Case<'_>; 5] = [
            ("bad name", 1, &[], "bad name"),
            ("ok", 0, &[], "partition count 0"),
            ("ok", -3, &[], "partition count -3"),
            ("ok", 1, &[("no.such.key", "1")], "no.such.key"),
            ("ok", 1, &[("retention.ms", "soon")], "retention.ms=soon"),
        ];
        for (name, partitions, configs, needle) in cases {
            let e = admin.create_topic(name, partitions, configs).await.expect_err(needle);
            assert_eq!(broker_code(&e), tonic::Code::InvalidArgument, "{e}");
            assert!(e.to_string().contains(needle), "{e} should mention {needle}");
        }
        assert!(
            admin.list_topics().await.expect("list").is_empty(),
            "nothing was created"
        );

        admin.create_topic("exists", 1, NO_CONFIG).await.expect("create");
        let e = admin
            .transfer_leader("exists", 7, 1)
            .await
            .expect_err("no such partition");
        assert_eq!(broker_code(&e), tonic::Code::NotFound);
        assert!(e.to_string().contains("no partition 7"), "{e}");
        let e = admin.create_topic("exists", 1, NO_CONFIG).await.expect_err("duplicate");
        assert_eq!(broker_code(&e), tonic::Code::AlreadyExists);
        assert!(e.to_string().contains("exists"));

        // Membership: nothing changes on a bad request.
        let e = admin.add_broker(2, "no-port").await.expect_err("bad address");
        assert_eq!(broker_code(&e), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("HOST:PORT"), "{e}");
        let e = admin.add_broker(0, "127.0.0.1:1").await.expect_err("id 0");
        assert_eq!(broker_code(&e), tonic::Code::InvalidArgument);
        let e = admin.remove_broker(7).await.expect_err("unknown broker");
        assert_eq!(broker_code(&e), tonic::Code::NotFound);
        assert!(e.to_string().contains("broker 7"), "{e}");
        let e = admin.remove_broker(1).await.expect_err("the only broker");
        assert_eq!(broker_code(&e), tonic::Code::FailedPrecondition);
        assert!(e.to_string().contains("cannot remove broker 1"), "{e}");
        let cluster = admin.describe_cluster().await.expect("cluster");
        assert_eq!(cluster.brokers.len(), 1, "{cluster:?}");
        assert_eq!(cluster.controller, 1);

        // Reassignment: refused before anything moves.
        type Reassign<'a> = (i32, &'a [i32], tonic::Code, &'a str);
        let cases: [Reassign<'_>; 5] = [
            (0, &[1, 1], tonic::Code::InvalidArgument, "replication factor 1"),
            (
                0,
                &[7],
                tonic::Code::InvalidArgument,
                "broker 7 cannot take a new replica",
            ),
            (0, &[0], tonic::Code::InvalidArgument, "broker ids are positive"),
            (0, &[], tonic::Code::InvalidArgument, "replication factor 1"),
            (3, &[1], tonic::Code::NotFound, "no partition 3"),
        ];
        for (partition, replicas, code, needle) in cases {
            let e = admin
                .reassign_partition("exists", partition, replicas)
                .await
                .expect_err(needle);
            assert_eq!(broker_code(&e), code, "{e}");
            assert!(e.to_string().contains(needle), "{e} should mention {needle}");
        }
        let e = admin
            .reassign_partition("missing", 0, &[1])
            .await
            .expect_err("unknown topic");
        assert_eq!(broker_code(&e), tonic::Code::NotFound);
        // Already there: nothing to move, and nothing to rebalance on one broker.
        let moves = admin.reassign_partition("exists", 0, &[1]).await.expect("no-op");
        assert!(moves.is_empty(), "{moves:?}");
        assert!(admin.rebalance(false).await.expect("rebalance").is_empty());
        let d = admin.describe_topic("exists").await.expect("describe");
        assert_eq!(d.partitions[0].replicas, vec![1]);
    });
}

#[test]
fn given_a_corrupt_or_oversized_batch_should_refuse_it_and_append_nothing() {
    let broker = BrokerProcess::start();
    runtime().block_on(async {
        let client = Client::connect(broker.addr()).await.expect("connect");
        client
            .admin()
            .create_topic("strict", 1, &[("max.message.bytes", "2048")])
            .await
            .expect("create");
        let mut builder = BatchBuilder::new(Compression::None);
        builder.push(&Record {
            timestamp: 1,
            value: Some(Bytes::from("payload")),
            ..Record::default()
        });
        let mut corrupt = builder.build().expect("batch").to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        let mut produce = ProduceClient::connect(format!("http://{}", broker.addr()))
            .await
            .expect("grpc");
        let request = ProduceRequest {
            request_id: 1,
            acks: 0,
            partitions: vec![PartitionProduce {
                topic: "strict".into(),
                partition: 0,
                batches: vec![Bytes::from(corrupt)],
                ..PartitionProduce::default()
            }],
        };
        let (code, detail) = decode_detail(produce.produce(request).await.expect_err("corrupt batch"));
        assert_eq!(code, tonic::Code::InvalidArgument);
        assert_eq!(detail.code, ErrorCode::CorruptBatch as i32);
        assert!(detail.message.contains("CRC"), "{}", detail.message);
        assert_eq!((detail.topic.as_str(), detail.partition), ("strict", 0));

        let producer = client.producer(ProducerConfig::default()).expect("producer config");
        let big = producer
            .send(ProducerRecord::new("strict", vec![b'x'; 4096]))
            .await
            .expect("queued");
        let e = big.await.expect_err("over max.message.bytes");
        assert_eq!(e.code(), Some(ErrorCode::RecordTooLarge));
        assert!(e.to_string().contains("max.message.bytes"), "{e}");

        let out = cli(broker.addr(), &["consume", "strict", "--from-beginning"], "");
        assert!(out.status.success());
        assert!(
            out.stdout.is_empty(),
            "nothing was appended: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    });
}

#[test]
fn given_an_offset_beyond_the_log_should_answer_out_of_range_with_the_bounds() {
    let broker = BrokerProcess::start();
    let out = cli(broker.addr(), &["topic", "create", "short"], "");
    assert!(out.status.success());
    let out = cli(broker.addr(), &["produce", "short"], "a\nb\n");
    assert!(out.status.success());
    runtime().block_on(async {
        let mut fetch = FetchClient::connect(format!("http://{}", broker.addr()))
            .await
            .expect("grpc");
        let request = FetchRequest {
            partitions: vec![PartitionFetch {
                topic: "short".into(),
                partition: 0,
                offset: 100,
                max_bytes: 0,
            }],
            ..FetchRequest::default()
        };
        let (code, detail) = decode_detail(fetch.fetch(request).await.expect_err("out of range"));
        assert_eq!(code, tonic::Code::OutOfRange);
        assert_eq!(detail.code, ErrorCode::OffsetOutOfRange as i32);
        let admin = conveyor_client::Client::connect(broker.addr())
            .await
            .expect("connect")
            .admin();
        let p = &admin.describe_topic("short").await.expect("describe").partitions[0];
        assert_eq!(
            (detail.log_start_offset, detail.log_end_offset),
            (p.log_start_offset, p.log_end_offset)
        );
        assert!(p.log_end_offset >= 2 && p.log_end_offset < 100);
    });
    let out = cli(
        broker.addr(),
        &["consume", "short", "--partition", "0", "--offset", "100"],
        "",
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("offset 100") && stderr.contains("short"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
}

#[test]
fn given_no_broker_the_cli_should_say_it_cannot_reach_the_address() {
    let out = cli("127.0.0.1:1", &["topic", "list"], "");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach") && stderr.contains("127.0.0.1:1"),
        "{stderr}"
    );
}

#[test]
fn given_a_bad_part_in_a_multi_partition_request_only_that_part_should_fail() {
    let broker = BrokerProcess::start();
    assert!(
        cli(broker.addr(), &["topic", "create", "mixed", "--partitions", "2"], "")
            .status
            .success()
    );
    runtime().block_on(async {
        let mut good = BatchBuilder::new(Compression::None);
        good.push(&Record {
            timestamp: 1,
            value: Some(Bytes::from("fine")),
            ..Record::default()
        });
        let good = good.build().expect("batch");
        let control = BatchBuilder::new(Compression::None)
            .control(true)
            .build_at(1)
            .expect("control batch");
        let mut produce = ProduceClient::connect(format!("http://{}", broker.addr()))
            .await
            .expect("grpc");
        let part = |partition: i32, batch: &Bytes| PartitionProduce {
            topic: "mixed".into(),
            partition,
            batches: vec![batch.clone()],
            ..PartitionProduce::default()
        };
        let response = produce
            .produce(ProduceRequest {
                request_id: 9,
                acks: 0,
                partitions: vec![part(0, &good), part(1, &control)],
            })
            .await
            .expect("a request with one bad part is answered per partition")
            .into_inner();
        assert!(response.partitions[0].error.is_none(), "the good part is appended");
        let bad = response.partitions[1]
            .error
            .as_ref()
            .expect("the control batch is refused");
        assert_eq!(bad.code, ErrorCode::InvalidRequest as i32);
        assert!(bad.message.contains("control batches"), "{}", bad.message);

        let (code, _) = decode_detail(
            produce
                .produce(ProduceRequest {
                    request_id: 10,
                    acks: 0,
                    partitions: vec![part(1, &control)],
                })
                .await
                .expect_err("alone, the bad part is the request's status"),
        );
        assert_eq!(code, tonic::Code::InvalidArgument);
        // The partition that refused the control batch still takes data.
        let ok = produce
            .produce(ProduceRequest {
                request_id: 11,
                acks: 0,
                partitions: vec![part(1, &good)],
            })
            .await
            .expect("still writable")
            .into_inner();
        assert!(ok.partitions[0].error.is_none());
    });
    let out = cli(broker.addr(), &["consume", "mixed", "--from-beginning"], "");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        2,
        "both good batches, nothing else"
    );
}
