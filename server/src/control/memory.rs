//! An in-memory [`ControlBackend`] for tests and demos.
//!
//! It keeps only metadata: volumes, snapshots (read-only volumes sharing the
//! same namespace) and clones. No data is stored, so mapped bytes stay 0
//! unless set with [`MemoryBackend::set_mapped_bytes`].

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use super::backend::{
    ControlBackend, ControlError, CreateVolume, DiskView, NodeView, ReplicaView, VolumeView,
};

/// Default capacity reported by [`MemoryBackend::new`]: 1 TiB.
pub const DEFAULT_CAPACITY: u64 = 1 << 40;

/// In-memory control backend with one node and one fake disk.
#[derive(Debug)]
pub struct MemoryBackend {
    node_id: String,
    capacity_bytes: u64,
    volumes: Mutex<BTreeMap<String, VolumeView>>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// A backend for node `mem-0` with [`DEFAULT_CAPACITY`].
    pub fn new() -> Self {
        Self::with_capacity("mem-0", DEFAULT_CAPACITY)
    }

    /// A backend with a given node id and capacity. A single volume larger
    /// than the capacity is refused with `ResourceExhausted`.
    pub fn with_capacity(node_id: impl Into<String>, capacity_bytes: u64) -> Self {
        MemoryBackend {
            node_id: node_id.into(),
            capacity_bytes,
            volumes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Pretend `bytes` of `name` have been written (for tests of reporting).
    pub fn set_mapped_bytes(&self, name: &str, bytes: u64) -> Result<(), ControlError> {
        let mut vols = self.lock();
        let v = vols
            .get_mut(name)
            .ok_or_else(|| ControlError::volume_not_found(name))?;
        v.mapped_bytes = bytes.min(v.size_bytes);
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, VolumeView>> {
        // Every mutation below is a single insert/remove/field update, so
        // the map is consistent even after a panic elsewhere.
        self.volumes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn check_capacity(&self, size: u64) -> Result<(), ControlError> {
        if size > self.capacity_bytes {
            return Err(ControlError::ResourceExhausted(format!(
                "size {size} bytes exceeds the node capacity of {} bytes",
                self.capacity_bytes
            )));
        }
        Ok(())
    }
}

impl ControlBackend for MemoryBackend {
    fn create_volume(&self, req: CreateVolume) -> Result<VolumeView, ControlError> {
        if req.replicas > 1 {
            return Err(ControlError::FailedPrecondition(format!(
                "cannot place {} replicas: the cluster has 1 node; pass --replicas 1",
                req.replicas
            )));
        }
        self.check_capacity(req.size_bytes)?;
        let mut vols = self.lock();
        if vols.contains_key(&req.name) {
            return Err(ControlError::volume_exists(&req.name));
        }
        let view = VolumeView {
            name: req.name.clone(),
            size_bytes: req.size_bytes,
            block_size: req.block_size,
            mapped_bytes: 0,
            dedup: req.dedup,
            compression: req.compression,
            read_only: false,
            parent_snapshot: None,
            replicas: vec![ReplicaView {
                node: self.node_id.clone(),
                state: "healthy".into(),
            }],
            generation: 1,
            created_unix: Self::now(),
        };
        vols.insert(req.name, view.clone());
        Ok(view)
    }

    fn delete_volume(&self, name: &str) -> Result<(), ControlError> {
        let mut vols = self.lock();
        let target = vols
            .get(name)
            .ok_or_else(|| ControlError::volume_not_found(name))?;
        if target.read_only {
            let clones: Vec<&str> = vols
                .values()
                .filter(|v| v.parent_snapshot.as_deref() == Some(name))
                .map(|v| v.name.as_str())
                .collect();
            if !clones.is_empty() {
                return Err(ControlError::FailedPrecondition(format!(
                    "snapshot {name:?} has clones ({}); delete them first",
                    clones.join(", ")
                )));
            }
        }
        vols.remove(name);
        Ok(())
    }

    fn list_volumes(&self) -> Result<Vec<VolumeView>, ControlError> {
        Ok(self.lock().values().cloned().collect())
    }

    fn get_volume(&self, name: &str) -> Result<VolumeView, ControlError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::volume_not_found(name))
    }

    fn resize_volume(&self, name: &str, new_size: u64) -> Result<VolumeView, ControlError> {
        self.check_capacity(new_size)?;
        let mut vols = self.lock();
        let v = vols
            .get_mut(name)
            .ok_or_else(|| ControlError::volume_not_found(name))?;
        if v.read_only {
            return Err(ControlError::FailedPrecondition(format!(
                "{name:?} is a read-only snapshot; clone it to get a resizable volume"
            )));
        }
        if new_size < v.size_bytes {
            return Err(ControlError::FailedPrecondition(format!(
                "shrinking volume {name:?} from {} to {new_size} bytes is not supported; pass a \
                 size of at least {} bytes",
                v.size_bytes, v.size_bytes
            )));
        }
        v.size_bytes = new_size;
        v.generation += 1;
        Ok(v.clone())
    }

    fn snapshot(&self, volume: &str, snapshot: &str) -> Result<VolumeView, ControlError> {
        let mut vols = self.lock();
        let source = vols
            .get(volume)
            .ok_or_else(|| ControlError::volume_not_found(volume))?;
        if source.read_only {
            return Err(ControlError::FailedPrecondition(format!(
                "{volume:?} is already a snapshot; snapshot a writable volume instead"
            )));
        }
        if vols.contains_key(snapshot) {
            return Err(ControlError::volume_exists(snapshot));
        }
        let mut snap = source.clone();
        snap.name = snapshot.to_string();
        snap.read_only = true;
        snap.generation = 1;
        snap.created_unix = Self::now();
        vols.insert(snapshot.to_string(), snap.clone());
        if let Some(src) = vols.get_mut(volume) {
            src.generation += 1;
        }
        Ok(snap)
    }

    fn clone_snapshot(&self, snapshot: &str, new_volume: &str) -> Result<VolumeView, ControlError> {
        let mut vols = self.lock();
        let snap = vols
            .get(snapshot)
            .ok_or_else(|| ControlError::NotFound(format!("snapshot {snapshot:?} not found")))?;
        if !snap.read_only {
            return Err(ControlError::FailedPrecondition(format!(
                "{snapshot:?} is a writable volume, not a snapshot; snapshot it first"
            )));
        }
        if vols.contains_key(new_volume) {
            return Err(ControlError::volume_exists(new_volume));
        }
        let mut clone = snap.clone();
        clone.name = new_volume.to_string();
        clone.read_only = false;
        clone.parent_snapshot = Some(snapshot.to_string());
        clone.generation = 1;
        clone.created_unix = Self::now();
        vols.insert(new_volume.to_string(), clone.clone());
        Ok(clone)
    }

    fn node_info(&self) -> Result<NodeView, ControlError> {
        let vols = self.lock();
        let logical: u64 = vols.values().map(|v| v.mapped_bytes).sum();
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        Ok(NodeView {
            node_id: self.node_id.clone(),
            capacity_bytes: self.capacity_bytes,
            used_bytes: logical,
            logical_bytes: logical,
            unique_bytes: logical,
            stored_bytes: logical,
            dedup_ratio: ratio(logical, logical),
            compression_ratio: ratio(logical, logical),
            io_backend: "memory".into(),
            disks: vec![DiskView {
                path: "memory".into(),
                disk_id: format!("{}-disk0", self.node_id),
                capacity_bytes: self.capacity_bytes,
                used_bytes: logical,
            }],
            checksum_errors: 0,
            version: env!("CARGO_PKG_VERSION").to_string(),
            // The in-memory backend serves no NBD of its own.
            nbd_address: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::backend::Compression;
    use super::*;

    fn create(b: &MemoryBackend, name: &str, size: u64) -> Result<VolumeView, ControlError> {
        b.create_volume(CreateVolume {
            name: name.into(),
            size_bytes: size,
            block_size: 4096,
            dedup: true,
            compression: Compression::Lz4,
            replicas: 1,
        })
    }

    #[test]
    fn lifecycle() {
        let b = MemoryBackend::new();
        create(&b, "v", 1 << 20).unwrap();
        assert!(matches!(
            create(&b, "v", 1 << 20),
            Err(ControlError::AlreadyExists(_))
        ));
        let r = b.resize_volume("v", 2 << 20).unwrap();
        assert_eq!(r.generation, 2);
        assert!(matches!(
            b.resize_volume("v", 1 << 20),
            Err(ControlError::FailedPrecondition(_))
        ));
        let s = b.snapshot("v", "s").unwrap();
        assert!(s.read_only);
        assert!(matches!(
            b.resize_volume("s", 4 << 20),
            Err(ControlError::FailedPrecondition(_))
        ));
        let c = b.clone_snapshot("s", "c").unwrap();
        assert_eq!(c.parent_snapshot.as_deref(), Some("s"));
        assert!(matches!(
            b.clone_snapshot("v", "c2"),
            Err(ControlError::FailedPrecondition(_))
        ));
        assert!(matches!(
            b.delete_volume("s"),
            Err(ControlError::FailedPrecondition(_))
        ));
        b.delete_volume("c").unwrap();
        b.delete_volume("s").unwrap();
        assert_eq!(b.list_volumes().unwrap().len(), 1);
        assert!(matches!(b.get_volume("s"), Err(ControlError::NotFound(_))));
    }

    #[test]
    fn capacity_and_replicas() {
        let b = MemoryBackend::with_capacity("n", 1 << 20);
        assert!(matches!(
            create(&b, "big", 2 << 20),
            Err(ControlError::ResourceExhausted(_))
        ));
        let mut req = CreateVolume {
            name: "r".into(),
            size_bytes: 4096,
            block_size: 4096,
            dedup: true,
            compression: Compression::Lz4,
            replicas: 3,
        };
        assert!(matches!(
            b.create_volume(req.clone()),
            Err(ControlError::FailedPrecondition(_))
        ));
        req.replicas = 1;
        b.create_volume(req).unwrap();
        b.set_mapped_bytes("r", 4096).unwrap();
        let n = b.node_info().unwrap();
        assert_eq!(n.logical_bytes, 4096);
        assert_eq!(n.dedup_ratio, 1.0);
    }
}
