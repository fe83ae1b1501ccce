//! The NBD server's view of engine volumes: each volume (and snapshot,
//! read-only) is an export of the same name.

use crate::nbd::export::{Export, ExportCatalog, ExportError, ExportFuture, Extent, Payload};
use ballast_engine::{Engine, EngineError, Volume};
use bytes::Bytes;
use std::sync::Arc;

pub struct EngineCatalog {
    engine: Engine,
}

impl EngineCatalog {
    pub fn new(engine: Engine) -> EngineCatalog {
        EngineCatalog { engine }
    }
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
        Some(Arc::new(VolumeExport { vol }))
    }
}

pub struct VolumeExport {
    vol: Volume,
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

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.vol.size()
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
        map(self.vol.write(offset, data, fua))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> ExportFuture<()> {
        map(self.vol.trim(offset, len, fua))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, _no_hole: bool) -> ExportFuture<()> {
        // Zero blocks are never stored, so "no hole" and "hole" are the same
        // state here: the range reads as zeros and block status says so.
        map(self.vol.write_zeroes(offset, len, fua))
    }

    fn flush(&self) -> ExportFuture<()> {
        map(self.vol.flush())
    }

    fn block_status(&self, offset: u64, len: u64) -> ExportFuture<Vec<Extent>> {
        let r = self
            .vol
            .block_status(offset, len)
            .map(extents)
            .map_err(to_export);
        Box::pin(std::future::ready(r))
    }

    fn cache(&self, offset: u64, len: u64) -> ExportFuture<()> {
        // Validate the range; the engine keeps no separate read cache to warm.
        let r = self
            .vol
            .block_status(offset, len.min(1))
            .map(|_| ())
            .map_err(to_export);
        Box::pin(std::future::ready(r))
    }
}
