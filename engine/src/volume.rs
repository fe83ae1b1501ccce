//! Volumes: the read and write paths of one block device.
//!
//! Write path: split into blocks, hash each (blake3), drop all-zero blocks to
//! holes, look the hash up (dedup volumes), compress the new ones (lz4) and
//! append them to the open segment, then install the block-map changes in the
//! overlay under one short lock. All of that happens synchronously when
//! `write` is called, so writes take effect in call order; the returned
//! future only waits for back-pressure and, with FUA, for the commit.
//!
//! Read path: resolve block keys and record locations (overlay, then store),
//! serve records still in a segment image from memory, and read the rest with
//! one aligned I/O per run of nearby records, checking every record's crc.

use crate::compress_probe::CompressProbe;
use crate::config::{Compression, VolumeInfo};
use crate::engine::{Backlog, Engine, Inner};
use crate::error::{EngineError, Result};
use crate::io::{AlignedBuf, IO_ALIGN};
use crate::key::{BlockKey, RecordMeta};
use crate::meta::{CacheFill, VolumeRecord};
use crate::read_cache::{Admit, HitKind};
use crate::record::{self, HEADER_LEN};
use crate::state::Txn;
use crate::write_back::Change;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

pub type EngineFuture<T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'static>>;

/// Largest single read or write the engine accepts (the NBD payload cap).
pub const MAX_IO: u64 = 32 << 20;
/// Records closer than this on disk are fetched with one read.
const COALESCE_GAP: u64 = 64 << 10;
/// A written block enters the read cache only if its shard of the cache has
/// room for it: a write never evicts what is cached (write-around once the
/// cache is full, as dm-cache's writearound mode; the client's own page
/// cache holds what it just wrote), and reads of the block fill the cache
/// later as any miss does. Inserting every written block, evicting for
/// each, cost a sixth of the CPU of random 4 KiB writes through the engine
/// (write_cpu with a full 256 MiB cache, medians of 3 in turns: 84.8 ->
/// 95.0 k writes per CPU-second into a fresh volume, 68.9 -> 74.7 k under
/// overwrites).
///
/// Writes larger than this, often streams (copies, backups, image uploads)
/// that would push the random working set out (bcache and dm-cache bypass
/// sequential streams for the same reason), are cached only whole, while
/// the cache has room for all of their blocks, and only into unmapped
/// blocks: a large write over mapped blocks (a rewrite of an image, a copy
/// over old data) frees cache room as its dead predecessors leave it, so
/// "free room" alone would admit every block of the stream, each copied in
/// and dropped again at the next pass: that churn was 18% of ballastd's CPU
/// under 1 MiB overwrites.
pub(crate) const CACHE_WRITES_UP_TO: usize = 256 << 10;
/// Unmaps hold the state lock for at most this many blocks at a time.
const UNMAP_CHUNK: u64 = 64 * 1024;

pub(crate) struct VolumeShared {
    pub id: u32,
    pub name: String,
    pub block_size: u32,
    pub dedup: bool,
    pub compression: Compression,
    pub read_only: bool,
    /// The snapshot or volume this one was copied from; cleared when that
    /// one is deleted (content addressing means nothing depends on it).
    pub parent: parking_lot::Mutex<Option<String>>,
    pub created_unix: u64,
    pub size: AtomicU64,
    pub committed_mapped: AtomicU64,
    pub generation: AtomicU64,
    pub deleted: AtomicBool,
    /// Serialises read-modify-write of partial blocks.
    rmw: tokio::sync::Mutex<()>,
    /// Whether lz4 is worth trying on this volume's new blocks.
    compress_probe: CompressProbe,
}

impl VolumeShared {
    pub fn from_record(r: &VolumeRecord) -> VolumeShared {
        VolumeShared {
            id: r.id,
            name: r.name.clone(),
            block_size: r.block_size,
            dedup: r.dedup,
            compression: r.compression,
            read_only: r.read_only,
            parent: parking_lot::Mutex::new(r.parent.clone()),
            created_unix: r.created_unix,
            size: AtomicU64::new(r.size),
            committed_mapped: AtomicU64::new(r.mapped_blocks),
            generation: AtomicU64::new(r.generation),
            deleted: AtomicBool::new(false),
            rmw: tokio::sync::Mutex::new(()),
            compress_probe: CompressProbe::default(),
        }
    }

    pub fn to_record(&self, mapped_blocks: u64, generation: u64) -> VolumeRecord {
        VolumeRecord {
            id: self.id,
            name: self.name.clone(),
            size: self.size.load(Ordering::SeqCst),
            block_size: self.block_size,
            dedup: self.dedup,
            compression: self.compression,
            read_only: self.read_only,
            parent: self.parent.lock().clone(),
            created_unix: self.created_unix,
            generation,
            mapped_blocks,
        }
    }
}

/// A run of bytes that is either data or a hole (reads as zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub hole: bool,
}

/// What a read returns: the bytes, and which parts of them are holes.
#[derive(Clone, Debug)]
pub struct ReadData {
    pub data: Bytes,
    pub extents: Vec<Extent>,
}

/// A read as pieces (see [`Volume::read_parts`]): their concatenation is
/// the data; `extents` says which parts of it are holes.
#[derive(Clone, Debug)]
pub struct ReadParts {
    pub parts: Vec<Bytes>,
    pub extents: Vec<Extent>,
}

/// What holes read as, for every block size (at most 64 KiB).
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Blocks cached together as one run (see `read_cache`): 64 KiB at 4 KiB
/// blocks, where sending a run costs about what sending contiguous memory
/// does (docs/benchmarks.md, session 29).
const RUN_BLOCKS: u64 = 16;

/// Where a mapped block's bytes are for a read: `buf[at..at + bs]`, and
/// whether `buf` is a cached buffer of its own (a candidate for a run).
#[derive(Clone)]
struct Located {
    buf: Bytes,
    at: u32,
    cached_alone: bool,
}

/// Points each of `found` at the next block-sized slot of `buf`, from
/// `first_slot` on: blocks served from one buffer that is not a block's
/// own cache entry (a run, or what was just read from disk).
fn serve_from(found: &mut [Option<Located>], buf: &Bytes, first_slot: usize, bs: usize) {
    for (j, f) in found.iter_mut().enumerate() {
        *f = Some(Located {
            buf: buf.clone(),
            at: ((first_slot + j) * bs) as u32,
            cached_alone: false,
        });
    }
}

/// The index ranges, within `n` blocks starting at block `lba0`, of the
/// whole windows of [`RUN_BLOCKS`] aligned on the volume's block numbers.
fn aligned_windows(lba0: u64, n: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let w = RUN_BLOCKS as usize;
    let skip = (lba0.next_multiple_of(RUN_BLOCKS) - lba0) as usize;
    (skip..)
        .step_by(w)
        .take_while(move |lo| lo + w <= n)
        .map(move |lo| lo..lo + w)
}

