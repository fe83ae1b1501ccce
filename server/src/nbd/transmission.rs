//! The transmission phase: a reader that decodes requests and starts them in
//! arrival order, and a writer task that serialises replies.
//!
//! Flow for one connection:
//! * The reader (the connection's own task) reads a header, takes an
//!   in-flight permit (at most `max_in_flight` requests and
//!   `max_in_flight_bytes` of payload per connection), reads any payload,
//!   validates, then calls the [`Export`] method and polls the returned future
//!   once, right there. That first poll happens before the next request is
//!   even decoded, which is what gives the export its ordering guarantee (see
//!   [`crate::nbd::export`]). A future that completes on that poll is replied
//!   to directly; one that does not is moved to its own task.
//! * Replies go through a bounded channel to the writer task, which encodes
//!   them into one buffer (large read payloads are sent zero-copy as separate
//!   slices) and writes everything queued with vectored writes, so a burst of
//!   completions costs one syscall. The permit travels with the reply and is
//!   released only once the reply is written: a client that does not read its
//!   replies stops the reader, so memory stays bounded.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::task::noop_waker_ref;
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::busy_poll::BusyPoll;
use super::export::{Export, ExportError, ExportFuture, Extent, Payload};
use super::handshake::Negotiated;
use super::proto::{self, HeaderMode, ReplyHeader, Request};
use super::server::NbdConfig;
use super::socket_hints::{LowWater, SocketHints};

/// Reads smaller than this inside a read are sent as data, not hole chunks.
const MIN_HOLE_CHUNK: u64 = 4096;
/// Payloads at least this large are written from their own buffer instead of
/// being copied into the batch buffer.
const ZERO_COPY_MIN: usize = 16 * 1024;
/// Finished replies carrying at least this much data are queued from a
/// task of their own (see `Reader::hand_off`).
const HAND_OFF_MIN: usize = 256 * 1024;
/// Stop batching replies once this much is queued for one write.
const BATCH_BYTES: usize = 4 << 20;
/// Most descriptors sent in one block status reply.
const MAX_DESCRIPTORS: usize = 1 << 16;
/// Longest extent length in a compact block status descriptor (a 512
/// multiple that fits in u32).
const MAX_COMPACT_EXTENT: u64 = 0xffff_fe00;
/// Most export blocks one BLOCK_STATUS request asks the export about (see
/// `block_status_span`).
const BLOCK_STATUS_MAX_BLOCKS: u64 = 1 << 16;
// A block changes status at most once, so an answer for the clamped span
// always fits in one reply and is never cut short a second time.
const _: () = assert!(BLOCK_STATUS_MAX_BLOCKS <= MAX_DESCRIPTORS as u64);

/// Permits held by a request until its reply has been written.
struct Permits {
    _req: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

enum Body {
    /// Success without payload (error 0) or an error.
    Status { error: u32, msg: Option<String> },
    /// Successful READ: data plus where it reads as zeros.
    Read {
        data: Payload,
        extents: Vec<Extent>,
        df: bool,
    },
    /// Successful BLOCK_STATUS for one context: (length, flags) runs.
    BlockStatus { ctx: u32, extents: Vec<(u64, u32)> },
}

struct Reply {
    handle: u64,
    offset: u64,
    body: Body,
    permits: Permits,
}

/// Queues a reply for the writer.
async fn queue(tx: &mpsc::Sender<Reply>, handle: u64, offset: u64, body: Body, permits: Permits) {
    let reply = Reply {
        handle,
        offset,
        body,
        permits,
    };
    // A failed send means the writer is gone; the reader notices via `stop`.
    let _ = tx.send(reply).await;
}

impl Body {
    /// Bytes of data the reply carries.
    fn payload_len(&self) -> usize {
        match self {
            Body::Read { data, .. } => data.len(),
            _ => 0,
        }
    }
}

fn ok() -> Body {
    Body::Status {
        error: 0,
        msg: None,
    }
}

fn err(error: u32, msg: impl Into<String>) -> Body {
    Body::Status {
        error,
        msg: Some(msg.into()),
    }
}

fn from_export_error(e: ExportError) -> Body {
    let errno = e.errno();
    Body::Status {
        error: errno,
        msg: Some(e.to_string()),
    }
}

/// Why the request loop ended.
#[derive(Debug)]
enum End {
    Disc,
    Eof,
    Stopped,
    Violation(String),
    Io(io::Error),
}

/// What the connection task learns when the transmission phase is over.
pub(crate) struct Closed {
    /// Whether any write-type request was started (so a flush is worthwhile).
    pub dirty: bool,
}

/// Writes at least this large run on their own task (see `handle_write`).
const OFFLOAD_WRITE_BYTES: usize = 64 << 10;

struct Reader<'a, R> {
    rd: R,
    peer: SocketAddr,
    cfg: &'a NbdConfig,
    export: Arc<dyn Export>,
    size: u64,
    mode: HeaderMode,
    read_only: bool,
    allocation_ctx: Option<u32>,
    tx: mpsc::Sender<Reply>,
    req_sem: Arc<Semaphore>,
    byte_sem: Arc<Semaphore>,
    byte_units: u32,
    stop: CancellationToken,
    dirty: bool,
    /// Writes running on their own task (see `handle_write`) and the range
    /// each covers, until they are done: a later write-type request that
    /// overlaps one waits for it, so a connection's overlapping writes take
    /// effect in arrival order.
    offloaded: Vec<(u64, u64, oneshot::Receiver<()>)>,
    busy_poll: BusyPoll,
    /// The number of permits `req_sem` started with.
    max_in_flight: usize,
}

