//! A cache of decoded blocks, keyed by block identity.
//!
//! A block key names immutable content (blake3 + nonce), so an entry never
//! goes stale: no invalidation on overwrite, trim or cleaner moves is needed
//! for correctness. Commits still drop the blocks whose record died (see
//! `Inner::commit`), so overwrites recycle the cache's memory. Keys are
//! shared across volumes, so deduplicated content is cached once. Writes
//! populate it too (see `Volume::write_blocks`: large ones only while it has
//! room), which serves read-after-write from memory.
//!
//! **Runs.** A block is cached in a buffer of its own, or as one of the
//! consecutive blocks of a *run*: one buffer that several entries share
//! (see [`ReadCache::insert_run`]). A large read of blocks cached one by one
//! is one scattered piece of memory per block, and sending 256 scattered
//! 4 KiB pieces costs the reply writer far more than sending 16 contiguous
//! 64 KiB ones (docs/benchmarks.md, session 29); reads therefore re-cache
//! such blocks as runs.
//!
//! A run's buffer lives until its last entry leaves, while the cache counts
//! only the entries still in it: the bytes of the entries that left are
//! *stranded*, held but not counted. The cache keeps an exact total of them
//! and lowers its own capacity by it, so that counted plus stranded bytes
//! stay within the budget; evictions then free runs, which gives the room
//! back. A run with fewer than half its entries left is *sparse*: a reader
//! that finds one of its blocks re-caches the block alone (see `Hit`), so a
//! few hot blocks do not keep many cold ones' memory.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::key::BlockKey;
use crate::shard_cache::ShardCache;
use bytes::Bytes;
use quick_cache::Weighter;

/// One cached block: `len` bytes at `at` of `buf`.
struct Cached {
    buf: Bytes,
    at: u32,
    len: u32,
    /// Set for a block that is part of a run.
    run: Option<Member>,
}

/// A run entry's share in its run's bookkeeping. Not `Clone`: one exists
/// per entry in the cache, and its drop is that entry leaving.
struct Member(Arc<RunLife>);

struct RunLife {
    /// Entries of the run still in the cache.
    live: AtomicU32,
    blocks: u32,
    block_len: u32,
    stranded: Arc<AtomicU64>,
    /// The run's blocks, in order: what a whole-run lookup must match.
    keys: Box<[BlockKey]>,
    /// [`ReadCache::churn`] when the run's blocks were last looked up one
    /// by one ([`NEVER`]: not yet; see [`ReadCache::get_runs`]).
    touched_at: AtomicU64,
}

impl Drop for Member {
    fn drop(&mut self) {
        let r = &self.0;
        let left = r.live.fetch_sub(1, Ordering::AcqRel) - 1;
        let bl = u64::from(r.block_len);
        if left > 0 {
            r.stranded.fetch_add(bl, Ordering::AcqRel);
        } else {
            // The run's buffer goes with its last entry (once in-flight
            // replies are done with it): the others' bytes stop being held.
            r.stranded
                .fetch_sub(bl * u64::from(r.blocks - 1), Ordering::AcqRel);
        }
    }
}

/// What a lookup finds: the block is `buf[at..at + len]`.
pub(crate) struct Hit {
    pub buf: Bytes,
    pub at: u32,
    pub len: u32,
    pub kind: HitKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HitKind {
    /// In a buffer of its own.
    Alone,
    /// In a run.
    Run,
    /// In a run that has lost more than half its entries: worth re-caching
    /// alone, so that the run's memory can go.
    SparseRun,
}

/// Whether blocks are cached even if that evicts others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Blocks just read: they are wanted.
    Always,
    /// Blocks just written: only into free room (see [`ReadCache::admit`]).
    IfRoom,
}

#[derive(Clone)]
struct ByLen;

