//! Issuing producer ids on every broker, from blocks the controller allocates
//! (see [`crate::controller::producer_ids`]).
//!
//! [`ProducerIds`] holds this broker's current block and hands its ids out one by one. When
//! the block is used up (and at the first call after a start: a block is never kept across
//! a restart) one call fetches the next block from the controller, over the internal Raft
//! service or directly when the controller is this broker, while the others wait for it.
//!
//! # Invariants
//! - An id is handed out at most once: it is taken from the block under a lock, and a block
//!   is used only by the process that fetched it (a restart fetches a new one).
//! - At most one block fetch is in flight; at most [`MAX_WAITING`] calls wait for it (more
//!   are refused with a retriable RESOURCE_EXHAUSTED), none longer than [`ISSUE_TIMEOUT`].
//!
//! # Crash behaviour
//! The ids of a block not used up when the broker stops are never issued: the next block
//! follows the last one recorded in the metadata log.
//!
//! # Thread-safety
//! Shared by every request: the block sits behind a short `std` mutex never held across an
//! `.await`; the fetch is serialised by an async mutex.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use conveyor_proto::internal::v1::raft_client::RaftClient;
use conveyor_proto::internal::v1::{AllocateProducerIdsRequest, ProducerIdBlock};
use conveyor_proto::v1::ErrorDetail;
use prost::Message;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::controller::Registry;
use crate::error::{BrokerError, Result};

/// How long a call may wait for an id, the fetch of a new block included: more than the
/// controller takes to commit a block ([`crate::controller::PROPOSE_TIMEOUT`]) after one is
/// elected.
pub const ISSUE_TIMEOUT: Duration = Duration::from_secs(15);
/// Calls that may wait for the next block at once.
pub const MAX_WAITING: usize = 4096;
/// Between attempts to fetch a block while the controller moves or cannot be reached.
const RETRY_AFTER: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// This broker's producer id issuer.
#[derive(Debug)]
pub struct ProducerIds {
    registry: Arc<Registry>,
    /// The metadata change lock, for blocks allocated here when this broker is the controller.
    admin_lock: Arc<tokio::sync::Mutex<()>>,
    /// Ids of the current block not issued yet.
    block: Mutex<Range<i64>>,
    /// Held by the one call fetching a block; the others queue behind it.
    fetching: tokio::sync::Mutex<()>,
    /// Bounds the calls queued for a block.
    waiting: Semaphore,
}

impl ProducerIds {
    pub fn new(registry: Arc<Registry>, admin_lock: Arc<tokio::sync::Mutex<()>>) -> ProducerIds {
        ProducerIds {
            registry,
            admin_lock,
            block: Mutex::new(0..0),
            fetching: tokio::sync::Mutex::new(()),
            waiting: Semaphore::new(MAX_WAITING),
        }
    }

    /// A producer id never issued before by any broker of the cluster.
    #[tracing::instrument(name = "init_producer", level = "debug", skip(self), err(Display))]
    pub async fn issue(&self) -> Result<i64> {
        if let Some(id) = self.take() {
            return Ok(id);
        }
        let deadline = Instant::now() + ISSUE_TIMEOUT;
        let _waiting = self
            .waiting
            .try_acquire()
            .map_err(|_| BrokerError::ProducerIdsBusy { waiting: MAX_WAITING })?;
        loop {
            let fetching = tokio::time::timeout_at(deadline, self.fetching.lock()).await;
            let Ok(_fetching) = fetching else {
                return Err(BrokerError::ProducerIdsUnavailable {
                    reason: format!("no block of ids came from the controller within {ISSUE_TIMEOUT:?}"),
                });
            };
            // The call that held the lock may have brought a block.
            if let Some(id) = self.take() {
                return Ok(id);
            }
            let block = self.fetch(deadline).await?;
            let end = block.first + i64::from(block.count);
            *self.lock_block() = block.first..end;
            tracing::info!(first = block.first, end, "new block of producer ids to issue");
        }
    }

    fn lock_block(&self) -> std::sync::MutexGuard<'_, Range<i64>> {
        self.block.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self) -> Option<i64> {
        self.lock_block().next()
    }

    /// A new block from the controller, retrying while the controller moves or cannot be
    /// reached, until `deadline`.
    async fn fetch(&self, deadline: Instant) -> Result<ProducerIdBlock> {
        let me = self.registry.transport().node_id();
        loop {
            let attempt = async {
                let controller = self.registry.controller().await?;
                let block = if controller == me {
                    self.registry.allocate_producer_ids(&self.admin_lock, me).await?
                } else {
                    self.ask(controller, me).await?
                };
                check_block(&block, controller)
            };
            let error = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(block)) => return Ok(block),
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(BrokerError::ProducerIdsUnavailable {
                        reason: format!("no block of ids came from the controller within {ISSUE_TIMEOUT:?}"),
                    });
                }
            };
            if !error.detail().retriable || Instant::now() + RETRY_AFTER >= deadline {
                return Err(match error {
                    e @ (BrokerError::ProducerIdsUnavailable { .. } | BrokerError::Internal(_)) => e,
                    other => BrokerError::ProducerIdsUnavailable {
                        reason: other.to_string(),
                    },
                });
            }
            tracing::debug!(error = %error, "cannot fetch a block of producer ids yet; retrying");
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }

    /// Asks broker `controller` for a block over the internal Raft service.
    async fn ask(&self, controller: u32, me: u32) -> Result<ProducerIdBlock> {
        let address = self
            .registry
            .transport()
            .raft_address(controller)
            .ok_or(BrokerError::UnknownBroker(controller))?;
        let unreachable = |reason: String| BrokerError::BrokerUnreachable {
            id: controller,
            address: address.clone(),
            reason,
        };
        let channel = crate::peer::endpoint(&address, CONNECT_TIMEOUT)
            .map_err(|e| unreachable(e.to_string()))?
            .connect()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let answer = RaftClient::new(channel)
            .allocate_producer_ids(AllocateProducerIdsRequest { broker: me })
            .await;
        match answer {
            Ok(block) => Ok(block.into_inner()),
            Err(status) => Err(remote_error(controller, &status)),
        }
    }
}

/// The error the controller answered with, retriable as it says (or as its code says when
/// it carries no detail: a dropped connection, a timeout).
fn remote_error(controller: u32, status: &tonic::Status) -> BrokerError {
    let detail = ErrorDetail::decode(status.details()).unwrap_or_default();
    let retriable = detail.retriable
        || matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        );
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
}
