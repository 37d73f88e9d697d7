//! Consumer groups through the Rust client's `GroupConsumer`, against real brokers: members
//! of one group share a topic's partitions and together deliver every record exactly once;
//! a member joining a stable group takes partitions only once their owners gave them up,
//! while partitions that stay put are delivered throughout the rebalance; and a group goes
//! on, at least once and from its committed offsets, after the SIGKILL of its
//! coordinator's broker in a 3-broker cluster.
//!
//! Each member runs in its own tokio task ([`conveyor_tests::group_member`]) recording every
//! record it is handed (with when) and every assignment event; the test thread polls those,
//! the members' own view (assignment, positions) and the coordinator's (`describe_group`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use conveyor_client::proto::GroupDescription;
use conveyor_client::{AssignmentEvent, Client, GroupConfig, GroupCoordinator, OffsetReset, TopicPartition};
use conveyor_tests::cluster::Cluster;
use conveyor_tests::group_member::{
    Member, Produced, Seen, Snapshot, SteadyProducer, delivered_by, duplicates, produce, round_of, stop_and_close,
};
use conveyor_tests::{BrokerProcess, poll_for, runtime, wait_for};
use tokio::runtime::Runtime;

const TOPIC: &str = "orders";
/// How long a group may take to settle, or its members to deliver what they wait for.
const DEADLINE: Duration = Duration::from_secs(40);

fn group_config() -> GroupConfig {
    GroupConfig::default().reset(OffsetReset::Earliest)
}

fn start_members(rt: &Runtime, names: std::ops::RangeInclusive<u32>, bootstrap: &str, group: &str) -> Vec<Member> {
    names
        .map(|i| Member::start(rt, &format!("member-{i}"), bootstrap, TOPIC, group, group_config()))
        .collect()
}

fn snapshots(rt: &Runtime, members: &[Member]) -> Vec<Snapshot> {
    members.iter().map(|m| m.snapshot(rt)).collect()
}

fn describe(rt: &Runtime, admin: &Client, group: &str) -> GroupDescription {
    rt.block_on(admin.groups().describe_group(group))
        .expect("describe group")
}

/// Member id → the partitions of [`TOPIC`] the coordinator says it owns.
fn owners(d: &GroupDescription) -> BTreeMap<String, BTreeSet<i32>> {
    d.members
        .iter()
        .map(|m| {
            let owned = m
                .assignment
                .iter()
                .filter(|t| t.topic == TOPIC)
                .flat_map(|t| t.partitions.iter().copied())
                .collect();
            (m.member_id.clone(), owned)
        })
        .collect()
}

/// Whether the coordinator says the group is stable with exactly `members`, each owning
/// what the member itself says it owns, `each` partitions apiece.
fn settled(d: &GroupDescription, members: &[Snapshot], each: usize) -> bool {
    let coordinator = owners(d);
    d.state == "stable"
        && coordinator.len() == members.len()
        && members.iter().all(|m| {
            m.assignment.len() == each
                && m.member_id
                    .as_ref()
                    .and_then(|id| coordinator.get(id))
                    .is_some_and(|owned| *owned == m.assignment)
        })
}

fn partitions(ps: &[TopicPartition]) -> BTreeSet<i32> {
    ps.iter().filter(|p| p.topic == TOPIC).map(|p| p.partition).collect()
}

/// Partitions of [`TOPIC`] named by the `Revoked` (or, with `lost`, `Lost`) events.
fn given_up(events: &[(Instant, AssignmentEvent)], lost: bool) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    for (_, e) in events {
        match e {
            AssignmentEvent::Revoked(p) if !lost => out.extend(partitions(p)),
            AssignmentEvent::Lost(p) if lost => out.extend(partitions(p)),
            _ => {}
        }
    }
    out
}

/// Events as `+{partitions}` (assigned), `-{..}` (revoked), `lost{..}`.
fn brief(events: &[(Instant, AssignmentEvent)]) -> Vec<String> {
    events
        .iter()
        .map(|(_, e)| match e {
            AssignmentEvent::Assigned(p) => format!("+{:?}", partitions(p)),
            AssignmentEvent::Revoked(p) => format!("-{:?}", partitions(p)),
            AssignmentEvent::Lost(p) => format!("lost{:?}", partitions(p)),
        })
        .collect()
}

