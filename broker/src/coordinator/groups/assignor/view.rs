//! The group as the built-in assignors walk it: members in member-id order, each subscribed
//! topic with its partition count and subscribers, and the checks on the spec that every
//! built-in needs (duplicate member ids, partition counts a partition id cannot address).
//!
//! Members and topics are referred to by index (a member's rank in id order, a topic's rank
//! in name order) so assignors keep their state in vectors and order it by plain integers:
//! fast, and deterministic because index order is id order.
//!
//! # Invariants
//! - `topics` holds only topics of the spec that some member subscribes to; a member's
//!   subscription to a topic missing from the spec is ignored.
//! - `members[m].topics` restricted to the spec is exactly `member_topics[m]`, ascending, and
//!   `m` is in `topics[t].subscribers` (ascending) exactly when `t` is in `member_topics[m]`.

use std::collections::BTreeSet;

use super::{AssignError, Assignment, AssignmentSpec, MemberSpec, TopicPartition};

/// A partition as the built-ins handle it: (topic index, partition id).
pub(super) type Slot = (usize, i32);

#[derive(Debug)]
pub(super) struct TopicView<'a> {
    pub name: &'a str,
    /// Never negative: it comes from a `u32` that fits an `i32`.
    pub partitions: i32,
    /// Member indexes, ascending.
    pub subscribers: Vec<usize>,
}

impl TopicView<'_> {
    pub fn len(&self) -> usize {
        usize::try_from(self.partitions).unwrap_or(0)
    }
}

#[derive(Debug)]
pub(super) struct GroupView<'a> {
    pub members: Vec<&'a MemberSpec>,
    pub topics: Vec<TopicView<'a>>,
    /// Per member, the indexes of the topics it subscribes to, ascending.
    pub member_topics: Vec<Vec<usize>>,
}

impl<'a> GroupView<'a> {
    pub fn new(assignor: &str, spec: &AssignmentSpec<'a>) -> Result<GroupView<'a>, AssignError> {
        let mut members: Vec<&MemberSpec> = spec.members.iter().collect();
        // The spec promises id order; sorting anyway costs little and keeps a caller's slip
        // from turning into two coordinators disagreeing.
        members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
        if let Some(pair) = members.windows(2).find(|pair| pair[0].member_id == pair[1].member_id) {
            return Err(fail(
                assignor,
                format!("member id '{}' appears twice", pair[0].member_id),
            ));
        }
        let subscribed: BTreeSet<&str> = members
            .iter()
            .flat_map(|m| m.topics.iter().map(String::as_str))
            .collect();
        let mut topics = Vec::new();
        for (name, &count) in spec
            .topics
            .iter()
            .filter(|(name, _)| subscribed.contains(name.as_str()))
        {
            let partitions = i32::try_from(count).map_err(|_| {
                fail(
                    assignor,
                    format!("topic '{name}' has {count} partitions, more than partition ids can number"),
                )
            })?;
            topics.push(TopicView {
                name,
                partitions,
                subscribers: Vec::new(),
            });
        }
        let mut member_topics = Vec::with_capacity(members.len());
        for (m, member) in members.iter().enumerate() {
            let mine: Vec<usize> = member.topics.iter().filter_map(|name| find(&topics, name)).collect();
            for &t in &mine {
                topics[t].subscribers.push(m);
            }
            member_topics.push(mine);
        }
        Ok(GroupView {
            members,
            topics,
            member_topics,
        })
    }

    pub fn topic(&self, name: &str) -> Option<usize> {
        find(&self.topics, name)
    }

    pub fn subscribes(&self, member: usize, topic: usize) -> bool {
        self.member_topics[member].binary_search(&topic).is_ok()
    }

    /// `tp` as a slot `member` may own: its topic is subscribed by `member` and the partition
    /// exists. A stale entry in a member's `current` gives `None`.
    pub fn slot_of(&self, member: usize, tp: &TopicPartition) -> Option<Slot> {
        let t = self.topic(&tp.topic)?;
        let exists = (0..self.topics[t].partitions).contains(&tp.partition);
        (exists && self.subscribes(member, t)).then_some((t, tp.partition))
    }

    /// The assignment giving each `(member, slot)` pair, with an entry for every member.
    pub fn assignment(&self, owned: impl IntoIterator<Item = (usize, Slot)>) -> Assignment {
        let mut by_member: Vec<BTreeSet<TopicPartition>> = vec![BTreeSet::new(); self.members.len()];
        for (m, (t, p)) in owned {
            by_member[m].insert(TopicPartition::new(self.topics[t].name, p));
        }
        self.members
            .iter()
            .map(|m| m.member_id.clone())
            .zip(by_member)
            .collect()
    }
}

fn find(topics: &[TopicView<'_>], name: &str) -> Option<usize> {
    topics.binary_search_by(|t| t.name.cmp(name)).ok()
}

pub(super) fn fail(assignor: &str, reason: String) -> AssignError {
    AssignError {
        assignor: assignor.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Group;
    use super::*;

    #[test]
    fn topics_list_only_subscribed_ones_with_their_subscribers_in_id_order() {
        let group = Group::new(&[("a", 2), ("b", 3), ("unused", 4)])
            .member("m2", &["a", "missing"])
            .member("m1", &["a", "b"]);
        let view = GroupView::new("test", &group.spec()).expect("valid spec");
        let names: Vec<&str> = view.topics.iter().map(|t| t.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(view.members[0].member_id, "m1");
        assert_eq!(view.topics[0].subscribers, [0, 1]);
        assert_eq!(view.topics[1].subscribers, [0]);
        assert_eq!(view.member_topics, [vec![0, 1], vec![0]]);
    }

    #[test]
    fn a_stale_current_partition_is_not_a_slot() {
        let group = Group::new(&[("a", 2), ("b", 1)])
            .member("m1", &["a"])
            .member("m2", &["b"]);
        let view = GroupView::new("test", &group.spec()).expect("valid spec");
        assert_eq!(view.slot_of(0, &TopicPartition::new("a", 1)), Some((0, 1)));
        assert_eq!(view.slot_of(0, &TopicPartition::new("a", 2)), None);
        assert_eq!(view.slot_of(0, &TopicPartition::new("a", -1)), None);
        assert_eq!(view.slot_of(0, &TopicPartition::new("b", 0)), None);
        assert_eq!(view.slot_of(0, &TopicPartition::new("gone", 0)), None);
    }

    #[test]
    fn a_duplicate_member_id_is_an_error() {
        let group = Group::new(&[("a", 2)]).member("m1", &["a"]).member("m1", &["a"]);
        let err = GroupView::new("test", &group.spec()).expect_err("duplicate ids");
        assert_eq!(err.to_string(), "assignor 'test': member id 'm1' appears twice");
    }

    #[test]
    fn a_partition_count_beyond_partition_ids_is_an_error() {
        let group = Group::new(&[("huge", u32::MAX)]).member("m1", &["huge"]);
        let err = GroupView::new("test", &group.spec()).expect_err("count too large");
        assert!(err.reason.contains("'huge' has 4294967295 partitions"), "{err}");
    }
}
