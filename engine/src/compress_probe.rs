//! Whether a volume's new blocks are worth handing to lz4.
//!
//! lz4 on a block it cannot shrink by 1/16 (random, encrypted or already
//! compressed data) costs as much as on one it can, and the block is then
//! stored raw anyway: 8% of the engine's CPU under incompressible 4 KiB
//! writes. Like btrfs, which stops compressing a file whose writes do not
//! compress, a volume that has just stored `SKIP_AFTER` blocks in a row
//! that lz4 could not shrink stores the next ones raw without trying, but
//! still tries one block in `PROBE_EVERY` (picked by its hash, so no
//! shared counter is touched per block): the first probe that compresses
//! ends the run. Data that compresses never enters a run, so its space
//! efficiency is unchanged; what a run costs is that compressible blocks
//! written among incompressible ones, until a probe finds one, are stored
//! raw (docs/benchmarks.md, session 20, measures both).

use std::sync::atomic::{AtomicU32, Ordering};

/// Blocks in a row that lz4 could not shrink before the volume skips it.
const SKIP_AFTER: u32 = 64;

/// While skipping, one block in this many is still tried.
const PROBE_EVERY: u8 = 16;

#[derive(Default)]
pub(crate) struct CompressProbe {
    /// Blocks in a row lz4 could not shrink, saturating at `SKIP_AFTER`.
    /// Written only when it changes, so writers of a volume on several
    /// cores mostly share the line read-only.
    run: AtomicU32,
}

impl CompressProbe {
    /// Whether to try lz4 on a new block whose blake3 hash is `hash`.
    pub fn should_try(&self, hash: &[u8; 32]) -> bool {
        self.run.load(Ordering::Relaxed) < SKIP_AFTER || hash[31].is_multiple_of(PROBE_EVERY)
    }

    /// What trying lz4 on a block gave.
    pub fn tried(&self, shrank: bool) {
        let run = self.run.load(Ordering::Relaxed);
        if shrank {
            if run != 0 {
                self.run.store(0, Ordering::Relaxed);
            }
        } else if run < SKIP_AFTER {
            self.run.store(run + 1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u8) -> [u8; 32] {
        let mut h = [0u8; 32];
        h[31] = i;
        h
    }

    #[test]
    fn skips_after_a_run_and_a_probe_that_compresses_ends_it() {
        let p = CompressProbe::default();
        for i in 0..SKIP_AFTER {
            assert!(p.should_try(&hash(i as u8 | 1)), "block {i} of the run");
            p.tried(false);
        }
        let tried = (0..=255u8).filter(|&i| p.should_try(&hash(i))).count();
        assert_eq!(tried, 256 / PROBE_EVERY as usize, "only probes are tried");
        // A probe that does not compress keeps the run; one that does ends it.
        p.tried(false);
        assert!(!p.should_try(&hash(1)));
        p.tried(true);
        assert!(p.should_try(&hash(1)));
    }

    #[test]
    fn compressible_blocks_break_every_run() {
        let p = CompressProbe::default();
        for _ in 0..1000 {
            for _ in 0..SKIP_AFTER - 1 {
                p.tried(false);
            }
            p.tried(true);
            assert!(p.should_try(&hash(1)));
        }
    }
}
