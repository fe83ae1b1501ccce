//! The pipelined NBD client.
//!
//! One connection = one [`NbdClient`] (cheap to clone, all methods take
//! `&self`, any number of requests may be in flight). Submitting a request
//! takes one short lock: it claims a slot in the in-flight table (the slot key
//! is the low half of the NBD handle), appends the 28-byte header (and a small
//! payload) to the outgoing batch, and wakes the writer task if it is idle.
//! The writer task sends whatever has accumulated in one `write`/`writev`, so
//! requests issued together leave in one system call. One reader task reads
//! replies in large chunks, looks the handle up in the table and completes the
//! waiting request through a oneshot channel; read data is copied straight
//! into the buffer the request owns.

use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use slab::Slab;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use super::error::{NbdErrno, NbdError, Result};
use super::handshake::{self, BlockSizes, ConnectOptions, Negotiated};
use super::proto::{
    self, cmd, cmd_flag, reply_type, Decoded, ReplyHeader, Request, TransmissionFlags,
};
use super::uri::{NbdAddr, NbdUri};

/// Payloads up to this size are copied into the outgoing batch; larger ones
/// are sent from their own buffer with vectored I/O.
const COPY_PAYLOAD_MAX: usize = 16 * 1024;
/// Size of the reader's receive buffer.
const READ_CHUNK: usize = 256 * 1024;
/// Read payloads larger than this go straight into the destination buffer.
const DIRECT_READ_MIN: usize = 64 * 1024;
/// How long `disconnect` waits for the server to close after `NBD_CMD_DISC`.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One extent of `base:allocation` block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// `base:allocation` flags (`proto::STATE_HOLE`, `proto::STATE_ZERO`).
    pub flags: u32,
}

impl Extent {
    /// The extent is not allocated.
    pub fn is_hole(&self) -> bool {
        self.flags & proto::STATE_HOLE != 0
    }
    /// The extent reads as zeroes.
    pub fn is_zero(&self) -> bool {
        self.flags & proto::STATE_ZERO != 0
    }
}

enum Outcome {
    Data(BytesMut),
    Extents(Vec<Extent>),
    Done,
}

struct Pending {
    handle: u64,
    cmd: u16,
    offset: u64,
    length: u32,
    /// Destination of a read (its length is the request length).
    buf: Option<BytesMut>,
    /// Bytes of a structured read reply received so far.
    covered: u64,
    extents: Vec<Extent>,
    error: Option<NbdError>,
    tx: oneshot::Sender<Result<Outcome>>,
}

impl Pending {
    fn complete(self, hard_error: Option<NbdError>) {
        let res = match (hard_error, self.error) {
            (Some(e), _) | (None, Some(e)) => Err(e),
            (None, None) => Ok(match (self.cmd, self.buf) {
                (cmd::READ, Some(b)) => Outcome::Data(b),
                (cmd::BLOCK_STATUS, _) => Outcome::Extents(self.extents),
                _ => Outcome::Done,
            }),
        };
        // The caller may have given up on the request; that is fine.
        let _ = self.tx.send(res);
    }

    fn command_error(&self, errno: NbdErrno, message: String) -> NbdError {
        NbdError::Command {
            command: cmd::name(self.cmd),
            errno,
            offset: self.offset,
            length: self.length as u64,
            message,
        }
    }
}

#[derive(Default)]
struct Outgoing {
    /// Headers and small payloads not yet handed to the writer.
    buf: BytesMut,
    /// Finished segments, in order, before `buf`.
    segs: Vec<Bytes>,
    /// The writer has been woken and has not yet taken the batch.
    wake_sent: bool,
}

struct State {
    pending: Slab<Pending>,
    out: Outgoing,
    generation: u32,
    /// Set once the connection is unusable, with the reason.
    dead: Option<String>,
    /// `disconnect` (or drop) started: no new requests.
    closing: bool,
    /// Writer: shut the socket down after sending what is queued.
    shutdown_after_write: bool,
}

