//! Acknowledgements waiting to be sent, their coalescing into ranges, and the matching of
//! the broker's per-range results back to each waiting caller.
//!
//! Acknowledgements of contiguous offsets of one partition, delivered with one token and
//! acknowledged alike (kind, delay, reason), travel as one `ShareAck` range. The broker
//! answers each range with one result, which stands for every record of the range.
//!
//! # Invariants
//! - One request never acknowledges a record twice (a renewal and then an accept of the
//!   same delivery, say): the later one waits for the next request. So each record's result
//!   is the one range result that contains it, with no ambiguity.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use conveyor_proto::v1::{ErrorCode, ErrorDetail, ShareAck, ShareAckResult};

use super::delivery::{AckKind, AckRequest};
use crate::error::{ClientError, Result};

/// Most acknowledgements one request carries: each is at most one range, and the broker
/// takes at most 10,000 ranges per request.
pub(crate) const MAX_BATCH: usize = 5_000;
/// Most acknowledgements taken off the queue and not yet sent: past it the task stops
/// taking more, and the bounded queue holds `accept()` back.
pub(crate) const MAX_PENDING: usize = 4 * MAX_BATCH;

/// Acknowledgements queued by deliveries and not yet sent, in arrival order.
#[derive(Debug, Default)]
pub(crate) struct PendingAcks {
    queue: Vec<AckRequest>,
    /// When the oldest of them arrived.
    since: Option<Instant>,
}

impl PendingAcks {
    pub(crate) fn push(&mut self, ack: AckRequest) {
        self.since.get_or_insert_with(Instant::now);
        self.queue.push(ack);
    }

    pub(crate) fn extend(&mut self, acks: impl Iterator<Item = AckRequest>) {
        let before = self.queue.len();
        self.queue.extend(acks);
        if self.queue.len() > before {
            self.since.get_or_insert_with(Instant::now);
        }
    }

    /// How many more it may take.
    pub(crate) fn room(&self) -> usize {
        MAX_PENDING.saturating_sub(self.queue.len())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether it holds as many as it may.
    pub(crate) fn is_full(&self) -> bool {
        self.queue.len() >= MAX_PENDING
    }

    /// When the oldest waiting acknowledgement arrived.
    pub(crate) fn since(&self) -> Option<Instant> {
        self.since
    }

    /// Everything that can go in one request (see the module's invariant); the rest waits.
    pub(crate) fn take_batch(&mut self) -> AckBatch {
        let n = self.queue.len().min(MAX_BATCH);
        let requests: Vec<AckRequest> = if distinct(&self.queue[..n]) {
            // The common case: the first `n` acknowledge `n` records. Draining keeps the
            // queue's room for the next ones.
            self.queue.drain(..n).collect()
        } else {
            let mut seen = HashSet::with_capacity(n);
            let (requests, rest): (Vec<AckRequest>, Vec<AckRequest>) = std::mem::take(&mut self.queue)
                .into_iter()
                .partition(|a| seen.len() < MAX_BATCH && seen.insert((a.held.partition, a.held.offset)));
            self.queue = rest;
            requests
        };
        self.since = if self.queue.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        AckBatch {
            wire: coalesce(&requests),
            requests,
        }
    }
}

/// Whether no two of `acks` are of one record.
fn distinct(acks: &[AckRequest]) -> bool {
    let mut records: Vec<(i32, u64)> = acks.iter().map(|a| (a.held.partition, a.held.offset)).collect();
    // Acknowledgements mostly arrive in delivery order: a stable sort takes the runs as
    // they are.
    records.sort();
    records.windows(2).all(|w| w[0] != w[1])
}

/// Acknowledgements sent in one request: the ranges on the wire and the callers behind them.
#[derive(Debug)]
pub(crate) struct AckBatch {
    pub(crate) wire: Vec<ShareAck>,
    requests: Vec<AckRequest>,
}

impl AckBatch {
    #[cfg(test)]
    pub(crate) fn requests(&self) -> impl Iterator<Item = &AckRequest> {
        self.requests.iter()
    }

