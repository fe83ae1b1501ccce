//! io_uring backend: callers submit directly; completions come back through
//! an eventfd that the tokio reactor watches.
//!
//! There is no ring thread on the hot path. A caller (a tokio task) locks the
//! ring's bookkeeping, pushes its SQE and enters the kernel itself, so an I/O
//! starts before `read_at` returns. Only one submitter enters the kernel at a
//! time: one that finds another already inside just leaves its SQE in the
//! queue, and the one inside goes round again before it lets go, so a burst
//! of submissions from many threads costs few syscalls. A caller about to
//! start a burst of I/O from one thread can hold its submissions
//! ([`hold_submissions`]): they are queued, and the kernel is entered once
//! for all of them when the hold ends.
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
//! A future polled outside any task (a `block_on`, a plain thread) waits for
//! a small transfer on its own thread, asleep in `io_uring_enter`, like a
//! synchronous io_uring program; see [`Assist`].
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

        let can_mute = ring.params().is_feature_poll_32bits();
        let max_in_kernel =
            (ring.params().sq_entries() as usize - 1).min(ring.params().cq_entries() as usize - 1);
        Ok(UringBackend {
            shared: Arc::new(Shared {
                ring,
                efd,
                can_mute,
                state: Mutex::new(State {
                    slab: Slab::default(),
                    ready: VecDeque::new(),
                    in_kernel: 0,
                    max_in_kernel,
                    entering: false,
                    closing: false,
                    assisted: false,
                    next_seq: 0,
                }),
                reaper: Mutex::new(Reaper::None),
                handovers: AtomicU64::new(0),
            }),
        })
    }

    /// Accept a request, start it if the in-kernel cap allows (entering the
    /// kernel from this thread) and complete whatever has already finished.
    /// Never blocks on I/O. For a small transfer, also returns what lets its
    /// future wait for it on the polling thread (see [`Assist`]).
    pub(super) fn submit(&self, req: Request) -> Option<Assist> {
        let shared = &self.shared;
        let handovers = shared.handovers.load(Ordering::SeqCst);
        if let Err(e) = shared.ensure_reaper() {
            tracing::error!(error = %e, "cannot start waiting for io_uring completions");
            req.finish(Err(e));
            return None;
        }
        let small = req.op != Op::Sync && req.buf.as_ref().map_or(0, |b| b.len()) <= ASSIST_MAX_LEN;
        let mut st = shared.state.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        let key = st.slab.insert(InFlight { req, done: 0, seq });
        st.ready.push_back(key);
        if HOLDING.get() {
            drop(st);
            shared.hold();
        } else {
            shared.pump(st);
        }
        // The reaper task may have gone with its runtime between
        // `ensure_reaper` and the insert above, having found no I/O to hand
        // to a thread (see `Handover`): then nothing would wake this
        // request's waiter. A handover counts itself before it looks at the
        // slab, so an unchanged count means it saw this request.
        if shared.handovers.load(Ordering::SeqCst) != handovers {
            if let Err(e) = shared.ensure_reaper() {
                tracing::error!(
                    error = %e,
                    "cannot start waiting for io_uring completions; in-flight I/O waits for the next submission"
                );
            }
        }
        small.then(|| Assist {
            shared: shared.clone(),
            key,
            seq,
        })
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
            // The lock is held while waiting, so no one else consumes the CQ
            // meanwhile; except that an assisting thread owns the CQ until
            // its own I/O completes, which does not take long.
            loop {
                if st.assisted {
                    drop(st);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                    st = shared.state.lock();
                    continue;
                }
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
    /// The kernel has the CQ flags word that mutes the eventfd (Linux 5.8;
    /// tested through a 5.9 feature bit, the oldest one after it). Without
    /// it the flag's offset is zero, which would point at the ring's head.
    can_mute: bool,
    state: Mutex<State>,
    /// Who waits for completions. Never locked while `state` is held.
    reaper: Mutex<Reaper>,
    /// Reaper tasks that went with their runtime (see `submit`).
    handovers: AtomicU64,
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
    /// A thread is waiting in `Assist::poll_reply`. While it does, only it
    /// consumes the CQ (and the eventfd is muted, as it wakes for every
    /// completion anyway), so it cannot sleep through a completion that
    /// someone else took.
    assisted: bool,
    /// Sequence number of the next request, which tells a reused slab key
    /// from the request an `Assist` waits for.
    next_seq: u64,
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
    seq: u64,
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

/// Paces a retry of `io_uring_enter` with nothing else in flight to wait
/// for: 1 ms apart, and a warning once a second while it lasts, so a kernel
/// that keeps refusing (out of memory for requests, say) shows in the log
/// instead of as I/O that silently stalls.
#[derive(Default)]
struct Backoff {
    retries: u32,
}

impl Backoff {
    fn wait(&mut self, e: &io::Error, doing: &str) {
        self.retries += 1;
        if self.retries.is_multiple_of(1000) {
            tracing::warn!(
                error = %e,
                retries = self.retries,
                "io_uring_enter keeps failing while {doing}; still retrying (is the system short of memory?)"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
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
                        let handover = Handover {
                            shared: self.clone(),
                            generation,
                            _alive: token,
                        };
                        SPAWNING_REAPER.set(true);
                        rt.spawn(reap_task(afd, handover));
                        SPAWNING_REAPER.set(false);
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
        let mut backoff = Backoff::default();
        loop {
            if !st.assisted {
                self.reap(&mut st, &mut done);
            }
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
                    backoff.wait(&e, "submitting");
                    st = self.state.lock();
                }
            }
        }
        drop(st);
        finish_all(&mut done);
    }

    /// Leaves this thread's queued requests for the end of the current
    /// [`hold_submissions`], which pumps once for all of them.
    fn hold(self: &Arc<Self>) {
        let previous = HELD.replace(Some(self.clone()));
        // A second backend on one thread (tests have several): the first
        // one's requests go now, so none waits for a flush that forgot it.
        if let Some(other) = previous.filter(|p| !Arc::ptr_eq(p, self)) {
            other.pump(other.state.lock());
        }
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

/// Lets a reply future wait for its completion on its own thread, the way
/// a synchronous io_uring program does: asleep in `io_uring_enter`, where
/// the completion wakes exactly that thread. A future polled by a runtime's
/// `block_on` (or on any thread that is not running tokio tasks) otherwise
/// pays three wake-ups per I/O: the kernel completes the request on the
/// submitting thread, the eventfd wakes a worker for the reaper, and the
/// reaper wakes the blocked thread. Inside a task it never waits: a worker
/// must stay free for other tasks.
///
/// Only small transfers get one, so the wait lasts about one device access.
/// (A timed wait would bound it further, but arming the timer costs about
/// as much as the wake-up it saves on a virtual machine.)
pub(super) struct Assist {
    shared: Arc<Shared>,
    key: usize,
    seq: u64,
}

/// Largest transfer whose future may wait on the polling thread.
const ASSIST_MAX_LEN: usize = 128 << 10;

impl Assist {
    pub(super) fn poll_reply(
        &self,
        rx: &mut tokio::sync::oneshot::Receiver<super::Reply>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<super::Reply, tokio::sync::oneshot::error::RecvError>> {
        use std::future::Future;
        use std::pin::Pin;
        use std::task::Poll;

        if let Poll::Ready(r) = Pin::new(&mut *rx).poll(cx) {
            return Poll::Ready(r);
        }
        if may_block_here() {
            self.wait_here();
        }
        Pin::new(rx).poll(cx)
    }

    /// Consume completions on this thread, sleeping in the kernel for them,
    /// until this request's final CQE has been reaped. Returns at once if
    /// another thread is already doing this.
    fn wait_here(&self) {
        let shared = &*self.shared;
        {
            let mut st = shared.state.lock();
            if st.assisted {
                return;
            }
            st.assisted = true;
            // Only an optimisation (the reaper would find nothing to take).
            if shared.can_mute {
                // SAFETY: `state` is locked; the flag word is updated atomically.
                unsafe { shared.ring.completion_shared() }.disable_eventfd();
            }
        }
        // Undoes the above however this ends (declared before the guard
        // below, so it runs after the lock is released).
        let _unmute = Unmute(shared);
        let mut finished = Vec::new();
        let mut backoff = Backoff::default();
        let mut st = shared.state.lock();
        loop {
            shared.reap(&mut st, &mut finished);
            shared.fill(&mut st);
            let pending = st.slab.get_mut(self.key).is_some_and(|f| f.seq == self.seq);
            drop(st);
            finish_all(&mut finished);
            if !pending {
                return;
            }
            // This request's CQE is not reaped yet, and only this thread
            // reaps until it returns: the wait cannot miss it.
            match shared.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if transient(&e) => backoff.wait(&e, "waiting for a completion"),
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed while waiting");
                    return;
                }
            }
            st = shared.state.lock();
        }
    }
}

/// Ends an assisted wait: unmutes the eventfd and takes the completions that
/// arrived meanwhile (later ones signal the reaper again).
struct Unmute<'a>(&'a Shared);

impl Drop for Unmute<'_> {
    fn drop(&mut self) {
        let shared = self.0;
        let mut st = shared.state.lock();
        st.assisted = false;
        if shared.can_mute {
            // SAFETY: `state` is locked; the flag word is updated atomically.
            unsafe { shared.ring.completion_shared() }.enable_eventfd();
        }
        shared.pump(st);
        // A completion posted just as the eventfd was unmuted may have been
        // neither signalled nor seen above; with I/O still in flight, wake
        // the reaper to be sure, rather than rely on kernel memory ordering.
        if !shared.state.lock().slab.is_empty() {
            shared.poke();
        }
    }
}

/// True outside any tokio task, except on a current-thread runtime (whose
/// only thread would stall with it).
fn may_block_here() -> bool {
    if tokio::task::try_id().is_some() {
        return false;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread,
        Err(_) => true,
    }
}

/// The reaper task: waits on the runtime's reactor for the eventfd.
async fn reap_task(afd: AsyncFd<EventFd>, handover: Handover) {
    let _handover = handover;
    let shared = &afd.get_ref().0;
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

/// Runs `f` with this thread's submissions held back: requests are queued
/// as usual, and the kernel is entered once, when `f` returns (or unwinds),
/// for all of them. Nested calls flush at the end of the outermost one.
pub(super) fn hold_submissions<R>(f: impl FnOnce() -> R) -> R {
    struct Release {
        outer: bool,
    }
    impl Drop for Release {
        fn drop(&mut self) {
            HOLDING.set(self.outer);
            if !self.outer {
                if let Some(shared) = HELD.take() {
                    shared.pump(shared.state.lock());
                }
            }
        }
    }
    let _release = Release {
        outer: HOLDING.replace(true),
    };
    f()
}

thread_local! {
    /// Inside [`hold_submissions`] on this thread.
    static HOLDING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The backend whose requests wait for the end of the hold.
    static HELD: std::cell::Cell<Option<Arc<Shared>>> = const { std::cell::Cell::new(None) };
    /// `ensure_reaper` is spawning a reaper task with the reaper lock held.
    /// A runtime that is shutting down drops the task right inside `spawn`;
    /// its `Handover` then leaves the fallback to the spawner, which sees
    /// the dead token, instead of taking the lock the spawner holds.
    static SPAWNING_REAPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Dropped with the reaper task, polled or not (which happens when its
/// runtime shuts down while the backend lives on): requests still in flight
/// get the helper thread, and the next submission picks a new reaper
/// otherwise.
struct Handover {
    shared: Arc<Shared>,
    generation: u64,
    /// The task's liveness as `Reaper::Tokio` sees it.
    _alive: Arc<()>,
}

impl Drop for Handover {
    fn drop(&mut self) {
        if SPAWNING_REAPER.get() {
            return;
        }
        let mut reaper = self.shared.reaper.lock();
        if !matches!(&*reaper, Reaper::Tokio { generation, .. } if *generation == self.generation) {
            return;
        }
        *reaper = Reaper::None;
        // Before looking at the slab: a submitter whose request is not in it
        // yet sees the count move and finds a new reaper itself.
        self.shared.handovers.fetch_add(1, Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::super::{AlignedBuf, BackendChoice, DiskIo, IoEngine};
    use std::sync::Arc;
    use std::time::Duration;

    /// An io_uring engine, or `None` (with a note) where the kernel or the
    /// sandbox refuses io_uring.
    fn uring() -> Option<IoEngine> {
        match IoEngine::new(BackendChoice::Uring) {
            Ok(io) => Some(io),
            Err(e) => {
                eprintln!("skipping: {e}");
                None
            }
        }
    }

    fn block(len: usize, tag: u64, offset: u64) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(len);
        for (i, w) in b.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(tag << 40 ^ (offset + 8 * i as u64)).to_le_bytes());
        }
        b
    }

    /// Write, read back and check `rounds` blocks in `disk`'s slot `slot`
    /// (each slot is 64 KiB), awaiting each I/O in turn.
    async fn churn(disk: Arc<dyn DiskIo>, slot: u64, rounds: u64) {
        for i in 0..rounds {
            let off = slot * 65536 + (i % 16) * 4096;
            disk.write_at(block(4096, i, off), off).await.1.unwrap();
            let (buf, r) = disk.read_at(AlignedBuf::zeroed(4096), off).await;
            r.unwrap();
            assert!(buf[..] == block(4096, i, off)[..], "slot {slot} round {i}");
            if i % 50 == 0 {
                disk.sync().await.unwrap();
            }
        }
    }

    /// A multi-thread runtime like ballastd's on this machine.
    fn two_workers() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Run `f` on its own thread and fail if it takes longer than `secs`
    /// (a lost wake-up would otherwise hang the test run).
    fn within(secs: u64, f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        match rx.recv_timeout(Duration::from_secs(secs)) {
            Ok(()) => t.join().unwrap(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(t.join().unwrap_err())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("I/O stalled"),
        }
    }

    /// Requests started inside a hold all reach the kernel when it ends:
    /// from a task (the NBD reader's case), nested, across two rings, when
    /// the holding closure panics, and on a plain thread whose blocking
    /// wait inside the hold has to submit the held request itself.
    #[test]
    fn held_submissions_all_start() {
        use super::super::{hold_submissions, IoFuture};

        let (Some(io), Some(other)) = (uring(), uring()) else {
            return;
        };
        within(60, move || {
            let dir = tempfile::tempdir().unwrap();
            let disk = io.open_disk(&dir.path().join("d"), Some(1 << 20)).unwrap();
            let disk2 = other
                .open_disk(&dir.path().join("e"), Some(1 << 20))
                .unwrap();
            type Read = IoFuture<(AlignedBuf, std::io::Result<()>)>;
            let reads = |d: &Arc<dyn DiskIo>, blocks: std::ops::Range<u64>| -> Vec<(u64, Read)> {
                blocks
                    .map(|i| (i * 4096, d.read_at(AlignedBuf::zeroed(4096), i * 4096)))
                    .collect()
            };
            async fn check(reads: Vec<(u64, Read)>, tag: u64) {
                for (off, r) in reads {
                    let (buf, res) = r.await;
                    res.unwrap();
                    assert!(buf[..] == block(4096, tag, off)[..], "block at {off}");
                }
            }
            let rt = two_workers();
            rt.block_on(async {
                for (d, tag) in [(&disk, 1), (&disk2, 2)] {
                    for i in 0..64 {
                        d.write_at(block(4096, tag, i * 4096), i * 4096)
                            .await
                            .1
                            .unwrap();
                    }
                }
            });
            // Each case starts with both rings idle, so a held request
            // that nothing submits would wait forever: no completion is
            // coming to make anyone look at the queue.
            let (d1, d2) = (disk.clone(), disk2.clone());
            rt.block_on(rt.spawn(async move {
                let a = hold_submissions(|| reads(&d1, 0..20));
                check(a, 1).await;
                let (a, b) = hold_submissions(|| {
                    let a = hold_submissions(|| reads(&d1, 0..10));
                    (a, reads(&d1, 10..20))
                });
                check(a, 1).await;
                check(b, 1).await;
                let (a, b) = hold_submissions(|| (reads(&d1, 0..20), reads(&d2, 0..20)));
                check(a, 1).await;
                check(b, 2).await;
            }))
            .unwrap();
            // A panic inside the hold still submits what was queued.
            let d1 = disk.clone();
            let queued = std::sync::Mutex::new(Vec::new());
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                hold_submissions(|| {
                    queued.lock().unwrap().extend(reads(&d1, 40..64));
                    panic!("inside the hold");
                })
            }));
            assert!(caught.is_err());
            rt.block_on(check(queued.into_inner().unwrap(), 1));
            // A plain thread blocking on its own held read.
            let d1 = disk.clone();
            hold_submissions(|| {
                futures::executor::block_on(check(reads(&d1, 0..1), 1));
            });
        });
    }

    /// No runtime anywhere: completions come from the helper thread, and
    /// callers on plain threads wait for their own (several at once).
    #[test]
    fn plain_threads_without_a_runtime() {
        let Some(io) = uring() else { return };
        within(60, move || {
            let dir = tempfile::tempdir().unwrap();
            let disk = io.open_disk(&dir.path().join("d"), Some(1 << 20)).unwrap();
            std::thread::scope(|s| {
                for slot in 0..4 {
                    let disk = disk.clone();
                    s.spawn(move || futures::executor::block_on(churn(disk, slot, 200)));
                }
            });
            // Large transfers are not waited for on the caller's thread.
            let big = block(1 << 20, 9, 0);
            futures::executor::block_on(disk.write_at(big, 0))
                .1
                .unwrap();
            let (buf, r) =
                futures::executor::block_on(disk.read_at(AlignedBuf::zeroed(1 << 20), 0));
            r.unwrap();
            assert!(buf[..] == block(1 << 20, 9, 0)[..]);
        });
    }

    #[test]
    fn current_thread_runtime() {
        let Some(io) = uring() else { return };
        within(60, move || {
            let dir = tempfile::tempdir().unwrap();
            let disk = io.open_disk(&dir.path().join("d"), Some(1 << 20)).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let tasks: Vec<_> = (0..4)
                    .map(|slot| tokio::spawn(churn(disk.clone(), slot, 100)))
                    .collect();
                churn(disk.clone(), 4, 100).await;
                for t in tasks {
                    t.await.unwrap();
                }
            });
        });
    }

    /// A `block_on` caller waiting for its own completions while tasks on
    /// the workers keep the reaper busy, over the same ring.
    #[test]
    fn block_on_callers_and_tasks_together() {
        let Some(io) = uring() else { return };
        within(60, move || {
            let dir = tempfile::tempdir().unwrap();
            let disk = io.open_disk(&dir.path().join("d"), Some(1 << 20)).unwrap();
            let rt = two_workers();
            let tasks: Vec<_> = (0..6)
                .map(|slot| rt.spawn(churn(disk.clone(), slot, 300)))
                .collect();
            std::thread::scope(|s| {
                for slot in 6..8 {
                    let (disk, rt) = (disk.clone(), rt.handle().clone());
                    s.spawn(move || rt.block_on(churn(disk, slot, 300)));
                }
                rt.block_on(churn(disk.clone(), 8, 300));
            });
            for t in tasks {
                rt.block_on(t).unwrap();
            }
            // Many at once from `block_on`: some wait on the ring, the rest
            // are woken by whoever reaps their completions.
            let reads =
                (0..512u64).map(|i| disk.read_at(AlignedBuf::zeroed(4096), (i % 256) * 4096));
            for (buf, r) in rt.block_on(futures::future::join_all(reads)) {
                r.unwrap();
                drop(buf);
            }
        });
    }

    /// Runtimes shut down over and over while their tasks and blocking
    /// threads submit: each shutdown drops the reaper task (polled or not)
    /// just as others submit. The blocking threads outlive the tasks (the
    /// runtime waits for them), and every one of their requests must still
    /// complete, on whichever reaper comes next.
    #[test]
    fn reaper_handover_races_submissions() {
        let Some(io) = uring() else { return };
        within(120, move || {
            let dir = tempfile::tempdir().unwrap();
            let disk = io.open_disk(&dir.path().join("d"), Some(4 << 20)).unwrap();
            for round in 0..150u64 {
                let rt = two_workers();
                for slot in 0..2 {
                    rt.spawn(churn(disk.clone(), slot, 1_000_000));
                }
                for slot in 2..4 {
                    let (d, h) = (disk.clone(), rt.handle().clone());
                    rt.spawn_blocking(move || h.block_on(churn(d, slot, 40)));
                }
                // From "before the reaper's first poll" to "mid-I/O".
                std::thread::sleep(Duration::from_micros(round % 7 * 150));
                drop(rt);
                // Outside any runtime: the helper thread, or a reaper that
                // the dropped runtime left behind, must serve this.
                futures::executor::block_on(churn(disk.clone(), 5, 3));
            }
        });
    }

    /// The runtime whose reaper task watches the ring shuts down with I/O in
    /// flight: those complete anyway (their buffers stay owned until then),
    /// and the engine keeps working, in another runtime and in none.
    #[test]
    fn outlives_its_runtime() {
        let Some(io) = uring() else { return };
        within(60, move || {
            let dir = tempfile::tempdir().unwrap();
            let disk = io.open_disk(&dir.path().join("d"), Some(4 << 20)).unwrap();
            for _ in 0..3 {
                let rt = two_workers();
                rt.block_on(churn(disk.clone(), 0, 20));
                for slot in 1..8 {
                    rt.spawn(churn(disk.clone(), slot, 1_000_000));
                }
                // Let the tasks get going, then drop them mid-I/O.
                std::thread::sleep(Duration::from_millis(30));
                drop(rt);
                futures::executor::block_on(churn(disk.clone(), 8, 50));
            }
            let rt = two_workers();
            let tasks: Vec<_> = (0..4)
                .map(|slot| rt.spawn(churn(disk.clone(), slot, 100)))
                .collect();
            for t in tasks {
                rt.block_on(t).unwrap();
            }
            drop(disk);
            drop(io);
        });
    }
}