struct Shared {
    state: Mutex<State>,
    writer_wake: Notify,
    idle: Notify,
    /// Metadata context id of `base:allocation`, if negotiated.
    base_allocation: Option<u32>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Mark the connection dead and fail everything in flight.
    fn fail_all(&self, reason: String) {
        let drained: Vec<Pending> = {
            let mut st = self.lock();
            if st.dead.is_none() {
                st.dead = Some(reason.clone());
            }
            st.pending.drain().collect()
        };
        let reason = self.lock().dead.clone().unwrap_or(reason);
        for p in drained {
            p.complete(Some(NbdError::Disconnected(reason.clone())));
        }
        self.writer_wake.notify_one();
        self.idle.notify_waiters();
    }

    /// Remove the pending request for `handle`.
    fn remove(&self, handle: u64) -> Result<Pending> {
        let mut st = self.lock();
        let key = (handle & 0xffff_ffff) as usize;
        match st.pending.get(key) {
            Some(p) if p.handle == handle => {
                let p = st.pending.remove(key);
                if st.closing && st.pending.is_empty() {
                    self.idle.notify_waiters();
                }
                Ok(p)
            }
            _ => Err(NbdError::Protocol(format!(
                "reply for unknown handle {handle:#x}"
            ))),
        }
    }

    /// Run `f` on the pending request for `handle`, leaving it in the table.
    fn with<T>(&self, handle: u64, f: impl FnOnce(&mut Pending) -> T) -> Result<T> {
        let mut st = self.lock();
        match st.pending.get_mut((handle & 0xffff_ffff) as usize) {
            Some(p) if p.handle == handle => Ok(f(p)),
            _ => Err(NbdError::Protocol(format!(
                "reply for unknown handle {handle:#x}"
            ))),
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    info: Negotiated,
    uri: NbdUri,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.dead.is_none() && !st.closing {
            st.closing = true;
            queue_disc(&mut st);
            drop(st);
            self.shared.writer_wake.notify_one();
        }
    }
}

fn queue_disc(st: &mut State) {
    Request {
        flags: 0,
        kind: cmd::DISC,
        handle: u64::MAX,
        offset: 0,
        length: 0,
    }
    .encode(&mut st.out.buf);
    st.shutdown_after_write = true;
}

/// A connection to one NBD export. Clones share the connection.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("uri", &self.inner.uri.to_string())
            .field("size", &self.inner.info.size)
            .field("flags", &self.inner.info.flags)
            .finish()
    }
}

/// A TCP connection to `host:port` with `TCP_NODELAY` and, to a server on
/// this host, the congestion control `opts` asks for.
pub async fn connect_tcp(
    host: &str,
    port: u16,
    opts: &ConnectOptions,
) -> Result<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|error| NbdError::Connect {
            addr: NbdAddr::Tcp {
                host: host.to_string(),
                port,
            }
            .to_string(),
            error,
        })?;
    stream.set_nodelay(true)?;
    opts.local_congestion.apply(&stream);
    Ok(stream)
}

impl NbdClient {
    /// Connect to `nbd://HOST[:PORT]/EXPORT` (or `nbd+unix:///EXPORT?socket=PATH`)
    /// with default options: structured replies and `base:allocation`.
    pub async fn connect(uri: &str) -> Result<NbdClient> {
        let uri = NbdUri::parse(uri)?;
        Self::connect_with(&uri, &ConnectOptions::default()).await
    }

