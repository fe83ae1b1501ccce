//! The engine: opening and recovering a pool, group commit, volume control
//! operations and node statistics.

use crate::config::{DiskSpec, DiskStats, EngineConfig, NodeStats, VolumeInfo, VolumeOptions};
use crate::error::{EngineError, Result};
use crate::io::{DiskIo, IoEngine};
use crate::key::{map_key, SegmentId};
use crate::meta::{Counters, DiskRecord, Meta, PoolRecord, SegmentRecord, VolumeRecord};
use crate::pool::{read_superblock, segments_on, write_superblock, PoolDisk, SegState, Space};
use crate::segment::Writer;
use crate::state::{Overlay, State, Txn};
use crate::superblock::{Superblock, DATA_OFFSET, FORMAT_VERSION};
use crate::volume::{Volume, VolumeShared};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Start a commit in the background once the overlay holds this many entries.
const COMMIT_SOFT_ENTRIES: usize = 128 * 1024;
/// Writers wait for a commit beyond this, bounding memory and crash exposure.
const COMMIT_HARD_ENTRIES: usize = 1024 * 1024;
/// Writers wait while more segment images than this are held in memory.
const MAX_IMAGES: usize = 8;

pub(crate) struct Inner {
    pub cfg: EngineConfig,
    pub io: Option<IoEngine>,
    pub meta: Meta,
    pub pool: RwLock<PoolRecord>,
    pub disks: RwLock<Vec<Arc<PoolDisk>>>,
    pub space: Mutex<Space>,
    pub writer: Mutex<Writer>,
    pub state: Mutex<State>,
    pub catalog: RwLock<HashMap<String, Arc<VolumeShared>>>,
    pub rt: tokio::runtime::Handle,
    commit_lock: Arc<tokio::sync::Mutex<()>>,
    /// Set by `crash`: no new commit may start.
    frozen: AtomicBool,
    commits_started: AtomicU64,
    commits_done: tokio::sync::watch::Sender<u64>,
    /// Why commits stopped, set once by the first failed commit (every
    /// write checks it, so a lock-free read).
    pub failed: std::sync::OnceLock<String>,
    pub checksum_errors: AtomicU64,
    pub shutting_down: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Serialises control operations (create, delete, snapshot, ...).
    control: tokio::sync::Mutex<()>,
    pub(crate) cleaner_wake: tokio::sync::Notify,
    pub(crate) read_cache: crate::read_cache::ReadCache,
    /// `None` when write-back is off.
    pub(crate) write_back: Option<crate::write_back::WriteBack>,
}

/// What a write left behind it: the live overlay's entries and the segment
/// images held in memory, as it saw them under the locks it took anyway.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backlog {
    pub entries: usize,
    pub images: usize,
}

impl Backlog {
    /// Writers wait for a commit.
    fn must_wait(self) -> bool {
        self.entries >= COMMIT_HARD_ENTRIES || self.images > MAX_IMAGES
    }

    /// A commit should start in the background.
    fn wants_commit(self) -> bool {
        self.entries >= COMMIT_SOFT_ENTRIES
    }

    /// Nothing to do: the write can complete at once, without
    /// `Inner::backpressure` taking the state and writer locks again (and
    /// without the future holding clones of the volume, whose reference
    /// counts every writer thread bounces: 4% of the CPU of 4 KiB writes).
    pub fn is_calm(self) -> bool {
        !self.must_wait() && !self.wants_commit()
    }
}

