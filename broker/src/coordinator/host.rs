//! Hosting coordinator state machines on the partitions of an internal topic.
//!
//! For each partition of its topic this broker leads, a [`Host`] keeps one loaded
//! [`Shard`]: the state machine replayed from that partition, tagged with the Raft term it
//! was loaded in. A shard is used only while the partition's leader is this broker in that
//! same term; a new term (even one this broker leads again) replays the partition anew,
//! since another leader may have written in between. Loading waits until the high
//! watermark reaches the log end (the new leader's first entry committed, so every record
//! an earlier leader committed is below it), replays on the blocking pool, and only then
//! answers. A write that fails (leadership lost, a timeout) marks the shard lost: its
//! records may still commit later, so the next request replays rather than trust memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use conveyor_storage::batch::{BatchBuilder, BatchIter, Compression, Record, ValidatedBatch};
use conveyor_storage::log::PartitionLog;
use futures::future::{BoxFuture, FutureExt, Shared};

use super::{Change, StateMachine};
use crate::blocking::blocking;
use crate::controller::Registry;
use crate::error::{BrokerError, Result};
use crate::replica::partition::Partition;
use crate::replica::proposal::Acks;

/// How long a request waits for a new leader's partition to be committed and replayed
/// before it is told to retry.
const LOAD_WAIT: Duration = Duration::from_secs(10);
/// How long a write waits for its commit.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the log per step of a replay.
const REPLAY_READ_BYTES: usize = 1 << 20;
/// How long an append may stay unanswered before it stops holding a reload back.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// Most record bytes one write may make: a group change or commit past it is refused.
pub const MAX_WRITE_BYTES: usize = 16 << 20;
/// Records per batch of a write, in bytes (a write of more is several batches).
const BATCH_BYTES: usize = 1 << 20;
/// Bytes a record's framing adds to its key and value, at most.
const RECORD_OVERHEAD: usize = 32;

/// A load under way, awaited by every request for its partition.
type Loading<S> = Shared<BoxFuture<'static, std::result::Result<Arc<Shard<S>>, String>>>;
/// How long a load may wait for its partition's records to be committed.
const LOAD_LIMIT: Duration = Duration::from_secs(60);

/// Who is asking, for error messages: the id the request is about.
pub type Subject<'a> = &'a str;

/// One state machine, loaded from one partition in one term.
#[derive(Debug)]
pub struct Shard<S> {
    pub index: i32,
    pub term: u64,
    partition: Arc<Partition>,
    state: tokio::sync::Mutex<S>,
    lost: AtomicBool,
    /// Appends queued and not yet answered. Each runs in a task of its own, so a request
    /// that gives up does not cut it short; a lost shard is not replaced while any is left
    /// (a replay before it lands would miss a record that then commits).
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

impl<S: StateMachine> Shard<S> {
    /// The state, held for the whole of a request that reads or changes it: changes are
    /// written and applied under the lock, so they reach the log in the order they apply.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, S> {
        self.state.lock().await
    }

    /// Whether this shard still serves: its partition led here in its term, no write lost.
    pub fn is_current(&self) -> bool {
        if self.lost.load(Ordering::Acquire) {
            return false;
        }
        self.partition.term() == self.term && self.partition.is_leader()
    }

