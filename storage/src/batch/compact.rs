//! Rewriting one stored batch without some of its records: what the cleaner does to each
//! batch of a compacted log. The header keeps its offsets, Raft index and term and producer
//! fields, so offsets, Raft indexes and idempotent producers' state are the same after
//! cleaning as before; the records kept keep their offset deltas.

use bytes::Bytes;

use super::records;
use super::*;

/// What [`rewrite_batch`] made of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewritten {
    /// Every record kept and no horizon to add: the stored bytes stay as they are.
    Unchanged,
    /// The batch as it is to be stored now.
    Changed(Bytes),
}

/// A record as the cleaner judges it.
#[derive(Debug, Clone, Copy)]
pub struct Judged<'a> {
    pub offset: u64,
    pub key: Option<&'a [u8]>,
    /// A null value: a delete.
    pub tombstone: bool,
}

/// A stored batch with its records section decoded once (decompressed when needed), for the
/// cleaner's two looks at it: its keys, then its rewrite. The batch's CRC must have been
/// checked.
#[derive(Debug)]
pub struct PlainBatch<'a> {
    batch: &'a RecordBatch,
    section: Bytes,
}

impl<'a> PlainBatch<'a> {
    pub fn new(batch: &'a RecordBatch) -> Result<PlainBatch<'a>, BatchError> {
        let section = records::plain_section(batch.header(), batch.bytes(), compression::MAX_UNCOMPRESSED_BYTES)?;
        Ok(PlainBatch { batch, section })
    }

    /// Calls `visit` with the offset and key of every record that has a key, in order,
    /// without copying them.
    pub fn for_each_key(&self, mut visit: impl FnMut(u64, &[u8])) -> Result<(), BatchError> {
        let header = self.batch.header();
        records::for_each_view(&self.section, header.record_count, |r| {
            if let Some(key) = r.key {
                visit(header.base_offset + u64::from(r.offset_delta), key);
            }
        })
    }

    /// Rewrites the batch keeping the records `keep` says yes to, in order. `horizon`, when
    /// the batch has none yet and keeps a tombstone, becomes its delete horizon (see the
    /// format notes in [`crate::batch`]) unless the batch would then pass
    /// `max_batch_bytes`; a batch that has one keeps it. Control batches are never given to
    /// this function (the cleaner keeps them whole).
    ///
    /// Kept records are copied as they are encoded, unless a new horizon moves the base
    /// their timestamps count from. An emptied batch keeps its header with no records and
    /// no compression. A batch that stays as it is costs no allocation.
    pub fn rewrite(
        &self,
        mut keep: impl FnMut(Judged<'_>) -> bool,
        horizon: Option<i64>,
        max_batch_bytes: usize,
    ) -> Result<Rewritten, BatchError> {
        let (batch, section) = (self.batch, &self.section);
        let header = batch.header();
        let existing_horizon = header.delete_horizon();
        // Byte ranges of the kept records in `section`, adjacent ones merged; filled only
        // once a record is dropped: until then the kept records are the prefix up to
        // `prefix_end`.
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        let mut prefix_end = 0;
        let (mut count, mut dropped, mut keeps_tombstones) = (0u32, false, false);
        let base = section.as_ptr() as usize;
        records::for_each_view(section, header.record_count, |r| {
            let judged = Judged {
                offset: header.base_offset + u64::from(r.offset_delta),
                key: r.key,
                tombstone: r.tombstone,
            };
            let at = r.encoded.as_ptr() as usize - base;
            let end = at + r.encoded.len();
            if keep(judged) {
                match ranges.last_mut() {
                    _ if !dropped => prefix_end = end,
                    Some(last) if last.1 == at => last.1 = end,
                    _ => ranges.push((at, end)),
                }
                count += 1;
                keeps_tombstones |= r.tombstone;
            } else if !dropped {
                dropped = true;
                if prefix_end > 0 {
                    ranges.push((0, prefix_end));
                }
            }
        })?;
        let new_horizon = existing_horizon.or(horizon.filter(|_| keeps_tombstones));
        if !dropped && new_horizon == existing_horizon {
            return Ok(Rewritten::Unchanged);
        }
        if !dropped && prefix_end > 0 {
            ranges.push((0, prefix_end));
        }
        let kept = Kept {
            batch,
            section,
            ranges: &ranges,
            count,
        };
        let out = kept.assemble(new_horizon)?;
        // A new horizon moves the timestamp base to the max timestamp, which can lengthen the
        // deltas by a few bytes: a batch may grow only within `max_batch_bytes` (the log's
        // limit); past it, its tombstones wait for a pass that also removes records from it.
        if existing_horizon.is_none() && new_horizon.is_some() && out.len() > batch.bytes().len().max(max_batch_bytes) {
            if !dropped {
                return Ok(Rewritten::Unchanged);
            }
            return Ok(Rewritten::Changed(Bytes::from(kept.assemble(None)?)));
        }
        Ok(Rewritten::Changed(Bytes::from(out)))
    }
}

/// [`PlainBatch::rewrite`] of `batch`.
pub fn rewrite_batch(
    batch: &RecordBatch,
    keep: impl FnMut(Judged<'_>) -> bool,
    horizon: Option<i64>,
    max_batch_bytes: usize,
) -> Result<Rewritten, BatchError> {
    PlainBatch::new(batch)?.rewrite(keep, horizon, max_batch_bytes)
}

/// What a rewrite keeps of a batch.
struct Kept<'a> {
    batch: &'a RecordBatch,
    /// The batch's plain records section.
    section: &'a Bytes,
    /// Byte ranges of the kept records in `section`.
    ranges: &'a [(usize, usize)],
    count: u32,
}

impl Kept<'_> {
    /// The new batch's bytes with `horizon` as its delete horizon.
    fn assemble(&self, horizon: Option<i64>) -> Result<Vec<u8>, BatchError> {
        let header = self.batch.header();
        let with_horizon = horizon.is_some() && self.count > 0;
        let base = if with_horizon {
            header.max_timestamp
        } else {
            header.first_timestamp
        };
        let mut plain = Vec::with_capacity(self.ranges.iter().map(|(a, b)| b - a).sum());
        if base == records::timestamp_base(header) {
            for (from, to) in self.ranges {
                plain.extend_from_slice(&self.section[*from..*to]);
            }
        } else {
            // A new timestamp base: each kept record is encoded again with its delta from it.
            for (from, to) in self.ranges {
                for record in RecordIter::over(header, self.section.slice(*from..*to)) {
                    let record = record?;
                    let offset_delta = (record.offset - header.base_offset) as u32;
                    let r = Record {
                        timestamp: record.timestamp,
                        key: record.key,
                        value: record.value,
                        headers: record.headers,
                    };
                    records::encode(&mut plain, &r, r.timestamp.wrapping_sub(base), offset_delta);
                }
            }
        }
        let compression = if self.count == 0 {
            Compression::None
        } else {
            header.compression()?
        };
        let mut out = Vec::with_capacity(HEADER_LEN + plain.len());
        out.extend_from_slice(&self.batch.bytes()[..HEADER_LEN]);
        compression.compress(&plain, &mut out)?;
        let mut attributes = (header.attributes & !COMPRESSION_MASK) | u16::from(compression.id()) | COMPACTED_BIT;
        let first_timestamp = match horizon {
            Some(h) if with_horizon => {
                attributes |= DELETE_HORIZON_BIT;
                h
            }
            _ => {
                attributes &= !DELETE_HORIZON_BIT;
                // An emptied batch that had a horizon keeps it there: nothing reads it.
                header.first_timestamp
            }
        };
        let batch_length =
            u32::try_from(out.len() - LENGTH_PREFIX).map_err(|_| BatchError::Compress("batch exceeds 4 GiB".into()))?;
        let put = |out: &mut Vec<u8>, at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
        put(&mut out, LENGTH_AT, &batch_length.to_le_bytes());
        put(&mut out, ATTRIBUTES_AT, &attributes.to_le_bytes());
        put(&mut out, FIRST_TIMESTAMP_AT, &first_timestamp.to_le_bytes());
        put(&mut out, RECORD_COUNT_AT, &self.count.to_le_bytes());
        let crc = crc32fast::hash(&out[CRC_START..]);
        put(&mut out, CRC_AT, &crc.to_le_bytes());
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(compression: Compression) -> RecordBatch {
        let mut b = BatchBuilder::new(compression).producer(ProducerInfo {
            producer_id: 7,
            producer_epoch: 1,
            base_sequence: 40,
        });
        for i in 0..5 {
            b.push(&Record {
                timestamp: 1_000 + i,
                key: Some(Bytes::from(format!("k{i}"))),
                value: (i != 3).then(|| Bytes::from(format!("v{i}"))),
                headers: vec![Header {
                    key: Bytes::from("h"),
                    value: Some(Bytes::from("x")),
                }],
            });
        }
        let mut bytes = b.build().expect("build").to_vec();
        stamp(&mut bytes, 100, 3, 9);
        RecordBatch::parse(Bytes::from(bytes)).expect("parse")
    }

    #[test]
    fn kept_records_keep_offsets_timestamps_and_the_header_keeps_its_stamps() {
        for codec in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let original = batch(codec);
            let Rewritten::Changed(bytes) =
                rewrite_batch(&original, |r| r.offset % 2 == 1, None, 1 << 20).expect("rewrite")
            else {
                panic!("records were dropped");
            };
            let header = validate::check_frame(&bytes, 1 << 20).expect("a valid frame");
            let rewritten = RecordBatch::parse(bytes).expect("parse");
            assert!(header.is_compacted());
            assert_eq!(header.delete_horizon(), None);
            let o = original.header();
            assert_eq!(
                (
                    header.base_offset,
                    header.last_offset_delta,
                    header.raft_index,
                    header.leader_epoch
                ),
                (o.base_offset, o.last_offset_delta, o.raft_index, o.leader_epoch)
            );
            assert_eq!(header.producer, o.producer);
            assert_eq!(header.record_count, 2);
            let records: Vec<_> = rewritten
                .records()
                .expect("records")
                .map(|r| r.expect("record"))
                .collect();
            let expected: Vec<_> = original
                .records()
                .expect("records")
                .map(|r| r.expect("record"))
                .filter(|r| r.offset % 2 == 1)
                .collect();
            assert_eq!(records, expected);
            assert!(
                validate(rewritten.bytes(), 1 << 20).is_err(),
                "a producer may not send it"
            );
        }
    }

    #[test]
    fn a_batch_of_tombstones_gets_its_horizon_within_the_size_limit_and_not_past_it() {
        // Timestamps far apart: counted from the max timestamp, the deltas grow.
        let mut b = BatchBuilder::new(Compression::None);
        for (i, ts) in [1_000, 1_000, 1_000, 101_000].into_iter().enumerate() {
            b.push(&Record {
                timestamp: ts,
                key: Some(Bytes::from(format!("k{i}"))),
                value: None,
                headers: vec![],
            });
        }
        let original = RecordBatch::parse(b.build().expect("build")).expect("parse");
        let Rewritten::Changed(bytes) = rewrite_batch(&original, |_| true, Some(500_000), 1 << 20).expect("rewrite")
        else {
            panic!("a bulk delete gets its horizon");
        };
        assert!(bytes.len() > original.bytes().len(), "it grew, within the limit");
        let rewritten = RecordBatch::parse(bytes).expect("parse");
        assert_eq!(rewritten.header().delete_horizon(), Some(500_000));
        let limit = original.bytes().len();
        assert_eq!(
            rewrite_batch(&original, |_| true, Some(500_000), limit).expect("rewrite"),
            Rewritten::Unchanged,
            "not past the limit"
        );
    }

    #[test]
    fn a_horizon_never_makes_a_batch_larger() {
        let mut b = BatchBuilder::new(Compression::None);
        for i in 0..50 {
            b.push(&Record {
                timestamp: 1_700_000_000_000 + i,
                key: Some(Bytes::from(format!("k{i}"))),
                value: None,
                headers: vec![],
            });
        }
        let original = RecordBatch::parse(b.build().expect("build")).expect("parse");
        let horizon = 1_700_000_000_000 + 86_400_000;
        let Rewritten::Changed(bytes) = rewrite_batch(&original, |_| true, Some(horizon), 1 << 20).expect("rewrite")
        else {
            panic!("a horizon was added");
        };
        assert!(
            bytes.len() <= original.bytes().len(),
            "{} > {}",
            bytes.len(),
            original.bytes().len()
        );
        let rewritten = RecordBatch::parse(bytes).expect("parse");
        assert_eq!(rewritten.header().delete_horizon(), Some(horizon));
        let a: Vec<i64> = rewritten
            .records()
            .expect("r")
            .map(|r| r.expect("r").timestamp)
            .collect();
        let b: Vec<i64> = original
            .records()
            .expect("r")
            .map(|r| r.expect("r").timestamp)
            .collect();
        assert_eq!(a, b);
    }

    #[test]
    fn a_horizon_moves_the_timestamp_base_and_an_emptied_batch_keeps_its_header() {
        let original = batch(Compression::Lz4);
        let unchanged = RecordBatch::parse({
            let mut b = BatchBuilder::new(Compression::None);
            b.push(&Record {
                timestamp: 1,
                key: Some(Bytes::from("k")),
                value: Some(Bytes::from("v")),
                headers: vec![],
            });
            b.build().expect("build")
        })
        .expect("parse");
        assert_eq!(
            rewrite_batch(&unchanged, |_| true, Some(5), 1 << 20).expect("no tombstone"),
            Rewritten::Unchanged,
            "a horizon only goes on a batch that keeps a tombstone"
        );
        let Rewritten::Changed(bytes) = rewrite_batch(&original, |_| true, Some(9_999_999), 1 << 20).expect("rewrite")
        else {
            panic!("a horizon was added");
        };
        let with_horizon = RecordBatch::parse(bytes).expect("parse");
        assert_eq!(with_horizon.header().delete_horizon(), Some(9_999_999));
        validate::check_frame(with_horizon.bytes(), 1 << 20).expect("valid frame");
        let a: Vec<_> = with_horizon.records().expect("r").map(|r| r.expect("r")).collect();
        let b: Vec<_> = original.records().expect("r").map(|r| r.expect("r")).collect();
        assert_eq!(a, b, "timestamps read back the same");
        assert_eq!(
            rewrite_batch(&with_horizon, |_| true, Some(5), 1 << 20).expect("again"),
            Rewritten::Unchanged,
            "a horizon, once set, stays"
        );
        let Rewritten::Changed(empty) = rewrite_batch(&with_horizon, |_| false, None, 1 << 20).expect("empty") else {
            panic!("emptied");
        };
        let header = validate::check_frame(&empty, 1 << 20).expect("an emptied batch is a valid frame");
        assert_eq!(
            (header.record_count, header.last_offset_delta, header.base_offset),
            (0, 4, 100)
        );
        assert_eq!(header.compression().expect("codec"), Compression::None);
        assert_eq!(
            RecordBatch::parse(empty).expect("parse").records().expect("r").count(),
            0
        );
    }
}
