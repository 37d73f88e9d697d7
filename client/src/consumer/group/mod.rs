//! The consumer group member: the group's coordinator assigns it partitions, it reads them
//! as a `futures::Stream` of records, and commits its positions to the group.
//!
//! # Layout
//! - `config`: [`GroupConfig`], [`OffsetReset`], the subscription sent when joining.
//! - `membership`: the background task that heartbeats and reconciles assignments.
//! - `heartbeat`: the heartbeat call, its pacing, and what an assignment revokes and adds.
//! - `start`: where a newly assigned partition starts (committed offset or reset policy).
//! - `reader`: the stream side: records of owned partitions, finished positions.
//! - `shared`: what the membership task tells the reader, without ever waiting for it.
//! - `commit`: the committer task, which sends every commit in order, and [`CommitHandle`].
//!
//! Three tasks run per member: membership, committer and the fetcher (one fetch loop per
//! owned partition). The application's poll of the stream never waits for any of them but
//! the fetcher's chunks, and they never wait for the application: heartbeats go on while
//! a record is being processed for minutes.
//!
//! # Delivery
//! At least once. Auto-commit and [`commit`](GroupConsumer::commit) commit positions after
//! the records handed out; a record counts as finished when the next one is asked for,
//! which is what auto-commit and revocations commit. A partition revoked is committed up to
//! its finished position before it is given up, and none of its records is yielded after
//! the revocation was taken in. A partition lost (the member was fenced or expired) is not
//! committed: its new owner starts again from the last commit.

mod commit;
mod config;
#[cfg(test)]
mod fake_broker_tests;
mod heartbeat;
mod membership;
mod reader;
mod shared;
mod start;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use commit::CommitHandle;
pub use config::{GroupConfig, OffsetReset};

use super::{AbortOnDrop, Consumer, ConsumerConfig, ConsumerRecord, fetcher};
use crate::Client;
use crate::error::{ClientError, Result};
use crate::groups::{OffsetAndMetadata, TopicPartition, offset_commit};
use commit::{COMMIT_QUEUE, CommitRequest, Identity};
use membership::Request;
use reader::Reader;
use shared::Shared;

/// Assignment events kept for a slow receiver; past it, it gets `Lagged` and misses some.
const EVENTS_CAPACITY: usize = 256;
/// Fetch start and stop commands waiting for the fetch task (it takes them at once).
const FETCH_CONTROL_CAPACITY: usize = 64;
/// Requests (seek, resubscribe, leave) waiting for the membership task.
const REQUEST_QUEUE: usize = 16;

/// A change of the partitions a member's stream delivers.
///
/// Ordered as they happen. `Assigned` goes out once the partitions' fetches started,
/// `Revoked` once their finished offsets were committed (or the commit failed), `Lost` once
/// they were taken from the stream, which drops them at its next poll before yielding
/// anything: after either, the stream yields none of their records. A partition with no
/// committed offset under [`OffsetReset::None`] is `Assigned` too (idle until a seek).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignmentEvent {
    Assigned(Vec<TopicPartition>),
    /// Given up in a rebalance, or when the member closed.
    Revoked(Vec<TopicPartition>),
    /// Dropped without committing: the member's membership ended (fenced, expired) and the
    /// partitions may be someone else's already. The member rejoins by itself.
    Lost(Vec<TopicPartition>),
}

