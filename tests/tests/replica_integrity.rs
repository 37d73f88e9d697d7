//! What a replica may trust about itself (ARCHITECTURE.md section 9), from outside: an
//! unclean restart right after a replica arrived must not delete it, a follower whose log
//! lost committed entries to a corrupt tail must recover from its leader instead of
//! panicking, and a replica moved away while its broker was down must be deleted once the
//! broker is back. Every acknowledged record must be read back in each case.

use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor_client::{Client, ProducerConfig, ProducerRecord};
use conveyor_tests::checker::{Acked, check};
use conveyor_tests::cluster::{Cluster, describe_at};
use conveyor_tests::{BrokerProcess, cli, cli_json, poll_for, read_all, wait_for};

/// How long a replica may take to catch up, or a partition to elect a leader, on a loaded
/// two-core machine.
const DEADLINE: Duration = Duration::from_secs(60);
/// Records sent before waiting for their acknowledgements.
const RECORDS_PER_ROUND: usize = 20;
/// A file the broker does not know, put into a replica's directory to tell whether the
/// directory itself survived a restart.
const MARKER: &str = "test-survivor-marker";

/// Sends `count` records `NAME-i` to `topic`, each acknowledged by every in-sync replica,
/// and returns what was acknowledged.
fn produce(bootstrap: &str, topic: &str, name: &str, count: u64) -> Vec<Acked> {
    conveyor_tests::runtime().block_on(async {
        let client = Client::connect(bootstrap).await.expect("connect");
        let config = ProducerConfig::default()
            .linger(Duration::from_millis(2))
            .retries(1_000)
            .delivery_timeout(Duration::from_secs(60));
        let producer = client.producer(config).expect("producer config");
        let mut acked = Vec::new();
        let mut pending = Vec::new();
        for i in 0..count {
            let id = format!("{name}-{i}");
            let delivery = producer
                .send(ProducerRecord::new(topic, id.clone()))
                .await
                .expect("send");
            pending.push((id, delivery));
            // Waiting now and then spreads the records over many batches.
            if pending.len() == RECORDS_PER_ROUND || i + 1 == count {
                for (id, delivery) in pending.drain(..) {
                    let written = delivery.await.expect("acknowledged");
                    acked.push(Acked {
                        id,
                        partition: written.partition,
                        offset: written.offset.expect("acks=all returns offsets"),
                    });
                }
            }
        }
        acked
    })
}

/// Reads `topic` through `from` and asserts that every record of `acked` is there, in order.
fn assert_all_read_back(from: &str, topic: &str, acked: &[Acked]) {
    let observed = conveyor_tests::runtime().block_on(read_all(from, topic));
    let report = check(acked, &observed);
    println!("read {topic} from {from}: {report}");
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.reordered.is_empty(), "{report}");
}

