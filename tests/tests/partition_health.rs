//! The partition health gauges of a three-broker cluster losing a broker: its leaders report
//! the partitions it held a replica of as under-replicated, and the controller reports the
//! partitions it held the only replica of as offline.

use std::time::Duration;

use conveyor_tests::cluster::Cluster;
use conveyor_tests::wait_for;

const DEADLINE: Duration = Duration::from_secs(120);

/// The sum of an unlabelled gauge over the brokers other than `skip`.
fn sum(cluster: &Cluster, name: &str, skip: Option<u32>) -> Option<f64> {
    cluster
        .ids()
        .into_iter()
        .filter(|id| Some(*id) != skip)
        .map(|id| cluster.broker(id).metric(name))
        .sum()
}

#[test]
fn given_a_broker_down_leaders_should_report_under_replicated_and_the_controller_offline_partitions() {
    let mut cluster = Cluster::start(3, &[]);
    let controller = cluster.wait_for_controller(None);
    cluster.create_topic("replicated", 1, 3, &[]);
    cluster.create_topic("lone", 3, 1, &[]);
    cluster.wait_in_sync("replicated", 3);
    wait_for("nothing under-replicated or offline", DEADLINE, || {
        let under = sum(&cluster, "conveyor_under_replicated_partitions", None)?;
        let offline = cluster.broker(controller).metric("conveyor_offline_partitions")?;
        (under == 0.0 && offline == 0.0).then_some(())
    });
    assert_eq!(cluster.broker(controller).metric("conveyor_controller"), Some(1.0));

    // The victim is not the controller and holds the only replica of some partition.
    let lone = cluster.describe("lone", None).expect("describe lone");
    let only_on = |id: u32| {
        lone["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .filter(|p| p["replicas"].as_array().is_some_and(|r| r.len() == 1 && r[0] == id))
            .count() as f64
    };
    let victim = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != controller)
        .max_by_key(|id| only_on(*id) as u64)
        .expect("a broker");
    let only_on_victim = only_on(victim);
    assert!(
        only_on_victim >= 1.0,
        "a lone partition on a broker that is not the controller: {lone}"
    );
    cluster.broker_mut(victim).kill();

    wait_for("the replicated partition reported under-replicated", DEADLINE, || {
        (sum(&cluster, "conveyor_under_replicated_partitions", Some(victim))? == 1.0).then_some(())
    });
    wait_for("the partitions lost with the broker reported offline", DEADLINE, || {
        let offline = cluster.broker(controller).metric("conveyor_offline_partitions")?;
        (offline == only_on_victim).then_some(())
    });
    let other = cluster
        .ids()
        .into_iter()
        .find(|id| *id != controller && *id != victim)
        .expect("a third broker");
    assert_eq!(
        cluster.broker(other).metric("conveyor_offline_partitions"),
        Some(0.0),
        "only the controller counts offline partitions"
    );
}