impl Weighter<BlockKey, Cached> for ByLen {
    fn weight(&self, _key: &BlockKey, val: &Cached) -> u64 {
        // Bookkeeping per entry is roughly a key plus a Bytes header; a
        // run member also shares its run's list of keys.
        let shared = if val.run.is_some() { KEY_LEN } else { 0 };
        u64::from(val.len) + 80 + shared
    }
}

const KEY_LEN: u64 = std::mem::size_of::<BlockKey>() as u64;

/// A run's blocks are looked up one by one again once the bytes cached
/// since the last time reach this share of the budget (see
/// [`ReadCache::get_runs`]).
const TOUCH_SHARE: u64 = 16;

/// [`RunLife::touched_at`] of a run whose blocks were never looked up.
const NEVER: u64 = u64::MAX;

pub(crate) struct ReadCache {
    cache: Option<ShardCache<BlockKey, Cached, ByLen>>,
    budget: u64,
    /// Bytes of runs whose entries left the cache while the run lives on.
    stranded: Arc<AtomicU64>,
    /// `stranded` when the capacity was last set from it.
    applied: AtomicU64,
    /// Bytes cached by inserts that may evict: how far eviction may have
    /// moved on.
    churn: AtomicU64,
}

impl ReadCache {
    pub fn new(bytes: u64) -> ReadCache {
        let cache =
            (bytes >= 1 << 20).then(|| ShardCache::new((bytes / 4096) as usize, bytes, ByLen));
        ReadCache {
            cache,
            budget: bytes,
            stranded: Arc::new(AtomicU64::new(0)),
            applied: AtomicU64::new(0),
            churn: AtomicU64::new(0),
        }
    }

    /// `found(i, hit)` for each `keys[i]` cached; one lock hold per shard.
    pub fn get_many(&self, keys: &[BlockKey], mut found: impl FnMut(usize, Hit)) {
        if let Some(c) = &self.cache {
            c.get_many_with(keys, |i, v| {
                let kind = match &v.run {
                    None => HitKind::Alone,
                    Some(m) if m.0.live.load(Ordering::Relaxed) * 2 < m.0.blocks => {
                        HitKind::SparseRun
                    }
                    Some(_) => HitKind::Run,
                };
                found(
                    i,
                    Hit {
                        buf: v.buf.clone(),
                        at: v.at,
                        len: v.len,
                        kind,
                    },
                )
            });
        }
    }

    /// Whole runs: for each `runs[i]`, a list of consecutive blocks of
    /// `block_len` bytes, `found(i, buf)` when one cached run holds exactly
    /// those blocks in that order, all of them still cached (block `j` is
    /// `buf[j * block_len..]`). One lookup per run instead of one per block
    /// (256 lookups of scattered memory per MiB read were an eighth of
    /// ballastd's CPU under 1 MiB reads).
    ///
    /// Such a lookup finds the run through its first block only, so the
    /// others are not marked as used, and a cache that must evict would
    /// take them first although they are read as often (the policy keeps a
    /// block that was used since eviction last passed it). So the first
    /// lookup of a run, and the first after the cache took in another
    /// [`TOUCH_SHARE`]th of its budget, find nothing, and the caller looks
    /// the blocks up one by one, which marks them all: a run read at least
    /// once per pass of eviction stays marked, and with nothing being
    /// evicted no lookup goes block by block. Marking every 8th lookup
    /// instead left runs read less often unmarked: 1 MiB reads, zipf 1.1,
    /// a cache a quarter of the data, read 17.4% of the bytes from disk,
    /// against 15.1% block by block and 15.5% with this rule
    /// (docs/benchmarks.md, session 31).
    pub fn get_runs(
        &self,
        runs: &[&[BlockKey]],
        block_len: usize,
        mut found: impl FnMut(usize, Bytes),
    ) {
        let Some(c) = &self.cache else { return };
        let firsts: Vec<BlockKey> = runs.iter().filter_map(|r| r.first().copied()).collect();
        if firsts.len() != runs.len() {
            return; // an empty run: nothing to look up by
        }
        c.get_many_with(&firsts, |i, v| {
            let Some(m) = &v.run else { return };
            let life = &m.0;
            // (`insert_run` made sure the buffer holds all its blocks.)
            let whole = v.at == 0
                && life.block_len as usize == block_len
                && *life.keys == *runs[i]
                && life.live.load(Ordering::Relaxed) == life.blocks;
            if !whole {
                return;
            }
            let now = self.churn.load(Ordering::Relaxed);
            let last = life.touched_at.load(Ordering::Relaxed);
            if last != NEVER && now.saturating_sub(last) < self.budget / TOUCH_SHARE {
                found(i, v.buf.clone());
            } else {
                life.touched_at.store(now, Ordering::Relaxed);
            }
        });
    }

