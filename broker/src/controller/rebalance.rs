//! The rebalance planner: which replicas to move so that every live broker holds about as
//! many replicas, and leads about as many partitions, as any other; and running the plan as
//! reassignments (see [`super::membership`]).

use std::collections::BTreeMap;

use super::Registry;
use super::admin_ops::ChangeContext;
use super::membership::{ReplicaMove, reassign};
use crate::error::Result;

/// A partition's replica list, as the rebalance plans it.
type PartitionReplicas = (String, i32, Vec<u32>);

/// The replica lists that even out replicas per live broker; see [`even_out`]. Replicas on
/// brokers that are down or being removed stay where they are (remove-node moves those), and
/// a partition with a move that stopped half-way is left to remove-node or reassign.
pub fn plan_rebalance(registry: &Registry) -> Vec<(PartitionReplicas, ReplicaMove)> {
    let lists = registry
        .list()
        .into_iter()
        .flat_map(|t| {
            let rf = t.replication_factor as usize;
            t.assignments
                .iter()
                .enumerate()
                .filter(|(_, r)| r.len() == rf)
                .map(|(p, r)| (t.name.clone(), p as i32, r.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    even_out(&registry.placeable_brokers(), lists)
}

/// While the most loaded of `brokers` holds two or more replicas more than the least loaded
/// one, moves one of its replicas there, keeping the replica's place in its partition's list.
/// A replica in first place is its partition's preferred leader, so such a move also moves
/// leadership: it is chosen while the most loaded broker leads more partitions than the least
/// loaded one by two or more, and avoided otherwise. Returns each move with the list it
/// leaves its partition with (a partition may move more than once: the last list is final).
fn even_out(brokers: &[u32], mut lists: Vec<PartitionReplicas>) -> Vec<(PartitionReplicas, ReplicaMove)> {
    let mut load: BTreeMap<u32, usize> = brokers.iter().map(|&b| (b, 0)).collect();
    let mut leads: BTreeMap<u32, usize> = load.clone();
    for (_, _, replicas) in &lists {
        for b in replicas {
            if let Some(n) = load.get_mut(b) {
                *n += 1;
            }
        }
        if let Some(n) = replicas.first().and_then(|b| leads.get_mut(b)) {
            *n += 1;
        }
    }
    let mut plan = Vec::new();
    let total: usize = load.values().sum();
    for _ in 0..total {
        let (Some((&most, &high)), Some((&least, &low))) = (
            load.iter().max_by_key(|(b, n)| (**n, std::cmp::Reverse(**b))),
            load.iter().min_by_key(|(b, n)| (**n, **b)),
        ) else {
            break;
        };
        if high <= low + 1 {
            break;
        }
        let move_leader = leads[&most] > leads[&least] + 1;
        let fits = |r: &[u32]| r.contains(&most) && !r.contains(&least);
        let chosen = lists
            .iter()
            .position(|(_, _, r)| fits(r) && (r[0] == most) == move_leader)
            .or_else(|| lists.iter().position(|(_, _, r)| fits(r)));
        let Some(i) = chosen else { break };
        let (topic, partition, replicas) = &mut lists[i];
        let at = replicas.iter().position(|&b| b == most).unwrap_or(0);
        replicas[at] = least;
        if at == 0 {
            *leads.entry(most).or_default() -= 1;
            *leads.entry(least).or_default() += 1;
        }
        *load.entry(most).or_default() -= 1;
        *load.entry(least).or_default() += 1;
        let m = ReplicaMove {
            topic: topic.clone(),
            partition: *partition,
            from: most,
            to: least,
        };
        plan.push(((topic.clone(), *partition, replicas.clone()), m));
    }
    plan
}

/// Evens out replicas across live brokers (controller only); see [`plan_rebalance`]. Each
/// partition is reassigned once, to its final list.
pub async fn rebalance(cx: &ChangeContext<'_>, dry_run: bool) -> Result<Vec<ReplicaMove>> {
    let plan = plan_rebalance(cx.registry);
    let moves: Vec<ReplicaMove> = plan.iter().map(|(_, m)| m.clone()).collect();
    if dry_run {
        return Ok(moves);
    }
    let mut finals: BTreeMap<(String, i32), Vec<u32>> = BTreeMap::new();
    for ((topic, partition, target), _) in plan {
        finals.insert((topic, partition), target);
    }
    // Each partition's steps name it; the progress shows the current one.
    for ((topic, partition), target) in finals {
        reassign(cx, &topic, partition, &target).await?;
    }
    tracing::info!(moved = moves.len(), "cluster rebalanced");
    Ok(moves)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partitions(lists: &[&[u32]]) -> Vec<PartitionReplicas> {
        lists
            .iter()
            .enumerate()
            .map(|(p, r)| ("t".to_string(), p as i32, r.to_vec()))
            .collect()
    }

    /// The largest difference between two counts.
    fn spread(counts: &[usize]) -> usize {
        counts.iter().max().copied().unwrap_or(0) - counts.iter().min().copied().unwrap_or(0)
    }

    /// Replicas and preferred leaders per broker after applying a plan.
    fn counts(brokers: &[u32], lists: &[PartitionReplicas]) -> (Vec<usize>, Vec<usize>) {
        let replicas = brokers
            .iter()
            .map(|b| lists.iter().filter(|(_, _, r)| r.contains(b)).count())
            .collect();
        let leaders = brokers
            .iter()
            .map(|b| lists.iter().filter(|(_, _, r)| r[0] == *b).count())
            .collect();
        (replicas, leaders)
    }

    fn apply(mut lists: Vec<PartitionReplicas>, plan: &[(PartitionReplicas, ReplicaMove)]) -> Vec<PartitionReplicas> {
        for ((_, p, target), _) in plan {
            lists[*p as usize].2 = target.clone();
        }
        lists
    }

    #[test]
    fn given_a_new_empty_broker_should_move_replicas_and_leaders_onto_it_until_even() {
        let brokers = [1, 2, 3, 4];
        // Six partitions with three replicas on brokers 1-3, leaders spread over them.
        let before = partitions(&[&[1, 2, 3], &[2, 3, 1], &[3, 1, 2], &[1, 2, 3], &[2, 3, 1], &[3, 1, 2]]);
        let plan = even_out(&brokers, before.clone());
        let after = apply(before.clone(), &plan);
        let (replicas, leaders) = counts(&brokers, &after);
        assert_eq!(replicas.iter().sum::<usize>(), 18);
        assert!(spread(&replicas) <= 1, "{replicas:?}");
        assert!(spread(&leaders) <= 1, "{leaders:?}");
        assert_eq!(plan.len(), 4, "18 replicas over 4 brokers: broker 4 takes 4 (or 5)");
        for ((_, p, target), m) in &plan {
            assert_eq!(m.to, 4);
            assert_eq!(target.len(), 3);
            assert_eq!(
                target.iter().collect::<std::collections::BTreeSet<_>>().len(),
                3,
                "partition {p}: {target:?}"
            );
        }
        // Only the moved replica changes place; the others keep theirs.
        for ((_, _, b), (_, _, a)) in before.iter().zip(&after) {
            assert!(b.iter().zip(a).filter(|(x, y)| x != y).count() <= 1, "{b:?} -> {a:?}");
        }
    }

    #[test]
    fn given_even_replicas_should_plan_nothing() {
        let lists = partitions(&[&[1, 2], &[2, 3], &[3, 1]]);
        assert!(even_out(&[1, 2, 3], lists).is_empty());
    }

    #[test]
    fn given_replicas_on_a_broker_that_cannot_take_part_should_leave_them() {
        // Broker 3 is down: only 1 and 2 are placeable.
        let before = partitions(&[&[1, 3], &[3, 1], &[1, 3]]);
        let plan = even_out(&[1, 2], before.clone());
        assert_eq!(plan.len(), 1, "{plan:?}");
        assert_eq!((plan[0].1.from, plan[0].1.to), (1, 2));
        let after = apply(before, &plan);
        assert!(after.iter().all(|(_, _, r)| r.contains(&3)), "{after:?}");
    }
}
