//! Sequence numbers of an idempotent producer, per partition (see `docs/producer.md`).
//!
//! Each partition writes under its own producer identity (id, epoch) and numbers its records
//! from 0 under it: a batch of n records takes sequences `base .. base + n`. The broker keeps,
//! per (producer id, partition), the last sequence appended and the last 5 batches, so a
//! resent batch that was already written is answered with its original offsets instead of
//! being written twice.
//!
//! # Invariants
//! - A batch gets its base sequence once, when it is first sent, in sealing order within its
//!   partition; every resend carries the identical bytes.
//! - Sequences of a partition under one identity have no gaps among the batches sent: when a
//!   sent batch fails for good (its gap would make the broker refuse every later batch), the
//!   broker has lost the producer's state (UNKNOWN_PRODUCER_ID), or the next batch would
//!   carry a sequence past `i32::MAX`, the partition takes a new producer id once nothing of
//!   it is in flight, and its unacknowledged batches are numbered again from 0. Records of
//!   those batches that had been sent before may have been written under the old id: the
//!   broker cannot tell them from new ones, so they are counted as unvouched.
//! - At most [`MAX_IN_FLIGHT_PER_PARTITION`] batches of a partition are in flight, so every
//!   batch whose outcome is unknown is still within the broker's duplicate window when it is
//!   resent.
//!
//! # Thread-safety
//! [`Sequencer`] is owned by the sender task. [`Status`] is shared with the producer handles.

use std::collections::{HashMap, VecDeque};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use conveyor_proto::v1::{ErrorCode, InitProducerResponse};
use conveyor_storage::batch::ProducerInfo;

use super::sender::PartitionKey;
use super::{Sealed, key_of};
use crate::error::{ClientError, Result};

/// Batches of one partition in flight at once: the broker remembers the last 5 batches of
/// each producer on a partition, and a resent batch must still be among them.
pub const MAX_IN_FLIGHT_PER_PARTITION: usize = 5;

/// A producer id and its epoch, as `InitProducer` issues them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIdentity {
    pub producer_id: i64,
    pub producer_epoch: i16,
}

impl TryFrom<InitProducerResponse> for ProducerIdentity {
    type Error = ClientError;

    fn try_from(r: InitProducerResponse) -> Result<ProducerIdentity> {
        let producer_epoch = i16::try_from(r.producer_epoch).ok().filter(|e| *e >= 0);
        match producer_epoch {
            Some(producer_epoch) if r.producer_id >= 0 => Ok(ProducerIdentity {
                producer_id: r.producer_id,
                producer_epoch,
            }),
            _ => Err(ClientError::InvalidArgument(format!(
                "the broker issued an invalid producer identity (id {}, epoch {})",
                r.producer_id, r.producer_epoch
            ))),
        }
    }
}

/// What the producer handles and the sender share: whether the producer stopped for good,
/// and how many records it could not vouch for.
#[derive(Debug, Default)]
pub(crate) struct Status {
    stopped: OnceLock<ClientError>,
    unvouched: AtomicU64,
}

impl Status {
    /// Stops the producer for good; the first cause stands.
    pub(crate) fn stop(&self, reason: String, code: Option<ErrorCode>) {
        let _ = self.stopped.set(ClientError::ProducerStopped { reason, code });
    }

    /// The error every send fails with once the producer stopped.
    pub(crate) fn stopped(&self) -> Option<ClientError> {
        self.stopped.get().cloned()
    }

    pub(crate) fn unvouched(&self) -> u64 {
        self.unvouched.load(Ordering::Relaxed)
    }
}

/// What [`Sequencer::stamp`] did with a batch about to be sent.
#[derive(Debug)]
pub(crate) enum Stamp {
    /// The batch carries its producer identity and sequence: send it.
    Ready,
    /// The partition has no producer id yet: hold the batch and ask for one.
    NeedsId,
    /// The partition takes a new producer id once nothing of it is in flight: hold it.
    AwaitingReset,
    /// The batch could not be stamped (its bytes are malformed): fail it.
    Failed(ClientError),
}

/// Why a partition takes a new producer id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResetCause {
    /// The broker has no state for the partition's producer id (expired).
    UnknownProducerId,
    /// A batch that had been given a sequence failed for good: later sequences would never
    /// be accepted.
    Gap,
    /// The next batch's sequences would pass `i32::MAX`.
    SequenceExhausted,
}