fn create(cluster: &Cluster, topic: &str, extra: &[&str]) {
    // Replicas are placed only on brokers the controller has heard from.
    wait_for("every broker seen alive", DEADLINE, || {
        let info = cluster.info(None)?;
        let brokers = info["brokers"].as_array()?;
        let alive = brokers.iter().filter(|b| b["alive"] == true).count();
        (alive == cluster.ids().len()).then_some(())
    });
    let mut args = vec![
        "topic",
        "create",
        topic,
        "--partitions",
        "1",
        "--replication-factor",
        "3",
    ];
    args.extend_from_slice(extra);
    let out = cli(&cluster.bootstrap(), &args, "");
    assert!(
        out.status.success(),
        "create {topic}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bootstrap list of `brokers`.
fn addresses(cluster: &Cluster, brokers: &[u32]) -> String {
    let addresses: Vec<&str> = brokers.iter().map(|b| cluster.broker(*b).addr()).collect();
    addresses.join(",")
}

/// `topic describe` asked of `asked`, brokers that hold a replica: a broker without one
/// asks only the preferred replica and, unless it leads, knows no leader.
fn describe(cluster: &Cluster, topic: &str, asked: &[u32]) -> Option<serde_json::Value> {
    describe_at(&addresses(cluster, asked), topic)
}

/// Partition 0's replicas, once a broker describes the topic (it may be busy for a moment).
fn replicas(cluster: &Cluster, topic: &str, asked: &[u32]) -> Vec<u32> {
    wait_for("the topic described", DEADLINE, || replicas_now(cluster, topic, asked))
}

fn replicas_now(cluster: &Cluster, topic: &str, asked: &[u32]) -> Option<Vec<u32>> {
    let d = describe(cluster, topic, asked)?;
    d["partitions"][0]["replicas"]
        .as_array()?
        .iter()
        .map(|r| r.as_u64().map(|r| r as u32))
        .collect()
}

/// Waits until partition 0 of `topic` reports `want` in sync.
fn wait_in_sync(cluster: &Cluster, topic: &str, want: &[u32]) {
    wait_for("the replicas in sync", DEADLINE, || {
        let d = describe(cluster, topic, want)?;
        let in_sync: Vec<u32> = d["partitions"][0]["in_sync"]
            .as_array()?
            .iter()
            .filter_map(|r| r.as_u64().map(|r| r as u32))
            .collect();
        want.iter().all(|w| in_sync.contains(w)).then_some(())
    });
}

/// A per-partition gauge of `broker`'s metrics for partition 0 of `topic`.
fn gauge(cluster: &Cluster, broker: u32, name: &str, topic: &str) -> Option<u64> {
    let series = format!("{name}{{topic=\"{topic}\",partition=\"0\"}}");
    cluster.broker(broker).metric(&series).map(|v| v as u64)
}

/// Waits until `broker`'s replica of partition 0 of `topic` holds, and knows committed,
/// everything up to the high watermark its leader reports now.
fn wait_caught_up(cluster: &Cluster, broker: u32, topic: &str, asked: &[u32]) {
    let leader_hw = wait_for("the leader's high watermark", DEADLINE, || {
        let d = describe(cluster, topic, asked)?;
        d["partitions"][0]["high_watermark"].as_u64().filter(|hw| *hw > 0)
    });
    wait_for("the replica to catch up with its leader", DEADLINE, || {
        let end = gauge(cluster, broker, "conveyor_log_end_offset", topic)?;
        let hw = gauge(cluster, broker, "conveyor_high_watermark", topic)?;
        (end >= leader_hw && hw >= leader_hw).then_some(())
    });
}

/// The leader of partition 0 of `topic`, once `asked` know one.
fn wait_leader(cluster: &Cluster, topic: &str, asked: &[u32]) -> u32 {
    wait_for("a partition leader", DEADLINE, || {
        let d = describe(cluster, topic, asked)?;
        let leader = d["partitions"][0]["leader"].as_u64()? as u32;
        (leader > 0).then_some(leader)
    })
}

fn partition_dir(cluster: &Cluster, broker: u32, topic: &str) -> PathBuf {
    cluster.broker(broker).data_dir().join("topics").join(topic).join("0")
}

/// The newest segment of a partition directory.
fn last_segment(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("partition dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs.pop().expect("a segment")
}

#[test]
fn given_a_broker_sigkilled_right_after_a_replica_moved_onto_it_should_keep_that_replica_and_every_acknowledged_record()
{
    let mut cluster = Cluster::start(4, &[]);
    create(&cluster, "rk", &[]);
    let before = replicas(&cluster, "rk", &cluster.ids());
    let newcomer = (1..=4)
        .find(|b| !before.contains(b))
        .expect("a broker without a replica");
    let mut acked = produce(&cluster.bootstrap(), "rk", "early", 300);

    let target = [newcomer, before[1], before[2]];
    let list = target.map(|b| b.to_string()).join(",");
    cli_json(
        &cluster.bootstrap(),
        &["partition", "reassign", "rk", "0", "--replicas", &list],
    );
    // At once: the newcomer's stored metadata commit predates the reassignment (and even
    // the topic), so a restart replays a stale view of where the replica belongs.
    cluster.broker_mut(newcomer).kill();
    let dir = partition_dir(&cluster, newcomer, "rk");
    assert!(dir.join("raft-state").exists(), "the new replica stored its raft state");
    std::fs::write(dir.join(MARKER), b"").expect("write marker");
    cluster.broker_mut(newcomer).restart();
    wait_for("the replica open again", DEADLINE, || {
        gauge(&cluster, newcomer, "conveyor_log_end_offset", "rk")
    });
    assert!(
        dir.join(MARKER).exists(),
        "broker {newcomer} deleted its replica on restart; log:\n{}",
        cluster.broker(newcomer).log()
    );
    wait_caught_up(&cluster, newcomer, "rk", &target);

    acked.extend(produce(&cluster.bootstrap(), "rk", "late", 300));
    wait_in_sync(&cluster, "rk", &target);
    assert!(
        dir.join(MARKER).exists() && dir.join("raft-state").exists(),
        "broker {newcomer} deleted its replica on restart; log:\n{}",
        cluster.broker(newcomer).log()
    );
    assert!(
        !cluster.broker(newcomer).log().contains("panicked"),
        "broker {newcomer} panicked: {}",
        cluster.broker(newcomer).log()
    );

    // The newcomer is one of the two replicas left: they must elect a leader and hold
    // every acknowledged record.
    let other = target[1];
    cluster.broker_mut(other).kill();
    let leader = wait_leader(&cluster, "rk", &[newcomer, target[2]]);
    assert!(target.contains(&leader), "leader {leader} of {target:?}");
    assert_all_read_back(&addresses(&cluster, &[newcomer, target[2]]), "rk", &acked);
}

/// How many batches, counted from the end of the follower's log, recovery must cut.
const BATCHES_LOST: usize = 3;

/// The position of a byte inside the records (covered by the CRC, unlike the stamped header
/// fields) of the `nth` batch from the end of a segment's bytes.
fn record_byte_of_batch_from_end(segment: &[u8], nth: usize) -> usize {
    use conveyor_storage::batch::{BatchIter, HEADER_LEN};
    let mut starts = Vec::new();
    let mut position = 0;
    for batch in BatchIter::new(bytes::Bytes::copy_from_slice(segment)) {
        let batch = batch.expect("an intact segment");
        if batch.header().record_count > 0 {
            starts.push(position);
        }
        position += batch.bytes().len();
    }
    assert!(starts.len() > nth, "the segment holds {} batches", starts.len());
    starts[starts.len() - nth] + HEADER_LEN + 1
}

#[test]
fn given_a_follower_whose_log_lost_committed_entries_to_corruption_should_recover_from_the_leader_without_panicking() {
    let mut cluster = Cluster::start(3, &[]);
    create(
        &cluster,
        "lost",
        &["--config", "segment.bytes=65536", "--config", "max.message.bytes=16384"],
    );
    let leader = wait_leader(&cluster, "lost", &[1, 2, 3]);
    let follower = cluster.ids().into_iter().find(|b| *b != leader).expect("a follower");
    let mut acked = produce(&cluster.bootstrap(), "lost", "early", 500);
    wait_in_sync(&cluster, "lost", &[1, 2, 3]);

    cluster.broker_mut(follower).kill();
    // Damage a record of a batch a few from the end of the follower's newest segment:
    // recovery cuts the log there, so it ends below what the follower acknowledged and
    // what the leader knows it has.
    let segment = last_segment(&partition_dir(&cluster, follower, "lost"));
    let mut bytes = std::fs::read(&segment).expect("read segment");
    let at = record_byte_of_batch_from_end(&bytes, BATCHES_LOST);
    bytes[at] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("write segment");
    cluster.broker_mut(follower).restart();
    // Nothing is produced meanwhile: the leader's heartbeats alone must bring it back.
    wait_caught_up(&cluster, follower, "lost", &[1, 2, 3]);

    acked.extend(produce(&cluster.bootstrap(), "lost", "late", 200));
    wait_in_sync(&cluster, "lost", &[1, 2, 3]);
    let log = cluster.broker(follower).log();
    assert!(
        log.contains("truncating torn or corrupt tail"),
        "recovery cut the damaged tail: {log}"
    );
    assert!(!log.contains("panicked"), "broker {follower} panicked: {log}");

    // The repaired follower leads and serves everything acknowledged.
    let out = cli(
        &cluster.bootstrap(),
        &[
            "partition",
            "transfer-leader",
            "lost",
            "0",
            "--to",
            &follower.to_string(),
        ],
        "",
    );
    assert!(
        out.status.success(),
        "transfer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the repaired follower to lead", DEADLINE, || {
        let d = describe(&cluster, "lost", &[1, 2, 3])?;
        (d["partitions"][0]["leader"].as_u64()? == u64::from(follower)).then_some(())
    });
    assert_all_read_back(cluster.broker(follower).addr(), "lost", &acked);
}

#[test]
fn given_batches_larger_than_a_since_lowered_max_message_bytes_a_new_replica_should_replay_them() {
    let mut cluster = Cluster::start(4, &[]);
    create(&cluster, "shrunk", &[]);
    let before = replicas(&cluster, "shrunk", &cluster.ids());
    let newcomer = (1..=4)
        .find(|b| !before.contains(b))
        .expect("a broker without a replica");
    // Records of about 3 KB, many to a batch: batches well over the limit set below.
    let name = "x".repeat(3_000);
    let mut acked = produce(&cluster.bootstrap(), "shrunk", &name, 60);
    cli_json(
        &cluster.bootstrap(),
        &["topic", "alter", "shrunk", "--config", "max.message.bytes=4096"],
    );
    acked.extend(produce(&cluster.bootstrap(), "shrunk", "small", 50));

    // The new replica opens under today's limit and must store the old batches as they are.
    let target = [newcomer, before[1], before[2]];
    let list = target.map(|b| b.to_string()).join(",");
    let bootstrap = cluster.bootstrap();
    let reassign = std::thread::spawn(move || {
        cli_json(
            &bootstrap,
            &["partition", "reassign", "shrunk", "0", "--replicas", &list],
        );
    });
    wait_for("the new replica to open", DEADLINE, || {
        gauge(&cluster, newcomer, "conveyor_log_end_offset", "shrunk")
    });
    wait_caught_up(&cluster, newcomer, "shrunk", &target);
    reassign.join().expect("reassignment finished");
    // The partition's leader describes it, and may apply the last record a moment later.
    wait_for("the new replica list", DEADLINE, || {
        (replicas_now(&cluster, "shrunk", &target)? == target).then_some(())
    });

    let other = target[1];
    cluster.broker_mut(other).kill();
    wait_leader(&cluster, "shrunk", &[newcomer, target[2]]);
    assert_all_read_back(&addresses(&cluster, &[newcomer, target[2]]), "shrunk", &acked);
}

#[test]
fn given_a_topic_deleted_and_created_again_a_follower_sigkilled_and_restarted_should_keep_its_replica_of_the_new_topic()
{
    let mut cluster = Cluster::start(3, &[]);
    let ids = cluster.ids();
    create(&cluster, "again", &[]);
    let out = cli(&cluster.bootstrap(), &["topic", "delete", "again"], "");
    assert!(out.status.success(), "delete: {}", String::from_utf8_lossy(&out.stderr));
    create(&cluster, "again", &[]);
    let mut acked = produce(&cluster.bootstrap(), "again", "early", 200);
    let leader = wait_leader(&cluster, "again", &ids);
    let follower = *ids.iter().find(|b| **b != leader).expect("a follower");
    wait_caught_up(&cluster, follower, "again", &ids);

    // The follower's stored metadata commit predates all three records, so a restart
    // applies "create (first id)" again over the directory of the second incarnation.
    cluster.broker_mut(follower).kill();
    let dir = partition_dir(&cluster, follower, "again");
    let topic_id = std::fs::read_to_string(dir.join("..").join("topic-id")).expect("topic-id");
    assert!(dir.join("raft-state").exists(), "the replica stored its raft state");
    std::fs::write(dir.join(MARKER), b"").expect("write marker");
    cluster.broker_mut(follower).restart();
    wait_for("the replica open again", DEADLINE, || {
        gauge(&cluster, follower, "conveyor_log_end_offset", "again")
    });
    let kept = |what: &str| {
        assert!(
            dir.join(MARKER).exists() && dir.join("raft-state").exists(),
            "{what}: broker {follower} deleted its replica of the new topic; log:\n{}",
            cluster.broker(follower).log()
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("..").join("topic-id")).expect("topic-id"),
            topic_id,
            "{what}: the directory holds the same incarnation"
        );
    };
    kept("reopened");
    // The restart really applied the first incarnation's creation over this directory.
    wait_for("the first creation applied over the new directory", DEADLINE, || {
        cluster
            .broker(follower)
            .log()
            .contains("holds another incarnation")
            .then_some(())
    });
    wait_caught_up(&cluster, follower, "again", &ids);
    acked.extend(produce(&cluster.bootstrap(), "again", "late", 200));
    wait_in_sync(&cluster, "again", &ids);
    kept("in sync");

    // With the leader gone, the follower is one of the two replicas left: they elect a
    // leader and hold every acknowledged record.
    let leader = wait_leader(&cluster, "again", &ids);
    let left: Vec<u32> = ids.iter().copied().filter(|b| *b != leader).collect();
    cluster.broker_mut(leader).kill();
    wait_leader(&cluster, "again", &left);
    assert_all_read_back(&addresses(&cluster, &left), "again", &acked);
}

#[test]
fn given_a_topic_directory_holding_another_incarnation_describe_should_show_the_replica_stopped_and_say_why() {
    let mut broker = BrokerProcess::start();
    let out = cli(broker.addr(), &["topic", "create", "held", "--partitions", "1"], "");
    assert!(out.status.success(), "create: {}", String::from_utf8_lossy(&out.stderr));
    broker.terminate();
    // The directory now belongs to an incarnation the metadata log does not hold (as after
    // a deletion and re-creation the log here has not caught up with).
    let marker = broker.data_dir().join("topics").join("held").join("topic-id");
    std::fs::write(&marker, b"0123456789abcdef").expect("rewrite topic-id");
    broker.restart();
    let described = cli_json(broker.addr(), &["topic", "describe", "held"]);
    let state = described["partitions"][0]["replica_state"].as_str().unwrap_or_default();
    assert!(
        state.starts_with("stopped: ") && state.contains("0123456789abcdef"),
        "describe names the incarnation the directory holds: {described}\nlog:\n{}",
        broker.log()
    );
    assert_eq!(
        broker.metric("conveyor_partitions_stopped"),
        Some(1.0),
        "counted as stopped"
    );
    assert_eq!(
        std::fs::read_to_string(&marker).expect("topic-id"),
        "0123456789abcdef",
        "the other incarnation's directory is left alone"
    );
}

#[test]
fn given_a_replica_moved_off_its_broker_while_that_broker_was_down_should_delete_it_once_the_broker_is_back() {
    let mut cluster = Cluster::start(4, &[]);
    let away: u32 = 4;
    create(&cluster, "left", &[]);
    let before = replicas(&cluster, "left", &cluster.ids());
    let placed: Vec<u32> = if before.contains(&away) {
        before.clone()
    } else {
        vec![before[0], before[1], away]
    };
    if placed != before {
        let list = placed.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        cli_json(
            &cluster.bootstrap(),
            &["partition", "reassign", "left", "0", "--replicas", &list],
        );
    }
    wait_in_sync(&cluster, "left", &placed);
    let mut acked = produce(&cluster.bootstrap(), "left", "early", 300);
    wait_caught_up(&cluster, away, "left", &placed);

    // The group removes the replica while its broker is down: that broker never receives
    // the change, so its own stored configuration still lists it when it comes back.
    cluster.broker_mut(away).kill();
    let dir = partition_dir(&cluster, away, "left");
    assert!(dir.join("raft-state").exists(), "the replica stored its raft state");
    let target: Vec<u32> = cluster.ids().into_iter().filter(|b| *b != away).collect();
    let list = target.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    // Broker 4 may have been the controller: the others elect another first, and a reassign
    // sent before they all know it is refused (retriable) and asked again.
    cluster.wait_for_controller(Some(away));
    let mut refused = String::new();
    let reassigned = poll_for(DEADLINE, || {
        let out = cli(
            &cluster.bootstrap_without(away),
            &["partition", "reassign", "left", "0", "--replicas", &list],
            "",
        );
        refused = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status.success().then_some(())
    });
    assert!(reassigned.is_some(), "reassign with broker {away} down: {refused}");
    acked.extend(produce(&cluster.bootstrap_without(away), "left", "late", 200));
    cluster.broker_mut(away).restart();

    poll_for(DEADLINE, || (!dir.exists()).then_some(()));
    let log = cluster.broker(away).log();
    assert!(
        !dir.exists(),
        "broker {away} kept the replica moved off it while it was down ({}) for {DEADLINE:?}; log:\n{log}",
        dir.display()
    );
    assert!(!log.contains("panicked"), "broker {away} panicked: {log}");
    wait_in_sync(&cluster, "left", &target);
    assert_all_read_back(&addresses(&cluster, &target), "left", &acked);
}
