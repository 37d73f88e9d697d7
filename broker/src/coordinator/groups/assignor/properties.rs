//! Property tests of what each built-in promises beyond validity: stickiness and local
//! balance for `sticky`, alignment and stickiness for `co-partitioned`, lag balance for
//! `lag-aware`. Random groups come from [`super::tests`].

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::tests::{Group, arb_group, arb_uniform_group, owner_of, spread};
use super::*;

fn claims() -> impl Strategy<Value = Vec<(usize, usize, i32)>> {
    prop::collection::vec((0usize..8, 0usize..4, 0i32..36), 0..64)
}

/// How many partitions owned in `before` have another owner in `after`.
fn moved(before: &Assignment, after: &Assignment) -> usize {
    let after = owner_of(after);
    owner_of(before)
        .iter()
        .filter(|(tp, owner)| after.get(*tp) != Some(*owner))
        .count()
}

/// `group` plus a member subscribing like the others, whose id sorts after the `after`-th.
fn with_newcomer(group: Group, after: usize) -> (Group, String) {
    let id = format!("m{}x", after % group.members.len());
    let topics: Vec<String> = group.members[0].topics.iter().cloned().collect();
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    (group.member(&id, &names), id)
}

proptest! {
    #[test]
    fn sticky_members_with_identical_subscriptions_differ_by_at_most_one(group in arb_group()) {
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        let mut by_subscription: BTreeMap<BTreeSet<&String>, Vec<usize>> = BTreeMap::new();
        for member in &group.members {
            let topics = member.topics.iter().filter(|t| group.topics.contains_key(*t)).collect();
            by_subscription.entry(topics).or_default().push(assignment[&member.member_id].len());
        }
        for (topics, counts) in by_subscription {
            prop_assert!(spread(counts.iter().copied()) <= 1, "{:?}: {:?}", topics, counts);
        }
    }

    #[test]
    fn sticky_leaves_no_partition_a_subscriber_with_two_fewer_could_take(group in arb_group()) {
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        let count = |m: &MemberSpec| assignment[&m.member_id].len();
        for owner in &group.members {
            for tp in &assignment[&owner.member_id] {
                let taker = group.members.iter().find(|m| m.topics.contains(&tp.topic) && count(m) + 2 <= count(owner));
                prop_assert!(taker.is_none(), "{:?} of {} could go to {:?}", tp, owner.member_id, taker);
            }
        }
    }

    #[test]
    fn sticky_keeps_its_own_assignment(group in arb_group()) {
        let first = StickyAssignor.assign(&group.spec()).expect("assigns");
        let again = StickyAssignor.assign(&group.clone().with_current(&first).spec()).expect("assigns");
        prop_assert_eq!(first, again);
    }

    #[test]
    fn sticky_keeps_valid_claims_of_a_balanced_group(group in arb_uniform_group(false), picks in claims()) {
        // Claims that are already balanced need no move: every valid, unique claim stays.
        let group = group.with_claims(&picks);
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        let owners = owner_of(&assignment);
        let mut kept = BTreeMap::new();
        for member in &group.members {
            for tp in member.current.iter().filter(|tp| owners.contains_key(tp)) {
                kept.entry(tp).or_insert(member.member_id.as_str());
            }
        }
        let mut claimed: BTreeMap<&str, usize> = BTreeMap::new();
        for owner in kept.values() {
            *claimed.entry(owner).or_default() += 1;
        }
        let floor = group.partition_count() / group.members.len();
        if claimed.values().all(|&c| c <= floor) {
            for (tp, owner) in kept {
                prop_assert_eq!(owners[tp], owner, "{:?} moved", tp);
            }
        }
    }

    #[test]
    fn sticky_moves_to_a_newcomer_only_what_it_takes(group in arb_uniform_group(false), after in 0usize..8) {
        let before = StickyAssignor.assign(&group.spec()).expect("assigns");
        let members = group.members.len();
        let (group, newcomer) = with_newcomer(group.with_current(&before), after);
        let after = StickyAssignor.assign(&group.spec()).expect("assigns");
        let moved = moved(&before, &after);
        prop_assert_eq!(moved, after[&newcomer].len(), "every moved partition went to the newcomer");
        prop_assert!(moved <= group.partition_count().div_ceil(members + 1), "moved {}", moved);
        prop_assert!(spread(after.values().map(BTreeSet::len)) <= 1);
    }

    #[test]
    fn sticky_moves_only_a_leaving_members_partitions(group in arb_uniform_group(false), leaving in 0usize..8) {
        let before = StickyAssignor.assign(&group.spec()).expect("assigns");
        let mut group = group.with_current(&before);
        prop_assume!(group.members.len() >= 2);
        let gone = group.members.remove(leaving % group.members.len()).member_id;
        let after = StickyAssignor.assign(&group.spec()).expect("assigns");
        let owners = owner_of(&after);
        for (tp, owner) in owner_of(&before).into_iter().filter(|(_, owner)| *owner != gone) {
            prop_assert_eq!(owners[tp], owner, "{:?} moved", tp);
        }
        prop_assert!(spread(after.values().map(BTreeSet::len)) <= 1);
    }

    #[test]
    fn co_partitioned_puts_partition_i_of_every_topic_on_one_member(
        group in arb_uniform_group(true),
        picks in claims(),
    ) {
        let group = group.with_claims(&picks);
        let assignment = CoPartitionedAssignor.assign(&group.spec()).expect("assigns");
        let owners = owner_of(&assignment);
        let mut by_index: BTreeMap<i32, BTreeSet<&str>> = BTreeMap::new();
        for (tp, owner) in &owners {
            by_index.entry(tp.partition).or_default().insert(owner);
        }
        prop_assert!(by_index.values().all(|owners| owners.len() == 1), "{:?}", by_index);
        prop_assert!(spread(assignment.values().map(BTreeSet::len)) <= group.topics.len());
        let again = CoPartitionedAssignor.assign(&group.clone().with_current(&assignment).spec()).expect("assigns");
        prop_assert_eq!(assignment, again);
    }

    #[test]
    fn co_partitioned_moves_few_indexes_to_a_newcomer(group in arb_uniform_group(true), after in 0usize..8) {
        let before = CoPartitionedAssignor.assign(&group.spec()).expect("assigns");
        let members = group.members.len();
        let (group, newcomer) = with_newcomer(group.with_current(&before), after);
        let after = CoPartitionedAssignor.assign(&group.spec()).expect("assigns");
        let topics = group.members[0].topics.len();
        let indexes = group.partition_count() / topics;
        let moved = moved(&before, &after) / topics;
        prop_assert!(moved <= indexes.div_ceil(members + 1), "moved {} of {} indexes", moved, indexes);
        prop_assert!(!after[&newcomer].is_empty() || indexes <= members);
    }

    #[test]
    fn lag_aware_totals_differ_by_at_most_the_largest_lag(
        group in arb_uniform_group(false),
        lags in prop::collection::vec(prop::option::of(0u64..10_000), 128),
    ) {
        let mut group = group;
        for (topic, &count) in &group.topics.clone() {
            for (p, lag) in (0..count as i32).zip(&lags) {
                if let Some(lag) = lag {
                    group = group.lag(topic, p, *lag);
                }
            }
        }
        let assignment = LagAwareAssignor.assign(&group.spec()).expect("assigns");
        let total = |tps: &BTreeSet<TopicPartition>| tps.iter().map(|tp| group.lags.get(tp).copied().unwrap_or(0)).sum::<u64>();
        let totals: Vec<u64> = assignment.values().map(total).collect();
        let largest = assignment.values().flatten().filter_map(|tp| group.lags.get(tp)).copied().max().unwrap_or(0);
        let (max, min) = (totals.iter().max().copied().unwrap_or(0), totals.iter().min().copied().unwrap_or(0));
        prop_assert!(max - min <= largest, "totals {:?}, largest lag {}", totals, largest);
    }
}
