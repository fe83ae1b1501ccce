//! Small, fast, deterministic random numbers for the load generator.
//! Not for anything that needs unpredictability.

/// SplitMix64 step: a good 64-bit mixer, used to derive seeds.
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xorshift64* generator.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator seeded from `seed` (any value, zero included).
    pub fn new(seed: u64) -> XorShift {
        let s = splitmix64(seed);
        XorShift(if s == 0 { 0x2545_f491_4f6c_dd1d } else { s })
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// True with probability `percent`/100.
    #[inline]
    pub fn percent(&mut self, percent: u8) -> bool {
        self.below(100) < percent as u64
    }
}

/// Fill `buf` with pseudo-random bytes derived from `seed`: four independent
/// xorshift lanes, 32 bytes per round (the loop vectorises well).
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut s = [
        splitmix64(seed) | 1,
        splitmix64(seed ^ 0x1111_1111_1111_1111) | 1,
        splitmix64(seed ^ 0x2222_2222_2222_2222) | 1,
        splitmix64(seed ^ 0x3333_3333_3333_3333) | 1,
    ];
    let mut chunks = buf.chunks_exact_mut(32);
    for c in &mut chunks {
        for (lane, st) in s.iter_mut().enumerate() {
            let mut x = *st;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *st = x;
            c[lane * 8..lane * 8 + 8].copy_from_slice(&x.to_le_bytes());
        }
    }
    let rest = chunks.into_remainder();
    let mut x = s[0] ^ s[1].rotate_left(17) ^ s[2].rotate_left(31) ^ s[3].rotate_left(47);
    for part in rest.chunks_mut(8) {
        x = splitmix64(x);
        part.copy_from_slice(&x.to_le_bytes()[..part.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_is_in_range_and_spread() {
        let mut r = XorShift::new(0);
        let mut hits = [0u32; 10];
        for _ in 0..100_000 {
            let v = r.below(10);
            hits[v as usize] += 1;
        }
        for h in hits {
            assert!((9_000..11_000).contains(&h), "{hits:?}");
        }
    }

    #[test]
    fn fill_is_deterministic() {
        let mut a = vec![0u8; 4097];
        let mut b = vec![0u8; 4097];
        fill_random(&mut a, 5);
        fill_random(&mut b, 5);
        assert_eq!(a, b);
        fill_random(&mut b, 6);
        assert_ne!(a, b);
        let zeros = a.iter().filter(|&&x| x == 0).count();
        assert!(zeros < 60, "{zeros} zero bytes");
    }
}
