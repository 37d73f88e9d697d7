//! [`Delivery`]: one record acquired by a share consumer, and its acknowledgement.
//!
//! A delivery is acknowledged once: `accept`, `release` and `reject` take it by value.
//! `renew` borrows it and may be called any number of times before that. Each call queues
//! the acknowledgement for the consumer's background task (waiting while the bounded queue
//! is full), which sends it batched with others, and resolves when the broker answered it.
//!
//! # Invariants
//! - [`Held`] is shared by the delivery and whatever acknowledges or renews it; once a
//!   final acknowledgement is queued it is `settled`, and automatic renewal leaves it alone.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use conveyor_proto::v1::ShareAckKind;
use futures::future::Either;
use tokio::sync::oneshot;

use super::ack_queue::{AckQueue, NotQueued};

use crate::ConsumerRecord;
use crate::error::{ClientError, Result};

/// The lock state of one delivered record, shared by the delivery and the background task.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) partition: i32,
    pub(crate) offset: u64,
    pub(crate) token: u64,
    /// When it was fetched: automatic renewal stops `auto_renew` after it.
    pub(crate) fetched_at: Instant,
    /// When the lock ends, ms since the Unix epoch (moved by each renewal).
    pub(crate) locked_until_ms: AtomicI64,
    /// A final acknowledgement is queued: nothing renews it any more.
    pub(crate) settled: AtomicBool,
    /// A renewal is queued or in flight.
    pub(crate) renewing: AtomicBool,
}

impl Held {
    /// `fetched_at`: when its fetch was answered (read once per fetch, not per record).
    pub(crate) fn new(partition: i32, offset: u64, token: u64, locked_until_ms: i64, fetched_at: Instant) -> Held {
        Held {
            partition,
            offset,
            token,
            fetched_at,
            locked_until_ms: AtomicI64::new(locked_until_ms),
            settled: AtomicBool::new(false),
            renewing: AtomicBool::new(false),
        }
    }
}

/// A delivery's [`Held`]: its own allocation, or one of a block allocated together for one
/// answer's records of a partition (one allocation per block instead of one per record).
/// A block lives while any of its deliveries or acknowledgements does, so only deliveries
/// nothing watches share one: automatic renewal tells a dropped delivery by its own
/// allocation going.
#[derive(Clone)]
pub(crate) struct HeldRef {
    block: Arc<[Held]>,
    index: usize,
}

impl HeldRef {
    pub(crate) fn single(held: Held) -> HeldRef {
        HeldRef {
            block: Arc::from([held]),
            index: 0,
        }
    }

    /// The `index`th of `block`; `None` past its end.
    pub(crate) fn in_block(block: &Arc<[Held]>, index: usize) -> Option<HeldRef> {
        (index < block.len()).then(|| HeldRef {
            block: Arc::clone(block),
            index,
        })
    }

    /// A reference that does not keep the record's state alive.
    pub(crate) fn downgrade(&self) -> WeakHeld {
        WeakHeld {
            block: Arc::downgrade(&self.block),
            index: self.index,
        }
    }
}

impl fmt::Debug for HeldRef {
    // Its own record's state only, not the whole block.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl std::ops::Deref for HeldRef {
    type Target = Held;

    fn deref(&self) -> &Held {
        // In bounds: built only by `single` and `in_block`, which check it.
        &self.block[self.index]
    }
}

/// A [`HeldRef`] that does not keep its record's state alive.
#[derive(Debug)]
pub(crate) struct WeakHeld {
    block: std::sync::Weak<[Held]>,
    index: usize,
}

impl WeakHeld {
    pub(crate) fn upgrade(&self) -> Option<HeldRef> {
        HeldRef::in_block(&self.block.upgrade()?, self.index)
    }
}

/// What an acknowledgement does (the wire's `ShareAckKind`, with its arguments).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum AckKind {
    Accept,
    /// Available again after this many ms.
    Release(u32),
    /// Dead-lettered, for this reason.
    Reject(String),
    Renew,
}

impl AckKind {
    pub(crate) fn wire(&self) -> (ShareAckKind, u32, String) {
        match self {
            AckKind::Accept => (ShareAckKind::Accept, 0, String::new()),
            AckKind::Release(delay) => (ShareAckKind::Release, *delay, String::new()),
            AckKind::Reject(reason) => (ShareAckKind::Reject, 0, reason.clone()),
            AckKind::Renew => (ShareAckKind::Renew, 0, String::new()),
        }
    }
}

/// One acknowledgement on its way to the background task.
#[derive(Debug)]
pub(crate) struct AckRequest {
    pub(crate) held: HeldRef,
    pub(crate) kind: AckKind,
    /// Told the outcome; none for automatic renewals and for the gaps the client
    /// acknowledges itself.
    pub(crate) reply: Option<oneshot::Sender<Result<()>>>,
}

