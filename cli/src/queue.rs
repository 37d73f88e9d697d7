//! `conveyor queue create|consume|describe|list|purge-dlq|redrive|delete`: share groups,
//! the queues on the log. Reading as a member is in `queue/consume.rs`, the group settings
//! in `queue/settings.rs`; the rest is administration.

pub(crate) mod consume;
pub(crate) mod settings;

use clap::Subcommand;
use conveyor_client::proto::{ErrorCode, ShareGroupDescription, ShareGroupSettings};
use conveyor_client::{Client, ClientError, ShareGroupListing};
use serde_json::{Value, json};

use crate::output::{self, Format};

pub use consume::QueueConsumeArgs;

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Create a share group on a topic before any member joins
    ///
    /// A group is otherwise created by its first member's join. Creating it first fixes
    /// its settings in one place and, starting at latest (the default), keeps every record
    /// produced from now on for the members that join later. Creating a group that exists
    /// changes nothing when no setting given differs from the group's; one that differs is
    /// refused.
    ///
    /// Examples:
    ///   conveyor queue create orders --group workers
    ///   conveyor queue create orders --group dispatch --ordering key --lock-duration 2m
    #[command(verbatim_doc_comment)]
    Create {
        /// The topic the group consumes.
        topic: String,
        /// The share group id.
        #[arg(long, value_name = "GROUP")]
        group: String,
        #[command(flatten)]
        settings: settings::GroupSettingsArgs,
    },
    // Its help, with examples, is on `QueueConsumeArgs`.
    Consume(QueueConsumeArgs),
    /// Show a share group: settings, records by state per partition, members, dead letters
    ///
    /// Per partition: where the group's window starts (every record below is done), the
    /// records available, acquired (locked to a member), acknowledged, archived (rejected
    /// or dead-lettered) and delayed (released with a delay), the age of the oldest record
    /// not yet acknowledged, and the lag (records of the partition not yet done). Then
    /// each member with the records it holds, and the dead letters.
    Describe {
        /// The share group id.
        group: String,
    },
    /// List every share group of the cluster: its topic, members and coordinator.
    List,
    /// Delete the group's dead-letter topic, and every dead letter in it.
    ///
    /// The topic is created again by the next record the group dead-letters. Refused for a
    /// dead-letter topic the group did not create (one named with --dead-letter-topic that
    /// existed already).
    #[command(name = "purge-dlq")]
    PurgeDlq {
        /// The share group id.
        group: String,
    },
    /// Publish every dead letter back to the group's topic, then delete the dead-letter
    /// topic.
    ///
    /// Each dead letter goes back with its original key, value and headers into the
    /// partition it came from, and is delivered to the group again like a new record. Fix
    /// what made the records fail first. Only letters of this group's topic are published,
    /// and a dead-letter topic the group did not create is refused.
    Redrive {
        /// The share group id.
        group: String,
    },
    /// Delete a share group and its state (what was acknowledged, delivery counts).
    ///
    /// Refused while the group has members: stop its consumers first. The dead-letter
    /// topic stays (`purge-dlq` first to remove it too).
    Delete {
        /// The share group id.
        group: String,
    },
}

pub async fn run(client: &Client, cmd: QueueCommand, format: Format) -> anyhow::Result<()> {
    let shares = client.share_groups();
    match cmd {
        QueueCommand::Create { topic, group, settings } => {
            let config = settings.apply(conveyor_client::ShareConfig::default());
            let answer = shares
                .create(&group, &topic, &config)
                .await
                .map_err(|e| explain(e, &group))?;
            let settings = answer.settings.as_ref();
            match format {
                Format::Json => output::json(&json!({
                    "group": group, "topic": topic, "created": answer.created,
                    "settings": settings_json(settings),
                })),
                Format::Text => {
                    if answer.created {
                        println!("created share group {group} on {topic}");
                    } else {
                        println!("share group {group} exists already, with no setting in conflict; nothing changed");
                    }
                    println!("{}", settings_text(settings));
                }
            }
            Ok(())
        }
        QueueCommand::Consume(args) => consume::run(client, args, format).await,
        QueueCommand::List => {
            print_listing(&shares.list().await?, format);
            Ok(())
        }
        QueueCommand::Describe { group } => {
            let d = shares.describe(&group).await.map_err(|e| explain(e, &group))?;
            match format {
                Format::Json => output::json(&description_json(&d)),
                Format::Text => print_description(&d),
            }
            Ok(())
        }
        QueueCommand::PurgeDlq { group } => {
            let purged = shares
                .purge_dead_letters(&group)
                .await
                .map_err(|e| explain(e, &group))?;
            match format {
                Format::Json => output::json(&json!({"group": group, "purged": purged})),
                Format::Text => println!("purged {purged} dead letter(s) of share group {group}"),
            }
            Ok(())
        }
        QueueCommand::Redrive { group } => {
            let republished = shares.redrive(&group).await.map_err(|e| explain(e, &group))?;
            match format {
                Format::Json => output::json(&json!({"group": group, "republished": republished})),
                Format::Text => {
                    println!("republished {republished} dead letter(s) of share group {group} to its topic")
                }
            }
            Ok(())
        }
        QueueCommand::Delete { group } => {
            shares.delete(&group).await.map_err(|e| explain(e, &group))?;
            match format {
                Format::Json => output::json(&json!({"deleted": group})),
                Format::Text => println!("deleted share group {group}"),
            }
            Ok(())
        }
    }
}

