//! Key-based compaction in a three-broker cluster. Every replica compacts its own log below
//! its own high watermark, so every replica must give back the same key → value map: the
//! latest acknowledged value per key. Checked, one replica at a time (it leads while it is
//! read), after passes that ran while an idempotent producer wrote overwrites and deletes;
//! after the partition moved onto a broker that held no replica (it copies compacted logs);
//! after the leader was SIGKILLed and the others went on writing and compacting; on the
//! killed broker once back; and with `delete.retention.ms=0` while a replica is down (the
//! leader keeps the tombstones it has not sent it).
//!
//! A reassignment keeps the replication factor, so the move onto the broker without a
//! replica is RF 2 → RF 2 ({1,2} → {2,3}); the failover tests use RF 3 topics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use conveyor_client::proto::ReplicaCompaction;
use conveyor_client::{Client, ProducerConfig};
use conveyor_tests::cluster::{Cluster, describe_at};
use conveyor_tests::keyed::{Acked, Read, Rng, assert_matches_model, live, produce_all, read_keyed};
use conveyor_tests::{cli, runtime, wait_for};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);
const TOPIC: &str = "ledger";

fn producer_config() -> ProducerConfig {
    // Batches well below max.message.bytes; idempotent with acks=all (the defaults).
    ProducerConfig::default()
        .batch_size(1024)
        .linger(Duration::from_millis(2))
}

fn ids(v: &Value) -> BTreeSet<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// The partition as its leader describes it, asked of `holders` (brokers holding a replica:
/// one that holds none learns the leader only from the first replica listed, and shows
/// none while another replica leads).
fn describe_partition(cluster: &Cluster, holders: &[u32]) -> Option<Value> {
    let bootstrap: Vec<&str> = holders.iter().map(|&b| cluster.broker(b).addr()).collect();
    let d = describe_at(&bootstrap.join(","), TOPIC)?;
    Some(d["partitions"][0].clone())
}

/// The partition, once `ok` holds for it.
fn wait_partition(cluster: &Cluster, holders: &[u32], what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, DEADLINE, || {
        describe_partition(cluster, holders).filter(|p| ok(p))
    })
}

/// The partition's leader, once there is one.
fn leader(cluster: &Cluster, holders: &[u32]) -> u32 {
    let p = wait_partition(cluster, holders, "a leader", |p| p["leader"].as_u64() > Some(0));
    p["leader"].as_u64().expect("leader") as u32
}

/// Reassigns the partition to `replicas`, following a call that answered before the move
/// finished, and waits until every new replica votes and is in sync.
fn reassign(cluster: &Cluster, rt: &tokio::runtime::Runtime, replicas: &[i32]) {
    rt.block_on(async {
        let admin = Client::connect(&cluster.bootstrap()).await.expect("connect").admin();
        let until = tokio::time::Instant::now() + DEADLINE;
        loop {
            match admin.reassign_partition(TOPIC, 0, replicas).await {
                Ok(_) => break,
                Err(e) if (e.is_in_progress() || e.is_retriable()) && tokio::time::Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("reassign to {replicas:?}: {e}"),
            }
        }
    });
    let want: BTreeSet<u64> = replicas.iter().map(|&r| r as u64).collect();
    let holders: Vec<u32> = replicas.iter().map(|&r| r as u32).collect();
    wait_partition(cluster, &holders, "the new replicas to vote and be in sync", |p| {
        ids(&p["replicas"]) == want && ids(&p["voters"]) == want && ids(&p["in_sync"]) == want
    });
}

/// Every row is a pass or nothing to do, and the brokers answering are `brokers`; returns
/// how many passes removed records.
fn check_passes(rows: &[ReplicaCompaction], brokers: &[i32]) -> usize {
    for r in rows {
        assert!(
            r.outcome == "compacted" || r.outcome.starts_with("nothing to compact"),
            "{rows:?}"
        );
    }
    let answered: Vec<i32> = rows.iter().map(|r| r.broker).collect();
    assert_eq!(answered, brokers, "one row per replica: {rows:?}");
    rows.iter().filter(|r| r.records_after < r.records_before).count()
}

