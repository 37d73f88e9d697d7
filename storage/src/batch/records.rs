//! Records inside a batch: encoding (used by the builder), decoding into [`StoredRecord`]s,
//! and the allocation-free walk that validation uses.

use bytes::Bytes;

use super::varint;
use super::{BatchHeader, Compression, HEADER_LEN};
use crate::error::BatchError;

/// A record header: a key and an optional value, as Kafka's record headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: Bytes,
    pub value: Option<Bytes>,
}

/// A record to append: what a producer sends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    pub key: Option<Bytes>,
    /// `None` is a tombstone: compaction removes the key.
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

/// A record read back from the log, with the offset the leader gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

fn nullable_len(field: Option<&Bytes>) -> i64 {
    field.map_or(-1, |b| b.len() as i64)
}

/// Appends one encoded record to `out`.
pub(crate) fn encode(out: &mut Vec<u8>, record: &Record, timestamp_delta: i64, offset_delta: u32) {
    let mut body_len = varint::len_i64(timestamp_delta) + varint::len_u64(u64::from(offset_delta));
    for field in [record.key.as_ref(), record.value.as_ref()] {
        body_len += varint::len_i64(nullable_len(field)) + field.map_or(0, Bytes::len);
    }
    body_len += varint::len_u64(record.headers.len() as u64);
    for h in &record.headers {
        body_len += varint::len_u64(h.key.len() as u64) + h.key.len();
        body_len += varint::len_i64(nullable_len(h.value.as_ref())) + h.value.as_ref().map_or(0, Bytes::len);
    }
    out.reserve(body_len + 10);
    varint::put_u64(out, body_len as u64);
    varint::put_i64(out, timestamp_delta);
    varint::put_u64(out, u64::from(offset_delta));
    for field in [record.key.as_ref(), record.value.as_ref()] {
        varint::put_i64(out, nullable_len(field));
        if let Some(b) = field {
            out.extend_from_slice(b);
        }
    }
    varint::put_u64(out, record.headers.len() as u64);
    for h in &record.headers {
        varint::put_u64(out, h.key.len() as u64);
        out.extend_from_slice(&h.key);
        varint::put_i64(out, nullable_len(h.value.as_ref()));
        if let Some(v) = &h.value {
            out.extend_from_slice(v);
        }
    }
}

/// Position and extent of one record's fields inside the records section.
struct RawRecord {
    timestamp_delta: i64,
    offset_delta: u64,
    key: Option<(usize, usize)>,
    value: Option<(usize, usize)>,
    headers_at: usize,
    header_count: u64,
    end: usize,
}

fn invalid(index: u32, reason: &'static str) -> BatchError {
    BatchError::InvalidRecord { index, reason }
}

fn nullable_field(buf: &[u8], pos: &mut usize, end: usize, index: u32) -> Result<Option<(usize, usize)>, BatchError> {
    let len = varint::get_i64(&buf[..end], pos).ok_or(invalid(index, "truncated field length"))?;
    if len == -1 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| invalid(index, "negative field length"))?;
    let start = *pos;
    if len > end - start {
        return Err(invalid(index, "field runs past the record"));
    }
    *pos += len;
    Ok(Some((start, len)))
}

/// Parses the record at `*pos`, checking that every length stays inside it, and advances.
fn parse_raw(buf: &[u8], pos: &mut usize, index: u32) -> Result<RawRecord, BatchError> {
    let len = varint::get_u64(buf, pos).ok_or(invalid(index, "truncated record length"))?;
    let len = usize::try_from(len).map_err(|_| invalid(index, "record length overflows"))?;
    if len > buf.len() - *pos {
        return Err(invalid(index, "record runs past the batch"));
    }
    let end = *pos + len;
    let body = &buf[..end];
    let timestamp_delta = varint::get_i64(body, pos).ok_or(invalid(index, "truncated timestamp delta"))?;
    let offset_delta = varint::get_u64(body, pos).ok_or(invalid(index, "truncated offset delta"))?;
    let key = nullable_field(buf, pos, end, index)?;
    let value = nullable_field(buf, pos, end, index)?;
    let header_count = varint::get_u64(body, pos).ok_or(invalid(index, "truncated header count"))?;
    let headers_at = *pos;
    for _ in 0..header_count {
        let key_len = varint::get_u64(body, pos).ok_or(invalid(index, "truncated header key"))?;
        let key_len = usize::try_from(key_len).map_err(|_| invalid(index, "header key overflows"))?;
        if key_len > end - *pos {
            return Err(invalid(index, "header key runs past the record"));
        }
        *pos += key_len;
        nullable_field(buf, pos, end, index)?;
    }
    if *pos != end {
        return Err(invalid(index, "record length does not match its fields"));
    }
    Ok(RawRecord {
        timestamp_delta,
        offset_delta,
        key,
        value,
        headers_at,
        header_count,
        end,
    })
}

