//! Finding a group's coordinator and routing calls to it, for both kinds of group: consumer
//! groups (the `Groups` service) and share groups (the `Shares` service).
//!
//! A consumer group's coordinator is the leader of the `__consumer_offsets` partition its id
//! hashes to; a share group's, of the `__share_state` partition. Any broker answers the
//! kind's FindCoordinator call; every other call must reach the coordinator, and elsewhere
//! fails with NOT_COORDINATOR (naming the coordinator when the broker knows it) or
//! COORDINATOR_LOADING while a new coordinator replays its partition. The two kinds are
//! routed alike and cached apart: a consumer group and a share group of the same name are
//! different groups, usually on different coordinators.
//!
//! The coordinator of each group is cached per [`Client`]; [`route`] (and [`call`], its
//! `Groups` form) follows a redirect to the broker named, looks the coordinator up again
//! after a transport failure or a lost leader, waits briefly while it loads, and gives up at
//! the caller's deadline with [`ClientError::CoordinatorNotAvailable`] (or
//! [`ClientError::ShareCoordinatorNotAvailable`]). Refusals that a retry cannot change (a
//! fenced member, an unknown group, bad input) are returned at once. [`route_once`] makes a
//! single attempt, for calls that must not be repeated at another coordinator (share
//! acknowledgements carry tokens only the coordinator that issued them knows).
//!
//! # Thread-safety
//! The cache is a mutex held only to read or replace one entry, never across a call.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use conveyor_proto::v1::groups_client::GroupsClient;
use conveyor_proto::v1::{ErrorCode, FindCoordinatorRequest, FindCoordinatorResponse};
use tonic::transport::Channel;

use crate::Client;
use crate::cluster::answer_within;
use crate::error::{ClientError, Result};

/// How long one broker is given to answer `FindCoordinator` (it may create
/// `__consumer_offsets` on first use) before the next one is asked.
const FIND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one attempt of a call may take before the coordinator counts as unreachable
/// (shortened to what is left of the caller's deadline).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before retrying at a coordinator named by a redirect: short, since it most
/// likely answers, but not zero, so two brokers naming each other cannot spin.
const REDIRECT_BACKOFF: Duration = Duration::from_millis(20);
/// First pause after a loading coordinator or a failed lookup, doubled up to the maximum.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// Which kind of group, so which service finds its coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum GroupKind {
    /// A consumer group: `Groups.FindCoordinator`, `__consumer_offsets`.
    Consumer,
    /// A share group: `Shares.FindShareCoordinator`, `__share_state`.
    Share,
}

impl GroupKind {
    /// Asks the broker behind `channel` for the coordinator, within `limit`.
    async fn find(
        self,
        channel: Channel,
        request: FindCoordinatorRequest,
        limit: Duration,
    ) -> Result<FindCoordinatorResponse> {
        match self {
            GroupKind::Consumer => {
                let mut grpc = GroupsClient::new(channel);
                answer_within(limit, "FindCoordinator", grpc.find_coordinator(request)).await
            }
            GroupKind::Share => {
                let mut grpc = crate::shares::grpc(channel);
                answer_within(limit, "FindShareCoordinator", grpc.find_share_coordinator(request)).await
            }
        }
    }

    /// The error saying no coordinator of `group` answered.
    fn not_available(self, group: &str, reason: String) -> ClientError {
        let group = group.to_string();
        match self {
            GroupKind::Consumer => ClientError::CoordinatorNotAvailable { group, reason },
            GroupKind::Share => ClientError::ShareCoordinatorNotAvailable { group, reason },
        }
    }
}

/// The broker that coordinates a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCoordinator {
    pub id: i32,
    pub address: String,
}

/// Each group's coordinator as last learned, per client.
#[derive(Debug, Default)]
pub(crate) struct Coordinators {
    cache: Mutex<HashMap<(GroupKind, String), GroupCoordinator>>,
}