    /// Connect with explicit negotiation options.
    pub async fn connect_with(uri: &NbdUri, opts: &ConnectOptions) -> Result<NbdClient> {
        match &uri.addr {
            NbdAddr::Tcp { host, port } => {
                let stream = connect_tcp(host, *port, opts).await?;
                Self::from_stream(stream, uri.clone(), opts, |s| s.into_split()).await
            }
            NbdAddr::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|error| NbdError::Connect {
                        addr: uri.addr.to_string(),
                        error,
                    })?;
                Self::from_stream(stream, uri.clone(), opts, |s| s.into_split()).await
            }
        }
    }

    /// Run the handshake on an established stream and start the I/O tasks.
    /// `split` turns the stream into owned read and write halves.
    pub async fn from_stream<S, R, W>(
        mut stream: S,
        uri: NbdUri,
        opts: &ConnectOptions,
        split: impl FnOnce(S) -> (R, W),
    ) -> Result<NbdClient>
    where
        S: AsyncRead + AsyncWrite + Unpin,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let info = handshake::negotiate(&mut stream, &uri.export, opts).await?;
        let base_allocation = info
            .meta_contexts
            .iter()
            .find(|(_, n)| n == proto::BASE_ALLOCATION)
            .map(|(id, _)| *id);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Slab::with_capacity(256),
                out: Outgoing {
                    buf: BytesMut::with_capacity(64 * 1024),
                    ..Outgoing::default()
                },
                generation: 0,
                dead: None,
                closing: false,
                shutdown_after_write: false,
            }),
            writer_wake: Notify::new(),
            idle: Notify::new(),
            base_allocation,
        });
        let (r, w) = split(stream);
        tokio::spawn(writer_loop(w, shared.clone()));
        let reader = tokio::spawn(reader_loop(r, shared.clone()));
        Ok(NbdClient {
            inner: Arc::new(Inner {
                shared,
                info,
                uri,
                reader: Mutex::new(Some(reader)),
            }),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// Transmission flags the server advertised.
    pub fn flags(&self) -> TransmissionFlags {
        self.inner.info.flags
    }

    /// Everything negotiated during the handshake.
    pub fn negotiated(&self) -> &Negotiated {
        &self.inner.info
    }

    /// The URI this client connected to.
    pub fn uri(&self) -> &NbdUri {
        &self.inner.uri
    }

    /// Block size constraints, if the server sent them.
    pub fn block_sizes(&self) -> Option<BlockSizes> {
        self.inner.info.block_sizes
    }

    /// Largest payload of one read or write.
    pub fn max_payload(&self) -> u32 {
        match self.inner.info.block_sizes {
            Some(b) if b.maximum > 0 => b.maximum,
            _ => proto::MAX_PAYLOAD,
        }
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.inner.shared.lock().pending.len()
    }

    /// Whether the connection is still usable.
    pub fn is_open(&self) -> bool {
        let st = self.inner.shared.lock();
        st.dead.is_none() && !st.closing
    }

    fn check_range(&self, what: &str, offset: u64, length: u64, payload: bool) -> Result<()> {
        let size = self.size();
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(NbdError::InvalidRequest(format!(
                "{what} of {length} bytes at offset {offset} is past the end of the export ({size} bytes)"
            )));
        }
        if length > u32::MAX as u64 {
            return Err(NbdError::InvalidRequest(format!(
                "{what} of {length} bytes does not fit one NBD request"
            )));
        }
        if payload && length > self.max_payload() as u64 {
            return Err(NbdError::InvalidRequest(format!(
                "{what} of {length} bytes exceeds the maximum payload of {} bytes",
                self.max_payload()
            )));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.flags().read_only() {
            Err(NbdError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn submit(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
        buf: Option<BytesMut>,
    ) -> Result<oneshot::Receiver<Result<Outcome>>> {
        let shared = &self.inner.shared;
        let (tx, rx) = oneshot::channel();
        let mut st = shared.lock();
        if let Some(reason) = &st.dead {
            return Err(NbdError::Disconnected(reason.clone()));
        }
        if st.closing {
            return Err(NbdError::Disconnected("the client is disconnecting".into()));
        }
        st.generation = st.generation.wrapping_add(1);
        let key = st.pending.vacant_key();
        if key > u32::MAX as usize {
            return Err(NbdError::InvalidRequest(
                "too many requests in flight".into(),
            ));
        }
        let handle = ((st.generation as u64) << 32) | key as u64;
        st.pending.insert(Pending {
            handle,
            cmd: kind,
            offset,
            length,
            buf,
            covered: 0,
            extents: Vec::new(),
            error: None,
            tx,
        });
        let out = &mut st.out;
        Request {
            flags,
            kind,
            handle,
            offset,
            length: length.into(),
        }
        .encode(&mut out.buf);
        if let Some(p) = payload {
            if p.len() <= COPY_PAYLOAD_MAX {
                out.buf.extend_from_slice(&p);
            } else {
                let head = out.buf.split().freeze();
                out.segs.push(head);
                out.segs.push(p);
            }
        }
        let wake = !out.wake_sent;
        out.wake_sent = true;
        drop(st);
        if wake {
            shared.writer_wake.notify_one();
        }
        Ok(rx)
    }

    async fn wait(&self, rx: oneshot::Receiver<Result<Outcome>>) -> Result<Outcome> {
        match rx.await {
            Ok(r) => r,
            Err(_) => {
                Err(NbdError::Disconnected(
                    self.inner.shared.lock().dead.clone().unwrap_or_else(|| {
                        "the connection failed with this request in flight".into()
                    }),
                ))
            }
        }
    }

    /// Read `length` bytes at `offset`.
    pub async fn read(&self, offset: u64, length: usize) -> Result<Bytes> {
        let buf = BytesMut::zeroed(length);
        Ok(self.read_into(offset, buf).await?.freeze())
    }

    /// Read `buf.len()` bytes at `offset` into `buf` and hand it back.
    /// Reusing the returned buffer avoids an allocation per read.
    pub async fn read_into(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        let length = buf.len();
        self.check_range("read", offset, length as u64, true)?;
        if length == 0 {
            return Ok(buf);
        }
        let rx = self.submit(cmd::READ, 0, offset, length as u32, None, Some(buf))?;
        match self.wait(rx).await? {
            Outcome::Data(b) => Ok(b),
            _ => Err(NbdError::Protocol("read completed without data".into())),
        }
    }

    /// Write `data` at `offset`; with `fua` the server replies only once the
    /// data is on stable storage.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range("write", offset, data.len() as u64, true)?;
        let flags = self.fua_flag(fua)?;
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u32;
        let rx = self.submit(cmd::WRITE, flags, offset, len, Some(data), None)?;
        self.wait(rx).await.map(|_| ())
    }

    fn fua_flag(&self, fua: bool) -> Result<u16> {
        match (fua, self.flags().can_fua()) {
            (false, _) => Ok(0),
            (true, true) => Ok(cmd_flag::FUA),
            (true, false) => Err(NbdError::Unsupported("FUA (NBD_FLAG_SEND_FUA)")),
        }
    }

    /// Flush: every write already answered reaches stable storage.
    pub async fn flush(&self) -> Result<()> {
        if !self.flags().can_flush() {
            return Err(NbdError::Unsupported("NBD_CMD_FLUSH"));
        }
        let rx = self.submit(cmd::FLUSH, 0, 0, 0, None, None)?;
        self.wait(rx).await.map(|_| ())
    }

    /// Discard `length` bytes at `offset` (contents afterwards are unspecified).
    pub async fn trim(&self, offset: u64, length: u64) -> Result<()> {
        self.check_writable()?;
        if !self.flags().can_trim() {
            return Err(NbdError::Unsupported("NBD_CMD_TRIM"));
        }
        self.check_range("trim", offset, length, false)?;
        let rx = self.submit(cmd::TRIM, 0, offset, length as u32, None, None)?;
        self.wait(rx).await.map(|_| ())
    }

    /// Write zeroes to `length` bytes at `offset`. With `no_hole` the server
    /// must keep the range allocated.
    pub async fn write_zeroes(&self, offset: u64, length: u64, no_hole: bool) -> Result<()> {
        self.check_writable()?;
        if !self.flags().can_write_zeroes() {
            return Err(NbdError::Unsupported("NBD_CMD_WRITE_ZEROES"));
        }
        self.check_range("write_zeroes", offset, length, false)?;
        let flags = if no_hole { cmd_flag::NO_HOLE } else { 0 };
        let rx = self.submit(cmd::WRITE_ZEROES, flags, offset, length as u32, None, None)?;
        self.wait(rx).await.map(|_| ())
    }

    /// `base:allocation` extents from `offset`, covering at most `length`
    /// bytes (the server may describe less than asked).
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        if self.inner.shared.base_allocation.is_none() {
            return Err(NbdError::Unsupported(
                "NBD_CMD_BLOCK_STATUS (base:allocation was not negotiated)",
            ));
        }
        let length = length
            .min(self.size().saturating_sub(offset))
            .min(u32::MAX as u64 & !4095);
        self.check_range("block_status", offset, length, false)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        let rx = self.submit(cmd::BLOCK_STATUS, 0, offset, length as u32, None, None)?;
        match self.wait(rx).await? {
            Outcome::Extents(e) if !e.is_empty() => Ok(e),
            _ => Err(NbdError::Protocol(
                "block status reply without base:allocation extents".into(),
            )),
        }
    }

    /// Soft disconnect: stop taking requests, wait for those in flight, send
    /// `NBD_CMD_DISC` and wait for the server to close.
    pub async fn disconnect(&self) -> Result<()> {
        let shared = &self.inner.shared;
        {
            let mut st = shared.lock();
            if st.dead.is_some() || st.closing {
                return Ok(());
            }
            st.closing = true;
        }
        loop {
            let idle = shared.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let st = shared.lock();
                if st.pending.is_empty() || st.dead.is_some() {
                    break;
                }
            }
            idle.await;
        }
        {
            let mut st = shared.lock();
            if st.dead.is_none() {
                queue_disc(&mut st);
            }
        }
        shared.writer_wake.notify_one();
        let reader = self
            .inner
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut reader) = reader {
            if tokio::time::timeout(DISCONNECT_TIMEOUT, &mut reader)
                .await
                .is_err()
            {
                reader.abort();
            }
        }
        Ok(())
    }
}