impl Consumer {
    /// Joins consumer group `group` subscribed to `topics`: the group's coordinator assigns
    /// this member a share of their partitions, which the returned [`GroupConsumer`] reads
    /// from the group's committed offsets (or `config.reset` where none is committed).
    /// Fetch settings come from this consumer's [`ConsumerConfig`]; its `offset_reset` gives
    /// way to `config.reset`.
    ///
    /// Returns at once: joining happens in the background (watch
    /// [`events`](GroupConsumer::events)). Must be called within a tokio runtime. Fails
    /// when partitions were assigned to this consumer by hand, or the settings are invalid.
    ///
    /// ```no_run
    /// use futures::StreamExt;
    /// use conveyor_client::{Client, ConsumerConfig, GroupConfig};
    /// # async fn run() -> Result<(), conveyor_client::ClientError> {
    /// let client = Client::connect("127.0.0.1:9292").await?;
    /// let mut billing = client
    ///     .consumer(ConsumerConfig::default())
    ///     .subscribe(&["orders"], "billing", GroupConfig::default())?;
    /// while let Some(record) = billing.next().await {
    ///     let record = record?;
    ///     println!("{}[{}]@{}", record.topic, record.partition, record.offset);
    /// }
    /// billing.close().await?;
    /// # Ok(()) }
    /// ```
    pub fn subscribe(self, topics: &[&str], group: &str, config: GroupConfig) -> Result<GroupConsumer> {
        let subscription = config::subscription(topics, None, &config)?;
        GroupConsumer::start(self, group, subscription, config)
    }

    /// As [`subscribe`](Self::subscribe), to every topic whose whole name matches `regex`
    /// (Rust `regex` syntax, evaluated by the coordinator), including topics created later.
    pub fn subscribe_pattern(self, regex: &str, group: &str, config: GroupConfig) -> Result<GroupConsumer> {
        let subscription = config::subscription(&[], Some(regex), &config)?;
        GroupConsumer::start(self, group, subscription, config)
    }
}

/// A member of a consumer group, reading the partitions the group's coordinator assigns it.
///
/// Poll it as a stream; watch [`events`](Self::events) for assignment changes; end it with
/// [`close`](Self::close), which commits and leaves the group. Dropping it leaves the group
/// too, but commits nothing.
///
/// Keep polling: a revocation is taken in at the stream's next poll (that is when the
/// record in hand counts as finished). A member that does not poll within the group's
/// rebalance timeout of a revocation is removed from the group and loses its partitions.
///
/// ```no_run
/// use futures::StreamExt;
/// use conveyor_client::AssignmentEvent;
/// # async fn run(mut member: conveyor_client::GroupConsumer) -> Result<(), conveyor_client::ClientError> {
/// let mut events = member.events();
/// loop {
///     tokio::select! {
///         Ok(event) = events.recv() => match event {
///             AssignmentEvent::Assigned(p) => println!("now reading {p:?}"),
///             AssignmentEvent::Revoked(p) | AssignmentEvent::Lost(p) => println!("no longer reading {p:?}"),
///         },
///         record = member.next() => match record {
///             Some(record) => println!("{:?}", record?.value),
///             None => break,
///         },
///     }
/// }
/// member.close().await
/// # }
/// ```
#[derive(Debug)]
pub struct GroupConsumer {
    group: String,
    /// Asked for again when the subscription changes.
    assignor: Option<String>,
    reader: Reader,
    requests: mpsc::Sender<Request>,
    commits: mpsc::Sender<CommitRequest>,
    identity: watch::Receiver<Identity>,
    events: broadcast::Sender<AssignmentEvent>,
    /// Subscribed before the member started, so the first caller of `events` misses nothing.
    first_events: Option<broadcast::Receiver<AssignmentEvent>>,
    /// Not aborted on drop: it leaves the group once the handle is gone.
    membership: Option<tokio::task::JoinHandle<()>>,
    _fetcher: AbortOnDrop,
    _committer: AbortOnDrop,
}

