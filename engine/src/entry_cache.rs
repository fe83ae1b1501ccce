//! Decoded, committed metadata entries — block-map mappings and record-index
//! entries — in front of the metadata store.
//!
//! Every block written looks up the block's old mapping and, on an
//! overwrite, the old record's reference count: two point reads of the LSM
//! store, about 3 µs each (memtable skiplists, table filters, index and data
//! block searches), which were half of ballastd's CPU under sequential and
//! random overwrites. Recently used entries answer from here instead.
//!
//! Coherence: the cache only ever holds what the store holds.
//! - A commit applies its frozen overlay here after its batch is in the store
//!   and before it publishes (drops the frozen overlay). Until then the
//!   frozen overlay shadows these keys for every lookup, so nobody reads them
//!   from here half-updated.
//! - A block-map miss is filled from the store only by writers holding the
//!   state lock (`Txn`) and only for keys in neither overlay: such a key
//!   cannot change in the store meanwhile (only frozen-overlay keys do), and
//!   the lock orders the fill before any later change to the key. Readers
//!   that leave the lock before going to the store never fill. Nor does a
//!   writer fill what it is about to change (nearly every lookup: the old
//!   mapping of a block written, the record whose count it moves), since the
//!   commit landing the change caches the new entry; record-index entries
//!   enter the cache only that way.
//! - Negative block entries ("unmapped") are cached too; volume ids are
//!   never reused, so a deleted volume's entries just age out. Absent
//!   records are not: a commit drops the records that died rather than
//!   caching their absence: under overwrites every write kills one, and those
//!   entries, never asked for again, would evict the live ones.
//!
//! Block mappings are cached in groups of `GROUP` consecutive blocks of a
//! volume, each slot known or not on its own (the rules above are per
//! slot). A read or write of many blocks then costs one lookup per group
//! instead of one per block: each lookup into a table far larger than the
//! CPU caches is several dependent memory misses, and the 256 lookups of a
//! 1 MiB read were 11% of ballastd's CPU under 1 MiB reads
//! (docs/benchmarks.md, session 11).

use crate::key::{BlockKey, RecordMeta};
use crate::record_cache::{RecordCache, ENTRY_BYTES};
use crate::shard_cache::ShardCache;
use crate::state::Overlay;
use quick_cache::UnitWeighter;

/// Consecutive blocks per cached group of block mappings: 16 blocks are a
/// 64 KiB run at the default block size, so a 1 MiB request is 16 lookups,
/// while a group whose blocks are used alone (random 4 KiB I/O over a large
/// volume) still costs only about 1 KiB.
const GROUP: u64 = 16;

/// Bytes one cached group costs, as measured: the group (16 keys of 40
/// bytes and two masks, 648 bytes, boxed), its slot in quick_cache's table
/// and the ghost slots beside it. `memory_scale 12` with every cache full
/// held 54-77 MiB more resident memory when 128 MiB of groups were counted
/// at 728 bytes each (boxed or inline alike) than with single entries at
/// 160: about 1,030-1,170 bytes per group.
const GROUP_BYTES: u64 = 1024;

/// The committed mappings of blocks `GROUP * n ..` of one volume, those that
/// are known.
#[derive(Clone)]
struct MapGroup {
    /// Bit i: slot i is known (what the store holds, mapped or not).
    known: u16,
    /// Bit i: slot i is mapped, to `keys[i]`.
    mapped: u16,
    keys: [BlockKey; GROUP as usize],
}

impl MapGroup {
    fn boxed() -> Box<MapGroup> {
        Box::new(MapGroup {
            known: 0,
            mapped: 0,
            keys: [BlockKey {
                hash: [0; 32],
                nonce: 0,
            }; GROUP as usize],
        })
    }

    /// `Some(mapping)` if slot `i` is known.
    fn get(&self, i: usize) -> Option<Option<BlockKey>> {
        let bit = 1u16 << i;
        (self.known & bit != 0).then(|| (self.mapped & bit != 0).then_some(self.keys[i]))
    }

    fn set(&mut self, i: usize, v: Option<BlockKey>) {
        let bit = 1u16 << i;
        self.known |= bit;
        match v {
            Some(k) => {
                self.mapped |= bit;
                self.keys[i] = k;
            }
            None => self.mapped &= !bit,
        }
    }
}

/// The group holding block `lba` of `volume`, and the block's slot in it.
fn group_of(volume: u32, lba: u64) -> ((u32, u64), usize) {
    ((volume, lba / GROUP), (lba % GROUP) as usize)
}