/// What `events` leave a member owning, and when it last gained a partition.
fn owned_after(events: &[(Instant, AssignmentEvent)]) -> (BTreeSet<i32>, Option<Instant>) {
    let mut owned = BTreeSet::new();
    let mut gained = None;
    for (at, event) in events {
        match event {
            AssignmentEvent::Assigned(p) => {
                owned.extend(partitions(p));
                gained = Some(*at);
            }
            AssignmentEvent::Revoked(p) | AssignmentEvent::Lost(p) => {
                for p in partitions(p) {
                    owned.remove(&p);
                }
            }
        }
    }
    (owned, gained)
}

/// No member's stream or event channel failed, and none lost partitions (it was never
/// fenced or expired).
fn assert_clean(names: &[String], seen: &[Seen]) {
    for (name, s) in names.iter().zip(seen) {
        assert!(s.errors.is_empty(), "{name}: {:?}", s.errors);
        assert!(
            given_up(&s.events, true).is_empty(),
            "{name} lost partitions: {:?}",
            brief(&s.events)
        );
    }
}

fn assert_no_duplicates(seen: &[Seen]) {
    let twice = duplicates(seen);
    assert!(
        twice.is_empty(),
        "{} records were delivered more than once (first 20): {:?}",
        twice.len(),
        twice.iter().take(20).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------
// Three members, every record exactly once.

/// Records the first member reads alone, before the others join.
const ALONE: usize = 6_000;
/// Records written per chunk while the others join.
const CHUNK: usize = 600;

/// Starts a member that reads [`ALONE`] records alone, then two more that join while
/// chunks are written until the group has settled 4/4/4, and one chunk more: partitions
/// move while their records are written and read, and their final owners read some.
/// Returns the members and every (partition, offset) written.
fn join_while_writing(
    rt: &Runtime,
    admin: &Client,
    bootstrap: &str,
    group: &str,
) -> (Vec<Member>, BTreeSet<(i32, u64)>) {
    let partitions = 12;
    let started = Instant::now();
    let mut produced = rt.block_on(produce(admin, TOPIC, 0..ALONE, partitions));
    let mut members = start_members(rt, 1..=1, bootstrap, group);
    wait_for("the first member to read what was written", DEADLINE, || {
        (delivered_by(&members) == produced).then_some(())
    });
    assert_eq!(members[0].snapshot(rt).assignment.len(), 12, "it owned every partition");
    members.extend(start_members(rt, 2..=3, bootstrap, group));
    let mut written = ALONE;
    let mut chunks_while_rebalancing = 0;
    loop {
        produced.extend(rt.block_on(produce(admin, TOPIC, written..written + CHUNK, partitions)));
        written += CHUNK;
        let now = snapshots(rt, &members);
        if settled(&describe(rt, admin, group), &now, 4) {
            break;
        }
        chunks_while_rebalancing += 1;
        assert!(
            started.elapsed() < DEADLINE,
            "the group did not settle within {DEADLINE:?}: {now:?}"
        );
    }
    produced.extend(rt.block_on(produce(admin, TOPIC, written..written + CHUNK, partitions)));
    written += CHUNK;
    println!("{chunks_while_rebalancing} chunks of {CHUNK} written while the group rebalanced");
    assert_eq!(produced.len(), written);
    (members, produced)
}

#[test]
fn three_consumers_consume_every_record_exactly_once() {
    let group = "billing";
    // Members hear of a rebalance within half a second, while they are still reading.
    let broker = BrokerProcess::start_with_config("[groups]\nheartbeat_interval = \"500ms\"\n");
    let rt = runtime();
    let admin = rt.block_on(Client::connect(broker.addr())).expect("connect");
    rt.block_on(admin.admin().create_topic(TOPIC, 12, &[]))
        .expect("create topic");
    let started = Instant::now();
    let (members, produced) = join_while_writing(&rt, &admin, broker.addr(), group);
    let records = produced.len();
    // Where each partition ends: after its last record (its first offset holds the Raft
    // leader's no-op, a control batch that is never handed out).
    let ends: BTreeMap<i32, u64> = (0..12)
        .map(|p| {
            let offsets: Vec<u64> = produced.range((p, 0)..(p + 1, 0)).map(|(_, o)| *o).collect();
            assert_eq!(offsets.len(), records / 12, "partition {p}");
            (p, offsets.last().expect("records") + 1)
        })
        .collect();
    let all = poll_for(DEADLINE, || (delivered_by(&members) == produced).then_some(()));
    let delivered_in = started.elapsed();
    assert!(
        all.is_some(),
        "after {DEADLINE:?} {} of {records} records were delivered",
        delivered_by(&members).len()
    );
    // The group is stable 4/4/4, and every member handed out each of its partitions to its
    // end: nothing it holds could be handed out again.
    let last = poll_for(DEADLINE, || {
        let now = snapshots(&rt, &members);
        let at_end = now
            .iter()
            .all(|s| s.positions.iter().all(|(p, at)| *at == Some(ends[p])));
        (settled(&describe(&rt, &admin, group), &now, 4) && at_end).then_some(now)
    });
    let last = last.unwrap_or_else(|| {
        panic!(
            "the group did not settle 4/4/4 with every partition read to its end: members {:?}, coordinator {:?}",
            snapshots(&rt, &members),
            describe(&rt, &admin, group)
        )
    });
    let names: Vec<String> = members.iter().map(|m| m.name().to_string()).collect();
    let seen = stop_and_close(&rt, members);

    for (name, s) in names.iter().zip(&seen) {
        println!("{name}: {} records, events {:?}", s.records.len(), brief(&s.events));
        assert!(!s.records.is_empty(), "{name} delivered nothing");
    }
    println!("all {records} records delivered in {delivered_in:?}");
    assert_clean(&names, &seen);
    assert_no_duplicates(&seen);
    let delivered: usize = seen.iter().map(|s| s.records.len()).sum();
    assert_eq!(delivered, records, "every record once, and nothing else");
    let owned: BTreeSet<i32> = last.iter().flat_map(|s| s.assignment.iter().copied()).collect();
    assert_eq!(owned.len(), 12, "4 partitions each, none twice: {last:?}");
    // Each member committed its positions when it closed (and as partitions moved).
    let committed = rt
        .block_on(admin.groups().fetch_offsets(group, &[]))
        .expect("fetch offsets");
    let committed: BTreeMap<i32, u64> = committed.iter().map(|o| (o.partition, o.offset)).collect();
    assert_eq!(
        committed, ends,
        "the group's committed offsets are the partitions' ends"
    );
}

// ---------------------------------------------------------------------------------------
// A fourth member joins three that are reading.

/// What three members and a fourth that joined them saw.
#[derive(Debug)]
struct FourthJoined {
    names: Vec<String>,
    seen: Vec<Seen>,
    produced: Produced,
    /// The three before t0 (stable, 4 each) and the four at the end (stable, 3 each).
    before: Vec<Snapshot>,
    after: Vec<Snapshot>,
    /// Per member of the three: how many events it had seen by t0.
    marks: Vec<usize>,
    /// When the fourth member started, and when it announced its third partition.
    t0: Instant,
    t1: Instant,
}

impl FourthJoined {
    /// The events of member `i` since t0.
    fn since_t0(&self, i: usize) -> &[(Instant, AssignmentEvent)] {
        &self.seen[i].events[self.marks[i]..]
    }
}

/// With a producer writing to all 12 partitions all along: three members settle 4/4/4 and
/// read every partition; a fourth joins at t0 and announces its third partition at t1; the
/// group settles 3/3/3/3 and the fourth reads its partitions.
fn fourth_member_joins(rt: &Runtime, bootstrap: &str, group: &str) -> FourthJoined {
    let admin = rt.block_on(Client::connect(bootstrap)).expect("connect");
    let producer = SteadyProducer::start(rt, bootstrap, TOPIC, 12);
    let mut members = start_members(rt, 1..=3, bootstrap, group);
    // Stable, every member reading each of its partitions, and every event that led there
    // seen by its member's task: whatever event comes next is the rebalance's.
    let settling = Instant::now();
    let (before, marks) = wait_for("three members stable with 4 partitions each", DEADLINE, || {
        let now = snapshots(rt, &members);
        let mut marks = Vec::new();
        for (m, s) in members.iter().zip(&now) {
            let seen = m.seen();
            let reading = s
                .assignment
                .iter()
                .all(|p| seen.records.iter().any(|r| r.partition == *p && r.at > settling));
            if !reading || owned_after(&seen.events).0 != s.assignment {
                return None;
            }
            marks.push(seen.events.len());
        }
        settled(&describe(rt, &admin, group), &now, 4).then_some((now, marks))
    });

    let t0 = Instant::now();
    members.extend(start_members(rt, 4..=4, bootstrap, group));
    let t1 = wait_for("the fourth member to be assigned 3 partitions", DEADLINE, || {
        let (owned, at) = owned_after(&members[3].seen().events);
        (owned.len() == 3).then_some(at).flatten()
    });
    let after = wait_for("four members stable with 3 partitions each", DEADLINE, || {
        let now = snapshots(rt, &members);
        let reading = {
            let seen = members[3].seen();
            now[3]
                .assignment
                .iter()
                .all(|p| seen.records.iter().any(|r| r.partition == *p))
        };
        (settled(&describe(rt, &admin, group), &now, 3) && reading).then_some(now)
    });
    let produced = producer.stop(rt);
    let names = members.iter().map(|m| m.name().to_string()).collect();
    FourthJoined {
        names,
        seen: stop_and_close(rt, members),
        produced,
        before,
        after,
        marks,
        t0,
        t1,
    }
}

/// Each of the three gave the fourth exactly one partition (the sticky assignor moves no
/// more) in a single revocation, and kept three that it never gave up and that delivered
/// records during [t0, t1]. Returns the partitions given up.
fn assert_stayers_kept_delivering(r: &FourthJoined) -> BTreeSet<i32> {
    let mut moved = BTreeSet::new();
    for i in 0..3 {
        let name = &r.names[i];
        let since_t0 = r.since_t0(i);
        let revoked = given_up(since_t0, false);
        let stayed: BTreeSet<i32> = r.before[i]
            .assignment
            .intersection(&r.after[i].assignment)
            .filter(|p| !revoked.contains(p))
            .copied()
            .collect();
        assert_eq!(revoked.len(), 1, "{name} revoked {revoked:?}");
        assert_eq!(stayed.len(), 3, "{name}: before {:?}, after {:?}", r.before, r.after);
        // Never revoked and given again: after t0 the member's only event is the revocation.
        assert!(
            matches!(since_t0, [(_, AssignmentEvent::Revoked(_))]),
            "{name} after t0: {:?}",
            brief(since_t0)
        );
        moved.extend(revoked);
        for p in &stayed {
            let arrivals: Vec<Instant> = r.seen[i]
                .records
                .iter()
                .filter(|d| d.partition == *p && d.at >= r.t0 && d.at <= r.t1)
                .map(|d| d.at)
                .collect();
            let bounds: Vec<Instant> = [r.t0]
                .into_iter()
                .chain(arrivals.iter().copied())
                .chain([r.t1])
                .collect();
            let longest_pause = bounds.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
            println!(
                "{name}: partition {p} stayed; {} records during the rebalance, longest pause {longest_pause:?}",
                arrivals.len()
            );
            assert!(
                !arrivals.is_empty(),
                "{name}: partition {p} stayed but delivered nothing during the rebalance ({:?})",
                r.t1 - r.t0
            );
        }
    }
    moved
}

/// The fourth member began each of its partitions right after the last record its previous
/// owner handed out (which had committed it), and only after that owner handed it out.
fn assert_newcomer_continues_where_owners_stopped(r: &FourthJoined) {
    for p in &r.after[3].assignment {
        let old = (0..3)
            .find(|&i| given_up(r.since_t0(i), false).contains(p))
            .expect("a previous owner");
        let last = r.seen[old]
            .records
            .iter()
            .filter(|d| d.partition == *p)
            .max_by_key(|d| d.offset)
            .expect("the previous owner read it");
        let first = r.seen[3]
            .records
            .iter()
            .filter(|d| d.partition == *p)
            .min_by_key(|d| d.offset)
            .expect("the newcomer read it");
        let old = &r.names[old];
        assert_eq!(
            first.offset,
            last.offset + 1,
            "partition {p}: {old} handed out up to {}, the newcomer began at {}",
            last.offset,
            first.offset
        );
        assert!(
            first.at > last.at,
            "partition {p}: the newcomer had offset {} before {old} handed out offset {}",
            first.offset,
            last.offset
        );
    }
}

/// Every partition delivered exactly its acknowledged records, without a gap, up to the
/// last one delivered.
fn assert_gapless(r: &FourthJoined) {
    for p in 0..12 {
        let delivered: BTreeSet<u64> = r
            .seen
            .iter()
            .flat_map(|s| s.records.iter().filter(|d| d.partition == p).map(|d| d.offset))
            .collect();
        let last = *delivered
            .last()
            .unwrap_or_else(|| panic!("partition {p} delivered nothing"));
        let acked: BTreeSet<u64> = r
            .produced
            .acked
            .range((p, 0)..=(p, last))
            .map(|((_, o), _)| *o)
            .collect();
        let skipped: Vec<&u64> = acked.difference(&delivered).take(20).collect();
        let unknown: Vec<&u64> = delivered.difference(&acked).take(20).collect();
        assert!(
            skipped.is_empty() && unknown.is_empty(),
            "partition {p} up to offset {last}: acknowledged, not delivered {skipped:?}; delivered, not acknowledged {unknown:?}"
        );
    }
}

#[test]
fn partitions_that_stay_put_keep_delivering_while_a_fourth_consumer_joins() {
    // Members hear of the fourth within a second: the rebalance lasts about that long.
    let broker = BrokerProcess::start_with_config("[groups]\nheartbeat_interval = \"1s\"\n");
    let rt = runtime();
    let admin = rt.block_on(Client::connect(broker.addr())).expect("connect");
    rt.block_on(admin.admin().create_topic(TOPIC, 12, &[]))
        .expect("create topic");
    let r = fourth_member_joins(&rt, broker.addr(), "shipping");
    println!(
        "rebalance took {:?} (t0 → the fourth member's third partition); {} records acknowledged, {} delivered",
        r.t1 - r.t0,
        r.produced.acked.len(),
        r.seen.iter().map(|s| s.records.len()).sum::<usize>()
    );
    assert!(r.produced.failed.is_empty(), "{:?}", r.produced.failed);
    assert_clean(&r.names, &r.seen);
    // With the revoked partitions' finished work committed, nothing is handed out twice.
    assert_no_duplicates(&r.seen);
    let moved = assert_stayers_kept_delivering(&r);
    assert_eq!(
        moved, r.after[3].assignment,
        "the newcomer owns exactly what the others gave up"
    );
    assert_newcomer_continues_where_owners_stopped(&r);
    assert_gapless(&r);
}

// ---------------------------------------------------------------------------------------
// The coordinator's broker is SIGKILLed.

const FAILOVER_PARTITIONS: i32 = 6;
/// Rounds both members must be handed after the kill before the producer stops.
const ROUNDS_AFTER_KILL: u64 = 20;

/// The group's committed offsets by partition, as `client` is told.
fn committed(rt: &Runtime, client: &Client, group: &str) -> Option<BTreeMap<i32, u64>> {
    let offsets = rt.block_on(client.groups().fetch_offsets(group, &[])).ok()?;
    Some(offsets.iter().map(|o| (o.partition, o.offset)).collect())
}

/// Waits until the members are stable 3/3, reading, and every partition has a commit past
/// its start; returns their snapshots, the committed offsets just before the kill and the
/// coordinator, asked afresh (a client caches it, and the leader of the group's partition
/// may have moved).
fn stable_and_committing(
    rt: &Runtime,
    bootstrap: &str,
    members: &[Member],
    group: &str,
) -> (Vec<Snapshot>, BTreeMap<i32, u64>, GroupCoordinator) {
    let admin = rt.block_on(Client::connect(bootstrap)).expect("connect");
    let before = wait_for("two members stable and committing", DEADLINE, || {
        let now = snapshots(rt, members);
        let stable = settled(&describe(rt, &admin, group), &now, 3);
        let all_committed = committed(rt, &admin, group)?.values().filter(|o| **o > 0).count();
        (stable && all_committed == FAILOVER_PARTITIONS as usize).then_some(now)
    });
    let coordinator = rt
        .block_on(async { Client::connect(bootstrap).await?.groups().find_coordinator(group).await })
        .expect("find coordinator");
    let committed = committed(rt, &admin, group).expect("committed offsets before the kill");
    (before, committed, coordinator)
}

/// The partitions of [`TOPIC`] broker `id` leads.
fn led_by(cluster: &Cluster, id: i32) -> Vec<usize> {
    let Some(d) = cluster.describe(TOPIC, None) else {
        return Vec::new();
    };
    d["partitions"].as_array().map_or_else(Vec::new, |ps| {
        ps.iter()
            .enumerate()
            .filter(|(_, p)| p["leader"].as_i64() == Some(i64::from(id)))
            .map(|(i, _)| i)
            .collect()
    })
}

/// Both members are handed records of round `kill_round` (the first begun after the kill)
/// and then of [`ROUNDS_AFTER_KILL`] rounds more; returns how long the first took.
fn assert_members_keep_receiving(members: &[Member], kill_round: u64) -> Duration {
    let killed_at = Instant::now();
    let handed_out_from = |round: u64| {
        members
            .iter()
            .all(|m| m.seen().records.iter().rev().any(|r| round_of(r) >= round))
            .then_some(())
    };
    let last_rounds = || -> Vec<Option<u64>> {
        members
            .iter()
            .map(|m| m.seen().records.iter().map(round_of).max())
            .collect()
    };
    let resumed = poll_for(DEADLINE, || handed_out_from(kill_round));
    let resumed_in = killed_at.elapsed();
    assert!(
        resumed.is_some(),
        "records of round {kill_round} on (begun after the kill) did not reach both members within {DEADLINE:?}; last rounds handed out {:?}",
        last_rounds()
    );
    let kept_on = poll_for(DEADLINE, || handed_out_from(kill_round + ROUNDS_AFTER_KILL));
    assert!(
        kept_on.is_some(),
        "the members did not keep up for {ROUNDS_AFTER_KILL} rounds after the kill within {DEADLINE:?}; last rounds handed out {:?}",
        last_rounds()
    );
    resumed_in
}

/// Waits until the members were handed every acknowledged record.
fn assert_all_read(rt: &Runtime, members: &[Member], acked: &BTreeSet<(i32, u64)>) {
    let all_read = poll_for(DEADLINE, || delivered_by(members).is_superset(acked).then_some(()));
    let read = delivered_by(members);
    let missing: Vec<&(i32, u64)> = acked.difference(&read).take(20).collect();
    assert!(
        all_read.is_some(),
        "acknowledged records never consumed within {DEADLINE:?} (first 20): {missing:?}; members {:?}, errors {:?}",
        snapshots(rt, members),
        members.iter().map(|m| m.seen().errors.clone()).collect::<Vec<_>>()
    );
}

/// Waits until the group's committed offsets, asked of the surviving brokers, are the
/// members' positions: the new coordinator takes their automatic commits. Returns them
/// and the new coordinator.
fn commits_reach(
    rt: &Runtime,
    survivors: &str,
    group: &str,
    positions: &BTreeMap<i32, u64>,
) -> (BTreeMap<i32, u64>, GroupCoordinator) {
    let survivor = rt.block_on(Client::connect(survivors)).expect("connect to a survivor");
    let mut last = BTreeMap::new();
    let caught_up = poll_for(DEADLINE, || {
        last = committed(rt, &survivor, group)?;
        (last == *positions).then_some(())
    });
    assert!(
        caught_up.is_some(),
        "after the failover the committed offsets {last:?} did not reach the positions {positions:?}"
    );
    let coordinator = rt
        .block_on(survivor.groups().find_coordinator(group))
        .expect("find coordinator");
    (last, coordinator)
}

#[test]
fn a_group_resumes_after_the_coordinators_broker_is_sigkilled() {
    let group = "audit";
    let mut cluster = Cluster::start(3, &[]);
    cluster.create_topic(TOPIC, FAILOVER_PARTITIONS as u32, 3, &[]);
    cluster.wait_in_sync(TOPIC, 3);
    let rt = runtime();
    let bootstrap = cluster.bootstrap();
    let producer = SteadyProducer::start(&rt, &bootstrap, TOPIC, FAILOVER_PARTITIONS);
    let config = group_config().auto_commit(Some(Duration::from_millis(200)));
    let members: Vec<Member> = (1..=2)
        .map(|i| Member::start(&rt, &format!("member-{i}"), &bootstrap, TOPIC, group, config.clone()))
        .collect();
    let (before, committed_before, coordinator) = stable_and_committing(&rt, &bootstrap, &members, group);
    let led = led_by(&cluster, coordinator.id);
    cluster.broker_mut(coordinator.id as u32).kill();
    let kill_round = producer.rounds();
    println!(
        "killed broker {} (the coordinator, leading partitions {led:?} of {TOPIC}) at round {kill_round}; committed before: {committed_before:?}",
        coordinator.id
    );

    let resumed_in = assert_members_keep_receiving(&members, kill_round);
    let produced = producer.stop(&rt);
    let acked: BTreeSet<(i32, u64)> = produced.acked.keys().copied().collect();
    assert_all_read(&rt, &members, &acked);
    let after = snapshots(&rt, &members);
    let positions: BTreeMap<i32, u64> = after
        .iter()
        .flat_map(|s| s.positions.iter().map(|(p, at)| (*p, at.expect("started"))))
        .collect();
    assert_eq!(positions.len(), FAILOVER_PARTITIONS as usize, "{after:?}");
    let survivors = cluster.bootstrap_without(coordinator.id as u32);
    let (committed_after, new_coordinator) = commits_reach(&rt, &survivors, group, &positions);
    let names: Vec<String> = members.iter().map(|m| m.name().to_string()).collect();
    let seen = stop_and_close(&rt, members);
    println!(
        "both members resumed within {resumed_in:?}; broker {} coordinates now; committed after: {committed_after:?}",
        new_coordinator.id
    );

    assert_ne!(new_coordinator.id, coordinator.id);
    for (p, offset) in &committed_before {
        let now = committed_after.get(p).copied();
        assert!(
            now.is_some_and(|now| now >= *offset),
            "partition {p}: committed {offset} before the kill, {now:?} after"
        );
    }
    for (i, name) in names.iter().enumerate() {
        println!(
            "{name}: {} records, events {:?}",
            seen[i].records.len(),
            brief(&seen[i].events)
        );
        // The members outlived the coordinator: same ids, nothing lost.
        assert_eq!(after[i].member_id, before[i].member_id, "{name} kept its membership");
    }
    assert_clean(&names, &seen);
    // At least once: a record handed out twice lies at or after the offset committed before
    // the kill (a member restarting a partition starts there at the earliest).
    let twice = duplicates(&seen);
    println!(
        "{} records acknowledged ({} sends failed), {} delivered, {} of them more than once",
        acked.len(),
        produced.failed.len(),
        seen.iter().map(|s| s.records.len()).sum::<usize>(),
        twice.len()
    );
    for (p, offset) in twice.keys() {
        let floor = committed_before.get(p).copied().unwrap_or(0);
        assert!(
            *offset >= floor,
            "partition {p} offset {offset} was delivered twice, below the offset committed before the kill ({floor})"
        );
    }
}

/// The record the application holds is not finished: asking for a position (or seeking)
/// must not let an automatic commit count it, or a crash while processing it would lose it.
#[test]
fn asking_for_a_position_does_not_commit_the_record_in_hand() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    runtime().block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        client.admin().create_topic("held", 1, &[]).await.expect("create");
        let producer = client
            .producer(conveyor_client::ProducerConfig::default())
            .expect("producer");
        for i in 0..3 {
            let sent = producer
                .send(conveyor_client::ProducerRecord::new("held", format!("r{i}")))
                .await
                .expect("send");
            sent.await.expect("acknowledged");
        }
        let config = GroupConfig::default()
            .auto_commit(Some(Duration::from_millis(100)))
            .reset(OffsetReset::Earliest);
        let mut member = client
            .consumer(conveyor_client::ConsumerConfig::default())
            .subscribe(&["held"], "holding", config)
            .expect("subscribe");
        use futures::StreamExt;
        let first = member.next().await.expect("a record").expect("record");
        // Several automatic commits fall due while the record is in hand and positions are
        // asked for; none may commit past it.
        let watch_until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < watch_until {
            assert_eq!(member.position("held", first.partition), Some(first.offset + 1));
            let committed = client
                .groups()
                .fetch_offsets("holding", &[])
                .await
                .expect("fetch offsets");
            assert!(
                committed.iter().all(|c| c.offset <= first.offset),
                "the record in hand (offset {}) was committed as finished: {committed:?}",
                first.offset
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Asking for the next record finishes it; the automatic commit then takes it.
        let _second = member.next().await.expect("a record").expect("record");
        let committed = wait_for_commit(&client, "holding", first.offset + 1).await;
        assert!(committed > first.offset);
        member.close().await.expect("close");
    });
}

async fn wait_for_commit(client: &Client, group: &str, at_least: u64) -> u64 {
    let started = Instant::now();
    loop {
        let committed = client.groups().fetch_offsets(group, &[]).await.expect("fetch offsets");
        if let Some(c) = committed.iter().map(|c| c.offset).max().filter(|o| *o >= at_least) {
            return c;
        }
        assert!(started.elapsed() < DEADLINE, "nothing committed up to {at_least}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
