//! The load generator: a fixed set of worker tasks per connection, each
//! keeping one request in flight, so every connection has `queue_depth`
//! requests outstanding. Workers own their buffers, random number generator
//! and latency histograms (no locks on the hot path); the histograms are
//! merged when the run ends.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ballast_proto::congestion::LocalCongestion;
use bytes::BytesMut;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::datagen::DataGen;
use super::report::{BenchReport, DirReport};
use super::rng::{splitmix64, XorShift};
use crate::nbd::{NbdClient, NbdUri};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random mix of reads and writes (`--read-percent`).
    Randrw,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
}

impl Pattern {
    /// Name as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
            Pattern::Randrw => "randrw",
            Pattern::Read => "read",
            Pattern::Write => "write",
        }
    }
    /// Offsets are random (else sequential).
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }
    /// The pattern writes.
    pub fn writes(self) -> bool {
        matches!(self, Pattern::Randwrite | Pattern::Randrw | Pattern::Write)
    }
    /// Percentage of reads for this pattern given `--read-percent`.
    pub fn read_share(self, read_percent: u8) -> u8 {
        match self {
            Pattern::Randread | Pattern::Read => 100,
            Pattern::Randwrite | Pattern::Write => 0,
            Pattern::Randrw => read_percent.min(100),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything one load run needs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Export to drive.
    pub uri: NbdUri,
    /// Access pattern.
    pub pattern: Pattern,
    /// Bytes per request.
    pub block_size: u32,
    /// Requests in flight per connection.
    pub queue_depth: usize,
    /// Connections (multi-conn).
    pub connections: usize,
    /// Stop after this long (if set).
    pub duration: Option<Duration>,
    /// Stop after this many bytes transferred (if set).
    pub bytes: Option<u64>,
    /// Share of reads in `randrw`.
    pub read_percent: u8,
    /// Share of duplicate blocks written.
    pub dedupe_percent: u8,
    /// Share of each written block that compresses away.
    pub compress_percent: u8,
    /// Check written data (during the run where safe, and all of it after).
    pub verify: bool,
    /// Seed of offsets and data.
    pub seed: u64,
    /// First byte of the region used.
    pub offset: u64,
    /// Length of the region used (default: to the end of the export).
    pub size: Option<u64>,
    /// Writes with FUA.
    pub fua: bool,
    /// TCP congestion control of connections to a server on this host.
    pub local_congestion: LocalCongestion,
}

impl LoadConfig {
    /// A config with the defaults of the command line.
    pub fn new(uri: NbdUri, pattern: Pattern) -> LoadConfig {
        LoadConfig {
            uri,
            pattern,
            block_size: 4096,
            queue_depth: 32,
            connections: 1,
            duration: Some(Duration::from_secs(10)),
            bytes: None,
            read_percent: 50,
            dedupe_percent: 0,
            compress_percent: 0,
            verify: false,
            seed: 0x0062_616c_6c61_7374,
            offset: 0,
            size: None,
            fua: false,
            local_congestion: LocalCongestion::default(),
        }
    }
}

/// Phases of a run, for progress display.
pub mod phase {
    /// Opening connections.
    pub const CONNECTING: u8 = 0;
    /// Measuring.
    pub const RUNNING: u8 = 1;
    /// Reading back written blocks.
    pub const VERIFYING: u8 = 2;
    /// Finished.
    pub const DONE: u8 = 3;
}

/// Counters a progress display can poll while a run goes on.
#[derive(Debug, Default)]
pub struct Live {
    /// Completed requests (published in small batches).
    pub ops: AtomicU64,
    /// Bytes transferred.
    pub bytes: AtomicU64,
    /// Blocks checked by the final read-back.
    pub verified: AtomicU64,
    /// Blocks to check in the final read-back.
    pub to_verify: AtomicU64,
    /// One of [`phase`].
    pub phase: AtomicU8,
    /// Set to end the run early (e.g. on Ctrl-C); the report covers what ran.
    pub stop: AtomicBool,
}

/// Workers publish their counters to [`Live`] every this many requests.
const PUBLISH_EVERY: u64 = 64;

/// Per-direction counters of one worker. The histogram (nanoseconds) is
/// created on first use and grows to the largest value seen, so a worker
/// that only reads carries no write histogram.
struct DirStats {
    ops: u64,
    bytes: u64,
    sigfig: u8,
    hist: Option<Histogram<u64>>,
}

impl DirStats {
    /// `sigfig` 3 keeps 0.1% precision; 2 (1%, like fio's buckets) uses a
    /// tenth of the memory, for runs with very many workers.
    fn new(sigfig: u8) -> DirStats {
        DirStats {
            ops: 0,
            bytes: 0,
            sigfig,
            hist: None,
        }
    }

    #[inline]
    fn record(&mut self, ns: u64) {
        let sigfig = self.sigfig;
        let h = self
            .hist
            .get_or_insert_with(|| Histogram::new(sigfig).expect("valid histogram precision"));
        // `record` grows the histogram; `saturating_record` would clamp instead.
        if h.record(ns.max(1)).is_err() {
            h.saturating_record(ns.max(1));
        }
    }

    fn merge(&mut self, o: &DirStats) {
        self.ops += o.ops;
        self.bytes += o.bytes;
        if let Some(h) = &o.hist {
            let sigfig = self.sigfig;
            self.hist
                .get_or_insert_with(|| Histogram::new(sigfig).expect("valid histogram precision"))
                .add(h)
                .expect("auto-resizing histogram");
        }
    }

    fn histogram(&self) -> Histogram<u64> {
        self.hist
            .clone()
            .unwrap_or_else(|| Histogram::new(self.sigfig).expect("valid histogram precision"))
    }
}

struct WorkerStats {
    read: DirStats,
    write: DirStats,
}

#[derive(Default)]
struct VerifyState {
    /// Block → key of the data last written there (completed writes only).
    written: HashMap<u64, u64>,
    /// Blocks with a request in flight.
    busy: HashSet<u64>,
}

struct RunCtx {
    gen: DataGen,
    pattern: Pattern,
    read_share: u8,
    bs: u64,
    start: u64,
    nblocks: u64,
    op_limit: Option<u64>,
    issued: AtomicU64,
    cursor: AtomicU64,
    deadline: Instant,
    stop: AtomicBool,
    fua: bool,
    seed: u64,
    /// Precision of the latency histograms.
    sigfig: u8,
    verify: Option<Mutex<VerifyState>>,
    verify_errors: AtomicU64,
    first_mismatch: Mutex<Option<String>>,
    live: Arc<Live>,
}

impl RunCtx {
    fn note_mismatch(&self, what: String) {
        self.verify_errors.fetch_add(1, Ordering::Relaxed);
        let mut m = self
            .first_mismatch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if m.is_none() {
            *m = Some(what);
        }
    }

    fn check(&self, block: u64, key: u64, got: &[u8], scratch: &mut [u8]) -> bool {
        self.gen.fill(key, scratch);
        if got == scratch {
            return true;
        }
        let at = got
            .iter()
            .zip(scratch.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        self.note_mismatch(format!(
            "block at offset {} differs from what was written (first difference at byte {at})",
            self.start + block * self.bs
        ));
        false
    }
}

/// Connect `n` clients to `uri`.
pub async fn connect_all(
    uri: &NbdUri,
    n: usize,
    local_congestion: &LocalCongestion,
) -> anyhow::Result<Vec<NbdClient>> {
    let opts = crate::nbd::ConnectOptions {
        local_congestion: local_congestion.clone(),
        ..Default::default()
    };
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let uri = uri.clone();
        let opts = opts.clone();
        tasks.push(tokio::spawn(async move {
            NbdClient::connect_with(&uri, &opts).await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.context("connect task failed")??);
    }
    Ok(out)
}

/// Run the load described by `cfg` on the current tokio runtime.
pub async fn run_load(cfg: &LoadConfig, live: Arc<Live>) -> anyhow::Result<BenchReport> {
    if cfg.block_size == 0 {
        bail!("--block-size must be at least 1 byte");
    }
    if cfg.queue_depth == 0 || cfg.connections == 0 {
        bail!("--queue-depth and --connections must be at least 1");
    }
    if cfg.duration.is_none() && cfg.bytes.is_none() {
        bail!("give --duration or --bytes");
    }
    live.phase.store(phase::CONNECTING, Ordering::Relaxed);
    let conns = connect_all(&cfg.uri, cfg.connections, &cfg.local_congestion)
        .await
        .with_context(|| {
            format!(
                "cannot open {} connection(s) to {}",
                cfg.connections, cfg.uri
            )
        })?;
    let export_size = conns[0].size();
    if conns.iter().any(|c| c.size() != export_size) {
        bail!("connections report different export sizes");
    }
    if cfg.pattern.writes() && conns[0].flags().read_only() {
        bail!("the export {} is read-only; pick a read pattern", cfg.uri);
    }
    if cfg.connections > 1 && !conns[0].flags().can_multi_conn() {
        eprintln!(
            "warning: the server does not advertise NBD_FLAG_CAN_MULTI_CONN; \
             {} connections may not see each other's writes consistently",
            cfg.connections
        );
    }
    if cfg.fua && !conns[0].flags().can_fua() {
        bail!("the export does not support FUA");
    }
    let bs = cfg.block_size as u64;
    if cfg.block_size > conns[0].max_payload() {
        bail!(
            "--block-size {} exceeds the server's maximum payload of {} bytes",
            bs,
            conns[0].max_payload()
        );
    }
    if cfg.offset >= export_size {
        bail!(
            "--offset {} is past the end of the export ({export_size} bytes)",
            cfg.offset
        );
    }
    let region = cfg.size.unwrap_or(u64::MAX).min(export_size - cfg.offset);
    let nblocks = region / bs;
    if nblocks == 0 {
        bail!("the region of {region} bytes is smaller than one block of {bs} bytes");
    }
    let op_limit = cfg.bytes.map(|b| b.div_ceil(bs).max(1));
    let start_time = Instant::now();
    let far = start_time + Duration::from_secs(100 * 365 * 86_400);
    let deadline = cfg.duration.map_or(far, |d| start_time + d);
    let ctx = Arc::new(RunCtx {
        gen: DataGen::new(
            bs as usize,
            cfg.dedupe_percent,
            cfg.compress_percent,
            cfg.seed,
        ),
        pattern: cfg.pattern,
        read_share: cfg.pattern.read_share(cfg.read_percent),
        bs,
        start: cfg.offset,
        nblocks,
        op_limit,
        issued: AtomicU64::new(0),
        cursor: AtomicU64::new(0),
        deadline,
        stop: AtomicBool::new(false),
        fua: cfg.fua,
        seed: cfg.seed,
        sigfig: if cfg.queue_depth * cfg.connections > 256 {
            2
        } else {
            3
        },
        verify: cfg.verify.then(|| Mutex::new(VerifyState::default())),
        verify_errors: AtomicU64::new(0),
        first_mismatch: Mutex::new(None),
        live: live.clone(),
    });
    live.phase.store(phase::RUNNING, Ordering::Relaxed);
    let mut handles = Vec::with_capacity(cfg.connections * cfg.queue_depth);
    let mut wid = 0u32;
    for conn in &conns {
        for _ in 0..cfg.queue_depth {
            handles.push(tokio::spawn(worker(ctx.clone(), conn.clone(), wid)));
            wid += 1;
        }
    }
    let mut read = DirStats::new(ctx.sigfig);
    let mut write = DirStats::new(ctx.sigfig);
    let mut first_err: Option<anyhow::Error> = None;
    for h in handles {
        match h.await {
            Ok(Ok(s)) => {
                read.merge(&s.read);
                write.merge(&s.write);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow!("worker task failed: {e}"));
            }
        }
    }
    let seconds = start_time.elapsed().as_secs_f64();
    if let Some(e) = first_err {
        return Err(e);
    }
    let mut verified_blocks = 0;
    if cfg.verify {
        live.phase.store(phase::VERIFYING, Ordering::Relaxed);
        verified_blocks = read_back(&ctx, &conns, cfg.queue_depth).await?;
    }
    for c in &conns {
        c.disconnect().await.ok();
    }
    live.phase.store(phase::DONE, Ordering::Relaxed);
    let verify_errors = ctx.verify_errors.load(Ordering::Relaxed);
    let first_mismatch = ctx
        .first_mismatch
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut total = DirStats::new(ctx.sigfig);
    total.merge(&read);
    total.merge(&write);
    let dir =
        |d: &DirStats| (d.ops > 0).then(|| DirReport::new(d.ops, d.bytes, seconds, &d.histogram()));
    Ok(BenchReport::new(
        cfg,
        seconds,
        DirReport::new(total.ops, total.bytes, seconds, &total.histogram()),
        dir(&read),
        dir(&write),
        verify_errors,
        verified_blocks,
        first_mismatch,
    ))
}

async fn worker(ctx: Arc<RunCtx>, nbd: NbdClient, wid: u32) -> anyhow::Result<WorkerStats> {
    let bs = ctx.bs as usize;
    let mut rng = XorShift::new(ctx.seed ^ splitmix64(0xb10c_0000 + wid as u64));
    let mut keys = ctx.gen.stream(wid);
    let mut rbuf = Some(BytesMut::zeroed(bs));
    let mut wbuf = Some(BytesMut::zeroed(bs));
    let mut scratch = if ctx.verify.is_some() {
        vec![0u8; bs]
    } else {
        Vec::new()
    };
    let mut stats = WorkerStats {
        read: DirStats::new(ctx.sigfig),
        write: DirStats::new(ctx.sigfig),
    };
    let (mut pub_ops, mut pub_bytes) = (0u64, 0u64);
    let mut now = Instant::now();
    loop {
        if now >= ctx.deadline
            || ctx.stop.load(Ordering::Relaxed)
            || ctx.live.stop.load(Ordering::Relaxed)
        {
            break;
        }
        let mut seq = None;
        if let Some(limit) = ctx.op_limit {
            let i = ctx.issued.fetch_add(1, Ordering::Relaxed);
            if i >= limit {
                break;
            }
            seq = Some(i);
        }
        let is_read = match ctx.read_share {
            100 => true,
            0 => false,
            p => rng.percent(p),
        };
        let mut next_block = |rng: &mut XorShift| {
            if ctx.pattern.is_random() {
                rng.below(ctx.nblocks)
            } else {
                seq.take()
                    .unwrap_or_else(|| ctx.cursor.fetch_add(1, Ordering::Relaxed))
                    % ctx.nblocks
            }
        };
        let mut block = next_block(&mut rng);
        let mut expect = None;
        if let Some(v) = &ctx.verify {
            let mut tries = 0u32;
            loop {
                {
                    let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
                    if v.busy.insert(block) {
                        expect = v.written.get(&block).copied();
                        break;
                    }
                }
                tries += 1;
                if tries.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
                block = if ctx.pattern.is_random() {
                    rng.below(ctx.nblocks)
                } else {
                    ctx.cursor.fetch_add(1, Ordering::Relaxed) % ctx.nblocks
                };
            }
        }
        let offset = ctx.start + block * ctx.bs;
        let result;
        let t0;
        if is_read {
            let buf = rbuf.take().unwrap_or_else(|| BytesMut::zeroed(bs));
            t0 = if ctx.verify.is_some() {
                Instant::now()
            } else {
                now
            };
            result = nbd.read_into(offset, buf).await.map(|b| rbuf = Some(b));
        } else {
            let mut buf = wbuf.take().unwrap_or_else(|| BytesMut::zeroed(bs));
            buf.resize(bs, 0);
            let key = keys.next_key();
            ctx.gen.fill(key, &mut buf);
            expect = Some(key);
            let data = buf.freeze();
            t0 = Instant::now();
            result = nbd.write(offset, data.clone(), ctx.fua).await;
            wbuf = data.try_into_mut().ok();
        }
        now = Instant::now();
        let lat = now.saturating_duration_since(t0).as_nanos() as u64;
        if let Err(e) = result {
            ctx.stop.store(true, Ordering::Relaxed);
            let op = if is_read { "read" } else { "write" };
            return Err(anyhow::Error::new(e)
                .context(format!("{op} of {bs} bytes at offset {offset} failed")));
        }
        if let Some(v) = &ctx.verify {
            if is_read {
                if let (Some(key), Some(b)) = (expect, rbuf.as_ref()) {
                    ctx.check(block, key, b, &mut scratch);
                }
            }
            let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
            v.busy.remove(&block);
            if !is_read {
                if let Some(key) = expect {
                    v.written.insert(block, key);
                }
            }
        }
        let d = if is_read {
            &mut stats.read
        } else {
            &mut stats.write
        };
        d.ops += 1;
        d.bytes += ctx.bs;
        d.record(lat);
        pub_ops += 1;
        pub_bytes += ctx.bs;
        if pub_ops == PUBLISH_EVERY {
            ctx.live.ops.fetch_add(pub_ops, Ordering::Relaxed);
            ctx.live.bytes.fetch_add(pub_bytes, Ordering::Relaxed);
            (pub_ops, pub_bytes) = (0, 0);
        }
    }
    ctx.live.ops.fetch_add(pub_ops, Ordering::Relaxed);
    ctx.live.bytes.fetch_add(pub_bytes, Ordering::Relaxed);
    Ok(stats)
}

/// Read back every block written during the run and compare; returns how
/// many blocks were checked.
async fn read_back(ctx: &Arc<RunCtx>, conns: &[NbdClient], qd: usize) -> anyhow::Result<u64> {
    let blocks: Vec<(u64, u64)> = {
        let v = ctx
            .verify
            .as_ref()
            .expect("verify on")
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut b: Vec<(u64, u64)> = v.written.iter().map(|(b, k)| (*b, *k)).collect();
        b.sort_unstable();
        b
    };
    let blocks = Arc::new(blocks);
    ctx.live
        .to_verify
        .store(blocks.len() as u64, Ordering::Relaxed);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for conn in conns {
        for _ in 0..qd {
            let (ctx, blocks, next, nbd) =
                (ctx.clone(), blocks.clone(), next.clone(), conn.clone());
            tasks.push(tokio::spawn(async move {
                let bs = ctx.bs as usize;
                let mut buf = BytesMut::zeroed(bs);
                let mut scratch = vec![0u8; bs];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&(block, key)) = blocks.get(i) else {
                        return Ok::<(), anyhow::Error>(());
                    };
                    let offset = ctx.start + block * ctx.bs;
                    buf = nbd
                        .read_into(offset, buf)
                        .await
                        .with_context(|| format!("verify read at offset {offset} failed"))?;
                    ctx.check(block, key, &buf, &mut scratch);
                    ctx.live.verified.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    for t in tasks {
        t.await.context("verify task failed")??;
    }
    Ok(blocks.len() as u64)
}
