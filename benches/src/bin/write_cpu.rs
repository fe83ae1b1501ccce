//! Unique random 4 KiB writes per second *and per CPU-second*: the engine
//! issue's write target is per core, and on a 2-core machine a writes/s
//! figure alone hides how much of the second core the commits, the metadata
//! store's flushes and compactions, and the hashing took.
//!
//! Three phases of SECS seconds (default 5), each ROUNDS times (default 3),
//! all unique 4 KiB writes at random offsets, queue depth 32 (incompressible
//! unless asked otherwise, see below), into dedup + lz4 volumes of a fresh
//! engine:
//!
//! 1. *overwrites, entries cached*: into a 2 GiB volume just filled with
//!    1 MiB writes and flushed. Every write is an overwrite (the old mapping
//!    and the old record are looked up and dropped), and the volume's
//!    entries are still in the engine's entry cache.
//! 2. *fresh volume*: into a new 64 GiB volume. The blocks are unmapped
//!    (the old mapping is a miss), and at ~100 k writes/s for 8 s fewer
//!    than 3% land on a block written earlier in the phase.
//! 3. *overwrites, entries cold*: the 2 GiB volume again, now that the
//!    fresh phase's entries have pushed most of its own out of the entry
//!    cache: the old mappings and records come from the metadata store, as
//!    they do on any node holding more than its caches.
//!
//! Each phase ends with a flush, and its figures include it: the writes
//! are counted once they are committed (until session 22 the flush came
//! after the clock stopped, which left up to a commit threshold's worth of
//! commit work unmeasured).
//!
//! Until session 19 there were two phases: "fresh volume" wrote into the
//! 2 GiB volume before its fill (so about half of its writes, over 8 s,
//! were overwrites of blocks written earlier in the phase), then
//! "overwrites" as phase 1 here.
//!
//! The writer runs as a task on a two-worker runtime, as ballastd runs a
//! connection. CPU time is the whole process's (getrusage), split by thread
//! name from /proc.
//!
//!     cargo run --release -p ballast-benches --bin write_cpu -- 3 5 [READ_CACHE_BYTES] [random|half]
//!
//! READ_CACHE_BYTES (default: the engine's 256 MiB) sizes the read cache,
//! which every write of up to 256 KiB also fills; 0 measures without it.
//! The last argument picks the blocks' content: `random` (the default),
//! which lz4 cannot shrink, so volumes soon stop trying it (see the
//! engine's `compress_probe`), or `half`: 2 KiB of random bytes then 2 KiB
//! of zeros, which lz4 halves, so every block is compressed.
//!
//! The pool is a 32 GiB sparse file (its size also sizes the record filter,
//! so it stays fixed for comparable runs). A round holds the 2 GiB volume,
//! whatever the fresh phase wrote, and the overwrites' garbage until the
//! cleaner reclaims it: at ~200 k writes/s, SECS up to about 10 fits; a
//! longer phase can end in ENOSPC, which stops the run with that error.
//! (Until session 21 the pool was 16 GiB, which a VM writing 190 k/s
//! filled in phase 3 of an 8 s run.)

use ballast_benches::Xorshift;
use ballast_engine::{Compression, Engine, Volume, VolumeOptions};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The overwritten volume; the fresh one is [`FRESH_VOLUME`].
const VOLUME: u64 = 2 << 30;
const FRESH_VOLUME: u64 = 64 << 30;
const QD: usize = 32;
/// The pool's sparse file (see the module comment).
const POOL: u64 = 32 << 30;

/// CPU seconds (user + system) of this process.
fn process_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds per thread name (numbers and the trailing `#n` dropped, so a
/// pool's threads add up), from /proc/self/task/*/stat.
fn cpu_by_thread() -> BTreeMap<String, f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        // Fields after the parenthesised name: state is the 3rd field, utime the 14th.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            f.get(i - 3)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let name: String = comm
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit() || c == '#' || c == '-')
            .to_string();
        *out.entry(name).or_default() += (ticks(14) + ticks(15)) / hz;
    }
    out
}

/// What the written blocks hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Random bytes: lz4 cannot shrink them.
    Random,
    /// 2 KiB of random bytes, then zeros: lz4 halves them.
    Half,
}

impl std::str::FromStr for Content {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Content> {
        match s {
            "random" => Ok(Content::Random),
            "half" => Ok(Content::Half),
            _ => anyhow::bail!("block content must be `random` or `half`, not {s:?}"),
        }
    }
}

