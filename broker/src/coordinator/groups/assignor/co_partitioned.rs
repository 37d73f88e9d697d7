//! "co-partitioned": partition i of every subscribed topic goes to the same member, for
//! consumers that join or aggregate across topics keyed alike (a stream and its changelog,
//! say) and so must see the same keys of each. That only means something if every topic
//! has the same partition count and every member reads every topic, so anything else is an
//! error rather than a best effort that would silently split keys.
//!
//! The unit assigned is a partition index. Indexes are spread like `sticky` spreads
//! partitions over identical subscriptions: counts differ by at most one, and an index stays
//! with the member that owns it now (the member owning the most of the index's partitions,
//! ties to the first by id) as far as balance allows.
//!
//! Cost: O(P log P) for P partitions in all.

use super::view::{GroupView, fail};
use super::{AssignError, Assignment, AssignmentSpec, PartitionAssignor, checked};

#[derive(Debug, Clone, Copy, Default)]
pub struct CoPartitionedAssignor;

impl CoPartitionedAssignor {
    pub const NAME: &'static str = "co-partitioned";
}

impl PartitionAssignor for CoPartitionedAssignor {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn assign(&self, spec: &AssignmentSpec<'_>) -> Result<Assignment, AssignError> {
        let view = GroupView::new(Self::NAME, spec)?;
        let indexes = common_partition_count(&view)?;
        let owners = spread(view.members.len(), &current_owners(&view, indexes));
        let owned = (0..view.topics.len())
            .flat_map(|t| owners.iter().map(move |&(m, i)| (m, t, i)))
            .filter_map(|(m, t, i)| Some((m, (t, i32::try_from(i).ok()?))));
        checked(Self::NAME, spec, view.assignment(owned))
    }
}

/// The partition count all subscribed topics share, after checking that they do and that
/// every member subscribes to all of them.
fn common_partition_count(view: &GroupView<'_>) -> Result<usize, AssignError> {
    let Some(first) = view.topics.first() else {
        return Ok(0);
    };
    if let Some(other) = view.topics.iter().find(|t| t.partitions != first.partitions) {
        return Err(fail(
            CoPartitionedAssignor::NAME,
            format!(
                "topics '{}' ({} partitions) and '{}' ({} partitions) have different partition counts; \
                 co-partitioned needs equal counts",
                first.name, first.partitions, other.name, other.partitions
            ),
        ));
    }
    let everything = view.member_topics.first();
    if let Some(m) = view.member_topics.iter().position(|topics| Some(topics) != everything) {
        let names = |member: usize| {
            let topics: Vec<&str> = view.member_topics[member]
                .iter()
                .map(|&t| view.topics[t].name)
                .collect();
            let topics = if topics.is_empty() {
                "no topics".to_owned()
            } else {
                topics.join(", ")
            };
            format!("'{}' ({topics})", view.members[member].member_id)
        };
        return Err(fail(
            CoPartitionedAssignor::NAME,
            format!(
                "members {} and {} subscribe to different topics; co-partitioned needs every member to \
                 subscribe to the same topics",
                names(0),
                names(m)
            ),
        ));
    }
    Ok(first.len())
}

/// Per index, the member that owns it now, if any: the one listing most of its partitions
/// in `current`, ties to the first by id.
fn current_owners(view: &GroupView<'_>, indexes: usize) -> Vec<Option<usize>> {
    let mut claims: Vec<(usize, usize)> = Vec::new();
    for (m, member) in view.members.iter().enumerate() {
        for tp in &member.current {
            if let Some(i) = view.slot_of(m, tp).and_then(|(_, p)| usize::try_from(p).ok()) {
                claims.push((i, m));
            }
        }
    }
    claims.sort_unstable();
    let mut owners = vec![None; indexes];
    let mut votes = vec![0; indexes];
    for run in claims.chunk_by(|a, b| a == b) {
        let (i, m) = run[0];
        // Within an index runs come in member order, so `>` leaves ties with the first.
        if let Some(best) = votes.get_mut(i)
            && run.len() > *best
        {
            *best = run.len();
            owners[i] = Some(m);
        }
    }
    owners
}

