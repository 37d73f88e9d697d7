//! The broker-wide budget for decompressed bytes. Produce validation (which inflates a
//! compressed batch to check its records) and fetches with `decode_records` (which inflate
//! stored batches and copy their records into the response) take their share from one
//! semaphore before they inflate anything, so however many requests arrive at once, the
//! broker holds at most [`BROKER_BUDGET_BYTES`] of decompressed data for them.
//!
//! Invariants:
//! - A request reserves what it can really hold at once, not the sum of what its batches
//!   declare: batches are inflated one at a time and each is dropped before the next, and
//!   decompression stops as soon as the output passes what the batch declared (capped by
//!   `[limits] max_uncompressed_batch_bytes`). A client that declares more than its batch
//!   inflates to holds its share only while that one batch fails validation.
//! - No request waits for its share for longer than [`MAX_WAIT`]: past it, it is answered
//!   `BUSY` (RESOURCE_EXHAUSTED, retriable) rather than queued behind others without end.
//! - A reservation is released when its guard drops, including on errors and panics of
//!   the blocking job (the guard lives in the awaiting task).
//!
//! Nothing here survives a restart.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conveyor_storage::batch::{BatchHeader, BatchIter, Compression, HEADER_LEN};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{BrokerError, Result};

/// Decompressed bytes all produce validations and decoding fetches may hold at once: eight
/// batches at the default 32 MiB limit.
pub const BROKER_BUDGET_BYTES: usize = 256 << 20;
/// The longest a request waits for its share before it is answered `BUSY`.
pub const MAX_WAIT: Duration = Duration::from_secs(1);
/// Permits count KiB, so that the whole budget fits a semaphore's `u32` requests.
const UNIT: usize = 1024;

/// A pool of decompression memory, in bytes (see the module docs).
#[derive(Debug)]
pub struct InflateBudget {
    permits: Semaphore,
    units: u32,
    max_wait: Duration,
}

/// A share of the budget, returned when dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    _permit: Option<SemaphorePermit<'a>>,
}

impl InflateBudget {
    pub fn new(bytes: usize, max_wait: Duration) -> InflateBudget {
        let units = u32::try_from(bytes / UNIT).unwrap_or(u32::MAX).max(1);
        InflateBudget {
            permits: Semaphore::new(units as usize),
            units,
            max_wait,
        }
    }

    /// The budget every request of this broker shares.
    pub fn shared() -> &'static InflateBudget {
        static SHARED: OnceLock<InflateBudget> = OnceLock::new();
        SHARED.get_or_init(|| InflateBudget::new(BROKER_BUDGET_BYTES, MAX_WAIT))
    }

    /// Reserves `bytes` (at most the whole budget; nothing for 0), waiting at most the
    /// budget's maximum wait. `what` names the request in the `BUSY` answer.
    pub async fn reserve(&self, bytes: usize, what: impl FnOnce() -> String) -> Result<Reservation<'_>> {
        if bytes == 0 {
            return Ok(Reservation { _permit: None });
        }
        let units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX).min(self.units);
        let started = Instant::now();
        match tokio::time::timeout(self.max_wait, self.permits.acquire_many(units)).await {
            Ok(Ok(permit)) => Ok(Reservation { _permit: Some(permit) }),
            // Never closed; answered as busy all the same rather than a panic.
            Ok(Err(_)) | Err(_) => Err(BrokerError::DecompressionBusy {
                what: what(),
                waited_ms: started.elapsed().as_millis() as u64,
            }),
        }
    }

    /// Bytes not reserved now.
    pub fn available(&self) -> usize {
        self.permits.available_permits() * UNIT
    }
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

    #[tokio::test]
    async fn a_request_that_cannot_get_its_share_in_time_is_answered_busy_and_retriable() {
        let budget = InflateBudget::new(4 << 20, Duration::from_millis(50));
        let held = budget.reserve(3 << 20, || "first".into()).await.expect("fits");
        let error = budget
            .reserve(2 << 20, || "produce to 't'".into())
            .await
            .expect_err("only 1 MiB is left");
        assert!(matches!(error, BrokerError::DecompressionBusy { .. }), "{error:?}");
        assert!(error.to_string().contains("produce to 't'"), "{error}");
        let detail = error.detail();
        assert!(detail.retriable, "{detail:?}");
        assert_eq!(detail.code, conveyor_proto::v1::ErrorCode::Busy as i32);
        drop(held);
        let again = budget.reserve(2 << 20, || "retry".into()).await.expect("released");
        assert_eq!(budget.available(), 2 << 20);
        drop(again);
        assert_eq!(budget.available(), 4 << 20);
    }

    #[tokio::test]
    async fn a_request_larger_than_the_budget_takes_the_whole_budget_rather_than_waiting_forever() {
        let budget = InflateBudget::new(1 << 20, Duration::from_millis(50));
        let all = budget
            .reserve(8 << 20, || "big".into())
            .await
            .expect("capped at the budget");
        assert_eq!(budget.available(), 0);
        drop(all);
        budget
            .reserve(0, || "nothing".into())
            .await
            .expect("nothing to reserve");
        assert_eq!(budget.available(), 1 << 20);
    }

    fn batch_of(compression: Compression, value: usize) -> Bytes {
        let mut b = conveyor_storage::batch::BatchBuilder::new(compression);
        b.push(&conveyor_storage::batch::Record {
            timestamp: 1,
            value: Some(Bytes::from(vec![0u8; value])),
            ..Default::default()
        });
        b.build().expect("batch")
    }

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
