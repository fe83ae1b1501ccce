//! An in-memory, sparse [`Export`] and [`ExportCatalog`], for tests and
//! demos. Unwritten 64 KiB chunks are holes (read as zeros, reported as
//! `hole|zero`).
//!
//! It honours the ordering contract of [`crate::nbd::export`] trivially: every
//! effect is applied inside the method call, before the future is returned.
//! An optional artificial latency (applied *after* the effect) makes replies
//! complete out of order, which tests use to exercise pipelining.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;

use super::export::{Export, ExportCatalog, ExportError, ExportFuture, Extent, Payload};

const CHUNK: u64 = 64 * 1024;

pub struct MemoryExport {
    size: u64,
    block_size: u32,
    read_only: bool,
    description: String,
    chunks: RwLock<HashMap<u64, Box<[u8]>>>,
    latency: Option<(Duration, Duration)>,
    rng: AtomicU64,
    fail: Mutex<Option<ExportError>>,
    flushes: AtomicU64,
    fua_ops: AtomicU64,
    writes: AtomicU64,
    reads: AtomicU64,
}

impl MemoryExport {
    pub fn new(size: u64) -> MemoryExport {
        MemoryExport::with_block_size(size, 4096)
    }

    pub fn with_block_size(size: u64, block_size: u32) -> MemoryExport {
        MemoryExport {
            size,
            block_size,
            read_only: false,
            description: format!("in-memory export of {size} bytes"),
            chunks: RwLock::new(HashMap::new()),
            latency: None,
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            fail: Mutex::new(None),
            flushes: AtomicU64::new(0),
            fua_ops: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            reads: AtomicU64::new(0),
        }
    }

    pub fn read_only(mut self, ro: bool) -> MemoryExport {
        self.read_only = ro;
        self
    }

    pub fn description(mut self, d: impl Into<String>) -> MemoryExport {
        self.description = d.into();
        self
    }

    /// Every operation completes after a random delay in `min..=max`
    /// (its effect is still applied at call time).
    pub fn latency(mut self, min: Duration, max: Duration) -> MemoryExport {
        self.latency = Some((min, max.max(min)));
        self
    }

    /// Makes every later operation fail with `err` (or succeed again with
    /// `None`).
    pub fn set_failure(&self, err: Option<ExportError>) {
        *self.fail.lock().expect("lock") = err;
    }

    /// Number of `flush` calls so far.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Number of write-type calls made with `fua`.
    pub fn fua_count(&self) -> u64 {
        self.fua_ops.load(Ordering::SeqCst)
    }

    /// Number of `write` calls applied.
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Number of `read`/`read_extents` calls so far.
    pub fn read_count(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Bytes currently allocated (not holes), in chunk units.
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.read().expect("lock").len() as u64 * CHUNK
    }

