//! The broker-wide budget for decompressed bytes, a [`ByteBudget`]. Produce validation
//! (which inflates a compressed batch to check its records) and fetches with
//! `decode_records` (which inflate stored batches and copy their records into the response)
//! take their share from it before they inflate anything, so however many requests arrive
//! at once, and however many of them are cancelled midway, the broker holds at most
//! [`BROKER_BUDGET_BYTES`] of decompressed data for them (besides each decoder's small fixed
//! working state).
//!
//! Invariants (besides those of [`ByteBudget`]):
//! - A request reserves what it can really hold at once, not the sum of what its batches
//!   declare: batches are inflated one at a time and each is dropped before the next, and
//!   a batch's output never takes more memory than it declared (capped by `[limits]
//!   max_uncompressed_batch_bytes`); decompression fails as soon as it would pass that. A
//!   client that declares more than its batch inflates to holds its share only while that
//!   one batch fails validation.
//! - A share moves into the blocking job that inflates ([`ByteBudget::run_blocking`]), so a
//!   client that resets its stream or whose deadline passes cannot return it while the job
//!   still inflates, and into the buffers of decoded records ([`Reservation::attach`]), so a
//!   decoding fetch keeps it until tonic has encoded the response and dropped the records.
//!   The encoded response is bounded like any fetch response, by its size limit.
//! - No request waits for its share for longer than [`MAX_WAIT`]: past it, it is answered
//!   `BUSY` (RESOURCE_EXHAUSTED, retriable) rather than queued behind others without end.

use std::sync::OnceLock;

use bytes::Bytes;
use conveyor_storage::batch::{BatchHeader, BatchIter, Compression, HEADER_LEN};

pub use crate::byte_budget::{ByteBudget, MAX_WAIT, Reservation};

/// Decompressed bytes all produce validations and decoding fetches may hold at once: eight
/// batches at the default 32 MiB limit.
pub const BROKER_BUDGET_BYTES: usize = 256 << 20;

/// The budget every request of this broker shares.
pub fn shared() -> &'static ByteBudget {
    static SHARED: OnceLock<ByteBudget> = OnceLock::new();
    SHARED.get_or_init(|| ByteBudget::new(BROKER_BUDGET_BYTES, MAX_WAIT, "decompression memory"))
}

/// What a stored or produced batch inflates to at most when its records are read: for a
/// compressed batch, its declared uncompressed size within `limit` (decompression stops past
/// both); `None` for a plain batch, whose records are already in memory.
pub fn inflates_to(batch: &[u8], limit: usize) -> Option<usize> {
    let header = BatchHeader::parse(batch).ok()?;
    if matches!(header.compression(), Ok(Compression::None)) {
        return None;
    }
    let len = batch.get(HEADER_LEN..HEADER_LEN + 4)?;
    Some((u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize).min(limit))
}

/// Bytes a fetch with `decode_records` holds for `reads` beyond the raw bytes it read: the
/// records it decodes, at most `response_budget` of them (a decoded record keeps its
/// batch's inflated buffer alive), plus the one batch inflated past that budget.
pub fn decoding_bytes<'a>(reads: impl IntoIterator<Item = &'a Bytes>, limit: usize, response_budget: usize) -> usize {
    let (mut decoded, mut largest) = (0usize, 0usize);
    for bytes in reads {
        for batch in BatchIter::new(bytes.clone()) {
            let Ok(batch) = batch else { break };
            let raw = batch.bytes();
            match inflates_to(raw, limit) {
                Some(inflated) => {
                    decoded = decoded.saturating_add(inflated);
                    largest = largest.max(inflated);
                }
                None => decoded = decoded.saturating_add(raw.len()),
            }
        }
    }
    decoded.min(response_budget).saturating_add(largest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_batches::batch_of;

    #[test]
    fn a_decoding_fetch_reserves_its_decoded_records_within_the_response_budget_plus_one_batch() {
        let zstd = batch_of(Compression::Zstd, 4 << 20);
        let one = inflates_to(&zstd, 32 << 20).expect("compressed");
        assert!(one >= 4 << 20, "{one}");
        let read: Bytes = [zstd.clone(), zstd.clone(), zstd].concat().into();
        assert_eq!(
            decoding_bytes([&read], 32 << 20, 64 << 20),
            4 * one,
            "all three decoded, plus one"
        );
        assert_eq!(
            decoding_bytes([&read], 32 << 20, one),
            2 * one,
            "the response budget stops decoding after the first"
        );
        let plain = batch_of(Compression::None, 1 << 10);
        assert_eq!(inflates_to(&plain, 32 << 20), None);
        assert_eq!(decoding_bytes([&plain], 32 << 20, 64 << 20), plain.len());
    }
}
