//! `conveyor queue consume TOPIC --group G`: print deliveries of a share group as one of its
//! members, acknowledging each after it is printed.

use std::io::Write;
use std::time::Duration;

use clap::{Args, ValueEnum};
use conveyor_client::{Client, Delivery, ShareConfig, ShareConsumer};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

pub use super::settings::{GroupSettingsArgs, OrderingArg};
use crate::consume::{print_record, record_json};
use crate::output::Format;

/// Acknowledgements awaited at once: past it, printing waits for the broker's answers.
const ACKS_IN_FLIGHT: usize = 1000;
/// Deliveries fetched ahead of printing (fewer with a small --max-records, so no more is
/// taken from the group than will be printed).
const PREFETCH: u64 = 1000;

/// What to do with each delivery once printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AckArg {
    /// Done: never delivered again.
    Accept,
    /// Give it back to the group, to be delivered again (after --release-delay).
    Release,
    /// Dead-letter it (with --reject-reason in its headers).
    Reject,
}

/// Print records of a topic as a member of a share group (a queue)
///
/// A share group hands each record of its topic to one member at a time, locked to it
/// until the member acknowledges it or the lock runs out; then it goes to another member.
/// Any number of members may share one partition. This command joins group G (creating
/// it on TOPIC when it does not exist), prints each record it is given and then
/// acknowledges it with --ack (accept by default): a record is printed before it is
/// acknowledged, so a crash in between prints it again elsewhere (at least once).
///
/// It runs until --max-records records were printed, nothing came for --idle-timeout, or
/// Ctrl-C; each of these sends the outstanding acknowledgements and leaves the group,
/// giving back at once any record fetched but not printed.
///
/// The group settings (--ordering, --lock-duration, --max-delivery-count, --max-inflight,
/// --from, --dead-letter-topic) are fixed when the group is created. Leave them out to join an
/// existing group; given, they must match the group's.
///
/// Examples:
///   conveyor queue consume orders --group workers --ordering key --max-records 10
///   conveyor queue consume orders --group workers --from earliest --idle-timeout 5s
///   conveyor queue consume orders --group workers --ack release --release-delay 30s
///   conveyor queue consume orders --group workers --output json | jq .delivery_count
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct QueueConsumeArgs {
    /// The topic the group consumes.
    pub topic: String,
    /// The share group to join.
    #[arg(long, value_name = "GROUP")]
    pub group: String,
    /// How to acknowledge each record once printed.
    #[arg(long, value_enum, default_value = "accept")]
    pub ack: AckArg,
    /// With --ack release: how long the record waits before it is delivered again (e.g.
    /// 30s; a bare number counts seconds).
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = crate::time::parse_secs)]
    pub release_delay: Duration,
    /// With --ack reject: why, written into the dead letter's headers.
    #[arg(long, value_name = "TEXT", default_value = "rejected with conveyor queue consume")]
    pub reject_reason: String,
    #[command(flatten)]
    pub settings: GroupSettingsArgs,
    /// Stop after this many records.
    #[arg(long, value_name = "N")]
    pub max_records: Option<u64>,
    /// Stop when no record came for this long (e.g. 10s, 500ms; a bare number counts
    /// seconds).
    #[arg(long, value_name = "DURATION", value_parser = crate::time::parse_secs)]
    pub idle_timeout: Option<Duration>,
    /// Print keys as well as values (text output).
    #[arg(long)]
    pub print_key: bool,
}

impl QueueConsumeArgs {
    fn config(&self) -> ShareConfig {
        let mut config = self.settings.apply(ShareConfig::default());
        if let Some(max) = self.max_records {
            let ahead = max.clamp(1, PREFETCH);
            config.prefetch = ahead as usize;
            config.max_records = config.max_records.min(ahead as u32);
        }
        config
    }
}

/// Why reading stops.
enum Stop {
    Done,
    Failed(anyhow::Error),
}

