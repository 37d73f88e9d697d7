//! What small requests cost the broker: the process counters it exports, Readies handled on
//! the partition's task when they only write to the page cache, fsyncs that still happen
//! before an acknowledgement, and `conveyor bench --broker-metrics`.

use conveyor_tests::{BrokerProcess, cli, cli_json, metric_value, stdout};

/// A broker with topic `name` under flush policy `policy`.
fn broker_with_topic(name: &str, policy: &str) -> BrokerProcess {
    let broker = BrokerProcess::start();
    let policy = format!("flush.policy={policy}");
    stdout(&cli(broker.addr(), &["topic", "create", name, "--config", &policy], ""));
    broker
}

#[test]
fn given_a_topic_that_leaves_flushing_to_the_os_small_appends_are_written_on_the_partition_task() {
    let broker = broker_with_topic("os", "os");
    let before = broker.metric("conveyor_raft_readies_in_memory_total").unwrap_or(0.0);
    for line in ["a\n", "b\n", "c\n"] {
        stdout(&cli(broker.addr(), &["produce", "os", "--no-idempotence"], line));
    }
    let metrics = broker.scrape_metrics();
    let in_memory = metric_value(&metrics, "conveyor_raft_readies_in_memory_total").unwrap_or(0.0);
    assert!(
        in_memory >= before + 3.0,
        "each acknowledged append was written without a blocking job ({before} -> {in_memory}): {metrics}"
    );
    let consumed = stdout(&cli(
        broker.addr(),
        &["consume", "os", "--from-beginning", "--max-records", "3"],
        "",
    ));
    assert_eq!(consumed.lines().collect::<Vec<_>>(), ["a", "b", "c"]);
    let in_place = broker.metric("conveyor_fetch_reads_in_place_total").unwrap_or(0.0);
    assert!(
        in_place >= 1.0,
        "a read of the tail just written came from the page cache in place"
    );
}

/// Readies that append to a topic that fsyncs before acknowledging never take the in-memory
/// path: every acknowledged request was covered by an fsync round of its own (one request at
/// a time, so group commit cannot share one).
#[test]
fn given_a_topic_that_fsyncs_every_acknowledged_append_was_synced() {
    let broker = broker_with_topic("synced", "always");
    let fsyncs = || broker.metric("conveyor_fsync_latency_seconds_count").unwrap_or(0.0);
    let before = fsyncs();
    for line in ["a\n", "b\n", "c\n", "d\n"] {
        stdout(&cli(broker.addr(), &["produce", "synced", "--no-idempotence"], line));
    }
    let after = fsyncs();
    assert!(
        after >= before + 4.0,
        "four appends acknowledged one after another need four fsync rounds: {before} -> {after}"
    );
}

#[test]
fn given_a_broker_its_metrics_report_the_process_cpu_and_context_switches() {
    let broker = BrokerProcess::start();
    let metrics = broker.scrape_metrics();
    let cpu = metric_value(&metrics, "process_cpu_seconds_total");
    assert!(cpu.is_some_and(|s| s > 0.0), "{metrics}");
    let voluntary = metric_value(&metrics, "conveyor_process_context_switches_total{kind=\"voluntary\"}");
    assert!(voluntary.is_some_and(|n| n > 0.0), "{metrics}");
    let rss = metric_value(&metrics, "process_resident_memory_bytes");
    assert!(rss.is_some_and(|b| b > 1e6), "{metrics}");
}

/// `conveyor bench produce` of `records` records to topic "cost", reading the brokers'
/// CPU from `metrics`.
fn bench<'a>(records: &'a str, metrics: &'a str) -> Vec<&'a str> {
    vec![
        "bench",
        "produce",
        "--topic",
        "cost",
        "--records",
        records,
        "--broker-metrics",
        metrics,
    ]
}

#[test]
fn given_broker_metrics_bench_reports_the_cpu_spent_per_request_and_record() {
    let broker = BrokerProcess::start();
    let mut args = bench("2000", broker.metrics_addr());
    args.extend(["--linger", "0ms"]);
    let report = cli_json(broker.addr(), &args);
    let spent = &report["broker"];
    assert!(spent["cpu_seconds"].as_f64().is_some_and(|s| s > 0.0), "{report}");
    let requests = spent["produce_requests"].as_f64().unwrap_or(0.0);
    assert!((1.0..=2000.0).contains(&requests), "{report}");
    let per_request = spent["cpu_us_per_request"].as_f64().unwrap_or(0.0);
    let per_record = spent["cpu_us_per_record"].as_f64().unwrap_or(0.0);
    assert!(per_request > 0.0 && per_record > 0.0, "{report}");

    let text = stdout(&cli(broker.addr(), &bench("100", broker.metrics_addr()), ""));
    assert!(text.contains("broker CPU:") && text.contains("per request"), "{text}");
    let refused = cli(broker.addr(), &bench("10", broker.addr()), "");
    assert!(!refused.status.success(), "the gRPC port is not a metrics endpoint");
}