/// One partition's producer identity and sequence.
#[derive(Debug, Default)]
struct PartitionSequence {
    /// The identity and its generation (see [`Sequencer::generation`]).
    identity: Option<(ProducerIdentity, u64)>,
    /// The base sequence of the next batch stamped (wider than a sequence: after a batch
    /// ending at `i32::MAX` it is past every sequence).
    next: i64,
    /// The sequence after the last acknowledged batch.
    acknowledged: i64,
    reset: Option<ResetCause>,
    /// The partition may only take an identity of this generation or a later one: after a
    /// reset, not the one it had.
    min_generation: u64,
}

/// Per-partition sequence state of an idempotent producer. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Sequencer {
    partitions: HashMap<PartitionKey, PartitionSequence>,
    /// The latest identity issued, and its generation: how many were issued until it.
    latest: Option<(ProducerIdentity, u64)>,
    generation: u64,
    /// A partition waits for an identity newer than `latest`.
    wants_id: bool,
}

impl Sequencer {
    /// Gives `batch` its producer identity and base sequence if it has none yet (its first
    /// send under the partition's identity), restamping its bytes.
    pub(crate) fn stamp(&mut self, batch: &mut Sealed) -> Stamp {
        if batch.producer.is_some() {
            return Stamp::Ready;
        }
        let p = self.partitions.entry(key_of(batch)).or_default();
        if p.reset.is_some() {
            return Stamp::AwaitingReset;
        }
        let (identity, _) = match (p.identity, self.latest) {
            (Some(identity), _) => identity,
            (None, Some(latest)) if latest.1 >= p.min_generation => {
                p.identity = Some(latest);
                latest
            }
            (None, _) => {
                self.wants_id = true;
                return Stamp::NeedsId;
            }
        };
        let last = p.next + i64::from(batch.records.max(1)) - 1;
        let base_sequence = match i32::try_from(p.next) {
            Ok(base) if last <= i64::from(i32::MAX) => base,
            _ => {
                p.reset = Some(ResetCause::SequenceExhausted);
                return Stamp::AwaitingReset;
            }
        };
        let info = ProducerInfo {
            producer_id: identity.producer_id,
            producer_epoch: identity.producer_epoch,
            base_sequence,
        };
        if let Err(e) = batch.restamp(info) {
            return Stamp::Failed(e.into());
        }
        batch.producer = Some(info);
        p.next = last + 1;
        Stamp::Ready
    }

    /// True when a partition waits for a new producer id.
    pub(crate) fn wants_id(&self) -> bool {
        self.wants_id
    }

    /// A new identity arrived from `InitProducer`.
    pub(crate) fn issued(&mut self, identity: ProducerIdentity) {
        self.generation += 1;
        self.latest = Some((identity, self.generation));
        self.wants_id = false;
    }

    /// The batch was acknowledged.
    pub(crate) fn acknowledged(&mut self, batch: &Sealed) {
        if let Some(p) = self.current(batch) {
            let end = batch.end_sequence();
            p.acknowledged = p.acknowledged.max(end);
        }
    }

    /// True when `batch` is the partition's first unacknowledged batch: a refusal of it for
    /// sequence reasons is not caused by an earlier batch of ours.
    pub(crate) fn is_first_unacknowledged(&mut self, batch: &Sealed) -> bool {
        let base = batch.producer.map(|p| i64::from(p.base_sequence));
        self.current(batch).is_some_and(|p| Some(p.acknowledged) == base)
    }

    /// The broker has no state for the batch's producer id on its partition.
    pub(crate) fn unknown_producer(&mut self, batch: &Sealed) {
        self.mark_reset(batch, ResetCause::UnknownProducerId);
    }

    /// The batch failed for good. If it had a sequence, later ones can never be accepted.
    pub(crate) fn failed_for_good(&mut self, batch: &Sealed) {
        self.mark_reset(batch, ResetCause::Gap);
    }

    fn mark_reset(&mut self, batch: &Sealed, cause: ResetCause) {
        if let Some(p) = self.current(batch) {
            p.reset.get_or_insert(cause);
        }
    }

