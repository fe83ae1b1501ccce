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
//! mapping has its bit set. Commits set their blocks' bits before their
//! batch reaches the store (so the filter is never behind it), the start-up
//! scan covers what was there before, and bits are never cleared while the
//! volume lives (an unmapped block keeps a stale "maybe", which costs only
//! the lookup it would have cost anyway). Writers and readers ask about a
//! block only after finding it in neither overlay under the state lock, and
//! a commit drops its overlay under that lock after setting the bits, so the
//! lock orders the bits before the question.
//!
//! Memory is bounded: past its budget the filter turns itself off for good
//! (every answer "maybe", as before it existed) rather than grow with
//! sparse random writes into huge thin volumes, where each mapped block
//! could cost a chunk.

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The start-up scan has not finished: every answer is "maybe".
    Loading,
    Ready,
    /// Over budget: every answer is "maybe" until the next start.
    Off,
}

struct Bits {
    chunks: FastMap<(u32, u64), Box<Chunk>>,
    phase: Phase,
}

pub(crate) struct BlockFilter {
    bits: RwLock<Bits>,
    max_chunks: usize,
}

fn chunk_of(lba: u64) -> (u64, usize, u64) {
    let c = lba / CHUNK_BLOCKS;
    let i = lba % CHUNK_BLOCKS;
    (c, (i / 64) as usize, 1 << (i % 64))
}

impl BlockFilter {
    /// A filter that gives up past `budget_bytes`.
    pub fn with_budget(budget_bytes: u64) -> BlockFilter {
        BlockFilter {
            bits: RwLock::new(Bits {
                chunks: FastMap::default(),
                phase: Phase::Loading,
            }),
            max_chunks: (budget_bytes / CHUNK_COST) as usize,
        }
    }

    /// Set the bits of these blocks (any order; runs in one chunk share a
    /// map lookup). Chunks that do not exist yet are added under the write
    /// lock, once per call.
    pub fn insert(&self, blocks: impl IntoIterator<Item = (u32, u64)>) {
        let mut missing: Vec<(u32, u64)> = Vec::new();
        {
            let b = self.bits.read();
            if b.phase == Phase::Off {
                return;
            }
            let mut last: Option<((u32, u64), &Chunk)> = None;
            for (v, lba) in blocks {
                let (c, w, bit) = chunk_of(lba);
                let chunk = match last {
                    Some((k, ch)) if k == (v, c) => Some(ch),
                    _ => b.chunks.get(&(v, c)).map(|ch| &**ch),
                };
                match chunk {
                    Some(ch) => {
                        ch[w].fetch_or(bit, Ordering::Relaxed);
                        last = Some(((v, c), ch));
                    }
                    None => missing.push((v, lba)),
                }
            }
        }
        if missing.is_empty() {
            return;
        }
        let mut b = self.bits.write();
        if b.phase == Phase::Off {
            return;
        }
        for (v, lba) in missing {
            let (c, w, bit) = chunk_of(lba);
            if !b.chunks.contains_key(&(v, c)) && b.chunks.len() >= self.max_chunks {
                tracing::info!(
                    chunks = b.chunks.len(),
                    "the mapped-block filter reached its memory budget and is off until restart; \
                     writes into unmapped blocks look their old mapping up in the store"
                );
                b.phase = Phase::Off;
                b.chunks = FastMap::default();
                return;
            }
            let ch = b
                .chunks
                .entry((v, c))
                .or_insert_with(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
            ch[w].fetch_or(bit, Ordering::Relaxed);
        }
    }

    /// Every committed mapping is in: "unmapped" answers are final from now.
    pub fn mark_ready(&self) {
        let mut b = self.bits.write();
        if b.phase == Phase::Loading {
            b.phase = Phase::Ready;
        }
    }

    /// Keep in `at` only the blocks `lba0 + i` that may have a committed
    /// mapping; the others certainly have none. One lock hold for the run.
    pub fn retain_maybe_mapped(&self, volume: u32, lba0: u64, at: &mut Vec<usize>) {
        let b = self.bits.read();
        if b.phase != Phase::Ready {
            return;
        }
        let mut last: Option<(u64, Option<&Chunk>)> = None;
        at.retain(|&i| {
            let (c, w, bit) = chunk_of(lba0 + i as u64);
            let chunk = match last {
                Some((lc, ch)) if lc == c => ch,
                _ => {
                    let ch = b.chunks.get(&(volume, c)).map(|ch| &**ch);
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
        if b.phase != Phase::Ready {
            return true;
        }
        let (c, w, bit) = chunk_of(lba);
        b.chunks
            .get(&(volume, c))
            .is_some_and(|ch| ch[w].load(Ordering::Relaxed) & bit != 0)
    }

    /// A deleted volume's bits (its id is never reused).
    pub fn drop_volume(&self, volume: u32) {
        self.bits.write().chunks.retain(|&(v, _), _| v != volume);
    }

    #[cfg(test)]
    pub fn is_ready(&self) -> bool {
        self.bits.read().phase == Phase::Ready
    }

    pub fn memory_bytes(&self) -> u64 {
        self.bits.read().chunks.len() as u64 * CHUNK_COST
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
        f.insert([(1, 1), (1, 5000), (2, 0)]);
        f.mark_ready();
        assert_eq!(maybe(&f, 1, 0, 3), vec![1]);
        assert!(f.may_be_mapped(1, 1) && !f.may_be_mapped(1, 2) && !f.may_be_mapped(9, 1));
        assert_eq!(maybe(&f, 1, 4999, 3), vec![1]);
        assert_eq!(maybe(&f, 2, 0, 2), vec![0]);
        assert!(maybe(&f, 3, 0, 2000).is_empty(), "unknown volume");
        // Runs across a chunk boundary.
        f.insert((1020..1030).map(|l| (1, l)));
        assert_eq!(maybe(&f, 1, 1018, 14), (2..12).collect::<Vec<_>>());
    }

    #[test]
    fn dropped_volume_forgets_its_bits() {
        let f = BlockFilter::with_budget(1 << 20);
        f.mark_ready();
        f.insert([(7, 3), (8, 3)]);
        f.drop_volume(7);
        assert!(maybe(&f, 7, 3, 1).is_empty());
        assert_eq!(maybe(&f, 8, 3, 1), vec![0]);
    }

    #[test]
    fn over_budget_turns_off_and_answers_maybe() {
        let f = BlockFilter::with_budget(4 * CHUNK_COST);
        f.mark_ready();
        f.insert((0..4).map(|c| (1, c * CHUNK_BLOCKS)));
        assert!(f.is_ready());
        assert!(maybe(&f, 1, 1, 1).is_empty());
        f.insert([(1, 4 * CHUNK_BLOCKS)]);
        assert!(!f.is_ready());
        assert_eq!(maybe(&f, 1, 1, 2), vec![0, 1], "off: all maybe");
        assert_eq!(f.memory_bytes(), 0);
        f.mark_ready();
        assert!(!f.is_ready(), "off stays off");
    }
}
