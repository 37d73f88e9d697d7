//! One share-partition: the window of one partition's records a share group tracks.
//!
//! Every record below `start` is done (acknowledged or archived). From `start` to `end`
//! (the next offset to read) the window holds one [`Slot`] per record, in offset order, and
//! the stored batches they came from (records are handed out as those batches, never
//! re-encoded). The fill stops while the window is full: `max_inflight` records that are
//! available or acquired, or its span or bytes at their bounds (see [`Limits`]).
//!
//! Only what must survive a failover is written: records acknowledged, archived, to be
//! dead-lettered, or made available again with a delivery count or a delay. Acquisitions
//! are not: a new coordinator makes every record in flight available again (its holder's
//! token is refused there and the record is delivered anew).

use std::collections::{BTreeMap, HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use conveyor_proto::internal::v1::{SharePartitionValue, ShareRun};

use super::durable::{DURABLE_ACKNOWLEDGED, DURABLE_ARCHIVED, DURABLE_DEAD_LETTERING, Durable};

/// A record's state in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Available,
    Acquired,
    /// Rejected or out of deliveries: waiting for its dead letter to be written.
    DeadLettering,
    Acknowledged,
    Archived,
}

impl SlotState {
    fn done(self) -> bool {
        matches!(self, SlotState::Acknowledged | SlotState::Archived)
    }
}

/// One record of the window.
#[derive(Debug, Clone)]
pub struct Slot {
    pub offset: u64,
    pub state: SlotState,
    pub deliveries: u32,
    /// Hash of the record's key (0: no key); used in key order.
    pub key: u64,
    /// Available records: not before this time (ms since the Unix epoch).
    pub not_before: i64,
    pub timestamp: i64,
    /// Acquired records: the delivery's token, holder and lock end (ms since the epoch).
    pub token: u64,
    pub member: u32,
    pub locked_until: i64,
    /// Records to dead-letter: why.
    pub reason: Option<Box<str>>,
}

/// A record as the fill reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub offset: u64,
    pub key: u64,
    pub timestamp: i64,
    /// The `conveyor-deliver-at` header, if any.
    pub deliver_at: Option<i64>,
}

/// A stored batch held for the records of the window it carries.
#[derive(Debug, Clone)]
pub struct CachedBatch {
    pub base: u64,
    pub next: u64,
    pub bytes: Bytes,
}

/// How far the window may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Records available or acquired (delayed ones and a key's records past `per_key`
    /// not counted).
    pub max_inflight: usize,
    /// Records of one key counted toward `max_inflight` in key order.
    pub per_key: usize,
    /// Records in the window in all (done ones between unfinished ones included).
    pub max_span: usize,
    /// Bytes of stored batches held.
    pub max_bytes: usize,
}

impl Limits {
    pub fn for_inflight(max_inflight: usize) -> Limits {
        Limits {
            max_inflight,
            per_key: (max_inflight / 20).max(1),
            max_span: max_inflight * 8,
            max_bytes: 8 << 20,
        }
    }
}

/// One acquisition handed to a member: consecutive slots under one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquired {
    pub first: u64,
    pub last: u64,
    pub deliveries: u32,
    pub token: u64,
    /// Records from `first` to `last` (fewer than the offsets where the log has gaps).
    pub count: u32,
}

/// What an acknowledgement does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckKind {
    Accept,
    Release { delay_ms: i64 },
    Reject { reason: String },
    Renew,
}

/// Why an acknowledgement was refused (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale(pub String);

/// Counts for describing a share-partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub available: u64,
    pub acquired: u64,
    pub acknowledged: u64,
    pub archived: u64,
    pub delayed: u64,
    pub dead_lettering: u64,
    pub oldest_unacked_timestamp: Option<i64>,
}

