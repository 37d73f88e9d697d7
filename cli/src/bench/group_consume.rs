//! `conveyor bench consume --group G --consumers N`: a consumer group draining a topic,
//! each member with its own connection, committing every second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use conveyor_client::consumer::group::{GroupConfig, OffsetReset};
use conveyor_client::{Client, ConsumerConfig, OffsetSpec};
use futures::StreamExt;

use super::{BenchArgs, Outcome, progress};

pub(super) async fn run(client: &Client, args: &BenchArgs) -> anyhow::Result<Outcome> {
    let group = args.group.clone().unwrap_or_default();
    anyhow::ensure!(args.consumers > 0, "--consumers must be positive");
    let count = client.partition_count(&args.topic).await?;
    let mut available = 0u64;
    for p in 0..count as i32 {
        available += client
            .admin()
            .list_offset(&args.topic, p, OffsetSpec::Latest)
            .await?
            .high_watermark;
    }
    anyhow::ensure!(
        available > 0,
        "topic '{}' has no records to consume; run bench produce first",
        args.topic
    );
    // Control batches (Raft no-ops) count in the high watermarks but are no records.
    let target = args.records.min(available.saturating_sub(u64::from(count)));
    let total = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let bar = progress(target, "consume");
    let start = Instant::now();
    let mut members = Vec::new();
    for _ in 0..args.consumers {
        // Each member its own connection, as separate processes would have.
        let own = Client::connect(client.address()).await?;
        let config = GroupConfig::default()
            .reset(OffsetReset::Earliest)
            .auto_commit(Some(Duration::from_secs(1)));
        let mut consumer = own
            .consumer(ConsumerConfig::default())
            .subscribe(&[args.topic.as_str()], &group, config)?;
        let (total, bytes, bar) = (Arc::clone(&total), Arc::clone(&bytes), bar.clone());
        members.push(tokio::spawn(async move {
            // Counted into the shared total in steps, and whenever the stream idles, so the
            // last records of every member count before anyone checks the target.
            let (mut mine, mut pending, mut my_bytes) = (0u64, 0u64, 0u64);
            while total.load(Ordering::Relaxed) < target {
                let next = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
                let record = match next {
                    Ok(Some(record)) => record?,
                    Ok(None) => anyhow::bail!("the group consumer's stream ended"),
                    Err(_idle) => {
                        total.fetch_add(std::mem::take(&mut pending), Ordering::Relaxed);
                        bytes.fetch_add(std::mem::take(&mut my_bytes), Ordering::Relaxed);
                        continue;
                    }
                };
                mine += 1;
                pending += 1;
                my_bytes += record.value.as_ref().map_or(0, |v| v.len() as u64);
                if pending == 10_000 {
                    let now = total.fetch_add(std::mem::take(&mut pending), Ordering::Relaxed) + 10_000;
                    bytes.fetch_add(std::mem::take(&mut my_bytes), Ordering::Relaxed);
                    if now % 100_000 < 10_000 {
                        bar.set_position(now);
                    }
                }
            }
            total.fetch_add(pending, Ordering::Relaxed);
            bytes.fetch_add(my_bytes, Ordering::Relaxed);
            consumer.close().await?;
            Ok::<u64, anyhow::Error>(mine)
        }));
    }
    let mut records = 0;
    let mut first_error = None;
    let mut errors = 0;
    for m in members {
        match m.await {
            Ok(Ok(n)) => records += n,
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(format!("{e:#}"));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("{e}"));
            }
        }
    }
    bar.finish_and_clear();
    Ok(Outcome {
        records,
        bytes: bytes.load(Ordering::Relaxed),
        errors,
        elapsed: start.elapsed(),
        latency: None,
        first_error,
    })
}
