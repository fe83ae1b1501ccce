//! The metadata store: fjall keyspaces and the persisted forms of pool,
//! volume and counter records. Every change reaches fjall through one atomic
//! batch per commit (see `commit`), never piecemeal.

use crate::block_filter::BlockFilter;
use crate::config::Compression;
use crate::entry_cache::EntryCache;
use crate::error::{EngineError, Result};
use crate::key::{BlockKey, RecordMeta, SegmentId};
use crate::record_filter::RecordFilter;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use std::path::Path;

pub(crate) struct Meta {
    pub db: Database,
    /// volume id (u32 BE) -> VolumeRecord (JSON)
    pub volumes: Keyspace,
    /// map_key(volume, lba) -> BlockKey
    pub blocks: Keyspace,
    /// BlockKey -> RecordMeta
    pub records: Keyspace,
    /// SegmentId -> SegmentRecord
    pub segments: Keyspace,
    /// "pool", "counters" -> JSON
    pub misc: Keyspace,
    /// Answers most record-index misses from memory; installed once the
    /// pool's capacity is known (see `record_filter`).
    pub record_filter: Option<RecordFilter>,
    /// Answers "never mapped" for blocks of the block map from memory;
    /// installed with the record filter (see `block_filter`).
    pub block_filter: Option<BlockFilter>,
    /// Decoded committed entries in front of `blocks` and `records`.
    pub entries: EntryCache,
}

