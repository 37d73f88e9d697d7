//! Controlled shutdown: on SIGTERM a broker in a cluster hands leadership of the partitions
//! it leads, and of the controller, to in-sync replicas before it exits, so the cluster
//! never waits out an election timeout for it. A rolling restart of every broker while
//! producers run with acks=all then fails no record and loses none.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_client::proto::admin_client::AdminClient;
use conveyor_client::proto::{DescribeClusterRequest, MetadataRequest};
use conveyor_client::{Client, ProducerConfig, ProducerRecord};
use conveyor_tests::checker::{Acked, check};
use conveyor_tests::cluster::Cluster;
use conveyor_tests::{read_all, wait_for};

const DEADLINE: Duration = Duration::from_secs(120);

/// Acknowledged writes, failures and acknowledgement latencies of some producers.
#[derive(Clone, Default)]
struct History {
    acked: Arc<Mutex<Vec<Acked>>>,
    failed: Arc<Mutex<u64>>,
    first_error: Arc<Mutex<Option<String>>>,
    /// From `send` to the acknowledgement, per record.
    latencies: Arc<Mutex<Vec<Duration>>>,
}

impl History {
    fn count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }
    fn failed(&self) -> u64 {
        *self.failed.lock().expect("lock")
    }
    fn fail(&self, error: String) {
        *self.failed.lock().expect("lock") += 1;
        self.first_error.lock().expect("lock").get_or_insert(error);
    }
    /// p50, p99 and max acknowledgement latency.
    fn latency_summary(&self) -> (Duration, Duration, Duration) {
        let mut l = self.latencies.lock().expect("lock").clone();
        l.sort_unstable();
        let at = |q: f64| {
            l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)))
                .copied()
        };
        (
            at(0.50).unwrap_or_default(),
            at(0.99).unwrap_or_default(),
            l.last().copied().unwrap_or_default(),
        )
    }
}

/// Sends records `NAME-i` to `topic` with the default producer settings (acks=all) until
/// `stop` is set, recording every outcome.
async fn produce_until_stopped(
    bootstrap: String,
    topic: &'static str,
    name: String,
    history: History,
    stop: Arc<AtomicBool>,
) {
    let client = Client::connect(&bootstrap).await.expect("connect");
    let producer = client.producer(ProducerConfig::default()).expect("producer config");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Instant, conveyor_client::DeliveryFuture)>(1_024);
    let acks = history.clone();
    let acker = tokio::spawn(async move {
        while let Some((id, sent, delivery)) = rx.recv().await {
            match delivery.await {
                Ok(m) => {
                    acks.latencies.lock().expect("lock").push(sent.elapsed());
                    acks.acked.lock().expect("lock").push(Acked {
                        id,
                        partition: m.partition,
                        offset: m.offset.expect("acks=all returns offsets"),
                    });
                }
                Err(e) => acks.fail(e.to_string()),
            }
        }
    });
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("{name}-{i}");
        i += 1;
        let sent = Instant::now();
        match producer.send(ProducerRecord::new(topic, id.clone())).await {
            Ok(delivery) => {
                if tx.send((id, sent, delivery)).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                history.fail(format!("send: {e}"));
                break;
            }
        }
        // A steady rate, not a flood: the figure is latency, not throughput.
        if i.is_multiple_of(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    drop(tx);
    acker.await.expect("acker");
}

/// What broker `at` itself believes right now: each partition's leader of `topic` and the
/// controller (0: none known).
async fn local_view(at: &str, topic: &str) -> Option<(Vec<i32>, i32)> {
    let mut admin = AdminClient::connect(format!("http://{at}")).await.ok()?;
    let metadata = admin
        .metadata(MetadataRequest {
            topics: vec![topic.to_string()],
        })
        .await
        .ok()?
        .into_inner();
    let t = metadata.topics.into_iter().find(|t| t.name == topic)?;
    let leaders = t.partitions.iter().map(|p| p.leader).collect();
    let controller = admin
        .describe_cluster(DescribeClusterRequest {})
        .await
        .ok()?
        .into_inner()
        .controller;
    Some((leaders, controller))
}

/// How long after the exit the survivors may take to learn of the new leaders: the drain
/// waits only until the old leader knows, and the others hear from the new leader within a
/// heartbeat or so. Well below an election timeout (500 ms at least), so a group the drain
/// left behind still counts.
const LEARN_WITHIN: Duration = Duration::from_millis(300);

