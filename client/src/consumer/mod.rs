//! The consumer: manual partition assignment, a start position per partition, and a
//! `futures::Stream` of records. A background task keeps up to `prefetch` fetch responses
//! ahead of the reader, so decoding and fetching overlap.

mod fetcher;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use conveyor_storage::batch::{BatchIter, Header, RecordIter};
use futures::Stream;
use tokio::sync::mpsc;

use crate::Client;
use crate::error::Result;

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

/// Stored batches of one partition as fetched; decoded by the reader.
#[derive(Debug)]
struct Chunk {
    topic: Arc<str>,
    partition: i32,
    /// Records below this offset were already delivered (a batch may start earlier).
    from: u64,
    /// The partition's position once this chunk is read (control batches included).
    next: u64,
    batches: Bytes,
}

/// The batch being read: its records and where they belong.
#[derive(Debug)]
struct Reading {
    topic: Arc<str>,
    partition: i32,
    from: u64,
    next: u64,
    /// Offset after the last record returned from this chunk.
    returned: Option<u64>,
    batches: BatchIter,
    records: Option<RecordIter>,
}

impl Reading {
    fn next_record(&mut self) -> Option<Result<ConsumerRecord>> {
        loop {
            if let Some(records) = &mut self.records {
                match records.next() {
                    Some(Ok(r)) if r.offset < self.from => continue,
                    Some(Ok(r)) => {
                        return Some(Ok(ConsumerRecord {
                            topic: Arc::clone(&self.topic),
                            partition: self.partition,
                            offset: r.offset,
                            timestamp: r.timestamp,
                            key: r.key,
                            value: r.value,
                            headers: r.headers,
                        }));
                    }
                    Some(Err(e)) => return Some(Err(e.into())),
                    None => self.records = None,
                }
            }
            let batch = match self.batches.next()? {
                Ok(b) => b,
                Err(e) => return Some(Err(e.into())),
            };
            if batch.header().is_control() {
                continue;
            }
            match batch.records() {
                Ok(r) => self.records = Some(r),
                Err(e) => return Some(Err(e.into())),
            }
        }
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
            chunks: Vec::new().into_iter(),
            reading: None,
            positions: HashMap::new(),
            ended: false,
            _task: AbortOnDrop(task),
        }
    }
}

#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

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
    rx: mpsc::Receiver<Result<Vec<Chunk>>>,
    chunks: std::vec::IntoIter<Chunk>,
    reading: Option<Reading>,
    /// Topic → partition → next offset, looked up by `&str` with no scan or allocation.
    positions: HashMap<Arc<str>, HashMap<i32, u64>>,
    /// After an error the stream ends: continuing could skip records silently.
    ended: bool,
    _task: AbortOnDrop,
}

impl RecordStream {
    /// The next offset to read in a partition: after every record returned so far and after
    /// any control batch read past. `None` before anything was read from it.
    pub fn position(&self, topic: &str, partition: i32) -> Option<u64> {
        if let Some(reading) = &self.reading
            && *reading.topic == *topic
            && reading.partition == partition
            && let Some(returned) = reading.returned
        {
            return Some(returned);
        }
        self.positions.get(topic)?.get(&partition).copied()
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
            if let Some(reading) = &mut self.reading {
                match reading.next_record() {
                    Some(Ok(record)) => {
                        reading.returned = Some(record.offset + 1);
                        return Poll::Ready(Some(Ok(record)));
                    }
                    Some(Err(e)) => {
                        self.ended = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                    None => {
                        // Past the chunk, control batches included.
                        self.positions
                            .entry(Arc::clone(&reading.topic))
                            .or_default()
                            .insert(reading.partition, reading.next);
                        self.reading = None;
                        continue;
                    }
                }
            }
            if let Some(chunk) = self.chunks.next() {
                self.reading = Some(Reading {
                    topic: chunk.topic,
                    partition: chunk.partition,
                    from: chunk.from,
                    next: chunk.next,
                    returned: None,
                    batches: BatchIter::new(chunk.batches),
                    records: None,
                });
                continue;
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunks))) => self.chunks = chunks.into_iter(),
                Poll::Ready(Some(Err(e))) => {
                    self.ended = true;
                    return Poll::Ready(Some(Err(e)));
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
