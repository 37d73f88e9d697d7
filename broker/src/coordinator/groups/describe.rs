//! Listing and describing groups, and the lag behind the metrics endpoint.

use std::collections::{BTreeSet, HashMap};

use super::GroupCoordinator;
use super::assignor::TopicPartition;
use super::state::{Group, set};
use crate::coordinator::end_offsets::{self, Spec};

/// A group as `group list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub group: String,
    pub state: &'static str,
    pub members: usize,
    pub assignor: String,
}

/// A member as `group describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub member_id: String,
    pub instance_id: String,
    pub epoch: i32,
    pub assignment: BTreeSet<TopicPartition>,
    pub pending_revocation: BTreeSet<TopicPartition>,
    pub topics: Vec<String>,
    pub regex: String,
}

/// One partition's committed offset, end and lag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionView {
    pub partition: TopicPartition,
    pub committed: Option<u64>,
    pub log_end_offset: Option<u64>,
    pub lag: Option<u64>,
    pub owner: String,
}

/// A group described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    pub group: String,
    pub state: &'static str,
    pub assignor: String,
    pub epoch: i32,
    pub assignment_epoch: i32,
    pub members: Vec<MemberView>,
    pub partitions: Vec<PartitionView>,
}

/// The gauges of one group for the metrics endpoint.
#[derive(Debug, Clone)]
pub struct GroupGauges {
    pub group: String,
    pub members: usize,
    pub lags: Vec<(TopicPartition, u64)>,
}

/// Partitions with the offset a group committed in each (0 where none).
type CommittedAt = Vec<(TopicPartition, u64)>;

/// Subscribed partitions (as the group's metadata last saw its topics) and committed ones.
fn partitions_of(g: &Group) -> BTreeSet<TopicPartition> {
    let mut all: BTreeSet<TopicPartition> = g.offsets.keys().cloned().collect();
    if let Some(meta) = &g.meta {
        for (topic, count) in &meta.subscribed_partitions {
            all.extend((0..*count).map(|p| TopicPartition::new(topic.clone(), p)));
        }
    }
    all
}

impl GroupCoordinator {
    /// The groups of every `__consumer_offsets` partition this broker leads.
    pub async fn list(&self) -> Vec<Summary> {
        let mut out = Vec::new();
        for index in self.host.led_here() {
            let Ok(shard) = self.host.shard(index, "").await else {
                continue;
            };
            let st = shard.lock().await;
            out.extend(st.groups.iter().map(|(name, g)| Summary {
                group: name.clone(),
                state: g.state(),
                members: g.members.len(),
                assignor: g.meta.as_ref().map(|m| m.assignor.clone()).unwrap_or_default(),
            }));
        }
        out.sort_by(|a, b| a.group.cmp(&b.group));
        out
    }

    /// Describes `group`, with the log end and lag of each of its partitions (the ends
    /// looked up now, after the group's state is read).
    pub async fn describe(&self, group: &str) -> crate::error::Result<Description> {
        let shard = self.shard_for(group).await?;
        let g = {
            let st = shard.lock().await;
            st.groups.get(group).cloned()
        };
        let Some(g) = g else {
            return Ok(Description {
                group: group.to_string(),
                state: "dead",
                assignor: String::new(),
                epoch: 0,
                assignment_epoch: 0,
                members: Vec::new(),
                partitions: Vec::new(),
            });
        };
        let partitions: Vec<TopicPartition> = partitions_of(&g).into_iter().collect();
        let ends = end_offsets::lookup(&self.registry, &partitions, Spec::Latest).await;
        let owners: HashMap<TopicPartition, &str> = g.owners();
        let partitions = partitions
            .into_iter()
            .map(|p| {
                let committed = g.offsets.get(&p).map(|c| c.offset);
                let end = ends.get(&p).copied();
                PartitionView {
                    committed,
                    log_end_offset: end,
                    lag: end.map(|e| e.saturating_sub(committed.unwrap_or(0))),
                    owner: owners.get(&p).map(|o| o.to_string()).unwrap_or_default(),
                    partition: p,
                }
            })
            .collect();
        let meta = g.meta.clone().unwrap_or_default();
        Ok(Description {
            group: group.to_string(),
            state: g.state(),
            assignor: meta.assignor,
            epoch: meta.epoch,
            assignment_epoch: meta.assignment_epoch,
            members: g
                .members
                .iter()
                .map(|(id, m)| MemberView {
                    member_id: id.clone(),
                    instance_id: m.instance_id.clone(),
                    epoch: m.member_epoch,
                    assignment: set(&m.assigned),
                    pending_revocation: set(&m.pending_revocation),
                    topics: m.topics.clone(),
                    regex: m.regex.clone(),
                })
                .collect(),
            partitions,
        })
    }

    /// Looks up the log ends of every partition the loaded groups subscribe to or
    /// committed, and recomputes the lag gauges.
    pub(super) async fn refresh_lag(&self) {
        // Per group: its members and each partition's committed offset (0 when none), read
        // under the lock without copying the groups themselves.
        let mut groups: Vec<(String, usize, CommittedAt)> = Vec::new();
        for shard in self.host.current() {
            let st = shard.lock().await;
            groups.extend(st.groups.iter().map(|(name, g)| {
                let committed = partitions_of(g)
                    .into_iter()
                    .map(|p| {
                        let at = g.offsets.get(&p).map_or(0, |c| c.offset);
                        (p, at)
                    })
                    .collect();
                (name.clone(), g.members.len(), committed)
            }));
        }
        let all: BTreeSet<TopicPartition> = groups
            .iter()
            .flat_map(|(_, _, ps)| ps.iter().map(|(p, _)| p.clone()))
            .collect();
        let all: Vec<TopicPartition> = all.into_iter().collect();
        let ends = end_offsets::lookup(&self.registry, &all, Spec::Latest).await;
        let gauges = groups
            .into_iter()
            .map(|(group, members, committed)| GroupGauges {
                group,
                members,
                lags: committed
                    .into_iter()
                    .filter_map(|(p, at)| Some((ends.get(&p)?.saturating_sub(at), p)))
                    .map(|(lag, p)| (p, lag))
                    .collect(),
            })
            .collect();
        *self.log_ends.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = ends;
        *self.lag_view.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = gauges;
    }
}
