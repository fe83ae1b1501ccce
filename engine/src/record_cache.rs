//! Committed record-index entries in a set-associative table
//! (`set_table`): the record half of the entry cache (see `entry_cache` for
//! what may enter it).
//!
//! Every overwrite looks up the old record (to drop its reference) and
//! every commit inserts its new records and removes its dead ones, so this
//! table sees about three operations per block written. In quick_cache each
//! was several dependent memory misses plus its CLOCK-Pro bookkeeping, and
//! an entry cost ~160 bytes with its ghost slots; here a lookup is two
//! misses and an entry costs about 69 bytes (a 64-byte slot and the
//! table's bookkeeping), so the same memory holds 2.3 times as many
//! records.

use crate::key::{BlockKey, RecordMeta, SegmentId};
use crate::set_table::{SetTable, SlotKey, OVERHEAD_BYTES};

/// Bytes one entry costs: its 64-byte slot and the table's bookkeeping.
pub const ENTRY_BYTES: u64 = 64 + OVERHEAD_BYTES;

/// A key and its record, as eight words (all zeros in an empty slot): the
/// key's five (`BlockKey::to_words`), then the record's three.
type Slot = [u64; 8];

/// The record as the last three words of its slot.
fn record_words(m: &RecordMeta) -> [u64; 3] {
    [
        (m.segment.disk as u64) << 32 | m.segment.index as u64,
        (m.offset as u64) << 32 | m.stored_len as u64,
        (m.raw_len as u64) << 32 | m.refs as u64,
    ]
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

impl SlotKey<8> for BlockKey {
    fn fingerprint(&self) -> u64 {
        BlockKey::fingerprint(self)
    }

    fn held_by(&self, slot: &Slot) -> bool {
        slot[..5] == self.to_words()
    }

    fn claim(&self, slot: &mut Slot) {
        slot[..5].copy_from_slice(&self.to_words());
    }
}

pub struct RecordCache {
    table: SetTable<8>,
}

impl RecordCache {
    /// A table of about `entries` entries.
    pub fn new(entries: usize) -> RecordCache {
        RecordCache {
            table: SetTable::new(entries),
        }
    }

    pub fn get(&self, key: &BlockKey) -> Option<RecordMeta> {
        self.table.get_with(key, decode)
    }

    /// `found(i, record)` for each `keys[i]` cached; one lock hold per
    /// shard (in shard order, not key order).
    pub fn get_many(&self, keys: &[BlockKey], mut found: impl FnMut(usize, RecordMeta)) {
        self.table.get_many_with(keys, |i, s| found(i, decode(s)));
    }

    /// Insert (`Some`) or remove (`None`) each entry (removals first, see
    /// `SetTable::update_many`); a new entry starts on probation unless
    /// `may_protect(key)`.
    pub fn update_many(
        &self,
        entries: impl IntoIterator<Item = (BlockKey, Option<RecordMeta>)>,
        may_protect: impl Fn(&BlockKey) -> bool,
    ) {
        self.table.update_many(entries, may_protect, |slot, m| {
            slot[5..].copy_from_slice(&record_words(&m))
        });
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Entries the table can hold.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.table.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::set_table::{SHARDS, WAYS};

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
        c.update_many([(with_nonce, Some(m)), (key(2), Some(meta(2)))], |_| true);
        assert_eq!(c.get(&with_nonce), Some(m));
        assert_eq!(c.get(&key(1)), None, "same hash, other nonce");
        assert_eq!(c.get(&key(2)), Some(meta(2)));
        assert_eq!(c.len(), 2);
        // Replacing an entry keeps one copy.
        c.update_many([(key(2), Some(meta(9)))], |_| true);
        assert_eq!(c.get(&key(2)), Some(meta(9)));
        assert_eq!(c.len(), 2);
        c.update_many([(key(2), None), (key(3), None)], |_| true);
        assert_eq!(c.get(&key(2)), None);
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn batch_lookups_find_what_single_ones_do() {
        let c = RecordCache::new(10_000);
        let keys: Vec<BlockKey> = (0..3000).map(key).collect();
        let metas: Vec<RecordMeta> = (0..3000).map(meta).collect();
        c.update_many(
            keys.iter().copied().zip(metas.iter().copied().map(Some)),
            |_| true,
        );
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
        c.update_many(hot.iter().map(|k| (*k, Some(meta(0)))), |_| true);
        for wave in 0..20u64 {
            let mut hits = 0;
            c.get_many(&hot, |_, _| hits += 1);
            if wave > 0 {
                assert!(hits > 230, "wave {wave}: {hits} of 256 hot keys cached");
            }
            let cold: Vec<BlockKey> = (0..1024)
                .map(|i| key(1_000_000 + wave * 1024 + i))
                .collect();
            c.update_many(cold.iter().map(|k| (*k, Some(meta(1)))), |_| true);
            assert!(c.len() <= cap);
        }
        // Inserts into a full table evict, never grow it.
        let many: Vec<BlockKey> = (0..20_000).map(|i| key(5_000_000 + i)).collect();
        c.update_many(many.iter().map(|k| (*k, Some(meta(2)))), |_| true);
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
        c.update_many(first.iter().map(|k| (*k, Some(meta(0)))), |_| true);
        // Four times the table's size in new keys, none looked up.
        for wave in 0..16u64 {
            let burst: Vec<BlockKey> = (0..1024).map(|i| key(1 << 40 | wave << 20 | i)).collect();
            c.update_many(burst.iter().map(|k| (*k, Some(meta(1)))), |_| true);
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
        c.update_many(first.iter().map(|k| (*k, None)), |_| true);
        let next: Vec<BlockKey> = (0..first.len() as u64).map(|i| key(1 << 50 | i)).collect();
        c.update_many(next.iter().map(|k| (*k, Some(meta(2)))), |_| true);
        let burst: Vec<BlockKey> = (0..c.capacity() as u64).map(|i| key(1 << 51 | i)).collect();
        c.update_many(burst.iter().map(|k| (*k, Some(meta(3)))), |_| true);
        let kept = next.iter().filter(|k| c.get(k).is_some()).count();
        assert!(
            kept * 100 >= next.len() * 75,
            "{kept} of {} kept",
            next.len()
        );
    }

    #[test]
    fn entries_on_probation_leave_the_protected_ways_to_later_ones() {
        let c = RecordCache::new(1 << 14);
        let cap = c.capacity() as u64;
        // First writes fill the table twice over, all on probation.
        let first_writes = |base: u64, n: u64| {
            let keys: Vec<BlockKey> = (0..n).map(|i| key(base + i)).collect();
            c.update_many(keys.iter().map(|k| (*k, Some(meta(1)))), |_| false);
        };
        first_writes(1 << 40, 2 * cap);
        // Then records of rewritten blocks, half the table's size, and
        // more first writes than the table holds.
        let rewritten: Vec<BlockKey> = (0..cap / 2).map(key).collect();
        c.update_many(rewritten.iter().map(|k| (*k, Some(meta(2)))), |_| true);
        first_writes(1 << 41, 4 * cap);
        let kept = rewritten.iter().filter(|k| c.get(k).is_some()).count();
        assert!(
            kept * 100 >= rewritten.len() * 99,
            "{kept} of {} kept",
            rewritten.len()
        );
    }

    #[test]
    fn removals_in_a_batch_make_room_for_its_inserts() {
        let c = RecordCache::new(512);
        let old: Vec<BlockKey> = (0..c.capacity() as u64).map(key).collect();
        c.update_many(old.iter().map(|k| (*k, Some(meta(0)))), |_| true);
        let kept: Vec<&BlockKey> = old.iter().filter(|k| c.get(k).is_some()).collect();
        // Replace the first 100 kept with 100 new keys, inserts listed first.
        let new: Vec<BlockKey> = (0..100).map(|i| key(900_000 + i)).collect();
        let dead = &kept[..100];
        c.update_many(
            new.iter()
                .map(|k| (*k, Some(meta(1))))
                .chain(dead.iter().map(|k| (**k, None))),
            |_| true,
        );
        let survivors = kept[100..].iter().filter(|k| c.get(k).is_some()).count();
        // A new key whose set had no removal still evicts; most find a slot.
        assert!(survivors + 40 >= kept.len() - 100, "{survivors} survivors");
    }
}
