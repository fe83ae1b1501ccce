//! An in-memory Bloom filter over the keys of the record index.
//!
//! Every unique block written asks the record index "do you have this
//! content?", and for new data the answer is almost always no. In fjall that
//! miss costs a walk of every memtable skiplist plus a filter probe per table
//! — the largest single cost of the write path. This filter answers most of
//! those misses from memory in tens of nanoseconds.
//!
//! Invariant: once [`RecordFilter::is_ready`], every key in the committed
//! record index is in the filter. Commits insert their keys before their
//! batch reaches the store, and the start-up scan covers what was there
//! before; keys removed from the store stay in the filter (a false positive
//! only costs the store lookup it would have cost anyway).
//!
//! The filter is *blocked*: a key's bits all lie in one 64-byte block, so an
//! insert or a lookup touches one cache line. The filter is far larger than
//! the CPU caches (256 MiB per TiB of pool), and a classic Bloom filter
//! (fastbloom, until session 22) scatters a key's six bits over the whole
//! array: six memory misses per insert, one per commit of every new record.
//! The price is a slightly higher false-positive rate for the same memory.
//! No well-kept crate offers a blocked filter that threads can insert into
//! and query at once (`&self`, atomics), which the commit and the writers
//! do; this one is a few lines of bit arithmetic, measured in
//! `benches/benches/record_filter.rs` (256 MiB filter, half full, per key:
//! insert 104 ns against fastbloom's 262, lookup of an absent key 51 ns
//! against 160).
//!
//! Size: 8 bits per 4 KiB of pool capacity (256 MiB per TiB): 2.3% false
//! positives when the pool is full of 4 KiB records (2.2% for a classic
//! filter of that size), 0.12% at half load. Disks added to a live pool do
//! not grow it until the next start; it only gets less sharp.

use crate::key::BlockKey;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bits set per key, all in one block: the best count for 8 bits per key
/// in 512-bit blocks (a classic filter's would be 5.5).
const BITS_PER_KEY: u32 = 6;

/// One cache line of the filter.
#[repr(align(64))]
struct Block([AtomicU64; 8]);

pub struct RecordFilter {
    blocks: Box<[Block]>,
    ready: AtomicBool,
}

/// Which block, and which bit of which word of it, a key maps to. The
/// block comes from the key's fingerprint (the first 8 bytes of its hash,
/// nonce mixed in); the bits from the next 8 bytes, so the two are
/// independent (blake3 output is uniform).
fn probe(key: &BlockKey, blocks: usize) -> (usize, [(usize, u64); BITS_PER_KEY as usize]) {
    let block = ((key.fingerprint() as u128 * blocks as u128) >> 64) as usize;
    let mut bits = u64::from_le_bytes(key.hash[8..16].try_into().expect("8 of 32 bytes"))
        ^ key.nonce.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    let mut out = [(0, 0); BITS_PER_KEY as usize];
    for o in &mut out {
        // 9 bits a probe: 3 for the word, 6 for the bit in it.
        *o = ((bits & 7) as usize, 1u64 << ((bits >> 3) & 63));
        bits >>= 9;
    }
    (block, out)
}

impl RecordFilter {
    /// A filter sized for a pool of `capacity_bytes`.
    pub fn for_capacity(capacity_bytes: u64) -> RecordFilter {
        let slots = (capacity_bytes / 4096).max(1 << 20);
        // 8 bits a slot, 512 bits a block.
        let blocks = slots.div_ceil(64) as usize;
        RecordFilter {
            blocks: (0..blocks)
                .map(|_| Block(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
            ready: AtomicBool::new(false),
        }
    }

    pub fn insert(&self, key: &BlockKey) {
        let (b, probes) = probe(key, self.blocks.len());
        let words = &self.blocks[b].0;
        for (w, bit) in probes {
            // Relaxed: what orders an insert before the lookups that must
            // see it is the lock or the ready flag the caller goes through
            // (see the module comment), as with any other commit effect.
            if words[w].load(Ordering::Relaxed) & bit == 0 {
                words[w].fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    /// Every key of the store has been inserted: negative answers are final.
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// `false` only when `key` is certainly not in the committed index.
    pub fn may_contain(&self, key: &BlockKey) -> bool {
        if !self.is_ready() {
            return true;
        }
        let (b, probes) = probe(key, self.blocks.len());
        let words = &self.blocks[b].0;
        probes
            .iter()
            .all(|&(w, bit)| words[w].load(Ordering::Relaxed) & bit != 0)
    }

    pub fn memory_bytes(&self) -> u64 {
        (self.blocks.len() * std::mem::size_of::<Block>()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64, nonce: u64) -> BlockKey {
        BlockKey {
            hash: *blake3::hash(&i.to_le_bytes()).as_bytes(),
            nonce,
        }
    }

    #[test]
    fn answers_maybe_until_ready_then_no_false_negatives() {
        let f = RecordFilter::for_capacity(64 << 20);
        assert!(
            f.may_contain(&key(1, 0)),
            "not ready: every key may be there"
        );
        for i in 0..10_000 {
            f.insert(&key(i, 0));
        }
        f.mark_ready();
        for i in 0..10_000 {
            assert!(f.may_contain(&key(i, 0)));
        }
        let fp = (10_000..110_000)
            .filter(|&i| f.may_contain(&key(i, 0)))
            .count();
        assert!(fp < 1_000, "{fp} false positives in 100k misses");
    }

    #[test]
    fn false_positives_at_full_load_stay_near_two_percent() {
        // The sizing rule's worst case: one record per 4 KiB of capacity.
        let f = RecordFilter::for_capacity(4 << 30);
        let slots = (4u64 << 30) / 4096;
        for i in 0..slots {
            f.insert(&key(i, 0));
        }
        f.mark_ready();
        assert!((0..slots).step_by(97).all(|i| f.may_contain(&key(i, 0))));
        let probes = 200_000;
        let fp = (slots..slots + probes)
            .filter(|&i| f.may_contain(&key(i, 0)))
            .count();
        let rate = fp as f64 / probes as f64;
        assert!(rate < 0.04, "false-positive rate {rate} at full load");
    }

    #[test]
    fn nonce_tells_copies_apart() {
        let f = RecordFilter::for_capacity(64 << 20);
        f.insert(&key(5, 1));
        f.mark_ready();
        assert!(f.may_contain(&key(5, 1)));
        let fp = (2..10_002).filter(|&n| f.may_contain(&key(5, n))).count();
        assert!(fp < 100, "{fp} false positives across nonces");
    }
}
