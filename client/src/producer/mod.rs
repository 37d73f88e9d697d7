//! The producer: records are grouped per partition into batches (by `batch_size` and
//! `linger`), encoded once in Conveyor's batch format, and pipelined to the broker over one
//! stream. In-flight bytes are bounded: `send` waits when the budget is used up.
//!
//! # Ordering and duplicates
//! Records of one partition are appended in the order they were sent, retries included: a
//! batch that fails and is resent never lands behind a later batch of its partition (see
//! the sender's "Order across failures"). Producers are idempotent by default
//! ([`ProducerConfig::idempotence`]): every batch carries a producer id and sequence numbers,
//! so a batch resent after its acknowledgement was lost is not written twice (see
//! `idempotence` and `docs/producer.md`), except a late copy of a batch renumbered by a
//! partition reset, counted by [`Producer::unvouched_records`]. Without idempotence a retry
//! may duplicate records.

mod accumulator;
#[cfg(test)]
mod fake_broker_tests;
mod idempotence;
pub mod partitioner;
mod sender;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use conveyor_storage::batch::{Compression, Header};
use tokio::sync::Semaphore;

use crate::Client;
use crate::error::{ClientError, Result};
pub(crate) use accumulator::Sealed;
use accumulator::{Accumulator, Appended, Slot};
pub use idempotence::{MAX_IN_FLIGHT_PER_PARTITION, ProducerIdentity};

/// A partition of a topic, as the producer keys its state.
pub(crate) type PartitionKey = (Arc<str>, i32);

pub(crate) fn key_of(batch: &Sealed) -> PartitionKey {
    (Arc::clone(&batch.topic), batch.partition)
}

/// When the broker acknowledges a batch.
///
/// ```
/// use conveyor_client::{Acks, ProducerConfig};
/// let fire_and_forget = ProducerConfig::default().acks(Acks::None);
/// assert_eq!(fire_and_forget.acks, Acks::None);
/// assert_eq!(Acks::default(), Acks::All);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// Do not wait: offsets are unknown.
    None,
    /// After the leader wrote it.
    Leader,
    /// After it is committed and flushed as the topic's policy says.
    #[default]
    All,
}

/// Producer settings. Start from `ProducerConfig::default()` and adjust.
///
/// ```
/// use std::time::Duration;
/// use conveyor_client::{Acks, Compression, ProducerConfig};
/// let config = ProducerConfig::default()
///     .linger(Duration::from_millis(2))
///     .batch_size(512 * 1024)
///     .acks(Acks::All)
///     .compression(Compression::Lz4);
/// assert_eq!(config.batch_size, 512 * 1024);
/// ```
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// How long a batch waits for more records before it is sent. An idempotent producer
    /// keeps a partition's batch open longer while 5 of its batches are unanswered: it
    /// takes the records that come meanwhile and goes as soon as an answer frees room.
    pub linger: Duration,
    /// A batch is sent as soon as it holds about this many bytes.
    pub batch_size: usize,
    /// Bytes of records sent or waiting to be sent; `send` waits beyond this.
    pub max_in_flight_bytes: usize,
    pub acks: Acks,
    pub compression: Compression,
    /// Attempts after the first for a batch that failed with a retriable error.
    pub retries: u32,
    /// A batch not acknowledged this long after it took its first record fails, whatever
    /// `retries` says.
    pub delivery_timeout: Duration,
    pub retry_backoff: Duration,
    /// A produce request unanswered this long (a stopped or unreachable leader) is given up
    /// on with its whole link, and its batches are retried elsewhere if they still have time.
    pub request_timeout: Duration,
    /// Produce requests awaiting an answer at once.
    pub max_in_flight_requests: usize,
    /// Idempotent produce (default on, as Kafka since 3.0): each partition's batches carry a
    /// producer id (from `InitProducer`) and sequence numbers, so the broker appends a
    /// resent batch only once (except a late copy of a batch renumbered by a partition
    /// reset, counted by [`Producer::unvouched_records`]) and refuses one that would land
    /// out of order. Needs
    /// [`Acks::All`]; at most [`MAX_IN_FLIGHT_PER_PARTITION`] batches of a partition are in
    /// flight at once. Off: a batch whose acknowledgement was lost and that is resent may
    /// be written twice.
    pub idempotence: bool,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            linger: Duration::from_millis(5),
            batch_size: 256 * 1024,
            max_in_flight_bytes: 64 << 20,
            acks: Acks::All,
            compression: Compression::None,
            retries: u32::MAX,
            delivery_timeout: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            request_timeout: Duration::from_secs(10),
            max_in_flight_requests: 64,
            idempotence: true,
        }
    }
}

