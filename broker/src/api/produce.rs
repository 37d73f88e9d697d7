//! The `Produce` service: unary and pipelined (bidirectional stream) produce.
//!
//! Every batch of a request is validated (CRC, lengths, counts, `max.message.bytes`, and what
//! its records decompress to against `[limits] max_uncompressed_batch_bytes`) before any is
//! queued, so a bad request changes nothing. Validation of a large or compressed request
//! (hashing, decompression, packing plain records; large by the bytes of all its parts)
//! runs on the blocking pool, not the reactor; a small plain one is validated in place,
//! where a thread hop would cost more than the work. On a stream,
//! requests are queued to their partitions in the order they arrive, which keeps
//! per-partition order across pipelined requests; answers go back as each request meets its
//! acks.
//!
//! Bytes are bounded before tonic reads a message ([`super::admission`], the broker's
//! `produce_queue_bytes`) and when a part is queued (its partition's `partition_queue_bytes`);
//! both shares travel with the append and come back when it is answered. A unary request
//! waits at most [`MAX_WAIT`] for either and is then answered `BUSY`; a stream waits.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conveyor_proto::v1::produce_server::Produce;
use conveyor_proto::v1::{self as pb, ProduceRequest, ProduceResponse};
use conveyor_storage::batch::{self, BatchBuilder, Compression, Record, ValidatedBatch};
use futures::Stream;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use super::Context;
use super::admission::Admitted;
use super::inflate_budget;
use crate::byte_budget::{MAX_WAIT, Reservation};
use crate::error::{BrokerError, Result, check_topic_name_length};
use crate::metrics::Metrics;
use crate::replica::partition::Partition;
use crate::replica::proposal::{Acks, AppendOutcome, StreamOrder};

/// Responses buffered per produce stream before the stream handler waits for the client.
const STREAM_RESPONSE_BUFFER: usize = 256;
/// Above this many bytes in a request, validation runs off the reactor. Below it, plain
/// batches are checked in place as they always were: hashing and walking a default-sized
/// batch takes about as long as the hop to the blocking pool, which a stream's strictly
/// ordered loop would pay on every request.
const INLINE_VALIDATION_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct ProduceService {
    pub ctx: Arc<Context>,
}

/// A partition's part of a request that failed before it was queued; it answers alone.
struct Failed {
    topic: String,
    partition: i32,
    error: BrokerError,
}

/// A part validated and ready to queue.
type Prepared = std::result::Result<(Arc<Partition>, Vec<ValidatedBatch>, Option<StreamOrder>), Failed>;

/// A produce stream's counters for its numbered parts, per topic and partition (see
/// [`StreamOrder`]); they live as long as the stream.
type StreamSequences = HashMap<(String, i32), Arc<AtomicU64>>;
/// A part queued on its partition (with a receiver unless acks=none).
type Queued = std::result::Result<(Arc<Partition>, Option<oneshot::Receiver<Result<AppendOutcome>>>), Failed>;

fn acks_of(value: i32) -> Result<Acks> {
    match pb::Acks::try_from(value) {
        Ok(pb::Acks::None) => Ok(Acks::None),
        Ok(pb::Acks::Leader) => Ok(Acks::Leader),
        Ok(pb::Acks::All | pb::Acks::Unspecified) => Ok(Acks::All),
        Err(_) => Err(BrokerError::InvalidRequest(format!("unknown acks value {value}"))),
    }
}

/// Packs plain protobuf records into one batch for clients without the batch encoder.
fn pack_records(
    records: Vec<pb::Record>,
    producer: batch::ProducerInfo,
) -> std::result::Result<Bytes, conveyor_storage::BatchError> {
    let now = conveyor_storage::unix_millis();
    let mut builder = BatchBuilder::new(Compression::None).producer(producer);
    for r in records {
        builder.push(&Record {
            timestamp: if r.timestamp == 0 { now } else { r.timestamp },
            key: r.key,
            value: r.value,
            headers: r
                .headers
                .into_iter()
                .map(|h| batch::Header {
                    key: Bytes::from(h.key),
                    value: h.value,
                })
                .collect(),
        });
    }
    builder.build()
}