/// Runs the transmission phase until the client disconnects, a protocol
/// violation, or `stop` (server shutdown) fires. In-flight requests are
/// always finished and their replies written (while the socket allows),
/// unless the returned future is dropped (the server cuts connections when
/// its shutdown grace runs out): the reply writer then ends with it.
pub(crate) async fn serve<R, W>(
    rd: R,
    wr: W,
    neg: Negotiated,
    cfg: &NbdConfig,
    peer: SocketAddr,
    stop: CancellationToken,
) -> Closed
where
    R: AsyncBufRead + SocketHints + Unpin + Send + Sync,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let max_in_flight = cfg.max_in_flight.max(1);
    let (tx, rx) = mpsc::channel(max_in_flight);
    // Units of 1 KiB; a single maximal request must always fit.
    let byte_units = (cfg.max_in_flight_bytes / 1024)
        .max(cfg.max_payload as usize / 1024 + 1)
        .min(u32::MAX as usize >> 1);
    // Cancelled by the writer if the socket fails, or by server shutdown.
    let conn_stop = stop.child_token();
    let mut writer = WriterTask(tokio::spawn(write_replies(
        wr,
        rx,
        neg.mode,
        conn_stop.clone(),
    )));

    let mut r = Reader {
        rd,
        peer,
        cfg,
        read_only: neg.export.read_only(),
        export: neg.export,
        size: neg.size,
        mode: neg.mode,
        allocation_ctx: neg.allocation_ctx,
        tx,
        req_sem: Arc::new(Semaphore::new(max_in_flight)),
        byte_sem: Arc::new(Semaphore::new(byte_units)),
        byte_units: byte_units as u32,
        stop: conn_stop.clone(),
        dirty: false,
        offloaded: Vec::new(),
        busy_poll: BusyPoll::new(cfg.busy_poll),
        max_in_flight,
    };
    // Each poll of the request loop decodes and starts every request one
    // socket read brought in; the export may start their I/O together
    // (see [`Export::start_together`]).
    let export = r.export.clone();
    let end = {
        let mut run = std::pin::pin!(r.run());
        std::future::poll_fn(|cx| {
            let mut out = Poll::Pending;
            export.start_together(&mut || out = run.as_mut().poll(cx));
            out
        })
        .await
    };
    let dirty = r.dirty;
    drop(r); // drops our reply sender: the writer ends after the last in-flight reply

    match &end {
        End::Disc => tracing::debug!(peer = %peer, "client sent NBD_CMD_DISC"),
        End::Eof => tracing::debug!(peer = %peer, "client closed the connection"),
        End::Stopped => tracing::debug!(peer = %peer, "transmission stopped"),
        End::Violation(m) => tracing::warn!(peer = %peer, "protocol violation, closing: {m}"),
        End::Io(e) => tracing::debug!(peer = %peer, error = %e, "connection read failed"),
    }
    match (&mut writer.0).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "writing replies failed"),
        Err(e) => tracing::warn!(peer = %peer, error = %e, "reply writer task failed"),
    }
    Closed { dirty }
}

/// The connection's reply writer, aborted when this is dropped.
///
/// `serve` waits for the writer to send every in-flight reply, which never
/// happens while the client does not read its socket: the writer stays
/// blocked in a socket write. The server then cuts the connection's task
/// once the shutdown grace runs out, dropping `serve`; the writer, a task of
/// its own, must end with it, or it would live on detached, holding the
/// socket open and its queued replies in memory, after the server has
/// stopped.
struct WriterTask(tokio::task::JoinHandle<io::Result<()>>);

impl Drop for WriterTask {
    fn drop(&mut self) {
        // A no-op once the writer has finished.
        self.0.abort();
    }
}

