//! The log cleaner: threads that compact the local replicas of topics whose
//! `cleanup.policy` compacts (`docs/compaction.md`).
//!
//! `[cleaner] threads` threads (at least one, to serve `topic compact`) each loop: first a
//! pass `topic compact` asked for, from a bounded queue (one entry per replica, however often
//! it is asked); else, unless `threads` is 0, look at every local replica of a compacting
//! topic, refresh its dirty stats (what `topic describe` and the metrics show), pick the
//! dirtiest due one that no other thread is cleaning, and run one pass on it; with nothing to
//! do, rest for `[cleaner] check_interval`. Passes run on these threads only, never on the
//! reactor or the blocking pool, so at most `threads` key maps exist at once, and their reads
//! and writes share the `[cleaner] io_bytes_per_second` budget. A panic in a pass is caught,
//! counted as a failure and reported; the thread goes on.
//!
//! Each replica compacts on its own, only below its high watermark (committed entries), so
//! what a replica holds is always a compaction of what the others hold: offsets, Raft
//! indexes and batch headers never change, and every replica ends with the same key → value
//! map. A leader drops a tombstone only below the offset every follower has reached.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use conveyor_storage::{CleanBounds, CleanReport, CompactionPolicy, IoThrottle, LogError};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::sync::oneshot;

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

/// Replicas `topic compact` may have waiting for a pass at once; beyond, it is refused.
pub const MAX_QUEUED_REQUESTS: usize = 4096;

/// What a requested pass did: its report (`None`: nothing was cleanable), or why it failed.
pub type PassOutcome = Result<Option<CleanReport>, String>;

/// How `topic compact` found a replica's queue place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// A new request.
    Queued,
    /// A request for the replica was waiting already; this one shares its pass.
    Joined,
    /// The queue is full.
    Full,
    /// The broker is stopping.
    Stopping,
}

type Key = (String, i32);

/// A pass `topic compact` asked for, and who waits for its outcome.
#[derive(Debug)]
struct Request {
    partition: Arc<Partition>,
    policy: CompactionPolicy,
    replies: Vec<oneshot::Sender<PassOutcome>>,
}

/// The replicas being cleaned, the passes asked for, and which failed lately.
#[derive(Debug, Default)]
struct Busy {
    cleaning: HashSet<Key>,
    /// Requested passes in arrival order; one entry per replica.
    queue: VecDeque<Key>,
    requests: HashMap<Key, Request>,
    failed: HashMap<Key, Instant>,
}

/// The cleaner threads' shared state.
#[derive(Debug)]
pub struct Cleaner {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    settings: CleanerSection,
    throttle: IoThrottle,
    busy: Mutex<Busy>,
    /// Signalled when a pass ends, a request arrives and the broker stops.
    changed: Condvar,
    stopping: AtomicBool,
}

/// The bounds a pass on `p` works within now: its committed offsets; and tombstones kept
/// from the offset the furthest-behind follower has reached, so that no replica misses a
/// delete because the leader dropped its tombstone before sending it. Only a leader knows
/// its followers: a leader that has not published them yet (just elected), or with a
/// follower out of sync, keeps every tombstone; a follower uses its own high watermark.
fn bounds(p: &Partition) -> CleanBounds {
    let committed = p.high_watermark();
    let status = p.status();
    let floor = if p.is_leader() {
        let reached = status.followers.iter().map(|f| f.reached).min();
        let conf = p.raft_view().conf_state;
        let peers = conf.voters.len() + conf.learners.len() > 1;
        // A follower out of sync may have lost entries the leader still counts as matched
        // (a restart that cut a damaged tail): its tombstones wait until it is back.
        let all_in_sync = status.followers.iter().all(|f| f.in_sync);
        match reached {
            Some(r) if all_in_sync => r.min(committed),
            Some(_) => 0,
            None if peers => 0,
            None => committed,
        }
    } else {
        committed
    };
    CleanBounds {
        committed_end: committed,
        tombstone_floor: floor,
        now_ms: conveyor_storage::unix_millis(),
    }
}

