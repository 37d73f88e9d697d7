//! The fetch loop behind a consumer's stream.
//!
//! One fetch loop per partition. A manually assigned consumer runs a fixed set of them
//! ([`run`]); a group member's set changes as partitions are assigned and revoked
//! ([`run_dynamic`]): a partition stopped mid long-poll is cut short, and partitions that
//! stay are never restarted. Chunks carry their partition's incarnation so the reader can
//! drop those of a fetch that was stopped or restarted.
//!
//! Fetched batches are checked (frame, and CRC unless `check_crcs` is off) before the
//! position moves past them or any of their records reaches the reader: a batch altered on
//! the broker's disk or in transit is never delivered.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use conveyor_proto::v1::fetch_client::FetchClient;
use conveyor_proto::v1::{ErrorCode, ErrorDetail, FetchRequest, PartitionFetch};
use conveyor_storage::BatchError;
use conveyor_storage::batch::BatchIter;
use futures::StreamExt;
use futures::future::{AbortHandle, abortable};
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;

use super::decode::Chunk;
use super::{ConsumerConfig, StartAt};
use crate::admin::OffsetSpec;
use crate::error::{ClientError, Result};
use crate::{Client, MAX_MESSAGE_BYTES};

/// Consecutive retriable failures tolerated before the stream gives up (about 10 s: long
/// enough to ride out a leader election).
const MAX_RETRIES: u32 = 50;
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// Between rounds of retries of a group member's partition that keeps failing.
const PERSIST_BACKOFF: Duration = Duration::from_secs(1);
const FETCH_TIMEOUT_MARGIN: Duration = Duration::from_secs(15);
/// Refetches of a batch that failed its CRC check before the stream reports it: enough for a
/// leader change to route around a damaged replica, few enough to report damage promptly.
const MAX_CORRUPT_REFETCHES: u32 = 3;

struct Position {
    topic: Arc<str>,
    partition: i32,
    incarnation: u64,
    next: u64,
}

/// A failure the fetch task reports to the reader, with the fetch it ended when it ended
/// one (a group member ignores failures of partitions it no longer owns).
#[derive(Debug)]
pub(crate) struct FetchFailure {
    pub(crate) source: Option<(Arc<str>, i32, u64)>,
    pub(crate) error: ClientError,
}

impl FetchFailure {
    fn of(position: &Position, error: ClientError) -> FetchFailure {
        FetchFailure {
            source: Some((Arc::clone(&position.topic), position.partition, position.incarnation)),
            error,
        }
    }
}

/// What the fetch task sends the reader: one fetch response's chunks, or a failure.
pub(crate) type Fetched = std::result::Result<Vec<Chunk>, FetchFailure>;

/// Changes to the partitions a group member fetches.
#[derive(Debug)]
pub(crate) enum FetchControl {
    /// Fetch a partition from `offset`, its chunks tagged `incarnation`; a fetch of it
    /// already running is stopped first.
    Start {
        topic: Arc<str>,
        partition: i32,
        offset: u64,
        incarnation: u64,
    },
    Stop {
        topic: Arc<str>,
        partition: i32,
    },
    StopAll,
}

async fn resolve(client: &Client, topic: &str, partition: i32, start: StartAt) -> Result<u64> {
    let spec = match start {
        StartAt::Offset(o) => return Ok(o),
        StartAt::Earliest => OffsetSpec::Earliest,
        StartAt::Latest => OffsetSpec::Latest,
        StartAt::Timestamp(ts) => OffsetSpec::Timestamp(ts),
    };
    Ok(client.admin().list_offset(topic, partition, spec).await?.offset)
}