    /// Appends `changes`, waits for their commit, then applies them to `state` (the guard
    /// from [`Shard::lock`]). Changes too large for one write are refused with nothing
    /// written. The append runs in a task of its own; anything but a clean finish marks the
    /// shard lost (an error, a timeout, or the caller dropping this future mid-way: the
    /// records may still commit), and the next request reloads it from the log once the
    /// append was answered. Changes past 1 MiB go in several batches, which a failover can
    /// cut after any of them.
    pub async fn write(&self, state: &mut S, changes: Vec<Change>) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        if !self.is_current() {
            return Err(not_current());
        }
        let batches = batches_of(&changes)?;
        let unsettled = Unsettled {
            lost: &self.lost,
            settled: false,
        };
        let outcome = tokio::time::timeout(WRITE_TIMEOUT, self.append(batches)).await;
        let failed = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(write_timed_out()),
        };
        if let Some(e) = failed {
            return Err(e);
        }
        for c in &changes {
            if let Err(reason) = state.apply(&c.key, c.value.as_deref()) {
                // The record was just built by the coordinator: failing to read it back is a
                // bug; reloading from the log gives the state every other replica will see.
                return Err(BrokerError::Internal(format!(
                    "a coordinator record it wrote: {reason}"
                )));
            }
        }
        unsettled.settle();
        Ok(())
    }

    /// Appends `batches` in a task of its own, counted in `pending` until answered.
    async fn append(&self, batches: Vec<ValidatedBatch>) -> Result<()> {
        let partition = Arc::clone(&self.partition);
        let term = self.term;
        let pending = Arc::clone(&self.pending);
        pending.fetch_add(1, Ordering::AcqRel);
        let task = tokio::spawn(async move {
            let appended = async {
                let reply = partition
                    .enqueue_in(Some(term), batches, Acks::All, None, Vec::new(), Some(WRITE_TIMEOUT))
                    .await?;
                reply.await.map_err(|_| BrokerError::ShuttingDown)??;
                Ok(())
            };
            // Bounded: an append the partition never answers stops counting after this.
            let outcome = tokio::time::timeout(SETTLE_LIMIT, appended)
                .await
                .unwrap_or_else(|_| Err(BrokerError::Internal("a coordinator append was never answered".into())));
            pending.fetch_sub(1, Ordering::AcqRel);
            outcome
        });
        task.await
            .map_err(|e| BrokerError::Internal(format!("coordinator append task: {e}")))?
    }

    /// For a state machine that changes its memory first (the share coordinator, whose
    /// acknowledgements must not wait for each other's commits): appends records of changes
    /// already made to the state. Call it with the state lock held, so records reach the
    /// log in the order the changes were made; await the returned [`Committed`] after
    /// releasing the lock. Memory is then ahead of the log, so anything but a commit (an
    /// error, a timeout, this future or the [`Committed`] dropped before the append was
    /// queued) marks the shard lost, and the next request rebuilds it from what committed.
    pub async fn append_ahead(self: &Arc<Self>, changes: &[Change]) -> Result<Committed> {
        if changes.is_empty() {
            return Ok(Committed(None));
        }
        let refuse = |e: BrokerError| {
            self.lost.store(true, Ordering::Release);
            Err(e)
        };
        if !self.is_current() {
            return refuse(not_current());
        }
        let batches = match batches_of(changes) {
            Ok(b) => b,
            Err(e) => return refuse(e),
        };
        let mut queued = Queueing {
            shard: Arc::clone(self),
            done: false,
        };
        self.pending.fetch_add(1, Ordering::AcqRel);
        let enqueued = self
            .partition
            .enqueue_in(
                Some(self.term),
                batches,
                Acks::All,
                None,
                Vec::new(),
                Some(WRITE_TIMEOUT),
            )
            .await;
        queued.done = true;
        let reply = match enqueued {
            Ok(reply) => reply,
            Err(e) => {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                return refuse(e);
            }
        };
        let shard = Arc::clone(self);
        let task = tokio::spawn(async move {
            let outcome = match tokio::time::timeout(WRITE_TIMEOUT, reply).await {
                Ok(Ok(Ok(_))) => Ok(()),
                Ok(Ok(Err(e))) => Err(e),
                Ok(Err(_)) => Err(BrokerError::ShuttingDown),
                Err(_) => Err(write_timed_out()),
            };
            if outcome.is_err() {
                shard.lost.store(true, Ordering::Release);
            }
            shard.pending.fetch_sub(1, Ordering::AcqRel);
            outcome
        });
        Ok(Committed(Some(task)))
    }

    /// Whether appends of this shard are still under way.
    fn settling(&self) -> bool {
        self.pending.load(Ordering::Acquire) > 0
    }
}

