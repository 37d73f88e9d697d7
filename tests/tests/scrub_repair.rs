//! A replica that finds a corrupt batch repairs itself from its leader, end to end: bytes
//! flipped in a sealed segment of a running broker are found by its background scrub
//! (`conveyor_corrupt_batches_total`), the replica stops serving and leading, reopens its log
//! (which cuts it at the damaged batch), catches up from the leader until its segment holds
//! the original bytes again and it is back in sync, and every acknowledged record reads back
//! intact, from the repaired replica too.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor_client::proto::fetch_client::FetchClient;
use conveyor_client::proto::{FetchRequest, PartitionFetch};
use conveyor_client::{Client, ClientError, ProducerConfig, ProducerRecord};
use conveyor_tests::checker::{Acked, check};
use conveyor_tests::cluster::Cluster;
use conveyor_tests::{read_all, wait_for};

/// How long detection, an election or a repair may take on a loaded two-core machine.
const DEADLINE: Duration = Duration::from_secs(60);
/// Records sent before waiting for their acknowledgements: many small batches.
const RECORDS_PER_ROUND: usize = 20;
/// Records acknowledged before the damage; enough for several sealed 8 KiB segments.
const RECORDS: u64 = 600;
/// The scrub rests this long between passes (60 s by default), so that damage made while
/// the broker runs is found in seconds.
const SCRUB_CONFIG: &str = "[log]\nscrub_interval = \"200ms\"\n";
/// Bytes flipped inside one record's value (covered by its batch's CRC).
const FLIPPED: usize = 4;

/// A producer name padded so that a few records fill a batch and a few batches a segment.
fn producer_name(name: &str) -> String {
    format!("{name}{}", "_".repeat(80))
}

/// Starts three brokers scrubbing often, and creates `topic` (one partition, three replicas,
/// 8 KiB segments).
fn start(topic: &str) -> Cluster {
    let cluster = Cluster::start_with_config(3, SCRUB_CONFIG);
    // Replicas are placed only on brokers the controller has heard from.
    wait_for("every broker seen alive", DEADLINE, || {
        let info = cluster.info(None)?;
        let alive = info["brokers"]
            .as_array()?
            .iter()
            .filter(|b| b["alive"] == true)
            .count();
        (alive == 3).then_some(())
    });
    cluster.create_topic(
        topic,
        1,
        3,
        &["--config", "segment.bytes=8192", "--config", "max.message.bytes=8192"],
    );
    cluster
}

