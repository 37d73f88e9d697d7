//! The metadata applier: follows the controller's log as it commits and applies each record
//! to this broker (topics, replica placements, broker membership), in log order. A record
//! that fails is applied again after a pause, and the failure is reported (metric, `cluster
//! info`) instead of being skipped: a broker never silently lacks a topic.
//!
//! # Crash behaviour
//! What was applied is rebuilt at start by replaying the local metadata log (see
//! `Registry::open`); applying a record again after a crash is harmless, and nothing is
//! deleted from a view that may be stale (see `departures`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use conveyor_proto::internal::v1::{
    BrokerDraining, BrokerRegistered, BrokerRemoved, PartitionReassigned, metadata_record,
};

use super::unopened::{self, Unopened};
use super::{Located, Registry, Topic, located_records_in, remove_topic_data};
use crate::error::{BrokerError, Result};

/// Pause before applying again a metadata record that failed: a retry backoff.
const APPLY_RETRY_EVERY: Duration = Duration::from_secs(1);

/// A committed metadata record this broker failed to apply; it keeps trying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyFailure {
    /// Where the record sits in the controller log.
    pub offset: u64,
    /// What the record changes, for people.
    pub change: String,
    pub error: String,
}

/// A metadata change in a few words, for errors and logs.
pub(crate) fn describe_change(change: &metadata_record::Change) -> String {
    use metadata_record::Change::*;
    match change {
        TopicCreated(t) => format!("creation of topic '{}'", t.name),
        TopicDeleted(d) => format!("deletion of topic '{}'", d.name),
        TopicConfigChanged(c) => format!("config change of topic '{}'", c.name),
        PartitionReassigned(r) => format!(
            "replica list {:?} of topic '{}' partition {}",
            r.replicas, r.topic, r.partition
        ),
        BrokerRegistered(b) => format!("registration of broker {}", b.id),
        BrokerDraining(b) => format!("draining of broker {}", b.id),
        BrokerRemoved(b) => format!("removal of broker {}", b.id),
        ProducerIdsAllocated(p) => format!(
            "producer ids {}..{} for broker {}",
            p.first,
            p.first.saturating_add(i64::from(p.count)),
            p.broker
        ),
    }
}

