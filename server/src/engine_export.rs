//! The NBD server's view of engine volumes: each volume (and snapshot,
//! read-only) is an export of the same name.

use crate::nbd::export::{Export, ExportCatalog, ExportError, ExportFuture, Extent, Payload};
use ballast_engine::{Engine, EngineError, Volume};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::Semaphore;

pub struct EngineCatalog {
    engine: Engine,
    /// Shared by every export of the node (see `VolumeExport::block_status`).
    lookups: Arc<Semaphore>,
}

impl EngineCatalog {
    pub fn new(engine: Engine) -> EngineCatalog {
        EngineCatalog {
            engine,
            lookups: Arc::new(Semaphore::new(max_lookups())),
        }
    }
}

/// BLOCK_STATUS block-map lookups that may run at once on the node: one per
/// CPU. They are CPU work under the engine's state lock plus metadata reads,
/// so more at once would not finish sooner.
fn max_lookups() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn describe(v: &ballast_engine::VolumeInfo) -> String {
    format!(
        "ballast {} {}: block {} B, dedup {}, compression {}",
        if v.read_only { "snapshot" } else { "volume" },
        v.name,
        v.block_size,
        if v.dedup { "on" } else { "off" },
        v.compression
    )
}

impl ExportCatalog for EngineCatalog {
    fn list(&self) -> Vec<(String, String)> {
        self.engine
            .list_volumes()
            .iter()
            .map(|v| (v.name.clone(), describe(v)))
            .collect()
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        let vol = self.engine.open_volume(name).ok()?;
        Some(Arc::new(VolumeExport {
            vol,
            lookups: self.lookups.clone(),
            wrote: Default::default(),
        }))
    }
}

pub struct VolumeExport {
    vol: Volume,
    lookups: Arc<Semaphore>,
    /// This connection changed the volume (see `Drop`).
    wrote: std::sync::atomic::AtomicBool,
}

impl VolumeExport {
    fn wrote(&self) {
        self.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Engine errors as the NBD errno a client should see.
fn to_export(e: EngineError) -> ExportError {
    match e {
        EngineError::NoSpace => ExportError::NoSpace,
        EngineError::ReadOnly(_) => ExportError::ReadOnly,
        EngineError::OutOfRange { .. } | EngineError::InvalidArgument(_) => {
            ExportError::Invalid(e.to_string())
        }
        EngineError::VolumeNotFound(name) => ExportError::Gone(format!(
            "volume \"{name}\" was deleted; the connection will be closed"
        )),
        other => ExportError::Io(other.to_string()),
    }
}

fn map<T: Send + 'static>(f: ballast_engine::EngineFuture<T>) -> ExportFuture<T> {
    Box::pin(async move { f.await.map_err(to_export) })
}

fn extents(ext: Vec<ballast_engine::Extent>) -> Vec<Extent> {
    ext.into_iter()
        .map(|e| Extent {
            len: e.len,
            hole: e.hole,
            zero: e.hole,
        })
        .collect()
}

impl Drop for VolumeExport {
    /// The connection closed: what its client wrote and did not flush is
    /// stored soon rather than when the buffer expires it.
    fn drop(&mut self) {
        if self.wrote.load(std::sync::atomic::Ordering::Relaxed) {
            self.vol.drain_soon();
        }
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.vol.size()
    }

    fn start_together(&self, poll: &mut dyn FnMut()) {
        ballast_engine::io::hold_submissions(poll)
    }

    fn block_size(&self) -> u32 {
        self.vol.block_size()
    }

    fn read_only(&self) -> bool {
        self.vol.read_only()
    }

    fn description(&self) -> String {
        describe(&self.vol.info())
    }

    fn read(&self, offset: u64, len: u32) -> ExportFuture<Bytes> {
        let f = self.vol.read(offset, len);
        Box::pin(async move { f.await.map(|r| r.data).map_err(to_export) })
    }

