//! The sender against an in-process fake broker that answers nothing until told to, then
//! answers each part as its script says (success, a refusal, a broken link): what an
//! idempotent producer puts on the wire, how many batches of a partition it keeps in
//! flight, and what it does with each answer. (Real brokers are in `tests/`; this fake lets
//! the client be checked on its own, with answers a real broker gives only by chance.)

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_proto::v1::produce_server::{Produce, ProduceServer};
use conveyor_proto::v1::{
    ErrorCode, ErrorDetail, InitProducerRequest, InitProducerResponse, PartitionProduce, PartitionProduceResult,
    ProduceRequest, ProduceResponse,
};
use conveyor_storage::batch::{BatchHeader, ProducerInfo};
use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

use crate::{Client, ProducerConfig, ProducerRecord};

const DEADLINE: Duration = Duration::from_secs(10);
/// How long the producer is given to send more than it may before the test concludes it won't.
const QUIET: Duration = Duration::from_millis(300);

/// How the fake answers one part.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Refuse(ErrorCode),
    /// The stream fails (its request unanswered), as when a connection drops.
    BreakLink,
}

#[derive(Default)]
pub(super) struct Fake {
    /// Every part received, in order.
    parts: Mutex<Vec<PartitionProduce>>,
    received: Notify,
    /// Answers are held until this is set.
    release: tokio::sync::watch::Sender<bool>,
    /// How the next parts received are answered, in order; success once it is empty.
    script: Mutex<VecDeque<Answer>>,
    /// How the next `InitProducer` calls fail, in order; then they succeed...
    init_failures: Mutex<VecDeque<tonic::Status>>,
    /// ...unless every call fails UNAVAILABLE.
    init_unavailable: AtomicBool,
    init_calls: AtomicUsize,
    ids_issued: AtomicUsize,
}

fn refusal(code: ErrorCode) -> ErrorDetail {
    ErrorDetail {
        code: code as i32,
        message: format!("{code:?} (scripted)"),
        retriable: !matches!(code, ErrorCode::ProducerFenced),
        ..ErrorDetail::default()
    }
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
                let answers: Vec<Option<Answer>> = {
                    let mut script = fake.script.lock().expect("lock");
                    request.partitions.iter().map(|_| script.pop_front()).collect()
                };
                if answers.iter().any(|a| matches!(a, Some(Answer::BreakLink))) {
                    let _ = tx.send(Err(tonic::Status::cancelled("operation was canceled"))).await;
                    return;
                }
                let partitions = request
                    .partitions
                    .iter()
                    .zip(answers)
                    .map(|(p, answer)| {
                        let mut result = PartitionProduceResult {
                            topic: p.topic.clone(),
                            partition: p.partition,
                            ..PartitionProduceResult::default()
                        };
                        if let Some(Answer::Refuse(code)) = answer {
                            result.error = Some(refusal(code));
                            return result;
                        }
                        let records = BatchHeader::parse(&p.batches[0]).map_or(1, |h| u64::from(h.record_count));
                        offset += records;
                        result.base_offset = offset - records;
                        result.last_offset = offset - 1;
                        result
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
        let fake = &self.0;
        fake.init_calls.fetch_add(1, Ordering::SeqCst);
        if fake.init_unavailable.load(Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("no controller (scripted)"));
        }
        if let Some(status) = fake.init_failures.lock().expect("lock").pop_front() {
            return Err(status);
        }
        let issued = fake.ids_issued.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(InitProducerResponse {
            producer_id: 77 + issued as i64,
            producer_epoch: 0,
        }))
    }
}

