//! The committer task: every offset commit of a group member, one at a time, in the order
//! asked.
//!
//! Application commits (sync, async and automatic) and the commits that precede giving up
//! revoked partitions all go through one bounded queue, so an older commit can never land
//! after a newer one of the same partition and move the group's offset backwards.
//!
//! A commit carries the member id and epoch of the last heartbeat answer. FENCED_MEMBER_EPOCH
//! means the coordinator moved the member to a newer epoch it has not heard of yet: the
//! committer waits for the next heartbeat answer and tries once more under its epoch.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use conveyor_proto::v1::{ErrorCode, OffsetCommit};
use tokio::sync::{mpsc, oneshot, watch};

use crate::Client;
use crate::error::{ClientError, Result};
use crate::groups::{self, TopicPartition};

/// Commits waiting for the committer; an async commit finding it full is refused.
pub(super) const COMMIT_QUEUE: usize = 8;
/// How long one commit follows a moving or loading coordinator.
const COMMIT_DEADLINE: Duration = Duration::from_secs(15);
/// How long a fenced commit waits for a heartbeat answer with a newer epoch.
const EPOCH_WAIT: Duration = Duration::from_secs(5);

/// Who the member is, as of the last heartbeat answer, and what its stream delivers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Identity {
    /// Empty while not a member (joining, or after losing its membership).
    pub(super) member_id: String,
    pub(super) epoch: i32,
    pub(super) assignment: Arc<Vec<TopicPartition>>,
}

#[derive(Debug)]
pub(super) struct CommitRequest {
    pub(super) offsets: Vec<OffsetCommit>,
    /// Where the outcome goes; `None` for automatic commits (failures are logged).
    pub(super) reply: Option<oneshot::Sender<Result<()>>>,
}

/// Queues `offsets` and waits until they are committed.
pub(super) async fn submit(queue: &mpsc::Sender<CommitRequest>, offsets: Vec<OffsetCommit>) -> Result<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let (reply, outcome) = oneshot::channel();
    queue
        .send(CommitRequest {
            offsets,
            reply: Some(reply),
        })
        .await
        .map_err(|_| ClientError::Closed)?;
    outcome.await.unwrap_or(Err(ClientError::Closed))
}

pub(super) async fn run(
    client: Client,
    group: String,
    mut requests: mpsc::Receiver<CommitRequest>,
    mut identity: watch::Receiver<Identity>,
) {
    while let Some(request) = requests.recv().await {
        let result = commit(&client, &group, request.offsets, &mut identity).await;
        if let Err(e) = &result {
            tracing::warn!(group, error = %e, "offset commit failed");
        }
        if let Some(reply) = request.reply {
            let _ = reply.send(result);
        }
    }
}

async fn commit(
    client: &Client,
    group: &str,
    offsets: Vec<OffsetCommit>,
    identity: &mut watch::Receiver<Identity>,
) -> Result<()> {
    if offsets.is_empty() {
        return Ok(());
    }
    let (member_id, epoch) = member(group, identity)?;
    let error = match groups::commit(client, group, &member_id, epoch, offsets.clone(), COMMIT_DEADLINE).await {
        Err(e) if e.code() == Some(ErrorCode::FencedMemberEpoch) => e,
        other => return other,
    };
    let newer = tokio::time::timeout(EPOCH_WAIT, async {
        while identity.changed().await.is_ok() {
            if identity.borrow().epoch != epoch {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if !newer {
        return Err(error);
    }
    let (member_id, epoch) = member(group, identity)?;
    groups::commit(client, group, &member_id, epoch, offsets, COMMIT_DEADLINE).await
}

fn member(group: &str, identity: &mut watch::Receiver<Identity>) -> Result<(String, i32)> {
    let current = identity.borrow_and_update();
    if current.member_id.is_empty() {
        return Err(ClientError::NotMember {
            group: group.to_string(),
        });
    }
    Ok((current.member_id.clone(), current.epoch))
}

/// The outcome of [`GroupConsumer::commit_async`](super::GroupConsumer::commit_async): await
/// it, or drop it (failures are logged either way).
#[derive(Debug)]
#[must_use = "a commit handle does nothing unless awaited; drop it to fire and forget"]
pub struct CommitHandle {
    state: HandleState,
}

#[derive(Debug)]
enum HandleState {
    Waiting(oneshot::Receiver<Result<()>>),
    Done(Option<Result<()>>),
}

impl CommitHandle {
    pub(super) fn waiting(outcome: oneshot::Receiver<Result<()>>) -> CommitHandle {
        CommitHandle {
            state: HandleState::Waiting(outcome),
        }
    }

    pub(super) fn done(result: Result<()>) -> CommitHandle {
        CommitHandle {
            state: HandleState::Done(Some(result)),
        }
    }
}

impl Future for CommitHandle {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            HandleState::Waiting(outcome) => Pin::new(outcome)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(ClientError::Closed))),
            HandleState::Done(result) => Poll::Ready(result.take().unwrap_or(Err(ClientError::Closed))),
        }
    }
}
