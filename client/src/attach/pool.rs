//! A set of NBD connections to one export that outlives ballastd restarts.
//!
//! Requests are spread round-robin over the connections. When one fails
//! because its connection broke (closed, reset, protocol garbage, or
//! `NBD_ESHUTDOWN` from a server that is stopping), the connection is dialled
//! again under [`ReconnectPolicy`] and the request is sent again on the new
//! connection. Command errors (EIO, ENOSPC, ...) are returned as they are.
//!
//! # Durability across a reconnect
//!
//! A write the server acknowledged is durable only after a flush completes
//! after it. If a connection drops while acknowledged writes are not yet
//! covered by a flush, the server may have lost them (a crash rather than a
//! clean stop). So the pool keeps the data of acknowledged, unflushed writes
//! (up to [`REPLAY_LIMIT`] bytes; a successful flush releases them) and,
//! after a connection loss, writes them again — in acknowledgement order,
//! with every other request held back — before anything else is sent. A
//! loop-mounted file system therefore survives a ballastd restart or crash.
//!
//! If more than [`REPLAY_LIMIT`] bytes were written since the last flush,
//! the pool stops keeping them until a flush covers them all; a connection
//! loss in that state may have lost writes that cannot be resent, and the
//! next [`Pool::flush`] reports [`PoolError::WritesMayBeLost`] (EIO to
//! `fsync`), once, after flushing what it can. docs/attach.md states the rule.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::dial;
use super::reconnect::ReconnectPolicy;
use crate::nbd::{ConnectOptions, NbdClient, NbdErrno, NbdError, NbdUri, TransmissionFlags};

/// How to build a [`Pool`].
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The export.
    pub uri: NbdUri,
    /// Connections wanted; only one is opened unless the server offers
    /// `CAN_MULTI_CONN` (without it, a flush on one connection says nothing
    /// about writes on another).
    pub connections: usize,
    /// Reconnect schedule.
    pub policy: ReconnectPolicy,
    /// Negotiation options.
    pub options: ConnectOptions,
}

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The server answered the request with an error, or refused it.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// No connection could be made within the reconnect window.
    #[error(
        "the NBD server {uri} has been unreachable for {}s (last error: {last}); \
         the request failed — restart ballastd or check the network",
        down_for.as_secs()
    )]
    Unavailable {
        /// The export.
        uri: String,
        /// How long the connection has been down.
        down_for: Duration,
        /// The last dial error.
        last: String,
    },
    /// A connection dropped while writes were acknowledged but not flushed.
    #[error(
        "writes acknowledged since the last flush may have been lost: the NBD connection \
         dropped before a flush covered them (ballastd restarted or crashed); check the data \
         written since the last successful fsync"
    )]
    WritesMayBeLost,
    /// The export came back with another size.
    #[error(
        "the export {uri} came back with {now} bytes instead of {was}; detach and attach again"
    )]
    SizeChanged {
        /// The export.
        uri: String,
        /// Size at attach time.
        was: u64,
        /// Size after reconnecting.
        now: u64,
    },
    /// [`Pool::close`] was called.
    #[error("the attachment is shutting down")]
    Closed,
}

impl PoolError {
    /// The errno to give a FUSE caller.
    pub fn errno(&self) -> i32 {
        match self {
            PoolError::Nbd(NbdError::ReadOnly) => libc::EROFS,
            PoolError::Nbd(e) => match e.errno() {
                Some(NbdErrno::Eperm) => libc::EPERM,
                Some(NbdErrno::Enospc) => libc::ENOSPC,
                Some(NbdErrno::Einval) => libc::EINVAL,
                Some(NbdErrno::Enomem) => libc::ENOMEM,
                Some(NbdErrno::Eoverflow) => libc::EOVERFLOW,
                Some(NbdErrno::Enotsup) => libc::EOPNOTSUPP,
                _ => libc::EIO,
            },
            PoolError::Closed => libc::ESHUTDOWN,
            _ => libc::EIO,
        }
    }
}