    fn read_extents(&self, offset: u64, len: u32) -> ExportFuture<(Payload, Vec<Extent>)> {
        let f = self.vol.read_parts(offset, len);
        Box::pin(async move {
            f.await
                .map(|r| (Payload::from_parts(r.parts), extents(r.extents)))
                .map_err(to_export)
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> ExportFuture<()> {
        self.wrote();
        map(self.vol.write(offset, data, fua))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportFuture<()> {
        self.wrote();
        map(self.vol.trim(offset, len, fua))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, _no_hole: bool) -> ExportFuture<()> {
        // Zero blocks are never stored, so "no hole" and "hole" are the same
        // state here: the range reads as zeros and block status says so.
        self.wrote();
        map(self.vol.write_zeroes(offset, len, fua))
    }

    fn flush(&self) -> ExportFuture<()> {
        map(self.vol.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> ExportFuture<Vec<Extent>> {
        // `Volume::block_status` is synchronous: one block-map lookup per
        // block, under the engine's state lock, reading the metadata store
        // (maybe from disk) for blocks not in memory. Even for the 64 Ki
        // blocks the server asks at most, that must not run on a runtime
        // worker, where it would stall every other connection scheduled
        // there. `spawn_blocking` rather than `block_in_place`: the latter
        // panics on a current-thread runtime and would still hold this
        // connection's reader for the whole lookup, whereas a pending future
        // is moved to its own task and the reader goes on with the next
        // requests. The node-wide semaphore, taken before a blocking thread
        // is, keeps a flood of BLOCK_STATUS from many connections from
        // filling the blocking pool, which the engine's metadata commits
        // also run on; waiters queue in order, as futures, not threads.
        let vol = self.vol.clone();
        let lookups = self.lookups.clone();
        Box::pin(async move {
            let permit = lookups
                .acquire_owned()
                .await
                .map_err(|_| ExportError::Shutdown)?;
            let lookup = tokio::task::spawn_blocking(move || {
                // Held until the lookup ends, even if the request that
                // started it is dropped (its connection was cut).
                let _permit = permit;
                vol.block_status(offset, len)
            });
            match lookup.await {
                Ok(r) => r.map(extents).map_err(to_export),
                Err(e) => Err(ExportError::Io(format!("block status lookup failed: {e}"))),
            }
        })
    }

    fn cache(&self, offset: u64, len: u64) -> ExportFuture<()> {
        // Validate the range; the engine keeps no separate read cache to warm.
        // This looks up a single block whatever `len` is: the same bounded
        // work a READ does inline, not worth a hand-off to another thread.
        let r = self
            .vol
            .block_status(offset, len.min(1))
            .map(|_| ())
            .map_err(to_export);
        Box::pin(std::future::ready(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_engine::io::BackendChoice;
    use ballast_engine::{DiskSpec, EngineConfig, VolumeOptions};
    use futures_util::task::noop_waker_ref;
    use std::task::Context;

    async fn engine(dir: &std::path::Path) -> Engine {
        let mut cfg = EngineConfig::new(dir.join("data"));
        cfg.disks = vec![DiskSpec {
            path: dir.join("disk0.img"),
            create_size: Some(256 << 20),
        }];
        cfg.backend = BackendChoice::Threads;
        cfg.segment_size = 1 << 20;
        cfg.cleaner = false;
        cfg.meta_cache_bytes = 8 << 20;
        cfg.read_cache_bytes = 8 << 20;
        Engine::open(cfg).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_status_waits_for_a_lookup_slot_instead_of_looking_up_inline() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path()).await;
        engine
            .create_volume("v", VolumeOptions::new(4 << 30))
            .await
            .unwrap();
        let vol = engine.open_volume("v").unwrap();
        vol.write(1 << 20, Bytes::from(vec![7u8; 8192]), false)
            .await
            .unwrap();
        vol.flush().await.unwrap();
        // No lookup slot free: the lookup must neither happen in the call
        // nor on the first poll (the connection's task), as it did when
        // the engine was asked inline.
        let lookups = Arc::new(Semaphore::new(0));
        let export = VolumeExport {
            vol,
            lookups: lookups.clone(),
            wrote: Default::default(),
        };
        let len = 1 << 30;
        let mut fut = export.block_status(0, len);
        let first = fut
            .as_mut()
            .poll(&mut Context::from_waker(noop_waker_ref()));
        assert!(
            first.is_pending(),
            "block status was looked up on the calling task"
        );
        // Once a slot frees, the answer is complete and correct, and the
        // slot is given back.
        lookups.add_permits(1);
        let ext = tokio::time::timeout(std::time::Duration::from_secs(30), fut)
            .await
            .expect("the lookup never ran")
            .unwrap();
        assert_eq!(
            ext,
            vec![
                Extent::hole(1 << 20),
                Extent::data(8192),
                Extent::hole(len - (1 << 20) - 8192)
            ]
        );
        assert_eq!(lookups.available_permits(), 1);
        // Engine errors still reach the client as NBD errors.
        let r = export.block_status(4 << 30, 1).await;
        assert!(matches!(r, Err(ExportError::Invalid(_))), "{r:?}");
        engine.shutdown().await.unwrap();
    }
}
