//! `conveyor topic ...`

use clap::Subcommand;
use conveyor_client::Client;
use conveyor_client::proto::{ReplicaCompaction, TopicDescription};
use serde_json::json;

use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        /// Replicas per partition (default: the broker's).
        #[arg(long, default_value_t = 0)]
        replication_factor: i32,
        /// Topic config override KEY=VALUE (repeatable), e.g. retention.ms=86400000.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        configs: Vec<(String, String)>,
    },
    /// List topics.
    List,
    /// Show a topic's partitions, offsets and effective config.
    Describe { name: String },
    /// Change topic config; an empty value resets a key to the broker default.
    Alter {
        name: String,
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value, required = true)]
        configs: Vec<(String, String)>,
    },
    /// Delete a topic and all its data.
    Delete { name: String },
    /// Compact a topic (cleanup.policy compact or compact,delete) now, whatever its dirty
    /// ratio: every replica keeps the latest record per key of its committed, sealed
    /// segments. Reports bytes and records before and after, per replica.
    Compact {
        name: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<i32>,
        /// Wait for the passes to finish and report them (otherwise they start and the
        /// command returns).
        #[arg(long)]
        wait: bool,
    },
}

pub(crate) fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE"))
}

fn description_json(d: &TopicDescription) -> serde_json::Value {
    let configs: serde_json::Map<String, serde_json::Value> =
        d.configs.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "name": d.name,
        "config": configs,
        "partitions": d.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "leader": p.leader,
            "replicas": p.replicas,
            "in_sync": p.in_sync,
            "log_start_offset": p.log_start_offset,
            "high_watermark": p.high_watermark,
            "log_end_offset": p.log_end_offset,
            "size_bytes": p.size_bytes,
            "replica_state": p.replica_state,
            "voters": p.voters,
            "learners": p.learners,
            "voters_outgoing": p.voters_outgoing,
            "learners_next": p.learners_next,
            "term": p.term,
            "applied_index": p.applied_index,
            "dirty_ratio": p.dirty_ratio,
            "last_compaction_ms": p.last_compaction_ms,
        })).collect::<Vec<_>>(),
    })
}

