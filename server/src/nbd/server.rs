//! The listening NBD server: accepts connections, runs one task per
//! connection (handshake then transmission), and shuts down gracefully.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast_proto::congestion::LocalCongestion;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::export::{Export, ExportCatalog};
use super::handshake::{self, HandshakeError, Outcome};
use super::proto;
use super::transmission;

/// Default of [`NbdConfig::max_connections`] (and ballastd's
/// `--max-nbd-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Default of [`NbdConfig::busy_poll`] (and ballastd's `--nbd-busy-poll`):
/// longer than a fast client's turnaround between one reply and its next
/// request (tens of microseconds), short enough to cost little when it
/// does not come.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(100);

/// At most one "connection limit reached" warning per this interval.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Tunables of the NBD server. `NbdConfig::default()` is what ballastd uses.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// Connections served at once, those still in the handshake included
    /// (at least 1). Each one is bounded in memory, but not their number:
    /// past this, a new connection is accepted and closed at once, before
    /// the greeting, so its client fails fast (a connection left in the
    /// listen backlog would hang in the handshake instead). Open connections
    /// are unaffected.
    pub max_connections: usize,
    /// Requests one connection may have in flight (decoded, not yet replied
    /// to). Reading from the socket pauses at this limit.
    pub max_in_flight: usize,
    /// Payload bytes (READ data and WRITE data) one connection may hold in
    /// flight; a single maximal request always fits.
    pub max_in_flight_bytes: usize,
    /// Largest READ/WRITE length accepted, also advertised as the maximum
    /// block size. A WRITE claiming more is a protocol violation (the
    /// connection is dropped, nothing allocated); a READ gets `EINVAL`.
    pub max_payload: u32,
    /// Largest option payload read into memory during the handshake; larger
    /// ones are skipped (up to 256× this) or cause a disconnect.
    pub max_option_len: u32,
    /// How long a client may take to finish the handshake (`None`: forever).
    pub handshake_timeout: Option<Duration>,
    /// After shutdown is requested, how long connections get to finish their
    /// in-flight requests before they are cut (`None`: wait forever).
    pub shutdown_grace: Option<Duration>,
    /// Offer `NBD_OPT_STRUCTURED_REPLY` (needed for block status and hole
    /// chunks). Clients that never ask (the kernel) get simple replies anyway.
    pub structured_replies: bool,
    /// Offer `NBD_OPT_EXTENDED_HEADERS` (64-bit requests, used by qemu 10 and
    /// libnbd ≥ 1.18).
    pub extended_headers: bool,
    /// Receive buffer size per connection (many small pipelined requests are
    /// read with one syscall; large payloads bypass it).
    pub read_buffer: usize,
    /// How long a connection polls for its next request before its task
    /// sleeps (zero: never). Keeps the vCPU awake for a client that sends
    /// one request at a time; see `busy_poll`.
    pub busy_poll: Duration,
    /// TCP congestion control for connections from this host (loopback
    /// has nothing to pace for; see `ballast_proto::congestion`).
    pub local_congestion: LocalCongestion,
}

impl Default for NbdConfig {
    fn default() -> NbdConfig {
        NbdConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_in_flight: 128,
            max_in_flight_bytes: 64 << 20,
            max_payload: proto::MAX_PAYLOAD,
            max_option_len: 64 * 1024,
            handshake_timeout: Some(Duration::from_secs(120)),
            shutdown_grace: Some(Duration::from_secs(30)),
            structured_replies: true,
            extended_headers: true,
            read_buffer: 32 * 1024,
            busy_poll: DEFAULT_BUSY_POLL,
            local_congestion: LocalCongestion::default(),
        }
    }
}

type OpenExports = Arc<Mutex<HashMap<u64, Arc<dyn Export>>>>;

/// An NBD server bound to a TCP address.
pub struct NbdServer {
    listener: TcpListener,
    local: SocketAddr,
    catalog: Arc<dyn ExportCatalog>,
    cfg: Arc<NbdConfig>,
}

impl NbdServer {
    /// Binds `addr` (use port 0 for an ephemeral port; see
    /// [`NbdServer::local_addr`]).
    pub async fn bind(
        addr: SocketAddr,
        catalog: Arc<dyn ExportCatalog>,
        cfg: NbdConfig,
    ) -> io::Result<NbdServer> {
        let listener = TcpListener::bind(addr).await?;
        NbdServer::from_listener(listener, catalog, cfg)
    }