impl ProducerConfig {
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }
    pub fn batch_size(mut self, bytes: usize) -> Self {
        self.batch_size = bytes;
        self
    }
    pub fn max_in_flight_bytes(mut self, bytes: usize) -> Self {
        self.max_in_flight_bytes = bytes;
        self
    }
    pub fn acks(mut self, acks: Acks) -> Self {
        self.acks = acks;
        self
    }
    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }
    pub fn delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }
    pub fn retry_backoff(mut self, backoff: Duration) -> Self {
        self.retry_backoff = backoff;
        self
    }
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
    pub fn idempotence(mut self, on: bool) -> Self {
        self.idempotence = on;
        self
    }

    /// Checks that the settings fit together; [`Client::producer`] calls it.
    ///
    /// ```
    /// use conveyor_client::{Acks, ProducerConfig};
    /// assert!(ProducerConfig::default().acks(Acks::Leader).validate().is_err());
    /// assert!(ProducerConfig::default().acks(Acks::Leader).idempotence(false).validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        if self.idempotence && self.acks != Acks::All {
            return Err(ClientError::InvalidArgument(format!(
                "an idempotent producer needs acks=all (got {:?}): the broker dedupes only batches it committed; turn idempotence off for weaker acks",
                self.acks
            )));
        }
        if self.max_in_flight_bytes == 0 || self.batch_size == 0 {
            return Err(ClientError::InvalidArgument(
                "max_in_flight_bytes and batch_size must be above 0".into(),
            ));
        }
        Ok(())
    }
}

/// A record to send.
///
/// ```
/// use conveyor_client::ProducerRecord;
/// let record = ProducerRecord::new("orders", "placed").key("order-42").header("source", "web");
/// assert_eq!(record.topic, "orders");
/// ```
#[derive(Debug, Clone, Default)]
pub struct ProducerRecord {
    pub topic: String,
    /// `None`: chosen from the key (murmur2), or sticky per batch when there is no key.
    pub partition: Option<i32>,
    pub key: Option<Bytes>,
    /// `None` is a tombstone.
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch; `None` means now.
    pub timestamp: Option<i64>,
}

impl ProducerRecord {
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> Self {
        ProducerRecord {
            topic: topic.into(),
            value: Some(value.into()),
            ..ProducerRecord::default()
        }
    }
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
    pub fn timestamp(mut self, ms: i64) -> Self {
        self.timestamp = Some(ms);
        self
    }
    pub fn header(mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: Some(value.into()),
        });
        self
    }

    fn encoded_size_hint(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len) + 4)
            .sum();
        self.key.as_ref().map_or(0, Bytes::len) + self.value.as_ref().map_or(0, Bytes::len) + headers + 24
    }
}

/// Where a record was written: what a [`DeliveryFuture`] resolves to.
///
/// ```no_run
/// # async fn run(producer: conveyor_client::Producer) -> Result<(), conveyor_client::ClientError> {
/// let written = producer.send(conveyor_client::ProducerRecord::new("orders", "x")).await?.await?;
/// println!("{}[{}] at {:?}", written.topic, written.partition, written.offset);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    pub topic: Arc<str>,
    pub partition: i32,
    /// `None` with [`Acks::None`].
    pub offset: Option<u64>,
}

/// Resolves when the broker acknowledges the record's batch. Await it, or drop it to send
/// without waiting.
///
/// ```no_run
/// # async fn run(producer: conveyor_client::Producer) -> Result<(), conveyor_client::ClientError> {
/// let delivery = producer.send(conveyor_client::ProducerRecord::new("orders", "x")).await?;
/// match delivery.await {
///     Ok(written) => println!("stored at offset {:?}", written.offset),
///     Err(e) if e.is_retriable() => println!("not stored yet, safe to retry: {e}"),
///     Err(e) => println!("refused: {e}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DeliveryFuture {
    slot: Arc<Slot>,
    index: u32,
    topic: Arc<str>,
    partition: i32,
}

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let base = std::task::ready!(self.slot.poll_result(cx))?;
        std::task::Poll::Ready(Ok(RecordMetadata {
            topic: Arc::clone(&self.topic),
            partition: self.partition,
            offset: base.map(|b| b + u64::from(self.index)),
        }))
    }
}

