//! The bounded queue of acknowledgements from deliveries to the consumer's background task.
//!
//! A delivery's acknowledgement is pushed under a lock the queue shares with that one task;
//! the task takes everything queued in one step. (A channel message per record cost both
//! sides atomics and a wake-up check per record, the most of a worker's own share of an
//! accept.) The task is woken only when the queue goes from empty to not: until it takes
//! them, later pushes just join the queue.
//!
//! # Invariants
//! - At most `capacity` acknowledgements are queued; a push past it waits for room.
//! - Once closed (the task ended or was dropped), pushes fail with [`ClientError::Closed`]
//!   and whatever was queued is dropped, which answers waiting callers with `Closed`.

use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use super::acks::PendingAcks;
use super::delivery::AckRequest;
use crate::error::{ClientError, Result};

#[derive(Debug)]
pub(crate) struct AckQueue {
    queued: Mutex<Queued>,
    /// The task waits here for the queue to have something.
    arrived: Notify,
    /// Pushes wait here for room.
    room: Notify,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Queued {
    acks: Vec<AckRequest>,
    closed: bool,
}

/// Why a push did not queue its acknowledgement at once.
pub(crate) enum NotQueued {
    Full(AckRequest),
    Closed,
}

impl AckQueue {
    pub(crate) fn new(capacity: usize) -> AckQueue {
        AckQueue {
            queued: Mutex::new(Queued::default()),
            arrived: Notify::new(),
            room: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
        // Nothing panics while holding it; a poisoned queue is still a consistent list.
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `ack` if there is room now.
    pub(crate) fn try_push(&self, ack: AckRequest) -> std::result::Result<(), NotQueued> {
        let mut q = self.lock();
        if q.closed {
            return Err(NotQueued::Closed);
        }
        if q.acks.len() >= self.capacity {
            return Err(NotQueued::Full(ack));
        }
        let first = q.acks.is_empty();
        q.acks.push(ack);
        drop(q);
        if first {
            // Stored as a permit when the task is not waiting yet: no wake-up is lost.
            self.arrived.notify_one();
        }
        Ok(())
    }

    /// Queues `ack`, waiting while the queue is full.
    pub(crate) async fn push(&self, mut ack: AckRequest) -> Result<()> {
        loop {
            // Registered before the look, so room made after it wakes this push.
            let room = self.room.notified();
            let mut room = std::pin::pin!(room);
            room.as_mut().enable();
            match self.try_push(ack) {
                Ok(()) => return Ok(()),
                Err(NotQueued::Closed) => return Err(ClientError::Closed),
                Err(NotQueued::Full(back)) => ack = back,
            }
            room.await;
        }
    }

    /// Moves queued acknowledgements, oldest first, into `pending` while it has room.
    pub(crate) fn take_into(&self, pending: &mut PendingAcks) {
        let mut q = self.lock();
        let n = q.acks.len().min(pending.room());
        if n == 0 {
            return;
        }
        pending.extend(q.acks.drain(..n));
        drop(q);
        self.room.notify_waiters();
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.lock().acks.is_empty()
    }

    /// Resolves when something may have been queued since the last call.
    pub(crate) async fn arrived(&self) {
        self.arrived.notified().await;
    }

    /// Refuses further pushes and drops what is queued.
    pub(crate) fn close(&self) {
        let dropped = {
            let mut q = self.lock();
            q.closed = true;
            std::mem::take(&mut q.acks)
        };
        drop(dropped);
        self.room.notify_waiters();
    }
}

/// Closes the queue when dropped: the task's end, however it ends (aborted included).
#[derive(Debug)]
pub(crate) struct CloseOnDrop(pub(crate) std::sync::Arc<AckQueue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::shares::delivery::{AckKind, Held, HeldRef};

    fn ack(offset: u64) -> AckRequest {
        AckRequest {
            held: HeldRef::single(Held::new(0, offset, 1, 0, Instant::now())),
            kind: AckKind::Accept,
            reply: None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_holds_a_push_until_the_task_takes_and_a_closed_one_refuses() {
        let queue = Arc::new(AckQueue::new(2));
        queue.push(ack(0)).await.expect("room");
        queue.push(ack(1)).await.expect("room");
        let waiting = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.push(ack(2)).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a third push waits for room");
        let mut pending = PendingAcks::default();
        queue.take_into(&mut pending);
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("room made wakes the push")
            .expect("joined")
            .expect("queued");
        queue.take_into(&mut pending);
        let taken: Vec<u64> = pending.take_batch().requests().map(|a| a.held.offset).collect();
        assert_eq!(taken, [0, 1, 2], "oldest first");
        queue.push(ack(3)).await.expect("room");
        queue.close();
        assert!(queue.is_empty(), "closing drops what was queued");
        assert!(matches!(queue.push(ack(4)).await, Err(ClientError::Closed)));
    }

    #[tokio::test]
    async fn the_task_is_woken_by_a_push_made_before_it_waits() {
        let queue = AckQueue::new(4);
        queue.push(ack(0)).await.expect("room");
        tokio::time::timeout(Duration::from_secs(10), queue.arrived())
            .await
            .expect("the push's wake-up was kept");
    }
}