/// Makes `broker` the leader and reads the partition from the beginning through it: what
/// its replica holds. `holders` are the brokers holding a replica. Leadership must stay
/// with `broker` for the whole read (else it is moved and read again: a leader that is not
/// the preferred replica hands leadership back to it after a while).
fn read_replica(cluster: &Cluster, rt: &tokio::runtime::Runtime, holders: &[u32], broker: u32, acked: &Acked) {
    let bootstrap: Vec<&str> = holders.iter().map(|&b| cluster.broker(b).addr()).collect();
    let bootstrap = bootstrap.join(",");
    for _ in 0..3 {
        if leader(cluster, holders) != broker {
            // Asked of the replicas: a broker without one sends a transfer to the first
            // replica listed, which refuses it when another replica leads. A replica still
            // catching up (just restarted) cannot take over yet: "retry shortly".
            let to = broker.to_string();
            let args = ["partition", "transfer-leader", TOPIC, "0", "--to", &to];
            wait_for("a leadership transfer to go through", DEADLINE, || {
                let out = cli(&bootstrap, &args, "");
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    out.status.success() || err.contains("retry"),
                    "transfer to {broker}: {err}"
                );
                out.status.success().then_some(())
            });
            wait_partition(cluster, holders, "the leadership transfer", |p| p["leader"] == broker);
        }
        let reads = rt.block_on(read_keyed(&bootstrap, TOPIC));
        let after = leader(cluster, holders);
        if after != broker {
            println!("leadership moved from {broker} to {after} during the read; reading again");
            continue;
        }
        assert_matches_model(&format!("the replica on broker {broker}"), acked, &reads);
        println!(
            "broker {broker}: {} records read, {} live keys",
            reads.len(),
            live(&acked.model()).len()
        );
        return;
    }
    panic!("leadership did not stay with broker {broker} for a read");
}

/// `count` keyed writes over `keys` keys, one in six a tombstone.
fn writes(rng: &mut Rng, tag: &str, count: usize, keys: u64) -> Vec<(String, Option<String>)> {
    (0..count)
        .map(|i| {
            let key = format!("acct-{}", rng.below(keys));
            let value = (rng.below(6) != 0).then(|| format!("{key}={tag}.{i}"));
            (key, value)
        })
        .collect()
}

/// Background cleaners that look every 500 ms.
const CLEANERS: &str = "[cleaner]\ncheck_interval = \"500ms\"\n";

/// A cluster of three brokers with `config`, with the one-partition compacted topic on
/// `replication_factor` replicas, small segments, and `extra` configs.
fn cluster_with_topic(config: &str, replication_factor: u32, extra: &[&str]) -> Cluster {
    let cluster = Cluster::start_with_config(3, config);
    let mut configs = vec![
        "--config",
        "cleanup.policy=compact",
        "--config",
        "segment.bytes=4096",
        "--config",
        "max.message.bytes=4096",
    ];
    for c in extra {
        configs.extend_from_slice(&["--config", c]);
    }
    cluster.create_topic(TOPIC, 1, replication_factor, &configs);
    cluster.wait_for_leader(TOPIC, 0, None, DEADLINE);
    cluster
}

/// `chunks` × 200 keyed writes over 48 keys through one idempotent producer, while another
/// task asks for compaction passes (with wait) over and over; each must answer for
/// `replicas`, and some must have removed records.
fn produce_while_compacting(
    cluster: &Cluster,
    rt: &tokio::runtime::Runtime,
    acked: &Acked,
    rng: &mut Rng,
    chunks: usize,
    replicas: &'static [i32],
) {
    let done = Arc::new(AtomicBool::new(false));
    let compactor = {
        let (bootstrap, done) = (cluster.bootstrap(), Arc::clone(&done));
        rt.spawn(async move {
            let admin = Client::connect(&bootstrap).await.expect("connect").admin();
            let (mut calls, mut removed) = (0, 0);
            while !done.load(Ordering::SeqCst) {
                let rows = admin.compact_topic(TOPIC, None, true).await.expect("compact");
                removed += check_passes(&rows, replicas);
                calls += 1;
            }
            (calls, removed)
        })
    };
    let before = acked.len();
    rt.block_on(async {
        let client = Client::connect(&cluster.bootstrap()).await.expect("connect");
        let producer = client.producer(producer_config()).expect("producer");
        for chunk in 0..chunks {
            produce_all(&producer, TOPIC, &writes(rng, &format!("c{chunk}"), 200, 48), acked).await;
        }
        assert_eq!(producer.unvouched_records(), 0);
    });
    done.store(true, Ordering::SeqCst);
    let (calls, removed) = rt.block_on(compactor).expect("compactor");
    println!(
        "{} writes, {calls} compact calls, {removed} passes removed records",
        acked.len() - before
    );
    assert!(removed >= 1, "no pass removed records in {calls} calls");
}

/// `compact_topic(wait)` asked of the cluster; every replica of `replicas` must answer.
fn compact_all(cluster: &Cluster, rt: &tokio::runtime::Runtime, replicas: &[i32]) -> Vec<ReplicaCompaction> {
    let rows = rt.block_on(async {
        let admin = Client::connect(&cluster.bootstrap()).await.expect("connect").admin();
        admin.compact_topic(TOPIC, None, true).await.expect("compact")
    });
    check_passes(&rows, replicas);
    rows
}

