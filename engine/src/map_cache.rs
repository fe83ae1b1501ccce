//! Committed block-map mappings in a set-associative table (`set_table`):
//! the block half of the entry cache (see `entry_cache` for what may enter
//! it).
//!
//! Mappings are cached in groups of `GROUP` consecutive blocks of a volume,
//! each slot known or not on its own, so a read or write of many blocks
//! costs one lookup per group instead of one per block (the 256 lookups of
//! a 1 MiB read were 11% of ballastd's CPU under 1 MiB reads;
//! docs/benchmarks.md, session 11). A group is one slot of the table, its
//! mappings inline: a lookup reads the set's line of tags, the slot's first
//! line (its volume, group and known/mapped bits) and the key asked for.
//! In quick_cache a group was a boxed value behind its control bytes,
//! bucket and slab entry, two more dependent misses, and cost about 1,024
//! bytes with its ghost slots against 661 here.

use crate::key::BlockKey;
use crate::set_table::{SetTable, SlotKey, OVERHEAD_BYTES};

/// Consecutive blocks per cached group: 16 blocks are a 64 KiB run at the
/// default block size, so a 1 MiB request is 16 lookups, while a group
/// whose blocks are used alone (random 4 KiB I/O over a large volume) still
/// costs only 661 bytes.
pub const GROUP: u64 = 16;

/// Words per group: the header (volume, known and mapped bits), the group
/// index, then five per key (its hash's four words and its nonce).
const WORDS: usize = 2 + 5 * GROUP as usize;

/// Bytes one cached group costs: its slot and the table's bookkeeping.
pub const ENTRY_BYTES: u64 = WORDS as u64 * 8 + OVERHEAD_BYTES;

type Slot = [u64; WORDS];

/// Bits 32..48 of the header: slot i is known (what the store holds,
/// mapped or not); bits 48..64: slot i is mapped, to key i.
const KNOWN_SHIFT: u32 = 32;
const MAPPED_SHIFT: u32 = 48;

/// Blocks `GROUP * group ..` of one volume.
#[derive(Clone, Copy)]
struct GroupId {
    volume: u32,
    group: u64,
}

/// The group holding block `lba` of `volume`, and the block's slot in it.
fn group_of(volume: u32, lba: u64) -> (GroupId, usize) {
    (
        GroupId {
            volume,
            group: lba / GROUP,
        },
        (lba % GROUP) as usize,
    )
}

