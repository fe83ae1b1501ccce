//! The control plane's view of the engine: volume and node operations, with
//! engine errors mapped onto the control plane's error kinds.

use crate::control::backend::{
    Compression as ApiCompression, ControlBackend, ControlError, CreateVolume, NodeView, VolumeView,
};
use ballast_engine::{Compression, Engine, EngineError, VolumeInfo, VolumeOptions};

pub struct EngineControl {
    engine: Engine,
    rt: tokio::runtime::Handle,
    nbd_address: String,
}

impl EngineControl {
    /// `rt` runs the engine's async control operations; the gRPC layer calls
    /// these methods from blocking threads.
    pub fn new(engine: Engine, rt: tokio::runtime::Handle) -> EngineControl {
        EngineControl {
            engine,
            rt,
            nbd_address: String::new(),
        }
    }

    /// Report `addr` as the node's NBD address in `Node.Info`, so `ballast
    /// attach` finds the NBD server from the API URL alone.
    pub fn with_nbd_address(mut self, addr: std::net::SocketAddr) -> EngineControl {
        self.nbd_address = addr.to_string();
        self
    }
}

impl From<EngineError> for ControlError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::VolumeNotFound(_) => ControlError::NotFound(msg),
            EngineError::VolumeExists(_) => ControlError::AlreadyExists(msg),
            EngineError::InvalidArgument(_) | EngineError::OutOfRange { .. } => {
                ControlError::InvalidArgument(msg)
            }
            EngineError::NoSpace => ControlError::ResourceExhausted(msg),
            EngineError::ReadOnly(_) | EngineError::FailedPrecondition(_) => {
                ControlError::FailedPrecondition(msg)
            }
            _ => ControlError::Internal(msg),
        }
    }
}

fn view(v: VolumeInfo, node: &str) -> VolumeView {
    VolumeView {
        name: v.name,
        size_bytes: v.size,
        block_size: v.block_size,
        mapped_bytes: v.mapped_bytes,
        dedup: v.dedup,
        compression: match v.compression {
            Compression::Lz4 => ApiCompression::Lz4,
            Compression::None => ApiCompression::None,
        },
        read_only: v.read_only,
        parent_snapshot: v.parent,
        replicas: vec![crate::control::backend::ReplicaView {
            node: node.to_string(),
            state: "healthy".into(),
        }],
        generation: v.generation,
        created_unix: v.created_unix,
    }
}

impl EngineControl {
    fn node_id(&self) -> String {
        self.engine.node_stats().node_id
    }
}

impl ControlBackend for EngineControl {
    fn create_volume(&self, req: CreateVolume) -> Result<VolumeView, ControlError> {
        if req.replicas > 1 {
            return Err(ControlError::FailedPrecondition(format!(
                "{} replicas requested but this node runs standalone: create the volume with --replicas 1",
                req.replicas
            )));
        }
        let mut o = VolumeOptions::new(req.size_bytes);
        o.block_size = req.block_size;
        o.dedup = req.dedup;
        o.compression = match req.compression {
            ApiCompression::Lz4 => Compression::Lz4,
            ApiCompression::None => Compression::None,
        };
        let v = self.rt.block_on(self.engine.create_volume(&req.name, o))?;
        Ok(view(v, &self.node_id()))
    }

    fn delete_volume(&self, name: &str) -> Result<(), ControlError> {
        Ok(self.rt.block_on(self.engine.delete_volume(name))?)
    }

    fn list_volumes(&self) -> Result<Vec<VolumeView>, ControlError> {
        let node = self.node_id();
        Ok(self
            .engine
            .list_volumes()
            .into_iter()
            .map(|v| view(v, &node))
            .collect())
    }

    fn get_volume(&self, name: &str) -> Result<VolumeView, ControlError> {
        Ok(view(self.engine.volume_info(name)?, &self.node_id()))
    }

    fn resize_volume(&self, name: &str, new_size: u64) -> Result<VolumeView, ControlError> {
        let v = self
            .rt
            .block_on(self.engine.resize_volume(name, new_size))?;
        Ok(view(v, &self.node_id()))
    }

    fn snapshot(&self, volume: &str, snapshot: &str) -> Result<VolumeView, ControlError> {
        let v = self.rt.block_on(self.engine.snapshot(volume, snapshot))?;
        Ok(view(v, &self.node_id()))
    }

    fn clone_snapshot(&self, snapshot: &str, new_volume: &str) -> Result<VolumeView, ControlError> {
        let v = self
            .rt
            .block_on(self.engine.clone_snapshot(snapshot, new_volume))?;
        Ok(view(v, &self.node_id()))
    }

    fn node_info(&self) -> Result<NodeView, ControlError> {
        let s = self.engine.node_stats();
        Ok(NodeView {
            node_id: s.node_id,
            capacity_bytes: s.capacity_bytes,
            used_bytes: s.used_bytes,
            logical_bytes: s.logical_bytes,
            unique_bytes: s.unique_bytes,
            stored_bytes: s.stored_bytes,
            dedup_ratio: s.dedup_ratio,
            compression_ratio: s.compression_ratio,
            io_backend: s.io_backend,
            disks: s
                .disks
                .into_iter()
                .map(|d| crate::control::backend::DiskView {
                    path: d.path.display().to_string(),
                    disk_id: d.disk_id.to_string(),
                    capacity_bytes: d.capacity_bytes,
                    used_bytes: d.used_bytes,
                })
                .collect(),
            checksum_errors: s.checksum_errors,
            version: env!("CARGO_PKG_VERSION").to_string(),
            nbd_address: self.nbd_address.clone(),
        })
    }
}
