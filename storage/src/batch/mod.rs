//! The record batch: the one format used from the producer, through replication and disk, to
//! the consumer.
//!
//! # Byte layout (format version 1, all integers little-endian)
//!
//! ```text
//! offset size field
//!      0    8 base_offset        offset of the first record; stamped by the leader
//!      8    4 batch_length       bytes that follow this field (total size - 12)
//!     12    8 leader_epoch       Raft term of the leader that appended it; stamped
//!     20    8 raft_index         index of the Raft entry that carries it; stamped
//!     28    1 magic              format version, 1
//!     29    4 crc                CRC-32 (crc32fast) of every byte from offset 33 to the end
//!     33    2 attributes         bits 0-2 compression (0 none, 1 lz4, 2 zstd),
//!                                bit 4 transactional, bit 5 control, bit 6 compacted,
//!                                bit 7 delete horizon; other bits must be 0
//!     35    4 last_offset_delta  last offset - base_offset
//!     39    8 first_timestamp    timestamp (ms) of the first record; base for deltas
//!     47    8 max_timestamp      largest record timestamp (ms)
//!     55    8 producer_id        -1 when the producer is not idempotent
//!     63    2 producer_epoch     -1 when absent
//!     65    4 base_sequence      sequence of the first record, -1 when absent
//!     69    4 record_count
//!     73    . records            plain, or [uncompressed_len: u32][codec block]
//! ```
//!
//! Each record in the records section:
//!
//! ```text
//! length           varint      bytes of the rest of this record
//! timestamp_delta  zigzag      record timestamp - first_timestamp
//! offset_delta     varint      record offset - base_offset
//! key_length       zigzag      -1 for a null key
//! key              bytes
//! value_length     zigzag      -1 for a null value (a tombstone)
//! value            bytes
//! header_count     varint
//! headers          header_count × { key_length varint, key, value_length zigzag, value }
//! ```
//!
//! # Invariants
//! - The CRC covers everything after the CRC field. The fields before it (base offset,
//!   length, leader epoch, Raft index, magic) can be stamped in place without recomputing it.
//! - A batch occupies offsets `base_offset ..= base_offset + last_offset_delta`; a control
//!   batch with no records still occupies one offset, so every batch has a distinct base
//!   offset and offsets only grow.
//! - Record offset deltas are strictly increasing and at most `last_offset_delta`
//!   (compaction may drop records but never renumbers them).
//! - Only the cleaner sets the compacted bit: the batch may then hold fewer records than its
//!   offset range, none at all, and keeps its header (offsets, Raft index and term, producer
//!   fields) so that offsets and Raft indexes stay contiguous. With the delete-horizon bit
//!   (only on a compacted batch), `first_timestamp` is the time (ms) after which the cleaner
//!   may drop its tombstones, and record timestamp deltas count from `max_timestamp`
//!   instead. Producers may set neither bit (`docs/compaction.md`).

mod builder;
mod compact;
mod compression;
mod records;
pub(crate) mod validate;
pub(crate) mod varint;

pub use builder::BatchBuilder;
pub use builder::restamp_producer;
pub use builder::{unix_millis, unix_millis_coarse};
pub use compact::{Judged, PlainBatch, Rewritten, rewrite_batch};
pub use compression::Compression;
pub use records::{Header, Record, RecordIter, RecordRef, StoredRecord};
pub use validate::{ValidatedBatch, validate, validate_within};

use bytes::Bytes;

use crate::error::BatchError;

/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 73;
/// The format version this crate writes and reads.
pub const MAGIC: u8 = 1;
/// Bytes before the batch length field ends; `batch_length` counts the bytes after them.
pub const LENGTH_PREFIX: usize = 12;

