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
//! Size: 8 bits per 4 KiB of pool capacity (256 MiB per TiB), about 2%
//! false positives when the pool is full of 4 KiB records. Disks added to a
//! live pool do not grow it until the next start; it only gets less sharp.

use crate::key::BlockKey;
use fastbloom::AtomicBloomFilter;
use std::sync::atomic::{AtomicBool, Ordering};

pub(crate) struct RecordFilter {
    bits: AtomicBloomFilter,
    ready: AtomicBool,
}

impl RecordFilter {
    /// A filter sized for a pool of `capacity_bytes`.
    pub fn for_capacity(capacity_bytes: u64) -> RecordFilter {
        let slots = (capacity_bytes / 4096).max(1 << 20);
        RecordFilter {
            bits: AtomicBloomFilter::with_num_bits((slots * 8) as usize)
                .expected_items(slots as usize),
            ready: AtomicBool::new(false),
        }
    }

    pub fn insert(&self, key: &BlockKey) {
        self.bits.insert(&key.fingerprint());
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
        !self.is_ready() || self.bits.contains(&key.fingerprint())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.bits.num_bits() as u64 / 8
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
    fn nonce_tells_copies_apart() {
        let f = RecordFilter::for_capacity(64 << 20);
        f.insert(&key(5, 1));
        f.mark_ready();
        assert!(f.may_contain(&key(5, 1)));
        let fp = (2..10_002).filter(|&n| f.may_contain(&key(5, n))).count();
        assert!(fp < 100, "{fp} false positives across nonces");
    }
}
