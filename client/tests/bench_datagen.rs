//! The data generator delivers the dedupe and compression ratios asked for,
//! measured the way a store would: blake3 digests for duplicates, lz4 for
//! compressibility.

use std::collections::HashSet;

use ballast_client::bench::datagen::DataGen;

struct Measured {
    duplicate_share: f64,
    lz4_ratio: f64,
}

fn measure(block_size: usize, dedupe: u8, compress: u8, blocks: usize) -> Measured {
    let gen = DataGen::new(block_size, dedupe, compress, 42);
    let mut seen = HashSet::new();
    let (mut dups, mut raw, mut packed) = (0usize, 0usize, 0usize);
    // Several streams, like several workers, interleaved.
    let mut streams: Vec<_> = (0..4).map(|i| gen.stream(i)).collect();
    let mut buf = vec![0u8; block_size];
    for i in 0..blocks {
        let n = streams.len();
        let key = streams[i % n].next_key();
        gen.fill(key, &mut buf);
        if !seen.insert(*blake3::hash(&buf).as_bytes()) {
            dups += 1;
            continue;
        }
        raw += buf.len();
        packed += lz4_flex::block::compress(&buf).len();
    }
    Measured {
        duplicate_share: dups as f64 / blocks as f64,
        lz4_ratio: packed as f64 / raw as f64,
    }
}

#[test]
fn ratios_match_what_was_asked() {
    for (bs, dedupe, compress) in [
        (4096, 0, 0),
        (4096, 30, 50),
        (4096, 50, 0),
        (4096, 0, 75),
        (4096, 80, 20),
        (65536, 25, 60),
        (512, 10, 40),
    ] {
        let blocks = if bs >= 65536 { 3000 } else { 20_000 };
        let m = measure(bs, dedupe, compress, blocks);
        let want_dup = dedupe as f64 / 100.0;
        let want_lz4 = (100 - compress) as f64 / 100.0;
        eprintln!(
            "bs {bs} d {dedupe} c {compress}: dup {:.4} lz4 {:.4}",
            m.duplicate_share, m.lz4_ratio
        );
        assert!(
            (m.duplicate_share - want_dup).abs() < 0.02,
            "bs {bs} dedupe {dedupe}%: measured {:.3} duplicates",
            m.duplicate_share
        );
        assert!(
            (m.lz4_ratio - want_lz4).abs() < 0.03,
            "bs {bs} compress {compress}%: lz4 ratio {:.3}, wanted {want_lz4:.2}",
            m.lz4_ratio
        );
    }
}

#[test]
fn no_block_is_all_zero_and_unique_blocks_stay_unique() {
    let gen = DataGen::new(4096, 0, 100, 1);
    let mut seen = HashSet::new();
    for k in 0..2000u64 {
        let b = gen.block(k);
        assert!(b.iter().any(|&x| x != 0));
        assert!(seen.insert(*blake3::hash(&b).as_bytes()));
    }
}
