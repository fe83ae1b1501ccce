//! A few `quick_cache` caches behind their own locks, with batch operations
//! that take each shard's lock once per batch instead of once per key.
//!
//! `quick_cache::sync::Cache` locks a shard for every single lookup. A
//! lookup into a cache far larger than the CPU caches is three dependent
//! memory misses (control bytes, bucket, slab entry), and the lock's atomic
//! read-modify-write before each one keeps the processor from overlapping
//! the misses of consecutive lookups. Reads of many blocks (a 1 MiB read is
//! 256 block-map and 256 block lookups) and commits (thousands of inserts)
//! paid that serially: 28% of ballastd's CPU under 1 MiB reads. Grouped by
//! shard under one lock, the lookups of a batch overlap: 79 ns per lookup
//! instead of 130 ns in batches of 32 block-map keys, 36 instead of 128 ns
//! in batches of 256 (criterion `cache` group in benches/: two threads on
//! this machine's two cores, a 1.6 Mi-entry cache; docs/benchmarks.md,
//! session 9). Single lookups cost the same either way.
//!
//! The eviction policy, weights and bookkeeping are quick_cache's own
//! (`unsync::Cache`, one per shard); only the locking is here.

use parking_lot::RwLock;
use quick_cache::unsync::Cache;
use quick_cache::Weighter;
use std::hash::{BuildHasher, Hash};

type Hasher = foldhash::fast::RandomState;

/// One shard: quick_cache's single-threaded cache behind its lock.
type Shard<K, V, W> = RwLock<Cache<K, V, W, Hasher>>;

/// Four shards: enough that two cores rarely meet on one lock, few enough
/// that a batch of 32 keys still finds several per shard.
const SHARDS: usize = 4;

/// Keys handled per lock hold in bulk inserts and removals, so a commit of a
/// large overlay never keeps readers of a shard waiting for long.
pub(crate) const HOLD_KEYS: usize = 256;

pub struct ShardCache<K, V, W> {
    shards: Box<[Shard<K, V, W>]>,
    /// Picks the shard; each shard's table hashes with its own seed, so the
    /// bits that chose the shard do not skew the table.
    pick: Hasher,
    /// The shards' weighter, for inserts that must not evict.
    weighter: W,
}

impl<K, V, W> ShardCache<K, V, W>
where
    K: Eq + Hash + Clone,
    V: Clone,
    W: Weighter<K, V> + Clone,
{
    pub fn get(&self, key: &K) -> Option<V> {
        self.get_with(key, V::clone)
    }

    /// Look up every key, calling `found(i, value)` for each `keys[i]`
    /// cached (in shard order, not key order).
    pub fn get_many(&self, keys: &[K], mut found: impl FnMut(usize, V)) {
        self.get_many_with(keys, |i, v| found(i, v.clone()));
    }
}

