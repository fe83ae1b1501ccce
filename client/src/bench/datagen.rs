//! Block contents with a chosen share of duplicates and a chosen
//! compressibility, so that a deduplicating, compressing store is measured on
//! data it can neither dedupe nor compress better than asked (zeros or one
//! repeated buffer would flatter it).
//!
//! The anchors are fio's `dedupe_percentage` and `buffer_compress_percentage`:
//!
//! * **dedupe**: each block a [`KeyStream`] hands out is, with probability
//!   `dedupe_percent`, a repeat of a block that stream handed out earlier;
//!   otherwise it is new. About `dedupe_percent` of the blocks written are
//!   therefore duplicates of earlier blocks.
//! * **compression**: a block is cut into segments of 512 bytes; in each,
//!   the first `100 - compress_percent` percent of the bytes (less the few
//!   bytes lz4 spends per segment) are random and the rest are zeroes, so lz4
//!   (or any LZ compressor) shrinks a block to about `100 - compress_percent`
//!   percent of its size, and no block is all zeroes (the first 16 bytes are
//!   always random).
//!
//! A block's content is a pure function of `(seed, key)`: the verifier
//! regenerates what it expects from the key it recorded for the block.

use super::rng::{fill_random, splitmix64, XorShift};

/// Compressibility is laid out per segment of this many bytes.
pub const SEGMENT: usize = 512;
/// Random bytes at the start of every block, so no two keys collide.
const MIN_RANDOM: usize = 16;
/// What lz4 spends on a segment of random bytes then zeroes (literal-run
/// token and length, match offset and length), and again at the end of a
/// block (its last bytes must be literals). Taken off the random part so
/// the compressed size lands on the asked-for ratio rather than ~2% above.
const LZ4_SEGMENT_COST: usize = 8;
/// Bits of a key that number blocks within one stream.
const INDEX_BITS: u32 = 40;

/// Generator of block contents.
#[derive(Debug, Clone)]
pub struct DataGen {
    block_size: usize,
    dedupe_percent: u8,
    compress_percent: u8,
    seed: u64,
}

impl DataGen {
    /// A generator of `block_size`-byte blocks. Percentages above 100 are
    /// clamped to 100.
    pub fn new(block_size: usize, dedupe_percent: u8, compress_percent: u8, seed: u64) -> DataGen {
        DataGen {
            block_size,
            dedupe_percent: dedupe_percent.min(100),
            compress_percent: compress_percent.min(100),
            seed,
        }
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Share of duplicate blocks, in percent.
    pub fn dedupe_percent(&self) -> u8 {
        self.dedupe_percent
    }

    /// Share of each block that compresses away, in percent.
    pub fn compress_percent(&self) -> u8 {
        self.compress_percent
    }

    /// A stream of block keys; streams with different ids never share a key.
    pub fn stream(&self, id: u32) -> KeyStream {
        KeyStream {
            rng: XorShift::new(self.seed ^ splitmix64(0x5eed_0000 + id as u64)),
            base: (id as u64) << INDEX_BITS,
            uniques: 0,
            dedupe_percent: self.dedupe_percent,
        }
    }

    /// Write the content of block `key` into `buf` (any length; normally the
    /// block size).
    pub fn fill(&self, key: u64, buf: &mut [u8]) {
        let seed = splitmix64(self.seed ^ splitmix64(key));
        let keep = 100 - self.compress_percent as usize;
        if keep == 100 {
            fill_random(buf, seed);
            return;
        }
        let segments = buf.len().div_ceil(SEGMENT);
        for (i, seg) in buf.chunks_mut(SEGMENT).enumerate() {
            let mut random = (seg.len() * keep).div_ceil(100);
            let cost = if i + 1 == segments {
                2 * LZ4_SEGMENT_COST
            } else {
                LZ4_SEGMENT_COST
            };
            random = random.saturating_sub(cost);
            if i == 0 {
                random = random.max(MIN_RANDOM.min(seg.len()));
            }
            let (r, z) = seg.split_at_mut(random);
            fill_random(r, seed.wrapping_add(i as u64));
            z.fill(0);
        }
    }

    /// The content of block `key` as a new vector.
    pub fn block(&self, key: u64) -> Vec<u8> {
        let mut v = vec![0u8; self.block_size];
        self.fill(key, &mut v);
        v
    }
}

/// Hands out block keys: new ones, and repeats of earlier ones at the
/// configured rate.
#[derive(Debug, Clone)]
pub struct KeyStream {
    rng: XorShift,
    base: u64,
    uniques: u64,
    dedupe_percent: u8,
}

impl KeyStream {
    /// The key of the next block to write.
    #[inline]
    pub fn next_key(&mut self) -> u64 {
        if self.uniques > 0 && self.dedupe_percent > 0 && self.rng.percent(self.dedupe_percent) {
            self.base | self.rng.below(self.uniques)
        } else {
            let k = self.base | self.uniques;
            self.uniques += 1;
            k
        }
    }

    /// Distinct blocks handed out so far.
    pub fn unique_blocks(&self) -> u64 {
        self.uniques
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_distinct() {
        let g = DataGen::new(4096, 0, 60, 1);
        assert_eq!(g.block(7), g.block(7));
        assert_ne!(g.block(7), g.block(8));
        assert_ne!(g.block(7), DataGen::new(4096, 0, 60, 2).block(7));
        let all = DataGen::new(4096, 0, 100, 1);
        assert_ne!(all.block(1), all.block(2));
        assert!(all.block(1)[MIN_RANDOM..].iter().all(|&b| b == 0));
    }

    #[test]
    fn odd_sizes() {
        for bs in [1, 15, 511, 513, 4095, 65536] {
            let g = DataGen::new(bs, 0, 50, 3);
            assert_eq!(g.block(1).len(), bs);
        }
    }

    #[test]
    fn streams_do_not_collide() {
        let g = DataGen::new(512, 50, 0, 0);
        let mut a = g.stream(0);
        let mut b = g.stream(1);
        let ka: Vec<u64> = (0..100).map(|_| a.next_key()).collect();
        let kb: Vec<u64> = (0..100).map(|_| b.next_key()).collect();
        assert!(ka.iter().all(|k| !kb.contains(k)));
        assert_eq!(ka[0], 0);
    }
}
