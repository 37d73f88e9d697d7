//! `conveyor bench produce|consume|e2e`: a load tool in the spirit of Kafka's perf-test tools.
//!
//! Latency goes into an HDR histogram. With `--rate`, each record has an intended send time
//! on a fixed schedule and latency is measured from that time, so a stalled broker shows up
//! as latency instead of hiding as a slower send rate (coordinated omission).

mod group_consume;
mod groups;
mod queue;
pub mod redis_queue;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::{Args, Subcommand};
use conveyor_client::{
    Acks, Client, ClientError, Compression, ConsumerConfig, DeliveryFuture, OffsetSpec, ProducerConfig, ProducerRecord,
    StartAt,
};
use futures::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::future::IntoFuture;

use crate::output::{self, Format};
use crate::produce::AcksArg;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

/// Deliveries awaited behind each producer loop.
const PENDING_PER_PRODUCER: usize = 200_000;
/// Records sent between two reads of the clock when sending as fast as possible.
const CLOCK_EVERY: u64 = 16;
/// Longest latency the histogram records, in microseconds.
const MAX_LATENCY_MICROS: u64 = 600_000_000;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Produce records as fast as possible (or at --rate) and report throughput and ack latency.
    Produce(BenchArgs),
    /// Read records from the start of a topic and report throughput.
    Consume(BenchArgs),
    /// Produce and consume at once; report latency from send to receive.
    E2e(BenchArgs),
    /// Open many produce streams at once, each sending large requests, to see what a broker
    /// holds in memory under a flood; stops after the requests are answered.
    Flood(crate::flood::FloodArgs),
    /// Many consumer groups heartbeating (members speak the group protocol without
    /// fetching): what membership costs the coordinator, with --broker-metrics.
    Groups(groups::GroupsArgs),
    /// Time from a member joining a stable group until the group is stable again with it
    /// owning partitions, over several rounds.
    Rebalance(groups::RebalanceArgs),
    /// A share group draining a fresh topic: produce --records records, then time
    /// --workers share consumers in this process accepting them all; reports accepted
    /// records/s, each worker's count (the spread) and duplicate deliveries.
    ///
    /// Examples:
    ///   conveyor bench queue --workers 8 --records 100000
    ///   conveyor bench queue --workers 8 --records 100000 --ordering key --keys 10000
    #[command(verbatim_doc_comment)]
    Queue(queue::QueueBenchArgs),
    /// The same work as `bench queue` on Redis Streams (XREADGROUP + XACK, pipelined, one
    /// connection per worker), for a side-by-side figure; needs a running redis-server.
    ///
    /// Example:
    ///   conveyor bench redis-queue --redis 127.0.0.1:6379 --workers 8 --records 100000
    #[command(verbatim_doc_comment)]
    RedisQueue(redis_queue::RedisQueueArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Topic to use; created with --partitions if it does not exist.
    #[arg(long)]
    pub topic: String,
    /// Records to produce (or consume).
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Bytes per record value.
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    /// Give records keys from a space of this many distinct keys (record i of each
    /// producer gets key i mod N), as a compacted topic needs; default: no keys.
    #[arg(long, value_name = "N")]
    pub keys: Option<u64>,
    /// Target records per second across all producers (default: as fast as possible).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Concurrent producers, each with its own connection.
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// Partitions when the topic is created.
    #[arg(long, default_value_t = 1)]
    pub partitions: i32,
    /// Replicas per partition when the topic is created.
    #[arg(long, default_value_t = 1)]
    pub replication_factor: i32,
    /// Topic config when the topic is created, e.g. flush.policy=os.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = crate::topic::parse_key_value)]
    pub configs: Vec<(String, String)>,
    /// When the broker acknowledges. Idempotence needs all: leader or none turn it off
    /// unless --idempotence on is given (an error then).
    #[arg(long, value_enum, default_value = "all")]
    pub acks: AcksArg,
    /// Idempotent producers: on (the default, with --acks all) or off, to measure what
    /// producer ids and sequence numbers cost.
    #[arg(long, value_enum, value_name = "on|off")]
    pub idempotence: Option<OnOff>,
    /// Producer batch size in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    pub batch_size: usize,
    /// How long a producer batch may wait to fill: a duration such as 5ms or 1s; a bare
    /// number counts milliseconds.
    #[arg(long, alias = "linger-ms", value_name = "DURATION", default_value = "1ms", value_parser = crate::time::parse_millis)]
    pub linger: Duration,
    /// none, lz4 or zstd.
    #[arg(long, default_value = "none")]
    pub compression: Compression,
    /// Brokers' metrics endpoints (HOST:PORT, comma-separated): report the CPU they spent
    /// per request and per record over the run, read from their process_cpu_seconds_total
    /// and request counters before and after it.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    pub broker_metrics: Vec<String>,
    /// consume: read as members of this consumer group (from its committed offsets, or the
    /// start), committing every second, instead of assigning every partition to one reader.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// consume with --group: members in the group, each with its own connection.
    #[arg(long, default_value_t = 1, requires = "group")]
    pub consumers: u32,
    /// Give up after this long: a duration such as 90s or 10m; a bare number counts seconds.
    #[arg(long, alias = "timeout-secs", value_name = "DURATION", default_value = "10m", value_parser = crate::time::parse_secs)]
    pub timeout: Duration,
}

