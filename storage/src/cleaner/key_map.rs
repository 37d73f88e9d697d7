//! The cleaner's key map: for each key of the dirty section, the offset of its latest record.
//!
//! Keys are not stored: each is reduced to a 128-bit hash (two independent SipHash-1-3
//! digests), so an entry costs the same whatever the key's size, and the table is allocated
//! once, at the size the memory setting allows, and never grows. Two distinct keys sharing
//! a 128-bit hash would make the older one's record look superseded; with at most a few
//! million keys per pass the chance is below 10^-25.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// Bytes one bucket of the table costs: the 16-byte hash, the 8-byte offset and hashbrown's
/// control byte.
const BUCKET_BYTES: usize = 16 + 8 + 1;

/// Passes the already uniform low 64 bits of a key hash through as the table's hash.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

/// Offsets of the latest record per key, in a table whose memory is fixed when it is made.
#[derive(Debug)]
pub(crate) struct KeyMap {
    map: HashMap<u128, u64, BuildHasherDefault<PassThrough>>,
    limit: usize,
}

/// The 128-bit digest a key is known by.
pub(crate) fn key_hash(key: &[u8]) -> u128 {
    let digest = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        key.hash(&mut h);
        h.finish()
    };
    (u128::from(digest(0x5a)) << 64) | u128::from(digest(0xc3))
}

impl KeyMap {
    /// The most entries a table within `memory_bytes` holds (hashbrown keeps its buckets a
    /// power of two, at most 7/8 full).
    pub(crate) fn entries_within(memory_bytes: usize) -> usize {
        let buckets = memory_bytes / BUCKET_BYTES;
        if buckets < 16 {
            return 0;
        }
        let buckets = 1usize << (usize::BITS - 1 - buckets.leading_zeros());
        buckets / 8 * 7
    }

    /// Bytes a table for `entries` entries allocates.
    pub(crate) fn memory_for(entries: usize) -> usize {
        let buckets = (entries.max(1) * 8).div_ceil(7).next_power_of_two();
        buckets * BUCKET_BYTES
    }

    /// A table for at most `wanted` keys, within `memory_bytes`.
    pub(crate) fn new(memory_bytes: usize, wanted: usize) -> KeyMap {
        let limit = Self::entries_within(memory_bytes).min(wanted.max(1));
        KeyMap {
            map: HashMap::with_capacity_and_hasher(limit, BuildHasherDefault::default()),
            limit,
        }
    }

    /// Records `offset` as the latest for `key`. False, changing nothing, when the key is
    /// new and the table is full.
    pub(crate) fn put(&mut self, hash: u128, offset: u64) -> bool {
        if self.map.len() >= self.limit {
            match self.map.get_mut(&hash) {
                Some(slot) => {
                    *slot = offset;
                    return true;
                }
                None => return false,
            }
        }
        self.map.insert(hash, offset);
        true
    }

    pub(crate) fn get(&self, hash: u128) -> Option<u64> {
        self.map.get(&hash).copied()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes the table holds allocated.
    pub(crate) fn allocated_bytes(&self) -> usize {
        Self::memory_for(self.map.capacity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_refuses_new_keys_but_updates_known_ones_and_stays_within_its_memory() {
        let budget = 64 << 10;
        let mut map = KeyMap::new(budget, usize::MAX);
        let limit = KeyMap::entries_within(budget);
        assert!(limit > 1000);
        for i in 0..limit as u64 {
            assert!(map.put(key_hash(&i.to_le_bytes()), i));
        }
        assert!(!map.put(key_hash(b"one more"), 1), "full");
        assert!(map.put(key_hash(&0u64.to_le_bytes()), 99), "a known key still updates");
        assert_eq!(map.get(key_hash(&0u64.to_le_bytes())), Some(99));
        assert_eq!(map.len(), limit);
        assert!(map.allocated_bytes() <= budget, "{} > {budget}", map.allocated_bytes());
        assert_ne!(key_hash(b"a"), key_hash(b"b"));
    }
}
