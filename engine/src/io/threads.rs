//! Thread-pool backend: the fallback where io_uring is unavailable (old
//! kernels, Docker's default seccomp profile) or not wanted.
//!
//! A fixed set of workers takes requests from one channel and does plain
//! positioned I/O. The tokio side only ever sends on an unbounded channel, so
//! it never blocks; the workers block on the disk instead.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use super::{backend_stopped, Op, Request};

pub(super) struct ThreadBackend {
    /// `None` only while dropping: closing the channel is the stop signal.
    tx: Option<mpsc::Sender<Request>>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadBackend {
    /// Start `threads` workers.
    pub(super) fn new(threads: usize) -> io::Result<ThreadBackend> {
        let (tx, rx) = mpsc::channel::<Request>();
        let rx = Arc::new(Mutex::new(rx));
        let mut backend = ThreadBackend {
            tx: Some(tx),
            workers: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let rx = rx.clone();
            // On failure `backend` is dropped, which stops the workers
            // already started.
            let worker = std::thread::Builder::new()
                .name(format!("ballast-io-{i}"))
                .stack_size(256 << 10)
                .spawn(move || worker(&rx))?;
            backend.workers.push(worker);
        }
        Ok(backend)
    }

    /// Queue a request; never blocks.
    pub(super) fn submit(&self, req: Request) {
        match &self.tx {
            Some(tx) => {
                if let Err(mpsc::SendError(req)) = tx.send(req) {
                    req.finish(Err(backend_stopped()));
                }
            }
            None => req.finish(Err(backend_stopped())),
        }
    }
}

impl Drop for ThreadBackend {
    /// Close the channel and wait: workers finish every queued request first
    /// (a receiver sees all sent messages before it sees the disconnect), so
    /// no accepted I/O is abandoned.
    fn drop(&mut self) {
        drop(self.tx.take());
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!("an I/O worker thread panicked");
            }
        }
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Request>>) {
    loop {
        // Hold the lock only while waiting for a request, not while doing it.
        let next = rx.lock().recv();
        let Ok(mut req) = next else { return };
        let res = match (req.op, req.buf.as_mut()) {
            // `read_exact_at` turns a short read (end of file) into
            // `UnexpectedEof`, as `DiskIo::read_at` promises; both loops
            // retry partial transfers and EINTR.
            (Op::Read, Some(buf)) => req.file.read_exact_at(buf, req.offset),
            (Op::Write, Some(buf)) => req.file.write_all_at(buf, req.offset),
            (Op::Sync, _) => req.file.sync_data(),
            (Op::Read | Op::Write, None) => {
                Err(io::Error::new(io::ErrorKind::InvalidInput, "no buffer"))
            }
        };
        req.finish(res);
    }
}
