//! One partition: its log, the task that owns appends to it, and its high watermark.
//!
//! # Concurrency
//! Appends reach the owner task over a bounded mailbox; when it is full, producers wait
//! (the stream backs up to the client). The owner drains what is queued, writes it in one
//! blocking job off the reactor, applies the flush policy once for the whole group (one fsync
//! covers every request in it), then answers. Reads do not go through the owner: the log
//! serves them concurrently, bounded by the high watermark.
//!
//! # Invariants
//! The high watermark only moves forward and never passes what the topic's flush policy has
//! made durable, so a consumer never sees a record that a crash could take back.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use conveyor_storage::batch::ValidatedBatch;
use conveyor_storage::{FlushPolicy, LogConfig, PartitionLog};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{BrokerError, Result};
use crate::metrics::Metrics;

/// Most requests one owner round writes before it fsyncs and answers.
const MAX_REQUESTS_PER_ROUND: usize = 512;

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
    pub reply: oneshot::Sender<Result<AppendOutcome>>,
}

#[derive(Debug)]
pub struct Partition {
    pub topic: String,
    pub index: i32,
    pub log: Arc<PartitionLog>,
    mailbox: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    high_watermark: watch::Receiver<u64>,
    owner: Mutex<Option<JoinHandle<()>>>,
}

impl Partition {
    /// Opens (or creates) the log and starts its owner task. Blocking: call off the reactor.
    pub fn open(
        topic: &str,
        index: i32,
        dir: &std::path::Path,
        config: LogConfig,
        queue_depth: usize,
        metrics: Arc<Metrics>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Arc<Partition>> {
        let log = PartitionLog::open(dir, config).map_err(|e| BrokerError::from_log(topic, index, e))?;
        let log = Arc::new(log);
        let (hw_tx, hw_rx) = watch::channel(log.log_end_offset());
        let (tx, rx) = mpsc::channel(queue_depth);
        let owner = Owner {
            topic: topic.to_string(),
            index,
            log: Arc::clone(&log),
            high_watermark: hw_tx,
            metrics,
        };
        let handle = runtime.spawn(owner.run(rx));
        Ok(Arc::new(Partition {
            topic: topic.to_string(),
            index,
            log,
            mailbox: Mutex::new(Some(tx)),
            high_watermark: hw_rx,
            owner: Mutex::new(Some(handle)),
        }))
    }

    pub fn high_watermark(&self) -> u64 {
        *self.high_watermark.borrow()
    }

    /// A receiver that wakes when the high watermark moves, for long-polling fetches.
    pub fn watch_high_watermark(&self) -> watch::Receiver<u64> {
        self.high_watermark.clone()
    }

    fn sender(&self) -> Result<mpsc::Sender<AppendRequest>> {
        let guard = self.mailbox.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.clone().ok_or(BrokerError::ShuttingDown)
    }

    /// Queues validated batches for appending, waiting while the mailbox is full. The returned
    /// receiver resolves when the append meets `acks`.
    pub async fn enqueue(
        &self,
        batches: Vec<ValidatedBatch>,
        acks: Acks,
    ) -> Result<oneshot::Receiver<Result<AppendOutcome>>> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(AppendRequest { batches, acks, reply })
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        Ok(rx)
    }

    /// Stops taking appends, lets the owner finish what is queued, and waits for it.
    pub async fn stop(&self) {
        self.mailbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let handle = self
            .owner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && let Err(e) = handle.await
        {
            tracing::error!(topic = %self.topic, partition = self.index, error = %e, "partition owner task failed");
        }
    }
}

struct Owner {
    topic: String,
    index: i32,
    log: Arc<PartitionLog>,
    high_watermark: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

/// A request after its batches were written: what to answer once the round is durable.
struct Written {
    reply: oneshot::Sender<Result<AppendOutcome>>,
    outcome: Result<AppendOutcome>,
}

impl Owner {
    async fn run(self, mut rx: mpsc::Receiver<AppendRequest>) {
        let this = Arc::new(self);
        while let Some(first) = rx.recv().await {
            let mut round = vec![first];
            while round.len() < MAX_REQUESTS_PER_ROUND {
                match rx.try_recv() {
                    Ok(r) => round.push(r),
                    Err(_) => break,
                }
            }
            let owner = Arc::clone(&this);
            let result = tokio::task::spawn_blocking(move || owner.write_round(round)).await;
            if let Err(e) = result {
                tracing::error!(topic = %this.topic, partition = this.index, error = %e, "append round panicked");
            }
        }
        tracing::debug!(topic = %this.topic, partition = this.index, "partition owner stopped");
    }

    /// Writes every request of the round, answers `acks=leader` at once, applies the flush
    /// policy once, then answers `acks=all` and advances the high watermark.
    fn write_round(&self, round: Vec<AppendRequest>) {
        let mut pending = Vec::with_capacity(round.len());
        for request in round {
            let outcome = self.append_all(&request.batches);
            match request.acks {
                Acks::All => pending.push(Written {
                    reply: request.reply,
                    outcome,
                }),
                Acks::Leader | Acks::None => drop(request.reply.send(outcome)),
            }
        }
        let end = self.log.log_end_offset();
        let started = Instant::now();
        let flushed = self.log.apply_flush_policy(end);
        if self.log.flush_policy() != FlushPolicy::Os {
            self.metrics.fsync_latency.observe(started.elapsed());
        }
        match flushed {
            Ok(()) => {
                self.high_watermark.send_if_modified(|hw| {
                    let moved = end > *hw;
                    *hw = (*hw).max(end);
                    moved
                });
                for w in pending {
                    drop(w.reply.send(w.outcome));
                }
            }
            Err(e) => {
                tracing::error!(topic = %self.topic, partition = self.index, error = %e, "flush failed");
                for w in pending {
                    let err = BrokerError::Storage {
                        topic: self.topic.clone(),
                        partition: self.index,
                        source: conveyor_storage::LogError::Poisoned { reason: e.to_string() },
                    };
                    drop(w.reply.send(Err(err)));
                }
            }
        }
    }

    fn append_all(&self, batches: &[ValidatedBatch]) -> Result<AppendOutcome> {
        let mut outcome: Option<AppendOutcome> = None;
        for batch in batches {
            let info = self
                .log
                .append_validated_unsynced(batch)
                .map_err(|e| BrokerError::from_log(&self.topic, self.index, e))?;
            self.metrics.bytes_in.add(batch.bytes().len() as u64);
            self.metrics.records_in.add(u64::from(info.record_count));
            outcome = Some(AppendOutcome {
                base_offset: outcome.map_or(info.base_offset, |o| o.base_offset),
                last_offset: info.last_offset,
            });
        }
        outcome.ok_or_else(|| BrokerError::InvalidRequest("no batch to append".into()))
    }
}
