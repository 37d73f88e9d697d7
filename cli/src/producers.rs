//! `conveyor producers TOPIC [--partition P]`: the idempotent producers a partition's leader
//! keeps state for (for duplicate detection), one row per producer and partition.

use clap::Args;
use conveyor_client::{ActiveProducer, Client};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use crate::output::{self, Format};
use crate::time::format_time;

/// How many partitions are asked at once when listing a whole topic.
const CONCURRENT_PARTITIONS: usize = 16;

/// List the idempotent producers a topic's partitions remember
///
/// Each partition's leader keeps, per producer id that wrote to it, the producer's epoch and
/// the sequence and offset of its last batch, to answer a retried batch with its original
/// offsets instead of writing it twice. A producer the partition has not heard from for the
/// broker's producer id expiration is forgotten and no longer listed.
///
/// Columns: PARTITION (when listing every partition), PRODUCER ID, EPOCH, LAST SEQUENCE (its
/// next batch must start one after it), LAST OFFSET, LAST WRITE (UTC, and how long ago).
/// With --output json: {"topic", "partitions": [{"partition", "producers": [{"producer_id",
/// "producer_epoch", "last_sequence", "last_offset", "last_write_ms", "cached_batches"}]}]},
/// times in milliseconds since the Unix epoch.
///
/// Examples:
///   conveyor producers orders
///   conveyor producers orders --partition 2 --output json
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ProducersArgs {
    /// The topic.
    pub topic: String,
    /// Only this partition (default: every partition of the topic).
    #[arg(long, short = 'p')]
    pub partition: Option<i32>,
}

pub async fn run(client: &Client, args: ProducersArgs, format: Format) -> anyhow::Result<()> {
    let topic = args.topic.as_str();
    let count = client.partition_count(topic).await?;
    let partitions: Vec<i32> = match args.partition {
        Some(p) if p >= 0 && (p as u32) < count => vec![p],
        Some(p) => anyhow::bail!("topic '{topic}' has no partition {p} (it has {count})"),
        None => (0..count as i32).collect(),
    };
    let listed: Vec<(i32, Vec<ActiveProducer>)> = futures::stream::iter(partitions)
        .map(|p| async move { client.admin().list_producers(topic, p).await.map(|rows| (p, rows)) })
        .buffered(CONCURRENT_PARTITIONS)
        .try_collect()
        .await?;
    match format {
        Format::Json => output::json(&listing_json(topic, &listed)),
        Format::Text => print_table(topic, args.partition.is_none(), &listed),
    }
    Ok(())
}

fn listing_json(topic: &str, listed: &[(i32, Vec<ActiveProducer>)]) -> serde_json::Value {
    json!({
        "topic": topic,
        "partitions": listed.iter().map(|(partition, producers)| json!({
            "partition": partition,
            "producers": producers.iter().map(|p| json!({
                "producer_id": p.producer_id,
                "producer_epoch": p.producer_epoch,
                "last_sequence": p.last_sequence,
                "last_offset": p.last_offset,
                "last_write_ms": p.last_write_ms,
                "cached_batches": p.cached_batches,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn print_table(topic: &str, with_partition: bool, listed: &[(i32, Vec<ActiveProducer>)]) {
    let mut rows = Vec::new();
    let mut empty = Vec::new();
    for (partition, producers) in listed {
        if producers.is_empty() {
            empty.push(partition.to_string());
        }
        for p in producers {
            let mut row = vec![
                p.producer_id.to_string(),
                p.producer_epoch.to_string(),
                p.last_sequence.to_string(),
                p.last_offset.to_string(),
                format_time(p.last_write_ms),
            ];
            if with_partition {
                row.insert(0, partition.to_string());
            }
            rows.push(row);
        }
    }
    if !rows.is_empty() {
        let header = [
            "PARTITION",
            "PRODUCER ID",
            "EPOCH",
            "LAST SEQUENCE",
            "LAST OFFSET",
            "LAST WRITE",
        ];
        output::table(&header[usize::from(!with_partition)..], &rows);
    }
    match (empty.len(), with_partition) {
        (0, _) => {}
        (_, false) => println!("topic {topic} partition {}: no idempotent producers", empty[0]),
        (n, true) if n == listed.len() => println!("topic {topic}: no idempotent producers on any partition"),
        (_, true) => println!(
            "topic {topic}: no idempotent producers on partition(s) {}",
            empty.join(", ")
        ),
    }
}