impl<R: AsyncBufRead + SocketHints + Unpin + Send + Sync> Reader<'_, R> {
    async fn run(&mut self) -> End {
        let hlen = self.mode.request_len();
        let mut hdr = [0u8; proto::EXTENDED_REQUEST_LEN];
        loop {
            self.busy_poll.wait(&mut self.rd).await;
            let read = match unless_stopped(&self.stop, self.rd.read_exact(&mut hdr[..hlen])).await
            {
                Ok(r) => r,
                Err(end) => return end,
            };
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return End::Eof,
                Err(e) => return End::Io(e),
            }
            let req = match Request::decode_for(self.mode, &hdr[..hlen]) {
                Ok(r) => r,
                Err(e) => return End::Violation(format!("request header: {e}")),
            };
            if req.kind == proto::CMD_DISC {
                return End::Disc;
            }
            let moves = match req.kind {
                proto::CMD_READ | proto::CMD_WRITE => req.length,
                _ => 0,
            };
            let alone = self.req_sem.available_permits() == self.max_in_flight;
            self.busy_poll.note_request(moves, alone);
            match self.handle(req).await {
                Ok(()) => {}
                Err(end) => return end,
            }
        }
    }

    /// Takes the permits for one request; `bytes` is the payload it will hold.
    async fn permits(&self, bytes: u64) -> Result<Permits, End> {
        let units = (bytes.div_ceil(1024) as u32).min(self.byte_units);
        let acquire = async {
            let req = self
                .req_sem
                .clone()
                .acquire_owned()
                .await
                .expect("never closed");
            let b = if units > 0 {
                Some(
                    self.byte_sem
                        .clone()
                        .acquire_many_owned(units)
                        .await
                        .expect("never closed"),
                )
            } else {
                None
            };
            Permits {
                _req: req,
                _bytes: b,
            }
        };
        let mut acquire = std::pin::pin!(acquire);
        // Permits are usually free: take them without registering with the
        // cancellation token (see `unless_stopped`).
        if let Poll::Ready(p) = acquire
            .as_mut()
            .poll(&mut Context::from_waker(noop_waker_ref()))
        {
            return Ok(p);
        }
        tokio::select! {
            biased;
            p = acquire => Ok(p),
            _ = self.stop.cancelled() => Err(End::Stopped),
        }
    }

    async fn send(&self, req: &Request, body: Body, permits: Permits) {
        queue(&self.tx, req.handle, req.offset, body, permits).await;
    }

    async fn reject(&self, req: &Request, error: u32, msg: String) -> Result<(), End> {
        let p = self.permits(0).await?;
        self.send(req, err(error, msg), p).await;
        Ok(())
    }

    /// Reads and drops `len` payload bytes.
    async fn discard(&mut self, len: u64) -> Result<(), End> {
        let mut src = (&mut self.rd).take(len);
        let mut sink = tokio::io::sink();
        let copy = tokio::io::copy(&mut src, &mut sink);
        let n = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Err(End::Stopped),
            r = copy => r.map_err(End::Io)?,
        };
        if n != len {
            return Err(End::Eof);
        }
        Ok(())
    }

    async fn read_payload(&mut self, len: usize) -> Result<Bytes, End> {
        let mut buf = BytesMut::with_capacity(len);
        let mut low = LowWater::for_payload(&self.rd, len);
        let rd = &mut self.rd;
        let fill = async {
            while buf.len() < len {
                let want = len - buf.len();
                low.before_read(&*rd, want);
                let n = rd.read_buf(&mut (&mut buf).limit(want)).await?;
                if n == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
            }
            Ok(())
        };
        let r = unless_stopped(&self.stop, fill).await;
        low.reset(&self.rd);
        let r = r?;
        match r {
            Ok(()) => Ok(buf.freeze()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(End::Eof),
            Err(e) => Err(End::Io(e)),
        }
    }

    /// Waits until no write still running on its own task overlaps
    /// `offset..offset + len` (see `offloaded`).
    async fn after_overlapping_writes(&mut self, offset: u64, len: u64) -> Result<(), End> {
        self.offloaded.retain_mut(|(_, _, rx)| {
            matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
        });
        let end = offset.saturating_add(len);
        for (first, past, rx) in self.offloaded.iter_mut() {
            if *first < end && offset < *past {
                // Err: the write's task has ended (the sender is dropped).
                let _ = unless_stopped(&self.stop, rx).await?;
            }
        }
        Ok(())
    }

    fn out_of_range(&self, offset: u64, len: u64) -> bool {
        match offset.checked_add(len) {
            Some(end) => end > self.size,
            None => true,
        }
    }

    /// Admission of a ranged request without payload (TRIM, CACHE,
    /// WRITE_ZEROES): refuses a write-type request on a read-only export
    /// (`EPERM`) and a range past the end (with `past_end`: the commands
    /// have always differed there), and answers a zero-length request at
    /// once. `Some(permits)` when the export should be called.
    async fn admit(
        &mut self,
        req: &Request,
        needs_write: bool,
        past_end: u32,
        what: &str,
    ) -> Result<Option<Permits>, End> {
        if needs_write && self.read_only {
            self.reject(req, proto::EPERM, "export is read-only".into())
                .await?;
            return Ok(None);
        }
        if self.out_of_range(req.offset, req.length) {
            let msg = format!("{what} past the end of the export");
            self.reject(req, past_end, msg).await?;
            return Ok(None);
        }
        let permits = self.permits(0).await?;
        if req.length == 0 {
            self.send(req, ok(), permits).await;
            return Ok(None);
        }
        self.dirty |= needs_write;
        Ok(Some(permits))
    }

    /// Polls `fut` once here; replies at once if it is done, else finishes it
    /// on its own task.
    async fn start<T, F>(
        &self,
        req: &Request,
        permits: Permits,
        mut fut: ExportFuture<T>,
        finish: F,
    ) where
        T: Send + 'static,
        F: FnOnce(Result<T, ExportError>) -> Body + Send + 'static,
    {
        let first = fut
            .as_mut()
            .poll(&mut Context::from_waker(noop_waker_ref()));
        match first {
            Poll::Ready(r) => {
                let gone = is_gone(&r);
                let body = finish(r);
                if body.payload_len() >= HAND_OFF_MIN {
                    self.hand_off(req, body, permits);
                } else {
                    self.send(req, body, permits).await;
                }
                if gone {
                    self.stop.cancel();
                }
            }
            Poll::Pending => self.finish_in_task(req, permits, fut, finish),
        }
    }

    /// Queues a finished reply from a task of its own.
    ///
    /// Sent from the reader, the reply wakes the writer on the reader's
    /// worker thread (tokio runs a task woken there next, on that thread),
    /// so the writer's socket copy of a large reply and the reader's work
    /// on the next requests take turns on one core. Sent from a spawned
    /// task, which the other worker picks up, they run side by side: 1 MiB
    /// reads of cached blocks at queue depth 8, 2.65 → 2.84 and 2.53 →
    /// 3.02 GB/s in two runs on a 2-vCPU VM (docs/benchmarks.md, session
    /// 27).
    fn hand_off(&self, req: &Request, body: Body, permits: Permits) {
        let tx = self.tx.clone();
        let (handle, offset) = (req.handle, req.offset);
        tokio::spawn(async move { queue(&tx, handle, offset, body, permits).await });
    }

    /// Runs `fut` to completion on its own task and replies from there.
    fn finish_in_task<T, F>(&self, req: &Request, permits: Permits, fut: ExportFuture<T>, finish: F)
    where
        T: Send + 'static,
        F: FnOnce(Result<T, ExportError>) -> Body + Send + 'static,
    {
        let tx = self.tx.clone();
        let stop = self.stop.clone();
        let (handle, offset) = (req.handle, req.offset);
        tokio::spawn(async move {
            let r = fut.await;
            if is_gone(&r) {
                // The reader stops; this reply still goes out first
                // (the writer drains every queued reply).
                stop.cancel();
            }
            queue(&tx, handle, offset, finish(r), permits).await;
        });
    }

    async fn handle(&mut self, req: Request) -> Result<(), End> {
        let ext = self.mode == HeaderMode::Extended;
        let payload_flag = if ext { proto::CMD_FLAG_PAYLOAD_LEN } else { 0 };
        let allowed = proto::CMD_FLAG_FUA
            | match req.kind {
                proto::CMD_READ if self.mode.structured() => proto::CMD_FLAG_DF,
                proto::CMD_WRITE => payload_flag,
                proto::CMD_WRITE_ZEROES => proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO,
                proto::CMD_BLOCK_STATUS => proto::CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        let bad_flags = req.flags & !allowed;
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;

        if req.kind == proto::CMD_WRITE {
            return self.handle_write(req, bad_flags, fua).await;
        }
        // With extended headers a non-write request may carry a payload
        // (PAYLOAD_LEN); none of ours accept one: skip it and refuse.
        if ext && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0 {
            if req.length > self.cfg.max_payload as u64 {
                return Err(End::Violation(format!(
                    "{} with a {}-byte payload",
                    proto::command_name(req.kind),
                    req.length
                )));
            }
            self.discard(req.length).await?;
            tracing::info!(peer = %self.peer, cmd = proto::command_name(req.kind), "request with an unexpected payload");
            return self
                .reject(&req, proto::EINVAL, "this command takes no payload".into())
                .await;
        }
        if !matches!(
            req.kind,
            proto::CMD_READ
                | proto::CMD_FLUSH
                | proto::CMD_TRIM
                | proto::CMD_CACHE
                | proto::CMD_WRITE_ZEROES
                | proto::CMD_BLOCK_STATUS
        ) {
            tracing::info!(peer = %self.peer, cmd = req.kind, "unknown command");
            return self
                .reject(&req, proto::EINVAL, format!("unknown command {}", req.kind))
                .await;
        }
        if bad_flags != 0 {
            tracing::info!(peer = %self.peer, cmd = proto::command_name(req.kind), flags = format_args!("{:#x}", req.flags), "unsupported command flags");
            return self
                .reject(
                    &req,
                    proto::EINVAL,
                    format!(
                        "unsupported flags {bad_flags:#x} for {}",
                        proto::command_name(req.kind)
                    ),
                )
                .await;
        }

        match req.kind {
            proto::CMD_READ => {
                if req.length > self.cfg.max_payload as u64 {
                    return self
                        .reject(
                            &req,
                            proto::EINVAL,
                            format!("read of {} bytes exceeds the maximum", req.length),
                        )
                        .await;
                }
                if self.out_of_range(req.offset, req.length) {
                    return self
                        .reject(
                            &req,
                            proto::EINVAL,
                            "read past the end of the export".into(),
                        )
                        .await;
                }
                let permits = self.permits(req.length).await?;
                let len = req.length as u32;
                if len == 0 {
                    self.send(
                        &req,
                        Body::Read {
                            data: Payload::default(),
                            extents: Vec::new(),
                            df: false,
                        },
                        permits,
                    )
                    .await;
                    return Ok(());
                }
                let df = req.flags & proto::CMD_FLAG_DF != 0;
                // Simple replies and DF reads ignore the extents; every read
                // goes through `read_extents` for its pieces.
                let holes_allowed = self.mode.structured() && !df;
                let fut = self.export.read_extents(req.offset, len);
                self.start(&req, permits, fut, move |r| match r {
                    Ok((data, extents)) if holes_allowed => read_body(data, extents, len, false),
                    Ok((data, _)) => read_body(data, Vec::new(), len, df),
                    Err(e) => from_export_error(e),
                })
                .await;
            }
            proto::CMD_FLUSH => {
                let permits = self.permits(0).await?;
                let fut = self.export.flush();
                self.start(&req, permits, fut, status_body).await;
            }
            proto::CMD_TRIM => {
                let Some(permits) = self.admit(&req, true, proto::EINVAL, "trim").await? else {
                    return Ok(());
                };
                self.after_overlapping_writes(req.offset, req.length)
                    .await?;
                let fut = self.export.trim(req.offset, req.length, fua);
                self.start(&req, permits, fut, status_body).await;
            }
            proto::CMD_CACHE => {
                let Some(permits) = self.admit(&req, false, proto::EINVAL, "cache").await? else {
                    return Ok(());
                };
                let fut = self.export.cache(req.offset, req.length);
                self.start(&req, permits, fut, status_body).await;
            }
            proto::CMD_WRITE_ZEROES => {
                // ENOSPC past the end, as for WRITE: zeroing there is writing
                // there (TRIM and CACHE only name a range: EINVAL).
                let admitted = self.admit(&req, true, proto::ENOSPC, "write zeroes");
                let Some(permits) = admitted.await? else {
                    return Ok(());
                };
                self.after_overlapping_writes(req.offset, req.length)
                    .await?;
                let no_hole = req.flags & proto::CMD_FLAG_NO_HOLE != 0;
                let fast = req.flags & proto::CMD_FLAG_FAST_ZERO != 0;
                let fut = self
                    .export
                    .write_zeroes(req.offset, req.length, fua, no_hole);
                self.start(&req, permits, fut, move |r| match r {
                    Ok(()) => ok(),
                    // ENOTSUP is only allowed as the answer to a fast zero.
                    Err(ExportError::NotSupported(m)) if !fast => err(proto::EIO, m),
                    Err(e) => from_export_error(e),
                })
                .await;
            }
            proto::CMD_BLOCK_STATUS => {
                let Some(ctx) = self.allocation_ctx else {
                    return self
                        .reject(
                            &req,
                            proto::EINVAL,
                            "no metadata context was negotiated".into(),
                        )
                        .await;
                };
                if req.length == 0 {
                    return self
                        .reject(&req, proto::EINVAL, "block status of zero bytes".into())
                        .await;
                }
                if self.out_of_range(req.offset, req.length) {
                    return self
                        .reject(
                            &req,
                            proto::EINVAL,
                            "block status past the end of the export".into(),
                        )
                        .await;
                }
                let req_one = req.flags & proto::CMD_FLAG_REQ_ONE != 0;
                // Only a bounded span is looked up; the reply then covers
                // less than asked and the client asks again from its end.
                let len = block_status_span(req.offset, req.length, self.export.block_size());
                // The reply is held until written, like read data: count it
                // (16 bytes a descriptor at most, at most one per 512 bytes).
                let descriptors = if req_one {
                    1
                } else {
                    (len / 512 + 2).min(MAX_DESCRIPTORS as u64)
                };
                let permits = self.permits(16 * descriptors).await?;
                let max_ext = if self.mode == HeaderMode::Extended {
                    u64::MAX
                } else {
                    MAX_COMPACT_EXTENT
                };
                // A lookup may wait behind other connections' (see the
                // export); once the server stops, answering ESHUTDOWN beats
                // holding the shutdown grace for an answer nobody needs.
                // Unlike a write, abandoning it changes nothing.
                let lookup = self.export.block_status(req.offset, len);
                let stop = self.stop.clone();
                let fut: ExportFuture<Vec<Extent>> = Box::pin(async move {
                    tokio::select! {
                        r = lookup => r,
                        _ = stop.cancelled() => Err(ExportError::Shutdown),
                    }
                });
                self.start(&req, permits, fut, move |r| match r {
                    Ok(ext) => Body::BlockStatus {
                        ctx,
                        extents: normalise_extents(&ext, len, req_one, max_ext),
                    },
                    Err(e) => from_export_error(e),
                })
                .await;
            }
            _ => unreachable!("filtered above"),
        }
        Ok(())
    }

    async fn handle_write(&mut self, req: Request, bad_flags: u16, fua: bool) -> Result<(), End> {
        if req.length > self.cfg.max_payload as u64 {
            // Never allocate (or wait for) a claimed size above the cap.
            return Err(End::Violation(format!(
                "WRITE of {} bytes exceeds the {}-byte maximum",
                req.length, self.cfg.max_payload
            )));
        }
        let refusal = if bad_flags != 0 {
            tracing::info!(peer = %self.peer, flags = format_args!("{:#x}", req.flags), "unsupported WRITE flags");
            Some((
                proto::EINVAL,
                format!("unsupported flags {bad_flags:#x} for WRITE"),
            ))
        } else if self.read_only {
            Some((proto::EPERM, "export is read-only".to_string()))
        } else if self.out_of_range(req.offset, req.length) {
            Some((
                proto::ENOSPC,
                "write past the end of the export".to_string(),
            ))
        } else {
            None
        };
        if let Some((errno, msg)) = refusal {
            // Keep the stream in sync: the payload must be consumed.
            self.discard(req.length).await?;
            return self.reject(&req, errno, msg).await;
        }
        let permits = self.permits(req.length).await?;
        let data = self.read_payload(req.length as usize).await?;
        if data.is_empty() {
            self.send(&req, ok(), permits).await;
            return Ok(());
        }
        self.dirty = true;
        self.after_overlapping_writes(req.offset, req.length)
            .await?;
        if data.len() >= OFFLOAD_WRITE_BYTES {
            // The export hashes and compresses a write before its future
            // exists; for a large one, do that on another task so this
            // connection reads the next payload meanwhile (a single
            // connection's sequential writes then use more than one core).
            let export = self.export.clone();
            let offset = req.offset;
            let (done, done_rx) = oneshot::channel::<()>();
            self.offloaded
                .push((req.offset, req.offset.saturating_add(req.length), done_rx));
            let fut: ExportFuture<()> = Box::pin(async move {
                let r = export.write(offset, data, fua).await;
                drop(done);
                r
            });
            self.finish_in_task(&req, permits, fut, status_body);
        } else {
            let fut = self.export.write(req.offset, data, fua);
            self.start(&req, permits, fut, status_body).await;
        }
        Ok(())
    }
}

/// `fut`'s output, unless `stop` has fired or fires before it is done.
///
/// On a busy connection most reads complete at once from bytes already
/// received: those skip registering with the cancellation token, whose
/// waiter list takes a mutex to join and again to leave (three times per
/// request, 3% of ballastd's CPU under 4 KiB random writes).
async fn unless_stopped<F: Future>(stop: &CancellationToken, fut: F) -> Result<F::Output, End> {
    if stop.is_cancelled() {
        return Err(End::Stopped);
    }
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(v) = fut
        .as_mut()
        .poll(&mut Context::from_waker(noop_waker_ref()))
    {
        return Ok(v);
    }
    tokio::select! {
        biased;
        _ = stop.cancelled() => Err(End::Stopped),
        v = fut => Ok(v),
    }
}

fn is_gone<T>(r: &Result<T, ExportError>) -> bool {
    matches!(r, Err(ExportError::Gone(_)))
}

fn status_body(r: Result<(), ExportError>) -> Body {
    match r {
        Ok(()) => ok(),
        Err(e) => from_export_error(e),
    }
}

fn read_body(data: Payload, extents: Vec<Extent>, len: u32, df: bool) -> Body {
    if data.len() != len as usize {
        return err(
            proto::EIO,
            format!("export returned {} bytes for a {len}-byte read", data.len()),
        );
    }
    Body::Read { data, extents, df }
}

/// How much of `offset..offset + len` one BLOCK_STATUS asks the export
/// about: at most [`BLOCK_STATUS_MAX_BLOCKS`] blocks of `block_size`, ending
/// on a block boundary (or at the end of the request).
///
/// An export's cost is per block (the engine reads one block-map entry per
/// block and only stops at 1 Mi blocks, 4 GiB at 4 KiB, a long stall),
/// while a client may ask about the whole export at once. The spec lets a
/// reply cover less than was asked as long as it has at least one extent
/// starting at the offset; libnbd (nbdinfo --map, nbdcopy) and qemu-img map
/// then ask again from where the reply ended, and ending on a block boundary
/// keeps that next request aligned. 64 Ki blocks is 256 MiB at 4 KiB blocks,
/// four times the 64 MiB libnbd asks for, so common clients rarely see a
/// short answer, and at most 64 Ki descriptors (1 MiB) per reply.
fn block_status_span(offset: u64, len: u64, block_size: u32) -> u64 {
    let bs = u64::from(block_size.max(512));
    // Past `offset`: the span starts in the block holding it.
    let limit = (offset - offset % bs).saturating_add(BLOCK_STATUS_MAX_BLOCKS * bs);
    len.min(limit - offset)
}

/// Turns an export's answer into what a BLOCK_STATUS reply may carry: no
/// empty extents, consecutive equal statuses merged, at least one extent,
/// every extent but the last starting inside the request and the total not
/// past it, each length representable, and exactly one with REQ_ONE.
pub(crate) fn normalise_extents(
    ext: &[Extent],
    req_len: u64,
    req_one: bool,
    max_ext: u64,
) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut total = 0u64;
    for e in ext {
        if e.len == 0 {
            continue;
        }
        if total >= req_len {
            break;
        }
        let len = e.len.min(req_len - total);
        let flags = e.flags();
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += len,
            _ => {
                if out.len() == MAX_DESCRIPTORS {
                    break;
                }
                out.push((len, flags));
            }
        }
        total += len;
    }
    if out.is_empty() {
        // Unknown status is always a safe answer.
        out.push((req_len, 0));
    }
    if let Some(i) = out.iter().position(|(l, _)| *l > max_ext) {
        out[i].0 = max_ext;
        out.truncate(i + 1);
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Splits a successful read into `(offset within read, length, is_hole)`
/// runs: holes shorter than [`MIN_HOLE_CHUNK`] stay in the data.
fn read_runs(extents: &[Extent], len: u64, out: &mut Vec<(u64, u64, bool)>) {
    out.clear();
    let sum: u64 = extents.iter().map(|e| e.len).sum();
    if sum != len {
        out.push((0, len, false));
        return;
    }
    let mut pos = 0u64;
    for e in extents {
        if e.len == 0 {
            continue;
        }
        let hole = e.reads_as_zero() && (e.len >= MIN_HOLE_CHUNK || e.len == len);
        match out.last_mut() {
            Some((_, l, h)) if *h == hole => *l += e.len,
            _ => out.push((pos, e.len, hole)),
        }
        pos += e.len;
    }
}

/// Encodes replies into a batch: small things into `out`, big payloads as
/// their own segments, written with vectored I/O.
struct Encoder {
    mode: HeaderMode,
    out: BytesMut,
    segs: std::collections::VecDeque<Bytes>,
    queued: usize,
    permits: Vec<Permits>,
    runs: Vec<(u64, u64, bool)>,
}

impl Encoder {
    fn new(mode: HeaderMode) -> Encoder {
        Encoder {
            mode,
            out: BytesMut::with_capacity(16 * 1024),
            segs: std::collections::VecDeque::new(),
            queued: 0,
            permits: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// Queue `len` bytes of `d` from `at`: big runs by reference, as
    /// segments of their own, small ones copied in with the headers.
    fn data(&mut self, d: &Payload, at: usize, len: usize) {
        self.queued += len;
        if len >= ZERO_COPY_MIN {
            if !self.out.is_empty() {
                self.segs.push_back(self.out.split().freeze());
            }
            self.segs.extend(d.pieces(at, len));
        } else {
            for p in d.pieces(at, len) {
                self.out.put_slice(&p);
            }
        }
    }

    fn push(&mut self, r: Reply) {
        let before = self.out.len();
        let (mode, handle, offset) = (self.mode, r.handle, r.offset);
        match r.body {
            Body::Status { error, msg } => match mode {
                HeaderMode::Simple => ReplyHeader::encode_simple(error, handle, &mut self.out),
                _ if error == 0 => {
                    if mode == HeaderMode::Extended {
                        ReplyHeader::chunk(
                            mode,
                            proto::REPLY_FLAG_DONE,
                            proto::REPLY_TYPE_NONE,
                            handle,
                            offset,
                            0,
                        )
                        .encode(&mut self.out);
                    } else {
                        ReplyHeader::encode_simple(0, handle, &mut self.out);
                    }
                }
                _ => proto::encode_error_chunk(
                    mode,
                    handle,
                    offset,
                    error,
                    msg.as_deref().unwrap_or(""),
                    &mut self.out,
                ),
            },
            Body::Read { data, extents, df } => {
                if mode == HeaderMode::Simple {
                    ReplyHeader::encode_simple(0, handle, &mut self.out);
                    self.data(&data, 0, data.len());
                } else if data.is_empty() {
                    ReplyHeader::chunk(
                        mode,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_NONE,
                        handle,
                        offset,
                        0,
                    )
                    .encode(&mut self.out);
                } else {
                    let len = data.len() as u64;
                    let mut runs = std::mem::take(&mut self.runs);
                    if df
                        || extents.len() <= 1 && !extents.first().is_some_and(|e| e.reads_as_zero())
                    {
                        runs.clear();
                        runs.push((0, len, false));
                    } else {
                        read_runs(&extents, len, &mut runs);
                    }
                    let n = runs.len();
                    for (i, &(at, l, hole)) in runs.iter().enumerate() {
                        let flags = if i + 1 == n {
                            proto::REPLY_FLAG_DONE
                        } else {
                            0
                        };
                        if hole {
                            ReplyHeader::chunk(
                                mode,
                                flags,
                                proto::REPLY_TYPE_OFFSET_HOLE,
                                handle,
                                offset,
                                12,
                            )
                            .encode(&mut self.out);
                            self.out.put_u64(offset + at);
                            self.out.put_u32(l as u32);
                        } else {
                            ReplyHeader::chunk(
                                mode,
                                flags,
                                proto::REPLY_TYPE_OFFSET_DATA,
                                handle,
                                offset,
                                8 + l,
                            )
                            .encode(&mut self.out);
                            self.out.put_u64(offset + at);
                            self.data(&data, at as usize, l as usize);
                        }
                    }
                    self.runs = runs;
                }
            }
            Body::BlockStatus { ctx, extents } => {
                if mode == HeaderMode::Extended {
                    let len = 8 + 16 * extents.len() as u64;
                    ReplyHeader::chunk(
                        mode,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_BLOCK_STATUS_EXT,
                        handle,
                        offset,
                        len,
                    )
                    .encode(&mut self.out);
                    self.out.put_u32(ctx);
                    self.out.put_u32(extents.len() as u32);
                    for (l, f) in extents {
                        self.out.put_u64(l);
                        self.out.put_u64(f as u64);
                    }
                } else {
                    let len = 4 + 8 * extents.len() as u64;
                    ReplyHeader::chunk(
                        mode,
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_BLOCK_STATUS,
                        handle,
                        offset,
                        len,
                    )
                    .encode(&mut self.out);
                    self.out.put_u32(ctx);
                    for (l, f) in extents {
                        self.out.put_u32(l as u32);
                        self.out.put_u32(f);
                    }
                }
            }
        }
        self.queued += self.out.len().saturating_sub(before);
        self.permits.push(r.permits);
    }

    async fn write_to<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> io::Result<()> {
        if !self.out.is_empty() {
            self.segs.push_back(self.out.split().freeze());
        }
        while !self.segs.is_empty() {
            // A 1 MiB read of cached 4 KiB blocks is 256 pieces.
            let mut slices = [IoSlice::new(&[]); 320];
            let mut k = 0;
            for s in self.segs.iter().take(slices.len()) {
                slices[k] = IoSlice::new(s);
                k += 1;
            }
            prefetch_starts(&slices[..k]);
            let mut n = wr.write_vectored(&slices[..k]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let front = self.segs.front_mut().expect("bytes were written from it");
                if n >= front.len() {
                    n -= front.len();
                    self.segs.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        wr.flush().await?;
        self.queued = 0;
        // Replies are on the wire: release their permits.
        self.permits.clear();
        Ok(())
    }
}

/// Start loading the first line of each slice before the kernel copies
/// them into the socket.
///
/// A 1 MiB read of blocks that random writes cached is 256 pieces spread
/// over the whole cache, each on a page of its own: the kernel's copy takes
/// a TLB miss (a nested page walk in a VM) and a cold line at the start of
/// every piece, one after the other. Prefetched here, the misses overlap.
/// A loopback send of 256 scattered 4 KiB pieces measured 0.26–0.34 s of
/// CPU per GB without and 0.23–0.28 with this, about what consecutive
/// pages cost (0.22–0.27; docs/benchmarks.md, session 27).
fn prefetch_starts(slices: &[IoSlice<'_>]) {
    #[cfg(target_arch = "x86_64")]
    for s in slices {
        // SAFETY: a prefetch is a hint that never faults, and `s` is a
        // live slice anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(s.as_ptr().cast())
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = slices;
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Reply>,
    mode: HeaderMode,
    stop_conn: CancellationToken,
) -> io::Result<()> {
    let mut enc = Encoder::new(mode);
    while let Some(first) = rx.recv().await {
        enc.push(first);
        while enc.queued < BATCH_BYTES {
            match rx.try_recv() {
                Ok(r) => enc.push(r),
                Err(_) => break,
            }
        }
        if let Err(e) = enc.write_to(&mut wr).await {
            stop_conn.cancel();
            return Err(e);
        }
    }
    let _ = wr.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_normalised() {
        let h = Extent::hole;
        let d = Extent::data;
        // Empty answer → one unknown-status extent of the full length.
        assert_eq!(
            normalise_extents(&[], 4096, false, u64::MAX),
            vec![(4096, 0)]
        );
        // Zero-length extents dropped, equal neighbours merged, clipped.
        assert_eq!(
            normalise_extents(
                &[d(0), h(512), h(512), d(4096), h(1 << 20)],
                2048,
                false,
                u64::MAX
            ),
            vec![(1024, 3), (1024, 0)]
        );
        // REQ_ONE → exactly one, no longer than asked.
        assert_eq!(
            normalise_extents(&[h(1 << 30)], 4096, true, u64::MAX),
            vec![(4096, 3)]
        );
        assert_eq!(
            normalise_extents(&[d(10), h(10)], 4096, true, u64::MAX),
            vec![(10, 0)]
        );
        // Compact replies cannot carry ≥ 4 GiB in one descriptor.
        assert_eq!(
            normalise_extents(&[h(8 << 30), d(1)], 8 << 30, false, MAX_COMPACT_EXTENT),
            vec![(MAX_COMPACT_EXTENT, 3)]
        );
    }

    #[test]
    fn block_status_spans_are_bounded_and_end_on_block_boundaries() {
        const K: u64 = 1024;
        let most = BLOCK_STATUS_MAX_BLOCKS;
        // Short requests are asked in full.
        assert_eq!(block_status_span(0, 64 << 20, 4096), 64 << 20);
        assert_eq!(block_status_span(12345, 1, 4096), 1);
        // Long ones stop after 64 Ki blocks of the export's size.
        assert_eq!(block_status_span(0, 4 << 30, 4096), most * 4 * K);
        assert_eq!(block_status_span(0, u64::MAX, 512), most * 512);
        assert_eq!(block_status_span(0, 8 << 30, 65536), most * 64 * K);
        // From an unaligned offset the span ends on a block boundary, so
        // the client's next request is aligned.
        let off = 10 * 4096 + 100;
        let span = block_status_span(off, 1 << 40, 4096);
        assert_eq!((off + span) % 4096, 0);
        assert_eq!(span, most * 4096 - 100);
        // Never empty, even at the top of the address space.
        assert_eq!(block_status_span(u64::MAX - 10, 5, 4096), 5);
        // A block size the server cannot use is taken as 512.
        assert_eq!(block_status_span(0, 1 << 40, 0), most * 512);
    }

    #[test]
    fn read_runs_split_holes() {
        let mut v = Vec::new();
        read_runs(
            &[Extent::data(4096), Extent::hole(8192), Extent::data(512)],
            12800,
            &mut v,
        );
        assert_eq!(
            v,
            vec![(0, 4096, false), (4096, 8192, true), (12288, 512, false)]
        );
        // Small holes are folded into data.
        read_runs(
            &[Extent::data(4096), Extent::hole(512), Extent::data(512)],
            5120,
            &mut v,
        );
        assert_eq!(v, vec![(0, 5120, false)]);
        // A short read that is all hole is still a hole.
        read_runs(&[Extent::hole(512)], 512, &mut v);
        assert_eq!(v, vec![(0, 512, true)]);
        // Inconsistent extents are ignored.
        read_runs(&[Extent::hole(100)], 512, &mut v);
        assert_eq!(v, vec![(0, 512, false)]);
    }
}
