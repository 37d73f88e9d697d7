//! A three-broker cluster under faults: leader SIGKILL during produce, an isolated leader,
//! restart of every broker at once, a follower that needs a snapshot, controller failover,
//! a broker joining and another leaving while producers run.
//! Every acknowledged record must be read back, in order, exactly once: the producers are
//! idempotent (the default), so a batch resent after its acknowledgement was lost is answered
//! with its original offsets instead of being stored again. One producer in the
//! leadership-moving test turns idempotence off, to keep the ordering of non-idempotent
//! retries (stream part numbering) under test; only its records may be duplicated.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_client::proto::produce_client::ProduceClient;
use conveyor_client::proto::{Acks as WireAcks, PartitionProduce, ProduceRequest, Record};
use conveyor_client::{Client, ProducerConfig, ProducerRecord};
use conveyor_tests::checker::{Acked, check};
use conveyor_tests::cluster::{Cluster, describe_at};
use conveyor_tests::{cli, cli_json, read_all, wait_for};

const DEADLINE: Duration = Duration::from_secs(120);

/// The acknowledged writes of some producers, as they arrive.
#[derive(Clone, Default)]
struct History {
    acked: Arc<Mutex<Vec<Acked>>>,
    failed: Arc<Mutex<u64>>,
    first_error: Arc<Mutex<Option<String>>>,
    /// Records the producers resent under a new epoch (`Producer::unvouched_records`),
    /// summed once each producer has finished.
    unvouched: Arc<AtomicU64>,
}

impl History {
    /// No delivery failed: else the count of failures and the first error.
    fn assert_no_failures(&self) {
        assert_eq!(
            self.failed(),
            0,
            "deliveries failed; first error: {:?}; unvouched records: {}",
            self.first_error.lock().expect("lock"),
            self.unvouched.load(Ordering::Relaxed)
        );
    }

    /// Every record acknowledged: else the count of failures and the first error.
    fn assert_all_acked(&self, expected: usize) {
        assert_eq!(
            self.count(),
            expected,
            "{} deliveries failed; first error: {:?}",
            self.failed(),
            self.first_error.lock().expect("lock")
        );
    }

    fn acked(&self) -> Vec<Acked> {
        self.acked.lock().expect("lock").clone()
    }
    fn count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }
    fn failed(&self) -> u64 {
        *self.failed.lock().expect("lock")
    }

    /// No record was resent under a new epoch. A partition resets only when a sequenced
    /// batch failed for good or the broker forgot the producer, neither of which these tests
    /// allow; an unvouched record is one the broker cannot dedupe.
    fn assert_all_vouched(&self) {
        let unvouched = self.unvouched.load(Ordering::Relaxed);
        println!("unvouched records: {unvouched}");
        assert_eq!(unvouched, 0, "records resent under a new epoch");
    }
}

/// Sends `count` records `NAME-i` to `topic` through one producer with retries, recording
/// every acknowledgement.
async fn produce(client: Client, topic: &'static str, name: String, count: u64, history: History) {
    produce_until(client, topic, name, count, history, Arc::default()).await;
}

/// The producer settings of these tests: retries, and time enough to ride out failovers.
fn producer_config() -> ProducerConfig {
    ProducerConfig::default()
        .linger(Duration::from_millis(2))
        .retries(1_000)
        .delivery_timeout(Duration::from_secs(60))
}

/// As [`produce`], stopping early once `stop` is set.
async fn produce_until(
    client: Client,
    topic: &'static str,
    name: String,
    count: u64,
    history: History,
    stop: Arc<AtomicBool>,
) {
    produce_with(
        client.producer(producer_config()).expect("producer config"),
        topic,
        name,
        count,
        history,
        stop,
    )
    .await;
}

