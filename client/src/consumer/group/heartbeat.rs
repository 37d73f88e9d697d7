//! The heartbeat call and its pacing, and the reconciliation arithmetic the membership task
//! applies to each answer.

use std::collections::BTreeSet;
use std::time::Duration;

use conveyor_proto::v1::{GroupHeartbeatRequest, GroupHeartbeatResponse};

use crate::Client;
use crate::error::Result;
use crate::groups::{TopicPartition, coordinator};

/// How long one heartbeat follows a moving or loading coordinator before the next try.
/// Above the coordinator's 10 s bound on a write: a heartbeat that changes the group is
/// answered once its records commit, and giving up sooner only makes the coordinator reload.
pub(super) const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(12);
/// Pause after a heartbeat that got no answer.
pub(super) const HEARTBEAT_RETRY: Duration = Duration::from_millis(500);
/// Used when the coordinator names no interval.
const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
/// Floor of the coordinator's interval, so a misconfigured one cannot spin the task.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(20);
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Longest pause before rejoining after repeated losses of membership.
const MAX_REJOIN_BACKOFF: Duration = Duration::from_secs(5);

/// Member epochs with a meaning of their own (see `GroupHeartbeatRequest.member_epoch`).
pub(super) const JOIN_EPOCH: i32 = 0;
pub(super) const LEAVE_EPOCH: i32 = -1;
pub(super) const LEAVE_FOR_NOW_EPOCH: i32 = -2;

/// The revoked and added partitions of an assignment, given what is owned.
pub(super) fn reconcile(
    owned: &BTreeSet<TopicPartition>,
    assignment: &BTreeSet<TopicPartition>,
) -> (Vec<TopicPartition>, Vec<TopicPartition>) {
    let revoked = owned.difference(assignment).cloned().collect();
    let added = assignment.difference(owned).cloned().collect();
    (revoked, added)
}

/// The pause before rejoining after `losses` losses of membership in a row: none after
/// the first, then growing, so a coordinator that keeps fencing is not hammered.
pub(super) fn rejoin_backoff(losses: u32) -> Duration {
    if losses <= 1 {
        return Duration::ZERO;
    }
    let exponent = (losses - 2).min(6);
    (Duration::from_millis(100) * 2u32.pow(exponent)).min(MAX_REJOIN_BACKOFF)
}

/// When to heartbeat next, from the coordinator's `heartbeat_interval_ms`.
pub(super) fn heartbeat_interval(ms: u32) -> Duration {
    if ms == 0 {
        return DEFAULT_HEARTBEAT_INTERVAL;
    }
    Duration::from_millis(u64::from(ms)).clamp(MIN_HEARTBEAT_INTERVAL, MAX_HEARTBEAT_INTERVAL)
}

/// One heartbeat to the group's coordinator, following it until `deadline`.
pub(super) async fn send(
    client: &Client,
    group: &str,
    request: GroupHeartbeatRequest,
    deadline: Duration,
) -> Result<GroupHeartbeatResponse> {
    coordinator::call(client, group, "Heartbeat", deadline, |mut grpc| {
        let request = request.clone();
        async move { grpc.heartbeat(request).await }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(partitions: &[(&str, i32)]) -> BTreeSet<TopicPartition> {
        partitions.iter().map(|(t, p)| TopicPartition::new(*t, *p)).collect()
    }

    #[test]
    fn an_assignment_revokes_what_is_owned_outside_it_and_adds_what_is_new_leaving_the_rest() {
        let owned = set(&[("a", 0), ("a", 1), ("b", 0)]);
        let assignment = set(&[("a", 1), ("b", 0), ("b", 1), ("c", 4)]);
        let (revoked, added) = reconcile(&owned, &assignment);
        assert_eq!(revoked, [TopicPartition::new("a", 0)]);
        assert_eq!(added, [TopicPartition::new("b", 1), TopicPartition::new("c", 4)]);
        let (revoked, added) = reconcile(&owned, &owned);
        assert!(
            revoked.is_empty() && added.is_empty(),
            "a stable assignment changes nothing"
        );
        let (revoked, added) = reconcile(&owned, &BTreeSet::new());
        assert_eq!(revoked.len(), 3, "an empty assignment revokes everything");
        assert!(added.is_empty());
    }

    #[test]
    fn rejoins_come_at_once_after_a_first_loss_and_back_off_after_more() {
        assert_eq!(rejoin_backoff(1), Duration::ZERO);
        assert_eq!(rejoin_backoff(2), Duration::from_millis(100));
        assert_eq!(rejoin_backoff(3), Duration::from_millis(200));
        assert_eq!(rejoin_backoff(50), MAX_REJOIN_BACKOFF);
    }

    #[test]
    fn the_coordinators_heartbeat_interval_is_kept_within_sane_bounds() {
        assert_eq!(heartbeat_interval(0), DEFAULT_HEARTBEAT_INTERVAL);
        assert_eq!(heartbeat_interval(1), MIN_HEARTBEAT_INTERVAL);
        assert_eq!(heartbeat_interval(2_500), Duration::from_millis(2_500));
        assert_eq!(heartbeat_interval(u32::MAX), MAX_HEARTBEAT_INTERVAL);
    }
}
