//! `conveyor consume TOPIC`: print records, then stop at the end of the log (or follow it);
//! with `--group`, as a member of a consumer group, committing what it printed.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use clap::Args;
use conveyor_client::{Client, ConsumerConfig, ConsumerRecord, GroupConfig, OffsetReset, OffsetSpec, StartAt};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::output::Format;

/// Print records of a topic
///
/// By default, prints the records of every partition from the end of the log as it is now
/// (only new records; --from-beginning, --offset or --from-time start earlier) up to that
/// end, then stops; --follow keeps waiting for more.
///
/// With --group G, reads as a member of consumer group G instead: the group's coordinator
/// shares the topic's partitions among the group's members, each partition starts at the
/// group's committed offset (where none is committed: the end of the log, or the start
/// with --from-beginning), and what was printed is committed every 5 seconds and on exit.
/// A group member follows the log until --max-records records were printed, nothing came
/// for --idle-timeout, or Ctrl-C; each of these commits and leaves the group cleanly.
///
/// Examples:
///   conveyor consume orders --from-beginning --max-records 10
///   conveyor consume orders --partition 2 --offset 1500 --print-key
///   conveyor consume orders --from-time -1h --output json
///   conveyor consume orders --group billing --from-beginning --idle-timeout 10s
///   conveyor consume orders --group billing --instance-id billing-1 --assignor range
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct ConsumeArgs {
    /// The topic to read.
    pub topic: String,
    /// Read only this partition (default: all).
    #[arg(long, conflicts_with = "group")]
    pub partition: Option<i32>,
    /// Start at the first record still in the log (default: only new records). With
    /// --group: where the group has no committed offset.
    #[arg(long, conflicts_with_all = ["offset", "from_time"])]
    pub from_beginning: bool,
    /// Start at this offset (with --partition, or in every partition).
    #[arg(long, conflicts_with_all = ["from_time", "group"])]
    pub offset: Option<u64>,
    /// Start at the first record at or after TIME: an RFC 3339 time with its offset
    /// (2026-12-01T10:00:00+01:00, 2026-12-01T09:00:00Z), relative to now (-1h, 90s ago),
    /// or milliseconds since the epoch.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, value_parser = crate::time::parse_time, conflicts_with = "group")]
    pub from_time: Option<i64>,
    /// Stop after this many records (with --group: commit and leave the group).
    #[arg(long)]
    pub max_records: Option<u64>,
    /// Keep waiting for new records instead of stopping at the end of the log (a group
    /// member always does).
    #[arg(long)]
    pub follow: bool,
    /// Print keys as well as values (text output).
    #[arg(long)]
    pub print_key: bool,
    /// Read as a member of this consumer group, from its committed offsets, committing
    /// what was printed.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// With --group: when no record came for this long (e.g. 10s, 500ms; a bare number
    /// counts seconds), commit, leave the group and exit 0.
    #[arg(long, value_name = "DURATION", requires = "group", value_parser = crate::time::parse_secs)]
    pub idle_timeout: Option<Duration>,
    /// With --group: a static member id (unique in the group). A member that comes back
    /// under the same id within the session timeout gets its partitions back with no
    /// rebalance.
    #[arg(long, value_name = "ID", requires = "group")]
    pub instance_id: Option<String>,
    /// With --group: the partition assignor to ask for (range, round-robin, sticky,
    /// co-partitioned, lag-aware; default: the broker's).
    #[arg(long, value_name = "NAME", requires = "group")]
    pub assignor: Option<String>,
    /// With --group: leave the group when the coordinator has not heard from this member
    /// for this long (e.g. 10s; within the broker's [groups] bounds; default: the
    /// broker's, 45s).
    #[arg(long, value_name = "DURATION", requires = "group", value_parser = crate::time::parse_secs)]
    pub session_timeout: Option<Duration>,
}

fn text_or_b64(name: &str, bytes: &Option<Bytes>, out: &mut serde_json::Map<String, Value>) {
    match bytes {
        None => {
            out.insert(name.to_string(), Value::Null);
        }
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => {
                out.insert(name.to_string(), json!(s));
            }
            Err(_) => {
                out.insert(
                    format!("{name}_b64"),
                    json!(base64::engine::general_purpose::STANDARD.encode(b)),
                );
            }
        },
    }
}

pub(crate) fn record_json(r: &ConsumerRecord) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert("partition".into(), json!(r.partition));
    obj.insert("offset".into(), json!(r.offset));
    obj.insert("timestamp".into(), json!(r.timestamp));
    text_or_b64("key", &r.key, &mut obj);
    text_or_b64("value", &r.value, &mut obj);
    let headers: serde_json::Map<String, Value> = r
        .headers
        .iter()
        .map(|h| {
            let v = h
                .value
                .as_ref()
                .map_or(Value::Null, |b| json!(String::from_utf8_lossy(b)));
            (String::from_utf8_lossy(&h.key).into_owned(), v)
        })
        .collect();
    obj.insert("headers".into(), Value::Object(headers));
    Value::Object(obj)
}