/// A node's storage engine. Cheap to clone; all clones share one pool.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn id_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Engine {
    /// Open (or create) the pool described by `cfg`, recovering after a crash.
    /// Must be called inside a tokio runtime.
    pub async fn open(cfg: EngineConfig) -> Result<Engine> {
        let t0 = Instant::now();
        let io = if cfg.disk_opener.is_some() {
            None
        } else {
            Some(
                IoEngine::new(cfg.backend)
                    .map_err(|e| EngineError::io("starting the I/O backend", e))?,
            )
        };
        let meta = Meta::open(
            &cfg.data_dir.join("meta"),
            cfg.meta_cache_bytes,
            cfg.entry_cache_bytes,
        )?;
        let open_disk = |spec: &DiskSpec| open_disk(&cfg, io.as_ref(), spec);
        let existing: Option<PoolRecord> = meta.get_json("pool")?;
        let mut pool = match existing {
            Some(p) => p,
            None => {
                if cfg.disks.is_empty() {
                    return Err(EngineError::InvalidArgument(
                        "a new pool needs at least one disk: pass --disk PATH[:SIZE]".into(),
                    ));
                }
                if !cfg.segment_size.is_power_of_two()
                    || !(1 << 20..=64 << 20).contains(&cfg.segment_size)
                {
                    return Err(EngineError::InvalidArgument(format!(
                        "segment size {} must be a power of two from 1 MiB to 64 MiB",
                        cfg.segment_size
                    )));
                }
                PoolRecord {
                    pool_id: *uuid::Uuid::new_v4().as_bytes(),
                    node_id: *uuid::Uuid::new_v4().as_bytes(),
                    segment_size: cfg.segment_size,
                    disks: Vec::new(),
                }
            }
        };
        let seg = pool.segment_size;
        let mut disks = Vec::new();
        for d in &pool.disks {
            let spec = DiskSpec {
                path: d.path.clone(),
                create_size: None,
            };
            let dio = open_disk(&spec)?;
            let sb = read_superblock(&dio, &d.path).await?;
            check_superblock(&sb, &pool, d)?;
            disks.push(Arc::new(PoolDisk {
                id: d.disk_id,
                path: d.path.clone(),
                segments: segments_on(sb.disk_size.min(dio.len()), seg),
                io: dio,
            }));
        }
        let mut new_disks = Vec::new();
        for spec in &cfg.disks {
            let path = std::path::absolute(&spec.path).unwrap_or_else(|_| spec.path.clone());
            if pool.disks.iter().any(|d| d.path == path) {
                continue;
            }
            let spec = DiskSpec {
                path: path.clone(),
                create_size: spec.create_size,
            };
            let (disk, rec) = format_disk(&pool, &spec, open_disk(&spec)?).await?;
            pool.disks.push(rec);
            new_disks.push(disk.clone());
            disks.push(disk);
        }
        // The pool record is written on its own (before any data lands on a
        // new disk), so a crash here leaves a formatted, empty, known disk.
        meta.misc.insert(
            "pool",
            serde_json::to_vec(&pool).map_err(|e| EngineError::Meta(e.to_string()))?,
        )?;
        meta.persist()?;

        let mut in_use = HashMap::new();
        for (id, r) in meta.load_segments()? {
            in_use.insert(id, (r.live_bytes, r.written_bytes));
        }
        let mut space = Space::new(seg);
        for d in &disks {
            space.add_disk(d.id, d.segments, &in_use);
        }
        let counters: Counters = meta.get_json("counters")?.unwrap_or_default();
        let capacity: u64 = disks.iter().map(|d| d.segments as u64 * seg as u64).sum();
        let mut meta = meta;
        meta.record_filter = Some(crate::record_filter::RecordFilter::for_capacity(capacity));
        // By default 128 MiB per TiB of pool (at least 64 MiB): dense block
        // maps of 4 KiB blocks for about 2.9 times the pool's capacity.
        meta.block_filter = Some(crate::block_filter::BlockFilter::with_budget(
            cfg.block_filter_bytes
                .unwrap_or((capacity / 8192).max(64 << 20)),
        ));
        let meta = meta;
        let mut catalog = HashMap::new();
        for v in meta.load_volumes()? {
            catalog.insert(v.name.clone(), Arc::new(VolumeShared::from_record(&v)));
        }
        if let Some(f) = &meta.block_filter {
            // Nobody writes snapshots: their bits would only take memory.
            for v in catalog.values().filter(|v| v.read_only) {
                f.untrack(v.id);
            }
        }
        let (done_tx, _) = tokio::sync::watch::channel(0u64);
        let inner = Arc::new(Inner {
            rt: tokio::runtime::Handle::current(),
            io,
            pool: RwLock::new(pool),
            disks: RwLock::new(disks),
            space: Mutex::new(space),
            writer: Mutex::new(Writer::new(seg)),
            state: Mutex::new(State {
                cur: Overlay::default(),
                committing: None,
                committed: counters,
                next_nonce: counters.next_nonce.max(1),
                late: Default::default(),
            }),
            catalog: RwLock::new(catalog),
            meta,
            commit_lock: Arc::new(tokio::sync::Mutex::new(())),
            frozen: AtomicBool::new(false),
            commits_started: AtomicU64::new(0),
            commits_done: done_tx,
            failed: std::sync::OnceLock::new(),
            checksum_errors: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            control: tokio::sync::Mutex::new(()),
            cleaner_wake: tokio::sync::Notify::new(),
            read_cache: crate::read_cache::ReadCache::new(cfg.read_cache_bytes),
            write_back: (cfg.write_back_bytes > 0).then(|| {
                crate::write_back::WriteBack::new(cfg.write_back_bytes, cfg.write_back_expire)
            }),
            cfg,
        });
        let engine = Engine { inner };
        let mapped: u64 = engine
            .inner
            .catalog
            .read()
            .values()
            .map(|v| v.committed_mapped.load(Ordering::SeqCst))
            .sum();
        engine.fill_filters(counters.records, mapped).await?;
        engine.spawn_background();
        let st = engine.inner.state.lock().committed;
        tracing::info!(
            volumes = engine.inner.catalog.read().len(),
            records = st.records,
            new_disks = new_disks.len(),
            backend = engine.backend_name(),
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "pool opened (recovery complete)"
        );
        Ok(engine)
    }

    /// Load the record filter from the record index and the block filter
    /// from the block map: inline for small pools (a second or so), in the
    /// background for large ones so recovery time does not grow with the
    /// data; until then lookups go to the store.
    async fn fill_filters(&self, records: u64, mapped: u64) -> Result<()> {
        const INLINE_MAX: u64 = 4 << 20;
        let weak = Arc::downgrade(&self.inner);
        let fill = move || -> Result<()> {
            let Some(inner) = weak.upgrade() else {
                return Ok(());
            };
            let stop = || inner.shutting_down.load(Ordering::Relaxed);
            let meta = &inner.meta;
            // Each on its own: a scan that fails or stops leaves only its
            // own filter answering "maybe".
            let t0 = Instant::now();
            let filter = meta.record_filter.as_ref().expect("installed at open");
            let records = meta.fill_record_filter(filter, stop);
            if let Ok(Some(n)) = records {
                tracing::info!(
                    records = n,
                    filter_bytes = filter.memory_bytes(),
                    elapsed_ms = t0.elapsed().as_millis() as u64,
                    "record filter loaded"
                );
            }
            let t0 = Instant::now();
            let filter = meta.block_filter.as_ref().expect("installed at open");
            let blocks = meta.fill_block_filter(filter, stop);
            if let Ok(Some(n)) = blocks {
                tracing::info!(
                    blocks = n,
                    filter_bytes = filter.memory_bytes(),
                    elapsed_ms = t0.elapsed().as_millis() as u64,
                    "mapped-block filter loaded"
                );
            }
            records.and(blocks).map(drop)
        };
        if records <= INLINE_MAX && mapped <= INLINE_MAX {
            return fill();
        }
        let h = self.inner.rt.spawn_blocking(move || {
            if let Err(e) = fill() {
                tracing::warn!(error = %e, "loading the record or block filter failed; lookups stay on the store");
            }
        });
        // Not in `tasks` (a blocking scan cannot be aborted): it stops by
        // itself soon after shutdown begins.
        drop(h);
        Ok(())
    }

    fn spawn_background(&self) {
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.cfg.commit_interval;
        let committer = self.inner.rt.spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                let dirty = !inner.state.lock().cur.is_empty();
                if dirty && inner.failed.get().is_none() {
                    if let Err(e) = inner.flush().await {
                        tracing::error!(error = %e, "background commit failed");
                    }
                }
            }
        });
        self.inner.tasks.lock().push(committer);
        if self.inner.write_back.is_some() {
            // Landing is CPU work (hashing, lz4): one drainer per CPU.
            let n = std::thread::available_parallelism().map_or(2, |n| n.get());
            for _ in 0..n {
                let weak = Arc::downgrade(&self.inner);
                let h = self.inner.rt.spawn(crate::write_back::drain(weak));
                self.inner.tasks.lock().push(h);
            }
        }
        if self.inner.cfg.cleaner {
            let weak = Arc::downgrade(&self.inner);
            let h = self.inner.rt.spawn(crate::cleaner::run(weak));
            self.inner.tasks.lock().push(h);
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match &self.inner.io {
            Some(io) => io.describe(),
            None => "test-disk",
        }
    }

    pub fn segment_size(&self) -> u32 {
        self.inner.space.lock().segment_size
    }

    /// Make every write completed before this call durable.
    pub async fn flush(&self) -> Result<()> {
        self.inner.land_buffered().await?;
        self.inner.flush().await
    }

    /// Commit everything, stop background work. The engine refuses I/O afterwards.
    pub async fn shutdown(&self) -> Result<()> {
        let landed = self.inner.land_buffered().await;
        let r = landed.and(self.inner.flush().await);
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock());
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        self.inner.meta.persist()?;
        r
    }

    /// Stop background tasks without committing: what a kill -9 leaves behind
    /// (tests reopen the same data folder afterwards).
    pub async fn crash(self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.frozen.store(true, Ordering::SeqCst);
        // A commit already running completes (the power fails just after it);
        // holding the lock keeps any other from starting.
        let _no_more_commits = self.inner.commit_lock.clone().lock_owned().await;
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock());
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        // Let in-flight segment writes finish so no task still holds the engine.
        let pending = {
            // The writers' lock order: disk list, then writer.
            let disks = self.inner.disks.read();
            let mut w = self.inner.writer.lock();
            w.prepare_commit(&disks, &self.inner.rt).0
        };
        for p in pending {
            let _ = p.await;
        }
    }

    // ---- control operations -------------------------------------------------

    pub async fn create_volume(&self, name: &str, opts: VolumeOptions) -> Result<VolumeInfo> {
        validate_name(name)?;
        validate_options(&opts)?;
        let _c = self.inner.control.lock().await;
        let shared = {
            let mut cat = self.inner.catalog.write();
            if cat.contains_key(name) {
                return Err(EngineError::VolumeExists(name.into()));
            }
            let id = self.allocate_volume_id(&cat);
            let v = Arc::new(VolumeShared::from_record(&VolumeRecord {
                id,
                name: name.into(),
                size: opts.size,
                block_size: opts.block_size,
                dedup: opts.dedup,
                compression: opts.compression,
                read_only: false,
                parent: None,
                created_unix: now_unix(),
                generation: 0,
                mapped_blocks: 0,
            }));
            cat.insert(name.into(), v.clone());
            v
        };
        self.inner.state.lock().cur.touched.insert(shared.id);
        self.inner.flush().await?;
        Ok(self.info_of(&shared))
    }

    fn allocate_volume_id(&self, cat: &HashMap<String, Arc<VolumeShared>>) -> u32 {
        let mut st = self.inner.state.lock();
        let mut id = st.committed.next_volume_id.max(1);
        // Ids are never reused: a deleted volume's map entries may still be
        // in the overlay being committed.
        while cat.values().any(|v| v.id == id) {
            id += 1;
        }
        st.committed.next_volume_id = id + 1;
        st.cur.nonces_used = true;
        id
    }

    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let _c = self.inner.control.lock().await;
        let v = self
            .inner
            .catalog
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::VolumeNotFound(name.into()))?;
        v.deleted.store(true, Ordering::SeqCst);
        if let Some(wb) = &self.inner.write_back {
            wb.forget_volume(v.id);
        }
        {
            let mut st = self.inner.state.lock();
            let mut tx = Txn {
                st: &mut st,
                meta: &self.inner.meta,
            };
            for (lba, _) in tx.mapped_range(v.id, 0, u64::MAX)? {
                tx.set_block(v.id, lba, None)?;
            }
            tx.st.cur.deleted_volumes.insert(v.id);
        }
        {
            let mut cat = self.inner.catalog.write();
            cat.remove(name);
            // Snapshots and clones of this one keep their own references to
            // every block; only the lineage link goes.
            let mut st = self.inner.state.lock();
            for child in cat.values() {
                let mut parent = child.parent.lock();
                if parent.as_deref() == Some(name) {
                    *parent = None;
                    st.cur.touched.insert(child.id);
                }
            }
        }
        self.inner.flush().await?;
        self.inner.cleaner_wake.notify_one();
        Ok(())
    }

    pub async fn resize_volume(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        let _c = self.inner.control.lock().await;
        let v = self.shared(name)?;
        if v.read_only {
            return Err(EngineError::ReadOnly(name.into()));
        }
        let cur = v.size.load(Ordering::SeqCst);
        if new_size < cur {
            return Err(EngineError::FailedPrecondition(format!(
                "volume \"{name}\" is {cur} bytes; shrinking is not supported (it would drop data): pass a size of at least {cur}"
            )));
        }
        if !new_size.is_multiple_of(v.block_size as u64) || new_size == 0 {
            return Err(EngineError::InvalidArgument(format!(
                "size {new_size} is not a multiple of the volume's block size {}",
                v.block_size
            )));
        }
        v.size.store(new_size, Ordering::SeqCst);
        self.inner.state.lock().cur.touched.insert(v.id);
        self.inner.flush().await?;
        Ok(self.info_of(&v))
    }

    /// A read-only, point-in-time copy of `volume`'s block map (no data copied).
    pub async fn snapshot(&self, volume: &str, snapshot: &str) -> Result<VolumeInfo> {
        validate_name(snapshot)?;
        let src = self.shared(volume)?;
        // The snapshot holds every write completed before this call.
        self.inner.land_buffered().await?;
        self.copy_volume(&src, snapshot, true).await
    }

    /// A writable volume starting from `snapshot`'s content (no data copied).
    pub async fn clone_snapshot(&self, snapshot: &str, new_volume: &str) -> Result<VolumeInfo> {
        validate_name(new_volume)?;
        let src = self.shared(snapshot)?;
        if !src.read_only {
            return Err(EngineError::FailedPrecondition(format!(
                "\"{snapshot}\" is a volume, not a snapshot: snapshot it first (volume snapshot {snapshot} SNAP), then clone the snapshot"
            )));
        }
        self.copy_volume(&src, new_volume, false).await
    }

    async fn copy_volume(
        &self,
        src: &Arc<VolumeShared>,
        name: &str,
        read_only: bool,
    ) -> Result<VolumeInfo> {
        let _c = self.inner.control.lock().await;
        // Deletes run under the control lock too: one that finished while
        // this call waited for it leaves `src` deleted, with nothing mapped.
        if src.deleted.load(Ordering::SeqCst) {
            return Err(EngineError::VolumeNotFound(src.name.clone()));
        }
        let dst = {
            let mut cat = self.inner.catalog.write();
            if cat.contains_key(name) {
                return Err(EngineError::VolumeExists(name.into()));
            }
            let id = self.allocate_volume_id(&cat);
            let v = Arc::new(VolumeShared::from_record(&VolumeRecord {
                id,
                name: name.into(),
                size: src.size.load(Ordering::SeqCst),
                block_size: src.block_size,
                dedup: src.dedup,
                compression: src.compression,
                read_only,
                parent: Some(src.name.clone()),
                created_unix: now_unix(),
                generation: 0,
                mapped_blocks: 0,
            }));
            cat.insert(name.into(), v.clone());
            if read_only {
                if let Some(f) = &self.inner.meta.block_filter {
                    f.untrack(id);
                }
            }
            v
        };
        let r = {
            let mut st = self.inner.state.lock();
            let mut tx = Txn {
                st: &mut st,
                meta: &self.inner.meta,
            };
            let copied = (|| {
                for (lba, key) in tx.mapped_range(src.id, 0, u64::MAX)? {
                    tx.set_block(dst.id, lba, Some(key))?;
                }
                Ok::<_, EngineError>(())
            })();
            match copied {
                Ok(()) => {
                    tx.st.cur.touched.insert(dst.id);
                    Ok(())
                }
                Err(e) => {
                    // The copy never existed: drop the references it took,
                    // as a delete would. Marked deleted under the state
                    // lock first, as `delete_volume` does: a writer that
                    // opened the copy meanwhile checks it under this lock
                    // and would otherwise map blocks of a deleted volume.
                    dst.deleted.store(true, Ordering::SeqCst);
                    let undone = (|| {
                        for (lba, _) in tx.mapped_range(dst.id, 0, u64::MAX)? {
                            tx.set_block(dst.id, lba, None)?;
                        }
                        Ok::<_, EngineError>(())
                    })();
                    if let Err(u) = undone {
                        tracing::error!(volume = name, error = %u, "undoing a failed copy");
                    }
                    tx.st.cur.deleted_volumes.insert(dst.id);
                    Err(e)
                }
            }
        };
        if let Err(e) = r {
            // Marked deleted above, under the state lock.
            self.inner.catalog.write().remove(name);
            return Err(e);
        }
        self.inner.flush().await?;
        Ok(self.info_of(&dst))
    }

    fn shared(&self, name: &str) -> Result<Arc<VolumeShared>> {
        self.inner
            .catalog
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::VolumeNotFound(name.into()))
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        Ok(self.info_of(&*self.shared(name)?))
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let vols: Vec<_> = self.inner.catalog.read().values().cloned().collect();
        let mut out: Vec<_> = vols.iter().map(|v| self.info_of(v)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub(crate) fn info_of(&self, v: &VolumeShared) -> VolumeInfo {
        let pending = {
            let st = self.inner.state.lock();
            st.cur.mapped.get(&v.id).copied().unwrap_or(0)
                + st.committing
                    .as_ref()
                    .and_then(|c| c.mapped.get(&v.id).copied())
                    .unwrap_or(0)
        };
        let mapped = (v.committed_mapped.load(Ordering::SeqCst) as i64 + pending).max(0) as u64;
        VolumeInfo {
            id: v.id,
            name: v.name.clone(),
            size: v.size.load(Ordering::SeqCst),
            block_size: v.block_size,
            dedup: v.dedup,
            compression: v.compression,
            read_only: v.read_only,
            parent: v.parent.lock().clone(),
            mapped_bytes: mapped * v.block_size as u64,
            generation: v.generation.load(Ordering::SeqCst),
            created_unix: v.created_unix,
        }
    }

    /// Open a volume (or snapshot, read-only) for I/O.
    pub fn open_volume(&self, name: &str) -> Result<Volume> {
        Ok(Volume::new(self.inner.clone(), self.shared(name)?))
    }

    /// Add a disk to the live pool.
    pub async fn add_disk(&self, spec: DiskSpec) -> Result<DiskStats> {
        let _c = self.inner.control.lock().await;
        let path = std::path::absolute(&spec.path).unwrap_or_else(|_| spec.path.clone());
        if self.inner.pool.read().disks.iter().any(|d| d.path == path) {
            return Err(EngineError::FailedPrecondition(format!(
                "{} is already in the pool",
                path.display()
            )));
        }
        let spec = DiskSpec {
            path,
            create_size: spec.create_size,
        };
        let dio = open_disk(&self.inner.cfg, self.inner.io.as_ref(), &spec)?;
        let pool_snapshot = self.inner.pool.read().clone();
        let (disk, rec) = format_disk(&pool_snapshot, &spec, dio).await?;
        {
            let mut pool = self.inner.pool.write();
            pool.disks.push(rec);
            self.inner.meta.misc.insert(
                "pool",
                serde_json::to_vec(&*pool).map_err(|e| EngineError::Meta(e.to_string()))?,
            )?;
        }
        self.inner.meta.persist()?;
        // The list first, then its segments: anyone who can allocate one of
        // them (under `space`) took the disk list after this push, so the
        // list it writes the segment through holds the disk.
        self.inner.disks.write().push(disk.clone());
        self.inner
            .space
            .lock()
            .add_disk(disk.id, disk.segments, &HashMap::new());
        tracing::info!(path = %disk.path.display(), segments = disk.segments, "disk added to pool");
        Ok(self.disk_stats(&disk, &self.inner.space.lock()))
    }

    fn disk_stats(&self, d: &PoolDisk, space: &Space) -> DiskStats {
        let seg = space.segment_size as u64;
        let used = d.segments as u64 - space.free_on(d.id) as u64;
        DiskStats {
            disk_id: d.id,
            path: d.path.clone(),
            capacity_bytes: d.segments as u64 * seg,
            used_bytes: used * seg,
            segments_total: d.segments as u64,
            segments_used: used,
        }
    }

    pub fn node_stats(&self) -> NodeStats {
        let (disks, capacity, used_segments_bytes) = {
            // The disk list before the space lock, never inside it: writers
            // take the list, then the segment writer, then the space lock
            // (opening a segment), and a pending `add_disk` blocks new
            // readers of the list, so reading it under the space lock could
            // close a cycle of three.
            let pool = self.inner.disks.read().clone();
            let space = self.inner.space.lock();
            let disks: Vec<DiskStats> = pool.iter().map(|d| self.disk_stats(d, &space)).collect();
            let cap = disks.iter().map(|d| d.capacity_bytes).sum::<u64>();
            let used = disks.iter().map(|d| d.used_bytes).sum::<u64>();
            (disks, cap, used)
        };
        let (unique, stored) = {
            let st = self.inner.state.lock();
            let c = st.committed;
            let mut u = c.unique_bytes as i64 + st.cur.unique;
            let mut s = c.stored_bytes as i64 + st.cur.stored;
            if let Some(ov) = &st.committing {
                u += ov.unique;
                s += ov.stored;
            }
            (u.max(0) as u64, s.max(0) as u64)
        };
        let logical: u64 = self.list_volumes().iter().map(|v| v.mapped_bytes).sum();
        let metadata = self.inner.meta.disk_space();
        let (metadata_cache_bytes, metadata_write_buffer_bytes) = self.inner.meta.memory();
        let pool = self.inner.pool.read();
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        NodeStats {
            node_id: id_hex(&pool.node_id),
            pool_id: id_hex(&pool.pool_id),
            io_backend: self.backend_name().into(),
            capacity_bytes: capacity,
            used_bytes: used_segments_bytes + metadata,
            logical_bytes: logical,
            unique_bytes: unique,
            stored_bytes: stored,
            metadata_bytes: metadata,
            metadata_cache_bytes,
            metadata_write_buffer_bytes,
            record_filter_bytes: self
                .inner
                .meta
                .record_filter
                .as_ref()
                .map_or(0, |f| f.memory_bytes()),
            block_filter_bytes: self
                .inner
                .meta
                .block_filter
                .as_ref()
                .map_or(0, |f| f.memory_bytes()),
            entry_cache_bytes: self.inner.meta.entries.memory_bytes(),
            read_cache_bytes: self.inner.read_cache.weight() + self.inner.read_cache.stranded(),
            dedup_ratio: ratio(logical, unique),
            compression_ratio: ratio(unique, stored),
            checksum_errors: self.inner.checksum_errors.load(Ordering::Relaxed),
            disks,
        }
    }

    // ---- replication support ------------------------------------------------

    /// Does this node hold a content-addressed record for `hash`?
    pub fn has_block(&self, hash: &[u8; 32]) -> Result<bool> {
        let mut st = self.inner.state.lock();
        let tx = Txn {
            st: &mut st,
            meta: &self.inner.meta,
        };
        Ok(tx.record(&crate::key::BlockKey::content(*hash))?.is_some())
    }

    /// Read the block stored under `hash`, if any.
    pub async fn read_by_hash(&self, hash: &[u8; 32]) -> Result<Option<bytes::Bytes>> {
        let key = crate::key::BlockKey::content(*hash);
        let meta = {
            let mut st = self.inner.state.lock();
            Txn {
                st: &mut st,
                meta: &self.inner.meta,
            }
            .record(&key)?
        };
        match meta {
            None => Ok(None),
            Some(m) => {
                let mut out = vec![0u8; m.raw_len as usize];
                match self
                    .inner
                    .read_records(&[(key, m, 0)], &mut out, "(by hash)")
                    .await
                {
                    Ok(()) => Ok(Some(out.into())),
                    Err(crate::volume::ReadFault::Engine(e)) => Err(e),
                    Err(crate::volume::ReadFault::Moved) => Err(EngineError::FailedPrecondition(
                        "the block moved while it was read; retry".into(),
                    )),
                }
            }
        }
    }

    /// Time spent and bytes moved by the cleaner, for tests and stats.
    pub fn free_segments(&self) -> usize {
        self.inner.space.lock().free_count()
    }

    /// Run one cleaning pass now (tests, and the ENOSPC path).
    pub async fn clean_now(&self, aggressive: bool) -> Result<usize> {
        crate::cleaner::clean_pass(&self.inner, aggressive).await
    }
}

