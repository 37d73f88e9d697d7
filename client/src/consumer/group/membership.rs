//! The membership task: joins the group, heartbeats on the coordinator's interval, and
//! reconciles what the member owns with each assignment the coordinator sends (KIP-848's
//! consumer protocol).
//!
//! On each heartbeat answer (the full set of partitions the member must own now):
//! - revoked = owned − assignment: the fetcher stops them, the reader drops what it
//!   buffered of them and answers their finished positions at its next poll, the committer
//!   commits those, a `Revoked` event goes out, and the member heartbeats at once without
//!   them, which confirms the revocation (the coordinator gives them to no one before).
//!   One revocation is under way at a time; later answers recompute the rest.
//! - added = assignment − owned: their committed offsets (or the reset policy's) are looked
//!   up, the reader learns them, the fetcher starts them, an `Assigned` event goes out.
//!   Partitions that stay are never touched, so they are delivered throughout.
//!
//! UNKNOWN_MEMBER or FENCED_MEMBER_EPOCH means the partitions may already be someone
//! else's: they are dropped without committing (a `Lost` event) and the member rejoins with
//! epoch 0 (a static member under the same instance id). So does a member that has had no
//! heartbeat answered for a session timeout: the coordinator has given its partitions away.
//!
//! # Thread-safety
//! The task owns the membership state; the reader sees it through the shared inbox, the
//! application through the identity watch and the events. The task never waits for the
//! application: the heartbeat continues while a revocation waits for the stream's next poll.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use conveyor_proto::v1::{ErrorCode, GroupHeartbeatRequest, GroupHeartbeatResponse, OffsetCommit, Subscription};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::AssignmentEvent;
use super::commit::{self, CommitRequest, Identity};
use super::config::GroupConfig;
use super::heartbeat::{
    self, HEARTBEAT_DEADLINE, HEARTBEAT_RETRY, JOIN_EPOCH, LEAVE_EPOCH, LEAVE_FOR_NOW_EPOCH, heartbeat_interval,
    reconcile, rejoin_backoff,
};
use super::shared::{Assigned, PositionRequest, Shared};
use super::start::{self, Started};
use crate::Client;
use crate::consumer::fetcher::FetchControl;
use crate::error::{ClientError, Result};
use crate::groups::{TopicPartition, by_topic, flatten};

/// The broker's usual session timeout, for a member that did not set one: past it without a
/// heartbeat answered, the member counts its partitions as lost.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(45);
/// How long leaving the group may take.
const LEAVE_DEADLINE: Duration = Duration::from_secs(10);
/// Pause before starting again partitions whose start failed for a reason that may pass.
const START_RETRY: Duration = Duration::from_secs(1);

/// What the application's handle asks of the membership task.
#[derive(Debug)]
pub(super) enum Request {
    /// The reader moved an owned partition to `offset` under `incarnation`: restart its fetch.
    Seek {
        partition: TopicPartition,
        offset: u64,
        incarnation: u64,
    },
    Subscribe(Subscription),
    /// Stop fetching and leave the group; the answer says whether the coordinator heard it.
    Leave {
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Everything the task talks to.
#[derive(Debug)]
pub(super) struct Ctx {
    pub(super) client: Client,
    pub(super) group: String,
    pub(super) config: GroupConfig,
    pub(super) shared: Arc<Shared>,
    pub(super) fetcher: mpsc::Sender<FetchControl>,
    pub(super) events: broadcast::Sender<AssignmentEvent>,
    pub(super) identity: watch::Sender<Identity>,
    pub(super) commits: mpsc::Sender<CommitRequest>,
}

type Revoking = Pin<Box<dyn Future<Output = (Vec<TopicPartition>, Result<()>)> + Send>>;
type Starting = Pin<Box<dyn Future<Output = Started> + Send>>;

pub(super) async fn run(ctx: Ctx, subscription: Subscription, mut requests: mpsc::Receiver<Request>) {
    let mut auto_commit = ctx.config.auto_commit.map(|every| {
        let mut timer = tokio::time::interval_at(Instant::now() + every, every);
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        timer
    });
    let mut member = Member::new(ctx, subscription);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(member.heartbeat_at), if !member.stopped => member.heartbeat().await,
            (revoked, committed) = next_of(&mut member.revoking) => member.revoked(revoked, committed),
            Some(started) = member.starts.next(), if !member.starts.is_empty() => member.started(started).await,
            // Only while something is read: waking an idle stream to commit nothing is waste.
            _ = tick(&mut auto_commit) => if !member.delivering.is_empty() {
                member.ctx.shared.post(|inbox| inbox.auto_commit_due = true);
            },
            request = requests.recv() => match request {
                Some(Request::Leave { reply }) => {
                    let _ = reply.send(member.leave().await);
                    return;
                }
                // The consumer was dropped without close: leave, so that its partitions move
                // now rather than after the session timeout. Nothing is committed.
                None => {
                    if let Err(e) = member.leave().await {
                        tracing::warn!(group = %member.ctx.group, error = %e, "leaving the group failed");
                    }
                    return;
                }
                Some(Request::Seek { partition, offset, incarnation }) => member.seek(partition, offset, incarnation).await,
                Some(Request::Subscribe(subscription)) => member.resubscribe(subscription),
            },
        }
    }
}