impl Coordinators {
    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<(GroupKind, String), GroupCoordinator>> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn get(&self, kind: GroupKind, group: &str) -> Option<GroupCoordinator> {
        self.cache().get(&(kind, group.to_string())).cloned()
    }

    fn set(&self, kind: GroupKind, group: &str, coordinator: GroupCoordinator) {
        self.cache().insert((kind, group.to_string()), coordinator);
    }

    pub(crate) fn forget(&self, kind: GroupKind, group: &str) {
        self.cache().remove(&(kind, group.to_string()));
    }
}

/// What a failed coordinator call asks of the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// The broker named the coordinator: retry there.
    Redirect(GroupCoordinator),
    /// The coordinator is unknown, unreachable or lost its partition: look it up again.
    Refind,
    /// The coordinator is right but not ready (loading its partition, busy): retry there.
    Retry,
    /// A refusal a retry cannot change: give it to the caller.
    Fail,
}

/// How to go on after `error` from a coordinator call (or from the coordinator lookup).
pub(crate) fn classify(error: &ClientError) -> Action {
    match error {
        ClientError::Unreachable { .. }
        | ClientError::Timeout(_)
        | ClientError::CoordinatorNotAvailable { .. }
        | ClientError::ShareCoordinatorNotAvailable { .. } => {
            return Action::Refind;
        }
        ClientError::Broker { detail: Some(d), .. } if d.code == ErrorCode::NotCoordinator as i32 => {
            return if d.leader_id > 0 && !d.leader_address.is_empty() {
                Action::Redirect(GroupCoordinator {
                    id: d.leader_id,
                    address: d.leader_address.clone(),
                })
            } else {
                Action::Refind
            };
        }
        _ => {}
    }
    match error.code() {
        Some(ErrorCode::CoordinatorLoading | ErrorCode::Busy) => Action::Retry,
        Some(
            ErrorCode::LeaderNotAvailable
            | ErrorCode::NotLeader
            | ErrorCode::ShuttingDown
            | ErrorCode::BrokerRemoved
            | ErrorCode::TimedOut,
        ) => Action::Refind,
        // Anything else the broker marks retriable (a metadata write not applied yet, a
        // membership change): the same coordinator again; otherwise a refusal that stands.
        // Without the broker's detail: transient when gRPC says so.
        _ if error.is_retriable() => Action::Retry,
        _ => Action::Fail,
    }
}

/// The coordinator of consumer group `group`: cached, or asked of any broker within `limit`.
pub(crate) async fn find(client: &Client, group: &str, limit: Duration) -> Result<GroupCoordinator> {
    find_of(client, GroupKind::Consumer, group, limit).await
}

/// The coordinator of `group` of `kind`: cached, or asked of any broker within `limit`.
pub(crate) async fn find_of(
    client: &Client,
    kind: GroupKind,
    group: &str,
    limit: Duration,
) -> Result<GroupCoordinator> {
    if let Some(known) = client.coordinators().get(kind, group) {
        return Ok(known);
    }
    let request = FindCoordinatorRequest {
        group: group.to_string(),
    };
    let limit = limit.clamp(Duration::from_millis(1), FIND_TIMEOUT);
    let response = client
        .cluster()
        .any(|channel| kind.find(channel, request.clone(), limit))
        .await?;
    if response.coordinator <= 0 || response.address.is_empty() {
        return Err(kind.not_available(group, "the broker asked named no coordinator".into()));
    }
    let found = GroupCoordinator {
        id: response.coordinator,
        address: response.address,
    };
    client.coordinators().set(kind, group, found.clone());
    Ok(found)
}

/// Runs `call` on consumer group `group`'s coordinator: [`route`] for the `Groups` service.
pub(crate) async fn call<T, F, Fut>(
    client: &Client,
    group: &str,
    what: &'static str,
    deadline: Duration,
    call: F,
) -> Result<T>
where
    F: FnMut(GroupsClient<Channel>) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    route(
        client,
        GroupKind::Consumer,
        group,
        what,
        deadline,
        GroupsClient::new,
        call,
    )
    .await
}

