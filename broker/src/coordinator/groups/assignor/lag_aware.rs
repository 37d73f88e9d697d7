//! "lag-aware": balances the lag each member has to work through rather than its partition
//! count, so a member is not handed every backlogged partition while another idles. A greedy
//! (longest processing time first): partitions by lag, largest first, ties by (topic,
//! partition), each to the subscriber with the least total lag so far, ties to the one with
//! fewer partitions, then to the first by id. A partition with no known lag counts as 0.
//!
//! # Invariants
//! - Among members with identical subscriptions, total lags differ by at most the largest
//!   single partition lag: each partition goes to the least-lagged, so whoever ends up on top
//!   got there by one partition from the bottom.
//! - With all lags 0 the tie on partition count makes it a balanced deal of partitions.
//!
//! Ignores `current`: lag moves between rebalances, so stickiness would hold on to exactly
//! the imbalance this assignor exists to remove. Cost: O(P · T · log M).

use std::cmp::Reverse;
use std::collections::BTreeSet;

use super::view::GroupView;
use super::{AssignError, Assignment, AssignmentSpec, PartitionAssignor, checked};

#[derive(Debug, Clone, Copy, Default)]
pub struct LagAwareAssignor;

impl LagAwareAssignor {
    pub const NAME: &'static str = "lag-aware";
}

/// (total lag, partition count, member index): the order in which members take the next
/// partition. `u128` because a sum of `u64` lags can exceed `u64`.
type Load = (u128, usize, usize);

impl PartitionAssignor for LagAwareAssignor {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn assign(&self, spec: &AssignmentSpec<'_>) -> Result<Assignment, AssignError> {
        let view = GroupView::new(Self::NAME, spec)?;
        let mut lags: Vec<Vec<u64>> = view.topics.iter().map(|t| vec![0; t.len()]).collect();
        // Walking the lag map once, rather than looking every partition up, avoids building
        // a `TopicPartition` key per partition.
        for (tp, &lag) in spec.lags {
            let Some(t) = view.topic(&tp.topic) else {
                continue;
            };
            if let Some(slot) = usize::try_from(tp.partition).ok().and_then(|p| lags[t].get_mut(p)) {
                *slot = lag;
            }
        }
        let mut order: Vec<(Reverse<u64>, usize, i32)> = lags
            .iter()
            .enumerate()
            .flat_map(|(t, lags)| lags.iter().zip(0..).map(move |(&lag, p)| (Reverse(lag), t, p)))
            .collect();
        order.sort_unstable();

        let members = view.members.len();
        let mut loads: Vec<Load> = (0..members).map(|m| (0, 0, m)).collect();
        let mut topic_loads: Vec<BTreeSet<Load>> = view
            .topics
            .iter()
            .map(|t| t.subscribers.iter().map(|&m| loads[m]).collect())
            .collect();
        let mut owned = Vec::with_capacity(order.len());
        for (Reverse(lag), t, p) in order {
            let Some(&(_, _, m)) = topic_loads[t].first() else {
                continue;
            };
            let old = loads[m];
            let new = (old.0 + u128::from(lag), old.1 + 1, m);
            for &topic in &view.member_topics[m] {
                topic_loads[topic].remove(&old);
                topic_loads[topic].insert(new);
            }
            loads[m] = new;
            owned.push((m, (t, p)));
        }
        checked(Self::NAME, spec, view.assignment(owned))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Group, tps};
    use super::*;

    #[test]
    fn the_heaviest_partitions_are_spread_first() {
        let group = Group::new(&[("a", 4)])
            .member("m1", &["a"])
            .member("m2", &["a"])
            .lag("a", 0, 100)
            .lag("a", 1, 90)
            .lag("a", 2, 20)
            .lag("a", 3, 5);
        let assignment = LagAwareAssignor.assign(&group.spec()).expect("assigns");
        // 100 → m1; 90 → m2; 20 → m2 (90 < 100); 5 → m1 (100 < 110).
        assert_eq!(assignment["m1"], tps(&[("a", 0), ("a", 3)]));
        assert_eq!(assignment["m2"], tps(&[("a", 1), ("a", 2)]));
    }

    #[test]
    fn one_hot_partition_leaves_its_member_alone_with_it() {
        let group = Group::new(&[("a", 5)])
            .member("m1", &["a"])
            .member("m2", &["a"])
            .lag("a", 2, 1_000);
        let assignment = LagAwareAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 2)]));
        assert_eq!(assignment["m2"].len(), 4);
    }

    #[test]
    fn without_lags_partition_counts_are_balanced() {
        let group = Group::new(&[("a", 3), ("b", 4)])
            .member("m1", &["a", "b"])
            .member("m2", &["a", "b"]);
        let assignment = LagAwareAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 0), ("a", 2), ("b", 1), ("b", 3)]));
        assert_eq!(assignment["m2"], tps(&[("a", 1), ("b", 0), ("b", 2)]));
    }

    #[test]
    fn lags_of_unknown_topics_and_partitions_are_ignored() {
        let group = Group::new(&[("a", 2)])
            .member("m1", &["a"])
            .member("m2", &["a"])
            .lag("gone", 0, 500)
            .lag("a", 9, 500)
            .lag("a", 1, 7);
        let assignment = LagAwareAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 1)]));
        assert_eq!(assignment["m2"], tps(&[("a", 0)]));
    }

    #[test]
    fn huge_lags_add_up_without_overflow() {
        let group = Group::new(&[("a", 3)])
            .member("m1", &["a"])
            .lag("a", 0, u64::MAX)
            .lag("a", 1, u64::MAX)
            .lag("a", 2, u64::MAX);
        let assignment = LagAwareAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"].len(), 3);
    }
}
