//! The log cleaner: threads that compact the local replicas of topics whose
//! `cleanup.policy` compacts (`docs/compaction.md`).
//!
//! `[cleaner] threads` threads each loop: look at every local replica of a compacting
//! topic, refresh its dirty stats (what `topic describe` and the metrics show), pick the
//! dirtiest one that is due and not being cleaned by another thread, and run one pass on it
//! (`conveyor_storage::PartitionLog::clean`). With nothing due a thread rests for
//! `[cleaner] check_interval`. All of it runs on these threads, never on the reactor, and
//! their reads and writes share the `[cleaner] io_bytes_per_second` budget.
//!
//! Each replica compacts on its own, only below its high watermark (committed entries), so
//! what a replica holds is always a compaction of what the others hold: offsets, Raft
//! indexes and batch headers never change, and every replica ends with the same key → value
//! map. `conveyor topic compact` runs a pass now through [`Cleaner::clean_now`], waiting for
//! a pass already running on that replica.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use conveyor_storage::{CleanBounds, CleanReport, CompactionPolicy, IoThrottle, LogError};
use prometheus_client::registry::Registry as MetricsRegistry;

use crate::config::CleanerSection;
use crate::controller::Registry;
use crate::metrics::{Counter, Metrics};
use crate::replica::partition::Partition;

/// A replica whose pass failed is left alone this long before it is tried again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// The cleaner's counters.
#[derive(Debug, Default)]
pub struct CleanerMetrics {
    pub passes: Counter,
    pub failures: Counter,
    pub bytes_read: Counter,
    pub bytes_written: Counter,
    /// Milliseconds spent in passes.
    pub pass_millis: Counter,
    pub tombstones_dropped: Counter,
}

impl CleanerMetrics {
    pub(crate) fn register(&self, r: &mut MetricsRegistry) {
        let counters = [
            ("conveyor_cleaner_passes", "Compaction passes finished", &self.passes),
            (
                "conveyor_cleaner_failures",
                "Compaction passes that failed (the replica is tried again a minute later)",
                &self.failures,
            ),
            (
                "conveyor_cleaner_read_bytes",
                "Bytes the log cleaner read (key maps and rewrites)",
                &self.bytes_read,
            ),
            (
                "conveyor_cleaner_written_bytes",
                "Bytes of cleaned segments the log cleaner wrote",
                &self.bytes_written,
            ),
            (
                "conveyor_cleaner_pass_milliseconds",
                "Time spent in compaction passes",
                &self.pass_millis,
            ),
            (
                "conveyor_cleaner_tombstones_dropped",
                "Tombstones removed after delete.retention.ms",
                &self.tombstones_dropped,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.inner().clone());
        }
    }

    fn count(&self, report: &CleanReport, took: Duration) {
        self.passes.add(1);
        self.bytes_read.add(report.bytes_read);
        self.bytes_written.add(report.bytes_written);
        self.pass_millis.add(took.as_millis() as u64);
        self.tombstones_dropped.add(report.tombstones_dropped);
    }
}