/// One share-partition's state.
#[derive(Debug, Default)]
pub struct Window {
    pub start: u64,
    /// The next offset to read; `None` until the start is known (a new group's partition
    /// starts where `auto_offset_reset` says, once the fill has asked the log).
    pub end: Option<u64>,
    slots: VecDeque<Slot>,
    batches: VecDeque<CachedBatch>,
    bytes: usize,
    /// Durable states replayed from the log that the fill has not reached yet.
    pending: BTreeMap<u64, Durable>,
    /// The sequence of the last snapshot or update written or replayed.
    pub sequence: u64,
    /// Whether the log holds a snapshot of this partition (a new one must write one before
    /// its start counts).
    pub started: bool,
    /// Dead letters written from this partition since the dead-letter topic was last purged
    /// or redriven.
    pub dead_letters: u64,
    /// No slot before this index is available (outside key order, where acquisition looks
    /// at every key from the front, it is where a scan for available records starts).
    available_from: usize,
    /// Slots not done (available, acquired, waiting for their dead letter): kept as states
    /// change, so the fill and fetches learn the window's room without a scan.
    unfinished: usize,
    /// No available slot's `not_before` is later than this (an upper bound, raised as
    /// delays are set and made exact by scans): from it on, no record is delayed.
    delays_until: i64,
}

impl Window {
    /// A replayed snapshot: the whole durable state.
    pub fn apply_snapshot(&mut self, value: &SharePartitionValue) {
        self.pending.clear();
        self.sequence = value.sequence;
        self.start = value.start_offset;
        self.end = Some(value.start_offset);
        self.started = true;
        self.dead_letters = value.dead_letters;
        self.apply_runs(&value.runs);
    }

    /// A replayed update: ignored unless newer than the snapshot and updates before it.
    pub fn apply_update(&mut self, value: &SharePartitionValue) {
        if value.sequence <= self.sequence || !self.started {
            return;
        }
        self.sequence = value.sequence;
        self.dead_letters = value.dead_letters;
        self.start = self.start.max(value.start_offset);
        self.end = Some(self.start);
        self.apply_runs(&value.runs);
        let start = self.start;
        self.pending.retain(|o, _| *o >= start);
    }

    fn apply_runs(&mut self, runs: &[ShareRun]) {
        for run in runs {
            // Bounded by what a coordinator writes: runs cover window records only.
            let last = run.last_offset.min(run.first_offset.saturating_add(1 << 20));
            for offset in run.first_offset..=last {
                if offset < self.start {
                    continue;
                }
                self.pending.insert(
                    offset,
                    Durable {
                        state: run.state,
                        deliveries: run.delivery_count,
                        not_before: run.not_before_ms as i64,
                        reason: run.reason.clone(),
                    },
                );
            }
        }
    }

    /// Sets where a new partition starts (before anything was read); its first record
    /// written is a snapshot.
    pub fn begin_at(&mut self, offset: u64) {
        self.start = offset;
        self.end = Some(offset);
    }

