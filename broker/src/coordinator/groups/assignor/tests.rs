//! The test group builder every assignor's tests use, the registry and [`check`] tests, and
//! property tests of each built-in over random groups.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

/// A spec's owned parts; [`Group::spec`] borrows them as the assignors see them.
#[derive(Debug, Clone, Default)]
pub(super) struct Group {
    pub members: Vec<MemberSpec>,
    pub topics: BTreeMap<String, u32>,
    pub lags: HashMap<TopicPartition, u64>,
}

impl Group {
    pub fn new(topics: &[(&str, u32)]) -> Group {
        Group {
            topics: topics.iter().map(|&(name, count)| (name.to_owned(), count)).collect(),
            ..Group::default()
        }
    }

    pub fn member(self, id: &str, topics: &[&str]) -> Group {
        self.member_owning(id, topics, &[])
    }

    pub fn member_owning(mut self, id: &str, topics: &[&str], current: &[(&str, i32)]) -> Group {
        self.members.push(MemberSpec {
            member_id: id.to_owned(),
            instance_id: None,
            topics: topics.iter().map(|&t| t.to_owned()).collect(),
            current: tps(current),
        });
        self.members.sort_by(|a, b| a.member_id.cmp(&b.member_id));
        self
    }

    pub fn lag(mut self, topic: &str, partition: i32, lag: u64) -> Group {
        self.lags.insert(TopicPartition::new(topic, partition), lag);
        self
    }

    /// The same group with each member's `current` set to its share of `assignment`.
    pub fn with_current(mut self, assignment: &Assignment) -> Group {
        for member in &mut self.members {
            member.current = assignment.get(&member.member_id).cloned().unwrap_or_default();
        }
        self
    }

    /// The same group with `picks` added to members' `current`: (member, topic, partition),
    /// member and topic taken modulo their number, the partition as is (so maybe stale).
    pub fn with_claims(mut self, picks: &[(usize, usize, i32)]) -> Group {
        let topics: Vec<String> = self.topics.keys().cloned().collect();
        let members = self.members.len();
        for &(m, t, p) in picks {
            if let (Some(member), Some(topic)) = (
                self.members.get_mut(m % members.max(1)),
                topics.get(t % topics.len().max(1)),
            ) {
                member.current.insert(TopicPartition::new(topic.as_str(), p));
            }
        }
        self
    }

    pub fn spec(&self) -> AssignmentSpec<'_> {
        AssignmentSpec {
            members: &self.members,
            topics: &self.topics,
            lags: &self.lags,
        }
    }

    pub fn partition_count(&self) -> usize {
        let subscribed: BTreeSet<&String> = self.members.iter().flat_map(|m| &m.topics).collect();
        self.topics
            .iter()
            .filter(|(t, _)| subscribed.contains(t))
            .map(|(_, &c)| c as usize)
            .sum()
    }
}

pub(super) fn tps(list: &[(&str, i32)]) -> BTreeSet<TopicPartition> {
    list.iter()
        .map(|&(topic, partition)| TopicPartition::new(topic, partition))
        .collect()
}

pub(super) fn owner_of(assignment: &Assignment) -> BTreeMap<&TopicPartition, &str> {
    assignment
        .iter()
        .flat_map(|(m, tps)| tps.iter().map(move |tp| (tp, m.as_str())))
        .collect()
}

pub(super) fn spread(counts: impl IntoIterator<Item = usize>) -> usize {
    let counts: Vec<usize> = counts.into_iter().collect();
    counts.iter().max().unwrap_or(&0) - counts.iter().min().unwrap_or(&0)
}

#[test]
fn get_of_an_unknown_name_lists_the_known_ones() {
    let err = Assignors::builtin().get("foo").expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "unknown assignor 'foo'; known: co-partitioned, lag-aware, range, round-robin, sticky"
    );
}

#[test]
fn every_builtin_is_found_by_its_own_name_and_the_default_is_one() {
    let assignors = Assignors::default();
    assert_eq!(
        assignors.names(),
        ["co-partitioned", "lag-aware", "range", "round-robin", "sticky"]
    );
    for name in assignors.names() {
        assert_eq!(assignors.get(&name).expect("registered").name(), name);
    }
    assert_eq!(assignors.get(DEFAULT_ASSIGNOR).expect("registered").name(), "sticky");
}

