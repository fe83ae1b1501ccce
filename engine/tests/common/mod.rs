//! Shared test support: engines on each backend over temp folders, and
//! crash-simulation disks that survive an engine being dropped.
#![allow(dead_code)]

use ballast_engine::io::{AlignedBuf, BackendChoice, CrashSimDisk, DiskIo, IoEngine};
use ballast_engine::{DiskSpec, Engine, EngineConfig};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Threads,
    /// In-memory disks that can lose unsynced writes.
    Sim,
}

/// Every backend usable on this machine. io_uring is skipped (loudly) only
/// where the kernel or seccomp forbids it.
pub fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Threads, Backend::Sim];
    match IoEngine::new(BackendChoice::Uring) {
        Ok(_) => v.insert(0, Backend::Uring),
        Err(e) => eprintln!("NOTE: io_uring unavailable here ({e}); its runs are skipped"),
    }
    v
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    pub disk_size: u64,
    pub segment_size: u32,
    pub cleaner: bool,
    /// `EngineConfig::block_filter_bytes` (None: the engine's default).
    pub block_filter_bytes: Option<u64>,
    /// `EngineConfig::write_back_bytes` (0: off, the engine's default).
    pub write_back_bytes: u64,
    sims: Arc<Mutex<HashMap<PathBuf, Arc<CrashSimDisk>>>>,
}

impl Harness {
    pub fn new(backend: Backend) -> Harness {
        Harness {
            dir: tempfile::tempdir().expect("temp dir"),
            backend,
            disk_size: 256 << 20,
            segment_size: 1 << 20,
            cleaner: false,
            block_filter_bytes: None,
            write_back_bytes: 0,
            sims: Arc::default(),
        }
    }

    pub fn disk_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("disk{n}.img"))
    }

    pub fn config(&self) -> EngineConfig {
        let mut cfg = EngineConfig::new(self.dir.path().join("data"));
        cfg.disks = vec![DiskSpec {
            path: self.disk_path(0),
            create_size: Some(self.disk_size),
        }];
        cfg.segment_size = self.segment_size;
        cfg.cleaner = self.cleaner;
        cfg.block_filter_bytes = self.block_filter_bytes;
        cfg.write_back_bytes = self.write_back_bytes;
        // Tests decide when commits happen.
        cfg.commit_interval = Duration::from_secs(3600);
        cfg.meta_cache_bytes = 8 << 20;
        match self.backend {
            Backend::Uring => cfg.backend = BackendChoice::Uring,
            Backend::Threads => cfg.backend = BackendChoice::Threads,
            Backend::Sim => {
                let sims = self.sims.clone();
                cfg.disk_opener = Some(Arc::new(move |spec: &DiskSpec| {
                    let mut m = sims.lock();
                    let d = m
                        .entry(spec.path.clone())
                        .or_insert_with(|| CrashSimDisk::new(spec.create_size.unwrap_or(256 << 20)))
                        .clone();
                    Ok(d as Arc<dyn DiskIo>)
                }));
            }
        }
        cfg
    }

    pub async fn open(&self) -> Engine {
        self.open_with(self.config()).await
    }

    pub async fn open_with(&self, cfg: EngineConfig) -> Engine {
        // The previous engine's metadata store may still be closing.
        let mut last = None;
        for _ in 0..50 {
            match Engine::open(cfg.clone()).await {
                Ok(e) => return e,
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        panic!("engine did not open: {}", last.unwrap());
    }

    pub fn sim(&self, n: usize) -> Option<Arc<CrashSimDisk>> {
        let p = std::path::absolute(self.disk_path(n)).unwrap();
        self.sims.lock().get(&p).cloned()
    }

    /// Power loss: the engine stops dead and unsynced disk writes are torn.
    pub async fn crash(&self, engine: Engine, seed: u64) {
        engine.crash().await;
        if self.backend == Backend::Sim {
            for d in self.sims.lock().values() {
                d.crash(seed);
            }
        }
    }
}

/// Flips a byte in the stored payload of the record holding `content`
/// (found by its blake3 hash, which is in the record header at byte 24;
/// the payload starts at byte 64), on simulated disk `n`.
pub async fn corrupt_record_of(h: &Harness, n: usize, content: &[u8]) {
    let disk = h.sim(n).expect("a simulated disk");
    let hash = blake3::hash(content);
    let mut at = 1u64 << 20;
    while at < disk.len() {
        let (buf, r) = disk.read_at(AlignedBuf::zeroed(1 << 20), at).await;
        r.unwrap();
        if let Some(p) = buf.windows(32).position(|w| w == hash.as_bytes()) {
            disk.flip_byte(at + p as u64 - 24 + 64 + 100);
            return;
        }
        at += 1 << 20;
    }
    panic!("no record of that content on disk {n}");
}

/// Deterministic block content: `kind` 0 = incompressible, 1 = compressible.
pub fn block(seed: u64, len: usize, kind: u8) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if kind == 1 {
            // Long runs of a few byte values: lz4 shrinks this well.
            let b = (x % 4) as u8 + b'a';
            let run = 16 + (x >> 8) as usize % 48;
            for _ in 0..run.min(len - v.len()) {
                v.push(b);
            }
        } else {
            for b in x.to_le_bytes() {
                if v.len() < len {
                    v.push(b);
                }
            }
        }
    }
    v
}
