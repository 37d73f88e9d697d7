//! "range", Kafka's `RangeAssignor`: per topic, the members subscribing to it, in member-id
//! order, take contiguous runs of its partitions, the first `partitions % subscribers` of
//! them one partition more. Members with the same subscriptions get the same partition
//! numbers of every topic, which is what joins across equally partitioned topics want; the
//! price is that the first members get the extra partition of every topic.
//!
//! Ignores `current` and lags. Cost: one step per partition.

use super::view::GroupView;
use super::{AssignError, Assignment, AssignmentSpec, PartitionAssignor, checked};

#[derive(Debug, Clone, Copy, Default)]
pub struct RangeAssignor;

impl RangeAssignor {
    pub const NAME: &'static str = "range";
}

impl PartitionAssignor for RangeAssignor {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn assign(&self, spec: &AssignmentSpec<'_>) -> Result<Assignment, AssignError> {
        let view = GroupView::new(Self::NAME, spec)?;
        let mut owned = Vec::new();
        for (t, topic) in view.topics.iter().enumerate() {
            // A topic is in the view only if someone subscribes, so this never divides by 0.
            let subscribers = topic.subscribers.len().max(1);
            let (base, extra) = (topic.len() / subscribers, topic.len() % subscribers);
            let mut ids = 0..topic.partitions;
            for (i, &member) in topic.subscribers.iter().enumerate() {
                let run = base + usize::from(i < extra);
                owned.extend(ids.by_ref().take(run).map(|p| (member, (t, p))));
            }
        }
        checked(Self::NAME, spec, view.assignment(owned))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Group, tps};
    use super::*;

    #[test]
    fn each_topic_is_split_into_contiguous_runs_with_the_extra_to_the_first_members() {
        let group = Group::new(&[("t0", 3), ("t1", 3)])
            .member("c0", &["t0", "t1"])
            .member("c1", &["t0", "t1"]);
        let assignment = RangeAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["c0"], tps(&[("t0", 0), ("t0", 1), ("t1", 0), ("t1", 1)]));
        assert_eq!(assignment["c1"], tps(&[("t0", 2), ("t1", 2)]));
    }

    #[test]
    fn a_topic_is_split_only_among_its_subscribers() {
        let group = Group::new(&[("a", 4), ("b", 2)])
            .member("m1", &["a"])
            .member("m2", &["a", "b"])
            .member("m3", &["b"]);
        let assignment = RangeAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 0), ("a", 1)]));
        assert_eq!(assignment["m2"], tps(&[("a", 2), ("a", 3), ("b", 0)]));
        assert_eq!(assignment["m3"], tps(&[("b", 1)]));
    }

    #[test]
    fn more_members_than_partitions_leaves_the_last_members_empty() {
        let group = Group::new(&[("a", 2)])
            .member("m1", &["a"])
            .member("m2", &["a"])
            .member("m3", &["a"]);
        let assignment = RangeAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 0)]));
        assert_eq!(assignment["m2"], tps(&[("a", 1)]));
        assert!(assignment["m3"].is_empty());
    }
}
