//! ballastd's command line and its start-up / shutdown sequence.

use crate::engine_control::EngineControl;
use crate::engine_export::EngineCatalog;
use crate::nbd::server::{DEFAULT_BUSY_POLL, DEFAULT_MAX_CONNECTIONS};
use anyhow::{bail, Context};
use ballast_engine::io::BackendChoice;
use ballast_engine::{DiskSpec, Engine, EngineConfig};
use ballast_proto::congestion::LocalCongestion;
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;

/// Size of the sparse disk file created on first start when no --disk is given.
pub const DEFAULT_DISK_SIZE: u64 = 16 << 30;

#[derive(Parser, Debug)]
#[command(
    name = "ballastd",
    version,
    about = "Ballast storage node: pools local disks into thin, deduplicated, compressed volumes served over NBD",
    long_about = "Ballast storage node.\n\n\
        Pools this host's disks into thin, replicated-ready, deduplicated, lz4-compressed, checksummed \
        block volumes, exports them over NBD and serves the gRPC control plane used by `ballast`.\n\n\
        With no --disk, a 16 GiB sparse file DATA/disks/disk0.img is created on first start: enough to try \
        Ballast with nothing else installed.",
    after_help = "Examples:\n  ballastd                                    # ./ballast-data, sparse 16 GiB disk\n  \
        ballastd --data /var/lib/ballast --disk /dev/nvme1n1 --disk /srv/b.img:100G\n  \
        ballastd --listen-nbd 0.0.0.0:10809 --listen-api 0.0.0.0:7800 --io-backend threads"
)]
pub struct Args {
    /// Folder for the metadata store and the default disk.
    #[arg(long, default_value = "./ballast-data", value_name = "DIR")]
    pub data: PathBuf,
    /// A pool disk: a block device or a file, created sparse with SIZE (K/M/G/T) if missing. Repeatable.
    /// Disks already in the pool are reopened automatically; naming a new one adds it.
    #[arg(long = "disk", value_name = "PATH[:SIZE]")]
    pub disks: Vec<String>,
    /// Address for NBD clients.
    #[arg(long, default_value = "127.0.0.1:10809", value_name = "ADDR")]
    pub listen_nbd: SocketAddr,
    /// Most NBD connections served at once, counting those still in the handshake.
    ///
    /// Past it, a new connection is accepted and closed straight away (its client fails at
    /// once, seeing the server hang up before the NBD greeting), a warning is logged at most
    /// every 10 s, and open connections go on unaffected. Each connection costs a file
    /// descriptor and up to 64 MiB of in-flight request data, so this bounds what clients can
    /// make ballastd hold; keep the open-file limit (ulimit -n) above it.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_name = "N", value_parser = parse_max_connections)]
    pub max_nbd_connections: usize,
    /// Microseconds an NBD connection keeps polling for its client's next request before it
    /// sleeps; 0 turns polling off.
    ///
    /// A client that sends one small request at a time (queue depth 1) gets its replies sooner
    /// when ballastd's thread is still awake for the next request: on a VM, waking a sleeping
    /// vCPU costs much of a round trip. Only such connections poll, and only while their client
    /// runs on another CPU; clients that pipeline or move large blocks are not polled for.
    /// Polling uses CPU only while it waits, and a connection whose next request does not come
    /// within this time polls less and less often, so idle connections cost nothing.
    #[arg(long, default_value_t = DEFAULT_BUSY_POLL.as_micros() as u64, value_name = "MICROS", value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub nbd_busy_poll: u64,
    /// TCP congestion control for NBD clients on this host (loopback, or this host's own
    /// address): a comma-separated list, the first one the kernel accepts wins; `system` keeps
    /// the system's default for them too.
    ///
    /// Over loopback there is no link to pace for, yet a pacing algorithm such as BBR (often the
    /// system default) arms a timer whenever the server's sends run ahead of its pacing rate,
    /// which on a VM costs large reads a fifth of their throughput. Clients on other hosts
    /// always keep the system's algorithm. Reno is always allowed; others only as listed in
    /// net.ipv4.tcp_allowed_congestion_control, or to root.
    #[arg(long, default_value_t = LocalCongestion::default(), value_name = "LIST|system")]
    pub nbd_local_congestion: LocalCongestion,
    /// Threads that run the NBD connections and the control plane: a number, or `auto`, one per
    /// CPU this process may use (TOKIO_WORKER_THREADS, when set, overrides `auto`).
    ///
    /// On a host whose CPUs the NBD clients share (hyper-converged), fewer threads than CPUs keep
    /// ballastd off the clients' CPUs and its requests on one thread: with 2 CPUs and the client on
    /// one of them, 1 thread served 4 KiB reads from disk at queue depth 32 a quarter faster, at
    /// a third less CPU per read, than 2, and a tenth slower at queue depth 1 (docs/benchmarks.md,
    /// session 32). More threads serve more connections, and large transfers, in parallel.
    #[arg(long, default_value_t = Workers::Auto, value_name = "N|auto")]
    pub workers: Workers,
    /// Address of the gRPC control plane (what `ballast --api` talks to).
    #[arg(long, default_value = "127.0.0.1:7800", value_name = "ADDR")]
    pub listen_api: SocketAddr,
    /// Data-disk I/O backend: io_uring, a thread pool, or auto (io_uring when the kernel and seccomp allow it).
    #[arg(long, value_enum, default_value_t = IoBackendArg::Auto)]
    pub io_backend: IoBackendArg,
    /// Memory for caching decoded blocks for reads: a size (K/M/G suffixes; 0 disables) or `auto`,
    /// a quarter of the memory this process may use (RAM, or the cgroup limit when lower), at least
    /// 256M. Shared by all volumes; deduplicated blocks are cached once. It fills only as blocks are
    /// read or written. Written blocks enter only where it has free room (a write never evicts; once
    /// it is full, written blocks enter when read), writes over 256 KiB only whole and only into
    /// unmapped blocks (rewrites of old data do not churn it).
    #[arg(long, default_value = "auto", value_name = "SIZE|auto", value_parser = parse_cache_arg)]
    pub read_cache: ReadCacheArg,
    /// Memory for completed writes not yet stored: a size (K/M/G suffixes), `off`, or `auto`, an
    /// eighth of the memory this process may use (RAM, or the cgroup limit when lower), at least 64M.
    ///
    /// Like the page cache under a file-backed NBD server, a write completes once it is in this
    /// buffer; hashing, deduplication, compression and the metadata commit happen later, and a block
    /// rewritten before then is stored once. FLUSH and FUA wait until what they cover is stored and
    /// committed; writes no FLUSH covered are lost on a crash, as NBD allows (clients that need them
    /// durable flush). Buffered writes are stored once the buffer is half full, when older than
    /// --write-back-expire, when a client that wrote disconnects, after a trim, before a snapshot
    /// and on shutdown. Writers wait while it is full. `off` stores every write before it
    /// completes.
    #[arg(long, default_value = "auto", value_name = "SIZE|auto|off", value_parser = parse_write_back_arg)]
    pub write_back: WriteBackArg,
    /// Seconds a buffered write may wait before it is stored (see --write-back).
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub write_back_expire: u64,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum IoBackendArg {
    Auto,
    Uring,
    Threads,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--read-cache`: a fixed size, or sized from the memory available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadCacheArg {
    Auto,
    Bytes(u64),
}

/// `--write-back`: a fixed size (0 or `off`: none), or sized from the memory available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteBackArg {
    Auto,
    Bytes(u64),
}

fn parse_write_back_arg(s: &str) -> Result<WriteBackArg, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(WriteBackArg::Auto);
    }
    if s.eq_ignore_ascii_case("off") {
        return Ok(WriteBackArg::Bytes(0));
    }
    ballast_proto::size::parse_size(s)
        .map(WriteBackArg::Bytes)
        .map_err(|e| format!("{e} (or `auto`, or `off`)"))
}

impl WriteBackArg {
    /// Bytes for the engine's write-back buffer: by default an eighth of
    /// memory, as the kernel lets a tenth to a fifth of it be dirty page
    /// cache before writers wait.
    pub fn bytes(self) -> u64 {
        match self {
            WriteBackArg::Bytes(b) => b,
            WriteBackArg::Auto => auto_write_back(mem_total(), cgroup_limit()),
        }
    }
}

fn auto_write_back(mem_total: Option<u64>, cgroup_limit: Option<u64>) -> u64 {
    const FLOOR: u64 = 64 << 20;
    usable_memory(mem_total, cgroup_limit).map_or(512 << 20, |m| (m / 8).max(FLOOR))
}

/// How many runtime worker threads ballastd starts (see [`Args::workers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workers {
    /// Tokio's default: one per CPU this process may use.
    Auto,
    Count(NonZeroUsize),
}

/// Far beyond any host's CPU count: a typo, not a plan.
const MAX_WORKERS: usize = 1024;

impl Workers {
    /// The number to give the runtime builder (`None`: its default).
    pub fn count(self) -> Option<usize> {
        match self {
            Workers::Auto => None,
            Workers::Count(n) => Some(n.get()),
        }
    }
}

impl std::str::FromStr for Workers {
    type Err = String;

    fn from_str(s: &str) -> Result<Workers, String> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Workers::Auto);
        }
        let n = s
            .parse::<usize>()
            .map_err(|e| format!("{e} (a whole number of threads, or `auto`)"))?;
        NonZeroUsize::new(n)
            .filter(|n| n.get() <= MAX_WORKERS)
            .map(Workers::Count)
            .ok_or_else(|| format!("must be between 1 and {MAX_WORKERS} (or `auto`)"))
    }
}

