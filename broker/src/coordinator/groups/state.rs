//! The group coordinator's state for one `__consumer_offsets` partition: every group that
//! hashes to it, rebuilt from its records ([`GroupsState::apply`]). Sessions (when a member
//! was last heard from) are memory only: a new coordinator starts every member's session
//! afresh, since it cannot know how long the old one heard nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use conveyor_proto::internal::v1::{GroupMemberValue, GroupMetadataValue, GroupPartition, OffsetCommitValue};
use prost::Message;

use super::assignor::TopicPartition;
use super::records::Key;
use crate::coordinator::{Change, StateMachine};

/// One group, as its records say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    /// Absent for a group that only has committed offsets (no member ever joined, or its
    /// metadata was deleted).
    pub meta: Option<GroupMetadataValue>,
    pub members: BTreeMap<String, GroupMemberValue>,
    pub offsets: BTreeMap<TopicPartition, OffsetCommitValue>,
}

impl Group {
    pub fn is_empty(&self) -> bool {
        self.meta.is_none() && self.members.is_empty() && self.offsets.is_empty()
    }

    pub fn epoch(&self) -> i32 {
        self.meta.as_ref().map_or(0, |m| m.epoch)
    }

    /// The state as `group describe` shows it.
    pub fn state(&self) -> &'static str {
        let Some(meta) = &self.meta else {
            return "empty";
        };
        if self.members.is_empty() {
            "empty"
        } else if meta.assignment_epoch < meta.epoch {
            "assigning"
        } else if self.members.values().any(|m| !at_target(m, meta.assignment_epoch)) {
            "reconciling"
        } else {
            "stable"
        }
    }

    /// Partition → the member that owns it (assigned, or revoked but not yet given up).
    pub fn owners(&self) -> HashMap<TopicPartition, &str> {
        let mut owners = HashMap::new();
        for (id, m) in &self.members {
            for p in m.assigned.iter().chain(&m.pending_revocation) {
                owners.insert(tp(p), id.as_str());
            }
        }
        owners
    }

    /// The records that turn `self` into `new` (group metadata and members; offsets are
    /// written by commits directly).
    pub fn changes_to(&self, group: &str, new: &Group) -> Vec<Change> {
        let mut changes = Vec::new();
        if self.meta != new.meta {
            changes.push(Change {
                key: Key::Group(group.to_string()).encode(),
                value: new.meta.as_ref().map(|m| m.encode_to_vec().into()),
            });
        }
        for (id, m) in &new.members {
            if self.members.get(id) != Some(m) {
                changes.push(member_change(group, id, Some(m)));
            }
        }
        for id in self.members.keys() {
            if !new.members.contains_key(id) {
                changes.push(member_change(group, id, None));
            }
        }
        changes
    }
}

pub fn member_change(group: &str, member: &str, value: Option<&GroupMemberValue>) -> Change {
    Change {
        key: Key::Member {
            group: group.to_string(),
            member: member.to_string(),
        }
        .encode(),
        value: value.map(|m| m.encode_to_vec().into()),
    }
}

pub fn offset_change(group: &str, p: &TopicPartition, value: Option<&OffsetCommitValue>) -> Change {
    Change {
        key: Key::Offset {
            group: group.to_string(),
            topic: p.topic.clone(),
            partition: p.partition,
        }
        .encode(),
        value: value.map(|v| v.encode_to_vec().into()),
    }
}

/// Whether a member owns exactly its target, at the assignment's epoch, revoking nothing.
pub fn at_target(m: &GroupMemberValue, assignment_epoch: i32) -> bool {
    m.member_epoch == assignment_epoch && m.pending_revocation.is_empty() && same(&m.assigned, &m.target)
}

/// Whether two partition lists name the same partitions (epochs aside). Both are kept
/// sorted, so no set is built: this runs for every heartbeat.
pub fn same(a: &[GroupPartition], b: &[GroupPartition]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.partition == y.partition && x.topic == y.topic)
}

/// Whether a sorted partition list names exactly the partitions of `owned`.
pub fn same_as(a: &[GroupPartition], owned: &BTreeSet<TopicPartition>) -> bool {
    a.len() == owned.len()
        && a.iter()
            .zip(owned)
            .all(|(x, y)| x.partition == y.partition && x.topic == y.topic)
}

pub fn tp(p: &GroupPartition) -> TopicPartition {
    TopicPartition::new(p.topic.clone(), p.partition)
}

pub fn set(ps: &[GroupPartition]) -> BTreeSet<TopicPartition> {
    ps.iter().map(tp).collect()
}

