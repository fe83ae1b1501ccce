//! Data-disk I/O: one seam (`DiskIo`) with an io_uring backend, a thread-pool
//! fallback, and (for tests) a crash-simulating in-memory disk.
//!
//! Buffers are owned (`AlignedBuf`) and travel into the backend and back with
//! the result, so a dropped future never frees memory the kernel still writes.

mod aligned;
pub mod crash_sim;
mod threads;
mod uring;

pub use aligned::{AlignedBuf, SharedBuf};
pub use crash_sim::CrashSimDisk;

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

/// Every data-disk write's offset and length, and every buffer's address,
/// is a multiple of this (O_DIRECT on any device we target).
pub const IO_ALIGN: usize = 4096;

/// The finest read granularity any disk offers: reads are aligned to the
/// disk's [`DiskIo::read_align`], which is between this and [`IO_ALIGN`].
pub const SECTOR: usize = 512;

pub type IoFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One open data disk (a regular file or a block device).
pub trait DiskIo: Send + Sync + 'static {
    /// Fill all of `buf` from `offset` (both multiples of `read_align`). A
    /// short read is an `UnexpectedEof` error.
    fn read_at(&self, buf: AlignedBuf, offset: u64) -> IoFuture<(AlignedBuf, io::Result<()>)>;
    /// Write all of `buf` at `offset` (both multiples of [`IO_ALIGN`]).
    fn write_at(&self, buf: AlignedBuf, offset: u64) -> IoFuture<(AlignedBuf, io::Result<()>)>;
    /// Make every completed write durable (fdatasync).
    fn sync(&self) -> IoFuture<io::Result<()>>;
    /// Size of the disk in bytes.
    fn len(&self) -> u64;
    /// True for a zero-byte disk (which can serve no I/O at all).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Alignment of read offsets and lengths: the device's direct-I/O
    /// granularity (often 512 bytes), so a small record costs a small read
    /// rather than one or two whole 4 KiB pages.
    fn read_align(&self) -> usize {
        IO_ALIGN
    }
}

/// Which backend actually serves I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackendKind {
    Uring,
    Threads,
}

/// What the operator asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring if the kernel (and seccomp) allow it, else the thread pool.
    #[default]
    Auto,
    Uring,
    Threads,
}

/// A running I/O backend shared by every disk of a node.
#[derive(Clone)]
pub struct IoEngine {
    inner: Arc<EngineInner>,
}

enum EngineInner {
    Uring(uring::UringBackend),
    Threads(threads::ThreadBackend),
}

/// Worker threads of the fallback backend. They spend their life blocked in
/// pread/pwrite/fdatasync, so there are more of them than cores: enough to
/// keep a few NVMe queues busy, few enough to be cheap.
const THREAD_POOL_SIZE: usize = 16;

/// What a backend does for one [`Request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Sync,
}

/// The buffer (absent for a sync) and the outcome, sent back to the future.
type Reply = (Option<AlignedBuf>, io::Result<()>);

/// One I/O on its way through a backend. It owns everything the kernel
/// touches: the buffer, and (through the `Arc`) the open file, so neither can
/// be freed or closed (and the fd number reused by another file) until the
/// backend has finished with it, whatever became of the caller's future.
struct Request {
    op: Op,
    file: Arc<std::fs::File>,
    offset: u64,
    buf: Option<AlignedBuf>,
    reply: tokio::sync::oneshot::Sender<Reply>,
}

impl Request {
    /// Hand the buffer and the outcome back. If the future was dropped the
    /// send fails and the buffer is freed here, after the I/O is over.
    fn finish(self, res: io::Result<()>) {
        let Request { buf, reply, .. } = self;
        let _ = reply.send((buf, res));
    }
}

fn backend_stopped() -> io::Error {
    io::Error::other("the I/O backend has stopped")
}