    /// Cache each block (in a buffer of its own), grouped by shard.
    pub fn insert_many(&self, blocks: impl IntoIterator<Item = (BlockKey, Bytes)>) {
        if let Some(c) = &self.cache {
            let mut bytes = 0;
            c.update_many(blocks.into_iter().map(|(k, b)| {
                bytes += b.len() as u64;
                (k, Some(alone(b)))
            }));
            self.churn.fetch_add(bytes, Ordering::Relaxed);
            self.fit(c);
        }
    }

    /// Whether runs may be made now: not while stranded bytes take a
    /// quarter of the budget (reads would only strand more).
    pub fn runs_welcome(&self) -> bool {
        self.cache.is_some() && self.stranded.load(Ordering::Relaxed) < self.budget / 4
    }

    /// Cache `keys.len()` consecutive blocks of `block_len` bytes as one
    /// run: `keys[i]` is `run[i * block_len..]`.
    pub fn insert_run(&self, keys: &[BlockKey], run: Bytes, block_len: usize, how: Admit) {
        let Some(c) = &self.cache else { return };
        if keys.is_empty() || keys.len() * block_len > run.len() {
            return;
        }
        let life = Arc::new(RunLife {
            live: AtomicU32::new(keys.len() as u32),
            blocks: keys.len() as u32,
            block_len: block_len as u32,
            stranded: self.stranded.clone(),
            keys: keys.into(),
            touched_at: AtomicU64::new(NEVER),
        });
        let entries = keys.iter().enumerate().map(|(i, k)| {
            let v = Cached {
                buf: run.clone(),
                at: (i * block_len) as u32,
                len: block_len as u32,
                run: Some(Member(life.clone())),
            };
            (*k, v)
        });
        match how {
            Admit::IfRoom => c.insert_many_if_room(entries),
            Admit::Always => {
                c.update_many(entries.map(|(k, v)| (k, Some(v))));
                self.churn
                    .fetch_add((keys.len() * block_len) as u64, Ordering::Relaxed);
            }
        }
        self.fit(c);
    }

    /// Cache a written block only if that takes no eviction.
    pub fn admit(&self, key: BlockKey, block: Bytes) {
        if let Some(c) = &self.cache {
            c.insert_if_room(key, alone(block));
            self.fit(c);
        }
    }

    /// `admit` for each block, grouped by shard.
    pub fn admit_many(&self, blocks: impl IntoIterator<Item = (BlockKey, Bytes)>) {
        if let Some(c) = &self.cache {
            c.insert_many_if_room(blocks.into_iter().map(|(k, b)| (k, alone(b))));
            self.fit(c);
        }
    }

