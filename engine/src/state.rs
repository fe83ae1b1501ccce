//! Uncommitted metadata: an overlay of block-map, record-index, segment-usage
//! and counter changes above the committed metadata store.
//!
//! Writes change only the overlay (in memory, under one short lock that is
//! never held across data I/O). A commit freezes the overlay, makes the data
//! it references durable, then writes it to the metadata store in one atomic
//! batch. Readers look in the live overlay, then the frozen one, then the store.

use crate::error::{EngineError, Result};
use crate::key::{BlockKey, RecordMeta, SegmentId};
use crate::meta::{CacheFill, Counters, Meta};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The overlay's big maps take a lookup or two per block written and read:
/// foldhash (seeded per process) instead of SipHash, which was 2.5% of
/// ballastd's CPU under 1 MiB writes.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Default)]
pub(crate) struct Overlay {
    pub blocks: FastMap<(u32, u64), Option<BlockKey>>,
    pub records: FastMap<BlockKey, Option<RecordMeta>>,
    /// Fingerprints of the keys written to blocks that had no mapping (a
    /// volume's first write of the block): their new records enter the
    /// entry cache on probation (see `EntryCache::apply`).
    pub first_writes: HashSet<u64, foldhash::fast::RandomState>,
    pub seg_live: HashMap<SegmentId, i64>,
    pub mapped: HashMap<u32, i64>,
    pub unique: i64,
    pub stored: i64,
    pub record_count: i64,
    /// Volumes whose record must be rewritten (data changed, created, resized).
    pub touched: HashSet<u32>,
    pub deleted_volumes: HashSet<u32>,
    pub nonces_used: bool,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
            && self.records.is_empty()
            && self.touched.is_empty()
            && self.deleted_volumes.is_empty()
            && !self.nonces_used
    }

    /// The block-map changes sorted by key (volume, then block).
    pub fn blocks_in_key_order(&self) -> Vec<(&(u32, u64), &Option<BlockKey>)> {
        let mut blocks: Vec<_> = self.blocks.iter().collect();
        blocks.sort_unstable_by_key(|(k, _)| **k);
        blocks
    }

    pub fn entries(&self) -> usize {
        self.blocks.len() + self.records.len()
    }
}

pub(crate) struct State {
    pub cur: Overlay,
    pub committing: Option<Arc<Overlay>>,
    pub committed: Counters,
    pub next_nonce: u64,
    pub late: LateWrites,
}

/// Writes whose effect lands after their call returned: a read-modify-write
/// of partial blocks (which may have to read the old blocks from disk) and
/// a retry after ENOSPC. Each is registered when it is called. A write that
/// takes effect within its call (full blocks, unmaps) supersedes, block by
/// block, every late write registered before it, and a late write leaves
/// its superseded blocks alone when it lands: an earlier partial write that
/// read the old block never undoes a later full-block write, whenever its
/// read happened. Late writes do not supersede one another: the volume's
/// read-modify-write lock runs them one at a time, each reading what the
/// previous one left.
#[derive(Default)]
pub(crate) struct LateWrites {
    next_id: u64,
    list: Vec<LateWrite>,
}

struct LateWrite {
    id: u64,
    volume: u32,
    first: u64,
    /// One flag per block from `first`.
    superseded: Vec<bool>,
}

impl LateWrites {
    /// A late write of blocks `[first, end)` of `volume`; returns its id.
    pub fn register(&mut self, volume: u32, first: u64, end: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.list.push(LateWrite {
            id,
            volume,
            first,
            superseded: vec![false; end.saturating_sub(first) as usize],
        });
        id
    }

    pub fn remove(&mut self, id: u64) {
        self.list.retain(|w| w.id != id);
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Blocks `[first, end)` of `volume` just took effect.
    pub fn supersede(&mut self, volume: u32, first: u64, end: u64) {
        for w in self.list.iter_mut().filter(|w| w.volume == volume) {
            let lo = first.max(w.first);
            let hi = end.min(w.first + w.superseded.len() as u64);
            for b in lo..hi {
                w.superseded[(b - w.first) as usize] = true;
            }
        }
    }

    /// The blocks of late write `id` that later writes superseded, if any.
    pub fn superseded(&self, id: u64) -> Option<&[bool]> {
        self.list
            .iter()
            .find(|w| w.id == id)
            .map(|w| &w.superseded[..])
            .filter(|s| s.contains(&true))
    }
}

/// Looks through the overlays to the store. Holds `&mut State`, so every
/// read-modify-write below is atomic with respect to other writers.
pub(crate) struct Txn<'a> {
    pub st: &'a mut State,
    pub meta: &'a Meta,
}

