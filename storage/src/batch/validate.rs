//! Validation of untrusted batches: everything is checked before anything is written.

use super::records;
use super::*;
use crate::error::BatchError;

/// How far a compressed batch may expand relative to `max_batch_bytes`.
const MAX_COMPRESSION_RATIO: usize = 64;

/// Checks a batch received from a client or a peer and returns its header.
///
/// Refuses: a buffer shorter than the header or over `max_batch_bytes`, a length field that
/// disagrees with the buffer, an unknown format version, codec or attribute bit, a CRC
/// mismatch, a record count that disagrees with the records present, malformed records, and
/// offset deltas or timestamps inconsistent with the header.
pub fn validate(batch: &[u8], max_batch_bytes: usize) -> Result<BatchHeader, BatchError> {
    // Bounds what a small compressed batch may expand to in memory.
    let inflate_limit = max_batch_bytes.saturating_mul(MAX_COMPRESSION_RATIO);
    validate_within(batch, max_batch_bytes, inflate_limit)
}

/// As [`validate`], with an explicit limit on the size the records section may decompress
/// to: a compressed batch declaring more is refused with [`BatchError::InflatesTooLarge`]
/// before it is decompressed, and decompression stops as soon as the output passes what
/// the batch declared.
pub fn validate_within(
    batch: &[u8],
    max_batch_bytes: usize,
    max_uncompressed_bytes: usize,
) -> Result<BatchHeader, BatchError> {
    validate_records(batch, max_batch_bytes, max_uncompressed_bytes, false)
}

/// [`validate_within`], and with `keys_required` a record without a key is refused
/// ([`BatchError::KeylessRecord`]), found by the same walk over the records.
fn validate_records(
    batch: &[u8],
    max_batch_bytes: usize,
    max_uncompressed_bytes: usize,
    keys_required: bool,
) -> Result<BatchHeader, BatchError> {
    let header = check_frame(batch, max_batch_bytes)?;
    if header.attributes & CLEANER_BITS != 0 {
        return Err(BatchError::InvalidHeader(
            "the compacted and delete-horizon attribute bits are set by the broker's cleaner, never by a producer",
        ));
    }
    let inflate_limit = max_uncompressed_bytes;
    let (count, max_timestamp) = match header.compression()? {
        Compression::None => records::walk(&header, &batch[HEADER_LEN..], keys_required)?,
        codec => records::walk(
            &header,
            &codec.decompress(&batch[HEADER_LEN..], inflate_limit)?,
            keys_required,
        )?,
    };
    if count != header.record_count {
        return Err(BatchError::CountMismatch {
            declared: header.record_count,
            actual: count,
        });
    }
    if count > 0 && header.last_offset_delta != count - 1 {
        return Err(BatchError::InvalidHeader(
            "last offset delta must be the record count minus one",
        ));
    }
    if count > 0 && header.max_timestamp != max_timestamp {
        return Err(BatchError::InvalidHeader(
            "max timestamp must be the largest record timestamp",
        ));
    }
    Ok(header)
}

/// A batch that passed [`validate`]: the proof lets the log append it without checking it a
/// second time.
#[derive(Debug, Clone)]
pub struct ValidatedBatch {
    bytes: bytes::Bytes,
    header: BatchHeader,
    limit: usize,
}

impl ValidatedBatch {
    /// Validates `bytes` against `max_batch_bytes`.
    pub fn new(bytes: bytes::Bytes, max_batch_bytes: usize) -> Result<ValidatedBatch, BatchError> {
        let header = validate(&bytes, max_batch_bytes)?;
        Ok(ValidatedBatch {
            bytes,
            header,
            limit: max_batch_bytes,
        })
    }

    /// Validates `bytes` against `max_batch_bytes`, and a compressed batch's records against
    /// `max_uncompressed_bytes` (see [`validate_within`]).
    pub fn within(
        bytes: bytes::Bytes,
        max_batch_bytes: usize,
        max_uncompressed_bytes: usize,
    ) -> Result<ValidatedBatch, BatchError> {
        let header = validate_within(&bytes, max_batch_bytes, max_uncompressed_bytes)?;
        Ok(ValidatedBatch {
            bytes,
            header,
            limit: max_batch_bytes,
        })
    }

