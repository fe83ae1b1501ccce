//! A cache of decoded blocks, keyed by block identity.
//!
//! A block key names immutable content (blake3 + nonce), so an entry never
//! goes stale: no invalidation on overwrite, trim or cleaner moves is needed
//! for correctness. Commits still drop the blocks whose record died (see
//! `Inner::commit`), so overwrites recycle the cache's memory. Keys are
//! shared across volumes, so deduplicated content is cached once. Writes
//! populate it too (see `Volume::write_blocks`: large ones only while it has
//! room), which serves read-after-write from memory.

use crate::key::BlockKey;
use crate::shard_cache::ShardCache;
use bytes::Bytes;
use quick_cache::Weighter;

#[derive(Clone)]
struct ByLen;

impl Weighter<BlockKey, Bytes> for ByLen {
    fn weight(&self, _key: &BlockKey, val: &Bytes) -> u64 {
        // Bookkeeping per entry is roughly a key plus a Bytes header.
        val.len() as u64 + 80
    }
}

pub(crate) struct ReadCache {
    cache: Option<ShardCache<BlockKey, Bytes, ByLen>>,
}

impl ReadCache {
    pub fn new(bytes: u64) -> ReadCache {
        let cache =
            (bytes >= 1 << 20).then(|| ShardCache::new((bytes / 4096) as usize, bytes, ByLen));
        ReadCache { cache }
    }

    /// `found(i, block)` for each `keys[i]` cached; one lock hold per shard.
    pub fn get_many(&self, keys: &[BlockKey], found: impl FnMut(usize, Bytes)) {
        if let Some(c) = &self.cache {
            c.get_many(keys, found);
        }
    }

    /// Cache each block, grouped by shard.
    pub fn insert_many(&self, blocks: impl IntoIterator<Item = (BlockKey, Bytes)>) {
        if let Some(c) = &self.cache {
            c.update_many(blocks.into_iter().map(|(k, b)| (k, Some(b))));
        }
    }

    /// Cache a written block only if that takes no eviction.
    pub fn admit(&self, key: BlockKey, block: Bytes) {
        if let Some(c) = &self.cache {
            c.insert_if_room(key, block);
        }
    }

    /// `admit` for each block, grouped by shard.
    pub fn admit_many(&self, blocks: impl IntoIterator<Item = (BlockKey, Bytes)>) {
        if let Some(c) = &self.cache {
            c.insert_many_if_room(blocks);
        }
    }

    /// Drop these blocks if cached (their records died).
    pub fn forget<'a>(&self, keys: impl Iterator<Item = &'a BlockKey>) {
        if let Some(c) = &self.cache {
            c.update_many(keys.map(|k| (*k, None)));
        }
    }

    /// Whether `bytes` more fit without evicting anything.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|c| c.weight() + bytes <= c.capacity())
    }

    /// Bytes currently held.
    pub fn weight(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.weight())
    }
}
