//! Producer id blocks: how the metadata log records them and how the controller allocates
//! them.
//!
//! Idempotent producers are told apart by a producer id that no two producers may share,
//! across controller failovers and restarts. The controller hands ids out in blocks of
//! [`BLOCK`] consecutive ids, each recorded in the metadata log as a `ProducerIdsAllocated`
//! record; a broker then issues the ids of its block one by one without asking again (see
//! [`crate::producer_ids`]).
//!
//! # Invariants
//! - Blocks are consecutive: a block applies only if it starts exactly where the last
//!   applied block ended ([`IdBlocks::apply`]). Two controllers racing (an old leader's
//!   proposal committed after a new leader read the state, or a controller whose applied
//!   state lags the log) propose the same start: only the first committed counts, the
//!   other is ignored on every broker alike, and its proposer sees that its block is not
//!   the one recorded and tries again.
//! - A proposer recognises its own block by the random `proposal` mark each proposal
//!   draws, never by its broker and range: two proposals of the same block to the same
//!   broker would otherwise look alike, and a controller that lost to an identical block
//!   would answer ids already answered.
//! - Ids are never negative (-1 means "no producer" in a batch header) and a block never
//!   runs past `i64::MAX`.
//! - The state keeps only the last block: the next id follows from it, and a snapshot holds
//!   it as its one `ProducerIdsAllocated` record, so the next id survives snapshots and
//!   restarts.
//!
//! # Crash behaviour
//! A block is answered to its broker only once it is committed and applied on the
//! controller. A controller that dies in between leaves a block recorded but never issued:
//! those ids are skipped, never reused.

use conveyor_proto::internal::v1::{ProducerIdBlock, ProducerIdsAllocated, metadata_record};

use super::Registry;
use super::admin_ops::lock_changes;
use crate::error::{BrokerError, Result};
use crate::replica::transport::CONTROLLER_TOPIC;

/// Ids in one block: one metadata record per this many producers.
pub const BLOCK: u32 = 1000;
/// Proposals tried before giving up: a proposal loses only to records committed before it
/// that this controller had not applied when it read the next id, and it waits for those to
/// be applied, so the second attempt starts at the right id.
const ATTEMPTS: usize = 3;

/// The producer id blocks the metadata log recorded, as far as they matter: the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct IdBlocks {
    last: Option<ProducerIdsAllocated>,
}

impl IdBlocks {
    /// The first id no block has covered yet: the start of the next block.
    pub fn next(&self) -> i64 {
        self.last.as_ref().map_or(0, |b| b.first + i64::from(b.count))
    }

    #[cfg(test)]
    pub fn last(&self) -> Option<&ProducerIdsAllocated> {
        self.last.as_ref()
    }

    /// Folds a committed block in; returns whether it was taken. A block that does not
    /// start at [`next`](Self::next) lost a race and is ignored. With no block recorded
    /// yet any valid block is taken: the live log's first block starts at 0 (its proposer
    /// read an empty state), and a snapshot's single record rebuilds the state it was taken
    /// from.
    pub fn apply(&mut self, block: &ProducerIdsAllocated) -> bool {
        let valid = block.count > 0 && block.first >= 0 && block.first.checked_add(i64::from(block.count)).is_some();
        let in_place = self.last.is_none() || block.first == self.next();
        if valid && in_place {
            self.last = Some(*block);
        }
        valid && in_place
    }

    /// Whether `proposal` is the block the log recorded last: its proposer won. Compared
    /// with its proposal mark: a block for the same broker at the same start committed
    /// before it (by a controller this one had not caught up with) is not this proposal,
    /// and its ids may have been answered to that broker already.
    pub fn recorded(&self, proposal: &ProducerIdsAllocated) -> bool {
        self.last.as_ref() == Some(proposal)
    }

    /// The record that rebuilds this state when applied to an empty one.
    pub fn record(&self) -> Option<metadata_record::Change> {
        self.last.map(metadata_record::Change::ProducerIdsAllocated)
    }
}

impl Registry {
    /// Allocates the next block of producer ids to `broker` (controller only; elsewhere
    /// [`BrokerError::NotController`] names the controller). Answers once the block is
    /// committed and applied here and is the one the log recorded. `lock` is the metadata
    /// change lock, held while the next id is read and the block proposed.
    pub async fn allocate_producer_ids(&self, lock: &tokio::sync::Mutex<()>, broker: u32) -> Result<ProducerIdBlock> {
        for attempt in 1..=ATTEMPTS {
            self.ensure_controller()?;
            let _guard = lock_changes(lock).await?;
            let first = self.snapshotting.lock_state().producer_ids.next();
            if first.checked_add(i64::from(BLOCK)).is_none() {
                return Err(BrokerError::Internal("every producer id has been issued".into()));
            }
            let block = proposal(broker, first);
            self.propose(metadata_record::Change::ProducerIdsAllocated(block))
                .await
                .map_err(|e| match e {
                    // Leadership moved while this call waited for the lock.
                    BrokerError::NotLeader { leader, address, .. } => BrokerError::NotController {
                        controller: leader,
                        address,
                    },
                    other => other,
                })?;
            if self.snapshotting.lock_state().producer_ids.recorded(&block) {
                tracing::debug!(broker, first, count = BLOCK, "allocated producer ids");
                return Ok(ProducerIdBlock { first, count: BLOCK });
            }
            tracing::info!(
                broker,
                first,
                attempt,
                "a producer id block proposed by another controller was committed first; allocating again"
            );
        }
        Err(BrokerError::ProducerIdsUnavailable {
            reason: format!("the controller's proposals lost to other records {ATTEMPTS} times"),
        })
    }

