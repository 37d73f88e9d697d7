//! `conveyor group list|describe|reset-offsets|delete`: consumer group administration.
//! (Joining a group to read: `conveyor consume TOPIC --group G`, in `consume.rs`.)

use clap::{ArgGroup, Args, Subcommand};
use conveyor_client::proto::{ErrorCode, GroupDescription, TopicPartitions};
use conveyor_client::{Client, ClientError, GroupListing, StartAt};
use serde_json::{Value, json};

use crate::output::{self, Format};

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List every consumer group of the cluster: state, members, assignor, coordinator.
    List,
    /// Show a group: its state and assignor, its members with their partitions, and per
    /// partition the committed offset, log end offset and lag.
    Describe {
        /// The group id.
        group: String,
    },
    // Its help, with examples, is on `ResetArgs`.
    ResetOffsets(ResetArgs),
    /// Delete a group and its committed offsets. Refused while the group has members.
    Delete {
        /// The group id.
        group: String,
    },
}

/// Move a group's committed offsets of one topic
///
/// The group must have no members: stop its consumers first (`conveyor group describe G`
/// lists them). Every partition of the topic moves, or only those given with --partition.
/// Prints each partition's new committed offset; with --dry-run, computes them and commits
/// nothing.
///
/// Examples:
///   conveyor group reset-offsets billing --topic orders --to-earliest
///   conveyor group reset-offsets billing --topic orders --to-time -1h --dry-run
///   conveyor group reset-offsets billing --topic orders --to-time 2026-12-01T09:00:00Z
///   conveyor group reset-offsets billing --topic orders --partition 2 --to-offset 1500
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
#[command(group(ArgGroup::new("target").required(true).args(["to_earliest", "to_latest", "to_offset", "to_time"])))]
pub struct ResetArgs {
    /// The group id.
    pub group: String,
    /// The topic whose offsets move.
    #[arg(long)]
    pub topic: String,
    /// Only this partition (repeatable; default: every partition of the topic).
    #[arg(long = "partition", value_name = "P")]
    pub partitions: Vec<i32>,
    /// To the first offset still in the log.
    #[arg(long)]
    pub to_earliest: bool,
    /// To the end of the log: the group skips everything written so far.
    #[arg(long)]
    pub to_latest: bool,
    /// To this offset.
    #[arg(long, value_name = "OFFSET")]
    pub to_offset: Option<u64>,
    /// To the first record at or after TIME: an RFC 3339 time with its offset
    /// (2026-12-01T10:00:00+01:00, 2026-12-01T09:00:00Z), relative to now (-1h, 90s ago),
    /// or milliseconds since the epoch.
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, value_parser = crate::time::parse_time)]
    pub to_time: Option<i64>,
    /// Show the new offsets without committing them.
    #[arg(long)]
    pub dry_run: bool,
}

impl ResetArgs {
    fn target(&self) -> StartAt {
        match (self.to_earliest, self.to_latest, self.to_offset, self.to_time) {
            (true, ..) => StartAt::Earliest,
            (_, true, ..) => StartAt::Latest,
            (_, _, Some(offset), _) => StartAt::Offset(offset),
            (_, _, _, Some(time)) => StartAt::Timestamp(time),
            // clap requires one of them.
            _ => StartAt::Latest,
        }
    }
}

