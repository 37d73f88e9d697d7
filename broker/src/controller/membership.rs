//! Cluster membership: adding and removing brokers, and moving a partition's replica from
//! one broker to another.
//!
//! # Design
//! The controller drives every change as a sequence of steps, each durable on its own:
//! metadata records in the controller log, and single-step Raft membership changes made by
//! the leader of the group concerned (reached over `conveyor.internal.v1.Raft/
//! ChangeMembership`). A step already in effect succeeds at once, so a change that failed
//! half-way (a controller failover, a timeout) is finished by asking for it again.
//!
//! Moving a replica from `from` to `to`: record the replica set with `to` added (so `to`
//! opens an empty replica), add `to` to the group as a learner, promote it once it has caught
//! up, remove `from` (a leader being removed first hands leadership to the most caught-up
//! voter), and record the replica set without `from` (so `from` stops and deletes its copy).
//! The group keeps its replication factor or more throughout, so a crash at any point loses
//! no acknowledged write.
//!
//! # Locking and deadlines
//! An operation runs as a background job on the controller ([`crate::controller::admin_ops`]) and takes
//! the metadata change lock only around each record it proposes ([`ChangeContext::propose`]),
//! never across a step that waits on another broker, so topic changes go on meanwhile. It
//! reports each step to its progress, which a call that reaches its deadline answers with.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use conveyor_proto::internal::v1::{
    BrokerDraining, BrokerRegistered, BrokerRemoved, PartitionReassigned, metadata_record,
};

use crate::controller::admin_ops::ChangeContext;
use crate::controller::{Registry, Topic};
use crate::error::{BrokerError, Result};
use crate::replica::membership::{RETRY_EVERY, change_group};
use crate::replica::proposal::MemberChange;
use crate::replica::transport::CONTROLLER_TOPIC;

/// How long adding, or removing, a member may wait for its group to accept it.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new replica may take to catch up before promotion gives up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a broker being removed may take to catch up with the controller log.
const METADATA_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// A follower with the whole log learns that it is committed with the leader's next message
/// (a heartbeat every 150 ms at most).
const COMMIT_HEARD_WITHIN: Duration = Duration::from_millis(500);

/// One replica moved off a broker being removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMove {
    pub topic: String,
    pub partition: i32,
    pub from: u32,
    pub to: u32,
}

/// Makes one membership change step in the controller group, whose voters are `members`.
async fn change_controller_group(registry: &Registry, members: &[u32], step: MemberChange) -> Result<()> {
    change_group(registry, CONTROLLER_TOPIC, 0, members, step, STEP_TIMEOUT).await
}

/// Adds broker `id` at `address` to the cluster (controller only): registers its address,
/// adds it to the controller group as a learner, and promotes it once it has caught up.
pub async fn add_broker(cx: &ChangeContext<'_>, id: u32, address: &str) -> Result<()> {
    let registry = cx.registry;
    if id == 0 {
        return Err(BrokerError::InvalidRequest("broker ids start at 1".into()));
    }
    if !crate::config::is_host_port(address) {
        return Err(BrokerError::InvalidRequest(format!(
            "broker address '{address}' is not HOST:PORT"
        )));
    }
    let members = registry.members();
    let (voters, _) = registry.metadata_partition().members();
    if voters.contains(&id) {
        return Ok(());
    }
    if !members.contains(&id) || registry.transport().raft_address(id).is_none() {
        cx.progress.step("step 1 of 3 (registering its address)");
        cx.propose(metadata_record::Change::BrokerRegistered(BrokerRegistered {
            id,
            address: address.to_string(),
        }))
        .await?;
    }
    cx.progress.step(format!(
        "step 2 of 3 (adding broker {id} to the controller group as a learner)"
    ));
    change_controller_group(registry, &members, MemberChange::AddLearner(u64::from(id))).await?;
    cx.progress.step(format!(
        "step 3 of 3 (promoting broker {id} once it has caught up with the cluster metadata)"
    ));
    change_controller_group(registry, &members, MemberChange::Promote(u64::from(id)))
        .await
        .map_err(|e| match e {
            BrokerError::MembershipChanging { .. } => BrokerError::MembershipChanging {
                topic: CONTROLLER_TOPIC.into(),
                partition: 0,
                reason: format!(
                    "broker {id} was added as a learner but has not caught up with the cluster metadata; \
                 make sure it is running with --join and reachable at {address}, then run add-node again"
                ),
            },
            other => other,
        })
}

