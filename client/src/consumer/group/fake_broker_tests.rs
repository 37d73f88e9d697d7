//! A group member against an in-process fake coordinator and partition leader: what it
//! puts on the wire as assignments change, in which order, and what its stream and events
//! show. (Real brokers are in `tests/`.)

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use conveyor_proto::v1::{ErrorCode, GroupHeartbeatRequest, GroupHeartbeatResponse, TopicPartitions};
use futures::StreamExt;
use tokio::sync::broadcast;

use crate::groups::fake::{self, Call, Fake};
use crate::{
    AssignmentEvent, Client, ClientError, ConsumerConfig, GroupConfig, GroupConsumer, OffsetReset, TopicPartition,
};

const DEADLINE: Duration = Duration::from_secs(10);
const INTERVAL_MS: u32 = 50;

fn answer(member_id: &str, epoch: i32, partitions: &[i32]) -> GroupHeartbeatResponse {
    GroupHeartbeatResponse {
        member_id: member_id.into(),
        member_epoch: epoch,
        heartbeat_interval_ms: INTERVAL_MS,
        session_timeout_ms: 45_000,
        assignment: if partitions.is_empty() {
            Vec::new()
        } else {
            vec![TopicPartitions {
                topic: "t".into(),
                partitions: partitions.to_vec(),
            }]
        },
    }
}

fn owned(h: &GroupHeartbeatRequest) -> BTreeSet<i32> {
    h.owned.iter().flat_map(|t| t.partitions.iter().copied()).collect()
}

fn tp(partition: i32) -> TopicPartition {
    TopicPartition::new("t", partition)
}

async fn member(config: GroupConfig) -> (std::sync::Arc<Fake>, Client, GroupConsumer) {
    let (fake, address) = fake::start(1).await;
    let client = Client::connect(&address).await.expect("connect");
    client.cluster().assume_leader("t", 4, &address);
    let consumer = client
        .consumer(ConsumerConfig::default().max_wait(Duration::from_millis(50)))
        .subscribe(&["t"], "g", config)
        .expect("subscribed");
    (fake, client, consumer)
}

/// Polls the stream (as an application does) until `event` arrives; returns the records
/// read meanwhile as (partition, offset).
async fn poll_until_event(
    member: &mut GroupConsumer,
    events: &mut broadcast::Receiver<AssignmentEvent>,
    event: &AssignmentEvent,
) -> Vec<(i32, u64)> {
    let mut read = Vec::new();
    let waited = tokio::time::timeout(DEADLINE, async {
        loop {
            tokio::select! {
                got = events.recv() => {
                    let got = got.expect("event");
                    if got == *event {
                        return;
                    }
                    panic!("expected {event:?}, got {got:?}");
                }
                record = member.next() => {
                    let record = record.expect("the stream goes on").expect("record");
                    read.push((record.partition, record.offset));
                }
            }
        }
    })
    .await;
    assert!(waited.is_ok(), "no {event:?} within {DEADLINE:?}; read {read:?}");
    read
}

async fn read(member: &mut GroupConsumer, count: usize) -> Vec<(i32, u64)> {
    let mut read = Vec::new();
    while read.len() < count {
        let record = tokio::time::timeout(DEADLINE, member.next())
            .await
            .expect("in time")
            .expect("the stream goes on")
            .expect("record");
        read.push((record.partition, record.offset));
    }
    read
}