pub(crate) struct EntryCache {
    /// Boxed: quick_cache keeps the keys of recently evicted entries
    /// ("ghosts", for its CLOCK-Pro policy) in slots of its entry table,
    /// each as large as a resident key and value, so inline every ghost
    /// would take a group's 648 bytes (`memory_scale 12` could not tell
    /// the two apart within its noise, nor `write_cpu`).
    blocks: Option<ShardCache<(u32, u64), Box<MapGroup>, UnitWeighter>>,
    records: Option<RecordCache>,
}

impl EntryCache {
    /// Half of `bytes` for each kind; below 1 MiB the cache is off.
    pub fn new(bytes: u64) -> EntryCache {
        let records = (bytes / 2 / ENTRY_BYTES) as usize;
        let groups = (bytes / 2 / GROUP_BYTES) as usize;
        if bytes < 1 << 20 || records == 0 || groups == 0 {
            return EntryCache {
                blocks: None,
                records: None,
            };
        }
        EntryCache {
            blocks: Some(ShardCache::new(groups, groups as u64, UnitWeighter)),
            records: Some(RecordCache::new(records)),
        }
    }

    /// `Some(mapping)` if cached (the mapping itself may be "unmapped").
    pub fn block(&self, volume: u32, lba: u64) -> Option<Option<BlockKey>> {
        let (g, i) = group_of(volume, lba);
        self.blocks.as_ref()?.get_with(&g, |grp| grp.get(i))?
    }

    /// The cached mappings of blocks `lba0 + i` for each `i` in `at`:
    /// `found(i, mapping)` for each one cached. Consecutive indices in the
    /// same group share one lookup; one lock hold per shard.
    pub fn blocks(
        &self,
        volume: u32,
        lba0: u64,
        at: &[usize],
        mut found: impl FnMut(usize, Option<BlockKey>),
    ) {
        let Some(c) = &self.blocks else { return };
        // One block (a 4 KiB write or read): no lists to build.
        if let [i] = at {
            if let Some(v) = self.block(volume, lba0 + *i as u64) {
                found(*i, v);
            }
            return;
        }
        // The groups `at` touches, each with the run of `at` inside it.
        let mut groups: Vec<(u32, u64)> = Vec::new();
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (j, &i) in at.iter().enumerate() {
            let (g, _) = group_of(volume, lba0 + i as u64);
            if groups.last() == Some(&g) {
                if let Some(r) = runs.last_mut() {
                    r.end = j + 1;
                }
            } else {
                groups.push(g);
                runs.push(j..j + 1);
            }
        }
        c.get_many_with(&groups, |n, grp| {
            for &i in &at[runs[n].clone()] {
                let (_, slot) = group_of(volume, lba0 + i as u64);
                if let Some(v) = grp.get(slot) {
                    found(i, v);
                }
            }
        });
    }

    /// The committed record of `key`, if cached (absent records never are).
    pub fn record(&self, key: &BlockKey) -> Option<RecordMeta> {
        self.records.as_ref()?.get(key)
    }

    /// `found(i, record)` for each `keys[i]` cached; one lock hold per shard.
    pub fn records(&self, keys: &[BlockKey], found: impl FnMut(usize, RecordMeta)) {
        if let Some(c) = &self.records {
            c.get_many(keys, found);
        }
    }

    /// Fill after a store read; see the module comment for who may.
    pub fn fill_block(&self, volume: u32, lba: u64, v: Option<BlockKey>) {
        if let Some(c) = &self.blocks {
            let (g, i) = group_of(volume, lba);
            c.modify_many([(g, (i, v))], MapGroup::boxed, |grp, (i, v)| grp.set(i, v));
        }
    }

    /// A committed overlay: its changes are now what the store holds.
    /// `blocks` are the overlay's block-map changes in key order (the
    /// commit sorts them for its batch), so that each group is looked up
    /// once.
    pub fn apply(&self, blocks: &[(&(u32, u64), &Option<BlockKey>)], ov: &Overlay) {
        if let Some(c) = &self.blocks {
            c.modify_many(
                blocks.iter().map(|(&(v, lba), &k)| {
                    let (g, i) = group_of(v, lba);
                    (g, (i, k))
                }),
                MapGroup::boxed,
                |grp, (i, k)| grp.set(i, k),
            );
        }
        if let Some(c) = &self.records {
            // A dead record (`None`) is removed, not cached as absent: it is
            // looked up again only if its content is written again, and
            // caching its absence would push live records out under
            // overwrites (one dead per write).
            c.update_many(ov.records.iter().map(|(&k, &v)| (k, v)));
        }
    }

