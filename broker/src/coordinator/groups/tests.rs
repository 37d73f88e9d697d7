//! Membership, reconciliation and commit rules, driven without a broker: heartbeats applied
//! to a group, their records replayed into a fresh state as a new coordinator would.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::assignor::{Assignors, TopicPartition};
use super::membership::{self, Env, Heartbeat, JOIN, LEAVE, LEAVE_FOR_NOW, Settings, Subscription};
use super::offsets::{Commit, check_commit};
use super::state::{Group, GroupsState, set};
use crate::coordinator::StateMachine;
use crate::error::BrokerError;

fn settings() -> Settings {
    Settings {
        heartbeat_interval: Duration::from_secs(3),
        session_timeout: Duration::from_secs(45),
        min_session_timeout: Duration::from_secs(1),
        max_session_timeout: Duration::from_secs(600),
        rebalance_timeout: Duration::from_secs(60),
    }
}

/// A group of one state, driven the way the coordinator drives it: each heartbeat's
/// records are applied to the state, and `replayed` checks a fresh state rebuilt from
/// every record ever written equals it.
struct Harness {
    state: GroupsState,
    log: Vec<(bytes::Bytes, Option<bytes::Bytes>)>,
    topics: BTreeMap<String, u32>,
    assignors: Assignors,
    settings: Settings,
    next_id: u32,
}

const G: &str = "workers";

/// No lag known: the assignors see every partition as caught up.
static NO_LAGS: fn(&Group) -> HashMap<TopicPartition, u64> = |_| HashMap::new();

impl Harness {
    fn new(topics: &[(&str, u32)]) -> Harness {
        Harness {
            state: GroupsState::default(),
            log: Vec::new(),
            topics: topics.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
            assignors: Assignors::builtin(),
            settings: settings(),
            next_id: 0,
        }
    }

    /// What a heartbeat or a timer check of this group depends on.
    fn env<'a>(
        &'a self,
        lags: &'a (dyn Fn(&Group) -> HashMap<TopicPartition, u64> + Sync),
        new_member_id: String,
    ) -> Env<'a> {
        Env {
            now_ms: 1,
            settings: &self.settings,
            topics: &self.topics,
            assignors: &self.assignors,
            lags,
            new_member_id,
        }
    }

    fn group(&self) -> Group {
        self.state.groups.get(G).cloned().unwrap_or_default()
    }

    fn send(&mut self, hb: Heartbeat) -> Result<membership::Answer, BrokerError> {
        self.next_id += 1;
        let env = self.env(&NO_LAGS, format!("m{}", self.next_id));
        let old = self.group();
        let outcome = membership::heartbeat(Some(&old), &hb, &env)?;
        for c in old.changes_to(G, &outcome.group) {
            self.state.apply(&c.key, c.value.as_deref()).expect("apply");
            self.log.push((c.key, c.value));
        }
        assert_eq!(
            self.group(),
            outcome.group,
            "records must rebuild exactly the new group"
        );
        Ok(outcome.answer)
    }

    fn join(&mut self, topics: &[&str], instance: &str) -> membership::Answer {
        self.send(Heartbeat {
            group: G.into(),
            member_id: String::new(),
            epoch: JOIN,
            instance_id: instance.into(),
            subscription: Some(Subscription {
                topics: topics.iter().map(|t| t.to_string()).collect(),
                regex: String::new(),
                assignor: String::new(),
            }),
            owned: BTreeSet::new(),
            session_timeout: Duration::from_secs(45),
            rebalance_timeout: Duration::from_secs(60),
        })
        .expect("join")
    }

    fn beat(
        &mut self,
        member: &str,
        epoch: i32,
        owned: &BTreeSet<TopicPartition>,
    ) -> Result<membership::Answer, BrokerError> {
        self.send(Heartbeat {
            group: G.into(),
            member_id: member.into(),
            epoch,
            instance_id: String::new(),
            subscription: None,
            owned: owned.clone(),
            session_timeout: Duration::from_secs(45),
            rebalance_timeout: Duration::from_secs(60),
        })
    }

    fn replayed(&self) -> GroupsState {
        let mut fresh = GroupsState::default();
        for (k, v) in &self.log {
            fresh.apply(k, v.as_deref()).expect("replay");
        }
        fresh.loaded(Instant::now());
        fresh
    }

    /// No partition is held (assigned or being revoked) by two members.
    fn assert_exclusive(&self) {
        let mut seen = BTreeMap::new();
        for (id, m) in &self.group().members {
            for p in m.assigned.iter().chain(&m.pending_revocation) {
                let p = TopicPartition::new(p.topic.clone(), p.partition);
                if let Some(other) = seen.insert(p.clone(), id.clone()) {
                    panic!("{p:?} held by {other} and {id}");
                }
            }
        }
    }
}

