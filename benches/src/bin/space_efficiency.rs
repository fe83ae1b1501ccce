//! Stored bytes on real data versus the ideal.
//!
//! Writes each image file given on the command line into its own volume
//! (4 KiB blocks, dedup + lz4), flushes, and compares the engine's
//! `stored_bytes` with the ideal: the sum of the lz4-compressed sizes of the
//! unique non-zero 4 KiB blocks of all the images. Name a file twice to write
//! it more than once.
//!
//!     cargo run --release -p ballast-benches --bin space_efficiency -- a.img b.img a.img

use anyhow::Context;
use ballast_engine::VolumeOptions;
use bytes::Bytes;
use std::collections::HashSet;
use std::io::Read;

const BS: usize = 4096;

fn main() -> anyhow::Result<()> {
    let files: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        !files.is_empty(),
        "usage: space_efficiency IMAGE [IMAGE...]"
    );
    let rt = ballast_benches::runtime()?;
    let dir = ballast_benches::scratch_dir()?;
    rt.block_on(async {
        let engine = ballast_benches::open_engine(dir.path(), 64 << 30).await?;
        let mut seen: HashSet<[u8; 32]> = HashSet::new();
        let (mut ideal, mut logical_nonzero, mut unique_raw) = (0u64, 0u64, 0u64);
        for (i, f) in files.iter().enumerate() {
            let len = std::fs::metadata(f)
                .with_context(|| format!("reading {f}"))?
                .len();
            let size = len.div_ceil(1 << 20).max(1) << 20;
            let name = format!("img{i}");
            engine
                .create_volume(&name, VolumeOptions::new(size))
                .await?;
            let vol = engine.open_volume(&name)?;
            let mut file = std::fs::File::open(f)?;
            let mut off = 0u64;
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0;
                while n < buf.len() {
                    let r = file.read(&mut buf[n..])?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                if n == 0 {
                    break;
                }
                buf.truncate(n.div_ceil(BS) * BS);
                for block in buf.chunks(BS) {
                    if block.iter().all(|&b| b == 0) {
                        continue;
                    }
                    logical_nonzero += BS as u64;
                    if seen.insert(*blake3::hash(block).as_bytes()) {
                        unique_raw += BS as u64;
                        ideal += lz4_flex::block::compress(block).len() as u64;
                    }
                }
                let len = buf.len() as u64;
                vol.write(off, Bytes::from(buf), false).await?;
                off += len;
            }
            println!("wrote {f} ({len} bytes) into volume {name}");
        }
        engine.flush().await?;
        let s = engine.node_stats();
        println!();
        println!("| measure | bytes |");
        println!("|---|---|");
        println!("| logical non-zero data written | {logical_nonzero} |");
        println!("| engine logical_bytes | {} |", s.logical_bytes);
        println!(
            "| unique (after dedup), ideal / engine | {unique_raw} / {} |",
            s.unique_bytes
        );
        println!("| ideal stored (sum of lz4 sizes of unique blocks) | {ideal} |");
        println!(
            "| engine stored_bytes (payload + 64-byte headers) | {} |",
            s.stored_bytes
        );
        println!(
            "| engine used_bytes (segments incl. padding + metadata) | {} |",
            s.used_bytes
        );
        println!();
        println!(
            "stored / ideal = {:.3} (target <= 1.15); dedup {:.2}x, compression {:.2}x",
            s.stored_bytes as f64 / ideal as f64,
            s.dedup_ratio,
            s.compression_ratio
        );
        engine.shutdown().await?;
        anyhow::Ok(())
    })
}
