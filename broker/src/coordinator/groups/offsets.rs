//! Committed offsets: commits by members (fenced by epoch and ownership), fetches, resets
//! and deletion of an empty group.

use std::collections::BTreeMap;

use conveyor_proto::internal::v1::OffsetCommitValue;

use super::GroupCoordinator;
use super::assignor::TopicPartition;
use super::state::{Group, member_change, offset_change, tp};
use crate::coordinator::Change;
use crate::coordinator::end_offsets::{self, Spec};
use crate::coordinator::groups::records::Key;
use crate::error::{BrokerError, Result};

/// Longest metadata string a commit may carry per partition.
pub const MAX_METADATA_BYTES: usize = 4096;
/// Most partitions one commit, fetch or reset may name.
pub const MAX_PARTITIONS_PER_REQUEST: usize = 100_000;

/// One offset to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub partition: TopicPartition,
    pub offset: u64,
    pub metadata: String,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub partition: TopicPartition,
    pub offset: u64,
    pub metadata: String,
    pub commit_timestamp: i64,
}

/// Checks a commit against the group: a member's commit needs every partition owned by it
/// (assigned, or revoked and not yet given up) at an epoch between the partition's
/// assignment and the member's current one (KIP-1251: a commit in flight across an epoch
/// bump is still accepted); a commit without a member id needs a group without members.
pub fn check_commit(group_id: &str, g: Option<&Group>, member: &str, epoch: i32, commits: &[Commit]) -> Result<()> {
    if member.is_empty() {
        let members = g.map_or(0, |g| g.members.len());
        if members > 0 {
            return Err(BrokerError::GroupNotEmpty {
                group: group_id.to_string(),
                members,
                what: "a commit without a member id".into(),
            });
        }
        return Ok(());
    }
    let m = g
        .and_then(|g| g.members.get(member))
        .ok_or_else(|| BrokerError::UnknownMember {
            group: group_id.to_string(),
            member: member.to_string(),
        })?;
    let fenced = |reason: String| BrokerError::FencedMemberEpoch {
        group: group_id.to_string(),
        member: member.to_string(),
        reason,
    };
    if epoch > m.member_epoch {
        return Err(fenced(format!(
            "epoch {epoch} is newer than the member's epoch {}",
            m.member_epoch
        )));
    }
    for c in commits {
        let held = m
            .assigned
            .iter()
            .chain(&m.pending_revocation)
            .find(|p| tp(p) == c.partition);
        match held {
            None => {
                return Err(fenced(format!(
                    "it does not own topic '{}' partition {}",
                    c.partition.topic, c.partition.partition
                )));
            }
            Some(p) if epoch < p.epoch => {
                return Err(fenced(format!(
                    "epoch {epoch} is older than the epoch {} at which it was given topic '{}' partition {}",
                    p.epoch, c.partition.topic, c.partition.partition
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn offset_value(offset: u64, metadata: String, now_ms: i64) -> OffsetCommitValue {
    OffsetCommitValue {
        offset,
        metadata,
        commit_timestamp: now_ms,
    }
}

impl GroupCoordinator {
    /// Commits offsets for `group`, answered once the records are committed.
    pub async fn commit(&self, group: &str, member: &str, epoch: i32, commits: Vec<Commit>) -> Result<()> {
        if commits.len() > MAX_PARTITIONS_PER_REQUEST {
            return Err(BrokerError::InvalidRequest(format!(
                "a commit may name at most {MAX_PARTITIONS_PER_REQUEST} partitions, got {}",
                commits.len()
            )));
        }
        for c in &commits {
            if c.metadata.len() > MAX_METADATA_BYTES {
                return Err(BrokerError::InvalidRequest(format!(
                    "commit metadata is at most {MAX_METADATA_BYTES} bytes, got {} for topic '{}' partition {}",
                    c.metadata.len(),
                    c.partition.topic,
                    c.partition.partition
                )));
            }
            crate::error::check_topic_name_length(&c.partition.topic)?;
            if c.partition.partition < 0 {
                return Err(BrokerError::InvalidRequest(format!(
                    "partition {} is negative",
                    c.partition.partition
                )));
            }
        }
        if member.is_empty() {
            // A member's partitions exist (they were assigned); anyone else's must too, or
            // offsets of made-up topics would pile up in the group.
            for c in &commits {
                self.registry
                    .get(&c.partition.topic)?
                    .check_index(c.partition.partition)?;
            }
        }
        // One record per partition: the last offset named for it.
        let commits: Vec<Commit> = commits
            .into_iter()
            .map(|c| (c.partition.clone(), c))
            .collect::<BTreeMap<_, _>>()
            .into_values()
            .collect();
        let shard = self.shard_for(group).await?;
        let mut st = shard.lock().await;
        check_commit(group, st.groups.get(group), member, epoch, &commits)?;
        super::room_for(&st, group)?;
        let now = conveyor_storage::unix_millis();
        let count = commits.len() as u64;
        let changes: Vec<Change> = commits
            .into_iter()
            .map(|c| offset_change(group, &c.partition, Some(&offset_value(c.offset, c.metadata, now))))
            .collect();
        shard
            .write(&mut st, changes)
            .await
            .map_err(|e| super::name_group(e, group))?;
        self.metrics.offsets_committed.add(count);
        Ok(())
    }

    /// The committed offsets of `group` (of `only`, when not empty).
    pub async fn fetch_offsets(&self, group: &str, only: &[TopicPartition]) -> Result<Vec<Committed>> {
        let shard = self.shard_for(group).await?;
        let st = shard.lock().await;
        let Some(g) = st.groups.get(group) else {
            return Ok(Vec::new());
        };
        let by_partition: Vec<Committed> = if only.is_empty() {
            g.offsets.iter().map(|(p, v)| committed(p, v)).collect()
        } else {
            only.iter()
                .filter_map(|p| g.offsets.get(p).map(|v| committed(p, v)))
                .collect()
        };
        Ok(by_partition)
    }

    /// Sets `group`'s offsets of `topic` (of `partitions`, or all of them) to what `to`
    /// names; only on a group without members. With `dry_run`, computes them only.
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: &[i32],
        to: Reset,
        dry_run: bool,
    ) -> Result<Vec<Committed>> {
        crate::error::check_topic_name_length(topic)?;
        let t = self.registry.get(topic)?;
        let count = t.partition_count() as i32;
        let chosen: Vec<TopicPartition> = if partitions.is_empty() {
            (0..count).map(|p| TopicPartition::new(topic, p)).collect()
        } else {
            let mut ps = Vec::with_capacity(partitions.len());
            for &p in partitions {
                t.check_index(p)?;
                ps.push(TopicPartition::new(topic, p));
            }
            ps
        };
        let shard = self.shard_for(group).await?;
        {
            let st = shard.lock().await;
            refuse_if_active(group, st.groups.get(group), "resetting offsets")?;
        }
        let offsets: BTreeMap<TopicPartition, u64> = match to {
            // Kept within the log, as Kafka's tool does: an offset past the end or below
            // the start would only send the group to its reset policy.
            Reset::Offset(o) => {
                let start = end_offsets::lookup(&self.registry, &chosen, Spec::Earliest).await;
                let end = end_offsets::lookup(&self.registry, &chosen, Spec::Latest).await;
                let mut out = BTreeMap::new();
                for p in &chosen {
                    let (Some(start), Some(end)) = (start.get(p), end.get(p)) else {
                        return Err(BrokerError::LeaderNotAvailable {
                            topic: p.topic.clone(),
                            partition: p.partition,
                        });
                    };
                    out.insert(p.clone(), o.clamp(*start, (*end).max(*start)));
                }
                out
            }
            Reset::Earliest | Reset::Latest | Reset::Timestamp(_) => {
                let spec = match to {
                    Reset::Earliest => Spec::Earliest,
                    Reset::Latest => Spec::Latest,
                    Reset::Timestamp(ts) => Spec::Timestamp(ts),
                    Reset::Offset(_) => Spec::Latest,
                };
                let found = end_offsets::lookup(&self.registry, &chosen, spec).await;
                let mut out = BTreeMap::new();
                for p in &chosen {
                    let offset = found.get(p).copied().ok_or_else(|| BrokerError::LeaderNotAvailable {
                        topic: p.topic.clone(),
                        partition: p.partition,
                    })?;
                    out.insert(p.clone(), offset);
                }
                out
            }
        };
        let now = conveyor_storage::unix_millis();
        let result: Vec<Committed> = offsets
            .iter()
            .map(|(p, o)| Committed {
                partition: p.clone(),
                offset: *o,
                metadata: String::new(),
                commit_timestamp: now,
            })
            .collect();
        if dry_run {
            return Ok(result);
        }
        let mut st = shard.lock().await;
        // Checked again: a member may have joined while the offsets were looked up.
        refuse_if_active(group, st.groups.get(group), "resetting offsets")?;
        super::room_for(&st, group)?;
        let changes = offsets
            .into_iter()
            .map(|(p, o)| offset_change(group, &p, Some(&offset_value(o, String::new(), now))))
            .collect();
        shard
            .write(&mut st, changes)
            .await
            .map_err(|e| super::name_group(e, group))?;
        Ok(result)
    }

    /// Deletes an empty group: its metadata, any members left for now, its offsets.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        let shard = self.shard_for(group).await?;
        let mut st = shard.lock().await;
        let g = st
            .groups
            .get(group)
            .ok_or_else(|| BrokerError::UnknownGroup(group.to_string()))?;
        refuse_if_active(group, Some(g), "deleting the group")?;
        let mut changes: Vec<Change> = g.offsets.keys().map(|p| offset_change(group, p, None)).collect();
        changes.extend(g.members.keys().map(|id| member_change(group, id, None)));
        if g.meta.is_some() {
            changes.push(Change {
                key: Key::Group(group.to_string()).encode(),
                value: None,
            });
        }
        shard
            .write(&mut st, changes)
            .await
            .map_err(|e| super::name_group(e, group))
    }
}

/// Where `reset-offsets` moves a group's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    Earliest,
    Latest,
    Offset(u64),
    Timestamp(i64),
}

/// Refuses a change that needs an empty group while members are in it (members away for
/// now count: they come back to their offsets).
fn refuse_if_active(group: &str, g: Option<&Group>, what: &str) -> Result<()> {
    let members = g.map_or(0, |g| g.members.len());
    if members > 0 {
        return Err(BrokerError::GroupNotEmpty {
            group: group.to_string(),
            members,
            what: what.to_string(),
        });
    }
    Ok(())
}

fn committed(p: &TopicPartition, v: &OffsetCommitValue) -> Committed {
    Committed {
        partition: p.clone(),
        offset: v.offset,
        metadata: v.metadata.clone(),
        commit_timestamp: v.commit_timestamp,
    }
}
