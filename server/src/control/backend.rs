//! The seam between the gRPC control plane and the storage engine.
//!
//! The gRPC layer validates and defaults every request, then calls a
//! [`ControlBackend`] with plain Rust values. Implementations never see
//! protobuf types and never need to re-validate names or sizes.

use std::fmt;
use std::str::FromStr;

/// Default block size used when a create request passes 0.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Smallest supported block size.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest supported block size.
pub const MAX_BLOCK_SIZE: u32 = 65536;
/// Replica count used when a create request passes 0.
pub const DEFAULT_REPLICAS: u32 = 1;

/// Control-plane operations the engine must provide.
///
/// All methods are synchronous metadata operations; the gRPC handlers run
/// them on tokio's blocking pool.
pub trait ControlBackend: Send + Sync + 'static {
    /// Create a new empty volume. `req` is already validated and defaulted.
    fn create_volume(&self, req: CreateVolume) -> Result<VolumeView, ControlError>;
    /// Delete a volume or snapshot.
    fn delete_volume(&self, name: &str) -> Result<(), ControlError>;
    /// All volumes and snapshots, in any order (the service sorts by name).
    fn list_volumes(&self) -> Result<Vec<VolumeView>, ControlError>;
    /// One volume or snapshot.
    fn get_volume(&self, name: &str) -> Result<VolumeView, ControlError>;
    /// Change a volume's logical size. `new_size` is > 0 and a multiple of
    /// the volume's block size.
    fn resize_volume(&self, name: &str, new_size: u64) -> Result<VolumeView, ControlError>;
    /// Take a read-only snapshot named `snapshot` of `volume`; returns the snapshot.
    fn snapshot(&self, volume: &str, snapshot: &str) -> Result<VolumeView, ControlError>;
    /// Create writable volume `new_volume` from `snapshot`; returns the new volume.
    fn clone_snapshot(&self, snapshot: &str, new_volume: &str) -> Result<VolumeView, ControlError>;
    /// Node identity and space accounting.
    fn node_info(&self) -> Result<NodeView, ControlError>;
}

/// Errors a backend reports; each maps to one gRPC status code.
///
/// The string is the complete, user-facing message (it is shown verbatim by
/// the CLI as `error: <message>`), e.g. `volume "db1" not found`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// → `NOT_FOUND`
    #[error("{0}")]
    NotFound(String),
    /// → `ALREADY_EXISTS`
    #[error("{0}")]
    AlreadyExists(String),
    /// → `RESOURCE_EXHAUSTED`
    #[error("{0}")]
    ResourceExhausted(String),
    /// → `INVALID_ARGUMENT`
    #[error("{0}")]
    InvalidArgument(String),
    /// → `FAILED_PRECONDITION`
    #[error("{0}")]
    FailedPrecondition(String),
    /// → `INTERNAL`
    #[error("{0}")]
    Internal(String),
}

impl ControlError {
    /// `volume "<name>" not found`
    pub fn volume_not_found(name: &str) -> Self {
        ControlError::NotFound(format!("volume {name:?} not found"))
    }

    /// `volume "<name>" already exists`
    pub fn volume_exists(name: &str) -> Self {
        ControlError::AlreadyExists(format!("volume {name:?} already exists"))
    }
}

/// Per-volume compression setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    #[default]
    Lz4,
    None,
}

impl Compression {
    /// The wire/CLI spelling: `"lz4"` or `"none"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Lz4 => "lz4",
            Compression::None => "none",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = ControlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lz4" => Ok(Compression::Lz4),
            "none" => Ok(Compression::None),
            other => Err(ControlError::InvalidArgument(format!(
                "unknown compression {other:?}; pass \"lz4\" or \"none\""
            ))),
        }
    }
}

/// A validated create request with all defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    pub name: String,
    /// > 0 and a multiple of `block_size`.
    pub size_bytes: u64,
    /// Power of two in `MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE`.
    pub block_size: u32,
    pub dedup: bool,
    pub compression: Compression,
    /// >= 1.
    pub replicas: u32,
}

/// One replica of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaView {
    pub node: String,
    /// e.g. "healthy", "degraded", "rebuilding".
    pub state: String,
}

/// A volume or snapshot as reported to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeView {
    pub name: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub mapped_bytes: u64,
    pub dedup: bool,
    pub compression: Compression,
    /// True for snapshots.
    pub read_only: bool,
    /// For clones: the snapshot this volume was cloned from.
    pub parent_snapshot: Option<String>,
    pub replicas: Vec<ReplicaView>,
    pub generation: u64,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

/// One backing disk of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskView {
    pub path: String,
    pub disk_id: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

/// Node identity and space accounting.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub node_id: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Bytes written by clients.
    pub logical_bytes: u64,
    /// Logical bytes after deduplication.
    pub unique_bytes: u64,
    /// Bytes on disk after deduplication and compression.
    pub stored_bytes: u64,
    /// logical / unique.
    pub dedup_ratio: f64,
    /// unique / stored.
    pub compression_ratio: f64,
    pub io_backend: String,
    pub disks: Vec<DiskView>,
    pub checksum_errors: u64,
    pub version: String,
    /// The NBD listen address (`HOST:PORT`), empty when there is none.
    pub nbd_address: String,
}