pub async fn run(client: &Client, cmd: GroupCommand, format: Format) -> anyhow::Result<()> {
    let groups = client.groups();
    match cmd {
        GroupCommand::List => print_listing(&groups.list_groups().await?, format),
        GroupCommand::Describe { group } => {
            let description = groups.describe_group(&group).await.map_err(|e| explain(e, &group))?;
            match format {
                Format::Json => output::json(&description_json(&description)),
                Format::Text => print_description(&description),
            }
        }
        GroupCommand::ResetOffsets(args) => {
            let offsets = groups
                .reset_offsets(&args.group, &args.topic, &args.partitions, args.target(), args.dry_run)
                .await
                .map_err(|e| explain(e, &args.group))?;
            match format {
                Format::Json => output::json(&json!({
                    "group": args.group,
                    "topic": args.topic,
                    "dry_run": args.dry_run,
                    "offsets": offsets.iter().map(|o| json!({"topic": o.topic, "partition": o.partition, "offset": o.offset})).collect::<Vec<_>>(),
                })),
                Format::Text => {
                    let rows: Vec<Vec<String>> = offsets
                        .iter()
                        .map(|o| vec![o.topic.clone(), o.partition.to_string(), o.offset.to_string()])
                        .collect();
                    output::table(&["TOPIC", "PARTITION", "NEW OFFSET"], &rows);
                    if args.dry_run {
                        println!("dry run: nothing committed");
                    } else {
                        println!(
                            "group {} now starts topic {} at these offsets ({} partition(s))",
                            args.group,
                            args.topic,
                            offsets.len()
                        );
                    }
                }
            }
        }
        GroupCommand::Delete { group } => {
            groups.delete_group(&group).await.map_err(|e| explain(e, &group))?;
            match format {
                Format::Json => output::json(&json!({"deleted": group})),
                Format::Text => println!("deleted group {group}"),
            }
        }
    }
    Ok(())
}

/// The error, with what to do about the refusals people meet here.
fn explain(e: ClientError, group: &str) -> anyhow::Error {
    let hint = match e.code() {
        Some(ErrorCode::GroupNotEmpty) => format!(
            "group '{group}' has members: stop its consumers first (`conveyor group describe {group}` lists them; a static member's place is kept for its session timeout), then try again"
        ),
        Some(ErrorCode::UnknownGroup) => {
            format!("there is no consumer group '{group}' (`conveyor group list` shows the groups)")
        }
        _ => return e.into(),
    };
    anyhow::Error::new(e).context(hint)
}

