//! `conveyor bench queue --workers W --records N`: a share group draining a fresh topic. The
//! records are produced first; then W share consumers in this process, each with its own
//! connection, join at once and accept every delivery. The group is created before the
//! measure (`queue create`), as `bench redis-queue` creates its group (XGROUP CREATE)
//! before its own. The measure is the time from before the workers connect and join until
//! N records were accepted and every worker closed, its acknowledgements answered
//! (`bench redis-queue` times from before connecting until the last XACK needed was
//! answered).
//! Per-worker counts show how evenly the group spreads the work; duplicates (deliveries of
//! a record already delivered) show redeliveries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use conveyor_client::{Client, Compression, OffsetSpec, ShareConfig, ShareOffsetReset};
use futures::{FutureExt, StreamExt};
use serde_json::json;

use super::{BenchArgs, progress};
use crate::output::{self, Format};
use crate::produce::AcksArg;
use crate::queue::consume::OrderingArg;

#[derive(Debug, Clone, Args)]
pub struct QueueBenchArgs {
    /// Share consumers, each with its own connection.
    #[arg(long, default_value_t = 8)]
    pub workers: u32,
    /// Records to produce, then to accept.
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// Partitions of the fresh topic.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// The share group's ordering: key (same-key records one at a time) or none.
    #[arg(long, value_enum, default_value = "none")]
    pub ordering: OrderingArg,
    /// Give records keys from a space of this many distinct keys (default: no keys).
    #[arg(long, value_name = "N")]
    pub keys: Option<u64>,
    /// Bytes per record value.
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    /// Deliveries each worker buffers ahead (default: the client's).
    #[arg(long, value_name = "N")]
    pub prefetch: Option<usize>,
    /// The group's max_inflight_records (default: the broker's, 2,000).
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<u32>,
    /// How long acknowledgements wait to be batched (default: the client's): a duration
    /// such as 1ms; a bare number counts milliseconds.
    #[arg(long, value_name = "DURATION", value_parser = crate::time::parse_millis)]
    pub ack_linger: Option<Duration>,
    /// Records each fetch asks for (default: the client's).
    #[arg(long, value_name = "N")]
    pub max_records: Option<u32>,
    /// Give up after this long: a duration such as 90s or 10m; a bare number counts seconds.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = crate::time::parse_secs)]
    pub timeout: Duration,
    /// Brokers' metrics endpoints (HOST:PORT, comma-separated): report the CPU they spent
    /// per record while the workers drained the topic (read from process_cpu_seconds_total
    /// before and after; the produce phase is not counted).
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    pub broker_metrics: Vec<String>,
}

/// CPU seconds this process has spent (user and system), from getrusage.
fn own_cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain data that getrusage fills in; RUSAGE_SELF is always valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// CPU per record over the drain: this process's, and the brokers' when asked for.
#[derive(Debug, Default)]
struct DrainCpu {
    workers_seconds: f64,
    broker_seconds: Option<f64>,
}

/// What one worker saw.
#[derive(Debug, Default)]
struct Worker {
    accepted: u64,
    not_sent: u64,
    /// Deliveries, and those of a record already delivered (to any worker).
    delivered: u64,
    duplicates: u64,
}

/// The records of the fresh topic delivered so far: one bit each, so the bench's memory is
/// an eighth of a byte per record, not a list of every delivery.
#[derive(Debug)]
struct Delivered {
    /// Where each partition's records start among the bits, and how many it has.
    base: Vec<(u64, u64)>,
    bits: Vec<AtomicU64>,
}