    /// The partition state `batch` was stamped under, if it is still the partition's.
    fn current(&mut self, batch: &Sealed) -> Option<&mut PartitionSequence> {
        let info = batch.producer?;
        let p = self.partitions.get_mut(&key_of(batch))?;
        let (identity, _) = p.identity?;
        (identity.producer_id == info.producer_id && identity.producer_epoch == info.producer_epoch).then_some(p)
    }

    /// Partitions waiting to take a new producer id.
    pub(crate) fn resets_pending(&self) -> Vec<PartitionKey> {
        self.partitions
            .iter()
            .filter(|(_, p)| p.reset.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Switches `key` to a new producer id; call only while nothing of it is in flight.
    /// Every unacknowledged batch of it (all in `queue`) loses its sequence and is numbered
    /// again from 0 when next sent. Records of those that had been sent are added to the
    /// unvouched count. Returns how many records that was.
    pub(crate) fn reset(&mut self, key: &PartitionKey, queue: &mut VecDeque<Sealed>, status: &Status) -> u64 {
        let Some(p) = self.partitions.get_mut(key) else {
            return 0;
        };
        let cause = p.reset.take();
        let old = p.identity.take();
        *p = PartitionSequence {
            min_generation: self.generation + 1,
            ..PartitionSequence::default()
        };
        self.wants_id = true;
        let mut unvouched = 0u64;
        for batch in queue.iter_mut().filter(|b| key_of(b) == *key) {
            batch.producer = None;
            if batch.sent && !batch.unvouched {
                batch.unvouched = true;
                unvouched += u64::from(batch.records);
            }
        }
        if unvouched > 0 {
            status.unvouched.fetch_add(unvouched, Ordering::Relaxed);
        }
        tracing::warn!(
            topic = %key.0,
            partition = key.1,
            ?cause,
            old_producer_id = old.map(|(i, _)| i.producer_id),
            unvouched,
            "partition takes a new producer id; records sent under the old one and resent may be duplicated"
        );
        unvouched
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use conveyor_storage::batch::{BatchBuilder, BatchHeader, Compression, Record, RecordBatch};

    use super::*;

    const ID: ProducerIdentity = ProducerIdentity {
        producer_id: 40,
        producer_epoch: 0,
    };

    fn batch(partition: i32, seal_seq: u64, records: u32) -> Sealed {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..records {
            b.push(&Record {
                timestamp: 1,
                value: Some(Bytes::from(format!("r{i}"))),
                ..Record::default()
            });
        }
        Sealed::for_test(Arc::from("t"), partition, b.build().expect("build"), records, seal_seq)
    }

    fn header(b: &Sealed) -> BatchHeader {
        let parsed = RecordBatch::parse(b.bytes.clone()).expect("parse");
        parsed.verify_crc().expect("crc");
        *parsed.header()
    }

    #[test]
    fn batches_wait_for_an_id_then_take_consecutive_sequences_per_partition() {
        let mut s = Sequencer::default();
        let mut a = batch(0, 0, 3);
        assert!(matches!(s.stamp(&mut a), Stamp::NeedsId));
        assert!(s.wants_id());
        assert_eq!(header(&a).producer, ProducerInfo::NONE, "not stamped while waiting");
        s.issued(ID);
        assert!(!s.wants_id());
        let mut b = batch(0, 1, 2);
        let mut other = batch(1, 2, 4);
        for x in [&mut a, &mut b, &mut other] {
            assert!(matches!(s.stamp(x), Stamp::Ready));
        }
        let expect = |base| ProducerInfo {
            producer_id: 40,
            producer_epoch: 0,
            base_sequence: base,
        };
        assert_eq!(header(&a).producer, expect(0));
        assert_eq!(header(&b).producer, expect(3), "after the 3 records of the first batch");
        assert_eq!(header(&other).producer, expect(0), "each partition counts from 0");
        // A resend keeps the identical bytes.
        let before = b.bytes.clone();
        assert!(matches!(s.stamp(&mut b), Stamp::Ready));
        assert_eq!(b.bytes, before);
        assert_eq!(b.producer, Some(expect(3)));
    }

    #[test]
    fn restamping_a_batch_nobody_else_holds_reuses_its_buffer() {
        let mut s = Sequencer::default();
        s.issued(ID);
        let mut a = batch(0, 0, 5);
        let at = a.bytes.as_ptr();
        assert!(matches!(s.stamp(&mut a), Stamp::Ready));
        assert_eq!(a.bytes.as_ptr(), at, "restamped in place");
    }

    #[test]
    fn an_unknown_producer_id_renumbers_the_unacknowledged_batches_from_zero_under_a_new_id() {
        let status = Status::default();
        let mut s = Sequencer::default();
        s.issued(ID);
        let key: PartitionKey = (Arc::from("t"), 0);
        let mut queue = VecDeque::new();
        for i in 0..3 {
            let mut b = batch(0, i, 2);
            assert!(matches!(s.stamp(&mut b), Stamp::Ready));
            b.sent = true;
            queue.push_back(b);
        }
        let first = queue.pop_front().expect("first");
        s.acknowledged(&first);
        assert!(s.is_first_unacknowledged(&queue[0]));
        assert!(!s.is_first_unacknowledged(&queue[1]));
        s.unknown_producer(&queue[0]);
        assert_eq!(s.resets_pending(), vec![key.clone()]);
        // A batch not sent yet waits for the reset.
        let mut later = batch(0, 3, 1);
        assert!(matches!(s.stamp(&mut later), Stamp::AwaitingReset));
        queue.push_back(later);
        assert_eq!(
            s.reset(&key, &mut queue, &status),
            4,
            "the two sent batches of 2 records"
        );
        assert_eq!(status.unvouched(), 4);
        assert!(s.resets_pending().is_empty());
        // The old id is not taken again: a new one is needed.
        assert!(matches!(s.stamp(&mut queue[0]), Stamp::NeedsId));
        s.issued(ProducerIdentity {
            producer_id: 41,
            producer_epoch: 0,
        });
        let mut bases = Vec::new();
        for b in queue.iter_mut() {
            assert!(matches!(s.stamp(b), Stamp::Ready));
            let h = header(b);
            assert_eq!(h.producer.producer_id, 41);
            bases.push(h.producer.base_sequence);
        }
        assert_eq!(bases, vec![0, 2, 4]);
        // A second reset does not count the same records twice.
        s.failed_for_good(&queue[0]);
        assert_eq!(s.reset(&key, &mut queue, &status), 0);
        assert_eq!(status.unvouched(), 4);
    }

    #[test]
    fn a_failure_under_an_old_id_does_not_reset_the_partition_again() {
        let status = Status::default();
        let mut s = Sequencer::default();
        s.issued(ID);
        let key: PartitionKey = (Arc::from("t"), 0);
        let mut old = batch(0, 0, 1);
        assert!(matches!(s.stamp(&mut old), Stamp::Ready));
        let stale = old.producer;
        s.failed_for_good(&old);
        s.reset(&key, &mut VecDeque::new(), &status);
        s.issued(ProducerIdentity {
            producer_id: 50,
            producer_epoch: 0,
        });
        let mut fresh = batch(0, 1, 1);
        assert!(matches!(s.stamp(&mut fresh), Stamp::Ready));
        let mut late = batch(0, 2, 1);
        late.producer = stale;
        s.failed_for_good(&late);
        assert!(s.resets_pending().is_empty());
    }

    #[test]
    fn a_batch_whose_sequences_would_pass_i32_max_waits_for_a_new_id() {
        let mut s = Sequencer::default();
        s.issued(ID);
        let mut first = batch(0, 0, 1);
        assert!(matches!(s.stamp(&mut first), Stamp::Ready));
        s.partitions.values_mut().for_each(|p| p.next = i64::from(i32::MAX) - 1);
        let mut fits = batch(0, 1, 2);
        assert!(matches!(s.stamp(&mut fits), Stamp::Ready), "takes MAX-1 and MAX");
        assert_eq!(header(&fits).producer.base_sequence, i32::MAX - 1);
        let mut over = batch(0, 2, 1);
        assert!(matches!(s.stamp(&mut over), Stamp::AwaitingReset));
        assert_eq!(
            s.partitions.values().next().and_then(|p| p.reset),
            Some(ResetCause::SequenceExhausted)
        );
    }
}