/// True when `e` means the connection, not the request, failed: the request
/// is worth sending again on a new connection.
pub fn is_connection_error(e: &NbdError) -> bool {
    matches!(
        e,
        NbdError::Disconnected(_)
            | NbdError::Io(_)
            | NbdError::Connect { .. }
            | NbdError::Protocol(_)
            | NbdError::Handshake(_)
    ) || e.errno() == Some(NbdErrno::Eshutdown)
}

/// One acknowledged change to replay: data, or a range that reads as zeros
/// (a trim is replayed as zeroing, which it may always be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Bytes written.
    Data(Bytes),
    /// Length of a zeroed or trimmed range.
    Zero(u64),
}

impl Change {
    /// Bytes of memory the log spends on it.
    fn cost(&self) -> usize {
        match self {
            Change::Data(d) => d.len(),
            Change::Zero(_) => 64,
        }
    }
}

/// Most bytes of acknowledged, unflushed writes kept for replay.
pub const REPLAY_LIMIT: usize = 128 << 20;

/// Write/flush bookkeeping: the replay log and the EIO rule (see the module
/// docs).
#[derive(Debug, Clone)]
pub struct Durability {
    /// Writes acknowledged so far (each one's sequence number).
    pub acked: u64,
    /// `acked` as it was when the latest successful flush started.
    pub flushed: u64,
    /// A connection dropped while unflushed writes could not be replayed;
    /// not yet reported.
    pub maybe_lost: bool,
    /// The logged writes must be sent again before anything else.
    pub replay: bool,
    /// Acknowledged, unflushed writes: (sequence, offset, change).
    log: VecDeque<(u64, u64, Change)>,
    log_bytes: usize,
    limit: usize,
    /// While set, writes are not logged; the last one not logged.
    unlogged_until: Option<u64>,
}

impl Default for Durability {
    fn default() -> Self {
        Durability::with_limit(REPLAY_LIMIT)
    }
}

impl Durability {
    /// Bookkeeping that keeps at most `limit` bytes for replay.
    pub fn with_limit(limit: usize) -> Durability {
        Durability {
            acked: 0,
            flushed: 0,
            maybe_lost: false,
            replay: false,
            log: VecDeque::new(),
            log_bytes: 0,
            limit,
            unlogged_until: None,
        }
    }

    /// A write of `data` at `offset` was acknowledged.
    pub fn write_acked(&mut self, offset: u64, data: &Bytes) {
        self.change_acked(offset, Change::Data(data.clone()));
    }

    /// A change at `offset` was acknowledged.
    pub fn change_acked(&mut self, offset: u64, change: Change) {
        self.acked += 1;
        let cost = change.cost();
        if self.unlogged_until.is_none() && self.log_bytes + cost <= self.limit {
            self.log_bytes += cost;
            self.log.push_back((self.acked, offset, change));
        } else {
            // Too much unflushed data to keep: drop the log until a flush
            // covers every write not in it.
            self.log.clear();
            self.log_bytes = 0;
            self.unlogged_until = Some(self.acked);
        }
    }

    /// A flush is starting; returns the mark to pass to [`Self::flush_done`].
    pub fn flush_started(&self) -> u64 {
        self.acked
    }

    /// The flush that started at `mark` succeeded. `Err` when writes may
    /// have been lost before or during it (reported once).
    pub fn flush_done(&mut self, mark: u64) -> Result<(), PoolError> {
        self.flushed = self.flushed.max(mark);
        while self.log.front().is_some_and(|(seq, _, _)| *seq <= mark) {
            if let Some((_, _, c)) = self.log.pop_front() {
                self.log_bytes -= c.cost();
            }
        }
        if self.unlogged_until.is_some_and(|u| u <= mark) {
            self.unlogged_until = None;
        }
        if std::mem::take(&mut self.maybe_lost) {
            return Err(PoolError::WritesMayBeLost);
        }
        Ok(())
    }

    /// A connection was lost: unflushed writes must be replayed, or, when
    /// they were not all kept, may be lost.
    pub fn connection_lost(&mut self) {
        if self.acked > self.flushed {
            if self.unlogged_until.is_some() {
                self.maybe_lost = true;
            }
            if !self.log.is_empty() {
                self.replay = true;
            }
        }
    }

    /// The changes to send again, oldest first.
    pub fn replay_log(&self) -> Vec<(u64, Change)> {
        self.log.iter().map(|(_, o, c)| (*o, c.clone())).collect()
    }