/// The checks every `DiskIo` makes before any I/O, so that both real backends
/// and the crash simulator agree: offsets and lengths are aligned (O_DIRECT
/// would refuse otherwise, but only on some backends and filesystems) — reads
/// to `read_align`, writes to [`IO_ALIGN`] — and nothing runs past the end of
/// the disk (a read there would come back short or as zeros, and a write
/// would grow a file the pool believes has a fixed size).
fn check_range(
    op: Op,
    offset: u64,
    len: usize,
    disk_len: u64,
    read_align: usize,
) -> io::Result<()> {
    let align = if op == Op::Read { read_align } else { IO_ALIGN };
    if !offset.is_multiple_of(align as u64) || !len.is_multiple_of(align) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("I/O of {len} bytes at offset {offset} is not aligned to {align} bytes"),
        ));
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= disk_len => Ok(()),
        _ => Err(io::Error::new(
            if op == Op::Read {
                io::ErrorKind::UnexpectedEof
            } else {
                io::ErrorKind::InvalidInput
            },
            format!(
                "{len} bytes at offset {offset} run past the end of the disk ({disk_len} bytes)"
            ),
        )),
    }
}

/// Runs `f` with the io_uring submissions it makes on this thread held
/// back, then starts them all with one `io_uring_enter`.
///
/// Each submission otherwise enters the kernel on its own. A caller that
/// issues a burst of I/O in one go (an NBD connection decoding the dozen
/// requests one socket read brought) saves a system call per request, and
/// the block layer sees the burst as one plug: on a virtual disk, one
/// notification of the device instead of one per request. Requests are
/// queued, never lost: a hold always ends with the submission, even when
/// `f` panics. No effect on the thread-pool backend.
///
/// Meant for a future's `poll`, which starts work and returns. A blocking
/// wait for a completion inside `f` (an assisted wait, off the runtime's
/// workers) submits what is held itself, so it cannot wait forever.
pub fn hold_submissions<R>(f: impl FnOnce() -> R) -> R {
    uring::hold_submissions(f)
}

impl IoEngine {
    /// Start the backend `choice` asks for. `Auto` tries io_uring and falls
    /// back to the thread pool (with one warning) when the kernel or a
    /// seccomp filter refuses it; an explicit `Uring` fails instead, so an
    /// operator who asked for it learns it is not in use.
    pub fn new(choice: BackendChoice) -> io::Result<IoEngine> {
        let inner = match choice {
            BackendChoice::Threads => {
                EngineInner::Threads(threads::ThreadBackend::new(THREAD_POOL_SIZE)?)
            }
            BackendChoice::Uring => {
                EngineInner::Uring(uring::UringBackend::new().map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("io_uring is unavailable ({e}); use --io-backend threads"),
                    )
                })?)
            }
            BackendChoice::Auto => match uring::UringBackend::new() {
                Ok(u) => EngineInner::Uring(u),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "io_uring is unavailable, using the thread-pool I/O backend instead \
                         (the usual cause is Docker's default seccomp profile, which blocks io_uring)"
                    );
                    EngineInner::Threads(threads::ThreadBackend::new(THREAD_POOL_SIZE)?)
                }
            },
        };
        Ok(IoEngine {
            inner: Arc::new(inner),
        })
    }

    /// The backend actually serving I/O (after any `Auto` fallback).
    pub fn kind(&self) -> BackendKind {
        match &*self.inner {
            EngineInner::Uring(_) => BackendKind::Uring,
            EngineInner::Threads(_) => BackendKind::Threads,
        }
    }

    /// `"io_uring"` or `"threads"`, for logs and stats.
    pub fn describe(&self) -> &'static str {
        match self.kind() {
            BackendKind::Uring => "io_uring",
            BackendKind::Threads => "threads",
        }
    }

    /// Open a data disk (regular file or block device) read-write with
    /// O_DIRECT, so the page cache neither doubles memory use nor hides
    /// write errors until fsync. A missing path is created as a sparse file
    /// of `create_size` bytes when that is given. Filesystems that refuse
    /// O_DIRECT (tmpfs) get buffered I/O and a warning: still correct, since
    /// `sync` is fdatasync either way.
    ///
    /// The disk's length is fixed at open: a regular file's metadata length
    /// (not rounded; I/O must still end within it), a block device's size.
    /// The disk keeps this engine (and so its backend) alive.
    pub fn open_disk(&self, path: &Path, create_size: Option<u64>) -> io::Result<Arc<dyn DiskIo>> {
        use std::os::unix::fs::FileTypeExt;

        let file = match open_rw(path, true) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && create_size.is_some() => {
                create_sparse(path, create_size.unwrap_or_default())?;
                open_rw(path, true)
            }
            r => r,
        };
        let (file, read_align) = match file {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "the filesystem refuses O_DIRECT; using buffered I/O for this disk"
                );
                // The page cache serves any alignment.
                (open_rw(path, false)?, SECTOR)
            }
            r => {
                let f = r?;
                let align = direct_read_align(&f);
                (f, align)
            }
        };
        let ft = file.metadata()?.file_type();
        let len = if ft.is_file() {
            file.metadata()?.len()
        } else if ft.is_block_device() {
            use std::io::Seek;
            // Seeking to the end is the portable way to size a block device
            // (the same answer as the BLKGETSIZE64 ioctl). Positioned I/O
            // never uses the file position, so moving it is harmless.
            (&file).seek(io::SeekFrom::End(0))?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        };
        Ok(Arc::new(FileDisk {
            file: Arc::new(file),
            len,
            read_align,
            engine: self.clone(),
        }))
    }

    /// Queue `op` and return the future its reply arrives through. Never blocks.
    fn submit(
        &self,
        op: Op,
        file: &Arc<std::fs::File>,
        offset: u64,
        buf: Option<AlignedBuf>,
    ) -> ReplyFuture {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let req = Request {
            op,
            file: file.clone(),
            offset,
            buf,
            reply,
        };
        let assist = match &*self.inner {
            EngineInner::Uring(u) => u.submit(req),
            EngineInner::Threads(t) => {
                t.submit(req);
                None
            }
        };
        ReplyFuture { rx, assist }
    }
}