/// Advances a partition's position past the batches fetched, reading headers and checking
/// CRCs when `check_crcs`; records are decoded later, on the reader's thread. On an error the
/// position stays where it was.
///
/// The base offset sits outside the CRC, so the offsets are checked too (always: it costs
/// nothing): the first batch must hold the offset asked for, and each next batch must start
/// where the one before it ends. The broker reads from the batch holding the offset, and
/// batches have no gaps between them (compaction removes records inside batches but keeps
/// every batch's header and offset range), so a healthy log always passes. One gap is
/// legitimate: retention may delete the segment holding the offset between the broker's
/// bounds check and its read; the read then starts at the new log start, which the broker
/// reports (`log_start_offset`, read after the batches), so a first batch starting after
/// the offset is accepted when it starts no later than that.
fn advance(position: &mut Position, bytes: &bytes::Bytes, check_crcs: bool, log_start_offset: u64) -> Result<()> {
    let corrupt = |offset: u64, problem: String| ClientError::CorruptBatch {
        topic: position.topic.to_string(),
        partition: position.partition,
        offset,
        problem,
    };
    let mut next: Option<u64> = None;
    for batch in BatchIter::new(bytes.clone()) {
        let batch = batch?;
        let header = batch.header();
        let base = header.base_offset;
        if check_crcs && let Err(BatchError::CrcMismatch { expected, actual }) = batch.verify_crc() {
            return Err(corrupt(
                base,
                format!("it failed its CRC check (header says {expected:#010x}, content hashes to {actual:#010x})"),
            ));
        }
        let end = header.next_offset();
        match next {
            None => {
                let holds_it = base <= position.next && position.next < end;
                let log_start_moved = base > position.next && base <= log_start_offset;
                if !holds_it && !log_start_moved {
                    return Err(corrupt(
                        base,
                        format!(
                            "it covers offsets {base}..{end}, which do not hold the offset {} asked for (its base offset, outside the CRC, was altered)",
                            position.next
                        ),
                    ));
                }
            }
            Some(expected) if base != expected => {
                return Err(corrupt(
                    base,
                    format!(
                        "it starts at offset {base}, but the batch before it ends at {expected} (its base offset, outside the CRC, was altered)"
                    ),
                ));
            }
            Some(_) => {}
        }
        next = Some(end);
    }
    if let Some(next) = next {
        position.next = next;
    }
    Ok(())
}

/// Restarts a partition whose position left the log, if the consumer has a reset policy.
/// Returns the chunk that tells the reader its new position.
async fn reset(
    client: &Client,
    config: &ConsumerConfig,
    position: &mut Position,
    detail: &ErrorDetail,
) -> Option<Chunk> {
    let start = config.offset_reset?;
    if ErrorCode::try_from(detail.code) != Ok(ErrorCode::OffsetOutOfRange) {
        return None;
    }
    let next = resolve(client, &position.topic, position.partition, start).await.ok()?;
    tracing::info!(topic = %position.topic, partition = position.partition, from = position.next, to = next, "offset left the log; reset");
    position.next = next;
    Some(Chunk {
        topic: Arc::clone(&position.topic),
        partition: position.partition,
        incarnation: position.incarnation,
        from: next,
        next,
        batches: bytes::Bytes::new(),
    })
}

pub(super) async fn run(
    client: Client,
    config: ConsumerConfig,
    assignments: Vec<(String, i32, StartAt)>,
    tx: mpsc::Sender<Fetched>,
) {
    let mut positions = Vec::with_capacity(assignments.len());
    for (topic, partition, start) in assignments {
        let position = Position {
            topic: Arc::from(topic.as_str()),
            partition,
            incarnation: 0,
            next: 0,
        };
        match resolve(&client, &topic, partition, start).await {
            Ok(next) => positions.push(Position { next, ..position }),
            Err(e) => {
                let _ = tx.send(Err(FetchFailure::of(&position, e))).await;
                return;
            }
        }
    }
    if positions.is_empty() {
        let error = ClientError::InvalidArgument("the consumer has no assigned partitions".into());
        let _ = tx.send(Err(FetchFailure { source: None, error })).await;
        return;
    }
    // Starting positions, so the reader knows them before the first record arrives.
    let start: Vec<Chunk> = positions
        .iter()
        .map(|p| Chunk {
            topic: Arc::clone(&p.topic),
            partition: p.partition,
            incarnation: p.incarnation,
            from: p.next,
            next: p.next,
            batches: bytes::Bytes::new(),
        })
        .collect();
    if tx.send(Ok(start)).await.is_err() {
        return;
    }
    // One fetch loop per partition: each follows its own leader, and a long poll on a quiet
    // partition never holds back the records of a busy one.
    let loops = positions
        .into_iter()
        .map(|position| fetch_partition(client.clone(), config.clone(), position, tx.clone(), false));
    futures::future::join_all(loops).await;
}

/// The fetch loops of a group member: started and stopped by `control`, until it closes.
/// The fetch task never waits on the reader here, only inside a partition's loop, so
/// control commands are taken at once even while every loop waits for room.
pub(crate) async fn run_dynamic(
    client: Client,
    config: ConsumerConfig,
    mut control: mpsc::Receiver<FetchControl>,
    tx: mpsc::Sender<Fetched>,
) {
    let mut loops = FuturesUnordered::new();
    let mut running: HashMap<(Arc<str>, i32), AbortHandle> = HashMap::new();
    loop {
        tokio::select! {
            command = control.recv() => match command {
                None => return,
                Some(FetchControl::Start { topic, partition, offset, incarnation }) => {
                    if let Some(old) = running.remove(&(Arc::clone(&topic), partition)) {
                        old.abort();
                    }
                    let position = Position { topic: Arc::clone(&topic), partition, incarnation, next: offset };
                    let (fetch, handle) = abortable(fetch_partition(client.clone(), config.clone(), position, tx.clone(), true));
                    loops.push(fetch);
                    running.insert((topic, partition), handle);
                }
                Some(FetchControl::Stop { topic, partition }) => {
                    if let Some(old) = running.remove(&(topic, partition)) {
                        old.abort();
                    }
                }
                Some(FetchControl::StopAll) => {
                    for (_, old) in running.drain() {
                        old.abort();
                    }
                }
            },
            // Loops that ended (stopped, or failed for good after reporting it) leave the set.
            Some(_) = loops.next(), if !loops.is_empty() => {}
        }
    }
}