impl GroupConsumer {
    fn start(
        consumer: Consumer,
        group: &str,
        subscription: conveyor_proto::v1::Subscription,
        config: GroupConfig,
    ) -> Result<GroupConsumer> {
        config.validate()?;
        if group.is_empty() {
            return Err(ClientError::InvalidArgument(
                "a consumer group id must not be empty".into(),
            ));
        }
        if !consumer.assignments.is_empty() {
            return Err(ClientError::InvalidArgument(
                "this consumer has partitions assigned by hand: subscribe a consumer without assignments".into(),
            ));
        }
        let Consumer {
            client, config: fetch, ..
        } = consumer;
        let fetch = ConsumerConfig {
            offset_reset: config.reset.start_at(),
            ..fetch
        };
        let shared = Arc::new(Shared::default());
        let (chunks_tx, chunks_rx) = mpsc::channel(fetch.prefetch.max(1));
        let (control_tx, control_rx) = mpsc::channel(FETCH_CONTROL_CAPACITY);
        let (commits_tx, commits_rx) = mpsc::channel(COMMIT_QUEUE);
        let (requests_tx, requests_rx) = mpsc::channel(REQUEST_QUEUE);
        let (identity_tx, identity_rx) = watch::channel(Identity::default());
        let (events_tx, events_rx) = broadcast::channel(EVENTS_CAPACITY);
        let fetcher = tokio::spawn(fetcher::run_dynamic(client.clone(), fetch, control_rx, chunks_tx));
        let committer = tokio::spawn(commit::run(
            client.clone(),
            group.to_string(),
            commits_rx,
            identity_rx.clone(),
        ));
        let assignor = config.assignor.clone();
        let ctx = membership::Ctx {
            client: Client::clone(&client),
            group: group.to_string(),
            config,
            shared: Arc::clone(&shared),
            fetcher: control_tx,
            events: events_tx.clone(),
            identity: identity_tx,
            commits: commits_tx.clone(),
        };
        let membership = tokio::spawn(membership::run(ctx, subscription, requests_rx));
        Ok(GroupConsumer {
            group: group.to_string(),
            assignor,
            reader: Reader::new(chunks_rx, shared, commits_tx.clone()),
            requests: requests_tx,
            commits: commits_tx,
            identity: identity_rx,
            events: events_tx,
            first_events: Some(events_rx),
            membership: Some(membership),
            _fetcher: AbortOnDrop(fetcher),
            _committer: AbortOnDrop(committer),
        })
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Assignment changes from now on (the first call: from the start). Bounded: a receiver
    /// that falls more than 256 events behind gets `RecvError::Lagged` and skips ahead;
    /// [`assignment`](Self::assignment) always has the current set.
    pub fn events(&mut self) -> broadcast::Receiver<AssignmentEvent> {
        self.first_events.take().unwrap_or_else(|| self.events.subscribe())
    }

    /// The partitions this member reads now: announced `Assigned` and not yet `Revoked` or
    /// `Lost`, in order.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.identity.borrow().assignment.as_ref().clone()
    }

    /// The id the coordinator gave this member; `None` while joining.
    pub fn member_id(&self) -> Option<String> {
        let identity = self.identity.borrow();
        (!identity.member_id.is_empty()).then(|| identity.member_id.clone())
    }

    /// The member epoch of the last heartbeat answer (0 while joining).
    pub fn member_epoch(&self) -> i32 {
        self.identity.borrow().epoch
    }

    /// The next offset this member reads in an owned partition: after the last record
    /// handed out, or where the partition starts. `None` when not owned or not started.
    /// Read-only: the record in hand does not count as finished because of it.
    pub fn position(&mut self, topic: &str, partition: i32) -> Option<u64> {
        self.reader.position(topic, partition)
    }

    /// Commits the positions after every record handed out so far, and waits for the
    /// coordinator's answer. Commits queued before it (automatic ones included) go first.
    pub async fn commit(&mut self) -> Result<()> {
        self.reader.attend();
        commit::submit(&self.commits, self.reader.positions()).await
    }

