//! The load generator's data: filling blocks with a given compressibility,
//! and choosing which blocks repeat (dedupe).

use ballast_client::bench::datagen::DataGen;
use ballast_client::bench::rng::{fill_random, XorShift};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn fill(c: &mut Criterion) {
    let mut g = c.benchmark_group("datagen_fill");
    for bs in [4096usize, 65536] {
        g.throughput(Throughput::Bytes(bs as u64));
        for compress in [0u8, 50, 90] {
            let gen = DataGen::new(bs, 0, compress, 1);
            let mut buf = vec![0u8; bs];
            let mut key = 0u64;
            g.bench_with_input(
                BenchmarkId::new(format!("compress{compress}"), bs),
                &bs,
                |b, _| {
                    b.iter(|| {
                        key += 1;
                        gen.fill(black_box(key), &mut buf);
                        black_box(buf[0])
                    })
                },
            );
        }
        let mut buf = vec![0u8; bs];
        g.bench_with_input(BenchmarkId::new("fill_random", bs), &bs, |b, _| {
            let mut s = 0u64;
            b.iter(|| {
                s += 1;
                fill_random(&mut buf, s);
                black_box(buf[0])
            })
        });
    }
    g.finish();
}

fn keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("datagen_keys");
    g.throughput(Throughput::Elements(1));
    for dedupe in [0u8, 30] {
        let gen = DataGen::new(4096, dedupe, 0, 1);
        let mut s = gen.stream(0);
        g.bench_function(format!("next_key_dedupe{dedupe}"), |b| {
            b.iter(|| black_box(s.next_key()))
        });
    }
    let mut r = XorShift::new(1);
    g.bench_function("random_offset", |b| b.iter(|| black_box(r.below(262_144))));
    g.finish();
}

criterion_group!(benches, fill, keys);
criterion_main!(benches);
