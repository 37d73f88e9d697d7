//! Sends sealed batches to their partitions' leaders and resolves their deliveries.
//!
//! Each leader gets one `ProduceStream` (a link); batches go out in the order they were
//! sealed, several requests in flight per link. A batch that fails with a retriable error
//! (the broker is not the leader, an election is under way, the link broke) teaches the
//! client where the leader is, waits `retry_backoff`, and is resent ahead of newer batches,
//! up to `retries` times or until `delivery_timeout`.
//!
//! # Order across failures
//! A retried batch must not land behind a later batch of its partition. Two rules keep it:
//! - A partition's batches are in flight on one link at a time. When its leader moves, its
//!   batches wait until everything sent to the old leader is answered, or abandoned with a
//!   broken or timed-out link (the old leader may still append those: only idempotence
//!   keeps that from reordering or duplicating).
//! - On a link, a partition's batches are numbered (`PartitionProduce.sequence`). The broker
//!   appends a numbered batch only if the one before it was appended, so when one is refused
//!   the rest of its run is refused too. The partition then sends nothing until every batch
//!   of the run is answered, and resends from the first refused batch as a new run
//!   (`restart`).
//!
//! An idempotent producer does not number its parts: the batch sequence numbers give the
//! same guarantee (the broker refuses a batch after a refused one with OUT_OF_ORDER_SEQUENCE),
//! and it also keeps at most 5 batches of a partition in flight (see `idempotence` and
//! `docs/producer.md`). What each error does there:
//! - OUT_OF_ORDER_SEQUENCE or UNKNOWN_PRODUCER_ID for a batch with an earlier one of its
//!   partition unresolved: as OUT_OF_SEQUENCE, not an attempt.
//! - UNKNOWN_PRODUCER_ID for the first outstanding batch, or OUT_OF_ORDER_SEQUENCE for it
//!   after a batch that failed for good: the partition resets (same id, next epoch, its
//!   waiting batches numbered from 0) once nothing of it is in flight; the records of
//!   renumbered batches that had been sent count as unvouched. OUT_OF_ORDER_SEQUENCE for it
//!   otherwise: nothing of ours explains it, an attempt with backoff.
//! - A sequenced batch failing for good changes nothing by itself (`idempotence`).
//! - PRODUCER_FENCED for the partition's current identity: the producer stops for good;
//!   every batch still queued and every later send fails. For an identity the partition has
//!   left (an older epoch): only that batch fails.
//! - INVALID_PRODUCER_ID: retried (the broker may not have learned of the id yet).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use conveyor_proto::v1::produce_client::ProduceClient;
use conveyor_proto::v1::{self as pb, ErrorCode, ProduceRequest, ProduceResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{StreamExt, StreamMap};
use tonic::Streaming;

use super::idempotence::{MAX_IN_FLIGHT_PER_PARTITION, ProducerIdentity, ResetCause, Sequencer, Stamp, Status};
use super::{Acks, ProducerConfig, Sealed, key_of};
use crate::cluster::Route;
use crate::error::ClientError;
use crate::{Client, MAX_MESSAGE_BYTES, UNKNOWN_TOPIC_WAIT};

/// Batches packed into one produce request at most.
const MAX_BATCHES_PER_REQUEST: usize = 32;
/// Bytes packed into one produce request at most (the broker accepts 64 MiB messages).
const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Batches queued in the sender at most; beyond this it stops taking sealed batches, and
/// the producer's in-flight budget makes `send` wait.
const MAX_QUEUED: usize = 256;
/// How often in-flight batches are checked against `delivery_timeout`.
const TIMEOUT_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) use super::PartitionKey;

/// One produce stream to one broker.
struct Link {
    requests: mpsc::Sender<ProduceRequest>,
    inflight: usize,
}

/// Where a partition's batches are in flight, and how its parts are numbered.
struct Flight {
    /// Batches sent and not answered yet, all on the link to `address`.
    inflight: usize,
    address: String,
    /// The number the next part of this partition gets. Numbers are never reused, so a
    /// broker's counter from an earlier run can never match a later part by chance.
    next_sequence: u64,
    /// A batch of this run was refused: the broker refuses the rest of the run, so nothing
    /// more is sent until every batch of it is answered and a new run can start.
    broken: bool,
}