impl SlotKey<WORDS> for GroupId {
    fn fingerprint(&self) -> u64 {
        // Consecutive groups must land in unrelated sets: a multiply and
        // two xor-shift folds spread every input bit over the whole word.
        let mut x = self.group ^ (self.volume as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        x = (x ^ (x >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        x ^ (x >> 32)
    }

    fn held_by(&self, slot: &Slot) -> bool {
        slot[0] as u32 == self.volume && slot[1] == self.group
    }

    fn claim(&self, slot: &mut Slot) {
        slot[0] = self.volume as u64;
        slot[1] = self.group;
    }
}

/// The five words of key `i` (`BlockKey::to_words`).
fn key_words(slot: &Slot, i: usize) -> &[u64; 5] {
    slot[2 + 5 * i..2 + 5 * i + 5]
        .try_into()
        .expect("five words")
}

/// `Some(mapping)` if slot `i` of the group is known.
fn get(slot: &Slot, i: usize) -> Option<Option<BlockKey>> {
    let known = (slot[0] >> (KNOWN_SHIFT + i as u32)) & 1 != 0;
    let mapped = (slot[0] >> (MAPPED_SHIFT + i as u32)) & 1 != 0;
    known.then(|| mapped.then(|| BlockKey::from_words(key_words(slot, i))))
}

fn set(slot: &mut Slot, i: usize, v: Option<BlockKey>) {
    slot[0] |= 1 << (KNOWN_SHIFT + i as u32);
    let mapped = 1 << (MAPPED_SHIFT + i as u32);
    match v {
        Some(k) => {
            slot[0] |= mapped;
            slot[2 + 5 * i..2 + 5 * i + 5].copy_from_slice(&k.to_words());
        }
        None => slot[0] &= !mapped,
    }
}

pub struct MapCache {
    table: SetTable<WORDS>,
}

impl MapCache {
    /// A table of about `groups` groups.
    pub fn new(groups: usize) -> MapCache {
        MapCache {
            table: SetTable::new(groups),
        }
    }

    /// `Some(mapping)` if cached (the mapping itself may be "unmapped").
    pub fn get(&self, volume: u32, lba: u64) -> Option<Option<BlockKey>> {
        let (g, i) = group_of(volume, lba);
        self.table.get_with(&g, |s| get(s, i))?
    }

    /// The cached mappings of blocks `lba0 + i` for each `i` in `at`:
    /// `found(i, mapping)` for each one cached. Consecutive indices in the
    /// same group share one lookup; one lock hold per shard.
    pub fn get_many(
        &self,
        volume: u32,
        lba0: u64,
        at: &[usize],
        mut found: impl FnMut(usize, Option<BlockKey>),
    ) {
        // One block (a 4 KiB write or read): no lists to build.
        if let [i] = at {
            if let Some(v) = self.get(volume, lba0 + *i as u64) {
                found(*i, v);
            }
            return;
        }
        // The groups `at` touches, each with the run of `at` inside it.
        let mut groups: Vec<GroupId> = Vec::new();
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (j, &i) in at.iter().enumerate() {
            let (g, _) = group_of(volume, lba0 + i as u64);
            if groups.last().is_some_and(|l| l.group == g.group) {
                if let Some(r) = runs.last_mut() {
                    r.end = j + 1;
                }
            } else {
                groups.push(g);
                runs.push(j..j + 1);
            }
        }
        self.table.get_many_with(&groups, |n, slot| {
            for &i in &at[runs[n].clone()] {
                let (_, k) = group_of(volume, lba0 + i as u64);
                if let Some(v) = get(slot, k) {
                    found(i, v);
                }
            }
        });
    }

    /// Set each `(volume, lba, mapping)` as known, one lock hold per shard
    /// for a run of up to `HOLD_KEYS` of them.
    pub fn set_many(&self, mappings: impl IntoIterator<Item = (u32, u64, Option<BlockKey>)>) {
        self.table.update_many(
            mappings.into_iter().map(|(volume, lba, v)| {
                let (g, i) = group_of(volume, lba);
                (g, Some((i, v)))
            }),
            |_| true,
            |slot, (i, v)| set(slot, i, v),
        );
    }

    /// Groups held.
    pub fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8, nonce: u64) -> BlockKey {
        let mut hash = [b; 32];
        hash[31] = !b;
        BlockKey { hash, nonce }
    }

    #[test]
    fn every_slot_round_trips_mapped_or_not() {
        let c = MapCache::new(1024);
        let v = u32::MAX;
        let base = (u64::MAX / GROUP - 1) * GROUP;
        c.set_many((0..GROUP).map(|i| {
            let m = (i % 3 != 0).then(|| key(i as u8, u64::MAX - i));
            (v, base + i, m)
        }));
        for i in 0..GROUP {
            let want = (i % 3 != 0).then(|| key(i as u8, u64::MAX - i));
            assert_eq!(c.get(v, base + i), Some(want), "slot {i}");
        }
        // Remapping a slot, and unmapping one, leave the others alone.
        c.set_many([(v, base + 1, None), (v, base + 3, Some(key(77, 0)))]);
        assert_eq!(c.get(v, base + 1), Some(None));
        assert_eq!(c.get(v, base + 3), Some(Some(key(77, 0))));
        assert_eq!(c.get(v, base + 2), Some(Some(key(2, u64::MAX - 2))));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn groups_of_other_volumes_and_indices_are_apart() {
        let c = MapCache::new(4096);
        c.set_many([(1, 5, Some(key(1, 0))), (2, 5, Some(key(2, 0)))]);
        c.set_many([(1, 5 + GROUP, None)]);
        assert_eq!(c.get(1, 5), Some(Some(key(1, 0))));
        assert_eq!(c.get(2, 5), Some(Some(key(2, 0))));
        assert_eq!(c.get(1, 5 + GROUP), Some(None));
        assert_eq!(c.get(1, 6), None, "same group, never set");
        assert_eq!(c.get(3, 5), None);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn a_full_table_evicts_and_never_grows() {
        let c = MapCache::new(2048);
        let cap = c.table.capacity();
        for g in 0..(cap as u64 * 4) {
            c.set_many([(9, g * GROUP, Some(key(g as u8, g)))]);
        }
        assert!(
            c.len() <= cap && c.len() > cap * 9 / 10,
            "{} of {cap}",
            c.len()
        );
        // The first groups were protected in their sets and stay.
        let first = (0..cap as u64 / 4)
            .filter(|&g| c.get(9, g * GROUP) == Some(Some(key(g as u8, g))))
            .count();
        assert!(
            first * 100 >= cap / 4 * 95,
            "{first} of {} first groups kept",
            cap / 4
        );
    }
}
