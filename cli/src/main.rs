//! `conveyor`: administer topics, produce and consume records, and load-test a broker.

mod bench;
mod broker_usage;
mod cluster;
mod consume;
mod flood;
mod group;
mod output;
mod produce;
mod producers;
mod queue;
mod time;
mod topic;

use clap::{Parser, Subcommand};
use conveyor_client::Client;

use output::Format;

/// Command-line tool for the Conveyor event broker.
///
/// Examples:
///   conveyor topic create orders --partitions 6 --config retention.ms=86400000
///   seq 1 10 | conveyor produce orders
///   conveyor consume orders --from-beginning --max-records 10
///   conveyor consume orders --group billing --idle-timeout 10s
///   conveyor group describe billing
///   conveyor queue consume orders --group workers --ordering key --max-records 10
///   conveyor producers orders --partition 0
///   conveyor bench produce --topic bench --records 1000000 --record-size 100
///   conveyor --broker 127.0.0.1:9292,127.0.0.1:9392 cluster info
#[derive(Debug, Parser)]
#[command(name = "conveyor", version, verbatim_doc_comment)]
struct Cli {
    /// Broker address(es), comma-separated HOST:PORT. Any one that answers is enough: the
    /// client learns the rest of the cluster from it and follows partition leaders.
    #[arg(long, global = true, env = "CONVEYOR_BROKER", default_value = "127.0.0.1:9292")]
    broker: String,
    /// Output format: text tables for people, json for scripts.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe, alter and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Produce one record per line of standard input.
    Produce(produce::ProduceArgs),
    // Its help, with examples, is on `ConsumeArgs`.
    Consume(consume::ConsumeArgs),
    /// Show start, end and high watermark offsets of every partition of a topic.
    Offsets(cluster::OffsetsArgs),
    // Its help, with examples, is on `ProducersArgs`.
    Producers(producers::ProducersArgs),
    /// List, describe, reset and delete consumer groups
    ///
    /// A consumer group shares the partitions of the topics it subscribes to among its
    /// members, and keeps each partition's committed offset: where the group goes on after a
    /// restart or a rebalance. Members join with `conveyor consume TOPIC --group G` or the
    /// Rust client's `Consumer::subscribe`. Each group has a coordinator broker; these
    /// commands find it, and `group list` asks every broker.
    ///
    /// Examples:
    ///   conveyor group list
    ///   conveyor group describe billing
    ///   conveyor group describe billing --output json
    ///   conveyor group reset-offsets billing --topic orders --to-time -1h --dry-run
    ///   conveyor group reset-offsets billing --topic orders --to-earliest
    ///   conveyor group delete billing
    #[command(subcommand, verbatim_doc_comment)]
    Group(group::GroupCommand),
    /// Consume a topic as a queue (share groups), and administer share groups
    ///
    /// A share group hands each record of its topic to one member at a time, locked to
    /// it until acknowledged: accepted (done), released (delivered again, maybe after a
    /// delay) or rejected (written to the group's dead-letter topic). A record not
    /// acknowledged before its lock runs out goes to another member; one delivered too
    /// often is dead-lettered. Unlike a consumer group, any number of members may share a
    /// partition. A group is created by `queue create` or by its first member's join.
    /// Members join with `conveyor queue consume TOPIC --group G` or the Rust client's
    /// `Client::share_consumer`. Each group has a share coordinator broker; these commands
    /// find it, and `queue list` asks every broker.
    ///
    /// Examples:
    ///   conveyor queue create orders --group workers --ordering key
    ///   conveyor queue consume orders --group workers --max-records 10
    ///   conveyor queue describe workers
    ///   conveyor queue list --output json
    ///   conveyor queue redrive workers
    ///   conveyor queue purge-dlq workers
    ///   conveyor queue delete workers
    #[command(subcommand, verbatim_doc_comment)]
    Queue(queue::QueueCommand),
    /// Describe the cluster, add and remove brokers, spread replicas.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// Move a partition's leadership or its replicas.
    #[command(subcommand)]
    Partition(cluster::PartitionCommand),
    /// Load-test a broker: produce, consume or end-to-end throughput and latency.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    // Like other command-line tools, end quietly when the reader of our output goes away
    // (`conveyor topic list | head`) instead of failing on a broken pipe.
    // SAFETY: called before any thread starts; restores the default disposition of SIGPIPE,
    // which the Rust runtime sets to ignored.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The first broker of a comma-separated list.
fn first_address(brokers: &str) -> &str {
    brokers.split(',').next().unwrap_or(brokers).trim()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Redis's side of a comparison needs no broker.
    if let Command::Bench(bench::BenchCommand::RedisQueue(args)) = cli.command {
        return bench::redis_queue::run(args, cli.output).await;
    }
    let client = Client::connect(&cli.broker).await?;
    match cli.command {
        Command::Topic(cmd) => topic::run(&client, cmd, cli.output).await,
        Command::Produce(args) => produce::run(&client, args, cli.output).await,
        Command::Consume(args) => consume::run(&client, args, cli.output).await,
        Command::Offsets(args) => cluster::offsets(&client, args, cli.output).await,
        Command::Producers(args) => producers::run(&client, args, cli.output).await,
        Command::Group(cmd) => group::run(&client, cmd, cli.output).await,
        Command::Queue(cmd) => queue::run(&client, cmd, cli.output).await,
        Command::Cluster(cmd) => cluster::run(&client, cmd, cli.output).await,
        Command::Partition(cmd) => cluster::partition(&client, cmd, cli.output).await,
        Command::Bench(cmd) => bench::run(&client, first_address(&cli.broker), cmd, cli.output).await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("conveyor").chain(args.iter().copied()))
    }

