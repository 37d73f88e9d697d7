//! Raw idempotent produce over gRPC, for tests that send exact batches: a producer id from
//! `InitProducer`, batches with chosen producer fields, and answers as offsets or error codes.

use std::time::Duration;

use bytes::Bytes;
use conveyor_client::ClientError;
use conveyor_client::proto::produce_client::ProduceClient;
use conveyor_client::proto::{
    Acks, ErrorCode, InitProducerRequest, PartitionProduce, PartitionProduceResult, ProduceRequest,
};
use conveyor_storage::batch::{BatchBuilder, Compression, ProducerInfo, Record};
use tonic::Code;
use tonic::transport::Channel;

pub type Produce = ProduceClient<Channel>;

pub async fn connect(addr: &str) -> Produce {
    ProduceClient::connect(format!("http://{addr}")).await.expect("grpc")
}

/// How long one `InitProducer` call may keep retrying a retriable refusal (a controller
/// being elected, a broker still starting).
const INIT_PRODUCER_DEADLINE: Duration = Duration::from_secs(60);
/// Waits between retries of a refused `InitProducer`.
const INIT_PRODUCER_RETRY_AFTER: Duration = Duration::from_millis(50);

/// A new producer id, retrying retriable refusals until [`INIT_PRODUCER_DEADLINE`]; panics on
/// anything else, or if the id does not start at epoch 0.
pub async fn new_producer(produce: &mut Produce) -> i64 {
    let until = tokio::time::Instant::now() + INIT_PRODUCER_DEADLINE;
    loop {
        match produce.init_producer(InitProducerRequest {}).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                assert_eq!(answer.producer_epoch, 0, "a new producer starts at epoch 0");
                return answer.producer_id;
            }
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
                ) && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(INIT_PRODUCER_RETRY_AFTER).await;
            }
            Err(status) => panic!("InitProducer: {status:?}"),
        }
    }
}

pub fn batch(pid: i64, epoch: i16, seq: i32, values: &[&str]) -> Bytes {
    let mut builder = BatchBuilder::new(Compression::None).producer(ProducerInfo {
        producer_id: pid,
        producer_epoch: epoch,
        base_sequence: seq,
    });
    for v in values {
        builder.push(&Record {
            timestamp: conveyor_storage::unix_millis(),
            value: Some(Bytes::from(v.to_string())),
            ..Record::default()
        });
    }
    builder.build().expect("batch")
}

pub fn request(topic: &str, acks: Acks, batch: Bytes) -> ProduceRequest {
    ProduceRequest {
        request_id: 1,
        acks: acks as i32,
        partitions: vec![PartitionProduce {
            topic: topic.into(),
            partition: 0,
            batches: vec![batch],
            ..PartitionProduce::default()
        }],
    }
}

/// The offsets a produce got, or its error code and whether it is retriable.
pub async fn send(produce: &mut Produce, req: ProduceRequest) -> Result<(u64, u64), (ErrorCode, bool, String)> {
    let refused = |e: ClientError| match e {
        ClientError::Broker { detail: Some(d), .. } => (d.code(), d.retriable, d.message),
        other => panic!("expected a broker error with detail, got {other}"),
    };
    let answer = produce.produce(req).await.map_err(|s| refused(ClientError::from(s)))?;
    let part: PartitionProduceResult = answer.into_inner().partitions.remove(0);
    match part.error {
        Some(d) => Err((d.code(), d.retriable, d.message)),
        None => Ok((part.base_offset, part.last_offset)),
    }
}

/// Sends `req` until it gets an answer other than a retriable error (the partition electing
/// its leader after a restart) or an unknown topic (a restarted broker that has not replayed
/// its metadata yet), for at most `deadline`.
pub async fn send_until_answered(
    produce: &mut Produce,
    req: ProduceRequest,
    deadline: Duration,
) -> Result<(u64, u64), (ErrorCode, bool, String)> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match send(produce, req.clone()).await {
            Err((code, retriable, message))
                if (retriable && code != ErrorCode::OutOfOrderSequence) || code == ErrorCode::UnknownTopic =>
            {
                assert!(
                    tokio::time::Instant::now() < until,
                    "no answer within {deadline:?}: {message}"
                );
                tokio::time::sleep(crate::POLL_INTERVAL).await;
            }
            other => return other,
        }
    }
}