async fn write_segments<W: AsyncWrite + Unpin>(w: &mut W, segs: &mut [Bytes]) -> io::Result<()> {
    if segs.len() == 1 {
        return w.write_all(&segs[0]).await;
    }
    let mut first = 0;
    while first < segs.len() {
        let slices: Vec<IoSlice<'_>> = segs[first..]
            .iter()
            .take(64)
            .map(|s| IoSlice::new(s))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        drop(slices);
        while n > 0 {
            let l = segs[first].len();
            if n >= l {
                n -= l;
                first += 1;
            } else {
                segs[first].advance(n);
                n = 0;
            }
        }
        while first < segs.len() && segs[first].is_empty() {
            first += 1;
        }
    }
    Ok(())
}

async fn writer_loop<W: AsyncWrite + Unpin>(mut w: W, shared: Arc<Shared>) {
    let mut spare: Vec<Bytes> = Vec::new();
    loop {
        shared.writer_wake.notified().await;
        let (mut segs, shutdown, dead) = {
            let mut st = shared.lock();
            st.out.wake_sent = false;
            if !st.out.buf.is_empty() {
                let b = st.out.buf.split().freeze();
                st.out.segs.push(b);
            }
            let segs = std::mem::replace(&mut st.out.segs, std::mem::take(&mut spare));
            (segs, st.shutdown_after_write, st.dead.is_some())
        };
        if dead {
            return;
        }
        if !segs.is_empty() {
            if let Err(e) = write_segments(&mut w, &mut segs).await {
                shared.fail_all(format!("sending to the server failed: {e}"));
                return;
            }
        }
        segs.clear();
        spare = segs;
        if shutdown {
            let _ = w.flush().await;
            let _ = w.shutdown().await;
            return;
        }
    }
}