/// When a compaction pass finished, as a UTC time.
fn compaction_time(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map_or_else(|_| ms.to_string(), |t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
}

fn compaction_json(r: &ReplicaCompaction) -> serde_json::Value {
    json!({
        "partition": r.partition,
        "broker": r.broker,
        "outcome": r.outcome,
        "bytes_before": r.bytes_before,
        "bytes_after": r.bytes_after,
        "records_before": r.records_before,
        "records_after": r.records_after,
        "segments_before": r.segments_before,
        "segments_after": r.segments_after,
        "tombstones_dropped": r.tombstones_dropped,
        "millis": r.millis,
        "log_size_bytes": r.log_size_bytes,
        "failed": r.failed,
    })
}

fn print_compactions(name: &str, replicas: &[ReplicaCompaction], wait: bool, format: Format) {
    if format == Format::Json {
        output::json(&json!({"topic": name, "replicas": replicas.iter().map(compaction_json).collect::<Vec<_>>()}));
        return;
    }
    if !wait {
        let rows: Vec<Vec<String>> = replicas
            .iter()
            .map(|r| vec![r.partition.to_string(), r.broker.to_string(), r.outcome.clone()])
            .collect();
        output::table(&["PARTITION", "BROKER", "OUTCOME"], &rows);
        return;
    }
    let rows: Vec<Vec<String>> = replicas
        .iter()
        .map(|r| {
            vec![
                r.partition.to_string(),
                r.broker.to_string(),
                r.outcome.clone(),
                format!("{} -> {}", r.bytes_before, r.bytes_after),
                format!("{} -> {}", r.records_before, r.records_after),
                format!("{} -> {}", r.segments_before, r.segments_after),
                r.tombstones_dropped.to_string(),
                r.log_size_bytes.to_string(),
                r.millis.to_string(),
            ]
        })
        .collect();
    output::table(
        &[
            "PARTITION",
            "BROKER",
            "OUTCOME",
            "BYTES",
            "RECORDS",
            "SEGMENTS",
            "TOMBSTONES DROPPED",
            "LOG BYTES NOW",
            "MS",
        ],
        &rows,
    );
}

/// A Raft role's members; during a joint change, also the other half.
fn members(now: &[i32], other_half: &[i32]) -> String {
    if other_half.is_empty() {
        format!("{now:?}")
    } else {
        format!("{now:?} (joint: {other_half:?})")
    }
}

fn print_description(d: &TopicDescription, format: Format) {
    if format == Format::Json {
        output::json(&description_json(d));
        return;
    }
    println!("topic {}  ({} partitions)", d.name, d.partitions.len());
    let compacts = d.configs.get("cleanup.policy").is_some_and(|p| p.contains("compact"));
    let rows: Vec<Vec<String>> = d
        .partitions
        .iter()
        .map(|p| {
            let mut row = vec![
                p.partition.to_string(),
                if p.leader > 0 {
                    p.leader.to_string()
                } else {
                    "none".into()
                },
                format!("{:?}", p.replicas),
                format!("{:?}", p.in_sync),
                members(&p.voters, &p.voters_outgoing),
                members(&p.learners, &p.learners_next),
                p.log_start_offset.to_string(),
                p.high_watermark.to_string(),
                p.log_end_offset.to_string(),
                p.size_bytes.to_string(),
                if p.replica_state.is_empty() {
                    "-".into()
                } else {
                    p.replica_state.clone()
                },
            ];
            if compacts {
                row.push(p.dirty_ratio.map_or("-".into(), |r| format!("{r:.2}")));
                row.push(p.last_compaction_ms.map_or("never".into(), compaction_time));
            }
            row
        })
        .collect();
    let mut headers = vec![
        "PARTITION",
        "LEADER",
        "REPLICAS",
        "IN SYNC",
        "VOTERS",
        "LEARNERS",
        "START",
        "HIGH WATERMARK",
        "END",
        "BYTES",
        "REPLICA HERE",
    ];
    if compacts {
        headers.extend(["DIRTY RATIO", "LAST COMPACTED"]);
    }
    output::table(&headers, &rows);
    println!();
    let mut configs: Vec<_> = d.configs.iter().collect();
    configs.sort();
    let rows: Vec<Vec<String>> = configs.iter().map(|(k, v)| vec![(*k).clone(), (*v).clone()]).collect();
    output::table(&["CONFIG", "VALUE"], &rows);
}

pub async fn run(client: &Client, cmd: TopicCommand, format: Format) -> anyhow::Result<()> {
    let admin = client.admin();
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
            configs,
        } => {
            let configs: Vec<(&str, &str)> = configs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let d = admin
                .create_replicated_topic(&name, partitions, replication_factor, &configs)
                .await?;
            match format {
                Format::Json => output::json(&description_json(&d)),
                Format::Text => println!("created topic {name} with {partitions} partition(s)"),
            }
        }
        TopicCommand::List => {
            let topics = admin.list_topics().await?;
            match format {
                Format::Json => output::json(&json!(topics
                    .iter()
                    .map(|t| json!({"name": t.name, "partitions": t.partitions, "replication_factor": t.replication_factor}))
                    .collect::<Vec<_>>())),
                Format::Text => {
                    let rows: Vec<Vec<String>> = topics
                        .iter()
                        .map(|t| vec![t.name.clone(), t.partitions.to_string(), t.replication_factor.to_string()])
                        .collect();
                    output::table(&["TOPIC", "PARTITIONS", "REPLICATION"], &rows);
                }
            }
        }
        TopicCommand::Describe { name } => print_description(&admin.describe_topic(&name).await?, format),
        TopicCommand::Alter { name, configs } => {
            let configs: Vec<(&str, &str)> = configs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let d = admin.alter_topic_config(&name, &configs).await?;
            match format {
                Format::Json => output::json(&description_json(&d)),
                Format::Text => println!("updated config of topic {name}"),
            }
        }
        TopicCommand::Compact { name, partition, wait } => {
            let replicas = admin.compact_topic(&name, partition, wait).await?;
            print_compactions(&name, &replicas, wait, format);
            let failed = replicas.iter().filter(|r| r.failed).count();
            if failed > 0 {
                anyhow::bail!("{failed} replica(s) did not compact");
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            match format {
                Format::Json => output::json(&json!({"deleted": name})),
                Format::Text => println!("deleted topic {name}"),
            }
        }
    }
    Ok(())
}