    /// Approximate memory held.
    pub fn memory_bytes(&self) -> u64 {
        let (b, r) = self.len();
        b as u64 * GROUP_BYTES + r as u64 * ENTRY_BYTES
    }

    /// Entries held (groups of block mappings, records).
    pub fn len(&self) -> (usize, usize) {
        (
            self.blocks.as_ref().map_or(0, |c| c.len()),
            self.records.as_ref().map_or(0, |c| c.len()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::SegmentId;

    fn key(b: u8) -> BlockKey {
        BlockKey {
            hash: [b; 32],
            nonce: 0,
        }
    }

    fn meta(refs: u32) -> RecordMeta {
        RecordMeta {
            segment: SegmentId { disk: 0, index: 1 },
            offset: 64,
            stored_len: 100,
            raw_len: 4096,
            refs,
        }
    }

    #[test]
    fn apply_overrides_fills_including_removals() {
        let c = EntryCache::new(4 << 20);
        c.fill_block(1, 7, Some(key(1)));
        c.fill_block(1, 8, None);
        let mut first = Overlay::default();
        first.records.insert(key(1), Some(meta(1)));
        c.apply(&first.blocks_in_key_order(), &first);
        assert_eq!(c.block(1, 7), Some(Some(key(1))));
        assert_eq!(c.block(1, 8), Some(None));
        assert_eq!(c.block(1, 9), None, "never seen: not cached");

        let mut ov = Overlay::default();
        ov.blocks.insert((1, 7), None);
        ov.blocks.insert((1, 8), Some(key(2)));
        ov.records.insert(key(1), None);
        ov.records.insert(key(2), Some(meta(1)));
        c.apply(&ov.blocks_in_key_order(), &ov);
        assert_eq!(c.block(1, 7), Some(None));
        assert_eq!(c.block(1, 8), Some(Some(key(2))));
        assert_eq!(c.record(&key(1)), None, "dead records are dropped");
        assert_eq!(c.record(&key(2)), Some(meta(1)));
        assert_eq!(c.len(), (1, 1), "blocks 7 and 8 share a group");
    }

    #[test]
    fn grouped_mappings_are_known_slot_by_slot() {
        let c = EntryCache::new(4 << 20);
        // Blocks 14..18 straddle two groups; 16 is left unknown, and volume
        // 2's block 15 shares volume 1's group index but not its group.
        c.fill_block(1, 14, Some(key(14)));
        c.fill_block(1, 15, None);
        c.fill_block(1, 17, Some(key(17)));
        c.fill_block(2, 15, Some(key(99)));
        let mut ov = Overlay::default();
        ov.blocks.insert((1, 18), Some(key(18)));
        ov.blocks.insert((1, 31), None);
        ov.blocks.insert((1, 32), Some(key(32)));
        c.apply(&ov.blocks_in_key_order(), &ov);

        let mut got = vec![None; 20];
        c.blocks(1, 13, &[0, 1, 2, 3, 4, 5, 18, 19], |i, v| got[i] = Some(v));
        assert_eq!(got[0], None, "13 never seen");
        assert_eq!(got[1], Some(Some(key(14))));
        assert_eq!(got[2], Some(None), "15 known unmapped");
        assert_eq!(got[3], None, "16 never seen");
        assert_eq!(got[4], Some(Some(key(17))));
        assert_eq!(got[5], Some(Some(key(18))));
        assert_eq!(got[18], Some(None), "31 unmapped by the commit");
        assert_eq!(got[19], Some(Some(key(32))));
        for (i, g) in got.iter().enumerate() {
            assert_eq!(*g, c.block(1, 13 + i as u64), "block {}", 13 + i);
        }
        assert_eq!(c.block(2, 15), Some(Some(key(99))));
        assert_eq!(c.block(2, 14), None);
        // Volume 1: groups 0, 1 and 2; volume 2: group 0.
        assert_eq!(c.len().0, 4);
    }

    #[test]
    fn tiny_budget_disables_the_cache() {
        let c = EntryCache::new(1000);
        c.fill_block(1, 1, Some(key(1)));
        assert_eq!(c.block(1, 1), None);
        assert_eq!(c.len(), (0, 0));
    }
}
