//! The sender against an in-process fake broker that answers nothing until told to: what an
//! idempotent producer puts on the wire, and how many batches of a partition it keeps in
//! flight. (Real brokers are in `tests/`; this fake lets the client be checked on its own.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_proto::v1::produce_server::{Produce, ProduceServer};
use conveyor_proto::v1::{
    InitProducerRequest, InitProducerResponse, PartitionProduce, PartitionProduceResult, ProduceRequest,
    ProduceResponse,
};
use conveyor_storage::batch::{BatchHeader, ProducerInfo};
use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

use crate::{Client, ProducerConfig, ProducerRecord};

const DEADLINE: Duration = Duration::from_secs(10);
/// How long the producer is given to send more than it may before the test concludes it won't.
const QUIET: Duration = Duration::from_millis(300);

#[derive(Default)]
struct Fake {
    /// Every part received, in order.
    parts: Mutex<Vec<PartitionProduce>>,
    received: Notify,
    /// Answers are held until this is set.
    release: tokio::sync::watch::Sender<bool>,
}

struct Service(Arc<Fake>);

#[tonic::async_trait]
impl Produce for Service {
    async fn produce(
        &self,
        _: tonic::Request<ProduceRequest>,
    ) -> Result<tonic::Response<ProduceResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("the fake answers streams only"))
    }

    type ProduceStreamStream = ReceiverStream<Result<ProduceResponse, tonic::Status>>;

    async fn produce_stream(
        &self,
        request: tonic::Request<tonic::Streaming<ProduceRequest>>,
    ) -> Result<tonic::Response<Self::ProduceStreamStream>, tonic::Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let fake = Arc::clone(&self.0);
        tokio::spawn(async move {
            let mut offset = 0u64;
            while let Some(Ok(request)) = incoming.next().await {
                fake.parts
                    .lock()
                    .expect("lock")
                    .extend(request.partitions.iter().cloned());
                fake.received.notify_waiters();
                let mut release = fake.release.subscribe();
                if release.wait_for(|r| *r).await.is_err() {
                    return;
                }
                let partitions = request
                    .partitions
                    .iter()
                    .map(|p| {
                        let records = BatchHeader::parse(&p.batches[0]).map_or(1, |h| u64::from(h.record_count));
                        offset += records;
                        PartitionProduceResult {
                            topic: p.topic.clone(),
                            partition: p.partition,
                            base_offset: offset - records,
                            last_offset: offset - 1,
                            error: None,
                        }
                    })
                    .collect();
                let answer = ProduceResponse {
                    request_id: request.request_id,
                    partitions,
                };
                if tx.send(Ok(answer)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn init_producer(
        &self,
        _: tonic::Request<InitProducerRequest>,
    ) -> Result<tonic::Response<InitProducerResponse>, tonic::Status> {
        Ok(tonic::Response::new(InitProducerResponse {
            producer_id: 77,
            producer_epoch: 0,
        }))
    }
}

async fn start_fake() -> (Arc<Fake>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let fake = Arc::new(Fake::default());
    let service = ProduceServer::new(Service(Arc::clone(&fake)));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (fake, address)
}

impl Fake {
    fn count(&self) -> usize {
        self.parts.lock().expect("lock").len()
    }

    async fn wait_for_parts(&self, n: usize) {
        tokio::time::timeout(DEADLINE, async {
            loop {
                let received = self.received.notified();
                if self.count() >= n {
                    return;
                }
                received.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} parts expected, {} arrived", self.count()));
    }
}

#[tokio::test]
async fn an_idempotent_producer_keeps_five_batches_of_a_partition_in_flight_and_sequences_them_in_order() {
    let (fake, address) = start_fake().await;
    let client = Client::connect(&address).await.expect("connect");
    client.cluster().assume_leader("t", 1, &address);
    let producer = client
        .producer(ProducerConfig::default().linger(Duration::ZERO))
        .expect("producer");
    let mut deliveries = Vec::new();
    for i in 0..12 {
        let record = ProducerRecord::new("t", format!("record {i}")).partition(0);
        deliveries.push(producer.send(record).await.expect("send"));
    }
    fake.wait_for_parts(5).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        fake.count(),
        5,
        "no sixth batch of the partition while five are unanswered"
    );
    fake.release.send_replace(true);
    for d in deliveries {
        tokio::time::timeout(DEADLINE, d)
            .await
            .expect("in time")
            .expect("acknowledged");
    }
    let parts = fake.parts.lock().expect("lock").clone();
    assert_eq!(parts.len(), 12);
    for (i, part) in parts.iter().enumerate() {
        assert_eq!((part.sequence, part.restart), (0, false), "no part numbering");
        let header = BatchHeader::parse(&part.batches[0]).expect("header");
        assert_eq!(
            header.producer,
            ProducerInfo {
                producer_id: 77,
                producer_epoch: 0,
                base_sequence: i as i32,
            }
        );
        assert_eq!(header.crc, verified_crc(&part.batches[0]));
    }
    assert_eq!(producer.unvouched_records(), 0);
}

fn verified_crc(batch: &[u8]) -> u32 {
    let parsed = conveyor_storage::batch::RecordBatch::parse(bytes::Bytes::copy_from_slice(batch)).expect("parse");
    parsed.verify_crc().expect("a valid CRC");
    parsed.header().crc
}