async fn next_of(revoking: &mut Option<Revoking>) -> (Vec<TopicPartition>, Result<()>) {
    match revoking {
        Some(revocation) => revocation.await,
        None => std::future::pending().await,
    }
}

async fn tick(timer: &mut Option<Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

struct Member {
    ctx: Ctx,
    subscription: Subscription,
    /// False until a heartbeat carrying the current subscription was answered.
    subscription_sent: bool,
    /// Empty while joining.
    member_id: String,
    /// The id of the membership last lost, sent when a dynamic member rejoins: the
    /// coordinator then drops that old incarnation at once instead of keeping its place
    /// until its session expires.
    previous_id: String,
    epoch: i32,
    /// What the member owns as far as the coordinator is concerned: assigned and not given
    /// up yet (partitions being started or revoked included). Sent with every heartbeat.
    owned: BTreeSet<TopicPartition>,
    /// `owned` as of the last heartbeat sent.
    owned_sent: BTreeSet<TopicPartition>,
    /// Partitions whose start is under way, with the incarnation it was begun under.
    starting: HashMap<TopicPartition, u64>,
    starts: FuturesUnordered<Starting>,
    revoking: Option<Revoking>,
    /// Partitions announced `Assigned` and not yet `Revoked` or `Lost`.
    delivering: BTreeSet<TopicPartition>,
    heartbeat_at: Instant,
    last_answer: Instant,
    /// Losses of membership in a row, for the rejoin backoff.
    losses: u32,
    /// The member stopped for good (its join was refused); it waits to be closed.
    stopped: bool,
    /// The session timeout the coordinator applies to this member (its answers say).
    coordinator_session: Option<Duration>,
}

/// A member id unique enough to choose for oneself: the time, the process and a random
/// number from the standard library's per-process hash keys.
fn new_member_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(nanos);
    format!("c-{nanos:x}-{:x}-{:016x}", std::process::id(), h.finish())
}

impl Member {
    fn new(ctx: Ctx, subscription: Subscription) -> Member {
        let now = Instant::now();
        let previous_id = if ctx.config.instance_id.is_none() {
            new_member_id()
        } else {
            String::new()
        };
        Member {
            ctx,
            subscription,
            subscription_sent: false,
            member_id: String::new(),
            // A dynamic member names itself, so that a join retried after a lost answer
            // replaces itself at the coordinator instead of leaving a member behind. A
            // static member joins by its instance id alone (see `lose`).
            previous_id,
            epoch: JOIN_EPOCH,
            owned: BTreeSet::new(),
            owned_sent: BTreeSet::new(),
            starting: HashMap::new(),
            starts: FuturesUnordered::new(),
            revoking: None,
            delivering: BTreeSet::new(),
            heartbeat_at: now,
            last_answer: now,
            losses: 0,
            stopped: false,
            coordinator_session: None,
        }
    }