pub(crate) const BASE_OFFSET_AT: usize = 0;
pub(crate) const LENGTH_AT: usize = 8;
pub(crate) const LEADER_EPOCH_AT: usize = 12;
pub(crate) const RAFT_INDEX_AT: usize = 20;
pub(crate) const MAGIC_AT: usize = 28;
pub(crate) const CRC_AT: usize = 29;
/// Bytes at the start of a batch that the log stamps (base offset, length, leader epoch, Raft
/// index, magic): everything after them is stored exactly as received.
pub const STAMPED_LEN: usize = CRC_AT;
/// First byte covered by the CRC.
pub(crate) const CRC_START: usize = 33;
pub(crate) const ATTRIBUTES_AT: usize = 33;
pub(crate) const LAST_OFFSET_DELTA_AT: usize = 35;
pub(crate) const FIRST_TIMESTAMP_AT: usize = 39;
pub(crate) const MAX_TIMESTAMP_AT: usize = 47;
pub(crate) const PRODUCER_ID_AT: usize = 55;
pub(crate) const PRODUCER_EPOCH_AT: usize = 63;
pub(crate) const BASE_SEQUENCE_AT: usize = 65;
pub(crate) const RECORD_COUNT_AT: usize = 69;

const COMPRESSION_MASK: u16 = 0b111;
const TRANSACTIONAL_BIT: u16 = 1 << 4;
const CONTROL_BIT: u16 = 1 << 5;
const COMPACTED_BIT: u16 = 1 << 6;
const DELETE_HORIZON_BIT: u16 = 1 << 7;
/// The bits only the cleaner sets.
const CLEANER_BITS: u16 = COMPACTED_BIT | DELETE_HORIZON_BIT;
const KNOWN_ATTRIBUTES: u16 = COMPRESSION_MASK | TRANSACTIONAL_BIT | CONTROL_BIT | CLEANER_BITS;

/// Producer identity carried by every batch, for idempotence and transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerInfo {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl ProducerInfo {
    /// The identity of a producer that is neither idempotent nor transactional.
    pub const NONE: ProducerInfo = ProducerInfo {
        producer_id: -1,
        producer_epoch: -1,
        base_sequence: -1,
    };
}

impl Default for ProducerInfo {
    fn default() -> Self {
        Self::NONE
    }
}

/// The decoded fixed header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    pub batch_length: u32,
    pub leader_epoch: u64,
    pub raft_index: u64,
    pub magic: u8,
    pub crc: u32,
    pub attributes: u16,
    pub last_offset_delta: u32,
    pub first_timestamp: i64,
    pub max_timestamp: i64,
    pub producer: ProducerInfo,
    pub record_count: u32,
}

#[inline]
pub(crate) fn read_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(fixed(buf, at))
}
#[inline]
pub(crate) fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(fixed(buf, at))
}
#[inline]
fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(fixed(buf, at))
}
#[inline]
fn fixed<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[at..at + N]);
    out
}