impl<K, V, W> ShardCache<K, V, W>
where
    K: Eq + Hash + Clone,
    W: Weighter<K, V> + Clone,
{
    /// About `items` entries weighing at most `weight` in all.
    pub fn new(items: usize, weight: u64, weighter: W) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                RwLock::new(Cache::with(
                    items.div_ceil(SHARDS).max(1),
                    weight.div_ceil(SHARDS as u64).max(1),
                    weighter.clone(),
                    Hasher::default(),
                    Default::default(),
                ))
            })
            .collect();
        ShardCache {
            shards,
            pick: Hasher::default(),
            weighter,
        }
    }

    fn shard_of(&self, key: &K) -> usize {
        // The high bits: foldhash mixes them best.
        (self.pick.hash_one(key) >> 58) as usize % SHARDS
    }

    /// `items` split by shard, each list in the order given.
    fn by_shard<T>(&self, items: impl IntoIterator<Item = (K, T)>) -> [Vec<(K, T)>; SHARDS] {
        let mut by_shard: [Vec<(K, T)>; SHARDS] = Default::default();
        for (k, t) in items {
            by_shard[self.shard_of(&k)].push((k, t));
        }
        by_shard
    }

    /// `with(value)` on the cached value of `key`, under the shard's lock,
    /// for callers that need a part of a large value, not a copy of it.
    pub fn get_with<R>(&self, key: &K, with: impl FnOnce(&V) -> R) -> Option<R> {
        self.shards[self.shard_of(key)].read().get(key).map(with)
    }

    /// `get_many` that lends each value (`with(i, &value)`, under the
    /// shard's lock) instead of cloning it.
    pub fn get_many_with(&self, keys: &[K], mut with: impl FnMut(usize, &V)) {
        if let [only] = keys {
            self.get_with(only, |v| with(0, v));
            return;
        }
        let shard: Vec<u8> = keys.iter().map(|k| self.shard_of(k) as u8).collect();
        for (s, lock) in self.shards.iter().enumerate() {
            if !shard.contains(&(s as u8)) {
                continue;
            }
            let cache = lock.read();
            for (i, k) in keys.iter().enumerate() {
                if shard[i] as usize == s {
                    if let Some(v) = cache.get(k) {
                        with(i, v);
                    }
                }
            }
        }
    }

    /// Inserts `key` only if its shard has room for it as it is: never
    /// evicts. (Room is per shard, so a check of the total weight against
    /// the total capacity says "room" while every shard is full but for a
    /// fraction of an entry.)
    pub fn insert_if_room(&self, key: K, value: V) {
        let mut cache = self.shards[self.shard_of(&key)].write();
        self.insert_into_if_room(&mut cache, key, value);
    }

    fn insert_into_if_room(&self, cache: &mut Cache<K, V, W, Hasher>, key: K, value: V) {
        if cache.weight() + self.weighter.weight(&key, &value) <= cache.capacity() {
            cache.insert(key, value);
        }
    }

    /// `insert_if_room` for each entry, grouped by shard, at most
    /// `HOLD_KEYS` per lock hold.
    pub fn insert_many_if_room(&self, entries: impl IntoIterator<Item = (K, V)>) {
        for (lock, list) in self.shards.iter().zip(self.by_shard(entries)) {
            let mut list = list.into_iter().peekable();
            while list.peek().is_some() {
                let mut cache = lock.write();
                for (k, v) in list.by_ref().take(HOLD_KEYS) {
                    self.insert_into_if_room(&mut cache, k, v);
                }
            }
        }
    }

    /// Insert (`Some`) or remove (`None`) each entry, grouped by shard. The
    /// keys must be distinct: each shard's removals go first, so that the
    /// inserts take the room they free instead of evicting live entries (a
    /// commit of overwrites removes one dead record per new one).
    pub fn update_many(&self, entries: impl IntoIterator<Item = (K, Option<V>)>) {
        let mut by_shard: [Vec<(K, Option<V>)>; SHARDS] = Default::default();
        let mut removals: [Vec<(K, Option<V>)>; SHARDS] = Default::default();
        for (k, v) in entries {
            let s = self.shard_of(&k);
            match v {
                None => removals[s].push((k, None)),
                v => by_shard[s].push((k, v)),
            }
        }
        for ((lock, list), gone) in self.shards.iter().zip(by_shard).zip(removals) {
            let mut list = gone.into_iter().chain(list).peekable();
            while list.peek().is_some() {
                let mut cache = lock.write();
                for (k, v) in list.by_ref().take(HOLD_KEYS) {
                    match v {
                        Some(v) => cache.insert(k, v),
                        None => {
                            cache.remove(&k);
                        }
                    }
                }
            }
        }
    }

    /// `change(value, item)` for each `(key, item)`, on the cached value of
    /// `key`, which `new()` creates first where it is absent; grouped by
    /// shard, at most `HOLD_KEYS` items per lock hold. Runs of items with
    /// the same key share one lookup, so callers that update parts of
    /// large values (the entry cache's groups of block mappings) pass them
    /// in key order.
    pub fn modify_many<T>(
        &self,
        items: impl IntoIterator<Item = (K, T)>,
        new: impl Fn() -> V,
        mut change: impl FnMut(&mut V, T),
    ) {
        for (lock, list) in self.shards.iter().zip(self.by_shard(items)) {
            let mut list = list.into_iter().peekable();
            while list.peek().is_some() {
                let mut cache = lock.write();
                let mut held = 0;
                while held < HOLD_KEYS {
                    let Some((k, t)) = list.next() else { break };
                    held += 1;
                    let entry = cache
                        .get_mut_or_insert_with(&k, || Ok::<V, std::convert::Infallible>(new()));
                    // Not admitted (a value heavier than a shard): nothing
                    // to change, and the cache holds nothing for the key.
                    let Ok(Some(mut v)) = entry else {
                        while list.next_if(|(next, _)| *next == k).is_some() {}
                        continue;
                    };
                    change(&mut v, t);
                    while let Some((_, t)) = list.next_if(|(next, _)| *next == k) {
                        held += 1;
                        change(&mut v, t);
                    }
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.read().is_empty())
    }

    pub fn weight(&self) -> u64 {
        self.shards.iter().map(|s| s.read().weight()).sum()
    }

    pub fn capacity(&self) -> u64 {
        self.shards.iter().map(|s| s.read().capacity()).sum()
    }

    /// Sets the total capacity (split evenly over the shards); shards over
    /// it evict down to it.
    pub fn set_capacity(&self, weight: u64) {
        let each = weight.div_ceil(SHARDS as u64).max(1);
        for s in self.shards.iter() {
            s.write().set_capacity(each);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_cache::UnitWeighter;

    #[test]
    fn batch_lookups_find_what_single_ones_do() {
        let c: ShardCache<u64, u64, UnitWeighter> = ShardCache::new(10_000, 10_000, UnitWeighter);
        c.update_many((0..1000u64).map(|i| (i, Some(i * 3))));
        c.update_many([(5000, Some(7))]);
        let keys: Vec<u64> = (990..1010).chain([5000]).collect();
        let mut got = vec![None; keys.len()];
        c.get_many(&keys, |i, v| got[i] = Some(v));
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(got[i], c.get(k), "key {k}");
        }
        assert_eq!(got[0], Some(990 * 3));
        assert_eq!(got[10], None, "never inserted");
        assert_eq!(got[20], Some(7));
        let mut one = None;
        c.get_many(&[3], |i, v| one = Some((i, v)));
        assert_eq!(one, Some((0, 9)));
    }

    #[test]
    fn bulk_removals_and_weights() {
        let c: ShardCache<u64, u64, UnitWeighter> = ShardCache::new(4000, 4000, UnitWeighter);
        c.update_many((0..1000u64).map(|i| (i, Some(i))));
        assert_eq!(c.len(), 1000);
        assert!(!c.is_empty());
        assert_eq!(c.weight(), 1000);
        c.update_many((0..600u64).map(|i| (i, None)));
        assert_eq!(c.len(), 400);
        assert_eq!(c.get(&10), None);
        assert_eq!(c.get(&700), Some(700));
        assert!(c.capacity() >= 4000);
    }

    #[test]
    fn removals_in_a_batch_make_room_for_its_inserts() {
        let c: ShardCache<u64, u64, UnitWeighter> = ShardCache::new(1000, 1000, UnitWeighter);
        c.update_many((0..800u64).map(|i| (i, Some(i))));
        assert_eq!(c.len(), 800);
        // Inserts listed before the removals that make room for them: about
        // 75 of each per shard, on shards holding about 200 of 250.
        let inserts = (1000..1300u64).map(|i| (i, Some(i)));
        let removals = (0..300u64).map(|i| (i, None));
        c.update_many(inserts.chain(removals));
        assert_eq!(c.len(), 800);
        for k in (300..800u64).chain(1000..1300) {
            assert_eq!(c.get(&k), Some(k), "key {k} was evicted");
        }
    }

    #[test]
    fn modify_many_creates_and_changes_values_in_place() {
        let c: ShardCache<u64, Vec<u64>, UnitWeighter> = ShardCache::new(1000, 1000, UnitWeighter);
        c.update_many([(1, Some(vec![100]))]);
        // Runs of one key, a key seen again after another, and new keys.
        let items = [(1, 1), (1, 2), (2, 3), (1, 4), (3, 5), (3, 6)];
        c.modify_many(items, Vec::new, |v, t| v.push(t));
        assert_eq!(c.get(&1), Some(vec![100, 1, 2, 4]));
        assert_eq!(c.get(&2), Some(vec![3]));
        assert_eq!(c.get(&3), Some(vec![5, 6]));
        assert_eq!(c.len(), 3);
        let mut lent = Vec::new();
        c.get_many_with(&[3, 9, 2], |i, v| lent.push((i, v.len())));
        lent.sort();
        assert_eq!(lent, vec![(0, 2), (2, 1)]);
    }

    #[test]
    fn inserts_if_room_never_evict() {
        let c: ShardCache<u64, u64, UnitWeighter> = ShardCache::new(400, 400, UnitWeighter);
        c.insert_many_if_room((0..1000u64).map(|i| (i, i)));
        let held = c.len();
        assert!(held <= 400, "{held} entries held");
        let kept: Vec<u64> = (0..1000u64).filter(|k| c.get(k).is_some()).collect();
        assert_eq!(kept.len(), held);
        // Full shards refuse everything after: nothing already held leaves.
        for k in 1000..2000u64 {
            c.insert_if_room(k, k);
        }
        c.insert_many_if_room((2000..3000u64).map(|i| (i, i)));
        assert_eq!(c.len(), held);
        assert!(kept.iter().all(|k| c.get(k) == Some(*k)));
    }

    #[test]
    fn holds_about_its_capacity() {
        let c: ShardCache<u64, u64, UnitWeighter> = ShardCache::new(1000, 1000, UnitWeighter);
        c.update_many((0..10_000u64).map(|i| (i, Some(i))));
        assert!(c.len() <= 1000 + SHARDS, "{} entries held", c.len());
        assert!(c.len() > 500, "{} entries held", c.len());
    }
}