impl Txn<'_> {
    /// The mapping as changed since the last commit, if it was.
    fn block_in_overlays(&self, volume: u32, lba: u64) -> Option<Option<BlockKey>> {
        if let Some(v) = self.st.cur.blocks.get(&(volume, lba)) {
            return Some(*v);
        }
        self.st
            .committing
            .as_ref()
            .and_then(|c| c.blocks.get(&(volume, lba)).copied())
    }

    /// The record as changed since the last commit, if it was.
    fn record_in_overlays(&self, key: &BlockKey) -> Option<Option<RecordMeta>> {
        if let Some(v) = self.st.cur.records.get(key) {
            return Some(*v);
        }
        self.st
            .committing
            .as_ref()
            .and_then(|c| c.records.get(key).copied())
    }

    pub fn record(&self, key: &BlockKey) -> Result<Option<RecordMeta>> {
        if let Some(v) = self.record_in_overlays(key) {
            return Ok(v);
        }
        // Not filling the entry cache: every writer that looks a record up
        // then changes it in the live overlay (a reference taken or
        // dropped, a move), and the commit that lands the change caches the
        // new entry; a fill would be an insert that nobody reads.
        self.meta.record(key)
    }

    /// Add a freshly written record (no references yet).
    pub fn insert_record(&mut self, key: BlockKey, meta: RecordMeta) {
        let fp = meta.footprint() as i64;
        let cur = &mut self.st.cur;
        cur.records
            .insert(key, Some(RecordMeta { refs: 0, ..meta }));
        *cur.seg_live.entry(meta.segment).or_default() += fp;
        cur.unique += meta.raw_len as i64;
        cur.stored += fp;
        cur.record_count += 1;
    }

    /// Point a record that moved (cleaner) at its new place.
    pub fn relocate(&mut self, key: BlockKey, old: RecordMeta, to: SegmentId, offset: u32) {
        let fp = old.footprint() as i64;
        let cur = &mut self.st.cur;
        cur.records.insert(
            key,
            Some(RecordMeta {
                segment: to,
                offset,
                ..old
            }),
        );
        *cur.seg_live.entry(old.segment).or_default() -= fp;
        *cur.seg_live.entry(to).or_default() += fp;
    }

    fn incref(&mut self, key: &BlockKey) -> Result<()> {
        let mut m = self.record(key)?.ok_or_else(|| {
            EngineError::CorruptMeta(format!("reference to missing record {}", hex(&key.hash)))
        })?;
        m.refs = m.refs.checked_add(1).ok_or_else(|| {
            EngineError::FailedPrecondition("block referenced 4 billion times".into())
        })?;
        self.st.cur.records.insert(*key, Some(m));
        Ok(())
    }

    /// Drop a reference. `committed` holds records looked up beforehand in
    /// one batch (`committed_records`); the overlays still come first, as an
    /// earlier change of this transaction may have moved the count since.
    fn decref(&mut self, key: &BlockKey, committed: &FastMap<BlockKey, RecordMeta>) -> Result<()> {
        let found = match self.record_in_overlays(key) {
            Some(v) => v,
            None => match committed.get(key) {
                Some(m) => Some(*m),
                None => self.meta.referenced_record(key)?,
            },
        };
        let Some(mut m) = found else {
            return Err(EngineError::CorruptMeta(format!(
                "dropping a reference to missing record {}",
                hex(&key.hash)
            )));
        };
        m.refs = m.refs.saturating_sub(1);
        if m.refs == 0 {
            self.remove_record(key, &m);
        } else {
            self.st.cur.records.insert(*key, Some(m));
        }
        Ok(())
    }

    fn remove_record(&mut self, key: &BlockKey, m: &RecordMeta) {
        let cur = &mut self.st.cur;
        let fp = m.footprint() as i64;
        cur.records.insert(*key, None);
        *cur.seg_live.entry(m.segment).or_default() -= fp;
        cur.unique -= m.raw_len as i64;
        cur.stored -= fp;
        cur.record_count -= 1;
    }

    /// Undo `insert_record` for records nothing came to reference (a write
    /// attempt that gave up after storing them).
    pub fn remove_unreferenced(&mut self, keys: &[BlockKey]) {
        for k in keys {
            if let Some(Some(m)) = self.st.cur.records.get(k).copied() {
                if m.refs == 0 {
                    self.remove_record(k, &m);
                }
            }
        }
    }

    /// Map (or unmap, with `None`) one block. The new record must exist.
    pub fn set_block(&mut self, volume: u32, lba: u64, new: Option<BlockKey>) -> Result<()> {
        let old = match self.block_in_overlays(volume, lba) {
            Some(v) => v,
            None => self.meta.block_before_change(volume, lba, new)?,
        };
        if old == new {
            return Ok(());
        }
        if let Some(k) = &new {
            self.incref(k)?;
        }
        if let Some(k) = &old {
            self.decref(k, &FastMap::default())?;
        }
        let cur = &mut self.st.cur;
        cur.blocks.insert((volume, lba), new);
        let d = i64::from(new.is_some()) - i64::from(old.is_some());
        if d != 0 {
            *cur.mapped.entry(volume).or_default() += d;
        }
        cur.touched.insert(volume);
        Ok(())
    }

    /// Map a run of blocks at once. All new references are taken before any
    /// old one is dropped, so content that moves between blocks of the same
    /// batch never passes through a zero count.
    ///
    /// Returns how many of the blocks were mapped before (to the same
    /// content or another).
    pub fn set_blocks(
        &mut self,
        volume: u32,
        lba0: u64,
        keys: &[Option<BlockKey>],
    ) -> Result<usize> {
        let olds = self.old_mappings(volume, lba0, keys)?;
        let were_mapped = olds.iter().filter(|o| o.is_some()).count();
        let mut dropped = Vec::new();
        for (i, (new, old)) in keys.iter().zip(olds).enumerate() {
            let lba = lba0 + i as u64;
            if old == *new {
                continue;
            }
            if let Some(k) = new {
                self.incref(k)?;
            }
            let cur = &mut self.st.cur;
            match (old, new) {
                (Some(k), _) => dropped.push(k),
                (None, Some(k)) => {
                    cur.first_writes.insert(k.fingerprint());
                }
                (None, None) => {}
            }
            cur.blocks.insert((volume, lba), *new);
            let d = i64::from(new.is_some()) - i64::from(old.is_some());
            if d != 0 {
                *cur.mapped.entry(volume).or_default() += d;
            }
        }
        let committed = self.committed_records(&dropped)?;
        for k in &dropped {
            self.decref(k, &committed)?;
        }
        self.st.cur.touched.insert(volume);
        Ok(were_mapped)
    }

    /// The committed records of those `keys` that neither overlay changed,
    /// looked up as one batch: a run of overwrites drops a reference to each
    /// old block's record, and single lookups into the entry cache, one
    /// dependent memory miss after another, were 5% of ballastd's CPU under
    /// 1 MiB overwrites.
    fn committed_records(&self, keys: &[BlockKey]) -> Result<FastMap<BlockKey, RecordMeta>> {
        let mut out = FastMap::default();
        // One key: `decref` looks it up itself at the same cost, without
        // this map and list.
        if keys.len() < 2 {
            return Ok(out);
        }
        let ask: Vec<BlockKey> = keys
            .iter()
            .filter(|k| self.record_in_overlays(k).is_none())
            .copied()
            .collect();
        self.meta.referenced_records(&ask, |k, m| {
            out.insert(*k, m);
        })?;
        Ok(out)
    }

    /// Current mappings of the blocks from `lba0` that `new` is about to
    /// replace: overlays, then the committed entries (filling the entry
    /// cache with those `new` leaves as they are).
    fn old_mappings(
        &self,
        volume: u32,
        lba0: u64,
        new: &[Option<BlockKey>],
    ) -> Result<Vec<Option<BlockKey>>> {
        let mut out = vec![None; new.len()];
        let mut misses = Vec::new();
        for (i, slot) in out.iter_mut().enumerate() {
            match self.block_in_overlays(volume, lba0 + i as u64) {
                Some(v) => *slot = v,
                None => misses.push(i),
            }
        }
        self.meta
            .committed_blocks(volume, lba0, misses, &mut out, CacheFill::Unchanged(new))?;
        Ok(out)
    }

    pub fn take_nonces(&mut self, n: u64) -> u64 {
        let first = self.st.next_nonce;
        self.st.next_nonce += n;
        self.st.cur.nonces_used = true;
        first
    }

    /// Every mapped block of `volume` in `[start, end)`, overlays applied.
    pub fn mapped_range(&self, volume: u32, start: u64, end: u64) -> Result<Vec<(u64, BlockKey)>> {
        let mut m: std::collections::BTreeMap<u64, Option<BlockKey>> = self
            .meta
            .block_range(volume, start, end)?
            .into_iter()
            .map(|(l, k)| (l, Some(k)))
            .collect();
        let layers = self
            .st
            .committing
            .iter()
            .map(|c| &**c)
            .chain(std::iter::once(&self.st.cur));
        for ov in layers {
            for (&(v, lba), k) in &ov.blocks {
                if v == volume && lba >= start && lba < end {
                    m.insert(lba, *k);
                }
            }
        }
        Ok(m.into_iter()
            .filter_map(|(l, k)| k.map(|k| (l, k)))
            .collect())
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}
