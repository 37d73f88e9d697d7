//! Membership (KIP-848's consumer protocol): joining, heartbeats, leaving, session and
//! rebalance timeouts, and the reconciliation that moves each member toward its target
//! assignment.
//!
//! A member gives up partitions before anyone gets them: when its target drops some of
//! what it owns, they move to `pending_revocation` and the member keeps its epoch; once a
//! heartbeat shows it no longer owns them, it moves to the assignment's epoch and takes the
//! target partitions no other member owns or is still revoking. So no partition is ever
//! owned by two members, and partitions that do not move are never interrupted.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use conveyor_proto::internal::v1::{GroupMemberValue, GroupMetadataValue, GroupPartition};

use super::assignor::{Assignors, DEFAULT_ASSIGNOR, TopicPartition};
use super::state::{Group, GroupsState, at_target, set, tp};
use super::target::{self, Topics};
use crate::error::{BrokerError, Result};

/// Epoch of a heartbeat that joins.
pub const JOIN: i32 = 0;
/// Epoch of a heartbeat that leaves the group.
pub const LEAVE: i32 = -1;
/// Epoch of a heartbeat by which a static member leaves for now, keeping its assignment
/// for its session timeout.
pub const LEAVE_FOR_NOW: i32 = -2;
/// Most members one group may have.
pub const MAX_MEMBERS: usize = 1000;
/// How often a member waiting to give up or receive partitions is asked to heartbeat.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);
/// How long after its epoch moved a group's members are all asked to heartbeat every
/// [`RECONCILE_INTERVAL`]: members that start together (or a burst of joins) then settle
/// in a few short rounds instead of a heartbeat interval each.
pub const SETTLE_WINDOW: Duration = Duration::from_secs(2);

/// The coordinator's membership settings (`[groups]` in the broker config).
#[derive(Debug, Clone)]
pub struct Settings {
    pub heartbeat_interval: Duration,
    pub session_timeout: Duration,
    pub min_session_timeout: Duration,
    pub max_session_timeout: Duration,
    pub rebalance_timeout: Duration,
}

/// What a member asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub topics: Vec<String>,
    pub regex: String,
    pub assignor: String,
}

/// One heartbeat, validated.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub group: String,
    pub member_id: String,
    pub epoch: i32,
    pub instance_id: String,
    pub subscription: Option<Subscription>,
    pub owned: BTreeSet<TopicPartition>,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
}

/// What the coordinator answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub member_id: String,
    pub epoch: i32,
    pub interval: Duration,
    /// The member's session timeout, as the coordinator applies it.
    pub session_timeout: Duration,
    pub assignment: BTreeSet<TopicPartition>,
}

/// What a heartbeat depends on besides the group.
pub struct Env<'a> {
    pub now_ms: i64,
    pub settings: &'a Settings,
    pub topics: &'a Topics,
    pub assignors: &'a Assignors,
    /// Current lag per subscribed partition of a group (for the lag-aware assignor).
    pub lags: &'a (dyn Fn(&Group) -> HashMap<TopicPartition, u64> + Sync),
    /// The id a joining member gets.
    pub new_member_id: String,
}

impl std::fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("now_ms", &self.now_ms)
            .field("topics", &self.topics)
            .field("new_member_id", &self.new_member_id)
            .finish_non_exhaustive()
    }
}

/// A heartbeat's outcome: the group as it is to become, the answer, and whether the group
/// went through a rebalance (its epoch moved).
#[derive(Debug)]
pub struct Outcome {
    pub group: Group,
    pub answer: Answer,
    pub rebalanced: bool,
}

/// Checks a subscription before it is taken: exactly one of topics and regex, a regex that
/// compiles, an assignor the broker knows.
pub fn check_subscription(s: &Subscription, assignors: &Assignors) -> Result<()> {
    if s.topics.is_empty() == s.regex.is_empty() {
        return Err(BrokerError::InvalidRequest(
            "a subscription names topics or a regex, exactly one of them".into(),
        ));
    }
    if !s.regex.is_empty() {
        target::compile(&s.regex)?;
    }
    if !s.assignor.is_empty() {
        assignors
            .get(&s.assignor)
            .map_err(|e| BrokerError::InvalidRequest(e.to_string()))?;
    }
    Ok(())
}

fn subscription_of(m: &GroupMemberValue) -> Subscription {
    Subscription {
        topics: m.topics.clone(),
        regex: m.regex.clone(),
        assignor: m.assignor.clone(),
    }
}

