//! Topic descriptions and metadata answers: this broker's view, completed by asking the
//! brokers that know what it does not (a partition's leader, the preferred replica of a
//! partition this broker holds no replica of).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use conveyor_proto::v1::*;

use super::{AdminService, DESCRIBE_ASK_TIMEOUT, FORWARD_CONNECT_TIMEOUT, METADATA_ASK_TIMEOUT, to_i32};
use crate::api::forward::{forward, own_description};
use crate::controller::Topic;

impl AdminService {
    /// This broker's view of one partition: complete where it leads, partial elsewhere.
    pub(super) fn describe_partition(&self, topic: &Topic, index: i32) -> PartitionDescription {
        let replicas = to_i32(&topic.assignments[index as usize]);
        match topic.local.get(&index) {
            Some(p) => {
                let status = p.status();
                let view = p.raft_view();
                let ids = |v: &[u64]| v.iter().map(|&i| i as i32).collect::<Vec<_>>();
                PartitionDescription {
                    partition: index,
                    leader: status.leader as i32,
                    replicas,
                    in_sync: to_i32(&status.in_sync()),
                    log_start_offset: p.log().log_start_offset(),
                    high_watermark: p.high_watermark(),
                    log_end_offset: p.log().log_end_offset(),
                    size_bytes: p.log().size_bytes(),
                    replica_state: match status.failure {
                        Some(reason) => format!("stopped: {reason}"),
                        None => "running".into(),
                    },
                    voters: ids(&view.conf_state.voters),
                    learners: ids(&view.conf_state.learners),
                    voters_outgoing: ids(&view.conf_state.voters_outgoing),
                    learners_next: ids(&view.conf_state.learners_next),
                    term: status.term,
                    applied_index: view.applied,
                    dirty_ratio: topic
                        .effective
                        .cleanup_policy
                        .compacts()
                        .then(|| p.log().last_dirty_stats().map(|s| s.dirty_ratio()))
                        .flatten(),
                    last_compaction_ms: p.log().last_cleaned_ms(),
                }
            }
            None => PartitionDescription {
                partition: index,
                leader: 0,
                replicas,
                // A replica placed here that could not be opened (retried by the applier).
                replica_state: topic
                    .unopened
                    .get(&index)
                    .map(|u| format!("stopped: {}", u.reason))
                    .unwrap_or_default(),
                ..PartitionDescription::default()
            },
        }
    }

    pub(super) fn describe_local(&self, topic: &Topic) -> TopicDescription {
        TopicDescription {
            name: topic.name.clone(),
            configs: topic.effective.to_map().into_iter().collect(),
            replication_factor: topic.replication_factor,
            topic_id: topic.id.clone(),
            partitions: (0..topic.partition_count() as i32)
                .map(|i| self.describe_partition(topic, i))
                .collect(),
        }
    }

    /// The description with every partition as its leader sees it, where the leader answers.
    pub(super) async fn describe(&self, topic: &Topic, local_only: bool) -> TopicDescription {
        let me = self.ctx.node_id as i32;
        let mut description = self.describe_local(topic);
        if local_only {
            return description;
        }
        // Where this broker does not lead, ask the leader it knows of, or the preferred one.
        let mut ask: BTreeSet<u32> = BTreeSet::new();
        for p in &description.partitions {
            if p.leader != me {
                let guess = if p.leader > 0 {
                    p.leader
                } else {
                    p.replicas.first().copied().unwrap_or(0)
                };
                if guess > 0 && guess != me {
                    ask.insert(guess as u32);
                }
            }
        }
        // A broker asked may name another leader (the preferred replica asked by a broker
        // holding none, while another replica leads): those are asked once more, no further.
        let hinted = self.take_leaders_views(topic, &mut description, ask).await;
        self.take_leaders_views(topic, &mut description, hinted).await;
        description
    }

    /// Asks each of `brokers` for its own description of `topic` and takes its view of the
    /// partitions it leads. Returns the other leaders the answers name for partitions whose
    /// leader is still unknown here (each such slot takes the named leader meanwhile).
    async fn take_leaders_views(
        &self,
        topic: &Topic,
        description: &mut TopicDescription,
        brokers: BTreeSet<u32>,
    ) -> BTreeSet<u32> {
        let me = self.ctx.node_id as i32;
        let mut named = BTreeSet::new();
        for broker in brokers {
            // A leader that stopped answering (paused, partitioned) must not hang the
            // description: its partitions keep this broker's view.
            let transport = self.ctx.registry.transport();
            let wait = FORWARD_CONNECT_TIMEOUT + DESCRIBE_ASK_TIMEOUT;
            let Some(theirs) = own_description(transport, broker, &topic.name, wait).await else {
                continue;
            };
            for p in theirs.partitions {
                let Some(slot) = description.partitions.get_mut(p.partition as usize) else {
                    continue;
                };
                if p.leader == broker as i32 {
                    let ours = std::mem::take(&mut slot.replica_state);
                    *slot = p;
                    slot.replica_state = ours;
                } else if p.leader > 0 && p.leader != me && slot.leader != me && slot.leader != p.leader {
                    slot.leader = p.leader;
                    named.insert(p.leader as u32);
                }
            }
        }
        named
    }

    /// Fills in the leaders of partitions this broker holds no replica of (in a cluster with
    /// more brokers than a topic's replication factor), as their preferred replicas see
    /// them. A replica that does not answer in time leaves its partitions at 0 (unknown):
    /// clients then try the replicas, preferred first, and follow the leader they name.
    pub(super) async fn fill_remote_leaders(&self, topics: &mut [TopicMetadata]) {
        let mut ask: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for t in topics.iter() {
            for p in t.partitions.iter().filter(|p| p.leader == 0) {
                let preferred = p.replicas.first().copied().unwrap_or(0) as u32;
                if preferred != 0 && preferred != self.ctx.node_id && self.ctx.registry.transport().is_alive(preferred)
                {
                    ask.entry(preferred).or_default().insert(t.name.clone());
                }
            }
        }
        if ask.is_empty() {
            return;
        }
        let answers = futures::future::join_all(ask.into_iter().map(|(broker, names)| async move {
            let mut client = self.kept_client_for(broker)?;
            let request = forward(MetadataRequest {
                topics: names.into_iter().collect(),
            });
            tokio::time::timeout(METADATA_ASK_TIMEOUT, client.metadata(request))
                .await
                .ok()?
                .ok()
        }))
        .await;
        let mut leaders: HashMap<String, HashMap<i32, i32>> = HashMap::new();
        for answer in answers.into_iter().flatten() {
            for t in answer.into_inner().topics {
                let known = leaders.entry(t.name).or_default();
                known.extend(
                    t.partitions
                        .iter()
                        .filter(|p| p.leader > 0)
                        .map(|p| (p.partition, p.leader)),
                );
            }
        }
        for t in topics.iter_mut() {
            let Some(known) = leaders.get(&t.name) else {
                continue;
            };
            for p in t.partitions.iter_mut().filter(|p| p.leader == 0) {
                if let Some(leader) = known.get(&p.partition) {
                    p.leader = *leader;
                }
            }
        }
    }
}
