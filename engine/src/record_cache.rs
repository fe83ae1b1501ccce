//! Committed record-index entries in a set-associative table: the record
//! half of the entry cache (see `entry_cache` for what may enter it).
//!
//! Every overwrite looks up the old record (to drop its reference) and
//! every commit inserts its new records and removes its dead ones, so this
//! table sees about three operations per block written. In quick_cache each
//! was several dependent memory misses (control bytes, bucket, slab entry)
//! plus its CLOCK-Pro bookkeeping, and an entry cost ~160 bytes with its
//! ghost slots. Here the key's fingerprint picks a set of `WAYS` slots: a
//! lookup reads the set's 64-byte line of tags (one miss, and the only one
//! for a key not cached) and then the one slot whose tag matches; an insert
//! writes a slot in place. An entry costs about 68 bytes (a 64-byte slot,
//! a 4-byte tag, and its share of the set's reference bits and clock hand),
//! so the same memory holds 2.3 times as many records. Eviction is CLOCK
//! within the set over its probation ways (see `PROTECTED`): a lookup hit
//! sets the slot's reference bit, and an insert into a full set takes the
//! first probation slot from the set's hand whose bit is clear, promoting
//! the referenced ones it passes. Sixteen ways rather than
//! eight: with random keys, sets overflow (and evict) while the table as a
//! whole still has room, and wider sets waste less of it.
//!
//! The slots and tags come from zeroed allocations (all zeros is "empty"):
//! the table costs memory only as inserts touch its pages.

use crate::key::{BlockKey, RecordMeta, SegmentId};
use crate::shard_cache::HOLD_KEYS;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicU16, Ordering};

/// Slots per set: one 64-byte line of tags.
const WAYS: usize = 16;

/// Ways per set that entries can hold protected: a new entry is protected
/// while its set has fewer, and only probation entries are evicted while
/// there are any. A burst of entries used once (a bulk write to another
/// volume, whose records are next looked up when overwritten, if ever)
/// then cycles through the set's probation ways instead of pushing out the
/// entries that were there first: they leave when their records die (a
/// commit removes them) and newcomers take their protected place. The
/// same as quick_cache's hot and cold sections (97% hot), per set.
const PROTECTED: u32 = 14;

/// Shards, each behind its own lock; batches take each lock once.
const SHARDS: usize = 16;

/// Bytes one entry costs: its slot, its tag and its share of the set's
/// reference byte and hand (68.25, rounded up).
pub const ENTRY_BYTES: u64 = 69;

/// A key and its record, as eight words (all zeros in an empty slot).
type Slot = [u64; 8];