impl std::fmt::Display for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workers::Auto => f.write_str("auto"),
            Workers::Count(n) => write!(f, "{n}"),
        }
    }
}

fn parse_max_connections(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{e} (a whole number of connections)")),
    }
}

fn parse_cache_arg(s: &str) -> Result<ReadCacheArg, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(ReadCacheArg::Auto);
    }
    ballast_proto::size::parse_size(s)
        .map(ReadCacheArg::Bytes)
        .map_err(|e| format!("{e} (or `auto`)"))
}

impl ReadCacheArg {
    /// Bytes for the engine's read cache. Like a page cache, the read cache
    /// is what keeps warm reads off the disk, so by default it takes a share
    /// of memory rather than a fixed small size; a quarter leaves room for
    /// the metadata store, the page cache and the applications of a
    /// hyper-converged host.
    pub fn bytes(self) -> u64 {
        match self {
            ReadCacheArg::Bytes(b) => b,
            ReadCacheArg::Auto => auto_read_cache(mem_total(), cgroup_limit()),
        }
    }
}

fn auto_read_cache(mem_total: Option<u64>, cgroup_limit: Option<u64>) -> u64 {
    const FLOOR: u64 = 256 << 20;
    usable_memory(mem_total, cgroup_limit).map_or(1 << 30, |m| (m / 4).max(FLOOR))
}

