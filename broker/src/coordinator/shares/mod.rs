//! The share group coordinator: queues on the log (`docs/queues.md`).
//!
//! A share group consumes one topic; its coordinator (the leader of the `__share_state`
//! partition its id hashes to) reads the topic's partitions into one [`window`] each and
//! hands their records to members one acquisition at a time, locked to that member, until
//! acknowledged, released, expired or dead-lettered. What must survive a failover is kept as
//! snapshots and updates in `__share_state` through the [`host`](crate::coordinator::host)
//! substrate; unlike the group coordinator it changes memory first and answers after the
//! commit ([`Shard::append_ahead`]), so acknowledgements of many members commit together.
//!
//! - [`window`]: one partition's records and their states; [`durable`]: what of them is
//!   written; [`state`]: groups, members, the replay; [`records`]: record keys.
//! - [`deliver`]: fetches and acknowledgements; [`fill`]: reading partitions into windows;
//!   [`dead_letters`]: writing dead letters; [`admin`]: describe, list, delete, purge,
//!   redrive; [`gauges`]: metrics.

pub mod admin;
pub mod dead_letters;
pub mod deliver;
pub mod durable;
pub mod fill;
pub mod gauges;
pub mod records;
pub mod state;
#[cfg(test)]
mod tests;
pub mod window;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_proto::v1::{ShareGroupSettings, ShareSessionEvent};
use state::{Settings, ShareGroup, SharesState};

use crate::controller::Registry;
use crate::coordinator::Change;
pub(crate) use crate::coordinator::host::name_subject as name_group;
use crate::coordinator::host::{Host, Shard};
use crate::coordinator::internal_topic::{self, TopicKind};
use crate::error::{BrokerError, Result};

/// The internal topic holding share group state.
pub const SHARE_STATE: &str = "__share_state";
/// Longest group or member id accepted.
pub const MAX_ID_LEN: usize = 255;
/// Most share groups one `__share_state` partition holds.
pub const MAX_GROUPS_PER_PARTITION: usize = 1_000;
/// Most members of one share group.
pub const MAX_MEMBERS: usize = 1_000;
/// How long creating a group waits for its partitions' starts to be set.
const START_WAIT: Duration = Duration::from_secs(10);
/// How often locks are checked and led partitions loaded.
const TICK: Duration = Duration::from_millis(100);

/// Defaults and bounds of a group's settings.
pub const DEFAULT_LOCK_MS: u32 = 30_000;
pub const LOCK_MS_BOUNDS: (u32, u32) = (1_000, 3_600_000);
pub const DEFAULT_MAX_DELIVERIES: u32 = 5;
pub const MAX_DELIVERIES_BOUNDS: (u32, u32) = (1, 100);
pub const DEFAULT_MAX_INFLIGHT: u32 = 2_000;
pub const MAX_INFLIGHT_BOUNDS: (u32, u32) = (10, 10_000);

/// The coordinator's settings (`[shares]` in the broker config).
#[derive(Debug, Clone)]
pub struct SharesConfig {
    pub partitions: u32,
    pub replication_factor: u32,
}

/// Counters the coordinator keeps (see [`gauges`] for the gauges).
#[derive(Debug, Default)]
pub struct ShareMetrics {
    pub acquired: crate::metrics::Counter,
    pub accepted: crate::metrics::Counter,
    pub released: crate::metrics::Counter,
    pub rejected: crate::metrics::Counter,
    pub expired: crate::metrics::Counter,
    pub redeliveries: crate::metrics::Counter,
    pub dead_letters: crate::metrics::Counter,
}

/// A member's session as [`ShareCoordinator::join`] opened it.
#[derive(Debug)]
pub struct Session {
    pub shard: Arc<Shard<SharesState>>,
    pub group: String,
    pub member: u32,
    pub session: u64,
    pub event: ShareSessionEvent,
}

/// The share coordinator of this broker: one state per `__share_state` partition it leads.
pub struct ShareCoordinator {
    host: Host<SharesState>,
    registry: Arc<Registry>,
    admin_lock: Arc<tokio::sync::Mutex<()>>,
    config: SharesConfig,
    pub metrics: Arc<ShareMetrics>,
    sessions: AtomicU64,
    /// Partitions being loaded by the timers.
    loading: Mutex<HashSet<i32>>,
    /// Per group and partition, as of the last tick (for the metrics endpoint).
    pub(crate) gauge_view: Mutex<Vec<gauges::GroupGauges>>,
}