    fn request(&self, member_epoch: i32, owned: &BTreeSet<TopicPartition>) -> GroupHeartbeatRequest {
        let config = &self.ctx.config;
        GroupHeartbeatRequest {
            group: self.ctx.group.clone(),
            member_id: if self.member_id.is_empty() {
                self.previous_id.clone()
            } else {
                self.member_id.clone()
            },
            member_epoch,
            instance_id: config.instance_id.clone().unwrap_or_default(),
            subscription: (!self.subscription_sent && member_epoch >= JOIN_EPOCH).then(|| self.subscription.clone()),
            owned: by_topic(owned),
            session_timeout_ms: config.session_timeout_ms(),
            rebalance_timeout_ms: config.rebalance_timeout_ms(),
        }
    }

    async fn heartbeat(&mut self) {
        let request = self.request(self.epoch, &self.owned);
        let carried_subscription = request.subscription.is_some();
        self.owned_sent.clone_from(&self.owned);
        match heartbeat::send(&self.ctx.client, &self.ctx.group, request, HEARTBEAT_DEADLINE).await {
            Ok(answer) => {
                self.last_answer = Instant::now();
                self.losses = 0;
                if carried_subscription {
                    self.subscription_sent = true;
                }
                self.on_answer(answer).await;
            }
            Err(e) => self.on_heartbeat_error(e).await,
        }
    }

    async fn on_answer(&mut self, answer: GroupHeartbeatResponse) {
        if answer.session_timeout_ms > 0 {
            self.coordinator_session = Some(Duration::from_millis(u64::from(answer.session_timeout_ms)));
        }
        if !answer.member_id.is_empty() {
            self.member_id = answer.member_id;
            self.previous_id.clear();
        }
        self.epoch = answer.member_epoch;
        self.heartbeat_at = Instant::now() + heartbeat_interval(answer.heartbeat_interval_ms);
        self.publish();
        let assignment: BTreeSet<TopicPartition> = flatten(&answer.assignment).collect();
        let (revoked, added) = reconcile(&self.owned, &assignment);
        if !revoked.is_empty() && self.revoking.is_none() {
            self.revoke(revoked).await;
        }
        if !added.is_empty() {
            self.start(added, Duration::ZERO);
        }
    }

    async fn on_heartbeat_error(&mut self, error: ClientError) {
        let group = &self.ctx.group;
        match error.code() {
            Some(ErrorCode::UnknownMember | ErrorCode::FencedMemberEpoch) => self.lose(&error).await,
            _ if error.is_retriable() => {
                tracing::warn!(group, error = %error, "heartbeat not answered; retrying");
                self.heartbeat_at = Instant::now() + HEARTBEAT_RETRY;
                let session = self
                    .ctx
                    .config
                    .session_timeout
                    .or(self.coordinator_session)
                    .unwrap_or(DEFAULT_SESSION_TIMEOUT);
                if !self.owned.is_empty() && self.last_answer.elapsed() > session {
                    let reason = ClientError::CoordinatorNotAvailable {
                        group: group.clone(),
                        reason: format!("no heartbeat was answered for the session timeout ({session:?})"),
                    };
                    self.lose(&reason).await;
                }
            }
            // A refusal a retry cannot change: a bad subscription, an unknown assignor, an
            // instance id in use. The stream reports it and ends.
            _ => {
                tracing::error!(group, error = %error, "the group refused this member");
                let lost: Vec<TopicPartition> = self.delivering.iter().cloned().collect();
                self.drop_everything().await;
                self.stopped = true;
                self.publish();
                if !lost.is_empty() {
                    self.emit(AssignmentEvent::Lost(lost));
                }
                self.ctx.shared.post(|inbox| inbox.fatal = Some(error));
            }
        }
    }

    /// Gives `partitions` up: stops fetching them now, and once the reader answered their
    /// finished positions and those are committed, `revoked` confirms it.
    async fn revoke(&mut self, partitions: Vec<TopicPartition>) {
        tracing::info!(group = %self.ctx.group, partitions = ?partitions, "partitions revoked; committing their finished offsets");
        let (reply, positions) = oneshot::channel();
        let asked = partitions.clone();
        self.ctx.shared.post(|inbox| {
            for p in &asked {
                inbox.assignment.remove(p);
            }
            inbox.generation += 1;
            inbox.position_request = Some(PositionRequest {
                partitions: asked,
                reply,
            });
        });
        for p in &partitions {
            self.starting.remove(p);
            self.stop_fetching(p).await;
        }
        let commits = self.ctx.commits.clone();
        self.revoking = Some(Box::pin(async move {
            // Without an answer (the stream was dropped) there is nothing finished to commit.
            let positions = positions.await.unwrap_or_default();
            let offsets: Vec<OffsetCommit> = positions
                .into_iter()
                .map(|(p, offset)| OffsetCommit {
                    topic: p.topic,
                    partition: p.partition,
                    offset,
                    metadata: String::new(),
                })
                .collect();
            let committed = commit::submit(&commits, offsets).await;
            (partitions, committed)
        }));
    }