/// Sends through `producer` as [`produce_until`] does.
async fn produce_with(
    producer: conveyor_client::Producer,
    topic: &'static str,
    name: String,
    count: u64,
    history: History,
    stop: Arc<AtomicBool>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4_096);
    let sender_history = history.clone();
    let acker = tokio::spawn(async move {
        while let Some((id, delivery)) = rx.recv().await {
            let delivery: conveyor_client::DeliveryFuture = delivery;
            match delivery.await {
                Ok(m) => history.acked.lock().expect("lock").push(Acked {
                    id,
                    partition: m.partition,
                    offset: m.offset.expect("acks=all returns offsets"),
                }),
                Err(e) => {
                    *history.failed.lock().expect("lock") += 1;
                    history.first_error.lock().expect("lock").get_or_insert(e.to_string());
                }
            }
        }
    });
    for i in 0..count {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let id = format!("{name}-{i}");
        let delivery = match producer.send(ProducerRecord::new(topic, id.clone())).await {
            Ok(delivery) => delivery,
            Err(e) => {
                *sender_history.failed.lock().expect("lock") += 1;
                sender_history
                    .first_error
                    .lock()
                    .expect("lock")
                    .get_or_insert(format!("send: {e}"));
                break;
            }
        };
        if tx.send((id, delivery)).await.is_err() {
            break;
        }
    }
    drop(tx);
    acker.await.expect("acker");
    sender_history
        .unvouched
        .fetch_add(producer.unvouched_records(), Ordering::Relaxed);
}

/// Starts `n` producers `p0..` sending `each` records to `topic` in the background.
fn spawn_producers(
    runtime: &tokio::runtime::Runtime,
    bootstrap: &str,
    topic: &'static str,
    n: u64,
    each: u64,
    history: &History,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|i| {
            let (bootstrap, history) = (bootstrap.to_string(), history.clone());
            runtime.spawn(async move {
                let client = Client::connect(&bootstrap).await.expect("connect");
                produce(client, topic, format!("p{i}"), each, history).await;
            })
        })
        .collect()
}

/// Sends `count` records `NAME-i` to `topic` through `bootstrap` and waits for them all.
fn produce_now(
    runtime: &tokio::runtime::Runtime,
    bootstrap: &str,
    topic: &'static str,
    name: &str,
    count: u64,
    history: &History,
) {
    runtime.block_on(async {
        let client = Client::connect(bootstrap).await.expect("connect");
        produce(client, topic, name.to_string(), count, history.clone()).await;
    });
}

fn wait_producers(runtime: &tokio::runtime::Runtime, producers: Vec<tokio::task::JoinHandle<()>>) {
    runtime.block_on(async {
        for p in producers {
            tokio::time::timeout(DEADLINE, p)
                .await
                .expect("producers finish")
                .expect("producer task");
        }
    });
}

/// Each partition's leader (0: unknown) and replicas in `broker`'s Metadata answer.
fn metadata_of(runtime: &tokio::runtime::Runtime, broker: &str, topic: &str) -> Option<Vec<(i32, Vec<i32>)>> {
    use conveyor_client::proto::MetadataRequest;
    use conveyor_client::proto::admin_client::AdminClient;
    runtime.block_on(async {
        let mut admin = AdminClient::connect(format!("http://{broker}")).await.ok()?;
        let request = MetadataRequest {
            topics: vec![topic.to_string()],
        };
        let answer = admin.metadata(request).await.ok()?.into_inner();
        let t = answer.topics.into_iter().find(|t| t.name == topic)?;
        Some(t.partitions.into_iter().map(|p| (p.leader, p.replicas)).collect())
    })
}

/// Reads `topic` back through `from` and checks it against `acked`: nothing lost, nothing
/// out of order, nothing stored twice. Returns the report for further checks.
fn check_read_back(
    runtime: &tokio::runtime::Runtime,
    from: &str,
    topic: &str,
    acked: &[Acked],
) -> conveyor_tests::checker::Report {
    let observed = runtime.block_on(read_all(from, topic));
    let report = check(acked, &observed);
    println!("read {topic} from {from}: {report}");
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.reordered.is_empty(), "{report}");
    assert!(report.duplicated.is_empty(), "{report}");
    report
}

/// Prints how many resent idempotent batches the running brokers answered from their
/// producer state, and how many they refused as out of order: what idempotence saved in this
/// run (a broker restarted since counts only its own).
fn print_idempotence_counters(cluster: &Cluster) {
    let sum = |name: &str| -> f64 {
        let ids = cluster.ids().into_iter();
        ids.filter_map(|id| cluster.broker(id).metric(name)).sum()
    };
    println!(
        "duplicate batches answered with their original offsets: {}; refused out of order: {}",
        sum("conveyor_producer_duplicates_total"),
        sum("conveyor_producer_out_of_order_total")
    );
}