impl std::fmt::Debug for ShareCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareCoordinator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The members' settings resolved against defaults and bounds, or why not.
pub fn resolve_settings(topic: &str, group: &str, asked: &ShareGroupSettings, now_ms: i64) -> Result<Settings> {
    let bounded = |what: &str, v: Option<u32>, default: u32, (lo, hi): (u32, u32)| -> Result<u32> {
        let v = v.unwrap_or(default);
        if v < lo || v > hi {
            return Err(BrokerError::InvalidRequest(format!(
                "{what} must be between {lo} and {hi}, got {v}"
            )));
        }
        Ok(v)
    };
    let key_order = match asked.ordering.as_deref() {
        None | Some("none") | Some("") => false,
        Some("key") => true,
        Some(other) => {
            return Err(BrokerError::InvalidRequest(format!(
                "ordering must be 'none' or 'key', got '{}'",
                other.chars().take(64).collect::<String>()
            )));
        }
    };
    let earliest = match asked.auto_offset_reset.as_deref() {
        None | Some("latest") | Some("") => false,
        Some("earliest") => true,
        Some(other) => {
            return Err(BrokerError::InvalidRequest(format!(
                "auto_offset_reset must be 'earliest' or 'latest', got '{}'",
                other.chars().take(64).collect::<String>()
            )));
        }
    };
    let dead_letter_topic = match asked.dead_letter_topic.as_deref() {
        None | Some("") => format!("{topic}.{group}.dlq"),
        Some(t) => t.to_string(),
    };
    crate::controller::validate_topic_name(&dead_letter_topic).map_err(|e| {
        BrokerError::InvalidRequest(format!(
            "the dead-letter topic '{}' is not a valid topic name ({e}); name one with dead_letter_topic",
            dead_letter_topic.chars().take(300).collect::<String>()
        ))
    })?;
    if internal_topic::is_internal(&dead_letter_topic) || dead_letter_topic == topic {
        return Err(BrokerError::InvalidRequest(format!(
            "the dead-letter topic may be neither internal nor the group's own topic, got '{dead_letter_topic}'"
        )));
    }
    Ok(Settings {
        topic: topic.to_string(),
        key_order,
        lock_ms: bounded(
            "lock_duration_ms",
            asked.lock_duration_ms,
            DEFAULT_LOCK_MS,
            LOCK_MS_BOUNDS,
        )?,
        max_deliveries: bounded(
            "max_delivery_count",
            asked.max_delivery_count,
            DEFAULT_MAX_DELIVERIES,
            MAX_DELIVERIES_BOUNDS,
        )?,
        max_inflight: bounded(
            "max_inflight_records",
            asked.max_inflight_records,
            DEFAULT_MAX_INFLIGHT,
            MAX_INFLIGHT_BOUNDS,
        )?,
        earliest,
        dead_letter_topic,
        created_ms: now_ms,
        dead_letter_topic_created: false,
    })
}

/// Refuses a join or create whose settings differ from the group's.
fn check_same(group: &str, have: &Settings, topic: &str, asked: &ShareGroupSettings) -> Result<()> {
    let differ = |what: &str, group_has: String, asked: String| {
        Err(BrokerError::InvalidRequest(format!(
            "share group '{group}' has {what} {group_has}, this request asked for {asked}; leave the setting unset or use another group"
        )))
    };
    if !topic.is_empty() && topic != have.topic {
        return differ("topic", format!("'{}'", have.topic), format!("'{topic}'"));
    }
    let ordering = if have.key_order { "key" } else { "none" };
    if let Some(o) = asked.ordering.as_deref().filter(|o| !o.is_empty() && *o != ordering) {
        return differ("ordering", ordering.into(), o.chars().take(64).collect());
    }
    if let Some(v) = asked.lock_duration_ms.filter(|v| *v != have.lock_ms) {
        return differ("lock_duration_ms", have.lock_ms.to_string(), v.to_string());
    }
    if let Some(v) = asked.max_delivery_count.filter(|v| *v != have.max_deliveries) {
        return differ("max_delivery_count", have.max_deliveries.to_string(), v.to_string());
    }
    if let Some(v) = asked.max_inflight_records.filter(|v| *v != have.max_inflight) {
        return differ("max_inflight_records", have.max_inflight.to_string(), v.to_string());
    }
    let reset = if have.earliest { "earliest" } else { "latest" };
    if let Some(r) = asked
        .auto_offset_reset
        .as_deref()
        .filter(|r| !r.is_empty() && *r != reset)
    {
        return differ("auto_offset_reset", reset.into(), r.chars().take(64).collect());
    }
    if let Some(t) = asked
        .dead_letter_topic
        .as_deref()
        .filter(|t| !t.is_empty() && *t != have.dead_letter_topic)
    {
        return differ(
            "dead_letter_topic",
            have.dead_letter_topic.clone(),
            t.chars().take(300).collect(),
        );
    }
    Ok(())
}