    #[test]
    fn time_and_duration_flags_take_offsets_relative_times_and_units() {
        let Command::Consume(c) = parse(&["consume", "t", "--from-time", "-1h"])
            .expect("relative")
            .command
        else {
            panic!("consume")
        };
        let an_hour_ago = jiff::Timestamp::now().as_millisecond() - 3_600_000;
        let from = c.from_time.expect("from time");
        assert!((from - an_hour_ago).abs() < 60_000, "{from} vs {an_hour_ago}");
        let Command::Consume(c) = parse(&["consume", "t", "--from-time", "2026-12-01T10:00:00+01:00"])
            .expect("offset")
            .command
        else {
            panic!("consume")
        };
        assert_eq!(c.from_time, Some(1_796_115_600_000));
        let Command::Bench(bench::BenchCommand::Produce(b)) = parse(&[
            "bench",
            "produce",
            "--topic",
            "b",
            "--timeout",
            "500ms",
            "--linger",
            "4s",
        ])
        .expect("durations")
        .command
        else {
            panic!("bench produce")
        };
        assert_eq!(
            (b.timeout, b.linger),
            (Duration::from_millis(500), Duration::from_secs(4))
        );
        let e = parse(&["bench", "produce", "--topic", "b", "--timeout", "soon"]).expect_err("bad duration");
        assert!(e.to_string().contains("'soon' is not a duration"), "{e}");
    }

    #[test]
    fn group_commands_take_one_reset_target_and_consume_group_flags_need_a_group() {
        let Command::Group(group::GroupCommand::ResetOffsets(r)) = parse(&[
            "group",
            "reset-offsets",
            "billing",
            "--topic",
            "orders",
            "--to-time",
            "2026-12-01T10:00:00+01:00",
            "--partition",
            "0",
            "--partition",
            "2",
            "--dry-run",
        ])
        .expect("reset")
        .command
        else {
            panic!("group reset-offsets")
        };
        assert_eq!(
            (
                r.group.as_str(),
                r.topic.as_str(),
                r.partitions.as_slice(),
                r.to_time,
                r.dry_run
            ),
            ("billing", "orders", &[0, 2][..], Some(1_796_115_600_000), true)
        );
        assert!(
            parse(&["group", "reset-offsets", "g", "--topic", "t"]).is_err(),
            "a target is required"
        );
        assert!(
            parse(&[
                "group",
                "reset-offsets",
                "g",
                "--topic",
                "t",
                "--to-earliest",
                "--to-offset",
                "3"
            ])
            .is_err(),
            "one target only"
        );
        let Command::Consume(c) = parse(&[
            "consume",
            "orders",
            "--group",
            "billing",
            "--idle-timeout",
            "10s",
            "--instance-id",
            "b-1",
            "--assignor",
            "range",
            "--from-beginning",
        ])
        .expect("group consume")
        .command
        else {
            panic!("consume")
        };
        assert_eq!(c.group.as_deref(), Some("billing"));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(10)));
        assert_eq!(
            (c.instance_id.as_deref(), c.assignor.as_deref()),
            (Some("b-1"), Some("range"))
        );
        for alone in [
            ["--idle-timeout", "5s"],
            ["--instance-id", "x"],
            ["--assignor", "range"],
        ] {
            assert!(
                parse(&[&["consume", "t"], &alone[..]].concat()).is_err(),
                "{alone:?} needs --group"
            );
        }
        for positioned in [["--partition", "1"], ["--offset", "5"], ["--from-time", "-1h"]] {
            let args = [&["consume", "t", "--group", "g"], &positioned[..]].concat();
            assert!(parse(&args).is_err(), "{positioned:?} contradicts --group");
        }
    }

    #[test]
    fn producers_are_idempotent_unless_turned_off_or_acks_are_weaker_than_all() {
        let produce = |args: &[&str]| {
            let Command::Produce(p) = parse(&[&["produce", "t"], args].concat()).expect("produce").command else {
                panic!("produce")
            };
            p.idempotent().expect("allowed")
        };
        assert!(produce(&[]));
        assert!(!produce(&["--no-idempotence"]));
        assert!(!produce(&["--acks", "leader"]), "acks=leader implies idempotence off");
        let bench = |args: &[&str]| {
            let Command::Bench(bench::BenchCommand::Produce(b)) =
                parse(&[&["bench", "produce", "--topic", "b"], args].concat())
                    .expect("bench")
                    .command
            else {
                panic!("bench produce")
            };
            bench::idempotent(&b)
        };
        assert!(bench(&[]).expect("default"));
        assert!(bench(&["--idempotence", "on"]).expect("on"));
        assert!(!bench(&["--idempotence", "off"]).expect("off"));
        assert!(!bench(&["--acks", "none"]).expect("implied off"));
        let e = bench(&["--acks", "leader", "--idempotence", "on"]).expect_err("contradiction");
        assert!(e.to_string().contains("needs --acks all"), "{e}");
    }
}
