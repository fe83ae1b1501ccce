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

use crate::key::{BlockKey, RecordMeta};
use crate::shard_cache::ShardCache;
use crate::state::Overlay;
use quick_cache::UnitWeighter;

/// Bytes one cached entry costs: key, value and the cache's bookkeeping
/// (measured with `memory_scale`: resident memory rose ~1.8x the 96 bytes
/// of keys and values a first estimate counted).
const ENTRY_BYTES: u64 = 160;

pub(crate) struct EntryCache {
    blocks: Option<ShardCache<(u32, u64), Option<BlockKey>, UnitWeighter>>,
    records: Option<ShardCache<BlockKey, Option<RecordMeta>, UnitWeighter>>,
}

impl EntryCache {
    /// Half of `bytes` for each kind; below 1 MiB the cache is off.
    pub fn new(bytes: u64) -> EntryCache {
        let per_kind = (bytes / 2 / ENTRY_BYTES) as usize;
        if bytes < 1 << 20 || per_kind == 0 {
            return EntryCache {
                blocks: None,
                records: None,
            };
        }
        EntryCache {
            blocks: Some(ShardCache::new(per_kind, per_kind as u64, UnitWeighter)),
            records: Some(ShardCache::new(per_kind, per_kind as u64, UnitWeighter)),
        }
    }

    /// `Some(mapping)` if cached (the mapping itself may be "unmapped").
    pub fn block(&self, volume: u32, lba: u64) -> Option<Option<BlockKey>> {
        self.blocks.as_ref()?.get(&(volume, lba))
    }

    /// The cached mappings of blocks `lba0 + i` for each `i` in `at`:
    /// `found(i, mapping)` for each one cached. One lock hold per shard.
    pub fn blocks(
        &self,
        volume: u32,
        lba0: u64,
        at: &[usize],
        mut found: impl FnMut(usize, Option<BlockKey>),
    ) {
        let Some(c) = &self.blocks else { return };
        let keys: Vec<(u32, u64)> = at.iter().map(|&i| (volume, lba0 + i as u64)).collect();
        c.get_many(&keys, |j, v| found(at[j], v));
    }

    pub fn record(&self, key: &BlockKey) -> Option<Option<RecordMeta>> {
        self.records.as_ref()?.get(key)
    }

    /// `found(i, record)` for each `keys[i]` cached; one lock hold per shard.
    pub fn records(&self, keys: &[BlockKey], found: impl FnMut(usize, Option<RecordMeta>)) {
        if let Some(c) = &self.records {
            c.get_many(keys, found);
        }
    }

    /// Fill after a store read; see the module comment for who may.
    pub fn fill_block(&self, volume: u32, lba: u64, v: Option<BlockKey>) {
        if let Some(c) = &self.blocks {
            c.insert((volume, lba), v);
        }
    }

    /// A committed overlay: its changes are now what the store holds.
    pub fn apply(&self, ov: &Overlay) {
        if let Some(c) = &self.blocks {
            c.update_many(ov.blocks.iter().map(|(&k, &v)| (k, Some(v))));
        }
        if let Some(c) = &self.records {
            // A dead record (`None`) is removed, not cached as absent: it is
            // looked up again only if its content is written again, and
            // caching its absence would push live records out under
            // overwrites (one dead per write).
            c.update_many(ov.records.iter().map(|(&k, &v)| (k, v.map(Some))));
        }
    }

    /// Approximate memory held.
    pub fn memory_bytes(&self) -> u64 {
        let (b, r) = self.len();
        (b + r) as u64 * ENTRY_BYTES
    }

    /// Entries held (blocks, records).
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
        c.apply(&first);
        assert_eq!(c.block(1, 7), Some(Some(key(1))));
        assert_eq!(c.block(1, 8), Some(None));
        assert_eq!(c.block(1, 9), None, "never seen: not cached");

        let mut ov = Overlay::default();
        ov.blocks.insert((1, 7), None);
        ov.blocks.insert((1, 8), Some(key(2)));
        ov.records.insert(key(1), None);
        ov.records.insert(key(2), Some(meta(1)));
        c.apply(&ov);
        assert_eq!(c.block(1, 7), Some(None));
        assert_eq!(c.block(1, 8), Some(Some(key(2))));
        assert_eq!(c.record(&key(1)), None, "dead records are dropped");
        assert_eq!(c.record(&key(2)), Some(Some(meta(1))));
        assert_eq!(c.len(), (2, 1));
    }

    #[test]
    fn tiny_budget_disables_the_cache() {
        let c = EntryCache::new(1000);
        c.fill_block(1, 1, Some(key(1)));
        assert_eq!(c.block(1, 1), None);
        assert_eq!(c.len(), (0, 0));
    }
}
