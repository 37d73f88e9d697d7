//! Admin requests asked of a broker that holds no replica of a partition, while a replica
//! other than the preferred one leads it: the broker must find the real leader (its first
//! guess, the preferred replica, does not lead) for `topic describe` and for `partition
//! transfer-leader`.

use std::time::Duration;

use conveyor_tests::cluster::{Cluster, describe_at};
use conveyor_tests::{cli, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn a_broker_without_a_replica_finds_a_leader_that_is_not_the_preferred_replica() {
    let cluster = Cluster::start(3, &[]);
    cluster.create_topic("routed", 1, 2, &[]);
    let d = wait_for("the topic's replicas in sync", DEADLINE, || {
        let d = cluster.describe("routed", None)?;
        let p = &d["partitions"][0];
        (p["in_sync"].as_array()?.len() == 2 && p["leader"].as_u64()? > 0).then_some(d)
    });
    let replicas: Vec<u32> = d["partitions"][0]["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r.as_u64().expect("id") as u32)
        .collect();
    let outsider = cluster
        .ids()
        .into_iter()
        .find(|id| !replicas.contains(id))
        .expect("a broker without a replica");
    let (preferred, other) = (replicas[0], replicas[1]);
    // The non-preferred replica leads, asked through one that holds a replica.
    let holders = format!("{},{}", cluster.broker(preferred).addr(), cluster.broker(other).addr());
    wait_for("leadership on the non-preferred replica", DEADLINE, || {
        let out = cli(
            &holders,
            &[
                "partition",
                "transfer-leader",
                "routed",
                "0",
                "--to",
                &other.to_string(),
            ],
            "",
        );
        let d = describe_at(&holders, "routed")?;
        (out.status.success() && d["partitions"][0]["leader"].as_u64() == Some(u64::from(other))).then_some(())
    });
    let outsider_addr = cluster.broker(outsider).addr();
    // Describe through the outsider names the leader and its high watermark.
    let seen = wait_for("the outsider's description", DEADLINE, || {
        describe_at(outsider_addr, "routed")
    });
    assert_eq!(
        seen["partitions"][0]["leader"].as_u64(),
        Some(u64::from(other)),
        "broker {outsider} (no replica) describes: {seen}"
    );
    // Transfer-leader through the outsider reaches the leader.
    let out = cli(
        outsider_addr,
        &[
            "partition",
            "transfer-leader",
            "routed",
            "0",
            "--to",
            &preferred.to_string(),
        ],
        "",
    );
    assert!(
        out.status.success(),
        "transfer through broker {outsider}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("leadership back on the preferred replica", DEADLINE, || {
        let d = describe_at(&holders, "routed")?;
        (d["partitions"][0]["leader"].as_u64() == Some(u64::from(preferred))).then_some(())
    });
}

#[test]
fn a_transfer_to_a_replica_that_cannot_take_over_names_the_leader_that_stays() {
    let cluster = Cluster::start(3, &[]);
    cluster.create_topic("stays", 1, 3, &[]);
    cluster.wait_in_sync("stays", 3);
    let leader = cluster.wait_for_leader("stays", 0, None, DEADLINE);
    let target = cluster.ids().into_iter().find(|&id| id != leader).expect("a follower");
    // A paused follower cannot take over: the transfer times out while the leader stays.
    cluster.broker(target).pause();
    let out = cli(
        cluster.broker(leader).addr(),
        &[
            "partition",
            "transfer-leader",
            "stays",
            "0",
            "--to",
            &target.to_string(),
        ],
        "",
    );
    cluster.broker(target).resume();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the transfer cannot succeed");
    assert!(
        err.contains(&format!("broker {leader} still leads")) && err.contains("retry"),
        "the error names the leader that stays: {err}"
    );
}
