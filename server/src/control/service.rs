//! tonic service implementations over a [`ControlBackend`].

use std::sync::Arc;

use ballast_proto::v1 as pb;
use ballast_proto::v1::node_service_server::NodeService;
use ballast_proto::v1::volume_service_server::VolumeService;
use tonic::{Request, Response, Status};

use super::backend::{ControlBackend, ControlError, DiskView, NodeView, ReplicaView, VolumeView};
use super::validate;

impl From<ControlError> for Status {
    fn from(err: ControlError) -> Self {
        match err {
            ControlError::NotFound(m) => Status::not_found(m),
            ControlError::AlreadyExists(m) => Status::already_exists(m),
            ControlError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ControlError::InvalidArgument(m) => Status::invalid_argument(m),
            ControlError::FailedPrecondition(m) => Status::failed_precondition(m),
            ControlError::Internal(m) => {
                tracing::error!(error = %m, "control operation failed");
                Status::internal(m)
            }
        }
    }
}

impl From<ReplicaView> for pb::Replica {
    fn from(r: ReplicaView) -> Self {
        pb::Replica {
            node: r.node,
            state: r.state,
        }
    }
}

impl From<VolumeView> for pb::Volume {
    fn from(v: VolumeView) -> Self {
        pb::Volume {
            name: v.name,
            size_bytes: v.size_bytes,
            block_size: v.block_size,
            mapped_bytes: v.mapped_bytes,
            dedup: v.dedup,
            compression: v.compression.as_str().to_string(),
            read_only: v.read_only,
            parent_snapshot: v.parent_snapshot,
            replicas: v.replicas.into_iter().map(Into::into).collect(),
            generation: v.generation,
            created_unix: v.created_unix,
        }
    }
}

impl From<DiskView> for pb::Disk {
    fn from(d: DiskView) -> Self {
        pb::Disk {
            path: d.path,
            disk_id: d.disk_id,
            capacity_bytes: d.capacity_bytes,
            used_bytes: d.used_bytes,
        }
    }
}

impl From<NodeView> for pb::NodeInfo {
    fn from(n: NodeView) -> Self {
        pb::NodeInfo {
            node_id: n.node_id,
            capacity_bytes: n.capacity_bytes,
            used_bytes: n.used_bytes,
            logical_bytes: n.logical_bytes,
            unique_bytes: n.unique_bytes,
            stored_bytes: n.stored_bytes,
            dedup_ratio: n.dedup_ratio,
            compression_ratio: n.compression_ratio,
            io_backend: n.io_backend,
            disks: n.disks.into_iter().map(Into::into).collect(),
            checksum_errors: n.checksum_errors,
            version: n.version,
            nbd_address: n.nbd_address,
        }
    }
}

/// Run a backend call on the blocking pool and map its error to a `Status`.
async fn blocking<T, F>(backend: &Arc<dyn ControlBackend>, f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce(&dyn ControlBackend) -> Result<T, ControlError> + Send + 'static,
{
    let backend = Arc::clone(backend);
    match tokio::task::spawn_blocking(move || f(backend.as_ref())).await {
        Ok(result) => result.map_err(Status::from),
        Err(join) => {
            tracing::error!(error = %join, "control task panicked or was cancelled");
            Err(Status::internal(format!(
                "control operation failed: {join}"
            )))
        }
    }
}

/// `ballast.v1.VolumeService` over a backend.
pub struct VolumeApi {
    backend: Arc<dyn ControlBackend>,
}

impl VolumeApi {
    pub fn new(backend: Arc<dyn ControlBackend>) -> Self {
        VolumeApi { backend }
    }
}

/// `ballast.v1.NodeService` over a backend.
pub struct NodeApi {
    backend: Arc<dyn ControlBackend>,
}

impl NodeApi {
    pub fn new(backend: Arc<dyn ControlBackend>) -> Self {
        NodeApi { backend }
    }
}

#[tonic::async_trait]
impl VolumeService for VolumeApi {
    async fn create(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let req = validate::create(request.into_inner())?;
        let name = req.name.clone();
        let view = blocking(&self.backend, move |b| b.create_volume(req)).await?;
        tracing::info!(volume = %name, size = view.size_bytes, "volume created");
        Ok(Response::new(view.into()))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let name = request.into_inner().name;
        validate::name("volume", &name)?;
        let logged = name.clone();
        blocking(&self.backend, move |b| b.delete_volume(&name)).await?;
        tracing::info!(volume = %logged, "volume deleted");
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn list(
        &self,
        _request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let mut views = blocking(&self.backend, |b| b.list_volumes()).await?;
        views.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: views.into_iter().map(Into::into).collect(),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let name = request.into_inner().name;
        validate::name("volume", &name)?;
        let view = blocking(&self.backend, move |b| b.get_volume(&name)).await?;
        Ok(Response::new(view.into()))
    }

    async fn resize(
        &self,
        request: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let pb::ResizeVolumeRequest { name, size_bytes } = request.into_inner();
        validate::name("volume", &name)?;
        if size_bytes == 0 {
            // Checked before the lookup so the message does not depend on the volume.
            validate::size(0, 1)?;
        }
        let view = blocking(&self.backend, move |b| {
            // The block size is fixed at creation, so checking against the
            // current view is race-free.
            let current = b.get_volume(&name)?;
            validate::size(size_bytes, current.block_size)?;
            b.resize_volume(&name, size_bytes)
        })
        .await?;
        tracing::info!(volume = %view.name, size = view.size_bytes, "volume resized");
        Ok(Response::new(view.into()))
    }

    async fn snapshot(
        &self,
        request: Request<pb::SnapshotVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let pb::SnapshotVolumeRequest { volume, snapshot } = request.into_inner();
        validate::name("volume", &volume)?;
        validate::name("snapshot", &snapshot)?;
        let view = blocking(&self.backend, move |b| b.snapshot(&volume, &snapshot)).await?;
        tracing::info!(snapshot = %view.name, "snapshot created");
        Ok(Response::new(view.into()))
    }

    async fn clone(
        &self,
        request: Request<pb::CloneSnapshotRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let pb::CloneSnapshotRequest {
            snapshot,
            new_volume,
        } = request.into_inner();
        validate::name("snapshot", &snapshot)?;
        validate::name("volume", &new_volume)?;
        let view = blocking(&self.backend, move |b| {
            b.clone_snapshot(&snapshot, &new_volume)
        })
        .await?;
        tracing::info!(volume = %view.name, "volume cloned");
        Ok(Response::new(view.into()))
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn info(
        &self,
        _request: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfo>, Status> {
        let view = blocking(&self.backend, |b| b.node_info()).await?;
        Ok(Response::new(view.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn error_to_status() {
        let cases = [
            (ControlError::NotFound("nf".into()), Code::NotFound),
            (
                ControlError::AlreadyExists("ae".into()),
                Code::AlreadyExists,
            ),
            (
                ControlError::ResourceExhausted("re".into()),
                Code::ResourceExhausted,
            ),
            (
                ControlError::InvalidArgument("ia".into()),
                Code::InvalidArgument,
            ),
            (
                ControlError::FailedPrecondition("fp".into()),
                Code::FailedPrecondition,
            ),
            (ControlError::Internal("in".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), msg);
        }
        let s = Status::from(ControlError::volume_not_found("x"));
        assert_eq!(s.message(), "volume \"x\" not found");
    }
}