    /// As [`within`](Self::within), also refusing a record without a key (a batch for a
    /// compacted log, which keeps the latest record per key).
    pub fn within_keyed(
        bytes: bytes::Bytes,
        max_batch_bytes: usize,
        max_uncompressed_bytes: usize,
    ) -> Result<ValidatedBatch, BatchError> {
        let header = validate_records(&bytes, max_batch_bytes, max_uncompressed_bytes, true)?;
        Ok(ValidatedBatch {
            bytes,
            header,
            limit: max_batch_bytes,
        })
    }

    /// Checks only the frame (lengths, version, attributes, CRC): for a batch that a leader
    /// fully validated before replicating it. Corruption in transit or at rest is still caught.
    pub fn frame_checked(bytes: bytes::Bytes, max_batch_bytes: usize) -> Result<ValidatedBatch, BatchError> {
        let header = check_frame(&bytes, max_batch_bytes)?;
        Ok(ValidatedBatch {
            bytes,
            header,
            limit: max_batch_bytes,
        })
    }

    /// Wraps a batch this process validated earlier and kept unchanged (a Raft leader
    /// appending its own proposals): only the header is decoded.
    pub fn already_validated(bytes: bytes::Bytes, max_batch_bytes: usize) -> Result<ValidatedBatch, BatchError> {
        let header = BatchHeader::parse(&bytes)?;
        Ok(ValidatedBatch {
            bytes,
            header,
            limit: max_batch_bytes,
        })
    }

