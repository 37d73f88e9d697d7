//! The consumer group coordinator (KIP-848's protocol): membership driven by heartbeats,
//! target assignments from pluggable [`assignor`]s, cooperative reconciliation, and
//! committed offsets, all kept as records of `__consumer_offsets` through the
//! [`host`](crate::coordinator::host) substrate. `docs/consumer-groups.md` describes it.
//!
//! - [`records`]: record keys; [`state`]: the state machine they rebuild.
//! - [`membership`]: heartbeats, reconciliation, timeouts; [`target`]: subscriptions and
//!   target assignments.
//! - [`offsets`]: commits, offset fetches, resets and deletion; [`describe`]: listing and
//!   describing groups, lag and its metrics.

pub mod assignor;
pub mod describe;
pub mod gauges;
pub mod membership;
pub mod offsets;
pub mod records;
pub mod state;
pub mod target;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use assignor::{Assignors, TopicPartition};
use membership::{Answer, Env, Heartbeat, Settings};
use state::{Group, GroupsState, at_target};

use crate::controller::Registry;
use crate::coordinator::host::name_subject as name_group;
use crate::coordinator::host::{Host, Shard};
use crate::coordinator::internal_topic::{self, CONSUMER_OFFSETS};
use crate::error::{BrokerError, Result};

/// Longest group id accepted.
pub const MAX_GROUP_ID_LEN: usize = 255;
/// Most groups one `__consumer_offsets` partition holds (160,000 over the default 16
/// partitions): memory must not grow with what clients make up.
pub const MAX_GROUPS_PER_PARTITION: usize = 10_000;

/// Refuses to create `group` in a state that holds as many groups as it may.
fn room_for(st: &GroupsState, group: &str) -> Result<()> {
    if st.groups.len() >= MAX_GROUPS_PER_PARTITION && !st.groups.contains_key(group) {
        return Err(BrokerError::InvalidRequest(format!(
            "cannot create group '{group}': its __consumer_offsets partition holds {MAX_GROUPS_PER_PARTITION} groups, the most it may; delete unused groups (conveyor group delete)"
        )));
    }
    Ok(())
}
/// How often sessions are checked and led partitions loaded.
const TICK: Duration = Duration::from_millis(250);
/// How often the log ends behind lag (metrics, the lag-aware assignor) are refreshed.
const LAG_REFRESH: Duration = Duration::from_secs(5);

/// The coordinator's settings (`[groups]` in the broker config).
#[derive(Debug, Clone)]
pub struct GroupsConfig {
    pub settings: Settings,
    /// Partitions and replication factor of `__consumer_offsets` when it is created (0:
    /// min(3, brokers)).
    pub partitions: u32,
    pub replication_factor: u32,
}

/// Counters the coordinator keeps (see [`describe`] for the gauges).
#[derive(Debug, Default)]
pub struct GroupMetrics {
    pub rebalances: crate::metrics::Counter,
    pub offsets_committed: crate::metrics::Counter,
    pub heartbeats: crate::metrics::Counter,
    pub members_expired: crate::metrics::Counter,
}

/// The consumer group coordinator of this broker: one state per `__consumer_offsets`
/// partition it leads.
pub struct GroupCoordinator {
    host: Host<GroupsState>,
    registry: Arc<Registry>,
    admin_lock: Arc<tokio::sync::Mutex<()>>,
    config: GroupsConfig,
    assignors: Assignors,
    pub metrics: Arc<GroupMetrics>,
    /// High watermarks of subscribed partitions, refreshed every [`LAG_REFRESH`].
    log_ends: Mutex<HashMap<TopicPartition, u64>>,
    /// Per group, partition and lag, as of the last refresh (for the metrics endpoint).
    pub(crate) lag_view: Mutex<Vec<describe::GroupGauges>>,
    next_member: AtomicU64,
    /// Partitions being loaded by the timers.
    loading: Mutex<std::collections::HashSet<i32>>,
}

impl std::fmt::Debug for GroupCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCoordinator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl GroupCoordinator {
    pub fn new(
        registry: Arc<Registry>,
        admin_lock: Arc<tokio::sync::Mutex<()>>,
        config: GroupsConfig,
        assignors: Assignors,
    ) -> GroupCoordinator {
        GroupCoordinator {
            host: Host::new(CONSUMER_OFFSETS, Arc::clone(&registry), GroupsState::default),
            registry,
            admin_lock,
            config,
            assignors,
            metrics: Arc::default(),
            log_ends: Mutex::default(),
            lag_view: Mutex::default(),
            next_member: AtomicU64::new(0),
            loading: Mutex::default(),
        }
    }

    pub fn node_id(&self) -> u32 {
        self.registry.transport().node_id()
    }