/// One record acquired by a [`ShareConsumer`](super::ShareConsumer), locked to it until
/// [`locked_until`](Self::locked_until) and acknowledged with one of [`accept`](Self::accept),
/// [`release`](Self::release) or [`reject`](Self::reject).
///
/// Dropping a delivery without acknowledging it leaves its record locked to this member
/// until the lock runs out (or the consumer closes); then it is delivered again, counting
/// this delivery. With [`ShareConfig::auto_renew`](super::ShareConfig::auto_renew) a dropped
/// delivery is no longer renewed.
pub struct Delivery {
    pub(crate) record: ConsumerRecord,
    pub(crate) delivery_count: u32,
    pub(crate) held: HeldRef,
    pub(crate) acks: Arc<AckQueue>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.record.topic)
            .field("partition", &self.record.partition)
            .field("offset", &self.record.offset)
            .field("delivery_count", &self.delivery_count)
            .field("token", &self.held.token)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// The record: topic, partition, offset, timestamp, key, value, headers.
    pub fn record(&self) -> &ConsumerRecord {
        &self.record
    }

    /// Deliveries of this record so far, this one included (1 the first time).
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// The token the coordinator delivered it with (acknowledgements carry it).
    pub fn token(&self) -> u64 {
        self.held.token
    }

    /// When the lock ends, ms since the Unix epoch; renewals move it.
    pub fn locked_until(&self) -> i64 {
        self.held.locked_until_ms.load(Ordering::Relaxed)
    }

    /// Done: the record is never delivered again. Resolves when the broker applied it; an
    /// error when it refused it (STALE_DELIVERY: the lock ran out and the record went back
    /// to the group or to another member, or it was acknowledged already) or the acknowledgement could not be
    /// sent (the record is then delivered again once its lock runs out: at least once).
    pub async fn accept(self) -> Result<()> {
        self.settle(AckKind::Accept).await
    }

    /// Accepts without waiting for the broker's answer: the acknowledgement is queued (this
    /// waits only while the bounded queue is full) and goes out batched with the others; a
    /// refusal is not reported (the record is then delivered again: at least once), and
    /// `ShareConsumer::close` sends whatever is still queued. For workers that do not act on
    /// a refusal, it saves the answer's bookkeeping per record.
    ///
    /// The acknowledgement is queued when this is called, if the queue has room: the
    /// future waits only for room, and the record is dropped at once. (The future is a
    /// ready value then, and boxed only when it must wait: a worker moves it per record.)
    pub fn accept_unconfirmed(self) -> impl Future<Output = Result<()>> + Send + 'static {
        self.held.settled.store(true, Ordering::Release);
        let Delivery { held, acks, .. } = self;
        let ack = AckRequest {
            held,
            kind: AckKind::Accept,
            reply: None,
        };
        match acks.try_push(ack) {
            Ok(()) => Either::Left(std::future::ready(Ok(()))),
            Err(NotQueued::Closed) => Either::Left(std::future::ready(Err(ClientError::Closed))),
            Err(NotQueued::Full(ack)) => Either::Right(Box::pin(async move { acks.push(ack).await })),
        }
    }

    /// Gives the record back: available to any member again after `delay` (at once for
    /// zero), counting this delivery toward the group's delivery limit.
    pub async fn release(self, delay: Duration) -> Result<()> {
        let delay_ms = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        self.settle(AckKind::Release(delay_ms)).await
    }

    /// Dead-letters the record: it is written to the group's dead-letter topic with
    /// `reason` (at most 1 KiB) in its headers, and never delivered again.
    pub async fn reject(self, reason: impl Into<String>) -> Result<()> {
        self.settle(AckKind::Reject(reason.into())).await
    }

    /// Extends the lock by the group's lock duration from now; the delivery stays this
    /// member's, with the same token. [`locked_until`](Self::locked_until) moves once the
    /// broker answered.
    pub async fn renew(&self) -> Result<()> {
        if !self.held.settled.load(Ordering::Acquire) {
            self.held.renewing.store(true, Ordering::Release);
        }
        let answer = send(&self.acks, self.held.clone(), AckKind::Renew).await;
        self.held.renewing.store(false, Ordering::Release);
        answer
    }

    async fn settle(self, kind: AckKind) -> Result<()> {
        self.held.settled.store(true, Ordering::Release);
        send(&self.acks, self.held, kind).await
    }
}

/// Queues one acknowledgement (waiting only while the bounded queue is full) and waits for
/// the broker's answer.
async fn send(acks: &AckQueue, held: HeldRef, kind: AckKind) -> Result<()> {
    let (reply, answer) = oneshot::channel();
    acks.push(AckRequest {
        held,
        kind,
        reply: Some(reply),
    })
    .await?;
    answer.await.map_err(|_| ClientError::Closed)?
}
