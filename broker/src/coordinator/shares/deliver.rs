//! Fetches and acknowledgements of share group members.
//!
//! A fetch first applies the acknowledgements it carries, then acquires available records
//! across the group's partitions (starting at a different partition each time, so no
//! partition is served only when the others run dry), waiting up to its `max_wait` for
//! some. Acknowledgements change memory at once and are answered after their records
//! commit; a range that names records its member does not hold under its token is refused
//! whole (STALE_DELIVERY) and changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use conveyor_proto::v1::{
    AcquiredRange, ErrorCode, ShareAck, ShareAckKind, ShareAckResult, ShareFetchResponse, SharePartitionData,
};

use super::state::SharesState;
use super::window::{AckKind, Acquired};
use super::{ShareCoordinator, group_mut, name_group};
use crate::coordinator::Change;
use crate::coordinator::host::Committed;
use crate::error::{BrokerError, Result};

/// Most records one fetch may ask for.
pub const MAX_FETCH_RECORDS: u32 = 10_000;
/// Most bytes of batches one answer holds (at least one batch).
pub const MAX_FETCH_BYTES: u32 = 16 << 20;
pub const DEFAULT_FETCH_BYTES: u32 = 4 << 20;
/// Longest wait of a fetch.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// Most acknowledgements one request may carry.
pub const MAX_ACKS: usize = 10_000;
/// Longest reject reason kept.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest release delay.
pub const MAX_RELEASE_DELAY_MS: u32 = 24 * 3_600_000;

/// Rotates the partition fetches start at.
static NEXT_START: AtomicUsize = AtomicUsize::new(0);

/// What a fetch asks.
#[derive(Debug, Clone)]
pub struct FetchArgs {
    pub group: String,
    pub member: String,
    pub max_records: u32,
    pub max_bytes: u32,
    pub max_wait: Duration,
    pub acks: Vec<ShareAck>,
}

/// Checks acknowledgements before any is applied.
pub fn check_acks(acks: &[ShareAck]) -> Result<()> {
    if acks.len() > MAX_ACKS {
        return Err(BrokerError::InvalidRequest(format!(
            "a request may carry at most {MAX_ACKS} acknowledgements, got {}",
            acks.len()
        )));
    }
    for a in acks {
        if a.last_offset < a.first_offset {
            return Err(BrokerError::InvalidRequest(format!(
                "an acknowledgement's last offset {} is before its first {}",
                a.last_offset, a.first_offset
            )));
        }
        if a.reason.len() > MAX_REASON_LEN {
            return Err(BrokerError::InvalidRequest(format!(
                "a reject reason may be at most {MAX_REASON_LEN} bytes, got {}",
                a.reason.len()
            )));
        }
        if a.delay_ms > MAX_RELEASE_DELAY_MS {
            return Err(BrokerError::InvalidRequest(format!(
                "a release delay may be at most {MAX_RELEASE_DELAY_MS} ms, got {}",
                a.delay_ms
            )));
        }
        match ShareAckKind::try_from(a.kind) {
            Ok(ShareAckKind::Accept | ShareAckKind::Release | ShareAckKind::Reject | ShareAckKind::Renew) => {}
            _ => {
                return Err(BrokerError::InvalidRequest(format!(
                    "unknown acknowledgement kind {}; use ACCEPT, RELEASE, REJECT or RENEW",
                    a.kind
                )));
            }
        }
    }
    Ok(())
}

fn kind_of(a: &ShareAck) -> AckKind {
    match ShareAckKind::try_from(a.kind) {
        Ok(ShareAckKind::Release) => AckKind::Release {
            delay_ms: i64::from(a.delay_ms),
        },
        Ok(ShareAckKind::Reject) => AckKind::Reject {
            reason: if a.reason.is_empty() {
                "no reason given".into()
            } else {
                a.reason.clone()
            },
        },
        Ok(ShareAckKind::Renew) => AckKind::Renew,
        _ => AckKind::Accept,
    }
}

impl ShareCoordinator {
    /// Applies `acks` of `member` in `group`; answered once their records committed.
    pub async fn acknowledge(
        self: &Arc<Self>,
        group: &str,
        member: &str,
        acks: &[ShareAck],
    ) -> Result<Vec<ShareAckResult>> {
        let (results, committed) = self.apply_acks(group, member, acks).await?;
        committed.wait().await.map_err(|e| name_group(e, group))?;
        Ok(results)
    }

