//! io_uring backend: callers submit directly; completions come back through
//! an eventfd that the tokio reactor watches.
//!
//! There is no ring thread on the hot path. A caller (a tokio task) locks the
//! ring's bookkeeping, pushes its SQE and enters the kernel itself, so an I/O
//! starts before `read_at` returns. Only one caller enters the kernel at a
//! time: one that finds another already inside just leaves its SQE in the
//! queue, and the one inside goes round again before it lets go, so a burst
//! of submissions from many tasks costs few syscalls.
//!
//! The ring has an eventfd registered, which the kernel signals with every
//! completion. Inside a multi-thread tokio runtime a small reaper task waits
//! for it through the runtime's own reactor (`AsyncFd`): a completion wakes
//! the worker parked in epoll, which drains the completion queue and wakes
//! the waiting tasks, so an I/O costs one wake-up, as with a bare
//! `io_uring_enter(GETEVENTS)`. Submitters also glance at the completion queue
//! (two loads, no syscall) and complete whatever is already there. Outside
//! such a runtime (a current-thread runtime, or no runtime at all) a helper
//! thread waits on the eventfd instead. Which one it is gets decided at the
//! first submission, and again whenever the reaper's runtime shuts down.
//!
//! Every request lives in a slab, keyed by its SQE's user_data, from the
//! moment it is accepted until its last CQE: the slab owns the buffer the
//! kernel reads or writes and the file whose fd the SQE names. A caller that
//! drops its future only drops the oneshot receiver, so the result is
//! discarded after the kernel is done, never before. At most
//! `min(SQ, CQ) - 1` SQEs are in the kernel at once, so the completion queue
//! cannot overflow; further requests wait in the slab until completions make
//! room. Dropping the backend completes everything still queued or in flight
//! before it returns.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring, Probe};
use parking_lot::{Mutex, MutexGuard};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{backend_stopped, Op, Request};

/// Submission queue size. The completion queue is twice this (the kernel
/// default), and at most `RING_ENTRIES - 1` I/Os are in the kernel at once,
/// so the CQ can never overflow.
const RING_ENTRIES: u32 = 256;
/// Largest single SQE transfer. Linux caps one read/write near 2 GiB anyway
/// and a `u32` length caps it at 4 GiB; bigger buffers go in several steps
/// through the short-transfer path.
const MAX_CHUNK: usize = 1 << 30;

pub(super) struct UringBackend {
    shared: Arc<Shared>,
}

impl UringBackend {
    /// Build a ring, check that the kernel lets us use it (a NOP round trip
    /// and the opcodes we need) and register its eventfd. Any error here
    /// means "io_uring is unavailable". Nothing waits for completions until
    /// the first submission decides how (see [`Shared::ensure_reaper`]), so
    /// this works with or without a tokio runtime.
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
        ring.submitter().register_eventfd(efd.as_raw_fd())?;

        let max_in_kernel =
            (ring.params().sq_entries() as usize - 1).min(ring.params().cq_entries() as usize - 1);
        Ok(UringBackend {
            shared: Arc::new(Shared {
                ring,
                efd,
                state: Mutex::new(State {
                    slab: Slab::default(),
                    ready: VecDeque::new(),
                    in_kernel: 0,
                    max_in_kernel,
                    entering: false,
                    closing: false,
                }),
                reaper: Mutex::new(Reaper::None),
            }),
        })
    }

    /// Accept a request, start it if the in-kernel cap allows (entering the
    /// kernel from this thread) and complete whatever has already finished.
    /// Never blocks on I/O.
    pub(super) fn submit(&self, req: Request) {
        let shared = &self.shared;
        if let Err(e) = shared.ensure_reaper() {
            tracing::error!(error = %e, "cannot start waiting for io_uring completions");
            return req.finish(Err(e));
        }
        let mut st = shared.state.lock();
        let key = st.slab.insert(InFlight { req, done: 0 });
        st.ready.push_back(key);
        shared.pump(st);
    }
}

