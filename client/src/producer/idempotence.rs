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
//! - A partition leaves its identity only by a reset: it keeps its producer id, bumps the
//!   epoch by one and numbers its waiting batches again from 0. The broker accepts a newer
//!   epoch starting at sequence 0 and from then on refuses the older epoch
//!   (PRODUCER_FENCED), so a late copy of a batch under the old epoch that reaches the
//!   partition after the new epoch's first write is refused, not stored. A copy that reaches
//!   it before that write can still be stored: the records of every renumbered batch that
//!   had been sent are counted as unvouched ([`Status::unvouched`]). Only when the epoch
//!   would pass `i16::MAX` does the partition take a new id from `InitProducer` instead.
//! - A partition resets only when
//!   - the broker refused the partition's first outstanding batch (no earlier batch of it
//!     still unresolved) with UNKNOWN_PRODUCER_ID, or with OUT_OF_ORDER_SEQUENCE after a
//!     batch that failed for good, and nothing of the partition is in flight: the sequences
//!     the broker expects and the ones the client would send no longer meet;
//!   - or the next batch's sequences would pass `i32::MAX`: then only once every batch
//!     stamped under the old identity is acknowledged or failed, and only batches never
//!     stamped are renumbered.
//!
//!   A batch that fails for good (delivery timeout, retries used up) does not by itself
//!   change the identity: its outcome may be unknown, and the next batch sent under the same
//!   identity tells: acknowledged, the failed one was written; refused as above, it was not
//!   (as far as the broker has seen: a copy still on its way may land later, which is why
//!   the reset bumps the epoch).
//! - PRODUCER_FENCED for a batch stamped under an identity its partition has left (an older
//!   epoch, or an older id) is about a copy the partition gave up on: that batch fails, the
//!   producer goes on. For the partition's current identity it stops the producer.
//! - At most [`MAX_IN_FLIGHT_PER_PARTITION`] batches of a partition are in flight, so every
//!   batch whose outcome is unknown is still within the broker's duplicate window when it is
//!   resent.
//!
//! # Thread-safety
//! [`Sequencer`] is owned by the sender task. [`Status`] is shared with the producer handles.

use std::collections::{BTreeSet, HashMap, VecDeque};
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
/// and how many records it could not vouch for (see [`Status::unvouched`]).
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

    /// Records of batches that had been sent and were then renumbered by a reset, summed
    /// over every reset: a copy of each sent under the old identity may still have been
    /// stored before the new one's first write, so each may be stored twice.
    pub(crate) fn unvouched(&self) -> u64 {
        self.unvouched.load(Ordering::Relaxed)
    }

    /// Adds `records` renumbered after being sent (what [`Sequencer::reset`] returns).
    pub(crate) fn add_unvouched(&self, records: u64) {
        self.unvouched.fetch_add(records, Ordering::Relaxed);
    }
}

/// What [`Sequencer::stamp`] did with a batch about to be sent.
#[derive(Debug)]
pub(crate) enum Stamp {
    /// The batch carries its producer identity and sequence: send it.
    Ready,
    /// The partition has no producer id yet: hold the batch and ask for one.
    NeedsId,
    /// The partition resets (a new epoch) once nothing of it is in flight: hold it.
    AwaitingReset,
    /// The batch could not be stamped (its bytes are malformed): fail it.
    Failed(ClientError),
}

/// Why a partition resets: a new epoch of its id, its waiting batches numbered from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResetCause {
    /// The broker has no state for the partition's producer id (expired): answered to the
    /// partition's first outstanding batch.
    UnknownProducerId,
    /// The partition's first outstanding batch was refused OUT_OF_ORDER_SEQUENCE after a
    /// batch that failed for good: the broker missed a sequence, so none after it will be
    /// appended under this identity.
    Gap,
    /// The next batch's sequences would pass `i32::MAX`.
    SequenceExhausted,
}

impl ResetCause {
    /// The broker refused the first outstanding batch: the partition resets as soon as
    /// nothing of it is in flight, without waiting for its other stamped batches.
    fn refused(self) -> bool {
        matches!(self, ResetCause::UnknownProducerId | ResetCause::Gap)
    }
}

