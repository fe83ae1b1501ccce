//! Engine settings and the options chosen when a volume is created.

use crate::io::{BackendChoice, DiskIo};
use std::path::PathBuf;
use std::sync::Arc;

/// One pool disk as the operator names it.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub path: PathBuf,
    /// Size of the sparse file to create when `path` does not exist.
    pub create_size: Option<u64>,
}

/// Opens a disk instead of the real I/O backend (crash-simulation tests).
pub type DiskOpener = Arc<dyn Fn(&DiskSpec) -> std::io::Result<Arc<dyn DiskIo>> + Send + Sync>;

#[derive(Clone)]
pub struct EngineConfig {
    /// Folder holding the metadata store (`meta/`).
    pub data_dir: PathBuf,
    /// Disks to use. Disks already in the pool are reopened from the pool's
    /// own list; disks named here and not yet in the pool are formatted and added.
    pub disks: Vec<DiskSpec>,
    pub backend: BackendChoice,
    /// Segment size for newly created pools (power of two, 1–64 MiB).
    pub segment_size: u32,
    /// Metadata store block cache.
    pub meta_cache_bytes: u64,
    /// Decoded block-map and record-index entries (see `entry_cache`).
    pub entry_cache_bytes: u64,
    /// Commit at least this often when there are unflushed writes, so crash
    /// loss and recovery work stay bounded even for clients that never flush.
    pub commit_interval: std::time::Duration,
    /// Decoded blocks kept in memory for reads (0 disables the cache).
    pub read_cache_bytes: u64,
    /// Memory for the bitmap of mapped blocks (see `block_filter`); `None`:
    /// 128 MiB per TiB of pool, at least 64 MiB. Past it, volumes that need
    /// more are looked up in the cache and the store instead.
    pub block_filter_bytes: Option<u64>,
    /// Completed writes held in memory before they are hashed and stored
    /// (see `write_back`); 0 stores every write as it comes.
    pub write_back_bytes: u64,
    /// A buffered write older than this is stored even when the buffer has
    /// room (the page cache's dirty expiry).
    pub write_back_expire: std::time::Duration,
    /// Run the background space cleaner.
    pub cleaner: bool,
    /// Test hook: open disks through this instead of the I/O backend.
    pub disk_opener: Option<DiskOpener>,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.into(),
            disks: Vec::new(),
            backend: BackendChoice::Auto,
            segment_size: 4 << 20,
            meta_cache_bytes: 64 << 20,
            entry_cache_bytes: 256 << 20,
            commit_interval: std::time::Duration::from_secs(1),
            read_cache_bytes: 256 << 20,
            block_filter_bytes: None,
            write_back_bytes: 0,
            write_back_expire: std::time::Duration::from_secs(30),
            cleaner: true,
            disk_opener: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Lz4,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "lz4" => Ok(Compression::Lz4),
            "none" | "off" => Ok(Compression::None),
            other => Err(format!("unknown compression \"{other}\": use lz4 or none")),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
        })
    }
}

#[derive(Clone, Debug)]
pub struct VolumeOptions {
    pub size: u64,
    pub block_size: u32,
    pub dedup: bool,
    pub compression: Compression,
}

impl VolumeOptions {
    pub fn new(size: u64) -> VolumeOptions {
        VolumeOptions {
            size,
            block_size: 4096,
            dedup: true,
            compression: Compression::Lz4,
        }
    }
}

/// What a caller sees of a volume.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VolumeInfo {
    pub id: u32,
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub dedup: bool,
    pub compression: Compression,
    pub read_only: bool,
    /// For snapshots: the volume it was taken of. For clones: the snapshot.
    pub parent: Option<String>,
    pub mapped_bytes: u64,
    pub generation: u64,
    pub created_unix: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DiskStats {
    pub disk_id: u32,
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub segments_total: u64,
    pub segments_used: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeStats {
    pub node_id: String,
    pub pool_id: String,
    pub io_backend: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub logical_bytes: u64,
    pub unique_bytes: u64,
    pub stored_bytes: u64,
    pub metadata_bytes: u64,
    /// Metadata store memory: block cache in use, and memtables not yet flushed.
    pub metadata_cache_bytes: u64,
    pub metadata_write_buffer_bytes: u64,
    /// The in-memory filter over the record index (fixed by pool capacity).
    pub record_filter_bytes: u64,
    /// The bitmap of blocks that may be mapped (grows with the block maps,
    /// bounded; see `block_filter`).
    pub block_filter_bytes: u64,
    /// The entry cache in use (bounded by `EngineConfig::entry_cache_bytes`).
    pub entry_cache_bytes: u64,
    /// The read cache's memory: its entries, and the parts of shared runs
    /// they no longer use (bounded by `EngineConfig::read_cache_bytes`).
    pub read_cache_bytes: u64,
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
    pub checksum_errors: u64,
    pub disks: Vec<DiskStats>,
}
