//! Partition assignors: how a consumer group's subscribed partitions are spread over its
//! members. The coordinator computes a group's target assignment with the assignor the
//! group uses (chosen by name, per group) whenever membership, subscriptions or the
//! subscribed topics' partition counts change; members then move toward it (revoking
//! first), so an assignor only says where partitions should end up.
//!
//! A custom assignor is a type implementing [`PartitionAssignor`], registered by name with
//! [`Assignors::register`]; `docs/consumer-groups.md` shows one.
//!
//! # Layout
//! - this file: the types every assignor shares, the [`Assignors`] registry and [`check`].
//! - `view.rs`: the group as the built-ins walk it (members in id order, subscribers per
//!   topic), and the spec validation they share.
//! - one file per built-in: `range.rs`, `round_robin.rs`, `sticky.rs` (the default),
//!   `co_partitioned.rs`, `lag_aware.rs`.
//! - `tests.rs`: the registry and [`check`], validity, determinism and balance of every
//!   built-in over random groups; `properties.rs`: what each built-in promises beyond that
//!   (stickiness, co-partitioning, lag balance).
//!
//! # Invariants
//! - Every built-in is deterministic: it walks members, topics and partitions in sorted
//!   order and breaks every tie by member id, so two coordinators given the same spec agree.
//! - Every built-in's output passes [`check`]; debug builds run it on each result.
//! - Input never panics an assignor: a spec it cannot serve is an [`AssignError`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;

mod co_partitioned;
mod lag_aware;
#[cfg(test)]
mod properties;
mod range;
mod round_robin;
mod sticky;
#[cfg(test)]
mod tests;
mod view;

pub use co_partitioned::CoPartitionedAssignor;
pub use lag_aware::LagAwareAssignor;
pub use range::RangeAssignor;
pub use round_robin::RoundRobinAssignor;
pub use sticky::StickyAssignor;

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> TopicPartition {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

/// A member as an assignor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSpec {
    pub member_id: String,
    /// `group.instance.id` of a static member.
    pub instance_id: Option<String>,
    /// The topics it subscribes to that exist (a regex already resolved).
    pub topics: BTreeSet<String>,
    /// Its share of the current target assignment: what a sticky assignor keeps in place.
    pub current: BTreeSet<TopicPartition>,
}

/// Everything an assignor may use.
#[derive(Debug, Clone, Copy)]
pub struct AssignmentSpec<'a> {
    /// Sorted by member id.
    pub members: &'a [MemberSpec],
    /// Every topic some member subscribes to that exists, with its partition count.
    pub topics: &'a BTreeMap<String, u32>,
    /// Current lag per partition (high watermark minus committed offset), where known.
    pub lags: &'a HashMap<TopicPartition, u64>,
}

/// Member id → the partitions it should own. Every member of the spec has an entry (maybe
/// empty); every subscribed partition is given to exactly one member that subscribes to its
/// topic, and no partition to two.
pub type Assignment = BTreeMap<String, BTreeSet<TopicPartition>>;

/// Why an assignor could not assign; reaches the member as FAILED_PRECONDITION.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("assignor '{assignor}': {reason}")]
pub struct AssignError {
    pub assignor: String,
    pub reason: String,
}

/// A strategy for spreading partitions over members. Implementations must be deterministic
/// (the same spec gives the same assignment) and must not block: they run on the
/// coordinator while it holds the group.
pub trait PartitionAssignor: Send + Sync + Debug {
    /// The name groups choose it by.
    fn name(&self) -> &str;
    fn assign(&self, spec: &AssignmentSpec<'_>) -> Result<Assignment, AssignError>;
}

/// The assignor a group gets when its members ask for none.
pub const DEFAULT_ASSIGNOR: &str = "sticky";

/// The assignors a broker knows, by name.
#[derive(Debug, Clone)]
pub struct Assignors {
    by_name: BTreeMap<String, Arc<dyn PartitionAssignor>>,
}

impl Assignors {
    /// The five built-ins: range, round-robin, sticky, co-partitioned and lag-aware.
    pub fn builtin() -> Assignors {
        let mut assignors = Assignors {
            by_name: BTreeMap::new(),
        };
        assignors.register(Arc::new(RangeAssignor));
        assignors.register(Arc::new(RoundRobinAssignor));
        assignors.register(Arc::new(StickyAssignor));
        assignors.register(Arc::new(CoPartitionedAssignor));
        assignors.register(Arc::new(LagAwareAssignor));
        assignors
    }

