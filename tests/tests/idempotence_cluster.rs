//! Idempotent produce in a three-broker cluster: a follower that caught up from a Raft
//! snapshot (its leader's retention deleted what it lacked) gets the producer state with it,
//! and answers a retry with the original offsets once it leads.

use std::time::Duration;

use conveyor_client::proto::Acks;
use conveyor_tests::cluster::Cluster;
use conveyor_tests::raw_produce::{batch, connect, new_producer, request, send, send_until_answered};
use conveyor_tests::{runtime, wait_for};

const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn a_follower_that_caught_up_from_a_snapshot_answers_a_retry_with_the_original_offsets_once_it_leads() {
    let mut cluster = Cluster::start_with_config(3, "[log]\nretention_check_interval = \"100ms\"\n");
    cluster.create_topic(
        "t",
        1,
        3,
        &[
            "--config",
            "segment.bytes=4096",
            "--config",
            "max.message.bytes=2048",
            "--config",
            "retention.bytes=16384",
        ],
    );
    let leader = cluster.wait_for_leader("t", 0, None, DEADLINE);
    let follower = cluster.ids().into_iter().find(|i| *i != leader).expect("a follower");
    let rt = runtime();
    let leader_addr = cluster.broker(leader).addr().to_string();
    // Down before the producer writes: all it can know of the producer is what the snapshot
    // it installs carries.
    cluster.broker_mut(follower).kill();
    // Producer ids come from the controller: one of the live brokers.
    cluster.wait_for_controller(Some(follower));
    let (pid, last, last_offsets) = rt.block_on(async {
        let mut produce = connect(&leader_addr).await;
        let pid = new_producer(&mut produce).await;
        let mut last = None;
        for seq in 0..3 {
            let b = batch(pid, 0, seq, &["idempotent"]);
            let req = request("t", Acks::All, b.clone());
            let offsets = send_until_answered(&mut produce, req, DEADLINE).await.expect("append");
            last = Some((b, offsets));
        }
        let (b, offsets) = last.expect("three batches");
        (pid, b, offsets)
    });
    let filler = "x".repeat(900);
    rt.block_on(async {
        let mut produce = connect(&leader_addr).await;
        for _ in 0..400 {
            let plain = batch(-1, -1, -1, &[&filler]);
            send_until_answered(&mut produce, request("t", Acks::All, plain), DEADLINE)
                .await
                .expect("filler");
        }
    });
    wait_for("retention to pass the producer's batches", DEADLINE, || {
        let d = cluster.describe("t", Some(follower))?;
        let start = d["partitions"][0]["log_start_offset"].as_u64()?;
        (start > last_offsets.1 + 100).then_some(start)
    });
    cluster.broker_mut(follower).restart();
    cluster.wait_in_sync("t", 3);
    cluster.transfer_leader("t", 0, follower);
    let follower_addr = cluster.broker(follower).addr().to_string();
    rt.block_on(async {
        let mut produce = connect(&follower_addr).await;
        let retry = send_until_answered(&mut produce, request("t", Acks::All, last.clone()), DEADLINE).await;
        assert_eq!(
            retry,
            Ok(last_offsets),
            "the new leader knows the producer from the snapshot it installed"
        );
        let next = send(&mut produce, request("t", Acks::All, batch(pid, 0, 3, &["next"]))).await;
        assert!(next.is_ok(), "the producer goes on in sequence: {next:?}");
    });
}
