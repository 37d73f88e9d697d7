//! How a share-partition's record states are written to `__share_state`: the states that
//! must survive a failover, and consecutive records with one state as a run.

use conveyor_proto::internal::v1::{SharePartitionValue, ShareRun};

use super::window::{Slot, SlotState, Window};

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

/// A slot's durable state, borrowed: the reason (cut to [`DURABLE_REASON_BYTES`]) only for
/// records waiting for their dead letter, the delay only for available ones.
#[derive(Debug, Clone, Copy)]
struct DurableRef<'a> {
    state: u32,
    deliveries: u32,
    not_before: i64,
    reason: &'a str,
}

fn durable_of(s: &Slot) -> DurableRef<'_> {
    let (state, reason) = match s.state {
        SlotState::Available | SlotState::Acquired => (DURABLE_AVAILABLE, ""),
        SlotState::DeadLettering => (
            DURABLE_DEAD_LETTERING,
            durable_reason(s.reason.as_deref().unwrap_or("")),
        ),
        SlotState::Acknowledged => (DURABLE_ACKNOWLEDGED, ""),
        SlotState::Archived => (DURABLE_ARCHIVED, ""),
    };
    DurableRef {
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

impl Durable {
    fn borrowed(&self) -> DurableRef<'_> {
        DurableRef {
            state: self.state,
            deliveries: self.deliveries,
            not_before: self.not_before,
            reason: &self.reason,
        }
    }
}

/// Most bytes of a dead-letter reason kept in the share state (a snapshot holds one per
/// record waiting for its dead letter, so it must stay well within a write's bounds).
pub const DURABLE_REASON_BYTES: usize = 128;

fn durable_reason(reason: &str) -> &str {
    if reason.len() <= DURABLE_REASON_BYTES {
        return reason;
    }
    let mut end = DURABLE_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Adds `offset` to the runs: to the last one when it follows it with the same state,
/// else as a new one. Offsets come in increasing order.
fn push_run(out: &mut Vec<ShareRun>, offset: u64, d: DurableRef<'_>) {
    let not_before_ms = d.not_before.max(0) as u64;
    if let Some(last) = out.last_mut()
        && last.last_offset + 1 == offset
        && last.state == d.state
        && last.delivery_count == d.deliveries
        && last.not_before_ms == not_before_ms
        // Most reasons are empty: their lengths settle it without a compare call per record.
        && last.reason.len() == d.reason.len()
        && (d.reason.is_empty() || last.reason == d.reason)
    {
        last.last_offset = offset;
        return;
    }
    out.push(ShareRun {
        first_offset: offset,
        last_offset: offset,
        state: d.state,
        delivery_count: d.deliveries,
        not_before_ms,
        reason: d.reason.to_string(),
    });
}

impl Window {
    /// An update for `changed` (and the start), with the next sequence. Offsets no longer
    /// in the window are done and dropped from its front: the start says so.
    pub fn update(&mut self, changed: &[u64]) -> SharePartitionValue {
        self.sequence += 1;
        let sorted_copy;
        let offsets = if changed.is_sorted() {
            changed
        } else {
            let mut copy = changed.to_vec();
            copy.sort_unstable();
            sorted_copy = copy;
            &sorted_copy
        };
        let slots = self.slot_list();
        let mut out = Vec::new();
        // Changed offsets come in ranges: the slot after the last found is tried before a search.
        let mut next = 0;
        let mut previous = None;
        // Accepted records are usually gone from the front already (the window advanced
        // past them): those are passed over without a search each.
        let front = slots.front().map_or(u64::MAX, |s| s.offset);
        for &offset in offsets {
            if previous == Some(offset) || offset < front {
                continue;
            }
            previous = Some(offset);
            let i = match slots.get(next) {
                Some(s) if s.offset == offset => next,
                _ => match self.index_of(offset) {
                    Ok(i) => i,
                    Err(at) => {
                        next = at;
                        continue;
                    }
                },
            };
            push_run(&mut out, offset, durable_of(&slots[i]));
            next = i + 1;
        }
        SharePartitionValue {
            sequence: self.sequence,
            start_offset: self.start,
            runs: out,
            dead_letters: self.dead_letters,
        }
    }

    /// The whole durable state, with the next sequence.
    pub fn snapshot(&mut self) -> SharePartitionValue {
        self.sequence += 1;
        let mut durable: Vec<(u64, DurableRef<'_>)> = self
            .slot_list()
            .iter()
            .filter_map(|s| {
                let d = durable_of(s);
                let default = d.state == DURABLE_AVAILABLE && d.deliveries == 0 && d.not_before == 0;
                (!default).then_some((s.offset, d))
            })
            .collect();
        durable.extend(self.pending_states().iter().map(|(o, d)| (*o, d.borrowed())));
        durable.sort_by_key(|(o, _)| *o);
        let mut out = Vec::new();
        for (offset, d) in durable {
            push_run(&mut out, offset, d);
        }
        SharePartitionValue {
            sequence: self.sequence,
            start_offset: self.start,
            runs: out,
            dead_letters: self.dead_letters,
        }
    }
}