/// The producer identity a part gives its plain records: all three fields or none.
fn records_producer(pp: &pb::PartitionProduce) -> Result<batch::ProducerInfo> {
    match (pp.producer_id, pp.producer_epoch, pp.base_sequence) {
        (None, None, None) => Ok(batch::ProducerInfo::NONE),
        (Some(producer_id), Some(epoch), Some(base_sequence)) => {
            let producer_epoch = i16::try_from(epoch).map_err(|_| {
                BrokerError::InvalidRequest(format!(
                    "topic '{}' partition {}: producer_epoch {epoch} is out of range (0 to {})",
                    pp.topic,
                    pp.partition,
                    i16::MAX
                ))
            })?;
            Ok(batch::ProducerInfo {
                producer_id,
                producer_epoch,
                base_sequence,
            })
        }
        _ => Err(BrokerError::InvalidRequest(format!(
            "topic '{}' partition {}: producer_id, producer_epoch and base_sequence go together (all three for idempotent records, or none)",
            pp.topic, pp.partition
        ))),
    }
}

/// One partition's part of a request, looked up and waiting for its batches to be checked.
struct Part {
    topic: String,
    index: i32,
    sequence: u64,
    restart: bool,
    /// The partition and what to validate against its rules, or why it failed.
    work: Result<Work>,
}

/// A part's partition and what it brings: batches, and plain records the broker packs into
/// one more batch when it validates them (off the reactor when the request is heavy).
struct Work {
    partition: Arc<Partition>,
    rules: Rules,
    batches: Vec<Bytes>,
    records: Vec<pb::Record>,
    producer: batch::ProducerInfo,
}

/// What a packed record costs beyond its key, value and headers (its length, attributes,
/// deltas, and the lengths inside), and a header beyond its key and value: an empty record
/// still takes packing and hashing.
const PACKED_RECORD_OVERHEAD: usize = 16;
const PACKED_HEADER_OVERHEAD: usize = 4;

impl Work {
    /// About the bytes validating this part walks: its batches and its plain records.
    fn bytes(&self) -> usize {
        self.batches.iter().map(Bytes::len).sum::<usize>() + plain_bytes(&self.records)
    }
}

/// About the bytes plain `records` take once packed.
fn plain_bytes(records: &[pb::Record]) -> usize {
    let record = |r: &pb::Record| {
        PACKED_RECORD_OVERHEAD
            + r.key.as_ref().map_or(0, Bytes::len)
            + r.value.as_ref().map_or(0, Bytes::len)
            + r.headers
                .iter()
                .map(|h| PACKED_HEADER_OVERHEAD + h.key.len() + h.value.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
    };
    records.iter().map(record).sum()
}

/// What a topic asks of the batches produced to it.
#[derive(Debug, Clone, Copy)]
struct Rules {
    /// `max.message.bytes`.
    max_batch_bytes: usize,
    /// A compacted topic keeps the latest record per key: a record without a key has no place.
    keys_required: bool,
}

/// A part's partition and its validated batches.
type Checked = (Arc<Partition>, Vec<ValidatedBatch>);

/// Checks one partition's batches; nothing of it is queued if any is bad.
fn validate_part(
    name: &str,
    index: i32,
    batches: Vec<Bytes>,
    rules: Rules,
    max_uncompressed: usize,
    acks: Acks,
) -> Result<Vec<ValidatedBatch>> {
    let bad = |e| BrokerError::from_batch(name, index, e);
    let mut validated = Vec::with_capacity(batches.len());
    for b in batches {
        let checked = if rules.keys_required {
            ValidatedBatch::within_keyed(b, rules.max_batch_bytes, max_uncompressed)
        } else {
            ValidatedBatch::within(b, rules.max_batch_bytes, max_uncompressed)
        };
        let v = checked.map_err(|e| match e {
            conveyor_storage::BatchError::KeylessRecord { index: i } => BrokerError::InvalidRequest(format!(
                "topic '{name}' partition {index}: record {i} of a batch has no key, and the topic is compacted (cleanup.policy keeps the latest record per key); give every record a key"
            )),
            e => bad(e),
        })?;
        // A retry is recognised against committed batches; and with acks=none nobody would
        // hear a refusal from the partition.
        if acks != Acks::All && v.header().producer.producer_id >= 0 {
            return Err(BrokerError::InvalidRequest(format!(
                "topic '{name}' partition {index}: an idempotent batch (producer id set) needs acks=all"
            )));
        }
        if v.header().is_control() {
            return Err(BrokerError::InvalidRequest(format!(
                "topic '{name}' partition {index}: control batches are written by the broker only"
            )));
        }
        if v.header().is_transactional() {
            return Err(BrokerError::InvalidRequest(format!(
                "topic '{name}' partition {index}: transactional batches need a transaction coordinator, which this broker does not have yet"
            )));
        }
        validated.push(v);
    }
    Ok(validated)
}

/// Whether checking a request is heavy enough for the blocking pool: many bytes over all
/// its parts (`(batches, bytes of the part)` each), or a compressed batch (a few KiB may
/// decompress to `max_uncompressed_batch_bytes`).
fn heavy<'a>(parts: impl Iterator<Item = (&'a [Bytes], usize)>) -> bool {
    let compressed =
        |b: &Bytes| batch::BatchHeader::parse(b).is_ok_and(|h| !matches!(h.compression(), Ok(Compression::None)));
    let mut total = 0usize;
    for (batches, bytes) in parts {
        total = total.saturating_add(bytes);
        if total > INLINE_VALIDATION_BYTES || batches.iter().any(compressed) {
            return true;
        }
    }
    false
}

