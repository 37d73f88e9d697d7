//! Readies handled on the partition's own task, without a hop to the blocking pool.
//!
//! At ordinary request rates a hop costs more than the work it carries: handing a Ready to a
//! blocking thread wakes that thread and, when the job ends, wakes a reactor thread again, and
//! on this kind of machine each wake costs tens of microseconds of CPU (measured in
//! `docs/request_cost.md`). A Ready whose disk work is only writes to the page cache is done
//! here instead: no fsync is due under the topic's flush policy (only flush `os` appends
//! inline; under `always` and `interval` only rounds that append nothing, such as a leader's
//! commit after its followers answered), the active segment has room (no roll, which creates
//! and syncs files), the entries go at the end of the log (no truncation of a conflicting
//! suffix), nobody else holds the log's writer, the entries to apply are in memory and change
//! no membership, the Raft state file is not rewritten (term and vote unchanged), no producer
//! snapshot falls due, and the entries written are small. Everything else (fsyncs, rolls,
//! truncations, snapshots, elections, reads of old entries) still runs on the blocking pool,
//! so a slow disk does not stall the reactor through them. What is left (races with
//! retention, a config change between the check and the write, raft-rs reading old entries
//! for a lagging follower when the leader advances) is in `docs/request_cost.md`.
//!
//! A write to the page cache can still wait on the disk (dirty-page throttling, a journal
//! that is full). Each inline Ready is timed: one that takes longer than [`SLOW`] and during
//! which the thread blocked sends every partition's Readies back to the blocking pool for
//! [`PAUSE`], so a slow disk costs the reactor about one such wait per pause (a few more
//! when several partitions were writing at that moment).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use raft::eraftpb::{Entry, EntryType};
use raft::{RawNode, Ready, StateRole};

use super::Owner;
use crate::replica::raft_storage::{RaftLog, TAIL_OFFSETS};

/// Most bytes of entries an inline Ready writes; larger ones go to the blocking pool, where
/// copying them costs the reactor nothing.
const MAX_BYTES: u64 = 256 << 10;
/// What an entry without data (a Raft no-op, a membership change) takes in the log at most:
/// it is written as a control batch.
const EMPTY_ENTRY_BYTES: u64 = 128;
/// An inline Ready slower than this, during which its thread blocked, pauses inline Readies.
pub(super) const SLOW: Duration = Duration::from_millis(1);
/// How long a slow inline Ready sends every partition's Readies back to the blocking pool:
/// partitions share their disk, so one that waited tells for all of them.
pub(super) const PAUSE: Duration = Duration::from_secs(10);

/// Milliseconds after [`epoch`] until which inline Readies are paused (0: not paused).
static PAUSED_UNTIL_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis_since_epoch() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn paused() -> bool {
    let until = PAUSED_UNTIL_MS.load(Ordering::Relaxed);
    until != 0 && millis_since_epoch() < until
}

/// Where the owner handles its next Ready.
pub(super) enum Next {
    /// Nothing to do.
    Nothing,
    /// Handle this Ready here.
    InMemory(Box<Ready>),
    /// Hand the node (and the Ready taken already, if one was) to the blocking pool.
    Blocking(Option<Box<Ready>>),
}

fn plain(entries: &[Entry]) -> bool {
    entries.iter().all(|e| e.get_entry_type() == EntryType::EntryNormal)
}

impl Owner {
    /// Takes the node's next Ready if it can be handled on this task (see the module docs).
    pub(super) fn next_ready(&mut self, node: &mut RawNode<RaftLog>) -> Next {
        if !node.has_ready() {
            return Next::Nothing;
        }
        if !self.may_handle_in_memory(node) {
            return Next::Blocking(None);
        }
        let ready = node.ready();
        let entries = ready.entries();
        let bytes: u64 = entries
            .iter()
            .map(|e| (e.data.len() as u64).max(EMPTY_ENTRY_BYTES))
            .sum();
        // Entries that overwrite a suffix truncate the log: files, a recovery point, syncs.
        let appends_at_end = entries
            .first()
            .is_none_or(|e| e.index == self.raft.last_entry().index + 1);
        let in_memory = ready.snapshot().is_empty()
            && bytes <= MAX_BYTES
            && appends_at_end
            && plain(entries)
            && plain(ready.committed_entries())
            && ready.hs().is_none_or(|hs| !self.raft.hard_state_is_durable_change(hs))
            && self.raft.partition_log().appends_in_memory(entries.len(), bytes);
        if in_memory {
            Next::InMemory(Box::new(ready))
        } else {
            Next::Blocking(Some(Box::new(ready)))
        }
    }

