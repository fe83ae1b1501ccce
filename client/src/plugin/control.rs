//! The part of ballastd's control API the plugin uses, behind a trait so
//! the driver's tests can run without a server.

use std::future::Future;

use crate::api::{ApiClient, ApiError, CreateVolumeSpec, Volume};

/// Volume operations on the control plane.
pub trait ControlPlane: Send + Sync + 'static {
    fn create(
        &self,
        spec: CreateVolumeSpec,
    ) -> impl Future<Output = Result<Volume, ApiError>> + Send;
    fn get(&self, name: &str) -> impl Future<Output = Result<Volume, ApiError>> + Send;
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn list(&self) -> impl Future<Output = Result<Vec<Volume>, ApiError>> + Send;
}

/// ballastd's gRPC API at a URL. A connection is made per call: calls are
/// rare (Docker's Create, Remove, Get, List), and a fresh connection means a
/// ballastd restart never leaves the plugin holding a dead channel.
#[derive(Debug, Clone)]
pub struct ApiControl {
    pub url: String,
}

impl ControlPlane for ApiControl {
    async fn create(&self, spec: CreateVolumeSpec) -> Result<Volume, ApiError> {
        ApiClient::connect(&self.url)
            .await?
            .create_volume(spec)
            .await
    }

    async fn get(&self, name: &str) -> Result<Volume, ApiError> {
        ApiClient::connect(&self.url).await?.get_volume(name).await
    }

    async fn delete(&self, name: &str) -> Result<(), ApiError> {
        ApiClient::connect(&self.url)
            .await?
            .delete_volume(name)
            .await
    }

    async fn list(&self) -> Result<Vec<Volume>, ApiError> {
        ApiClient::connect(&self.url).await?.list_volumes().await
    }
}