/// The moves that take every replica off broker `id`, onto the least loaded live brokers
/// that hold no replica of the partition yet.
fn plan_moves(registry: &Registry, id: u32) -> Result<Vec<ReplicaMove>> {
    let candidates: Vec<u32> = registry.placeable_brokers().into_iter().filter(|&b| b != id).collect();
    let topics = registry.list();
    let mut load: BTreeMap<u32, usize> = candidates.iter().map(|&b| (b, 0)).collect();
    for t in &topics {
        for replicas in &t.assignments {
            for b in replicas {
                if let Some(n) = load.get_mut(b) {
                    *n += 1;
                }
            }
        }
    }
    let mut moves = Vec::new();
    for t in &topics {
        for (p, replicas) in t.assignments.iter().enumerate() {
            if !replicas.contains(&id) {
                continue;
            }
            // A move that stopped half-way left its new replica last: finish that one.
            let resumed = (replicas.len() > t.replication_factor as usize)
                .then(|| replicas.last().copied())
                .flatten()
                .filter(|&b| b != id);
            let to = match resumed {
                Some(to) => to,
                None => {
                    let best = load
                        .iter()
                        .filter(|(b, _)| !replicas.contains(b))
                        .min_by_key(|(b, n)| (**n, **b))
                        .map(|(b, _)| *b);
                    let Some(to) = best else {
                        return Err(BrokerError::CannotRemoveBroker {
                            id,
                            reason: format!(
                                "topic '{}' partition {p} has {} replica(s) and no other live broker can take the one on broker {id}; add a broker first",
                                t.name,
                                replicas.len()
                            ),
                        });
                    };
                    to
                }
            };
            if let Some(n) = load.get_mut(&to) {
                *n += 1;
            }
            moves.push(ReplicaMove {
                topic: t.name.clone(),
                partition: p as i32,
                from: id,
                to,
            });
        }
    }
    Ok(moves)
}

/// The metadata record that sets a partition's replica list.
fn reassigned(topic: &Topic, partition: i32, replicas: Vec<u32>) -> metadata_record::Change {
    metadata_record::Change::PartitionReassigned(PartitionReassigned {
        topic: topic.name.clone(),
        topic_id: topic.id.clone(),
        partition,
        replicas,
    })
}

/// Moves one replica of a partition from one broker to another (controller only); `which`
/// says which move of the operation this is ("move 1 of 3"), for its progress.
pub async fn move_replica(cx: &ChangeContext<'_>, m: &ReplicaMove, which: &str) -> Result<()> {
    let registry = cx.registry;
    let topic = registry.get(&m.topic)?;
    let index = m.partition as usize;
    let current = topic.assignments.get(index).cloned().unwrap_or_default();
    let record = |replicas: Vec<u32>| reassigned(&topic, m.partition, replicas);
    let step = |n: usize, doing: String| {
        cx.progress.step(format!(
            "{which} (topic '{}' partition {} from broker {} to {}), step {n} of 5 ({doing})",
            m.topic, m.partition, m.from, m.to
        ));
    };
    let mut widened = current.clone();
    if !widened.contains(&m.to) {
        widened.push(m.to);
        step(1, format!("recording broker {} as a new replica", m.to));
        cx.propose(record(widened.clone())).await?;
    }
    tracing::info!(topic = %m.topic, partition = m.partition, from = m.from, to = m.to, "moving replica");
    let (to, from) = (u64::from(m.to), u64::from(m.from));
    let steps = [
        (
            MemberChange::AddLearner(to),
            STEP_TIMEOUT,
            format!("adding broker {} as a learner", m.to),
        ),
        (
            MemberChange::Promote(to),
            CATCH_UP_TIMEOUT,
            format!("promoting broker {} once it has caught up", m.to),
        ),
        (
            MemberChange::Remove(from),
            STEP_TIMEOUT,
            format!("removing broker {} from the group", m.from),
        ),
    ];
    for (n, (change, timeout, doing)) in steps.into_iter().enumerate() {
        step(n + 2, doing);
        change_group(registry, &m.topic, m.partition, &widened, change, timeout).await?;
    }
    let narrowed: Vec<u32> = widened.into_iter().filter(|&b| b != m.from).collect();
    step(5, format!("recording the replica list without broker {}", m.from));
    cx.propose(record(narrowed)).await?;
    Ok(())
}

