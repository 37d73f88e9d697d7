//! The share consumer's background task: fetches while the prefetch buffer has room, sends
//! acknowledgements (batched into `Acknowledge` calls after `ack_linger`), renews held locks when `auto_renew` asks for it, and on close flushes
//! every acknowledgement before it ends.
//!
//! # Invariants
//! - A fetch starts only while fewer than `prefetch` deliveries are buffered, and asks for
//!   no more than the room left; so the channel to the consumer (each message at least one
//!   delivery) never holds more than `prefetch` messages of deliveries. It waits for room
//!   for half the buffer or a whole `max_records`, whichever is less, so that a consumer
//!   draining a full buffer does not fetch a record at a time.
//! - A request carrying acknowledgements is made once: its failure fails those
//!   acknowledgements (see [`super::acks::AckBatch::fail`]) rather than resending tokens to a
//!   coordinator that did not issue them.
//! - At most [`MAX_ACK_CALLS`] `Acknowledge` calls are in flight; behind them acknowledgements
//!   wait in [`PendingAcks`], behind that in the bounded queue from the deliveries
//!   ([`AckQueue`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use conveyor_proto::v1::{
    ErrorCode, ShareAcknowledgeRequest, ShareFetchRequest, ShareFetchResponse, ShareSessionEvent,
};
use futures::StreamExt;
use futures::future::OptionFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::ShareConfig;
use super::ack_queue::{AckQueue, CloseOnDrop};
use super::acks::PendingAcks;
use super::delivery::{AckKind, AckRequest, Delivery, WeakHeld};
use super::fetch;
use crate::Client;
use crate::error::{ClientError, Result};
use crate::groups::coordinator::{self, GroupKind};

/// `Acknowledge` calls in flight at once.
const MAX_ACK_CALLS: usize = 4;
/// How long an `Acknowledge` call may take.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than its `max_wait` a fetch may take before it counts as lost.
const FETCH_MARGIN: Duration = Duration::from_secs(10);
/// First pause after a failed fetch, doubled up to the maximum while fetches fail.
const FETCH_BACKOFF: Duration = Duration::from_millis(100);
const MAX_FETCH_BACKOFF: Duration = Duration::from_secs(2);
/// The lock duration assumed until the session says the group's.
const DEFAULT_LOCK: Duration = Duration::from_secs(30);

/// Deliveries fetched and not yet handed out, shared by the task and the consumer.
#[derive(Debug, Default)]
pub(crate) struct Buffered {
    count: AtomicUsize,
    /// Signalled when the consumer took one: there may be room for a fetch.
    room: Notify,
}

impl Buffered {
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// The consumer handed out (or dropped) one.
    pub(crate) fn taken(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.room.notify_one();
    }
}

/// What a consumer's stream receives: deliveries of one fetch, or an error.
pub(crate) type Fetched = Result<Vec<Delivery>>;

type FetchCall = Pin<Box<dyn Future<Output = Result<ShareFetchResponse>> + Send>>;
type AckCall = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Everything the task needs; built by the consumer.
#[derive(Debug)]
pub(crate) struct Driver {
    pub(crate) client: Client,
    pub(crate) group: String,
    pub(crate) member_id: String,
    pub(crate) topic: Arc<str>,
    pub(crate) config: ShareConfig,
    pub(crate) acks: Arc<AckQueue>,
    pub(crate) out: mpsc::Sender<Fetched>,
    pub(crate) buffered: Arc<Buffered>,
    pub(crate) session: watch::Receiver<ShareSessionEvent>,
}

/// The task's moving parts.
struct State {
    pending: PendingAcks,
    fetch: Option<FetchCall>,
    acking: FuturesUnordered<AckCall>,
    /// Deliveries that automatic renewal watches (with `auto_renew`).
    held: Vec<WeakHeld>,
    /// No fetch before this (after a failure).
    not_before: Option<tokio::time::Instant>,
    backoff: Duration,
    /// Closing (asked to, or after an error that ends the stream): no more fetches.
    closing: bool,
}