/// Why `topic compact` could not compact a replica.
#[derive(Debug, thiserror::Error)]
pub enum CleanError {
    #[error("the broker is shutting down")]
    Stopping,
    #[error(transparent)]
    Log(#[from] LogError),
}

/// The replicas being cleaned, and which failed lately.
#[derive(Debug, Default)]
struct Busy {
    cleaning: HashSet<(String, i32)>,
    /// Replicas `topic compact` (without waiting) asked for a pass on, not started yet.
    requested: HashSet<(String, i32)>,
    failed: HashMap<(String, i32), Instant>,
}

/// The cleaner threads' shared state.
#[derive(Debug)]
pub struct Cleaner {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    settings: CleanerSection,
    throttle: IoThrottle,
    busy: Mutex<Busy>,
    /// Signalled when a pass ends and when the broker stops.
    changed: Condvar,
    stopping: AtomicBool,
}

/// The bounds a pass on `p` works within now: its committed offsets, and tombstones kept
/// from the offset the furthest-behind follower has reached (known on the leader only; a
/// follower uses its own high watermark), so that no replica misses a delete because the
/// leader dropped its tombstone before sending it.
fn bounds(p: &Partition) -> CleanBounds {
    let committed = p.high_watermark();
    let status = p.status();
    let end = p.log().log_end_offset();
    let reached = status.followers.iter().map(|f| end.saturating_sub(f.lag)).min();
    CleanBounds {
        committed_end: committed,
        tombstone_floor: reached.map_or(committed, |r| r.min(committed)),
        now_ms: conveyor_storage::unix_millis(),
    }
}

impl Cleaner {
    /// Starts `[cleaner] threads` threads (none when it is 0).
    pub fn start(registry: Arc<Registry>, metrics: Arc<Metrics>, settings: CleanerSection) -> Arc<Cleaner> {
        let cleaner = Arc::new(Cleaner {
            registry,
            metrics,
            throttle: IoThrottle::new(settings.io_bytes_per_second.0),
            settings,
            busy: Mutex::new(Busy::default()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        if cleaner.settings.threads == 0 {
            tracing::info!(
                "log cleaner off ([cleaner] threads = 0): compacted topics are compacted only by `conveyor topic compact`"
            );
        }
        for i in 0..cleaner.settings.threads {
            let c = Arc::clone(&cleaner);
            let spawned = std::thread::Builder::new()
                .name(format!("cleaner-{i}"))
                .spawn(move || c.run());
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a log cleaner thread");
            }
        }
        cleaner
    }

    /// Ends the threads after their current pass (a pass gives up at its next group once its
    /// log is closed).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        let _busy = self.lock();
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Busy> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn run(self: Arc<Self>) {
        while !self.stopped() {
            match self.pick() {
                Some((p, policy)) => {
                    let key = (p.topic.clone(), p.index);
                    let outcome = self.pass(&p, &policy, false);
                    let mut busy = self.lock();
                    busy.cleaning.remove(&key);
                    if outcome.is_err() {
                        busy.failed.insert(key, Instant::now());
                    }
                    self.changed.notify_all();
                }
                None => {
                    let busy = self.lock();
                    if self.stopped() {
                        break;
                    }
                    let _ = self
                        .changed
                        .wait_timeout(busy, self.settings.check_interval.0)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// Every local replica of a compacting topic, with its topic's policy.
    fn compacting(&self) -> Vec<(Arc<Partition>, CompactionPolicy)> {
        self.registry
            .list()
            .iter()
            .filter_map(|t| t.effective.compaction_policy().map(|policy| (t, policy)))
            .flat_map(|(t, policy)| t.local.values().map(move |p| (Arc::clone(p), policy)))
            .collect()
    }

    /// Refreshes every compacting replica's dirty stats and claims the dirtiest due one.
    fn pick(&self) -> Option<(Arc<Partition>, CompactionPolicy)> {
        let mut best: Option<(f64, Arc<Partition>, CompactionPolicy)> = None;
        for (p, policy) in self.compacting() {
            let log = p.log();
            if log.is_closed() || log.is_poisoned() {
                continue;
            }
            let b = bounds(&p);
            if let Some(lag) = policy.max_compaction_lag_ms
                && let Err(e) = log.roll_if_older_than(b.now_ms, lag)
            {
                tracing::warn!(topic = %p.topic, partition = p.index, error = %e, "could not roll a segment for max.compaction.lag.ms");
            }
            let stats = match log.dirty_stats(&policy, &b) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(topic = %p.topic, partition = p.index, error = %e, "could not read the cleaner's view of a partition");
                    continue;
                }
            };
            if !stats.due(&policy, b.now_ms) {
                continue;
            }
            let key = (p.topic.clone(), p.index);
            {
                let busy = self.lock();
                let failed_lately = busy
                    .failed
                    .get(&key)
                    .is_some_and(|at| at.elapsed() < RETRY_AFTER_FAILURE);
                if busy.cleaning.contains(&key) || failed_lately {
                    continue;
                }
            }
            if best.as_ref().is_none_or(|(ratio, ..)| stats.dirty_ratio() > *ratio) {
                best = Some((stats.dirty_ratio(), p, policy));
            }
        }
        let (_, p, policy) = best?;
        let mut busy = self.lock();
        busy.cleaning.insert((p.topic.clone(), p.index)).then_some((p, policy))
    }

    /// One pass on a claimed replica, counted and logged.
    fn pass(&self, p: &Partition, policy: &CompactionPolicy, force: bool) -> Result<Option<CleanReport>, LogError> {
        let started = Instant::now();
        let log = p.log();
        let result = log.clean(
            policy,
            &bounds(p),
            self.settings.key_map_bytes.0 as usize,
            &self.throttle,
            force,
        );
        match &result {
            Ok(Some(report)) => {
                self.metrics.cleaner.count(report, started.elapsed());
                tracing::info!(
                    topic = %p.topic, partition = p.index,
                    bytes_before = report.bytes_before, bytes_after = report.bytes_after,
                    records_before = report.records_before, records_after = report.records_after,
                    keys = report.keys, cleaned_up_to = report.cleaned_up_to,
                    millis = started.elapsed().as_millis() as u64,
                    "compacted"
                );
            }
            Ok(None) => {}
            Err(LogError::Closed) => {}
            Err(e) => {
                self.metrics.cleaner.failures.add(1);
                tracing::error!(topic = %p.topic, partition = p.index, error = %e, "compaction failed; retried in a minute");
            }
        }
        result
    }

    /// Starts a pass on `p` on a blocking thread unless one is running or asked for already;
    /// says which. At most one such job per replica, however often it is asked.
    pub fn start_now(self: &Arc<Self>, p: &Arc<Partition>, policy: CompactionPolicy) -> &'static str {
        let key = (p.topic.clone(), p.index);
        {
            let mut busy = self.lock();
            if busy.cleaning.contains(&key) {
                return "already compacting";
            }
            if !busy.requested.insert(key.clone()) {
                return "already requested";
            }
        }
        let (cleaner, p) = (Arc::clone(self), Arc::clone(p));
        tokio::task::spawn_blocking(move || {
            let _ = cleaner.clean_now_requested(&p, &policy, Some(&key));
        });
        "started"
    }

    /// Runs a pass on `p` now, whatever its dirty ratio, after any pass already running on
    /// it. Blocking: the caller runs it off the reactor.
    pub fn clean_now(&self, p: &Arc<Partition>, policy: &CompactionPolicy) -> Result<Option<CleanReport>, CleanError> {
        self.clean_now_requested(p, policy, None)
    }

    /// As [`clean_now`](Self::clean_now); `requested` is the mark [`start_now`](Self::start_now)
    /// left, cleared once the pass starts.
    fn clean_now_requested(
        &self,
        p: &Arc<Partition>,
        policy: &CompactionPolicy,
        requested: Option<&(String, i32)>,
    ) -> Result<Option<CleanReport>, CleanError> {
        let key = (p.topic.clone(), p.index);
        {
            let mut busy = self.lock();
            while busy.cleaning.contains(&key) {
                if self.stopped() {
                    if let Some(r) = requested {
                        busy.requested.remove(r);
                    }
                    return Err(CleanError::Stopping);
                }
                busy = self.changed.wait(busy).unwrap_or_else(PoisonError::into_inner);
            }
            if let Some(r) = requested {
                busy.requested.remove(r);
            }
            busy.cleaning.insert(key.clone());
        }
        let result = self.pass(p, policy, true);
        let mut busy = self.lock();
        busy.cleaning.remove(&key);
        busy.failed.remove(&key);
        self.changed.notify_all();
        Ok(result?)
    }
}