pub async fn run(client: &Client, args: QueueConsumeArgs, format: Format) -> anyhow::Result<()> {
    let mut consumer = client
        .share_consumer(&args.group, &args.topic, args.config())
        .await
        .map_err(|e| super::explain(e, &args.group))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut acks = FuturesUnordered::new();
    let (mut printed, mut refused) = (0u64, 0u64);
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let stop = loop {
        if args.max_records.is_some_and(|m| printed >= m) {
            break Stop::Done;
        }
        let next = next(&mut consumer, args.idle_timeout, acks.len() < ACKS_IN_FLIGHT);
        tokio::select! {
            _ = &mut interrupted => break Stop::Done,
            Some(answer) = acks.next(), if !acks.is_empty() => refused += u64::from(warn_if_refused(answer)),
            next = next => match next {
                // Idle for --idle-timeout.
                None | Some(None) => break Stop::Done,
                Some(Some(Err(e))) if e.is_retriable() => eprintln!("warning: {e}"),
                Some(Some(Err(e))) => break Stop::Failed(e.into()),
                Some(Some(Ok(delivery))) => {
                    if let Err(e) = print(&mut out, &delivery, args.print_key, format) {
                        // Not acknowledged: it goes back to the group when the consumer closes.
                        break Stop::Failed(e.into());
                    }
                    printed += 1;
                    acks.push(acknowledge(delivery, &args));
                }
            },
        }
    };
    while let Some(answer) = acks.next().await {
        refused += u64::from(warn_if_refused(answer));
    }
    let closed = consumer.close().await;
    if refused > 0 {
        eprintln!("warning: {refused} acknowledgement(s) were refused or lost: those records will be delivered again");
    }
    match stop {
        Stop::Failed(e) => Err(e),
        Stop::Done => closed.map_err(|e| anyhow::anyhow!("could not leave share group {} cleanly: {e}", args.group)),
    }
}

/// The next delivery; `None` after `idle` with none; pending while `room` is false (too
/// many acknowledgements awaited).
async fn next(
    consumer: &mut ShareConsumer,
    idle: Option<Duration>,
    room: bool,
) -> Option<Option<conveyor_client::Result<Delivery>>> {
    if !room {
        return std::future::pending().await;
    }
    match idle {
        Some(idle) => tokio::time::timeout(idle, consumer.next()).await.ok(),
        None => Some(consumer.next().await),
    }
}

/// Prints one delivery: as `conveyor consume` prints a record, and in JSON with its
/// `delivery_count`. Flushed, since it is acknowledged next.
fn print(out: &mut impl Write, delivery: &Delivery, print_key: bool, format: Format) -> std::io::Result<()> {
    match format {
        Format::Json => {
            let mut line = record_json(delivery.record());
            if let Some(object) = line.as_object_mut() {
                object.insert("delivery_count".into(), delivery.delivery_count().into());
            }
            writeln!(out, "{line}")?;
        }
        Format::Text => print_record(out, delivery.record(), print_key, format)?,
    }
    out.flush()
}

fn acknowledge(
    delivery: Delivery,
    args: &QueueConsumeArgs,
) -> std::pin::Pin<Box<dyn Future<Output = (String, conveyor_client::Result<()>)> + Send>> {
    let r = delivery.record();
    let what = format!("{}[{}]@{}", r.topic, r.partition, r.offset);
    let (ack, delay, reason) = (args.ack, args.release_delay, args.reject_reason.clone());
    Box::pin(async move {
        let answer = match ack {
            AckArg::Accept => delivery.accept().await,
            AckArg::Release => delivery.release(delay).await,
            AckArg::Reject => delivery.reject(reason).await,
        };
        (what, answer)
    })
}

/// Says so on stderr when an acknowledgement failed; true then.
fn warn_if_refused((what, answer): (String, conveyor_client::Result<()>)) -> bool {
    match answer {
        Ok(()) => false,
        Err(e) => {
            eprintln!("warning: {what}: {e}");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use conveyor_client::{ShareOffsetReset, ShareOrdering};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: QueueConsumeArgs,
    }

    #[test]
    fn group_settings_are_left_unset_unless_given_and_a_small_max_records_bounds_the_prefetch() {
        let parse = |extra: &[&str]| {
            let base = ["queue-consume", "orders", "--group", "workers"];
            Cli::try_parse_from(base.iter().chain(extra)).expect("parsed").args
        };
        let plain = parse(&[]).config();
        assert_eq!(plain.ordering, None);
        assert_eq!(plain.lock_duration, None);
        assert_eq!(plain.prefetch, 1000);
        let args = parse(&[
            "--ordering",
            "key",
            "--lock-duration",
            "90s",
            "--from",
            "earliest",
            "--max-records",
            "10",
            "--max-inflight",
            "500",
            "--ack",
            "release",
        ]);
        assert_eq!(args.ack, AckArg::Release);
        let config = args.config();
        assert_eq!(config.ordering, Some(ShareOrdering::Key));
        assert_eq!(config.lock_duration, Some(Duration::from_secs(90)));
        assert_eq!(config.auto_offset_reset, Some(ShareOffsetReset::Earliest));
        assert_eq!(config.max_inflight_records, Some(500));
        assert_eq!((config.prefetch, config.max_records), (10, 10));
        assert!(config.validate().is_ok());
    }
}