impl BatchHeader {
    /// Decodes the header from the first [`HEADER_LEN`] bytes. Checks only that they exist.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_LEN {
            return Err(BatchError::TooShort {
                len: buf.len(),
                min: HEADER_LEN,
            });
        }
        Ok(BatchHeader {
            base_offset: read_u64(buf, BASE_OFFSET_AT),
            batch_length: read_u32(buf, LENGTH_AT),
            leader_epoch: read_u64(buf, LEADER_EPOCH_AT),
            raft_index: read_u64(buf, RAFT_INDEX_AT),
            magic: buf[MAGIC_AT],
            crc: read_u32(buf, CRC_AT),
            attributes: read_u16(buf, ATTRIBUTES_AT),
            last_offset_delta: read_u32(buf, LAST_OFFSET_DELTA_AT),
            first_timestamp: read_u64(buf, FIRST_TIMESTAMP_AT) as i64,
            max_timestamp: read_u64(buf, MAX_TIMESTAMP_AT) as i64,
            producer: ProducerInfo {
                producer_id: read_u64(buf, PRODUCER_ID_AT) as i64,
                producer_epoch: read_u16(buf, PRODUCER_EPOCH_AT) as i16,
                base_sequence: read_u32(buf, BASE_SEQUENCE_AT) as i32,
            },
            record_count: read_u32(buf, RECORD_COUNT_AT),
        })
    }

    /// Total size of the batch on disk and on the wire.
    pub fn size(&self) -> usize {
        LENGTH_PREFIX + self.batch_length as usize
    }

    /// Offset of the last record (or of the control batch itself when it has none).
    pub fn last_offset(&self) -> u64 {
        self.base_offset.saturating_add(u64::from(self.last_offset_delta))
    }

    /// The offset right after this batch.
    pub fn next_offset(&self) -> u64 {
        self.last_offset().saturating_add(1)
    }

    /// Compression codec; errors on an unknown codec number.
    pub fn compression(&self) -> Result<Compression, BatchError> {
        Compression::from_id((self.attributes & COMPRESSION_MASK) as u8)
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & TRANSACTIONAL_BIT != 0
    }

    /// Control batches (transaction markers, Raft no-ops, membership changes) are skipped by
    /// consumers.
    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_BIT != 0
    }

    /// Rewritten by the cleaner: records may be missing from its offset range.
    pub fn is_compacted(&self) -> bool {
        self.attributes & COMPACTED_BIT != 0
    }

    /// When the cleaner may drop this batch's tombstones (ms since the epoch), once set.
    pub fn delete_horizon(&self) -> Option<i64> {
        (self.attributes & DELETE_HORIZON_BIT != 0 && self.is_compacted()).then_some(self.first_timestamp)
    }
}

/// Overwrites the stamped fields in place. The CRC stays valid because they sit before it.
///
/// # Panics
/// When `batch` is shorter than the header; callers pass validated batches.
pub fn stamp(batch: &mut [u8], base_offset: u64, leader_epoch: u64, raft_index: u64) {
    batch[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&base_offset.to_le_bytes());
    batch[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 8].copy_from_slice(&leader_epoch.to_le_bytes());
    batch[RAFT_INDEX_AT..RAFT_INDEX_AT + 8].copy_from_slice(&raft_index.to_le_bytes());
}

/// The stamped prefix (base offset, length, epoch, Raft index, magic) of `batch` with new
/// stamp values; writing it followed by `batch[CRC_AT..]` writes the stamped batch without
/// copying the body.
pub(crate) fn stamped_prefix(batch: &[u8], base_offset: u64, leader_epoch: u64, raft_index: u64) -> [u8; CRC_AT] {
    let mut prefix = [0u8; CRC_AT];
    prefix.copy_from_slice(&batch[..CRC_AT]);
    stamp(&mut prefix, base_offset, leader_epoch, raft_index);
    prefix
}

/// A batch held in memory: its bytes and its decoded header.
#[derive(Debug, Clone)]
pub struct RecordBatch {
    header: BatchHeader,
    bytes: Bytes,
}