#[test]
fn given_three_brokers_when_the_leader_is_sigkilled_during_produce_should_keep_every_acknowledged_record() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.create_topic("failover", 1, 3, &[]);
    let leader = cluster.wait_for_leader("failover", 0, None, DEADLINE);
    let runtime = conveyor_tests::runtime();
    let history = History::default();
    let producers = spawn_producers(&runtime, &cluster.bootstrap(), "failover", 3, 33_334, &history);
    wait_for("acknowledged records before the kill", DEADLINE, || {
        (history.count() >= 20_000).then_some(())
    });
    cluster.broker_mut(leader).kill();
    let killed_at = Instant::now();
    // A probe measures how soon the cluster takes writes again.
    let probe = runtime.block_on(async {
        let client = Client::connect(&cluster.bootstrap_without(leader))
            .await
            .expect("connect");
        let producer = client
            .producer(ProducerConfig::default().linger(Duration::ZERO).retries(1_000))
            .expect("producer config");
        let delivery = producer
            .send(ProducerRecord::new("failover", "probe-0"))
            .await
            .expect("send probe");
        let written = delivery.await.expect("the probe is acknowledged by a new leader");
        history
            .unvouched
            .fetch_add(producer.unvouched_records(), Ordering::Relaxed);
        Acked {
            id: "probe-0".into(),
            partition: written.partition,
            offset: written.offset.expect("offset"),
        }
    });
    let failover = killed_at.elapsed();
    let new_leader = cluster.wait_for_leader("failover", 0, Some(leader), DEADLINE);
    println!("leader {leader} killed; broker {new_leader} took writes after {failover:?}");
    wait_producers(&runtime, producers);
    cluster.broker_mut(leader).restart();
    cluster.wait_in_sync("failover", 3);
    let mut acked = history.acked();
    acked.push(probe);
    // Batches in flight to the killed leader are resent to the new one; those it had
    // committed before dying are answered with their original offsets, not stored twice.
    print_idempotence_counters(&cluster);
    check_read_back(&runtime, &cluster.bootstrap(), "failover", &acked);
    // With retries every record is delivered.
    history.assert_no_failures();
    history.assert_all_vouched();
    assert_eq!(acked.len(), 100_003, "every record and the probe were acknowledged");
    assert!(failover < Duration::from_secs(10), "failover took {failover:?}");
}

#[test]
fn given_an_isolated_leader_should_stop_acknowledging_and_lose_its_unacknowledged_suffix() {
    let cluster = Cluster::start(3, &[]);
    cluster.create_topic("split", 1, 3, &[]);
    let old = cluster.wait_for_leader("split", 0, None, DEADLINE);
    let runtime = conveyor_tests::runtime();
    let history = History::default();
    produce_now(&runtime, &cluster.bootstrap(), "split", "before", 1_000, &history);
    cluster.isolate(old);
    // Writes sent straight to the isolated leader: none may be acknowledged.
    let stranded: Vec<String> = runtime.block_on(async {
        let mut grpc = ProduceClient::connect(format!("http://{}", cluster.broker(old).addr()))
            .await
            .expect("connect to the isolated leader");
        let mut stranded = Vec::new();
        for i in 0..20 {
            let id = format!("stranded-{i}");
            let request = ProduceRequest {
                request_id: i,
                acks: WireAcks::All as i32,
                partitions: vec![PartitionProduce {
                    topic: "split".into(),
                    partition: 0,
                    records: vec![Record {
                        value: Some(id.clone().into()),
                        ..Record::default()
                    }],
                    ..PartitionProduce::default()
                }],
            };
            let mut request = tonic::Request::new(request);
            request.set_timeout(Duration::from_secs(5));
            let answer = grpc.produce(request).await;
            let acknowledged = answer.is_ok_and(|r| r.into_inner().partitions.iter().all(|p| p.error.is_none()));
            assert!(!acknowledged, "an isolated leader acknowledged {id}");
            stranded.push(id);
        }
        stranded
    });
    cluster.wait_for_leader("split", 0, Some(old), DEADLINE);
    produce_now(
        &runtime,
        &cluster.bootstrap_without(old),
        "split",
        "after",
        1_000,
        &history,
    );
    cluster.heal_all();
    cluster.wait_in_sync("split", 3);
    // Read from the old leader once it leads again: its own log must have lost the suffix.
    cluster.transfer_leader("split", 0, old);
    let observed = runtime.block_on(read_all(cluster.broker(old).addr(), "split"));
    let ids: HashSet<&str> = observed.iter().map(|o| o.id.as_str()).collect();
    for id in &stranded {
        assert!(
            !ids.contains(id.as_str()),
            "{id} was never acknowledged but is readable"
        );
    }
    let report = check(&history.acked(), &observed);
    println!("{report}");
    history.assert_all_acked(2_000);
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.reordered.is_empty(), "{report}");
    assert!(report.duplicated.is_empty(), "{report}");
    history.assert_all_vouched();
}