/// Applies one heartbeat to (a copy of) the group.
pub fn heartbeat(old: Option<&Group>, hb: &Heartbeat, env: &Env<'_>) -> Result<Outcome> {
    let mut g = old.cloned().unwrap_or_default();
    let epoch_before = g.epoch();
    let mut bump = false;
    let member_id = match hb.epoch {
        JOIN => {
            let sub = hb.subscription.as_ref().ok_or_else(|| {
                BrokerError::InvalidRequest("a member joining (epoch 0) must send its subscription".into())
            })?;
            check_subscription(sub, env.assignors)?;
            // A member id sent with epoch 0 is an old incarnation starting over.
            if !hb.member_id.is_empty() && g.members.remove(&hb.member_id).is_some() {
                bump = true;
            }
            let replaced = (!hb.instance_id.is_empty())
                .then(|| {
                    g.members
                        .iter()
                        .find(|(_, m)| m.instance_id == hb.instance_id)
                        .map(|(id, _)| id.clone())
                })
                .flatten();
            let mut m = match replaced.and_then(|id| g.members.remove(&id)) {
                // The static member is back: same assignment and epoch, no rebalance.
                Some(m) => m,
                None => {
                    if g.members.len() >= MAX_MEMBERS {
                        return Err(BrokerError::InvalidRequest(format!(
                            "group '{}' has {MAX_MEMBERS} members, the most a group may have",
                            hb.group
                        )));
                    }
                    bump = true;
                    GroupMemberValue::default()
                }
            };
            if subscription_of(&m) != *sub {
                bump = true;
            }
            m.topics = sub.topics.clone();
            m.regex = sub.regex.clone();
            m.assignor = sub.assignor.clone();
            m.instance_id = hb.instance_id.clone();
            m.away = false;
            m.session_timeout_ms = hb.session_timeout.as_millis() as u32;
            m.rebalance_timeout_ms = hb.rebalance_timeout.as_millis() as u32;
            // A member that chose its id keeps it: its retried join replaces itself.
            let id = if hb.member_id.is_empty() {
                env.new_member_id.clone()
            } else {
                hb.member_id.clone()
            };
            g.members.insert(id.clone(), m);
            id
        }
        LEAVE | LEAVE_FOR_NOW => {
            let leaving_for_now = hb.epoch == LEAVE_FOR_NOW;
            match g.members.get_mut(&hb.member_id) {
                Some(m) if leaving_for_now && !m.instance_id.is_empty() => {
                    // It gave up what it was asked to before leaving: others may have it.
                    m.away = true;
                    m.pending_revocation.clear();
                }
                Some(_) => {
                    g.members.remove(&hb.member_id);
                    bump = true;
                }
                // Gone already (expired, or a retried leave): leaving again is done.
                None => {}
            }
            hb.member_id.clone()
        }
        e if e > 0 => {
            let m = g
                .members
                .get_mut(&hb.member_id)
                .ok_or_else(|| BrokerError::UnknownMember {
                    group: hb.group.clone(),
                    member: hb.member_id.clone(),
                })?;
            check_epoch(&hb.group, &hb.member_id, m, e, &hb.owned)?;
            if let Some(sub) = &hb.subscription
                && subscription_of(m) != *sub
            {
                check_subscription(sub, env.assignors)?;
                m.topics = sub.topics.clone();
                m.regex = sub.regex.clone();
                m.assignor = sub.assignor.clone();
                bump = true;
            }
            m.away = false;
            hb.member_id.clone()
        }
        other => {
            return Err(BrokerError::InvalidRequest(format!(
                "member epoch {other} is not valid: 0 joins, -1 leaves, -2 leaves for now, otherwise the epoch last received"
            )));
        }
    };
    settle(&mut g, bump, env)?;
    let answer = if hb.epoch == LEAVE || hb.epoch == LEAVE_FOR_NOW {
        Answer {
            member_id,
            epoch: hb.epoch,
            interval: Duration::ZERO,
            session_timeout: hb.session_timeout,
            assignment: BTreeSet::new(),
        }
    } else {
        reconcile(&mut g, &member_id, &hb.owned);
        answer_for(&g, &member_id, env.settings)
    };
    let rebalanced = g.epoch() != epoch_before;
    Ok(Outcome {
        group: g,
        answer,
        rebalanced,
    })
}

/// A heartbeat's epoch must be the member's, or an older one sent because an answer was
/// lost, in which case the member may not claim more than it holds.
fn check_epoch(
    group: &str,
    member: &str,
    m: &GroupMemberValue,
    epoch: i32,
    owned: &BTreeSet<TopicPartition>,
) -> Result<()> {
    let fenced = |reason: String| BrokerError::FencedMemberEpoch {
        group: group.to_string(),
        member: member.to_string(),
        reason,
    };
    if epoch > m.member_epoch {
        return Err(fenced(format!(
            "epoch {epoch} is newer than the member's epoch {}",
            m.member_epoch
        )));
    }
    if epoch < m.member_epoch {
        let held: BTreeSet<TopicPartition> = set(&m.assigned).union(&set(&m.pending_revocation)).cloned().collect();
        if !owned.is_subset(&held) {
            return Err(fenced(format!(
                "epoch {epoch} is older than the member's epoch {} and it claims partitions it does not hold",
                m.member_epoch
            )));
        }
    }
    Ok(())
}

