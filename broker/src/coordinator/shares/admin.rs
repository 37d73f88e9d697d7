//! Describing, listing and deleting share groups, and purging or redriving their dead
//! letters.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use conveyor_proto::v1::{
    DeleteTopicRequest, ShareGroupDescription, ShareGroupSummary, ShareMemberDescription, SharePartitionState,
};
use conveyor_storage::batch::{BatchBuilder, BatchIter, Compression, Record};

use std::sync::Arc;

use super::state::SharesState;
use super::window::SlotState;
use super::{ShareCoordinator, dead_letters, name_group, settings_view};
use crate::coordinator::end_offsets::{self, Spec};
use crate::coordinator::groups::assignor::TopicPartition;
use crate::coordinator::host::Shard;
use crate::error::{BrokerError, Result};

/// How long a purge or redrive waits for a dead-letter write under way.
const PAUSE_WAIT: Duration = Duration::from_secs(15);
/// Most dead letters one redrive republishes.
const MAX_REDRIVE: u64 = 10_000_000;

impl ShareCoordinator {
    pub async fn describe(&self, group: &str) -> Result<ShareGroupDescription> {
        let shard = self.shard_for(group).await?;
        let now = conveyor_storage::unix_millis();
        let (mut out, topic) = {
            let st = shard.lock().await;
            let g = st
                .groups
                .get(group)
                .ok_or_else(|| BrokerError::UnknownGroup(group.to_string()))?;
            let mut held: BTreeMap<u32, u64> = BTreeMap::new();
            let mut partitions = Vec::new();
            for (p, w) in &g.windows {
                for s in w.slots().filter(|s| s.state == SlotState::Acquired) {
                    *held.entry(s.member).or_default() += 1;
                }
                let c = w.counts(now);
                partitions.push(SharePartitionState {
                    partition: *p,
                    start_offset: w.start,
                    available: c.available,
                    acquired: c.acquired,
                    acknowledged: c.acknowledged,
                    archived: c.archived + c.dead_lettering,
                    delayed: c.delayed,
                    oldest_unacked_ms: c
                        .oldest_unacked_timestamp
                        .map_or(0, |t| now.saturating_sub(t).max(0) as u64),
                    lag: None,
                    log_end_offset: None,
                });
            }
            let mut members: Vec<ShareMemberDescription> = g
                .members
                .iter()
                .map(|(n, m)| ShareMemberDescription {
                    member_id: m.id.clone(),
                    acquired: held.get(n).copied().unwrap_or(0),
                })
                .collect();
            members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
            (
                ShareGroupDescription {
                    group: group.to_string(),
                    topic: g.settings.topic.clone(),
                    settings: Some(settings_view(&g.settings)),
                    coordinator: self.node_id() as i32,
                    members,
                    partitions,
                    dead_letters: Some(g.windows.values().map(|w| w.dead_letters).sum()),
                    dead_letters_written: g.dead_letters_written,
                },
                g.settings.topic.clone(),
            )
        };
        let tps: Vec<TopicPartition> = out
            .partitions
            .iter()
            .map(|p| TopicPartition::new(topic.clone(), p.partition))
            .collect();
        let ends = end_offsets::lookup(self.registry(), &tps, Spec::Latest).await;
        for p in &mut out.partitions {
            if let Some(end) = ends.get(&TopicPartition::new(topic.clone(), p.partition)) {
                p.log_end_offset = Some(*end);
                p.lag = Some(end.saturating_sub(p.start_offset));
            }
        }
        Ok(out)
    }

    /// The share groups this broker coordinates.
    pub async fn list(&self) -> Vec<ShareGroupSummary> {
        let mut out = Vec::new();
        for shard in self.host.current() {
            let st = shard.lock().await;
            for (name, g) in &st.groups {
                out.push(ShareGroupSummary {
                    group: name.clone(),
                    topic: g.settings.topic.clone(),
                    members: g.members.len() as u32,
                    coordinator: self.node_id() as i32,
                });
            }
        }
        out.sort_by(|a, b| a.group.cmp(&b.group));
        out
    }

