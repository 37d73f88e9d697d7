//! Consumer group administration: list, describe, committed offsets, reset, delete.
//!
//! Every call but the listing goes to the group's coordinator (`coordinator.rs` finds it
//! and follows it when it moves). A broker lists only the groups it coordinates, so
//! [`Groups::list_groups`] asks every broker of the cluster and merges the answers.
//!
//! Members of a group use the same calls through the group consumer
//! ([`crate::consumer::group`]); the calls here act from outside the group.

pub(crate) mod coordinator;
#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod fake_broker_tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use conveyor_proto::v1::{
    CommitOffsetsRequest, CommittedOffset, DeleteGroupRequest, DescribeGroupRequest, FetchOffsetsRequest,
    GroupDescription, GroupSummary, ListGroupsRequest, OffsetCommit, ResetOffsetsRequest, TopicPartitions,
    groups_client::GroupsClient, reset_offsets_request,
};

pub use coordinator::GroupCoordinator;

use crate::cluster::answer_within;
use crate::error::{ClientError, Result};
use crate::{Client, StartAt};

/// How long an admin call follows a moving or loading coordinator before giving up.
const ADMIN_DEADLINE: Duration = Duration::from_secs(30);
/// How long each broker is given to list the groups it coordinates.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// One partition of a topic.
///
/// ```
/// let p = conveyor_client::TopicPartition::new("orders", 3);
/// assert_eq!(p.to_string(), "orders[3]");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> TopicPartition {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// An offset to commit: the next offset to consume, with free-form metadata kept beside it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OffsetAndMetadata {
    pub offset: u64,
    pub metadata: String,
}

impl From<u64> for OffsetAndMetadata {
    fn from(offset: u64) -> Self {
        OffsetAndMetadata {
            offset,
            metadata: String::new(),
        }
    }
}

/// The groups of the whole cluster, from [`Groups::list_groups`].
#[derive(Debug, Clone)]
pub struct GroupListing {
    /// By group id, each once.
    pub groups: Vec<GroupSummary>,
    /// Brokers that did not answer: the groups they coordinate are missing from `groups`.
    pub unreachable: Vec<UnreachableBroker>,
}

#[derive(Debug, Clone)]
pub struct UnreachableBroker {
    pub id: i32,
    pub address: String,
    pub error: ClientError,
}

/// Consumer group administration. Obtain one with [`Client::groups`].
///
/// ```no_run
/// # async fn run(client: conveyor_client::Client) -> Result<(), conveyor_client::ClientError> {
/// use conveyor_client::StartAt;
/// let groups = client.groups();
/// for g in groups.list_groups().await?.groups {
///     println!("{} {} ({} members)", g.group, g.state, g.members);
/// }
/// let lagging = groups.describe_group("billing").await?;
/// for p in &lagging.partitions {
///     println!("{}[{}] lag {:?}", p.topic, p.partition, p.lag);
/// }
/// // With the group's consumers stopped: replay the last hour of "orders".
/// let an_hour_ago = conveyor_storage::unix_millis() - 3_600_000;
/// groups.reset_offsets("billing", "orders", &[], StartAt::Timestamp(an_hour_ago), false).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Groups {
    client: Client,
}

impl Groups {
    pub(crate) fn new(client: Client) -> Groups {
        Groups { client }
    }

    /// The broker that coordinates `group` (cached once learned).
    pub async fn find_coordinator(&self, group: &str) -> Result<GroupCoordinator> {
        check_group(group)?;
        coordinator::find(&self.client, group, ADMIN_DEADLINE).await
    }

    /// Every group of the cluster: each broker lists the groups it coordinates. A broker
    /// that does not answer is reported in [`GroupListing::unreachable`]; when none answers,
    /// the first failure is the error.
    pub async fn list_groups(&self) -> Result<GroupListing> {
        let cluster = self.client.admin().describe_cluster().await?;
        let brokers: Vec<(i32, String)> = cluster.brokers.iter().map(|b| (b.id, b.address.clone())).collect();
        self.client.cluster().learn_brokers(cluster.brokers);
        self.list_from(&brokers).await
    }

