//! Sends sealed batches to their partitions' leaders and resolves their deliveries.
//!
//! Each leader gets one `ProduceStream` (a link); batches go out in the order they were
//! sealed, several requests in flight per link. A batch that fails with a retriable error
//! (the broker is not the leader, an election is under way, the link broke) teaches the
//! client where the leader is, waits `retry_backoff`, and is resent ahead of newer batches,
//! up to `retries` times or until `delivery_timeout`.

use std::collections::{BTreeMap, HashMap, VecDeque};

use conveyor_proto::v1::produce_client::ProduceClient;
use conveyor_proto::v1::{self as pb, ProduceRequest, ProduceResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{StreamExt, StreamMap};
use tonic::Streaming;

use super::{Acks, ProducerConfig, Sealed};
use crate::error::ClientError;
use crate::{Client, MAX_MESSAGE_BYTES};

/// Batches packed into one produce request at most.
const MAX_BATCHES_PER_REQUEST: usize = 32;
/// Bytes packed into one produce request at most (the broker accepts 64 MiB messages).
const MAX_REQUEST_BYTES: usize = 16 << 20;
/// How often in-flight batches are checked against `delivery_timeout`.
const TIMEOUT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// One produce stream to one broker.
struct Link {
    requests: mpsc::Sender<ProduceRequest>,
    inflight: usize,
}

struct State {
    client: Client,
    config: ProducerConfig,
    /// Request id → the link's address and the request's batches.
    inflight: BTreeMap<u64, (String, Vec<Sealed>)>,
    /// Batches to send, in sealing order (retries go back in by their sequence).
    queue: VecDeque<Sealed>,
    links: HashMap<String, Link>,
    next_id: u64,
    /// A retry was queued since the last pause.
    backoff: bool,
}

impl State {
    fn acks(&self) -> i32 {
        match self.config.acks {
            Acks::None => pb::Acks::None as i32,
            Acks::Leader => pb::Acks::Leader as i32,
            Acks::All => pb::Acks::All as i32,
        }
    }

    /// Counts an attempt; fails the batch if it has none left, else queues it for resending
    /// in its place by sealing order.
    fn retry_or_fail(&mut self, mut batch: Sealed, error: ClientError) {
        self.client.cluster().on_error(&batch.topic, batch.partition, &error);
        batch.attempts += 1;
        let in_time = batch.sealed_at.elapsed() < self.config.delivery_timeout;
        if error.is_retriable() && batch.attempts <= self.config.retries && in_time {
            tracing::debug!(topic = %batch.topic, partition = batch.partition, attempt = batch.attempts, %error, "retrying batch");
            let at = self.queue.partition_point(|b| b.seq < batch.seq);
            self.queue.insert(at, batch);
            self.backoff = true;
        } else {
            batch.complete(Err(error));
        }
    }

    /// A link failed: everything in flight on it is retried.
    fn link_broke(&mut self, address: &str, error: &ClientError) {
        self.links.remove(address);
        let ids: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, (a, _))| a == address)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some((_, batches)) = self.inflight.remove(&id) {
                for batch in batches {
                    self.retry_or_fail(batch, error.clone());
                }
            }
        }
    }

    fn on_response(&mut self, response: ProduceResponse) {
        let Some((address, batches)) = self.inflight.remove(&response.request_id) else {
            tracing::warn!(request_id = response.request_id, "answer to an unknown produce request");
            return;
        };
        if let Some(link) = self.links.get_mut(&address) {
            link.inflight = link.inflight.saturating_sub(1);
        }
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

    /// Sends queued batches to their leaders while links have room.
    async fn dispatch(&mut self, responses: &mut StreamMap<String, Streaming<ProduceResponse>>) {
        let max_inflight = self.config.max_in_flight_requests.max(1);
        while let Some(front) = self.queue.front() {
            let (topic, partition) = (front.topic.clone(), front.partition);
            let route = match self.client.cluster().route(&topic, partition).await {
                Ok(route) => route,
                Err(e) => {
                    if let Some(batch) = self.queue.pop_front() {
                        self.retry_or_fail(batch, e);
                    }
                    return;
                }
            };
            if !self.links.contains_key(&route.address) {
                match open_link(route.channel.clone(), max_inflight).await {
                    Ok((requests, stream)) => {
                        responses.insert(route.address.clone(), stream);
                        self.links.insert(route.address.clone(), Link { requests, inflight: 0 });
                    }
                    Err(e) => {
                        let e = e.at(&route.address);
                        if let Some(batch) = self.queue.pop_front() {
                            self.retry_or_fail(batch, e);
                        }
                        return;
                    }
                }
            }
            if self
                .links
                .get(&route.address)
                .is_some_and(|l| l.inflight >= max_inflight)
            {
                return;
            }
            // Pack the batches at the front that go to the same leader.
            let mut batches: Vec<Sealed> = self.queue.pop_front().into_iter().collect();
            let mut bytes: usize = batches.iter().map(|b| b.bytes.len()).sum();
            while batches.len() < MAX_BATCHES_PER_REQUEST && bytes < MAX_REQUEST_BYTES {
                let same = self
                    .queue
                    .front()
                    .is_some_and(|b| self.client.cluster().leader_is(&b.topic, b.partition, &route.address));
                match self.queue.pop_front() {
                    Some(b) if same => {
                        bytes += b.bytes.len();
                        batches.push(b);
                    }
                    Some(b) => {
                        self.queue.push_front(b);
                        break;
                    }
                    None => break,
                }
            }
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
            self.inflight.insert(self.next_id, (route.address.clone(), batches));
            let sent = match self.links.get_mut(&route.address) {
                Some(link) => {
                    link.inflight += 1;
                    link.requests.send(request).await.is_ok()
                }
                None => false,
            };
            if !sent {
                let error = ClientError::Unreachable {
                    address: route.address.clone(),
                    reason: "the produce stream closed".into(),
                };
                self.link_broke(&route.address, &error);
                return;
            }
        }
    }

    /// Links whose batches passed their delivery timeout without an answer (a stopped
    /// broker, a dead link) are given up on, so their batches fail or move on in time.
    fn expire(&mut self) {
        let timeout = self.config.delivery_timeout;
        let expired: Vec<String> = self
            .inflight
            .values()
            .filter(|(_, batches)| batches.iter().any(|b| b.sealed_at.elapsed() >= timeout))
            .map(|(a, _)| a.clone())
            .collect();
        for address in expired {
            self.link_broke(&address, &ClientError::Timeout(timeout));
        }
    }
}