fn print_listing(listing: &GroupListing, format: Format) {
    for b in &listing.unreachable {
        eprintln!(
            "warning: broker {} ({}) did not answer, so the groups it coordinates are missing: {}",
            b.id, b.address, b.error
        );
    }
    if format == Format::Json {
        output::json(&json!({
            "groups": listing.groups.iter().map(|g| json!({
                "group": g.group,
                "state": g.state,
                "members": g.members,
                "assignor": non_empty(&g.assignor),
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
        println!("no consumer groups");
        return;
    }
    let rows: Vec<Vec<String>> = listing
        .groups
        .iter()
        .map(|g| {
            vec![
                g.group.clone(),
                dash(&g.state),
                g.members.to_string(),
                dash(&g.assignor),
                g.coordinator.to_string(),
            ]
        })
        .collect();
    output::table(&["GROUP", "STATE", "MEMBERS", "ASSIGNOR", "COORDINATOR"], &rows);
}

fn non_empty(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_string() }
}

fn optional(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// `orders[0,1] payments[3]`.
fn partitions_text(topics: &[TopicPartitions]) -> String {
    if topics.iter().all(|t| t.partitions.is_empty()) {
        return "-".into();
    }
    topics
        .iter()
        .filter(|t| !t.partitions.is_empty())
        .map(|t| {
            let partitions: Vec<String> = t.partitions.iter().map(i32::to_string).collect();
            format!("{}[{}]", t.topic, partitions.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The shape scripts rely on; unknown values are null.
fn description_json(d: &GroupDescription) -> Value {
    json!({
        "group": d.group,
        "state": non_empty(&d.state),
        "assignor": non_empty(&d.assignor),
        "members": d.members.iter().map(|m| json!({
            "id": m.member_id,
            "instance_id": non_empty(&m.instance_id),
            "assignment": m.assignment.iter().flat_map(|t| t.partitions.iter().map(move |p| json!({"topic": t.topic, "partition": p}))).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "partitions": d.partitions.iter().map(|p| json!({
            "topic": p.topic,
            "partition": p.partition,
            "committed": p.committed,
            "log_end_offset": p.log_end_offset,
            "lag": p.lag,
        })).collect::<Vec<_>>(),
    })
}

fn print_description(d: &GroupDescription) {
    println!(
        "group {}  state {}  assignor {}  epoch {}  coordinator {}",
        d.group,
        dash(&d.state),
        dash(&d.assignor),
        d.group_epoch,
        d.coordinator
    );
    if d.state == "dead" {
        println!("no such group: it has no members and no committed offsets (`conveyor group list` shows the groups)");
        return;
    }
    println!();
    if d.members.is_empty() {
        println!("no members");
    } else {
        let revoking = d.members.iter().any(|m| !m.pending_revocation.is_empty());
        let rows: Vec<Vec<String>> = d
            .members
            .iter()
            .map(|m| {
                let mut row = vec![
                    m.member_id.clone(),
                    dash(&m.instance_id),
                    m.member_epoch.to_string(),
                    partitions_text(&m.assignment),
                ];
                if revoking {
                    row.push(partitions_text(&m.pending_revocation));
                }
                row
            })
            .collect();
        let headers = ["MEMBER ID", "INSTANCE ID", "EPOCH", "ASSIGNMENT", "BEING REVOKED"];
        output::table(&headers[..if revoking { 5 } else { 4 }], &rows);
    }
    if d.partitions.is_empty() {
        return;
    }
    println!();
    let rows: Vec<Vec<String>> = d
        .partitions
        .iter()
        .map(|p| {
            vec![
                p.topic.clone(),
                p.partition.to_string(),
                optional(p.committed),
                optional(p.log_end_offset),
                optional(p.lag),
                dash(&p.member_id),
            ]
        })
        .collect();
    output::table(&["TOPIC", "PARTITION", "COMMITTED", "LOG END", "LAG", "MEMBER"], &rows);
}

#[cfg(test)]
mod tests {
    use conveyor_client::proto::{MemberDescription, PartitionLag};

    use super::*;

    #[test]
    fn describe_json_has_exactly_the_documented_shape_with_null_for_unknown_values() {
        let d = GroupDescription {
            group: "billing".into(),
            state: "stable".into(),
            assignor: String::new(),
            group_epoch: 4,
            coordinator: 2,
            members: vec![MemberDescription {
                member_id: "m-1".into(),
                instance_id: String::new(),
                member_epoch: 4,
                assignment: vec![TopicPartitions {
                    topic: "orders".into(),
                    partitions: vec![0, 1],
                }],
                ..MemberDescription::default()
            }],
            partitions: vec![
                PartitionLag {
                    topic: "orders".into(),
                    partition: 0,
                    committed: Some(10),
                    log_end_offset: Some(15),
                    lag: Some(5),
                    member_id: "m-1".into(),
                },
                PartitionLag {
                    topic: "orders".into(),
                    partition: 1,
                    committed: None,
                    log_end_offset: None,
                    lag: None,
                    member_id: "m-1".into(),
                },
            ],
            ..GroupDescription::default()
        };
        assert_eq!(
            description_json(&d),
            json!({
                "group": "billing",
                "state": "stable",
                "assignor": null,
                "members": [{"id": "m-1", "instance_id": null, "assignment": [
                    {"topic": "orders", "partition": 0}, {"topic": "orders", "partition": 1}
                ]}],
                "partitions": [
                    {"topic": "orders", "partition": 0, "committed": 10, "log_end_offset": 15, "lag": 5},
                    {"topic": "orders", "partition": 1, "committed": null, "log_end_offset": null, "lag": null}
                ]
            })
        );
    }

    #[test]
    fn assignments_print_as_topics_with_their_partitions() {
        let topics = [
            TopicPartitions {
                topic: "orders".into(),
                partitions: vec![0, 1],
            },
            TopicPartitions {
                topic: "payments".into(),
                partitions: vec![3],
            },
        ];
        assert_eq!(partitions_text(&topics), "orders[0,1] payments[3]");
        assert_eq!(partitions_text(&[]), "-");
    }
}
