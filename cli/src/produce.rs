//! `conveyor produce TOPIC`: one record per line of standard input.

use clap::{Args, ValueEnum};
use conveyor_client::{Acks, Client, DeliveryFuture, ProducerConfig, ProducerRecord};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::output::{self, Format};

/// Deliveries awaited behind the reader; bounds memory on large inputs.
const PENDING_DELIVERIES: usize = 100_000;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AcksArg {
    All,
    Leader,
    None,
}

/// Whether a producer with `acks` is idempotent: on unless turned off (`requested` false)
/// or implied off by acks other than all. Asking for it with other acks is an error, since
/// the broker dedupes only batches it committed.
pub fn idempotence(acks: AcksArg, requested: Option<bool>) -> anyhow::Result<bool> {
    let all = matches!(acks, AcksArg::All);
    match requested {
        Some(true) if !all => {
            anyhow::bail!("idempotence needs --acks all (got --acks {acks:?}); turn it off or use --acks all")
        }
        Some(on) => Ok(on),
        None => Ok(all),
    }
}

impl From<AcksArg> for Acks {
    fn from(a: AcksArg) -> Acks {
        match a {
            AcksArg::All => Acks::All,
            AcksArg::Leader => Acks::Leader,
            AcksArg::None => Acks::None,
        }
    }
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    pub topic: String,
    /// Split each line at the first SEP into key and value (lines without SEP have no key).
    #[arg(long, value_name = "SEP")]
    pub key_separator: Option<String>,
    /// A line whose value is exactly MARKER sends a tombstone (a null value): on a compacted
    /// topic it deletes its key. E.g. `--key-separator : --null-marker NULL` makes `k:NULL`
    /// delete k.
    #[arg(long, value_name = "MARKER")]
    pub null_marker: Option<String>,
    /// Send every record to this partition instead of choosing by key.
    #[arg(long)]
    pub partition: Option<i32>,
    /// When the broker acknowledges. Idempotence needs all: leader or none turn it off.
    #[arg(long, value_enum, default_value = "all")]
    pub acks: AcksArg,
    /// Turn idempotence off. By default each batch carries a producer id and sequence
    /// numbers, so a batch resent after a lost acknowledgement (a broken link, a failed
    /// leader) is written once; without it such a resend may store its records twice.
    #[arg(long)]
    pub no_idempotence: bool,
}

impl ProduceArgs {
    /// Whether the producer is idempotent (see [`idempotence`]).
    pub fn idempotent(&self) -> anyhow::Result<bool> {
        idempotence(self.acks, self.no_idempotence.then_some(false))
    }
}

pub async fn run(client: &Client, args: ProduceArgs, format: Format) -> anyhow::Result<()> {
    if let Some(p) = args.partition {
        let count = client.partition_count(&args.topic).await?;
        anyhow::ensure!(
            p >= 0 && (p as u32) < count,
            "topic '{}' has no partition {p} (it has {count})",
            args.topic
        );
    }
    let idempotent = args.idempotent()?;
    let producer = client.producer(ProducerConfig::default().acks(args.acks.into()).idempotence(idempotent))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<DeliveryFuture>(PENDING_DELIVERIES);
    let acker = tokio::spawn(async move {
        let (mut acked, mut first_error) = (0u64, None);
        let mut failed = 0u64;
        while let Some(delivery) = rx.recv().await {
            match delivery.await {
                Ok(_) => acked += 1,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        (acked, failed, first_error)
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut record = match &args.key_separator {
            Some(sep) => match line.find(sep.as_str()) {
                // Key and value share the line's buffer.
                Some(at) => {
                    let line = bytes::Bytes::from(line);
                    ProducerRecord::new(&args.topic, line.slice(at + sep.len()..)).key(line.slice(..at))
                }
                None => ProducerRecord::new(&args.topic, line),
            },
            None => ProducerRecord::new(&args.topic, line),
        };
        if let (Some(marker), Some(value)) = (&args.null_marker, &record.value)
            && value.as_ref() == marker.as_bytes()
        {
            record.value = None;
        }
        record.partition = args.partition;
        let delivery = producer.send(record).await?;
        if tx.send(delivery).await.is_err() {
            break;
        }
    }
    producer.flush().await?;
    drop(tx);
    let (acked, failed, first_error) = acker.await?;
    let unvouched = producer.unvouched_records();
    match format {
        Format::Json => output::json(&json!({
            "topic": args.topic, "acknowledged": acked, "failed": failed,
            "idempotence": idempotent, "unvouched": unvouched,
        })),
        Format::Text => {
            println!("{acked} record(s) acknowledged by topic {}", args.topic);
            if unvouched > 0 {
                println!("{unvouched} record(s) were resent under a new producer epoch and may be stored twice");
            }
        }
    }
    if let Some(e) = first_error {
        anyhow::bail!("{failed} record(s) failed; first error: {e}");
    }
    Ok(())
}