    /// Lists the groups of each of `brokers` (id, address), concurrently, and merges them.
    pub(crate) async fn list_from(&self, brokers: &[(i32, String)]) -> Result<GroupListing> {
        let asks = brokers.iter().map(|(id, address)| async move {
            let mut grpc = GroupsClient::new(self.client.cluster().channel_to(address));
            let answer = answer_within(LIST_TIMEOUT, "ListGroups", grpc.list_groups(ListGroupsRequest {}))
                .await
                .map_err(|e| e.at(address));
            (*id, address.clone(), answer.map(|r| r.groups))
        });
        let answers = futures::future::join_all(asks).await;
        let answered = answers.iter().filter(|(_, _, a)| a.is_ok()).count();
        let listing = merge_listings(answers);
        if answered == 0
            && let Some(first) = listing.unreachable.first()
        {
            return Err(first.error.clone());
        }
        Ok(listing)
    }

    /// State, members with their assignments, and per partition the committed offset, log
    /// end offset and lag.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        check_group(group)?;
        let request = DescribeGroupRequest {
            group: group.to_string(),
        };
        coordinator::call(&self.client, group, "DescribeGroup", ADMIN_DEADLINE, |mut grpc| {
            let request = request.clone();
            async move { grpc.describe_group(request).await }
        })
        .await
    }

    /// The group's committed offsets of `partitions` (all it committed when empty); a
    /// partition with nothing committed is absent.
    pub async fn fetch_offsets(&self, group: &str, partitions: &[TopicPartition]) -> Result<Vec<CommittedOffset>> {
        check_group(group)?;
        fetch_offsets(&self.client, group, partitions, ADMIN_DEADLINE).await
    }

    /// Commits offsets for the group from outside it, as a tool would (member id empty,
    /// member epoch -1); the coordinator refuses it while the group has members, whose own
    /// commits would race with it.
    pub async fn commit_offsets(
        &self,
        group: &str,
        offsets: &HashMap<TopicPartition, OffsetAndMetadata>,
    ) -> Result<()> {
        check_group(group)?;
        let offsets = offsets.iter().map(|(p, o)| offset_commit(p, o)).collect();
        commit(&self.client, group, "", -1, offsets, ADMIN_DEADLINE).await
    }

    /// Moves the group's committed offsets of `topic` (`partitions`, or every partition when
    /// empty) to `to`, and returns them; with `dry_run`, only computes them. Refused with
    /// GROUP_NOT_EMPTY while the group has members: stop its consumers first.
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: &[i32],
        to: StartAt,
        dry_run: bool,
    ) -> Result<Vec<CommittedOffset>> {
        check_group(group)?;
        let to = match to {
            StartAt::Earliest => reset_offsets_request::To::Earliest(true),
            StartAt::Latest => reset_offsets_request::To::Latest(true),
            StartAt::Offset(o) => reset_offsets_request::To::Offset(o),
            StartAt::Timestamp(ts) => reset_offsets_request::To::Timestamp(ts),
        };
        let request = ResetOffsetsRequest {
            group: group.to_string(),
            topic: topic.to_string(),
            partitions: partitions.to_vec(),
            to: Some(to),
            dry_run,
        };
        let response = coordinator::call(&self.client, group, "ResetOffsets", ADMIN_DEADLINE, |mut grpc| {
            let request = request.clone();
            async move { grpc.reset_offsets(request).await }
        })
        .await?;
        Ok(response.offsets)
    }

    /// Removes the group and its committed offsets; refused while it has members.
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        check_group(group)?;
        let request = DeleteGroupRequest {
            group: group.to_string(),
        };
        coordinator::call(&self.client, group, "DeleteGroup", ADMIN_DEADLINE, |mut grpc| {
            let request = request.clone();
            async move { grpc.delete_group(request).await }
        })
        .await?;
        Ok(())
    }
}

fn check_group(group: &str) -> Result<()> {
    if group.is_empty() {
        return Err(ClientError::InvalidArgument(
            "a consumer group id must not be empty".into(),
        ));
    }
    Ok(())
}

pub(crate) fn offset_commit(partition: &TopicPartition, offset: &OffsetAndMetadata) -> OffsetCommit {
    OffsetCommit {
        topic: partition.topic.clone(),
        partition: partition.partition,
        offset: offset.offset,
        metadata: offset.metadata.clone(),
    }
}

/// Partitions grouped by topic, as the wire carries them; topics and partitions in order.
pub(crate) fn by_topic<'a>(partitions: impl IntoIterator<Item = &'a TopicPartition>) -> Vec<TopicPartitions> {
    let mut topics: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for p in partitions {
        topics.entry(&p.topic).or_default().push(p.partition);
    }
    topics
        .into_iter()
        .map(|(topic, mut partitions)| {
            partitions.sort_unstable();
            partitions.dedup();
            TopicPartitions {
                topic: topic.to_string(),
                partitions,
            }
        })
        .collect()
}

