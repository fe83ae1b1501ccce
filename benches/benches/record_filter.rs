//! The record filter's two operations as the engine uses them, on a filter
//! far larger than the CPU caches (a 1 TiB pool: 256 MiB), half full:
//! a commit inserting the keys of its new records, and a writer asking
//! about new content (almost always absent). Compares the engine's blocked
//! filter (`RecordFilter`: a key's bits in one 64-byte block) with the
//! classic one it replaced (fastbloom's `AtomicBloomFilter` of the same
//! size: a key's bits anywhere in the array). Time per key.

use ballast_client::bench::rng::splitmix64;
use ballast_engine::record_filter::RecordFilter;
use ballast_engine::BlockKey;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fastbloom::AtomicBloomFilter;

const POOL: u64 = 1 << 40;
const BATCH: usize = 4096;

/// A key standing for the blake3 hash of the `i`th block: as uniform, and
/// cheap enough to fill a filter of 128 Mi keys before the measurement.
fn key(i: u64) -> BlockKey {
    let mut hash = [0u8; 32];
    for (n, word) in hash.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&splitmix64(i.wrapping_mul(4).wrapping_add(n as u64)).to_le_bytes());
    }
    BlockKey::content(hash)
}

trait Filter {
    fn insert(&self, k: &BlockKey);
    fn may_contain(&self, k: &BlockKey) -> bool;
}

impl Filter for RecordFilter {
    fn insert(&self, k: &BlockKey) {
        RecordFilter::insert(self, k)
    }
    fn may_contain(&self, k: &BlockKey) -> bool {
        RecordFilter::may_contain(self, k)
    }
}

impl Filter for AtomicBloomFilter {
    fn insert(&self, k: &BlockKey) {
        AtomicBloomFilter::insert(self, &k.fingerprint());
    }
    fn may_contain(&self, k: &BlockKey) -> bool {
        self.contains(&k.fingerprint())
    }
}

fn half_full(f: &impl Filter, slots: u64) {
    for i in 0..slots / 2 {
        f.insert(&key(i));
    }
}

fn filters(c: &mut Criterion) {
    let slots = POOL / 4096;
    let blocked = RecordFilter::for_capacity(POOL);
    half_full(&blocked, slots);
    blocked.mark_ready();
    let classic =
        AtomicBloomFilter::with_num_bits((slots * 8) as usize).expected_items(slots as usize);
    half_full(&classic, slots);
    let fp = |f: &dyn Filter| {
        let probes = 100_000u64;
        (u64::MAX - probes..u64::MAX)
            .filter(|&i| f.may_contain(&key(i)))
            .count() as f64
            / probes as f64
    };
    eprintln!(
        "false positives at half load (before the timed inserts add more): blocked {:.4}, classic {:.4}",
        fp(&blocked),
        fp(&classic)
    );
    // Fresh keys for every iteration, so inserts are of new keys and
    // lookups of absent ones (keys computed outside the timing).
    let mut next = slots;
    let mut batch = move || {
        let keys: Vec<BlockKey> = (next..next + BATCH as u64).map(key).collect();
        next += BATCH as u64;
        keys
    };
    let mut g = c.benchmark_group("record_filter");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, f) in [("blocked", &blocked as &dyn Filter), ("classic", &classic)] {
        g.bench_function(format!("insert_new/{name}"), |b| {
            b.iter_batched(
                &mut batch,
                |keys| keys.iter().for_each(|k| f.insert(k)),
                criterion::BatchSize::LargeInput,
            )
        });
        g.bench_function(format!("lookup_absent/{name}"), |b| {
            b.iter_batched(
                &mut batch,
                |keys| keys.iter().filter(|k| f.may_contain(k)).count(),
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, filters);
criterion_main!(benches);