    /// Synchronous read, for tests.
    pub fn read_now(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        let map = self.chunks.read().expect("lock");
        let mut pos = 0usize;
        while pos < len {
            let abs = offset + pos as u64;
            let idx = abs / CHUNK;
            let within = (abs % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(len - pos);
            if let Some(c) = map.get(&idx) {
                out[pos..pos + n].copy_from_slice(&c[within..within + n]);
            }
            pos += n;
        }
        out
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        if let Some(e) = self.fail.lock().expect("lock").clone() {
            return Err(e);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(ExportError::Invalid(format!(
                "range {offset}+{len} past the end"
            ))),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.check(offset, len).map_err(|e| match e {
            ExportError::Invalid(_) => ExportError::NoSpace,
            e => e,
        })
    }

    fn delay(&self) -> Option<Duration> {
        let (min, max) = self.latency?;
        // xorshift64*, racy but fine for jitter.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.store(x, Ordering::Relaxed);
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let span = (max - min).as_micros() as u64;
        Some(min + Duration::from_micros(if span == 0 { 0 } else { r % (span + 1) }))
    }

    fn done<T: Send + 'static>(&self, r: Result<T, ExportError>) -> ExportFuture<T> {
        match self.delay() {
            None => Box::pin(std::future::ready(r)),
            Some(d) => Box::pin(async move {
                tokio::time::sleep(d).await;
                r
            }),
        }
    }

    /// Zeroes or deallocates `offset..offset+len`; whole chunks become holes
    /// unless `keep_allocated`.
    fn zero_range(&self, offset: u64, len: u64, keep_allocated: bool) {
        let mut map = self.chunks.write().expect("lock");
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let idx = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK - within as u64).min(end - pos) as usize;
            if n as u64 == CHUNK && !keep_allocated {
                map.remove(&idx);
            } else if let Some(c) = map.get_mut(&idx) {
                c[within..within + n].fill(0);
            } else if keep_allocated {
                map.insert(idx, vec![0u8; CHUNK as usize].into_boxed_slice());
            }
            pos += n as u64;
        }
    }

    fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let map = self.chunks.read().expect("lock");
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let n = (CHUNK - pos % CHUNK).min(end - pos);
            let hole = !map.contains_key(&(pos / CHUNK));
            match out.last_mut() {
                Some(last) if last.hole == hole => last.len += n,
                _ => out.push(Extent {
                    len: n,
                    hole,
                    zero: hole,
                }),
            }
            pos += n;
        }
        out
    }
}

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn description(&self) -> String {
        self.description.clone()
    }

    fn read(&self, offset: u64, len: u32) -> ExportFuture<Bytes> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let r = self
            .check(offset, len as u64)
            .map(|_| Bytes::from(self.read_now(offset, len as usize)));
        self.done(r)
    }

    fn read_extents(&self, offset: u64, len: u32) -> ExportFuture<(Payload, Vec<Extent>)> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let r = self.check(offset, len as u64).map(|_| {
            let ext = self.extents(offset, len as u64);
            (Bytes::from(self.read_now(offset, len as usize)).into(), ext)
        });
        self.done(r)
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> ExportFuture<()> {
        let r = self.check_write(offset, data.len() as u64).map(|_| {
            let mut map = self.chunks.write().expect("lock");
            let mut pos = 0usize;
            while pos < data.len() {
                let abs = offset + pos as u64;
                let within = (abs % CHUNK) as usize;
                let n = (CHUNK as usize - within).min(data.len() - pos);
                let c = map
                    .entry(abs / CHUNK)
                    .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
                c[within..within + n].copy_from_slice(&data[pos..pos + n]);
                pos += n;
            }
            self.writes.fetch_add(1, Ordering::SeqCst);
            if fua {
                self.fua_ops.fetch_add(1, Ordering::SeqCst);
            }
        });
        self.done(r)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportFuture<()> {
        let r = self.check_write(offset, len).map(|_| {
            self.zero_range(offset, len, false);
            if fua {
                self.fua_ops.fetch_add(1, Ordering::SeqCst);
            }
        });
        self.done(r)
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> ExportFuture<()> {
        let r = self.check_write(offset, len).map(|_| {
            self.zero_range(offset, len, no_hole);
            if fua {
                self.fua_ops.fetch_add(1, Ordering::SeqCst);
            }
        });
        self.done(r)
    }

    fn flush(&self) -> ExportFuture<()> {
        let r = match self.fail.lock().expect("lock").clone() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.done(r)
    }

    fn block_status(&self, offset: u64, len: u64) -> ExportFuture<Vec<Extent>> {
        // Cap one answer at 4 GiB of address space; the client asks again.
        let r = self
            .check(offset, len)
            .map(|_| self.extents(offset, len.min(4 << 30)));
        self.done(r)
    }

    fn cache(&self, offset: u64, len: u64) -> ExportFuture<()> {
        let r = self.check(offset, len);
        self.done(r)
    }
}

/// A named set of [`MemoryExport`]s.
#[derive(Default)]
pub struct MemoryCatalog {
    exports: RwLock<Vec<(String, Arc<MemoryExport>)>>,
    default: RwLock<Option<String>>,
}

impl MemoryCatalog {
    pub fn new() -> MemoryCatalog {
        MemoryCatalog::default()
    }

    /// Adds (or replaces) an export and returns a handle to inspect it.
    pub fn add(&self, name: &str, export: impl Into<Arc<MemoryExport>>) -> Arc<MemoryExport> {
        let export = export.into();
        let mut v = self.exports.write().expect("lock");
        v.retain(|(n, _)| n != name);
        v.push((name.to_string(), export.clone()));
        export
    }

    /// Makes `""` open the export `name`.
    pub fn set_default(&self, name: Option<&str>) {
        *self.default.write().expect("lock") = name.map(str::to_string);
    }

    pub fn get(&self, name: &str) -> Option<Arc<MemoryExport>> {
        let name = if name.is_empty() {
            self.default.read().expect("lock").clone()?
        } else {
            name.to_string()
        };
        self.exports
            .read()
            .expect("lock")
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, e)| e.clone())
    }
}