    fn revoked(&mut self, partitions: Vec<TopicPartition>, committed: Result<()>) {
        self.revoking = None;
        if let Err(e) = committed {
            tracing::warn!(group = %self.ctx.group, error = %e, "committing the finished offsets of revoked partitions failed; their next owner starts from the last committed offsets");
        }
        for p in &partitions {
            self.owned.remove(p);
        }
        // Announced only for partitions announced assigned (not those revoked mid-start).
        let announced: Vec<TopicPartition> = partitions.into_iter().filter(|p| self.delivering.remove(p)).collect();
        self.publish();
        if !announced.is_empty() {
            self.emit(AssignmentEvent::Revoked(announced));
        }
        // Confirms the revocation: the coordinator may hand them on.
        self.heartbeat_at = Instant::now();
    }

    fn start(&mut self, partitions: Vec<TopicPartition>, delay: Duration) {
        let mut begun = Vec::with_capacity(partitions.len());
        for p in partitions {
            let incarnation = self.ctx.shared.next_incarnation();
            self.owned.insert(p.clone());
            self.starting.insert(p.clone(), incarnation);
            begun.push((p, incarnation));
        }
        let ctx = &self.ctx;
        let reset = ctx.config.reset;
        self.starts.push(Box::pin(start::resolve(
            ctx.client.clone(),
            ctx.group.clone(),
            reset,
            begun,
            delay,
        )));
    }

    async fn started(&mut self, started: Started) {
        let mut live = Vec::new();
        let mut idle = Vec::new();
        let mut again = Vec::new();
        for (p, incarnation, start) in started.outcomes {
            // Revoked or lost while its start was under way.
            if self.starting.get(&p) != Some(&incarnation) {
                continue;
            }
            match start {
                Ok(offset) => live.push((p, incarnation, offset)),
                Err(e) if e.is_retriable() => {
                    tracing::warn!(group = %self.ctx.group, partition = %p, error = %e, "cannot start an assigned partition yet; retrying");
                    again.push(p);
                }
                Err(e) => idle.push((p, incarnation, e)),
            }
        }
        for p in &again {
            self.starting.remove(p);
        }
        if !again.is_empty() {
            self.start(again, START_RETRY);
        }
        if live.is_empty() && idle.is_empty() {
            return;
        }
        // The reader learns a partition before its fetch starts (see `shared`).
        self.ctx.shared.post(|inbox| {
            for (p, incarnation, offset) in &live {
                let assigned = Assigned {
                    incarnation: *incarnation,
                    start: Some(*offset),
                };
                inbox.assignment.insert(p.clone(), assigned);
            }
            for (p, incarnation, error) in &idle {
                let assigned = Assigned {
                    incarnation: *incarnation,
                    start: None,
                };
                inbox.assignment.insert(p.clone(), assigned);
                inbox.push_error(error.clone());
            }
            inbox.generation += 1;
        });
        let mut assigned = Vec::with_capacity(live.len() + idle.len());
        for (p, incarnation, offset) in live {
            self.fetch(&p, offset, incarnation).await;
            self.starting.remove(&p);
            assigned.push(p);
        }
        for (p, _, error) in idle {
            tracing::warn!(group = %self.ctx.group, partition = %p, error = %error, "assigned partition left idle");
            self.starting.remove(&p);
            assigned.push(p);
        }
        assigned.sort();
        self.delivering.extend(assigned.iter().cloned());
        self.publish();
        self.emit(AssignmentEvent::Assigned(assigned));
        if self.owned != self.owned_sent {
            // Tells the coordinator the new partitions are taken up.
            self.heartbeat_at = Instant::now();
        }
    }