/// Whether a store read may fill the entry cache: only for writers holding
/// the state lock, for keys in neither overlay (see `entry_cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheFill<'a> {
    /// Only where the committed mapping equals the caller's new one, at the
    /// same index: a writer about to change a mapping puts the new one in
    /// the live overlay, and the commit that lands it puts it in the cache,
    /// so filling the old one would only cost an insert (and an eviction).
    Unchanged(&'a [Option<BlockKey>]),
    Never,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DiskRecord {
    pub disk_id: u32,
    pub path: std::path::PathBuf,
    pub size: u64,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PoolRecord {
    pub pool_id: [u8; 16],
    pub node_id: [u8; 16],
    pub segment_size: u32,
    pub disks: Vec<DiskRecord>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VolumeRecord {
    pub id: u32,
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub dedup: bool,
    pub compression: Compression,
    pub read_only: bool,
    pub parent: Option<String>,
    pub created_unix: u64,
    pub generation: u64,
    pub mapped_blocks: u64,
}

/// Node-wide totals kept exact across commits.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Sum of raw lengths of live records.
    pub unique_bytes: u64,
    /// Sum of on-disk footprints (header + payload) of live records.
    pub stored_bytes: u64,
    pub records: u64,
    pub next_nonce: u64,
    pub next_volume_id: u32,
}

/// Persisted per-segment usage. Free segments have no entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentRecord {
    pub live_bytes: u64,
    pub written_bytes: u32,
}

impl SegmentRecord {
    pub fn encode(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&self.live_bytes.to_le_bytes());
        b[8..].copy_from_slice(&self.written_bytes.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<SegmentRecord> {
        if b.len() != 12 {
            return None;
        }
        Some(SegmentRecord {
            live_bytes: u64::from_le_bytes(b[..8].try_into().ok()?),
            written_bytes: u32::from_le_bytes(b[8..].try_into().ok()?),
        })
    }
}

/// Level-0 tables of the block map and record index that start a merge into
/// level 1 (see `Meta::open`).
const L0_MERGE_TABLES: u8 = 16;
/// fjall slows writers down at this many level-0 runs (and stops them at
/// 30): a merge threshold at or above it would leave writers waiting on a
/// merge that never starts (a threshold of 32 hung write_cpu for good).
const FJALL_L0_STALL: u8 = 20;
/// Sealed memtables at which fjall stops writers: at most this many flushes
/// can queue ahead of a merge on fjall's one worker, so the threshold
/// leaves room for them and merges start before writers are slowed.
const FJALL_MAX_SEALED_MEMTABLES: u8 = 4;
const _: () = assert!(L0_MERGE_TABLES + FJALL_MAX_SEALED_MEMTABLES <= FJALL_L0_STALL);

impl Meta {
    pub fn open(dir: &Path, cache_bytes: u64, entry_cache_bytes: u64) -> Result<Meta> {
        std::fs::create_dir_all(dir).map_err(|e| {
            EngineError::io(format!("creating metadata folder {}", dir.display()), e)
        })?;
        let db = Database::builder(dir)
            .cache_size(cache_bytes)
            .manual_journal_persist(true)
            .max_journaling_size(256 << 20)
            // One background worker for flushes and compactions. With more,
            // fjall's worker 0 hands every compaction request it receives back
            // to the queue (to stay free for flushes) and, while the other
            // workers are busy compacting, keeps receiving and re-sending
            // them: a spinning thread, 9% of all CPU under random writes on
            // two cores. write_cpu, 40 s of overwrites: 76.5 k writes/s and
            // 53.6 k per CPU-second with one worker, 65.6 k and 44.7 k with
            // two (fjall's default here); sustained, no write stalls.
            .worker_threads(1)
            .open()
            .map_err(|e| {
                EngineError::Meta(format!("opening metadata store {}: {e}", dir.display()))
            })?;
        let ks = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        // The block map and record index take a point lookup on every block
        // written: small memtables keep their skiplists shallow, and hash
        // indexes in data blocks make point reads of tables cheaper. No
        // filter or index block is pinned in memory: fjall pins those of its
        // first levels by default, and they grow with the data (memory_scale
        // to 96 GiB: resident memory rose 1.3-1.6 MiB per GiB of unique data
        // with fjall's defaults and with L0-only pinning, 0.3 without). They
        // go through the bounded block cache like data blocks; the price is
        // slower store misses (unmapped blocks of a fresh volume: ~15% fewer
        // writes per CPU-second there).
        //
        // Level 0 is merged into level 1 at `L0_MERGE_TABLES` (16) tables
        // instead of fjall's 4: random keys overlap all of level 1, so each
        // merge rewrites it, and those rewrites are most of the background
        // worker's time under random writes. 4 -> 8 (session 13): worker
        // 4.3 -> 3.4 s per 12 s of overwrites, fresh volume 95.5 -> 100.6 k
        // and overwrites 83.0 -> 85.7 k writes per CPU-second. 8 -> 16
        // (session 21, write_cpu 2 8 twice in turns): worker 2.9 -> 2.0 s
        // (cached overwrites), 3.5 -> 2.7 s (fresh), 4.1 -> 3.6 s (cold
        // overwrites) per phase; cached 120-125 -> 124-132 k, fresh 132-134
        // -> 137-142 k, cold 89-98 -> 92-101 k. Point reads probe up to 16
        // level-0 tables, each with its own filter; since the record and
        // block filters answer most misses before the store, that costs
        // less than the merges did. It stays below fjall's write stall (see
        // `FJALL_L0_STALL`). fjall keeps a keyspace's settings from its
        // creation: pools created before this keep what they had.
        let hot = |name: &str| {
            db.keyspace(name, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(8 << 20)
                    .compaction_strategy(std::sync::Arc::new(
                        fjall::compaction::Leveled::default().with_l0_threshold(L0_MERGE_TABLES),
                    ))
                    .data_block_hash_ratio_policy(fjall::config::HashRatioPolicy::all(0.75))
                    .filter_block_pinning_policy(fjall::config::PinningPolicy::disabled())
                    .index_block_pinning_policy(fjall::config::PinningPolicy::disabled())
            })
        };
        Ok(Meta {
            volumes: ks("volumes")?,
            blocks: hot("blocks")?,
            records: hot("records")?,
            segments: ks("segments")?,
            misc: ks("misc")?,
            record_filter: None,
            block_filter: None,
            entries: EntryCache::new(entry_cache_bytes),
            db,
        })
    }

    pub fn persist(&self) -> Result<()> {
        Meta::persist_db(&self.db)
    }

    /// Makes fjall's journal durable; for callers that hold only a clone of
    /// the database (the commit, on a blocking thread).
    pub fn persist_db(db: &Database) -> Result<()> {
        db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    pub fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.misc.get(key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| EngineError::CorruptMeta(format!("{key}: {e}"))),
        }
    }

    /// The committed mapping of one block that the caller is about to set to
    /// `new` (entry cache, then store): only for callers that hold the state
    /// lock and found the key in neither overlay. A store read fills the
    /// entry cache as `CacheFill::Unchanged` says.
    pub fn block_before_change(
        &self,
        volume: u32,
        lba: u64,
        new: Option<BlockKey>,
    ) -> Result<Option<BlockKey>> {
        if self.filter_rules_out_block(volume, lba) {
            return Ok(None);
        }
        if let Some(v) = self.entries.block(volume, lba) {
            return Ok(v);
        }
        let v = self.block_from_store(volume, lba)?;
        self.fill_block_if_unchanged(volume, lba, v, new);
        Ok(v)
    }

    /// Cache a committed mapping read from the store, unless the caller is
    /// about to replace it (see `CacheFill::Unchanged`).
    fn fill_block_if_unchanged(
        &self,
        volume: u32,
        lba: u64,
        committed: Option<BlockKey>,
        new: Option<BlockKey>,
    ) {
        if committed == new {
            self.entries.fill_block(volume, lba, committed);
        }
    }

    /// Whether the block filter says the block certainly has no committed
    /// mapping.
    fn filter_rules_out_block(&self, volume: u32, lba: u64) -> bool {
        self.block_filter
            .as_ref()
            .is_some_and(|f| !f.may_be_mapped(volume, lba))
    }

    /// The committed mappings of blocks `lba0 + i`, for each `i` in
    /// `misses`, into `out[i]` (which the caller set to `None`): the block
    /// filter, the entry cache, then the store — one range scan
    /// once more than four miss (a 1 MiB write is 256 blocks), else point
    /// reads. `fill` says whether store reads may fill the entry cache (see
    /// `entry_cache` for who may).
    pub fn committed_blocks(
        &self,
        volume: u32,
        lba0: u64,
        mut misses: Vec<usize>,
        out: &mut [Option<BlockKey>],
        fill: CacheFill<'_>,
    ) -> Result<()> {
        if let Some(f) = &self.block_filter {
            f.retain_maybe_mapped(volume, lba0, &mut misses);
        }
        let mut cached = vec![false; out.len()];
        self.entries.blocks(volume, lba0, &misses, |i, v| {
            out[i] = v;
            cached[i] = true;
        });
        let rest: Vec<usize> = misses.iter().copied().filter(|&i| !cached[i]).collect();
        let found: Option<std::collections::HashMap<u64, BlockKey>> = match rest[..] {
            [first, .., last] if rest.len() > 4 => Some(
                self.block_range(volume, lba0 + first as u64, lba0 + last as u64 + 1)?
                    .into_iter()
                    .collect(),
            ),
            _ => None,
        };
        for i in rest {
            let lba = lba0 + i as u64;
            let v = match &found {
                Some(f) => f.get(&lba).copied(),
                None => self.block_from_store(volume, lba)?,
            };
            if let CacheFill::Unchanged(new) = fill {
                self.fill_block_if_unchanged(volume, lba, v, new[i]);
            }
            out[i] = v;
        }
        Ok(())
    }

    fn block_from_store(&self, volume: u32, lba: u64) -> Result<Option<BlockKey>> {
        match self.blocks.get(crate::key::map_key(volume, lba))? {
            None => Ok(None),
            Some(v) => BlockKey::decode(&v)
                .map(Some)
                .ok_or_else(|| EngineError::CorruptMeta(format!("block map entry {volume}/{lba}"))),
        }
    }

    /// The committed record-index entry of `key` (filter, entry cache, store).
    pub fn record(&self, key: &BlockKey) -> Result<Option<RecordMeta>> {
        if self.filter_rules_out(key) {
            return Ok(None);
        }
        self.referenced_record(key)
    }

    /// The committed record of a key that committed block-map entries
    /// reference (entry cache, store): the record filter, which could only
    /// answer "maybe", is not asked.
    pub fn referenced_record(&self, key: &BlockKey) -> Result<Option<RecordMeta>> {
        match self.entries.record(key) {
            Some(m) => Ok(Some(m)),
            None => self.record_from_store(key),
        }
    }

    /// `referenced_record` for many keys in one batch: `found(key, record)`
    /// for each that has a committed record.
    pub fn referenced_records(
        &self,
        keys: &[BlockKey],
        mut found: impl FnMut(&BlockKey, RecordMeta),
    ) -> Result<()> {
        let mut cached = vec![false; keys.len()];
        self.entries.records(keys, |i, m| {
            cached[i] = true;
            found(&keys[i], m);
        });
        for (k, _) in keys.iter().zip(cached).filter(|(_, c)| !c) {
            if let Some(m) = self.record_from_store(k)? {
                found(k, m);
            }
        }
        Ok(())
    }

    /// Whether the record filter says `key` is certainly not committed.
    /// Asked before the entry cache: new content (nearly every unique block
    /// written) is a filter "no" in tens of nanoseconds, where the cache's
    /// miss is a hash probe into a table far larger than the CPU caches
    /// (4% of ballastd's CPU under 1 MiB NBD writes). The cache never holds
    /// a record the filter lacks: records enter it only from a commit, after
    /// the commit's keys entered the filter, and `record_filter` keeps every
    /// committed key once ready.
    fn filter_rules_out(&self, key: &BlockKey) -> bool {
        self.record_filter
            .as_ref()
            .is_some_and(|f| !f.may_contain(key))
    }

    fn record_from_store(&self, key: &BlockKey) -> Result<Option<RecordMeta>> {
        match self.records.get(key.encode())? {
            None => Ok(None),
            Some(v) => RecordMeta::decode(&v)
                .map(Some)
                .ok_or_else(|| EngineError::CorruptMeta("record index entry".into())),
        }
    }

    /// Committed block-map entries of `volume` in `[lba_start, lba_end)`.
    pub fn block_range(
        &self,
        volume: u32,
        lba_start: u64,
        lba_end: u64,
    ) -> Result<Vec<(u64, BlockKey)>> {
        let mut out = Vec::new();
        let lo = crate::key::map_key(volume, lba_start);
        let hi = crate::key::map_key(volume, lba_end);
        for kv in self.blocks.range(lo..hi) {
            let (k, v) = kv.into_inner()?;
            let (_, lba) = crate::key::decode_map_key(&k)
                .ok_or_else(|| EngineError::CorruptMeta("block map key".into()))?;
            let key = BlockKey::decode(&v)
                .ok_or_else(|| EngineError::CorruptMeta("block map value".into()))?;
            out.push((lba, key));
        }
        Ok(out)
    }

    /// Put every key of the record index into `filter`, then mark it ready;
    /// returns how many. `None` when `stop` said to give up (the filter is
    /// left not ready: every answer "maybe").
    pub fn fill_record_filter(
        &self,
        filter: &RecordFilter,
        stop: impl Fn() -> bool,
    ) -> Result<Option<u64>> {
        let n = Meta::scan_keys(&self.records, stop, |k| {
            let key = BlockKey::decode(k)
                .ok_or_else(|| EngineError::CorruptMeta("record index key".into()))?;
            filter.insert(&key);
            Ok(())
        })?;
        if n.is_some() {
            filter.mark_ready();
        }
        Ok(n)
    }

    /// Set the bit of every block the block map holds, then mark the
    /// filter ready; as `fill_record_filter` otherwise.
    pub fn fill_block_filter(
        &self,
        filter: &BlockFilter,
        stop: impl Fn() -> bool,
    ) -> Result<Option<u64>> {
        let mut run: Vec<(u32, u64)> = Vec::with_capacity(4096);
        let n = Meta::scan_keys(&self.blocks, stop, |k| {
            run.push(
                crate::key::decode_map_key(k)
                    .ok_or_else(|| EngineError::CorruptMeta("block map key".into()))?,
            );
            if run.len() == run.capacity() {
                filter.insert(run.drain(..));
            }
            Ok(())
        })?;
        if n.is_some() {
            filter.insert(run);
            filter.mark_ready();
        }
        Ok(n)
    }

    /// `each` key of `ks` in order; how many, or `None` once `stop` (asked
    /// every 64 Ki keys) says to give up.
    fn scan_keys(
        ks: &Keyspace,
        stop: impl Fn() -> bool,
        mut each: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<Option<u64>> {
        let mut n = 0u64;
        for kv in ks.iter() {
            if n.is_multiple_of(65536) && stop() {
                return Ok(None);
            }
            each(&kv.key()?)?;
            n += 1;
        }
        Ok(Some(n))
    }

    pub fn load_segments(&self) -> Result<Vec<(SegmentId, SegmentRecord)>> {
        let mut out = Vec::new();
        for kv in self.segments.iter() {
            let (k, v) = kv.into_inner()?;
            let id = SegmentId::decode(&k)
                .ok_or_else(|| EngineError::CorruptMeta("segment key".into()))?;
            let rec = SegmentRecord::decode(&v)
                .ok_or_else(|| EngineError::CorruptMeta("segment value".into()))?;
            out.push((id, rec));
        }
        Ok(out)
    }

    pub fn load_volumes(&self) -> Result<Vec<VolumeRecord>> {
        let mut out = Vec::new();
        for kv in self.volumes.iter() {
            let (_, v) = kv.into_inner()?;
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|e| EngineError::CorruptMeta(format!("volume record: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Bytes of the block cache in use and of memtables not yet flushed.
    pub fn memory(&self) -> (u64, u64) {
        (self.db.cache_size(), self.db.write_buffer_size())
    }

    pub fn disk_space(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }
}