/// A client as the protocol expects one: it owns what the last answer said.
#[derive(Debug, Clone)]
struct Client {
    id: String,
    epoch: i32,
    owned: BTreeSet<TopicPartition>,
}

impl Client {
    fn beat(&mut self, h: &mut Harness) {
        let answer = h.beat(&self.id, self.epoch, &self.owned).expect("heartbeat");
        self.epoch = answer.epoch;
        self.owned = answer.assignment;
    }
}

fn joined(h: &mut Harness, topics: &[&str]) -> Client {
    let a = h.join(topics, "");
    Client {
        id: a.member_id,
        epoch: a.epoch,
        owned: a.assignment,
    }
}

#[test]
fn a_joining_member_gets_partitions_only_after_the_owner_gives_them_up() {
    let mut h = Harness::new(&[("orders", 6)]);
    let mut a = joined(&mut h, &["orders"]);
    assert_eq!(a.owned.len(), 6, "the only member gets everything");
    let mut b = joined(&mut h, &["orders"]);
    assert!(b.owned.is_empty(), "nothing is free yet: a still owns it all");
    h.assert_exclusive();
    // a learns of the new target: it keeps 3 and is asked to give up 3, same epoch.
    let epoch_before = a.epoch;
    a.beat(&mut h);
    assert_eq!(a.owned.len(), 3);
    assert_eq!(
        a.epoch, epoch_before,
        "the epoch moves only once the revocation is confirmed"
    );
    assert_eq!(h.group().members[&a.id].pending_revocation.len(), 3);
    // b asks again before a confirmed: still nothing.
    b.beat(&mut h);
    assert!(b.owned.is_empty());
    // a confirms (its heartbeat no longer lists them), then b gets them.
    a.beat(&mut h);
    assert!(a.epoch > epoch_before);
    b.beat(&mut h);
    assert_eq!(b.owned.len(), 3);
    assert!(a.owned.is_disjoint(&b.owned));
    assert_eq!(h.group().state(), "stable");
    h.assert_exclusive();
    assert_eq!(h.replayed().groups, h.state.groups);
}

#[test]
fn partitions_that_stay_put_are_never_revoked_during_a_rebalance() {
    let mut h = Harness::new(&[("orders", 12)]);
    let mut clients: Vec<Client> = (0..3).map(|_| joined(&mut h, &["orders"])).collect();
    for _ in 0..4 {
        for c in clients.iter_mut() {
            c.beat(&mut h);
        }
    }
    let before: Vec<BTreeSet<TopicPartition>> = clients.iter().map(|c| c.owned.clone()).collect();
    assert!(before.iter().all(|o| o.len() == 4), "{before:?}");
    clients.push(joined(&mut h, &["orders"]));
    for _ in 0..4 {
        #[allow(clippy::needless_range_loop)] // `i` also says which members were there before
        for i in 0..clients.len() {
            let kept_before: BTreeSet<_> = clients[i].owned.clone();
            clients[i].beat(&mut h);
            if i < 3 {
                // Whatever a member keeps in its final share it never lost on the way.
                let final_target = set(&h.group().members[&clients[i].id].target);
                for p in kept_before.intersection(&final_target) {
                    assert!(clients[i].owned.contains(p), "{p:?} was interrupted");
                }
            }
            h.assert_exclusive();
        }
    }
    let sizes: Vec<usize> = clients.iter().map(|c| c.owned.len()).collect();
    assert_eq!(sizes, vec![3, 3, 3, 3]);
    let moved: usize = (0..3).map(|i| before[i].difference(&clients[i].owned).count()).sum();
    assert_eq!(moved, 3, "the sticky assignor moves only what the new member needs");
}

