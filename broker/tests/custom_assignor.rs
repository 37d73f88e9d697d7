//! A custom partition assignor, registered in the `Plugins` of a broker started through the
//! library (as a broker binary of one's own would), is chosen by name by a group's members:
//! the example of docs/consumer-groups.md, run.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use conveyor_broker::coordinator::groups::assignor::*;
use conveyor_broker::{BrokerConfig, Plugins};
use conveyor_proto::v1::admin_client::AdminClient;
use conveyor_proto::v1::groups_client::GroupsClient;
use conveyor_proto::v1::{CreateTopicRequest, GroupHeartbeatRequest, Subscription};
use tonic::transport::Channel;

/// Gives every partition to the member with the smallest id: a hot standby.
#[derive(Debug)]
struct Standby;

impl PartitionAssignor for Standby {
    fn name(&self) -> &str {
        "standby"
    }
    fn assign(&self, spec: &AssignmentSpec<'_>) -> Result<Assignment, AssignError> {
        let mut out: Assignment = spec
            .members
            .iter()
            .map(|m| (m.member_id.clone(), Default::default()))
            .collect();
        for m in spec.members {
            for topic in &m.topics {
                let owner = spec
                    .members
                    .iter()
                    .find(|o| o.topics.contains(topic))
                    .map(|o| &o.member_id);
                if owner == Some(&m.member_id) {
                    let count = spec.topics.get(topic).copied().unwrap_or(0);
                    let share = out.entry(m.member_id.clone()).or_default();
                    share.extend((0..count as i32).map(|p| TopicPartition::new(topic.clone(), p)));
                }
            }
        }
        Ok(out)
    }
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_assignor_is_chosen_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = BrokerConfig::default();
    config.broker.data_dir = dir.path().join("data");
    config.broker.listen = free_port();
    config.broker.metrics_listen = free_port();
    let address = config.broker.listen;
    let mut assignors = Assignors::builtin();
    assignors.register(Arc::new(Standby));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let broker = tokio::spawn(conveyor_broker::run_until_with(
        config,
        Plugins { assignors },
        async {
            let _ = stopped.await;
        },
        std::future::pending(),
    ));
    let channel = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match Channel::from_shared(format!("http://{address}"))
                .expect("uri")
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("broker did not start: {e}"),
            }
        }
    };
    AdminClient::new(channel.clone())
        .create_topic(CreateTopicRequest {
            name: "orders".into(),
            partitions: 4,
            ..Default::default()
        })
        .await
        .expect("create topic");
    let mut groups = GroupsClient::new(channel);
    let join = GroupHeartbeatRequest {
        group: "standby-group".into(),
        member_epoch: 0,
        subscription: Some(Subscription {
            topics: vec!["orders".into()],
            regex: String::new(),
            assignor: "standby".into(),
        }),
        ..Default::default()
    };
    let first = groups.heartbeat(join.clone()).await.expect("join").into_inner();
    let second = groups.heartbeat(join).await.expect("join").into_inner();
    let owned = |r: &conveyor_proto::v1::GroupHeartbeatResponse| -> BTreeSet<i32> {
        r.assignment.iter().flat_map(|t| t.partitions.iter().copied()).collect()
    };
    let all: BTreeSet<i32> = (0..4).collect();
    assert_eq!(owned(&first), all, "the only member owns everything");
    assert!(
        first.member_id < second.member_id,
        "ids sort in the order they were issued"
    );
    // The first member heartbeats again, now that the second is in. A balancing assignor
    // would take half its partitions away (the answer would leave them out); the standby
    // assignor leaves it everything.
    let again = groups
        .heartbeat(GroupHeartbeatRequest {
            group: "standby-group".into(),
            member_id: first.member_id.clone(),
            member_epoch: first.member_epoch,
            owned: first.assignment.clone(),
            ..Default::default()
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert_eq!(
        owned(&again),
        all,
        "the standby assignor left the first member everything"
    );
    assert!(
        again.member_epoch > first.member_epoch,
        "it moved to the new assignment's epoch"
    );
    let described = groups
        .describe_group(conveyor_proto::v1::DescribeGroupRequest {
            group: "standby-group".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(described.assignor, "standby");
    assert_eq!(
        described.state, "stable",
        "the second member's target is empty: nothing to move"
    );
    let _ = stop.send(());
    broker.await.expect("broker task").expect("broker stopped cleanly");
}
