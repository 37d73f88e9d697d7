//! The `Groups` service: consumer group membership, committed offsets and group
//! administration, answered by [`crate::coordinator::groups::GroupCoordinator`]. Requests
//! are checked and bounded here; a broker that does not coordinate the group says which
//! one does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use conveyor_proto::v1::groups_server::Groups;
use conveyor_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::coordinator::groups::GroupCoordinator;
use crate::coordinator::groups::assignor::TopicPartition;
use crate::coordinator::groups::membership::{self, Heartbeat};
use crate::coordinator::groups::offsets::{Commit, Committed, MAX_PARTITIONS_PER_REQUEST, Reset};
use crate::error::{BrokerError, Result, check_topic_name_length};
use crate::metrics::Metrics;

/// Longest member id or instance id accepted.
const MAX_ID_LEN: usize = 255;
/// Most topics one subscription may name.
const MAX_SUBSCRIBED_TOPICS: usize = 10_000;
/// Most bytes of topic names one subscription may hold (it is stored with the member).
const MAX_SUBSCRIPTION_BYTES: usize = 64 << 10;
/// Longest assignor name accepted.
const MAX_ASSIGNOR_LEN: usize = 64;

#[derive(Debug)]
pub struct GroupsService {
    pub coordinator: Arc<GroupCoordinator>,
    pub metrics: Arc<Metrics>,
}

impl GroupsService {
    fn fail(&self, e: BrokerError) -> Status {
        self.metrics.request_failed(e.error_code());
        match &e {
            BrokerError::NotCoordinator { .. }
            | BrokerError::CoordinatorLoading { .. }
            | BrokerError::UnknownMember { .. }
            | BrokerError::FencedMemberEpoch { .. } => tracing::debug!(error = %e, "group request refused"),
            _ => tracing::info!(error = %e, "group request refused"),
        }
        e.into()
    }
}

fn check_id(what: &str, id: &str) -> Result<()> {
    if id.len() > MAX_ID_LEN {
        return Err(BrokerError::InvalidRequest(format!(
            "{what} is {} bytes long; at most {MAX_ID_LEN}",
            id.len()
        )));
    }
    Ok(())
}

/// The partitions of a request, bounded and checked.
fn partitions(list: Vec<TopicPartitions>) -> Result<BTreeSet<TopicPartition>> {
    let total: usize = list.iter().map(|t| t.partitions.len()).sum();
    if total > MAX_PARTITIONS_PER_REQUEST {
        return Err(BrokerError::InvalidRequest(format!(
            "a request may name at most {MAX_PARTITIONS_PER_REQUEST} partitions, got {total}"
        )));
    }
    let mut out = BTreeSet::new();
    for t in list {
        check_topic_name_length(&t.topic)?;
        for p in t.partitions {
            if p < 0 {
                return Err(BrokerError::InvalidRequest(format!(
                    "topic '{}' partition {p} is negative",
                    t.topic
                )));
            }
            out.insert(TopicPartition::new(t.topic.clone(), p));
        }
    }
    Ok(out)
}

fn grouped(ps: impl IntoIterator<Item = TopicPartition>) -> Vec<TopicPartitions> {
    let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for p in ps {
        by_topic.entry(p.topic).or_default().push(p.partition);
    }
    by_topic
        .into_iter()
        .map(|(topic, partitions)| TopicPartitions { topic, partitions })
        .collect()
}

fn committed_offset(c: Committed) -> CommittedOffset {
    CommittedOffset {
        topic: c.partition.topic,
        partition: c.partition.partition,
        offset: c.offset,
        metadata: c.metadata,
        commit_timestamp: c.commit_timestamp,
    }
}

