//! `conveyor consume TOPIC`: print records, then stop at the end of the log (or follow it).

use std::collections::HashMap;
use std::io::Write;

use base64::Engine;
use bytes::Bytes;
use clap::Args;
use conveyor_client::{Client, ConsumerConfig, ConsumerRecord, OffsetSpec, StartAt};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::output::Format;

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    pub topic: String,
    /// Read only this partition (default: all).
    #[arg(long)]
    pub partition: Option<i32>,
    /// Start at the first record still in the log (default: only new records).
    #[arg(long, conflicts_with_all = ["offset", "from_time"])]
    pub from_beginning: bool,
    /// Start at this offset (with --partition, or in every partition).
    #[arg(long, conflicts_with = "from_time")]
    pub offset: Option<u64>,
    /// Start at the first record at or after TIME: an RFC 3339 time with its offset
    /// (2026-12-01T10:00:00+01:00, 2026-12-01T09:00:00Z), relative to now (-1h, 90s ago),
    /// or milliseconds since the epoch.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, value_parser = crate::time::parse_time)]
    pub from_time: Option<i64>,
    /// Stop after this many records.
    #[arg(long)]
    pub max_records: Option<u64>,
    /// Keep waiting for new records instead of stopping at the end of the log.
    #[arg(long)]
    pub follow: bool,
    /// Print keys as well as values (text output).
    #[arg(long)]
    pub print_key: bool,
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

fn record_json(r: &ConsumerRecord) -> Value {
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

pub async fn run(client: &Client, args: ConsumeArgs, format: Format) -> anyhow::Result<()> {
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
        match format {
            Format::Json => writeln!(out, "{}", record_json(&record))?,
            Format::Text => {
                let value = record.value.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                if args.print_key {
                    let key = record.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                    writeln!(out, "{key}\t{value}")?;
                } else {
                    writeln!(out, "{value}")?;
                }
            }
        }
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
