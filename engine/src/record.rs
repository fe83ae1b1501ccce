//! Stored records: one block's bytes (raw or lz4) behind a 64-byte header,
//! packed back to back in a segment.
//!
//! ```text
//!  0 u32 magic 0x43455242 ("BREC")
//!  4 u32 crc32 of bytes 8..64 of the header followed by the payload
//!  8 u8  codec: 0 raw, 1 lz4
//!  9 [3] zero
//! 12 u32 stored (payload) length
//! 16 u32 raw (uncompressed) length
//! 20 u32 zero
//! 24 [32] blake3 of the raw block
//! 56 u64 nonce: 0 for content-addressed (dedup) records, unique otherwise
//! 64 ..  payload
//! ```

use crate::key::BlockKey;

pub const RECORD_MAGIC: u32 = 0x4345_5242;
pub const HEADER_LEN: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    Raw = 0,
    Lz4 = 1,
}

impl Codec {
    pub fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Lz4),
            _ => None,
        }
    }
}

/// Compress with lz4 when it pays (saves at least 1/16 of the block), else keep raw.
pub fn compress(raw: &[u8], allow_lz4: bool) -> (Codec, Option<Vec<u8>>) {
    if !allow_lz4 {
        return (Codec::Raw, None);
    }
    // The compressor's hash table and output buffer live per thread:
    // allocating and zeroing a fresh table per block was most of lz4's cost
    // (13% of ballastd's CPU under 4 KiB random writes).
    thread_local! {
        static SCRATCH: std::cell::RefCell<(lz4_flex::block::CompressTable, Vec<u8>)> =
            std::cell::RefCell::new((lz4_flex::block::CompressTable::small(), Vec::new()));
    }
    SCRATCH.with_borrow_mut(|(table, out)| {
        out.resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
        match lz4_flex::block::compress_into_with_table(raw, out, table) {
            Ok(n) if n + raw.len() / 16 <= raw.len() => (Codec::Lz4, Some(out[..n].to_vec())),
            _ => (Codec::Raw, None),
        }
    })
}

/// Append header + payload for `key` to `out`.
pub fn encode_into(out: &mut [u8], key: &BlockKey, codec: Codec, raw_len: u32, payload: &[u8]) {
    out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    out[8] = codec as u8;
    out[9..12].fill(0);
    out[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    out[16..20].copy_from_slice(&raw_len.to_le_bytes());
    out[20..24].fill(0);
    out[24..56].copy_from_slice(&key.hash);
    out[56..64].copy_from_slice(&key.nonce.to_le_bytes());
    out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    let mut h = crc32fast::Hasher::new();
    h.update(&out[8..HEADER_LEN]);
    h.update(payload);
    out[4..8].copy_from_slice(&h.finalize().to_le_bytes());
}

/// A parsed header; `decode` checks everything a reader must trust.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub codec: Codec,
    pub stored_len: u32,
    pub raw_len: u32,
    pub key: BlockKey,
}

pub fn parse_header(b: &[u8]) -> Option<Header> {
    if b.len() < HEADER_LEN || u32::from_le_bytes(b[0..4].try_into().ok()?) != RECORD_MAGIC {
        return None;
    }
    Some(Header {
        codec: Codec::from_u8(b[8])?,
        stored_len: u32::from_le_bytes(b[12..16].try_into().ok()?),
        raw_len: u32::from_le_bytes(b[16..20].try_into().ok()?),
        key: BlockKey {
            hash: b[24..56].try_into().ok()?,
            nonce: u64::from_le_bytes(b[56..64].try_into().ok()?),
        },
    })
}

/// Why a stored record could not be trusted.
#[derive(Debug, PartialEq, Eq)]
pub enum RecordFault {
    Checksum,
    WrongKey,
    Decompress,
}

/// The record at the start of `b`, if it is whole and its crc matches.
pub fn checked_header(b: &[u8]) -> Option<Header> {
    let h = parse_header(b)?;
    let end = HEADER_LEN + h.stored_len as usize;
    if b.len() < end {
        return None;
    }
    let mut c = crc32fast::Hasher::new();
    c.update(&b[8..HEADER_LEN]);
    c.update(&b[HEADER_LEN..end]);
    (c.finalize() == u32::from_le_bytes(b[4..8].try_into().ok()?)).then_some(h)
}

/// Verify the record at the start of `b` against its crc and the expected key,
/// and return the raw block.
pub fn decode(b: &[u8], expect: &BlockKey, out: &mut [u8]) -> Result<(), RecordFault> {
    let h = checked_header(b).ok_or(RecordFault::Checksum)?;
    let end = HEADER_LEN + h.stored_len as usize;
    if h.raw_len as usize != out.len() {
        return Err(RecordFault::Checksum);
    }
    if h.key != *expect {
        return Err(RecordFault::WrongKey);
    }
    let payload = &b[HEADER_LEN..end];
    match h.codec {
        Codec::Raw => {
            if payload.len() != out.len() {
                return Err(RecordFault::Decompress);
            }
            out.copy_from_slice(payload);
        }
        Codec::Lz4 => {
            let n = lz4_flex::block::decompress_into(payload, out)
                .map_err(|_| RecordFault::Decompress)?;
            if n != out.len() {
                return Err(RecordFault::Decompress);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: &[u8]) -> BlockKey {
        BlockKey::content(blake3::hash(b).into())
    }

    #[test]
    fn round_trip_raw_and_lz4() {
        let compressible = vec![7u8; 4096];
        let random: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for raw in [&compressible, &random] {
            let (codec, c) = compress(raw, true);
            let payload = c.as_deref().unwrap_or(raw);
            let mut buf = vec![0u8; HEADER_LEN + payload.len()];
            encode_into(&mut buf, &key(raw), codec, raw.len() as u32, payload);
            let mut out = vec![0u8; raw.len()];
            decode(&buf, &key(raw), &mut out).unwrap();
            assert_eq!(&out, raw);
        }
        assert_eq!(compress(&compressible, true).0, Codec::Lz4);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let raw = vec![3u8; 512];
        let (codec, c) = compress(&raw, true);
        let payload = c.unwrap();
        let mut buf = vec![0u8; HEADER_LEN + payload.len()];
        encode_into(&mut buf, &key(&raw), codec, 512, &payload);
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x40;
            let mut out = vec![0u8; 512];
            assert!(
                decode(&b, &key(&raw), &mut out).is_err(),
                "flip at {i} not detected"
            );
        }
    }
}
