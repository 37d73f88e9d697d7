//! `conveyor cluster info|add-node|remove-node|rebalance`, `conveyor partition
//! transfer-leader|reassign` and `conveyor offsets TOPIC`.

use clap::{Args, Subcommand};
use conveyor_client::proto::ReplicaMove;
use conveyor_client::{Client, OffsetSpec};
use serde_json::json;

use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Brokers, their addresses and liveness, and the controller.
    Info,
    /// Add a broker to a running cluster. Start it first with `conveyor-broker --node-id ID
    /// --listen ADDRESS --peers <existing brokers> --join`; this waits until it has caught up
    /// with the cluster metadata and votes.
    AddNode {
        /// The new broker's id.
        id: i32,
        /// Where the other brokers reach it (HOST:PORT).
        address: String,
    },
    /// Remove a broker: each of its replicas moves to another live broker (a new replica
    /// joins and catches up before the old one leaves), then it leaves the controller group.
    /// Safe to repeat if it was interrupted.
    RemoveNode {
        /// The broker to remove.
        id: i32,
    },
    /// Even out replicas across live brokers, after add-node say: replicas move one at a
    /// time from the most to the least loaded brokers, with no downtime.
    Rebalance {
        /// Show the moves without making them.
        #[arg(long)]
        dry_run: bool,
    },
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
    /// Move a partition's replicas onto other brokers, one at a time with no downtime (a new
    /// replica joins and catches up before an old one leaves). Safe to repeat if interrupted.
    Reassign {
        topic: String,
        partition: i32,
        /// The brokers that should hold it, as many as it has replicas; the first is the
        /// preferred leader.
        #[arg(long, value_name = "BROKER,...", value_delimiter = ',', required = true)]
        replicas: Vec<i32>,
    },
}

pub async fn partition(client: &Client, cmd: PartitionCommand, format: Format) -> anyhow::Result<()> {
    let admin = client.admin();
    match cmd {
        PartitionCommand::TransferLeader { topic, partition, to } => {
            let leader = client.admin().transfer_leader(&topic, partition, to).await?;
            match format {
                Format::Json => output::json(&json!({"topic": topic, "partition": partition, "leader": leader})),
                Format::Text => println!("topic {topic} partition {partition} is now led by broker {leader}"),
            }
        }
        PartitionCommand::Reassign {
            topic,
            partition,
            replicas,
        } => {
            let what = format!("reassigning topic {topic} partition {partition} to {replicas:?}");
            let moves = follow(&what, || async {
                admin.reassign_partition(&topic, partition, &replicas).await
            })
            .await?;
            match format {
                Format::Json => output::json(&json!({
                    "topic": topic,
                    "partition": partition,
                    "replicas": replicas,
                    "moves": moves_json(&moves),
                })),
                Format::Text => {
                    println!(
                        "topic {topic} partition {partition} is on brokers {replicas:?}; {} replica(s) moved",
                        moves.len()
                    );
                    print_moves(&moves);
                }
            }
        }
    }
    Ok(())
}

fn moves_json(moves: &[ReplicaMove]) -> Vec<serde_json::Value> {
    moves
        .iter()
        .map(|m| json!({"topic": m.topic, "partition": m.partition, "from": m.from, "to": m.to}))
        .collect()
}

fn print_moves(moves: &[ReplicaMove]) {
    let rows: Vec<Vec<String>> = moves
        .iter()
        .map(|m| {
            vec![
                m.topic.clone(),
                m.partition.to_string(),
                m.from.to_string(),
                m.to.to_string(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        output::table(&["TOPIC", "PARTITION", "FROM", "TO"], &rows);
    }
}

#[derive(Debug, Args)]
pub struct OffsetsArgs {
    pub topic: String,
}

/// Calls `call` until its operation is done: an answer that it is still in progress (the
/// broker answers within a deadline; the operation goes on) is followed by the same call
/// again, which waits for the same operation. The latest progress shows on a terminal.
async fn follow<T, Fut>(what: &str, call: impl Fn() -> Fut) -> Result<T, conveyor_client::ClientError>
where
    Fut: std::future::Future<Output = Result<T, conveyor_client::ClientError>>,
{
    let mut shown = what.to_string();
    loop {
        match with_progress(&shown, call()).await {
            Err(e) if e.is_in_progress() => {
                note_in_progress(&e);
                shown = format!("{what}: {e}");
            }
            other => return other,
        }
    }
}

/// Says on stderr, when it is a terminal, that an operation is still going on.
fn note_in_progress(e: &conveyor_client::ClientError) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2K{e}");
    }
}

/// Runs `work` while showing, on a terminal, how long it has been going.
async fn with_progress<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    use std::io::{IsTerminal, Write};
    if !std::io::stderr().is_terminal() {
        return work.await;
    }
    tokio::pin!(work);
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            out = &mut work => {
                eprint!("\r\x1b[2K");
                return out;
            }
            _ = tick.tick() => {
                eprint!("\r{what}... {}s", started.elapsed().as_secs());
                let _ = std::io::stderr().flush();
            }
        }
    }
}

