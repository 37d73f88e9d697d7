//! The owner's part in idempotent produce: judging a request's batches against the
//! producers' state before they are proposed, answering retries of batches written before,
//! and keeping the state's snapshots and expiry (see [`crate::replica::producers`]).

use std::sync::atomic::Ordering;
use std::time::Instant;

use raft::{GetEntriesContext, RawNode, StateRole};

use super::{Owner, Pending};
use crate::error::BrokerError;
use crate::replica::producers::{Located, PartitionProducers, Plan};
use crate::replica::proposal::{Acks, AppendOutcome, AppendRequest};
use crate::replica::raft_storage::RaftLog;

/// How often idle producers are looked for: 600 ticks of `RAFT_TICK` (50 ms), every 30 s.
pub(super) const EXPIRY_CHECK_TICKS: u64 = 600;

/// Drops the state of producers that have not written since `before_ms`. In the Ready job.
pub(super) fn expire(producers: &mut PartitionProducers, before_ms: Option<i64>, topic: &str, partition: i32) {
    let Some(before) = before_ms else {
        return;
    };
    let dropped = producers.expire(before);
    if dropped > 0 {
        tracing::debug!(topic, partition, dropped, "idle producers expired");
    }
}

/// Builds a new leader's view of the idempotent batches in its log above the applied
/// point, if it has not yet for this term. Reads entries the node holds (mostly in memory:
/// the unapplied tail), so it runs in the Ready job, off the reactor.
pub(super) fn build_pending(node: &RawNode<RaftLog>, producers: &mut PartitionProducers) {
    if node.raft.state != StateRole::Leader || !producers.needs_pending(node.raft.term) {
        return;
    }
    let log = &node.raft.raft_log;
    let (applied, last) = (log.applied, log.last_index());
    let entries = if last > applied {
        match log.entries(applied + 1, None, GetEntriesContext::empty(false)) {
            Ok(entries) => entries,
            Err(e) => {
                // Judged later, once this is retried: nothing is judged against a partial view.
                tracing::warn!(error = %e, "cannot read the log tail for the producer state");
                return;
            }
        }
    } else {
        Vec::new()
    };
    producers.rebuild_pending(node.raft.term, &entries);
}

/// Where an answer's offsets start: the request's first proposed entry, or the batch
/// written before that leads it (known by offset, or by its own pending entry).
pub(super) fn request_start(first: u64, duplicates: &[Located]) -> (u64, Option<u64>) {
    match duplicates.first() {
        Some(Located::Committed(meta)) => (first, Some(meta.base_offset)),
        Some(Located::Pending { index, .. }) => (*index, None),
        None => (first, None),
    }
}

impl Owner {
    /// Judges `request`'s idempotent batches. Returns what to propose (the batches not
    /// written before, the located ones that were), or `None` when the request was answered
    /// here: refused, or every batch a retry of one written before.
    pub(super) fn judge(
        &mut self,
        node: &RawNode<RaftLog>,
        mut request: AppendRequest,
    ) -> Option<(
        AppendRequest,
        Vec<Located>,
        Vec<Option<conveyor_storage::producer_state::Idempotent>>,
    )> {
        let Some(producers) = self.producers.as_mut() else {
            let error = BrokerError::Internal("the producer state is not available".into());
            drop(request.reply.send(Err(error)));
            return None;
        };
        // Built in the Ready job, off the reactor (requests wait for it: `Owner::must_hold`);
        // if that job could not read the log tail, the client retries after the next one.
        if producers.needs_pending(node.raft.term) {
            drop(request.reply.send(Err(self.not_leader(node))));
            return None;
        }
        let plan = match producers.plan(std::mem::take(&mut request.batches)) {
            Ok(plan) => plan,
            Err(refusal) => {
                use conveyor_proto::v1::ErrorCode;
                match refusal.code().1 {
                    ErrorCode::OutOfOrderSequence => self.metrics.producer_out_of_order.add(1),
                    ErrorCode::ProducerFenced => self.metrics.producer_fenced.add(1),
                    _ => {}
                }
                let error = BrokerError::Producer {
                    topic: self.topic.clone(),
                    partition: self.index,
                    refusal,
                };
                if let Some(order) = &request.order {
                    // Later parts of the stream must not overtake this one's resend.
                    order.next.store(u64::MAX, Ordering::Release);
                }
                drop(request.reply.send(Err(error)));
                return None;
            }
        };
        match plan {
            Plan::Propose {
                duplicates,
                batches,
                idempotent,
            } => {
                self.metrics.producer_duplicates.add(duplicates.len() as u64);
                request.batches = batches;
                Some((request, duplicates, idempotent))
            }
            Plan::AllDuplicates(duplicates) => {
                self.metrics.producer_duplicates.add(duplicates.len() as u64);
                if let Some(order) = &request.order {
                    order.next.store(order.sequence.saturating_add(1), Ordering::Release);
                }
                self.answer_duplicates(&duplicates, request);
                None
            }
        }
    }

    /// Answers a request whose batches were all written before: at once with their offsets
    /// when they are applied, else once the last of them commits.
    fn answer_duplicates(&mut self, duplicates: &[Located], request: AppendRequest) {
        let (Some(first), Some(last)) = (duplicates.first(), duplicates.last()) else {
            return;
        };
        match *last {
            Located::Committed(last_meta) => {
                let base_offset = match first {
                    Located::Committed(m) => m.base_offset,
                    Located::Pending { .. } => last_meta.base_offset,
                };
                drop(request.reply.send(Ok(AppendOutcome {
                    base_offset,
                    last_offset: last_meta.last_offset,
                })));
            }
            Located::Pending {
                index,
                term,
                last_offset_delta,
            } => {
                let (first, base_offset) = request_start(index, duplicates);
                self.pending.push_back(Pending {
                    first,
                    last: index,
                    base_offset,
                    term,
                    proposed_at: Instant::now(),
                    last_offset_delta,
                    acks: Acks::All,
                    order: request.order.map(|o| o.next),
                    reply: request.reply,
                    _shares: request.shares,
                });
            }
        }
    }

    /// Idle producers are looked for in the next Ready job, off the reactor (a scan of up
    /// to `MAX_PRODUCERS` entries).
    pub(super) fn expiry_due(&mut self) {
        let expiration = i64::try_from(self.producer_expiration.as_millis()).unwrap_or(i64::MAX);
        self.expire_before = Some(conveyor_storage::unix_millis().saturating_sub(expiration));
    }

    /// Writes the producer state at the end of what is applied, so the next start replays
    /// nothing. Runs when the owner stops cleanly.
    pub(super) async fn snapshot_producers(&mut self, node: &RawNode<RaftLog>) {
        let Some(mut producers) = self.producers.take() else {
            return;
        };
        let raft = self.raft.clone();
        let applied = node.raft.raft_log.applied;
        let job = tokio::task::spawn_blocking(move || {
            producers.snapshot_now(raft.offset_after(applied));
            producers
        });
        match job.await {
            Ok(producers) => self.producers = Some(producers),
            Err(e) => {
                tracing::warn!(topic = %self.topic, partition = self.index, error = %e, "producer snapshot at close failed")
            }
        }
    }

    /// The producers this replica keeps state for.
    pub(super) fn producer_summaries(&self) -> Vec<conveyor_storage::producer_state::ProducerSummary> {
        self.producers.as_ref().map(|p| p.summaries()).unwrap_or_default()
    }
}
