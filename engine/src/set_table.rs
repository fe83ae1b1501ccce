//! A set-associative cache table of fixed-size slots: the storage of the
//! entry cache's records (`record_cache`) and block-mapping groups
//! (`map_cache`).
//!
//! A hash table far larger than the CPU caches pays a memory miss per
//! dependent step; quick_cache's lookup is several (control bytes, bucket,
//! slab entry, and for a boxed value the box) plus its CLOCK-Pro
//! bookkeeping. Here the key's fingerprint picks a set of `WAYS` slots: a
//! lookup reads the set's 64-byte line of tags (one miss, and the only one
//! for a key not cached) and then the one slot whose tag matches; an update
//! writes the slot in place. A slot is `W` words holding its key and value
//! (the user's encoding; all zeros is an empty slot), so an entry costs its
//! slot, a 4-byte tag and its share of the set's reference bits and clock
//! hand.
//!
//! Eviction is CLOCK within the set over its probation ways (see
//! `PROTECTED`): a lookup hit sets the slot's reference bit, and an insert
//! into a full set takes the first probation slot from the set's hand whose
//! bit is clear, promoting the referenced ones it passes. Sixteen ways
//! rather than eight: with random keys, sets overflow (and evict) while the
//! table as a whole still has room, and wider sets waste less of it.
//!
//! The slots and tags come from zeroed allocations: the table costs memory
//! only as inserts touch its pages.

use crate::shard_cache::HOLD_KEYS;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicU16, Ordering};

/// Slots per set: one 64-byte line of tags.
pub(crate) const WAYS: usize = 16;

/// Ways per set that entries can hold protected: a new entry is protected
/// while its set has fewer, and only probation entries are evicted while
/// there are any. A burst of entries used once (a bulk write to another
/// volume, whose entries are next looked up when overwritten, if ever)
/// then cycles through the set's probation ways instead of pushing out the
/// entries that were there first: they leave when removed (a commit removes
/// dead records) or, once referenced probation entries have been promoted
/// into every way, by plain CLOCK over the whole set. The same as
/// quick_cache's hot and cold sections (97% hot), per set.
const PROTECTED: u32 = 14;

/// Shards, each behind its own lock; batches take each lock once.
pub(crate) const SHARDS: usize = 16;

/// Bytes of bookkeeping per entry besides its slot: the tag and its share
/// of the set's reference and protection bits and hand (4.3125, rounded
/// up).
pub const OVERHEAD_BYTES: u64 = 5;

/// A key of a table of `W`-word slots: where it goes and how its slot
/// holds it.
pub trait SlotKey<const W: usize> {
    /// 64 uniform bits: the shard, set and tag come from disjoint ones.
    fn fingerprint(&self) -> u64;
    /// Whether `slot` (a non-empty slot whose tag matched) holds this key.
    fn held_by(&self, slot: &[u64; W]) -> bool;
    /// Write the key into a slot that held nothing or another key; the
    /// other words are zero.
    fn claim(&self, slot: &mut [u64; W]);
}

/// Where a key lives: its shard, its set in the shard, and its tag.
#[derive(Clone, Copy)]
struct Place {
    shard: usize,
    set: usize,
    tag: u32,
}

struct Shard<const W: usize> {
    /// `WAYS` per set; 0 is an empty slot.
    tags: Vec<u32>,
    /// `W` words per slot, flat: `vec!` of zero words is a zeroed
    /// allocation, which `vec!` of zero arrays of more than 16 words is not
    /// (std writes those), and the table must cost memory only as it is
    /// used.
    slots: Vec<u64>,
    /// Per set, bit `w`: slot `w` was hit since the hand last passed it.
    /// Set by lookups under the read lock, hence atomic.
    referenced: Vec<AtomicU16>,
    /// Per set, bit `w`: slot `w` is protected (see `PROTECTED`).
    protected: Vec<u16>,
    /// Per set, the next slot the clock looks at.
    hands: Vec<u8>,
    len: usize,
}

impl<const W: usize> Shard<W> {
    fn new(sets: usize) -> Shard<W> {
        Shard {
            tags: vec![0; sets * WAYS],
            slots: vec![0; sets * WAYS * W],
            referenced: (0..sets).map(|_| AtomicU16::new(0)).collect(),
            protected: vec![0; sets],
            hands: vec![0; sets],
            len: 0,
        }
    }

    fn slot(&self, i: usize) -> &[u64; W] {
        self.slots[i * W..(i + 1) * W].try_into().expect("W words")
    }

    fn slot_mut(&mut self, i: usize) -> &mut [u64; W] {
        (&mut self.slots[i * W..(i + 1) * W])
            .try_into()
            .expect("W words")
    }

    /// The slot index holding `key`, if any.
    fn find(&self, p: Place, key: &impl SlotKey<W>) -> Option<usize> {
        let base = p.set * WAYS;
        (base..base + WAYS).find(|&i| self.tags[i] == p.tag && key.held_by(self.slot(i)))
    }

    fn get(&self, p: Place, key: &impl SlotKey<W>) -> Option<&[u64; W]> {
        let i = self.find(p, key)?;
        let bit = 1u16 << (i % WAYS);
        let r = &self.referenced[p.set];
        // Only write the line when the bit changes.
        if r.load(Ordering::Relaxed) & bit == 0 {
            r.fetch_or(bit, Ordering::Relaxed);
        }
        Some(self.slot(i))
    }