    /// Acknowledged writes wait for a flush (or a loss waits to be reported).
    pub fn dirty(&self) -> bool {
        self.acked > self.flushed || self.maybe_lost
    }
}

struct SlotState {
    /// Bumped on every new connection, so concurrent failures of one
    /// connection trigger one reconnect.
    generation: u64,
    client: Option<NbdClient>,
    down_since: Option<Instant>,
    last_error: String,
}

struct Slot {
    state: Mutex<SlotState>,
    /// Held while dialling, so only one task dials for a slot.
    dialling: tokio::sync::Mutex<()>,
}

/// Reconnecting NBD connections to one export.
pub struct Pool {
    cfg: PoolConfig,
    slots: Vec<Slot>,
    next: AtomicUsize,
    durability: Mutex<Durability>,
    size: u64,
    flags: TransmissionFlags,
    max_payload: usize,
    closed: AtomicBool,
    /// Requests hold it shared while on the wire; a replay holds it
    /// exclusively, so no newer write can land before an older replayed one.
    gate: tokio::sync::RwLock<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("uri", &self.cfg.uri.to_string())
            .field("connections", &self.slots.len())
            .field("size", &self.size)
            .finish()
    }
}

impl Pool {
    /// Open the connections. The first dial is not retried: attaching to a
    /// server that is not there fails at once with the reason.
    pub async fn connect(cfg: PoolConfig) -> Result<Pool, NbdError> {
        let first = dial::client(&cfg.uri, &cfg.options).await?;
        let flags = first.flags();
        let wanted = cfg.connections.max(1);
        let n = if flags.can_multi_conn() { wanted } else { 1 };
        if n < wanted {
            tracing::info!(
                wanted,
                "the server does not offer CAN_MULTI_CONN; using one connection"
            );
        }
        let size = first.size();
        let max_payload = first.max_payload() as usize;
        let mut clients = vec![first];
        for _ in 1..n {
            clients.push(dial::client(&cfg.uri, &cfg.options).await?);
        }
        let slots = clients
            .into_iter()
            .map(|c| Slot {
                state: Mutex::new(SlotState {
                    generation: 0,
                    client: Some(c),
                    down_since: None,
                    last_error: String::new(),
                }),
                dialling: tokio::sync::Mutex::new(()),
            })
            .collect();
        Ok(Pool {
            cfg,
            slots,
            next: AtomicUsize::new(0),
            durability: Mutex::new(Durability::default()),
            size,
            flags,
            max_payload,
            closed: AtomicBool::new(false),
            gate: tokio::sync::RwLock::new(()),
        })
    }

    /// Export size in bytes (fixed for the life of the attachment).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags of the first connection.
    pub fn flags(&self) -> TransmissionFlags {
        self.flags
    }

    /// Connections in use.
    pub fn connections(&self) -> usize {
        self.slots.len()
    }

    /// Acknowledged writes wait for a flush.
    pub fn dirty(&self) -> bool {
        self.dur().dirty()
    }

    fn dur(&self) -> MutexGuard<'_, Durability> {
        self.durability.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot_state(&self, i: usize) -> MutexGuard<'_, SlotState> {
        self.slots[i]
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Slot `i`'s client and generation while it is connected; else `Err`
    /// with the generation a reconnect replaces.
    fn live_client(&self, i: usize) -> Result<(u64, NbdClient), u64> {
        let st = self.slot_state(i);
        match &st.client {
            Some(c) if c.is_open() => Ok((st.generation, c.clone())),
            _ => Err(st.generation),
        }
    }

    /// A live client of slot `i` and its generation, reconnecting if needed.
    async fn client(&self, i: usize) -> Result<(u64, NbdClient), PoolError> {
        loop {
            match self.live_client(i) {
                Ok(live) => return Ok(live),
                Err(generation) => self.recover(i, generation).await?,
            }
        }
    }

