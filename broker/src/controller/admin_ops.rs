//! Admin operations that take long: membership changes (add-node, remove-node, reassign,
//! rebalance) run as background jobs with progress, and the lock that serialises metadata
//! changes is held only while a change is checked and proposed.
//!
//! # Invariants
//! - At most one membership operation runs at a time. The same request again follows the
//!   running one; a different one is refused at once with what is running (never queued).
//! - An admin call answers within its deadline: a job that is not done by then keeps
//!   running, and the call answers with a retriable error that names its current step.
//! - The metadata change lock is never held across a wait for another broker (a learner
//!   catching up, a membership step): only across checking the current state and proposing
//!   one record, itself bounded by [`crate::controller::PROPOSE_TIMEOUT`].
//!
//! # Crash behaviour
//! A job lives only in the controller's memory. Every step of a membership change is
//! durable on its own and already-done steps succeed at once, so after a controller
//! failover or restart the same request finishes the change.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_proto::internal::v1::metadata_record;
use tokio::sync::{MutexGuard, watch};
use tonic::Status;

use crate::controller::membership::ReplicaMove;
use crate::controller::{PROPOSE_TIMEOUT, Registry};
use crate::error::{BrokerError, Result};

/// How long a call waits for the metadata change lock before it fails: longer than one
/// holder may keep it (one proposal), so it only fails when the controller is stuck.
pub const CHANGE_LOCK_WAIT: Duration = PROPOSE_TIMEOUT;
/// How long a finished job's success is handed to the same request again (the caller whose
/// call timed out asks again to learn the outcome).
const KEEP_FINISHED: Duration = Duration::from_secs(60);

/// Waits, at most [`CHANGE_LOCK_WAIT`], for the lock that serialises metadata changes.
pub async fn lock_changes(lock: &tokio::sync::Mutex<()>) -> Result<MutexGuard<'_, ()>> {
    tokio::time::timeout(CHANGE_LOCK_WAIT, lock.lock())
        .await
        .map_err(|_| BrokerError::TimedOut {
            what: "waiting for another metadata change to finish".into(),
            after: CHANGE_LOCK_WAIT,
            state: "the controller is still committing an earlier change; retry shortly".into(),
        })
}

/// Where a running operation is, for the error a call gets when its deadline passes.
#[derive(Debug)]
pub struct Progress {
    what: String,
    step: Mutex<String>,
}

impl Progress {
    pub fn new(what: impl Into<String>) -> Progress {
        Progress {
            what: what.into(),
            step: Mutex::new("starting".into()),
        }
    }

    /// Records the step now under way.
    pub fn step(&self, step: impl Into<String>) {
        let step = step.into();
        tracing::debug!(operation = %self.what, %step, "admin operation step");
        *self.step.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = step;
    }

    /// "reassignment of topic 'orders' partition 0 to [4, 2, 3] is in progress: …".
    pub fn describe(&self) -> String {
        let step = self.step.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        format!("{} is in progress: {step}", self.what)
    }
}

/// What a membership change needs: the registry, the lock that serialises metadata changes
/// and where to report its progress.
#[derive(Debug, Clone, Copy)]
pub struct ChangeContext<'a> {
    pub registry: &'a Registry,
    pub lock: &'a tokio::sync::Mutex<()>,
    pub progress: &'a Progress,
}

impl ChangeContext<'_> {
    /// Proposes one metadata record under the change lock.
    pub async fn propose(&self, change: metadata_record::Change) -> Result<()> {
        let _guard = lock_changes(self.lock).await?;
        self.registry.propose(change).await
    }
}

/// A membership operation, as a request names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    AddBroker {
        id: u32,
        address: String,
    },
    RemoveBroker(u32),
    Reassign {
        topic: String,
        partition: i32,
        target: Vec<u32>,
    },
    Rebalance,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Operation::AddBroker { id, address } => write!(f, "addition of broker {id} at {address}"),
            Operation::RemoveBroker(id) => write!(f, "removal of broker {id}"),
            Operation::Reassign {
                topic,
                partition,
                target,
            } => write!(f, "reassignment of topic '{topic}' partition {partition} to {target:?}"),
            Operation::Rebalance => write!(f, "rebalance"),
        }
    }
}

