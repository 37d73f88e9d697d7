//! Turning a `ShareFetch` answer into deliveries.
//!
//! Each partition's answer holds stored batches, exactly as a plain fetch returns them, and
//! the ranges of offsets this member acquired. The batches are CRC-checked and decoded by
//! the consumer's decoder (`consumer/decode.rs`); a record becomes a [`Delivery`] only when
//! an acquired range holds its offset: the rest of those batches belongs to other members.
//!
//! Acquired offsets that yield no delivery are acknowledged here, so they do not come back
//! until they are dead-lettered: an offset inside a returned batch but with no record there
//! (a control record, a record compaction removed) is accepted; one beyond the returned
//! batches is released, to be delivered again at once.
//!
//! A batch that fails its CRC check (or cannot be decoded) delivers nothing of its
//! partition: the partition's acquired records are released and the stream yields
//! [`ClientError::CorruptBatch`], which is retriable.

use std::sync::Arc;

use bytes::Bytes;
use conveyor_proto::v1::{AcquiredRange, SharePartitionData};
use conveyor_storage::batch::BatchIter;

use super::ack_queue::AckQueue;
use super::delivery::{AckKind, AckRequest, Delivery, Held, HeldRef};
use crate::consumer::decode::{Chunk, Decoder};
use crate::error::ClientError;

/// What one fetch answer gave: deliveries, the acknowledgements of acquired offsets that
/// gave none, and the errors of partitions that could not be read.
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub(crate) deliveries: Vec<Delivery>,
    pub(crate) gaps: Vec<AckRequest>,
    pub(crate) errors: Vec<ClientError>,
}

/// Most acquired offsets of one partition whose lock states are allocated as one block.
const MAX_BLOCK: u64 = 1 << 16;

/// Decodes the partitions of one answer. `locked_until_ms` is the answer's lock end;
/// acknowledgements of the deliveries go to `acks`. With `shared`, each partition's lock
/// states are allocated as one block (see [`HeldRef`]).
pub(crate) fn decode(
    topic: &Arc<str>,
    partitions: Vec<SharePartitionData>,
    locked_until_ms: i64,
    acks: &Arc<AckQueue>,
    shared: bool,
) -> Decoded {
    // Room for every acquired record at once (a fetch asks for at most 10,000).
    let acquired: u64 = partitions
        .iter()
        .flat_map(|d| &d.acquired)
        .map(offsets_in)
        .fold(0, u64::saturating_add);
    let mut decoded = Decoded {
        deliveries: Vec::with_capacity(acquired.min(10_000) as usize),
        ..Decoded::default()
    };
    let fetched_at = std::time::Instant::now();
    for data in partitions {
        let mut ranges = data.acquired;
        if ranges.is_empty() {
            continue;
        }
        ranges.sort_by_key(|r| r.first_offset);
        let partition = data.partition;
        // Where each range's offsets start in the partition's block, if it has one.
        let mut starts = Vec::with_capacity(ranges.len());
        let mut total = 0u64;
        for r in &ranges {
            starts.push(total as usize);
            total = total.saturating_add(offsets_in(r));
        }
        let new_held = |offset: u64, token: u64| Held::new(partition, offset, token, locked_until_ms, fetched_at);
        let block: Option<Arc<[Held]>> = (shared && total <= MAX_BLOCK).then(|| {
            ranges
                .iter()
                .flat_map(|r| (r.first_offset..=r.last_offset).map(|o| new_held(o, r.token)))
                .collect()
        });
        let held = |range: usize, offset: u64| {
            let r = &ranges[range];
            block
                .as_ref()
                .and_then(|b| HeldRef::in_block(b, starts[range] + (offset - r.first_offset) as usize))
                // The place must hold this very record's state (whatever the answer's ranges).
                .filter(|h| h.offset == offset && h.token == r.token)
                .unwrap_or_else(|| HeldRef::single(new_held(offset, r.token)))
        };
        let gap = |range: usize, offset: u64, kind: AckKind| AckRequest {
            held: held(range, offset),
            kind,
            reply: None,
        };
        // Deliveries go straight into the answer's list; a partition that fails part-way
        // takes its own back out.
        let mark = decoded.deliveries.len();
        let read = check(topic, partition, &data.batches).and_then(|spans| {
            records_of(topic, partition, &data.batches, &ranges, |record, i| {
                decoded.deliveries.push(Delivery {
                    held: held(i, record.offset),
                    delivery_count: ranges[i].delivery_count,
                    record,
                    acks: Arc::clone(acks),
                });
            })?;
            Ok(spans)
        });
        let spans = match read {
            Ok(spans) => spans,
            Err(e) => {
                decoded.deliveries.truncate(mark);
                for (i, r) in ranges.iter().enumerate() {
                    decoded
                        .gaps
                        .extend((r.first_offset..=r.last_offset).map(|o| gap(i, o, AckKind::Release(0))));
                }
                decoded.errors.push(e);
                continue;
            }
        };
        let mut delivered = decoded.deliveries[mark..].iter().map(|d| d.record.offset).peekable();
        for (i, r) in ranges.iter().enumerate() {
            for offset in r.first_offset..=r.last_offset {
                while delivered.next_if(|&d| d < offset).is_some() {}
                if delivered.next_if_eq(&offset).is_some() {
                    continue;
                }
                let in_a_batch = spans.iter().any(|&(base, last)| base <= offset && offset <= last);
                let kind = if in_a_batch {
                    AckKind::Accept
                } else {
                    AckKind::Release(0)
                };
                decoded.gaps.push(gap(i, offset, kind));
            }
        }
    }
    decoded
}