/// The partitions of a wire list, flattened.
pub(crate) fn flatten(topics: &[TopicPartitions]) -> impl Iterator<Item = TopicPartition> + '_ {
    topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(|&p| TopicPartition::new(t.topic.clone(), p)))
}

pub(crate) async fn fetch_offsets(
    client: &Client,
    group: &str,
    partitions: &[TopicPartition],
    deadline: Duration,
) -> Result<Vec<CommittedOffset>> {
    let request = FetchOffsetsRequest {
        group: group.to_string(),
        partitions: by_topic(partitions),
    };
    let response = coordinator::call(client, group, "FetchOffsets", deadline, |mut grpc| {
        let request = request.clone();
        async move { grpc.fetch_offsets(request).await }
    })
    .await?;
    Ok(response.offsets)
}

pub(crate) async fn commit(
    client: &Client,
    group: &str,
    member_id: &str,
    member_epoch: i32,
    offsets: Vec<OffsetCommit>,
    deadline: Duration,
) -> Result<()> {
    let request = CommitOffsetsRequest {
        group: group.to_string(),
        member_id: member_id.to_string(),
        member_epoch,
        offsets,
    };
    coordinator::call(client, group, "CommitOffsets", deadline, |mut grpc| {
        let request = request.clone();
        async move { grpc.commit_offsets(request).await }
    })
    .await?;
    Ok(())
}

/// One listing from the brokers' answers. A group listed twice (its coordinator moved
/// between two answers) is kept once: the entry with more members, which is the live one
/// while the old coordinator still reports it empty.
fn merge_listings(answers: Vec<(i32, String, Result<Vec<GroupSummary>>)>) -> GroupListing {
    let mut groups: BTreeMap<String, GroupSummary> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for (id, address, answer) in answers {
        match answer {
            Ok(listed) => {
                for g in listed {
                    match groups.get(&g.group) {
                        Some(kept) if kept.members >= g.members => {}
                        _ => {
                            groups.insert(g.group.clone(), g);
                        }
                    }
                }
            }
            Err(error) => unreachable.push(UnreachableBroker { id, address, error }),
        }
    }
    GroupListing {
        groups: groups.into_values().collect(),
        unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(group: &str, members: u32, coordinator: i32) -> GroupSummary {
        GroupSummary {
            group: group.into(),
            state: if members > 0 { "stable" } else { "empty" }.into(),
            members,
            assignor: "sticky".into(),
            coordinator,
        }
    }

    #[test]
    fn listings_of_all_brokers_merge_by_group_keeping_the_live_entry_of_a_group_listed_twice() {
        let unreachable = ClientError::Unreachable {
            address: "b3".into(),
            reason: "refused".into(),
        };
        let listing = merge_listings(vec![
            (
                1,
                "b1".into(),
                Ok(vec![summary("billing", 0, 1), summary("audit", 1, 1)]),
            ),
            (2, "b2".into(), Ok(vec![summary("billing", 3, 2)])),
            (3, "b3".into(), Err(unreachable)),
        ]);
        let kept: Vec<(&str, u32, i32)> = listing
            .groups
            .iter()
            .map(|g| (g.group.as_str(), g.members, g.coordinator))
            .collect();
        assert_eq!(kept, [("audit", 1, 1), ("billing", 3, 2)]);
        assert_eq!(listing.unreachable.len(), 1);
        assert_eq!(listing.unreachable[0].id, 3);
    }

    #[test]
    fn partitions_travel_grouped_by_topic_in_order_and_come_back_flat() {
        let partitions = [
            TopicPartition::new("b", 2),
            TopicPartition::new("a", 1),
            TopicPartition::new("b", 0),
            TopicPartition::new("b", 2),
        ];
        let wire = by_topic(&partitions);
        assert_eq!(
            wire,
            [
                TopicPartitions {
                    topic: "a".into(),
                    partitions: vec![1]
                },
                TopicPartitions {
                    topic: "b".into(),
                    partitions: vec![0, 2]
                },
            ]
        );
        let back: Vec<String> = flatten(&wire).map(|p| p.to_string()).collect();
        assert_eq!(back, ["a[1]", "b[0]", "b[2]"]);
    }
}
