//! Builds a batch from records. Producers use it; the log never re-encodes.

use bytes::Bytes;

use super::records::{self, Record};
use super::*;
use crate::error::BatchError;

/// Accumulates records and encodes them as one batch.
///
/// ```
/// use bytes::Bytes;
/// use conveyor_storage::batch::{BatchBuilder, Compression, Record, RecordBatch};
///
/// let mut builder = BatchBuilder::new(Compression::Lz4);
/// builder.push(&Record { timestamp: 1_700_000_000_000, value: Some(Bytes::from("hello")), ..Record::default() });
/// let batch = RecordBatch::parse(builder.build()?)?;
/// assert_eq!(batch.header().record_count, 1);
/// # Ok::<(), conveyor_storage::BatchError>(())
/// ```
#[derive(Debug, Clone)]
pub struct BatchBuilder {
    compression: Compression,
    producer: ProducerInfo,
    transactional: bool,
    control: bool,
    first_timestamp: Option<i64>,
    max_timestamp: i64,
    count: u32,
    records: Vec<u8>,
}

impl BatchBuilder {
    pub fn new(compression: Compression) -> BatchBuilder {
        BatchBuilder {
            compression,
            producer: ProducerInfo::NONE,
            transactional: false,
            control: false,
            first_timestamp: None,
            max_timestamp: i64::MIN,
            count: 0,
            records: Vec::new(),
        }
    }

    /// Sets the producer id, epoch and base sequence carried in the header.
    pub fn producer(mut self, producer: ProducerInfo) -> Self {
        self.producer = producer;
        self
    }

    /// Marks the batch as part of a transaction.
    pub fn transactional(mut self, transactional: bool) -> Self {
        self.transactional = transactional;
        self
    }

    /// Marks the batch as a control batch; consumers skip it.
    pub fn control(mut self, control: bool) -> Self {
        self.control = control;
        self
    }

    /// Appends a record; its offset delta is its position in the batch.
    pub fn push(&mut self, record: &Record) {
        let first = *self.first_timestamp.get_or_insert(record.timestamp);
        self.max_timestamp = self.max_timestamp.max(record.timestamp);
        records::encode(
            &mut self.records,
            record,
            record.timestamp.wrapping_sub(first),
            self.count,
        );
        self.count += 1;
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size of the batch if built now without compression: an upper bound for size limits.
    pub fn estimated_size(&self) -> usize {
        HEADER_LEN + self.records.len()
    }

    /// Encodes the batch with base offset 0, epoch 0 and Raft index 0; the log stamps them.
    /// An empty non-control batch is refused.
    pub fn build(self) -> Result<Bytes, BatchError> {
        self.build_at(unix_millis())
    }

    /// As [`build`](Self::build), with the timestamp used when the batch holds no records.
    pub fn build_at(self, empty_timestamp: i64) -> Result<Bytes, BatchError> {
        if self.count == 0 && !self.control {
            return Err(BatchError::Empty);
        }
        let mut out = Vec::with_capacity(HEADER_LEN + self.records.len());
        out.resize(HEADER_LEN, 0);
        self.compression.compress(&self.records, &mut out)?;
        let first = self.first_timestamp.unwrap_or(empty_timestamp);
        let max = if self.count == 0 { first } else { self.max_timestamp };
        let mut attributes = u16::from(self.compression.id());
        if self.transactional {
            attributes |= TRANSACTIONAL_BIT;
        }
        if self.control {
            attributes |= CONTROL_BIT;
        }
        let batch_length =
            u32::try_from(out.len() - LENGTH_PREFIX).map_err(|_| BatchError::Compress("batch exceeds 4 GiB".into()))?;
        let put = |out: &mut Vec<u8>, at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(&mut out, LENGTH_AT, &batch_length.to_le_bytes());
        out[MAGIC_AT] = MAGIC;
        put(&mut out, ATTRIBUTES_AT, &attributes.to_le_bytes());
        put(
            &mut out,
            LAST_OFFSET_DELTA_AT,
            &self.count.saturating_sub(1).to_le_bytes(),
        );
        put(&mut out, FIRST_TIMESTAMP_AT, &first.to_le_bytes());
        put(&mut out, MAX_TIMESTAMP_AT, &max.to_le_bytes());
        put(&mut out, PRODUCER_ID_AT, &self.producer.producer_id.to_le_bytes());
        put(&mut out, PRODUCER_EPOCH_AT, &self.producer.producer_epoch.to_le_bytes());
        put(&mut out, BASE_SEQUENCE_AT, &self.producer.base_sequence.to_le_bytes());
        put(&mut out, RECORD_COUNT_AT, &self.count.to_le_bytes());
        let crc = crc32fast::hash(&out[CRC_START..]);
        put(&mut out, CRC_AT, &crc.to_le_bytes());
        Ok(Bytes::from(out))
    }
}

/// Milliseconds since the Unix epoch from the system clock.
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
