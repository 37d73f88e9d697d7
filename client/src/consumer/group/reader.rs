//! The stream side of a group member: the records of the partitions it owns, and their
//! finished positions.
//!
//! A record counts as finished once the application asks for the next one (Kafka's poll
//! semantics). Everything the reader does for the group happens at that moment, at the
//! start of a poll: it answers a revocation with the positions of the revoked partitions
//! (all finished then) and drops what it buffered of them, takes in new partitions,
//! queues an automatic commit. So a revoked partition's records are never yielded after the
//! revocation was processed, and a partition given up was committed up to exactly what was
//! finished. The price: a revocation waits until the application polls again (bounded by
//! the rebalance timeout, after which the coordinator removes the member).
//!
//! # Invariants
//! - A chunk is delivered only when its partition is owned under the chunk's incarnation;
//!   chunks of a stopped or restarted fetch are dropped when they arrive.
//! - Per record the reader adds one relaxed atomic load (the attention flag) to the
//!   manual consumer's hot path; ownership is checked per chunk.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::task::{Context, Poll};

use conveyor_proto::v1::OffsetCommit;
use tokio::sync::mpsc;

use super::commit::CommitRequest;
use super::shared::{Assigned, MAX_PENDING_ERRORS, Shared};
use crate::consumer::ConsumerRecord;
use crate::consumer::decode::{Chunk, Decoder};
use crate::consumer::fetcher::{FetchFailure, Fetched};
use crate::error::{ClientError, Result};
use crate::groups::TopicPartition;

/// Topic → partition → incarnation, looked up by `&str` per chunk.
type Owned = HashMap<Arc<str>, HashMap<i32, u64>>;

#[derive(Debug)]
pub(super) struct Reader {
    decoder: Decoder,
    rx: mpsc::Receiver<Fetched>,
    shared: Arc<Shared>,
    /// The partitions delivered: a copy of the inbox's assignment as of `generation`.
    owned: Owned,
    generation: u64,
    errors: VecDeque<ClientError>,
    /// The member stopped for good: end once the errors are yielded.
    stopping: bool,
    ended: bool,
    commits: mpsc::Sender<CommitRequest>,
}

impl Reader {
    pub(super) fn new(
        rx: mpsc::Receiver<Fetched>,
        shared: Arc<Shared>,
        commits: mpsc::Sender<CommitRequest>,
    ) -> Reader {
        Reader {
            decoder: Decoder::default(),
            rx,
            shared,
            owned: HashMap::new(),
            generation: 0,
            errors: VecDeque::new(),
            stopping: false,
            ended: false,
            commits,
        }
    }