/// Runs `call` on the coordinator of `group` of `kind` (reached through a gRPC client that
/// `connect` makes of a channel), following redirects, coordinator moves and loading, until
/// it answers or `deadline` passed. `what` names the call in errors.
pub(crate) async fn route<C, T, F, Fut>(
    client: &Client,
    kind: GroupKind,
    group: &str,
    what: &'static str,
    deadline: Duration,
    connect: fn(Channel) -> C,
    mut call: F,
) -> Result<T>
where
    F: FnMut(C) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let started = Instant::now();
    let mut backoff = RETRY_BACKOFF;
    loop {
        let left = deadline.saturating_sub(started.elapsed());
        let target = Target { kind, group, what };
        let error = match attempt(client, target, left, connect, &mut call).await {
            Ok(answer) => return Ok(answer),
            Err(e) => e,
        };
        let pause = match follow(client, kind, group, what, &error) {
            None => return Err(error),
            Some(Action::Redirect(_)) => REDIRECT_BACKOFF,
            Some(_) => backoff,
        };
        if started.elapsed() + pause >= deadline {
            return Err(given_up(kind, group, what, deadline, error));
        }
        tracing::debug!(group, error = %error, "{what}: retrying in {pause:?}");
        tokio::time::sleep(pause).await;
        if pause == backoff {
            backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
        }
    }
}

/// One attempt of `call` at the coordinator of `group` of `kind` as cached (or found within
/// `limit`), taking at most `limit`. A failure still updates the cache as [`route`] would
/// (a redirect learned, a lost coordinator forgotten), so the next attempt goes to the
/// right broker; deciding whether and when to try again is the caller's.
pub(crate) async fn route_once<C, T, Fut>(
    client: &Client,
    kind: GroupKind,
    group: &str,
    what: &'static str,
    limit: Duration,
    connect: fn(Channel) -> C,
    call: impl FnOnce(C) -> Fut,
) -> Result<T>
where
    Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let answer = async {
        let coordinator = find_of(client, kind, group, limit).await?;
        let channel = client.cluster().channel_to(&coordinator.address);
        answer_within(limit.max(Duration::from_millis(1)), what, call(connect(channel)))
            .await
            .map_err(|e| e.at(&coordinator.address))
    }
    .await;
    if let Err(e) = &answer {
        follow(client, kind, group, what, e);
    }
    answer
}

/// Which group's coordinator a call is for, and what the call is.
#[derive(Clone, Copy)]
struct Target<'a> {
    kind: GroupKind,
    group: &'a str,
    what: &'static str,
}

/// Updates the cache after `error`; the action to take next, or `None` when the error stands.
fn follow(client: &Client, kind: GroupKind, group: &str, what: &str, error: &ClientError) -> Option<Action> {
    let action = classify(error);
    match &action {
        Action::Fail => return None,
        Action::Redirect(to) => {
            tracing::debug!(group, coordinator = to.id, address = %to.address, "{what}: redirected to the coordinator");
            client.coordinators().set(kind, group, to.clone());
        }
        Action::Refind => client.coordinators().forget(kind, group),
        Action::Retry => {}
    }
    Some(action)
}

async fn attempt<C, T, F, Fut>(
    client: &Client,
    target: Target<'_>,
    left: Duration,
    connect: fn(Channel) -> C,
    call: &mut F,
) -> Result<T>
where
    F: FnMut(C) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let coordinator = find_of(client, target.kind, target.group, left).await?;
    let channel = client.cluster().channel_to(&coordinator.address);
    let limit = left.clamp(Duration::from_millis(1), ATTEMPT_TIMEOUT);
    answer_within(limit, target.what, call(connect(channel)))
        .await
        .map_err(|e| e.at(&coordinator.address))
}