async fn open_link(
    channel: tonic::transport::Channel,
    depth: usize,
) -> Result<(mpsc::Sender<ProduceRequest>, Streaming<ProduceResponse>), ClientError> {
    let (requests, outgoing) = mpsc::channel::<ProduceRequest>(depth);
    let mut grpc = ProduceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let responses = grpc.produce_stream(ReceiverStream::new(outgoing)).await?.into_inner();
    Ok((requests, responses))
}

/// The sender task: runs until the producer is dropped and everything sent is answered.
pub(crate) async fn run(client: Client, config: ProducerConfig, mut input: mpsc::Receiver<Sealed>) {
    let backoff = config.retry_backoff;
    let mut state = State {
        client,
        config,
        inflight: BTreeMap::new(),
        queue: VecDeque::new(),
        links: HashMap::new(),
        next_id: 0,
        backoff: false,
    };
    let mut responses: StreamMap<String, Streaming<ProduceResponse>> = StreamMap::new();
    let mut input_open = true;
    let mut expiry = tokio::time::interval(TIMEOUT_CHECK);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if std::mem::take(&mut state.backoff) {
            tokio::time::sleep(backoff).await;
        }
        state.dispatch(&mut responses).await;
        if !input_open && state.inflight.is_empty() && state.queue.is_empty() {
            return;
        }
        let can_read = input_open && state.queue.is_empty();
        tokio::select! {
            biased;
            Some((address, message)) = responses.next(), if !responses.is_empty() => match message {
                Ok(response) => state.on_response(response),
                Err(status) => {
                    responses.remove(&address);
                    // A stream that fails without the broker's own error detail is a broken
                    // connection (the broker died or the link dropped): retriable.
                    let error = match ClientError::from(status) {
                        e @ ClientError::Broker { detail: Some(_), .. } => e,
                        ClientError::Broker { message, .. } => ClientError::Unreachable { address: address.clone(), reason: message },
                        e => e.at(&address),
                    };
                    state.link_broke(&address, &error);
                }
            },
            next = input.recv(), if can_read => match next {
                Some(first) => {
                    state.queue.push_back(first);
                    while state.queue.len() < MAX_BATCHES_PER_REQUEST {
                        match input.try_recv() {
                            Ok(b) => state.queue.push_back(b),
                            Err(_) => break,
                        }
                    }
                }
                None => input_open = false,
            },
            // An interval, not a fresh sleep per pass: steady traffic must not postpone it.
            _ = expiry.tick(), if !state.inflight.is_empty() || !state.queue.is_empty() => state.expire(),
        }
        // A stream that ended without an error leaves its link without answers.
        let ended: Vec<String> = state
            .links
            .keys()
            .filter(|a| !responses.contains_key(*a))
            .cloned()
            .collect();
        let orphaned: Vec<String> = responses
            .keys()
            .filter(|a| !state.links.contains_key(*a))
            .cloned()
            .collect();
        for address in orphaned {
            responses.remove(&address);
        }
        for address in ended {
            let error = ClientError::Unreachable {
                address: address.clone(),
                reason: "the produce stream closed".into(),
            };
            state.link_broke(&address, &error);
        }
    }
}