/// Fetches one partition until it is aborted or fails for good. `persist` (a group
/// member's partition, which nobody else reads while this member owns it): after
/// `MAX_RETRIES` retriable failures in a row the error is reported and the loop goes on
/// retrying, more slowly, rather than leave the partition owned and unread.
async fn fetch_partition(
    client: Client,
    config: ConsumerConfig,
    mut position: Position,
    tx: mpsc::Sender<Fetched>,
    persist: bool,
) {
    let mut failures = 0;
    let mut corrupt_refetches = 0;
    'fetch: loop {
        let request = FetchRequest {
            partitions: vec![PartitionFetch {
                topic: position.topic.to_string(),
                partition: position.partition,
                offset: position.next,
                max_bytes: config.partition_max_bytes,
            }],
            max_wait_ms: config.max_wait.as_millis() as u32,
            min_bytes: config.min_bytes,
            max_bytes: config.max_bytes,
            decode_records: false,
        };
        // The broker answers within max_wait; past it with a margin, the broker is stopped or
        // the connection dead: a retriable timeout, after which the leader is looked up again.
        let limit = config.max_wait + FETCH_TIMEOUT_MARGIN;
        let cluster = client.cluster();
        let answer = match cluster.route(&position.topic, position.partition).await {
            Ok(route) => {
                let mut fetcher = FetchClient::new(route.channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                match tokio::time::timeout(limit, fetcher.fetch(request)).await {
                    // A leader that dies mid long-poll breaks the call ("transport error",
                    // Unknown without the broker's detail): retriable, as unreachable.
                    Ok(answer) => answer.map_err(|status| ClientError::from_call(status, &route.address)),
                    Err(_) => Err(ClientError::Timeout(limit)),
                }
            }
            Err(e) => Err(e),
        };
        let response = match answer {
            Ok(r) => r.into_inner(),
            Err(error) => {
                if let ClientError::Broker {
                    detail: Some(detail), ..
                } = &error
                    && let Some(chunk) = reset(&client, &config, &mut position, detail).await
                {
                    if tx.send(Ok(vec![chunk])).await.is_err() {
                        return;
                    }
                    continue;
                }
                cluster.on_error(&position.topic, position.partition, &error);
                failures += 1;
                if error.is_retriable() && failures <= MAX_RETRIES {
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue;
                }
                if persist && error.is_retriable() {
                    if tx.send(Err(FetchFailure::of(&position, error))).await.is_err() {
                        return;
                    }
                    failures = 0;
                    tokio::time::sleep(PERSIST_BACKOFF).await;
                    continue;
                }
                let _ = tx.send(Err(FetchFailure::of(&position, error))).await;
                return;
            }
        };
        failures = 0;
        let mut chunks = Vec::with_capacity(1);
        for data in response.partitions {
            if *position.topic != *data.topic || position.partition != data.partition {
                continue;
            }
            if let Some(detail) = data.error {
                match reset(&client, &config, &mut position, &detail).await {
                    Some(chunk) => chunks.push(chunk),
                    None => {
                        let error = ClientError::from_detail(detail);
                        let _ = tx.send(Err(FetchFailure::of(&position, error))).await;
                        return;
                    }
                }
                continue;
            }
            if data.batches.is_empty() {
                continue;
            }
            let from = position.next;
            if let Err(e) = advance(&mut position, &data.batches, config.check_crcs, data.log_start_offset) {
                if matches!(e, ClientError::CorruptBatch { .. }) && corrupt_refetches < MAX_CORRUPT_REFETCHES {
                    corrupt_refetches += 1;
                    tracing::warn!(error = %e, "fetched batch is corrupt; fetching it again");
                    cluster.on_error(&position.topic, position.partition, &e);
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue 'fetch;
                }
                let _ = tx.send(Err(FetchFailure::of(&position, e))).await;
                return;
            }
            corrupt_refetches = 0;
            chunks.push(Chunk {
                topic: Arc::clone(&position.topic),
                partition: position.partition,
                incarnation: position.incarnation,
                from,
                next: position.next,
                batches: data.batches,
            });
        }
        if !chunks.is_empty() && tx.send(Ok(chunks)).await.is_err() {
            return;
        }
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use conveyor_storage::batch::{BatchBuilder, Compression, Record};

    use super::*;

    fn batches(count: u64) -> Vec<u8> {
        let mut all = Vec::new();
        for i in 0..count {
            let mut b = BatchBuilder::new(Compression::None);
            b.push(&Record {
                timestamp: 1,
                value: Some(Bytes::from(format!("value-{i}"))),
                ..Record::default()
            });
            let mut bytes = b.build().expect("batch").to_vec();
            conveyor_storage::batch::stamp(&mut bytes, i, 1, i + 1);
            all.extend_from_slice(&bytes);
        }
        all
    }

    fn position() -> Position {
        Position {
            topic: Arc::from("t"),
            partition: 0,
            incarnation: 0,
            next: 0,
        }
    }

    #[test]
    fn a_fetched_batch_with_a_flipped_byte_is_a_retriable_crc_error_and_the_position_stays() {
        let mut bytes = batches(3);
        let at = bytes.windows(7).rposition(|w| w == b"value-2").expect("third value");
        bytes[at] ^= 0x20;
        let mut p = position();
        let e = advance(&mut p, &Bytes::from(bytes.clone()), true, 0).expect_err("damaged");
        assert!(
            matches!(e, ClientError::CorruptBatch { offset: 2, ref topic, .. } if topic == "t"),
            "{e:?}"
        );
        assert!(e.is_retriable(), "{e}");
        assert!(e.to_string().contains("CRC"), "{e}");
        assert_eq!(p.next, 0, "nothing of the response was taken");

        advance(&mut p, &Bytes::from(bytes), false, 0).expect("check_crcs off");
        assert_eq!(p.next, 3);
        let mut p = position();
        advance(&mut p, &Bytes::from(batches(3)), true, 0).expect("intact");
        assert_eq!(p.next, 3);
    }

    /// Overwrites the base offset (the first 8 bytes, outside the CRC) of the batch at `index`.
    fn set_base_offset(bytes: &mut [u8], index: usize, base: u64) {
        let mut at = 0;
        for (i, batch) in BatchIter::new(Bytes::from(bytes.to_vec())).enumerate() {
            let len = batch.expect("frame").bytes().len();
            if i == index {
                conveyor_storage::batch::stamp(&mut bytes[at..at + len], base, 1, i as u64 + 1);
                return;
            }
            at += len;
        }
        panic!("no batch {index}");
    }

    #[test]
    fn a_base_offset_that_does_not_follow_on_is_a_retriable_corrupt_batch_and_the_position_stays() {
        for (index, base, from) in [(1, 7, 0), (2, 1, 0), (0, 2, 1), (0, 5, 0)] {
            let mut bytes = batches(3);
            set_base_offset(&mut bytes, index, base);
            let mut p = position();
            p.next = from;
            let e = advance(&mut p, &Bytes::from(bytes), true, 0).expect_err("offsets out of sequence");
            assert!(
                matches!(e, ClientError::CorruptBatch { offset, .. } if offset == base),
                "batch {index} moved to {base}: {e:?}"
            );
            assert!(e.is_retriable(), "{e}");
            assert_eq!(p.next, from, "nothing of the response was taken");
        }
    }

    #[test]
    fn healthy_responses_pass_the_offset_checks() {
        // The first batch holds the offset asked for, from its start or its middle.
        let mut p = position();
        p.next = 1;
        advance(&mut p, &Bytes::from(batches(3).split_off(batch_len())), true, 0).expect("starts at it");
        assert_eq!(p.next, 3);
        let mut p = position();
        p.next = 0;
        let mut wide = BatchBuilder::new(Compression::None);
        for i in 0..4 {
            wide.push(&Record {
                timestamp: 1,
                value: Some(Bytes::from(format!("v{i}"))),
                ..Record::default()
            });
        }
        let mut wide = wide.build().expect("batch").to_vec();
        conveyor_storage::batch::stamp(&mut wide, 0, 1, 1);
        p.next = 2;
        advance(&mut p, &Bytes::from(wide), true, 0).expect("holds it in its middle");
        assert_eq!(p.next, 4);
        // Retention deleted the segment holding the offset before the broker read: the read
        // starts at the new log start, which the response reports.
        let mut p = position();
        let later = batches(3).split_off(2 * batch_len());
        advance(&mut p, &Bytes::from(later), true, 2).expect("the log start moved past it");
        assert_eq!(p.next, 3);
    }

    fn batch_len() -> usize {
        BatchIter::new(Bytes::from(batches(1)))
            .next()
            .expect("one")
            .expect("frame")
            .bytes()
            .len()
    }
}