impl Delivered {
    /// Bits for `ends[p]` records of each partition `p`, from offset 0 (a fresh topic).
    fn new(ends: &[u64]) -> Delivered {
        let mut base = Vec::with_capacity(ends.len());
        let mut total = 0u64;
        for end in ends {
            base.push((total, *end));
            total += end;
        }
        Delivered {
            base,
            bits: (0..total.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Marks a delivery; true if the record had been delivered before.
    fn again(&self, partition: i32, offset: u64) -> bool {
        let Some(&(base, records)) = usize::try_from(partition).ok().and_then(|p| self.base.get(p)) else {
            return false;
        };
        if offset >= records {
            return false;
        }
        // Within the bits: offset < records, and the partitions' records add up to them.
        let bit = base + offset;
        let word = &self.bits[(bit / 64) as usize];
        let mask = 1u64 << (bit % 64);
        word.fetch_or(mask, Ordering::Relaxed) & mask != 0
    }
}

pub async fn run(client: &Client, args: QueueBenchArgs, format: Format) -> anyhow::Result<()> {
    anyhow::ensure!(args.workers > 0, "--workers must be positive");
    anyhow::ensure!(args.records > 0, "--records must be positive");
    anyhow::ensure!(args.keys != Some(0), "--keys must be positive");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let topic = format!("bench-queue-{stamp}");
    let group = format!("bench-queue-{stamp}");
    let produce = produce_args(&topic, &args);
    super::ensure_topic(client, &topic, args.partitions, 1, &[]).await?;
    let produced = tokio::time::timeout(args.timeout, super::produce(client, &produce, true, None))
        .await
        .map_err(|_| anyhow::anyhow!("producing did not finish within {:?} (--timeout)", args.timeout))??;
    if let Some(e) = produced.first_error {
        anyhow::bail!("{} record(s) could not be produced; first error: {e}", produced.errors);
    }
    let mut ends = Vec::new();
    for p in 0..args.partitions {
        ends.push(client.admin().list_offset(&topic, p, OffsetSpec::Latest).await?.offset);
    }
    let delivered = Arc::new(Delivered::new(&ends));
    let target = args.records;
    let accepted = Arc::new(AtomicU64::new(0));
    let done = Arc::new(tokio::sync::watch::Sender::new(false));
    let first: Arc<std::sync::OnceLock<Instant>> = Arc::new(std::sync::OnceLock::new());
    let bar = progress(target, "queue");
    let broker_before = if args.broker_metrics.is_empty() {
        None
    } else {
        Some(crate::broker_usage::scrape_all(&args.broker_metrics).await?)
    };
    client
        .share_groups()
        .create(&group, &topic, &config(&args))
        .await
        .map_err(|e| anyhow::anyhow!("creating share group {group}: {e}"))?;
    let cpu_before = own_cpu_seconds();
    // From before the joins: a worker fetches as soon as it joined.
    let start = Instant::now();
    // Each worker its own connection, as separate processes would have, all joining at once
    // as they would.
    let consumers = futures::future::try_join_all((0..args.workers).map(|_| async {
        let own = Client::connect(client.address()).await?;
        own.share_consumer(&group, &topic, config(&args)).await
    }))
    .await?;
    let workers: Vec<_> = consumers
        .into_iter()
        .map(|consumer| {
            tokio::spawn(work(
                consumer,
                Arc::clone(&delivered),
                target,
                Arc::clone(&accepted),
                Arc::clone(&done),
                Arc::clone(&first),
                bar.clone(),
            ))
        })
        .collect();
    let drained = tokio::time::timeout(args.timeout, futures::future::join_all(workers)).await;
    let elapsed = start.elapsed();
    let mut cpu = DrainCpu {
        workers_seconds: own_cpu_seconds() - cpu_before,
        broker_seconds: None,
    };
    if let Some(before) = broker_before {
        match crate::broker_usage::scrape_all(&args.broker_metrics).await {
            Ok(after) => cpu.broker_seconds = Some(after.cpu_seconds - before.cpu_seconds),
            Err(e) => eprintln!("warning: no broker CPU figures: {e:#}"),
        }
    }
    bar.finish_and_clear();
    let mut seen = Vec::new();
    for w in drained.map_err(|_| {
        anyhow::anyhow!(
            "the workers did not accept {target} records within {:?} (--timeout)",
            args.timeout
        )
    })? {
        seen.push(w??);
    }
    let setup = first.get().map(|at| at.duration_since(start));
    report(&args, &topic, &seen, elapsed, setup, &cpu, format);
    Ok(())
}

fn produce_args(topic: &str, args: &QueueBenchArgs) -> BenchArgs {
    BenchArgs {
        topic: topic.to_string(),
        records: args.records,
        record_size: args.record_size,
        keys: args.keys,
        rate: None,
        producers: 1,
        partitions: args.partitions,
        replication_factor: 1,
        configs: Vec::new(),
        acks: AcksArg::All,
        idempotence: None,
        // Work queued one job at a time makes small batches; a share fetch ships whole
        // stored batches, so batches far past a fetch's records would be shipped repeatedly
        // (docs/queues.md).
        batch_size: 32 * 1024,
        linger: Duration::from_millis(1),
        compression: Compression::None,
        broker_metrics: Vec::new(),
        group: None,
        consumers: 1,
        timeout: args.timeout,
    }
}

fn config(args: &QueueBenchArgs) -> ShareConfig {
    let mut config = ShareConfig::default();
    if let Some(n) = args.prefetch {
        config = config.prefetch(n);
    }
    if let Some(n) = args.max_records {
        config = config.max_records(n);
    }
    if let Some(n) = args.max_inflight {
        config = config.max_inflight_records(n);
    }
    if let Some(linger) = args.ack_linger {
        config = config.ack_linger(linger);
    }
    config
        .auto_offset_reset(ShareOffsetReset::Earliest)
        .ordering(args.ordering.into())
}

/// Accepts every delivery until the workers together accepted `target` records. Accepts
/// are unconfirmed (queued and batched, their answers not awaited one by one); the count is
/// of records accepted, and a refusal would show as a duplicate delivery.
async fn work(
    mut consumer: conveyor_client::ShareConsumer,
    delivered: Arc<Delivered>,
    target: u64,
    accepted: Arc<AtomicU64>,
    done: Arc<tokio::sync::watch::Sender<bool>>,
    first: Arc<std::sync::OnceLock<Instant>>,
    bar: indicatif::ProgressBar,
) -> anyhow::Result<Worker> {
    let mut me = Worker::default();
    let mut finished = done.subscribe();
    while accepted.load(Ordering::Relaxed) < target {
        // No timer per record: the worker that accepts the last record tells the others.
        // A delivery already buffered is taken without building the wait for that.
        let next = match consumer.next().now_or_never() {
            Some(next) => next,
            None => tokio::select! {
                next = consumer.next() => next,
                _ = finished.wait_for(|d| *d) => continue,
            },
        };
        match next {
            None => anyhow::bail!("the share consumer's stream ended"),
            Some(Err(e)) if e.is_retriable() => eprintln!("warning: {e}"),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(delivery)) => {
                if me.delivered == 0 {
                    first.get_or_init(Instant::now);
                }
                me.delivered += 1;
                if delivered.again(delivery.record().partition, delivery.record().offset) {
                    me.duplicates += 1;
                }
                if delivery.accept_unconfirmed().await.is_ok() {
                    me.accepted += 1;
                    let now = accepted.fetch_add(1, Ordering::Relaxed) + 1;
                    if now.is_multiple_of(1000) {
                        bar.set_position(now);
                    }
                    if now >= target {
                        done.send_replace(true);
                    }
                } else {
                    me.not_sent += 1;
                }
            }
        }
    }
    // Queued acknowledgements go out before the worker leaves.
    consumer.close().await?;
    Ok(me)
}

/// `setup`: from the start of the measure until the first delivery (connections, joins, the
/// first fetches).
fn report(
    args: &QueueBenchArgs,
    topic: &str,
    workers: &[Worker],
    elapsed: Duration,
    setup: Option<Duration>,
    cpu: &DrainCpu,
    format: Format,
) {
    let accepted: u64 = workers.iter().map(|w| w.accepted).sum();
    let not_sent: u64 = workers.iter().map(|w| w.not_sent).sum();
    let deliveries: u64 = workers.iter().map(|w| w.delivered).sum();
    let duplicates: u64 = workers.iter().map(|w| w.duplicates).sum();
    let per_worker: Vec<u64> = workers.iter().map(|w| w.accepted).collect();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let rate = accepted as f64 / secs;
    let ordering = args.ordering.name();
    let per_record = |seconds: f64| seconds * 1e6 / accepted.max(1) as f64;
    let workers_cpu_us = per_record(cpu.workers_seconds);
    let broker_cpu_us = cpu.broker_seconds.map(per_record);
    match format {
        Format::Json => output::json(&json!({
            "mode": "queue", "topic": topic, "workers": args.workers, "partitions": args.partitions,
            "ordering": ordering, "keys": args.keys, "record_size": args.record_size,
            "records": args.records, "accepted": accepted, "seconds": secs, "records_per_sec": rate,
            "per_worker": per_worker, "deliveries": deliveries, "duplicates": duplicates, "acks_not_sent": not_sent,
            "workers_cpu_us_per_record": workers_cpu_us, "broker_cpu_us_per_record": broker_cpu_us,
            "first_delivery_seconds": setup.map(|d| d.as_secs_f64()),
        })),
        Format::Text => {
            println!(
                "queue: {accepted} records accepted in {secs:.2} s: {rate:.0} records/s by {} workers ({} partitions, ordering {ordering}{})",
                args.workers,
                args.partitions,
                args.keys.map(|k| format!(", {k} keys")).unwrap_or_default()
            );
            if let Some(setup) = setup {
                let drain = (secs - setup.as_secs_f64()).max(1e-9);
                println!(
                    "first delivery after {:.0} ms (connections, joins); from then on {:.0} records/s",
                    setup.as_secs_f64() * 1e3,
                    accepted as f64 / drain
                );
            }
            let counts: Vec<String> = per_worker.iter().map(u64::to_string).collect();
            println!("per worker: {}", counts.join(" "));
            println!("duplicates: {duplicates} (deliveries of a record already delivered); acks not sent: {not_sent}");
            let broker = broker_cpu_us.map_or(String::new(), |us| format!(", the brokers {us:.2} µs"));
            println!("CPU per record accepted: this process (the workers) {workers_cpu_us:.2} µs{broker}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Delivered;

    #[test]
    fn a_record_delivered_again_is_told_apart_per_partition() {
        let delivered = Delivered::new(&[3, 70]);
        assert!(!delivered.again(0, 2));
        assert!(!delivered.again(1, 2), "partition 1's offset 2 is another record");
        assert!(delivered.again(0, 2));
        assert!(!delivered.again(1, 69));
        assert!(delivered.again(1, 69));
        assert!(!delivered.again(5, 0), "a partition out of range is not counted");
        assert!(!delivered.again(0, 3), "nor an offset past its partition's records");
        assert!(!delivered.again(0, 3));
    }
}