    pub fn settings(&self) -> &Settings {
        &self.config.settings
    }

    pub fn assignors(&self) -> &Assignors {
        &self.assignors
    }

    /// Checks a group id: 1 to 255 bytes.
    pub fn check_group_id(group: &str) -> Result<()> {
        if group.is_empty() || group.len() > MAX_GROUP_ID_LEN {
            return Err(BrokerError::InvalidRequest(format!(
                "a group id must be 1 to {MAX_GROUP_ID_LEN} bytes long, got {} bytes",
                group.len()
            )));
        }
        Ok(())
    }

    /// `__consumer_offsets`, created if it does not exist yet.
    async fn offsets_topic(&self) -> Result<Arc<crate::controller::Topic>> {
        internal_topic::ensure_exists(
            &self.registry,
            &self.admin_lock,
            CONSUMER_OFFSETS,
            self.config.partitions,
            self.config.replication_factor,
            internal_topic::TopicKind::Internal,
        )
        .await
    }

    /// The `__consumer_offsets` partition holding `group`.
    async fn partition_of(&self, group: &str) -> Result<i32> {
        Self::check_group_id(group)?;
        let topic = self.offsets_topic().await?;
        Ok(internal_topic::partition_for(group, topic.partition_count() as u32))
    }

    /// Where `group`'s coordinator is: (broker, its address, the partition).
    pub async fn find(&self, group: &str) -> Result<(u32, String, i32)> {
        let index = self.partition_of(group).await?;
        let topic = self.offsets_topic().await?;
        let (leader, address) = crate::coordinator::host::coordinator_at(&self.registry, &topic, index, group)?;
        Ok((leader, address, index))
    }

    /// The loaded state of the partition holding `group`, if this broker coordinates it.
    async fn shard_for(&self, group: &str) -> Result<Arc<Shard<GroupsState>>> {
        let index = self.partition_of(group).await?;
        self.host.shard(index, group).await.map_err(|e| name_group(e, group))
    }

    fn new_member_id(&self) -> String {
        let n = self.next_member.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        format!("m-{}-{nanos:x}-{n}", self.registry.transport().node_id())
    }

    /// Current lag of each subscribed partition of `group`, from the last refreshed ends.
    fn lags_of(&self, group: &Group) -> HashMap<TopicPartition, u64> {
        let ends = self.log_ends.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(meta) = &group.meta else {
            return HashMap::new();
        };
        let mut lags = HashMap::new();
        for (topic, count) in &meta.subscribed_partitions {
            for partition in 0..*count {
                let p = TopicPartition::new(topic.clone(), partition);
                if let Some(end) = ends.get(&p) {
                    let committed = group.offsets.get(&p).map_or(0, |c| c.offset);
                    lags.insert(p, end.saturating_sub(committed));
                }
            }
        }
        lags
    }

    /// Answers one heartbeat.
    pub async fn heartbeat(&self, hb: Heartbeat) -> Result<Answer> {
        self.metrics.heartbeats.add(1);
        let shard = self.shard_for(&hb.group).await?;
        let mut st = shard.lock().await;
        let now = Instant::now();
        if let Some(answer) = self.unchanged(&st, &hb)
            && st.touch(&hb.group, &hb.member_id, now)
        {
            return Ok(settle_faster(&st, &hb.group, now, answer));
        }
        room_for(&st, &hb.group)?;
        let topics = target::topics_now(&self.registry);
        let lags = |g: &Group| self.lags_of(g);
        let env = Env {
            now_ms: conveyor_storage::unix_millis(),
            settings: &self.config.settings,
            topics: &topics,
            assignors: &self.assignors,
            lags: &lags,
            new_member_id: self.new_member_id(),
        };
        let none = Group::default();
        let old = st.groups.get(&hb.group);
        let outcome = membership::heartbeat(old, &hb, &env)?;
        let changes = old.unwrap_or(&none).changes_to(&hb.group, &outcome.group);
        shard
            .write(&mut st, changes)
            .await
            .map_err(|e| name_group(e, &hb.group))?;
        if outcome.rebalanced {
            self.metrics.rebalances.add(1);
            st.epoch_moved.insert(hb.group.clone(), now);
        }
        let member = outcome.answer.member_id.clone();
        if let Some(m) = st.groups.get(&hb.group).and_then(|g| g.members.get(&member)).cloned()
            && hb.epoch != membership::LEAVE
        {
            // Leaving for now: the session clock runs on, the rebalance clock stops (its
            // revocations were given up).
            st.track(&hb.group, &member, &m, now);
        }
        Ok(settle_faster(&st, &hb.group, now, outcome.answer))
    }

