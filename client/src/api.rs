//! Typed client for ballastd's gRPC control plane.
//!
//! A thin wrapper over the generated tonic clients that speaks plain Rust
//! structs (serializable to JSON for `--json` output) and turns transport
//! failures and gRPC statuses into one-line [`ApiError`]s.

use std::time::Duration;

use ballast_proto::v1 as pb;
use ballast_proto::v1::node_service_client::NodeServiceClient;
use ballast_proto::v1::volume_service_client::VolumeServiceClient;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// Default control API address of a local ballastd.
pub const DEFAULT_API: &str = "http://127.0.0.1:7800";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A control-plane failure, rendered as a single line.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid API URL {url:?}: {reason} (pass e.g. --api http://127.0.0.1:7800)")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "cannot reach ballastd at {url}: {detail} (is ballastd running? set --api or BALLAST_API)"
    )]
    Unreachable { url: String, detail: String },
    /// The server answered with a gRPC error; `message` is its user-facing text.
    #[error("{message}")]
    Rpc { code: Code, message: String },
}

impl ApiError {
    /// The gRPC status code, if the server answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            ApiError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One replica of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub node: String,
    pub state: String,
}

/// A volume or snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    /// Logical size in bytes (JSON key `size`).
    #[serde(rename = "size")]
    pub size_bytes: u64,
    pub block_size: u32,
    pub mapped_bytes: u64,
    pub dedup: bool,
    pub compression: String,
    pub read_only: bool,
    pub parent_snapshot: Option<String>,
    pub replicas: Vec<Replica>,
    pub generation: u64,
    pub created_unix: u64,
}

/// One backing disk of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub path: String,
    pub disk_id: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

/// Node identity and space accounting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    pub version: String,
    pub io_backend: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub logical_bytes: u64,
    pub unique_bytes: u64,
    pub stored_bytes: u64,
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
    pub checksum_errors: u64,
    pub disks: Vec<Disk>,
    /// ballastd's NBD listen address (`HOST:PORT`); empty when the server
    /// did not report one (older ballastd).
    #[serde(default)]
    pub nbd_address: String,
}

/// Parameters of a new volume; `None` leaves the choice to the server
/// (block size 4096, dedup on, lz4, 1 replica).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateVolumeSpec {
    pub name: String,
    pub size_bytes: u64,
    pub block_size: Option<u32>,
    pub dedup: Option<bool>,
    pub compression: Option<String>,
    pub replicas: Option<u32>,
}

impl From<pb::Replica> for Replica {
    fn from(r: pb::Replica) -> Self {
        Replica {
            node: r.node,
            state: r.state,
        }
    }
}

impl From<pb::Volume> for Volume {
    fn from(v: pb::Volume) -> Self {
        Volume {
            name: v.name,
            size_bytes: v.size_bytes,
            block_size: v.block_size,
            mapped_bytes: v.mapped_bytes,
            dedup: v.dedup,
            compression: v.compression,
            read_only: v.read_only,
            parent_snapshot: v.parent_snapshot,
            replicas: v.replicas.into_iter().map(Into::into).collect(),
            generation: v.generation,
            created_unix: v.created_unix,
        }
    }
}

impl From<pb::Disk> for Disk {
    fn from(d: pb::Disk) -> Self {
        Disk {
            path: d.path,
            disk_id: d.disk_id,
            capacity_bytes: d.capacity_bytes,
            used_bytes: d.used_bytes,
        }
    }
}

impl From<pb::NodeInfo> for NodeInfo {
    fn from(n: pb::NodeInfo) -> Self {
        NodeInfo {
            node_id: n.node_id,
            version: n.version,
            io_backend: n.io_backend,
            capacity_bytes: n.capacity_bytes,
            used_bytes: n.used_bytes,
            logical_bytes: n.logical_bytes,
            unique_bytes: n.unique_bytes,
            stored_bytes: n.stored_bytes,
            dedup_ratio: n.dedup_ratio,
            compression_ratio: n.compression_ratio,
            checksum_errors: n.checksum_errors,
            disks: n.disks.into_iter().map(Into::into).collect(),
            nbd_address: n.nbd_address,
        }
    }
}

/// Connected control-plane client.
#[derive(Debug, Clone)]
pub struct ApiClient {
    url: String,
    volumes: VolumeServiceClient<Channel>,
    nodes: NodeServiceClient<Channel>,
}

/// `host:port` → `http://host:port`; anything with a scheme is kept.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim();
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// Join an error and its sources into one line, skipping repeats.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let text = e.to_string();
        if !text.is_empty()
            && text != "transport error"
            && !parts.last().is_some_and(|p| p.contains(&text))
        {
            parts.push(text);
        }
        cur = e.source();
    }
    if parts.is_empty() {
        err.to_string()
    } else {
        parts.join(": ").replace('\n', " ")
    }
}

impl ApiClient {
    /// Connect to ballastd at `url` (e.g. `http://127.0.0.1:7800`).
    pub async fn connect(url: &str) -> Result<Self, ApiError> {
        let url = normalize_url(url);
        let invalid = |reason: String| ApiError::InvalidUrl {
            url: url.clone(),
            reason,
        };
        if url.starts_with("https://") {
            return Err(invalid("TLS is not supported yet; use http://".into()));
        }
        if !url.starts_with("http://") {
            return Err(invalid("only http:// URLs are supported".into()));
        }
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| invalid(error_chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ApiError::Unreachable {
                url: url.clone(),
                detail: error_chain(&e),
            })?;
        Ok(ApiClient {
            volumes: VolumeServiceClient::new(channel.clone()),
            nodes: NodeServiceClient::new(channel),
            url,
        })
    }

