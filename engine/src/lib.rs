//! Ballast storage engine: a node's pool of disks turned into thin,
//! deduplicated, compressed, checksummed block volumes. No networking here.
//!
//! Module map, from the disk up:
//! - [`io`]: data-disk I/O behind one seam — io_uring, a thread-pool
//!   fallback, and a crash-simulating disk for tests.
//! - `superblock`: the versioned, checksummed header of each pool disk.
//! - `pool`: the disks of a pool and the allocation of their segments.
//! - `record`: the on-disk record (header, crc32, lz4 or raw payload).
//! - `compress_probe`: skips lz4 on volumes whose writes do not compress.
//! - `segment`: the writer that packs records into append-only segments.
//! - `key`: block identities (blake3 + nonce) and metadata key encodings.
//! - `meta`: the fjall metadata store (block maps, record index, segments).
//! - `record_filter`: a Bloom filter that answers record-index misses in memory.
//! - `block_filter`: a bitmap of the blocks that may have a committed mapping.
//! - `entry_cache`: recently used committed block-map and record-index entries.
//! - `map_cache`, `record_cache`: its two halves, block-mapping groups and
//!   records, each in a `set_table`: a set-associative cache table.
//! - `state`: the in-memory overlay of uncommitted metadata changes.
//! - `engine`: opening/recovery, group commit, control operations, stats.
//! - `volume`: the read and write paths of one volume.
//! - `read_cache`: decoded blocks by identity, shared by all volumes; the
//!   blocks of a large read or write are kept in 64 KiB runs.
//! - `shard_cache`: the read cache's storage: quick_cache shards with batch
//!   lookups and updates that lock each shard once per batch.
//! - `write_back`: completed writes held in memory until a background
//!   drainer stores them (the page cache's role for a file server).
//! - `cleaner`: space reclamation.
//!
//! docs/ARCHITECTURE.md describes the formats and the crash-recovery argument.

mod block_filter;
mod cleaner;
mod compress_probe;
mod config;
mod engine;
mod entry_cache;
mod error;
pub mod io;
mod key;
mod map_cache;
// For the record-filter benchmark (benches/benches/record_filter.rs).
#[doc(hidden)]
pub use key::BlockKey;
mod meta;
mod pool;
mod read_cache;
mod record;
mod record_cache;
// Public only for the criterion benchmark that compares it with fastbloom
// (benches/benches/record_filter.rs).
#[doc(hidden)]
pub mod record_filter;
mod segment;
mod set_table;
// Public only for the criterion benchmark that compares it with
// quick_cache's own locking (benches/benches/cache.rs).
#[doc(hidden)]
pub mod shard_cache;
mod state;
mod superblock;
mod volume;
mod write_back;

pub use config::{
    Compression, DiskOpener, DiskSpec, DiskStats, EngineConfig, NodeStats, VolumeInfo,
    VolumeOptions,
};
pub use engine::{validate_name, Engine};
pub use error::{EngineError, Result};
pub use volume::{EngineFuture, Extent, ReadData, ReadParts, Volume, MAX_IO};