impl RecordBatch {
    /// Wraps `bytes` after decoding the header and checking the length; the CRC is not checked
    /// (use [`validate`] for untrusted input).
    pub fn parse(bytes: Bytes) -> Result<RecordBatch, BatchError> {
        let header = BatchHeader::parse(&bytes)?;
        check_declared_length(&header)?;
        if header.size() != bytes.len() {
            return Err(BatchError::LengthMismatch {
                declared: u64::from(header.batch_length),
                actual: (bytes.len().saturating_sub(LENGTH_PREFIX)) as u64,
            });
        }
        Ok(RecordBatch { header, bytes })
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Decodes the records, decompressing first when needed.
    pub fn records(&self) -> Result<RecordIter, BatchError> {
        self.records_within(compression::MAX_UNCOMPRESSED_BYTES)
    }

    /// As [`records`](Self::records), refusing a compressed batch whose records would
    /// decompress to more than `max_uncompressed_bytes` ([`BatchError::InflatesTooLarge`]).
    pub fn records_within(&self, max_uncompressed_bytes: usize) -> Result<RecordIter, BatchError> {
        RecordIter::new(&self.header, &self.bytes, max_uncompressed_bytes)
    }

    /// Calls `visit` with each record, borrowed (decompressing first when needed, to at most
    /// the default bound): for readers that look at a few fields of every record and keep
    /// none. Stops with an error at a malformed record.
    pub fn for_each_record(&self, visit: impl FnMut(RecordRef<'_>)) -> Result<(), BatchError> {
        let section = records::plain_section(&self.header, &self.bytes, compression::MAX_UNCOMPRESSED_BYTES)?;
        records::for_each_ref(&self.header, &section, visit)
    }

    /// Checks the CRC, which covers everything after the CRC field: bytes altered on disk
    /// or in transit since the producer built the batch fail it.
    pub fn verify_crc(&self) -> Result<(), BatchError> {
        let actual = crc32fast::hash(&self.bytes[CRC_START..]);
        if actual != self.header.crc {
            return Err(BatchError::CrcMismatch {
                expected: self.header.crc,
                actual,
            });
        }
        Ok(())
    }
}

/// Refuses a length field too small to cover the header it sits in: such a batch would end
/// before its own fixed fields.
fn check_declared_length(header: &BatchHeader) -> Result<(), BatchError> {
    if header.size() < HEADER_LEN {
        return Err(BatchError::TooShort {
            len: header.size(),
            min: HEADER_LEN,
        });
    }
    Ok(())
}

/// Splits a buffer of concatenated batches (what a read or a fetch returns) into batches.
/// Stops with an error at the first truncated or inconsistent batch.
#[derive(Debug, Clone)]
pub struct BatchIter {
    buf: Bytes,
    failed: bool,
}

impl BatchIter {
    pub fn new(buf: Bytes) -> BatchIter {
        BatchIter { buf, failed: false }
    }
}

impl Iterator for BatchIter {
    type Item = Result<RecordBatch, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() || self.failed {
            return None;
        }
        let header = match BatchHeader::parse(&self.buf).and_then(|h| check_declared_length(&h).map(|()| h)) {
            Ok(h) if h.size() <= self.buf.len() => h,
            Ok(h) => {
                self.failed = true;
                return Some(Err(BatchError::LengthMismatch {
                    declared: u64::from(h.batch_length),
                    actual: (self.buf.len() - LENGTH_PREFIX) as u64,
                }));
            }
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        };
        let bytes = self.buf.split_to(header.size());
        Some(Ok(RecordBatch { header, bytes }))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample(compression: Compression) -> Vec<u8> {
        let mut b = BatchBuilder::new(compression);
        for i in 0..4 {
            b.push(&Record {
                timestamp: 10 + i,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(vec![b'v'; 40])),
                headers: vec![Header {
                    key: Bytes::from("h"),
                    value: Some(Bytes::from("x")),
                }],
            });
        }
        b.build().expect("build").to_vec()
    }

    /// Splits `buf` into batches and decodes every record, as a consumer does, checking CRCs
    /// on the way; returns how many records decoded. Must never panic.
    fn read_everything(buf: &[u8]) -> usize {
        let mut decoded = 0;
        for batch in BatchIter::new(Bytes::copy_from_slice(buf)).flatten() {
            let _ = batch.verify_crc();
            let _ = batch.header().compression();
            if let Ok(records) = batch.records_within(1 << 20) {
                decoded += records.flatten().count();
            }
        }
        if let Ok(batch) = RecordBatch::parse(Bytes::copy_from_slice(buf)) {
            let _ = batch.verify_crc();
            let owned = batch.records().map_or(0, |r| r.flatten().count());
            // The borrowed walk sees the same records up to the same first malformed one.
            let mut borrowed = 0;
            let _ = batch.for_each_record(|r| {
                let _ = r.header(b"h");
                borrowed += 1;
            });
            assert_eq!(borrowed, owned, "records seen borrowed and decoded");
            decoded += owned;
        }
        decoded
    }

    #[test]
    fn a_borrowed_walk_sees_each_records_offset_timestamp_key_and_headers_as_decoding_does() {
        for codec in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let mut bytes = sample(codec);
            stamp(&mut bytes, 100, 1, 1);
            let batch = RecordBatch::parse(Bytes::from(bytes)).expect("parse");
            let decoded: Vec<_> = batch
                .records()
                .expect("records")
                .map(|r| {
                    let r = r.expect("record");
                    let h = r.headers[0].value.clone().map(|v| v.to_vec());
                    (r.offset, r.timestamp, r.key.map(|k| k.to_vec()), h)
                })
                .collect();
            let mut borrowed = Vec::new();
            batch
                .for_each_record(|r| {
                    borrowed.push((
                        r.offset,
                        r.timestamp,
                        r.key.map(<[u8]>::to_vec),
                        r.header(b"h").map(<[u8]>::to_vec),
                    ));
                    assert_eq!(r.header(b"missing"), None);
                })
                .expect("walk");
            assert_eq!(borrowed, decoded, "{codec:?}");
            assert_eq!(borrowed[3].0, 103);
        }
    }

