//! Idempotent producers' state on one partition, derived from the log's batch headers.
//!
//! For every producer id that wrote to the partition the table keeps its epoch, its last
//! [`MAX_CACHED_BATCHES`] batches (sequence range and offsets) and when it last wrote. The
//! state is a pure function of the batches in log order ([`ProducerTable::apply`]), so every
//! replica rebuilds the same table from its own log; [`snapshot`] files bound the replay at
//! open. What a leader does with a new batch given this state is decided by
//! [`classify`]; the broker combines it with the batches it has proposed and not yet
//! committed.
//!
//! # Memory
//! One entry per producer (about 200 bytes); entries idle longer than the expiration are
//! dropped by [`ProducerTable::expire`], and at most [`MAX_PRODUCERS`] are kept.

pub mod snapshot;

use std::collections::{HashMap, VecDeque};

use crate::batch::{BatchHeader, ProducerInfo};

/// Batches per producer remembered for duplicate detection: a client keeps at most this many
/// in flight per partition, so a retry always finds its original here.
pub const MAX_CACHED_BATCHES: usize = 5;

/// Producers a partition keeps state for, at most. A new producer beyond it evicts the one
/// whose last batch is oldest in the log (the same one on every replica): about 20 MiB of
/// memory and a 14 MB snapshot at most, which fits one Raft message.
pub const MAX_PRODUCERS: usize = 100_000;

/// One batch of a producer, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMeta {
    pub first_sequence: i32,
    pub last_sequence: i32,
    pub base_offset: u64,
    pub last_offset: u64,
}

/// What the partition knows of one producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerEntry {
    pub epoch: i16,
    /// Oldest first, at most [`MAX_CACHED_BATCHES`].
    pub batches: VecDeque<BatchMeta>,
    /// Milliseconds since the Unix epoch of the producer's last write.
    pub last_write_ms: i64,
}

impl ProducerEntry {
    pub fn last(&self) -> Option<&BatchMeta> {
        self.batches.back()
    }
}

/// A producer's row, for listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerSummary {
    pub producer_id: i64,
    pub epoch: i16,
    pub last_sequence: i32,
    pub last_offset: u64,
    pub last_write_ms: i64,
    pub cached_batches: usize,
}

/// The producer identity of a batch that asks for idempotence, checked for shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idempotent {
    pub producer_id: i64,
    pub epoch: i16,
    pub first_sequence: i32,
    pub last_sequence: i32,
}

/// Why a batch's producer fields are malformed (nothing about the partition's state).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProducerFieldError {
    #[error("producer id {0} is invalid: -1 (no producer) or a non-negative issued id")]
    ProducerId(i64),
    #[error("producer epoch {0} is invalid: an idempotent batch needs an epoch of 0 or more")]
    Epoch(i16),
    #[error("base sequence {0} is invalid: an idempotent batch needs a sequence of 0 or more")]
    Sequence(i32),
    #[error(
        "sequences {first}..{first}+{count} would pass {max}: sequences do not wrap, so a producer moves to a new epoch (sequences from 0) or takes a new id before"
    , max = i32::MAX)]
    Wraps { first: i32, count: u32 },
    #[error("a batch without a producer id must have producer epoch and base sequence -1, not {epoch} and {sequence}")]
    Stray { epoch: i16, sequence: i32 },
    #[error("transactional batches are not supported yet")]
    Transactional,
}