/// The reply to one [`Request`]. Mostly just the oneshot receiver; the
/// io_uring backend may also wait for the completion on the polling thread
/// itself when that thread is not a runtime worker (see `uring::Assist`).
struct ReplyFuture {
    rx: tokio::sync::oneshot::Receiver<Reply>,
    assist: Option<uring::Assist>,
}

impl Future for ReplyFuture {
    type Output = Result<Reply, tokio::sync::oneshot::error::RecvError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = &mut *self;
        match &this.assist {
            Some(a) => a.poll_reply(&mut this.rx, cx),
            None => Pin::new(&mut this.rx).poll(cx),
        }
    }
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEngine")
            .field("backend", &self.describe())
            .finish()
    }
}

/// The offset alignment O_DIRECT needs on `file` (statx's DIOALIGN, Linux
/// 6.1+: the device's logical block size, 512 bytes on most disks), within
/// [`SECTOR`, `IO_ALIGN`]; `IO_ALIGN` where the kernel does not say. Memory
/// alignment needs no check: every buffer is aligned to `IO_ALIGN`.
fn direct_read_align(file: &std::fs::File) -> usize {
    use std::os::fd::AsRawFd;
    const STATX_DIOALIGN: u32 = 0x2000;
    // SAFETY: statx on a live fd with an empty path (AT_EMPTY_PATH) writes
    // only into the zeroed struct we pass; we check the result.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut st,
        )
    };
    let align = st.stx_dio_offset_align as usize;
    if rc == 0
        && st.stx_mask & STATX_DIOALIGN != 0
        && align.is_power_of_two()
        && (st.stx_dio_mem_align as usize) <= IO_ALIGN
    {
        align.clamp(SECTOR, IO_ALIGN)
    } else {
        IO_ALIGN
    }
}

fn open_rw(path: &Path, direct: bool) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
}

/// Create a sparse file of `size` bytes and make its existence durable (the
/// file and its directory entry), since the pool records it as a member.
fn create_sparse(path: &Path, size: u64) -> io::Result<()> {
    let f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        // Someone created it between our open and now: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        r => r?,
    };
    f.set_len(size)?;
    f.sync_all()?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// A data disk served by one of the real backends.
struct FileDisk {
    file: Arc<std::fs::File>,
    len: u64,
    read_align: usize,
    engine: IoEngine,
}