struct Rx<R> {
    r: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Rx<R> {
    /// Read more; `Ok(false)` on end of stream.
    async fn more(&mut self) -> io::Result<bool> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        Ok(self.r.read_buf(&mut self.buf).await? > 0)
    }

    async fn fill(&mut self, need: usize) -> io::Result<()> {
        while self.buf.len() < need {
            if !self.more().await? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection in the middle of a reply",
                ));
            }
        }
        Ok(())
    }

    async fn read_into(&mut self, dest: &mut [u8]) -> io::Result<()> {
        let need = dest.len();
        if need < DIRECT_READ_MIN {
            self.fill(need).await?;
            dest.copy_from_slice(&self.buf[..need]);
            self.buf.advance(need);
        } else {
            let have = self.buf.len().min(need);
            dest[..have].copy_from_slice(&self.buf[..have]);
            self.buf.advance(have);
            self.r.read_exact(&mut dest[have..]).await?;
        }
        Ok(())
    }

    async fn skip(&mut self, mut n: usize) -> io::Result<()> {
        while n > 0 {
            if self.buf.is_empty() {
                self.fill(1).await?;
            }
            let k = n.min(self.buf.len());
            self.buf.advance(k);
            n -= k;
        }
        Ok(())
    }

    /// Next reply header; `None` on a clean end of stream between replies.
    async fn header(&mut self) -> Result<Option<ReplyHeader>> {
        loop {
            match ReplyHeader::decode(&self.buf) {
                Decoded::Header(h, n) => {
                    self.buf.advance(n);
                    return Ok(Some(h));
                }
                Decoded::BadMagic(m) => {
                    return Err(NbdError::Protocol(format!("bad reply magic {m:#010x}")))
                }
                Decoded::Incomplete => {
                    if !self.more().await? {
                        if self.buf.is_empty() {
                            return Ok(None);
                        }
                        return Err(NbdError::Protocol(
                            "server closed the connection in the middle of a reply header".into(),
                        ));
                    }
                }
            }
        }
    }
}

