//! Lookups into a cache far larger than the CPU caches, as the entry cache
//! and the read cache see them under 1 MiB reads: batches of consecutive
//! block-map keys `(volume, block)` into 1.44 Mi mappings held by a
//! 1.6 Mi-entry cache. Compares
//! quick_cache's own sharded cache (a lock per lookup) with the engine's
//! `ShardCache` (quick_cache shards, one lock hold per shard per batch).
//! Two threads look up at once, as ballastd's two runtime workers do; the
//! figure is the time per lookup on one thread.

use ballast_benches::Xorshift;
use ballast_engine::shard_cache::ShardCache;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use quick_cache::UnitWeighter;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Key = (u32, u64);
type Val = Option<[u8; 40]>;

const ENTRIES: u64 = 1_600_000;
const FILLED: u64 = ENTRIES * 9 / 10;

trait Lookup: Send + Sync + 'static {
    fn lookup(&self, keys: &[Key]) -> usize;
}

impl Lookup for quick_cache::sync::Cache<Key, Val> {
    fn lookup(&self, keys: &[Key]) -> usize {
        keys.iter().filter(|k| self.get(*k).is_some()).count()
    }
}

impl Lookup for ShardCache<Key, Val, UnitWeighter> {
    fn lookup(&self, keys: &[Key]) -> usize {
        let mut hits = 0;
        self.get_many(keys, |_, _| hits += 1);
        hits
    }
}

/// `iters` batches of `batch` keys on this thread while a second thread does
/// the same; returns this thread's time.
fn run<C: Lookup>(cache: &Arc<C>, batch: usize, iters: u64) -> Duration {
    let lookups = |seed: u64, cache: Arc<C>| {
        move || {
            let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15 ^ seed);
            let mut keys = vec![(0u32, 0u64); batch];
            let mut hits = 0;
            for _ in 0..iters {
                let base = rng.next_u64() % (FILLED - batch as u64);
                for (j, k) in keys.iter_mut().enumerate() {
                    *k = (1, base + j as u64);
                }
                hits += cache.lookup(black_box(&keys));
            }
            assert_eq!(hits as u64, iters * batch as u64, "every key is cached");
        }
    };
    let other = std::thread::spawn(lookups(2, cache.clone()));
    let t = Instant::now();
    lookups(1, cache.clone())();
    let took = t.elapsed();
    other.join().expect("second lookup thread");
    took
}

fn caches(c: &mut Criterion) {
    let sync = Arc::new(quick_cache::sync::Cache::<Key, Val>::new(ENTRIES as usize));
    let sharded = Arc::new(ShardCache::<Key, Val, UnitWeighter>::new(
        ENTRIES as usize,
        ENTRIES,
        UnitWeighter,
    ));
    for i in 0..FILLED {
        sync.insert((1, i), Some([i as u8; 40]));
    }
    sharded.update_many((0..FILLED).map(|i| ((1, i), Some(Some([i as u8; 40])))));
    let mut g = c.benchmark_group("cache");
    g.sample_size(20);
    for batch in [1usize, 32, 256] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(
            BenchmarkId::new("quick_cache_sync", batch),
            &batch,
            |b, &n| b.iter_custom(|iters| run(&sync, n, iters)),
        );
        g.bench_with_input(BenchmarkId::new("shard_cache", batch), &batch, |b, &n| {
            b.iter_custom(|iters| run(&sharded, n, iters))
        });
    }
    g.finish();
}

criterion_group!(benches, caches);
criterion_main!(benches);