    #[test]
    fn a_length_field_below_the_header_size_is_an_error_not_a_panic() {
        let mut bytes = sample(Compression::None);
        bytes[LENGTH_AT..LENGTH_AT + 4].copy_from_slice(&0u32.to_le_bytes());
        let first = BatchIter::new(Bytes::from(bytes.clone())).next().expect("an item");
        assert!(matches!(first, Err(BatchError::TooShort { len: 12, .. })), "{first:?}");
        assert!(matches!(
            RecordBatch::parse(Bytes::from(bytes)),
            Err(BatchError::TooShort { .. })
        ));
    }

    #[test]
    fn record_offsets_past_u64_max_are_an_error_not_an_overflow() {
        let mut bytes = sample(Compression::None);
        stamp(&mut bytes, u64::MAX - 1, 1, 1);
        let batch = RecordBatch::parse(Bytes::from(bytes)).expect("parse");
        let records: Vec<_> = batch.records().expect("records").collect();
        assert_eq!(records.len(), 3, "two fit below u64::MAX, the third fails and ends it");
        assert_eq!(records[1].as_ref().expect("second").offset, u64::MAX);
        assert!(matches!(records[2], Err(BatchError::InvalidRecord { index: 2, .. })));
    }

    #[test]
    fn a_flipped_byte_fails_the_crc_check_of_a_fetched_batch() {
        let mut bytes = sample(Compression::Zstd);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let batch = RecordBatch::parse(Bytes::from(bytes)).expect("the frame still parses");
        assert!(matches!(batch.verify_crc(), Err(BatchError::CrcMismatch { .. })));
        let good = RecordBatch::parse(Bytes::from(sample(Compression::Zstd))).expect("parse");
        good.verify_crc().expect("an intact batch passes");
    }

    #[test]
    fn records_of_a_batch_inflating_past_the_limit_are_refused() {
        let batch = RecordBatch::parse(Bytes::from(sample(Compression::Lz4))).expect("parse");
        assert!(matches!(
            batch.records_within(16),
            Err(BatchError::InflatesTooLarge { limit: 16, .. })
        ));
        assert_eq!(batch.records_within(1 << 20).expect("records").count(), 4);
    }

    fn arb_codec() -> impl Strategy<Value = Compression> {
        prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd)]
    }

    proptest! {
        #[test]
        fn no_byte_string_makes_batch_parsing_or_record_iteration_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            read_everything(&bytes);
        }

        #[test]
        fn no_damage_to_a_real_batch_makes_parsing_panic_even_with_a_fixed_crc(
            codec in arb_codec(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            fix_crc in any::<bool>(),
        ) {
            let mut bytes = sample(codec);
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if fix_crc && bytes.len() >= HEADER_LEN {
                let crc = crc32fast::hash(&bytes[CRC_START..]);
                bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
            }
            read_everything(&bytes);
            // Truncated anywhere, and followed by a second copy of itself.
            read_everything(&bytes[..cut.index(bytes.len() + 1)]);
            let twice = [bytes.as_slice(), bytes.as_slice()].concat();
            read_everything(&twice);
        }
    }
}
