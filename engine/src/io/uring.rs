//! io_uring backend: one dedicated thread owns the ring.
//!
//! Callers (tokio tasks) push requests on an unbounded channel and poke an
//! eventfd; they never block. The ring thread keeps a POLL_ADD on that
//! eventfd in flight, so it can sleep in `submit_and_wait(1)` and still wake
//! for new work as well as for completions. Each wake-up it reaps every CQE,
//! drains the channel, turns as much queued work into SQEs as the limits
//! allow and submits them with one syscall.
//!
//! Every request lives in a slab, keyed by its SQE's user_data, from the
//! moment it is accepted until its last CQE: the slab owns the buffer the
//! kernel reads or writes and the file whose fd the SQE names. A caller that
//! drops its future only drops the oneshot receiver, so the result is
//! discarded after the kernel is done, never before.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring, Probe};

use super::{backend_stopped, Op, Request};

/// Submission queue size. The completion queue is twice this (the kernel
/// default), and at most `RING_ENTRIES - 1` I/Os are in the kernel at once,
/// plus the eventfd poll, so the CQ can never overflow.
const RING_ENTRIES: u32 = 256;
/// user_data of the eventfd poll; slab keys are far smaller.
const WAKE_KEY: u64 = u64::MAX;
/// Largest single SQE transfer. Linux caps one read/write near 2 GiB anyway
/// and a `u32` length caps it at 4 GiB; bigger buffers go in several steps
/// through the short-transfer path.
const MAX_CHUNK: usize = 1 << 30;

pub(super) struct UringBackend {
    /// `None` only while dropping: closing the channel is the stop signal.
    tx: Option<mpsc::Sender<Request>>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

impl UringBackend {
    /// Build a ring, check that the kernel lets us use it (a NOP round trip
    /// and the opcodes we need), and start the ring thread. Any error here
    /// means "io_uring is unavailable".
    pub(super) fn new() -> io::Result<UringBackend> {
        let mut ring: IoUring = IoUring::new(RING_ENTRIES)?;
        // A probe needs Linux 5.6, which is also when IORING_OP_READ/WRITE
        // appeared, so failing it means the kernel is too old for us.
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::PollAdd::CODE, "POLL_ADD"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring lacks IORING_OP_{name}"),
                ));
            }
        }
        // Some sandboxes allow ring setup but fail every operation: make sure
        // one really completes.
        // SAFETY: a NOP references no memory.
        unsafe {
            ring.submission()
                .push(&opcode::Nop::new().build().user_data(0))
        }
        .map_err(|_| io::Error::other("a fresh io_uring submission queue is full"))?;
        ring.submit_and_wait(1)?;
        let res = ring.completion().next().map(|c| c.result());
        match res {
            Some(r) if r < 0 => return Err(io::Error::from_raw_os_error(-r)),
            Some(_) => {}
            None => return Err(io::Error::other("io_uring NOP did not complete")),
        }

        // SAFETY: eventfd has no memory-safety preconditions; we check the result.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        let wake = Arc::new(Wake {
            efd,
            pending: AtomicBool::new(false),
        });

        let (tx, rx) = mpsc::channel();
        let max_in_kernel =
            (ring.params().sq_entries() as usize - 1).min(ring.params().cq_entries() as usize - 1);
        let state = RingThread {
            ring,
            rx,
            wake: wake.clone(),
            slab: Slab::default(),
            ready: VecDeque::new(),
            in_kernel: 0,
            max_in_kernel,
            wake_armed: false,
            closing: false,
            cqes: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("ballast-uring".into())
            .spawn(move || state.run())?;
        Ok(UringBackend {
            tx: Some(tx),
            wake,
            thread: Some(thread),
        })
    }

    /// Queue a request and wake the ring thread if needed; never blocks.
    pub(super) fn submit(&self, req: Request) {
        let Some(tx) = &self.tx else {
            return req.finish(Err(backend_stopped()));
        };
        match tx.send(req) {
            Ok(()) => self.wake.notify(),
            Err(mpsc::SendError(req)) => req.finish(Err(backend_stopped())),
        }
    }
}