/// The blocks' bytes as pieces: one per stretch of blocks that lie one
/// after another in one buffer, shared zeros for each hole (`None`).
fn merge_pieces(found: &[Option<Located>], bs: usize) -> Vec<Bytes> {
    let mut parts: Vec<Bytes> = Vec::new();
    // The stretch being built: its buffer and byte range in it.
    let mut open: Option<(&Bytes, usize, usize)> = None;
    for f in found {
        let next = f.as_ref().map(|l| (&l.buf, l.at as usize));
        match (&mut open, next) {
            // The same live buffer (same start and length) continues.
            (Some((b, _, end)), Some((nb, at)))
                if b.as_ptr() == nb.as_ptr() && b.len() == nb.len() && *end == at =>
            {
                *end += bs;
                continue;
            }
            _ => {}
        }
        if let Some((b, from, to)) = open.take() {
            parts.push(b.slice(from..to));
        }
        match next {
            Some((b, at)) => open = Some((b, at, at + bs)),
            None => parts.push(Bytes::from_static(&ZEROS[..bs])),
        }
    }
    if let Some((b, from, to)) = open {
        parts.push(b.slice(from..to));
    }
    parts
}

/// The pieces as one buffer; no copy when there is only one.
fn concat(mut parts: Vec<Bytes>) -> Bytes {
    if parts.len() == 1 {
        return parts.pop().expect("one piece");
    }
    let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
    for p in &parts {
        out.extend_from_slice(p);
    }
    out.freeze()
}

/// An open volume. Cheap to clone.
#[derive(Clone)]
pub struct Volume {
    inner: Arc<Inner>,
    v: Arc<VolumeShared>,
}