/// Brings the group's metadata up to date: creates it, bumps the epoch if asked or if the
/// subscribed topics changed, and computes a new target assignment when the epoch moved.
fn settle(g: &mut Group, mut bump: bool, env: &Env<'_>) -> Result<()> {
    if g.members.is_empty() && g.meta.is_none() {
        return Ok(());
    }
    let subscribed = target::subscribed(g, env.topics);
    let meta = g.meta.get_or_insert_with(|| GroupMetadataValue {
        assignor: DEFAULT_ASSIGNOR.to_string(),
        created_ms: env.now_ms,
        ..GroupMetadataValue::default()
    });
    if meta
        .subscribed_partitions
        .iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        != subscribed.iter().collect::<std::collections::BTreeMap<_, _>>()
    {
        meta.subscribed_partitions = subscribed.into_iter().collect();
        bump = true;
    }
    if bump {
        meta.epoch = meta.epoch.saturating_add(1);
    }
    if meta.epoch > meta.assignment_epoch {
        let lags = (env.lags)(g);
        target::assign(g, env.topics, env.assignors, &lags)
            .map_err(|e| BrokerError::AssignmentFailed(e.to_string()))?;
    }
    Ok(())
}

/// Moves one member toward its target (see the module docs). `owned`: what its heartbeat
/// says it owns.
pub fn reconcile(g: &mut Group, member_id: &str, owned: &BTreeSet<TopicPartition>) {
    let Some(assignment_epoch) = g.meta.as_ref().map(|m| m.assignment_epoch) else {
        return;
    };
    let owners: HashMap<TopicPartition, String> = g.owners().into_iter().map(|(p, o)| (p, o.to_string())).collect();
    let Some(m) = g.members.get_mut(member_id) else {
        return;
    };
    if !m.pending_revocation.is_empty() {
        if set(&m.pending_revocation).iter().any(|p| owned.contains(p)) {
            return;
        }
        m.pending_revocation.clear();
    }
    let target = set(&m.target);
    let (keep, revoke): (Vec<GroupPartition>, Vec<GroupPartition>) = std::mem::take(&mut m.assigned)
        .into_iter()
        .partition(|p| target.contains(&tp(p)));
    m.assigned = keep;
    if !revoke.is_empty() {
        m.pending_revocation = revoke;
        return;
    }
    m.member_epoch = assignment_epoch;
    let held = set(&m.assigned);
    for p in target {
        let free = owners.get(&p).is_none_or(|o| o == member_id);
        if free && !held.contains(&p) {
            m.assigned.push(GroupPartition {
                topic: p.topic,
                partition: p.partition,
                epoch: assignment_epoch,
            });
        }
    }
    m.assigned
        .sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
}

/// The answer for a member: what it owns now, and when to heartbeat next (soon while it
/// is not at its target yet).
pub fn answer_for(g: &Group, member_id: &str, settings: &Settings) -> Answer {
    let m = g.members.get(member_id);
    let session = m.map_or(settings.session_timeout, |m| {
        Duration::from_millis(u64::from(m.session_timeout_ms))
    });
    let mut interval = settings.heartbeat_interval.min(session / 3);
    let assignment_epoch = g.meta.as_ref().map_or(0, |m| m.assignment_epoch);
    if m.is_some_and(|m| !at_target(m, assignment_epoch)) {
        interval = interval.min(RECONCILE_INTERVAL);
    }
    Answer {
        member_id: member_id.to_string(),
        epoch: m.map_or(0, |m| m.member_epoch),
        interval,
        session_timeout: session,
        assignment: m.map(|m| set(&m.assigned)).unwrap_or_default(),
    }
}

/// Members whose session or rebalance timeout passed, by group: removed from `state`'s
/// copies of their groups, which are returned (with the target recomputed) to be written.
pub fn expire(state: &GroupsState, now: Instant, env: &Env<'_>) -> Vec<(String, Group, Vec<String>)> {
    let mut out = Vec::new();
    for (name, sessions) in &state.sessions {
        let expired: Vec<String> = sessions
            .iter()
            .filter(|(_, s)| s.expired(now))
            .map(|(id, _)| id.clone())
            .collect();
        let Some(group) = state.groups.get(name).filter(|_| !expired.is_empty()) else {
            continue;
        };
        let mut g = group.clone();
        for id in &expired {
            g.members.remove(id);
        }
        if let Err(e) = settle(&mut g, true, env) {
            // Keep the members out even so: the assignment is recomputed once it can be.
            tracing::warn!(group = %name, error = %e, "group assignment failed after members expired");
        }
        out.push((name.clone(), g, expired));
    }
    out
}

/// Groups whose subscribed topics changed (created, deleted, given partitions), with their
/// new epoch and target.
pub fn topics_changed(state: &GroupsState, env: &Env<'_>) -> Vec<(String, Group)> {
    let mut out = Vec::new();
    for (name, group) in &state.groups {
        let Some(meta) = &group.meta else { continue };
        if group.members.is_empty() {
            continue;
        }
        let now: std::collections::BTreeMap<String, i32> = target::subscribed(group, env.topics);
        let before: std::collections::BTreeMap<String, i32> = meta
            .subscribed_partitions
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if now == before {
            continue;
        }
        let mut g = group.clone();
        match settle(&mut g, false, env) {
            Ok(()) => out.push((name.clone(), g)),
            Err(e) => tracing::warn!(group = %name, error = %e, "group assignment failed after its topics changed"),
        }
    }
    out
}
