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

/// Writes producer id, epoch and base sequence into a built batch and brings its CRC up to
/// date, in place and without reading the records.
///
/// A producer seals a batch before it knows the sequence the batch will carry (it learns it
/// when the batch is first sent), so it stamps the producer fields afterwards. CRC-32 is
/// linear: changing some bytes changes the CRC by an amount that depends only on the changed
/// bytes and on how many bytes follow them, which crc32fast's `combine` shifts over in
/// O(log n). The cost does not grow with the batch, and a batch that was damaged before the
/// call stays detectably damaged after it.
///
/// ```
/// use bytes::Bytes;
/// use conveyor_storage::batch::{restamp_producer, BatchBuilder, Compression, ProducerInfo, Record, RecordBatch};
///
/// let mut builder = BatchBuilder::new(Compression::None);
/// builder.push(&Record { timestamp: 1, value: Some(Bytes::from("x")), ..Record::default() });
/// let mut bytes = builder.build()?.to_vec();
/// let info = ProducerInfo { producer_id: 7, producer_epoch: 0, base_sequence: 42 };
/// restamp_producer(&mut bytes, info)?;
/// let batch = RecordBatch::parse(Bytes::from(bytes))?;
/// batch.verify_crc()?;
/// assert_eq!(batch.header().producer, info);
/// # Ok::<(), conveyor_storage::BatchError>(())
/// ```
pub fn restamp_producer(batch: &mut [u8], producer: ProducerInfo) -> Result<(), BatchError> {
    let header = BatchHeader::parse(batch)?;
    if header.size() != batch.len() {
        return Err(BatchError::LengthMismatch {
            declared: u64::from(header.batch_length),
            actual: batch.len().saturating_sub(LENGTH_PREFIX) as u64,
        });
    }
    let mut fields = [0u8; RECORD_COUNT_AT - PRODUCER_ID_AT];
    fields[..8].copy_from_slice(&producer.producer_id.to_le_bytes());
    fields[8..10].copy_from_slice(&producer.producer_epoch.to_le_bytes());
    fields[10..].copy_from_slice(&producer.base_sequence.to_le_bytes());
    // For messages of one length crc(old) ^ crc(new) is the plain CRC (register from 0, no
    // final inversion) of old ^ new, which is zero but in the producer fields: zeros before
    // them leave a register at 0, so it is the plain CRC of the fields' difference followed by
    // the `after` bytes behind them.
    let after = (batch.len() - RECORD_COUNT_AT) as u64;
    let mut diff = [0u8; RECORD_COUNT_AT - PRODUCER_ID_AT];
    for ((d, old), new) in diff.iter_mut().zip(&batch[PRODUCER_ID_AT..RECORD_COUNT_AT]).zip(fields) {
        *d = old ^ new;
    }
    // crc32fast keeps its state inverted: a state of !0 is a register at 0.
    let mut plain = crc32fast::Hasher::new_with_initial(!0);
    plain.update(&diff);
    // Combining with a CRC of 0 over `after` bytes shifts a CRC over that many zero bytes.
    let mut delta = crc32fast::Hasher::new_with_initial(!plain.finalize());
    delta.combine(&crc32fast::Hasher::new_with_initial_len(0, after));
    let crc = header.crc ^ delta.finalize();
    batch[PRODUCER_ID_AT..RECORD_COUNT_AT].copy_from_slice(&fields);
    batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Milliseconds since the Unix epoch from the system clock.
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Milliseconds since the Unix epoch from the kernel's coarse clock: a few ms behind
/// [`unix_millis`] at most (its tick), and cheaper to read, for checks made per record
/// that tolerate that.
#[cfg(target_os = "linux")]
pub fn unix_millis_coarse() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant Linux knows.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } != 0 {
        return unix_millis();
    }
    #[allow(clippy::useless_conversion)] // `time_t` is 32 bits on some Linux targets.
    i64::from(ts.tv_sec)
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.tv_nsec) / 1_000_000)
}

#[cfg(not(target_os = "linux"))]
pub fn unix_millis_coarse() -> i64 {
    unix_millis()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn built(compression: Compression, records: usize, value_len: usize) -> Vec<u8> {
        let mut b = BatchBuilder::new(compression);
        for i in 0..records {
            b.push(&Record {
                timestamp: 1_000 + i as i64,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(vec![b'v'; value_len])),
                headers: Vec::new(),
            });
        }
        b.build().expect("build").to_vec()
    }

    proptest! {
        #[test]
        fn a_restamped_batch_has_the_crc_a_full_rehash_gives(
            records in 1usize..40,
            value_len in 0usize..300,
            codec in prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd)],
            id in any::<i64>(),
            epoch in any::<i16>(),
            sequence in any::<i32>(),
        ) {
            let mut bytes = built(codec, records, value_len);
            let info = ProducerInfo { producer_id: id, producer_epoch: epoch, base_sequence: sequence };
            restamp_producer(&mut bytes, info).expect("restamp");
            let header = BatchHeader::parse(&bytes).expect("header");
            prop_assert_eq!(header.producer, info);
            prop_assert_eq!(header.crc, crc32fast::hash(&bytes[CRC_START..]));
            let batch = RecordBatch::parse(Bytes::from(bytes)).expect("parse");
            prop_assert_eq!(batch.records().expect("records").count(), records);
        }
    }

    #[test]
    fn restamping_twice_equals_building_with_the_final_producer_info() {
        let info = ProducerInfo {
            producer_id: 12,
            producer_epoch: 3,
            base_sequence: 500,
        };
        let mut bytes = built(Compression::None, 3, 10);
        restamp_producer(
            &mut bytes,
            ProducerInfo {
                producer_id: 9,
                producer_epoch: 0,
                base_sequence: 0,
            },
        )
        .expect("first");
        restamp_producer(&mut bytes, info).expect("second");
        let mut direct = BatchBuilder::new(Compression::None).producer(info);
        for i in 0..3 {
            let r = Record {
                timestamp: 1_000 + i,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(vec![b'v'; 10])),
                headers: Vec::new(),
            };
            direct.push(&r);
        }
        let direct = direct.build().expect("direct");
        assert_eq!(&bytes[CRC_AT..], &direct[CRC_AT..]);
    }

    #[test]
    fn a_damaged_batch_stays_detectably_damaged_after_a_restamp() {
        let mut bytes = built(Compression::None, 2, 20);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        restamp_producer(
            &mut bytes,
            ProducerInfo {
                producer_id: 1,
                producer_epoch: 0,
                base_sequence: 0,
            },
        )
        .expect("restamp");
        let batch = RecordBatch::parse(Bytes::from(bytes)).expect("parse");
        assert!(matches!(batch.verify_crc(), Err(BatchError::CrcMismatch { .. })));
    }

    #[test]
    fn a_truncated_batch_is_refused_not_restamped() {
        let bytes = built(Compression::None, 2, 20);
        let mut cut = bytes[..bytes.len() - 1].to_vec();
        assert!(matches!(
            restamp_producer(&mut cut, ProducerInfo::NONE),
            Err(BatchError::LengthMismatch { .. })
        ));
        let mut short = bytes[..HEADER_LEN - 1].to_vec();
        assert!(matches!(
            restamp_producer(&mut short, ProducerInfo::NONE),
            Err(BatchError::TooShort { .. })
        ));
    }
}
