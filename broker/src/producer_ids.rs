//! Issuing producer ids on every broker, from blocks the controller allocates
//! (see [`crate::controller::producer_ids`]).
//!
//! [`ProducerIds`] holds this broker's current block and hands its ids out one by one. When
//! the block is used up (and at the first call after a start: a block is never kept across
//! a restart) the next block is fetched from the controller, over the internal Raft service
//! or directly when the controller is this broker, by a task of its own: the calls that need
//! an id wait for it, and one that gives up (its client went away or timed out) leaves the
//! fetch running for the others and the next ones, so a block the controller allocated is
//! not lost with the call that asked for it.
//!
//! # Invariants
//! - An id is handed out at most once: it is taken from the block under a lock, and a block
//!   is used only by the process that fetched it (a restart fetches a new one).
//! - At most one block fetch is in flight; at most [`MAX_WAITING`] calls wait for it (more
//!   are refused with a retriable RESOURCE_EXHAUSTED), none longer than [`ISSUE_TIMEOUT`].
//! - The call that started a fetch is answered with the block's first id, straight from the
//!   fetch: calls that queued meanwhile cannot use the whole block up before it takes one
//!   (and make it fetch again). If it is gone by then, the id goes back to the block.
//!
//! # Crash behaviour
//! The ids of a block not used up when the broker stops are never issued: the next block
//! follows the last one recorded in the metadata log.
//!
//! # Thread-safety
//! Shared by every request: the block and the fetch under way sit behind a short `std`
//! mutex never held across an `.await`; a fetch publishes its outcome on a watch channel.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use conveyor_proto::internal::v1::raft_client::RaftClient;
use conveyor_proto::internal::v1::{AllocateProducerIdsRequest, ProducerIdBlock};
use conveyor_proto::v1::ErrorDetail;
use futures::future::BoxFuture;
use prost::Message;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::time::Instant;

use crate::api::forward::CONNECT_TIMEOUT;
use crate::controller::Registry;
use crate::error::{BrokerError, Result};

/// How long a call may wait for an id, the fetch of a new block included: more than the
/// controller takes to commit a block ([`crate::controller::PROPOSE_TIMEOUT`]) after one is
/// elected. Clients wait longer than this for `InitProducer` (the client's
/// `INIT_PRODUCER_TIMEOUT`), so they hear this broker's own answer.
pub const ISSUE_TIMEOUT: Duration = Duration::from_secs(15);
/// Calls that may wait for the next block at once.
pub const MAX_WAITING: usize = 4096;
/// Between attempts to fetch a block while the controller moves or cannot be reached.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Fetches the next block, trying until the deadline given.
type BlockSource = Box<dyn Fn(Instant) -> BoxFuture<'static, Result<ProducerIdBlock>> + Send + Sync>;

/// This broker's producer id issuer.
pub struct ProducerIds {
    inner: Arc<Inner>,
}

impl fmt::Debug for ProducerIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProducerIds")
            .field("ids", &self.inner.lock().ids)
            .finish_non_exhaustive()
    }
}

struct Inner {
    source: BlockSource,
    issuer: Mutex<Issuer>,
    /// Bounds the calls queued for a block.
    waiting: Semaphore,
}

#[derive(Default)]
struct Issuer {
    /// Ids of the current block not issued yet.
    ids: Range<i64>,
    /// The fetch under way, if any: its outcome is published once its block is in `ids`.
    fetch: Option<watch::Receiver<Option<Fetched>>>,
}

/// How a fetch ended, as the calls that waited for it learn it.
#[derive(Debug, Clone)]
enum Fetched {
    Ready,
    Failed { retriable: bool, reason: String },
}

impl Fetched {
    fn failed(e: &BrokerError) -> Fetched {
        Fetched::Failed {
            retriable: e.detail().retriable,
            reason: match e {
                BrokerError::ProducerIdsUnavailable { reason } | BrokerError::Internal(reason) => reason.clone(),
                other => other.to_string(),
            },
        }
    }
}

/// What a call waiting for an id does next.
enum Step {
    /// It started the fetch: the fetch answers it with the block's first id.
    Started(oneshot::Receiver<Result<i64>>),
    /// Another call started it: wait for it, then take an id from the block.
    Wait(watch::Receiver<Option<Fetched>>),
}

fn unavailable(reason: String) -> BrokerError {
    BrokerError::ProducerIdsUnavailable { reason }
}

fn timed_out() -> BrokerError {
    unavailable(format!(
        "no block of ids came from the controller within {ISSUE_TIMEOUT:?}"
    ))
}

