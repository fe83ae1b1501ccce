//! Resident memory against unique data stored, to extrapolate RAM per TiB.
//!
//! Writes GIB gibibytes (default 4) of unique, half-compressible 4 KiB blocks
//! in 1 MiB writes at queue depth 8, reporting after each GiB: unique bytes,
//! resident memory and metadata size; then reads 200k random blocks back and
//! reports again (steady state). The slope of resident memory less the
//! bounded caches (metadata block cache, entry cache, read cache: sized by
//! configuration, not by data) over unique data, scaled to 1 TiB, is the
//! figure docs/benchmarks.md quotes.
//!
//!     cargo run --release -p ballast-benches --bin memory_scale -- 4

use ballast_engine::VolumeOptions;

fn main() -> anyhow::Result<()> {
    let gib: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(4);
    let rt = ballast_benches::runtime()?;
    let dir = ballast_benches::scratch_dir()?;
    rt.block_on(async {
        let engine = ballast_benches::open_engine(dir.path(), (gib + 4) << 30).await?;
        let (rss0, _) = ballast_benches::rss();
        engine.create_volume("m", VolumeOptions::new(gib << 30)).await?;
        let vol = engine.open_volume("m")?;
        println!("| unique GiB | RSS MiB | peak RSS MiB | metadata on disk MiB | meta cache MiB | memtables MiB | entry cache MiB | read cache MiB | RSS less caches MiB |");
        println!("|---|---|---|---|---|---|---|---|---|");
        let mut x = ballast_benches::Xorshift(0x1234_5678_9abc_def1);
        let mut points = Vec::new();
        for g in 0..gib {
            ballast_benches::write_mibs(&vol, (g << 10)..((g + 1) << 10), |buf| {
                ballast_benches::fill_half_compressible_blocks(&mut x, buf)
            })
            .await?;
            engine.flush().await?;
            let s = engine.node_stats();
            let (rss, peak) = ballast_benches::rss();
            // The caches are bounded by configuration, not by the data: what
            // grows with the data is the resident set without them.
            let caches = s.metadata_cache_bytes + s.entry_cache_bytes + s.read_cache_bytes;
            let rest = rss.saturating_sub(caches);
            println!(
                "| {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.unique_bytes as f64 / (1u64 << 30) as f64,
                rss >> 20,
                peak >> 20,
                s.metadata_bytes >> 20,
                s.metadata_cache_bytes >> 20,
                s.metadata_write_buffer_bytes >> 20,
                s.entry_cache_bytes >> 20,
                s.read_cache_bytes >> 20,
                rest >> 20
            );
            points.push((s.unique_bytes, rest));
        }
        let blocks = (gib << 30) / 4096;
        for _ in 0..200_000u64 {
            vol.read((x.next_u64() % blocks) * 4096, 4096).await?;
        }
        let (rss, peak) = ballast_benches::rss();
        println!("after 200k random reads: RSS {} MiB, peak {} MiB (baseline before data: {} MiB)", rss >> 20, peak >> 20, rss0 >> 20);
        // The second half of the run: by then the caches have filled, and
        // what still grows is what grows with the data.
        let half = &points[points.len() / 2..];
        if let (Some(first), Some(last)) = (half.first(), half.last()) {
            if last.0 > first.0 {
                let slope = (last.1 as f64 - first.1 as f64) / (last.0 - first.0) as f64;
                println!(
                    "growth of RSS less the bounded caches over the second half: {:.1} MiB per GiB of unique data -> {:.2} GiB per TiB by extrapolation (plus a fixed {} MiB and the caches' configured sizes)",
                    slope * 1024.0,
                    slope * 1024.0,
                    rss0 >> 20
                );
            }
        }
        engine.shutdown().await?;
        anyhow::Ok(())
    })
}
