//! Topic registry tests: placement, names, and what happens to topic directories.

use std::path::Path;

use super::*;
use crate::replica::state_snapshot::SnapshotPoint;

#[test]
fn placement_spreads_leaders_and_replicas_evenly() {
    let placed = place(&[1, 2, 3], 6, 3, 0);
    let mut leaders = [0; 4];
    let mut replicas = [0; 4];
    for r in &placed {
        assert_eq!(r.len(), 3);
        let mut distinct = r.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{r:?}");
        leaders[r[0] as usize] += 1;
        for b in r {
            replicas[*b as usize] += 1;
        }
    }
    assert_eq!(&leaders[1..], &[2, 2, 2]);
    assert_eq!(&replicas[1..], &[6, 6, 6]);
    assert_eq!(
        place(&[1, 2, 3], 1, 1, 4),
        vec![vec![2]],
        "the start offset rotates leaders across topics"
    );
}

#[test]
fn topic_names_follow_kafka_rules() {
    for ok in ["orders", "a.b_c-d", "X9", &"x".repeat(249)] {
        validate_topic_name(ok).expect(ok);
    }
    for bad in ["", ".", "..", "has space", "emoji🚀", "__internal", &"x".repeat(250)] {
        assert!(validate_topic_name(bad).is_err(), "{bad}");
    }
}

/// A single-node registry over `data_dir`.
fn open_registry(data_dir: &Path) -> Arc<Registry> {
    open_registry_snapshotting(data_dir, DEFAULT_SNAPSHOT_EVERY_RECORDS)
}

/// A single-node registry over `data_dir` that snapshots every `every` records.
fn open_registry_snapshotting(data_dir: &Path, every: u64) -> Arc<Registry> {
    Arc::new(try_open_registry(data_dir, every).expect("registry"))
}

fn try_open_registry(data_dir: &Path, every: u64) -> anyhow::Result<Registry> {
    try_open_registry_every(data_dir, every, DEFAULT_SNAPSHOT_EVERY_BYTES)
}

fn try_open_registry_every(data_dir: &Path, every: u64, every_bytes: u64) -> anyhow::Result<Registry> {
    let metrics = Arc::new(Metrics::default());
    let transport =
        Transport::start(1, "127.0.0.1:1".into(), &BTreeMap::new(), 16, Arc::clone(&metrics)).expect("transport");
    let options = RegistryOptions {
        node_id: 1,
        data_dir: data_dir.to_path_buf(),
        defaults: TopicDefaults::from_section(&crate::config::LogSection::default()),
        queue_depth: 16,
        queue_bytes: 1 << 20,
        max_partitions: 16,
        join: false,
        snapshot_every_records: every,
        snapshot_every_bytes: every_bytes,
        producer_expiration: std::time::Duration::from_secs(86_400),
    };
    Registry::open(options, metrics, tokio::runtime::Handle::current(), transport)
}