impl Default for Flight {
    fn default() -> Self {
        Flight {
            inflight: 0,
            address: String::new(),
            next_sequence: 1,
            broken: false,
        }
    }
}

/// A request being packed for one link.
struct Packing {
    request: ProduceRequest,
    batches: Vec<Sealed>,
    bytes: usize,
}

struct State {
    client: Client,
    config: ProducerConfig,
    /// Request id → the link's address, the request's batches and when it was sent.
    inflight: BTreeMap<u64, (String, Vec<Sealed>, Instant)>,
    /// Partitions with a batch put back in the queue since the current dispatch pass began:
    /// their later batches must not go out before it.
    requeued: HashSet<PartitionKey>,
    /// Batches to send, in sealing order (retries go back in by their sequence).
    queue: VecDeque<Sealed>,
    links: HashMap<String, Link>,
    flights: HashMap<PartitionKey, Flight>,
    next_id: u64,
    /// A retry was queued since the last pause.
    backoff: bool,
    /// Shared with the producer handles: stopped for good, unvouched records.
    status: Arc<Status>,
    /// Producer ids and sequences per partition; `None` without idempotence.
    sequencer: Option<Sequencer>,
    /// Where `InitProducer` answers arrive, and whether one is awaited.
    ids: mpsc::Sender<Result<ProducerIdentity, ClientError>>,
    requesting_id: bool,
    /// Why the last `InitProducer` failed: what a batch that times out waiting for an id
    /// fails with.
    id_error: Option<ClientError>,
    /// `InitProducer` failures in a row: the pause before asking again doubles with each.
    id_failures: u32,
}

impl State {
    fn new(
        client: Client,
        config: ProducerConfig,
        status: Arc<Status>,
        ids: mpsc::Sender<Result<ProducerIdentity, ClientError>>,
    ) -> State {
        State {
            sequencer: config.idempotence.then(Sequencer::default),
            status,
            ids,
            requesting_id: false,
            id_error: None,
            id_failures: 0,
            client,
            config,
            inflight: BTreeMap::new(),
            requeued: HashSet::new(),
            queue: VecDeque::new(),
            links: HashMap::new(),
            flights: HashMap::new(),
            next_id: 0,
            backoff: false,
        }
    }

    fn acks(&self) -> i32 {
        match self.config.acks {
            Acks::None => pb::Acks::None as i32,
            Acks::Leader => pb::Acks::Leader as i32,
            Acks::All => pb::Acks::All as i32,
        }
    }

    /// Puts a batch back in its place by sealing order.
    fn requeue(&mut self, batch: Sealed) {
        self.requeued.insert(key_of(&batch));
        let at = self.queue.partition_point(|b| b.seq < batch.seq);
        self.queue.insert(at, batch);
    }

    /// Counts an attempt; fails the batch if it has none left, else queues it for resending
    /// in its place by sealing order.
    fn retry_or_fail(&mut self, mut batch: Sealed, error: ClientError) {
        if let Some(flight) = self.flights.get_mut(&key_of(&batch)) {
            flight.broken = true;
        }
        let code = error.code();
        if self.sequence_refusal(&batch, code) {
            if batch.sealed_at.elapsed() < self.config.delivery_timeout {
                self.requeue(batch);
            } else {
                self.fail(batch, ClientError::Timeout(self.config.delivery_timeout));
            }
            return;
        }
        if code == Some(ErrorCode::ProducerFenced) {
            if self.sequencer.as_ref().is_some_and(|s| s.superseded(&batch)) {
                // The partition left that epoch: this copy was refused, the partition goes
                // on under its newer one.
                tracing::debug!(topic = %batch.topic, partition = batch.partition, producer = ?batch.producer, %error, "a batch of an older epoch was fenced");
                self.fail(batch, error);
                return;
            }
            let id = batch.producer.map_or(-1, |p| p.producer_id);
            self.status.stop(
                format!(
                    "producer id {id} was fenced by a newer epoch on {}[{}]: {error}",
                    batch.topic, batch.partition
                ),
                code,
            );
            batch.complete(Err(error));
            return;
        }
        self.client.cluster().on_error(&batch.topic, batch.partition, &error);
        batch.attempts += 1;
        let in_time = batch.sealed_at.elapsed() < self.config.delivery_timeout;
        // The topic existed when the batch was made: a broker that does not know it yet has
        // not applied its creation (Kafka's producer retries this too), for a short while.
        let not_yet_known = matches!(
            error.code(),
            Some(ErrorCode::UnknownTopic | ErrorCode::UnknownPartition)
        ) && batch.sealed_at.elapsed() < UNKNOWN_TOPIC_WAIT;
        // INVALID_PRODUCER_ID comes retriable: the broker may not have learned of a newly
        // issued id yet.
        let retriable = error.is_retriable() || not_yet_known;
        if retriable && batch.attempts <= self.config.retries && in_time {
            tracing::debug!(topic = %batch.topic, partition = batch.partition, attempt = batch.attempts, %error, "retrying batch");
            self.requeue(batch);
            self.backoff = true;
        } else {
            self.fail(batch, error);
        }
    }

