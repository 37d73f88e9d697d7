//! The controller's metadata snapshots: a broker restarted after many topic creations and
//! deletions has every topic back, loading a snapshot instead of replaying the whole log, and
//! a broker added later, behind the controller's log start, receives the state itself.

use std::time::Duration;

use conveyor_tests::cluster::Cluster;
use conveyor_tests::{cli, cli_json, wait_for};

const DEADLINE: Duration = Duration::from_secs(120);
const TOPICS: usize = 45;

fn topic_names(broker: &str) -> Option<Vec<String>> {
    let out = cli(broker, &["topic", "list", "--output", "json"], "");
    if !out.status.success() {
        return None;
    }
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let mut names: Vec<String> = listed
        .as_array()?
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    Some(names)
}

fn run_cli(broker: &str, args: &[&str]) {
    let out = cli(broker, args, "");
    assert!(
        out.status.success(),
        "conveyor {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn given_many_topic_creations_and_deletions_a_restarted_and_a_new_broker_should_know_every_topic() {
    let mut cluster = Cluster::start_with_config(3, "[cluster]\nmetadata_snapshot_records = 20\n");
    let mut kept = Vec::new();
    for i in 0..TOPICS {
        let name = format!("churn-{i:03}");
        run_cli(
            &cluster.bootstrap(),
            &[
                "topic",
                "create",
                &name,
                "--partitions",
                "1",
                "--replication-factor",
                "2",
            ],
        );
        if i % 3 == 0 {
            kept.push(name);
        } else {
            run_cli(&cluster.bootstrap(), &["topic", "delete", &name]);
        }
    }
    // 45 creations and 30 deletions: snapshots every 20 records, the log compacted below
    // the one before the newest.
    let follower = (1..=3)
        .find(|id| {
            let info = cli_json(cluster.broker(*id).addr(), &["cluster", "info"]);
            info["controller"].as_u64() != Some(u64::from(*id))
        })
        .expect("a broker that is not the controller");
    wait_for("the follower to apply every record", DEADLINE, || {
        (topic_names(cluster.broker(follower).addr())? == kept).then_some(())
    });

    cluster.broker_mut(follower).terminate();
    cluster.broker_mut(follower).restart();
    let names = wait_for("the restarted broker to serve", DEADLINE, || {
        topic_names(cluster.broker(follower).addr())
    });
    assert_eq!(names, kept, "every topic is back after the restart");
    let log = cluster.broker(follower).log();
    assert!(
        log.contains("loaded the metadata snapshot"),
        "the start loaded a snapshot instead of replaying the whole log:\n{log}"
    );

    // A broker added now is behind the controller's log start: it gets the state itself.
    let address = cluster.join(4);
    cli_json(&cluster.bootstrap(), &["cluster", "add-node", "4", &address]);
    let names = wait_for("the new broker to learn every topic", DEADLINE, || {
        topic_names(cluster.broker(4).addr()).filter(|n| *n == kept)
    });
    assert_eq!(names, kept);
    let log = cluster.broker(4).log();
    assert!(
        log.contains("applied the metadata snapshot received from the controller"),
        "the new broker caught up through a snapshot:\n{log}"
    );
    // It follows the log from there: a topic created now reaches it, placed on it too.
    run_cli(
        &cluster.bootstrap(),
        &[
            "topic",
            "create",
            "after-join",
            "--partitions",
            "4",
            "--replication-factor",
            "3",
        ],
    );
    wait_for("the new broker to apply a later creation", DEADLINE, || {
        topic_names(cluster.broker(4).addr())?
            .contains(&"after-join".to_string())
            .then_some(())
    });
}