/// A write asked of a shard that no longer serves.
fn not_current() -> BrokerError {
    BrokerError::CoordinatorLoading {
        group: String::new(),
        state: "lost leadership of its partition".into(),
    }
}

/// A write not committed within [`WRITE_TIMEOUT`].
fn write_timed_out() -> BrokerError {
    BrokerError::TimedOut {
        what: "a coordinator write".into(),
        after: WRITE_TIMEOUT,
        state: "not committed by a quorum of its partition's replicas yet; it may still take effect".into(),
    }
}

/// The commit of records [`Shard::append_ahead`] queued.
#[derive(Debug)]
pub struct Committed(Option<tokio::task::JoinHandle<Result<()>>>);

impl Committed {
    /// Nothing to wait for.
    pub fn done() -> Committed {
        Committed(None)
    }

    /// Waits for the commit (the shard is marked lost if it fails, whether or not this is
    /// awaited).
    pub async fn wait(self) -> Result<()> {
        match self.0 {
            None => Ok(()),
            Some(task) => task
                .await
                .map_err(|e| BrokerError::Internal(format!("coordinator append task: {e}")))?,
        }
    }
}

/// Marks a shard lost when an [`Shard::append_ahead`] is dropped while queueing: its
/// records may or may not be queued, and memory already holds them. The append stays
/// counted as pending for one write timeout, so a reload does not start before a record
/// that was queued after all could land.
struct Queueing<S: StateMachine> {
    shard: Arc<Shard<S>>,
    done: bool,
}

impl<S: StateMachine> Drop for Queueing<S> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.shard.lost.store(true, Ordering::Release);
        let pending = Arc::clone(&self.shard.pending);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::time::sleep(WRITE_TIMEOUT).await;
                pending.fetch_sub(1, Ordering::AcqRel);
            });
        } else {
            pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Marks a shard lost unless settled: dropped by a write that did not finish cleanly.
struct Unsettled<'a> {
    lost: &'a AtomicBool,
    settled: bool,
}

impl Unsettled<'_> {
    fn settle(mut self) {
        self.settled = true;
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.lost.store(true, Ordering::Release);
        }
    }
}

/// `changes` as batches of at most [`BATCH_BYTES`] each, all appended by one write;
/// refused (INVALID_ARGUMENT, nothing written) past [`MAX_WRITE_BYTES`] in all.
fn batches_of(changes: &[Change]) -> Result<Vec<ValidatedBatch>> {
    let total: usize = changes
        .iter()
        .map(|c| c.key.len() + c.value.as_ref().map_or(0, Bytes::len) + RECORD_OVERHEAD)
        .sum();
    if total > MAX_WRITE_BYTES {
        return Err(BrokerError::InvalidRequest(format!(
            "the change needs {total} bytes of coordinator records, more than one write may take ({MAX_WRITE_BYTES}); make it smaller (fewer partitions, shorter names or metadata)"
        )));
    }
    let internal = |e: &dyn std::fmt::Display| BrokerError::Internal(format!("coordinator batch: {e}"));
    let now = conveyor_storage::unix_millis();
    let mut batches = Vec::new();
    let mut builder = BatchBuilder::new(Compression::None);
    for c in changes {
        if !builder.is_empty() && builder.estimated_size() >= BATCH_BYTES {
            let full = std::mem::replace(&mut builder, BatchBuilder::new(Compression::None));
            let bytes = full.build().map_err(|e| internal(&e))?;
            batches.push(ValidatedBatch::new(bytes, MAX_WRITE_BYTES).map_err(|e| internal(&e))?);
        }
        builder.push(&Record {
            timestamp: now,
            key: Some(c.key.clone()),
            value: c.value.clone(),
            headers: Vec::new(),
        });
    }
    let bytes = builder.build().map_err(|e| internal(&e))?;
    batches.push(ValidatedBatch::new(bytes, MAX_WRITE_BYTES).map_err(|e| internal(&e))?);
    Ok(batches)
}