pub(super) async fn start_fake() -> (Arc<Fake>, String) {
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
    let (fake, producer) = held_fake(ProducerConfig::default().linger(Duration::ZERO)).await;
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
    assert_eq!(
        parts.len(),
        6,
        "the records sent while five batches were unanswered wait in one open batch"
    );
    let mut next_sequence = 0;
    for part in &parts {
        assert_eq!((part.sequence, part.restart), (0, false), "no part numbering");
        let header = BatchHeader::parse(&part.batches[0]).expect("header");
        assert_eq!(
            header.producer,
            ProducerInfo {
                producer_id: 77,
                producer_epoch: 0,
                base_sequence: next_sequence,
            }
        );
        assert_eq!(header.crc, verified_crc(&part.batches[0]));
        next_sequence += header.record_count as i32;
    }
    assert_eq!(next_sequence, 12);
    assert_eq!(
        BatchHeader::parse(&parts[5].batches[0]).expect("header").record_count,
        7
    );
    assert_eq!(producer.unvouched_records(), 0);
}

/// Records waiting for room in an open batch when the application drops its producer are
/// still sent once room frees, as a lingering batch's are.
#[tokio::test]
async fn a_batch_waiting_for_room_is_sent_after_its_producer_is_dropped() {
    let (fake, producer) = held_fake(ProducerConfig::default().linger(Duration::ZERO)).await;
    let mut deliveries = Vec::new();
    for i in 0..9 {
        let record = ProducerRecord::new("t", format!("record {i}")).partition(0);
        deliveries.push(producer.send(record).await.expect("send"));
    }
    fake.wait_for_parts(5).await;
    drop(producer);
    fake.release.send_replace(true);
    delivered(deliveries).await;
    let counts: Vec<u32> = fake.headers().iter().map(|h| h.record_count).collect();
    assert_eq!(counts, [1, 1, 1, 1, 1, 4]);
}