/// Walks every record of a producer-built batch, checking structure, that offset deltas run
/// 0, 1, 2, ... and that timestamps stay within the header's maximum. Returns the number of
/// records and their largest timestamp.
pub(crate) fn walk(header: &BatchHeader, section: &[u8], keys_required: bool) -> Result<(u32, i64), BatchError> {
    let mut pos = 0;
    let mut count: u32 = 0;
    let mut max_timestamp = i64::MIN;
    while pos < section.len() {
        let raw = parse_raw(section, &mut pos, count)?;
        if keys_required && raw.key.is_none() {
            return Err(BatchError::KeylessRecord { index: count });
        }
        if raw.offset_delta != u64::from(count) {
            return Err(invalid(
                count,
                "offset deltas must run 0, 1, 2, ... in a produced batch",
            ));
        }
        let ts = header
            .first_timestamp
            .checked_add(raw.timestamp_delta)
            .ok_or(invalid(count, "timestamp overflows"))?;
        if ts > header.max_timestamp {
            return Err(invalid(count, "timestamp is above the batch's max timestamp"));
        }
        max_timestamp = max_timestamp.max(ts);
        count = count.checked_add(1).ok_or(invalid(count, "too many records"))?;
    }
    Ok((count, max_timestamp))
}

/// One record of a records section, borrowed: what the cleaner needs to judge it and, when
/// it stays, to copy it as it is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordView<'a> {
    pub offset_delta: u32,
    pub key: Option<&'a [u8]>,
    /// A null value: a delete.
    pub tombstone: bool,
    /// The whole encoded record, its length prefix included.
    pub encoded: &'a [u8],
}

/// Calls `visit` with each record of a plain records section, without copying or
/// allocating. Stops with an error at a malformed record.
pub(crate) fn for_each_view(
    section: &[u8],
    record_count: u32,
    mut visit: impl FnMut(RecordView<'_>),
) -> Result<(), BatchError> {
    let mut pos = 0;
    let mut index = 0u32;
    while pos < section.len() && index < record_count {
        let start = pos;
        let raw = parse_raw(section, &mut pos, index)?;
        let offset_delta = u32::try_from(raw.offset_delta).map_err(|_| invalid(index, "offset delta overflows"))?;
        visit(RecordView {
            offset_delta,
            key: raw.key.map(|(at, len)| &section[at..at + len]),
            tombstone: raw.value.is_none(),
            encoded: &section[start..raw.end],
        });
        index += 1;
    }
    Ok(())
}

/// One record of a batch, borrowed from its records section: what a reader needs to judge
/// it (offset, timestamp, key, a header) without decoding it into owned fields.
#[derive(Clone, Copy)]
pub struct RecordRef<'a> {
    pub offset: u64,
    pub timestamp: i64,
    pub key: Option<&'a [u8]>,
    section: &'a [u8],
    headers_at: usize,
    header_count: u64,
    end: usize,
}

impl std::fmt::Debug for RecordRef<'_> {
    // The record's own fields, not the whole records section it borrows.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordRef")
            .field("offset", &self.offset)
            .field("timestamp", &self.timestamp)
            .field("key", &self.key)
            .field("header_count", &self.header_count)
            .finish()
    }
}

impl<'a> RecordRef<'a> {
    /// The value of the first header named `key` (`None` also for a header with a null value).
    pub fn header(&self, key: &[u8]) -> Option<&'a [u8]> {
        let mut pos = self.headers_at;
        // The record was checked whole by `parse_raw`: every length stays inside it.
        for _ in 0..self.header_count {
            let key_len = varint::get_u64(&self.section[..self.end], &mut pos)? as usize;
            let name = self.section.get(pos..pos + key_len)?;
            pos += key_len;
            let value = nullable_field(self.section, &mut pos, self.end, 0).ok()?;
            if name == key {
                return value.map(|(at, len)| &self.section[at..at + len]);
            }
        }
        None
    }
}

