//! Which blocks may have a committed mapping: one bit per block, in chunks
//! allocated as regions of volumes get written.
//!
//! A write looks up the old mapping of every block it sets. Into a block
//! that was never written (a fresh volume, a new region of a thin one) that
//! lookup is a miss in the entry cache (a hash probe into a table far larger
//! than the CPU caches) and then in the store (every memtable skiplist and a
//! filter probe per table): 8–9% of the CPU of unique 4 KiB writes into a
//! fresh volume. This bitmap answers it in a few nanoseconds; a 2 GiB volume
//! of 4 KiB blocks is 64 KiB of bits.
//!
//! Invariant: while the filter is ready, every block with a committed
//! mapping in a tracked volume has its bit set. Commits set their blocks'
//! bits before their batch reaches the store (so the filter is never behind
//! it), the start-up scan covers what was there before, and bits are never
//! cleared while the volume is tracked (an unmapped block keeps a stale
//! "maybe", which costs only the lookup it would have cost anyway). Writers
//! and readers ask about a block only after finding it in neither overlay
//! under the state lock, and a commit drops its overlay under that lock
//! after setting the bits, so the lock orders the bits before the question.
//!
//! A volume can be untracked: every answer about it is "maybe", as before
//! this filter existed, and its bits are freed. Snapshots are (nobody writes
//! them), deleted volumes are, and so is every volume that needs a new chunk
//! once the filter's memory budget is spent: sparse random writes into huge
//! thin volumes could otherwise cost a chunk per block.

use crate::state::FastMap;
use parking_lot::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Blocks per chunk: 128 bytes of bits, a 4 MiB region at 4 KiB blocks.
const CHUNK_BLOCKS: u64 = 1024;
const WORDS: usize = (CHUNK_BLOCKS / 64) as usize;
/// A chunk's bits, its box header and its slot in the map (key, pointer,
/// control byte, load factor), as the budget counts it.
const CHUNK_COST: u64 = (WORDS * 8) as u64 + 48;

type Chunk = [AtomicU64; WORDS];
type Chunks = FastMap<u64, Box<Chunk>>;

enum VolumeBits {
    Tracked(Chunks),
    Untracked,
}

struct Bits {
    volumes: FastMap<u32, VolumeBits>,
    chunks: usize,
    /// The start-up scan has finished: "unmapped" answers are final.
    ready: bool,
}

/// What the filter can say about one volume's blocks.
enum View<'a> {
    /// Not ready, or the volume is untracked.
    AllMaybe,
    /// Ready, and nothing of this volume was ever committed.
    NoneMapped,
    Chunks(&'a Chunks),
}

impl Bits {
    fn view(&self, volume: u32) -> View<'_> {
        if !self.ready {
            return View::AllMaybe;
        }
        match self.volumes.get(&volume) {
            None => View::NoneMapped,
            Some(VolumeBits::Untracked) => View::AllMaybe,
            Some(VolumeBits::Tracked(m)) => View::Chunks(m),
        }
    }
}

pub(crate) struct BlockFilter {
    bits: RwLock<Bits>,
    max_chunks: usize,
}

fn chunk_of(lba: u64) -> (u64, usize, u64) {
    let i = lba % CHUNK_BLOCKS;
    (lba / CHUNK_BLOCKS, (i / 64) as usize, 1 << (i % 64))
}

impl BlockFilter {
    /// A filter that stops adding chunks past `budget_bytes`.
    pub fn with_budget(budget_bytes: u64) -> BlockFilter {
        BlockFilter {
            bits: RwLock::new(Bits {
                volumes: FastMap::default(),
                chunks: 0,
                ready: false,
            }),
            max_chunks: (budget_bytes / CHUNK_COST) as usize,
        }
    }

    /// Set the bits of these blocks (runs in one chunk share a map lookup).
    /// Chunks that do not exist yet are created under the write lock, once
    /// each, and their bits set afterwards under the read lock.
    pub fn insert(&self, blocks: impl IntoIterator<Item = (u32, u64)>) {
        let pending = self.set_existing(blocks);
        if pending.is_empty() {
            return;
        }
        let freed = self.add_chunks(&pending);
        drop(freed);
        // Every chunk of `pending` now exists unless its volume became
        // untracked, whose bits nobody reads.
        let left = self.set_existing(pending);
        debug_assert!(left.is_empty(), "chunks vanished from tracked volumes");
    }