/// The shards of one internal topic on this broker.
pub struct Host<S> {
    topic: &'static str,
    registry: Arc<Registry>,
    make: Arc<dyn Fn() -> S + Send + Sync>,
    shards: Mutex<HashMap<i32, Arc<Shard<S>>>>,
    /// The load under way per partition, and the term it is for.
    loading: Mutex<HashMap<i32, (u64, Loading<S>)>>,
}

impl<S> std::fmt::Debug for Host<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl<S: StateMachine> Host<S> {
    pub fn new(topic: &'static str, registry: Arc<Registry>, make: impl Fn() -> S + Send + Sync + 'static) -> Host<S> {
        Host {
            topic,
            registry,
            make: Arc::new(make),
            shards: Mutex::default(),
            loading: Mutex::default(),
        }
    }

    pub fn topic(&self) -> &'static str {
        self.topic
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    fn shards(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Arc<Shard<S>>>> {
        self.shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The loaded shards that still serve; drops the others (leadership moved).
    pub fn current(&self) -> Vec<Arc<Shard<S>>> {
        let mut shards = self.shards();
        shards.retain(|_, s| s.is_current());
        shards.values().cloned().collect()
    }

    /// Whether partition `index` is loaded for the term its replica here is in.
    pub fn is_loaded(&self, index: i32) -> bool {
        self.shards().get(&index).is_some_and(|s| s.is_current())
    }

    /// The partitions of the topic this broker leads now.
    pub fn led_here(&self) -> Vec<i32> {
        let Ok(topic) = self.registry.get(self.topic) else {
            return Vec::new();
        };
        topic
            .local
            .iter()
            .filter(|(_, p)| p.is_leader())
            .map(|(i, _)| *i)
            .collect()
    }

    /// The shard of partition `index`, loading it if this broker leads the partition in a
    /// term it has not loaded yet. `subject` (the group id, say) names the request in errors,
    /// which say where the coordinator is instead. A load runs in a task of its own, shared
    /// by every request that waits for it: a request that gives up (after [`LOAD_WAIT`], or
    /// its caller gone) leaves the load going for the next one.
    pub async fn shard(&self, index: i32, subject: Subject<'_>) -> Result<Arc<Shard<S>>> {
        let partition = self.leading_partition(index, subject)?;
        let term = partition.term();
        if let Some(s) = self.shards().get(&index) {
            if s.term == term && s.is_current() {
                return Ok(Arc::clone(s));
            }
            if s.settling() {
                return Err(BrokerError::CoordinatorLoading {
                    group: subject.to_string(),
                    state: format!(
                        "is finishing a write to partition {index} of {} before reloading it",
                        self.topic
                    ),
                });
            }
        }
        let load = {
            let mut loading = self.loading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match loading.get(&index) {
                Some((t, load)) if *t == term => load.clone(),
                _ => {
                    let task = tokio::spawn(load(self.topic, index, partition, term, Arc::clone(&self.make)));
                    let load: Loading<S> = async move {
                        match task.await {
                            Ok(loaded) => loaded,
                            Err(e) => Err(format!("the load task failed: {e}")),
                        }
                    }
                    .boxed()
                    .shared();
                    loading.insert(index, (term, load.clone()));
                    load
                }
            }
        };
        let loaded = tokio::time::timeout(LOAD_WAIT, load).await;
        let forget = || {
            let mut loading = self.loading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if loading.get(&index).is_some_and(|(t, _)| *t == term) {
                loading.remove(&index);
            }
        };
        match loaded {
            Ok(Ok(shard)) => {
                forget();
                let mut shards = self.shards();
                let kept = shards.get(&index).filter(|s| s.term >= term && s.is_current()).cloned();
                if let Some(kept) = kept {
                    // Loaded meanwhile by another request (same term), or a newer term's.
                    return if kept.term == term {
                        Ok(kept)
                    } else {
                        Err(BrokerError::CoordinatorLoading {
                            group: subject.to_string(),
                            state: format!("moved to a newer term of partition {index} of {}", self.topic),
                        })
                    };
                }
                if !shard.is_current() {
                    return Err(BrokerError::CoordinatorLoading {
                        group: subject.to_string(),
                        state: format!("lost partition {index} of {} right after loading it", self.topic),
                    });
                }
                shards.insert(index, Arc::clone(&shard));
                Ok(shard)
            }
            Ok(Err(reason)) => {
                // Failed: the next request starts another load.
                forget();
                Err(BrokerError::CoordinatorLoading {
                    group: subject.to_string(),
                    state: reason,
                })
            }
            Err(_) => Err(BrokerError::CoordinatorLoading {
                group: subject.to_string(),
                state: format!(
                    "is still loading partition {index} of {} after {LOAD_WAIT:?}",
                    self.topic
                ),
            }),
        }
    }

    /// This broker's replica of partition `index` if it leads it, or where to go.
    fn leading_partition(&self, index: i32, subject: Subject<'_>) -> Result<Arc<Partition>> {
        let topic = self
            .registry
            .get(self.topic)
            .map_err(|_| BrokerError::CoordinatorLoading {
                group: subject.to_string(),
                state: format!("has no {} topic yet (FindCoordinator creates it)", self.topic),
            })?;
        let partition = self
            .registry
            .replica(&topic, index)
            .map_err(|e| self.elsewhere(e, subject))?;
        partition.ensure_leader().map_err(|e| self.elsewhere(e, subject))?;
        Ok(partition)
    }

    /// A partition refusal as the coordinator's answer: where the coordinator is, or retry.
    fn elsewhere(&self, e: BrokerError, subject: Subject<'_>) -> BrokerError {
        match e {
            BrokerError::NotLeader { leader, address, .. } => BrokerError::NotCoordinator {
                group: subject.to_string(),
                me: self.registry.transport().node_id(),
                coordinator: leader,
                address,
            },
            other => BrokerError::CoordinatorLoading {
                group: subject.to_string(),
                state: format!("is not available here ({other})"),
            },
        }
    }
}

/// Names `subject` (a group id) in a substrate error that could not (the substrate's own
/// errors leave it empty).
pub fn name_subject(e: BrokerError, subject: Subject<'_>) -> BrokerError {
    match e {
        BrokerError::CoordinatorLoading { group, state } if group.is_empty() => BrokerError::CoordinatorLoading {
            group: subject.to_string(),
            state,
        },
        BrokerError::NotCoordinator {
            group,
            me,
            coordinator,
            address,
        } if group.is_empty() => BrokerError::NotCoordinator {
            group: subject.to_string(),
            me,
            coordinator,
            address,
        },
        other => other,
    }
}

/// Where the coordinator of partition `index` of internal topic `topic` is: the leader of
/// that partition and its client address; COORDINATOR_LOADING naming `subject` while it has
/// no leader.
pub fn coordinator_at(
    registry: &Registry,
    topic: &crate::controller::Topic,
    index: i32,
    subject: Subject<'_>,
) -> Result<(u32, String)> {
    let leader = match registry.replica(topic, index) {
        Ok(p) => p.leader(),
        Err(BrokerError::NotLeader { leader, .. }) => leader,
        Err(e) => return Err(e),
    };
    if leader == 0 {
        return Err(BrokerError::CoordinatorLoading {
            group: subject.to_string(),
            state: format!("is being elected (partition {index} of {} has no leader)", topic.name),
        });
    }
    Ok((leader, registry.transport().client_address(leader).unwrap_or_default()))
}

/// Loads partition `index` of `topic` for `term`: waits for its records to be committed,
/// replays them, and gives up past [`LOAD_LIMIT`] or if the term moves on.
async fn load<S: StateMachine>(
    topic: &'static str,
    index: i32,
    partition: Arc<Partition>,
    term: u64,
    make: Arc<dyn Fn() -> S + Send + Sync>,
) -> std::result::Result<Arc<Shard<S>>, String> {
    let started = Instant::now();
    let moved = || format!("lost partition {index} of {topic} while loading it");
    // The partition's records are all committed once the high watermark reaches the log
    // end: only this coordinator appends to it, and it appends nothing while loading.
    let mut hw_moved = partition.watch_high_watermark();
    loop {
        if partition.term() != term || !partition.is_leader() {
            return Err(moved());
        }
        if started.elapsed() > LOAD_LIMIT {
            return Err(format!(
                "partition {index} of {topic} has records not committed after {LOAD_LIMIT:?} (is a quorum of its replicas up?)"
            ));
        }
        let hw = partition.high_watermark();
        if hw >= partition.log().log_end_offset() {
            break;
        }
        // A timer too, since the log end may move back.
        let _ = tokio::time::timeout(Duration::from_millis(50), hw_moved.changed()).await;
    }
    let hw = partition.high_watermark();
    let log = partition.log();
    let make_state = make();
    let (mut state, replayed, skipped) = blocking(move || replay(&log, hw, make_state))
        .await
        .map_err(|e| format!("could not replay partition {index} of {topic}: {e}"))?;
    if partition.term() != term || !partition.is_leader() {
        return Err(moved());
    }
    state.loaded(Instant::now());
    tracing::info!(
        topic,
        partition = index,
        term,
        records = replayed,
        skipped,
        up_to = hw,
        millis = started.elapsed().as_millis() as u64,
        "coordinator loaded"
    );
    Ok(Arc::new(Shard {
        index,
        term,
        partition,
        state: tokio::sync::Mutex::new(state),
        lost: AtomicBool::new(false),
        pending: Arc::default(),
    }))
}

/// Applies every record of `log` below `hw` to `state`. Returns the state, the records
/// applied and the records skipped (unreadable: reported, not fatal). Blocking.
fn replay<S: StateMachine>(log: &PartitionLog, hw: u64, mut state: S) -> Result<(S, u64, u64)> {
    let fail = |e: &dyn std::fmt::Display| BrokerError::Internal(e.to_string());
    let (mut applied, mut skipped) = (0u64, 0u64);
    let mut from = log.log_start_offset();
    while from < hw {
        let bytes = log.read_up_to(from, REPLAY_READ_BYTES, hw).map_err(|e| fail(&e))?;
        if bytes.is_empty() {
            break;
        }
        let before = from;
        for batch in BatchIter::new(bytes) {
            let batch = batch.map_err(|e| fail(&e))?;
            from = batch.header().next_offset();
            if batch.header().is_control() {
                continue;
            }
            for record in batch.records().map_err(|e| fail(&e))? {
                let record = record.map_err(|e| fail(&e))?;
                if record.offset >= hw {
                    break;
                }
                let key: Bytes = record.key.unwrap_or_default();
                match state.apply(&key, record.value.as_deref()) {
                    Ok(()) => applied += 1,
                    Err(reason) => {
                        skipped += 1;
                        tracing::warn!(offset = record.offset, %reason, "coordinator record skipped at replay");
                    }
                }
            }
        }
        if from <= before {
            return Err(fail(&format!("the log did not move past offset {before}")));
        }
    }
    Ok((state, applied, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(value_bytes: usize) -> Change {
        Change {
            key: Bytes::from_static(b"k"),
            value: Some(Bytes::from(vec![b'v'; value_bytes])),
        }
    }

    #[test]
    fn a_large_write_is_split_into_batches_and_one_too_large_refused_before_anything_is_written() {
        let batches = batches_of(&[change(10)]).expect("one small change");
        assert_eq!(batches.len(), 1);
        let many: Vec<Change> = (0..40).map(|_| change(100 << 10)).collect();
        let batches = batches_of(&many).expect("4 MB of changes");
        assert!(batches.len() >= 4, "{} batches", batches.len());
        assert!(batches.iter().all(|b| b.bytes().len() <= BATCH_BYTES + (200 << 10)));
        let records: u32 = batches.iter().map(|b| b.header().record_count).sum();
        assert_eq!(records, 40, "every change is in one of the batches");
        let too_many: Vec<Change> = (0..200).map(|_| change(100 << 10)).collect();
        let e = batches_of(&too_many).expect_err("20 MB of changes");
        assert!(matches!(e, BrokerError::InvalidRequest(_)), "{e}");
    }
}
