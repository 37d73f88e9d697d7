//! Turning fetched chunks into records, on the reader's side of a consumer.
//!
//! The fetch task hands over whole stored batches ([`Chunk`]s); the reader decodes them one
//! record at a time as the application asks, and keeps each partition's position: the
//! offset after the last record returned, or after the last chunk read past.
//!
//! # Invariants
//! - Per record, the hot path does one decode step and one store of the position into the
//!   chunk being read: no lock, no allocation, no map lookup. Maps are touched per chunk.
//! - Records below a chunk's `from` (the start of a batch that began before the offset
//!   asked for) are never returned.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use conveyor_storage::batch::{BatchIter, RecordIter};

use super::ConsumerRecord;
use crate::error::Result;

/// Stored batches of one partition as fetched; decoded by the reader.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    /// Which fetch of the partition this came from: a group consumer starts a partition
    /// afresh (a new assignment, a seek) under a new incarnation and drops chunks of older
    /// ones still buffered. Always 0 for a manually assigned consumer.
    pub(crate) incarnation: u64,
    /// Records below this offset were already delivered (a batch may start earlier).
    pub(crate) from: u64,
    /// The partition's position once this chunk is read (control batches included).
    pub(crate) next: u64,
    pub(crate) batches: Bytes,
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
    // Inlined into the stream's poll, in another module (so another codegen unit): a call
    // per record costs about a tenth of the manual consumer's throughput.
    #[inline]
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

/// Chunks waiting to be read, the one being read, and each partition's position.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    chunks: std::vec::IntoIter<Chunk>,
    reading: Option<Reading>,
    /// Topic → partition → next offset, looked up by `&str` with no scan or allocation.
    positions: HashMap<Arc<str>, HashMap<i32, u64>>,
}

impl Decoder {
    /// Takes the next chunks to read. Called once the decoder is empty (`advance` returned
    /// false): the reader never holds more than one fetch response ahead.
    pub(crate) fn push(&mut self, chunks: Vec<Chunk>) {
        self.chunks = chunks.into_iter();
    }

    /// The next record of the chunk being read; `None` when no chunk is being read or it
    /// is read to its end (then [`advance`](Self::advance)). The per-record hot path.
    #[inline]
    pub(crate) fn next_record(&mut self) -> Option<Result<ConsumerRecord>> {
        let reading = self.reading.as_mut()?;
        let next = reading.next_record();
        if let Some(Ok(record)) = &next {
            reading.returned = Some(record.offset + 1);
        }
        next
    }

    /// Moves past a chunk read to its end (control batches included), or starts the next
    /// one buffered. False when nothing is buffered: more chunks are needed. Either way
    /// positions may have moved.
    pub(crate) fn advance(&mut self) -> bool {
        if let Some(reading) = self.reading.take() {
            self.positions
                .entry(reading.topic)
                .or_default()
                .insert(reading.partition, reading.next);
            return true;
        }
        match self.chunks.next() {
            Some(chunk) => {
                self.reading = Some(Reading {
                    topic: chunk.topic,
                    partition: chunk.partition,
                    from: chunk.from,
                    next: chunk.next,
                    returned: None,
                    batches: BatchIter::new(chunk.batches),
                    records: None,
                });
                true
            }
            None => false,
        }
    }

    /// The next offset to read in a partition: after every record returned so far and after
    /// any control batch read past. `None` before anything was read from it.
    pub(crate) fn position(&self, topic: &str, partition: i32) -> Option<u64> {
        if let Some(reading) = &self.reading
            && *reading.topic == *topic
            && reading.partition == partition
            && let Some(returned) = reading.returned
        {
            return Some(returned);
        }
        self.positions.get(topic)?.get(&partition).copied()
    }

    /// Drops everything buffered of a partition, and its position.
    pub(crate) fn forget(&mut self, topic: &str, partition: i32) {
        let of_it = |t: &str, p: i32| t == topic && p == partition;
        if self.reading.as_ref().is_some_and(|r| of_it(&r.topic, r.partition)) {
            self.reading = None;
        }
        if self.chunks.as_slice().iter().any(|c| of_it(&c.topic, c.partition)) {
            let kept: Vec<Chunk> = std::mem::take(&mut self.chunks)
                .filter(|c| !of_it(&c.topic, c.partition))
                .collect();
            self.chunks = kept.into_iter();
        }
        if let Some(partitions) = self.positions.get_mut(topic) {
            partitions.remove(&partition);
        }
    }

    /// Sets where a partition (re)starts, before any chunk of it is read.
    pub(crate) fn set_position(&mut self, topic: Arc<str>, partition: i32, offset: u64) {
        self.positions.entry(topic).or_default().insert(partition, offset);
    }
}