/// How many offsets `r` names: none for a range ending before it starts.
fn offsets_in(r: &AcquiredRange) -> u64 {
    r.last_offset
        .checked_sub(r.first_offset)
        .map_or(0, |d| d.saturating_add(1))
}

/// The offset spans of a partition's batches, `(base, last)`, each batch CRC-checked.
fn check(topic: &Arc<str>, partition: i32, batches: &Bytes) -> Result<Vec<(u64, u64)>, ClientError> {
    let mut spans = Vec::new();
    for batch in BatchIter::new(batches.clone()) {
        let batch = batch?;
        let header = batch.header();
        if let Err(e) = batch.verify_crc() {
            return Err(ClientError::CorruptBatch {
                topic: topic.to_string(),
                partition,
                offset: header.base_offset,
                problem: e.to_string(),
            });
        }
        spans.push((header.base_offset, header.last_offset()));
    }
    Ok(spans)
}

/// Calls `each` with the records of `batches` inside `ranges` (sorted), each with the index
/// of its range, in offset order.
fn records_of(
    topic: &Arc<str>,
    partition: i32,
    batches: &Bytes,
    ranges: &[AcquiredRange],
    mut each: impl FnMut(crate::ConsumerRecord, usize),
) -> Result<(), ClientError> {
    let mut decoder = Decoder::default();
    decoder.push(vec![Chunk {
        topic: Arc::clone(topic),
        partition,
        incarnation: 0,
        from: ranges[0].first_offset,
        next: 0,
        batches: batches.clone(),
    }]);
    let mut i = 0;
    loop {
        let record = match decoder.next_record() {
            Some(record) => record?,
            None if decoder.advance() => continue,
            None => break,
        };
        let offset = record.offset;
        while i < ranges.len() && ranges[i].last_offset < offset {
            i += 1;
        }
        if i == ranges.len() {
            break;
        }
        if ranges[i].first_offset <= offset {
            each(record, i);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shares::fake::batches;

    fn range(first_offset: u64, last_offset: u64, token: u64) -> AcquiredRange {
        AcquiredRange {
            first_offset,
            last_offset,
            delivery_count: 1,
            token,
        }
    }

    #[test]
    fn only_acquired_records_are_delivered_and_acquired_offsets_past_the_batches_are_released() {
        let tx = Arc::new(AckQueue::new(1));
        let topic: Arc<str> = Arc::from("orders");
        // Lock states in blocks and one by one must come out alike.
        for shared in [true, false] {
            let data = SharePartitionData {
                partition: 1,
                batches: batches(0, 10, 4),
                acquired: vec![range(7, 11, 9), range(2, 3, 8)],
            };
            let decoded = decode(&topic, vec![data], 1_000, &tx, shared);
            let got: Vec<(u64, u64, u64)> = decoded
                .deliveries
                .iter()
                .map(|d| (d.record.offset, d.held.offset, d.held.token))
                .collect();
            assert_eq!(
                got,
                [(2, 2, 8), (3, 3, 8), (7, 7, 9), (8, 8, 9), (9, 9, 9)],
                "shared {shared}"
            );
            assert_eq!(decoded.deliveries[0].record.value.as_deref(), Some(&b"v2"[..]));
            let gaps: Vec<(u64, u64, AckKind)> = decoded
                .gaps
                .iter()
                .map(|g| (g.held.offset, g.held.token, g.kind.clone()))
                .collect();
            assert_eq!(
                gaps,
                [(10, 9, AckKind::Release(0)), (11, 9, AckKind::Release(0))],
                "shared {shared}"
            );
            assert!(decoded.errors.is_empty());
        }
    }

    #[test]
    fn an_empty_range_in_an_answer_moves_no_other_delivery_onto_another_records_lock_state() {
        let tx = Arc::new(AckQueue::new(1));
        let topic: Arc<str> = Arc::from("orders");
        let data = SharePartitionData {
            partition: 0,
            batches: batches(0, 10, 4),
            // A range whose last offset is before its first names no record.
            acquired: vec![range(5, 3, 7), range(6, 8, 9)],
        };
        let decoded = decode(&topic, vec![data], 1_000, &tx, true);
        let got: Vec<(u64, u64, u64)> = decoded
            .deliveries
            .iter()
            .map(|d| (d.record.offset, d.held.offset, d.held.token))
            .collect();
        assert_eq!(got, [(6, 6, 9), (7, 7, 9), (8, 8, 9)]);
    }

    #[test]
    fn a_batch_failing_its_crc_delivers_nothing_of_its_partition_and_releases_what_was_acquired() {
        let tx = Arc::new(AckQueue::new(1));
        let topic: Arc<str> = Arc::from("orders");
        let mut bytes = batches(0, 4, 4).to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        let data = SharePartitionData {
            partition: 0,
            batches: Bytes::from(bytes),
            acquired: vec![range(0, 3, 1)],
        };
        let decoded = decode(&topic, vec![data], 1_000, &tx, true);
        assert!(decoded.deliveries.is_empty());
        assert_eq!(decoded.gaps.len(), 4);
        assert!(decoded.gaps.iter().all(|g| g.kind == AckKind::Release(0)));
        assert!(
            matches!(decoded.errors[..], [ClientError::CorruptBatch { .. }]),
            "{:?}",
            decoded.errors
        );
    }
}