/// The idempotence a batch asks for: `None` for a plain batch (producer id -1) or a control
/// batch, which the table ignores.
pub fn idempotence_of(header: &BatchHeader) -> Result<Option<Idempotent>, ProducerFieldError> {
    if header.is_control() {
        return Ok(None);
    }
    if header.is_transactional() {
        return Err(ProducerFieldError::Transactional);
    }
    let ProducerInfo {
        producer_id,
        producer_epoch,
        base_sequence,
    } = header.producer;
    if producer_id == -1 {
        if producer_epoch != -1 || base_sequence != -1 {
            return Err(ProducerFieldError::Stray {
                epoch: producer_epoch,
                sequence: base_sequence,
            });
        }
        return Ok(None);
    }
    if producer_id < 0 {
        return Err(ProducerFieldError::ProducerId(producer_id));
    }
    if producer_epoch < 0 {
        return Err(ProducerFieldError::Epoch(producer_epoch));
    }
    if base_sequence < 0 {
        return Err(ProducerFieldError::Sequence(base_sequence));
    }
    // A batch's sequences span its offset range, as its records did when it was produced:
    // compaction may remove records but keeps the range (`last_offset_delta`), so the
    // state read from a compacted header is the state it had before.
    let count = header.last_offset_delta.saturating_add(1);
    let last = i64::from(base_sequence) + i64::from(count) - 1;
    let last_sequence = i32::try_from(last).map_err(|_| ProducerFieldError::Wraps {
        first: base_sequence,
        count,
    })?;
    Ok(Some(Idempotent {
        producer_id,
        epoch: producer_epoch,
        first_sequence: base_sequence,
        last_sequence,
    }))
}

/// What a leader does with an idempotent batch, given the producer's latest state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<L> {
    /// The next batch in sequence: append it.
    Append,
    /// The same sequences as a remembered batch: answer with its location, write nothing.
    Duplicate(L),
    /// Not the next sequence: an earlier batch is missing.
    OutOfOrder { expected: i32, got: i32 },
    /// Sequences the producer wrote before, older than the remembered batches.
    TooOld { sequence: i32, oldest_remembered: i32 },
    /// An older epoch than the producer's current one.
    Fenced { current: i16, got: i16 },
    /// No state for the producer, and the batch does not start a producer (sequence 0).
    Unknown,
}

/// The latest state of one producer as a leader sees it: its epoch, and its remembered
/// batches (sequence range and where each one is, oldest first).
#[derive(Debug, Clone)]
pub struct View<L> {
    pub epoch: i16,
    pub batches: Vec<(i32, i32, L)>,
}

/// Decides what to do with `batch` given the producer's latest state (`None`: none known).
pub fn classify<L: Clone>(view: Option<&View<L>>, batch: &Idempotent) -> Verdict<L> {
    let Some(view) = view else {
        return if batch.first_sequence == 0 {
            Verdict::Append
        } else {
            Verdict::Unknown
        };
    };
    if batch.epoch < view.epoch {
        return Verdict::Fenced {
            current: view.epoch,
            got: batch.epoch,
        };
    }
    if batch.epoch > view.epoch {
        // A new epoch starts its sequences again.
        return if batch.first_sequence == 0 {
            Verdict::Append
        } else {
            Verdict::OutOfOrder {
                expected: 0,
                got: batch.first_sequence,
            }
        };
    }
    if let Some((_, _, at)) = view
        .batches
        .iter()
        .find(|(first, last, _)| *first == batch.first_sequence && *last == batch.last_sequence)
    {
        return Verdict::Duplicate(at.clone());
    }
    let (Some(first), Some(newest)) = (view.batches.first(), view.batches.last()) else {
        // An entry without batches (its epoch was bumped): the new epoch starts at 0.
        return if batch.first_sequence == 0 {
            Verdict::Append
        } else {
            Verdict::OutOfOrder {
                expected: 0,
                got: batch.first_sequence,
            }
        };
    };
    let (oldest, last) = (first.0, newest.1);
    let expected = last.saturating_add(1);
    if batch.first_sequence == expected {
        Verdict::Append
    } else if batch.first_sequence < oldest {
        Verdict::TooOld {
            sequence: batch.first_sequence,
            oldest_remembered: oldest,
        }
    } else {
        Verdict::OutOfOrder {
            expected,
            got: batch.first_sequence,
        }
    }
}

/// Every producer's state on one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerTable {
    producers: HashMap<i64, ProducerEntry>,
}

