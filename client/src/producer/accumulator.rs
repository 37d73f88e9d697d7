//! Open batches per partition, sealing by size or linger, and delivery slots.
//!
//! # Thread-safety
//! One mutex guards the open batches; it is held only to push a record or seal a batch,
//! never across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use conveyor_storage::BatchError;
use conveyor_storage::batch::{BatchBuilder, ProducerInfo, Record, restamp_producer};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use super::idempotence::MAX_IN_FLIGHT_PER_PARTITION;
use super::partitioner::partition_for_key;
use super::{DeliveryFuture, ProducerConfig, ProducerRecord};
use crate::Client;
use crate::error::{ClientError, Result};

/// The outcome of one batch, shared by the delivery futures of its records.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    result: OnceLock<Result<Option<u64>>>,
    /// Tasks waiting for the outcome. Polled by hand rather than through an async block, so
    /// a delivery future costs no allocation of its own.
    waiting: Mutex<Vec<Waker>>,
}

impl Slot {
    /// The batch's base offset (`None` with acks=none), or why it failed, once known.
    pub(crate) fn poll_result(&self, cx: &mut Context<'_>) -> Poll<Result<Option<u64>>> {
        if let Some(r) = self.result.get() {
            return Poll::Ready(r.clone());
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Checked again under the lock: `set` publishes the result before it takes the lock
        // to wake, so a waker added after this check is always woken.
        if let Some(r) = self.result.get() {
            return Poll::Ready(r.clone());
        }
        // Only the last entry is compared: many futures of one batch (in a JoinSet, say)
        // each register once, and a scan would make that quadratic.
        if !waiting.last().is_some_and(|w| w.will_wake(cx.waker())) {
            waiting.push(cx.waker().clone());
        }
        Poll::Pending
    }

    fn set(&self, result: Result<Option<u64>>) {
        let _ = self.result.set(result);
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for waker in waiting {
            waker.wake();
        }
    }
}

/// A partition of a topic, as the accumulator keys its batches.
type PartitionKey = (Arc<str>, i32);

/// Per partition: sealed batches not yet answered, and whether an open batch waits for one
/// of them to be answered before it is sealed (see [`Shared::has_room`]).
#[derive(Debug, Default)]
pub(super) struct Unanswered {
    pub(super) count: HashMap<PartitionKey, usize>,
    pub(super) waiting: std::collections::HashSet<PartitionKey>,
}

/// Sealed batches not yet answered, by sequence number (the order they were sealed), so
/// that `flush` waits for what was sent before it and not for later sends.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    outstanding: Mutex<std::collections::BTreeSet<u64>>,
    pub idle: Notify,
    unanswered: Mutex<Unanswered>,
    /// Wakes the task that seals open batches waiting for room (see [`run_sealer`]).
    room: Notify,
    /// The producer, held while an open batch waits for room (see `Shared::wait_for_room`).
    keep_alive: Mutex<Option<Arc<Shared>>>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.outstanding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn unanswered(&self) -> std::sync::MutexGuard<'_, Unanswered> {
        self.unanswered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A batch of `key` was answered (or failed): if an open batch of it waits for room and
    /// now has it, the sealer is woken.
    fn answered(&self, key: &PartitionKey) {
        let mut u = self.unanswered();
        let left = match u.count.get_mut(key) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => return,
        };
        if left == 0 {
            u.count.remove(key);
        }
        if left < MAX_IN_FLIGHT_PER_PARTITION && u.waiting.contains(key) {
            drop(u);
            self.room.notify_one();
        }
    }

    /// True once every batch sealed with a sequence up to `seq` is answered.
    pub(crate) fn done_through(&self, seq: u64) -> bool {
        self.lock().first().is_none_or(|first| *first > seq)
    }
}

/// A batch ready to send.
#[derive(Debug)]
pub(crate) struct Sealed {
    pub topic: Arc<str>,
    pub partition: i32,
    pub bytes: Bytes,
    pub attempts: u32,
    /// When the batch took its first record: it fails once `delivery_timeout` has passed
    /// since (time spent open, waiting for room, counts).
    pub sealed_at: std::time::Instant,
    slot: Arc<Slot>,
    tracker: Arc<Tracker>,
    pub(crate) seq: u64,
    /// Records in the batch: how many sequences it takes.
    pub records: u32,
    /// The producer identity and base sequence stamped into its bytes (idempotent producers),
    /// once it was given them at its first send.
    pub producer: Option<ProducerInfo>,
    /// Sent at least once: if it was written, a resend under another identity could
    /// write it twice.
    pub sent: bool,
    completed: bool,
    /// Returns the batch's bytes to the in-flight budget when dropped.
    _permit: OwnedSemaphorePermit,
}