/// The memory this process may use: RAM, or the cgroup limit when lower.
fn usable_memory(mem_total: Option<u64>, cgroup_limit: Option<u64>) -> Option<u64> {
    match (mem_total, cgroup_limit) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

fn mem_total() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The cgroup v2 memory limit of this process, if one is set.
fn cgroup_limit() -> Option<u64> {
    std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Parse `PATH[:SIZE]`; SIZE takes K/M/G/T suffixes (powers of 1024).
pub fn parse_disk(s: &str) -> anyhow::Result<DiskSpec> {
    let (path, size) = match s.rsplit_once(':') {
        Some((p, sz)) if !p.is_empty() && sz.chars().next().is_some_and(|c| c.is_ascii_digit()) => {
            let size = ballast_proto::size::parse_size(sz)
                .with_context(|| format!("--disk {s}: bad size"))?;
            (p, Some(size))
        }
        _ => (s, None),
    };
    if path.is_empty() {
        bail!("--disk needs a path, as in --disk /srv/disk0.img:100G");
    }
    Ok(DiskSpec {
        path: PathBuf::from(path),
        create_size: size,
    })
}

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = EngineConfig::new(&args.data);
    cfg.backend = match args.io_backend {
        IoBackendArg::Auto => BackendChoice::Auto,
        IoBackendArg::Uring => BackendChoice::Uring,
        IoBackendArg::Threads => BackendChoice::Threads,
    };
    cfg.read_cache_bytes = args.read_cache.bytes();
    cfg.write_back_bytes = args.write_back.bytes();
    cfg.write_back_expire = std::time::Duration::from_secs(args.write_back_expire);
    tracing::info!(
        read_cache_bytes = cfg.read_cache_bytes,
        write_back_bytes = cfg.write_back_bytes,
        write_back_expire_s = args.write_back_expire,
        "cache sizes (--read-cache, --write-back)"
    );
    cfg.disks = args
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<anyhow::Result<_>>()?;
    if cfg.disks.is_empty() {
        let dir = args.data.join("disks");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        cfg.disks.push(DiskSpec {
            path: dir.join("disk0.img"),
            create_size: Some(DEFAULT_DISK_SIZE),
        });
    }
    // Handlers go in before recovery, so a stop request during a long
    // recovery ends the process cleanly (exit 0) instead of by the signal.
    let mut stop = StopSignals::install()?;
    let engine = tokio::select! {
        r = Engine::open(cfg) => r.with_context(|| format!("opening the pool in {}", args.data.display()))?,
        _ = stop.wait() => {
            tracing::info!("stop requested while opening the pool; nothing was served, exiting");
            return Ok(());
        }
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let nbd = crate::nbd::NbdServer::bind(
        args.listen_nbd,
        Arc::new(EngineCatalog::new(engine.clone())),
        crate::nbd::NbdConfig {
            max_connections: args.max_nbd_connections,
            busy_poll: std::time::Duration::from_micros(args.nbd_busy_poll),
            local_congestion: args.nbd_local_congestion.clone(),
            ..crate::nbd::NbdConfig::default()
        },
    )
    .await
    .with_context(|| format!("listening for NBD on {}", args.listen_nbd))?;
    let api_listener = tokio::net::TcpListener::bind(args.listen_api)
        .await
        .with_context(|| format!("listening for the API on {}", args.listen_api))?;
    tracing::info!(
        nbd = %args.listen_nbd,
        api = %args.listen_api,
        data = %args.data.display(),
        backend = engine.backend_name(),
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "ballastd ready"
    );
    let nbd_addr = nbd.local_addr();
    let nbd_task = tokio::spawn(nbd.run(shutdown.clone()));
    let control = Arc::new(
        EngineControl::new(engine.clone(), tokio::runtime::Handle::current())
            .with_nbd_address(nbd_addr),
    );
    let api_shutdown = shutdown.clone();
    let api_task = tokio::spawn(crate::control::serve_listener(
        api_listener,
        control,
        async move { api_shutdown.cancelled().await },
    ));
    stop.wait().await;
    tracing::info!("shutting down: finishing in-flight requests");
    shutdown.cancel();
    match nbd_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "NBD server stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "NBD server task failed"),
    }
    if let Ok(Err(e)) = api_task.await {
        tracing::warn!(error = %e, "API server stopped with an error");
    }
    engine.shutdown().await.context("final flush")?;
    tracing::info!("all data flushed; bye");
    Ok(())
}

/// SIGTERM and SIGINT, installed once.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_cache_argument() {
        assert_eq!(parse_cache_arg("auto"), Ok(ReadCacheArg::Auto));
        assert_eq!(parse_cache_arg("0"), Ok(ReadCacheArg::Bytes(0)));
        assert_eq!(parse_cache_arg("2G"), Ok(ReadCacheArg::Bytes(2 << 30)));
        assert!(parse_cache_arg("lots").unwrap_err().contains("auto"));
    }

    #[test]
    fn write_back_arguments() {
        assert_eq!(parse_write_back_arg("auto"), Ok(WriteBackArg::Auto));
        assert_eq!(parse_write_back_arg("off"), Ok(WriteBackArg::Bytes(0)));
        assert_eq!(parse_write_back_arg("0"), Ok(WriteBackArg::Bytes(0)));
        assert_eq!(parse_write_back_arg("1G"), Ok(WriteBackArg::Bytes(1 << 30)));
        assert!(parse_write_back_arg("big").unwrap_err().contains("off"));
        let args = Args::try_parse_from(["ballastd"]).unwrap();
        assert_eq!(args.write_back, WriteBackArg::Auto);
        assert_eq!(args.write_back_expire, 30);
        assert!(Args::try_parse_from(["ballastd", "--write-back-expire", "0"]).is_err());
        const G: u64 = 1 << 30;
        assert_eq!(auto_write_back(Some(24 * G), None), 3 * G);
        assert_eq!(auto_write_back(Some(24 * G), Some(2 * G)), G / 4);
        assert_eq!(auto_write_back(Some(256 << 20), None), 64 << 20);
        assert_eq!(auto_write_back(None, None), 512 << 20);
    }

    #[test]
    fn max_connections_argument() {
        assert_eq!(parse_max_connections("1"), Ok(1));
        assert_eq!(parse_max_connections("4096"), Ok(4096));
        assert!(parse_max_connections("0")
            .unwrap_err()
            .contains("at least 1"));
        assert!(parse_max_connections("many").is_err());
        let args = Args::try_parse_from(["ballastd"]).unwrap();
        assert_eq!(args.max_nbd_connections, DEFAULT_MAX_CONNECTIONS);
        let args = Args::try_parse_from(["ballastd", "--max-nbd-connections", "64"]).unwrap();
        assert_eq!(args.max_nbd_connections, 64);
        assert!(Args::try_parse_from(["ballastd", "--max-nbd-connections", "0"]).is_err());
    }

    #[test]
    fn local_congestion_argument() {
        let args = Args::try_parse_from(["ballastd"]).unwrap();
        assert_eq!(args.nbd_local_congestion.algorithms(), ["cubic", "reno"]);
        let args = Args::try_parse_from(["ballastd", "--nbd-local-congestion", "system"]).unwrap();
        assert!(args.nbd_local_congestion.algorithms().is_empty());
        let args =
            Args::try_parse_from(["ballastd", "--nbd-local-congestion", "dctcp, reno"]).unwrap();
        assert_eq!(args.nbd_local_congestion.algorithms(), ["dctcp", "reno"]);
        for bad in ["", "cubic,,reno", "a b", "averyveryverylongname"] {
            assert!(
                Args::try_parse_from(["ballastd", "--nbd-local-congestion", bad]).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn workers_argument() {
        let args = Args::try_parse_from(["ballastd"]).unwrap();
        assert_eq!(args.workers, Workers::Auto);
        assert_eq!(args.workers.count(), None);
        let args = Args::try_parse_from(["ballastd", "--workers", "1"]).unwrap();
        assert_eq!(args.workers.count(), Some(1));
        let args = Args::try_parse_from(["ballastd", "--workers", "AUTO"]).unwrap();
        assert_eq!(args.workers, Workers::Auto);
        assert_eq!(
            Workers::Count(NonZeroUsize::new(8).unwrap()).to_string(),
            "8"
        );
        assert_eq!(Workers::Auto.to_string(), "auto");
        for bad in ["0", "-1", "1025", "two", ""] {
            assert!(
                Args::try_parse_from(["ballastd", "--workers", bad]).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn busy_poll_argument() {
        let args = Args::try_parse_from(["ballastd"]).unwrap();
        assert_eq!(args.nbd_busy_poll, 100);
        let args = Args::try_parse_from(["ballastd", "--nbd-busy-poll", "0"]).unwrap();
        assert_eq!(args.nbd_busy_poll, 0);
        assert!(Args::try_parse_from(["ballastd", "--nbd-busy-poll", "20000"]).is_err());
        assert!(Args::try_parse_from(["ballastd", "--nbd-busy-poll", "-1"]).is_err());
    }

    #[test]
    fn auto_read_cache_takes_a_quarter_of_the_tighter_limit() {
        const G: u64 = 1 << 30;
        assert_eq!(auto_read_cache(Some(24 * G), None), 6 * G);
        assert_eq!(auto_read_cache(Some(24 * G), Some(4 * G)), G);
        assert_eq!(auto_read_cache(Some(512 << 20), None), 256 << 20);
        assert_eq!(auto_read_cache(None, None), G);
    }
}
