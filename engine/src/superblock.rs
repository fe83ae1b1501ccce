//! The versioned, checksummed superblock at offset 0 of every pool disk.
//!
//! Layout (little endian, 4096 bytes):
//! ```text
//!   0  [8]  magic "BALLAST\0"
//!   8  u32  format version
//!  12  u32  segment size in bytes
//!  16  [16] pool id
//!  32  [16] node id
//!  48  u32  disk id (unique within the pool)
//!  52  u32  reserved (0)
//!  56  u64  disk size in bytes at format time
//!  64  u64  byte offset of the first segment
//!  72  u64  format time (unix seconds)
//!  80  ..   zero
//! 4092 u32  crc32 of bytes 0..4092
//! ```

use crate::error::{EngineError, Result};
use std::path::Path;

pub const SUPERBLOCK_SIZE: usize = 4096;
pub const MAGIC: &[u8; 8] = b"BALLAST\0";
pub const FORMAT_VERSION: u32 = 1;
/// Segments start at 1 MiB so the superblock never shares an erase block with data.
pub const DATA_OFFSET: u64 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub segment_size: u32,
    pub pool_id: [u8; 16],
    pub node_id: [u8; 16],
    pub disk_id: u32,
    pub disk_size: u64,
    pub data_offset: u64,
    pub created_unix: u64,
}

impl Superblock {
    pub fn encode(&self) -> [u8; SUPERBLOCK_SIZE] {
        let mut b = [0u8; SUPERBLOCK_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.segment_size.to_le_bytes());
        b[16..32].copy_from_slice(&self.pool_id);
        b[32..48].copy_from_slice(&self.node_id);
        b[48..52].copy_from_slice(&self.disk_id.to_le_bytes());
        b[56..64].copy_from_slice(&self.disk_size.to_le_bytes());
        b[64..72].copy_from_slice(&self.data_offset.to_le_bytes());
        b[72..80].copy_from_slice(&self.created_unix.to_le_bytes());
        let crc = crc32fast::hash(&b[..SUPERBLOCK_SIZE - 4]);
        b[SUPERBLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check a superblock read from `path` (named in every error).
    pub fn decode(b: &[u8], path: &Path) -> Result<Superblock> {
        let bad = |reason: String| EngineError::Disk {
            path: path.to_path_buf(),
            reason,
        };
        if b.len() < SUPERBLOCK_SIZE {
            return Err(bad("too small to hold a superblock".into()));
        }
        if &b[0..8] != MAGIC {
            return Err(bad(
                "no Ballast superblock (not formatted by Ballast, or overwritten)".into(),
            ));
        }
        let stored =
            u32::from_le_bytes(b[SUPERBLOCK_SIZE - 4..SUPERBLOCK_SIZE].try_into().unwrap());
        if crc32fast::hash(&b[..SUPERBLOCK_SIZE - 4]) != stored {
            return Err(bad(
                "superblock checksum mismatch: the disk header is corrupt".into(),
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "unknown on-disk format version {version} (this build reads version {FORMAT_VERSION}): upgrade ballastd"
            )));
        }
        Ok(Superblock {
            version,
            segment_size: u32_at(12),
            pool_id: b[16..32].try_into().unwrap(),
            node_id: b[32..48].try_into().unwrap(),
            disk_id: u32_at(48),
            disk_size: u64_at(56),
            data_offset: u64_at(64),
            created_unix: u64_at(72),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            segment_size: 4 << 20,
            pool_id: [1; 16],
            node_id: [2; 16],
            disk_id: 3,
            disk_size: 1 << 30,
            data_offset: DATA_OFFSET,
            created_unix: 1_700_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(Superblock::decode(&s.encode(), Path::new("d")).unwrap(), s);
    }

    #[test]
    fn corruption_and_version_are_named() {
        let mut b = sample().encode();
        b[20] ^= 1;
        let e = Superblock::decode(&b, Path::new("/x/disk0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/disk0") && e.contains("checksum"), "{e}");

        let mut s = sample();
        s.version = 9;
        let e = Superblock::decode(&s.encode(), Path::new("d"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 9"), "{e}");

        let e = Superblock::decode(&[0u8; 4096], Path::new("d"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no Ballast superblock"), "{e}");
    }
}
