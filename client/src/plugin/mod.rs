//! `ballast plugin docker`: a Docker volume plugin backed by Ballast volumes.
//!
//! Docker finds the plugin by its unix socket in `/run/docker/plugins`
//! (`NAME.sock` makes the driver `NAME`) and speaks its volume plugin
//! protocol to it: HTTP POSTs with JSON bodies ([`protocol`], served by
//! [`http`]). The verbs map onto Ballast like this ([`driver`]):
//!
//! * **Create** validates the `-o` options ([`options`]) and creates the
//!   Ballast volume through ballastd's control API ([`control`]), or adopts
//!   an existing one; the filesystem choice is remembered ([`state`]).
//! * **Mount** attaches the volume to this host — the kernel nbd driver
//!   where it exists, otherwise a FUSE file served by `ballast attach
//!   --fuse` plus a loop device ([`host`]) — makes the filesystem if the
//!   device is blank, mounts it at `MOUNT_ROOT/NAME` and counts the caller's
//!   ID. Further Mounts with other IDs reuse that mount.
//! * **Unmount** drops an ID; the last one out unmounts, releases the loop
//!   device and detaches.
//! * **Remove** deletes the Ballast volume (refused while mounted).
//! * **Path**, **Get**, **List** report mountpoints and volumes;
//!   **Capabilities** says `local` (standalone node).
//!
//! Mount IDs and attachments are persisted, and on start the plugin
//! reconciles them with `/proc/self/mountinfo` and the host's attachments, so
//! a restarted plugin finds its mounts again instead of leaking or doubling
//! them. docs/docker.md is the user guide.

pub mod control;
pub mod driver;
pub mod host;
pub mod http;
#[cfg(test)]
mod http_tests;
pub mod options;
pub mod protocol;
pub mod state;
#[cfg(test)]
mod testing;

use std::path::PathBuf;
use std::sync::Arc;

use tracing::info;

use control::ApiControl;
use driver::{Driver, DriverConfig, DriverError};
use host::{AttachMode, Host, HostError, SystemHost};
use state::StateStore;

/// Everything `ballast plugin docker` needs.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// The unix socket Docker connects to.
    pub socket: PathBuf,
    /// Volumes are mounted at `MOUNT_ROOT/NAME`.
    pub mount_root: PathBuf,
    /// FUSE attachments live at `ATTACH_ROOT/NAME`.
    pub attach_root: PathBuf,
    /// Holds `state.json`.
    pub state_dir: PathBuf,
    /// ballastd's control API.
    pub api: String,
    /// Size of volumes created without `-o size`.
    pub default_size: u64,
    pub attach_mode: AttachMode,
    /// The `ballast` binary that runs `attach`/`detach`.
    pub ballast_bin: PathBuf,
}

/// The plugin could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("the plugin cannot run on this host: {0}")]
    Preflight(#[source] HostError),
    #[error("{0}")]
    Start(#[from] DriverError),
    #[error(transparent)]
    Socket(#[from] http::SocketError),
    #[error("serving {path}: {source}")]
    Serve {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Serve the plugin until `shutdown` completes.
pub async fn run(
    cfg: PluginConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), PluginError> {
    let host = SystemHost {
        ballast: cfg.ballast_bin.clone(),
        api: cfg.api.clone(),
        attach_root: cfg.attach_root.clone(),
        mode: cfg.attach_mode,
    };
    host.preflight().map_err(PluginError::Preflight)?;
    let attach = if host.use_kernel() {
        "kernel nbd"
    } else {
        "FUSE + loop"
    };
    let driver = Driver::start(
        ApiControl {
            url: cfg.api.clone(),
        },
        host,
        DriverConfig {
            mount_root: cfg.mount_root.clone(),
            attach_root: cfg.attach_root.clone(),
            default_size: cfg.default_size,
            scope: "local".into(),
        },
        StateStore::new(&cfg.state_dir),
    )
    .await?;
    let listener = http::bind(&cfg.socket)?;
    info!(
        socket = %cfg.socket.display(),
        api = %cfg.api,
        attach,
        mount_root = %cfg.mount_root.display(),
        state = %cfg.state_dir.display(),
        "serving the Docker volume plugin"
    );
    let router = http::router(Arc::new(driver));
    http::serve(listener, &cfg.socket, router, shutdown)
        .await
        .map_err(|source| PluginError::Serve {
            path: cfg.socket.clone(),
            source,
        })
}