impl Drop for UringBackend {
    /// Close the channel, wake the thread and wait for it: it completes
    /// everything already queued or in flight before it exits.
    fn drop(&mut self) {
        drop(self.tx.take());
        self.wake.write();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the io_uring thread panicked");
            }
        }
    }
}

/// The eventfd that wakes the ring thread, plus a flag that saves the write
/// syscall when a wake-up is already on its way.
///
/// Invariant: while `pending` is true the eventfd counter is non-zero, so
/// the ring's poll on it will complete and the thread will drain the
/// channel after clearing the flag. Hence `reset` reads before clearing.
struct Wake {
    efd: OwnedFd,
    pending: AtomicBool,
}

impl Wake {
    /// Called after sending a request.
    fn notify(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            self.write();
        }
    }

    fn write(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an fd we own. A failure
        // can only be EAGAIN (counter saturated), which still means readable.
        unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Called by the ring thread when the poll fires, before it drains.
    fn reset(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from a non-blocking fd we
        // own; EAGAIN (already zero) is fine.
        unsafe { libc::read(self.efd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
        self.pending.store(false, Ordering::SeqCst);
    }
}

/// A request from acceptance to its final CQE. `done` counts bytes already
/// transferred, for resubmitting the rest after a short read or write.
struct InFlight {
    req: Request,
    done: usize,
}

/// Everything the ring thread owns.
struct RingThread {
    ring: IoUring,
    rx: mpsc::Receiver<Request>,
    wake: Arc<Wake>,
    slab: Slab<InFlight>,
    /// Slab keys waiting for an SQE (new requests and remainders of short
    /// transfers), in arrival order.
    ready: VecDeque<usize>,
    /// SQEs submitted whose CQE has not been reaped (not counting the poll).
    in_kernel: usize,
    max_in_kernel: usize,
    wake_armed: bool,
    /// The channel is closed: finish what is left, then exit.
    closing: bool,
    /// Reused buffer of (user_data, result) pairs.
    cqes: Vec<(u64, i32)>,
}

impl RingThread {
    fn run(mut self) {
        loop {
            self.reap();
            self.accept();
            if self.closing && self.slab.is_empty() {
                // Only the eventfd poll may still be armed; it references no
                // memory, so dropping the ring now is safe.
                return;
            }
            self.fill();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => {
                    // Unexpected: avoid spinning, and retry (the SQEs stay queued).
                    tracing::error!(error = %e, "io_uring_enter failed");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(key, res) in &cqes {
            if key == WAKE_KEY {
                self.wake_armed = false;
                self.wake.reset();
            } else {
                self.in_kernel -= 1;
                self.complete(key as usize, res);
            }
        }
        cqes.clear();
        self.cqes = cqes;
    }

    /// Account one CQE of slab entry `key`: finish it or queue the rest.
    fn complete(&mut self, key: usize, res: i32) {
        let Some(f) = self.slab.get_mut(key) else {
            tracing::error!(key, "io_uring completion for an unknown request");
            return;
        };
        let len = f.req.buf.as_ref().map_or(0, |b| b.len());
        let outcome = match (f.req.op, res) {
            (_, r) if r == -libc::EINTR || r == -libc::EAGAIN => None,
            (_, r) if r < 0 => Some(Err(io::Error::from_raw_os_error(-r))),
            (Op::Sync, _) => Some(Ok(())),
            (Op::Read, 0) => Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read hit the end of the file after {} of {len} bytes",
                    f.done
                ),
            ))),
            (Op::Write, 0) => Some(Err(io::ErrorKind::WriteZero.into())),
            (_, r) => {
                f.done += r as usize;
                (f.done >= len).then_some(Ok(()))
            }
        };
        match outcome {
            Some(res) => self.slab.remove(key).req.finish(res),
            // Short transfer or interrupted: resubmit the remainder. It goes
            // to the front so one request is not starved by later ones.
            None => self.ready.push_front(key),
        }
    }

    fn accept(&mut self) {
        while !self.closing {
            match self.rx.try_recv() {
                Ok(req) => {
                    let key = self.slab.insert(InFlight { req, done: 0 });
                    self.ready.push_back(key);
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => self.closing = true,
            }
        }
    }

    /// Turn queued work into SQEs, within the SQ space and the in-kernel cap
    /// (so the CQ cannot overflow). What does not fit stays queued.
    fn fill(&mut self) {
        let mut sq = self.ring.submission();
        if !self.wake_armed && !self.closing {
            let poll =
                opcode::PollAdd::new(types::Fd(self.wake.efd.as_raw_fd()), libc::POLLIN as u32)
                    .build()
                    .user_data(WAKE_KEY);
            // SAFETY: the poll references only the eventfd, which `self.wake`
            // keeps open for as long as the ring exists.
            self.wake_armed = unsafe { sq.push(&poll) }.is_ok();
        }
        while self.in_kernel < self.max_in_kernel {
            let Some(&key) = self.ready.front() else {
                break;
            };
            let Some(f) = self.slab.get_mut(key) else {
                self.ready.pop_front();
                continue;
            };
            let sqe = sqe_for(f).user_data(key as u64);
            // SAFETY: the SQE points into `f.req.buf` and names
            // `f.req.file`'s fd; both are owned by the slab entry, which is
            // removed only when its final CQE is reaped (or leaked, see
            // `Drop`). The buffer's heap address never moves.
            if unsafe { sq.push(&sqe) }.is_err() {
                break; // SQ full: submit, then continue from here.
            }
            self.ready.pop_front();
            self.in_kernel += 1;
        }
    }
}

/// The SQE for the untransferred part of `f`.
fn sqe_for(f: &mut InFlight) -> io_uring::squeue::Entry {
    let fd = types::Fd(f.req.file.as_raw_fd());
    let offset = f.req.offset + f.done as u64;
    match (f.req.op, f.req.buf.as_mut()) {
        (Op::Read, Some(buf)) => {
            let n = (buf.len() - f.done).min(MAX_CHUNK);
            // SAFETY: `done < len`, so the pointer stays inside the buffer.
            let ptr = unsafe { buf.as_mut_ptr().add(f.done) };
            opcode::Read::new(fd, ptr, n as u32).offset(offset).build()
        }
        (Op::Write, Some(buf)) => {
            let n = (buf.len() - f.done).min(MAX_CHUNK);
            // SAFETY: as for reads.
            let ptr = unsafe { buf.as_ptr().add(f.done) };
            opcode::Write::new(fd, ptr, n as u32).offset(offset).build()
        }
        // Read/Write always carry a buffer (built only by `FileDisk`); a
        // bufferless one degrades to a harmless sync.
        _ => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    }
}

impl Drop for RingThread {
    /// Normally the slab is empty here. If the thread is unwinding from a
    /// panic with I/O still in the kernel, leak those buffers rather than
    /// free memory the kernel may still write into.
    fn drop(&mut self) {
        for mut f in self.slab.entries.drain(..).flatten() {
            std::mem::forget(f.req.buf.take());
            f.req.finish(Err(backend_stopped()));
        }
    }
}

/// Minimal slab: stable `usize` keys with slot reuse.
struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    fn insert(&mut self, v: T) -> usize {
        self.len += 1;
        match self.free.pop() {
            Some(k) => {
                self.entries[k] = Some(v);
                k
            }
            None => {
                self.entries.push(Some(v));
                self.entries.len() - 1
            }
        }
    }

    fn get_mut(&mut self, k: usize) -> Option<&mut T> {
        self.entries.get_mut(k).and_then(Option::as_mut)
    }

    /// Panics if `k` is vacant; callers check with `get_mut` first.
    fn remove(&mut self, k: usize) -> T {
        let v = self.entries[k].take().expect("slab key is occupied");
        self.free.push(k);
        self.len -= 1;
        v
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}