/// The error, with what to do about the refusals people meet here.
pub(crate) fn explain(e: ClientError, group: &str) -> anyhow::Error {
    let hint = match e.code() {
        Some(ErrorCode::GroupNotEmpty) => format!(
            "share group '{group}' has members: stop its consumers first (`conveyor queue describe {group}` lists them), then try again"
        ),
        Some(ErrorCode::UnknownGroup) => {
            format!("there is no share group '{group}' (`conveyor queue list` shows the groups)")
        }
        _ => return e.into(),
    };
    anyhow::Error::new(e).context(hint)
}

fn print_listing(listing: &ShareGroupListing, format: Format) {
    for b in &listing.unreachable {
        eprintln!(
            "warning: broker {} ({}) did not answer, so the share groups it coordinates are missing: {}",
            b.id, b.address, b.error
        );
    }
    if format == Format::Json {
        output::json(&json!({
            "groups": listing.groups.iter().map(|g| json!({
                "group": g.group,
                "topic": g.topic,
                "members": g.members,
                "coordinator": g.coordinator,
            })).collect::<Vec<_>>(),
            "unreachable": listing.unreachable.iter().map(|b| json!({
                "broker": b.id,
                "address": b.address,
                "error": b.error.to_string(),
            })).collect::<Vec<_>>(),
        }));
        return;
    }
    if listing.groups.is_empty() {
        println!("no share groups");
        return;
    }
    let rows: Vec<Vec<String>> = listing
        .groups
        .iter()
        .map(|g| {
            vec![
                g.group.clone(),
                g.topic.clone(),
                g.members.to_string(),
                g.coordinator.to_string(),
            ]
        })
        .collect();
    output::table(&["GROUP", "TOPIC", "MEMBERS", "COORDINATOR"], &rows);
}

fn settings_json(s: Option<&ShareGroupSettings>) -> Value {
    let s = s.cloned().unwrap_or_default();
    json!({
        "ordering": s.ordering,
        "lock_duration_ms": s.lock_duration_ms,
        "max_delivery_count": s.max_delivery_count,
        "max_inflight_records": s.max_inflight_records,
        "auto_offset_reset": s.auto_offset_reset,
        "dead_letter_topic": s.dead_letter_topic,
    })
}

/// The shape scripts rely on; unknown values are null.
fn description_json(d: &ShareGroupDescription) -> Value {
    json!({
        "group": d.group,
        "topic": d.topic,
        "coordinator": d.coordinator,
        "settings": settings_json(d.settings.as_ref()),
        "partitions": d.partitions.iter().map(|p| json!({
            "partition": p.partition,
            "start_offset": p.start_offset,
            "available": p.available,
            "acquired": p.acquired,
            "acknowledged": p.acknowledged,
            "archived": p.archived,
            "delayed": p.delayed,
            "oldest_unacked_ms": p.oldest_unacked_ms,
            "lag": p.lag,
            "log_end_offset": p.log_end_offset,
        })).collect::<Vec<_>>(),
        "members": d.members.iter().map(|m| json!({"id": m.member_id, "acquired": m.acquired})).collect::<Vec<_>>(),
        "dead_letters": d.dead_letters,
        "dead_letters_written": d.dead_letters_written,
    })
}

