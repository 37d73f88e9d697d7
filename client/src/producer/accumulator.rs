//! Open batches per partition, sealing by size or linger, and delivery slots.
//!
//! # Thread-safety
//! One mutex guards the open batches; it is held only to push a record or seal a batch,
//! never across an await.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use conveyor_storage::batch::{BatchBuilder, Record};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use super::{DeliveryFuture, ProducerConfig, ProducerRecord};
use crate::Client;
use crate::error::{ClientError, Result};

/// The outcome of one batch, shared by the delivery futures of its records.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    result: OnceLock<Result<Option<u64>>>,
    done: Notify,
}

impl Slot {
    /// The batch's base offset (`None` with acks=none), or why it failed.
    pub(crate) async fn wait(&self) -> Result<Option<u64>> {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if let Some(r) = self.result.get() {
                return r.clone();
            }
            done.await;
        }
    }
}

/// Counts batches not yet acknowledged, for `flush`.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pub outstanding: AtomicUsize,
    pub idle: Notify,
}

/// A batch ready to send.
#[derive(Debug)]
pub(crate) struct Sealed {
    pub topic: Arc<str>,
    pub partition: i32,
    pub bytes: Bytes,
    pub attempts: u32,
    /// When the batch was sealed: it fails once `delivery_timeout` has passed since.
    pub sealed_at: std::time::Instant,
    slot: Arc<Slot>,
    tracker: Arc<Tracker>,
    /// Returns the batch's bytes to the in-flight budget when dropped.
    _permit: OwnedSemaphorePermit,
}

impl Sealed {
    pub(crate) fn complete(self, result: Result<Option<u64>>) {
        let _ = self.slot.result.set(result);
        self.slot.done.notify_waiters();
        if self.tracker.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct Open {
    id: u64,
    topic: Arc<str>,
    builder: BatchBuilder,
    slot: Arc<Slot>,
    permit: Option<OwnedSemaphorePermit>,
    count: u32,
}

#[derive(Debug, Default)]
pub(crate) struct Accumulator {
    open: HashMap<String, HashMap<i32, Open>>,
    sticky: HashMap<String, i32>,
    next_id: u64,
    round_robin: u32,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub budget: Arc<Semaphore>,
    pub accumulator: Mutex<Accumulator>,
    pub tracker: Arc<Tracker>,
    pub to_sender: mpsc::Sender<Sealed>,
    pub client: Client,
    pub config: ProducerConfig,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Accumulator> {
        self.accumulator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keyless records stick to one partition until its batch is sealed, so they fill batches
    /// instead of spreading one record per partition.
    pub(crate) fn sticky_partition(&self, topic: &str, partitions: u32) -> i32 {
        let mut acc = self.lock();
        if let Some(p) = acc.sticky.get(topic) {
            return *p;
        }
        acc.round_robin = acc.round_robin.wrapping_add(1);
        let p = (acc.round_robin % partitions.max(1)) as i32;
        acc.sticky.insert(topic.to_string(), p);
        p
    }

    /// Adds a record; returns its delivery future and the batch if this record filled it.
    pub(crate) fn append(
        self: &Arc<Self>,
        record: ProducerRecord,
        partition: i32,
        permit: OwnedSemaphorePermit,
    ) -> (DeliveryFuture, Option<Sealed>) {
        let mut acc = self.lock();
        let is_new = !acc.open.get(&record.topic).is_some_and(|m| m.contains_key(&partition));
        if is_new {
            let id = acc.next_id;
            acc.next_id += 1;
            let open = Open {
                id,
                topic: Arc::from(record.topic.as_str()),
                builder: BatchBuilder::new(self.config.compression),
                slot: Arc::new(Slot::default()),
                permit: None,
                count: 0,
            };
            acc.open
                .entry(record.topic.clone())
                .or_default()
                .insert(partition, open);
            self.tracker.outstanding.fetch_add(1, Ordering::AcqRel);
            if !self.config.linger.is_zero() {
                self.start_linger(record.topic.clone(), partition, id);
            }
        }
        let Some(open) = acc.open.get_mut(&record.topic).and_then(|m| m.get_mut(&partition)) else {
            unreachable!("the open batch was just inserted");
        };
        let index = open.count;
        open.count += 1;
        open.builder.push(&Record {
            timestamp: record.timestamp.unwrap_or_else(conveyor_storage::unix_millis),
            key: record.key,
            value: record.value,
            headers: record.headers,
        });
        match &mut open.permit {
            Some(p) => p.merge(permit),
            None => open.permit = Some(permit),
        }
        let future = DeliveryFuture {
            slot: Arc::clone(&open.slot),
            index,
            topic: Arc::clone(&open.topic),
            partition,
        };
        // With no linger a batch goes out at once: a timer would add up to a tick of delay.
        let full = open.builder.estimated_size() >= self.config.batch_size || self.config.linger.is_zero();
        let sealed = if full {
            self.take(&mut acc, &record.topic, partition)
        } else {
            None
        };
        (future, sealed)
    }

    fn start_linger(self: &Arc<Self>, topic: String, partition: i32, id: u64) {
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(shared.config.linger).await;
            let sealed = {
                let mut acc = shared.lock();
                let same = acc
                    .open
                    .get(&topic)
                    .and_then(|m| m.get(&partition))
                    .is_some_and(|o| o.id == id);
                if same {
                    shared.take(&mut acc, &topic, partition)
                } else {
                    None
                }
            };
            if let Some(sealed) = sealed {
                let _ = shared.dispatch(sealed).await;
            }
        });
    }

    /// Removes and encodes the open batch of a partition.
    fn take(&self, acc: &mut Accumulator, topic: &str, partition: i32) -> Option<Sealed> {
        let open = acc.open.get_mut(topic)?.remove(&partition)?;
        if acc.sticky.get(topic) == Some(&partition) {
            acc.sticky.remove(topic);
        }
        let permit = open.permit?;
        let sealed = |bytes: Bytes| Sealed {
            topic: open.topic.clone(),
            partition,
            bytes,
            attempts: 0,
            sealed_at: std::time::Instant::now(),
            slot: Arc::clone(&open.slot),
            tracker: Arc::clone(&self.tracker),
            _permit: permit,
        };
        match open.builder.build() {
            Ok(bytes) => Some(sealed(bytes)),
            Err(e) => {
                sealed(Bytes::new()).complete(Err(ClientError::from(e)));
                None
            }
        }
    }

    /// Seals every open batch, for `flush`.
    pub(crate) fn seal_all(&self) -> Vec<Sealed> {
        let mut acc = self.lock();
        let keys: Vec<(String, i32)> = acc
            .open
            .iter()
            .flat_map(|(t, m)| m.keys().map(move |p| (t.clone(), *p)))
            .collect();
        keys.into_iter()
            .filter_map(|(t, p)| self.take(&mut acc, &t, p))
            .collect()
    }

    /// Hands a sealed batch to the sender, waiting if its queue is full.
    pub(crate) async fn dispatch(&self, sealed: Sealed) -> Result<()> {
        if let Err(mpsc::error::SendError(sealed)) = self.to_sender.send(sealed).await {
            sealed.complete(Err(ClientError::Closed));
            return Err(ClientError::Closed);
        }
        Ok(())
    }
}
