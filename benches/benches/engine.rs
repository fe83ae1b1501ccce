//! Engine micro-benchmarks: the hash and compressor on block-sized inputs,
//! and the engine's 4 KiB random write/read and 1 MiB sequential paths on
//! unique incompressible, duplicate and compressible data.
//!
//! The engine runs on a sparse file under BALLAST_BENCH_DIR (default: the
//! system temp dir) with the io_uring backend when available. Each measured
//! batch keeps 32 requests in flight, like an NBD client at queue depth 32.

use ballast_benches::Xorshift;
use ballast_engine::{Compression, Engine, EngineConfig, Volume, VolumeOptions};
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::stream::{FuturesUnordered, StreamExt};
use std::time::{Duration, Instant};

const VOL: u64 = 2 << 30;
const QD: usize = 32;

#[derive(Clone, Copy)]
enum Data {
    Unique,
    Duplicate,
    Compressible,
}

impl Data {
    fn name(self) -> &'static str {
        match self {
            Data::Unique => "unique",
            Data::Duplicate => "duplicate",
            Data::Compressible => "compressible",
        }
    }
}

/// Fill `buf` with `data` from `g`.
fn fill(g: &mut Xorshift, buf: &mut [u8], data: Data) {
    match data {
        Data::Unique => g.fill(buf),
        // One of 16 fixed blocks: almost every write is a dedup hit.
        Data::Duplicate => Xorshift(g.next_u64() % 16 * 7919 + 1).fill(buf),
        Data::Compressible => g.fill_half_compressible(buf),
    }
}

async fn open(dir: &std::path::Path, read_cache_bytes: u64) -> (Engine, Volume) {
    open_with(dir, read_cache_bytes, 0).await
}

async fn open_with(
    dir: &std::path::Path,
    read_cache_bytes: u64,
    write_back_bytes: u64,
) -> (Engine, Volume) {
    let mut cfg = EngineConfig::new(dir.join("data"));
    cfg.read_cache_bytes = read_cache_bytes;
    cfg.write_back_bytes = write_back_bytes;
    cfg.disks = vec![ballast_engine::DiskSpec {
        path: dir.join("disk0.img"),
        create_size: Some(16 << 30),
    }];
    let e = Engine::open(cfg).await.expect("engine opens");
    let mut o = VolumeOptions::new(VOL);
    o.compression = Compression::Lz4;
    e.create_volume("bench", o).await.expect("volume");
    let v = e.open_volume("bench").unwrap();
    (e, v)
}

/// The `engine` group's settings: few, long samples (each one many I/Os).
fn engine_group(
    c: &mut Criterion,
) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group("engine");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(6))
        .warm_up_time(Duration::from_secs(1));
    g
}

/// Run a measured loop as a task on the runtime's workers, as ballastd runs
/// every connection, rather than on criterion's `block_on` thread: a third
/// thread beside the two workers, and outside any task, so the engine's I/O
/// would complete through different wake-ups than in ballastd.
async fn in_task<F>(f: F) -> Duration
where
    F: std::future::Future<Output = Duration> + Send + 'static,
{
    tokio::spawn(f).await.expect("the measured task panicked")
}