/// Gives every partition to the first member by id that subscribes to its topic.
#[derive(Debug)]
struct FirstTaker(&'static str);

impl PartitionAssignor for FirstTaker {
    fn name(&self) -> &str {
        self.0
    }

    fn assign(&self, spec: &AssignmentSpec<'_>) -> Result<Assignment, AssignError> {
        let mut assignment: Assignment = spec
            .members
            .iter()
            .map(|m| (m.member_id.clone(), BTreeSet::new()))
            .collect();
        for (topic, &count) in spec.topics {
            if let Some(m) = spec.members.iter().find(|m| m.topics.contains(topic))
                && let Some(owned) = assignment.get_mut(&m.member_id)
            {
                owned.extend((0..count as i32).map(|p| TopicPartition::new(topic.as_str(), p)));
            }
        }
        Ok(assignment)
    }
}

#[test]
fn a_registered_custom_assignor_is_found_and_replaces_one_of_the_same_name() {
    let mut assignors = Assignors::builtin();
    assignors.register(Arc::new(FirstTaker("first-taker")));
    assert!(assignors.names().contains(&"first-taker".to_owned()));
    let group = Group::new(&[("a", 3)]).member("m1", &["a"]).member("m2", &["a"]);
    let assignment = assignors
        .get("first-taker")
        .expect("registered")
        .assign(&group.spec())
        .expect("assigns");
    assert_eq!(assignment["m1"].len(), 3);
    assert_eq!(check(&group.spec(), &assignment), Ok(()));

    assignors.register(Arc::new(FirstTaker("range")));
    assert_eq!(assignors.names().len(), 6);
    let assignment = assignors
        .get("range")
        .expect("registered")
        .assign(&group.spec())
        .expect("assigns");
    assert_eq!(assignment["m1"].len(), 3, "the custom assignor replaced the built-in");
}

#[test]
fn check_names_each_kind_of_invalid_assignment() {
    let group = Group::new(&[("a", 2), ("b", 1)])
        .member("m1", &["a"])
        .member("m2", &["a", "b"]);
    let spec = group.spec();
    let valid: Assignment = [("m1", tps(&[("a", 0)])), ("m2", tps(&[("a", 1), ("b", 0)]))]
        .into_iter()
        .map(|(m, tps)| (m.to_owned(), tps))
        .collect();
    assert_eq!(check(&spec, &valid), Ok(()));
    let broken = |m: &str, tps: BTreeSet<TopicPartition>| {
        let mut assignment = valid.clone();
        assignment.insert(m.to_owned(), tps);
        check(&spec, &assignment).expect_err("invalid")
    };
    let mut missing_member = valid.clone();
    missing_member.remove("m1");
    assert!(
        check(&spec, &missing_member)
            .expect_err("invalid")
            .contains("'m1' has no entry")
    );
    assert!(broken("m3", tps(&[])).contains("not a member"));
    assert!(broken("m1", tps(&[("a", 0), ("c", 0)])).contains("not in the spec"));
    assert!(broken("m1", tps(&[("a", 0), ("a", 2)])).contains("has 2 partitions"));
    assert!(broken("m1", tps(&[("a", 0), ("b", 0)])).contains("does not subscribe"));
    assert!(broken("m1", tps(&[("a", 0), ("a", 1)])).contains("assigned to both"));
    assert!(broken("m1", tps(&[])).contains("a-0 is subscribed but assigned to no member"));
}

/// Member ids `m0`..`m7` with random subscriptions (possibly none) over topics `t0`..`t3`,
/// random partition counts, random `current` sets full of stale entries (a topic `gone`,
/// partitions past the count, partitions claimed twice), and random lags.
pub(super) fn arb_group() -> impl Strategy<Value = Group> {
    (prop::collection::vec(1u32..=32, 1..=4), 1usize..=8)
        .prop_flat_map(|(counts, members)| {
            let topics = counts.len();
            (
                Just(counts),
                prop::collection::vec(prop::collection::btree_set(0..topics, 0..=topics), members),
                prop::collection::vec(prop::collection::vec((0..=topics, 0i32..40), 0..12), members),
                prop::collection::vec((0..topics, 0i32..32, 0u64..1_000), 0..40),
            )
        })
        .prop_map(|(counts, subscriptions, currents, lags)| {
            let name = |t: usize| {
                if t < counts.len() {
                    format!("t{t}")
                } else {
                    "gone".to_owned()
                }
            };
            let mut group = Group::new(&[]);
            group.topics = counts.iter().enumerate().map(|(t, &c)| (name(t), c)).collect();
            for (m, (subscribed, current)) in subscriptions.iter().zip(&currents).enumerate() {
                group.members.push(MemberSpec {
                    member_id: format!("m{m}"),
                    instance_id: None,
                    topics: subscribed.iter().map(|&t| name(t)).collect(),
                    current: current.iter().map(|&(t, p)| TopicPartition::new(name(t), p)).collect(),
                });
            }
            group.lags = lags
                .iter()
                .map(|&(t, p, lag)| (TopicPartition::new(name(t), p), lag))
                .collect();
            group
        })
}

/// Like [`arb_group`], but every member subscribes to the same topics and nobody owns
/// anything yet; with `equal_counts` all topics have the same partition count.
pub(super) fn arb_uniform_group(equal_counts: bool) -> impl Strategy<Value = Group> {
    (prop::collection::vec(1u32..=32, 1..=4), 1usize..=8, 0usize..4).prop_map(move |(counts, members, unsubscribed)| {
        let first = counts[0];
        let mut group = Group::new(&[]);
        group.topics = counts
            .iter()
            .enumerate()
            .map(|(t, &c)| (format!("t{t}"), if equal_counts { first } else { c }))
            .collect();
        // One topic may stay unsubscribed: spec.topics listing it must not change anything.
        let topics: Vec<String> = group
            .topics
            .keys()
            .filter(|t| **t != format!("t{unsubscribed}"))
            .cloned()
            .collect();
        let topics = if topics.is_empty() {
            vec!["t0".to_owned()]
        } else {
            topics
        };
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        (0..members).fold(group, |group, m| group.member(&format!("m{m}"), &names))
    })
}

fn builtins() -> Vec<Arc<dyn PartitionAssignor>> {
    let assignors = Assignors::builtin();
    assignors
        .names()
        .iter()
        .filter_map(|name| assignors.get(name).ok())
        .collect()
}

/// Whether co-partitioned can serve the group: same subscribed topics everywhere, same counts.
fn co_partitionable(group: &Group) -> bool {
    let effective: BTreeSet<BTreeSet<&String>> = group
        .members
        .iter()
        .map(|m| m.topics.iter().filter(|t| group.topics.contains_key(*t)).collect())
        .collect();
    let counts: BTreeSet<u32> = effective.iter().flatten().map(|t| group.topics[*t]).collect();
    effective.len() <= 1 && counts.len() <= 1
}

proptest! {
    #[test]
    fn every_builtin_gives_a_valid_assignment(group in arb_group()) {
        for assignor in builtins() {
            match assignor.assign(&group.spec()) {
                Ok(assignment) => prop_assert_eq!(check(&group.spec(), &assignment), Ok(()), "{}", assignor.name()),
                Err(err) => {
                    prop_assert_eq!(assignor.name(), "co-partitioned", "{}", err);
                    prop_assert!(!co_partitionable(&group), "{}", err);
                }
            }
        }
    }

    #[test]
    fn every_builtin_is_deterministic(group in arb_group()) {
        for assignor in builtins() {
            prop_assert_eq!(assignor.assign(&group.spec()), assignor.assign(&group.spec()), "{}", assignor.name());
        }
    }

    #[test]
    fn identical_subscriptions_give_counts_within_one(group in arb_uniform_group(false)) {
        for name in ["round-robin", "sticky", "lag-aware"] {
            let assignment = Assignors::builtin().get(name).expect("builtin").assign(&group.spec()).expect("assigns");
            prop_assert!(spread(assignment.values().map(BTreeSet::len)) <= 1, "{}: {:?}", name, assignment);
        }
    }

    #[test]
    fn range_gives_counts_within_one_per_topic(group in arb_uniform_group(false)) {
        let assignment = RangeAssignor.assign(&group.spec()).expect("assigns");
        for topic in group.topics.keys() {
            let per_member = assignment.values().map(|tps| tps.iter().filter(|tp| &tp.topic == topic).count());
            let counts: Vec<usize> = per_member.collect();
            if counts.iter().any(|&c| c > 0) {
                prop_assert!(spread(counts.iter().copied()) <= 1, "{}: {:?}", topic, assignment);
            }
        }
    }
}
