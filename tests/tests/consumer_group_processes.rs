//! Consumer group members as separate `conveyor consume --group` processes, so that they
//! can be SIGKILLed: a killed member's partitions move to the survivor within its session
//! timeout (plus the survivor's next heartbeat), nothing acknowledged is lost, and the
//! only duplicates are records of the killed member's uncommitted window; a static member
//! that is killed and restarted gets its partitions back with no rebalance.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use conveyor_client::consumer::group::{AssignmentEvent, GroupConfig, OffsetReset};
use conveyor_client::{Client, ConsumerConfig, ProducerConfig, ProducerRecord};
use conveyor_tests::{BrokerProcess, cli, cli_bin, runtime, wait_for};
use futures::StreamExt;

const DEADLINE: Duration = Duration::from_secs(60);

/// A `conveyor consume TOPIC --group GROUP --output json` process writing to `out`.
fn member(broker: &str, topic: &str, group: &str, extra: &[&str], out: &std::path::Path) -> Child {
    let file = std::fs::File::create(out).expect("member output file");
    Command::new(cli_bin())
        .args([
            "--broker", broker, "--output", "json", "consume", topic, "--group", group,
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn conveyor consume --group")
}

/// (partition, offset) of every record a member printed.
fn printed(out: &std::path::Path) -> Vec<(i32, u64)> {
    let file = std::fs::File::open(out).expect("member output");
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        // A SIGKILLed process may leave half a line.
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .map(|v| {
            (
                v["partition"].as_i64().expect("partition") as i32,
                v["offset"].as_u64().expect("offset"),
            )
        })
        .collect()
}

fn describe(broker: &str, group: &str) -> serde_json::Value {
    conveyor_tests::cli_json(broker, &["group", "describe", group])
}

/// Member id → its partitions, from `group describe`.
fn assignments(d: &serde_json::Value) -> BTreeMap<String, BTreeSet<i32>> {
    d["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let ps = m["assignment"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|p| p["partition"].as_i64())
                                .map(|p| p as i32)
                                .collect()
                        })
                        .unwrap_or_default();
                    (m["id"].as_str().unwrap_or_default().to_string(), ps)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_sigkilled_members_partitions_move_and_nothing_acknowledged_is_lost() {
    const SESSION: Duration = Duration::from_secs(4);
    const HEARTBEAT: Duration = Duration::from_millis(500);
    let broker = BrokerProcess::start_with_config("[groups]\nheartbeat_interval = \"500ms\"\n");
    let addr = broker.addr().to_string();
    assert!(
        cli(&addr, &["topic", "create", "jobs", "--partitions", "6"], "")
            .status
            .success()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let killed_out = dir.path().join("killed.jsonl");

    runtime().block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        // A producer that keeps writing to every partition until told to stop.
        let stop = Arc::new(AtomicBool::new(false));
        let producing = {
            let (client, stop) = (client.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let producer = client.producer(ProducerConfig::default()).expect("producer");
                let mut acked: Vec<(i32, u64)> = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 200_000 {
                    let mut pending = Vec::new();
                    for _ in 0..30 {
                        let record = ProducerRecord::new("jobs", format!("job {i}")).key(format!("k{}", i % 60));
                        pending.push(producer.send(record).await.expect("send"));
                        i += 1;
                    }
                    for d in pending {
                        let m = d.await.expect("acknowledged");
                        acked.push((m.partition, m.offset.expect("offset with acks=all")));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                acked
            })
        };

        let mut killed = member(
            &addr,
            "jobs",
            "workers",
            &["--from-beginning", "--session-timeout", "4s"],
            &killed_out,
        );
        wait_for("the first member to own every partition", DEADLINE, || {
            let a = assignments(&describe(&addr, "workers"));
            (a.len() == 1 && a.values().all(|ps| ps.len() == 6)).then_some(())
        });
        // The survivor, in-process, so that it can report when partitions reach it.
        let config = GroupConfig::default().session_timeout(SESSION).reset(OffsetReset::Earliest);
        let mut survivor = client
            .consumer(ConsumerConfig::default().max_wait(Duration::from_millis(100)))
            .subscribe(&["jobs"], "workers", config)
            .expect("subscribe");
        let mut events = survivor.events();
        let mut got: Vec<(i32, u64)> = Vec::new();
        let mut first_at: BTreeMap<i32, u64> = BTreeMap::new();
        let started = Instant::now();
        // Consume until the group is split 3/3 and the killed member has printed records
        // since.
        let mut split_seen = false;
        loop {
            assert!(started.elapsed() < DEADLINE, "the group did not split between the two members");
            tokio::select! {
                r = survivor.next() => {
                    let r = r.expect("stream ends only when closed").expect("record");
                    first_at.entry(r.partition).or_insert(r.offset);
                    got.push((r.partition, r.offset));
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if !split_seen && survivor.assignment().len() == 3 {
                let a = assignments(&describe(&addr, "workers"));
                split_seen = a.len() == 2 && a.values().all(|ps| ps.len() == 3);
            }
            if split_seen && printed(&killed_out).len() > 100 {
                break;
            }
        }
        let mine: BTreeSet<i32> = survivor.assignment().iter().map(|p| p.partition).collect();
        killed.kill().expect("SIGKILL the member");
        let killed_at = Instant::now();
        let _ = killed.wait();
        // Its partitions come to the survivor within the session timeout, plus one
        // heartbeat of the survivor's and the coordinator's 250 ms check.
        let moved_at = loop {
            assert!(killed_at.elapsed() < DEADLINE, "the killed member's partitions never moved");
            tokio::select! {
                r = survivor.next() => {
                    let r = r.expect("stream").expect("record");
                    first_at.entry(r.partition).or_insert(r.offset);
                    got.push((r.partition, r.offset));
                }
                e = events.recv() => {
                    if let Ok(AssignmentEvent::Assigned(_)) = e
                        && survivor.assignment().len() == 6
                    {
                        break killed_at.elapsed();
                    }
                }
            }
        };
        let bound = SESSION + Duration::from_secs(1) + HEARTBEAT;
        assert!(moved_at <= bound, "partitions moved {moved_at:?} after the kill; bound {bound:?}");
        stop.store(true, Ordering::Relaxed);
        let acked = producing.await.expect("producer task");
        // Read on until everything acknowledged is consumed by one member or the other.
        let before_kill = printed(&killed_out);
        let all: BTreeSet<(i32, u64)> = acked.iter().copied().collect();
        let mut seen: BTreeSet<(i32, u64)> = got.iter().chain(&before_kill).copied().collect();
        while !all.is_subset(&seen) {
            assert!(killed_at.elapsed() < DEADLINE * 2, "{} acknowledged records never consumed", all.difference(&seen).count());
            if let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(5), survivor.next()).await {
                let r = r.expect("record");
                first_at.entry(r.partition).or_insert(r.offset);
                got.push((r.partition, r.offset));
                seen.insert((r.partition, r.offset));
            }
        }
        survivor.close().await.expect("close");
        // The survivor never saw a record twice itself.
        let distinct: BTreeSet<(i32, u64)> = got.iter().copied().collect();
        assert_eq!(distinct.len(), got.len(), "the survivor was handed a record twice");
        // Duplicates: records both members printed. Each is in a partition the killed member
        // owned, at or after where the survivor started it: the killed member's uncommitted
        // window, never anything it had committed.
        let killed_set: BTreeSet<(i32, u64)> = before_kill.iter().copied().collect();
        let duplicates: Vec<(i32, u64)> = distinct.intersection(&killed_set).copied().collect();
        for (p, o) in &duplicates {
            assert!(!mine.contains(p), "partition {p} never left the survivor, yet {o} was read by both");
        }
        // The survivor took each of the killed member's partitions over at its committed
        // offset and read on from there: the duplicates are exactly what the killed member
        // printed at or after that offset (its uncommitted window), nothing below it.
        for p in first_at.keys().filter(|p| !mine.contains(p)) {
            let window: BTreeSet<u64> = killed_set.iter().filter(|(q, o)| q == p && *o >= first_at[p]).map(|(_, o)| *o).collect();
            let both: BTreeSet<u64> = duplicates.iter().filter(|(q, _)| q == p).map(|(_, o)| *o).collect();
            assert_eq!(both, window, "partition {p}: duplicates are not the killed member's uncommitted window");
        }
        println!(
            "{} records acknowledged; partitions moved {moved_at:?} after the kill; {} duplicates (the killed member's uncommitted window)",
            all.len(),
            duplicates.len()
        );
    });
}

#[test]
fn a_static_member_killed_and_restarted_gets_its_partitions_back_without_a_rebalance() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    assert!(
        cli(&addr, &["topic", "create", "jobs", "--partitions", "4"], "")
            .status
            .success()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let statics = ["--instance-id", "--session-timeout", "30s"];
    let start = |id: &str, n: u32| {
        member(
            &addr,
            "jobs",
            "workers",
            &[statics[0], id, statics[1], statics[2]],
            &dir.path().join(format!("{id}-{n}.jsonl")),
        )
    };
    let mut one = start("worker-1", 0);
    let mut two = start("worker-2", 0);
    let by_instance = |d: &serde_json::Value| -> BTreeMap<String, (String, BTreeSet<i32>)> {
        let ids = assignments(d);
        d["members"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        let id = m["id"].as_str().unwrap_or_default().to_string();
                        let instance = m["instance_id"].as_str().unwrap_or_default().to_string();
                        (instance, (id.clone(), ids.get(&id).cloned().unwrap_or_default()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let settled = |d: &serde_json::Value| {
        d["state"] == "stable" && {
            let a = assignments(d);
            a.len() == 2 && a.values().all(|ps| ps.len() == 2)
        }
    };
    let before = wait_for("two static members, two partitions each", DEADLINE, || {
        let d = describe(&addr, "workers");
        settled(&d).then(|| by_instance(&d))
    });
    let rt = runtime();
    let client = rt.block_on(Client::connect(&addr)).expect("connect");
    let epoch = |client: &Client| {
        rt.block_on(async {
            client
                .groups()
                .describe_group("workers")
                .await
                .expect("describe")
                .group_epoch
        })
    };
    let epoch_before = epoch(&client);
    let rebalances_before = broker.metric("conveyor_group_rebalances_total").unwrap_or(0.0);

    one.kill().expect("SIGKILL worker-1");
    let _ = one.wait();
    let mut one = start("worker-1", 1);
    let after = wait_for("worker-1 back under a new member id", DEADLINE, || {
        let d = describe(&addr, "workers");
        let now = by_instance(&d);
        let back = now.get("worker-1").is_some_and(|(id, _)| *id != before["worker-1"].0);
        (back && settled(&d)).then_some(now)
    });
    assert_eq!(
        after["worker-1"].1, before["worker-1"].1,
        "worker-1 got its partitions back"
    );
    assert_eq!(after["worker-2"], before["worker-2"], "worker-2 was not touched");
    assert_eq!(
        epoch(&client),
        epoch_before,
        "no rebalance: the group epoch did not move"
    );
    assert_eq!(
        broker.metric("conveyor_group_rebalances_total").unwrap_or(0.0),
        rebalances_before,
        "no rebalance counted"
    );
    let _ = one.kill();
    let _ = two.kill();
    let _ = one.wait();
    let _ = two.wait();
}