/// Calls `visit` with each record of the plain records section of the batch `header` heads,
/// borrowed, without allocating. Stops with an error at a malformed record.
pub(crate) fn for_each_ref(
    header: &BatchHeader,
    section: &[u8],
    mut visit: impl FnMut(RecordRef<'_>),
) -> Result<(), BatchError> {
    let base = timestamp_base(header);
    let mut pos = 0;
    let mut index = 0u32;
    while pos < section.len() && index < header.record_count {
        let raw = parse_raw(section, &mut pos, index)?;
        let offset = header
            .base_offset
            .checked_add(raw.offset_delta)
            .ok_or(invalid(index, "offset overflows"))?;
        visit(RecordRef {
            offset,
            timestamp: base.wrapping_add(raw.timestamp_delta),
            key: raw.key.map(|(at, len)| &section[at..at + len]),
            section,
            headers_at: raw.headers_at,
            header_count: raw.header_count,
            end: raw.end,
        });
        index += 1;
    }
    Ok(())
}

/// What record timestamp deltas count from: the first timestamp, or on a batch with a delete
/// horizon (which takes the first timestamp's place) the max timestamp.
pub(crate) fn timestamp_base(header: &BatchHeader) -> i64 {
    if header.delete_horizon().is_some() {
        header.max_timestamp
    } else {
        header.first_timestamp
    }
}

/// The plain records section of a batch, decompressed (to at most `limit` bytes) when needed.
pub(crate) fn plain_section(header: &BatchHeader, batch: &Bytes, limit: usize) -> Result<Bytes, BatchError> {
    if batch.len() < HEADER_LEN {
        return Err(BatchError::TooShort {
            len: batch.len(),
            min: HEADER_LEN,
        });
    }
    let section = batch.slice(HEADER_LEN..);
    match header.compression()? {
        Compression::None => Ok(section),
        codec => Ok(Bytes::from(codec.decompress(&section, limit)?)),
    }
}

/// Iterates the records of one batch. Values borrow the batch (or its decompressed copy)
/// without copying.
#[derive(Debug, Clone)]
pub struct RecordIter {
    section: Bytes,
    pos: usize,
    index: u32,
    base_offset: u64,
    first_timestamp: i64,
    remaining: u32,
}

impl RecordIter {
    pub(crate) fn new(header: &BatchHeader, batch: &Bytes, limit: usize) -> Result<RecordIter, BatchError> {
        Ok(RecordIter {
            section: plain_section(header, batch, limit)?,
            pos: 0,
            index: 0,
            base_offset: header.base_offset,
            first_timestamp: timestamp_base(header),
            remaining: header.record_count,
        })
    }

    /// The records encoded in `encoded` (whole records cut from the plain records section of
    /// the batch `header` heads), with the offsets and timestamps the header gives them.
    pub(crate) fn over(header: &BatchHeader, encoded: Bytes) -> RecordIter {
        RecordIter {
            section: encoded,
            pos: 0,
            index: 0,
            base_offset: header.base_offset,
            first_timestamp: timestamp_base(header),
            remaining: header.record_count,
        }
    }

    /// The same records, from the records section as `wrap` returns it: every key, value and
    /// header value is a slice of that buffer, so what `wrap` attaches to it (an owner that
    /// must live as long as the records do) is attached once per batch, not once per field.
    pub fn with_section(mut self, wrap: impl FnOnce(Bytes) -> Bytes) -> RecordIter {
        self.section = wrap(self.section);
        self
    }

    fn decode_next(&mut self) -> Result<StoredRecord, BatchError> {
        let raw = parse_raw(&self.section, &mut self.pos, self.index)?;
        let slice = |f: Option<(usize, usize)>| f.map(|(at, len)| self.section.slice(at..at + len));
        let mut headers = Vec::with_capacity(raw.header_count.min(64) as usize);
        let mut pos = raw.headers_at;
        for _ in 0..raw.header_count {
            let key_len = varint::get_u64(&self.section, &mut pos).unwrap_or(0) as usize;
            let key = self.section.slice(pos..pos + key_len);
            pos += key_len;
            let value = nullable_field(&self.section, &mut pos, raw.end, self.index)?;
            headers.push(Header {
                key,
                value: slice(value),
            });
        }
        let offset = self
            .base_offset
            .checked_add(raw.offset_delta)
            .ok_or(invalid(self.index, "offset overflows"))?;
        Ok(StoredRecord {
            offset,
            timestamp: self.first_timestamp.wrapping_add(raw.timestamp_delta),
            key: slice(raw.key),
            value: slice(raw.value),
            headers,
        })
    }
}

impl Iterator for RecordIter {
    type Item = Result<StoredRecord, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 || self.pos >= self.section.len() {
            return None;
        }
        self.remaining -= 1;
        let item = self.decode_next();
        self.index += 1;
        if item.is_err() {
            self.remaining = 0;
        }
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.remaining as usize))
    }
}
