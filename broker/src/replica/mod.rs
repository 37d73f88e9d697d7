//! Replication: one Raft group per partition, whose Raft log is the partition log.
//!
//! # Layout
//! - [`partition`]: a partition's handle: opening its replica, mailbox, high watermark.
//! - [`proposal`]: what the handle asks the owner: appends and control requests.
//! - [`status`]: `GroupStatus`, what a replica reports about its group.
//! - [`entry`]: Raft entries as record batches (normal entries are client batches; no-ops
//!   and membership changes are control batches).
//! - [`raft_state`]: the small per-partition file holding HardState, ConfState and the
//!   snapshot point.
//! - [`raft_storage`]: raft-rs `Storage` over the segmented log: no second write-ahead log.
//! - [`ready`]: processing a `RawNode` Ready in raft-rs's documented order.
//! - [`tick`]: when a Raft node ticks (by the clock, whatever woke its owner).
//! - [`supervisor`]: a partition owner that fails or panics is reported, stops claiming
//!   leadership, and is restarted from its log with backoff.
//! - [`inbound`]: what the owner does with each message from its inbox: the transport's
//!   reports on messages it could not deliver, and peers' messages.
//! - [`owner`]: the task that drives a partition's Raft node: appends, membership changes,
//!   messages, ticks and Readies; `owner::control` answers its control requests (leadership
//!   transfer, hand-over, membership steps); `owner::idempotence` judges idempotent batches
//!   before they are proposed and answers retries of batches written before.
//! - [`producers`]: idempotent producers on a replica: the applied table, the leader's pending
//!   batches, the verdict on a batch, and the producer snapshots its Raft snapshots carry.
//! - [`membership`]: making one membership step on whichever replica leads a group.
//! - [`transport`]: Raft messages between brokers, batched per peer, bounded queues.
//! - [`lost_entries`]: a replica whose log lost entries it acknowledged recovers from its
//!   leader, and meanwhile votes only for logs that hold what it promised.
//! - [`departure`]: when a replica's data may be deleted.
//! - [`stalled_snapshots`]: a leader resumes followers whose snapshot was lost unreported.
//! - [`state_snapshot`]: snapshots of a state machine replayed from a group's log (the
//!   controller's metadata), which a start loads instead of replaying the whole log and a
//!   follower behind the log start receives from its leader.
//!
//! The partition's handle ([`partition`]) opens replicas and sends the owner requests; the
//! transport ([`transport`]) carries messages between brokers.
//!
//! # What a replica reports
//! The owner publishes a `GroupStatus` (leader, term, each follower's lag and whether it is
//! in sync, a failure) after its Readies; metadata answers, `topic describe` and the
//! under-replicated and offline partition gauges (`crate::metrics`) read it. It logs one
//! line per leadership change; raft-rs's own records stay at `warn` unless `RUST_LOG` asks
//! for them. The fsync histogram is fed by the storage crate's fsync rounds alone, not by the
//! Ready job around them.

pub mod departure;
pub mod entry;
pub mod inbound;
pub mod lost_entries;
pub mod membership;
pub mod owner;
pub mod partition;
pub mod producers;
pub mod proposal;
pub mod raft_state;
pub mod raft_storage;
pub mod ready;
pub mod stalled_snapshots;
pub mod state_snapshot;
pub mod status;
pub mod supervisor;
pub mod tick;
pub mod transport;
