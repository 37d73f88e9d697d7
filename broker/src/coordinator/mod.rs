//! Coordinators: state machines hosted on internal partitions (ARCHITECTURE.md §4,
//! `docs/coordinators.md`).
//!
//! A coordinator keeps its state in memory and every change of it as a keyed record in a
//! partition of an internal compacted topic. The leader of that partition is the coordinator
//! of every id (group, transactional id) that hashes to it. A new leader replays the
//! partition (compaction keeps the replay proportional to the live keys) before it answers;
//! a change is answered only after Raft commits its records, and enters the in-memory state
//! by the same [`StateMachine::apply`] the replay uses, so the state a failover rebuilds is
//! the state that was served.
//!
//! - [`host`]: loads, serves and drops one state machine per internal partition this broker
//!   leads, and writes their records (the substrate share-group and transaction
//!   coordinators reuse).
//! - [`internal_topic`]: creating internal topics and hashing ids to their partitions.
//! - [`end_offsets`]: the high watermarks and offset lookups coordinators need of partitions
//!   that may be led elsewhere.
//! - [`groups`]: the consumer group coordinator.
//! - [`shares`]: the share group coordinator (queues on the log).

pub mod end_offsets;
pub mod groups;
pub mod host;
pub mod internal_topic;
pub mod shares;

use bytes::Bytes;

/// One change of a coordinator's state: a keyed record of its internal partition; `None`
/// as the value is a tombstone (compaction removes the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: Bytes,
    pub value: Option<Bytes>,
}

/// A coordinator's in-memory state, rebuilt from its partition's records.
pub trait StateMachine: Send + 'static {
    /// Applies one committed record, met in log order: at a replay, or right after a write
    /// of it committed. A record it cannot read is reported and skipped by the host (one bad
    /// record must not keep a coordinator from ever loading).
    fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String>;

    /// Called once a replay has finished, before any request is served: timers (sessions,
    /// locks) restart from `now`, since nothing says how long the old leader kept them.
    fn loaded(&mut self, now: std::time::Instant);
}