/// The group's settings as the API shows them.
pub fn settings_view(s: &Settings) -> ShareGroupSettings {
    ShareGroupSettings {
        ordering: Some(if s.key_order { "key" } else { "none" }.into()),
        lock_duration_ms: Some(s.lock_ms),
        max_delivery_count: Some(s.max_deliveries),
        max_inflight_records: Some(s.max_inflight),
        auto_offset_reset: Some(if s.earliest { "earliest" } else { "latest" }.into()),
        dead_letter_topic: Some(s.dead_letter_topic.clone()),
    }
}

impl ShareCoordinator {
    pub fn new(
        registry: Arc<Registry>,
        admin_lock: Arc<tokio::sync::Mutex<()>>,
        config: SharesConfig,
    ) -> ShareCoordinator {
        ShareCoordinator {
            host: Host::new(SHARE_STATE, Arc::clone(&registry), SharesState::default),
            registry,
            admin_lock,
            config,
            metrics: Arc::default(),
            sessions: AtomicU64::new(1),
            loading: Mutex::default(),
            gauge_view: Mutex::default(),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn node_id(&self) -> u32 {
        self.registry.transport().node_id()
    }

    /// Checks a group or member id: 1 to 255 bytes.
    pub fn check_id(what: &str, id: &str) -> Result<()> {
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(BrokerError::InvalidRequest(format!(
                "a {what} must be 1 to {MAX_ID_LEN} bytes long, got {} bytes",
                id.len()
            )));
        }
        Ok(())
    }

    /// `__share_state`, created if it does not exist yet.
    async fn state_topic(&self) -> Result<Arc<crate::controller::Topic>> {
        internal_topic::ensure_exists(
            &self.registry,
            &self.admin_lock,
            SHARE_STATE,
            self.config.partitions,
            self.config.replication_factor,
            TopicKind::Internal,
        )
        .await
    }

    async fn partition_of(&self, group: &str) -> Result<i32> {
        Self::check_id("group id", group)?;
        let topic = self.state_topic().await?;
        Ok(internal_topic::partition_for(group, topic.partition_count() as u32))
    }

    /// Where `group`'s coordinator is: (broker, its address, the partition).
    pub async fn find(&self, group: &str) -> Result<(u32, String, i32)> {
        let index = self.partition_of(group).await?;
        let topic = self.state_topic().await?;
        let (leader, address) = crate::coordinator::host::coordinator_at(&self.registry, &topic, index, group)?;
        Ok((leader, address, index))
    }

    /// The loaded state of the partition holding `group`, if this broker coordinates it.
    pub(crate) async fn shard_for(&self, group: &str) -> Result<Arc<Shard<SharesState>>> {
        let index = self.partition_of(group).await?;
        self.host.shard(index, group).await.map_err(|e| name_group(e, group))
    }

    /// Creates `group` on `topic` with `asked` settings ahead of its members; true when it
    /// did not exist. An existing group with other settings is refused, as a join would be.
    pub async fn create(
        self: &Arc<Self>,
        group: &str,
        topic: &str,
        asked: &ShareGroupSettings,
    ) -> Result<(bool, ShareGroupSettings)> {
        Self::check_id("group id", group)?;
        if topic.is_empty() {
            return Err(BrokerError::InvalidRequest(format!(
                "creating share group '{group}' needs the topic it consumes"
            )));
        }
        let shard = self.shard_for(group).await?;
        let mut st = shard.lock().await;
        let created = self.create_held(&shard, &mut st, group, topic, asked).await?;
        let settings = settings_view(&group_mut(&mut st, group)?.settings);
        drop(st);
        self.start_tasks(&shard, group).await;
        // Also for a group that exists: a retried create may find it made by the first try.
        self.fix_starts(&shard, group).await?;
        Ok((created, settings))
    }

    /// Waits until every partition's start is set and committed, so that a group created
    /// at "latest" keeps every record produced after it answered (otherwise those produced
    /// before its fills looked the high watermarks up would be skipped).
    async fn fix_starts(&self, shard: &Arc<Shard<SharesState>>, group: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_WAIT;
        let gone = || BrokerError::UnknownGroup(group.to_string());
        loop {
            let mut st = shard.lock().await;
            let g = st.groups.get_mut(group).ok_or_else(gone)?;
            let unset = g.windows.iter().find(|(_, w)| w.end.is_none()).map(|(p, _)| *p);
            let Some(partition) = unset else {
                let count = self.registry.get(&g.settings.topic)?.partition_count() as i32;
                if let Some(partition) = (0..count).find(|p| !g.windows.contains_key(p)) {
                    return Err(BrokerError::LeaderNotAvailable {
                        topic: g.settings.topic.clone(),
                        partition,
                    });
                }
                // A start a fill set may not be committed yet, and its write may even be
                // refused on its own: a snapshot of each window carries the start whole,
                // whatever became of earlier writes.
                let partitions: Vec<i32> = g.windows.keys().copied().collect();
                for w in g.windows.values_mut() {
                    w.started = false;
                }
                let changes: Vec<_> = partitions.iter().filter_map(|p| g.record_of(group, *p, &[])).collect();
                let committed = shard.append_ahead(&changes).await.map_err(|e| name_group(e, group))?;
                drop(st);
                return committed.wait().await.map_err(|e| name_group(e, group));
            };
            let (topic, earliest) = (g.settings.topic.clone(), g.settings.earliest);
            drop(st);
            if tokio::time::Instant::now() >= deadline {
                return Err(BrokerError::LeaderNotAvailable { topic, partition });
            }
            fill::begin(self, shard, group, &topic, partition, earliest)
                .await
                .map_err(|e| name_group(e, group))?;
        }
    }

    /// Creates `group` under the shard's lock when it does not exist; otherwise checks that
    /// `topic` and `asked` agree with it. True when it created it.
    async fn create_held(
        &self,
        shard: &Shard<SharesState>,
        st: &mut SharesState,
        group: &str,
        topic: &str,
        asked: &ShareGroupSettings,
    ) -> Result<bool> {
        if let Some(g) = st.groups.get(group) {
            check_same(group, &g.settings, topic, asked)?;
            return Ok(false);
        }
        if topic.is_empty() {
            return Err(BrokerError::UnknownGroup(group.to_string()));
        }
        crate::error::check_topic_name_length(topic)?;
        internal_topic::refuse_client_write(topic, "consume through share groups")?;
        self.registry.get(topic)?;
        if st.groups.len() >= MAX_GROUPS_PER_PARTITION {
            return Err(BrokerError::InvalidRequest(format!(
                "cannot create share group '{group}': its {SHARE_STATE} partition holds {MAX_GROUPS_PER_PARTITION} groups, the most it may; delete unused ones (conveyor queue delete)"
            )));
        }
        let settings = resolve_settings(topic, group, asked, conveyor_storage::unix_millis())?;
        let creation = SharesState::creation(group, &settings);
        shard
            .write(st, vec![creation])
            .await
            .map_err(|e| name_group(e, group))?;
        tracing::info!(group, topic, "share group created");
        Ok(true)
    }

    /// Joins `member` to `group`, creating the group with `asked` settings on `topic` when
    /// it does not exist.
    pub async fn join(
        self: &Arc<Self>,
        group: &str,
        member: &str,
        topic: &str,
        asked: &ShareGroupSettings,
    ) -> Result<Session> {
        Self::check_id("member id", member)?;
        let shard = self.shard_for(group).await?;
        let mut st = shard.lock().await;
        self.create_held(&shard, &mut st, group, topic, asked).await?;
        let partitions = self.registry.get(topic_of(&st, group)?)?.partition_count() as u32;
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let g = group_mut(&mut st, group)?;
        if !g.member_numbers.contains_key(member) && g.members.len() >= MAX_MEMBERS {
            return Err(BrokerError::InvalidRequest(format!(
                "share group '{group}' has {MAX_MEMBERS} members, the most it may"
            )));
        }
        let number = g.join(member, session);
        let event = ShareSessionEvent {
            topic: g.settings.topic.clone(),
            settings: Some(settings_view(&g.settings)),
            partitions,
        };
        drop(st);
        self.start_tasks(&shard, group).await;
        Ok(Session {
            shard,
            group: group.to_string(),
            member: number,
            session,
            event,
        })
    }

    /// Ends a member's session: every record it holds is available again at once.
    pub async fn leave(&self, s: &Session) {
        let mut st = s.shard.lock().await;
        let Some(g) = st.groups.get_mut(&s.group) else { return };
        if !g.leave(s.member, s.session) {
            return;
        }
        let max = g.settings.max_deliveries;
        let mut changes = Vec::new();
        let partitions: Vec<i32> = g.windows.keys().copied().collect();
        for p in partitions {
            let Some(w) = g.windows.get_mut(&p) else { continue };
            let changed = w.release_member(s.member, max);
            if !changed.is_empty() {
                self.metrics.released.add(changed.len() as u64);
                changes.extend(g.record_of(&s.group, p, &changed));
            }
        }
        g.available.notify_waiters();
        if changes.is_empty() {
            return;
        }
        match s.shard.append_ahead(&changes).await {
            Ok(committed) => {
                drop(st);
                if let Err(e) = committed.wait().await {
                    tracing::debug!(group = %s.group, error = %e, "a left member's releases did not commit");
                }
            }
            Err(e) => tracing::debug!(group = %s.group, error = %e, "a left member's releases were not written"),
        }
    }

    /// Starts the fill of each partition of `group` and its dead-letter task, where not
    /// running.
    async fn start_tasks(self: &Arc<Self>, shard: &Arc<Shard<SharesState>>, group: &str) {
        let mut st = shard.lock().await;
        if let Some(g) = st.groups.get_mut(group) {
            self.spawn_tasks(shard, group, g);
        }
    }

    /// [`ShareCoordinator::start_tasks`] for a group whose state is held already.
    fn spawn_tasks(self: &Arc<Self>, shard: &Arc<Shard<SharesState>>, group: &str, g: &mut ShareGroup) {
        let Ok(topic) = self.registry.get(&g.settings.topic) else {
            return;
        };
        for p in 0..topic.partition_count() as i32 {
            g.windows.entry(p).or_default();
            if g.filling.insert(p) {
                tokio::spawn(fill::run(Arc::clone(self), Arc::clone(shard), group.to_string(), p));
            }
        }
        // The slots are scanned only when no writer runs and none is paused (each tick).
        if !g.dead_lettering
            && !g.dead_letters_paused
            && g.windows
                .values()
                .any(|w| w.slots().any(|s| s.state == window::SlotState::DeadLettering))
        {
            g.dead_lettering = true;
            tokio::spawn(dead_letters::run(
                Arc::clone(self),
                Arc::clone(shard),
                group.to_string(),
            ));
        }
    }

    /// Expires locks, loads newly led partitions and keeps every group's tasks running,
    /// until `stop`.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {}
            }
            ticks += 1;
            for index in self.host.led_here() {
                self.load_in_background(index);
            }
            let mut gauges = Vec::new();
            for shard in self.host.current() {
                match self.tick_shard(&shard, ticks.is_multiple_of(10)).await {
                    Ok(g) => gauges.extend(g),
                    Err(e) => tracing::debug!(partition = shard.index, error = %e, "share coordinator timers"),
                }
            }
            if ticks.is_multiple_of(10) {
                *self
                    .gauge_view
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = gauges;
            }
        }
    }

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
                tracing::debug!(partition = index, error = %e, "share coordinator partition not loaded yet");
            }
            me.loading
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&index);
        });
    }

    async fn tick_shard(
        self: &Arc<Self>,
        shard: &Arc<Shard<SharesState>>,
        gauge: bool,
    ) -> Result<Vec<gauges::GroupGauges>> {
        let now = conveyor_storage::unix_millis();
        let mut st = shard.lock().await;
        let mut changes: Vec<Change> = Vec::new();
        let mut views = Vec::new();
        for (name, g) in st.groups.iter_mut() {
            let max = g.settings.max_deliveries;
            let partitions: Vec<i32> = g.windows.keys().copied().collect();
            let mut woke = false;
            for p in partitions {
                let Some(w) = g.windows.get_mut(&p) else { continue };
                let changed = w.expire(now, max);
                if !changed.is_empty() {
                    self.metrics.expired.add(changed.len() as u64);
                    changes.extend(g.record_of(name, p, &changed));
                    woke = true;
                } else if g
                    .windows
                    .get(&p)
                    .is_some_and(|w| w.next_due(now - TICK.as_millis() as i64).is_some_and(|d| d <= now))
                {
                    // A delay ended since the last tick.
                    woke = true;
                }
            }
            if woke {
                g.available.notify_waiters();
            }
            // In the same pass: fills for new partitions, dead letters that wait.
            self.spawn_tasks(shard, name, g);
            if gauge {
                views.push(gauges::view(name, g, now));
            }
        }
        if !changes.is_empty() {
            let committed = shard.append_ahead(&changes).await?;
            drop(st);
            committed.wait().await?;
        }
        Ok(views)
    }
}

fn topic_of<'a>(st: &'a SharesState, group: &str) -> Result<&'a str> {
    st.groups
        .get(group)
        .map(|g| g.settings.topic.as_str())
        .ok_or_else(|| BrokerError::UnknownGroup(group.to_string()))
}

pub(crate) fn group_mut<'a>(st: &'a mut SharesState, group: &str) -> Result<&'a mut ShareGroup> {
    st.groups
        .get_mut(group)
        .ok_or_else(|| BrokerError::UnknownGroup(group.to_string()))
}