    /// Drops every partition without committing: they may be someone else's already.
    async fn lose(&mut self, reason: &ClientError) {
        let lost: Vec<TopicPartition> = self.delivering.iter().cloned().collect();
        if !self.owned.is_empty() {
            tracing::warn!(group = %self.ctx.group, error = %reason, partitions = ?self.owned, "membership lost; partitions dropped without committing, rejoining");
        }
        self.drop_everything().await;
        // A static member rejoins by its instance id alone: the coordinator then hands it
        // its old incarnation's place, where naming the old id would drop that place.
        let old_id = std::mem::take(&mut self.member_id);
        if self.ctx.config.instance_id.is_none() && !old_id.is_empty() {
            self.previous_id = old_id;
        }
        self.epoch = JOIN_EPOCH;
        self.subscription_sent = false;
        self.publish();
        if !lost.is_empty() {
            self.emit(AssignmentEvent::Lost(lost));
        }
        self.losses += 1;
        self.heartbeat_at = Instant::now() + rejoin_backoff(self.losses);
    }

    /// Stops every fetch, start and revocation, and empties what the stream delivers.
    async fn drop_everything(&mut self) {
        self.revoking = None;
        self.starts = FuturesUnordered::new();
        self.starting.clear();
        self.ctx.shared.post(|inbox| {
            inbox.assignment.clear();
            inbox.generation += 1;
            inbox.position_request = None;
        });
        let _ = self.ctx.fetcher.send(FetchControl::StopAll).await;
        self.owned.clear();
        self.delivering.clear();
    }

    /// Leaves the group (for now, for a static member), after the application committed.
    async fn leave(&mut self) -> Result<()> {
        let given_up: Vec<TopicPartition> = self.delivering.iter().cloned().collect();
        self.drop_everything().await;
        if !given_up.is_empty() {
            self.emit(AssignmentEvent::Revoked(given_up));
        }
        if self.member_id.is_empty() {
            return Ok(());
        }
        let epoch = if self.ctx.config.instance_id.is_some() {
            LEAVE_FOR_NOW_EPOCH
        } else {
            LEAVE_EPOCH
        };
        let request = self.request(epoch, &BTreeSet::new());
        let left = heartbeat::send(&self.ctx.client, &self.ctx.group, request, LEAVE_DEADLINE).await;
        self.member_id.clear();
        self.epoch = JOIN_EPOCH;
        self.publish();
        match left {
            Ok(_) => Ok(()),
            // Already out of the group: what leaving was for.
            Err(e) if matches!(e.code(), Some(ErrorCode::UnknownMember | ErrorCode::FencedMemberEpoch)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn seek(&mut self, partition: TopicPartition, offset: u64, incarnation: u64) {
        // Only if the partition is still owned under the seek's incarnation: a revocation or
        // a later seek since then wins.
        let current = self
            .ctx
            .shared
            .inbox()
            .assignment
            .get(&partition)
            .map(|a| a.incarnation);
        if current == Some(incarnation) {
            self.fetch(&partition, offset, incarnation).await;
        }
    }

    fn resubscribe(&mut self, subscription: Subscription) {
        self.subscription = subscription;
        self.subscription_sent = false;
        self.heartbeat_at = Instant::now();
    }

    async fn fetch(&mut self, p: &TopicPartition, offset: u64, incarnation: u64) {
        let command = FetchControl::Start {
            topic: Arc::from(p.topic.as_str()),
            partition: p.partition,
            offset,
            incarnation,
        };
        let _ = self.ctx.fetcher.send(command).await;
    }

    async fn stop_fetching(&mut self, p: &TopicPartition) {
        let command = FetchControl::Stop {
            topic: Arc::from(p.topic.as_str()),
            partition: p.partition,
        };
        let _ = self.ctx.fetcher.send(command).await;
    }

    fn publish(&self) {
        let identity = Identity {
            member_id: self.member_id.clone(),
            epoch: self.epoch,
            assignment: Arc::new(self.delivering.iter().cloned().collect()),
        };
        self.ctx.identity.send_if_modified(|current| {
            if *current == identity {
                return false;
            }
            *current = identity;
            true
        });
    }

    fn emit(&self, event: AssignmentEvent) {
        // No receiver is fine: nobody is watching.
        let _ = self.ctx.events.send(event);
    }
}