    /// Fails unless this broker is the controller, naming the one that is.
    fn ensure_controller(&self) -> Result<()> {
        match self.metadata.ensure_leader() {
            Ok(()) => Ok(()),
            Err(BrokerError::NotLeader { leader, address, .. }) => Err(BrokerError::NotController {
                controller: leader,
                address,
            }),
            Err(BrokerError::LeaderNotAvailable { .. }) => Err(BrokerError::NoController),
            Err(other) => Err(BrokerError::ProducerIdsUnavailable {
                reason: format!("{CONTROLLER_TOPIC}: {other}"),
            }),
        }
    }
}

/// A block of [`BLOCK`] ids from `first` for `broker`, to propose, marked with a number
/// drawn for this proposal alone (see [`IdBlocks::recorded`]).
fn proposal(broker: u32, first: i64) -> ProducerIdsAllocated {
    ProducerIdsAllocated {
        broker,
        first,
        count: BLOCK,
        proposal: proposal_mark(),
    }
}

/// A random non-zero number. `RandomState` is seeded from the operating system's randomness
/// once per process and thread (and moves on with every instance); the counter and clock
/// make a repeat within a process impossible rather than unlikely.
fn proposal_mark() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static DRAWN: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(DRAWN.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(broker: u32, first: i64, count: u32) -> ProducerIdsAllocated {
        ProducerIdsAllocated {
            broker,
            first,
            count,
            proposal: 0,
        }
    }

    #[test]
    fn a_block_not_starting_at_the_next_id_is_ignored() {
        let mut blocks = IdBlocks::default();
        assert_eq!(blocks.next(), 0);
        assert!(blocks.apply(&block(1, 0, BLOCK)));
        assert_eq!(blocks.next(), 1000);
        // Two controllers both read next = 1000: only the first committed counts.
        assert!(blocks.apply(&block(2, 1000, BLOCK)));
        assert!(
            !blocks.apply(&block(3, 1000, BLOCK)),
            "a second block at the same start"
        );
        assert_eq!(blocks.last(), Some(&block(2, 1000, BLOCK)));
        assert!(!blocks.apply(&block(3, 0, BLOCK)), "a block behind");
        assert!(!blocks.apply(&block(3, 5000, BLOCK)), "a block ahead");
        assert_eq!(blocks.next(), 2000);
    }

    #[test]
    fn a_block_that_is_empty_negative_or_overflowing_is_ignored() {
        let mut blocks = IdBlocks::default();
        assert!(!blocks.apply(&block(1, 0, 0)));
        assert!(!blocks.apply(&block(1, -1, BLOCK)));
        assert!(!blocks.apply(&block(1, i64::MAX - 10, BLOCK)));
        assert_eq!(blocks, IdBlocks::default());
        assert!(blocks.apply(&block(1, i64::MAX - i64::from(BLOCK), BLOCK)));
        assert_eq!(blocks.next(), i64::MAX);
    }

    #[test]
    fn the_record_rebuilds_the_next_id_in_an_empty_state() {
        let mut blocks = IdBlocks::default();
        assert_eq!(blocks.record(), None);
        for first in [0, 1000, 2000] {
            assert!(blocks.apply(&block(2, first, BLOCK)));
        }
        let Some(metadata_record::Change::ProducerIdsAllocated(last)) = blocks.record() else {
            panic!("one block record");
        };
        let mut rebuilt = IdBlocks::default();
        assert!(rebuilt.apply(&last));
        assert_eq!(rebuilt, blocks);
        assert_eq!(rebuilt.next(), 3000);
    }

    #[test]
    fn a_controller_whose_state_lags_behind_a_committed_block_does_not_take_it_for_its_own() {
        // An old controller's block for broker 2 at 5000 is committed (and maybe answered);
        // a new controller that has not applied it yet reads next = 5000 and proposes the
        // same start for the same broker.
        let mut log = IdBlocks::default();
        assert!(log.apply(&proposal(1, 4000)));
        let earlier = proposal(2, 5000);
        let lagging = proposal(2, 5000);
        assert!(log.apply(&earlier), "the earlier proposal was committed first");
        assert!(!log.apply(&lagging), "the lagging one starts at a taken id");
        assert!(log.recorded(&earlier));
        assert!(
            !log.recorded(&lagging),
            "the lagging controller must see that its block is not the one recorded"
        );
    }
}
