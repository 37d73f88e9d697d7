//! "sticky", the default (Kafka's `UniformAssignor`, the cooperative-sticky idea): as
//! balanced as round-robin, but a partition stays with the member that owns it unless it
//! must move, because every move costs a revocation and a reload of the consumer's state.
//!
//! Three passes over the spec:
//! 1. Keep: each member keeps the partitions of its `current` that still exist and that it
//!    still subscribes to. A partition two members claim stays with the first by id.
//! 2. Place: partitions nobody kept go, one at a time, to the least-loaded member that
//!    subscribes to their topic. Topics with fewer subscribers go first: they have fewer
//!    places to go, and the members they can use should not fill up with others first.
//! 3. Balance: while some member owns a partition that a subscriber with at least two fewer
//!    partitions could take, the most-loaded such member gives one to the least-loaded
//!    taker. Each move lowers the sum of squared counts, so the pass ends.
//!
//! # Invariants
//! - Members with identical subscriptions end with counts that differ by at most one: all
//!   of one's partitions are eligible for the other, so pass 3 would not have stopped.
//! - More generally no member owns a partition that a subscriber with two fewer could take;
//!   with different subscriptions that is the balance this greedy promises.
//! - Kept partitions move only in pass 3, most-loaded member first. Adding a member to a
//!   balanced group moves only the partitions the newcomer ends with; removing one moves
//!   only the partitions it owned.
//!
//! Cost: O((P + moves) · T · log M) for P partitions, M members, T topics per member.

use std::collections::{BTreeMap, BTreeSet};

use super::view::{GroupView, Slot};
use super::{AssignError, Assignment, AssignmentSpec, PartitionAssignor, checked};

#[derive(Debug, Clone, Copy, Default)]
pub struct StickyAssignor;

impl StickyAssignor {
    pub const NAME: &'static str = "sticky";
}

impl PartitionAssignor for StickyAssignor {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn assign(&self, spec: &AssignmentSpec<'_>) -> Result<Assignment, AssignError> {
        let view = GroupView::new(Self::NAME, spec)?;
        let mut plan = Plan::keeping_current(&view);
        plan.place_unowned();
        plan.balance();
        let owned = plan.slots();
        checked(Self::NAME, spec, view.assignment(owned))
    }
}

/// (partition count, member index). Ordered sets of these find the least- and most-loaded
/// members, ties broken by member id.
type Load = (usize, usize);

#[derive(Debug)]
struct Plan<'v, 'a> {
    view: &'v GroupView<'a>,
    /// Per member: topic index → the partitions of it the member owns. No empty sets.
    owned: Vec<BTreeMap<usize, BTreeSet<i32>>>,
    counts: Vec<usize>,
    /// Members that subscribe to some topic, by load. Members subscribing to none would pin
    /// the minimum at zero and hide that nobody else can take anything.
    loads: BTreeSet<Load>,
    /// Per topic: its subscribers by load.
    topic_loads: Vec<BTreeSet<Load>>,
    /// Per topic, per partition: whether some member owns it yet.
    taken: Vec<Vec<bool>>,
    /// Members found to have nothing to give away since their last change, skipped by pass 3
    /// until a move could have changed that (see [`Plan::unstick_after`]). Without it a group
    /// whose busiest members cannot give would be rescanned on every move.
    stuck: Vec<bool>,
}

impl<'v, 'a> Plan<'v, 'a> {
    /// Pass 1. The load sets are built once the kept counts are known, rather than updated
    /// per kept partition: in a settled group nearly everything is kept, and this is then
    /// most of the work.
    fn keeping_current(view: &'v GroupView<'a>) -> Plan<'v, 'a> {
        let members = view.members.len();
        let mut owned: Vec<BTreeMap<usize, BTreeSet<i32>>> = vec![BTreeMap::new(); members];
        let mut taken: Vec<Vec<bool>> = view.topics.iter().map(|t| vec![false; t.len()]).collect();
        let mut counts = vec![0; members];
        for (m, member) in view.members.iter().enumerate() {
            for tp in &member.current {
                let Some((t, p)) = view.slot_of(m, tp) else {
                    continue;
                };
                if let Some(flag) = usize::try_from(p).ok().and_then(|i| taken[t].get_mut(i))
                    && !*flag
                {
                    *flag = true;
                    owned[m].entry(t).or_default().insert(p);
                    counts[m] += 1;
                }
            }
        }
        let mut loads = BTreeSet::new();
        let mut topic_loads = vec![BTreeSet::new(); view.topics.len()];
        for (m, topics) in view.member_topics.iter().enumerate() {
            if !topics.is_empty() {
                loads.insert((counts[m], m));
            }
            for &t in topics {
                topic_loads[t].insert((counts[m], m));
            }
        }
        Plan {
            view,
            owned,
            counts,
            loads,
            topic_loads,
            taken,
            stuck: vec![false; members],
        }
    }

