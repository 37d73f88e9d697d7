//! The broker-wide budget for decompressed bytes. Produce validation (which inflates a
//! compressed batch to check its records) and fetches with `decode_records` (which inflate
//! stored batches and copy their records into the response) take their share from one
//! semaphore before they inflate anything, so however many requests arrive at once, and
//! however many of them are cancelled midway, the broker holds at most
//! [`BROKER_BUDGET_BYTES`] of decompressed data for them (besides each decoder's small fixed
//! working state).
//!
//! Invariants:
//! - A request reserves what it can really hold at once, not the sum of what its batches
//!   declare: batches are inflated one at a time and each is dropped before the next, and
//!   a batch's output never takes more memory than it declared (capped by `[limits]
//!   max_uncompressed_batch_bytes`); decompression fails as soon as it would pass that. A
//!   client that declares more than its batch inflates to holds its share only while that
//!   one batch fails validation.
//! - A share is held by the memory it stands for, not by the request's handler: it moves
//!   into the blocking job that inflates ([`InflateBudget::run_blocking`]), so a client that
//!   resets its stream or whose deadline passes cannot return the share while the job still
//!   inflates, and into the buffers of decoded records ([`Reservation::attach`]), so a
//!   decoding fetch keeps it until tonic has encoded the response and dropped the records.
//!   The encoded response is bounded like any fetch response, by its size limit.
//! - No request waits for its share for longer than [`MAX_WAIT`]: past it, it is answered
//!   `BUSY` (RESOURCE_EXHAUSTED, retriable) rather than queued behind others without end.
//! - A share is returned when its last holder drops, including on errors and panics of the
//!   blocking job (unwinding drops it).
//!
//! Nothing here survives a restart.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use conveyor_storage::batch::{BatchHeader, BatchIter, Compression, HEADER_LEN};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::blocking::blocking;
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
    permits: Arc<Semaphore>,
    units: u32,
    max_wait: Duration,
}

/// A share of the budget, returned when the last clone of it is dropped. It owns its permits
/// (no borrow of the budget), so it can move into the blocking job that uses the memory and
/// into the bytes that job produces.
#[derive(Debug, Clone, Default)]
pub struct Reservation {
    permit: Option<Arc<OwnedSemaphorePermit>>,
}

impl Reservation {
    /// `bytes` carrying this share: it is not returned while these bytes (or any slice of
    /// them) are alive. For buffers that outlive the job that made them, such as decoded
    /// records on their way into a response.
    pub fn attach(&self, bytes: Bytes) -> Bytes {
        match &self.permit {
            None => bytes,
            Some(permit) => Bytes::from_owner(Held {
                bytes,
                _permit: Arc::clone(permit),
            }),
        }
    }
}

/// Bytes holding a share. Fields drop in order: the buffer goes before the share does.
struct Held {
    bytes: Bytes,
    _permit: Arc<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl InflateBudget {
    pub fn new(bytes: usize, max_wait: Duration) -> InflateBudget {
        let units = u32::try_from(bytes / UNIT).unwrap_or(u32::MAX).max(1);
        InflateBudget {
            permits: Arc::new(Semaphore::new(units as usize)),
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
    pub async fn reserve(&self, bytes: usize, what: impl FnOnce() -> String) -> Result<Reservation> {
        if bytes == 0 {
            return Ok(Reservation::default());
        }
        let units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX).min(self.units);
        let started = Instant::now();
        let acquire = Arc::clone(&self.permits).acquire_many_owned(units);
        match tokio::time::timeout(self.max_wait, acquire).await {
            Ok(Ok(permit)) => Ok(Reservation {
                permit: Some(Arc::new(permit)),
            }),
            // Never closed; answered as busy all the same rather than a panic.
            Ok(Err(_)) | Err(_) => Err(BrokerError::DecompressionBusy {
                what: what(),
                waited_ms: started.elapsed().as_millis() as u64,
            }),
        }
    }

    /// Reserves `bytes` (as [`InflateBudget::reserve`]) and runs `work` on the blocking pool
    /// with that share. The share moves into the job: it is returned when `work` ends (or
    /// panics), and not before, even when the caller stops waiting (a client that resets
    /// its stream drops the handler, not the job). `work` may attach the share to what it
    /// returns ([`Reservation::attach`]) to hold it longer.
    pub async fn run_blocking<T: Send + 'static>(
        &self,
        bytes: usize,
        what: impl FnOnce() -> String,
        work: impl FnOnce(&Reservation) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let held = self.reserve(bytes, what).await?;
        blocking(move || {
            let done = work(&held);
            // Only now is the job's memory gone (what it returned carries its own clone).
            drop(held);
            done
        })
        .await
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
    use crate::test_batches::batch_of;

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

    /// Polls `done` until it holds or a few seconds pass.
    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_cancelled_request_keeps_its_share_until_its_blocking_job_ends() {
        let budget = InflateBudget::new(4 << 20, Duration::from_millis(50));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let mut request = Box::pin(budget.run_blocking(
            3 << 20,
            || "inflating".into(),
            move |_| {
                let _ = started_tx.send(());
                // Stands for inflating a batch: the memory is live until this returns.
                let _ = release_rx.recv();
                Ok(())
            },
        ));
        tokio::select! {
            _ = &mut request => panic!("the job cannot end before it is released"),
            started = started_rx => started.expect("the job started"),
        }
        // The client resets its stream: the handler's future is dropped, the job runs on.
        drop(request);
        assert_eq!(
            budget.available(),
            1 << 20,
            "the share of a job still inflating must stay reserved after its request is cancelled"
        );
        let error = budget
            .reserve(2 << 20, || "next".into())
            .await
            .expect_err("the running job still holds 3 MiB");
        assert!(matches!(error, BrokerError::DecompressionBusy { .. }), "{error:?}");
        release_tx.send(()).expect("the job waits for its release");
        eventually("the job's share is returned", || budget.available() == 4 << 20).await;
    }

    #[tokio::test]
    async fn bytes_attached_to_a_share_hold_it_until_the_last_slice_is_dropped() {
        let budget = InflateBudget::new(4 << 20, Duration::from_millis(50));
        let decoded = budget
            .run_blocking(
                2 << 20,
                || "decoding".into(),
                |held| Ok(held.attach(Bytes::from(vec![7u8; 1 << 20]))),
            )
            .await
            .expect("fits");
        let slice = decoded.slice(10..20);
        drop(decoded);
        assert_eq!(budget.available(), 2 << 20, "a slice of the decoded bytes is alive");
        assert_eq!(&slice[..], &[7u8; 10]);
        drop(slice);
        assert_eq!(budget.available(), 4 << 20);
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