    /// Serves on an already bound listener.
    pub fn from_listener(
        listener: TcpListener,
        catalog: Arc<dyn ExportCatalog>,
        cfg: NbdConfig,
    ) -> io::Result<NbdServer> {
        let local = listener.local_addr()?;
        Ok(NbdServer {
            listener,
            local,
            catalog,
            cfg: Arc::new(cfg),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves until `shutdown` is cancelled, then: stops accepting, lets every
    /// connection finish its in-flight requests and send their replies (for
    /// at most `shutdown_grace`, after which every connection is cut, its
    /// socket closed even if its replies could not be written), calls
    /// `flush` on every export that was open, and returns.
    pub async fn run(self, shutdown: CancellationToken) -> io::Result<()> {
        let NbdServer {
            listener,
            local,
            catalog,
            cfg,
        } = self;
        tracing::info!(addr = %local, "NBD server listening");
        let open: OpenExports = Arc::new(Mutex::new(HashMap::new()));
        let mut conns = JoinSet::new();
        let mut next_id = 0u64;
        // One permit per connection, held by its task: released however the
        // task ends (done, cut at shutdown, or panicked).
        let limit = cfg.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let slots = Arc::new(Semaphore::new(limit));
        let mut refusals = RefusalLog::default();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            // Closing before the greeting: the client's
                            // handshake fails at once.
                            drop(stream);
                            if let Some(refused) = refusals.refused(Instant::now()) {
                                tracing::warn!(
                                    peer = %peer,
                                    limit,
                                    refused,
                                    "NBD connection limit reached: closing new connections"
                                );
                            }
                            continue;
                        };
                        next_id += 1;
                        let conn = connection(
                            stream,
                            peer,
                            catalog.clone(),
                            cfg.clone(),
                            shutdown.clone(),
                            open.clone(),
                            next_id,
                        );
                        conns.spawn(async move {
                            let _slot = slot;
                            conn.await
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting an NBD connection failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                },
            }
        }
        drop(listener);
        tracing::info!(
            connections = conns.len(),
            "NBD server stopping: finishing in-flight requests"
        );
        let drain = async { while conns.join_next().await.is_some() {} };
        let drained = match cfg.shutdown_grace {
            Some(g) => tokio::time::timeout(g, drain).await.is_ok(),
            None => {
                drain.await;
                true
            }
        };
        if !drained {
            tracing::warn!(
                connections = conns.len(),
                "NBD connections did not finish in time; cutting them"
            );
            conns.shutdown().await;
        }
        // Connections flush their export as they end; exports of connections
        // that were cut (or panicked) are flushed here.
        let leftovers: Vec<Arc<dyn Export>> =
            open.lock().expect("lock").drain().map(|(_, e)| e).collect();
        for e in leftovers {
            if let Err(err) = e.flush().await {
                tracing::warn!(error = %err, "flushing an export at shutdown failed");
            }
        }
        tracing::info!("NBD server stopped");
        Ok(())
    }
}

/// Counts connections refused at the limit and says when to log: at most
/// once per [`REFUSAL_LOG_INTERVAL`], so clients retrying in a loop cannot
/// flood the log, with how many were refused since the last warning.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// Records one refusal; `Some(n)` when a warning is due, `n` being the
    /// refusals it reports (this one included).
    fn refused(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        match self.last {
            Some(t) if now.saturating_duration_since(t) < REFUSAL_LOG_INTERVAL => None,
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    catalog: Arc<dyn ExportCatalog>,
    cfg: Arc<NbdConfig>,
    shutdown: CancellationToken,
    open: OpenExports,
    id: u64,
) {
    tracing::debug!(peer = %peer, "NBD connection opened");
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(peer = %peer, error = %e, "cannot set TCP_NODELAY");
    }
    if let Some(algorithm) = cfg.local_congestion.apply(&stream) {
        tracing::debug!(peer = %peer, %algorithm, "local client: TCP congestion control");
    }
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(cfg.read_buffer.max(4096), rd);

    let negotiation = handshake::negotiate(&mut rd, &mut wr, &*catalog, &cfg, peer);
    let outcome = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            tracing::debug!(peer = %peer, "NBD connection closed during the handshake: shutting down");
            return;
        }
        r = async {
            match cfg.handshake_timeout {
                Some(t) => tokio::time::timeout(t, negotiation).await.ok(),
                None => Some(negotiation.await),
            }
        } => r,
    };
    let neg = match outcome {
        None => {
            tracing::info!(peer = %peer, "NBD handshake timed out");
            return;
        }
        Some(Err(HandshakeError::Protocol(m))) => {
            tracing::warn!(peer = %peer, "NBD handshake: protocol violation: {m}");
            return;
        }
        Some(Err(HandshakeError::Io(e))) => {
            tracing::debug!(peer = %peer, error = %e, "NBD handshake: I/O error");
            return;
        }
        Some(Ok(Outcome::Closed)) => {
            tracing::debug!(peer = %peer, "NBD connection closed during the handshake");
            return;
        }
        Some(Ok(Outcome::Transmission(neg))) => neg,
    };

    let export = neg.export.clone();
    open.lock().expect("lock").insert(id, export.clone());
    tracing::debug!(peer = %peer, export = %neg.name, mode = ?neg.mode, flags = format_args!("{:#x}", neg.flags), "NBD transmission started");
    let closed = transmission::serve(rd, wr, neg, &cfg, peer, shutdown.clone()).await;
    if closed.dirty || shutdown.is_cancelled() {
        if let Err(e) = export.flush().await {
            tracing::warn!(peer = %peer, error = %e, "flushing the export after the connection failed");
        }
    }
    open.lock().expect("lock").remove(&id);
    tracing::debug!(peer = %peer, "NBD connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_most_once_per_interval_with_their_count() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.refused(t0), Some(1), "the first refusal is logged");
        assert_eq!(log.refused(t0 + Duration::from_secs(1)), None);
        assert_eq!(log.refused(t0 + Duration::from_secs(9)), None);
        // The next warning reports the ones kept quiet too.
        assert_eq!(log.refused(t0 + REFUSAL_LOG_INTERVAL), Some(3));
        assert_eq!(log.refused(t0 + REFUSAL_LOG_INTERVAL), None);
        assert_eq!(log.refused(t0 + 5 * REFUSAL_LOG_INTERVAL), Some(2));
    }
}
