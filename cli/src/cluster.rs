//! `conveyor cluster info` and `conveyor offsets TOPIC`.

use clap::{Args, Subcommand};
use conveyor_client::{Client, OffsetSpec};
use serde_json::json;

use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Brokers, their addresses and liveness, and the controller.
    Info,
}

#[derive(Debug, Subcommand)]
pub enum PartitionCommand {
    /// Move a partition's leadership to another of its replicas and wait until it has moved.
    TransferLeader {
        topic: String,
        partition: i32,
        /// The broker that should lead (one of the partition's replicas).
        #[arg(long, value_name = "BROKER")]
        to: i32,
    },
}

pub async fn partition(client: &Client, cmd: PartitionCommand, format: Format) -> anyhow::Result<()> {
    match cmd {
        PartitionCommand::TransferLeader { topic, partition, to } => {
            let leader = client.admin().transfer_leader(&topic, partition, to).await?;
            match format {
                Format::Json => output::json(&json!({"topic": topic, "partition": partition, "leader": leader})),
                Format::Text => println!("topic {topic} partition {partition} is now led by broker {leader}"),
            }
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct OffsetsArgs {
    pub topic: String,
}

pub async fn run(client: &Client, cmd: ClusterCommand, format: Format) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Info => {
            let c = client.admin().describe_cluster().await?;
            match format {
                Format::Json => output::json(&json!({
                    "cluster_id": c.cluster_id,
                    "controller": c.controller,
                    "brokers": c.brokers.iter().map(|b| json!({"id": b.id, "address": b.address, "alive": b.alive})).collect::<Vec<_>>(),
                })),
                Format::Text => {
                    println!("cluster {}  controller: broker {}", c.cluster_id, c.controller);
                    let rows: Vec<Vec<String>> = c
                        .brokers
                        .iter()
                        .map(|b| {
                            let role = if b.id == c.controller { "controller" } else { "" };
                            vec![
                                b.id.to_string(),
                                b.address.clone(),
                                if b.alive { "up" } else { "down" }.into(),
                                role.into(),
                            ]
                        })
                        .collect();
                    output::table(&["BROKER", "ADDRESS", "STATUS", "ROLE"], &rows);
                }
            }
        }
    }
    Ok(())
}

pub async fn offsets(client: &Client, args: OffsetsArgs, format: Format) -> anyhow::Result<()> {
    let count = client.partition_count(&args.topic).await?;
    let mut rows = Vec::new();
    let mut items = Vec::new();
    for p in 0..count as i32 {
        let r = client.admin().list_offset(&args.topic, p, OffsetSpec::Latest).await?;
        items.push(json!({
            "partition": p,
            "log_start_offset": r.log_start_offset,
            "high_watermark": r.high_watermark,
            "log_end_offset": r.log_end_offset,
        }));
        rows.push(vec![
            p.to_string(),
            r.log_start_offset.to_string(),
            r.log_end_offset.to_string(),
            r.high_watermark.to_string(),
        ]);
    }
    match format {
        Format::Json => output::json(&json!({"topic": args.topic, "partitions": items})),
        Format::Text => output::table(&["PARTITION", "START", "END", "HIGH WATERMARK"], &rows),
    }
    Ok(())
}