#[test]
fn a_static_member_coming_back_gets_its_assignment_without_a_rebalance() {
    let mut h = Harness::new(&[("orders", 4)]);
    let first = h.join(&["orders"], "worker-1");
    let mut other = joined(&mut h, &["orders"]);
    let mut a = Client {
        id: first.member_id,
        epoch: first.epoch,
        owned: first.assignment,
    };
    for _ in 0..3 {
        a.beat(&mut h);
        other.beat(&mut h);
    }
    let epoch = h.group().epoch();
    let owned = a.owned.clone();
    // Leaves for now, then a new process with the same instance id joins.
    h.beat(&a.id, LEAVE_FOR_NOW, &owned).expect("leave for now");
    assert_eq!(h.group().epoch(), epoch, "leaving for now is no rebalance");
    let back = h.join(&["orders"], "worker-1");
    assert_ne!(back.member_id, a.id);
    assert_eq!(back.assignment, owned);
    assert_eq!(h.group().epoch(), epoch, "coming back is no rebalance");
    assert!(!h.group().members.contains_key(&a.id), "the old incarnation is gone");
    // The old member id is fenced.
    let e = h.beat(&a.id, a.epoch, &owned).expect_err("old member");
    assert!(matches!(e, BrokerError::UnknownMember { .. }), "{e}");
}

#[test]
fn leaving_frees_partitions_at_once_and_rebalances() {
    let mut h = Harness::new(&[("orders", 4)]);
    let mut a = joined(&mut h, &["orders"]);
    let mut b = joined(&mut h, &["orders"]);
    for _ in 0..3 {
        a.beat(&mut h);
        b.beat(&mut h);
    }
    let epoch = h.group().epoch();
    let answer = h.beat(&b.id, LEAVE, &b.owned).expect("leave");
    assert_eq!(answer.epoch, LEAVE);
    assert!(h.group().epoch() > epoch);
    a.beat(&mut h);
    assert_eq!(a.owned.len(), 4);
    // Leaving twice is fine; heartbeating after leaving is not.
    h.beat(&b.id, LEAVE, &BTreeSet::new()).expect("second leave");
    assert!(matches!(
        h.beat(&b.id, b.epoch, &b.owned),
        Err(BrokerError::UnknownMember { .. })
    ));
}

#[test]
fn epochs_newer_than_the_members_or_claiming_more_are_fenced() {
    let mut h = Harness::new(&[("orders", 2)]);
    let mut a = joined(&mut h, &["orders"]);
    a.beat(&mut h);
    let e = h.beat(&a.id, a.epoch + 1, &a.owned).expect_err("newer epoch");
    assert!(matches!(e, BrokerError::FencedMemberEpoch { .. }), "{e}");
    let mut b = joined(&mut h, &["orders"]);
    a.beat(&mut h);
    a.beat(&mut h);
    b.beat(&mut h);
    // An older epoch (a lost answer) is accepted while it claims no more than it holds.
    let stale = a.epoch - 1;
    h.beat(&a.id, stale, &a.owned).expect("older epoch, owned subset");
    let all: BTreeSet<_> = (0..2).map(|p| TopicPartition::new("orders", p)).collect();
    let e = h.beat(&a.id, stale, &all).expect_err("claims b's partition");
    assert!(matches!(e, BrokerError::FencedMemberEpoch { .. }), "{e}");
}