impl ExportCatalog for MemoryCatalog {
    fn list(&self) -> Vec<(String, String)> {
        self.exports
            .read()
            .expect("lock")
            .iter()
            .map(|(n, e)| (n.clone(), e.description.clone()))
            .collect()
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.get(name).map(|e| e as Arc<dyn Export>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now<T>(f: ExportFuture<T>) -> Result<T, ExportError> {
        futures_util::FutureExt::now_or_never(f).expect("ready")
    }

    #[test]
    fn sparse_semantics() {
        let e = MemoryExport::new(1 << 20);
        assert_eq!(
            now(e.block_status(0, 1 << 20)).unwrap(),
            vec![Extent::hole(1 << 20)]
        );
        now(e.write(100_000, Bytes::from(vec![7u8; 10]), true)).unwrap();
        assert_eq!(e.fua_count(), 1);
        assert_eq!(
            &now(e.read(99_999, 12)).unwrap()[..],
            &[0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]
        );
        let ext = now(e.block_status(0, 1 << 20)).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent::hole(65536),
                Extent::data(65536),
                Extent::hole((1 << 20) - 131072)
            ]
        );
        let (d, ext) = now(e.read_extents(65536 - 512, 1024)).unwrap();
        assert_eq!(d.len(), 1024);
        assert_eq!(ext, vec![Extent::hole(512), Extent::data(512)]);
        // Partial trim zeroes, whole-chunk trim deallocates.
        now(e.trim(100_000, 5, false)).unwrap();
        assert_eq!(&now(e.read(100_000, 6)).unwrap()[..], &[0, 0, 0, 0, 0, 7]);
        now(e.trim(65536, 65536, false)).unwrap();
        assert_eq!(e.allocated_bytes(), 0);
        // NO_HOLE zeroing allocates.
        now(e.write_zeroes(0, 65536, false, true)).unwrap();
        assert_eq!(e.allocated_bytes(), 65536);
        assert!(now(e.read(0, 65536)).unwrap().iter().all(|&b| b == 0));
        // Bounds and read-only.
        assert_eq!(
            now(e.write(1 << 20, Bytes::from_static(b"x"), false)),
            Err(ExportError::NoSpace)
        );
        assert!(matches!(
            now(e.read((1 << 20) - 1, 2)),
            Err(ExportError::Invalid(_))
        ));
        let ro = MemoryExport::new(4096).read_only(true);
        assert_eq!(
            now(ro.write(0, Bytes::from_static(b"x"), false)),
            Err(ExportError::ReadOnly)
        );
    }

    #[test]
    fn catalog_default_export() {
        let c = MemoryCatalog::new();
        c.add("a", MemoryExport::new(4096));
        assert!(c.open("").is_none());
        c.set_default(Some("a"));
        assert_eq!(c.open("").unwrap().size(), 4096);
        assert!(c.open("b").is_none());
        assert_eq!(c.list().len(), 1);
    }
}