impl Drop for UringBackend {
    /// Complete everything already queued or in flight, then stop the reaper
    /// (and wait for it, if it is a thread).
    fn drop(&mut self) {
        let shared = &self.shared;
        let mut done = Vec::new();
        {
            let mut st = shared.state.lock();
            st.closing = true;
            // The lock is held throughout, so no one else consumes the CQ
            // while this waits for it.
            loop {
                shared.reap(&mut st, &mut done);
                shared.fill(&mut st);
                if st.slab.is_empty() {
                    break;
                }
                if let Err(e) = shared.ring.submitter().submit_and_wait(1) {
                    if !transient(&e) {
                        tracing::error!(error = %e, "io_uring_enter failed while shutting down");
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        }
        finish_all(&mut done);
        // Wake the reaper: with `closing` set and nothing left, it exits.
        shared.poke();
        let reaper = std::mem::replace(&mut *shared.reaper.lock(), Reaper::Closed);
        if let Reaper::Thread(t) = reaper {
            if t.thread().id() != std::thread::current().id() && t.join().is_err() {
                tracing::error!("the io_uring completion thread panicked");
            }
        }
    }
}

/// Everything the callers, the reaper and the backend share.
struct Shared {
    /// The SQ and CQ are only touched with `state` locked;
    /// `io_uring_enter` is called without it.
    ring: IoUring,
    /// Registered with the ring: the kernel signals it on every completion.
    efd: OwnedFd,
    state: Mutex<State>,
    /// Who waits for completions. Never locked while `state` is held.
    reaper: Mutex<Reaper>,
}

/// The bookkeeping guarded by `Shared::state`.
struct State {
    slab: Slab<InFlight>,
    /// Slab keys waiting for an SQE (new requests and remainders of short
    /// transfers), in arrival order.
    ready: VecDeque<usize>,
    /// SQEs pushed whose CQE has not been reaped.
    in_kernel: usize,
    max_in_kernel: usize,
    /// Some thread is inside `io_uring_enter` (without the lock); it checks
    /// the SQ again when it comes back, so others need not enter.
    entering: bool,
    /// The backend is being dropped: the reaper exits once the slab is empty.
    closing: bool,
}

/// What waits for completions (see the module docs).
enum Reaper {
    /// Nothing yet (or the previous reaper's runtime shut down while idle).
    None,
    /// A task on a multi-thread tokio runtime. `alive` dies with the task,
    /// including when it is dropped without ever running.
    Tokio { generation: u64, alive: Weak<()> },
    /// A helper thread; it stays for the life of the backend.
    Thread(JoinHandle<()>),
    /// The backend has shut down.
    Closed,
}

/// A request from acceptance to its final CQE. `done` counts bytes already
/// transferred, for resubmitting the rest after a short read or write.
struct InFlight {
    req: Request,
    done: usize,
}

/// Outcomes to hand back once the lock is released.
type Done = Vec<(Request, io::Result<()>)>;

fn finish_all(done: &mut Done) {
    for (req, res) in done.drain(..) {
        req.finish(res);
    }
}

/// `io_uring_enter` errors that only mean "try again".
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

impl Shared {
    /// Make sure something will wake the waiters of the I/O about to be
    /// submitted: the reaper task of the current multi-thread runtime if
    /// there is one (started here if needed), else the helper thread.
    fn ensure_reaper(self: &Arc<Self>) -> io::Result<()> {
        let mut reaper = self.reaper.lock();
        match &*reaper {
            Reaper::Thread(_) | Reaper::Closed => return Ok(()),
            Reaper::Tokio { alive, .. } if alive.strong_count() > 0 => return Ok(()),
            Reaper::Tokio { .. } | Reaper::None => {}
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
                // Registering panics (rather than failing) on a runtime built
                // without IO enabled; that runtime gets the thread instead.
                let efd = EventFd(self.clone());
                let registered = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    // SAFETY: `EventFd` owns an `Arc` of the `Shared` that
                    // owns the fd, so the fd stays open (and the same) for
                    // as long as the `AsyncFd` exists.
                    unsafe { AsyncFd::register_with_interest(efd, Interest::READABLE) }
                }));
                match registered {
                    Ok(Ok(afd)) => {
                        static GENERATION: AtomicU64 = AtomicU64::new(0);
                        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
                        let token = Arc::new(());
                        let alive = Arc::downgrade(&token);
                        rt.spawn(reap_task(afd, generation, token));
                        // A runtime that is shutting down drops the task at
                        // once; then this caller needs the thread after all.
                        if alive.strong_count() > 0 {
                            *reaper = Reaper::Tokio { generation, alive };
                            return Ok(());
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "cannot watch the io_uring eventfd with tokio")
                    }
                    Err(_) => tracing::debug!("the tokio runtime has IO disabled"),
                }
            }
        }
        let shared = self.clone();
        let thread = std::thread::Builder::new()
            .name("ballast-uring".into())
            .spawn(move || shared.reap_thread())?;
        *reaper = Reaper::Thread(thread);
        Ok(())
    }

    /// Reap, refill and submit until nothing is left to submit or another
    /// thread is doing it; then hand back the outcomes, outside the lock.
    fn pump<'a>(&'a self, mut st: MutexGuard<'a, State>) {
        let mut done = Vec::new();
        loop {
            self.reap(&mut st, &mut done);
            self.fill(&mut st);
            if st.entering || self.sq_is_empty() {
                break;
            }
            st.entering = true;
            drop(st);
            let res = self.ring.submitter().submit();
            finish_all(&mut done);
            st = self.state.lock();
            st.entering = false;
            match res {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The kernel is short of something. With other I/O in
                // flight, its completion pumps again; otherwise back off.
                Err(e) if transient(&e) && st.in_kernel > self.sq_len() => break,
                Err(e) => {
                    if !transient(&e) {
                        tracing::error!(error = %e, "io_uring_enter failed");
                    }
                    drop(st);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    st = self.state.lock();
                }
            }
        }
        drop(st);
        finish_all(&mut done);
    }

    fn sq_len(&self) -> usize {
        // SAFETY: only called with `state` locked, which serialises every
        // user of the SQ (the kernel is its only other party).
        unsafe { self.ring.submission_shared() }.len()
    }

    fn sq_is_empty(&self) -> bool {
        self.sq_len() == 0
    }

    /// Take every CQE there is (no syscall) and account for it.
    fn reap(&self, st: &mut State, done: &mut Done) {
        // SAFETY: `state` is locked (`st` borrows from its guard), which
        // serialises every consumer of the CQ.
        let mut cq = unsafe { self.ring.completion_shared() };
        for cqe in &mut cq {
            st.in_kernel -= 1;
            st.complete(cqe.user_data() as usize, cqe.result(), done);
        }
    }

    /// Turn queued work into SQEs, within the SQ space and the in-kernel cap
    /// (so the CQ cannot overflow). What does not fit stays queued.
    fn fill(&self, st: &mut State) {
        if st.ready.is_empty() || st.in_kernel >= st.max_in_kernel {
            return;
        }
        // SAFETY: `state` is locked, which serialises every producer of the
        // SQ. The queue syncs its tail when dropped at the end of this call.
        let mut sq = unsafe { self.ring.submission_shared() };
        while st.in_kernel < st.max_in_kernel {
            let Some(&key) = st.ready.front() else {
                break;
            };
            let Some(f) = st.slab.get_mut(key) else {
                st.ready.pop_front();
                continue;
            };
            let sqe = sqe_for(f).user_data(key as u64);
            // SAFETY: the SQE points into `f.req.buf` and names
            // `f.req.file`'s fd; both are owned by the slab entry, which is
            // removed only when its final CQE is reaped (or leaked, see
            // `Drop for Shared`). The buffer's heap address never moves.
            if unsafe { sq.push(&sqe) }.is_err() {
                break; // SQ full: submit, then continue from here.
            }
            st.ready.pop_front();
            st.in_kernel += 1;
        }
    }

    /// Write to the eventfd, waking whatever reaper waits on it.
    fn poke(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an fd we own. A failure
        // can only be EAGAIN (counter saturated), which still means readable.
        unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Reset the eventfd's counter; EAGAIN (already zero) is fine.
    fn drain_eventfd(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live local from a non-blocking fd we own.
        unsafe { libc::read(self.efd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    }

    /// One round of a reaper: returns false once the backend has closed and
    /// nothing is left, when the reaper should exit.
    fn reap_round(&self) -> bool {
        // Reset before reaping: a completion posted after the reset signals
        // the eventfd again, so none is missed.
        self.drain_eventfd();
        self.pump(self.state.lock());
        let st = self.state.lock();
        !(st.closing && st.slab.is_empty())
    }

    /// The helper thread, for callers outside a multi-thread tokio runtime.
    fn reap_thread(self: Arc<Self>) {
        while self.reap_round() {
            let mut pfd = libc::pollfd {
                fd: self.efd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one live pollfd; EINTR just goes round again.
            unsafe { libc::poll(&mut pfd, 1, -1) };
        }
    }
}

/// The reaper task: waits on the runtime's reactor for the eventfd.
async fn reap_task(afd: AsyncFd<EventFd>, generation: u64, _alive: Arc<()>) {
    let shared = &afd.get_ref().0;
    // Created on the first poll, so a task dropped unpolled (its runtime was
    // already shutting down) leaves only the dead `_alive` token behind.
    let _handover = Handover {
        shared: shared.clone(),
        generation,
    };
    loop {
        let mut guard = match afd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "waiting for io_uring completions failed");
                return;
            }
        };
        if !shared.reap_round() {
            return;
        }
        // Only clears if no new readiness arrived since `readable` returned.
        guard.clear_ready();
    }
}