#[test]
fn commits_need_ownership_at_an_epoch_the_partition_was_held_in() {
    let mut h = Harness::new(&[("orders", 2)]);
    let mut a = joined(&mut h, &["orders"]);
    a.beat(&mut h);
    let g = h.group();
    let p0 = TopicPartition::new("orders", 0);
    let commit = |p: &TopicPartition| {
        vec![Commit {
            partition: p.clone(),
            offset: 5,
            metadata: String::new(),
        }]
    };
    check_commit(G, Some(&g), &a.id, a.epoch, &commit(&p0)).expect("owner at its epoch");
    let e = check_commit(G, Some(&g), &a.id, a.epoch + 1, &commit(&p0)).expect_err("future epoch");
    assert!(matches!(e, BrokerError::FencedMemberEpoch { .. }));
    let e = check_commit(G, Some(&g), &a.id, 0, &commit(&p0)).expect_err("before it was assigned");
    assert!(matches!(e, BrokerError::FencedMemberEpoch { .. }));
    let elsewhere = TopicPartition::new("other", 0);
    let e = check_commit(G, Some(&g), &a.id, a.epoch, &commit(&elsewhere)).expect_err("not owned");
    assert!(e.to_string().contains("does not own"), "{e}");
    let e = check_commit(G, Some(&g), "ghost", 1, &commit(&p0)).expect_err("unknown member");
    assert!(matches!(e, BrokerError::UnknownMember { .. }));
    let e = check_commit(G, Some(&g), "", -1, &commit(&p0)).expect_err("admin commit on an active group");
    assert!(matches!(e, BrokerError::GroupNotEmpty { .. }));
    check_commit(G, None, "", -1, &commit(&p0)).expect("admin commit on an empty group");
    // A partition being revoked may still be committed (revocations commit first).
    let mut b = joined(&mut h, &["orders"]);
    a.beat(&mut h);
    let g = h.group();
    let revoking = g.members[&a.id].pending_revocation.first().expect("revoking").clone();
    let p = TopicPartition::new(revoking.topic, revoking.partition);
    check_commit(G, Some(&g), &a.id, a.epoch, &commit(&p)).expect("commit before confirming a revocation");
    b.beat(&mut h);
}

#[test]
fn an_unknown_assignor_is_refused_naming_the_known_ones() {
    let mut h = Harness::new(&[("orders", 2)]);
    let e = h
        .send(Heartbeat {
            group: G.into(),
            member_id: String::new(),
            epoch: JOIN,
            instance_id: String::new(),
            subscription: Some(Subscription {
                topics: vec!["orders".into()],
                regex: String::new(),
                assignor: "fastest".into(),
            }),
            owned: BTreeSet::new(),
            session_timeout: Duration::from_secs(45),
            rebalance_timeout: Duration::from_secs(60),
        })
        .expect_err("unknown assignor");
    assert!(matches!(e, BrokerError::InvalidRequest(_)), "{e}");
    assert!(
        e.to_string().contains("sticky") && e.to_string().contains("range"),
        "{e}"
    );
    assert!(h.state.groups.is_empty(), "nothing was written");
}

#[test]
fn expired_members_leave_and_the_rest_rebalance() {
    let mut h = Harness::new(&[("orders", 4)]);
    let mut a = joined(&mut h, &["orders"]);
    let b = joined(&mut h, &["orders"]);
    let now = Instant::now();
    h.state.loaded(now);
    // b stays silent past its session; a keeps heartbeating.
    assert!(h.state.touch(G, &a.id, now + Duration::from_secs(40)));
    let env = h.env(&NO_LAGS, String::new());
    assert!(membership::expire(&h.state, now + Duration::from_secs(44), &env).is_empty());
    let expired = membership::expire(&h.state, now + Duration::from_secs(46), &env);
    assert_eq!(expired.len(), 1);
    let (_, g, ids) = &expired[0];
    assert_eq!(ids, &vec![b.id.clone()]);
    assert_eq!(set(&g.members[&a.id].target).len(), 4);
    for c in h.group().changes_to(G, g) {
        h.state.apply(&c.key, c.value.as_deref()).expect("apply");
    }
    a.beat(&mut h);
    a.beat(&mut h);
    assert_eq!(a.owned.len(), 4);
}