#[test]
fn given_a_compacted_partition_moved_onto_a_broker_that_held_no_replica_should_give_it_the_latest_acknowledged_value_per_key()
 {
    let cluster = cluster_with_topic(CLEANERS, 2, &[]);
    let rt = runtime();
    reassign(&cluster, &rt, &[1, 2]);
    let acked = Acked::default();
    let mut rng = Rng::new(11);
    produce_while_compacting(&cluster, &rt, &acked, &mut rng, 10, &[1, 2]);

    // Asked of broker 3, which holds no replica: it asks the two that do.
    let out = cli(
        cluster.broker(3).addr(),
        &["topic", "compact", TOPIC, "--wait", "--output", "json"],
        "",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("json");
    let rows = answer["replicas"].as_array().expect("replicas");
    let brokers: Vec<u64> = rows.iter().map(|r| r["broker"].as_u64().expect("broker")).collect();
    assert_eq!(brokers, vec![1, 2], "{answer}");
    assert!(rows.iter().all(|r| r["outcome"] == "compacted"), "{answer}");
    for broker in [1, 2] {
        read_replica(&cluster, &rt, &[1, 2], broker, &acked);
    }

    // Broker 3 takes broker 1's place: it starts from nothing and copies compacted logs.
    reassign(&cluster, &rt, &[2, 3]);
    for broker in [3, 2] {
        read_replica(&cluster, &rt, &[2, 3], broker, &acked);
    }
    compact_all(&cluster, &rt, &[2, 3]);
    for broker in [3, 2] {
        read_replica(&cluster, &rt, &[2, 3], broker, &acked);
    }
}

#[test]
fn given_a_compacted_topic_whose_leader_is_killed_every_replica_should_keep_the_latest_acknowledged_value_per_key() {
    let mut cluster = cluster_with_topic(CLEANERS, 3, &[]);
    let rt = runtime();
    let acked = Acked::default();
    let mut rng = Rng::new(23);
    produce_while_compacting(&cluster, &rt, &acked, &mut rng, 10, &[1, 2, 3]);
    cluster.wait_in_sync(TOPIC, 3);
    for broker in [1, 2, 3] {
        read_replica(&cluster, &rt, &[1, 2, 3], broker, &acked);
    }

    // The leader dies; the others go on, deleting keys the dead broker holds values of.
    let dead = cluster.wait_for_leader(TOPIC, 0, None, DEADLINE);
    cluster.broker_mut(dead).kill();
    let leader = cluster.wait_for_leader(TOPIC, 0, Some(dead), DEADLINE);
    println!("killed leader {dead}; broker {leader} leads");
    let doomed: Vec<String> = live(&acked.model()).into_keys().take(8).collect();
    assert_eq!(doomed.len(), 8, "keys with values to delete");
    rt.block_on(async {
        let client = Client::connect(&cluster.bootstrap_without(dead))
            .await
            .expect("connect");
        let producer = client.producer(producer_config()).expect("producer");
        let mut more = writes(&mut rng, "after-kill", 400, 48);
        more.extend(doomed.iter().map(|k| (k.clone(), None)));
        produce_all(&producer, TOPIC, &more, &acked).await;
        assert_eq!(producer.unvouched_records(), 0);
        let rows = client.admin().compact_topic(TOPIC, None, true).await.expect("compact");
        assert_eq!(rows.len(), 3, "{rows:?}");
        for r in &rows {
            if r.broker as u32 == dead {
                assert!(r.outcome.contains("not reached"), "{rows:?}");
            } else {
                assert_eq!(r.outcome, "compacted", "{rows:?}");
            }
        }
    });
    let model = acked.model();
    for key in &doomed {
        assert!(model.values().any(|w| &w.key == key && w.value.is_none()), "{key}");
    }
    let survivors: Vec<u32> = [1, 2, 3].into_iter().filter(|b| *b != dead).collect();
    for &broker in &survivors {
        read_replica(&cluster, &rt, &survivors, broker, &acked);
    }

    // The killed broker comes back, catches up from the compacted logs, and leads.
    cluster.broker_mut(dead).restart();
    cluster.wait_in_sync(TOPIC, 3);
    read_replica(&cluster, &rt, &[1, 2, 3], dead, &acked);
    compact_all(&cluster, &rt, &[1, 2, 3]);
    for broker in [dead, survivors[0], survivors[1]] {
        read_replica(&cluster, &rt, &[1, 2, 3], broker, &acked);
    }
}

/// Tombstones of a replica's rows by broker, from compaction reports.
fn dropped_by(rows: &[ReplicaCompaction]) -> BTreeMap<i32, u64> {
    rows.iter().map(|r| (r.broker, r.tombstones_dropped)).collect()
}

/// The tombstones (null values) a read returned.
fn tombstones(reads: &[Read]) -> usize {
    reads.iter().filter(|r| r.value.is_none()).count()
}

/// A replica that is down while keys are deleted and `delete.retention.ms` passes must not
/// come back with the deleted values: the leader keeps a tombstone until its furthest-behind
/// follower has reached it (`docs/compaction.md`, "Tombstones and lagging replicas"), and
/// drops it once every replica has it.
#[test]
fn given_a_replica_down_while_tombstones_expire_the_leader_should_keep_them_until_it_is_back() {
    // No background passes: the passes asked for below are the only ones.
    let mut cluster = cluster_with_topic("[cleaner]\nthreads = 0\n", 3, &["delete.retention.ms=0"]);
    let rt = runtime();
    let all = [1, 2, 3];
    // The preferred replica leads throughout (a leader that is not hands leadership back to
    // it), so the replica that comes back catches up from it.
    let p = wait_partition(&cluster, &all, "a leader", |p| p["leader"].as_u64() > Some(0));
    let replicas: Vec<u32> = p["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r.as_u64().expect("id") as u32)
        .collect();
    let (leader, down) = (replicas[0], replicas[1]);
    let acked = Acked::default();
    let values: Vec<(String, Option<String>)> = (0..20)
        .map(|i| (format!("acct-{i}"), Some(format!("opened-{i}"))))
        .collect();
    rt.block_on(async {
        let client = Client::connect(&cluster.bootstrap()).await.expect("connect");
        let producer = client.producer(producer_config()).expect("producer");
        produce_all(&producer, TOPIC, &values, &acked).await;
    });
    // `down` holds the values (it led a read of them), then stops as a follower.
    read_replica(&cluster, &rt, &all, down, &acked);
    read_replica(&cluster, &rt, &all, leader, &acked);
    cluster.broker_mut(down).kill();
    let up: Vec<u32> = all.into_iter().filter(|b| *b != down).collect();

    // Ten keys are deleted; filler seals the segments holding the tombstones. The first pass
    // removes the values and starts the tombstones' horizon (now + 0); the second finds it
    // passed, but the leader still keeps them for the replica that is down.
    let passes = rt.block_on(async {
        let client = Client::connect(&cluster.bootstrap_without(down))
            .await
            .expect("connect");
        let producer = client.producer(producer_config()).expect("producer");
        let mut more: Vec<(String, Option<String>)> = (0..10).map(|i| (format!("acct-{i}"), None)).collect();
        more.extend((0..120).map(|i| (format!("fill-{i}"), Some("z".repeat(80)))));
        produce_all(&producer, TOPIC, &more, &acked).await;
        let admin = client.admin();
        let mut passes = Vec::new();
        for _ in 0..2 {
            passes.push(admin.compact_topic(TOPIC, None, true).await.expect("compact"));
        }
        passes
    });
    for rows in &passes {
        println!("while broker {down} is down: {rows:?}");
    }
    let on_leader = |rows: &[ReplicaCompaction]| {
        rows.iter()
            .find(|r| r.broker == leader as i32)
            .cloned()
            .unwrap_or_else(|| panic!("no row for the leader {leader}: {rows:?}"))
    };
    let first = on_leader(&passes[0]);
    assert_eq!(first.outcome, "compacted", "{first:?}");
    assert_eq!(
        first.records_before - first.records_after,
        10,
        "the ten deleted values go: {first:?}"
    );
    for rows in &passes {
        assert_eq!(
            dropped_by(rows).get(&(leader as i32)),
            Some(&0),
            "the leader keeps tombstones broker {down} has not reached: {rows:?}"
        );
    }
    let reads = rt.block_on(read_keyed(&cluster.bootstrap_without(down), TOPIC));
    assert_eq!(tombstones(&reads), 10, "the leader's log keeps the tombstones");

    // Back, it catches up from the leader: the deletes reach it.
    cluster.broker_mut(down).restart();
    read_replica(&cluster, &rt, &all, down, &acked);
    read_replica(&cluster, &rt, &all, leader, &acked);
    // With every replica past them, the leader's next pass drops the tombstones.
    cluster.wait_in_sync(TOPIC, 3);
    let rows = compact_all(&cluster, &rt, &[1, 2, 3]);
    println!("with every replica back: {rows:?}");
    assert_eq!(dropped_by(&rows).get(&(leader as i32)), Some(&10), "{rows:?}");
    let reads = rt.block_on(read_keyed(&cluster.bootstrap(), TOPIC));
    assert_eq!(tombstones(&reads), 0, "{reads:?}");
    for broker in [down, up[0], up[1]] {
        read_replica(&cluster, &rt, &all, broker, &acked);
    }
}
