//! What a partition's handle asks its owner task: appends (with their acks and, for a
//! produce stream, their place in the stream's order), and control requests (leadership
//! transfer, hand-over, membership steps).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use conveyor_storage::batch::ValidatedBatch;
use tokio::sync::oneshot;

use crate::byte_budget::Reservation;
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    None,
    Leader,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub base_offset: u64,
    pub last_offset: u64,
}

#[derive(Debug)]
pub struct AppendRequest {
    /// Validated batches, appended in order.
    pub batches: Vec<ValidatedBatch>,
    pub acks: Acks,
    /// Set for a numbered part of a produce stream.
    pub order: Option<StreamOrder>,
    pub reply: oneshot::Sender<Result<AppendOutcome>>,
    /// The shares of byte budgets (the broker's, the partition's) that the batches' memory
    /// holds: returned when the request is answered, and not before (proposed entries stay
    /// in memory until they are persisted).
    pub shares: Vec<Reservation>,
    /// Propose only in this Raft term (a coordinator's write belongs to the state it loaded
    /// in that term); refused as not leader in any other.
    pub term: Option<u64>,
}

/// Where a numbered produce-stream part stands in its partition's sequence on that stream.
///
/// A stream's parts for one partition are refused or appended one by one in stream order by
/// the owner; if one is refused (no leader, a stale view, a dropped proposal), every later
/// part of the run must be refused too, or the client's resend of the first would land after
/// them. `next` is the stream's shared counter for the partition: only the owner moves it,
/// when it appends a part.
#[derive(Debug, Clone)]
pub struct StreamOrder {
    pub next: Arc<AtomicU64>,
    pub sequence: u64,
    /// The client had nothing of this partition awaiting an answer: a new run starts here.
    pub restart: bool,
}

impl StreamOrder {
    /// The part number this stream's next part must carry.
    pub(crate) fn expected(&self) -> u64 {
        if self.restart {
            self.sequence
        } else {
            self.next.load(Ordering::Acquire)
        }
    }
}

/// One step of a Raft group membership change. Changes are made one at a time, each
/// committed before the next is accepted, so two majorities can never disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    /// Joins as a learner: it receives the log but does not vote.
    AddLearner(u64),
    /// A learner that has caught up becomes a voter.
    Promote(u64),
    Remove(u64),
}

#[derive(Debug)]
pub(crate) enum Control {
    TransferLeader(u64),
    /// Hand leadership to an in-sync voter, for a controlled shutdown.
    HandOver(oneshot::Sender<HandOver>),
    /// How many appends the owner holds unanswered (proposed, or waiting for a leader).
    Unanswered(oneshot::Sender<usize>),
    /// The idempotent producers whose state this replica keeps.
    Producers(oneshot::Sender<Vec<conveyor_storage::producer_state::ProducerSummary>>),
    SetPreferred(u64),
    Membership(MemberChange, oneshot::Sender<Result<()>>),
}

/// What a replica did when asked to hand its leadership over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// A transfer to this voter is under way.
    Started(u32),
    /// No voter is in sync right now; one may be soon, so ask again.
    NotNow,
    /// Nothing to hand over: this replica does not lead, is the only voter, or every other
    /// voter was asked already and did not take over (it is shutting down too, say).
    Never,
}
