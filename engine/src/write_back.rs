//! The write-back buffer: completed writes held in memory until the
//! drainer lands them in the engine, as a page cache holds dirty pages.
//!
//! Why: the write path's cost is per block (hash, dedup lookup, lz4, the
//! metadata commit), paid inline it caps 1 MiB writes at a fraction of what
//! a server copying into the page cache reaches, and a block rewritten
//! before it lands is never hashed at all. NBD asks durability only of
//! FLUSH and FUA, which wait here for what they cover to land.
//!
//! Ordering: with write-back on, every change to a volume (writes, trims,
//! zeroes, read-modify-writes of partial blocks) enters this buffer, which
//! holds at most one version of each block: an insert replaces what it
//! overlaps. Reads look here first, then in the engine. Drainers land
//! writes oldest first, never two overlapping ones at once, and remove a
//! write's pieces only after it landed, so a block is always readable from
//! one place or the other, and a newer version (still buffered) always
//! lands after an older one.
//! Partial-block writes read the old block first, so they register when
//! called (as the engine's late writes do) and skip, when they insert, the
//! blocks that whole-block writes called after them replaced.

use crate::error::{EngineError, Result};
use crate::state::LateWrites;
use crate::volume::VolumeShared;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What a zero run counts against the buffer's size: it holds no data.
const ZERO_RUN_BYTES: u64 = 64;

/// Most bytes of adjacent writes one landing gathers: the largest write
/// over mapped blocks whose blocks the engine still caches for reads.
const GATHER_BYTES: u64 = crate::volume::CACHE_WRITES_UP_TO as u64;

/// A run of blocks `[first, end)`: data (`(end - first)` blocks of it) or
/// zeros (`None`).
#[derive(Clone, Debug)]
pub(crate) struct Run {
    pub first: u64,
    pub end: u64,
    pub data: Option<Bytes>,
}

/// What a write sets its blocks to.
pub(crate) enum Change {
    /// Whole blocks of data.
    Data(Bytes),
    /// This many blocks of zeros (a trim, write-zeroes).
    Zeros(u64),
}

/// Buffered writes to land together: one write, or several adjacent
/// one-piece writes gathered into one run of blocks (see `WriteBack::pick`).
pub(crate) struct Job {
    /// The writes, the one picked first.
    pub seqs: Vec<u64>,
    pub volume: Arc<VolumeShared>,
    /// In block order, not overlapping; adjacent data runs land as one
    /// write.
    pub runs: Vec<Run>,
}

#[derive(Clone)]
struct Piece {
    end: u64,
    seq: u64,
    data: Option<Bytes>,
}

impl Piece {
    /// This piece, starting at block `first` (its key), as a run to land.
    fn run(&self, first: u64) -> Run {
        Run {
            first,
            end: self.end,
            data: self.data.clone(),
        }
    }
}

/// A write with pieces still buffered.
struct Live {
    volume: u32,
    first: u64,
    end: u64,
    pieces: u32,
    /// What it holds in memory: every piece is a slice of its buffer.
    bytes: u64,
    born: Instant,
    /// Zeros only (a trim, a write of zeros): landing it needs no space
    /// and may free some.
    unmap: bool,
    /// In a job being landed.
    landing: bool,
}

struct VolumeDirty {
    shared: Arc<VolumeShared>,
    /// By first block; never overlapping.
    pieces: BTreeMap<u64, Piece>,
    partial: LateWrites,
}

#[derive(Clone)]
enum Failure {
    NoSpace,
    Other(String),
}

#[derive(Default)]
struct Dirty {
    volumes: HashMap<u32, VolumeDirty>,
    /// By sequence number, which is also age order.
    live: BTreeMap<u64, Live>,
    next_seq: u64,
    bytes: u64,
    /// Writes up to this one are wanted landed now (flush, FUA, snapshot).
    urgent: u64,
    /// Why the last landing failed, until one succeeds.
    failure: Option<Failure>,
    /// Jobs being landed: `(first seq, volume, first, end)`, the blocks
    /// each may write.
    landing: Vec<(u64, u32, u64, u64)>,
}

impl Dirty {
    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }
}

/// `v`'s buffered state, made on its first use.
fn volume_entry<'a>(
    volumes: &'a mut HashMap<u32, VolumeDirty>,
    v: &Arc<VolumeShared>,
) -> &'a mut VolumeDirty {
    volumes.entry(v.id).or_insert_with(|| VolumeDirty {
        shared: v.clone(),
        pieces: BTreeMap::new(),
        partial: LateWrites::default(),
    })
}