/// With a linger, as without: a batch whose linger ends while its partition has five
/// unanswered is not sealed, and takes the records that come meanwhile.
#[tokio::test]
async fn a_batch_whose_linger_ends_while_five_are_unanswered_waits_open() {
    let (fake, producer) = held_fake(ProducerConfig::default().linger(Duration::from_millis(1))).await;
    let unanswered = || {
        let u = producer.inner.tracker.unanswered();
        u.count.get(&(std::sync::Arc::from("t"), 0)).copied().unwrap_or(0)
    };
    let mut deliveries = Vec::new();
    for i in 0..5 {
        let record = ProducerRecord::new("t", format!("record {i}")).partition(0);
        deliveries.push(producer.send(record).await.expect("send"));
        // Sealed by its linger, alone.
        tokio::time::timeout(DEADLINE, async {
            while unanswered() < i + 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the batch is sealed once its linger ends");
    }
    for i in 5..20 {
        let record = ProducerRecord::new("t", format!("record {i}")).partition(0);
        deliveries.push(producer.send(record).await.expect("send"));
    }
    tokio::time::timeout(DEADLINE, async {
        while !producer
            .inner
            .tracker
            .unanswered()
            .waiting
            .contains(&(std::sync::Arc::from("t"), 0))
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the sixth batch's linger ends and it waits for room");
    assert_eq!(unanswered(), 5, "no sixth batch sealed while five are unanswered");
    fake.release.send_replace(true);
    delivered(deliveries).await;
    let counts: Vec<u32> = fake.headers().iter().map(|h| h.record_count).collect();
    assert_eq!(
        counts,
        [1, 1, 1, 1, 1, 15],
        "lingered batches waited for room in one batch"
    );
}

fn verified_crc(batch: &[u8]) -> u32 {
    let parsed = conveyor_storage::batch::RecordBatch::parse(bytes::Bytes::copy_from_slice(batch)).expect("parse");
    parsed.verify_crc().expect("a valid CRC");
    parsed.header().crc
}

impl Fake {
    fn script(&self, answers: &[Answer]) {
        self.script.lock().expect("lock").extend(answers.iter().copied());
    }

    fn headers(&self) -> Vec<BatchHeader> {
        let parts = self.parts.lock().expect("lock").clone();
        parts
            .iter()
            .map(|p| BatchHeader::parse(&p.batches[0]).expect("header"))
            .collect()
    }

    /// (producer id, epoch, base sequence) of each batch received, in order.
    fn stamps(&self) -> Vec<(i64, i16, i32)> {
        self.headers()
            .iter()
            .map(|h| {
                (
                    h.producer.producer_id,
                    h.producer.producer_epoch,
                    h.producer.base_sequence,
                )
            })
            .collect()
    }
}

/// A producer of the fake's partition 0 of topic "t", released at once, with short pauses.
async fn answering_fake(config: ProducerConfig) -> (Arc<Fake>, crate::Producer) {
    let (fake, producer) = held_fake(config.linger(Duration::ZERO).retry_backoff(Duration::from_millis(10))).await;
    fake.release.send_replace(true);
    (fake, producer)
}

/// A producer of the fake's partition 0 of topic "t", whose answers are held until released.
async fn held_fake(config: ProducerConfig) -> (Arc<Fake>, crate::Producer) {
    let (fake, address) = start_fake().await;
    let client = Client::connect(&address).await.expect("connect");
    client.cluster().assume_leader("t", 1, &address);
    let producer = client.producer(config).expect("producer");
    (fake, producer)
}

async fn send_records(producer: &crate::Producer, count: usize) -> Vec<crate::DeliveryFuture> {
    let mut deliveries = Vec::new();
    for i in 0..count {
        let record = ProducerRecord::new("t", format!("record {i}")).partition(0);
        deliveries.push(producer.send(record).await.expect("send"));
    }
    deliveries
}

async fn delivered(deliveries: Vec<crate::DeliveryFuture>) {
    for d in deliveries {
        tokio::time::timeout(DEADLINE, d)
            .await
            .expect("in time")
            .expect("acknowledged");
    }
}

#[tokio::test]
async fn a_batch_resent_after_a_broken_link_carries_the_identical_bytes() {
    let (fake, producer) = answering_fake(ProducerConfig::default()).await;
    fake.script(&[Answer::BreakLink]);
    delivered(send_records(&producer, 1).await).await;
    let parts = fake.parts.lock().expect("lock").clone();
    assert_eq!(parts.len(), 2, "sent, then resent once");
    assert_eq!(parts[0].batches, parts[1].batches, "byte for byte");
    assert_eq!(fake.headers()[1].producer.producer_id, 77);
}

#[tokio::test]
async fn an_unknown_producer_id_behind_a_refused_batch_is_resent_under_the_same_id() {
    let (fake, producer) = answering_fake(ProducerConfig::default()).await;
    // The first batch is refused BUSY, so the broker has no state for the id yet when it
    // judges the two after it.
    fake.script(&[
        Answer::Refuse(ErrorCode::Busy),
        Answer::Refuse(ErrorCode::UnknownProducerId),
        Answer::Refuse(ErrorCode::UnknownProducerId),
    ]);
    delivered(send_records(&producer, 3).await).await;
    let headers = fake.headers();
    assert_eq!(headers.len(), 6, "three refused, three resent");
    assert!(
        headers.iter().all(|h| h.producer.producer_id == 77),
        "no new producer id: {:?}",
        headers.iter().map(|h| h.producer).collect::<Vec<_>>()
    );
    let resent: Vec<i32> = headers[3..].iter().map(|h| h.producer.base_sequence).collect();
    assert_eq!(resent, vec![0, 1, 2], "resent in order with their sequences");
    assert_eq!(fake.init_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unknown_producer_id_for_the_first_unacknowledged_batch_bumps_the_epoch_of_the_same_id() {
    let (fake, producer) = answering_fake(ProducerConfig::default()).await;
    delivered(send_records(&producer, 1).await).await;
    fake.script(&[
        Answer::Refuse(ErrorCode::UnknownProducerId),
        Answer::Refuse(ErrorCode::UnknownProducerId),
    ]);
    delivered(send_records(&producer, 2).await).await;
    assert_eq!(
        fake.stamps(),
        vec![(77, 0, 0), (77, 0, 1), (77, 0, 2), (77, 1, 0), (77, 1, 1)]
    );
    assert_eq!(fake.init_calls.load(Ordering::SeqCst), 1, "no new id");
    assert_eq!(
        producer.unvouched_records(),
        2,
        "both renumbered batches had been sent: a late copy under epoch 0 could still land"
    );
}

#[tokio::test]
async fn a_gap_after_a_failed_batch_renumbers_the_next_under_the_next_epoch_and_counts_it_unvouched() {
    let (fake, producer) = answering_fake(ProducerConfig::default().retries(0)).await;
    delivered(send_records(&producer, 1).await).await;
    // The second batch fails for good (no retries); the third, sent under epoch 0 after it,
    // finds the broker missing a sequence.
    fake.script(&[
        Answer::Refuse(ErrorCode::Busy),
        Answer::Refuse(ErrorCode::OutOfOrderSequence),
    ]);
    let mut deliveries = send_records(&producer, 2).await;
    let third = deliveries.pop().expect("third");
    let second = deliveries.pop().expect("second");
    let e = tokio::time::timeout(DEADLINE, second)
        .await
        .expect("in time")
        .expect_err("no retries");
    assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}");
    delivered(vec![third]).await;
    delivered(send_records(&producer, 1).await).await;
    assert_eq!(
        fake.stamps(),
        vec![(77, 0, 0), (77, 0, 1), (77, 0, 2), (77, 1, 0), (77, 1, 1)]
    );
    assert_eq!(fake.init_calls.load(Ordering::SeqCst), 1, "no new id");
    assert_eq!(
        producer.unvouched_records(),
        1,
        "the third batch was sent under epoch 0"
    );
    producer
        .send(ProducerRecord::new("t", "still going").partition(0))
        .await
        .expect("not stopped");
}

#[tokio::test]
async fn a_fenced_producer_fails_its_batch_and_every_later_send() {
    let (fake, producer) = answering_fake(ProducerConfig::default()).await;
    fake.script(&[Answer::Refuse(ErrorCode::ProducerFenced)]);
    let delivery = send_records(&producer, 1).await.remove(0);
    let e = tokio::time::timeout(DEADLINE, delivery)
        .await
        .expect("in time")
        .expect_err("fenced");
    assert_eq!(e.code(), Some(ErrorCode::ProducerFenced), "{e}");
    let e = producer
        .send(ProducerRecord::new("t", "later").partition(0))
        .await
        .expect_err("stopped");
    assert!(
        matches!(
            e,
            crate::ClientError::ProducerStopped {
                code: Some(ErrorCode::ProducerFenced),
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(fake.count(), 1, "nothing resent");
}

#[tokio::test]
async fn an_init_producer_call_cut_by_a_broken_connection_is_asked_again() {
    let (fake, producer) = answering_fake(ProducerConfig::default()).await;
    fake.init_failures.lock().expect("lock").extend([
        tonic::Status::cancelled("operation was canceled"),
        tonic::Status::unknown("transport error"),
    ]);
    delivered(send_records(&producer, 1).await).await;
    assert_eq!(fake.init_calls.load(Ordering::SeqCst), 3);
    assert_eq!(fake.headers()[0].producer.producer_id, 77);
}

#[tokio::test]
async fn a_producer_asks_for_an_id_with_growing_pauses_and_stops_asking_once_no_batch_waits() {
    let (fake, producer) = answering_fake(ProducerConfig::default().delivery_timeout(Duration::from_secs(1))).await;
    fake.init_unavailable.store(true, Ordering::SeqCst);
    let delivery = send_records(&producer, 1).await.remove(0);
    let e = tokio::time::timeout(DEADLINE, delivery)
        .await
        .expect("in time")
        .expect_err("no id to send with");
    assert!(e.is_retriable(), "{e}");
    let asked = fake.init_calls.load(Ordering::SeqCst);
    // Pauses of 10, 20, 40, ... ms: about 8 calls in the 1 to 2 s before the batch fails;
    // a fixed 10 ms pause would make a hundred.
    assert!((2..=10).contains(&asked), "{asked} calls");
    tokio::time::sleep(QUIET * 4).await;
    let later = fake.init_calls.load(Ordering::SeqCst);
    assert!(
        later <= asked + 1,
        "asked {} more times with nothing to send",
        later - asked
    );
    assert_eq!(fake.count(), 0);
}
