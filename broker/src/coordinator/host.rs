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
/// Largest batch of records one write may make.
const MAX_WRITE_BYTES: usize = 8 << 20;

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

    /// Appends `changes` as one batch, waits for its commit, then applies them to `state`
    /// (the guard from [`Shard::lock`]). On failure nothing is applied and the shard is
    /// marked lost: the next request reloads it from the log.
    pub async fn write(&self, state: &mut S, changes: Vec<Change>) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        if !self.is_current() {
            return Err(BrokerError::CoordinatorLoading {
                group: String::new(),
                state: "lost leadership of its partition".into(),
            });
        }
        let outcome = tokio::time::timeout(WRITE_TIMEOUT, self.append(&changes)).await;
        let failed = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(BrokerError::TimedOut {
                what: "a coordinator write".into(),
                after: WRITE_TIMEOUT,
                state: "not committed by a quorum of its partition's replicas yet; it may still take effect".into(),
            }),
        };
        if let Some(e) = failed {
            self.lost.store(true, Ordering::Release);
            return Err(e);
        }
        for c in &changes {
            if let Err(reason) = state.apply(&c.key, c.value.as_deref()) {
                // The record was just built by the coordinator: failing to read it back is a
                // bug; reloading from the log gives the state every other replica will see.
                self.lost.store(true, Ordering::Release);
                return Err(BrokerError::Internal(format!(
                    "a coordinator record it wrote: {reason}"
                )));
            }
        }
        Ok(())
    }

    async fn append(&self, changes: &[Change]) -> Result<()> {
        let mut builder = BatchBuilder::new(Compression::None);
        let now = conveyor_storage::unix_millis();
        for c in changes {
            builder.push(&Record {
                timestamp: now,
                key: Some(c.key.clone()),
                value: c.value.clone(),
                headers: Vec::new(),
            });
        }
        let internal = |e: &dyn std::fmt::Display| BrokerError::Internal(format!("coordinator batch: {e}"));
        let bytes = builder.build().map_err(|e| internal(&e))?;
        let batch = ValidatedBatch::new(bytes, MAX_WRITE_BYTES).map_err(|e| internal(&e))?;
        let reply = self
            .partition
            .enqueue(vec![batch], Acks::All, None, Vec::new(), Some(WRITE_TIMEOUT))
            .await?;
        reply.await.map_err(|_| BrokerError::ShuttingDown)??;
        Ok(())
    }
}

/// The shards of one internal topic on this broker.
pub struct Host<S> {
    topic: &'static str,
    registry: Arc<Registry>,
    make: Box<dyn Fn() -> S + Send + Sync>,
    shards: Mutex<HashMap<i32, Arc<Shard<S>>>>,
    /// One load at a time per partition.
    loading: Mutex<HashMap<i32, Arc<tokio::sync::Mutex<()>>>>,
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
            make: Box::new(make),
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
    /// which say where the coordinator is instead.
    pub async fn shard(&self, index: i32, subject: Subject<'_>) -> Result<Arc<Shard<S>>> {
        let partition = self.leading_partition(index, subject)?;
        let term = partition.term();
        if let Some(s) = self.shards().get(&index).filter(|s| s.term == term && s.is_current()) {
            return Ok(Arc::clone(s));
        }
        let lock = {
            let mut loading = self.loading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(loading.entry(index).or_default())
        };
        let _one_load = lock.lock().await;
        if let Some(s) = self.shards().get(&index).filter(|s| s.term == term && s.is_current()) {
            return Ok(Arc::clone(s));
        }
        let shard = tokio::time::timeout(LOAD_WAIT, self.load(index, partition, term, subject))
            .await
            .map_err(|_| BrokerError::CoordinatorLoading {
                group: subject.to_string(),
                state: format!(
                    "is still loading partition {index} of {} after {LOAD_WAIT:?}",
                    self.topic
                ),
            })??;
        self.shards().insert(index, Arc::clone(&shard));
        Ok(shard)
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

    async fn load(
        &self,
        index: i32,
        partition: Arc<Partition>,
        term: u64,
        subject: Subject<'_>,
    ) -> Result<Arc<Shard<S>>> {
        let started = Instant::now();
        let moved = || BrokerError::CoordinatorLoading {
            group: subject.to_string(),
            state: format!("lost partition {index} of {} while loading it", self.topic),
        };
        // The partition's records are all committed once the high watermark reaches the log
        // end: only this coordinator appends to it, and it appends nothing while loading.
        let mut hw_moved = partition.watch_high_watermark();
        loop {
            if partition.term() != term || !partition.is_leader() {
                return Err(moved());
            }
            let hw = partition.high_watermark();
            if hw >= partition.log().log_end_offset() {
                break;
            }
            // Bounded by the caller's LOAD_WAIT; a timer too, since the log end may move back.
            let _ = tokio::time::timeout(Duration::from_millis(50), hw_moved.changed()).await;
        }
        let hw = partition.high_watermark();
        let log = partition.log();
        let make_state = (self.make)();
        let (topic, records) = (self.topic, index);
        let (mut state, replayed, skipped) =
            blocking(move || replay(&log, hw, make_state))
                .await
                .map_err(|e| BrokerError::CoordinatorLoading {
                    group: subject.to_string(),
                    state: format!("could not replay partition {index} of {topic}: {e}"),
                })?;
        if partition.term() != term || !partition.is_leader() {
            return Err(moved());
        }
        state.loaded(Instant::now());
        tracing::info!(
            topic,
            partition = records,
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
        }))
    }
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