    /// Applies `acks` to memory and queues their records; the results hold once the
    /// returned commit does.
    async fn apply_acks(
        self: &Arc<Self>,
        group: &str,
        member: &str,
        acks: &[ShareAck],
    ) -> Result<(Vec<ShareAckResult>, Committed)> {
        check_acks(acks)?;
        if acks.is_empty() {
            return Ok((Vec::new(), Committed::done()));
        }
        let shard = self.shard_for(group).await?;
        let mut st = shard.lock().await;
        let g = group_mut(&mut st, group)?;
        let number = *g.member_numbers.get(member).ok_or_else(|| BrokerError::UnknownMember {
            group: group.to_string(),
            member: member.to_string(),
        })?;
        let now = conveyor_storage::unix_millis();
        let (lock_ms, max) = (i64::from(g.settings.lock_ms), g.settings.max_deliveries);
        let mut results = Vec::with_capacity(acks.len());
        let mut changed: std::collections::BTreeMap<i32, Vec<u64>> = std::collections::BTreeMap::new();
        let (mut freed, mut dead, mut room) = (false, false, false);
        for a in acks {
            let mut result = ShareAckResult {
                partition: a.partition,
                first_offset: a.first_offset,
                last_offset: a.last_offset,
                ..Default::default()
            };
            let Some(w) = g.windows.get_mut(&a.partition) else {
                result.error = ErrorCode::StaleDelivery as i32;
                result.message = format!("share group '{group}' holds nothing of partition {}", a.partition);
                results.push(result);
                continue;
            };
            let kind = kind_of(a);
            match w.acknowledge(number, a.first_offset, a.last_offset, a.token, &kind, now, lock_ms, max) {
                Ok((offsets, locked_until)) => {
                    let n = offsets.len() as u64;
                    match kind {
                        AckKind::Accept => {
                            self.metrics.accepted.add(n);
                            room = true;
                        }
                        AckKind::Release { .. } => {
                            self.metrics.released.add(n);
                            freed = true;
                        }
                        AckKind::Reject { .. } => {
                            self.metrics.rejected.add(n);
                            dead = true;
                        }
                        AckKind::Renew => result.locked_until_ms = locked_until,
                    }
                    if !offsets.is_empty() {
                        changed.entry(a.partition).or_default().extend(offsets);
                    }
                }
                Err(stale) => {
                    result.error = ErrorCode::StaleDelivery as i32;
                    result.message = format!(
                        "partition {} offsets {}..={}: {}; nothing was changed",
                        a.partition, a.first_offset, a.last_offset, stale.0
                    );
                }
            }
            results.push(result);
        }
        let mut changes: Vec<Change> = Vec::new();
        for (p, offsets) in changed {
            changes.extend(g.record_of(group, p, &offsets));
        }
        // In key order an accept frees its key's next record.
        if freed || dead || (room && g.settings.key_order) {
            g.available.notify_waiters();
        }
        if room || dead {
            g.room.notify_waiters();
        }
        let committed = shard.append_ahead(&changes).await.map_err(|e| name_group(e, group))?;
        drop(st);
        if dead {
            self.start_tasks(&shard, group).await;
        }
        Ok((results, committed))
    }

    /// Applies the fetch's acknowledgements, then acquires records for its member.
    /// Records are acquired while the acknowledgements commit; the answer waits for both.
    pub async fn fetch(self: &Arc<Self>, f: FetchArgs) -> Result<ShareFetchResponse> {
        let (ack_results, committed) = self.apply_acks(&f.group, &f.member, &f.acks).await?;
        let group = f.group.clone();
        let answer = self.acquire(f, ack_results).await;
        committed.wait().await.map_err(|e| name_group(e, &group))?;
        answer
    }