pub(crate) fn print_record(
    out: &mut impl Write,
    record: &ConsumerRecord,
    print_key: bool,
    format: Format,
) -> std::io::Result<()> {
    match format {
        Format::Json => writeln!(out, "{}", record_json(record)),
        Format::Text => {
            let value = record.value.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            if print_key {
                let key = record.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                writeln!(out, "{key}\t{value}")
            } else {
                writeln!(out, "{value}")
            }
        }
    }
}

pub async fn run(client: &Client, args: ConsumeArgs, format: Format) -> anyhow::Result<()> {
    if let Some(group) = &args.group {
        return run_in_group(client, &args, group, format).await;
    }
    let count = client.partition_count(&args.topic).await?;
    let partitions: Vec<i32> = match args.partition {
        Some(p) if p >= 0 && (p as u32) < count => vec![p],
        Some(p) => anyhow::bail!("topic '{}' has no partition {p} (it has {count})", args.topic),
        None => (0..count as i32).collect(),
    };
    let start = match (args.from_beginning, args.offset, args.from_time) {
        (true, _, _) => StartAt::Earliest,
        (_, Some(o), _) => StartAt::Offset(o),
        (_, _, Some(t)) => StartAt::Timestamp(t),
        _ => StartAt::Latest,
    };
    // An explicit offset outside the log is an error up front, naming it; without --follow,
    // reading stops at the high watermark each partition has now. One lookup serves both.
    let explicit = match start {
        StartAt::Offset(o) => Some(o),
        _ => None,
    };
    let mut ends: HashMap<(String, i32), u64> = HashMap::new();
    let mut end_of: HashMap<i32, u64> = HashMap::new();
    if explicit.is_some() || !args.follow {
        for &p in &partitions {
            let r = client.admin().list_offset(&args.topic, p, OffsetSpec::Latest).await?;
            if let Some(o) = explicit {
                anyhow::ensure!(
                    (r.log_start_offset..=r.log_end_offset).contains(&o),
                    "topic '{}' partition {p}: offset {o} is outside [{}, {}]",
                    args.topic,
                    r.log_start_offset,
                    r.log_end_offset
                );
            }
            if !args.follow {
                ends.insert((args.topic.clone(), p), r.offset);
                end_of.insert(p, r.offset);
            }
        }
    }
    // Retention may move the log start while reading; an explicit --offset is not moved.
    let reset = match start {
        StartAt::Offset(_) => None,
        StartAt::Latest => Some(StartAt::Latest),
        StartAt::Earliest | StartAt::Timestamp(_) => Some(StartAt::Earliest),
    };
    let mut consumer = client.consumer(ConsumerConfig::default().offset_reset(reset));
    for &p in &partitions {
        consumer.assign(&args.topic, p, start);
    }
    let mut stream = consumer.stream();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    loop {
        let next = if args.follow {
            stream.next().await
        } else {
            stream.next_until(&ends).await
        };
        let Some(record) = next else { break };
        let record = record?;
        if end_of.get(&record.partition).is_some_and(|end| record.offset >= *end) {
            continue;
        }
        print_record(&mut out, &record, args.print_key, format)?;
        printed += 1;
        if args.follow {
            out.flush()?;
        }
        if args.max_records.is_some_and(|m| printed >= m) {
            break;
        }
    }
    out.flush()?;
    Ok(())
}

/// Why a group member stops reading.
enum Stop {
    Done,
    Failed(anyhow::Error),
}

/// `consume --group`: prints records as a member of the group until `--max-records`,
/// `--idle-timeout` or Ctrl-C, then commits what was printed and leaves the group.
async fn run_in_group(client: &Client, args: &ConsumeArgs, group: &str, format: Format) -> anyhow::Result<()> {
    let mut config = GroupConfig::default().reset(if args.from_beginning {
        OffsetReset::Earliest
    } else {
        OffsetReset::Latest
    });
    config.instance_id.clone_from(&args.instance_id);
    config.assignor.clone_from(&args.assignor);
    config.session_timeout = args.session_timeout;
    let mut member = client
        .consumer(ConsumerConfig::default())
        .subscribe(&[args.topic.as_str()], group, config)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let stop = loop {
        if args.max_records.is_some_and(|m| printed >= m) {
            break Stop::Done;
        }
        let next = async {
            match args.idle_timeout {
                Some(idle) => tokio::time::timeout(idle, member.next()).await.ok(),
                None => Some(member.next().await),
            }
        };
        let next = tokio::select! {
            next = next => next,
            _ = &mut interrupted => break Stop::Done,
        };
        match next {
            // Idle for --idle-timeout.
            None => break Stop::Done,
            Some(None) => break Stop::Done,
            Some(Some(Err(e))) => break Stop::Failed(e.into()),
            Some(Some(Ok(record))) => {
                if let Err(e) = print_record(&mut out, &record, args.print_key, format).and_then(|()| out.flush()) {
                    break Stop::Failed(e.into());
                }
                printed += 1;
            }
        }
    };
    // Everything printed is committed: a record counts as done once it is on stdout.
    let closed = member.close().await;
    match stop {
        Stop::Failed(e) => {
            if let Err(close) = closed {
                eprintln!("warning: leaving group {group} after the error below failed too: {close}");
            }
            Err(e)
        }
        Stop::Done => closed.map_err(|e| anyhow::anyhow!("could not commit and leave group {group} cleanly: {e}")),
    }
}
