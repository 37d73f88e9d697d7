//! The consumer: manual partition assignment, a start position per partition, and a
//! `futures::Stream` of records. A background task keeps up to `prefetch` fetch responses
//! ahead of the reader, so decoding and fetching overlap.
//!
//! [`group`] builds a consumer group member on the same fetcher and decoder: the group's
//! coordinator assigns the partitions, and positions are committed to the group.

pub(crate) mod decode;
mod fetcher;
pub mod group;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use conveyor_storage::batch::Header;
use futures::Stream;
use tokio::sync::mpsc;

use crate::Client;
use crate::error::Result;
use decode::Decoder;
use fetcher::Fetched;

/// Where a partition starts.
///
/// ```
/// use conveyor_client::{ConsumerConfig, StartAt};
/// // Replay the last hour, and restart from the oldest record if retention overtakes us.
/// let an_hour_ago = conveyor_storage::unix_millis() - 3_600_000;
/// let start = StartAt::Timestamp(an_hour_ago);
/// let config = ConsumerConfig::default().offset_reset(Some(StartAt::Earliest));
/// # let _ = (start, config);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Earliest,
    /// The high watermark: only records produced from now on.
    Latest,
    Offset(u64),
    /// The first record at or after this timestamp (ms since the Unix epoch).
    Timestamp(i64),
}

/// Consumer settings.
///
/// ```
/// use std::time::Duration;
/// let config = conveyor_client::ConsumerConfig::default().max_wait(Duration::from_millis(100));
/// assert_eq!(config.max_wait, Duration::from_millis(100));
/// ```
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// How long a fetch waits on the broker for new records.
    pub max_wait: Duration,
    /// Bytes a fetch waits for before returning (1: return as soon as anything is there).
    pub min_bytes: u32,
    /// Bytes per fetch across partitions.
    pub max_bytes: u32,
    /// Bytes per partition per fetch.
    pub partition_max_bytes: u32,
    /// Fetch responses buffered ahead of the reader.
    pub prefetch: usize,
    /// Where to restart a partition whose position left the log (retention deleted it, or a
    /// seek went past the end), like Kafka's `auto.offset.reset`. `None`: the stream yields
    /// the OUT_OF_RANGE error and ends.
    pub offset_reset: Option<StartAt>,
    /// Verify each fetched batch's CRC before delivering any of its records, like Kafka's
    /// `check.crcs` (on by default). Batch offsets, which the CRC does not cover, are checked
    /// whatever this says: the first batch must hold the offset asked for and each next one
    /// start where the one before ends. A mismatch is refetched a few times, since another
    /// replica may lead by then; if it persists the stream yields
    /// [`ClientError::CorruptBatch`](crate::ClientError::CorruptBatch), which is retriable.
    pub check_crcs: bool,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            max_wait: Duration::from_millis(500),
            min_bytes: 1,
            max_bytes: 32 << 20,
            partition_max_bytes: 8 << 20,
            prefetch: 4,
            offset_reset: None,
            check_crcs: true,
        }
    }
}

impl ConsumerConfig {
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }
    pub fn prefetch(mut self, responses: usize) -> Self {
        self.prefetch = responses;
        self
    }
    pub fn offset_reset(mut self, reset: Option<StartAt>) -> Self {
        self.offset_reset = reset;
        self
    }
    pub fn check_crcs(mut self, check: bool) -> Self {
        self.check_crcs = check;
        self
    }
}

/// A record read from a partition.
///
/// ```no_run
/// # async fn run(mut records: conveyor_client::consumer::RecordStream) -> Result<(), conveyor_client::ClientError> {
/// use futures::StreamExt;
/// while let Some(record) = records.next().await {
///     let record = record?;
///     let key = record.key.as_deref().map(String::from_utf8_lossy);
///     println!("{}[{}]@{} {:?}", record.topic, record.partition, record.offset, key);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// As the producer sent them (keys are bytes, as in `ProducerRecord`).
    pub headers: Vec<Header>,
}

/// Reads assigned partitions.
///
/// ```no_run
/// use futures::StreamExt;
/// use conveyor_client::{Client, ConsumerConfig, StartAt};
/// # async fn run() -> Result<(), conveyor_client::ClientError> {
/// let client = Client::connect("127.0.0.1:9292").await?;
/// let mut consumer = client.consumer(ConsumerConfig::default());
/// consumer.assign_all("orders", StartAt::Earliest).await?;
/// let mut records = consumer.stream();
/// while let Some(record) = records.next().await {
///     let record = record?;
///     println!("{}@{}: {:?}", record.partition, record.offset, record.value);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Consumer {
    client: Client,
    config: ConsumerConfig,
    assignments: Vec<(String, i32, StartAt)>,
}

