//! The seam between the NBD server and whatever stores the bytes.
//!
//! # Call-ordering contract
//!
//! For one connection, the server invokes the methods of [`Export`] from a
//! single task, **in the order the requests arrived on the socket**, and
//! polls each returned future once (before invoking the method for the next
//! request) before it may hand the future to another task to finish.
//!
//! An implementation must therefore make the *ordering-relevant effect* of
//! `write`, `trim` and `write_zeroes` happen no later than that first poll
//! (either inside the method call itself or in the first `poll` before it
//! returns `Pending`): once it has happened, every call started afterwards
//! (on this or any other connection) must observe it, and a later-started
//! overlapping write must win over it. Waiting for durability (FUA, flush)
//! may happen later, in subsequent polls.
//!
//! Further promises the server relies on:
//! * `flush` makes every write that had *completed* (its future resolved
//!   `Ok`) before `flush` was called durable, across the whole node, so that
//!   `NBD_FLAG_CAN_MULTI_CONN` holds.
//! * A write with `fua == true` resolves only once its data is durable.
//! * `read` returns exactly `len` bytes (holes read as zeros).
//! * Ranges passed in are always inside `0..size()` (the server checks), and
//!   `read`/`write` lengths are at most 32 MiB.
//! * Dropping a future that was polled at least once must not undo the effect
//!   (the server never does so while the connection lives, but a shutting-down
//!   runtime might).

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::proto;

/// A read's bytes, possibly in pieces: an export may hand out cached blocks
/// as they are, and the server sends the pieces with vectored I/O rather
/// than copying them into one buffer.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    parts: Vec<Bytes>,
    len: usize,
}

impl Payload {
    pub fn from_parts(parts: Vec<Bytes>) -> Payload {
        let len = parts.iter().map(Bytes::len).sum();
        Payload { parts, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces that make up `at..at + len` (clamped to the payload).
    pub fn pieces(&self, at: usize, len: usize) -> impl Iterator<Item = Bytes> + '_ {
        let end = at.saturating_add(len).min(self.len);
        let mut pos = 0usize;
        self.parts.iter().filter_map(move |p| {
            let (lo, hi) = (pos, pos + p.len());
            pos = hi;
            let (from, to) = (lo.max(at), hi.min(end));
            (from < to).then(|| p.slice(from - lo..to - lo))
        })
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Payload {
        Payload {
            len: b.len(),
            parts: vec![b],
        }
    }
}

/// What every export operation returns.
pub type ExportFuture<T> = Pin<Box<dyn Future<Output = Result<T, ExportError>> + Send + 'static>>;

/// Errors an export reports; each maps to one NBD error value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// Media or internal failure (`NBD_EIO`).
    #[error("I/O error: {0}")]
    Io(String),
    /// Out of space (`NBD_ENOSPC`).
    #[error("no space left")]
    NoSpace,
    /// The export does not accept writes (`NBD_EPERM`).
    #[error("export is read-only")]
    ReadOnly,
    /// Bad arguments (`NBD_EINVAL`).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The operation cannot be done as asked, e.g. a fast zero that would not
    /// be fast (`NBD_ENOTSUP`).
    #[error("operation not supported: {0}")]
    NotSupported(String),
    /// The export is shutting down (`NBD_ESHUTDOWN`).
    #[error("shutting down")]
    Shutdown,
    /// The export no longer exists (its volume was deleted): the request
    /// fails with `NBD_EIO` and the server then closes the connection, so
    /// the client sees the device go away instead of an endless run of
    /// errors.
    #[error("export is gone: {0}")]
    Gone(String),
}

impl ExportError {
    /// The NBD error value sent to the client.
    pub fn errno(&self) -> u32 {
        match self {
            ExportError::Io(_) | ExportError::Gone(_) => proto::EIO,
            ExportError::NoSpace => proto::ENOSPC,
            ExportError::ReadOnly => proto::EPERM,
            ExportError::Invalid(_) => proto::EINVAL,
            ExportError::NotSupported(_) => proto::ENOTSUP,
            ExportError::Shutdown => proto::ESHUTDOWN,
        }
    }
}

/// A run of bytes with one allocation status, in offset order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    pub fn data(len: u64) -> Extent {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }

    pub fn hole(len: u64) -> Extent {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }

    /// `base:allocation` status bits.
    pub fn flags(&self) -> u32 {
        (if self.hole { proto::STATE_HOLE } else { 0 })
            | (if self.zero { proto::STATE_ZERO } else { 0 })
    }

    /// Whether the run reads as zeros (so a read may send it as a hole
    /// chunk). Holes read as zeros by the [`Export`] contract.
    pub fn reads_as_zero(&self) -> bool {
        self.zero || self.hole
    }
}

