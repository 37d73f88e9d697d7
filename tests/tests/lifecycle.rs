//! Starting with and without a config file, graceful shutdown, restart.

use std::process::Command;
use std::time::Duration;

use conveyor_client::proto::fetch_client::FetchClient;
use conveyor_client::proto::{FetchRequest, PartitionFetch};
use conveyor_tests::{BrokerProcess, broker_bin, cli, runtime, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn given_sigterm_the_broker_should_exit_zero_and_restart_without_recovery() {
    let mut broker = BrokerProcess::start();
    assert!(
        cli(broker.addr(), &["topic", "create", "t", "--partitions", "2"], "")
            .status
            .success()
    );
    assert!(cli(broker.addr(), &["produce", "t"], "1\n2\n3\n").status.success());
    let status = broker.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(broker.log().contains("stopped cleanly"), "{}", broker.log());
    broker.restart();
    assert!(
        !broker.log().contains("unclean shutdown"),
        "a clean shutdown needs no recovery: {}",
        broker.log()
    );
    let out = cli(broker.addr(), &["consume", "t", "--from-beginning"], "");
    let mut values: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    values.sort();
    assert_eq!(values, ["1", "2", "3"]);
}

#[test]
fn given_an_in_flight_long_poll_when_sigterm_arrives_it_should_finish_and_the_broker_exit_zero() {
    let mut broker = BrokerProcess::start();
    assert!(cli(broker.addr(), &["topic", "create", "idle"], "").status.success());
    let runtime = conveyor_tests::runtime();
    let addr = broker.addr().to_string();
    let fetch = runtime.spawn(async move {
        let mut client = FetchClient::connect(format!("http://{addr}")).await.expect("grpc");
        client
            .fetch(FetchRequest {
                partitions: vec![PartitionFetch {
                    topic: "idle".into(),
                    partition: 0,
                    offset: 0,
                    max_bytes: 0,
                }],
                max_wait_ms: 2_000,
                min_bytes: 1,
                ..FetchRequest::default()
            })
            .await
    });
    // The fetch is in flight once the broker has counted it.
    wait_for("the long-poll fetch to reach the broker", DEADLINE, || {
        broker
            .scrape_metrics()
            .lines()
            .any(|l| l.starts_with("conveyor_fetch_requests_total") && !l.ends_with(" 0"))
            .then_some(())
    });
    let status = broker.terminate();
    let response = runtime.block_on(fetch).expect("task");
    let response = response.expect("the in-flight fetch completes instead of failing");
    assert_eq!(response.into_inner().partitions.len(), 1);
    assert!(status.success(), "exit status {status}");
}

#[test]
fn given_the_example_config_the_broker_should_start_and_a_bad_key_should_be_named() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/broker.toml");
    let broker = BrokerProcess::start_with(&["--config", example]);
    assert!(cli(broker.addr(), &["topic", "list"], "").status.success());

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[broker]\nnode_id = 1\nlisten_adress = \"127.0.0.1:0\"\n").expect("write");
    let out = Command::new(broker_bin())
        .args(["--config"])
        .arg(&bad)
        .args(["--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .expect("run broker");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen_adress"), "{stderr}");
}

#[test]
fn given_retention_limits_the_broker_should_delete_old_segments_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "[log]\nretention_check_interval = \"100ms\"\n").expect("write config");
    let broker = BrokerProcess::start_with(&["--config", config.to_str().expect("utf8 path")]);
    let create = cli(
        broker.addr(),
        &[
            "topic",
            "create",
            "short-lived",
            "--config",
            "segment.bytes=8192",
            "--config",
            "max.message.bytes=8192",
            "--config",
            "retention.bytes=8192",
        ],
        "",
    );
    assert!(create.status.success(), "{}", String::from_utf8_lossy(&create.stderr));
    // Ten small produce runs: ten batches of about 3 KiB, several segments.
    for run in 0..10 {
        let lines: String = (run * 50..(run + 1) * 50)
            .map(|i| format!("record-{i:04}-{}\n", "x".repeat(40)))
            .collect();
        let out = cli(broker.addr(), &["produce", "short-lived"], &lines);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Retention is done once what is left fits the limit plus the active segment.
    let start = wait_for("retention to delete the oldest segments", DEADLINE, || {
        let out = cli(
            broker.addr(),
            &["topic", "describe", "short-lived", "--output", "json"],
            "",
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let p = &v["partitions"][0];
        let (start, size) = (p["log_start_offset"].as_u64()?, p["size_bytes"].as_u64()?);
        (start > 0 && size <= 2 * 8192).then_some(start)
    });
    let out = cli(
        broker.addr(),
        &["consume", "short-lived", "--from-beginning", "--output", "json"],
        "",
    );
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
        .expect("a record");
    let first: serde_json::Value = serde_json::from_str(&first).expect("json");
    assert_eq!(
        first["offset"].as_u64(),
        Some(start),
        "reads start at the new log start"
    );

    // A consumer whose position was deleted: an error without a reset policy, the new log
    // start with one.
    runtime().block_on(async {
        use conveyor_client::{Client, ConsumerConfig, StartAt};
        use futures::StreamExt;
        let client = Client::connect(broker.addr()).await.expect("connect");
        let mut strict = client.consumer(ConsumerConfig::default());
        strict.assign("short-lived", 0, StartAt::Offset(0));
        let first = strict.stream().next().await.expect("an item");
        let error = first.expect_err("offset 0 was deleted");
        assert_eq!(
            error.code(),
            Some(conveyor_client::proto::ErrorCode::OffsetOutOfRange),
            "{error}"
        );

        let mut lenient = client.consumer(ConsumerConfig::default().offset_reset(Some(StartAt::Earliest)));
        lenient.assign("short-lived", 0, StartAt::Offset(0));
        let record = lenient
            .stream()
            .next()
            .await
            .expect("an item")
            .expect("a record after the reset");
        assert_eq!(record.offset, start);
    });
}

/// raft-rs logs every step of every group's start (about ten INFO records per partition);
/// a broker keeps them at `warn` unless `RUST_LOG` names `raft`, even under `RUST_LOG=info`
/// (which the harness sets), and logs one line of its own per leadership change.
#[test]
fn given_several_partitions_a_start_should_log_one_line_per_leadership_change_and_nothing_of_raft_internals() {
    const PARTITIONS: usize = 4;
    let mut broker = BrokerProcess::start();
    let partitions = PARTITIONS.to_string();
    assert!(
        cli(
            broker.addr(),
            &["topic", "create", "quiet", "--partitions", &partitions],
            ""
        )
        .status
        .success()
    );
    // The controller group and every partition lead once.
    let leaders = (PARTITIONS + 1) as f64;
    let led = |broker: &BrokerProcess| {
        broker
            .metric("conveyor_raft_leader_changes_total")
            .filter(|n| *n >= leaders)
            .map(|_| ())
    };
    wait_for("every group to elect its leader", DEADLINE, || led(&broker));
    assert!(broker.terminate().success());
    broker.restart();
    wait_for("every group to elect its leader again", DEADLINE, || led(&broker));
    let log = broker.log();
    let raft_lines: Vec<&str> = log.lines().filter(|l| l.contains("raft::")).collect();
    assert!(
        raft_lines.is_empty(),
        "{} raft-rs lines in a start, e.g. {:?}",
        raft_lines.len(),
        raft_lines.first()
    );
    let changes = log.lines().filter(|l| l.contains("raft leadership changed")).count();
    assert_eq!(changes, PARTITIONS + 1, "one line per leadership change:\n{log}");
}