    /// As [`commit`](Self::commit) without waiting: the handle resolves to the outcome, and
    /// may be dropped (failures are logged). Fails at once with
    /// [`ClientError::QueueFull`] when 8 commits are already queued.
    pub fn commit_async(&mut self) -> CommitHandle {
        self.reader.attend();
        let offsets = self.reader.positions();
        if offsets.is_empty() {
            return CommitHandle::done(Ok(()));
        }
        let (reply, outcome) = oneshot::channel();
        let request = CommitRequest {
            offsets,
            reply: Some(reply),
        };
        match self.commits.try_send(request) {
            Ok(()) => CommitHandle::waiting(outcome),
            Err(mpsc::error::TrySendError::Full(_)) => CommitHandle::done(Err(ClientError::QueueFull(format!(
                "{COMMIT_QUEUE} commits are already queued: await one (or commit()) before committing again"
            )))),
            Err(mpsc::error::TrySendError::Closed(_)) => CommitHandle::done(Err(ClientError::Closed)),
        }
    }

    /// Commits the given offsets (the next offset to read, with metadata) and waits. The
    /// coordinator refuses (FENCED_MEMBER_EPOCH) offsets of partitions this member does not own.
    pub async fn commit_offsets(&mut self, offsets: &HashMap<TopicPartition, OffsetAndMetadata>) -> Result<()> {
        let offsets = offsets.iter().map(|(p, o)| offset_commit(p, o)).collect();
        commit::submit(&self.commits, offsets).await
    }

    /// Reads an owned partition from `offset` next: what was buffered of it is dropped and
    /// its fetch restarts there (other partitions are not disturbed). Also gives an idle
    /// partition (no committed offset under reset `none`) its start.
    pub fn seek(&mut self, topic: &str, partition: i32, offset: u64) -> Result<()> {
        let permit = self.requests.try_reserve().map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => {
                ClientError::QueueFull("the group member is busy: too many seeks queued; try again shortly".into())
            }
            mpsc::error::TrySendError::Closed(()) => ClientError::Closed,
        })?;
        let target = TopicPartition::new(topic, partition);
        let incarnation = self.reader.shared().next_incarnation();
        self.reader.seek(&target, offset, incarnation)?;
        permit.send(Request::Seek {
            partition: target,
            offset,
            incarnation,
        });
        Ok(())
    }

    /// Subscribes to `topics` instead, from the next heartbeat on.
    pub fn resubscribe(&mut self, topics: &[&str]) -> Result<()> {
        let subscription = config::subscription(topics, None, &self.subscription_config())?;
        self.request(Request::Subscribe(subscription))
    }

    /// Subscribes to the topics matching `regex` instead, from the next heartbeat on.
    pub fn resubscribe_pattern(&mut self, regex: &str) -> Result<()> {
        let subscription = config::subscription(&[], Some(regex), &self.subscription_config())?;
        self.request(Request::Subscribe(subscription))
    }

    fn subscription_config(&self) -> GroupConfig {
        GroupConfig {
            assignor: self.assignor.clone(),
            ..GroupConfig::default()
        }
    }

    fn request(&self, request: Request) -> Result<()> {
        self.requests.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                ClientError::QueueFull("the group member is busy: too many requests queued; try again shortly".into())
            }
            mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
        })
    }

    /// Commits the positions after every record handed out, stops fetching and leaves the
    /// group (a static member leaves for now: its partitions wait for it for the session
    /// timeout), and waits for the coordinator to hear it. Returns the commit's error if it
    /// failed (the member leaves anyway), else the leave's.
    pub async fn close(mut self) -> Result<()> {
        self.reader.attend();
        let committed = commit::submit(&self.commits, self.reader.positions()).await;
        let (reply, outcome) = oneshot::channel();
        let left = match self.requests.send(Request::Leave { reply }).await {
            Ok(()) => outcome.await.unwrap_or(Ok(())),
            // The membership task already ended: nothing to leave.
            Err(_) => Ok(()),
        };
        if let Some(membership) = self.membership.take() {
            let _ = membership.await;
        }
        committed.and(left)
    }
}

impl Stream for GroupConsumer {
    type Item = Result<ConsumerRecord>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.reader.poll_record(cx)
    }
}
