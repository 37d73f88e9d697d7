//! The group coordinator over its raw gRPC protocol, against real brokers: bad input is
//! refused with the right status and changes nothing; group state (members, epochs,
//! committed offsets) survives a SIGKILL of the coordinator's broker in a 3-broker cluster,
//! and the new coordinator answers the same member at the same epoch.

use std::time::Duration;

use conveyor_client::proto::groups_client::GroupsClient;
use conveyor_client::proto::*;
use conveyor_tests::cluster::Cluster;
use conveyor_tests::{BrokerProcess, cli, runtime};
use prost::Message as _;
use tonic::transport::Channel;

const DEADLINE: Duration = Duration::from_secs(60);

async fn groups(addr: &str) -> GroupsClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    GroupsClient::new(channel)
}

fn detail(status: &tonic::Status) -> ErrorDetail {
    ErrorDetail::decode(status.details()).unwrap_or_default()
}

fn join(group: &str, topics: &[&str], assignor: &str) -> GroupHeartbeatRequest {
    GroupHeartbeatRequest {
        group: group.into(),
        member_epoch: 0,
        subscription: Some(Subscription {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            regex: String::new(),
            assignor: assignor.into(),
        }),
        ..Default::default()
    }
}

/// Heartbeats (following NOT_COORDINATOR / COORDINATOR_LOADING to the coordinator) until
/// `accept` says the answer is the one waited for.
async fn heartbeat_until(
    addrs: &[String],
    request: GroupHeartbeatRequest,
    accept: impl Fn(&GroupHeartbeatResponse) -> bool,
) -> GroupHeartbeatResponse {
    let started = std::time::Instant::now();
    let mut at = 0usize;
    loop {
        assert!(
            started.elapsed() < DEADLINE,
            "no accepted heartbeat answer within {DEADLINE:?}"
        );
        let addr = addrs[at % addrs.len()].clone();
        let answer = match tokio::time::timeout(Duration::from_secs(5), async {
            groups(&addr).await.heartbeat(request.clone()).await
        })
        .await
        {
            Ok(a) => a,
            Err(_) => {
                at += 1;
                continue;
            }
        };
        match answer {
            Ok(r) if accept(r.get_ref()) => return r.into_inner(),
            Ok(_) => {}
            Err(s) => {
                let d = detail(&s);
                if d.code == ErrorCode::NotCoordinator as i32
                    && let Some(i) = addrs.iter().position(|a| *a == d.leader_address)
                {
                    at = i;
                    continue;
                }
                assert!(
                    d.retriable || s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown,
                    "heartbeat refused: {s:?}"
                );
                at += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn bad_group_requests_are_refused_and_change_nothing() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    let out = cli(&addr, &["topic", "create", "orders", "--partitions", "2"], "");
    assert!(out.status.success(), "{out:?}");
    runtime().block_on(async {
        let mut g = groups(&addr).await;
        for bad in [String::new(), "g".repeat(256)] {
            let e = g
                .heartbeat(join(&bad, &["orders"], ""))
                .await
                .expect_err("bad group id");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("1 to 255 bytes"), "{e:?}");
        }
        let e = g
            .heartbeat(join("g", &["orders"], "fastest"))
            .await
            .expect_err("unknown assignor");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        for known in ["range", "round-robin", "sticky", "co-partitioned", "lag-aware"] {
            assert!(e.message().contains(known), "{}", e.message());
        }
        let e = g
            .describe_group(DescribeGroupRequest { group: "g".into() })
            .await
            .expect("describe");
        assert_eq!(e.get_ref().state, "dead", "the refused join created nothing");

        let member = g
            .heartbeat(join("g", &["orders"], ""))
            .await
            .expect("join")
            .into_inner();
        assert_eq!(member.assignment.iter().map(|t| t.partitions.len()).sum::<usize>(), 2);
        // A commit for a partition it does not own, and one from a newer epoch.
        let commit = |topic: &str, partition: i32, epoch: i32| CommitOffsetsRequest {
            group: "g".into(),
            member_id: member.member_id.clone(),
            member_epoch: epoch,
            offsets: vec![OffsetCommit {
                topic: topic.into(),
                partition,
                offset: 7,
                metadata: String::new(),
            }],
        };
        for bad in [
            commit("orders", 5, member.member_epoch),
            commit("orders", 0, member.member_epoch + 1),
        ] {
            let e = g.commit_offsets(bad).await.expect_err("fenced commit");
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
            assert_eq!(detail(&e).code, ErrorCode::FencedMemberEpoch as i32);
        }
        g.commit_offsets(commit("orders", 0, member.member_epoch))
            .await
            .expect("commit");
        // Reset and delete need an empty group: refused, offsets unchanged.
        let reset = ResetOffsetsRequest {
            group: "g".into(),
            topic: "orders".into(),
            to: Some(reset_offsets_request::To::Earliest(true)),
            ..Default::default()
        };
        let e = g.reset_offsets(reset.clone()).await.expect_err("active group");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert_eq!(detail(&e).code, ErrorCode::GroupNotEmpty as i32);
        let e = g
            .delete_group(DeleteGroupRequest { group: "g".into() })
            .await
            .expect_err("active group");
        assert_eq!(detail(&e).code, ErrorCode::GroupNotEmpty as i32);
        let offsets = g
            .fetch_offsets(FetchOffsetsRequest {
                group: "g".into(),
                partitions: vec![],
            })
            .await
            .expect("fetch")
            .into_inner()
            .offsets;
        assert_eq!(offsets.len(), 1);
        assert_eq!(offsets[0].offset, 7);
        // Once the member leaves, both work.
        g.heartbeat(GroupHeartbeatRequest {
            group: "g".into(),
            member_id: member.member_id.clone(),
            member_epoch: -1,
            ..Default::default()
        })
        .await
        .expect("leave");
        let reset = g.reset_offsets(reset).await.expect("reset").into_inner();
        assert!(reset.offsets.iter().all(|o| o.offset == 0), "{reset:?}");
        g.delete_group(DeleteGroupRequest { group: "g".into() })
            .await
            .expect("delete");
        let e = g
            .delete_group(DeleteGroupRequest { group: "g".into() })
            .await
            .expect_err("gone");
        assert_eq!(e.code(), tonic::Code::NotFound);
    });
    // Clients may not write to or delete the internal topic.
    let out = cli(&addr, &["produce", "__consumer_offsets"], "x\n");
    assert!(!out.status.success(), "{out:?}");
    let out = cli(&addr, &["topic", "delete", "__consumer_offsets"], "");
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("internal"), "{out:?}");
}

#[test]
fn group_state_survives_a_sigkill_of_the_coordinators_broker() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.create_topic("orders", 4, 3, &[]);
    let addrs: Vec<String> = cluster
        .ids()
        .iter()
        .map(|id| cluster.broker(*id).addr().to_string())
        .collect();
    let (coordinator, member) = runtime().block_on(async {
        // The internal topic is created on first use; its leaders are elected soon after.
        wait_for_coordinator(&addrs).await;
        let joined = heartbeat_until(&addrs, join("workers", &["orders"], ""), |_| true).await;
        // Heartbeat until it owns all four partitions.
        let request = |r: &GroupHeartbeatResponse| GroupHeartbeatRequest {
            group: "workers".into(),
            member_id: r.member_id.clone(),
            member_epoch: r.member_epoch,
            owned: r.assignment.clone(),
            ..Default::default()
        };
        let owning = heartbeat_until(&addrs, request(&joined), |r| {
            r.assignment.iter().map(|t| t.partitions.len()).sum::<usize>() == 4
        })
        .await;
        // The coordinator now (leadership may have moved since the join).
        let found = wait_for_coordinator(&addrs).await;
        let coordinator = addrs
            .iter()
            .position(|a| *a == found)
            .map(|i| cluster.ids()[i])
            .expect("coordinator is a cluster broker");
        let mut g = groups(&found).await;
        g.commit_offsets(CommitOffsetsRequest {
            group: "workers".into(),
            member_id: owning.member_id.clone(),
            member_epoch: owning.member_epoch,
            offsets: (0..4)
                .map(|p| OffsetCommit {
                    topic: "orders".into(),
                    partition: p,
                    offset: 100 + p as u64,
                    metadata: format!("m{p}"),
                })
                .collect(),
        })
        .await
        .expect("commit");
        (coordinator, owning)
    });
    cluster.broker_mut(coordinator).kill();
    let survivors: Vec<String> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != coordinator)
        .map(|id| cluster.broker(id).addr().to_string())
        .collect();
    runtime().block_on(async {
        // The same member at the same epoch is known to the new coordinator, with the same
        // assignment (its session restarted there): no rebalance happened.
        let again = heartbeat_until(
            &survivors,
            GroupHeartbeatRequest {
                group: "workers".into(),
                member_id: member.member_id.clone(),
                member_epoch: member.member_epoch,
                owned: member.assignment.clone(),
                ..Default::default()
            },
            |_| true,
        )
        .await;
        assert_eq!(again.member_epoch, member.member_epoch);
        assert_eq!(again.assignment, member.assignment);
        let found = wait_for_coordinator(&survivors).await;
        let offsets = groups(&found)
            .await
            .fetch_offsets(FetchOffsetsRequest {
                group: "workers".into(),
                partitions: vec![],
            })
            .await
            .expect("fetch offsets")
            .into_inner()
            .offsets;
        let mut got: Vec<(i32, u64, String)> = offsets
            .into_iter()
            .map(|o| (o.partition, o.offset, o.metadata))
            .collect();
        got.sort();
        let want: Vec<(i32, u64, String)> = (0..4).map(|p| (p, 100 + p as u64, format!("m{p}"))).collect();
        assert_eq!(got, want, "committed offsets survive the coordinator's SIGKILL");
    });
}

async fn wait_for_coordinator(addrs: &[String]) -> String {
    let started = std::time::Instant::now();
    loop {
        for a in addrs {
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(3), async {
                groups(a)
                    .await
                    .find_coordinator(FindCoordinatorRequest {
                        group: "workers".into(),
                    })
                    .await
            })
            .await
                && addrs.contains(&r.get_ref().address)
            {
                return r.into_inner().address;
            }
        }
        assert!(started.elapsed() < DEADLINE, "no coordinator among the survivors");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
