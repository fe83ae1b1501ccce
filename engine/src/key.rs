//! Identities of stored blocks and the big-endian key encodings used in the
//! metadata store (big endian so that range scans follow block order).

/// A block's identity: its blake3 hash plus a nonce. Dedup volumes use nonce 0
/// (pure content addressing); volumes with dedup off get a fresh nonce per
/// write, so identical content is stored again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockKey {
    pub hash: [u8; 32],
    pub nonce: u64,
}

/// Hash tables of block keys (the overlay, the entry cache, the read cache)
/// hash the key's 8-byte [`BlockKey::fingerprint`] instead of all 40 bytes;
/// equality still compares the whole key. Hashing the whole key (foldhash
/// over 32 bytes, then the nonce) was 1.5-2% of the engine's CPU under
/// 4 KiB writes.
impl std::hash::Hash for BlockKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.fingerprint());
    }
}

pub const BLOCK_KEY_LEN: usize = 40;

impl BlockKey {
    pub fn content(hash: [u8; 32]) -> BlockKey {
        BlockKey { hash, nonce: 0 }
    }

    /// 8 bytes that stand for the key in hash tables and filters: blake3
    /// hashes are already uniform, so the first 8 bytes of the hash, mixed
    /// with the nonce that tells copies in dedup-off volumes apart.
    pub fn fingerprint(&self) -> u64 {
        let head = u64::from_le_bytes(self.hash[..8].try_into().expect("8 of 32 bytes"));
        head ^ self.nonce.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// The key as five words (the hash's four, little endian, then the
    /// nonce): how the entry cache's tables hold it in their slots.
    pub fn to_words(&self) -> [u64; 5] {
        let w =
            |i: usize| u64::from_le_bytes(self.hash[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        [w(0), w(1), w(2), w(3), self.nonce]
    }

    /// The inverse of [`BlockKey::to_words`].
    pub fn from_words(w: &[u64; 5]) -> BlockKey {
        let mut hash = [0u8; 32];
        for (c, word) in hash.chunks_exact_mut(8).zip(w) {
            c.copy_from_slice(&word.to_le_bytes());
        }
        BlockKey { hash, nonce: w[4] }
    }

    pub fn encode(&self) -> [u8; BLOCK_KEY_LEN] {
        let mut b = [0u8; BLOCK_KEY_LEN];
        b[..32].copy_from_slice(&self.hash);
        b[32..].copy_from_slice(&self.nonce.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<BlockKey> {
        if b.len() != BLOCK_KEY_LEN {
            return None;
        }
        Some(BlockKey {
            hash: b[..32].try_into().ok()?,
            nonce: u64::from_be_bytes(b[32..].try_into().ok()?),
        })
    }
}

/// Key of one block-map entry: volume id then block index.
pub fn map_key(volume: u32, lba: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&volume.to_be_bytes());
    b[4..].copy_from_slice(&lba.to_be_bytes());
    b
}

pub fn decode_map_key(b: &[u8]) -> Option<(u32, u64)> {
    if b.len() != 12 {
        return None;
    }
    Some((
        u32::from_be_bytes(b[..4].try_into().ok()?),
        u64::from_be_bytes(b[4..].try_into().ok()?),
    ))
}

/// A segment: which disk, and its index among that disk's segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentId {
    pub disk: u32,
    pub index: u32,
}

impl SegmentId {
    pub fn encode(&self) -> [u8; 8] {
        ((self.disk as u64) << 32 | self.index as u64).to_be_bytes()
    }

    pub fn decode(b: &[u8]) -> Option<SegmentId> {
        let v = u64::from_be_bytes(b.try_into().ok()?);
        Some(SegmentId {
            disk: (v >> 32) as u32,
            index: v as u32,
        })
    }
}

/// Where a record lives and what it holds; the value of the record index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    pub segment: SegmentId,
    /// Byte offset of the record header inside the segment.
    pub offset: u32,
    /// Payload length on disk (header not included).
    pub stored_len: u32,
    pub raw_len: u32,
    pub refs: u32,
}

pub const RECORD_META_LEN: usize = 24;

impl RecordMeta {
    /// Bytes the record occupies in its segment.
    pub fn footprint(&self) -> u64 {
        crate::record::HEADER_LEN as u64 + self.stored_len as u64
    }

    pub fn encode(&self) -> [u8; RECORD_META_LEN] {
        let mut b = [0u8; RECORD_META_LEN];
        b[0..8].copy_from_slice(&self.segment.encode());
        b[8..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.refs.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<RecordMeta> {
        if b.len() != RECORD_META_LEN {
            return None;
        }
        let u = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        Some(RecordMeta {
            segment: SegmentId::decode(&b[0..8])?,
            offset: u(8),
            stored_len: u(12),
            raw_len: u(16),
            refs: u(20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_and_sort() {
        let k = BlockKey {
            hash: [9; 32],
            nonce: 77,
        };
        assert_eq!(BlockKey::decode(&k.encode()), Some(k));
        assert!(map_key(1, 255) < map_key(1, 256));
        assert!(map_key(1, u64::MAX) < map_key(2, 0));
        assert_eq!(decode_map_key(&map_key(5, 9)), Some((5, 9)));
        let s = SegmentId {
            disk: 3,
            index: 1000,
        };
        assert_eq!(SegmentId::decode(&s.encode()), Some(s));
        let m = RecordMeta {
            segment: s,
            offset: 12345,
            stored_len: 2000,
            raw_len: 4096,
            refs: 3,
        };
        assert_eq!(RecordMeta::decode(&m.encode()), Some(m));
    }
}
