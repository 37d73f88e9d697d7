//! Finding and following a group's coordinator, against in-process fake brokers.

use std::sync::atomic::Ordering;
use std::time::Duration;

use conveyor_proto::v1::{GroupDescription, GroupSummary};

use super::coordinator::GroupKind;
use super::fake::{self, Call};
use crate::Client;

fn description(state: &str) -> GroupDescription {
    GroupDescription {
        group: "g".into(),
        state: state.into(),
        ..GroupDescription::default()
    }
}

fn summary(group: &str, members: u32, coordinator: i32) -> GroupSummary {
    GroupSummary {
        group: group.into(),
        state: "stable".into(),
        members,
        assignor: "sticky".into(),
        coordinator,
    }
}

#[tokio::test]
async fn a_call_goes_to_the_coordinator_any_broker_names_and_waits_while_it_loads() {
    let (a, a_address) = fake::start(1).await;
    let (b, b_address) = fake::start(2).await;
    *a.coordinator.lock().expect("lock") = (2, b_address.clone());
    *a.redirect_to.lock().expect("lock") = Some((2, b_address.clone()));
    *b.described.lock().expect("lock") = description("stable");
    b.loading.store(2, Ordering::SeqCst);

    let client = Client::connect(&a_address).await.expect("connect");
    let described = client.groups().describe_group("g").await.expect("described");
    assert_eq!(described.state, "stable");
    assert!(matches!(a.calls()[..], [Call::FindCoordinator]), "{:?}", a.calls());
    assert_eq!(b.calls().len(), 3, "two loading answers, then the description");
    assert_eq!(
        client.coordinators().get(GroupKind::Consumer, "g").map(|c| c.id),
        Some(2),
        "cached"
    );
}

#[tokio::test]
async fn a_moved_coordinator_is_followed_to_the_broker_its_refusal_names() {
    let (a, a_address) = fake::start(1).await;
    let (b, b_address) = fake::start(2).await;
    *a.coordinator.lock().expect("lock") = (2, b_address.clone());
    *a.described.lock().expect("lock") = description("reconciling");
    *b.described.lock().expect("lock") = description("stable");
    let client = Client::connect(&a_address).await.expect("connect");
    let groups = client.groups();
    assert_eq!(groups.describe_group("g").await.expect("at b").state, "stable");

    // The group moves to broker 1: broker 2 now refuses, naming it.
    *b.redirect_to.lock().expect("lock") = Some((1, a_address.clone()));
    assert_eq!(groups.describe_group("g").await.expect("at a").state, "reconciling");
    assert_eq!(
        client.coordinators().get(GroupKind::Consumer, "g").map(|c| c.id),
        Some(1)
    );
    let finds = a.calls().iter().filter(|c| matches!(c, Call::FindCoordinator)).count();
    assert_eq!(finds, 1, "the redirect named the coordinator: no second lookup");
}

#[tokio::test]
async fn a_coordinator_that_cannot_be_reached_is_looked_up_again() {
    let (a, a_address) = fake::start(1).await;
    *a.described.lock().expect("lock") = description("empty");
    // A broker that was the coordinator and is gone (nothing listens on its port).
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gone_address = gone.local_addr().expect("address").to_string();
    drop(gone);
    *a.coordinator.lock().expect("lock") = (2, gone_address);
    let client = Client::connect(&a_address).await.expect("connect");
    let groups = client.groups();
    let lookup = groups.find_coordinator("g").await.expect("found");
    assert_eq!(lookup.id, 2);
    // The coordinator fails over to broker 1.
    *a.coordinator.lock().expect("lock") = (1, a_address.clone());
    let described = tokio::time::timeout(Duration::from_secs(20), groups.describe_group("g"))
        .await
        .expect("in time")
        .expect("described by the new coordinator");
    assert_eq!(described.state, "empty");
    assert_eq!(
        client.coordinators().get(GroupKind::Consumer, "g").map(|c| c.id),
        Some(1)
    );
}

#[tokio::test]
async fn refusals_a_retry_cannot_change_are_returned_at_once() {
    let (a, a_address) = fake::start(1).await;
    a.script(Err(conveyor_proto::v1::ErrorCode::UnknownMember));
    let client = Client::connect(&a_address).await.expect("connect");
    let request = conveyor_proto::v1::GroupHeartbeatRequest {
        group: "g".into(),
        member_id: "gone".into(),
        member_epoch: 4,
        ..Default::default()
    };
    let e = super::coordinator::call(&client, "g", "Heartbeat", Duration::from_secs(10), |mut grpc| {
        let request = request.clone();
        async move { grpc.heartbeat(request).await }
    })
    .await
    .expect_err("refused");
    assert_eq!(e.code(), Some(conveyor_proto::v1::ErrorCode::UnknownMember));
    assert_eq!(a.heartbeat_requests().len(), 1, "not retried");
}

#[tokio::test]
async fn every_brokers_groups_are_listed_once_and_a_silent_broker_is_reported() {
    let (a, a_address) = fake::start(1).await;
    let (b, b_address) = fake::start(2).await;
    *a.listed.lock().expect("lock") = vec![summary("billing", 0, 1)];
    *b.listed.lock().expect("lock") = vec![summary("billing", 3, 2), summary("audit", 1, 2)];
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gone_address = gone.local_addr().expect("address").to_string();
    drop(gone);
    let client = Client::connect(&a_address).await.expect("connect");
    let listing = client
        .groups()
        .list_from(&[(1, a_address), (2, b_address), (3, gone_address)])
        .await
        .expect("listed");
    let groups: Vec<(&str, u32)> = listing.groups.iter().map(|g| (g.group.as_str(), g.members)).collect();
    assert_eq!(groups, [("audit", 1), ("billing", 3)]);
    assert_eq!(listing.unreachable.len(), 1);
    assert_eq!(listing.unreachable[0].id, 3);
    assert!(listing.unreachable[0].error.is_retriable());
}
