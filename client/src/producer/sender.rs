//! Sends sealed batches over one `ProduceStream` and resolves their deliveries.
//!
//! Requests go out in the order batches were sealed; several may be in flight. Batches that
//! fail with a retriable error, or that were in flight when the stream broke, are resent in
//! their original order after `retry_backoff`, up to `retries` times.

use std::collections::{BTreeMap, VecDeque};

use conveyor_proto::v1::produce_client::ProduceClient;
use conveyor_proto::v1::{self as pb, ProduceRequest, ProduceResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Acks, ProducerConfig, Sealed};
use crate::error::ClientError;
use crate::{Client, MAX_MESSAGE_BYTES};

/// Batches packed into one produce request at most.
const MAX_BATCHES_PER_REQUEST: usize = 32;
/// Bytes packed into one produce request at most (the broker accepts 64 MiB messages).
const MAX_REQUEST_BYTES: usize = 16 << 20;
/// How often in-flight batches are checked against `delivery_timeout`.
const TIMEOUT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

struct State {
    config: ProducerConfig,
    inflight: BTreeMap<u64, Vec<Sealed>>,
    retry: VecDeque<Sealed>,
    next_id: u64,
}

impl State {
    fn acks(&self) -> i32 {
        match self.config.acks {
            Acks::None => pb::Acks::None as i32,
            Acks::Leader => pb::Acks::Leader as i32,
            Acks::All => pb::Acks::All as i32,
        }
    }

    /// Counts an attempt; fails the batch if it has none left, else queues it for resending.
    fn retry_or_fail(&mut self, mut batch: Sealed, error: ClientError) {
        batch.attempts += 1;
        let in_time = batch.sealed_at.elapsed() < self.config.delivery_timeout;
        if error.is_retriable() && batch.attempts <= self.config.retries && in_time {
            tracing::debug!(topic = %batch.topic, partition = batch.partition, attempt = batch.attempts, %error, "retrying batch");
            self.retry.push_back(batch);
        } else {
            batch.complete(Err(error));
        }
    }

    /// Everything in flight goes back to the front of the retry queue, oldest first.
    fn requeue_inflight(&mut self, error: &ClientError) {
        let inflight = std::mem::take(&mut self.inflight);
        let mut retry = std::mem::take(&mut self.retry);
        for batch in inflight.into_values().flatten().rev() {
            retry.push_front(batch);
        }
        for batch in retry {
            self.retry_or_fail(batch, error.clone());
        }
    }

    fn request(&mut self, batches: Vec<Sealed>) -> ProduceRequest {
        self.next_id += 1;
        let request = ProduceRequest {
            request_id: self.next_id,
            acks: self.acks(),
            partitions: batches
                .iter()
                .map(|b| pb::PartitionProduce {
                    topic: b.topic.to_string(),
                    partition: b.partition,
                    batches: vec![b.bytes.clone()],
                    records: vec![],
                })
                .collect(),
        };
        self.inflight.insert(self.next_id, batches);
        request
    }

    fn on_response(&mut self, response: ProduceResponse) {
        let Some(batches) = self.inflight.remove(&response.request_id) else {
            tracing::warn!(request_id = response.request_id, "answer to an unknown produce request");
            return;
        };
        let mut results = response.partitions.into_iter();
        for batch in batches {
            match results.next() {
                Some(r) if r.error.is_none() => {
                    let base = (self.config.acks != Acks::None).then_some(r.base_offset);
                    batch.complete(Ok(base));
                }
                Some(r) => {
                    let error = ClientError::from_detail(r.error.unwrap_or_default());
                    self.retry_or_fail(batch, error);
                }
                None => self.retry_or_fail(batch, ClientError::InvalidArgument("the broker skipped a batch".into())),
            }
        }
    }
}

/// The sender task: runs until the producer is dropped and everything sent is answered.
pub(crate) async fn run(client: Client, config: ProducerConfig, mut input: mpsc::Receiver<Sealed>) {
    let max_inflight = config.max_in_flight_requests.max(1);
    let backoff = config.retry_backoff;
    let mut state = State {
        config,
        inflight: BTreeMap::new(),
        retry: VecDeque::new(),
        next_id: 0,
    };
    let mut input_open = true;
    loop {
        if !input_open && state.inflight.is_empty() && state.retry.is_empty() {
            return;
        }
        let (requests, outgoing) = mpsc::channel::<ProduceRequest>(max_inflight);
        let mut grpc = ProduceClient::new(client.channel())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut responses = match grpc.produce_stream(ReceiverStream::new(outgoing)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                // No stream: batches waiting to be sent count an attempt too, so that they
                // fail after `retries` or `delivery_timeout` instead of waiting forever.
                let error = ClientError::from(status);
                state.requeue_inflight(&error);
                while let Ok(batch) = input.try_recv() {
                    state.retry_or_fail(batch, error.clone());
                }
                tokio::time::sleep(backoff).await;
                continue;
            }
        };
        let broken = loop {
            while state.inflight.len() < max_inflight && !state.retry.is_empty() {
                let batch = state.retry.pop_front().into_iter().collect();
                let request = state.request(batch);
                if requests.send(request).await.is_err() {
                    break;
                }
            }
            if !input_open && state.inflight.is_empty() && state.retry.is_empty() {
                return;
            }
            let can_send = input_open && state.inflight.len() < max_inflight && state.retry.is_empty();
            tokio::select! {
                biased;
                message = responses.message() => match message {
                    Ok(Some(response)) => state.on_response(response),
                    Ok(None) => break ClientError::Unreachable { address: client.address().to_string(), reason: "the produce stream closed".into() },
                    Err(status) => break ClientError::from(status),
                },
                next = input.recv(), if can_send => match next {
                    Some(first) => {
                        let mut bytes = first.bytes.len();
                        let mut batch = vec![first];
                        while batch.len() < MAX_BATCHES_PER_REQUEST && bytes < MAX_REQUEST_BYTES {
                            match input.try_recv() {
                                Ok(b) => {
                                    bytes += b.bytes.len();
                                    batch.push(b);
                                }
                                Err(_) => break,
                            }
                        }
                        let request = state.request(batch);
                        if requests.send(request).await.is_err() {
                            break ClientError::Unreachable { address: client.address().to_string(), reason: "the produce stream closed".into() };
                        }
                    }
                    None => input_open = false,
                },
                // A stream that stopped answering (a stopped broker, a dead link) must not hold
                // batches forever: past their delivery timeout they fail.
                _ = tokio::time::sleep(TIMEOUT_CHECK), if !state.inflight.is_empty() => {
                    let timeout = state.config.delivery_timeout;
                    let expired = state.inflight.values().flatten().any(|b| b.sealed_at.elapsed() >= timeout);
                    if expired {
                        break ClientError::Timeout(timeout);
                    }
                }
            }
            if !state.retry.is_empty() {
                tokio::time::sleep(backoff).await;
            }
        };
        tracing::debug!(error = %broken, "produce stream broke; resending in-flight batches");
        state.requeue_inflight(&broken);
        tokio::time::sleep(backoff).await;
    }
}