/// The key as the first five words of its slot.
fn key_words(key: &BlockKey) -> [u64; 5] {
    let w = |i: usize| u64::from_le_bytes(key.hash[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    [w(0), w(1), w(2), w(3), key.nonce]
}

fn encode(key: &BlockKey, m: &RecordMeta) -> Slot {
    let [h0, h1, h2, h3, nonce] = key_words(key);
    [
        h0,
        h1,
        h2,
        h3,
        nonce,
        (m.segment.disk as u64) << 32 | m.segment.index as u64,
        (m.offset as u64) << 32 | m.stored_len as u64,
        (m.raw_len as u64) << 32 | m.refs as u64,
    ]
}

fn holds(slot: &Slot, key: &BlockKey) -> bool {
    slot[..5] == key_words(key)
}

fn decode(slot: &Slot) -> RecordMeta {
    RecordMeta {
        segment: SegmentId {
            disk: (slot[5] >> 32) as u32,
            index: slot[5] as u32,
        },
        offset: (slot[6] >> 32) as u32,
        stored_len: slot[6] as u32,
        raw_len: (slot[7] >> 32) as u32,
        refs: slot[7] as u32,
    }
}

/// Where a key lives: its shard, its set in the shard, and its tag.
#[derive(Clone, Copy)]
struct Place {
    shard: usize,
    set: usize,
    tag: u32,
}

struct Shard {
    /// `WAYS` per set; 0 is an empty slot.
    tags: Vec<u32>,
    slots: Vec<Slot>,
    /// Per set, bit `w`: slot `w` was hit since the hand last passed it.
    /// Set by lookups under the read lock, hence atomic.
    referenced: Vec<AtomicU16>,
    /// Per set, bit `w`: slot `w` is protected (see `PROTECTED`).
    protected: Vec<u16>,
    /// Per set, the next slot the clock looks at.
    hands: Vec<u8>,
    len: usize,
}

impl Shard {
    fn new(sets: usize) -> Shard {
        Shard {
            tags: vec![0; sets * WAYS],
            slots: vec![[0; 8]; sets * WAYS],
            referenced: (0..sets).map(|_| AtomicU16::new(0)).collect(),
            protected: vec![0; sets],
            hands: vec![0; sets],
            len: 0,
        }
    }

    /// The slot index holding `key`, if any.
    fn find(&self, p: Place, key: &BlockKey) -> Option<usize> {
        let base = p.set * WAYS;
        (base..base + WAYS).find(|&i| self.tags[i] == p.tag && holds(&self.slots[i], key))
    }

    fn get(&self, p: Place, key: &BlockKey) -> Option<RecordMeta> {
        let i = self.find(p, key)?;
        let bit = 1u16 << (i % WAYS);
        let r = &self.referenced[p.set];
        // Only write the line when the bit changes.
        if r.load(Ordering::Relaxed) & bit == 0 {
            r.fetch_or(bit, Ordering::Relaxed);
        }
        Some(decode(&self.slots[i]))
    }

    fn remove(&mut self, p: Place, key: &BlockKey) {
        if let Some(i) = self.find(p, key) {
            self.tags[i] = 0;
            self.slots[i] = [0; 8];
            self.protected[p.set] &= !(1u16 << (i % WAYS));
            self.len -= 1;
        }
    }

    fn insert(&mut self, p: Place, key: &BlockKey, m: &RecordMeta) {
        let base = p.set * WAYS;
        if let Some(i) = self.find(p, key) {
            // A changed entry (a reference added or dropped) was just used.
            self.slots[i] = encode(key, m);
            *self.referenced[p.set].get_mut() |= 1u16 << (i - base);
            return;
        }
        let i = match (base..base + WAYS).find(|&i| self.tags[i] == 0) {
            Some(i) => {
                self.len += 1;
                i
            }
            None => base + self.victim(p.set),
        };
        self.tags[i] = p.tag;
        self.slots[i] = encode(key, m);
        let bit = 1u16 << (i - base);
        // A new entry starts unreferenced, and protected while the set has
        // protected room.
        *self.referenced[p.set].get_mut() &= !bit;
        let prot = &mut self.protected[p.set];
        if (*prot & !bit).count_ones() < PROTECTED {
            *prot |= bit;
        } else {
            *prot &= !bit;
        }
    }

    /// The way to evict from a full set: CLOCK over the probation ways
    /// from the hand, where a referenced way gets its second chance as a
    /// promotion (and its bit cleared); if none is left on probation,
    /// CLOCK over all ways, the way it picks losing its protection.
    fn victim(&mut self, set: usize) -> usize {
        let r = self.referenced[set].get_mut();
        let prot = &mut self.protected[set];
        let mut hand = self.hands[set] as usize;
        for _ in 0..WAYS {
            let bit = 1u16 << hand;
            if *prot & bit == 0 {
                if *r & bit == 0 {
                    self.hands[set] = ((hand + 1) % WAYS) as u8;
                    return hand;
                }
                *r &= !bit;
                *prot |= bit;
            }
            hand = (hand + 1) % WAYS;
        }
        loop {
            let bit = 1u16 << hand;
            if *r & bit == 0 {
                *prot &= !bit;
                self.hands[set] = ((hand + 1) % WAYS) as u8;
                return hand;
            }
            *r &= !bit;
            hand = (hand + 1) % WAYS;
        }
    }
}

pub struct RecordCache {
    shards: Box<[RwLock<Shard>]>,
    sets_per_shard: usize,
}

impl RecordCache {
    /// A table of about `entries` entries (at least one set per shard).
    pub fn new(entries: usize) -> RecordCache {
        let sets_per_shard = entries.div_ceil(WAYS * SHARDS).max(1);
        RecordCache {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(Shard::new(sets_per_shard)))
                .collect(),
            sets_per_shard,
        }
    }

    fn place(&self, key: &BlockKey) -> Place {
        let f = key.fingerprint();
        Place {
            // Disjoint bits of a uniform fingerprint for shard, set and tag.
            shard: (f >> 60) as usize % SHARDS,
            set: (((f & 0xFFFF_FFFF) * self.sets_per_shard as u64) >> 32) as usize,
            tag: ((f >> 32) as u32 & 0x0FFF_FFFF) | 1,
        }
    }

    pub fn get(&self, key: &BlockKey) -> Option<RecordMeta> {
        let p = self.place(key);
        self.shards[p.shard].read().get(p, key)
    }

    /// `found(i, record)` for each `keys[i]` cached; one lock hold per
    /// shard (in shard order, not key order).
    pub fn get_many(&self, keys: &[BlockKey], mut found: impl FnMut(usize, RecordMeta)) {
        if let [only] = keys {
            if let Some(m) = self.get(only) {
                found(0, m);
            }
            return;
        }
        let places: Vec<Place> = keys.iter().map(|k| self.place(k)).collect();
        for (s, lock) in self.shards.iter().enumerate() {
            if !places.iter().any(|p| p.shard == s) {
                continue;
            }
            let shard = lock.read();
            for (i, (p, k)) in places.iter().zip(keys).enumerate() {
                if p.shard == s {
                    if let Some(m) = shard.get(*p, k) {
                        found(i, m);
                    }
                }
            }
        }
    }

    /// Insert (`Some`) or remove (`None`) each entry, grouped by shard, each
    /// shard's removals first so that inserts take the slots they free.
    pub fn update_many(&self, entries: impl IntoIterator<Item = (BlockKey, Option<RecordMeta>)>) {
        let mut by_shard: [Vec<(Place, BlockKey, Option<RecordMeta>)>; SHARDS] = Default::default();
        for (k, m) in entries {
            let p = self.place(&k);
            by_shard[p.shard].push((p, k, m));
        }
        for (lock, mut list) in self.shards.iter().zip(by_shard) {
            if list.is_empty() {
                continue;
            }
            list.sort_by_key(|(_, _, m)| m.is_some());
            // As in `shard_cache`: a bounded run per lock hold, so readers
            // never wait long behind a large commit.
            for run in list.chunks(HOLD_KEYS) {
                let mut shard = lock.write();
                for (p, k, m) in run {
                    match m {
                        Some(m) => shard.insert(*p, k, m),
                        None => shard.remove(*p, k),
                    }
                }
            }
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len).sum()
    }

    /// Entries the table can hold.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.sets_per_shard * WAYS * SHARDS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> BlockKey {
        // Uniform hashes, as blake3's are.
        let mut hash = [0u8; 32];
        for (j, c) in hash.chunks_mut(8).enumerate() {
            let x = (i + 1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(17 * j as u32 + 5)
                .wrapping_mul(0xBF58_476D_1CE4_E5B9);
            c.copy_from_slice(&x.to_le_bytes());
        }
        BlockKey { hash, nonce: 0 }
    }

    fn meta(i: u64) -> RecordMeta {
        RecordMeta {
            segment: SegmentId {
                disk: i as u32 % 7,
                index: u32::MAX - i as u32,
            },
            offset: i as u32 * 3,
            stored_len: 4096 - i as u32 % 4000,
            raw_len: 4096,
            refs: 1 + i as u32 % 5,
        }
    }

    #[test]
    fn round_trips_every_field_and_tells_keys_apart() {
        let c = RecordCache::new(1024);
        let mut with_nonce = key(1);
        with_nonce.nonce = u64::MAX;
        let m = RecordMeta {
            segment: SegmentId {
                disk: u32::MAX,
                index: 7,
            },
            offset: u32::MAX,
            stored_len: 1,
            raw_len: u32::MAX,
            refs: u32::MAX,
        };
        c.update_many([(with_nonce, Some(m)), (key(2), Some(meta(2)))]);
        assert_eq!(c.get(&with_nonce), Some(m));
        assert_eq!(c.get(&key(1)), None, "same hash, other nonce");
        assert_eq!(c.get(&key(2)), Some(meta(2)));
        assert_eq!(c.len(), 2);
        // Replacing an entry keeps one copy.
        c.update_many([(key(2), Some(meta(9)))]);
        assert_eq!(c.get(&key(2)), Some(meta(9)));
        assert_eq!(c.len(), 2);
        c.update_many([(key(2), None), (key(3), None)]);
        assert_eq!(c.get(&key(2)), None);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn batch_lookups_find_what_single_ones_do() {
        let c = RecordCache::new(10_000);
        let keys: Vec<BlockKey> = (0..3000).map(key).collect();
        let metas: Vec<RecordMeta> = (0..3000).map(meta).collect();
        c.update_many(keys.iter().copied().zip(metas.iter().copied().map(Some)));
        let asked: Vec<BlockKey> = (2990..3010).map(key).collect();
        let mut got = vec![None; asked.len()];
        c.get_many(&asked, |i, m| got[i] = Some(m));
        for (i, k) in asked.iter().enumerate() {
            assert_eq!(got[i], c.get(k), "key {i}");
        }
        assert_eq!(got[0], Some(meta(2990)));
        assert_eq!(got[10], None, "never inserted");
    }

    #[test]
    fn holds_its_capacity_and_keeps_what_is_used() {
        let c = RecordCache::new(4096);
        let cap = c.capacity();
        assert!((4096..4096 + WAYS * SHARDS).contains(&cap));
        // A hot set of keys looked up between waves of cold inserts.
        let hot: Vec<BlockKey> = (0..256).map(key).collect();
        c.update_many(hot.iter().map(|k| (*k, Some(meta(0)))));
        for wave in 0..20u64 {
            let mut hits = 0;
            c.get_many(&hot, |_, _| hits += 1);
            if wave > 0 {
                assert!(hits > 230, "wave {wave}: {hits} of 256 hot keys cached");
            }
            let cold: Vec<BlockKey> = (0..1024)
                .map(|i| key(1_000_000 + wave * 1024 + i))
                .collect();
            c.update_many(cold.iter().map(|k| (*k, Some(meta(1)))));
            assert!(c.len() <= cap);
        }
        // Inserts into a full table evict, never grow it.
        let many: Vec<BlockKey> = (0..20_000).map(|i| key(5_000_000 + i)).collect();
        c.update_many(many.iter().map(|k| (*k, Some(meta(2)))));
        assert!(
            c.len() <= cap && c.len() > cap * 9 / 10,
            "{} of {cap}",
            c.len()
        );
    }

    #[test]
    fn a_burst_used_once_does_not_push_out_what_was_there() {
        let c = RecordCache::new(1 << 14);
        let first: Vec<BlockKey> = (0..c.capacity() as u64 / 4).map(key).collect();
        c.update_many(first.iter().map(|k| (*k, Some(meta(0)))));
        // Four times the table's size in new keys, none looked up.
        for wave in 0..16u64 {
            let burst: Vec<BlockKey> = (0..1024).map(|i| key(1 << 40 | wave << 20 | i)).collect();
            c.update_many(burst.iter().map(|k| (*k, Some(meta(1)))));
        }
        let kept = first.iter().filter(|k| c.get(k).is_some()).count();
        assert!(
            kept * 100 >= first.len() * 99,
            "{kept} of {} kept",
            first.len()
        );
        // Once they die, newcomers take their place and most are kept in
        // turn (those landing in a set with fewer deaths than arrivals are
        // on probation).
        c.update_many(first.iter().map(|k| (*k, None)));
        let next: Vec<BlockKey> = (0..first.len() as u64).map(|i| key(1 << 50 | i)).collect();
        c.update_many(next.iter().map(|k| (*k, Some(meta(2)))));
        let burst: Vec<BlockKey> = (0..c.capacity() as u64).map(|i| key(1 << 51 | i)).collect();
        c.update_many(burst.iter().map(|k| (*k, Some(meta(3)))));
        let kept = next.iter().filter(|k| c.get(k).is_some()).count();
        assert!(
            kept * 100 >= next.len() * 75,
            "{kept} of {} kept",
            next.len()
        );
    }

    #[test]
    fn removals_in_a_batch_make_room_for_its_inserts() {
        let c = RecordCache::new(512);
        let old: Vec<BlockKey> = (0..c.capacity() as u64).map(key).collect();
        c.update_many(old.iter().map(|k| (*k, Some(meta(0)))));
        let kept: Vec<&BlockKey> = old.iter().filter(|k| c.get(k).is_some()).collect();
        // Replace the first 100 kept with 100 new keys, inserts listed first.
        let new: Vec<BlockKey> = (0..100).map(|i| key(900_000 + i)).collect();
        let dead = &kept[..100];
        c.update_many(
            new.iter()
                .map(|k| (*k, Some(meta(1))))
                .chain(dead.iter().map(|k| (**k, None))),
        );
        let survivors = kept[100..].iter().filter(|k| c.get(k).is_some()).count();
        // A new key whose set had no removal still evicts; most find a slot.
        assert!(survivors + 40 >= kept.len() - 100, "{survivors} survivors");
    }
}