    /// Moves a window whose next record left the log (retention) to the log's start.
    /// Records waiting for their dead letter stay (with the batches that hold them): their
    /// letters can still be written.
    pub fn skip_to(&mut self, offset: u64) {
        if self.end.is_some_and(|e| e < offset) {
            self.slots.retain(|s| s.state == SlotState::DeadLettering);
            self.unfinished = self.slots.len();
            let slots = &self.slots;
            self.batches
                .retain(|b| slots.iter().any(|s| b.base <= s.offset && s.offset < b.next));
            self.bytes = self.batches.iter().map(|b| b.bytes.len()).sum();
            self.available_from = 0;
            self.end = Some(offset);
            self.start = self.slots.front().map_or(offset, |s| s.offset);
            self.pending.retain(|o, _| *o >= offset);
        }
    }

    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter()
    }

    /// Whether the fill may read more, at `now` (ms since the epoch).
    pub fn has_room(&self, limits: &Limits, key_order: bool, now: i64) -> bool {
        self.room(limits, key_order, now) > 0
    }

    /// How many more records the fill may add now (0: none), counting each new record as
    /// in flight; with the span and byte bounds checked per batch by [`Window::fits`].
    pub fn room(&self, limits: &Limits, key_order: bool, now: i64) -> usize {
        if !self.fits(limits) {
            return 0;
        }
        limits
            .max_inflight
            .saturating_sub(self.inflight(limits, key_order, now))
    }

    /// Whether the window is within its span and byte bounds.
    pub fn fits(&self, limits: &Limits) -> bool {
        self.slots.len() < limits.max_span && self.bytes < limits.max_bytes
    }

    /// Records counting toward `max_inflight`.
    fn inflight(&self, limits: &Limits, key_order: bool, now: i64) -> usize {
        if !key_order && now >= self.delays_until {
            // Nothing is delayed: every unfinished record counts.
            debug_assert_eq!(self.unfinished, self.scan_inflight(limits, key_order, now));
            return self.unfinished;
        }
        self.scan_inflight(limits, key_order, now)
    }

    fn scan_inflight(&self, limits: &Limits, key_order: bool, now: i64) -> usize {
        let mut per_key: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
        let mut count = 0;
        for s in &self.slots {
            let counted = match s.state {
                SlotState::Acquired | SlotState::DeadLettering => true,
                SlotState::Available => s.not_before <= now,
                _ => false,
            };
            if !counted {
                continue;
            }
            if key_order && s.key != 0 {
                let n = per_key.entry(s.key).or_default();
                *n += 1;
                if *n > limits.per_key {
                    continue;
                }
            }
            count += 1;
        }
        count
    }

    /// Adds a batch the fill read at the window's end: one slot per record at or after the
    /// end, with any durable state replayed for it. Records before the end are ones the
    /// window already has (the read started inside the batch).
    pub fn push(&mut self, batch: CachedBatch, records: &[Parsed]) {
        let Some(end) = self.end else { return };
        if batch.next <= end {
            return;
        }
        let mut added = false;
        for r in records.iter().filter(|r| r.offset >= end) {
            let durable = self.pending.remove(&r.offset);
            let mut slot = Slot {
                offset: r.offset,
                state: SlotState::Available,
                deliveries: 0,
                key: r.key,
                not_before: r.deliver_at.unwrap_or(0),
                timestamp: r.timestamp,
                token: 0,
                member: 0,
                locked_until: 0,
                reason: None,
            };
            if let Some(d) = durable {
                slot.deliveries = d.deliveries;
                slot.not_before = slot.not_before.max(d.not_before);
                slot.state = match d.state {
                    DURABLE_DEAD_LETTERING => SlotState::DeadLettering,
                    DURABLE_ACKNOWLEDGED => SlotState::Acknowledged,
                    DURABLE_ARCHIVED => SlotState::Archived,
                    _ => SlotState::Available,
                };
                if slot.state == SlotState::DeadLettering {
                    slot.reason = Some(d.reason.into_boxed_str());
                }
            }
            if !slot.state.done() {
                self.unfinished += 1;
            }
            self.delays_until = self.delays_until.max(slot.not_before);
            self.slots.push_back(slot);
            added = true;
        }
        self.end = Some(batch.next);
        let next = batch.next;
        self.pending.retain(|o, _| *o >= next);
        if added {
            self.bytes += batch.bytes.len();
            self.batches.push_back(batch);
        }
        self.advance();
    }

    /// Drops done records from the front and the batches no record needs any more.
    pub fn advance(&mut self) {
        while self.slots.front().is_some_and(|s| s.state.done()) {
            self.slots.pop_front();
            self.available_from = self.available_from.saturating_sub(1);
        }
        self.start = match self.slots.front() {
            Some(s) => s.offset,
            None => {
                self.delays_until = 0;
                self.end.unwrap_or(self.start)
            }
        };
        while self.batches.front().is_some_and(|b| b.next <= self.start) {
            if let Some(b) = self.batches.pop_front() {
                self.bytes -= b.bytes.len();
            }
        }
    }

    /// The index of the slot holding `offset`, or where it would be.
    pub(super) fn index_of(&self, offset: u64) -> Result<usize, usize> {
        self.slots.binary_search_by_key(&offset, |s| s.offset)
    }

    /// The batch holding `offset`.
    pub fn batch_of(&self, offset: u64) -> Option<&CachedBatch> {
        let i = self.batches.partition_point(|b| b.base <= offset);
        i.checked_sub(1)
            .and_then(|i| self.batches.get(i))
            .filter(|b| offset < b.next)
    }

    /// Acquires up to `max` records for `member` (a batch begun is finished when that takes
    /// at most `max` more, so records go out as whole stored batches where they can), each locked until `locked_until`, with
    /// tokens from `next_token`. In key order only the first unfinished record of each key
    /// may be acquired. Records out of deliveries are marked for dead-lettering instead
    /// (returned second).
    #[allow(clippy::too_many_arguments)]
    pub fn acquire(
        &mut self,
        member: u32,
        max: usize,
        max_bytes: usize,
        key_order: bool,
        max_deliveries: u32,
        now: i64,
        locked_until: i64,
        next_token: &mut dyn FnMut() -> u64,
    ) -> (Vec<Acquired>, Vec<u64>) {
        let mut out: Vec<Acquired> = Vec::new();
        let mut exhausted = Vec::new();
        let mut held_keys: HashSet<u64> = HashSet::new();
        let mut count = 0usize;
        let mut batch_end: Option<u64> = None;
        let mut previous_taken = false;
        let from = if key_order {
            0
        } else {
            self.available_from.min(self.slots.len())
        };
        let mut first_available: Option<usize> = None;
        let (mut bytes, mut batch_next) = (0usize, 0u64);
        for i in from..self.slots.len() {
            let (offset, state, key, not_before, deliveries) = {
                let s = &self.slots[i];
                (s.offset, s.state, s.key, s.not_before, s.deliveries)
            };
            if count >= max && batch_end.is_none_or(|end| offset >= end) {
                break;
            }
            let unfinished = !state.done();
            let keyed = key_order && key != 0;
            let eligible = state == SlotState::Available && not_before <= now && !(keyed && held_keys.contains(&key));
            if keyed && unfinished {
                held_keys.insert(key);
            }
            if state == SlotState::Available && first_available.is_none() && !eligible {
                first_available = Some(i);
            }
            if !eligible {
                previous_taken = false;
                continue;
            }
            if deliveries >= max_deliveries {
                let s = &mut self.slots[i];
                s.state = SlotState::DeadLettering;
                s.reason = Some(format!("delivered {deliveries} times, the group's max_delivery_count").into());
                exhausted.push(offset);
                previous_taken = false;
                continue;
            }
            // Bytes: each stored batch counts once, and at least one goes out.
            if offset >= batch_next {
                let batch = self.batch_of(offset);
                let size = batch.map_or(0, |b| b.bytes.len());
                if count > 0 && bytes + size > max_bytes {
                    break;
                }
                bytes += size;
                batch_next = batch.map_or(offset + 1, |b| b.next);
            }
            let s = &mut self.slots[i];
            s.state = SlotState::Acquired;
            s.deliveries += 1;
            s.member = member;
            s.locked_until = locked_until;
            match out.last_mut() {
                Some(last) if previous_taken && last.deliveries == s.deliveries => {
                    last.last = offset;
                    last.count += 1;
                    s.token = last.token;
                }
                _ => {
                    let token = next_token();
                    s.token = token;
                    out.push(Acquired {
                        first: offset,
                        last: offset,
                        deliveries: s.deliveries,
                        token,
                        count: 1,
                    });
                }
            }
            previous_taken = true;
            count += 1;
            if count == max {
                // Finishing the batch costs at most `max` more records; a batch larger than
                // that goes out in parts (each fetch ships the whole stored batch, and the
                // member skips what is not its own).
                batch_end = self
                    .batch_of(offset)
                    .map(|b| b.next)
                    .filter(|next| next.saturating_sub(offset + 1) <= max as u64);
            }
        }
        if !key_order {
            // Everything before where this scan stopped is held or done, save the first
            // record it passed over (delayed) or stopped at.
            self.available_from = first_available.unwrap_or(self.slots.len()).min(self.scan_end(&out));
        }
        (out, exhausted)
    }

    /// The index after the last slot `acquired` took (where a scan that stopped there ends).
    fn scan_end(&self, acquired: &[Acquired]) -> usize {
        match acquired.last() {
            Some(a) => match self.index_of(a.last) {
                Ok(i) => i + 1,
                Err(i) => i,
            },
            None => self.slots.len(),
        }
    }

    /// A record before the scan hint became available again.
    fn available_at(&mut self, index: usize) {
        self.available_from = self.available_from.min(index);
    }

    /// The stored batches that hold `acquired`, each once, in offset order.
    pub fn batches_for(&self, acquired: &[Acquired]) -> Bytes {
        let mut held: Vec<&Bytes> = Vec::new();
        let mut last_base: Option<u64> = None;
        for a in acquired {
            let from = self.batches.partition_point(|b| b.next <= a.first);
            for b in self.batches.iter().skip(from) {
                if b.base > a.last {
                    break;
                }
                if last_base.is_some_and(|l| l >= b.base) {
                    continue;
                }
                held.push(&b.bytes);
                last_base = Some(b.base);
            }
        }
        // One batch goes out as the stored bytes themselves; several are joined once.
        match held.as_slice() {
            [] => Bytes::new(),
            [one] => Bytes::clone(one),
            many => {
                let mut out = BytesMut::with_capacity(many.iter().map(|b| b.len()).sum());
                for b in many {
                    out.extend_from_slice(b);
                }
                out.freeze()
            }
        }
    }

    /// Checks that every record from `first` to `last` is held by `member` under `token`.
    fn check_held(&self, member: u32, first: u64, last: u64, token: u64) -> Result<(usize, usize), Stale> {
        if last < first {
            return Err(Stale(format!("the range {first}..={last} is empty")));
        }
        let from = match self.index_of(first) {
            Ok(i) | Err(i) => i,
        };
        let mut to = from;
        while to < self.slots.len() && self.slots[to].offset <= last {
            let s = &self.slots[to];
            if s.state != SlotState::Acquired || s.token != token || s.member != member {
                let why = match s.state {
                    SlotState::Acquired if s.token == token => "held by another member".to_string(),
                    SlotState::Acquired => "delivered again since (the lock expired)".to_string(),
                    SlotState::Available => "not held (its lock expired or it was released)".to_string(),
                    SlotState::DeadLettering => "being dead-lettered".to_string(),
                    SlotState::Acknowledged => "already acknowledged".to_string(),
                    SlotState::Archived => "archived".to_string(),
                };
                return Err(Stale(format!("record {} is {why}", s.offset)));
            }
            to += 1;
        }
        if to == from {
            return Err(Stale(format!(
                "no record from {first} to {last} is held under this token (already acknowledged, expired, or never delivered to this member)"
            )));
        }
        Ok((from, to))
    }

    /// Applies one acknowledgement by `member`. Returns the offsets whose durable state
    /// changed, or why nothing did.
    #[allow(clippy::too_many_arguments)]
    pub fn acknowledge(
        &mut self,
        member: u32,
        first: u64,
        last: u64,
        token: u64,
        kind: &AckKind,
        now: i64,
        lock_ms: i64,
        max_deliveries: u32,
    ) -> Result<(Vec<u64>, i64), Stale> {
        let (from, to) = self.check_held(member, first, last, token)?;
        let mut changed = Vec::with_capacity(to - from);
        let mut locked_until = 0;
        for s in self.slots.range_mut(from..to) {
            match kind {
                AckKind::Accept => {
                    s.state = SlotState::Acknowledged;
                    self.unfinished -= 1;
                }
                AckKind::Reject { reason } => {
                    s.state = SlotState::DeadLettering;
                    s.reason = Some(format!("rejected: {reason}").into());
                }
                AckKind::Release { delay_ms } => {
                    let not_before = now + delay_ms.max(&0);
                    make_available(s, not_before, max_deliveries, "released");
                    self.delays_until = self.delays_until.max(not_before);
                }
                AckKind::Renew => {
                    s.locked_until = now + lock_ms;
                    locked_until = s.locked_until;
                    continue;
                }
            }
            changed.push(s.offset);
        }
        if matches!(kind, AckKind::Release { .. }) {
            self.available_at(from);
        }
        if matches!(kind, AckKind::Accept) {
            self.advance();
        }
        Ok((changed, locked_until))
    }

    /// Makes records whose lock ended by `now` available again (or dead-letters them when
    /// out of deliveries). Returns the offsets changed.
    pub fn expire(&mut self, now: i64, max_deliveries: u32) -> Vec<u64> {
        self.release_where(|s| s.locked_until <= now, max_deliveries, "its lock expired")
    }

    /// Makes every record `member` holds available again.
    pub fn release_member(&mut self, member: u32, max_deliveries: u32) -> Vec<u64> {
        self.release_where(|s| s.member == member, max_deliveries, "its member left")
    }

    /// Makes the acquired records `which` picks available again (or dead-letters them when
    /// out of deliveries). Returns the offsets changed. Its pass over every slot also makes
    /// the delay bound exact again (a long delay ended or taken would otherwise keep room
    /// counts scanning) and counts the unfinished records anew.
    fn release_where(&mut self, which: impl Fn(&Slot) -> bool, max_deliveries: u32, why: &str) -> Vec<u64> {
        let mut changed = Vec::new();
        let mut first = None;
        let (mut delays_until, mut unfinished) = (0, 0);
        for (i, s) in self.slots.iter_mut().enumerate() {
            if s.state == SlotState::Acquired && which(s) {
                make_available(s, 0, max_deliveries, why);
                changed.push(s.offset);
                first = first.or(Some(i));
            }
            if s.state == SlotState::Available {
                delays_until = delays_until.max(s.not_before);
            }
            if !s.state.done() {
                unfinished += 1;
            }
        }
        debug_assert_eq!(self.unfinished, unfinished);
        (self.delays_until, self.unfinished) = (delays_until, unfinished);
        if let Some(i) = first {
            self.available_at(i);
        }
        changed
    }

    /// Records waiting for their dead letter: offset and reason.
    pub fn dead_lettering(&self) -> Vec<(u64, String, u32)> {
        self.slots
            .iter()
            .filter(|s| s.state == SlotState::DeadLettering)
            .map(|s| (s.offset, s.reason.as_deref().unwrap_or("").to_string(), s.deliveries))
            .collect()
    }

    /// Archives a record whose dead letter was written.
    pub fn archive(&mut self, offset: u64) -> bool {
        let Ok(i) = self.index_of(offset) else { return false };
        let s = &mut self.slots[i];
        if s.state != SlotState::DeadLettering {
            return false;
        }
        s.state = SlotState::Archived;
        s.reason = None;
        self.unfinished -= 1;
        self.dead_letters += 1;
        self.advance();
        true
    }

    /// The earliest lock end or delay of the window after `now` (when to look again).
    pub fn next_due(&self, now: i64) -> Option<i64> {
        if now >= self.delays_until {
            return None;
        }
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                SlotState::Available if s.not_before > now => Some(s.not_before),
                _ => None,
            })
            .min()
    }

    /// Whether a record is available to acquire now.
    pub fn any_available(&self, now: i64) -> bool {
        self.slots
            .iter()
            .any(|s| s.state == SlotState::Available && s.not_before <= now)
    }

    pub fn counts(&self, now: i64) -> Counts {
        let mut c = Counts::default();
        for s in &self.slots {
            match s.state {
                SlotState::Available if s.not_before > now => c.delayed += 1,
                SlotState::Available => c.available += 1,
                SlotState::Acquired => c.acquired += 1,
                SlotState::DeadLettering => c.dead_lettering += 1,
                SlotState::Acknowledged => c.acknowledged += 1,
                SlotState::Archived => c.archived += 1,
            }
            if !s.state.done() {
                c.oldest_unacked_timestamp =
                    Some(c.oldest_unacked_timestamp.map_or(s.timestamp, |t| t.min(s.timestamp)));
            }
        }
        c
    }

    /// Whether the kept counts agree with the slots (the unfinished count exactly; the delay
    /// bound at or past every available record's delay).
    #[cfg(test)]
    pub(super) fn counts_hold(&self) -> bool {
        let unfinished = self.slots.iter().filter(|s| !s.state.done()).count();
        let latest = self
            .slots
            .iter()
            .filter(|s| s.state == SlotState::Available)
            .map(|s| s.not_before)
            .max()
            .unwrap_or(0);
        unfinished == self.unfinished && latest <= self.delays_until
    }

    pub(super) fn slot_list(&self) -> &VecDeque<Slot> {
        &self.slots
    }

    pub(super) fn pending_states(&self) -> &BTreeMap<u64, Durable> {
        &self.pending
    }
}

fn make_available(s: &mut Slot, not_before: i64, max_deliveries: u32, why: &str) {
    if s.deliveries >= max_deliveries {
        s.state = SlotState::DeadLettering;
        s.reason = Some(
            format!(
                "{why} after {} deliveries, the group's max_delivery_count",
                s.deliveries
            )
            .into(),
        );
    } else {
        s.state = SlotState::Available;
        s.not_before = not_before;
    }
    s.token = 0;
}
