//! [`ShareGroups`]: share group administration from outside the group: create ahead of its
//! members, list, describe, purge or redrive the dead letters, delete.
//!
//! Every call but the listing goes to the group's share coordinator; a broker lists only
//! the groups it coordinates, so [`ShareGroups::list`] asks every broker and merges.

use std::collections::BTreeMap;
use std::time::Duration;

use conveyor_proto::v1::shares_client::SharesClient;
use conveyor_proto::v1::{
    CreateShareGroupRequest, CreateShareGroupResponse, DeleteGroupRequest, DescribeShareGroupRequest,
    ListShareGroupsRequest, PurgeDeadLettersRequest, RedriveRequest, ShareGroupDescription, ShareGroupSummary,
};

use crate::Client;
use crate::cluster::answer_within;
use crate::error::{ClientError, Result};
use crate::groups::UnreachableBroker;
use crate::groups::coordinator::{self, GroupKind};

/// How long an admin call follows a moving or loading coordinator before giving up.
const ADMIN_DEADLINE: Duration = Duration::from_secs(30);
/// How long each broker is given to list the share groups it coordinates.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// Redrive copies every dead letter before it answers.
const REDRIVE_DEADLINE: Duration = Duration::from_secs(120);

/// The share groups of the whole cluster, from [`ShareGroups::list`].
#[derive(Debug, Clone)]
pub struct ShareGroupListing {
    /// By group id, each once.
    pub groups: Vec<ShareGroupSummary>,
    /// Brokers that did not answer: the groups they coordinate are missing from `groups`.
    pub unreachable: Vec<UnreachableBroker>,
}

/// Share group administration. Obtain one with [`Client::share_groups`].
///
/// ```no_run
/// # async fn run(client: conveyor_client::Client) -> Result<(), conveyor_client::ClientError> {
/// let shares = client.share_groups();
/// let workers = shares.describe("workers").await?;
/// for p in &workers.partitions {
///     println!("partition {}: {} available, {} acquired", p.partition, p.available, p.acquired);
/// }
/// if workers.dead_letters.unwrap_or(0) > 0 {
///     let n = shares.redrive("workers").await?;
///     println!("{n} dead letters back in {}", workers.topic);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ShareGroups {
    client: Client,
}

impl ShareGroups {
    pub(crate) fn new(client: Client) -> ShareGroups {
        ShareGroups { client }
    }

    /// Every share group of the cluster: each broker lists the groups it coordinates. A
    /// broker that does not answer is reported in [`ShareGroupListing::unreachable`]; when
    /// none answers, the first failure is the error.
    pub async fn list(&self) -> Result<ShareGroupListing> {
        let cluster = self.client.admin().describe_cluster().await?;
        let brokers: Vec<(i32, String)> = cluster.brokers.iter().map(|b| (b.id, b.address.clone())).collect();
        self.client.cluster().learn_brokers(cluster.brokers);
        let asks = brokers.iter().map(|(id, address)| async move {
            let mut grpc = crate::shares::grpc(self.client.cluster().channel_to(address));
            let call = grpc.list_share_groups(ListShareGroupsRequest {});
            let answer = answer_within(LIST_TIMEOUT, "ListShareGroups", call)
                .await
                .map_err(|e| e.at(address));
            (*id, address.clone(), answer.map(|r| r.groups))
        });
        let answers = futures::future::join_all(asks).await;
        let answered = answers.iter().filter(|(_, _, a)| a.is_ok()).count();
        let listing = merge(answers);
        if answered == 0
            && let Some(first) = listing.unreachable.first()
        {
            return Err(first.error.clone());
        }
        Ok(listing)
    }

    /// Creates `group` on `topic` with the group settings of `config` (ordering, lock
    /// duration, delivery count, in-flight records, offset reset, dead-letter topic; the
    /// member settings are not used) before any member joins: starting at "latest", it
    /// then keeps the records produced from now on. A group that exists is left as it is
    /// (`created` false) unless a setting given differs from the group's: that is refused
    /// with `InvalidArgument` naming both.
    pub async fn create(
        &self,
        group: &str,
        topic: &str,
        config: &super::ShareConfig,
    ) -> Result<CreateShareGroupResponse> {
        config.validate()?;
        if topic.is_empty() {
            return Err(ClientError::InvalidArgument("a share group needs a topic".into()));
        }
        let request = CreateShareGroupRequest {
            group: check(group)?,
            topic: topic.to_string(),
            settings: Some(config.settings()),
        };
        self.call(group, "CreateShareGroup", ADMIN_DEADLINE, |mut grpc| {
            let request = request.clone();
            async move { grpc.create_share_group(request).await }
        })
        .await
    }