impl Cleaner {
    /// Starts `[cleaner] threads` threads, at least one (which then only serves `topic
    /// compact` when `threads` is 0).
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
                "background compaction off ([cleaner] threads = 0): compacted topics are compacted only by `conveyor topic compact`"
            );
        }
        for i in 0..cleaner.settings.threads.max(1) {
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
    /// log is closed); requests still queued are answered that the broker is stopping.
    pub fn stop(&self) {
        let mut busy = self.lock();
        // Set under the lock: a request either sees it or is drained below.
        self.stopping.store(true, Ordering::Release);
        busy.queue.clear();
        for (_, request) in busy.requests.drain() {
            for reply in request.replies {
                let _ = reply.send(Err("the broker is shutting down".into()));
            }
        }
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Busy> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Asks for a pass on `p` now, whatever its dirty ratio; `reply`, if given, gets its
    /// outcome. A request for a replica already waiting shares that one's pass.
    pub fn request(
        &self,
        p: &Arc<Partition>,
        policy: CompactionPolicy,
        reply: Option<oneshot::Sender<PassOutcome>>,
    ) -> Queued {
        let key = (p.topic.clone(), p.index);
        let mut busy = self.lock();
        if self.stopped() {
            return Queued::Stopping;
        }
        if let Some(waiting) = busy.requests.get_mut(&key) {
            waiting.replies.extend(reply);
            return Queued::Joined;
        }
        if busy.queue.len() >= MAX_QUEUED_REQUESTS {
            return Queued::Full;
        }
        busy.queue.push_back(key.clone());
        busy.requests.insert(
            key,
            Request {
                partition: Arc::clone(p),
                policy,
                replies: reply.into_iter().collect(),
            },
        );
        self.changed.notify_all();
        Queued::Queued
    }

    fn run(self: Arc<Self>) {
        while !self.stopped() {
            // A panic outside a pass (looking for one) must not end the thread: with one
            // thread, nothing would serve `topic compact` again.
            let step = catch_unwind(AssertUnwindSafe(|| self.step()));
            if step.is_err() {
                self.metrics.cleaner.failures.add(1);
                tracing::error!("the log cleaner panicked looking for work; it rests and goes on");
                std::thread::sleep(self.settings.check_interval.0);
            }
        }
    }

    /// One round: a requested pass, else a background one, else a rest until there is
    /// something to do or `check_interval` passed.
    fn step(&self) {
        if let Some(request) = self.next_request() {
            let outcome = self.claimed_pass(&request.partition, &request.policy, true);
            let outcome: PassOutcome = outcome.map_err(|e| e.to_string());
            for reply in request.replies {
                let _ = reply.send(outcome.clone());
            }
            return;
        }
        if self.settings.threads > 0
            && let Some((p, policy)) = self.pick()
        {
            let _ = self.claimed_pass(&p, &policy, false);
            return;
        }
        let busy = self.lock();
        // Requests whose replica another thread is cleaning wait for that pass to end, which
        // signals `changed`: only a claimable one is worth going round again at once.
        let claimable = busy.queue.iter().any(|k| !busy.cleaning.contains(k));
        if self.stopped() || claimable {
            return;
        }
        let _ = self
            .changed
            .wait_timeout(busy, self.settings.check_interval.0)
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// The first queued request whose replica no other thread is cleaning, claimed.
    fn next_request(&self) -> Option<Request> {
        let mut busy = self.lock();
        let at = busy.queue.iter().position(|k| !busy.cleaning.contains(k))?;
        let key = busy.queue.remove(at)?;
        let request = busy.requests.remove(&key)?;
        busy.cleaning.insert(key);
        Some(request)
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
        // Failures older than the retry delay mean nothing: gone, so that the map holds only
        // recent ones (not every partition that ever failed, deleted ones included).
        self.lock().failed.retain(|_, at| at.elapsed() < RETRY_AFTER_FAILURE);
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

    /// One pass on a replica this thread claimed (in `cleaning`), counted, logged, a panic
    /// contained; the claim is released whatever happens.
    fn claimed_pass(
        &self,
        p: &Partition,
        policy: &CompactionPolicy,
        force: bool,
    ) -> Result<Option<CleanReport>, LogError> {
        let key = (p.topic.clone(), p.index);
        let result = catch_unwind(AssertUnwindSafe(|| self.pass(p, policy, force))).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            self.metrics.cleaner.failures.add(1);
            tracing::error!(topic = %p.topic, partition = p.index, panic = %what, "compaction pass panicked; retried in a minute");
            Err(LogError::InvalidConfig(format!("the compaction pass panicked: {what}")))
        });
        let mut busy = self.lock();
        busy.cleaning.remove(&key);
        if result.as_ref().is_err_and(|e| !matches!(e, LogError::Closed)) {
            busy.failed.insert(key, Instant::now());
        } else {
            busy.failed.remove(&key);
        }
        self.changed.notify_all();
        result
    }

    /// Deletes the segments a pass left with no record of a producer at the start of the log,
    /// as retention deletes old ones: through Raft's log compaction, so that a follower
    /// that needs them gets a snapshot saying where the log starts now. Nothing a reader can
    /// see goes (every record there was superseded), and the emptied batch headers that would
    /// otherwise stay forever are gone.
    fn drop_empty_prefix(&self, p: &Partition, report: &CleanReport) {
        let Some(end) = report.empty_up_to else { return };
        if end <= p.log().log_start_offset() {
            return;
        }
        match p.compact_below(end) {
            Ok(0) => {}
            Ok(entries) => tracing::info!(
                topic = %p.topic, partition = p.index, entries,
                log_start_offset = p.log().log_start_offset(),
                "deleted segments compaction emptied"
            ),
            Err(e) => {
                tracing::warn!(topic = %p.topic, partition = p.index, error = %e, "could not delete segments compaction emptied")
            }
        }
    }

    /// One pass, counted and logged.
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
                self.drop_empty_prefix(p, report);
                tracing::info!(
                    topic = %p.topic, partition = p.index,
                    bytes_before = report.bytes_before, bytes_after = report.bytes_after,
                    records_before = report.records_before, records_after = report.records_after,
                    keys = report.keys, cleaned_up_to = report.cleaned_up_to,
                    millis = started.elapsed().as_millis() as u64,
                    "compacted"
                );
            }
            Ok(None) | Err(LogError::Closed) => {}
            Err(e) => {
                self.metrics.cleaner.failures.add(1);
                tracing::error!(topic = %p.topic, partition = p.index, error = %e, "compaction failed; retried in a minute");
            }
        }
        result
    }
}