impl Sealed {
    /// Writes producer identity and sequence into the batch, in place when nothing else
    /// holds its bytes (a copy otherwise).
    pub(crate) fn restamp(&mut self, producer: ProducerInfo) -> Result<(), BatchError> {
        let mut bytes = std::mem::take(&mut self.bytes)
            .try_into_mut()
            .unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
        // On error the bytes are unchanged: put them back either way.
        let result = restamp_producer(&mut bytes, producer);
        self.bytes = bytes.freeze();
        result
    }

    /// The sequence after the batch's last one (0 when it has none).
    pub(crate) fn end_sequence(&self) -> i64 {
        self.producer
            .map_or(0, |p| i64::from(p.base_sequence) + i64::from(self.records))
    }

    /// The batch's outcome once it is known.
    #[cfg(test)]
    pub(crate) fn outcome(&self) -> impl Fn() -> Option<Result<Option<u64>>> + use<> {
        let slot = Arc::clone(&self.slot);
        move || slot.result.get().cloned()
    }

    #[cfg(test)]
    pub(crate) fn for_test(topic: Arc<str>, partition: i32, bytes: Bytes, records: u32, seq: u64) -> Sealed {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().expect("a free permit");
        Sealed {
            topic,
            partition,
            bytes,
            attempts: 0,
            sealed_at: std::time::Instant::now(),
            slot: Arc::new(Slot::default()),
            tracker: Arc::new(Tracker::default()),
            seq,
            records,
            producer: None,
            sent: false,
            completed: false,
            _permit: permit,
        }
    }

    pub(crate) fn complete(mut self, result: Result<Option<u64>>) {
        self.finish(result);
    }

    fn finish(&mut self, result: Result<Option<u64>>) {
        if std::mem::replace(&mut self.completed, true) {
            return;
        }
        self.slot.set(result);
        self.tracker.lock().remove(&self.seq);
        self.tracker.answered(&(Arc::clone(&self.topic), self.partition));
        self.tracker.idle.notify_waiters();
    }
}

impl Drop for Sealed {
    /// A batch dropped unanswered (its `send` was cancelled while the queue was full, or the
    /// sender stopped) fails its records instead of leaving their futures and `flush` hanging.
    fn drop(&mut self) {
        self.finish(Err(ClientError::Closed));
    }
}

#[derive(Debug)]
struct Open {
    id: u64,
    /// When the batch took its first record.
    opened_at: std::time::Instant,
    /// Marked as waiting for room (see [`Shared::wait_for_room`]): the records that join it
    /// need not ask again.
    waiting: bool,
    builder: BatchBuilder,
    slot: Arc<Slot>,
    /// The buffer memory of every record in the batch, released when it is answered.
    permit: OwnedSemaphorePermit,
}

/// Per-topic state: partition count, the sticky partition for keyless records, open batches.
#[derive(Debug)]
struct TopicState {
    name: Arc<str>,
    partitions: u32,
    sticky: Option<i32>,
    open: HashMap<i32, Open>,
}

#[derive(Debug, Default)]
pub(crate) struct Accumulator {
    topics: HashMap<String, TopicState>,
    next_id: u64,
    round_robin: u32,
    /// Sequence number of the next sealed batch.
    next_seq: u64,
    /// Sealed batches in the order they were sealed, waiting to go to the sender.
    ready: std::collections::VecDeque<Sealed>,
}