    /// Settings, members and what each holds, per partition the records by state and the
    /// lag, and the dead letters.
    pub async fn describe(&self, group: &str) -> Result<ShareGroupDescription> {
        let request = DescribeShareGroupRequest { group: check(group)? };
        self.call(group, "DescribeShareGroup", ADMIN_DEADLINE, |mut grpc| {
            let request = request.clone();
            async move { grpc.describe_share_group(request).await }
        })
        .await
    }

    /// Deletes the group's dead-letter topic; returns how many dead letters it held.
    pub async fn purge_dead_letters(&self, group: &str) -> Result<u64> {
        let request = PurgeDeadLettersRequest { group: check(group)? };
        let answer = self
            .call(group, "PurgeDeadLetters", ADMIN_DEADLINE, |mut grpc| {
                let request = request.clone();
                async move { grpc.purge_dead_letters(request).await }
            })
            .await?;
        Ok(answer.purged)
    }

    /// Publishes every dead letter back to the group's topic (same key, value, headers and
    /// partition), then deletes the dead-letter topic; returns how many were republished.
    pub async fn redrive(&self, group: &str) -> Result<u64> {
        let request = RedriveRequest { group: check(group)? };
        let answer = self
            .call(group, "Redrive", REDRIVE_DEADLINE, |mut grpc| {
                let request = request.clone();
                async move { grpc.redrive(request).await }
            })
            .await?;
        Ok(answer.republished)
    }

    /// Removes the group and its state; refused (GROUP_NOT_EMPTY) while it has members.
    pub async fn delete(&self, group: &str) -> Result<()> {
        let request = DeleteGroupRequest { group: check(group)? };
        self.call(group, "DeleteShareGroup", ADMIN_DEADLINE, |mut grpc| {
            let request = request.clone();
            async move { grpc.delete_share_group(request).await }
        })
        .await?;
        Ok(())
    }

    async fn call<T, F, Fut>(&self, group: &str, what: &'static str, deadline: Duration, call: F) -> Result<T>
    where
        F: FnMut(SharesClient<tonic::transport::Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        coordinator::route(
            &self.client,
            GroupKind::Share,
            group,
            what,
            deadline,
            crate::shares::grpc,
            call,
        )
        .await
    }
}

fn check(group: &str) -> Result<String> {
    if group.is_empty() {
        return Err(ClientError::InvalidArgument(
            "a share group id must not be empty".into(),
        ));
    }
    Ok(group.to_string())
}

/// One listing from the brokers' answers; a group listed twice (its coordinator moved
/// between two answers) is kept once, with more members: the live entry.
fn merge(answers: Vec<(i32, String, Result<Vec<ShareGroupSummary>>)>) -> ShareGroupListing {
    let mut groups: BTreeMap<String, ShareGroupSummary> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for (id, address, answer) in answers {
        match answer {
            Ok(listed) => {
                for g in listed {
                    if groups.get(&g.group).is_none_or(|kept| kept.members < g.members) {
                        groups.insert(g.group.clone(), g);
                    }
                }
            }
            Err(error) => unreachable.push(UnreachableBroker { id, address, error }),
        }
    }
    ShareGroupListing {
        groups: groups.into_values().collect(),
        unreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_merge_by_group_keeping_the_entry_with_members() {
        let summary = |group: &str, members, coordinator| ShareGroupSummary {
            group: group.into(),
            topic: "orders".into(),
            members,
            coordinator,
        };
        let listing = merge(vec![
            (
                1,
                "b1".into(),
                Ok(vec![summary("workers", 0, 1), summary("audit", 2, 1)]),
            ),
            (2, "b2".into(), Ok(vec![summary("workers", 3, 2)])),
            (3, "b3".into(), Err(ClientError::Timeout(Duration::from_secs(5)))),
        ]);
        let kept: Vec<(&str, u32)> = listing.groups.iter().map(|g| (g.group.as_str(), g.members)).collect();
        assert_eq!(kept, [("audit", 2), ("workers", 3)]);
        assert_eq!(listing.unreachable.len(), 1);
    }
}