impl FileDisk {
    fn transfer(
        &self,
        op: Op,
        buf: AlignedBuf,
        offset: u64,
    ) -> IoFuture<(AlignedBuf, io::Result<()>)> {
        if let Err(e) = check_range(op, offset, buf.len(), self.len, self.read_align) {
            return Box::pin(std::future::ready((buf, Err(e))));
        }
        let len = buf.len();
        let rx = self.engine.submit(op, &self.file, offset, Some(buf));
        Box::pin(async move {
            match rx.await {
                Ok((Some(buf), res)) => (buf, res),
                // The backend died without answering; its buffer is gone
                // (or deliberately leaked), so hand back a fresh one.
                _ => (AlignedBuf::zeroed(len), Err(backend_stopped())),
            }
        })
    }
}

impl DiskIo for FileDisk {
    fn read_at(&self, buf: AlignedBuf, offset: u64) -> IoFuture<(AlignedBuf, io::Result<()>)> {
        self.transfer(Op::Read, buf, offset)
    }

    fn write_at(&self, buf: AlignedBuf, offset: u64) -> IoFuture<(AlignedBuf, io::Result<()>)> {
        self.transfer(Op::Write, buf, offset)
    }

    fn sync(&self) -> IoFuture<io::Result<()>> {
        let rx = self.engine.submit(Op::Sync, &self.file, 0, None);
        Box::pin(async move {
            rx.await
                .map_or_else(|_| Err(backend_stopped()), |(_, res)| res)
        })
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_align(&self) -> usize {
        self.read_align
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::join_all;
    use std::future::Future;
    use std::path::PathBuf;

    /// Run `check` against each real backend, each time with a fresh temp dir.
    /// io_uring is skipped (with a note) where the kernel or sandbox refuses it.
    async fn on_each_backend<F, Fut>(check: F)
    where
        F: Fn(IoEngine, PathBuf) -> Fut,
        Fut: Future<Output = ()>,
    {
        for choice in [BackendChoice::Uring, BackendChoice::Threads] {
            let engine = match IoEngine::new(choice) {
                Ok(e) => e,
                Err(e) => {
                    assert_eq!(choice, BackendChoice::Uring, "{e}");
                    assert!(e.to_string().contains("--io-backend threads"), "{e}");
                    eprintln!("skipping the io_uring backend: {e}");
                    continue;
                }
            };
            let dir = tempfile::tempdir().unwrap();
            check(engine, dir.path().to_path_buf()).await;
        }
    }

    /// A buffer whose every 8-byte word encodes (`tag`, absolute offset), so
    /// a misplaced or stale block is recognisable.
    fn pattern(len: usize, offset: u64, tag: u64) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(len);
        for (i, w) in b.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(tag << 48 ^ (offset + 8 * i as u64)).to_le_bytes());
        }
        b
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trip_sizes_and_offsets() {
        on_each_backend(|io, dir| async move {
            let disk = io.open_disk(&dir.join("d"), Some(16 << 20)).unwrap();
            assert_eq!(disk.len(), 16 << 20);
            let mut tag = 0;
            for len in [4096, 8192, 3 * 4096, 64 << 10, 1 << 20] {
                for offset in [0u64, 4096, 1 << 20, (16 << 20) - len as u64] {
                    tag += 1;
                    let (_, r) = disk.write_at(pattern(len, offset, tag), offset).await;
                    r.unwrap();
                    let (buf, r) = disk.read_at(AlignedBuf::zeroed(len), offset).await;
                    r.unwrap();
                    assert!(
                        buf[..] == pattern(len, offset, tag)[..],
                        "{} len {len} at {offset}",
                        io.describe()
                    );
                }
            }
            // Reads at the disk's own granularity (512 bytes on this
            // machine's disks): a slice from the middle of a written run.
            let align = disk.read_align();
            assert!(align.is_power_of_two() && (SECTOR..=IO_ALIGN).contains(&align));
            let (_, r) = disk.write_at(pattern(3 * 4096, 8192, 99), 8192).await;
            r.unwrap();
            let (part, r) = disk
                .read_at(AlignedBuf::zeroed(5 * align), 8192 + 3 * align as u64)
                .await;
            r.unwrap();
            let whole = pattern(3 * 4096, 8192, 99);
            assert!(part[..] == whole[3 * align..8 * align], "{}", io.describe());
            disk.sync().await.unwrap();
            // Misaligned offsets and writes past the end are refused up front.
            assert_eq!(
                disk.write_at(pattern(4096, 0, 0), 512)
                    .await
                    .1
                    .unwrap_err()
                    .kind(),
                io::ErrorKind::InvalidInput
            );
            assert_eq!(
                disk.read_at(AlignedBuf::zeroed(512), 100)
                    .await
                    .1
                    .unwrap_err()
                    .kind(),
                io::ErrorKind::InvalidInput
            );
            assert_eq!(
                disk.write_at(AlignedBuf::zeroed(512), 0)
                    .await
                    .1
                    .unwrap_err()
                    .kind(),
                io::ErrorKind::InvalidInput
            );
            assert_eq!(
                disk.write_at(pattern(8192, 0, 0), (16 << 20) - 4096)
                    .await
                    .1
                    .unwrap_err()
                    .kind(),
                io::ErrorKind::InvalidInput
            );
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thousands_in_flight() {
        const N: u64 = 2000;
        on_each_backend(|io, dir| async move {
            let disk = io.open_disk(&dir.join("d"), Some(N * 4096)).unwrap();
            let writes = (0..N).map(|i| disk.write_at(pattern(4096, i * 4096, 7), i * 4096));
            for (_, r) in join_all(writes).await {
                r.unwrap();
            }
            disk.sync().await.unwrap();
            let reads = (0..N).map(|i| disk.read_at(AlignedBuf::zeroed(4096), i * 4096));
            for (i, (buf, r)) in join_all(reads).await.into_iter().enumerate() {
                r.unwrap();
                assert!(
                    buf[..] == pattern(4096, i as u64 * 4096, 7)[..],
                    "{} block {i}",
                    io.describe()
                );
            }
        })
        .await;
    }

    /// Many tasks each doing one I/O at a time: the ring thread keeps going
    /// to sleep and being woken, so a lost wake-up would hang here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sleep_and_wake_many_times() {
        on_each_backend(|io, dir| async move {
            let disk = io.open_disk(&dir.join("d"), Some(1 << 20)).unwrap();
            let tasks = (0..8u64).map(|t| {
                let disk = disk.clone();
                tokio::spawn(async move {
                    for i in 0..300u64 {
                        let off = t * 65536 + (i % 16) * 4096;
                        disk.write_at(pattern(4096, off, i), off).await.1.unwrap();
                        let (buf, r) = disk.read_at(AlignedBuf::zeroed(4096), off).await;
                        r.unwrap();
                        assert!(buf[..] == pattern(4096, off, i)[..]);
                        if i % 100 == 0 {
                            disk.sync().await.unwrap();
                        }
                    }
                })
            });
            let all = join_all(tasks);
            let done = tokio::time::timeout(std::time::Duration::from_secs(60), all).await;
            for r in done.expect("I/O stalled") {
                r.unwrap();
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn synced_data_is_in_the_file() {
        on_each_backend(|io, dir| async move {
            let path = dir.join("d");
            let disk = io.open_disk(&path, Some(1 << 20)).unwrap();
            disk.write_at(pattern(8192, 4096, 3), 4096).await.1.unwrap();
            disk.sync().await.unwrap();
            drop(disk);
            drop(io);
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len(), 1 << 20);
            assert!(bytes[4096..12288] == pattern(8192, 4096, 3)[..]);
            assert!(bytes[..4096].iter().all(|&b| b == 0));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_past_the_end_fail() {
        on_each_backend(|io, dir| async move {
            let path = dir.join("d");
            let disk = io.open_disk(&path, Some(16384)).unwrap();
            disk.write_at(pattern(16384, 0, 1), 0).await.1.unwrap();
            let (_, r) = disk.read_at(AlignedBuf::zeroed(8192), 12288).await;
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
            // The file shrinks behind the disk's back: the kernel now returns
            // a short read, then end of file, which must still be an error
            // (this exercises the backends' own short-transfer handling).
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(4096)
                .unwrap();
            let (_, r) = disk.read_at(AlignedBuf::zeroed(16384), 0).await;
            assert_eq!(
                r.unwrap_err().kind(),
                io::ErrorKind::UnexpectedEof,
                "{}",
                io.describe()
            );
            let (buf, r) = disk.read_at(AlignedBuf::zeroed(4096), 0).await;
            r.unwrap();
            assert!(buf[..] == pattern(4096, 0, 1)[..]);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_futures_are_harmless() {
        on_each_backend(|io, dir| async move {
            let disk = io.open_disk(&dir.join("d"), Some(4 << 20)).unwrap();
            disk.write_at(pattern(4 << 20, 0, 5), 0).await.1.unwrap();
            for round in 0..5 {
                // Start many reads (submission is eager) and drop most of them
                // at once, while their buffers are still in the kernel.
                let futs: Vec<_> = (0..256u64)
                    .map(|i| disk.read_at(AlignedBuf::zeroed(16384), i * 16384))
                    .collect();
                let kept: Vec<_> = futs
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| i % 8 == round)
                    .map(|(_, f)| f)
                    .collect();
                drop(disk.write_at(pattern(4096, 0, 5), 0)); // never polled
                for (buf, r) in join_all(kept).await {
                    r.unwrap();
                    assert!(buf
                        .chunks(8)
                        .all(|w| u64::from_le_bytes(w.try_into().unwrap()) >> 48 == 5));
                }
            }
            let (buf, r) = disk.read_at(AlignedBuf::zeroed(4 << 20), 0).await;
            r.unwrap();
            assert!(buf[..] == pattern(4 << 20, 0, 5)[..], "{}", io.describe());
            // Dropping everything with I/O still queued must not hang or crash.
            let _ = (0..64u64)
                .map(|i| disk.read_at(AlignedBuf::zeroed(4096), i * 4096))
                .collect::<Vec<_>>();
            let pending = disk.sync();
            drop(disk);
            drop(io);
            pending.await.unwrap();
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn opening_rules() {
        on_each_backend(|io, dir| async move {
            let missing = dir.join("missing");
            assert_eq!(
                io.open_disk(&missing, None).err().unwrap().kind(),
                io::ErrorKind::NotFound
            );
            // An existing file keeps its size whatever create_size says.
            let path = dir.join("d");
            std::fs::write(&path, vec![1u8; 8192]).unwrap();
            let disk = io.open_disk(&path, Some(1 << 20)).unwrap();
            assert_eq!(disk.len(), 8192);
            let (buf, r) = disk.read_at(AlignedBuf::zeroed(8192), 0).await;
            r.unwrap();
            assert!(buf.iter().all(|&b| b == 1));
            assert!(
                io.open_disk(&dir, None).is_err(),
                "a directory is not a disk"
            );
        })
        .await;
    }

    /// tmpfs refuses O_DIRECT: the disk must still work, buffered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tmpfs_falls_back_to_buffered_io() {
        if !Path::new("/dev/shm").is_dir() {
            eprintln!("skipping: no /dev/shm");
            return;
        }
        on_each_backend(|io, _| async move {
            let dir = tempfile::tempdir_in("/dev/shm").unwrap();
            let disk = io.open_disk(&dir.path().join("d"), Some(1 << 20)).unwrap();
            disk.write_at(pattern(8192, 4096, 9), 4096).await.1.unwrap();
            disk.sync().await.unwrap();
            let (buf, r) = disk.read_at(AlignedBuf::zeroed(8192), 4096).await;
            r.unwrap();
            assert!(buf[..] == pattern(8192, 4096, 9)[..]);
        })
        .await;
    }

    #[test]
    fn auto_picks_a_working_backend() {
        let io = IoEngine::new(BackendChoice::Auto).unwrap();
        let expected = if IoEngine::new(BackendChoice::Uring).is_ok() {
            BackendKind::Uring
        } else {
            BackendKind::Threads
        };
        assert_eq!(io.kind(), expected);
        assert_eq!(
            io.describe(),
            if expected == BackendKind::Uring {
                "io_uring"
            } else {
                "threads"
            }
        );
        assert_eq!(
            IoEngine::new(BackendChoice::Threads).unwrap().kind(),
            BackendKind::Threads
        );
    }
}