    /// Whether `code` refused `batch` for sequence reasons, so that it goes back to the
    /// queue without counting as an attempt: it was refused only because an earlier batch of
    /// its run was (nothing to learn about the leader), or the refusal means that its
    /// partition must reset (see `idempotence`). False for an
    /// OUT_OF_ORDER_SEQUENCE that nothing of ours explains: an attempt, with backoff.
    fn sequence_refusal(&mut self, batch: &Sealed, code: Option<ErrorCode>) -> bool {
        if code == Some(ErrorCode::OutOfSequence) {
            return true;
        }
        if !matches!(code, Some(ErrorCode::OutOfOrderSequence | ErrorCode::UnknownProducerId)) {
            return false;
        }
        let Some(sequencer) = self.sequencer.as_mut() else {
            return true;
        };
        // An earlier batch of ours is unresolved (refused BUSY, say, or on its way): the
        // broker judged this one without it, and may not know the producer yet.
        if !sequencer.is_first_outstanding(batch) {
            return true;
        }
        if code == Some(ErrorCode::UnknownProducerId) {
            sequencer.refused_for_good(batch, ResetCause::UnknownProducerId);
            return true;
        }
        if sequencer.follows_a_failure(batch) {
            sequencer.refused_for_good(batch, ResetCause::Gap);
            return true;
        }
        false
    }

    /// Fails a batch for good. Its partition keeps its producer id: the next batch sent
    /// shows whether this one was written (see `idempotence`).
    fn fail(&mut self, batch: Sealed, error: ClientError) {
        if let Some(sequencer) = self.sequencer.as_mut() {
            sequencer.failed_for_good(&batch);
        }
        batch.complete(Err(error));
    }

    /// A batch that cannot be sent yet (its partition waits for a producer id or a reset) waits in
    /// `held`, unless its delivery timeout has passed.
    fn hold(&mut self, batch: Sealed, held: &mut VecDeque<Sealed>) {
        if batch.sealed_at.elapsed() < self.config.delivery_timeout {
            held.push_back(batch);
        } else {
            let error = self
                .id_error
                .clone()
                .unwrap_or(ClientError::Timeout(self.config.delivery_timeout));
            self.fail(batch, error);
        }
    }

    /// Fails everything queued once the producer stopped for good. True if it did.
    fn fail_all_if_stopped(&mut self) -> bool {
        let Some(error) = self.status.stopped() else {
            return false;
        };
        for batch in std::mem::take(&mut self.queue) {
            batch.complete(Err(error.clone()));
        }
        true
    }

    /// Partitions due a reset take it once nothing of theirs is in flight (or, when their
    /// sequences ran out, once every stamped batch is answered).
    fn reset_idle_partitions(&mut self) {
        let Some(sequencer) = self.sequencer.as_mut() else {
            return;
        };
        for key in sequencer.resets_pending() {
            let idle = self.flights.get(&key).is_none_or(|f| f.inflight == 0);
            if sequencer.ready_to_reset(&key, idle) {
                self.status.add_unvouched(sequencer.reset(&key, &mut self.queue));
            }
        }
    }