impl GroupsService {
    fn heartbeat_of(&self, r: GroupHeartbeatRequest) -> Result<Heartbeat> {
        GroupCoordinator::check_group_id(&r.group)?;
        check_id("member id", &r.member_id)?;
        check_id("instance id", &r.instance_id)?;
        let settings = self.coordinator.settings();
        let session_timeout = if r.session_timeout_ms == 0 {
            settings.session_timeout
        } else {
            let asked = Duration::from_millis(u64::from(r.session_timeout_ms));
            if asked < settings.min_session_timeout || asked > settings.max_session_timeout {
                return Err(BrokerError::InvalidRequest(format!(
                    "session timeout {} ms is outside the broker's bounds [{}, {}] ms ([groups] min_session_timeout, max_session_timeout)",
                    r.session_timeout_ms,
                    settings.min_session_timeout.as_millis(),
                    settings.max_session_timeout.as_millis()
                )));
            }
            asked
        };
        let rebalance_timeout = if r.rebalance_timeout_ms == 0 {
            settings.rebalance_timeout
        } else {
            Duration::from_millis(u64::from(r.rebalance_timeout_ms))
        };
        let subscription = match r.subscription {
            None => None,
            Some(s) => {
                if s.topics.len() > MAX_SUBSCRIBED_TOPICS {
                    return Err(BrokerError::InvalidRequest(format!(
                        "a subscription may name at most {MAX_SUBSCRIBED_TOPICS} topics, got {}",
                        s.topics.len()
                    )));
                }
                for t in &s.topics {
                    check_topic_name_length(t)?;
                }
                let bytes: usize = s.topics.iter().map(String::len).sum();
                if bytes > MAX_SUBSCRIPTION_BYTES {
                    return Err(BrokerError::InvalidRequest(format!(
                        "a subscription's topic names may take at most {MAX_SUBSCRIPTION_BYTES} bytes, got {bytes}; subscribe by regex instead"
                    )));
                }
                if s.assignor.len() > MAX_ASSIGNOR_LEN {
                    return Err(BrokerError::InvalidRequest(format!(
                        "assignor name is {} bytes long; at most {MAX_ASSIGNOR_LEN}",
                        s.assignor.len()
                    )));
                }
                let mut topics = s.topics;
                topics.sort();
                topics.dedup();
                let sub = membership::Subscription {
                    topics,
                    regex: s.regex,
                    assignor: s.assignor,
                };
                membership::check_subscription(&sub, self.coordinator.assignors())?;
                Some(sub)
            }
        };
        Ok(Heartbeat {
            group: r.group,
            member_id: r.member_id,
            epoch: r.member_epoch,
            instance_id: r.instance_id,
            subscription,
            owned: partitions(r.owned)?,
            session_timeout,
            rebalance_timeout,
        })
    }
}

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn find_coordinator(
        &self,
        request: Request<FindCoordinatorRequest>,
    ) -> std::result::Result<Response<FindCoordinatorResponse>, Status> {
        let group = request.into_inner().group;
        let (coordinator, address, partition) = self.coordinator.find(&group).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(FindCoordinatorResponse {
            coordinator: coordinator as i32,
            address,
            partition,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<GroupHeartbeatRequest>,
    ) -> std::result::Result<Response<GroupHeartbeatResponse>, Status> {
        let hb = self.heartbeat_of(request.into_inner()).map_err(|e| self.fail(e))?;
        let answer = self.coordinator.heartbeat(hb).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(GroupHeartbeatResponse {
            member_id: answer.member_id,
            member_epoch: answer.epoch,
            heartbeat_interval_ms: answer.interval.as_millis().min(u128::from(u32::MAX)) as u32,
            session_timeout_ms: answer.session_timeout.as_millis().min(u128::from(u32::MAX)) as u32,
            assignment: grouped(answer.assignment),
        }))
    }

    async fn commit_offsets(
        &self,
        request: Request<CommitOffsetsRequest>,
    ) -> std::result::Result<Response<CommitOffsetsResponse>, Status> {
        let r = request.into_inner();
        let commits = (|| {
            GroupCoordinator::check_group_id(&r.group)?;
            check_id("member id", &r.member_id)?;
            Ok::<_, BrokerError>(
                r.offsets
                    .into_iter()
                    .map(|o| Commit {
                        partition: TopicPartition::new(o.topic, o.partition),
                        offset: o.offset,
                        metadata: o.metadata,
                    })
                    .collect::<Vec<_>>(),
            )
        })()
        .map_err(|e| self.fail(e))?;
        self.coordinator
            .commit(&r.group, &r.member_id, r.member_epoch, commits)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(
        &self,
        request: Request<FetchOffsetsRequest>,
    ) -> std::result::Result<Response<FetchOffsetsResponse>, Status> {
        let r = request.into_inner();
        let only: Vec<TopicPartition> = partitions(r.partitions)
            .map_err(|e| self.fail(e))?
            .into_iter()
            .collect();
        let offsets = self
            .coordinator
            .fetch_offsets(&r.group, &only)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(FetchOffsetsResponse {
            offsets: offsets.into_iter().map(committed_offset).collect(),
        }))
    }

    async fn list_groups(
        &self,
        _: Request<ListGroupsRequest>,
    ) -> std::result::Result<Response<ListGroupsResponse>, Status> {
        let me = self.coordinator.node_id() as i32;
        let groups = self
            .coordinator
            .list()
            .await
            .into_iter()
            .map(|s| GroupSummary {
                group: s.group,
                state: s.state.to_string(),
                members: s.members as u32,
                assignor: s.assignor,
                coordinator: me,
            })
            .collect();
        Ok(Response::new(ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        request: Request<DescribeGroupRequest>,
    ) -> std::result::Result<Response<GroupDescription>, Status> {
        let group = request.into_inner().group;
        let d = self.coordinator.describe(&group).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(GroupDescription {
            group: d.group,
            state: d.state.to_string(),
            assignor: d.assignor,
            group_epoch: d.epoch,
            assignment_epoch: d.assignment_epoch,
            coordinator: self.coordinator.node_id() as i32,
            members: d
                .members
                .into_iter()
                .map(|m| MemberDescription {
                    member_id: m.member_id,
                    instance_id: m.instance_id,
                    member_epoch: m.epoch,
                    assignment: grouped(m.assignment),
                    pending_revocation: grouped(m.pending_revocation),
                    subscribed_topics: m.topics,
                    subscribed_regex: m.regex,
                })
                .collect(),
            partitions: d
                .partitions
                .into_iter()
                .map(|p| PartitionLag {
                    topic: p.partition.topic,
                    partition: p.partition.partition,
                    committed: p.committed,
                    log_end_offset: p.log_end_offset,
                    lag: p.lag,
                    member_id: p.owner,
                })
                .collect(),
        }))
    }

    async fn reset_offsets(
        &self,
        request: Request<ResetOffsetsRequest>,
    ) -> std::result::Result<Response<ResetOffsetsResponse>, Status> {
        let r = request.into_inner();
        let to = match r.to {
            Some(reset_offsets_request::To::Earliest(_)) => Reset::Earliest,
            Some(reset_offsets_request::To::Latest(_)) => Reset::Latest,
            Some(reset_offsets_request::To::Offset(o)) => Reset::Offset(o),
            Some(reset_offsets_request::To::Timestamp(ts)) => Reset::Timestamp(ts),
            None => {
                return Err(self.fail(BrokerError::InvalidRequest(
                    "say where to reset to: earliest, latest, an offset or a timestamp".into(),
                )));
            }
        };
        if r.partitions.len() > MAX_PARTITIONS_PER_REQUEST {
            return Err(self.fail(BrokerError::InvalidRequest(format!(
                "a reset may name at most {MAX_PARTITIONS_PER_REQUEST} partitions"
            ))));
        }
        let offsets = self
            .coordinator
            .reset_offsets(&r.group, &r.topic, &r.partitions, to, r.dry_run)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(ResetOffsetsResponse {
            offsets: offsets.into_iter().map(committed_offset).collect(),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<DeleteGroupRequest>,
    ) -> std::result::Result<Response<DeleteGroupResponse>, Status> {
        let group = request.into_inner().group;
        self.coordinator.delete_group(&group).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(DeleteGroupResponse {}))
    }
}