#[derive(Debug)]
struct Outcome {
    records: u64,
    bytes: u64,
    errors: u64,
    elapsed: Duration,
    latency: Option<Histogram<u64>>,
    first_error: Option<String>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_MICROS, 3).expect("static histogram bounds are valid")
}

fn progress(total: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{label} {{bar:40}} {{pos}}/{{len}} records ({{per_sec}}, eta {{eta}})"
    )) {
        bar.set_style(style);
    }
    bar
}

pub(crate) async fn ensure_topic(
    client: &Client,
    topic: &str,
    partitions: i32,
    replication_factor: i32,
    configs: &[(String, String)],
) -> anyhow::Result<()> {
    match client.admin().describe_topic(topic).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(conveyor_client::proto::ErrorCode::UnknownTopic) => {
            let configs: Vec<(&str, &str)> = configs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            client
                .admin()
                .create_replicated_topic(topic, partitions, replication_factor, &configs)
                .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn run(client: &Client, address: &str, cmd: BenchCommand, format: Format) -> anyhow::Result<()> {
    let (mode, args) = match &cmd {
        BenchCommand::Produce(a) => ("produce", a.clone()),
        BenchCommand::Consume(a) => ("consume", a.clone()),
        BenchCommand::E2e(a) => ("e2e", a.clone()),
        BenchCommand::Flood(a) => return crate::flood::run(client, address, a.clone(), format).await,
        BenchCommand::Groups(a) => return groups::groups(client, address, a.clone(), format).await,
        BenchCommand::Rebalance(a) => return groups::rebalance(client, address, a.clone(), format).await,
        BenchCommand::Queue(a) => return queue::run(client, a.clone(), format).await,
        // Needs no broker: `main` runs it before connecting.
        BenchCommand::RedisQueue(_) => anyhow::bail!("bench redis-queue runs without a broker"),
    };
    let args = &args;
    anyhow::ensure!(args.records > 0, "--records must be positive");
    anyhow::ensure!(args.producers > 0, "--producers must be positive");
    anyhow::ensure!(args.rate != Some(0), "--rate must be positive");
    let idempotence = idempotent(args)?;
    ensure_topic(
        client,
        &args.topic,
        args.partitions,
        args.replication_factor,
        &args.configs,
    )
    .await?;
    let timeout = args.timeout;
    let usage_before = if args.broker_metrics.is_empty() {
        None
    } else {
        Some((
            crate::broker_usage::scrape_all(&args.broker_metrics).await?,
            Instant::now(),
        ))
    };
    let work = async {
        match cmd {
            BenchCommand::Produce(a) => produce(client, &a, idempotence, None).await,
            BenchCommand::Consume(a) if a.group.is_some() => group_consume::run(client, &a).await,
            BenchCommand::Consume(a) => consume(client, &a).await,
            BenchCommand::E2e(a) => e2e(client, &a, idempotence).await,
            BenchCommand::Flood(_)
            | BenchCommand::Groups(_)
            | BenchCommand::Rebalance(_)
            | BenchCommand::Queue(_)
            | BenchCommand::RedisQueue(_) => {
                anyhow::bail!("run above")
            }
        }
    };
    let outcome = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| anyhow::anyhow!("bench did not finish within {timeout:?} (--timeout)"))??;
    let spent = match usage_before {
        Some((before, at)) => match crate::broker_usage::scrape_all(&args.broker_metrics).await {
            Ok(after) => {
                let seconds = at.elapsed().as_secs_f64();
                Some(crate::broker_usage::Spent::between(
                    before,
                    after,
                    outcome.records,
                    seconds,
                ))
            }
            // The run's own figures are still worth reporting.
            Err(e) => {
                eprintln!("warning: no broker CPU figures: {e:#}");
                None
            }
        },
        None => None,
    };
    report(mode, args, idempotence, &outcome, spent.as_ref(), format);
    if let Some(e) = outcome.first_error {
        anyhow::bail!("{} record(s) failed; first error: {e}", outcome.errors);
    }
    Ok(())
}

fn report(
    mode: &str,
    args: &BenchArgs,
    idempotence: bool,
    o: &Outcome,
    spent: Option<&crate::broker_usage::Spent>,
    format: Format,
) {
    let secs = o.elapsed.as_secs_f64().max(1e-9);
    let rps = o.records as f64 / secs;
    let mbps = o.bytes as f64 / secs / 1e6;
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    match format {
        Format::Json => {
            let latency = o.latency.as_ref().map(
                |h| json!({"p50": q(h, 0.5), "p99": q(h, 0.99), "p999": q(h, 0.999), "max": h.max() as f64 / 1000.0}),
            );
            output::json(&json!({
                "mode": mode, "topic": args.topic, "records": o.records, "errors": o.errors,
                "record_size": args.record_size, "rate": args.rate, "producers": args.producers,
                "seconds": secs, "records_per_sec": rps, "mb_per_sec": mbps, "latency_ms": latency,
                "acks": format!("{:?}", args.acks).to_lowercase(), "idempotence": idempotence,
                "broker": spent.map(crate::broker_usage::Spent::json),
            }));
        }
        Format::Text => {
            let producing = if mode == "consume" {
                String::new()
            } else {
                format!(" (idempotence {})", if idempotence { "on" } else { "off" })
            };
            println!(
                "{mode}: {} records in {secs:.2} s: {rps:.0} records/s, {mbps:.1} MB/s, {} errors{producing}",
                o.records, o.errors
            );
            if let Some(h) = &o.latency {
                let label = if args.rate.is_some() {
                    "latency (from intended send time)"
                } else {
                    "latency"
                };
                println!(
                    "{label}: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
                    q(h, 0.5),
                    q(h, 0.99),
                    q(h, 0.999),
                    h.max() as f64 / 1000.0
                );
            }
            if let Some(spent) = spent {
                println!("{}", spent.text());
            }
        }
    }
}

/// Whether the bench's producers are idempotent (see [`crate::produce::idempotence`]).
pub(crate) fn idempotent(args: &BenchArgs) -> anyhow::Result<bool> {
    crate::produce::idempotence(args.acks, args.idempotence.map(|i| i == OnOff::On))
}

fn producer_config(args: &BenchArgs, idempotent: bool) -> ProducerConfig {
    ProducerConfig::default()
        .acks(Acks::from(args.acks))
        .idempotence(idempotent)
        .batch_size(args.batch_size)
        .linger(args.linger)
        .compression(args.compression)
        .max_in_flight_bytes(256 << 20)
}

/// Runs the producers. With `epoch`, each value starts with its (intended) send time in
/// nanoseconds since `epoch`, for end-to-end latency.
async fn produce(
    client: &Client,
    args: &BenchArgs,
    idempotent: bool,
    epoch: Option<Instant>,
) -> anyhow::Result<Outcome> {
    let acked = Arc::new(AtomicU64::new(0));
    let bar = if epoch.is_none() {
        progress(args.records, "produce")
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.producers {
        let share = args.records / u64::from(args.producers)
            + u64::from(u64::from(i) < args.records % u64::from(args.producers));
        let client = Client::connect(client.address()).await?;
        let (args, acked) = (args.clone(), Arc::clone(&acked));
        tasks.push(tokio::spawn(async move {
            let config = producer_config(&args, idempotent);
            producer_loop(client, args, config, share, start, epoch, acked).await
        }));
    }
    let ticker = {
        let (bar, acked) = (bar.clone(), Arc::clone(&acked));
        tokio::spawn(async move {
            loop {
                bar.set_position(acked.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut total = Outcome {
        records: 0,
        bytes: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency: Some(histogram()),
        first_error: None,
    };
    for t in tasks {
        let o = t.await??;
        total.records += o.records;
        total.bytes += o.bytes;
        total.errors += o.errors;
        total.first_error = total.first_error.or(o.first_error);
        if let (Some(h), Some(part)) = (total.latency.as_mut(), o.latency.as_ref()) {
            h.add(part)?;
        }
    }
    total.elapsed = start.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    if epoch.is_some() {
        total.latency = None;
    }
    Ok(total)
}

async fn producer_loop(
    client: Client,
    args: BenchArgs,
    config: ProducerConfig,
    records: u64,
    start: Instant,
    epoch: Option<Instant>,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<Outcome> {
    let producer = client.producer(config)?;
    let per_producer_rate = args.rate.map(|r| r as f64 / f64::from(args.producers));
    let template = Bytes::from(vec![b'x'; args.record_size]);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, DeliveryFuture)>(PENDING_PER_PRODUCER);
    let record_size = args.record_size as u64;
    let acker = tokio::spawn(async move {
        let mut h = histogram();
        let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None::<ClientError>);
        // Records of one batch are acknowledged together: read the clock only when a
        // delivery was not already complete, not once per record.
        let mut acked_at = Instant::now();
        while let Some((sent, delivery)) = rx.recv().await {
            let mut pending = delivery.into_future();
            let result = match (&mut pending).now_or_never() {
                Some(r) => r,
                None => {
                    let r = pending.await;
                    acked_at = Instant::now();
                    r
                }
            };
            if acked_at < sent {
                acked_at = Instant::now();
            }
            match result {
                Ok(_) => {
                    ok += 1;
                    let _ = h.record((acked_at.duration_since(sent).as_micros() as u64).clamp(1, MAX_LATENCY_MICROS));
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        Outcome {
            records: ok,
            bytes: ok * record_size,
            errors,
            elapsed: Duration::ZERO,
            latency: Some(h),
            first_error: first_error.map(|e| e.to_string()),
        }
    });
    let make_value = move |intended: Instant| match epoch {
        Some(epoch) => {
            let mut v = BytesMut::with_capacity(template.len().max(8));
            v.put_u64(intended.saturating_duration_since(epoch).as_nanos() as u64);
            v.extend_from_slice(&template[..template.len().saturating_sub(8)]);
            v.freeze()
        }
        None => template.clone(),
    };
    let keys = args.keys;
    let keyed = move |record: ProducerRecord, i: u64| match keys {
        Some(n) => record.key(bytes::Bytes::from(format!("key-{:010}", i % n.max(1)))),
        None => record,
    };
    match per_producer_rate {
        None => {
            let mut sent = Instant::now();
            for i in 0..records {
                // Refreshed every few records: a clock read per record costs more than the
                // microseconds it would add to a millisecond-scale measurement.
                if i % CLOCK_EVERY == 0 {
                    sent = Instant::now();
                }
                let delivery = producer
                    .send(keyed(ProducerRecord::new(&args.topic, make_value(sent)), i))
                    .await?;
                if tx.send((sent, delivery)).await.is_err() {
                    break;
                }
            }
            drop(tx);
        }
        Some(rate) => {
            // Paced on its own thread: the async timer ticks in whole milliseconds, which
            // would add up to a millisecond of lateness to every record at these rates.
            let (producer, topic, handle) = (producer.clone(), args.topic.clone(), tokio::runtime::Handle::current());
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                for i in 0..records {
                    let at = start + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    let delivery =
                        handle.block_on(producer.send(keyed(ProducerRecord::new(&topic, make_value(at)), i)))?;
                    if tx.blocking_send((at, delivery)).is_err() {
                        break;
                    }
                }
                Ok(())
            })
            .await??;
        }
    }
    producer.flush().await?;
    Ok(acker.await?)
}

async fn consume(client: &Client, args: &BenchArgs) -> anyhow::Result<Outcome> {
    let count = client.partition_count(&args.topic).await?;
    let mut ends = std::collections::HashMap::new();
    for p in 0..count as i32 {
        let r = client.admin().list_offset(&args.topic, p, OffsetSpec::Latest).await?;
        ends.insert((args.topic.clone(), p), r.high_watermark);
    }
    anyhow::ensure!(
        ends.values().any(|end| *end > 0),
        "topic '{}' has no records to consume; run bench produce first",
        args.topic
    );
    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer.assign_all(&args.topic, StartAt::Earliest).await?;
    let bar = progress(args.records, "consume");
    let start = Instant::now();
    let mut stream = consumer.stream();
    let (mut records, mut bytes) = (0u64, 0u64);
    while records < args.records {
        let Some(record) = stream.next_until(&ends).await else {
            break;
        };
        let record = record?;
        records += 1;
        bytes += record.value.as_ref().map_or(0, |v| v.len() as u64);
        if records % 100_000 == 0 {
            bar.set_position(records);
        }
    }
    bar.finish_and_clear();
    Ok(Outcome {
        records,
        bytes,
        errors: 0,
        elapsed: start.elapsed(),
        latency: None,
        first_error: None,
    })
}

async fn e2e(client: &Client, args: &BenchArgs, idempotent: bool) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        args.record_size >= 8,
        "e2e needs --record-size of at least 8 (the send time)"
    );
    let count = client.partition_count(&args.topic).await?;
    let mut consumer = client.consumer(ConsumerConfig::default().max_wait(Duration::from_millis(100)));
    for p in 0..count as i32 {
        let latest = client
            .admin()
            .list_offset(&args.topic, p, OffsetSpec::Latest)
            .await?
            .offset;
        consumer.assign(&args.topic, p, StartAt::Offset(latest));
    }
    let epoch = Instant::now();
    let mut stream = consumer.stream();
    let producing = {
        let (client, args) = (client.clone(), args.clone());
        tokio::spawn(async move { produce(&client, &args, idempotent, Some(epoch)).await })
    };
    let bar = progress(args.records, "e2e");
    let mut h = histogram();
    let (mut records, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    while records < args.records {
        let Some(record) = stream.next().await else { break };
        let record = record?;
        let Some(value) = record.value else { continue };
        if value.len() < 8 {
            continue;
        }
        let sent = u64::from_be_bytes(value[..8].try_into().unwrap_or_default());
        let now = epoch.elapsed().as_nanos() as u64;
        let _ = h.record((now.saturating_sub(sent) / 1000).clamp(1, MAX_LATENCY_MICROS));
        records += 1;
        bytes += value.len() as u64;
        if records % 10_000 == 0 {
            bar.set_position(records);
        }
    }
    bar.finish_and_clear();
    let produced = producing.await??;
    Ok(Outcome {
        records,
        bytes,
        errors: produced.errors,
        elapsed: start.elapsed(),
        latency: Some(h),
        first_error: produced.first_error,
    })
}