/// Dropped with the reaper task (which happens when its runtime shuts down
/// while the backend lives on): requests still in flight get the helper
/// thread, and the next submission picks a new reaper otherwise.
struct Handover {
    shared: Arc<Shared>,
    generation: u64,
}

impl Drop for Handover {
    fn drop(&mut self) {
        let mut reaper = self.shared.reaper.lock();
        if !matches!(&*reaper, Reaper::Tokio { generation, .. } if *generation == self.generation) {
            return;
        }
        *reaper = Reaper::None;
        let busy = {
            let st = self.shared.state.lock();
            !st.closing && !st.slab.is_empty()
        };
        if busy {
            let shared = self.shared.clone();
            match std::thread::Builder::new()
                .name("ballast-uring".into())
                .spawn(move || shared.reap_thread())
            {
                Ok(t) => *reaper = Reaper::Thread(t),
                Err(e) => tracing::error!(
                    error = %e,
                    "cannot start the io_uring completion thread; in-flight I/O waits for the next submission"
                ),
            }
        }
    }
}

/// The eventfd as seen by tokio's reactor. Holding the `Shared` that owns
/// the fd keeps it open until the reactor has forgotten it.
struct EventFd(Arc<Shared>);

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.efd.as_raw_fd()
    }
}

impl State {
    /// Account one CQE of slab entry `key`: finish it or queue the rest.
    fn complete(&mut self, key: usize, res: i32, done: &mut Done) {
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
            Some(res) => done.push((self.slab.remove(key).req, res)),
            // Short transfer or interrupted: resubmit the remainder. It goes
            // to the front so one request is not starved by later ones.
            None => self.ready.push_front(key),
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

impl Drop for Shared {
    /// Normally the slab is empty here (the backend's drop drained it). If
    /// that was skipped by a panic with I/O still in the kernel, leak those
    /// buffers rather than free memory the kernel may still write into.
    fn drop(&mut self) {
        for mut f in self.state.get_mut().slab.entries.drain(..).flatten() {
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