fn creation(name: &str, id: &str) -> TopicCreated {
    TopicCreated {
        name: name.into(),
        partitions: 1,
        replication_factor: 1,
        configs: Default::default(),
        topic_id: id.into(),
        assignments: vec![PartitionAssignment { replicas: vec![1] }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_quarantined_at_start_comes_back_with_its_data_when_its_creation_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = open_registry(dir.path());
    let topic = registry.open_topic(creation("a", "id1"), None).expect("open");
    let replica = dir.path().join(TOPICS_DIR).join("a").join("0");
    let partition = Arc::clone(&topic.local[&0]);
    partition.stop().await;
    tokio::task::spawn_blocking(move || partition.close())
        .await
        .expect("join")
        .expect("close");
    let state = std::fs::read(replica.join("raft-state")).expect("the replica stored its raft state");
    std::fs::write(replica.join("kept"), b"").expect("marker");

    // At start the local metadata log lacked the creation (it lost its tail).
    registry.remove_unknown_dirs(&BTreeSet::new()).expect("quarantine");
    assert!(!replica.exists(), "moved to quarantine");
    let quarantined = dir.path().join(QUARANTINE_DIR).join("a.id1");
    assert!(quarantined.exists());

    // The log catches up and applies the same incarnation's creation.
    let reopened = registry.open_topic(creation("a", "id1"), None).expect("open again");
    assert!(reopened.local.contains_key(&0), "{:?}", reopened.unopened);
    assert!(
        replica.join("kept").exists(),
        "the quarantined replica was restored, not replaced by an empty one"
    );
    assert_eq!(std::fs::read(replica.join("raft-state")).expect("raft-state"), state);
    assert!(!quarantined.exists());
    reopened.local[&0].stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_directory_holds_another_incarnation_is_reported_stopped_and_never_opened_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = open_registry(dir.path());
    let topic_dir = dir.path().join(TOPICS_DIR).join("a");
    assert_eq!(
        prepare_topic_dir(dir.path(), "a", "id2").expect("mark"),
        TopicDir::Ready
    );

    let topic = Arc::new(registry.open_topic(creation("a", "id1"), None).expect("open"));
    assert!(topic.local.is_empty());
    let reason = &topic.unopened.get(&0).expect("listed as unopened").reason;
    assert!(
        reason.contains("another incarnation") && reason.contains("id2"),
        "{reason}"
    );

    // Nor does a retry open it in the other incarnation's directory.
    let retried = registry.open_local_replica(&topic, 0).await;
    let Err(refused) = retried else {
        panic!("the retry opened a replica in the other incarnation's directory")
    };
    assert!(refused.contains("id2"), "{refused}");
    assert!(
        !topic_dir.join("0").exists(),
        "nothing was created in the other incarnation's directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_moved_off_this_broker_is_retired_before_its_directory_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = open_registry(dir.path());
    let replica = dir.path().join(TOPICS_DIR).join("a").join("0");
    let defaults = TopicDefaults::from_section(&crate::config::LogSection::default());
    // Its group no longer lists this broker (1): only broker 2 votes.
    let partition = Partition::open(
        &registry.open_context(),
        "a",
        0,
        &replica,
        defaults.log_config(),
        &[2],
        2,
    )
    .expect("open");
    let topic = Arc::new(Topic {
        name: "a".into(),
        id: "id1".into(),
        replication_factor: 1,
        overrides: BTreeMap::new(),
        effective: defaults,
        assignments: vec![vec![2]],
        initial: vec![vec![2]],
        local: BTreeMap::from([(0, Arc::clone(&partition))]),
        unopened: BTreeMap::new(),
    });
    registry.insert(Topic::clone(&topic));
    registry.remove_departed_replica(&topic, 0).await;
    assert!(!replica.exists(), "the replica's data is removed");
    assert!(registry.get("a").expect("topic").local.is_empty());

    // A replica placed here again later uses the same path; a retention pass that still
    // holds the departed partition must not write into it.
    std::fs::create_dir_all(&replica).expect("a later replica's directory");
    let held = Arc::clone(&partition);
    let stored = tokio::task::spawn_blocking(move || held.stores_raft_state())
        .await
        .expect("join");
    assert!(!stored, "the departed partition still stores raft-state");
    assert!(!replica.join("raft-state").exists());
}

#[test]
fn preparing_a_directory_that_holds_another_incarnation_of_the_name_leaves_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = dir.path().join(TOPICS_DIR).join("a");
    assert_eq!(prepare_topic_dir(dir.path(), "a", "id2").expect("new"), TopicDir::Ready);
    std::fs::create_dir_all(topic.join("0")).expect("partition");
    std::fs::write(topic.join("0").join("raft-state"), b"state").expect("state");
    // The earlier incarnation's creation, applied again after an unclean restart.
    assert_eq!(
        prepare_topic_dir(dir.path(), "a", "id1").expect("other"),
        TopicDir::Other("id2".into())
    );
    assert_eq!(
        std::fs::read(topic.join("0").join("raft-state")).expect("kept"),
        b"state"
    );
    assert_eq!(
        prepare_topic_dir(dir.path(), "a", "id2").expect("same"),
        TopicDir::Ready
    );
    // Only its own deletion removes it.
    remove_topic_data(dir.path(), "a", "id1").expect("no-op");
    assert!(topic.join("0").join("raft-state").exists());
    remove_topic_data(dir.path(), "a", "id2").expect("removed");
    assert!(!topic.exists());
}

/// A registry with its applier running, and how to stop both.
struct Running {
    registry: Arc<Registry>,
    stop: tokio::sync::oneshot::Sender<()>,
    applier: tokio::task::JoinHandle<()>,
}

fn run(registry: Arc<Registry>) -> Running {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let applier = tokio::spawn(Arc::clone(&registry).run_applier(async move {
        drop(stopped.await);
    }));
    Running {
        registry,
        stop,
        applier,
    }
}

impl Running {
    async fn shut_down(self) {
        let _ = self.stop.send(());
        self.applier.await.expect("applier");
        let partitions = self.registry.all_partitions();
        for p in &partitions {
            p.stop().await;
        }
        tokio::task::spawn_blocking(move || partitions.iter().for_each(|p| p.close().expect("close")))
            .await
            .expect("join");
    }
}

/// Creates `count` topics and deletes all but every third: `count + 2 * count / 3` records.
async fn churn(registry: &Registry, count: usize) -> Vec<String> {
    registry.controller().await.expect("a controller");
    let mut kept = Vec::new();
    for i in 0..count {
        let name = format!("t{i:03}");
        registry
            .create_topic(&name, 1, 1, BTreeMap::new())
            .await
            .expect("create");
        if i % 3 == 0 {
            kept.push(name);
        } else {
            registry.delete_topic(&name).await.expect("delete");
        }
    }
    kept
}

fn names(registry: &Registry) -> Vec<String> {
    registry.list().iter().map(|t| t.name.clone()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_is_taken_after_so_many_bytes_of_metadata_log_whatever_the_record_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || Arc::new(try_open_registry_every(dir.path(), 1_000_000, 2 << 10).expect("registry"));
    let running = run(open());
    let kept = churn(&running.registry, 30).await;
    running.shut_down().await;
    let reopened = open();
    assert_eq!(names(&reopened), kept, "every topic is back");
    let replayed = reopened.replayed_at_start();
    // 50 records of well over 40 bytes each: a snapshot every 2 KiB of log leaves a tail of
    // fewer than 50 to replay.
    assert!(
        replayed < 50,
        "the start read {replayed} metadata records: no snapshot was taken by bytes"
    );
    run(reopened).shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_loads_the_newest_snapshot_and_replays_only_the_log_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let running = run(open_registry_snapshotting(dir.path(), 10));
    let kept = churn(&running.registry, 30).await;
    running.shut_down().await;

    let reopened = open_registry_snapshotting(dir.path(), 10);
    assert_eq!(names(&reopened), kept, "every topic is back");
    let replayed = reopened.replayed_at_start();
    assert!(
        replayed <= 10,
        "the start read {replayed} metadata records from the log; after a snapshot every 10 records it needs at most 10"
    );
    let topic = reopened.get("t003").expect("topic");
    assert!(topic.local.contains_key(&0), "its replica is open again");
    run(reopened).shut_down().await;

    // The newest snapshot damaged: the older one is loaded, and the log after it replayed.
    let snapshots = dir.path().join(CONTROLLER_TOPIC).join(SNAPSHOTS_DIR);
    let damage = |path: &Path| {
        let mut bytes = std::fs::read(path).expect("read");
        bytes[10] ^= 0xff;
        std::fs::write(path, bytes).expect("damage");
    };
    let stored = |dir: &Path| -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .expect("snapshots")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "snap"))
            .collect();
        files.sort();
        files
    };
    let files = stored(&snapshots);
    assert_eq!(files.len(), 2, "the newest two are kept: {files:?}");
    damage(&files[1]);
    let fallen_back = open_registry_snapshotting(dir.path(), 10);
    assert_eq!(names(&fallen_back), kept);
    let replayed = fallen_back.replayed_at_start();
    assert!(
        (1..=20).contains(&replayed),
        "from the older snapshot the start replays the records after it: {replayed}"
    );
    run(fallen_back).shut_down().await;

    // None readable: the metadata log's single 64 MiB segment never rolled, so the log still
    // starts at 0 and the start replays all of it.
    for file in stored(&snapshots) {
        damage(&file);
    }
    let whole = try_open_registry(dir.path(), 10).expect("a start from the whole log");
    assert_eq!(names(&whole), kept, "every topic is back from the whole log");
    let replayed = whole.replayed_at_start();
    assert!(
        replayed >= 50,
        "without a snapshot the whole log is replayed: {replayed}"
    );
}