/// A job's answer: the replicas it moved, or the error to return.
pub type Outcome = std::result::Result<Vec<ReplicaMove>, Status>;

#[derive(Debug)]
struct Job {
    operation: Operation,
    progress: Arc<Progress>,
    /// Set once the job ends, with when.
    done: watch::Receiver<Option<(Instant, Outcome)>>,
}

/// The membership operation running on this broker (the controller), if any.
#[derive(Debug, Default)]
pub struct Jobs {
    current: Mutex<Option<Job>>,
}

impl Jobs {
    /// Runs `operation` as a background job (started by `start`, given its progress) unless
    /// it is running already, in which case the call follows it, and waits at most `wait`
    /// for its outcome. A different operation running is an immediate error.
    pub async fn run<F, Fut>(&self, operation: Operation, wait: Duration, start: F) -> Outcome
    where
        F: FnOnce(Arc<Progress>) -> Fut,
        Fut: std::future::Future<Output = Outcome> + Send + 'static,
    {
        let (progress, mut done) = {
            let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let found = current.as_ref().map(|job| (job, job.done.borrow().clone()));
            match found {
                Some((job, None)) if job.operation != operation => {
                    return Err(BrokerError::MembershipBusy {
                        progress: job.progress.describe(),
                    }
                    .into());
                }
                Some((job, None)) => (Arc::clone(&job.progress), job.done.clone()),
                Some((job, Some((at, Ok(moves))))) if job.operation == operation && at.elapsed() < KEEP_FINISHED => {
                    return Ok(moves);
                }
                _ => {
                    let progress = Arc::new(Progress::new(operation.to_string()));
                    let (tx, rx) = watch::channel(None);
                    let work = tokio::spawn(start(Arc::clone(&progress)));
                    // Spawned apart from the call: a caller that gives up (deadline, dropped
                    // connection) does not stop the job, and a job that panics still ends.
                    tokio::spawn(async move {
                        let outcome = work.await.unwrap_or_else(|e| {
                            Err(BrokerError::Internal(format!("the operation failed: {e}")).into())
                        });
                        tx.send_replace(Some((Instant::now(), outcome)));
                    });
                    *current = Some(Job {
                        operation,
                        progress: Arc::clone(&progress),
                        done: rx.clone(),
                    });
                    (progress, rx)
                }
            }
        };
        match tokio::time::timeout(wait, done.wait_for(Option::is_some)).await {
            Ok(Ok(finished)) => match &*finished {
                Some((_, outcome)) => outcome.clone(),
                None => Err(BrokerError::ShuttingDown.into()),
            },
            Ok(Err(_)) => Err(BrokerError::ShuttingDown.into()),
            Err(_) => Err(BrokerError::MembershipInProgress {
                progress: progress.describe(),
            }
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(50);

    fn reassign(target: Vec<u32>) -> Operation {
        Operation::Reassign {
            topic: "orders".into(),
            partition: 0,
            target,
        }
    }

    #[tokio::test]
    async fn a_job_past_its_deadline_answers_with_its_step_and_a_conflicting_one_is_refused() {
        let jobs = Jobs::default();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first = jobs
            .run(reassign(vec![4, 2, 3]), WAIT, |progress| async move {
                progress.step("step 2 of 4 (promoting broker 4)");
                let _ = released.await;
                Ok(vec![])
            })
            .await;
        let status = first.expect_err("still running after the wait");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status
                .message()
                .contains("reassignment of topic 'orders' partition 0 to [4, 2, 3] is in progress")
                && status.message().contains("promoting broker 4"),
            "{}",
            status.message()
        );

        let other = jobs.run(Operation::Rebalance, WAIT, |_| async { Ok(vec![]) }).await;
        let status = other.expect_err("refused while another runs");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("another membership change is running"),
            "{}",
            status.message()
        );

        release.send(()).expect("job waiting");
        let again = jobs
            .run(reassign(vec![4, 2, 3]), Duration::from_secs(5), |_| async {
                Err(Status::internal("the running job is followed, not started again"))
            })
            .await;
        assert!(again.is_ok(), "{again:?}");
    }
}