/// Sends records in batches. Cheap to clone; clones share batches and the connection.
///
/// ```no_run
/// use conveyor_client::{Client, ProducerConfig, ProducerRecord};
/// # async fn run() -> Result<(), conveyor_client::ClientError> {
/// let client = Client::connect("127.0.0.1:9292").await?;
/// let producer = client.producer(ProducerConfig::default())?;
/// let mut deliveries = Vec::new();
/// for i in 0..1000 {
///     deliveries.push(producer.send(ProducerRecord::new("events", format!("event {i}"))).await?);
/// }
/// producer.flush().await?;
/// for d in deliveries {
///     d.await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Producer {
    inner: Arc<accumulator::Shared>,
}

impl Producer {
    pub(crate) fn new(client: Client, config: ProducerConfig) -> Result<Producer> {
        config.validate()?;
        let (to_sender, from_producer) = tokio::sync::mpsc::channel(config.max_in_flight_requests.max(1) * 4);
        let status = Arc::new(idempotence::Status::default());
        let inner = Arc::new(accumulator::Shared {
            budget: Arc::new(Semaphore::new(config.max_in_flight_bytes)),
            accumulator: std::sync::Mutex::new(Accumulator::default()),
            tracker: Default::default(),
            dispatching: tokio::sync::Mutex::new(()),
            to_sender,
            client: client.clone(),
            config: config.clone(),
            status: Arc::clone(&status),
        });
        tokio::spawn(sender::run(client, config, status, from_producer));
        tokio::spawn(accumulator::run_sealer(
            Arc::downgrade(&inner),
            Arc::clone(&inner.tracker),
        ));
        Ok(Producer { inner })
    }

    /// Records this producer had sent and then renumbered under a new epoch (a partition
    /// reset after a gap or an expired producer id, see `docs/producer.md`): a copy sent
    /// under the old epoch that reached the partition before the new epoch's first write
    /// is stored, so each may be stored twice. Summed over every reset; 0 without
    /// idempotence (where no resend is vouched for).
    pub fn unvouched_records(&self) -> u64 {
        self.inner.status.unvouched()
    }

    /// Adds a record to its partition's batch. Waits only when the in-flight byte budget is
    /// used up (backpressure). The returned future resolves when the batch is acknowledged.
    ///
    /// Once an idempotent producer stopped for good, every send fails with
    /// [`ClientError::ProducerStopped`]: when a newer epoch of its id fenced it, or when the
    /// cluster refused `InitProducer` for good (a broker without it, or an error whose detail
    /// says no retry helps; a broken connection or an unavailable controller is retried).
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        if let Some(stopped) = self.inner.status.stopped() {
            return Err(stopped);
        }
        let size = record.encoded_size_hint();
        if size > self.inner.config.max_in_flight_bytes {
            return Err(ClientError::InvalidArgument(format!(
                "a record of {size} bytes exceeds max_in_flight_bytes ({})",
                self.inner.config.max_in_flight_bytes
            )));
        }
        // Ready at the first poll when the budget has room; waits (backpressure) otherwise.
        let mut permit = Arc::clone(&self.inner.budget)
            .acquire_many_owned(size as u32)
            .await
            .map_err(|_| ClientError::Closed)?;
        let mut record = record;
        loop {
            match self.inner.append(record, permit) {
                Appended::Done { future, sealed } => {
                    if sealed {
                        self.inner.dispatch().await?;
                    }
                    return Ok(future);
                }
                Appended::NeedsPartitionCount(r, p) => {
                    let count = self.inner.client.partition_count(&r.topic).await?;
                    if count == 0 {
                        return Err(ClientError::InvalidArgument(format!(
                            "topic '{}' has no partitions",
                            r.topic
                        )));
                    }
                    self.inner.learn_partitions(&r.topic, count);
                    (record, permit) = (r, p);
                }
            }
        }
    }

    /// Sends every open batch now and waits until every record sent before this call is
    /// acknowledged (or failed). Records sent concurrently by other tasks are not waited for.
    pub async fn flush(&self) -> Result<()> {
        let Some(target) = self.inner.seal_all() else {
            return Ok(());
        };
        self.inner.dispatch().await?;
        loop {
            let idle = self.inner.tracker.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.inner.tracker.done_through(target) {
                return Ok(());
            }
            idle.await;
        }
    }
}
