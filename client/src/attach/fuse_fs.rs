//! The FUSE filesystem of a FUSE attachment: a root directory holding one
//! regular file, named after the volume, whose bytes are the volume's.
//!
//! Every operation on the file is answered from a tokio task, so the FUSE
//! threads only decode requests and many NBD requests are in flight at once.
//! Files are opened with `FOPEN_DIRECT_IO` (no page cache here: every read
//! and write reaches ballastd, so a loop device, several processes and
//! `fsync` all see one truth) and `FOPEN_PARALLEL_DIRECT_WRITES` (the kernel
//! does not serialise writes to the file). `fsync` and the `flush` of `close`
//! become NBD FLUSH.

use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use tokio::runtime::Handle;

use super::pool::Pool;

/// Inode of the volume file (the root is [`INodeNo::ROOT`]).
pub const FILE_INO: INodeNo = INodeNo(2);
/// How long the kernel may cache names and attributes: they never change.
const TTL: Duration = Duration::from_secs(3600);
/// Largest write the kernel sends in one request (and read ahead size).
pub const MAX_IO: u32 = 1 << 20;
/// Block size reported by `stat`.
const BLKSIZE: u32 = 4096;

/// The part of a read at `offset` of `len` bytes that lies inside a file of
/// `size` bytes: `None` at or past the end (the reply is empty, EOF).
pub fn read_span(size: u64, offset: u64, len: u32) -> Option<(u64, usize)> {
    if offset >= size || len == 0 {
        return None;
    }
    let n = (size - offset).min(len as u64);
    Some((offset, n as usize))
}

/// The part of a write at `offset` of `len` bytes that fits a file of
/// `size` bytes. A volume cannot grow: a write starting at or past the end
/// fails with ENOSPC (as on a block device); one that crosses the end is
/// shortened to the bytes that fit (a short write).
pub fn write_span(size: u64, offset: u64, len: usize) -> Result<usize, i32> {
    if len == 0 {
        return Ok(0);
    }
    if offset >= size {
        return Err(libc::ENOSPC);
    }
    Ok((size - offset).min(len as u64) as usize)
}

/// What an `fallocate(mode, offset, length)` on the volume file does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallocateOp {
    /// Allocate inside the file: nothing to do.
    Nothing,
    /// Punch a hole of this many bytes (NBD TRIM).
    Discard(u64),
    /// Zero this many bytes (NBD WRITE_ZEROES).
    Zero(u64),
}

/// Decide an `fallocate` on a file of `size` bytes: only `KEEP_SIZE`,
/// `PUNCH_HOLE` (with `KEEP_SIZE`, as Linux requires) and `ZERO_RANGE` are
/// known; ranges are clipped to the file, which never grows.
pub fn fallocate_op(mode: i32, size: u64, offset: u64, length: u64) -> Result<FallocateOp, i32> {
    let known = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
    if mode & !known != 0 {
        return Err(libc::EOPNOTSUPP);
    }
    let end = offset.checked_add(length).ok_or(libc::EFBIG)?;
    let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
    let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
    let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    if punch && (zero || !keep) {
        return Err(libc::EINVAL);
    }
    if !punch && !zero {
        // Plain allocation: fine inside the file, growing is impossible.
        return if end <= size || keep {
            Ok(FallocateOp::Nothing)
        } else {
            Err(libc::EFBIG)
        };
    }
    let len = end.min(size).saturating_sub(offset);
    if len == 0 {
        return Ok(FallocateOp::Nothing);
    }
    Ok(if punch {
        FallocateOp::Discard(len)
    } else {
        FallocateOp::Zero(len)
    })
}

/// The filesystem.
pub struct VolumeFs {
    name: OsString,
    pool: Arc<Pool>,
    rt: Handle,
    read_only: bool,
    uid: u32,
    gid: u32,
    created: SystemTime,
}

