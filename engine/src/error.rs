//! The engine's error type. Callers (the NBD server, the control plane) must
//! tell these cases apart to map them onto NBD errnos and gRPC codes.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("volume \"{0}\" not found")]
    VolumeNotFound(String),
    #[error("volume \"{0}\" already exists: pick another name or delete it first")]
    VolumeExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("volume \"{0}\" is a read-only snapshot: clone it to get a writable volume")]
    ReadOnly(String),
    #[error("range {offset}+{len} is outside volume of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the pool is full: delete or trim data, or add a disk with --disk")]
    NoSpace,
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("checksum mismatch reading block of volume \"{volume}\" at offset {offset}: the stored record is corrupt")]
    Checksum { volume: String, offset: u64 },
    #[error("disk {path}: {reason}")]
    Disk { path: PathBuf, reason: String },
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata store error: {0}")]
    Meta(String),
    #[error("corrupt metadata: {0}")]
    CorruptMeta(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("writes acknowledged earlier could not be stored yet ({0}); they stay buffered and are retried: check the pool and the logs")]
    WriteBack(String),
}

impl EngineError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        EngineError::Io {
            what: what.into(),
            source,
        }
    }

    /// True when retrying the same request can never succeed without operator action.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            EngineError::VolumeNotFound(_)
                | EngineError::VolumeExists(_)
                | EngineError::InvalidArgument(_)
                | EngineError::ReadOnly(_)
                | EngineError::OutOfRange { .. }
                | EngineError::FailedPrecondition(_)
        )
    }
}

impl From<fjall::Error> for EngineError {
    fn from(e: fjall::Error) -> Self {
        EngineError::Meta(e.to_string())
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