    fn place_unowned(&mut self) {
        let view = self.view;
        let mut order: Vec<usize> = (0..view.topics.len()).collect();
        order.sort_by_key(|&t| (view.topics[t].subscribers.len(), t));
        for t in order {
            for p in 0..view.topics[t].partitions {
                if self.is_taken((t, p)) {
                    continue;
                }
                let Some(&(_, member)) = self.topic_loads[t].first() else {
                    break;
                };
                self.give(member, (t, p));
            }
        }
    }

    fn balance(&mut self) {
        while let Some((donor, topic, taker)) = self.next_move() {
            let Some(partition) = self.take(donor, topic) else {
                break;
            };
            self.give(taker, (topic, partition));
            self.unstick_after(donor, taker);
        }
    }

    /// The move pass 3 makes next: (donor, topic, taker), the donor the most-loaded member
    /// that can give anything.
    fn next_move(&mut self) -> Option<(usize, usize, usize)> {
        let &(least, _) = self.loads.first()?;
        let mut found = None;
        let mut newly_stuck = Vec::new();
        for &(count, member) in self.loads.iter().rev() {
            if count < least + 2 {
                break;
            }
            if self.stuck[member] {
                continue;
            }
            match self.best_move_from(member) {
                Some((topic, taker)) => {
                    found = Some((member, topic, taker));
                    break;
                }
                None => newly_stuck.push(member),
            }
        }
        for member in newly_stuck {
            self.stuck[member] = true;
        }
        found
    }

    /// Of the topics `donor` owns partitions of, the one whose least-loaded subscriber has
    /// the fewest partitions, with that subscriber, if it has at least two fewer than `donor`
    /// (with one fewer the move would only swap who has more).
    fn best_move_from(&self, donor: usize) -> Option<(usize, usize)> {
        let count = self.counts[donor];
        self.owned[donor]
            .keys()
            .filter_map(|&t| self.topic_loads[t].first().map(|&(load, taker)| (load, t, taker)))
            .filter(|&(load, _, _)| load + 2 <= count)
            .min()
            .map(|(_, t, taker)| (t, taker))
    }

    /// Clears `stuck` for every member a move may have given something to give: the taker
    /// (it has more now, so a subscriber of another of its topics may be two below it), and
    /// every member subscribing to one of the donor's topics with at least two more than the
    /// donor now has (it may give to the donor). Only counts decide whether a member can
    /// give, and only these two changed.
    fn unstick_after(&mut self, donor: usize, taker: usize) {
        self.stuck[taker] = false;
        let floor = self.counts[donor] + 2;
        for &t in &self.view.member_topics[donor] {
            for &(count, member) in self.topic_loads[t].iter().rev() {
                if count < floor {
                    break;
                }
                self.stuck[member] = false;
            }
        }
    }

    fn is_taken(&self, (t, p): Slot) -> bool {
        usize::try_from(p)
            .ok()
            .and_then(|p| self.taken[t].get(p))
            .copied()
            .unwrap_or(true)
    }

    fn mark(&mut self, (t, p): Slot, taken: bool) {
        if let Some(flag) = usize::try_from(p).ok().and_then(|p| self.taken[t].get_mut(p)) {
            *flag = taken;
        }
    }

    fn give(&mut self, member: usize, slot: Slot) {
        self.mark(slot, true);
        self.owned[member].entry(slot.0).or_default().insert(slot.1);
        self.set_count(member, self.counts[member] + 1);
    }

    /// Takes `member`'s highest partition of `topic`, if it owns one.
    fn take(&mut self, member: usize, topic: usize) -> Option<i32> {
        let partitions = self.owned[member].get_mut(&topic)?;
        let partition = partitions.pop_last()?;
        if partitions.is_empty() {
            self.owned[member].remove(&topic);
        }
        self.mark((topic, partition), false);
        self.set_count(member, self.counts[member].saturating_sub(1));
        Some(partition)
    }

    fn set_count(&mut self, member: usize, count: usize) {
        let old = (self.counts[member], member);
        if self.loads.remove(&old) {
            self.loads.insert((count, member));
        }
        for &t in &self.view.member_topics[member] {
            self.topic_loads[t].remove(&old);
            self.topic_loads[t].insert((count, member));
        }
        self.counts[member] = count;
    }

    fn slots(&self) -> Vec<(usize, Slot)> {
        let mut slots = Vec::with_capacity(self.counts.iter().sum());
        for (m, topics) in self.owned.iter().enumerate() {
            for (&t, partitions) in topics {
                slots.extend(partitions.iter().map(|&p| (m, (t, p))));
            }
        }
        slots
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Group, tps};
    use super::*;

    #[test]
    fn a_fresh_group_is_balanced() {
        let group = Group::new(&[("a", 5)]).member("m1", &["a"]).member("m2", &["a"]);
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"].len() + assignment["m2"].len(), 5);
        assert!(assignment["m1"].len().abs_diff(assignment["m2"].len()) <= 1);
    }