#[test]
fn given_three_brokers_when_all_are_sigkilled_and_restarted_should_keep_every_acknowledged_record() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.create_topic("restart", 3, 3, &[]);
    let runtime = conveyor_tests::runtime();
    let history = History::default();
    produce_now(&runtime, &cluster.bootstrap(), "restart", "p0", 20_000, &history);
    history.assert_all_acked(20_000);
    for id in cluster.ids() {
        cluster.broker_mut(id).kill();
    }
    for id in cluster.ids() {
        cluster.broker_mut(id).restart();
    }
    cluster.wait_for_controller(None);
    cluster.wait_in_sync("restart", 3);
    check_read_back(&runtime, &cluster.bootstrap(), "restart", &history.acked());
}

#[test]
fn given_the_controller_is_sigkilled_topic_creation_should_still_work() {
    let mut cluster = Cluster::start(3, &[]);
    let controller = cluster.wait_for_controller(None);
    cluster.broker_mut(controller).kill();
    cluster.wait_for_controller(Some(controller));
    let bootstrap = cluster.bootstrap_without(controller);
    let out = cli(
        &bootstrap,
        &[
            "topic",
            "create",
            "after-failover",
            "--partitions",
            "2",
            "--replication-factor",
            "2",
        ],
        "",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Every surviving broker applies it (once it hears the entry is committed).
    for id in cluster.ids().into_iter().filter(|i| *i != controller) {
        wait_for("a surviving broker to apply the creation", DEADLINE, || {
            describe_at(cluster.broker(id).addr(), "after-failover").map(|_| ())
        });
    }
    // Replication factor 3 needs three live brokers: refused with a clear error once the
    // dead one is seen as down.
    wait_for("the killed controller to be seen as down", DEADLINE, || {
        let info = cluster.info(Some(controller))?;
        let brokers = info["brokers"].as_array()?;
        brokers
            .iter()
            .any(|b| b["id"].as_u64() == Some(u64::from(controller)) && b["alive"] == false)
            .then_some(())
    });
    let out = cli(
        &bootstrap,
        &["topic", "create", "too-wide", "--replication-factor", "3"],
        "",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("replication factor"));
}

#[test]
fn given_a_follower_down_while_retention_deletes_what_it_needs_should_catch_up_from_a_snapshot() {
    let mut cluster = Cluster::start_with_config(3, "[log]\nretention_check_interval = \"100ms\"\n");
    cluster.create_topic(
        "compacted-away",
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
    let leader = cluster.wait_for_leader("compacted-away", 0, None, DEADLINE);
    let follower = cluster.ids().into_iter().find(|i| *i != leader).expect("a follower");
    let runtime = conveyor_tests::runtime();
    let history = History::default();
    produce_now(&runtime, &cluster.bootstrap(), "compacted-away", "early", 200, &history);
    cluster.broker_mut(follower).kill();
    runtime.block_on(async {
        let client = Client::connect(&cluster.bootstrap_without(follower))
            .await
            .expect("connect");
        // Single-record batches, so that segments roll and retention deletes many of them.
        let producer = client
            .producer(ProducerConfig::default().linger(Duration::ZERO))
            .expect("producer config");
        for i in 0..2_000 {
            let id = format!("late-{i}");
            let written = producer
                .send(ProducerRecord::new("compacted-away", id.clone()))
                .await
                .expect("send")
                .await
                .expect("acknowledged by the two live replicas");
            history.acked.lock().expect("lock").push(Acked {
                id,
                partition: written.partition,
                offset: written.offset.expect("offset"),
            });
        }
    });
    let start = wait_for("retention to move the leader's log start", DEADLINE, || {
        let d = cluster.describe("compacted-away", Some(follower))?;
        let start = d["partitions"][0]["log_start_offset"].as_u64()?;
        (start > 300).then_some(start)
    });
    cluster.broker_mut(follower).restart();
    cluster.wait_in_sync("compacted-away", 3);
    // Make the restarted follower the leader and read from it: it holds the tail from the
    // snapshot point on, byte for byte what the others hold.
    cluster.transfer_leader("compacted-away", 0, follower);
    let observed = runtime.block_on(read_all(cluster.broker(follower).addr(), "compacted-away"));
    let first = observed
        .first()
        .map(|o| o.offset)
        .expect("records after the snapshot point");
    assert!(
        first >= start,
        "the follower serves from its new log start {first} >= {start}"
    );
    // Every acknowledged record from the follower's log start on (as it reports it after the
    // read, now that it leads; retention may still move it) must have been read: a gap
    // between its log start and its first record would be a loss.
    let log_start = cluster.describe("compacted-away", None).expect("describe")["partitions"][0]["log_start_offset"]
        .as_u64()
        .expect("log start");
    let kept: Vec<Acked> = history.acked().into_iter().filter(|a| a.offset >= log_start).collect();
    let report = check(&kept, &observed);
    println!("follower {follower} restarted at log start {log_start}; {report}");
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.reordered.is_empty(), "{report}");
    assert!(report.duplicated.is_empty(), "{report}");
    assert!(kept.len() >= 100, "retention keeps the newest records: {}", kept.len());
}

fn broker_ids(info: &serde_json::Value) -> Vec<u64> {
    info["brokers"]
        .as_array()
        .expect("brokers")
        .iter()
        .map(|b| b["id"].as_u64().expect("id"))
        .collect()
}

fn replicas_of(description: &serde_json::Value) -> Vec<Vec<u64>> {
    description["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            p["replicas"]
                .as_array()
                .expect("replicas")
                .iter()
                .map(|r| r.as_u64().expect("id"))
                .collect()
        })
        .collect()
}