    /// The answer to a heartbeat that changes nothing (the common case: a member at its
    /// target, reporting what it owns), without copying the group.
    fn unchanged(&self, st: &GroupsState, hb: &Heartbeat) -> Option<Answer> {
        if hb.epoch <= 0 || hb.subscription.is_some() {
            return None;
        }
        let g = st.groups.get(&hb.group)?;
        let meta = g.meta.as_ref()?;
        let m = g.members.get(&hb.member_id)?;
        let settled = meta.epoch == meta.assignment_epoch
            && m.member_epoch == hb.epoch
            && !m.away
            && at_target(m, meta.assignment_epoch)
            && state::same_as(&m.assigned, &hb.owned);
        settled.then(|| membership::answer_for(g, &hb.member_id, &self.config.settings))
    }

    /// Runs the coordinator's timers until `stop`: loads the partitions this broker comes to
    /// lead, expires sessions, notices subscribed topics changing, refreshes lag.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_lag = Instant::now() - LAG_REFRESH;
        let mut topics_seen: HashMap<i32, (u64, u64)> = HashMap::new();
        let mut refreshing: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            for index in self.host.led_here() {
                self.load_in_background(index);
            }
            let version = self.registry.applied_offset();
            let topics = target::topics_now(&self.registry);
            for shard in self.host.current() {
                let seen = topics_seen.get(&shard.index) == Some(&(shard.term, version));
                if let Err(e) = self.tick_shard(&shard, &topics, !seen).await {
                    tracing::debug!(partition = shard.index, error = %e, "group coordinator timers");
                    continue;
                }
                topics_seen.insert(shard.index, (shard.term, version));
            }
            // In a task of its own: asking an unreachable leader must not hold up sessions.
            if last_lag.elapsed() >= LAG_REFRESH && refreshing.as_ref().is_none_or(|t| t.is_finished()) {
                last_lag = Instant::now();
                let me = Arc::clone(&self);
                refreshing = Some(tokio::spawn(async move { me.refresh_lag().await }));
            }
        }
    }

    /// Loads a partition this broker came to lead without holding up the timers of the
    /// others (a load waits for the partition's commit and replays it).
    fn load_in_background(self: &Arc<Self>, index: i32) {
        if self.host.is_loaded(index) {
            return;
        }
        let mut loading = self.loading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !loading.insert(index) {
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = me.host.shard(index, "").await {
                tracing::debug!(partition = index, error = %e, "group coordinator partition not loaded yet");
            }
            me.loading
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&index);
        });
    }

    async fn tick_shard(&self, shard: &Shard<GroupsState>, topics: &target::Topics, topics_moved: bool) -> Result<()> {
        let mut st = shard.lock().await;
        let lags = |g: &Group| self.lags_of(g);
        let env = Env {
            now_ms: conveyor_storage::unix_millis(),
            settings: &self.config.settings,
            topics,
            assignors: &self.assignors,
            lags: &lags,
            new_member_id: String::new(),
        };
        let none = Group::default();
        let mut changes = Vec::new();
        let mut expired_count = 0;
        let mut changed_groups = BTreeSet::new();
        for (name, g, expired) in membership::expire(&st, Instant::now(), &env) {
            tracing::info!(group = %name, members = ?expired, "members expired (no heartbeat within the session timeout, or revocation not confirmed within the rebalance timeout)");
            expired_count += expired.len() as u64;
            changes.extend(st.groups.get(&name).unwrap_or(&none).changes_to(&name, &g));
            changed_groups.insert(name);
        }
        if topics_moved {
            for (name, g) in membership::topics_changed(&st, &env) {
                if changed_groups.insert(name.clone()) {
                    changes.extend(st.groups.get(&name).unwrap_or(&none).changes_to(&name, &g));
                }
            }
        }
        let now = Instant::now();
        st.epoch_moved
            .retain(|_, at| now.saturating_duration_since(*at) < membership::SETTLE_WINDOW);
        if changes.is_empty() {
            return Ok(());
        }
        shard.write(&mut st, changes).await?;
        for g in &changed_groups {
            st.epoch_moved.insert(g.clone(), now);
        }
        self.metrics.members_expired.add(expired_count);
        self.metrics.rebalances.add(changed_groups.len() as u64);
        Ok(())
    }
}

/// A shorter heartbeat interval while the group's epoch moved lately (see
/// [`membership::SETTLE_WINDOW`]).
fn settle_faster(st: &GroupsState, group: &str, now: Instant, mut answer: Answer) -> Answer {
    if answer.epoch > 0 && st.settling(group, now, membership::SETTLE_WINDOW) {
        answer.interval = answer.interval.min(membership::RECONCILE_INTERVAL);
    }
    answer
}