    #[test]
    fn a_balanced_current_assignment_is_kept_as_it_is() {
        let group = Group::new(&[("a", 4)])
            .member_owning("m1", &["a"], &[("a", 3), ("a", 0)])
            .member_owning("m2", &["a"], &[("a", 1), ("a", 2)]);
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 0), ("a", 3)]));
        assert_eq!(assignment["m2"], tps(&[("a", 1), ("a", 2)]));
    }

    #[test]
    fn a_newcomer_takes_only_what_balance_needs_from_the_busiest() {
        let group = Group::new(&[("a", 6)])
            .member_owning("m1", &["a"], &[("a", 0), ("a", 1), ("a", 2)])
            .member_owning("m2", &["a"], &[("a", 3), ("a", 4), ("a", 5)])
            .member("m3", &["a"]);
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"].len(), 2);
        assert_eq!(assignment["m2"].len(), 2);
        assert_eq!(assignment["m3"].len(), 2);
        assert!(assignment["m1"].is_subset(&tps(&[("a", 0), ("a", 1), ("a", 2)])));
        assert!(assignment["m2"].is_subset(&tps(&[("a", 3), ("a", 4), ("a", 5)])));
    }

    #[test]
    fn partitions_of_a_dropped_subscription_or_a_removed_partition_move() {
        let group = Group::new(&[("a", 2), ("b", 1)])
            .member_owning("m1", &["a"], &[("a", 0), ("b", 0), ("a", 7)])
            .member_owning("m2", &["a", "b"], &[("a", 1)]);
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 0)]));
        assert_eq!(assignment["m2"], tps(&[("a", 1), ("b", 0)]));
    }

    #[test]
    fn a_partition_claimed_twice_stays_with_the_first_member_by_id() {
        let group = Group::new(&[("a", 2)])
            .member_owning("m1", &["a"], &[("a", 0)])
            .member_owning("m2", &["a"], &[("a", 0)]);
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 0)]));
        assert_eq!(assignment["m2"], tps(&[("a", 1)]));
    }

    #[test]
    fn an_overloaded_member_sheds_down_to_balance() {
        let group = Group::new(&[("a", 6)])
            .member_owning(
                "m1",
                &["a"],
                &[("a", 0), ("a", 1), ("a", 2), ("a", 3), ("a", 4), ("a", 5)],
            )
            .member("m2", &["a"]);
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"].len(), 3);
        assert_eq!(assignment["m2"].len(), 3);
    }

    #[test]
    fn with_different_subscriptions_the_narrow_topic_goes_to_its_only_subscriber() {
        // m2 alone can take b; placing b first keeps m2 from filling up with a.
        let group = Group::new(&[("a", 4), ("b", 2)])
            .member("m1", &["a"])
            .member("m2", &["a", "b"]);
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 0), ("a", 1), ("a", 2)]));
        assert_eq!(assignment["m2"], tps(&[("a", 3), ("b", 0), ("b", 1)]));
    }

    #[test]
    fn the_busiest_member_that_cannot_give_is_passed_over() {
        // m1 owns all of b, which only it subscribes to; m2 and m3 must balance a between them.
        let group = Group::new(&[("a", 4), ("b", 6)])
            .member_owning(
                "m1",
                &["b"],
                &[("b", 0), ("b", 1), ("b", 2), ("b", 3), ("b", 4), ("b", 5)],
            )
            .member_owning("m2", &["a"], &[("a", 0), ("a", 1), ("a", 2), ("a", 3)])
            .member("m3", &["a"]);
        let assignment = StickyAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"].len(), 6);
        assert_eq!(assignment["m2"], tps(&[("a", 0), ("a", 1)]));
        assert_eq!(assignment["m3"], tps(&[("a", 2), ("a", 3)]));
    }

    #[test]
    fn hundreds_of_members_and_thousands_of_partitions_stay_cheap() {
        let topics: Vec<(String, u32)> = (0..20).map(|t| (format!("t{t:02}"), 500)).collect();
        let names: Vec<&str> = topics.iter().map(|(name, _)| name.as_str()).collect();
        let counts: Vec<(&str, u32)> = topics.iter().map(|(name, count)| (name.as_str(), *count)).collect();
        let mut group = Group::new(&counts);
        for m in 0..400 {
            // Every fourth member reads half the topics, so subscriptions differ.
            let mine = if m % 4 == 0 { &names[..10] } else { &names[..] };
            group = group.member(&format!("m{m:03}"), mine);
        }
        let first = StickyAssignor.assign(&group.spec()).expect("assigns");
        let again = StickyAssignor
            .assign(&group.with_current(&first).spec())
            .expect("assigns");
        assert_eq!(first, again);
    }
}