/// Open a disk through the test opener, or else the I/O backend.
fn open_disk(
    cfg: &EngineConfig,
    io: Option<&IoEngine>,
    spec: &DiskSpec,
) -> Result<Arc<dyn DiskIo>> {
    let r = match (&cfg.disk_opener, io) {
        (Some(o), _) => o(spec),
        (None, Some(io)) => io.open_disk(&spec.path, spec.create_size),
        (None, None) => unreachable!("an I/O engine exists whenever no test opener is set"),
    };
    r.map_err(|e| EngineError::Disk {
        path: spec.path.clone(),
        reason: format!("cannot open: {e}"),
    })
}

fn check_superblock(sb: &Superblock, pool: &PoolRecord, d: &DiskRecord) -> Result<()> {
    let bad = |reason: String| EngineError::Disk {
        path: d.path.clone(),
        reason,
    };
    if sb.pool_id != pool.pool_id {
        return Err(bad(format!(
            "belongs to another pool ({}, this pool is {}): give ballastd that pool's data folder, or reformat the disk",
            id_hex(&sb.pool_id),
            id_hex(&pool.pool_id)
        )));
    }
    if sb.node_id != pool.node_id {
        return Err(bad(format!(
            "belongs to another node ({}): it cannot be opened by node {}",
            id_hex(&sb.node_id),
            id_hex(&pool.node_id)
        )));
    }
    if sb.disk_id != d.disk_id {
        return Err(bad(format!(
            "holds disk {} of this pool where disk {} was expected: were disk paths swapped?",
            sb.disk_id, d.disk_id
        )));
    }
    if sb.segment_size != pool.segment_size {
        return Err(bad(format!(
            "segment size {} differs from the pool's {}",
            sb.segment_size, pool.segment_size
        )));
    }
    Ok(())
}