/// Bytes that validating `batches` holds decompressed at once: batches are inflated one at a
/// time, each stopping at what it declares, so the largest declaration of a compressed batch,
/// within `limit` (a batch declaring more is refused before it is decompressed). Not the sum:
/// a client declaring many large batches holds no more of the shared budget than one.
fn inflating_bytes(batches: &[Bytes], limit: usize) -> usize {
    batches
        .iter()
        .filter_map(|b| inflate_budget::inflates_to(b, limit))
        .max()
        .unwrap_or(0)
}

impl ProduceService {
    /// Looks up one part's partition; its plain records are packed, and its batches checked
    /// by [`validate_part`], later in [`Self::prepare`] (off the reactor for a heavy request).
    fn look_up(&self, part: &mut pb::PartitionProduce) -> Result<Work> {
        let (name, index, sequence) = (part.topic.as_str(), part.partition, part.sequence);
        check_topic_name_length(name)?;
        crate::coordinator::internal_topic::refuse_client_write(name, "write to")?;
        let producer = records_producer(part)?;
        let batches = std::mem::take(&mut part.batches);
        let records = std::mem::take(&mut part.records);
        if producer != batch::ProducerInfo::NONE && records.is_empty() {
            return Err(BrokerError::InvalidRequest(format!(
                "topic '{name}' partition {index}: producer_id, producer_epoch and base_sequence apply to plain records, and the part has none (batches carry their own)"
            )));
        }
        // The last number would leave nothing to follow it, and the owner's counter uses it
        // to mean "the run is broken".
        if sequence == u64::MAX {
            return Err(BrokerError::InvalidRequest(format!(
                "topic '{name}' partition {index}: part sequence {sequence} is out of range (parts are numbered from 1 up to 2^64 - 2)"
            )));
        }
        let topic = self.ctx.registry.get(name)?;
        // The owner answers a request that reached a follower with the leader's address.
        let partition = self.ctx.registry.replica(&topic, index)?;
        let rules = Rules {
            max_batch_bytes: topic.effective.max_message_bytes as usize,
            keys_required: topic.effective.cleanup_policy.compacts(),
        };
        if batches.is_empty() && records.is_empty() {
            return Err(BrokerError::InvalidRequest(format!(
                "topic '{name}' partition {index}: no batches or records"
            )));
        }
        Ok(Work {
            partition,
            rules,
            batches,
            records,
            producer,
        })
    }