/// Run `iters` writes of `bs` bytes with QD in flight; random or sequential offsets.
async fn writes(
    v: &Volume,
    iters: u64,
    bs: usize,
    data: Data,
    random: bool,
    seed: u64,
) -> Duration {
    let mut g = Xorshift(seed | 1);
    let slots = VOL / bs as u64;
    let bufs: Vec<Bytes> = (0..256)
        .map(|_| {
            let mut b = vec![0u8; bs];
            fill(&mut g, &mut b, data);
            Bytes::from(b)
        })
        .collect();
    let mut inflight = FuturesUnordered::new();
    let t = Instant::now();
    for i in 0..iters {
        let slot = if random {
            g.next_u64() % slots
        } else {
            i % slots
        };
        let buf = if matches!(data, Data::Duplicate) {
            bufs[(i % 16) as usize].clone()
        } else {
            // Fresh unique content per write: a new block every time.
            let mut b = bufs[(i % 256) as usize].to_vec();
            b[..8].copy_from_slice(&g.next_u64().to_le_bytes());
            Bytes::from(b)
        };
        inflight.push(v.write(slot * bs as u64, buf, false));
        if inflight.len() >= QD {
            inflight.next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = inflight.next().await {
        r.unwrap();
    }
    t.elapsed()
}

async fn reads(
    v: &Volume,
    iters: u64,
    bs: usize,
    random: bool,
    span: u64,
    seed: u64,
    qd: usize,
) -> Duration {
    let mut g = Xorshift(seed | 1);
    let slots = span / bs as u64;
    // Each read runs as its own task, as the NBD server runs requests. A
    // JoinSet, not a FuturesUnordered: the latter wakes its own task every
    // time all its futures are pending (to yield), which on a runtime means
    // a trip through the run queue and a wake-up of the other worker per
    // read — a cost of this harness, not of the engine or of ballastd.
    let mut inflight = tokio::task::JoinSet::new();
    let t = Instant::now();
    for i in 0..iters {
        let slot = if random {
            g.next_u64() % slots
        } else {
            i % slots
        };
        inflight.spawn(v.read(slot * bs as u64, bs as u32));
        if inflight.len() >= qd {
            inflight.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(r) = inflight.join_next().await {
        r.unwrap().unwrap();
    }
    t.elapsed()
}

fn codecs(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for size in [4096usize, 65536] {
        let mut buf = vec![0u8; size];
        fill(&mut Xorshift(7), &mut buf, Data::Compressible);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("blake3", size), &buf, |b, buf| {
            b.iter(|| blake3::hash(buf))
        });
        g.bench_with_input(BenchmarkId::new("lz4_compress", size), &buf, |b, buf| {
            b.iter(|| lz4_flex::block::compress(buf))
        });
        let c = lz4_flex::block::compress(&buf);
        g.bench_with_input(BenchmarkId::new("lz4_decompress", size), &c, |b, c| {
            b.iter(|| lz4_flex::block::decompress(c, size).unwrap())
        });
    }
    // What every unique block costs before any metadata, I/O or protocol
    // work: the hash that names it, the lz4 attempt (kept raw when it does
    // not pay, as random data never does) and the crc32 of the stored bytes.
    // Incompressible data, as fio's `--refill_buffers` writes: this bounds
    // how fast 1 MiB NBD writes can go on a given number of cores.
    let mut block = vec![0u8; 4096];
    Xorshift(11).fill(&mut block);
    // The compressor's table is reused across blocks, as the engine does.
    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(block.len())];
    let mut table = lz4_flex::block::CompressTable::small();
    g.throughput(Throughput::Bytes(block.len() as u64));
    g.bench_function(BenchmarkId::new("block_floor_incompressible", 4096), |b| {
        b.iter(|| {
            let h = blake3::hash(&block);
            let n = lz4_flex::block::compress_into_with_table(&block, &mut out, &mut table)
                .expect("the output buffer has lz4's worst-case size");
            // The engine keeps lz4's output only if it saves 1/16 or more.
            let stored: &[u8] = if n + block.len() / 16 <= block.len() {
                &out[..n]
            } else {
                &block
            };
            (h, crc32fast::hash(stored))
        })
    });
    g.finish();
}

fn engine_paths(c: &mut Criterion) {
    let rt = ballast_benches::runtime().expect("runtime");
    let dir = ballast_benches::scratch_dir().expect("bench dir");
    // Writes run with the default read cache, as ballastd does (each write
    // also caches its blocks).
    let (engine, vol) = rt.block_on(open(dir.path(), EngineConfig::new("").read_cache_bytes));
    eprintln!("engine backend: {}", engine.backend_name());
    let mut g = engine_group(c);
    for data in [Data::Unique, Data::Duplicate, Data::Compressible] {
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("randwrite_4k", data.name()), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let v = vol.clone();
                in_task(async move { writes(&v, iters, 4096, data, true, iters).await })
            })
        });
        g.throughput(Throughput::Bytes(1 << 20));
        g.bench_function(BenchmarkId::new("seqwrite_1m", data.name()), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let v = vol.clone();
                in_task(async move { writes(&v, iters, 1 << 20, data, false, iters).await })
            })
        });
    }
    rt.block_on(engine.shutdown()).unwrap();
    drop(dir);
    // Reads of data that is on disk, not in a segment image or a read cache:
    // a second engine without read cache; fill a 1 GiB span, flush, and let
    // the reads hit the disk with O_DIRECT (metadata stays cached).
    let dir = ballast_benches::scratch_dir().expect("bench dir");
    let (engine, vol) = rt.block_on(open(dir.path(), 0));
    rt.block_on(async {
        writes(&vol, 1024, 1 << 20, Data::Compressible, false, 99).await;
        engine.flush().await.unwrap();
    });
    g.throughput(Throughput::Elements(1));
    for qd in [32usize, 1] {
        g.bench_function(BenchmarkId::new("randread_4k_cold_qd", qd), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let v = vol.clone();
                in_task(async move { reads(&v, iters, 4096, true, 1 << 30, iters, qd).await })
            })
        });
    }
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("seqread_1m", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let v = vol.clone();
            in_task(async move { reads(&v, iters, 1 << 20, false, 1 << 30, iters, QD).await })
        })
    });
    g.finish();
    rt.block_on(engine.shutdown()).unwrap();
}