    /// Replace the connection of slot `i` whose generation `generation` failed.
    async fn recover(&self, i: usize, generation: u64) -> Result<(), PoolError> {
        let _dialling = self.slots[i].dialling.lock().await;
        let since = {
            let mut st = self.slot_state(i);
            if st.generation != generation {
                return Ok(()); // another task already replaced it
            }
            if st.client.take().is_some() {
                // First notice of this loss.
                self.dur().connection_lost();
                tracing::warn!(
                    uri = %self.cfg.uri,
                    connection = i,
                    "NBD connection lost; reconnecting"
                );
            }
            *st.down_since.get_or_insert_with(Instant::now)
        };
        let mut attempt = 0u32;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(PoolError::Closed);
            }
            match dial::client(&self.cfg.uri, &self.cfg.options).await {
                Ok(c) if c.size() != self.size => {
                    let now = c.size();
                    let _ = c.disconnect().await;
                    return Err(PoolError::SizeChanged {
                        uri: self.cfg.uri.to_string(),
                        was: self.size,
                        now,
                    });
                }
                Ok(c) => {
                    let mut st = self.slot_state(i);
                    st.client = Some(c);
                    st.generation += 1;
                    st.down_since = None;
                    tracing::info!(
                        uri = %self.cfg.uri,
                        connection = i,
                        after_ms = since.elapsed().as_millis() as u64,
                        "NBD connection re-established"
                    );
                    return Ok(());
                }
                Err(e) => {
                    let down_for = since.elapsed();
                    let last = e.to_string();
                    self.slot_state(i).last_error = last.clone();
                    match self.cfg.policy.next(attempt, down_for) {
                        Some(d) => tokio::time::sleep(d).await,
                        None => {
                            return Err(PoolError::Unavailable {
                                uri: self.cfg.uri.to_string(),
                                down_for,
                                last,
                            })
                        }
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Send the logged unflushed writes again, with every other request
    /// held back, when a connection loss asked for it.
    async fn replay_if_needed(&self) -> Result<(), PoolError> {
        if !self.dur().replay {
            return Ok(());
        }
        let _exclusive = self.gate.write().await;
        'again: loop {
            let entries = {
                let d = self.dur();
                if !d.replay {
                    return Ok(());
                }
                d.replay_log()
            };
            for (offset, change) in &entries {
                if self.closed.load(Ordering::Acquire) {
                    return Err(PoolError::Closed);
                }
                let (generation, c) = self.client(0).await?;
                let sent = match change {
                    Change::Data(d) => c.write(*offset, d.clone(), false).await,
                    Change::Zero(len) => c.write_zeroes(*offset, *len, false).await,
                };
                match sent {
                    Ok(()) => {}
                    Err(e) if is_connection_error(&e) => {
                        self.recover(0, generation).await?;
                        continue 'again;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            self.dur().replay = false;
            tracing::info!(
                writes = entries.len(),
                bytes = entries.iter().map(|(_, c)| c.cost()).sum::<usize>(),
                "replayed the writes not yet flushed when the connection was lost"
            );
            return Ok(());
        }
    }

    /// Run `op` on some connection, retrying it on a new connection when the
    /// connection (not the request) fails; `done` runs on success while the
    /// request still holds off replays.
    async fn run<T, F, Fut>(&self, op: F, done: impl FnOnce(&T)) -> Result<T, PoolError>
    where
        F: Fn(NbdClient) -> Fut,
        Fut: Future<Output = Result<T, NbdError>>,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(PoolError::Closed);
            }
            let (generation, c) = self.client(i).await?;
            self.replay_if_needed().await?;
            let shared = self.gate.read().await;
            match op(c).await {
                Ok(v) => {
                    done(&v);
                    return Ok(v);
                }
                Err(e) if is_connection_error(&e) => {
                    drop(shared);
                    tracing::debug!(error = %e, connection = i, "request failed with its connection; retrying");
                    self.recover(i, generation).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Read `len` bytes at `offset` (split to the server's payload limit).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, PoolError> {
        if len <= self.max_payload {
            return self
                .run(|c| async move { c.read(offset, len).await }, |_| {})
                .await;
        }
        let mut out = BytesMut::with_capacity(len);
        for (off, n) in chunks(offset, len, self.max_payload) {
            let part = self
                .run(|c| async move { c.read(off, n).await }, |_| {})
                .await?;
            out.extend_from_slice(&part);
        }
        Ok(out.freeze())
    }

    /// Write `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), PoolError> {
        for (off, n) in chunks(offset, data.len(), self.max_payload) {
            let start = (off - offset) as usize;
            let part = data.slice(start..start + n);
            self.run(
                |c| {
                    let part = part.clone();
                    async move { c.write(off, part, false).await }
                },
                |_| self.dur().write_acked(off, &part),
            )
            .await?;
        }
        Ok(())
    }

    /// Make `len` bytes at `offset` read as zeros: NBD TRIM when `discard`
    /// and the server can trim (ballastd's trim unmaps, which reads as
    /// zeros), else NBD WRITE_ZEROES.
    pub async fn zero(&self, offset: u64, len: u64, discard: bool) -> Result<(), PoolError> {
        let trim = discard && self.flags.can_trim();
        if !trim && !self.flags.can_write_zeroes() {
            return Err(NbdError::Unsupported("NBD_CMD_WRITE_ZEROES").into());
        }
        // Lengths are u32 on the wire; 1 GiB pieces stay block aligned.
        for (off, n) in chunks(offset, len as usize, 1 << 30) {
            let n = n as u64;
            self.run(
                |c| async move {
                    if trim {
                        c.trim(off, n).await
                    } else {
                        c.write_zeroes(off, n, false).await
                    }
                },
                |_| self.dur().change_acked(off, Change::Zero(n)),
            )
            .await?;
        }
        Ok(())
    }

    /// NBD FLUSH: every write acknowledged before the call is on stable
    /// storage when this returns `Ok`. See the module docs for the EIO rule.
    pub async fn flush(&self) -> Result<(), PoolError> {
        let mark = self.dur().flush_started();
        self.run(|c| async move { c.flush().await }, |_| {}).await?;
        self.dur().flush_done(mark)
    }

    /// The flush of a `close()`: [`Pool::flush`] while the server answers,
    /// but it never waits for a reconnect. With a connection down, a replay
    /// pending or the connection lost by this very flush, it returns `Ok` at
    /// once: the writes stay kept for the replay, and the next `fsync`
    /// flushes them and reports a loss (the EIO rule). Every process that
    /// inherited the file closes it at its `exec`, so a close that waited
    /// would stall each program started meanwhile for the whole reconnect
    /// window, including a ballastd started by a process holding the file:
    /// a deadlock until the window ends.
    pub async fn flush_unless_down(&self) -> Result<(), PoolError> {
        if self.dur().replay {
            return Ok(());
        }
        let Ok(live) = (0..self.slots.len())
            .map(|i| self.live_client(i).map(|(_, c)| c))
            .collect::<Result<Vec<_>, _>>()
        else {
            return Ok(());
        };
        // A replay holds the gate exclusively (and may wait for a reconnect).
        let Ok(_shared) = self.gate.try_read() else {
            return Ok(());
        };
        let mark = self.dur().flush_started();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % live.len();
        match live[i].flush().await {
            Ok(()) => self.dur().flush_done(mark),
            // The next request notices the loss and reconnects.
            Err(e) if is_connection_error(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Flush, then disconnect every connection. New requests fail with
    /// [`PoolError::Closed`].
    pub async fn close(&self) -> Result<(), PoolError> {
        let flushed = if self.flags.can_flush() && !self.flags.read_only() {
            self.flush().await
        } else {
            Ok(())
        };
        self.closed.store(true, Ordering::Release);
        for i in 0..self.slots.len() {
            let c = self.slot_state(i).client.take();
            if let Some(c) = c {
                let _ = c.disconnect().await;
            }
        }
        flushed
    }
}

/// Split `len` bytes at `offset` into pieces of at most `max` bytes.
pub fn chunks(offset: u64, len: usize, max: usize) -> impl Iterator<Item = (u64, usize)> {
    let max = max.max(1);
    (0..len.div_ceil(max)).map(move |k| {
        let start = k * max;
        (offset + start as u64, max.min(len - start))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking_covers_the_range_exactly() {
        let v: Vec<_> = chunks(100, 10, 4).collect();
        assert_eq!(v, [(100, 4), (104, 4), (108, 2)]);
        assert_eq!(chunks(0, 8, 4).collect::<Vec<_>>(), [(0, 4), (4, 4)]);
        assert_eq!(chunks(5, 0, 4).count(), 0);
        assert_eq!(
            chunks(0, 3, 0).count(),
            3,
            "a zero maximum means bytes one by one"
        );
    }

    fn data(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    #[test]
    fn unflushed_writes_are_replayed_after_a_loss() {
        let mut d = Durability::with_limit(1000);
        assert!(!d.dirty());
        // A loss with nothing unflushed needs nothing.
        d.connection_lost();
        assert!(!d.replay);
        assert!(d.flush_done(d.flush_started()).is_ok());

        d.write_acked(0, &data(100));
        let m = d.flush_started();
        d.flush_done(m).unwrap();
        assert!(
            !d.dirty() && d.replay_log().is_empty(),
            "a flush releases the log"
        );

        d.write_acked(4096, &data(10));
        d.write_acked(0, &data(20));
        d.connection_lost();
        assert!(d.replay, "unflushed writes must be sent again");
        d.change_acked(0, Change::Zero(8));
        let log = d.replay_log();
        assert_eq!(
            log,
            [
                (4096, Change::Data(data(10))),
                (0, Change::Data(data(20))),
                (0, Change::Zero(8))
            ],
            "in acknowledgement order, zeroing included"
        );
        // Replayed writes need no EIO: nothing was lost.
        d.replay = false;
        assert!(d.flush_done(d.flush_started()).is_ok());
    }

    #[test]
    fn eio_rule_when_the_log_overflowed() {
        let mut d = Durability::with_limit(100);
        d.write_acked(0, &data(60));
        d.write_acked(0, &data(60)); // over the limit: the log is dropped
        assert!(d.replay_log().is_empty());
        d.connection_lost();
        assert!(d.maybe_lost && !d.replay);
        let m = d.flush_started();
        assert!(matches!(d.flush_done(m), Err(PoolError::WritesMayBeLost)));
        // Reported once; the flush covered every unlogged write, so the log
        // works again.
        assert!(d.flush_done(d.flush_started()).is_ok());
        d.write_acked(0, &data(10));
        assert_eq!(d.replay_log().len(), 1);
    }

    #[test]
    fn a_write_acked_during_a_flush_stays_logged() {
        let mut d = Durability::with_limit(1000);
        d.write_acked(0, &data(1));
        let m = d.flush_started();
        d.write_acked(8, &data(2)); // lands while the flush is in flight
        d.flush_done(m).unwrap();
        assert!(d.dirty(), "the second write is not covered by the flush");
        assert_eq!(d.replay_log().len(), 1);
        assert_eq!(d.replay_log()[0].0, 8);
    }

    #[test]
    fn overflow_lasts_until_a_flush_covers_every_unlogged_write() {
        let mut d = Durability::with_limit(10);
        d.write_acked(0, &data(20)); // unlogged (seq 1)
        let m = d.flush_started();
        d.write_acked(0, &data(1)); // seq 2, during the flush: still unlogged
        d.flush_done(m).unwrap();
        d.connection_lost();
        assert!(d.maybe_lost, "seq 2 was neither flushed nor kept");
    }

    #[test]
    fn connection_errors_are_told_from_command_errors() {
        assert!(is_connection_error(&NbdError::Disconnected("x".into())));
        assert!(is_connection_error(&NbdError::Io(std::io::Error::other(
            "reset"
        ))));
        let cmd = |errno| NbdError::Command {
            command: "NBD_CMD_WRITE",
            errno,
            offset: 0,
            length: 1,
            message: String::new(),
        };
        assert!(is_connection_error(&cmd(NbdErrno::Eshutdown)));
        assert!(!is_connection_error(&cmd(NbdErrno::Enospc)));
        assert!(!is_connection_error(&NbdError::ReadOnly));
        assert_eq!(PoolError::from(cmd(NbdErrno::Enospc)).errno(), libc::ENOSPC);
        assert_eq!(PoolError::from(NbdError::ReadOnly).errno(), libc::EROFS);
        assert_eq!(PoolError::WritesMayBeLost.errno(), libc::EIO);
    }
}