    pub fn bytes(&self) -> &bytes::Bytes {
        &self.bytes
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The size limit it was validated against.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// The checks that need no record decoding: sizes, version, attributes, header consistency
/// and CRC. Recovery uses this alone, since stored batches were fully validated on append.
pub(crate) fn check_frame(batch: &[u8], max_batch_bytes: usize) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(batch)?;
    if batch.len() > max_batch_bytes {
        return Err(BatchError::TooLarge {
            size: batch.len(),
            limit: max_batch_bytes,
        });
    }
    if header.size() != batch.len() {
        return Err(BatchError::LengthMismatch {
            declared: u64::from(header.batch_length),
            actual: (batch.len() - LENGTH_PREFIX) as u64,
        });
    }
    if header.magic != MAGIC {
        return Err(BatchError::UnsupportedVersion(header.magic));
    }
    if header.attributes & !KNOWN_ATTRIBUTES != 0 {
        return Err(BatchError::ReservedAttributes(header.attributes));
    }
    header.compression()?;
    let actual = crc32fast::hash(&batch[CRC_START..]);
    if actual != header.crc {
        return Err(BatchError::CrcMismatch {
            expected: header.crc,
            actual,
        });
    }
    check_header_fields(&header)?;
    Ok(header)
}

fn check_header_fields(header: &BatchHeader) -> Result<(), BatchError> {
    if header.is_compacted() {
        // The cleaner keeps the header of a batch it emptied, so offsets and Raft indexes
        // stay contiguous; what is left must still fit the offset range.
        if u64::from(header.record_count) > u64::from(header.last_offset_delta) + 1 {
            return Err(BatchError::InvalidHeader(
                "a compacted batch holds more records than its offset range",
            ));
        }
        if header.delete_horizon().is_none() && header.record_count > 0 && header.max_timestamp < header.first_timestamp
        {
            return Err(BatchError::InvalidHeader("max timestamp is below first timestamp"));
        }
        return Ok(());
    }
    if header.attributes & DELETE_HORIZON_BIT != 0 {
        return Err(BatchError::InvalidHeader(
            "a delete horizon on a batch that is not compacted",
        ));
    }
    if header.record_count == 0 {
        if !header.is_control() {
            return Err(BatchError::Empty);
        }
        if header.last_offset_delta != 0 {
            return Err(BatchError::InvalidHeader(
                "an empty control batch must have last offset delta 0",
            ));
        }
    } else if header.last_offset_delta < header.record_count - 1 {
        return Err(BatchError::InvalidHeader(
            "last offset delta is smaller than the record count allows",
        ));
    }
    if header.max_timestamp < header.first_timestamp {
        return Err(BatchError::InvalidHeader("max timestamp is below first timestamp"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;

    const LIMIT: usize = 1 << 20;

    fn sample(compression: Compression) -> Bytes {
        let mut b = BatchBuilder::new(compression);
        for i in 0..10 {
            b.push(&Record {
                timestamp: 1_000 + i,
                key: Some(Bytes::from(format!("k{i}"))),
                value: Some(Bytes::from(vec![b'v'; 100])),
                headers: vec![Header {
                    key: Bytes::from("h"),
                    value: None,
                }],
            });
        }
        b.build().expect("build")
    }

    fn with_crc_fixed(mut batch: Vec<u8>) -> Vec<u8> {
        let crc = crc32fast::hash(&batch[CRC_START..]);
        batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        batch
    }

    #[test]
    fn a_keyed_validation_refuses_a_record_without_a_key_and_names_it() {
        for codec in [Compression::None, Compression::Zstd] {
            ValidatedBatch::within_keyed(sample(codec), LIMIT, LIMIT).expect("every record has a key");
            let mut b = BatchBuilder::new(codec);
            for key in [Some(Bytes::from("k")), None] {
                b.push(&Record {
                    timestamp: 1,
                    key,
                    value: Some(Bytes::from("v")),
                    headers: vec![],
                });
            }
            let keyless = b.build().expect("build");
            let err = ValidatedBatch::within_keyed(keyless.clone(), LIMIT, LIMIT).expect_err("keyless");
            assert!(matches!(err, BatchError::KeylessRecord { index: 1 }), "{err:?}");
            ValidatedBatch::within(keyless, LIMIT, LIMIT).expect("keys are optional elsewhere");
        }
    }

    #[test]
    fn a_built_batch_validates_for_every_codec() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let h = validate(&sample(c), LIMIT).expect("valid");
            assert_eq!(h.record_count, 10);
            assert_eq!(h.last_offset_delta, 9);
            assert_eq!(h.max_timestamp, 1_009);
        }
    }

    #[test]
    fn a_flipped_body_byte_fails_the_crc() {
        let mut b = sample(Compression::None).to_vec();
        let last = b.len() - 1;
        b[last] ^= 0xff;
        assert!(matches!(validate(&b, LIMIT), Err(BatchError::CrcMismatch { .. })));
    }

    #[test]
    fn stamped_fields_do_not_break_the_crc() {
        let mut b = sample(Compression::Zstd).to_vec();
        stamp(&mut b, 42, 7, 99);
        let h = validate(&b, LIMIT).expect("still valid");
        assert_eq!((h.base_offset, h.leader_epoch, h.raft_index), (42, 7, 99));
    }

    #[test]
    fn structural_errors_are_typed() {
        let good = sample(Compression::None).to_vec();
        assert!(matches!(validate(&good[..10], LIMIT), Err(BatchError::TooShort { .. })));
        assert!(matches!(
            validate(&good[..good.len() - 1], LIMIT),
            Err(BatchError::LengthMismatch { .. })
        ));
        assert!(matches!(validate(&good, 100), Err(BatchError::TooLarge { .. })));

        let mut v = good.clone();
        v[MAGIC_AT] = 9;
        assert!(matches!(validate(&v, LIMIT), Err(BatchError::UnsupportedVersion(9))));

        let mut v = good.clone();
        v[ATTRIBUTES_AT] = 5;
        assert!(matches!(
            validate(&with_crc_fixed(v), LIMIT),
            Err(BatchError::UnsupportedCompression(5))
        ));

        let mut v = good.clone();
        v[ATTRIBUTES_AT + 1] = 0x80;
        assert!(matches!(
            validate(&with_crc_fixed(v), LIMIT),
            Err(BatchError::ReservedAttributes(_))
        ));

        let mut v = good.clone();
        v[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&9u32.to_le_bytes());
        assert!(matches!(
            validate(&with_crc_fixed(v), LIMIT),
            Err(BatchError::CountMismatch {
                declared: 9,
                actual: 10
            })
        ));

        let mut v = good;
        v[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            validate(&with_crc_fixed(v), LIMIT),
            Err(BatchError::InvalidHeader(_))
        ));
    }

    #[test]
    fn a_compressed_batch_inflating_past_the_limit_is_refused_whatever_its_wire_size() {
        let mut b = BatchBuilder::new(Compression::Zstd);
        b.push(&Record {
            timestamp: 1,
            value: Some(Bytes::from(vec![0u8; 4 << 20])),
            ..Record::default()
        });
        let bomb = b.build().expect("build");
        assert!(bomb.len() < 4096, "zeros compress well: {}", bomb.len());
        assert!(matches!(
            validate_within(&bomb, LIMIT, 1 << 20),
            Err(BatchError::InflatesTooLarge { limit, .. }) if limit == 1 << 20
        ));
        validate_within(&bomb, LIMIT, 8 << 20).expect("within a larger limit");
    }

    #[test]
    fn empty_batches_are_only_allowed_as_control_batches() {
        assert_eq!(
            BatchBuilder::new(Compression::None).build().err(),
            Some(BatchError::Empty)
        );
        let control = BatchBuilder::new(Compression::None)
            .control(true)
            .build_at(5)
            .expect("control");
        let h = validate(&control, LIMIT).expect("valid control batch");
        assert!(h.is_control());
        assert_eq!((h.record_count, h.last_offset_delta, h.first_timestamp), (0, 0, 5));
    }

    fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            -1_000_000i64..1_000_000,
            proptest::option::of(arb_bytes(32)),
            proptest::option::of(arb_bytes(256)),
            proptest::collection::vec((arb_bytes(8), proptest::option::of(arb_bytes(8))), 0..3),
        )
            .prop_map(|(timestamp, key, value, headers)| Record {
                timestamp: 1_700_000_000_000 + timestamp,
                key,
                value,
                headers: headers.into_iter().map(|(key, value)| Header { key, value }).collect(),
            })
    }

    fn arb_compression() -> impl Strategy<Value = Compression> {
        prop_oneof![Just(Compression::None), Just(Compression::Lz4), Just(Compression::Zstd)]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(
            records in proptest::collection::vec(arb_record(), 1..40),
            compression in arb_compression(),
            base in 0u64..1 << 40,
            pid in any::<i64>(), epoch in any::<i16>(), seq in any::<i32>(),
            transactional in any::<bool>(),
        ) {
            let producer = ProducerInfo { producer_id: pid, producer_epoch: epoch, base_sequence: seq };
            let mut b = BatchBuilder::new(compression).producer(producer).transactional(transactional);
            for r in &records { b.push(r); }
            let mut bytes = b.build().expect("build").to_vec();
            stamp(&mut bytes, base, 3, 4);
            let header = validate(&bytes, usize::MAX).expect("valid");
            prop_assert_eq!(header.producer, producer);
            prop_assert_eq!(header.is_transactional(), transactional);
            prop_assert_eq!(header.compression().expect("codec"), compression);
            let batch = RecordBatch::parse(Bytes::from(bytes)).expect("parse");
            let decoded: Vec<StoredRecord> = batch.records().expect("records").collect::<Result<_, _>>().expect("decode");
            prop_assert_eq!(decoded.len(), records.len());
            for (i, (d, r)) in decoded.iter().zip(&records).enumerate() {
                prop_assert_eq!(d.offset, base + i as u64);
                prop_assert_eq!(d.timestamp, r.timestamp);
                prop_assert_eq!(&d.key, &r.key);
                prop_assert_eq!(&d.value, &r.value);
                prop_assert_eq!(&d.headers, &r.headers);
            }
        }

        #[test]
        fn random_damage_is_refused_never_accepted_silently(
            records in proptest::collection::vec(arb_record(), 1..10),
            at in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let mut b = BatchBuilder::new(Compression::None);
            for r in &records { b.push(r); }
            let mut bytes = b.build().expect("build").to_vec();
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
            // Stamped fields sit outside the CRC by design; damage anywhere else is caught.
            let outside_crc = i < LENGTH_AT || (LEADER_EPOCH_AT..MAGIC_AT).contains(&i);
            prop_assert!(outside_crc || validate(&bytes, usize::MAX).is_err());
        }
    }
}