/// The error a call that ran out of time ends with: still a broker's own answer when it
/// was one (its code says what the coordinator was doing), otherwise the coordinator
/// counts as not available.
fn given_up(kind: GroupKind, group: &str, what: &str, deadline: Duration, last: ClientError) -> ClientError {
    match last {
        e @ ClientError::Broker { detail: Some(_), .. } if e.code() != Some(ErrorCode::NotCoordinator) => e,
        e @ (ClientError::CoordinatorNotAvailable { .. } | ClientError::ShareCoordinatorNotAvailable { .. }) => e,
        other => kind.not_available(
            group,
            format!("{what} did not succeed within {deadline:?} (last: {other})"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use conveyor_proto::v1::ErrorDetail;

    use super::*;

    fn broker_error(code: ErrorCode, leader: Option<(i32, &str)>) -> ClientError {
        let (leader_id, leader_address) = leader.unwrap_or((0, ""));
        ClientError::from_detail(ErrorDetail {
            code: code as i32,
            leader_id,
            leader_address: leader_address.to_string(),
            ..ErrorDetail::default()
        })
    }

    #[test]
    fn a_not_coordinator_answer_naming_the_coordinator_redirects_there_and_one_without_a_name_looks_it_up() {
        assert_eq!(
            classify(&broker_error(ErrorCode::NotCoordinator, Some((3, "10.0.0.3:9292")))),
            Action::Redirect(GroupCoordinator {
                id: 3,
                address: "10.0.0.3:9292".into()
            })
        );
        assert_eq!(classify(&broker_error(ErrorCode::NotCoordinator, None)), Action::Refind);
    }

    #[test]
    fn transport_failures_and_lost_leaders_look_the_coordinator_up_again_and_loading_waits_for_it() {
        let unreachable = ClientError::Unreachable {
            address: "x".into(),
            reason: "refused".into(),
        };
        assert_eq!(classify(&unreachable), Action::Refind);
        assert_eq!(classify(&ClientError::Timeout(Duration::from_secs(1))), Action::Refind);
        assert_eq!(
            classify(&broker_error(ErrorCode::LeaderNotAvailable, None)),
            Action::Refind
        );
        assert_eq!(
            classify(&broker_error(ErrorCode::CoordinatorLoading, None)),
            Action::Retry
        );
        assert!(broker_error(ErrorCode::CoordinatorLoading, None).is_retriable());
    }

    #[test]
    fn membership_and_group_refusals_are_the_callers_to_handle() {
        for code in [
            ErrorCode::UnknownMember,
            ErrorCode::FencedMemberEpoch,
            ErrorCode::GroupNotEmpty,
            ErrorCode::UnknownGroup,
            ErrorCode::InvalidRequest,
        ] {
            assert_eq!(classify(&broker_error(code, None)), Action::Fail, "{code:?}");
        }
        assert!(matches!(
            broker_error(ErrorCode::UnknownGroup, None),
            ClientError::Broker {
                code: tonic::Code::NotFound,
                ..
            }
        ));
    }

    #[test]
    fn a_call_that_ran_out_of_time_keeps_the_brokers_answer_or_says_no_coordinator_answered() {
        let loading = given_up(
            GroupKind::Consumer,
            "g",
            "Heartbeat",
            Duration::from_secs(1),
            broker_error(ErrorCode::CoordinatorLoading, None),
        );
        assert_eq!(loading.code(), Some(ErrorCode::CoordinatorLoading));
        let unreachable = ClientError::Unreachable {
            address: "10.0.0.3:9292".into(),
            reason: "connection refused".into(),
        };
        let e = given_up(
            GroupKind::Consumer,
            "g",
            "Heartbeat",
            Duration::from_secs(1),
            unreachable.clone(),
        );
        assert!(matches!(e, ClientError::CoordinatorNotAvailable { .. }), "{e:?}");
        assert!(e.is_retriable());
        assert!(
            e.to_string().contains("connection refused") && e.to_string().contains("'g'"),
            "{e}"
        );
        let e = given_up(GroupKind::Share, "g", "ShareFetch", Duration::from_secs(1), unreachable);
        assert!(matches!(e, ClientError::ShareCoordinatorNotAvailable { .. }), "{e:?}");
        assert!(e.is_retriable() && e.to_string().contains("__share_state"), "{e}");
    }
}