async fn format_disk(
    pool: &PoolRecord,
    spec: &DiskSpec,
    dio: Arc<dyn DiskIo>,
) -> Result<(Arc<PoolDisk>, DiskRecord)> {
    // Refuse to format over another pool's disk: that would destroy its data.
    if let Ok(sb) = read_superblock(&dio, &spec.path).await {
        if sb.pool_id != pool.pool_id {
            return Err(EngineError::Disk {
                path: spec.path.clone(),
                reason: format!(
                    "already formatted for pool {} (node {}): refusing to overwrite it; wipe its first 4 KiB to reuse it",
                    id_hex(&sb.pool_id),
                    id_hex(&sb.node_id)
                ),
            });
        }
    }
    let segments = segments_on(dio.len(), pool.segment_size);
    if segments < 4 {
        return Err(EngineError::Disk {
            path: spec.path.clone(),
            reason: format!(
                "{} bytes hold only {segments} segments of {} bytes: a pool disk needs room for at least 4",
                dio.len(),
                pool.segment_size
            ),
        });
    }
    let disk_id = pool.disks.iter().map(|d| d.disk_id + 1).max().unwrap_or(0);
    let sb = Superblock {
        version: FORMAT_VERSION,
        segment_size: pool.segment_size,
        pool_id: pool.pool_id,
        node_id: pool.node_id,
        disk_id,
        disk_size: dio.len(),
        data_offset: DATA_OFFSET,
        created_unix: now_unix(),
    };
    write_superblock(&dio, &spec.path, &sb).await?;
    tracing::info!(path = %spec.path.display(), disk_id, segments, "formatted pool disk");
    Ok((
        Arc::new(PoolDisk {
            id: disk_id,
            path: spec.path.clone(),
            io: dio.clone(),
            segments,
        }),
        DiskRecord {
            disk_id,
            path: spec.path.clone(),
            size: dio.len(),
        },
    ))
}

pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidArgument(format!(
            "invalid name \"{name}\": use 1 to 128 of the characters A-Z a-z 0-9 . _ -"
        )))
    }
}

fn validate_options(o: &VolumeOptions) -> Result<()> {
    if !o.block_size.is_power_of_two() || !(512..=65536).contains(&o.block_size) {
        return Err(EngineError::InvalidArgument(format!(
            "block size {} must be a power of two from 512 to 65536",
            o.block_size
        )));
    }
    if o.size == 0 || !o.size.is_multiple_of(o.block_size as u64) {
        return Err(EngineError::InvalidArgument(format!(
            "size {} must be a positive multiple of the block size {}",
            o.size, o.block_size
        )));
    }
    Ok(())
}

impl Inner {
    pub(crate) fn check_failed(&self) -> Result<()> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(EngineError::ShuttingDown);
        }
        if let Some(why) = self.failed.get() {
            return Err(EngineError::FailedPrecondition(format!(
                "the engine stopped accepting writes after an earlier failure ({why}): restart ballastd"
            )));
        }
        Ok(())
    }

    pub(crate) async fn flush(self: &Arc<Self>) -> Result<()> {
        let target = self.commits_started.load(Ordering::SeqCst) + 1;
        let mut rx = self.commits_done.subscribe();
        loop {
            if *rx.borrow_and_update() >= target {
                return Ok(());
            }
            let guard = self.commit_lock.clone().lock_owned().await;
            if *rx.borrow_and_update() >= target {
                return Ok(());
            }
            if self.frozen.load(Ordering::SeqCst) {
                return Err(EngineError::ShuttingDown);
            }
            if let Some(why) = self.failed.get() {
                return Err(EngineError::FailedPrecondition(format!(
                    "cannot flush after an earlier failure ({why}): restart ballastd"
                )));
            }
            // The commit runs in its own task: a caller that gives up (a
            // dropped NBD request, an aborted task) must not cancel a commit
            // halfway, which would lose the frozen overlay.
            let inner = self.clone();
            let task = self.rt.spawn(async move {
                let r = inner.commit().await;
                if let Err(e) = &r {
                    tracing::error!(error = %e, "commit failed; refusing further writes");
                    let _ = inner.failed.set(e.to_string());
                }
                drop(guard);
                r
            });
            match task.await {
                Ok(r) => r?,
                Err(e) => {
                    // Its frozen overlay is neither in the store nor undone:
                    // a later commit would freeze over it and lose it, so
                    // refuse writes and flushes as after a failed commit.
                    let why = format!("the commit task died: {e}");
                    tracing::error!("{why}; refusing further writes");
                    let _ = self.failed.set(why.clone());
                    return Err(EngineError::FailedPrecondition(why));
                }
            }
        }
    }

    /// Waits until every write buffered so far (see `write_back`) is stored
    /// in the engine; a later `flush` then makes it durable.
    pub(crate) async fn land_buffered(&self) -> Result<()> {
        match &self.write_back {
            Some(wb) => wb.wait_landed(wb.last_seq()).await,
            None => Ok(()),
        }
    }

    /// Is a commit needed soon, or must this writer wait for one?
    pub(crate) async fn backpressure(self: &Arc<Self>) -> Result<()> {
        let entries = self.state.lock().cur.entries();
        let images = self.writer.lock().images_in_memory();
        let backlog = Backlog { entries, images };
        if backlog.must_wait() {
            self.flush().await?;
        } else if backlog.wants_commit() && self.commit_lock.try_lock().is_ok() {
            let inner = self.clone();
            self.rt.spawn(async move {
                let _ = inner.flush().await;
            });
        }
        Ok(())
    }

    async fn commit(&self) -> Result<()> {
        self.commits_started.fetch_add(1, Ordering::SeqCst);
        let t0 = Instant::now();
        // 1. Freeze the overlay.
        let (ov, committed, next_nonce) = {
            let mut st = self.state.lock();
            let ov = Arc::new(std::mem::take(&mut st.cur));
            st.committing = Some(ov.clone());
            (ov, st.committed, st.next_nonce)
        };
        // 2. Everything the frozen overlay references was appended before the
        // freeze; write it all out and make it durable.
        // The disk list is read after the freeze, in the writers' lock order
        // (list, then writer): a segment on a disk added meanwhile, which the
        // frozen overlay may reference, is then on this list to be padded,
        // written and synced.
        let (disks, pending, dirty, written) = {
            let list = self.disks.read();
            let mut w = self.writer.lock();
            let disks = list.clone();
            drop(list);
            let (p, d) = w.prepare_commit(&disks, &self.rt);
            (disks, p, d, std::mem::take(&mut w.written))
        };
        for p in pending {
            match p.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(EngineError::io("writing a segment", e)),
                Err(e) => {
                    return Err(EngineError::io(
                        "writing a segment",
                        std::io::Error::other(e),
                    ))
                }
            }
        }
        for d in disks.iter().filter(|d| dirty.contains(&d.id)) {
            d.io.sync()
                .await
                .map_err(|e| EngineError::io(format!("syncing {}", d.path.display()), e))?;
        }
        // 3. One atomic metadata batch.
        let meta = &self.meta;
        // Sized up front: grown by doubling, a large batch's vector was
        // copied and faulted in fresh (huge) pages several times per commit.
        let mut batch = fjall::OwnedWriteBatch::with_capacity(
            meta.db.clone(),
            ov.blocks.len()
                + ov.records.len()
                + ov.seg_live.len()
                + written.len()
                + ov.touched.len()
                + ov.deleted_volumes.len()
                + 64,
        );
        // In key order: fjall inserts a batch into its memtable skiplists in
        // batch order, and consecutive searches for nearby keys find the
        // skiplist's nodes still in the CPU caches (the overlay's hash maps
        // iterate in random order).
        let blocks = ov.blocks_in_key_order();
        for &(&(v, lba), k) in &blocks {
            match k {
                Some(k) => batch.insert(&meta.blocks, map_key(v, lba), k.encode()),
                None => batch.remove(&meta.blocks, map_key(v, lba)),
            }
        }
        // Before the batch lands, so the filter is never behind the store
        // (see `block_filter`).
        if let Some(f) = &meta.block_filter {
            f.insert(
                blocks
                    .iter()
                    .filter(|(_, k)| k.is_some())
                    .map(|(&vl, _)| vl),
            );
        }
        // By the first 8 bytes of the hash alone: the order only buys the
        // skiplist locality above (a batch's keys are distinct, any order is
        // correct), and comparing whole 40-byte keys costs a memcmp call per
        // comparison for the same order in all but hash-prefix ties.
        let mut records: Vec<_> = ov.records.iter().collect();
        records.sort_unstable_by_key(|(k, _)| {
            u64::from_be_bytes(k.hash[..8].try_into().expect("8 of 32 bytes"))
        });
        for (k, m) in records {
            match m {
                Some(m) => {
                    // Before the batch lands, so the filter never misses a
                    // key the store has (see `record_filter`).
                    if let Some(f) = &meta.record_filter {
                        f.insert(k);
                    }
                    batch.insert(&meta.records, k.encode(), m.encode())
                }
                None => batch.remove(&meta.records, k.encode()),
            }
        }
        let mut new_live: Vec<(SegmentId, u64)> = Vec::new();
        let released: Vec<SegmentId> = {
            let mut space = self.space.lock();
            let mut touched: std::collections::BTreeSet<SegmentId> =
                ov.seg_live.keys().copied().collect();
            touched.extend(written.keys().copied());
            for id in touched {
                let Some(info) = space.used.get(&id).copied() else {
                    continue;
                };
                let live = (info.committed_live as i64 + ov.seg_live.get(&id).copied().unwrap_or(0))
                    .max(0) as u64;
                let w = written
                    .get(&id)
                    .copied()
                    .unwrap_or(info.written)
                    .max(info.written);
                new_live.push((id, live));
                batch.insert(
                    &meta.segments,
                    id.encode(),
                    SegmentRecord {
                        live_bytes: live,
                        written_bytes: w,
                    }
                    .encode(),
                );
            }
            std::mem::take(&mut space.released)
        };
        for id in &released {
            if !new_live.iter().any(|(s, _)| s == id) {
                batch.remove(&meta.segments, id.encode());
            }
        }
        let catalog: Vec<Arc<VolumeShared>> = self.catalog.read().values().cloned().collect();
        let mut vol_updates = Vec::new();
        for v in catalog
            .iter()
            .filter(|v| ov.touched.contains(&v.id) && !ov.deleted_volumes.contains(&v.id))
        {
            let mapped = (v.committed_mapped.load(Ordering::SeqCst) as i64
                + ov.mapped.get(&v.id).copied().unwrap_or(0))
            .max(0) as u64;
            let generation = v.generation.load(Ordering::SeqCst) + 1;
            let rec = v.to_record(mapped, generation);
            batch.insert(
                &meta.volumes,
                v.id.to_be_bytes().to_vec(),
                serde_json::to_vec(&rec).map_err(|e| EngineError::Meta(e.to_string()))?,
            );
            vol_updates.push((v.clone(), mapped, generation));
        }
        for id in &ov.deleted_volumes {
            batch.remove(&meta.volumes, id.to_be_bytes().to_vec());
        }
        let counters = Counters {
            unique_bytes: (committed.unique_bytes as i64 + ov.unique).max(0) as u64,
            stored_bytes: (committed.stored_bytes as i64 + ov.stored).max(0) as u64,
            records: (committed.records as i64 + ov.record_count).max(0) as u64,
            next_nonce,
            next_volume_id: committed.next_volume_id,
        };
        batch.insert(
            &meta.misc,
            "counters",
            serde_json::to_vec(&counters).map_err(|e| EngineError::Meta(e.to_string()))?,
        );
        let n_entries = batch.len();
        // Off the runtime's workers: the journal's fsync blocks, and so may
        // fjall's own write throttling (it sleeps while its level 0 is
        // crowded or too many memtables wait for a flush).
        let db = meta.db.clone();
        self.rt
            .spawn_blocking(move || -> Result<()> {
                batch.commit()?;
                Meta::persist_db(&db)
            })
            .await
            .map_err(|e| EngineError::Meta(format!("the metadata commit thread died: {e}")))??;
        // Before publishing: until then the frozen overlay shadows these keys.
        meta.entries.apply(&blocks, &ov);
        if let Some(f) = &meta.block_filter {
            for &id in &ov.deleted_volumes {
                f.untrack(id);
            }
        }
        // Blocks whose record died can only be read again if the same
        // content is written again: drop them, so overwrites recycle the
        // cache's memory instead of growing it with dead blocks (or evicting
        // live ones).
        self.read_cache.forget(
            ov.records
                .iter()
                .filter(|(_, m)| m.is_none())
                .map(|(k, _)| k),
        );
        // 4. Publish: the store now holds the frozen overlay.
        {
            let mut st = self.state.lock();
            st.committing = None;
            st.committed = Counters {
                next_volume_id: st.committed.next_volume_id,
                ..counters
            };
        }
        for (v, mapped, generation) in vol_updates {
            v.committed_mapped.store(mapped, Ordering::SeqCst);
            v.generation.store(generation, Ordering::SeqCst);
        }
        {
            // Lock order is writer -> space (appends allocate under the writer
            // lock), so collect what the writer and the live overlay still
            // need before taking the space lock.
            let held = self.writer.lock().held_ids();
            let pending: std::collections::HashSet<SegmentId> = {
                let st = self.state.lock();
                st.cur
                    .seg_live
                    .iter()
                    .filter(|(_, d)| **d != 0)
                    .map(|(id, _)| *id)
                    .collect()
            };
            let mut space = self.space.lock();
            for (id, w) in &written {
                if let Some(info) = space.used.get_mut(id) {
                    info.written = info.written.max(*w);
                }
            }
            for (id, live) in new_live {
                if let Some(info) = space.used.get_mut(&id) {
                    info.committed_live = live;
                }
            }
            // Empty sealed segments are free once this commit is durable.
            let empty: Vec<SegmentId> = space
                .used
                .iter()
                .filter(|(id, i)| {
                    i.committed_live == 0
                        && i.state == SegState::Sealed
                        && !held.contains(id)
                        && !pending.contains(id)
                })
                .map(|(id, _)| *id)
                .collect();
            for id in empty {
                space.release(id);
            }
        }
        self.commits_done.send_modify(|d| *d += 1);
        tracing::debug!(
            entries = n_entries,
            elapsed_us = t0.elapsed().as_micros() as u64,
            "commit"
        );
        Ok(())
    }
}