/// (member, index) for every index: counts differ by at most one, and as many indexes as
/// that allows stay with their current owner.
fn spread(members: usize, current: &[Option<usize>]) -> Vec<(usize, usize)> {
    if members == 0 {
        return Vec::new();
    }
    let mut claims: Vec<Vec<usize>> = vec![Vec::new(); members];
    for (i, owner) in current.iter().enumerate() {
        if let Some(m) = *owner {
            claims[m].push(i);
        }
    }
    let base = current.len() / members;
    let mut extra = current.len() % members;
    let mut caps = vec![base; members];
    // The `indexes % members` slots of one more index keep an index in place only for a
    // member claiming more than `base`, so those members get them first.
    for wants_more in [true, false] {
        for m in 0..members {
            if extra > 0 && caps[m] == base && (claims[m].len() > base) == wants_more {
                caps[m] += 1;
                extra -= 1;
            }
        }
    }
    let mut owned = Vec::with_capacity(current.len());
    let mut kept = vec![false; current.len()];
    let mut room = vec![0; members];
    for (m, indexes) in claims.iter().enumerate() {
        for &i in indexes.iter().take(caps[m]) {
            kept[i] = true;
            owned.push((m, i));
        }
        room[m] = caps[m].saturating_sub(indexes.len());
    }
    let mut takers = (0..members).flat_map(|m| std::iter::repeat_n(m, room[m]));
    for i in (0..kept.len()).filter(|&i| !kept[i]) {
        if let Some(m) = takers.next() {
            owned.push((m, i));
        }
    }
    owned
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Group, tps};
    use super::*;

    #[test]
    fn partition_i_of_every_topic_goes_to_the_same_member() {
        let group = Group::new(&[("a", 3), ("b", 3)])
            .member("m1", &["a", "b"])
            .member("m2", &["a", "b"]);
        let assignment = CoPartitionedAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 0), ("a", 1), ("b", 0), ("b", 1)]));
        assert_eq!(assignment["m2"], tps(&[("a", 2), ("b", 2)]));
    }

    #[test]
    fn different_partition_counts_are_an_error_naming_topics_and_counts() {
        let group = Group::new(&[("a", 12), ("b", 6)]).member("m1", &["a", "b"]);
        let err = CoPartitionedAssignor.assign(&group.spec()).expect_err("counts differ");
        assert_eq!(
            err.to_string(),
            "assignor 'co-partitioned': topics 'a' (12 partitions) and 'b' (6 partitions) have different \
             partition counts; co-partitioned needs equal counts"
        );
    }

    #[test]
    fn different_subscriptions_are_an_error_naming_members_and_topics() {
        let group = Group::new(&[("a", 2), ("b", 2)])
            .member("m1", &["a", "b"])
            .member("m2", &["a"]);
        let err = CoPartitionedAssignor
            .assign(&group.spec())
            .expect_err("subscriptions differ");
        assert_eq!(
            err.to_string(),
            "assignor 'co-partitioned': members 'm1' (a, b) and 'm2' (a) subscribe to different topics; \
             co-partitioned needs every member to subscribe to the same topics"
        );
    }

    #[test]
    fn an_index_stays_with_the_member_owning_most_of_its_partitions() {
        let group = Group::new(&[("a", 2), ("b", 2), ("c", 2)])
            .member_owning("m1", &["a", "b", "c"], &[("a", 1)])
            .member_owning("m2", &["a", "b", "c"], &[("b", 1), ("c", 1)]);
        let assignment = CoPartitionedAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m1"], tps(&[("a", 0), ("b", 0), ("c", 0)]));
        assert_eq!(assignment["m2"], tps(&[("a", 1), ("b", 1), ("c", 1)]));
    }

    #[test]
    fn a_newcomer_takes_indexes_only_from_members_above_balance() {
        let group = Group::new(&[("a", 4)])
            .member_owning("m1", &["a"], &[("a", 0), ("a", 1), ("a", 2)])
            .member_owning("m2", &["a"], &[("a", 3)])
            .member("m3", &["a"]);
        let assignment = CoPartitionedAssignor.assign(&group.spec()).expect("assigns");
        assert_eq!(assignment["m2"], tps(&[("a", 3)]));
        assert_eq!(assignment["m1"].len(), 2);
        assert_eq!(assignment["m3"].len(), 1);
        assert!(assignment["m1"].is_subset(&tps(&[("a", 0), ("a", 1), ("a", 2)])));
    }

    #[test]
    fn a_group_subscribing_to_nothing_gets_empty_entries() {
        let group = Group::new(&[("a", 4)]).member("m1", &[]).member("m2", &[]);
        let assignment = CoPartitionedAssignor.assign(&group.spec()).expect("assigns");
        assert!(assignment["m1"].is_empty() && assignment["m2"].is_empty());
    }
}