impl VolumeFs {
    /// A filesystem presenting `pool`'s export as the file `name`; request
    /// tasks run on `rt`.
    pub fn new(name: &str, pool: Arc<Pool>, rt: Handle) -> VolumeFs {
        let read_only = pool.flags().read_only();
        VolumeFs {
            name: OsString::from(name),
            pool,
            rt,
            read_only,
            // SAFETY: getuid/getgid have no preconditions.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
            created: SystemTime::now(),
        }
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, size, perm, nlink) = if ino == FILE_INO {
            let perm = if self.read_only { 0o444 } else { 0o644 };
            (FileType::RegularFile, self.pool.size(), perm, 1)
        } else {
            (FileType::Directory, 0, 0o755, 2)
        };
        FileAttr {
            ino,
            size,
            // The volume is thin, but `du` of the file is not the place to
            // learn that; report it as fully allocated.
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        }
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large requests: a loop device sends up to its max_sectors at once.
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // Many requests in flight: they are served concurrently.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Let one direct I/O be split into parallel requests (kernel >= 3.x).
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == self.name.as_os_str() {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == FILE_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != FILE_INO && ino != INodeNo::ROOT {
            reply.error(Errno::ENOENT);
            return;
        }
        // The size is the volume's (`ballast volume resize` changes it);
        // truncation is refused. Owner, mode and time changes are accepted
        // and forgotten, so tools like `cp --preserve` or `touch` work.
        match size {
            Some(s) if ino == FILE_INO && s != self.pool.size() => reply.error(Errno::EPERM),
            _ => reply.attr(&TTL, &self.attr(ino)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(Errno::EROFS);
            return;
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        let Some((off, len)) = read_span(self.pool.size(), offset, size) else {
            reply.data(&[]);
            return;
        };
        let pool = self.pool.clone();
        self.rt.spawn(async move {
            match pool.read(off, len).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    tracing::warn!(offset = off, len, error = %e, "read failed");
                    reply.error(errno(e.errno()));
                }
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        let n = match write_span(self.pool.size(), offset, data.len()) {
            Ok(0) => {
                reply.written(0);
                return;
            }
            Ok(n) => n,
            Err(e) => {
                reply.error(errno(e));
                return;
            }
        };
        // The request buffer is reused by the FUSE thread: copy once.
        let data = Bytes::copy_from_slice(&data[..n]);
        let pool = self.pool.clone();
        self.rt.spawn(async move {
            match pool.write(offset, data).await {
                Ok(()) => reply.written(n as u32),
                Err(e) => {
                    tracing::warn!(offset, len = n, error = %e, "write failed");
                    reply.error(errno(e.errno()));
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(): flush only when something waits for it, so reading the
        // file costs no FLUSH, and close() reports a lost write like fsync
        // while ballastd answers; it never waits for a reconnect (see
        // `Pool::flush_unless_down`).
        if ino != FILE_INO || !self.pool.dirty() {
            reply.ok();
            return;
        }
        let pool = self.pool.clone();
        self.rt.spawn(async move {
            match pool.flush_unless_down().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::error!(error = %e, "flush on close failed");
                    reply.error(errno(e.errno()));
                }
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            reply.ok();
            return;
        }
        let pool = self.pool.clone();
        self.rt.spawn(async move {
            match pool.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::error!(error = %e, "fsync failed");
                    reply.error(errno(e.errno()));
                }
            }
        });
    }

    /// Loop devices turn discard into `PUNCH_HOLE` and write-zeroes into
    /// `ZERO_RANGE`: both become NBD TRIM / WRITE_ZEROES, so `fstrim` on a
    /// file system above frees space in ballastd. Plain allocation is a
    /// no-op (the volume has its size already); growing is refused.
    #[allow(clippy::too_many_arguments)]
    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        let size = self.pool.size();
        let op = match fallocate_op(mode, size, offset, length) {
            Ok(op) => op,
            Err(e) => {
                reply.error(errno(e));
                return;
            }
        };
        let (discard, len) = match op {
            FallocateOp::Nothing => {
                reply.ok();
                return;
            }
            _ if self.read_only => {
                reply.error(Errno::EROFS);
                return;
            }
            FallocateOp::Discard(len) => (true, len),
            FallocateOp::Zero(len) => (false, len),
        };
        let pool = self.pool.clone();
        self.rt.spawn(async move {
            match pool.zero(offset, len, discard).await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::warn!(offset, len, discard, error = %e, "fallocate failed");
                    reply.error(errno(e.errno()));
                }
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, self.name.as_os_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.pool.size().div_ceil(BLKSIZE as u64);
        reply.statfs(blocks, 0, 0, 1, 0, BLKSIZE, 255, BLKSIZE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_at_the_end() {
        assert_eq!(read_span(8192, 0, 4096), Some((0, 4096)));
        assert_eq!(read_span(8192, 6144, 4096), Some((6144, 2048)));
        assert_eq!(read_span(8192, 8192, 4096), None);
        assert_eq!(read_span(8192, 9000, 1), None);
        assert_eq!(read_span(8192, 0, 0), None);
        assert_eq!(
            read_span(u64::MAX, u64::MAX - 1, 10),
            Some((u64::MAX - 1, 1))
        );
    }

    #[test]
    fn fallocate_modes() {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | keep;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        assert_eq!(fallocate_op(0, 8192, 0, 4096), Ok(FallocateOp::Nothing));
        assert_eq!(fallocate_op(0, 8192, 4096, 8192), Err(libc::EFBIG));
        assert_eq!(
            fallocate_op(keep, 8192, 4096, 8192),
            Ok(FallocateOp::Nothing)
        );
        assert_eq!(
            fallocate_op(punch, 8192, 4096, 4096),
            Ok(FallocateOp::Discard(4096))
        );
        assert_eq!(
            fallocate_op(punch, 8192, 4096, 1 << 20),
            Ok(FallocateOp::Discard(4096))
        );
        assert_eq!(fallocate_op(zero, 8192, 0, 100), Ok(FallocateOp::Zero(100)));
        assert_eq!(
            fallocate_op(zero, 8192, 9000, 100),
            Ok(FallocateOp::Nothing)
        );
        assert_eq!(
            fallocate_op(libc::FALLOC_FL_PUNCH_HOLE, 8192, 0, 1),
            Err(libc::EINVAL)
        );
        assert_eq!(
            fallocate_op(libc::FALLOC_FL_COLLAPSE_RANGE, 8192, 0, 1),
            Err(libc::EOPNOTSUPP)
        );
        assert_eq!(fallocate_op(zero, 8192, u64::MAX, 2), Err(libc::EFBIG));
    }

    #[test]
    fn writes_never_grow_the_volume() {
        assert_eq!(write_span(8192, 0, 4096), Ok(4096));
        assert_eq!(write_span(8192, 6144, 4096), Ok(2048));
        assert_eq!(write_span(8192, 8192, 1), Err(libc::ENOSPC));
        assert_eq!(write_span(8192, 8192, 0), Ok(0));
        assert_eq!(write_span(8192, 100, 0), Ok(0));
    }
}