    /// Set the bits whose chunk exists; return the blocks of tracked
    /// volumes whose chunk does not.
    fn set_existing(&self, blocks: impl IntoIterator<Item = (u32, u64)>) -> Vec<(u32, u64)> {
        let mut pending = Vec::new();
        let b = self.bits.read();
        let mut last: Option<(u32, u64, Option<&Chunk>)> = None;
        for (v, lba) in blocks {
            let (c, w, bit) = chunk_of(lba);
            let chunk = match last {
                Some((lv, lc, ch)) if (lv, lc) == (v, c) => ch,
                _ => {
                    let ch = match b.volumes.get(&v) {
                        Some(VolumeBits::Untracked) => {
                            last = None;
                            continue;
                        }
                        Some(VolumeBits::Tracked(m)) => m.get(&c).map(|ch| &**ch),
                        None => None,
                    };
                    last = Some((v, c, ch));
                    ch
                }
            };
            match chunk {
                Some(ch) => {
                    ch[w].fetch_or(bit, Ordering::Relaxed);
                }
                None => pending.push((v, lba)),
            }
        }
        pending
    }

    /// Create the chunks of `blocks`; a volume that would pass the budget
    /// becomes untracked. Returns what was freed, to drop after unlocking.
    fn add_chunks(&self, blocks: &[(u32, u64)]) -> Vec<Chunks> {
        let mut freed = Vec::new();
        let mut b = self.bits.write();
        let b = &mut *b;
        let mut last = None;
        for &(v, lba) in blocks {
            let c = lba / CHUNK_BLOCKS;
            if last == Some((v, c)) {
                continue;
            }
            last = Some((v, c));
            let full = b.chunks >= self.max_chunks;
            let vb = b
                .volumes
                .entry(v)
                .or_insert_with(|| VolumeBits::Tracked(FastMap::default()));
            let VolumeBits::Tracked(m) = vb else {
                continue;
            };
            if m.contains_key(&c) {
                continue;
            }
            if full {
                tracing::info!(
                    volume = v,
                    chunks = b.chunks,
                    "the mapped-block filter reached its memory budget: this volume's writes into \
                     unmapped blocks look their old mapping up in the cache and the store"
                );
                if let Some(m) = untrack(vb, &mut b.chunks) {
                    freed.push(m);
                }
                continue;
            }
            m.insert(c, Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
            b.chunks += 1;
        }
        freed
    }

    /// Every committed mapping is in: "unmapped" answers are final from now.
    pub fn mark_ready(&self) {
        self.bits.write().ready = true;
    }

    /// Keep in `at` only the blocks `lba0 + i` that may have a committed
    /// mapping; the others certainly have none. One lock hold for the run.
    pub fn retain_maybe_mapped(&self, volume: u32, lba0: u64, at: &mut Vec<usize>) {
        let b = self.bits.read();
        let chunks = match b.view(volume) {
            View::AllMaybe => return,
            View::NoneMapped => {
                at.clear();
                return;
            }
            View::Chunks(m) => m,
        };
        let mut last: Option<(u64, Option<&Chunk>)> = None;
        at.retain(|&i| {
            let (c, w, bit) = chunk_of(lba0 + i as u64);
            let chunk = match last {
                Some((lc, ch)) if lc == c => ch,
                _ => {
                    let ch = chunks.get(&c).map(|ch| &**ch);
                    last = Some((c, ch));
                    ch
                }
            };
            chunk.is_some_and(|ch| ch[w].load(Ordering::Relaxed) & bit != 0)
        });
    }

    /// `false` only when the block certainly has no committed mapping.
    pub fn may_be_mapped(&self, volume: u32, lba: u64) -> bool {
        let b = self.bits.read();
        match b.view(volume) {
            View::AllMaybe => true,
            View::NoneMapped => false,
            View::Chunks(m) => {
                let (c, w, bit) = chunk_of(lba);
                m.get(&c)
                    .is_some_and(|ch| ch[w].load(Ordering::Relaxed) & bit != 0)
            }
        }
    }

    /// Answer "maybe" for this volume from now on and free its bits: a
    /// snapshot (never written) or a deleted volume (ids are never reused,
    /// and a start-up scan racing the delete must not bring its bits back).
    pub fn untrack(&self, volume: u32) {
        let freed = {
            let mut b = self.bits.write();
            let b = &mut *b;
            let vb = b.volumes.entry(volume).or_insert(VolumeBits::Untracked);
            untrack(vb, &mut b.chunks)
        };
        drop(freed);
    }

    pub fn memory_bytes(&self) -> u64 {
        self.bits.read().chunks as u64 * CHUNK_COST
    }
}

/// Turn `vb` untracked; returns its chunks (to drop outside the lock).
fn untrack(vb: &mut VolumeBits, count: &mut usize) -> Option<Chunks> {
    match std::mem::replace(vb, VolumeBits::Untracked) {
        VolumeBits::Tracked(m) => {
            *count -= m.len();
            Some(m)
        }
        VolumeBits::Untracked => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maybe(f: &BlockFilter, volume: u32, lba0: u64, n: usize) -> Vec<usize> {
        let mut at: Vec<usize> = (0..n).collect();
        f.retain_maybe_mapped(volume, lba0, &mut at);
        at
    }

    #[test]
    fn answers_maybe_until_ready_then_exactly() {
        let f = BlockFilter::with_budget(1 << 20);
        assert_eq!(maybe(&f, 1, 0, 3), vec![0, 1, 2], "loading: all maybe");
        assert!(f.may_be_mapped(9, 1));
        f.insert([(1, 1), (1, 5000), (2, 0)]);
        f.mark_ready();
        assert_eq!(maybe(&f, 1, 0, 3), vec![1]);
        assert!(f.may_be_mapped(1, 1) && !f.may_be_mapped(1, 2) && !f.may_be_mapped(9, 1));
        assert_eq!(maybe(&f, 1, 4999, 3), vec![1]);
        assert_eq!(maybe(&f, 2, 0, 2), vec![0]);
        assert!(maybe(&f, 3, 0, 2000).is_empty(), "unknown volume");
        // Runs across a chunk boundary, in any order.
        f.insert((1020..1030).rev().map(|l| (1, l)));
        assert_eq!(maybe(&f, 1, 1018, 14), (2..12).collect::<Vec<_>>());
        assert_eq!(f.memory_bytes(), 4 * CHUNK_COST);
    }

    #[test]
    fn untracked_volumes_answer_maybe_and_free_their_bits() {
        let f = BlockFilter::with_budget(1 << 20);
        f.mark_ready();
        f.insert([(7, 3), (8, 3)]);
        f.untrack(7);
        assert_eq!(f.memory_bytes(), CHUNK_COST);
        assert_eq!(maybe(&f, 7, 0, 5), (0..5).collect::<Vec<_>>());
        f.insert([(7, 3000)]);
        assert_eq!(f.memory_bytes(), CHUNK_COST, "untracked stays untracked");
        assert_eq!(maybe(&f, 8, 2, 3), vec![1]);
        // Untracked before anything was written (a snapshot).
        f.untrack(9);
        assert!(f.may_be_mapped(9, 0));
    }

    #[test]
    fn past_the_budget_new_volumes_are_untracked_and_old_ones_stay_exact() {
        let f = BlockFilter::with_budget(4 * CHUNK_COST);
        f.mark_ready();
        f.insert((0..4).map(|c| (1, c * CHUNK_BLOCKS)));
        assert!(maybe(&f, 1, 1, 1).is_empty());
        f.insert([(2, 0), (1, 0)]);
        assert_eq!(maybe(&f, 2, 1, 2), vec![0, 1], "over budget: maybe");
        assert_eq!(maybe(&f, 1, 0, 2), vec![0], "volume 1 still exact");
        // A volume that needs one more chunk is untracked as a whole.
        f.insert([(1, 9 * CHUNK_BLOCKS)]);
        assert_eq!(maybe(&f, 1, 1, 2), vec![0, 1]);
        assert_eq!(f.memory_bytes(), 0);
        f.insert([(3, 0)]);
        assert_eq!(maybe(&f, 3, 0, 2), vec![0], "room again for a new volume");
    }

    #[test]
    fn concurrent_inserts_and_lookups_never_lose_a_bit() {
        let f = std::sync::Arc::new(BlockFilter::with_budget(64 << 20));
        f.mark_ready();
        let writers: Vec<_> = (0..2u32)
            .map(|t| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let lba = i.wrapping_mul(7919) % 4_000_000;
                        f.insert([(t, lba)]);
                        assert!(f.may_be_mapped(t, lba), "{t}/{lba} lost");
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        for t in 0..2u32 {
            for i in 0..20_000u64 {
                assert!(f.may_be_mapped(t, i.wrapping_mul(7919) % 4_000_000));
            }
        }
    }
}