impl Registry {
    /// Applies metadata records as they commit, until `stop` resolves.
    pub async fn run_applier(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut hw = self.metadata.watch_high_watermark();
        loop {
            let end = *hw.borrow_and_update();
            let from = *self.applied.borrow();
            if from < end && from < self.metadata.log().log_start_offset() {
                // The log was reset past what this broker applied: it received the
                // controller's state in a Raft snapshot (it was behind the log start).
                if let Some(point) = self.install_stored_snapshot(from).await {
                    self.applied.send_replace(point);
                    continue;
                }
            } else if from < end {
                let log = self.metadata.log();
                let read = tokio::task::spawn_blocking(move || log.read_up_to(from, 1 << 20, end)).await;
                let mut read_bytes = 0;
                let parsed = match read {
                    Ok(Ok(bytes)) => {
                        read_bytes = bytes.len() as u64;
                        located_records_in(bytes)
                    }
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(e.into()),
                };
                match parsed {
                    Ok((changes, after)) => {
                        let count = changes.len() as u64;
                        if self.apply_in_order(changes).await {
                            if let Some(after) = after {
                                self.applied.send_replace(after.offset.max(from));
                                self.maybe_snapshot(after, count, read_bytes).await;
                            }
                            self.decide_kept_replicas().await;
                            continue;
                        }
                    }
                    Err(e) => {
                        // The log below the commit point is unreadable: this broker cannot
                        // follow the cluster's metadata. Say so loudly and retry later.
                        tracing::error!(error = %e, offset = from, "cannot read the metadata log");
                    }
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                changed = hw.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(APPLY_RETRY_EVERY), if from < end => {}
                // Kept replicas are decided again as their groups apply their removal.
                _ = tokio::time::sleep(Duration::from_secs(1)), if !self.undecided.is_empty() => {
                    self.decide_kept_replicas().await;
                }
                _ = tokio::time::sleep(unopened::RETRY_CHECK_EVERY), if self.has_unopened() => {
                    self.retry_unopened().await;
                }
            }
        }
    }

    /// Applies `changes` in log order, advancing `applied` past each one that succeeds. At
    /// the first that fails it stops, reports the failure and returns false: the same record
    /// is tried again on the next round, so no later record is applied before it.
    async fn apply_in_order(self: &Arc<Self>, changes: Vec<Located>) -> bool {
        for located in changes {
            let what = describe_change(&located.change);
            let change = located.change.clone();
            match self.apply(located.change).await {
                Ok(()) => {
                    self.snapshotting.apply(&change);
                    self.applied.send_replace(located.next);
                    if self.apply_failure.borrow().is_some() {
                        tracing::info!(offset = located.base, change = %what, "metadata record applied after earlier failures");
                        self.apply_failure.send_replace(None);
                    }
                }
                Err(e) => {
                    self.metrics.metadata_apply_failures.add(1);
                    let failure = ApplyFailure {
                        offset: located.base,
                        change: what,
                        error: e.to_string(),
                    };
                    // Logged as an error when it starts or changes; each retry is counted.
                    if self.apply_failure.borrow().as_ref() != Some(&failure) {
                        tracing::error!(offset = failure.offset, change = %failure.change, error = %failure.error, "cannot apply a committed metadata record; retrying every second until it applies");
                    } else {
                        tracing::debug!(offset = failure.offset, error = %failure.error, "metadata record still not applied");
                    }
                    self.apply_failure.send_replace(Some(failure));
                    return false;
                }
            }
        }
        true
    }

    /// Loads the newest stored snapshot and applies it, if it stands past `from`; returns
    /// the offset to go on from. `None` (logged) is retried by the loop.
    async fn install_stored_snapshot(self: &Arc<Self>, from: u64) -> Option<u64> {
        let store = Arc::clone(&self.snapshotting.store);
        let loaded = tokio::task::spawn_blocking(move || store.load_newest()).await;
        let loaded = match loaded {
            Ok((Some(loaded), _)) if loaded.point.offset > from => loaded,
            Ok((_, failures)) => {
                let reasons: Vec<String> = failures.iter().map(ToString::to_string).collect();
                tracing::error!(offset = from, failures = ?reasons, "the metadata log starts past what this broker applied and no snapshot covers the gap; retrying");
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot load the metadata snapshot");
                return None;
            }
        };
        let offset = loaded.point.offset;
        self.install_received_snapshot(loaded).await.then_some(offset)
    }

    /// The metadata record this broker cannot apply (it keeps trying), if any.
    pub fn apply_failure(&self) -> Option<ApplyFailure> {
        self.apply_failure.borrow().clone()
    }

    /// The offset after the last metadata record this broker applied.
    pub fn applied_offset(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Applies one record. Applying is idempotent, so a record that failed half-way is applied
    /// again from the start: a topic opens only once it opened whole, a deleted topic's data
    /// is removed by its incarnation's id, a reassigned replica opens only if it is not open.
    pub(super) async fn apply(self: &Arc<Self>, change: metadata_record::Change) -> Result<()> {
        match change {
            metadata_record::Change::TopicCreated(t) => {
                if self.get(&t.name).is_ok() {
                    tracing::debug!(topic = %t.name, "topic already exists; later creation ignored");
                    return Ok(());
                }
                let name = t.name.clone();
                let registry = Arc::clone(self);
                let topic = crate::blocking::blocking(move || registry.open_topic(t, None))
                    .await
                    .map_err(|e| BrokerError::Internal(format!("cannot open the replicas of topic '{name}': {e}")))?;
                tracing::info!(topic = %name, partitions = topic.partition_count(), local = topic.local.len(), "created topic");
                self.insert(topic);
            }
            metadata_record::Change::TopicDeleted(d) => {
                let removed = {
                    let mut topics = self.topics.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                    match topics.get(&d.name) {
                        Some(t) if t.id == d.topic_id => topics.remove(&d.name),
                        _ => None,
                    }
                };
                if let Some(topic) = &removed {
                    self.undecided.remove_topic(&topic.name);
                    self.metrics.forget_topic(&topic.name);
                    for p in topic.local.values() {
                        p.stop().await;
                    }
                    // A retention pass or scrub still holding these partitions must not
                    // write into a topic recreated at the same path.
                    let partitions: Vec<_> = topic.local.values().cloned().collect();
                    crate::blocking::blocking(move || {
                        partitions.iter().for_each(|p| p.retire());
                        Ok(())
                    })
                    .await?;
                }
                // Also on a retry, when the topic already left the registry: its directory is
                // recognised by the incarnation's id.
                let data_dir = self.options.data_dir.clone();
                let (name, id) = (d.name.clone(), d.topic_id.clone());
                crate::blocking::blocking(move || remove_topic_data(&data_dir, &name, &id)).await?;
                if removed.is_some() {
                    tracing::info!(topic = %d.name, "deleted topic");
                }
            }
            metadata_record::Change::TopicConfigChanged(c) => {
                let Ok(topic) = self.get(&c.name) else { return Ok(()) };
                let overrides: BTreeMap<String, String> = c.configs.into_iter().collect();
                let effective = match self.options.defaults.with_overrides(&overrides) {
                    Ok(e) => e,
                    Err(e) => {
                        // Retrying cannot help: this broker's defaults reject the committed
                        // overrides. Counted and logged, then skipped.
                        self.metrics.metadata_apply_failures.add(1);
                        tracing::error!(topic = %c.name, error = %e, "committed config does not apply here");
                        return Ok(());
                    }
                };
                let (partitions, config) = (
                    topic.local.values().cloned().collect::<Vec<_>>(),
                    effective.log_config(),
                );
                crate::blocking::blocking(move || {
                    for p in partitions {
                        if let Err(e) = p.set_log_config(config.clone()) {
                            tracing::error!(topic = %p.topic, partition = p.index, error = %e, "cannot apply config");
                        }
                    }
                    Ok(())
                })
                .await?;
                self.insert(Topic {
                    overrides,
                    effective,
                    ..Topic::clone(&topic)
                });
            }
            metadata_record::Change::PartitionReassigned(r) => self.apply_reassignment(r).await?,
            broker => self.apply_broker_change(broker),
        }
        Ok(())
    }

    /// Follows a broker joining, draining or leaving.
    pub(super) fn apply_broker_change(&self, change: metadata_record::Change) {
        match change {
            metadata_record::Change::BrokerRegistered(BrokerRegistered { id, address }) => {
                self.transport.mark_registered(id);
                if let Err(e) = self.transport.add_peer(id, &address) {
                    tracing::error!(broker = id, %address, error = %e, "cannot add a registered broker");
                }
            }
            metadata_record::Change::BrokerDraining(BrokerDraining { id }) => {
                self.write_draining().insert(id);
            }
            metadata_record::Change::BrokerRemoved(BrokerRemoved { id }) => {
                self.write_draining().remove(&id);
                self.transport.mark_removed(id);
            }
            _ => {}
        }
    }

    /// Opens or removes this broker's replica of a reassigned partition. A replica that
    /// cannot be opened fails the record, which is then applied again.
    async fn apply_reassignment(self: &Arc<Self>, r: PartitionReassigned) -> Result<()> {
        let Ok(topic) = self.get(&r.topic) else { return Ok(()) };
        let Some(index) = usize::try_from(r.partition)
            .ok()
            .filter(|&p| p < topic.partition_count())
        else {
            return Ok(());
        };
        if topic.id != r.topic_id {
            return Ok(());
        }
        let me = self.options.node_id;
        let p = r.partition;
        let mut local = topic.local.clone();
        let wanted = r.replicas.contains(&me);
        let preferred = r.replicas.first().copied().unwrap_or(me);
        let mut unopened = topic.unopened.clone();
        match (local.get(&p).cloned(), wanted) {
            (None, true) => {
                // The topic's directory is prepared there too: one holding another
                // incarnation of the name, or one that cannot be prepared, leaves this
                // partition unopened (reported stopped and retried), never the record failed.
                let placed = Arc::new(Topic {
                    assignments: {
                        let mut a = topic.assignments.clone();
                        a[index] = r.replicas.clone();
                        a
                    },
                    ..Topic::clone(&topic)
                });
                match self.open_local_replica(&placed, p).await {
                    Ok(partition) => {
                        tracing::info!(topic = %r.topic, partition = p, "new replica opened here; catching up from the leader");
                        unopened.remove(&p);
                        local.insert(p, partition);
                    }
                    Err(reason) => {
                        tracing::error!(topic = %r.topic, partition = p, %reason, "cannot open the new replica placed here; it is reported stopped and retried");
                        unopened.insert(p, Unopened::new(reason));
                    }
                }
            }
            (Some(partition), true) => partition.set_preferred(preferred).await,
            (_, false) => {
                unopened.remove(&p);
            }
        }
        if wanted {
            self.undecided.remove(&topic.name, p);
        }
        let mut updated = Topic {
            local,
            unopened,
            ..Topic::clone(&topic)
        };
        updated.assignments[index] = r.replicas;
        self.insert(updated);
        // A committed record applied from the live log placed the replica elsewhere: its data
        // goes once its group no longer lists this broker.
        if !wanted && let Ok(topic) = self.get(&r.topic) {
            self.remove_departed_replica(&topic, p).await;
        }
        Ok(())
    }
}