/// Unique 4 KiB writes at random offsets, QD 32, for `secs`, on a runtime
/// task; returns writes done.
async fn random_writes(
    vol: Volume,
    seed: u64,
    secs: Duration,
    content: Content,
) -> anyhow::Result<u64> {
    tokio::spawn(async move {
        let mut g = Xorshift(seed | 1);
        let blocks = vol.size() / 4096;
        let mut template = vec![0u8; 4096];
        g.fill(&mut template);
        if content == Content::Half {
            template[2048..].fill(0);
        }
        ballast_benches::write_for(&vol, secs, QD, || {
            let mut b = template.clone();
            b[..8].copy_from_slice(&g.next_u64().to_le_bytes());
            b[8..16].copy_from_slice(&g.next_u64().to_le_bytes());
            ((g.next_u64() % blocks) * 4096, Bytes::from(b))
        })
        .await
    })
    .await?
}

struct Phase {
    writes_per_sec: f64,
    per_cpu_sec: f64,
    cores: f64,
}

/// The phase's writes and the flush that commits them (see the module
/// comment for why the flush is inside the measurement).
async fn measure(
    engine: &Engine,
    vol: &Volume,
    seed: u64,
    secs: Duration,
    content: Content,
) -> anyhow::Result<(Phase, BTreeMap<String, f64>)> {
    let (cpu0, threads0, t0) = (process_cpu(), cpu_by_thread(), Instant::now());
    let n = random_writes(vol.clone(), seed, secs, content).await?;
    engine.flush().await?;
    let (cpu, wall) = (process_cpu() - cpu0, t0.elapsed().as_secs_f64());
    let mut threads = cpu_by_thread();
    for (name, s) in threads.iter_mut() {
        *s -= threads0.get(name).copied().unwrap_or(0.0);
    }
    threads.retain(|_, s| *s > 0.005);
    Ok((
        Phase {
            writes_per_sec: n as f64 / wall,
            per_cpu_sec: n as f64 / cpu,
            cores: cpu / wall,
        },
        threads,
    ))
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let secs = Duration::from_secs(args.next().map(|s| s.parse()).transpose()?.unwrap_or(5));
    let read_cache: Option<u64> = args.next().map(|s| s.parse()).transpose()?;
    let content: Content = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(Content::Random);
    let rt = ballast_benches::runtime()?;
    rt.block_on(async {
        println!("| phase | round | writes/s | CPU cores busy | writes per CPU-second | CPU by thread (s) |");
        println!("|---|---|---|---|---|---|");
        let mut medians: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for round in 1..=rounds {
            // A fresh engine each round, so "fresh" really is.
            let dir = ballast_benches::scratch_dir()?;
            let mut cfg = ballast_benches::engine_config(dir.path(), POOL);
            if let Some(bytes) = read_cache {
                cfg.read_cache_bytes = bytes;
            }
            let engine = Engine::open(cfg).await?;
            for (name, size) in [("fresh", FRESH_VOLUME), ("w", VOLUME)] {
                let mut o = VolumeOptions::new(size);
                o.compression = Compression::Lz4;
                engine.create_volume(name, o).await?;
            }
            let w = engine.open_volume("w")?;
            fill(&w, round).await?;
            engine.flush().await?;
            let phases = [
                ("1 overwrites, entries cached", w.clone(), round + 100),
                ("2 fresh volume", engine.open_volume("fresh")?, round),
                ("3 overwrites, entries cold", w, round + 200),
            ];
            for (phase, vol, seed) in phases {
                let (p, threads) = measure(&engine, &vol, seed, secs, content).await?;
                let split: Vec<String> = threads.iter().map(|(n, s)| format!("{n} {s:.2}")).collect();
                println!(
                    "| {phase} | {round} | {:.0} | {:.2} | {:.0} | {} |",
                    p.writes_per_sec,
                    p.cores,
                    p.per_cpu_sec,
                    split.join(", ")
                );
                medians.entry(phase).or_default().push(p.per_cpu_sec);
            }
            engine.shutdown().await?;
        }
        for (phase, mut v) in medians {
            let m = ballast_benches::median(&mut v);
            println!("\n{phase}: median {m:.0} writes per CPU-second");
        }
        Ok(())
    })
}

/// Write the whole volume once with unique 1 MiB writes.
async fn fill(vol: &Volume, seed: u64) -> anyhow::Result<()> {
    let mut g = Xorshift(seed.wrapping_mul(0x9e37_79b9) | 1);
    ballast_benches::write_mibs(vol, 0..(VOLUME >> 20), |buf| g.fill(buf)).await
}