impl ProducerTable {
    pub fn new() -> ProducerTable {
        ProducerTable::default()
    }

    /// A table with room for `producers` without growing.
    pub fn with_capacity(producers: usize) -> ProducerTable {
        ProducerTable {
            producers: HashMap::with_capacity(producers),
        }
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    pub fn get(&self, producer_id: i64) -> Option<&ProducerEntry> {
        self.producers.get(&producer_id)
    }

    /// The producer's state as [`classify`] takes it, batches located by their offsets.
    pub fn view(&self, producer_id: i64) -> Option<View<BatchMeta>> {
        self.producers.get(&producer_id).map(|e| View {
            epoch: e.epoch,
            batches: e
                .batches
                .iter()
                .map(|b| (b.first_sequence, b.last_sequence, *b))
                .collect(),
        })
    }

    /// Folds one stored batch in (at `base_offset ..= last_offset`, written at `write_ms`).
    /// Batches must come in log order; a batch the table holds already is ignored, so a
    /// replay that overlaps a snapshot changes nothing.
    pub fn apply(&mut self, header: &BatchHeader, base_offset: u64, write_ms: i64) {
        let Ok(Some(batch)) = idempotence_of(header) else {
            return;
        };
        let meta = BatchMeta {
            first_sequence: batch.first_sequence,
            last_sequence: batch.last_sequence,
            base_offset,
            last_offset: base_offset + u64::from(header.last_offset_delta),
        };
        self.insert(batch.producer_id, batch.epoch, meta, write_ms);
    }

    fn insert(&mut self, producer_id: i64, epoch: i16, meta: BatchMeta, write_ms: i64) {
        if self.producers.len() >= MAX_PRODUCERS && !self.producers.contains_key(&producer_id) {
            self.evict_oldest();
        }
        let entry = self.producers.entry(producer_id).or_insert_with(|| ProducerEntry {
            epoch,
            batches: VecDeque::with_capacity(MAX_CACHED_BATCHES),
            last_write_ms: write_ms,
        });
        if epoch < entry.epoch || entry.batches.iter().any(|b| b.base_offset >= meta.base_offset) {
            return;
        }
        if epoch > entry.epoch {
            entry.epoch = epoch;
            entry.batches.clear();
        }
        if entry.batches.len() == MAX_CACHED_BATCHES {
            entry.batches.pop_front();
        }
        entry.batches.push_back(meta);
        entry.last_write_ms = entry.last_write_ms.max(write_ms);
    }

    /// Drops the producer whose last batch is oldest in the log. A scan, but only when the
    /// table is full and a new producer writes.
    fn evict_oldest(&mut self) {
        let oldest = self
            .producers
            .iter()
            .min_by_key(|(id, e)| (e.last().map_or(0, |b| b.last_offset), **id))
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.producers.remove(&id);
        }
    }

    /// Drops producers that have not written since `before_ms`. Returns how many.
    pub fn expire(&mut self, before_ms: i64) -> usize {
        let before = self.producers.len();
        self.producers.retain(|_, e| e.last_write_ms >= before_ms);
        before - self.producers.len()
    }

    /// Every producer, by id.
    pub fn summaries(&self) -> Vec<ProducerSummary> {
        let mut rows: Vec<ProducerSummary> = self
            .producers
            .iter()
            .filter_map(|(&id, e)| {
                e.last().map(|last| ProducerSummary {
                    producer_id: id,
                    epoch: e.epoch,
                    last_sequence: last.last_sequence,
                    last_offset: last.last_offset,
                    last_write_ms: e.last_write_ms,
                    cached_batches: e.batches.len(),
                })
            })
            .collect();
        rows.sort_by_key(|r| r.producer_id);
        rows
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = (&i64, &ProducerEntry)> {
        self.producers.iter()
    }

    pub(crate) fn put(&mut self, producer_id: i64, entry: ProducerEntry) {
        self.producers.insert(producer_id, entry);
    }
}

#[cfg(test)]
mod tests;