    /// Drop these blocks if cached (their records died).
    pub fn forget<'a>(&self, keys: impl Iterator<Item = &'a BlockKey>) {
        if let Some(c) = &self.cache {
            c.update_many(keys.map(|k| (*k, None)));
            self.fit(c);
        }
    }

    /// Lowers (or restores) the capacity by the stranded bytes, once they
    /// moved by more than a 64th of the budget since the last time, so that
    /// counted and stranded bytes together stay within the budget.
    fn fit(&self, c: &ShardCache<BlockKey, Cached, ByLen>) {
        let now = self.stranded.load(Ordering::Acquire);
        let was = self.applied.load(Ordering::Relaxed);
        if now.abs_diff(was) <= self.budget / 64 {
            return;
        }
        if self
            .applied
            .compare_exchange(was, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return; // another thread is fitting it
        }
        // Never below 1 MiB: a shard of capacity 0 would admit nothing.
        c.set_capacity(self.budget.saturating_sub(now).max(1 << 20));
    }

    /// Whether `bytes` more fit without evicting anything.
    pub fn has_room(&self, bytes: u64) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|c| c.weight() + bytes <= c.capacity())
    }

    /// Bytes currently counted (entries in the cache).
    pub fn weight(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.weight())
    }

    /// Bytes held by runs beyond what their entries count.
    pub fn stranded(&self) -> u64 {
        self.stranded.load(Ordering::Acquire)
    }
}