pub async fn run(client: &Client, cmd: ClusterCommand, format: Format) -> anyhow::Result<()> {
    let admin = client.admin();
    match cmd {
        ClusterCommand::Info => {
            let c = client.admin().describe_cluster().await?;
            print_cluster(&c, format);
        }
        ClusterCommand::AddNode { id, address } => {
            let what = format!("adding broker {id} (waiting for it to catch up)");
            let c = follow(&what, || async { admin.add_broker(id, &address).await }).await?;
            if format == Format::Text {
                println!("broker {id} joined the cluster");
            }
            print_cluster(&c, format);
        }
        ClusterCommand::RemoveNode { id } => {
            let what = format!("removing broker {id} (moving its replicas)");
            let r = follow(&what, || async { admin.remove_broker(id).await }).await?;
            match format {
                Format::Json => output::json(&json!({"removed": id, "moves": moves_json(&r.moves)})),
                Format::Text => {
                    println!("broker {id} left the cluster; {} replica(s) moved", r.moves.len());
                    print_moves(&r.moves);
                    print_cluster(&r.cluster.unwrap_or_default(), format);
                }
            }
        }
        ClusterCommand::Rebalance { dry_run } => {
            let moves = if dry_run {
                client.admin().rebalance(true).await?
            } else {
                follow("rebalancing (moving replicas)", || async {
                    admin.rebalance(false).await
                })
                .await?
            };
            match format {
                Format::Json => output::json(&json!({"dry_run": dry_run, "moves": moves_json(&moves)})),
                Format::Text => {
                    match (moves.len(), dry_run) {
                        (0, _) => println!("replicas are already spread evenly; nothing to move"),
                        (n, true) => println!("{n} replica(s) would move (dry run; nothing changed)"),
                        (n, false) => println!("{n} replica(s) moved"),
                    }
                    print_moves(&moves);
                }
            }
        }
    }
    Ok(())
}

fn print_cluster(c: &conveyor_client::proto::ClusterDescription, format: Format) {
    match format {
        Format::Json => output::json(&json!({
            "cluster_id": c.cluster_id,
            "controller": c.controller,
            "brokers": c.brokers.iter().map(|b| json!({
                "id": b.id,
                "address": b.address,
                "alive": b.alive,
                "metadata": metadata_json(b),
            })).collect::<Vec<_>>(),
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
                        metadata_text(b),
                    ]
                })
                .collect();
            output::table(&["BROKER", "ADDRESS", "STATUS", "ROLE", "METADATA"], &rows);
        }
    }
}

/// A broker's progress through the cluster metadata, for the JSON output: `null` when it did
/// not report it.
fn metadata_json(b: &conveyor_client::proto::BrokerInfo) -> serde_json::Value {
    if !b.metadata_reported {
        return serde_json::Value::Null;
    }
    json!({
        "applied_offset": b.metadata_applied_offset,
        "apply_error": (!b.metadata_apply_error.is_empty()).then_some(&b.metadata_apply_error),
    })
}

fn metadata_text(b: &conveyor_client::proto::BrokerInfo) -> String {
    match (b.metadata_reported, b.metadata_apply_error.as_str()) {
        (false, _) => "unknown".into(),
        (true, "") => format!("applied up to {}", b.metadata_applied_offset),
        (true, error) => format!("FAILING to apply: {error}"),
    }
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