    /// Removes `group` and its state; refused while it has members. The group's record goes
    /// first (the group is gone once it commits); the tombstones of its partitions' records
    /// follow in writes of their own, bounded in size, and records they miss (a failover in
    /// between) name a group that no longer exists and are ignored at replay.
    pub async fn delete(&self, group: &str) -> Result<()> {
        let shard = self.shard_for(group).await?;
        let mut st = shard.lock().await;
        let g = st
            .groups
            .get(group)
            .ok_or_else(|| BrokerError::UnknownGroup(group.to_string()))?;
        if !g.members.is_empty() {
            return Err(BrokerError::GroupNotEmpty {
                group: group.to_string(),
                members: g.members.len(),
                what: "deleting a share group".into(),
            });
        }
        let mut tombstones = g.tombstones(group);
        let rest = tombstones.split_off(1);
        shard
            .write(&mut st, tombstones)
            .await
            .map_err(|e| name_group(e, group))?;
        for chunk in rest.chunks(10_000) {
            shard
                .write(&mut st, chunk.to_vec())
                .await
                .map_err(|e| name_group(e, group))?;
        }
        tracing::info!(group, "share group deleted");
        Ok(())
    }

    /// Stops `group`'s dead-letter writes and waits for one under way; returns the state it
    /// paused them in and the dead-letter topic. Refused when the group did not create its
    /// dead-letter topic (one named at the group's creation that existed already is not the
    /// group's to delete).
    async fn pause_dead_letters(&self, group: &str) -> Result<(Arc<Shard<SharesState>>, String)> {
        let shard = self.shard_for(group).await?;
        let deadline = tokio::time::Instant::now() + PAUSE_WAIT;
        loop {
            {
                let mut st = shard.lock().await;
                let g = st
                    .groups
                    .get_mut(group)
                    .ok_or_else(|| BrokerError::UnknownGroup(group.to_string()))?;
                if !g.settings.dead_letter_topic_created && self.registry().get(&g.settings.dead_letter_topic).is_ok() {
                    return Err(BrokerError::InvalidRequest(format!(
                        "share group '{group}' did not create topic '{}', so it will not delete it; read or delete it with conveyor consume / conveyor topic delete",
                        g.settings.dead_letter_topic
                    )));
                }
                g.dead_letters_paused = true;
                if !g.dead_lettering {
                    return Ok((Arc::clone(&shard), g.settings.dead_letter_topic.clone()));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                self.resume_dead_letters(&shard, group).await;
                return Err(BrokerError::TimedOut {
                    what: format!("pausing share group '{group}''s dead letters"),
                    after: PAUSE_WAIT,
                    state: "a dead-letter write is still under way; retry".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn resume_dead_letters(&self, shard: &Shard<SharesState>, group: &str) {
        let mut st = shard.lock().await;
        if let Some(g) = st.groups.get_mut(group) {
            g.dead_letters_paused = false;
        }
    }

    /// Refuses to go on when the state the dead letters were paused in is no longer the
    /// one serving: a reload forgets the pause, and letters written since would be lost by
    /// the delete.
    fn still_paused(shard: &Shard<SharesState>, group: &str) -> Result<()> {
        if shard.is_current() {
            return Ok(());
        }
        Err(BrokerError::CoordinatorLoading {
            group: group.to_string(),
            state: "reloaded its state during the operation; nothing was deleted, retry".into(),
        })
    }

    /// Deletes `group`'s dead-letter topic; returns how many dead letters it held. Runs to
    /// its end even when its caller gives up (see [`to_the_end`]).
    pub async fn purge_dead_letters(self: &Arc<Self>, group: &str) -> Result<u64> {
        let (this, group) = (Arc::clone(self), group.to_string());
        to_the_end(async move { this.purge_now(&group).await }).await
    }

    async fn purge_now(&self, group: &str) -> Result<u64> {
        let (shard, dlq) = self.pause_dead_letters(group).await?;
        let outcome = async {
            Self::still_paused(&shard, group)?;
            self.delete_topic(&dlq).await?;
            self.forget_dead_letters(&shard, group).await
        }
        .await;
        self.resume_dead_letters(&shard, group).await;
        outcome
    }

    /// After the dead-letter topic was deleted: the counts go to zero and the topic is no
    /// longer the group's (it creates it anew with its next dead letter). Returns the count
    /// it had.
    async fn forget_dead_letters(&self, shard: &Arc<Shard<SharesState>>, group: &str) -> Result<u64> {
        let mut st = shard.lock().await;
        let g = st
            .groups
            .get_mut(group)
            .ok_or_else(|| BrokerError::UnknownGroup(group.to_string()))?;
        let mut was = 0;
        let mut changes = Vec::new();
        let partitions: Vec<i32> = g.windows.keys().copied().collect();
        for p in partitions {
            let Some(w) = g.windows.get_mut(&p) else { continue };
            if w.dead_letters == 0 || !w.started {
                continue;
            }
            was += w.dead_letters;
            w.dead_letters = 0;
            changes.extend(g.record_of(group, p, &[]));
        }
        let committed = shard.append_ahead(&changes).await.map_err(|e| name_group(e, group))?;
        let mut settings = g.settings.clone();
        settings.dead_letter_topic_created = false;
        shard
            .write(&mut st, vec![SharesState::creation(group, &settings)])
            .await
            .map_err(|e| name_group(e, group))?;
        drop(st);
        committed.wait().await.map_err(|e| name_group(e, group))?;
        Ok(was)
    }

    /// Publishes `group`'s dead letters back to the source topic, then deletes the
    /// dead-letter topic; returns how many were republished. Only letters whose
    /// `conveyor-dlq-topic` header names the group's topic are republished. Runs to its end
    /// even when its caller gives up (see [`to_the_end`]).
    pub async fn redrive(self: &Arc<Self>, group: &str) -> Result<u64> {
        let (this, group) = (Arc::clone(self), group.to_string());
        to_the_end(async move { this.redrive_now(&group).await }).await
    }

    async fn redrive_now(&self, group: &str) -> Result<u64> {
        let (shard, dlq) = self.pause_dead_letters(group).await?;
        let outcome = async {
            let republished = self.redrive_paused(&shard, group, &dlq).await?;
            Self::still_paused(&shard, group)?;
            self.delete_topic(&dlq).await?;
            self.forget_dead_letters(&shard, group).await?;
            tracing::info!(group, republished, "share group dead letters redriven");
            Ok(republished)
        }
        .await;
        self.resume_dead_letters(&shard, group).await;
        outcome
    }

    async fn redrive_paused(&self, shard: &Shard<SharesState>, group: &str, dlq: &str) -> Result<u64> {
        let source = {
            let st = shard.lock().await;
            st.groups
                .get(group)
                .map(|g| g.settings.topic.clone())
                .ok_or_else(|| BrokerError::UnknownGroup(group.to_string()))?
        };
        let Ok(t) = self.registry().get(dlq) else { return Ok(0) };
        let source_partitions = (self.registry().get(&source)?.partition_count() as i32).max(1);
        let tps: Vec<TopicPartition> = (0..t.partition_count() as i32)
            .map(|p| TopicPartition::new(dlq.to_string(), p))
            .collect();
        let ends = end_offsets::lookup(self.registry(), &tps, Spec::Latest).await;
        let starts = end_offsets::lookup(self.registry(), &tps, Spec::Earliest).await;
        let held: u64 = tps
            .iter()
            .map(|tp| {
                let end = ends.get(tp).copied().unwrap_or(0);
                end.saturating_sub(starts.get(tp).copied().unwrap_or(end))
            })
            .fold(0, u64::saturating_add);
        check_redrive_size(dlq, held)?;
        let mut republished = 0u64;
        for tp in &tps {
            let (Some(&end), Some(&start)) = (ends.get(tp), starts.get(tp)) else {
                return Err(BrokerError::LeaderNotAvailable {
                    topic: dlq.to_string(),
                    partition: tp.partition,
                });
            };
            let mut from = start;
            while from < end {
                let read = super::fill::read_once(self.registry(), dlq, tp.partition, from).await?;
                if read.is_empty() {
                    break;
                }
                let mut by_partition: BTreeMap<i32, BatchBuilder> = BTreeMap::new();
                for batch in BatchIter::new(read) {
                    let batch = batch.map_err(|e| BrokerError::from_batch(dlq, tp.partition, e))?;
                    from = from.max(batch.header().next_offset());
                    if batch.header().is_control() {
                        continue;
                    }
                    for r in batch
                        .records()
                        .map_err(|e| BrokerError::from_batch(dlq, tp.partition, e))?
                    {
                        let r = r.map_err(|e| BrokerError::from_batch(dlq, tp.partition, e))?;
                        if r.offset >= end {
                            break;
                        }
                        if header_of(&r.headers, dead_letters::SOURCE_TOPIC).as_deref() != Some(source.as_str()) {
                            continue;
                        }
                        let partition = header_of(&r.headers, dead_letters::SOURCE_PARTITION)
                            .and_then(|v| v.parse::<i32>().ok())
                            .filter(|p| (0..source_partitions).contains(p))
                            .unwrap_or(tp.partition % source_partitions);
                        let headers = r
                            .headers
                            .into_iter()
                            .filter(|h| !h.key.starts_with(b"conveyor-dlq-"))
                            .collect();
                        by_partition
                            .entry(partition)
                            .or_insert_with(|| BatchBuilder::new(Compression::None))
                            .push(&Record {
                                timestamp: r.timestamp,
                                key: r.key,
                                value: r.value,
                                headers,
                            });
                        republished += 1;
                    }
                }
                for (p, builder) in by_partition {
                    let bytes: Bytes = builder
                        .build()
                        .map_err(|e| BrokerError::Internal(format!("a redriven batch: {e}")))?;
                    dead_letters::append(self, &source, p, bytes).await?;
                }
            }
        }
        Ok(republished)
    }

    /// Deletes `topic` through the controller.
    async fn delete_topic(&self, topic: &str) -> Result<()> {
        if self.registry().get(topic).is_err() {
            return Ok(());
        }
        let controller = self.registry().controller().await?;
        let transport = self.registry().transport();
        let mut admin = crate::api::forward::connect(transport, controller).await?;
        admin
            .delete_topic(crate::api::forward::forward(DeleteTopicRequest {
                name: topic.to_string(),
            }))
            .await
            .map_err(|s| BrokerError::BrokerUnreachable {
                id: controller,
                address: transport.client_address(controller).unwrap_or_default(),
                reason: format!("deleting '{topic}': {}", s.message()),
            })?;
        Ok(())
    }
}

/// Runs `op` in a task of its own: a purge or redrive pauses the group's dead letters
/// until it ends, so one dropped part-way (its caller gave up, and the request's future
/// with it) would leave them paused until the coordinator reloads.
async fn to_the_end<T: Send + 'static>(op: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    tokio::spawn(op)
        .await
        .map_err(|e| BrokerError::Internal(format!("a dead-letter administration task failed: {e}")))?
}

/// Refuses, before anything is republished, a dead-letter topic holding more than one
/// redrive republishes (a refusal part-way would leave the copies made, and a retry would
/// make them again).
fn check_redrive_size(dlq: &str, held: u64) -> Result<()> {
    if held > MAX_REDRIVE {
        return Err(BrokerError::InvalidRequest(format!(
            "dead-letter topic '{dlq}' holds {held} records, more than the {MAX_REDRIVE} one redrive republishes; read it with conveyor consume and produce what should go back, then purge it (conveyor queue purge-dlq)"
        )));
    }
    Ok(())
}

fn header_of(headers: &[conveyor_storage::batch::Header], key: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.key.as_ref() == key.as_bytes())
        .and_then(|h| h.value.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_redrive_past_its_bound_is_refused_before_it_copies_anything() {
        assert!(super::check_redrive_size("jobs.w.dlq", super::MAX_REDRIVE).is_ok());
        let e = super::check_redrive_size("jobs.w.dlq", super::MAX_REDRIVE + 1).expect_err("too many");
        assert!(e.to_string().contains("purge-dlq"), "{e}");
    }
}