    /// Adds `assignor` under its name, replacing one already registered under that name (a
    /// built-in included), so a deployment can swap a strategy without renaming it in groups.
    pub fn register(&mut self, assignor: Arc<dyn PartitionAssignor>) {
        self.by_name.insert(assignor.name().to_owned(), assignor);
    }

    pub fn get(&self, name: &str) -> Result<Arc<dyn PartitionAssignor>, UnknownAssignor> {
        self.by_name.get(name).cloned().ok_or_else(|| UnknownAssignor {
            name: name.to_owned(),
            known: self.names(),
        })
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }
}

impl Default for Assignors {
    fn default() -> Assignors {
        Assignors::builtin()
    }
}

/// A group asked for an assignor the broker does not know. The known names travel with it
/// so the member's error says what it could have asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown assignor '{name}'; known: {}", .known.join(", "))]
#[non_exhaustive]
pub struct UnknownAssignor {
    pub name: String,
    /// Sorted.
    pub known: Vec<String>,
}

/// Whether `assignment` is a valid result for `spec`: every member of the spec has an entry
/// and nothing else does; every subscribed partition (its topic in `spec.topics`, below the
/// topic's count, the topic subscribed by some member) is assigned to exactly one member that
/// subscribes to its topic; nothing else is assigned. The error names the first violation.
pub fn check(spec: &AssignmentSpec<'_>, assignment: &Assignment) -> Result<(), String> {
    let members: BTreeMap<&str, &MemberSpec> = spec.members.iter().map(|m| (m.member_id.as_str(), m)).collect();
    if let Some(member) = members.keys().find(|id| !assignment.contains_key(**id)) {
        return Err(format!("member '{member}' has no entry"));
    }
    let mut owners: HashMap<&TopicPartition, &str> = HashMap::new();
    let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
    for (member_id, partitions) in assignment {
        let Some(member) = members.get(member_id.as_str()) else {
            return Err(format!("'{member_id}' has an entry but is not a member"));
        };
        for tp in partitions {
            let Some(&count) = spec.topics.get(&tp.topic) else {
                return Err(format!(
                    "{}-{} is assigned to '{member_id}' but its topic is not in the spec",
                    tp.topic, tp.partition
                ));
            };
            if tp.partition < 0 || i64::from(tp.partition) >= i64::from(count) {
                return Err(format!(
                    "{}-{} is assigned to '{member_id}' but the topic has {count} partitions",
                    tp.topic, tp.partition
                ));
            }
            if !member.topics.contains(&tp.topic) {
                return Err(format!(
                    "{}-{} is assigned to '{member_id}', which does not subscribe to its topic",
                    tp.topic, tp.partition
                ));
            }
            if let Some(other) = owners.insert(tp, member_id) {
                return Err(format!(
                    "{}-{} is assigned to both '{other}' and '{member_id}'",
                    tp.topic, tp.partition
                ));
            }
            *per_topic.entry(tp.topic.as_str()).or_default() += 1;
        }
    }
    let subscribed: BTreeSet<&String> = spec.members.iter().flat_map(|m| &m.topics).collect();
    for (topic, &count) in spec.topics.iter().filter(|(topic, _)| subscribed.contains(topic)) {
        // Every assigned partition was checked to exist above, so equal counts mean none is
        // missing; only a shortfall pays for finding which one.
        let assigned = per_topic.get(topic.as_str()).copied().unwrap_or(0);
        if assigned != u64::from(count) {
            let missing = (0..count)
                .filter_map(|p| i32::try_from(p).ok())
                .find(|&p| !owners.contains_key(&TopicPartition::new(topic.as_str(), p)));
            return Err(match missing {
                Some(p) => format!("{topic}-{p} is subscribed but assigned to no member"),
                None => format!("topic '{topic}' has {count} partitions but {assigned} are assigned"),
            });
        }
    }
    Ok(())
}

/// Hands back a built-in's result, first running [`check`] on it in debug builds: a bug
/// there surfaces as a failed assignment (and a failed test) rather than a crashed
/// coordinator, and release builds do not pay for the check.
fn checked(assignor: &str, spec: &AssignmentSpec<'_>, assignment: Assignment) -> Result<Assignment, AssignError> {
    if cfg!(debug_assertions) {
        check(spec, &assignment).map_err(|reason| AssignError {
            assignor: assignor.to_owned(),
            reason: format!("invalid assignment (a bug in the assignor): {reason}"),
        })?;
    }
    Ok(assignment)
}