impl ProducerIds {
    pub fn new(registry: Arc<Registry>, admin_lock: Arc<tokio::sync::Mutex<()>>) -> ProducerIds {
        ProducerIds::from_source(Box::new(move |deadline| {
            let (registry, admin_lock) = (Arc::clone(&registry), Arc::clone(&admin_lock));
            Box::pin(async move { fetch(&registry, &admin_lock, deadline).await })
        }))
    }

    fn from_source(source: BlockSource) -> ProducerIds {
        ProducerIds {
            inner: Arc::new(Inner {
                source,
                issuer: Mutex::new(Issuer::default()),
                waiting: Semaphore::new(MAX_WAITING),
            }),
        }
    }

    /// A producer id never issued before by any broker of the cluster.
    #[tracing::instrument(name = "init_producer", level = "debug", skip(self), err(Display))]
    pub async fn issue(&self) -> Result<i64> {
        if let Some(id) = self.inner.lock().ids.next() {
            return Ok(id);
        }
        let deadline = Instant::now() + ISSUE_TIMEOUT;
        let _waiting = self
            .inner
            .waiting
            .try_acquire()
            .map_err(|_| BrokerError::ProducerIdsBusy { waiting: MAX_WAITING })?;
        loop {
            let step = {
                let mut issuer = self.inner.lock();
                if let Some(id) = issuer.ids.next() {
                    return Ok(id);
                }
                match &issuer.fetch {
                    Some(fetch) => Step::Wait(fetch.clone()),
                    None => Step::Started(Inner::start_fetch(&self.inner, &mut issuer)),
                }
            };
            match step {
                Step::Started(first) => {
                    return match tokio::time::timeout_at(deadline, first).await {
                        Ok(Ok(answer)) => answer,
                        Ok(Err(_)) => Err(BrokerError::ShuttingDown),
                        Err(_) => Err(timed_out()),
                    };
                }
                Step::Wait(mut fetch) => {
                    let waited = tokio::time::timeout_at(deadline, fetch.wait_for(Option::is_some))
                        .await
                        .map(|seen| seen.map(|outcome| outcome.clone()));
                    let outcome = match waited {
                        Err(_) => return Err(timed_out()),
                        Ok(Err(_)) => {
                            // The fetch task ended without a word (the runtime is stopping):
                            // forget it, so no later call waits for it.
                            let mut issuer = self.inner.lock();
                            if issuer.fetch.as_ref().is_some_and(|f| f.same_channel(&fetch)) {
                                issuer.fetch = None;
                            }
                            return Err(BrokerError::ShuttingDown);
                        }
                        Ok(Ok(outcome)) => outcome,
                    };
                    match outcome {
                        Some(Fetched::Failed {
                            retriable: true,
                            reason,
                        }) => return Err(unavailable(reason)),
                        Some(Fetched::Failed { reason, .. }) => return Err(BrokerError::Internal(reason)),
                        // Taken in the next round; if the calls ahead used the block up, this
                        // one starts the next fetch.
                        Some(Fetched::Ready) | None => {}
                    }
                }
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Issuer> {
        self.issuer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts fetching the next block in a task of its own; answers the block's first id
    /// (or the fetch's error) on the receiver returned.
    fn start_fetch(inner: &Arc<Inner>, issuer: &mut Issuer) -> oneshot::Receiver<Result<i64>> {
        let (published, outcome) = watch::channel(None);
        let (answer, first) = oneshot::channel();
        issuer.fetch = Some(outcome);
        let inner = Arc::clone(inner);
        tokio::spawn(async move {
            let fetched = (inner.source)(Instant::now() + ISSUE_TIMEOUT).await;
            let (outcome, result) = {
                let mut issuer = inner.lock();
                issuer.fetch = None;
                match fetched {
                    Ok(block) => {
                        let end = block.first + i64::from(block.count);
                        issuer.ids = block.first + 1..end;
                        tracing::info!(first = block.first, end, "new block of producer ids to issue");
                        (Fetched::Ready, Ok(block.first))
                    }
                    Err(e) => (Fetched::failed(&e), Err(e)),
                }
            };
            if let Err(Ok(first)) = answer.send(result) {
                // The call that started the fetch is gone: its id goes back, unless the
                // next one was taken already (then it is skipped, never issued).
                let mut issuer = inner.lock();
                if issuer.ids.start == first + 1 {
                    issuer.ids.start = first;
                }
            }
            published.send_replace(Some(outcome));
        });
        first
    }
}

/// A new block from the controller, retrying while the controller moves or cannot be
/// reached, until `deadline`.
async fn fetch(registry: &Registry, admin_lock: &tokio::sync::Mutex<()>, deadline: Instant) -> Result<ProducerIdBlock> {
    let me = registry.transport().node_id();
    loop {
        let attempt = async {
            let controller = registry.controller().await?;
            let block = if controller == me {
                registry.allocate_producer_ids(admin_lock, me).await?
            } else {
                ask(registry, controller, me).await?
            };
            check_block(&block, controller)
        };
        let error = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(block)) => return Ok(block),
            Ok(Err(e)) => e,
            Err(_) => return Err(timed_out()),
        };
        if !error.detail().retriable || Instant::now() + RETRY_AFTER >= deadline {
            return Err(match error {
                e @ (BrokerError::ProducerIdsUnavailable { .. } | BrokerError::Internal(_)) => e,
                other => unavailable(other.to_string()),
            });
        }
        tracing::debug!(error = %error, "cannot fetch a block of producer ids yet; retrying");
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

/// Asks broker `controller` for a block over the internal Raft service.
async fn ask(registry: &Registry, controller: u32, me: u32) -> Result<ProducerIdBlock> {
    let address = registry.transport().raft_address(controller);
    let channel = crate::peer::connect(controller, address, CONNECT_TIMEOUT).await?;
    let answer = RaftClient::new(channel)
        .allocate_producer_ids(AllocateProducerIdsRequest { broker: me })
        .await;
    match answer {
        Ok(block) => Ok(block.into_inner()),
        Err(status) => Err(remote_error(controller, &status)),
    }
}

/// The error the controller answered with, retriable as it says (or as its code says when
/// it carries no detail: a dropped connection, a timeout).
fn remote_error(controller: u32, status: &tonic::Status) -> BrokerError {
    let detail = ErrorDetail::decode(status.details()).unwrap_or_default();
    // A call cut by a broken connection (the controller died mid-call) is `Unknown`
    // ("transport error") without a detail.
    let retriable = detail.retriable
        || matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        )
        || (status.code() == tonic::Code::Unknown && status.details().is_empty());
    let reason = format!("controller (broker {controller}): {}", status.message());
    if retriable {
        BrokerError::ProducerIdsUnavailable { reason }
    } else {
        BrokerError::Internal(format!("cannot get producer ids from the {reason}"))
    }
}

/// Refuses a block no controller of this cluster would allocate: issuing from it could
/// hand out -1 or overflow.
fn check_block(block: &ProducerIdBlock, controller: u32) -> Result<ProducerIdBlock> {
    if block.count == 0 || block.first < 0 || block.first.checked_add(i64::from(block.count)).is_none() {
        return Err(BrokerError::Internal(format!(
            "the controller (broker {controller}) allocated an invalid block of producer ids: {} ids from {}",
            block.count, block.first
        )));
    }
    Ok(*block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_cut_by_a_broken_connection_is_retriable() {
        let cut = remote_error(2, &tonic::Status::unknown("transport error"));
        assert!(cut.detail().retriable, "{cut}");
        let refused = remote_error(2, &tonic::Status::invalid_argument("no"));
        assert!(!refused.detail().retriable, "{refused}");
    }

    #[test]
    fn a_block_that_could_issue_a_negative_or_overflowing_id_is_refused() {
        for (first, count) in [(-1, 10), (0, 0), (i64::MAX - 5, 10)] {
            let e = check_block(&ProducerIdBlock { first, count }, 2).expect_err("invalid block");
            assert!(!e.detail().retriable, "{e}");
        }
        let ok = ProducerIdBlock {
            first: 1000,
            count: 1000,
        };
        assert_eq!(check_block(&ok, 2).expect("valid"), ok);
    }

    #[test]
    fn a_controller_error_is_retriable_as_its_detail_or_code_says() {
        let not_controller = BrokerError::NotController {
            controller: 3,
            address: "h:3".into(),
        };
        let e = remote_error(2, &tonic::Status::from(not_controller));
        assert!(matches!(e, BrokerError::ProducerIdsUnavailable { .. }), "{e}");
        assert!(e.to_string().contains("broker 3"), "{e}");
        let dropped = remote_error(2, &tonic::Status::unavailable("connection reset"));
        assert!(dropped.detail().retriable, "{dropped}");
        let refused = remote_error(2, &tonic::Status::internal("every producer id has been issued"));
        assert!(!refused.detail().retriable, "{refused}");
    }

    /// A block source the test opens and closes: each fetch waits for a permit, then
    /// answers the next block of 3 ids (or fails while `failing` is set).
    struct Gate {
        permits: Semaphore,
        fetches: std::sync::atomic::AtomicU32,
        started: tokio::sync::Notify,
        failing: std::sync::atomic::AtomicBool,
    }

    const DEADLINE: Duration = Duration::from_secs(10);

    fn gated() -> (ProducerIds, Arc<Gate>) {
        use std::sync::atomic::Ordering;
        let gate = Arc::new(Gate {
            permits: Semaphore::new(0),
            fetches: Default::default(),
            started: Default::default(),
            failing: Default::default(),
        });
        let source = Arc::clone(&gate);
        let ids = ProducerIds::from_source(Box::new(move |_| {
            let gate = Arc::clone(&source);
            Box::pin(async move {
                let n = gate.fetches.fetch_add(1, Ordering::SeqCst);
                gate.started.notify_one();
                gate.permits.acquire().await.expect("open").forget();
                if gate.failing.load(Ordering::SeqCst) {
                    return Err(unavailable("no controller".into()));
                }
                Ok(ProducerIdBlock {
                    first: 1000 + 3 * i64::from(n),
                    count: 3,
                })
            })
        }));
        (ids, gate)
    }

    async fn fetch_started(gate: &Gate) {
        tokio::time::timeout(DEADLINE, gate.started.notified())
            .await
            .expect("a fetch starts");
    }

    #[tokio::test]
    async fn a_call_that_gives_up_while_its_block_is_fetched_leaves_the_fetch_and_its_id_to_the_next_call() {
        let (ids, gate) = gated();
        let ids = Arc::new(ids);
        let first = tokio::spawn({
            let ids = Arc::clone(&ids);
            async move { ids.issue().await }
        });
        fetch_started(&gate).await;
        // Its client went away: the call's future is dropped mid-fetch.
        first.abort();
        assert!(first.await.expect_err("aborted").is_cancelled());
        gate.permits.add_permits(1);
        let next = tokio::time::timeout(DEADLINE, ids.issue()).await.expect("in time");
        assert_eq!(next.expect("an id"), 1000, "the block fetched for the call that left");
        assert_eq!(ids.issue().await.expect("an id"), 1001);
        assert_eq!(gate.fetches.load(std::sync::atomic::Ordering::SeqCst), 1, "one fetch");
    }

    #[tokio::test]
    async fn calls_waiting_for_one_fetch_share_its_block_and_the_starter_gets_its_first_id() {
        let (ids, gate) = gated();
        let ids = Arc::new(ids);
        let starter = tokio::spawn({
            let ids = Arc::clone(&ids);
            async move { ids.issue().await }
        });
        fetch_started(&gate).await;
        let others: Vec<_> = (0..4)
            .map(|_| {
                let ids = Arc::clone(&ids);
                tokio::spawn(async move { ids.issue().await })
            })
            .collect();
        // Enough for the first block and the one the fourth waiter needs.
        gate.permits.add_permits(2);
        assert_eq!(starter.await.expect("join").expect("an id"), 1000);
        let mut got = Vec::new();
        for other in others {
            got.push(
                tokio::time::timeout(DEADLINE, other)
                    .await
                    .expect("in time")
                    .expect("join")
                    .expect("an id"),
            );
        }
        got.sort_unstable();
        assert_eq!(got, vec![1001, 1002, 1003, 1004]);
        assert_eq!(gate.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_fetch_fails_its_waiters_and_the_next_call_fetches_again() {
        let (ids, gate) = gated();
        let ids = Arc::new(ids);
        gate.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        let starter = tokio::spawn({
            let ids = Arc::clone(&ids);
            async move { ids.issue().await }
        });
        fetch_started(&gate).await;
        let waiter = tokio::spawn({
            let ids = Arc::clone(&ids);
            async move { ids.issue().await }
        });
        tokio::time::timeout(DEADLINE, async {
            while ids.inner.waiting.available_permits() > MAX_WAITING - 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("both calls wait for the fetch");
        gate.permits.add_permits(1);
        for call in [starter, waiter] {
            let e = call.await.expect("join").expect_err("failed");
            assert!(e.detail().retriable, "{e}");
            assert!(e.to_string().contains("no controller"), "{e}");
        }
        gate.failing.store(false, std::sync::atomic::Ordering::SeqCst);
        gate.permits.add_permits(1);
        let id = tokio::time::timeout(DEADLINE, ids.issue()).await.expect("in time");
        assert!(id.is_ok(), "{id:?}");
    }
}