    /// Request-level checks, before anything else is looked at.
    fn check_request(req: &ProduceRequest) -> Result<Acks> {
        let acks = acks_of(req.acks)?;
        if req.partitions.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "a produce request needs at least one partition".into(),
            ));
        }
        Ok(acks)
    }

    /// Validates each partition's part on its own: a bad part fails alone. On a stream,
    /// numbered parts carry their place in their partition's sequence; a part that fails
    /// here is never appended, so it holds back the rest of its run as the owner would.
    async fn prepare(
        &self,
        req: ProduceRequest,
        acks: Acks,
        mut sequences: Option<&mut StreamSequences>,
    ) -> Vec<Prepared> {
        let parts: Vec<Part> = req
            .partitions
            .into_iter()
            .map(|mut pp| Part {
                work: self.look_up(&mut pp),
                topic: pp.topic,
                index: pp.partition,
                sequence: pp.sequence,
                restart: pp.restart,
            })
            .collect();
        let max_uncompressed = self.ctx.max_uncompressed_batch_bytes;
        let check = move |parts: Vec<Part>| -> Vec<(Part, Result<Checked>)> {
            parts
                .into_iter()
                .map(|mut part| {
                    let work = std::mem::replace(&mut part.work, Err(BrokerError::ShuttingDown));
                    let checked = work.and_then(|w| {
                        let mut batches = w.batches;
                        if !w.records.is_empty() {
                            let packed = pack_records(w.records, w.producer)
                                .map_err(|e| BrokerError::from_batch(&part.topic, part.index, e))?;
                            batches.push(packed);
                        }
                        validate_part(&part.topic, part.index, batches, w.rules, max_uncompressed, acks)
                            .map(|v| (w.partition, v))
                    });
                    (part, checked)
                })
                .collect()
        };
        let off_reactor = heavy(
            parts
                .iter()
                .filter_map(|p| p.work.as_ref().ok())
                .map(|w| (&w.batches[..], w.bytes())),
        );
        let checked = if off_reactor {
            // Parts are checked one after another, so the request holds its largest batch.
            let inflating = parts
                .iter()
                .filter_map(|p| p.work.as_ref().ok())
                .map(|w| inflating_bytes(&w.batches, max_uncompressed))
                .max()
                .unwrap_or(0);
            let names: Vec<(String, i32)> = parts.iter().map(|p| (p.topic.clone(), p.index)).collect();
            let what = || match names.first() {
                Some((topic, partition)) => format!("a produce request to topic '{topic}' partition {partition}"),
                None => "a produce request".to_string(),
            };
            // The share stays with the job until its inflated buffers are gone, even if this
            // request is cancelled meanwhile.
            let checked = inflate_budget::shared()
                .run_blocking(inflating, what, move |_| Ok(check(parts)))
                .await;
            match checked {
                Ok(checked) => checked,
                // No budget in time (BUSY, retriable), or the job panicked: every part answers
                // with the reason, none is queued.
                Err(error) => {
                    let reason = error.to_string();
                    let again = move || match &error {
                        BrokerError::Busy {
                            what,
                            memory,
                            waited_ms,
                        } => BrokerError::Busy {
                            what: what.clone(),
                            memory: memory.clone(),
                            waited_ms: *waited_ms,
                        },
                        _ => BrokerError::Internal(reason.clone()),
                    };
                    return names
                        .into_iter()
                        .map(|(topic, partition)| {
                            Err(Failed {
                                topic,
                                partition,
                                error: again(),
                            })
                        })
                        .collect();
                }
            }
        } else {
            check(parts)
        };
        checked
            .into_iter()
            .map(|(part, result)| match result {
                Ok((p, batches)) => {
                    let order = match sequences.as_deref_mut() {
                        Some(sequences) if part.sequence != 0 => Some(StreamOrder {
                            next: Arc::clone(sequences.entry((part.topic, part.index)).or_default()),
                            sequence: part.sequence,
                            restart: part.restart,
                        }),
                        _ => None,
                    };
                    Ok((p, batches, order))
                }
                Err(error) => Err(Failed {
                    topic: part.topic,
                    partition: part.index,
                    error,
                }),
            })
            .collect()
    }

    /// Queues every valid part, in order, waiting while a partition's mailbox or queued
    /// bytes are full (at most `wait`, then that part is answered `BUSY`). Every part holds
    /// the message's `share` of the broker's queued bytes until it is answered.
    async fn enqueue(acks: Acks, parts: Vec<Prepared>, share: &Reservation, wait: Option<Duration>) -> Vec<Queued> {
        let mut out = Vec::with_capacity(parts.len());
        // One bounded wait for the whole request, not one per part.
        let deadline = wait.map(|wait| Instant::now() + wait);
        for part in parts {
            let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            out.push(match part {
                Ok((partition, batches, order)) => {
                    // Room for the partition's own share too, which `enqueue` adds.
                    let mut shares = Vec::with_capacity(2);
                    shares.push(share.clone());
                    match partition.enqueue(batches, acks, order, shares, wait).await {
                        Ok(rx) => Ok((partition, (acks != Acks::None).then_some(rx))),
                        Err(error) => Err(Failed {
                            topic: partition.topic.clone(),
                            partition: partition.index,
                            error,
                        }),
                    }
                }
                Err(failed) => Err(failed),
            });
        }
        out
    }

    /// Waits for every queued part's answer. A part that failed counts as a failed request
    /// under its code, as a whole request does.
    async fn collect(request_id: u64, parts: Vec<Queued>, metrics: &Metrics) -> ProduceResponse {
        let mut partitions = Vec::with_capacity(parts.len());
        for part in parts {
            let (topic, partition, outcome) = match part {
                Ok((p, Some(rx))) => (
                    p.topic.clone(),
                    p.index,
                    rx.await.unwrap_or(Err(BrokerError::ShuttingDown)).map(Some),
                ),
                Ok((p, None)) => (p.topic.clone(), p.index, Ok(None)),
                Err(Failed {
                    topic,
                    partition,
                    error,
                }) => (topic, partition, Err(error)),
            };
            let mut result = pb::PartitionProduceResult {
                topic,
                partition,
                ..Default::default()
            };
            match outcome {
                Ok(Some(o)) => {
                    result.base_offset = o.base_offset;
                    result.last_offset = o.last_offset;
                }
                Ok(None) => {}
                Err(e) => {
                    metrics.request_failed(e.error_code());
                    result.error = Some(e.detail());
                }
            }
            partitions.push(result);
        }
        ProduceResponse { request_id, partitions }
    }

    fn error_response(req_id: u64, req: &ProduceRequest, e: &BrokerError) -> ProduceResponse {
        ProduceResponse {
            request_id: req_id,
            partitions: req
                .partitions
                .iter()
                .map(|p| pb::PartitionProduceResult {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    error: Some(e.detail()),
                    ..Default::default()
                })
                .collect(),
        }
    }
}