pub(crate) struct WriteBack {
    capacity: u64,
    /// Past this, the drainer lands writes however young they are.
    background: u64,
    expire: Duration,
    st: Mutex<Dirty>,
    /// Pieces buffered, so that reads skip the lock when there are none.
    pieces: AtomicUsize,
    bytes: AtomicU64,
    pub wake: Arc<Notify>,
    progress: Notify,
}

impl WriteBack {
    pub fn new(capacity: u64, expire: Duration) -> WriteBack {
        WriteBack {
            capacity,
            background: capacity / 2,
            expire,
            st: Mutex::new(Dirty {
                next_seq: 1,
                ..Default::default()
            }),
            pieces: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            wake: Arc::new(Notify::new()),
            progress: Notify::new(),
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether a writer must wait for the drainer before completing.
    pub fn over_capacity(&self) -> bool {
        self.bytes() > self.capacity
    }

    /// The newest write registered so far.
    pub fn last_seq(&self) -> u64 {
        self.st.lock().next_seq - 1
    }

    /// Buffers `change` from block `first`. `partial`: the sequence number
    /// and late-write id from [`WriteBack::register_partial`] of a
    /// read-modify-write landing now. Returns the write's sequence number.
    pub fn insert(
        &self,
        v: &Arc<VolumeShared>,
        first: u64,
        change: Change,
        partial: Option<(u64, u64)>,
    ) -> u64 {
        let bs = v.block_size as usize;
        // All-zero blocks become zero runs: no memory, and block status
        // reports them as the engine will once they land.
        let (runs, bytes) = match &change {
            Change::Data(d) => (split_zero_runs(first, d, bs), d.len() as u64),
            Change::Zeros(n) => (
                vec![Run {
                    first,
                    end: first + n,
                    data: None,
                }],
                ZERO_RUN_BYTES,
            ),
        };
        let end = runs.last().map_or(first, |r| r.end);
        let unmap = runs.iter().all(|r| r.data.is_none());
        let mut st = self.st.lock();
        let st = &mut *st;
        let seq = match partial {
            Some((seq, _)) => seq,
            None => st.take_seq(),
        };
        let vd = volume_entry(&mut st.volumes, v);
        let skip: Option<Vec<bool>> = partial
            .and_then(|(_, id)| vd.partial.superseded(id))
            .map(<[bool]>::to_vec);
        if partial.is_none() && !vd.partial.is_empty() {
            vd.partial.supersede(0, first, end);
        }
        let mut added = 0u32;
        for run in runs {
            match &skip {
                None => {
                    added += put(vd, &mut st.live, &mut st.bytes, run, seq, &self.pieces);
                }
                Some(skip) => {
                    // Each sub-run the later writes left to this one.
                    let mut b = run.first;
                    while b < run.end {
                        if skip[(b - first) as usize] {
                            b += 1;
                            continue;
                        }
                        let e = (b..run.end)
                            .find(|&x| skip[(x - first) as usize])
                            .unwrap_or(run.end);
                        let data = run.data.as_ref().map(|d| {
                            d.slice((b - run.first) as usize * bs..(e - run.first) as usize * bs)
                        });
                        added += put(
                            vd,
                            &mut st.live,
                            &mut st.bytes,
                            Run {
                                first: b,
                                end: e,
                                data,
                            },
                            seq,
                            &self.pieces,
                        );
                        b = e;
                    }
                }
            }
        }
        if added > 0 {
            st.bytes += bytes;
            st.live.insert(
                seq,
                Live {
                    volume: v.id,
                    first,
                    end,
                    pieces: added,
                    bytes,
                    born: Instant::now(),
                    unmap,
                    landing: false,
                },
            );
        }
        self.bytes.store(st.bytes, Ordering::Relaxed);
        if st.bytes > self.background {
            self.wake.notify_waiters();
        }
        seq
    }

    /// A read-modify-write of blocks `[first, end)` begins: returns its
    /// sequence number and late-write id (end it with `end_partial`).
    pub fn register_partial(&self, v: &Arc<VolumeShared>, first: u64, end: u64) -> (u64, u64) {
        let mut st = self.st.lock();
        let seq = st.take_seq();
        (
            seq,
            volume_entry(&mut st.volumes, v)
                .partial
                .register(0, first, end),
        )
    }

    pub fn end_partial(&self, volume: u32, id: u64) {
        if let Some(vd) = self.st.lock().volumes.get_mut(&volume) {
            vd.partial.remove(id);
        }
    }

    /// The buffered runs of blocks `[first, end)` of `volume`, clipped to it,
    /// in order.
    pub fn lookup(&self, volume: u32, first: u64, end: u64) -> Vec<Run> {
        if self.pieces.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let st = self.st.lock();
        let Some(vd) = st.volumes.get(&volume) else {
            return Vec::new();
        };
        let mut out: Vec<Run> = vd
            .pieces
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.end > first)
            .map(|(&s, p)| {
                let (lo, hi) = (s.max(first), p.end.min(end));
                Run {
                    first: lo,
                    end: hi,
                    data: p.data.as_ref().map(|d| {
                        let per = d.len() / (p.end - s) as usize;
                        d.slice((lo - s) as usize * per..(hi - s) as usize * per)
                    }),
                }
            })
            .collect();
        out.reverse();
        out
    }

    /// The next write a drainer should land, if any is due, marked as
    /// being landed until `landed` or `failed`. Skips writes overlapping
    /// one being landed: the newer must land after the older.
    ///
    /// A write of one run of data gathers the one-piece data writes next
    /// to it, up to [`GATHER_BYTES`]: random small writes then land as
    /// runs of blocks in block order (one engine write, one metadata
    /// update and contiguous segment space per run, instead of one each
    /// per block), and their blocks enter the read cache as copies made
    /// together rather than as each request's own scattered buffer.
    pub fn pick(&self) -> Option<Job> {
        /// How far past the oldest write to look for one free to land.
        const LOOK_AHEAD: usize = 64;
        let mut st = self.st.lock();
        let st = &mut *st;
        let (&oldest, l) = st.live.first_key_value()?;
        let due =
            st.bytes > self.background || oldest <= st.urgent || l.born.elapsed() >= self.expire;
        if !due {
            return None;
        }
        let landing = &st.landing;
        let free = |volume: u32, first: u64, end: u64| {
            !landing
                .iter()
                .any(|&(_, lv, lf, le)| lv == volume && lf < end && first < le)
        };
        // With the pool full, unmaps first, wherever they are in the
        // queue: they need no space and may free what the others need.
        // Any order is safe while no two overlapping writes land at once,
        // since the buffer holds one version of each block.
        let unmaps_first = matches!(st.failure, Some(Failure::NoSpace));
        let free_live = |(_, l): &(&u64, &Live)| free(l.volume, l.first, l.end);
        let waiting = || st.live.iter().filter(|(_, l)| !l.landing);
        let (seq, l) = unmaps_first
            .then(|| waiting().filter(|(_, l)| l.unmap).find(free_live))
            .flatten()
            .or_else(|| waiting().take(LOOK_AHEAD).find(free_live))?;
        let seq = *seq;
        let vd = st.volumes.get(&l.volume)?;
        let mut runs: Vec<Run> = vd
            .pieces
            .range(l.first..l.end)
            .filter(|(_, p)| p.seq == seq)
            .map(|(&s, p)| p.run(s))
            .collect();
        let mut seqs = vec![seq];
        let (mut first, mut end) = (l.first, l.end);
        if let [Run { data: Some(_), .. }] = &runs[..] {
            let bs = vd.shared.block_size as u64;
            let max = (GATHER_BYTES / bs).max(1);
            // A neighbour joins if it is one piece of data (so all of its
            // write lands here) and free to land.
            let joins = |p: &Piece| {
                p.data.is_some()
                    && st
                        .live
                        .get(&p.seq)
                        .is_some_and(|n| n.pieces == 1 && free(n.volume, n.first, n.end))
            };
            let (mut lo, mut hi) = (runs[0].first, runs[0].end);
            let mut after = Vec::new();
            while let Some(p) = vd.pieces.get(&hi).filter(|p| p.end - lo <= max && joins(p)) {
                after.push(p.run(hi));
                seqs.push(p.seq);
                hi = p.end;
            }
            let mut before = Vec::new();
            while let Some((&s, p)) = vd
                .pieces
                .range(..lo)
                .next_back()
                .filter(|(&s, p)| p.end == lo && hi - s <= max && joins(p))
            {
                before.push(p.run(s));
                seqs.push(p.seq);
                lo = s;
            }
            before.reverse();
            runs.splice(0..0, before);
            runs.extend(after);
            (first, end) = (first.min(lo), end.max(hi));
        }
        let volume = vd.shared.clone();
        st.landing.push((seq, volume.id, first, end));
        for s in &seqs {
            st.live.get_mut(s).expect("live").landing = true;
        }
        Some(Job { seqs, volume, runs })
    }

    /// How long until the oldest write expires (the drainer's next look).
    pub fn next_due(&self) -> Duration {
        let st = self.st.lock();
        st.live.first_key_value().map_or(self.expire, |(_, l)| {
            self.expire.saturating_sub(l.born.elapsed())
        })
    }

    /// `job` landed: its pieces leave the buffer. Returns whether this
    /// ended a run of failures.
    pub fn landed(&self, job: &Job) -> bool {
        let mut st = self.st.lock();
        let st = &mut *st;
        st.landing.retain(|&(s, ..)| s != job.seqs[0]);
        for &seq in &job.seqs {
            let Some(l) = st.live.remove(&seq) else {
                continue;
            };
            if let Some(vd) = st.volumes.get_mut(&l.volume) {
                let gone: Vec<u64> = vd
                    .pieces
                    .range(l.first..l.end)
                    .filter(|(_, p)| p.seq == seq)
                    .map(|(&s, _)| s)
                    .collect();
                for s in gone {
                    vd.pieces.remove(&s);
                    self.pieces.fetch_sub(1, Ordering::Release);
                }
                if vd.pieces.is_empty() && vd.partial.is_empty() {
                    st.volumes.remove(&l.volume);
                }
            }
            st.bytes -= l.bytes;
        }
        self.bytes.store(st.bytes, Ordering::Relaxed);
        // An unmap landing says nothing of whether data fits again.
        let recovered = job.runs.iter().any(|r| r.data.is_some()) && st.failure.take().is_some();
        self.progress.notify_waiters();
        recovered
    }

    /// Landing failed; the write stays buffered and is tried again later.
    /// Returns whether this failure is new (the last landing worked, or
    /// failed otherwise), for logging it once.
    pub fn failed(&self, job: &Job, e: &EngineError) -> bool {
        let mut st = self.st.lock();
        st.landing.retain(|&(s, ..)| s != job.seqs[0]);
        for s in &job.seqs {
            if let Some(l) = st.live.get_mut(s) {
                l.landing = false;
            }
        }
        let now = match e {
            EngineError::NoSpace => Failure::NoSpace,
            e => Failure::Other(e.to_string()),
        };
        let new = match (&st.failure, &now) {
            (Some(Failure::NoSpace), Failure::NoSpace) => false,
            (Some(Failure::Other(a)), Failure::Other(b)) => a != b,
            _ => true,
        };
        st.failure = Some(now);
        drop(st);
        self.progress.notify_waiters();
        new
    }

    /// `volume` was deleted: what it had buffered goes.
    pub fn forget_volume(&self, volume: u32) {
        let mut st = self.st.lock();
        let st = &mut *st;
        st.landing.retain(|&(_, v, ..)| v != volume);
        let Some(vd) = st.volumes.remove(&volume) else {
            return;
        };
        self.pieces.fetch_sub(vd.pieces.len(), Ordering::Release);
        let seqs: Vec<u64> = st
            .live
            .iter()
            .filter(|(_, l)| l.volume == volume)
            .map(|(&s, _)| s)
            .collect();
        for s in seqs {
            if let Some(l) = st.live.remove(&s) {
                st.bytes -= l.bytes;
            }
        }
        self.bytes.store(st.bytes, Ordering::Relaxed);
        self.progress.notify_waiters();
    }

    /// Land everything buffered so far soon (a client went away).
    pub fn drain_soon(&self) {
        let mut st = self.st.lock();
        if st.live.is_empty() {
            return;
        }
        st.urgent = st.urgent.max(st.next_seq - 1);
        drop(st);
        self.wake.notify_waiters();
    }

    /// Waits until every write up to `target` has landed.
    pub async fn wait_landed(&self, target: u64) -> Result<()> {
        self.wait(|st| {
            st.urgent = st.urgent.max(target);
            st.live.first_key_value().is_none_or(|(&s, _)| s > target)
        })
        .await
    }

    /// Waits until the buffer is back under its capacity.
    pub async fn wait_room(&self) -> Result<()> {
        self.wait(|st| st.bytes <= self.capacity).await
    }

    async fn wait(&self, mut done: impl FnMut(&mut Dirty) -> bool) -> Result<()> {
        loop {
            let progress = self.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            {
                let mut st = self.st.lock();
                if done(&mut st) {
                    return Ok(());
                }
                match &st.failure {
                    Some(Failure::NoSpace) => return Err(EngineError::NoSpace),
                    Some(Failure::Other(why)) => return Err(EngineError::WriteBack(why.clone())),
                    None => {}
                }
            }
            self.wake.notify_waiters();
            progress.await;
        }
    }
}

/// Puts `run` in the volume's map, replacing whatever it overlaps. Returns
/// the pieces added (1, or 0 for an empty run).
fn put(
    vd: &mut VolumeDirty,
    live: &mut BTreeMap<u64, Live>,
    bytes: &mut u64,
    run: Run,
    seq: u64,
    count: &AtomicUsize,
) -> u32 {
    if run.first >= run.end {
        return 0;
    }
    let bs = vd.shared.block_size as usize;
    let (first, end) = (run.first, run.end);
    // A rewrite of exactly the blocks of one buffered piece (the common
    // case under random writes of one size): replaced in place.
    if let Some(p) = vd.pieces.get_mut(&first) {
        if p.end == end {
            let old = std::mem::replace(
                p,
                Piece {
                    end,
                    seq,
                    data: run.data,
                },
            );
            replaced(live, bytes, old.seq, 0);
            return 1;
        }
    }
    // The pieces it overlaps: walking back from the last one starting
    // before `end` while they reach past `first` (they do not overlap
    // one another, so their ends fall as their starts do).
    let hit: Vec<u64> = vd
        .pieces
        .range(..end)
        .rev()
        .take_while(|(_, p)| p.end > first)
        .map(|(&s, _)| s)
        .collect();
    for s in hit {
        let p = vd.pieces.remove(&s).expect("listed above");
        count.fetch_sub(1, Ordering::Relaxed);
        let mut kept = 0u32;
        if s < first {
            let data = p
                .data
                .as_ref()
                .map(|d| d.slice(..(first - s) as usize * bs));
            vd.pieces.insert(
                s,
                Piece {
                    end: first,
                    seq: p.seq,
                    data,
                },
            );
            kept += 1;
        }
        if p.end > end {
            let data = p.data.as_ref().map(|d| d.slice((end - s) as usize * bs..));
            vd.pieces.insert(
                end,
                Piece {
                    end: p.end,
                    seq: p.seq,
                    data,
                },
            );
            kept += 1;
        }
        count.fetch_add(kept as usize, Ordering::Relaxed);
        replaced(live, bytes, p.seq, kept);
    }
    vd.pieces.insert(
        first,
        Piece {
            end,
            seq,
            data: run.data,
        },
    );
    count.fetch_add(1, Ordering::Release);
    1
}

/// A piece of write `seq` was replaced, leaving `kept` pieces of it (0,
/// or 1 or 2 after a split) in its place.
fn replaced(live: &mut BTreeMap<u64, Live>, bytes: &mut u64, seq: u64, kept: u32) {
    if let Some(l) = live.get_mut(&seq) {
        l.pieces = l.pieces + kept - 1;
        if l.pieces == 0 {
            // Fully replaced before it landed: it never will.
            let l = live.remove(&seq).expect("present");
            *bytes -= l.bytes;
        }
    }
}

/// Splits whole blocks of `data` from block `first` into runs of data and
/// runs of zeros.
fn split_zero_runs(first: u64, data: &Bytes, bs: usize) -> Vec<Run> {
    let n = data.len() / bs;
    let mut runs: Vec<Run> = Vec::new();
    let mut i = 0;
    while i < n {
        let zero = crate::volume::is_zero(&data[i * bs..(i + 1) * bs]);
        let mut j = i + 1;
        while j < n && crate::volume::is_zero(&data[j * bs..(j + 1) * bs]) == zero {
            j += 1;
        }
        runs.push(Run {
            first: first + i as u64,
            end: first + j as u64,
            data: (!zero).then(|| data.slice(i * bs..j * bs)),
        });
        i = j;
    }
    runs
}

/// A drainer: lands buffered writes, oldest first, while any is due. The
/// engine runs one per CPU; `WriteBack::pick` keeps them off each other's
/// blocks.
pub(crate) async fn drain(weak: std::sync::Weak<crate::engine::Inner>) {
    /// After a failed landing: the pool may need the cleaner or a new disk.
    const RETRY: Duration = Duration::from_secs(1);
    let wake = match weak.upgrade() {
        Some(inner) => match &inner.write_back {
            Some(wb) => wb.wake.clone(),
            None => return,
        },
        None => return,
    };
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let pause = {
            let Some(inner) = weak.upgrade() else { return };
            let wb = inner.write_back.as_ref().expect("checked above");
            match wb.pick() {
                Some(job) => match land(&inner, &job).await {
                    Ok(()) => {
                        if wb.landed(&job) {
                            tracing::info!("storing buffered writes works again");
                        }
                        continue;
                    }
                    Err(EngineError::VolumeNotFound(_)) => {
                        wb.forget_volume(job.volume.id);
                        continue;
                    }
                    Err(EngineError::ShuttingDown) => return,
                    Err(e) => {
                        if wb.failed(&job, &e) {
                            tracing::warn!(volume = %job.volume.name, error = %e,
                                "storing buffered writes failed; retrying every second (FLUSH and FUA fail meanwhile)");
                        }
                        drop(inner);
                        // Not woken early by new writes: they would retry
                        // at their own rate.
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                },
                None => wb.next_due().max(Duration::from_millis(10)),
            }
        };
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

async fn land(inner: &Arc<crate::engine::Inner>, job: &Job) -> Result<()> {
    let vol = crate::volume::Volume::new(inner.clone(), job.volume.clone());
    let bs = job.volume.block_size as u64;
    let mut i = 0;
    while i < job.runs.len() {
        let run = &job.runs[i];
        let Some(d) = &run.data else {
            vol.trim_direct(run.first * bs, (run.end - run.first) * bs, false)
                .await?;
            i += 1;
            continue;
        };
        // Adjacent data runs (gathered writes) land as one write.
        let mut j = i + 1;
        while j < job.runs.len()
            && job.runs[j].data.is_some()
            && job.runs[j].first == job.runs[j - 1].end
        {
            j += 1;
        }
        let data = if j == i + 1 {
            d.clone()
        } else {
            let mut all =
                bytes::BytesMut::with_capacity(((job.runs[j - 1].end - run.first) * bs) as usize);
            for r in &job.runs[i..j] {
                all.extend_from_slice(r.data.as_ref().expect("data runs only"));
            }
            all.freeze()
        };
        vol.write_direct(run.first * bs, data, false).await?;
        i = j;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Compression;
    use crate::meta::VolumeRecord;

    const BS: usize = 512;

    fn volume(id: u32) -> Arc<VolumeShared> {
        Arc::new(VolumeShared::from_record(&VolumeRecord {
            id,
            name: format!("v{id}"),
            size: 1 << 20,
            block_size: BS as u32,
            dedup: true,
            compression: Compression::Lz4,
            read_only: false,
            parent: None,
            created_unix: 0,
            generation: 0,
            mapped_blocks: 0,
        }))
    }

    fn blocks(fill: &[u8]) -> Bytes {
        Bytes::from(fill.iter().flat_map(|&b| vec![b; BS]).collect::<Vec<u8>>())
    }

    /// The buffered content of blocks `[first, end)`: a fill byte per
    /// block, `None` where nothing is buffered, `Some(0)` for zeros.
    fn view(wb: &WriteBack, vol: u32, first: u64, end: u64) -> Vec<Option<u8>> {
        let mut out = vec![None; (end - first) as usize];
        for r in wb.lookup(vol, first, end) {
            for b in r.first..r.end {
                let i = (b - r.first) as usize;
                out[(b - first) as usize] = Some(r.data.as_ref().map_or(0, |d| d[i * BS]));
            }
        }
        out
    }

    #[test]
    fn a_write_replaces_what_it_overlaps_and_releases_what_it_fully_covers() {
        let wb = WriteBack::new(1 << 20, Duration::from_secs(30));
        let v = volume(1);
        let a = wb.insert(&v, 2, Change::Data(blocks(&[1, 1, 1, 1])), None);
        assert_eq!(wb.bytes(), 4 * BS as u64);
        // Splits the first write in two, each still a slice of its buffer.
        let b = wb.insert(&v, 3, Change::Data(blocks(&[2])), None);
        assert!(b > a);
        assert_eq!(
            view(&wb, 1, 0, 8),
            vec![None, None, Some(1), Some(2), Some(1), Some(1), None, None]
        );
        assert_eq!(wb.bytes(), 5 * BS as u64);
        // Rewriting exactly that block replaces it in place, and the write
        // it replaced no longer counts.
        wb.insert(&v, 3, Change::Data(blocks(&[7])), None);
        assert_eq!(view(&wb, 1, 3, 4), vec![Some(7)]);
        assert_eq!(wb.bytes(), 5 * BS as u64);
        assert!(!wb.st.lock().live.contains_key(&b));
        // Zero blocks in a write are buffered as zeros, not data.
        wb.insert(&v, 6, Change::Data(blocks(&[0, 3])), None);
        let runs = wb.lookup(1, 6, 8);
        assert!(runs[0].data.is_none() && runs[1].data.is_some());
        // A trim over everything leaves one zero run, and the writes it
        // replaced no longer count.
        wb.insert(&v, 0, Change::Zeros(8), None);
        assert_eq!(view(&wb, 1, 0, 8), vec![Some(0); 8]);
        assert_eq!(wb.bytes(), ZERO_RUN_BYTES);
        assert_eq!(wb.st.lock().live.len(), 1);
        // Other volumes are apart.
        assert!(wb.lookup(2, 0, 8).is_empty());
    }

    #[test]
    fn lookups_clip_to_the_asked_blocks() {
        let wb = WriteBack::new(1 << 20, Duration::from_secs(30));
        let v = volume(1);
        wb.insert(&v, 0, Change::Data(blocks(&[1, 2, 3, 4, 5, 6])), None);
        let runs = wb.lookup(1, 2, 4);
        assert_eq!(runs.len(), 1);
        assert_eq!((runs[0].first, runs[0].end), (2, 4));
        let d = runs[0].data.as_ref().unwrap();
        assert_eq!((d.len(), d[0], d[BS]), (2 * BS, 3, 4));
    }

    #[test]
    fn a_partial_write_skips_blocks_that_later_whole_block_writes_took() {
        let wb = WriteBack::new(1 << 20, Duration::from_secs(30));
        let v = volume(1);
        // A read-modify-write of blocks 0..3 starts (it reads first)...
        let (seq, id) = wb.register_partial(&v, 0, 3);
        // ...a write called after it replaces block 1...
        let later = wb.insert(&v, 1, Change::Data(blocks(&[9])), None);
        assert!(later > seq);
        // ...and when the merged blocks arrive, block 1 stays the later one.
        wb.insert(&v, 0, Change::Data(blocks(&[5, 5, 5])), Some((seq, id)));
        wb.end_partial(1, id);
        assert_eq!(view(&wb, 1, 0, 3), vec![Some(5), Some(9), Some(5)]);
    }

    #[test]
    fn drainers_take_oldest_first_and_never_two_overlapping_writes() {
        let wb = WriteBack::new(1 << 20, Duration::from_secs(30));
        let v = volume(1);
        wb.insert(&v, 0, Change::Data(blocks(&[1, 1])), None);
        wb.insert(&v, 4, Change::Data(blocks(&[2])), None);
        // Nothing is due: room, young, nobody waiting.
        assert!(wb.pick().is_none());
        wb.drain_soon();
        let first = wb.pick().expect("due after drain_soon");
        assert_eq!((first.runs[0].first, first.runs[0].end), (0, 2));
        // A newer write over block 1 while the first lands: it must wait.
        let newer = wb.insert(&v, 1, Change::Data(blocks(&[3])), None);
        wb.drain_soon();
        let second = wb.pick().expect("the write to block 4 is free");
        assert_eq!(second.runs[0].first, 4);
        assert!(
            wb.pick().is_none(),
            "block 1's newer write overlaps a landing"
        );
        wb.landed(&first);
        // The landed write's remaining piece (block 0) left the buffer;
        // block 1 is the newer write's.
        assert_eq!(view(&wb, 1, 0, 2), vec![None, Some(3)]);
        let third = wb.pick().expect("free once the first landed");
        assert_eq!(third.seqs, vec![newer]);
        wb.landed(&second);
        wb.landed(&third);
        assert_eq!(wb.bytes(), 0);
        assert!(wb.lookup(1, 0, 8).is_empty());
    }

    #[test]
    fn adjacent_one_piece_writes_land_together() {
        let wb = WriteBack::new(1 << 30, Duration::from_secs(30));
        let v = volume(1);
        let s1 = wb.insert(&v, 2, Change::Data(blocks(&[1])), None);
        let s2 = wb.insert(&v, 3, Change::Data(blocks(&[2])), None);
        let s3 = wb.insert(&v, 4, Change::Data(blocks(&[3, 3])), None);
        let zeros = wb.insert(&v, 6, Change::Zeros(1), None);
        let s5 = wb.insert(&v, 1, Change::Data(blocks(&[5])), None);
        let s6 = wb.insert(&v, 7, Change::Data(blocks(&[6])), None);
        // Two pieces after a rewrite of its middle block: not gathered.
        let s7 = wb.insert(&v, 8, Change::Data(blocks(&[7, 7, 7])), None);
        let s8 = wb.insert(&v, 9, Change::Data(blocks(&[8])), None);
        wb.drain_soon();
        let job = wb.pick().unwrap();
        assert_eq!(job.seqs, vec![s1, s2, s3, s5], "data neighbours both ways");
        let spans: Vec<(u64, u64)> = job.runs.iter().map(|r| (r.first, r.end)).collect();
        assert_eq!(
            spans,
            vec![(1, 2), (2, 3), (3, 4), (4, 6)],
            "in block order"
        );
        assert_eq!(wb.pick().unwrap().seqs, vec![zeros], "zeros land alone");
        let job6 = wb.pick().unwrap();
        assert_eq!(job6.seqs, vec![s6], "a two-piece neighbour stays out");
        let job7 = wb.pick().unwrap();
        assert_eq!(job7.seqs, vec![s7]);
        assert!(wb.pick().is_none(), "the rewrite inside s7 waits for it");
        wb.landed(&job);
        assert_eq!(
            view(&wb, 1, 0, 6),
            vec![None; 6],
            "all four left the buffer"
        );
        wb.landed(&job7);
        assert_eq!(wb.pick().unwrap().seqs, vec![s8]);
        assert_eq!(view(&wb, 1, 7, 11), vec![Some(6), None, Some(8), None]);
    }

    #[test]
    fn gathering_stops_at_the_cap_and_at_landings() {
        let wb = WriteBack::new(1 << 30, Duration::from_secs(30));
        let v = volume(1);
        let max = GATHER_BYTES / BS as u64;
        for b in 0..max + 10 {
            wb.insert(&v, b, Change::Data(blocks(&[1])), None);
        }
        wb.drain_soon();
        let job = wb.pick().unwrap();
        assert_eq!(job.runs.last().unwrap().end, max, "capped");
        let rest = wb.pick().unwrap();
        assert_eq!((rest.runs[0].first, rest.runs.len()), (max, 10));
        // A write next to a landing job waits rather than joining another.
        wb.insert(&v, max + 10, Change::Data(blocks(&[2])), None);
        wb.drain_soon();
        let last = wb.pick().unwrap();
        assert_eq!(last.runs.len(), 1);
        wb.landed(&job);
        wb.landed(&rest);
        wb.landed(&last);
        assert_eq!(wb.bytes(), 0);
    }

    #[test]
    fn a_full_pool_lands_unmaps_first_wherever_they_wait() {
        let wb = WriteBack::new(1 << 20, Duration::from_secs(30));
        let v = volume(1);
        for b in 0..100 {
            wb.insert(&v, b, Change::Data(blocks(&[1])), None);
        }
        let trim = wb.insert(&v, 200, Change::Zeros(8), None);
        wb.drain_soon();
        let job = wb.pick().unwrap();
        assert_eq!(job.seqs[0], 1, "oldest first while writes land");
        assert_eq!(job.seqs.len(), 100, "the adjacent writes gathered");
        assert!(wb.failed(&job, &EngineError::NoSpace), "a new failure");
        let job = wb.pick().unwrap();
        assert_eq!(
            job.seqs,
            vec![trim],
            "with the pool full, the unmap goes first"
        );
        // Its landing does not say the pool has room again.
        assert!(!wb.landed(&job));
        let job = wb.pick().unwrap();
        assert!(!wb.failed(&job, &EngineError::NoSpace), "the same failure");
        // A data write that lands ends the failure.
        let job = wb.pick().unwrap();
        assert!(wb.landed(&job));
    }

    #[tokio::test]
    async fn waiters_see_landings_and_failures() {
        let wb = Arc::new(WriteBack::new(4 * BS as u64, Duration::from_secs(30)));
        let v = volume(1);
        let seq = wb.insert(&v, 0, Change::Data(blocks(&[1, 1, 1, 1, 1, 1])), None);
        assert!(wb.over_capacity());
        let waiter = {
            let wb = wb.clone();
            tokio::spawn(async move { wb.wait_landed(seq).await })
        };
        let job = wb.pick().expect("over capacity: due");
        wb.failed(&job, &EngineError::NoSpace);
        assert!(matches!(waiter.await.unwrap(), Err(EngineError::NoSpace)));
        assert!(matches!(wb.wait_room().await, Err(EngineError::NoSpace)));
        let job = wb.pick().expect("still buffered after the failure");
        let waiter = {
            let wb = wb.clone();
            tokio::spawn(async move { wb.wait_landed(seq).await })
        };
        wb.landed(&job);
        waiter.await.unwrap().unwrap();
        wb.wait_room().await.unwrap();
    }
}
