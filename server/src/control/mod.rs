//! gRPC control plane (`ballast.v1.VolumeService`, `ballast.v1.NodeService`).
//!
//! The service is decoupled from the storage engine by [`ControlBackend`]:
//! requests are validated and defaulted here, then handed to the backend on
//! tokio's blocking pool. [`memory::MemoryBackend`] is an in-memory backend
//! for tests and demos.

pub mod backend;
pub mod memory;
mod service;
pub mod validate;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use ballast_proto::v1::node_service_server::NodeServiceServer;
use ballast_proto::v1::volume_service_server::VolumeServiceServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

pub use backend::{
    Compression, ControlBackend, ControlError, CreateVolume, DiskView, NodeView, ReplicaView,
    VolumeView,
};
pub use service::{NodeApi, VolumeApi};

/// Default control-plane listen address (matches the CLI's default `--api`).
pub const DEFAULT_ADDR: &str = "127.0.0.1:7800";

/// Bind `addr` and serve the control plane until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    backend: Arc<dyn ControlBackend>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind control API on {addr}"))?;
    serve_listener(listener, backend, shutdown).await
}

/// Serve the control plane on an already-bound listener (e.g. port 0 in
/// tests) until `shutdown` resolves.
pub async fn serve_listener(
    listener: TcpListener,
    backend: Arc<dyn ControlBackend>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let local = listener
        .local_addr()
        .context("control API listener has no local address")?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(addr = %local, "control API listening");
    Server::builder()
        .add_service(VolumeServiceServer::new(VolumeApi::new(Arc::clone(
            &backend,
        ))))
        .add_service(NodeServiceServer::new(NodeApi::new(backend)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .with_context(|| format!("control API on {local} failed"))?;
    tracing::info!(addr = %local, "control API stopped");
    Ok(())
}