    /// What can be known before the Ready is taken: no housekeeping due in the Ready job, the
    /// entries to apply in memory (and still in memory after this Ready appends: the entry
    /// cache and the offsets of recent entries keep the last [`TAIL_OFFSETS`] at least), no
    /// producer snapshot due while applying them.
    fn may_handle_in_memory(&self, node: &RawNode<RaftLog>) -> bool {
        if paused() {
            return false;
        }
        let Some(producers) = self.producers.as_ref() else {
            return false;
        };
        if self.expire_before.is_some()
            || (node.raft.state == StateRole::Leader && producers.needs_pending(node.raft.term))
        {
            return false;
        }
        let applied = node.raft.raft_log.applied;
        // raft-rs's last index counts the entries the next Ready will append (its unstable
        // log), so this bounds what is in memory after the append too.
        let unapplied = node.raft.raft_log.last_index().saturating_sub(applied);
        if unapplied >= TAIL_OFFSETS as u64 || !self.raft.plain_entries_cached_from(applied + 1) {
            return false;
        }
        match self.raft.known_offset_after(applied) {
            Some(from) => !producers.may_snapshot_from(self.raft.partition_log(), from),
            None => false,
        }
    }

    /// Notes how long an inline Ready took; one that was slow because the thread blocked
    /// (`waits_before`: the thread's count of waits when it started) pauses inline Readies. A
    /// reactor thread preempted by another process is slow too, but did not wait on the disk.
    pub(super) fn timed_in_memory(&mut self, took: Duration, waits_before: u64) {
        self.metrics.readies_in_memory.add(1);
        if took > SLOW && crate::process_metrics::thread_waits() > waits_before {
            self.metrics.readies_in_memory_slow.add(1);
            let until = millis_since_epoch().saturating_add(PAUSE.as_millis() as u64).max(1);
            PAUSED_UNTIL_MS.fetch_max(until, Ordering::Relaxed);
            tracing::info!(
                topic = %self.topic,
                partition = self.index,
                took_ms = took.as_secs_f64() * 1e3,
                "a page-cache write waited on the disk; partitions write from the blocking pool for the next {}s",
                PAUSE.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use conveyor_storage::{FlushPolicy, LogConfig, PartitionLog};

    use super::*;
    use crate::replica::ready::{ReadyHandler, handle};

    struct Discard;
    impl ReadyHandler for Discard {
        fn send(&mut self, _: Vec<raft::eraftpb::Message>) {}
    }

    /// A single-voter group on `flush`, its owner, and its node.
    fn group(dir: &std::path::Path, flush: FlushPolicy) -> (Owner, RawNode<RaftLog>) {
        let config = LogConfig {
            flush,
            ..LogConfig::default()
        };
        let log = Arc::new(PartitionLog::open(dir, config).expect("log"));
        let raft = RaftLog::open(log).expect("raft log");
        let conf = raft::eraftpb::ConfState {
            voters: vec![1],
            ..Default::default()
        };
        raft.set_conf_state(&conf).expect("conf state");
        let owner = super::super::test_owner(raft.clone());
        let node_config = raft::Config {
            id: 1,
            ..raft::Config::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        (owner, RawNode::new(&node_config, raft, &logger).expect("node"))
    }

    /// Where the next Ready goes: in place (true) or to the blocking pool; handled either way.
    fn next_in_place(owner: &mut Owner, node: &mut RawNode<RaftLog>) -> Option<bool> {
        let (ready, in_place) = match owner.next_ready(node) {
            Next::Nothing => return None,
            Next::InMemory(ready) => (*ready, true),
            Next::Blocking(Some(ready)) => (*ready, false),
            Next::Blocking(None) => (node.ready(), false),
        };
        handle(node, ready, &mut Discard).expect("handled");
        Some(in_place)
    }

    fn propose(node: &mut RawNode<RaftLog>) {
        let batch = crate::test_batches::batch_of(conveyor_storage::batch::Compression::None, 100);
        node.propose(vec![], batch.to_vec()).expect("propose");
    }

    #[tokio::test]
    async fn under_flush_os_appends_go_in_place_and_an_election_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut owner, mut node) = group(dir.path(), FlushPolicy::Os);
        node.campaign().expect("campaign");
        assert_eq!(
            next_in_place(&mut owner, &mut node),
            Some(false),
            "a new term is stored durably: the blocking pool"
        );
        while next_in_place(&mut owner, &mut node).is_some() {}
        assert_eq!(node.raft.state, StateRole::Leader);
        propose(&mut node);
        assert_eq!(next_in_place(&mut owner, &mut node), Some(true), "a page-cache write");
        assert!(node.raft.raft_log.committed >= node.raft.raft_log.last_index());
    }

    #[tokio::test]
    async fn under_flush_always_a_round_that_appends_goes_to_the_blocking_pool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut owner, mut node) = group(dir.path(), FlushPolicy::Always);
        node.campaign().expect("campaign");
        while next_in_place(&mut owner, &mut node).is_some() {}
        for _ in 0..3 {
            propose(&mut node);
            assert_eq!(
                next_in_place(&mut owner, &mut node),
                Some(false),
                "an append that must be fsynced never runs on the reactor"
            );
        }
    }
}