fn push_extent(ext: &mut Vec<Extent>, len: u64, hole: bool) {
    if len == 0 {
        return;
    }
    match ext.last_mut() {
        Some(e) if e.hole == hole => e.len += len,
        _ => ext.push(Extent { len, hole }),
    }
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = unsafe {
        // SAFETY: u8 -> u64 reinterpretation; align_to only yields properly aligned u64s.
        b.align_to::<u64>()
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

impl Volume {
    pub(crate) fn new(inner: Arc<Inner>, v: Arc<VolumeShared>) -> Volume {
        Volume { inner, v }
    }

    pub fn name(&self) -> &str {
        &self.v.name
    }

    pub fn size(&self) -> u64 {
        self.v.size.load(Ordering::SeqCst)
    }

    pub fn block_size(&self) -> u32 {
        self.v.block_size
    }

    pub fn read_only(&self) -> bool {
        self.v.read_only
    }

    pub fn generation(&self) -> u64 {
        self.v.generation.load(Ordering::SeqCst)
    }

    pub fn info(&self) -> VolumeInfo {
        Engine {
            inner: self.inner.clone(),
        }
        .info_of(&self.v)
    }

    fn check_live(&self) -> Result<()> {
        if self.v.deleted.load(Ordering::Relaxed) {
            return Err(EngineError::VolumeNotFound(self.v.name.clone()));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(EngineError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        self.check_live()?;
        if self.v.read_only {
            return Err(EngineError::ReadOnly(self.v.name.clone()));
        }
        self.check_range(offset, len)?;
        self.inner.check_failed()
    }

    /// Write `data` at `offset`. Takes effect (visible to readers) before this
    /// returns the future, unless it covers partial blocks: then it lands
    /// later, but never over a write called after it. With write-back on,
    /// the write is buffered (see `write_back`) and completes at once unless
    /// the buffer is full or `fua` asks it durable.
    pub fn write(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        let Some(wb) = &self.inner.write_back else {
            return self.write_direct(offset, data, fua);
        };
        if let Err(e) = self
            .check_write(offset, data.len() as u64)
            .and_then(|()| check_io_len(data.len() as u64, "write"))
        {
            return Box::pin(std::future::ready(Err(e)));
        }
        if data.is_empty() {
            return self.complete_buffered(0, fua);
        }
        let bs = self.v.block_size as u64;
        let first = offset / bs;
        let end = (offset + data.len() as u64).div_ceil(bs);
        if offset.is_multiple_of(bs) && (data.len() as u64).is_multiple_of(bs) {
            let seq = wb.insert(&self.v, first, Change::Data(data), None);
            return self.complete_buffered(seq, fua);
        }
        let partial = self.register_partial(first, end);
        let this = self.clone();
        Box::pin(async move {
            let rmw = this.v.rmw.lock().await;
            let merged = this.merge_partial(&rmw, offset, &data).await?;
            let seq = partial.insert(merged);
            drop(rmw);
            this.finish_buffered(seq, fua).await
        })
    }

    /// A buffered change's future: ready at once unless it must wait for
    /// room in the buffer or, with `fua`, for its landing and a commit.
    fn complete_buffered(&self, seq: u64, fua: bool) -> EngineFuture<()> {
        let wb = self.inner.write_back.as_ref().expect("write-back is on");
        if !fua && !wb.over_capacity() {
            return Box::pin(std::future::ready(Ok(())));
        }
        let this = self.clone();
        Box::pin(async move { this.finish_buffered(seq, fua).await })
    }

    async fn finish_buffered(&self, seq: u64, fua: bool) -> Result<()> {
        let wb = self.inner.write_back.as_ref().expect("write-back is on");
        if fua {
            wb.wait_landed(seq).await?;
            self.inner.flush().await
        } else {
            wb.wait_room().await
        }
    }

    fn register_partial(&self, first: u64, end: u64) -> PartialGuard {
        let wb = self.inner.write_back.as_ref().expect("write-back is on");
        let (seq, id) = wb.register_partial(&self.v, first, end);
        PartialGuard {
            vol: self.clone(),
            first,
            seq,
            id,
        }
    }

    /// The whole blocks a partial write of `data` at `offset` makes: the old
    /// head and tail blocks, read through the write-back buffer (if on),
    /// with `data` laid over them. The caller holds the read-modify-write lock.
    async fn merge_partial(
        &self,
        _rmw: &tokio::sync::MutexGuard<'_, ()>,
        offset: u64,
        data: &[u8],
    ) -> Result<Bytes> {
        let bs = self.v.block_size as u64;
        let first = offset / bs;
        let end = (offset + data.len() as u64).div_ceil(bs);
        let mut buf = vec![0u8; ((end - first) * bs) as usize];
        let head_partial = !offset.is_multiple_of(bs);
        let tail_partial = !(offset + data.len() as u64).is_multiple_of(bs);
        if head_partial {
            let old = concat(self.read_inner(first * bs, bs).await?.parts);
            buf[..bs as usize].copy_from_slice(&old);
        }
        if tail_partial && (end - 1 != first || !head_partial) {
            let old = concat(self.read_inner((end - 1) * bs, bs).await?.parts);
            let at = ((end - 1 - first) * bs) as usize;
            buf[at..at + bs as usize].copy_from_slice(&old);
        }
        let at = (offset - first * bs) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        Ok(Bytes::from(buf))
    }

    /// Lands the volume's buffered writes soon: its client went away.
    pub fn drain_soon(&self) {
        if let Some(wb) = &self.inner.write_back {
            wb.drain_soon();
        }
    }

    /// The write path without the write-back buffer (the drainer lands
    /// buffered writes through it).
    pub(crate) fn write_direct(&self, offset: u64, data: Bytes, fua: bool) -> EngineFuture<()> {
        if let Err(e) = self
            .check_write(offset, data.len() as u64)
            .and_then(|()| check_io_len(data.len() as u64, "write"))
        {
            return Box::pin(std::future::ready(Err(e)));
        }
        let bs = self.v.block_size as u64;
        let first = offset / bs;
        let end = (offset + data.len() as u64).div_ceil(bs);
        if offset.is_multiple_of(bs) && (data.len() as u64).is_multiple_of(bs) {
            match self.write_blocks(first, &data, None) {
                Ok(backlog) if backlog.is_calm() && !fua => Box::pin(std::future::ready(Ok(()))),
                Err(EngineError::NoSpace) => {
                    // Lands late: registered now, so that writes after
                    // this one are not undone by its retry.
                    let late = self.register_late(first, end);
                    let this = self.clone();
                    Box::pin(async move {
                        let _rmw = this.v.rmw.lock().await;
                        this.inner.make_space().await?;
                        this.write_blocks(first, &data, Some(late.id))?;
                        drop(late);
                        this.finish_write(fua).await
                    })
                }
                r => {
                    let this = self.clone();
                    Box::pin(async move {
                        r?;
                        this.finish_write(fua).await
                    })
                }
            }
        } else {
            let late = self.register_late(first, end);
            let this = self.clone();
            Box::pin(async move {
                let rmw = this.v.rmw.lock().await;
                this.write_unaligned(&rmw, offset, &data, late.id).await?;
                drop(late);
                this.finish_write(fua).await
            })
        }
    }

    /// Registers a write of blocks `[first, end)` that takes effect after
    /// its call returns (see `state::LateWrites`); dropping the guard ends it.
    fn register_late(&self, first: u64, end: u64) -> LateGuard {
        let id = self.inner.state.lock().late.register(self.v.id, first, end);
        LateGuard {
            inner: self.inner.clone(),
            id,
        }
    }

    async fn finish_write(&self, fua: bool) -> Result<()> {
        self.inner.backpressure().await?;
        if fua {
            self.inner.flush().await?;
        }
        Ok(())
    }

    /// Read-modify-write of the blocks `data` touches; the caller holds the
    /// volume's read-modify-write lock and registered late write `late`.
    async fn write_unaligned(
        &self,
        rmw: &tokio::sync::MutexGuard<'_, ()>,
        offset: u64,
        data: &[u8],
        late: u64,
    ) -> Result<()> {
        let first = offset / self.v.block_size as u64;
        let buf = self.merge_partial(rmw, offset, data).await?;
        match self.write_blocks(first, &buf, Some(late)) {
            Ok(_) => {}
            Err(EngineError::NoSpace) => {
                self.inner.make_space().await?;
                self.write_blocks(first, &buf, Some(late))?;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// The synchronous heart of the write path (see the module comment).
    /// `late`: the late write (see `state::LateWrites`) this lands, which
    /// skips the blocks later writes superseded; `None` for a write taking
    /// effect in its call, which supersedes the late writes before it.
    fn write_blocks(&self, lba0: u64, data: &Bytes, late: Option<u64>) -> Result<Backlog> {
        self.check_live()?;
        let bs = self.v.block_size as usize;
        let n = data.len() / bs;
        let hashes: Vec<Option<[u8; 32]>> = data
            .chunks_exact(bs)
            .map(|c| {
                if is_zero(c) {
                    None
                } else {
                    Some(blake3::hash(c).into())
                }
            })
            .collect();
        for _attempt in 0..8 {
            // 1. Which blocks need a new record?
            let mut keys: Vec<Option<BlockKey>> = vec![None; n];
            let mut need: Vec<usize> = Vec::new();
            {
                let mut st = self.inner.state.lock();
                let mut tx = Txn {
                    st: &mut st,
                    meta: &self.inner.meta,
                };
                if self.v.dedup {
                    let mut first_of: HashMap<[u8; 32], ()> = HashMap::new();
                    for (i, h) in hashes.iter().enumerate() {
                        let Some(h) = h else { continue };
                        let key = BlockKey::content(*h);
                        keys[i] = Some(key);
                        if first_of.insert(*h, ()).is_none() && tx.record(&key)?.is_none() {
                            need.push(i);
                        }
                    }
                } else {
                    let count = hashes.iter().filter(|h| h.is_some()).count() as u64;
                    let mut nonce = tx.take_nonces(count);
                    for (i, h) in hashes.iter().enumerate() {
                        if let Some(h) = h {
                            keys[i] = Some(BlockKey { hash: *h, nonce });
                            nonce += 1;
                            need.push(i);
                        }
                    }
                }
            }
            // 2. Compress outside every lock, then append under the writer lock.
            let lz4 = self.v.compression == Compression::Lz4;
            let mut staged: Vec<(usize, record::Codec, Option<Vec<u8>>)> =
                Vec::with_capacity(need.len());
            for &i in &need {
                let key = keys[i].expect("blocks needing a record have a key");
                let probe = &self.v.compress_probe;
                let try_lz4 = lz4 && probe.should_try(&key.hash);
                let (codec, c) = record::compress(&data[i * bs..(i + 1) * bs], try_lz4);
                if try_lz4 {
                    probe.tried(codec == record::Codec::Lz4);
                }
                staged.push((i, codec, c));
            }
            let mut placed: Vec<(BlockKey, RecordMeta)> = Vec::with_capacity(staged.len());
            // Holds the segments of `placed` until they are installed below
            // (see `segment::Unpublished`); dropped at the end of this attempt.
            let mut holds = Vec::with_capacity(staged.len());
            let images = {
                let disks = self.inner.disks.read();
                let mut w = self.inner.writer.lock();
                for (i, codec, c) in &staged {
                    let raw = &data[i * bs..(i + 1) * bs];
                    let payload = c.as_deref().unwrap_or(raw);
                    let key = keys[*i].expect("blocks needing a record have a key");
                    let p = w.append(
                        HEADER_LEN + payload.len(),
                        &self.inner.space,
                        &disks,
                        &self.inner.rt,
                        false,
                        |out| record::encode_into(out, &key, *codec, bs as u32, payload),
                    )?;
                    placed.push((
                        key,
                        RecordMeta {
                            segment: p.segment,
                            offset: p.offset,
                            stored_len: payload.len() as u32,
                            raw_len: bs as u32,
                            refs: 0,
                        },
                    ));
                    holds.push(p.hold);
                }
                w.images_in_memory()
            };
            // 3. Install.
            let mut st = self.inner.state.lock();
            // Again under the state lock: a delete that began since the
            // check at the top has unmapped the volume under this lock, and
            // mappings installed after it would hold references forever.
            self.check_live()?;
            // The blocks this write sets: all, unless it lands late and later
            // writes took some of them over.
            let skip: Option<Vec<bool>> =
                late.and_then(|id| st.late.superseded(id).map(<[bool]>::to_vec));
            let sets = |i: usize| skip.as_ref().is_none_or(|s| !s[i]);
            let used: Option<std::collections::HashSet<BlockKey>> = skip.as_ref().map(|_| {
                keys.iter()
                    .enumerate()
                    .filter(|&(i, _)| sets(i))
                    .filter_map(|(_, k)| *k)
                    .collect()
            });
            let mut tx = Txn {
                st: &mut st,
                meta: &self.inner.meta,
            };
            let mut inserted = Vec::new();
            for (key, meta) in &placed {
                if used.as_ref().is_some_and(|u| !u.contains(key)) {
                    continue; // only superseded blocks wanted it: garbage
                }
                // Another writer may have stored the same content meanwhile:
                // then ours is garbage for the cleaner, and we reference theirs.
                if tx.record(key)?.is_none() {
                    tx.insert_record(*key, *meta);
                    inserted.push(*key);
                }
            }
            // A record found by the dedup lookup may have died since: retry
            // (taking back what this attempt stored, which the next one
            // may not get to reference).
            let mut missing = false;
            for (i, k) in keys.iter().enumerate() {
                let Some(k) = k.filter(|_| sets(i)) else {
                    continue;
                };
                if tx.record(&k)?.is_none() {
                    missing = true;
                    break;
                }
            }
            if missing {
                tx.remove_unreferenced(&inserted);
                continue;
            }
            let were_mapped = match &skip {
                None => tx.set_blocks(self.v.id, lba0, &keys)?,
                Some(skip) => {
                    // Each run of blocks still this write's.
                    let (mut i, mut were_mapped) = (0, 0);
                    while i < n {
                        if skip[i] {
                            i += 1;
                            continue;
                        }
                        let run = skip[i..].iter().take_while(|s| !**s).count();
                        were_mapped +=
                            tx.set_blocks(self.v.id, lba0 + i as u64, &keys[i..i + run])?;
                        i += run;
                    }
                    were_mapped
                }
            };
            if late.is_none() {
                st.late.supersede(self.v.id, lba0, lba0 + n as u64);
            }
            let backlog = Backlog {
                entries: st.cur.entries(),
                images,
            };
            drop(st);
            drop(holds);
            if data.len() > CACHE_WRITES_UP_TO
                && (were_mapped > 0 || !self.inner.read_cache.has_room(data.len() as u64))
            {
                return Ok(backlog);
            }
            // A one-block write caches its own buffer; blocks of a longer
            // one are copied out, because a slice would keep the whole
            // request buffer alive for as long as any of its blocks stays
            // cached, far beyond what the cache counts against its budget.
            // Blocks a later write took over are left out: their records were
            // never installed, so no commit would drop them from the cache.
            if let ([Some(k)], None) = (&keys[..], &skip) {
                self.inner.read_cache.admit(*k, data.clone());
            } else {
                let blocks: Vec<(usize, BlockKey, usize)> = keys
                    .iter()
                    .enumerate()
                    .filter_map(|(i, k)| Some((i, k.filter(|_| sets(i))?, i)))
                    .collect();
                self.cache_copies(lba0, &blocks, data, Admit::IfRoom);
            }
            return Ok(backlog);
        }
        Err(EngineError::FailedPrecondition(
            "write kept racing with concurrent overwrites of the same content; retry it".into(),
        ))
    }

    /// Read `len` bytes at `offset`; holes read as zeros.
    pub fn read(&self, offset: u64, len: u32) -> EngineFuture<ReadData> {
        let this = self.clone();
        Box::pin(async move {
            let r = this.read_inner(offset, len as u64).await?;
            Ok(ReadData {
                data: concat(r.parts),
                extents: r.extents,
            })
        })
    }

    /// Like [`Volume::read`], but the bytes come in pieces: cached blocks
    /// are handed out as they are (one piece per stretch of blocks that lie
    /// one after another in one cached buffer) and holes as shared zeros, so
    /// a server can send them with vectored I/O instead of copying them into
    /// one buffer first (a third of ballastd's CPU on 1 MiB reads).
    pub fn read_parts(&self, offset: u64, len: u32) -> EngineFuture<ReadParts> {
        let this = self.clone();
        Box::pin(async move { this.read_inner(offset, len as u64).await })
    }

    async fn read_inner(&self, offset: u64, len: u64) -> Result<ReadParts> {
        self.check_live()?;
        self.check_range(offset, len)?;
        check_io_len(len, "read")?;
        if len == 0 {
            return Ok(ReadParts {
                parts: Vec::new(),
                extents: Vec::new(),
            });
        }
        let bs = self.v.block_size as u64;
        let first = offset / bs;
        let end = (offset + len).div_ceil(bs);
        // The buffer before the engine (see `block_status`).
        let buffered = self.buffered(first, end);
        let (mut parts, runs) = if buffered.is_empty() {
            let (keys, parts) = self.stored_blocks(first, end).await?;
            (parts, keys.iter().map(|k| (1, k.is_none())).collect())
        } else {
            self.overlay_blocks(first, end, buffered).await?
        };
        let mut extents = Vec::new();
        let mut b = first;
        for (n, hole) in runs {
            let lo = (b * bs).max(offset);
            let hi = ((b + n) * bs).min(offset + len);
            push_extent(&mut extents, hi - lo, hole);
            b += n;
        }
        let skip = (offset - first * bs) as usize;
        let tail = (end * bs - (offset + len)) as usize;
        if let Some(p) = parts.first_mut() {
            *p = p.slice(skip..);
        }
        if let Some(p) = parts.last_mut() {
            *p = p.slice(..p.len() - tail);
        }
        Ok(ReadParts { parts, extents })
    }

    /// The write-back buffer's runs within blocks `[first, end)`.
    fn buffered(&self, first: u64, end: u64) -> Vec<crate::write_back::Run> {
        match &self.inner.write_back {
            Some(wb) => wb.lookup(self.v.id, first, end),
            None => Vec::new(),
        }
    }

    /// Blocks `[first, end)` from the buffered runs `buffered` and, between
    /// them, the engine: the pieces, and `(blocks, hole)` runs saying which
    /// read as holes.
    async fn overlay_blocks(
        &self,
        first: u64,
        end: u64,
        buffered: Vec<crate::write_back::Run>,
    ) -> Result<(Vec<Bytes>, Vec<(u64, bool)>)> {
        let bs = self.v.block_size as u64;
        let mut parts = Vec::new();
        let mut runs = Vec::new();
        let mut buffered = buffered.into_iter().peekable();
        let mut b = first;
        while b < end {
            let gap_end = match buffered.peek() {
                Some(r) if r.first == b => {
                    let r = buffered.next().expect("peeked");
                    let n = r.end - r.first;
                    runs.push((n, r.data.is_none()));
                    match r.data {
                        Some(d) => parts.push(d),
                        None => {
                            let mut left = (n * bs) as usize;
                            while left > 0 {
                                let k = left.min(ZEROS.len());
                                parts.push(Bytes::from_static(&ZEROS[..k]));
                                left -= k;
                            }
                        }
                    }
                    b = r.end;
                    continue;
                }
                Some(r) => r.first,
                None => end,
            };
            let (keys, p) = self.stored_blocks(b, gap_end).await?;
            parts.extend(p);
            runs.extend(keys.iter().map(|k| (1, k.is_none())));
            b = gap_end;
        }
        Ok((parts, runs))
    }

    /// Blocks `[first, end)` as the engine stores them: their keys and the
    /// blocks' bytes in pieces (see `load_blocks`).
    async fn stored_blocks(
        &self,
        first: u64,
        end: u64,
    ) -> Result<(Vec<Option<BlockKey>>, Vec<Bytes>)> {
        let mut attempt = 0;
        loop {
            let keys = self.resolve_keys(first, end - first)?;
            match self.load_blocks(first, &keys).await {
                Ok(parts) => return Ok((keys, parts)),
                // A block overwritten (or trimmed) between looking its key
                // up and its record: the old record may be gone from the
                // index, or its segment freed and reused. If the mappings
                // moved on, read them again; the failure stands otherwise.
                Err(e @ (EngineError::CorruptMeta(_) | EngineError::Checksum { .. }))
                    if attempt < 3 =>
                {
                    if self.resolve_keys(first, end - first)? == keys {
                        return Err(e);
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The bytes of blocks `[lba0, lba0 + keys.len())` in pieces (see
    /// `merge_pieces`): cached blocks, shared zeros for holes, and the rest
    /// read (from segment images still in memory or from the disks) into
    /// one buffer, then cached. Blocks of a run whose other blocks mostly
    /// left the cache are re-cached alone, and aligned windows of blocks
    /// each cached alone are gathered into runs (see `gather_runs`).
    async fn load_blocks(&self, lba0: u64, keys: &[Option<BlockKey>]) -> Result<Vec<Bytes>> {
        let bs = self.v.block_size as usize;
        let cache = &self.inner.read_cache;
        // Where each mapped block's bytes are; holes stay `None`.
        let mut found: Vec<Option<Located>> = vec![None; keys.len()];
        self.whole_runs(lba0, keys, &mut found);
        let (at, mapped): (Vec<usize>, Vec<BlockKey>) = keys
            .iter()
            .enumerate()
            .filter(|(i, _)| found[*i].is_none())
            .filter_map(|(i, k)| k.map(|k| (i, k)))
            .unzip();
        let mut recache = Vec::new();
        cache.get_many(&mapped, |j, h| {
            if h.len as usize != bs {
                return;
            }
            if h.kind == HitKind::SparseRun {
                let b = &h.buf[h.at as usize..h.at as usize + bs];
                recache.push((mapped[j], Bytes::copy_from_slice(b)));
            }
            found[at[j]] = Some(Located {
                cached_alone: h.kind == HitKind::Alone,
                buf: h.buf,
                at: h.at,
            });
        });
        if !recache.is_empty() {
            cache.insert_many(recache);
        }
        let missing: Vec<(usize, BlockKey)> = at
            .iter()
            .zip(&mapped)
            .filter(|(&i, _)| found[i].is_none())
            .map(|(&i, &k)| (i, k))
            .collect();
        if !missing.is_empty() {
            let mut buf = BytesMut::zeroed(missing.len() * bs);
            self.read_missing(lba0, &missing, &mut buf).await?;
            let buf = buf.freeze();
            let loaded: Vec<(usize, BlockKey, usize)> = missing
                .iter()
                .enumerate()
                .map(|(j, &(i, k))| (i, k, j))
                .collect();
            self.cache_copies(lba0, &loaded, &buf, Admit::Always);
            for (j, (i, _)) in missing.iter().enumerate() {
                serve_from(&mut found[*i..*i + 1], &buf, j, bs);
            }
        }
        if keys.len() as u64 >= RUN_BLOCKS && cache.runs_welcome() {
            self.gather_runs(lba0, keys, &mut found);
        }
        Ok(merge_pieces(&found, bs))
    }

    /// Fills `found` for each aligned window of [`RUN_BLOCKS`] mapped blocks
    /// that the read cache holds as one whole run (see
    /// `ReadCache::get_runs`).
    fn whole_runs(&self, lba0: u64, keys: &[Option<BlockKey>], found: &mut [Option<Located>]) {
        let w = RUN_BLOCKS as usize;
        let bs = self.v.block_size as usize;
        let mut starts = Vec::new();
        // The windows' keys one after another, `w` per window.
        let mut flat: Vec<BlockKey> = Vec::with_capacity(keys.len());
        for win in aligned_windows(lba0, keys.len()) {
            if keys[win.clone()].iter().all(Option::is_some) {
                starts.push(win.start);
                flat.extend(keys[win].iter().flatten());
            }
        }
        if starts.is_empty() {
            return;
        }
        let refs: Vec<&[BlockKey]> = flat.chunks(w).collect();
        self.inner.read_cache.get_runs(&refs, bs, |i, buf| {
            serve_from(&mut found[starts[i]..starts[i] + w], &buf, 0, bs);
        });
    }

    /// Caches copies of blocks: `blocks` lists `(i, key, slot)` in
    /// ascending `i`, block `lba0 + i` being `src[slot * bs..]`. Each aligned
    /// window of [`RUN_BLOCKS`] blocks that are all listed and lie one after
    /// another in `src` becomes one run; the others get a buffer each.
    /// Copies: a slice would keep all of `src` alive for as long as any one
    /// of its blocks stays cached.
    fn cache_copies(&self, lba0: u64, blocks: &[(usize, BlockKey, usize)], src: &[u8], how: Admit) {
        let bs = self.v.block_size as usize;
        let cache = &self.inner.read_cache;
        let runs = cache.runs_welcome();
        let w = RUN_BLOCKS as usize;
        let mut alone = Vec::new();
        let mut j = 0;
        while j < blocks.len() {
            let (i, key, slot) = blocks[j];
            let whole = runs
                && (lba0 + i as u64).is_multiple_of(RUN_BLOCKS)
                && blocks
                    .get(j + w - 1)
                    .is_some_and(|&(li, _, ls)| li == i + w - 1 && ls == slot + w - 1);
            if whole {
                let keys: Vec<BlockKey> = blocks[j..j + w].iter().map(|b| b.1).collect();
                let run = Bytes::copy_from_slice(&src[slot * bs..(slot + w) * bs]);
                cache.insert_run(&keys, run, bs, how);
                j += w;
            } else {
                alone.push((
                    key,
                    Bytes::copy_from_slice(&src[slot * bs..(slot + 1) * bs]),
                ));
                j += 1;
            }
        }
        match how {
            Admit::Always => cache.insert_many(alone),
            Admit::IfRoom => cache.admit_many(alone),
        }
    }

    /// Re-caches each window of [`RUN_BLOCKS`] blocks (aligned on the
    /// volume's block numbers) whose blocks are all cached each in a buffer
    /// of its own as one run, and serves them from it: a later read of them
    /// is one contiguous piece, not one scattered piece per block.
    fn gather_runs(&self, lba0: u64, keys: &[Option<BlockKey>], found: &mut [Option<Located>]) {
        let bs = self.v.block_size as usize;
        for win in aligned_windows(lba0, keys.len()) {
            if !found[win.clone()]
                .iter()
                .all(|f| f.as_ref().is_some_and(|l| l.cached_alone))
            {
                continue;
            }
            let mut run = BytesMut::with_capacity(win.len() * bs);
            for f in &found[win.clone()] {
                let l = f.as_ref().expect("checked above");
                run.extend_from_slice(&l.buf[l.at as usize..l.at as usize + bs]);
            }
            let run = run.freeze();
            let ks: Vec<BlockKey> = keys[win.clone()]
                .iter()
                .map(|k| k.expect("cached"))
                .collect();
            self.inner
                .read_cache
                .insert_run(&ks, run.clone(), bs, Admit::Always);
            serve_from(&mut found[win], &run, 0, bs);
        }
    }

    /// Read the blocks `missing` names (index from `lba0`, key) into
    /// consecutive block-sized slots of `buf`.
    async fn read_missing(
        &self,
        lba0: u64,
        missing: &[(usize, BlockKey)],
        buf: &mut [u8],
    ) -> Result<()> {
        let bs = self.v.block_size as usize;
        for _attempt in 0..3 {
            let metas = self.inner.resolve_records(missing.iter().map(|(_, k)| k))?;
            let mut wanted = Vec::with_capacity(missing.len());
            for (j, (i, k)) in missing.iter().enumerate() {
                let m = metas.get(k).copied().flatten().ok_or_else(|| {
                    EngineError::CorruptMeta(format!(
                        "volume \"{}\" block {} maps to a record the index does not hold",
                        self.v.name,
                        lba0 + *i as u64
                    ))
                })?;
                wanted.push((*k, m, j * bs));
            }
            match self.inner.read_records(&wanted, buf, &self.v.name).await {
                Err(ReadFault::Moved) => continue,
                Err(ReadFault::Engine(EngineError::Checksum { volume, offset })) => {
                    // `offset` is the slot in `buf`: name the volume block.
                    let i = missing[offset as usize / bs].0 as u64;
                    return Err(EngineError::Checksum {
                        volume,
                        offset: (lba0 + i) * bs as u64,
                    });
                }
                Err(ReadFault::Engine(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
        Err(EngineError::FailedPrecondition(
            "records kept moving during the read (cleaner); retry it".into(),
        ))
    }

    /// Block keys of `[lba, lba+n)`, overlays first, then the store.
    fn resolve_keys(&self, lba: u64, n: u64) -> Result<Vec<Option<BlockKey>>> {
        let mut out: Vec<Option<BlockKey>> = vec![None; n as usize];
        let mut unknown: Vec<usize> = Vec::new();
        {
            let st = self.inner.state.lock();
            for (i, slot) in out.iter_mut().enumerate() {
                let k = (self.v.id, lba + i as u64);
                if let Some(v) = st.cur.blocks.get(&k) {
                    *slot = *v;
                } else if let Some(v) = st.committing.as_ref().and_then(|c| c.blocks.get(&k)) {
                    *slot = *v;
                } else {
                    unknown.push(i);
                }
            }
        }
        // Readers never fill the entry cache: they left the state lock.
        self.inner
            .meta
            .committed_blocks(self.v.id, lba, unknown, &mut out, CacheFill::Never)?;
        Ok(out)
    }

    /// Unmap `[offset, offset+len)`: trim and write-zeroes (zeros are holes).
    /// With write-back on, buffered as zeros like any write.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> EngineFuture<()> {
        let Some(wb) = &self.inner.write_back else {
            return self.trim_direct(offset, len, fua);
        };
        if let Err(e) = self.check_write(offset, len) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let bs = self.v.block_size as u64;
        let first_full = offset.div_ceil(bs);
        let end_full = (offset + len) / bs;
        let seq = if first_full < end_full {
            let seq = wb.insert(
                &self.v,
                first_full,
                Change::Zeros(end_full - first_full),
                None,
            );
            // Landed promptly: an unmap frees space the pool may need, and
            // who trims expects the volume's usage to drop (fstrim), while
            // it costs no hashing. Writes before it land first.
            wb.drain_soon();
            seq
        } else {
            0
        };
        let edges: Vec<((u64, u64), PartialGuard)> = edge_ranges(offset, len, bs)
            .into_iter()
            .map(|(a, b)| ((a, b), self.register_partial(a / bs, b.div_ceil(bs))))
            .collect();
        if edges.is_empty() {
            return self.complete_buffered(seq, fua);
        }
        let this = self.clone();
        Box::pin(async move {
            let rmw = this.v.rmw.lock().await;
            let mut last = seq;
            for ((a, b), partial) in edges {
                let zeros = vec![0u8; (b - a) as usize];
                let merged = this.merge_partial(&rmw, a, &zeros).await?;
                last = last.max(partial.insert(merged));
            }
            drop(rmw);
            this.finish_buffered(last, fua).await
        })
    }

    /// The unmap path without the write-back buffer.
    pub(crate) fn trim_direct(&self, offset: u64, len: u64, fua: bool) -> EngineFuture<()> {
        if let Err(e) = self.check_write(offset, len) {
            return Box::pin(std::future::ready(Err(e)));
        }
        let bs = self.v.block_size as u64;
        let first_full = offset.div_ceil(bs);
        let end_full = (offset + len) / bs;
        let eager = if first_full < end_full {
            self.unmap(first_full, end_full)
        } else {
            Ok(())
        };
        // Partial blocks at either end are zeroed in place, late (see
        // `state::LateWrites`), under one hold of the read-modify-write lock.
        let edges: Vec<((u64, u64), LateGuard)> = edge_ranges(offset, len, bs)
            .into_iter()
            .map(|(a, b)| ((a, b), self.register_late(a / bs, b.div_ceil(bs))))
            .collect();
        let this = self.clone();
        Box::pin(async move {
            eager?;
            if !edges.is_empty() {
                let rmw = this.v.rmw.lock().await;
                for ((a, b), late) in &edges {
                    let zeros = vec![0u8; (b - a) as usize];
                    this.write_unaligned(&rmw, *a, &zeros, late.id).await?;
                }
            }
            drop(edges);
            this.finish_write(fua).await
        })
    }

    /// NBD WRITE_ZEROES: identical to trim, since zero blocks are never stored.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> EngineFuture<()> {
        self.trim(offset, len, fua)
    }

    fn unmap(&self, first: u64, end: u64) -> Result<()> {
        let mut lba = first;
        while lba < end {
            let chunk_end = (lba + UNMAP_CHUNK).min(end);
            let mut st = self.inner.state.lock();
            self.check_live()?; // see `write_blocks`
            let mut tx = Txn {
                st: &mut st,
                meta: &self.inner.meta,
            };
            if chunk_end - lba > 256 {
                for (l, _) in tx.mapped_range(self.v.id, lba, chunk_end)? {
                    tx.set_block(self.v.id, l, None)?;
                }
            } else {
                for l in lba..chunk_end {
                    tx.set_block(self.v.id, l, None)?;
                }
            }
            tx.st.late.supersede(self.v.id, lba, chunk_end);
            lba = chunk_end;
        }
        Ok(())
    }

    /// Makes every write completed before this call durable, on every
    /// volume of the node (buffered ones land first).
    pub fn flush(&self) -> EngineFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner.land_buffered().await?;
            inner.flush().await
        })
    }

    /// Allocation map of `[offset, offset+len)`; may describe less than asked
    /// (at most 1 Mi blocks), never more.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_live()?;
        self.check_range(offset, len)?;
        let bs = self.v.block_size as u64;
        let first = offset / bs;
        let end = (offset + len).div_ceil(bs).min(first + (1 << 20));
        // The buffer before the engine: a write that leaves the buffer has
        // landed before it left (see `write_back`).
        let buffered = self.buffered(first, end);
        let keys = self.resolve_keys(first, end - first)?;
        let mut hole: Vec<bool> = keys.iter().map(Option::is_none).collect();
        for r in &buffered {
            hole[(r.first - first) as usize..(r.end - first) as usize].fill(r.data.is_none());
        }
        let mut ext = Vec::new();
        for (i, h) in hole.into_iter().enumerate() {
            let b = (first + i as u64) * bs;
            let lo = b.max(offset);
            let hi = (b + bs).min(offset + len);
            push_extent(&mut ext, hi - lo, h);
        }
        Ok(ext)
    }

    // ---- replication support ------------------------------------------------

    /// Content hashes of `count` blocks from `lba` (`None` = hole).
    pub fn block_hashes(&self, lba: u64, count: u64) -> Result<Vec<Option<[u8; 32]>>> {
        let bs = self.v.block_size as u64;
        // Saturated, an overflowing range still lies past the end.
        self.check_range(lba.saturating_mul(bs), count.saturating_mul(bs))?;
        if count > 1 << 20 {
            return Err(EngineError::InvalidArgument(format!(
                "hashes of {count} blocks asked at once; ask for at most 1 Mi per call"
            )));
        }
        Ok(self
            .resolve_keys(lba, count)?
            .into_iter()
            .map(|k| k.map(|k| k.hash))
            .collect())
    }

    /// One blake3 digest per `region_bytes` of the volume over its blocks'
    /// content hashes (zeros for holes): two copies differ in a region iff
    /// (barring collisions) its digests differ.
    pub fn region_digests(&self, region_bytes: u64) -> Result<Vec<[u8; 32]>> {
        let bs = self.v.block_size as u64;
        if region_bytes == 0 || !region_bytes.is_multiple_of(bs) {
            return Err(EngineError::InvalidArgument(format!(
                "region size {region_bytes} must be a positive multiple of the block size {bs}"
            )));
        }
        let blocks = self.size() / bs;
        let per = region_bytes / bs;
        let mut out = Vec::new();
        let mut lba = 0;
        while lba < blocks {
            let n = per.min(blocks - lba);
            let mut h = blake3::Hasher::new();
            for k in self.resolve_keys(lba, n)? {
                h.update(&k.map_or([0u8; 32], |k| k.hash));
            }
            out.push(h.finalize().into());
            lba += n;
        }
        Ok(out)
    }

    /// Map block `lba` to content this node already stores under `hash`
    /// ("store this block under H" without sending it). Returns false when
    /// the node does not hold `hash`; the caller then sends the data.
    pub fn write_by_hash(&self, lba: u64, hash: &[u8; 32]) -> Result<bool> {
        let bs = self.v.block_size as u64;
        self.check_write(lba.saturating_mul(bs), bs)?;
        if !self.v.dedup {
            return Ok(false);
        }
        if !self.buffered(lba, lba + 1).is_empty() {
            // Mapped here, it would be undone when the buffered write lands.
            return Err(EngineError::FailedPrecondition(format!(
                "block {lba} of volume \"{}\" has a buffered write: flush the volume first",
                self.v.name
            )));
        }
        let key = BlockKey::content(*hash);
        let mut st = self.inner.state.lock();
        self.check_live()?; // see `write_blocks`
        let mut tx = Txn {
            st: &mut st,
            meta: &self.inner.meta,
        };
        match tx.record(&key)? {
            Some(m) if m.raw_len as u64 == bs => {
                tx.set_block(self.v.id, lba, Some(key))?;
                tx.st.late.supersede(self.v.id, lba, lba + 1);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// A registered late write (see `state::LateWrites`), ended when dropped,
/// however its future ends.
struct LateGuard {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for LateGuard {
    fn drop(&mut self) {
        self.inner.state.lock().late.remove(self.id);
    }
}

/// A registered partial-block write in the write-back buffer, ended when
/// dropped, however its future ends.
struct PartialGuard {
    vol: Volume,
    first: u64,
    seq: u64,
    id: u64,
}

impl PartialGuard {
    /// Buffers the merged blocks (see `WriteBack::insert`); returns the
    /// write's sequence number.
    fn insert(&self, merged: Bytes) -> u64 {
        let wb = self
            .vol
            .inner
            .write_back
            .as_ref()
            .expect("write-back is on");
        wb.insert(
            &self.vol.v,
            self.first,
            Change::Data(merged),
            Some((self.seq, self.id)),
        )
    }
}

impl Drop for PartialGuard {
    fn drop(&mut self) {
        if let Some(wb) = &self.vol.inner.write_back {
            wb.end_partial(self.vol.v.id, self.id);
        }
    }
}

/// The partial blocks at either end of `[offset, offset + len)`, as byte
/// ranges.
fn edge_ranges(offset: u64, len: u64, bs: u64) -> Vec<(u64, u64)> {
    let first_full = offset.div_ceil(bs);
    let end_full = (offset + len) / bs;
    let head_end = (first_full * bs).min(offset + len);
    let head = (offset < head_end).then_some((offset, head_end));
    let tail_start = (end_full * bs).max(head_end);
    let tail = (tail_start < offset + len).then_some((tail_start, offset + len));
    [head, tail].into_iter().flatten().collect()
}

fn check_io_len(len: u64, what: &str) -> Result<()> {
    if len > MAX_IO {
        return Err(EngineError::InvalidArgument(format!(
            "{what} of {len} bytes exceeds the {MAX_IO} byte limit"
        )));
    }
    Ok(())
}

pub(crate) enum ReadFault {
    /// A record was relocated while we read it: resolve again.
    Moved,
    Engine(EngineError),
}

impl From<EngineError> for ReadFault {
    fn from(e: EngineError) -> Self {
        ReadFault::Engine(e)
    }
}

impl Inner {
    /// Record metadata for `keys`, overlays first, then the store.
    pub(crate) fn resolve_records<'a>(
        &self,
        keys: impl Iterator<Item = &'a BlockKey>,
    ) -> Result<HashMap<BlockKey, Option<RecordMeta>>> {
        let mut out: HashMap<BlockKey, Option<RecordMeta>> = HashMap::new();
        let mut unknown = Vec::new();
        {
            let st = self.state.lock();
            for k in keys {
                if out.contains_key(k) {
                    continue;
                }
                if let Some(v) = st.cur.records.get(k) {
                    out.insert(*k, *v);
                } else if let Some(v) = st.committing.as_ref().and_then(|c| c.records.get(k)) {
                    out.insert(*k, *v);
                } else {
                    out.insert(*k, None);
                    unknown.push(*k);
                }
            }
        }
        for k in unknown {
            out.insert(k, self.meta.record(&k)?);
        }
        Ok(out)
    }

    /// What a record that failed its check at `m` means: `Moved` if the
    /// index no longer points there (the cleaner moved it, or it died with
    /// an overwrite, and its segment may have been reused), else a checksum
    /// error, counted.
    fn record_fault(
        &self,
        k: &BlockKey,
        m: &RecordMeta,
        slot: usize,
        volume: &str,
        what: &str,
    ) -> std::result::Result<ReadFault, ReadFault> {
        let now = self.resolve_records(std::iter::once(k))?;
        if now
            .get(k)
            .copied()
            .flatten()
            .is_none_or(|n| n.segment != m.segment || n.offset != m.offset)
        {
            return Ok(ReadFault::Moved);
        }
        self.checksum_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume, segment = ?m.segment, offset = m.offset, fault = what, "stored record failed its check");
        Ok(ReadFault::Engine(EngineError::Checksum {
            volume: volume.into(),
            offset: slot as u64,
        }))
    }

    /// Fetch and verify records into `out` at the given offsets.
    pub(crate) async fn read_records(
        &self,
        wanted: &[(BlockKey, RecordMeta, usize)],
        out: &mut [u8],
        volume: &str,
    ) -> std::result::Result<(), ReadFault> {
        // Group destinations by record location.
        let mut by_loc: HashMap<(crate::key::SegmentId, u32), (BlockKey, RecordMeta, Vec<usize>)> =
            HashMap::new();
        for (k, m, dst) in wanted {
            // A damaged index entry must fail the read, not index past `out`.
            if dst
                .checked_add(m.raw_len as usize)
                .is_none_or(|end| end > out.len())
            {
                return Err(EngineError::CorruptMeta(format!(
                    "record {} claims {} raw bytes, more than the block it fills",
                    crate::state::hex(&k.hash),
                    m.raw_len
                ))
                .into());
            }
            by_loc
                .entry((m.segment, m.offset))
                .or_insert_with(|| (*k, *m, Vec::new()))
                .2
                .push(*dst);
        }
        let mut on_disk: Vec<(BlockKey, RecordMeta, Vec<usize>)> = Vec::new();
        let mut suspect: Option<(BlockKey, RecordMeta, usize)> = None;
        {
            let w = self.writer.lock();
            let mut tmp = Vec::new();
            for (_, (k, m, dsts)) in by_loc {
                tmp.resize(m.footprint() as usize, 0);
                if w.copy_out(m.segment, m.offset as usize, &mut tmp) {
                    let raw = m.raw_len as usize;
                    let (first, rest) = dsts.split_first().expect("at least one destination");
                    if record::decode(&tmp, &k, &mut out[*first..*first + raw]).is_err() {
                        // Checked below, without the writer lock.
                        suspect = Some((k, m, *first));
                        break;
                    }
                    for d in rest {
                        out.copy_within(*first..*first + raw, *d);
                    }
                } else {
                    on_disk.push((k, m, dsts));
                }
            }
        }
        if let Some((k, m, first)) = suspect {
            return Err(self.record_fault(&k, &m, first, volume, "in memory")?);
        }
        if on_disk.is_empty() {
            return Ok(());
        }
        on_disk.sort_by_key(|(_, m, _)| (m.segment, m.offset));
        // Coalesce nearby records of one segment into one aligned read.
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for i in 0..on_disk.len() {
            let m = &on_disk[i].1;
            match runs.last_mut() {
                Some(r) => {
                    let prev = &on_disk[r.end - 1].1;
                    let prev_end = prev.offset as u64 + prev.footprint();
                    let start = on_disk[r.start].1.offset as u64;
                    if prev.segment == m.segment
                        && (m.offset as u64) <= prev_end + COALESCE_GAP
                        && m.offset as u64 + m.footprint() - start <= 4 << 20
                    {
                        r.end = i + 1;
                    } else {
                        runs.push(i..i + 1);
                    }
                }
                None => runs.push(i..i + 1),
            }
        }
        let seg_size = self.space.lock().segment_size;
        let disks = self.disks.read().clone();
        let reads = runs.iter().map(|r| {
            let first = &on_disk[r.start].1;
            let last = &on_disk[r.end - 1].1;
            let disk = disks.iter().find(|d| d.id == first.segment.disk).cloned();
            // Only the sectors the records occupy: a 2 KiB record costs a
            // 2.5 KiB read, not one or two whole pages.
            let align = disk.as_ref().map_or(IO_ALIGN, |d| d.io.read_align()) as u64;
            let start = first.offset as u64 / align * align;
            let end = (last.offset as u64 + last.footprint()).div_ceil(align) * align;
            let seg = first.segment;
            async move {
                let disk = disk.ok_or_else(|| {
                    EngineError::CorruptMeta(format!("record on unknown disk {}", seg.disk))
                })?;
                let at = disk.segment_offset(seg.index, seg_size) + start;
                let (buf, r) = disk
                    .io
                    .read_at(AlignedBuf::recycled((end - start) as usize), at)
                    .await;
                r.map_err(|e| EngineError::io(format!("reading {}", disk.path.display()), e))?;
                Ok::<_, EngineError>((start, buf))
            }
        });
        let results = futures::future::join_all(reads).await;
        for (r, res) in runs.iter().zip(results) {
            let (start, buf) = res?;
            for (k, m, dsts) in &on_disk[r.clone()] {
                let rel = (m.offset as u64 - start) as usize;
                let raw = m.raw_len as usize;
                let (first, rest) = dsts.split_first().expect("at least one destination");
                if let Err(fault) = record::decode(&buf[rel..], k, &mut out[*first..*first + raw]) {
                    return Err(self.record_fault(k, m, *first, volume, &format!("{fault:?}"))?);
                }
                for d in rest {
                    out.copy_within(*first..*first + raw, *d);
                }
            }
        }
        Ok(())
    }
}