#[test]
fn given_a_running_cluster_when_a_broker_joins_and_another_leaves_should_keep_every_acknowledged_record() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.create_topic("moving", 3, 3, &[]);
    let runtime = conveyor_tests::runtime();
    let history = History::default();
    let producers = spawn_producers(&runtime, &cluster.bootstrap(), "moving", 2, 30_000, &history);
    wait_for("acknowledged records before the change", DEADLINE, || {
        let error = history.first_error.lock().expect("lock").clone();
        assert!(error.is_none(), "a delivery failed: {error:?}");
        (history.count() >= 2_000).then_some(())
    });

    // A fourth broker joins while the producers run.
    let address = cluster.join(4);
    let started = Instant::now();
    let info = cli_json(&cluster.bootstrap(), &["cluster", "add-node", "4", &address]);
    println!("broker 4 added in {:?}", started.elapsed());
    assert_eq!(broker_ids(&info), vec![1, 2, 3, 4], "{info}");
    wait_for(
        "broker 4 seen alive by the cluster and knowing the controller",
        DEADLINE,
        || {
            let seen = cli_json(cluster.broker(4).addr(), &["cluster", "info"]);
            let all_alive = seen["brokers"]
                .as_array()?
                .iter()
                .filter(|b| b["alive"] == true)
                .count()
                == 4;
            (all_alive && seen["controller"].as_u64()? > 0).then_some(())
        },
    );
    // New topics are placed on it, and it learned the topics created before it joined.
    cluster.create_topic("after-add", 4, 3, &[]);
    let placed = replicas_of(&wait_for("broker 4 to apply the creation", DEADLINE, || {
        describe_at(cluster.broker(4).addr(), "after-add")
    }));
    assert!(placed.iter().any(|r| r.contains(&4)), "{placed:?}");
    let known = cli_json(cluster.broker(4).addr(), &["topic", "describe", "moving"]);
    assert_eq!(replicas_of(&known).len(), 3);
    // With four brokers and three replicas, each broker lacks some partition; its metadata
    // still names that partition's leader, so clients go straight there.
    for id in cluster.ids() {
        assert!(placed.iter().any(|r| !r.contains(&u64::from(id))), "{placed:?}");
        wait_for("every leader named in the metadata", DEADLINE, || {
            let partitions = metadata_of(&runtime, cluster.broker(id).addr(), "after-add")?;
            partitions
                .iter()
                .all(|(leader, replicas)| replicas.contains(leader))
                .then_some(())
        });
    }

    // Replicas spread onto broker 4 while the producers run. A dry run only plans.
    let all_replicas = |cluster: &Cluster| -> Vec<Vec<u64>> {
        ["moving", "after-add"]
            .iter()
            .flat_map(|t| replicas_of(&cluster.describe(t, None).expect("describe")))
            .collect()
    };
    let before = all_replicas(&cluster);
    let planned = cli_json(&cluster.bootstrap(), &["cluster", "rebalance", "--dry-run"]);
    assert_eq!(all_replicas(&cluster), before, "a dry run changes nothing");
    // Brokers 1-3 hold 6 replicas each, broker 4 holds 3: two move to broker 4.
    let planned_moves = planned["moves"].as_array().expect("moves").clone();
    assert_eq!(planned_moves.len(), 2, "{planned}");
    assert!(planned_moves.iter().all(|m| m["to"] == 4), "{planned}");
    let started = Instant::now();
    let rebalanced = cli_json(&cluster.bootstrap(), &["cluster", "rebalance"]);
    println!("rebalanced in {:?}: {rebalanced}", started.elapsed());
    assert_eq!(rebalanced["moves"].as_array(), Some(&planned_moves), "{rebalanced}");
    let load: Vec<usize> = (1..=4)
        .map(|b| all_replicas(&cluster).iter().filter(|r| r.contains(&b)).count())
        .collect();
    assert!(
        load.iter().max() <= Some(&(load.iter().min().expect("brokers") + 1)),
        "{load:?}"
    );
    // A partition's replicas move on demand, in the order given.
    let current = replicas_of(&cluster.describe("moving", None).expect("describe"))[0].clone();
    let newcomer = (1..=4).find(|b| !current.contains(b)).expect("a broker without it");
    let target = [newcomer, current[1], current[2]];
    let list = target.map(|b| b.to_string()).join(",");
    let reassigned = cli_json(
        &cluster.bootstrap(),
        &["partition", "reassign", "moving", "0", "--replicas", &list],
    );
    assert_eq!(reassigned["moves"].as_array().map(Vec::len), Some(1), "{reassigned}");
    // Describe reads the list from the partition's leader, which may apply the last
    // reassignment record a moment after the controller answered.
    wait_for("the new replica list in describe", DEADLINE, || {
        let d = cluster.describe("moving", None)?;
        (replicas_of(&d)[0] == target).then_some(())
    });
    for topic in ["moving", "after-add"] {
        cluster.wait_in_sync(topic, 3);
    }

    // Broker 1 leaves: every replica it holds moves, the producers keep going.
    let expected = all_replicas(&cluster).iter().filter(|r| r.contains(&1)).count();
    let started = Instant::now();
    let removed = cli_json(&cluster.bootstrap(), &["cluster", "remove-node", "1"]);
    println!("broker 1 removed in {:?}: {removed}", started.elapsed());
    let moves = removed["moves"].as_array().expect("moves");
    assert_eq!(moves.len(), expected, "{removed}");
    assert!(moves.iter().all(|m| m["from"] == 1 && m["to"] != 1), "{removed}");
    for topic in ["moving", "after-add"] {
        let d = cluster.describe(topic, None).expect("describe");
        for r in replicas_of(&d) {
            assert!(!r.contains(&1) && r.len() == 3, "{topic}: {r:?}");
        }
        cluster.wait_in_sync(topic, 3);
    }
    let info = cli_json(&cluster.bootstrap_without(1), &["cluster", "info"]);
    assert_eq!(broker_ids(&info), vec![2, 3, 4], "{info}");
    assert_ne!(info["controller"], 1, "{info}");
    let moved_away = cluster.broker(1).data_dir().join("topics").join("moving");
    wait_for("broker 1 to delete the replicas it gave away", DEADLINE, || {
        (0..3).all(|p| !moved_away.join(p.to_string()).exists()).then_some(())
    });
    // Broker 1 learns that it was removed and sends clients to the others: a bootstrap list
    // that names it first still works.
    wait_for("broker 1 to refuse requests as removed", DEADLINE, || {
        let out = cli(cluster.broker(1).addr(), &["cluster", "info"], "");
        let said = String::from_utf8_lossy(&out.stderr);
        (!out.status.success() && said.contains("broker 1 was removed from the cluster")).then_some(())
    });
    let removed_first = format!("{},{}", cluster.broker(1).addr(), cluster.bootstrap_without(1));
    let info = cli_json(&removed_first, &["cluster", "info"]);
    assert_eq!(broker_ids(&info), vec![2, 3, 4], "{info}");

    cluster.broker_mut(1).kill();
    wait_producers(&runtime, producers);
    // No delivery failed while brokers came and went.
    history.assert_no_failures();
    // The controller group no longer counts broker 1: with it and broker 2 down, brokers 3
    // and 4 are a majority of {2, 3, 4} (they would not be of {1, 2, 3, 4}).
    cluster.broker_mut(2).kill();
    let survivors = format!("{},{}", cluster.broker(3).addr(), cluster.broker(4).addr());
    wait_for("a topic created by the two remaining voters", DEADLINE, || {
        let out = cli(&survivors, &["topic", "create", "proof", "--partitions", "1"], "");
        out.status.success().then_some(())
    });
    check_read_back(&runtime, &survivors, "moving", &history.acked());
    history.assert_all_acked(60_000);
    history.assert_all_vouched();

    // Broker 1 comes back under its id, with no data, as a new member: it is not held to its
    // removal, and serves again.
    let address = cluster.join(1);
    cli_json(&survivors, &["cluster", "add-node", "1", &address]);
    wait_for("broker 1 serving again as a member", DEADLINE, || {
        let out = cli(cluster.broker(1).addr(), &["cluster", "info", "--output", "json"], "");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (out.status.success() && broker_ids(&info) == vec![1, 2, 3, 4]).then_some(())
    });
}