/// Sends `count` records `NAME-i` (padded) to `topic`, acknowledged by every in-sync replica,
/// and returns what was acknowledged.
fn produce(bootstrap: &str, topic: &str, name: &str, count: u64) -> Vec<Acked> {
    let name = producer_name(name);
    conveyor_tests::runtime().block_on(async {
        let client = Client::connect(bootstrap).await.expect("connect");
        let config = ProducerConfig::default()
            .linger(Duration::from_millis(2))
            .retries(1_000)
            .delivery_timeout(DEADLINE);
        let producer = client.producer(config).expect("producer config");
        let mut acked = Vec::new();
        let mut pending = Vec::new();
        for i in 0..count {
            let id = format!("{name}-{i:05}");
            let delivery = producer
                .send(ProducerRecord::new(topic, id.clone()))
                .await
                .expect("send");
            pending.push((id, delivery));
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

/// `broker`'s `conveyor_corrupt_batches_total`.
fn corrupt_batches(cluster: &Cluster, broker: u32) -> Option<u64> {
    cluster
        .broker(broker)
        .scrape_metrics()
        .lines()
        .find_map(|l| l.strip_prefix("conveyor_corrupt_batches_total "))
        .and_then(|v| v.trim().parse().ok())
}

/// The in-sync replicas of partition 0 as its leader reports them (asked of `skip`'s peers).
fn in_sync(cluster: &Cluster, topic: &str, skip: Option<u32>) -> Option<Vec<u32>> {
    let d = cluster.describe(topic, skip)?;
    let mut ids: Vec<u32> = d["partitions"][0]["in_sync"]
        .as_array()?
        .iter()
        .filter_map(|r| r.as_u64().map(|r| r as u32))
        .collect();
    ids.sort_unstable();
    Some(ids)
}

fn wait_all_in_sync(cluster: &Cluster, topic: &str) {
    wait_for("all three replicas in sync", DEADLINE, || {
        (in_sync(cluster, topic, None)? == [1, 2, 3]).then_some(())
    });
}

fn partition_dir(cluster: &Cluster, broker: u32, topic: &str) -> PathBuf {
    cluster.broker(broker).data_dir().join("topics").join(topic).join("0")
}

/// The segment files of a partition directory, oldest first, with their base offsets.
fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut logs: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .expect("partition dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .map(|p| {
            let base = p
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
                .expect("segment files are named by base offset");
            (base, p)
        })
        .collect();
    logs.sort();
    logs
}

/// Bytes flipped in a segment file, and what they were.
struct Damage {
    segment: PathBuf,
    position: u64,
    original: Vec<u8>,
    /// The acknowledged record whose value was altered.
    record: Acked,
}

impl Damage {
    /// Whether the segment file holds the original bytes at the damaged position again.
    fn repaired(&self) -> bool {
        let Ok(file) = std::fs::File::open(&self.segment) else {
            return false;
        };
        let mut now = vec![0u8; self.original.len()];
        file.read_exact_at(&mut now, self.position).is_ok() && now == self.original
    }
}

/// Flips bytes inside the value of an acknowledged record stored in a sealed segment (not
/// the first, which holds the group's first entries) of `broker`'s replica, in place, while
/// the broker runs, as a failing disk would.
fn damage_a_sealed_segment(cluster: &Cluster, broker: u32, topic: &str, acked: &[Acked]) -> Damage {
    let segments = segments(&partition_dir(cluster, broker, topic));
    assert!(segments.len() >= 4, "several sealed segments: {segments:?}");
    let (base, segment) = segments[1].clone();
    let next_base = segments[2].0;
    let inside: Vec<&Acked> = acked
        .iter()
        .filter(|a| a.offset >= base && a.offset < next_base)
        .collect();
    assert!(!inside.is_empty(), "segment {segment:?} holds acknowledged records");
    let record = inside[inside.len() / 2].clone();
    let bytes = std::fs::read(&segment).expect("read segment");
    let at = bytes
        .windows(record.id.len())
        .position(|w| w == record.id.as_bytes())
        .unwrap_or_else(|| panic!("{} is stored uncompressed in {segment:?}", record.id))
        // Inside the padding of the value.
        + 16;
    let original = bytes[at..at + FLIPPED].to_vec();
    let flipped: Vec<u8> = original.iter().map(|b| b ^ 0x40).collect();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .expect("open segment");
    file.write_all_at(&flipped, at as u64).expect("flip bytes");
    file.sync_all().expect("sync segment");
    Damage {
        segment,
        position: at as u64,
        original,
        record,
    }
}

/// A decoding fetch of the damaged record's offset from `broker`: it must answer with a
/// retriable error or with the acknowledged values, never an altered one. Returns whether
/// it answered with records.
fn fetch_never_serves_damage(
    cluster: &Cluster,
    broker: u32,
    topic: &str,
    damage: &Damage,
    ids: &HashMap<u64, String>,
) -> bool {
    let url = format!("http://{}", cluster.broker(broker).addr());
    conveyor_tests::runtime().block_on(async {
        let mut client = FetchClient::connect(url).await.expect("grpc");
        let answer = client
            .fetch(FetchRequest {
                partitions: vec![PartitionFetch {
                    topic: topic.into(),
                    partition: 0,
                    offset: damage.record.offset,
                    max_bytes: 0,
                }],
                decode_records: true,
                ..FetchRequest::default()
            })
            .await;
        match answer {
            Err(status) => {
                let error = ClientError::from(status);
                assert!(
                    error.is_retriable(),
                    "a replica that found damage answers retriably: {error}"
                );
                false
            }
            Ok(response) => {
                let partition = &response.get_ref().partitions[0];
                if let Some(error) = &partition.error {
                    assert!(
                        error.retriable,
                        "a replica that found damage answers retriably: {error:?}"
                    );
                    return false;
                }
                for r in &partition.records {
                    let value = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned();
                    if let Some(id) = ids.get(&r.offset) {
                        assert_eq!(
                            &value, id,
                            "broker {broker} served an altered value at offset {}",
                            r.offset
                        );
                    }
                }
                !partition.records.is_empty()
            }
        }
    })
}

/// Waits until `broker`'s scrub reported the damage and its replica holds the original
/// bytes again, in sync with the others, reopened without a panic.
fn wait_repaired(cluster: &Cluster, broker: u32, topic: &str, damage: &Damage) {
    wait_for("the scrub to report the corrupt batch", DEADLINE, || {
        corrupt_batches(cluster, broker).filter(|n| *n >= 1)
    });
    wait_for("the damaged segment to hold the original bytes again", DEADLINE, || {
        damage.repaired().then_some(())
    });
    wait_all_in_sync(cluster, topic);
    let log = cluster.broker(broker).log();
    let report = log
        .lines()
        .find(|l| l.contains("scrub found a corrupt batch"))
        .unwrap_or_else(|| panic!("broker {broker} logs the finding:\n{log}"));
    assert!(report.contains(topic), "{report}");
    assert!(
        log.contains("reopened from its log"),
        "broker {broker} reopened the replica:\n{log}"
    );
    assert!(!log.contains("panicked"), "broker {broker} panicked:\n{log}");
}

/// Asserts that the repaired segment file is `other`'s copy of it, byte for byte.
fn assert_same_as_copy_on(cluster: &Cluster, other: u32, topic: &str, damage: &Damage) {
    let name = damage.segment.file_name().expect("segment name");
    let copy = partition_dir(cluster, other, topic).join(name);
    assert!(
        std::fs::read(&damage.segment).expect("repaired segment") == std::fs::read(&copy).expect("the other copy"),
        "the repaired segment {name:?} is broker {other}'s copy byte for byte"
    );
}

/// Moves leadership of partition 0 to `to` and waits until it leads.
fn transfer_leadership(cluster: &Cluster, topic: &str, to: u32) {
    cluster.transfer_leader(topic, 0, to);
    wait_for("the repaired replica to lead", DEADLINE, || {
        let d = cluster.describe(topic, None)?;
        (d["partitions"][0]["leader"].as_u64()? == u64::from(to)).then_some(())
    });
}

#[test]
fn given_a_corrupt_batch_in_a_followers_sealed_segment_the_follower_should_report_it_and_repair_itself_from_the_leader()
{
    let topic = "follower-damage";
    let cluster = start(topic);
    let leader = cluster.wait_for_leader(topic, 0, None, DEADLINE);
    let follower = cluster.ids().into_iter().find(|b| *b != leader).expect("a follower");
    let mut acked = produce(&cluster.bootstrap(), topic, "early", RECORDS);
    wait_all_in_sync(&cluster, topic);
    assert_eq!(
        corrupt_batches(&cluster, follower),
        Some(0),
        "an intact replica has no corrupt batch"
    );

    let damage = damage_a_sealed_segment(&cluster, follower, topic, &acked);
    wait_repaired(&cluster, follower, topic, &damage);
    assert_same_as_copy_on(&cluster, leader, topic, &damage);

    // The repaired replica takes writes and leads, serving everything acknowledged.
    acked.extend(produce(&cluster.bootstrap(), topic, "late", 100));
    wait_all_in_sync(&cluster, topic);
    transfer_leadership(&cluster, topic, follower);
    assert_all_read_back(cluster.broker(follower).addr(), topic, &acked);
}

#[test]
fn given_a_corrupt_batch_in_the_leaders_sealed_segment_the_leader_should_stop_serving_it_hand_over_and_repair_itself() {
    let topic = "leader-damage";
    let cluster = start(topic);
    let leader = cluster.wait_for_leader(topic, 0, None, DEADLINE);
    let mut acked = produce(&cluster.bootstrap(), topic, "early", RECORDS);
    wait_all_in_sync(&cluster, topic);
    let ids: HashMap<u64, String> = acked.iter().map(|a| (a.offset, a.id.clone())).collect();

    let damage = damage_a_sealed_segment(&cluster, leader, topic, &acked);
    // From the damage until another replica leads, the damaged leader never serves the
    // altered value and answers with errors a client retries elsewhere.
    let new_leader = wait_for("another replica to lead", DEADLINE, || {
        fetch_never_serves_damage(&cluster, leader, topic, &damage, &ids);
        let d = cluster.describe(topic, Some(leader))?;
        let now = d["partitions"][0]["leader"].as_u64()? as u32;
        (now != 0 && now != leader).then_some(now)
    });
    // Writes go on through the new leader while the old one repairs itself.
    acked.extend(produce(&cluster.bootstrap(), topic, "during", 100));
    wait_repaired(&cluster, leader, topic, &damage);
    assert_same_as_copy_on(&cluster, new_leader, topic, &damage);

    transfer_leadership(&cluster, topic, leader);
    assert!(
        fetch_never_serves_damage(&cluster, leader, topic, &damage, &ids),
        "the repaired leader serves the damaged offset again"
    );
    assert_all_read_back(cluster.broker(leader).addr(), topic, &acked);
}