    /// Tells each caller the result of the range holding its record; `topic` names it in
    /// refusals.
    pub(crate) fn resolve(self, results: &[ShareAckResult], topic: &str) {
        let mut results: Vec<&ShareAckResult> = results.iter().collect();
        results.sort_by_key(|r| (r.partition, r.first_offset));
        for ack in self.requests {
            if ack.reply.is_none() && ack.kind != AckKind::Renew {
                // Unconfirmed: nobody waits for this one's result.
                continue;
            }
            let (partition, offset) = (ack.held.partition, ack.held.offset);
            // The last range of the partition starting at or before the offset.
            let after = results.partition_point(|r| (r.partition, r.first_offset) <= (partition, offset));
            let found = after
                .checked_sub(1)
                .map(|i| results[i])
                .filter(|r| r.partition == partition && r.last_offset >= offset);
            let outcome = match found {
                Some(r) if r.error == ErrorCode::Unspecified as i32 => {
                    if ack.kind == AckKind::Renew && r.locked_until_ms > 0 {
                        ack.held.locked_until_ms.store(r.locked_until_ms, Ordering::Relaxed);
                    }
                    Ok(())
                }
                Some(r) => Err(refused(topic, partition, offset, &ack.kind, r)),
                None => Err(ClientError::Broker {
                    code: tonic::Code::Internal,
                    message: format!(
                        "topic '{topic}' partition {partition} offset {offset}: the broker's answer held no result for this acknowledgement; the record is delivered again when its lock runs out"
                    ),
                    detail: None,
                }),
            };
            answer(ack, outcome);
        }
    }

    /// Fails every acknowledgement of the request with the error of the whole call. Not
    /// resent: a retriable failure (a moved coordinator, a broken connection) may have been
    /// applied, and the tokens are the old coordinator's. The records come back when their
    /// locks run out.
    pub(crate) fn fail(self, error: &ClientError) {
        for ack in self.requests {
            answer(ack, Err(error.clone()));
        }
    }
}

fn answer(ack: AckRequest, outcome: Result<()>) {
    if ack.kind == AckKind::Renew {
        ack.held.renewing.store(false, Ordering::Release);
    }
    if let Some(reply) = ack.reply {
        // The caller may have stopped waiting; the outcome stands either way.
        let _ = reply.send(outcome);
    }
}

fn refused(topic: &str, partition: i32, offset: u64, kind: &AckKind, r: &ShareAckResult) -> ClientError {
    let what = match kind {
        AckKind::Accept => "accept",
        AckKind::Release(_) => "release",
        AckKind::Reject(_) => "reject",
        AckKind::Renew => "renewal",
    };
    let hint = if r.error == ErrorCode::StaleDelivery as i32 {
        " (its lock ran out and it went to another member, or it was acknowledged already)"
    } else {
        ""
    };
    ClientError::from_detail(ErrorDetail {
        code: r.error,
        message: format!(
            "the broker refused the {what} of topic '{topic}' partition {partition} offset {offset}: {}{hint}",
            r.message
        ),
        topic: topic.to_string(),
        partition,
        ..ErrorDetail::default()
    })
}

/// The wire ranges of `acks`: contiguous offsets of one partition with one token and one
/// kind (delay, reason) become one range. Ranges come out by partition and offset.
pub(crate) fn coalesce(acks: &[AckRequest]) -> Vec<ShareAck> {
    let mut sorted: Vec<&AckRequest> = acks.iter().collect();
    sorted.sort_by(|a, b| {
        (a.held.partition, a.held.token, &a.kind, a.held.offset).cmp(&(
            b.held.partition,
            b.held.token,
            &b.kind,
            b.held.offset,
        ))
    });
    let mut ranges: Vec<(i32, u64, u64, u64, &AckKind)> = Vec::new();
    for a in sorted {
        if let Some(last) = ranges.last_mut()
            && last.0 == a.held.partition
            && last.3 == a.held.token
            && *last.4 == a.kind
            && last.2 + 1 == a.held.offset
        {
            last.2 = a.held.offset;
            continue;
        }
        ranges.push((a.held.partition, a.held.offset, a.held.offset, a.held.token, &a.kind));
    }
    let mut wire: Vec<ShareAck> = ranges
        .into_iter()
        .map(|(partition, first_offset, last_offset, token, kind)| {
            let (kind, delay_ms, reason) = kind.wire();
            ShareAck {
                partition,
                first_offset,
                last_offset,
                token,
                kind: kind as i32,
                delay_ms,
                reason,
            }
        })
        .collect();
    wire.sort_by_key(|a| (a.partition, a.first_offset));
    wire
}

#[cfg(test)]
mod tests {
    use conveyor_proto::v1::ShareAckKind;
    use tokio::sync::oneshot;