    /// Asks for a producer id if a batch of this dispatch pass waits for one and no request
    /// is under way. A failed request is reported only after a pause that doubles with each
    /// failure in a row (from `retry_backoff` to [`MAX_ID_BACKOFF`]), and asked again only
    /// if a batch still waits then: a producer with nothing to send stops asking.
    fn request_id_if_wanted(&mut self) {
        if self.requesting_id || !self.sequencer.as_ref().is_some_and(Sequencer::wants_id) {
            return;
        }
        self.requesting_id = true;
        let pause = id_backoff(self.config.retry_backoff, self.id_failures);
        let (client, answers) = (self.client.clone(), self.ids.clone());
        tokio::spawn(async move {
            let result = client.init_producer().await;
            if result.as_ref().is_err_and(|e| !stops_for_good(e)) {
                tokio::time::sleep(pause).await;
            }
            let _ = answers.send(result).await;
        });
    }

    fn on_id(&mut self, result: Result<ProducerIdentity, ClientError>) {
        self.requesting_id = false;
        match result {
            Ok(identity) => {
                tracing::debug!(producer_id = identity.producer_id, epoch = identity.producer_epoch, "producer id issued");
                self.id_error = None;
                self.id_failures = 0;
                if let Some(sequencer) = self.sequencer.as_mut() {
                    sequencer.issued(identity);
                }
            }
            Err(e) if !stops_for_good(&e) => {
                tracing::warn!(error = %e, failures = self.id_failures + 1, "could not get a producer id; asking again while batches wait for one");
                self.id_error = Some(e);
                self.id_failures = self.id_failures.saturating_add(1);
            }
            Err(e) => self.status.stop(
                format!(
                    "the cluster cannot issue a producer id ({e}); idempotent produce needs brokers that support InitProducer, or a producer with idempotence off"
                ),
                e.code(),
            ),
        }
    }

    /// A batch's request was answered (or will never be).
    fn landed(&mut self, batch: &Sealed) {
        if let Some(flight) = self.flights.get_mut(&key_of(batch)) {
            flight.inflight = flight.inflight.saturating_sub(1);
        }
    }