/// An age for people: `850ms`, `12.5s`, `4m05s`, `2h10m`; `-` for none.
fn age(ms: u64) -> String {
    match ms {
        0 => "-".into(),
        1..1_000 => format!("{ms}ms"),
        1_000..60_000 if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

fn settings_text(s: Option<&ShareGroupSettings>) -> String {
    let Some(s) = s else { return "settings unknown".into() };
    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let n = |v: Option<u32>| v.map_or_else(|| "-".into(), |v| v.to_string());
    format!(
        "ordering {}, lock {}, max deliveries {}, max in flight {} per partition, new partitions start at {}, dead letters to {}",
        or(&s.ordering),
        s.lock_duration_ms.map_or_else(|| "-".into(), |ms| age(u64::from(ms))),
        n(s.max_delivery_count),
        n(s.max_inflight_records),
        or(&s.auto_offset_reset),
        or(&s.dead_letter_topic),
    )
}

fn print_description(d: &ShareGroupDescription) {
    println!(
        "share group {}  topic {}  coordinator {}",
        d.group, d.topic, d.coordinator
    );
    println!("{}", settings_text(d.settings.as_ref()));
    println!();
    if d.partitions.is_empty() {
        println!("no partitions tracked yet");
    } else {
        let optional = |v: Option<u64>| v.map_or_else(|| "-".into(), |v| v.to_string());
        let rows: Vec<Vec<String>> = d
            .partitions
            .iter()
            .map(|p| {
                vec![
                    p.partition.to_string(),
                    p.start_offset.to_string(),
                    p.available.to_string(),
                    p.acquired.to_string(),
                    p.acknowledged.to_string(),
                    p.archived.to_string(),
                    p.delayed.to_string(),
                    age(p.oldest_unacked_ms),
                    optional(p.lag),
                ]
            })
            .collect();
        output::table(
            &[
                "PARTITION",
                "START OFFSET",
                "AVAILABLE",
                "ACQUIRED",
                "ACKNOWLEDGED",
                "ARCHIVED",
                "DELAYED",
                "OLDEST UNACKED",
                "LAG",
            ],
            &rows,
        );
    }
    println!();
    if d.members.is_empty() {
        println!("no members");
    } else {
        let rows: Vec<Vec<String>> = d
            .members
            .iter()
            .map(|m| vec![m.member_id.clone(), m.acquired.to_string()])
            .collect();
        output::table(&["MEMBER ID", "ACQUIRED"], &rows);
    }
    println!();
    let dlq = d
        .settings
        .as_ref()
        .and_then(|s| s.dead_letter_topic.clone())
        .unwrap_or_else(|| "the dead-letter topic".into());
    match d.dead_letters {
        Some(n) => println!(
            "dead letters: {n} in {dlq} ({} written since the group began)",
            d.dead_letters_written
        ),
        None => println!(
            "dead letters: {dlq} does not exist or did not answer ({} written since the group began)",
            d.dead_letters_written
        ),
    }
}

#[cfg(test)]
mod tests {
    use conveyor_client::proto::{ShareMemberDescription, SharePartitionState};

    use super::*;

    #[test]
    fn describe_json_has_exactly_the_documented_shape_with_null_for_unknown_values() {
        let d = ShareGroupDescription {
            group: "workers".into(),
            topic: "orders".into(),
            settings: Some(ShareGroupSettings {
                ordering: Some("key".into()),
                lock_duration_ms: Some(30_000),
                ..ShareGroupSettings::default()
            }),
            coordinator: 2,
            members: vec![ShareMemberDescription {
                member_id: "s-1".into(),
                acquired: 4,
            }],
            partitions: vec![SharePartitionState {
                partition: 0,
                start_offset: 10,
                available: 5,
                acquired: 4,
                acknowledged: 3,
                archived: 1,
                delayed: 0,
                oldest_unacked_ms: 1500,
                lag: None,
                log_end_offset: Some(30),
            }],
            dead_letters: None,
            dead_letters_written: 7,
        };
        assert_eq!(
            description_json(&d),
            json!({
                "group": "workers", "topic": "orders", "coordinator": 2,
                "settings": {"ordering": "key", "lock_duration_ms": 30000, "max_delivery_count": null,
                             "max_inflight_records": null, "auto_offset_reset": null, "dead_letter_topic": null},
                "partitions": [{"partition": 0, "start_offset": 10, "available": 5, "acquired": 4, "acknowledged": 3,
                                "archived": 1, "delayed": 0, "oldest_unacked_ms": 1500, "lag": null, "log_end_offset": 30}],
                "members": [{"id": "s-1", "acquired": 4}],
                "dead_letters": null,
                "dead_letters_written": 7,
            })
        );
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        queue: QueueCommand,
    }

    #[test]
    fn administration_commands_take_the_group_and_are_named_as_documented() {
        use clap::Parser;
        let parse = |args: &[&str]| Cli::try_parse_from(std::iter::once("queue").chain(args.iter().copied()));
        assert!(matches!(
            parse(&["purge-dlq", "workers"]).expect("purge-dlq").queue,
            QueueCommand::PurgeDlq { group } if group == "workers"
        ));
        assert!(matches!(
            parse(&["redrive", "workers"]).expect("redrive").queue,
            QueueCommand::Redrive { .. }
        ));
        assert!(parse(&["describe"]).is_err(), "a group is required");
        let QueueCommand::Consume(c) = parse(&["consume", "orders", "--group", "w", "--ack", "reject"])
            .expect("consume")
            .queue
        else {
            panic!("consume")
        };
        assert_eq!((c.topic.as_str(), c.group.as_str()), ("orders", "w"));
        assert!(parse(&["consume", "orders"]).is_err(), "--group is required");
    }

    #[test]
    fn ages_read_in_the_unit_that_fits() {
        assert_eq!(age(0), "-");
        assert_eq!(age(850), "850ms");
        assert_eq!(age(12_500), "12.5s");
        assert_eq!(age(30_000), "30s");
        assert_eq!(age(245_000), "4m05s");
        assert_eq!(age(7_800_000), "2h10m");
    }
}