/// One exported block device. See the module documentation for the
/// call-ordering contract.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes, fixed for the life of a connection.
    fn size(&self) -> u64;
    /// Preferred block size (the volume's block size).
    fn block_size(&self) -> u32;
    fn read_only(&self) -> bool;
    /// Human-readable description (shown by `nbdinfo`).
    fn description(&self) -> String;

    /// Reads `len` bytes at `offset`; holes read as zeros.
    fn read(&self, offset: u64, len: u32) -> ExportFuture<Bytes>;

    /// Like [`Export::read`], as pieces, also telling which parts read as
    /// zeros so that structured replies can send them as hole chunks. The
    /// server reads through this method. The extents must cover exactly
    /// `len` bytes; if they do not, the server ignores them.
    fn read_extents(&self, offset: u64, len: u32) -> ExportFuture<(Payload, Vec<Extent>)> {
        let f = self.read(offset, len);
        Box::pin(async move {
            let data = f.await?;
            let n = data.len() as u64;
            Ok((data.into(), vec![Extent::data(n)]))
        })
    }

    /// Writes `data` at `offset`; with `fua`, resolves only once durable.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> ExportFuture<()>;

    /// Discards a range (reads back as zeros afterwards in this project).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportFuture<()>;

    /// Zeroes a range; with `no_hole` the range must stay allocated.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> ExportFuture<()>;

    /// Makes every completed write of the whole node durable (the
    /// multi-connection promise).
    fn flush(&self) -> ExportFuture<()>;

    /// Allocation status of a range, in order, starting at `offset`. May cover
    /// less than `len` (the reply then does, and the client asks again) but
    /// should cover at least one byte. The server asks about at most 64 Ki
    /// blocks of [`Export::block_size`] per call; an export whose lookup
    /// can block (on a lock or the disk) should do it off the async worker.
    fn block_status(&self, offset: u64, len: u64) -> ExportFuture<Vec<Extent>>;

    /// Prefetch hint.
    fn cache(&self, offset: u64, len: u64) -> ExportFuture<()>;

    /// Runs `poll`, one turn of a connection's request loop, which may start
    /// several requests. An export whose backend can start a burst of I/O
    /// together for less than one at a time (the engine's io_uring ring)
    /// wraps it so; the default just runs it.
    fn start_together(&self, poll: &mut dyn FnMut()) {
        poll()
    }
}

/// The set of exports a server offers.
pub trait ExportCatalog: Send + Sync + 'static {
    /// `(name, description)` of every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
    /// Opens an export by name; `""` may map to a default export or `None`.
    fn open(&self, name: &str) -> Option<Arc<dyn Export>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_pieces_cover_exactly_the_asked_range() {
        let p = Payload::from_parts(vec![
            Bytes::from_static(b"abcd"),
            Bytes::new(),
            Bytes::from_static(b"efg"),
            Bytes::from_static(b"hijkl"),
        ]);
        assert_eq!(p.len(), 12);
        let join = |at, len| -> Vec<u8> { p.pieces(at, len).flat_map(|b| b.to_vec()).collect() };
        assert_eq!(join(0, 12), b"abcdefghijkl");
        assert_eq!(join(2, 7), b"cdefghi");
        assert_eq!(join(4, 3), b"efg");
        assert_eq!(join(5, 1), b"f");
        assert_eq!(join(10, 100), b"kl");
        assert!(join(12, 5).is_empty());
        // No empty pieces: each one becomes an iovec.
        assert!(p.pieces(0, 12).all(|b| !b.is_empty()));
        let one = Payload::from(Bytes::from_static(b"xyz"));
        assert_eq!(
            one.pieces(1, 1).collect::<Vec<_>>(),
            vec![Bytes::from_static(b"y")]
        );
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(ExportError::Io("x".into()).errno(), 5);
        assert_eq!(ExportError::NoSpace.errno(), 28);
        assert_eq!(ExportError::ReadOnly.errno(), 1);
        assert_eq!(ExportError::Invalid("x".into()).errno(), 22);
        assert_eq!(ExportError::NotSupported("x".into()).errno(), 95);
        assert_eq!(ExportError::Shutdown.errno(), 108);
    }

    #[test]
    fn extent_flags() {
        assert_eq!(Extent::hole(1).flags(), 3);
        assert_eq!(Extent::data(1).flags(), 0);
        assert_eq!(
            Extent {
                len: 1,
                hole: false,
                zero: true
            }
            .flags(),
            2
        );
        assert_eq!(
            Extent {
                len: 1,
                hole: true,
                zero: false
            }
            .flags(),
            1
        );
    }
}