#[test]
fn given_a_paused_leader_and_a_slow_follower_should_fail_over_and_catch_up_without_loss() {
    let cluster = Cluster::start(3, &[]);
    cluster.create_topic("frozen", 1, 3, &[]);
    let paused = cluster.wait_for_leader("frozen", 0, None, DEADLINE);
    let runtime = conveyor_tests::runtime();
    let history = History::default();
    produce_now(&runtime, &cluster.bootstrap(), "frozen", "before", 2_000, &history);

    // A producer runs across the pause: its requests to the frozen leader time out, and it
    // moves to the new leader without failing a record.
    let stop = Arc::new(AtomicBool::new(false));
    let across = {
        let (bootstrap, history, stop) = (cluster.bootstrap(), history.clone(), Arc::clone(&stop));
        runtime.spawn(async move {
            let client = Client::connect(&bootstrap).await.expect("connect");
            let producer = client
                .producer(producer_config().request_timeout(Duration::from_secs(2)))
                .expect("producer config");
            produce_with(producer, "frozen", "across".into(), 1_000_000, history, stop).await;
        })
    };
    wait_for("the producer under way", DEADLINE, || {
        (history.count() >= 2_500).then_some(())
    });

    // SIGSTOP: the leader freezes with its connections open, as a hung machine would.
    cluster.broker(paused).pause();
    let next = cluster.wait_for_leader("frozen", 0, Some(paused), DEADLINE);
    let acked = history.count();
    wait_for("the running producer writing through the new leader", DEADLINE, || {
        (history.count() >= acked + 2_000).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    wait_producers(&runtime, vec![across]);
    produce_now(
        &runtime,
        &cluster.bootstrap_without(paused),
        "frozen",
        "paused",
        2_000,
        &history,
    );
    // A slow link to the third broker: writes still commit through the other majority.
    let slow = cluster
        .ids()
        .into_iter()
        .find(|id| *id != paused && *id != next)
        .expect("a third broker");
    cluster.broker(paused).resume();
    // No wait for the resumed broker to learn the new term: until it does it still believes it
    // leads, so the producer may send there first. Nothing can commit there, and the batches
    // it refuses are resent in order to the new leader.
    cluster.slow_down(slow, Duration::from_millis(20));
    produce_now(&runtime, &cluster.bootstrap(), "frozen", "slow", 2_000, &history);
    cluster.heal_all();
    cluster.wait_in_sync("frozen", 3);
    // Every phase delivered all it sent: the waits above counted the running producer's
    // writes before and after the pause.
    history.assert_no_failures();
    history.assert_all_vouched();

    print_idempotence_counters(&cluster);
    // The broker that was paused and the one that was slow each hold every acknowledged
    // record, in order and once, when they lead: the batches the frozen leader had committed
    // but not answered were resent to the new leader and answered from its producer state.
    for reader in [paused, slow] {
        cluster.transfer_leader("frozen", 0, reader);
        check_read_back(&runtime, cluster.broker(reader).addr(), "frozen", &history.acked());
    }
}

#[test]
fn given_leadership_moving_repeatedly_during_pipelined_produce_should_keep_every_record_in_order() {
    const TRANSFERS: usize = 16;
    const PLAIN: &str = "plain";
    let cluster = Cluster::start(3, &[]);
    // Producers start as soon as the topic exists, during its first election, and through
    // brokers other than the one the topic was created through (the first of the bootstrap
    // list), which may not have applied the creation yet.
    cluster.create_topic("moving", 2, 3, &[]);
    let runtime = conveyor_tests::runtime();
    let history = History::default();
    let stop = Arc::new(AtomicBool::new(false));
    // Two idempotent producers and one without idempotence, whose retries only the stream
    // part numbering keeps in order: its records may be stored twice, never lost or reordered.
    let producers: Vec<_> = [("p0", true), ("p1", true), (PLAIN, false)]
        .into_iter()
        .map(|(name, idempotent)| {
            let (bootstrap, history, stop) = (cluster.bootstrap_without(1), history.clone(), Arc::clone(&stop));
            runtime.spawn(async move {
                let client = Client::connect(&bootstrap).await.expect("connect");
                let config = producer_config().idempotence(idempotent);
                let producer = client.producer(config).expect("producer config");
                produce_with(producer, "moving", name.into(), 400_000, history, stop).await;
            })
        })
        .collect();
    wait_for("the producers to get going", DEADLINE, || {
        (history.count() > 5_000).then_some(())
    });

    // Every transfer refuses the batches pipelined to the old leader while later ones are
    // on their way: the client must resend each run in order, on one link at a time.
    let mut moved = Vec::new();
    for _ in 0..TRANSFERS {
        let from = cluster.wait_for_leader("moving", 0, None, DEADLINE);
        let to = cluster
            .ids()
            .into_iter()
            .find(|id| *id != from)
            .expect("another broker");
        let (acked_before, started) = (history.count(), Instant::now());
        cluster.transfer_leader("moving", 0, to);
        cluster.wait_for_leader("moving", 0, Some(from), DEADLINE);
        moved.push((from, to, history.count() - acked_before, started.elapsed()));
    }
    let acked_before_stop = history.count();
    stop.store(true, Ordering::Relaxed);
    wait_producers(&runtime, producers);
    println!(
        "transfers (from, to, records acknowledged meanwhile, time taken): {moved:?}; {} acknowledged after the last",
        history.count() - acked_before_stop
    );
    history.assert_no_failures();
    history.assert_all_vouched();

    cluster.wait_in_sync("moving", 3);
    print_idempotence_counters(&cluster);
    let observed = runtime.block_on(read_all(&cluster.bootstrap(), "moving"));
    let report = check(&history.acked(), &observed);
    println!("{report}");
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.reordered.is_empty(), "{report}");
    // A batch whose verdict a former leader could not learn within its wait is resent: the
    // idempotent producers' copies are answered from the producer state, the plain one's
    // may be stored again.
    let idempotent_duplicates: Vec<_> = report
        .duplicated
        .iter()
        .filter(|id| !id.starts_with(&format!("{PLAIN}-")))
        .collect();
    assert!(idempotent_duplicates.is_empty(), "{report}");
}