async fn reader_loop<R: AsyncRead + Unpin>(r: R, shared: Arc<Shared>) {
    let mut rx = Rx {
        r,
        buf: BytesMut::with_capacity(READ_CHUNK),
    };
    let reason = match read_replies(&mut rx, &shared).await {
        Ok(()) => {
            if shared.lock().closing {
                "disconnected".to_string()
            } else {
                "the server closed the connection".to_string()
            }
        }
        Err(e) => e.to_string(),
    };
    shared.fail_all(reason);
}

async fn read_replies<R: AsyncRead + Unpin>(rx: &mut Rx<R>, shared: &Shared) -> Result<()> {
    while let Some(h) = rx.header().await? {
        match h {
            ReplyHeader::Simple { error, handle } => {
                let mut p = shared.remove(handle)?;
                if error != 0 {
                    let e = p.command_error(NbdErrno::from_wire(error), String::new());
                    p.complete(Some(e));
                } else if p.cmd == cmd::READ {
                    let mut buf = p.buf.take().unwrap_or_default();
                    rx.read_into(&mut buf[..]).await?;
                    p.buf = Some(buf);
                    p.complete(None);
                } else {
                    p.complete(None);
                }
            }
            ReplyHeader::Structured {
                flags,
                kind,
                handle,
                length,
            } => structured_chunk(rx, shared, flags, kind, handle, length as usize).await?,
            // `ReplyHeader::decode` only yields these to a peer that asked
            // for extended headers, which this client never does.
            ReplyHeader::Extended { handle, .. } => {
                return Err(NbdError::Protocol(format!(
                    "extended reply header without extended headers (handle {handle:#x})"
                )))
            }
        }
    }
    Ok(())
}