/// The span of one produce request, at debug level so that a broker not asked for it pays
/// only a level check. It names the first partition of the request (most requests have one)
/// and how many there are; [`record_offsets`] adds the first part's offsets once answered.
fn produce_span(req: &ProduceRequest) -> tracing::Span {
    let first = req.partitions.first();
    tracing::debug_span!(
        "produce",
        request_id = req.request_id,
        topic = first.map(|p| p.topic.as_str()),
        partition = first.map(|p| p.partition),
        partitions = req.partitions.len(),
        base_offset = tracing::field::Empty,
        last_offset = tracing::field::Empty,
    )
}

/// Records the first part's offsets (or its error code) on the request's span.
fn record_offsets(span: &tracing::Span, response: &ProduceResponse) {
    if span.is_disabled() {
        return;
    }
    if let Some(first) = response.partitions.first() {
        match &first.error {
            None => {
                span.record("base_offset", first.base_offset);
                span.record("last_offset", first.last_offset);
            }
            Some(e) => {
                tracing::debug!(parent: span, code = e.code, error = %e.message, "produce failed");
            }
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = std::result::Result<ProduceResponse, Status>> + Send>>;

/// What a produce stream's loop woke up for.
enum StreamEvent<T> {
    Answer(ProduceResponse),
    Next(Option<std::result::Result<T, Status>>),
    Stopping,
    Gone,
}

/// What a produce stream waiting to queue a request woke up for.
enum QueueEvent<T> {
    Queued(T),
    Answer(ProduceResponse),
    Gone,
}

/// Sends every answer still awaited on a stream; false if the client stopped reading.
async fn drain_answers<F>(
    answering: &mut FuturesUnordered<F>,
    tx: &mpsc::Sender<std::result::Result<ProduceResponse, Status>>,
) -> bool
where
    F: std::future::Future<Output = ProduceResponse>,
{
    while let Some(response) = answering.next().await {
        if tx.send(Ok(response)).await.is_err() {
            return false;
        }
    }
    true
}

#[tonic::async_trait]
impl Produce for ProduceService {
    async fn produce(
        &self,
        request: Request<ProduceRequest>,
    ) -> std::result::Result<Response<ProduceResponse>, Status> {
        let started = Instant::now();
        let metrics = &self.ctx.metrics;
        metrics.produce_requests.add(1);
        let share = Admitted::of(&request).next();
        let req = request.into_inner();
        let request_id = req.request_id;
        let span = produce_span(&req);
        let acks = Self::check_request(&req).map_err(|e| {
            metrics.request_failed(e.error_code());
            Status::from(e)
        })?;
        let mut parts = self.prepare(req, acks, None).instrument(span.clone()).await;
        // A request for one partition whose part is bad gets that error as its status.
        if parts.len() == 1
            && parts[0].is_err()
            && let Some(Err(Failed { error, .. })) = parts.pop()
        {
            metrics.request_failed(error.error_code());
            return Err(error.into());
        }
        let parts = Self::enqueue(acks, parts, &share, Some(MAX_WAIT))
            .instrument(span.clone())
            .await;
        // The appends hold the share now; what is left of the request is gone.
        drop(share);
        let response = Self::collect(request_id, parts, metrics).instrument(span.clone()).await;
        record_offsets(&span, &response);
        metrics.produce_latency.observe(started.elapsed());
        Ok(Response::new(response))
    }

    type ProduceStreamStream = ResponseStream;

    async fn init_producer(
        &self,
        _request: Request<conveyor_proto::v1::InitProducerRequest>,
    ) -> std::result::Result<Response<conveyor_proto::v1::InitProducerResponse>, Status> {
        let producer_id = self.ctx.producer_ids.issue().await.map_err(|e| {
            self.ctx.metrics.request_failed(e.error_code());
            Status::from(e)
        })?;
        Ok(Response::new(conveyor_proto::v1::InitProducerResponse {
            producer_id,
            producer_epoch: 0,
        }))
    }

    async fn produce_stream(
        &self,
        request: Request<Streaming<ProduceRequest>>,
    ) -> std::result::Result<Response<Self::ProduceStreamStream>, Status> {
        let admitted = Admitted::of(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_RESPONSE_BUFFER);
        let service = self.clone();
        let mut stopping = self.ctx.stopping.clone();
        tokio::spawn(async move {
            let mut sequences = StreamSequences::new();
            // The requests of this stream waiting for their answers, at most
            // STREAM_RESPONSE_BUFFER: awaited here rather than in a task each, which would
            // cost a spawn, and often a wake of another worker thread, per request.
            let mut answering = FuturesUnordered::new();
            // Whether the answers in flight are still sent (not after the client went).
            let mut drain = true;
            loop {
                let event = tokio::select! {
                    biased;
                    Some(response) = answering.next(), if !answering.is_empty() => StreamEvent::Answer(response),
                    // Shutting down: take no more requests; answers in flight still go out.
                    // Before the next request, which a pipelining client always has ready.
                    _ = stopping.wait_for(|s| *s) => StreamEvent::Stopping,
                    // The client reset the stream or its connection went: nobody will read.
                    // (A stream waiting for its share never polls its body, so it would not
                    // see the reset until the whole budget was its own.)
                    _ = tx.closed() => StreamEvent::Gone,
                    // A client that stops reading answers leaves its next message unread,
                    // behind HTTP/2 flow control, holding no share.
                    next = inbound.next(), if answering.len() < STREAM_RESPONSE_BUFFER => StreamEvent::Next(next),
                };
                let next = match event {
                    StreamEvent::Answer(response) => {
                        if tx.send(Ok(response)).await.is_err() {
                            drain = false;
                            break;
                        }
                        continue;
                    }
                    StreamEvent::Next(next) => next,
                    StreamEvent::Stopping => break,
                    StreamEvent::Gone => {
                        drain = false;
                        break;
                    }
                };
                let (req, share) = match next {
                    Some(Ok(r)) => (r, admitted.next()),
                    Some(Err(status)) => {
                        // The client's own reset, or its body stalled past its deadline: the
                        // error goes after the answers in flight, which may still reach it.
                        tracing::debug!(%status, "produce stream ended");
                        // Bounded by the partitions' own deadlines, shutdown or not.
                        let answered = tokio::select! {
                            answered = drain_answers(&mut answering, &tx) => answered,
                            _ = tx.closed() => false,
                        };
                        if answered {
                            let _ = tx.send(Err(status)).await;
                        }
                        drain = false;
                        break;
                    }
                    None => break,
                };
                let started = Instant::now();
                let metrics = Arc::clone(&service.ctx.metrics);
                metrics.produce_requests.add(1);
                let request_id = req.request_id;
                let span = produce_span(&req);
                match Self::check_request(&req) {
                    Ok(acks) => {
                        // A client that gave up on the stream (its request timed out) may
                        // already be resending these batches elsewhere, or renumbering them:
                        // what it abandoned is not queued after it left. (A part queued before
                        // the reset arrived still appends; sequences and epochs judge it.)
                        let queued = async {
                            let prepared = service
                                .prepare(req, acks, Some(&mut sequences))
                                .instrument(span.clone())
                                .await;
                            // Waits while the partitions' queued bytes are full: the stream
                            // reads nothing meanwhile, and flow control holds its client.
                            ProduceService::enqueue(acks, prepared, &share, None)
                                .instrument(span.clone())
                                .await
                        };
                        // Answers of earlier requests (other partitions' among them) go out
                        // while this one waits for room: a client counts a request that stays
                        // unanswered past its timeout as a broken link.
                        let parts = {
                            tokio::pin!(queued);
                            loop {
                                let event = tokio::select! {
                                    biased;
                                    parts = &mut queued => QueueEvent::Queued(parts),
                                    Some(response) = answering.next(), if !answering.is_empty() => QueueEvent::Answer(response),
                                    _ = tx.closed() => QueueEvent::Gone,
                                };
                                match event {
                                    QueueEvent::Queued(parts) => break Some(parts),
                                    QueueEvent::Answer(response) => {
                                        if tx.send(Ok(response)).await.is_err() {
                                            break None;
                                        }
                                    }
                                    QueueEvent::Gone => break None,
                                }
                            }
                        };
                        let Some(parts) = parts else {
                            drain = false;
                            break;
                        };
                        drop(share);
                        answering.push(Box::pin(
                            async move {
                                let response = ProduceService::collect(request_id, parts, &metrics).await;
                                record_offsets(&tracing::Span::current(), &response);
                                metrics.produce_latency.observe(started.elapsed());
                                response
                            }
                            .instrument(span),
                        ));
                    }
                    Err(e) => {
                        metrics.request_failed(e.error_code());
                        let response = ProduceService::error_response(request_id, &req, &e);
                        if tx.send(Ok(response)).await.is_err() {
                            drain = false;
                            break;
                        }
                    }
                }
            }
            if drain {
                // Bounded by the partitions' own deadlines: every queued part is answered.
                drain_answers(&mut answering, &tx).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_batches::batch_of;

    #[test]
    fn compressed_batches_reserve_what_they_declare_within_the_limit() {
        let zstd = batch_of(Compression::Zstd, 4 << 20);
        let plain = batch_of(Compression::None, 4 << 10);
        assert!(inflating_bytes(std::slice::from_ref(&zstd), 32 << 20) >= 4 << 20);
        assert_eq!(
            inflating_bytes(std::slice::from_ref(&zstd), 1 << 20),
            1 << 20,
            "capped at the limit"
        );
        assert_eq!(
            inflating_bytes(std::slice::from_ref(&plain), 32 << 20),
            0,
            "already in memory"
        );
        let one = |b: &Bytes| heavy(std::iter::once((std::slice::from_ref(b), b.len())));
        assert!(one(&zstd), "a compressed batch is checked off the reactor");
        assert!(!one(&plain), "a small plain one in place");
    }

    #[test]
    fn a_request_is_heavy_by_the_bytes_of_all_its_parts() {
        // Each part is below the limit on its own; together they are over it.
        let batch = batch_of(Compression::None, 600 << 10);
        let parts = [std::slice::from_ref(&batch), std::slice::from_ref(&batch)];
        assert!(!heavy(parts[..1].iter().map(|b| (*b, b[0].len()))), "one part in place");
        assert!(
            heavy(parts.iter().map(|b| (*b, b[0].len()))),
            "two parts off the reactor"
        );
        // Plain records count too: the broker packs them when it validates.
        assert!(heavy(std::iter::once((&[][..], 2 << 20))), "2 MiB of plain records");
    }

    #[test]
    fn empty_plain_records_still_weigh_what_packing_them_costs() {
        let empty = vec![pb::Record::default(); 100_000];
        assert!(plain_bytes(&empty) > INLINE_VALIDATION_BYTES, "1.6 MB of packing");
        let record = pb::Record {
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from(vec![0u8; 100])),
            ..Default::default()
        };
        assert_eq!(plain_bytes(&[record]), PACKED_RECORD_OVERHEAD + 101);
    }

    #[test]
    fn a_request_of_many_compressed_batches_reserves_only_its_largest_one() {
        let batches: Vec<Bytes> = (0..16).map(|_| batch_of(Compression::Zstd, 2 << 20)).collect();
        let one = inflating_bytes(&batches[..1], 32 << 20);
        assert_eq!(
            inflating_bytes(&batches, 32 << 20),
            one,
            "batches are inflated one at a time, so sixteen hold no more than one"
        );
    }
}