/// What [`Shared::append`] did with a record.
#[derive(Debug)]
pub(crate) enum Appended {
    /// Added; `sealed` when this record filled its batch and it waits in the ready queue.
    Done { future: DeliveryFuture, sealed: bool },
    /// The topic's partition count is not known yet: learn it and append again.
    NeedsPartitionCount(ProducerRecord, OwnedSemaphorePermit),
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub budget: Arc<Semaphore>,
    pub accumulator: Mutex<Accumulator>,
    pub tracker: Arc<Tracker>,
    pub to_sender: mpsc::Sender<Sealed>,
    /// One dispatcher at a time moves sealed batches to the sender, so they reach it in the
    /// order they were sealed (per-partition order).
    pub dispatching: tokio::sync::Mutex<()>,
    pub client: Client,
    pub config: ProducerConfig,
    pub status: Arc<super::idempotence::Status>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Accumulator> {
        self.accumulator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn learn_partitions(&self, topic: &str, partitions: u32) {
        let mut acc = self.lock();
        acc.topics
            .entry(topic.to_string())
            .or_insert_with(|| TopicState {
                name: Arc::from(topic),
                partitions,
                sticky: None,
                open: HashMap::new(),
            })
            .partitions = partitions;
    }

    /// Adds a record, choosing its partition (explicit, murmur2 of the key, or the sticky
    /// partition for keyless records). One lock, one map lookup per record; the first record
    /// of a topic comes back once so that the caller can learn the partition count.
    pub(crate) fn append(self: &Arc<Self>, record: ProducerRecord, permit: OwnedSemaphorePermit) -> Appended {
        let mut guard = self.lock();
        let acc = &mut *guard;
        let Some(state) = acc.topics.get_mut(&record.topic).filter(|s| s.partitions > 0) else {
            return Appended::NeedsPartitionCount(record, permit);
        };
        let partition = match (record.partition, &record.key) {
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, state.partitions),
            (None, None) => *state.sticky.get_or_insert_with(|| {
                acc.round_robin = acc.round_robin.wrapping_add(1);
                (acc.round_robin % state.partitions.max(1)) as i32
            }),
        };
        let mut started = None;
        let open = match state.open.entry(partition) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let open = e.into_mut();
                open.permit.merge(permit);
                open
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                let id = acc.next_id;
                acc.next_id += 1;
                started = Some(id);
                e.insert(Open {
                    id,
                    opened_at: std::time::Instant::now(),
                    waiting: false,
                    builder: BatchBuilder::new(self.config.compression),
                    slot: Arc::new(Slot::default()),
                    permit,
                })
            }
        };
        let index = open.builder.len();
        open.builder.push(&Record {
            timestamp: record.timestamp.unwrap_or_else(conveyor_storage::unix_millis),
            key: record.key,
            value: record.value,
            headers: record.headers,
        });
        let future = DeliveryFuture {
            slot: Arc::clone(&open.slot),
            index,
            topic: Arc::clone(&state.name),
            partition,
        };
        let full = open.builder.estimated_size() >= self.config.batch_size;
        // With no linger a batch goes out at once (a timer would add up to a tick of delay),
        // unless it could not be sent anyway: then it takes the records that come meanwhile.
        let linger_zero = self.config.linger.is_zero();
        let now = full || (linger_zero && !open.waiting && self.has_room(&state.name, partition));
        let name = (!now && linger_zero && !open.waiting).then(|| Arc::clone(&state.name));
        open.waiting |= name.is_some();
        let sealed = now && self.seal(acc, &record.topic, partition);
        if let Some(name) = name {
            self.wait_for_room(name, partition);
        } else if let Some(id) = started
            && !now
        {
            self.start_linger(record.topic, partition, id);
        }
        // Batches left in the ready queue by a dispatch that was cancelled (its `send` was
        // dropped while the sender's queue was full) go with this one, else a partition whose
        // batches sit there unanswered would never get room again.
        let sealed = sealed || !acc.ready.is_empty();
        Appended::Done { future, sealed }
    }

    /// Whether a batch of `partition` sealed now could be sent: always without idempotence;
    /// with it, while fewer than [`MAX_IN_FLIGHT_PER_PARTITION`] of its batches are
    /// unanswered. A batch sealed beyond that would wait in the sender's queue, a few records
    /// each, while the records after it could have joined it: an open batch waits instead
    /// (as Kafka's accumulator keeps a batch open until its partition can be drained), and
    /// the sealer seals it once an answer frees room.
    fn has_room(&self, topic: &Arc<str>, partition: i32) -> bool {
        !self.config.idempotence
            || self
                .tracker
                .unanswered()
                .count
                .get(&(Arc::clone(topic), partition))
                .is_none_or(|n| *n < MAX_IN_FLIGHT_PER_PARTITION)
    }

    /// Marks `partition`'s open batch as waiting for room. The producer is kept alive until
    /// nothing waits, so that a batch waiting when the application drops its producer is
    /// still sealed and sent (as a lingering batch's timer keeps it alive).
    fn wait_for_room(self: &Arc<Self>, topic: Arc<str>, partition: i32) {
        let mut u = self.tracker.unanswered();
        // An answer that came between the check and this mark found nothing waiting.
        let room = u
            .count
            .get(&(Arc::clone(&topic), partition))
            .is_none_or(|n| *n < MAX_IN_FLIGHT_PER_PARTITION);
        u.waiting.insert((topic, partition));
        drop(u);
        let mut keep = self
            .tracker
            .keep_alive
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if keep.is_none() {
            *keep = Some(Arc::clone(self));
        }
        drop(keep);
        if room {
            self.tracker.room.notify_one();
        }
    }

    /// Seals the open batches that waited for room and now have it; true if any was. Returns
    /// the producer's keep-alive once nothing waits (dropped by the caller, outside the locks).
    fn seal_waiting(&self) -> (bool, Option<Arc<Shared>>) {
        let mut acc = self.lock();
        let waiting: Vec<PartitionKey> = self.tracker.unanswered().waiting.iter().cloned().collect();
        let mut sealed = false;
        for (topic, partition) in waiting {
            if !self.has_room(&topic, partition) {
                continue;
            }
            // `take` clears the mark; a mark without an open batch is cleared here.
            if self.seal(&mut acc, &topic, partition) {
                sealed = true;
            } else {
                self.tracker.unanswered().waiting.remove(&(topic, partition));
            }
        }
        let nothing_waits = self.tracker.unanswered().waiting.is_empty();
        let released = if nothing_waits {
            self.tracker
                .keep_alive
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        } else {
            None
        };
        (sealed || !acc.ready.is_empty(), released)
    }

    /// Seals a partition's open batch into the ready queue; true if there was one.
    fn seal(&self, acc: &mut Accumulator, topic: &str, partition: i32) -> bool {
        let seq = acc.next_seq;
        let Some(state) = acc.topics.get_mut(topic) else {
            return false;
        };
        let Some(sealed) = self.take(state, partition, seq) else {
            return false;
        };
        acc.next_seq += 1;
        acc.ready.push_back(sealed);
        true
    }

    fn start_linger(self: &Arc<Self>, topic: String, partition: i32, id: u64) {
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(shared.config.linger).await;
            let sealed = {
                let mut acc = shared.lock();
                let same = acc
                    .topics
                    .get(&topic)
                    .and_then(|s| s.open.get(&partition))
                    .is_some_and(|o| o.id == id);
                let name = acc.topics.get(&topic).map(|s| Arc::clone(&s.name));
                match name {
                    Some(name) if same && !shared.has_room(&name, partition) => {
                        shared.wait_for_room(name, partition);
                        false
                    }
                    _ => same && shared.seal(&mut acc, &topic, partition),
                }
            };
            if sealed {
                let _ = shared.dispatch().await;
            }
        });
    }

    /// Removes and encodes the open batch of a partition.
    fn take(&self, state: &mut TopicState, partition: i32, seq: u64) -> Option<Sealed> {
        let open = state.open.remove(&partition)?;
        if state.sticky == Some(partition) {
            state.sticky = None;
        }
        let permit = open.permit;
        let records = open.builder.len();
        let opened_at = open.opened_at;
        let sealed = |bytes: Bytes| Sealed {
            topic: Arc::clone(&state.name),
            partition,
            bytes,
            attempts: 0,
            sealed_at: opened_at,
            slot: Arc::clone(&open.slot),
            tracker: Arc::clone(&self.tracker),
            seq,
            records,
            producer: None,
            sent: false,
            completed: false,
            _permit: permit,
        };
        self.tracker.lock().insert(seq);
        {
            let mut u = self.tracker.unanswered();
            let key = (Arc::clone(&state.name), partition);
            // The last mark gone: the sealer lets go of the producer it kept alive for it.
            if u.waiting.remove(&key) && u.waiting.is_empty() {
                self.tracker.room.notify_one();
            }
            *u.count.entry(key).or_default() += 1;
        }
        match open.builder.build() {
            Ok(bytes) => Some(sealed(bytes)),
            Err(e) => {
                sealed(Bytes::new()).complete(Err(ClientError::from(e)));
                None
            }
        }
    }

    /// Seals every open batch, for `flush`; returns the sequence of the last batch sealed so
    /// far (everything sent before the call is at or below it).
    pub(crate) fn seal_all(&self) -> Option<u64> {
        let mut acc = self.lock();
        let open: Vec<(String, i32)> = acc
            .topics
            .iter()
            .flat_map(|(t, s)| s.open.keys().map(move |p| (t.clone(), *p)))
            .collect();
        for (topic, partition) in open {
            self.seal(&mut acc, &topic, partition);
        }
        acc.next_seq.checked_sub(1)
    }

    /// Moves every ready batch to the sender in sealing order, waiting if its queue is full.
    pub(crate) async fn dispatch(&self) -> Result<()> {
        let _one_at_a_time = self.dispatching.lock().await;
        loop {
            let Some(sealed) = self.lock().ready.pop_front() else {
                return Ok(());
            };
            if let Err(mpsc::error::SendError(sealed)) = self.to_sender.send(sealed).await {
                drop(sealed);
                return Err(ClientError::Closed);
            }
        }
    }
}

impl Drop for Shared {
    /// Lets the sealer see that the producer is gone.
    fn drop(&mut self) {
        self.tracker.room.notify_one();
    }
}

/// Seals open batches that waited for room once answers free it, and moves them to the
/// sender. One per producer; it ends once the producer is gone.
pub(crate) async fn run_sealer(shared: std::sync::Weak<Shared>, tracker: Arc<Tracker>) {
    loop {
        tracker.room.notified().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let (sealed, released) = shared.seal_waiting();
        // A dispatch that fails (the sender is gone) fails the batch it held; the next answer
        // or drop wakes this task again for the rest.
        if sealed {
            let _ = shared.dispatch().await;
        }
        drop(released);
    }
}