async fn structured_chunk<R: AsyncRead + Unpin>(
    rx: &mut Rx<R>,
    shared: &Shared,
    flags: u16,
    kind: u16,
    handle: u64,
    length: usize,
) -> Result<()> {
    let done = flags & proto::REPLY_FLAG_DONE != 0;
    // A final chunk owns its request outright; earlier chunks update it in place.
    let mut owned = if done {
        Some(shared.remove(handle)?)
    } else {
        None
    };
    let (req_off, req_len) = match &owned {
        Some(p) => (p.offset, p.length as u64),
        None => shared.with(handle, |p| (p.offset, p.length as u64))?,
    };
    let violation = |what: String| NbdError::Protocol(format!("{what} (handle {handle:#x})"));
    match kind {
        reply_type::NONE => {
            if length != 0 {
                return Err(violation("NBD_REPLY_TYPE_NONE with a payload".into()));
            }
            if !done {
                return Err(violation(
                    "NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE".into(),
                ));
            }
        }
        reply_type::OFFSET_DATA | reply_type::OFFSET_HOLE => {
            let is_data = kind == reply_type::OFFSET_DATA;
            if (is_data && length < 9) || (!is_data && length != 12) {
                return Err(violation(format!("content chunk of bad length {length}")));
            }
            rx.fill(if is_data { 8 } else { 12 }).await?;
            let off = rx.buf.get_u64();
            let n = if is_data {
                length as u64 - 8
            } else {
                rx.buf.get_u32() as u64
            };
            if off < req_off || off + n > req_off + req_len {
                return Err(violation(format!(
                    "content chunk {off}+{n} outside the request {req_off}+{req_len}"
                )));
            }
            let mut buf = match owned.as_mut() {
                Some(p) => p.buf.take(),
                None => shared.with(handle, |p| p.buf.take())?,
            }
            .ok_or_else(|| violation("content chunk for a request that is not a read".into()))?;
            let at = (off - req_off) as usize;
            let dest = &mut buf[at..at + n as usize];
            if is_data {
                rx.read_into(dest).await?;
            } else {
                dest.fill(0);
            }
            let put_back = |p: &mut Pending| {
                p.buf = Some(buf);
                p.covered += n;
            };
            match owned.as_mut() {
                Some(p) => put_back(p),
                None => shared.with(handle, put_back)?,
            }
        }
        reply_type::BLOCK_STATUS => {
            if length < 12 || !(length - 4).is_multiple_of(8) {
                return Err(violation(format!(
                    "block status chunk of bad length {length}"
                )));
            }
            rx.fill(length).await?;
            let ctx = rx.buf.get_u32();
            let mut extents = Vec::with_capacity((length - 4) / 8);
            for _ in 0..(length - 4) / 8 {
                let len = rx.buf.get_u32() as u64;
                let fl = rx.buf.get_u32();
                extents.push(Extent {
                    length: len,
                    flags: fl,
                });
            }
            if Some(ctx) == shared.base_allocation {
                match owned.as_mut() {
                    Some(p) => p.extents = extents,
                    None => shared.with(handle, |p| p.extents = extents)?,
                }
            }
        }
        k if k & reply_type::ERROR_BIT != 0 => {
            if length < 6 {
                return Err(violation(format!("error chunk of bad length {length}")));
            }
            rx.fill(6).await?;
            let errno = rx.buf.get_u32();
            let msg_len = rx.buf.get_u16() as usize;
            if 6 + msg_len > length {
                return Err(violation("error message longer than its chunk".into()));
            }
            rx.fill(msg_len).await?;
            let message = String::from_utf8_lossy(&rx.buf[..msg_len]).into_owned();
            rx.buf.advance(msg_len);
            rx.skip(length - 6 - msg_len).await?;
            let errno = NbdErrno::from_wire(if errno == 0 { proto::errno::EIO } else { errno });
            let set = |p: &mut Pending| {
                if p.error.is_none() {
                    p.error = Some(p.command_error(errno, message));
                }
            };
            match owned.as_mut() {
                Some(p) => set(p),
                None => shared.with(handle, set)?,
            }
        }
        _ => rx.skip(length).await?,
    }
    if let Some(p) = owned {
        let short = p.cmd == cmd::READ && p.error.is_none() && p.covered != p.length as u64;
        let e = short.then(|| {
            NbdError::Protocol(format!(
                "structured read reply covered {} of {} bytes (handle {handle:#x})",
                p.covered, p.length
            ))
        });
        p.complete(e);
    }
    Ok(())
}