impl Consumer {
    pub(crate) fn new(client: Client, config: ConsumerConfig) -> Consumer {
        Consumer {
            client,
            config,
            assignments: Vec::new(),
        }
    }

    /// Adds one partition, read from `start`.
    pub fn assign(&mut self, topic: &str, partition: i32, start: StartAt) {
        self.assignments.retain(|(t, p, _)| !(t == topic && *p == partition));
        self.assignments.push((topic.to_string(), partition, start));
    }

    /// Adds every partition of `topic`, each read from `start`.
    pub async fn assign_all(&mut self, topic: &str, start: StartAt) -> Result<()> {
        let count = self.client.partition_count(topic).await?;
        for p in 0..count as i32 {
            self.assign(topic, p, start);
        }
        Ok(())
    }

    /// Moves a partition's start (before `stream`).
    pub fn seek(&mut self, topic: &str, partition: i32, start: StartAt) {
        self.assign(topic, partition, start);
    }

    /// Starts fetching and returns the records as a stream. The stream ends after an error it
    /// cannot retry (which it yields first), or never when none occurs.
    pub fn stream(self) -> RecordStream {
        let (tx, rx) = mpsc::channel(self.config.prefetch.max(1));
        let task = tokio::spawn(fetcher::run(self.client, self.config, self.assignments, tx));
        RecordStream {
            rx,
            decoder: Decoder::default(),
            ended: false,
            _task: AbortOnDrop(task),
        }
    }
}

#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The records of a [`Consumer`], in offset order per partition.
///
/// ```no_run
/// use std::collections::HashMap;
/// # async fn run(client: conveyor_client::Client) -> Result<(), conveyor_client::ClientError> {
/// use conveyor_client::{ConsumerConfig, OffsetSpec, StartAt};
/// // Read partition 0 from the start up to its current end, then stop.
/// let end = client.admin().list_offset("orders", 0, OffsetSpec::Latest).await?.offset;
/// let mut consumer = client.consumer(ConsumerConfig::default());
/// consumer.assign("orders", 0, StartAt::Earliest);
/// let mut records = consumer.stream();
/// let ends = HashMap::from([(("orders".to_string(), 0), end)]);
/// while let Some(record) = records.next_until(&ends).await {
///     println!("{:?}", record?.value);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RecordStream {
    rx: mpsc::Receiver<Fetched>,
    decoder: Decoder,
    /// After an error the stream ends: continuing could skip records silently.
    ended: bool,
    _task: AbortOnDrop,
}

impl RecordStream {
    /// The next offset to read in a partition: after every record returned so far and after
    /// any control batch read past. `None` before anything was read from it.
    pub fn position(&self, topic: &str, partition: i32) -> Option<u64> {
        self.decoder.position(topic, partition)
    }

    /// The next record, or `None` once every partition in `ends` is read up to its end offset
    /// (for example the high watermarks when reading started). Control batches count as read,
    /// so a partition ending in one (a Raft no-op) still ends.
    pub async fn next_until(&mut self, ends: &HashMap<(String, i32), u64>) -> Option<Result<ConsumerRecord>> {
        std::future::poll_fn(|cx| self.poll_record(cx, Some(ends))).await
    }

    fn reached(&self, ends: &HashMap<(String, i32), u64>) -> bool {
        ends.iter()
            .all(|((t, p), end)| self.position(t, *p).is_some_and(|pos| pos >= *end))
    }

    /// The next record; with `ends`, `None` as soon as they are reached, checked whenever a
    /// position moves (a record returned or a chunk read past).
    fn poll_record(
        &mut self,
        cx: &mut Context<'_>,
        ends: Option<&HashMap<(String, i32), u64>>,
    ) -> Poll<Option<Result<ConsumerRecord>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        loop {
            if ends.is_some_and(|ends| self.reached(ends)) {
                return Poll::Ready(None);
            }
            match self.decoder.next_record() {
                Some(Ok(record)) => return Poll::Ready(Some(Ok(record))),
                Some(Err(e)) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None if self.decoder.advance() => continue,
                None => {}
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunks))) => self.decoder.push(chunks),
                Poll::Ready(Some(Err(failure))) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(failure.error)));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Stream for RecordStream {
    type Item = Result<ConsumerRecord>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_record(cx, None)
    }
}
