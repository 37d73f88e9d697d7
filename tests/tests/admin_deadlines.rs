//! Admin calls answer within a deadline. A membership change that waits on a stopped broker
//! answers with what is in progress and goes on in the background; meanwhile topic changes
//! still work, and a second, different membership change is refused at once rather than
//! queued behind it.

use std::time::{Duration, Instant};

use conveyor_client::proto::admin_client::AdminClient;
use conveyor_client::proto::{CreateTopicRequest, ErrorCode, ErrorDetail, ReassignPartitionRequest, RebalanceRequest};
use conveyor_tests::cluster::Cluster;
use conveyor_tests::{cli_json, runtime, wait_for};
use prost::Message;

/// The caller's deadline for a membership call: the broker must answer before it.
const CALL_DEADLINE: Duration = Duration::from_secs(4);
/// What a topic change may take while a membership change waits on a stopped broker.
const TOPIC_CHANGE_DEADLINE: Duration = Duration::from_secs(15);
/// How long every broker may take to report its metadata state in `cluster info`.
const REPORT_DEADLINE: Duration = Duration::from_secs(30);
/// How long the reassignment may take to finish once the stopped broker runs again.
const FINISH_DEADLINE: Duration = Duration::from_secs(120);
/// Pause between attempts of a call answered with a retriable error (BUSY, NOT_LEADER), so
/// the retry loop does not spin against the brokers.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

async fn admin(address: &str) -> AdminClient<tonic::transport::Channel> {
    AdminClient::connect(format!("http://{address}"))
        .await
        .expect("connect")
}

fn reassign_request(topic: &str, replicas: &[i32]) -> tonic::Request<ReassignPartitionRequest> {
    let mut request = tonic::Request::new(ReassignPartitionRequest {
        topic: topic.to_string(),
        partition: 0,
        replicas: replicas.to_vec(),
    });
    request.set_timeout(CALL_DEADLINE);
    request
}

fn detail(status: &tonic::Status) -> ErrorDetail {
    ErrorDetail::decode(status.details()).unwrap_or_default()
}

#[test]
fn given_a_reassignment_waiting_on_a_stopped_broker_admin_calls_should_answer_within_their_deadline() {
    let cluster = Cluster::start(3, &[]);
    let controller = cluster.wait_for_controller(None);
    let created = cli_json(
        &cluster.bootstrap(),
        &["topic", "create", "moving", "--replication-factor", "1"],
    );
    let holder = created["partitions"][0]["replicas"][0].as_u64().expect("a replica") as u32;
    // Neither the controller nor the replica's holder: the broker the replica moves to.
    let target = cluster
        .ids()
        .into_iter()
        .find(|b| *b != controller && *b != holder)
        .expect("a third broker");
    let address = cluster.broker(controller).addr().to_string();
    let rt = runtime();
    // Every broker reports how far it applied the cluster metadata, and no failure.
    wait_for("every broker's metadata state in cluster info", REPORT_DEADLINE, || {
        let info = cli_json(&cluster.bootstrap(), &["cluster", "info"]);
        let brokers = info["brokers"].as_array()?.clone();
        let reported = brokers
            .iter()
            .filter(|b| b["metadata"]["applied_offset"].as_u64().is_some_and(|o| o > 0))
            .inspect(|b| assert!(b["metadata"]["apply_error"].is_null(), "{info}"))
            .count();
        (brokers.len() == 3 && reported == 3).then_some(())
    });

    cluster.broker(target).pause();
    rt.block_on(async {
        let mut client = admin(&address).await;
        let started = Instant::now();
        let answer = client
            .reassign_partition(reassign_request("moving", &[target as i32]))
            .await;
        let status = answer.expect_err("the new replica cannot catch up while its broker is stopped");
        assert!(
            started.elapsed() < CALL_DEADLINE,
            "answered after {:?}, past the caller's deadline",
            started.elapsed()
        );
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        let d = detail(&status);
        assert_eq!(d.code, ErrorCode::MembershipChanging as i32, "{status:?}");
        assert!(d.retriable, "{status:?}");
        assert!(
            status.message().contains("reassignment of topic 'moving' partition 0")
                && status.message().contains("is in progress")
                && status.message().contains("step "),
            "names what is in progress: {}",
            status.message()
        );

        // Topic changes do not wait for the membership change.
        let started = Instant::now();
        let created = tokio::time::timeout(
            TOPIC_CHANGE_DEADLINE,
            client.create_topic(CreateTopicRequest {
                name: "meanwhile".into(),
                partitions: 1,
                replication_factor: 1,
                configs: Default::default(),
            }),
        )
        .await;
        assert!(
            matches!(created, Ok(Ok(_))),
            "topic create answered after {:?}: {created:?}",
            started.elapsed()
        );

        // A different membership change is refused at once, naming the one running.
        let mut rebalance = tonic::Request::new(RebalanceRequest { dry_run: false });
        rebalance.set_timeout(CALL_DEADLINE);
        let refused = client
            .rebalance(rebalance)
            .await
            .expect_err("another change is running");
        assert_eq!(detail(&refused).code, ErrorCode::Busy as i32, "{refused:?}");
        assert!(
            refused.message().contains("reassignment of topic 'moving' partition 0"),
            "{}",
            refused.message()
        );
    });
    cluster.broker(target).resume();

    // The same call again follows the reassignment, which finishes once the broker runs.
    rt.block_on(async {
        let mut client = admin(&address).await;
        let until = Instant::now() + FINISH_DEADLINE;
        loop {
            match client
                .reassign_partition(reassign_request("moving", &[target as i32]))
                .await
            {
                // A job that failed on a slow machine (a step past its own timeout) is
                // finished by the next call, which then reports no move of its own: the
                // replica list below is what counts.
                Ok(_) => break,
                Err(status) if detail(&status).retriable && Instant::now() < until => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(status) => panic!("the reassignment did not finish: {status:?}"),
            }
        }
    });
    // The partition's leader applies the new replica list after the controller answered.
    wait_for("the reassigned replica list", FINISH_DEADLINE, || {
        let described = cli_json(&cluster.bootstrap(), &["topic", "describe", "moving"]);
        (described["partitions"][0]["replicas"] == serde_json::json!([target])).then_some(())
    });
}