    use super::*;
    use crate::shares::delivery::{Held, HeldRef};

    fn ack(partition: i32, offset: u64, token: u64, kind: AckKind) -> (AckRequest, oneshot::Receiver<Result<()>>) {
        let (tx, rx) = oneshot::channel();
        let request = AckRequest {
            held: HeldRef::single(Held::new(partition, offset, token, 0, Instant::now())),
            kind,
            reply: Some(tx),
        };
        (request, rx)
    }

    fn range(partition: i32, first: u64, last: u64, token: u64, kind: ShareAckKind) -> (i32, u64, u64, u64, i32) {
        (partition, first, last, token, kind as i32)
    }

    #[test]
    fn contiguous_offsets_with_one_token_and_kind_become_one_range_and_anything_else_splits_it() {
        let acks: Vec<AckRequest> = [
            ack(0, 5, 1, AckKind::Accept),
            ack(0, 3, 1, AckKind::Accept),
            ack(0, 4, 1, AckKind::Accept),
            // A gap at 6.
            ack(0, 7, 1, AckKind::Accept),
            // Another token.
            ack(0, 8, 2, AckKind::Accept),
            // Another kind, and another delay.
            ack(1, 0, 1, AckKind::Release(0)),
            ack(1, 1, 1, AckKind::Release(100)),
            ack(1, 2, 1, AckKind::Release(100)),
        ]
        .into_iter()
        .map(|(a, _)| a)
        .collect();
        let wire: Vec<_> = coalesce(&acks)
            .iter()
            .map(|a| (a.partition, a.first_offset, a.last_offset, a.token, a.kind))
            .collect();
        assert_eq!(
            wire,
            [
                range(0, 3, 5, 1, ShareAckKind::Accept),
                range(0, 7, 7, 1, ShareAckKind::Accept),
                range(0, 8, 8, 2, ShareAckKind::Accept),
                range(1, 0, 0, 1, ShareAckKind::Release),
                range(1, 1, 2, 1, ShareAckKind::Release),
            ]
        );
        assert_eq!(coalesce(&acks)[4].delay_ms, 100);
    }

    #[test]
    fn a_second_acknowledgement_of_a_record_waits_for_the_next_request() {
        let mut pending = PendingAcks::default();
        pending.push(ack(0, 3, 1, AckKind::Renew).0);
        pending.push(ack(0, 3, 1, AckKind::Accept).0);
        pending.push(ack(0, 4, 1, AckKind::Accept).0);
        let first = pending.take_batch();
        assert_eq!(first.wire.len(), 2, "the renewal of 3 and the accept of 4");
        assert!(!pending.is_empty());
        let second = pending.take_batch();
        assert_eq!(second.wire[0].kind, ShareAckKind::Accept as i32);
        assert!(pending.is_empty() && pending.since().is_none());
    }

    #[tokio::test]
    async fn each_caller_gets_the_result_of_the_range_holding_its_record() {
        let (a, a_rx) = ack(0, 3, 1, AckKind::Accept);
        let (b, b_rx) = ack(0, 4, 1, AckKind::Accept);
        let (c, c_rx) = ack(2, 9, 1, AckKind::Accept);
        let (d, d_rx) = ack(3, 1, 1, AckKind::Accept);
        let batch = AckBatch {
            wire: Vec::new(),
            requests: vec![a, b, c, d],
        };
        let result = |partition, first_offset, last_offset, error: ErrorCode| ShareAckResult {
            partition,
            first_offset,
            last_offset,
            error: error as i32,
            message: "stale token".into(),
            locked_until_ms: 0,
        };
        batch.resolve(
            &[
                result(2, 9, 9, ErrorCode::StaleDelivery),
                result(0, 3, 4, ErrorCode::Unspecified),
            ],
            "orders",
        );
        assert!(a_rx.await.expect("answered").is_ok());
        assert!(b_rx.await.expect("answered").is_ok());
        let refused = c_rx.await.expect("answered").expect_err("refused");
        assert_eq!(refused.code(), Some(ErrorCode::StaleDelivery));
        assert!(matches!(
            refused,
            ClientError::Broker {
                code: tonic::Code::FailedPrecondition,
                ..
            }
        ));
        assert!(
            refused.to_string().contains("partition 2 offset 9: stale token"),
            "{refused}"
        );
        let missing = d_rx.await.expect("answered").expect_err("no result");
        assert!(missing.to_string().contains("no result"), "{missing}");
    }
}
