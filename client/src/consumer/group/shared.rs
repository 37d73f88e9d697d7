//! What the membership task tells the reader (the stream the application polls).
//!
//! The membership task never waits for the application: it writes what changed into the
//! [`Inbox`], raises the attention flag and wakes the reader. The reader takes it in at the
//! start of its next poll (one relaxed load per record when nothing changed), which is
//! also the moment every record it handed out counts as finished.
//!
//! # Invariants
//! - The inbox's `assignment` is the truth about what the stream may deliver: a partition
//!   missing from it, or a chunk of another incarnation, is never delivered. Only the
//!   membership task removes partitions; it adds one to the inbox before it starts fetching
//!   it, so a chunk of a new incarnation never reaches the reader before its entry.
//! - A revocation removes partitions and asks for their positions in one update: the reader
//!   answers with the positions before it drops them.
//! - The inbox is bounded: its maps hold at most the assigned partitions, and at most
//!   [`MAX_PENDING_ERRORS`] errors wait (older ones are logged and dropped).
//!
//! # Thread-safety
//! The mutex is held only to read or write the inbox, never across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use futures::task::AtomicWaker;
use tokio::sync::oneshot;

use crate::error::ClientError;
use crate::groups::TopicPartition;

/// Errors waiting for the reader beyond this are dropped (and logged): the application is
/// not polling, and the first ones say what is wrong.
pub(super) const MAX_PENDING_ERRORS: usize = 64;

/// A partition the stream delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Assigned {
    pub(super) incarnation: u64,
    /// Where it starts; `None` while it has no position (no committed offset and reset
    /// `none`, or its start failed): assigned but idle until a seek.
    pub(super) start: Option<u64>,
}

/// Positions the membership task waits for, to commit them before giving partitions up.
#[derive(Debug)]
pub(super) struct PositionRequest {
    pub(super) partitions: Vec<TopicPartition>,
    pub(super) reply: oneshot::Sender<Vec<(TopicPartition, u64)>>,
}

#[derive(Debug, Default)]
pub(super) struct Inbox {
    pub(super) assignment: HashMap<TopicPartition, Assigned>,
    /// Bumped on every change of `assignment`, so the reader syncs only when it changed.
    pub(super) generation: u64,
    pub(super) position_request: Option<PositionRequest>,
    pub(super) auto_commit_due: bool,
    pub(super) errors: VecDeque<ClientError>,
    /// The member stopped for good (its join was refused): the stream ends after it.
    pub(super) fatal: Option<ClientError>,
}

impl Inbox {
    pub(super) fn push_error(&mut self, error: ClientError) {
        if self.errors.len() >= MAX_PENDING_ERRORS
            && let Some(dropped) = self.errors.pop_front()
        {
            tracing::warn!(error = %dropped, "group consumer error dropped: the stream is not being polled");
        }
        self.errors.push_back(error);
    }
}

#[derive(Debug, Default)]
pub(super) struct Shared {
    attention: AtomicBool,
    waker: AtomicWaker,
    inbox: Mutex<Inbox>,
    incarnations: AtomicU64,
}

impl Shared {
    /// Changes the inbox and makes the reader look at it on its next poll.
    pub(super) fn post<T>(&self, change: impl FnOnce(&mut Inbox) -> T) -> T {
        let answer = change(&mut self.inbox());
        // Release: the reader that sees the flag sees the change.
        self.attention.store(true, Ordering::Release);
        self.waker.wake();
        answer
    }

    pub(super) fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether something was posted since the reader last looked (cheap: the hot path).
    #[inline]
    pub(super) fn needs_attention(&self) -> bool {
        self.attention.load(Ordering::Relaxed)
    }

    /// Clears the flag before the reader reads the inbox, so a post that lands meanwhile
    /// raises it again and is seen next time.
    pub(super) fn take_attention(&self) -> bool {
        self.attention.swap(false, Ordering::Acquire)
    }

    pub(super) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// A number never used before for a partition's fetch.
    pub(super) fn next_incarnation(&self) -> u64 {
        self.incarnations.fetch_add(1, Ordering::Relaxed) + 1
    }
}