/// Stores a Raft snapshot from the controller holding `state` on the metadata log in
/// `data_dir`, as a follower behind the log start does, and resets the log to it, but does
/// not apply the state to the topics (a stop before the applier got to it).
fn receive_metadata_snapshot_unapplied(data_dir: &Path, state: &state::MetadataState) -> SnapshotPoint {
    use crate::replica::state_snapshot::StateMachine;
    let meta_dir = data_dir.join(CONTROLLER_TOPIC).join("0");
    let log = Arc::new(conveyor_storage::PartitionLog::open(&meta_dir, metadata_config()).expect("log"));
    let mut raft_log = crate::replica::raft_storage::RaftLog::open(Arc::clone(&log)).expect("raft log");
    let store = Arc::new(SnapshotStore::new(data_dir.join(CONTROLLER_TOPIC).join(SNAPSHOTS_DIR)));
    raft_log.set_state_snapshots(store);
    let last = raft_log.last_entry();
    let point = SnapshotPoint {
        index: last.index + 100,
        term: last.term,
        offset: log.log_end_offset() + 1000,
    };
    let mut snapshot = raft::eraftpb::Snapshot::default();
    snapshot.mut_metadata().index = point.index;
    snapshot.mut_metadata().term = point.term;
    snapshot.mut_metadata().mut_conf_state().voters = vec![1];
    let mut data = point.offset.to_le_bytes().to_vec();
    data.extend_from_slice(&state.encode_state());
    snapshot.data = data.into();
    raft_log.apply_snapshot(&snapshot).expect("apply the snapshot");
    point
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_received_snapshot_not_applied_before_a_stop_is_applied_live_at_the_next_start() {
    use conveyor_proto::internal::v1::metadata_record::Change;
    let dir = tempfile::tempdir().expect("tempdir");
    let running = run(open_registry(dir.path()));
    running.registry.controller().await.expect("a controller");
    running
        .registry
        .create_topic("x", 1, 1, BTreeMap::new())
        .await
        .expect("create");
    let old_id = running.registry.get("x").expect("x").id.clone();
    running.shut_down().await;

    // While this broker was away the controller deleted `x` and created it again.
    let mut state = state::MetadataState::new(1);
    state.apply(&Change::BrokerRegistered(
        conveyor_proto::internal::v1::BrokerRegistered {
            id: 1,
            address: "127.0.0.1:1".into(),
        },
    ));
    state.apply(&Change::TopicCreated(creation("x", "new-incarnation")));
    receive_metadata_snapshot_unapplied(dir.path(), &state);

    let running = run(open_registry(dir.path()));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let topic = running.registry.get("x").ok();
        if let Some(topic) = &topic
            && topic.id == "new-incarnation"
            && topic.local.contains_key(&0)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new incarnation of x never opened here (old id {old_id}): {:?}, unopened {:?}",
            topic.map(|t| (t.id.clone(), t.local.keys().copied().collect::<Vec<_>>())),
            running.registry.has_unopened(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = std::fs::read_to_string(dir.path().join(TOPICS_DIR).join("x").join(TOPIC_ID_FILE)).unwrap_or_default();
    running.shut_down().await;
    assert_eq!(
        held.trim(),
        "new-incarnation",
        "the directory holds the new incarnation"
    );
}

#[test]
fn bootstrapping_the_metadata_log_closes_it_so_the_next_open_is_a_clean_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    for start in 0..2 {
        bootstrap_metadata(dir.path(), &[1, 2, 3]).expect("bootstrap");
        assert!(
            dir.path().join("raft-terms").exists(),
            "start {start}: the term checkpoints are left for the real open"
        );
    }
}