    fn remove(&mut self, p: Place, key: &impl SlotKey<W>) {
        if let Some(i) = self.find(p, key) {
            self.tags[i] = 0;
            *self.slot_mut(i) = [0; W];
            self.protected[p.set] &= !(1u16 << (i % WAYS));
            self.len -= 1;
        }
    }

    /// The slot of `key`, claimed (evicting if the set is full) if it had
    /// none; a claimed slot is protected if `may_protect` and the set has
    /// protected room.
    fn slot_for(&mut self, p: Place, key: &impl SlotKey<W>, may_protect: bool) -> &mut [u64; W] {
        let base = p.set * WAYS;
        if let Some(i) = self.find(p, key) {
            // A changed entry (a reference added or dropped, a mapping set)
            // was just used.
            *self.referenced[p.set].get_mut() |= 1u16 << (i - base);
            return self.slot_mut(i);
        }
        let i = match (base..base + WAYS).find(|&i| self.tags[i] == 0) {
            Some(i) => {
                self.len += 1;
                i
            }
            None => base + self.victim(p.set),
        };
        self.tags[i] = p.tag;
        let slot = self.slot_mut(i);
        *slot = [0; W];
        key.claim(slot);
        let bit = 1u16 << (i - base);
        // A new entry starts unreferenced, and protected while the set has
        // protected room (if the caller lets it).
        *self.referenced[p.set].get_mut() &= !bit;
        let prot = &mut self.protected[p.set];
        if may_protect && (*prot & !bit).count_ones() < PROTECTED {
            *prot |= bit;
        } else {
            *prot &= !bit;
        }
        self.slot_mut(i)
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

pub struct SetTable<const W: usize> {
    shards: Box<[RwLock<Shard<W>>]>,
    sets_per_shard: usize,
}

impl<const W: usize> SetTable<W> {
    /// A table of about `entries` entries (at least one set per shard).
    pub fn new(entries: usize) -> SetTable<W> {
        let sets_per_shard = entries.div_ceil(WAYS * SHARDS).max(1);
        SetTable {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(Shard::new(sets_per_shard)))
                .collect(),
            sets_per_shard,
        }
    }

    fn place(&self, key: &impl SlotKey<W>) -> Place {
        let f = key.fingerprint();
        Place {
            // Disjoint bits of a uniform fingerprint for shard, set and tag.
            shard: (f >> 60) as usize % SHARDS,
            set: (((f & 0xFFFF_FFFF) * self.sets_per_shard as u64) >> 32) as usize,
            tag: ((f >> 32) as u32 & 0x0FFF_FFFF) | 1,
        }
    }

    /// `with(slot)` on the slot holding `key`, if cached (a hit: it counts
    /// as a use).
    pub fn get_with<R>(
        &self,
        key: &impl SlotKey<W>,
        with: impl FnOnce(&[u64; W]) -> R,
    ) -> Option<R> {
        let p = self.place(key);
        self.shards[p.shard].read().get(p, key).map(with)
    }

    /// `with(i, slot)` for each `keys[i]` cached; one lock hold per shard
    /// (in shard order, not key order), so the misses of the batch's
    /// lookups overlap.
    pub fn get_many_with<K: SlotKey<W>>(&self, keys: &[K], mut with: impl FnMut(usize, &[u64; W])) {
        if let [only] = keys {
            self.get_with(only, |s| with(0, s));
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
                    if let Some(slot) = shard.get(*p, k) {
                        with(i, slot);
                    }
                }
            }
        }
    }

    /// For each item: `None` removes the key's entry, `Some(t)` calls
    /// `apply(slot, t)` on its slot, claiming one (with every word but the
    /// key's zero) if the key had none, which starts on probation unless
    /// `may_protect(key)`. Each shard's removals come first, otherwise in
    /// the order given: a commit of overwrites drops one dead record per
    /// new one, and its new entries then take the slots the dead ones free
    /// instead of evicting live entries.
    pub fn update_many<K: SlotKey<W>, T>(
        &self,
        items: impl IntoIterator<Item = (K, Option<T>)>,
        may_protect: impl Fn(&K) -> bool,
        mut apply: impl FnMut(&mut [u64; W], T),
    ) {
        let mut by_shard: [Vec<(Place, K, Option<T>)>; SHARDS] = Default::default();
        for (k, t) in items {
            let p = self.place(&k);
            by_shard[p.shard].push((p, k, t));
        }
        for (lock, mut list) in self.shards.iter().zip(by_shard) {
            // Stable: a run with no removals stays as it is, in one pass.
            list.sort_by_key(|(_, _, t)| t.is_some());
            let mut list = list.into_iter().peekable();
            // A bounded run per lock hold, so readers never wait long
            // behind a large commit.
            while list.peek().is_some() {
                let mut shard = lock.write();
                for (p, k, t) in list.by_ref().take(HOLD_KEYS) {
                    match t {
                        Some(t) => apply(shard.slot_for(p, &k, may_protect(&k)), t),
                        None => shard.remove(p, &k),
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