impl Driver {
    /// Runs until `close` fires (or its sender is dropped) and everything is flushed, or a
    /// fetch fails for good.
    pub(crate) async fn run(self, mut close: oneshot::Receiver<()>) {
        let mut s = State {
            pending: PendingAcks::default(),
            fetch: None,
            acking: FuturesUnordered::new(),
            held: Vec::new(),
            not_before: None,
            backoff: FETCH_BACKOFF,
            closing: false,
        };
        // However the task ends (aborted with its consumer included), deliveries' later
        // acknowledgements fail with `Closed` and queued ones are answered so.
        let _close = CloseOnDrop(Arc::clone(&self.acks));
        let mut renew = tokio::time::interval(self.renew_period());
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Whatever deliveries queued joins the pending acknowledgements in one step, so
            // one request carries it.
            self.acks.take_into(&mut s.pending);
            self.start_fetch(&mut s);
            if self.start_ack(&mut s) {
                continue;
            }
            if s.closing && s.fetch.is_none() && s.acking.is_empty() {
                if s.pending.is_empty() && self.acks.is_empty() {
                    break;
                }
                continue;
            }
            let linger_at = s
                .pending
                .since()
                .map(|since| tokio::time::Instant::from_std(since + self.config.ack_linger));
            let waiting_for_room = s.fetch.is_none() && !s.closing;
            tokio::select! {
                _ = &mut close, if !s.closing => {
                    s.closing = true;
                    // A fetch in flight is dropped, not awaited: on an idle group it would
                    // hold the close for its whole long poll, and whatever it acquires goes
                    // back to the group when the session ends right after.
                    s.fetch = None;
                }
                // Taken at the top of the loop.
                () = self.acks.arrived(), if !s.pending.is_full() => {}
                Some(answer) = OptionFuture::from(s.fetch.as_mut()), if s.fetch.is_some() => {
                    s.fetch = None;
                    self.fetched(&mut s, answer);
                }
                Some(()) = s.acking.next(), if !s.acking.is_empty() => {}
                _ = sleep_until(linger_at), if linger_at.is_some() && s.acking.len() < MAX_ACK_CALLS => {}
                _ = self.buffered.room.notified(), if waiting_for_room && s.not_before.is_none() => {}
                _ = sleep_until(s.not_before), if waiting_for_room && s.not_before.is_some() => s.not_before = None,
                _ = renew.tick(), if self.config.auto_renew.is_some() => self.queue_renewals(&mut s),
            }
        }
    }

    /// Starts a fetch when there is room for its deliveries and none is in flight.
    fn start_fetch(&self, s: &mut State) {
        let buffered = self.buffered.count();
        if s.fetch.is_some() || s.closing || s.not_before.is_some() || buffered >= self.config.prefetch {
            return;
        }
        let room = u32::try_from(self.config.prefetch - buffered).unwrap_or(u32::MAX);
        // A fetch waits for room for half a buffer (or a whole fetch, if smaller): one
        // started at every delivery taken from a full buffer would ask for a record or two,
        // a round trip and a coordinator pass each.
        let low_water = u32::try_from(self.config.prefetch / 2)
            .unwrap_or(u32::MAX)
            .min(self.config.max_records)
            .max(1);
        if room < low_water {
            return;
        }
        // Acknowledgements go in `Acknowledge` calls of their own, never on a fetch: the
        // coordinator answers acknowledgements after their commit, and a fetch carrying
        // them would wait for it too, while records are ready (measured in docs/queues.md:
        // piggybacked acknowledgements cut a group's throughput by the commit latency).
        let request = ShareFetchRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            max_records: self.config.max_records.min(room).max(1),
            max_bytes: self.config.max_bytes,
            max_wait_ms: u32::try_from(self.config.max_wait.as_millis()).unwrap_or(u32::MAX),
            acks: Vec::new(),
        };
        let client = self.client.clone();
        let limit = self.config.max_wait + FETCH_MARGIN;
        s.fetch = Some(Box::pin(async move {
            let group = request.group.clone();
            coordinator::route_once(
                &client,
                GroupKind::Share,
                &group,
                "ShareFetch",
                limit,
                crate::shares::grpc,
                |mut grpc| async move { grpc.fetch(request).await },
            )
            .await
        }));
    }

    /// Sends pending acknowledgements in an `Acknowledge` call once they lingered long
    /// enough (or at once when closing). True when it started one.
    fn start_ack(&self, s: &mut State) -> bool {
        let due = s
            .pending
            .since()
            .is_some_and(|since| s.closing || since.elapsed() >= self.config.ack_linger);
        if !due || s.acking.len() >= MAX_ACK_CALLS {
            return false;
        }
        let mut batch = s.pending.take_batch();
        // The ranges go on the wire; the batch keeps the callers its answer resolves.
        let request = ShareAcknowledgeRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            acks: std::mem::take(&mut batch.wire),
        };
        let (client, topic) = (self.client.clone(), Arc::clone(&self.topic));
        s.acking.push(Box::pin(async move {
            let group = request.group.clone();
            let answer = coordinator::route_once(
                &client,
                GroupKind::Share,
                &group,
                "Acknowledge",
                ACK_TIMEOUT,
                crate::shares::grpc,
                |mut grpc| async move { grpc.acknowledge(request).await },
            )
            .await;
            match answer {
                Ok(response) => batch.resolve(&response.results, &topic),
                Err(e) => {
                    tracing::debug!(group, error = %e, "acknowledgements failed; their records come back when their locks run out");
                    batch.fail(&e);
                }
            }
        }));
        true
    }

    /// Takes a fetch's answer: deliveries, or the failure.
    fn fetched(&self, s: &mut State, answer: Result<ShareFetchResponse>) {
        let response = match answer {
            Ok(response) => response,
            Err(e) => {
                self.fetch_failed(s, e);
                return;
            }
        };
        s.backoff = FETCH_BACKOFF;
        let locked_until_ms = if response.locked_until_ms > 0 {
            response.locked_until_ms
        } else {
            conveyor_storage::unix_millis() + self.lock_duration().as_millis() as i64
        };
        // Deliveries share blocks of lock states unless automatic renewal watches each.
        let shared = self.config.auto_renew.is_none();
        let decoded = fetch::decode(&self.topic, response.partitions, locked_until_ms, &self.acks, shared);
        for gap in decoded.gaps {
            s.pending.push(gap);
        }
        for e in decoded.errors {
            tracing::warn!(group = self.group, error = %e, "share fetch: a partition could not be read; its records were released");
            self.emit(Err(e));
        }
        // (Never closing here: closing drops the fetch in flight.)
        if decoded.deliveries.is_empty() {
            return;
        }
        if self.config.auto_renew.is_some() {
            s.held.extend(decoded.deliveries.iter().map(|d| d.held.downgrade()));
        }
        self.buffered
            .count
            .fetch_add(decoded.deliveries.len(), Ordering::AcqRel);
        self.emit(Ok(decoded.deliveries));
    }

    /// After a failed fetch: retry later, or end the stream with the error when a retry
    /// cannot help.
    fn fetch_failed(&self, s: &mut State, e: ClientError) {
        let transient = e.is_retriable()
            || matches!(
                e.code(),
                // A session being re-established: the rejoin makes the member known again.
                Some(ErrorCode::NotCoordinator | ErrorCode::UnknownMember | ErrorCode::FencedMemberEpoch)
            );
        if transient {
            tracing::debug!(group = self.group, error = %e, "share fetch failed; retrying in {:?}", s.backoff);
            s.not_before = Some(tokio::time::Instant::now() + s.backoff);
            s.backoff = (s.backoff * 2).min(MAX_FETCH_BACKOFF);
            return;
        }
        s.closing = true;
        self.emit(Err(e));
    }

    /// Hands a message to the consumer. The channel has room by the module's invariant;
    /// should it not, the deliveries are dropped (their locks run out) and said so.
    fn emit(&self, message: Fetched) {
        if let Err(
            mpsc::error::TrySendError::Full(Ok(deliveries)) | mpsc::error::TrySendError::Closed(Ok(deliveries)),
        ) = self.out.try_send(message)
        {
            self.buffered.count.fetch_sub(deliveries.len(), Ordering::AcqRel);
            tracing::warn!(
                group = self.group,
                dropped = deliveries.len(),
                "share consumer buffer unavailable; deliveries dropped until their locks run out"
            );
        }
    }

    /// Queues a renewal of each watched delivery whose lock has a third or less left, until
    /// `auto_renew` after it was fetched.
    fn queue_renewals(&self, s: &mut State) {
        let Some(up_to) = self.config.auto_renew else { return };
        let lock_ms = self.lock_duration().as_millis() as i64;
        let now_ms = conveyor_storage::unix_millis();
        s.held.retain(|weak| {
            let Some(held) = weak.upgrade() else { return false };
            if held.settled.load(Ordering::Acquire) || held.fetched_at.elapsed() >= up_to {
                return false;
            }
            let left = held.locked_until_ms.load(Ordering::Relaxed) - now_ms;
            if left <= lock_ms / 3 && !held.renewing.swap(true, Ordering::AcqRel) {
                s.pending.push(AckRequest {
                    held,
                    kind: AckKind::Renew,
                    reply: None,
                });
            }
            true
        });
    }

    /// The group's lock duration, as the session last said.
    fn lock_duration(&self) -> Duration {
        self.session
            .borrow()
            .settings
            .as_ref()
            .and_then(|s| s.lock_duration_ms)
            .map_or(DEFAULT_LOCK, |ms| Duration::from_millis(u64::from(ms)))
    }

    /// How often held locks are looked at: a sixth of the lock, so a renewal is queued with
    /// between a sixth and a third of it left.
    fn renew_period(&self) -> Duration {
        (self.lock_duration() / 6).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
