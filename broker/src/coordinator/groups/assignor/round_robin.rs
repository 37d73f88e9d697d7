//! "round-robin", Kafka's `RoundRobinAssignor`: every subscribed partition, in (topic,
//! partition) order, is dealt to the next member in circular member-id order, skipping
//! members that do not subscribe to its topic. With identical subscriptions the counts
//! differ by at most one; with different ones they can drift further apart.
//!
//! Ignores `current` and lags. Cost: a binary search over a topic's subscribers per
//! partition, rather than walking past every member that does not subscribe.

use super::view::GroupView;
use super::{AssignError, Assignment, AssignmentSpec, PartitionAssignor, checked};

#[derive(Debug, Clone, Copy, Default)]
pub struct RoundRobinAssignor;

impl RoundRobinAssignor {
    pub const NAME: &'static str = "round-robin";
}

impl PartitionAssignor for RoundRobinAssignor {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn assign(&self, spec: &AssignmentSpec<'_>) -> Result<Assignment, AssignError> {
        let view = GroupView::new(Self::NAME, spec)?;
        let mut owned = Vec::new();
        // The member index the dealer stands at; it wraps through the subscriber lists.
        let mut next = 0;
        for (t, topic) in view.topics.iter().enumerate() {
            let subscribers = &topic.subscribers;
            for p in 0..topic.partitions {
                let at = subscribers.partition_point(|&m| m < next);
                let Some(&member) = subscribers.get(at).or(subscribers.first()) else {
                    break;
                };
                owned.push((member, (t, p)));
                next = member + 1;
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
    fn partitions_are_dealt_in_topic_then_partition_order() {
        let group = Group::new(&[("t0", 3), ("t1", 3)])
            .member("c0", &["t0", "t1"])
            .member("c1", &["t0", "t1"]);
        let assignment = RoundRobinAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["c0"], tps(&[("t0", 0), ("t0", 2), ("t1", 1)]));
        assert_eq!(assignment["c1"], tps(&[("t0", 1), ("t1", 0), ("t1", 2)]));
    }

    // The example from Kafka's RoundRobinAssignor documentation.
    #[test]
    fn members_not_subscribing_to_a_topic_are_skipped() {
        let group = Group::new(&[("t0", 1), ("t1", 2), ("t2", 3)])
            .member("c0", &["t0"])
            .member("c1", &["t0", "t1"])
            .member("c2", &["t0", "t1", "t2"]);
        let assignment = RoundRobinAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["c0"], tps(&[("t0", 0)]));
        assert_eq!(assignment["c1"], tps(&[("t1", 0)]));
        assert_eq!(assignment["c2"], tps(&[("t1", 1), ("t2", 0), ("t2", 1), ("t2", 2)]));
    }

    #[test]
    fn the_deal_continues_across_topics_instead_of_restarting() {
        let group = Group::new(&[("a", 1), ("b", 1), ("c", 1)])
            .member("m1", &["a", "b", "c"])
            .member("m2", &["a", "b", "c"])
            .member("m3", &["a", "b", "c"]);
        let assignment = RoundRobinAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 0)]));
        assert_eq!(assignment["m2"], tps(&[("b", 0)]));
        assert_eq!(assignment["m3"], tps(&[("c", 0)]));
    }
}
