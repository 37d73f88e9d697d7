//! Subscriptions and target assignments: which existing topics a group's members subscribe
//! to, and where the group's assignor says their partitions should go.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use conveyor_proto::internal::v1::{GroupMemberValue, GroupPartition};
use regex::Regex;

use super::assignor::{AssignError, Assignors, DEFAULT_ASSIGNOR, MemberSpec, TopicPartition};
use super::state::{Group, set};
use crate::coordinator::internal_topic::is_internal;
use crate::error::{BrokerError, Result};

/// Longest subscription regex accepted.
pub const MAX_REGEX_LEN: usize = 1024;
/// Most compiled-program bytes a subscription regex may take (a pattern past it, such as a
/// long repetition of a Unicode class, is refused as invalid).
const REGEX_SIZE_LIMIT: usize = 64 << 10;

/// Topic name → partition count, as this broker's metadata says now.
pub type Topics = BTreeMap<String, u32>;

pub fn topics_now(registry: &crate::controller::Registry) -> Topics {
    registry
        .list()
        .iter()
        .map(|t| (t.name.clone(), t.partition_count() as u32))
        .collect()
}

/// Most compiled subscription regexes kept (at most [`REGEX_SIZE_LIMIT`] each, 16 MiB in
/// all); the cache is emptied when it fills.
const REGEX_CACHE: usize = 256;

/// Compiled subscription regexes by their text: a regex group's subscriptions are resolved
/// at every heartbeat that changes something, and compiling is far dearer than matching.
static COMPILED: std::sync::LazyLock<std::sync::Mutex<HashMap<String, Regex>>> =
    std::sync::LazyLock::new(Default::default);

/// [`compile`], from the cache when it was compiled before.
fn compiled(regex: &str) -> Result<Regex> {
    let mut cache = COMPILED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(re) = cache.get(regex) {
        return Ok(re.clone());
    }
    let re = compile(regex)?;
    if cache.len() >= REGEX_CACHE {
        cache.clear();
    }
    cache.insert(regex.to_string(), re.clone());
    Ok(re)
}

/// A subscription regex, matched against whole topic names.
pub fn compile(regex: &str) -> Result<Regex> {
    if regex.len() > MAX_REGEX_LEN {
        return Err(BrokerError::InvalidRequest(format!(
            "subscription regex is {} bytes long; at most {MAX_REGEX_LEN}",
            regex.len()
        )));
    }
    regex::RegexBuilder::new(&format!("^(?:{regex})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| BrokerError::InvalidRequest(format!("subscription regex '{regex}' is invalid: {e}")))
}

/// The existing topics a member subscribes to. Internal topics match no regex.
pub fn member_topics(m: &GroupMemberValue, topics: &Topics) -> BTreeSet<String> {
    if !m.regex.is_empty() {
        let Ok(re) = compiled(&m.regex) else {
            return BTreeSet::new();
        };
        return topics
            .keys()
            .filter(|t| !is_internal(t) && re.is_match(t))
            .cloned()
            .collect();
    }
    m.topics.iter().filter(|t| topics.contains_key(*t)).cloned().collect()
}

/// Every subscribed topic that exists, with its partition count: what the group's
/// assignment depends on, kept in its metadata so a change is noticed.
pub fn subscribed(group: &Group, topics: &Topics) -> BTreeMap<String, i32> {
    let mut out = BTreeMap::new();
    for m in group.members.values() {
        for t in member_topics(m, topics) {
            let count = topics.get(&t).copied().unwrap_or(0);
            out.insert(t, count as i32);
        }
    }
    out
}

/// The assignor the group uses: the one most members ask for (ties: the first by name).
pub fn chosen_assignor(group: &Group) -> String {
    let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
    for m in group.members.values() {
        let name = if m.assignor.is_empty() {
            DEFAULT_ASSIGNOR
        } else {
            &m.assignor
        };
        *votes.entry(name).or_default() += 1;
    }
    let most = votes.values().copied().max().unwrap_or(0);
    votes
        .into_iter()
        .find(|(_, n)| *n == most)
        .map_or_else(|| DEFAULT_ASSIGNOR.to_string(), |(name, _)| name.to_string())
}

/// Computes the group's target assignment for its current epoch, into each member's
/// `target`, and moves `assignment_epoch` up to the epoch.
pub fn assign(
    group: &mut Group,
    topics: &Topics,
    assignors: &Assignors,
    lags: &HashMap<TopicPartition, u64>,
) -> std::result::Result<(), AssignError> {
    let name = chosen_assignor(group);
    let assignor = assignors.get(&name).map_err(|e| AssignError {
        assignor: name.clone(),
        reason: e.to_string(),
    })?;
    let members: Vec<MemberSpec> = group
        .members
        .iter()
        .map(|(id, m)| MemberSpec {
            member_id: id.clone(),
            instance_id: (!m.instance_id.is_empty()).then(|| m.instance_id.clone()),
            topics: member_topics(m, topics),
            current: set(&m.target),
        })
        .collect();
    let subscribed: BTreeMap<String, u32> = members
        .iter()
        .flat_map(|m| m.topics.iter())
        .filter_map(|t| topics.get(t).map(|c| (t.clone(), *c)))
        .collect();
    let spec = super::assignor::AssignmentSpec {
        members: &members,
        topics: &subscribed,
        lags,
    };
    let mut assignment = assignor.assign(&spec)?;
    for (id, m) in group.members.iter_mut() {
        let target = assignment.remove(id).unwrap_or_default();
        m.target = target
            .into_iter()
            .map(|p| GroupPartition {
                topic: p.topic,
                partition: p.partition,
                epoch: 0,
            })
            .collect();
    }
    if let Some(meta) = group.meta.as_mut() {
        meta.assignment_epoch = meta.epoch;
        meta.assignor = name;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_subscription_regexes_compile_and_match_whole_names() {
        let re = compile("orders-.*").expect("orders-.*");
        assert!(re.is_match("orders-eu"));
        assert!(!re.is_match("old-orders-eu"), "a whole-name match");
        assert!(compile("[^_].*|\\w+").is_ok());
        let huge = compile("(?:\\w{100}){100}");
        assert!(huge.is_err(), "a pattern past the size limit is refused");
        assert!(compile("(").is_err());
        assert!(compile(&"a".repeat(MAX_REGEX_LEN + 1)).is_err());
    }
}