#[test]
fn a_new_partition_of_a_subscribed_topic_is_assigned() {
    let mut h = Harness::new(&[("orders", 2)]);
    let mut a = joined(&mut h, &["orders"]);
    a.beat(&mut h);
    h.topics.insert("orders".into(), 3);
    let env = h.env(&NO_LAGS, String::new());
    let changed = membership::topics_changed(&h.state, &env);
    assert_eq!(changed.len(), 1);
    for c in h.group().changes_to(G, &changed[0].1) {
        h.state.apply(&c.key, c.value.as_deref()).expect("apply");
    }
    a.beat(&mut h);
    assert_eq!(a.owned.len(), 3);
}

/// One step of a random run: which client acts and how.
#[derive(Debug, Clone)]
enum Step {
    Join,
    Beat(usize),
    Leave(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => Just(Step::Join),
        6 => (0usize..16).prop_map(Step::Beat),
        1 => (0usize..16).prop_map(Step::Leave),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever members do, no partition is ever held by two of them; once everyone
    /// heartbeats a few rounds, every partition is owned and the group is stable; and the
    /// records rebuild the same state.
    #[test]
    fn random_membership_never_double_assigns(steps in proptest::collection::vec(step(), 1..60), partitions in 1u32..10) {
        let mut h = Harness::new(&[("orders", partitions), ("audit", 3)]);
        let mut clients: Vec<Client> = Vec::new();
        for s in steps {
            match s {
                Step::Join if clients.len() < 6 => {
                    let topics: &[&str] = if clients.len().is_multiple_of(2) { &["orders"] } else { &["orders", "audit"] };
                    clients.push(joined(&mut h, topics));
                }
                Step::Join => {}
                Step::Beat(i) if !clients.is_empty() => {
                    let n = clients.len();
                    clients[i % n].beat(&mut h);
                }
                Step::Leave(i) if !clients.is_empty() => {
                    let n = clients.len();
                    let c = clients.remove(i % n);
                    h.beat(&c.id, LEAVE, &c.owned).expect("leave");
                }
                _ => {}
            }
            h.assert_exclusive();
        }
        for _ in 0..4 {
            for c in clients.iter_mut() {
                c.beat(&mut h);
                h.assert_exclusive();
            }
        }
        if !clients.is_empty() {
            prop_assert_eq!(h.group().state(), "stable");
            let owned: usize = clients.iter().map(|c| c.owned.len()).sum();
            let subscribed: i32 = h.group().meta.expect("meta").subscribed_partitions.values().sum();
            prop_assert_eq!(owned as i32, subscribed);
            prop_assert!(subscribed as u32 >= partitions);
        }
        prop_assert_eq!(h.replayed().groups, h.state.groups.clone());
    }
}

#[test]
fn a_join_retried_under_a_chosen_id_replaces_itself_instead_of_leaving_a_ghost() {
    let mut h = Harness::new(&[("orders", 4)]);
    let join = |h: &mut Harness| {
        h.send(Heartbeat {
            group: G.into(),
            member_id: "c-chosen".into(),
            epoch: JOIN,
            instance_id: String::new(),
            subscription: Some(Subscription {
                topics: vec!["orders".into()],
                regex: String::new(),
                assignor: String::new(),
            }),
            owned: BTreeSet::new(),
            session_timeout: Duration::from_secs(45),
            rebalance_timeout: Duration::from_secs(60),
        })
        .expect("join")
    };
    let first = join(&mut h);
    assert_eq!(first.member_id, "c-chosen", "the chosen id is kept");
    // The answer was lost; the member joins again under the same id.
    let again = join(&mut h);
    assert_eq!(again.member_id, "c-chosen");
    assert_eq!(h.group().members.len(), 1, "no second member was left behind");
    assert_eq!(again.assignment.len(), 4);
    assert_eq!(again.session_timeout, Duration::from_secs(45));
}