/// The raw I/O backends at queue depth 1: the floor under the engine's read latency.
fn io_backends(c: &mut Criterion) {
    use ballast_engine::io::{AlignedBuf, BackendChoice, IoEngine};
    let rt = ballast_benches::runtime().expect("runtime");
    let dir = ballast_benches::scratch_dir().expect("bench dir");
    let path = dir.path().join("raw.img");
    std::fs::write(&path, vec![7u8; 64 << 20]).unwrap();
    let mut g = c.benchmark_group("io");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for (name, choice) in [
        ("uring", BackendChoice::Uring),
        ("threads", BackendChoice::Threads),
    ] {
        let Ok(io) = IoEngine::new(choice) else {
            continue;
        };
        let disk = io.open_disk(&path, None).unwrap();
        g.throughput(Throughput::Elements(1));
        // On the polling thread (a `block_on`, like a synchronous program)
        // and inside a task (as the engine's reads run in ballastd).
        for (place, task) in [("thread", false), ("task", true)] {
            g.bench_function(
                BenchmarkId::new("read_4k_qd1", format!("{name}_{place}")),
                |b| {
                    b.to_async(&rt).iter_custom(|iters| {
                        let disk = disk.clone();
                        let measured = async move {
                            let mut g = Xorshift(iters | 1);
                            let t = Instant::now();
                            for _ in 0..iters {
                                let (_, r) = disk
                                    .read_at(
                                        AlignedBuf::recycled(4096),
                                        (g.next_u64() % 16384) * 4096,
                                    )
                                    .await;
                                r.unwrap();
                            }
                            t.elapsed()
                        };
                        async move {
                            if task {
                                in_task(measured).await
                            } else {
                                measured.await
                            }
                        }
                    })
                },
            );
        }
    }
    g.finish();
}

/// 1 MiB reads of blocks in the read cache: what the engine spends per
/// request when no disk is involved (the block-map and block lookups, the
/// pieces handed out), as under fio's 1 MiB reads of a freshly written
/// volume through ballastd.
fn warm_reads(c: &mut Criterion) {
    let rt = ballast_benches::runtime().expect("runtime");
    let dir = ballast_benches::scratch_dir().expect("bench dir");
    let (engine, vol) = rt.block_on(open(dir.path(), 1 << 30));
    rt.block_on(async {
        // 512 MiB in 1 MiB writes: cached as written, the cache having room.
        writes(&vol, 512, 1 << 20, Data::Compressible, false, 7).await;
        engine.flush().await.unwrap();
    });
    let mut g = engine_group(c);
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("seqread_1m_warm", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let v = vol.clone();
            in_task(async move { reads(&v, iters, 1 << 20, false, 512 << 20, iters, 8).await })
        })
    });
    g.finish();
    rt.block_on(engine.shutdown()).unwrap();
}

/// Writes through the write-back buffer (as ballastd runs by default),
/// each measured batch ending with a flush: the figures include landing
/// (hashing, lz4, storing) and the commit, not only the buffering. Random
/// 4 KiB writes rewrite some blocks before they land (the batches are a
/// few hundred thousand writes over 512 Ki blocks), which then land once.
fn write_back(c: &mut Criterion) {
    let rt = ballast_benches::runtime().expect("runtime");
    let dir = ballast_benches::scratch_dir().expect("bench dir");
    let (engine, vol) = rt.block_on(open_with(
        dir.path(),
        EngineConfig::new("").read_cache_bytes,
        4 << 30,
    ));
    let mut g = c.benchmark_group("write_back");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    for (name, bs, random) in [
        ("randwrite_4k", 4096, true),
        ("seqwrite_1m", 1 << 20, false),
    ] {
        g.throughput(if bs == 4096 {
            Throughput::Elements(1)
        } else {
            Throughput::Bytes(1 << 20)
        });
        g.bench_function(BenchmarkId::new(name, "unique"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let v = vol.clone();
                in_task(async move {
                    let t = Instant::now();
                    writes(&v, iters, bs, Data::Unique, random, iters).await;
                    v.flush().await.unwrap();
                    t.elapsed()
                })
            })
        });
    }
    g.finish();
    rt.block_on(engine.shutdown()).unwrap();
}

criterion_group!(
    benches,
    codecs,
    io_backends,
    engine_paths,
    write_back,
    warm_reads
);
criterion_main!(benches);