#[tokio::test]
async fn a_revoked_partition_is_committed_up_to_what_was_finished_before_the_heartbeat_that_gives_it_up() {
    let (fake, _client, mut member) =
        member(GroupConfig::default().auto_commit(None).reset(OffsetReset::Earliest)).await;
    fake.log_ends
        .lock()
        .expect("lock")
        .extend([(("t".to_string(), 0), 5), (("t".to_string(), 1), 3)]);
    fake.committed.lock().expect("lock").insert(("t".into(), 0), 2);
    fake.script(Ok(answer("m-1", 1, &[0, 1])));
    let mut events = member.events();

    let read_first = poll_until_event(&mut member, &mut events, &AssignmentEvent::Assigned(vec![tp(0), tp(1)])).await;
    let mut all = read_first;
    all.extend(read(&mut member, 6 - all.len()).await);
    all.sort();
    assert_eq!(
        all,
        [(0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2)],
        "p0 from its committed offset, p1 (none committed) from the earliest"
    );
    let join = &fake.heartbeat_requests()[0];
    // A dynamic member names itself on its first join (a retried join replaces itself).
    assert!(join.member_id.starts_with("c-"), "{}", join.member_id);
    assert_eq!(join.member_epoch, 0);
    assert_eq!(
        join.subscription.as_ref().map(|s| s.topics.clone()),
        Some(vec!["t".to_string()])
    );
    assert_eq!(member.member_id().as_deref(), Some("m-1"));
    assert_eq!(member.assignment(), [tp(0), tp(1)]);

    // The coordinator takes partition 1 away.
    fake.script(Ok(answer("m-1", 2, &[0])));
    poll_until_event(&mut member, &mut events, &AssignmentEvent::Revoked(vec![tp(1)])).await;
    fake.wait_for(DEADLINE, "a heartbeat without partition 1", |calls| {
        calls
            .iter()
            .any(|c| matches!(c, Call::Heartbeat(h) if h.member_epoch == 2 && owned(h) == BTreeSet::from([0])))
    })
    .await;
    let calls = fake.calls();
    let commit_at = calls
        .iter()
        .position(|c| matches!(c, Call::Commit(_)))
        .expect("the revoked partition was committed");
    let Call::Commit(commit) = &calls[commit_at] else {
        unreachable!()
    };
    let offsets: Vec<(i32, u64)> = commit.offsets.iter().map(|o| (o.partition, o.offset)).collect();
    assert_eq!(
        offsets,
        [(1, 3)],
        "partition 1's finished position, and nothing of partition 0"
    );
    assert_eq!((commit.member_id.as_str(), commit.member_epoch), ("m-1", 2));
    let confirmed_at = calls
        .iter()
        .position(|c| matches!(c, Call::Heartbeat(h) if owned(h) == BTreeSet::from([0])))
        .expect("confirmed");
    assert!(commit_at < confirmed_at, "committed before giving the partition up");
    for call in &calls[..confirmed_at] {
        if let Call::Heartbeat(h) = call
            && h.member_epoch > 0
        {
            assert!(
                owned(h).contains(&1),
                "partition 1 is owned until the confirmation: {h:?}"
            );
        }
    }
    assert_eq!(member.assignment(), [tp(0)]);
    let p0_fetches = fake
        .fetches
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, p, offset)| *p == 0 && *offset == 2)
        .count();
    assert_eq!(
        p0_fetches, 1,
        "partition 0 kept fetching through the rebalance, never restarted"
    );

    // Fenced: partition 0 is dropped without a commit, and the member rejoins, naming its
    // old id so the coordinator drops that incarnation at once.
    let commits_before = fake.calls().iter().filter(|c| matches!(c, Call::Commit(_))).count();
    fake.script(Err(ErrorCode::FencedMemberEpoch));
    fake.script(Ok(answer("m-2", 3, &[])));
    poll_until_event(&mut member, &mut events, &AssignmentEvent::Lost(vec![tp(0)])).await;
    fake.wait_for(DEADLINE, "a rejoin", |calls| {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::Heartbeat(h) => Some(h),
                _ => None,
            })
            .skip(1)
            .any(|h| h.member_epoch == 0 && h.member_id == "m-1" && h.subscription.is_some())
    })
    .await;
    tokio::time::timeout(DEADLINE, async {
        while member.member_id().as_deref() != Some("m-2") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("rejoined as m-2");
    assert!(member.assignment().is_empty());
    let commits_after = fake.calls().iter().filter(|c| matches!(c, Call::Commit(_))).count();
    assert_eq!(commits_before, commits_after, "a lost partition is not committed");

    member.close().await.expect("closed");
    let last = fake.heartbeat_requests().pop().expect("heartbeats");
    assert_eq!(
        (last.member_id.as_str(), last.member_epoch),
        ("m-2", -1),
        "left the group"
    );
}

#[tokio::test]
async fn heartbeats_go_on_while_the_application_holds_a_record() {
    let (fake, _client, mut member) = member(GroupConfig::default()).await;
    fake.log_ends.lock().expect("lock").insert(("t".into(), 0), 10);
    fake.script(Ok(answer("m-1", 1, &[0])));
    let mut events = member.events();
    poll_until_event(&mut member, &mut events, &AssignmentEvent::Assigned(vec![tp(0)])).await;
    let before = fake.heartbeat_requests().len();
    // Processing one record for a while: the stream is not polled.
    tokio::time::sleep(Duration::from_millis(20 * u64::from(INTERVAL_MS))).await;
    let during = fake.heartbeat_requests().len() - before;
    assert!(during >= 5, "only {during} heartbeats in 20 intervals");
}

#[tokio::test]
async fn commit_sends_the_positions_after_the_records_handed_out_and_close_commits_and_leaves_for_now() {
    let config = GroupConfig::default()
        .instance_id("billing-7")
        .session_timeout(Duration::from_secs(30))
        .rebalance_timeout(Duration::from_secs(60))
        .assignor("range")
        .reset(OffsetReset::Earliest);
    let (fake, _client, mut member) = member(config).await;
    fake.log_ends.lock().expect("lock").insert(("t".into(), 2), 6);
    fake.script(Ok(answer("m-1", 1, &[2])));
    let mut events = member.events();
    poll_until_event(&mut member, &mut events, &AssignmentEvent::Assigned(vec![tp(2)])).await;
    let read_now = read(&mut member, 2).await;
    member.commit().await.expect("committed");
    let expected = read_now.last().map(|(_, o)| o + 1).expect("read");
    assert_eq!(
        fake.committed.lock().expect("lock").get(&("t".into(), 2)),
        Some(&expected)
    );
    read(&mut member, 1).await;
    member.commit_async().await.expect("committed asynchronously");
    assert_eq!(
        fake.committed.lock().expect("lock").get(&("t".into(), 2)),
        Some(&(expected + 1))
    );
    member
        .commit_offsets(&HashMap::from([(tp(2), crate::OffsetAndMetadata::from(1))]))
        .await
        .expect("explicit offsets");
    assert_eq!(fake.committed.lock().expect("lock").get(&("t".into(), 2)), Some(&1));

    let join = &fake.heartbeat_requests()[0];
    assert_eq!(join.instance_id, "billing-7");
    assert_eq!((join.session_timeout_ms, join.rebalance_timeout_ms), (30_000, 60_000));
    assert_eq!(join.subscription.as_ref().map(|s| s.assignor.as_str()), Some("range"));
    assert!(
        fake.heartbeat_requests()[1..].iter().all(|h| h.subscription.is_none()),
        "the subscription is sent only when joining"
    );

    member.close().await.expect("closed");
    assert_eq!(
        fake.committed.lock().expect("lock").get(&("t".into(), 2)),
        Some(&(expected + 1)),
        "close commits the position after the last record handed out"
    );
    let last = fake.heartbeat_requests().pop().expect("heartbeats");
    assert_eq!(
        (last.member_epoch, last.instance_id.as_str()),
        (-2, "billing-7"),
        "a static member leaves for now"
    );
}

#[tokio::test]
async fn without_a_committed_offset_and_reset_none_the_partition_is_reported_and_waits_for_a_seek() {
    let (fake, _client, mut member) = member(GroupConfig::default().reset(OffsetReset::None)).await;
    fake.log_ends.lock().expect("lock").insert(("t".into(), 3), 8);
    fake.script(Ok(answer("m-1", 1, &[3])));
    let error = tokio::time::timeout(DEADLINE, member.next())
        .await
        .expect("in time")
        .expect("an item")
        .expect_err("no committed offset");
    assert!(
        matches!(&error, ClientError::NoCommittedOffset { topic, partition: 3, .. } if topic == "t"),
        "{error:?}"
    );
    assert!(error.to_string().contains("partition 3"), "{error}");
    assert_eq!(member.assignment(), [tp(3)], "assigned, idle");
    member.seek("t", 3, 6).expect("owned");
    assert_eq!(read(&mut member, 2).await, [(3, 6), (3, 7)]);
    let e = member.seek("t", 0, 0).expect_err("not owned");
    assert!(matches!(e, ClientError::InvalidArgument(_)), "{e:?}");
}

#[tokio::test]
async fn a_join_the_group_refuses_ends_the_stream_with_the_refusal() {
    let (fake, _client, mut member) = member(GroupConfig::default().assignor("no-such-assignor")).await;
    fake.script(Err(ErrorCode::InvalidRequest));
    let error = tokio::time::timeout(DEADLINE, member.next())
        .await
        .expect("in time")
        .expect("an item")
        .expect_err("refused");
    assert_eq!(error.code(), Some(ErrorCode::InvalidRequest));
    assert!(
        tokio::time::timeout(DEADLINE, member.next())
            .await
            .expect("in time")
            .is_none()
    );
    member.close().await.expect("nothing to leave");
}
