//! The cleaner's key map: for each key of the dirty section, the offset of its latest record.
//!
//! Keys are not stored: each is reduced to a 128-bit hash (two SipHash-1-3 digests under
//! keys drawn at random for each map, so that no producer can choose a key that collides with
//! another's and have it removed). An entry costs 24 bytes whatever the key's size. Two
//! distinct keys sharing a 128-bit hash would make the older one's record look superseded;
//! with a few million keys per pass the chance is below 10^-25.
//!
//! The table is open-addressed (linear probing, at most 7/8 full) in one allocation, so that
//! the cleaner can prefetch the slots of a whole batch's keys before it looks any of them up:
//! a map of millions of keys does not fit any cache, and a lookup is a memory round trip.
//! It starts at the size the caller expects and doubles only while the old and the new table
//! together stay within its memory budget.

use std::hash::{BuildHasher, Hasher, RandomState};

/// Marks a free slot: no record has offset `u64::MAX`.
const EMPTY: u64 = u64::MAX;

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Slot {
    lo: u64,
    hi: u64,
    offset: u64,
}

const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
const FREE: Slot = Slot {
    lo: 0,
    hi: 0,
    offset: EMPTY,
};
/// The smallest table.
const MIN_SLOTS: usize = 16;

/// A key's 128-bit digest.
pub(crate) type KeyHash = u128;

/// Offsets of the latest record per key (see the module documentation).
#[derive(Debug)]
pub(crate) struct KeyMap {
    slots: Vec<Slot>,
    len: usize,
    memory_bytes: usize,
    hashers: (RandomState, RandomState),
}

fn largest_power_of_two_at_most(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

impl KeyMap {
    /// A table sized for `expected` keys, within `memory_bytes`.
    pub(crate) fn new(memory_bytes: usize, expected: usize) -> KeyMap {
        let most = largest_power_of_two_at_most(memory_bytes / SLOT_BYTES);
        let wanted = expected
            .saturating_mul(8)
            .div_ceil(7)
            .max(MIN_SLOTS)
            .checked_next_power_of_two();
        let slots = wanted.unwrap_or(most).min(most);
        KeyMap {
            slots: if slots >= MIN_SLOTS {
                vec![FREE; slots]
            } else {
                Vec::new()
            },
            len: 0,
            memory_bytes,
            hashers: (RandomState::new(), RandomState::new()),
        }
    }

    /// The digest this map knows `key` by.
    pub(crate) fn hash(&self, key: &[u8]) -> KeyHash {
        let digest = |state: &RandomState| {
            let mut h = state.build_hasher();
            h.write(key);
            h.finish()
        };
        (u128::from(digest(&self.hashers.0)) << 64) | u128::from(digest(&self.hashers.1))
    }

    fn home(&self, hash: KeyHash) -> usize {
        (hash as u64 as usize) & (self.slots.len() - 1)
    }

    /// The slot holding `hash`, or the free slot where it would go.
    fn probe(&self, hash: KeyHash) -> usize {
        let (lo, hi) = (hash as u64, (hash >> 64) as u64);
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        loop {
            let s = &self.slots[i];
            if s.offset == EMPTY || (s.lo == lo && s.hi == hi) {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Asks the CPU to bring `hash`'s home slot into cache; a lookup soon after then does
    /// not wait for memory.
    pub(crate) fn prefetch(&self, hash: KeyHash) {
        if self.slots.is_empty() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let slot: *const Slot = &self.slots[self.home(hash)];
            // SAFETY: a prefetch is only a hint; the address is inside the table.
            #[allow(unused_unsafe)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(slot.cast::<i8>());
            }
        }
    }

    /// Records `offset` as the latest for the key of `hash`. False, changing nothing, when the
    /// key is new and the table can neither take it nor grow.
    pub(crate) fn put(&mut self, hash: KeyHash, offset: u64) -> bool {
        if self.slots.is_empty() {
            return false;
        }
        let i = self.probe(hash);
        if self.slots[i].offset != EMPTY {
            self.slots[i].offset = offset;
            return true;
        }
        if (self.len + 1) * 8 > self.slots.len() * 7 {
            if !self.grow() {
                return false;
            }
            return self.put(hash, offset);
        }
        self.slots[i] = Slot {
            lo: hash as u64,
            hi: (hash >> 64) as u64,
            offset,
        };
        self.len += 1;
        true
    }

    /// Doubles the table if the old and the new one fit the budget together (both are held
    /// while entries move).
    fn grow(&mut self) -> bool {
        let bigger = self.slots.len() * 2;
        if (bigger + self.slots.len()).saturating_mul(SLOT_BYTES) > self.memory_bytes {
            return false;
        }
        let old = std::mem::replace(&mut self.slots, vec![FREE; bigger]);
        for s in old.into_iter().filter(|s| s.offset != EMPTY) {
            let hash = (u128::from(s.hi) << 64) | u128::from(s.lo);
            let i = self.probe(hash);
            self.slots[i] = s;
        }
        true
    }

    pub(crate) fn get(&self, hash: KeyHash) -> Option<u64> {
        if self.slots.is_empty() {
            return None;
        }
        let s = &self.slots[self.probe(hash)];
        (s.offset != EMPTY).then_some(s.offset)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes the table holds allocated.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.slots.len() * SLOT_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_refuses_new_keys_but_updates_known_ones_and_stays_within_its_memory() {
        let budget = 64 << 10;
        for expected in [usize::MAX, 10] {
            let mut map = KeyMap::new(budget, expected);
            let mut i = 0u64;
            while map.put(map.hash(&i.to_le_bytes()), i) {
                assert!(map.allocated_bytes() <= budget, "{} > {budget}", map.allocated_bytes());
                i += 1;
            }
            assert!(map.len() > 700, "{} keys in {budget} bytes", map.len());
            let zero = map.hash(&0u64.to_le_bytes());
            assert!(map.put(zero, 99), "a known key still updates");
            assert_eq!(map.get(zero), Some(99));
            assert_eq!(map.get(map.hash(b"never put")), None);
            assert!(!map.put(map.hash(b"one more"), 1), "full");
            for k in 1..i {
                assert_eq!(map.get(map.hash(&k.to_le_bytes())), Some(k), "every key found");
            }
        }
        let map = KeyMap::new(budget, 1);
        assert_ne!(map.hash(b"a"), map.hash(b"b"));
        assert!(!KeyMap::new(100, 1).put(1, 1), "no room for a table at all");
    }
}