/// Waits, at most [`METADATA_CATCH_UP_TIMEOUT`], until broker `id` has the whole controller
/// log and has had time to hear that it is committed. Once out of the controller group it
/// hears nothing more, and it must first apply the records that took its replicas away, or
/// it keeps their data. A broker that is down is not waited for.
async fn wait_for_metadata(registry: &Registry, id: u32) {
    let deadline = Instant::now() + METADATA_CATCH_UP_TIMEOUT;
    let mut caught_up_since: Option<Instant> = None;
    while Instant::now() < deadline && registry.transport().is_alive(id) {
        let status = registry.metadata_partition().status();
        let lag = status.followers.iter().find(|f| f.id == id).map(|f| f.lag);
        if lag == Some(0) {
            if caught_up_since.get_or_insert_with(Instant::now).elapsed() >= COMMIT_HEARD_WITHIN {
                return;
            }
        } else {
            caught_up_since = None;
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
    tracing::warn!(
        broker = id,
        "broker being removed did not catch up with the cluster metadata; it may keep data of replicas moved away"
    );
}

/// Removes broker `id` from the cluster (controller only, and not the controller itself):
/// moves its replicas away, then takes it out of the controller group.
pub async fn remove_broker(cx: &ChangeContext<'_>, id: u32) -> Result<Vec<ReplicaMove>> {
    let registry = cx.registry;
    let members = registry.members();
    if !members.contains(&id) {
        return Err(BrokerError::UnknownBroker(id));
    }
    if members.len() == 1 {
        return Err(BrokerError::CannotRemoveBroker {
            id,
            reason: "it is the only broker of the cluster".into(),
        });
    }
    if id == registry.transport().node_id() {
        return Err(BrokerError::Internal(
            "the controller cannot remove itself; move the controller first".into(),
        ));
    }
    // Refused before anything changes when a replica has nowhere to go.
    plan_moves(registry, id)?;
    if !registry.draining().contains(&id) {
        cx.progress.step(format!("recording that broker {id} is draining"));
        cx.propose(metadata_record::Change::BrokerDraining(BrokerDraining { id }))
            .await?;
    }
    // Planned once the broker is draining: a topic created meanwhile places nothing on it,
    // and one created before the record is in this plan.
    let moves = plan_moves(registry, id)?;
    for (i, m) in moves.iter().enumerate() {
        move_replica(cx, m, &format!("move {} of {}", i + 1, moves.len())).await?;
    }
    cx.progress
        .step(format!("waiting for broker {id} to apply the cluster metadata"));
    wait_for_metadata(registry, id).await;
    cx.progress
        .step(format!("taking broker {id} out of the controller group"));
    change_controller_group(registry, &members, MemberChange::Remove(u64::from(id))).await?;
    cx.progress.step(format!("recording the removal of broker {id}"));
    cx.propose(metadata_record::Change::BrokerRemoved(BrokerRemoved { id }))
        .await?;
    tracing::info!(broker = id, moved = moves.len(), "broker removed from the cluster");
    Ok(moves)
}

/// Moves a partition's replicas onto exactly `target` (controller only), one move at a
/// time: each replica that leaves is replaced by one that arrives. A move that stopped
/// half-way (an extra replica last) is finished: its extra replica stays if `target` names it
/// and is removed otherwise. Finally the list takes `target`'s order, whose first replica is
/// the preferred leader.
pub async fn reassign(cx: &ChangeContext<'_>, topic: &str, partition: i32, target: &[u32]) -> Result<Vec<ReplicaMove>> {
    let registry = cx.registry;
    let (t, current) = replicas_now(registry, topic, partition)?;
    check_target(registry, &t, partition, &current, target)?;
    // A move that stopped half-way may have left a listed replica outside the group (never
    // added, or already removed): every replica that stays is made a voter before any other
    // leaves. Each step is a no-op for a replica that already votes.
    if current.len() > t.replication_factor as usize {
        for &b in current.iter().filter(|b| target.contains(b)) {
            let id = u64::from(b);
            cx.progress.step(format!(
                "finishing an interrupted move: making broker {b} a voter once it has caught up"
            ));
            change_group(
                registry,
                topic,
                partition,
                &current,
                MemberChange::AddLearner(id),
                STEP_TIMEOUT,
            )
            .await?;
            change_group(
                registry,
                topic,
                partition,
                &current,
                MemberChange::Promote(id),
                CATCH_UP_TIMEOUT,
            )
            .await?;
        }
    }
    let leaving: Vec<u32> = current.iter().copied().filter(|b| !target.contains(b)).collect();
    let arriving: Vec<u32> = target.iter().copied().filter(|b| !current.contains(b)).collect();
    let moves: Vec<ReplicaMove> = leaving
        .iter()
        .zip(&arriving)
        .map(|(&from, &to)| ReplicaMove {
            topic: topic.to_string(),
            partition,
            from,
            to,
        })
        .collect();
    for (i, m) in moves.iter().enumerate() {
        move_replica(cx, m, &format!("move {} of {}", i + 1, moves.len())).await?;
    }
    // Left over when a half-done move's extra replica is not wanted.
    for &from in leaving.iter().skip(arriving.len()) {
        cx.progress.step(format!("removing the extra replica on broker {from}"));
        let (t, replicas) = replicas_now(registry, topic, partition)?;
        change_group(
            registry,
            topic,
            partition,
            &replicas,
            MemberChange::Remove(u64::from(from)),
            STEP_TIMEOUT,
        )
        .await?;
        let narrowed = replicas.into_iter().filter(|&b| b != from).collect();
        cx.propose(reassigned(&t, partition, narrowed)).await?;
    }
    let (t, replicas) = replicas_now(registry, topic, partition)?;
    if replicas != target {
        cx.progress.step("recording the final replica order");
        cx.propose(reassigned(&t, partition, target.to_vec())).await?;
    }
    if !moves.is_empty() {
        tracing::info!(topic, partition, ?target, moved = moves.len(), "partition reassigned");
    }
    Ok(moves)
}

/// A partition's topic and replica list as they stand now: a topic may be deleted, or
/// recreated with fewer partitions, while a reassignment waits on its steps.
fn replicas_now(registry: &Registry, topic: &str, partition: i32) -> Result<(std::sync::Arc<Topic>, Vec<u32>)> {
    let t = registry.get(topic)?;
    t.check_index(partition)?;
    let replicas = t.assignments[partition as usize].clone();
    Ok((t, replicas))
}

/// Refuses a target replica list that the partition cannot take, before anything changes.
fn check_target(registry: &Registry, t: &Topic, partition: i32, current: &[u32], target: &[u32]) -> Result<()> {
    let invalid = |why: String| {
        Err(BrokerError::InvalidRequest(format!(
            "cannot reassign topic '{}' partition {partition} to {target:?}: {why}",
            t.name
        )))
    };
    let rf = t.replication_factor as usize;
    if target.len() != rf {
        return invalid(format!("the topic has replication factor {rf}, so name {rf} broker(s)"));
    }
    if target.iter().collect::<BTreeSet<_>>().len() != target.len() {
        return invalid("a broker is named twice".into());
    }
    let placeable = registry.placeable_brokers();
    if let Some(b) = target.iter().find(|b| !current.contains(b) && !placeable.contains(b)) {
        return invalid(format!(
            "broker {b} cannot take a new replica (it is not a live member of the cluster, or it is being removed)"
        ));
    }
    Ok(())
}
