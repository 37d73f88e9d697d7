//! How a share-partition's record states are written to `__share_state`: the states that
//! must survive a failover, and consecutive records with one state as a run.

use conveyor_proto::internal::v1::ShareRun;

use super::window::{Slot, SlotState};

/// A record state as written to `__share_state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable {
    pub state: u32,
    pub deliveries: u32,
    pub not_before: i64,
    pub reason: String,
}

pub(super) const DURABLE_AVAILABLE: u32 = 0;
pub(super) const DURABLE_DEAD_LETTERING: u32 = 1;
pub(super) const DURABLE_ACKNOWLEDGED: u32 = 2;
pub(super) const DURABLE_ARCHIVED: u32 = 3;

pub(super) fn durable_of(s: &Slot) -> Durable {
    let (state, reason) = match s.state {
        SlotState::Available | SlotState::Acquired => (DURABLE_AVAILABLE, String::new()),
        SlotState::DeadLettering => (
            DURABLE_DEAD_LETTERING,
            durable_reason(s.reason.as_deref().unwrap_or("")),
        ),
        SlotState::Acknowledged => (DURABLE_ACKNOWLEDGED, String::new()),
        SlotState::Archived => (DURABLE_ARCHIVED, String::new()),
    };
    Durable {
        state,
        deliveries: s.deliveries,
        // Header delays are read again from the record; only a release's delay is stored.
        not_before: if s.state == SlotState::Available {
            s.not_before
        } else {
            0
        },
        reason,
    }
}

/// Most bytes of a dead-letter reason kept in the share state (a snapshot holds one per
/// record waiting for its dead letter, so it must stay well within a write's bounds).
pub const DURABLE_REASON_BYTES: usize = 128;

fn durable_reason(reason: &str) -> String {
    if reason.len() <= DURABLE_REASON_BYTES {
        return reason.to_string();
    }
    let mut end = DURABLE_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// Consecutive offsets with the same durable state as runs.
pub(super) fn runs(durable: Vec<(u64, Durable)>) -> Vec<ShareRun> {
    let mut out: Vec<ShareRun> = Vec::new();
    for (offset, d) in durable {
        if let Some(last) = out.last_mut()
            && last.last_offset + 1 == offset
            && last.state == d.state
            && last.delivery_count == d.deliveries
            && last.not_before_ms == d.not_before.max(0) as u64
            && last.reason == d.reason
        {
            last.last_offset = offset;
            continue;
        }
        out.push(ShareRun {
            first_offset: offset,
            last_offset: offset,
            state: d.state,
            delivery_count: d.deliveries,
            not_before_ms: d.not_before.max(0) as u64,
            reason: d.reason,
        });
    }
    out
}
