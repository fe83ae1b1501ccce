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
//! Block mappings are cached in groups of consecutive blocks (see
//! `map_cache`), each slot known or not on its own: the rules above are per
//! slot.

use crate::key::{BlockKey, RecordMeta};
use crate::map_cache::{self, MapCache};
use crate::record_cache::{self, RecordCache};
use crate::state::Overlay;

pub(crate) struct EntryCache {
    blocks: Option<MapCache>,
    records: Option<RecordCache>,
}

impl EntryCache {
    /// Half of `bytes` for each kind; below 1 MiB the cache is off.
    pub fn new(bytes: u64) -> EntryCache {
        let records = (bytes / 2 / record_cache::ENTRY_BYTES) as usize;
        let groups = (bytes / 2 / map_cache::ENTRY_BYTES) as usize;
        if bytes < 1 << 20 || records == 0 || groups == 0 {
            return EntryCache {
                blocks: None,
                records: None,
            };
        }
        EntryCache {
            blocks: Some(MapCache::new(groups)),
            records: Some(RecordCache::new(records)),
        }
    }

    /// `Some(mapping)` if cached (the mapping itself may be "unmapped").
    pub fn block(&self, volume: u32, lba: u64) -> Option<Option<BlockKey>> {
        self.blocks.as_ref()?.get(volume, lba)
    }

    /// The cached mappings of blocks `lba0 + i` for each `i` in `at`:
    /// `found(i, mapping)` for each one cached.
    pub fn blocks(
        &self,
        volume: u32,
        lba0: u64,
        at: &[usize],
        found: impl FnMut(usize, Option<BlockKey>),
    ) {
        if let Some(c) = &self.blocks {
            c.get_many(volume, lba0, at, found);
        }
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
            c.set_many([(volume, lba, v)]);
        }
    }

    /// A committed overlay: its changes are now what the store holds.
    /// `blocks` are the overlay's block-map changes in key order (the
    /// commit sorts them for its batch), so that a group's blocks come
    /// one after another, while its slot is in the CPU cache.
    pub fn apply(&self, blocks: &[(&(u32, u64), &Option<BlockKey>)], ov: &Overlay) {
        if let Some(c) = &self.blocks {
            c.set_many(blocks.iter().map(|(&(v, lba), &k)| (v, lba, k)));
        }
        if let Some(c) = &self.records {
            // A dead record (`None`) is removed, not cached as absent: it is
            // looked up again only if its content is written again, and
            // caching its absence would push live records out under
            // overwrites (one dead per write). A record written to a block
            // that had no mapping starts on probation: a block overwritten
            // once is likely overwritten again, and its record is then
            // looked up, but a first write (a volume being filled, a bulk
            // copy) may well be the only one, and its records would take
            // the protected ways of the records of blocks that are
            // rewritten.
            c.update_many(ov.records.iter().map(|(&k, &v)| (k, v)), |k| {
                !ov.first_writes.contains(&k.fingerprint())
            });
        }
    }

    /// Approximate memory held.
    pub fn memory_bytes(&self) -> u64 {
        let (b, r) = self.len();
        b as u64 * map_cache::ENTRY_BYTES + r as u64 * record_cache::ENTRY_BYTES
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
