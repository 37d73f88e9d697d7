//! Byte budgets: a pool of memory, in bytes, that requests take their share of before they
//! hold the memory, so that however many requests arrive at once (and however many are
//! cancelled midway) the broker holds at most the pool for them. Two kinds use it:
//! - decompression ([`crate::api::inflate_budget`]): produce validation and decoding
//!   fetches, for the bytes they inflate;
//! - queued produce bytes ([`crate::api::admission`] for the broker, each partition's own):
//!   a produce message's share is taken from its gRPC length prefix before its body is read,
//!   and returned when its append is answered.
//!
//! Invariants:
//! - A share is held by the memory it stands for, not by the request's handler: it can move
//!   into a blocking job ([`ByteBudget::run_blocking`]), into bytes ([`Reservation::attach`])
//!   or into a queued append, and is returned when its last clone drops, including on
//!   errors and panics (unwinding drops it).
//! - A share is all or nothing and at most the whole budget: a request larger than the
//!   budget takes all of it, rather than waiting forever; two requests never hold half each
//!   while both wait for the rest.
//! - A request either waits at most the budget's `max_wait` and is then answered `BUSY`
//!   (RESOURCE_EXHAUSTED, retriable), or, for a stream, waits as long as it takes
//!   ([`ByteBudget::acquire`] with no limit): a stream that waits stops reading its body,
//!   and HTTP/2 flow control stops its client.
//!
//! Nothing here survives a restart.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::blocking::blocking;
use crate::error::{BrokerError, Result};

/// The longest a bounded wait lasts before its request is answered `BUSY`.
pub const MAX_WAIT: Duration = Duration::from_secs(1);
/// Permits count KiB, so that a budget of up to 4 TiB fits a semaphore's `u32` requests.
const UNIT: usize = 1024;

/// A pool of memory, in bytes (see the module docs).
#[derive(Debug)]
pub struct ByteBudget {
    permits: Arc<Semaphore>,
    units: u32,
    max_wait: Duration,
    /// What the pool is, for the `BUSY` answer: "decompression memory".
    memory: &'static str,
}

/// A share of a budget, returned when the last clone of it is dropped. It owns its permits
/// (no borrow of the budget), so it can move into the job, bytes or queued append that holds
/// the memory.
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

    /// Bytes this share holds of its budget (rounded up to whole KiB).
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |p| p.num_permits() * UNIT)
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

/// A share on its way: resolves once the budget has it, or to `BUSY` past the wait.
pub type Acquiring = Pin<Box<dyn Future<Output = Result<Reservation>> + Send>>;

impl ByteBudget {
    /// A budget of `bytes` (at least 1 KiB) named `memory` in its `BUSY` answers, whose
    /// bounded waits last at most `max_wait`.
    pub fn new(bytes: usize, max_wait: Duration, memory: &'static str) -> ByteBudget {
        let units = u32::try_from(bytes / UNIT).unwrap_or(u32::MAX).max(1);
        ByteBudget {
            permits: Arc::new(Semaphore::new(units as usize)),
            units,
            max_wait,
            memory,
        }
    }

    /// The longest a bounded wait lasts.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Reserves `bytes` (at most the whole budget; nothing for 0), waiting at most the
    /// budget's maximum wait. `what` names the request in the `BUSY` answer.
    pub async fn reserve(&self, bytes: usize, what: impl FnOnce() -> String) -> Result<Reservation> {
        let started = Instant::now();
        let granted = self.acquire(bytes, Some(self.max_wait), String::new).await;
        granted.map_err(|_| self.busy(what(), started))
    }

    fn busy(&self, what: String, started: Instant) -> BrokerError {
        BrokerError::Busy {
            what,
            memory: self.memory.to_string(),
            waited_ms: started.elapsed().as_millis() as u64,
        }
    }

    /// Reserves `bytes` (at most the whole budget; nothing for 0), waiting at most `wait`,
    /// or as long as it takes for `None`. The future owns what it needs, so a request body
    /// can keep it across polls.
    pub fn acquire(
        &self,
        bytes: usize,
        wait: Option<Duration>,
        what: impl FnOnce() -> String + Send + 'static,
    ) -> Acquiring {
        if bytes == 0 {
            return Box::pin(std::future::ready(Ok(Reservation::default())));
        }
        let units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX).min(self.units);
        let acquire = Arc::clone(&self.permits).acquire_many_owned(units);
        let memory = self.memory;
        Box::pin(async move {
            let started = Instant::now();
            let acquired = match wait {
                Some(wait) => tokio::time::timeout(wait, acquire).await.ok(),
                None => Some(acquire.await),
            };
            match acquired {
                Some(Ok(permit)) => Ok(Reservation {
                    permit: Some(Arc::new(permit)),
                }),
                // Never closed; answered as busy all the same rather than a panic.
                Some(Err(_)) | None => Err(BrokerError::Busy {
                    what: what(),
                    memory: memory.to_string(),
                    waited_ms: started.elapsed().as_millis() as u64,
                }),
            }
        })
    }

    /// Reserves `bytes` (as [`ByteBudget::reserve`]) and runs `work` on the blocking pool
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

    /// Bytes reserved now.
    pub fn held(&self) -> usize {
        self.capacity().saturating_sub(self.available())
    }

    /// The whole budget, in bytes.
    pub fn capacity(&self) -> usize {
        self.units as usize * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(bytes: usize) -> ByteBudget {
        ByteBudget::new(bytes, Duration::from_millis(50), "test memory")
    }

    #[tokio::test]
    async fn a_request_that_cannot_get_its_share_in_time_is_answered_busy_and_retriable() {
        let budget = budget(4 << 20);
        let held = budget.reserve(3 << 20, || "first".into()).await.expect("fits");
        assert_eq!(held.bytes(), 3 << 20);
        assert_eq!(budget.held(), 3 << 20);
        let error = budget
            .reserve(2 << 20, || "produce to 't'".into())
            .await
            .expect_err("only 1 MiB is left");
        assert!(matches!(error, BrokerError::Busy { .. }), "{error:?}");
        assert!(error.to_string().contains("produce to 't'"), "{error}");
        assert!(error.to_string().contains("test memory"), "{error}");
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
        let budget = budget(1 << 20);
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

    #[tokio::test]
    async fn an_unbounded_wait_outlasts_the_bounded_one_and_gets_its_share_once_it_is_returned() {
        let budget = budget(2 << 20);
        let held = budget.reserve(2 << 20, || "first".into()).await.expect("fits");
        let mut waiting = budget.acquire(1 << 20, None, || "a stream".into());
        let past_bounded_wait = tokio::time::sleep(budget.max_wait() * 4);
        tokio::select! {
            _ = &mut waiting => panic!("nothing was returned, so the stream must still wait"),
            _ = past_bounded_wait => {}
        }
        drop(held);
        let share = waiting.await.expect("an unbounded wait is never answered busy");
        assert_eq!(share.bytes(), 1 << 20);
        assert_eq!(budget.held(), 1 << 20);
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
        let budget = budget(4 << 20);
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
        assert!(matches!(error, BrokerError::Busy { .. }), "{error:?}");
        release_tx.send(()).expect("the job waits for its release");
        eventually("the job's share is returned", || budget.available() == 4 << 20).await;
    }

    #[tokio::test]
    async fn bytes_attached_to_a_share_hold_it_until_the_last_slice_is_dropped() {
        let budget = budget(4 << 20);
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
}