/// SIGTERMs broker `id` and, once it has exited, asks every other broker whom it takes for
/// each partition's leader and for the controller, for up to [`LEARN_WITHIN`] after the
/// exit. Returns how many of the last answers still name `id` or nobody: groups left
/// leaderless by the exit.
fn terminate_and_count_leaderless(
    cluster: &mut Cluster,
    runtime: &tokio::runtime::Runtime,
    id: u32,
    topic: &str,
) -> usize {
    let status = cluster.broker_mut(id).terminate();
    assert!(status.success(), "broker {id} exited with {status}");
    let survivors: Vec<String> = cluster
        .ids()
        .into_iter()
        .filter(|o| *o != id)
        .map(|o| cluster.broker(o).addr().to_string())
        .collect();
    let exited = Instant::now();
    let gone = |l: i32| l == 0 || l == id as i32;
    let mut leaderless = 0;
    for at in &survivors {
        loop {
            let (leaders, controller) = runtime
                .block_on(local_view(at, topic))
                .unwrap_or_else(|| panic!("broker at {at} answers metadata"));
            let here = leaders.iter().filter(|l| gone(**l)).count() + usize::from(gone(controller));
            if here == 0 || exited.elapsed() >= LEARN_WITHIN {
                println!(
                    "{} ms after broker {id} exited, {at} sees leaders {leaders:?}, controller {controller}",
                    exited.elapsed().as_millis()
                );
                leaderless += here;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    leaderless
}

#[test]
fn given_a_broker_leading_partitions_and_the_controller_when_sigtermed_should_hand_all_over_before_it_exits() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.create_topic("handover", 3, 3, &[]);
    let controller = cluster.wait_for_controller(None);
    cluster.wait_for_leader("handover", 0, None, DEADLINE);
    // The controller leads partition 0 as well.
    cluster.transfer_leader("handover", 0, controller);
    cluster.wait_in_sync("handover", 3);
    let runtime = conveyor_tests::runtime();
    let leaderless = terminate_and_count_leaderless(&mut cluster, &runtime, controller, "handover");
    let log = cluster.broker(controller).log();
    assert_eq!(
        leaderless, 0,
        "the survivors still named the stopped broker {controller} (or nobody) as leader when it exited; its log:\n{log}"
    );
    assert!(log.contains("controlled shutdown: drained in"), "{log}");
}

#[test]
fn given_producers_with_acks_all_when_every_broker_is_restarted_in_turn_should_fail_and_lose_no_record() {
    let mut cluster = Cluster::start(3, &[]);
    cluster.create_topic("rolling", 3, 3, &[]);
    cluster.wait_in_sync("rolling", 3);
    let runtime = conveyor_tests::runtime();
    let history = History::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..3)
        .map(|i| {
            runtime.spawn(produce_until_stopped(
                cluster.bootstrap(),
                "rolling",
                format!("p{i}"),
                history.clone(),
                Arc::clone(&stop),
            ))
        })
        .collect();
    let mut leaderless = Vec::new();
    for id in cluster.ids() {
        let before = history.count();
        wait_for("records acknowledged before the next restart", DEADLINE, || {
            (history.count() >= before + 2_000).then_some(())
        });
        leaderless.push(terminate_and_count_leaderless(&mut cluster, &runtime, id, "rolling"));
        cluster.broker_mut(id).restart();
        cluster.wait_in_sync("rolling", 3);
    }
    let before = history.count();
    wait_for("records acknowledged after the last restart", DEADLINE, || {
        (history.count() >= before + 2_000).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for p in producers {
            tokio::time::timeout(DEADLINE, p)
                .await
                .expect("producers finish")
                .expect("producer task");
        }
    });
    let (p50, p99, max) = history.latency_summary();
    println!(
        "rolling restart: {} acknowledged, {} failed; ack latency p50 {p50:?} p99 {p99:?} max {max:?}; \
         groups leaderless at each exit {leaderless:?}",
        history.count(),
        history.failed()
    );
    assert_eq!(
        history.failed(),
        0,
        "records failed at the client; first error: {:?}",
        history.first_error.lock().expect("lock")
    );
    let acked = history.acked.lock().expect("lock").clone();
    let observed = runtime.block_on(read_all(&cluster.bootstrap(), "rolling"));
    let report = check(&acked, &observed);
    println!("{report}");
    assert!(report.lost.is_empty(), "{report}");
    assert!(report.reordered.is_empty(), "{report}");
    // The default producer is idempotent: a batch resent across a restart is stored once.
    assert!(report.duplicated.is_empty(), "{report}");
    assert_eq!(
        leaderless,
        vec![0, 0, 0],
        "after each SIGTERM the survivors still named the stopped broker (or nobody) as leader of that many groups"
    );
}