    /// A link failed: everything in flight on it is retried.
    fn link_broke(&mut self, address: &str, error: &ClientError) {
        self.links.remove(address);
        let ids: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, (a, _, _))| a == address)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some((_, batches, _)) = self.inflight.remove(&id) {
                for batch in batches {
                    self.landed(&batch);
                    self.retry_or_fail(batch, error.clone());
                }
            }
        }
    }

    fn on_response(&mut self, response: ProduceResponse) {
        let Some((address, batches, _)) = self.inflight.remove(&response.request_id) else {
            tracing::warn!(request_id = response.request_id, "answer to an unknown produce request");
            return;
        };
        if let Some(link) = self.links.get_mut(&address) {
            link.inflight = link.inflight.saturating_sub(1);
        }
        let mut results = response.partitions.into_iter();
        for batch in batches {
            self.landed(&batch);
            match results.next() {
                Some(r) if r.error.is_none() => {
                    if let Some(sequencer) = self.sequencer.as_mut() {
                        sequencer.acknowledged(&batch);
                    }
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

    /// Opens a link to `route` unless there is one.
    async fn ensure_link(
        &mut self,
        route: &Route,
        responses: &mut StreamMap<String, Streaming<ProduceResponse>>,
    ) -> Result<(), ClientError> {
        if self.links.contains_key(&route.address) {
            return Ok(());
        }
        let depth = self.config.max_in_flight_requests.max(1);
        let (requests, stream) = open_link(route.channel.clone(), depth)
            .await
            .map_err(|status| ClientError::from_call(status, &route.address))?;
        responses.insert(route.address.clone(), stream);
        self.links.insert(route.address.clone(), Link { requests, inflight: 0 });
        Ok(())
    }

    /// Sends a packed request on its link.
    async fn send(&mut self, address: String, packing: Packing) {
        let Packing {
            mut request, batches, ..
        } = packing;
        self.next_id += 1;
        request.request_id = self.next_id;
        self.inflight
            .insert(request.request_id, (address.clone(), batches, Instant::now()));
        let sent = match self.links.get_mut(&address) {
            Some(link) => {
                link.inflight += 1;
                link.requests.send(request).await.is_ok()
            }
            None => false,
        };
        if !sent {
            let error = ClientError::Unreachable {
                address: address.clone(),
                reason: "the produce stream closed".into(),
            };
            self.link_broke(&address, &error);
        }
    }

    /// Sends queued batches to their leaders while links have room, packing the batches for
    /// one leader into shared requests. A batch stays queued, with every later batch of its
    /// partition, while the link it needs is full or while its partition's earlier batches
    /// are awaiting answers from another link (see the module's "Order across failures").
    async fn dispatch(&mut self, responses: &mut StreamMap<String, Streaming<ProduceResponse>>) {
        let max_inflight = self.config.max_in_flight_requests.max(1);
        if self.fail_all_if_stopped() {
            return;
        }
        if let Some(sequencer) = self.sequencer.as_mut() {
            sequencer.begin_pass();
        }
        self.reset_idle_partitions();
        let queued = std::mem::take(&mut self.queue);
        self.requeued.clear();
        let mut held: VecDeque<Sealed> = VecDeque::new();
        let mut blocked: HashSet<PartitionKey> = HashSet::new();
        let mut routes: HashMap<PartitionKey, Route> = HashMap::new();
        let mut packing: HashMap<String, Packing> = HashMap::new();
        // After a failure to route or connect, only partitions already routed this pass go on:
        // one metadata refresh per pass, not one per partition.
        let mut stalled = false;
        for mut batch in queued {
            let key = key_of(&batch);
            // An earlier batch of the partition went back to the queue during this pass (its
            // link broke): it goes first, next pass.
            if blocked.contains(&key) || self.requeued.contains(&key) {
                held.push_back(batch);
                continue;
            }
            let route = match routes.get(&key) {
                Some(route) => route.clone(),
                None if stalled => {
                    blocked.insert(key);
                    held.push_back(batch);
                    continue;
                }
                None => {
                    let routed = match self.client.cluster().route(&batch.topic, batch.partition).await {
                        Ok(route) => self.ensure_link(&route, responses).await.map(|()| route),
                        Err(e) => Err(e),
                    };
                    match routed {
                        Ok(route) => {
                            routes.insert(key.clone(), route.clone());
                            route
                        }
                        Err(e) => {
                            stalled = true;
                            blocked.insert(key);
                            self.retry_or_fail(batch, e);
                            continue;
                        }
                    }
                }
            };
            let flight = self.flights.entry(key.clone()).or_default();
            let capped = self.sequencer.is_some() && flight.inflight >= MAX_IN_FLIGHT_PER_PARTITION;
            let wait = capped || (flight.inflight > 0 && (flight.broken || flight.address != route.address));
            let room = packing.contains_key(&route.address)
                || self
                    .links
                    .get(&route.address)
                    .is_some_and(|l| l.inflight < max_inflight);
            if wait || !room {
                blocked.insert(key);
                held.push_back(batch);
                continue;
            }
            // Sequenced at its first send, so a partition that has to reset (a new epoch) before
            // then renumbers as few batches as possible.
            if let Some(sequencer) = self.sequencer.as_mut() {
                match sequencer.stamp(&mut batch) {
                    Stamp::Ready => {}
                    Stamp::NeedsId | Stamp::AwaitingReset => {
                        blocked.insert(key);
                        self.hold(batch, &mut held);
                        continue;
                    }
                    Stamp::Failed(e) => {
                        blocked.insert(key);
                        self.fail(batch, e);
                        continue;
                    }
                }
            }
            let idempotent = self.sequencer.is_some();
            let flight = self.flights.entry(key.clone()).or_default();
            if flight.inflight == 0 {
                flight.broken = false;
            }
            let restart = flight.inflight == 0 && !idempotent;
            flight.inflight += 1;
            flight.address.clone_from(&route.address);
            // Without answers (acks=none) a refused part cannot be resent, so numbering would
            // only make the broker drop the rest of its run unseen. Idempotent batches carry
            // their own sequence, which the broker checks instead.
            let sequence = if self.config.acks == Acks::None || idempotent {
                0
            } else {
                flight.next_sequence += 1;
                flight.next_sequence - 1
            };
            let acks = self.acks();
            let pack = packing.entry(route.address.clone()).or_insert_with(|| Packing {
                request: ProduceRequest {
                    request_id: 0,
                    acks,
                    partitions: Vec::new(),
                },
                batches: Vec::new(),
                bytes: 0,
            });
            pack.request.partitions.push(pb::PartitionProduce {
                topic: batch.topic.to_string(),
                partition: batch.partition,
                batches: vec![batch.bytes.clone()],
                records: vec![],
                sequence,
                restart,
                ..Default::default()
            });
            pack.bytes += batch.bytes.len();
            batch.sent = true;
            pack.batches.push(batch);
            if (pack.batches.len() >= MAX_BATCHES_PER_REQUEST || pack.bytes >= MAX_REQUEST_BYTES)
                && let Some(full) = packing.remove(&route.address)
            {
                self.send(route.address.clone(), full).await;
            }
        }
        for (address, pack) in packing {
            self.send(address, pack).await;
        }
        self.request_id_if_wanted();
        // Retries queued during this pass merge with the held batches by sealing order.
        let retried = std::mem::take(&mut self.queue);
        self.queue = merge_by_seq(held, retried);
    }

    /// Links with a request unanswered for the request timeout (a stopped broker, a dead
    /// link) are given up on, so their batches move on, or fail if their delivery timeout has
    /// passed. Counted from sending, not sealing: a batch that waited in the queue must not
    /// tear down a link that answers.
    fn expire(&mut self) {
        let timeout = self.config.request_timeout.min(self.config.delivery_timeout);
        let expired: Vec<String> = self
            .inflight
            .values()
            .filter(|(_, _, sent)| sent.elapsed() >= timeout)
            .map(|(a, _, _)| a.clone())
            .collect();
        for address in expired {
            self.link_broke(&address, &ClientError::Timeout(timeout));
        }
    }
}

/// Two queues, each in sealing order, as one.
fn merge_by_seq(a: VecDeque<Sealed>, b: VecDeque<Sealed>) -> VecDeque<Sealed> {
    if b.is_empty() {
        return a;
    }
    let mut merged = VecDeque::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.seq < y.seq,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return merged,
        };
        merged.extend(if take_a { a.next() } else { b.next() });
    }
}

/// The longest pause between two `InitProducer` requests that failed.
const MAX_ID_BACKOFF: std::time::Duration = std::time::Duration::from_secs(10);

/// The pause after the `failures + 1`th `InitProducer` failure in a row.
fn id_backoff(base: std::time::Duration, failures: u32) -> std::time::Duration {
    base.saturating_mul(1 << failures.min(16)).min(MAX_ID_BACKOFF)
}

/// Whether an `InitProducer` failure stops the producer: a broker that does not know the
/// call (an older version), or one that says, in its own error detail, that no retry will
/// help. A broken connection, a timeout or an unexplained code is asked again.
fn stops_for_good(e: &ClientError) -> bool {
    match e {
        ClientError::Broker {
            code: tonic::Code::Unimplemented,
            ..
        } => true,
        ClientError::Broker { detail: Some(d), .. } => !d.retriable,
        _ => false,
    }
}

async fn open_link(
    channel: tonic::transport::Channel,
    depth: usize,
) -> Result<(mpsc::Sender<ProduceRequest>, Streaming<ProduceResponse>), tonic::Status> {
    let (requests, outgoing) = mpsc::channel::<ProduceRequest>(depth);
    let mut grpc = ProduceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let responses = grpc.produce_stream(ReceiverStream::new(outgoing)).await?.into_inner();
    Ok((requests, responses))
}

/// The sender task: runs until the producer is dropped and everything sent is answered.
pub(crate) async fn run(
    client: Client,
    config: ProducerConfig,
    status: Arc<Status>,
    mut input: mpsc::Receiver<Sealed>,
) {
    let backoff = config.retry_backoff;
    let (ids, mut issued) = mpsc::channel(1);
    let mut state = State::new(client, config, status, ids);
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
        let can_read = input_open && state.queue.len() < MAX_QUEUED;
        tokio::select! {
            biased;
            Some((address, message)) = responses.next(), if !responses.is_empty() => match message {
                Ok(response) => state.on_response(response),
                Err(status) => {
                    responses.remove(&address);
                    let error = ClientError::from_call(status, &address);
                    state.link_broke(&address, &error);
                }
            },
            next = input.recv(), if can_read => match next {
                Some(first) => {
                    state.queue.push_back(first);
                    while state.queue.len() < MAX_QUEUED {
                        match input.try_recv() {
                            Ok(b) => state.queue.push_back(b),
                            Err(_) => break,
                        }
                    }
                }
                None => input_open = false,
            },
            Some(result) = issued.recv() => state.on_id(result),
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

#[cfg(test)]
#[path = "sender_tests.rs"]
mod tests;