/// When a member was last heard from, since when it has been asked to give up partitions,
/// and the timeouts it joined with (kept here so that checking sessions reads nothing else).
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub last_seen: Instant,
    pub revoking_since: Option<Instant>,
    pub session_timeout: std::time::Duration,
    pub rebalance_timeout: std::time::Duration,
}

impl Session {
    pub fn of(m: &GroupMemberValue, now: Instant) -> Session {
        Session {
            last_seen: now,
            revoking_since: (!m.pending_revocation.is_empty()).then_some(now),
            session_timeout: std::time::Duration::from_millis(u64::from(m.session_timeout_ms)),
            rebalance_timeout: std::time::Duration::from_millis(u64::from(m.rebalance_timeout_ms)),
        }
    }

    /// Whether the member missed its session or rebalance timeout by `now`.
    pub fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_seen) > self.session_timeout
            || self
                .revoking_since
                .is_some_and(|since| now.saturating_duration_since(since) > self.rebalance_timeout)
    }
}

/// Every group of one `__consumer_offsets` partition.
#[derive(Debug, Default)]
pub struct GroupsState {
    pub groups: BTreeMap<String, Group>,
    /// Group → member → session (looked up by `&str`, with no key built per lookup).
    pub sessions: HashMap<String, HashMap<String, Session>>,
    /// When each group's epoch last moved here (memory only; entries older than the
    /// settle window are dropped by the timers).
    pub epoch_moved: HashMap<String, Instant>,
}

impl GroupsState {
    /// Whether `group`'s epoch moved less than `window` ago.
    pub fn settling(&self, group: &str, now: Instant, window: std::time::Duration) -> bool {
        self.epoch_moved
            .get(group)
            .is_some_and(|at| now.saturating_duration_since(*at) < window)
    }
}

impl GroupsState {
    /// Notes a heartbeat from a member whose state did not change; false if it has no
    /// session (then the caller takes the path that records one).
    pub fn touch(&mut self, group: &str, member: &str, now: Instant) -> bool {
        match self.sessions.get_mut(group).and_then(|m| m.get_mut(member)) {
            Some(s) => {
                s.last_seen = now;
                true
            }
            None => false,
        }
    }

    /// Notes a heartbeat from member `m`, taking its timeouts and whether it is revoking.
    pub fn track(&mut self, group: &str, member: &str, m: &GroupMemberValue, now: Instant) {
        let members = self.sessions.entry(group.to_string()).or_default();
        let session = members.entry(member.to_string()).or_insert_with(|| Session::of(m, now));
        let revoking_since = session.revoking_since;
        *session = Session::of(m, now);
        if session.revoking_since.is_some() {
            session.revoking_since = revoking_since.or(Some(now));
        }
    }

    pub fn session_of(&self, group: &str, member: &str) -> Option<&Session> {
        self.sessions.get(group)?.get(member)
    }
}

impl StateMachine for GroupsState {
    fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let key = Key::decode(key)?;
        let name = key.group().to_string();
        let group = self.groups.entry(name.clone()).or_default();
        let bad = |e: prost::DecodeError| format!("group '{name}': {e}");
        match (key, value) {
            (Key::Group(_), Some(v)) => group.meta = Some(GroupMetadataValue::decode(v).map_err(bad)?),
            (Key::Group(_), None) => group.meta = None,
            (Key::Member { member, .. }, Some(v)) => {
                group.members.insert(member, GroupMemberValue::decode(v).map_err(bad)?);
            }
            (Key::Member { member, .. }, None) => {
                group.members.remove(&member);
                if let Some(members) = self.sessions.get_mut(&name) {
                    members.remove(&member);
                    if members.is_empty() {
                        self.sessions.remove(&name);
                    }
                }
            }
            (Key::Offset { topic, partition, .. }, Some(v)) => {
                group.offsets.insert(
                    TopicPartition::new(topic, partition),
                    OffsetCommitValue::decode(v).map_err(bad)?,
                );
            }
            (Key::Offset { topic, partition, .. }, None) => {
                group.offsets.remove(&TopicPartition::new(topic, partition));
            }
        }
        if self.groups.get(&name).is_some_and(Group::is_empty) {
            self.groups.remove(&name);
        }
        Ok(())
    }

    fn loaded(&mut self, now: Instant) {
        self.sessions.clear();
        for (name, group) in &self.groups {
            let members = group
                .members
                .iter()
                .map(|(id, m)| (id.clone(), Session::of(m, now)))
                .collect();
            self.sessions.insert(name.clone(), members);
        }
    }
}
