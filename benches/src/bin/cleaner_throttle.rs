//! Foreground write throughput while the cleaner reclaims space, against the
//! same workload with the cleaner idle: the engine issue asks that cleaning
//! leave foreground I/O at least 80% of its throughput.
//!
//! Fills a 1 GiB volume with unique data, then alternates ROUNDS (default 3)
//! pairs of SECS-second (default 5) phases of random 4 KiB unique overwrites
//! at queue depth 32: one with no cleaning, one with cleaning passes running
//! back to back beside it (more often than the background cleaner's every
//! two seconds: a worst case). The overwrites keep creating dead records, so
//! every cleaning phase finds segments to clean. Prints IOPS per phase, the
//! segments the cleaner freed, and the ratio of the medians.
//!
//!     cargo run --release -p ballast-benches --bin cleaner_throttle -- 3 5

use ballast_benches::Xorshift;
use ballast_engine::{Engine, Volume, VolumeOptions};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VOLUME: u64 = 1 << 30;
const QD: usize = 32;

/// A unique, half-compressible block.
fn block(rng: &mut Xorshift, len: usize) -> Bytes {
    let mut b = vec![0u8; len];
    rng.fill_half_compressible(&mut b);
    Bytes::from(b)
}

/// Random 4 KiB overwrites for `secs`; returns IOPS.
async fn overwrite(vol: &Volume, rng: &mut Xorshift, secs: Duration) -> anyhow::Result<f64> {
    let blocks = VOLUME / 4096;
    let t0 = Instant::now();
    let done = ballast_benches::write_for(vol, secs, QD, || {
        ((rng.next_u64() % blocks) * 4096, block(rng, 4096))
    })
    .await?;
    Ok(done as f64 / t0.elapsed().as_secs_f64())
}

/// Cleaning passes back to back until `stop`; counts segments emptied.
async fn clean_until(engine: Engine, stop: Arc<AtomicBool>, freed: Arc<AtomicUsize>) {
    while !stop.load(Ordering::Relaxed) {
        match engine.clean_now(false).await {
            Ok(0) => tokio::time::sleep(Duration::from_millis(50)).await,
            Ok(n) => {
                freed.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("cleaning pass failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let secs = Duration::from_secs(args.next().map(|s| s.parse()).transpose()?.unwrap_or(5));
    let rt = ballast_benches::runtime()?;
    let dir = ballast_benches::scratch_dir()?;
    rt.block_on(async {
        let mut cfg = ballast_benches::engine_config(dir.path(), 16 << 30);
        // Cleaning runs only when this benchmark says so.
        cfg.cleaner = false;
        let engine = Engine::open(cfg).await?;
        engine
            .create_volume("c", VolumeOptions::new(VOLUME))
            .await?;
        let vol = engine.open_volume("c")?;
        let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
        ballast_benches::write_mibs(&vol, 0..(VOLUME >> 20), |buf| {
            ballast_benches::fill_half_compressible_blocks(&mut rng, buf)
        })
        .await?;
        engine.flush().await?;
        println!("| round | idle cleaner IOPS | cleaning IOPS | segments freed | free segments after |");
        println!("|---|---|---|---|---|");
        let (mut idle, mut busy) = (Vec::new(), Vec::new());
        let mut total_freed = 0;
        for round in 1..=rounds {
            let a = overwrite(&vol, &mut rng, secs).await?;
            let stop = Arc::new(AtomicBool::new(false));
            let freed = Arc::new(AtomicUsize::new(0));
            let cleaner = tokio::spawn(clean_until(engine.clone(), stop.clone(), freed.clone()));
            let b = overwrite(&vol, &mut rng, secs).await?;
            stop.store(true, Ordering::Relaxed);
            cleaner.await?;
            let n = freed.load(Ordering::Relaxed);
            total_freed += n;
            println!(
                "| {round} | {a:.0} | {b:.0} | {n} | {} |",
                engine.free_segments()
            );
            idle.push(a);
            busy.push(b);
        }
        let (mi, mb) = (ballast_benches::median(&mut idle), ballast_benches::median(&mut busy));
        println!(
            "\nmedian IOPS: {mi:.0} without cleaning, {mb:.0} while cleaning: {:.0}% kept; {total_freed} segments freed",
            100.0 * mb / mi
        );
        anyhow::ensure!(total_freed > 0, "the cleaner found nothing to clean: the benchmark measured nothing");
        engine.shutdown().await?;
        Ok(())
    })
}