    /// The URL this client talks to.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn status(&self, status: tonic::Status) -> ApiError {
        match status.code() {
            Code::Unavailable => ApiError::Unreachable {
                url: self.url.clone(),
                detail: if status.message().is_empty() {
                    "service unavailable".into()
                } else {
                    status.message().replace('\n', " ")
                },
            },
            code => {
                let message = if status.message().is_empty() {
                    format!("request failed: {code}")
                } else {
                    status.message().replace('\n', " ")
                };
                ApiError::Rpc { code, message }
            }
        }
    }

    pub async fn create_volume(&mut self, spec: CreateVolumeSpec) -> Result<Volume, ApiError> {
        let req = pb::CreateVolumeRequest {
            name: spec.name,
            size_bytes: spec.size_bytes,
            block_size: spec.block_size.unwrap_or(0),
            dedup: spec.dedup,
            compression: spec.compression,
            replicas: spec.replicas.unwrap_or(0),
        };
        match self.volumes.create(req).await {
            Ok(resp) => Ok(resp.into_inner().into()),
            Err(s) => Err(self.status(s)),
        }
    }

    pub async fn delete_volume(&mut self, name: &str) -> Result<(), ApiError> {
        let req = pb::DeleteVolumeRequest { name: name.into() };
        match self.volumes.delete(req).await {
            Ok(_) => Ok(()),
            Err(s) => Err(self.status(s)),
        }
    }

    pub async fn list_volumes(&mut self) -> Result<Vec<Volume>, ApiError> {
        match self.volumes.list(pb::ListVolumesRequest {}).await {
            Ok(resp) => Ok(resp
                .into_inner()
                .volumes
                .into_iter()
                .map(Into::into)
                .collect()),
            Err(s) => Err(self.status(s)),
        }
    }

    pub async fn get_volume(&mut self, name: &str) -> Result<Volume, ApiError> {
        let req = pb::GetVolumeRequest { name: name.into() };
        match self.volumes.get(req).await {
            Ok(resp) => Ok(resp.into_inner().into()),
            Err(s) => Err(self.status(s)),
        }
    }

    pub async fn resize_volume(&mut self, name: &str, size_bytes: u64) -> Result<Volume, ApiError> {
        let req = pb::ResizeVolumeRequest {
            name: name.into(),
            size_bytes,
        };
        match self.volumes.resize(req).await {
            Ok(resp) => Ok(resp.into_inner().into()),
            Err(s) => Err(self.status(s)),
        }
    }

    /// Snapshot `volume` as `snapshot`; returns the snapshot.
    pub async fn snapshot(&mut self, volume: &str, snapshot: &str) -> Result<Volume, ApiError> {
        let req = pb::SnapshotVolumeRequest {
            volume: volume.into(),
            snapshot: snapshot.into(),
        };
        match self.volumes.snapshot(req).await {
            Ok(resp) => Ok(resp.into_inner().into()),
            Err(s) => Err(self.status(s)),
        }
    }

    /// Create `new_volume` from `snapshot`; returns the new volume.
    pub async fn clone_snapshot(
        &mut self,
        snapshot: &str,
        new_volume: &str,
    ) -> Result<Volume, ApiError> {
        let req = pb::CloneSnapshotRequest {
            snapshot: snapshot.into(),
            new_volume: new_volume.into(),
        };
        // `clone` is the generated RPC method, not `Clone::clone`.
        match VolumeServiceClient::clone(&mut self.volumes, req).await {
            Ok(resp) => Ok(resp.into_inner().into()),
            Err(s) => Err(self.status(s)),
        }
    }

    pub async fn node_info(&mut self) -> Result<NodeInfo, ApiError> {
        match self.nodes.info(pb::NodeInfoRequest {}).await {
            Ok(resp) => Ok(resp.into_inner().into()),
            Err(s) => Err(self.status(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_urls() {
        assert_eq!(normalize_url("127.0.0.1:7800"), "http://127.0.0.1:7800");
        assert_eq!(normalize_url(" http://h:1 "), "http://h:1");
    }

    #[test]
    fn volume_json_uses_size_key() {
        let v = Volume {
            name: "v".into(),
            size_bytes: 4096,
            block_size: 4096,
            mapped_bytes: 0,
            dedup: true,
            compression: "lz4".into(),
            read_only: false,
            parent_snapshot: None,
            replicas: vec![],
            generation: 1,
            created_unix: 0,
        };
        let j = serde_json::to_value(&v).unwrap();
        assert_eq!(j["size"], 4096);
        assert!(j.get("size_bytes").is_none());
    }

    #[test]
    fn status_messages_become_one_line() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A lazily connected client is enough to exercise the mapping.
        let channel =
            rt.block_on(async { Endpoint::from_static("http://127.0.0.1:9").connect_lazy() });
        let c = ApiClient {
            url: "http://127.0.0.1:9".into(),
            volumes: VolumeServiceClient::new(channel.clone()),
            nodes: NodeServiceClient::new(channel),
        };
        let e = c.status(tonic::Status::not_found("volume \"x\" not found"));
        assert_eq!(e.to_string(), "volume \"x\" not found");
        assert_eq!(e.code(), Some(Code::NotFound));
        let e = c.status(tonic::Status::unavailable("connection reset"));
        assert!(e
            .to_string()
            .starts_with("cannot reach ballastd at http://127.0.0.1:9"));
        let e = c.status(tonic::Status::internal("a\nb"));
        assert_eq!(e.to_string(), "a b");
    }
}