fn alone(b: Bytes) -> Cached {
    Cached {
        len: b.len() as u32,
        buf: b,
        at: 0,
        run: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> BlockKey {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&i.to_le_bytes());
        BlockKey::content(h)
    }

    fn lookup(c: &ReadCache, keys: &[BlockKey]) -> Vec<Option<(Vec<u8>, HitKind)>> {
        let mut out: Vec<Option<(Vec<u8>, HitKind)>> = (0..keys.len()).map(|_| None).collect();
        c.get_many(keys, |i, h| {
            out[i] = Some((
                h.buf[h.at as usize..(h.at + h.len) as usize].to_vec(),
                h.kind,
            ))
        });
        out
    }

    #[test]
    fn a_run_serves_each_block_and_strands_what_leaves() {
        let c = ReadCache::new(64 << 20);
        let keys: Vec<BlockKey> = (0..16).map(key).collect();
        let run: Vec<u8> = (0..16 * 4096).map(|i| (i / 4096) as u8).collect();
        c.insert_run(&keys, Bytes::from(run), 4096, Admit::Always);
        let got = lookup(&c, &keys);
        for (i, g) in got.iter().enumerate() {
            let (data, kind) = g.as_ref().expect("cached");
            assert!(data.iter().all(|&b| b == i as u8), "block {i}");
            assert_eq!(*kind, HitKind::Run);
        }
        assert_eq!(c.stranded(), 0);
        c.forget(keys[..9].iter());
        assert_eq!(c.stranded(), 9 * 4096);
        assert_eq!(
            lookup(&c, &keys[9..10])[0].as_ref().unwrap().1,
            HitKind::SparseRun
        );
        // Re-caching a block alone is one more entry leaving the run.
        c.insert_many([(keys[9], Bytes::from(vec![9u8; 4096]))]);
        assert_eq!(
            lookup(&c, &keys[9..10])[0].as_ref().unwrap().1,
            HitKind::Alone
        );
        assert_eq!(c.stranded(), 10 * 4096);
        // The last entry leaving frees the run: nothing stays stranded.
        c.forget(keys[10..].iter());
        assert_eq!(c.stranded(), 0);
        assert!(lookup(&c, &keys[..9]).iter().all(Option::is_none));
    }

    fn whole_runs(c: &ReadCache, runs: &[&[BlockKey]]) -> Vec<Option<Bytes>> {
        let mut out = vec![None; runs.len()];
        c.get_runs(runs, 4096, |i, b| out[i] = Some(b));
        out
    }

    #[test]
    fn whole_runs_are_found_only_as_cached() {
        let c = ReadCache::new(64 << 20);
        let a: Vec<BlockKey> = (0..16).map(key).collect();
        let b: Vec<BlockKey> = (100..116).map(key).collect();
        let run: Vec<u8> = (0..16 * 4096).map(|i| (i / 4096) as u8).collect();
        c.insert_run(&a, Bytes::from(run.clone()), 4096, Admit::Always);
        c.insert_run(&b, Bytes::from(run), 4096, Admit::Always);
        // The first lookup of a run goes block by block (see get_runs).
        assert!(whole_runs(&c, &[&a, &b]).iter().all(Option::is_none));
        let found = whole_runs(&c, &[&a, &b]);
        let buf = found[0].as_ref().expect("run a");
        for j in 0..16 {
            assert!(buf[j * 4096..(j + 1) * 4096].iter().all(|&x| x == j as u8));
        }
        assert!(found[1].is_some(), "run b");
        // Other blocks after the same first block, or fewer of them: no.
        let mut other = a.clone();
        other[7] = key(999);
        assert!(whole_runs(&c, &[&other, &a[..8]])
            .iter()
            .all(Option::is_none));
        // A block that left (or was cached again alone) spoils the run.
        c.forget(b[3..4].iter());
        assert!(whole_runs(&c, &[&b])[0].is_none());
        let mut other_size = [None];
        c.get_runs(&[&a], 8192, |i, b| other_size[i] = Some(b));
        assert!(other_size[0].is_none(), "blocks of another size");
        c.insert_many([(a[5], Bytes::from(vec![5u8; 4096]))]);
        assert!(whole_runs(&c, &[&a])[0].is_none());
    }

    #[test]
    fn runs_go_block_by_block_first_and_after_churn() {
        let budget = 64u64 << 20;
        let c = ReadCache::new(budget);
        let a: Vec<BlockKey> = (0..16).map(key).collect();
        c.insert_run(&a, Bytes::from(vec![1u8; 16 * 4096]), 4096, Admit::Always);
        let hits = || -> Vec<bool> {
            (0..20)
                .map(|_| whole_runs(&c, &[&a])[0].is_some())
                .collect()
        };
        // The first lookup only; nothing else came in since.
        let once: Vec<bool> = (0..20).map(|i| i != 0).collect();
        assert_eq!(hits(), once);
        // Other blocks for a share of the budget: once more block by block.
        let other = (1000u64..).take((budget / TOUCH_SHARE / 4096) as usize);
        c.insert_many(other.map(|i| (key(i), Bytes::from(vec![2u8; 4096]))));
        assert_eq!(hits(), once);
        assert!(hits().iter().all(|&h| h), "no churn since");
    }

    #[test]
    fn stranded_bytes_lower_the_capacity() {
        let budget = 16u64 << 20;
        let c = ReadCache::new(budget);
        let blocks = budget / 4096;
        // Runs for the whole budget, then all but one entry of each leave.
        for r in 0..blocks / 16 {
            let keys: Vec<BlockKey> = (r * 16..r * 16 + 16).map(key).collect();
            c.insert_run(
                &keys,
                Bytes::from(vec![r as u8; 16 * 4096]),
                4096,
                Admit::Always,
            );
        }
        let survivors: Vec<BlockKey> = (0..blocks / 16).map(|r| key(r * 16)).collect();
        let gone: Vec<BlockKey> = (0..blocks).filter(|i| i % 16 != 0).map(key).collect();
        c.forget(gone.iter());
        let held = c.weight() + c.stranded();
        assert!(c.stranded() > 0);
        // New blocks push the survivors (and their runs) out instead of
        // growing the memory held past the budget.
        for i in 0..blocks {
            c.insert_many([(key(1 << 40 | i), Bytes::from(vec![1u8; 4096]))]);
            let now = c.weight() + c.stranded();
            assert!(
                now <= budget + budget / 64 + 2 * 4096 * 80,
                "{now} bytes held after {i} inserts (budget {budget}, started at {held})"
            );
        }
        let left = lookup(&c, &survivors)
            .iter()
            .filter(|s| s.is_some())
            .count();
        assert!(left < survivors.len(), "no run was freed");
    }
}