/// One partition's producer identity and sequence.
#[derive(Debug, Default)]
struct PartitionSequence {
    /// The identity stamped on the partition's batches; a reset bumps its epoch.
    identity: Option<ProducerIdentity>,
    /// The base sequence of the next batch stamped (wider than a sequence: after a batch
    /// ending at `i32::MAX` it is past every sequence).
    next: i64,
    /// The sequence after the last acknowledged batch.
    acknowledged: i64,
    /// Base sequences of the batches stamped under `identity` and neither acknowledged nor
    /// failed (in flight or queued for a resend). At most the sender's queue.
    outstanding: BTreeSet<i64>,
    reset: Option<ResetCause>,
    /// The partition may only take an id of this generation or a later one: after its epochs
    /// ran out, not the id it had.
    min_generation: u64,
}

/// Per-partition sequence state of an idempotent producer. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Sequencer {
    partitions: HashMap<PartitionKey, PartitionSequence>,
    /// The latest identity issued.
    latest: Option<ProducerIdentity>,
    /// How many identities were issued, `latest` included.
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
        let identity = match (p.identity, self.latest) {
            (Some(identity), _) => identity,
            (None, Some(latest)) if self.generation >= p.min_generation => {
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
        p.outstanding.insert(p.next);
        p.next = last + 1;
        Stamp::Ready
    }

    /// True when a batch found its partition without a producer id since the last
    /// [`Sequencer::begin_pass`].
    pub(crate) fn wants_id(&self) -> bool {
        self.wants_id
    }

    /// A dispatch pass begins: an id is wanted only if a batch of this pass waits for one,
    /// so a producer whose waiting batches all failed stops asking.
    pub(crate) fn begin_pass(&mut self) {
        self.wants_id = false;
    }

    /// A new identity arrived from `InitProducer`.
    pub(crate) fn issued(&mut self, identity: ProducerIdentity) {
        self.generation += 1;
        self.latest = Some(identity);
        self.wants_id = false;
    }

    /// The batch was acknowledged.
    pub(crate) fn acknowledged(&mut self, batch: &Sealed) {
        let base = batch.producer.map(|p| i64::from(p.base_sequence));
        if let Some(p) = self.current(batch) {
            let end = batch.end_sequence();
            p.acknowledged = p.acknowledged.max(end);
            if let Some(base) = base {
                p.outstanding.remove(&base);
            }
            // The broker appended a batch under this identity, so it knows the producer and
            // holds every sequence below: a refusal that looked like a gap (or an unknown
            // id) was answered before a copy on its way landed. The refused batch goes out
            // again as it is and is answered as a duplicate; a new epoch would store it twice.
            if p.reset.is_some_and(ResetCause::refused) {
                p.reset = None;
            }
        }
    }

    /// True when `batch` is its partition's first outstanding batch: no earlier batch of it
    /// is unresolved, so a refusal of it for sequence reasons is not caused by one of ours
    /// still on its way.
    pub(crate) fn is_first_outstanding(&mut self, batch: &Sealed) -> bool {
        let base = batch.producer.map(|p| i64::from(p.base_sequence));
        self.current(batch)
            .is_some_and(|p| base.is_some() && p.outstanding.first().copied() == base)
    }

    /// True when a batch before `batch` failed for good without a later one acknowledged
    /// since: the sequences between the last acknowledged batch and `batch` may be missing.
    pub(crate) fn follows_a_failure(&mut self, batch: &Sealed) -> bool {
        let base = batch.producer.map_or(0, |p| i64::from(p.base_sequence));
        self.current(batch).is_some_and(|p| p.acknowledged < base)
    }

    /// The broker refused `batch`, its partition's first outstanding one, in a way that
    /// means no later sequence will be appended under its identity (see the module doc).
    pub(crate) fn refused_for_good(&mut self, batch: &Sealed, cause: ResetCause) {
        debug_assert!(cause.refused());
        if let Some(p) = self.current(batch) {
            // A refusal needs no waiting for the stamped batches: it outranks running out of
            // sequences.
            if p.reset.is_none_or(|r| !r.refused()) {
                p.reset = Some(cause);
            }
        }
    }

    /// The batch failed for good. Nothing changes identity for it: the next batch sent
    /// under the same identity shows whether it was written.
    pub(crate) fn failed_for_good(&mut self, batch: &Sealed) {
        let base = batch.producer.map(|p| i64::from(p.base_sequence));
        if let (Some(p), Some(base)) = (self.current(batch), base) {
            p.outstanding.remove(&base);
        }
    }

    /// Whether a PRODUCER_FENCED answer to `batch` is about an identity its partition has
    /// left (an older epoch of its id, or an older id): a copy given up on or renumbered, not
    /// a reason to stop. False for the partition's current identity.
    pub(crate) fn superseded(&self, batch: &Sealed) -> bool {
        let Some(info) = batch.producer else {
            return false;
        };
        let Some(p) = self.partitions.get(&key_of(batch)) else {
            return false;
        };
        match p.identity {
            Some(current) => current.producer_id != info.producer_id || current.producer_epoch > info.producer_epoch,
            // Its epochs ran out and it waits for a new id: every stamp it made is older.
            None => true,
        }
    }

    /// The partition state `batch` was stamped under, if it is still the partition's.
    fn current(&mut self, batch: &Sealed) -> Option<&mut PartitionSequence> {
        let info = batch.producer?;
        let p = self.partitions.get_mut(&key_of(batch))?;
        let identity = p.identity?;
        (identity.producer_id == info.producer_id && identity.producer_epoch == info.producer_epoch).then_some(p)
    }

    /// Partitions waiting to reset.
    pub(crate) fn resets_pending(&self) -> Vec<PartitionKey> {
        self.partitions
            .iter()
            .filter(|(_, p)| p.reset.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Whether `key` may reset now, `idle` saying that nothing of it is in flight: after a
    /// refusal, once idle; when sequences ran out, once every batch stamped under the old
    /// identity is acknowledged or failed.
    pub(crate) fn ready_to_reset(&self, key: &PartitionKey, idle: bool) -> bool {
        self.partitions.get(key).is_some_and(|p| match p.reset {
            Some(ResetCause::SequenceExhausted) => p.outstanding.is_empty(),
            Some(_) => idle,
            None => false,
        })
    }

    /// Resets `key`; call only when [`Sequencer::ready_to_reset`]. The partition keeps its
    /// producer id under the next epoch (a new id from `InitProducer` once the epoch would
    /// pass `i16::MAX`), and every batch of it in `queue` loses its sequence and is numbered
    /// again from 0 when next sent. Returns the records of those batches that had been sent
    /// before: a copy of each under the old epoch may still be stored if it reaches the
    /// partition before the new epoch's first write, so they are unvouched.
    pub(crate) fn reset(&mut self, key: &PartitionKey, queue: &mut VecDeque<Sealed>) -> u64 {
        let Some(p) = self.partitions.get_mut(key) else {
            return 0;
        };
        let cause = p.reset.take();
        let old = p.identity.take();
        let bumped = old.and_then(|identity| {
            Some(ProducerIdentity {
                producer_epoch: identity.producer_epoch.checked_add(1)?,
                ..identity
            })
        });
        *p = PartitionSequence {
            identity: bumped,
            min_generation: self.generation + 1,
            ..PartitionSequence::default()
        };
        let mut resent = 0u64;
        for batch in queue.iter_mut().filter(|b| key_of(b) == *key) {
            batch.producer = None;
            if batch.sent {
                resent += u64::from(batch.records);
            }
        }
        tracing::info!(
            topic = %key.0,
            partition = key.1,
            ?cause,
            old = ?old,
            new = ?bumped,
            unvouched = resent,
            "partition resets; its waiting batches are numbered again from 0"
        );
        resent
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

    fn info(producer_id: i64, producer_epoch: i16, base_sequence: i32) -> ProducerInfo {
        ProducerInfo {
            producer_id,
            producer_epoch,
            base_sequence,
        }
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
        assert_eq!(header(&a).producer, info(40, 0, 0));
        assert_eq!(
            header(&b).producer,
            info(40, 0, 3),
            "after the 3 records of the first batch"
        );
        assert_eq!(header(&other).producer, info(40, 0, 0), "each partition counts from 0");
        // A resend keeps the identical bytes.
        let before = b.bytes.clone();
        assert!(matches!(s.stamp(&mut b), Stamp::Ready));
        assert_eq!(b.bytes, before);
        assert_eq!(b.producer, Some(info(40, 0, 3)));
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

    /// A sequencer issued `identity` and `n` batches of 2 records of partition 0 stamped
    /// under it and sent, in sealing order.
    fn sent(identity: ProducerIdentity, n: u64) -> (Sequencer, VecDeque<Sealed>) {
        let mut s = Sequencer::default();
        s.issued(identity);
        let mut queue = VecDeque::new();
        for i in 0..n {
            let mut b = batch(0, i, 2);
            assert!(matches!(s.stamp(&mut b), Stamp::Ready));
            b.sent = true;
            queue.push_back(b);
        }
        (s, queue)
    }

    fn key() -> PartitionKey {
        (Arc::from("t"), 0)
    }

    #[test]
    fn an_unknown_producer_id_for_the_first_outstanding_batch_renumbers_the_waiting_batches_under_the_next_epoch() {
        let (mut s, mut queue) = sent(ID, 3);
        let first = queue.pop_front().expect("first");
        s.acknowledged(&first);
        assert!(s.is_first_outstanding(&queue[0]));
        assert!(!s.is_first_outstanding(&queue[1]));
        s.refused_for_good(&queue[0], ResetCause::UnknownProducerId);
        assert_eq!(s.resets_pending(), vec![key()]);
        assert!(!s.ready_to_reset(&key(), false), "not while a batch is in flight");
        assert!(s.ready_to_reset(&key(), true));
        // A batch not sent yet waits for the reset.
        let mut later = batch(0, 3, 1);
        assert!(matches!(s.stamp(&mut later), Stamp::AwaitingReset));
        queue.push_back(later);
        let stale = queue[0].producer;
        assert_eq!(
            s.reset(&key(), &mut queue),
            4,
            "the two sent batches of 2 records (a late copy of each may still land), not the unsent one"
        );
        assert!(s.resets_pending().is_empty());
        // The same id under the next epoch, at once: no InitProducer.
        s.begin_pass();
        let mut stamps = Vec::new();
        for b in queue.iter_mut() {
            assert!(matches!(s.stamp(b), Stamp::Ready));
            stamps.push(header(b).producer);
        }
        assert!(!s.wants_id());
        assert_eq!(stamps, vec![info(40, 1, 0), info(40, 1, 2), info(40, 1, 4)]);
        let mut late = batch(0, 9, 2);
        late.producer = stale;
        assert!(s.superseded(&late), "epoch 0 was left behind");
        assert!(!s.superseded(&queue[0]), "epoch 1 is the partition's");
    }

    #[test]
    fn a_batch_that_failed_for_good_leaves_the_identity_until_the_next_one_shows_a_gap() {
        let (mut s, mut queue) = sent(ID, 3);
        // The first batch timed out: its outcome is unknown.
        let failed = queue.pop_front().expect("first");
        s.failed_for_good(&failed);
        assert!(s.resets_pending().is_empty(), "a failure alone changes nothing");
        assert!(s.is_first_outstanding(&queue[0]));
        assert!(s.follows_a_failure(&queue[0]));
        // Acknowledged: the failed batch was written after all; the identity goes on.
        let landed = queue.pop_front().expect("second");
        s.acknowledged(&landed);
        assert!(!s.follows_a_failure(&queue[0]));
        let mut next = batch(0, 3, 1);
        assert!(matches!(s.stamp(&mut next), Stamp::Ready));
        assert_eq!(header(&next).producer.base_sequence, 6, "numbering goes on");

        // A failure, then the next batch refused out of order: a gap.
        s.failed_for_good(&queue[0]);
        queue.clear();
        next.sent = true;
        assert!(s.is_first_outstanding(&next) && s.follows_a_failure(&next));
        s.refused_for_good(&next, ResetCause::Gap);
        queue.push_back(next);
        assert!(s.ready_to_reset(&key(), true));
        assert_eq!(s.reset(&key(), &mut queue), 1, "the refused batch had been sent");
        assert!(matches!(s.stamp(&mut queue[0]), Stamp::Ready));
        assert_eq!(header(&queue[0]).producer, info(40, 1, 0));
    }

    #[test]
    fn an_acknowledgement_after_a_refusal_shows_there_was_no_gap_and_cancels_the_reset() {
        let (mut s, mut queue) = sent(ID, 3);
        // B1 failed for good while a copy of it was still on an abandoned stream; B2 was
        // refused out of order before that copy landed; then B3 was appended.
        s.failed_for_good(&queue[0]);
        assert!(s.is_first_outstanding(&queue[1]) && s.follows_a_failure(&queue[1]));
        s.refused_for_good(&queue[1], ResetCause::Gap);
        s.acknowledged(&queue[2]);
        assert!(
            !s.ready_to_reset(&key(), true),
            "an append under the same identity proves no sequence is missing"
        );
        let before = queue[1].bytes.clone();
        assert!(matches!(s.stamp(&mut queue[1]), Stamp::Ready));
        assert_eq!(queue[1].bytes, before, "B2 goes out again unchanged, under epoch 0");
        let mut next = batch(0, 9, 1);
        assert!(
            matches!(s.stamp(&mut next), Stamp::Ready),
            "new batches are not held for a reset"
        );
        assert_eq!(header(&next).producer.producer_epoch, 0);
    }

    #[test]
    fn a_failure_under_an_old_epoch_does_not_touch_the_new_one() {
        let (mut s, mut queue) = sent(ID, 1);
        let stale = queue[0].producer;
        s.refused_for_good(&queue[0], ResetCause::UnknownProducerId);
        s.reset(&key(), &mut queue);
        assert!(matches!(s.stamp(&mut queue[0]), Stamp::Ready));
        let mut late = batch(0, 2, 1);
        late.producer = stale;
        s.refused_for_good(&late, ResetCause::Gap);
        s.failed_for_good(&late);
        s.acknowledged(&late);
        assert!(s.resets_pending().is_empty());
        assert!(
            s.is_first_outstanding(&queue[0]),
            "the renumbered batch is still outstanding"
        );
    }

    #[test]
    fn a_partition_whose_epoch_would_pass_i16_max_takes_a_new_id() {
        let (mut s, mut queue) = sent(
            ProducerIdentity {
                producer_id: 40,
                producer_epoch: i16::MAX - 1,
            },
            1,
        );
        s.refused_for_good(&queue[0], ResetCause::UnknownProducerId);
        s.reset(&key(), &mut queue);
        assert!(matches!(s.stamp(&mut queue[0]), Stamp::Ready));
        assert_eq!(header(&queue[0]).producer.producer_epoch, i16::MAX);
        let at_max = queue[0].producer;
        s.refused_for_good(&queue[0], ResetCause::UnknownProducerId);
        assert_eq!(s.reset(&key(), &mut queue), 2);
        s.begin_pass();
        assert!(
            matches!(s.stamp(&mut queue[0]), Stamp::NeedsId),
            "no epoch past i16::MAX"
        );
        assert!(s.wants_id());
        let mut late = batch(0, 5, 1);
        late.producer = at_max;
        assert!(s.superseded(&late), "the old id is left while the new one is awaited");
        s.issued(ProducerIdentity {
            producer_id: 41,
            producer_epoch: 0,
        });
        assert!(matches!(s.stamp(&mut queue[0]), Stamp::Ready));
        assert_eq!(header(&queue[0]).producer, info(41, 0, 0));
        assert!(s.superseded(&late), "an older id");
        assert!(!s.superseded(&queue[0]));
    }

    #[test]
    fn a_batch_whose_sequences_would_pass_i32_max_waits_for_the_next_epoch() {
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
        // Stamped batches still go out under the old identity, and the switch waits for
        // every one of them to be answered, even with nothing in flight right now.
        let mut again = fits;
        let before = again.bytes.clone();
        assert!(matches!(s.stamp(&mut again), Stamp::Ready));
        assert_eq!(again.bytes, before, "resent as it was");
        s.acknowledged(&first);
        assert!(!s.ready_to_reset(&key(), true), "a stamped batch is unresolved");
        s.failed_for_good(&again);
        assert!(s.ready_to_reset(&key(), true));
        let mut queue = VecDeque::from([over]);
        assert_eq!(
            s.reset(&key(), &mut queue),
            0,
            "only a batch never sent is renumbered: nothing unvouched"
        );
        assert!(matches!(s.stamp(&mut queue[0]), Stamp::Ready));
        assert_eq!(header(&queue[0]).producer, info(40, 1, 0));
    }
}
