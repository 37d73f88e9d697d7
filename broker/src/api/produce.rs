//! The `Produce` service: unary and pipelined (bidirectional stream) produce.
//!
//! Every batch of a request is validated (CRC, lengths, counts, `max.message.bytes`) before
//! any is queued, so a bad request changes nothing. On a stream, requests are queued to their
//! partitions in the order they arrive, which keeps per-partition order across pipelined
//! requests; answers go back as each request meets its acks.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use conveyor_proto::v1::produce_server::Produce;
use conveyor_proto::v1::{self as pb, ProduceRequest, ProduceResponse};
use conveyor_storage::batch::{self, BatchBuilder, Compression, Record, ValidatedBatch};
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Context;
use crate::error::{BrokerError, Result};
use crate::partition::{Acks, AppendOutcome, Partition};

/// Responses buffered per produce stream before the stream handler waits for the client.
const STREAM_RESPONSE_BUFFER: usize = 256;

#[derive(Debug, Clone)]
pub struct ProduceService {
    pub ctx: Arc<Context>,
}

/// A queued part of a request and, unless acks=none, where its answer will arrive.
type Queued = (Arc<Partition>, Option<oneshot::Receiver<Result<AppendOutcome>>>);

/// A request after validation: what to queue where.
struct Prepared {
    acks: Acks,
    parts: Vec<(Arc<Partition>, Vec<ValidatedBatch>)>,
}

fn acks_of(value: i32) -> Result<Acks> {
    match pb::Acks::try_from(value) {
        Ok(pb::Acks::None) => Ok(Acks::None),
        Ok(pb::Acks::Leader) => Ok(Acks::Leader),
        Ok(pb::Acks::All | pb::Acks::Unspecified) => Ok(Acks::All),
        Err(_) => Err(BrokerError::InvalidRequest(format!("unknown acks value {value}"))),
    }
}

/// Packs plain protobuf records into one batch for clients without the batch encoder.
fn pack_records(records: Vec<pb::Record>) -> std::result::Result<Bytes, conveyor_storage::BatchError> {
    let now = conveyor_storage::unix_millis();
    let mut builder = BatchBuilder::new(Compression::None);
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

impl ProduceService {
    fn prepare(&self, req: ProduceRequest) -> Result<Prepared> {
        let acks = acks_of(req.acks)?;
        if req.partitions.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "a produce request needs at least one partition".into(),
            ));
        }
        let mut parts = Vec::with_capacity(req.partitions.len());
        for pp in req.partitions {
            let topic = self.ctx.registry.get(&pp.topic)?;
            let partition = Arc::clone(topic.partition(pp.partition)?);
            let limit = topic.effective.max_message_bytes as usize;
            let mut batches = pp.batches;
            if !pp.records.is_empty() {
                batches
                    .push(pack_records(pp.records).map_err(|e| BrokerError::from_batch(&pp.topic, pp.partition, e))?);
            }
            if batches.is_empty() {
                return Err(BrokerError::InvalidRequest(format!(
                    "topic '{}' partition {}: no batches or records",
                    pp.topic, pp.partition
                )));
            }
            let validated = batches
                .into_iter()
                .map(|b| ValidatedBatch::new(b, limit))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| BrokerError::from_batch(&pp.topic, pp.partition, e))?;
            parts.push((partition, validated));
        }
        Ok(Prepared { acks, parts })
    }

    /// Queues every part; returns receivers to await (none with acks=none).
    async fn enqueue(prepared: Prepared) -> Result<Vec<Queued>> {
        let mut waits = Vec::with_capacity(prepared.parts.len());
        for (partition, batches) in prepared.parts {
            let rx = partition.enqueue(batches, prepared.acks).await?;
            let rx = (prepared.acks != Acks::None).then_some(rx);
            waits.push((partition, rx));
        }
        Ok(waits)
    }

    async fn collect(request_id: u64, waits: Vec<Queued>) -> ProduceResponse {
        let mut partitions = Vec::with_capacity(waits.len());
        for (partition, rx) in waits {
            let mut result = pb::PartitionProduceResult {
                topic: partition.topic.clone(),
                partition: partition.index,
                ..Default::default()
            };
            if let Some(rx) = rx {
                match rx.await.unwrap_or(Err(BrokerError::ShuttingDown)) {
                    Ok(o) => {
                        result.base_offset = o.base_offset;
                        result.last_offset = o.last_offset;
                    }
                    Err(e) => result.error = Some(e.detail()),
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

type ResponseStream = Pin<Box<dyn Stream<Item = std::result::Result<ProduceResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Produce for ProduceService {
    async fn produce(
        &self,
        request: Request<ProduceRequest>,
    ) -> std::result::Result<Response<ProduceResponse>, Status> {
        let started = Instant::now();
        let metrics = &self.ctx.metrics;
        metrics.produce_requests.add(1);
        let req = request.into_inner();
        let request_id = req.request_id;
        let waits = match self.prepare(req) {
            Ok(p) => Self::enqueue(p).await,
            Err(e) => Err(e),
        }
        .map_err(|e| {
            metrics.request_errors.add(1);
            Status::from(e)
        })?;
        let response = Self::collect(request_id, waits).await;
        metrics.produce_latency.observe(started.elapsed());
        Ok(Response::new(response))
    }

    type ProduceStreamStream = ResponseStream;

    async fn produce_stream(
        &self,
        request: Request<Streaming<ProduceRequest>>,
    ) -> std::result::Result<Response<Self::ProduceStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_RESPONSE_BUFFER);
        let service = self.clone();
        tokio::spawn(async move {
            while let Some(next) = inbound.next().await {
                let req = match next {
                    Ok(r) => r,
                    Err(status) => {
                        tracing::debug!(%status, "produce stream ended by the client");
                        break;
                    }
                };
                let started = Instant::now();
                let metrics = Arc::clone(&service.ctx.metrics);
                metrics.produce_requests.add(1);
                let request_id = req.request_id;
                let summary = ProduceRequest {
                    partitions: req
                        .partitions
                        .iter()
                        .map(|p| pb::PartitionProduce {
                            topic: p.topic.clone(),
                            partition: p.partition,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                };
                let queued = match service.prepare(req) {
                    Ok(p) => ProduceService::enqueue(p).await,
                    Err(e) => Err(e),
                };
                match queued {
                    Ok(waits) => {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let response = ProduceService::collect(request_id, waits).await;
                            metrics.produce_latency.observe(started.elapsed());
                            let _ = tx.send(Ok(response)).await;
                        });
                    }
                    Err(e) => {
                        metrics.request_errors.add(1);
                        if tx
                            .send(Ok(ProduceService::error_response(request_id, &summary, &e)))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