    pub(super) fn poll_record(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<ConsumerRecord>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.shared.needs_attention() {
            self.attend();
        }
        loop {
            if let Some(e) = self.errors.pop_front() {
                return Poll::Ready(Some(Err(e)));
            }
            if self.stopping {
                self.ended = true;
                return Poll::Ready(None);
            }
            match self.decoder.next_record() {
                Some(Ok(record)) => return Poll::Ready(Some(Ok(record))),
                Some(Err(e)) => {
                    // Damage inside a batch that passed its checks: going on could skip
                    // records silently, as in the manual consumer.
                    self.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None if self.decoder.advance() => continue,
                None => {}
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunks))) => self.take(chunks),
                Poll::Ready(Some(Err(failure))) => {
                    if let Some(error) = self.current_failure(failure) {
                        return Poll::Ready(Some(Err(error)));
                    }
                }
                Poll::Ready(None) => {
                    // The fetch task ended: the member left or stopped. Say why, if it did.
                    self.attend();
                    self.stopping = true;
                    if self.errors.is_empty() {
                        self.ended = true;
                        return Poll::Ready(None);
                    }
                }
                Poll::Pending => {
                    self.shared.register(cx.waker());
                    // Registered before looking again, so a post landing between the two is
                    // either seen now or wakes this task.
                    if self.shared.needs_attention() {
                        self.attend();
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// Queues the chunks of partitions owned under their incarnation; drops the others.
    fn take(&mut self, mut chunks: Vec<Chunk>) {
        if chunks.iter().any(|c| !delivers(&self.owned, c)) {
            // Perhaps a partition started since the reader last looked.
            if self.shared.needs_attention() {
                self.attend();
            }
            chunks.retain(|c| delivers(&self.owned, c));
        }
        if !chunks.is_empty() {
            self.decoder.push(chunks);
        }
    }

    /// The error of a fetch failure, unless it is of a fetch no longer current.
    fn current_failure(&mut self, failure: FetchFailure) -> Option<ClientError> {
        let Some((topic, partition, incarnation)) = &failure.source else {
            return Some(failure.error);
        };
        let current = |owned: &Owned| incarnation_of(owned, topic, *partition) == Some(*incarnation);
        if !current(&self.owned) && self.shared.needs_attention() {
            self.attend();
        }
        current(&self.owned).then_some(failure.error)
    }

    /// Takes in what the membership task posted. Called at the start of a poll (when every
    /// record handed out is finished), and before a commit the application asks for. Not
    /// on a seek or a position lookup: the record in hand is not finished then.
    pub(super) fn attend(&mut self) {
        if !self.shared.take_attention() {
            return;
        }
        let mut inbox = self.shared.inbox();
        // Positions first: a revocation removes the partitions in the same post.
        if let Some(request) = inbox.position_request.take() {
            let positions = request
                .partitions
                .into_iter()
                .filter_map(|p| {
                    let at = self.decoder.position(&p.topic, p.partition)?;
                    Some((p, at))
                })
                .collect();
            let _ = request.reply.send(positions);
        }
        if inbox.generation != self.generation {
            self.generation = inbox.generation;
            sync(&mut self.owned, &mut self.decoder, &inbox.assignment);
        }
        self.errors.extend(inbox.errors.drain(..));
        if let Some(fatal) = inbox.fatal.take() {
            self.errors.push_back(fatal);
            self.stopping = true;
        }
        while self.errors.len() > MAX_PENDING_ERRORS {
            self.errors.pop_front();
        }
        let auto_commit = std::mem::take(&mut inbox.auto_commit_due);
        drop(inbox);
        if auto_commit {
            self.auto_commit();
        }
    }

    /// Queues a commit of the finished positions, unless commits are already queued (the
    /// next automatic commit takes the positions then).
    fn auto_commit(&mut self) {
        let offsets = self.positions();
        if offsets.is_empty() {
            return;
        }
        let request = CommitRequest { offsets, reply: None };
        if self.commits.try_send(request).is_err() {
            tracing::debug!("automatic commit skipped: earlier commits are still queued");
        }
    }

    /// The position of every owned partition that has one: after the last record handed
    /// out, or where it starts.
    pub(super) fn positions(&self) -> Vec<OffsetCommit> {
        let mut offsets = Vec::new();
        for (topic, partitions) in &self.owned {
            for &partition in partitions.keys() {
                if let Some(offset) = self.decoder.position(topic, partition) {
                    offsets.push(OffsetCommit {
                        topic: topic.to_string(),
                        partition,
                        offset,
                        metadata: String::new(),
                    });
                }
            }
        }
        offsets
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.shared
    }

    pub(super) fn position(&self, topic: &str, partition: i32) -> Option<u64> {
        incarnation_of(&self.owned, topic, partition)?;
        self.decoder.position(topic, partition)
    }

    /// Restarts an owned partition at `offset` under `incarnation`; the fetch is restarted
    /// by the membership task. Fails if the partition is not (or no longer) owned.
    pub(super) fn seek(&mut self, partition: &TopicPartition, offset: u64, incarnation: u64) -> Result<()> {
        self.shared.post(|inbox| match inbox.assignment.get_mut(partition) {
            Some(assigned) => {
                *assigned = Assigned {
                    incarnation,
                    start: Some(offset),
                };
                inbox.generation += 1;
                Ok(())
            }
            None => Err(ClientError::InvalidArgument(format!(
                "{partition} is not assigned to this member (see assignment())"
            ))),
        })?;
        // Only the sought partition restarts now: a full sync would also take in a
        // revocation posted meanwhile, before its finished positions were reported.
        let topic = self
            .owned
            .get_key_value(partition.topic.as_str())
            .map_or_else(|| Arc::from(partition.topic.as_str()), |(t, _)| Arc::clone(t));
        self.decoder.forget(&topic, partition.partition);
        self.owned
            .entry(Arc::clone(&topic))
            .or_default()
            .insert(partition.partition, incarnation);
        self.decoder.set_position(topic, partition.partition, offset);
        Ok(())
    }
}

fn incarnation_of(owned: &Owned, topic: &str, partition: i32) -> Option<u64> {
    owned.get(topic)?.get(&partition).copied()
}

fn delivers(owned: &Owned, chunk: &Chunk) -> bool {
    incarnation_of(owned, &chunk.topic, chunk.partition) == Some(chunk.incarnation)
}

/// Makes `owned` match the inbox's assignment: partitions gone or restarted are dropped
/// with everything buffered of them; new or restarted ones begin at their start.
fn sync(owned: &mut Owned, decoder: &mut Decoder, assignment: &HashMap<TopicPartition, Assigned>) {
    let mut gone = Vec::new();
    for (topic, partitions) in owned.iter() {
        for (&partition, &incarnation) in partitions {
            let key = TopicPartition::new(topic.as_ref(), partition);
            if assignment.get(&key).map(|a| a.incarnation) != Some(incarnation) {
                gone.push((Arc::clone(topic), partition));
            }
        }
    }
    for (topic, partition) in gone {
        decoder.forget(&topic, partition);
        if let Some(partitions) = owned.get_mut(&topic) {
            partitions.remove(&partition);
        }
    }
    for (key, assigned) in assignment {
        if incarnation_of(owned, &key.topic, key.partition) == Some(assigned.incarnation) {
            continue;
        }
        let topic = owned
            .get_key_value(key.topic.as_str())
            .map_or_else(|| Arc::from(key.topic.as_str()), |(t, _)| Arc::clone(t));
        owned
            .entry(Arc::clone(&topic))
            .or_default()
            .insert(key.partition, assigned.incarnation);
        if let Some(start) = assigned.start {
            decoder.set_position(topic, key.partition, start);
        }
    }
    owned.retain(|_, partitions| !partitions.is_empty());
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use bytes::Bytes;
    use conveyor_storage::batch::{BatchBuilder, Compression, Record};
    use tokio::sync::oneshot;

    use super::*;
    use crate::consumer::group::shared::PositionRequest;

    /// `count` one-record batches of `topic`[`partition`] from offset `base`.
    fn chunk(topic: &str, partition: i32, incarnation: u64, base: u64, count: u64) -> Chunk {
        let mut all = Vec::new();
        for i in base..base + count {
            let mut b = BatchBuilder::new(Compression::None);
            b.push(&Record {
                timestamp: 1,
                value: Some(Bytes::from(format!("{topic}-{partition}-{i}"))),
                ..Record::default()
            });
            let mut bytes = b.build().expect("batch").to_vec();
            conveyor_storage::batch::stamp(&mut bytes, i, 1, i + 1);
            all.extend_from_slice(&bytes);
        }
        Chunk {
            topic: Arc::from(topic),
            partition,
            incarnation,
            from: base,
            next: base + count,
            batches: Bytes::from(all),
        }
    }

    struct Harness {
        reader: Reader,
        chunks: mpsc::Sender<Fetched>,
        shared: Arc<Shared>,
        commits: mpsc::Receiver<CommitRequest>,
    }

    fn harness() -> Harness {
        let (chunks, rx) = mpsc::channel(8);
        let (commits_tx, commits) = mpsc::channel(8);
        let shared = Arc::new(Shared::default());
        Harness {
            reader: Reader::new(rx, Arc::clone(&shared), commits_tx),
            chunks,
            shared,
            commits,
        }
    }

    impl Harness {
        fn assign(&self, topic: &str, partition: i32, incarnation: u64, start: u64) {
            self.shared.post(|inbox| {
                inbox.assignment.insert(
                    TopicPartition::new(topic, partition),
                    Assigned {
                        incarnation,
                        start: Some(start),
                    },
                );
                inbox.generation += 1;
            });
        }

        /// The next record's (partition, offset) without waiting; `None` when nothing is ready.
        fn next(&mut self) -> Option<(i32, u64)> {
            let mut cx = Context::from_waker(Waker::noop());
            match self.reader.poll_record(&mut cx) {
                Poll::Ready(Some(Ok(r))) => Some((r.partition, r.offset)),
                Poll::Ready(Some(Err(e))) => panic!("error: {e}"),
                Poll::Ready(None) => panic!("the stream ended"),
                Poll::Pending => None,
            }
        }

        fn revoke(&self, partitions: &[TopicPartition]) -> oneshot::Receiver<Vec<(TopicPartition, u64)>> {
            let (reply, positions) = oneshot::channel();
            self.shared.post(|inbox| {
                for p in partitions {
                    inbox.assignment.remove(p);
                }
                inbox.generation += 1;
                inbox.position_request = Some(PositionRequest {
                    partitions: partitions.to_vec(),
                    reply,
                });
            });
            positions
        }
    }

    #[tokio::test]
    async fn a_revoked_partition_answers_its_finished_position_and_yields_nothing_buffered_after() {
        let mut h = harness();
        h.assign("t", 0, 1, 10);
        h.assign("t", 1, 2, 20);
        h.chunks
            .send(Ok(vec![chunk("t", 0, 1, 10, 3), chunk("t", 1, 2, 20, 2)]))
            .await
            .expect("send");
        assert_eq!(h.next(), Some((0, 10)));
        assert_eq!(h.next(), Some((0, 11)));
        // Revoked while records 12 of p0 and 20-21 of p1 are buffered; the application is
        // busy with 11, which counts as finished at its next poll.
        let mut positions = h.revoke(&[TopicPartition::new("t", 0)]);
        assert!(positions.try_recv().is_err(), "answered only when the stream is polled");
        assert_eq!(
            h.next(),
            Some((1, 20)),
            "the revoked partition's buffered record is dropped"
        );
        assert_eq!(
            positions.try_recv().expect("answered"),
            [(TopicPartition::new("t", 0), 12)]
        );
        assert_eq!(h.next(), Some((1, 21)));
        assert_eq!(h.next(), None);
        // A late chunk of the revoked partition's fetch is dropped too.
        h.chunks.send(Ok(vec![chunk("t", 0, 1, 13, 1)])).await.expect("send");
        assert_eq!(h.next(), None);
        let positions: Vec<(String, i32, u64)> = h
            .reader
            .positions()
            .into_iter()
            .map(|o| (o.topic, o.partition, o.offset))
            .collect();
        assert_eq!(positions, [("t".to_string(), 1, 22)]);
    }

    #[tokio::test]
    async fn chunks_of_an_older_incarnation_are_dropped_after_a_seek_and_the_position_restarts() {
        let mut h = harness();
        h.assign("t", 0, 1, 0);
        h.chunks.send(Ok(vec![chunk("t", 0, 1, 0, 5)])).await.expect("send");
        assert_eq!(h.next(), Some((0, 0)));
        h.reader.seek(&TopicPartition::new("t", 0), 40, 7).expect("owned");
        assert_eq!(h.reader.position("t", 0), Some(40));
        assert_eq!(h.next(), None, "the rest of the old fetch is gone");
        h.chunks.send(Ok(vec![chunk("t", 0, 1, 5, 1)])).await.expect("send");
        assert_eq!(h.next(), None, "a late chunk of the old fetch is dropped");
        h.chunks.send(Ok(vec![chunk("t", 0, 7, 40, 1)])).await.expect("send");
        assert_eq!(h.next(), Some((0, 40)));
        let e = h
            .reader
            .seek(&TopicPartition::new("t", 9), 0, 8)
            .expect_err("not owned");
        assert!(e.to_string().contains("t[9] is not assigned"), "{e}");
    }

    #[tokio::test]
    async fn a_chunk_of_a_partition_started_after_the_last_poll_is_delivered() {
        let mut h = harness();
        assert_eq!(h.next(), None);
        // The membership task posts the partition, then starts its fetch: the chunk can
        // arrive before the reader looked at the inbox.
        h.assign("t", 3, 5, 100);
        h.chunks.send(Ok(vec![chunk("t", 3, 5, 100, 1)])).await.expect("send");
        assert_eq!(h.next(), Some((3, 100)));
    }

    #[tokio::test]
    async fn an_automatic_commit_takes_the_finished_positions_of_owned_partitions_only() {
        let mut h = harness();
        h.assign("t", 0, 1, 0);
        h.assign("u", 2, 2, 7);
        h.chunks.send(Ok(vec![chunk("t", 0, 1, 0, 3)])).await.expect("send");
        assert_eq!(h.next(), Some((0, 0)));
        assert_eq!(h.next(), Some((0, 1)));
        h.shared.post(|inbox| inbox.auto_commit_due = true);
        assert_eq!(h.next(), Some((0, 2)));
        let request = h.commits.try_recv().expect("queued");
        assert!(request.reply.is_none());
        let mut offsets: Vec<(String, i32, u64)> = request
            .offsets
            .into_iter()
            .map(|o| (o.topic, o.partition, o.offset))
            .collect();
        offsets.sort();
        // Record 1 was finished when 2 was asked for; 2 is in the application's hands.
        assert_eq!(offsets, [("t".to_string(), 0, 2), ("u".to_string(), 2, 7)]);
    }

    #[tokio::test]
    async fn failures_of_fetches_no_longer_current_are_dropped_and_others_yielded_without_ending() {
        let mut h = harness();
        h.assign("t", 0, 4, 0);
        let failure = |incarnation| FetchFailure {
            source: Some((Arc::from("t"), 0, incarnation)),
            error: ClientError::InvalidArgument(format!("failure of incarnation {incarnation}")),
        };
        h.chunks.send(Err(failure(3))).await.expect("send");
        h.chunks.send(Err(failure(4))).await.expect("send");
        let mut cx = Context::from_waker(Waker::noop());
        match h.reader.poll_record(&mut cx) {
            Poll::Ready(Some(Err(e))) => assert!(e.to_string().contains("incarnation 4"), "{e}"),
            other => panic!("expected the current fetch's failure, got {other:?}"),
        }
        h.chunks.send(Ok(vec![chunk("t", 0, 4, 0, 1)])).await.expect("send");
        assert_eq!(h.next(), Some((0, 0)), "a partition's failure does not end the stream");
    }

    #[tokio::test]
    async fn a_fatal_error_is_yielded_then_the_stream_ends() {
        let mut h = harness();
        h.shared
            .post(|inbox| inbox.fatal = Some(ClientError::InvalidArgument("unknown assignor".into())));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(h.reader.poll_record(&mut cx), Poll::Ready(Some(Err(_)))));
        assert!(matches!(h.reader.poll_record(&mut cx), Poll::Ready(None)));
    }
}