    async fn acquire(self: &Arc<Self>, f: FetchArgs, ack_results: Vec<ShareAckResult>) -> Result<ShareFetchResponse> {
        let deadline = tokio::time::Instant::now() + f.max_wait.min(MAX_WAIT);
        let shard = self.shard_for(&f.group).await?;
        let max_records = f.max_records.clamp(1, MAX_FETCH_RECORDS) as usize;
        let max_bytes = match f.max_bytes {
            0 => DEFAULT_FETCH_BYTES,
            b => b.min(MAX_FETCH_BYTES),
        } as usize;
        let available = {
            let mut st = shard.lock().await;
            Arc::clone(&group_mut(&mut st, &f.group)?.available)
        };
        loop {
            // Registered before the windows are looked at, so a record made available
            // after the look wakes this fetch.
            let notified = available.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let next_due;
            {
                let mut st = shard.lock().await;
                // A state that stopped serving (a failed write, a new term) must hand out
                // nothing more: its reload hands the same records out again.
                if !shard.is_current() {
                    return Err(BrokerError::CoordinatorLoading {
                        group: f.group.clone(),
                        state: "reloads its state; fetch again".into(),
                    });
                }
                let SharesState { groups, next_token } = &mut *st;
                let g = groups
                    .get_mut(&f.group)
                    .ok_or_else(|| BrokerError::UnknownGroup(f.group.clone()))?;
                let number = *g
                    .member_numbers
                    .get(&f.member)
                    .ok_or_else(|| BrokerError::UnknownMember {
                        group: f.group.clone(),
                        member: f.member.clone(),
                    })?;
                let now = conveyor_storage::unix_millis();
                let locked_until = now + i64::from(g.settings.lock_ms);
                let (key_order, max) = (g.settings.key_order, g.settings.max_deliveries);
                let partitions: Vec<i32> = g.windows.keys().copied().collect();
                let start = NEXT_START.fetch_add(1, Ordering::Relaxed);
                let (mut left, mut bytes_left) = (max_records, max_bytes);
                let mut parts = Vec::new();
                let mut exhausted: Vec<(i32, Vec<u64>)> = Vec::new();
                let mut next = || {
                    *next_token = next_token.wrapping_add(1).max(1);
                    *next_token
                };
                for i in 0..partitions.len() {
                    if left == 0 || bytes_left == 0 {
                        break;
                    }
                    let p = partitions[(start + i) % partitions.len()];
                    let Some(w) = g.windows.get_mut(&p) else { continue };
                    let (acquired, out_of_deliveries) =
                        w.acquire(number, left, bytes_left, key_order, max, now, locked_until, &mut next);
                    if !out_of_deliveries.is_empty() {
                        exhausted.push((p, out_of_deliveries));
                    }
                    if acquired.is_empty() {
                        continue;
                    }
                    let batches = w.batches_for(&acquired);
                    let count: u64 = acquired.iter().map(|a| u64::from(a.count)).sum();
                    let redelivered: u64 = acquired
                        .iter()
                        .filter(|a| a.deliveries > 1)
                        .map(|a| u64::from(a.count))
                        .sum();
                    self.metrics.acquired.add(count);
                    self.metrics.redeliveries.add(redelivered);
                    left = left.saturating_sub(count as usize);
                    bytes_left = bytes_left.saturating_sub(batches.len());
                    parts.push(SharePartitionData {
                        partition: p,
                        batches,
                        acquired: acquired.iter().map(range_of).collect(),
                    });
                }
                let mut changes = Vec::new();
                for (p, offsets) in &exhausted {
                    changes.extend(g.record_of(&f.group, *p, offsets));
                }
                let waiting_dead = !exhausted.is_empty();
                if !changes.is_empty() {
                    // Not awaited: the dead-letter task acts on memory, and a failed write
                    // marks the shard lost (the records are delivered again after a reload).
                    let _ = shard.append_ahead(&changes).await;
                }
                if !parts.is_empty() || tokio::time::Instant::now() >= deadline {
                    drop(st);
                    if waiting_dead {
                        self.start_tasks(&shard, &f.group).await;
                    }
                    return Ok(ShareFetchResponse {
                        partitions: parts,
                        ack_results,
                        locked_until_ms: locked_until,
                    });
                }
                // Only a fetch about to wait needs the next delay's end (a scan of the windows).
                next_due = g.windows.values().filter_map(|w| w.next_due(now)).min();
            }
            let mut wake = deadline;
            if let Some(due) = next_due {
                let wait = Duration::from_millis(due.saturating_sub(conveyor_storage::unix_millis()).max(1) as u64)
                    .min(MAX_WAIT);
                wake = wake.min(tokio::time::Instant::now() + wait);
            }
            let _ = tokio::time::timeout_at(wake, notified).await;
        }
    }
}

fn range_of(a: &Acquired) -> AcquiredRange {
    AcquiredRange {
        first_offset: a.first,
        last_offset: a.last,
        delivery_count: a.deliveries,
        token: a.token,
    }
}
